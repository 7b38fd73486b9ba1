//! Conntrack timeouts through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): with tiny
//! timeouts set through the config map, an expired entry is treated as absent (its reply is
//! INVALID, a new packet starts a fresh connection), and `conntrack::sweep` removes exactly the
//! expired entries.

use std::time::Duration;

use kubesg_agent::{clock, conntrack, policy::CompiledPolicy};
use kubesg_common::{
    config::{timeout, Config},
    conntrack::TcpState,
    event::DenyReason,
    proto,
};
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    loopback::{LoopbackDatapath, ACCEPT, DROP, EGRESS, INGRESS},
    packet::{self, IcmpError, TcpFlags},
    rules::{dns_http_ping, egress},
};

/// May send UDP to 53, TCP to 80 and pings; accepts nothing.
fn client() -> CompiledPolicy {
    egress(dns_http_ping())
}

const MS: u64 = 1_000_000;

/// Sets the timeouts of `slots` (TCP state numbers or `timeout::*`) to `ms` milliseconds, the
/// others keeping their defaults.
fn set_timeouts(dp: &mut LoopbackDatapath, slots: &[usize], ms: u64) {
    let mut cfg = Config::defaults();
    for s in slots {
        cfg.timeouts_ns[*s] = ms * MS;
    }
    dp.datapath.set_config(&cfg).expect("writing the config");
}

/// Long enough for a 100 ms timeout to have passed, whatever the scheduler does.
fn wait_past_100ms() {
    std::thread::sleep(Duration::from_millis(250));
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
    sweep_keeps_a_connection_reopened_between_its_read_and_its_removal,
);

fn syn_ack_after_the_syn_sent_timeout_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    set_timeouts(&mut dp, &[TcpState::SynSent as usize], 100);
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    dp.assert_expires_in(&dp.conn(), Duration::from_millis(100));
    wait_past_100ms();
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 1);
}

fn data_after_the_established_timeout_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    set_timeouts(&mut dp, &[TcpState::Established as usize], 100);
    dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN));
    dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK));
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), ACCEPT);
    assert_eq!(dp.conn().tcp_state(), Some(TcpState::Established));
    wait_past_100ms();
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        DROP
    );
    dp.assert_denied(DenyReason::Invalid);
}

fn query_after_the_udp_timeout_opens_a_fresh_connection(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::UDP_UNREPLIED], 100);
    dp.pod_sends(&f.udp_out(53, b"query"));
    dp.pod_receives(&f.udp_out_reply(53, b"answer"));
    let old = dp.conn();
    assert!(old.seen_reply());
    wait_past_100ms();
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), ACCEPT);
    let fresh = dp.conn();
    assert!(!fresh.seen_reply(), "a fresh connection is [UNREPLIED]");
    assert!(fresh.entry.created_ns > old.entry.expires_ns);
    dp.assert_expires_in(&fresh, Duration::from_millis(100));
    assert_eq!(dp.counters()[EGRESS].new_connections, 2);
}

fn answer_after_the_udp_timeout_is_a_new_inbound_flow(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::UDP_UNREPLIED], 100);
    dp.pod_sends(&f.udp_out(53, b"query"));
    wait_past_100ms();
    assert_eq!(
        dp.pod_receives(&f.udp_out_reply(53, b"answer")),
        DROP,
        "judged by the (empty) ingress rules"
    );
    dp.assert_denied(DenyReason::Policy);
    assert_eq!(dp.counters()[INGRESS].dropped_policy, 1);
}

fn echo_reply_after_the_icmp_timeout_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::ICMP], 100);
    assert_eq!(dp.pod_sends(&f.echo_out(3)), ACCEPT);
    dp.assert_expires_in(&dp.conn(), Duration::from_millis(100));
    wait_past_100ms();
    assert_eq!(dp.pod_receives(&f.echo_out_reply(3)), DROP);
    dp.assert_denied(DenyReason::Invalid);
}

fn icmp_error_about_an_expired_flow_is_invalid(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::UDP_UNREPLIED], 100);
    let q = f.udp_out(53, b"query");
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

fn expired_entry_is_absent_for_a_non_member_too(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    set_timeouts(&mut dp, &[TcpState::SynSent as usize], 100);
    dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN));
    wait_past_100ms();
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    let ing = dp.counters()[INGRESS];
    assert_eq!(
        ing.invalid_passed, 1,
        "the SYN/ACK belongs to nothing any more"
    );
    assert!(
        dp.conns().is_empty(),
        "the dead entry went when the packet met it"
    );
    assert_eq!(dp.held(), 0, "and was counted off");
}

fn sweep_removes_exactly_the_expired_entries(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::UDP_UNREPLIED, timeout::ICMP], 100);
    dp.pod_sends(&f.udp_out(53, b"query"));
    dp.pod_sends(&packet::udp(f.pod, f.peer, 40001, 53, b"query"));
    dp.pod_sends(&f.echo_out(3));
    // Established TCP keeps its 5 days.
    dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN));
    dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK));
    dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK));
    assert_eq!(dp.conns().len(), 4);
    assert_eq!(dp.held(), 4);
    wait_past_100ms();
    let removed = conntrack::sweep(dp.datapath.maps_mut(), clock::now_ns()).expect("sweep");
    assert_eq!(removed, 3);
    assert_eq!(
        dp.held(),
        1,
        "the swept entries are counted off the endpoint"
    );
    let left = dp.conn();
    assert_eq!(left.key.proto, proto::TCP);
    assert_eq!(left.tcp_state(), Some(TcpState::Established));
    assert_eq!(
        conntrack::sweep(dp.datapath.maps_mut(), clock::now_ns()).expect("sweep"),
        0
    );
    // The surviving connection still works.
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        ACCEPT
    );
}

