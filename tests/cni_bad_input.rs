//! What a runtime (or a broken chain) can get wrong, against the real agent process: each bad
//! ADD of kubesg-cni fails with its CNI code, a non-zero exit and exactly one error object on
//! stdout, and leaves nothing of the pod in the agent (no endpoint, no record file, no datapath
//! entry, no pinned link). Each test ends with the good ADD of the same pod, so that "nothing
//! registered" is known to be the bad input's doing.

mod common;

use common::Cluster;
use kubesg_testkit::{
    agent::Startup,
    cni::{CniPod, NetworkList, PluginRun},
    netns::unique_name,
};
use serde_json::{json, Value};

/// A pod attached by the loopback network and the bridge plugin only: a real veth and real
/// addresses, not yet registered with the agent. Returns it with the bridge's result and the
/// host veth's index.
fn bridged_pod(cluster: &Cluster, name: &str, host: u8) -> (CniPod, Value, u32) {
    let pod = cluster.pod(name, host);
    let bridge_only = NetworkList {
        plugins: cluster.network.plugins[..1].to_vec(),
        ..cluster.network.clone()
    };
    cluster
        .node
        .runtime
        .add(&cluster.node.loopback, &pod.loopback_attachment())
        .expect("loopback ADD");
    let result = cluster
        .node
        .runtime
        .add(&bridge_only, &pod.attachment)
        .unwrap_or_else(|e| panic!("bridge ADD: {e}"));
    let (_, ifindex) = cluster.node.host_veth(&result).expect("host veth");
    (pod, result, ifindex)
}

/// kubesg-cni's config in the chain, after the bridge plugin's `prev` result.
fn config(cluster: &Cluster, prev: &Value) -> Value {
    cluster.network.plugin_config(1, None, Some(prev), None)
}

/// The environment of `command` for `pod`, as the runtime sets it.
fn env(cluster: &Cluster, pod: &CniPod, command: &str) -> Vec<(String, String)> {
    pod.attachment
        .env(command, &cluster.node.runtime.cni_path())
}

/// Runs kubesg-cni in the node with `env` and `stdin`.
fn kubesg_cni(cluster: &Cluster, env: &[(String, String)], stdin: &str) -> PluginRun {
    cluster
        .node
        .runtime
        .exec("kubesg-cni", env, stdin.as_bytes())
        .expect("running kubesg-cni")
}

/// Asserts that `run` failed with `code`: non-zero exit, stdout exactly one error object with
/// `cniVersion`, `code`, `msg` and `details`. Returns `details`.
#[track_caller]
fn assert_error(run: &PluginRun, code: u64, what: &str) -> String {
    assert_ne!(run.exit_code, 0, "{what}: should fail\n{run:?}");
    let err: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not one JSON value ({e})\n{run:?}"));
    assert_eq!(err["code"], code, "{what}: {err}\nstderr:\n{}", run.stderr);
    let mut keys: Vec<&String> = err
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    keys.sort();
    assert_eq!(
        keys,
        ["cniVersion", "code", "details", "msg"],
        "{what}: error object {err}"
    );
    err["details"].as_str().unwrap_or_default().to_owned()
}

/// The control: the same pod, added correctly, is registered.
#[track_caller]
fn assert_good_add_registers(cluster: &Cluster, pod: &CniPod, prev: &Value, ifindex: u32) {
    let run = kubesg_cni(
        cluster,
        &env(cluster, pod, "ADD"),
        &config(cluster, prev).to_string(),
    );
    assert_eq!(
        run.exit_code,
        0,
        "the good ADD: {run:?}\n{}",
        cluster.dump()
    );
    assert!(cluster
        .agent
        .knows_container(pod.container_id())
        .expect("list"));
    assert!(cluster.agent.datapath_has_endpoint(ifindex).expect("maps"));
}

