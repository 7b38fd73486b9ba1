//! Layered policies (security groups and NetworkPolicies on one pod) through the real eBPF
//! programs (BPF_PROG_TEST_RUN on ifindex 1): a NEW connection needs every layer listed for its
//! direction; a direction with none listed allows everything; the node's own connections to the
//! pod (`ingress_ifindex` 0) skip the NetworkPolicies layer and nothing else; a layered endpoint
//! whose layers entry is missing refuses (fail closed); tracked connections are re-checked on a
//! policy change with the exemption their first packet had; and, on random policies, the
//! datapath agrees with the reference evaluation (`CompiledPolicy::allows`) on every packet.

use std::{cell::RefCell, net::IpAddr};

use kubesg_agent::policy::{CompiledPolicy, Layer, PeerBlock, Protocol, Rule};
use kubesg_common::{
    event::DenyReason,
    policy::{LayersKey, MAX_LAYERS},
    proto, Direction,
};
use kubesg_testkit::{
    family::{Family, PEER_PORT, V4, V6},
    ipv4_and_ipv6,
    loopback::{LoopbackDatapath, ACCEPT, DROP, EGRESS, INGRESS},
    packet::{self, TcpFlags},
    rules::{allow_all, cidr, hosts, icmp, layered, of_layer, port, range, rule, rule_with},
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};

use Layer::{NetworkPolicies as Np, SecurityGroups as Sg};

/// The port the web pod serves.
const WEB: u16 = 80;
/// A port only the security groups allow.
const ADMIN: u16 = 81;

/// A rule of the security groups layer.
fn sg(r: Rule) -> Rule {
    of_layer(Sg, "shop/web ingress[0]", r)
}

/// A rule of the NetworkPolicies layer.
fn np(r: Rule) -> Rule {
    of_layer(Np, "networkpolicy shop/allow-web ingress[0]", r)
}

/// A SYN to the pod's `port` from `from` (source port `sport`).
fn syn_in(f: Family, from: IpAddr, sport: u16, port: u16) -> Vec<u8> {
    packet::tcp(from, f.pod, sport, port, TcpFlags::SYN)
}

/// The pod accepts the handshake of `peer`:PEER_PORT → pod:`port`, its first packet from the
/// node's stack when `from_host`, else forwarded.
fn accept_handshake(dp: &LoopbackDatapath, f: Family, port: u16, from_host: bool) {
    let syn = f.tcp_in(port, TcpFlags::SYN);
    let first = if from_host {
        dp.host_sends(&syn)
    } else {
        dp.pod_receives(&syn)
    };
    assert_eq!(first, ACCEPT, "SYN (from host: {from_host})");
    assert_eq!(
        dp.pod_sends(&f.tcp_in_reply(port, TcpFlags::SYN_ACK)),
        ACCEPT,
        "SYN/ACK"
    );
    let ack = f.tcp_in(port, TcpFlags::ACK);
    let third = if from_host {
        dp.host_sends(&ack)
    } else {
        dp.pod_receives(&ack)
    };
    assert_eq!(third, ACCEPT, "ACK");
}

ipv4_and_ipv6!(
    both_layers_must_allow_a_new_connection,
    a_direction_with_no_layer_listed_allows_everything,
    networkpolicy_default_deny_lets_only_the_host_in,
    the_security_groups_layer_gives_the_host_nothing,
    what_the_pod_sends_is_never_exempt,
    a_layered_endpoint_without_its_layers_entry_refuses,
    recheck_keeps_the_hosts_connection_under_a_networkpolicy_default_deny,
    recheck_cuts_the_hosts_connection_a_security_group_refuses,
    recheck_cuts_a_connection_one_layer_stops_allowing,
);

