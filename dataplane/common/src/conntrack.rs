//! Connection tracking: the map key and value, and the state machine that moves an entry on each
//! packet, following Linux nf_conntrack (net/netfilter/nf_conntrack_proto_{tcp,udp,icmp}.c).
//!
//! Every endpoint (pod interface) has its own view of its connections, as every network namespace
//! has its own conntrack table: the key starts with the interface index and orders the addresses
//! and ports from the pod's side, so both directions of a connection find the same entry, and a
//! connection between two pods on one node has one entry at each end (each end's rules judge it).
//!
//! The functions here are pure (`now` and the settings come in as arguments) so the eBPF programs
//! and userspace tests run the very same transitions.

use crate::{
    config::{timeout, Config},
    parse::Packet,
    proto, Direction, RawAddr, AF_INET6,
};

/// TCP connection states, numbered as nf_conntrack's `enum tcp_conntrack`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TcpState {
    /// No TCP state (the entry of a UDP, ICMP or generic flow).
    None = 0,
    /// A SYN was seen.
    SynSent = 1,
    /// The SYN/ACK was seen.
    SynRecv = 2,
    /// The handshake's ACK was seen.
    Established = 3,
    /// A FIN was seen.
    FinWait = 4,
    /// The FIN was acknowledged.
    CloseWait = 5,
    /// FINs were seen in both directions.
    LastAck = 6,
    /// The last ACK was seen.
    TimeWait = 7,
    /// Reset.
    Close = 8,
    /// A SYN came back from the reply direction: simultaneous open.
    SynSent2 = 9,
}

/// Marker in the transition table: the packet is INVALID in this state.
const S_IV: u8 = 10;
/// Marker in the transition table: the packet is accepted and leaves the state alone.
const S_IG: u8 = 11;

impl TcpState {
    /// Decodes a stored state; unknown values read as `None`.
    #[inline(always)]
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => TcpState::SynSent,
            2 => TcpState::SynRecv,
            3 => TcpState::Established,
            4 => TcpState::FinWait,
            5 => TcpState::CloseWait,
            6 => TcpState::LastAck,
            7 => TcpState::TimeWait,
            8 => TcpState::Close,
            9 => TcpState::SynSent2,
            _ => TcpState::None,
        }
    }

    /// The name `/proc/net/nf_conntrack` prints for this state.
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::SynSent2 => "SYN_SENT2",
        }
    }
}

/// The conntrack state of one packet, as iptables' `-m conntrack --ctstate` sees it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// Starts a connection, or belongs to one that has seen no reply yet.
    New = 0,
    /// Belongs to a connection that has seen a reply (or is the reply).
    Established = 1,
    /// An ICMP error about a tracked connection.
    Related = 2,
    /// Cannot be tracked: malformed, or impossible in the connection's state.
    Invalid = 3,
    /// Deliberately not tracked (IPv6 neighbour discovery and MLD, stateless endpoints).
    Untracked = 4,
}

/// TCP header flag bits (byte 13 of the header).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
    /// URG.
    pub const URG: u8 = 0x20;
}

/// Entry flag: the connection was opened towards the pod (its original direction is ingress).
pub const CT_F_ORIG_INGRESS: u8 = 1 << 0;
/// Entry flag: a packet in the reply direction was seen (`IPS_SEEN_REPLY`; no `[UNREPLIED]`).
pub const CT_F_SEEN_REPLY: u8 = 1 << 1;
/// Entry flag: `IPS_ASSURED`, printed as `[ASSURED]`.
pub const CT_F_ASSURED: u8 = 1 << 2;
/// Entry flag: a SYN came from both sides (`IP_CT_TCP_SIMULTANEOUS_OPEN`).
pub const CT_F_SIMOPEN: u8 = 1 << 3;
/// Entry flag: the connection was opened towards the pod by the node's own network stack (see
/// [`crate::policy::from_host`]), so that re-checking it after a policy change grants it the
/// same NetworkPolicies exemption its first packet had.
pub const CT_F_FROM_HOST: u8 = 1 << 4;

