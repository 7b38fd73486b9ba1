//! Policy verdicts through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): which NEW
//! connections a member's rules allow (protocol, port, port range, ICMP type/code, CIDR with
//! except, Any, address family), stateless policies, non-members, and what happens to tracked
//! connections when the policy changes (re-check on, as Neutron; off, as AWS).

use std::net::IpAddr;

use kubesg_agent::{
    conntrack,
    datapath::{Datapath, DatapathOptions},
    policy::{CompiledPolicy, PeerBlock, Protocol},
    testrun::test_run,
};
use kubesg_common::{
    config::CFG_DENY_EVENTS, conntrack::TcpState, event::DenyReason, limits, proto, Direction,
};
use kubesg_testkit::{
    family::{Family, PEER_PORT, POD_PORT, V4, V6},
    ipv4_and_ipv6,
    loopback::{LoopbackDatapath, ACCEPT, DROP, EGRESS, IFINDEX, INGRESS},
    packet::{self, TcpFlags},
    rules::{cidr, egress, hosts, icmp, ingress, range, rule, rule_with},
};

/// A SYN from pod:40000 to `to`:`port`.
fn syn_to(f: Family, to: IpAddr, port: u16) -> Vec<u8> {
    packet::tcp(f.pod, to, POD_PORT, port, TcpFlags::SYN)
}

/// An echo request from the pod with `code` (0 for a real one).
fn echo(f: Family, code: u8) -> Vec<u8> {
    packet::icmp_raw(
        f.pod,
        f.peer,
        f.echo_request_type(),
        code,
        [0, 7, 0, 1],
        b"ping",
    )
}

/// The handshake of pod:40000 → peer:`port`, each packet accepted.
fn handshake(dp: &LoopbackDatapath, f: Family, port: u16) {
    assert_eq!(dp.pod_sends(&f.tcp_out(port, TcpFlags::SYN)), ACCEPT, "SYN");
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(port, TcpFlags::SYN_ACK)),
        ACCEPT,
        "SYN/ACK"
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(port, TcpFlags::ACK)), ACCEPT, "ACK");
}

/// `frame`, sent by the pod, is refused as a NEW connection: dropped, counted, reported, and
/// leaves no entry.
fn assert_refused_out(dp: &mut LoopbackDatapath, frame: &[u8], what: &str) {
    let was = dp.counters()[EGRESS].dropped_policy;
    let entries = dp.conns().len();
    assert_eq!(dp.pod_sends(frame), DROP, "{what}");
    assert_eq!(dp.counters()[EGRESS].dropped_policy, was + 1, "{what}");
    let d = dp.assert_denied(DenyReason::Policy);
    assert_eq!(d.direction, Direction::Egress, "{what}");
    assert_eq!(
        dp.conns().len(),
        entries,
        "{what}: a refused connection leaves no entry"
    );
}

/// `frame`, sent by the pod, opens a connection.
fn assert_allowed_out(dp: &LoopbackDatapath, frame: &[u8], what: &str) {
    let was = dp.counters()[EGRESS].new_connections;
    assert_eq!(dp.pod_sends(frame), ACCEPT, "{what}");
    assert_eq!(dp.counters()[EGRESS].new_connections, was + 1, "{what}");
}

// --- NEW connections of members ---------------------------------------------------------------

ipv4_and_ipv6!(
    tcp_port_rule_allows_its_port_and_refuses_others,
    port_range_allows_both_ends_and_nothing_outside,
    rule_of_another_protocol_does_not_match,
    a_policy_replaced_while_packets_flow_is_never_seen_half_written,
    sctp_rule_allows_its_port_and_the_replies_of_what_it_allowed,
    icmp_rule_with_type_and_code_matches_only_that_code,
    icmp_rule_with_type_only_matches_every_code,
    cidr_with_except_allows_the_block_minus_the_exception,
    any_protocol_rule_allows_every_protocol,
    policy_with_no_rules_denies_everything,
    refused_syn_stays_refused_and_leaves_no_entry,
    ingress_rules_judge_inbound_connections_by_port_and_peer,
    egress_rules_do_not_allow_inbound_connections,
    denial_event_names_the_endpoint_policy_and_flow,
);

