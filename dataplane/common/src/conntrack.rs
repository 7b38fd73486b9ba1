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
    parse::{Packet, TcpFields, TCP_OPT_SACK_PERM, TCP_OPT_WSCALE},
    proto,
    window::{
        in_window, take_options, InWindow, TcpLast, TcpSide, LAST_EXP_CHALLENGE_ACK,
        SIDE_CLOSE_INIT, SIDE_DATA_UNACKNOWLEDGED, SIDE_MAXACK_SET, SIDE_SACK_PERM,
        SIDE_WINDOW_SCALE,
    },
    Direction, RawAddr, AF_INET6,
};

/// After this many retransmissions of one segment a connection gets the `max_retrans` timeout
/// (`nf_conntrack_tcp_max_retrans`).
pub const TCP_MAX_RETRANS: u8 = 3;

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
    /// TCP window tracking, by conntrack direction (0: original, 1: reply); zero otherwise.
    pub seen: [TcpSide; 2],
    /// TCP: the last segment of note and the retransmission count; zero otherwise.
    pub last: TcpLast,
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

/// The `CONNTRACK` value of the builds before TCP window tracking (24 bytes). An agent of this
/// build finds such a table pinned after an upgrade and carries its entries over
/// ([`CtEntry::migrated`]), so that an upgrade does not cut the connections it tracked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntryV1 {
    /// As [`CtEntry::expires_ns`].
    pub expires_ns: u64,
    /// As [`CtEntry::created_ns`].
    pub created_ns: u64,
    /// As [`CtEntry::policy_id`].
    pub policy_id: u32,
    /// As [`CtEntry::state`].
    pub state: u8,
    /// As [`CtEntry::flags`].
    pub flags: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

impl CtEntry {
    /// The entry for a connection of protocol `proto` that a table without window data tracked.
    /// A TCP connection's sequence space is unknown, so both sides are marked liberal with SACK
    /// allowed, as nf_conntrack marks a connection it picks up in the middle: the window is then
    /// learnt from the next segments and never used to refuse one of this connection's packets.
    pub fn migrated(old: CtEntryV1, proto: u8) -> Self {
        let side = TcpSide {
            flags: if proto == proto::TCP {
                crate::window::SIDE_BE_LIBERAL | SIDE_SACK_PERM
            } else {
                0
            },
            ..TcpSide::default()
        };
        CtEntry {
            expires_ns: old.expires_ns,
            created_ns: old.created_ns,
            policy_id: old.policy_id,
            state: old.state,
            flags: old.flags,
            _pad: [0; 2],
            seen: [side; 2],
            last: TcpLast::default(),
        }
    }
}

impl CtEntry {
    /// This entry with its TCP windows to be learnt again from the next segment of each side,
    /// as nf_conntrack picks up a connection in the middle: for an entry copied from another
    /// table while the connection kept running. Its window data is then stale by however much
    /// the connection moved meanwhile (a bulk transfer, megabytes in the milliseconds an
    /// upgrade takes), and its next segments would be refused as beyond the window. What the
    /// handshake settled is kept: window scale, SACK permitted, which side closed first. Both
    /// sides are liberal for good, as the kernel makes a connection it picks up: what a side
    /// sends first may be a retransmission of old data while the other acknowledges newer
    /// data, which learnt strictly reads as acknowledging data never sent, refuses, and so
    /// cuts the connection.
    pub fn relearning_windows(self, proto: u8) -> Self {
        if proto != proto::TCP {
            return self;
        }
        let keep = crate::window::SIDE_WINDOW_SCALE | SIDE_SACK_PERM | SIDE_CLOSE_INIT;
        let relearn = crate::window::SIDE_BE_LIBERAL;
        CtEntry {
            seen: self.seen.map(|side| TcpSide {
                td_scale: side.td_scale,
                flags: side.flags & keep | relearn,
                ..TcpSide::default()
            }),
            ..self
        }
    }
}

/// Whether an endpoint holding `held` conntrack entries may open one more under `limit`
/// ([`Config::ct_endpoint_limit`], 0 for none). `held` is the endpoint's `CT_COUNTS` slot, a
/// wrapping count that every CPU and the agent add to and subtract from: read as signed, so that
/// a transient dip below zero never reads as a full table.
#[inline(always)]
pub fn room_for_one_more(held: u64, limit: u64) -> bool {
    limit == 0 || (held as i64) < limit as i64
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
            tcp: pkt.tcp,
        }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for CtKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for CtEntry {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for CtEntryV1 {}

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
    /// TCP: sequence space and options, for window tracking.
    pub tcp: TcpFields,
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
/// [`TcpLast::index`](crate::window::TcpLast) of a SYN/ACK: what tests read back to see that an
/// ignored SYN/ACK was recorded for a later resync.
pub const IDX_SYNACK: usize = 1;
const IDX_FIN: usize = 2;
const IDX_ACK: usize = 3;
const IDX_RST: usize = 4;
#[cfg(test)]
const IDX_NONE: usize = 5;

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
    /// The packet is INVALID and the entry changed: an out-of-window FIN or RST of an assured
    /// connection was noted, or answered one from the other side and shortened the timeout
    /// (`nf_tcp_handle_invalid`). A caller tracking on a copy must store it; the eBPF programs
    /// track on the map value itself.
    InvalidNoted,
}

impl Step {
    /// The step as one number, for the eBPF programs' tracking function, which the verifier
    /// checks on its own and whose caller sees only a scalar.
    #[inline(always)]
    pub fn code(self) -> u32 {
        match self {
            Step::Update(s) => 0x10 | s as u32,
            Step::Delete(s) => 0x20 | s as u32,
            Step::Reopen => 1,
            Step::Invalid => 2,
            Step::InvalidNoted => 3,
        }
    }

