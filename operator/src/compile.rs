//! The compiler: cluster objects in, per-node plans and per-group reports out.
//!
//! [`compile`] compiles a whole [`Cluster`]; a [`Compiler`] keeps its indexes and the last
//! [`Plan`] and applies one change at a time, recomputing only what the change can affect and
//! telling which nodes' plans and which groups' reports changed (so the push sends deltas to
//! those nodes only, and the status writer touches those groups only). Both are the same code:
//! the full compile is the incremental one with everything marked dirty, which is also what the
//! property test that compares them relies on to be meaningful for every dirty mark.
//!
//! A change flows through fixed stages, each marking work for the later ones only:
//!
//! 1. membership: which pods are members of which groups (a pod's labels, a group's selector);
//! 2. rules: each group's rules with peers resolved ([`crate::peers`]) to address blocks and
//!    address sets: redone when the group or a group it names changes (and, for groups with
//!    egress named ports, which resolve on the peer pods, when a peer pod changes); what egress
//!    rules gain from Services ([`crate::services`]): every Service a group reaches when the
//!    group or a group it names changes, one Service for the groups reaching it when the
//!    Service, a pod it selects, or a namespace selector reaching it changes;
//! 3. sets: the addresses of each address set ([`crate::sets`]) whose pods the change touched
//!    (a member of its group, a pod its selectors match, a namespace its namespace selector
//!    matches), rewritten in the plans of the nodes holding it;
//! 4. classes: pods with the same groups and named-port numbers share a class;
//! 5. policies: each touched class's policy and content-derived id ([`crate::policy`]);
//! 6. placement: each touched pod's entry in its node's plan, and the node's policies and the
//!    sets they name (reference-counted, so a policy leaves a node with its last pod, a set
//!    with the last policy naming it);
//! 7. reports: members and nodes of each touched group.
//!
//! Pure: no I/O, no clock; the same objects always compile to the same plan.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    mem,
    sync::Arc,
};

use crate::{
    changes::ClusterChange,
    index::{
        contributes, ClassId, EgressReach, GroupEntry, GroupId, Index, NodeId, Placement, PodEntry,
        PodId, PodPeer, ServiceEntry, Slab, StoredPod,
    },
    model::{Cluster, Group, Namespace, ObjectKey, Pod, Service},
    peers::{self, GroupRules},
    plan::{GroupReport, NodePlan, Plan, PlannedPolicy, PodPlan, PolicyId},
    policy::{self, ClassKey},
    selector::Selector,
    services,
    sets::{NodeEdge, SetSlot, SetSource, SetTable},
    validate::{validate_group, CheckedPeer, CheckedRule},
};

/// What a change did to the plan: the nodes whose [`NodePlan`] changed (created, changed or
/// removed) and the groups whose [`GroupReport`] changed (created, changed or removed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanChanges {
    /// Nodes to push to.
    pub nodes: BTreeSet<String>,
    /// Groups whose status to rewrite.
    pub groups: BTreeSet<ObjectKey>,
}

impl PlanChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.groups.is_empty()
    }

    /// Adds another change's effects.
    pub fn merge(&mut self, other: PlanChanges) {
        self.nodes.extend(other.nodes);
        self.groups.extend(other.groups);
    }
}

/// Compiles a whole cluster.
pub fn compile(cluster: &Cluster) -> Plan {
    Compiler::new(cluster).into_plan()
}

/// Pods sharing groups and named-port numbers, hence one policy.
#[derive(Debug)]
struct ClassEntry {
    key: ClassKey,
    pods: HashSet<PodId>,
    /// The id of its policy (nodes hold the content).
    policy: Option<PolicyId>,
}

/// Per node: placed pods and how many of them use each policy.
#[derive(Debug, Default)]
struct NodeState {
    pods: u32,
    policies: HashMap<PolicyId, u32>,
}

/// Work marked for the stages of the current change.
#[derive(Debug, Default)]
struct Dirty {
    group_members: HashSet<GroupId>,
    pod_members: HashSet<PodId>,
    /// Pods whose addresses or ports changed while members: their groups' address sets need
    /// recomputing (and the rules of groups naming them inline, with egress named ports).
    peer_changed: HashSet<PodId>,
    rules: HashSet<GroupId>,
    sets: HashSet<SetSlot>,
    class_of: HashSet<PodId>,
    policies: HashSet<ClassId>,
    placement: HashSet<PodId>,
    reports: HashSet<GroupId>,
    /// Groups that judge every Service they reach again: their spec, or a group they name,
    /// changed.
    all_services: HashSet<GroupId>,
    /// (group, Service) pairs to judge again (groups in `all_services` do every one).
    service_pairs: services::Pairs,
    /// Services whose backends to find again (before any verdict on them).
    service_backends: HashSet<ObjectKey>,
}

/// The incremental compiler: the cluster, its indexes and the current plan.
#[derive(Debug, Default)]
pub struct Compiler {
    ix: Index,
    sets: SetTable,
    classes: Slab<ClassEntry>,
    class_ids: HashMap<ClassKey, ClassId>,
    nodes: BTreeSet<String>,
    node_state: HashMap<NodeId, NodeState>,
    plan: Plan,
    dirty: Dirty,
    changes: PlanChanges,
    removed_pods: Vec<PodId>,
    removed_groups: Vec<GroupId>,
    /// Every policy some node holds, built once and shared by the node plans (an id is a hash
    /// of the content, so an id always stands for the same policy).
    built: HashMap<PolicyId, Arc<PlannedPolicy>>,
}

