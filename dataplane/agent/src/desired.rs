//! What the operator wants on this node: its compiled policies and which policy each pod uses,
//! at a version. Updates (snapshots and deltas) are applied here as pure functions, so a bad
//! update is refused whole before the datapath is touched.
//!
//! The operator sends the addresses of pod peers as address sets, apart from the rules that
//! name them (one set changes when a peer pod's address does, not every policy admitting it).
//! They are folded into the rules here: [`DesiredState::policies`] holds every policy with its
//! sets' addresses among its peers, which is what the datapath and `explain` use; a set's
//! change re-folds the policies naming it, so they are replaced like any changed policy.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    endpoints::PodRef,
    policy::{CompiledPolicy, PeerBlock, Rule},
};

/// The address sets each rule of a policy names, by rule index (the operator's `peer_sets`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySets {
    /// Per ingress rule (missing or empty: none).
    pub ingress: Vec<Vec<String>>,
    /// Per egress rule (missing or empty: none).
    pub egress: Vec<Vec<String>>,
}

impl PolicySets {
    /// Every set named.
    fn ids(&self) -> impl Iterator<Item = &String> {
        self.ingress.iter().chain(&self.egress).flatten()
    }
}

/// A policy whose rules name address sets, as received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPolicy {
    /// The rules with their own peers only.
    pub rules: CompiledPolicy,
    /// The sets they name.
    pub sets: PolicySets,
}

/// The policy a pod uses, as the operator says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAssignment {
    /// The pod's UID when the operator knows it; empty matches any.
    pub uid: String,
    /// The policy id; `None`: the pod belongs to no group.
    pub policy: Option<String>,
}

/// What the agent knows of a pod's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assignment {
    /// The operator has not said anything of this pod (or of this incarnation of it): the
    /// startup policy applies.
    Unknown,
    /// The pod is in no group: tracked, not filtered.
    NonMember,
    /// The pod uses this policy.
    Member(String),
}

/// The desired state at a version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The last applied version (0: none yet).
    pub version: u64,
    /// Policies by id.
    pub policies: BTreeMap<String, CompiledPolicy>,
    /// Pods on this node by (namespace, name). Persisted as a list of entries: JSON object keys
    /// must be strings.
    #[serde(with = "pod_entries")]
    pub pods: BTreeMap<(String, String), PodAssignment>,
    /// Cut tracked connections the new rules refuse (Neutron) or let them live (AWS).
    pub recheck_on_policy_change: bool,
    /// Address sets by id.
    #[serde(default)]
    pub sets: BTreeMap<String, Vec<IpNet>>,
    /// The policies whose rules name sets, as received: a set's change folds them again.
    #[serde(default)]
    pub set_policies: BTreeMap<String, SetPolicy>,
}

/// `DesiredState::pods` as JSON: `[{"namespace", "name", "uid", "policy"}, …]`.
mod pod_entries {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::PodAssignment;

    #[derive(Serialize, Deserialize)]
    struct Entry {
        namespace: String,
        name: String,
        uid: String,
        policy: Option<String>,
    }