#[test]
fn malformed_json_missing_prev_result_and_unsupported_versions_fail_with_their_codes() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::start(Startup::Deny, |_, _| {});
    let (pod, prev, ifindex) = bridged_pod(&cluster, "bad-config", 21);
    let add = env(&cluster, &pod, "ADD");
    let good = config(&cluster, &prev);

    let truncated = good.to_string()[..20].to_owned();
    let mut without_prev = good.clone();
    without_prev
        .as_object_mut()
        .expect("object")
        .remove("prevResult");
    // (what, code, stdin, what the details must mention)
    let mut cases: Vec<(String, u64, String, &str)> = vec![
        ("malformed JSON".into(), 6, truncated, "JSON"),
        (
            "no prevResult".into(),
            7,
            without_prev.to_string(),
            "prevResult",
        ),
    ];
    for version in ["0.2.0", "9.9.9"] {
        let mut conf = good.clone();
        conf["cniVersion"] = json!(version);
        cases.push((
            format!("cniVersion {version}"),
            1,
            conf.to_string(),
            version,
        ));
    }
    for (what, code, stdin, mention) in &cases {
        let run = kubesg_cni(&cluster, &add, stdin);
        let details = assert_error(&run, *code, what);
        assert!(details.contains(mention), "{what}: {details}");
        cluster.assert_nothing_registered(pod.container_id(), Some(ifindex), what);
    }
    assert_good_add_registers(&cluster, &pod, &prev, ifindex);
}

#[test]
fn each_missing_environment_variable_is_code_4_naming_it() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::start(Startup::Deny, |_, _| {});
    let (pod, prev, ifindex) = bridged_pod(&cluster, "bad-env", 22);
    let conf = config(&cluster, &prev).to_string();
    for var in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let vars: Vec<(String, String)> = env(&cluster, &pod, "ADD")
            .into_iter()
            .filter(|(k, _)| k != var)
            .collect();
        let run = kubesg_cni(&cluster, &vars, &conf);
        let details = assert_error(&run, 4, var);
        assert!(details.contains(var), "{var}: {details}");
        cluster.assert_nothing_registered(pod.container_id(), Some(ifindex), var);
    }
    // The pod's identity: without it the agent cannot match the pod to its rules.
    for (what, args) in [
        ("no CNI_ARGS", None),
        (
            "CNI_ARGS without the pod",
            Some("IgnoreUnknown=1;K8S_POD_UID=u"),
        ),
        (
            "CNI_ARGS without the pod's name",
            Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop"),
        ),
    ] {
        let vars: Vec<(String, String)> = env(&cluster, &pod, "ADD")
            .into_iter()
            .filter(|(k, _)| k != "CNI_ARGS")
            .chain(args.map(|a| ("CNI_ARGS".to_owned(), a.to_owned())))
            .collect();
        let run = kubesg_cni(&cluster, &vars, &conf);
        let details = assert_error(&run, 4, what);
        assert!(details.contains("K8S_POD_NAME"), "{what}: {details}");
        cluster.assert_nothing_registered(pod.container_id(), Some(ifindex), what);
    }
    assert_good_add_registers(&cluster, &pod, &prev, ifindex);
}

#[test]
fn netns_that_does_not_exist_is_code_3() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::start(Startup::Deny, |_, _| {});
    let (pod, prev, ifindex) = bridged_pod(&cluster, "no-netns", 23);
    let gone = format!("/run/netns/{}", unique_name("gone"));
    // The prevResult agrees with CNI_NETNS, as a runtime whose pod died in between sends it.
    let mut stale = prev.clone();
    for iface in stale["interfaces"].as_array_mut().expect("interfaces") {
        if iface.get("sandbox").is_some() {
            iface["sandbox"] = json!(gone);
        }
    }
    let vars: Vec<(String, String)> = env(&cluster, &pod, "ADD")
        .into_iter()
        .map(|(k, v)| {
            if k == "CNI_NETNS" {
                (k, gone.clone())
            } else {
                (k, v)
            }
        })
        .collect();
    let run = kubesg_cni(&cluster, &vars, &config(&cluster, &stale).to_string());
    let details = assert_error(&run, 3, "unknown netns");
    assert!(details.contains(&gone), "{details}");
    cluster.assert_nothing_registered(pod.container_id(), Some(ifindex), "unknown netns");
    assert_good_add_registers(&cluster, &pod, &prev, ifindex);
}

