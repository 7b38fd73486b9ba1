//! UDP, ICMP and ICMPv6 through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): UDP's
//! `[UNREPLIED]` / ESTABLISHED / `[ASSURED]` stream rule, ICMP echo flows keyed by identifier,
//! untracked neighbour discovery, and ICMP errors that are RELATED to a tracked flow or INVALID.

use std::{
    cell::Cell,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use kubesg_agent::{
    clock,
    conntrack::{self, Connection, Tuple},
    datapath::{Datapath, DatapathOptions},
    events::{self, Denial},
    policy::{CompiledPolicy, PeerBlock, PortMatch, Protocol, Rule},
    testrun::test_run,
};
use kubesg_common::{
    config::Config,
    event::{Counters, DenyReason},
    proto, Direction,
};
use kubesg_testkit::packet::{self, IcmpError, TcpFlags};

// --- Per-file harness -------------------------------------------------------------------------

const ACCEPT: i32 = -1;
const DROP: i32 = 2;
/// Loopback: BPF_PROG_TEST_RUN needs no device for it.
const IF: u32 = 1;
const SEC: u64 = 1_000_000_000;
const EGRESS: usize = 0;
const INGRESS: usize = 1;

/// One private datapath with the endpoint on ifindex 1.
struct Dp {
    dp: Datapath,
    events: RingBuf<MapData>,
    /// CLOCK_MONOTONIC just before and after the last run: the datapath's `now` lies within.
    window: Cell<(u64, u64)>,
}

impl Dp {
    /// A member of `policy`, or a non-member with `None`.
    fn load(policy: Option<&CompiledPolicy>) -> Self {
        let mut dp = Datapath::load(&DatapathOptions::default()).expect("loading the datapath");
        let handle = policy.map(|p| dp.install_policy(p).expect("installing the policy"));
        dp.set_endpoint(IF, handle)
            .expect("registering the endpoint");
        let events = dp.take_events().expect("the deny-event ring");
        Dp {
            dp,
            events,
            window: Cell::new((0, 0)),
        }
    }

    fn run(&self, prog: &'static str, frame: &[u8]) -> i32 {
        let fd = self.dp.program_fd(prog).expect("program fd");
        let before = clock::now_ns();
        let r = test_run(fd, frame, IF, 1).expect("BPF_PROG_TEST_RUN");
        self.window.set((before, clock::now_ns()));
        r.retval
    }

    /// Runs `frame` as sent by the pod.
    fn pod_sends(&self, frame: &[u8]) -> i32 {
        self.run("from_pod", frame)
    }

    /// Runs `frame` as received by the pod.
    fn pod_receives(&self, frame: &[u8]) -> i32 {
        self.run("to_pod", frame)
    }

    fn conns(&self) -> Vec<Connection> {
        conntrack::list(self.dp.maps()).expect("listing conntrack")
    }

    /// The one tracked connection.
    fn conn(&self) -> Connection {
        let c = self.conns();
        assert_eq!(c.len(), 1, "expected exactly one entry: {c:#?}");
        c[0]
    }

    fn counters(&self) -> [Counters; 2] {
        self.dp
            .counters(IF)
            .expect("reading counters")
            .expect("endpoint registered")
    }

    fn denials(&mut self) -> Vec<Denial> {
        events::drain(&mut self.events)
    }

    /// The single deny event since the last call has `reason`.
    fn assert_denied(&mut self, reason: DenyReason) -> Denial {
        let d = self.denials();
        assert_eq!(d.len(), 1, "expected one deny event: {d:#?}");
        assert_eq!(d[0].reason, Some(reason), "{d:#?}");
        d[0].clone()
    }

    /// `c` expires `timeout_ns` after the last run.
    fn assert_expires_in(&self, c: &Connection, timeout_ns: u64) {
        let (before, after) = self.window.get();
        let e = c.entry.expires_ns;
        assert!(
            before + timeout_ns <= e && e <= after + timeout_ns,
            "expires_ns {e} is not last run + {timeout_ns} ns ({before}..{after})"
        );
    }
}

/// Lets the datapath's clock (CLOCK_MONOTONIC_COARSE, one tick of resolution) move on, so that a
/// timeout the next packet renews differs from the one before it.
fn next_tick() {
    std::thread::sleep(std::time::Duration::from_millis(20));
}

fn anywhere() -> Vec<PeerBlock> {
    vec![
        PeerBlock::cidr("0.0.0.0/0".parse().expect("cidr")),
        PeerBlock::cidr("::/0".parse().expect("cidr")),
    ]
}

/// A rule of `protocol` on `ports` (empty: all) with any peer.
fn rule(protocol: Protocol, ports: Vec<PortMatch>) -> Rule {
    Rule {
        protocol,
        ports,
        peers: anywhere(),
    }
}

fn port(p: u16) -> PortMatch {
    PortMatch::Range { first: p, last: p }
}

/// The echo request rules of both families.
fn echo_requests() -> Vec<Rule> {
    vec![
        rule(
            Protocol::Icmp,
            vec![PortMatch::Icmp {
                icmp_type: 8,
                code: None,
            }],
        ),
        rule(
            Protocol::Icmpv6,
            vec![PortMatch::Icmp {
                icmp_type: 128,
                code: None,
            }],
        ),
    ]
}

/// May send DNS queries (UDP 53), ping, and open TCP to port 80; accepts nothing.
fn client() -> CompiledPolicy {
    let mut egress = vec![
        rule(Protocol::Udp, vec![port(53)]),
        rule(Protocol::Tcp, vec![port(80)]),
    ];
    egress.extend(echo_requests());
    CompiledPolicy {
        egress,
        ..CompiledPolicy::default()
    }
}

/// Accepts UDP on 5353 and pings; opens nothing.
fn server() -> CompiledPolicy {
    let mut ingress = vec![rule(Protocol::Udp, vec![port(5353)])];
    ingress.extend(echo_requests());
    CompiledPolicy {
        ingress,
        ..CompiledPolicy::default()
    }
}

/// Allows every connection both ways: whatever such a member drops, it drops for being INVALID.
fn allow_all() -> CompiledPolicy {
    CompiledPolicy {
        ingress: vec![rule(Protocol::Any, vec![])],
        egress: vec![rule(Protocol::Any, vec![])],
        stateless: false,
    }
}

#[derive(Clone, Copy, Debug)]
struct Fam {
    pod: IpAddr,
    peer: IpAddr,
    /// A router between them, the source of ICMP errors.
    router: IpAddr,
}

const V4: Fam = Fam {
    pod: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
    peer: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 7)),
    router: IpAddr::V4(Ipv4Addr::new(10, 0, 9, 1)),
};
const V6: Fam = Fam {
    pod: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5)),
    peer: IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 7)),
    router: IpAddr::V6(Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1)),
};

