//! Packet parsing: Ethernet, IPv4 (options, fragments), IPv6 (extension header chain, fragments),
//! TCP, UDP, SCTP, ICMP and ICMPv6, and the header an ICMP error carries.
//!
//! Generic over [`Frame`] so the eBPF programs parse an skb and tests parse a byte slice with the
//! same code. Every loop is bounded by a constant and every read is bounds-checked by the frame, as
//! the verifier requires. Anything that does not add up (lengths, versions, a chain that does not
//! end) is [`Malformed`]: the caller counts it and treats the packet as INVALID.

use crate::{proto, words, RawAddr, AF_INET, AF_INET6};

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
    /// Whether the frame is a GSO super-packet (the kernel segments it later). Such a TCP packet
    /// may be longer than an IP length field can say (BIG TCP): its IPv4 total length or IPv6
    /// payload length is then 0 and the frame's length is the truth.
    fn is_gso(&self) -> bool {
        false
    }
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
    /// TCP: what connection tracking needs of the segment's sequence space, zero otherwise.
    pub tcp: TcpFields,
    /// Source address.
    pub src: RawAddr,
    /// Destination address.
    pub dst: RawAddr,
}

/// The fields of a TCP segment that window tracking reads (nf_conntrack's `tcp_in_window`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFields {
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (whatever the ACK flag says).
    pub ack: u32,
    /// The highest right edge of the segment's SACK blocks that lies after `ack`, else `ack`.
    pub sack: u32,
    /// `seq` plus the payload length, plus one for SYN and one for FIN: the sequence number after
    /// the segment.
    pub end: u32,
    /// The window field, unscaled.
    pub win: u16,
    /// The Window Scale option's shift, capped at 14 as RFC 7323 says (with [`TCP_OPT_WSCALE`]).
    pub wscale: u8,
    /// `TCP_OPT_*` bits.
    pub opts: u8,
    /// Bytes of options in the header.
    pub opt_len: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

/// [`TcpFields::opts`]: the header carries options.
pub const TCP_OPT_PRESENT: u8 = 1 << 0;
/// [`TcpFields::opts`]: a Window Scale option.
pub const TCP_OPT_WSCALE: u8 = 1 << 1;
/// [`TcpFields::opts`]: a SACK Permitted option.
pub const TCP_OPT_SACK_PERM: u8 = 1 << 2;
/// [`TcpFields::opts`]: the options are timestamps alone, nothing for [`parse_tcp_options`].
pub const TCP_OPT_TIMESTAMPS_ONLY: u8 = 1 << 3;

/// Whether the header has options [`parse_tcp_options`] should walk.
#[inline(always)]
pub fn has_tcp_options_to_walk(pkt: &Packet) -> bool {
    pkt.proto == proto::TCP
        && pkt.tcp.opts & TCP_OPT_PRESENT != 0
        && pkt.tcp.opts & TCP_OPT_TIMESTAMPS_ONLY == 0
}

/// The largest Window Scale shift (RFC 7323, section 2.3).
pub const TCP_MAX_WSCALE: u8 = 14;
/// The most option bytes a TCP header holds (data offset 15 words, less the 20-byte header).
pub const TCP_MAX_OPTION_BYTES: usize = 40;

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
    let mut pkt = Packet::default();
    Ok(parse_into(f, &mut pkt)?.then_some(pkt))
}

/// [`parse`] into `pkt` (overwritten): true for an IP packet, false for a frame that is not IP.
/// The eBPF programs parse into a per-CPU map value rather than onto their 512-byte stack.
#[inline(always)]
pub fn parse_into<F: Frame + ?Sized>(f: &F, pkt: &mut Packet) -> Result<bool, Malformed> {
    let ethertype = be16(f, 12)?;
    if ethertype == ETH_P_IP {
        parse_ipv4(f, pkt).map(|()| true)
    } else if ethertype == ETH_P_IPV6 {
        parse_ipv6(f, pkt).map(|()| true)
    } else if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        Err(Malformed::Vlan)
    } else {
        Ok(false)
    }
}

/// Parses through `head`, a frame that may end before the packet does (an skb's linear part, read
/// in place: the datapath's fast way), and again through `whole` when that came to
/// [`Malformed::Truncated`]. A read past `head`'s end is `None`, which the parser only ever turns
/// into `Truncated`, and every other outcome rests on reads that succeeded: the result is always
/// `parse(whole)`'s.
#[inline(always)]
pub fn parse_head_first<H: Frame + ?Sized, W: Frame + ?Sized>(
    head: &H,
    whole: &W,
) -> Result<Option<Packet>, Malformed> {
    let mut pkt = Packet::default();
    Ok(parse_head_first_into(head, whole, &mut pkt)?.then_some(pkt))
}

/// [`parse_head_first`] into `pkt`, as [`parse_into`].
#[inline(always)]
pub fn parse_head_first_into<H: Frame + ?Sized, W: Frame + ?Sized>(
    head: &H,
    whole: &W,
    pkt: &mut Packet,
) -> Result<bool, Malformed> {
    match parse_into(head, pkt) {
        Err(Malformed::Truncated) => parse_into(whole, pkt),
        parsed => parsed,
    }
}

