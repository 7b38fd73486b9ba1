//! Compiles a [`CompiledPolicy`] into the entries of the `POLICY_PEERS` and `POLICY_PORTS` LPM
//! tries, so that the datapath decides a NEW connection with exactly two lookups whatever the
//! number of rules, peers or ports.
//!
//! Every rule of a direction becomes a *class* (a bit of a [`ClassSet`]); rules are merged where
//! that cannot change a verdict, to stay within [`MAX_CLASSES`]. The peer trie maps an address to
//! the classes whose peers contain it, the port trie maps (protocol, port) to the classes that
//! allow it, and a connection is allowed iff both lookups hit and the two sets intersect.
//!
//! The kernel trie returns the *longest* inserted prefix containing the key, so the value stored
//! for a prefix must be the exact answer for every key whose longest match it is. For a peer
//! prefix `P` that is the set of classes with a block containing `P` and no `except` of that block
//! containing `P`: inserting every `cidr` and every `except` makes this exact (an address inside
//! an `except` always finds the `except`, or something longer, first). Ports work the same way
//! with ranges decomposed into aligned power-of-two prefixes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use kubesg_common::policy::{
    ClassSet, Layers, LayersKey, PeerKey, PortKey, MAX_CLASSES, PEER_KEY_FIXED_BITS,
    PORT_KEY_FIXED_BITS,
};
use kubesg_common::{Direction, RawAddr, AF_INET, AF_INET6};

use crate::policy::{CompiledPolicy, LayersError, PeerBlock, PortMatch, Protocol, Rule};

/// The trie entries of one policy, sorted, ready to be written to the kernel maps: the datapath
/// needs nothing else to decide a NEW connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    /// `POLICY_PEERS` entries: (LPM prefix length, key, classes whose peers contain the prefix).
    pub peers: Vec<(u32, PeerKey, ClassSet)>,
    /// `POLICY_PORTS` entries: (LPM prefix length, key, classes that allow the port prefix).
    pub ports: Vec<(u32, PortKey, ClassSet)>,
    /// `POLICY_LAYERS` entries, one per direction, for a layered policy only (an unlayered
    /// policy's endpoints never read them): the classes of each required layer.
    pub layers: Vec<(LayersKey, Layers)>,
}

/// Why a policy cannot be compiled into tries. Each is refused rather than approximated, because
/// an approximation would silently widen or narrow access.
#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    /// A direction still needs more classes than a [`ClassSet`] holds after merging rules;
    /// dropping some would silently deny what the rules allow.
    #[error("{direction:?} rules need {classes} classes after merging, at most {MAX_CLASSES} fit")]
    TooManyClasses {
        /// The direction.
        direction: Direction,
        /// Classes it needs.
        classes: usize,
    },
    /// A rule on a protocol without ports ([`Protocol::Any`] or [`Protocol::Number`]) lists
    /// ports: the datapath has no port to match them against, so their meaning is unclear.
    #[error(
        "{direction:?} rule {rule}: protocol {protocol:?} has no ports but the rule lists some"
    )]
    PortsOnPortlessProtocol {
        /// The direction.
        direction: Direction,
        /// Index of the rule in its direction.
        rule: usize,
        /// The rule's protocol.
        protocol: Protocol,
    },
    /// A port range on an ICMP rule, or an ICMP type on a TCP/UDP/SCTP rule: the two encodings
    /// share the port field, so accepting it would match unrelated traffic.
    #[error("{direction:?} rule {rule}: {port:?} does not apply to protocol {protocol:?}")]
    PortKindMismatch {
        /// The direction.
        direction: Direction,
        /// Index of the rule in its direction.
        rule: usize,
        /// The rule's protocol.
        protocol: Protocol,
        /// The offending port match.
        port: PortMatch,
    },
    /// The layer lists of a layered policy cannot be enforced.
    #[error(transparent)]
    Layers(#[from] LayersError),
}

/// Compiles `policy` into the trie entries of policy `policy_id`, so that the datapath can decide
/// any NEW connection with one peer lookup and one port lookup.
///
/// The result agrees with [`CompiledPolicy::judge`] on every query. Entries are sorted
/// (direction, family or protocol, prefix) so that the output is stable across runs.
///
/// A layered policy's classes are built layer by layer (rules of different layers never share a
/// class, or a rule of one layer could stand in for the other) and its `POLICY_LAYERS` entries
/// say which classes are whose; rules of a layer the direction does not require are checked but
/// get no class.
pub fn compile(policy_id: u32, policy: &CompiledPolicy) -> Result<PolicyTables, TablesError> {
    let mut tables = PolicyTables::default();
    if policy.layered {
        policy.check_layers()?;
    }
    for direction in [Direction::Egress, Direction::Ingress] {
        let classes = if policy.layered {
            let (classes, layers) = build_layered_classes(direction, policy)?;
            tables
                .layers
                .push((LayersKey::new(policy_id, direction as u8), layers));
            classes
        } else {
            build_classes(direction, policy.rules(direction))?
        };
        push_peer_entries(policy_id, direction, &classes, &mut tables.peers);
        push_port_entries(policy_id, direction, &classes, &mut tables.ports);
    }
    Ok(tables)
}

/// The classes of a layered direction, required layer after required layer, and the layers
/// entry: requirement `i` is the `i`th layer listed, its mask the classes of its rules.
fn build_layered_classes(
    direction: Direction,
    policy: &CompiledPolicy,
) -> Result<(Vec<Class>, Layers), TablesError> {
    let rules = policy.rules(direction);
    // Every rule is validated, also those of layers the direction does not require.
    for (index, rule) in rules.iter().enumerate() {
        rule_ports(direction, index, rule)?;
    }
    let mut classes: Vec<Class> = Vec::new();
    let mut layers = Layers::default();
    let required = policy.layers(direction);
    for (slot, layer) in required.iter().enumerate() {
        let of_layer = rules.iter().enumerate().filter(|(_, r)| r.layer == *layer);
        for class in merge_by_ports(merge_by_peers(direction, of_layer)?) {
            layers.masks[slot].insert(classes.len());
            classes.push(class);
        }
        layers.layer_ids[slot] = layer.index();
        if layer.host_exempt(direction) {
            layers.host_exempt |= 1 << slot;
        }
    }
    layers.count = required.len() as u32;
    if classes.len() > MAX_CLASSES {
        return Err(TablesError::TooManyClasses {
            direction,
            classes: classes.len(),
        });
    }
    Ok((classes, layers))
}

/// Converts an address to the (family, [`RawAddr`]) pair the maps store, so that userspace keys
/// are byte-identical to what the datapath parses from packets (address bytes in wire order).
pub fn raw_addr(ip: IpAddr) -> (u8, RawAddr) {
    match ip {
        IpAddr::V4(a) => (AF_INET, [u32::from_ne_bytes(a.octets()), 0, 0, 0]),
        IpAddr::V6(a) => {
            let octets = a.octets();
            let mut words = [0u32; 4];
            for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            (AF_INET6, words)
        }
    }
}

/// The inverse of [`raw_addr`], so that addresses read back from maps and events can be shown
/// and matched against rules. Any family other than `AF_INET` reads as IPv6.
pub fn ip_of(family: u8, addr: &RawAddr) -> IpAddr {
    if family == AF_INET {
        return IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()));
    }
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(octets))
}

// ---------------------------------------------------------------------------------------------
// Address prefixes.

/// An address prefix of either family, left-aligned in 128 bits so that both families truncate
/// and nest the same way. Field order makes the derived order (family, address, length), the
/// order the entries are emitted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Prefix {
    family: u8,
    bits: u128,
    len: u8,
}

impl Prefix {
    /// The prefix of a network, host bits cleared: stored keys carry no bits beyond their prefix,
    /// so that one prefix always has one key (stable diffs, exact deletes).
    fn of(net: &IpNet) -> Self {
        let (family, bits) = match net {
            IpNet::V4(n) => (AF_INET, u128::from(u32::from(n.addr())) << 96),
            IpNet::V6(n) => (AF_INET6, u128::from(n.addr())),
        };
        Prefix {
            family,
            bits,
            len: net.prefix_len(),
        }
        .truncated(net.prefix_len())
    }

    /// The prefix of length `len` (at most `self.len`) containing this one.
    fn truncated(self, len: u8) -> Self {
        Prefix {
            bits: self.bits & high_mask(len),
            len,
            ..self
        }
    }