impl Compiler {
    /// Compiles `cluster` and keeps everything needed to apply changes to it.
    pub fn new(cluster: &Cluster) -> Self {
        let mut c = Compiler::default();
        for (name, ns) in &cluster.namespaces {
            c.ix.ns_mut(name).labels = Some(ns.labels.clone());
        }
        for node in &cluster.nodes {
            c.nodes.insert(node.clone());
            c.ensure_node(node);
        }
        for (key, group) in &cluster.groups {
            c.stage_upsert_group(key.clone(), group.clone());
        }
        // Every group's rules are marked already: the Services only need to be in the index,
        // with their backends.
        for (key, service) in &cluster.services {
            c.ix.ns_mut(&key.namespace)
                .services
                .insert(key.name.clone(), ServiceEntry::new(service.clone()));
            c.ix.service_namespaces.insert(key.namespace.clone());
            c.dirty.service_backends.insert(key.clone());
        }
        // Pods go in without per-pod membership and peer checks: every group's membership
        // and rules are already marked, and computing membership per group uses the label
        // index instead of matching every pod against every group of its namespace.
        // Room for some growth: growing the slot vector past 150 000 pods copies it whole, a
        // latency spike in the change that does it.
        let n = cluster.pods.len();
        c.ix.pods.reserve(n + n / 16);
        c.ix.pod_ids.reserve(n);
        for (key, pod) in &cluster.pods {
            let id = c.ix.pods.insert(PodEntry {
                key: key.clone(),
                pod: StoredPod::from(pod),
                deleted: false,
                member_of: Vec::new(),
                class: None,
                placed: None,
            });
            c.ix.pod_ids.insert(key.clone(), id);
            c.ix.index_pod(id);
            c.dirty.class_of.insert(id);
            c.dirty.placement.insert(id);
        }
        c.flush();
        c
    }

    /// The current plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The plan, consuming the compiler.
    pub fn into_plan(self) -> Plan {
        self.plan
    }

    /// A pod appeared or changed.
    pub fn upsert_pod(&mut self, key: ObjectKey, pod: Pod) -> PlanChanges {
        self.stage_upsert_pod(key, pod);
        self.flush()
    }

    /// A pod is gone.
    pub fn delete_pod(&mut self, key: &ObjectKey) -> PlanChanges {
        self.stage_delete_pod(key);
        self.flush()
    }

    /// A namespace appeared or its labels changed.
    pub fn upsert_namespace(&mut self, name: &str, ns: Namespace) -> PlanChanges {
        self.stage_namespace(name, Some(ns.labels));
        self.flush()
    }

    /// A namespace is gone: its pods and groups still compile, namespace selectors no longer
    /// match it.
    pub fn delete_namespace(&mut self, name: &str) -> PlanChanges {
        self.stage_namespace(name, None);
        self.flush()
    }

    /// A group appeared or changed.
    pub fn upsert_group(&mut self, key: ObjectKey, group: Group) -> PlanChanges {
        self.stage_upsert_group(key, group);
        self.flush()
    }

    /// A group is gone.
    pub fn delete_group(&mut self, key: &ObjectKey) -> PlanChanges {
        self.stage_delete_group(key);
        self.flush()
    }

    /// A Service appeared or changed.
    pub fn upsert_service(&mut self, key: ObjectKey, service: Service) -> PlanChanges {
        self.stage_service(&key, Some(service));
        self.flush()
    }

    /// A Service is gone.
    pub fn delete_service(&mut self, key: &ObjectKey) -> PlanChanges {
        self.stage_service(key, None);
        self.flush()
    }

    /// A node appeared: it gets a plan (empty until pods run there).
    pub fn upsert_node(&mut self, name: &str) -> PlanChanges {
        if self.nodes.insert(name.to_string()) {
            self.ensure_node(name);
        }
        self.flush()
    }

    /// A node is gone: its plan goes with it, unless pods still name it.
    pub fn delete_node(&mut self, name: &str) -> PlanChanges {
        if self.nodes.remove(name) {
            self.maybe_drop_node(name);
        }
        self.flush()
    }

    /// Applies one change.
    pub fn apply(&mut self, change: &ClusterChange) -> PlanChanges {
        self.stage(change);
        self.flush()
    }