fn tcp_port_rule_allows_its_port_and_refuses_others(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Tcp,
        vec![range(443, 443)],
    )])));
    assert_allowed_out(&dp, &f.tcp_out(443, TcpFlags::SYN), "443");
    assert_refused_out(&mut dp, &f.tcp_out(444, TcpFlags::SYN), "444");
    assert_refused_out(&mut dp, &f.tcp_out(442, TcpFlags::SYN), "442");
    assert_eq!(dp.conns().len(), 1);
}

fn port_range_allows_both_ends_and_nothing_outside(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Tcp,
        vec![range(8000, 8100)],
    )])));
    for p in [8000, 8001, 8050, 8099, 8100] {
        assert_allowed_out(&dp, &f.tcp_out(p, TcpFlags::SYN), &format!("port {p}"));
    }
    for p in [7999, 8101, 80, 65535] {
        assert_refused_out(&mut dp, &f.tcp_out(p, TcpFlags::SYN), &format!("port {p}"));
    }
}

fn rule_of_another_protocol_does_not_match(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Udp,
        vec![range(53, 53)],
    )])));
    assert_allowed_out(&dp, &f.udp_out(53, b"x"), "UDP 53");
    assert_refused_out(&mut dp, &f.tcp_out(53, TcpFlags::SYN), "TCP 53");
    let sctp = packet::ip_raw(
        f.pod,
        f.peer,
        proto::SCTP,
        &[0x9c, 0x40, 0, 53, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    assert_refused_out(&mut dp, &sctp, "SCTP 53");
}

/// Two versions of a policy that agree on TCP 443 to the peer (allowed) and TCP 444 (refused)
/// and differ in everything else: a UDP rule with `extra` port ranges and peer blocks each, so that
/// writing one takes long enough for packets to run while it is half written.
fn versions_agreeing_on_443(f: Family, extra: u16) -> [CompiledPolicy; 2] {
    let peer_block = |i: u16| {
        if f.is_v6() {
            cidr(&format!("fd10:{i:x}::/64"))
        } else {
            cidr(&format!("10.{}.{}.0/24", 100 + i / 256, i % 256))
        }
    };
    let https_to = |p: IpAddr| rule_with(Protocol::Tcp, vec![range(443, 443)], hosts(&[p]));
    [0u16, 1].map(|v| {
        let ports = (0..extra).map(|i| range(1000 + 2 * i + v, 1000 + 2 * i + v));
        let peers = (0..extra).map(|i| peer_block(2 * i + v));
        egress(vec![
            https_to(f.peer),
            rule_with(Protocol::Udp, ports.collect(), peers.collect()),
        ])
    })
}

fn a_policy_replaced_while_packets_flow_is_never_seen_half_written(f: Family) {
    let versions = versions_agreeing_on_443(f, 200);
    let mut dp = LoopbackDatapath::load(Some(&versions[0]));
    let prog = dp
        .datapath
        .program_fd("from_pod")
        .expect("from_pod")
        .try_clone()
        .expect("a second handle on the program");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (judged, wrong) = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let (mut judged, mut wrong) = (0u32, Vec::new());
            let mut sport = 10_000u16;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                sport = if sport == 60_000 { 10_000 } else { sport + 1 };
                for (dport, want) in [(443, ACCEPT), (444, DROP)] {
                    let syn = packet::tcp(f.pod, f.peer, sport, dport, TcpFlags::SYN);
                    let got = test_run(&prog, &syn, IFINDEX, 1)
                        .expect("BPF_PROG_TEST_RUN")
                        .retval;
                    judged += 1;
                    if got != want {
                        wrong.push((dport, sport, got));
                    }
                }
            }
            (judged, wrong)
        });
        for i in 0..40 {
            dp.replace(&versions[(i + 1) % 2]);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        runner.join().expect("the packet runner")
    });
    assert!(
        wrong.is_empty(),
        "verdicts that changed mid-replacement: {wrong:?}"
    );
    assert!(
        judged >= 200,
        "only {judged} packets ran during the replacements"
    );
}

/// An SCTP packet (common header, no chunks) between `src`:`sport` and `dst`:`dport`.
fn sctp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let mut header = Vec::with_capacity(12);
    header.extend_from_slice(&sport.to_be_bytes());
    header.extend_from_slice(&dport.to_be_bytes());
    header.extend_from_slice(&[0; 8]); // verification tag, checksum
    packet::ip_raw(src, dst, proto::SCTP, &header)
}

