//! Protocol corners on real traffic between member pods: IP fragments follow their first
//! fragment's verdict, ICMP errors about a TCP connection are RELATED while ICMP errors about no
//! connection are INVALID, and a SYN reopens a connection in TIME_WAIT.

mod traffic_fixture;

use std::{
    io::{ErrorKind, Read},
    net::{IpAddr, Shutdown},
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use kubesg_agent::policy::Protocol;
use kubesg_common::conntrack::TcpState;
use kubesg_testkit::{netns::accept_within, packet, require_privileged};
use traffic_fixture::*;

/// A datagram larger than the veth's 1500-byte MTU: sent as three fragments.
const BIG: usize = 4000;

fn udp_pods(port: u16) -> Pods {
    Pods::new(
        Some(&egress(vec![rule(Protocol::Udp, &[port], Who::Server)])),
        Some(&ingress(vec![rule(Protocol::Udp, &[port], Who::Client)])),
    )
}

fn fragmented_datagram_passes_both_ways(v6: bool) {
    let pods = udp_pods(23);
    let server = pods
        .server()
        .udp_bind(v6, 23, ARRIVES)
        .expect("server socket");
    let client = pods
        .client()
        .udp_bind(v6, 0, ARRIVES)
        .expect("client socket");
    let big = vec![0x5a_u8; BIG];
    let mut buf = vec![0u8; BIG + 1];
    client
        .send_to(&big, pods.server().sockaddr(v6, 23))
        .expect("sending");
    let (n, from) = server
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("the fragmented query did not arrive: {e}\n{}", pods.dump()));
    assert_eq!(n, BIG);
    server.send_to(&big, from).expect("answering");
    let n = client
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("the fragmented answer did not arrive: {e}\n{}", pods.dump()));
    assert_eq!(n, BIG);
    for who in [Who::Client, Who::Server] {
        let [out, inc] = pods.counters(who);
        assert_eq!(
            out.dropped_invalid + inc.dropped_invalid + out.dropped_policy + inc.dropped_policy,
            0,
            "{who:?}\n{}",
            pods.dump()
        );
    }
}

#[test]
fn fragmented_datagram_passes_both_ways_v4() {
    require_privileged!();
    fragmented_datagram_passes_both_ways(false);
}

#[test]
fn fragmented_datagram_passes_both_ways_v6() {
    require_privileged!();
    fragmented_datagram_passes_both_ways(true);
}

fn fragments_of_a_refused_datagram_are_all_dropped(v6: bool) {
    let pods = udp_pods(23);
    let server = pods
        .server()
        .udp_bind(v6, 24, NEVER)
        .expect("server socket");
    let client = pods.client().udp_bind(v6, 0, NEVER).expect("client socket");
    client
        .send_to(&vec![0x5a_u8; BIG], pods.server().sockaddr(v6, 24))
        .expect("sending");
    let mut buf = vec![0u8; BIG + 1];
    assert!(
        server.recv(&mut buf).is_err(),
        "no rule allows port 24\n{}",
        pods.dump()
    );
    let [out, _] = pods.counters(Who::Client);
    assert!(
        out.dropped_policy >= 1,
        "the first fragment\n{}",
        pods.dump()
    );
    assert!(
        out.dropped_invalid >= 2,
        "the later fragments\n{}",
        pods.dump()
    );
    let [_, s_in] = pods.counters(Who::Server);
    assert_eq!(
        s_in.new_connections + s_in.dropped_policy + s_in.dropped_invalid + s_in.invalid_passed,
        0,
        "no fragment reached the server's interface\n{}",
        pods.dump()
    );
}

#[test]
fn fragments_of_a_refused_datagram_are_all_dropped_v4() {
    require_privileged!();
    fragments_of_a_refused_datagram_are_all_dropped(false);
}

#[test]
fn fragments_of_a_refused_datagram_are_all_dropped_v6() {
    require_privileged!();
    fragments_of_a_refused_datagram_are_all_dropped(true);
}

fn icmp_rejection_of_a_syn_is_related(v6: bool) {
    // The server's own firewall rejects SYNs to 8083 with a port unreachable; the client's rules
    // allow the connection, so the error about it is RELATED and reaches the client.
    let pods = Pods::new(
        Some(&egress(vec![rule(Protocol::Tcp, &[8083], Who::Server)])),
        None,
    );
    let (tool, with) = if v6 {
        ("ip6tables", "icmp6-port-unreachable")
    } else {
        ("iptables", "icmp-port-unreachable")
    };
    pods.server()
        .ns
        .exec_ok(
            tool,
            &[
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                "8083",
                "-j",
                "REJECT",
                "--reject-with",
                with,
            ],
        )
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
    assert!(inc.related >= 1, "{}", pods.dump());
    let e = pods.tcp_entries(Who::Client, 8083);
    assert_eq!(e.len(), 1, "{}", pods.dump());
    assert_eq!(
        e[0].tcp_state(),
        Some(TcpState::SynSent),
        "an error is no reply"
    );
    assert!(!e[0].seen_reply(), "{}", pods.dump());
}

