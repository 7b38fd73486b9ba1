//! TCP through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): every nf_conntrack state
//! a real exchange produces, the per-packet ctstate (NEW until a reply, ESTABLISHED from it) as a
//! member's rules observe it, and INVALID segments.

use std::{
    cell::Cell,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{MapData, RingBuf};
use kubesg_agent::{
    clock,
    conntrack::{self, Connection, Tuple},
    datapath::{Datapath, DatapathOptions, PolicyHandle},
    events::{self, Denial},
    policy::{CompiledPolicy, PeerBlock, PortMatch, Protocol, Rule},
    testrun::test_run,
};
use kubesg_common::{
    config::CFG_RECHECK_ON_POLICY_CHANGE,
    conntrack::TcpState,
    event::{Counters, DenyReason},
    Direction,
};
use kubesg_testkit::packet::{self, TcpFlags};

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
    /// The endpoint's policy, `None` for a non-member.
    policy: Option<PolicyHandle>,
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
            policy: handle,
            events,
            window: Cell::new((0, 0)),
        }
    }

    /// Replaces the member's policy with `policy`.
    fn replace(&mut self, policy: &CompiledPolicy) {
        let old = self.policy.expect("a member");
        self.policy = Some(
            self.dp
                .replace_policy(old, policy)
                .expect("replacing the policy"),
        );
    }

    /// Turns re-checking established connections on policy change on or off.
    fn set_recheck(&mut self, on: bool) {
        let mut cfg = self.dp.config().expect("reading the config");
        if on {
            cfg.flags |= CFG_RECHECK_ON_POLICY_CHANGE;
        } else {
            cfg.flags &= !CFG_RECHECK_ON_POLICY_CHANGE;
        }
        self.dp.set_config(&cfg).expect("writing the config");
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

fn tcp_port(port: u16) -> Rule {
    Rule {
        protocol: Protocol::Tcp,
        ports: vec![PortMatch::Range {
            first: port,
            last: port,
        }],
        peers: anywhere(),
    }
}

/// May open TCP connections to port 80; accepts nothing.
fn client() -> CompiledPolicy {
    CompiledPolicy {
        egress: vec![tcp_port(80)],
        ..CompiledPolicy::default()
    }
}

/// Accepts TCP connections on port 8080; opens nothing.
fn server() -> CompiledPolicy {
    CompiledPolicy {
        ingress: vec![tcp_port(8080)],
        ..CompiledPolicy::default()
    }
}

/// Allows every connection both ways: whatever such a member drops, it drops for being INVALID.
fn allow_all() -> CompiledPolicy {
    let any = Rule {
        protocol: Protocol::Any,
        ports: vec![],
        peers: anywhere(),
    };
    CompiledPolicy {
        ingress: vec![any.clone()],
        egress: vec![any],
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

impl Fam {
    /// Pod:40000 → peer:80, the pod's own connection.
    fn out(self, f: TcpFlags) -> Vec<u8> {
        packet::tcp(self.pod, self.peer, 40000, 80, f)
    }
    /// Peer:80 → pod:40000, the other side of `out`.
    fn back(self, f: TcpFlags) -> Vec<u8> {
        packet::tcp(self.peer, self.pod, 80, 40000, f)
    }
    /// Peer:50000 → pod:8080, a connection to the pod.
    fn inb(self, f: TcpFlags) -> Vec<u8> {
        packet::tcp(self.peer, self.pod, 50000, 8080, f)
    }
    /// Pod:8080 → peer:50000, the pod's side of `inb`.
    fn inb_reply(self, f: TcpFlags) -> Vec<u8> {
        packet::tcp(self.pod, self.peer, 8080, 50000, f)
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

/// SYN, SYN/ACK, ACK of the pod's connection to peer:80, each accepted.
fn handshake(dp: &Dp, f: Fam) {
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT, "SYN");
    assert_eq!(
        dp.pod_receives(&f.back(TcpFlags::SYN_ACK)),
        ACCEPT,
        "SYN/ACK"
    );
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::ACK)), ACCEPT, "ACK");
}

fn state(dp: &Dp) -> TcpState {
    dp.conn().tcp_state().expect("a TCP entry")
}

// --- State transitions ------------------------------------------------------------------------

ipv4_and_ipv6!(
    syn_from_pod_opens_syn_sent_unreplied,
    syn_ack_moves_to_syn_recv_and_marks_the_reply,
    handshake_ack_establishes_and_assures,
    pod_closing_first_walks_fin_wait_close_wait_last_ack_time_wait,
    peer_closing_first_walks_the_same_states_from_its_side,
    simultaneous_close_goes_from_fin_wait_to_last_ack,
    rst_on_established_connection_moves_to_close,
    rst_as_only_reply_deletes_the_entry,
    rst_from_pod_before_any_reply_deletes_the_entry,
    syn_retransmit_stays_syn_sent_and_keeps_the_timeout,
    simultaneous_open_goes_through_syn_sent2,
    syn_in_time_wait_reopens_the_connection,
    syn_in_time_wait_refused_by_the_rules_still_ends_the_old_connection,
    syn_from_peer_in_time_wait_reopens_in_its_own_direction,
    syn_in_close_reopens_the_connection,
    inbound_syn_opens_a_connection_in_the_ingress_direction,
    late_syn_ack_on_established_connection_changes_nothing,
    data_on_established_connection_refreshes_the_timeout,
    only_the_syn_counts_as_a_new_connection,
);

fn syn_from_pod_opens_syn_sent_unreplied(f: Fam) {
    let dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynSent));
    assert!(!c.seen_reply(), "[UNREPLIED]");
    assert!(!c.assured());
    assert_eq!(c.entry.orig_direction(), Direction::Egress);
    assert_eq!(
        c.original(),
        Tuple {
            src: f.pod,
            dst: f.peer,
            sport: 40000,
            dport: 80
        }
    );
    dp.assert_expires_in(&c, 120 * SEC);
}

