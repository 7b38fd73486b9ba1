//! Membership on real traffic: between two member pods a connection needs both the client's
//! egress rules and the server's ingress rules; a connection opened while a pod was not a member
//! is judged by the rules it gets when it joins (kept if they allow it, cut if not).

use kubesg_agent::policy::{CompiledPolicy, Protocol};
use kubesg_common::conntrack::TcpState;
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    pods::{Pods, Who, NEVER},
    require_privileged,
    rules::{egress, ingress, port, rule_with},
};

/// The port the connections under test use.
const PORT: u16 = 8080;
/// Another port, so that a pod is a member with rules that do not cover [`PORT`].
const OTHER: u16 = 9090;

fn client_allowing(p: u16) -> CompiledPolicy {
    egress(vec![rule_with(
        Protocol::Tcp,
        vec![port(p)],
        Who::Server.hosts(),
    )])
}

fn server_allowing(p: u16) -> CompiledPolicy {
    ingress(vec![rule_with(
        Protocol::Tcp,
        vec![port(p)],
        Who::Client.hosts(),
    )])
}

ipv4_and_ipv6!(
    connection_allowed_only_by_client_egress_is_refused,
    connection_allowed_only_by_server_ingress_is_refused,
    connection_allowed_by_both_ends_opens,
    connection_opened_before_client_joined_is_kept_when_its_rules_allow_it,
    connection_opened_before_client_joined_is_cut_when_its_rules_do_not,
);

/// The client connects to the server's [`PORT`], the client's rules allowing `client_port` and
/// the server's `server_port`; asserts that the attempt got no answer at all.
fn connect_unanswered(client_port: u16, server_port: u16, v6: bool) -> Pods {
    let pods = Pods::new(
        Some(&client_allowing(client_port)),
        Some(&server_allowing(server_port)),
    );
    let _listener = pods.server().tcp_listen(v6, PORT).expect("listening");
    let r = pods
        .client()
        .tcp_connect(pods.server().sockaddr(v6, PORT), NEVER);
    pods.assert_dropped(r, "connecting");
    pods
}

fn connection_allowed_only_by_client_egress_is_refused(f: Family) {
    let pods = connect_unanswered(PORT, OTHER, f.is_v6());
    // The client let its SYN out (its egress allows it); the server's ingress refused it.
    let [c_out, _] = pods.counters(Who::Client);
    pods.assert_eq(c_out.new_connections, 1, "the client let its SYN out");
    pods.assert_eq(c_out.dropped_policy, 0, "the client refused nothing");
    let [_, s_in] = pods.counters(Who::Server);
    pods.assert(s_in.dropped_policy >= 1, "the server refused the SYN");
    pods.assert(pods.tcp_entries(Who::Server, PORT).is_empty(), "no state");
    let c = pods.tcp_entries(Who::Client, PORT);
    pods.assert_eq(c.len(), 1, "the client's SYN is tracked");
    assert_eq!(c[0].tcp_state(), Some(TcpState::SynSent));
    pods.assert(!c[0].seen_reply(), "[UNREPLIED]");
}

fn connection_allowed_only_by_server_ingress_is_refused(f: Family) {
    let pods = connect_unanswered(OTHER, PORT, f.is_v6());
    let [c_out, _] = pods.counters(Who::Client);
    pods.assert(c_out.dropped_policy >= 1, "the client refused its SYN");
    pods.assert_eq(c_out.new_connections, 0, "no connection");
    let [_, s_in] = pods.counters(Who::Server);
    pods.assert_eq(s_in.new_connections, 0, "the SYN never reached the server");
    for who in [Who::Client, Who::Server] {
        pods.assert(pods.tcp_entries(who, PORT).is_empty(), "no state");
    }
}

fn connection_allowed_by_both_ends_opens(f: Family) {
    let pods = Pods::new(Some(&client_allowing(PORT)), Some(&server_allowing(PORT)));
    let (_c, _s) = pods.tcp_open(f.is_v6(), PORT);
    for who in [Who::Client, Who::Server] {
        let e = pods.tcp_entries(who, PORT);
        pods.assert_eq(e.len(), 1, &format!("{who:?}: one connection"));
        pods.assert_eq(e[0].tcp_state(), Some(TcpState::Established), "established");
    }
    assert_eq!(pods.counters(Who::Client)[0].new_connections, 1);
    assert_eq!(pods.counters(Who::Server)[1].new_connections, 1);
}

/// Opens a connection while neither pod is a member, then makes `who` a member with `policy`;
/// returns whether data still flows from the client to the server (and, when it does, checks it
/// flows back too and the entry was re-stamped with the new policy), and the pods for more checks.
fn join_after_connecting(who: Who, policy: &CompiledPolicy, v6: bool) -> (bool, Pods) {
    let mut pods = Pods::new(None, None);
    let (mut c, mut s) = pods.tcp_open(v6, PORT);
    pods.assert_eq(
        pods.tcp_entries(who, PORT).len(),
        1,
        "tracked before joining",
    );
    let handle = pods.dp.install_policy(policy).expect("installing");
    let ifindex = pods.ifindex(who);
    pods.dp
        .set_endpoint(ifindex, Some(handle))
        .expect("joining");
    let flows = pods.still_carries((&mut c, &mut s), who, PORT, handle);
    (flows, pods)
}

fn connection_opened_before_client_joined_is_kept_when_its_rules_allow_it(f: Family) {
    let (flows, pods) = join_after_connecting(Who::Client, &client_allowing(PORT), f.is_v6());
    pods.assert(flows, "the client's new rules allow the connection");
    let [out, inc] = pods.counters(Who::Client);
    pods.assert_eq(
        out.dropped_policy + out.dropped_invalid,
        0,
        "nothing sent dropped",
    );
    pods.assert_eq(
        inc.dropped_policy + inc.dropped_invalid,
        0,
        "nothing received dropped",
    );
}

fn connection_opened_before_client_joined_is_cut_when_its_rules_do_not(f: Family) {
    let (flows, pods) = join_after_connecting(Who::Client, &client_allowing(OTHER), f.is_v6());
    pods.assert(!flows, "the client's new rules do not allow the connection");
    pods.assert_cut(Who::Client, PORT);
}

#[test]
fn connection_accepted_before_server_joined_is_kept_when_its_ingress_rules_allow_it() {
    require_privileged!();
    let (flows, pods) = join_after_connecting(Who::Server, &server_allowing(PORT), false);
    pods.assert(flows, "the server's new rules allow the connection");
}

#[test]
fn connection_accepted_before_server_joined_is_cut_when_its_ingress_rules_do_not() {
    require_privileged!();
    let (flows, pods) = join_after_connecting(Who::Server, &server_allowing(OTHER), false);
    pods.assert(!flows, "the server's new rules do not allow the connection");
    pods.assert_cut(Who::Server, PORT);
}