/// Key of the `CONNTRACK` map, ordered from the pod's side so both directions share it.
///
/// For ICMP request/reply flows `pod_port` is the identifier and `peer_port` packs the request
/// type with the direction the request travelled (bit 8), so that an echo the pod sends and an
/// echo it receives with the same identifier are two flows, as they are in nf_conntrack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    /// Host-side interface of the pod.
    pub ifindex: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Pod-side port (host order), or the ICMP identifier.
    pub pod_port: u16,
    /// Peer-side port (host order), or the ICMP request type and direction.
    pub peer_port: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
    /// The pod's address.
    pub pod_addr: RawAddr,
    /// The peer's address.
    pub peer_addr: RawAddr,
}

/// Value of the `CONNTRACK` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// The datapath clock (CLOCK_MONOTONIC) after which the entry is dead (absent, then swept).
    pub expires_ns: u64,
    /// When the first packet was seen (the UDP 2-second stream rule counts from it).
    pub created_ns: u64,
    /// The endpoint policy this connection was last judged under; when the endpoint's policy
    /// changes, the datapath re-checks the connection against the new rules on its next packet.
    pub policy_id: u32,
    /// [`TcpState`] for TCP, 0 otherwise.
    pub state: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

impl CtEntry {
    /// The direction of the packet that opened the connection.
    #[inline(always)]
    pub fn orig_direction(&self) -> Direction {
        if self.flags & CT_F_ORIG_INGRESS != 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }

    /// Whether the node's own stack opened the connection ([`CT_F_FROM_HOST`]).
    #[inline(always)]
    pub fn from_host(&self) -> bool {
        self.flags & CT_F_FROM_HOST != 0
    }

    /// Whether the entry has outlived its timeout at time `now`.
    #[inline(always)]
    pub fn expired(&self, now: u64) -> bool {
        self.expires_ns <= now
    }
}

impl CtKey {
    /// The key of the flow `pkt` belongs to, seen from the pod behind `ifindex`, for a packet
    /// travelling in `dir`.
    #[inline(always)]
    pub fn for_packet(ifindex: u32, dir: Direction, pkt: &Packet) -> Self {
        let (pod_addr, peer_addr, pod_port, mut peer_port) = if dir == Direction::Egress {
            (pkt.src, pkt.dst, pkt.sport, pkt.dport)
        } else {
            (pkt.dst, pkt.src, pkt.dport, pkt.sport)
        };
        let mut pod_port = pod_port;
        if is_icmp(pkt.family, pkt.proto) {
            pod_port = pkt.sport;
            peer_port = match icmp_kind(pkt.family, pkt.icmp_type) {
                IcmpKind::Reply(request) => request as u16 | ((dir.reverse() as u16) << 8),
                _ => pkt.icmp_type as u16 | ((dir as u16) << 8),
            };
        } else if pkt.proto != proto::TCP && pkt.proto != proto::UDP && pkt.proto != proto::SCTP {
            pod_port = 0;
            peer_port = 0;
        }
        CtKey {
            ifindex,
            family: pkt.family,
            proto: pkt.proto,
            pod_port,
            peer_port,
            _pad: 0,
            pod_addr,
            peer_addr,
        }
    }
}

impl Segment {
    /// The tracker's view of a parsed packet.
    #[inline(always)]
    pub fn of(pkt: &Packet) -> Self {
        Segment {
            family: pkt.family,
            proto: pkt.proto,
            tcp_flags: pkt.tcp_flags,
            icmp_type: pkt.icmp_type,
        }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for CtKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for CtEntry {}

/// What the tracker needs to know about a packet's layer 4 header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// `AF_INET` or `AF_INET6` (ICMP types differ between the two).
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    /// TCP flags byte, 0 for other protocols.
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type, 0 for other protocols.
    pub icmp_type: u8,
}

/// The role of an ICMP or ICMPv6 message in tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    /// A query that opens a flow; the value is the type of its reply.
    Request(u8),
    /// The reply to a query; the value is the type of the request.
    Reply(u8),
    /// An error that carries the header of the packet it is about (RELATED when that is tracked).
    Error,
    /// Never tracked: IPv6 neighbour discovery, router discovery, MLD (UNTRACKED, as the
    /// kernel's `noct_valid_new`).
    Untracked,
    /// Anything else: cannot open a flow and belongs to none (INVALID).
    Other,
}

