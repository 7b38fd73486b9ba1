//! The real chain as a container runtime runs it: Debian's `loopback`, then `bridge` with
//! `host-local` IPAM (dual-stack) and `kubesg-cni` after it, on network namespaces standing in for
//! a node and its pods; the agent as a real process; rules pushed by a test gRPC server playing
//! the operator over mTLS; real traffic between the pods.

mod common;

use std::{collections::BTreeSet, io, os::unix::fs::PermissionsExt as _};

use common::{
    any, anywhere, hosts, link_local, policy, snapshot, tcp, udp, Cluster, ARRIVES, NAMESPACE,
};
use kubesg_testkit::{agent::Startup, cni::CniPod, netns::RecvWithin};
use serde_json::json;

/// The client's rules: it may open TCP 8080 and 9090 and UDP 5353 to the server, nothing else,
/// and accepts nothing. The server's: it accepts TCP 8080 and UDP 5353 from the client only, TCP
/// 7070 from anyone, and may open anything. The third pod is in no group.
fn rules(client: &CniPod, server: &CniPod, other: &CniPod) -> kubesg_proto::v1alpha1::PolicyUpdate {
    snapshot(
        1,
        vec![
            policy(
                "cli",
                vec![],
                vec![
                    tcp(&[8080, 9090], hosts(&[server])),
                    udp(&[5353], hosts(&[server])),
                ],
            ),
            policy(
                "srv",
                vec![
                    tcp(&[8080], hosts(&[client])),
                    tcp(&[7070], anywhere()),
                    udp(&[5353], hosts(&[client])),
                ],
                vec![any(anywhere())],
            ),
        ],
        &[(client, Some("cli")), (server, Some("srv")), (other, None)],
    )
}