#[test]
fn icmp_rejection_of_a_syn_is_related_v4() {
    require_privileged!();
    icmp_rejection_of_a_syn_is_related(false);
}

#[test]
fn icmp_rejection_of_a_syn_is_related_v6() {
    require_privileged!();
    icmp_rejection_of_a_syn_is_related(true);
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

fn unrelated_icmp_error_to_member_is_dropped_as_invalid(v6: bool) {
    // The client is a member whose rules would even allow the quoted flow; the server, which
    // sends the error, is not filtered.
    let pods = Pods::new(
        Some(&egress(vec![rule(Protocol::Udp, &[53], Who::Server)])),
        None,
    );
    assert!(
        !unrelated_port_unreachable_arrives(&pods, v6),
        "an error about no connection must not reach a member\n{}",
        pods.dump()
    );
    let [_, inc] = pods.counters(Who::Client);
    assert!(inc.dropped_invalid >= 1, "{}", pods.dump());
    assert_eq!(inc.related, 0, "{}", pods.dump());
}

#[test]
fn unrelated_icmp_error_to_member_is_dropped_as_invalid_v4() {
    require_privileged!();
    unrelated_icmp_error_to_member_is_dropped_as_invalid(false);
}

#[test]
fn unrelated_icmp_error_to_member_is_dropped_as_invalid_v6() {
    require_privileged!();
    unrelated_icmp_error_to_member_is_dropped_as_invalid(true);
}

fn unrelated_icmp_error_to_non_member_passes(v6: bool) {
    // The control of the test above: the crafted error does reach a pod that is not filtered.
    let pods = Pods::new(None, None);
    assert!(
        unrelated_port_unreachable_arrives(&pods, v6),
        "{}",
        pods.dump()
    );
    assert!(
        pods.counters(Who::Client)[1].invalid_passed >= 1,
        "{}",
        pods.dump()
    );
}

#[test]
fn unrelated_icmp_error_to_non_member_passes_v4() {
    require_privileged!();
    unrelated_icmp_error_to_non_member_passes(false);
}

#[test]
fn unrelated_icmp_error_to_non_member_passes_v6() {
    require_privileged!();
    unrelated_icmp_error_to_non_member_passes(true);
}

fn syn_reopens_a_connection_in_time_wait(v6: bool) {
    let pods = Pods::new(
        Some(&egress(vec![rule(Protocol::Tcp, &[8080], Who::Server)])),
        Some(&ingress(vec![rule(Protocol::Tcp, &[8080], Who::Client)])),
    );
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
    s.shutdown(Shutdown::Write).expect("closing");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("the client sees the FIN");
    drop(c);
    s.read_to_end(&mut rest).expect("the server sees the FIN");
    drop(s);
    let deadline = Instant::now() + ARRIVES;
    let in_time_wait = || {
        pods.tcp_entries(Who::Client, 8080)
            .iter()
            .any(|e| e.tcp_state() == Some(TcpState::TimeWait))
    };
    while !in_time_wait() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(in_time_wait(), "{}", pods.dump());

    let mut c = client
        .tcp_connect_from(41007, to, ARRIVES)
        .unwrap_or_else(|e| panic!("reopening: {e}\n{}", pods.dump()));
    let mut s = accept_within(&listener, ARRIVES).expect("accepting");
    exchange(&mut c, &mut s).unwrap_or_else(|e| panic!("{e}\n{}", pods.dump()));
    for who in [Who::Client, Who::Server] {
        let e = pods.tcp_entries(who, 8080);
        assert_eq!(e.len(), 1, "{}", pods.dump());
        assert_eq!(
            e[0].tcp_state(),
            Some(TcpState::Established),
            "{}",
            pods.dump()
        );
    }
    assert_eq!(
        pods.counters(Who::Client)[0].new_connections,
        2,
        "{}",
        pods.dump()
    );
}

#[test]
fn syn_reopens_a_connection_in_time_wait_v4() {
    require_privileged!();
    syn_reopens_a_connection_in_time_wait(false);
}

#[test]
fn syn_reopens_a_connection_in_time_wait_v6() {
    require_privileged!();
    syn_reopens_a_connection_in_time_wait(true);
}
