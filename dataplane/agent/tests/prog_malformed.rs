//! Malformed and unusual frames through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1):
//! every header length that does not add up is INVALID (dropped on members with a `Malformed`
//! event, passed and counted on non-members); well-formed oddities (IPv4 options, IPv6 extension
//! chains, large frames, ARP) pass. What the kernel's test run refuses to carry (frames ending
//! inside the IP header, jumbo frames) is sent through attached programs on real veths instead.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use kubesg_agent::{
    conntrack::{self, Connection},
    datapath::{Datapath, DatapathOptions},
    events,
    policy::{CompiledPolicy, Protocol},
};
use kubesg_common::{
    event::{Counters, DenyReason},
    parse::MAX_IPV6_EXTENSIONS,
    proto, Direction,
};
use kubesg_testkit::{
    family::{Family, V4, V6},
    ipv4_and_ipv6,
    loopback::{LoopbackDatapath, ACCEPT, DROP, EGRESS},
    netns::RecvWithin,
    node::TestNode,
    packet::{self, Ipv6Ext, TcpFlags, ETH_LEN, IPV6_LEN},
    rules::{allow_all, egress, port, rule},
};

/// May open TCP to port 80 only.
fn tcp_80() -> CompiledPolicy {
    egress(vec![rule(Protocol::Tcp, vec![port(80)])])
}

/// `frame` (sent by the pod) is malformed: a member allowing everything drops it with a
/// `Malformed` event that carries no addresses, in both directions; a non-member passes it,
/// counted as INVALID; neither tracks it.
fn assert_malformed(frame: &[u8]) {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    assert_eq!(dp.pod_sends(frame), DROP, "member, from the pod");
    assert_eq!(dp.pod_receives(frame), DROP, "member, to the pod");
    let [eg, ing] = dp.counters();
    assert_eq!((eg.dropped_invalid, eg.accepted), (1, 0));
    assert_eq!((ing.dropped_invalid, ing.accepted), (1, 0));
    let d = dp.denials();
    assert_eq!(d.len(), 2, "{d:#?}");
    assert!(
        d.iter()
            .all(|d| d.reason == Some(DenyReason::Malformed) && d.src.is_none()),
        "{d:#?}"
    );
    assert_eq!(d[0].direction, Direction::Egress);
    assert!(dp.conns().is_empty());

    let mut dp = LoopbackDatapath::load(None);
    assert_eq!(dp.pod_sends(frame), ACCEPT, "non-member");
    let eg = dp.counters()[EGRESS];
    assert_eq!((eg.invalid_passed, eg.accepted), (1, 1));
    assert!(dp.denials().is_empty());
    assert!(dp.conns().is_empty());
}

/// `frame` (sent by the pod) passes a member allowing everything as a NEW connection.
fn assert_well_formed(frame: &[u8]) -> Connection {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    assert_eq!(dp.pod_sends(frame), ACCEPT);
    let eg = dp.counters()[EGRESS];
    assert_eq!((eg.new_connections, eg.dropped_invalid), (1, 0));
    assert!(dp.denials().is_empty());
    dp.conn()
}

/// The IP length field of `frame` set to `len` bytes of IP payload.
fn with_ip_payload_len(frame: Vec<u8>, len: u16) -> Vec<u8> {
    if frame[ETH_LEN] >> 4 == 4 {
        let ihl = u16::from(frame[ETH_LEN] & 0x0f) * 4;
        packet::with_ipv4_total_len(frame, ihl + len)
    } else {
        packet::with_ipv6_payload_len(frame, len)
    }
}

/// The IP payload length of a well-formed `frame`.
fn ip_payload_len(frame: &[u8]) -> usize {
    frame.len() - packet::l4_offset(frame)
}

// --- Truncated headers ----------------------------------------------------------------------------