#[inline(always)]
fn parse_ipv4<F: Frame + ?Sized>(f: &F, pkt: &mut Packet) -> Result<(), Malformed> {
    let off = ETH_HLEN;
    let vihl: u8 = rd(f, off)?;
    if vihl >> 4 != 4 {
        return Err(Malformed::BadVersion);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(Malformed::BadHeaderLength);
    }
    let mut tot_len = be16(f, off + 2)? as usize;
    let proto: u8 = rd(f, off + 9)?;
    if tot_len == 0 && proto == proto::TCP && f.is_gso() {
        // BIG TCP over IPv4 (Linux 6.3): a GSO packet over 64 KiB says 0.
        tot_len = f.len().saturating_sub(off);
    }
    if tot_len < ihl {
        return Err(Malformed::BadLength);
    }
    let end = off + tot_len;
    if end > f.len() {
        return Err(Malformed::Truncated);
    }
    words::zero::<_, u32>(pkt);
    pkt.family = AF_INET;
    pkt.proto = proto;
    pkt.src[0] = rd(f, off + 12)?;
    pkt.dst[0] = rd(f, off + 16)?;
    let frag = be16(f, off + 6)?;
    if frag & 0x3fff != 0 {
        pkt.frag_id = be16(f, off + 4)? as u32;
        if frag & 0x1fff != 0 {
            pkt.frag = FRAG_LATER;
            return Ok(());
        }
        pkt.frag = FRAG_FIRST;
    }
    parse_l4(f, off + ihl, end, pkt)
}