#[test]
fn pods_added_through_the_real_chain_are_enforced_by_the_rules_the_operator_pushes() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    let client = cluster.add_pod("client", 5);
    let server = cluster.add_pod("server", 7);
    let other = cluster.add_pod("other", 9);

    // The chain's result is the bridge plugin's, passed on by kubesg-cni, dual-stack.
    let result = cluster
        .node
        .runtime
        .cached_result(&cluster.network, &client.attachment)
        .expect("cached result");
    assert_eq!(result["cniVersion"], "1.0.0", "{result}");
    let addresses: BTreeSet<&str> = result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .collect();
    assert_eq!(
        addresses,
        BTreeSet::from(["10.77.0.5/24", "fd77::5/64"]),
        "{result}"
    );

    // The agent registered the three pods with their identity, host veth and addresses.
    let endpoints = cluster.agent.list_endpoints().expect("ListEndpoints");
    assert_eq!(endpoints.len(), 3, "{endpoints:?}");
    for pod in [&client, &server, &other] {
        let ep = endpoints
            .iter()
            .find(|e| {
                e.key
                    .as_ref()
                    .is_some_and(|k| k.container_id == pod.container_id())
            })
            .unwrap_or_else(|| panic!("{} not registered: {endpoints:?}", pod.name));
        assert_eq!(ep.pod.as_ref(), Some(&pod.pod_ref()));
        assert_eq!(ep.host_ifindex, cluster.host_ifindex(pod));
        assert_eq!(ep.netns, pod.attachment.netns.display().to_string());
        let ips: BTreeSet<String> = ep.ips.iter().cloned().collect();
        // Its CNI result's addresses, and its link-local one (never in a CNI result).
        let want: BTreeSet<String> = [
            format!("{}/24", pod.ipv4),
            format!("{}/64", pod.ipv6),
            format!("{}/64", link_local(&pod.ns)),
        ]
        .into();
        assert_eq!(ips, want);
    }

    cluster.push(rules(&client, &server, &other));

    for v6 in [false, true] {
        // Allowed, with its return traffic.
        cluster.assert_opens(&client, &server, v6, 8080);
        // The third pod is in no group: it opens and accepts anything.
        cluster.assert_opens(&other, &server, v6, 7070);
        cluster.assert_opens(&server, &other, v6, 7000);
    }
    // Refused: by the server's ingress rules (wrong port, wrong peer) and by the client's
    // egress rules; each probe waits for a SYN that is never answered, so they run together.
    std::thread::scope(|s| {
        for v6 in [false, true] {
            let c = &cluster;
            let (client, server, other) = (&client, &server, &other);
            s.spawn(move || c.assert_dropped(client, server, v6, 9090));
            s.spawn(move || c.assert_dropped(other, server, v6, 8080));
            s.spawn(move || c.assert_dropped(client, other, v6, 7000));
        }
    });
    let server_in = cluster
        .agent
        .counters(cluster.host_ifindex(&server))
        .expect("counters");
    let client_out = cluster
        .agent
        .counters(cluster.host_ifindex(&client))
        .expect("counters");
    assert!(
        server_in.is_some_and(|c| c[1].dropped_policy >= 4),
        "the server dropped by policy: {server_in:?}"
    );
    assert!(
        client_out.is_some_and(|c| c[0].dropped_policy >= 2),
        "the client dropped by policy: {client_out:?}"
    );

    // A UDP datagram to a closed port: the server's port-unreachable comes back to the client,
    // although its rules allow no ICMP in: RELATED to the datagram it sent.
    let client_ifindex = cluster.host_ifindex(&client);
    for v6 in [false, true] {
        let related_before = cluster
            .agent
            .counters(client_ifindex)
            .expect("counters")
            .map_or(0, |c| c[1].related);
        let sock = client.udp_bind(v6, 0, ARRIVES).expect("client socket");
        sock.connect(server.sockaddr(v6, 5353)).expect("connect");
        sock.send(b"anyone?").expect("send");
        let mut buf = [0u8; 16];
        let err = sock
            .recv_within(&mut buf)
            .expect_err("nothing listens on 5353");
        assert_eq!(
            err.kind(),
            io::ErrorKind::ConnectionRefused,
            "v6={v6}: {err}\n{}",
            cluster.dump()
        );
        let related_after = cluster
            .agent
            .counters(client_ifindex)
            .expect("counters")
            .map_or(0, |c| c[1].related);
        assert!(
            related_after > related_before,
            "the ICMP error was let in as RELATED ({related_before} -> {related_after})"
        );
    }

    // What a person on the node sees.
    let table = cluster.agent.cli_ok(&["endpoints"]).expect("endpoints");
    for (pod, policy) in [(&client, "cli"), (&server, "srv"), (&other, "(none)")] {
        let line = table
            .lines()
            .find(|l| l.contains(&format!("{NAMESPACE}/{} ", pod.name)))
            .unwrap_or_else(|| panic!("no line for {}:\n{table}", pod.name));
        assert!(
            line.contains(&format!("{},{}", pod.ipv4, pod.ipv6)),
            "{line}"
        );
        assert!(line.split_whitespace().any(|w| w == policy), "{line}");
    }
    assert!(table.contains("applied version: 1"), "{table}");
    let explain = |port: &str| {
        cluster
            .agent
            .cli_ok(&[
                "explain",
                "--from",
                "10.77.0.5",
                "--to",
                "10.77.0.7",
                "--proto",
                "tcp",
                "--dport",
                port,
            ])
            .expect("explain")
    };
    let allowed = explain("8080");
    assert!(allowed.contains("ALLOWED"), "{allowed}");
    assert!(!allowed.contains("REFUSED"), "{allowed}");
    assert!(
        allowed.contains("shop/client") && allowed.contains("shop/server"),
        "both ends are judged: {allowed}"
    );
    let refused = explain("9090");
    assert!(refused.contains("REFUSED"), "{refused}");
    assert!(
        refused.contains("srv"),
        "the refusing policy is named: {refused}"
    );
}

