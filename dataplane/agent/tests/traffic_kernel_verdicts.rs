//! The packets issue #14 names as divergences from nf_conntrack, judged by the kernel and by
//! kubesg: each case runs twice on a fresh client/server node, once with the kernel's conntrack
//! as the server's stateful firewall (its own INPUT chain: INVALID dropped, ESTABLISHED and
//! RELATED accepted, NEW only from the client to the open ports, everything else dropped; as
//! `iptables -m conntrack` users write it), once with kubesg's programs on the pods' interfaces
//! and the equivalent groups. What reaches the server is compared, and where the two differ the
//! test pins the difference docs/architecture.md ("Conntrack model") lists.
//!
//! Frames are injected from the node's namespace out of the server's host-side interface, so
//! they pass kubesg's `to_pod` hook (or reach the kernel's firewall) as traffic from the bridge.

use std::{
    net::{IpAddr, Ipv6Addr, UdpSocket},
    time::Duration,
};

use kubesg_agent::policy::Protocol;
use kubesg_common::Direction;
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    netns::{accept_within, transfer, RecvWithin},
    node::{TestNode, TestPod},
    packet::{self, IcmpError, Ipv6Ext},
    pods::{client_and_server, Pods, Who, ARRIVES},
    rules::{egress, ingress, port, rule_with},
};

/// The server's UDP port, open to the client.
const UDP_PORT: u16 = 5353;
/// The server's TCP port, open to the client.
const TCP_PORT: u16 = 9100;

/// Who judges the server's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Judge {
    Kernel,
    Kubesg,
}

/// A client and a server under one judge.
enum World {
    Kernel(TestNode),
    Kubesg(Box<Pods>),
}

impl World {
    fn new(judge: Judge) -> World {
        match judge {
            Judge::Kernel => {
                let node = client_and_server();
                kernel_firewall(&node.pods[1]);
                World::Kernel(node)
            }
            Judge::Kubesg => {
                let client = egress(vec![
                    rule_with(Protocol::Udp, vec![port(UDP_PORT)], Who::Server.hosts()),
                    rule_with(Protocol::Tcp, vec![port(TCP_PORT)], Who::Server.hosts()),
                ]);
                let server = ingress(vec![
                    rule_with(Protocol::Udp, vec![port(UDP_PORT)], Who::Client.hosts()),
                    rule_with(Protocol::Tcp, vec![port(TCP_PORT)], Who::Client.hosts()),
                ]);
                World::Kubesg(Box::new(Pods::new(Some(&client), Some(&server))))
            }
        }
    }

    fn node(&self) -> &TestNode {
        match self {
            World::Kernel(node) => node,
            World::Kubesg(pods) => &pods.node,
        }
    }

    fn client(&self) -> &TestPod {
        &self.node().pods[0]
    }

    fn server(&self) -> &TestPod {
        &self.node().pods[1]
    }

    /// Sends `frames`, in order, to the server as the bridge would deliver them.
    fn inject(&self, frames: &[Vec<u8>]) {
        let mac = self.server().ns.mac("eth0").expect("the server's MAC");
        let frames: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| {
                let mut f = f.clone();
                f[..6].copy_from_slice(&mac);
                f
            })
            .collect();
        self.node()
            .ns
            .send_frames(&self.server().host_ifname, &frames)
            .expect("injecting from the node");
    }

    /// What kubesg's `to_pod` hook on the server dropped as INVALID (malformed included) so
    /// far; zero under the kernel.
    fn invalid(&self) -> u64 {
        match self {
            World::Kernel(_) => 0,
            World::Kubesg(pods) => {
                pods.counters(Who::Server)[Direction::Ingress as usize].dropped_invalid
            }
        }
    }

    /// Sets BIG TCP sizes (GSO and GRO up to 185 000 bytes) on every link between the pods.
    fn big_tcp(&self) {
        let args = ["gso_max_size", "185000", "gro_max_size", "185000"];
        let set = |ns: &kubesg_testkit::netns::Netns, dev: &str| {
            let mut full = vec!["link", "set", "dev", dev];
            full.extend(args);
            let out = ns.ip(&full).expect("ip link set");
            assert!(out.status.success(), "{dev}: {out:?}");
        };
        for pod in &self.node().pods {
            set(&pod.ns, "eth0");
            set(&self.node().ns, &pod.host_ifname);
        }
        set(&self.node().ns, "br0");
    }
}