#[inline(always)]
fn parse_ipv6<F: Frame + ?Sized>(f: &F, pkt: &mut Packet) -> Result<(), Malformed> {
    let off = ETH_HLEN;
    let v: u8 = rd(f, off)?;
    if v >> 4 != 6 {
        return Err(Malformed::BadVersion);
    }
    let payload_len = be16(f, off + 4)? as usize;
    let end = if payload_len == 0 && f.is_gso() {
        // BIG TCP over IPv6 (Linux 5.19): a GSO packet over 64 KiB says 0 (the kernel no longer
        // adds the jumbo option it stood for).
        f.len()
    } else {
        off + 40 + payload_len
    };
    if end > f.len() {
        return Err(Malformed::Truncated);
    }
    words::zero::<_, u32>(pkt);
    pkt.family = AF_INET6;
    words::copy::<_, u32>(&mut pkt.src, &rd(f, off + 8)?);
    words::copy::<_, u32>(&mut pkt.dst, &rd(f, off + 24)?);
    let mut next: u8 = rd(f, off + 6)?;
    let mut cur = off + 40;
    let mut done = false;
    // One more round than there are extension headers to follow: the last one only looks at what
    // follows the last extension header followed.
    for i in 0..MAX_IPV6_EXTENSIONS + 1 {
        let len = match next {
            // Hop-by-hop options must come first (RFC 8200 §4.1).
            0 if i != 0 => return Err(Malformed::BadExtensionChain),
            // Longer than the parser follows.
            0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254 if i == MAX_IPV6_EXTENSIONS => {
                return Err(Malformed::BadExtensionChain)
            }
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
                if cur + 8 > end {
                    return Err(Malformed::Truncated);
                }
                let field = be16(f, cur + 2)?;
                pkt.frag_id = u32::from_be(rd::<F, u32>(f, cur + 4)?);
                if field & 0xfff8 != 0 {
                    pkt.frag = FRAG_LATER;
                    pkt.proto = rd(f, cur)?;
                    return Ok(());
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
    parse_l4(f, cur, end, pkt)
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
        let seq = u32::from_be(rd(f, off + 4)?);
        let ack = u32::from_be(rd(f, off + 8)?);
        let flags = pkt.tcp_flags;
        let payload = (room - doff) as u32;
        // Field by field: the packet was zeroed, and a struct assignment would be a byte-wise
        // copy in eBPF (see `crate::words`).
        pkt.tcp.seq = seq;
        pkt.tcp.ack = ack;
        pkt.tcp.sack = ack;
        pkt.tcp.end = seq
            .wrapping_add(payload)
            .wrapping_add((flags & 0x02 != 0) as u32)
            .wrapping_add((flags & 0x01 != 0) as u32);
        pkt.tcp.win = be16(f, off + 14)?;
        if doff > 20 {
            pkt.tcp.opts = TCP_OPT_PRESENT;
            pkt.tcp.opt_len = (doff - 20) as u8;
            // Timestamps alone (NOP, NOP, TS: most segments of an established Linux connection)
            // say nothing window tracking needs: the walk is skipped.
            if doff == 32 && rd::<F, [u8; 4]>(f, off + 20)? == [1, 1, 8, 10] {
                pkt.tcp.opts |= TCP_OPT_TIMESTAMPS_ONLY;
            }
        }
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

/// The options of a TCP header, copied out of the packet: what [`parse_tcp_option_bytes`] walks.
/// A struct (not a bare array) so that an eBPF global function can take a pointer to it. It holds
/// 128 bytes for at most 40 of options: the walk's indexes are masked into range, and where the
/// compiler drops a mask it has proven needless, the verifier, which does not follow the bounds
/// the compiler used (an option's offset plus its size within the list), still sees an index
/// below 40 plus a constant below 40.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptionBytes {
    /// The options, `TcpFields::opt_len` of them valid (at most [`TCP_MAX_OPTION_BYTES`]).
    pub bytes: [u8; 128],
}

impl Default for TcpOptionBytes {
    fn default() -> Self {
        TcpOptionBytes { bytes: [0; 128] }
    }
}

impl TcpOptionBytes {
    /// The byte at `i`, masked into the buffer (see the type's documentation).
    #[inline(always)]
    fn at(&self, i: usize) -> u8 {
        self.bytes[i & 127]
    }
}

/// Copies the options of the TCP header `pkt` describes out of `f` and walks them
/// ([`parse_tcp_option_bytes`]). The eBPF programs copy with one skb helper call instead.
pub fn parse_tcp_options<F: Frame + ?Sized>(f: &F, pkt: &mut Packet) {
    let off = pkt.l4_off as usize + 20;
    let mut opts = TcpOptionBytes::default();
    let len = (pkt.tcp.opt_len as usize).min(TCP_MAX_OPTION_BYTES);
    for (i, b) in opts.bytes.iter_mut().take(len).enumerate() {
        match f.read::<u8>(off + i) {
            Some(v) => *b = v,
            None => return,
        }
    }
    parse_tcp_option_bytes(&opts, len, &mut pkt.tcp);
}

/// Walks the first `len` bytes of a TCP header's options for what window tracking needs, as
/// nf_conntrack's `tcp_options` and `tcp_sack` do: Window Scale, SACK Permitted, and the highest
/// SACK right edge of the first SACK option. A malformed list ends the walk and keeps what was
/// read before it, as the kernel's does. [`parse`] leaves this out: it is only needed when the
/// header has options beyond timestamps alone, and in eBPF it runs as a global function of its
/// own so that its loop is verified once, not once per path of the parser.
#[inline(always)]
pub fn parse_tcp_option_bytes(opts: &TcpOptionBytes, len: usize, tcp: &mut TcpFields) {
    const EOL: u8 = 0;
    const NOP: u8 = 1;
    const WINDOW: u8 = 3;
    const SACK_PERM: u8 = 4;
    const SACK: u8 = 5;
    let len = len.min(TCP_MAX_OPTION_BYTES);
    let mut i = 0usize;
    for _ in 0..TCP_MAX_OPTION_BYTES {
        if i >= len {
            break;
        }
        let kind = opts.at(i);
        if kind == EOL {
            break;
        }
        if kind == NOP {
            i += 1;
            continue;
        }
        if i + 2 > len {
            break;
        }
        let size = opts.at(i + 1) as usize;
        if size < 2 || i + size > len {
            break;
        }
        if kind == SACK_PERM && size == 2 {
            tcp.opts |= TCP_OPT_SACK_PERM;
        } else if kind == WINDOW && size == 3 {
            tcp.wscale = opts.at(i + 2).min(TCP_MAX_WSCALE);
            tcp.opts |= TCP_OPT_WSCALE;
        } else if kind == SACK && size >= 10 && (size - 2).is_multiple_of(8) {
            // At most four blocks fit in 40 bytes of options.
            for blk in 0..4usize {
                if 2 + 8 * blk >= size {
                    break;
                }
                let at = i + 2 + 8 * blk + 4;
                let right = u32::from_be_bytes([
                    opts.at(at),
                    opts.at(at + 1),
                    opts.at(at + 2),
                    opts.at(at + 3),
                ]);
                if crate::window::seq_after(right, tcp.sack) {
                    tcp.sack = right;
                }
            }
            break;
        }
        i += size;
    }
}

/// Parses the packet header an ICMP or ICMPv6 error carries (the original datagram: its IP header
/// and at least 8 bytes of its layer 4 header). `None` when it is absent, truncated, of another
/// family, or a later fragment: such an error matches no connection. The extension headers of a
/// quoted IPv6 packet are followed as the kernel does (`ipv6_skip_exthdr`), so that a Packet Too
/// Big about a packet with destination options or a routing header is RELATED, not a black
/// hole.
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
        inner.src = f.read(off + 8)?;
        inner.dst = f.read(off + 24)?;
        let (proto, l4) = skip_quoted_ipv6_extensions(f, f.read(off + 6)?, off + 40)?;
        inner.proto = proto;
        l4
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

/// Follows the extension headers of a quoted IPv6 packet from `next` (the fixed header's next
/// header) at `cur`: the layer 4 protocol and its offset. `None` for a later fragment (no layer 4
/// header), a chain longer than [`MAX_IPV6_EXTENSIONS`], or one that runs past what was quoted.
#[inline(always)]
fn skip_quoted_ipv6_extensions<F: Frame + ?Sized>(
    f: &F,
    mut next: u8,
    mut cur: usize,
) -> Option<(u8, usize)> {
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let len = match next {
            0 | 43 | 60 | 135 | 139 | 140 | 253 | 254 => (f.read::<u8>(cur + 1)? as usize + 1) * 8,
            51 => (f.read::<u8>(cur + 1)? as usize + 2) * 4,
            44 => {
                if u16::from_be(f.read::<u16>(cur + 2)?) & 0xfff8 != 0 {
                    return None;
                }
                8
            }
            _ => return Some((next, cur)),
        };
        next = f.read(cur)?;
        cur += len;
    }
    match next {
        0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => None,
        _ => Some((next, cur)),
    }
}

#[cfg(test)]
mod tests {
    //! The parser on frames built by etherparse (through the test kit's builders), on the host:
    //! the same code the eBPF programs run on skbs.

    extern crate std;

    use std::{
        net::{IpAddr, Ipv6Addr},
        vec,
        vec::Vec,
    };

    use etherparse::{
        IpAuthHeader, IpHeaders, IpNumber, Ipv6Extensions, Ipv6Header, PacketBuilder,
    };
    use kubesg_testkit::packet::{self, IcmpError, Ipv6Ext, TcpFlags, ETH_LEN, IPV6_LEN};

    use super::*;

    const POD4: &str = "10.0.0.5";
    const PEER4: &str = "10.0.1.7";
    const POD6: &str = "fd00::5";
    const PEER6: &str = "fd00:1::7";

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    /// The address as the parser stores it (wire bytes in the words' memory).
    fn raw(a: IpAddr) -> RawAddr {
        let mut w = [0u32; 4];
        match a {
            IpAddr::V4(v4) => w[0] = u32::from_ne_bytes(v4.octets()),
            IpAddr::V6(v6) => {
                for (word, c) in w.iter_mut().zip(v6.octets().chunks_exact(4)) {
                    *word = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        w
    }

    fn parsed(frame: &[u8]) -> Packet {
        match parse(frame) {
            Ok(Some(p)) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    fn err(frame: &[u8]) -> Malformed {
        match parse(frame) {
            Err(e) => e,
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    /// (pod, peer) of each family.
    fn families() -> [(IpAddr, IpAddr); 2] {
        [(ip(POD4), ip(PEER4)), (ip(POD6), ip(PEER6))]
    }

    fn l3_len(a: IpAddr) -> usize {
        if a.is_ipv4() {
            20
        } else {
            IPV6_LEN
        }
    }

    fn family(a: IpAddr) -> u8 {
        if a.is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        }
    }

    fn icmp_proto(a: IpAddr) -> u8 {
        if a.is_ipv4() {
            proto::ICMP
        } else {
            proto::ICMPV6
        }
    }

    // --- Well-formed packets ---------------------------------------------------------------

    #[test]
    fn tcp_segment_yields_addresses_ports_flags_and_offset() {
        for (pod, peer) in families() {
            let p = parsed(&packet::tcp(pod, peer, 40000, 443, TcpFlags::SYN_ACK));
            assert_eq!(p.family, family(pod));
            assert_eq!(p.proto, proto::TCP);
            assert_eq!((p.src, p.dst), (raw(pod), raw(peer)));
            assert_eq!((p.sport, p.dport), (40000, 443));
            assert_eq!(p.tcp_flags, 0x12);
            assert_eq!(p.frag, FRAG_NONE);
            assert_eq!(p.l4_off as usize, ETH_LEN + l3_len(pod));
        }
    }

    #[test]
    fn udp_datagram_yields_its_ports() {
        for (pod, peer) in families() {
            let p = parsed(&packet::udp(pod, peer, 5353, 53, b"query"));
            assert_eq!(p.proto, proto::UDP);
            assert_eq!((p.sport, p.dport), (5353, 53));
            assert_eq!(p.tcp_flags, 0);
        }
    }

    #[test]
    fn icmp_echo_yields_identifier_as_source_and_type_code_as_destination() {
        for (pod, peer) in families() {
            let p = parsed(&packet::icmp_echo_request(pod, peer, 0xbeef, 3));
            let t = if pod.is_ipv4() { 8 } else { 128 };
            assert_eq!(p.proto, icmp_proto(pod));
            assert_eq!((p.icmp_type, p.icmp_code), (t, 0));
            assert_eq!(p.sport, 0xbeef);
            assert_eq!(p.dport, u16::from(t) << 8);
            let p = parsed(&packet::icmp_raw(pod, peer, t, 9, [0, 1, 0, 1], b""));
            assert_eq!(p.dport, (u16::from(t) << 8) | 9);
        }
    }

    #[test]
    fn icmp_inside_ipv6_is_not_icmpv6() {
        // Protocol 1 in IPv6 is a generic protocol: no type, no identifier.
        let p = parsed(&packet::ip_raw(
            ip(POD6),
            ip(PEER6),
            proto::ICMP,
            &[8, 0, 0, 0, 0, 7, 0, 1],
        ));
        assert_eq!(p.proto, proto::ICMP);
        assert_eq!((p.icmp_type, p.sport, p.dport), (0, 0, 0));
    }

    #[test]
    fn sctp_yields_its_ports_and_other_protocols_none() {
        for (pod, peer) in families() {
            let sctp = packet::ip_raw(
                pod,
                peer,
                proto::SCTP,
                &[0x9c, 0x40, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0],
            );
            let p = parsed(&sctp);
            assert_eq!((p.proto, p.sport, p.dport), (proto::SCTP, 40000, 80));
            let gre = parsed(&packet::ip_raw(pod, peer, 47, &[0xff; 8]));
            assert_eq!((gre.proto, gre.sport, gre.dport), (47, 0, 0));
        }
    }

    #[test]
    fn frames_that_are_not_ip_are_not_packets() {
        let arp = packet::arp_request(
            "10.0.0.5".parse().expect("a"),
            "10.0.0.1".parse().expect("a"),
        );
        assert_eq!(parse(&arp[..]), Ok(None));
        let lldp = packet::with_byte(packet::with_byte(arp, 12, 0x88), 13, 0xcc);
        assert_eq!(parse(&lldp[..]), Ok(None));
    }

    #[test]
    fn ipv4_options_move_the_layer_4_header() {
        let syn = packet::tcp(ip(POD4), ip(PEER4), 40000, 80, TcpFlags::SYN);
        let with = packet::with_ipv4_options(&syn, &[1, 1, 1, 0, 1, 1, 1, 0]);
        let p = parsed(&with);
        assert_eq!(p.l4_off as usize, ETH_LEN + 28);
        assert_eq!(p.dport, 80);
    }

    #[test]
    fn ethernet_padding_after_the_ip_packet_is_ignored() {
        for (pod, peer) in families() {
            let mut f = packet::udp(pod, peer, 1, 2, b"");
            f.extend_from_slice(&[0xee; 20]);
            assert_eq!(parsed(&f).dport, 2);
        }
    }

    #[test]
    fn udp_length_shorter_than_the_datagram_is_accepted() {
        for (pod, peer) in families() {
            let f = packet::with_udp_len(packet::udp(pod, peer, 1, 2, b"payload"), 8);
            assert_eq!(parsed(&f).dport, 2);
        }
    }

    // --- Malformed ---------------------------------------------------------------------------

    #[test]
    fn frames_shorter_than_ethernet_are_truncated() {
        for len in [0, 1, 12, 13] {
            assert_eq!(err(&[0x08; 14][..len]), Malformed::Truncated, "{len} bytes");
        }
    }

    #[test]
    fn vlan_tags_are_refused() {
        let syn = packet::tcp(ip(POD4), ip(PEER4), 1, 2, TcpFlags::SYN);
        let tagged = packet::with_vlan(&syn, 100);
        assert_eq!(err(&tagged), Malformed::Vlan);
        let qinq = packet::with_byte(packet::with_byte(tagged, 12, 0x88), 13, 0xa8);
        assert_eq!(err(&qinq), Malformed::Vlan);
    }

    #[test]
    fn every_proper_prefix_of_an_ip_frame_is_malformed() {
        for (pod, peer) in families() {
            let frames = [
                packet::tcp(pod, peer, 1, 2, TcpFlags::SYN),
                packet::udp(pod, peer, 1, 2, b"abc"),
                packet::icmp_echo_request(pod, peer, 1, 1),
                packet::with_ipv6_extensions(
                    &packet::udp(ip(POD6), ip(PEER6), 1, 2, b""),
                    &[Ipv6Ext::HopByHop, Ipv6Ext::Routing],
                ),
            ];
            for f in &frames {
                assert!(parse(&f[..]).is_ok_and(|p| p.is_some()));
                for len in 0..f.len() {
                    assert!(
                        parse(&f[..len]).is_err(),
                        "{len} of {} bytes parsed",
                        f.len()
                    );
                }
            }
        }
    }

    /// The first `readable` bytes of a frame, as an skb's linear part: its length is the whole
    /// frame's, reads past `readable` are `None`.
    struct Head<'a> {
        frame: &'a [u8],
        readable: usize,
    }

    impl Frame for Head<'_> {
        fn len(&self) -> usize {
            self.frame.len()
        }

        fn read<T: Copy>(&self, off: usize) -> Option<T> {
            self.frame[..self.readable].read(off)
        }
    }

    /// A whole frame that counts the reads made through it.
    struct Counted<'a> {
        frame: &'a [u8],
        reads: core::cell::Cell<usize>,
    }

    impl Frame for Counted<'_> {
        fn len(&self) -> usize {
            self.frame.len()
        }

        fn read<T: Copy>(&self, off: usize) -> Option<T> {
            self.reads.set(self.reads.get() + 1);
            self.frame.read(off)
        }
    }

    #[test]
    fn parsing_the_head_first_gives_the_whole_frames_result_wherever_the_head_ends() {
        let mut frames = Vec::new();
        for (pod, peer) in families() {
            let tcp = packet::tcp(pod, peer, 1, 2, TcpFlags::SYN);
            let udp = packet::udp(pod, peer, 1, 2, b"abcdefgh");
            let [first_fragment, later_fragment] = packet::fragment(&udp, 8, 7);
            frames.extend([
                tcp.clone(),
                udp.clone(),
                packet::tcp(pod, peer, 3, 4, TcpFlags::ACK),
                packet::icmp_echo_request(pod, peer, 1, 1),
                packet::icmp_error(peer, &tcp, IcmpError::PortUnreachable),
                packet::ip_raw(pod, peer, 132, &[0; 16]),
                first_fragment,
                later_fragment,
                packet::truncated(&tcp, tcp.len() - 1),
                packet::truncated_in_l4(&tcp, 10),
                packet::with_tcp_data_offset(tcp.clone(), 4),
                packet::with_tcp_data_offset(tcp.clone(), 15),
                packet::with_udp_len(udp.clone(), 3),
                packet::with_vlan(&tcp, 5),
            ]);
        }
        let v4 = packet::tcp(ip(POD4), ip(PEER4), 1, 2, TcpFlags::SYN);
        let v6 = packet::udp(ip(POD6), ip(PEER6), 1, 2, b"");
        frames.extend([
            packet::with_ipv4_options(&v4, &[1, 1, 1, 1]),
            packet::with_ipv4_ihl(v4.clone(), 4),
            packet::with_ipv4_total_len(v4.clone(), 1000),
            packet::with_ipv6_extensions(&v6, &[Ipv6Ext::HopByHop, Ipv6Ext::Routing]),
            packet::with_ipv6_payload_len(v6.clone(), 1000),
            packet::ipv6_atomic_fragment(&v6, 9),
            packet::arp_request("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()),
            packet::with_byte(v4, ETH_LEN, 0x65),
        ]);
        for frame in &frames {
            let expected = parse(&frame[..]);
            for readable in 0..=frame.len() {
                let head = Head { frame, readable };
                let whole = Counted {
                    frame,
                    reads: core::cell::Cell::new(0),
                };
                assert_eq!(
                    parse_head_first(&head, &whole),
                    expected,
                    "{readable} of {} bytes readable in place",
                    frame.len()
                );
                if readable == frame.len() && expected != Err(Malformed::Truncated) {
                    assert_eq!(whole.reads.get(), 0, "a linear frame is read in place only");
                }
            }
        }
    }

    #[test]
    fn ip_version_must_match_the_ethertype() {
        let v4 = packet::tcp(ip(POD4), ip(PEER4), 1, 2, TcpFlags::SYN);
        assert_eq!(
            err(&packet::with_byte(v4, ETH_LEN, 0x65)),
            Malformed::BadVersion
        );
        let v6 = packet::tcp(ip(POD6), ip(PEER6), 1, 2, TcpFlags::SYN);
        assert_eq!(
            err(&packet::with_byte(v6, ETH_LEN, 0x45)),
            Malformed::BadVersion
        );
    }

    #[test]
    fn ipv4_header_length_below_five_words_is_refused() {
        for ihl in 0..5 {
            let f = packet::with_ipv4_ihl(packet::udp(ip(POD4), ip(PEER4), 1, 2, b""), ihl);
            assert_eq!(err(&f), Malformed::BadHeaderLength, "IHL {ihl}");
        }
    }

    #[test]
    fn ipv4_total_length_below_the_header_is_refused() {
        let udp = packet::udp(ip(POD4), ip(PEER4), 1, 2, b"");
        assert_eq!(
            err(&packet::with_ipv4_total_len(udp.clone(), 19)),
            Malformed::BadLength
        );
        // IHL 15 (60 bytes) in a 28-byte packet.
        assert_eq!(err(&packet::with_ipv4_ihl(udp, 15)), Malformed::BadLength);
    }

    #[test]
    fn ip_length_beyond_the_frame_is_truncated() {
        let v4 = packet::udp(ip(POD4), ip(PEER4), 1, 2, b"x");
        let len = (v4.len() - ETH_LEN + 1) as u16;
        assert_eq!(
            err(&packet::with_ipv4_total_len(v4, len)),
            Malformed::Truncated
        );
        let v6 = packet::udp(ip(POD6), ip(PEER6), 1, 2, b"x");
        let len = (v6.len() - ETH_LEN - IPV6_LEN + 1) as u16;
        assert_eq!(
            err(&packet::with_ipv6_payload_len(v6, len)),
            Malformed::Truncated
        );
    }

    #[test]
    fn layer_4_headers_cut_by_the_ip_length_are_truncated() {
        for (pod, peer) in families() {
            let tcp = packet::tcp(pod, peer, 1, 2, TcpFlags::SYN);
            let udp = packet::udp(pod, peer, 1, 2, b"");
            let icmp = packet::icmp_echo_request(pod, peer, 1, 1);
            for (frame, need) in [(&tcp, 20), (&udp, 8), (&icmp, 8)] {
                for keep in 0..need {
                    assert_eq!(
                        err(&packet::truncated_in_l4(frame, keep)),
                        Malformed::Truncated,
                        "{keep}"
                    );
                }
                assert!(parse(&packet::truncated_in_l4(frame, need)[..]).is_ok());
            }
        }
    }

    #[test]
    fn tcp_data_offset_must_hold_the_header_and_fit_the_segment() {
        for (pod, peer) in families() {
            let syn = packet::tcp(pod, peer, 1, 2, TcpFlags::SYN);
            for words in 0..5 {
                let f = packet::with_tcp_data_offset(syn.clone(), words);
                assert_eq!(err(&f), Malformed::BadHeaderLength, "{words} words");
            }
            let f = packet::with_tcp_data_offset(syn, 6);
            assert_eq!(err(&f), Malformed::Truncated);
        }
    }

    #[test]
    fn udp_length_must_hold_the_header_and_fit_the_datagram() {
        for (pod, peer) in families() {
            let udp = packet::udp(pod, peer, 1, 2, b"abcd");
            for len in [0, 7, 13] {
                let f = packet::with_udp_len(udp.clone(), len);
                assert_eq!(err(&f), Malformed::BadLength, "length {len}");
            }
            assert!(parse(&packet::with_udp_len(udp, 12)[..]).is_ok());
        }
    }

    // --- IPv6 extension headers --------------------------------------------------------------

    fn udp6() -> Vec<u8> {
        packet::udp(ip(POD6), ip(PEER6), 40000, 53, b"query")
    }

    #[test]
    fn extension_chain_is_followed_to_the_layer_4_header() {
        let chain = [
            Ipv6Ext::HopByHop,
            Ipv6Ext::DestinationOptions,
            Ipv6Ext::Routing,
            Ipv6Ext::LongDestinationOptions { units: 4 },
        ];
        let p = parsed(&packet::with_ipv6_extensions(&udp6(), &chain));
        assert_eq!(p.proto, proto::UDP);
        assert_eq!((p.sport, p.dport), (40000, 53));
        assert_eq!(p.l4_off as usize, ETH_LEN + IPV6_LEN + 8 + 8 + 8 + 40);
    }

    #[test]
    fn authentication_header_length_counts_four_octet_units() {
        // AH with a 12-byte ICV: 24 bytes, length field 4.
        let ah = IpAuthHeader::new(IpNumber::UDP, 0x1234, 1, &[0; 12]).expect("AH");
        let ipv6 = Ipv6Header {
            source: POD6.parse::<Ipv6Addr>().expect("address").octets(),
            destination: PEER6.parse::<Ipv6Addr>().expect("address").octets(),
            hop_limit: 64,
            ..Ipv6Header::default()
        };
        let exts = Ipv6Extensions {
            auth: Some(ah),
            ..Ipv6Extensions::default()
        };
        let mut f = Vec::new();
        PacketBuilder::ethernet2(packet::SRC_MAC, packet::DST_MAC)
            .ip(IpHeaders::Ipv6(ipv6, exts))
            .udp(40000, 53)
            .write(&mut f, b"q")
            .expect("frame");
        let p = parsed(&f);
        assert_eq!(p.l4_off as usize, ETH_LEN + IPV6_LEN + 24);
        assert_eq!((p.proto, p.dport), (proto::UDP, 53));
    }

    #[test]
    fn hop_by_hop_options_after_another_header_are_refused() {
        let f = packet::with_ipv6_extensions(
            &udp6(),
            &[Ipv6Ext::DestinationOptions, Ipv6Ext::HopByHop],
        );
        assert_eq!(err(&f), Malformed::BadExtensionChain);
    }

    #[test]
    fn extension_chain_is_followed_up_to_its_limit_and_refused_beyond() {
        let max = vec![Ipv6Ext::DestinationOptions; MAX_IPV6_EXTENSIONS];
        let p = parsed(&packet::with_ipv6_extensions(&udp6(), &max));
        assert_eq!((p.proto, p.dport), (proto::UDP, 53));
        let over = vec![Ipv6Ext::DestinationOptions; MAX_IPV6_EXTENSIONS + 1];
        assert_eq!(
            err(&packet::with_ipv6_extensions(&udp6(), &over)),
            Malformed::BadExtensionChain
        );
    }

    #[test]
    fn extension_header_running_past_the_payload_is_truncated() {
        let f = packet::with_ipv6_extensions(&udp6(), &[Ipv6Ext::DestinationOptions]);
        let f = packet::with_byte(f, ETH_LEN + IPV6_LEN + 1, 200);
        assert_eq!(err(&f), Malformed::Truncated);
        // The bytes are in the frame, but beyond the payload length.
        let f =
            packet::with_ipv6_extensions(&udp6(), &[Ipv6Ext::LongDestinationOptions { units: 2 }]);
        assert_eq!(
            err(&packet::with_ipv6_payload_len(f, 16)),
            Malformed::Truncated
        );
    }

    #[test]
    fn no_next_header_ends_the_chain_without_layer_4() {
        let f = packet::ip_raw(ip(POD6), ip(PEER6), 59, &[]);
        let p = parsed(&f);
        assert_eq!((p.proto, p.sport, p.dport), (59, 0, 0));
    }

    // --- Fragments ---------------------------------------------------------------------------

    #[test]
    fn first_fragment_carries_ports_and_later_fragment_only_the_datagram() {
        for (pod, peer) in families() {
            let dgram = packet::udp(pod, peer, 40000, 53, &[7; 100]);
            let [first, later] = packet::fragment(&dgram, 48, 0x4321);
            let p = parsed(&first);
            assert_eq!(p.frag, FRAG_FIRST);
            assert_eq!(p.frag_id, 0x4321);
            assert_eq!((p.proto, p.sport, p.dport), (proto::UDP, 40000, 53));
            let p = parsed(&later);
            assert_eq!(p.frag, FRAG_LATER);
            assert_eq!(p.frag_id, 0x4321);
            assert_eq!(p.proto, proto::UDP);
            assert_eq!((p.sport, p.dport), (0, 0), "a later fragment has no ports");
            assert_eq!((p.src, p.dst), (raw(pod), raw(peer)));
        }
    }

    #[test]
    fn ipv6_fragment_identification_is_32_bits() {
        let [first, later] = packet::fragment(
            &packet::udp(ip(POD6), ip(PEER6), 1, 2, &[0; 64]),
            32,
            0xdead_beef,
        );
        assert_eq!(parsed(&first).frag_id, 0xdead_beef);
        assert_eq!(parsed(&later).frag_id, 0xdead_beef);
    }

    #[test]
    fn ipv6_later_fragment_reports_the_header_after_its_fragment_header() {
        let dgram = packet::with_ipv6_extensions(
            &packet::udp(ip(POD6), ip(PEER6), 1, 2, &[0; 64]),
            &[Ipv6Ext::DestinationOptions],
        );
        let [first, later] = packet::fragment(&dgram, 32, 9);
        assert_eq!(parsed(&first).proto, proto::UDP);
        assert_eq!(parsed(&later).proto, 60);
    }

    #[test]
    fn ipv6_atomic_fragment_is_not_a_fragment() {
        let f = packet::ipv6_atomic_fragment(&udp6(), 3);
        let p = parsed(&f);
        assert_eq!(p.frag, FRAG_NONE);
        assert_eq!((p.proto, p.dport), (proto::UDP, 53));
    }

    #[test]
    fn first_fragment_may_carry_part_of_the_udp_length() {
        // The UDP length covers the whole datagram; only 16 bytes of it are here.
        for (pod, peer) in families() {
            let [first, _] = packet::fragment(&packet::udp(pod, peer, 1, 2, &[0; 200]), 16, 1);
            assert_eq!(parsed(&first).dport, 2);
        }
    }

    #[test]
    fn first_fragment_without_a_whole_tcp_header_is_truncated() {
        for (pod, peer) in families() {
            let [first, _] = packet::fragment(&packet::tcp(pod, peer, 1, 2, TcpFlags::SYN), 8, 1);
            assert_eq!(err(&first), Malformed::Truncated);
        }
    }

    #[test]
    fn ipv6_fragment_header_beyond_the_payload_length_is_truncated() {
        let [_, later] = packet::fragment(&packet::udp(ip(POD6), ip(PEER6), 1, 2, &[0; 64]), 32, 1);
        // Payload length 4: the fragment header itself is cut.
        assert_eq!(
            err(&packet::with_ipv6_payload_len(later, 4)),
            Malformed::Truncated
        );
    }

    // --- The packet inside an ICMP error -----------------------------------------------------

    fn inner_of(error: &[u8]) -> Option<Packet> {
        let outer = parsed(error);
        parse_icmp_error_inner(error, &outer)
    }

    #[test]
    fn icmp_error_quotes_the_original_addresses_and_ports() {
        for (pod, peer) in families() {
            let q = packet::udp(pod, peer, 40000, 53, b"query");
            let e = packet::icmp_error(peer, &q, IcmpError::PortUnreachable);
            let outer = parsed(&e);
            assert_eq!(outer.icmp_type, if pod.is_ipv4() { 3 } else { 1 });
            let inner = parse_icmp_error_inner(&e[..], &outer).expect("the quoted packet");
            assert_eq!(inner.family, family(pod));
            assert_eq!(inner.proto, proto::UDP);
            assert_eq!((inner.src, inner.dst), (raw(pod), raw(peer)));
            assert_eq!((inner.sport, inner.dport), (40000, 53));
        }
    }

    #[test]
    fn icmp_error_about_an_echo_quotes_its_identifier() {
        for (pod, peer) in families() {
            let ping = packet::icmp_echo_request(pod, peer, 0x77, 1);
            let e = packet::icmp_error(
                ip(if pod.is_ipv4() { "10.9.9.9" } else { "fd09::9" }),
                &ping,
                IcmpError::TimeExceeded,
            );
            let inner = inner_of(&e).expect("the quoted echo");
            assert_eq!(inner.proto, icmp_proto(pod));
            assert_eq!(inner.sport, 0x77);
            assert_eq!(inner.icmp_type, if pod.is_ipv4() { 8 } else { 128 });
        }
    }

    #[test]
    fn icmp_error_about_a_later_fragment_matches_nothing() {
        for (pod, peer) in families() {
            let [_, later] = packet::fragment(&packet::udp(pod, peer, 1, 2, &[0; 64]), 32, 1);
            let e = packet::icmp_error(peer, &later, IcmpError::HostUnreachable);
            // IPv4: a non-zero offset; IPv6: the quoted packet starts with a Fragment header.
            assert_eq!(inner_of(&e), None);
        }
    }

    #[test]
    fn icmpv6_error_about_a_packet_with_extension_headers_quotes_its_ports() {
        let chain = [
            Ipv6Ext::HopByHop,
            Ipv6Ext::DestinationOptions,
            Ipv6Ext::Routing,
            Ipv6Ext::LongDestinationOptions { units: 2 },
        ];
        let q = packet::with_ipv6_extensions(&udp6(), &chain);
        let e = packet::icmp_error(ip(PEER6), &q, IcmpError::PortUnreachable);
        let inner = inner_of(&e).expect("the quoted packet");
        assert_eq!(
            (inner.proto, inner.sport, inner.dport, inner.src),
            (proto::UDP, 40000, 53, raw(ip(POD6)))
        );
    }

    #[test]
    fn icmpv6_error_about_a_later_fragment_or_an_endless_chain_matches_nothing() {
        let [_, later] = packet::fragment(&udp6(), 8, 5);
        let e = packet::icmp_error(ip(PEER6), &later, IcmpError::PortUnreachable);
        assert_eq!(inner_of(&e), None);
        let chain = [Ipv6Ext::DestinationOptions; MAX_IPV6_EXTENSIONS + 1];
        let q = packet::with_ipv6_extensions(&udp6(), &chain);
        let e = packet::icmp_error(ip(PEER6), &q, IcmpError::PortUnreachable);
        assert_eq!(inner_of(&e), None);
    }

    /// A frame the kernel marks as a GSO super-packet.
    struct Gso<'a>(&'a [u8]);

    impl Frame for Gso<'_> {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn read<T: Copy>(&self, off: usize) -> Option<T> {
            self.0.read(off)
        }
        fn is_gso(&self) -> bool {
            true
        }
    }

    #[test]
    fn big_tcp_length_zero_is_the_frames_length_on_gso_packets_only() {
        for (pod, peer) in families() {
            let seg = packet::tcp(pod, peer, 40000, 80, TcpFlags::ACK);
            let zero = if pod.is_ipv4() {
                packet::with_ipv4_total_len(seg.clone(), 0)
            } else {
                packet::with_ipv6_payload_len(seg.clone(), 0)
            };
            let big = parse(&Gso(&zero)).expect("a GSO packet").expect("IP");
            assert_eq!((big.proto, big.sport, big.dport), (proto::TCP, 40000, 80));
            assert_eq!(big, parse(&seg[..]).unwrap().unwrap());
            assert!(parse(&zero[..]).is_err(), "not GSO: {pod}");
        }
        // IPv4 total length 0 is BIG TCP only for TCP.
        let udp = packet::with_ipv4_total_len(packet::udp(ip(POD4), ip(PEER4), 1, 2, b"x"), 0);
        assert_eq!(parse(&Gso(&udp)), Err(Malformed::BadLength));
    }

    #[test]
    fn icmp_error_quoting_too_little_matches_nothing() {
        for (pod, peer) in families() {
            let q = packet::tcp(pod, peer, 1, 2, TcpFlags::SYN);
            let e = packet::icmp_error(peer, &q, IcmpError::PortUnreachable);
            // Keep the quoted IP header and 2 bytes of TCP: no destination port.
            let outer = parsed(&e);
            let cut = outer.l4_off as usize + 8 + l3_len(pod) + 2;
            let short = packet::truncated(&e, cut);
            assert_eq!(parse_icmp_error_inner(&short[..], &outer), None);
        }
    }

    #[test]
    fn icmp_error_quoting_another_ip_version_matches_nothing() {
        let q = packet::udp(ip(POD4), ip(PEER4), 1, 2, b"x");
        let e = packet::icmp_error(ip(PEER4), &q, IcmpError::PortUnreachable);
        let outer = parsed(&e);
        let bad = packet::with_byte(e, outer.l4_off as usize + 8, 0x65);
        assert_eq!(parse_icmp_error_inner(&bad[..], &outer), None);
    }
}
