//! TCP through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): every nf_conntrack state
//! a real exchange produces, the per-packet ctstate (NEW until a reply, ESTABLISHED from it) as a
//! member's rules observe it, and INVALID segments.

use std::time::Duration;

use kubesg_agent::{
    conntrack::Tuple,
    policy::{CompiledPolicy, Protocol},
};
use kubesg_common::{
    conntrack::{TcpState, IDX_SYNACK},
    event::DenyReason,
    Direction,
};
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    loopback::{next_tick, LoopbackDatapath, ACCEPT, DROP, EGRESS, INGRESS},
    packet::{self, TcpFlags},
    rules::{allow_all, egress, ingress, port, rule},
};

/// May open TCP connections to port 80; accepts nothing.
fn client() -> CompiledPolicy {
    egress(vec![rule(Protocol::Tcp, vec![port(80)])])
}

/// Accepts TCP connections on port 8080; opens nothing.
fn server() -> CompiledPolicy {
    ingress(vec![rule(Protocol::Tcp, vec![port(8080)])])
}

/// SYN, SYN/ACK, ACK of the pod's connection to peer:80, each accepted.
fn handshake(dp: &LoopbackDatapath, f: Family) {
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT, "SYN");
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT,
        "SYN/ACK"
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), ACCEPT, "ACK");
}

fn state(dp: &LoopbackDatapath) -> TcpState {
    dp.conn().tcp_state().expect("a TCP entry")
}

/// Which end sends a segment of the pod's connection to peer:80.
#[derive(Clone, Copy, Debug)]
enum Side {
    Pod,
    Peer,
}

/// `side` sends `flags` on the pod's connection to peer:80: the segment is accepted and leaves
/// the entry in state `then`.
fn step(dp: &LoopbackDatapath, f: Family, side: Side, flags: TcpFlags, then: TcpState) {
    let verdict = match side {
        Side::Pod => dp.pod_sends(&f.tcp_out(80, flags)),
        Side::Peer => dp.pod_receives(&f.tcp_out_reply(80, flags)),
    };
    assert_eq!(verdict, ACCEPT, "{flags:?} from the {side:?}");
    assert_eq!(state(dp), then, "after {flags:?} from the {side:?}");
}

/// Each step of `steps` in turn, as [`step`].
fn walk(dp: &LoopbackDatapath, f: Family, steps: &[(Side, TcpFlags, TcpState)]) {
    for &(side, flags, then) in steps {
        step(dp, f, side, flags, then);
    }
}

/// Both ends close at once: FIN, FIN, last ACK.
const SIMULTANEOUS_CLOSE: [(Side, TcpFlags, TcpState); 3] = [
    (Side::Pod, TcpFlags::FIN_ACK, TcpState::FinWait),
    (Side::Peer, TcpFlags::FIN_ACK, TcpState::LastAck),
    (Side::Pod, TcpFlags::ACK, TcpState::TimeWait),
];

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
    syn_after_the_peers_reset_is_ignored_until_the_syn_ack_resyncs,
    syn_after_the_pods_own_reset_reopens_the_connection,
    inbound_syn_opens_a_connection_in_the_ingress_direction,
    late_syn_ack_on_established_connection_changes_nothing,
    data_on_established_connection_refreshes_the_timeout,
    only_the_syn_counts_as_a_new_connection,
);

fn syn_from_pod_opens_syn_sent_unreplied(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynSent));
    assert!(!c.seen_reply(), "[UNREPLIED]");
    assert!(!c.assured());
    assert_eq!(c.entry.orig_direction(), Direction::Egress);
    assert_eq!(c.original(), f.out_tuple(80));
    dp.assert_expires_in(&c, Duration::from_secs(120));
}

fn syn_ack_moves_to_syn_recv_and_marks_the_reply(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN));
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynRecv));
    assert!(c.seen_reply());
    assert!(!c.assured());
    dp.assert_expires_in(&c, Duration::from_secs(60));
}

fn handshake_ack_establishes_and_assures(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::Established));
    assert!(c.seen_reply());
    assert!(c.assured(), "[ASSURED] after the handshake's ACK");
    dp.assert_expires_in(&c, Duration::from_secs(432_000));
}