/// The kernel's stateful firewall on `server`'s INPUT, IPv4 and IPv6, with
/// `nf_conntrack_tcp_loose=0` (only a SYN opens a TCP connection, as in kubesg). Neighbour
/// discovery goes first: conntrack leaves it untracked, which `--ctstate INVALID` matches.
fn kernel_firewall(server: &TestPod) {
    for (tool, client, nd) in [
        ("iptables", "192.168.1.5", None),
        ("ip6tables", "fd00::5", Some(["135", "136"])),
    ] {
        let mut rules: Vec<Vec<String>> = Vec::new();
        for t in nd.into_iter().flatten() {
            rules.push(words(&format!("-p ipv6-icmp --icmpv6-type {t} -j ACCEPT")));
        }
        rules.push(words("-m conntrack --ctstate INVALID -j DROP"));
        rules.push(words(
            "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        ));
        for (proto, p) in [("udp", UDP_PORT), ("tcp", TCP_PORT)] {
            rules.push(words(&format!(
                "-p {proto} -s {client} --dport {p} -m conntrack --ctstate NEW -j ACCEPT"
            )));
        }
        rules.push(words("-j DROP"));
        for rule in rules {
            let mut args = vec!["-A", "INPUT"];
            args.extend(rule.iter().map(String::as_str));
            server.ns.exec_ok(tool, &args).expect("a firewall rule");
        }
    }
    server
        .ns
        .exec_ok("sysctl", &["-qw", "net.netfilter.nf_conntrack_tcp_loose=0"])
        .expect("nf_conntrack_tcp_loose");
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// A UDP datagram of `len` bytes from the client's port `sport` to the server's open port, as
/// an Ethernet frame.
fn datagram(w: &World, v6: bool, sport: u16, len: usize) -> Vec<u8> {
    packet::udp(
        w.client().addr(v6),
        w.server().addr(v6),
        sport,
        UDP_PORT,
        &vec![0x5a; len],
    )
}

/// The length of the next datagram the server's socket receives within [`ARRIVES`], if any.
fn received(socket: &UdpSocket) -> Option<usize> {
    let mut buf = vec![0u8; 65536];
    socket.recv_from_within(&mut buf).ok().map(|(n, _)| n)
}

/// A datagram whose second fragment arrives before its first: the kernel reassembles before
/// conntrack sees anything, so order does not matter and the datagram is delivered; kubesg
/// judges each fragment as it comes, has no verdict for the later one yet, and drops it as
/// INVALID, so the datagram never completes. In order, both deliver it.
fn out_of_order_fragments(judge: Judge, v6: bool) -> (Option<usize>, Option<usize>, u64) {
    const LEN: usize = 2000;
    let w = World::new(judge);
    let socket = w
        .server()
        .udp_bind(v6, UDP_PORT, ARRIVES)
        .expect("the server's socket");
    let [first, second] = packet::fragment(&datagram(&w, v6, 40001, LEN), 1400, 0x1001);
    w.inject(&[second, first]);
    let reversed = received(&socket);
    let invalid = w.invalid();
    let [first, second] = packet::fragment(&datagram(&w, v6, 40002, LEN), 1400, 0x1002);
    w.inject(&[first, second]);
    (reversed, received(&socket), invalid)
}

fn fragments_out_of_order_the_kernel_reassembles_kubesg_drops(f: Family) {
    let v6 = f.is_v6();
    assert_eq!(
        out_of_order_fragments(Judge::Kernel, v6),
        (Some(2000), Some(2000), 0),
        "the kernel delivers both datagrams"
    );
    assert_eq!(
        out_of_order_fragments(Judge::Kubesg, v6),
        (None, Some(2000), 1),
        "kubesg drops the early later fragment as INVALID and delivers the datagram in order"
    );
}

/// The server's cached path MTU towards the client, from `ip -6 route get`.
fn path_mtu(w: &World) -> Option<u32> {
    let out = w
        .server()
        .ns
        .ip(&["-6", "route", "get", &w.client().ipv6.to_string()])
        .expect("ip route get");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mtu" {
            return words.next().and_then(|m| m.parse().ok());
        }
    }
    None
}

/// An ICMPv6 Packet Too Big (MTU 1300) from a router, quoting a datagram the server sent to the
/// client with a Destination Options header. With `flow`, the client and the server have
/// exchanged datagrams on that 4-tuple first, so the error is RELATED to it; without, it relates
/// to nothing and is INVALID. Whether it reached the server (its path MTU to the client).
fn packet_too_big(judge: Judge, flow: bool) -> (Option<u32>, u64) {
    const CLIENT_PORT: u16 = 40003;
    let w = World::new(judge);
    let server = w
        .server()
        .udp_bind(true, UDP_PORT, ARRIVES)
        .expect("the server's socket");
    if flow {
        let client = w
            .client()
            .udp_bind(true, CLIENT_PORT, ARRIVES)
            .expect("the client's socket");
        let to = w.server().sockaddr(true, UDP_PORT);
        client.send_to(b"ping", to).expect("send");
        let mut buf = [0u8; 16];
        let (_, from) = server
            .recv_from_within(&mut buf)
            .expect("the client's datagram");
        server.send_to(b"pong", from).expect("reply");
        client
            .recv_from_within(&mut buf)
            .expect("the server's reply");
    }
    let quoted = packet::with_ipv6_extensions(
        &packet::udp(
            w.server().addr(true),
            w.client().addr(true),
            UDP_PORT,
            CLIENT_PORT,
            &[0x5a; 1100],
        ),
        &[Ipv6Ext::DestinationOptions],
    );
    let router: Ipv6Addr = "2001:db8::1".parse().expect("an address");
    let error = packet::icmp_error(
        IpAddr::V6(router),
        &quoted,
        IcmpError::PacketTooBig { mtu: 1300 },
    );
    w.inject(&[error]);
    std::thread::sleep(Duration::from_millis(200));
    (path_mtu(&w), w.invalid())
}

#[test]
fn a_packet_too_big_quoting_destination_options_is_related_under_both() {
    kubesg_testkit::require_privileged!();
    for judge in [Judge::Kernel, Judge::Kubesg] {
        assert_eq!(
            packet_too_big(judge, true),
            (Some(1300), 0),
            "{judge:?}: the error reaches the server, which lowers its path MTU"
        );
    }
}

#[test]
fn a_packet_too_big_about_no_flow_is_dropped_by_both() {
    kubesg_testkit::require_privileged!();
    assert_eq!(
        packet_too_big(Judge::Kernel, false),
        (None, 0),
        "the kernel drops it as INVALID"
    );
    assert_eq!(
        packet_too_big(Judge::Kubesg, false),
        (None, 1),
        "kubesg drops it as INVALID"
    );
}

/// 16 MiB from the client to the server over IPv6 TCP with BIG TCP on every link, so that the
/// client's stack sends, and the server's GRO builds, packets over 64 KiB whose IPv6 payload
/// length is 0. Bytes received, the largest packet the server's stack took in (a raw socket's
/// copy), and kubesg's INVALID drops.
///
/// IPv6 only: IPv4 BIG TCP (Linux 6.3) has its own size attributes (`gso_ipv4_max_size`), which
/// Debian bookworm's iproute2 6.1 cannot set.
fn big_tcp_transfer(judge: Judge) -> (usize, usize, u64) {
    const TOTAL: usize = 16 << 20;
    let w = World::new(judge);
    w.big_tcp();
    let sniffer = w.server().tcp_sniffer(true).expect("a raw socket");
    sniffer
        .force_receive_buffer(64 << 20)
        .expect("a large receive buffer");
    let listener = w.server().tcp_listen(true, TCP_PORT).expect("listen");
    let tx = w
        .client()
        .tcp_connect(w.server().sockaddr(true, TCP_PORT), Duration::from_secs(3))
        .expect("connect");
    let rx = accept_within(&listener, Duration::from_secs(3)).expect("accept");
    let watcher = std::thread::spawn(move || {
        let mut largest = 0;
        while let Some(n) = sniffer
            .recv_len_within(Duration::from_secs(1))
            .expect("the raw socket")
        {
            largest = largest.max(n);
        }
        largest
    });
    let got = transfer(tx, rx, TOTAL).expect("the transfer");
    let largest = watcher.join().expect("the watcher");
    (got, largest, w.invalid())
}

#[test]
fn a_big_tcp_transfer_passes_under_both() {
    kubesg_testkit::require_privileged!();
    for judge in [Judge::Kernel, Judge::Kubesg] {
        let (got, largest, invalid) = big_tcp_transfer(judge);
        assert!(
            largest > 65_535,
            "{judge:?}: BIG TCP in use (largest packet {largest} bytes)"
        );
        assert_eq!(
            (got, invalid),
            (16 << 20, 0),
            "{judge:?}: the whole transfer arrives, nothing refused"
        );
    }
}

/// The same zero length on a frame that is not a GSO packet (a UDP datagram whose IPv4 total
/// length or IPv6 payload length says 0): the kernel trims the packet to its IP header and the
/// datagram is gone; kubesg drops it as malformed. Neither delivers it.
fn a_zero_length_frame_without_gso_is_dropped_by_both(f: Family) {
    let v6 = f.is_v6();
    for judge in [Judge::Kernel, Judge::Kubesg] {
        let w = World::new(judge);
        let socket = w
            .server()
            .udp_bind(v6, UDP_PORT, ARRIVES)
            .expect("the server's socket");
        let frame = datagram(&w, v6, 40004, 100);
        let zero = if v6 {
            packet::with_ipv6_payload_len(frame.clone(), 0)
        } else {
            // With its header checksum fixed: the kernel checks that before the length.
            with_ipv4_checksum(packet::with_ipv4_total_len(frame.clone(), 0))
        };
        w.inject(&[zero]);
        let zero_arrived = received(&socket);
        let malformed = w.invalid();
        w.inject(&[frame]);
        assert_eq!(
            (zero_arrived, malformed, received(&socket)),
            (None, u64::from(judge == Judge::Kubesg), Some(100)),
            "{judge:?}: the zero-length frame is dropped (counted as malformed by kubesg), \
             the same datagram with its length arrives"
        );
    }
}

/// `frame` (IPv4, no options) with its header checksum computed again.
fn with_ipv4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    const IP: usize = 14;
    frame[IP + 10..IP + 12].fill(0);
    let sum: u32 = frame[IP..IP + 20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    frame[IP + 10..IP + 12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    frame
}

ipv4_and_ipv6!(
    fragments_out_of_order_the_kernel_reassembles_kubesg_drops,
    a_zero_length_frame_without_gso_is_dropped_by_both,
);
