//! Rule changes on established connections, on real traffic: under re-check (the default) a
//! connection the new rules no longer allow is cut on its next packet and its entry deleted, one
//! they still allow lives on; with re-check off (AWS's behaviour) tracked connections live on
//! whatever the new rules say. A rule added while a refused SYN is being retransmitted lets the
//! retransmission open the connection (a refused SYN left no state behind). A peer joining a
//! large group is one map update on the policy in place (no switch, open at once); a peer leaving
//! takes the switch under re-check (its connection is cut) and goes in place without.

use std::time::{Duration, Instant};

use kubesg_agent::policy::PeerBlock;
use kubesg_agent::policy::{CompiledPolicy, Protocol};
use kubesg_common::{config::CFG_RECHECK_ON_POLICY_CHANGE, event::Counters};
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    netns::accept_within,
    pods::{Pods, Who, ARRIVES},
    require_privileged,
    rules::{egress, ingress, port, rule_with},
};

const PORT: u16 = 8080;
const OTHER: u16 = 9090;

fn client_allowing(ports: &[u16]) -> CompiledPolicy {
    let ports = ports.iter().copied().map(port).collect();
    egress(vec![rule_with(Protocol::Tcp, ports, Who::Server.hosts())])
}

fn server_allowing(ports: &[u16]) -> CompiledPolicy {
    let ports = ports.iter().copied().map(port).collect();
    ingress(vec![rule_with(Protocol::Tcp, ports, Who::Client.hosts())])
}

/// Opens a connection between two members allowing [`PORT`], turns re-check on or off, replaces
/// `who`'s policy with `new`, and returns whether data still flows from the client to the server
/// (checking, when it does, that it flows back and the entry now carries the new policy).
fn change_rules(who: Who, new: &CompiledPolicy, recheck: bool, v6: bool) -> (bool, Pods) {
    let mut pods = Pods::new(
        Some(&client_allowing(&[PORT])),
        Some(&server_allowing(&[PORT])),
    );
    if !recheck {
        let mut c = pods.dp.config().expect("reading the config");
        c.flags &= !CFG_RECHECK_ON_POLICY_CHANGE;
        pods.dp.set_config(&c).expect("writing the config");
    }
    let (mut c, mut s) = pods.tcp_open(v6, PORT);
    let old = pods.policy(who).expect("a member");
    let new = pods
        .dp
        .replace_policy(old, new)
        .expect("replacing the policy");
    let flows = pods.still_carries((&mut c, &mut s), who, PORT, new);
    (flows, pods)
}

ipv4_and_ipv6!(
    egress_rule_removal_cuts_established_connection_under_recheck,
    egress_rule_removal_keeps_established_connection_without_recheck,
    rule_added_while_a_refused_syn_retransmits_lets_it_open,
);

fn egress_rule_removal_cuts_established_connection_under_recheck(f: Family) {
    let (flows, pods) = change_rules(Who::Client, &client_allowing(&[OTHER]), true, f.is_v6());
    pods.assert(!flows, "the connection is cut");
    pods.assert_cut(Who::Client, PORT);
}

fn egress_rule_removal_keeps_established_connection_without_recheck(f: Family) {
    let (flows, pods) = change_rules(Who::Client, &client_allowing(&[OTHER]), false, f.is_v6());
    pods.assert(flows, "tracked connections live on");
    let [out, inc] = pods.counters(Who::Client);
    pods.assert_eq(
        out.dropped_policy + inc.dropped_policy,
        0,
        "nothing refused",
    );
}

#[test]
fn rule_change_that_still_allows_connection_keeps_it_under_recheck() {
    require_privileged!();
    let (flows, pods) = change_rules(Who::Client, &client_allowing(&[OTHER, PORT]), true, false);
    pods.assert(flows, "the new rules still allow it");
    pods.assert_eq(
        pods.counters(Who::Client)[0].dropped_policy,
        0,
        "nothing refused",
    );
}

#[test]
fn ingress_rule_removal_cuts_accepted_connection_under_recheck() {
    require_privileged!();
    let (flows, pods) = change_rules(Who::Server, &server_allowing(&[OTHER]), true, false);
    pods.assert(!flows, "the connection is cut");
    pods.assert_cut(Who::Server, PORT);
}

#[test]
fn ingress_rule_removal_keeps_accepted_connection_without_recheck() {
    require_privileged!();
    let (flows, pods) = change_rules(Who::Server, &server_allowing(&[OTHER]), false, false);
    pods.assert(flows, "tracked connections live on");
}

