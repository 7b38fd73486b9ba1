//! The one packet builder for tests: Ethernet frames for BPF_PROG_TEST_RUN and raw injection,
//! built with etherparse rather than by hand.
//!
//! Besides well-formed TCP, UDP and ICMP frames it builds what a datapath must survive: ICMP
//! errors quoting a given frame, IP fragments of a given frame, IPv6 extension header chains
//! (including wrong ones), VLAN tags, and frames with one header field corrupted. The helpers take
//! and return whole frames so a test reads as "this frame, fragmented" or "this frame, with IHL 4".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    icmpv4, icmpv6, ArpEthIpv4Packet, ArpOperation, EtherType, Ethernet2Header, Icmpv4Type,
    Icmpv6Type, IpFragOffset, IpNumber, Ipv4Header, Ipv6FragmentHeader, Ipv6Header,
    Ipv6RawExtHeader, PacketBuilder, SingleVlanHeader, SlicedPacket, TcpHeader, VlanId, VlanPcp,
};

/// Source MAC of crafted frames.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Destination MAC of crafted frames.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Length of the Ethernet header: the IP header of every frame built here starts at this offset.
pub const ETH_LEN: usize = Ethernet2Header::LEN;
/// Length of the fixed IPv6 header: the first extension header (or the layer 4 header) of an
/// IPv6 frame built here starts at `ETH_LEN + IPV6_LEN`.
pub const IPV6_LEN: usize = Ipv6Header::LEN;

/// TCP flags for [`tcp`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    /// SYN.
    pub syn: bool,
    /// ACK.
    pub ack: bool,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
    /// PSH.
    pub psh: bool,
}

impl TcpFlags {
    /// A connection's first segment.
    pub const SYN: TcpFlags = TcpFlags {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
        psh: false,
    };
    /// The answer to a SYN.
    pub const SYN_ACK: TcpFlags = TcpFlags {
        syn: true,
        ack: true,
        fin: false,
        rst: false,
        psh: false,
    };
    /// A plain acknowledgement.
    pub const ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
        psh: false,
    };
    /// A data segment.
    pub const PSH_ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: false,
        rst: false,
        psh: true,
    };
    /// A close.
    pub const FIN_ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: true,
        rst: false,
        psh: false,
    };
    /// A bare reset.
    pub const RST: TcpFlags = TcpFlags {
        syn: false,
        ack: false,
        fin: false,
        rst: true,
        psh: false,
    };
    /// A reset acknowledging something (what a closed port answers a SYN with).
    pub const RST_ACK: TcpFlags = TcpFlags {
        syn: false,
        ack: true,
        fin: false,
        rst: true,
        psh: false,
    };

    /// The flags as byte 13 of the TCP header carries them.
    pub fn bits(self) -> u8 {
        (self.fin as u8)
            | (self.syn as u8) << 1
            | (self.rst as u8) << 2
            | (self.psh as u8) << 3
            | (self.ack as u8) << 4
    }
}

fn ip_builder(src: IpAddr, dst: IpAddr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

/// A TCP segment (IPv4 or IPv6 by the addresses' family).
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: TcpFlags) -> Vec<u8> {
    tcp_bits(src, dst, sport, dport, flags.bits())
}

/// The initial sequence number of the side of a connection that sends from `port`, in every
/// segment [`tcp`] and [`tcp_bits`] build: each side's numbers follow from its own port, so that
/// separately built segments of one connection make a consistent exchange for window tracking
/// (the SYN at `isn`, everything after it at `isn + 1`, acknowledging the other side's
/// `isn + 1`).
pub fn isn(port: u16) -> u32 {
    0x1000_0000u32.wrapping_add(u32::from(port) << 12)
}

