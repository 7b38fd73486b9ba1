//! TCP window tracking, as nf_conntrack's `tcp_in_window` (net/netfilter/nf_conntrack_proto_tcp.c)
//! does it: each direction's highest sequence number sent, the right edge of the window its peer
//! granted, its largest window and highest acknowledgment. A segment must fall inside the window
//! of the side receiving it and acknowledge only data that side sent; this is what makes a blind
//! RST or FIN, whose sequence number an off-path attacker has to guess among 2^32, INVALID instead
//! of closing the connection.
//!
//! Per direction (index 0: the original direction, 1: the reply), following the kernel's
//! variable names:
//!
//! - `td_end`: the highest `seq + len` the side sent;
//! - `td_maxend`: the highest `ack + window` its peer announced, the furthest it may send to;
//! - `td_maxwin`: the largest (scaled) window it announced, plus its SACKed bytes;
//! - `td_maxack`: the highest acknowledgment it sent.
//!
//! A segment from `sender` to `receiver` is in window when (RFC 793's rules, loosened by what
//! real stacks do):
//!
//! 1. `seq <= sender.td_maxend` (not beyond what the receiver allowed);
//! 2. `end >= sender.td_end - receiver.td_maxwin` (not older than a window: else ignored);
//! 3. `sack <= receiver.td_end` (acknowledges nothing the receiver did not send);
//! 4. `sack >= receiver.td_end - max(sender.td_maxwin, 66000)` (not too delayed: else ignored).

use crate::{
    forward::{advance_seq, raise},
    parse::{TcpFields, TCP_OPT_PRESENT, TCP_OPT_SACK_PERM, TCP_OPT_WSCALE},
};

/// Whether sequence number `a` comes before `b` in the 2^32 circle (`before()` in the kernel).
#[inline(always)]
pub const fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Whether sequence number `a` comes after `b` (`after()` in the kernel).
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    seq_before(b, a)
}

/// [`TcpSide::flags`]: the side sent a Window Scale option (`IP_CT_TCP_FLAG_WINDOW_SCALE`).
pub const SIDE_WINDOW_SCALE: u8 = 0x01;
/// [`TcpSide::flags`]: the side permits SACK (`IP_CT_TCP_FLAG_SACK_PERM`).
pub const SIDE_SACK_PERM: u8 = 0x02;
/// [`TcpSide::flags`]: the side sent the first FIN (`IP_CT_TCP_FLAG_CLOSE_INIT`).
pub const SIDE_CLOSE_INIT: u8 = 0x04;
/// [`TcpSide::flags`]: accept the side's segments whatever their window
/// (`IP_CT_TCP_FLAG_BE_LIBERAL`): set on connections migrated from a table that kept no window
/// data, whose window scale is unknown (as the kernel does for connections it picks up).
pub const SIDE_BE_LIBERAL: u8 = 0x08;
/// [`TcpSide::flags`]: the side sent data not yet acknowledged
/// (`IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED`); the connection then gets the `unacknowledged` timeout.
pub const SIDE_DATA_UNACKNOWLEDGED: u8 = 0x10;
/// [`TcpSide::flags`]: `td_maxack` holds an acknowledgment (`IP_CT_TCP_FLAG_MAXACK_SET`).
pub const SIDE_MAXACK_SET: u8 = 0x20;
/// [`TcpLast::flags`]: a SYN arrived in LAST_ACK; the next ACK the other way may be the RFC 5961
/// challenge ACK, not the ACK of the last FIN (`IP_CT_EXP_CHALLENGE_ACK`).
pub const LAST_EXP_CHALLENGE_ACK: u8 = 0x40;

/// `MAXACKWINCONST`: the least lower bound an acknowledgment may lag behind.
const MAX_ACK_WINDOW: u32 = 66_000;

/// One direction's sequence space (`struct ip_ct_tcp_state`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpSide {
    /// Highest `seq + len` sent.
    pub td_end: u32,
    /// Highest `ack + window` the peer announced.
    pub td_maxend: u32,
    /// Largest scaled window announced (0: nothing seen from this side yet).
    pub td_maxwin: u32,
    /// Highest acknowledgment sent (with [`SIDE_MAXACK_SET`]).
    pub td_maxack: u32,
    /// Window Scale shift.
    pub td_scale: u8,
    /// `SIDE_*` bits.
    pub flags: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

/// The last segment of note and the retransmission count (`last_*` and `retrans` of
/// `struct ip_ct_tcp`): resynchronisation after a SYN the table ignored, RST trains, challenge
/// ACKs, and the `max_retrans` timeout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpLast {
    /// Its sequence number.
    pub seq: u32,
    /// Its acknowledgment number.
    pub ack: u32,
    /// Its end (`seq + len`, SYN and FIN counted).
    pub end: u32,
    /// Its raw window.
    pub win: u16,
    /// Its row of the transition table (SYN, SYN/ACK, FIN, ACK, RST, none).
    pub index: u8,
    /// Its conntrack direction (0 original, 1 reply).
    pub dir: u8,
    /// The Window Scale of an ignored SYN, for a later resynchronisation.
    pub wscale: u8,
    /// `SIDE_WINDOW_SCALE`/`SIDE_SACK_PERM` of an ignored SYN, and [`LAST_EXP_CHALLENGE_ACK`].
    pub flags: u8,
    /// How many times in a row the same ACK segment was seen.
    pub retrans: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 5],
}

