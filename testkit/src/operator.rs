//! A test server that plays the operator's side of `PolicyDistribution.Sync` over real mTLS: it
//! speaks the real protocol (the real operator serves the same generated service), records every
//! Hello, lets the test push `PolicyUpdate`s to the connected agent and collects the acks. It can
//! be stopped and restarted on the same port, for reconnect tests.
//!
//! The server-side mTLS setup is the real operator's ([`server_tls_config`], re-exported from
//! `kubesg_operator::tls`): serve only clients whose certificate chains to the agents' CA.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use kubesg_proto::v1alpha1 as pb;
use pb::{
    agent_message::Kind,
    policy_distribution_server::{PolicyDistribution, PolicyDistributionServer},
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, Mutex as AsyncMutex},
    task::JoinHandle,
};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tokio_util::sync::CancellationToken;
use tonic::{
    transport::{server::TcpIncoming, Server, ServerTlsConfig},
    Request, Response, Status, Streaming,
};

pub use kubesg_operator::tls::{server_tls_config, ServerTlsFiles};

/// The agent currently connected: where pushed updates go.
type UpdateSender = mpsc::UnboundedSender<pb::PolicyUpdate>;

/// What the service and the test share; survives restarts.
struct Shared {
    hellos_tx: mpsc::UnboundedSender<pb::Hello>,
    hellos_rx: AsyncMutex<mpsc::UnboundedReceiver<pb::Hello>>,
    all_hellos: Mutex<Vec<pb::Hello>>,
    acks_tx: mpsc::UnboundedSender<pb::Ack>,
    acks_rx: AsyncMutex<mpsc::UnboundedReceiver<pb::Ack>>,
    agent: Mutex<Option<UpdateSender>>,
    /// Cancelled when the current server generation stops: ends its streams and refuses new
    /// ones.
    generation: Mutex<CancellationToken>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the state from the others.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `PolicyDistribution` service of one server generation.
struct Service {
    shared: Arc<Shared>,
    generation: CancellationToken,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::PolicyUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyDistribution for Service {
    type SyncStream = UpdateStream;

    async fn sync(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<UpdateStream>, Status> {
        if self.generation.is_cancelled() {
            return Err(Status::unavailable("the test operator is stopping"));
        }
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::AgentMessage {
                kind: Some(Kind::Hello(hello)),
            }) => hello,
            other => {
                return Err(Status::invalid_argument(format!(
                    "the first message must be Hello, got {other:?}"
                )))
            }
        };

        // Pushed updates go through a forwarder that ends the response stream when this
        // generation stops (or the agent is replaced), so a graceful shutdown completes.
        let (push_tx, mut push_rx) = mpsc::unbounded_channel::<pb::PolicyUpdate>();
        let (out_tx, out_rx) = mpsc::channel(16);
        let generation = self.generation.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = generation.cancelled() => break,
                    update = push_rx.recv() => match update {
                        Some(update) => {
                            if out_tx.send(Ok(update)).await.is_err() {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        });
        let shared = Arc::clone(&self.shared);
        let generation = self.generation.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = generation.cancelled() => break,
                    message = inbound.message() => message,
                };
                match message {
                    Ok(Some(pb::AgentMessage {
                        kind: Some(Kind::Ack(ack)),
                    })) => {
                        let _ = shared.acks_tx.send(ack);
                    }
                    // A second Hello or an empty message: the real operator would end the
                    // stream; the tests see it as a missing ack.
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        });

        // Register the agent before announcing its Hello: once a test has seen the Hello, a
        // push reaches this stream.
        *lock(&self.shared.agent) = Some(push_tx);
        lock(&self.shared.all_hellos).push(hello.clone());
        let _ = self.shared.hellos_tx.send(hello);
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// A running server generation.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// The test operator. Dropping it stops the server.
pub struct TestOperator {
    addr: SocketAddr,
    tls: ServerTlsConfig,
    shared: Arc<Shared>,
    running: Option<Running>,
}

/// `push` found no connected agent.
#[derive(Debug, thiserror::Error)]
#[error("no agent is connected to the test operator")]
pub struct NotConnected;

impl TestOperator {
    /// Starts serving on 127.0.0.1 (a free port) with this TLS configuration (see
    /// [`server_tls_config`]).
    pub async fn start(tls: ServerTlsConfig) -> io::Result<TestOperator> {
        let (hellos_tx, hellos_rx) = mpsc::unbounded_channel();
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            hellos_tx,
            hellos_rx: AsyncMutex::new(hellos_rx),
            all_hellos: Mutex::new(Vec::new()),
            acks_tx,
            acks_rx: AsyncMutex::new(acks_rx),
            agent: Mutex::new(None),
            generation: Mutex::new(CancellationToken::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut operator = TestOperator {
            addr,
            tls,
            shared,
            running: None,
        };
        operator.serve(listener)?;
        Ok(operator)
    }

    fn serve(&mut self, listener: TcpListener) -> io::Result<()> {
        let generation = CancellationToken::new();
        *lock(&self.shared.generation) = generation.clone();
        let service = Service {
            shared: Arc::clone(&self.shared),
            generation: generation.clone(),
        };
        let mut server = Server::builder()
            .tls_config(self.tls.clone())
            .map_err(io::Error::other)?;
        let router = server.add_service(PolicyDistributionServer::new(service));
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let incoming = TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        });
        self.running = Some(Running { stop, task });
        Ok(())
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address for the agent's settings: `https://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The next Hello not yet taken (in arrival order, across restarts), or `None` if none
    /// arrives within `timeout`.
    pub async fn next_hello(&self, timeout: Duration) -> Option<pb::Hello> {
        let mut hellos = self.shared.hellos_rx.lock().await;
        tokio::time::timeout(timeout, hellos.recv())
            .await
            .ok()
            .flatten()
    }

    /// Every Hello received so far, taken or not.
    pub fn hellos(&self) -> Vec<pb::Hello> {
        lock(&self.shared.all_hellos).clone()
    }

    /// Sends an update on the stream of the agent that connected last.
    pub fn push(&self, update: pb::PolicyUpdate) -> Result<(), NotConnected> {
        match lock(&self.shared.agent).as_ref() {
            Some(agent) => agent.send(update).map_err(|_| NotConnected),
            None => Err(NotConnected),
        }
    }

    /// The next ack not yet taken (in arrival order), or `None` if none arrives within
    /// `timeout`.
    pub async fn next_ack(&self, timeout: Duration) -> Option<pb::Ack> {
        let mut acks = self.shared.acks_rx.lock().await;
        tokio::time::timeout(timeout, acks.recv())
            .await
            .ok()
            .flatten()
    }

    /// Stops serving: ends the agent's stream (the agent sees the operator go away), closes the
    /// listener and waits for the connections to close.
    pub async fn stop(&mut self) {
        lock(&self.shared.generation).cancel();
        lock(&self.shared.agent).take();
        if let Some(running) = self.running.take() {
            running.stop.cancel();
            let mut task = running.task;
            // Graceful shutdown waits for the connections to close, which they do once their
            // streams ended; bound it anyway so a stuck client cannot hang the test.
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    /// Serves again on the same address after [`stop`](Self::stop), with the recorded Hellos
    /// and acks kept.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener)
    }
}

impl Drop for TestOperator {
    fn drop(&mut self) {
        lock(&self.shared.generation).cancel();
        lock(&self.shared.agent).take();
        if let Some(running) = self.running.take() {
            running.stop.cancel();
            running.task.abort();
        }
    }
}