/// A TCP segment with an arbitrary flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10,
/// URG 0x20, ECE 0x40, CWR 0x80), for combinations [`TcpFlags`] cannot say (SYN|FIN, none, URG).
/// Sequence numbers as [`isn`] says; no payload, a window of 64 240 bytes, no options.
pub fn tcp_bits(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, bits: u8) -> Vec<u8> {
    let syn = bits & 0x02 != 0;
    let seq = if syn {
        isn(sport)
    } else {
        isn(sport).wrapping_add(1)
    };
    let ack = isn(dport).wrapping_add(1);
    tcp_segment(
        src,
        dst,
        sport,
        dport,
        TcpSegment {
            bits,
            seq,
            ack,
            ..TcpSegment::default()
        },
    )
}

/// What [`tcp_segment`] writes into a TCP header beyond the addresses and ports: for tests of
/// window tracking, which need exact sequence numbers, windows and options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSegment {
    /// The flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, …).
    pub bits: u8,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (written whatever the ACK flag says).
    pub ack: u32,
    /// The window field.
    pub window: u16,
    /// Raw option bytes, padded here to a multiple of four with end-of-list bytes.
    pub options: Vec<u8>,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Default for TcpSegment {
    fn default() -> Self {
        TcpSegment {
            bits: 0,
            seq: 0,
            ack: 0,
            window: 64240,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }
}

/// A TCP segment with exactly the numbers, options and payload `seg` gives.
pub fn tcp_segment(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, seg: TcpSegment) -> Vec<u8> {
    let bits = seg.bits;
    let mut h = TcpHeader::new(sport, dport, seg.seq, seg.window);
    h.fin = bits & 0x01 != 0;
    h.syn = bits & 0x02 != 0;
    h.rst = bits & 0x04 != 0;
    h.psh = bits & 0x08 != 0;
    h.ack = bits & 0x10 != 0;
    h.urg = bits & 0x20 != 0;
    h.ece = bits & 0x40 != 0;
    h.cwr = bits & 0x80 != 0;
    h.acknowledgment_number = seg.ack;
    let mut options = seg.options;
    while !options.len().is_multiple_of(4) {
        options.push(0);
    }
    h.set_options_raw(&options)
        .unwrap_or_else(|e| panic!("TCP options of {} bytes: {e}", options.len()));
    let mut out = Vec::new();
    ip_builder(src, dst)
        .tcp_header(h)
        .write(&mut out, &seg.payload)
        .unwrap_or_else(|e| panic!("building a TCP frame: {e}"));
    out
}

/// A UDP datagram with `payload`.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ip_builder(src, dst)
        .udp(sport, dport)
        .write(&mut out, payload)
        .unwrap_or_else(|e| panic!("building a UDP frame: {e}"));
    out
}

/// An IP packet of protocol `proto` (no ports: GRE, ESP, …) carrying `payload` as is.
pub fn ip_raw(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ETH_LEN + IPV6_LEN + payload.len());
    let ethertype = match src {
        IpAddr::V4(_) => EtherType::IPV4,
        IpAddr::V6(_) => EtherType::IPV6,
    };
    eth_header(ethertype)
        .write(&mut out)
        .unwrap_or_else(|e| panic!("writing Ethernet: {e}"));
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let h = Ipv4Header::new(
                payload.len() as u16,
                64,
                IpNumber(proto),
                s.octets(),
                d.octets(),
            )
            .unwrap_or_else(|e| panic!("IPv4 header: {e}"));
            h.write(&mut out)
                .unwrap_or_else(|e| panic!("writing IPv4: {e}"));
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = Ipv6Header {
                payload_length: payload.len() as u16,
                next_header: IpNumber(proto),
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
                ..Ipv6Header::default()
            };
            h.write(&mut out)
                .unwrap_or_else(|e| panic!("writing IPv6: {e}"));
        }
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
    out.extend_from_slice(payload);
    out
}

