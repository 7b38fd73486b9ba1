//! The operator's main loop: one compile-and-push path for both sources (the Kubernetes API and
//! a manifests directory). It owns the [`Compiler`]; the sources send it [`SourceEvent`]s, it
//! hands every changed node's plan to the [`PushServer`] and every changed group's report to the
//! status writer ([`crate::status_writer`]).
//!
//! Nothing reaches the agents before the whole cluster is known: until every kind the source
//! lists has been listed once (the API) or the first scan is done (manifests), changes only
//! accumulate into a [`Cluster`]; then one full compile produces every node's plan at once. An
//! agent handed a plan compiled from half the pods would enforce it (it cannot tell), cutting
//! connections that the full cluster allows.
//!
//! After that, each batch of changes goes through [`Compiler::apply_all`], which says which
//! nodes' plans and which groups' reports changed: only those are pushed and rewritten. Events
//! that are already queued are merged into one batch, so a burst (a relist, a rescan touching
//! many files) compiles once.

use std::{
    collections::{BTreeSet, HashSet},
    time::Instant,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{
    changes::ClusterChange,
    compile::{Compiler, PlanChanges},
    kube_source::SourceEvent,
    metrics::Metrics,
    model::{Cluster, ObjectKey},
    plan::Plan,
    push::PushServer,
    status_writer::ReportUpdate,
};

/// The kind the manifests source reports listed after its first complete scan.
pub const MANIFESTS: &str = "manifests";

/// What the sources deliver now, for the objects-by-kind gauge.
#[derive(Debug, Default)]
struct ObjectCounts {
    namespaces: HashSet<String>,
    pods: HashSet<ObjectKey>,
    nodes: HashSet<String>,
    groups: HashSet<ObjectKey>,
    services: HashSet<ObjectKey>,
}

impl ObjectCounts {
    fn apply(&mut self, change: &ClusterChange) {
        match change {
            ClusterChange::UpsertNamespace(n, _) => {
                self.namespaces.insert(n.clone());
            }
            ClusterChange::DeleteNamespace(n) => {
                self.namespaces.remove(n);
            }
            ClusterChange::UpsertPod(k, _) => {
                self.pods.insert(k.clone());
            }
            ClusterChange::DeletePod(k) => {
                self.pods.remove(k);
            }
            ClusterChange::UpsertNode(n) => {
                self.nodes.insert(n.clone());
            }
            ClusterChange::DeleteNode(n) => {
                self.nodes.remove(n);
            }
            ClusterChange::UpsertGroup(k, _) => {
                self.groups.insert(k.clone());
            }
            ClusterChange::DeleteGroup(k) => {
                self.groups.remove(k);
            }
            ClusterChange::UpsertService(k, _) => {
                self.services.insert(k.clone());
            }
            ClusterChange::DeleteService(k) => {
                self.services.remove(k);
            }
        }
    }

    fn report(&self, metrics: &Metrics) {
        metrics.set_objects("Namespace", self.namespaces.len());
        metrics.set_objects("Pod", self.pods.len());
        metrics.set_objects("Node", self.nodes.len());
        metrics.set_objects("SecurityGroup", self.groups.len());
        metrics.set_objects("Service", self.services.len());
    }
}

/// The compile-and-push state machine; [`run`] drives it from a channel of source events, tests
/// may drive it directly with [`Runtime::handle`].
pub struct Runtime {
    /// Kinds not listed yet; the first compile waits for this to be empty.
    waiting_for: BTreeSet<&'static str>,
    /// The cluster as received before the first compile.
    pending: Cluster,
    compiler: Option<Compiler>,
    objects: ObjectCounts,
    push: PushServer,
    reports: mpsc::UnboundedSender<Vec<ReportUpdate>>,
    metrics: Metrics,
}

impl Runtime {
    /// A runtime that compiles once every kind in `kinds` was listed (the API source's kinds,
    /// or [`MANIFESTS`]), pushes into `push` and sends group reports to `reports`.
    pub fn new(
        kinds: impl IntoIterator<Item = &'static str>,
        push: PushServer,
        reports: mpsc::UnboundedSender<Vec<ReportUpdate>>,
        metrics: Metrics,
    ) -> Self {
        Runtime {
            waiting_for: kinds.into_iter().collect(),
            pending: Cluster::default(),
            compiler: None,
            objects: ObjectCounts::default(),
            push,
            reports,
            metrics,
        }
    }

    /// Whether the first full compile happened (plans are being pushed).
    pub fn is_synced(&self) -> bool {
        self.compiler.is_some()
    }

    /// The current plan, once synced.
    pub fn plan(&self) -> Option<&Plan> {
        self.compiler.as_ref().map(Compiler::plan)
    }

    /// Handles one source event.
    pub fn handle(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Changes(changes) => self.apply(&changes),
            SourceEvent::Listed(kind) => self.listed(kind),
        }
    }

    fn apply(&mut self, changes: &[ClusterChange]) {
        if changes.is_empty() {
            return;
        }
        for change in changes {
            self.objects.apply(change);
        }
        self.objects.report(&self.metrics);
        let Some(compiler) = self.compiler.as_mut() else {
            for change in changes {
                self.pending.apply(change);
            }
            return;
        };
        let started = Instant::now();
        let effects = compiler.apply_all(changes);
        let took = started.elapsed();
        self.metrics.incremental_compile(took);
        debug!(
            changes = changes.len(),
            nodes = effects.nodes.len(),
            groups = effects.groups.len(),
            took_us = took.as_micros() as u64,
            "compiled a batch"
        );
        self.publish(&effects);
    }

    fn listed(&mut self, kind: &'static str) {
        if !self.waiting_for.remove(kind) || !self.waiting_for.is_empty() || self.is_synced() {
            return;
        }
        let cluster = std::mem::take(&mut self.pending);
        let started = Instant::now();
        let compiler = Compiler::new(&cluster);
        let took = started.elapsed();
        self.metrics.full_compile(took);
        let plan = compiler.plan();
        info!(
            namespaces = cluster.namespaces.len(),
            pods = cluster.pods.len(),
            nodes = plan.nodes.len(),
            groups = plan.groups.len(),
            took_ms = took.as_millis() as u64,
            "every kind listed: compiled the whole cluster; pushing to agents"
        );
        let effects = PlanChanges {
            nodes: plan.nodes.keys().cloned().collect(),
            groups: plan.groups.keys().cloned().collect(),
        };
        self.compiler = Some(compiler);
        self.publish(&effects);
        self.metrics.set_synced();
    }

    /// Hands the changed nodes' plans to the push server and the changed groups' reports to the
    /// status writer.
    fn publish(&self, effects: &PlanChanges) {
        let Some(plan) = self.plan() else {
            return;
        };
        for node in &effects.nodes {
            match plan.nodes.get(node) {
                Some(p) => self.push.set_node_plan(node, p.clone()),
                None => self.push.remove_node(node),
            }
        }
        if effects.groups.is_empty() {
            return;
        }
        let updates = effects
            .groups
            .iter()
            .map(|key| ReportUpdate {
                key: key.clone(),
                report: plan.groups.get(key).cloned(),
            })
            .collect();
        // The status writer stops only when the operator does; nothing to report to then.
        let _ = self.reports.send(updates);
    }
}

