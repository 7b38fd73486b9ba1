//! What traffic passes between a pod's CNI ADD and the arrival of its rules, for each value of
//! the agent's `--startup-policy`: pods are added through the real chain before the test
//! operator has said anything about them, then their rules are pushed.

mod common;

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use common::{data_gets_through, hosts, policy, snapshot, tcp, Cluster, NAMESPACE, NEVER};
use kubesg_proto::v1alpha1 as pb;
use kubesg_testkit::{agent::Startup, cni::CniPod};

/// The rules every test pushes: the client may open TCP 8080 to the server, which accepts it
/// from the client; nothing else.
fn rules(version: u64, client: &CniPod, server: &CniPod) -> pb::PolicyUpdate {
    snapshot(
        version,
        vec![
            policy("cli", vec![], vec![tcp(&[8080], hosts(&[server]))]),
            policy("srv", vec![tcp(&[8080], hosts(&[client]))], vec![]),
        ],
        &[(client, Some("cli")), (server, Some("srv"))],
    )
}

/// Asserts that the endpoints table shows `pod` pending (its rules have not arrived).
#[track_caller]
fn assert_pending(cluster: &Cluster, pod: &CniPod) {
    let table = cluster.agent.cli_ok(&["endpoints"]).expect("endpoints");
    let line = table
        .lines()
        .find(|l| l.contains(&format!("/{} ", pod.name)))
        .unwrap_or_else(|| panic!("no line for {}:\n{table}", pod.name));
    assert!(line.contains("(pending)"), "{line}");
}

#[test]
fn deny_lets_nothing_through_until_the_rules_arrive_then_exactly_what_they_allow() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    let client = cluster.add_pod("client", 31);
    let server = cluster.add_pod("server", 32);
    assert_pending(&cluster, &client);
    assert_pending(&cluster, &server);

    std::thread::scope(|s| {
        let (c, client, server) = (&cluster, &client, &server);
        for v6 in [false, true] {
            s.spawn(move || c.assert_dropped(client, server, v6, 8080));
            s.spawn(move || c.assert_dropped(server, client, v6, 8080));
            s.spawn(move || {
                assert!(
                    !client.ns.ping(server.addr(v6), None, NEVER).expect("ping"),
                    "ping v6={v6} passed before the rules"
                )
            });
        }
    });

    cluster.push(rules(1, &client, &server));
    for v6 in [false, true] {
        cluster.assert_opens(&client, &server, v6, 8080);
    }
    std::thread::scope(|s| {
        let (c, client, server) = (&cluster, &client, &server);
        for v6 in [false, true] {
            s.spawn(move || c.assert_dropped(client, server, v6, 9090));
            s.spawn(move || c.assert_dropped(server, client, v6, 8080));
        }
    });
}

#[test]
fn allow_lets_everything_through_until_the_rules_arrive_then_cuts_what_they_refuse() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Allow);
    let client = cluster.add_pod("client", 33);
    let server = cluster.add_pod("server", 34);
    assert_pending(&cluster, &client);

    // The window: anything opens, both ways.
    let (mut kept_c, mut kept_s) = cluster.assert_opens(&client, &server, false, 8080);
    let (mut cut_c, mut cut_s) = cluster.assert_opens(&client, &server, false, 9090);
    let (mut back_s, mut back_c) = cluster.assert_opens(&server, &client, true, 7000);
    assert!(client
        .ns
        .ping(server.addr(true), None, NEVER)
        .expect("ping"));

    // The rules arrive (re-check is the default): what they allow lives on, the rest is cut.
    cluster.push(rules(1, &client, &server));
    assert!(
        data_gets_through(&mut kept_c, &mut kept_s) && data_gets_through(&mut kept_s, &mut kept_c),
        "the allowed connection carries data both ways\n{}",
        cluster.dump()
    );
    assert!(
        !data_gets_through(&mut cut_c, &mut cut_s),
        "the client's connection to 9090 is cut\n{}",
        cluster.dump()
    );
    assert!(
        !data_gets_through(&mut back_s, &mut back_c),
        "the server's connection to the client is cut\n{}",
        cluster.dump()
    );
    let client_out = cluster
        .agent
        .counters(cluster.host_ifindex(&client))
        .expect("counters")
        .expect("client endpoint");
    assert!(client_out[0].dropped_policy >= 1, "{client_out:?}");
    // New connections follow the rules.
    cluster.assert_opens(&client, &server, true, 8080);
    std::thread::scope(|s| {
        let (c, client, server) = (&cluster, &client, &server);
        s.spawn(move || c.assert_dropped(client, server, false, 9090));
        s.spawn(move || c.assert_dropped(server, client, true, 7000));
    });
}

