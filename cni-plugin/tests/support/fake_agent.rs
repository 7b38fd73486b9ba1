//! A stand-in for kubesg-agent's `CniBackend`: serves on a unix socket in a temporary directory,
//! records what the plugin asked and answers what the test set. The real agent's end-to-end tests
//! live with the agent; this one pins what the plugin sends and how it reads each answer.
// Each test crate includes this file and uses part of it.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use kubesg_proto::v1alpha1::{
    cni_backend_server::{CniBackend, CniBackendServer},
    AddEndpointRequest, AddEndpointResponse, CheckEndpointResponse, DeleteEndpointResponse,
    Endpoint, EndpointKey, EnforcementState, ListEndpointsRequest, ListEndpointsResponse,
    StatusRequest, StatusResponse,
};
use tempfile::TempDir;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// What the fake agent knows, answers and was asked.
#[derive(Debug, Default)]
pub struct AgentState {
    /// The endpoints it knows (ListEndpoints; ADD adds, DEL removes).
    pub endpoints: Vec<Endpoint>,
    /// Every AddEndpoint request's endpoint, in order.
    pub added: Vec<Endpoint>,
    /// Every DeleteEndpoint request's key, in order.
    pub deleted: Vec<EndpointKey>,
    /// Every CheckEndpoint request's key, in order.
    pub checked: Vec<EndpointKey>,
    /// The error AddEndpoint answers with, if any.
    pub add_error: Option<(tonic::Code, String)>,
    /// Whether known endpoints have their programs attached (CheckEndpoint).
    pub attached: bool,
    /// CheckEndpoint's `problem`.
    pub problem: String,
    /// What Status answers.
    pub status: StatusResponse,
    /// How long every call waits before answering.
    pub delay: Duration,
}

/// A running fake agent; stops when dropped.
pub struct FakeAgent {
    /// Where it listens.
    pub socket: PathBuf,
    state: Arc<Mutex<AgentState>>,
    // Dropped first: the server stops before its socket's directory goes.
    runtime: tokio::runtime::Runtime,
    _dir: TempDir,
}

impl FakeAgent {
    /// Starts a fake agent that knows no endpoint and is ready.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let state = Arc::new(Mutex::new(AgentState {
            attached: true,
            status: StatusResponse {
                ready: true,
                message: String::new(),
            },
            ..AgentState::default()
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = runtime
            .block_on(async { UnixListener::bind(&socket) })
            .expect("binding the fake agent's socket");
        let service = CniBackendServer::new(Service {
            state: Arc::clone(&state),
        });
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        FakeAgent {
            socket,
            state,
            runtime,
            _dir: dir,
        }
    }

    /// Its state, to set answers before a call and read requests after.
    pub fn state(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().expect("fake agent state")
    }

    /// The socket path as a string, for configs.
    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }
}

/// An endpoint the fake agent knows.
pub fn endpoint(container_id: &str, ifname: &str) -> Endpoint {
    Endpoint {
        key: Some(EndpointKey {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        }),
        ..Endpoint::default()
    }
}

struct Service {
    state: Arc<Mutex<AgentState>>,
}

impl Service {
    /// Waits the configured delay, then locks the state.
    async fn state(&self) -> MutexGuard<'_, AgentState> {
        let delay = self.state.lock().expect("state").delay;
        tokio::time::sleep(delay).await;
        self.state.lock().expect("state")
    }
}

#[tonic::async_trait]
impl CniBackend for Service {
    async fn add_endpoint(
        &self,
        request: Request<AddEndpointRequest>,
    ) -> Result<Response<AddEndpointResponse>, Status> {
        let endpoint = request
            .into_inner()
            .endpoint
            .ok_or_else(|| Status::invalid_argument("no endpoint"))?;
        let mut state = self.state().await;
        state.added.push(endpoint.clone());
        if let Some((code, message)) = state.add_error.clone() {
            return Err(Status::new(code, message));
        }
        state.endpoints.push(endpoint);
        Ok(Response::new(AddEndpointResponse {
            state: EnforcementState::Programmed.into(),
            policy_id: "p-test".to_owned(),
        }))
    }

    async fn check_endpoint(
        &self,
        request: Request<EndpointKey>,
    ) -> Result<Response<CheckEndpointResponse>, Status> {
        let key = request.into_inner();
        let mut state = self.state().await;
        state.checked.push(key.clone());
        let known = state.endpoints.iter().any(|e| e.key.as_ref() == Some(&key));
        Ok(Response::new(CheckEndpointResponse {
            known,
            attached: known && state.attached,
            problem: state.problem.clone(),
        }))
    }

    async fn delete_endpoint(
        &self,
        request: Request<EndpointKey>,
    ) -> Result<Response<DeleteEndpointResponse>, Status> {
        let key = request.into_inner();
        let mut state = self.state().await;
        state.deleted.push(key.clone());
        let before = state.endpoints.len();
        state.endpoints.retain(|e| e.key.as_ref() != Some(&key));
        if state.endpoints.len() == before {
            return Err(Status::not_found("no such endpoint"));
        }
        Ok(Response::new(DeleteEndpointResponse {}))
    }

    async fn list_endpoints(
        &self,
        _: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let state = self.state().await;
        Ok(Response::new(ListEndpointsResponse {
            endpoints: state.endpoints.clone(),
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let state = self.state().await;
        Ok(Response::new(state.status.clone()))
    }
}
