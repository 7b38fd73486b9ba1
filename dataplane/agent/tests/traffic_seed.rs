//! The seed's scenarios on real traffic between two pod namespaces: the client 192.168.1.5 may
//! open TCP and UDP to the server 192.168.1.7:23 and nothing else; the server may not open
//! anything back. Plus ICMP echo, ICMP errors (RELATED) and a stray ACK (INVALID), over IPv4 and
//! IPv6.

use std::{io::ErrorKind, time::Duration};

use kubesg_agent::policy::{CompiledPolicy, Protocol};
use kubesg_common::{conntrack::TcpState, proto};
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    netns::{accept_within, is_timeout, RecvWithin},
    packet::{self, TcpFlags},
    pods::{Pods, Who, ARRIVES, NEVER},
    rules::{echo_requests, egress, ingress, port, rule_with},
};

/// The seed's client: may open TCP and UDP to the server's port 23, nothing else.
fn seed_client() -> CompiledPolicy {
    egress(vec![
        rule_with(Protocol::Tcp, vec![port(23)], Who::Server.hosts()),
        rule_with(Protocol::Udp, vec![port(23)], Who::Server.hosts()),
    ])
}

/// The seed's server: accepts TCP and UDP on port 23 from the client, opens nothing.
fn seed_server() -> CompiledPolicy {
    ingress(vec![
        rule_with(Protocol::Tcp, vec![port(23)], Who::Client.hosts()),
        rule_with(Protocol::Udp, vec![port(23)], Who::Client.hosts()),
    ])
}

fn seed_pods() -> Pods {
    Pods::new(Some(&seed_client()), Some(&seed_server()))
}

ipv4_and_ipv6!(
    client_tcp_to_port_23_carries_data_both_ways_and_is_established,
    client_udp_to_port_23_is_replied_and_established,
    server_cannot_open_tcp_back_to_the_client,
    server_cannot_send_udp_to_a_bound_client_port,
    echo_allowed_by_rules_is_answered,
    echo_the_other_way_is_refused,
    port_unreachable_comes_back_as_related,
    stray_ack_from_member_is_dropped_as_invalid,
    stray_ack_from_non_member_passes_and_draws_a_reset,
);

fn client_tcp_to_port_23_carries_data_both_ways_and_is_established(f: Family) {
    let v6 = f.is_v6();
    let pods = seed_pods();
    let (_c, _s) = pods.tcp_open(v6, 23);
    for who in [Who::Client, Who::Server] {
        let entries = pods.tcp_entries(who, 23);
        pods.assert_eq(entries.len(), 1, &format!("{who:?}: one connection"));
        let e = &entries[0];
        pods.assert_eq(e.tcp_state(), Some(TcpState::Established), "established");
        pods.assert(e.seen_reply() && e.assured(), "replied and assured");
        assert_eq!(e.original().src, pods.client().addr(v6));
        assert_eq!(e.original().dst, pods.server().addr(v6));
        assert_eq!(e.original().dport, 23);
    }
    let [out, _] = pods.counters(Who::Client);
    pods.assert_eq(out.new_connections, 1, "one connection");
    pods.assert_eq(
        out.dropped_policy + out.dropped_invalid,
        0,
        "nothing dropped",
    );
}