fn sctp_rule_allows_its_port_and_the_replies_of_what_it_allowed(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Sctp,
        vec![range(3868, 3868)],
    )])));
    assert_allowed_out(&dp, &sctp(f.pod, f.peer, POD_PORT, 3868), "SCTP 3868");
    let conns = dp.conns();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].key.proto, proto::SCTP);
    // Tracked with its ports: the peer's answer is ESTABLISHED, whatever the rules say of it.
    assert_eq!(
        dp.pod_receives(&sctp(f.peer, f.pod, 3868, POD_PORT)),
        ACCEPT,
        "the association's reply"
    );
    assert!(dp.conns()[0].seen_reply(), "the reply was seen");
    assert_refused_out(&mut dp, &sctp(f.pod, f.peer, POD_PORT, 3869), "SCTP 3869");
    assert_refused_out(&mut dp, &f.tcp_out(3868, TcpFlags::SYN), "TCP 3868");
    // The peer cannot open an association to the pod: no ingress rule allows it.
    let was = dp.counters()[INGRESS].dropped_policy;
    assert_eq!(dp.pod_receives(&sctp(f.peer, f.pod, 5000, 3868)), DROP);
    assert_eq!(dp.counters()[INGRESS].dropped_policy, was + 1);
}

fn icmp_rule_with_type_and_code_matches_only_that_code(f: Family) {
    let echo_code_0 = icmp(f.echo_request_type(), Some(0));
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        f.icmp_protocol(),
        vec![echo_code_0],
    )])));
    assert_allowed_out(&dp, &echo(f, 0), "echo code 0");
    let other_id = packet::icmp_raw(
        f.pod,
        f.peer,
        f.echo_request_type(),
        1,
        [0, 8, 0, 1],
        b"ping",
    );
    assert_refused_out(&mut dp, &other_id, "echo code 1");
}

fn icmp_rule_with_type_only_matches_every_code(f: Family) {
    let echo_any = icmp(f.echo_request_type(), None);
    let dp = LoopbackDatapath::load(Some(&egress(vec![rule(f.icmp_protocol(), vec![echo_any])])));
    for (id, code) in [(7u8, 0u8), (8, 1), (9, 255)] {
        let echo = packet::icmp_raw(
            f.pod,
            f.peer,
            f.echo_request_type(),
            code,
            [0, id, 0, 1],
            b"p",
        );
        assert_allowed_out(&dp, &echo, &format!("code {code}"));
    }
}

fn cidr_with_except_allows_the_block_minus_the_exception(f: Family) {
    let block = PeerBlock {
        cidr: f.cidr("10.0.0.0/8", "fd00::/16"),
        except: vec![f.cidr("10.1.0.0/16", "fd00:1::/32")],
    };
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule_with(
        Protocol::Tcp,
        vec![],
        vec![block],
    )])));
    let inside = f.addr("10.2.3.4", "fd00:2::4");
    let excepted = f.addr("10.1.2.3", "fd00:1::3");
    let excepted_edge = f.addr("10.1.255.255", "fd00:1:ffff::1");
    let outside = f.addr("11.0.0.1", "fd01::1");
    let just_after = f.addr("10.2.0.0", "fd00:2::");
    assert_allowed_out(&dp, &syn_to(f, inside, 80), "inside");
    assert_allowed_out(&dp, &syn_to(f, just_after, 80), "just after the exception");
    assert_refused_out(&mut dp, &syn_to(f, excepted, 80), "in the exception");
    assert_refused_out(
        &mut dp,
        &syn_to(f, excepted_edge, 80),
        "last of the exception",
    );
    assert_refused_out(&mut dp, &syn_to(f, outside, 80), "outside");
}

fn any_protocol_rule_allows_every_protocol(f: Family) {
    let dp = LoopbackDatapath::load(Some(&egress(vec![rule(Protocol::Any, vec![])])));
    assert_allowed_out(&dp, &f.tcp_out(1, TcpFlags::SYN), "TCP 1");
    assert_allowed_out(&dp, &f.tcp_out(65535, TcpFlags::SYN), "TCP 65535");
    assert_allowed_out(&dp, &f.udp_out(9999, b"x"), "UDP");
    assert_allowed_out(&dp, &echo(f, 0), "echo");
    let gre = packet::ip_raw(f.pod, f.peer, 47, &[0; 8]);
    assert_allowed_out(&dp, &gre, "GRE");
    let gre_entry = dp
        .conns()
        .into_iter()
        .find(|c| c.key.proto == 47)
        .expect("a GRE entry");
    assert_eq!((gre_entry.key.pod_port, gre_entry.key.peer_port), (0, 0));
}