    /// The step [`Step::code`] gave; anything else reads as [`Step::Invalid`].
    #[inline(always)]
    pub fn from_code(code: u32) -> Step {
        let state = match code & 0x0f {
            0 => CtState::New,
            1 => CtState::Established,
            2 => CtState::Related,
            4 => CtState::Untracked,
            _ => CtState::Invalid,
        };
        match code {
            0x10..=0x1f if state != CtState::Invalid => Step::Update(state),
            0x20..=0x2f if state != CtState::Invalid => Step::Delete(state),
            1 => Step::Reopen,
            3 => Step::InvalidNoted,
            _ => Step::Invalid,
        }
    }
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
    let mut entry = CtEntry::default();
    start_tracking(&mut entry, seg, dir, now, cfg).then_some(entry)
}

/// [`track_new`] into `entry` (overwritten whatever it held), for callers that keep the entry off
/// their stack (the eBPF programs, whose stack is 512 bytes). Returns false when the packet
/// cannot open a connection.
#[inline(always)]
pub fn start_tracking(
    entry: &mut CtEntry,
    seg: &Segment,
    dir: Direction,
    now: u64,
    cfg: &Config,
) -> bool {
    crate::words::zero::<_, u64>(entry);
    if dir == Direction::Ingress {
        entry.flags = CT_F_ORIG_INGRESS;
    }
    let (state, t) = if seg.proto == proto::TCP {
        if !tcp_flags_valid(seg.tcp_flags) || tcp_index(seg.tcp_flags) != IDX_SYN {
            // nf_conntrack_tcp_loose=0: only a SYN opens a connection.
            return false;
        }
        // The SYN's sender starts the original direction's sequence space (`tcp_new`). What the
        // state machine then does with this first SYN comes down to these assignments (written
        // out: one copy of the window code in the eBPF programs, not two, keeps them within the
        // verifier's budget); `the_first_syn_is_what_the_state_machine_makes_of_it` checks it.
        let side = &mut entry.seen[0];
        side.td_end = seg.tcp.end;
        side.td_maxend = seg.tcp.end;
        side.td_maxwin = if seg.tcp.win == 0 {
            1
        } else {
            seg.tcp.win as u32
        };
        take_options(side, &seg.tcp);
        entry.seen[1].td_maxend = if seg.tcp.win == 0 {
            1
        } else {
            seg.tcp.win as u32
        };
        entry.last.index = IDX_SYN as u8;
        (S_SS, cfg.timeout(S_SS as usize))
    } else if seg.proto == proto::UDP {
        (S_NO, cfg.timeout(timeout::UDP_UNREPLIED))
    } else if is_icmp(seg.family, seg.proto) {
        match icmp_kind(seg.family, seg.icmp_type) {
            IcmpKind::Request(_) => (S_NO, cfg.timeout(timeout::ICMP)),
            _ => return false,
        }
    } else {
        (S_NO, cfg.timeout(timeout::GENERIC))
    };
    entry.expires_ns = now.saturating_add(t);
    entry.created_ns = now;
    entry.state = state;
    true
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
        return track_tcp(entry, seg, reply, ctstate, now, cfg);
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

/// Whether a connection in `state` is closing, so that a RST needs no window check: the tuple may
/// already be reused (`tcp_can_early_drop`).
#[inline(always)]
fn closing(state: u8) -> bool {
    state == S_FW || state == S_CW || state == S_LA || state == S_TW || state == S_CL
}

/// nf_conntrack_proto_tcp.c's `nf_conntrack_tcp_packet` for a packet of a tracked connection:
/// the state table, then the exceptions the table cannot express (resynchronisation after an
/// ignored SYN, challenge ACKs, RST checks), then the window, then the timeout.
#[inline(always)]
fn track_tcp(
    entry: &mut CtEntry,
    seg: &Segment,
    reply: bool,
    ctstate: CtState,
    now: u64,
    cfg: &Config,
) -> Step {
    let flags = seg.tcp_flags;
    if !tcp_flags_valid(flags) {
        return Step::Invalid;
    }
    let index = tcp_index(flags);
    let dir = reply as u8;
    let tcp = &seg.tcp;
    let mut old = entry.state;
    let mut new = tcp_next(reply, index, old);
    let mut check_window = true;

    if new == S_SS && old >= S_TW {
        // RFC 1122: a SYN may reopen a connection that was closed (FINs) or reset by this side.
        let closed = (entry.seen[0].flags | entry.seen[1].flags) & SIDE_CLOSE_INIT != 0
            || (entry.last.dir == dir && entry.last.index == IDX_RST as u8);
        if closed {
            return Step::Reopen;
        }
        new = S_IG;
    }
    if new == S_IG {
        if index == IDX_SYNACK
            && entry.last.index == IDX_SYN as u8
            && entry.last.dir != dir
            && tcp.ack == entry.last.end
        {
            // This SYN/ACK answers a SYN the table ignored: both ends are in sync and the table
            // is not. Take the connection up from that SYN.
            old = S_SS;
            new = S_SR;
            let l_dir = entry.last.dir & 1;
            let l_end = entry.last.end;
            let l_win = entry.last.win;
            let l_wscale = entry.last.wscale;
            entry.last.flags &= !LAST_EXP_CHALLENGE_ACK;
            let l_flags = entry.last.flags;
            let syn_side = &mut entry.seen[l_dir as usize];
            syn_side.td_end = l_end;
            syn_side.td_maxend = l_end;
            syn_side.td_maxwin = if l_win == 0 { 1 } else { l_win as u32 };
            syn_side.td_scale = l_wscale;
            syn_side.flags = l_flags;
            let this = &mut entry.seen[dir as usize];
            let liberal = this.flags & crate::window::SIDE_BE_LIBERAL;
            // Word by word, as `crate::words` explains.
            crate::words::zero::<_, u32>(this);
            this.flags = liberal;
        } else {
            // Let it through without touching the state (possibly the start of a new connection
            // on the same ports, which the peers will sort out), and remember it.
            entry.last.index = index as u8;
            entry.last.dir = dir;
            entry.last.seq = tcp.seq;
            entry.last.end = tcp.end;
            entry.last.win = tcp.win;
            if index == IDX_SYN && !reply {
                entry.last.flags = 0;
                entry.last.wscale = 0;
                if tcp.opts & TCP_OPT_WSCALE != 0 {
                    entry.last.flags |= SIDE_WINDOW_SCALE;
                    entry.last.wscale = tcp.wscale;
                }
                if tcp.opts & TCP_OPT_SACK_PERM != 0 {
                    entry.last.flags |= SIDE_SACK_PERM;
                }
                if old == S_LA {
                    entry.last.flags |= LAST_EXP_CHALLENGE_ACK;
                }
            }
            if old == S_SS && index == IDX_ACK && reply {
                // Possibly a challenge ACK answering the SYN.
                entry.last.ack = tcp.ack;
            }
            if reply {
                entry.flags |= CT_F_SEEN_REPLY;
            }
            return Step::Update(ctstate);
        }
    } else if new == S_IV {
        return Step::Invalid;
    } else if new == S_TW
        && old == S_LA
        && index == IDX_ACK
        && entry.last.dir != dir
        && entry.last.index == IDX_SYN as u8
        && entry.last.flags & LAST_EXP_CHALLENGE_ACK != 0
    {
        // RFC 5961: the ACK a stack sends to a SYN in LAST_ACK does not acknowledge the last FIN.
        entry.last.flags &= !LAST_EXP_CHALLENGE_ACK;
        if reply {
            entry.flags |= CT_F_SEEN_REPLY;
        }
        return Step::Update(ctstate);
    } else if new == S_S2 {
        entry.flags |= CT_F_SIMOPEN;
    } else if new == S_SR {
        if reply && index == IDX_ACK && entry.flags & CT_F_SIMOPEN != 0 {
            new = S_ES;
        }
    } else if new == S_CL && index == IDX_RST {
        if closing(entry.state) {
            check_window = false;
        } else {
            match rst_check(entry, tcp, old, dir) {
                RstCheck::Invalid => return Step::Invalid,
                RstCheck::Window => {}
                RstCheck::KeepState => new = old,
                RstCheck::NoWindow => check_window = false,
                RstCheck::KeepStateNoWindow => {
                    new = old;
                    check_window = false;
                }
            }
        }
    }

    if check_window {
        match in_window(
            &mut entry.seen,
            &mut entry.last,
            entry.state,
            reply,
            flags,
            index == IDX_ACK,
            tcp,
        ) {
            InWindow::Accept => {}
            InWindow::Ignore => {
                if reply {
                    entry.flags |= CT_F_SEEN_REPLY;
                }
                return Step::Update(ctstate);
            }
            InWindow::Invalid => return note_invalid(entry, index, dir, now, cfg),
        }
    }

    entry.last.index = index as u8;
    entry.last.dir = dir;
    entry.state = new;
    if old != new && new == S_FW {
        entry.seen[dir as usize].flags |= SIDE_CLOSE_INIT;
    }
    let t_new = tcp_timeout(cfg, new);
    let t_retrans = cfg.timeout(timeout::TCP_RETRANS);
    let t_unack = cfg.timeout(timeout::TCP_UNACK);
    let mut t = if entry.last.retrans >= TCP_MAX_RETRANS && t_new > t_retrans {
        t_retrans
    } else if index == IDX_RST {
        cfg.timeout(S_CL as usize)
    } else if (entry.seen[0].flags | entry.seen[1].flags) & SIDE_DATA_UNACKNOWLEDGED != 0
        && t_new > t_unack
    {
        t_unack
    } else if entry.last.win == 0 && t_new > t_retrans {
        t_retrans
    } else {
        t_new
    };
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
        if new == S_ES && t > t_unack {
            // ESTABLISHED without a reply seen (a migrated connection): not for 5 days.
            t = t_unack;
        }
    } else if entry.flags & CT_F_ASSURED == 0 && (old == S_SR || old == S_ES) && new == S_ES {
        entry.flags |= CT_F_ASSURED;
    }
    entry.expires_ns = now.saturating_add(t);
    if entry.created_ns == 0 {
        entry.created_ns = now;
    }
    if reply {
        entry.flags |= CT_F_SEEN_REPLY;
    }
    Step::Update(ctstate)
}

