//! Conntrack timeouts through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): with tiny
//! timeouts set through the config map, an expired entry is treated as absent (its reply is
//! INVALID, a new packet starts a fresh connection), and `conntrack::sweep` removes exactly the
//! expired entries.

use std::{
    cell::Cell,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use kubesg_agent::{
    clock,
    conntrack::{self, Connection},
    datapath::{Datapath, DatapathOptions},
    events::{self, Denial},
    policy::{CompiledPolicy, PeerBlock, PortMatch, Protocol, Rule},
    testrun::test_run,
};
use kubesg_common::{
    config::{timeout, Config},
    conntrack::TcpState,
    event::{Counters, DenyReason},
    proto,
};
use kubesg_testkit::packet::{self, IcmpError, TcpFlags};

// --- Per-file harness -------------------------------------------------------------------------

const ACCEPT: i32 = -1;
const DROP: i32 = 2;
/// Loopback: BPF_PROG_TEST_RUN needs no device for it.
const IF: u32 = 1;
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

/// May send UDP to 53, TCP to 80 and pings; accepts nothing.
fn client() -> CompiledPolicy {
    let echo = |protocol, icmp_type| {
        rule(
            protocol,
            vec![PortMatch::Icmp {
                icmp_type,
                code: None,
            }],
        )
    };
    CompiledPolicy {
        egress: vec![
            rule(
                Protocol::Udp,
                vec![PortMatch::Range {
                    first: 53,
                    last: 53,
                }],
            ),
            rule(
                Protocol::Tcp,
                vec![PortMatch::Range {
                    first: 80,
                    last: 80,
                }],
            ),
            echo(Protocol::Icmp, 8),
            echo(Protocol::Icmpv6, 128),
        ],
        ..CompiledPolicy::default()
    }
}

const MS: u64 = 1_000_000;

/// Sets the timeouts of `slots` (TCP state numbers or `timeout::*`) to `ms` milliseconds, the
/// others keeping their defaults.
fn set_timeouts(dp: &mut Dp, slots: &[usize], ms: u64) {
    let mut cfg = Config::defaults();
    for s in slots {
        cfg.timeouts_ns[*s] = ms * MS;
    }
    dp.dp.set_config(&cfg).expect("writing the config");
}

/// Long enough for a 100 ms timeout to have passed, whatever the scheduler does.
fn wait_past_100ms() {
    std::thread::sleep(Duration::from_millis(250));
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

impl Fam {
    fn out(self, f: TcpFlags) -> Vec<u8> {
        packet::tcp(self.pod, self.peer, 40000, 80, f)
    }
    fn back(self, f: TcpFlags) -> Vec<u8> {
        packet::tcp(self.peer, self.pod, 80, 40000, f)
    }
    /// Pod:`sport` → peer:53.
    fn query(self, sport: u16) -> Vec<u8> {
        packet::udp(self.pod, self.peer, sport, 53, b"query")
    }
    fn answer(self, dport: u16) -> Vec<u8> {
        packet::udp(self.peer, self.pod, 53, dport, b"answer")
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
    syn_ack_after_the_syn_sent_timeout_is_invalid,
    data_after_the_established_timeout_is_invalid,
    query_after_the_udp_timeout_opens_a_fresh_connection,
    answer_after_the_udp_timeout_is_a_new_inbound_flow,
    echo_reply_after_the_icmp_timeout_is_invalid,
    icmp_error_about_an_expired_flow_is_invalid,
    expired_entry_is_absent_for_a_non_member_too,
    sweep_removes_exactly_the_expired_entries,
    sweep_keeps_an_entry_refreshed_before_its_timeout,
    sweep_removes_stale_fragment_records,
);

fn syn_ack_after_the_syn_sent_timeout_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    set_timeouts(&mut dp, &[TcpState::SynSent as usize], 100);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    dp.assert_expires_in(&dp.conn(), 100 * MS);
    wait_past_100ms();
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN_ACK)), DROP);
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 1);
}

fn data_after_the_established_timeout_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    set_timeouts(&mut dp, &[TcpState::Established as usize], 100);
    dp.pod_sends(&f.out(TcpFlags::SYN));
    dp.pod_receives(&f.back(TcpFlags::SYN_ACK));
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::ACK)), ACCEPT);
    assert_eq!(dp.conn().tcp_state(), Some(TcpState::Established));
    wait_past_100ms();
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::PSH_ACK)), DROP);
    dp.assert_denied(DenyReason::Invalid);
}

fn query_after_the_udp_timeout_opens_a_fresh_connection(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::UDP_UNREPLIED], 100);
    dp.pod_sends(&f.query(40000));
    dp.pod_receives(&f.answer(40000));
    let old = dp.conn();
    assert!(old.seen_reply());
    wait_past_100ms();
    assert_eq!(dp.pod_sends(&f.query(40000)), ACCEPT);
    let fresh = dp.conn();
    assert!(!fresh.seen_reply(), "a fresh connection is [UNREPLIED]");
    assert!(fresh.entry.created_ns > old.entry.expires_ns);
    dp.assert_expires_in(&fresh, 100 * MS);
    assert_eq!(dp.counters()[EGRESS].new_connections, 2);
}

