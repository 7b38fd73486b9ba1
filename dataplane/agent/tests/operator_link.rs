//! The agent's operator link against the test operator (`kubesg_testkit::operator`), over real
//! mTLS on loopback TCP: Hello and resume, applying and acking updates, NACKs, reconnects, and
//! both sides refusing certificates they must not trust. Not privileged.
//!
//! The sink is a recording `UpdateSink`: it is the boundary of the link; the end-to-end tests
//! drive the real enforcer through it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use kubesg_agent::{
    operator_link::{run, Backoff, LinkSettings, LinkStatus, UpdateSink},
    tls::ClientTlsFiles,
};
use kubesg_proto::v1alpha1 as pb;
use kubesg_testkit::{
    certs::{TempPki, OPERATOR_SERVER_NAME},
    operator::{server_tls_config, TestOperator},
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// Bound on every wait; reached only when the behaviour is broken.
const WAIT: Duration = Duration::from_secs(10);

/// Records every update it is given; NACKs the versions it was told to refuse.
#[derive(Default)]
struct RecordingSink {
    version: AtomicU64,
    applied: Mutex<Vec<u64>>,
    refuse: Mutex<HashMap<u64, String>>,
    calls: AtomicU64,
    /// The pods the sink says it has endpoints for once it applied a version (the latest
    /// version at or below the applied one counts; none: no endpoints).
    endpoints: Mutex<BTreeMap<u64, Vec<pb::PodRef>>>,
}

impl RecordingSink {
    fn at_version(version: u64) -> Arc<Self> {
        let sink = RecordingSink::default();
        sink.version.store(version, Ordering::SeqCst);
        Arc::new(sink)
    }

    fn refuse(&self, version: u64, reason: &str) {
        self.refuse
            .lock()
            .unwrap()
            .insert(version, reason.to_owned());
    }

    fn endpoints_from(&self, version: u64, pods: &[(&str, &str)]) {
        let pods = pods
            .iter()
            .map(|&(name, uid)| pb::PodRef {
                namespace: "shop".into(),
                name: name.into(),
                uid: uid.into(),
            })
            .collect();
        self.endpoints.lock().unwrap().insert(version, pods);
    }

    fn applied(&self) -> Vec<u64> {
        self.applied.lock().unwrap().clone()
    }
}

impl UpdateSink for RecordingSink {
    fn applied_version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    fn apply(&self, update: &pb::PolicyUpdate) -> Result<Vec<pb::PodRef>, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(reason) = self.refuse.lock().unwrap().get(&update.version) {
            return Err(reason.clone());
        }
        self.applied.lock().unwrap().push(update.version);
        self.version.store(update.version, Ordering::SeqCst);
        let endpoints = self.endpoints.lock().unwrap();
        Ok(endpoints
            .range(..=update.version)
            .next_back()
            .map(|(_, pods)| pods.clone())
            .unwrap_or_default())
    }
}