impl Fam {
    /// Pod:40000 → peer:53.
    fn query(self) -> Vec<u8> {
        packet::udp(self.pod, self.peer, 40000, 53, b"query")
    }
    /// Peer:53 → pod:40000, the answer to `query`.
    fn answer(self) -> Vec<u8> {
        packet::udp(self.peer, self.pod, 53, 40000, b"answer")
    }
    /// Peer:50000 → pod:5353, a datagram the pod did not ask for.
    fn inbound(self) -> Vec<u8> {
        packet::udp(self.peer, self.pod, 50000, 5353, b"hello")
    }
    /// The pod pings the peer with identifier `id`.
    fn ping(self, id: u16) -> Vec<u8> {
        packet::icmp_echo_request(self.pod, self.peer, id, 1)
    }
    /// The peer answers the pod's ping `id`.
    fn pong(self, id: u16) -> Vec<u8> {
        packet::icmp_echo_reply(self.peer, self.pod, id, 1)
    }
    fn icmp_proto(self) -> u8 {
        match self.pod {
            IpAddr::V4(_) => proto::ICMP,
            IpAddr::V6(_) => proto::ICMPV6,
        }
    }
    fn echo_request_type(self) -> u16 {
        match self.pod {
            IpAddr::V4(_) => 8,
            IpAddr::V6(_) => 128,
        }
    }
}

/// Runs every test body once over IPv4 and once over IPv6.
macro_rules! ipv4_and_ipv6 {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn ipv4() {
                kubesg_testkit::require_privileged!();
                super::$name(super::V4);
            }
            #[test]
            fn ipv6() {
                kubesg_testkit::require_privileged!();
                super::$name(super::V6);
            }
        }
    )*};
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

