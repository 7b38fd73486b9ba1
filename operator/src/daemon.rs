//! `kubesg-operator run` as a library: wires a source (the Kubernetes API or a manifests
//! directory), the compile-and-push [`runtime`], the push server, the status writer, leader
//! election and the metrics endpoint, and stops them in order.
//!
//! Leadership decides two things: only the leader serves agents (the gRPC port is bound only
//! while leading, so a follower refuses connections at once and its `/readyz` sends the Service
//! elsewhere) and only the leader writes statuses and Events. Every replica watches and compiles,
//! so a new leader pushes at once. Without election (manifests mode, `--no-leader-election`)
//! the replica always leads.
//!
//! Stopping (SIGTERM, or losing nothing but the process): stop serving (the agents keep
//! enforcing what they have and redial), stop writing, then release the lease, so a successor
//! never overlaps with this replica.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use kube::Client;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::ServerTlsConfig;
use tracing::{info, warn};

use crate::{
    kube_source::{self, SourceEvent},
    leader::{self, Elector, LeaseSettings},
    manifest_source,
    metrics::{self, Metrics},
    netpol,
    node_identity::{AgentTokens, KubeTokenReviewer, TokenReviewer},
    node_taint,
    push::{PushServer, PushSettings},
    runtime::{self, Runtime, MANIFESTS},
    status_api,
    status_controller::ControllerSink,
    status_files::StatusFiles,
    status_writer::StatusWriter,
    tls::{ServerTlsFiles, TlsFileError},
};

/// Where the cluster comes from.
// One value, built once at start and moved into the daemon: its size costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    /// The Kubernetes API.
    Api {
        /// The client (in-cluster or kubeconfig).
        client: Client,
        /// Leader election; `None`: this replica always leads.
        election: Option<LeaseSettings>,
        /// This replica's name in Events.
        instance: String,
        /// Whose node tokens the push server accepts (reviewed with the API server).
        agent_tokens: AgentTokens,
    },
    /// A directory of manifests, followed by file-system notifications.
    Manifests {
        /// The directory.
        dir: PathBuf,
        /// Also read the whole directory this often (file systems without notifications).
        rescan: Option<Duration>,
        /// Where status files go; `None`: statuses are only logged.
        status_dir: Option<PathBuf>,
    },
}

/// Everything `kubesg-operator run` needs.
pub struct OperatorSettings {
    /// The source.
    pub source: Source,
    /// The gRPC address agents dial.
    pub listen: SocketAddr,
    /// The push server's certificate and the agents' CA.
    pub tls: ServerTlsFiles,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not served.
    pub metrics_address: Option<SocketAddr>,
    /// The push server's settings.
    pub push: PushSettings,
    /// How often the TLS files are looked at for a rotation (a renewed certificate is served
    /// without a restart).
    pub tls_poll: Duration,
    /// Whether NetworkPolicies are enforced or left to another enforcer.
    pub network_policies: netpol::Mode,
}

/// Why the operator could not start or stopped with an error. Each message is complete (the
/// underlying error is part of it, not a separate source), so `{:#}` prints it once.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The TLS files are missing or unusable.
    #[error("{0}")]
    Tls(TlsFileError),
    /// An address could not be bound.
    #[error("cannot listen on {addr} ({what}): {error}")]
    Bind {
        /// What it is for.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The manifests or status directory is unusable.
    #[error("{}: {error}", path.display())]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving agents: {0}")]
    Serve(tonic::transport::Error),
}

/// A running operator.
pub struct Operator {
    push: PushServer,
    metrics: Metrics,
    serving: watch::Receiver<Option<SocketAddr>>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), DaemonError>>,
}

