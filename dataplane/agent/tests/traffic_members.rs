//! Membership on real traffic: between two member pods a connection needs both the client's
//! egress rules and the server's ingress rules; a connection opened while a pod was not a member
//! is judged by the rules it gets when it joins (kept if they allow it, cut if not).

mod traffic_fixture;

use kubesg_agent::policy::{CompiledPolicy, Protocol};
use kubesg_common::conntrack::TcpState;
use kubesg_testkit::require_privileged;
use traffic_fixture::*;

/// The port the connections under test use.
const PORT: u16 = 8080;
/// Another port, so that a pod is a member with rules that do not cover [`PORT`].
const OTHER: u16 = 9090;

fn client_allowing(port: u16) -> CompiledPolicy {
    egress(vec![rule(Protocol::Tcp, &[port], Who::Server)])
}

fn server_allowing(port: u16) -> CompiledPolicy {
    ingress(vec![rule(Protocol::Tcp, &[port], Who::Client)])
}

fn connection_allowed_only_by_client_egress_is_refused(v6: bool) {
    let pods = Pods::new(Some(&client_allowing(PORT)), Some(&server_allowing(OTHER)));
    let _listener = pods.server().tcp_listen(v6, PORT).expect("listening");
    let r = pods
        .client()
        .tcp_connect(pods.server().sockaddr(v6, PORT), NEVER);
    assert_dropped(r, "connecting", &pods);
    // The client let its SYN out (its egress allows it); the server's ingress refused it.
    let [c_out, _] = pods.counters(Who::Client);
    assert_eq!(c_out.new_connections, 1, "{}", pods.dump());
    assert_eq!(c_out.dropped_policy, 0, "{}", pods.dump());
    let [_, s_in] = pods.counters(Who::Server);
    assert!(s_in.dropped_policy >= 1, "{}", pods.dump());
    assert!(
        pods.tcp_entries(Who::Server, PORT).is_empty(),
        "{}",
        pods.dump()
    );
    let c = pods.tcp_entries(Who::Client, PORT);
    assert_eq!(c.len(), 1, "{}", pods.dump());
    assert_eq!(c[0].tcp_state(), Some(TcpState::SynSent));
    assert!(!c[0].seen_reply(), "{}", pods.dump());
}

#[test]
fn connection_allowed_only_by_client_egress_is_refused_v4() {
    require_privileged!();
    connection_allowed_only_by_client_egress_is_refused(false);
}

#[test]
fn connection_allowed_only_by_client_egress_is_refused_v6() {
    require_privileged!();
    connection_allowed_only_by_client_egress_is_refused(true);
}