fn first_udp_packet_is_new_and_unreplied(f: Fam) {
    let dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.query()), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.key.proto, proto::UDP);
    assert_eq!(c.tcp_state(), None);
    assert!(!c.seen_reply(), "[UNREPLIED]");
    assert!(!c.assured());
    assert_eq!(c.entry.orig_direction(), Direction::Egress);
    assert_eq!(
        c.original(),
        Tuple {
            src: f.pod,
            dst: f.peer,
            sport: 40000,
            dport: 53
        }
    );
    dp.assert_expires_in(&c, 30 * SEC);
    assert_eq!(dp.counters()[EGRESS].new_connections, 1);
}

fn more_packets_without_reply_stay_unreplied(f: Fam) {
    let dp = Dp::load(Some(&client()));
    dp.pod_sends(&f.query());
    assert_eq!(dp.pod_sends(&f.query()), ACCEPT);
    let c = dp.conn();
    assert!(!c.seen_reply());
    dp.assert_expires_in(&c, 30 * SEC);
    assert_eq!(dp.counters()[EGRESS].new_connections, 1);
}

fn udp_reply_establishes_without_assuring_and_keeps_the_short_timeout(f: Fam) {
    let dp = Dp::load(Some(&client()));
    dp.pod_sends(&f.query());
    assert_eq!(dp.pod_receives(&f.answer()), ACCEPT);
    let c = dp.conn();
    assert!(c.seen_reply(), "no more [UNREPLIED]");
    assert!(!c.assured(), "a single exchange is not a stream");
    dp.assert_expires_in(&c, 30 * SEC);
}

fn udp_reply_passes_a_member_allowing_nothing_inbound(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    dp.pod_sends(&f.query());
    assert_eq!(dp.pod_receives(&f.answer()), ACCEPT);
    assert_eq!(dp.pod_receives(&f.answer()), ACCEPT);
    let ing = dp.counters()[INGRESS];
    assert_eq!(
        (ing.accepted, ing.dropped_policy, ing.new_connections),
        (2, 0, 0)
    );
    assert!(dp.denials().is_empty());
}

/// A short stream delay, so that a test can wait it out.
fn short_stream_delay(dp: &mut Dp) {
    let cfg = Config {
        udp_stream_after_ns: 200_000_000,
        ..Config::defaults()
    };
    dp.dp.set_config(&cfg).expect("writing the config");
}

fn udp_stream_is_assured_after_the_stream_delay(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    short_stream_delay(&mut dp);
    dp.pod_sends(&f.query());
    dp.pod_receives(&f.answer());
    assert!(!dp.conn().assured());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dp.pod_sends(&f.query()), ACCEPT);
    let c = dp.conn();
    assert!(
        c.assured(),
        "traffic after the stream delay makes it [ASSURED]"
    );
    dp.assert_expires_in(&c, 120 * SEC);
}

fn late_first_reply_is_not_yet_assured_but_the_next_packet_is(f: Fam) {
    // nf_conntrack_proto_udp.c looks at IPS_SEEN_REPLY before the reply sets it.
    let mut dp = Dp::load(Some(&client()));
    short_stream_delay(&mut dp);
    dp.pod_sends(&f.query());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dp.pod_receives(&f.answer()), ACCEPT);
    let c = dp.conn();
    assert!(c.seen_reply());
    assert!(!c.assured());
    dp.assert_expires_in(&c, 30 * SEC);
    assert_eq!(dp.pod_sends(&f.query()), ACCEPT);
    let c = dp.conn();
    assert!(c.assured());
    dp.assert_expires_in(&c, 120 * SEC);
}

fn udp_traffic_within_the_stream_delay_is_not_assured(f: Fam) {
    // Default delay: 2 s, far longer than these four packets take.
    let dp = Dp::load(Some(&client()));
    for _ in 0..2 {
        assert_eq!(dp.pod_sends(&f.query()), ACCEPT);
        assert_eq!(dp.pod_receives(&f.answer()), ACCEPT);
    }
    let c = dp.conn();
    assert!(c.seen_reply());
    assert!(!c.assured());
    dp.assert_expires_in(&c, 30 * SEC);
}

fn inbound_udp_without_outbound_is_new_and_refused_by_ingress_rules(f: Fam) {
    // The pod's client policy allows UDP to port 53, but an answer-shaped datagram nobody asked
    // for is a NEW inbound flow, judged by (empty) ingress rules.
    let mut dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_receives(&f.answer()), DROP);
    let d = dp.assert_denied(DenyReason::Policy);
    assert_eq!(d.direction, Direction::Ingress);
    assert_eq!((d.sport, d.dport), (53, 40000));
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 1);
    assert!(dp.conns().is_empty());
}

