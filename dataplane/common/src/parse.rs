//! Packet parsing: Ethernet, IPv4 (options, fragments), IPv6 (extension header chain, fragments),
//! TCP, UDP, SCTP, ICMP and ICMPv6, and the header an ICMP error carries.
//!
//! Generic over [`Frame`] so the eBPF programs parse an skb and tests parse a byte slice with the
//! same code. Every loop is bounded by a constant and every read is bounds-checked by the frame, as
//! the verifier requires. Anything that does not add up (lengths, versions, a chain that does not
//! end) is [`Malformed`]: the caller counts it and treats the packet as INVALID.

use crate::{proto, RawAddr, AF_INET, AF_INET6};

/// Bytes a parser can read. Reads are unaligned and return `None` past the end.
pub trait Frame {
    /// Length of the frame in bytes, Ethernet header included.
    fn len(&self) -> usize;
    /// Whether the frame is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `T` stored at byte `off` (raw bytes: network order for multi-byte fields).
    fn read<T: Copy>(&self, off: usize) -> Option<T>;
}

impl Frame for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        let end = off.checked_add(core::mem::size_of::<T>())?;
        let bytes = self.get(off..end)?;
        // SAFETY: `bytes` holds exactly size_of::<T>() bytes; T is plain data (Copy, read as raw
        // bytes) and the read is unaligned.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const T) })
    }
}

/// Why a frame could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// A header (or the length the IP header claims) runs past the end of the frame.
    Truncated,
    /// The IP version does not match the EtherType.
    BadVersion,
    /// A header length field is below the minimum (IPv4 IHL < 5, TCP data offset < 5).
    BadHeaderLength,
    /// A length field contradicts the others (IPv4 total length below the header, UDP length).
    BadLength,
    /// An IPv6 extension header chain that is out of order or longer than the parser follows.
    BadExtensionChain,
    /// A VLAN-tagged frame on a pod interface: refused rather than let past the filter.
    Vlan,
}

/// Not a fragment.
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a fragmented datagram: it carries the layer 4 header.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment: no layer 4 header; it follows the first fragment's verdict.
pub const FRAG_LATER: u8 = 2;

/// The fields of a packet the datapath decides on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Layer 4 protocol (after the IPv6 extension headers).
    pub proto: u8,
    /// TCP flags, 0 otherwise.
    pub tcp_flags: u8,
    /// `FRAG_*`.
    pub frag: u8,
    /// ICMP type, 0 otherwise.
    pub icmp_type: u8,
    /// ICMP code, 0 otherwise.
    pub icmp_code: u8,
    /// Source port (host order); the identifier for ICMP.
    pub sport: u16,
    /// Destination port (host order); `type << 8 | code` for ICMP.
    pub dport: u16,
    /// Explicit padding.
    pub _pad: u16,
    /// IPv4 identification or IPv6 fragment identification (fragments only).
    pub frag_id: u32,
    /// Offset of the layer 4 header in the frame.
    pub l4_off: u32,
    /// Source address.
    pub src: RawAddr,
    /// Destination address.
    pub dst: RawAddr,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// How many IPv6 extension headers the parser follows before calling the chain malformed.
pub const MAX_IPV6_EXTENSIONS: usize = 8;

#[inline(always)]
fn rd<F: Frame + ?Sized, T: Copy>(f: &F, off: usize) -> Result<T, Malformed> {
    f.read::<T>(off).ok_or(Malformed::Truncated)
}

#[inline(always)]
fn be16<F: Frame + ?Sized>(f: &F, off: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be(rd::<F, u16>(f, off)?))
}

/// Parses an Ethernet frame. `Ok(None)` for frames that are not IP (ARP and the like), which the
/// datapath lets through untouched.
#[inline(always)]
pub fn parse<F: Frame + ?Sized>(f: &F) -> Result<Option<Packet>, Malformed> {
    let ethertype = be16(f, 12)?;
    if ethertype == ETH_P_IP {
        parse_ipv4(f).map(Some)
    } else if ethertype == ETH_P_IPV6 {
        parse_ipv6(f).map(Some)
    } else if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        Err(Malformed::Vlan)
    } else {
        Ok(None)
    }
}

#[inline(always)]
fn parse_ipv4<F: Frame + ?Sized>(f: &F) -> Result<Packet, Malformed> {
    let off = ETH_HLEN;
    let vihl: u8 = rd(f, off)?;
    if vihl >> 4 != 4 {
        return Err(Malformed::BadVersion);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(Malformed::BadHeaderLength);
    }
    let tot_len = be16(f, off + 2)? as usize;
    if tot_len < ihl {
        return Err(Malformed::BadLength);
    }
    let end = off + tot_len;
    if end > f.len() {
        return Err(Malformed::Truncated);
    }
    let mut pkt = Packet {
        family: AF_INET,
        proto: rd(f, off + 9)?,
        ..Packet::default()
    };
    pkt.src[0] = rd(f, off + 12)?;
    pkt.dst[0] = rd(f, off + 16)?;
    let frag = be16(f, off + 6)?;
    if frag & 0x3fff != 0 {
        pkt.frag_id = be16(f, off + 4)? as u32;
        if frag & 0x1fff != 0 {
            pkt.frag = FRAG_LATER;
            return Ok(pkt);
        }
        pkt.frag = FRAG_FIRST;
    }
    parse_l4(f, off + ihl, end, &mut pkt)?;
    Ok(pkt)
}

