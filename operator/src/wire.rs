//! The edge between a node's plan (`plan::NodePlan`, the compiler's output) and the wire
//! (`kubesg-proto`): full snapshots and deltas between two plans. Pure functions, so the push
//! server's decisions (what to send) are separate from how it is spelled, and a delta can be
//! checked against the snapshot it must be equivalent to.
//!
//! A delta from `old` to `new` carries exactly the differences: the policies that are new or
//! changed in any way (rules or the group generations they list, so the status can see a new
//! generation acked even when the rules did not move), the ids no longer used, the address sets
//! that are new or changed (whole, or as the addresses added and removed for an agent that
//! applies that: [`SetForm`]) and the set ids no longer used, the pods that are new or
//! changed (policy or uid), and the pods gone. Applied on top of `old` by the agent
//! (`kubesg_agent::desired::DesiredState::apply`), it gives the same state as a snapshot of
//! `new`.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use kubesg_proto::v1alpha1 as pb;

use crate::{
    model::ObjectKey,
    plan::{
        AddressSet, Layer, NodePlan, PeerBlock, PlannedPolicy, PlannedRule, PodPlan, PortSpec,
        RuleProtocol,
    },
};

/// A full snapshot of `plan` at `version`: it replaces everything the agent had. Carries the
/// node-wide settings (a delta does not: they only change with the server's configuration,
/// which a new stream's snapshot picks up).
pub fn snapshot(
    plan: &NodePlan,
    version: u64,
    settings: &pb::DatapathSettings,
) -> pb::PolicyUpdate {
    pb::PolicyUpdate {
        version,
        snapshot: true,
        base_version: 0,
        upsert_policies: plan.policies.iter().map(|(id, p)| policy(id, p)).collect(),
        remove_policies: Vec::new(),
        upsert_pods: plan
            .pods
            .iter()
            .map(|(key, pod)| pod_policy(key, pod))
            .collect(),
        remove_pods: Vec::new(),
        settings: Some(*settings),
        upsert_sets: plan.sets.iter().map(|(id, s)| set(id, s)).collect(),
        remove_sets: Vec::new(),
        change_sets: Vec::new(),
    }
}

/// How a delta spells a set that changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetForm {
    /// Whole (`upsert_sets`): what every agent applies.
    Whole,
    /// The addresses added and removed (`change_sets`) where that is shorter than the whole
    /// set: for agents whose Hello lists [`kubesg_proto::CAPABILITY_SET_CHANGES`].
    Changes,
}

/// The delta that turns `old` (the agent's state at `base_version`) into `new` at `version`;
/// `None` when the plans are equal (nothing to send).
pub fn delta(
    old: &NodePlan,
    new: &NodePlan,
    base_version: u64,
    version: u64,
    sets: SetForm,
) -> Option<pb::PolicyUpdate> {
    if old == new {
        return None;
    }
    let mut upsert_sets = Vec::new();
    let mut change_sets = Vec::new();
    for (id, s) in changed(&old.sets, &new.sets) {
        match (sets, old.sets.get(id)) {
            (SetForm::Changes, Some(before)) => match set_change(id, before, s) {
                Some(change) => change_sets.push(change),
                None => upsert_sets.push(set(id, s)),
            },
            _ => upsert_sets.push(set(id, s)),
        }
    }
    Some(pb::PolicyUpdate {
        version,
        snapshot: false,
        base_version,
        upsert_policies: changed(&old.policies, &new.policies)
            .map(|(id, p)| policy(id, p))
            .collect(),
        remove_policies: gone(&old.policies, &new.policies)
            .map(|(id, _)| id.clone())
            .collect(),
        upsert_pods: changed(&old.pods, &new.pods)
            .map(|(key, pod)| pod_policy(key, pod))
            .collect(),
        remove_pods: gone(&old.pods, &new.pods)
            .map(|(key, pod)| pod_ref(key, &pod.uid))
            .collect(),
        settings: None,
        upsert_sets,
        remove_sets: gone(&old.sets, &new.sets)
            .map(|(id, _)| id.clone())
            .collect(),
        change_sets,
    })
}

