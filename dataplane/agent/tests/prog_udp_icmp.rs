//! UDP, ICMP and ICMPv6 through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): UDP's
//! `[UNREPLIED]` / ESTABLISHED / `[ASSURED]` stream rule, ICMP echo flows keyed by identifier,
//! untracked neighbour discovery, and ICMP errors that are RELATED to a tracked flow or INVALID.

use std::{net::IpAddr, time::Duration};

use kubesg_agent::policy::{CompiledPolicy, Protocol};
use kubesg_common::{config::Config, event::DenyReason, proto, Direction};
use kubesg_testkit::{
    family::{Family, NEIGHBOR_V6, POD_V6},
    ipv4_and_ipv6,
    loopback::{next_tick, LoopbackDatapath, ACCEPT, DROP, EGRESS, INGRESS},
    packet::{self, IcmpError, Ipv6Ext, TcpFlags},
    rules::{allow_all, anywhere, dns_http_ping, echo_requests, egress, ingress, port, rule},
};

/// May send DNS queries (UDP 53), ping, and open TCP to port 80; accepts nothing.
fn client() -> CompiledPolicy {
    egress(dns_http_ping())
}

/// Accepts UDP on 5353 and pings; opens nothing.
fn server() -> CompiledPolicy {
    let mut rules = vec![rule(Protocol::Udp, vec![port(5353)])];
    rules.extend(echo_requests(anywhere()));
    ingress(rules)
}

// --- UDP --------------------------------------------------------------------------------------

ipv4_and_ipv6!(
    first_udp_packet_is_new_and_unreplied,
    more_packets_without_reply_stay_unreplied,
    udp_reply_establishes_without_assuring_and_keeps_the_short_timeout,
    udp_reply_passes_a_member_allowing_nothing_inbound,
    udp_stream_is_assured_after_the_stream_delay,
    late_first_reply_is_not_yet_assured_but_the_next_packet_is,
    udp_traffic_within_the_stream_delay_is_not_assured,
    inbound_udp_without_outbound_is_new_and_refused_by_ingress_rules,
    inbound_udp_allowed_by_ingress_rules_opens_an_ingress_flow,
    datagram_to_another_local_port_is_not_a_reply,
    non_member_tracks_inbound_udp,
);

fn first_udp_packet_is_new_and_unreplied(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.key.proto, proto::UDP);
    assert_eq!(c.tcp_state(), None);
    assert!(!c.seen_reply(), "[UNREPLIED]");
    assert!(!c.assured());
    assert_eq!(c.entry.orig_direction(), Direction::Egress);
    assert_eq!(c.original(), f.out_tuple(53));
    dp.assert_expires_in(&c, Duration::from_secs(30));
    assert_eq!(dp.counters()[EGRESS].new_connections, 1);
}

fn more_packets_without_reply_stay_unreplied(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    dp.pod_sends(&f.udp_out(53, b"query"));
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), ACCEPT);
    let c = dp.conn();
    assert!(!c.seen_reply());
    dp.assert_expires_in(&c, Duration::from_secs(30));
    assert_eq!(dp.counters()[EGRESS].new_connections, 1);
}

fn udp_reply_establishes_without_assuring_and_keeps_the_short_timeout(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    dp.pod_sends(&f.udp_out(53, b"query"));
    assert_eq!(dp.pod_receives(&f.udp_out_reply(53, b"answer")), ACCEPT);
    let c = dp.conn();
    assert!(c.seen_reply(), "no more [UNREPLIED]");
    assert!(!c.assured(), "a single exchange is not a stream");
    dp.assert_expires_in(&c, Duration::from_secs(30));
}

fn udp_reply_passes_a_member_allowing_nothing_inbound(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    dp.pod_sends(&f.udp_out(53, b"query"));
    assert_eq!(dp.pod_receives(&f.udp_out_reply(53, b"answer")), ACCEPT);
    assert_eq!(dp.pod_receives(&f.udp_out_reply(53, b"answer")), ACCEPT);
    let ing = dp.counters()[INGRESS];
    assert_eq!(
        (ing.accepted, ing.dropped_policy, ing.new_connections),
        (2, 0, 0)
    );
    assert!(dp.denials().is_empty());
}

