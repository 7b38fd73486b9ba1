//! Protocol corners on real traffic between member pods: IP fragments follow their first
//! fragment's verdict, ICMP errors about a TCP connection are RELATED while ICMP errors about no
//! connection are INVALID, and a SYN reopens a connection in TIME_WAIT.

use std::{
    io::ErrorKind,
    net::IpAddr,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use kubesg_agent::policy::{CompiledPolicy, Protocol};
use kubesg_common::conntrack::TcpState;
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    netns::{accept_within, RecvWithin},
    packet,
    pods::{close_from, exchange, Pods, Who, ARRIVES, NEVER},
    rules::{egress, ingress, port, rule_with},
};

/// A datagram larger than the veth's 1500-byte MTU: sent as three fragments.
const BIG: usize = 4000;

/// The client may send `protocol` to the server's port `p`.
fn client_allowing(protocol: Protocol, p: u16) -> CompiledPolicy {
    egress(vec![rule_with(
        protocol,
        vec![port(p)],
        Who::Server.hosts(),
    )])
}

/// Both pods members: the client may open `protocol` to the server's port `p`, the server
/// accepts it.
fn pods_allowing(protocol: Protocol, p: u16) -> Pods {
    let server = ingress(vec![rule_with(
        protocol,
        vec![port(p)],
        Who::Client.hosts(),
    )]);
    Pods::new(Some(&client_allowing(protocol, p)), Some(&server))
}

ipv4_and_ipv6!(
    fragmented_datagram_passes_both_ways,
    fragments_of_a_refused_datagram_are_all_dropped,
    icmp_rejection_of_a_syn_is_related,
    unrelated_icmp_error_to_member_is_dropped_as_invalid,
    unrelated_icmp_error_to_non_member_passes,
    syn_reopens_a_connection_in_time_wait,
);

fn fragmented_datagram_passes_both_ways(f: Family) {
    let v6 = f.is_v6();
    let pods = pods_allowing(Protocol::Udp, 23);
    let (client, server) = pods.udp_sockets(v6, 23, ARRIVES);
    let big = vec![0x5a_u8; BIG];
    let mut buf = vec![0u8; BIG + 1];
    client
        .send_to(&big, pods.server().sockaddr(v6, 23))
        .expect("sending");
    let (n, from) = server
        .recv_from_within(&mut buf)
        .unwrap_or_else(|e| panic!("the fragmented query did not arrive: {e}\n{}", pods.dump()));
    assert_eq!(n, BIG);
    server.send_to(&big, from).expect("answering");
    let n = client
        .recv_within(&mut buf)
        .unwrap_or_else(|e| panic!("the fragmented answer did not arrive: {e}\n{}", pods.dump()));
    assert_eq!(n, BIG);
    pods.assert_nothing_dropped();
}

fn fragments_of_a_refused_datagram_are_all_dropped(f: Family) {
    let v6 = f.is_v6();
    let pods = pods_allowing(Protocol::Udp, 23);
    let (client, server) = pods.udp_sockets(v6, 24, NEVER);
    client
        .send_to(&vec![0x5a_u8; BIG], pods.server().sockaddr(v6, 24))
        .expect("sending");
    let mut buf = vec![0u8; BIG + 1];
    pods.assert(
        server.recv_within(&mut buf).is_err(),
        "no rule allows port 24",
    );
    let [out, _] = pods.counters(Who::Client);
    pods.assert(out.dropped_policy >= 1, "the first fragment");
    pods.assert(out.dropped_invalid >= 2, "the later fragments");
    let [_, s_in] = pods.counters(Who::Server);
    pods.assert_eq(
        s_in.new_connections + s_in.dropped_policy + s_in.dropped_invalid + s_in.invalid_passed,
        0,
        "no fragment reached the server's interface",
    );
}

fn icmp_rejection_of_a_syn_is_related(f: Family) {
    let v6 = f.is_v6();
    // The server's own firewall rejects SYNs to 8083 with a port unreachable; the client's rules
    // allow the connection, so the error about it is RELATED and reaches the client.
    let pods = Pods::new(Some(&client_allowing(Protocol::Tcp, 8083)), None);
    let with = f.pick("icmp-port-unreachable", "icmp6-port-unreachable");
    let reject = [
        "-p",
        "tcp",
        "--dport",
        "8083",
        "-j",
        "REJECT",
        "--reject-with",
        with,
    ];
    pods.server()
        .firewall_input(v6, &reject)
        .expect("adding the REJECT rule");
    let r = pods
        .client()
        .tcp_connect(pods.server().sockaddr(v6, 8083), ARRIVES);
    match r {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!(
            "expected the port unreachable, got {other:?}\n{}",
            pods.dump()
        ),
    }
    let [_, inc] = pods.counters(Who::Client);
    pods.assert(inc.related >= 1, "the error is RELATED");
    let e = pods.tcp_entries(Who::Client, 8083);
    pods.assert_eq(e.len(), 1, "one connection");
    pods.assert_eq(
        e[0].tcp_state(),
        Some(TcpState::SynSent),
        "an error is no reply",
    );
    pods.assert(!e[0].seen_reply(), "[UNREPLIED]");
}