fn policy_with_no_rules_denies_everything(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&CompiledPolicy::default()));
    assert_refused_out(&mut dp, &f.tcp_out(80, TcpFlags::SYN), "TCP");
    assert_refused_out(&mut dp, &f.udp_out(53, b"x"), "UDP");
    assert_refused_out(&mut dp, &echo(f, 0), "echo");
    assert_refused_out(&mut dp, &packet::ip_raw(f.pod, f.peer, 47, &[0; 8]), "GRE");
    for frame in [
        f.tcp_in(80, TcpFlags::SYN),
        packet::udp(f.peer, f.pod, 5000, 53, b"x"),
        f.echo_in(1),
    ] {
        assert_eq!(dp.pod_receives(&frame), DROP);
        dp.assert_denied(DenyReason::Policy);
    }
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 3);
    assert!(dp.conns().is_empty());
}

fn refused_syn_stays_refused_and_leaves_no_entry(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Tcp,
        vec![range(443, 443)],
    )])));
    for _ in 0..3 {
        assert_refused_out(&mut dp, &f.tcp_out(80, TcpFlags::SYN), "80");
    }
    // Nothing was tracked, so the peer's answer has nothing to belong to.
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
    assert!(dp.conns().is_empty());
}

fn ingress_rules_judge_inbound_connections_by_port_and_peer(f: Family) {
    let peers = PeerBlock::cidr(f.cidr("10.0.1.0/24", "fd00:1::/64"));
    let mut dp = LoopbackDatapath::load(Some(&ingress(vec![rule_with(
        Protocol::Tcp,
        vec![range(8080, 8080)],
        vec![peers],
    )])));
    assert_eq!(dp.pod_receives(&f.tcp_in(8080, TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.conn().entry.orig_direction(), Direction::Ingress);
    assert_eq!(dp.pod_receives(&f.tcp_in(8081, TcpFlags::SYN)), DROP);
    dp.assert_denied(DenyReason::Policy);
    let stranger = f.addr("10.0.2.7", "fd00:2::7");
    assert_eq!(
        dp.pod_receives(&packet::tcp(
            stranger,
            f.pod,
            PEER_PORT,
            8080,
            TcpFlags::SYN
        )),
        DROP
    );
    let d = dp.assert_denied(DenyReason::Policy);
    assert_eq!(d.src, Some(stranger));
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 2);
    assert_eq!(dp.conns().len(), 1);
}

fn egress_rules_do_not_allow_inbound_connections(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Tcp,
        vec![range(8080, 8080)],
    )])));
    assert_eq!(dp.pod_receives(&f.tcp_in(8080, TcpFlags::SYN)), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert!(dp.conns().is_empty());
}

fn denial_event_names_the_endpoint_policy_and_flow(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&CompiledPolicy::default()));
    let policy_id = dp.policy().expect("a member").id;
    assert_eq!(dp.pod_sends(&f.tcp_out(443, TcpFlags::SYN)), DROP);
    let d = dp.assert_denied(DenyReason::Policy);
    assert_eq!(d.ifindex, IFINDEX);
    assert_eq!(d.policy_id, policy_id);
    assert_eq!(d.direction, Direction::Egress);
    assert_eq!(d.proto, proto::TCP);
    assert_eq!((d.src, d.dst), (Some(f.pod), Some(f.peer)));
    assert_eq!((d.sport, d.dport), (40000, 443));
}

#[test]
fn ipv6_block_does_not_match_ipv4_and_ipv4_block_does_not_match_ipv6() {
    kubesg_testkit::require_privileged!();
    let only = |block: &str| egress(vec![rule_with(Protocol::Any, vec![], vec![cidr(block)])]);
    let mut dp = LoopbackDatapath::load(Some(&only("::/0")));
    assert_allowed_out(&dp, &V6.tcp_out(80, TcpFlags::SYN), "IPv6 under ::/0");
    assert_refused_out(&mut dp, &V4.tcp_out(80, TcpFlags::SYN), "IPv4 under ::/0");
    let mapped = only("::ffff:0:0/96");
    let mut dp = LoopbackDatapath::load(Some(&mapped));
    assert_refused_out(
        &mut dp,
        &V4.tcp_out(80, TcpFlags::SYN),
        "IPv4 under the v4-mapped block",
    );
    let mut dp = LoopbackDatapath::load(Some(&only("0.0.0.0/0")));
    assert_allowed_out(&dp, &V4.tcp_out(80, TcpFlags::SYN), "IPv4 under 0.0.0.0/0");
    assert_refused_out(
        &mut dp,
        &V6.tcp_out(80, TcpFlags::SYN),
        "IPv6 under 0.0.0.0/0",
    );
}

