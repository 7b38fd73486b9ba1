//! The push server: the operator's side of `PolicyDistribution.Sync` (DESIGN.md "Contracts
//! between the parts", operator → agent). Each agent dials in over mTLS, names its node in
//! `Hello`, and from then on receives that node's plan as versioned snapshots and deltas, each
//! answered with an ACK or a NACK.
//!
//! # API
//!
//! - [`PushServer::new`] / [`PushServer::with_observer`] build the server with its
//!   [`PushSettings`]; [`PushServer::serve`] serves it on a listener with a
//!   [`ServerTlsConfig`] (see [`crate::tls::server_tls_config`]) until a shutdown future
//!   resolves (the operator's shutdown, or losing the leader Lease), ending every stream so the
//!   agents redial the next server.
//! - The rest of the operator hands it each node's latest plan with
//!   [`PushServer::set_node_plan`] whenever the compiler says it changed (an equal plan is
//!   ignored), and [`PushServer::remove_node`] when the node is gone. The caller must not hand
//!   over a plan before its sources are synced: a partial plan would be pushed as the truth.
//! - For the status writer: [`PushServer::node_status`] / [`PushServer::node_statuses`] report
//!   per node the last acked version with the [`NodePlan`] it carried
//!   ([`NodeStatus::acked_groups`] lists the group generations it programmed), the last NACK
//!   and its reason, whether an agent is connected and whether the acked plan is the latest.
//!   [`PushServer::subscribe`] returns a `watch` receiver whose value changes after every ack,
//!   NACK, connection, disconnection and plan change, so the writer wakes up, re-reads the
//!   statuses and coalesces bursts for free.
//! - For metrics: [`PushObserver`] is called with every apply-to-ack latency (from the
//!   [`PushServer::set_node_plan`] call that introduced a change to the ack of a version that
//!   carries it), with the number of connected agents when it changes, and per update sent and
//!   NACK received; [`PushServer::agents_connected`] reads the gauge directly.
//!
//! # Versions
//!
//! A node's versions come from one rule: the next version is `max(previous + 1, wall clock in
//! µs)`. They are strictly increasing per node within a server, and a later server (a restart,
//! a new leader) starts above every version an earlier one issued, as long as the clocks agree
//! to better than the time between the two (a leader change waits out the Lease, seconds), since
//! a server never issues versions faster than one per µs per node. The agent accepts a snapshot
//! of any version and a delta only on top of the version it applied; distinct servers never
//! issue the same number, so a `Hello.applied_version` can never be mistaken for a version this
//! server sent with other contents.
//!
//! # What is sent when
//!
//! - On `Hello`: if the agent's `applied_version` is the last version this server sent to the
//!   node or the last one the node acked, the server still has that plan and sends a delta from
//!   it to the current plan (or nothing when they are equal; an `applied_version` equal to a sent
//!   but un-acked version counts as its ack: the agent says it applied it). Otherwise a full
//!   snapshot. A node the server has no plan for yet gets nothing: its agent keeps enforcing
//!   what it has (fail static) rather than being emptied by an operator that just started.
//! - Pipelining: at most one update is in flight per stream. A plan arriving while an update is
//!   un-acked is only remembered; when the ack comes, one delta from the acked plan to the latest
//!   plan carries every change made meanwhile (coalescing), so a burst of N changes costs at
//!   most two updates and the agent never has to queue. The agent applies an update in
//!   microseconds to milliseconds, so more than one in flight would buy little and would make a
//!   NACK invalidate every delta queued behind it.
//! - An update un-acked for longer than [`PushSettings::ack_timeout`] ends the stream (gRPC
//!   `DEADLINE_EXCEEDED`): the agent is stuck or the connection is half dead. The agent redials
//!   and its Hello says what it applied, from which the server resumes as above.
//! - A NACK (logged with node, version and the agent's reason) makes the next update a full
//!   snapshot of the latest plan. A NACKed snapshot is not retried with the same plan on that
//!   stream (it would be refused again, in a loop): the next plan change, or a new stream, tries
//!   again; meanwhile the agent enforces its last applied version.
//!
//! # Peers
//!
//! Only clients whose certificate chains to the configured agents' CA get past the TLS
//! handshake (the [`ServerTlsConfig`] requires one). Then the stream must prove the node its
//! Hello names ([`crate::node_identity`]): a certificate naming it, or a node token the
//! server's [`TokenReviewer`] binds to it. Under [`NodeIdentityCheck::Require`] (the default)
//! a stream that does not is refused with `PERMISSION_DENIED` (`UNAVAILABLE` when the token
//! could not be reviewed), logged and counted ([`PushObserver::agent_refused`]); under
//! [`NodeIdentityCheck::LogOnly`] it is logged, counted and served.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use kubesg_proto::v1alpha1 as pb;
use pb::{
    agent_message::Kind,
    policy_distribution_server::{PolicyDistribution, PolicyDistributionServer},
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch, Notify},
};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tokio_util::sync::CancellationToken;
use tonic::{
    transport::{server::TcpIncoming, Server, ServerTlsConfig},
    Request, Response, Status, Streaming,
};
use tracing::{debug, info, warn};

