//! Changing an installed policy where it stands, entry by entry, when that is as safe as
//! installing the new version beside it and switching endpoints over: a peer joining a group of
//! 10 000 is one map update, not 20 000.
//!
//! The full switch (install under a new id, point each endpoint at it, delete the old entries)
//! makes a change atomic per endpoint, and the new policy id is what makes the datapath re-check
//! established connections (`--recheck-on-policy-change`). An in-place change keeps the id, so
//! it is taken only when no packet can see a verdict neither version gives and no established
//! connection needs a re-check:
//!
//! - The port trie, the layers and the peer trie (every non-host prefix) are unchanged; only
//!   `POLICY_HOSTS` entries (exact /32 and /128 addresses) differ. The datapath reads a host
//!   entry before the trie, so each address's verdict is its host entry if present, else the
//!   unchanged trie's: one map operation moves one address from its old verdict to its new one.
//! - With re-checking on, the change only widens: no host entry goes, none loses a class, and a
//!   new one holds every class the trie gave its address. A narrowing change takes the full
//!   switch, whose new id re-checks the connections it may cut.
//! - The change is small: below half of the policy's entries (beyond that the switch writes
//!   less) and its widening check bounded.

use std::collections::HashMap;

use ipnet::IpNet;
use kubesg_common::policy::{ClassSet, PeerKey, PEER_KEY_FIXED_BITS};

use crate::tables::{ip_of, PolicyTables};

/// The most (inserted hosts × trie prefixes) the widening check compares; beyond, the switch.
const MAX_WIDENING_WORK: usize = 4_000_000;

/// One `POLICY_HOSTS` operation of an in-place change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostOp {
    /// The entry's key.
    pub key: PeerKey,
    /// Its value before (`None`: absent).
    pub old: Option<ClassSet>,
    /// Its value after (`None`: deleted).
    pub new: Option<ClassSet>,
}

/// The host operations that turn `old` into `new` in place, or `None` when the change must take
/// the full switch (see the module's documentation). `narrowing_allowed`: established
/// connections are not re-checked on a policy change, so a narrowing change may go in place.
/// Both tables must be of the same policy id.
pub fn plan(
    old: &PolicyTables,
    new: &PolicyTables,
    narrowing_allowed: bool,
) -> Option<Vec<HostOp>> {
    if old.ports != new.ports || old.layers != new.layers {
        return None;
    }
    let (old_trie, old_hosts) = split(old);
    let (new_trie, new_hosts) = split(new);
    if old_trie != new_trie {
        return None;
    }
    let mut ops: Vec<HostOp> = Vec::new();
    for (key, classes) in &new_hosts {
        let before = old_hosts.get(key).copied();
        if before != Some(*classes) {
            ops.push(HostOp {
                key: *key,
                old: before,
                new: Some(*classes),
            });
        }
    }
    for (key, classes) in &old_hosts {
        if !new_hosts.contains_key(key) {
            ops.push(HostOp {
                key: *key,
                old: Some(*classes),
                new: None,
            });
        }
    }
    let entries = new.peers.len() + new.ports.len() + new.layers.len();
    if ops.len() * 2 >= entries.max(1) {
        return None;
    }
    if !narrowing_allowed {
        let inserted = ops.iter().filter(|op| op.old.is_none()).count();
        if inserted.saturating_mul(old_trie.len()) > MAX_WIDENING_WORK {
            return None;
        }
        for op in &ops {
            let before = match op.old {
                Some(c) => c,
                None => trie_lookup(&old_trie, &op.key).unwrap_or_default(),
            };
            match op.new {
                Some(after) if after.and(&before) == before => {}
                _ => return None,
            }
        }
    }
    // Deterministic order: the same change always takes the same steps.
    ops.sort_by_key(|op| (op.key.direction, op.key.family, op.key.addr));
    Some(ops)
}

/// Trie entries: (LPM prefix length, key, classes).
type TrieEntries = Vec<(u32, PeerKey, ClassSet)>;

/// The tables' peer entries: trie prefixes (kept in their order) and host entries by key.
fn split(t: &PolicyTables) -> (TrieEntries, HashMap<PeerKey, ClassSet>) {
    let mut trie = Vec::new();
    let mut hosts = HashMap::new();
    for &(len, key, classes) in &t.peers {
        if is_host(len, &key) {
            hosts.insert(key, classes);
        } else {
            trie.push((len, key, classes));
        }
    }
    (trie, hosts)
}

/// Whether an entry of this prefix length is a `POLICY_HOSTS` entry (a whole address).
pub fn is_host(prefix_len: u32, key: &PeerKey) -> bool {
    let addr_bits = if key.family == kubesg_common::AF_INET6 {
        128
    } else {
        32
    };
    prefix_len == PEER_KEY_FIXED_BITS + addr_bits
}

