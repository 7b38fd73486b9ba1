//! The push server against real agents' operator links over mTLS on loopback: snapshots,
//! deltas, resume, restarts, NACKs, several nodes, coalescing, the ack bound and the ack
//! tracking the status writer reads. Each agent applies updates with the agent's own acceptance
//! logic (`convert::update` + `DesiredState::apply`), so "the agent has the plan" is checked on
//! the state a real agent would enforce. Not privileged.

mod push_support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use kubesg_operator::{
    coverage::Gap,
    metrics::Metrics,
    model::ObjectKey,
    plan::{GroupGeneration, NodePlan, PodPlan},
    push::{PushObserver, PushServer, PushSettings},
    status_writer::node_acks,
};
use kubesg_proto::v1alpha1 as pb;
use kubesg_testkit::certs::TempPki;
use push_support::{
    assert_agent_has, expected_state, web_plan, web_policy, web_policy_id, AgentSink, Received,
    TestAgent, TestServer,
};

async fn server(pki: &TempPki) -> TestServer {
    TestServer::with_settings(pki, PushSettings::default()).await
}

fn agent(server: &TestServer, pki: &TempPki, node: &str) -> TestAgent {
    TestAgent::start(
        node,
        &server.url(),
        pki.agent_tls_for(node).unwrap(),
        AgentSink::new(),
    )
}

