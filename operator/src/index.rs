//! The compiler's view of the cluster: every object once, with the indexes that let a change be
//! traced to what it affects without scanning the cluster. Pods per namespace and per label
//! (selectors look up candidates by their narrowest `In` requirement), the groups that select
//! peers in a namespace, the namespaces each distinct namespace selector matches, which groups
//! name a group as a peer, and the Services of each namespace with the groups whose egress rules
//! can reach them. Objects live in slabs and refer to each other by index, so the
//! indexes stay small at 150 000 pods.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    model::{Group, NamedPort, ObjectKey, Pod, Service},
    peers::GroupRules,
    plan::PolicyId,
    selector::{Labels, Selector},
    validate::CheckedGroup,
};

/// A pod's slot.
pub(crate) type PodId = usize;
/// A group's slot.
pub(crate) type GroupId = usize;
/// A class's slot (pods sharing groups and named-port resolution, hence a policy).
pub(crate) type ClassId = usize;
/// A distinct namespace selector's slot.
pub(crate) type NsSelectorId = usize;
/// A node name's number (see [`NodeNames`]).
pub(crate) type NodeId = u32;

/// Node names as small numbers: the per-group node counts hold a number, not a copy of the
/// name, which matters with 10 000 groups over 5 000 nodes. A name keeps its number for the
/// compiler's life (a few bytes per node ever seen).
#[derive(Debug, Default)]
pub(crate) struct NodeNames {
    names: Vec<String>,
    ids: HashMap<String, NodeId>,
}

impl NodeNames {
    /// The number of a name, assigned on first sight.
    pub fn id(&mut self, name: &str) -> NodeId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = NodeId::try_from(self.names.len()).unwrap_or(NodeId::MAX);
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    /// The number of a name seen before.
    pub fn get(&self, name: &str) -> Option<NodeId> {
        self.ids.get(name).copied()
    }

    /// The name of a number.
    pub fn name(&self, id: NodeId) -> &str {
        self.names.get(id as usize).map_or("", String::as_str)
    }
}

/// A vector of slots with reuse, so ids stay small and dense.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    pub(crate) fn insert(&mut self, item: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.items[i] = Some(item);
                i
            }
            None => {
                self.items.push(Some(item));
                self.items.len() - 1
            }
        }
    }

    pub(crate) fn reserve(&mut self, n: usize) {
        self.items.reserve_exact(n);
    }

    pub(crate) fn remove(&mut self, i: usize) -> Option<T> {
        let item = self.items.get_mut(i)?.take();
        if item.is_some() {
            self.free.push(i);
        }
        item
    }

    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        self.items.get(i)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i)?.as_mut()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (i, t)))
    }
}

/// Labels as a sorted boxed slice: a third of a `BTreeMap`'s footprint for the handful of
/// labels a pod has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CompactLabels(Box<[(Box<str>, Box<str>)]>);

impl CompactLabels {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl From<&BTreeMap<String, String>> for CompactLabels {
    fn from(m: &BTreeMap<String, String>) -> Self {
        CompactLabels(
            m.iter()
                .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.as_str())))
                .collect(),
        )
    }
}

impl Labels for CompactLabels {
    fn label(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }
}

/// What the compiler keeps of a pod: the model's fields, stored compactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoredPod {
    pub uid: Box<str>,
    pub node: Option<Box<str>>,
    pub labels: CompactLabels,
    pub ips: Box<[IpAddr]>,
    pub ports: Box<[NamedPort]>,
    pub host_network: bool,
    pub terminated: bool,
    pub deleting: bool,
}

impl From<&Pod> for StoredPod {
    fn from(p: &Pod) -> Self {
        StoredPod {
            uid: p.uid.as_str().into(),
            node: p.node.as_deref().map(Into::into),
            labels: CompactLabels::from(&p.labels),
            ips: p.ips.as_slice().into(),
            ports: p.ports.as_slice().into(),
            host_network: p.host_network,
            terminated: p.terminated,
            deleting: p.deleting,
        }
    }
}