use crate::{
    coverage::{self, Endpoints, Gap},
    model::ObjectKey,
    node_identity::{Proof, Refusal, TokenReviewer},
    plan::{GroupGeneration, NodePlan},
    tls::PeerIdentity,
    wire,
};

/// How the server behaves; [`Default`] is what the operator runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushSettings {
    /// Sent to every agent in each snapshot: cut tracked connections a rule change no longer
    /// allows (true, the default, as Neutron) or let them live on (false, as AWS).
    pub recheck_on_policy_change: bool,
    /// How long an update may stay un-acked before the stream is ended (the agent redials and
    /// resumes); see the module documentation.
    pub ack_timeout: Duration,
    /// How long a new stream may take to send its Hello.
    pub hello_timeout: Duration,
    /// HTTP/2 ping interval towards the agents, so a vanished node's stream is noticed (and its
    /// agent reported disconnected) within `keepalive_interval + keepalive_timeout`.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// Whether the client certificate must name the node of the Hello.
    pub node_identity: NodeIdentityCheck,
    /// The largest update sent (encoded bytes; at most [`kubesg_proto::MAX_MESSAGE_BYTES`],
    /// what the agents accept). A larger one is not sent: the node's status says so, as a
    /// refusal, and its agent keeps its rules, connected, until the plan changes.
    pub max_message_bytes: usize,
}

impl Default for PushSettings {
    fn default() -> Self {
        PushSettings {
            recheck_on_policy_change: true,
            ack_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            node_identity: NodeIdentityCheck::Require,
            max_message_bytes: kubesg_proto::MAX_MESSAGE_BYTES,
        }
    }
}

/// What the server does with a stream that does not prove the node its Hello names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeIdentityCheck {
    /// Refuse it (the default): otherwise any holder of an agent certificate could read every
    /// node's plan, replace a node's real agent and ack rules that node never enforces.
    #[default]
    Require,
    /// Log and count it, and serve it (while moving a cluster to per-node proofs).
    LogOnly,
}

/// Metrics hooks; every method defaults to doing nothing. The metrics module implements it with
/// Prometheus histograms, gauges and counters. Methods must be quick and must not call back into
/// the [`PushServer`]: `agents_connected` is called with the server's lock held, so that counts
/// arrive in order.
pub trait PushObserver: Send + Sync + 'static {
    /// The time from the [`PushServer::set_node_plan`] call that changed `node`'s plan to the
    /// first ack of a version carrying that change (one observation per change).
    fn push_latency(&self, node: &str, latency: Duration) {
        let _ = (node, latency);
    }
    /// The number of connected agents, after it changed.
    fn agents_connected(&self, count: usize) {
        let _ = count;
    }
    /// An update was sent to `node` (a snapshot or a delta).
    fn update_sent(&self, node: &str, snapshot: bool) {
        let _ = (node, snapshot);
    }
    /// `node`'s agent NACKed an update.
    fn nacked(&self, node: &str) {
        let _ = node;
    }
    /// A stream naming `node` did not prove it (`reason`: [`Refusal::reason`]); it was refused,
    /// or served under [`NodeIdentityCheck::LogOnly`].
    fn agent_refused(&self, node: &str, reason: &'static str) {
        let _ = (node, reason);
    }
    /// `node`'s pods the agent does not enforce, after an answer changed them (empty: all of
    /// them enforced again); see [`crate::coverage`].
    fn unenforced(&self, node: &str, gaps: &BTreeMap<ObjectKey, Gap>) {
        let _ = (node, gaps);
    }
}

/// The observer of a server nobody measures.
struct NoObserver;

impl PushObserver for NoObserver {}

/// A version a node's agent acked, as the status writer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckedVersion {
    /// The version.
    pub version: u64,
    /// The plan it carried (the agent's desired state since).
    pub plan: Arc<NodePlan>,
    /// When the ack arrived.
    pub at: SystemTime,
}

/// A version a node's agent refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    /// The version.
    pub version: u64,
    /// The agent's reason.
    pub reason: String,
    /// When the NACK arrived.
    pub at: SystemTime,
}

