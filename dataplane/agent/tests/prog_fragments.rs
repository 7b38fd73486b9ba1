//! IP fragments through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): later fragments
//! carry no ports, so they follow the verdict their datagram's first fragment got; without a first
//! fragment they are dropped on members and passed on non-members. IPv4 and IPv6 (Fragment
//! extension header).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use kubesg_agent::{
    conntrack::{self, Connection},
    datapath::{Datapath, DatapathOptions},
    events::{self, Denial},
    policy::{CompiledPolicy, PeerBlock, PortMatch, Protocol, Rule},
    testrun::test_run,
};
use kubesg_common::{
    config::{timeout, Config},
    event::{Counters, DenyReason},
    proto, Direction,
};
use kubesg_testkit::packet::{self, Ipv6Ext, TcpFlags};

// --- Per-file harness -------------------------------------------------------------------------

const ACCEPT: i32 = -1;
const DROP: i32 = 2;
/// Loopback: BPF_PROG_TEST_RUN needs no device for it.
const IF: u32 = 1;
const EGRESS: usize = 0;

/// One private datapath with the endpoint on ifindex 1.
struct Dp {
    dp: Datapath,
    events: RingBuf<MapData>,
}

impl Dp {
    /// A member of `policy`, or a non-member with `None`.
    fn load(policy: Option<&CompiledPolicy>) -> Self {
        let mut dp = Datapath::load(&DatapathOptions::default()).expect("loading the datapath");
        let handle = policy.map(|p| dp.install_policy(p).expect("installing the policy"));
        dp.set_endpoint(IF, handle)
            .expect("registering the endpoint");
        let events = dp.take_events().expect("the deny-event ring");
        Dp { dp, events }
    }

    fn run(&self, prog: &'static str, frame: &[u8]) -> i32 {
        let fd = self.dp.program_fd(prog).expect("program fd");
        test_run(fd, frame, IF, 1)
            .expect("BPF_PROG_TEST_RUN")
            .retval
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
}

fn anywhere() -> Vec<PeerBlock> {
    vec![
        PeerBlock::cidr("0.0.0.0/0".parse().expect("cidr")),
        PeerBlock::cidr("::/0".parse().expect("cidr")),
    ]
}

/// A rule of `protocol` on port `p` with any peer.
fn rule(protocol: Protocol, p: u16) -> Rule {
    Rule {
        protocol,
        ports: vec![PortMatch::Range { first: p, last: p }],
        peers: anywhere(),
    }
}

/// May send UDP to port 53 and TCP to port 80, and ping; accepts UDP on 5353.
fn policy() -> CompiledPolicy {
    let echo = |protocol, icmp_type| Rule {
        protocol,
        ports: vec![PortMatch::Icmp {
            icmp_type,
            code: None,
        }],
        peers: anywhere(),
    };
    CompiledPolicy {
        egress: vec![
            rule(Protocol::Udp, 53),
            rule(Protocol::Tcp, 80),
            echo(Protocol::Icmp, 8),
            echo(Protocol::Icmpv6, 128),
        ],
        ingress: vec![rule(Protocol::Udp, 5353)],
        stateless: false,
    }
}

#[derive(Clone, Copy, Debug)]
struct Fam {
    pod: IpAddr,
    peer: IpAddr,
}

const V4: Fam = Fam {
    pod: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
    peer: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 7)),
};
const V6: Fam = Fam {
    pod: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5)),
    peer: IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 7)),
};

const PAYLOAD: [u8; 200] = [0x42; 200];

impl Fam {
    /// A 208-byte UDP datagram from pod:40000 to peer:`port`, cut after 96 bytes.
    fn udp_fragments(self, port: u16, id: u32) -> [Vec<u8>; 2] {
        let dgram = packet::udp(self.pod, self.peer, 40000, port, &PAYLOAD);
        packet::fragment(&dgram, 96, id)
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

fn later_fragment_follows_an_accepted_first_fragment(f: Fam) {
    let mut dp = Dp::load(Some(&policy()));
    let [first, later] = f.udp_fragments(53, 0x1234);
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

fn later_fragment_of_a_refused_datagram_is_dropped(f: Fam) {
    let mut dp = Dp::load(Some(&policy()));
    let [first, later] = f.udp_fragments(54, 0x1234);
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

fn later_fragment_without_its_first_fragment_is_dropped_for_members(f: Fam) {
    let mut dp = Dp::load(Some(&policy()));
    let [_, later] = f.udp_fragments(53, 0x1234);
    assert_eq!(dp.pod_sends(&later), DROP);
    dp.assert_denied(DenyReason::Fragment);
    assert_eq!(dp.counters()[EGRESS].dropped_invalid, 1);
    assert!(dp.conns().is_empty());
}

fn later_fragment_without_its_first_fragment_passes_a_non_member(f: Fam) {
    let mut dp = Dp::load(None);
    let [_, later] = f.udp_fragments(53, 0x1234);
    assert_eq!(dp.pod_sends(&later), ACCEPT);
    let eg = dp.counters()[EGRESS];
    assert_eq!((eg.accepted, eg.invalid_passed), (1, 1));
    assert!(dp.denials().is_empty());
    assert!(dp.conns().is_empty());
}

fn later_fragment_of_another_datagram_does_not_follow_the_first(f: Fam) {
    let mut dp = Dp::load(Some(&policy()));
    let [first, _] = f.udp_fragments(53, 1);
    let [_, other_later] = f.udp_fragments(53, 2);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.pod_sends(&other_later), DROP);
    dp.assert_denied(DenyReason::Fragment);
}

fn later_fragment_from_another_source_does_not_follow_the_first(f: Fam) {
    let mut dp = Dp::load(Some(&policy()));
    let [first, _] = f.udp_fragments(53, 1);
    let stranger = Fam {
        pod: match f.pod {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 6)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 6)),
        },
        peer: f.peer,
    };
    let [_, spoofed_later] = stranger.udp_fragments(53, 1);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.pod_sends(&spoofed_later), DROP);
    dp.assert_denied(DenyReason::Fragment);
}

