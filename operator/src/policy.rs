//! A pod's policy: the union of the rules of every group it is a member of (with what their
//! egress rules gain from Services), with the named ports of ingress rules resolved on the pod
//! itself.
//!
//! Pods with the same groups and the same numbers for the named ports those groups' ingress rules
//! use form a *class* and share one policy. The policy id is a fingerprint of the policy's
//! content (rules and the groups with their generations, in a canonical order: groups by key,
//! rules by index), so identical policies share an id wherever they are computed, and a policy
//! that did not change keeps its id when something unrelated changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    fingerprint::{hex, Fingerprint, Hasher},
    index::{GroupEntry, GroupId, Index, PodEntry},
    peers::{
        host_block, rule_fingerprint, FingerprintedRule, GroupRules, IngressTemplate, NamedNeed,
        TemplatePort,
    },
    plan::{GroupGeneration, Layer, PlannedPolicy, PlannedRule, PolicyId, PolicyLayers, PortSpec},
};

/// What decides a pod's policy: its groups and the ports its named ports resolve to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ClassKey {
    /// The accepted groups the pod is a member of, sorted by slot.
    pub groups: Vec<GroupId>,
    /// Every named port those groups' ingress rules use, sorted, with the pod's numbers for it
    /// (empty: the pod has no such port, and the rule part allows nothing).
    pub binding: Vec<(NamedNeed, Vec<u16>)>,
}

/// The class of a pod, `None` when it is a member of no group (not filtered).
pub(crate) fn class_key(ix: &Index, pod: &PodEntry) -> Option<ClassKey> {
    if !pod.enforced() || pod.member_of.is_empty() {
        return None;
    }
    let mut needs: Vec<&NamedNeed> = pod
        .member_of
        .iter()
        .filter_map(|&g| ix.group(g))
        .flat_map(|g| g.rules.named_needs.iter())
        .collect();
    needs.sort();
    needs.dedup();
    let binding = needs
        .into_iter()
        .map(|need| {
            let mut ports: Vec<u16> = pod
                .pod
                .ports
                .iter()
                .filter(|p| p.name == need.0 && p.protocol == need.1)
                .map(|p| p.port)
                .collect();
            ports.sort_unstable();
            ports.dedup();
            (need.clone(), ports)
        })
        .collect();
    Some(ClassKey {
        groups: pod.member_of.clone(),
        binding,
    })
}

/// The ports an ingress template allows on a pod of the class: `Some(empty)` for every port,
/// `None` when the rule allows nothing (it lists only named ports the pod does not have; an
/// empty list would mean every port).
fn ingress_ports(rules: &GroupRules, t: &IngressTemplate, key: &ClassKey) -> Option<Vec<PortSpec>> {
    let Some(items) = &t.ports else {
        return Some(Vec::new());
    };
    let mut ports = Vec::new();
    for item in items {
        match item {
            TemplatePort::Spec(s) => ports.push(*s),
            TemplatePort::Named(i) => {
                let Some(need) = rules.named_needs.get(*i) else {
                    continue;
                };
                if let Ok(j) = key.binding.binary_search_by(|(n, _)| n.cmp(need)) {
                    ports.extend(
                        key.binding[j]
                            .1
                            .iter()
                            .map(|&p| PortSpec::Range { first: p, last: p }),
                    );
                }
            }
        }
    }
    if ports.is_empty() {
        return None;
    }
    ports.sort();
    ports.dedup();
    Some(ports)
}

/// What a group's egress rules gain from Services, in canonical order (by Service, then rule).
fn service_rules(g: &GroupEntry) -> impl Iterator<Item = &FingerprintedRule> {
    g.service_rules.values().flat_map(|v| &v.rules)
}

/// The ClusterIPs each base egress rule of a group must except from its blocks, by rule origin,
/// sorted (see [`crate::services::Exclusion`]).
fn exclusions(g: &GroupEntry) -> BTreeMap<&str, Vec<IpAddr>> {
    let mut out: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for e in g.service_rules.values().flat_map(|v| &v.excluded) {
        out.entry(e.origin.as_str()).or_default().push(e.address);
    }
    for addresses in out.values_mut() {
        addresses.sort_unstable();
        addresses.dedup();
    }
    out
}

/// A base egress rule's fingerprint with the ClusterIPs excepted from it.
fn excluded_fingerprint(
    r: &FingerprintedRule,
    excluded: &BTreeMap<&str, Vec<IpAddr>>,
) -> Fingerprint {
    match excluded.get(r.rule.origin.as_str()) {
        None => r.fingerprint,
        Some(addresses) => {
            let mut h = Hasher::new("excluded");
            h.fingerprint(&r.fingerprint).count(addresses.len());
            for a in addresses {
                h.str(&a.to_string());
            }
            h.finish()
        }
    }
}

