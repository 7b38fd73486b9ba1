//! The operator's Prometheus metrics and health endpoints, served over HTTP as the agent serves
//! its own: `/metrics`, `/healthz` (the process answers) and `/readyz` (this replica has
//! compiled the whole cluster once and is the leader, so it is the one agents must reach: the
//! Service routes them by readiness).
//!
//! What is measured answers the operator's questions: how big is what it watches (objects by
//! kind), how long compiling takes (full compiles and incremental batches), how long a change
//! takes to reach the agents (apply-to-ack, through [`PushObserver`]), how many agents are
//! connected and refusing updates, how many status writes succeed, and who leads.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tracing::info;

use crate::{coverage::Gap, model::ObjectKey, push::PushObserver};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CompileLabels {
    /// `full` (the first compile of a synced cluster) or `incremental` (one batch of changes).
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    /// `snapshot` or `delta`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeReasonLabels {
    node: String,
    /// [`Gap::label`]: `no-endpoint` or `uid-mismatch`.
    reason: &'static str,
}

/// Every [`Gap::label`], so a node's gauge goes back to 0 for each when its gaps close.
const GAP_LABELS: [&str; 2] = ["no-endpoint", "uid-mismatch"];

/// Seconds buckets from 100 µs to ~100 s: an incremental batch is sub-millisecond, a full
/// compile of a large cluster takes seconds, an apply-to-ack round trip milliseconds.
fn seconds_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 4.0, 11)
}

/// The operator's metrics; cheap to clone (clones share the values).
#[derive(Clone)]
pub struct Metrics {
    objects: Family<KindLabels, Gauge>,
    compile: Family<CompileLabels, Histogram>,
    push_latency: Histogram,
    agents_connected: Gauge,
    updates: Family<UpdateLabels, Counter>,
    nacks: Counter,
    agent_refusals: Family<ReasonLabels, Counter>,
    unenforced: Family<NodeReasonLabels, Gauge>,
    status_writes: Family<ResultLabels, Counter>,
    events: Family<ReasonLabels, Counter>,
    leader: Gauge,
    synced: Arc<AtomicBool>,
    leading: Arc<AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            objects: Family::default(),
            compile: Family::new_with_constructor(|| Histogram::new(seconds_buckets())),
            push_latency: Histogram::new(seconds_buckets()),
            agents_connected: Gauge::default(),
            updates: Family::default(),
            nacks: Counter::default(),
            agent_refusals: Family::default(),
            unenforced: Family::default(),
            status_writes: Family::default(),
            events: Family::default(),
            leader: Gauge::default(),
            synced: Arc::default(),
            leading: Arc::default(),
        }
    }
}