fn client_udp_to_port_23_is_replied_and_established(f: Family) {
    let v6 = f.is_v6();
    let pods = seed_pods();
    let (client, server) = pods.udp_sockets(v6, 23, ARRIVES);
    let dst = pods.server().sockaddr(v6, 23);
    let mut buf = [0u8; 16];
    for round in 0..2 {
        client.send_to(b"query", dst).expect("sending");
        let (n, from) = server.recv_from_within(&mut buf).unwrap_or_else(|e| {
            panic!(
                "round {round}: the query did not arrive: {e}\n{}",
                pods.dump()
            )
        });
        assert_eq!(&buf[..n], b"query");
        server.send_to(b"answer", from).expect("answering");
        let n = client.recv_within(&mut buf).unwrap_or_else(|e| {
            panic!(
                "round {round}: the answer did not arrive: {e}\n{}",
                pods.dump()
            )
        });
        assert_eq!(&buf[..n], b"answer");
    }
    let udp = pods.proto_entries(Who::Client, proto::UDP);
    pods.assert_eq(udp.len(), 1, "one UDP flow");
    pods.assert(udp[0].seen_reply(), "the reply was seen");
    assert_eq!(udp[0].original().dport, 23);
    let [out, inc] = pods.counters(Who::Client);
    pods.assert_eq(out.new_connections, 1, "one connection");
    pods.assert_eq(
        out.dropped_policy + inc.dropped_policy,
        0,
        "nothing refused",
    );
}

fn server_cannot_open_tcp_back_to_the_client(f: Family) {
    let v6 = f.is_v6();
    let pods = seed_pods();
    let listener = pods
        .client()
        .tcp_listen(v6, 2323)
        .expect("client listening");
    let r = pods
        .server()
        .tcp_connect(pods.client().sockaddr(v6, 2323), NEVER);
    pods.assert_dropped(r, "server connecting to the client's port 2323");
    assert!(accept_within(&listener, Duration::from_millis(50)).is_err());
    let [out, _] = pods.counters(Who::Server);
    pods.assert(out.dropped_policy >= 1, "refused by policy");
    for who in [Who::Server, Who::Client] {
        pods.assert(pods.tcp_entries(who, 2323).is_empty(), "no state");
    }
}

fn server_cannot_send_udp_to_a_bound_client_port(f: Family) {
    let v6 = f.is_v6();
    let pods = seed_pods();
    let client = pods
        .client()
        .udp_bind(v6, 2324, NEVER)
        .expect("client socket");
    let server = pods.server().udp_bind(v6, 0, NEVER).expect("server socket");
    server
        .send_to(b"unsolicited", pods.client().sockaddr(v6, 2324))
        .expect("sending");
    let mut buf = [0u8; 16];
    match client.recv_within(&mut buf) {
        Err(e) if is_timeout(&e) => {}
        other => panic!(
            "the server's datagram must be dropped, got {other:?}\n{}",
            pods.dump()
        ),
    }
    let [out, _] = pods.counters(Who::Server);
    pods.assert(out.dropped_policy >= 1, "refused by policy");
    pods.assert(pods.entries(Who::Server).is_empty(), "no state");
}

fn echo_pods() -> Pods {
    Pods::new(
        Some(&egress(echo_requests(Who::Server.hosts()))),
        Some(&ingress(echo_requests(Who::Client.hosts()))),
    )
}

fn echo_allowed_by_rules_is_answered(f: Family) {
    let v6 = f.is_v6();
    let pods = echo_pods();
    let answered = pods
        .client()
        .ping_id(pods.server().addr(v6), 0x5eed, ARRIVES)
        .expect("running ping");
    pods.assert(answered, "the echo was allowed both ways");
    let icmp: Vec<_> = pods
        .entries(Who::Client)
        .into_iter()
        .filter(|c| c.key.pod_port == 0x5eed)
        .collect();
    pods.assert_eq(icmp.len(), 1, "one echo flow");
    pods.assert(icmp[0].seen_reply(), "replied");
    assert_eq!(icmp[0].original().dport, u16::from(f.echo_request_type()));
    assert_eq!(pods.counters(Who::Client)[0].new_connections, 1);
}

fn echo_the_other_way_is_refused(f: Family) {
    let v6 = f.is_v6();
    let pods = echo_pods();
    let answered = pods
        .server()
        .ping(pods.client().addr(v6), NEVER)
        .expect("running ping");
    pods.assert(!answered, "no rule lets the server ping");
    pods.assert(
        pods.counters(Who::Server)[0].dropped_policy >= 1,
        "refused by policy",
    );
    pods.assert(pods.entries(Who::Server).is_empty(), "no state");
}