fn connection_allowed_only_by_server_ingress_is_refused(v6: bool) {
    let pods = Pods::new(Some(&client_allowing(OTHER)), Some(&server_allowing(PORT)));
    let _listener = pods.server().tcp_listen(v6, PORT).expect("listening");
    let r = pods
        .client()
        .tcp_connect(pods.server().sockaddr(v6, PORT), NEVER);
    assert_dropped(r, "connecting", &pods);
    let [c_out, _] = pods.counters(Who::Client);
    assert!(c_out.dropped_policy >= 1, "{}", pods.dump());
    assert_eq!(c_out.new_connections, 0, "{}", pods.dump());
    let [_, s_in] = pods.counters(Who::Server);
    assert_eq!(
        s_in.new_connections,
        0,
        "the SYN never reached the server\n{}",
        pods.dump()
    );
    assert!(
        pods.tcp_entries(Who::Client, PORT).is_empty(),
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
fn connection_allowed_only_by_server_ingress_is_refused_v4() {
    require_privileged!();
    connection_allowed_only_by_server_ingress_is_refused(false);
}

#[test]
fn connection_allowed_only_by_server_ingress_is_refused_v6() {
    require_privileged!();
    connection_allowed_only_by_server_ingress_is_refused(true);
}

fn connection_allowed_by_both_ends_opens(v6: bool) {
    let pods = Pods::new(Some(&client_allowing(PORT)), Some(&server_allowing(PORT)));
    let (_c, _s) = pods.tcp_open(v6, PORT);
    for who in [Who::Client, Who::Server] {
        let e = pods.tcp_entries(who, PORT);
        assert_eq!(e.len(), 1, "{who:?}\n{}", pods.dump());
        assert_eq!(
            e[0].tcp_state(),
            Some(TcpState::Established),
            "{}",
            pods.dump()
        );
    }
    assert_eq!(pods.counters(Who::Client)[0].new_connections, 1);
    assert_eq!(pods.counters(Who::Server)[1].new_connections, 1);
}

#[test]
fn connection_allowed_by_both_ends_opens_v4() {
    require_privileged!();
    connection_allowed_by_both_ends_opens(false);
}

#[test]
fn connection_allowed_by_both_ends_opens_v6() {
    require_privileged!();
    connection_allowed_by_both_ends_opens(true);
}

/// Opens a connection while neither pod is a member, then makes `who` a member with `policy`;
/// returns whether data still flows from the client to the server (and, when it does, checks it
/// flows back too and the entry was re-stamped with the new policy), and the pods for more checks.
fn join_after_connecting(who: Who, policy: &CompiledPolicy, v6: bool) -> (bool, Pods) {
    let mut pods = Pods::new(None, None);
    let (mut c, mut s) = pods.tcp_open(v6, PORT);
    assert_eq!(pods.tcp_entries(who, PORT).len(), 1, "{}", pods.dump());
    let handle = pods.dp.install_policy(policy).expect("installing");
    let ifindex = pods.ifindex(who);
    pods.dp
        .set_endpoint(ifindex, Some(handle))
        .expect("joining");
    let flows = data_gets_through(&mut c, &mut s);
    if flows {
        assert!(
            data_gets_through(&mut s, &mut c),
            "replies flow\n{}",
            pods.dump()
        );
        let e = pods.tcp_entries(who, PORT);
        assert_eq!(e.len(), 1, "{}", pods.dump());
        assert_eq!(e[0].entry.policy_id, handle.id, "judged by the new rules");
        assert_eq!(e[0].tcp_state(), Some(TcpState::Established));
    }
    (flows, pods)
}

fn connection_opened_before_client_joined_is_kept_when_its_rules_allow_it(v6: bool) {
    let (flows, pods) = join_after_connecting(Who::Client, &client_allowing(PORT), v6);
    assert!(
        flows,
        "the client's new rules allow the connection\n{}",
        pods.dump()
    );
    let [out, inc] = pods.counters(Who::Client);
    assert_eq!(
        out.dropped_policy + out.dropped_invalid,
        0,
        "{}",
        pods.dump()
    );
    assert_eq!(
        inc.dropped_policy + inc.dropped_invalid,
        0,
        "{}",
        pods.dump()
    );
}

#[test]
fn connection_opened_before_client_joined_is_kept_when_its_rules_allow_it_v4() {
    require_privileged!();
    connection_opened_before_client_joined_is_kept_when_its_rules_allow_it(false);
}

#[test]
fn connection_opened_before_client_joined_is_kept_when_its_rules_allow_it_v6() {
    require_privileged!();
    connection_opened_before_client_joined_is_kept_when_its_rules_allow_it(true);
}

fn connection_opened_before_client_joined_is_cut_when_its_rules_do_not(v6: bool) {
    let (flows, pods) = join_after_connecting(Who::Client, &client_allowing(OTHER), v6);
    assert!(
        !flows,
        "the client's new rules do not allow the connection\n{}",
        pods.dump()
    );
    assert!(
        pods.counters(Who::Client)[0].dropped_policy >= 1,
        "{}",
        pods.dump()
    );
    assert!(
        pods.tcp_entries(Who::Client, PORT).is_empty(),
        "the entry is gone\n{}",
        pods.dump()
    );
}

#[test]
fn connection_opened_before_client_joined_is_cut_when_its_rules_do_not_v4() {
    require_privileged!();
    connection_opened_before_client_joined_is_cut_when_its_rules_do_not(false);
}

#[test]
fn connection_opened_before_client_joined_is_cut_when_its_rules_do_not_v6() {
    require_privileged!();
    connection_opened_before_client_joined_is_cut_when_its_rules_do_not(true);
}

#[test]
fn connection_accepted_before_server_joined_is_kept_when_its_ingress_rules_allow_it() {
    require_privileged!();
    let (flows, pods) = join_after_connecting(Who::Server, &server_allowing(PORT), false);
    assert!(
        flows,
        "the server's new rules allow the connection\n{}",
        pods.dump()
    );
}

#[test]
fn connection_accepted_before_server_joined_is_cut_when_its_ingress_rules_do_not() {
    require_privileged!();
    let (flows, pods) = join_after_connecting(Who::Server, &server_allowing(OTHER), false);
    assert!(
        !flows,
        "the server's new rules do not allow the connection\n{}",
        pods.dump()
    );
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
