//! The daemon's shared state: the enforcer behind a lock (its calls are short map updates, run on
//! blocking threads), the version channel ADDs under the `wait` policy listen to, and the
//! metrics. The operator link applies updates through it ([`UpdateSink`]).

use std::sync::{Arc, Mutex, MutexGuard};

use kubesg_proto::v1alpha1 as pb;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::{
    convert,
    enforcer::{Enforcer, EnforcerError},
    metrics::Metrics,
    operator_link::UpdateSink,
    startup::Startup,
};

/// The node's enforcement as the daemon's tasks share it.
pub struct Node {
    enforcer: Arc<Mutex<Enforcer>>,
    versions: watch::Sender<u64>,
    startup: Startup,
    /// The agent's metrics.
    pub metrics: Metrics,
}

impl Node {
    /// Shares `enforcer`.
    pub fn new(enforcer: Enforcer, metrics: Metrics) -> Arc<Self> {
        let (versions, _) = watch::channel(enforcer.applied_version());
        let startup = enforcer.startup().clone();
        Arc::new(Node {
            enforcer: Arc::new(Mutex::new(enforcer)),
            versions,
            startup,
            metrics,
        })
    }

    /// Locks the enforcer (blocking). A panic in an earlier holder does not poison the node:
    /// each enforcer call leaves a consistent state or reports an error.
    pub fn lock(&self) -> MutexGuard<'_, Enforcer> {
        self.enforcer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the enforcer on a blocking thread.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Enforcer) -> Result<T, EnforcerError> + Send + 'static,
    ) -> Result<T, EnforcerError> {
        let enforcer = self.enforcer.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = enforcer.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| EnforcerError::State(std::io::Error::other(e.to_string())))?
    }

    /// Applied versions as they change (ADDs waiting for their rules watch it).
    pub fn versions(&self) -> watch::Receiver<u64> {
        self.versions.subscribe()
    }

    /// The startup policy, with its exemptions.
    pub fn startup(&self) -> &Startup {
        &self.startup
    }
}

impl UpdateSink for Node {
    fn applied_version(&self) -> u64 {
        self.lock().applied_version()
    }

    fn apply(&self, update: &pb::PolicyUpdate) -> Result<Vec<pb::PodRef>, String> {
        let started = std::time::Instant::now();
        let result = convert::update(update)
            .map_err(EnforcerError::from)
            .and_then(|u| {
                debug!(
                    version = update.version,
                    convert_ms = started.elapsed().as_secs_f64() * 1e3,
                    "update converted"
                );
                let mut enforcer = self.lock();
                enforcer.apply_update(&u)?;
                Ok(enforcer.endpoint_pods())
            });
        self.metrics.update(result.is_ok(), update.version);
        match result {
            Ok(pods) => {
                self.versions.send_replace(update.version);
                Ok(pods
                    .into_iter()
                    .map(|p| pb::PodRef {
                        namespace: p.namespace,
                        name: p.name,
                        uid: p.uid,
                    })
                    .collect())
            }
            Err(e) => {
                warn!(version = update.version, error = %e, "update refused (NACK)");
                Err(e.to_string())
            }
        }
    }
}