fn pod_closing_first_walks_fin_wait_close_wait_last_ack_time_wait(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    for (side, flags, then, timeout_s) in [
        (Side::Pod, TcpFlags::FIN_ACK, TcpState::FinWait, 120),
        (Side::Peer, TcpFlags::ACK, TcpState::CloseWait, 60),
        (Side::Peer, TcpFlags::FIN_ACK, TcpState::LastAck, 30),
        (Side::Pod, TcpFlags::ACK, TcpState::TimeWait, 120),
    ] {
        step(&dp, f, side, flags, then);
        dp.assert_expires_in(&dp.conn(), Duration::from_secs(timeout_s));
    }
    assert!(dp.conn().assured(), "closing keeps [ASSURED]");
}

fn peer_closing_first_walks_the_same_states_from_its_side(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    walk(
        &dp,
        f,
        &[
            (Side::Peer, TcpFlags::FIN_ACK, TcpState::FinWait),
            (Side::Pod, TcpFlags::ACK, TcpState::CloseWait),
            (Side::Pod, TcpFlags::FIN_ACK, TcpState::LastAck),
            (Side::Peer, TcpFlags::ACK, TcpState::TimeWait),
        ],
    );
}

fn simultaneous_close_goes_from_fin_wait_to_last_ack(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    walk(&dp, f, &SIMULTANEOUS_CLOSE);
}

fn rst_on_established_connection_moves_to_close(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    assert_eq!(dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::RST)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::Close));
    dp.assert_expires_in(&c, Duration::from_secs(10));
}

fn rst_as_only_reply_deletes_the_entry(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    // A closed port answers the SYN with RST/ACK: accepted (ESTABLISHED: it is the reply) ...
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::RST_ACK)),
        ACCEPT
    );
    // ... and the connection is forgotten at once.
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 0);
    // Nothing is left for a late SYN/ACK to belong to.
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
}

fn rst_from_pod_before_any_reply_deletes_the_entry(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::RST)), ACCEPT);
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
}

fn syn_retransmit_stays_syn_sent_and_keeps_the_timeout(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    let first = dp.conn();
    next_tick();
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    let again = dp.conn();
    assert_eq!(again.tcp_state(), Some(TcpState::SynSent));
    assert!(!again.seen_reply());
    assert_eq!(
        again.entry.expires_ns, first.entry.expires_ns,
        "a retransmitted SYN does not renew the timeout"
    );
    assert_eq!(dp.counters()[EGRESS].new_connections, 1);
}

fn simultaneous_open_goes_through_syn_sent2(f: Family) {
    // The pod may only open: the peer's SYN, crossing the pod's, is the connection's reply.
    let dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynSent2));
    assert!(c.seen_reply());
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN_ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::SynRecv);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    assert_eq!(state(&dp), TcpState::SynRecv);
    assert_eq!(dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::ACK)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::Established));
    assert!(c.assured());
    assert_eq!(c.entry.orig_direction(), Direction::Egress);
}

/// Closes the pod's connection down to TIME_WAIT.
fn to_time_wait(dp: &LoopbackDatapath, f: Family) {
    handshake(dp, f);
    walk(dp, f, &SIMULTANEOUS_CLOSE);
}

fn syn_in_time_wait_reopens_the_connection(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    to_time_wait(&dp, f);
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynSent));
    assert!(!c.seen_reply(), "a reopened connection starts unreplied");
    assert!(!c.assured());
    dp.assert_expires_in(&c, Duration::from_secs(120));
    assert_eq!(dp.counters()[EGRESS].new_connections, 2);
}

fn syn_in_time_wait_refused_by_the_rules_still_ends_the_old_connection(f: Family) {
    // A non-member closes a connection, then joins a policy that allows nothing: the new SYN is
    // refused, and the closed connection is gone too (nf_conntrack kills it before the lookup).
    let mut dp = LoopbackDatapath::load(None);
    to_time_wait(&dp, f);
    dp.join(&CompiledPolicy::default());
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), DROP);
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
}