fn eth_header(ether_type: EtherType) -> Ethernet2Header {
    Ethernet2Header {
        source: SRC_MAC,
        destination: DST_MAC,
        ether_type,
    }
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) echo request with identifier `id`.
pub fn icmp_echo_request(src: IpAddr, dst: IpAddr, id: u16, seq: u16) -> Vec<u8> {
    let b = ip_builder(src, dst);
    let mut out = Vec::new();
    match src {
        IpAddr::V4(_) => b.icmpv4_echo_request(id, seq).write(&mut out, b"ping"),
        IpAddr::V6(_) => b.icmpv6_echo_request(id, seq).write(&mut out, b"ping"),
    }
    .unwrap_or_else(|e| panic!("building an echo request: {e}"));
    out
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) echo reply with identifier `id`.
pub fn icmp_echo_reply(src: IpAddr, dst: IpAddr, id: u16, seq: u16) -> Vec<u8> {
    let b = ip_builder(src, dst);
    let mut out = Vec::new();
    match src {
        IpAddr::V4(_) => b.icmpv4_echo_reply(id, seq).write(&mut out, b"ping"),
        IpAddr::V6(_) => b.icmpv6_echo_reply(id, seq).write(&mut out, b"ping"),
    }
    .unwrap_or_else(|e| panic!("building an echo reply: {e}"));
    out
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) message of any type and code: bytes 5 to 8 of the header are
/// `rest`, then `payload`. For types etherparse has no name for (timestamp, router renumbering,
/// experimental ones).
pub fn icmp_raw(
    src: IpAddr,
    dst: IpAddr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let b = ip_builder(src, dst);
    let mut out = Vec::new();
    match src {
        IpAddr::V4(_) => b.icmpv4_raw(icmp_type, code, rest).write(&mut out, payload),
        IpAddr::V6(_) => b.icmpv6_raw(icmp_type, code, rest).write(&mut out, payload),
    }
    .unwrap_or_else(|e| panic!("building an ICMP frame: {e}"));
    out
}

/// The ICMP errors [`icmp_error`] builds, each mapped to its IPv4 or IPv6 form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// Destination unreachable, port unreachable (IPv4 type 3 code 3, IPv6 type 1 code 4).
    PortUnreachable,
    /// Destination unreachable, host unreachable (IPv4 type 3 code 1, IPv6 type 1 code 3).
    HostUnreachable,
    /// Time exceeded in transit (IPv4 type 11, IPv6 type 3).
    TimeExceeded,
    /// IPv4: fragmentation needed (type 3 code 4); IPv6: packet too big (type 2).
    PacketTooBig {
        /// The MTU the error reports.
        mtu: u16,
    },
    /// Parameter problem (IPv4 type 12, IPv6 type 4).
    ParameterProblem,
}

/// The ICMP or ICMPv6 error `kind`, sent by `from` (a router, or the destination) to the source of
/// `quoted` (an Ethernet frame built here), quoting `quoted`'s IP packet as an error does.
pub fn icmp_error(from: IpAddr, quoted: &[u8], kind: IcmpError) -> Vec<u8> {
    let inner = quoted
        .get(ETH_LEN..)
        .unwrap_or_else(|| panic!("quoted frame shorter than Ethernet"));
    let to: IpAddr = match from {
        IpAddr::V4(_) => {
            let (h, _) = Ipv4Header::from_slice(inner)
                .unwrap_or_else(|e| panic!("quoted frame is not IPv4: {e}"));
            Ipv4Addr::from(h.source).into()
        }
        IpAddr::V6(_) => {
            let (h, _) = Ipv6Header::from_slice(inner)
                .unwrap_or_else(|e| panic!("quoted frame is not IPv6: {e}"));
            Ipv6Addr::from(h.source).into()
        }
    };
    let b = ip_builder(from, to);
    let mut out = Vec::new();
    match from {
        IpAddr::V4(_) => b
            .icmpv4(match kind {
                IcmpError::PortUnreachable => {
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
                }
                IcmpError::HostUnreachable => {
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Host)
                }
                IcmpError::TimeExceeded => {
                    Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
                }
                IcmpError::PacketTooBig { mtu } => Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                ),
                IcmpError::ParameterProblem => Icmpv4Type::ParameterProblem(
                    icmpv4::ParameterProblemHeader::PointerIndicatesError(0),
                ),
            })
            .write(&mut out, inner),
        IpAddr::V6(_) => b
            .icmpv6(match kind {
                IcmpError::PortUnreachable => {
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
                }
                IcmpError::HostUnreachable => {
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Address)
                }
                IcmpError::TimeExceeded => {
                    Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded)
                }
                IcmpError::PacketTooBig { mtu } => Icmpv6Type::PacketTooBig { mtu: mtu.into() },
                IcmpError::ParameterProblem => {
                    Icmpv6Type::ParameterProblem(icmpv6::ParameterProblemHeader {
                        code: icmpv6::ParameterProblemCode::ErroneousHeaderField,
                        pointer: 0,
                    })
                }
            })
            .write(&mut out, inner),
    }
    .unwrap_or_else(|e| panic!("building an ICMP error: {e}"));
    out
}