    /// Applies several changes at once (e.g. a rescan of a manifests directory): the stages
    /// run once for all of them. The nodes reported may include one whose plan changed and
    /// changed back within the batch (an empty delta for the push); a changed one is never
    /// missed.
    pub fn apply_all<'a>(
        &mut self,
        changes: impl IntoIterator<Item = &'a ClusterChange>,
    ) -> PlanChanges {
        for c in changes {
            self.stage(c);
        }
        self.flush()
    }

    fn stage(&mut self, change: &ClusterChange) {
        match change {
            ClusterChange::UpsertNamespace(n, ns) => {
                self.stage_namespace(n, Some(ns.labels.clone()))
            }
            ClusterChange::DeleteNamespace(n) => self.stage_namespace(n, None),
            ClusterChange::UpsertPod(k, p) => self.stage_upsert_pod(k.clone(), p.clone()),
            ClusterChange::DeletePod(k) => self.stage_delete_pod(k),
            ClusterChange::UpsertNode(n) => {
                if self.nodes.insert(n.clone()) {
                    self.ensure_node(n);
                }
            }
            ClusterChange::DeleteNode(n) => {
                if self.nodes.remove(n) {
                    self.maybe_drop_node(n);
                }
            }
            ClusterChange::UpsertGroup(k, g) => self.stage_upsert_group(k.clone(), g.clone()),
            ClusterChange::DeleteGroup(k) => self.stage_delete_group(k),
            ClusterChange::UpsertService(k, svc) => self.stage_service(k, Some(svc.clone())),
            ClusterChange::DeleteService(k) => self.stage_service(k, None),
        }
    }

    /// Records a Service (`None`: deleted) and marks the rules of the groups that may admit the
    /// Services of its namespace.
    fn stage_service(&mut self, key: &ObjectKey, service: Option<Service>) {
        let ns = self.ix.ns_mut(&key.namespace);
        let old = ns.services.get(&key.name);
        if old.map(|e| &e.service) == service.as_ref() {
            return;
        }
        let mattered = old.is_some_and(|e| e.resolvable().is_some());
        let matters = match service {
            Some(s) => {
                let e = ServiceEntry::new(s);
                let matters = e.resolvable().is_some();
                ns.services.insert(key.name.clone(), e);
                matters
            }
            None => {
                ns.services.remove(&key.name);
                false
            }
        };
        if ns.services.is_empty() {
            self.ix.service_namespaces.remove(&key.namespace);
        } else {
            self.ix.service_namespaces.insert(key.namespace.clone());
        }
        if matters {
            self.dirty.service_backends.insert(key.clone());
        }
        if mattered || matters {
            services::mark_reaching(
                &self.ix,
                &mut self.dirty.service_pairs,
                &key.namespace,
                std::slice::from_ref(&key.name),
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // Staging: record the change in the index and mark what it can affect.

    fn stage_upsert_pod(&mut self, key: ObjectKey, pod: Pod) {
        let pod = StoredPod::from(pod);
        let Some(&id) = self.ix.pod_ids.get(&key) else {
            mark_peer_relevance(
                &self.ix,
                &self.sets,
                &mut self.dirty,
                &key.namespace,
                None,
                Some(&pod),
            );
            let id = self.ix.pods.insert(PodEntry {
                key: key.clone(),
                pod,
                deleted: false,
                member_of: Vec::new(),
                class: None,
                placed: None,
            });
            self.ix.pod_ids.insert(key, id);
            self.ix.index_pod(id);
            self.dirty.pod_members.insert(id);
            self.dirty.class_of.insert(id);
            self.dirty.placement.insert(id);
            return;
        };
        let Some(entry) = self.ix.pods.get(id) else {
            return;
        };
        if !entry.deleted && entry.pod == pod {
            return;
        }
        let was_deleted = entry.deleted;
        let old = (!was_deleted).then_some(&entry.pod);
        mark_peer_relevance(
            &self.ix,
            &self.sets,
            &mut self.dirty,
            &key.namespace,
            old,
            Some(&pod),
        );
        // A pod deleted earlier in the same batch still holds its memberships: the groups
        // naming them see it as it was before the deletion.
        let old_contributes = contributes(&entry.pod);
        let new_contributes = contributes(&pod);
        let peer_data_changed = (old_contributes || new_contributes)
            && (old_contributes != new_contributes
                || entry.pod.ips != pod.ips
                || entry.pod.ports != pod.ports);
        let relabel = was_deleted || entry.pod.labels != pod.labels;
        let old_node = entry.pod.node.clone();
        let member_of = entry.member_of.clone();
        if old_node != pod.node {
            let old_node = old_node.map(|n| self.ix.nodes.id(&n));
            let new_node = pod.node.as_deref().map(|n| self.ix.nodes.id(n));
            for &g in &member_of {
                if let Some(n) = old_node {
                    member_node_change(&mut self.ix, &mut self.dirty, g, n, false);
                }
                if let Some(n) = new_node {
                    member_node_change(&mut self.ix, &mut self.dirty, g, n, true);
                }
            }
        }
        if relabel && !was_deleted {
            self.ix.unindex_pod(id);
        }
        if let Some(entry) = self.ix.pods.get_mut(id) {
            entry.pod = pod;
            entry.deleted = false;
        }
        if relabel {
            self.ix.index_pod(id);
        }
        self.dirty.pod_members.insert(id);
        self.dirty.class_of.insert(id);
        self.dirty.placement.insert(id);
        if peer_data_changed {
            self.dirty.peer_changed.insert(id);
        }
    }

    fn stage_delete_pod(&mut self, key: &ObjectKey) {
        let Some(&id) = self.ix.pod_ids.get(key) else {
            return;
        };
        let Some(entry) = self.ix.pods.get(id) else {
            return;
        };
        if entry.deleted {
            return;
        }
        mark_peer_relevance(
            &self.ix,
            &self.sets,
            &mut self.dirty,
            &key.namespace,
            Some(&entry.pod),
            None,
        );
        self.ix.unindex_pod(id);
        if let Some(entry) = self.ix.pods.get_mut(id) {
            entry.deleted = true;
        }
        self.dirty.pod_members.insert(id);
        self.dirty.class_of.insert(id);
        self.dirty.placement.insert(id);
        self.removed_pods.push(id);
    }

    fn stage_namespace(
        &mut self,
        name: &str,
        labels: Option<std::collections::BTreeMap<String, String>>,
    ) {
        let ns = self.ix.ns_mut(name);
        if ns.labels == labels {
            return;
        }
        ns.labels = labels;
        let labels = ns.labels.clone();
        let flips: Vec<(usize, bool)> = self
            .ix
            .ns_selectors
            .iter()
            .filter_map(|(sid, sel)| {
                let was = sel.matching.contains(name);
                let now = labels.as_ref().is_some_and(|l| sel.selector.matches(l));
                (was != now).then_some((sid, now))
            })
            .collect();
        // The pods of the namespace start or stop being peers of the egress rules using a
        // flipped selector: what those rules admit of its Services may change.
        let in_namespace = if flips.is_empty() {
            Vec::new()
        } else {
            services::resolvable_in(&self.ix, name)
        };
        for &(sid, _) in flips.iter().filter(|_| !in_namespace.is_empty()) {
            for g in services::selector_users(&self.ix, sid) {
                for svc in &in_namespace {
                    self.dirty
                        .service_pairs
                        .insert((g, ObjectKey::new(name, svc.clone())));
                }
            }
        }
        for (sid, now) in flips {
            let Some(sel) = self.ix.ns_selectors.get_mut(sid) else {
                continue;
            };
            if now {
                sel.matching.insert(name.to_string());
            } else {
                sel.matching.remove(name);
            }
            let users: Vec<GroupId> = sel.groups.keys().copied().collect();
            let selector = sel.selector.clone();
            self.dirty.rules.extend(
                users
                    .into_iter()
                    .filter(|&g| self.ix.group(g).is_some_and(|e| e.inline_peers)),
            );
            self.dirty
                .sets
                .extend(self.sets.using_ns_selector(&selector));
            let ns = self.ix.ns_mut(name);
            if now {
                ns.selected_by.insert(sid);
            } else {
                ns.selected_by.remove(&sid);
            }
        }
    }

    fn stage_upsert_group(&mut self, key: ObjectKey, group: Group) {
        let (id, fresh) = match self.ix.group_ids.get(&key) {
            Some(&id) => {
                let Some(e) = self.ix.groups.get(id) else {
                    return;
                };
                if !e.deleted && e.group == group {
                    return;
                }
                // The layers a policy lists come from its groups' kinds, not their rules: a
                // NetworkPolicy whose `policyTypes` alone changed (same generation, as in a
                // manifests directory) changes its members' policies with the same rules.
                if e.group.kind != group.kind {
                    self.dirty.policies.extend(e.classes.iter().copied());
                }
                self.unregister(id);
                (id, false)
            }
            None => {
                let id = self.ix.groups.insert(GroupEntry {
                    key: key.clone(),
                    group: group.clone(),
                    checked: Err(String::new()),
                    deleted: false,
                    registered: false,
                    named: Vec::new(),
                    pod_peers: Vec::new(),
                    sets: Vec::new(),
                    inline_peers: false,
                    egress_reach: EgressReach::default(),
                    members: HashSet::new(),
                    member_nodes: HashMap::new(),
                    report_nodes: HashMap::new(),
                    rules: Arc::new(GroupRules::default()),
                    service_rules: BTreeMap::new(),
                    classes: HashSet::new(),
                });
                self.ix.group_ids.insert(key.clone(), id);
                (id, true)
            }
        };
        let checked = validate_group(&key.namespace, &group).map_err(|e| e.to_string());
        if let Some(e) = self.ix.groups.get_mut(id) {
            e.group = group;
            e.checked = checked;
            e.deleted = false;
        }
        self.ix.ns_mut(&key.namespace).groups.insert(id);
        self.register(id);
        if fresh {
            // Groups that already name this one put their members' nodes in its report.
            let nodes: Vec<NodeId> = self
                .ix
                .referrers
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|&r| self.ix.group(r))
                .flat_map(|r| r.member_nodes.keys().copied())
                .collect();
            for n in nodes {
                report_node_change(&mut self.ix, &mut self.dirty, id, n, true);
            }
        }
        self.dirty.group_members.insert(id);
        self.dirty.rules.insert(id);
        self.dirty.all_services.insert(id);
        self.dirty.reports.insert(id);
        mark_referrers(&self.ix, &mut self.dirty, &key);
    }

    fn stage_delete_group(&mut self, key: &ObjectKey) {
        let Some(&id) = self.ix.group_ids.get(key) else {
            return;
        };
        if self.ix.group(id).is_none_or(|e| e.deleted) {
            return;
        }
        self.unregister(id);
        if let Some(e) = self.ix.groups.get_mut(id) {
            e.deleted = true;
        }
        self.ix.ns_mut(&key.namespace).groups.remove(&id);
        self.dirty.group_members.insert(id);
        self.dirty.rules.insert(id);
        self.dirty.all_services.insert(id);
        mark_referrers(&self.ix, &mut self.dirty, key);
        self.removed_groups.push(id);
    }

    /// Puts an accepted group in the indexes that trace changes to it: the groups it names,
    /// its namespace's local-peer list, the namespace selectors of its peers.
    fn register(&mut self, id: GroupId) {
        let Some(e) = self.ix.groups.get(id) else {
            return;
        };
        let Ok(checked) = &e.checked else { return };
        if e.deleted {
            return;
        }
        let mut named = Vec::new();
        let mut selector_peers = Vec::new();
        let mut sources = Vec::new();
        let inline_peers = checked
            .egress
            .iter()
            .flatten()
            .any(CheckedRule::has_named_ports);
        // An egress rule open to anyone resolves its named ports on every pod: registered as a
        // peer selecting every namespace, so that pods' changes redo its rules.
        if checked
            .egress
            .iter()
            .flatten()
            .any(|r| r.peers.is_none() && r.has_named_ports())
        {
            selector_peers.push((Some(Selector::everything()), None));
        }
        for rule in checked
            .ingress
            .iter()
            .chain(checked.egress.iter())
            .flatten()
        {
            for peer in rule.peers.iter().flatten() {
                sources.extend(SetSource::of_peer(&e.key.namespace, peer));
                match peer {
                    CheckedPeer::Group(k) => named.push(k.clone()),
                    CheckedPeer::Pods { namespaces, pods } => {
                        selector_peers.push((namespaces.clone(), pods.clone()))
                    }
                    CheckedPeer::Block(_) => {}
                }
            }
        }
        named.sort();
        named.dedup();
        sources.sort();
        sources.dedup();
        let ns = e.key.namespace.clone();
        let member_nodes: Vec<NodeId> = e.member_nodes.keys().copied().collect();
        let mut pod_peers = Vec::new();
        let mut local = false;
        for (namespaces, pods) in selector_peers {
            let namespaces = match namespaces {
                None => {
                    local = true;
                    None
                }
                Some(sel) => Some(self.ix.acquire_ns_selector(&sel, id)),
            };
            pod_peers.push(PodPeer { namespaces, pods });
        }
        if local {
            self.ix.ns_mut(&ns).local_peer_groups.insert(id);
        }
        let egress_reach = match self.ix.group(id).and_then(|e| e.checked.as_ref().ok()) {
            Some(checked) => services::reach(&self.ix, &ns, checked.egress.as_ref()),
            None => EgressReach::default(),
        };
        if egress_reach.everywhere {
            self.ix.egress_everywhere.insert(id);
        }
        for n in &egress_reach.namespaces {
            self.ix.ns_mut(n).egress_reach.insert(id);
        }
        for t in &named {
            self.ix.referrers.entry(t.clone()).or_default().insert(id);
            if let Some(&tid) = self.ix.group_ids.get(t) {
                for &n in &member_nodes {
                    report_node_change(&mut self.ix, &mut self.dirty, tid, n, true);
                }
            }
        }
        let mut sets = Vec::with_capacity(sources.len());
        for source in sources {
            let (slot, fresh) = self.sets.acquire(source);
            if fresh {
                self.dirty.sets.insert(slot);
            }
            sets.push(slot);
        }
        if let Some(e) = self.ix.groups.get_mut(id) {
            e.named = named;
            e.pod_peers = pod_peers;
            e.sets = sets;
            e.inline_peers = inline_peers;
            e.egress_reach = egress_reach;
            e.registered = true;
        }
    }

    /// Undoes [`Compiler::register`].
    fn unregister(&mut self, id: GroupId) {
        let Some(e) = self.ix.groups.get_mut(id) else {
            return;
        };
        if !e.registered {
            return;
        }
        e.registered = false;
        let named = mem::take(&mut e.named);
        let pod_peers = mem::take(&mut e.pod_peers);
        let sets = mem::take(&mut e.sets);
        e.inline_peers = false;
        let egress_reach = mem::take(&mut e.egress_reach);
        for slot in sets {
            self.sets.release(slot);
        }
        let ns = e.key.namespace.clone();
        let member_nodes: Vec<NodeId> = e.member_nodes.keys().copied().collect();
        for t in &named {
            if let Some(refs) = self.ix.referrers.get_mut(t) {
                refs.remove(&id);
                if refs.is_empty() {
                    self.ix.referrers.remove(t);
                }
            }
            if let Some(&tid) = self.ix.group_ids.get(t) {
                for &n in &member_nodes {
                    report_node_change(&mut self.ix, &mut self.dirty, tid, n, false);
                }
            }
        }
        for pp in pod_peers {
            if let Some(sid) = pp.namespaces {
                self.ix.release_ns_selector(sid, id);
            }
        }
        self.ix.ns_mut(&ns).local_peer_groups.remove(&id);
        self.ix.egress_everywhere.remove(&id);
        for n in &egress_reach.namespaces {
            if let Some(entry) = self.ix.namespaces.get_mut(n) {
                entry.egress_reach.remove(&id);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // The stages.

    fn flush(&mut self) -> PlanChanges {
        for g in mem::take(&mut self.dirty.group_members) {
            self.recompute_group_members(g);
        }
        for p in mem::take(&mut self.dirty.pod_members) {
            self.recompute_pod_members(p);
        }
        for p in mem::take(&mut self.dirty.peer_changed) {
            let Some(e) = self.ix.pod(p) else { continue };
            for &g in &e.member_of {
                if let Some(ge) = self.ix.group(g) {
                    mark_peer_group(&self.ix, &self.sets, &mut self.dirty, &ge.key);
                }
            }
        }
        for key in mem::take(&mut self.dirty.service_backends) {
            self.refresh_backends(&key);
        }
        for g in mem::take(&mut self.dirty.rules) {
            self.recompute_rules(g);
        }
        let all = mem::take(&mut self.dirty.all_services);
        for &g in &all {
            self.rejudge_all_services(g);
        }
        for (g, service) in mem::take(&mut self.dirty.service_pairs) {
            if !all.contains(&g) {
                self.rejudge_service(g, &service);
            }
        }
        for s in mem::take(&mut self.dirty.sets) {
            self.refresh_set(s);
        }
        for p in mem::take(&mut self.dirty.class_of) {
            self.reclass(p);
        }
        for c in mem::take(&mut self.dirty.policies) {
            self.rebuild_policy(c);
        }
        for p in mem::take(&mut self.dirty.placement) {
            self.place(p);
        }
        for g in mem::take(&mut self.dirty.reports) {
            self.report(g);
        }
        for id in mem::take(&mut self.removed_pods) {
            if self.ix.pod(id).is_some_and(|e| e.deleted) {
                if let Some(e) = self.ix.pods.remove(id) {
                    self.ix.pod_ids.remove(&e.key);
                }
            }
        }
        for id in mem::take(&mut self.removed_groups) {
            if self.ix.group(id).is_some_and(|e| e.deleted) {
                if let Some(e) = self.ix.groups.remove(id) {
                    self.ix.group_ids.remove(&e.key);
                    if self.plan.groups.remove(&e.key).is_some() {
                        self.changes.groups.insert(e.key);
                    }
                }
            }
        }
        self.sets.collect_unused();
        mem::take(&mut self.changes)
    }

    fn recompute_group_members(&mut self, g: GroupId) {
        let Some(e) = self.ix.group(g) else { return };
        let mut now = HashSet::new();
        if let (Ok(checked), true) = (&e.checked, e.accepted()) {
            self.ix.for_each_pod_matching(
                &e.key.namespace,
                Some(&checked.pod_selector),
                |id, p| {
                    if p.enforced() {
                        now.insert(id);
                    }
                },
            );
        }
        let leaving: Vec<PodId> = e.members.difference(&now).copied().collect();
        let joining: Vec<PodId> = now.difference(&e.members).copied().collect();
        for p in leaving {
            self.set_member(g, p, false);
        }
        for p in joining {
            self.set_member(g, p, true);
        }
    }

    fn recompute_pod_members(&mut self, p: PodId) {
        let Some(e) = self.ix.pod(p) else { return };
        let mut now: Vec<GroupId> = Vec::new();
        if e.enforced() {
            if let Some(ns) = self.ix.namespaces.get(&e.key.namespace) {
                now.extend(ns.groups.iter().copied().filter(|&g| {
                    self.ix.group(g).is_some_and(|ge| match &ge.checked {
                        Ok(c) => ge.accepted() && c.pod_selector.matches(&e.pod.labels),
                        Err(_) => false,
                    })
                }));
            }
        }
        now.sort_unstable();
        let leaving: Vec<GroupId> = e
            .member_of
            .iter()
            .copied()
            .filter(|g| now.binary_search(g).is_err())
            .collect();
        let joining: Vec<GroupId> = now
            .iter()
            .copied()
            .filter(|g| e.member_of.binary_search(g).is_err())
            .collect();
        for g in leaving {
            self.set_member(g, p, false);
        }
        for g in joining {
            self.set_member(g, p, true);
        }
    }

    /// Makes pod `p` a member of group `g` or not, and marks what that affects: the group's
    /// report, the pod's class, and the rules of groups that name `g` as a peer.
    fn set_member(&mut self, g: GroupId, p: PodId, member: bool) {
        let Some(ge) = self.ix.groups.get_mut(g) else {
            return;
        };
        let changed = if member {
            ge.members.insert(p)
        } else {
            ge.members.remove(&p)
        };
        if !changed {
            return;
        }
        let key = ge.key.clone();
        let Some(pe) = self.ix.pods.get_mut(p) else {
            return;
        };
        match (member, pe.member_of.binary_search(&g)) {
            (true, Err(i)) => pe.member_of.insert(i, g),
            (false, Ok(i)) => {
                pe.member_of.remove(i);
            }
            _ => {}
        }
        if let Some(node) = pe.pod.node.clone() {
            let node = self.ix.nodes.id(&node);
            member_node_change(&mut self.ix, &mut self.dirty, g, node, member);
        }
        self.dirty.reports.insert(g);
        self.dirty.class_of.insert(p);
        mark_peer_group(&self.ix, &self.sets, &mut self.dirty, &key);
    }

    /// Recomputes an address set and rewrites it in the plans of the nodes holding it.
    fn refresh_set(&mut self, s: SetSlot) {
        let Some(content) = self.sets.refresh(&self.ix, s) else {
            return;
        };
        let Some(e) = self.sets.get(s) else { return };
        for &node in e.nodes.keys() {
            let name = self.ix.nodes.name(node);
            if let Some(plan) = self.plan.nodes.get_mut(name) {
                // The node holds the set already: replace the content, keep the key.
                match plan.sets.get_mut(&e.id) {
                    Some(held) => *held = content.clone(),
                    None => {
                        plan.sets.insert(e.id.clone(), content.clone());
                    }
                }
                self.changes.nodes.insert(name.to_string());
            }
        }
    }

    /// Counts `node`'s use of the sets `policy` names in or out, adding them to or removing
    /// them from the node's plan on the first or last use.
    fn set_refs(&mut self, node: NodeId, policy: &PlannedPolicy, add: bool) {
        let mut ids: Vec<&String> = policy
            .ingress
            .iter()
            .chain(&policy.egress)
            .flat_map(|r| &r.sets)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let name = self.ix.nodes.name(node);
        for id in ids {
            match self.sets.node_ref(id, node, add) {
                NodeEdge::None => {}
                NodeEdge::Added(content) => {
                    if let Some(plan) = self.plan.nodes.get_mut(name) {
                        plan.sets.insert(id.clone(), content);
                    }
                }
                NodeEdge::Removed => {
                    if let Some(plan) = self.plan.nodes.get_mut(name) {
                        plan.sets.remove(id);
                    }
                }
            }
        }
    }

    fn recompute_rules(&mut self, g: GroupId) {
        let Some(e) = self.ix.group(g) else { return };
        let rules = peers::resolve(&self.ix, e);
        if *e.rules == rules {
            return;
        }
        let needs_changed = e.rules.named_needs != rules.named_needs;
        let Some(e) = self.ix.groups.get_mut(g) else {
            return;
        };
        e.rules = Arc::new(rules);
        self.dirty.policies.extend(e.classes.iter().copied());
        if needs_changed {
            self.dirty.class_of.extend(e.members.iter().copied());
        }
    }

    /// Judges every Service group `g`'s egress rules reach again.
    fn rejudge_all_services(&mut self, g: GroupId) {
        let Some(e) = self.ix.group(g) else { return };
        let service_rules = services::group_service_rules(&self.ix, e);
        if e.service_rules == service_rules {
            return;
        }
        let Some(e) = self.ix.groups.get_mut(g) else {
            return;
        };
        e.service_rules = service_rules;
        self.dirty.policies.extend(e.classes.iter().copied());
    }

    /// Finds a Service's backends again.
    fn refresh_backends(&mut self, key: &ObjectKey) {
        let Some(found) = self
            .ix
            .namespaces
            .get(&key.namespace)
            .and_then(|e| e.services.get(&key.name))
            .map(|s| services::find_backends(&self.ix, &key.namespace, s))
        else {
            return;
        };
        if let Some(s) = self
            .ix
            .namespaces
            .get_mut(&key.namespace)
            .and_then(|e| e.services.get_mut(&key.name))
        {
            s.backends = found;
        }
    }

    /// Judges Service `service` again for group `g`'s egress rules.
    fn rejudge_service(&mut self, g: GroupId, service: &ObjectKey) {
        let Some(e) = self.ix.group(g) else { return };
        let verdict = services::service_rules(&self.ix, e, &service.namespace, &service.name);
        let unchanged = match e.service_rules.get(service) {
            Some(old) => *old == verdict,
            None => verdict.is_empty(),
        };
        if unchanged {
            return;
        }
        let Some(e) = self.ix.groups.get_mut(g) else {
            return;
        };
        if verdict.is_empty() {
            e.service_rules.remove(service);
        } else {
            e.service_rules.insert(service.clone(), verdict);
        }
        self.dirty.policies.extend(e.classes.iter().copied());
    }

    fn reclass(&mut self, p: PodId) {
        let Some(e) = self.ix.pod(p) else { return };
        let key = policy::class_key(&self.ix, e);
        let old = e.class;
        let new = match key {
            None => None,
            Some(key) => Some(match self.class_ids.get(&key) {
                Some(&c) => c,
                None => {
                    let c = self.classes.insert(ClassEntry {
                        key: key.clone(),
                        pods: HashSet::new(),
                        policy: None,
                    });
                    for &g in &key.groups {
                        if let Some(ge) = self.ix.groups.get_mut(g) {
                            ge.classes.insert(c);
                        }
                    }
                    self.class_ids.insert(key, c);
                    self.dirty.policies.insert(c);
                    c
                }
            }),
        };
        if old == new {
            return;
        }
        if let Some(o) = old {
            let empty = self.classes.get_mut(o).is_some_and(|c| {
                c.pods.remove(&p);
                c.pods.is_empty()
            });
            if empty {
                if let Some(c) = self.classes.remove(o) {
                    for &g in &c.key.groups {
                        if let Some(ge) = self.ix.groups.get_mut(g) {
                            ge.classes.remove(&o);
                        }
                    }
                    self.class_ids.remove(&c.key);
                }
            }
        }
        if let Some(n) = new {
            if let Some(c) = self.classes.get_mut(n) {
                c.pods.insert(p);
            }
        }
        if let Some(e) = self.ix.pods.get_mut(p) {
            e.class = new;
        }
        self.dirty.placement.insert(p);
    }

    fn rebuild_policy(&mut self, c: ClassId) {
        let Some(class) = self.classes.get(c) else {
            return;
        };
        let id = policy::id(&self.ix, &class.key);
        if class.policy.as_ref() == Some(&id) {
            return;
        }
        let Some(class) = self.classes.get_mut(c) else {
            return;
        };
        class.policy = Some(id);
        self.dirty.placement.extend(class.pods.iter().copied());
    }

    fn place(&mut self, p: PodId) {
        let Some(e) = self.ix.pod(p) else { return };
        let class = e.class;
        let set_up = !e.pod.ips.is_empty() && !e.pod.deleting;
        let desired = match (&e.pod.node, e.enforced()) {
            (Some(node), true) => Some((
                node.clone(),
                e.pod.uid.to_string(),
                class
                    .and_then(|c| self.classes.get(c))
                    .and_then(|c| c.policy.clone()),
            )),
            _ => None,
        };
        let desired = desired.map(|(node, uid, policy)| Placement {
            node: self.ix.nodes.id(&node),
            uid,
            policy,
            set_up,
        });
        let Some(e) = self.ix.pods.get_mut(p) else {
            return;
        };
        if desired == e.placed {
            return;
        }
        let key = e.key.clone();
        let old = std::mem::replace(&mut e.placed, desired.clone());
        // Add first, then remove: a policy the pod keeps on the same node is never dropped
        // and built again.
        if let Some(d) = &desired {
            let name = self.ix.nodes.name(d.node).to_string();
            self.ensure_node(&name);
            let same_node = old.as_ref().is_some_and(|o| o.node == d.node);
            if let Some(plan) = self.plan.nodes.get_mut(&name) {
                plan.pods.insert(
                    key.clone(),
                    PodPlan {
                        uid: d.uid.clone(),
                        policy: d.policy.clone(),
                        set_up: d.set_up,
                    },
                );
            }
            if !same_node {
                self.node_state.entry(d.node).or_default().pods += 1;
            }
            if let (Some(id), Some(c)) = (&d.policy, class) {
                self.policy_ref(d.node, id, Some(c));
            }
            self.changes.nodes.insert(name);
        }
        if let Some(o) = old {
            let name = self.ix.nodes.name(o.node).to_string();
            let same_node = desired.as_ref().is_some_and(|d| d.node == o.node);
            if !same_node {
                if let Some(plan) = self.plan.nodes.get_mut(&name) {
                    plan.pods.remove(&key);
                }
                if let Some(s) = self.node_state.get_mut(&o.node) {
                    s.pods = s.pods.saturating_sub(1);
                }
            }
            if let Some(id) = &o.policy {
                self.policy_ref(o.node, id, None);
            }
            self.maybe_drop_node(&name);
            self.changes.nodes.insert(name);
        }
    }

    /// Counts one more pod using policy `id` on `node` (`Some(class)`: the class whose policy
    /// it is), or one less (`None`). The node's plan holds the policy while some pod uses it;
    /// it is built from the class when the node first needs it.
    fn policy_ref(&mut self, node: NodeId, id: &PolicyId, add: Option<ClassId>) {
        let name = self.ix.nodes.name(node);
        let state = self.node_state.entry(node).or_default();
        match add {
            Some(class) => {
                let n = state.policies.entry(id.clone()).or_default();
                *n += 1;
                if *n == 1 {
                    if let (Some(plan), Some(class)) =
                        (self.plan.nodes.get_mut(name), self.classes.get(class))
                    {
                        let ix = &self.ix;
                        let shared = self
                            .built
                            .entry(id.clone())
                            .or_insert_with(|| Arc::new(policy::build(ix, &class.key)))
                            .clone();
                        plan.policies.insert(id.clone(), shared.clone());
                        self.set_refs(node, &shared, true);
                    }
                }
            }
            None => {
                let gone = state.policies.get_mut(id).is_some_and(|n| {
                    *n = n.saturating_sub(1);
                    *n == 0
                });
                if gone {
                    state.policies.remove(id);
                    let dropped = self
                        .plan
                        .nodes
                        .get_mut(name)
                        .and_then(|plan| plan.policies.remove(id));
                    if let Some(p) = dropped {
                        self.set_refs(node, &p, false);
                    }
                    // The last node let go of it: only the cache holds it now.
                    if self
                        .built
                        .get(id)
                        .is_some_and(|p| Arc::strong_count(p) == 1)
                    {
                        self.built.remove(id);
                    }
                }
            }
        }
    }

    fn ensure_node(&mut self, node: &str) {
        if !self.plan.nodes.contains_key(node) {
            self.plan
                .nodes
                .insert(node.to_string(), NodePlan::default());
            self.changes.nodes.insert(node.to_string());
        }
    }

    /// A node's plan exists while the node does or some pod runs there (the Node object may
    /// be seen after its pods).
    fn maybe_drop_node(&mut self, node: &str) {
        let id = self.ix.nodes.get(node);
        let pods = id
            .and_then(|id| self.node_state.get(&id))
            .map_or(0, |s| s.pods);
        if pods == 0 && !self.nodes.contains(node) {
            if let Some(id) = id {
                self.node_state.remove(&id);
            }
            if self.plan.nodes.remove(node).is_some() {
                self.changes.nodes.insert(node.to_string());
            }
        }
    }

    fn report(&mut self, g: GroupId) {
        let Some(e) = self.ix.group(g) else { return };
        if e.deleted {
            return;
        }
        let report = GroupReport {
            generation: e.group.generation,
            accepted: e.checked.as_ref().map(|_| ()).map_err(Clone::clone),
            members: e.members.len(),
            nodes: e
                .report_nodes
                .keys()
                .map(|&n| self.ix.nodes.name(n).to_string())
                .collect(),
        };
        if self.plan.groups.get(&e.key) != Some(&report) {
            self.changes.groups.insert(e.key.clone());
            self.plan.groups.insert(e.key.clone(), report);
        }
    }
}

/// Marks the rules of every group naming `key` as a peer (the group itself changed: its
/// generation is in their policies, and its members are their peers, behind Services too).
fn mark_referrers(ix: &Index, dirty: &mut Dirty, key: &ObjectKey) {
    if let Some(refs) = ix.referrers.get(key) {
        dirty.rules.extend(refs.iter().copied());
        dirty.all_services.extend(refs.iter().copied());
    }
}

/// Group `key`'s members changed (who they are, or their addresses or ports): its address
/// set, and the rules of the groups naming it that resolve peers inline.
fn mark_peer_group(ix: &Index, sets: &SetTable, dirty: &mut Dirty, key: &ObjectKey) {
    dirty.sets.extend(sets.of_group(key));
    if let Some(refs) = ix.referrers.get(key) {
        dirty.rules.extend(
            refs.iter()
                .copied()
                .filter(|&g| ix.group(g).is_some_and(|e| e.inline_peers)),
        );
    }
}

/// Counts a member of group `g` on `node` in or out; when the node starts or stops hosting a
/// member, it enters or leaves the reports of `g` and of every group `g` names as a peer.
fn member_node_change(ix: &mut Index, dirty: &mut Dirty, g: GroupId, node: NodeId, add: bool) {
    let Some(e) = ix.groups.get_mut(g) else {
        return;
    };
    let edge = if add {
        let n = e.member_nodes.entry(node).or_default();
        *n += 1;
        *n == 1
    } else {
        match e.member_nodes.get_mut(&node) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                e.member_nodes.remove(&node);
                true
            }
            None => false,
        }
    };
    if !edge {
        return;
    }
    let targets = if e.registered {
        e.named.clone()
    } else {
        Vec::new()
    };
    report_node_change(ix, dirty, g, node, add);
    for t in targets {
        if let Some(&tid) = ix.group_ids.get(&t) {
            report_node_change(ix, dirty, tid, node, add);
        }
    }
}

/// Counts one reason for `node` to be in group `g`'s report in or out.
fn report_node_change(ix: &mut Index, dirty: &mut Dirty, g: GroupId, node: NodeId, add: bool) {
    let Some(e) = ix.groups.get_mut(g) else {
        return;
    };
    let edge = if add {
        let n = e.report_nodes.entry(node).or_default();
        *n += 1;
        *n == 1
    } else {
        match e.report_nodes.get_mut(&node) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                e.report_nodes.remove(&node);
                true
            }
            None => false,
        }
    };
    if edge {
        dirty.reports.insert(g);
    }
}