fn answer_after_the_udp_timeout_is_a_new_inbound_flow(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::UDP_UNREPLIED], 100);
    dp.pod_sends(&f.query(40000));
    wait_past_100ms();
    assert_eq!(
        dp.pod_receives(&f.answer(40000)),
        DROP,
        "judged by the (empty) ingress rules"
    );
    dp.assert_denied(DenyReason::Policy);
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 1);
}

fn echo_reply_after_the_icmp_timeout_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::ICMP], 100);
    assert_eq!(
        dp.pod_sends(&packet::icmp_echo_request(f.pod, f.peer, 3, 1)),
        ACCEPT
    );
    dp.assert_expires_in(&dp.conn(), 100 * MS);
    wait_past_100ms();
    assert_eq!(
        dp.pod_receives(&packet::icmp_echo_reply(f.peer, f.pod, 3, 1)),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
}

fn icmp_error_about_an_expired_flow_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::UDP_UNREPLIED], 100);
    let q = f.query(40000);
    dp.pod_sends(&q);
    let err = packet::icmp_error(f.peer, &q, IcmpError::PortUnreachable);
    assert_eq!(
        dp.pod_receives(&err),
        ACCEPT,
        "RELATED while the flow lives"
    );
    wait_past_100ms();
    assert_eq!(dp.pod_receives(&err), DROP);
    dp.assert_denied(DenyReason::UnrelatedIcmp);
}

fn expired_entry_is_absent_for_a_non_member_too(f: Fam) {
    let mut dp = Dp::load(None);
    set_timeouts(&mut dp, &[TcpState::SynSent as usize], 100);
    dp.pod_sends(&f.out(TcpFlags::SYN));
    wait_past_100ms();
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN_ACK)), ACCEPT);
    let ing = dp.counters()[INGRESS];
    assert_eq!(
        ing.invalid_passed, 1,
        "the SYN/ACK belongs to nothing any more"
    );
    assert_eq!(
        dp.conn().tcp_state(),
        Some(TcpState::SynSent),
        "the INVALID SYN/ACK left the dead entry alone"
    );
}

fn sweep_removes_exactly_the_expired_entries(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::UDP_UNREPLIED, timeout::ICMP], 100);
    dp.pod_sends(&f.query(40000));
    dp.pod_sends(&f.query(40001));
    dp.pod_sends(&packet::icmp_echo_request(f.pod, f.peer, 3, 1));
    // Established TCP keeps its 5 days.
    dp.pod_sends(&f.out(TcpFlags::SYN));
    dp.pod_receives(&f.back(TcpFlags::SYN_ACK));
    dp.pod_sends(&f.out(TcpFlags::ACK));
    assert_eq!(dp.conns().len(), 4);
    wait_past_100ms();
    let removed = conntrack::sweep(dp.dp.maps_mut(), clock::now_ns()).expect("sweep");
    assert_eq!(removed, 3);
    let left = dp.conn();
    assert_eq!(left.key.proto, proto::TCP);
    assert_eq!(left.tcp_state(), Some(TcpState::Established));
    assert_eq!(
        conntrack::sweep(dp.dp.maps_mut(), clock::now_ns()).expect("sweep"),
        0
    );
    // The surviving connection still works.
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::PSH_ACK)), ACCEPT);
}

fn sweep_keeps_an_entry_refreshed_before_its_timeout(f: Fam) {
    // `sweep` takes the time to sweep at: the deadlines decide, not how long the test takes.
    let mut dp = Dp::load(Some(&client()));
    dp.pod_sends(&f.query(40000));
    let first = dp.conn().entry.expires_ns;
    // Let the datapath's coarse clock tick, so that the refresh moves the deadline.
    std::thread::sleep(Duration::from_millis(20));
    dp.pod_sends(&f.query(40000));
    let refreshed = dp.conn().entry.expires_ns;
    assert!(refreshed > first);
    assert_eq!(conntrack::sweep(dp.dp.maps_mut(), first).expect("sweep"), 0);
    assert_eq!(
        conntrack::sweep(dp.dp.maps_mut(), refreshed - 1).expect("sweep"),
        0,
        "alive until its deadline"
    );
    assert_eq!(dp.conns().len(), 1);
    assert_eq!(
        conntrack::sweep(dp.dp.maps_mut(), refreshed).expect("sweep"),
        1
    );
    assert!(dp.conns().is_empty());
}

fn sweep_removes_stale_fragment_records(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::FRAGMENT], 100);
    let dgram = packet::udp(f.pod, f.peer, 40000, 53, &[0; 200]);
    let [first, _] = packet::fragment(&dgram, 96, 7);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.dp.maps().fragments.iter().count(), 1);
    wait_past_100ms();
    conntrack::sweep(dp.dp.maps_mut(), clock::now_ns()).expect("sweep");
    assert_eq!(dp.dp.maps().fragments.iter().count(), 0);
    assert_eq!(dp.conns().len(), 1, "the connection (30 s) stays");
}