    /// Whether `other` lies within this prefix (same family, at least as long, same leading bits).
    fn contains(self, other: Prefix) -> bool {
        self.family == other.family
            && self.len <= other.len
            && other.truncated(self.len).bits == self.bits
    }

    /// The key of the prefix in `POLICY_PEERS`.
    fn peer_entry(self, policy_id: u32, direction: Direction) -> (u32, PeerKey) {
        let ip = if self.family == AF_INET {
            // The IPv4 address occupies the top 32 bits; the truncation keeps only them.
            IpAddr::V4(Ipv4Addr::from((self.bits >> 96) as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.bits))
        };
        let (family, addr) = raw_addr(ip);
        let key = PeerKey {
            policy_id,
            direction: direction as u8,
            family,
            _pad: [0; 2],
            addr,
        };
        (PEER_KEY_FIXED_BITS + u32::from(self.len), key)
    }
}

/// The 128-bit mask with the top `len` bits set.
fn high_mask(len: u8) -> u128 {
    match len {
        0 => 0,
        l if l >= 128 => u128::MAX,
        l => u128::MAX << (128 - u32::from(l)),
    }
}

/// A peer block reduced to what can change a verdict: truncated `cidr` and the `except`s that lie
/// strictly inside it (others can never contain an address of the block).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Block {
    cidr: Prefix,
    except: Vec<Prefix>,
}

/// Normalizes a block; `None` when an `except` covers the whole `cidr`, since the reference
/// evaluator then matches no address of the block. The kept `except`s are pairwise disjoint (one
/// inside another adds nothing), so at most one of them contains any given prefix.
fn normalize_block(block: &PeerBlock) -> Option<Block> {
    let cidr = Prefix::of(&block.cidr);
    let mut excepts: Vec<Prefix> = block.except.iter().map(Prefix::of).collect();
    if excepts.iter().any(|e| e.contains(cidr)) {
        return None;
    }
    excepts.retain(|e| cidr.contains(*e));
    // Sorted, a prefix comes right before the prefixes inside it: keep only the outermost.
    excepts.sort_unstable();
    let mut except: Vec<Prefix> = Vec::with_capacity(excepts.len());
    for e in excepts {
        if !except
            .last()
            .is_some_and(|outer: &Prefix| outer.contains(e))
        {
            except.push(e);
        }
    }
    Some(Block { cidr, except })
}

/// A rule's peers as a sorted, deduplicated list of normalized blocks, so that rules with the same
/// peers compare equal and can share a class.
fn normalize_peers(peers: &[PeerBlock]) -> Vec<Block> {
    let mut blocks: Vec<Block> = peers.iter().filter_map(normalize_block).collect();
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}

// ---------------------------------------------------------------------------------------------
// Port sets.

/// Allowed ports per protocol number as sorted, disjoint, non-adjacent inclusive intervals: a
/// canonical form, so that rules allowing the same ports compare equal and can share a class.
type PortSet = BTreeMap<u8, Vec<(u16, u16)>>;

/// Every port: what an empty port list, and a protocol without ports, allow.
const ALL_PORTS: (u16, u16) = (0, u16::MAX);

/// The port set of one rule, refusing port matches that do not fit its protocol.
fn rule_ports(direction: Direction, index: usize, rule: &Rule) -> Result<PortSet, TablesError> {
    let mut set = PortSet::new();
    match rule.protocol.number() {
        None => {
            require_no_ports(direction, index, rule)?;
            // `Any` matches every protocol number, each at every port.
            for proto in 0..=u8::MAX {
                set.insert(proto, vec![ALL_PORTS]);
            }
        }
        Some(proto) if rule.protocol.has_ports() || rule.protocol.is_icmp() => {
            let intervals = port_intervals(direction, index, rule)?;
            if !intervals.is_empty() {
                set.insert(proto, canonical_intervals(intervals));
            }
        }
        Some(proto) => {
            require_no_ports(direction, index, rule)?;
            set.insert(proto, vec![ALL_PORTS]);
        }
    }
    Ok(set)
}

/// Refuses ports on a rule whose protocol has none.
fn require_no_ports(direction: Direction, index: usize, rule: &Rule) -> Result<(), TablesError> {
    if rule.ports.is_empty() {
        Ok(())
    } else {
        Err(TablesError::PortsOnPortlessProtocol {
            direction,
            rule: index,
            protocol: rule.protocol,
        })
    }
}

/// The port intervals of a TCP/UDP/SCTP or ICMP rule (unsorted). An inverted range contributes
/// nothing, as the reference evaluator matches no port with it.
fn port_intervals(
    direction: Direction,
    index: usize,
    rule: &Rule,
) -> Result<Vec<(u16, u16)>, TablesError> {
    if rule.ports.is_empty() {
        return Ok(vec![ALL_PORTS]);
    }
    let icmp = rule.protocol.is_icmp();
    let mut intervals = Vec::with_capacity(rule.ports.len());
    for port in &rule.ports {
        match (*port, icmp) {
            (PortMatch::Range { first, last }, false) => {
                if first <= last {
                    intervals.push((first, last));
                }
            }
            (PortMatch::Icmp { icmp_type, code }, true) => {
                let base = u16::from(icmp_type) << 8;
                intervals.push(match code {
                    None => (base, base | 0xff),
                    Some(c) => (base | u16::from(c), base | u16::from(c)),
                });
            }
            _ => {
                return Err(TablesError::PortKindMismatch {
                    direction,
                    rule: index,
                    protocol: rule.protocol,
                    port: *port,
                })
            }
        }
    }
    Ok(intervals)
}

/// Sorts intervals and merges those that overlap or touch.
fn canonical_intervals(mut intervals: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    intervals.sort_unstable();
    let mut merged: Vec<(u16, u16)> = Vec::with_capacity(intervals.len());
    for (first, last) in intervals {
        match merged.last_mut() {
            // u32 so that touching at 65535 cannot overflow.
            Some(prev) if u32::from(first) <= u32::from(prev.1) + 1 => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    merged
}

/// Adds `other`'s ports to `set`.
fn union_ports(set: &mut PortSet, other: PortSet) {
    for (proto, intervals) in other {
        let entry = set.entry(proto).or_default();
        entry.extend(intervals);
        *entry = canonical_intervals(std::mem::take(entry));
    }
}

/// Decomposes `first..=last` into the minimal list of aligned power-of-two blocks, as
/// (value, prefix bits): the only shape an LPM trie can store.
fn range_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut prefixes = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last) + 1; // exclusive, u32 so that 65535 fits
    while start < end {
        // The largest block aligned at `start` (all 2^16 ports at 0)...
        let mut size: u32 = 1 << start.trailing_zeros().min(16);
        // ...that does not run past the end. Greedy is minimal for aligned blocks.
        while start + size > end {
            size >>= 1;
        }
        prefixes.push((start as u16, (16 - size.trailing_zeros()) as u8));
        start += size;
    }
    prefixes
}

// ---------------------------------------------------------------------------------------------
// Classes.

/// A set of rules that share a bit: every combination of its ports and its peers is allowed.
#[derive(Debug)]
struct Class {
    ports: PortSet,
    peers: Vec<Block>,
}

/// The classes of one direction. Two merges preserve verdicts: rules with the same peers allow the
/// union of their ports with those peers, then classes with the same ports allow the union of
/// their peers. Rules that match nobody (no peers, or no ports) get no class at all.
fn build_classes(direction: Direction, rules: &[Rule]) -> Result<Vec<Class>, TablesError> {
    let classes = merge_by_ports(merge_by_peers(direction, rules.iter().enumerate())?);
    if classes.len() > MAX_CLASSES {
        return Err(TablesError::TooManyClasses {
            direction,
            classes: classes.len(),
        });
    }
    Ok(classes)
}

/// One class per distinct peer list, allowing the union of those rules' ports. Every rule is
/// validated, including those that match nobody, so a bad rule is reported wherever it is.
fn merge_by_peers<'a>(
    direction: Direction,
    rules: impl Iterator<Item = (usize, &'a Rule)>,
) -> Result<Vec<Class>, TablesError> {
    let mut classes: Vec<Class> = Vec::new();
    let mut by_peers: HashMap<Vec<Block>, usize> = HashMap::new();
    for (index, rule) in rules {
        let ports = rule_ports(direction, index, rule)?;
        let peers = normalize_peers(&rule.peers);
        if ports.is_empty() || peers.is_empty() {
            continue;
        }
        match by_peers.get(&peers).and_then(|&c| classes.get_mut(c)) {
            Some(class) => union_ports(&mut class.ports, ports),
            None => {
                by_peers.insert(peers.clone(), classes.len());
                classes.push(Class { ports, peers });
            }
        }
    }
    Ok(classes)
}

