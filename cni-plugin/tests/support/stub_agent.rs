//! The least fake agent there is, for the two answers the real kubesg-agent never gives and the
//! plugin must still read right (another agent version may give them): `NotFound` to
//! `DeleteEndpoint` (the real agent deletes idempotently and answers OK) and `ready: false` to
//! `Status` (the real agent answers Status only once it serves, and then it is ready). Every
//! other behaviour of the plugin is tested against the real agent process (agent_calls.rs).
// Each test crate includes this file and uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;

use kubesg_proto::v1alpha1::{
    cni_backend_server::{CniBackend, CniBackendServer},
    AddEndpointRequest, AddEndpointResponse, CheckEndpointResponse, DeleteEndpointResponse,
    Endpoint, EndpointKey, ListEndpointsRequest, ListEndpointsResponse, StatusRequest,
    StatusResponse,
};
use tempfile::TempDir;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// The canned answers.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    /// What ListEndpoints lists.
    pub endpoints: Vec<Endpoint>,
    /// What Status answers.
    pub status: StatusResponse,
}

/// A stub serving on a unix socket in a temporary directory; stops when dropped. It answers
/// `NotFound` to every DeleteEndpoint and `Unimplemented` to AddEndpoint and CheckEndpoint.
pub struct StubAgent {
    /// Where it listens.
    pub socket: PathBuf,
    // Dropped first: the server stops before its socket's directory goes.
    runtime: tokio::runtime::Runtime,
    _dir: TempDir,
}

impl StubAgent {
    /// Starts serving `answers`.
    pub fn start(answers: Answers) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = runtime
            .block_on(async { UnixListener::bind(&socket) })
            .expect("binding the stub's socket");
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(CniBackendServer::new(Canned(answers)))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        StubAgent {
            socket,
            runtime,
            _dir: dir,
        }
    }
}

struct Canned(Answers);

#[tonic::async_trait]
impl CniBackend for Canned {
    async fn add_endpoint(
        &self,
        _: Request<AddEndpointRequest>,
    ) -> Result<Response<AddEndpointResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn check_endpoint(
        &self,
        _: Request<EndpointKey>,
    ) -> Result<Response<CheckEndpointResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn delete_endpoint(
        &self,
        _: Request<EndpointKey>,
    ) -> Result<Response<DeleteEndpointResponse>, Status> {
        Err(Status::not_found("no such endpoint"))
    }

    async fn list_endpoints(
        &self,
        _: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        Ok(Response::new(ListEndpointsResponse {
            endpoints: self.0.endpoints.clone(),
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.0.status.clone()))
    }
}
