//! The push server's mTLS: only agents presenting a certificate from the configured CA reach
//! the service (no Hello from anyone else is ever seen), the node identity check (a certificate
//! or a node token must prove the Hello's node; refusals counted), and TLS files reported by
//! name. Not privileged.

mod push_support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use kubesg_agent::{operator_link::LinkSettings, tls::ClientTlsFiles};
use kubesg_operator::{
    node_identity::{Refusal, TokenReviewer},
    push::{NodeIdentityCheck, PushObserver, PushServer, PushSettings},
    tls::{server_tls_config, TlsFileError},
};
use kubesg_proto::v1alpha1 as pb;
use kubesg_testkit::certs::{TempPki, OPERATOR_SERVER_NAME};
use pb::policy_distribution_client::PolicyDistributionClient;
use push_support::{web_plan, AgentSink, TestAgent, TestServer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Dials `url` trusting the test CA but presenting no client certificate, sends a Hello and
/// reads the first update; returns how that ended.
async fn sync_without_client_certificate(pki: &TempPki, url: &str) -> Result<(), String> {
    let ca = std::fs::read(&pki.ca).map_err(|e| e.to_string())?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(OPERATOR_SERVER_NAME);
    let channel = Endpoint::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let hello = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            node: "node-a".into(),
            applied_version: 0,
            agent_version: "test".into(),
            capabilities: vec![],
        })),
    };
    let mut updates = PolicyDistributionClient::new(channel)
        .sync(tokio_stream::iter(vec![hello]))
        .await
        .map_err(|e| format!("sync: {e:?}"))?
        .into_inner();
    updates
        .message()
        .await
        .map_err(|e| format!("stream: {e:?}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_without_a_client_certificate_is_refused_before_its_hello() {
    let pki = TempPki::generate().unwrap();
    let s = TestServer::with_settings(&pki, PushSettings::default()).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));

    let outcome = sync_without_client_certificate(&pki, &s.url()).await;
    assert!(outcome.is_err(), "an anonymous client was served");
    let status = s.server.node_status("node-a").unwrap();
    assert!(
        !status.connected && status.acked.is_none(),
        "no Hello reached the server: {status:?}"
    );
    assert_eq!(s.server.agents_connected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_a_certificate_from_another_ca_is_refused_before_its_hello() {
    let pki = TempPki::generate().unwrap();
    let s = TestServer::with_settings(&pki, PushSettings::default()).await;
    // The agent trusts the right server, but its own certificate is from the unrelated CA.
    let tls = ClientTlsFiles {
        cert: pki.other_agent.cert.clone(),
        key: pki.other_agent.key.clone(),
        ..pki.agent_tls()
    };
    let sink = AgentSink::new();
    let mut a = TestAgent::start("node-a", &s.url(), tls, sink.clone());
    a.wait_status("two failed attempts", |l| l.failures >= 2)
        .await;
    let link = a.status.borrow().clone();
    assert_eq!(link.streams_opened, 0, "{link:?}");
    assert!(
        s.server.node_status("node-a").is_none(),
        "no Hello reached the server"
    );
    assert!(s.server.node_statuses().is_empty());
    assert!(sink.received().is_empty());
}

/// Records the refusals the server reports, as the metrics do.
#[derive(Default)]
struct Refusals(Mutex<Vec<(String, &'static str)>>);

impl PushObserver for Refusals {
    fn agent_refused(&self, node: &str, reason: &'static str) {
        self.0.lock().unwrap().push((node.to_owned(), reason));
    }
}

impl Refusals {
    fn seen(&self) -> Vec<(String, &'static str)> {
        self.0.lock().unwrap().clone()
    }
}

/// Stands in for the API server's TokenReview: each token proves the node it maps to; any
/// other token is refused as the API server refuses one (tests of the real review run against
/// the real API server: tests/cluster/node_identity.rs).
struct Tokens(BTreeMap<&'static str, &'static str>);

#[tonic::async_trait]
impl TokenReviewer for Tokens {
    async fn node_of(&self, token: &str) -> Result<String, Refusal> {
        self.0
            .get(token)
            .map(|node| (*node).to_owned())
            .ok_or_else(|| Refusal::InvalidToken("not authenticated".into()))
    }
}

/// A server with `settings` that counts refusals into the returned observer and reviews tokens
/// with `tokens` (`None`: no reviewer, as in manifests mode).
async fn counted_server(
    pki: &TempPki,
    settings: PushSettings,
    tokens: Option<Tokens>,
) -> (TestServer, Arc<Refusals>) {
    let refusals = Arc::new(Refusals::default());
    let server = PushServer::with_token_reviewer(
        settings,
        refusals.clone(),
        tokens.map(|t| Arc::new(t) as Arc<dyn TokenReviewer>),
    );
    let s = TestServer::start(pki, server, "127.0.0.1:0".parse().unwrap()).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));
    (s, refusals)
}

/// An agent of `node` presenting `tls` and, if given, the token in a file of its own.
fn agent_with_token(
    s: &TestServer,
    node: &str,
    tls: kubesg_agent::tls::ClientTlsFiles,
    token_file: Option<&std::path::Path>,
) -> TestAgent {
    let settings = LinkSettings {
        token_file: token_file.map(|p| p.to_owned()),
        ..LinkSettings::new(node, s.url(), tls)
    };
    TestAgent::start_with(settings, AgentSink::new())
}

/// Waits for a failed attempt and returns the link's error.
async fn refused(agent: &mut TestAgent) -> String {
    agent
        .wait_status("a failed attempt", |l| l.failures >= 1)
        .await;
    agent.status.borrow().last_error.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_naming_no_node_is_refused_by_default_and_counted() {
    let pki = TempPki::generate().unwrap();
    let (s, refusals) = counted_server(&pki, PushSettings::default(), None).await;
    // The DaemonSet-wide CN=kubesg-agent, no token: nothing says which node it runs on.
    let mut a = agent_with_token(&s, "node-a", pki.agent_tls(), None);
    let error = refused(&mut a).await;
    assert!(
        error.contains("PermissionDenied")
            && error.contains("does not name node node-a")
            && error.contains("no node token"),
        "{error}"
    );
    let status = s.server.node_status("node-a").unwrap();
    assert!(!status.connected && status.acked.is_none(), "{status:?}");
    assert!(
        a.sink.received().is_empty(),
        "no rules for an unproven node"
    );
    assert!(refusals.seen().contains(&("node-a".into(), "no-proof")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_node_is_refused_and_its_own_is_served() {
    let pki = TempPki::generate().unwrap();
    let (s, refusals) = counted_server(&pki, PushSettings::default(), None).await;
    s.server
        .set_node_plan("node-b", web_plan(&["web-2"], 443, 1));
    // node-b's certificate claiming node-a: refused, node-a gets no agent.
    let mut impostor = agent_with_token(&s, "node-a", pki.agent_tls_for("node-b").unwrap(), None);
    let error = refused(&mut impostor).await;
    assert!(error.contains("does not name node node-a"), "{error}");
    assert!(impostor.sink.received().is_empty());
    assert_eq!(refusals.seen()[0], ("node-a".into(), "no-proof"));
    assert!(!s.server.node_status("node-a").unwrap().connected);
    // The same certificate for its own node is served.
    let own = agent_with_token(&s, "node-b", pki.agent_tls_for("node-b").unwrap(), None);
    s.wait_node("node-b", "acked", |n| n.up_to_date).await;
    assert_eq!(own.sink.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bound_to_the_node_is_served_and_reread_at_every_dial() {
    let pki = TempPki::generate().unwrap();
    let tokens = Tokens(BTreeMap::from([("token-of-a", "node-a")]));
    let (s, refusals) = counted_server(&pki, PushSettings::default(), Some(tokens)).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "expired-token\n").unwrap();
    let mut a = agent_with_token(&s, "node-a", pki.agent_tls(), Some(&token));
    let error = refused(&mut a).await;
    assert!(
        error.contains("PermissionDenied") && error.contains("the node token was refused"),
        "{error}"
    );
    assert!(refusals
        .seen()
        .contains(&("node-a".into(), "invalid-token")));
    // The kubelet rotates the token: the next dial reads the new one.
    std::fs::write(&token, "token-of-a\n").unwrap();
    let status = s.wait_node("node-a", "acked", |n| n.up_to_date).await;
    assert!(status.peer.unwrap().contains("CN=kubesg-agent"));
    assert_eq!(a.sink.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_another_node_is_refused_and_counted() {
    let pki = TempPki::generate().unwrap();
    let tokens = Tokens(BTreeMap::from([("token-of-b", "node-b")]));
    let (s, refusals) = counted_server(&pki, PushSettings::default(), Some(tokens)).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "token-of-b").unwrap();
    let mut a = agent_with_token(&s, "node-a", pki.agent_tls(), Some(&token));
    let error = refused(&mut a).await;
    assert!(
        error.contains("PermissionDenied")
            && error.contains("the node token is node node-b's, not node node-a's"),
        "{error}"
    );
    assert!(a.sink.received().is_empty());
    assert!(!s.server.node_status("node-a").unwrap().connected);
    assert!(refusals.seen().contains(&("node-a".into(), "other-node")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_where_nothing_can_review_it_proves_nothing() {
    let pki = TempPki::generate().unwrap();
    let (s, refusals) = counted_server(&pki, PushSettings::default(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "anything").unwrap();
    let mut a = agent_with_token(&s, "node-a", pki.agent_tls(), Some(&token));
    let error = refused(&mut a).await;
    assert!(error.contains("no API server to review it"), "{error}");
    assert!(refusals.seen().contains(&("node-a".into(), "no-proof")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_token_file_is_named_in_the_link_status() {
    let pki = TempPki::generate().unwrap();
    let (s, refusals) = counted_server(&pki, PushSettings::default(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("absent-token");
    let mut a = agent_with_token(&s, "node-a", pki.agent_tls(), Some(&token));
    let error = refused(&mut a).await;
    assert!(
        error.contains("the node identity token") && error.contains("absent-token"),
        "{error}"
    );
    assert_eq!(a.status.borrow().streams_opened, 0);
    assert!(refusals.seen().is_empty(), "nothing reached the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unproven_agent_is_served_but_counted_when_identity_is_only_logged() {
    let pki = TempPki::generate().unwrap();
    let settings = PushSettings {
        node_identity: NodeIdentityCheck::LogOnly,
        ..PushSettings::default()
    };
    let (s, refusals) = counted_server(&pki, settings, None).await;
    let a = agent_with_token(&s, "node-a", pki.agent_tls(), None);
    let status = s.wait_node("node-a", "acked", |n| n.up_to_date).await;
    assert!(status.peer.unwrap().contains("CN=kubesg-agent"));
    assert_eq!(a.sink.received().len(), 1);
    assert_eq!(refusals.seen(), vec![("node-a".to_owned(), "no-proof")]);
}

#[test]
fn server_tls_files_are_named_in_errors() {
    let pki = TempPki::generate().unwrap();
    server_tls_config(&pki.operator_tls(&pki.operator)).expect("the generated files load");

    let mut files = pki.operator_tls(&pki.operator);
    files.client_ca = pki.dir().join("absent-agents-ca.pem");
    let error = server_tls_config(&files).expect_err("a missing CA bundle fails");
    assert!(matches!(error, TlsFileError::Read { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("CA bundle") && text.contains("absent-agents-ca.pem"),
        "{text}"
    );

    // The agent's key with the operator's certificate.
    let mut files = pki.operator_tls(&pki.operator);
    files.key = pki.agent.key.clone();
    let error = server_tls_config(&files).expect_err("a key of another certificate fails");
    assert!(
        matches!(error, TlsFileError::KeyMismatch { .. }),
        "{error:?}"
    );

    let mut files = pki.operator_tls(&pki.operator);
    files.cert = pki.ca.clone();
    files.key = pki.dir().join("not-a-key.pem");
    std::fs::write(&files.key, "no key here\n").unwrap();
    let text = server_tls_config(&files)
        .expect_err("a file without a key fails")
        .to_string();
    assert!(
        text.contains("private key") && text.contains("not-a-key.pem"),
        "{text}"
    );
}
