//! Types shared by kubesg's eBPF programs and the agent that owns them.
//!
//! Everything here is `no_std` and `#[repr(C)]` with explicit padding so that the eBPF side and
//! userspace agree byte for byte on map keys and values. The pure parts of the datapath (packet
//! parsing and the conntrack state machine) also live here: the eBPF programs run them on real
//! packets and userspace unit tests run them on crafted bytes, so both sides share one definition
//! of what a packet means.
#![warn(missing_docs)]
#![no_std]
// For the compare-and-swap of `forward`, written as inline assembly on the BPF target.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod config;
pub mod conntrack;
pub mod endpoint;
pub mod event;
pub mod forward;
pub mod fragment;
pub mod parse;
pub mod policy;
pub mod source;
pub mod window;
pub mod words;

/// IPv4 address family, as `AF_INET` and the `ipv4 2` column of `/proc/net/nf_conntrack`.
pub const AF_INET: u8 = 2;
/// IPv6 address family, as `AF_INET6` and the `ipv6 10` column of `/proc/net/nf_conntrack`.
pub const AF_INET6: u8 = 10;

/// IANA protocol numbers the datapath understands beyond "generic".
pub mod proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP: tracked with its ports, with the generic timeout.
    pub const SCTP: u8 = 132;
}

/// Which way a packet travels relative to the pod whose interface it crosses.
///
/// The names follow the SecurityGroup API: egress rules judge what a pod sends, ingress rules what
/// it receives. On the host-side interface this is reversed from tc's point of view: tc ingress
/// sees what the pod sends (egress), tc egress sees what it receives (ingress).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Sent by the pod.
    Egress = 0,
    /// Received by the pod.
    Ingress = 1,
}

impl Direction {
    /// The opposite direction: the one replies travel in.
    #[inline(always)]
    pub const fn reverse(self) -> Self {
        match self {
            Direction::Egress => Direction::Ingress,
            Direction::Ingress => Direction::Egress,
        }
    }

    /// Decodes the byte stored in maps and events; anything but 1 reads as egress.
    #[inline(always)]
    pub const fn from_u8(v: u8) -> Self {
        if v == 1 {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }
}

/// An address as the maps store it: four 32-bit words holding the address bytes in network order
/// (so the struct's memory is the address as it appears on the wire). IPv4 uses the first word and
/// leaves the rest zero; the family is always stored beside it.
pub type RawAddr = [u32; 4];

/// The maps are created with these sizes; the agent reports them and refuses more.
pub mod limits {
    /// Connection-tracking entries, the default table size. The table is a plain hash: nothing
    /// is evicted to make room, a NEW connection finding it full is refused (see
    /// `Config::ct_endpoint_limit` for the share one endpoint may hold).
    pub const CT_ENTRIES: u32 = 262_144;
    /// Endpoints (pod interfaces) on one node.
    pub const ENDPOINTS: u32 = 4_096;
    /// Slots of the endpoint cache (a power of two: the slot is `ifindex % ENDPOINT_CACHE_SLOTS`).
    pub const ENDPOINT_CACHE_SLOTS: u32 = 4_096;
    /// Peer prefixes shorter than a host over all policies.
    pub const PEER_PREFIXES: u32 = 1_048_576;
    /// Single-address peers (/32, /128) over all policies.
    pub const PEER_HOSTS: u32 = 1_048_576;
    /// Port prefixes over all policies.
    pub const PORT_PREFIXES: u32 = 1_048_576;
    /// `POLICY_LAYERS` entries: one per direction of each layered policy, room for every
    /// endpoint's policy twice over (a replaced policy and its successor coexist briefly).
    pub const POLICY_LAYERS: u32 = 4 * ENDPOINTS;
    /// Further addresses of pods (beyond each one's first IPv4 and IPv6 address, which its
    /// endpoint holds): four per endpoint on average.
    pub const SOURCES: u32 = 4 * ENDPOINTS;
    /// Tracked first fragments whose later fragments are still expected.
    pub const FRAGMENTS: u32 = 16_384;
    /// Bytes of the deny-event ring buffer.
    pub const EVENT_RING_BYTES: u32 = 1 << 20;
}
