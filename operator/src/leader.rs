//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator replicas can run:
//! only the leader serves agents and writes statuses; the other stays compiled and ready to take
//! over.
//!
//! The algorithm is client-go's (`tools/leaderelection`), with its default timings (15 s lease,
//! renew every 2 s, step down when no renewal succeeded for 10 s):
//!
//! - Every write is a create or a replace carrying the `resourceVersion` that was read, so two
//!   candidates racing for the same lease cannot both win: the API server accepts one write and
//!   answers the other `409 Conflict`.
//! - A lease held by someone else is taken over only once its record has not changed for its
//!   `leaseDurationSeconds`, as measured on this replica's own monotonic clock from when it saw
//!   the record change (not by comparing `renewTime` with the local wall clock, which would
//!   trust that the two machines' clocks agree).
//! - The holder renews from the object it wrote last (a replace without a read); a conflict
//!   means someone else wrote, and the next step reads the lease again.
//! - The leader steps down as soon as it reads another holder, or when it could not renew for
//!   the renew deadline, which is shorter than the lease: it stops serving before anyone else
//!   may take over.
//! - On shutdown the leader releases the lease (no holder, a one-second duration), so the next
//!   replica takes over at once instead of waiting for the lease to expire.
//!
//! `kube-lease-manager` (0.13, builds with kube 5) was considered: its takeover of an expired
//! lease is an unconditional patch that clears whatever holder the lease has at that moment
//! (no `resourceVersion` precondition), so a candidate can wipe a lease another one has just
//! acquired and both lead until the next renewal.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{Api, PostParams},
    Client,
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The Lease's name.
pub const LEASE_NAME: &str = "kubesg-operator";

/// How the election runs; [`LeaseSettings::new`] has client-go's default timings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// The Lease's namespace (the operator's own).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
    /// How often the leader renews and the others retry.
    pub retry_period: Duration,
    /// How long the leader may fail to renew before stepping down; shorter than `duration`.
    pub renew_deadline: Duration,
}

impl LeaseSettings {
    /// Lease [`LEASE_NAME`] in `namespace` for `identity`: 15 s lease, 2 s retry, 10 s renew
    /// deadline.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseSettings {
            namespace: namespace.into(),
            name: LEASE_NAME.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// This replica's identity: the pod name (`POD_NAME`, from the downward API), else the host
/// name, else the process id.
pub fn default_identity() -> String {
    if let Some(name) = std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()) {
        return name;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("kubesg-operator-{}", std::process::id()))
}

/// The last lease record seen, and when it last changed (on the monotonic clock).
#[derive(Clone, Debug)]
struct Observed {
    lease: Lease,
    changed_at: Instant,
}

/// One candidate's view of the election.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observed>,
}

fn spec(lease: &Lease) -> LeaseSpec {
    lease.spec.clone().unwrap_or_default()
}

fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

impl Elector {
    /// A candidate on `client`.
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Whether the last record seen names this replica.
    pub fn holds(&self) -> bool {
        self.observed
            .as_ref()
            .is_some_and(|o| holder(&o.lease) == Some(self.settings.identity.as_str()))
    }

    /// Whether the last record seen names another holder.
    pub fn held_by_other(&self) -> bool {
        self.observed
            .as_ref()
            .is_some_and(|o| holder(&o.lease).is_some_and(|h| h != self.settings.identity.as_str()))
    }