/// Classifies an ICMP type as nf_conntrack_proto_icmp.c and nf_conntrack_proto_icmpv6.c do.
#[inline(always)]
pub fn icmp_kind(family: u8, icmp_type: u8) -> IcmpKind {
    if family == AF_INET6 {
        match icmp_type {
            1..=4 => IcmpKind::Error,
            128 => IcmpKind::Request(129),
            129 => IcmpKind::Reply(128),
            139 => IcmpKind::Request(140),
            140 => IcmpKind::Reply(139),
            130..=136 | 143 | 151 | 152 => IcmpKind::Untracked,
            _ => IcmpKind::Other,
        }
    } else {
        match icmp_type {
            3 | 4 | 5 | 11 | 12 => IcmpKind::Error,
            8 => IcmpKind::Request(0),
            0 => IcmpKind::Reply(8),
            13 => IcmpKind::Request(14),
            14 => IcmpKind::Reply(13),
            15 => IcmpKind::Request(16),
            16 => IcmpKind::Reply(15),
            17 => IcmpKind::Request(18),
            18 => IcmpKind::Reply(17),
            _ => IcmpKind::Other,
        }
    }
}

/// Whether `p` is ICMP for `family` (ICMP on IPv4, ICMPv6 on IPv6).
#[inline(always)]
pub fn is_icmp(family: u8, p: u8) -> bool {
    if family == AF_INET6 {
        p == proto::ICMPV6
    } else {
        p == proto::ICMP
    }
}

/// The flag combinations nf_conntrack accepts (`tcp_valid_flags`, PSH ignored); anything else is
/// INVALID before any lookup. Bit `f` of [`TCP_VALID_FLAGS`] says whether combination `f` of
/// FIN, SYN, RST, ACK and URG is valid: one shift on the per-packet path.
#[inline(always)]
pub fn tcp_flags_valid(flags: u8) -> bool {
    use tcp_flags::*;
    let f = flags & (FIN | SYN | RST | ACK | URG);
    (TCP_VALID_FLAGS >> f) & 1 != 0
}

/// `tcp_valid_flags` of nf_conntrack_proto_tcp.c as a bit set over the flags byte (PSH masked).
pub const TCP_VALID_FLAGS: u64 = {
    use tcp_flags::*;
    let valid = [
        SYN,
        SYN | URG,
        SYN | ACK,
        RST,
        RST | ACK,
        FIN | ACK,
        FIN | ACK | URG,
        ACK,
        ACK | URG,
    ];
    let mut set = 0u64;
    let mut i = 0;
    while i < valid.len() {
        set |= 1 << valid[i];
        i += 1;
    }
    set
};

/// Row of the transition table for a flags byte (`get_conntrack_index`).
#[inline(always)]
fn tcp_index(flags: u8) -> usize {
    use tcp_flags::*;
    if flags & RST != 0 {
        4
    } else if flags & SYN != 0 {
        if flags & ACK != 0 {
            1
        } else {
            0
        }
    } else if flags & FIN != 0 {
        2
    } else if flags & ACK != 0 {
        3
    } else {
        5
    }
}

const IDX_SYN: usize = 0;
const IDX_ACK: usize = 3;
const IDX_RST: usize = 4;

// Short names for the table, as in the kernel source.
const S_NO: u8 = TcpState::None as u8;
const S_SS: u8 = TcpState::SynSent as u8;
const S_SR: u8 = TcpState::SynRecv as u8;
const S_ES: u8 = TcpState::Established as u8;
const S_FW: u8 = TcpState::FinWait as u8;
const S_CW: u8 = TcpState::CloseWait as u8;
const S_LA: u8 = TcpState::LastAck as u8;
const S_TW: u8 = TcpState::TimeWait as u8;
const S_CL: u8 = TcpState::Close as u8;
const S_S2: u8 = TcpState::SynSent2 as u8;