impl From<Pod> for StoredPod {
    fn from(p: Pod) -> Self {
        StoredPod {
            uid: p.uid.into(),
            node: p.node.map(Into::into),
            labels: CompactLabels::from(&p.labels),
            ips: p.ips.into(),
            ports: p.ports.into(),
            host_network: p.host_network,
            terminated: p.terminated,
            deleting: p.deleting,
        }
    }
}

/// A pod and what the compiler derived from it.
#[derive(Debug)]
pub(crate) struct PodEntry {
    pub key: ObjectKey,
    pub pod: StoredPod,
    /// Deleted in the change being applied; the slot goes once the change is through.
    pub deleted: bool,
    /// The accepted groups it is a member of, sorted.
    pub member_of: Vec<GroupId>,
    /// Its class, when it is a member of some group.
    pub class: Option<ClassId>,
    /// Where the plan shows it.
    pub placed: Option<Placement>,
}

/// Where the plan shows a pod: its node, its UID, its policy and whether its network is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    pub node: NodeId,
    pub uid: String,
    pub policy: Option<PolicyId>,
    pub set_up: bool,
}

impl PodEntry {
    /// Whether kubesg enforces it (and it can be a member): not host-network, not finished.
    pub fn enforced(&self) -> bool {
        !self.deleted && is_enforced(&self.pod)
    }
}

/// Whether a pod can be a member or a peer at all: host-network pods are not enforced (their
/// address is the node's) and finished pods hold no address.
pub(crate) fn is_enforced(p: &StoredPod) -> bool {
    !p.host_network && !p.terminated
}

/// Whether a pod is somebody's peer when selected: enforced and with an address.
pub(crate) fn contributes(p: &StoredPod) -> bool {
    is_enforced(p) && !p.ips.is_empty()
}

/// A namespace, whether or not its Namespace object exists.
#[derive(Debug, Default)]
pub(crate) struct NsEntry {
    /// Labels; `None`: no Namespace object (deleted, or not seen yet): no namespace selector
    /// matches it, while its pods and groups still compile.
    pub labels: Option<BTreeMap<String, String>>,
    pub pods: HashSet<PodId>,
    /// label key → value → pods.
    pub by_label: HashMap<String, HashMap<String, HashSet<PodId>>>,
    pub groups: HashSet<GroupId>,
    /// Accepted groups of this namespace with a `podSelector`-only peer (peers in this
    /// namespace).
    pub local_peer_groups: HashSet<GroupId>,
    /// Namespace selectors (of accepted groups' peers) that match this namespace.
    pub selected_by: HashSet<NsSelectorId>,
    /// The Services of this namespace, by name.
    pub services: BTreeMap<String, ServiceEntry>,
    /// Accepted groups whose egress peers name this namespace's pods directly (a pod selector
    /// of the group's own namespace, or a group of this namespace): they may admit its
    /// Services' ClusterIPs.
    pub egress_reach: HashSet<GroupId>,
}

/// A Service as the compiler keeps it.
#[derive(Debug)]
pub(crate) struct ServiceEntry {
    pub service: Service,
    /// Its selector, compiled; `None` for a Service without one (its backends are not
    /// resolved).
    pub selector: Option<Selector>,
    /// Its backends, refreshed when it or a pod it selects changes: every group reaching it
    /// judges the same backends, so they are found once.
    pub backends: Backends,
}

/// A Service's backends and where its ports send on them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Backends {
    /// The backend pods, sorted.
    pub pods: Vec<PodId>,
    /// Per port of the Service (in its order): the target port on each backend (in `pods`
    /// order); `None` when a backend lacks a named target port (the port is admitted by no
    /// rule).
    pub targets: Vec<Targets>,
}

/// The target ports of one Service port on its backends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Targets {
    /// On each backend, in [`Backends::pods`] order; `None` where a named target port is not
    /// one of the backend's (connections of its family cannot be admitted then).
    pub each: Vec<Option<u16>>,
    /// The distinct ones, sorted.
    pub distinct: Vec<u16>,
}