fn ok(version: u64, snapshot: bool, base_version: u64) -> Received {
    Received {
        version,
        snapshot,
        base_version,
        result: Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hello_is_answered_with_a_snapshot_of_the_node_plan() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    let plan = web_plan(&["web-1", "web-2"], 443, 1);
    s.server.set_node_plan("node-a", plan.clone());
    let a = agent(&s, &pki, "node-a");

    let received = a.sink.wait_received(1).await;
    assert!(received[0].snapshot, "{received:?}");
    assert_eq!(received[0].result, Ok(()));
    let status = s
        .wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;
    assert_eq!(status.acked.unwrap().version, received[0].version);
    assert_agent_has(&a.sink, &plan);
    assert!(
        a.sink.state().recheck_on_policy_change,
        "the snapshot carries the server's default setting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_changes_arrive_as_deltas_and_the_agent_ends_up_with_the_plan() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1", "web-2"], 443, 1));
    let a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;

    // A pod added, one removed, the policy replaced by another (rules changed), a pod's uid
    // changed (recreated), then only a generation bump.
    let mut plans = vec![
        web_plan(&["web-1", "web-2", "web-3"], 443, 1),
        web_plan(&["web-2", "web-3"], 443, 1),
        web_plan(&["web-2", "web-3"], 8443, 2),
    ];
    let mut recreated = plans[2].clone();
    recreated
        .pods
        .get_mut(&ObjectKey::new("shop", "web-2"))
        .unwrap()
        .uid = "uid-web-2-again".into();
    plans.push(recreated.clone());
    let mut bumped = recreated;
    bumped.policies.insert(
        web_policy_id(8443),
        std::sync::Arc::new(web_policy(8443, 3)),
    );
    plans.push(bumped);

    for plan in &plans {
        let before = s.server.node_status("node-a").unwrap().acked.unwrap();
        s.server.set_node_plan("node-a", plan.clone());
        let after = s
            .wait_node("node-a", "the new plan acked", |n| n.up_to_date)
            .await
            .acked
            .unwrap();
        assert!(after.version > before.version);
        assert_eq!(*after.plan, *plan);
        assert_agent_has(&a.sink, plan);
    }
    let received = a.sink.received();
    assert_eq!(received.len(), 1 + plans.len(), "{received:?}");
    for pair in received.windows(2) {
        assert_eq!(
            pair[1],
            ok(pair[1].version, false, pair[0].version),
            "every change after the snapshot is a delta on the previous version"
        );
    }
    // The generation bump alone reached the agent's status view.
    let status = s.server.node_status("node-a").unwrap();
    assert!(status.acked_groups().contains(&GroupGeneration {
        group: ObjectKey::new("shop", "web"),
        generation: 3
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_plan_sends_nothing() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    let plan = web_plan(&["web-1"], 443, 1);
    s.server.set_node_plan("node-a", plan.clone());
    let a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;
    s.server.set_node_plan("node-a", plan.clone());
    // A later change is the next thing the agent receives.
    let next = web_plan(&["web-1", "web-2"], 443, 1);
    s.server.set_node_plan("node-a", next.clone());
    s.wait_node("node-a", "the change acked", |n| {
        n.up_to_date && *n.acked.as_ref().unwrap().plan == next
    })
    .await;
    let received = a.sink.received();
    assert_eq!(received.len(), 2, "{received:?}");
    assert!(!received[1].snapshot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_agent_resumes_with_a_delta_from_its_applied_version() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));
    let a = agent(&s, &pki, "node-a");
    let acked = s
        .wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await
        .acked
        .unwrap();

    // The agent goes away; the plan changes meanwhile; it comes back with what it applied.
    let sink = a.stop().await;
    s.wait_node("node-a", "the agent gone", |n| !n.connected)
        .await;
    let plan = web_plan(&["web-1", "web-2"], 443, 1);
    s.server.set_node_plan("node-a", plan.clone());
    let _a = TestAgent::start(
        "node-a",
        &s.url(),
        pki.agent_tls_for("node-a").unwrap(),
        sink.clone(),
    );

    let received = sink.wait_received(2).await;
    assert_eq!(
        received[1],
        ok(received[1].version, false, acked.version),
        "a delta on the version the agent said it applied"
    );
    s.wait_node("node-a", "the delta acked", |n| n.up_to_date)
        .await;
    assert_agent_has(&sink, &plan);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_agent_that_has_the_latest_plan_is_sent_nothing() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));
    let a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;
    let sink = a.stop().await;
    s.wait_node("node-a", "the agent gone", |n| !n.connected)
        .await;
    let mut a = TestAgent::start(
        "node-a",
        &s.url(),
        pki.agent_tls_for("node-a").unwrap(),
        sink.clone(),
    );
    a.wait_status("reconnected", |l| l.connected).await;
    // A change after the reconnect arrives as the second update: nothing was sent in between.
    let plan = web_plan(&["web-1", "web-2"], 443, 1);
    s.server.set_node_plan("node-a", plan.clone());
    s.wait_node("node-a", "the change acked", |n| {
        n.up_to_date && *n.acked.as_ref().unwrap().plan == plan
    })
    .await;
    let received = sink.received();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(
        received[1],
        ok(received[1].version, false, received[0].version)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_operator_sends_a_snapshot_with_a_larger_version() {
    let pki = TempPki::generate().unwrap();
    let mut first = server(&pki).await;
    let plan = web_plan(&["web-1"], 443, 1);
    first.server.set_node_plan("node-a", plan.clone());
    let a = agent(&first, &pki, "node-a");
    let old = first
        .wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await
        .acked
        .unwrap();
    first.stop().await;

    // A new operator (restart or new leader) on the same address, knowing nothing of the old.
    let second =
        TestServer::start(&pki, PushServer::new(PushSettings::default()), first.addr).await;
    let plan2 = web_plan(&["web-1", "web-2"], 443, 1);
    second.server.set_node_plan("node-a", plan2.clone());
    let new = second
        .wait_node("node-a", "the new server's version acked", |n| n.up_to_date)
        .await
        .acked
        .unwrap();
    assert!(
        new.version > old.version,
        "versions keep increasing across servers: {} then {}",
        old.version,
        new.version
    );
    let received = a.sink.received();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(received[1], ok(new.version, true, 0), "a full snapshot");
    assert_agent_has(&a.sink, &plan2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_is_followed_by_a_full_snapshot() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));
    let a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;

    a.sink.refuse_next("the disk is full");
    let plan = web_plan(&["web-1", "web-2"], 443, 1);
    s.server.set_node_plan("node-a", plan.clone());
    let received = a.sink.wait_received(3).await;
    assert!(!received[1].snapshot);
    assert_eq!(received[1].result, Err("the disk is full".into()));
    assert_eq!(
        received[2],
        ok(received[2].version, true, 0),
        "a snapshot after the NACK"
    );
    let status = s
        .wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;
    let nack = status.last_nack.unwrap();
    assert_eq!(nack.version, received[1].version);
    assert_eq!(nack.reason, "the disk is full");
    assert_eq!(status.acked.unwrap().version, received[2].version);
    assert_agent_has(&a.sink, &plan);
}

