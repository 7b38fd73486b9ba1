//! IP fragments through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): later fragments
//! carry no ports, so they follow the verdict their datagram's first fragment got; without a first
//! fragment they are dropped on members and passed on non-members. IPv4 and IPv6 (Fragment
//! extension header).

use std::time::Duration;

use kubesg_agent::policy::{CompiledPolicy, Protocol};
use kubesg_common::{
    config::{timeout, Config},
    event::DenyReason,
    proto, Direction,
};
use kubesg_testkit::{
    family::{Family, V6},
    ipv4_and_ipv6,
    loopback::{LoopbackDatapath, ACCEPT, DROP, EGRESS},
    packet::{self, Ipv6Ext, TcpFlags},
    rules::{dns_http_ping, port, rule},
};

/// May send UDP to port 53 and TCP to port 80, and ping; accepts UDP on 5353.
fn policy() -> CompiledPolicy {
    CompiledPolicy {
        egress: dns_http_ping(),
        ingress: vec![rule(Protocol::Udp, vec![port(5353)])],
        ..CompiledPolicy::default()
    }
}

const PAYLOAD: [u8; 200] = [0x42; 200];

/// A 208-byte UDP datagram from pod:40000 to peer:`port`, cut after 96 bytes.
fn udp_fragments(f: Family, port: u16, id: u32) -> [Vec<u8>; 2] {
    packet::fragment(&f.udp_out(port, &PAYLOAD), 96, id)
}

ipv4_and_ipv6!(
    later_fragment_follows_an_accepted_first_fragment,
    later_fragment_of_a_refused_datagram_is_dropped,
    later_fragment_without_its_first_fragment_is_dropped_for_members,
    later_fragment_without_its_first_fragment_passes_a_non_member,
    later_fragment_of_another_datagram_does_not_follow_the_first,
    later_fragment_from_another_source_does_not_follow_the_first,
    fragmented_reply_of_an_established_flow_passes,
    fragmented_inbound_datagram_allowed_by_ingress_rules_passes,
    fragmented_echo_request_passes,
    first_fragment_too_short_for_the_tcp_header_is_malformed,
    later_fragment_after_the_fragment_timeout_is_dropped,
);

fn later_fragment_follows_an_accepted_first_fragment(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let [first, later] = udp_fragments(f, 53, 0x1234);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    let c = dp.conn();
    assert_eq!(
        (c.key.proto, c.key.pod_port, c.key.peer_port),
        (proto::UDP, 40000, 53)
    );
    assert_eq!(dp.pod_sends(&later), ACCEPT);
    let eg = dp.counters()[EGRESS];
    assert_eq!(
        (eg.accepted, eg.new_connections, eg.dropped_invalid),
        (2, 1, 0)
    );
    assert!(dp.denials().is_empty());
}

fn later_fragment_of_a_refused_datagram_is_dropped(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let [first, later] = udp_fragments(f, 54, 0x1234);
    assert_eq!(dp.pod_sends(&first), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert_eq!(dp.pod_sends(&later), DROP);
    let d = dp.assert_denied(DenyReason::Fragment);
    assert_eq!(d.direction, Direction::Egress);
    assert_eq!((d.src, d.dst), (Some(f.pod), Some(f.peer)));
    let eg = dp.counters()[EGRESS];
    assert_eq!(
        (eg.dropped_policy, eg.dropped_invalid, eg.accepted),
        (1, 1, 0)
    );
    assert!(dp.conns().is_empty());
}

fn later_fragment_without_its_first_fragment_is_dropped_for_members(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let [_, later] = udp_fragments(f, 53, 0x1234);
    assert_eq!(dp.pod_sends(&later), DROP);
    dp.assert_denied(DenyReason::Fragment);
    assert_eq!(dp.counters()[EGRESS].dropped_invalid, 1);
    assert!(dp.conns().is_empty());
}

fn later_fragment_without_its_first_fragment_passes_a_non_member(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    let [_, later] = udp_fragments(f, 53, 0x1234);
    assert_eq!(dp.pod_sends(&later), ACCEPT);
    let eg = dp.counters()[EGRESS];
    assert_eq!((eg.accepted, eg.invalid_passed), (1, 1));
    assert!(dp.denials().is_empty());
    assert!(dp.conns().is_empty());
}

fn later_fragment_of_another_datagram_does_not_follow_the_first(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let [first, _] = udp_fragments(f, 53, 1);
    let [_, other_later] = udp_fragments(f, 53, 2);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.pod_sends(&other_later), DROP);
    dp.assert_denied(DenyReason::Fragment);
}

fn later_fragment_from_another_source_does_not_follow_the_first(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let [first, _] = udp_fragments(f, 53, 1);
    let stranger = Family {
        pod: f.addr("10.0.0.6", "fd00::6"),
        ..f
    };
    let [_, spoofed_later] = udp_fragments(stranger, 53, 1);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.pod_sends(&spoofed_later), DROP);
    dp.assert_denied(DenyReason::Fragment);
}