/// nf_conntrack_proto_tcp.c's `tcp_conntracks[dir][index][state]`, verbatim in meaning:
/// direction (original, reply) × flags row (syn, synack, fin, ack, rst, none) × current state
/// (NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE,
/// SYN_SENT2).
#[rustfmt::skip]
static TCP_TRANSITIONS: [[[u8; 10]; 6]; 2] = [
    [
        /* syn    */ [S_SS, S_SS, S_IG, S_IG, S_IG, S_IG, S_IG, S_SS, S_SS, S_S2],
        /* synack */ [S_IV, S_IV, S_SR, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_SR],
        /* fin    */ [S_IV, S_IV, S_FW, S_FW, S_LA, S_LA, S_LA, S_TW, S_CL, S_IV],
        /* ack    */ [S_ES, S_IV, S_ES, S_ES, S_CW, S_CW, S_TW, S_TW, S_CL, S_IV],
        /* rst    */ [S_IV, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL],
        /* none   */ [S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV],
    ],
    [
        /* syn    */ [S_IV, S_S2, S_IV, S_IV, S_IV, S_IV, S_IV, S_SS, S_IV, S_S2],
        /* synack */ [S_IV, S_SR, S_IG, S_IG, S_IG, S_IG, S_IG, S_IG, S_IG, S_SR],
        /* fin    */ [S_IV, S_IV, S_FW, S_FW, S_LA, S_LA, S_LA, S_TW, S_CL, S_IV],
        /* ack    */ [S_IV, S_IG, S_SR, S_ES, S_CW, S_CW, S_TW, S_TW, S_CL, S_IG],
        /* rst    */ [S_IV, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL, S_CL],
        /* none   */ [S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV, S_IV],
    ],
];

#[inline(always)]
fn tcp_next(reply: bool, index: usize, state: u8) -> u8 {
    let dir = if reply { 1 } else { 0 };
    match TCP_TRANSITIONS
        .get(dir)
        .and_then(|rows| rows.get(index))
        .and_then(|row| row.get(state as usize))
    {
        Some(s) => *s,
        None => S_IV,
    }
}

/// What to do with an existing entry after one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The packet belongs to the connection with this ctstate; store the updated entry.
    Update(CtState),
    /// The packet is accepted with this ctstate and the entry must be deleted (a TCP RST before
    /// any reply: nf_conntrack kills such a connection at once).
    Delete(CtState),
    /// A SYN on a closed connection (TIME_WAIT or CLOSE) reopens it: forget the entry and treat
    /// the packet as the first of a new connection (nf_conntrack's `-NF_REPEAT`).
    Reopen,
    /// The packet is INVALID; the entry stays as it was.
    Invalid,
}

/// The ctstate a packet gets from an existing entry before it changes it: replies are
/// ESTABLISHED; packets in the original direction are NEW until a reply was seen.
#[inline(always)]
fn ctstate_of(entry: &CtEntry, reply: bool) -> CtState {
    if reply || entry.flags & CT_F_SEEN_REPLY != 0 {
        CtState::Established
    } else {
        CtState::New
    }
}

/// Starts tracking a flow at its first packet, travelling in `dir`. Returns `None` when the
/// packet cannot open a connection (a TCP segment that is not a SYN, an ICMP reply or error):
/// such a packet is INVALID.
#[inline(always)]
pub fn track_new(seg: &Segment, dir: Direction, now: u64, cfg: &Config) -> Option<CtEntry> {
    let flags = if dir == Direction::Ingress {
        CT_F_ORIG_INGRESS
    } else {
        0
    };
    let (state, t) = if seg.proto == proto::TCP {
        if !tcp_flags_valid(seg.tcp_flags) || tcp_index(seg.tcp_flags) != IDX_SYN {
            // nf_conntrack_tcp_loose=0: only a SYN opens a connection.
            return None;
        }
        (S_SS, cfg.timeout(S_SS as usize))
    } else if seg.proto == proto::UDP {
        (S_NO, cfg.timeout(timeout::UDP_UNREPLIED))
    } else if is_icmp(seg.family, seg.proto) {
        match icmp_kind(seg.family, seg.icmp_type) {
            IcmpKind::Request(_) => (S_NO, cfg.timeout(timeout::ICMP)),
            _ => return None,
        }
    } else {
        (S_NO, cfg.timeout(timeout::GENERIC))
    };
    Some(CtEntry {
        expires_ns: now.saturating_add(t),
        created_ns: now,
        policy_id: 0,
        state,
        flags,
        _pad: [0; 2],
    })
}