/// The server sends the client a crafted port unreachable about a UDP datagram the client never
/// sent (client:40000 → server:53); returns whether it reached the client within [`NEVER`].
fn unrelated_port_unreachable_arrives(pods: &Pods, v6: bool) -> bool {
    let (c, s) = (pods.client().addr(v6), pods.server().addr(v6));
    let inner = packet::udp(c, s, 40000, 53, b"never sent");
    let quoted = &inner[14..];
    let mut pkt = Vec::new();
    let (icmp_proto, unreachable) = match (s, c) {
        (IpAddr::V4(s4), IpAddr::V4(c4)) => {
            PacketBuilder::ipv4(s4.octets(), c4.octets(), 64)
                .icmpv4_raw(3, 3, [0; 4])
                .write(&mut pkt, quoted)
                .expect("building the ICMP error");
            (libc::IPPROTO_ICMP, 3)
        }
        (IpAddr::V6(s6), IpAddr::V6(c6)) => {
            PacketBuilder::ipv6(s6.octets(), c6.octets(), 64)
                .icmpv6_raw(1, 4, [0; 4])
                .write(&mut pkt, quoted)
                .expect("building the ICMPv6 error");
            (libc::IPPROTO_ICMPV6, 1)
        }
        _ => unreachable!("one family"),
    };
    let sniffer = pods
        .client()
        .ns
        .raw_socket(v6, icmp_proto)
        .expect("ICMP sniffer");
    pods.server()
        .send_raw_ip(&pkt, c)
        .expect("sending the error");
    sniffer
        .wait_for(NEVER, |src, msg| {
            src == s && msg.first() == Some(&unreachable)
        })
        .expect("sniffing")
        .is_some()
}

fn unrelated_icmp_error_to_member_is_dropped_as_invalid(f: Family) {
    let v6 = f.is_v6();
    // The client is a member whose rules would even allow the quoted flow; the server, which
    // sends the error, is not filtered.
    let pods = Pods::new(Some(&client_allowing(Protocol::Udp, 53)), None);
    pods.assert(
        !unrelated_port_unreachable_arrives(&pods, v6),
        "an error about no connection must not reach a member",
    );
    let [_, inc] = pods.counters(Who::Client);
    pods.assert(inc.dropped_invalid >= 1, "dropped as INVALID");
    pods.assert_eq(inc.related, 0, "not RELATED");
}

fn unrelated_icmp_error_to_non_member_passes(f: Family) {
    let v6 = f.is_v6();
    // The control of the test above: the crafted error does reach a pod that is not filtered.
    let pods = Pods::new(None, None);
    pods.assert(
        unrelated_port_unreachable_arrives(&pods, v6),
        "the error reaches a non-member",
    );
    pods.assert(
        pods.counters(Who::Client)[1].invalid_passed >= 1,
        "INVALID, counted, passed",
    );
}

fn syn_reopens_a_connection_in_time_wait(f: Family) {
    let v6 = f.is_v6();
    let pods = pods_allowing(Protocol::Tcp, 8080);
    let listener = pods.server().tcp_listen(v6, 8080).expect("listening");
    let to = pods.server().sockaddr(v6, 8080);
    let client = pods.client();
    let mut c = client
        .tcp_connect_from(41007, to, ARRIVES)
        .expect("connecting");
    let mut s = accept_within(&listener, ARRIVES).expect("accepting");
    exchange(&mut c, &mut s).expect("exchanging");
    // The server closes first, so the client's socket is gone at the end while the flow is in
    // TIME_WAIT for conntrack.
    close_from(s, c);
    let deadline = Instant::now() + ARRIVES;
    let in_time_wait = || {
        pods.tcp_entries(Who::Client, 8080)
            .iter()
            .any(|e| e.tcp_state() == Some(TcpState::TimeWait))
    };
    while !in_time_wait() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    pods.assert(in_time_wait(), "the first connection is in TIME_WAIT");

    let mut c = client
        .tcp_connect_from(41007, to, ARRIVES)
        .unwrap_or_else(|e| panic!("reopening: {e}\n{}", pods.dump()));
    let mut s = accept_within(&listener, ARRIVES).expect("accepting");
    exchange(&mut c, &mut s).unwrap_or_else(|e| panic!("{e}\n{}", pods.dump()));
    for who in [Who::Client, Who::Server] {
        let e = pods.tcp_entries(who, 8080);
        pods.assert_eq(e.len(), 1, &format!("{who:?}: one connection"));
        pods.assert_eq(e[0].tcp_state(), Some(TcpState::Established), "established");
    }
    pods.assert_eq(
        pods.counters(Who::Client)[0].new_connections,
        2,
        "the reopening SYN is a new connection",
    );
}
