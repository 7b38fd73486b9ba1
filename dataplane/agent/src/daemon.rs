//! `kubesg-agent run`: the node agent. Loads (or takes over) the datapath, restores its endpoints,
//! serves the CNI socket, keeps the link to the operator, sweeps conntrack, logs denials, serves
//! metrics and health, and on SIGTERM leaves everything enforcing (fail static).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use kubesg_proto::v1alpha1::cni_backend_server::CniBackendServer;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    cni_server::CniService,
    conntrack::Sweeper,
    datapath::DatapathOptions,
    enforcer::{Enforcer, EnforcerOptions},
    events,
    metrics::{self, Metrics},
    node::Node,
    operator_link::{self, LinkSettings},
    startup::Startup,
    timeouts,
};

/// How often the agent looks for CNI DELs queued while it could not answer.
const PENDING_DELETES_INTERVAL: Duration = Duration::from_secs(2);

/// Everything `run` needs, as the command line gives it.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// The datapath (pin directory, attach mode, table size, settings).
    pub datapath: DatapathOptions,
    /// Endpoint records and the last applied state.
    pub state_dir: PathBuf,
    /// The CNI socket.
    pub socket: PathBuf,
    /// What a pod gets before its rules arrive.
    pub startup: Startup,
    /// How long a CNI ADD waits for rules under [`crate::enforcer::StartupPolicy::Wait`].
    pub wait_timeout: Duration,
    /// `NAME=SECONDS` conntrack timeouts to apply at start.
    pub timeouts: Vec<String>,
    /// How often expired conntrack entries are swept.
    pub sweep_interval: Duration,
    /// Where `/metrics`, `/healthz`, `/readyz` are served.
    pub metrics_address: SocketAddr,
    /// The operator link; `None` runs the agent alone (endpoints get the startup policy, or
    /// the last rules applied before a restart).
    pub operator: Option<LinkSettings>,
    /// Log every dropped packet (deny events) at info level.
    pub flow_logs: bool,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(settings: RunSettings) -> anyhow::Result<()> {
    let mut datapath = settings.datapath.clone();
    for t in &settings.timeouts {
        timeouts::apply(&mut datapath.config, t)
            .with_context(|| format!("--conntrack-timeout {t}"))?;
    }
    let opts = EnforcerOptions {
        datapath,
        state_dir: settings.state_dir.clone(),
        startup: settings.startup.clone(),
        pending_deletes: kubesg_proto::pending_deletes::dir_beside(&settings.socket),
    };
    let mut enforcer = tokio::task::spawn_blocking(move || Enforcer::open(opts))
        .await?
        .context("restoring enforcement")?;
    let sweeper = Sweeper::start(
        enforcer.datapath().maps().try_clone()?,
        settings.sweep_interval,
    );
    let scrape_maps = enforcer.datapath().maps().try_clone()?;
    let published = enforcer.published_endpoints();
    let events = enforcer.datapath_mut().take_events();
    let metrics = Metrics::default();
    let node = Node::new(enforcer, metrics.clone());
    metrics.set_applied_version(node.lock().applied_version());

    let stop = CancellationToken::new();

    let listener = CniService::bind(&settings.socket)
        .with_context(|| format!("binding {}", settings.socket.display()))?;
    let cni = CniService::new(node.clone(), settings.wait_timeout);
    let metrics_for_cni = node.metrics.clone();
    let cni_task = tokio::spawn({
        let shutdown = stop.clone().cancelled_owned();
        async move {
            tonic::transport::Server::builder()
                .add_service(CniBackendServer::with_interceptor(
                    cni,
                    crate::cni_server::only_root(metrics_for_cni),
                ))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await
        }
    });
    let exempt: Vec<String> = settings
        .startup
        .exempt
        .iter()
        .map(|p| p.to_string())
        .collect();
    info!(socket = %settings.socket.display(), startup = ?settings.startup.policy,
          exempt = ?exempt, "serving CNI");

    let registry = metrics.registry(published, scrape_maps);
    let http_task = tokio::spawn({
        let shutdown = stop.clone().cancelled_owned();
        let metrics = metrics.clone();
        let addr = settings.metrics_address;
        async move { metrics::serve(addr, registry, &metrics, shutdown).await }
    });

    let link_task = settings.operator.clone().map(|link| {
        let (status_tx, mut status_rx) = watch::channel(operator_link::LinkStatus::default());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            while status_rx.changed().await.is_ok() {
                let up = status_rx.borrow().connected;
                metrics.set_operator_connected(up);
            }
        });
        tokio::spawn(operator_link::run(
            link,
            node.clone(),
            status_tx,
            stop.clone(),
        ))
    });
    if link_task.is_none() {
        warn!("no operator configured: pods get the startup policy or the last applied rules");
    }

    // DELs queued by kubesg-cni while this agent hung (it applied those of its downtime at start),
    // and the datapath clock's alignment.
    let pending_task = tokio::spawn({
        let node = node.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        async move {
            let mut tick = tokio::time::interval(PENDING_DELETES_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = node.with(|e| e.apply_pending_deletes()).await {
                    warn!(error = %e, "applying queued CNI DELs");
                }
                // The datapath's tick clock against CLOCK_MONOTONIC, which the sweep and
                // `ct list` read: measured, exported, calibrated again if out of its bound.
                match node.with(|e| Ok(e.datapath_mut().check_clock()?)).await {
                    Ok(check) => metrics.clock_checked(&check),
                    Err(e) => warn!(error = %e, "checking the datapath clock"),
                }
            }
        }
    });

    let flow_task = events.filter(|_| settings.flow_logs).map(|mut ring| {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || loop {
            for d in events::drain(&mut ring) {
                info!(target: "kubesg::flow", "{}", d.flow_log_line());
            }
            if stop.is_cancelled() {
                return;
            }
            events::wait(&ring, Duration::from_millis(500));
        })
    });

    metrics.set_ready();
    info!(version = env!("CARGO_PKG_VERSION"), "kubesg-agent ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping; the datapath keeps enforcing"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping; the datapath keeps enforcing"),
        r = cni_task => warn!(result = ?r, "the CNI server stopped"),
    }
    stop.cancel();
    if let Some(t) = link_task {
        let _ = t.await;
    }
    let _ = http_task.await;
    let _ = pending_task.await;
    if let Some(t) = flow_task {
        let _ = t.await;
    }
    drop(sweeper);
    let _ = std::fs::remove_file(&settings.socket);
    info!("stopped");
    Ok(())
}