/// A NACK reason of a megabyte (an agent's error quoting its input) reaches the node's status
/// cut to 4 KiB, saying how much was cut: it ends up in group statuses, whose writes it would
/// otherwise make fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_nack_reason_arrives_bounded() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));
    let a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;

    let reason = format!("the disk is full: {}", "x".repeat(1 << 20));
    a.sink.refuse_next(&reason);
    s.server
        .set_node_plan("node-a", web_plan(&["web-1", "web-2"], 443, 1));
    a.sink.wait_received(3).await;
    let status = s
        .wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;
    let nack = status.last_nack.expect("the NACK is recorded");
    assert!(nack.reason.len() <= 4096, "{}", nack.reason.len());
    assert!(
        nack.reason.starts_with("the disk is full: xxx"),
        "{:.40}",
        nack.reason
    );
    assert!(nack.reason.ends_with("more bytes)"), "says what was cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_the_agent_refuses_is_not_resent_until_the_plan_changes() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    let good = web_plan(&["web-1"], 443, 1);
    s.server.set_node_plan("node-a", good.clone());
    let a = agent(&s, &pki, "node-a");
    let acked = s
        .wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await
        .acked
        .unwrap();

    // A pod naming a policy the plan does not carry: the agent's own check refuses it.
    let mut bad = good.clone();
    bad.pods.insert(
        ObjectKey::new("shop", "api"),
        PodPlan {
            uid: "uid-api".into(),
            policy: Some("missing".into()),
            set_up: true,
        },
    );
    s.server.set_node_plan("node-a", bad);
    let received = a.sink.wait_received(3).await;
    assert!(!received[1].snapshot && received[1].result.is_err());
    assert!(received[2].snapshot, "a snapshot after the NACKed delta");
    let reason = received[2].result.clone().unwrap_err();
    assert!(reason.contains("missing"), "{reason}");
    let status = s
        .wait_node("node-a", "the NACK recorded", |n| {
            n.last_nack
                .as_ref()
                .is_some_and(|x| x.version == received[2].version)
        })
        .await;
    assert_eq!(status.last_nack.unwrap().reason, reason);
    assert_eq!(
        status.acked.unwrap().version,
        acked.version,
        "the last acked version stays"
    );
    assert!(!status.up_to_date);
    assert_agent_has(&a.sink, &good);

    // The fixed plan goes out (as a snapshot: the agent's state is not known to match any
    // delta base after a NACK), and nothing was resent in between.
    let fixed = web_plan(&["web-1", "web-2"], 443, 1);
    s.server.set_node_plan("node-a", fixed.clone());
    s.wait_node("node-a", "the fixed plan acked", |n| n.up_to_date)
        .await;
    let received = a.sink.received();
    assert_eq!(received.len(), 4, "{received:?}");
    assert!(received[3].snapshot && received[3].result.is_ok());
    assert_agent_has(&a.sink, &fixed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_get_their_own_plans() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    let plan_a = web_plan(&["web-1"], 443, 1);
    let plan_b = web_plan(&["web-7", "web-8"], 8080, 1);
    s.server.set_node_plan("node-a", plan_a.clone());
    s.server.set_node_plan("node-b", plan_b.clone());
    let a = agent(&s, &pki, "node-a");
    let b = agent(&s, &pki, "node-b");
    s.wait_node("node-a", "acked", |n| n.up_to_date).await;
    s.wait_node("node-b", "acked", |n| n.up_to_date).await;
    assert_agent_has(&a.sink, &plan_a);
    assert_agent_has(&b.sink, &plan_b);
    assert_eq!(s.server.agents_connected(), 2);

    // A change to one node reaches only that node.
    let plan_b2 = web_plan(&["web-8"], 8080, 1);
    s.server.set_node_plan("node-b", plan_b2.clone());
    s.wait_node("node-b", "the change acked", |n| {
        n.up_to_date && *n.acked.as_ref().unwrap().plan == plan_b2
    })
    .await;
    assert_agent_has(&b.sink, &plan_b2);
    assert_eq!(a.sink.received().len(), 1);
    assert_agent_has(&a.sink, &plan_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_of_a_node_without_a_plan_is_sent_nothing_until_one_is_set() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    let mut a = agent(&s, &pki, "node-a");
    a.wait_status("connected", |l| l.connected).await;
    let status = s.wait_node("node-a", "connected", |n| n.connected).await;
    assert!(!status.has_plan && status.acked.is_none());
    // An operator that just started must not empty the agent: nothing is sent before a plan.
    // A plan set now is the first thing the agent receives.
    let plan = web_plan(&["web-1"], 443, 1);
    s.server.set_node_plan("node-a", plan.clone());
    let received = a.sink.wait_received(1).await;
    assert!(received[0].snapshot);
    s.wait_node("node-a", "acked", |n| n.up_to_date).await;
    assert_eq!(a.sink.received().len(), 1);
    assert_agent_has(&a.sink, &plan);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_set_while_an_update_is_unacked_are_coalesced_into_one_delta() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));
    let a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;

    // The agent sits on the next update while three more plans arrive.
    a.sink.hold_next(Duration::from_millis(500));
    s.server
        .set_node_plan("node-a", web_plan(&["web-1", "web-2"], 443, 1));
    a.sink.wait_started(2).await;
    for members in [
        &["web-1", "web-2", "web-3"][..],
        &["web-2", "web-3"],
        &["web-3", "web-4"],
    ] {
        s.server.set_node_plan("node-a", web_plan(members, 443, 1));
    }
    let last = web_plan(&["web-3", "web-4"], 443, 1);
    s.wait_node("node-a", "the last plan acked", |n| {
        n.up_to_date && *n.acked.as_ref().unwrap().plan == last
    })
    .await;
    let received = a.sink.received();
    assert_eq!(
        received.len(),
        3,
        "snapshot, the held delta, then one delta for the three plans: {received:?}"
    );
    assert_eq!(
        received[2],
        ok(received[2].version, false, received[1].version)
    );
    assert_agent_has(&a.sink, &last);
}