/// The solicited-node multicast address of `target` (RFC 4291 §2.7.1), where neighbour
/// solicitations for it are sent.
pub fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let o = target.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// An ICMPv6 neighbour solicitation from `src` for `target`, sent to `target`'s solicited-node
/// multicast address with hop limit 255, as the kernel's neighbour discovery sends it.
pub fn neighbor_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv6(src.octets(), solicited_node(target).octets(), 255)
        .icmpv6(Icmpv6Type::NeighborSolicitation)
        .write(&mut out, &target.octets())
        .unwrap_or_else(|e| panic!("building a neighbour solicitation: {e}"));
    out
}

/// An ICMPv6 solicited neighbour advertisement from `src` (which owns `src`) to `dst`.
pub fn neighbor_advertisement(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    neighbor_advertisement_of(src, dst, src)
}

/// An ICMPv6 solicited neighbour advertisement from `src` to `dst` that `target` is at the
/// sender's link-layer address: a host answers for its own addresses; one that answers for
/// another's takes its traffic.
pub fn neighbor_advertisement_of(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6(Icmpv6Type::NeighborAdvertisement(
            icmpv6::NeighborAdvertisementHeader {
                router: false,
                solicited: true,
                r#override: true,
            },
        ))
        .write(&mut out, &target.octets())
        .unwrap_or_else(|e| panic!("building a neighbour advertisement: {e}"));
    out
}

/// An unsolicited neighbour advertisement with Override, as a host sends when its link-layer
/// address changed: from `src` (MAC `src_mac`) to all nodes (ff02::1), saying `target` is now at
/// `lladdr` (the Target Link-Layer Address option). Receivers that have `target` in their cache
/// take the new address; one that names another host's target takes that host's traffic.
pub fn unsolicited_neighbor_advertisement(
    src: Ipv6Addr,
    src_mac: [u8; 6],
    target: Ipv6Addr,
    lladdr: [u8; 6],
) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut payload = target.octets().to_vec();
    payload.extend_from_slice(&[2, 1]);
    payload.extend_from_slice(&lladdr);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(src.octets(), all_nodes.octets(), 255)
        .icmpv6(Icmpv6Type::NeighborAdvertisement(
            icmpv6::NeighborAdvertisementHeader {
                router: false,
                solicited: false,
                r#override: true,
            },
        ))
        .write(&mut out, &payload)
        .unwrap_or_else(|e| panic!("building a neighbour advertisement: {e}"));
    out
}

/// An ARP request from `sender` for `target`: not IP at all.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpEthIpv4Packet {
        operation: ArpOperation::REQUEST,
        sender_mac: SRC_MAC,
        sender_ipv4: sender.octets(),
        target_mac: [0; 6],
        target_ipv4: target.octets(),
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2(SRC_MAC, [0xff; 6])
        .arp(arp.to_arp_packet())
        .write(&mut out)
        .unwrap_or_else(|e| panic!("building an ARP request: {e}"));
    out
}

/// Offset of the layer 4 header in a well-formed frame built here (after IPv4 options and IPv6
/// extension headers), for corrupting a field of it.
pub fn l4_offset(frame: &[u8]) -> usize {
    let sliced =
        SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("frame does not parse: {e}"));
    let payload = sliced
        .net
        .as_ref()
        .and_then(|n| n.ip_payload_ref())
        .unwrap_or_else(|| panic!("frame carries no IP payload"))
        .payload;
    payload.as_ptr() as usize - frame.as_ptr() as usize
}