fn both_layers_must_allow_a_new_connection(f: Family) {
    // Security groups: WEB and ADMIN from anywhere. NetworkPolicies: WEB from the peer only.
    let p = layered(
        vec![
            sg(rule(Protocol::Tcp, vec![port(WEB), port(ADMIN)])),
            np(rule_with(Protocol::Tcp, vec![port(WEB)], hosts(&[f.peer]))),
        ],
        vec![Sg, Np],
        vec![],
        vec![],
    );
    let mut dp = LoopbackDatapath::load(Some(&p));
    let other = f.addr("10.0.1.8", "fd00:1::8");
    assert_eq!(
        dp.pod_receives(&syn_in(f, f.peer, 1000, WEB)),
        ACCEPT,
        "both allow"
    );
    assert_eq!(
        dp.pod_receives(&syn_in(f, f.peer, 1001, ADMIN)),
        DROP,
        "only the security groups allow"
    );
    assert_eq!(
        dp.pod_receives(&syn_in(f, other, 1002, WEB)),
        DROP,
        "the NetworkPolicy does not select this peer"
    );
    let denied = dp.denials();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert!(denied
        .iter()
        .all(|d| d.direction == Direction::Ingress && d.reason == Some(DenyReason::Policy)));
    assert_eq!(dp.counters()[INGRESS].new_connections, 1);
    assert_eq!(dp.conns().len(), 1, "refused connections leave no entry");
    // The same rules unlayered are a union: each of the three is allowed.
    let flat = CompiledPolicy {
        layered: false,
        ingress_layers: vec![],
        ..p.clone()
    };
    dp.replace(&flat);
    for (from, sport, port) in [
        (f.peer, 2000, WEB),
        (f.peer, 2001, ADMIN),
        (other, 2002, WEB),
    ] {
        assert_eq!(
            dp.pod_receives(&syn_in(f, from, sport, port)),
            ACCEPT,
            "{from}:{port}"
        );
    }
}