fn rule_added_while_a_refused_syn_retransmits_lets_it_open(f: Family) {
    let v6 = f.is_v6();
    let mut pods = Pods::new(
        Some(&client_allowing(&[PORT])),
        Some(&server_allowing(&[OTHER])),
    );
    let listener = pods.server().tcp_listen(v6, PORT).expect("listening");
    let to = pods.server().sockaddr(v6, PORT);
    let old = pods.policy(Who::Server).expect("a member");
    let server_if = pods.ifindex(Who::Server);
    // TCP retransmits the SYN after 1 s: the attempt outlives that.
    let patience = Duration::from_secs(4);
    let Pods { dp, node, .. } = &mut pods;
    let client = &node.pods[0];
    let refused_before_change = std::thread::scope(|s| {
        let attempt = s.spawn(|| client.tcp_connect(to, patience));
        // Wait until the server's ingress refused the first SYN, then allow the connection.
        let refused = || dp_counters(dp, server_if)[1].dropped_policy;
        let deadline = Instant::now() + ARRIVES;
        while refused() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let before = refused();
        dp.replace_policy(old, &server_allowing(&[PORT]))
            .expect("replacing the policy");
        let stream = attempt.join().expect("the connecting thread");
        stream.unwrap_or_else(|e| panic!("the retransmitted SYN opens the connection: {e}"));
        before
    });
    pods.assert(refused_before_change >= 1, "the first SYN was refused");
    let _s = accept_within(&listener, ARRIVES).expect("accepting");
    let e = pods.tcp_entries(Who::Server, PORT);
    pods.assert_eq(e.len(), 1, "one connection");
    pods.assert_eq(
        pods.counters(Who::Server)[1].new_connections,
        1,
        "one connection accepted",
    );
}

fn dp_counters(dp: &kubesg_agent::datapath::Datapath, ifindex: u32) -> [Counters; 2] {
    dp.counters(ifindex)
        .expect("reading counters")
        .expect("a registered endpoint")
}

/// The server's ingress on [`PORT`] from `others` filler hosts (none of them the client) and,
/// with `client`, the client too.
fn server_group(others: usize, client: bool) -> CompiledPolicy {
    let mut peers: Vec<PeerBlock> = (0..others)
        .map(|i| {
            PeerBlock::cidr(
                format!("10.77.{}.{}/32", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap(),
            )
        })
        .collect();
    if client {
        peers.extend(Who::Client.hosts());
    }
    ingress(vec![rule_with(Protocol::Tcp, vec![port(PORT)], peers)])
}

fn hosts_of(pods: &Pods, policy_id: u32) -> usize {
    pods.dp
        .maps()
        .hosts
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.policy_id == policy_id)
        .count()
}

#[test]
fn a_peer_joining_a_large_group_is_one_map_update_and_connects_at_once() {
    require_privileged!();
    let without = server_group(2_000, false);
    let with = server_group(2_000, true);
    let mut pods = Pods::new(Some(&client_allowing(&[PORT])), Some(&without));
    let h = pods.policy(Who::Server).expect("a member");
    let listener = pods.server().tcp_listen(false, PORT).expect("listening");
    let refused = pods
        .client()
        .tcp_connect(pods.server().sockaddr(false, PORT), NEVER_SHORT);
    pods.assert(refused.is_err(), "the client is not a peer yet");
    drop(listener);
    let before = hosts_of(&pods, h.id);

    let change = pods
        .dp
        .update_policy_in_place(h, &without, &with, false)
        .expect("changing the policy")
        .expect("a widening host change goes in place");
    // The client's IPv4 and IPv6 addresses: two host entries, nothing else rewritten.
    pods.assert_eq(change.entries(), 2, "host entries written");
    pods.assert_eq(
        hosts_of(&pods, h.id),
        before + 2,
        "the policy's host entries",
    );
    pods.assert_eq(
        pods.policy(Who::Server),
        Some(h),
        "the endpoint kept its policy",
    );
    let (mut c, mut s) = pods.tcp_open(false, PORT);
    pods.assert(
        pods.still_carries((&mut c, &mut s), Who::Server, PORT, h),
        "the connection flows",
    );
}

#[test]
fn a_peer_leaving_takes_the_switch_under_recheck_and_goes_in_place_without() {
    require_privileged!();
    let with = server_group(2_000, true);
    let without = server_group(2_000, false);
    for recheck in [true, false] {
        let mut pods = Pods::new(Some(&client_allowing(&[PORT])), Some(&with));
        if !recheck {
            let mut c = pods.dp.config().expect("reading the config");
            c.flags &= !CFG_RECHECK_ON_POLICY_CHANGE;
            pods.dp.set_config(&c).expect("writing the config");
        }
        let h = pods.policy(Who::Server).expect("a member");
        let (mut c, mut s) = pods.tcp_open(false, PORT);
        let change = pods
            .dp
            .update_policy_in_place(h, &with, &without, !recheck)
            .expect("changing the policy");
        if recheck {
            // Narrowing under re-check: nothing written; the switch's new id re-checks.
            pods.assert(
                change.is_none(),
                "narrowing under re-check is not done in place",
            );
            let new = pods
                .dp
                .replace_policy(h, &without)
                .expect("replacing the policy");
            pods.assert(
                !pods.still_carries((&mut c, &mut s), Who::Server, PORT, new),
                "the connection is cut",
            );
            pods.assert_cut(Who::Server, PORT);
        } else {
            let change = change.expect("in place without re-check");
            pods.assert_eq(change.entries(), 2, "host entries deleted");
            pods.assert(
                pods.still_carries((&mut c, &mut s), Who::Server, PORT, h),
                "tracked connections live on",
            );
            let again = pods
                .client()
                .tcp_connect(pods.server().sockaddr(false, PORT), NEVER_SHORT);
            pods.assert(again.is_err(), "a new connection is refused");
        }
    }
}

/// How long a refused connection attempt is given (its SYN is dropped: it can only time out).
const NEVER_SHORT: Duration = Duration::from_millis(500);
