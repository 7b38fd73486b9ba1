//! The API's status sink on `kube::runtime`: while this replica leads, two
//! [`Controller`]s — SecurityGroups (untyped, as the source reads them) and, when kubesg
//! enforces them, NetworkPolicies — keep every group's status as [`group_status`] computes it
//! from the compiler's report and the agents' acks.
//!
//! - The objects come from the controllers' reflector stores (one LIST and a watch per leader
//!   term), never from a GET per group: a new leader reconciles every group from its first list.
//! - The [`StatusWriter`](crate::status_writer::StatusWriter) still decides *when* a group needs
//!   a look (its report changed, the acks of one of its nodes moved): [`ControllerSink::publish`]
//!   records the inputs and hands the controller the object's reference (`reconcile_on`); a change
//!   of the object itself (a new generation, a status someone else wrote) triggers it too.
//! - A failed write is retried by the controller's `error_policy` with exponential backoff per
//!   object (1 s doubling to 5 min); a refusal that retrying cannot fix (403: RBAC; 422: the
//!   API server rejects the status) waits the longest and is logged as such — it is tried again
//!   earlier only when the group or its inputs change.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::{api::networking::v1::NetworkPolicy, jiff::Timestamp};
use kube::{
    api::{Api, ApiResource, DynamicObject},
    runtime::{
        controller::{Action, Controller},
        reflector::ObjectRef,
        watcher,
    },
    Client, ResourceExt,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::{
    coverage::Gap,
    crd::SecurityGroup,
    model::ObjectKey,
    netpol,
    plan::GroupReport,
    status::NodeAcks,
    status_api::{self, Context, Stored},
    status_writer::{StatusSink, WriteError},
};

/// The first retry of a failed write.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// The longest wait between retries, and the wait after a refusal retrying cannot fix.
const LONGEST_RETRY: Duration = Duration::from_secs(300);

/// How long to wait before the `failures`-th retry of a write (1-based): 1 s doubling to
/// [`LONGEST_RETRY`]; a refusal that retrying cannot fix waits the longest at once.
pub fn retry_after(failures: u32, permanent: bool) -> Duration {
    if permanent {
        return LONGEST_RETRY;
    }
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY
        .saturating_mul(1 << doublings)
        .min(LONGEST_RETRY)
}

/// Whether the API server's refusal will be the same next time (403 Forbidden: the RBAC does
/// not allow it; 422 Unprocessable: the status does not pass the CRD's schema).
fn permanent(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403 || s.code == 422)
}

/// What a group's status is computed from, as last published.
#[derive(Clone, Debug)]
struct Inputs {
    report: GroupReport,
    /// The acks of the report's nodes (all [`group_status`](crate::status::group_status) reads).
    acks: BTreeMap<String, NodeAcks>,
}

/// What the reconcilers share.
struct Shared {
    /// The writer (client, Events, what it wrote); one write at a time, as before.
    ctx: tokio::sync::Mutex<Context>,
    inputs: Mutex<BTreeMap<ObjectKey, Inputs>>,
    /// Consecutive failed writes per group, for the backoff.
    failures: Mutex<BTreeMap<ObjectKey, u32>>,
    /// A new leader term began: what the context remembers writing is forgotten before the
    /// next write (another leader may have written since).
    forget_written: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// The running controllers of one leader term.
struct Running {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    groups: mpsc::UnboundedSender<ObjectRef<DynamicObject>>,
    policies: Option<mpsc::UnboundedSender<ObjectRef<NetworkPolicy>>>,
}

/// The [`StatusSink`] of the API: records inputs and lets the controllers write.
pub struct ControllerSink {
    client: Client,
    shared: Arc<Shared>,
    network_policies: bool,
    running: Option<Running>,
}

impl ControllerSink {
    /// A sink writing through `ctx`'s client; NetworkPolicies are watched only when kubesg
    /// enforces them (`network_policies`: the chart gives no RBAC to read them otherwise).
    pub fn new(client: Client, ctx: Context, network_policies: bool) -> Self {
        ControllerSink {
            client,
            shared: Arc::new(Shared {
                ctx: tokio::sync::Mutex::new(ctx),
                inputs: Mutex::new(BTreeMap::new()),
                failures: Mutex::new(BTreeMap::new()),
                forget_written: AtomicBool::new(false),
            }),
            network_policies,
            running: None,
        }
    }