fn sweep_keeps_an_entry_refreshed_before_its_timeout(f: Family) {
    // `sweep` takes the time to sweep at: the deadlines decide, not how long the test takes.
    let mut dp = LoopbackDatapath::load(Some(&client()));
    dp.pod_sends(&f.udp_out(53, b"query"));
    let first = dp.conn().entry.expires_ns;
    // Let the datapath's clock tick, so that the refresh moves the deadline.
    std::thread::sleep(Duration::from_millis(20));
    dp.pod_sends(&f.udp_out(53, b"query"));
    let refreshed = dp.conn().entry.expires_ns;
    assert!(refreshed > first);
    assert_eq!(
        conntrack::sweep(dp.datapath.maps_mut(), first).expect("sweep"),
        0
    );
    assert_eq!(
        conntrack::sweep(dp.datapath.maps_mut(), refreshed - 1).expect("sweep"),
        0,
        "alive until its deadline"
    );
    assert_eq!(dp.conns().len(), 1);
    assert_eq!(
        conntrack::sweep(dp.datapath.maps_mut(), refreshed).expect("sweep"),
        1
    );
    assert!(dp.conns().is_empty());
}

fn sweep_removes_stale_fragment_records(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::FRAGMENT], 100);
    let dgram = f.udp_out(53, &[0; 200]);
    let [first, _] = packet::fragment(&dgram, 96, 7);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.datapath.maps().fragments.iter().count(), 1);
    wait_past_100ms();
    conntrack::sweep(dp.datapath.maps_mut(), clock::now_ns()).expect("sweep");
    assert_eq!(dp.datapath.maps().fragments.iter().count(), 0);
    assert_eq!(dp.conns().len(), 1, "the connection (30 s) stays");
}

fn sweep_keeps_a_connection_reopened_between_its_read_and_its_removal(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&client()));
    set_timeouts(&mut dp, &[timeout::UDP_UNREPLIED], 100);
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), ACCEPT);
    wait_past_100ms();
    // The sweep reads the expired entry; before it removes it, the pod asks again and the
    // datapath opens a fresh connection under the same key.
    let mut maps = dp.datapath.maps().try_clone().expect("second map handles");
    let now = clock::now_ns();
    let removed = conntrack::sweep_with(&mut maps, now, |_| {
        assert_eq!(dp.pod_sends(&f.udp_out(53, b"again")), ACCEPT);
    })
    .expect("sweep");
    assert_eq!(removed, 0, "what it would remove is a live connection");
    assert_eq!(dp.held(), 1, "one entry, counted once");
    let c = dp.conn();
    assert!(c.entry.expires_ns > now, "the fresh entry: {c:?}");
    // Its answer belongs to it.
    assert_eq!(dp.pod_receives(&f.udp_out_reply(53, b"answer")), ACCEPT);
    assert_eq!(dp.counters()[INGRESS].dropped_invalid, 0);
}

/// The sweep reads the table in batches (`BPF_MAP_LOOKUP_BATCH`, a few thousand entries a call):
/// in a table of several batches, every expired entry goes and every live one stays, and
/// `ct list` (the same read) sees exactly the live ones.
#[test]
fn sweep_of_a_table_larger_than_a_batch_removes_exactly_the_expired_entries() {
    kubesg_testkit::require_privileged!();
    use kubesg_common::conntrack::{CtEntry, CtKey};
    const ENTRIES: u32 = 10_000;
    let mut dp = LoopbackDatapath::load(None);
    let now = 1_000 * MS;
    let maps = dp.datapath.maps_mut();
    for i in 0..ENTRIES {
        // An interface with no endpoint: no entry count to keep (the entries were not counted
        // in, as the programs would).
        let key = CtKey {
            ifindex: 99,
            family: 2,
            proto: proto::TCP,
            pod_port: i as u16,
            peer_port: 80,
            pod_addr: [0x0a00_0001, 0, 0, 0],
            peer_addr: [0x0a01_0001, 0, 0, 0],
            ..CtKey::default()
        };
        // Every third entry expired a nanosecond before `now`; the others expire after it.
        let expires_ns = if i % 3 == 0 { now - 1 } else { now + 1 };
        let entry = CtEntry {
            expires_ns,
            ..CtEntry::default()
        };
        maps.conntrack.insert(key, entry, 0).expect("inserting");
    }
    let expired = ENTRIES.div_ceil(3) as usize;
    let removed = conntrack::sweep(dp.datapath.maps_mut(), now).expect("sweep");
    assert_eq!(removed, expired);
    let left = conntrack::list(dp.datapath.maps()).expect("list");
    assert_eq!(left.len(), ENTRIES as usize - expired);
    assert!(
        left.iter()
            .all(|c| c.key.pod_port % 3 != 0 && c.entry.expires_ns == now + 1),
        "a live entry was removed or an expired one kept"
    );
}