/// What the push server knows of one node, for the SecurityGroup status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// An agent of this node has a stream open.
    pub connected: bool,
    /// The connected agent's address and certificate names, for messages.
    pub peer: Option<String>,
    /// The connected agent's build (from its Hello).
    pub agent_version: Option<String>,
    /// The server has a plan for this node (set and not removed).
    pub has_plan: bool,
    /// The last version the agent acked, kept across disconnections (the agent keeps enforcing
    /// it while the operator is away).
    pub acked: Option<AckedVersion>,
    /// The acked plan is the latest plan: nothing is left to push.
    pub up_to_date: bool,
    /// The last NACK; a NACK with a version above `acked`'s is the latest attempt failing.
    pub last_nack: Option<Nack>,
    /// The pods of the acked plan the agent did not enforce when it acked it, by the endpoints
    /// it reported then; `None` when the agent never reported any (an older agent).
    pub gaps: Option<Arc<BTreeMap<ObjectKey, Gap>>>,
}

impl NodeStatus {
    /// Every group generation the acked plan carries: a group's generation is programmed on this
    /// node once it is here.
    pub fn acked_groups(&self) -> BTreeSet<GroupGeneration> {
        self.acked
            .iter()
            .flat_map(|a| a.plan.policies.values())
            .flat_map(|p| p.groups.iter().cloned())
            .collect()
    }
}

/// At most this many un-acked changes of one node are remembered for [`PushObserver::push_latency`]
/// (a node whose agent is away for long accumulates them); later ones are not observed
/// individually, the oldest pending change still reports the worst latency.
const MAX_PENDING_CHANGES: usize = 1024;

/// The operator's push server; cheap to clone (all clones are the same server).
#[derive(Clone)]
pub struct PushServer {
    inner: Arc<Inner>,
}

struct Inner {
    settings: PushSettings,
    observer: Arc<dyn PushObserver>,
    /// Reviews node tokens; `None` (manifests mode): only certificates prove nodes.
    token_reviewer: Option<Arc<dyn TokenReviewer>>,
    nodes: Mutex<HashMap<String, NodeState>>,
    /// Bumped after every change the status writer may care about.
    changes: watch::Sender<u64>,
    next_session: AtomicU64,
    /// Nodes with a session; changed only under `nodes`' lock, so the observer sees the
    /// counts in order.
    connected: AtomicUsize,
}

/// A plan as some agent has (or was sent) it.
#[derive(Clone, Debug)]
struct Applied {
    version: u64,
    plan: Arc<NodePlan>,
    /// The node's plan sequence number the plan had (see `NodeState::plan_seq`).
    seq: u64,
}

/// The update in flight on a stream.
struct InFlight {
    applied: Applied,
    snapshot: bool,
    sent_at: Instant,
}

/// What a stream's task needs to know of its registration.
struct SessionHandle {
    id: u64,
    wake: Arc<Notify>,
    replaced: CancellationToken,
    /// "delta" or "snapshot", for the log.
    resume: &'static str,
}

/// The current stream of a node.
struct Session {
    id: u64,
    /// Woken when the plan changes.
    wake: Arc<Notify>,
    /// Cancelled when a newer stream of the same node replaces this one.
    replaced: CancellationToken,
    peer: String,
    agent_version: String,
    /// How deltas spell changed sets for this agent (its Hello's capabilities).
    set_form: wire::SetForm,
    /// What the agent is known to have applied; `None`: the next update is a snapshot.
    agent: Option<Applied>,
    in_flight: Option<InFlight>,
    /// A snapshot of this plan sequence number was NACKed on this stream: wait for another.
    refused_seq: Option<u64>,
    /// The endpoints of the agent's last report on this stream (answers carry one only when
    /// they changed).
    endpoints: Option<Arc<Endpoints>>,
}

#[derive(Default)]
struct NodeState {
    plan: Option<Arc<NodePlan>>,
    /// Bumped on every change of `plan`; identifies a plan's content cheaply.
    plan_seq: u64,
    /// Changes not yet acked: (plan_seq, when set_node_plan was called).
    pending: VecDeque<(u64, Instant)>,
    last_version: u64,
    /// The last update sent on any stream (acked or not), a possible resume point.
    last_sent: Option<Applied>,
    /// The last acked update, a possible resume point and what the status reports.
    acked: Option<(Applied, SystemTime)>,
    last_nack: Option<Nack>,
    /// What [`NodeStatus::gaps`] reports, kept across disconnections like `acked`.
    gaps: Option<Arc<BTreeMap<ObjectKey, Gap>>>,
    session: Option<Session>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent between statements (no panics while half-updated), so a
    // poisoned lock is still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The next version of a node: above the previous one and at least the wall clock in µs.
fn next_version(previous: u64) -> u64 {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
        .unwrap_or(0);
    previous.saturating_add(1).max(now_us)
}

impl NodeState {
    /// The changes up to `seq` are on the agent: their latencies.
    fn covered(&mut self, seq: u64, now: Instant) -> Vec<Duration> {
        let mut latencies = Vec::new();
        while let Some(&(s, at)) = self.pending.front() {
            if s > seq {
                break;
            }
            latencies.push(now.duration_since(at));
            self.pending.pop_front();
        }
        latencies
    }

