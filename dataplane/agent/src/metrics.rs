//! Prometheus metrics and the health endpoints of the agent, served over HTTP: `/metrics`,
//! `/healthz` (the process answers) and `/readyz` (the datapath is loaded and the CNI socket
//! serves; the operator link's state is reported but not required, as the agent enforces the last
//! rules it applied while the operator is away).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        TypedMetric,
    },
    registry::Registry,
};
use tracing::info;

use kubesg_common::event::Counters;

use crate::{datapath::ClockCheck, enforcer::PublishedEndpoints, maps::Maps};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    result: &'static str,
}

/// The agent's own metrics (the datapath's counters are read at scrape time).
#[derive(Clone, Default)]
pub struct Metrics {
    cni_requests: Family<CniLabels, Counter>,
    updates: Family<UpdateLabels, Counter>,
    applied_version: Gauge,
    operator_connected: Gauge,
    clock_hz: Gauge,
    clock_lag_seconds: Gauge<f64, AtomicU64>,
    clock_recalibrations: Counter,
    ready: Arc<AtomicBool>,
}

impl Metrics {
    /// Counts a CNI request by operation and outcome.
    pub fn cni_request(&self, op: &'static str, ok: bool) {
        self.cni_requests
            .get_or_create(&CniLabels {
                op,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Counts an operator update, applied or NACKed, and records the applied version.
    pub fn update(&self, applied: bool, version: u64) {
        self.updates
            .get_or_create(&UpdateLabels {
                result: if applied { "applied" } else { "nacked" },
            })
            .inc();
        if applied {
            self.set_applied_version(version);
        }
    }

    /// Records the applied version (at start: the one restored from the state directory).
    pub fn set_applied_version(&self, version: u64) {
        self.applied_version.set(version as i64);
    }

    /// Records whether the operator link is up.
    pub fn set_operator_connected(&self, up: bool) {
        self.operator_connected.set(up as i64);
    }

    /// Records a check of the datapath's clock against CLOCK_MONOTONIC: a node whose lag leaves
    /// 0..one tick, or whose rate is 0 (the helper clock), shifts conntrack timeouts or pays a
    /// helper call per packet, and an alert can say so.
    pub fn clock_checked(&self, check: &ClockCheck) {
        self.clock_hz.set(check.hz as i64);
        self.clock_lag_seconds.set(check.lag_ns as f64 / 1e9);
        if check.recalibrated {
            self.clock_recalibrations.inc();
        }
    }

    /// Marks the agent ready (datapath loaded, CNI socket serving).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// A registry with these metrics and the datapath's counters of `endpoints`, read through
    /// `maps` (handles of the collector's own: a scrape never takes the enforcer's lock).
    pub fn registry(&self, endpoints: PublishedEndpoints, maps: Maps) -> Registry {
        let mut r = Registry::with_prefix("kubesg_agent");
        r.register(
            "cni_requests",
            "CNI requests served, by operation and result",
            self.cni_requests.clone(),
        );
        r.register(
            "policy_updates",
            "Operator updates, applied or refused (NACK)",
            self.updates.clone(),
        );
        r.register(
            "applied_version",
            "The last operator version applied",
            self.applied_version.clone(),
        );
        r.register(
            "operator_connected",
            "1 while the stream to the operator is up",
            self.operator_connected.clone(),
        );
        r.register(
            "datapath_clock_hz",
            "The kernel tick rate the datapath's clock counts (jiffies); 0 when calibration failed and it reads CLOCK_MONOTONIC_COARSE with a helper call per packet",
            self.clock_hz.clone(),
        );
        r.register(
            "datapath_clock_lag_seconds",
            "How far the datapath's clock was behind CLOCK_MONOTONIC at the last check (never negative, under one tick normally)",
            self.clock_lag_seconds.clone(),
        );
        r.register(
            "datapath_clock_recalibrations",
            "Times a clock check found the datapath's clock out of its bound and calibrated it again",
            self.clock_recalibrations.clone(),
        );
        r.register_collector(Box::new(DatapathCollector { endpoints, maps }));
        r
    }
}

/// Reads the per-endpoint counters of the datapath on each scrape, from the endpoints the
/// enforcer published and through maps of its own, so that a scrape (or a flood of them: the
/// port is reachable from pods) never waits for, or holds up, CNI calls and policy updates.
struct DatapathCollector {
    endpoints: PublishedEndpoints,
    maps: Maps,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathCollector").finish_non_exhaustive()
    }
}

impl DatapathCollector {
    /// The counters and held conntrack entries of the endpoint on `ifindex`, `None` when the
    /// datapath no longer has it (deleted since the list was published).
    fn read(&self, ifindex: u32) -> Option<([Counters; 2], Option<i64>)> {
        let ep = self.maps.endpoints.get(&ifindex, 0).ok()?;
        let counters = crate::counters::read(&self.maps, ep.counter_slot).ok()?;
        Some((counters, self.maps.ct_counts.get(ep.counter_slot)))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    namespace: String,
    pod: String,
    direction: &'static str,
    verdict: &'static str,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let records = self
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let endpoints = records.len() as i64;
        let mut samples = Vec::new();
        let mut full = Vec::new();
        let mut held = Vec::new();
        for rec in &records {
            let Some((counters, entries)) = self.read(rec.host_ifindex) else {
                continue;
            };
            let pod = PodLabels {
                namespace: rec.pod.namespace.clone(),
                pod: rec.pod.name.clone(),
            };
            if let Some(n) = entries {
                held.push((pod.clone(), n));
            }
            full.push((pod, counters[0].conntrack_full + counters[1].conntrack_full));
            for (dir, c) in ["egress", "ingress"].into_iter().zip(counters) {
                for (verdict, n) in [
                    ("accepted", c.accepted),
                    ("dropped_policy", c.dropped_policy),
                    ("dropped_invalid", c.dropped_invalid),
                    ("dropped_spoofed", c.dropped_spoofed),
                ] {
                    samples.push((
                        PacketLabels {
                            namespace: rec.pod.namespace.clone(),
                            pod: rec.pod.name.clone(),
                            direction: dir,
                            verdict,
                        },
                        n,
                    ));
                }
            }
        }
        let gauge = ConstGauge::new(endpoints);
        gauge.encode(encoder.encode_descriptor(
            "endpoints",
            "Pod interfaces this agent enforces",
            None,
            gauge.metric_type(),
        )?)?;
        encode_samples(
            &mut encoder,
            "datapath_packets",
            "Packets by pod, direction (of the pod) and verdict",
            samples.into_iter().map(|(l, n)| (l, ConstCounter::new(n))),
        )?;
        encode_samples(
            &mut encoder,
            "conntrack_full",
            "NEW connections the conntrack table had no room for (the pod at its entry limit, or the node's table full): dropped for members, passed untracked otherwise",
            full.into_iter().map(|(l, n)| (l, ConstCounter::new(n))),
        )?;
        encode_samples(
            &mut encoder,
            "conntrack_entries",
            "Conntrack entries the pod holds (its limit is the agent's --conntrack-endpoint-limit)",
            held.into_iter().map(|(l, n)| (l, ConstGauge::new(n))),
        )?;
        Ok(())
    }
}

/// One metric family read from the datapath at scrape time: its descriptor, then a sample per
/// label set (the collector builds them fresh on every scrape, so they are constant metrics).
fn encode_samples<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Scrapes encoded at once; more are answered 503 at once. Each one reads every endpoint's
/// counters on a blocking thread: a flood of them must not take the blocking pool that CNI
/// calls and policy updates run on.
const CONCURRENT_SCRAPES: usize = 2;

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    scrapes: Arc<tokio::sync::Semaphore>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    metrics: &Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = HttpState {
        registry: Arc::new(registry),
        ready: metrics.ready.clone(),
        scrapes: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SCRAPES)),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "serving metrics and health");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_text(State(s): State<HttpState>) -> (StatusCode, String) {
    let Ok(permit) = s.scrapes.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{CONCURRENT_SCRAPES} scrapes are being served; try again\n"),
        );
    };
    let registry = s.registry.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).map(|()| out)
    })
    .await;
    match encoded {
        Ok(Ok(text)) => (StatusCode::OK, text),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding failed\n".into(),
        ),
    }
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> HttpState {
        let mut registry = Registry::with_prefix("kubesg_agent");
        registry.register("operator_connected", "up", Gauge::<i64>::default());
        HttpState {
            registry: Arc::new(registry),
            ready: Arc::default(),
            scrapes: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SCRAPES)),
        }
    }

    #[tokio::test]
    async fn scrapes_beyond_the_limit_are_answered_503_until_one_ends() {
        let s = state();
        let busy: Vec<_> = (0..CONCURRENT_SCRAPES)
            .map(|_| s.scrapes.clone().try_acquire_owned().expect("a permit"))
            .collect();
        let (code, body) = metrics_text(State(s.clone())).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("try again"), "{body}");
        drop(busy);
        let (code, body) = metrics_text(State(s.clone())).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        assert!(body.contains("kubesg_agent_operator_connected 0"), "{body}");
        assert_eq!(
            s.scrapes.available_permits(),
            CONCURRENT_SCRAPES,
            "the scrape gave its permit back"
        );
    }
}