// --- Stateless policies and non-members --------------------------------------------------------

ipv4_and_ipv6!(
    stateless_policy_judges_every_packet_and_replies_need_their_own_rule,
    stateless_policy_creates_no_entry_and_counts_no_connection,
    non_member_passes_everything_and_still_tracks_it,
);

fn stateless_policy_judges_every_packet_and_replies_need_their_own_rule(f: Family) {
    let mut out_only = egress(vec![rule(Protocol::Tcp, vec![range(80, 80)])]);
    out_only.stateless = true;
    let mut dp = LoopbackDatapath::load(Some(&out_only));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        DROP,
        "no rule for the reply"
    );
    dp.assert_denied(DenyReason::Policy);
    // A stray ACK is not INVALID for a stateless policy: the rules decide.
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), ACCEPT);
    assert_eq!(dp.pod_sends(&f.tcp_out(81, TcpFlags::ACK)), DROP);
    dp.assert_denied(DenyReason::Policy);

    let mut both = out_only.clone();
    both.ingress = vec![rule(Protocol::Tcp, vec![range(32768, 60999)])];
    let dp = LoopbackDatapath::load(Some(&both));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT,
        "its own rule"
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), ACCEPT);
}

fn stateless_policy_creates_no_entry_and_counts_no_connection(f: Family) {
    let mut p = egress(vec![rule(Protocol::Any, vec![])]);
    p.ingress = vec![rule(Protocol::Any, vec![])];
    p.stateless = true;
    let dp = LoopbackDatapath::load(Some(&p));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"x")), ACCEPT);
    assert_eq!(dp.pod_sends(&echo(f, 0)), ACCEPT);
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
    let [eg, ing] = dp.counters();
    assert_eq!(eg.new_connections + ing.new_connections, 0);
    assert_eq!((eg.accepted, ing.accepted), (3, 1));
}

fn non_member_passes_everything_and_still_tracks_it(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    assert_eq!(dp.pod_receives(&f.tcp_in(22, TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"x")), ACCEPT);
    assert_eq!(dp.pod_sends(&echo(f, 0)), ACCEPT);
    let conns = dp.conns();
    assert_eq!(conns.len(), 3, "{conns:#?}");
    let tcp = conns
        .iter()
        .find(|c| c.key.proto == proto::TCP)
        .expect("the TCP entry");
    assert_eq!(tcp.entry.orig_direction(), Direction::Ingress);
    assert_eq!(tcp.entry.policy_id, 0);
    let [eg, ing] = dp.counters();
    assert_eq!((eg.new_connections, ing.new_connections), (2, 1));
    assert!(dp.denials().is_empty());
}

#[test]
fn stateless_member_passes_neighbor_discovery() {
    kubesg_testkit::require_privileged!();
    let p = CompiledPolicy {
        stateless: true,
        ..CompiledPolicy::default()
    };
    let dp = LoopbackDatapath::load(Some(&p));
    dp.assert_neighbor_discovery_passes();
    assert_eq!(dp.pod_sends(&V6.tcp_out(80, TcpFlags::SYN)), DROP);
}

// --- Policy changes -----------------------------------------------------------------------------

ipv4_and_ipv6!(
    recheck_cuts_an_established_connection_the_new_policy_refuses,
    unreplied_connection_refused_by_the_new_policy_is_dropped_and_forgotten,
    recheck_keeps_an_established_connection_the_new_policy_allows,
    without_recheck_an_established_connection_outlives_a_refusing_policy,
    recheck_judges_an_inbound_connection_by_the_pods_port,
    recheck_cuts_an_echo_flow_the_new_policy_refuses,
    connection_opened_as_non_member_is_kept_on_joining_a_policy_allowing_it,
    connection_opened_as_non_member_is_cut_on_joining_a_policy_refusing_it,
    without_recheck_a_non_member_connection_survives_joining_a_refusing_policy,
);