impl ServiceEntry {
    /// The entry of a Service: `matchLabels`-style selector compiled once.
    pub fn new(service: Service) -> Self {
        let selector = (!service.selector.is_empty()).then(|| {
            Selector::from_requirements(
                service
                    .selector
                    .iter()
                    .map(|(k, v)| crate::selector::Requirement::In {
                        key: k.clone(),
                        values: vec![v.clone()],
                    })
                    .collect(),
            )
        });
        ServiceEntry {
            service,
            selector,
            backends: Backends::default(),
        }
    }

    /// Its selector when its ClusterIPs can be admitted at all: it selects pods, has a
    /// ClusterIP and a port.
    pub fn resolvable(&self) -> Option<&Selector> {
        self.selector
            .as_ref()
            .filter(|_| !self.service.cluster_ips.is_empty() && !self.service.ports.is_empty())
    }
}

/// The namespaces whose Services a group's egress rules may admit (see [`crate::services`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EgressReach {
    /// Some egress rule admits addresses (an ipBlock, or anyone): Services of every namespace.
    pub everywhere: bool,
    /// Namespaces named directly (the group's own for a pod selector, a named group's).
    pub namespaces: Vec<String>,
    /// Namespace selectors of egress peers.
    pub selectors: Vec<NsSelectorId>,
}

/// A peer given by selectors, as registered for change tracking.
#[derive(Debug, Clone)]
pub(crate) struct PodPeer {
    /// `None`: the group's own namespace.
    pub namespaces: Option<NsSelectorId>,
    /// `None`: every pod of those namespaces.
    pub pods: Option<Selector>,
}

/// A group and what the compiler derived from it.
#[derive(Debug)]
pub(crate) struct GroupEntry {
    pub key: ObjectKey,
    pub group: Group,
    /// The checked spec, or why it is not accepted.
    pub checked: Result<CheckedGroup, String>,
    /// Deleted in the change being applied.
    pub deleted: bool,
    /// Registered in the indexes (accepted when registered).
    pub registered: bool,
    /// Groups its rules name as peers (while registered).
    pub named: Vec<ObjectKey>,
    /// Peers given by selectors (while registered).
    pub pod_peers: Vec<PodPeer>,
    /// The address sets its rules name (while registered), one entry per use.
    pub sets: Vec<crate::sets::SetSlot>,
    /// Some egress rule uses named ports: those resolve on each peer pod, inline in the rule,
    /// so a change to a peer pod redoes this group's rules (other peers go through sets).
    pub inline_peers: bool,
    /// Where its egress rules may admit Services (while registered).
    pub egress_reach: EgressReach,
    pub members: HashSet<PodId>,
    /// node → members on it.
    pub member_nodes: HashMap<NodeId, u32>,
    /// node → reasons it is in the report: one per member node of this group and one per
    /// member node of each accepted group naming it.
    pub report_nodes: HashMap<NodeId, u32>,
    /// The resolved rules.
    pub rules: Arc<GroupRules>,
    /// What its egress rules make of Services ([`crate::services`]): rules gained, ClusterIPs
    /// their blocks must except, per Service (only those concerning some), kept apart so a
    /// Service is judged again alone.
    pub service_rules: BTreeMap<ObjectKey, crate::services::ServiceVerdict>,
    /// Classes whose groups include this one.
    pub classes: HashSet<ClassId>,
}

impl GroupEntry {
    /// Whether it is valid and not being deleted: only then it has members and rules.
    pub fn accepted(&self) -> bool {
        !self.deleted && self.checked.is_ok()
    }
}

/// A distinct namespace selector, shared by every peer that uses it.
#[derive(Debug)]
pub(crate) struct NsSelectorEntry {
    pub selector: Selector,
    /// group → peers of it using this selector.
    pub groups: HashMap<GroupId, u32>,
    /// Namespaces (with a Namespace object) it matches.
    pub matching: HashSet<String>,
}