/// Set `id` going from `before` to `after` (both sorted, without duplicates) as the addresses
/// it gains and loses, or `None` when that is not shorter than `after` whole.
fn set_change(id: &str, before: &AddressSet, after: &AddressSet) -> Option<pb::AddressSetChange> {
    let (old, new): (BTreeSet<&IpNet>, BTreeSet<&IpNet>) =
        (before.iter().collect(), after.iter().collect());
    let add: Vec<String> = new.difference(&old).map(|n| n.to_string()).collect();
    let remove: Vec<String> = old.difference(&new).map(|n| n.to_string()).collect();
    (add.len() + remove.len() < after.len()).then(|| pb::AddressSetChange {
        id: id.to_owned(),
        add,
        remove,
    })
}

/// The entries of `new` that `old` lacks or holds with another value.
fn changed<'a, K: Ord, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = (&'a K, &'a V)> {
    new.iter().filter(move |(k, v)| old.get(*k) != Some(*v))
}

/// The entries of `old` that `new` lacks.
fn gone<'a, K: Ord, V>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = (&'a K, &'a V)> {
    old.iter().filter(move |(k, _)| !new.contains_key(*k))
}

/// The wire form of one policy.
pub fn policy(id: &str, p: &PlannedPolicy) -> pb::Policy {
    pb::Policy {
        id: id.to_owned(),
        ingress: p.ingress.iter().map(rule).collect(),
        egress: p.egress.iter().map(rule).collect(),
        // Security groups are stateful; nothing in the API asks for a stateless policy yet.
        stateless: false,
        groups: p
            .groups
            .iter()
            .map(|g| match crate::netpol::name(&g.group) {
                Some(name) => pb::GroupRef {
                    namespace: g.group.namespace.clone(),
                    name: name.to_owned(),
                    generation: g.generation,
                    kind: "NetworkPolicy".to_owned(),
                },
                None => pb::GroupRef {
                    namespace: g.group.namespace.clone(),
                    name: g.group.name.clone(),
                    generation: g.generation,
                    kind: String::new(),
                },
            })
            .collect(),
        layered: p.layers.is_some(),
        ingress_layers: p
            .layers
            .iter()
            .flat_map(|l| l.ingress.iter().map(|&x| layer(x) as i32))
            .collect(),
        egress_layers: p
            .layers
            .iter()
            .flat_map(|l| l.egress.iter().map(|&x| layer(x) as i32))
            .collect(),
    }
}

/// The wire form of a layer.
fn layer(l: Layer) -> pb::Layer {
    match l {
        Layer::SecurityGroups => pb::Layer::SecurityGroups,
        Layer::NetworkPolicies => pb::Layer::NetworkPolicies,
    }
}

/// The wire form of one rule.
pub fn rule(r: &PlannedRule) -> pb::Rule {
    pb::Rule {
        protocol: protocol(r.protocol) as i32,
        protocol_number: 0,
        ports: r.ports.iter().map(port).collect(),
        peers: r.peers.iter().map(peer).collect(),
        origin: r.origin.clone(),
        peer_sets: r.sets.clone(),
        layer: layer(r.layer) as i32,
    }
}

/// The wire form of one address set.
pub fn set(id: &str, s: &AddressSet) -> pb::AddressSet {
    pb::AddressSet {
        id: id.to_owned(),
        cidrs: s.iter().map(|n| n.to_string()).collect(),
    }
}

fn protocol(p: RuleProtocol) -> pb::Protocol {
    match p {
        RuleProtocol::Any => pb::Protocol::Any,
        RuleProtocol::Tcp => pb::Protocol::Tcp,
        RuleProtocol::Udp => pb::Protocol::Udp,
        RuleProtocol::Sctp => pb::Protocol::Sctp,
        RuleProtocol::Icmp => pb::Protocol::Icmp,
        RuleProtocol::Icmpv6 => pb::Protocol::Icmpv6,
    }
}

fn port(p: &PortSpec) -> pb::PortMatch {
    let kind = match *p {
        PortSpec::Range { first, last } => pb::port_match::Kind::Range(pb::PortRange {
            first: first.into(),
            last: last.into(),
        }),
        PortSpec::Icmp { icmp_type, code } => pb::port_match::Kind::Icmp(pb::IcmpMatch {
            r#type: icmp_type.into(),
            code: code.map(u32::from),
        }),
    };
    pb::PortMatch { kind: Some(kind) }
}

fn peer(b: &PeerBlock) -> pb::PeerBlock {
    pb::PeerBlock {
        cidr: b.cidr.to_string(),
        except: b.except.iter().map(|e| e.to_string()).collect(),
    }
}

