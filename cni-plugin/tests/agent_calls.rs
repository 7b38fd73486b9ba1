//! The binary against the real kubesg-agent process (in a node network namespace, pods attached
//! by Debian's bridge plugin): what DEL, CHECK, STATUS and GC ask the agent, how each answer
//! becomes a CNI outcome, and a DEL the agent does not answer in time (queued for it). The two answers the real
//! agent never gives are served by a stub (support/stub_agent.rs) at the end.

#[path = "support/plugin.rs"]
mod plugin;
#[path = "support/stub_agent.rs"]
mod stub_agent;

use std::time::{Duration, Instant};

use kubesg_proto::{
    pending_deletes,
    v1alpha1::{Endpoint, EndpointKey, StatusResponse},
};
use kubesg_testkit::{
    agent::{AgentConfig, AgentProcess, Startup},
    cni::{pod_v4, pod_v6, Attachment, CniNode, CniPod, NetworkList},
};
use plugin::{attachment_env, run_plugin, run_plugin_as, run_plugin_in, PluginRun};
use serde_json::{json, Value};
use stub_agent::{Answers, StubAgent};

/// A node with the agent and the pod network (`bridge` + `host-local`, `kubesg-cni`). Fields
/// drop in order: the agent first, the node namespace last.
struct Node {
    agent: AgentProcess,
    network: NetworkList,
    node: CniNode,
}

impl Node {
    fn start(startup: Startup, wait_timeout: Option<Duration>) -> Node {
        let node = CniNode::new().expect("node");
        let mut config = AgentConfig::new("node-a", startup);
        config.wait_timeout = wait_timeout;
        let agent = AgentProcess::start(node.name(), config).expect("starting kubesg-agent");
        let network = node.pod_network(&agent.socket(), 10);
        Node {
            agent,
            network,
            node,
        }
    }

    fn pod(&self, name: &str, host: u8) -> CniPod {
        CniPod::new("shop", name, pod_v4(host), pod_v6(host)).expect("pod netns")
    }

    /// A pod attached through the whole chain (so registered with the agent).
    fn registered_pod(&self, name: &str, host: u8) -> CniPod {
        let pod = self.pod(name, host);
        self.node
            .add(&self.network, &pod)
            .unwrap_or_else(|e| panic!("ADD of {name}: {e}\n{}", self.agent.log()));
        pod
    }

    /// A pod attached by the loopback network and the bridge plugin only (not registered);
    /// the bridge's result.
    fn bridged_pod(&self, name: &str, host: u8) -> (CniPod, Value) {
        let pod = self.pod(name, host);
        let bridge_only = NetworkList {
            plugins: self.network.plugins[..1].to_vec(),
            ..self.network.clone()
        };
        let rt = &self.node.runtime;
        rt.add(&self.node.loopback, &pod.loopback_attachment())
            .expect("loopback ADD");
        let result = rt.add(&bridge_only, &pod.attachment).expect("bridge ADD");
        (pod, result)
    }

    /// The chain's result for `att` (the prevResult a runtime gives CHECK and DEL).
    fn prev(&self, att: &Attachment) -> Value {
        self.node
            .runtime
            .cached_result(&self.network, att)
            .expect("the attachment was added")
    }

    /// kubesg-cni's config alone, in `version`, with `extra` keys.
    fn config(&self, version: &str, extra: Value) -> String {
        let mut conf = json!({
            "cniVersion": version,
            "name": "kubesg-test",
            "type": "kubesg-cni",
            "agentSocket": self.agent.socket().display().to_string(),
            "timeoutSeconds": 5,
        });
        if let (Some(conf), Value::Object(extra)) = (conf.as_object_mut(), extra) {
            conf.extend(extra);
        }
        conf.to_string()
    }

    /// Runs the built kubesg-cni inside the node namespace.
    fn run(&self, env: &[(&str, &str)], conf: &str) -> PluginRun {
        run_plugin_in(self.node.name(), env, conf)
    }

    /// The keys of the endpoints the agent knows, sorted.
    fn keys(&self) -> Vec<(String, String)> {
        let mut keys: Vec<(String, String)> = self
            .agent
            .list_endpoints()
            .expect("ListEndpoints")
            .into_iter()
            .filter_map(|e| e.key)
            .map(|k| (k.container_id, k.ifname))
            .collect();
        keys.sort();
        keys
    }

