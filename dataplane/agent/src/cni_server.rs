//! The agent's side of the CNI contract: `CniBackend` served on a unix socket only root can
//! open. Each call runs the enforcer on a blocking thread; an ADD under the `wait` startup policy
//! waits for the pod's rules before it returns.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use kubesg_proto::v1alpha1::{self as pb, cni_backend_server::CniBackend};
use tokio::net::UnixListener;
use tonic::{transport::server::UdsConnectInfo, Request, Response, Status};
use tracing::{info, warn};

use crate::{
    convert,
    enforcer::{Enforcement, EnforcerError, StartupPolicy},
    node::Node,
};

/// The agent's socket (the brief fixes the path).
pub const DEFAULT_SOCKET: &str = "/var/run/kubesg/agent.sock";

/// `CniBackend` over the node's enforcement.
#[derive(Clone)]
pub struct CniService {
    node: Arc<Node>,
    wait_timeout: Duration,
}

impl CniService {
    /// A service over `node`; `wait_timeout` bounds how long an ADD waits for rules under the
    /// `wait` startup policy.
    pub fn new(node: Arc<Node>, wait_timeout: Duration) -> Self {
        CniService { node, wait_timeout }
    }

    /// Binds the unix socket at `path` (replacing a stale one), readable and writable by root
    /// only, inside a directory only root can enter.
    pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    }
}

fn status_of(e: EnforcerError) -> Status {
    match e {
        EnforcerError::Invalid(_) => Status::invalid_argument(e.to_string()),
        EnforcerError::NoInterface { .. } | EnforcerError::InterfaceOwned { .. } => {
            Status::failed_precondition(e.to_string())
        }
        _ => Status::internal(e.to_string()),
    }
}

/// The attachment a CHECK or DEL names, checked as an ADD's is: its names become file names.
fn endpoint_key(k: Option<&pb::EndpointKey>) -> Result<crate::endpoints::EndpointKey, Status> {
    let key = k
        .map(convert::endpoint_key)
        .ok_or_else(|| Status::invalid_argument("missing endpoint key"))?;
    key.validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(key)
}

/// Lets only root call: the socket's mode already keeps others out, but a process that reaches
/// it anyway (a pod given the host's runtime directory, a user with the directory's permissions
/// loosened) must not register or delete endpoints. The kernel's record of the caller
/// (`SO_PEERCRED`, taken when it connected) decides; a call whose caller is unknown is refused
/// too. Refusals are logged and counted (`cni_requests{op="refused"}`).
pub fn only_root(
    metrics: crate::metrics::Metrics,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        match cred {
            Some(cred) if cred.uid() == 0 => Ok(request),
            other => {
                metrics.cni_request("refused", false);
                let (uid, pid) = (other.map(|c| c.uid()), other.and_then(|c| c.pid()));
                warn!(uid = ?uid, pid = ?pid, "refusing a CNI call from a process that is not root");
                Err(Status::permission_denied(match uid {
                    Some(uid) => format!(
                        "only root may use the kubesg agent's CNI socket (the caller runs as uid {uid})"
                    ),
                    None => "only root may use the kubesg agent's CNI socket (the caller's \
                             credentials are unknown)"
                        .to_string(),
                }))
            }
        }
    }
}

