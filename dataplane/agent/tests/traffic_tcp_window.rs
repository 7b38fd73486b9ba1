//! Blind resets on real traffic: segments spoofed from the node namespace (an `AF_PACKET` socket
//! on the client's host-side interface, so they pass the client's `to_pod` hook as a reset from
//! the network would) with the server's addresses and ports. The attack is the one the issue
//! names: before window tracking any RST moved the client's entry to CLOSE and any FIN started
//! the close, so one guessed 4-tuple cut a connection. The defence is nf_conntrack's: an RST or
//! FIN outside the window is INVALID and dropped, an RST inside it but not at the expected
//! sequence number passes without touching the entry (the pod's stack answers it with a
//! challenge ACK, RFC 5961), and only the exact RST closes.
//!
//! And the tracker's own hazard: a full-speed stream, whose segments two CPUs handle at once,
//! must have none refused (see `a_full_speed_stream_has_no_segment_refused`).

use std::{io::Read, net::TcpStream};

use kubesg_agent::{conntrack::Connection, policy::Protocol};
use kubesg_common::{conntrack::TcpState, window::SIDE_MAXACK_SET, Direction};
use kubesg_testkit::{
    family::Family,
    iperf, ipv4_and_ipv6,
    packet::{self, TcpSegment},
    pods::{exchange, Pods, Who, ARRIVES},
    rules::{egress, ingress, port, rule_with},
};

const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The client may open TCP to the server's port 23; the server accepts it.
fn pods() -> Pods {
    let client = egress(vec![rule_with(
        Protocol::Tcp,
        vec![port(23)],
        Who::Server.hosts(),
    )]);
    let server = ingress(vec![rule_with(
        Protocol::Tcp,
        vec![port(23)],
        Who::Client.hosts(),
    )]);
    Pods::new(Some(&client), Some(&server))
}

/// The client's entry of its connection to the server's port 23.
fn entry(pods: &Pods) -> Connection {
    let e = pods.tcp_entries(Who::Client, 23);
    pods.assert_eq(e.len(), 1, "one entry for the connection");
    e[0]
}

/// What the attacker needs and the test reads from the table: the sequence number the client
/// expects from the server next (the highest it acknowledged) and the client's next one.
fn expected(pods: &Pods) -> (u32, u32) {
    let e = entry(pods).entry;
    let (client, server) = (e.seen[0], e.seen[1]);
    pods.assert(
        client.flags & SIDE_MAXACK_SET != 0,
        "the client acknowledged",
    );
    pods.assert_eq(
        client.td_maxack,
        server.td_end,
        "everything the server sent is acknowledged",
    );
    (client.td_maxack, client.td_end)
}

/// Sends `bits` from the server's address and port to the client's, with `seq` and `ack`, out
/// of the client's host-side interface; whether the client's `to_pod` hook dropped it.
fn spoof(pods: &Pods, v6: bool, client: &TcpStream, bits: u8, seq: u32, ack: u32) -> bool {
    let client_port = client.local_addr().expect("local address").port();
    let mut frame = packet::tcp_segment(
        pods.server().addr(v6),
        pods.client().addr(v6),
        23,
        client_port,
        TcpSegment {
            bits,
            seq,
            ack,
            ..TcpSegment::default()
        },
    );
    let mac = pods.client().ns.mac("eth0").expect("the client's MAC");
    frame[..6].copy_from_slice(&mac);
    pods.node
        .ns
        .send_frames(&pods.client().host_ifname, &[frame])
        .expect("injecting from the node")
        == 1
}

/// What the client's `to_pod` hook dropped as INVALID so far.
fn invalid_in(pods: &Pods) -> u64 {
    pods.counters(Who::Client)[Direction::Ingress as usize].dropped_invalid
}