fn pod_ref(key: &ObjectKey, uid: &str) -> pb::PodRef {
    pb::PodRef {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        uid: uid.to_owned(),
    }
}

fn pod_policy(key: &ObjectKey, pod: &PodPlan) -> pb::PodPolicy {
    pb::PodPolicy {
        pod: Some(pod_ref(key, &pod.uid)),
        policy_id: pod.policy.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::plan::GroupGeneration;

    fn plan() -> NodePlan {
        let mut plan = NodePlan::default();
        plan.policies.insert(
            "p1".into(),
            std::sync::Arc::new(PlannedPolicy {
                ingress: vec![PlannedRule {
                    layer: Layer::SecurityGroups,
                    sets: vec!["group:shop/lb".into()],
                    protocol: RuleProtocol::Tcp,
                    ports: vec![PortSpec::Range {
                        first: 80,
                        last: 81,
                    }],
                    peers: vec![PeerBlock {
                        cidr: "10.0.0.0/8".parse().unwrap(),
                        except: vec!["10.1.0.0/16".parse().unwrap()],
                    }],
                    origin: "shop/web ingress[0]".into(),
                }],
                egress: vec![PlannedRule {
                    layer: Layer::SecurityGroups,
                    sets: Vec::new(),
                    protocol: RuleProtocol::Icmpv6,
                    ports: vec![PortSpec::Icmp {
                        icmp_type: 128,
                        code: Some(0),
                    }],
                    peers: vec![PeerBlock {
                        cidr: "fd00::/64".parse().unwrap(),
                        except: vec![],
                    }],
                    origin: "shop/web egress[0]".into(),
                }],
                groups: BTreeSet::from([GroupGeneration {
                    group: ObjectKey::new("shop", "web"),
                    generation: 3,
                }]),
                layers: None,
            }),
        );
        plan.sets.insert(
            "group:shop/lb".into(),
            std::sync::Arc::new(vec![
                "10.0.0.7/32".parse().unwrap(),
                "fd00::7/128".parse().unwrap(),
            ]),
        );
        plan.pods.insert(
            ObjectKey::new("shop", "web-1"),
            PodPlan {
                uid: "u1".into(),
                policy: Some("p1".into()),
                set_up: true,
            },
        );
        plan.pods.insert(
            ObjectKey::new("shop", "batch"),
            PodPlan {
                uid: "u2".into(),
                policy: None,
                set_up: true,
            },
        );
        plan
    }

    #[test]
    fn snapshot_spells_every_field() {
        let settings = pb::DatapathSettings {
            recheck_on_policy_change: true,
        };
        let u = snapshot(&plan(), 7, &settings);
        assert!(u.snapshot);
        assert_eq!(u.version, 7);
        assert_eq!(u.settings, Some(settings));
        let p = &u.upsert_policies[0];
        assert_eq!(p.id, "p1");
        assert_eq!(
            p.groups,
            vec![pb::GroupRef {
                namespace: "shop".into(),
                name: "web".into(),
                generation: 3,
                kind: String::new(),
            }]
        );
        let r = &p.ingress[0];
        assert_eq!(r.protocol, pb::Protocol::Tcp as i32);
        assert_eq!(
            r.ports[0].kind,
            Some(pb::port_match::Kind::Range(pb::PortRange {
                first: 80,
                last: 81
            }))
        );
        assert_eq!(r.peers[0].cidr, "10.0.0.0/8");
        assert_eq!(r.peers[0].except, vec!["10.1.0.0/16".to_owned()]);
        assert_eq!(r.origin, "shop/web ingress[0]");
        assert_eq!(r.peer_sets, vec!["group:shop/lb".to_owned()]);
        assert_eq!(
            u.upsert_sets,
            vec![pb::AddressSet {
                id: "group:shop/lb".into(),
                cidrs: vec!["10.0.0.7/32".into(), "fd00::7/128".into()],
            }]
        );
        let e = &p.egress[0];
        assert_eq!(e.protocol, pb::Protocol::Icmpv6 as i32);
        assert_eq!(
            e.ports[0].kind,
            Some(pb::port_match::Kind::Icmp(pb::IcmpMatch {
                r#type: 128,
                code: Some(0)
            }))
        );
        // Pods in key order: batch (no group) then web-1.
        assert_eq!(u.upsert_pods[0].policy_id, "");
        assert_eq!(u.upsert_pods[1].policy_id, "p1");
        assert_eq!(u.upsert_pods[1].pod.as_ref().unwrap().uid, "u1");
    }

    #[test]
    fn delta_of_equal_plans_is_nothing() {
        assert_eq!(delta(&plan(), &plan(), 1, 2, SetForm::Changes), None);
    }

    #[test]
    fn delta_carries_only_what_changed() {
        let old = plan();
        let mut new = plan();
        // A generation bump alone changes the policy: the status must see it acked.
        let p1 = std::sync::Arc::make_mut(new.policies.get_mut("p1").unwrap());
        p1.groups = BTreeSet::from([GroupGeneration {
            group: ObjectKey::new("shop", "web"),
            generation: 4,
        }]);
        new.pods.remove(&ObjectKey::new("shop", "batch"));
        new.pods.insert(
            ObjectKey::new("shop", "web-2"),
            PodPlan {
                uid: "u3".into(),
                policy: Some("p1".into()),
                set_up: true,
            },
        );
        let d = delta(&old, &new, 5, 6, SetForm::Whole).unwrap();
        assert!(!d.snapshot);
        assert_eq!((d.base_version, d.version), (5, 6));
        assert_eq!(d.upsert_policies.len(), 1);
        assert_eq!(d.upsert_policies[0].groups[0].generation, 4);
        assert!(d.remove_policies.is_empty());
        assert_eq!(d.upsert_pods.len(), 1);
        assert_eq!(d.upsert_pods[0].pod.as_ref().unwrap().name, "web-2");
        assert_eq!(d.remove_pods.len(), 1);
        assert_eq!(d.remove_pods[0].name, "batch");
        assert_eq!(d.settings, None);
        assert!(d.upsert_sets.is_empty() && d.remove_sets.is_empty());
    }

    #[test]
    fn delta_carries_a_changed_set_alone_and_drops_unused_ones() {
        let old = plan();
        let mut new = plan();
        new.sets.insert(
            "group:shop/lb".into(),
            std::sync::Arc::new(vec!["10.0.0.8/32".parse().unwrap()]),
        );
        let d = delta(&old, &new, 1, 2, SetForm::Whole).unwrap();
        assert!(d.upsert_policies.is_empty(), "the rules did not move");
        assert_eq!(d.upsert_sets.len(), 1);
        assert_eq!(d.upsert_sets[0].cidrs, vec!["10.0.0.8/32".to_owned()]);
        new.sets.clear();
        let d = delta(&old, &new, 1, 2, SetForm::Whole).unwrap();
        assert_eq!(d.remove_sets, vec!["group:shop/lb".to_owned()]);
    }

    #[test]
    fn a_set_changed_in_part_is_its_added_and_removed_addresses_for_agents_that_apply_them() {
        let addrs = |range: std::ops::Range<u32>| -> Vec<IpNet> {
            range
                .map(|i| {
                    IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::from(
                        0x0a00_0000 + i,
                    )))
                })
                .collect()
        };
        let mut old = plan();
        old.sets
            .insert("group:shop/lb".into(), std::sync::Arc::new(addrs(0..1000)));
        let mut new = old.clone();
        // One address leaves, two join.
        new.sets
            .insert("group:shop/lb".into(), std::sync::Arc::new(addrs(1..1002)));
        let d = delta(&old, &new, 1, 2, SetForm::Changes).unwrap();
        assert!(d.upsert_sets.is_empty(), "{:?}", d.upsert_sets.len());
        assert_eq!(
            d.change_sets,
            vec![pb::AddressSetChange {
                id: "group:shop/lb".into(),
                add: vec!["10.0.3.232/32".into(), "10.0.3.233/32".into()],
                remove: vec!["10.0.0.0/32".into()],
            }]
        );
        // An older agent gets the set whole.
        let whole = delta(&old, &new, 1, 2, SetForm::Whole).unwrap();
        assert!(whole.change_sets.is_empty());
        assert_eq!(whole.upsert_sets[0].cidrs.len(), 1001);
        // A change as long as the set is sent whole.
        let mut replaced = old.clone();
        replaced.sets.insert(
            "group:shop/lb".into(),
            std::sync::Arc::new(addrs(5000..5002)),
        );
        let d = delta(&old, &replaced, 1, 2, SetForm::Changes).unwrap();
        assert!(d.change_sets.is_empty());
        assert_eq!(d.upsert_sets[0].cidrs.len(), 2);
    }
}