ipv4_and_ipv6!(
    ip_length_beyond_the_frame_is_malformed,
    ip_length_of_a_jumbo_datagram_in_a_short_frame_is_malformed,
    truncated_tcp_header_is_malformed,
    truncated_udp_header_is_malformed,
    truncated_icmp_header_is_malformed,
    ip_version_other_than_the_ethertype_says_is_malformed,
    tcp_data_offset_below_five_words_is_malformed,
    tcp_data_offset_beyond_the_segment_is_malformed,
    udp_length_below_the_header_is_malformed,
    udp_length_beyond_the_datagram_is_malformed,
    udp_length_shorter_than_the_datagram_is_well_formed,
    ethernet_padding_after_the_ip_packet_is_well_formed,
    vlan_tagged_frame_is_refused,
    double_tagged_frame_is_refused,
    frame_of_several_kilobytes_passes_when_well_formed,
);

/// Frames of `f`'s family that end inside the IP header: the Ethernet header alone, and a
/// partial IP header.
fn cut_in_ip_header(f: Family) -> [Vec<u8>; 2] {
    let keep = if f.is_v6() { 30 } else { 10 };
    [
        packet::truncated(&f.tcp_out(80, TcpFlags::SYN), ETH_LEN),
        packet::truncated(&f.tcp_out(80, TcpFlags::SYN), ETH_LEN + keep),
    ]
}

fn ip_length_beyond_the_frame_is_malformed(f: Family) {
    let syn = f.tcp_out(80, TcpFlags::SYN);
    assert_malformed(&packet::truncated(&syn, syn.len() - 1));
    let udp = f.udp_out(53, b"payload");
    let longer = ip_payload_len(&udp) as u16 + 1;
    assert_malformed(&with_ip_payload_len(udp, longer));
}

fn ip_length_of_a_jumbo_datagram_in_a_short_frame_is_malformed(f: Family) {
    let udp = f.udp_out(53, &[0; 1400]);
    assert_malformed(&with_ip_payload_len(udp, 8960));
}

fn truncated_tcp_header_is_malformed(f: Family) {
    for keep in [0, 12, 19] {
        assert_malformed(&packet::truncated_in_l4(
            &f.tcp_out(80, TcpFlags::SYN),
            keep,
        ));
    }
}

fn truncated_udp_header_is_malformed(f: Family) {
    for keep in [0, 4, 7] {
        assert_malformed(&packet::truncated_in_l4(&f.udp_out(53, b""), keep));
    }
}

fn truncated_icmp_header_is_malformed(f: Family) {
    for keep in [0, 4, 7] {
        assert_malformed(&packet::truncated_in_l4(&f.echo_out(7), keep));
    }
}

fn ip_version_other_than_the_ethertype_says_is_malformed(f: Family) {
    let syn = f.tcp_out(80, TcpFlags::SYN);
    let version = if f.is_v6() { 0x40 } else { 0x65 };
    assert_malformed(&packet::with_byte(syn, ETH_LEN, version));
}

fn tcp_data_offset_below_five_words_is_malformed(f: Family) {
    for words in [0, 4] {
        assert_malformed(&packet::with_tcp_data_offset(
            f.tcp_out(80, TcpFlags::SYN),
            words,
        ));
    }
}

fn tcp_data_offset_beyond_the_segment_is_malformed(f: Family) {
    assert_malformed(&packet::with_tcp_data_offset(
        f.tcp_out(80, TcpFlags::SYN),
        6,
    ));
    assert_malformed(&packet::with_tcp_data_offset(
        f.tcp_out(80, TcpFlags::SYN),
        15,
    ));
}

fn udp_length_below_the_header_is_malformed(f: Family) {
    for len in [0, 7] {
        assert_malformed(&packet::with_udp_len(f.udp_out(53, b"payload"), len));
    }
}

fn udp_length_beyond_the_datagram_is_malformed(f: Family) {
    let udp = f.udp_out(53, b"payload");
    let len = ip_payload_len(&udp) as u16 + 1;
    assert_malformed(&packet::with_udp_len(udp, len));
}