/// One class per distinct port set, allowing the union of those classes' peers.
fn merge_by_ports(classes: Vec<Class>) -> Vec<Class> {
    let mut merged: Vec<Class> = Vec::new();
    let mut by_ports: HashMap<PortSet, usize> = HashMap::new();
    for class in classes {
        match by_ports.get(&class.ports).and_then(|&c| merged.get_mut(c)) {
            Some(existing) => existing.peers.extend(class.peers),
            None => {
                by_ports.insert(class.ports.clone(), merged.len());
                merged.push(class);
            }
        }
    }
    for class in &mut merged {
        class.peers.sort_unstable();
        class.peers.dedup();
    }
    merged
}

// ---------------------------------------------------------------------------------------------
// Peer entries.
//
// Both tries are filled by one sweep over the sorted prefixes. Sorted by (family or protocol,
// value, length), a prefix comes right before every prefix inside it, so a stack of the prefixes
// containing the current one is maintained by popping those that do not contain it: each prefix
// inherits the state of its longest containing prefix in O(1), and the whole computation costs a
// sort, never a (prefixes x blocks) product.

/// A change of the peer state at a prefix: the `cidr` of a block of `class` starts there, or an
/// `except` of one ends it. The derived order sorts by prefix first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PeerEvent {
    prefix: Prefix,
    class: usize,
    starts: bool,
}

/// For each class, how many of its blocks contain the current prefix (not cut by an `except`):
/// counts, not bits, because a class may still match through another block after an `except`.
type BlockCounts = [u32; MAX_CLASSES];

/// The events of every block of every class.
fn peer_events(classes: &[Class]) -> Vec<PeerEvent> {
    let mut events = Vec::new();
    for (class, c) in classes.iter().enumerate() {
        for block in &c.peers {
            events.push(PeerEvent {
                prefix: block.cidr,
                class,
                starts: true,
            });
            events.extend(block.except.iter().map(|&prefix| PeerEvent {
                prefix,
                class,
                starts: false,
            }));
        }
    }
    events.sort_unstable();
    events
}

/// Applies the events at one prefix to the counts inherited from its containing prefix. An
/// `except` always lies strictly inside its block's `cidr`, and the block's `except`s are disjoint,
/// so it cancels exactly one count added at a containing prefix.
fn apply_peer_events(counts: &mut BlockCounts, events: &[PeerEvent]) {
    for event in events {
        if let Some(count) = counts.get_mut(event.class) {
            *count = if event.starts {
                count.saturating_add(1)
            } else {
                count.saturating_sub(1)
            };
        }
    }
}

/// The classes with at least one block containing the prefix.
fn class_set(counts: &BlockCounts) -> ClassSet {
    let mut set = ClassSet::default();
    for (class, _) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
        set.insert(class);
    }
    set
}

/// Appends the `POLICY_PEERS` entries of one direction: one per distinct `cidr` or `except`.
fn push_peer_entries(
    policy_id: u32,
    direction: Direction,
    classes: &[Class],
    out: &mut Vec<(u32, PeerKey, ClassSet)>,
) {
    let events = peer_events(classes);
    let mut stack: Vec<(Prefix, BlockCounts)> = Vec::new();
    for group in events.chunk_by(|a, b| a.prefix == b.prefix) {
        let Some(prefix) = group.first().map(|e| e.prefix) else {
            continue;
        };
        while stack.last().is_some_and(|(top, _)| !top.contains(prefix)) {
            stack.pop();
        }
        let mut counts = stack.last().map_or([0; MAX_CLASSES], |(_, c)| *c);
        apply_peer_events(&mut counts, group);
        // Inserted even when empty: it shadows the shorter prefixes an `except` cuts out of.
        let (len, key) = prefix.peer_entry(policy_id, direction);
        out.push((len, key, class_set(&counts)));
        stack.push((prefix, counts));
    }
}

// ---------------------------------------------------------------------------------------------
// Port entries.

/// A port prefix of one protocol. Field order makes the derived order (protocol, port, length),
/// the order the sweep needs and the entries are emitted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PortPrefix {
    proto: u8,
    value: u16,
    len: u8,
}

impl PortPrefix {
    /// Whether `other` lies within this prefix (same protocol, at least as long, same leading
    /// bits).
    fn contains(self, other: PortPrefix) -> bool {
        let mask = match self.len {
            0 => 0,
            l => u16::MAX << (16 - u32::from(l.min(16))),
        };
        self.proto == other.proto && self.len <= other.len && other.value & mask == self.value
    }
}

/// Every (port prefix, class) pair of the classes' port sets, sorted.
fn port_events(classes: &[Class]) -> Vec<(PortPrefix, usize)> {
    let mut events = Vec::new();
    for (class, c) in classes.iter().enumerate() {
        for (&proto, intervals) in &c.ports {
            for &(first, last) in intervals {
                events.extend(
                    range_prefixes(first, last)
                        .into_iter()
                        .map(|(value, len)| (PortPrefix { proto, value, len }, class)),
                );
            }
        }
    }
    events.sort_unstable();
    events
}