/// Splits an unfragmented IPv4 or IPv6 frame into two fragments of datagram `id`: the first
/// carries the first `split` bytes of the IP payload (a multiple of 8; the layer 4 header with it
/// when `split` covers it), the second carries the rest at offset `split`. IPv6 fragments carry a
/// Fragment header right after the fixed header: extension headers of `frame` (see
/// [`with_ipv6_extensions`]) become part of the fragmentable payload, as destination options do.
pub fn fragment(frame: &[u8], split: usize, id: u32) -> [Vec<u8>; 2] {
    assert!(
        split.is_multiple_of(8) && split > 0,
        "fragment offset {split} is not a positive multiple of 8"
    );
    let ip = &frame[ETH_LEN..];
    let offset =
        IpFragOffset::try_new((split / 8) as u16).unwrap_or_else(|e| panic!("offset: {e}"));
    match ip.first().map(|v| v >> 4) {
        Some(4) => {
            let (h, _) = Ipv4Header::from_slice(ip).unwrap_or_else(|e| panic!("not IPv4: {e}"));
            let payload = &ip[h.header_len()..usize::from(h.total_len)];
            assert!(split < payload.len(), "nothing left after {split} bytes");
            let piece = |data: &[u8], more: bool, off: IpFragOffset| {
                let mut hh = h.clone();
                hh.identification = id as u16;
                hh.dont_fragment = false;
                hh.more_fragments = more;
                hh.fragment_offset = off;
                hh.set_payload_len(data.len())
                    .unwrap_or_else(|e| panic!("payload length: {e}"));
                let mut out = frame[..ETH_LEN].to_vec();
                hh.write(&mut out)
                    .unwrap_or_else(|e| panic!("writing IPv4: {e}"));
                out.extend_from_slice(data);
                out
            };
            [
                piece(&payload[..split], true, IpFragOffset::ZERO),
                piece(&payload[split..], false, offset),
            ]
        }
        Some(6) => {
            let (h, _) = Ipv6Header::from_slice(ip).unwrap_or_else(|e| panic!("not IPv6: {e}"));
            let payload = &ip[IPV6_LEN..IPV6_LEN + usize::from(h.payload_length)];
            assert!(split < payload.len(), "nothing left after {split} bytes");
            let piece = |data: &[u8], more: bool, off: IpFragOffset| {
                let fh = Ipv6FragmentHeader::new(h.next_header, off, more, id);
                let mut hh = h.clone();
                hh.next_header = IpNumber::IPV6_FRAGMENTATION_HEADER;
                hh.payload_length = (Ipv6FragmentHeader::LEN + data.len()) as u16;
                let mut out = frame[..ETH_LEN].to_vec();
                hh.write(&mut out)
                    .unwrap_or_else(|e| panic!("writing IPv6: {e}"));
                fh.write(&mut out)
                    .unwrap_or_else(|e| panic!("writing the fragment header: {e}"));
                out.extend_from_slice(data);
                out
            };
            [
                piece(&payload[..split], true, IpFragOffset::ZERO),
                piece(&payload[split..], false, offset),
            ]
        }
        _ => panic!("not an IP frame"),
    }
}

/// An IPv6 `frame` (without extension headers) as an atomic fragment of datagram `id`: a
/// Fragment header with offset 0 and no more fragments, carrying the whole payload (RFC 6946).
pub fn ipv6_atomic_fragment(frame: &[u8], id: u32) -> Vec<u8> {
    let ip = &frame[ETH_LEN..];
    let (mut h, _) = Ipv6Header::from_slice(ip).unwrap_or_else(|e| panic!("not IPv6: {e}"));
    let payload = &ip[IPV6_LEN..IPV6_LEN + usize::from(h.payload_length)];
    let fh = Ipv6FragmentHeader::new(h.next_header, IpFragOffset::ZERO, false, id);
    h.next_header = IpNumber::IPV6_FRAGMENTATION_HEADER;
    h.payload_length = (Ipv6FragmentHeader::LEN + payload.len()) as u16;
    let mut out = frame[..ETH_LEN].to_vec();
    h.write(&mut out)
        .unwrap_or_else(|e| panic!("writing IPv6: {e}"));
    fh.write(&mut out)
        .unwrap_or_else(|e| panic!("writing the fragment header: {e}"));
    out.extend_from_slice(payload);
    out
}

