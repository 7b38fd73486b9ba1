//! mTLS between the real agent process and the operator, end to end: an agent never applies
//! rules from a server it cannot verify, and the operator refuses an agent without a valid client
//! certificate; either way the agent's pods stay on the startup policy. Each test then fixes the
//! one thing that was wrong and sees the link work, so that the refusal is known to be that
//! thing's doing. (The link-level cases, misnamed certificates and rotation, are
//! dataplane/agent/tests/operator_link.rs.)

mod common;

use std::time::{Duration, Instant};

use common::{hosts, policy, snapshot, tcp, Cluster, NODE};
use kubesg_testkit::{agent::Startup, cni::CniPod};

/// Waits until the agent's log has reported the operator link down `times` times: it tried, and
/// failed, that often.
fn wait_link_failures(cluster: &Cluster, times: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = cluster.agent.log();
        if log.matches("operator link down").count() >= times {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never reported its link down {times} times\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that nothing reached the operator and nothing was applied: no Hello, no ack, no
/// stream to push on, the pods pending on the `deny` startup policy and their traffic dropped.
fn assert_nothing_applied(cluster: &Cluster, client: &CniPod, server: &CniPod) {
    assert!(
        cluster.operator.hellos().is_empty(),
        "{:?}",
        cluster.operator.hellos()
    );
    assert!(
        cluster
            .rt
            .block_on(cluster.operator.next_ack(Duration::from_millis(200)))
            .is_none(),
        "an ack reached the operator"
    );
    assert!(
        cluster.operator.push(rules(client, server)).is_err(),
        "no agent stream to push on"
    );
    let table = cluster.agent.cli_ok(&["endpoints"]).expect("endpoints");
    assert!(table.contains("applied version: 0"), "{table}");
    assert_eq!(table.matches("(pending)").count(), 2, "{table}");
    let metrics = cluster.agent.metrics().expect("metrics");
    assert!(
        metrics.contains("kubesg_agent_operator_connected 0"),
        "{metrics}"
    );
    cluster.assert_dropped(client, server, false, 8080);
}

fn rules(client: &CniPod, server: &CniPod) -> kubesg_proto::v1alpha1::PolicyUpdate {
    snapshot(
        1,
        vec![
            policy("cli", vec![], vec![tcp(&[8080], hosts(&[server]))]),
            policy("srv", vec![tcp(&[8080], hosts(&[client]))], vec![]),
        ],
        &[(client, Some("cli")), (server, Some("srv"))],
    )
}

/// Restarts the agent (with its corrected TLS files), then expects the link to work: Hello, the
/// rules applied and acked, the allowed connection open.
fn assert_link_works_after_restart(cluster: &mut Cluster, client: &CniPod, server: &CniPod) {
    cluster.agent.stop().expect("stopping the agent");
    cluster.agent.start_again().expect("starting the agent");
    let hello = cluster.hello();
    assert_eq!((hello.node.as_str(), hello.applied_version), (NODE, 0));
    cluster.push(rules(client, server));
    cluster.assert_opens(client, server, false, 8080);
}

#[test]
fn agent_that_cannot_verify_the_operator_applies_nothing_and_its_pods_stay_denied() {
    kubesg_testkit::require_privileged!();
    // The operator presents a certificate with the right name from a CA the agent does not
    // trust.
    let mut cluster =
        Cluster::start_serving(Startup::Deny, |pki| pki.other_operator.clone(), |_, _| {});
    let client = cluster.add_pod("client", 61);
    let server = cluster.add_pod("server", 62);
    let log = wait_link_failures(&cluster, 2);
    assert!(
        log.contains("UnknownIssuer") || log.contains("invalid peer certificate"),
        "the agent says why it refuses the operator:\n{log}"
    );
    assert_nothing_applied(&cluster, &client, &server);

    // Trusting the CA that signed the operator's certificate, the same agent connects.
    let other_ca = cluster.pki.other_ca.clone();
    if let Some(link) = cluster.agent.config_mut().operator.as_mut() {
        link.tls.ca = other_ca;
    }
    assert_link_works_after_restart(&mut cluster, &client, &server);
}

#[test]
fn operator_refuses_an_agent_without_a_valid_client_certificate() {
    kubesg_testkit::require_privileged!();
    // The agent presents a client certificate from a CA the operator does not accept.
    let mut cluster = Cluster::start(Startup::Deny, |pki, config| {
        if let Some(link) = config.operator.as_mut() {
            link.tls.cert = pki.other_agent.cert.clone();
            link.tls.key = pki.other_agent.key.clone();
        }
    });
    let client = cluster.add_pod("client", 63);
    let server = cluster.add_pod("server", 64);
    wait_link_failures(&cluster, 2);
    assert_nothing_applied(&cluster, &client, &server);

    let agent_cert = cluster.pki.agent.clone();
    if let Some(link) = cluster.agent.config_mut().operator.as_mut() {
        link.tls.cert = agent_cert.cert;
        link.tls.key = agent_cert.key;
    }
    assert_link_works_after_restart(&mut cluster, &client, &server);
}
