//! Address sets: the pods a peer selects, kept apart from the rules that name them.
//!
//! A rule's pod peers (a group, or a pod selector with or without a namespace selector) resolve
//! to a set named for what it selects, not to the addresses themselves. Rules, policies and
//! policy ids therefore do not move when a peer pod's address changes or a pod joins a peer
//! group; only the set does, and a node holds each set its policies name once. A pod that every
//! group admits (a monitoring scraper) changing its address rewrites one set on every node, not
//! every policy of the cluster, which is what keeps that change cheap to compile and to push.
//!
//! Sets are shared by every group naming the same peer (same group, same selectors, same
//! namespace for a namespace-local selector) and live while some registered group names them or
//! some node still holds them.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use crate::{
    fingerprint::{hex, Hasher},
    index::{contributes, Index, NodeId, PodEntry, PodId, Slab, StoredPod},
    model::ObjectKey,
    plan::{AddressSet, SetId},
    selector::Selector,
    validate::CheckedPeer,
};

/// A set's slot.
pub(crate) type SetSlot = usize;

/// What a set selects.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum SetSource {
    /// The members of a group (none while it does not exist or is not accepted).
    Group(ObjectKey),
    /// The pods of one namespace a selector matches (`None`: every pod).
    Local {
        namespace: String,
        pods: Option<Selector>,
    },
    /// The pods a selector matches in the namespaces a namespace selector matches.
    Selected {
        namespaces: Selector,
        pods: Option<Selector>,
    },
}

impl SetSource {
    /// The set a rule peer of a group in `namespace` selects; `None` for an address block.
    pub fn of_peer(namespace: &str, peer: &CheckedPeer) -> Option<SetSource> {
        match peer {
            CheckedPeer::Group(k) => Some(SetSource::Group(k.clone())),
            CheckedPeer::Pods {
                namespaces: None,
                pods,
            } => Some(SetSource::Local {
                namespace: namespace.to_string(),
                pods: pods.clone(),
            }),
            CheckedPeer::Pods {
                namespaces: Some(ns),
                pods,
            } => Some(SetSource::Selected {
                namespaces: ns.clone(),
                pods: pods.clone(),
            }),
            CheckedPeer::Block(_) => None,
        }
    }

    /// The set's id: readable for a group (`group:shop/web`), a fingerprint of the selectors
    /// otherwise (`pods:shop:…`, `pods:*:…`), so `kubesg-agent explain` can name it.
    pub fn id(&self) -> SetId {
        let selectors = |ns: Option<&Selector>, pods: &Option<Selector>| {
            let mut h = Hasher::new("set");
            h.str(&format!("{ns:?}")).str(&format!("{pods:?}"));
            let mut digest = hex(&h.finish());
            digest.truncate(16);
            digest
        };
        match self {
            SetSource::Group(k) => format!("group:{k}"),
            SetSource::Local { namespace, pods } => {
                format!("pods:{namespace}:{}", selectors(None, pods))
            }
            SetSource::Selected { namespaces, pods } => {
                format!("pods:*:{}", selectors(Some(namespaces), pods))
            }
        }
    }

    /// Whether a pod of namespace `ns` with these labels is selected (group sets: never, they
    /// follow membership instead).
    fn selects(&self, ix: &Index, ns: &str, pod: &StoredPod) -> bool {
        let (applies, pods) = match self {
            SetSource::Group(_) => return false,
            SetSource::Local { namespace, pods } => (namespace == ns, pods),
            SetSource::Selected { namespaces, pods } => (
                ix.ns_selector_ids
                    .get(namespaces)
                    .is_some_and(|&sid| ix.ns_selector_matches(sid, ns)),
                pods,
            ),
        };
        applies && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
    }