/// A snapshot over gRPC's default 4 MiB message limit (which both ends had: the agent's stream
/// failed on it and it redialled for ever) arrives whole: both ends take messages up to
/// `kubesg_proto::MAX_MESSAGE_BYTES`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_over_4_mib_arrives() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    let names: Vec<String> = (0..100_000).map(|i| format!("web-{i:06}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let plan = web_plan(&names, 443, 1);
    let bytes = prost::Message::encoded_len(&kubesg_operator::wire::snapshot(
        &plan,
        1,
        &Default::default(),
    ));
    assert!(bytes > 4 << 20, "{bytes} bytes");
    s.server.set_node_plan("node-a", plan.clone());
    let a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;
    assert_eq!(a.status.borrow().streams_opened, 1, "no redial");
    assert_agent_has(&a.sink, &plan);
}

/// An update over the message limit is not sent (sent, it would fail the stream, and the agent
/// would redial into the same failure for ever): the node's status says why, as a refusal; the
/// agent stays connected on its one stream with the rules it has; the next plan that fits is
/// sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_over_the_message_limit_is_refused_with_a_status_not_a_redial_loop() {
    let pki = TempPki::generate().unwrap();
    let small = web_plan(&["web-1"], 443, 1);
    let fits = prost::Message::encoded_len(&kubesg_operator::wire::snapshot(
        &small,
        1,
        &Default::default(),
    )) + 200;
    let settings = PushSettings {
        max_message_bytes: fits,
        ..PushSettings::default()
    };
    let s = TestServer::with_settings(&pki, settings).await;
    s.server.set_node_plan("node-a", small);
    let a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;

    let names: Vec<String> = (0..200).map(|i| format!("web-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    s.server.set_node_plan("node-a", web_plan(&names, 443, 1));
    let status = s
        .wait_node("node-a", "the refusal", |n| n.last_nack.is_some())
        .await;
    let reason = status.last_nack.clone().expect("the refusal").reason;
    assert!(
        reason.contains(&format!("over the {fits}-byte message limit: not sent")),
        "{reason}"
    );
    assert!(status.connected && !status.up_to_date, "{status:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.status.borrow().streams_opened, 1, "no redial");
    assert_eq!(a.sink.received().len(), 1, "nothing more was sent");

    let plan = web_plan(&["web-1", "web-2"], 443, 1);
    s.server.set_node_plan("node-a", plan.clone());
    s.wait_node("node-a", "the plan that fits acked", |n| n.up_to_date)
        .await;
    assert_agent_has(&a.sink, &plan);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_unacked_past_the_bound_ends_the_stream_and_the_agent_resumes() {
    let pki = TempPki::generate().unwrap();
    let settings = PushSettings {
        ack_timeout: Duration::from_millis(100),
        ..PushSettings::default()
    };
    let s = TestServer::with_settings(&pki, settings).await;
    s.server
        .set_node_plan("node-a", web_plan(&["web-1"], 443, 1));
    let mut a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "the snapshot acked", |n| n.up_to_date)
        .await;

    // The agent applies the delta only after the bound: the server ends the stream; the agent
    // redials and its Hello reports the delta applied, which counts as its ack.
    a.sink.hold_next(Duration::from_millis(500));
    let plan = web_plan(&["web-1", "web-2"], 443, 1);
    s.server.set_node_plan("node-a", plan.clone());
    a.wait_status("a second stream", |l| l.streams_opened >= 2)
        .await;
    let status = s
        .wait_node("node-a", "the delta acked", |n| n.up_to_date)
        .await;
    assert_eq!(status.acked.unwrap().version, a.sink.received()[1].version);
    assert!(a.status.borrow().failures >= 1);
    assert_agent_has(&a.sink, &plan);

    // The next change is a delta on the resumed version: nothing was resent in between.
    let next = web_plan(&["web-1", "web-2", "web-3"], 443, 1);
    s.server.set_node_plan("node-a", next.clone());
    s.wait_node("node-a", "the next change acked", |n| {
        n.up_to_date && *n.acked.as_ref().unwrap().plan == next
    })
    .await;
    let received = a.sink.received();
    assert_eq!(received.len(), 3, "{received:?}");
    assert_eq!(
        received[2],
        ok(received[2].version, false, received[1].version)
    );
    assert_agent_has(&a.sink, &next);
}

/// Records every latency the server reports.
#[derive(Default)]
struct Latencies {
    seen: Mutex<Vec<(String, Duration)>>,
    connected: Mutex<Vec<usize>>,
}

impl PushObserver for Latencies {
    fn push_latency(&self, node: &str, latency: Duration) {
        self.seen.lock().unwrap().push((node.to_owned(), latency));
    }
    fn agents_connected(&self, count: usize) {
        self.connected.lock().unwrap().push(count);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_tracking_reports_acked_versions_groups_and_latencies_per_node() {
    let pki = TempPki::generate().unwrap();
    let observer = Arc::new(Latencies::default());
    let server = PushServer::with_observer(PushSettings::default(), observer.clone());
    let s = TestServer::start(&pki, server, "127.0.0.1:0".parse().unwrap()).await;
    let plan_a = web_plan(&["web-1"], 443, 4);
    s.server.set_node_plan("node-a", plan_a.clone());
    s.server.set_node_plan("node-b", NodePlan::default());
    let before = s.server.node_status("node-a").unwrap();
    assert!(!before.connected && before.acked.is_none() && !before.up_to_date);
    let mut changes = s.server.subscribe();
    changes.borrow_and_update();

    let a = agent(&s, &pki, "node-a");
    let _b = agent(&s, &pki, "node-b");
    tokio::time::timeout(push_support::WAIT, changes.changed())
        .await
        .expect("the change notification fires")
        .unwrap();
    let status_a = s.wait_node("node-a", "acked", |n| n.up_to_date).await;
    let status_b = s.wait_node("node-b", "acked", |n| n.up_to_date).await;
    let received = a.sink.received();
    let acked_a = status_a.acked.clone().unwrap();
    assert_eq!(acked_a.version, received[0].version);
    assert_eq!(*acked_a.plan, plan_a);
    assert!(
        status_a.connected
            && status_a
                .peer
                .as_ref()
                .unwrap()
                .contains("CN=system:node:node-a")
    );
    assert_eq!(
        status_a.acked_groups().into_iter().collect::<Vec<_>>(),
        vec![GroupGeneration {
            group: ObjectKey::new("shop", "web"),
            generation: 4
        }]
    );
    assert!(status_a.last_nack.is_none());
    assert!(status_b.acked_groups().is_empty());
    assert_ne!(
        status_b.acked.unwrap().version,
        0,
        "an empty plan is acked too"
    );
    let statuses = s.server.node_statuses();
    assert_eq!(
        statuses.keys().collect::<Vec<_>>(),
        vec!["node-a", "node-b"]
    );

    // One latency per plan change, per node.
    let seen = observer.seen.lock().unwrap().clone();
    let mut nodes: Vec<_> = seen.iter().map(|(n, _)| n.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"]);
    assert_eq!(observer.connected.lock().unwrap().last(), Some(&2));

    // Removing a node with no agent forgets it.
    drop(a);
    s.wait_node("node-a", "gone", |n| !n.connected).await;
    s.server.remove_node("node-a");
    assert!(s.server.node_status("node-a").is_none());
    assert_eq!(s.server.agents_connected(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_the_agent_has_no_endpoint_for_or_under_another_uid_are_reported_and_counted() {
    let pki = TempPki::generate().unwrap();
    let metrics = Metrics::default();
    let server = PushServer::with_observer(PushSettings::default(), Arc::new(metrics.clone()));
    let s = TestServer::start(&pki, server, "127.0.0.1:0".parse().unwrap()).await;
    let mut plan = web_plan(&["web-1", "web-2"], 443, 4);
    // A pod the kubelet has not set up yet (no address): no endpoint is expected of it.
    plan.pods.insert(
        ObjectKey::new("shop", "starting"),
        PodPlan {
            uid: "uid-starting".into(),
            policy: Some(web_policy_id(443)),
            set_up: false,
        },
    );
    s.server.set_node_plan("node-a", plan.clone());
    let a = agent(&s, &pki, "node-a");
    // web-2's endpoint has another uid; batch (a pod of no group) has none: set up before
    // kubesg was chained.
    a.sink.set_endpoints(&[
        ("shop", "web-1", "uid-web-1"),
        ("shop", "web-2", "uid-old"),
        ("shop", "elsewhere", "uid-x"),
    ]);

    let status = s
        .wait_node("node-a", "acked with gaps", |n| {
            n.up_to_date && n.gaps.is_some()
        })
        .await;
    let gaps = status.gaps.clone().unwrap();
    assert_eq!(
        *gaps,
        BTreeMap::from([
            (ObjectKey::new("shop", "batch"), Gap::NoEndpoint),
            (
                ObjectKey::new("shop", "web-2"),
                Gap::OtherUid {
                    agent: "uid-old".into(),
                    pod: "uid-web-2".into()
                }
            ),
        ])
    );
    // The group's status hears of its member only (batch is in no group).
    assert_eq!(
        node_acks(&status).unenforced,
        BTreeMap::from([(
            ObjectKey::new("shop", "web"),
            vec!["shop/web-2 (its endpoint has another uid, uid-old)".to_string()]
        )])
    );
    let text = metrics_text(&metrics);
    for reason in ["no-endpoint", "uid-mismatch"] {
        let line =
            format!("kubesg_operator_unenforced_pods{{node=\"node-a\",reason=\"{reason}\"}} 1");
        assert!(text.contains(&line), "{line} in\n{text}");
    }

    // The pods are set up again through kubesg: the next answer closes the gaps.
    a.sink.set_endpoints(&[
        ("shop", "web-1", "uid-web-1"),
        ("shop", "web-2", "uid-web-2"),
        ("shop", "batch", "uid-batch"),
    ]);
    s.server
        .set_node_plan("node-a", web_plan(&["web-1", "web-2"], 443, 5));
    let status = s
        .wait_node("node-a", "acked without gaps", |n| {
            n.up_to_date && n.gaps.as_ref().is_some_and(|g| g.is_empty())
        })
        .await;
    assert!(node_acks(&status).unenforced.is_empty());
    let text = metrics_text(&metrics);
    for reason in ["no-endpoint", "uid-mismatch"] {
        let line =
            format!("kubesg_operator_unenforced_pods{{node=\"node-a\",reason=\"{reason}\"}} 0");
        assert!(text.contains(&line), "{line} in\n{text}");
    }
}

fn metrics_text(metrics: &Metrics) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &metrics.registry()).unwrap();
    out
}

/// `plan` whose web policy also admits the addresses of set `lb`, which holds `addrs`.
fn with_lb_set(mut plan: NodePlan, addrs: std::ops::Range<u32>) -> NodePlan {
    let id = web_policy_id(443);
    let mut policy = (*plan.policies[&id]).clone();
    policy.ingress[0].sets = vec!["group:shop/lb".into()];
    plan.policies.insert(id, Arc::new(policy));
    let set: Vec<ipnet::IpNet> = addrs
        .map(|i| std::net::IpAddr::from(std::net::Ipv4Addr::from(0xc0a8_0000 + i)).into())
        .collect();
    plan.sets.insert("group:shop/lb".into(), Arc::new(set));
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_a_large_group_is_one_address_on_the_wire() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    let before = with_lb_set(web_plan(&["web-1"], 443, 1), 0..10_000);
    s.server.set_node_plan("node-a", before.clone());
    let a = agent(&s, &pki, "node-a");
    s.wait_node("node-a", "acked", |n| n.up_to_date).await;

    let after = with_lb_set(web_plan(&["web-1"], 443, 1), 0..10_001);
    s.server.set_node_plan("node-a", after.clone());
    s.wait_node("node-a", "the change acked", |n| {
        n.up_to_date && *n.acked.as_ref().unwrap().plan == after
    })
    .await;
    assert_agent_has(&a.sink, &after);
    assert_eq!(a.sink.state().sets, expected_state(&after, true).sets);
    let updates = a.sink.updates();
    let (snapshot, delta) = (&updates[0], &updates[1]);
    assert!(
        delta.upsert_sets.is_empty() && delta.upsert_policies.is_empty(),
        "{delta:?}"
    );
    assert_eq!(
        delta.change_sets,
        vec![pb::AddressSetChange {
            id: "group:shop/lb".into(),
            add: vec!["192.168.39.16/32".into()],
            remove: vec![],
        }]
    );
    let (whole, change) = (
        prost::Message::encoded_len(snapshot),
        prost::Message::encoded_len(delta),
    );
    assert!(
        change * 1000 < whole,
        "the delta is {change} bytes, the snapshot {whole}"
    );
}

/// An agent of an older build: its Hello lists no capabilities. Dials `url` with `node`'s
/// certificate, acks every update it gets, and returns the first `n` of them.
async fn old_agent_updates(
    pki: &TempPki,
    url: &str,
    node: &str,
    mut next_plan: impl FnMut(),
    n: usize,
) -> Vec<pb::PolicyUpdate> {
    use pb::{agent_message::Kind, policy_distribution_client::PolicyDistributionClient};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let files = pki.agent_tls_for(node).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&files.ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(&files.cert).unwrap(),
            std::fs::read(&files.key).unwrap(),
        ))
        .domain_name(files.server_name.clone());
    let channel = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::AgentMessage {
        kind: Some(Kind::Hello(pb::Hello {
            node: node.into(),
            applied_version: 0,
            agent_version: "0.0.1".into(),
            capabilities: vec![],
        })),
    })
    .await
    .unwrap();
    let mut stream = PolicyDistributionClient::new(channel)
        .max_decoding_message_size(kubesg_proto::MAX_MESSAGE_BYTES)
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while got.len() < n {
        let update = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("an update in time")
            .unwrap()
            .expect("the stream stays open");
        tx.send(pb::AgentMessage {
            kind: Some(Kind::Ack(pb::Ack {
                version: update.version,
                applied: true,
                ..pb::Ack::default()
            })),
        })
        .await
        .unwrap();
        got.push(update);
        next_plan();
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_list_set_changes_gets_changed_sets_whole() {
    let pki = TempPki::generate().unwrap();
    let s = server(&pki).await;
    s.server.set_node_plan(
        "node-a",
        with_lb_set(web_plan(&["web-1"], 443, 1), 0..1_000),
    );
    let after = with_lb_set(web_plan(&["web-1"], 443, 1), 0..1_001);
    let server = s.server.clone();
    let updates = old_agent_updates(
        &pki,
        &s.url(),
        "node-a",
        move || server.set_node_plan("node-a", after.clone()),
        2,
    )
    .await;
    assert!(updates[0].snapshot && !updates[1].snapshot);
    assert!(
        updates[1].change_sets.is_empty(),
        "{:?}",
        updates[1].change_sets
    );
    assert_eq!(updates[1].upsert_sets.len(), 1);
    assert_eq!(updates[1].upsert_sets[0].cidrs.len(), 1_001);
}