/// Marks the address sets a pod change can affect, and the rules of the groups resolving
/// selector peers inline it can affect: the pod starts or stops matching one of their peers,
/// or it matches and its addresses or ports changed. (Peers given as groups are traced
/// through membership instead.) When Services select the pod, those Services for the groups
/// that may admit them too.
fn mark_peer_relevance(
    ix: &Index,
    sets: &SetTable,
    dirty: &mut Dirty,
    ns: &str,
    old: Option<&StoredPod>,
    new: Option<&StoredPod>,
) {
    let touched = services::touched_by_pod(ix, ns, old, new);
    services::mark_reaching(ix, &mut dirty.service_pairs, ns, &touched);
    dirty
        .service_backends
        .extend(touched.into_iter().map(|name| ObjectKey::new(ns, name)));
    sets.affected_by_pod(ix, ns, old, new, &mut dirty.sets);
    let old = old.filter(|p| contributes(p));
    let new = new.filter(|p| contributes(p));
    let data_changed = match (old, new) {
        (None, None) => return,
        (Some(a), Some(b)) => {
            if a.labels == b.labels && a.ips == b.ips && a.ports == b.ports {
                return;
            }
            a.ips != b.ips || a.ports != b.ports
        }
        _ => true,
    };
    let Some(entry) = ix.namespaces.get(ns) else {
        return;
    };
    // Not collected first: with a namespace every group's peers select (monitoring), that
    // would build a set of every group for each change of a pod there. A group met twice is
    // judged twice, harmlessly.
    let candidates = entry.local_peer_groups.iter().copied().chain(
        entry
            .selected_by
            .iter()
            .filter_map(|&sid| ix.ns_selectors.get(sid))
            .flat_map(|sel| sel.groups.keys().copied()),
    );
    for g in candidates {
        if dirty.rules.contains(&g) {
            continue;
        }
        let Some(ge) = ix.group(g).filter(|ge| ge.inline_peers) else {
            continue;
        };
        let relevant = ge.pod_peers.iter().any(|pp| {
            let applies = match pp.namespaces {
                None => ge.key.namespace == ns,
                Some(sid) => ix.ns_selector_matches(sid, ns),
            };
            if !applies {
                return false;
            }
            let matches = |p: Option<&StoredPod>| {
                p.is_some_and(|p| pp.pods.as_ref().is_none_or(|s| s.matches(&p.labels)))
            };
            let (was, is) = (matches(old), matches(new));
            was != is || (was && data_changed)
        });
        if relevant {
            dirty.rules.insert(g);
        }
    }
}

/// How much sharing the compiler found, for metrics and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileStats {
    /// Pods that are members of some group.
    pub member_pods: usize,
    /// Classes: sets of groups (with named-port numbers) that some pod has.
    pub classes: usize,
    /// Distinct policies (classes whose policies came out identical share one).
    pub policies: usize,
    /// Address sets (distinct pod peers some group names).
    pub sets: usize,
}

impl Compiler {
    /// Counts classes and policies.
    pub fn stats(&self) -> CompileStats {
        let mut ids = HashSet::new();
        let mut stats = CompileStats::default();
        for (_, c) in self.classes.iter() {
            stats.classes += 1;
            stats.member_pods += c.pods.len();
            if let Some(id) = &c.policy {
                ids.insert(id);
            }
        }
        stats.policies = ids.len();
        stats.sets = self.sets.len();
        stats
    }
}
