//! What the push tests and the push bench share: a real agent (its operator link with the
//! agent's own acceptance logic behind it), a push server on loopback with the test PKI, plan
//! builders and waits.
#![allow(dead_code)]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use kubesg_agent::{
    convert,
    desired::DesiredState,
    operator_link::{run, Backoff, LinkSettings, LinkStatus, UpdateSink},
    tls::ClientTlsFiles,
};
use kubesg_operator::{
    model::ObjectKey,
    plan::{
        GroupGeneration, Layer, NodePlan, PeerBlock, PlannedPolicy, PlannedRule, PodPlan, PortSpec,
        RuleProtocol,
    },
    push::{NodeStatus, PushServer, PushSettings},
    tls::server_tls_config,
    wire,
};
use kubesg_proto::v1alpha1 as pb;
use kubesg_testkit::certs::TempPki;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// Bound on every wait; reached only when the behaviour is broken.
pub const WAIT: Duration = Duration::from_secs(10);

/// One update as the agent received it, and what it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub version: u64,
    pub snapshot: bool,
    pub base_version: u64,
    /// `Err(reason)`: NACKed.
    pub result: Result<(), String>,
}

/// The agent's side of the link: converts and applies updates exactly as the agent daemon
/// does (`convert::update` then `DesiredState::apply`), NACKing with their error; records
/// everything it received. Tests can make it refuse the next update or hold it for a while.
pub struct AgentSink {
    state: Mutex<DesiredState>,
    received: Mutex<Vec<Received>>,
    /// The updates as they came over the wire.
    updates: Mutex<Vec<pb::PolicyUpdate>>,
    refuse_next: Mutex<Option<String>>,
    hold_next: Mutex<Option<Duration>>,
    count: watch::Sender<usize>,
    started: watch::Sender<usize>,
    /// The pods the agent says it has endpoints for; `None`: every pod placed on it (a node
    /// where kubesg set up every pod).
    endpoints: Mutex<Option<Vec<pb::PodRef>>>,
}

impl AgentSink {
    pub fn new() -> Arc<AgentSink> {
        Arc::new(AgentSink {
            state: Mutex::new(DesiredState::default()),
            received: Mutex::new(Vec::new()),
            updates: Mutex::new(Vec::new()),
            refuse_next: Mutex::new(None),
            hold_next: Mutex::new(None),
            count: watch::Sender::new(0),
            started: watch::Sender::new(0),
            endpoints: Mutex::new(None),
        })
    }

    /// The agent's desired state now.
    pub fn state(&self) -> DesiredState {
        self.state.lock().unwrap().clone()
    }

    /// Every update received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The updates as they came over the wire, in order.
    pub fn updates(&self) -> Vec<pb::PolicyUpdate> {
        self.updates.lock().unwrap().clone()
    }

    /// NACK the next update with `reason` (whatever it holds).
    pub fn refuse_next(&self, reason: &str) {
        *self.refuse_next.lock().unwrap() = Some(reason.to_owned());
    }

    /// Report these pods' endpoints from the next answer on, as the CNI named them (a pod
    /// missing: set up without kubesg; another uid: the CNI's differs from the operator's).
    pub fn set_endpoints(&self, pods: &[(&str, &str, &str)]) {
        *self.endpoints.lock().unwrap() = Some(
            pods.iter()
                .map(|&(namespace, name, uid)| pb::PodRef {
                    namespace: namespace.into(),
                    name: name.into(),
                    uid: uid.into(),
                })
                .collect(),
        );
    }

    /// Sleep this long before applying the next update (a slow or stuck agent).
    pub fn hold_next(&self, wait: Duration) {
        *self.hold_next.lock().unwrap() = Some(wait);
    }

    /// Waits until at least `n` updates were received; returns them.
    pub async fn wait_received(&self, n: usize) -> Vec<Received> {
        let mut rx = self.count.subscribe();
        let waited = tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "the agent never received {n} updates; got {:?}",
            self.received()
        );
        self.received()
    }
}

impl AgentSink {
    /// Waits until the agent started applying at least `n` updates (it may be holding one).
    pub async fn wait_started(&self, n: usize) {
        let mut rx = self.started.subscribe();
        let waited = tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "the agent never started applying {n} updates; got {:?}",
            self.received()
        );
    }
}