    fn observe(&mut self, lease: Lease, now: Instant) {
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.lease.spec != lease.spec);
        let changed_at = match &self.observed {
            Some(o) if !changed => o.changed_at,
            _ => now,
        };
        self.observed = Some(Observed { lease, changed_at });
    }

    /// Whether the observed record has gone unchanged for its lease duration.
    fn expired(&self, now: Instant) -> bool {
        self.observed.as_ref().is_none_or(|o| {
            let seconds = o
                .lease
                .spec
                .as_ref()
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.settings.duration);
            now >= o.changed_at + seconds
        })
    }

    /// One election step: creates the lease when absent, renews it when held, takes it over
    /// when free or expired. Returns whether this replica holds the lease now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Instant::now();
        let wall = MicroTime(Timestamp::now());
        let me = self.settings.identity.clone();
        let params = PostParams::default();
        if self.holds() {
            if let Some(observed) = &self.observed {
                let mut lease = observed.lease.clone();
                let s = lease.spec.get_or_insert_with(Default::default);
                s.renew_time = Some(wall.clone());
                s.lease_duration_seconds = Some(self.duration_seconds());
                match self.api.replace(&self.settings.name, &params, &lease).await {
                    Ok(written) => {
                        self.observe(written, now);
                        return Ok(true);
                    }
                    Err(e) => debug!(error = %e, "renewing the lease failed; reading it"),
                }
            }
        }
        let Some(current) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(wall.clone()),
                    renew_time: Some(wall),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&params, &lease).await {
                Ok(created) => {
                    self.observe(created, now);
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        self.observe(current.clone(), now);
        let old = spec(&current);
        let mine = holder(&current) == Some(me.as_str());
        if holder(&current).is_some() && !mine && !self.expired(now) {
            return Ok(false);
        }
        let mut lease = current;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: if mine {
                old.acquire_time.clone()
            } else {
                Some(wall.clone())
            },
            renew_time: Some(wall),
            lease_transitions: Some(old.lease_transitions.unwrap_or(0) + if mine { 0 } else { 1 }),
            ..old
        });
        match self.api.replace(&self.settings.name, &params, &lease).await {
            Ok(written) => {
                self.observe(written, now);
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if this replica holds it: no holder and a one-second duration, so
    /// another replica takes over at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        if !self.holds() {
            return Ok(());
        }
        let Some(observed) = &self.observed else {
            return Ok(());
        };
        let mut lease = observed.lease.clone();
        let old = spec(&lease);
        let wall = MicroTime(Timestamp::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(wall.clone()),
            renew_time: Some(wall),
            ..old
        });
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(written, Instant::now());
                info!(lease = %self.settings.name, "released the lease");
                Ok(())
            }
            // Someone else wrote meanwhile: it is not ours any more.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Runs the election until `stop`: `leading` says whether this replica leads. Returns the
/// elector, so the caller can [`Elector::release`] the lease once it stopped leading work.
pub async fn run(
    mut elector: Elector,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
) -> Elector {
    let mut last_renewal: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let was_leading = *leading.borrow();
        // A step may not outlast the leader's renew deadline (a hung request must not keep it
        // leading past the point where others may take over); a candidate's step gets half the
        // deadline, as the request timeout client-go's users set.
        let budget = match last_renewal {
            Some(t) if was_leading => {
                (t + elector.settings.renew_deadline).saturating_duration_since(started)
            }
            _ => elector.settings.renew_deadline / 2,
        };
        let held = match tokio::time::timeout(budget, elector.try_acquire_or_renew()).await {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                warn!(error = %e, "leader election: the lease could not be read or written");
                false
            }
            Err(_) => {
                warn!(timeout = ?budget, "leader election: the API server did not answer in time");
                false
            }
        };
        if held {
            last_renewal = Some(started);
            if !was_leading {
                info!(
                    identity = %elector.settings.identity,
                    lease = %elector.settings.name,
                    "acquired the lease: leading"
                );
                leading.send_replace(true);
            }
        } else if was_leading {
            let deadline_passed = last_renewal.is_none_or(|t| {
                Instant::now().duration_since(t) >= elector.settings.renew_deadline
            });
            if elector.held_by_other() || deadline_passed {
                warn!(
                    identity = %elector.settings.identity,
                    "lost the lease: no longer leading"
                );
                leading.send_replace(false);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return elector,
            _ = tokio::time::sleep(elector.settings.retry_period) => {}
        }
    }
}
