//! The `FRAGMENTS` map: later IP fragments carry no ports, so they follow the verdict the
//! datapath gave their datagram's first fragment.

use crate::RawAddr;

/// Identifies an IP datagram whose fragments are in flight on one endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragKey {
    /// The endpoint's interface.
    pub ifindex: u32,
    /// IPv4 identification or IPv6 fragment identification.
    pub id: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// The datagram's protocol (IPv4); 0 for IPv6, whose datagrams are identified by addresses
    /// and identification alone.
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
    /// Source address.
    pub src: RawAddr,
    /// Destination address.
    pub dst: RawAddr,
}

/// What happened to a datagram's first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragVerdict {
    /// After this datapath clock reading (CLOCK_MONOTONIC) the record is stale.
    pub expires_ns: u64,
    /// 1 when the first fragment was let through.
    pub accepted: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for FragKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for FragVerdict {}
