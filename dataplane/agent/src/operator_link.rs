//! The agent's link to the operator: one `PolicyDistribution.Sync` stream over mTLS, kept open
//! for the agent's whole life (DESIGN.md "Contracts between the parts", operator → agent).
//!
//! [`run`] dials the operator, sends `Hello` with the version the agent has applied, then applies
//! every `PolicyUpdate` through an [`UpdateSink`] and answers each with an `Ack` (a NACK, with the
//! sink's reason, when it fails). On any failure (TLS files, connection, handshake, stream error,
//! end of stream) it marks itself disconnected, waits with jittered exponential backoff and dials
//! again, re-reading the TLS files and the node token (rotation) and sending a new `Hello` with the version applied
//! by then, from which the operator resumes. It never gives up and never touches what the sink
//! applied: while the operator is away the agent keeps enforcing the last version (fail static).

use std::{
    convert::Infallible,
    error::Error as StdError,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use kubesg_proto::v1alpha1 as pb;
use pb::{agent_message::Kind, policy_distribution_client::PolicyDistributionClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{metadata::AsciiMetadataValue, transport::Endpoint, Request};
use tracing::{info, warn};

use crate::tls::{ClientTlsFiles, TlsFileError};

/// What the operator link needs from the rest of the agent: the version it has applied (sent in
/// Hello so the operator can resume with a delta) and a way to apply an update. An `Err` is a
/// NACK with that reason; the previous version stays enforced.
pub trait UpdateSink: Send + Sync + 'static {
    /// The last applied version (0: none).
    fn applied_version(&self) -> u64;
    /// Applies one update (blocking; quick: map updates) and returns the pods the agent holds
    /// endpoints for right after it, read in the same step: each answer then tells the operator
    /// which of the pods it placed on the node the agent enforces (a pod set up without kubesg
    /// in the CNI chain has none).
    fn apply(&self, update: &pb::PolicyUpdate) -> Result<Vec<pb::PodRef>, String>;
}

/// How the link reaches the operator; built once by the daemon from its flags.
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// The Kubernetes node the agent runs on, sent in every Hello.
    pub node: String,
    /// The operator's address, `https://host:port` (plain `http` is refused: rules are accepted
    /// only over mTLS).
    pub operator: String,
    /// The TLS files and expected server name, re-read on every connection attempt.
    pub tls: ClientTlsFiles,
    /// A token proving which node the agent runs on (in a cluster: the agent pod's projected
    /// ServiceAccount token, which the operator reviews with the API server and which names the
    /// pod's node), re-read on every connection attempt because the kubelet rotates it; sent as
    /// `authorization: Bearer`. `None`: the certificate alone must name the node.
    pub token_file: Option<PathBuf>,
    /// Waits between connection attempts.
    pub backoff: Backoff,
    /// Bound on the TCP connect and TLS handshake, so a black-holed address is retried.
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval: a silently dead operator (node partitioned, pod gone without a
    /// FIN) is noticed within `keepalive_interval + keepalive_timeout`, then redialled.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is declared dead.
    pub keepalive_timeout: Duration,
}

impl LinkSettings {
    /// Settings with the defaults for everything but the node, the address and the TLS files.
    pub fn new(node: impl Into<String>, operator: impl Into<String>, tls: ClientTlsFiles) -> Self {
        LinkSettings {
            node: node.into(),
            operator: operator.into(),
            tls,
            token_file: None,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Exponential backoff between connection attempts: `min` after the first failure, doubling up
/// to `max`, each wait drawn uniformly from [half, full] so that a whole DaemonSet does not
/// redial a restarted operator in lockstep. It restarts from `min` after a stream was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub min: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    /// 200 ms doubling to 10 s.
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    fn next(&self, current: Duration) -> Duration {
        current.saturating_mul(2).min(self.max).max(self.min)
    }
}

/// A wait in [d/2, d]. The randomness comes from std's per-process random hasher keys: jitter
/// needs no quality, only different values on different nodes.
fn jittered(d: Duration) -> Duration {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let fraction = (random >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(0.5 + 0.5 * fraction)
}

/// The link's state as the daemon exports it (metrics, readiness details); published on the
/// `watch` channel given to [`run`] after every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// A `Sync` stream to the operator is open (Hello accepted).
    pub connected: bool,
    /// The sink's applied version, as of the last Hello or update.
    pub applied_version: u64,
    /// The most recent failure (TLS files, connection, handshake, stream), kept after a
    /// reconnect for diagnosis; `None` until something failed.
    pub last_error: Option<String>,
    /// Updates applied and acked.
    pub updates_applied: u64,
    /// Updates the sink refused (NACKed).
    pub updates_rejected: u64,
    /// `Sync` streams opened so far (1 + the number of successful reconnects).
    pub streams_opened: u64,
    /// Failed connection attempts and lost streams so far.
    pub failures: u64,
}

/// Why one connection attempt or stream ended; only ever rendered into logs and
/// [`LinkStatus::last_error`].
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Tls(#[from] TlsFileError),
    #[error("invalid operator address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("cannot connect to the operator: {}", chain(.0))]
    Connect(tonic::transport::Error),
    #[error("the node identity token {}: {reason}", path.display())]
    Token { path: PathBuf, reason: String },
    #[error("the Sync stream failed: {}", status_text(.0))]
    Stream(tonic::Status),
    #[error("the operator ended the Sync stream")]
    Closed,
}

/// An error and its sources, `a: b: c`, skipping a source already spelled out by its parent
/// (tonic's "transport error" says nothing; rustls's "invalid peer certificate: UnknownIssuer"
/// at the bottom is what an operator of the cluster needs to see).
fn chain(error: &dyn StdError) -> String {
    with_sources(error.to_string(), error.source())
}

/// A gRPC status as `Code: message: sources` (its own `Display` prints its source with `Debug`).
fn status_text(status: &tonic::Status) -> String {
    with_sources(
        format!("{:?}: {}", status.code(), status.message()),
        status.source(),
    )
}

fn with_sources(mut text: String, mut source: Option<&(dyn StdError + 'static)>) -> String {
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

/// Runs the operator link until `stop` is cancelled (the daemon's shutdown), then returns with
/// the status marked disconnected. Failures never end it: they are logged, recorded in `status`
/// and retried with backoff.
///
/// `sink` is called (on a blocking thread) only with updates received from the operator, one at
/// a time and in order; `status` receives a new [`LinkStatus`] after every change (it works with
/// or without receivers).
pub async fn run(
    settings: LinkSettings,
    sink: Arc<dyn UpdateSink>,
    status: watch::Sender<LinkStatus>,
    stop: CancellationToken,
) {
    status.send_modify(|s| {
        s.connected = false;
        s.applied_version = sink.applied_version();
    });
    let mut delay = settings.backoff.min;
    loop {
        let mut opened = false;
        let outcome = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            outcome = session(&settings, &sink, &status, &mut opened) => outcome,
        };
        let error = match outcome {
            Ok(never) => match never {},
            Err(e) => e,
        };
        if opened {
            delay = settings.backoff.min;
        }
        let wait = jittered(delay);
        delay = settings.backoff.next(delay);
        let text = error.to_string();
        status.send_modify(|s| {
            s.connected = false;
            s.failures += 1;
            s.last_error = Some(text.clone());
        });
        warn!(
            node = %settings.node,
            operator = %settings.operator,
            applied_version = status.borrow().applied_version,
            retry_in = ?wait,
            error = %text,
            "operator link down; enforcing the last applied version until it is back"
        );
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    status.send_modify(|s| s.connected = false);
    info!(node = %settings.node, operator = %settings.operator, "operator link stopped");
}

/// The `authorization` value carrying the token in `path`: `Bearer <token>`.
fn bearer(path: &Path) -> Result<AsciiMetadataValue, LinkError> {
    let error = |reason: String| LinkError::Token {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(error("is empty".into()));
    }
    AsciiMetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| error("is not a token (characters a header cannot carry)".into()))
}

/// One connection and stream, from dialling to its end (always an error: the stream is meant to
/// last forever). Sets `opened` once the stream is open, which resets the backoff.
async fn session(
    settings: &LinkSettings,
    sink: &Arc<dyn UpdateSink>,
    status: &watch::Sender<LinkStatus>,
    opened: &mut bool,
) -> Result<Infallible, LinkError> {
    let address_error = |reason: String| LinkError::Address {
        address: settings.operator.clone(),
        reason,
    };
    let endpoint =
        Endpoint::from_shared(settings.operator.clone()).map_err(|e| address_error(chain(&e)))?;
    if endpoint.uri().scheme_str() != Some("https") {
        return Err(address_error("the scheme must be https".into()));
    }
    let tls = settings.tls.load()?;
    let token = settings.token_file.as_deref().map(bearer).transpose()?;
    let channel = endpoint
        .tls_config(tls)
        .map_err(|e| address_error(chain(&e)))?
        .connect_timeout(settings.connect_timeout)
        .http2_keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(LinkError::Connect)?;
    let mut client = PolicyDistributionClient::new(channel)
        .max_decoding_message_size(kubesg_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(kubesg_proto::MAX_MESSAGE_BYTES);

    // The Hello is queued before the call so it goes out with the request.
    let (to_operator, outbound) = mpsc::channel(16);
    let applied_version = sink.applied_version();
    let hello = pb::AgentMessage {
        kind: Some(Kind::Hello(pb::Hello {
            node: settings.node.clone(),
            applied_version,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            capabilities: vec![kubesg_proto::CAPABILITY_SET_CHANGES.to_owned()],
        })),
    };
    to_operator
        .send(hello)
        .await
        .map_err(|_| LinkError::Closed)?;
    let mut request = Request::new(ReceiverStream::new(outbound));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert(kubesg_proto::NODE_TOKEN_METADATA, token);
    }
    let mut updates = client
        .sync(request)
        .await
        .map_err(LinkError::Stream)?
        .into_inner();

    *opened = true;
    status.send_modify(|s| {
        s.connected = true;
        s.streams_opened += 1;
        s.applied_version = applied_version;
    });
    info!(
        node = %settings.node,
        operator = %settings.operator,
        applied_version,
        "connected to the operator"
    );

    // The endpoints of the last report on this stream: an answer carries them only when they
    // changed (the operator keeps the last report of the stream).
    let mut reported: Option<Vec<pb::PodRef>> = None;
    loop {
        let update = match updates.message().await {
            Ok(Some(update)) => update,
            Ok(None) => return Err(LinkError::Closed),
            Err(e) => return Err(LinkError::Stream(e)),
        };
        let version = update.version;
        let applier = Arc::clone(sink);
        let result = tokio::task::spawn_blocking(move || applier.apply(&update))
            .await
            .unwrap_or_else(|e| Err(format!("applying the update failed: {e}")));
        let ack = match result {
            Ok(mut pods) => {
                let applied_version = sink.applied_version();
                status.send_modify(|s| {
                    s.updates_applied += 1;
                    s.applied_version = applied_version;
                });
                info!(node = %settings.node, version, "applied policy update");
                pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                let endpoints = (reported.as_ref() != Some(&pods))
                    .then(|| pb::EndpointReport { pods: pods.clone() });
                reported = Some(pods);
                pb::Ack {
                    version,
                    applied: true,
                    reason: String::new(),
                    endpoints,
                }
            }
            Err(reason) => {
                status.send_modify(|s| s.updates_rejected += 1);
                warn!(
                    node = %settings.node,
                    operator = %settings.operator,
                    version,
                    reason = %reason,
                    "rejected policy update; the previous version stays enforced"
                );
                pb::Ack {
                    version,
                    applied: false,
                    reason: kubesg_proto::text::bounded(
                        &reason,
                        kubesg_proto::text::MAX_NACK_REASON,
                    ),
                    endpoints: None,
                }
            }
        };
        let ack = pb::AgentMessage {
            kind: Some(Kind::Ack(ack)),
        };
        to_operator.send(ack).await.map_err(|_| LinkError::Closed)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_maximum() {
        let b = Backoff {
            min: Duration::from_millis(200),
            max: Duration::from_secs(1),
        };
        let waits: Vec<_> = std::iter::successors(Some(b.min), |d| Some(b.next(*d)))
            .take(5)
            .collect();
        assert_eq!(
            waits,
            [200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
    }

    #[test]
    fn jittered_wait_stays_between_half_and_full() {
        let d = Duration::from_millis(1000);
        for _ in 0..1000 {
            let w = jittered(d);
            assert!(w >= d / 2 && w <= d, "{w:?}");
        }
    }
}
