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
        PolicyQuery {
            direction: dir as u8,
            family: pkt.family,
            proto: pkt.proto,
            remote: if dir == crate::Direction::Egress {
                pkt.dst
            } else {
                pkt.src
            },
            port: pkt.dport,
        }
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
        PolicyQuery {
            direction: dir as u8,
            family: key.family,
            proto: key.proto,
            remote: key.peer_addr,
            port,
        }
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