impl UpdateSink for AgentSink {
    fn applied_version(&self) -> u64 {
        self.state.lock().unwrap().version
    }

    fn apply(&self, update: &pb::PolicyUpdate) -> Result<Vec<pb::PodRef>, String> {
        self.started.send_modify(|c| *c += 1);
        self.updates.lock().unwrap().push(update.clone());
        if let Some(wait) = self.hold_next.lock().unwrap().take() {
            std::thread::sleep(wait);
        }
        let result = match self.refuse_next.lock().unwrap().take() {
            Some(reason) => Err(reason),
            None => {
                let mut state = self.state.lock().unwrap();
                convert::update(update)
                    .and_then(|u| state.apply(&u))
                    .map(|next| *state = next)
                    .map_err(|e| e.to_string())
            }
        };
        self.received.lock().unwrap().push(Received {
            version: update.version,
            snapshot: update.snapshot,
            base_version: update.base_version,
            result: result.clone(),
        });
        self.count.send_modify(|c| *c += 1);
        result?;
        let endpoints = self.endpoints.lock().unwrap().clone();
        Ok(endpoints.unwrap_or_else(|| {
            self.state
                .lock()
                .unwrap()
                .pods
                .iter()
                .map(|((namespace, name), a)| pb::PodRef {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    uid: a.uid.clone(),
                })
                .collect()
        }))
    }
}

/// A running operator link, stopped on drop.
pub struct TestAgent {
    pub sink: Arc<AgentSink>,
    pub status: watch::Receiver<LinkStatus>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestAgent {
    /// Starts `node`'s link to `url` with `tls` and a short backoff, applying into `sink`.
    pub fn start(node: &str, url: &str, tls: ClientTlsFiles, sink: Arc<AgentSink>) -> TestAgent {
        TestAgent::start_with(LinkSettings::new(node, url, tls), sink)
    }

    /// Starts a link with `settings` but a short backoff, applying into `sink`.
    pub fn start_with(mut settings: LinkSettings, sink: Arc<AgentSink>) -> TestAgent {
        settings.backoff = Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(100),
        };
        let (tx, status) = watch::channel(LinkStatus::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(settings, sink.clone(), tx, stop.clone()));
        TestAgent {
            sink,
            status,
            stop,
            task: Some(task),
        }
    }

    /// Stops the link and waits for it to end (the agent goes away; its sink stays).
    pub async fn stop(mut self) -> Arc<AgentSink> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, task).await;
        }
        self.sink.clone()
    }

    /// Waits until the link status satisfies `pred`.
    pub async fn wait_status(&mut self, what: &str, pred: impl FnMut(&LinkStatus) -> bool) {
        let waited = tokio::time::timeout(WAIT, self.status.wait_for(pred))
            .await
            .map(|r| r.is_ok());
        assert!(
            matches!(waited, Ok(true)),
            "the link never showed {what}; last: {:?}",
            *self.status.borrow()
        );
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A push server serving on loopback with the test PKI; stopped on drop.
pub struct TestServer {
    pub server: PushServer,
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Serves `server` on `addr` (a free port for `127.0.0.1:0`) with the PKI's operator
    /// certificate, accepting agents of the PKI's CA.
    pub async fn start(pki: &TempPki, server: PushServer, addr: SocketAddr) -> TestServer {
        let tls = server_tls_config(&pki.operator_tls(&pki.operator)).expect("server TLS loads");
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let serving = server.clone();
        let task = tokio::spawn(async move {
            serving
                .serve(listener, tls, shutdown)
                .await
                .expect("the push server serves");
        });
        TestServer {
            server,
            addr,
            stop,
            task: Some(task),
        }
    }

    /// A new server with `settings` on a free port.
    pub async fn with_settings(pki: &TempPki, settings: PushSettings) -> TestServer {
        TestServer::start(
            pki,
            PushServer::new(settings),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
    }

    /// `https://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stops serving and waits until it has stopped.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the push server stops")
                .expect("the serving task does not panic");
        }
    }

    /// Waits until `node`'s status satisfies `pred`; returns it.
    pub async fn wait_node(
        &self,
        node: &str,
        what: &str,
        mut pred: impl FnMut(&NodeStatus) -> bool,
    ) -> NodeStatus {
        wait_node(&self.server, node, what, &mut pred).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits until `node`'s status on `server` satisfies `pred`; returns it.
pub async fn wait_node(
    server: &PushServer,
    node: &str,
    what: &str,
    pred: &mut dyn FnMut(&NodeStatus) -> bool,
) -> NodeStatus {
    let mut changes = server.subscribe();
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            changes.borrow_and_update();
            if let Some(status) = server.node_status(node).filter(|s| pred(s)) {
                return status;
            }
            if changes.changed().await.is_err() {
                panic!("the push server went away");
            }
        }
    })
    .await;
    match waited {
        Ok(status) => status,
        Err(_) => panic!(
            "node {node} never showed {what}; last: {:?}",
            server.node_status(node)
        ),
    }
}