fn udp_length_shorter_than_the_datagram_is_well_formed(f: Family) {
    // nf_conntrack_proto_udp.c only refuses a length beyond the datagram or below 8.
    let c = assert_well_formed(&packet::with_udp_len(f.udp_out(53, b"payload"), 8));
    assert_eq!((c.key.proto, c.key.peer_port), (proto::UDP, 53));
}

fn ethernet_padding_after_the_ip_packet_is_well_formed(f: Family) {
    // A minimum-size Ethernet frame carries a short IP packet followed by padding.
    let mut syn = f.tcp_out(80, TcpFlags::SYN);
    syn.extend_from_slice(&[0; 18]);
    let c = assert_well_formed(&syn);
    assert_eq!(c.key.peer_port, 80);
}

fn vlan_tagged_frame_is_refused(f: Family) {
    assert_malformed(&packet::with_vlan(&f.tcp_out(80, TcpFlags::SYN), 10));
}

fn double_tagged_frame_is_refused(f: Family) {
    // 802.1ad outer tag.
    let tagged = packet::with_vlan(&f.tcp_out(80, TcpFlags::SYN), 10);
    let qinq = packet::with_byte(packet::with_byte(tagged, 12, 0x88), 13, 0xa8);
    assert_malformed(&qinq);
}

/// A frame size well within what BPF_PROG_TEST_RUN takes for a tc program (one page less the
/// skb's headroom and shared info, about 3.7 KB on x86-64; above that the run fails with EINVAL).
const BIG_FRAME: usize = 3500;

fn frame_of_several_kilobytes_passes_when_well_formed(f: Family) {
    let header = packet::l4_offset(&f.udp_out(53, b"")) + 8;
    let big = f.udp_out(53, &vec![0xab; BIG_FRAME - header]);
    assert_eq!(big.len(), BIG_FRAME);
    let c = assert_well_formed(&big);
    assert_eq!(c.key.peer_port, 53);
}

// --- IPv4 header fields ------------------------------------------------------------------------

#[test]
fn ipv4_header_length_below_five_words_is_malformed() {
    kubesg_testkit::require_privileged!();
    for ihl in [0, 1, 4] {
        assert_malformed(&packet::with_ipv4_ihl(V4.tcp_out(80, TcpFlags::SYN), ihl));
    }
}

#[test]
fn ipv4_total_length_below_the_header_is_malformed() {
    kubesg_testkit::require_privileged!();
    for len in [0, 19] {
        assert_malformed(&packet::with_ipv4_total_len(
            V4.tcp_out(80, TcpFlags::SYN),
            len,
        ));
    }
}

#[test]
fn ipv4_header_length_beyond_the_total_length_is_malformed() {
    kubesg_testkit::require_privileged!();
    // IHL 15 = 60 bytes of header in a 40-byte packet.
    assert_malformed(&packet::with_ipv4_ihl(V4.tcp_out(80, TcpFlags::SYN), 15));
}

#[test]
fn ipv4_options_are_skipped_to_find_the_ports() {
    kubesg_testkit::require_privileged!();
    // Router alert, then NOPs and end of options: 8 bytes, IHL 7.
    let opts = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
    let syn = packet::with_ipv4_options(&V4.tcp_out(80, TcpFlags::SYN), &opts);
    assert_eq!(syn[ETH_LEN] & 0x0f, 7);
    let mut dp = LoopbackDatapath::load(Some(&tcp_80()));
    assert_eq!(dp.pod_sends(&syn), ACCEPT);
    assert_eq!(dp.conn().key.peer_port, 80);
    let to_81 = V4.tcp_out(81, TcpFlags::SYN);
    assert_eq!(
        dp.pod_sends(&packet::with_ipv4_options(&to_81, &opts)),
        DROP
    );
    assert_eq!(dp.assert_denied(DenyReason::Policy).dport, 81);
}

// --- IPv6 extension headers ---------------------------------------------------------------------

fn with_exts(frame: &[u8], exts: &[Ipv6Ext]) -> Vec<u8> {
    packet::with_ipv6_extensions(frame, exts)
}