/// Moves `entry` on a packet travelling in `dir`. The entry is changed in place only for
/// [`Step::Update`]; callers that may still refuse the packet (policy) work on a copy.
#[inline(always)]
pub fn track_packet(
    entry: &mut CtEntry,
    seg: &Segment,
    dir: Direction,
    now: u64,
    cfg: &Config,
) -> Step {
    let reply = dir != entry.orig_direction();
    let ctstate = ctstate_of(entry, reply);
    if seg.proto == proto::TCP {
        return track_tcp(entry, seg.tcp_flags, reply, ctstate, now, cfg);
    }
    let seen_reply = entry.flags & CT_F_SEEN_REPLY != 0;
    let t = if seg.proto == proto::UDP {
        // nf_conntrack_proto_udp.c: after a reply, the entry keeps the unreplied timeout and turns
        // into an assured stream only when traffic still flows 2 s after the first packet.
        if seen_reply && now > entry.created_ns.saturating_add(cfg.udp_stream_after_ns) {
            entry.flags |= CT_F_ASSURED;
            cfg.timeout(timeout::UDP_REPLIED)
        } else {
            cfg.timeout(timeout::UDP_UNREPLIED)
        }
    } else if is_icmp(seg.family, seg.proto) {
        cfg.timeout(timeout::ICMP)
    } else {
        cfg.timeout(timeout::GENERIC)
    };
    entry.expires_ns = now.saturating_add(t);
    if reply {
        entry.flags |= CT_F_SEEN_REPLY;
    }
    Step::Update(ctstate)
}