fn port_unreachable_comes_back_as_related(f: Family) {
    let v6 = f.is_v6();
    // Nothing listens on the server's UDP port 23, which the rules allow: the server's kernel
    // answers with an ICMP port unreachable.
    let pods = seed_pods();
    let client = pods
        .client()
        .udp_bind(v6, 0, ARRIVES)
        .expect("client socket");
    client
        .connect(pods.server().sockaddr(v6, 23))
        .expect("connecting the UDP socket");
    client.send(b"anyone?").expect("sending");
    let mut buf = [0u8; 16];
    match client.recv_within(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!(
            "expected ECONNREFUSED from the port unreachable, got {other:?}\n{}",
            pods.dump()
        ),
    }
    let [_, inc] = pods.counters(Who::Client);
    pods.assert(inc.related >= 1, "the error is RELATED");
    pods.assert_eq(inc.dropped_invalid, 0, "not INVALID");
    let [out, _] = pods.counters(Who::Server);
    pods.assert(out.related >= 1, "RELATED on the server's side too");
    let udp = pods.proto_entries(Who::Client, proto::UDP);
    pods.assert_eq(udp.len(), 1, "one UDP flow");
    pods.assert(!udp[0].seen_reply(), "an error is no reply: [UNREPLIED]");
}

/// Sends a bare ACK from the client's port 40000 to the server's port 23 (no connection exists)
/// and reports whether the server answered it with a RST within [`NEVER`].
fn stray_ack_draws_a_reset(pods: &Pods, v6: bool) -> bool {
    let (c, s) = (pods.client().addr(v6), pods.server().addr(v6));
    let sniffer = pods.client().tcp_sniffer(v6).expect("sniffer");
    let ack = TcpFlags {
        ack: true,
        ..TcpFlags::default()
    };
    let frame = packet::tcp(c, s, 40000, 23, ack);
    pods.client()
        .send_raw_ip(&frame[14..], s)
        .expect("sending the raw ACK");
    let rst = sniffer
        .wait_for(NEVER, |src, seg| {
            src == s
                && seg.len() >= 20
                && u16::from_be_bytes([seg[0], seg[1]]) == 23
                && u16::from_be_bytes([seg[2], seg[3]]) == 40000
                && seg[13] & 0x04 != 0
        })
        .expect("sniffing");
    rst.is_some()
}

fn stray_ack_from_member_is_dropped_as_invalid(f: Family) {
    let v6 = f.is_v6();
    // Even to a port its rules allow, a segment that is not a SYN opens nothing.
    let pods = Pods::new(Some(&seed_client()), None);
    pods.assert(
        !stray_ack_draws_a_reset(&pods, v6),
        "the stray ACK reached the server",
    );
    let [out, _] = pods.counters(Who::Client);
    pods.assert(out.dropped_invalid >= 1, "dropped as INVALID");
    let [_, peer_in] = pods.counters(Who::Server);
    pods.assert_eq(peer_in.invalid_passed, 0, "the server never saw it");
    pods.assert(pods.entries(Who::Client).is_empty(), "no state");
}

fn stray_ack_from_non_member_passes_and_draws_a_reset(f: Family) {
    let v6 = f.is_v6();
    // The control of the test above: the same ACK from a pod that is not filtered reaches the
    // server, which resets it, so the absence of the RST above means the ACK was dropped.
    let pods = Pods::new(None, None);
    pods.assert(
        stray_ack_draws_a_reset(&pods, v6),
        "the server answers a stray ACK with a RST",
    );
    let [out, _] = pods.counters(Who::Client);
    pods.assert(out.invalid_passed >= 1, "INVALID, counted, passed");
    let [_, peer_in] = pods.counters(Who::Server);
    pods.assert(
        peer_in.invalid_passed >= 1,
        "INVALID on the server's side too",
    );
}
