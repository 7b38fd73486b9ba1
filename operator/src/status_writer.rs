//! Keeps every SecurityGroup's status true: rewrites a group's status when the compiler says its
//! report changed (members, nodes, validity, generation) and when the agents' acks change what
//! is programmed where. The status itself is computed by the pure
//! [`group_status`](crate::status::group_status); where it goes is a [`StatusSink`]: the API's
//! status subresource with Events ([`crate::status_api`]) or files in manifests mode
//! ([`crate::status_files`]).
//!
//! It runs as its own task, apart from the compile loop, so a slow API server delays statuses
//! but never compiling and pushing. Work is coalesced: reports and ack changes only mark groups
//! dirty, and one pass writes each dirty group once with the latest of both. Only the leader
//! writes: a follower keeps the reports up to date and, on becoming the leader, forgets what it
//! believed was written (the previous leader wrote since) and rewrites every group.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    io,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    coverage::Gap,
    model::ObjectKey,
    plan::GroupReport,
    push::{NodeStatus, PushServer},
    status::NodeAcks,
};

/// A group whose report changed; `report: None`: the group is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportUpdate {
    /// The group.
    pub key: ObjectKey,
    /// Its new report, or `None` when it was deleted.
    pub report: Option<GroupReport>,
}

/// Why a status could not be written (the group is retried later).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// A status file could not be written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The status could not be encoded.
    #[error("encoding the status: {0}")]
    Encode(String),
}

/// Where statuses go.
pub trait StatusSink: Send {
    /// Computes `key`'s status from its report and the agents' acks at time `now` and writes it
    /// if it differs from what the sink knows is there.
    fn publish(
        &mut self,
        key: &ObjectKey,
        report: &GroupReport,
        acks: &BTreeMap<String, NodeAcks>,
        now: Timestamp,
    ) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// `key` is gone: forget what is known of it (no write: a deleted object needs no cleanup).
    fn forget(&mut self, key: &ObjectKey) -> impl Future<Output = ()> + Send;

    /// What the sink believes is written may be stale (another replica led meanwhile).
    fn reset(&mut self);

    /// This replica stopped leading: nothing is published until [`StatusSink::reset`] again.
    fn follow(&mut self) {}

    /// `pod`, placed on `node`, is not enforced there (seen once per pod and reason while
    /// leading): the API sink tells it in an Event on the pod; files have nowhere to say it
    /// (the push server's log and metric already do).
    fn pod_not_enforced(
        &mut self,
        node: &str,
        pod: &ObjectKey,
        gap: &Gap,
    ) -> impl Future<Output = ()> + Send {
        let _ = (node, pod, gap);
        async {}
    }
}

/// What one node's agent has acked, as [`group_status`](crate::status::group_status) needs it:
/// the group generations of the acked plan, the last NACK if it is newer than the last ack, and
/// whether the agent is connected.
pub fn node_acks(status: &NodeStatus) -> NodeAcks {
    let acked_version = status.acked.as_ref().map(|a| a.version);
    NodeAcks {
        programmed: status
            .acked_groups()
            .into_iter()
            .map(|g| (g.group, g.generation))
            .collect(),
        nack: status
            .last_nack
            .as_ref()
            .filter(|n| acked_version.is_none_or(|v| n.version > v))
            .map(|n| n.reason.clone()),
        connected: status.connected,
        unenforced: unenforced_members(status),
    }
}

/// The acked plan's pods the agent does not enforce, under each group they are members of.
fn unenforced_members(status: &NodeStatus) -> BTreeMap<ObjectKey, Vec<String>> {
    let mut by_group: BTreeMap<ObjectKey, Vec<String>> = BTreeMap::new();
    let (Some(gaps), Some(acked)) = (&status.gaps, &status.acked) else {
        return by_group;
    };
    for (pod, gap) in gaps.iter() {
        let policy = acked
            .plan
            .pods
            .get(pod)
            .and_then(|p| p.policy.as_ref())
            .and_then(|id| acked.plan.policies.get(id));
        for g in policy.iter().flat_map(|p| p.groups.iter()) {
            by_group
                .entry(g.group.clone())
                .or_default()
                .push(format!("{pod} ({})", gap.brief()));
        }
    }
    by_group
}

/// What changes a node's [`NodeAcks`]; compared so that only nodes whose acks moved are
/// recomputed (building the acked groups of every node on every ack would not scale).
#[derive(Clone, Debug, PartialEq, Eq)]
struct AckMark {
    connected: bool,
    acked: Option<u64>,
    nack: Option<u64>,
}

impl AckMark {
    fn of(status: &NodeStatus) -> Self {
        AckMark {
            connected: status.connected,
            acked: status.acked.as_ref().map(|a| a.version),
            nack: status.last_nack.as_ref().map(|n| n.version),
        }
    }
}

/// How long a failed write waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The status writer's state: the latest report of every group, the agents' acks, and which
/// groups need writing.
pub struct StatusWriter<S> {
    sink: S,
    push: PushServer,
    reports: BTreeMap<ObjectKey, GroupReport>,
    dirty: BTreeSet<ObjectKey>,
    failed: BTreeSet<ObjectKey>,
    acks: BTreeMap<String, NodeAcks>,
    marks: BTreeMap<String, AckMark>,
    /// Each node's pods its agent does not enforce, as of its last answer.
    gaps: BTreeMap<String, Arc<BTreeMap<ObjectKey, Gap>>>,
    /// The gaps told to the sink while leading, so each is told once.
    told: BTreeMap<(String, ObjectKey), Gap>,
}