    /// Starts the controllers if they do not run (this replica leads and publishes).
    fn ensure_running(&mut self) {
        if self.running.is_none() {
            let running = self.start();
            self.running = Some(running);
        }
    }

    fn start(&self) -> Running {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let (groups_tx, groups_rx) = mpsc::unbounded_channel();
        let kind = ApiResource::erase::<SecurityGroup>(&());
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &kind);
        let shared = Arc::clone(&self.shared);
        let shutdown = stop.clone();
        tasks.push(tokio::spawn(async move {
            Controller::new_with(api, watcher::Config::default(), kind)
                .reconcile_on(UnboundedReceiverStream::new(groups_rx))
                .graceful_shutdown_on(shutdown.cancelled_owned())
                .run(reconcile_group, error_policy_group, shared)
                .for_each(|_| async {})
                .await;
        }));
        let policies = self.network_policies.then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let api: Api<NetworkPolicy> = Api::all(self.client.clone());
            let shared = Arc::clone(&self.shared);
            let shutdown = stop.clone();
            tasks.push(tokio::spawn(async move {
                Controller::new(api, watcher::Config::default())
                    .reconcile_on(UnboundedReceiverStream::new(rx))
                    .graceful_shutdown_on(shutdown.cancelled_owned())
                    .run(reconcile_policy, error_policy_policy, shared)
                    .for_each(|_| async {})
                    .await;
            }));
            tx
        });
        debug!("status controllers started");
        Running {
            stop,
            tasks,
            groups: groups_tx,
            policies,
        }
    }

    fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.cancel();
            for task in running.tasks {
                // Ends at the graceful shutdown; never awaited here (the sink's methods are
                // quick), the runtime finishes it.
                drop(task);
            }
            debug!("status controllers stopped");
        }
    }
}

impl Drop for ControllerSink {
    fn drop(&mut self) {
        self.stop();
    }
}

impl StatusSink for ControllerSink {
    async fn publish(
        &mut self,
        key: &ObjectKey,
        report: &GroupReport,
        acks: &BTreeMap<String, NodeAcks>,
        _now: Timestamp,
    ) -> Result<(), WriteError> {
        let inputs = Inputs {
            report: report.clone(),
            acks: report
                .nodes
                .iter()
                .filter_map(|n| acks.get(n).map(|a| (n.clone(), a.clone())))
                .collect(),
        };
        lock(&self.shared.inputs).insert(key.clone(), inputs);
        self.ensure_running();
        let Some(running) = &self.running else {
            return Ok(());
        };
        // A closed channel means the controller ended (shutdown): nothing to write then.
        match netpol::name(key) {
            Some(name) => {
                if let Some(policies) = &running.policies {
                    let _ = policies.send(ObjectRef::new(name).within(&key.namespace));
                }
            }
            None => {
                let kind = ApiResource::erase::<SecurityGroup>(&());
                let _ = running
                    .groups
                    .send(ObjectRef::new_with(&key.name, kind).within(&key.namespace));
            }
        }
        Ok(())
    }

    async fn forget(&mut self, key: &ObjectKey) {
        lock(&self.shared.inputs).remove(key);
        lock(&self.shared.failures).remove(key);
        self.shared.ctx.lock().await.forget(key);
    }

    fn reset(&mut self) {
        // A new leader term: what was written may have changed under another leader. The new
        // controllers list every object and reconcile each from what the API server holds.
        self.stop();
        self.shared.forget_written.store(true, Ordering::SeqCst);
    }

