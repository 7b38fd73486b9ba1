//! The compiled form of a policy in the datapath: two longest-prefix-match lookups per NEW
//! connection, whatever the number of rules, peers or ports.
//!
//! Each rule of a policy direction becomes a *class* (a bit). The `POLICY_PEERS` trie maps
//! (policy, direction, family, remote address) to the classes whose peers contain the address;
//! the `POLICY_PORTS` trie maps (policy, direction, protocol, port) to the classes that allow that
//! port. A connection is allowed iff the two class sets intersect. `except` blocks and port ranges
//! are resolved by the longest-prefix rule when the agent writes the tries, never per packet.
//!
//! Single addresses (/32, /128: pods, mostly) go to the `POLICY_HOSTS` hash instead of the peer
//! trie, looked up first: a host entry is by definition the longest prefix for its address, and a
//! hash lookup costs the same for 10 peers as for 100 000, where a trie walk gets deeper.

use crate::RawAddr;

/// Number of 64-bit words in a [`ClassSet`]: a policy direction may have this many × 64 classes.
pub const CLASS_WORDS: usize = 2;
/// Largest number of classes in one policy direction.
pub const MAX_CLASSES: usize = CLASS_WORDS * 64;

/// A set of rule classes (bit `i` = class `i`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct ClassSet {
    /// The bits.
    pub bits: [u64; CLASS_WORDS],
}

impl ClassSet {
    /// Whether the two sets share a class.
    #[inline(always)]
    pub fn intersects(&self, other: &ClassSet) -> bool {
        (self.bits[0] & other.bits[0]) | (self.bits[1] & other.bits[1]) != 0
    }

    /// Adds class `i` (ignored when out of range).
    pub fn insert(&mut self, i: usize) {
        if let Some(w) = self.bits.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    /// Whether class `i` is in the set.
    pub fn contains(&self, i: usize) -> bool {
        self.bits
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }
}

/// Bits of [`PeerKey`] before the address: policy id, direction, family and padding, all matched
/// exactly. A prefix of `n` address bits has LPM prefix length `PEER_KEY_FIXED_BITS + n`.
pub const PEER_KEY_FIXED_BITS: u32 = 64;

/// Data part of a `POLICY_PEERS` LPM trie key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct PeerKey {
    /// The policy.
    pub policy_id: u32,
    /// [`crate::Direction`] as a byte.
    pub direction: u8,
    /// `AF_INET` or `AF_INET6`: an IPv6 block never matches an IPv4 address.
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
    /// The address, network order (IPv4 in the first word).
    pub addr: RawAddr,
}

/// Bits of [`PortKey`] before the port: policy id, direction, protocol. A port prefix of `n` bits
/// has LPM prefix length `PORT_KEY_FIXED_BITS + n`.
pub const PORT_KEY_FIXED_BITS: u32 = 48;