    fn record_ack(&mut self, applied: Applied, now: Instant) -> Vec<Duration> {
        let seq = applied.seq;
        self.acked = Some((applied, SystemTime::now()));
        self.covered(seq, now)
    }

    /// The update to send now on the current stream, if any, and the latencies of changes
    /// found to be on the agent already.
    fn next_update(
        &mut self,
        session_id: u64,
        settings: &pb::DatapathSettings,
        max_bytes: usize,
        now: Instant,
    ) -> (Option<pb::PolicyUpdate>, Vec<Duration>) {
        let plan_seq = self.plan_seq;
        let Some(plan) = self.plan.clone() else {
            return (None, Vec::new());
        };
        let Some(session) = self.session.as_mut().filter(|s| s.id == session_id) else {
            return (None, Vec::new());
        };
        if session.in_flight.is_some() || session.refused_seq == Some(plan_seq) {
            return (None, Vec::new());
        }
        let version = next_version(self.last_version);
        let sets = session.set_form;
        let update = match &mut session.agent {
            Some(agent) if agent.seq == plan_seq => return (None, Vec::new()),
            Some(agent) => match wire::delta(&agent.plan, &plan, agent.version, version, sets) {
                Some(delta) => delta,
                None => {
                    // The plan went back to what the agent has (A → B → A between two acks).
                    agent.seq = plan_seq;
                    let agent_version = agent.version;
                    if let Some((acked, _)) = &mut self.acked {
                        if acked.version == agent_version {
                            acked.seq = plan_seq;
                        }
                    }
                    return (None, self.covered(plan_seq, now));
                }
            },
            None => wire::snapshot(&plan, version, settings),
        };
        let bytes = prost::Message::encoded_len(&update);
        if bytes > max_bytes {
            // Sent, it would fail the stream and the agent would redial into the same failure;
            // not sent, the agent keeps its rules and the status says why, until the plan
            // changes (a new stream tries again).
            session.refused_seq = Some(plan_seq);
            self.last_nack =
                Some(Nack {
                    version,
                    reason: format!(
                    "the {} is {bytes} bytes encoded, over the {max_bytes}-byte message limit: \
                     not sent, the node keeps its current rules",
                    if update.snapshot { "snapshot" } else { "update" }
                ),
                    at: SystemTime::now(),
                });
            self.last_version = version;
            return (None, Vec::new());
        }
        let applied = Applied {
            version,
            plan,
            seq: plan_seq,
        };
        session.in_flight = Some(InFlight {
            applied: applied.clone(),
            snapshot: update.snapshot,
            sent_at: now,
        });
        self.last_version = version;
        self.last_sent = Some(applied);
        (Some(update), Vec::new())
    }
}

/// What an ack did, reported outside the lock.
/// Gaps before and after an answer, when it changed them.
type MovedGaps = Option<(
    Option<Arc<BTreeMap<ObjectKey, Gap>>>,
    Option<Arc<BTreeMap<ObjectKey, Gap>>>,
)>;

enum AckOutcome {
    /// Applied: the push latencies it completes, and the node's gaps if they moved.
    Acked(Vec<Duration>, MovedGaps),
    Nacked {
        snapshot: bool,
    },
    /// Not the version in flight (a protocol error by the agent, or a duplicate).
    Unexpected,
}

/// The `PolicyDistribution` service of one [`PushServer::serve`] call.
struct Service {
    inner: Arc<Inner>,
    stop: CancellationToken,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::PolicyUpdate, Status>> + Send>>;

impl PushServer {
    /// A server without metrics hooks.
    pub fn new(settings: PushSettings) -> PushServer {
        PushServer::with_observer(settings, Arc::new(NoObserver))
    }

    /// A server reporting to `observer` (the metrics).
    pub fn with_observer(settings: PushSettings, observer: Arc<dyn PushObserver>) -> PushServer {
        PushServer::with_token_reviewer(settings, observer, None)
    }