fn inbound_udp_allowed_by_ingress_rules_opens_an_ingress_flow(f: Fam) {
    let dp = Dp::load(Some(&server()));
    assert_eq!(dp.pod_receives(&f.inbound()), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.entry.orig_direction(), Direction::Ingress);
    assert!(!c.seen_reply());
    assert_eq!(
        c.original(),
        Tuple {
            src: f.peer,
            dst: f.pod,
            sport: 50000,
            dport: 5353
        }
    );
    // The pod's answer is the reply: it passes although the pod may open nothing.
    let answer = packet::udp(f.pod, f.peer, 5353, 50000, b"hi");
    assert_eq!(dp.pod_sends(&answer), ACCEPT);
    assert!(dp.conn().seen_reply());
    assert_eq!(dp.counters()[INGRESS].new_connections, 1);
}

fn datagram_to_another_local_port_is_not_a_reply(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    dp.pod_sends(&f.query());
    let other = packet::udp(f.peer, f.pod, 53, 40001, b"answer");
    assert_eq!(dp.pod_receives(&other), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert!(!dp.conn().seen_reply());
}

fn non_member_tracks_inbound_udp(f: Fam) {
    let dp = Dp::load(None);
    assert_eq!(dp.pod_receives(&f.answer()), ACCEPT);
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

fn echo_request_opens_a_flow_keyed_by_its_identifier(f: Fam) {
    let dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.ping(0x1234)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.key.proto, f.icmp_proto());
    assert!(!c.seen_reply());
    assert_eq!(c.entry.orig_direction(), Direction::Egress);
    let o = c.original();
    assert_eq!((o.src, o.dst), (f.pod, f.peer));
    assert_eq!((o.sport, o.dport), (0x1234, f.echo_request_type()));
    dp.assert_expires_in(&c, 30 * SEC);
    // A second ping with another identifier is another flow.
    assert_eq!(dp.pod_sends(&f.ping(0x1235)), ACCEPT);
    assert_eq!(dp.conns().len(), 2);
}

fn echo_reply_establishes_the_flow_through_a_member_allowing_nothing_inbound(f: Fam) {
    let dp = Dp::load(Some(&client()));
    dp.pod_sends(&f.ping(7));
    assert_eq!(dp.pod_receives(&f.pong(7)), ACCEPT);
    let c = dp.conn();
    assert!(c.seen_reply());
    dp.assert_expires_in(&c, 30 * SEC);
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 0);
}

fn echo_reply_with_another_identifier_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&allow_all()));
    dp.pod_sends(&f.ping(7));
    assert_eq!(dp.pod_receives(&f.pong(8)), DROP);
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 1);
    assert!(!dp.conn().seen_reply());
}

fn echo_reply_without_request_passes_a_non_member_as_invalid(f: Fam) {
    let dp = Dp::load(None);
    assert_eq!(dp.pod_receives(&f.pong(7)), ACCEPT);
    let ing = dp.counters()[INGRESS];
    assert_eq!((ing.invalid_passed, ing.new_connections), (1, 0));
    assert!(dp.conns().is_empty());
}

fn inbound_echo_request_is_judged_by_ingress_rules(f: Fam) {
    let ping_in = packet::icmp_echo_request(f.peer, f.pod, 99, 1);
    let mut dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_receives(&ping_in), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert!(dp.conns().is_empty());

    let dp = Dp::load(Some(&server()));
    assert_eq!(dp.pod_receives(&ping_in), ACCEPT);
    assert_eq!(dp.conn().entry.orig_direction(), Direction::Ingress);
    // The pod's echo reply passes although it may send nothing.
    let pong_out = packet::icmp_echo_reply(f.pod, f.peer, 99, 1);
    assert_eq!(dp.pod_sends(&pong_out), ACCEPT);
    assert!(dp.conn().seen_reply());
}

/// An ICMP type conntrack does not know: 253 (RFC 3692 experiment) for ICMP, 200 (private
/// experimentation) for ICMPv6.
fn unknown_icmp(f: Fam) -> Vec<u8> {
    let t = match f.pod {
        IpAddr::V4(_) => 253,
        IpAddr::V6(_) => 200,
    };
    packet::icmp_raw(f.pod, f.peer, t, 0, [0; 4], b"x")
}