/// A running link, stopped on drop.
struct Agent {
    status: watch::Receiver<LinkStatus>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Agent {
    fn start(settings: LinkSettings, sink: Arc<RecordingSink>) -> Agent {
        let (tx, status) = watch::channel(LinkStatus::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(settings, sink, tx, stop.clone()));
        Agent { status, stop, task }
    }

    /// Waits until the status satisfies `pred`; panics with the last status otherwise.
    async fn wait_for(&mut self, what: &str, pred: impl FnMut(&LinkStatus) -> bool) -> LinkStatus {
        let waited = tokio::time::timeout(WAIT, self.status.wait_for(pred))
            .await
            .map(|r| r.map(|status| status.clone()));
        match waited {
            Ok(Ok(status)) => status,
            _ => panic!(
                "link status never showed {what}; last: {:?}",
                *self.status.borrow()
            ),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// Settings with the minimal backoff, so reconnects take milliseconds.
fn settings(operator: &TestOperator, tls: ClientTlsFiles) -> LinkSettings {
    let mut settings = LinkSettings::new("node-a", operator.url(), tls);
    settings.backoff = Backoff {
        min: Duration::from_millis(10),
        max: Duration::from_millis(100),
    };
    settings
}

async fn operator(pki: &TempPki, server: &kubesg_testkit::certs::CertFiles) -> TestOperator {
    let tls = server_tls_config(&pki.operator_tls(server)).expect("server TLS files load");
    TestOperator::start(tls)
        .await
        .expect("test operator starts")
}

fn update(version: u64) -> pb::PolicyUpdate {
    pb::PolicyUpdate {
        version,
        snapshot: version == 1,
        base_version: version.saturating_sub(1),
        remove_policies: vec![format!("p{version}")],
        ..Default::default()
    }
}

async fn expect_ack(operator: &TestOperator) -> pb::Ack {
    operator.next_ack(WAIT).await.expect("an ack arrives")
}

#[tokio::test]
async fn agent_sends_hello_with_its_applied_version_then_acks_updates_in_order_with_its_endpoints_when_they_change(
) {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let sink = RecordingSink::at_version(7);
    // The pods the agent holds endpoints for: reported in the first answer, then only when
    // they change (9 has the same as 8; the order of the sink's list does not matter).
    sink.endpoints_from(8, &[("web", "u1"), ("db", "u2")]);
    sink.endpoints_from(9, &[("db", "u2"), ("web", "u1")]);
    sink.endpoints_from(10, &[("db", "u2")]);
    let mut agent = Agent::start(settings(&operator, pki.agent_tls()), sink.clone());

    let hello = operator
        .next_hello(WAIT)
        .await
        .expect("the agent says Hello");
    assert_eq!(hello.node, "node-a");
    assert_eq!(hello.applied_version, 7);
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));

    for version in [8, 9, 10] {
        operator.push(update(version)).unwrap();
    }
    let report = |pods: &[(&str, &str)]| {
        Some(pb::EndpointReport {
            pods: pods
                .iter()
                .map(|&(name, uid)| pb::PodRef {
                    namespace: "shop".into(),
                    name: name.into(),
                    uid: uid.into(),
                })
                .collect(),
        })
    };
    let reports = [
        report(&[("db", "u2"), ("web", "u1")]),
        None,
        report(&[("db", "u2")]),
    ];
    for (version, endpoints) in [8, 9, 10].into_iter().zip(reports) {
        let ack = expect_ack(&operator).await;
        assert_eq!(
            ack,
            pb::Ack {
                version,
                applied: true,
                reason: String::new(),
                endpoints,
            }
        );
    }
    assert_eq!(sink.applied(), [8, 9, 10]);
    let status = agent
        .wait_for("three updates applied", |s| s.updates_applied == 3)
        .await;
    assert!(status.connected);
    assert_eq!(status.applied_version, 10);
    assert_eq!(status.updates_rejected, 0);
    assert_eq!(status.streams_opened, 1);
}

#[tokio::test]
async fn sink_error_becomes_a_nack_with_its_reason_and_the_link_goes_on() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let sink = RecordingSink::at_version(0);
    sink.refuse(2, "delta base 1 is not the applied version 0");
    let mut agent = Agent::start(settings(&operator, pki.agent_tls()), sink.clone());
    operator
        .next_hello(WAIT)
        .await
        .expect("the agent says Hello");

    for version in [1, 2, 3] {
        operator.push(update(version)).unwrap();
    }
    assert!(expect_ack(&operator).await.applied);
    let nack = expect_ack(&operator).await;
    assert_eq!(
        nack,
        pb::Ack {
            version: 2,
            applied: false,
            reason: "delta base 1 is not the applied version 0".into(),
            endpoints: None,
        }
    );
    let after = expect_ack(&operator).await;
    assert_eq!((after.version, after.applied), (3, true));

    assert_eq!(sink.applied(), [1, 3]);
    let status = agent
        .wait_for("one NACK and two updates applied", |s| {
            s.updates_rejected == 1 && s.updates_applied == 2
        })
        .await;
    assert!(status.connected);
    assert_eq!(status.applied_version, 3);
}

#[tokio::test]
async fn agent_reconnects_after_operator_restart_and_resumes_from_its_applied_version() {
    let pki = TempPki::generate().unwrap();
    let mut operator = operator(&pki, &pki.operator).await;
    let sink = RecordingSink::at_version(0);
    let mut agent = Agent::start(settings(&operator, pki.agent_tls()), sink.clone());
    assert_eq!(operator.next_hello(WAIT).await.unwrap().applied_version, 0);
    for version in [1, 2] {
        operator.push(update(version)).unwrap();
        assert!(expect_ack(&operator).await.applied);
    }

    operator.stop().await;
    // The agent notices, keeps what it applied, and keeps trying while the operator is gone.
    let down = agent
        .wait_for("several failed attempts while the operator is down", |s| {
            !s.connected && s.failures >= 3
        })
        .await;
    assert_eq!(down.applied_version, 2);
    assert!(down.last_error.is_some());
    assert_eq!(
        sink.calls.load(Ordering::SeqCst),
        2,
        "nothing applied while down"
    );

    operator
        .restart()
        .await
        .expect("operator restarts on its port");
    let hello = operator
        .next_hello(WAIT)
        .await
        .expect("the agent reconnects by itself");
    assert_eq!(hello.node, "node-a");
    assert_eq!(
        hello.applied_version, 2,
        "the new Hello resumes from version 2"
    );

    operator.push(update(3)).unwrap();
    assert_eq!(expect_ack(&operator).await.version, 3);
    assert_eq!(sink.applied(), [1, 2, 3]);
    let status = agent
        .wait_for("a second stream", |s| s.connected && s.streams_opened == 2)
        .await;
    assert_eq!(status.applied_version, 3);
}

/// Waits for several refused attempts and checks that nothing got through.
async fn assert_agent_refuses(
    operator: &TestOperator,
    agent: &mut Agent,
    sink: &RecordingSink,
    error_text: &str,
) {
    let status = agent
        .wait_for("three failed attempts", |s| s.failures >= 3)
        .await;
    let error = status.last_error.expect("the error is in the status");
    assert!(
        error.contains(error_text),
        "expected {error_text:?} in {error:?}"
    );
    assert!(!status.connected);
    assert_eq!(status.streams_opened, 0);
    assert!(operator.hellos().is_empty(), "no Hello may reach it");
    assert_eq!(sink.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn agent_refuses_operator_certificate_signed_by_another_ca() {
    let pki = TempPki::generate().unwrap();
    // The server trusts the agent's CA, so only the agent's check can stop the link.
    let operator = operator(&pki, &pki.other_operator).await;
    let sink = RecordingSink::at_version(0);
    let mut agent = Agent::start(settings(&operator, pki.agent_tls()), sink.clone());
    assert_agent_refuses(&operator, &mut agent, &sink, "UnknownIssuer").await;
}

#[tokio::test]
async fn agent_refuses_operator_certificate_without_the_expected_name() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.misnamed_operator).await;
    let sink = RecordingSink::at_version(0);
    let mut agent = Agent::start(settings(&operator, pki.agent_tls()), sink.clone());
    assert_agent_refuses(
        &operator,
        &mut agent,
        &sink,
        &format!("not valid for name \"{OPERATOR_SERVER_NAME}\""),
    )
    .await;
}

/// Opens a Sync stream with a plain tonic client and this TLS configuration, as another agent
/// implementation would; returns the error text if the server refused it.
async fn raw_sync(
    operator: &TestOperator,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<(), String> {
    let chain = |e: &dyn std::error::Error| {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    };
    let channel = tonic::transport::Endpoint::from_shared(operator.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| chain(&e))?;
    let mut client = pb::policy_distribution_client::PolicyDistributionClient::new(channel);
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node: "intruder".into(),
            ..Default::default()
        })),
    };
    client
        .sync(tokio_stream::iter([hello]).chain(tokio_stream::pending()))
        .await
        .map_err(|e| chain(&e))?;
    Ok(())
}