    /// A server reporting to `observer` that accepts node tokens `token_reviewer` binds to the
    /// Hello's node (in a cluster, the agents' ServiceAccount tokens reviewed by the API server).
    pub fn with_token_reviewer(
        settings: PushSettings,
        observer: Arc<dyn PushObserver>,
        token_reviewer: Option<Arc<dyn TokenReviewer>>,
    ) -> PushServer {
        PushServer {
            inner: Arc::new(Inner {
                settings,
                observer,
                token_reviewer,
                nodes: Mutex::new(HashMap::new()),
                changes: watch::Sender::new(0),
                next_session: AtomicU64::new(1),
                connected: AtomicUsize::new(0),
            }),
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &PushSettings {
        &self.inner.settings
    }

    /// Serves `PolicyDistribution` on `listener` with mTLS until `shutdown` resolves, then ends
    /// every stream (the agents keep enforcing what they have and redial) and returns once the
    /// connections are closed. Per-node state survives, so the same server may serve again.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: ServerTlsConfig,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let stop = CancellationToken::new();
        let service = Service {
            inner: Arc::clone(&self.inner),
            stop: stop.clone(),
        };
        let settings = &self.inner.settings;
        let router = Server::builder()
            .tls_config(tls)?
            .http2_keepalive_interval(Some(settings.keepalive_interval))
            .http2_keepalive_timeout(Some(settings.keepalive_timeout))
            .add_service(
                PolicyDistributionServer::new(service)
                    .max_encoding_message_size(kubesg_proto::MAX_MESSAGE_BYTES)
                    .max_decoding_message_size(kubesg_proto::MAX_MESSAGE_BYTES),
            );
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let signal = async move {
            shutdown.await;
            stop.cancel();
        };
        router.serve_with_incoming_shutdown(incoming, signal).await
    }

    /// Hands over `node`'s latest plan; its agent gets it (as a delta or a snapshot) as soon as
    /// it has acked what it was sent before. A plan equal to the current one changes nothing.
    pub fn set_node_plan(&self, node: &str, plan: impl Into<Arc<NodePlan>>) {
        let plan = plan.into();
        let now = Instant::now();
        let wake = {
            let mut nodes = lock(&self.inner.nodes);
            let state = nodes.entry(node.to_owned()).or_default();
            if state.plan.as_deref() == Some(&*plan) {
                return;
            }
            state.plan = Some(plan);
            state.plan_seq += 1;
            if state.pending.len() < MAX_PENDING_CHANGES {
                state.pending.push_back((state.plan_seq, now));
            }
            state.session.as_ref().map(|s| Arc::clone(&s.wake))
        };
        if let Some(wake) = wake {
            wake.notify_one();
        }
        self.inner.changed();
    }

    /// Forgets `node` (deleted from the cluster). A still connected agent of it keeps its
    /// stream but is sent nothing more; it keeps enforcing what it has.
    pub fn remove_node(&self, node: &str) {
        {
            let mut nodes = lock(&self.inner.nodes);
            let connected = nodes.get(node).is_some_and(|s| s.session.is_some());
            if connected {
                if let Some(state) = nodes.get_mut(node) {
                    state.plan = None;
                    state.plan_seq += 1;
                    state.pending.clear();
                }
            } else {
                nodes.remove(node);
            }
        }
        self.inner.changed();
    }

    /// What the server knows of `node`, or `None` if it never had a plan for it nor heard
    /// from its agent.
    pub fn node_status(&self, node: &str) -> Option<NodeStatus> {
        lock(&self.inner.nodes).get(node).map(status_of)
    }

    /// Every node's status.
    pub fn node_statuses(&self) -> BTreeMap<String, NodeStatus> {
        lock(&self.inner.nodes)
            .iter()
            .map(|(node, state)| (node.clone(), status_of(state)))
            .collect()
    }

    /// A receiver that sees a new value after every ack, NACK, connection, disconnection and
    /// plan change; read the statuses after `changed()` returns.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The number of agents with a stream open.
    pub fn agents_connected(&self) -> usize {
        self.inner.connected()
    }
}

fn status_of(state: &NodeState) -> NodeStatus {
    let session = state.session.as_ref();
    NodeStatus {
        connected: session.is_some(),
        peer: session.map(|s| s.peer.clone()),
        agent_version: session.map(|s| s.agent_version.clone()),
        has_plan: state.plan.is_some(),
        acked: state.acked.as_ref().map(|(a, at)| AckedVersion {
            version: a.version,
            plan: Arc::clone(&a.plan),
            at: *at,
        }),
        up_to_date: state.plan.is_some()
            && state
                .acked
                .as_ref()
                .is_some_and(|(a, _)| a.seq == state.plan_seq),
        last_nack: state.last_nack.clone(),
        gaps: state.gaps.clone(),
    }
}

impl Inner {
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Counts a session opened (`up`) or closed; called with `nodes` locked.
    fn count_connected(&self, up: bool) {
        let count = if up {
            self.connected.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.connected
                .fetch_sub(1, Ordering::Relaxed)
                .saturating_sub(1)
        };
        self.observer.agents_connected(count);
    }

    fn observe(&self, node: &str, latencies: &[Duration]) {
        for &latency in latencies {
            self.observer.push_latency(node, latency);
        }
    }