#[inline(always)]
fn parse_ipv6<F: Frame + ?Sized>(f: &F) -> Result<Packet, Malformed> {
    let off = ETH_HLEN;
    let v: u8 = rd(f, off)?;
    if v >> 4 != 6 {
        return Err(Malformed::BadVersion);
    }
    let end = off + 40 + be16(f, off + 4)? as usize;
    if end > f.len() {
        return Err(Malformed::Truncated);
    }
    let mut pkt = Packet {
        family: AF_INET6,
        ..Packet::default()
    };
    pkt.src = rd(f, off + 8)?;
    pkt.dst = rd(f, off + 24)?;
    let mut next: u8 = rd(f, off + 6)?;
    let mut cur = off + 40;
    let mut done = false;
    for i in 0..MAX_IPV6_EXTENSIONS {
        let len = match next {
            // Hop-by-hop options must come first (RFC 8200 §4.1).
            0 if i != 0 => return Err(Malformed::BadExtensionChain),
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6, experimental.
            0 | 43 | 60 | 135 | 139 | 140 | 253 | 254 => {
                let hl: u8 = rd(f, cur + 1)?;
                (hl as usize + 1) * 8
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let hl: u8 = rd(f, cur + 1)?;
                (hl as usize + 2) * 4
            }
            44 => {
                let field = be16(f, cur + 2)?;
                pkt.frag_id = u32::from_be(rd::<F, u32>(f, cur + 4)?);
                if field & 0xfff8 != 0 {
                    pkt.frag = FRAG_LATER;
                    pkt.proto = rd(f, cur)?;
                    return Ok(pkt);
                }
                if field & 1 != 0 {
                    pkt.frag = FRAG_FIRST;
                }
                8
            }
            _ => {
                done = true;
                break;
            }
        };
        next = rd(f, cur)?;
        cur += len;
        if cur > end {
            return Err(Malformed::Truncated);
        }
    }
    if !done {
        return Err(Malformed::BadExtensionChain);
    }
    pkt.proto = next;
    parse_l4(f, cur, end, &mut pkt)?;
    Ok(pkt)
}

#[inline(always)]
fn parse_l4<F: Frame + ?Sized>(
    f: &F,
    off: usize,
    end: usize,
    pkt: &mut Packet,
) -> Result<(), Malformed> {
    pkt.l4_off = off as u32;
    let room = end.saturating_sub(off);
    let p = pkt.proto;
    if p == proto::TCP {
        if room < 20 {
            return Err(Malformed::Truncated);
        }
        let doff = ((rd::<F, u8>(f, off + 12)? >> 4) as usize) * 4;
        if doff < 20 {
            return Err(Malformed::BadHeaderLength);
        }
        if doff > room {
            return Err(Malformed::Truncated);
        }
        pkt.sport = be16(f, off)?;
        pkt.dport = be16(f, off + 2)?;
        pkt.tcp_flags = rd(f, off + 13)?;
    } else if p == proto::UDP {
        if room < 8 {
            return Err(Malformed::Truncated);
        }
        let ulen = be16(f, off + 4)? as usize;
        // A first fragment carries only part of the datagram its UDP length describes.
        if ulen < 8 || (pkt.frag == FRAG_NONE && ulen > room) {
            return Err(Malformed::BadLength);
        }
        pkt.sport = be16(f, off)?;
        pkt.dport = be16(f, off + 2)?;
    } else if p == proto::SCTP {
        if room < 12 {
            return Err(Malformed::Truncated);
        }
        pkt.sport = be16(f, off)?;
        pkt.dport = be16(f, off + 2)?;
    } else if (p == proto::ICMP && pkt.family == AF_INET)
        || (p == proto::ICMPV6 && pkt.family == AF_INET6)
    {
        if room < 8 {
            return Err(Malformed::Truncated);
        }
        pkt.icmp_type = rd(f, off)?;
        pkt.icmp_code = rd(f, off + 1)?;
        pkt.sport = be16(f, off + 4)?;
        pkt.dport = ((pkt.icmp_type as u16) << 8) | pkt.icmp_code as u16;
    }
    Ok(())
}

/// Parses the packet header an ICMP or ICMPv6 error carries (the original datagram: its IP header
/// and at least 8 bytes of its layer 4 header). `None` when it is absent, truncated, of another
/// family, a later fragment, or an IPv6 packet with extension headers: such an error matches no
/// connection.
#[inline(always)]
pub fn parse_icmp_error_inner<F: Frame + ?Sized>(f: &F, outer: &Packet) -> Option<Packet> {
    let off = outer.l4_off as usize + 8;
    let mut inner = Packet {
        family: outer.family,
        ..Packet::default()
    };
    let l4 = if outer.family == AF_INET {
        let vihl: u8 = f.read(off)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let frag = u16::from_be(f.read::<u16>(off + 6)?);
        if frag & 0x1fff != 0 {
            return None;
        }
        inner.proto = f.read(off + 9)?;
        inner.src[0] = f.read(off + 12)?;
        inner.dst[0] = f.read(off + 16)?;
        off + ihl
    } else {
        let v: u8 = f.read(off)?;
        if v >> 4 != 6 {
            return None;
        }
        inner.proto = f.read(off + 6)?;
        inner.src = f.read(off + 8)?;
        inner.dst = f.read(off + 24)?;
        off + 40
    };
    let p = inner.proto;
    if p == proto::TCP || p == proto::UDP || p == proto::SCTP {
        inner.sport = u16::from_be(f.read::<u16>(l4)?);
        inner.dport = u16::from_be(f.read::<u16>(l4 + 2)?);
    } else if crate::conntrack::is_icmp(inner.family, p) {
        inner.icmp_type = f.read(l4)?;
        inner.icmp_code = f.read(l4 + 1)?;
        inner.sport = u16::from_be(f.read::<u16>(l4 + 4)?);
        inner.dport = ((inner.icmp_type as u16) << 8) | inner.icmp_code as u16;
    } else {
        // Generic protocols are tracked without ports; the 8 bytes need not be there.
    }
    inner.l4_off = l4 as u32;
    Some(inner)
}