/// IPv6 extension headers for [`with_ipv6_extensions`], each 8 bytes long unless stated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    /// Hop-by-hop options (next header 0), padding only.
    HopByHop,
    /// Destination options (next header 60), padding only.
    DestinationOptions,
    /// A routing header (next header 43) with no segments left.
    Routing,
    /// Destination options `8 * (1 + units)` bytes long.
    LongDestinationOptions {
        /// The header's length field (8-octet units beyond the first 8).
        units: u8,
    },
}

impl Ipv6Ext {
    fn number(self) -> IpNumber {
        match self {
            Ipv6Ext::HopByHop => IpNumber::IPV6_HEADER_HOP_BY_HOP,
            Ipv6Ext::DestinationOptions | Ipv6Ext::LongDestinationOptions { .. } => {
                IpNumber::IPV6_DESTINATION_OPTIONS
            }
            Ipv6Ext::Routing => IpNumber::IPV6_ROUTE_HEADER,
        }
    }

    fn body(self) -> Vec<u8> {
        match self {
            // Options: PadN covering the 6 bytes.
            Ipv6Ext::HopByHop | Ipv6Ext::DestinationOptions => vec![1, 4, 0, 0, 0, 0],
            // Routing type 4 (segment routing), segments left 0: skipped by every receiver.
            Ipv6Ext::Routing => vec![4, 0, 0, 0, 0, 0],
            Ipv6Ext::LongDestinationOptions { units } => {
                let len = 6 + 8 * usize::from(units);
                let mut b = vec![0; len];
                // One PadN option filling all of it when it fits in its length byte.
                b[0] = 1;
                b[1] = (len - 2).min(255) as u8;
                b
            }
        }
    }
}

/// Inserts the extension headers `exts`, in that order (even an order RFC 8200 forbids), between
/// the fixed header and the payload of an IPv6 frame without extension headers, fixing the next
/// header chain and the payload length.
pub fn with_ipv6_extensions(frame: &[u8], exts: &[Ipv6Ext]) -> Vec<u8> {
    let ip = &frame[ETH_LEN..];
    let (mut h, _) = Ipv6Header::from_slice(ip).unwrap_or_else(|e| panic!("not IPv6: {e}"));
    let payload = &ip[IPV6_LEN..IPV6_LEN + usize::from(h.payload_length)];
    let mut chain = Vec::new();
    let mut next = h.next_header;
    for ext in exts.iter().rev() {
        let raw = Ipv6RawExtHeader::new_raw(next, &ext.body())
            .unwrap_or_else(|e| panic!("extension header {ext:?}: {e}"));
        let mut bytes = raw.to_bytes().to_vec();
        bytes.extend_from_slice(&chain);
        chain = bytes;
        next = ext.number();
    }
    h.next_header = next;
    h.payload_length = (chain.len() + payload.len()) as u16;
    let mut out = frame[..ETH_LEN].to_vec();
    h.write(&mut out)
        .unwrap_or_else(|e| panic!("writing IPv6: {e}"));
    out.extend_from_slice(&chain);
    out.extend_from_slice(payload);
    out
}

/// An IPv4 `frame` with `options` (a multiple of 4 bytes, at most 40) in its header, lengths and
/// checksum fixed: the layer 4 header moves back accordingly.
pub fn with_ipv4_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    let ip = &frame[ETH_LEN..];
    let (mut h, _) = Ipv4Header::from_slice(ip).unwrap_or_else(|e| panic!("not IPv4: {e}"));
    let payload = &ip[h.header_len()..usize::from(h.total_len)];
    h.options = options
        .try_into()
        .unwrap_or_else(|e| panic!("IPv4 options: {e}"));
    h.set_payload_len(payload.len())
        .unwrap_or_else(|e| panic!("payload length: {e}"));
    let mut out = frame[..ETH_LEN].to_vec();
    h.write(&mut out)
        .unwrap_or_else(|e| panic!("writing IPv4: {e}"));
    out.extend_from_slice(payload);
    out
}