fn a_direction_with_no_layer_listed_allows_everything(f: Family) {
    // Ingress requires the NetworkPolicies layer; egress lists none, so the pod opens anything,
    // although its only egress rule (of the security groups) allows only port 53.
    let p = layered(
        vec![np(rule(Protocol::Tcp, vec![port(WEB)]))],
        vec![Np],
        vec![sg(rule(Protocol::Udp, vec![port(53)]))],
        vec![],
    );
    let dp = LoopbackDatapath::load(Some(&p));
    assert_eq!(dp.pod_sends(&f.tcp_out(9999, TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_sends(&f.udp_out(1234, b"x")), ACCEPT);
    assert_eq!(dp.pod_sends(&f.echo_out(7)), ACCEPT);
    assert_eq!(dp.counters()[EGRESS].new_connections, 3);
    assert_eq!(dp.pod_receives(&f.tcp_in(WEB, TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_receives(&f.tcp_in(WEB + 1, TcpFlags::SYN)), DROP);
}

fn networkpolicy_default_deny_lets_only_the_host_in(f: Family) {
    // A NetworkPolicy selects the pod for ingress and allows nothing: default deny.
    let p = layered(vec![], vec![Np], vec![], vec![]);
    let mut dp = LoopbackDatapath::load(Some(&p));
    assert_eq!(
        dp.pod_receives(&f.tcp_in(WEB, TcpFlags::SYN)),
        DROP,
        "another pod"
    );
    dp.assert_denied(DenyReason::Policy);
    assert_eq!(
        dp.pod_receives(&f.udp_in(53, b"q")),
        DROP,
        "another pod, UDP"
    );
    accept_handshake(&dp, f, WEB, true);
    let c = dp.conn();
    assert!(
        c.from_host(),
        "the entry remembers the node opened it: {c:?}"
    );
    assert!(c.seen_reply());
    assert_eq!(dp.host_sends(&f.echo_in(9)), ACCEPT, "the node pings it");
}

fn the_security_groups_layer_gives_the_host_nothing(f: Family) {
    // Security groups only, allowing nothing: the node is refused like anyone.
    let p = layered(vec![], vec![Sg], vec![], vec![]);
    let mut dp = LoopbackDatapath::load(Some(&p));
    assert_eq!(dp.host_sends(&f.tcp_in(WEB, TcpFlags::SYN)), DROP);
    dp.assert_denied(DenyReason::Policy);
    // Both layers, the NetworkPolicy allowing nothing and the group WEB: the node reaches WEB
    // (its NetworkPolicies requirement skipped), not ADMIN (the group refuses); a pod neither.
    let p = layered(
        vec![sg(rule(Protocol::Tcp, vec![port(WEB)]))],
        vec![Sg, Np],
        vec![],
        vec![],
    );
    dp.replace(&p);
    assert_eq!(dp.host_sends(&syn_in(f, f.peer, 3000, WEB)), ACCEPT);
    assert_eq!(dp.host_sends(&syn_in(f, f.peer, 3001, ADMIN)), DROP);
    assert_eq!(dp.pod_receives(&syn_in(f, f.peer, 3002, WEB)), DROP);
    // An unlayered policy never looks at where the packet comes from.
    dp.replace(&CompiledPolicy::default());
    assert_eq!(dp.host_sends(&syn_in(f, f.peer, 3003, WEB)), DROP);
}

fn what_the_pod_sends_is_never_exempt(f: Family) {
    // A NetworkPolicy default deny on egress: even a packet whose context says it came from the
    // node's stack is judged (only ingress has a host exemption).
    let p = layered(vec![], vec![], vec![], vec![Np]);
    let mut dp = LoopbackDatapath::load(Some(&p));
    assert_eq!(
        dp.pod_sends_marked_from_host(&f.tcp_out(WEB, TcpFlags::SYN)),
        DROP
    );
    let d = dp.assert_denied(DenyReason::Policy);
    assert_eq!(d.direction, Direction::Egress);
    assert_eq!(dp.pod_sends(&f.tcp_out(WEB, TcpFlags::SYN)), DROP);
    assert!(dp.conns().is_empty());
}

fn a_layered_endpoint_without_its_layers_entry_refuses(f: Family) {
    // Everything allowed by both layers, and no layer required on egress...
    let p = layered(
        vec![
            sg(rule(Protocol::Any, vec![])),
            np(rule(Protocol::Any, vec![])),
        ],
        vec![Sg, Np],
        vec![],
        vec![],
    );
    let mut dp = LoopbackDatapath::load(Some(&p));
    assert_eq!(dp.pod_receives(&syn_in(f, f.peer, 4000, WEB)), ACCEPT);
    assert_eq!(dp.pod_sends(&f.tcp_out(WEB, TcpFlags::SYN)), ACCEPT);
    // ...until the entries are gone: then nothing new is allowed, either way.
    let id = dp.policy().expect("a member").id;
    for dir in [Direction::Egress, Direction::Ingress] {
        dp.datapath
            .maps_mut()
            .layers
            .remove(&LayersKey::new(id, dir as u8))
            .expect("deleting the layers entry");
    }
    assert_eq!(
        dp.pod_receives(&syn_in(f, f.peer, 4001, WEB)),
        DROP,
        "fail closed"
    );
    assert_eq!(
        dp.host_sends(&syn_in(f, f.peer, 4002, WEB)),
        DROP,
        "also the host"
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(WEB + 1, TcpFlags::SYN)), DROP);
    // An unlayered policy's endpoint never reads them.
    dp.replace(&allow_all());
    assert_eq!(dp.pod_receives(&syn_in(f, f.peer, 4003, WEB)), ACCEPT);
}

fn recheck_keeps_the_hosts_connection_under_a_networkpolicy_default_deny(f: Family) {
    // Connections opened under an unlayered allow-all policy: one by the node (a kubelet probe's),
    // one forwarded from another pod; then a NetworkPolicy default deny selects the pod.
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    accept_handshake(&dp, f, WEB, true);
    accept_handshake(&dp, f, ADMIN, false);
    assert_eq!(dp.conns().iter().filter(|c| c.from_host()).count(), 1);
    dp.replace(&layered(vec![], vec![Np], vec![], vec![]));
    assert_eq!(
        dp.host_sends(&f.tcp_in(WEB, TcpFlags::PSH_ACK)),
        ACCEPT,
        "the node's connection lives on"
    );
    assert_eq!(
        dp.pod_sends(&f.tcp_in_reply(WEB, TcpFlags::PSH_ACK)),
        ACCEPT,
        "and its replies"
    );
    assert_eq!(
        dp.pod_receives(&f.tcp_in(ADMIN, TcpFlags::PSH_ACK)),
        DROP,
        "the pod's connection is cut"
    );
    dp.assert_denied(DenyReason::PolicyChanged);
    let left = dp.conns();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].original().dport, WEB);
}

fn recheck_cuts_the_hosts_connection_a_security_group_refuses(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    accept_handshake(&dp, f, WEB, true);
    // Security groups allowing nothing, NetworkPolicies everything: the node has no exemption.
    dp.replace(&layered(
        vec![np(rule(Protocol::Any, vec![]))],
        vec![Sg, Np],
        vec![],
        vec![],
    ));
    assert_eq!(dp.pod_sends(&f.tcp_in_reply(WEB, TcpFlags::PSH_ACK)), DROP);
    dp.assert_denied(DenyReason::PolicyChanged);
    assert!(dp.conns().is_empty());
}

fn recheck_cuts_a_connection_one_layer_stops_allowing(f: Family) {
    let both = |np_port: u16| {
        layered(
            vec![
                sg(rule(Protocol::Tcp, vec![port(WEB)])),
                np(rule_with(
                    Protocol::Tcp,
                    vec![port(np_port)],
                    hosts(&[f.peer]),
                )),
            ],
            vec![Sg, Np],
            vec![],
            vec![],
        )
    };
    let mut dp = LoopbackDatapath::load(Some(&both(WEB)));
    accept_handshake(&dp, f, WEB, false);
    // The NetworkPolicy now allows another port: the group alone no longer suffices.
    dp.replace(&both(ADMIN));
    assert_eq!(dp.pod_receives(&f.tcp_in(WEB, TcpFlags::PSH_ACK)), DROP);
    dp.assert_denied(DenyReason::PolicyChanged);
    assert!(dp.conns().is_empty());
    // With re-check off, a tracked connection outlives the change, layered or not.
    dp.set_recheck(false);
    dp.replace(&both(WEB));
    accept_handshake(&dp, f, WEB, false);
    dp.replace(&both(ADMIN));
    assert_eq!(dp.pod_receives(&f.tcp_in(WEB, TcpFlags::PSH_ACK)), ACCEPT);
}

#[test]
fn a_layered_policy_with_a_layer_twice_is_not_installed() {
    kubesg_testkit::require_privileged!();
    let mut dp = LoopbackDatapath::load(None);
    let p = layered(vec![], vec![Np, Np], vec![], vec![]);
    assert!(dp.datapath.install_policy(&p).is_err());
    let p = layered(vec![], vec![Sg, Np, Sg], vec![], vec![]);
    assert!(dp.datapath.install_policy(&p).is_err());
    assert_eq!(MAX_LAYERS, 2);
    assert!(
        dp.datapath.maps().layers.keys().next().is_none(),
        "nothing left behind"
    );
}

// --- The datapath against the reference on random layered policies -----------------------------

/// Remote addresses of both families: the peer, its neighbour, another subnet, far away.
const REMOTES: [&str; 8] = [
    "10.0.1.7",
    "10.0.1.8",
    "10.0.2.1",
    "192.168.1.1",
    "fd00:1::7",
    "fd00:1::8",
    "fd00:2::1",
    "2001:db8::1",
];

fn arb_block() -> impl Strategy<Value = PeerBlock> {
    prop::sample::select(vec![
        cidr("10.0.1.7/32"),
        cidr("10.0.1.0/24"),
        PeerBlock {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.0.2.0/24".parse().unwrap()],
        },
        cidr("0.0.0.0/0"),
        cidr("fd00:1::7/128"),
        cidr("fd00:1::/64"),
        PeerBlock {
            cidr: "fd00::/16".parse().unwrap(),
            except: vec!["fd00:2::/64".parse().unwrap()],
        },
        cidr("::/0"),
    ])
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    let ports = prop::sample::select(vec![
        vec![],
        vec![port(53)],
        vec![port(80)],
        vec![range(80, 443)],
        vec![port(53), range(8000, 8100)],
    ]);
    let proto = prop::sample::select(vec![
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Icmp,
        Protocol::Icmpv6,
        Protocol::Any,
    ]);
    let layer = prop::sample::select(vec![Sg, Np]);
    (
        proto,
        ports,
        prop::collection::vec(arb_block(), 0..3),
        layer,
        any::<bool>(),
    )
        .prop_map(|(protocol, ports, peers, layer, echo_only)| {
            let ports = match protocol {
                Protocol::Tcp | Protocol::Udp => ports,
                Protocol::Icmp if echo_only => vec![icmp(8, None)],
                Protocol::Icmpv6 if echo_only => vec![icmp(128, Some(0))],
                _ => vec![],
            };
            of_layer(layer, "random", rule_with(protocol, ports, peers))
        })
}

fn arb_layers() -> impl Strategy<Value = Vec<Layer>> {
    prop::sample::select(vec![vec![], vec![Sg], vec![Np], vec![Sg, Np], vec![Np, Sg]])
}

fn arb_policy() -> impl Strategy<Value = CompiledPolicy> {
    (
        prop::collection::vec(arb_rule(), 0..5),
        prop::collection::vec(arb_rule(), 0..5),
        prop::bool::weighted(0.75),
        arb_layers(),
        arb_layers(),
    )
        .prop_map(|(ingress, egress, is_layered, il, el)| {
            if is_layered {
                layered(ingress, il, egress, el)
            } else {
                CompiledPolicy {
                    ingress,
                    egress,
                    ..CompiledPolicy::default()
                }
            }
        })
}

/// A NEW connection to try: direction, protocol, port, remote, whether the node's stack sent it.
#[derive(Clone, Debug)]
struct Query {
    dir: Direction,
    proto: u8,
    port: u16,
    remote: IpAddr,
    from_host: bool,
}

fn arb_query() -> impl Strategy<Value = Query> {
    (
        any::<bool>(),
        prop::sample::select(vec![proto::TCP, proto::UDP, 0]),
        prop::sample::select(vec![53u16, 80, 81, 443, 444, 8050, 9000]),
        prop::sample::select(REMOTES.to_vec()),
        any::<bool>(),
    )
        .prop_map(|(ingress, p, port, remote, from_host)| {
            let remote: IpAddr = remote.parse().unwrap();
            let (proto, port) = match p {
                0 if remote.is_ipv6() => (proto::ICMPV6, 128 << 8),
                0 => (proto::ICMP, 8 << 8),
                p => (p, port),
            };
            Query {
                dir: if ingress {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                proto,
                port,
                remote,
                from_host,
            }
        })
}

/// The first packet of `q`'s connection, with a fresh source port (or echo identifier) `id` so
/// that it always opens a new one; runs it through the program of its direction.
fn run_query(dp: &LoopbackDatapath, q: &Query, id: u16) -> i32 {
    let pod = if q.remote.is_ipv6() { V6.pod } else { V4.pod };
    let (src, dst) = match q.dir {
        Direction::Ingress => (q.remote, pod),
        Direction::Egress => (pod, q.remote),
    };
    let frame = match q.proto {
        proto::TCP => packet::tcp(src, dst, id, q.port, TcpFlags::SYN),
        proto::UDP => packet::udp(src, dst, id, q.port, b"q"),
        _ => packet::icmp_echo_request(src, dst, id, 1),
    };
    match (q.dir, q.from_host) {
        (Direction::Ingress, true) => dp.host_sends(&frame),
        (Direction::Ingress, false) => dp.pod_receives(&frame),
        (Direction::Egress, true) => dp.pod_sends_marked_from_host(&frame),
        (Direction::Egress, false) => dp.pod_sends(&frame),
    }
}

#[test]
fn the_datapath_agrees_with_the_reference_on_random_layered_policies() {
    kubesg_testkit::require_privileged!();
    let dp = RefCell::new(LoopbackDatapath::load(Some(&allow_all())));
    let next_id = RefCell::new(PEER_PORT);
    let mut runner = TestRunner::new(Config {
        cases: 150,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (arb_policy(), prop::collection::vec(arb_query(), 24));
    let result = runner.run(&strategy, |(policy, queries)| {
        let mut dp = dp.borrow_mut();
        dp.replace(&policy);
        for q in &queries {
            let id = {
                let mut n = next_id.borrow_mut();
                *n = if *n >= 65_000 { 1024 } else { *n + 1 };
                *n
            };
            let want = policy.allows(q.dir, q.proto, q.port, q.remote, q.from_host);
            let got = run_query(&dp, q, id);
            if got != if want { ACCEPT } else { DROP } {
                return Err(TestCaseError::fail(format!(
                    "{q:?}: datapath {}, reference {}",
                    if got == ACCEPT { "accepts" } else { "drops" },
                    if want { "allows" } else { "refuses" },
                )));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn icmp_matches_are_the_references_in_layered_policies() {
    // The generator's ICMP echo rules written out once, so a reader sees what they match.
    kubesg_testkit::require_privileged!();
    let p = layered(
        vec![
            of_layer(Sg, "sg", rule(Protocol::Icmp, vec![icmp(8, None)])),
            of_layer(Np, "np", rule(Protocol::Icmp, vec![])),
        ],
        vec![Sg, Np],
        vec![],
        vec![],
    );
    let dp = LoopbackDatapath::load(Some(&p));
    assert_eq!(dp.pod_receives(&V4.echo_in(11)), ACCEPT);
    assert!(p.allows(Direction::Ingress, proto::ICMP, 8 << 8, V4.peer, false));
}