/// Every object once, and the indexes.
#[derive(Debug, Default)]
pub(crate) struct Index {
    pub pods: Slab<PodEntry>,
    pub pod_ids: HashMap<ObjectKey, PodId>,
    pub namespaces: HashMap<String, NsEntry>,
    pub groups: Slab<GroupEntry>,
    pub group_ids: HashMap<ObjectKey, GroupId>,
    /// group key (existing or not) → accepted groups naming it as a peer.
    pub referrers: HashMap<ObjectKey, HashSet<GroupId>>,
    pub ns_selectors: Slab<NsSelectorEntry>,
    pub ns_selector_ids: HashMap<Selector, NsSelectorId>,
    /// Accepted groups with an egress rule admitting addresses (ipBlock or anyone): they may
    /// admit the ClusterIPs of Services in every namespace.
    pub egress_everywhere: HashSet<GroupId>,
    /// Namespaces with at least one Service, sorted.
    pub service_namespaces: std::collections::BTreeSet<String>,
    pub nodes: NodeNames,
}

impl Index {
    /// The pod in a slot that is known to be live.
    pub fn pod(&self, id: PodId) -> Option<&PodEntry> {
        self.pods.get(id)
    }

    /// The group in a slot.
    pub fn group(&self, id: GroupId) -> Option<&GroupEntry> {
        self.groups.get(id)
    }

    /// A namespace's entry, created empty (no labels) when first named.
    pub fn ns_mut(&mut self, name: &str) -> &mut NsEntry {
        self.namespaces.entry(name.to_string()).or_default()
    }

    /// Adds a pod to its namespace's pod and label indexes.
    pub fn index_pod(&mut self, id: PodId) {
        let Some(p) = self.pods.get(id) else { return };
        let ns = self.namespaces.entry(p.key.namespace.clone()).or_default();
        ns.pods.insert(id);
        for (k, v) in p.pod.labels.iter() {
            ns.by_label
                .entry(k.to_string())
                .or_default()
                .entry(v.to_string())
                .or_default()
                .insert(id);
        }
    }

    /// Removes a pod from its namespace's pod and label indexes.
    pub fn unindex_pod(&mut self, id: PodId) {
        let Some(p) = self.pods.get(id) else { return };
        let Some(ns) = self.namespaces.get_mut(&p.key.namespace) else {
            return;
        };
        ns.pods.remove(&id);
        for (k, v) in p.pod.labels.iter() {
            if let Some(values) = ns.by_label.get_mut(k) {
                if let Some(set) = values.get_mut(v) {
                    set.remove(&id);
                    if set.is_empty() {
                        values.remove(v);
                    }
                }
                if values.is_empty() {
                    ns.by_label.remove(k);
                }
            }
        }
    }

    /// Calls `f` for every live pod of `ns` whose labels match `sel` (`None`: every pod), looking
    /// candidates up by the selector's narrowest `In` requirement when it has one.
    pub fn for_each_pod_matching(
        &self,
        ns: &str,
        sel: Option<&Selector>,
        mut f: impl FnMut(PodId, &PodEntry),
    ) {
        let Some(entry) = self.namespaces.get(ns) else {
            return;
        };
        let mut visit = |id: PodId| {
            if let Some(p) = self.pods.get(id) {
                if sel.is_none_or(|s| s.matches(&p.pod.labels)) {
                    f(id, p);
                }
            }
        };
        match sel.and_then(Selector::narrowest_in) {
            Some((key, values)) => {
                let Some(by_value) = entry.by_label.get(key) else {
                    return;
                };
                for v in values {
                    for &id in by_value.get(v).into_iter().flatten() {
                        visit(id);
                    }
                }
            }
            None => {
                for &id in &entry.pods {
                    visit(id);
                }
            }
        }
    }