fn unknown_icmp_type_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&allow_all()));
    assert_eq!(dp.pod_sends(&unknown_icmp(f)), DROP);
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(dp.counters()[EGRESS].dropped_invalid, 1);
    assert!(dp.conns().is_empty());
}

fn unknown_icmp_type_passes_a_non_member_as_invalid(f: Fam) {
    let dp = Dp::load(None);
    assert_eq!(dp.pod_sends(&unknown_icmp(f)), ACCEPT);
    assert_eq!(dp.counters()[EGRESS].invalid_passed, 1);
    assert!(dp.conns().is_empty());
}

// --- ICMPv6 neighbour discovery ---------------------------------------------------------------

fn pod6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5)
}
fn peer6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)
}

#[test]
fn neighbor_solicitation_and_advertisement_pass_a_deny_all_member_untracked() {
    kubesg_testkit::require_privileged!();
    let mut dp = Dp::load(Some(&CompiledPolicy::default()));
    let (pod, peer) = (pod6(), peer6());
    assert_eq!(
        dp.pod_sends(&packet::neighbor_solicitation(pod, peer)),
        ACCEPT
    );
    assert_eq!(
        dp.pod_receives(&packet::neighbor_advertisement(peer, pod)),
        ACCEPT
    );
    assert_eq!(
        dp.pod_receives(&packet::neighbor_solicitation(peer, pod)),
        ACCEPT
    );
    assert_eq!(
        dp.pod_sends(&packet::neighbor_advertisement(pod, peer)),
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
    let dp = Dp::load(Some(&CompiledPolicy::default()));
    let all_routers: IpAddr = "ff02::2".parse().expect("address");
    let mld_routers: IpAddr = "ff02::16".parse().expect("address");
    let rs = packet::icmp_raw(pod6().into(), all_routers, 133, 0, [0; 4], &[]);
    let mld2 = packet::icmp_raw(pod6().into(), mld_routers, 143, 0, [0; 4], &[]);
    assert_eq!(dp.pod_sends(&rs), ACCEPT);
    assert_eq!(dp.pod_sends(&mld2), ACCEPT);
    assert!(dp.conns().is_empty());
}

#[test]
fn icmpv6_redirect_is_invalid_not_untracked() {
    kubesg_testkit::require_privileged!();
    // Type 137 is neighbour discovery too, but nf_conntrack does not exempt it.
    let mut dp = Dp::load(Some(&allow_all()));
    let redirect = packet::icmp_raw(peer6().into(), pod6().into(), 137, 0, [0; 4], &[0; 32]);
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
fn assert_related_in(dp: &mut Dp, error: &[u8]) {
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

fn port_unreachable_quoting_a_tracked_udp_flow_is_related(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    let q = f.query();
    dp.pod_sends(&q);
    assert_related_in(
        &mut dp,
        &packet::icmp_error(f.peer, &q, IcmpError::PortUnreachable),
    );
}

fn time_exceeded_quoting_a_tracked_tcp_syn_is_related(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    let syn = packet::tcp(f.pod, f.peer, 40000, 80, TcpFlags::SYN);
    dp.pod_sends(&syn);
    assert_related_in(
        &mut dp,
        &packet::icmp_error(f.router, &syn, IcmpError::TimeExceeded),
    );
}

fn packet_too_big_quoting_a_tracked_tcp_segment_is_related(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    dp.pod_sends(&packet::tcp(f.pod, f.peer, 40000, 80, TcpFlags::SYN));
    dp.pod_receives(&packet::tcp(f.peer, f.pod, 80, 40000, TcpFlags::SYN_ACK));
    let data = packet::tcp(f.pod, f.peer, 40000, 80, TcpFlags::PSH_ACK);
    dp.pod_sends(&data);
    let ptb = packet::icmp_error(f.router, &data, IcmpError::PacketTooBig { mtu: 1280 });
    assert_related_in(&mut dp, &ptb);
}

fn error_quoting_a_tracked_echo_request_is_related(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    let ping = f.ping(42);
    dp.pod_sends(&ping);
    assert_related_in(
        &mut dp,
        &packet::icmp_error(f.router, &ping, IcmpError::HostUnreachable),
    );
}

fn every_error_kind_quoting_a_tracked_flow_is_related(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    let q = f.query();
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

fn error_sent_by_the_pod_about_an_inbound_flow_is_related(f: Fam) {
    // The server may open nothing, but its port unreachable about a datagram it accepted is
    // RELATED.
    let mut dp = Dp::load(Some(&server()));
    let dgram = f.inbound();
    assert_eq!(dp.pod_receives(&dgram), ACCEPT);
    let err = packet::icmp_error(f.pod, &dgram, IcmpError::PortUnreachable);
    assert_eq!(dp.pod_sends(&err), ACCEPT);
    assert_eq!(dp.counters()[EGRESS].related, 1);
    assert!(dp.denials().is_empty());
}

fn error_about_the_pods_own_reply_is_related(f: Fam) {
    // A router on the way back reports the pod's answer (not the peer's query) as undeliverable.
    let mut dp = Dp::load(Some(&server()));
    dp.pod_receives(&f.inbound());
    let answer = packet::udp(f.pod, f.peer, 5353, 50000, b"hi");
    assert_eq!(dp.pod_sends(&answer), ACCEPT);
    assert_related_in(
        &mut dp,
        &packet::icmp_error(f.router, &answer, IcmpError::HostUnreachable),
    );
}

fn error_quoting_an_untracked_flow_is_invalid_for_members(f: Fam) {
    let mut dp = Dp::load(Some(&allow_all()));
    let err = packet::icmp_error(f.router, &f.query(), IcmpError::PortUnreachable);
    assert_eq!(dp.pod_receives(&err), DROP);
    let d = dp.assert_denied(DenyReason::UnrelatedIcmp);
    assert_eq!(d.proto, f.icmp_proto());
    let ing = dp.counters()[INGRESS];
    assert_eq!((ing.dropped_invalid, ing.related), (1, 0));
    assert!(dp.conns().is_empty(), "an error opens nothing");
}

fn error_quoting_an_untracked_flow_passes_a_non_member_as_invalid(f: Fam) {
    let dp = Dp::load(None);
    let err = packet::icmp_error(f.router, &f.query(), IcmpError::PortUnreachable);
    assert_eq!(dp.pod_receives(&err), ACCEPT);
    let ing = dp.counters()[INGRESS];
    assert_eq!((ing.invalid_passed, ing.related), (1, 0));
    assert!(dp.conns().is_empty());
}

fn error_quoting_the_right_addresses_but_wrong_port_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    dp.pod_sends(&f.query());
    let other = packet::udp(f.pod, f.peer, 40001, 53, b"query");
    let err = packet::icmp_error(f.peer, &other, IcmpError::PortUnreachable);
    assert_eq!(dp.pod_receives(&err), DROP);
    dp.assert_denied(DenyReason::UnrelatedIcmp);
}

/// A host that is neither end of any flow here.
fn stranger(f: Fam) -> IpAddr {
    match f.pod {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99)),
    }
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

fn error_sent_by_the_pod_to_someone_else_than_the_quoted_sender_is_invalid(f: Fam) {
    // nf_conntrack_inet_error: an error is RELATED only when it goes back to the sender of the
    // packet it quotes; otherwise a pod that may send nothing could reach any address with
    // "errors" about a flow it has.
    let mut dp = Dp::load(Some(&server()));
    let dgram = f.inbound();
    assert_eq!(dp.pod_receives(&dgram), ACCEPT);
    let err = packet::icmp_error(f.pod, &dgram, IcmpError::PortUnreachable);
    let bogus = readdressed(&err, stranger(f));
    assert_eq!(dp.pod_sends(&bogus), DROP);
    dp.assert_denied(DenyReason::UnrelatedIcmp);
    assert_eq!(dp.counters()[EGRESS].related, 0);
    // The genuine error still passes.
    assert_eq!(dp.pod_sends(&err), ACCEPT);
}

fn error_received_for_someone_else_than_the_quoted_sender_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    let q = f.query();
    dp.pod_sends(&q);
    let err = packet::icmp_error(f.router, &q, IcmpError::PortUnreachable);
    assert_eq!(dp.pod_receives(&readdressed(&err, stranger(f))), DROP);
    dp.assert_denied(DenyReason::UnrelatedIcmp);
    assert_eq!(dp.pod_receives(&err), ACCEPT);
}