/// Appends the `POLICY_PORTS` entries of one direction: one per distinct port prefix of each
/// protocol, valued with the classes of every prefix containing it (ports only ever add classes).
fn push_port_entries(
    policy_id: u32,
    direction: Direction,
    classes: &[Class],
    out: &mut Vec<(u32, PortKey, ClassSet)>,
) {
    let events = port_events(classes);
    let mut stack: Vec<(PortPrefix, ClassSet)> = Vec::new();
    for group in events.chunk_by(|a, b| a.0 == b.0) {
        let Some(prefix) = group.first().map(|e| e.0) else {
            continue;
        };
        while stack.last().is_some_and(|(top, _)| !top.contains(prefix)) {
            stack.pop();
        }
        let mut value = stack.last().map_or(ClassSet::default(), |(_, v)| *v);
        for &(_, class) in group {
            value.insert(class);
        }
        let key = PortKey {
            policy_id,
            direction: direction as u8,
            proto: prefix.proto,
            port: prefix.value.to_be_bytes(),
        };
        out.push((PORT_KEY_FIXED_BITS + u32::from(prefix.len), key, value));
        stack.push((prefix, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Layer;
    use kubesg_common::policy::{layered_allows, PolicyQuery};
    use kubesg_common::proto;
    use proptest::prelude::*;

    // -- A simulator of the kernel LPM trie lookups the datapath does. --

    /// A `POLICY_PEERS` key as the bytes the kernel compares.
    fn peer_key_bytes(k: &PeerKey) -> Vec<u8> {
        let mut b = k.policy_id.to_ne_bytes().to_vec();
        b.extend([k.direction, k.family]);
        b.extend(k._pad);
        for w in k.addr {
            b.extend(w.to_ne_bytes());
        }
        b
    }

    /// A `POLICY_PORTS` key as the bytes the kernel compares.
    fn port_key_bytes(k: &PortKey) -> Vec<u8> {
        let mut b = k.policy_id.to_ne_bytes().to_vec();
        b.extend([k.direction, k.proto]);
        b.extend(k.port);
        b
    }

    /// Whether the first `bits` bits (most significant first in each byte) agree.
    fn same_leading_bits(a: &[u8], b: &[u8], bits: u32) -> bool {
        let whole = (bits / 8) as usize;
        if a[..whole] != b[..whole] {
            return false;
        }
        let rest = bits % 8;
        rest == 0 || (a[whole] ^ b[whole]) & (0xffu8 << (8 - rest)) == 0
    }

    /// A trie as the kernel would hold it: keys as bytes.
    struct Trie(Vec<(u32, Vec<u8>, ClassSet)>);

    impl Trie {
        fn new<K>(entries: &[(u32, K, ClassSet)], bytes: impl Fn(&K) -> Vec<u8>) -> Self {
            Trie(entries.iter().map(|(l, k, v)| (*l, bytes(k), *v)).collect())
        }

        /// Longest-prefix match, like `bpf_map_lookup_elem` on an LPM trie.
        fn lookup(&self, len: u32, key: &[u8]) -> Option<ClassSet> {
            self.0
                .iter()
                .filter(|(l, k, _)| *l <= len && same_leading_bits(k, key, *l))
                .max_by_key(|(l, _, _)| *l)
                .map(|(_, _, v)| *v)
        }
    }

    /// What the datapath decides: two lookups, allowed iff both hit and intersect; for a
    /// layered policy (`layered`, the endpoint flag), the classes judged by its layers entry.
    struct Datapath {
        policy_id: u32,
        peers: Trie,
        ports: Trie,
        layered: bool,
        layers: Vec<(LayersKey, Layers)>,
    }

    impl Datapath {
        fn new(policy_id: u32, tables: &PolicyTables) -> Self {
            Datapath {
                policy_id,
                peers: Trie::new(&tables.peers, peer_key_bytes),
                ports: Trie::new(&tables.ports, port_key_bytes),
                layered: !tables.layers.is_empty(),
                layers: tables.layers.clone(),
            }
        }

        fn allows(&self, dir: Direction, proto: u8, port: u16, remote: IpAddr) -> bool {
            self.allows_from(dir, proto, port, remote, false)
        }

        fn allows_from(
            &self,
            dir: Direction,
            proto: u8,
            port: u16,
            remote: IpAddr,
            from_host: bool,
        ) -> bool {
            let (family, remote) = raw_addr(remote);
            let q = PolicyQuery {
                direction: dir as u8,
                family,
                proto,
                remote,
                port,
            };
            let (plen, pkey) = q.peer_key(self.policy_id);
            let (tlen, tkey) = q.port_key(self.policy_id);
            let peers = self.peers.lookup(plen, &peer_key_bytes(&pkey));
            let ports = self.ports.lookup(tlen, &port_key_bytes(&tkey));
            if !self.layered {
                return match (peers, ports) {
                    (Some(a), Some(b)) => a.intersects(&b),
                    _ => false,
                };
            }
            let key = LayersKey::new(self.policy_id, dir as u8);
            let Some((_, layers)) = self.layers.iter().find(|(k, _)| *k == key) else {
                return false;
            };
            let classes = match (peers, ports) {
                (Some(a), Some(b)) => a.and(&b),
                _ => ClassSet::default(),
            };
            let from_host = kubesg_common::policy::from_host(dir, if from_host { 0 } else { 9 });
            layered_allows(&classes, layers, from_host)
        }
    }

    fn datapath(policy: &CompiledPolicy) -> Datapath {
        let tables = match compile(7, policy) {
            Ok(t) => t,
            Err(e) => panic!("compile failed: {e}"),
        };
        Datapath::new(7, &tables)
    }

    // -- Helpers to write policies. --

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn block(cidr: &str, except: &[&str]) -> PeerBlock {
        PeerBlock {
            cidr: net(cidr),
            except: except.iter().map(|e| net(e)).collect(),
        }
    }

    fn rule(protocol: Protocol, ports: Vec<PortMatch>, peers: Vec<PeerBlock>) -> Rule {
        Rule {
            protocol,
            ports,
            peers,
            origin: String::new(),
            layer: Layer::SecurityGroups,
        }
    }

    fn range(first: u16, last: u16) -> PortMatch {
        PortMatch::Range { first, last }
    }

    fn ingress(rules: Vec<Rule>) -> CompiledPolicy {
        CompiledPolicy {
            ingress: rules,
            ..CompiledPolicy::default()
        }
    }

    /// Asserts the datapath and the reference agree, and returns the verdict.
    fn verdict(p: &CompiledPolicy, dir: Direction, proto: u8, port: u16, remote: &str) -> bool {
        let dp = datapath(p);
        let remote = ip(remote);
        let reference = p.allows(dir, proto, port, remote, false);
        assert_eq!(dp.allows(dir, proto, port, remote), reference);
        reference
    }

    // -- Unit tests. --

    #[test]
    fn except_block_inside_cidr_is_denied() {
        let p = ingress(vec![rule(
            Protocol::Tcp,
            vec![],
            vec![block("10.0.0.0/8", &["10.1.0.0/16", "10.1.2.0/24"])],
        )]);
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.2.0.1"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.0.1"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.2.3"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "11.0.0.1"));
    }

    #[test]
    fn except_cut_from_one_rule_is_still_allowed_by_another() {
        let p = ingress(vec![
            rule(
                Protocol::Tcp,
                vec![],
                vec![block("10.0.0.0/8", &["10.1.0.0/16"])],
            ),
            rule(
                Protocol::Tcp,
                vec![range(80, 80)],
                vec![block("10.1.2.0/24", &[])],
            ),
        ]);
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.2.3"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 81, "10.1.2.3"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.3.3"));
    }

    #[test]
    fn except_cut_from_one_block_is_still_allowed_by_another_block_of_the_rule() {
        let p = ingress(vec![rule(
            Protocol::Tcp,
            vec![],
            vec![
                block("10.0.0.0/8", &["10.1.0.0/16"]),
                block("10.0.0.0/8", &["10.2.0.0/16"]),
            ],
        )]);
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.0.1"));
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.2.0.1"));
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.3.0.1"));
    }

    #[test]
    fn nested_excepts_of_one_block_cut_it_only_once() {
        // The second block allows 10.1.2.0/23 again: the nested excepts of the first must not
        // also cancel it.
        let p = ingress(vec![rule(
            Protocol::Tcp,
            vec![],
            vec![
                block("10.0.0.0/8", &["10.1.2.0/24", "10.1.0.0/16", "10.1.2.3/32"]),
                block("10.1.2.0/23", &[]),
            ],
        )]);
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.2.3"));
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.2.4"));
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.3.4"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.4.4"));
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.2.0.1"));
    }

    #[test]
    fn except_covering_the_whole_cidr_empties_the_block() {
        let p = ingress(vec![rule(
            Protocol::Tcp,
            vec![],
            vec![block("10.1.0.0/16", &["10.0.0.0/8"])],
        )]);
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "10.1.0.1"));
        assert!(compile(1, &p).unwrap().peers.is_empty());
    }

    #[test]
    fn except_outside_cidr_or_of_other_family_is_not_inserted() {
        let p = ingress(vec![rule(
            Protocol::Tcp,
            vec![],
            vec![block("10.0.0.0/8", &["192.168.0.0/16", "fd00::/8"])],
        )]);
        let tables = compile(1, &p).unwrap();
        assert_eq!(tables.peers.len(), 1);
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.0.0.1"));
        assert!(!verdict(
            &p,
            Direction::Ingress,
            proto::TCP,
            80,
            "192.168.0.1"
        ));
    }

    #[test]
    fn ipv6_block_does_not_match_ipv4_address() {
        // ::/0 and ::ffff:0:0/96 contain every IPv4 address once mapped, but only IPv6 matches.
        let p = ingress(vec![rule(
            Protocol::Any,
            vec![],
            vec![block("::/0", &[]), block("::ffff:0:0/96", &[])],
        )]);
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "10.0.0.1"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "0.0.0.0"));
        assert!(verdict(
            &p,
            Direction::Ingress,
            proto::TCP,
            80,
            "::ffff:10.0.0.1"
        ));
        assert!(verdict(
            &p,
            Direction::Ingress,
            proto::TCP,
            80,
            "2001:db8::1"
        ));
    }

    #[test]
    fn ipv4_block_does_not_match_ipv6_address() {
        let p = ingress(vec![rule(
            Protocol::Any,
            vec![],
            vec![block("0.0.0.0/0", &[])],
        )]);
        assert!(verdict(&p, Direction::Ingress, proto::UDP, 53, "1.2.3.4"));
        assert!(!verdict(&p, Direction::Ingress, proto::UDP, 53, "::"));
        assert!(!verdict(
            &p,
            Direction::Ingress,
            proto::UDP,
            53,
            "::ffff:1.2.3.4"
        ));
    }

    #[test]
    fn rules_of_one_direction_do_not_apply_to_the_other() {
        let p = ingress(vec![rule(
            Protocol::Any,
            vec![],
            vec![block("0.0.0.0/0", &[])],
        )]);
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "1.2.3.4"));
        assert!(!verdict(&p, Direction::Egress, proto::TCP, 80, "1.2.3.4"));
    }

    #[test]
    fn port_range_decomposes_to_minimal_prefixes() {
        assert_eq!(range_prefixes(1, 65535).len(), 16);
        assert_eq!(range_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(range_prefixes(65535, 65535), vec![(65535, 16)]);
        // 8000 = 0x1f40: /10 covers 8000..=8063, /11 8064..=8095, /14 8096..=8099, /16 8100.
        assert_eq!(
            range_prefixes(8000, 8100),
            vec![(8000, 10), (8064, 11), (8096, 14), (8100, 16)]
        );
        assert_eq!(range_prefixes(0, 32767), vec![(0, 1)]);
        assert_eq!(range_prefixes(32768, 65535), vec![(32768, 1)]);
    }

    #[test]
    fn port_range_entries_cover_exactly_the_range() {
        let p = ingress(vec![rule(
            Protocol::Tcp,
            vec![range(8000, 8100)],
            vec![block("0.0.0.0/0", &[])],
        )]);
        let dp = datapath(&p);
        for port in 0..=u16::MAX {
            let want = (8000..=8100).contains(&port);
            assert_eq!(
                dp.allows(Direction::Ingress, proto::TCP, port, ip("1.1.1.1")),
                want
            );
        }
        let lens: Vec<u32> = compile(1, &p).unwrap().ports.iter().map(|e| e.0).collect();
        assert_eq!(lens, vec![48 + 10, 48 + 11, 48 + 14, 48 + 16]);
    }

    #[test]
    fn inverted_port_range_matches_nothing() {
        let p = ingress(vec![rule(
            Protocol::Udp,
            vec![range(100, 10)],
            vec![block("0.0.0.0/0", &[])],
        )]);
        assert!(!verdict(&p, Direction::Ingress, proto::UDP, 50, "1.1.1.1"));
        assert!(!verdict(&p, Direction::Ingress, proto::UDP, 100, "1.1.1.1"));
    }

    #[test]
    fn icmp_type_without_code_matches_every_code() {
        let p = ingress(vec![rule(
            Protocol::Icmp,
            vec![
                PortMatch::Icmp {
                    icmp_type: 3,
                    code: None,
                },
                PortMatch::Icmp {
                    icmp_type: 8,
                    code: Some(0),
                },
            ],
            vec![block("0.0.0.0/0", &[])],
        )]);
        let dp = datapath(&p);
        for code in 0..=u8::MAX {
            let any_code = dp.allows(
                Direction::Ingress,
                proto::ICMP,
                3 << 8 | u16::from(code),
                ip("1.1.1.1"),
            );
            assert!(any_code, "type 3 code {code}");
            let echo = dp.allows(
                Direction::Ingress,
                proto::ICMP,
                8 << 8 | u16::from(code),
                ip("1.1.1.1"),
            );
            assert_eq!(echo, code == 0, "type 8 code {code}");
        }
        assert!(!verdict(
            &p,
            Direction::Ingress,
            proto::ICMP,
            4 << 8,
            "1.1.1.1"
        ));
        assert!(!verdict(
            &p,
            Direction::Ingress,
            proto::ICMPV6,
            3 << 8,
            "1.1.1.1"
        ));
    }

    #[test]
    fn any_protocol_rule_matches_every_protocol_and_port() {
        let p = ingress(vec![
            rule(Protocol::Any, vec![], vec![block("10.0.0.0/8", &[])]),
            rule(
                Protocol::Tcp,
                vec![range(22, 22)],
                vec![block("0.0.0.0/0", &[])],
            ),
        ]);
        let dp = datapath(&p);
        for proto in 0..=u8::MAX {
            for port in [0, 1, 22, 80, 8080, 65535] {
                assert!(dp.allows(Direction::Ingress, proto, port, ip("10.9.9.9")));
            }
        }
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 22, "8.8.8.8"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 23, "8.8.8.8"));
        assert!(!verdict(&p, Direction::Ingress, proto::UDP, 22, "8.8.8.8"));
    }

    #[test]
    fn protocol_number_rule_matches_that_protocol_only() {
        let p = ingress(vec![rule(
            Protocol::Number(47),
            vec![],
            vec![block("0.0.0.0/0", &[])],
        )]);
        assert!(verdict(&p, Direction::Ingress, 47, 0, "1.1.1.1"));
        assert!(!verdict(&p, Direction::Ingress, 48, 0, "1.1.1.1"));
    }

    #[test]
    fn rule_without_peers_matches_nobody() {
        let p = ingress(vec![rule(Protocol::Any, vec![], vec![])]);
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "1.1.1.1"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 80, "::1"));
        let tables = compile(1, &p).unwrap();
        assert!(tables.peers.is_empty());
        assert!(tables.ports.is_empty());
    }

    #[test]
    fn too_many_classes_is_an_error() {
        let distinct: Vec<Rule> = (0..=MAX_CLASSES as u16)
            .map(|i| {
                let cidr = format!("10.0.{}.{}/32", i / 256, i % 256);
                rule(Protocol::Tcp, vec![range(i, i)], vec![block(&cidr, &[])])
            })
            .collect();
        let p = CompiledPolicy {
            egress: distinct,
            ..CompiledPolicy::default()
        };
        match compile(1, &p) {
            Err(TablesError::TooManyClasses { direction, classes }) => {
                assert_eq!(direction, Direction::Egress);
                assert_eq!(classes, MAX_CLASSES + 1);
            }
            other => panic!("expected TooManyClasses, got {other:?}"),
        }
    }

    #[test]
    fn rules_sharing_peers_or_ports_share_classes() {
        // 200 rules with distinct ports but one peer list, and 200 with one port but distinct
        // peers, merge into two classes.
        let mut rules: Vec<Rule> = (0..200)
            .map(|i| {
                rule(
                    Protocol::Udp,
                    vec![range(i, i)],
                    vec![block("10.0.0.0/8", &[])],
                )
            })
            .collect();
        rules.extend((0..200).map(|i| {
            let cidr = format!("192.168.{i}.0/24");
            rule(
                Protocol::Tcp,
                vec![range(443, 443)],
                vec![block(&cidr, &[])],
            )
        }));
        let p = ingress(rules);
        let tables = compile(1, &p).unwrap();
        let classes = tables
            .peers
            .iter()
            .fold(ClassSet::default(), |acc, (_, _, v)| ClassSet {
                bits: [acc.bits[0] | v.bits[0], acc.bits[1] | v.bits[1]],
            });
        assert_eq!(classes.bits, [0b11, 0]);
        assert!(verdict(&p, Direction::Ingress, proto::UDP, 199, "10.1.1.1"));
        assert!(!verdict(
            &p,
            Direction::Ingress,
            proto::UDP,
            200,
            "10.1.1.1"
        ));
        assert!(verdict(
            &p,
            Direction::Ingress,
            proto::TCP,
            443,
            "192.168.199.1"
        ));
        assert!(!verdict(
            &p,
            Direction::Ingress,
            proto::TCP,
            443,
            "10.1.1.1"
        ));
        assert!(!verdict(
            &p,
            Direction::Ingress,
            proto::UDP,
            5,
            "192.168.1.1"
        ));
    }

    #[test]
    fn overlapping_rules_union_their_classes() {
        let p = ingress(vec![
            rule(
                Protocol::Tcp,
                vec![range(80, 90)],
                vec![block("10.0.0.0/8", &[])],
            ),
            rule(
                Protocol::Tcp,
                vec![range(85, 100)],
                vec![block("10.1.0.0/16", &[])],
            ),
        ]);
        let tables = compile(1, &p).unwrap();
        // 85/16 (second rule) lies inside 80/13 (first rule): its entry carries both classes.
        let port_85 = tables
            .ports
            .iter()
            .find(|(len, k, _)| *len == 64 && k.port == 85u16.to_be_bytes());
        assert_eq!(port_85.map(|(_, _, v)| v.bits), Some([0b11, 0]));
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 85, "10.1.0.1"));
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 95, "10.1.0.1"));
        assert!(!verdict(&p, Direction::Ingress, proto::TCP, 95, "10.2.0.1"));
        assert!(verdict(&p, Direction::Ingress, proto::TCP, 80, "10.2.0.1"));
        // The /16 entry carries both classes: an address in it matches either rule.
        let inner = tables.peers.iter().find(|(len, _, _)| *len == 64 + 16);
        assert_eq!(inner.map(|(_, _, v)| v.bits), Some([0b11, 0]));
    }

    #[test]
    fn ports_on_portless_protocol_is_an_error() {
        for protocol in [Protocol::Any, Protocol::Number(47)] {
            let p = ingress(vec![rule(protocol, vec![range(1, 2)], vec![])]);
            assert!(matches!(
                compile(1, &p),
                Err(TablesError::PortsOnPortlessProtocol { rule: 0, .. })
            ));
        }
    }

    #[test]
    fn port_kind_mismatch_is_an_error() {
        let icmp = PortMatch::Icmp {
            icmp_type: 8,
            code: None,
        };
        for (protocol, port) in [
            (Protocol::Tcp, icmp),
            (Protocol::Sctp, icmp),
            (Protocol::Icmp, range(1, 2)),
            (Protocol::Icmpv6, range(1, 2)),
        ] {
            let p = ingress(vec![rule(protocol, vec![port], vec![])]);
            assert!(matches!(
                compile(1, &p),
                Err(TablesError::PortKindMismatch { rule: 0, .. })
            ));
        }
    }

    #[test]
    fn raw_addr_is_wire_order_and_ip_of_inverts_it() {
        for s in [
            "1.2.3.4",
            "255.0.0.1",
            "2001:db8::1:2",
            "::ffff:1.2.3.4",
            "::",
        ] {
            let a = ip(s);
            let (family, raw) = raw_addr(a);
            let bytes: Vec<u8> = raw.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let wire: Vec<u8> = match a {
                IpAddr::V4(v4) => {
                    assert_eq!(family, AF_INET);
                    v4.octets().into_iter().chain([0; 12]).collect()
                }
                IpAddr::V6(v6) => {
                    assert_eq!(family, AF_INET6);
                    v6.octets().to_vec()
                }
            };
            assert_eq!(bytes, wire);
            assert_eq!(ip_of(family, &raw), a);
        }
    }

    #[test]
    fn stored_keys_are_truncated_to_their_prefix() {
        let p = ingress(vec![rule(
            Protocol::Tcp,
            vec![range(1000, 2000)],
            vec![
                block("10.1.2.3/8", &["10.1.2.3/20"]),
                block("2001:db8::ff/33", &[]),
            ],
        )]);
        let tables = compile(1, &p).unwrap();
        assert_eq!(tables.peers.len(), 3);
        assert_no_bits_beyond_prefix(&tables);
        let v4 = tables.peers.iter().find(|(len, _, _)| *len == 64 + 8);
        assert_eq!(
            v4.map(|(_, k, _)| ip_of(k.family, &k.addr)),
            Some(ip("10.0.0.0"))
        );
    }

    fn assert_no_bits_beyond_prefix(tables: &PolicyTables) {
        for (len, key, _) in &tables.peers {
            let bytes = peer_key_bytes(key);
            for i in *len as usize..bytes.len() * 8 {
                assert_eq!(
                    bytes[i / 8] >> (7 - i % 8) & 1,
                    0,
                    "bit {i} of {key:?}/{len}"
                );
            }
        }
        for (len, key, _) in &tables.ports {
            let bytes = port_key_bytes(key);
            for i in *len as usize..bytes.len() * 8 {
                assert_eq!(
                    bytes[i / 8] >> (7 - i % 8) & 1,
                    0,
                    "bit {i} of {key:?}/{len}"
                );
            }
        }
    }

    #[test]
    fn a_hundred_thousand_peers_compile_to_a_hundred_thousand_entries() {
        let peers: Vec<PeerBlock> = (0..100_000u32)
            .map(|i| PeerBlock::cidr(IpNet::from(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))))
            .collect();
        let ports: Vec<PortMatch> = (0..1_000u16).map(|i| range(i * 60, i * 60 + 37)).collect();
        let p = ingress(vec![rule(Protocol::Tcp, ports, peers)]);
        let tables = compile(1, &p).unwrap();
        assert_eq!(tables.peers.len(), 100_000);
        assert!(tables
            .peers
            .iter()
            .all(|(len, _, v)| *len == 96 && v.bits == [1, 0]));
        assert!(!tables.ports.is_empty());
    }

    #[test]
    fn output_is_sorted_and_has_no_duplicate_keys() {
        let p = CompiledPolicy {
            ingress: vec![rule(
                Protocol::Tcp,
                vec![range(10, 20), range(15, 300)],
                vec![
                    block("10.0.0.0/8", &["10.1.0.0/16"]),
                    block("fd00::/8", &[]),
                ],
            )],
            egress: vec![rule(Protocol::Any, vec![], vec![block("0.0.0.0/0", &[])])],
            ..CompiledPolicy::default()
        };
        let a = compile(3, &p).unwrap();
        assert_eq!(a, compile(3, &p).unwrap());
        assert_unique_keys(&a);
        let dirs: Vec<u8> = a.peers.iter().map(|(_, k, _)| k.direction).collect();
        assert!(dirs.windows(2).all(|w| w[0] <= w[1]));
    }

    fn assert_unique_keys(tables: &PolicyTables) {
        let mut peers: Vec<(u32, Vec<u8>)> = tables
            .peers
            .iter()
            .map(|(l, k, _)| (*l, peer_key_bytes(k)))
            .collect();
        let n = peers.len();
        peers.sort();
        peers.dedup();
        assert_eq!(peers.len(), n, "duplicate peer keys");
        let mut ports: Vec<(u32, Vec<u8>)> = tables
            .ports
            .iter()
            .map(|(l, k, _)| (*l, port_key_bytes(k)))
            .collect();
        let n = ports.len();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), n, "duplicate port keys");
    }

    // -- Layers. --

    fn in_layer(layer: Layer, r: Rule) -> Rule {
        Rule { layer, ..r }
    }

    fn layered_ingress(rules: Vec<Rule>, layers: Vec<Layer>) -> CompiledPolicy {
        CompiledPolicy {
            ingress: rules,
            layered: true,
            ingress_layers: layers,
            ..CompiledPolicy::default()
        }
    }

    fn layers_of(t: &PolicyTables, dir: Direction) -> Layers {
        t.layers
            .iter()
            .find(|(k, _)| k.direction == dir as u8)
            .map(|(_, l)| *l)
            .expect("a layers entry for the direction")
    }

    #[test]
    fn rules_of_different_layers_never_share_a_class() {
        use Layer::{NetworkPolicies as Np, SecurityGroups as Sg};
        // Same peers (the by-peers merge) and same ports (the by-ports merge) in both layers.
        let r = || {
            rule(
                Protocol::Tcp,
                vec![range(80, 80)],
                vec![block("10.0.0.0/8", &[])],
            )
        };
        let p = layered_ingress(vec![in_layer(Sg, r()), in_layer(Np, r())], vec![Sg, Np]);
        let t = compile(5, &p).unwrap();
        let l = layers_of(&t, Direction::Ingress);
        assert_eq!(l.count, 2);
        assert_eq!(l.layer_ids, [0, 1]);
        assert_eq!(l.masks[0], set(&[0]), "the security groups' rule");
        assert_eq!(
            l.masks[1],
            set(&[1]),
            "the NetworkPolicy's rule, a class of its own"
        );
        // Unlayered, the same two rules are one class.
        let flat = compile(5, &ingress(vec![r(), r()])).unwrap();
        assert!(
            flat.layers.is_empty(),
            "no layers entry for an unlayered policy"
        );
        assert!(flat.ports.iter().all(|(_, _, c)| *c == set(&[0])));
        // Within a layer rules still merge.
        let p = layered_ingress(vec![in_layer(Np, r()), in_layer(Np, r())], vec![Np]);
        let l = layers_of(&compile(5, &p).unwrap(), Direction::Ingress);
        assert_eq!(l.masks[0], set(&[0]));
    }

    #[test]
    fn masks_follow_the_listed_order_and_only_ingress_networkpolicies_are_host_exempt() {
        use Layer::{NetworkPolicies as Np, SecurityGroups as Sg};
        let sg = in_layer(
            Sg,
            rule(
                Protocol::Tcp,
                vec![range(22, 22)],
                vec![block("10.0.0.0/8", &[])],
            ),
        );
        let np = |p| {
            in_layer(
                Np,
                rule(
                    Protocol::Udp,
                    vec![range(p, p)],
                    vec![block("10.0.0.0/8", &[])],
                ),
            )
        };
        let p = CompiledPolicy {
            ingress: vec![np(53), sg.clone(), np(54)],
            egress: vec![sg.clone(), np(53)],
            layered: true,
            ingress_layers: vec![Np, Sg],
            egress_layers: vec![Np, Sg],
            ..CompiledPolicy::default()
        };
        let t = compile(5, &p).unwrap();
        let i = layers_of(&t, Direction::Ingress);
        assert_eq!(i.layer_ids, [1, 0]);
        // The two NetworkPolicy rules share their peers: one class, within their layer.
        assert_eq!(i.masks, [set(&[0]), set(&[1])]);
        assert_eq!(
            i.host_exempt, 0b01,
            "ingress: the NetworkPolicies requirement (slot 0)"
        );
        let e = layers_of(&t, Direction::Egress);
        assert_eq!(e.masks, [set(&[0]), set(&[1])]);
        assert_eq!(e.host_exempt, 0, "nothing is exempt on egress");
        // A direction with no layer listed requires nothing, and a rule of a layer not listed
        // gets no class.
        let p = CompiledPolicy {
            ingress: vec![sg.clone()],
            egress: vec![np(53)],
            layered: true,
            ingress_layers: vec![Np],
            ..CompiledPolicy::default()
        };
        let t = compile(5, &p).unwrap();
        let i = layers_of(&t, Direction::Ingress);
        assert_eq!((i.count, i.masks[0]), (1, ClassSet::default()));
        assert!(t.ports.is_empty() && t.peers.is_empty(), "{t:?}");
        assert_eq!(layers_of(&t, Direction::Egress).count, 0);
        let dp = Datapath::new(5, &t);
        assert!(!dp.allows_from(Direction::Ingress, proto::TCP, 22, ip("10.0.0.1"), false));
        assert!(dp.allows_from(Direction::Ingress, proto::TCP, 22, ip("10.0.0.1"), true));
        assert!(dp.allows_from(Direction::Egress, proto::UDP, 99, ip("192.0.2.1"), false));
    }

    #[test]
    fn a_layer_listed_twice_or_three_layers_are_refused() {
        use Layer::{NetworkPolicies as Np, SecurityGroups as Sg};
        for layers in [vec![Sg, Sg], vec![Np, Sg, Np]] {
            let p = layered_ingress(vec![], layers);
            assert!(
                matches!(compile(1, &p), Err(TablesError::Layers(_))),
                "{p:?}"
            );
        }
    }

    fn set(classes: &[usize]) -> ClassSet {
        let mut s = ClassSet::default();
        for c in classes {
            s.insert(*c);
        }
        s
    }

    // -- Property test: the two lookups agree with the reference evaluator. --

    /// IPv4 bases that nest and overlap, so blocks and queries collide often.
    const POOL4: [u32; 6] = [
        0x0a00_0000, // 10.0.0.0
        0x0a00_0100, // 10.0.1.0
        0x0a01_0000, // 10.1.0.0
        0xc0a8_0101, // 192.168.1.1
        0x0000_0000,
        0xffff_ffff,
    ];
    /// IPv6 bases, including the IPv4-mapped range.
    const POOL6: [u128; 5] = [
        0x2001_0db8_0000_0000_0000_0000_0000_0000,
        0x2001_0db8_0000_0001_0000_0000_0000_0000,
        0x0000_0000_0000_0000_0000_ffff_0a00_0000,
        0,
        u128::MAX,
    ];

    fn arb_v4() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            4 => (prop::sample::select(&POOL4[..]), 0u32..512)
                .prop_map(|(base, low)| IpAddr::V4(Ipv4Addr::from(base ^ low))),
            1 => any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        ]
    }

    fn arb_v6() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            4 => (prop::sample::select(&POOL6[..]), 0u128..512)
                .prop_map(|(base, low)| IpAddr::V6(Ipv6Addr::from(base ^ low))),
            1 => any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        ]
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![arb_v4(), arb_v6()]
    }

    /// A network around `ip` with a prefix length biased to nest with the others.
    fn net_of(ip: IpAddr, len_seed: u8) -> IpNet {
        const LENS4: [u8; 12] = [0, 1, 8, 16, 22, 23, 24, 25, 28, 30, 31, 32];
        const LENS6: [u8; 12] = [0, 1, 32, 64, 96, 104, 112, 118, 119, 120, 127, 128];
        let i = usize::from(len_seed) % LENS4.len();
        let (lens, max) = match ip {
            IpAddr::V4(_) => (LENS4, 32),
            IpAddr::V6(_) => (LENS6, 128),
        };
        // Half the time a length from the list, otherwise any.
        let len = if len_seed >= 128 {
            lens[i]
        } else {
            len_seed % (max + 1)
        };
        IpNet::new(ip, len).unwrap()
    }

    /// An `except`: usually inside the cidr, sometimes anywhere (outside, containing it, other
    /// family) to exercise the excepts the compiler must skip or honour.
    fn except_of(cidr: IpNet, seed: (bool, IpAddr, u8, u8)) -> IpNet {
        let (inside, other, extra, len_seed) = seed;
        if !inside {
            return net_of(other, len_seed);
        }
        let max = cidr.max_prefix_len();
        let len = (cidr.prefix_len() + extra % 9).min(max);
        // The cidr's network with the low bits of `other` below the cidr's prefix.
        let addr = match (cidr.network(), cidr.hostmask(), other) {
            (IpAddr::V4(n), IpAddr::V4(h), IpAddr::V4(o)) => {
                IpAddr::V4(Ipv4Addr::from(u32::from(n) | (u32::from(o) & u32::from(h))))
            }
            (IpAddr::V6(n), IpAddr::V6(h), IpAddr::V6(o)) => IpAddr::V6(Ipv6Addr::from(
                u128::from(n) | (u128::from(o) & u128::from(h)),
            )),
            (n, _, _) => n,
        };
        IpNet::new(addr, len).unwrap()
    }

    fn arb_block() -> impl Strategy<Value = PeerBlock> {
        let except = (
            prop::bool::weighted(0.8),
            arb_ip(),
            any::<u8>(),
            any::<u8>(),
        );
        (arb_ip(), any::<u8>(), prop::collection::vec(except, 0..3)).prop_map(
            |(ip, len_seed, excepts)| {
                let cidr = net_of(ip, len_seed);
                PeerBlock {
                    cidr,
                    except: excepts.into_iter().map(|e| except_of(cidr, e)).collect(),
                }
            },
        )
    }

    const PORT_POOL: [u16; 10] = [0, 1, 22, 53, 80, 443, 8000, 8080, 65534, 65535];

    fn arb_port() -> impl Strategy<Value = u16> {
        prop_oneof![prop::sample::select(&PORT_POOL[..]), any::<u16>()]
    }

    fn arb_range() -> impl Strategy<Value = PortMatch> {
        prop_oneof![
            arb_port().prop_map(|p| range(p, p)),
            Just(range(0, u16::MAX)),
            (arb_port(), 0u16..300).prop_map(|(p, n)| range(p, p.saturating_add(n))),
            (arb_port(), arb_port()).prop_map(|(a, b)| range(a, b)),
        ]
    }

    const ICMP_TYPES: [u8; 6] = [0, 3, 8, 128, 135, 255];

    fn arb_icmp() -> impl Strategy<Value = PortMatch> {
        let code = prop::option::of(prop::sample::select(&[0u8, 1, 4, 255][..]));
        (prop::sample::select(&ICMP_TYPES[..]), code)
            .prop_map(|(icmp_type, code)| PortMatch::Icmp { icmp_type, code })
    }

    const PROTO_POOL: [u8; 9] = [0, 1, 6, 17, 47, 58, 132, 200, 255];

    fn arb_rule() -> impl Strategy<Value = Rule> {
        let ports_of = |protocol: Protocol| -> BoxedStrategy<Vec<PortMatch>> {
            if protocol.has_ports() {
                prop::collection::vec(arb_range(), 0..4).boxed()
            } else if protocol.is_icmp() {
                prop::collection::vec(arb_icmp(), 0..3).boxed()
            } else {
                Just(Vec::new()).boxed()
            }
        };
        let protocol = prop_oneof![
            Just(Protocol::Any),
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Sctp),
            Just(Protocol::Icmp),
            Just(Protocol::Icmpv6),
            prop::sample::select(&PROTO_POOL[..]).prop_map(Protocol::Number),
        ];
        // Rules without peers are legal but match nobody: keep them, but rarely.
        let peers = prop_oneof![
            1 => Just(Vec::new()),
            6 => prop::collection::vec(arb_block(), 1..4),
        ];
        let layer = prop_oneof![Just(Layer::SecurityGroups), Just(Layer::NetworkPolicies)];
        (protocol, peers, layer).prop_flat_map(move |(protocol, peers, layer)| {
            ports_of(protocol).prop_map(move |ports| Rule {
                protocol,
                ports,
                peers: peers.clone(),
                origin: String::new(),
                layer,
            })
        })
    }

    /// The layer lists a direction of a layered policy can have: none, one, both in either order.
    fn arb_layers() -> impl Strategy<Value = Vec<Layer>> {
        use Layer::{NetworkPolicies as Np, SecurityGroups as Sg};
        prop::sample::select(vec![vec![], vec![Sg], vec![Np], vec![Sg, Np], vec![Np, Sg]])
    }

    /// Unlayered policies (rules' layers ignored) and layered ones, half each.
    fn arb_policy() -> impl Strategy<Value = CompiledPolicy> {
        (
            prop::collection::vec(arb_rule(), 0..6),
            prop::collection::vec(arb_rule(), 0..6),
            any::<bool>(),
            arb_layers(),
            arb_layers(),
        )
            .prop_map(
                |(ingress, egress, layered, ingress_layers, egress_layers)| CompiledPolicy {
                    ingress,
                    egress,
                    stateless: false,
                    layered,
                    ingress_layers: if layered { ingress_layers } else { vec![] },
                    egress_layers: if layered { egress_layers } else { vec![] },
                },
            )
    }

    /// A query seed, realized against the policy so that many queries land on its edges: either
    /// aimed at one rule (its direction, protocol, near one of its ports and one of its networks)
    /// or free, near any network and port of the policy.
    #[derive(Clone, Debug)]
    struct QuerySeed {
        ingress: bool,
        proto: u8,
        port: u16,
        /// Picks a port near a port match of the policy (always for aimed queries).
        port_pick: (usize, u8),
        use_port_pick: bool,
        addr: IpAddr,
        /// Picks an address near a network of the policy (always for aimed queries).
        addr_pick: (usize, u128, u8),
        use_addr_pick: bool,
        /// (rule, port match, network) picks for a query aimed at one rule.
        target: Option<(usize, usize, usize)>,
    }

    fn arb_query() -> impl Strategy<Value = QuerySeed> {
        (
            (
                any::<bool>(),
                prop::sample::select(&PROTO_POOL[..]),
                arb_port(),
            ),
            (any::<usize>(), any::<u8>()),
            prop::bool::weighted(0.5),
            arb_ip(),
            (any::<usize>(), any::<u128>(), any::<u8>()),
            prop::bool::weighted(0.7),
            prop::option::weighted(0.5, any::<(usize, usize, usize)>()),
        )
            .prop_map(
                |(
                    (ingress, proto, port),
                    port_pick,
                    use_port,
                    addr,
                    addr_pick,
                    use_addr,
                    target,
                )| {
                    QuerySeed {
                        ingress,
                        proto,
                        port,
                        port_pick,
                        use_port_pick: use_port,
                        addr,
                        addr_pick,
                        use_addr_pick: use_addr,
                        target,
                    }
                },
            )
    }

    /// An address in (mostly), at the edge of, or just outside one of the policy's networks.
    fn address_near(net: IpNet, host: u128, how: u8) -> IpAddr {
        match net.trunc() {
            IpNet::V4(n) => {
                let base = u32::from(n.network());
                let hostmask = u32::from(n.hostmask());
                let a = match how % 8 {
                    0 => base,
                    1 => base | hostmask,
                    2 => base.wrapping_sub(1),
                    3 => (base | hostmask).wrapping_add(1),
                    _ => base | (host as u32 & hostmask),
                };
                IpAddr::V4(Ipv4Addr::from(a))
            }
            IpNet::V6(n) => {
                let base = u128::from(n.network());
                let hostmask = u128::from(n.hostmask());
                let a = match how % 8 {
                    0 => base,
                    1 => base | hostmask,
                    2 => base.wrapping_sub(1),
                    3 => (base | hostmask).wrapping_add(1),
                    _ => base | (host & hostmask),
                };
                IpAddr::V6(Ipv6Addr::from(a))
            }
        }
    }

    /// A port inside, at or just beside the edge of one of the policy's port matches.
    fn port_near(m: PortMatch, how: u8) -> u16 {
        let (first, last) = match m {
            PortMatch::Range { first, last } => (first, last),
            PortMatch::Icmp { icmp_type, code } => {
                let base = u16::from(icmp_type) << 8;
                match code {
                    Some(c) => (base | u16::from(c), base | u16::from(c)),
                    None => (base, base | 0xff),
                }
            }
        };
        match how % 6 {
            0 => first,
            1 => last,
            2 => first.wrapping_sub(1),
            3 => last.wrapping_add(1),
            _ if first <= last => first + (u16::from(how) % (last - first).saturating_add(1)),
            _ => first,
        }
    }

    /// The networks (cidrs and excepts) of some rules.
    fn nets_of<'a>(rules: impl Iterator<Item = &'a Rule>) -> Vec<IpNet> {
        rules
            .flat_map(|r| &r.peers)
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
            .collect()
    }

    /// Every network and every port match of the policy.
    fn landmarks(p: &CompiledPolicy) -> (Vec<IpNet>, Vec<PortMatch>) {
        let rules = p.ingress.iter().chain(&p.egress);
        let ports = rules
            .clone()
            .flat_map(|r| r.ports.iter().copied())
            .collect();
        (nets_of(rules), ports)
    }

    fn realize(q: &QuerySeed, p: &CompiledPolicy) -> (Direction, u8, u16, IpAddr) {
        let rules: Vec<(Direction, &Rule)> = p
            .ingress
            .iter()
            .map(|r| (Direction::Ingress, r))
            .chain(p.egress.iter().map(|r| (Direction::Egress, r)))
            .collect();
        let (mut nets, mut ports) = landmarks(p);
        let (mut dir, mut proto) = if q.ingress {
            (Direction::Ingress, q.proto)
        } else {
            (Direction::Egress, q.proto)
        };
        if let Some((r, port_pick, net_pick)) = q.target.filter(|_| !rules.is_empty()) {
            let (rule_dir, rule) = rules[r % rules.len()];
            dir = rule_dir;
            proto = rule.protocol.number().unwrap_or(q.proto);
            ports = rule.ports.clone();
            nets = nets_of(std::iter::once(rule));
            if !ports.is_empty() {
                ports = vec![ports[port_pick % ports.len()]];
            }
            if !nets.is_empty() {
                nets = vec![nets[net_pick % nets.len()]];
            }
        }
        let aimed = q.target.is_some();
        let (i, how) = q.port_pick;
        let port = if (q.use_port_pick || aimed) && !ports.is_empty() {
            port_near(ports[i % ports.len()], how)
        } else {
            q.port
        };
        let (i, host, how) = q.addr_pick;
        let addr = if (q.use_addr_pick || aimed) && !nets.is_empty() {
            address_near(nets[i % nets.len()], host, how)
        } else {
            q.addr
        };
        (dir, proto, port, addr)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn two_lookups_agree_with_the_reference(
            policy in arb_policy(),
            queries in prop::collection::vec((arb_query(), any::<bool>()), 48),
        ) {
            let tables = match compile(42, &policy) {
                Ok(t) => t,
                Err(TablesError::TooManyClasses { .. }) => unreachable!("at most 5 rules"),
                Err(e) => return Err(TestCaseError::fail(format!("compile: {e}"))),
            };
            assert_unique_keys(&tables);
            assert_no_bits_beyond_prefix(&tables);
            let dp = Datapath::new(42, &tables);
            for (q, from_host) in &queries {
                let (dir, proto, port, addr) = realize(q, &policy);
                let want = policy.allows(dir, proto, port, addr, *from_host);
                prop_assert_eq!(
                    dp.allows_from(dir, proto, port, addr, *from_host),
                    want,
                    "{:?} proto {} port {} addr {} from host {}", dir, proto, port, addr, from_host
                );
            }
        }
    }
}