/// A bulk TCP stream at full speed between the two pods (iperf3, 8 s, several Gbit/s here): on a
/// machine with more than one CPU, segments of one connection are tracked by two CPUs at the
/// same instant (the sender's process on one, the softirq that took its ACKs on the other).
/// With plain stores the tracker lost window updates and moved `td_end` back below data already
/// sent, so the receiver's ACK of that data read as acknowledging data never sent and was
/// refused as INVALID: 5 or 6 of the server's in 8 s on this 2-core machine, in 4 runs of 6. With
/// the fields moved forward by compare-and-swap none is refused (8 runs of 8).
fn a_full_speed_stream_has_no_segment_refused(f: Family) {
    const SECONDS: u64 = 8;
    let pods = pods();
    let addr = pods.server().addr(f.is_v6());
    let _server = iperf::server(&pods.server().ns, addr, 23);
    let client = iperf::client(&pods.client().ns, addr, 23, SECONDS, None);
    let intervals = client.intervals();
    let refused: Vec<u64> = [Who::Client, Who::Server]
        .map(|who| {
            let c = pods.counters(who);
            c[0].dropped_invalid + c[1].dropped_invalid
        })
        .into();
    let bytes: u64 = intervals.iter().map(iperf::bytes).sum();
    pods.assert_eq(
        refused,
        vec![0, 0],
        &format!(
            "segments refused as INVALID by the client's and the server's programs \
             ({} Mbit/s)",
            bytes * 8 / SECONDS / 1_000_000
        ),
    );
    for i in &intervals {
        pods.assert(
            iperf::bytes(i) > 0,
            &format!("an interval without data: {}", i["sum"]),
        );
    }
}

ipv4_and_ipv6!(
    a_full_speed_stream_has_no_segment_refused,
    blind_rst_and_fin_outside_the_window_are_dropped_and_the_connection_lives,
    an_inexact_rst_inside_the_window_passes_and_changes_nothing,
    the_exact_rst_closes_the_connection,
);

fn blind_rst_and_fin_outside_the_window_are_dropped_and_the_connection_lives(f: Family) {
    let v6 = f.is_v6();
    let pods = pods();
    let (mut c, mut s) = pods.tcp_open(v6, 23);
    let (server_next, client_next) = expected(&pods);
    let before = invalid_in(&pods);
    // A quarter of the sequence space away: what a blind guess mostly is.
    let far = server_next.wrapping_add(1 << 30);
    pods.assert(spoof(&pods, v6, &c, RST, far, 0), "the RST is dropped");
    pods.assert(
        spoof(&pods, v6, &c, FIN | ACK, far, client_next),
        "the FIN is dropped",
    );
    pods.assert_eq(
        invalid_in(&pods) - before,
        2,
        "both segments dropped as INVALID",
    );
    pods.assert_eq(
        entry(&pods).tcp_state(),
        Some(TcpState::Established),
        "the entry stays ESTABLISHED",
    );
    exchange(&mut c, &mut s).unwrap_or_else(|e| panic!("after the attack: {e}\n{}", pods.dump()));
    exchange(&mut s, &mut c).unwrap_or_else(|e| panic!("the other way: {e}\n{}", pods.dump()));
}

fn an_inexact_rst_inside_the_window_passes_and_changes_nothing(f: Family) {
    let v6 = f.is_v6();
    let pods = pods();
    let (mut c, mut s) = pods.tcp_open(v6, 23);
    let (server_next, _) = expected(&pods);
    let before = invalid_in(&pods);
    pods.assert(
        !spoof(&pods, v6, &c, RST, server_next.wrapping_add(1000), 0),
        "the RST passes",
    );
    pods.assert_eq(invalid_in(&pods) - before, 0, "nothing dropped");
    pods.assert_eq(
        entry(&pods).tcp_state(),
        Some(TcpState::Established),
        "the entry stays ESTABLISHED",
    );
    // The client's stack ignores it too (it answers with a challenge ACK), so the connection
    // carries on.
    exchange(&mut c, &mut s).unwrap_or_else(|e| panic!("after the reset: {e}\n{}", pods.dump()));
}

fn the_exact_rst_closes_the_connection(f: Family) {
    let v6 = f.is_v6();
    let pods = pods();
    let (mut c, _s) = pods.tcp_open(v6, 23);
    let (server_next, client_next) = expected(&pods);
    c.set_read_timeout(Some(ARRIVES)).expect("read timeout");
    pods.assert(
        !spoof(&pods, v6, &c, RST | ACK, server_next, client_next),
        "the RST passes",
    );
    pods.assert_eq(
        entry(&pods).tcp_state(),
        Some(TcpState::Close),
        "the entry is CLOSE",
    );
    let mut buf = [0u8; 1];
    match c.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!(
            "the client's socket is reset, got {other:?}\n{}",
            pods.dump()
        ),
    }
}