impl Operator {
    /// Starts everything; fails at once on unusable TLS files, directories or the metrics
    /// address.
    pub async fn start(settings: OperatorSettings) -> Result<Operator, DaemonError> {
        let tls = settings.tls.load().map_err(DaemonError::Tls)?;
        let metrics = Metrics::default();
        let token_reviewer = match &settings.source {
            Source::Api {
                client,
                agent_tokens,
                ..
            } => Some(
                Arc::new(KubeTokenReviewer::new(client.clone(), agent_tokens))
                    as Arc<dyn TokenReviewer>,
            ),
            Source::Manifests { .. } => None,
        };
        let push = PushServer::with_token_reviewer(
            settings.push.clone(),
            Arc::new(metrics.clone()),
            token_reviewer,
        );
        let stop = CancellationToken::new();
        let metrics_listener = match settings.metrics_address {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|error| DaemonError::Bind {
                            what: "metrics",
                            addr,
                            error,
                        })?,
                )
            }
            None => None,
        };
        let (serving_tx, serving) = watch::channel(None);
        let (source_tx, source_rx) = mpsc::channel::<SourceEvent>(1024);
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (leading_tx, leading_rx) = watch::channel(false);
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        let mut elector_task = None;
        let election_stop = CancellationToken::new();

        let network_policies = settings.network_policies;
        let kinds: Vec<&'static str> = match settings.source {
            Source::Api {
                client,
                election,
                instance,
                agent_tokens: _,
            } => {
                let c = client.clone();
                let s = stop.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = kube_source::run(c, network_policies, source_tx) => {}
                    }
                }));
                tasks.push(tokio::spawn(node_taint::run(
                    client.clone(),
                    push.clone(),
                    leading_rx.clone(),
                    stop.clone(),
                )));
                let ctx = status_api::Context::new(client.clone(), &instance, metrics.clone());
                let sink = ControllerSink::new(
                    client.clone(),
                    ctx,
                    network_policies == netpol::Mode::Enforce,
                );
                tasks.push(tokio::spawn(StatusWriter::new(sink, push.clone()).run(
                    reports_rx,
                    leading_rx.clone(),
                    stop.clone(),
                )));
                match election {
                    Some(lease) => {
                        info!(
                            namespace = %lease.namespace,
                            lease = %lease.name,
                            identity = %lease.identity,
                            "leader election on"
                        );
                        elector_task = Some(tokio::spawn(leader::run(
                            Elector::new(client, lease),
                            leading_tx.clone(),
                            election_stop.clone(),
                        )));
                    }
                    None => {
                        leading_tx.send_replace(true);
                    }
                }
                kube_source::kinds(network_policies)
            }
            Source::Manifests {
                dir,
                rescan,
                status_dir,
            } => {
                if let Err(error) = std::fs::read_dir(&dir) {
                    return Err(DaemonError::Directory { path: dir, error });
                }
                let files =
                    StatusFiles::new(status_dir.clone(), metrics.clone()).map_err(|error| {
                        DaemonError::Directory {
                            path: status_dir.unwrap_or_default(),
                            error,
                        }
                    })?;
                info!(dir = %dir.display(), "manifests mode");
                tasks.push(tokio::spawn(manifest_source::run(
                    dir,
                    rescan,
                    network_policies,
                    source_tx,
                    stop.clone(),
                )));
                tasks.push(tokio::spawn(StatusWriter::new(files, push.clone()).run(
                    reports_rx,
                    leading_rx.clone(),
                    stop.clone(),
                )));
                leading_tx.send_replace(true);
                vec![MANIFESTS]
            }
        };
        metrics.set_leading(*leading_rx.borrow());
        {
            let metrics = metrics.clone();
            let mut leading = leading_rx.clone();
            let s = stop.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = s.cancelled() => return,
                        changed = leading.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            metrics.set_leading(*leading.borrow_and_update());
                        }
                    }
                }
            }));
        }
        let runtime = Runtime::new(kinds, push.clone(), reports_tx, metrics.clone());
        tasks.push(tokio::spawn(runtime::run(runtime, source_rx, stop.clone())));
        let metrics_task = metrics_listener.map(|listener| {
            let s = stop.clone();
            let m = metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(listener, m, s.cancelled_owned()).await {
                    warn!(error = %e, "the metrics server stopped");
                }
            })
        });
        let serve_task = tokio::spawn(serve_while_leading(
            push.clone(),
            settings.listen,
            (settings.tls, settings.tls_poll),
            tls,
            leading_rx,
            stop.clone(),
            serving_tx,
        ));
        let supervisor_stop = stop.clone();
        let task = tokio::spawn(async move {
            // The gRPC server only ends on shutdown, or with an error (e.g. the port is taken).
            let served = match serve_task.await {
                Ok(result) => result,
                Err(e) => {
                    warn!(error = %e, "the push server task failed");
                    Ok(())
                }
            };
            supervisor_stop.cancel();
            for t in tasks {
                let _ = t.await;
            }
            if let Some(t) = metrics_task {
                let _ = t.await;
            }
            // Serving and writing have stopped: only now give the lease up.
            election_stop.cancel();
            drop(leading_tx);
            if let Some(t) = elector_task {
                if let Ok(mut elector) = t.await {
                    if let Err(e) = elector.release().await {
                        warn!(error = %e, "could not release the lease; it expires on its own");
                    }
                }
            }
            info!("stopped");
            served
        });
        Ok(Operator {
            push,
            metrics,
            serving,
            stop,
            task,
        })
    }

    /// The push server (its node statuses say what the agents acked).
    pub fn push(&self) -> &PushServer {
        &self.push
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The address agents are served on, once this replica leads; `None` if it stopped first.
    pub async fn serving_address(&mut self) -> Option<SocketAddr> {
        self.serving
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|a| *a)
    }

    /// Stops the operator (as SIGTERM does) and waits until it has stopped.
    pub async fn stop(self) -> Result<(), DaemonError> {
        self.stop.cancel();
        self.wait().await
    }

    /// A token that stops the operator when cancelled.
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until the operator stops (after [`Operator::stopper`] is cancelled, or on an
    /// error).
    pub async fn wait(self) -> Result<(), DaemonError> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => {
                warn!(error = %e, "the operator task failed");
                Ok(())
            }
        }
    }
}

