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
use tonic::{Request, Response, Status};
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
        EnforcerError::NoInterface { .. } => Status::failed_precondition(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn endpoint_key(k: Option<&pb::EndpointKey>) -> Result<crate::endpoints::EndpointKey, Status> {
    k.map(convert::endpoint_key)
        .ok_or_else(|| Status::invalid_argument("missing endpoint key"))
}

#[tonic::async_trait]
impl CniBackend for CniService {
    async fn add_endpoint(
        &self,
        request: Request<pb::AddEndpointRequest>,
    ) -> Result<Response<pb::AddEndpointResponse>, Status> {
        let endpoint = request
            .into_inner()
            .endpoint
            .ok_or_else(|| Status::invalid_argument("missing endpoint"))?;
        let rec = convert::endpoint(&endpoint).map_err(Status::invalid_argument)?;
        let key = rec.key.clone();
        let pod = rec.pod.clone();
        let mut versions = self.node.versions();
        let state = self
            .node
            .with(move |e| e.add_endpoint(rec))
            .await
            .map_err(status_of);
        self.node.metrics.cni_request("add", state.is_ok());
        let mut state = state?;
        if state == Enforcement::Pending && self.node.startup() == StartupPolicy::Wait {
            info!(endpoint = %key, pod = %pod, timeout = ?self.wait_timeout,
                  "waiting for the pod's rules before the ADD returns");
            let deadline = tokio::time::Instant::now() + self.wait_timeout;
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
                        let k = key.clone();
                        let _ = self.node.with(move |e| e.delete_endpoint(&k)).await;
                        return Err(Status::unavailable(format!(
                            "the rules of pod {pod} did not arrive within {:?} (startup policy \
                             'wait'); try again later",
                            self.wait_timeout
                        )));
                    }
                }
            }
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

/// The socket path's default, as a path.
pub fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
