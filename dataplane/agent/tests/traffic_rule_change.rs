//! Rule changes on established connections, on real traffic: under re-check (the default) a
//! connection the new rules no longer allow is cut on its next packet and its entry deleted, one
//! they still allow lives on; with re-check off (AWS's behaviour) tracked connections live on
//! whatever the new rules say. A rule added while a refused SYN is being retransmitted lets the
//! retransmission open the connection (a refused SYN left no state behind).

mod traffic_fixture;

use std::time::{Duration, Instant};

use kubesg_agent::policy::{CompiledPolicy, Protocol};
use kubesg_common::{config::CFG_RECHECK_ON_POLICY_CHANGE, conntrack::TcpState, event::Counters};
use kubesg_testkit::{netns::accept_within, require_privileged};
use traffic_fixture::*;

const PORT: u16 = 8080;
const OTHER: u16 = 9090;

fn client_allowing(ports: &[u16]) -> CompiledPolicy {
    egress(vec![rule(Protocol::Tcp, ports, Who::Server)])
}

fn server_allowing(ports: &[u16]) -> CompiledPolicy {
    ingress(vec![rule(Protocol::Tcp, ports, Who::Client)])
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
    let old = match who {
        Who::Client => pods.client_policy,
        Who::Server => pods.server_policy,
    }
    .expect("a member");
    let new = pods
        .dp
        .replace_policy(old, new)
        .expect("replacing the policy");
    let flows = data_gets_through(&mut c, &mut s);
    if flows {
        assert!(
            data_gets_through(&mut s, &mut c),
            "replies flow\n{}",
            pods.dump()
        );
        let e = pods.tcp_entries(who, PORT);
        assert_eq!(e.len(), 1, "{}", pods.dump());
        assert_eq!(
            e[0].tcp_state(),
            Some(TcpState::Established),
            "{}",
            pods.dump()
        );
        assert_eq!(e[0].entry.policy_id, new.id, "{}", pods.dump());
    }
    (flows, pods)
}

fn egress_rule_removal_cuts_established_connection_under_recheck(v6: bool) {
    let (flows, pods) = change_rules(Who::Client, &client_allowing(&[OTHER]), true, v6);
    assert!(!flows, "the connection is cut\n{}", pods.dump());
    assert!(
        pods.counters(Who::Client)[0].dropped_policy >= 1,
        "{}",
        pods.dump()
    );
    assert!(
        pods.tcp_entries(Who::Client, PORT).is_empty(),
        "its entry is gone\n{}",
        pods.dump()
    );
}

#[test]
fn egress_rule_removal_cuts_established_connection_under_recheck_v4() {
    require_privileged!();
    egress_rule_removal_cuts_established_connection_under_recheck(false);
}

#[test]
fn egress_rule_removal_cuts_established_connection_under_recheck_v6() {
    require_privileged!();
    egress_rule_removal_cuts_established_connection_under_recheck(true);
}

fn egress_rule_removal_keeps_established_connection_without_recheck(v6: bool) {
    let (flows, pods) = change_rules(Who::Client, &client_allowing(&[OTHER]), false, v6);
    assert!(flows, "tracked connections live on\n{}", pods.dump());
    let [out, inc] = pods.counters(Who::Client);
    assert_eq!(
        out.dropped_policy + inc.dropped_policy,
        0,
        "{}",
        pods.dump()
    );
}

#[test]
fn egress_rule_removal_keeps_established_connection_without_recheck_v4() {
    require_privileged!();
    egress_rule_removal_keeps_established_connection_without_recheck(false);
}

#[test]
fn egress_rule_removal_keeps_established_connection_without_recheck_v6() {
    require_privileged!();
    egress_rule_removal_keeps_established_connection_without_recheck(true);
}

#[test]
fn rule_change_that_still_allows_connection_keeps_it_under_recheck() {
    require_privileged!();
    let (flows, pods) = change_rules(Who::Client, &client_allowing(&[OTHER, PORT]), true, false);
    assert!(flows, "the new rules still allow it\n{}", pods.dump());
    assert_eq!(
        pods.counters(Who::Client)[0].dropped_policy,
        0,
        "{}",
        pods.dump()
    );
}

#[test]
fn ingress_rule_removal_cuts_accepted_connection_under_recheck() {
    require_privileged!();
    let (flows, pods) = change_rules(Who::Server, &server_allowing(&[OTHER]), true, false);
    assert!(!flows, "the connection is cut\n{}", pods.dump());
    assert!(
        pods.counters(Who::Server)[1].dropped_policy >= 1,
        "{}",
        pods.dump()
    );
    assert!(
        pods.tcp_entries(Who::Server, PORT).is_empty(),
        "{}",
        pods.dump()
    );
}

#[test]
fn ingress_rule_removal_keeps_accepted_connection_without_recheck() {
    require_privileged!();
    let (flows, pods) = change_rules(Who::Server, &server_allowing(&[OTHER]), false, false);
    assert!(flows, "tracked connections live on\n{}", pods.dump());
}

fn rule_added_while_a_refused_syn_retransmits_lets_it_open(v6: bool) {
    let mut pods = Pods::new(
        Some(&client_allowing(&[PORT])),
        Some(&server_allowing(&[OTHER])),
    );
    let listener = pods.server().tcp_listen(v6, PORT).expect("listening");
    let to = pods.server().sockaddr(v6, PORT);
    let old = pods.server_policy.expect("a member");
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
    assert!(
        refused_before_change >= 1,
        "the first SYN was refused\n{}",
        pods.dump()
    );
    let _s = accept_within(&listener, ARRIVES).expect("accepting");
    let e = pods.tcp_entries(Who::Server, PORT);
    assert_eq!(e.len(), 1, "{}", pods.dump());
    assert_eq!(
        pods.counters(Who::Server)[1].new_connections,
        1,
        "{}",
        pods.dump()
    );
}

fn dp_counters(dp: &kubesg_agent::datapath::Datapath, ifindex: u32) -> [Counters; 2] {
    dp.counters(ifindex)
        .expect("reading counters")
        .expect("a registered endpoint")
}

#[test]
fn rule_added_while_a_refused_syn_retransmits_lets_it_open_v4() {
    require_privileged!();
    rule_added_while_a_refused_syn_retransmits_lets_it_open(false);
}

#[test]
fn rule_added_while_a_refused_syn_retransmits_lets_it_open_v6() {
    require_privileged!();
    rule_added_while_a_refused_syn_retransmits_lets_it_open(true);
}