    pub fn serialize<S: Serializer>(
        pods: &BTreeMap<(String, String), PodAssignment>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(pods.iter().map(|((namespace, name), a)| Entry {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: a.uid.clone(),
            policy: a.policy.clone(),
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<(String, String), PodAssignment>, D::Error> {
        Ok(Vec::<Entry>::deserialize(d)?
            .into_iter()
            .map(|e| {
                (
                    (e.namespace, e.name),
                    PodAssignment {
                        uid: e.uid,
                        policy: e.policy,
                    },
                )
            })
            .collect())
    }
}

/// One update from the operator, converted from the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Its version.
    pub version: u64,
    /// Replaces everything (true) or applies on top of `base_version`.
    pub snapshot: bool,
    /// The version a delta applies on top of.
    pub base_version: u64,
    /// Policies to add or replace (their rules' own peers; the sets they name are in
    /// `policy_sets`).
    pub upsert_policies: Vec<(String, CompiledPolicy)>,
    /// The sets the rules of upserted policies name, for the policies that name some.
    pub policy_sets: BTreeMap<String, PolicySets>,
    /// Address sets to add or replace.
    pub upsert_sets: Vec<(String, Vec<IpNet>)>,
    /// Address sets to drop.
    pub remove_sets: Vec<String>,
    /// Address sets changed in part (after the upserts and removals).
    pub change_sets: Vec<SetChange>,
    /// Policies to drop.
    pub remove_policies: Vec<String>,
    /// Pods and their policies.
    pub upsert_pods: Vec<(PodRef, Option<String>)>,
    /// Pods gone from the node.
    pub remove_pods: Vec<PodRef>,
    /// New value of the re-check setting, if it changes.
    pub recheck_on_policy_change: Option<bool>,
}

/// Part of an address set changed: `remove` taken out, then `add` put in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetChange {
    /// The set.
    pub id: String,
    /// Addresses and blocks it gains.
    pub add: Vec<IpNet>,
    /// Addresses and blocks it loses.
    pub remove: Vec<IpNet>,
}

/// Why an update was refused (the NACK's reason).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpdateError {
    /// A delta on top of a version the agent does not have.
    #[error("delta {version} applies on top of version {base}, but version {applied} is applied; send a snapshot")]
    WrongBase {
        /// The update's version.
        version: u64,
        /// Its base.
        base: u64,
        /// What the agent has.
        applied: u64,
    },
    /// A version that does not move forward.
    #[error("version {version} is not newer than the applied version {applied}")]
    Stale {
        /// The update's version.
        version: u64,
        /// What the agent has.
        applied: u64,
    },
    /// A pod refers to a policy the update does not carry.
    #[error("pod {pod} refers to policy {policy:?}, which is not defined")]
    UnknownPolicy {
        /// The pod.
        pod: String,
        /// The missing policy.
        policy: String,
    },
    /// A rule names an address set the agent does not have.
    #[error("policy {policy} names address set {set:?}, which is not defined")]
    UnknownSet {
        /// The policy.
        policy: String,
        /// The missing set.
        set: String,
    },
    /// The update could not be converted from the wire.
    #[error("invalid update: {0}")]
    Invalid(String),
}

impl DesiredState {
    /// The state after `update`, or why it is refused. A snapshot may restart the version
    /// sequence (a new operator leader), a delta must follow the applied version.
    pub fn apply(&self, update: &Update) -> Result<DesiredState, UpdateError> {
        let mut next = if update.snapshot {
            if update.version == 0 {
                return Err(UpdateError::Stale {
                    version: 0,
                    applied: self.version,
                });
            }
            DesiredState {
                recheck_on_policy_change: self.recheck_on_policy_change,
                ..DesiredState::default()
            }
        } else {
            if update.base_version != self.version {
                return Err(UpdateError::WrongBase {
                    version: update.version,
                    base: update.base_version,
                    applied: self.version,
                });
            }
            if update.version <= self.version {
                return Err(UpdateError::Stale {
                    version: update.version,
                    applied: self.version,
                });
            }
            self.clone()
        };
        next.version = update.version;
        let mut changed_sets: BTreeSet<&str> = BTreeSet::new();
        for id in &update.remove_sets {
            next.sets.remove(id);
            changed_sets.insert(id);
        }
        for (id, addrs) in &update.upsert_sets {
            next.sets.insert(id.clone(), addrs.clone());
            changed_sets.insert(id);
        }
        for change in &update.change_sets {
            let Some(set) = next.sets.get_mut(&change.id) else {
                return Err(UpdateError::Invalid(format!(
                    "address set {:?} is changed in part but not defined",
                    change.id
                )));
            };
            // The same order and uniqueness as a whole set from the operator (sorted).
            let mut addrs: BTreeSet<IpNet> = set.iter().copied().collect();
            for a in &change.remove {
                addrs.remove(a);
            }
            addrs.extend(change.add.iter().copied());
            *set = addrs.into_iter().collect();
            changed_sets.insert(&change.id);
        }
        for id in &update.remove_policies {
            next.policies.remove(id);
            next.set_policies.remove(id);
        }
        let mut upserted: BTreeSet<&str> = BTreeSet::new();
        for (id, p) in &update.upsert_policies {
            upserted.insert(id);
            match update.policy_sets.get(id) {
                Some(sets) => {
                    let sp = SetPolicy {
                        rules: p.clone(),
                        sets: sets.clone(),
                    };
                    next.policies.insert(id.clone(), fold(id, &sp, &next.sets)?);
                    next.set_policies.insert(id.clone(), sp);
                }
                None => {
                    next.set_policies.remove(id);
                    next.policies.insert(id.clone(), p.clone());
                }
            }
        }
        if !changed_sets.is_empty() {
            let refold: Vec<String> = next
                .set_policies
                .iter()
                .filter(|(id, sp)| {
                    !upserted.contains(id.as_str())
                        && sp.sets.ids().any(|s| changed_sets.contains(s.as_str()))
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in refold {
                if let Some(sp) = next.set_policies.get(&id) {
                    let folded = fold(&id, sp, &next.sets)?;
                    next.policies.insert(id, folded);
                }
            }
        }
        for pod in &update.remove_pods {
            next.pods.remove(&(pod.namespace.clone(), pod.name.clone()));
        }
        for (pod, policy) in &update.upsert_pods {
            next.pods.insert(
                (pod.namespace.clone(), pod.name.clone()),
                PodAssignment {
                    uid: pod.uid.clone(),
                    policy: policy.clone(),
                },
            );
        }
        if let Some(r) = update.recheck_on_policy_change {
            next.recheck_on_policy_change = r;
        }
        for ((ns, name), a) in &next.pods {
            if let Some(p) = &a.policy {
                if !next.policies.contains_key(p) {
                    return Err(UpdateError::UnknownPolicy {
                        pod: format!("{ns}/{name}"),
                        policy: p.clone(),
                    });
                }
            }
        }
        Ok(next)
    }

    /// The uid the operator gives `pod`'s name when it is not `pod`'s: the pod stays pending
    /// (denied) until they agree, which the operator and the logs must say (a static pod whose
    /// mirror the operator read without its config hash, a pod recreated under the same name).
    pub fn other_uid(&self, pod: &PodRef) -> Option<&str> {
        let a = self.pods.get(&(pod.namespace.clone(), pod.name.clone()))?;
        (!a.uid.is_empty() && !pod.uid.is_empty() && a.uid != pod.uid).then_some(a.uid.as_str())
    }

    /// The policy of `pod`. A uid known on both sides must match: a pod recreated under the
    /// same name is another pod until the operator says otherwise.
    pub fn assignment(&self, pod: &PodRef) -> Assignment {
        if self.other_uid(pod).is_some() {
            return Assignment::Unknown;
        }
        match self.pods.get(&(pod.namespace.clone(), pod.name.clone())) {
            None => Assignment::Unknown,
            Some(PodAssignment { policy: None, .. }) => Assignment::NonMember,
            Some(PodAssignment {
                policy: Some(p), ..
            }) => Assignment::Member(p.clone()),
        }
    }
}

/// Policy `id` with the addresses of the sets its rules name among their peers.
fn fold(
    id: &str,
    sp: &SetPolicy,
    sets: &BTreeMap<String, Vec<IpNet>>,
) -> Result<CompiledPolicy, UpdateError> {
    let rules = |rules: &[Rule], named: &[Vec<String>]| -> Result<Vec<Rule>, UpdateError> {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut r = r.clone();
                for set in named.get(i).into_iter().flatten() {
                    let addrs = sets.get(set).ok_or_else(|| UpdateError::UnknownSet {
                        policy: id.to_string(),
                        set: set.clone(),
                    })?;
                    r.peers.extend(addrs.iter().map(|&a| PeerBlock::cidr(a)));
                }
                r.peers.sort();
                r.peers.dedup();
                Ok(r)
            })
            .collect()
    };
    Ok(CompiledPolicy {
        ingress: rules(&sp.rules.ingress, &sp.sets.ingress)?,
        egress: rules(&sp.rules.egress, &sp.sets.egress)?,
        stateless: sp.rules.stateless,
        layered: sp.rules.layered,
        ingress_layers: sp.rules.ingress_layers.clone(),
        egress_layers: sp.rules.egress_layers.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PeerBlock, Protocol, Rule};

    fn pod(name: &str, uid: &str) -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    fn policy(port_any: bool) -> CompiledPolicy {
        CompiledPolicy {
            ingress: vec![Rule {
                protocol: if port_any {
                    Protocol::Any
                } else {
                    Protocol::Tcp
                },
                ports: vec![],
                peers: vec![PeerBlock::cidr("10.0.0.0/8".parse().unwrap())],
                origin: String::new(),
                layer: Default::default(),
            }],
            ..CompiledPolicy::default()
        }
    }

    fn snapshot(version: u64) -> Update {
        Update {
            version,
            snapshot: true,
            upsert_policies: vec![("p1".into(), policy(false))],
            upsert_pods: vec![(pod("web", "u1"), Some("p1".into())), (pod("db", ""), None)],
            recheck_on_policy_change: Some(true),
            ..Update::default()
        }
    }

    #[test]
    fn snapshot_then_delta_build_the_state() {
        let s = DesiredState::default().apply(&snapshot(5)).unwrap();
        assert_eq!(s.version, 5);
        assert_eq!(
            s.assignment(&pod("web", "u1")),
            Assignment::Member("p1".into())
        );
        assert_eq!(s.assignment(&pod("db", "x")), Assignment::NonMember);
        assert_eq!(s.assignment(&pod("cache", "")), Assignment::Unknown);
        let delta = Update {
            version: 6,
            base_version: 5,
            upsert_policies: vec![("p2".into(), policy(true))],
            upsert_pods: vec![(pod("db", ""), Some("p2".into()))],
            remove_pods: vec![pod("web", "")],
            ..Update::default()
        };
        let s = s.apply(&delta).unwrap();
        assert_eq!(s.version, 6);
        assert_eq!(
            s.assignment(&pod("db", "")),
            Assignment::Member("p2".into())
        );
        assert_eq!(s.assignment(&pod("web", "u1")), Assignment::Unknown);
        assert!(
            s.recheck_on_policy_change,
            "unchanged by a delta without settings"
        );
    }

    #[test]
    fn delta_on_the_wrong_base_or_not_newer_is_refused_and_changes_nothing() {
        let s = DesiredState::default().apply(&snapshot(5)).unwrap();
        let wrong = Update {
            version: 8,
            base_version: 7,
            ..Update::default()
        };
        assert_eq!(
            s.apply(&wrong),
            Err(UpdateError::WrongBase {
                version: 8,
                base: 7,
                applied: 5
            })
        );
        let stale = Update {
            version: 5,
            base_version: 5,
            ..Update::default()
        };
        assert!(matches!(s.apply(&stale), Err(UpdateError::Stale { .. })));
    }

    #[test]
    fn snapshot_may_restart_the_version_sequence() {
        let s = DesiredState::default().apply(&snapshot(50)).unwrap();
        let s = s.apply(&snapshot(3)).unwrap();
        assert_eq!(s.version, 3);
    }

    #[test]
    fn pod_referring_to_a_missing_policy_refuses_the_whole_update() {
        let s = DesiredState::default().apply(&snapshot(1)).unwrap();
        let bad = Update {
            version: 2,
            base_version: 1,
            upsert_pods: vec![(pod("api", ""), Some("nope".into()))],
            ..Update::default()
        };
        assert!(matches!(
            s.apply(&bad),
            Err(UpdateError::UnknownPolicy { .. })
        ));
        let removing_in_use = Update {
            version: 2,
            base_version: 1,
            remove_policies: vec!["p1".into()],
            ..Update::default()
        };
        assert!(matches!(
            s.apply(&removing_in_use),
            Err(UpdateError::UnknownPolicy { .. })
        ));
    }

    #[test]
    fn state_with_pods_survives_the_state_file() {
        let s = DesiredState::default().apply(&snapshot(4)).unwrap();
        let json = serde_json::to_vec(&s).expect("the state file is JSON");
        assert_eq!(serde_json::from_slice::<DesiredState>(&json).unwrap(), s);
    }

    #[test]
    fn recreated_pod_with_another_uid_is_unknown() {
        let s = DesiredState::default().apply(&snapshot(1)).unwrap();
        assert_eq!(s.assignment(&pod("web", "u2")), Assignment::Unknown);
        assert_eq!(
            s.assignment(&pod("web", "")),
            Assignment::Member("p1".into())
        );
    }

    fn set_delta(version: u64, sets: &[(&str, &[&str])]) -> Update {
        Update {
            version,
            base_version: version - 1,
            upsert_sets: sets
                .iter()
                .map(|(id, addrs)| {
                    (
                        id.to_string(),
                        addrs.iter().map(|a| a.parse().unwrap()).collect(),
                    )
                })
                .collect(),
            ..Update::default()
        }
    }

    fn allows(s: &DesiredState, policy: &str, from: &str) -> bool {
        s.policies[policy]
            .ingress
            .iter()
            .any(|r| r.allows(6, 80, from.parse().unwrap()))
    }

    #[test]
    fn sets_are_folded_into_the_rules_naming_them_and_a_set_change_refolds_them() {
        let mut update = snapshot(1);
        update.policy_sets.insert(
            "p1".into(),
            PolicySets {
                ingress: vec![vec!["lb".into()]],
                egress: vec![],
            },
        );
        update.upsert_sets = vec![("lb".into(), vec!["192.0.2.1/32".parse().unwrap()])];
        let s = DesiredState::default().apply(&update).unwrap();
        assert!(allows(&s, "p1", "192.0.2.1"), "the set's address");
        assert!(allows(&s, "p1", "10.1.2.3"), "the rule's own block");
        assert!(!allows(&s, "p1", "192.0.2.2"));
        // The set moves: the policy follows without being sent again.
        let s = s
            .apply(&set_delta(2, &[("lb", &["192.0.2.2/32"])]))
            .unwrap();
        assert!(allows(&s, "p1", "192.0.2.2"));
        assert!(!allows(&s, "p1", "192.0.2.1"));
        assert!(allows(&s, "p1", "10.1.2.3"));
        // It survives the state file.
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(serde_json::from_slice::<DesiredState>(&json).unwrap(), s);
        // Replaced by a policy naming no set: the set no longer applies to it.
        let plain = Update {
            version: 3,
            base_version: 2,
            upsert_policies: vec![("p1".into(), policy(false))],
            ..Update::default()
        };
        let s = s.apply(&plain).unwrap();
        assert!(!allows(&s, "p1", "192.0.2.2"));
        assert!(s.set_policies.is_empty());
    }

    #[test]
    fn a_rule_naming_a_missing_set_refuses_the_whole_update() {
        let mut update = snapshot(1);
        update.policy_sets.insert(
            "p1".into(),
            PolicySets {
                ingress: vec![vec!["lb".into()]],
                egress: vec![],
            },
        );
        assert_eq!(
            DesiredState::default().apply(&update),
            Err(UpdateError::UnknownSet {
                policy: "p1".into(),
                set: "lb".into()
            })
        );
        update.upsert_sets = vec![("lb".into(), vec![])];
        let s = DesiredState::default().apply(&update).unwrap();
        assert!(!allows(&s, "p1", "192.0.2.1"), "an empty set adds nobody");
        // Dropping a set a policy still names is refused too.
        let drop = Update {
            version: 2,
            base_version: 1,
            remove_sets: vec!["lb".into()],
            ..Update::default()
        };
        assert!(matches!(
            s.apply(&drop),
            Err(UpdateError::UnknownSet { .. })
        ));
    }

    #[test]
    fn a_set_changed_in_part_gains_and_loses_its_addresses_and_refolds_its_policies() {
        let mut update = snapshot(1);
        update.policy_sets.insert(
            "p1".into(),
            PolicySets {
                ingress: vec![vec!["lb".into()]],
                egress: vec![],
            },
        );
        update.upsert_sets = vec![(
            "lb".into(),
            vec![
                "192.0.2.1/32".parse().unwrap(),
                "192.0.2.3/32".parse().unwrap(),
            ],
        )];
        let s = DesiredState::default().apply(&update).unwrap();
        let change = Update {
            version: 2,
            base_version: 1,
            change_sets: vec![SetChange {
                id: "lb".into(),
                add: vec!["192.0.2.2/32".parse().unwrap()],
                remove: vec!["192.0.2.3/32".parse().unwrap()],
            }],
            ..Update::default()
        };
        let changed = s.apply(&change).unwrap();
        assert!(allows(&changed, "p1", "192.0.2.2"), "the address added");
        assert!(!allows(&changed, "p1", "192.0.2.3"), "the address removed");
        assert!(allows(&changed, "p1", "192.0.2.1"), "the address kept");
        // The same state as the whole set, sorted, would give.
        let whole = s
            .apply(&set_delta(2, &[("lb", &["192.0.2.1/32", "192.0.2.2/32"])]))
            .unwrap();
        assert_eq!(changed, whole);
        // A set the agent does not have cannot be changed in part.
        let unknown = Update {
            version: 2,
            base_version: 1,
            change_sets: vec![SetChange {
                id: "nope".into(),
                ..SetChange::default()
            }],
            ..Update::default()
        };
        assert!(matches!(s.apply(&unknown), Err(UpdateError::Invalid(_))));
    }
}