/// A short stream delay, so that a test can wait it out.
fn short_stream_delay(dp: &mut LoopbackDatapath) {
    let cfg = Config {
        udp_stream_after_ns: 200_000_000,
        ..Config::defaults()
    };
    dp.datapath.set_config(&cfg).expect("writing the config");
}

fn udp_stream_is_assured_after_the_stream_delay(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    short_stream_delay(&mut dp);
    dp.pod_sends(&f.udp_out(53, b"query"));
    dp.pod_receives(&f.udp_out_reply(53, b"answer"));
    assert!(!dp.conn().assured());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), ACCEPT);
    let c = dp.conn();
    assert!(
        c.assured(),
        "traffic after the stream delay makes it [ASSURED]"
    );
    dp.assert_expires_in(&c, Duration::from_secs(120));
}

fn late_first_reply_is_not_yet_assured_but_the_next_packet_is(f: Family) {
    // nf_conntrack_proto_udp.c looks at IPS_SEEN_REPLY before the reply sets it.
    let mut dp = LoopbackDatapath::load(Some(&client()));
    short_stream_delay(&mut dp);
    dp.pod_sends(&f.udp_out(53, b"query"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dp.pod_receives(&f.udp_out_reply(53, b"answer")), ACCEPT);
    let c = dp.conn();
    assert!(c.seen_reply());
    assert!(!c.assured());
    dp.assert_expires_in(&c, Duration::from_secs(30));
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), ACCEPT);
    let c = dp.conn();
    assert!(c.assured());
    dp.assert_expires_in(&c, Duration::from_secs(120));
}

fn udp_traffic_within_the_stream_delay_is_not_assured(f: Family) {
    // Default delay: 2 s, far longer than these four packets take.
    let dp = LoopbackDatapath::load(Some(&client()));
    for _ in 0..2 {
        assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), ACCEPT);
        assert_eq!(dp.pod_receives(&f.udp_out_reply(53, b"answer")), ACCEPT);
    }
    let c = dp.conn();
    assert!(c.seen_reply());
    assert!(!c.assured());
    dp.assert_expires_in(&c, Duration::from_secs(30));
}

fn inbound_udp_without_outbound_is_new_and_refused_by_ingress_rules(f: Family) {
    // The pod's client policy allows UDP to port 53, but an answer-shaped datagram nobody asked
    // for is a NEW inbound flow, judged by (empty) ingress rules.
    let mut dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_receives(&f.udp_out_reply(53, b"answer")), DROP);
    let d = dp.assert_denied(DenyReason::Policy);
    assert_eq!(d.direction, Direction::Ingress);
    assert_eq!((d.sport, d.dport), (53, 40000));
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 1);
    assert!(dp.conns().is_empty());
}

fn inbound_udp_allowed_by_ingress_rules_opens_an_ingress_flow(f: Family) {
    let dp = LoopbackDatapath::load(Some(&server()));
    assert_eq!(dp.pod_receives(&f.udp_in(5353, b"hello")), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.entry.orig_direction(), Direction::Ingress);
    assert!(!c.seen_reply());
    assert_eq!(c.original(), f.in_tuple(5353));
    // The pod's answer is the reply: it passes although the pod may open nothing.
    let answer = f.udp_in_reply(5353, b"hi");
    assert_eq!(dp.pod_sends(&answer), ACCEPT);
    assert!(dp.conn().seen_reply());
    assert_eq!(dp.counters()[INGRESS].new_connections, 1);
}