    fn follow(&mut self) {
        self.stop();
    }

    async fn pod_not_enforced(&mut self, node: &str, pod: &ObjectKey, gap: &Gap) {
        self.shared
            .ctx
            .lock()
            .await
            .pod_not_enforced(node, pod, gap)
            .await;
    }
}

/// The inputs of `key`, if the compiler reported on it yet.
fn inputs(shared: &Shared, key: &ObjectKey) -> Option<Inputs> {
    lock(&shared.inputs).get(key).cloned()
}

async fn reconcile(
    shared: &Shared,
    key: ObjectKey,
    stored: Stored,
) -> Result<Action, ReconcileError> {
    let Some(inputs) = inputs(shared, &key) else {
        // Not compiled yet: its report triggers a reconcile when it comes.
        return Ok(Action::await_change());
    };
    let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::now());
    let mut ctx = shared.ctx.lock().await;
    if shared.forget_written.swap(false, Ordering::SeqCst) {
        ctx.forget_all();
    }
    status_api::write_stored(&mut ctx, &key, &inputs.report, &inputs.acks, now, stored).await?;
    lock(&shared.failures).remove(&key);
    Ok(Action::await_change())
}

async fn reconcile_group(
    sg: Arc<DynamicObject>,
    shared: Arc<Shared>,
) -> Result<Action, ReconcileError> {
    let key = ObjectKey::new(sg.namespace().unwrap_or_default(), sg.name_any());
    reconcile(&shared, key, Stored::group(&sg)).await
}

async fn reconcile_policy(
    np: Arc<NetworkPolicy>,
    shared: Arc<Shared>,
) -> Result<Action, ReconcileError> {
    let key = netpol::key(&np.namespace().unwrap_or_default(), &np.name_any());
    reconcile(&shared, key, Stored::policy(&np)).await
}

fn error_policy(shared: &Shared, key: ObjectKey, e: &ReconcileError) -> Action {
    let failures = {
        let mut f = lock(&shared.failures);
        let n = f.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let ReconcileError::Api(api) = e;
    let permanent = permanent(api);
    let wait = retry_after(failures, permanent);
    if permanent {
        error!(group = %netpol::describe(&key), error = %e, retry_in = ?wait, failures,
            "status refused by the API server; retrying will not help until the RBAC or the CRD \
             changes, so only after the longest wait or when the group changes");
    } else {
        warn!(group = %netpol::describe(&key), error = %e, retry_in = ?wait, failures,
            "status not written; retrying");
    }
    Action::requeue(wait)
}

fn error_policy_group(sg: Arc<DynamicObject>, e: &ReconcileError, shared: Arc<Shared>) -> Action {
    let key = ObjectKey::new(sg.namespace().unwrap_or_default(), sg.name_any());
    error_policy(&shared, key, e)
}

fn error_policy_policy(np: Arc<NetworkPolicy>, e: &ReconcileError, shared: Arc<Shared>) -> Action {
    let key = netpol::key(&np.namespace().unwrap_or_default(), &np.name_any());
    error_policy(&shared, key, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_a_second_to_five_minutes() {
        let waits: Vec<u64> = (1..=11).map(|n| retry_after(n, false).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(retry_after(u32::MAX, false), LONGEST_RETRY);
    }

    #[test]
    fn a_refusal_retrying_cannot_fix_waits_the_longest_at_once() {
        assert_eq!(retry_after(1, true), LONGEST_RETRY);
        let error = |code, reason| {
            kube::Error::Api(Box::new(
                kube::core::Status::failure("refused", reason).with_code(code),
            ))
        };
        let forbidden = error(403, "Forbidden");
        let invalid = error(422, "Invalid");
        let unavailable = error(503, "ServiceUnavailable");
        assert!(permanent(&forbidden) && permanent(&invalid));
        assert!(!permanent(&unavailable));
    }
}