    /// How many CHECK requests the agent served (its own metric).
    fn checks_served(&self) -> u64 {
        self.agent
            .metrics()
            .expect("metrics")
            .lines()
            .filter(|l| {
                l.starts_with("kubesg_agent_cni_requests_total{") && l.contains("op=\"check\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

fn key(att: &Attachment) -> (String, String) {
    (att.container_id.clone(), att.ifname.clone())
}

fn netns(att: &Attachment) -> &str {
    att.netns.to_str().expect("netns path is UTF-8")
}

#[test]
fn del_asks_the_agent_to_forget_the_endpoint() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let pod = node.registered_pod("a", 11);
    let ifindex = node
        .node
        .host_veth(&node.prev(&pod.attachment))
        .expect("veth")
        .1;
    assert_eq!(node.keys(), [key(&pod.attachment)]);

    let att = &pod.attachment;
    let env = attachment_env("DEL", &att.container_id, netns(att), "eth0");
    node.run(&env, &node.config("1.0.0", json!({})))
        .assert_silent_success();
    assert_eq!(node.keys(), []);
    assert!(node
        .agent
        .record_files(&att.container_id)
        .expect("records")
        .is_empty());
    assert!(!node.agent.datapath_has_endpoint(ifindex).expect("maps"));
    assert!(node.agent.pinned_links(ifindex).expect("links").is_empty());
}

#[test]
fn del_of_an_endpoint_the_agent_does_not_know_succeeds() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let pod = node.registered_pod("a", 11);
    let prev = node.prev(&pod.attachment);
    let env = attachment_env("DEL", "c1", netns(&pod.attachment), "eth0");
    node.run(&env, &node.config("0.4.0", json!({"prevResult": prev})))
        .assert_silent_success();
    assert_eq!(
        node.keys(),
        [key(&pod.attachment)],
        "the other endpoint stays"
    );
}

#[test]
fn check_of_an_enforced_endpoint_succeeds() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let pod = node.registered_pod("a", 11);
    let att = &pod.attachment;
    let env = attachment_env("CHECK", &att.container_id, netns(att), "eth0");
    let before = node.checks_served();
    node.run(
        &env,
        &node.config("1.0.0", json!({"prevResult": node.prev(att)})),
    )
    .assert_silent_success();
    assert_eq!(node.checks_served(), before + 1, "the agent was asked");
}

#[test]
fn check_of_an_endpoint_the_agent_does_not_know_is_code_100() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let pod = node.registered_pod("a", 11);
    let att = &pod.attachment;
    let prev = node.prev(att);
    let del = attachment_env("DEL", &att.container_id, netns(att), "eth0");
    node.run(&del, &node.config("1.0.0", json!({})))
        .assert_silent_success();

    let env = attachment_env("CHECK", &att.container_id, netns(att), "eth0");
    let run = node.run(&env, &node.config("1.0.0", json!({"prevResult": prev})));
    let err = run.assert_error(100);
    let details = err["details"].as_str().unwrap_or_default();
    assert!(
        details.contains(&format!("{}/eth0", att.container_id)),
        "{details}"
    );
}

#[test]
fn check_of_an_endpoint_whose_programs_are_detached_is_code_101_with_the_agents_reason() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let pod = node.registered_pod("a", 11);
    let att = &pod.attachment;
    let prev = node.prev(att);
    let (veth, ifindex) = node.node.host_veth(&prev).expect("veth");
    // Unpinning the tcx links detaches the programs (the pins are their only reference).
    let links = node.agent.pinned_links(ifindex).expect("links");
    assert_eq!(links.len(), 2, "{links:?}");
    for link in links {
        std::fs::remove_file(&link).expect("unpinning");
    }

    let env = attachment_env("CHECK", &att.container_id, netns(att), "eth0");
    let run = node.run(&env, &node.config("1.1.0", json!({"prevResult": prev})));
    let err = run.assert_error(101);
    let details = err["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("not attached") && details.contains(&veth),
        "the agent's reason: {details}"
    );
}