fn datagram_to_another_local_port_is_not_a_reply(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    dp.pod_sends(&f.udp_out(53, b"query"));
    let other = packet::udp(f.peer, f.pod, 53, 40001, b"answer");
    assert_eq!(dp.pod_receives(&other), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert!(!dp.conn().seen_reply());
}

fn non_member_tracks_inbound_udp(f: Family) {
    let dp = LoopbackDatapath::load(None);
    assert_eq!(dp.pod_receives(&f.udp_out_reply(53, b"answer")), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.entry.orig_direction(), Direction::Ingress);
    assert!(!c.seen_reply());
    assert_eq!(dp.counters()[INGRESS].new_connections, 1);
}

// --- ICMP echo --------------------------------------------------------------------------------

ipv4_and_ipv6!(
    echo_request_opens_a_flow_keyed_by_its_identifier,
    echo_reply_establishes_the_flow_through_a_member_allowing_nothing_inbound,
    echo_reply_with_another_identifier_is_invalid,
    echo_reply_without_request_passes_a_non_member_as_invalid,
    inbound_echo_request_is_judged_by_ingress_rules,
    unknown_icmp_type_is_invalid,
    unknown_icmp_type_passes_a_non_member_as_invalid,
);

fn echo_request_opens_a_flow_keyed_by_its_identifier(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.echo_out(0x1234)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.key.proto, f.icmp_proto());
    assert!(!c.seen_reply());
    assert_eq!(c.entry.orig_direction(), Direction::Egress);
    let o = c.original();
    assert_eq!((o.src, o.dst), (f.pod, f.peer));
    assert_eq!(
        (o.sport, o.dport),
        (0x1234, u16::from(f.echo_request_type()))
    );
    dp.assert_expires_in(&c, Duration::from_secs(30));
    // A second ping with another identifier is another flow.
    assert_eq!(dp.pod_sends(&f.echo_out(0x1235)), ACCEPT);
    assert_eq!(dp.conns().len(), 2);
}

fn echo_reply_establishes_the_flow_through_a_member_allowing_nothing_inbound(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    dp.pod_sends(&f.echo_out(7));
    assert_eq!(dp.pod_receives(&f.echo_out_reply(7)), ACCEPT);
    let c = dp.conn();
    assert!(c.seen_reply());
    dp.assert_expires_in(&c, Duration::from_secs(30));
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 0);
}

fn echo_reply_with_another_identifier_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    dp.pod_sends(&f.echo_out(7));
    assert_eq!(dp.pod_receives(&f.echo_out_reply(8)), DROP);
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 1);
    assert!(!dp.conn().seen_reply());
}

fn echo_reply_without_request_passes_a_non_member_as_invalid(f: Family) {
    let dp = LoopbackDatapath::load(None);
    assert_eq!(dp.pod_receives(&f.echo_out_reply(7)), ACCEPT);
    let ing = dp.counters()[INGRESS];
    assert_eq!((ing.invalid_passed, ing.new_connections), (1, 0));
    assert!(dp.conns().is_empty());
}

fn inbound_echo_request_is_judged_by_ingress_rules(f: Family) {
    let ping_in = f.echo_in(99);
    let mut dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_receives(&ping_in), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert!(dp.conns().is_empty());

    let dp = LoopbackDatapath::load(Some(&server()));
    assert_eq!(dp.pod_receives(&ping_in), ACCEPT);
    assert_eq!(dp.conn().entry.orig_direction(), Direction::Ingress);
    // The pod's echo reply passes although it may send nothing.
    let pong_out = f.echo_in_reply(99);
    assert_eq!(dp.pod_sends(&pong_out), ACCEPT);
    assert!(dp.conn().seen_reply());
}

/// An ICMP type conntrack does not know: 253 (RFC 3692 experiment) for ICMP, 200 (private
/// experimentation) for ICMPv6.
fn unknown_icmp(f: Family) -> Vec<u8> {
    packet::icmp_raw(f.pod, f.peer, f.pick(253, 200), 0, [0; 4], b"x")
}

fn unknown_icmp_type_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    assert_eq!(dp.pod_sends(&unknown_icmp(f)), DROP);
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(dp.counters()[EGRESS].dropped_invalid, 1);
    assert!(dp.conns().is_empty());
}