fn fragmented_reply_of_an_established_flow_passes(f: Fam) {
    // The pod may receive nothing NEW; the big answer to its query is ESTABLISHED.
    let mut dp = Dp::load(Some(&policy()));
    assert_eq!(
        dp.pod_sends(&packet::udp(f.pod, f.peer, 40000, 53, b"query")),
        ACCEPT
    );
    let answer = packet::udp(f.peer, f.pod, 53, 40000, &PAYLOAD);
    let [first, later] = packet::fragment(&answer, 96, 77);
    assert_eq!(dp.pod_receives(&first), ACCEPT);
    assert_eq!(dp.pod_receives(&later), ACCEPT);
    assert!(dp.conn().seen_reply());
    assert!(dp.denials().is_empty());
}

fn fragmented_inbound_datagram_allowed_by_ingress_rules_passes(f: Fam) {
    let mut dp = Dp::load(Some(&policy()));
    let dgram = packet::udp(f.peer, f.pod, 50000, 5353, &PAYLOAD);
    let [first, later] = packet::fragment(&dgram, 96, 78);
    assert_eq!(dp.pod_receives(&first), ACCEPT);
    assert_eq!(dp.pod_receives(&later), ACCEPT);
    assert_eq!(dp.conn().entry.orig_direction(), Direction::Ingress);
    let refused = packet::udp(f.peer, f.pod, 50000, 5354, &PAYLOAD);
    let [first, later] = packet::fragment(&refused, 96, 79);
    assert_eq!(dp.pod_receives(&first), DROP);
    assert_eq!(dp.pod_receives(&later), DROP);
    assert_eq!(dp.denials().len(), 2);
}

fn fragmented_echo_request_passes(f: Fam) {
    let mut dp = Dp::load(Some(&policy()));
    let echo_type = if f.pod.is_ipv6() { 128 } else { 8 };
    let ping = packet::icmp_raw(f.pod, f.peer, echo_type, 0, [0, 9, 0, 1], &PAYLOAD);
    let [first, later] = packet::fragment(&ping, 64, 80);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.pod_sends(&later), ACCEPT);
    assert_eq!(dp.conn().key.pod_port, 9, "tracked by its identifier");
    assert!(dp.denials().is_empty());
}

fn first_fragment_too_short_for_the_tcp_header_is_malformed(f: Fam) {
    // RFC 1858's tiny fragment: the first fragment stops inside the TCP header, so the flags and
    // ports of the rest cannot be judged.
    let mut dp = Dp::load(Some(&policy()));
    let syn = packet::tcp(f.pod, f.peer, 40000, 80, TcpFlags::SYN);
    let [first, later] = packet::fragment(&syn, 8, 81);
    assert_eq!(dp.pod_sends(&first), DROP);
    dp.assert_denied(DenyReason::Malformed);
    assert_eq!(dp.pod_sends(&later), DROP);
    dp.assert_denied(DenyReason::Fragment);
    assert!(dp.conns().is_empty());
}

fn later_fragment_after_the_fragment_timeout_is_dropped(f: Fam) {
    let mut dp = Dp::load(Some(&policy()));
    let mut cfg = Config::defaults();
    cfg.timeouts_ns[timeout::FRAGMENT] = 100_000_000;
    dp.dp.set_config(&cfg).expect("config");
    let [first, later] = f.udp_fragments(53, 0x99);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(dp.pod_sends(&later), DROP);
    dp.assert_denied(DenyReason::Fragment);
}

#[test]
fn ipv6_atomic_fragment_is_an_ordinary_packet() {
    kubesg_testkit::require_privileged!();
    let mut dp = Dp::load(Some(&policy()));
    let q = packet::udp(V6.pod, V6.peer, 40000, 53, b"query");
    assert_eq!(dp.pod_sends(&packet::ipv6_atomic_fragment(&q, 5)), ACCEPT);
    assert_eq!(dp.conn().key.peer_port, 53);
    let refused = packet::udp(V6.pod, V6.peer, 40000, 54, b"query");
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
    let mut dp = Dp::load(Some(&policy()));
    let dgram = packet::udp(V6.pod, V6.peer, 40000, 53, &PAYLOAD);
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
    let mut dp = Dp::load(Some(&policy()));
    let dgram = packet::udp(V6.pod, V6.peer, 40000, 54, &PAYLOAD);
    let dgram = packet::with_ipv6_extensions(&dgram, &[Ipv6Ext::DestinationOptions]);
    let [first, later] = packet::fragment(&dgram, 96, 0x4243);
    assert_eq!(dp.pod_sends(&first), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert_eq!(dp.pod_sends(&later), DROP);
    dp.assert_denied(DenyReason::Fragment);
}