#[tonic::async_trait]
impl CniBackend for CniService {
    async fn add_endpoint(
        &self,
        request: Request<pb::AddEndpointRequest>,
    ) -> Result<Response<pb::AddEndpointResponse>, Status> {
        let caller_timeout = grpc_timeout(request.metadata());
        let endpoint = request
            .into_inner()
            .endpoint
            .ok_or_else(|| Status::invalid_argument("missing endpoint"))?;
        let rec = convert::endpoint(&endpoint).map_err(Status::invalid_argument)?;
        let key = rec.key.clone();
        let pod = rec.pod.clone();
        let registered = rec.clone();
        let mut versions = self.node.versions();
        let state = self
            .node
            .with(move |e| e.add_endpoint(rec))
            .await
            .map_err(status_of);
        self.node.metrics.cni_request("add", state.is_ok());
        let mut state = state?;
        if state == Enforcement::Pending && self.node.startup().for_pod(&pod) == StartupPolicy::Wait
        {
            // Answer before the caller gives up (tonic cancels this call at the deadline the
            // caller sent): a failed ADD must not leave its endpoint behind, and only an answer
            // lets this call undo it in order. Any other cancellation is undone by the guard.
            let wait = match caller_timeout {
                Some(t) => self.wait_timeout.min(t - t / 10),
                None => self.wait_timeout,
            };
            let mut undo = UndoPendingAdd {
                node: Some(self.node.clone()),
                rec: registered,
            };
            info!(endpoint = %key, pod = %pod, timeout = ?wait,
                  "waiting for the pod's rules before the ADD returns");
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let k = key.clone();
                state = self
                    .node
                    .with(move |e| Ok(e.enforcement(&k)))
                    .await
                    .map_err(status_of)?
                    .unwrap_or(Enforcement::Pending);
                if state != Enforcement::Pending {
                    break;
                }
                match tokio::time::timeout_at(deadline, versions.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => {
                        warn!(endpoint = %key, pod = %pod, "the pod's rules did not arrive in time; refusing the ADD");
                        undo.node = None;
                        let k = key.clone();
                        let _ = self.node.with(move |e| e.delete_endpoint(&k)).await;
                        return Err(Status::unavailable(format!(
                            "the rules of pod {pod} did not arrive within {wait:?} (startup \
                             policy 'wait'); try again later"
                        )));
                    }
                }
            }
            undo.node = None;
        }
        Ok(Response::new(match state {
            Enforcement::Programmed(policy) => pb::AddEndpointResponse {
                state: pb::EnforcementState::Programmed as i32,
                policy_id: policy.unwrap_or_default(),
            },
            Enforcement::Pending => pb::AddEndpointResponse {
                state: pb::EnforcementState::Pending as i32,
                policy_id: String::new(),
            },
        }))
    }

    async fn check_endpoint(
        &self,
        request: Request<pb::EndpointKey>,
    ) -> Result<Response<pb::CheckEndpointResponse>, Status> {
        let key = endpoint_key(Some(request.get_ref()))?;
        let (known, problem) = self
            .node
            .with(move |e| {
                Ok((
                    e.endpoint(&key).is_some(),
                    e.check_endpoint(&key).err().unwrap_or_default(),
                ))
            })
            .await
            .map_err(status_of)?;
        self.node.metrics.cni_request("check", problem.is_empty());
        Ok(Response::new(pb::CheckEndpointResponse {
            known,
            attached: problem.is_empty(),
            problem,
        }))
    }

    async fn delete_endpoint(
        &self,
        request: Request<pb::EndpointKey>,
    ) -> Result<Response<pb::DeleteEndpointResponse>, Status> {
        let key = endpoint_key(Some(request.get_ref()))?;
        let r = self
            .node
            .with(move |e| e.delete_endpoint(&key))
            .await
            .map_err(status_of);
        self.node.metrics.cni_request("delete", r.is_ok());
        r?;
        Ok(Response::new(pb::DeleteEndpointResponse {}))
    }

    async fn list_endpoints(
        &self,
        _request: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let endpoints = self
            .node
            .with(|e| Ok(e.endpoints().map(convert::endpoint_to_pb).collect()))
            .await
            .map_err(status_of)?;
        self.node.metrics.cni_request("list", true);
        Ok(Response::new(pb::ListEndpointsResponse { endpoints }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        // Serving this call means the datapath is loaded and endpoints can be added: without
        // the operator, pods get the startup policy, then the rules once it is back.
        self.node.metrics.cni_request("status", true);
        Ok(Response::new(pb::StatusResponse {
            ready: true,
            message: String::new(),
        }))
    }
}

/// Undoes the registration of an ADD that waits for its pod's rules if the call is dropped
/// while it waits (the caller went away): the runtime saw the ADD fail and will retry it, and
/// meanwhile nothing should enforce a pod it did not start. Only the registration this ADD made,
/// still pending, is removed; disarmed by taking `node`.
struct UndoPendingAdd {
    node: Option<Arc<Node>>,
    rec: crate::endpoints::EndpointRecord,
}

impl Drop for UndoPendingAdd {
    fn drop(&mut self) {
        let (Some(node), Ok(runtime)) = (self.node.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let rec = self.rec.clone();
        runtime.spawn_blocking(move || {
            let mut e = node.lock();
            let ours = e.endpoint(&rec.key) == Some(&rec)
                && e.enforcement(&rec.key) == Some(Enforcement::Pending);
            if ours {
                warn!(endpoint = %rec.key, pod = %rec.pod,
                      "the caller gave up on the ADD while it waited for the pod's rules; undoing it");
                if let Err(err) = e.delete_endpoint(&rec.key) {
                    warn!(endpoint = %rec.key, error = %err, "undoing the ADD failed");
                }
            }
        });
    }
}

/// The deadline a gRPC caller sent (`grpc-timeout`: at most 8 digits and a unit, H M S m u n).
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The socket path's default, as a path.
pub fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().expect("ASCII"));
        grpc_timeout(&metadata)
    }

    #[test]
    fn grpc_timeout_header_is_read_in_every_unit() {
        assert_eq!(timeout_of("1S"), Some(Duration::from_secs(1)));
        assert_eq!(timeout_of("2M"), Some(Duration::from_secs(120)));
        assert_eq!(timeout_of("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout_of("999999m"), Some(Duration::from_millis(999_999)));
        assert_eq!(timeout_of("5u"), Some(Duration::from_micros(5)));
        assert_eq!(timeout_of("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "10", "10x", "-1S"] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