fn unknown_icmp_type_passes_a_non_member_as_invalid(f: Family) {
    let dp = LoopbackDatapath::load(None);
    assert_eq!(dp.pod_sends(&unknown_icmp(f)), ACCEPT);
    assert_eq!(dp.counters()[EGRESS].invalid_passed, 1);
    assert!(dp.conns().is_empty());
}

// --- ICMPv6 neighbour discovery ---------------------------------------------------------------

#[test]
fn neighbor_solicitation_and_advertisement_pass_a_deny_all_member_untracked() {
    kubesg_testkit::require_privileged!();
    let mut dp = LoopbackDatapath::load(Some(&CompiledPolicy::default()));
    dp.assert_neighbor_discovery_passes();
    assert_eq!(
        dp.pod_receives(&packet::neighbor_solicitation(NEIGHBOR_V6, POD_V6)),
        ACCEPT
    );
    assert_eq!(
        dp.pod_sends(&packet::neighbor_advertisement(POD_V6, NEIGHBOR_V6)),
        ACCEPT
    );
    assert!(dp.conns().is_empty(), "UNTRACKED: no entry");
    let [eg, ing] = dp.counters();
    assert_eq!(eg.new_connections + ing.new_connections, 0);
    assert_eq!(eg.invalid_passed + ing.invalid_passed, 0);
    assert!(dp.denials().is_empty());
}

#[test]
fn router_solicitation_and_mld_report_pass_a_deny_all_member_untracked() {
    kubesg_testkit::require_privileged!();
    let dp = LoopbackDatapath::load(Some(&CompiledPolicy::default()));
    let all_routers: IpAddr = "ff02::2".parse().expect("address");
    let mld_routers: IpAddr = "ff02::16".parse().expect("address");
    let rs = packet::icmp_raw(POD_V6.into(), all_routers, 133, 0, [0; 4], &[]);
    let mld2 = packet::icmp_raw(POD_V6.into(), mld_routers, 143, 0, [0; 4], &[]);
    assert_eq!(dp.pod_sends(&rs), ACCEPT);
    assert_eq!(dp.pod_sends(&mld2), ACCEPT);
    assert!(dp.conns().is_empty());
}

#[test]
fn icmpv6_redirect_is_invalid_not_untracked() {
    kubesg_testkit::require_privileged!();
    // Type 137 is neighbour discovery too, but nf_conntrack does not exempt it.
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    let redirect = packet::icmp_raw(NEIGHBOR_V6.into(), POD_V6.into(), 137, 0, [0; 4], &[0; 32]);
    assert_eq!(dp.pod_receives(&redirect), DROP);
    dp.assert_denied(DenyReason::Invalid);
}

// --- ICMP errors ------------------------------------------------------------------------------

ipv4_and_ipv6!(
    port_unreachable_quoting_a_tracked_udp_flow_is_related,
    time_exceeded_quoting_a_tracked_tcp_syn_is_related,
    packet_too_big_quoting_a_tracked_tcp_segment_is_related,
    error_quoting_a_tracked_echo_request_is_related,
    every_error_kind_quoting_a_tracked_flow_is_related,
    error_sent_by_the_pod_about_an_inbound_flow_is_related,
    error_about_the_pods_own_reply_is_related,
    error_quoting_an_untracked_flow_is_invalid_for_members,
    error_quoting_an_untracked_flow_passes_a_non_member_as_invalid,
    error_quoting_the_right_addresses_but_wrong_port_is_invalid,
    error_sent_by_the_pod_to_someone_else_than_the_quoted_sender_is_invalid,
    error_received_for_someone_else_than_the_quoted_sender_is_invalid,
);

/// The member accepted `error` (received) as RELATED without touching the entry.
fn assert_related_in(dp: &mut LoopbackDatapath, error: &[u8]) {
    let before = dp.conns();
    let was = dp.counters()[INGRESS];
    next_tick();
    assert_eq!(dp.pod_receives(error), ACCEPT);
    let ing = dp.counters()[INGRESS];
    assert_eq!(
        (
            ing.related - was.related,
            ing.dropped_invalid - was.dropped_invalid,
            ing.new_connections - was.new_connections
        ),
        (1, 0, 0)
    );
    assert!(dp.denials().is_empty());
    assert_eq!(
        dp.conns(),
        before,
        "an ICMP error does not move its connection"
    );
}