/// What the trie gives the address of host entry `key`: the classes of its longest prefix.
fn trie_lookup(trie: &[(u32, PeerKey, ClassSet)], key: &PeerKey) -> Option<ClassSet> {
    let addr = ip_of(key.family, &key.addr);
    trie.iter()
        .filter(|(_, k, _)| {
            k.policy_id == key.policy_id && k.direction == key.direction && k.family == key.family
        })
        .filter_map(|(len, k, classes)| {
            let bits = u8::try_from(len.checked_sub(PEER_KEY_FIXED_BITS)?).ok()?;
            let net = IpNet::new(ip_of(k.family, &k.addr), bits).ok()?;
            net.contains(&addr).then_some((bits, *classes))
        })
        .max_by_key(|(bits, _)| *bits)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        policy::{CompiledPolicy, PeerBlock, PortMatch, Protocol, Rule},
        tables,
    };

    fn rule(port: u16, peers: &[&str]) -> Rule {
        Rule {
            protocol: Protocol::Tcp,
            ports: vec![PortMatch::Range {
                first: port,
                last: port,
            }],
            peers: peers
                .iter()
                .map(|p| PeerBlock {
                    cidr: p.parse().unwrap(),
                    except: vec![],
                })
                .collect(),
            origin: String::new(),
            layer: Default::default(),
        }
    }

    fn tables_of(ingress: Vec<Rule>) -> PolicyTables {
        let p = CompiledPolicy {
            ingress,
            ..CompiledPolicy::default()
        };
        tables::compile(7, &p).unwrap()
    }

    fn hosts(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.1.{}.{}/32", i / 250, i % 250 + 1))
            .collect()
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    #[test]
    fn a_peer_joining_a_large_group_is_one_host_entry() {
        let before = hosts(1000);
        let mut after = before.clone();
        after.push("10.9.9.9/32".into());
        let old = tables_of(vec![
            rule(80, &refs(&before)),
            rule(22, &["192.168.0.0/16"]),
        ]);
        let new = tables_of(vec![rule(80, &refs(&after)), rule(22, &["192.168.0.0/16"])]);
        let ops = plan(&old, &new, false).expect("in place");
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert!(ops[0].old.is_none() && ops[0].new.is_some());
    }

    #[test]
    fn a_peer_leaving_goes_in_place_only_when_connections_are_not_rechecked() {
        let before = hosts(1000);
        let after = before[1..].to_vec();
        let old = tables_of(vec![rule(80, &refs(&before))]);
        let new = tables_of(vec![rule(80, &refs(&after))]);
        assert_eq!(
            plan(&old, &new, false),
            None,
            "a narrowing change re-checks"
        );
        let ops = plan(&old, &new, true).expect("in place without re-check");
        assert_eq!(ops.len(), 1);
        assert!(ops[0].new.is_none());
    }

    #[test]
    fn an_excepted_host_inside_a_block_is_narrowing() {
        // The new host entry holds fewer classes than the trie gave its address.
        let old = tables_of(vec![rule(80, &["10.0.0.0/8"])]);
        let mut r = rule(80, &["10.0.0.0/8"]);
        r.peers[0].except = vec!["10.0.0.5/32".parse().unwrap()];
        let new = tables_of(vec![r, rule(22, &["10.0.0.0/8"])]);
        // Ports changed too here (a second rule): the switch either way.
        assert_eq!(plan(&old, &new, true), None);
        let mut r = rule(80, &["10.0.0.0/8", "172.16.0.0/12"]);
        r.peers[0].except = vec!["10.0.0.5/32".parse().unwrap()];
        let base = tables_of(vec![rule(80, &["10.0.0.0/8", "172.16.0.0/12"])]);
        let excepted = tables_of(vec![r]);
        assert_eq!(plan(&base, &excepted, false), None);
    }

    #[test]
    fn a_host_inside_a_block_of_another_rule_keeps_that_rules_class() {
        let before = hosts(100);
        let mut after = before.clone();
        after.push("192.168.3.3/32".into());
        let old = tables_of(vec![
            rule(80, &refs(&before)),
            rule(22, &["192.168.0.0/16"]),
        ]);
        let new = tables_of(vec![rule(80, &refs(&after)), rule(22, &["192.168.0.0/16"])]);
        let ops = plan(&old, &new, false).expect("widening: in place");
        assert_eq!(ops.len(), 1);
        let trie = split(&new).0;
        let block = trie_lookup(&trie, &ops[0].key).expect("inside the /16");
        let host = ops[0].new.unwrap();
        assert_eq!(
            host.and(&block),
            block,
            "the host entry keeps the block's class"
        );
        assert_ne!(host, block, "and adds its own");
    }

    #[test]
    fn a_changed_block_or_port_takes_the_switch() {
        let old = tables_of(vec![rule(80, &["10.0.0.0/8", "10.1.1.1/32"])]);
        let block = tables_of(vec![rule(80, &["10.0.0.0/9", "10.1.1.1/32"])]);
        let port = tables_of(vec![rule(81, &["10.0.0.0/8", "10.1.1.1/32"])]);
        assert_eq!(plan(&old, &block, true), None);
        assert_eq!(plan(&old, &port, true), None);
    }

    #[test]
    fn a_change_of_half_the_entries_or_more_takes_the_switch() {
        let before = hosts(10);
        let after = hosts(30);
        let old = tables_of(vec![rule(80, &refs(&before))]);
        let new = tables_of(vec![rule(80, &refs(&after))]);
        assert_eq!(plan(&old, &new, true), None);
    }

    #[test]
    fn an_unchanged_policy_is_no_operation() {
        let t = tables_of(vec![rule(80, &refs(&hosts(10)))]);
        assert_eq!(plan(&t, &t, false), Some(vec![]));
    }
}