    /// Calls `f` for every pod the set selects, as the index has the cluster now (pods
    /// without addresses or not enforced included: the caller decides).
    pub fn for_each_pod(&self, ix: &Index, mut f: impl FnMut(PodId, &PodEntry)) {
        match self {
            SetSource::Group(k) => {
                if let Some(g) = ix.group_ids.get(k).and_then(|&g| ix.group(g)) {
                    if g.accepted() {
                        for &id in &g.members {
                            if let Some(p) = ix.pod(id) {
                                f(id, p);
                            }
                        }
                    }
                }
            }
            SetSource::Local { namespace, pods } => {
                ix.for_each_pod_matching(namespace, pods.as_ref(), f)
            }
            SetSource::Selected { namespaces, pods } => {
                match ix
                    .ns_selector_ids
                    .get(namespaces)
                    .and_then(|&id| ix.ns_selectors.get(id))
                {
                    Some(entry) => {
                        for ns in &entry.matching {
                            ix.for_each_pod_matching(ns, pods.as_ref(), &mut f);
                        }
                    }
                    // Every registered group's namespace selectors are in the index; scanning
                    // keeps this correct should one not be.
                    None => {
                        for (name, ns) in &ix.namespaces {
                            if ns.labels.as_ref().is_some_and(|l| namespaces.matches(l)) {
                                ix.for_each_pod_matching(name, pods.as_ref(), &mut f);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The addresses the set holds in the cluster as the index has it now.
    pub fn content(&self, ix: &Index) -> AddressSet {
        let mut out = Vec::new();
        self.for_each_pod(ix, |_, p| {
            if p.enforced() {
                out.extend(p.pod.ips.iter().map(|&ip| ipnet::IpNet::from(ip)));
            }
        });
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// One set.
#[derive(Debug)]
pub(crate) struct SetEntry {
    pub source: SetSource,
    pub id: SetId,
    /// How many times registered groups name it.
    pub users: u32,
    /// Its addresses, shared with the node plans holding it.
    pub content: Arc<AddressSet>,
    /// Nodes holding it, with how many of their policies name it.
    pub nodes: HashMap<NodeId, u32>,
}

/// Every set, and the indexes that find the sets a change can affect.
#[derive(Debug, Default)]
pub(crate) struct SetTable {
    slots: Slab<SetEntry>,
    by_source: HashMap<SetSource, SetSlot>,
    by_id: HashMap<SetId, SetSlot>,
    /// Group key → its members' set.
    by_group: HashMap<ObjectKey, SetSlot>,
    /// Namespace → the namespace-local selector sets of that namespace.
    local: HashMap<String, HashSet<SetSlot>>,
    /// Namespace selector → the sets using it.
    selected: HashMap<Selector, HashSet<SetSlot>>,
    /// Sets that may have lost their last user or node: collected at the end of a change.
    unused: Vec<SetSlot>,
}

impl SetTable {
    /// One more use of the set for `source`, created (empty) on first use; `true` when the
    /// caller must compute its content: a new set, or one nobody named (changes were not
    /// traced to it, e.g. its namespace selector was forgotten) that a node still held.
    pub fn acquire(&mut self, source: SetSource) -> (SetSlot, bool) {
        if let Some(&slot) = self.by_source.get(&source) {
            let mut revived = false;
            if let Some(e) = self.slots.get_mut(slot) {
                revived = e.users == 0;
                e.users += 1;
            }
            return (slot, revived);
        }
        let id = source.id();
        let slot = self.slots.insert(SetEntry {
            source: source.clone(),
            id: id.clone(),
            users: 1,
            content: Arc::new(Vec::new()),
            nodes: HashMap::new(),
        });
        match &source {
            SetSource::Group(k) => {
                self.by_group.insert(k.clone(), slot);
            }
            SetSource::Local { namespace, .. } => {
                self.local
                    .entry(namespace.clone())
                    .or_default()
                    .insert(slot);
            }
            SetSource::Selected { namespaces, .. } => {
                self.selected
                    .entry(namespaces.clone())
                    .or_default()
                    .insert(slot);
            }
        }
        self.by_id.insert(id, slot);
        self.by_source.insert(source, slot);
        (slot, true)
    }

    /// Undoes one [`SetTable::acquire`]. The set stays until no node holds it either.
    pub fn release(&mut self, slot: SetSlot) {
        if let Some(e) = self.slots.get_mut(slot) {
            e.users = e.users.saturating_sub(1);
            self.unused.push(slot);
        }
    }

    /// Forgets the sets nobody names and no node holds.
    pub fn collect_unused(&mut self) {
        for slot in std::mem::take(&mut self.unused) {
            let dead = self
                .slots
                .get(slot)
                .is_some_and(|e| e.users == 0 && e.nodes.is_empty());
            if !dead {
                continue;
            }
            let Some(e) = self.slots.remove(slot) else {
                continue;
            };
            self.by_source.remove(&e.source);
            self.by_id.remove(&e.id);
            match &e.source {
                SetSource::Group(k) => {
                    self.by_group.remove(k);
                }
                SetSource::Local { namespace, .. } => {
                    if let Some(s) = self.local.get_mut(namespace) {
                        s.remove(&slot);
                        if s.is_empty() {
                            self.local.remove(namespace);
                        }
                    }
                }
                SetSource::Selected { namespaces, .. } => {
                    if let Some(s) = self.selected.get_mut(namespaces) {
                        s.remove(&slot);
                        if s.is_empty() {
                            self.selected.remove(namespaces);
                        }
                    }
                }
            }
        }
    }

    /// A set.
    pub fn get(&self, slot: SetSlot) -> Option<&SetEntry> {
        self.slots.get(slot)
    }

    /// The set of a group's members, if some group names it.
    pub fn of_group(&self, key: &ObjectKey) -> Option<SetSlot> {
        self.by_group.get(key).copied()
    }

    /// The sets using a namespace selector.
    pub fn using_ns_selector(&self, sel: &Selector) -> impl Iterator<Item = SetSlot> + '_ {
        self.selected.get(sel).into_iter().flatten().copied()
    }

    /// Recomputes a set; the new content when it changed.
    pub fn refresh(&mut self, ix: &Index, slot: SetSlot) -> Option<Arc<AddressSet>> {
        let e = self.slots.get_mut(slot)?;
        let content = e.source.content(ix);
        if *e.content == content {
            return None;
        }
        e.content = Arc::new(content);
        Some(e.content.clone())
    }

    /// Counts one more (or one less) policy of `node` naming set `id`, and says whether the
    /// node starts or stops holding the set.
    pub fn node_ref(&mut self, id: &str, node: NodeId, add: bool) -> NodeEdge {
        let Some(&slot) = self.by_id.get(id) else {
            return NodeEdge::None;
        };
        let Some(e) = self.slots.get_mut(slot) else {
            return NodeEdge::None;
        };
        if add {
            let n = e.nodes.entry(node).or_default();
            *n += 1;
            if *n == 1 {
                return NodeEdge::Added(e.content.clone());
            }
        } else if let Some(n) = e.nodes.get_mut(&node) {
            *n -= 1;
            if *n == 0 {
                e.nodes.remove(&node);
                self.unused.push(slot);
                return NodeEdge::Removed;
            }
        }
        NodeEdge::None
    }

    /// The sets a pod change in namespace `ns` affects: the pod starts or stops being selected,
    /// or it is selected and its addresses changed. (Group sets follow membership instead.)
    pub fn affected_by_pod(
        &self,
        ix: &Index,
        ns: &str,
        old: Option<&StoredPod>,
        new: Option<&StoredPod>,
        out: &mut HashSet<SetSlot>,
    ) {
        let old = old.filter(|p| contributes(p));
        let new = new.filter(|p| contributes(p));
        let ips_changed = match (old, new) {
            (None, None) => return,
            (Some(a), Some(b)) => {
                if a.labels == b.labels && a.ips == b.ips {
                    return;
                }
                a.ips != b.ips
            }
            _ => true,
        };
        let mut candidates: Vec<SetSlot> =
            self.local.get(ns).into_iter().flatten().copied().collect();
        if let Some(entry) = ix.namespaces.get(ns) {
            for &sid in &entry.selected_by {
                if let Some(sel) = ix.ns_selectors.get(sid) {
                    candidates.extend(self.using_ns_selector(&sel.selector));
                }
            }
        }
        for slot in candidates {
            let Some(e) = self.slots.get(slot) else {
                continue;
            };
            let was = old.is_some_and(|p| e.source.selects(ix, ns, p));
            let is = new.is_some_and(|p| e.source.selects(ix, ns, p));
            if was != is || (was && ips_changed) {
                out.insert(slot);
            }
        }
    }

    /// How many sets exist.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// What one more or one less reference from a node did.
#[derive(Debug)]
pub(crate) enum NodeEdge {
    /// Nothing the node's plan shows.
    None,
    /// The node now holds the set, with this content.
    Added(Arc<AddressSet>),
    /// The node no longer holds the set.
    Removed,
}
