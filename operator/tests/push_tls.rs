//! The push server's mTLS: only agents presenting a certificate from the configured CA reach
//! the service (no Hello from anyone else is ever seen), the optional node identity check, and
//! TLS files reported by name. Not privileged.

mod push_support;

use kubesg_agent::tls::ClientTlsFiles;
use kubesg_operator::{
    push::{NodeIdentityCheck, PushSettings},
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_not_naming_the_node_is_refused_when_identity_is_required() {
    let pki = TempPki::generate().unwrap();
    let settings = PushSettings {
        node_identity: NodeIdentityCheck::Require,
        ..PushSettings::default()
    };
    let s = TestServer::with_settings(&pki, settings).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));
    // The test agent certificate is the DaemonSet-wide CN=kubesg-agent: it names no node.
    let sink = AgentSink::new();
    let mut a = TestAgent::start("node-a", &s.url(), pki.agent_tls(), sink.clone());
    a.wait_status("a failed attempt", |l| l.failures >= 1).await;
    let error = a.status.borrow().last_error.clone().unwrap_or_default();
    assert!(
        error.contains("PermissionDenied") && error.contains("does not name node node-a"),
        "{error}"
    );
    let status = s.server.node_status("node-a").unwrap();
    assert!(!status.connected && status.acked.is_none(), "{status:?}");
    assert!(sink.received().is_empty(), "no rules for an unproven node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_certificate_is_served_when_identity_is_only_logged() {
    let pki = TempPki::generate().unwrap();
    let s = TestServer::with_settings(&pki, PushSettings::default()).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));
    let a = TestAgent::start("node-a", &s.url(), pki.agent_tls(), AgentSink::new());
    let status = s.wait_node("node-a", "acked", |n| n.up_to_date).await;
    assert!(status.peer.unwrap().contains("CN=kubesg-agent"));
    assert_eq!(a.sink.received().len(), 1);
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