impl Metrics {
    /// Records how many objects of `kind` the sources currently deliver.
    pub fn set_objects(&self, kind: &'static str, count: usize) {
        self.objects
            .get_or_create(&KindLabels { kind })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Records a full compile's duration.
    pub fn full_compile(&self, took: Duration) {
        self.compile
            .get_or_create(&CompileLabels { mode: "full" })
            .observe(took.as_secs_f64());
    }

    /// Records an incremental batch's duration (`Compiler::apply_all`).
    pub fn incremental_compile(&self, took: Duration) {
        self.compile
            .get_or_create(&CompileLabels {
                mode: "incremental",
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a status write (the API's status subresource or a status file).
    pub fn status_write(&self, ok: bool) {
        self.status_writes
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Counts a Kubernetes Event emitted, by reason.
    pub fn event(&self, reason: &'static str) {
        self.events.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Marks the first full compile done: the plans the push server holds are the cluster's.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// Records whether this replica leads (holds the Lease, or runs without election).
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
        self.leader.set(i64::from(leading));
    }

    /// Whether `/readyz` answers 200: synced and leading.
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.leading.load(Ordering::Relaxed)
    }

    /// A registry with these metrics, prefixed `kubesg_operator_`.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("kubesg_operator");
        r.register(
            "objects",
            "Objects the source delivers, by kind",
            self.objects.clone(),
        );
        r.register(
            "compile_seconds",
            "Compile time: full compiles and incremental batches",
            self.compile.clone(),
        );
        r.register(
            "push_latency_seconds",
            "From a plan change to the ack of a version carrying it, per node",
            self.push_latency.clone(),
        );
        r.register(
            "agents_connected",
            "Agents with a stream open to this replica",
            self.agents_connected.clone(),
        );
        r.register(
            "push_updates",
            "Updates sent to agents, by kind (snapshot or delta)",
            self.updates.clone(),
        );
        r.register("nacks", "Updates agents refused", self.nacks.clone());
        r.register(
            "agent_refusals",
            "Agent streams that did not prove the node their Hello names, by reason (no-proof, other-node, invalid-token, review-failed)",
            self.agent_refusals.clone(),
        );
        r.register(
            "unenforced_pods",
            "Pods placed on a node that its agent does not enforce, by node and reason (no-endpoint: set up without kubesg in the CNI chain; uid-mismatch: the agent's endpoint has another uid)",
            self.unenforced.clone(),
        );
        r.register(
            "status_writes",
            "SecurityGroup status writes, by result",
            self.status_writes.clone(),
        );
        r.register(
            "events",
            "Kubernetes Events emitted, by reason",
            self.events.clone(),
        );
        r.register(
            "leader",
            "1 while this replica leads (serves agents, writes status)",
            self.leader.clone(),
        );
        r
    }
}

impl PushObserver for Metrics {
    fn push_latency(&self, _node: &str, latency: Duration) {
        self.push_latency.observe(latency.as_secs_f64());
    }

    fn agents_connected(&self, count: usize) {
        self.agents_connected
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    fn update_sent(&self, _node: &str, snapshot: bool) {
        self.updates
            .get_or_create(&UpdateLabels {
                kind: if snapshot { "snapshot" } else { "delta" },
            })
            .inc();
    }

    fn nacked(&self, _node: &str) {
        self.nacks.inc();
    }

    fn agent_refused(&self, _node: &str, reason: &'static str) {
        self.agent_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn unenforced(&self, node: &str, gaps: &BTreeMap<ObjectKey, Gap>) {
        for reason in GAP_LABELS {
            let count = gaps.values().filter(|g| g.label() == reason).count();
            self.unenforced
                .get_or_create(&NodeReasonLabels {
                    node: node.to_owned(),
                    reason,
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    metrics: Metrics,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = HttpState {
        registry: Arc::new(metrics.registry()),
        metrics,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    info!(addr = %listener.local_addr()?, "serving metrics and health");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` and serves on it; see [`serve`].
pub async fn bind_and_serve(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve(
        tokio::net::TcpListener::bind(addr).await?,
        metrics,
        shutdown,
    )
    .await
}

async fn metrics_text(State(state): State<HttpState>) -> (StatusCode, String) {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
        Ok(()) => (StatusCode::OK, out),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.metrics.ready() {
        (StatusCode::OK, "ready\n")
    } else if !state.metrics.synced.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the cluster is not compiled yet\n",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not the leader\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_exposes_compile_time_push_latency_and_leadership() {
        let m = Metrics::default();
        m.full_compile(Duration::from_millis(2400));
        m.incremental_compile(Duration::from_micros(300));
        m.incremental_compile(Duration::from_micros(500));
        m.push_latency("n1", Duration::from_millis(3));
        m.agents_connected(2);
        m.set_objects("Pod", 7);
        m.set_leading(true);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry()).unwrap();
        assert!(
            out.contains("kubesg_operator_push_latency_seconds_count 1"),
            "{out}"
        );
        assert!(out.contains("kubesg_operator_agents_connected 2"), "{out}");
        assert!(
            out.contains("kubesg_operator_objects{kind=\"Pod\"} 7"),
            "{out}"
        );
        assert!(out.contains("kubesg_operator_leader 1"), "{out}");
        assert!(
            out.contains("kubesg_operator_compile_seconds_count{mode=\"full\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("kubesg_operator_compile_seconds_count{mode=\"incremental\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("kubesg_operator_compile_seconds_sum{mode=\"full\"} 2.4"),
            "{out}"
        );
    }

    #[test]
    fn ready_only_when_synced_and_leading() {
        let m = Metrics::default();
        m.set_leading(true);
        assert!(!m.ready(), "not compiled yet");
        m.set_synced();
        assert!(m.ready());
        m.set_leading(false);
        assert!(!m.ready(), "a follower is not ready");
    }
}