fn fragmented_reply_of_an_established_flow_passes(f: Family) {
    // The pod may receive nothing NEW; the big answer to its query is ESTABLISHED.
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), ACCEPT);
    let answer = f.udp_out_reply(53, &PAYLOAD);
    let [first, later] = packet::fragment(&answer, 96, 77);
    assert_eq!(dp.pod_receives(&first), ACCEPT);
    assert_eq!(dp.pod_receives(&later), ACCEPT);
    assert!(dp.conn().seen_reply());
    assert!(dp.denials().is_empty());
}

fn fragmented_inbound_datagram_allowed_by_ingress_rules_passes(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let dgram = f.udp_in(5353, &PAYLOAD);
    let [first, later] = packet::fragment(&dgram, 96, 78);
    assert_eq!(dp.pod_receives(&first), ACCEPT);
    assert_eq!(dp.pod_receives(&later), ACCEPT);
    assert_eq!(dp.conn().entry.orig_direction(), Direction::Ingress);
    let refused = f.udp_in(5354, &PAYLOAD);
    let [first, later] = packet::fragment(&refused, 96, 79);
    assert_eq!(dp.pod_receives(&first), DROP);
    assert_eq!(dp.pod_receives(&later), DROP);
    assert_eq!(dp.denials().len(), 2);
}

fn fragmented_echo_request_passes(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let ping = packet::icmp_raw(
        f.pod,
        f.peer,
        f.echo_request_type(),
        0,
        [0, 9, 0, 1],
        &PAYLOAD,
    );
    let [first, later] = packet::fragment(&ping, 64, 80);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.pod_sends(&later), ACCEPT);
    assert_eq!(dp.conn().key.pod_port, 9, "tracked by its identifier");
    assert!(dp.denials().is_empty());
}

fn first_fragment_too_short_for_the_tcp_header_is_malformed(f: Family) {
    // RFC 1858's tiny fragment: the first fragment stops inside the TCP header, so the flags and
    // ports of the rest cannot be judged.
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let syn = f.tcp_out(80, TcpFlags::SYN);
    let [first, later] = packet::fragment(&syn, 8, 81);
    assert_eq!(dp.pod_sends(&first), DROP);
    dp.assert_denied(DenyReason::Malformed);
    assert_eq!(dp.pod_sends(&later), DROP);
    dp.assert_denied(DenyReason::Fragment);
    assert!(dp.conns().is_empty());
}

fn later_fragment_after_the_fragment_timeout_is_dropped(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let mut cfg = Config::defaults();
    cfg.timeouts_ns[timeout::FRAGMENT] = 100_000_000;
    dp.datapath.set_config(&cfg).expect("config");
    let [first, later] = udp_fragments(f, 53, 0x99);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(dp.pod_sends(&later), DROP);
    dp.assert_denied(DenyReason::Fragment);
}

#[test]
fn ipv6_atomic_fragment_is_an_ordinary_packet() {
    kubesg_testkit::require_privileged!();
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let q = V6.udp_out(53, b"query");
    assert_eq!(dp.pod_sends(&packet::ipv6_atomic_fragment(&q, 5)), ACCEPT);
    assert_eq!(dp.conn().key.peer_port, 53);
    let refused = V6.udp_out(54, b"query");
    assert_eq!(
        dp.pod_sends(&packet::ipv6_atomic_fragment(&refused, 6)),
        DROP
    );
    dp.assert_denied(DenyReason::Policy);
}

#[test]
fn ipv6_later_fragment_follows_a_first_fragment_with_destination_options() {
    kubesg_testkit::require_privileged!();
    // Destination options are part of the fragmentable payload: the first fragment reads them
    // to reach UDP, the later fragment's Fragment header names them, not UDP.
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let dgram = V6.udp_out(53, &PAYLOAD);
    let dgram = packet::with_ipv6_extensions(&dgram, &[Ipv6Ext::DestinationOptions]);
    let [first, later] = packet::fragment(&dgram, 96, 0x4242);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.conn().key.peer_port, 53);
    assert_eq!(dp.pod_sends(&later), ACCEPT);
    assert!(dp.denials().is_empty());
}

#[test]
fn ipv6_later_fragment_with_destination_options_follows_a_refused_first_fragment() {
    kubesg_testkit::require_privileged!();
    let mut dp = LoopbackDatapath::load(Some(&policy()));
    let dgram = V6.udp_out(54, &PAYLOAD);
    let dgram = packet::with_ipv6_extensions(&dgram, &[Ipv6Ext::DestinationOptions]);
    let [first, later] = packet::fragment(&dgram, 96, 0x4243);
    assert_eq!(dp.pod_sends(&first), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert_eq!(dp.pod_sends(&later), DROP);
    dp.assert_denied(DenyReason::Fragment);
}