/// What window tracking makes of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InWindow {
    /// In window: the state machine goes on.
    Accept,
    /// Let through untouched: an old retransmission or an overly delayed ACK (the state stays).
    Ignore,
    /// Out of window: INVALID.
    Invalid,
}

/// The largest acknowledgment lag accepted from `sender` (`MAXACKWINDOW`).
#[inline(always)]
fn max_ack_window(sender: &TcpSide) -> u32 {
    if sender.td_maxwin > MAX_ACK_WINDOW {
        sender.td_maxwin
    } else {
        MAX_ACK_WINDOW
    }
}

/// Reads a SYN's options into `side` (`tcp_options`): only when the header has options at all.
#[inline(always)]
pub fn take_options(side: &mut TcpSide, tcp: &TcpFields) {
    if tcp.opts & TCP_OPT_PRESENT == 0 {
        return;
    }
    side.td_scale = 0;
    side.flags &= SIDE_BE_LIBERAL;
    if tcp.opts & TCP_OPT_SACK_PERM != 0 {
        side.flags |= SIDE_SACK_PERM;
    }
    if tcp.opts & TCP_OPT_WSCALE != 0 {
        side.td_scale = tcp.wscale;
        side.flags |= SIDE_WINDOW_SCALE;
    }
}

/// A SYN or SYN/ACK starts its sender's sequence space (`tcp_init_sender`). Window scaling holds
/// only when both sides offered it (RFC 7323), which the reply's SYN/ACK settles.
#[inline(always)]
fn init_sender(sender: &mut TcpSide, receiver: &mut TcpSide, tcp: &TcpFields, reply: bool) {
    sender.td_end = tcp.end;
    sender.td_maxend = tcp.end;
    sender.td_maxwin = if tcp.win == 0 { 1 } else { tcp.win as u32 };
    take_options(sender, tcp);
    if reply && !(sender.flags & SIDE_WINDOW_SCALE != 0 && receiver.flags & SIDE_WINDOW_SCALE != 0)
    {
        sender.td_scale = 0;
        receiver.td_scale = 0;
    }
}

/// Whether the sender's out-of-window segments pass anyway ([`SIDE_BE_LIBERAL`]).
#[inline(always)]
fn unless_liberal(sender: &TcpSide, verdict: InWindow) -> InWindow {
    if sender.flags & SIDE_BE_LIBERAL != 0 {
        InWindow::Accept
    } else {
        verdict
    }
}