fn recheck_cuts_an_established_connection_the_new_policy_refuses(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Tcp,
        vec![range(80, 80)],
    )])));
    handshake(&dp, f, 80);
    dp.replace(&egress(vec![rule(Protocol::Tcp, vec![range(443, 443)])]));
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        DROP
    );
    let d = dp.assert_denied(DenyReason::PolicyChanged);
    assert_eq!(d.direction, Direction::Ingress);
    assert_eq!(d.policy_id, dp.policy().expect("member").id);
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 1);
    assert!(
        dp.conns().is_empty(),
        "the cut connection's entry is deleted"
    );
    // What follows has no connection any more.
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), DROP);
    dp.assert_denied(DenyReason::Invalid);
}

fn unreplied_connection_refused_by_the_new_policy_is_dropped_and_forgotten(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Udp,
        vec![range(53, 53)],
    )])));
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"x")), ACCEPT);
    assert_eq!(dp.conns().len(), 1);
    dp.replace(&egress(vec![rule(Protocol::Udp, vec![range(123, 123)])]));
    // Still unreplied: its next datagram is NEW, judged by the new rules, refused.
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"x")), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert!(
        dp.conns().is_empty(),
        "a refused connection leaves no state behind: {:#?}",
        dp.conns()
    );
}

fn recheck_keeps_an_established_connection_the_new_policy_allows(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Tcp,
        vec![range(80, 80)],
    )])));
    handshake(&dp, f, 80);
    dp.replace(&egress(vec![
        rule(Protocol::Tcp, vec![range(1, 1024)]),
        rule(Protocol::Udp, vec![]),
    ]));
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        ACCEPT
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::Established));
    assert_eq!(
        c.entry.policy_id,
        dp.policy().expect("member").id,
        "judged under the new policy"
    );
    assert!(dp.denials().is_empty());
}

fn without_recheck_an_established_connection_outlives_a_refusing_policy(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&egress(vec![rule(
        Protocol::Tcp,
        vec![range(80, 80)],
    )])));
    dp.set_recheck(false);
    handshake(&dp, f, 80);
    dp.replace(&CompiledPolicy::default());
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        ACCEPT
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::FIN_ACK)), ACCEPT);
    assert_eq!(dp.conn().tcp_state(), Some(TcpState::FinWait));
    assert!(dp.denials().is_empty());
    // New connections are judged by the new rules all the same.
    assert_refused_out(
        &mut dp,
        &packet::tcp(f.pod, f.peer, 40001, 80, TcpFlags::SYN),
        "new",
    );
}

fn recheck_judges_an_inbound_connection_by_the_pods_port(f: Family) {
    let server = |port: u16| ingress(vec![rule(Protocol::Tcp, vec![range(port, port)])]);
    let mut dp = LoopbackDatapath::load(Some(&server(8080)));
    let inb = |fl| f.tcp_in(8080, fl);
    let reply = |fl| f.tcp_in_reply(8080, fl);
    assert_eq!(dp.pod_receives(&inb(TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_sends(&reply(TcpFlags::SYN_ACK)), ACCEPT);
    assert_eq!(dp.pod_receives(&inb(TcpFlags::ACK)), ACCEPT);
    // Still allowed on the pod's port 8080 (the peer's port 50000 is irrelevant).
    dp.replace(&server(8080));
    assert_eq!(dp.pod_sends(&reply(TcpFlags::PSH_ACK)), ACCEPT);
    dp.replace(&server(50000));
    assert_eq!(dp.pod_sends(&reply(TcpFlags::PSH_ACK)), DROP);
    dp.assert_denied(DenyReason::PolicyChanged);
    assert!(dp.conns().is_empty());
}

fn recheck_cuts_an_echo_flow_the_new_policy_refuses(f: Family) {
    let echo_rule = || {
        egress(vec![rule(
            f.icmp_protocol(),
            vec![icmp(f.echo_request_type(), Some(0))],
        )])
    };
    let mut dp = LoopbackDatapath::load(Some(&echo_rule()));
    let ping = f.echo_out(5);
    let pong = f.echo_out_reply(5);
    assert_eq!(dp.pod_sends(&ping), ACCEPT);
    assert_eq!(dp.pod_receives(&pong), ACCEPT);
    dp.replace(&echo_rule());
    assert_eq!(
        dp.pod_receives(&pong),
        ACCEPT,
        "the new rules still allow the echo"
    );
    dp.replace(&egress(vec![rule(Protocol::Tcp, vec![])]));
    assert_eq!(dp.pod_receives(&pong), DROP);
    dp.assert_denied(DenyReason::PolicyChanged);
    assert!(dp.conns().is_empty());
}

fn connection_opened_as_non_member_is_kept_on_joining_a_policy_allowing_it(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    handshake(&dp, f, 80);
    dp.join(&egress(vec![rule(Protocol::Tcp, vec![range(80, 80)])]));
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        ACCEPT
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), ACCEPT);
    assert_eq!(dp.conn().entry.policy_id, dp.policy().expect("member").id);
    assert!(dp.denials().is_empty());
}