/// The timeout of TCP state `state`. Each arm reads a constant slot: in the eBPF programs a slot
/// computed from the state would make the verifier tell every state apart through all the code
/// that follows (the state would become a precise value), past its instruction budget.
#[inline(always)]
fn tcp_timeout(cfg: &Config, state: u8) -> u64 {
    let t = &cfg.timeouts_ns;
    match state {
        S_SS => t[S_SS as usize],
        S_SR => t[S_SR as usize],
        S_ES => t[S_ES as usize],
        S_FW => t[S_FW as usize],
        S_CW => t[S_CW as usize],
        S_LA => t[S_LA as usize],
        S_TW => t[S_TW as usize],
        S_CL => t[S_CL as usize],
        S_S2 => t[S_S2 as usize],
        _ => t[timeout::GENERIC],
    }
}

/// What the RST rules say before the window check (`TCP_CONNTRACK_CLOSE` in
/// `nf_conntrack_tcp_packet`).
enum RstCheck {
    /// Below what the receiver acknowledged: INVALID.
    Invalid,
    /// On to the window check, then CLOSE.
    Window,
    /// In window but not exactly where the receiver expects it: keep the state (the receiver
    /// answers with a challenge ACK, RFC 5961), after the window check.
    KeepState,
    /// Answers a segment the table let through unchecked: no window check, CLOSE.
    NoWindow,
    /// As [`RstCheck::NoWindow`], the state kept.
    KeepStateNoWindow,
}