    fn datapath_settings(&self) -> pb::DatapathSettings {
        pb::DatapathSettings {
            recheck_on_policy_change: self.settings.recheck_on_policy_change,
        }
    }

    /// Registers a new stream for `hello.node`, replacing an older one; returns its id, its
    /// wake-up and replacement signals.
    fn open_session(&self, hello: &pb::Hello, peer: String) -> SessionHandle {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        let replaced = CancellationToken::new();
        let now = Instant::now();
        let (latencies, resume) = {
            let mut nodes = lock(&self.nodes);
            let state = nodes.entry(hello.node.clone()).or_default();
            match state.session.take() {
                Some(old) => old.replaced.cancel(),
                None => self.count_connected(true),
            }
            let v = hello.applied_version;
            let mut latencies = Vec::new();
            let mut agent = None;
            if v != 0 {
                if let Some((acked, _)) = state.acked.as_ref().filter(|(a, _)| a.version == v) {
                    agent = Some(acked.clone());
                } else if let Some(sent) = state.last_sent.clone().filter(|a| a.version == v) {
                    // Applied but its ack was lost with the old stream: the Hello is the ack.
                    latencies = state.record_ack(sent.clone(), now);
                    agent = Some(sent);
                }
            }
            let resume = if agent.is_some() { "delta" } else { "snapshot" };
            state.session = Some(Session {
                id,
                wake: Arc::clone(&wake),
                replaced: replaced.clone(),
                peer,
                agent_version: hello.agent_version.clone(),
                set_form: if hello
                    .capabilities
                    .iter()
                    .any(|c| c == kubesg_proto::CAPABILITY_SET_CHANGES)
                {
                    wire::SetForm::Changes
                } else {
                    wire::SetForm::Whole
                },
                agent,
                in_flight: None,
                refused_seq: None,
                endpoints: None,
            });
            (latencies, resume)
        };
        self.observe(&hello.node, &latencies);
        self.changed();
        SessionHandle {
            id,
            wake,
            replaced,
            resume,
        }
    }

    fn close_session(&self, node: &str, id: u64) {
        let closed = {
            let mut nodes = lock(&self.nodes);
            match nodes.get_mut(node) {
                Some(state) if state.session.as_ref().is_some_and(|s| s.id == id) => {
                    state.session = None;
                    self.count_connected(false);
                    if state.plan.is_none() && state.acked.is_none() && state.last_sent.is_none() {
                        nodes.remove(node);
                    }
                    true
                }
                _ => false,
            }
        };
        if closed {
            self.changed();
        }
    }

    fn on_ack(&self, node: &str, id: u64, ack: &pb::Ack) -> AckOutcome {
        let now = Instant::now();
        let outcome = {
            let mut nodes = lock(&self.nodes);
            let Some(state) = nodes.get_mut(node) else {
                return AckOutcome::Unexpected;
            };
            let Some(session) = state.session.as_mut().filter(|s| s.id == id) else {
                return AckOutcome::Unexpected;
            };
            let matches = session
                .in_flight
                .as_ref()
                .is_some_and(|f| f.applied.version == ack.version);
            if !matches {
                return AckOutcome::Unexpected;
            }
            let Some(flight) = session.in_flight.take() else {
                return AckOutcome::Unexpected;
            };
            if ack.applied {
                session.agent = Some(flight.applied.clone());
                if let Some(report) = &ack.endpoints {
                    session.endpoints = Some(Arc::new(coverage::endpoints(report)));
                }
                let gaps = session
                    .endpoints
                    .as_ref()
                    .map(|e| Arc::new(coverage::gaps(&flight.applied.plan, e)));
                let moved = (gaps != state.gaps).then(|| {
                    let before = std::mem::replace(&mut state.gaps, gaps);
                    (before, state.gaps.clone())
                });
                AckOutcome::Acked(state.record_ack(flight.applied, now), moved)
            } else {
                session.agent = None;
                if flight.snapshot {
                    session.refused_seq = Some(flight.applied.seq);
                }
                state.last_nack = Some(Nack {
                    version: ack.version,
                    // Bounded here too: whatever an agent sends ends up in group statuses.
                    reason: kubesg_proto::text::bounded(
                        &ack.reason,
                        kubesg_proto::text::MAX_NACK_REASON,
                    ),
                    at: SystemTime::now(),
                });
                AckOutcome::Nacked {
                    snapshot: flight.snapshot,
                }
            }
        };
        match &outcome {
            AckOutcome::Acked(latencies, moved) => {
                self.observe(node, latencies);
                if let Some((before, after)) = moved {
                    log_gaps(node, before.as_deref(), after.as_deref());
                    self.observer
                        .unenforced(node, after.as_deref().unwrap_or(&BTreeMap::new()));
                }
            }
            AckOutcome::Nacked { .. } => self.observer.nacked(node),
            AckOutcome::Unexpected => {}
        }
        self.changed();
        outcome
    }