fn syn_ack_moves_to_syn_recv_and_marks_the_reply(f: Fam) {
    let dp = Dp::load(Some(&client()));
    dp.pod_sends(&f.out(TcpFlags::SYN));
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN_ACK)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynRecv));
    assert!(c.seen_reply());
    assert!(!c.assured());
    dp.assert_expires_in(&c, 60 * SEC);
}

fn handshake_ack_establishes_and_assures(f: Fam) {
    let dp = Dp::load(Some(&client()));
    handshake(&dp, f);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::Established));
    assert!(c.seen_reply());
    assert!(c.assured(), "[ASSURED] after the handshake's ACK");
    dp.assert_expires_in(&c, 432_000 * SEC);
}

fn pod_closing_first_walks_fin_wait_close_wait_last_ack_time_wait(f: Fam) {
    let dp = Dp::load(Some(&client()));
    handshake(&dp, f);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::FIN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::FinWait);
    dp.assert_expires_in(&dp.conn(), 120 * SEC);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::CloseWait);
    dp.assert_expires_in(&dp.conn(), 60 * SEC);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::FIN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::LastAck);
    dp.assert_expires_in(&dp.conn(), 30 * SEC);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::TimeWait);
    dp.assert_expires_in(&dp.conn(), 120 * SEC);
    assert!(dp.conn().assured(), "closing keeps [ASSURED]");
}

fn peer_closing_first_walks_the_same_states_from_its_side(f: Fam) {
    let dp = Dp::load(Some(&client()));
    handshake(&dp, f);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::FIN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::FinWait);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::CloseWait);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::FIN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::LastAck);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::TimeWait);
}

fn simultaneous_close_goes_from_fin_wait_to_last_ack(f: Fam) {
    let dp = Dp::load(Some(&client()));
    handshake(&dp, f);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::FIN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::FinWait);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::FIN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::LastAck);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::TimeWait);
}

fn rst_on_established_connection_moves_to_close(f: Fam) {
    let dp = Dp::load(Some(&client()));
    handshake(&dp, f);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::RST)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::Close));
    dp.assert_expires_in(&c, 10 * SEC);
}

fn rst_as_only_reply_deletes_the_entry(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    // A closed port answers the SYN with RST/ACK: accepted (ESTABLISHED: it is the reply) ...
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::RST_ACK)), ACCEPT);
    // ... and the connection is forgotten at once.
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 0);
    // Nothing is left for a late SYN/ACK to belong to.
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN_ACK)), DROP);
    dp.assert_denied(DenyReason::Invalid);
}

fn rst_from_pod_before_any_reply_deletes_the_entry(f: Fam) {
    let dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::RST)), ACCEPT);
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
}