fn client_tls(ca: &std::path::Path) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(kubesg_agent::tls::load_ca_bundle(ca).unwrap())
        .domain_name(OPERATOR_SERVER_NAME)
}

#[tokio::test]
async fn operator_serves_a_client_with_a_certificate_from_its_ca() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let identity = kubesg_agent::tls::load_identity(&pki.agent.cert, &pki.agent.key).unwrap();
    raw_sync(&operator, client_tls(&pki.ca).identity(identity))
        .await
        .expect("a client of the agents' CA is served");
    assert_eq!(operator.hellos()[0].node, "intruder");
}

#[tokio::test]
async fn operator_refuses_a_client_without_certificate() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let error = raw_sync(&operator, client_tls(&pki.ca))
        .await
        .expect_err("a client without certificate must be refused");
    assert!(error.contains("CertificateRequired"), "{error}");
    assert!(operator.hellos().is_empty());
}

#[tokio::test]
async fn operator_refuses_a_client_certificate_from_another_ca() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let identity =
        kubesg_agent::tls::load_identity(&pki.other_agent.cert, &pki.other_agent.key).unwrap();
    let error = raw_sync(&operator, client_tls(&pki.ca).identity(identity))
        .await
        .expect_err("a client of another CA must be refused");
    assert!(error.contains("UnknownCA"), "{error}");
    assert!(operator.hellos().is_empty());
}

