//! What the datapath reports: per-endpoint counters and deny events for flow logs.

use crate::RawAddr;

/// Packet counters of one endpoint in one direction (a `COUNTERS` per-CPU array slot; userspace
/// sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets let through.
    pub accepted: u64,
    /// Connections this endpoint started tracking.
    pub new_connections: u64,
    /// ICMP errors accepted as RELATED to a tracked connection.
    pub related: u64,
    /// Packets dropped because no rule allows them (NEW, or cut by a rule change).
    pub dropped_policy: u64,
    /// Packets dropped as INVALID: malformed, or impossible in their connection's state.
    pub dropped_invalid: u64,
    /// INVALID packets seen on endpoints that are not filtered (counted, passed).
    pub invalid_passed: u64,
    /// Packets the pod sent as someone else (source check, [`crate::source`]): dropped, member
    /// or not.
    pub dropped_spoofed: u64,
    /// New connections the conntrack table had no room for: the endpoint reached its entry
    /// limit or the node's table was full. A member's packet is dropped; a non-member's passes
    /// untracked.
    pub conntrack_full: u64,
}

impl Counters {
    /// Adds another CPU's counters to these.
    pub fn add(&mut self, o: &Counters) {
        self.accepted += o.accepted;
        self.new_connections += o.new_connections;
        self.related += o.related;
        self.dropped_policy += o.dropped_policy;
        self.dropped_invalid += o.dropped_invalid;
        self.invalid_passed += o.invalid_passed;
        self.dropped_spoofed += o.dropped_spoofed;
        self.conntrack_full += o.conntrack_full;
    }
}

/// Why a packet was dropped, as carried in [`DenyEvent::reason`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A NEW connection that no rule allows.
    Policy = 1,
    /// An established connection the new rules no longer allow (re-check after a rule change).
    PolicyChanged = 2,
    /// Not valid in its connection's state (e.g. a TCP segment with no connection).
    Invalid = 3,
    /// Malformed headers.
    Malformed = 4,
    /// A later IP fragment whose first fragment was not seen or was dropped.
    Fragment = 5,
    /// An ICMP error about no tracked connection.
    UnrelatedIcmp = 6,
    /// Sent by the pod from an address that is not its own, as a router, or as ARP or a
    /// Neighbor Advertisement for another host's address ([`crate::source`]).
    Spoofed = 7,
    /// A NEW connection the conntrack table had no room for (the endpoint's entry limit, or the
    /// node's table full). Existing connections are never evicted to make room.
    ConntrackFull = 8,
}

impl DenyReason {
    /// Decodes the stored byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => DenyReason::Policy,
            2 => DenyReason::PolicyChanged,
            3 => DenyReason::Invalid,
            4 => DenyReason::Malformed,
            5 => DenyReason::Fragment,
            6 => DenyReason::UnrelatedIcmp,
            7 => DenyReason::Spoofed,
            8 => DenyReason::ConntrackFull,
            _ => return None,
        })
    }

    /// Short name for logs and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            DenyReason::Policy => "policy",
            DenyReason::PolicyChanged => "policy-changed",
            DenyReason::Invalid => "invalid",
            DenyReason::Malformed => "malformed",
            DenyReason::Fragment => "fragment",
            DenyReason::UnrelatedIcmp => "unrelated-icmp",
            DenyReason::Spoofed => "spoofed",
            DenyReason::ConntrackFull => "conntrack-full",
        }
    }
}

/// One dropped packet, written to the `DENY_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DenyEvent {
    /// The datapath clock (CLOCK_MONOTONIC at the tick's start) when it was dropped.
    pub ts_ns: u64,
    /// The endpoint's interface.
    pub ifindex: u32,
    /// The endpoint's policy at the time.
    pub policy_id: u32,
    /// `AF_INET` or `AF_INET6`, 0 when the packet could not be parsed that far.
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// [`crate::Direction`] as a byte.
    pub direction: u8,
    /// [`DenyReason`] as a byte.
    pub reason: u8,
    /// Source port (host order), or the ICMP identifier.
    pub sport: u16,
    /// Destination port (host order), or the ICMP type and code.
    pub dport: u16,
    /// Source address.
    pub src: RawAddr,
    /// Destination address.
    pub dst: RawAddr,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for DenyEvent {}
