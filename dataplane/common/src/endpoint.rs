//! The `ENDPOINTS` map: which interfaces carry a pod and how that pod is judged.

use crate::RawAddr;

/// Policy id of an endpoint that belongs to no security group: its connections are tracked (so
/// that it keeps them when it joins a group) but nothing is filtered.
pub const POLICY_NONE: u32 = 0;

/// Endpoint flag: the policy is stateless (UNTRACKED): rules are evaluated on every packet in both
/// directions and no conntrack entry is created, like a network ACL.
pub const EP_F_STATELESS: u32 = 1 << 0;

/// Endpoint flag: the policy is layered (security groups and NetworkPolicies each judge the
/// pod): a NEW connection also needs the policy's `POLICY_LAYERS` entry, so that endpoints of
/// unlayered policies (every pod no NetworkPolicy selects) pay no extra lookup.
pub const EP_F_LAYERED: u32 = 1 << 1;

/// Value of the `ENDPOINTS` map, keyed by the host-side interface index (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Endpoint {
    /// The compiled policy that judges this pod's NEW connections, or [`POLICY_NONE`].
    /// Switching an endpoint to another policy is one map update, so no packet ever sees half of
    /// a policy.
    pub policy_id: u32,
    /// Index of this endpoint's counters in the `COUNTERS` per-CPU array (times two: one slot per
    /// direction).
    pub counter_slot: u32,
    /// `EP_F_*` bits.
    pub flags: u32,
    /// `SRC_F_*` bits ([`crate::source`]): whether and how what the pod sends is checked to come
    /// from its own addresses.
    pub sources: u32,
    /// The pod's first IPv4 address (network order, as `RawAddr` words), when `SRC_F_V4`.
    pub addr4: u32,
    /// The pod's first IPv6 address, when `SRC_F_V6`.
    pub addr6: RawAddr,
}

impl Endpoint {
    /// Whether the pod is filtered at all.
    #[inline(always)]
    pub fn is_member(&self) -> bool {
        self.policy_id != POLICY_NONE
    }

    /// Whether the pod's policy is stateless.
    #[inline(always)]
    pub fn is_stateless(&self) -> bool {
        self.flags & EP_F_STATELESS != 0
    }

    /// Whether the pod's policy is layered ([`EP_F_LAYERED`]).
    #[inline(always)]
    pub fn is_layered(&self) -> bool {
        self.flags & EP_F_LAYERED != 0
    }
}

/// A slot of the `ENDPOINT_CACHE` array: a direct-mapped copy of `ENDPOINTS`, so the per-packet
/// path finds its endpoint with an array access the verifier inlines instead of a hash lookup.
/// Slot `ifindex % ENDPOINT_CACHE_SLOTS` holds the endpoint of `ifindex` unless another endpoint
/// with the same slot came first; those are found in `ENDPOINTS`, which is the source of truth.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CachedEndpoint {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Its interface; 0 marks a free slot.
    pub ifindex: u32,
    /// Sequence count: odd while the agent rewrites the slot. A slot is larger than one atomic
    /// store and userspace writes it with a copy, so the datapath reads `seq`, the slot, then
    /// `seq` again, and uses the copy only if both reads are the same even number; otherwise it
    /// asks `ENDPOINTS`, which the kernel updates atomically.
    pub seq: u32,
}

/// The cache slot of interface `ifindex`.
#[inline(always)]
pub fn cache_slot(ifindex: u32) -> u32 {
    ifindex & (crate::limits::ENDPOINT_CACHE_SLOTS - 1)
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Endpoint {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for CachedEndpoint {}