/// Data part of a `POLICY_PORTS` LPM trie key.
///
/// For TCP, UDP and SCTP the port is the destination port of the connection's first packet. For
/// ICMP and ICMPv6 it is `type << 8 | code`, so a rule on a type with any code is an 8-bit prefix.
/// Protocols without ports use port 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct PortKey {
    /// The policy.
    pub policy_id: u32,
    /// [`crate::Direction`] as a byte.
    pub direction: u8,
    /// IP protocol number.
    pub proto: u8,
    /// The port, big-endian bytes (so its prefix bits come first).
    pub port: [u8; 2],
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ClassSet {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for PortKey {}

/// The question a policy answers for a NEW connection: may this pod open (egress) or accept
/// (ingress) a connection with `remote` on `proto`/`port`?
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyQuery {
    /// Which side of the pod.
    pub direction: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// The other end's address.
    pub remote: RawAddr,
    /// The connection's destination port, `type << 8 | code` for ICMP, 0 for other protocols.
    pub port: u16,
}

impl PolicyQuery {
    /// The query for the first packet of a connection travelling in `dir`.
    #[inline(always)]
    pub fn for_packet(dir: crate::Direction, pkt: &crate::parse::Packet) -> Self {
        let mut q = PolicyQuery {
            direction: dir as u8,
            family: pkt.family,
            proto: pkt.proto,
            remote: [0; 4],
            port: pkt.dport,
        };
        // Word by word: in eBPF the packet is in a per-CPU slot, and copying the address out as
        // one value is a byte-wise loop (`crate::words`).
        let remote = if dir == crate::Direction::Egress {
            &pkt.dst
        } else {
            &pkt.src
        };
        crate::words::copy::<_, u32>(&mut q.remote, remote);
        q
    }

    /// The query a tracked connection answered when it was opened (used to re-check it after the
    /// endpoint's policy changed).
    #[inline(always)]
    pub fn for_entry(key: &crate::conntrack::CtKey, entry: &crate::conntrack::CtEntry) -> Self {
        let dir = entry.orig_direction();
        let port = if crate::conntrack::is_icmp(key.family, key.proto) {
            (key.peer_port & 0xff) << 8
        } else if dir == crate::Direction::Egress {
            key.peer_port
        } else {
            key.pod_port
        };
        let mut q = PolicyQuery {
            direction: dir as u8,
            family: key.family,
            proto: key.proto,
            remote: [0; 4],
            port,
        };
        crate::words::copy::<_, u32>(&mut q.remote, &key.peer_addr);
        q
    }

    /// The `POLICY_PEERS` lookup key (full-length prefix) for policy `policy_id`.
    #[inline(always)]
    pub fn peer_key(&self, policy_id: u32) -> (u32, PeerKey) {
        (
            PEER_KEY_FIXED_BITS + 128,
            PeerKey {
                policy_id,
                direction: self.direction,
                family: self.family,
                _pad: [0; 2],
                addr: self.remote,
            },
        )
    }

    /// The `POLICY_PORTS` lookup key (full-length prefix) for policy `policy_id`.
    #[inline(always)]
    pub fn port_key(&self, policy_id: u32) -> (u32, PortKey) {
        (
            PORT_KEY_FIXED_BITS + 16,
            PortKey {
                policy_id,
                direction: self.direction,
                proto: self.proto,
                port: self.port.to_be_bytes(),
            },
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Layers: security groups and NetworkPolicies on one pod.

/// Layer index of SecurityGroups (`LAYER_SECURITY_GROUPS` on the wire).
pub const LAYER_SECURITY_GROUPS: u8 = 0;
/// Layer index of Kubernetes NetworkPolicies (`LAYER_NETWORK_POLICIES` on the wire).
pub const LAYER_NETWORK_POLICIES: u8 = 1;
/// How many layers a policy direction can require: one per kind of policy object.
pub const MAX_LAYERS: usize = 2;

/// Key of the `POLICY_LAYERS` map: one entry per direction of each layered policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct LayersKey {
    /// The policy.
    pub policy_id: u32,
    /// [`crate::Direction`] as a byte.
    pub direction: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}

impl LayersKey {
    /// The key of `policy_id`'s entry for direction `direction` (a [`crate::Direction`] byte).
    #[inline(always)]
    pub fn new(policy_id: u32, direction: u8) -> Self {
        LayersKey {
            policy_id,
            direction,
            _pad: [0; 3],
        }
    }
}

/// Value of the `POLICY_LAYERS` map: what a layered policy requires of a NEW connection in one
/// direction. The classes of a layered direction are partitioned by layer (rules are merged into
/// classes only within their layer), so "some rule of layer `i` allows it" is "the connection's
/// classes meet `masks[i]`".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Layers {
    /// How many entries of `masks` are required (0: the direction allows every connection).
    pub count: u32,
    /// Bit `i`: requirement `i` is skipped for connections from the node's own network stack
    /// (the NetworkPolicies layer on ingress: a pod cannot block its node, e.g. kubelet probes).
    pub host_exempt: u32,
    /// Requirement `i`: the classes of the rules of that layer.
    pub masks: [ClassSet; MAX_LAYERS],
    /// Requirement `i`: which layer it is ([`LAYER_SECURITY_GROUPS`] or
    /// [`LAYER_NETWORK_POLICIES`]), for userspace (`explain`); the datapath does not read it.
    pub layer_ids: [u8; MAX_LAYERS],
    /// Explicit padding, always zero.
    pub _pad: [u8; 6],
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for LayersKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Layers {}

/// Whether layer `layer` is skipped, in direction `dir`, for a connection from the node itself.
/// Only the NetworkPolicies layer, and only for connections the pod accepts: the NetworkPolicy
/// API lets a pod's node reach it whatever the policies say, while a security group (like one
/// on an ENI) judges the node as any other peer, and nothing exempts what the pod opens.
#[inline(always)]
pub fn host_exempt(dir: crate::Direction, layer: u8) -> bool {
    dir as u8 == crate::Direction::Ingress as u8 && layer == LAYER_NETWORK_POLICIES
}

/// Whether a packet crossing a pod's interface in `dir` comes from the node's own network stack.
/// In `to_pod` (tc egress of the host-side interface) `ingress_ifindex` (`skb->skb_iif`) is the
/// interface the packet was received on: 0 for a packet the node's stack sent itself, non-zero
/// for one forwarded or bridged from another pod or another node.
#[inline(always)]
pub fn from_host(dir: crate::Direction, ingress_ifindex: u32) -> bool {
    dir as u8 == crate::Direction::Ingress as u8 && ingress_ifindex == 0
}

/// The verdict of a layered policy on a NEW connection: `classes` are the classes allowing it
/// (ports ∩ peers; empty when a lookup missed), `layers` what its direction requires. Allowed
/// iff every required layer, bar those `host_exempt` for a connection `from_host`, has a class
/// allowing it. The datapath and the agent's tests share this one definition.
#[inline(always)]
pub fn layered_allows(classes: &ClassSet, layers: &Layers, from_host: bool) -> bool {
    let mut i = 0;
    while i < MAX_LAYERS {
        let required = (i as u32) < layers.count;
        let skipped = from_host && layers.host_exempt & (1 << i) != 0;
        if required && !skipped && !classes.intersects(&layers.masks[i]) {
            return false;
        }
        i += 1;
    }
    true
}

impl ClassSet {
    /// The classes in both sets.
    #[inline(always)]
    pub fn and(&self, other: &ClassSet) -> ClassSet {
        ClassSet {
            bits: [self.bits[0] & other.bits[0], self.bits[1] & other.bits[1]],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Direction;

    fn set(classes: &[usize]) -> ClassSet {
        let mut s = ClassSet::default();
        for c in classes {
            s.insert(*c);
        }
        s
    }

    /// Security groups own classes 0..2, NetworkPolicies 2..4; NetworkPolicies host-exempt.
    fn both() -> Layers {
        Layers {
            count: 2,
            host_exempt: 1 << 1,
            masks: [set(&[0, 1]), set(&[2, 3, 100])],
            layer_ids: [LAYER_SECURITY_GROUPS, LAYER_NETWORK_POLICIES],
            _pad: [0; 6],
        }
    }

    #[test]
    fn both_layers_must_allow() {
        let l = both();
        assert!(layered_allows(&set(&[1, 2]), &l, false));
        assert!(layered_allows(&set(&[0, 100]), &l, false));
        assert!(!layered_allows(&set(&[0, 1]), &l, false), "only SG allows");
        assert!(!layered_allows(&set(&[3]), &l, false), "only NP allows");
        assert!(!layered_allows(&set(&[]), &l, false));
        assert!(
            !layered_allows(&set(&[5]), &l, false),
            "classes of no layer"
        );
    }

    #[test]
    fn no_layer_listed_allows_everything() {
        let none = Layers::default();
        assert!(layered_allows(&set(&[]), &none, false));
        assert!(layered_allows(&set(&[]), &none, true));
        // Masks beyond `count` are not requirements.
        let one = Layers { count: 1, ..both() };
        assert!(layered_allows(&set(&[0]), &one, false));
        assert!(!layered_allows(&set(&[2]), &one, false));
    }

    #[test]
    fn the_host_skips_only_the_exempt_layer() {
        let l = both();
        // From the host the NetworkPolicies requirement is skipped, not the security groups'.
        assert!(layered_allows(&set(&[0]), &l, true));
        assert!(!layered_allows(&set(&[2]), &l, true));
        assert!(!layered_allows(&set(&[]), &l, true));
        // A NetworkPolicies-only default deny (no class at all) lets only the host in.
        let np_only = Layers {
            count: 1,
            host_exempt: 1,
            masks: [ClassSet::default(); MAX_LAYERS],
            layer_ids: [LAYER_NETWORK_POLICIES, 0],
            _pad: [0; 6],
        };
        assert!(layered_allows(&set(&[]), &np_only, true));
        assert!(!layered_allows(&set(&[]), &np_only, false));
        // A security-groups-only policy gives the host nothing.
        let sg_only = Layers {
            count: 1,
            host_exempt: 0,
            ..np_only
        };
        assert!(!layered_allows(&set(&[]), &sg_only, true));
    }

    #[test]
    fn only_networkpolicies_on_ingress_are_host_exempt() {
        assert!(host_exempt(Direction::Ingress, LAYER_NETWORK_POLICIES));
        assert!(!host_exempt(Direction::Ingress, LAYER_SECURITY_GROUPS));
        assert!(!host_exempt(Direction::Egress, LAYER_NETWORK_POLICIES));
        assert!(!host_exempt(Direction::Egress, LAYER_SECURITY_GROUPS));
        assert!(from_host(Direction::Ingress, 0));
        assert!(!from_host(Direction::Ingress, 4));
        assert!(
            !from_host(Direction::Egress, 0),
            "what the pod sends is never the host's"
        );
    }

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(core::mem::size_of::<LayersKey>(), 8);
        assert_eq!(core::mem::size_of::<Layers>(), 48);
        // Layers came without changing the conntrack entry's layout: the entry got a flag bit,
        // not a byte. The endpoint grew the pod's addresses for the source check (its map is
        // rebuilt from the agent's records on upgrade). The conntrack entry grew window tracking
        // (88 bytes; the agent migrates a 24-byte table's entries on upgrade).
        assert_eq!(core::mem::size_of::<crate::endpoint::Endpoint>(), 36);
        assert_eq!(core::mem::size_of::<crate::endpoint::CachedEndpoint>(), 44);
        assert_eq!(core::mem::size_of::<crate::source::SourceKey>(), 24);
        assert_eq!(core::mem::size_of::<crate::conntrack::CtEntry>(), 88);
    }
}