fn syn_from_peer_in_time_wait_reopens_in_its_own_direction(f: Family) {
    let dp = LoopbackDatapath::load(None);
    to_time_wait(&dp, f);
    assert_eq!(dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN)), ACCEPT);
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

fn syn_after_the_peers_reset_is_ignored_until_the_syn_ack_resyncs(f: Family) {
    // As nf_conntrack: the peer reset the connection, so a SYN from the pod on the same tuple may
    // be stale; it passes without touching the closed entry, and the SYN/ACK that answers it
    // (acknowledging exactly its end) brings the entry back in sync.
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::RST));
    assert_eq!(state(&dp), TcpState::Close);
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(state(&dp), TcpState::Close, "the SYN is ignored");
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    assert_eq!(state(&dp), TcpState::SynRecv, "resynced by the SYN/ACK");
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::Established);
}

fn syn_after_the_pods_own_reset_reopens_the_connection(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::RST)), ACCEPT);
    assert_eq!(state(&dp), TcpState::Close);
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(state(&dp), TcpState::SynSent);
    assert!(!dp.conn().seen_reply());
}

fn inbound_syn_opens_a_connection_in_the_ingress_direction(f: Family) {
    // The server may open nothing: its SYN/ACK and data pass only as ESTABLISHED.
    let dp = LoopbackDatapath::load(Some(&server()));
    assert_eq!(dp.pod_receives(&f.tcp_in(8080, TcpFlags::SYN)), ACCEPT);
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::SynSent));
    assert_eq!(c.entry.orig_direction(), Direction::Ingress);
    assert_eq!(c.original(), f.in_tuple(8080));
    assert_eq!(
        dp.pod_sends(&f.tcp_in_reply(8080, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    assert_eq!(state(&dp), TcpState::SynRecv);
    assert_eq!(dp.pod_receives(&f.tcp_in(8080, TcpFlags::ACK)), ACCEPT);
    assert_eq!(state(&dp), TcpState::Established);
    assert_eq!(
        dp.pod_sends(&f.tcp_in_reply(8080, TcpFlags::PSH_ACK)),
        ACCEPT
    );
    assert!(dp.conn().assured());
    let [eg, ing] = dp.counters();
    assert_eq!((ing.new_connections, eg.new_connections), (1, 0));
    assert_eq!(eg.dropped_policy + ing.dropped_policy, 0);
}

fn late_syn_ack_on_established_connection_changes_nothing(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    let before = dp.conn();
    next_tick();
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    let after = dp.conn();
    // Only the record of the last ignored segment changes (what a later resync would use), as
    // in nf_conntrack: state, timeout and windows stay.
    assert_eq!(
        after.entry.last.index as usize, IDX_SYNACK,
        "the SYN/ACK is recorded: {after:?}"
    );
    let mut after = after;
    after.entry.last = before.entry.last;
    assert_eq!(after, before);
}

fn data_on_established_connection_refreshes_the_timeout(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    let before = dp.conn().entry.expires_ns;
    next_tick();
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        ACCEPT
    );
    let c = dp.conn();
    assert_eq!(c.tcp_state(), Some(TcpState::Established));
    assert!(c.entry.expires_ns > before);
    dp.assert_expires_in(&c, Duration::from_secs(432_000));
}

fn only_the_syn_counts_as_a_new_connection(f: Family) {
    let dp = LoopbackDatapath::load(Some(&client()));
    handshake(&dp, f);
    dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK));
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

fn reply_of_own_connection_passes_a_policy_allowing_nothing_inbound(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), ACCEPT);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        ACCEPT
    );
    let ing = dp.counters()[INGRESS];
    assert_eq!(
        (ing.accepted, ing.dropped_policy, ing.new_connections),
        (2, 0, 0)
    );
    assert!(dp.denials().is_empty());
}

fn unsolicited_syn_ack_is_invalid_for_a_member_allowing_nothing_inbound(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        DROP
    );
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 1);
    dp.assert_denied(DenyReason::Invalid);
    assert!(dp.conns().is_empty());
}