#[test]
fn check_whose_prev_result_lacks_the_pod_interface_is_code_7_without_asking_the_agent() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let pod = node.registered_pod("a", 11);
    let att = &pod.attachment;
    let before = node.checks_served();
    let env = attachment_env("CHECK", &att.container_id, "/run/netns/other", "eth0");
    node.run(
        &env,
        &node.config("1.0.0", json!({"prevResult": node.prev(att)})),
    )
    .assert_error(7);
    assert_eq!(node.checks_served(), before, "the agent was not asked");
}

#[test]
fn status_of_a_serving_agent_succeeds_and_of_a_crashed_one_is_code_50_naming_its_socket() {
    kubesg_testkit::require_privileged!();
    let mut node = Node::start(Startup::Deny, None);
    let status = [("CNI_COMMAND", "STATUS")];
    run_plugin(&status, &node.config("1.1.0", json!({}))).assert_silent_success();

    node.agent.kill().expect("killing the agent");
    let run = run_plugin(&status, &node.config("1.1.0", json!({})));
    let err = run.assert_error(50);
    let details = err["details"].as_str().unwrap_or_default();
    assert!(
        details.contains(&node.agent.socket().display().to_string()),
        "{details}"
    );
}

/// The socket's directory keeps other users out; a process that reaches the socket anyway (its
/// permissions loosened here) is refused by the agent, which checks the caller's credentials,
/// and says why. Root is still served.
#[test]
fn a_call_from_a_process_that_is_not_root_is_refused_with_the_reason() {
    kubesg_testkit::require_privileged!();
    use std::os::unix::fs::PermissionsExt as _;
    let node = Node::start(Startup::Deny, None);
    let socket = node.agent.socket();
    let mut dir = socket.parent();
    while let Some(d) = dir.filter(|d| d.starts_with(node.agent.dir())) {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        dir = d.parent();
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let status = [("CNI_COMMAND", "STATUS")];
    let conf = node.config("1.1.0", json!({}));
    const NOBODY: u32 = 65534;
    let err = run_plugin_as(NOBODY, &status, &conf).assert_error(50);
    let details = err["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("only root may use the kubesg agent's CNI socket")
            && details.contains(&format!("uid {NOBODY}")),
        "{err}"
    );
    assert!(
        node.agent
            .log()
            .contains("refusing a CNI call from a process that is not root"),
        "the agent logs the refusal"
    );
    run_plugin(&status, &conf).assert_silent_success();
}

/// CHECK and DEL name an attachment as ADD does, and the agent checks the names as it checks
/// ADD's (they become file names): a DEL of `../bait` is refused and removes nothing; one with a
/// NUL byte is refused, not an internal error. kubesg-cni checks them too, so these come from
/// another caller of the socket.
#[test]
fn a_del_whose_names_are_not_valid_is_refused_and_removes_nothing() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let kept = node.registered_pod("kept", 13);
    let state = node.agent.state_dir();
    let baits = [state.join("bait:eth0.json"), state.join("bait_eth0.json")];
    for bait in &baits {
        std::fs::write(bait, b"{}").expect("a bait file");
    }
    for container_id in ["../bait", "abc\0def", ""] {
        let answer = node
            .agent
            .delete_endpoint(EndpointKey {
                container_id: container_id.into(),
                ifname: "eth0".into(),
            })
            .expect("the agent answers");
        let status = answer.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("invalid container id"),
            "{status:?}"
        );
    }
    for bait in &baits {
        assert!(bait.exists(), "{} was removed", bait.display());
    }
    assert_eq!(
        node.keys(),
        vec![key(&kept.attachment)],
        "nothing else deleted"
    );
}

/// One interface, one endpoint: an ADD naming the host interface of another registered
/// attachment is refused with the owner's name, and the owner stays registered and enforced.
/// Before, the second registration took the interface over (its rules, counters and tracked
/// connections).
#[test]
fn an_add_naming_another_endpoints_interface_is_refused() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let kept = node.registered_pod("owner", 14);
    let mut intruder = node
        .agent
        .list_endpoints()
        .expect("ListEndpoints")
        .into_iter()
        .find(|e| e.key.as_ref().map(|k| &k.container_id) == Some(&kept.attachment.container_id))
        .expect("the owner's endpoint");
    intruder.key = Some(EndpointKey {
        container_id: "intruder".into(),
        ifname: "eth0".into(),
    });
    if let Some(pod) = intruder.pod.as_mut() {
        pod.name = "intruder".into();
    }
    let status = node
        .agent
        .add_endpoint(intruder)
        .expect("the agent answers")
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "belongs to endpoint {}/eth0",
            kept.attachment.container_id
        )),
        "{status:?}"
    );
    assert_eq!(node.keys(), vec![key(&kept.attachment)], "the owner alone");
    let att = &kept.attachment;
    let env = attachment_env("CHECK", &att.container_id, netns(att), "eth0");
    node.run(
        &env,
        &node.config("1.0.0", json!({"prevResult": node.prev(att)})),
    )
    .assert_silent_success();
}