/// Runs `runtime` on the events of `events` until the sources end or `shutdown` is cancelled.
/// Events already queued are merged into one batch (in order; a `Listed` ends a batch).
pub async fn run(
    mut runtime: Runtime,
    mut events: mpsc::Receiver<SourceEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(event) = next.take() {
            match event {
                SourceEvent::Changes(changes) => batch.extend(changes),
                listed @ SourceEvent::Listed(_) => {
                    runtime.handle(SourceEvent::Changes(std::mem::take(&mut batch)));
                    runtime.handle(listed);
                }
            }
            next = events.try_recv().ok();
        }
        runtime.handle(SourceEvent::Changes(batch));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;
    use crate::{
        crd::SecurityGroupSpec,
        model::{Group, Pod},
        push::PushSettings,
    };

    const KINDS: [&str; 2] = ["Pod", "SecurityGroup"];

    fn pod(node: &str, app: &str) -> Pod {
        Pod {
            uid: format!("uid-{app}"),
            node: Some(node.into()),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            ips: vec!["10.0.0.1".parse().unwrap()],
            ..Pod::default()
        }
    }

    fn group(app: &str) -> Group {
        Group {
            generation: 1,
            spec: SecurityGroupSpec {
                pod_selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
                    ..LabelSelector::default()
                },
                ingress: Some(Vec::new()),
                egress: None,
            },
            kind: crate::model::GroupKind::SecurityGroup,
            origins: None,
            unreadable: None,
        }
    }

    fn runtime() -> (
        Runtime,
        PushServer,
        mpsc::UnboundedReceiver<Vec<ReportUpdate>>,
    ) {
        let push = PushServer::new(PushSettings::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let rt = Runtime::new(KINDS, push.clone(), tx, Metrics::default());
        (rt, push, rx)
    }

    #[test]
    fn nothing_is_pushed_before_every_kind_is_listed() {
        let (mut rt, push, mut reports) = runtime();
        let web = ObjectKey::new("shop", "web");
        rt.handle(SourceEvent::Changes(vec![ClusterChange::UpsertPod(
            ObjectKey::new("shop", "web-0"),
            pod("n1", "web"),
        )]));
        rt.handle(SourceEvent::Listed("Pod"));
        assert!(!rt.is_synced());
        assert!(
            push.node_status("n1").is_none(),
            "a plan without the groups would be pushed as the truth"
        );
        assert!(reports.try_recv().is_err());

        rt.handle(SourceEvent::Changes(vec![ClusterChange::UpsertGroup(
            web.clone(),
            group("web"),
        )]));
        rt.handle(SourceEvent::Listed("SecurityGroup"));
        assert!(rt.is_synced());
        let status = push.node_status("n1").expect("n1 has a plan now");
        assert!(status.has_plan);
        let plan = rt.plan().unwrap();
        assert!(
            plan.nodes["n1"].pods[&ObjectKey::new("shop", "web-0")]
                .policy
                .is_some(),
            "the first plan has the pod as a member of web"
        );
        let first = reports.try_recv().expect("every group's report");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].key, web);
        assert_eq!(first[0].report.as_ref().map(|r| r.members), Some(1));
    }

    #[test]
    fn changes_after_the_sync_reach_push_and_status_incrementally() {
        let (mut rt, push, mut reports) = runtime();
        let web = ObjectKey::new("shop", "web");
        rt.handle(SourceEvent::Changes(vec![
            ClusterChange::UpsertPod(ObjectKey::new("shop", "web-0"), pod("n1", "web")),
            ClusterChange::UpsertGroup(web.clone(), group("web")),
        ]));
        rt.handle(SourceEvent::Listed("Pod"));
        rt.handle(SourceEvent::Listed("SecurityGroup"));
        reports.try_recv().unwrap();

        // A pod on another node: only n2 is handed a plan, and web's report follows.
        rt.handle(SourceEvent::Changes(vec![ClusterChange::UpsertPod(
            ObjectKey::new("shop", "web-1"),
            pod("n2", "web"),
        )]));
        assert!(push.node_status("n2").is_some_and(|s| s.has_plan));
        let update = reports.try_recv().unwrap();
        assert_eq!(update[0].report.as_ref().map(|r| r.members), Some(2));

        // The pod goes: n2's plan disappears, so the push server forgets the node.
        rt.handle(SourceEvent::Changes(vec![ClusterChange::DeletePod(
            ObjectKey::new("shop", "web-1"),
        )]));
        assert!(push.node_status("n2").is_none_or(|s| !s.has_plan));

        // The group goes: its report is None (the status writer forgets it).
        rt.handle(SourceEvent::Changes(vec![ClusterChange::DeleteGroup(
            web.clone(),
        )]));
        let mut last = Vec::new();
        while let Ok(u) = reports.try_recv() {
            last = u;
        }
        assert_eq!(
            last,
            vec![ReportUpdate {
                key: web,
                report: None
            }]
        );
    }
}