/// `frame` with an 802.1Q tag (VLAN `vid`) between the MAC addresses and the EtherType.
pub fn with_vlan(frame: &[u8], vid: u16) -> Vec<u8> {
    let (eth, rest) =
        Ethernet2Header::from_slice(frame).unwrap_or_else(|e| panic!("not Ethernet: {e}"));
    let tag = SingleVlanHeader {
        pcp: VlanPcp::ZERO,
        drop_eligible_indicator: false,
        vlan_id: VlanId::try_new(vid).unwrap_or_else(|e| panic!("VLAN id: {e}")),
        ether_type: eth.ether_type,
    };
    let mut out = Vec::with_capacity(frame.len() + SingleVlanHeader::LEN);
    eth_header(EtherType::VLAN_TAGGED_FRAME)
        .write(&mut out)
        .unwrap_or_else(|e| panic!("writing Ethernet: {e}"));
    tag.write(&mut out)
        .unwrap_or_else(|e| panic!("writing the VLAN tag: {e}"));
    out.extend_from_slice(rest);
    out
}

/// The first `len` bytes of `frame`.
pub fn truncated(frame: &[u8], len: usize) -> Vec<u8> {
    frame[..len.min(frame.len())].to_vec()
}

/// `frame` cut `keep` bytes into its layer 4 header, the IP length fixed to match: only the
/// layer 4 header is short, which the parser must refuse as truncated.
pub fn truncated_in_l4(frame: &[u8], keep: usize) -> Vec<u8> {
    let l4 = l4_offset(frame);
    let cut = truncated(frame, l4 + keep);
    if frame[ETH_LEN] >> 4 == 4 {
        with_ipv4_total_len(cut, (l4 + keep - ETH_LEN) as u16)
    } else {
        with_ipv6_payload_len(cut, (l4 + keep - ETH_LEN - IPV6_LEN) as u16)
    }
}

/// An IPv4 `frame` with its header length field (in 32-bit words) set to `ihl`.
pub fn with_ipv4_ihl(mut frame: Vec<u8>, ihl: u8) -> Vec<u8> {
    assert_eq!(frame[ETH_LEN] >> 4, 4, "not IPv4");
    frame[ETH_LEN] = 0x40 | (ihl & 0x0f);
    frame
}

/// An IPv4 `frame` with its total length field set to `len`.
pub fn with_ipv4_total_len(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
    assert_eq!(frame[ETH_LEN] >> 4, 4, "not IPv4");
    frame[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// An IPv6 `frame` with its payload length field set to `len`.
pub fn with_ipv6_payload_len(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
    assert_eq!(frame[ETH_LEN] >> 4, 6, "not IPv6");
    frame[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&len.to_be_bytes());
    frame
}

/// A well-formed TCP `frame` with its data offset field (in 32-bit words) set to `words`.
pub fn with_tcp_data_offset(mut frame: Vec<u8>, words: u8) -> Vec<u8> {
    let off = l4_offset(&frame) + 12;
    frame[off] = (words << 4) | (frame[off] & 0x0f);
    frame
}

/// A well-formed UDP `frame` with its length field set to `len`.
pub fn with_udp_len(mut frame: Vec<u8>, len: u16) -> Vec<u8> {
    let off = l4_offset(&frame) + 4;
    frame[off..off + 2].copy_from_slice(&len.to_be_bytes());
    frame
}

/// `frame` with byte `off` set to `value`, for fields the other helpers do not name.
pub fn with_byte(mut frame: Vec<u8>, off: usize, value: u8) -> Vec<u8> {
    frame[off] = value;
    frame
}