    /// Registers that a peer of group `g` uses namespace selector `sel`; computes which
    /// namespaces it matches the first time the selector is seen.
    pub fn acquire_ns_selector(&mut self, sel: &Selector, g: GroupId) -> NsSelectorId {
        let id = match self.ns_selector_ids.get(sel) {
            Some(&id) => id,
            None => {
                let matching: HashSet<String> = self
                    .namespaces
                    .iter()
                    .filter(|(_, ns)| ns.labels.as_ref().is_some_and(|l| sel.matches(l)))
                    .map(|(name, _)| name.clone())
                    .collect();
                let id = self.ns_selectors.insert(NsSelectorEntry {
                    selector: sel.clone(),
                    groups: HashMap::new(),
                    matching: matching.clone(),
                });
                for name in &matching {
                    self.ns_mut(name).selected_by.insert(id);
                }
                self.ns_selector_ids.insert(sel.clone(), id);
                id
            }
        };
        if let Some(e) = self.ns_selectors.get_mut(id) {
            *e.groups.entry(g).or_default() += 1;
        }
        id
    }

    /// Undoes one [`Index::acquire_ns_selector`]; forgets the selector when nobody uses it.
    pub fn release_ns_selector(&mut self, id: NsSelectorId, g: GroupId) {
        let Some(e) = self.ns_selectors.get_mut(id) else {
            return;
        };
        if let Some(n) = e.groups.get_mut(&g) {
            *n -= 1;
            if *n == 0 {
                e.groups.remove(&g);
            }
        }
        if e.groups.is_empty() {
            if let Some(e) = self.ns_selectors.remove(id) {
                self.ns_selector_ids.remove(&e.selector);
                for name in &e.matching {
                    if let Some(ns) = self.namespaces.get_mut(name) {
                        ns.selected_by.remove(&id);
                    }
                }
            }
        }
    }

    /// Whether namespace selector `id` matches namespace `ns`.
    pub fn ns_selector_matches(&self, id: NsSelectorId, ns: &str) -> bool {
        self.ns_selectors
            .get(id)
            .is_some_and(|e| e.matching.contains(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::Requirement;

    #[test]
    fn compact_labels_answer_selectors_like_the_map_they_copy() {
        let map: BTreeMap<String, String> = [("app", "web"), ("tier", "front"), ("z", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let compact = CompactLabels::from(&map);
        for sel in [
            Selector::everything(),
            Selector::from_requirements(vec![Requirement::In {
                key: "app".into(),
                values: vec!["web".into()],
            }]),
            Selector::from_requirements(vec![Requirement::NotIn {
                key: "tier".into(),
                values: vec!["front".into()],
            }]),
            Selector::from_requirements(vec![Requirement::Exists("z".into())]),
            Selector::from_requirements(vec![Requirement::DoesNotExist("a".into())]),
        ] {
            assert_eq!(sel.matches(&compact), sel.matches(&map), "{sel:?}");
        }
        assert_eq!(compact.label("tier"), Some("front"));
        assert_eq!(compact.label("nope"), None);
    }

    #[test]
    fn label_index_finds_candidates_by_the_narrowest_in_requirement() {
        let mut ix = Index::default();
        for (i, app) in ["web", "web", "db"].iter().enumerate() {
            let pod = Pod {
                labels: [("app".to_string(), app.to_string())].into(),
                ..Pod::default()
            };
            let id = ix.pods.insert(PodEntry {
                key: ObjectKey::new("shop", format!("p{i}")),
                pod: StoredPod::from(&pod),
                deleted: false,
                member_of: Vec::new(),
                class: None,
                placed: None,
            });
            ix.index_pod(id);
        }
        let web = Selector::from_requirements(vec![Requirement::In {
            key: "app".into(),
            values: vec!["web".into()],
        }]);
        let mut found = Vec::new();
        ix.for_each_pod_matching("shop", Some(&web), |id, _| found.push(id));
        found.sort();
        assert_eq!(found, vec![0, 1]);
        ix.unindex_pod(0);
        let mut found = Vec::new();
        ix.for_each_pod_matching("shop", Some(&web), |id, _| found.push(id));
        assert_eq!(found, vec![1]);
        let mut all = 0;
        ix.for_each_pod_matching("shop", None, |_, _| all += 1);
        assert_eq!(all, 2);
        ix.for_each_pod_matching("elsewhere", None, |_, _| panic!("no such namespace"));
    }
}