#[inline(always)]
fn rst_check(entry: &CtEntry, tcp: &TcpFields, old: u8, dir: u8) -> RstCheck {
    let receiver = &entry.seen[(1 - dir) as usize];
    let last = &entry.last;
    let mut keep = false;
    if receiver.flags & SIDE_MAXACK_SET != 0 && last.index != IDX_SYN as u8 {
        let established = old == S_ES && entry.flags & CT_F_ASSURED != 0;
        let seq = tcp.seq;
        if seq == 0 && !established {
            // Most likely the answer to a SYN let through.
            return RstCheck::Window;
        }
        if crate::window::seq_before(seq, receiver.td_maxack) {
            return RstCheck::Invalid;
        }
        if !established || seq == receiver.td_maxack {
            return RstCheck::Window;
        }
        if last.index == IDX_ACK as u8 && last.dir == dir && seq == last.end {
            // The RST ends a train of this side's segments.
            return RstCheck::Window;
        }
        keep = true;
    }
    let seen_reply = entry.flags & CT_F_SEEN_REPLY != 0;
    let assured = entry.flags & CT_F_ASSURED != 0;
    if ((seen_reply && last.index == IDX_SYN as u8) || (!assured && last.index == IDX_ACK as u8))
        && tcp.ack == last.end
    {
        // Answers a SYN or ACK the table let through: it may acknowledge what was ignored.
        return if keep {
            RstCheck::KeepStateNoWindow
        } else {
            RstCheck::NoWindow
        };
    }
    if old == S_SS && last.index == IDX_ACK as u8 && last.dir == 1 && tcp.seq == last.ack {
        // Answers a challenge ACK let through earlier.
        return if keep {
            RstCheck::KeepStateNoWindow
        } else {
            RstCheck::NoWindow
        };
    }
    if keep {
        RstCheck::KeepState
    } else {
        RstCheck::Window
    }
}