fn port_unreachable_quoting_a_tracked_udp_flow_is_related(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    let q = f.udp_out(53, b"query");
    dp.pod_sends(&q);
    assert_related_in(
        &mut dp,
        &packet::icmp_error(f.peer, &q, IcmpError::PortUnreachable),
    );
}

fn time_exceeded_quoting_a_tracked_tcp_syn_is_related(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    let syn = f.tcp_out(80, TcpFlags::SYN);
    dp.pod_sends(&syn);
    assert_related_in(
        &mut dp,
        &packet::icmp_error(f.router, &syn, IcmpError::TimeExceeded),
    );
}

fn packet_too_big_quoting_a_tracked_tcp_segment_is_related(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN));
    dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK));
    let data = f.tcp_out(80, TcpFlags::PSH_ACK);
    dp.pod_sends(&data);
    let ptb = packet::icmp_error(f.router, &data, IcmpError::PacketTooBig { mtu: 1280 });
    assert_related_in(&mut dp, &ptb);
}

fn error_quoting_a_tracked_echo_request_is_related(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    let ping = f.echo_out(42);
    dp.pod_sends(&ping);
    assert_related_in(
        &mut dp,
        &packet::icmp_error(f.router, &ping, IcmpError::HostUnreachable),
    );
}

fn every_error_kind_quoting_a_tracked_flow_is_related(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    let q = f.udp_out(53, b"query");
    dp.pod_sends(&q);
    let kinds = [
        IcmpError::PortUnreachable,
        IcmpError::HostUnreachable,
        IcmpError::TimeExceeded,
        IcmpError::PacketTooBig { mtu: 1280 },
        IcmpError::ParameterProblem,
    ];
    for kind in kinds {
        assert_eq!(
            dp.pod_receives(&packet::icmp_error(f.router, &q, kind)),
            ACCEPT,
            "{kind:?}"
        );
    }
    assert_eq!(dp.counters()[INGRESS].related, kinds.len() as u64);
    assert!(dp.denials().is_empty());
}

fn error_sent_by_the_pod_about_an_inbound_flow_is_related(f: Family) {
    // The server may open nothing, but its port unreachable about a datagram it accepted is
    // RELATED.
    let mut dp = LoopbackDatapath::load(Some(&server()));
    let dgram = f.udp_in(5353, b"hello");
    assert_eq!(dp.pod_receives(&dgram), ACCEPT);
    let err = packet::icmp_error(f.pod, &dgram, IcmpError::PortUnreachable);
    assert_eq!(dp.pod_sends(&err), ACCEPT);
    assert_eq!(dp.counters()[EGRESS].related, 1);
    assert!(dp.denials().is_empty());
}

fn error_about_the_pods_own_reply_is_related(f: Family) {
    // A router on the way back reports the pod's answer (not the peer's query) as undeliverable.
    let mut dp = LoopbackDatapath::load(Some(&server()));
    dp.pod_receives(&f.udp_in(5353, b"hello"));
    let answer = f.udp_in_reply(5353, b"hi");
    assert_eq!(dp.pod_sends(&answer), ACCEPT);
    assert_related_in(
        &mut dp,
        &packet::icmp_error(f.router, &answer, IcmpError::HostUnreachable),
    );
}

fn error_quoting_an_untracked_flow_is_invalid_for_members(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    let err = packet::icmp_error(
        f.router,
        &f.udp_out(53, b"query"),
        IcmpError::PortUnreachable,
    );
    assert_eq!(dp.pod_receives(&err), DROP);
    let d = dp.assert_denied(DenyReason::UnrelatedIcmp);
    assert_eq!(d.proto, f.icmp_proto());
    let ing = dp.counters()[INGRESS];
    assert_eq!((ing.dropped_invalid, ing.related), (1, 0));
    assert!(dp.conns().is_empty(), "an error opens nothing");
}