#[test]
fn gc_deletes_the_endpoints_missing_from_the_valid_attachments_only() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let keep = node.registered_pod("keep", 11);
    let stale = node.registered_pod("stale", 12);
    // A second interface of the kept pod, which the runtime no longer lists.
    let net1 = Attachment {
        ifname: "net1".into(),
        capability_args: Default::default(),
        ..keep.attachment.clone()
    };
    node.node
        .runtime
        .add(&node.network, &net1)
        .unwrap_or_else(|e| panic!("ADD of net1: {e}"));
    let mut all = vec![key(&keep.attachment), key(&stale.attachment), key(&net1)];
    all.sort();
    assert_eq!(node.keys(), all);

    let conf = node.config(
        "1.1.0",
        json!({"cni.dev/valid-attachments": [
            {"containerID": keep.attachment.container_id, "ifname": "eth0"},
        ]}),
    );
    run_plugin(&[("CNI_COMMAND", "GC")], &conf).assert_silent_success();
    assert_eq!(node.keys(), [key(&keep.attachment)]);
}

#[test]
fn gc_without_valid_attachments_deletes_nothing() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let pod = node.registered_pod("a", 11);
    run_plugin(&[("CNI_COMMAND", "GC")], &node.config("1.1.0", json!({}))).assert_silent_success();
    assert_eq!(node.keys(), [key(&pod.attachment)]);
}

#[test]
fn del_the_agent_does_not_answer_in_time_succeeds_and_is_applied_once_it_answers() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let pod = node.registered_pod("a", 11);
    let att = &pod.attachment;
    // A hung agent: its socket accepts, nothing answers.
    node.agent.freeze().expect("SIGSTOP");
    let env = attachment_env("DEL", &att.container_id, netns(att), "eth0");
    let run = node.run(&env, &node.config("1.0.0", json!({"timeoutSeconds": 1})));
    let queue = pending_deletes::dir_beside(&node.agent.socket());
    let queued = pending_deletes::read_all(&queue)
        .expect("reading the queue")
        .len();
    node.agent.thaw().expect("SIGCONT");
    run.assert_silent_success();
    assert!(
        run.stderr.contains("queued") && run.stderr.to_lowercase().contains("timeout"),
        "stderr: {}",
        run.stderr
    );
    assert_eq!(queued, 1, "the DEL waits in the queue");
    // The agent, answering again, applies it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.keys().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(node.keys().is_empty(), "the queued DEL was not applied");
    assert!(pending_deletes::read_all(&queue)
        .expect("reading")
        .is_empty());
}

