//! Every map of the datapath. The agent reaches them through one typed wrapper
//! (`kubesg_agent::maps`); the names here are the names it uses and the names they are pinned under.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use kubesg_common::{
    config::{ClockSample, Config},
    conntrack::{CtEntry, CtKey},
    endpoint::{CachedEndpoint, Endpoint},
    event::Counters,
    fragment::{FragKey, FragVerdict},
    limits,
    parse::{Packet, TcpOptionBytes},
    policy::{ClassSet, Layers, LayersKey, PeerKey, PortKey},
    source::SourceKey,
};

/// Pod interfaces by ifindex. An interface without an entry is not judged (its packets pass).
#[map]
pub static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::with_max_entries(limits::ENDPOINTS, 0);

/// Direct-mapped copy of `ENDPOINTS` (see `CachedEndpoint`): the fast path's endpoint lookup.
#[map]
pub static ENDPOINT_CACHE: Array<CachedEndpoint> =
    Array::with_max_entries(limits::ENDPOINT_CACHE_SLOTS, 0);

/// Further addresses of pods (`SourceKey` → 1), for endpoints flagged `SRC_F_MORE`; allocated on
/// insert: most pods have one address per family, which their endpoint holds.
#[map]
pub static SOURCES: HashMap<SourceKey, u32> =
    HashMap::with_max_entries(limits::SOURCES, BPF_F_NO_PREALLOC);

/// Connection tracking, IPv4 and IPv6 (the key carries the family). A plain hash, allocated
/// up front, not an LRU: an LRU makes room for a flood's NEW connections by evicting the idle
/// established ones of every pod on the node. Here nothing is evicted; a NEW connection that
/// finds the table full (or its endpoint at its limit, [`CT_COUNTS`]) is refused and counted,
/// and the agent's sweep frees what expired.
#[map]
pub static CONNTRACK: HashMap<CtKey, CtEntry> = HashMap::with_max_entries(limits::CT_ENTRIES, 0);

/// Entries each endpoint holds in [`CONNTRACK`], by counter slot: what its limit
/// (`Config::ct_endpoint_limit`) is checked against. Added to by the programs with atomic
/// instructions and, mapped into its memory (`BPF_F_MMAPABLE`), by the agent for the entries its
/// sweep removes, so neither loses the other's updates.
#[map]
pub static CT_COUNTS: Array<u64> = Array::with_max_entries(limits::ENDPOINTS, BPF_F_MMAPABLE);

/// (policy, direction, family, remote address) → classes whose peers contain the address.
#[map]
pub static POLICY_PEERS: LpmTrie<PeerKey, ClassSet> =
    LpmTrie::with_max_entries(limits::PEER_PREFIXES, 0);

/// (policy, direction, family, address) → classes, for single-address peers (looked up before the
/// trie; allocated on insert, so an idle node pays no memory for it).
#[map]
pub static POLICY_HOSTS: HashMap<PeerKey, ClassSet> =
    HashMap::with_max_entries(limits::PEER_HOSTS, BPF_F_NO_PREALLOC);

/// (policy, direction, protocol, port) → classes that allow the port.
#[map]
pub static POLICY_PORTS: LpmTrie<PortKey, ClassSet> =
    LpmTrie::with_max_entries(limits::PORT_PREFIXES, 0);

/// (policy, direction) → what a layered policy requires of a NEW connection in that direction:
/// the classes of each layer. Read only for endpoints flagged `EP_F_LAYERED`.
#[map]
pub static POLICY_LAYERS: HashMap<LayersKey, Layers> =
    HashMap::with_max_entries(limits::POLICY_LAYERS, 0);

/// Verdicts of first fragments, for the later fragments of the same datagram.
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragVerdict> =
    LruHashMap::with_max_entries(limits::FRAGMENTS, 0);

/// Where a packet that opens a connection builds its conntrack entry before inserting it (one
/// per CPU): at 88 bytes, with the packet and its rules, it does not fit the 512-byte eBPF stack.
/// Not pinned: nothing outlives the packet.
#[map]
pub static CT_SCRATCH: PerCpuArray<CtEntry> = PerCpuArray::with_max_entries(1, 0);

/// The packet being judged, as parsed (one per CPU): off the 512-byte stack, as
/// [`CT_SCRATCH`].
#[map]
pub static PACKET: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

/// The TCP options of the packet being judged, copied out of it (one per CPU) for
/// `kubesg_tcp_options`.
#[map]
pub static TCP_OPTIONS: PerCpuArray<TcpOptionBytes> = PerCpuArray::with_max_entries(1, 0);

/// Settings (one element).
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// The `clock` program's last reading (one element): how the agent sets up the tick clock.
#[map]
pub static CLOCK: Array<ClockSample> = Array::with_max_entries(1, 0);

/// Counters: slot `2 * counter_slot + direction`; the last two slots count interfaces that carry
/// the programs but have no endpoint record.
#[map]
pub static COUNTERS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries((limits::ENDPOINTS + 1) * 2, 0);

/// Deny events for flow logs.
#[map]
pub static DENY_EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENT_RING_BYTES, 0);