/// Serves agents on `listen` during each term of leadership, until `stop`. The TLS files are
/// re-read at the start of each term and whenever they change on disk (rotated certificates:
/// serving restarts, agents reconnect and resume), keeping the previous configuration if they
/// became unusable.
async fn serve_while_leading(
    push: PushServer,
    listen: SocketAddr,
    (files, tls_poll): (ServerTlsFiles, Duration),
    mut tls: ServerTlsConfig,
    mut leading: watch::Receiver<bool>,
    stop: CancellationToken,
    serving: watch::Sender<Option<SocketAddr>>,
) -> Result<(), DaemonError> {
    let mut first = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            closed = async { leading.wait_for(|l| *l).await.is_err() } => {
                if closed {
                    return Ok(());
                }
            }
        }
        if !first {
            match files.load() {
                Ok(t) => tls = t,
                Err(e) => warn!(error = %e, "keeping the previous TLS configuration"),
            }
        }
        first = false;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|error| DaemonError::Bind {
                what: "agents",
                addr: listen,
                error,
            })?;
        let addr = listener.local_addr().map_err(|error| DaemonError::Bind {
            what: "agents",
            addr: listen,
            error,
        })?;
        info!(%addr, "leading: serving agents");
        serving.send_replace(Some(addr));
        let mut lost = leading.clone();
        let stopping = stop.clone();
        let rotated = Arc::new(AtomicBool::new(false));
        let rotated_flag = rotated.clone();
        let files_now = files.clone();
        let shutdown = async move {
            tokio::select! {
                _ = stopping.cancelled() => {}
                closed = async { lost.wait_for(|l| !*l).await.is_err() } => {
                    if closed {
                        // Leadership can no longer change: serve until stopped.
                        stopping.cancelled().await;
                    }
                }
                () = files_changed(&files_now, tls_poll) => rotated_flag.store(true, Ordering::Relaxed),
            }
        };
        push.serve(listener, tls.clone(), shutdown)
            .await
            .map_err(DaemonError::Serve)?;
        serving.send_replace(None);
        if stop.is_cancelled() {
            return Ok(());
        }
        if rotated.load(Ordering::Relaxed) {
            info!("TLS files changed: serving again with them (agents reconnect and resume)");
        } else {
            info!("no longer leading: stopped serving agents");
        }
    }
}

/// How often the TLS files are looked at by default (cert-manager renewing the Secret).
pub const DEFAULT_TLS_POLL: Duration = Duration::from_secs(10);

/// Resolves when any of the TLS files changes (size or modification time): a renewed
/// certificate must be served without waiting for the next leadership term.
async fn files_changed(files: &ServerTlsFiles, every: Duration) {
    let stamp = |files: &ServerTlsFiles| -> Vec<Option<(u64, std::time::SystemTime)>> {
        [&files.cert, &files.key, &files.client_ca]
            .into_iter()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.len(), m.modified().ok()?))
            })
            .collect()
    };
    let first = stamp(files);
    loop {
        tokio::time::sleep(every).await;
        if stamp(files) != first {
            return;
        }
    }
}