/// A base egress rule with the ClusterIPs excepted from the blocks holding them.
fn excluded_rule(r: &FingerprintedRule, excluded: &BTreeMap<&str, Vec<IpAddr>>) -> PlannedRule {
    let mut rule = r.rule.clone();
    if let Some(addresses) = excluded.get(r.rule.origin.as_str()) {
        for block in &mut rule.peers {
            for &a in addresses {
                let host = host_block(a).cidr;
                if block.cidr.contains(&a) && !block.except.iter().any(|e| e.contains(&a)) {
                    block.except.push(host);
                }
            }
            block.except.sort();
        }
    }
    rule
}

/// The class's groups in canonical order (by key).
fn sorted_groups<'a>(ix: &'a Index, key: &ClassKey) -> Vec<&'a GroupEntry> {
    let mut groups: Vec<_> = key.groups.iter().filter_map(|&g| ix.group(g)).collect();
    groups.sort_by(|a, b| a.key.cmp(&b.key));
    groups
}

/// Every group the policy lists: the class's groups and the groups their rules name.
fn listed_groups(groups: &[&GroupEntry]) -> BTreeSet<GroupGeneration> {
    let mut listed = BTreeSet::new();
    for g in groups {
        listed.extend(g.rules.own.iter().cloned());
        listed.extend(g.rules.peer_groups.iter().cloned());
    }
    listed
}

/// The layers that judge the class's pods, `None` when only SecurityGroups select them (every
/// rule of a direction then allows on its own, as before NetworkPolicies). A SecurityGroup
/// judges both directions of its members; a NetworkPolicy the directions of its `policyTypes`.
fn layers(groups: &[&GroupEntry]) -> Option<PolicyLayers> {
    if !groups.iter().any(|g| g.group.kind.is_network_policy()) {
        return None;
    }
    let listed = |ingress: bool| {
        let mut layers: Vec<Layer> = groups
            .iter()
            .filter(|g| g.group.kind.isolates(ingress))
            .map(|g| Layer::of(g.group.kind))
            .collect();
        layers.sort();
        layers.dedup();
        layers
    };
    Some(PolicyLayers {
        ingress: listed(true),
        egress: listed(false),
    })
}

/// The id of a class's policy: a fingerprint of what [`build`] returns, computed from the
/// per-rule fingerprints without building the policy. Nodes hold their own copy of each policy
/// they use; the compiler keeps only ids and builds a copy when a node first needs one.
pub(crate) fn id(ix: &Index, key: &ClassKey) -> PolicyId {
    let groups = sorted_groups(ix, key);
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    for g in &groups {
        let rules = &g.rules;
        for t in &rules.ingress {
            if let Some(ports) = ingress_ports(rules, t, key) {
                ingress.push(rule_fingerprint(
                    t.layer,
                    t.protocol,
                    &ports,
                    &t.peers_fingerprint,
                    &t.origin,
                ));
            }
        }
        let excluded = exclusions(g);
        egress.extend(
            rules
                .egress
                .iter()
                .map(|r| excluded_fingerprint(r, &excluded)),
        );
        egress.extend(service_rules(g).map(|r| r.fingerprint));
    }
    let mut h = Hasher::new("policy");
    h.count(ingress.len());
    for f in &ingress {
        h.fingerprint(f);
    }
    h.count(egress.len());
    for f in &egress {
        h.fingerprint(f);
    }
    let listed = listed_groups(&groups);
    h.count(listed.len());
    for g in &listed {
        h.str(&g.group.namespace)
            .str(&g.group.name)
            .i64(g.generation);
    }
    // Only layered policies hash their layers: SecurityGroup-only policies keep the ids they had
    // before layers existed.
    if let Some(l) = layers(&groups) {
        h.str("layers");
        for list in [&l.ingress, &l.egress] {
            h.count(list.len());
            for layer in list {
                h.u8(*layer as u8);
            }
        }
    }
    hex(&h.finish())
}

/// The policy of a class: its groups' rules in canonical order (groups by key, rules by index),
/// named ingress ports resolved with the class's binding.
pub(crate) fn build(ix: &Index, key: &ClassKey) -> PlannedPolicy {
    let groups = sorted_groups(ix, key);
    // Sized up front: every node holds its own copy, so slack capacity would be paid per node.
    let mut policy = PlannedPolicy {
        ingress: Vec::with_capacity(groups.iter().map(|g| g.rules.ingress.len()).sum()),
        egress: Vec::with_capacity(
            groups
                .iter()
                .map(|g| g.rules.egress.len() + service_rules(g).count())
                .sum(),
        ),
        groups: listed_groups(&groups),
        layers: layers(&groups),
    };
    for g in &groups {
        let rules = &g.rules;
        for t in &rules.ingress {
            if let Some(ports) = ingress_ports(rules, t, key) {
                policy.ingress.push(PlannedRule {
                    layer: t.layer,
                    protocol: t.protocol,
                    ports,
                    peers: t.peers.clone(),
                    sets: t.sets.clone(),
                    origin: t.origin.clone(),
                });
            }
        }
        let excluded = exclusions(g);
        policy
            .egress
            .extend(rules.egress.iter().map(|r| excluded_rule(r, &excluded)));
        policy
            .egress
            .extend(service_rules(g).map(|r| r.rule.clone()));
    }
    policy.ingress.shrink_to_fit();
    policy
}