#[test]
fn wait_holds_the_add_until_the_pods_rules_arrive() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::start(Startup::Wait, |_, c| {
        c.wait_timeout = Some(Duration::from_secs(30));
    });
    cluster.hello();
    let server = cluster.pod("server", 36);
    let client = cluster.pod("client", 35);
    // The server's rules are there before its ADD: it returns at once.
    cluster.push(snapshot(
        1,
        vec![policy("srv", vec![tcp(&[8080], hosts(&[&client]))], vec![])],
        &[(&server, Some("srv"))],
    ));
    cluster.try_add(&server).expect("ADD of the server");

    let events: Mutex<Vec<&str>> = Mutex::new(Vec::new());
    let log = |e| events.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    std::thread::scope(|s| {
        let add = s.spawn(|| {
            let r = cluster.try_add(&client);
            log("ADD returned");
            r
        });
        // Wait until the ADD is inside the agent: the endpoint is registered, pending.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cluster
            .agent
            .knows_container(client.container_id())
            .expect("list")
        {
            assert!(
                !add.is_finished() && Instant::now() < deadline,
                "the client's ADD never reached the agent\n{}",
                cluster.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Meanwhile nothing passes (the runtime has not started the pod, but its interface is
        // up and enforced).
        cluster.assert_dropped(&client, &server, false, 8080);
        assert!(
            !add.is_finished(),
            "the ADD returned before the rules arrived"
        );

        log("rules pushed");
        cluster.push(rules(2, &client, &server));
        let result = add.join().expect("the ADD thread");
        if let Err(e) = result {
            panic!("the ADD failed: {e}\n{}", cluster.dump());
        }
    });
    assert_eq!(
        *events.lock().unwrap_or_else(|p| p.into_inner()),
        ["rules pushed", "ADD returned"]
    );
    cluster.assert_opens(&client, &server, false, 8080);
}

#[test]
fn wait_without_rules_fails_the_add_with_code_11_at_the_timeout_and_leaves_nothing() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::start(Startup::Wait, |_, c| {
        c.wait_timeout = Some(Duration::from_secs(2));
    });
    cluster.hello();
    let pod = cluster.pod("orphan", 37);
    let err = cluster.try_add(&pod).expect_err("no rules ever come");
    assert_eq!((err.plugin.as_str(), err.code), ("kubesg-cni", 11), "{err}");
    assert!(err.details.contains("did not arrive"), "{err}");

    // The bridge plugin's veth is there; the agent has nothing of it.
    let out = pod.ns.ip(&["-j", "link", "show", "eth0"]).expect("ip link");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let ifindex = links[0]["link_index"].as_u64().expect("peer index") as u32;
    assert!(!cluster
        .agent
        .knows_container(pod.container_id())
        .expect("list"));
    assert!(cluster
        .agent
        .record_files(pod.container_id())
        .expect("records")
        .is_empty());
    assert!(!cluster.agent.datapath_has_endpoint(ifindex).expect("maps"));
    assert!(cluster
        .agent
        .pinned_links(ifindex)
        .expect("links")
        .is_empty());
}

/// The operator's own pods (`--startup-exempt`, set by the chart) get `allow` under `deny`:
/// their rules can only come from a running operator, so denying them would keep the cluster
/// without one for ever. Other pods of the node still get `deny`, and once the exempt pod's
/// rules arrive they judge it like any other.
#[test]
fn an_exempt_pod_gets_allow_under_deny_while_the_others_get_deny() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::start(Startup::Deny, |_, c| {
        c.extra_args
            .push(format!("--startup-exempt={NAMESPACE}/operator-"));
    });
    cluster.hello();
    let operator = cluster.add_pod("operator-7d9f8-x2v4q", 38);
    let other = cluster.add_pod("other", 39);
    let peer = cluster.add_pod("peer", 40);
    // Only the peer is classified (a member of no group): the other two are pending.
    cluster.push(snapshot(1, vec![], &[(&peer, None)]));
    assert_pending(&cluster, &operator);
    assert_pending(&cluster, &other);

    let (mut op_c, mut op_s) = cluster.assert_opens(&operator, &peer, false, 9090);
    cluster.assert_opens(&peer, &operator, true, 7000);
    std::thread::scope(|s| {
        let (c, other, peer) = (&cluster, &other, &peer);
        for v6 in [false, true] {
            s.spawn(move || c.assert_dropped(other, peer, v6, 9090));
            s.spawn(move || c.assert_dropped(peer, other, v6, 7000));
        }
    });

    // Its rules arrive: the operator may open 8080 only; its connection to 9090 is cut.
    cluster.push(snapshot(
        2,
        vec![policy("op", vec![], vec![tcp(&[8080], hosts(&[&peer]))])],
        &[(&peer, None), (&operator, Some("op"))],
    ));
    assert!(
        !data_gets_through(&mut op_c, &mut op_s),
        "the exempt pod's connection to 9090 is cut by its rules\n{}",
        cluster.dump()
    );
    cluster.assert_opens(&operator, &peer, false, 8080);
    cluster.assert_dropped(&operator, &peer, true, 9090);
}

/// Under `wait` an exempt pod's ADD returns at once, before any rules (a pod that is not
/// exempt fails after the timeout: `wait_without_rules_fails_the_add…`).
#[test]
fn wait_does_not_hold_the_add_of_an_exempt_pod() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::start(Startup::Wait, |_, c| {
        c.wait_timeout = Some(Duration::from_secs(2));
        c.extra_args
            .push(format!("--startup-exempt={NAMESPACE}/operator-"));
    });
    cluster.hello();
    let operator = cluster.pod("operator-7d9f8-x2v4q", 41);
    if let Err(e) = cluster.try_add(&operator) {
        panic!("the exempt pod's ADD failed: {e}\n{}", cluster.dump());
    }
    assert_pending(&cluster, &operator);
    let peer = cluster.pod("peer", 42);
    cluster.push(snapshot(1, vec![], &[(&peer, None)]));
    cluster.try_add(&peer).expect("ADD of the classified peer");
    cluster.assert_opens(&operator, &peer, false, 9090);
}

/// A malformed `--startup-exempt` stops the agent before it serves, naming the value.
#[test]
fn a_malformed_startup_exemption_is_refused_at_start() {
    let out =
        std::process::Command::new(&kubesg_testkit::agent::binaries().expect("binaries").agent)
            .args(["run", "--node-name=n", "--startup-exempt=kube-system/"])
            .output()
            .expect("running kubesg-agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kube-system/") && err.contains("the name prefix is empty"),
        "{err}"
    );
}