#[inline(always)]
fn track_tcp(
    entry: &mut CtEntry,
    flags: u8,
    reply: bool,
    ctstate: CtState,
    now: u64,
    cfg: &Config,
) -> Step {
    if !tcp_flags_valid(flags) {
        return Step::Invalid;
    }
    let index = tcp_index(flags);
    let old = entry.state;
    let mut new = tcp_next(reply, index, old);
    if new == S_IV {
        return Step::Invalid;
    }
    if new == S_IG {
        // Accepted, state and timeout untouched (possibly a retransmission the peers will sort
        // out with a RST or a SYN/ACK).
        if reply {
            entry.flags |= CT_F_SEEN_REPLY;
        }
        return Step::Update(ctstate);
    }
    if new == S_SS && old >= S_TW {
        // RFC 1122: a SYN may reopen a connection from TIME_WAIT (and CLOSE).
        return Step::Reopen;
    }
    if new == S_S2 {
        entry.flags |= CT_F_SIMOPEN;
    }
    if new == S_SR && reply && index == IDX_ACK && entry.flags & CT_F_SIMOPEN != 0 {
        new = S_ES;
    }
    entry.state = new;
    let seen_reply = entry.flags & CT_F_SEEN_REPLY != 0;
    if !seen_reply {
        if flags & tcp_flags::RST != 0 {
            // "If only reply is a RST, we can consider ourselves not to have an established
            // connection": the kernel deletes the entry at once.
            return Step::Delete(ctstate);
        }
        if index == IDX_SYN && old == S_SS {
            // A SYN retransmit (or the peer's SYN of a simultaneous open) does not renew the
            // timeout.
            if reply {
                entry.flags |= CT_F_SEEN_REPLY;
            }
            return Step::Update(ctstate);
        }
    } else if entry.flags & CT_F_ASSURED == 0 && (old == S_SR || old == S_ES) && new == S_ES {
        entry.flags |= CT_F_ASSURED;
    }
    let t = if index == IDX_RST {
        cfg.timeout(S_CL as usize)
    } else {
        cfg.timeout(new as usize)
    };
    entry.expires_ns = now.saturating_add(t);
    if reply {
        entry.flags |= CT_F_SEEN_REPLY;
    }
    Step::Update(ctstate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AF_INET;
    use tcp_flags::*;

    const NOW: u64 = 1_000_000_000_000;

    fn tcp(flags: u8) -> Segment {
        Segment {
            family: AF_INET,
            proto: proto::TCP,
            tcp_flags: flags,
            icmp_type: 0,
        }
    }

    fn udp() -> Segment {
        Segment {
            family: AF_INET,
            proto: proto::UDP,
            ..Segment::default()
        }
    }

    fn cfg() -> Config {
        Config::defaults()
    }

    /// Runs a packet through an entry; `out` means the pod sends it.
    fn step(e: &mut CtEntry, flags: u8, out: bool) -> Step {
        let dir = if out {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        track_packet(e, &tcp(flags), dir, NOW, &cfg())
    }

    #[test]
    fn only_a_syn_opens_a_tcp_connection() {
        let c = cfg();
        assert!(track_new(&tcp(SYN), Direction::Egress, NOW, &c).is_some());
        for f in [ACK, SYN | ACK, FIN | ACK, RST, RST | ACK, 0, PSH | ACK] {
            assert!(
                track_new(&tcp(f), Direction::Egress, NOW, &c).is_none(),
                "flags {f:#x}"
            );
        }
    }

    #[test]
    fn three_way_handshake_and_close_walk_the_kernel_states() {
        let c = cfg();
        let mut e = track_new(&tcp(SYN), Direction::Egress, NOW, &c).unwrap();
        assert_eq!(e.state, TcpState::SynSent as u8);
        assert_eq!(e.expires_ns, NOW + 120_000_000_000);
        assert_eq!(
            step(&mut e, SYN | ACK, false),
            Step::Update(CtState::Established)
        );
        assert_eq!(e.state, TcpState::SynRecv as u8);
        assert_ne!(e.flags & CT_F_SEEN_REPLY, 0);
        assert_eq!(e.flags & CT_F_ASSURED, 0);
        assert_eq!(step(&mut e, ACK, true), Step::Update(CtState::Established));
        assert_eq!(e.state, TcpState::Established as u8);
        assert_ne!(e.flags & CT_F_ASSURED, 0);
        assert_eq!(e.expires_ns, NOW + 432_000_000_000_000);
        assert_eq!(
            step(&mut e, FIN | ACK, true),
            Step::Update(CtState::Established)
        );
        assert_eq!(e.state, TcpState::FinWait as u8);
        assert_eq!(step(&mut e, ACK, false), Step::Update(CtState::Established));
        assert_eq!(e.state, TcpState::CloseWait as u8);
        assert_eq!(
            step(&mut e, FIN | ACK, false),
            Step::Update(CtState::Established)
        );
        assert_eq!(e.state, TcpState::LastAck as u8);
        assert_eq!(step(&mut e, ACK, true), Step::Update(CtState::Established));
        assert_eq!(e.state, TcpState::TimeWait as u8);
        assert_eq!(e.expires_ns, NOW + 120_000_000_000);
    }

    #[test]
    fn syn_retransmit_is_new_and_keeps_the_timeout() {
        let c = cfg();
        let mut e = track_new(&tcp(SYN), Direction::Egress, 5, &c).unwrap();
        let before = e.expires_ns;
        assert_eq!(step(&mut e, SYN, true), Step::Update(CtState::New));
        assert_eq!(e.state, TcpState::SynSent as u8);
        assert_eq!(e.expires_ns, before);
    }

    #[test]
    fn ack_before_synack_is_invalid() {
        let mut e = track_new(&tcp(SYN), Direction::Egress, NOW, &cfg()).unwrap();
        assert_eq!(step(&mut e, ACK, true), Step::Invalid);
        assert_eq!(e.state, TcpState::SynSent as u8);
    }

    #[test]
    fn rst_as_only_reply_deletes_the_entry() {
        let mut e = track_new(&tcp(SYN), Direction::Egress, NOW, &cfg()).unwrap();
        assert_eq!(
            step(&mut e, RST | ACK, false),
            Step::Delete(CtState::Established)
        );
    }

    #[test]
    fn rst_on_established_connection_moves_to_close_with_close_timeout() {
        let mut e = track_new(&tcp(SYN), Direction::Egress, NOW, &cfg()).unwrap();
        step(&mut e, SYN | ACK, false);
        step(&mut e, ACK, true);
        assert_eq!(step(&mut e, RST, false), Step::Update(CtState::Established));
        assert_eq!(e.state, TcpState::Close as u8);
        assert_eq!(e.expires_ns, NOW + 10_000_000_000);
    }

    #[test]
    fn simultaneous_open_reaches_established() {
        let mut e = track_new(&tcp(SYN), Direction::Egress, NOW, &cfg()).unwrap();
        assert_eq!(step(&mut e, SYN, false), Step::Update(CtState::Established));
        assert_eq!(e.state, TcpState::SynSent2 as u8);
        assert_eq!(
            step(&mut e, SYN | ACK, true),
            Step::Update(CtState::Established)
        );
        assert_eq!(e.state, TcpState::SynRecv as u8);
        assert_eq!(step(&mut e, ACK, false), Step::Update(CtState::Established));
        assert_eq!(e.state, TcpState::Established as u8);
    }

    #[test]
    fn syn_in_time_wait_reopens() {
        let mut e = track_new(&tcp(SYN), Direction::Egress, NOW, &cfg()).unwrap();
        e.state = TcpState::TimeWait as u8;
        e.flags |= CT_F_SEEN_REPLY;
        assert_eq!(step(&mut e, SYN, true), Step::Reopen);
    }

    #[test]
    fn late_synack_is_ignored_without_touching_state() {
        let mut e = track_new(&tcp(SYN), Direction::Egress, NOW, &cfg()).unwrap();
        step(&mut e, SYN | ACK, false);
        step(&mut e, ACK, true);
        let before = e;
        assert_eq!(
            step(&mut e, SYN | ACK, false),
            Step::Update(CtState::Established)
        );
        assert_eq!(e, before);
    }

    #[test]
    fn invalid_flag_combinations_are_invalid_even_on_a_connection() {
        let mut e = track_new(&tcp(SYN), Direction::Egress, NOW, &cfg()).unwrap();
        step(&mut e, SYN | ACK, false);
        assert_eq!(step(&mut e, SYN | FIN, true), Step::Invalid);
        assert_eq!(step(&mut e, SYN | RST, true), Step::Invalid);
        assert_eq!(step(&mut e, 0, true), Step::Invalid);
    }

    #[test]
    fn udp_keeps_short_timeout_after_reply_and_assures_after_two_seconds() {
        let c = cfg();
        let s = udp();
        let mut e = track_new(&s, Direction::Egress, NOW, &c).unwrap();
        assert_eq!(e.expires_ns, NOW + 30_000_000_000);
        let r = track_packet(&mut e, &s, Direction::Egress, NOW + 1, &c);
        assert_eq!(r, Step::Update(CtState::New));
        let r = track_packet(&mut e, &s, Direction::Ingress, NOW + 2, &c);
        assert_eq!(r, Step::Update(CtState::Established));
        assert_ne!(e.flags & CT_F_SEEN_REPLY, 0);
        assert_eq!(e.flags & CT_F_ASSURED, 0);
        assert_eq!(e.expires_ns, NOW + 2 + 30_000_000_000);
        // Within 2 s of the first packet: still 30 s, not assured.
        track_packet(&mut e, &s, Direction::Egress, NOW + 1_000_000_000, &c);
        assert_eq!(e.flags & CT_F_ASSURED, 0);
        let later = NOW + 2_500_000_000;
        track_packet(&mut e, &s, Direction::Egress, later, &c);
        assert_ne!(e.flags & CT_F_ASSURED, 0);
        assert_eq!(e.expires_ns, later + 120_000_000_000);
    }

    #[test]
    fn icmp_kinds_follow_the_kernel_tables() {
        assert_eq!(icmp_kind(AF_INET, 8), IcmpKind::Request(0));
        assert_eq!(icmp_kind(AF_INET, 0), IcmpKind::Reply(8));
        assert_eq!(icmp_kind(AF_INET, 3), IcmpKind::Error);
        assert_eq!(icmp_kind(AF_INET, 9), IcmpKind::Other);
        assert_eq!(icmp_kind(AF_INET6, 128), IcmpKind::Request(129));
        assert_eq!(icmp_kind(AF_INET6, 1), IcmpKind::Error);
        assert_eq!(icmp_kind(AF_INET6, 135), IcmpKind::Untracked);
        // nf_conntrack_proto_icmpv6.c, noct_valid_new: ND, MLD and multicast router discovery
        // (151 advertisement, 152 solicitation) are never tracked.
        for t in [130, 131, 132, 133, 134, 135, 136, 143, 151, 152] {
            assert_eq!(icmp_kind(AF_INET6, t), IcmpKind::Untracked, "type {t}");
        }
        assert_eq!(icmp_kind(AF_INET6, 153), IcmpKind::Other);
        assert_eq!(icmp_kind(AF_INET6, 137), IcmpKind::Other);
    }

    #[test]
    fn icmp_reply_cannot_open_a_flow() {
        let c = cfg();
        let mut s = Segment {
            family: AF_INET,
            proto: proto::ICMP,
            tcp_flags: 0,
            icmp_type: 0,
        };
        assert!(track_new(&s, Direction::Ingress, NOW, &c).is_none());
        s.icmp_type = 8;
        let e = track_new(&s, Direction::Ingress, NOW, &c).unwrap();
        assert_eq!(e.orig_direction(), Direction::Ingress);
        assert_eq!(e.expires_ns, NOW + 30_000_000_000);
    }
}