fn error_quoting_an_untracked_flow_passes_a_non_member_as_invalid(f: Family) {
    let dp = LoopbackDatapath::load(None);
    let err = packet::icmp_error(
        f.router,
        &f.udp_out(53, b"query"),
        IcmpError::PortUnreachable,
    );
    assert_eq!(dp.pod_receives(&err), ACCEPT);
    let ing = dp.counters()[INGRESS];
    assert_eq!((ing.invalid_passed, ing.related), (1, 0));
    assert!(dp.conns().is_empty());
}

fn error_quoting_the_right_addresses_but_wrong_port_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    dp.pod_sends(&f.udp_out(53, b"query"));
    let other = packet::udp(f.pod, f.peer, 40001, 53, b"query");
    let err = packet::icmp_error(f.peer, &other, IcmpError::PortUnreachable);
    assert_eq!(dp.pod_receives(&err), DROP);
    dp.assert_denied(DenyReason::UnrelatedIcmp);
}

/// A host that is neither end of any flow here.
fn stranger(f: Family) -> IpAddr {
    f.addr("192.0.2.99", "2001:db8::99")
}

/// `error` with its outer destination address replaced by `to` (the quoted packet untouched).
fn readdressed(error: &[u8], to: IpAddr) -> Vec<u8> {
    let mut e = error.to_vec();
    match to {
        IpAddr::V4(a) => e[packet::ETH_LEN + 16..packet::ETH_LEN + 20].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => e[packet::ETH_LEN + 24..packet::ETH_LEN + 40].copy_from_slice(&a.octets()),
    }
    e
}

fn error_sent_by_the_pod_to_someone_else_than_the_quoted_sender_is_invalid(f: Family) {
    // nf_conntrack_inet_error: an error is RELATED only when it goes back to the sender of the
    // packet it quotes; otherwise a pod that may send nothing could reach any address with
    // "errors" about a flow it has.
    let mut dp = LoopbackDatapath::load(Some(&server()));
    let dgram = f.udp_in(5353, b"hello");
    assert_eq!(dp.pod_receives(&dgram), ACCEPT);
    let err = packet::icmp_error(f.pod, &dgram, IcmpError::PortUnreachable);
    let bogus = readdressed(&err, stranger(f));
    assert_eq!(dp.pod_sends(&bogus), DROP);
    dp.assert_denied(DenyReason::UnrelatedIcmp);
    assert_eq!(dp.counters()[EGRESS].related, 0);
    // The genuine error still passes.
    assert_eq!(dp.pod_sends(&err), ACCEPT);
}

fn error_received_for_someone_else_than_the_quoted_sender_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    let q = f.udp_out(53, b"query");
    dp.pod_sends(&q);
    let err = packet::icmp_error(f.router, &q, IcmpError::PortUnreachable);
    assert_eq!(dp.pod_receives(&readdressed(&err, stranger(f))), DROP);
    dp.assert_denied(DenyReason::UnrelatedIcmp);
    assert_eq!(dp.pod_receives(&err), ACCEPT);
}

#[test]
fn packet_too_big_quoting_a_segment_with_extension_headers_is_related() {
    kubesg_testkit::require_privileged!();
    // A path MTU black hole otherwise: the pod's TCP segments carry destination options and a
    // routing header, a router on the way cannot forward them and says so.
    let f = kubesg_testkit::family::V6;
    let mut dp = LoopbackDatapath::load(Some(&client()));
    let chain = [Ipv6Ext::DestinationOptions, Ipv6Ext::Routing];
    let syn = packet::with_ipv6_extensions(&f.tcp_out(80, TcpFlags::SYN), &chain);
    assert_eq!(dp.pod_sends(&syn), ACCEPT);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    let segment = packet::with_ipv6_extensions(&f.tcp_out(80, TcpFlags::ACK), &chain);
    assert_eq!(dp.pod_sends(&segment), ACCEPT);
    assert_related_in(
        &mut dp,
        &packet::icmp_error(f.router, &segment, IcmpError::PacketTooBig { mtu: 1280 }),
    );
}