#[test]
fn check_del_gc_status_and_version_through_the_real_chain() {
    kubesg_testkit::require_privileged!();
    let mut cluster = Cluster::start(Startup::Deny, |_, _| {});
    let runtime = &cluster.node.runtime;
    let net = &cluster.network;
    let a = cluster.add_pod("a", 11);
    let b = cluster.add_pod("b", 12);

    // CHECK of an enforced pod passes every plugin.
    runtime
        .check(net, &a.attachment)
        .unwrap_or_else(|e| panic!("CHECK: {e}\n{}", cluster.dump()));

    // The agent loses the pod (kubesg-cni's DEL alone): CHECK now fails at kubesg-cni with 100,
    // after the bridge plugin's own check passed.
    runtime
        .run_one(net, "kubesg-cni", "DEL", &a.attachment)
        .expect("kubesg-cni DEL");
    let err = runtime
        .check(net, &a.attachment)
        .expect_err("CHECK of a lost pod");
    assert_eq!(
        (err.plugin.as_str(), err.code),
        ("kubesg-cni", 100),
        "{err}"
    );
    assert_ne!(err.exit_code, 0);

    // DEL of the whole chain: nothing of the pod is left in the agent; DEL again succeeds.
    let b_ifindex = cluster.host_ifindex(&b);
    assert!(!cluster
        .agent
        .pinned_links(b_ifindex)
        .expect("links")
        .is_empty());
    cluster.node.del(net, &b).expect("DEL");
    assert!(!cluster
        .agent
        .knows_container(b.container_id())
        .expect("list"));
    assert!(cluster
        .agent
        .record_files(b.container_id())
        .expect("records")
        .is_empty());
    assert!(!cluster
        .agent
        .datapath_has_endpoint(b_ifindex)
        .expect("maps"));
    assert!(cluster
        .agent
        .pinned_links(b_ifindex)
        .expect("links")
        .is_empty());
    cluster.node.del(net, &b).expect("second DEL");
    cluster
        .node
        .del(net, &a)
        .expect("DEL of the half-deleted pod");

    // GC with the attachments the runtime still has removes the stale one only.
    let keep = cluster.add_pod("keep", 13);
    let stale = cluster.add_pod("stale", 14);
    let stale_ifindex = cluster.host_ifindex(&stale);
    runtime.gc(net, &[&keep.attachment]).expect("GC");
    assert!(cluster
        .agent
        .knows_container(keep.container_id())
        .expect("list"));
    assert!(!cluster
        .agent
        .knows_container(stale.container_id())
        .expect("list"));
    assert!(cluster
        .agent
        .record_files(stale.container_id())
        .expect("records")
        .is_empty());
    assert!(!cluster
        .agent
        .datapath_has_endpoint(stale_ifindex)
        .expect("maps"));
    assert!(cluster
        .agent
        .pinned_links(stale_ifindex)
        .expect("links")
        .is_empty());

    // STATUS: ok while the agent serves, 50 when it is stopped (socket gone) or crashed (socket
    // left behind, nobody answers).
    runtime.status(net).expect("STATUS with the agent up");
    let agent_down = |how: &str| {
        let err = runtime.status(net).expect_err("STATUS with the agent down");
        assert_eq!(
            (err.plugin.as_str(), err.code),
            ("kubesg-cni", 50),
            "{how}: {err}"
        );
    };
    let agent = &mut cluster.agent;
    agent.stop().expect("stopping the agent");
    agent_down("stopped");
    agent.start_again().expect("starting the agent");
    runtime.status(net).expect("STATUS with the agent back");
    agent.kill().expect("killing the agent");
    assert!(agent.socket().exists(), "a crash leaves the socket behind");
    agent_down("killed");

    // VERSION: kubesg-cni speaks 0.3.0 to 1.1.0; the bridge plugin stops at 1.0.0.
    let kubesg = runtime
        .version(net, net.index_of("kubesg-cni").expect("kubesg-cni"))
        .expect("VERSION");
    assert_eq!(
        kubesg["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let bridge = runtime.version(net, 0).expect("VERSION");
    let bridge_versions = bridge["supportedVersions"].as_array().expect("versions");
    assert!(bridge_versions.contains(&json!("1.0.0")), "{bridge}");
    assert!(!bridge_versions.contains(&json!("1.1.0")), "{bridge}");
}

#[test]
fn the_agent_socket_is_root_only_and_ct_flush_forgets_one_endpoints_connections_or_all() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    // Only root may register or delete endpoints.
    let socket = cluster.agent.socket();
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    assert_eq!(mode(&socket), 0o600, "{}", socket.display());
    assert_eq!(mode(socket.parent().expect("its directory")), 0o700);

    let client = cluster.add_pod("flush-c", 21);
    let server = cluster.add_pod("flush-s", 22);
    cluster.push(snapshot(
        1,
        vec![
            policy("cli", vec![], vec![tcp(&[8080], hosts(&[&server]))]),
            policy("srv", vec![tcp(&[8080], hosts(&[&client]))], vec![]),
        ],
        &[(&client, Some("cli")), (&server, Some("srv"))],
    ));
    let (client_if, server_if) = (cluster.host_ifindex(&client), cluster.host_ifindex(&server));
    let (mut c, mut s) = cluster.assert_opens(&client, &server, false, 8080);
    let (mut c6, mut s6) = cluster.assert_opens(&client, &server, true, 8080);
    let tracked = |ifindex: u32| {
        let table = cluster
            .agent
            .cli_ok(&["ct", "list", "--ifindex", &ifindex.to_string()])
            .expect("ct list");
        table.lines().filter(|l| l.contains("dport=8080")).count()
    };
    assert_eq!((tracked(client_if), tracked(server_if)), (2, 2));

    // One endpoint: the client's entries go, the server's stay.
    let out = cluster
        .agent
        .cli_ok(&["ct", "flush", "--ifindex", &client_if.to_string()])
        .expect("ct flush --ifindex");
    assert!(out.contains("2 connection(s) deleted"), "{out}");
    assert_eq!((tracked(client_if), tracked(server_if)), (0, 2));
    // The client is a member: its next segment belongs to no tracked connection (INVALID), as
    // after `conntrack -F` with nf_conntrack_tcp_loose=0.
    assert!(
        !common::data_gets_through(&mut c, &mut s),
        "the flushed connection still carries data\n{}",
        cluster.dump()
    );
    // New connections are judged by the rules again.
    drop((c, s));
    let _fresh = cluster.assert_opens(&client, &server, false, 8080);

    // All of them.
    let out = cluster.agent.cli_ok(&["ct", "flush"]).expect("ct flush");
    assert!(!out.starts_with("0 "), "{out}");
    let table = cluster.agent.cli_ok(&["ct", "list"]).expect("ct list");
    assert!(table.trim().is_empty(), "{table}");
    assert!(!common::data_gets_through(&mut c6, &mut s6));
    drop((c6, s6));
}

#[test]
fn the_chain_at_each_older_cni_version_registers_the_pod_and_returns_that_versions_result() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    // 1.1.0 is left out: Debian's bridge plugin stops at 1.0.0 (kubesg-cni's conversion to it
    // is unit-tested).
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"].into_iter().enumerate() {
        let mut network = cluster.network.clone();
        network.cni_version = version.into();
        let pod = cluster.pod(&format!("v{i}"), 30 + i as u8);
        let result = cluster
            .node
            .add(&network, &pod)
            .unwrap_or_else(|e| panic!("ADD at {version}: {e}\n{}", cluster.dump()));
        assert_eq!(result["cniVersion"], version, "{result}");
        let ips = result["ips"].as_array().expect("ips");
        assert_eq!(ips.len(), 2, "{result}");
        for ip in ips {
            let address = ip["address"].as_str().expect("address");
            let family = if address.contains(':') { "6" } else { "4" };
            if version.starts_with("0.") {
                assert_eq!(ip["version"], family, "{version}: {ip}");
            } else {
                assert!(ip.get("version").is_none(), "{version}: {ip}");
            }
        }
        assert!(
            cluster
                .agent
                .knows_container(pod.container_id())
                .expect("ListEndpoints"),
            "ADD at {version} registered nothing\n{}",
            cluster.dump()
        );
        if version != "0.3.0" && version != "0.3.1" {
            cluster
                .node
                .runtime
                .check(&network, &pod.attachment)
                .unwrap_or_else(|e| panic!("CHECK at {version}: {e}"));
        }
        cluster
            .node
            .del(&network, &pod)
            .unwrap_or_else(|e| panic!("DEL at {version}: {e}"));
        assert!(!cluster
            .agent
            .knows_container(pod.container_id())
            .expect("ListEndpoints"));
    }
}