fn inbound_syn_is_new_and_refused_by_a_policy_allowing_nothing_inbound(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    assert_eq!(dp.pod_receives(&f.tcp_in(8080, TcpFlags::SYN)), DROP);
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

fn syn_retransmit_is_new_and_judged_by_the_current_rules(f: Family) {
    // Even without re-check on policy change, an unreplied connection is NEW: each of its
    // packets is judged by the rules in force.
    let mut dp = LoopbackDatapath::load(Some(&client()));
    dp.set_recheck(false);
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    dp.replace(&CompiledPolicy::default());
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), DROP);
    dp.assert_denied(DenyReason::Policy);
    assert_eq!(dp.counters()[EGRESS].dropped_policy, 1);
}

fn established_connection_is_not_judged_again_without_recheck(f: Family) {
    // The contrast to the SYN retransmit: once replied, the connection is ESTABLISHED and the
    // new rules do not see it (re-check off).
    let mut dp = LoopbackDatapath::load(Some(&client()));
    dp.set_recheck(false);
    handshake(&dp, f);
    dp.replace(&CompiledPolicy::default());
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::PSH_ACK)), ACCEPT);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        ACCEPT
    );
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
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
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

fn stray_ack_without_connection_is_invalid(f: Family) {
    assert_invalid_from_pod(&f.tcp_out(80, TcpFlags::ACK));
}

fn stray_fin_without_connection_is_invalid(f: Family) {
    assert_invalid_from_pod(&f.tcp_out(80, TcpFlags::FIN_ACK));
}

fn stray_rst_without_connection_is_invalid(f: Family) {
    assert_invalid_from_pod(&f.tcp_out(80, TcpFlags::RST));
}

fn stray_syn_ack_without_connection_is_invalid(f: Family) {
    assert_invalid_from_pod(&f.tcp_out(80, TcpFlags::SYN_ACK));
}

fn stray_inbound_ack_without_connection_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        DROP
    );
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 1);
    let d = dp.assert_denied(DenyReason::Invalid);
    assert_eq!(d.direction, Direction::Ingress);
    assert!(dp.conns().is_empty());
}

/// A non-member lets `frame` (sent by the pod) through, counting it as INVALID, and tracks
/// nothing.
fn assert_invalid_passed_from_pod(frame: &[u8]) {
    let mut dp = LoopbackDatapath::load(None);
    assert_eq!(dp.pod_sends(frame), ACCEPT);
    let eg = dp.counters()[EGRESS];
    assert_eq!(
        (eg.invalid_passed, eg.accepted, eg.dropped_invalid),
        (1, 1, 0)
    );
    assert!(dp.denials().is_empty());
    assert!(dp.conns().is_empty(), "{:#?}", dp.conns());
}

fn stray_ack_passes_a_non_member_counted_as_invalid(f: Family) {
    assert_invalid_passed_from_pod(&f.tcp_out(80, TcpFlags::ACK));
}

fn stray_rst_passes_a_non_member_counted_as_invalid(f: Family) {
    assert_invalid_passed_from_pod(&f.tcp_out(80, TcpFlags::RST));
}

const SYN_FIN: u8 = 0x03;

fn syn_fin_is_invalid_without_and_within_a_connection(f: Family) {
    assert_invalid_from_pod(&packet::tcp_bits(f.pod, f.peer, 40000, 80, SYN_FIN));
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
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

fn segment_without_flags_is_invalid(f: Family) {
    assert_invalid_from_pod(&packet::tcp_bits(f.pod, f.peer, 40000, 80, 0));
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    handshake(&dp, f);
    assert_eq!(
        dp.pod_sends(&packet::tcp_bits(f.pod, f.peer, 40000, 80, 0)),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(state(&dp), TcpState::Established);
}

fn pod_ack_before_the_syn_ack_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), DROP);
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(state(&dp), TcpState::SynSent);
}

fn syn_with_ecn_bits_opens_a_connection(f: Family) {
    // Linux sends SYN|ECE|CWR when ECN is on; nf_conntrack ignores both bits.
    let dp = LoopbackDatapath::load(Some(&client()));
    let syn_ecn = packet::tcp_bits(f.pod, f.peer, 40000, 80, 0x02 | 0x40 | 0x80);
    assert_eq!(dp.pod_sends(&syn_ecn), ACCEPT);
    assert_eq!(state(&dp), TcpState::SynSent);
}