impl<S: StatusSink> StatusWriter<S> {
    /// A writer into `sink` reading acks from `push`.
    pub fn new(sink: S, push: PushServer) -> Self {
        StatusWriter {
            sink,
            push,
            reports: BTreeMap::new(),
            dirty: BTreeSet::new(),
            failed: BTreeSet::new(),
            acks: BTreeMap::new(),
            marks: BTreeMap::new(),
            gaps: BTreeMap::new(),
            told: BTreeMap::new(),
        }
    }

    /// The sink (for tests).
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Takes in changed reports: changed groups become dirty, deleted ones are forgotten.
    pub async fn take(&mut self, updates: Vec<ReportUpdate>) {
        for u in updates {
            match u.report {
                Some(report) => {
                    self.reports.insert(u.key.clone(), report);
                    self.dirty.insert(u.key);
                }
                None => {
                    self.reports.remove(&u.key);
                    self.dirty.remove(&u.key);
                    self.failed.remove(&u.key);
                    self.sink.forget(&u.key).await;
                }
            }
        }
    }

    /// Re-reads the push server's node statuses; the groups concerning a node whose acks moved
    /// become dirty.
    pub fn refresh_acks(&mut self) {
        let statuses = self.push.node_statuses();
        let mut moved: BTreeSet<String> = self
            .marks
            .keys()
            .filter(|n| !statuses.contains_key(*n))
            .cloned()
            .collect();
        for node in &moved {
            self.marks.remove(node);
            self.acks.remove(node);
            self.gaps.remove(node);
        }
        for (node, status) in &statuses {
            let mark = AckMark::of(status);
            if self.marks.get(node) != Some(&mark) {
                self.acks.insert(node.clone(), node_acks(status));
                self.marks.insert(node.clone(), mark);
                match &status.gaps {
                    Some(gaps) if !gaps.is_empty() => {
                        self.gaps.insert(node.clone(), Arc::clone(gaps));
                    }
                    _ => {
                        self.gaps.remove(node);
                    }
                }
                moved.insert(node.clone());
            }
        }
        if moved.is_empty() {
            return;
        }
        for (key, report) in &self.reports {
            if report.nodes.iter().any(|n| moved.contains(n)) {
                self.dirty.insert(key.clone());
            }
        }
    }

    /// Leadership (re)gained: every group is rewritten, without trusting what was known, and
    /// every pod not enforced is told again.
    pub fn lead(&mut self) {
        self.sink.reset();
        self.dirty.extend(self.reports.keys().cloned());
        self.told.clear();
    }

    /// Tells the sink the pods not enforced that it was not told of yet, and forgets the ones
    /// enforced again (so a new gap of the same pod is told).
    pub async fn tell_gaps(&mut self) {
        let now: BTreeMap<(String, ObjectKey), Gap> = self
            .gaps
            .iter()
            .flat_map(|(node, gaps)| {
                gaps.iter()
                    .map(|(pod, gap)| ((node.clone(), pod.clone()), gap.clone()))
            })
            .collect();
        for ((node, pod), gap) in &now {
            if self.told.get(&(node.clone(), pod.clone())) != Some(gap) {
                self.sink.pod_not_enforced(node, pod, gap).await;
            }
        }
        self.told = now;
    }

    /// Writes every dirty group, until done or `stop` says to stop (shutdown, or leadership
    /// lost); failed groups are kept for a later retry.
    pub async fn write_dirty(&mut self, stop: impl Fn() -> bool) {
        let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::now());
        while let Some(key) = self.dirty.pop_first() {
            if stop() {
                self.dirty.insert(key);
                return;
            }
            let Some(report) = self.reports.get(&key) else {
                continue;
            };
            match self.sink.publish(&key, report, &self.acks, now).await {
                Ok(()) => {
                    self.failed.remove(&key);
                }
                Err(e) => {
                    warn!(group = %crate::netpol::describe(&key), error = %e, "status not written; retrying later");
                    self.failed.insert(key);
                }
            }
        }
    }

    /// Runs until `shutdown`, or until the runtime closes `updates`. Writes only while
    /// `leading` is true.
    pub async fn run(
        mut self,
        mut updates: mpsc::UnboundedReceiver<Vec<ReportUpdate>>,
        mut leading: watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        let mut acks = self.push.subscribe();
        acks.borrow_and_update();
        self.refresh_acks();
        let mut retry_at: Option<tokio::time::Instant> = None;
        // A closed leadership channel keeps its last value (e.g. "always leading").
        let mut leadership_open = true;
        loop {
            if *leading.borrow() && !self.dirty.is_empty() {
                let leading_now = leading.clone();
                let stopping = shutdown.clone();
                self.write_dirty(move || stopping.is_cancelled() || !*leading_now.borrow())
                    .await;
            }
            if *leading.borrow() {
                self.tell_gaps().await;
                if !self.failed.is_empty() && retry_at.is_none() {
                    retry_at = Some(tokio::time::Instant::now() + RETRY_AFTER);
                }
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                batch = updates.recv() => {
                    let Some(batch) = batch else { return };
                    self.take(batch).await;
                    while let Ok(more) = updates.try_recv() {
                        self.take(more).await;
                    }
                }
                changed = acks.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.refresh_acks();
                }
                changed = leading.changed(), if leadership_open => {
                    if changed.is_err() {
                        leadership_open = false;
                        continue;
                    }
                    if *leading.borrow_and_update() {
                        debug!("leading: rewriting every group's status");
                        self.lead();
                    } else {
                        self.sink.follow();
                    }
                }
                _ = retry => {
                    retry_at = None;
                    let failed = std::mem::take(&mut self.failed);
                    self.dirty.extend(failed);
                }
            }
        }
    }
}