/// Checks a segment travelling in conntrack direction `reply` against the window and, when in
/// window, moves the window data on (`tcp_in_window`). `seen` is indexed by conntrack direction;
/// `state` is the connection's stored TCP state; `ack_row` says the segment is a plain ACK (its
/// row of the transition table), which retransmission counting looks at.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn in_window(
    seen: &mut [TcpSide; 2],
    last: &mut TcpLast,
    state: u8,
    reply: bool,
    tcp_flags: u8,
    ack_row: bool,
    tcp: &TcpFields,
) -> InWindow {
    use crate::conntrack::{tcp_flags::*, TcpState};
    let (orig, rep) = seen.split_at_mut(1);
    let (sender, receiver) = if reply {
        (&mut rep[0], &mut orig[0])
    } else {
        (&mut orig[0], &mut rep[0])
    };
    in_window_sides(
        sender,
        receiver,
        last,
        state == TcpState::SynSent as u8,
        state == TcpState::SynRecv as u8,
        reply,
        tcp_flags & SYN != 0,
        tcp_flags & ACK != 0,
        tcp_flags & RST != 0,
        ack_row,
        tcp,
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn in_window_sides(
    sender: &mut TcpSide,
    receiver: &mut TcpSide,
    last: &mut TcpLast,
    syn_sent: bool,
    syn_recv: bool,
    reply: bool,
    syn: bool,
    has_ack: bool,
    rst: bool,
    ack_row: bool,
    tcp: &TcpFields,
) -> InWindow {
    let mut seq = tcp.seq;
    let mut ack = tcp.ack;
    let mut sack = if receiver.flags & SIDE_SACK_PERM != 0 {
        tcp.sack
    } else {
        tcp.ack
    };
    let mut end = tcp.end;
    let mut win = tcp.win as u32;

    if sender.td_maxwin == 0 {
        if syn {
            // The SYN/ACK answering the SYN, or the reply's SYN of a simultaneous open.
            init_sender(sender, receiver, tcp, reply);
            if !has_ack {
                return InWindow::Accept;
            }
        } else {
            // Nothing seen from this side yet (a connection migrated without window data): take
            // the segment's word for it.
            sender.td_end = end;
            let swin = win << sender.td_scale;
            sender.td_maxwin = if swin == 0 { 1 } else { swin };
            sender.td_maxend = end.wrapping_add(sender.td_maxwin);
            if receiver.td_maxwin == 0 {
                receiver.td_end = sack;
                receiver.td_maxend = sack;
            } else if sack == receiver.td_end.wrapping_add(1) {
                // Likely the answer to a keepalive.
                receiver.td_end = receiver.td_end.wrapping_add(1);
            }
        }
    } else if syn && seq_after(end, sender.td_end) && (syn_sent || syn_recv) {
        // RFC 793: a TCP that restarted may send a new SYN above the sequence numbers it used.
        init_sender(sender, receiver, tcp, reply);
        if reply && !has_ack {
            return InWindow::Accept;
        }
    }

    if !has_ack || (rst && ack == 0) {
        // No acknowledgment (or a broken stack's RST with ACK set and 0): pretend it was right.
        ack = receiver.td_end;
        sack = receiver.td_end;
    }
    if rst && seq == 0 && syn_sent {
        // A RST answering a SYN.
        seq = sender.td_end;
        end = sender.td_end;
    }

    if !seq_before(seq, sender.td_maxend.wrapping_add(1)) {
        // Beyond the receiver's window. Stacks that overshoot it by less than a window still
        // move td_end, so that the receiver's acknowledgment of that data is not refused later.
        let overshot = end.wrapping_sub(sender.td_maxend).wrapping_add(1);
        let ack_ok = seq_after(
            sack,
            receiver
                .td_end
                .wrapping_sub(max_ack_window(sender))
                .wrapping_sub(1),
        );
        let in_recv_win = receiver.td_maxwin != 0
            && seq_after(
                end,
                sender
                    .td_end
                    .wrapping_sub(receiver.td_maxwin)
                    .wrapping_sub(1),
            );
        if in_recv_win
            && ack_ok
            && overshot <= receiver.td_maxwin
            && seq_before(sack, receiver.td_end.wrapping_add(1))
        {
            advance_seq(&mut sender.td_end, end);
            sender.flags |= SIDE_DATA_UNACKNOWLEDGED;
            return unless_liberal(sender, InWindow::Ignore);
        }
        return unless_liberal(sender, InWindow::Invalid);
    }
    if !seq_before(sack, receiver.td_end.wrapping_add(1)) {
        // Acknowledges data the receiver never sent.
        return unless_liberal(sender, InWindow::Invalid);
    }
    let in_recv_win = receiver.td_maxwin == 0
        || seq_after(
            end,
            sender
                .td_end
                .wrapping_sub(receiver.td_maxwin)
                .wrapping_sub(1),
        );
    if !in_recv_win {
        // Data acknowledged long ago, sent again.
        return unless_liberal(sender, InWindow::Ignore);
    }
    if !seq_after(
        sack,
        receiver
            .td_end
            .wrapping_sub(max_ack_window(sender))
            .wrapping_sub(1),
    ) {
        // An acknowledgment overtaken by later ones.
        return unless_liberal(sender, InWindow::Ignore);
    }

    if !syn {
        win <<= sender.td_scale;
    }
    // The fields that only move forward do so with compare-and-swap, so that a CPU handling an
    // earlier segment of this connection cannot move them back (see `forward`).
    let swin = win.wrapping_add(sack.wrapping_sub(ack));
    raise(&mut sender.td_maxwin, swin);
    if advance_seq(&mut sender.td_end, end) {
        sender.flags |= SIDE_DATA_UNACKNOWLEDGED;
    }
    if has_ack {
        if sender.flags & SIDE_MAXACK_SET == 0 {
            sender.td_maxack = ack;
            sender.flags |= SIDE_MAXACK_SET;
        } else {
            advance_seq(&mut sender.td_maxack, ack);
        }
    }
    if receiver.td_maxwin != 0 && seq_after(end, sender.td_maxend) {
        receiver.td_maxwin = receiver
            .td_maxwin
            .wrapping_add(end.wrapping_sub(sender.td_maxend));
    }
    // The right edge the receiver may send to: `sack + win`, one more for a zero window (so
    // that a window probe fits); moved only forward, as `sack + win >= td_maxend` does.
    advance_seq(
        &mut receiver.td_maxend,
        sack.wrapping_add(win).wrapping_add((win == 0) as u32),
    );
    if ack == receiver.td_end {
        receiver.flags &= !SIDE_DATA_UNACKNOWLEDGED;
    }
    if ack_row {
        let dir = reply as u8;
        if last.dir == dir
            && last.seq == seq
            && last.ack == ack
            && last.end == end
            && last.win == tcp.win
        {
            last.retrans = last.retrans.saturating_add(1);
        } else {
            last.dir = dir;
            last.seq = seq;
            last.ack = ack;
            last.end = end;
            last.win = tcp.win;
            last.retrans = 0;
        }
    }
    InWindow::Accept
}