#[test]
fn ipv6_extension_chain_is_followed_to_the_ports() {
    kubesg_testkit::require_privileged!();
    let chain = [
        Ipv6Ext::HopByHop,
        Ipv6Ext::DestinationOptions,
        Ipv6Ext::Routing,
        Ipv6Ext::LongDestinationOptions { units: 3 },
    ];
    let mut dp = LoopbackDatapath::load(Some(&tcp_80()));
    assert_eq!(
        dp.pod_sends(&with_exts(&V6.tcp_out(80, TcpFlags::SYN), &chain)),
        ACCEPT
    );
    let c = dp.conn();
    assert_eq!(
        (c.key.proto, c.key.pod_port, c.key.peer_port),
        (proto::TCP, 40000, 80)
    );
    let to_81 = V6.tcp_out(81, TcpFlags::SYN);
    assert_eq!(dp.pod_sends(&with_exts(&to_81, &chain)), DROP);
    assert_eq!(dp.assert_denied(DenyReason::Policy).dport, 81);
}

#[test]
fn ipv6_hop_by_hop_not_first_is_malformed() {
    kubesg_testkit::require_privileged!();
    let chain = [Ipv6Ext::DestinationOptions, Ipv6Ext::HopByHop];
    assert_malformed(&with_exts(&V6.tcp_out(80, TcpFlags::SYN), &chain));
}

#[test]
fn ipv6_extension_chain_as_long_as_the_parser_follows_is_well_formed() {
    kubesg_testkit::require_privileged!();
    let chain = vec![Ipv6Ext::DestinationOptions; MAX_IPV6_EXTENSIONS];
    let c = assert_well_formed(&with_exts(&V6.udp_out(53, b"x"), &chain));
    assert_eq!((c.key.proto, c.key.peer_port), (proto::UDP, 53));
}

#[test]
fn ipv6_extension_chain_longer_than_the_parser_follows_is_malformed() {
    kubesg_testkit::require_privileged!();
    let chain = vec![Ipv6Ext::DestinationOptions; MAX_IPV6_EXTENSIONS + 1];
    assert_malformed(&with_exts(&V6.udp_out(53, b"x"), &chain));
}

#[test]
fn ipv6_extension_header_running_past_the_end_is_malformed() {
    kubesg_testkit::require_privileged!();
    let frame = with_exts(&V6.udp_out(53, b"x"), &[Ipv6Ext::DestinationOptions]);
    // Header length 200: 1608 bytes of options in a 17-byte payload.
    assert_malformed(&packet::with_byte(frame, ETH_LEN + IPV6_LEN + 1, 200));
}

#[test]
fn ipv6_extension_header_running_past_the_payload_length_is_malformed() {
    kubesg_testkit::require_privileged!();
    // The frame holds the whole header, but the IPv6 payload length ends inside it.
    let frame = with_exts(
        &V6.udp_out(53, b"x"),
        &[Ipv6Ext::LongDestinationOptions { units: 2 }],
    );
    assert_malformed(&packet::with_ipv6_payload_len(frame, 16));
}

#[test]
fn ipv6_payload_length_beyond_the_frame_is_malformed() {
    kubesg_testkit::require_privileged!();
    let syn = V6.tcp_out(80, TcpFlags::SYN);
    let len = ip_payload_len(&syn) as u16;
    assert_malformed(&packet::with_ipv6_payload_len(syn, len + 1));
}

// --- Frames that are not IP, and frame sizes -----------------------------------------------------