fn syn_retransmit_stays_syn_sent_and_keeps_the_timeout(f: Fam) {
    let dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    let first = dp.conn();
    next_tick();
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    let again = dp.conn();
    assert_eq!(again.tcp_state(), Some(TcpState::SynSent));
    assert!(!again.seen_reply());
    assert_eq!(
        again.entry.expires_ns, first.entry.expires_ns,
        "a retransmitted SYN does not renew the timeout"
    );
    assert_eq!(dp.counters()[EGRESS].new_connections, 1);
}

fn simultaneous_open_goes_through_syn_sent2(f: Fam) {
    // The pod may only open: the peer's SYN, crossing the pod's, is the connection's reply.
    let dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynSent2));
    assert!(c.seen_reply());
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::SynRecv);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::SynRecv);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::ACK)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::Established));
    assert!(c.assured());
    assert_eq!(c.entry.orig_direction(), Direction::Egress);
}

/// Closes the pod's connection down to TIME_WAIT.
fn to_time_wait(dp: &Dp, f: Fam) {
    handshake(dp, f);
    dp.pod_sends(&f.out(TcpFlags::FIN_ACK));
    dp.pod_receives(&f.back(TcpFlags::FIN_ACK));
    dp.pod_sends(&f.out(TcpFlags::ACK));
    assert_eq!(state(dp), TcpState::TimeWait);
}

fn syn_in_time_wait_reopens_the_connection(f: Fam) {
    let dp = Dp::load(Some(&client()));
    to_time_wait(&dp, f);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynSent));
    assert!(!c.seen_reply(), "a reopened connection starts unreplied");
    assert!(!c.assured());
    dp.assert_expires_in(&c, 120 * SEC);
    assert_eq!(dp.counters()[EGRESS].new_connections, 2);
}

fn syn_in_time_wait_refused_by_the_rules_still_ends_the_old_connection(f: Fam) {
    // A non-member closes a connection, then joins a policy that allows nothing: the new SYN is
    // refused, and the closed connection is gone too (nf_conntrack kills it before the lookup).
    let mut dp = Dp::load(None);
    to_time_wait(&dp, f);
    let h = dp
        .dp
        .install_policy(&CompiledPolicy::default())
        .expect("deny-all policy");
    dp.dp.set_endpoint(IF, Some(h)).expect("joining");
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), DROP);
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
}

fn syn_from_peer_in_time_wait_reopens_in_its_own_direction(f: Fam) {
    let dp = Dp::load(None);
    to_time_wait(&dp, f);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynSent));
    assert_eq!(c.entry.orig_direction(), Direction::Ingress);
    assert_eq!(
        c.original(),
        Tuple {
            src: f.peer,
            dst: f.pod,
            sport: 80,
            dport: 40000
        }
    );
}

fn syn_in_close_reopens_the_connection(f: Fam) {
    let dp = Dp::load(Some(&client()));
    handshake(&dp, f);
    dp.pod_receives(&f.back(TcpFlags::RST));
    assert_eq!(state(&dp), TcpState::Close);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    assert_eq!(state(&dp), TcpState::SynSent);
    assert!(!dp.conn().seen_reply());
}

fn inbound_syn_opens_a_connection_in_the_ingress_direction(f: Fam) {
    // The server may open nothing: its SYN/ACK and data pass only as ESTABLISHED.
    let dp = Dp::load(Some(&server()));
    assert_eq!(dp.pod_receives(&f.inb(TcpFlags::SYN)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynSent));
    assert_eq!(c.entry.orig_direction(), Direction::Ingress);
    assert_eq!(
        c.original(),
        Tuple {
            src: f.peer,
            dst: f.pod,
            sport: 50000,
            dport: 8080
        }
    );
    assert_eq!(dp.pod_sends(&f.inb_reply(TcpFlags::SYN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::SynRecv);
    assert_eq!(dp.pod_receives(&f.inb(TcpFlags::ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::Established);
    assert_eq!(dp.pod_sends(&f.inb_reply(TcpFlags::PSH_ACK)), ACCEPT);
    assert!(dp.conn().assured());
    let [eg, ing] = dp.counters();
    assert_eq!((ing.new_connections, eg.new_connections), (1, 0));
    assert_eq!(eg.dropped_policy + ing.dropped_policy, 0);
}

fn late_syn_ack_on_established_connection_changes_nothing(f: Fam) {
    let dp = Dp::load(Some(&client()));
    handshake(&dp, f);
    let before = dp.conn();
    next_tick();
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN_ACK)), ACCEPT);
    assert_eq!(dp.conn(), before);
}

fn data_on_established_connection_refreshes_the_timeout(f: Fam) {
    let dp = Dp::load(Some(&client()));
    handshake(&dp, f);
    let before = dp.conn().entry.expires_ns;
    next_tick();
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::PSH_ACK)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::Established));
    assert!(c.entry.expires_ns > before);
    dp.assert_expires_in(&c, 432_000 * SEC);
}