#[tokio::test]
async fn agent_refused_by_the_operator_shows_why_and_keeps_retrying() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let sink = RecordingSink::at_version(0);
    let mut tls = pki.agent_tls();
    tls.cert = pki.other_agent.cert.clone();
    tls.key = pki.other_agent.key.clone();
    let mut agent = Agent::start(settings(&operator, tls), sink.clone());
    assert_agent_refuses(&operator, &mut agent, &sink, "UnknownCA").await;
}

#[tokio::test]
async fn missing_tls_file_is_named_in_the_status_and_picked_up_once_it_appears() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let sink = RecordingSink::at_version(0);
    let mut tls = pki.agent_tls();
    tls.key = pki.dir().join("not-yet-mounted-key.pem");
    let mut agent = Agent::start(settings(&operator, tls.clone()), sink.clone());

    let status = agent.wait_for("failed attempts", |s| s.failures >= 2).await;
    let error = status.last_error.unwrap();
    assert!(
        error.contains(&tls.key.display().to_string()) && error.contains("private key"),
        "{error}"
    );
    assert!(operator.hellos().is_empty());

    // The Secret gets mounted: the next attempt reads it, no restart needed.
    std::fs::copy(&pki.agent.key, &tls.key).unwrap();
    operator
        .next_hello(WAIT)
        .await
        .expect("the agent connects once the key is there");
    agent.wait_for("connected", |s| s.connected).await;
}

#[tokio::test]
async fn rotated_ca_bundle_is_picked_up_on_reconnect_without_restart() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let sink = RecordingSink::at_version(0);
    let mut tls = pki.agent_tls();
    tls.ca = pki.dir().join("mounted-ca.pem");
    std::fs::copy(&pki.other_ca, &tls.ca).unwrap();
    let mut agent = Agent::start(settings(&operator, tls.clone()), sink.clone());
    let status = agent
        .wait_for("the operator refused as unknown", |s| s.failures >= 1)
        .await;
    assert!(status.last_error.unwrap().contains("UnknownIssuer"));

    // Replace the bundle the way a Secret volume does: a new file renamed over the old one.
    let staged = pki.dir().join("mounted-ca.pem.new");
    std::fs::copy(&pki.ca, &staged).unwrap();
    std::fs::rename(&staged, &tls.ca).unwrap();
    operator
        .next_hello(WAIT)
        .await
        .expect("the agent trusts the operator once the bundle is rotated");
    agent.wait_for("connected", |s| s.connected).await;
}

#[tokio::test]
async fn plain_http_operator_address_is_refused() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let sink = RecordingSink::at_version(0);
    let mut settings = settings(&operator, pki.agent_tls());
    settings.operator = format!("http://{}", operator.addr());
    let mut agent = Agent::start(settings, sink.clone());
    let status = agent
        .wait_for("a failed attempt", |s| s.failures >= 1)
        .await;
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("must be https"),
        "{status:?}"
    );
    assert!(operator.hellos().is_empty());
}

#[tokio::test]
async fn cancelling_the_stop_token_ends_the_link_and_marks_it_disconnected() {
    let pki = TempPki::generate().unwrap();
    let operator = operator(&pki, &pki.operator).await;
    let sink = RecordingSink::at_version(0);
    let mut agent = Agent::start(settings(&operator, pki.agent_tls()), sink.clone());
    agent.wait_for("connected", |s| s.connected).await;

    agent.stop.cancel();
    tokio::time::timeout(WAIT, &mut agent.task)
        .await
        .expect("run returns once cancelled")
        .unwrap();
    assert!(!agent.status.borrow().connected);
}