#[test]
fn arp_passes_a_member_allowing_nothing() {
    kubesg_testkit::require_privileged!();
    let mut dp = LoopbackDatapath::load(Some(&CompiledPolicy::default()));
    let arp = packet::arp_request(Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(dp.pod_sends(&arp), ACCEPT);
    assert_eq!(dp.pod_receives(&arp), ACCEPT);
    let [eg, ing] = dp.counters();
    assert_eq!((eg.accepted, ing.accepted), (1, 1));
    assert_eq!(
        eg.invalid_passed + eg.dropped_invalid + eg.new_connections,
        0
    );
    assert!(dp.denials().is_empty());
    assert!(dp.conns().is_empty());
}

#[test]
fn other_ethertypes_pass_a_member_allowing_nothing() {
    kubesg_testkit::require_privileged!();
    let dp = LoopbackDatapath::load(Some(&CompiledPolicy::default()));
    // LLDP (0x88cc) on an otherwise IPv4-looking frame.
    let lldp = packet::with_byte(
        packet::with_byte(V4.tcp_out(80, TcpFlags::SYN), 12, 0x88),
        13,
        0xcc,
    );
    assert_eq!(dp.pod_sends(&lldp), ACCEPT);
    assert!(dp.conns().is_empty());
}

#[test]
fn frames_ending_inside_the_ip_header_are_malformed_on_a_real_interface() {
    kubesg_testkit::require_privileged!();
    let mut node = TestNode::new().expect("node");
    let a = node
        .add_pod(
            Ipv4Addr::new(10, 78, 0, 2),
            "fd78::2".parse().expect("addr"),
        )
        .expect("pod");
    let mut dp = Datapath::load(&DatapathOptions::default()).expect("loading the datapath");
    let handle = dp.install_policy(&allow_all()).expect("policy");
    let ifindex = node.pods[a].host_ifindex;
    dp.set_endpoint(ifindex, Some(handle)).expect("endpoint");
    node.ns.enter(|| dp.attach(ifindex)).expect("attach");
    let mut ring = dp.take_events().expect("events");
    let frames: Vec<Vec<u8>> = cut_in_ip_header(V4)
        .into_iter()
        .chain(cut_in_ip_header(V6))
        .collect();
    let dropped = node.pods[a]
        .ns
        .send_frames("eth0", &frames)
        .expect("sending the frames out of the pod's eth0");
    assert_eq!(dropped, 0, "nothing judges the pod's own eth0");
    let mut denials = Vec::new();
    for _ in 0..200 {
        denials.extend(events::drain(&mut ring));
        if denials.len() >= frames.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(denials.len(), frames.len(), "{denials:#?}");
    assert!(denials
        .iter()
        .all(|d| d.reason == Some(DenyReason::Malformed) && d.ifindex == ifindex));
    let eg = dp.counters(ifindex).expect("counters").expect("endpoint")[EGRESS];
    assert_eq!(eg.dropped_invalid, frames.len() as u64);
}

/// Two member pods allowing everything, 10.`net`.0.2 / fd`net`::2 and .3 / ::3, on one node,
/// with the datapath attached to both; `link` (`ip link set` arguments) is applied to each pod's
/// `eth0`, each host veth and the bridge.
fn two_attached_members(net: u8, link: &[&str]) -> (TestNode, Datapath) {
    let mut node = TestNode::new().expect("node");
    for host in [2, 3] {
        node.add_pod(
            Ipv4Addr::new(10, net, 0, host),
            format!("fd{net}::{host}").parse().expect("addr"),
        )
        .expect("pod");
    }
    let set = |ns: &kubesg_testkit::netns::Netns, dev: &str| {
        let mut args = vec!["link", "set", "dev", dev];
        args.extend(link);
        let out = ns.ip(&args).expect("ip link set");
        assert!(out.status.success(), "{dev}: {out:?}");
    };
    for pod in &node.pods {
        set(&pod.ns, "eth0");
        set(&node.ns, &pod.host_ifname);
    }
    set(&node.ns, "br0");
    let mut dp = Datapath::load(&DatapathOptions::default()).expect("loading the datapath");
    let handle = dp.install_policy(&allow_all()).expect("policy");
    let ifindexes: Vec<u32> = node.pods.iter().map(|p| p.host_ifindex).collect();
    for &i in &ifindexes {
        dp.set_endpoint(i, Some(handle)).expect("endpoint");
    }
    node.ns
        .enter(|| ifindexes.iter().try_for_each(|&i| dp.attach(i)))
        .expect("attach");
    (node, dp)
}

/// Sends one UDP datagram of `payload` bytes from pod `a` to pod `b` through the attached
/// datapath with MTU 9000 everywhere; returns what `b` received.
fn jumbo_exchange(v6: bool, payload: usize) -> (Option<usize>, Vec<Connection>, [Counters; 2]) {
    let (node, dp) = two_attached_members(77, &["mtu", "9000"]);
    let (a, b) = (0, 1);
    let ia = node.pods[a].host_ifindex;
    let rx = node.pods[b]
        .udp_bind(v6, 9000, Duration::from_secs(3))
        .expect("bind b");
    let tx = node.pods[a]
        .udp_bind(v6, 0, Duration::from_secs(3))
        .expect("bind a");
    let to: SocketAddr = node.pods[b].sockaddr(v6, 9000);
    // IPv6 needs neighbour discovery first; a small datagram settles it (and opens the flow).
    tx.send_to(b"hello", to).expect("send");
    let mut buf = vec![0u8; 65536];
    rx.recv_from_within(&mut buf).expect("the small datagram");
    tx.send_to(&vec![0x5a; payload], to)
        .expect("send the jumbo");
    let got = rx.recv_from_within(&mut buf).ok().map(|(n, _)| n);
    let conns = conntrack::list(dp.maps())
        .expect("conntrack")
        .into_iter()
        .filter(|c| c.key.ifindex == ia)
        .collect();
    let counters = dp.counters(ia).expect("counters").expect("endpoint");
    (got, conns, counters)
}

#[test]
fn jumbo_ipv4_datagram_passes_the_attached_datapath() {
    kubesg_testkit::require_privileged!();
    // 9000-byte IP packet: 20 bytes IPv4, 8 UDP.
    let (got, conns, [eg, _]) = jumbo_exchange(false, 9000 - 28);
    assert_eq!(got, Some(9000 - 28), "the jumbo datagram arrived whole");
    assert!(conns.iter().any(|c| c.key.peer_port == 9000), "{conns:#?}");
    assert_eq!(eg.dropped_invalid + eg.dropped_policy, 0);
}

#[test]
fn jumbo_ipv6_datagram_passes_the_attached_datapath() {
    kubesg_testkit::require_privileged!();
    let (got, conns, [eg, _]) = jumbo_exchange(true, 9000 - 48);
    assert_eq!(got, Some(9000 - 48), "the jumbo datagram arrived whole");
    assert!(conns.iter().any(|c| c.key.peer_port == 9000), "{conns:#?}");
    assert_eq!(eg.dropped_invalid + eg.dropped_policy, 0);
}

#[test]
fn big_tcp_ipv6_transfer_passes_the_attached_datapath() {
    kubesg_testkit::require_privileged!();
    // BIG TCP: with gso_max_size above 64 KiB, the pod's stack hands its interface GSO packets
    // whose IPv6 payload length, too small a field for them, is 0.
    let (node, dp) =
        two_attached_members(79, &["gso_max_size", "185000", "gro_max_size", "185000"]);
    let (a, b) = (0, 1);
    let (ia, ib) = (node.pods[a].host_ifindex, node.pods[b].host_ifindex);

    const TOTAL: usize = 16 << 20;
    let listener = node.pods[b].tcp_listen(true, 9100).expect("listen");
    let to = node.pods[b].sockaddr(true, 9100);
    let tx = node.pods[a]
        .tcp_connect(to, Duration::from_secs(3))
        .expect("connect");
    let rx =
        kubesg_testkit::netns::accept_within(&listener, Duration::from_secs(3)).expect("accept");
    let got = kubesg_testkit::netns::transfer(tx, rx, TOTAL).expect("the transfer");
    let [eg, _] = dp.counters(ia).expect("counters").expect("endpoint a");
    let [_, ing] = dp.counters(ib).expect("counters").expect("endpoint b");
    assert_eq!(
        (eg.dropped_invalid, ing.dropped_invalid),
        (0, 0),
        "nothing malformed"
    );
    assert_eq!(got, TOTAL, "the whole transfer arrived");
}