    /// The next update for the stream, with the deadline of its ack.
    fn next_update(&self, node: &str, id: u64) -> (Option<pb::PolicyUpdate>, Option<Instant>) {
        let now = Instant::now();
        let settings = self.datapath_settings();
        let mut oversize = false;
        let (update, latencies, deadline) = {
            let mut nodes = lock(&self.nodes);
            let Some(state) = nodes.get_mut(node) else {
                return (None, None);
            };
            let nacks = state.last_nack.clone();
            let (update, latencies) =
                state.next_update(id, &settings, self.settings.max_message_bytes, now);
            if state.last_nack != nacks {
                if let Some(nack) = &state.last_nack {
                    warn!(node = %node, version = nack.version, reason = %nack.reason,
                          "a plan too large to send");
                }
                oversize = true;
            }
            let deadline = state
                .session
                .as_ref()
                .filter(|s| s.id == id)
                .and_then(|s| s.in_flight.as_ref())
                .map(|f| f.sent_at + self.settings.ack_timeout);
            (update, latencies, deadline)
        };
        if !latencies.is_empty() {
            self.observe(node, &latencies);
            self.changed();
        }
        if oversize {
            self.observer.nacked(node);
            self.changed();
        }
        (update, deadline)
    }
}

/// Logs the pods of `node` that stopped or started being enforced between two answers.
fn log_gaps(
    node: &str,
    before: Option<&BTreeMap<ObjectKey, Gap>>,
    after: Option<&BTreeMap<ObjectKey, Gap>>,
) {
    let empty = BTreeMap::new();
    let (before, after) = (before.unwrap_or(&empty), after.unwrap_or(&empty));
    for (pod, gap) in after {
        if before.get(pod) != Some(gap) {
            warn!(node = %node, pod = %pod, reason = gap.label(), "pod not enforced: {gap}");
        }
    }
    for pod in before.keys().filter(|p| !after.contains_key(*p)) {
        info!(node = %node, pod = %pod, "pod enforced again (or gone from the node)");
    }
}

/// How the session loop ended, for the log and the agent.
enum End {
    /// The agent closed its side, or went away.
    AgentGone(Option<Status>),
    /// The server ends the stream with this status.
    Server(Status),
}

/// One agent's stream, from its Hello to its end: sends what [`Inner::next_update`] says, one
/// update in flight, and records the acks.
async fn run_session(
    inner: Arc<Inner>,
    node: String,
    handle: SessionHandle,
    stop: CancellationToken,
    mut inbound: Streaming<pb::AgentMessage>,
    outbound: mpsc::Sender<Result<pb::PolicyUpdate, Status>>,
) {
    let SessionHandle {
        id, wake, replaced, ..
    } = handle;
    let end = loop {
        let (update, deadline) = inner.next_update(&node, id);
        if let Some(update) = update {
            debug!(
                node = %node,
                version = update.version,
                snapshot = update.snapshot,
                base_version = update.base_version,
                policies = update.upsert_policies.len(),
                pods = update.upsert_pods.len(),
                "sending policy update"
            );
            inner.observer.update_sent(&node, update.snapshot);
            if outbound.send(Ok(update)).await.is_err() {
                break End::AgentGone(None);
            }
        }
        let ack_deadline = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                break End::Server(Status::unavailable("the operator is shutting down"));
            }
            _ = replaced.cancelled() => {
                break End::Server(Status::aborted("replaced by a newer stream of the same node"));
            }
            message = inbound.message() => match message {
                Ok(Some(pb::AgentMessage { kind: Some(Kind::Ack(ack)) })) => {
                    match inner.on_ack(&node, id, &ack) {
                        AckOutcome::Acked(..) => {
                            debug!(node = %node, version = ack.version, "agent acked");
                        }
                        AckOutcome::Nacked { snapshot } => warn!(
                            node = %node,
                            version = ack.version,
                            snapshot,
                            reason = %ack.reason,
                            "agent refused a policy update; sending a full snapshot next"
                        ),
                        AckOutcome::Unexpected => warn!(
                            node = %node,
                            version = ack.version,
                            "ack for a version that is not in flight; ignored"
                        ),
                    }
                }
                Ok(Some(other)) => {
                    break End::Server(Status::invalid_argument(format!(
                        "only acks may follow Hello, got {other:?}"
                    )));
                }
                Ok(None) => break End::AgentGone(None),
                Err(status) => break End::AgentGone(Some(status)),
            },
            _ = wake.notified() => {}
            _ = ack_deadline => {
                break End::Server(Status::deadline_exceeded(format!(
                    "no ack within {:?}; redial and say what was applied",
                    inner.settings.ack_timeout
                )));
            }
        }
    };
    match end {
        End::AgentGone(status) => info!(
            node = %node,
            error = status.map(|s| s.message().to_owned()),
            "agent disconnected"
        ),
        End::Server(status) => {
            info!(node = %node, reason = %status.message(), "ending the agent's stream");
            // Best effort: the agent may be gone already.
            let _ = outbound.try_send(Err(status));
        }
    }
    inner.close_session(&node, id);
}

/// The token of the stream's `authorization: Bearer` metadata, if any.
fn bearer_token<T>(request: &Request<T>) -> Option<String> {
    let value = request
        .metadata()
        .get(kubesg_proto::NODE_TOKEN_METADATA)?
        .to_str()
        .ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

impl Service {
    /// How the stream proves `node` (see [`crate::node_identity`]): a certificate naming it
    /// suffices; otherwise the token must be bound to it.
    async fn prove(
        &self,
        node: &str,
        identity: Option<&PeerIdentity>,
        identity_text: &str,
        token: Option<String>,
    ) -> Result<Proof, Refusal> {
        if identity.is_some_and(|i| i.names_node(node)) {
            return Ok(Proof::Certificate);
        }
        let Some(token) = token else {
            return Err(Refusal::NoProof {
                identity: identity_text.to_owned(),
                node: node.to_owned(),
            });
        };
        let Some(reviewer) = &self.inner.token_reviewer else {
            return Err(Refusal::NoReviewer {
                identity: identity_text.to_owned(),
                node: node.to_owned(),
            });
        };
        // The API server's answer is bounded like the Hello: a stuck review must not hold the
        // stream (the agent redials).
        let wait = self.inner.settings.hello_timeout;
        let proven = tokio::time::timeout(wait, reviewer.node_of(&token))
            .await
            .map_err(|_| Refusal::ReviewFailed(format!("no answer within {wait:?}")))??;
        if proven == node {
            Ok(Proof::Token)
        } else {
            Err(Refusal::OtherNode {
                proven,
                claimed: node.to_owned(),
            })
        }
    }
}

#[tonic::async_trait]
impl PolicyDistribution for Service {
    type SyncStream = UpdateStream;

    async fn sync(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<UpdateStream>, Status> {
        if self.stop.is_cancelled() {
            return Err(Status::unavailable("the operator is shutting down"));
        }
        let remote = request
            .remote_addr()
            .map_or_else(|| "unknown address".to_owned(), |a| a.to_string());
        let identity = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| PeerIdentity::from_der(c)));
        let token = bearer_token(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.inner.settings.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello"))??;
        let hello = match first {
            Some(pb::AgentMessage {
                kind: Some(Kind::Hello(hello)),
            }) => hello,
            other => {
                return Err(Status::invalid_argument(format!(
                    "the first message must be Hello, got {other:?}"
                )))
            }
        };
        if hello.node.is_empty() {
            return Err(Status::invalid_argument("the Hello names no node"));
        }
        let identity_text = identity
            .as_ref()
            .map_or_else(|| "unparsable certificate".to_owned(), |i| i.to_string());
        let proof = self
            .prove(&hello.node, identity.as_ref(), &identity_text, token)
            .await;
        let proof = match proof {
            Ok(proof) => proof.to_string(),
            Err(refusal) => {
                self.inner
                    .observer
                    .agent_refused(&hello.node, refusal.reason());
                if self.inner.settings.node_identity == NodeIdentityCheck::Require {
                    warn!(
                        node = %hello.node,
                        peer = %remote,
                        identity = %identity_text,
                        reason = refusal.reason(),
                        "refusing an agent that does not prove its node: {refusal}"
                    );
                    return Err(match refusal {
                        Refusal::ReviewFailed(_) => Status::unavailable(refusal.to_string()),
                        _ => Status::permission_denied(refusal.to_string()),
                    });
                }
                warn!(
                    node = %hello.node,
                    peer = %remote,
                    identity = %identity_text,
                    reason = refusal.reason(),
                    "serving an agent that does not prove its node (--node-identity log-only): {refusal}"
                );
                "none".to_owned()
            }
        };
        let peer = format!("{remote} {identity_text}");
        let handle = self.inner.open_session(&hello, peer);
        info!(
            node = %hello.node,
            peer = %remote,
            identity = %identity_text,
            proof = %proof,
            applied_version = hello.applied_version,
            agent_version = %hello.agent_version,
            resume = handle.resume,
            "agent connected"
        );
        // One update in flight plus the closing status: the sender never waits long.
        let (outbound, updates) = mpsc::channel(4);
        tokio::spawn(run_session(
            Arc::clone(&self.inner),
            hello.node,
            handle,
            self.stop.clone(),
            inbound,
            outbound,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(updates))))
    }
}
