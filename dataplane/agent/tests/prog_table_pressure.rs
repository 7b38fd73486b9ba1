//! Table pressure through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): the conntrack
//! table evicts nothing to make room, so a NEW connection that finds it full, or finds its
//! endpoint at its entry limit, is refused (a member) or passed untracked (a non-member) and
//! counted as `conntrack_full`, while every tracked connection goes on. The endpoint's entry
//! count follows what the programs and the agent's sweep add and remove.

use kubesg_agent::{clock, conntrack, datapath::DatapathOptions, policy::CompiledPolicy};
use kubesg_common::{config::timeout, conntrack::TcpState, event::DenyReason};
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    loopback::{LoopbackDatapath, ACCEPT, DROP, EGRESS},
    packet::{self, TcpFlags},
    rules::{dns_http_ping, egress},
};

/// May send UDP to 53, TCP to 80 and pings; accepts nothing.
fn client() -> CompiledPolicy {
    egress(dns_http_ping())
}

/// A datapath whose table holds `entries` and whose endpoint may hold `limit` (0: no limit).
fn load(policy: Option<&CompiledPolicy>, entries: u32, limit: u32) -> LoopbackDatapath {
    LoopbackDatapath::load_with(
        policy,
        &DatapathOptions {
            ct_entries: Some(entries),
            ct_endpoint_limit: Some(limit),
            ..DatapathOptions::default()
        },
    )
}

/// The pod's SYN to peer:80 from `sport`.
fn syn_from(f: Family, sport: u16) -> Vec<u8> {
    packet::tcp(f.pod, f.peer, sport, 80, TcpFlags::SYN)
}

/// The pod's connection from its usual port to peer:80, through the handshake.
fn establish(dp: &LoopbackDatapath, f: Family) {
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::SYN_ACK)),
        ACCEPT
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::ACK)), ACCEPT);
}

ipv4_and_ipv6!(
    a_full_table_refuses_new_connections_and_evicts_no_tracked_one,
    an_endpoint_at_its_limit_is_refused_until_its_entries_are_swept,
    a_non_member_at_its_limit_passes_untracked_and_is_counted,
    a_connection_opened_over_its_expired_entry_is_counted_once,
    a_connection_the_programs_remove_is_counted_off,
);

const TABLE: u32 = 16;

fn a_full_table_refuses_new_connections_and_evicts_no_tracked_one(f: Family) {
    let mut dp = load(Some(&client()), TABLE, 0);
    establish(&dp, f);
    // The rest of the table, with connections that never get an answer.
    for sport in 1..TABLE as u16 {
        assert_eq!(
            dp.pod_sends(&syn_from(f, 20_000 + sport)),
            ACCEPT,
            "{sport}"
        );
    }
    assert_eq!(dp.conns().len(), TABLE as usize);
    // Full: the next connection is refused, and named so.
    assert_eq!(dp.pod_sends(&syn_from(f, 30_000)), DROP);
    assert_eq!(dp.counters()[EGRESS].conntrack_full, 1);
    assert_eq!(dp.counters()[EGRESS].dropped_policy, 0);
    dp.assert_denied(DenyReason::ConntrackFull);
    // Nothing was evicted for it: the established connection (the least recently used entry,
    // which an LRU would have given up) carries data both ways, the unanswered ones are there.
    assert_eq!(dp.conns().len(), TABLE as usize);
    assert_eq!(
        dp.pod_receives(&f.tcp_out_reply(80, TcpFlags::PSH_ACK)),
        ACCEPT
    );
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::PSH_ACK)), ACCEPT);
    let established = dp
        .conns()
        .into_iter()
        .filter(|c| c.tcp_state() == Some(TcpState::Established))
        .count();
    assert_eq!(established, 1);
    assert_eq!(dp.held(), TABLE as i64);
}

fn an_endpoint_at_its_limit_is_refused_until_its_entries_are_swept(f: Family) {
    const LIMIT: u16 = 4;
    let mut dp = load(Some(&client()), TABLE, LIMIT.into());
    for sport in 0..LIMIT {
        assert_eq!(
            dp.pod_sends(&syn_from(f, 20_000 + sport)),
            ACCEPT,
            "{sport}"
        );
    }
    assert_eq!(dp.held(), LIMIT as i64);
    // The table has room; the endpoint has not.
    assert_eq!(dp.pod_sends(&syn_from(f, 30_000)), DROP);
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), DROP);
    assert_eq!(dp.counters()[EGRESS].conntrack_full, 2);
    let reasons: Vec<_> = dp.denials().into_iter().map(|d| d.reason).collect();
    assert_eq!(reasons, [Some(DenyReason::ConntrackFull); 2]);
    assert_eq!(dp.conns().len(), LIMIT as usize);
    // A packet of a tracked connection is no NEW connection: it passes.
    assert_eq!(
        dp.pod_sends(&syn_from(f, 20_000)),
        ACCEPT,
        "a SYN retransmitted"
    );
    // Once the sweep removes its (expired) entries, the endpoint opens connections again.
    let far = clock::now_ns() + 3_600 * 1_000_000_000;
    let removed = conntrack::sweep(dp.datapath.maps_mut(), far).expect("sweep");
    assert_eq!(removed, LIMIT as usize);
    assert_eq!(dp.held(), 0);
    assert_eq!(dp.pod_sends(&syn_from(f, 30_000)), ACCEPT);
    assert_eq!(dp.held(), 1);
}

fn a_non_member_at_its_limit_passes_untracked_and_is_counted(f: Family) {
    let dp = load(None, TABLE, 2);
    assert_eq!(dp.pod_sends(&syn_from(f, 20_000)), ACCEPT);
    assert_eq!(dp.pod_sends(&syn_from(f, 20_001)), ACCEPT);
    // Not filtered: its traffic is not cut for want of room, only not tracked.
    assert_eq!(dp.pod_sends(&syn_from(f, 20_002)), ACCEPT);
    let c = dp.counters()[EGRESS];
    assert_eq!((c.conntrack_full, c.new_connections), (1, 2));
    assert_eq!(dp.conns().len(), 2);
    assert_eq!(dp.held(), 2);
}

fn a_connection_opened_over_its_expired_entry_is_counted_once(f: Family) {
    let mut dp = load(Some(&client()), TABLE, 0);
    let mut cfg = dp.datapath.config().expect("config");
    cfg.timeouts_ns[timeout::UDP_UNREPLIED] = 1;
    dp.datapath.set_config(&cfg).expect("writing the config");
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"one")), ACCEPT);
    assert_eq!(dp.held(), 1);
    // Expired at once (1 ns): the next query opens the connection afresh over the old entry.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"two")), ACCEPT);
    assert_eq!(dp.counters()[EGRESS].new_connections, 2);
    assert_eq!(dp.conns().len(), 1);
    assert_eq!(dp.held(), 1, "one entry, counted once");
}

fn a_connection_the_programs_remove_is_counted_off(f: Family) {
    // A UDP flow the rules allowed, then refused by new rules before any reply: the programs
    // remove its entry (a refused connection leaves no state behind).
    let mut dp = load(Some(&client()), TABLE, 0);
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"query")), ACCEPT);
    assert_eq!(dp.held(), 1);
    dp.replace(&egress(vec![]));
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"again")), DROP);
    assert!(dp.conns().is_empty());
    assert_eq!(dp.held(), 0);
}
