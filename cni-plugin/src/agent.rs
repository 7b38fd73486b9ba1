//! The gRPC client of the agent's `CniBackend` (proto/kubesg/v1alpha1/cni.proto), over the
//! agent's unix socket.
//!
//! A CNI plugin is a short-lived process making one or two calls, so the client is synchronous
//! on the outside ([`AgentClient`], on a current-thread tokio runtime it owns) with the async
//! connection ([`connect`]) public for callers that already run tokio (the end-to-end tests).
//! Each call has one deadline covering connection and answer; it is also sent to the agent
//! (`grpc-timeout`), so an agent holding an ADD until the pod's rules arrive knows how long it may.

use std::{
    error::Error as _,
    future::Future,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use kubesg_proto::v1alpha1::{
    cni_backend_client::CniBackendClient, AddEndpointRequest, AddEndpointResponse,
    CheckEndpointResponse, Endpoint, EndpointKey, ListEndpointsRequest, StatusRequest,
    StatusResponse,
};
use tokio::{net::UnixStream, runtime::Runtime};
use tonic::transport::{Channel, Uri};

/// What went wrong talking to the agent; `error.rs` maps each to a CNI code per command.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Nothing listens at the socket path: the agent is not running (or never ran) on this node.
    #[error("agent socket {} does not exist: is kubesg-agent running on this node?", .0.display())]
    SocketMissing(PathBuf),
    /// The socket exists but the connection failed (refused: the agent is restarting or died and
    /// left its socket; permission denied: the plugin does not run as root).
    #[error("cannot connect to kubesg-agent on {}: {reason}", socket.display())]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// The connection error, with its causes.
        reason: String,
    },
    /// No answer within the configured timeout.
    #[error("timeout: kubesg-agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered with an error.
    #[error("kubesg-agent answered {:?}: {}", .0.code(), .0.message())]
    Rpc(Box<tonic::Status>),
    /// The client's runtime could not be built.
    #[error("cannot start the gRPC client runtime: {0}")]
    Runtime(io::Error),
}

impl AgentError {
    /// The gRPC code, when the agent answered with an error.
    pub fn grpc_code(&self) -> Option<tonic::Code> {
        match self {
            AgentError::Rpc(status) => Some(status.code()),
            _ => None,
        }
    }
}

/// Connects to the agent's `CniBackend` on `socket`. tonic needs a URI; the connector ignores it
/// and dials the socket.
pub async fn connect(socket: &Path) -> Result<CniBackendClient<Channel>, AgentError> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://kubesg-agent.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| connect_error(socket, &e))?;
    Ok(CniBackendClient::new(channel))
}

/// Classifies a connection failure: a socket that does not exist is [`AgentError::SocketMissing`]
/// (GC treats it as "nothing to clean", DEL queues the deletion), anything else
/// [`AgentError::Unreachable`].
fn connect_error(socket: &Path, err: &tonic::transport::Error) -> AgentError {
    let mut reason = err.to_string();
    let mut not_found = false;
    let mut cause = err.source();
    while let Some(c) = cause {
        reason.push_str(": ");
        reason.push_str(&c.to_string());
        if let Some(io) = c.downcast_ref::<io::Error>() {
            not_found |= io.kind() == io::ErrorKind::NotFound;
        }
        cause = c.source();
    }
    let missing = not_found
        || std::fs::symlink_metadata(socket).is_err_and(|e| e.kind() == io::ErrorKind::NotFound);
    if missing {
        AgentError::SocketMissing(socket.to_path_buf())
    } else {
        AgentError::Unreachable {
            socket: socket.to_path_buf(),
            reason,
        }
    }
}

/// A connected, blocking client of the agent: what the plugin's commands use.
pub struct AgentClient {
    runtime: Runtime,
    client: CniBackendClient<Channel>,
    timeout: Duration,
}

impl AgentClient {
    /// Connects to the agent on `socket`; `timeout` bounds the connection and each later call.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AgentError::Runtime)?;
        let client = runtime
            .block_on(async { tokio::time::timeout(timeout, connect(socket)).await })
            .map_err(|_| AgentError::Timeout(timeout))??;
        Ok(AgentClient {
            runtime,
            client,
            timeout,
        })
    }

    /// `AddEndpoint`: registers the pod's interface; the pod is enforced when it returns.
    pub fn add_endpoint(&mut self, endpoint: Endpoint) -> Result<AddEndpointResponse, AgentError> {
        let request = self.request(AddEndpointRequest {
            endpoint: Some(endpoint),
        });
        let call = self.client.add_endpoint(request);
        block(&self.runtime, self.timeout, call)
    }

    /// `CheckEndpoint`: whether the agent knows the endpoint and its programs are attached.
    pub fn check_endpoint(
        &mut self,
        key: EndpointKey,
    ) -> Result<CheckEndpointResponse, AgentError> {
        let request = self.request(key);
        let call = self.client.check_endpoint(request);
        block(&self.runtime, self.timeout, call)
    }

    /// `DeleteEndpoint`: forgets the endpoint (the agent succeeds when it is already gone).
    pub fn delete_endpoint(&mut self, key: EndpointKey) -> Result<(), AgentError> {
        let request = self.request(key);
        let call = self.client.delete_endpoint(request);
        block(&self.runtime, self.timeout, call).map(|_| ())
    }

    /// `ListEndpoints`: every endpoint the agent knows (for GC).
    pub fn list_endpoints(&mut self) -> Result<Vec<Endpoint>, AgentError> {
        let request = self.request(ListEndpointsRequest {});
        let call = self.client.list_endpoints(request);
        block(&self.runtime, self.timeout, call).map(|r| r.endpoints)
    }

    /// `Status`: whether the agent can serve ADDs, and why not.
    pub fn status(&mut self) -> Result<StatusResponse, AgentError> {
        let request = self.request(StatusRequest {});
        let call = self.client.status(request);
        block(&self.runtime, self.timeout, call)
    }

    /// A request carrying the deadline to the agent.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }
}

/// Runs one call to completion within `timeout`. The agent gets the same deadline; when it
/// expires there first, tonic's server answers `Cancelled` ("Timeout expired"), which maps to
/// "try again later" like a local timeout.
fn block<T>(
    runtime: &Runtime,
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    match runtime.block_on(async { tokio::time::timeout(timeout, call).await }) {
        Err(_) => Err(AgentError::Timeout(timeout)),
        Ok(Err(status)) => Err(AgentError::Rpc(Box::new(status))),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn missing_socket_is_socket_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let err = AgentClient::connect(&socket, Duration::from_secs(5))
            .err()
            .expect("no agent");
        assert!(
            matches!(err, AgentError::SocketMissing(ref p) if *p == socket),
            "{err}"
        );
    }

    #[test]
    fn socket_nobody_listens_on_is_unreachable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        // Bound then closed: the file stays, connections are refused.
        drop(UnixListener::bind(&socket).expect("bind"));
        let err = AgentClient::connect(&socket, Duration::from_secs(5))
            .err()
            .expect("no agent");
        assert!(matches!(err, AgentError::Unreachable { .. }), "{err}");
    }
}