fn connection_opened_as_non_member_is_cut_on_joining_a_policy_refusing_it(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    handshake(&dp, f, 80);
    dp.join(&egress(vec![rule(Protocol::Tcp, vec![range(443, 443)])]));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::PSH_ACK)), DROP);
    dp.assert_denied(DenyReason::PolicyChanged);
    assert_eq!(dp.counters()[EGRESS].dropped_policy, 1);
    assert!(dp.conns().is_empty());
}

fn without_recheck_a_non_member_connection_survives_joining_a_refusing_policy(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    dp.set_recheck(false);
    handshake(&dp, f, 80);
    dp.join(&CompiledPolicy::default());
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::PSH_ACK)), ACCEPT);
    assert_eq!(dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::ACK)), ACCEPT);
    assert!(dp.denials().is_empty());
}

// --- Settings and unregistered interfaces -----------------------------------------------------

ipv4_and_ipv6!(
    drops_are_not_reported_when_deny_events_are_off,
    interface_without_endpoint_passes_everything_untracked,
);

fn drops_are_not_reported_when_deny_events_are_off(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&CompiledPolicy::default()));
    let mut cfg = dp.datapath.config().expect("reading the config");
    cfg.flags &= !CFG_DENY_EVENTS;
    dp.datapath.set_config(&cfg).expect("writing the config");
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), DROP);
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), DROP);
    let eg = dp.counters()[EGRESS];
    assert_eq!(
        (eg.dropped_policy, eg.dropped_invalid),
        (1, 1),
        "still counted"
    );
    assert!(dp.denials().is_empty());
}

fn interface_without_endpoint_passes_everything_untracked(f: Family) {
    let dp = Datapath::load(&DatapathOptions::default()).expect("loading the datapath");
    for prog in ["from_pod", "to_pod"] {
        let fd = dp.program_fd(prog).expect("program fd");
        for frame in [
            f.tcp_out(80, TcpFlags::SYN),
            f.tcp_out(80, TcpFlags::ACK),
            f.udp_out(53, b"x"),
        ] {
            let r = test_run(fd, &frame, IFINDEX, 1).expect("BPF_PROG_TEST_RUN");
            assert_eq!(r.retval, ACCEPT, "{prog}");
        }
    }
    assert!(conntrack::list(dp.maps()).expect("conntrack").is_empty());
    let [eg, ing] = kubesg_agent::counters::read(dp.maps(), limits::ENDPOINTS).expect("counters");
    assert_eq!(
        (eg.accepted, ing.accepted),
        (3, 3),
        "counted in the catch-all slot"
    );
    assert_eq!(eg.new_connections + eg.invalid_passed, 0);
}

#[test]
fn icmp_rule_does_not_allow_icmpv6_nor_the_reverse() {
    kubesg_testkit::require_privileged!();
    let any_type = |protocol| egress(vec![rule(protocol, vec![])]);
    let mut dp = LoopbackDatapath::load(Some(&any_type(Protocol::Icmp)));
    assert_allowed_out(&dp, &echo(V4, 0), "ICMP under an ICMP rule");
    assert_refused_out(&mut dp, &echo(V6, 0), "ICMPv6 under an ICMP rule");
    let mut dp = LoopbackDatapath::load(Some(&any_type(Protocol::Icmpv6)));
    assert_allowed_out(&dp, &echo(V6, 0), "ICMPv6 under an ICMPv6 rule");
    assert_refused_out(&mut dp, &echo(V4, 0), "ICMP under an ICMPv6 rule");
}