fn only_the_syn_counts_as_a_new_connection(f: Fam) {
    let dp = Dp::load(Some(&client()));
    handshake(&dp, f);
    dp.pod_receives(&f.back(TcpFlags::PSH_ACK));
    let [eg, ing] = dp.counters();
    assert_eq!(eg.new_connections + ing.new_connections, 1);
    assert_eq!((eg.accepted, ing.accepted), (2, 2));
}

// --- ctstate NEW vs ESTABLISHED, as rules see it -----------------------------------------------

ipv4_and_ipv6!(
    reply_of_own_connection_passes_a_policy_allowing_nothing_inbound,
    unsolicited_syn_ack_is_invalid_for_a_member_allowing_nothing_inbound,
    inbound_syn_is_new_and_refused_by_a_policy_allowing_nothing_inbound,
    syn_retransmit_is_new_and_judged_by_the_current_rules,
    established_connection_is_not_judged_again_without_recheck,
);

fn reply_of_own_connection_passes_a_policy_allowing_nothing_inbound(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN_ACK)), ACCEPT);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::ACK)), ACCEPT);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::PSH_ACK)), ACCEPT);
    let ing = dp.counters()[INGRESS];
    assert_eq!(
        (ing.accepted, ing.dropped_policy, ing.new_connections),
        (2, 0, 0)
    );
    assert!(dp.denials().is_empty());
}

fn unsolicited_syn_ack_is_invalid_for_a_member_allowing_nothing_inbound(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::SYN_ACK)), DROP);
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 1);
    dp.assert_denied(DenyReason::Invalid);
    assert!(dp.conns().is_empty());
}

fn inbound_syn_is_new_and_refused_by_a_policy_allowing_nothing_inbound(f: Fam) {
    let mut dp = Dp::load(Some(&client()));
    assert_eq!(dp.pod_receives(&f.inb(TcpFlags::SYN)), DROP);
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 1);
    let d = dp.assert_denied(DenyReason::Policy);
    assert_eq!(d.direction, Direction::Ingress);
    assert_eq!((d.src, d.dst), (Some(f.peer), Some(f.pod)));
    assert_eq!((d.sport, d.dport), (50000, 8080));
    assert!(
        dp.conns().is_empty(),
        "a refused connection leaves no entry"
    );
}

fn syn_retransmit_is_new_and_judged_by_the_current_rules(f: Fam) {
    // Even without re-check on policy change, an unreplied connection is NEW: each of its
    // packets is judged by the rules in force.
    let mut dp = Dp::load(Some(&client()));
    dp.set_recheck(false);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    dp.replace(&CompiledPolicy::default());
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert_eq!(dp.counters()[EGRESS].dropped_policy, 1);
}

fn established_connection_is_not_judged_again_without_recheck(f: Fam) {
    // The contrast to the SYN retransmit: once replied, the connection is ESTABLISHED and the
    // new rules do not see it (re-check off).
    let mut dp = Dp::load(Some(&client()));
    dp.set_recheck(false);
    handshake(&dp, f);
    dp.replace(&CompiledPolicy::default());
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::PSH_ACK)), ACCEPT);
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::PSH_ACK)), ACCEPT);
    assert!(dp.denials().is_empty());
}

// --- INVALID segments -------------------------------------------------------------------------

ipv4_and_ipv6!(
    stray_ack_without_connection_is_invalid,
    stray_fin_without_connection_is_invalid,
    stray_rst_without_connection_is_invalid,
    stray_syn_ack_without_connection_is_invalid,
    stray_inbound_ack_without_connection_is_invalid,
    stray_ack_passes_a_non_member_counted_as_invalid,
    stray_rst_passes_a_non_member_counted_as_invalid,
    syn_fin_is_invalid_without_and_within_a_connection,
    segment_without_flags_is_invalid,
    pod_ack_before_the_syn_ack_is_invalid,
    syn_with_ecn_bits_opens_a_connection,
);