#[test]
fn add_the_plugin_stops_waiting_for_is_code_11_and_leaves_no_endpoint() {
    kubesg_testkit::require_privileged!();
    // Under the `wait` startup policy the agent holds an ADD until the pod's rules arrive
    // (never: there is no operator), longer than the plugin waits.
    let node = Node::start(Startup::Wait, Some(Duration::from_secs(30)));
    let (pod, prev) = node.bridged_pod("a", 11);
    let att = &pod.attachment;
    let cni_args = att.cni_args();
    let mut env = attachment_env("ADD", &att.container_id, netns(att), "eth0");
    env.push(("CNI_ARGS", cni_args.as_str()));
    let run = node.run(
        &env,
        &node.config("1.0.0", json!({"timeoutSeconds": 1, "prevResult": prev})),
    );
    run.assert_error(11);

    // The runtime saw the ADD fail: the agent must not keep enforcing a pod it will retry.
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.keys().contains(&key(att)) {
        assert!(
            Instant::now() < deadline,
            "the agent kept the endpoint of a failed ADD\n{}",
            node.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(node
        .agent
        .record_files(&att.container_id)
        .expect("records")
        .is_empty());
    let ifindex = node.node.host_veth(&prev).expect("veth").1;
    assert!(!node.agent.datapath_has_endpoint(ifindex).expect("maps"));
    assert!(node.agent.pinned_links(ifindex).expect("links").is_empty());
}

#[test]
fn add_whose_caller_dies_while_it_waits_leaves_no_endpoint() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Wait, Some(Duration::from_secs(30)));
    let (pod, prev) = node.bridged_pod("a", 11);
    let att = &pod.attachment;
    let mut plugin = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            node.node.name(),
            env!("CARGO_BIN_EXE_kubesg-cni"),
        ])
        .env_clear()
        .envs(attachment_env("ADD", &att.container_id, netns(att), "eth0"))
        .env("CNI_ARGS", att.cni_args())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running kubesg-cni");
    let conf = node.config("1.0.0", json!({"timeoutSeconds": 30, "prevResult": prev}));
    std::io::Write::write_all(&mut plugin.stdin.take().expect("stdin"), conf.as_bytes())
        .expect("config");
    // Once the agent holds the ADD, the runtime kills the plugin (its own timeout, a restart).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.keys().contains(&key(att)) {
        assert!(Instant::now() < deadline, "the ADD never reached the agent");
        std::thread::sleep(Duration::from_millis(20));
    }
    plugin.kill().expect("killing the plugin");
    plugin.wait().expect("reaping the plugin");

    let deadline = Instant::now() + Duration::from_secs(5);
    while node.keys().contains(&key(att)) {
        assert!(
            Instant::now() < deadline,
            "the agent kept the endpoint of an abandoned ADD\n{}",
            node.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(node
        .agent
        .record_files(&att.container_id)
        .expect("records")
        .is_empty());
}

#[test]
fn del_and_gc_read_not_found_as_already_gone() {
    let stub = StubAgent::start(Answers {
        endpoints: vec![Endpoint {
            key: Some(EndpointKey {
                container_id: "stale".into(),
                ifname: "eth0".into(),
            }),
            ..Endpoint::default()
        }],
        ..Answers::default()
    });
    let conf = |version: &str, extra: Value| {
        let mut conf = json!({
            "cniVersion": version, "name": "kubesg-test", "type": "kubesg-cni",
            "agentSocket": stub.socket.display().to_string(), "timeoutSeconds": 5,
        });
        if let (Some(conf), Value::Object(extra)) = (conf.as_object_mut(), extra) {
            conf.extend(extra);
        }
        conf.to_string()
    };
    let env = attachment_env("DEL", "c1", "/run/netns/gone", "eth0");
    run_plugin(&env, &conf("1.0.0", json!({}))).assert_silent_success();
    run_plugin(
        &[("CNI_COMMAND", "GC")],
        &conf("1.1.0", json!({"cni.dev/valid-attachments": []})),
    )
    .assert_silent_success();
}

#[test]
fn status_of_an_agent_that_is_not_ready_is_code_50_with_its_message() {
    let stub = StubAgent::start(Answers {
        status: StatusResponse {
            ready: false,
            message: "datapath not loaded".into(),
        },
        ..Answers::default()
    });
    let conf = json!({
        "cniVersion": "1.1.0", "name": "kubesg-test", "type": "kubesg-cni",
        "agentSocket": stub.socket.display().to_string(), "timeoutSeconds": 5,
    });
    let run = run_plugin(&[("CNI_COMMAND", "STATUS")], &conf.to_string());
    let err = run.assert_error(50);
    assert!(err["details"]
        .as_str()
        .unwrap_or_default()
        .contains("datapath not loaded"));
}

#[test]
fn the_agent_reports_each_pods_conntrack_entries_and_refused_connections() {
    kubesg_testkit::require_privileged!();
    let node = Node::start(Startup::Deny, None);
    let _pod = node.registered_pod("a", 11);
    let metrics = node.agent.metrics().expect("metrics");
    let sample = |family: &str| -> Option<i64> {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{family}{{")) && l.contains("pod=\"a\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert_eq!(
        sample("kubesg_agent_conntrack_full_total"),
        Some(0),
        "{metrics}"
    );
    let held = sample("kubesg_agent_conntrack_entries");
    assert!(held.is_some_and(|n| n >= 0), "{metrics}");
}