/// An out-of-window FIN or RST of an assured connection (`nf_tcp_handle_invalid`): the first is
/// noted; one from the other side answering it shortens the timeout to `unacknowledged`, so a
/// connection whose ends and table disagree is not kept for days.
#[inline(always)]
fn note_invalid(entry: &mut CtEntry, index: usize, dir: u8, now: u64, cfg: &Config) -> Step {
    if entry.flags & CT_F_ASSURED == 0 || (index != IDX_RST && index != IDX_FIN) {
        return Step::Invalid;
    }
    let (last_dir, last_index) = (entry.last.dir, entry.last.index);
    if last_dir != dir && (last_index == IDX_FIN as u8 || last_index == IDX_RST as u8) {
        let left = entry.expires_ns.saturating_sub(now);
        let unack = cfg.timeout(timeout::TCP_UNACK);
        if left < 120_000_000_000 || left <= unack {
            return Step::Invalid;
        }
        entry.expires_ns = now.saturating_add(unack);
    } else {
        entry.last.index = index as u8;
        entry.last.dir = dir;
    }
    Step::InvalidNoted
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_endpoint_is_refused_at_its_limit_and_never_by_a_count_below_zero() {
        assert!(room_for_one_more(0, 2));
        assert!(room_for_one_more(1, 2));
        assert!(!room_for_one_more(2, 2));
        assert!(!room_for_one_more(3, 2));
        assert!(room_for_one_more(u64::MAX, 2), "-1 is below any limit");
        assert!(room_for_one_more(u64::MAX / 2, 0), "0 is no limit");
    }

    use super::*;
    use crate::{parse, AF_INET};
    use tcp_flags::*;

    const NOW: u64 = 1_000_000_000_000;

    fn tcp(flags: u8) -> Segment {
        Segment {
            family: AF_INET,
            proto: proto::TCP,
            tcp_flags: flags,
            ..Segment::default()
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

    const SEC: u64 = 1_000_000_000;

    /// A TCP conversation with real sequence numbers: the pod is the client (its segments are
    /// egress), each side's next sequence number and window kept as a real stack would.
    struct Talk {
        entry: CtEntry,
        /// Next sequence number of the pod, and of the peer.
        pod: u32,
        peer: u32,
        win: u16,
    }

    fn seg(flags: u8, seq: u32, ack: u32, len: u32, win: u16) -> Segment {
        let mut s = tcp(flags);
        s.tcp = TcpFields {
            seq,
            ack,
            sack: ack,
            end: seq
                .wrapping_add(len)
                .wrapping_add((flags & SYN != 0) as u32)
                .wrapping_add((flags & FIN != 0) as u32),
            win,
            ..TcpFields::default()
        };
        s
    }

    impl Talk {
        /// After the pod's SYN.
        fn syn() -> Talk {
            let (pod, peer) = (1_000_000, 3_000_000_000);
            let first = seg(SYN, pod, 0, 0, 64_000);
            let entry = track_new(&first, Direction::Egress, NOW, &cfg()).expect("a SYN opens");
            Talk {
                entry,
                pod: first.tcp.end,
                peer,
                win: 64_000,
            }
        }

        /// After the three-way handshake.
        fn established() -> Talk {
            let mut t = Talk::syn();
            assert_eq!(
                t.peer_sends(SYN | ACK, 0),
                Step::Update(CtState::Established)
            );
            assert_eq!(t.pod_sends(ACK, 0), Step::Update(CtState::Established));
            assert_eq!(t.entry.state, TcpState::Established as u8);
            t
        }

        fn pod_sends(&mut self, flags: u8, len: u32) -> Step {
            let s = seg(flags, self.pod, self.peer, len, self.win);
            self.pod = s.tcp.end;
            self.send(&s, true)
        }

        fn peer_sends(&mut self, flags: u8, len: u32) -> Step {
            let s = seg(flags, self.peer, self.pod, len, self.win);
            self.peer = s.tcp.end;
            self.send(&s, false)
        }

        /// A segment as given, the conversation's counters left alone.
        fn send(&mut self, s: &Segment, from_pod: bool) -> Step {
            let dir = if from_pod {
                Direction::Egress
            } else {
                Direction::Ingress
            };
            track_packet(&mut self.entry, s, dir, NOW, &cfg())
        }
    }

    #[test]
    fn a_step_survives_its_code() {
        let states = [
            CtState::New,
            CtState::Established,
            CtState::Related,
            CtState::Untracked,
        ];
        for s in states {
            for step in [Step::Update(s), Step::Delete(s)] {
                assert_eq!(Step::from_code(step.code()), step);
            }
        }
        for step in [Step::Reopen, Step::Invalid, Step::InvalidNoted] {
            assert_eq!(Step::from_code(step.code()), step);
        }
        assert_eq!(Step::from_code(0x13), Step::Invalid);
        assert_eq!(Step::from_code(99), Step::Invalid);
    }

    #[test]
    fn the_first_syn_is_what_the_state_machine_makes_of_it() {
        for (win, opts, wscale) in [
            (64_000u16, 0u8, 0u8),
            (0, 0, 0),
            (
                1_000,
                parse::TCP_OPT_PRESENT | parse::TCP_OPT_WSCALE | parse::TCP_OPT_SACK_PERM,
                9,
            ),
        ] {
            let mut syn = seg(SYN, 4_000_000_000, 0, 0, win);
            syn.tcp.opts = opts;
            syn.tcp.wscale = wscale;
            let fast = track_new(&syn, Direction::Egress, NOW, &cfg()).unwrap();
            // The kernel's way: tcp_new's initialisation, then the packet through tcp_packet.
            let mut slow = CtEntry::default();
            let side = &mut slow.seen[0];
            side.td_end = syn.tcp.end;
            side.td_maxend = syn.tcp.end;
            side.td_maxwin = (win as u32).max(1);
            take_options(side, &syn.tcp);
            slow.last.index = IDX_NONE as u8;
            assert_eq!(
                track_tcp(&mut slow, &syn, false, CtState::New, NOW, &cfg()),
                Step::Update(CtState::New)
            );
            assert_eq!(fast, slow, "win {win} opts {opts:#x}");
        }
    }

    #[test]
    fn only_a_syn_opens_a_tcp_connection() {
        let c = cfg();
        assert!(track_new(&seg(SYN, 7, 0, 0, 100), Direction::Egress, NOW, &c).is_some());
        for f in [ACK, SYN | ACK, FIN | ACK, RST, RST | ACK, 0, PSH | ACK] {
            assert!(
                track_new(&tcp(f), Direction::Egress, NOW, &c).is_none(),
                "flags {f:#x}"
            );
        }
    }

    #[test]
    fn three_way_handshake_and_close_walk_the_kernel_states() {
        let mut t = Talk::syn();
        assert_eq!(t.entry.state, TcpState::SynSent as u8);
        assert_eq!(t.entry.expires_ns, NOW + 120 * SEC);
        assert_eq!(
            t.peer_sends(SYN | ACK, 0),
            Step::Update(CtState::Established)
        );
        assert_eq!(t.entry.state, TcpState::SynRecv as u8);
        assert_ne!(t.entry.flags & CT_F_SEEN_REPLY, 0);
        assert_eq!(t.entry.flags & CT_F_ASSURED, 0);
        assert_eq!(t.pod_sends(ACK, 0), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::Established as u8);
        assert_ne!(t.entry.flags & CT_F_ASSURED, 0);
        assert_eq!(t.entry.expires_ns, NOW + 432_000 * SEC);
        assert_eq!(
            t.pod_sends(FIN | ACK, 0),
            Step::Update(CtState::Established)
        );
        assert_eq!(t.entry.state, TcpState::FinWait as u8);
        assert_eq!(t.peer_sends(ACK, 0), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::CloseWait as u8);
        assert_eq!(
            t.peer_sends(FIN | ACK, 0),
            Step::Update(CtState::Established)
        );
        assert_eq!(t.entry.state, TcpState::LastAck as u8);
        assert_eq!(t.pod_sends(ACK, 0), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::TimeWait as u8);
        assert_eq!(t.entry.expires_ns, NOW + 120 * SEC);
    }

    #[test]
    fn syn_retransmit_is_new_and_keeps_the_timeout() {
        let c = cfg();
        let syn = seg(SYN, 1, 0, 0, 100);
        let mut e = track_new(&syn, Direction::Egress, 5, &c).unwrap();
        let before = e.expires_ns;
        let r = track_packet(&mut e, &syn, Direction::Egress, NOW, &c);
        assert_eq!(r, Step::Update(CtState::New));
        assert_eq!(e.state, TcpState::SynSent as u8);
        assert_eq!(e.expires_ns, before);
    }

    #[test]
    fn ack_before_synack_is_invalid() {
        let mut t = Talk::syn();
        assert_eq!(t.pod_sends(ACK, 0), Step::Invalid);
        assert_eq!(t.entry.state, TcpState::SynSent as u8);
    }

    #[test]
    fn rst_as_only_reply_deletes_the_entry() {
        let mut t = Talk::syn();
        assert_eq!(
            t.peer_sends(RST | ACK, 0),
            Step::Delete(CtState::Established)
        );
    }

    #[test]
    fn rst_at_the_expected_sequence_number_closes_with_the_close_timeout() {
        let mut t = Talk::established();
        assert_eq!(t.peer_sends(RST, 0), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::Close as u8);
        assert_eq!(t.entry.expires_ns, NOW + 10 * SEC);
    }

    #[test]
    fn blind_rst_out_of_the_window_is_invalid_and_leaves_the_connection() {
        // The pod announced a 64 000-byte window; a RST beyond twice that is INVALID (up to one
        // window beyond the window, the kernel lets it through as an overshooting stack's
        // segment, the state untouched).
        // Below what the pod acknowledged, it is INVALID before the window is looked at.
        for (seq_off, verdict) in [
            (200_000u32, Step::InvalidNoted),
            (1 << 20, Step::InvalidNoted),
            (u32::MAX - 5, Step::Invalid),
        ] {
            let mut t = Talk::established();
            let before = t.entry;
            let rst = seg(RST, t.peer.wrapping_add(seq_off), 0, 0, 0);
            assert_eq!(t.send(&rst, false), verdict, "offset {seq_off}");
            assert_eq!(t.entry.state, TcpState::Established as u8);
            assert_eq!(t.entry.expires_ns, before.expires_ns);
            // The connection goes on.
            assert_eq!(
                t.pod_sends(ACK | PSH, 100),
                Step::Update(CtState::Established)
            );
            assert_eq!(t.peer_sends(ACK, 0), Step::Update(CtState::Established));
            assert_eq!(t.entry.state, TcpState::Established as u8);
        }
    }

    #[test]
    fn rst_below_what_the_pod_acknowledged_is_invalid() {
        let mut t = Talk::established();
        t.peer_sends(ACK | PSH, 500);
        t.pod_sends(ACK, 0);
        let rst = seg(RST, t.peer.wrapping_sub(100), 0, 0, 0);
        assert_eq!(t.send(&rst, false), Step::Invalid);
        assert_eq!(t.entry.state, TcpState::Established as u8);
    }

    #[test]
    fn rst_in_window_but_not_exact_keeps_the_state_for_a_challenge_ack() {
        let mut t = Talk::established();
        let rst = seg(RST, t.peer.wrapping_add(1_000), 0, 0, 0);
        assert_eq!(t.send(&rst, false), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::Established as u8);
        assert_eq!(t.entry.expires_ns, NOW + 10 * SEC);
        // The pod's challenge ACK, in window, lifts the CLOSE timeout (to `unacknowledged`: the
        // table counts the RST's sequence number as sent and not yet acknowledged).
        assert_eq!(t.pod_sends(ACK, 0), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::Established as u8);
        assert_eq!(t.entry.expires_ns, NOW + 300 * SEC);
    }

    #[test]
    fn blind_fin_beyond_the_window_is_invalid_and_an_old_one_is_ignored() {
        let mut t = Talk::established();
        let fin = seg(FIN | ACK, t.peer.wrapping_add(1 << 24), t.pod, 0, 100);
        assert_eq!(t.send(&fin, false), Step::InvalidNoted);
        assert_eq!(t.entry.state, TcpState::Established as u8);
        // Far behind: passed on untouched (the pod's stack drops it).
        t.peer_sends(ACK | PSH, 100_000);
        t.pod_sends(ACK, 0);
        let old = seg(FIN | ACK, t.peer.wrapping_sub(200_000), t.pod, 0, 100);
        assert_eq!(t.send(&old, false), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::Established as u8);
    }

    #[test]
    fn an_answer_to_an_invalid_fin_shortens_the_timeout() {
        let mut t = Talk::established();
        let fin = seg(FIN | ACK, t.peer.wrapping_add(1 << 24), t.pod, 0, 100);
        assert_eq!(t.send(&fin, false), Step::InvalidNoted);
        let rst = seg(RST, t.pod.wrapping_add(1 << 24), 0, 0, 0);
        assert_eq!(t.send(&rst, true), Step::InvalidNoted);
        assert_eq!(t.entry.expires_ns, NOW + 300 * SEC);
    }

    #[test]
    fn acknowledging_data_never_sent_is_invalid() {
        let mut t = Talk::established();
        let ack = seg(ACK, t.peer, t.pod.wrapping_add(10), 0, 100);
        assert_eq!(t.send(&ack, false), Step::Invalid);
    }

    #[test]
    fn data_beyond_the_window_is_invalid_and_a_small_overshoot_is_let_through() {
        let mut t = Talk::established();
        // The pod announced 64 000 bytes of window.
        let beyond = seg(ACK, t.peer.wrapping_add(200_000), t.pod, 1_000, 100);
        assert_eq!(t.send(&beyond, false), Step::Invalid);
        let overshoot = seg(ACK, t.peer.wrapping_add(64_001), t.pod, 1_000, 100);
        assert_eq!(
            t.send(&overshoot, false),
            Step::Update(CtState::Established)
        );
        assert_eq!(t.entry.seen[1].td_end, overshoot.tcp.end);
    }

    #[test]
    fn window_scaling_counts_only_when_both_sides_offer_it() {
        for (pod_scales, peer_scales) in [(true, true), (true, false), (false, true)] {
            let both = pod_scales && peer_scales;
            let mut syn = seg(SYN, 10, 0, 0, 65_000);
            if pod_scales {
                syn.tcp.opts = parse::TCP_OPT_PRESENT | parse::TCP_OPT_WSCALE;
                syn.tcp.wscale = 7;
            }
            let mut e = track_new(&syn, Direction::Egress, NOW, &cfg()).unwrap();
            let mut synack = seg(SYN | ACK, 5_000, 11, 0, 65_000);
            if peer_scales {
                synack.tcp.opts = parse::TCP_OPT_PRESENT | parse::TCP_OPT_WSCALE;
                synack.tcp.wscale = 7;
            }
            track_packet(&mut e, &synack, Direction::Ingress, NOW, &cfg());
            // The pod's ACK announces 65 000 << 7 bytes when scaling holds.
            track_packet(
                &mut e,
                &seg(ACK, 11, 5_001, 0, 65_000),
                Direction::Egress,
                NOW,
                &cfg(),
            );
            let far = seg(ACK, 5_001 + 1_000_000, 11, 1_000, 65_000);
            let r = track_packet(&mut e, &far, Direction::Ingress, NOW, &cfg());
            if both {
                assert_eq!(
                    r,
                    Step::Update(CtState::Established),
                    "{pod_scales} {peer_scales}"
                );
            } else {
                assert_eq!(r, Step::Invalid, "{pod_scales} {peer_scales}");
            }
        }
    }

    #[test]
    fn sack_blocks_count_only_when_sack_was_permitted() {
        for permitted in [true, false] {
            let mut syn = seg(SYN, 10, 0, 0, 65_000);
            let mut synack = seg(SYN | ACK, 5_000, 11, 0, 65_000);
            if permitted {
                syn.tcp.opts = parse::TCP_OPT_PRESENT | parse::TCP_OPT_SACK_PERM;
                synack.tcp.opts = parse::TCP_OPT_PRESENT | parse::TCP_OPT_SACK_PERM;
            }
            let mut e = track_new(&syn, Direction::Egress, NOW, &cfg()).unwrap();
            track_packet(&mut e, &synack, Direction::Ingress, NOW, &cfg());
            track_packet(
                &mut e,
                &seg(ACK, 11, 5_001, 0, 65_000),
                Direction::Egress,
                NOW,
                &cfg(),
            );
            // The pod sends 3 000 bytes; the peer SACKs a block past all of it.
            track_packet(
                &mut e,
                &seg(ACK, 11, 5_001, 3_000, 65_000),
                Direction::Egress,
                NOW,
                &cfg(),
            );
            let mut ack = seg(ACK, 5_001, 11, 0, 65_000);
            ack.tcp.sack = 11 + 5_000;
            let r = track_packet(&mut e, &ack, Direction::Ingress, NOW, &cfg());
            if permitted {
                assert_eq!(r, Step::Invalid, "a SACK of data never sent");
            } else {
                assert_eq!(r, Step::Update(CtState::Established), "SACK ignored");
            }
        }
    }

    #[test]
    fn unacknowledged_data_and_retransmissions_cap_the_timeout() {
        let mut t = Talk::established();
        t.pod_sends(ACK | PSH, 1_000);
        assert_eq!(t.entry.expires_ns, NOW + 300 * SEC, "data in flight");
        t.peer_sends(ACK, 0);
        assert_eq!(t.entry.expires_ns, NOW + 432_000 * SEC, "all acknowledged");
        // The same segment again and again: a peer that is gone.
        let again = seg(ACK | PSH, t.pod, t.peer, 1_000, t.win);
        for _ in 0..4 {
            t.send(&again, true);
        }
        assert!(t.entry.last.retrans >= TCP_MAX_RETRANS);
        assert_eq!(t.entry.expires_ns, NOW + 300 * SEC);
    }

    #[test]
    fn a_zero_window_caps_the_timeout() {
        let mut t = Talk::established();
        t.win = 0;
        t.peer_sends(ACK, 0);
        assert_eq!(t.entry.expires_ns, NOW + 300 * SEC);
    }

    #[test]
    fn simultaneous_open_reaches_established() {
        let mut t = Talk::syn();
        let peer_syn = seg(SYN, t.peer, 0, 0, t.win);
        t.peer = peer_syn.tcp.end;
        assert_eq!(t.send(&peer_syn, false), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::SynSent2 as u8);
        let synack = seg(SYN | ACK, t.pod.wrapping_sub(1), t.peer, 0, t.win);
        assert_eq!(t.send(&synack, true), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::SynRecv as u8);
        assert_eq!(t.peer_sends(ACK, 0), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::Established as u8);
    }

    #[test]
    fn syn_after_a_close_reopens() {
        let mut t = Talk::established();
        t.pod_sends(FIN | ACK, 0);
        t.peer_sends(FIN | ACK, 0);
        t.pod_sends(ACK, 0);
        assert_eq!(t.entry.state, TcpState::TimeWait as u8);
        let syn = seg(SYN, t.pod.wrapping_add(1 << 20), 0, 0, 100);
        assert_eq!(t.send(&syn, true), Step::Reopen);
    }

    #[test]
    fn a_new_syn_on_a_live_tuple_is_ignored_then_its_syn_ack_resynchronises() {
        // The pod reuses the port of a connection the table still holds (it died silently).
        let mut t = Talk::established();
        let isn = t.pod.wrapping_add(1 << 30);
        let syn = seg(SYN, isn, 0, 0, 100);
        assert_eq!(t.send(&syn, true), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::Established as u8);
        let peer_isn = 77u32;
        let synack = seg(SYN | ACK, peer_isn, isn + 1, 0, 100);
        assert_eq!(t.send(&synack, false), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::SynRecv as u8);
        let ack = seg(ACK, isn + 1, peer_isn + 1, 0, 100);
        assert_eq!(t.send(&ack, true), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::Established as u8);
    }

    #[test]
    fn a_migrated_entry_keeps_its_state_and_only_tcp_gets_liberal_windows() {
        // The layout the builds before window tracking pinned.
        assert_eq!(core::mem::size_of::<CtEntryV1>(), 24);
        let old = CtEntryV1 {
            expires_ns: 5_000,
            created_ns: 1_000,
            policy_id: 7,
            state: TcpState::Established as u8,
            flags: CT_F_ASSURED | CT_F_SEEN_REPLY | CT_F_ORIG_INGRESS,
            _pad: [0; 2],
        };
        let tcp = CtEntry::migrated(old, proto::TCP);
        assert_eq!(
            (
                tcp.expires_ns,
                tcp.created_ns,
                tcp.policy_id,
                tcp.state,
                tcp.flags
            ),
            (
                old.expires_ns,
                old.created_ns,
                old.policy_id,
                old.state,
                old.flags
            )
        );
        for side in tcp.seen {
            assert_eq!(side.flags, crate::window::SIDE_BE_LIBERAL | SIDE_SACK_PERM);
            assert_eq!((side.td_end, side.td_maxend, side.td_maxwin), (0, 0, 0));
        }
        assert_eq!(tcp.last, TcpLast::default());
        let udp = CtEntry::migrated(CtEntryV1 { state: 0, ..old }, proto::UDP);
        assert_eq!(udp.seen, [TcpSide::default(); 2]);
        assert_eq!(udp.flags, old.flags);
    }

    #[test]
    fn a_migrated_entry_without_window_data_picks_the_window_up() {
        let mut t = Talk::established();
        // What a migration from a table without window data leaves.
        let e = t.entry;
        t.entry = CtEntry::migrated(
            CtEntryV1 {
                expires_ns: e.expires_ns,
                created_ns: e.created_ns,
                policy_id: e.policy_id,
                state: e.state,
                flags: e.flags,
                _pad: [0; 2],
            },
            proto::TCP,
        );
        t.pod = t.pod.wrapping_add(12345);
        assert_eq!(
            t.peer_sends(ACK | PSH, 2_000),
            Step::Update(CtState::Established)
        );
        assert_eq!(t.pod_sends(ACK, 0), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, TcpState::Established as u8);
        assert_eq!(t.entry.seen[1].td_end, t.peer);
    }

    #[test]
    fn an_entry_copied_while_its_connection_ran_learns_the_windows_again() {
        let mut t = Talk::established();
        let copied = t.entry;
        // The connection moves on past the copy's window (a bulk transfer during an upgrade).
        for _ in 0..40 {
            t.peer_sends(ACK | PSH, 60_000);
            t.pod_sends(ACK, 0);
        }
        let stale = seg(ACK | PSH, t.peer, t.pod, 60_000, t.win);
        let mut verbatim = copied;
        assert!(
            matches!(
                track_packet(&mut verbatim, &stale, Direction::Ingress, NOW, &cfg()),
                Step::Invalid | Step::InvalidNoted
            ),
            "the copy as it was refuses the running connection"
        );
        t.entry = copied.relearning_windows(proto::TCP);
        assert_eq!(t.entry.seen[0].td_scale, copied.seen[0].td_scale);
        assert_eq!(
            t.peer_sends(ACK | PSH, 60_000),
            Step::Update(CtState::Established)
        );
        // What the pod sends first under the new programs is a retransmission of old data,
        // while the peer acknowledges newer data the copy never saw (the older programs passed
        // it): learnt strictly, every acknowledgment of the peer would be refused from then on.
        let retransmission = seg(ACK | PSH, t.pod.wrapping_sub(50_000), t.peer, 1_000, t.win);
        assert_eq!(
            t.send(&retransmission, true),
            Step::Update(CtState::Established)
        );
        assert_eq!(t.peer_sends(ACK, 0), Step::Update(CtState::Established));
        assert_eq!(
            t.pod_sends(ACK | PSH, 1_000),
            Step::Update(CtState::Established)
        );
        assert_eq!(t.entry.seen[1].td_end, t.peer, "learnt again");
        assert!(
            t.entry
                .seen
                .iter()
                .all(|s| s.flags & crate::window::SIDE_BE_LIBERAL != 0),
            "liberal for good, as the kernel's picked-up connections: {:?}",
            t.entry.seen
        );
    }

    #[test]
    fn late_synack_is_ignored_without_touching_state() {
        let mut t = Talk::established();
        let state = t.entry.state;
        let expires = t.entry.expires_ns;
        let late = seg(SYN | ACK, t.peer.wrapping_sub(1), t.pod, 0, t.win);
        assert_eq!(t.send(&late, false), Step::Update(CtState::Established));
        assert_eq!(t.entry.state, state);
        assert_eq!(t.entry.expires_ns, expires);
    }

    #[test]
    fn invalid_flag_combinations_are_invalid_even_on_a_connection() {
        let mut t = Talk::syn();
        t.peer_sends(SYN | ACK, 0);
        for f in [SYN | FIN, SYN | RST, 0] {
            assert_eq!(t.pod_sends(f, 0), Step::Invalid, "flags {f:#x}");
        }
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
            ..Segment::default()
        };
        assert!(track_new(&s, Direction::Ingress, NOW, &c).is_none());
        s.icmp_type = 8;
        let e = track_new(&s, Direction::Ingress, NOW, &c).unwrap();
        assert_eq!(e.orig_direction(), Direction::Ingress);
        assert_eq!(e.expires_ns, NOW + 30_000_000_000);
    }
}