#[test]
fn add_while_the_agent_is_down_is_code_11_whether_it_stopped_or_crashed() {
    kubesg_testkit::require_privileged!();
    let mut cluster = Cluster::start(Startup::Deny, |_, _| {});
    let (pod, prev, ifindex) = bridged_pod(&cluster, "no-agent", 24);
    let add = env(&cluster, &pod, "ADD");
    let conf = config(&cluster, &prev).to_string();
    for crash in [false, true] {
        let what = if crash {
            "agent killed"
        } else {
            "agent stopped"
        };
        if crash {
            cluster.agent.kill().expect("killing the agent");
        } else {
            cluster.agent.stop().expect("stopping the agent");
        }
        let run = kubesg_cni(&cluster, &add, &conf);
        let details = assert_error(&run, 11, what);
        assert!(details.contains("agent"), "{what}: {details}");
        cluster.agent.start_again().expect("starting the agent");
        cluster.assert_nothing_registered(pod.container_id(), Some(ifindex), what);
    }
    assert_good_add_registers(&cluster, &pod, &prev, ifindex);
}

#[test]
fn prev_result_naming_a_host_veth_that_does_not_exist_never_registers_a_phantom() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::start(Startup::Deny, |_, _| {});

    // A real pod behind the wrong name: kubesg-cni asks the kernel and registers the real veth.
    let (pod, prev, ifindex) = bridged_pod(&cluster, "renamed", 25);
    let (real_name, _) = cluster.node.host_veth(&prev).expect("host veth");
    let phantom = unique_name("vnot");
    let mut lying = prev.clone();
    for iface in lying["interfaces"].as_array_mut().expect("interfaces") {
        if iface["name"] == real_name.as_str() {
            iface["name"] = json!(phantom);
        }
    }
    let run = kubesg_cni(
        &cluster,
        &env(&cluster, &pod, "ADD"),
        &config(&cluster, &lying).to_string(),
    );
    assert_eq!(run.exit_code, 0, "{run:?}");
    let endpoints = cluster.agent.list_endpoints().expect("list");
    let ep = endpoints
        .iter()
        .find(|e| {
            e.key
                .as_ref()
                .is_some_and(|k| k.container_id == pod.container_id())
        })
        .expect("registered");
    assert_eq!(
        (ep.host_ifname.as_str(), ep.host_ifindex),
        (real_name.as_str(), ifindex)
    );

    // A pod whose interface is no veth at all, named after a veth that does not exist: there is
    // no host end to enforce on, and nothing is registered.
    let odd = cluster.pod("no-veth", 26);
    odd.ns
        .ip(&["link", "add", "eth0", "type", "bridge"])
        .expect("an eth0 that is no veth");
    odd.ns
        .ip(&["addr", "add", "10.77.0.26/24", "dev", "eth0"])
        .expect("address");
    odd.ns.ip(&["link", "set", "eth0", "up"]).expect("up");
    let fake = json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "kbr0"},
            {"name": phantom},
            {"name": "eth0", "sandbox": odd.attachment.netns.display().to_string()},
        ],
        "ips": [{"interface": 2, "address": "10.77.0.26/24", "gateway": "10.77.0.1"}],
    });
    let run = kubesg_cni(
        &cluster,
        &env(&cluster, &odd, "ADD"),
        &config(&cluster, &fake).to_string(),
    );
    let details = assert_error(&run, 7, "no veth");
    assert!(details.contains("not a veth"), "{details}");
    cluster.assert_nothing_registered(odd.container_id(), None, "no veth");
}