/// The policy id of [`web_policy`] for `port`.
pub fn web_policy_id(port: u16) -> String {
    format!("web-tcp-{port}")
}

/// Ingress TCP `port` from 10.0.0.0/8 except 10.1.0.0/16 and fd00::/64, egress ICMP echo
/// anywhere, compiled from group `shop/web` at generation `generation`.
pub fn web_policy(port: u16, generation: i64) -> PlannedPolicy {
    PlannedPolicy {
        ingress: vec![PlannedRule {
            layer: Layer::SecurityGroups,
            sets: Vec::new(),
            protocol: RuleProtocol::Tcp,
            ports: vec![PortSpec::Range {
                first: port,
                last: port,
            }],
            peers: vec![
                PeerBlock {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: vec!["10.1.0.0/16".parse().unwrap()],
                },
                PeerBlock {
                    cidr: "fd00::/64".parse().unwrap(),
                    except: vec![],
                },
            ],
            origin: "shop/web ingress[0]".into(),
        }],
        egress: vec![PlannedRule {
            layer: Layer::SecurityGroups,
            sets: Vec::new(),
            protocol: RuleProtocol::Icmp,
            ports: vec![PortSpec::Icmp {
                icmp_type: 8,
                code: None,
            }],
            peers: vec![PeerBlock {
                cidr: "0.0.0.0/0".parse().unwrap(),
                except: vec![],
            }],
            origin: "shop/web egress[0]".into(),
        }],
        groups: BTreeSet::from([GroupGeneration {
            group: ObjectKey::new("shop", "web"),
            generation,
        }]),
        layers: None,
    }
}

/// A plan with the `members` pods using [`web_policy`]`(port, generation)` and one pod of no
/// group (`shop/batch`).
pub fn web_plan(members: &[&str], port: u16, generation: i64) -> NodePlan {
    let mut plan = NodePlan::default();
    let id = web_policy_id(port);
    plan.policies
        .insert(id.clone(), Arc::new(web_policy(port, generation)));
    for name in members {
        plan.pods.insert(
            ObjectKey::new("shop", *name),
            PodPlan {
                uid: format!("uid-{name}"),
                policy: Some(id.clone()),
                set_up: true,
            },
        );
    }
    plan.pods.insert(
        ObjectKey::new("shop", "batch"),
        PodPlan {
            uid: "uid-batch".into(),
            policy: None,
            set_up: true,
        },
    );
    plan
}

/// The agent state a snapshot of `plan` produces (what any sequence of updates ending in
/// `plan` must produce too), ignoring the version.
pub fn expected_state(plan: &NodePlan, recheck: bool) -> DesiredState {
    let settings = pb::DatapathSettings {
        recheck_on_policy_change: recheck,
    };
    let update = convert::update(&wire::snapshot(plan, 1, &settings)).expect("the plan converts");
    DesiredState::default()
        .apply(&update)
        .expect("a snapshot of the plan applies")
}

/// Asserts the agent's state is `plan`: the same pods (uid and policy) and the same policies.
pub fn assert_agent_has(sink: &AgentSink, plan: &NodePlan) {
    let state = sink.state();
    let pods: Vec<_> = state
        .pods
        .iter()
        .map(|((ns, name), a)| (ObjectKey::new(ns, name), a.uid.clone(), a.policy.clone()))
        .collect();
    let planned: Vec<_> = plan
        .pods
        .iter()
        .map(|(key, p)| (key.clone(), p.uid.clone(), p.policy.clone()))
        .collect();
    assert_eq!(pods, planned, "the agent's pods are the plan's");
    let expected = expected_state(plan, state.recheck_on_policy_change);
    assert_eq!(
        state.policies, expected.policies,
        "the agent's policies are the plan's"
    );
}