/// A member allowing everything drops `frame` (sent by the pod) as INVALID, leaving no entry.
fn assert_invalid_from_pod(frame: &[u8]) {
    let mut dp = Dp::load(Some(&allow_all()));
    assert_eq!(dp.pod_sends(frame), DROP);
    let eg = dp.counters()[EGRESS];
    assert_eq!(
        (eg.dropped_invalid, eg.dropped_policy, eg.accepted),
        (1, 0, 0)
    );
    let d = dp.assert_denied(DenyReason::Invalid);
    assert_eq!(d.direction, Direction::Egress);
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
}

fn stray_ack_without_connection_is_invalid(f: Fam) {
    assert_invalid_from_pod(&f.out(TcpFlags::ACK));
}

fn stray_fin_without_connection_is_invalid(f: Fam) {
    assert_invalid_from_pod(&f.out(TcpFlags::FIN_ACK));
}

fn stray_rst_without_connection_is_invalid(f: Fam) {
    assert_invalid_from_pod(&f.out(TcpFlags::RST));
}

fn stray_syn_ack_without_connection_is_invalid(f: Fam) {
    assert_invalid_from_pod(&f.out(TcpFlags::SYN_ACK));
}

fn stray_inbound_ack_without_connection_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&allow_all()));
    assert_eq!(dp.pod_receives(&f.back(TcpFlags::PSH_ACK)), DROP);
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 1);
    let d = dp.assert_denied(DenyReason::Invalid);
    assert_eq!(d.direction, Direction::Ingress);
    assert!(dp.conns().is_empty());
}

/// A non-member lets `frame` (sent by the pod) through, counting it as INVALID, and tracks
/// nothing.
fn assert_invalid_passed_from_pod(frame: &[u8]) {
    let mut dp = Dp::load(None);
    assert_eq!(dp.pod_sends(frame), ACCEPT);
    let eg = dp.counters()[EGRESS];
    assert_eq!(
        (eg.invalid_passed, eg.accepted, eg.dropped_invalid),
        (1, 1, 0)
    );
    assert!(dp.denials().is_empty());
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
}

fn stray_ack_passes_a_non_member_counted_as_invalid(f: Fam) {
    assert_invalid_passed_from_pod(&f.out(TcpFlags::ACK));
}

fn stray_rst_passes_a_non_member_counted_as_invalid(f: Fam) {
    assert_invalid_passed_from_pod(&f.out(TcpFlags::RST));
}

const SYN_FIN: u8 = 0x03;

fn syn_fin_is_invalid_without_and_within_a_connection(f: Fam) {
    assert_invalid_from_pod(&packet::tcp_bits(f.pod, f.peer, 40000, 80, SYN_FIN));
    let mut dp = Dp::load(Some(&allow_all()));
    handshake(&dp, f);
    let before = dp.conn();
    next_tick();
    assert_eq!(
        dp.pod_receives(&packet::tcp_bits(f.peer, f.pod, 80, 40000, SYN_FIN)),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(
        dp.conn(),
        before,
        "an INVALID segment leaves the entry alone"
    );
}

fn segment_without_flags_is_invalid(f: Fam) {
    assert_invalid_from_pod(&packet::tcp_bits(f.pod, f.peer, 40000, 80, 0));
    let mut dp = Dp::load(Some(&allow_all()));
    handshake(&dp, f);
    assert_eq!(
        dp.pod_sends(&packet::tcp_bits(f.pod, f.peer, 40000, 80, 0)),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(state(&dp), TcpState::Established);
}

fn pod_ack_before_the_syn_ack_is_invalid(f: Fam) {
    let mut dp = Dp::load(Some(&allow_all()));
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_sends(&f.out(TcpFlags::ACK)), DROP);
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(state(&dp), TcpState::SynSent);
}

fn syn_with_ecn_bits_opens_a_connection(f: Fam) {
    // Linux sends SYN|ECE|CWR when ECN is on; nf_conntrack ignores both bits.
    let dp = Dp::load(Some(&client()));
    let syn_ecn = packet::tcp_bits(f.pod, f.peer, 40000, 80, 0x02 | 0x40 | 0x80);
    assert_eq!(dp.pod_sends(&syn_ecn), ACCEPT);
    assert_eq!(state(&dp), TcpState::SynSent);
}
