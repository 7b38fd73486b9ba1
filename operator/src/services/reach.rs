//! Where egress rules can admit Services, and which (group, Service) pairs a change makes to
//! judge again: the incremental side of [`super`].

use std::collections::HashSet;

use crate::{
    index::{EgressReach, GroupEntry, GroupId, Index, NsSelectorId, StoredPod},
    model::ObjectKey,
    selector::Selector,
    validate::{CheckedPeer, CheckedRule},
};

/// The namespaces with Services that `rule` may admit some of: every one when the rule has an
/// address block or no peers (they admit pods wherever they are), else those its pod peers
/// select pods in. Sorted.
pub(super) fn rule_namespaces<'a>(
    ix: &'a Index,
    g: &'a GroupEntry,
    rule: &'a CheckedRule,
) -> Vec<&'a str> {
    let with_services = ix.service_namespaces.iter().map(String::as_str);
    let Some(peers) = &rule.peers else {
        return with_services.collect();
    };
    if peers.iter().any(|p| matches!(p, CheckedPeer::Block(_))) {
        return with_services.collect();
    }
    let mut out: Vec<&str> = Vec::new();
    for peer in peers {
        match peer {
            CheckedPeer::Block(_) => {}
            CheckedPeer::Group(k) => out.push(&k.namespace),
            CheckedPeer::Pods {
                namespaces: None, ..
            } => out.push(&g.key.namespace),
            CheckedPeer::Pods {
                namespaces: Some(sel),
                ..
            } => {
                // The namespaces with Services are usually fewer than those a selector
                // matches (one that matches every namespace, say).
                if let Some(&sid) = ix.ns_selector_ids.get(sel) {
                    out.extend(
                        ix.service_namespaces
                            .iter()
                            .filter(|ns| ix.ns_selector_matches(sid, ns))
                            .map(String::as_str),
                    );
                }
            }
        }
    }
    out.retain(|ns| ix.service_namespaces.contains(*ns));
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether `rule` of group `g` may admit pods of namespace `ns`.
pub(super) fn reaches(ix: &Index, g: &GroupEntry, rule: &CheckedRule, ns: &str) -> bool {
    let Some(peers) = &rule.peers else {
        return true;
    };
    peers.iter().any(|peer| match peer {
        CheckedPeer::Block(_) => true,
        CheckedPeer::Group(k) => k.namespace == ns,
        CheckedPeer::Pods {
            namespaces: None, ..
        } => g.key.namespace == ns,
        CheckedPeer::Pods {
            namespaces: Some(sel),
            ..
        } => ix
            .ns_selector_ids
            .get(sel)
            .is_some_and(|&sid| ix.ns_selector_matches(sid, ns)),
    })
}

/// Where the egress rules of a group of `namespace` may admit Services: every namespace when a
/// rule admits addresses (an ipBlock, or anyone), else the namespaces its pod peers name
/// (selectors as their ids, which the caller has acquired). Nowhere when `egress` is omitted:
/// that allows everything already.
pub(crate) fn reach(ix: &Index, namespace: &str, egress: Option<&Vec<CheckedRule>>) -> EgressReach {
    let mut r = EgressReach::default();
    for rule in egress.into_iter().flatten() {
        let Some(peers) = &rule.peers else {
            r.everywhere = true;
            // Its named ports resolve on the pods of every namespace, through the selector of
            // every namespace the group registers for them: a namespace appearing or going
            // changes which of its Services' backends the rule admits.
            if rule.has_named_ports() {
                r.selectors
                    .extend(ix.ns_selector_ids.get(&Selector::everything()).copied());
            }
            continue;
        };
        for peer in peers {
            match peer {
                CheckedPeer::Block(_) => r.everywhere = true,
                CheckedPeer::Group(k) => r.namespaces.push(k.namespace.clone()),
                CheckedPeer::Pods {
                    namespaces: None, ..
                } => r.namespaces.push(namespace.to_string()),
                CheckedPeer::Pods {
                    namespaces: Some(sel),
                    ..
                } => r.selectors.extend(ix.ns_selector_ids.get(sel).copied()),
            }
        }
    }
    r.namespaces.sort();
    r.namespaces.dedup();
    r.selectors.sort_unstable();
    r.selectors.dedup();
    r
}

/// (group, Service) pairs to judge again.
pub(crate) type Pairs = HashSet<(GroupId, ObjectKey)>;

/// Marks Services `names` of namespace `ns` to be judged again by every group whose egress
/// rules may admit them.
pub(crate) fn mark_reaching(ix: &Index, pairs: &mut Pairs, ns: &str, names: &[String]) {
    if names.is_empty() {
        return;
    }
    let mut mark = |g: GroupId| {
        for name in names {
            pairs.insert((g, ObjectKey::new(ns, name.clone())));
        }
    };
    ix.egress_everywhere.iter().copied().for_each(&mut mark);
    let Some(entry) = ix.namespaces.get(ns) else {
        return;
    };
    entry.egress_reach.iter().copied().for_each(&mut mark);
    for &sid in &entry.selected_by {
        selector_users(ix, sid).for_each(&mut mark);
    }
}

/// The groups whose egress peers use namespace selector `sid`.
pub(crate) fn selector_users(ix: &Index, sid: NsSelectorId) -> impl Iterator<Item = GroupId> + '_ {
    ix.ns_selectors
        .get(sid)
        .into_iter()
        .flat_map(|sel| sel.groups.keys().copied())
        .filter(move |&g| {
            ix.group(g)
                .is_some_and(|ge| ge.egress_reach.selectors.contains(&sid))
        })
}

/// The Services of namespace `ns` whose ClusterIPs can be admitted, by name.
pub(crate) fn resolvable_in(ix: &Index, ns: &str) -> Vec<String> {
    ix.namespaces
        .get(ns)
        .map(|e| {
            e.services
                .iter()
                .filter(|(_, s)| s.resolvable().is_some())
                .map(|(n, _)| n.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The Services of namespace `ns` a pod change (from `old` to `new`; `None`: absent) can
/// change the verdict on: something a backend is judged on changed (labels, addresses, ports,
/// host network, finished), and the Service selects the pod before or after.
pub(crate) fn touched_by_pod(
    ix: &Index,
    ns: &str,
    old: Option<&StoredPod>,
    new: Option<&StoredPod>,
) -> Vec<String> {
    let same = match (old, new) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.labels == b.labels
                && a.ips == b.ips
                && a.ports == b.ports
                && a.host_network == b.host_network
                && a.terminated == b.terminated
        }
        _ => false,
    };
    let Some(entry) = ix.namespaces.get(ns).filter(|_| !same) else {
        return Vec::new();
    };
    entry
        .services
        .iter()
        .filter(|(_, s)| {
            s.resolvable().is_some_and(|sel| {
                old.is_some_and(|p| sel.matches(&p.labels))
                    || new.is_some_and(|p| sel.matches(&p.labels))
            })
        })
        .map(|(n, _)| n.clone())
        .collect()
}
