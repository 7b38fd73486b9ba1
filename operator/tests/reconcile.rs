//! The operator against kube-rs's mocked API (tower-test): a small "API server verifier" plays
//! the API server and asserts the exact requests the operator makes (method, path and query,
//! body) for status writes, conditions, Events, deleted and invalid groups, and leader election
//! through a Lease; and the API source: what the watchers make of lists, watch events and a
//! relist after an expired watch. Not privileged.

use std::{collections::BTreeMap, time::Duration};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kubesg_operator::{
    changes::ClusterChange,
    kube_source::{self, SourceEvent},
    leader::{self, Elector, LeaseSettings},
    metrics::Metrics,
    model::ObjectKey,
    model::{NamedPort, PortProtocol, Service, ServicePort, TargetPort},
    plan::GroupReport,
    push::{PushServer, PushSettings},
    status::{group_status, NodeAcks},
    status_api::{self, write_status, Context, Outcome},
    status_writer::{ReportUpdate, StatusWriter},
};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_test::mock::{self, Handle, SendResponse};

/// Bound on every wait for a request; reached only when the behaviour is broken.
const WAIT: Duration = Duration::from_secs(10);

/// How long "no request" is watched for.
const QUIET: Duration = Duration::from_millis(300);

// ----- the API server verifier -----

/// Plays the API server: every request the operator's client makes arrives here, in order.
struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// One request, and the way to answer it.
struct Call {
    method: Method,
    uri: String,
    body: Value,
    reply: SendResponse<Response<Body>>,
}

impl ApiServer {
    /// A kube client whose requests go to the returned verifier.
    fn client() -> (kube::Client, ApiServer) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (kube::Client::new(service, "default"), ApiServer { handle })
    }

    /// The next request.
    async fn next(&mut self) -> Call {
        let (request, reply) = tokio::time::timeout(WAIT, self.handle.next_request())
            .await
            .expect("the operator made no request")
            .expect("the client is gone");
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON body")
        };
        Call {
            method: parts.method,
            uri: parts.uri.to_string(),
            body,
            reply,
        }
    }

    /// The next request, asserted to be `method uri`.
    async fn expect(&mut self, method: Method, uri: &str) -> Call {
        let call = self.next().await;
        assert_eq!(
            (&call.method, call.uri.as_str()),
            (&method, uri),
            "unexpected request; body: {}",
            call.body
        );
        call
    }

    /// Asserts the operator makes no request (for a while).
    async fn expect_nothing(&mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(QUIET, self.handle.next_request()).await
        {
            panic!(
                "expected no request, got {} {}",
                request.method(),
                request.uri()
            );
        }
    }
}

impl Call {
    /// Answers with `status` and `body`.
    fn reply(self, status: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        self.reply.send_response(response);
    }

    /// Answers 200 with `bytes` as they are (a watch: one JSON event per line).
    fn stream(self, bytes: Vec<u8>) {
        let response = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Body::from(bytes))
            .unwrap();
        self.reply.send_response(response);
    }

    /// Answers 201 with the request's own body, as the API server does on a create.
    fn created(self) {
        let body = self.body.clone();
        self.reply(StatusCode::CREATED, &body);
    }

    /// Answers 200 with `body`.
    fn ok(self, body: &Value) {
        self.reply(StatusCode::OK, body);
    }

    /// Answers 404 as the API server does.
    fn not_found(self, name: &str) {
        self.reply(
            StatusCode::NOT_FOUND,
            &json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("\"{name}\" not found"), "reason": "NotFound", "code": 404
            }),
        );
    }

    /// Answers 409 as the API server does on a stale resourceVersion.
    fn conflict(self, name: &str) {
        self.reply(
            StatusCode::CONFLICT,
            &json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("Operation cannot be fulfilled on leases \"{name}\": the object has been modified"),
                "reason": "Conflict", "code": 409
            }),
        );
    }
}

// ----- SecurityGroup status and Events -----

const SG_PATH: &str = "/apis/kubesg.io/v1alpha1/namespaces/shop/securitygroups/web";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/shop/events?";
const INSTANCE: &str = "kubesg-operator-0";

/// The status write: server-side apply as the operator's field manager, forced.
fn status_apply() -> String {
    format!("{SG_PATH}/status?&force=true&fieldManager=kubesg-operator")
}

/// The body of a status apply carrying `status`.
fn applied(status: &Value) -> Value {
    json!({ "apiVersion": "kubesg.io/v1alpha1", "kind": "SecurityGroup", "status": status })
}

fn key() -> ObjectKey {
    ObjectKey::new("shop", "web")
}

fn t(second: i64) -> Timestamp {
    Timestamp::from_second(second).unwrap()
}

/// `shop/web` as the API server holds it, at `generation`, with `status`.
fn group_object(generation: i64, status: Option<Value>) -> Value {
    let mut sg = json!({
        "apiVersion": "kubesg.io/v1alpha1",
        "kind": "SecurityGroup",
        "metadata": {
            "name": "web", "namespace": "shop", "uid": "uid-web",
            "generation": generation, "resourceVersion": "100"
        },
        "spec": { "podSelector": { "matchLabels": { "app": "web" } } }
    });
    if let Some(status) = status {
        sg["status"] = status;
    }
    sg
}

fn report(generation: i64, accepted: Result<(), String>, nodes: &[&str]) -> GroupReport {
    GroupReport {
        generation,
        accepted,
        members: 3,
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
    }
}

fn acked(node_generations: &[(&str, i64)]) -> BTreeMap<String, NodeAcks> {
    node_generations
        .iter()
        .map(|(node, generation)| {
            (
                node.to_string(),
                NodeAcks {
                    programmed: [(key(), *generation)].into_iter().collect(),
                    nack: None,
                    connected: true,
                    unenforced: BTreeMap::new(),
                },
            )
        })
        .collect()
}

fn context(client: kube::Client) -> Context {
    Context::new(client, INSTANCE, Metrics::default())
}

/// Asserts an Event POSTed about `shop/web`, with its type, reason, action and note.
fn assert_event(call: &Call, type_: &str, reason: &str, action: &str, note: &str) {
    let e = &call.body;
    assert_eq!(e["apiVersion"], "events.k8s.io/v1", "{e}");
    assert_eq!(e["kind"], "Event", "{e}");
    assert_eq!(e["metadata"]["namespace"], "shop", "{e}");
    assert_eq!(e["type"], type_, "{e}");
    assert_eq!(e["reason"], reason, "{e}");
    assert_eq!(e["action"], action, "{e}");
    assert_eq!(e["note"], note, "{e}");
    assert_eq!(e["reportingController"], status_api::CONTROLLER, "{e}");
    assert_eq!(e["reportingInstance"], INSTANCE, "{e}");
    assert_eq!(
        e["regarding"],
        json!({
            "apiVersion": "kubesg.io/v1alpha1", "kind": "SecurityGroup",
            "name": "web", "namespace": "shop", "uid": "uid-web"
        }),
        "{e}"
    );
    assert!(e["eventTime"].is_string(), "{e}");
}

#[tokio::test]
async fn valid_group_status_reports_members_nodes_and_programmed_per_acks() {
    let (client, mut api) = ApiServer::client();
    let mut ctx = context(client);
    // Two nodes concern the group; only n1 acked generation 2.
    let op = tokio::spawn(async move {
        let r = report(2, Ok(()), &["n1", "n2"]);
        let first = write_status(&mut ctx, &key(), &r, &acked(&[("n1", 2)]), t(1_000)).await;
        let second = write_status(
            &mut ctx,
            &key(),
            &r,
            &acked(&[("n1", 2), ("n2", 2)]),
            t(2_000),
        )
        .await;
        (first.unwrap(), second.unwrap())
    });

    api.expect(Method::GET, SG_PATH)
        .await
        .ok(&group_object(2, None));
    let patch = api.expect(Method::PATCH, &status_apply()).await;
    let pending = json!({
        "observedGeneration": 2,
        "members": 3,
        "conditions": [
            {
                "type": "Accepted", "status": "True", "reason": "Valid",
                "message": "the spec is valid", "observedGeneration": 2,
                "lastTransitionTime": "1970-01-01T00:16:40Z"
            },
            {
                "type": "Programmed", "status": "False", "reason": "Pending",
                "message": "1/2 nodes enforce generation 2; waiting for n2 (agent not connected)",
                "observedGeneration": 2, "lastTransitionTime": "1970-01-01T00:16:40Z"
            }
        ],
        "nodes": { "programmed": 1, "total": 2 }
    });
    assert_eq!(patch.body, applied(&pending));
    patch.ok(&group_object(2, Some(pending)));

    // n2 acks: Programmed turns True (its transition time moves, Accepted's does not), and a
    // Normal Event says so.
    let patch = api.expect(Method::PATCH, &status_apply()).await;
    let programmed = json!({
        "observedGeneration": 2,
        "members": 3,
        "conditions": [
            {
                "type": "Accepted", "status": "True", "reason": "Valid",
                "message": "the spec is valid", "observedGeneration": 2,
                "lastTransitionTime": "1970-01-01T00:16:40Z"
            },
            {
                "type": "Programmed", "status": "True", "reason": "Programmed",
                "message": "all 2 nodes enforce generation 2",
                "observedGeneration": 2, "lastTransitionTime": "1970-01-01T00:33:20Z"
            }
        ],
        "nodes": { "programmed": 2, "total": 2 }
    });
    assert_eq!(patch.body, applied(&programmed));
    patch.ok(&group_object(2, Some(programmed)));
    let event = api.expect(Method::POST, EVENTS_PATH).await;
    assert_event(
        &event,
        "Normal",
        "Programmed",
        "Program",
        "all 2 nodes enforce generation 2",
    );
    event.created();

    assert_eq!(
        op.await.unwrap(),
        (Outcome::Written, Outcome::Written),
        "both statuses written"
    );
    api.expect_nothing().await;
}

#[tokio::test]
async fn invalid_group_is_not_accepted_and_warned_once_per_generation() {
    let (client, mut api) = ApiServer::client();
    let mut ctx = context(client);
    let why = "spec.ingress[0].ports[0]: endPort 80 < port 90";
    let op = tokio::spawn(async move {
        let r = report(4, Err(why.into()), &["n1"]);
        let mut outcomes = vec![
            write_status(&mut ctx, &key(), &r, &BTreeMap::new(), t(1_000))
                .await
                .unwrap(),
        ];
        // The same generation again (e.g. an agent acked something): no write, no second
        // Warning.
        outcomes.push(
            write_status(&mut ctx, &key(), &r, &acked(&[("n1", 3)]), t(1_500))
                .await
                .unwrap(),
        );
        // A new generation, still invalid: a new Warning.
        let r = report(5, Err("spec.egress[0]: two peer kinds".into()), &["n1"]);
        outcomes.push(
            write_status(&mut ctx, &key(), &r, &BTreeMap::new(), t(2_000))
                .await
                .unwrap(),
        );
        outcomes
    });

    api.expect(Method::GET, SG_PATH)
        .await
        .ok(&group_object(4, None));
    let patch = api.expect(Method::PATCH, &status_apply()).await;
    let status = &patch.body["status"];
    assert_eq!(status["observedGeneration"], 4);
    assert_eq!(
        status["conditions"][0],
        json!({
            "type": "Accepted", "status": "False", "reason": "Invalid", "message": why,
            "observedGeneration": 4, "lastTransitionTime": "1970-01-01T00:16:40Z"
        })
    );
    assert_eq!(status["conditions"][1]["type"], "Programmed");
    assert_eq!(status["conditions"][1]["status"], "False");
    assert_eq!(status["conditions"][1]["reason"], "Invalid");
    let written = status.clone();
    patch.ok(&group_object(4, Some(written)));
    let event = api.expect(Method::POST, EVENTS_PATH).await;
    assert_event(&event, "Warning", "InvalidSpec", "Validate", why);
    event.created();

    // Generation 5.
    let patch = api.expect(Method::PATCH, &status_apply()).await;
    assert_eq!(patch.body["status"]["observedGeneration"], 5);
    assert_eq!(
        patch.body["status"]["conditions"][0]["message"],
        "spec.egress[0]: two peer kinds"
    );
    assert_eq!(
        patch.body["status"]["conditions"][0]["lastTransitionTime"], "1970-01-01T00:16:40Z",
        "still False: the transition time stays"
    );
    let written = patch.body["status"].clone();
    patch.ok(&group_object(5, Some(written)));
    let event = api.expect(Method::POST, EVENTS_PATH).await;
    assert_event(
        &event,
        "Warning",
        "InvalidSpec",
        "Validate",
        "spec.egress[0]: two peer kinds",
    );
    event.created();

    assert_eq!(
        op.await.unwrap(),
        vec![Outcome::Written, Outcome::Unchanged, Outcome::Written]
    );
    api.expect_nothing().await;
}

#[tokio::test]
async fn a_node_refusing_the_group_is_warned_with_the_agents_reason_once() {
    let (client, mut api) = ApiServer::client();
    let mut ctx = context(client);
    let refused = |reason: &str| {
        let mut acks = acked(&[("n1", 3), ("n2", 2)]);
        if let Some(n2) = acks.get_mut("n2") {
            n2.nack = Some(reason.into());
        }
        acks
    };
    let op = tokio::spawn(async move {
        let r = report(3, Ok(()), &["n1", "n2"]);
        let mut outcomes = Vec::new();
        for (acks, at) in [
            (refused("egress rules need 129 classes"), 1_000),
            // The same refusal again (n2 answered the next version alike): no second Warning.
            (refused("egress rules need 129 classes"), 1_500),
            // Another reason: news.
            (refused("conntrack table full"), 2_000),
        ] {
            outcomes.push(
                write_status(&mut ctx, &key(), &r, &acks, t(at))
                    .await
                    .unwrap(),
            );
        }
        outcomes
    });

    api.expect(Method::GET, SG_PATH)
        .await
        .ok(&group_object(3, None));
    for why in ["egress rules need 129 classes", "conntrack table full"] {
        let message = format!("1/2 nodes enforce generation 3; refused by n2 ({why})");
        let patch = api.expect(Method::PATCH, &status_apply()).await;
        let programmed = &patch.body["status"]["conditions"][1];
        assert_eq!(programmed["status"], "False", "{programmed}");
        assert_eq!(programmed["reason"], "Refused", "{programmed}");
        assert_eq!(programmed["message"], message.as_str(), "{programmed}");
        let written = patch.body["status"].clone();
        patch.ok(&group_object(3, Some(written)));
        let event = api.expect(Method::POST, EVENTS_PATH).await;
        assert_event(&event, "Warning", "ProgrammingRefused", "Program", &message);
        event.created();
    }
    assert_eq!(
        op.await.unwrap(),
        vec![Outcome::Written, Outcome::Unchanged, Outcome::Written]
    );
    api.expect_nothing().await;
}

#[tokio::test]
async fn status_already_on_the_object_is_not_written_again() {
    let (client, mut api) = ApiServer::client();
    let mut ctx = context(client);
    let r = report(2, Ok(()), &["n1"]);
    let acks = acked(&[("n1", 2)]);
    // What an earlier run (or the previous leader) wrote at t=1000.
    let existing = group_status(&key(), &r, &acks, None, t(1_000));
    let existing_json = serde_json::to_value(&existing).unwrap();
    let op = tokio::spawn(async move {
        let first = write_status(&mut ctx, &key(), &r, &acks, t(5_000))
            .await
            .unwrap();
        let again = write_status(&mut ctx, &key(), &r, &acks, t(6_000))
            .await
            .unwrap();
        (first, again)
    });
    api.expect(Method::GET, SG_PATH)
        .await
        .ok(&group_object(2, Some(existing_json)));
    // No PATCH, and no Programmed Event: the object already says Programmed for generation 2.
    api.expect_nothing().await;
    assert_eq!(op.await.unwrap(), (Outcome::Unchanged, Outcome::Unchanged));
}

#[tokio::test]
async fn deleted_group_is_forgotten_without_finalizers_or_further_writes() {
    let (client, mut api) = ApiServer::client();
    let push = PushServer::new(PushSettings::default());
    let mut writer = StatusWriter::new(context(client), push);
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<&str>();
    let op = tokio::spawn(async move {
        writer
            .take(vec![ReportUpdate {
                key: key(),
                report: Some(report(1, Ok(()), &["n1"])),
            }])
            .await;
        writer.write_dirty(|| false).await;
        done_tx.send("written").unwrap();
        writer
            .take(vec![ReportUpdate {
                key: key(),
                report: None,
            }])
            .await;
        // Acks moving, and another pass: nothing to write for a deleted group.
        writer.refresh_acks();
        writer.write_dirty(|| false).await;
        done_tx.send("deleted").unwrap();
        // Recreated under the same name, then deleted before its status was written: the read
        // finds nothing, so nothing is written.
        writer
            .take(vec![ReportUpdate {
                key: key(),
                report: Some(report(1, Ok(()), &["n1"])),
            }])
            .await;
        writer.write_dirty(|| false).await;
    });

    api.expect(Method::GET, SG_PATH)
        .await
        .ok(&group_object(1, None));
    let patch = api.expect(Method::PATCH, &status_apply()).await;
    // Only the status (and the type apply needs): no finalizer, no metadata at all.
    assert_eq!(
        patch.body.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["apiVersion", "kind", "status"]
    );
    let written = patch.body["status"].clone();
    patch.ok(&group_object(1, Some(written)));
    assert_eq!(done.recv().await, Some("written"));
    assert_eq!(done.recv().await, Some("deleted"));
    api.expect(Method::GET, SG_PATH).await.not_found("web");
    api.expect_nothing().await;
    op.await.unwrap();
}

// ----- leader election -----

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kubesg/leases/kubesg-operator";
const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kubesg/leases?";

fn elector(client: kube::Client) -> Elector {
    Elector::new(client, LeaseSettings::new("kubesg", "operator-a"))
}

/// The lease as the API server holds it.
fn lease(holder: Option<&str>, renew: &str, transitions: i32, resource_version: &str) -> Value {
    let mut spec = json!({
        "leaseDurationSeconds": 15,
        "acquireTime": "2024-01-01T00:00:00.000000Z",
        "renewTime": renew,
        "leaseTransitions": transitions,
    });
    if let Some(h) = holder {
        spec["holderIdentity"] = json!(h);
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "kubesg-operator", "namespace": "kubesg",
            "resourceVersion": resource_version
        },
        "spec": spec,
    })
}

/// Asserts a MicroTime (RFC 3339 with microseconds) and returns it.
fn micro_time(v: &Value) -> String {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    s.parse::<Timestamp>()
        .unwrap_or_else(|e| panic!("{s}: {e}"));
    s.to_owned()
}

/// Runs one election step in the background.
fn step(mut e: Elector) -> tokio::task::JoinHandle<(Elector, bool)> {
    tokio::spawn(async move {
        let held = e.try_acquire_or_renew().await.unwrap();
        (e, held)
    })
}

#[tokio::test]
async fn absent_lease_is_created_and_then_renewed_by_its_holder() {
    let (client, mut api) = ApiServer::client();
    let op = step(elector(client));
    api.expect(Method::GET, LEASE_PATH)
        .await
        .not_found("kubesg-operator");
    let create = api.expect(Method::POST, LEASES_PATH).await;
    let spec = &create.body["spec"];
    assert_eq!(create.body["metadata"]["name"], "kubesg-operator");
    assert_eq!(spec["holderIdentity"], "operator-a");
    assert_eq!(spec["leaseDurationSeconds"], 15);
    assert_eq!(spec["leaseTransitions"], 0);
    assert_eq!(
        micro_time(&spec["acquireTime"]),
        micro_time(&spec["renewTime"])
    );
    let mut created = create.body.clone();
    created["metadata"]["resourceVersion"] = json!("1");
    // The server's clock: an old renewal, so the renewal below must move it.
    created["spec"]["renewTime"] = json!("2024-01-01T00:00:00.000000Z");
    let acquired = created["spec"]["acquireTime"].clone();
    create.reply(StatusCode::CREATED, &created);
    let (e, held) = op.await.unwrap();
    assert!(held, "the creator holds the lease");
    assert!(e.holds());

    // Renewing: a replace of the object it holds (no read), with its resourceVersion.
    let op = step(e);
    let renew = api.expect(Method::PUT, &format!("{LEASE_PATH}?")).await;
    assert_eq!(renew.body["metadata"]["resourceVersion"], "1");
    assert_eq!(renew.body["spec"]["holderIdentity"], "operator-a");
    assert_eq!(renew.body["spec"]["leaseTransitions"], 0);
    assert_eq!(
        renew.body["spec"]["acquireTime"], acquired,
        "still the same term"
    );
    assert_ne!(
        micro_time(&renew.body["spec"]["renewTime"]),
        "2024-01-01T00:00:00.000000Z"
    );
    let mut renewed = renew.body.clone();
    renewed["metadata"]["resourceVersion"] = json!("2");
    renew.ok(&renewed);
    let (e, held) = op.await.unwrap();
    assert!(held);

    // Released on shutdown: no holder, one second, so the next replica need not wait.
    let op = tokio::spawn(async move {
        let mut e = e;
        e.release().await.unwrap();
        e
    });
    let release = api.expect(Method::PUT, &format!("{LEASE_PATH}?")).await;
    assert_eq!(release.body["metadata"]["resourceVersion"], "2");
    assert!(
        release.body["spec"].get("holderIdentity").is_none(),
        "{}",
        release.body
    );
    assert_eq!(release.body["spec"]["leaseDurationSeconds"], 1);
    let released = release.body.clone();
    release.ok(&released);
    let e = op.await.unwrap();
    assert!(!e.holds());
    api.expect_nothing().await;
}

#[tokio::test(start_paused = true)]
async fn lease_held_by_another_is_left_alone_until_it_expires_then_taken_over() {
    let (client, mut api) = ApiServer::client();
    let held_by_b = lease(Some("operator-b"), "2024-01-01T00:00:01.000000Z", 3, "7");

    // First look: held by operator-b; not taken.
    let op = step(elector(client));
    api.expect(Method::GET, LEASE_PATH).await.ok(&held_by_b);
    let (e, held) = op.await.unwrap();
    assert!(!held);
    assert!(e.held_by_other());
    api.expect_nothing().await;

    // 10 s later operator-b has renewed: still not taken.
    tokio::time::advance(Duration::from_secs(10)).await;
    let renewed_by_b = lease(Some("operator-b"), "2024-01-01T00:00:11.000000Z", 3, "8");
    let op = step(e);
    api.expect(Method::GET, LEASE_PATH).await.ok(&renewed_by_b);
    let (e, held) = op.await.unwrap();
    assert!(!held);
    api.expect_nothing().await;

    // 10 s after that renewal, unchanged: not expired yet (15 s).
    tokio::time::advance(Duration::from_secs(10)).await;
    let op = step(e);
    api.expect(Method::GET, LEASE_PATH).await.ok(&renewed_by_b);
    let (e, held) = op.await.unwrap();
    assert!(!held);
    api.expect_nothing().await;

    // 16 s after the last change seen: expired, taken over with the resourceVersion read.
    tokio::time::advance(Duration::from_secs(6)).await;
    let op = step(e);
    api.expect(Method::GET, LEASE_PATH).await.ok(&renewed_by_b);
    let take = api.expect(Method::PUT, &format!("{LEASE_PATH}?")).await;
    assert_eq!(take.body["metadata"]["resourceVersion"], "8");
    let spec = &take.body["spec"];
    assert_eq!(spec["holderIdentity"], "operator-a");
    assert_eq!(spec["leaseTransitions"], 4);
    assert_eq!(spec["leaseDurationSeconds"], 15);
    assert_eq!(
        micro_time(&spec["acquireTime"]),
        micro_time(&spec["renewTime"])
    );
    let mut taken = take.body.clone();
    taken["metadata"]["resourceVersion"] = json!("9");
    take.ok(&taken);
    let (e, held) = op.await.unwrap();
    assert!(held);
    assert!(e.holds());
}

#[tokio::test(start_paused = true)]
async fn a_takeover_that_loses_the_race_does_not_lead() {
    let (client, mut api) = ApiServer::client();
    // A released lease is free: taken at once, but another replica wrote first.
    let op = step(elector(client));
    api.expect(Method::GET, LEASE_PATH).await.ok(&lease(
        None,
        "2024-01-01T00:00:01.000000Z",
        2,
        "7",
    ));
    let take = api.expect(Method::PUT, &format!("{LEASE_PATH}?")).await;
    assert_eq!(take.body["metadata"]["resourceVersion"], "7");
    assert_eq!(take.body["spec"]["holderIdentity"], "operator-a");
    take.conflict("kubesg-operator");
    let (e, held) = op.await.unwrap();
    assert!(!held, "a 409 means another replica won");
    assert!(!e.holds());
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_reads_another_holder_steps_down() {
    let (client, mut api) = ApiServer::client();
    let (leading_tx, mut leading) = watch::channel(false);
    let stop = CancellationToken::new();
    let run = tokio::spawn(leader::run(elector(client), leading_tx, stop.clone()));

    api.expect(Method::GET, LEASE_PATH)
        .await
        .not_found("kubesg-operator");
    let create = api.expect(Method::POST, LEASES_PATH).await;
    let mut created = create.body.clone();
    created["metadata"]["resourceVersion"] = json!("1");
    create.reply(StatusCode::CREATED, &created);
    leading.wait_for(|l| *l).await.unwrap();

    // The next renewal (2 s later) conflicts: operator-b took the lease over meanwhile.
    let renew = api.expect(Method::PUT, &format!("{LEASE_PATH}?")).await;
    renew.conflict("kubesg-operator");
    api.expect(Method::GET, LEASE_PATH).await.ok(&lease(
        Some("operator-b"),
        "2024-01-01T00:00:01.000000Z",
        1,
        "5",
    ));
    leading.wait_for(|l| !*l).await.unwrap();

    stop.cancel();
    let e = run.await.unwrap();
    assert!(e.held_by_other());
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewals_hang_steps_down_before_the_lease_expires() {
    let (client, mut api) = ApiServer::client();
    let (leading_tx, mut leading) = watch::channel(false);
    let stop = CancellationToken::new();
    let settings = LeaseSettings::new("kubesg", "operator-a");
    let (deadline, duration) = (settings.renew_deadline, settings.duration);
    let run = tokio::spawn(leader::run(
        Elector::new(client, settings),
        leading_tx,
        stop.clone(),
    ));
    api.expect(Method::GET, LEASE_PATH)
        .await
        .not_found("kubesg-operator");
    let create = api.expect(Method::POST, LEASES_PATH).await;
    let mut created = create.body.clone();
    created["metadata"]["resourceVersion"] = json!("1");
    create.reply(StatusCode::CREATED, &created);
    leading.wait_for(|l| *l).await.unwrap();
    let acquired = tokio::time::Instant::now();

    // The API server stops answering: every renewal hangs.
    let mut hung = Vec::new();
    let stepped_down = loop {
        tokio::select! {
            call = api.next() => {
                assert_eq!(call.method, Method::PUT, "{}", call.uri);
                hung.push(call.reply);
            }
            _ = leading.wait_for(|l| !*l) => break tokio::time::Instant::now(),
        }
    };
    assert!(
        stepped_down - acquired >= deadline - Duration::from_millis(1),
        "not before the renew deadline"
    );
    assert!(
        stepped_down - acquired < duration,
        "before anyone else may take the lease over"
    );
    stop.cancel();
    run.await.unwrap();
}

// ----- the whole operator in API mode, with leader election -----

/// A fake API server for a whole operator: answers the watchers' lists (namespaces, nodes, pods
/// and services empty, one SecurityGroup `shop/web`), holds their watches open, serves the Lease as the
/// test says, and records every other request.
struct FakeCluster {
    /// The Lease as the API server holds it; `None`: absent.
    lease: std::sync::Mutex<Option<Value>>,
    /// Every request other than lists and watches: (method, path and query, body).
    writes: std::sync::Mutex<Vec<(Method, String, Value)>>,
}

impl FakeCluster {
    fn recorded(&self) -> Vec<(Method, String, Value)> {
        self.writes.lock().unwrap().clone()
    }

    fn lease_requests(&self) -> usize {
        self.recorded()
            .iter()
            .filter(|(_, uri, _)| uri.starts_with(LEASE_PATH))
            .count()
    }

    async fn serve(self: std::sync::Arc<Self>, mut api: ApiServer) {
        let mut watches = Vec::new();
        loop {
            let call = api.next().await;
            let path = call.uri.split('?').next().unwrap_or_default().to_owned();
            if call.method == Method::GET && call.uri.contains("watch=true") {
                // A watch that stays open (no events).
                watches.push(call.reply);
                continue;
            }
            let list = |kind: &str, items: Value| {
                json!({
                    "apiVersion": "v1", "kind": kind,
                    "metadata": { "resourceVersion": "10" }, "items": items
                })
            };
            match (call.method.clone(), path.as_str()) {
                (Method::GET, "/api/v1/namespaces") => call.ok(&list("NamespaceList", json!([]))),
                (Method::GET, "/api/v1/nodes") => call.ok(&list("NodeList", json!([]))),
                (Method::GET, "/api/v1/pods") => call.ok(&list("PodList", json!([]))),
                (Method::GET, "/api/v1/services") => call.ok(&list("ServiceList", json!([]))),
                (Method::GET, "/apis/networking.k8s.io/v1/networkpolicies") => {
                    let mut l = list("NetworkPolicyList", json!([]));
                    l["apiVersion"] = json!("networking.k8s.io/v1");
                    call.ok(&l)
                }
                (Method::GET, "/apis/kubesg.io/v1alpha1/securitygroups") => {
                    let mut l = list("SecurityGroupList", json!([group_object(1, None)]));
                    l["apiVersion"] = json!("kubesg.io/v1alpha1");
                    call.ok(&l)
                }
                (method, _) => {
                    self.writes.lock().unwrap().push((
                        method.clone(),
                        call.uri.clone(),
                        call.body.clone(),
                    ));
                    if path == LEASE_PATH && method == Method::GET {
                        match self.lease.lock().unwrap().clone() {
                            Some(l) => call.ok(&l),
                            None => call.not_found("kubesg-operator"),
                        }
                    } else if path == LEASE_PATH && method == Method::PUT {
                        let mut l = call.body.clone();
                        l["metadata"]["resourceVersion"] = json!("20");
                        *self.lease.lock().unwrap() = Some(l.clone());
                        call.ok(&l)
                    } else if path == SG_PATH && method == Method::GET {
                        call.ok(&group_object(1, None))
                    } else {
                        let body = call.body.clone();
                        call.ok(&body)
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_serves_agents_and_writes_status() {
    use kubesg_operator::daemon::{Operator, OperatorSettings, Source};

    let pki = kubesg_testkit::certs::TempPki::generate().unwrap();
    let (client, api) = ApiServer::client();
    let cluster = std::sync::Arc::new(FakeCluster {
        lease: std::sync::Mutex::new(Some(lease(
            Some("operator-b"),
            "2024-01-01T00:00:01.000000Z",
            1,
            "7",
        ))),
        writes: std::sync::Mutex::new(Vec::new()),
    });
    let server = tokio::spawn(cluster.clone().serve(api));
    let mut election = LeaseSettings::new("kubesg", "operator-a");
    election.retry_period = Duration::from_millis(50);
    let mut operator = Operator::start(OperatorSettings {
        source: Source::Api {
            client,
            election: Some(election),
            instance: "operator-a".into(),
            agent_tokens: kubesg_operator::node_identity::AgentTokens {
                audience: "kubesg-operator".into(),
                namespace: "kubesg".into(),
                service_account: "kubesg-agent".into(),
            },
        },
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: pki.operator_tls(&pki.operator),
        metrics_address: None,
        push: PushSettings::default(),
        tls_poll: Duration::from_secs(10),
        network_policies: kubesg_operator::netpol::Mode::Enforce,
    })
    .await
    .unwrap();

    // operator-b holds the lease (and keeps it fresh: the record is re-read within its 15 s):
    // operator-a compiles but neither serves nor writes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while cluster.lease_requests() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease is not polled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cluster
            .recorded()
            .iter()
            .all(|(method, uri, _)| *method == Method::GET && uri.starts_with(LEASE_PATH)),
        "a follower only reads the lease: {:?}",
        cluster.recorded()
    );
    assert!(!operator.metrics().ready(), "a follower is not ready");
    let serving = tokio::time::timeout(QUIET, operator.serving_address()).await;
    assert!(serving.is_err(), "a follower does not serve agents");

    // operator-b releases the lease: operator-a takes it, serves and writes the status.
    *cluster.lease.lock().unwrap() = Some(lease(None, "2024-01-01T00:00:02.000000Z", 1, "8"));
    let addr = tokio::time::timeout(WAIT, operator.serving_address())
        .await
        .expect("the leader serves agents")
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let writes = cluster.recorded();
        let patched = writes
            .iter()
            .any(|(m, uri, _)| *m == Method::PATCH && uri == &status_apply());
        if patched && operator.metrics().ready() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never wrote the status: {writes:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took_over = cluster
        .recorded()
        .into_iter()
        .find(|(m, _, _)| *m == Method::PUT)
        .expect("the lease was written");
    assert_eq!(took_over.2["spec"]["holderIdentity"], "operator-a");
    assert_eq!(took_over.2["metadata"]["resourceVersion"], "8");

    // Shutdown: the lease is released last.
    operator.stop().await.unwrap();
    let (method, uri, body) = cluster.recorded().pop().unwrap();
    assert_eq!((method, uri), (Method::PUT, format!("{LEASE_PATH}?")));
    assert!(body["spec"].get("holderIdentity").is_none(), "{body}");
    server.abort();
}

// ----- the API source -----

/// A namespace object at `resource_version`.
fn namespace_object(name: &str, resource_version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": name, "resourceVersion": resource_version, "labels": { "team": name } }
    })
}

/// A list of `kind` at `resource_version`.
fn list_of(api_version: &str, kind: &str, resource_version: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": api_version, "kind": format!("{kind}List"),
        "metadata": { "resourceVersion": resource_version }, "items": items
    })
}

/// A watch response body: one event per line.
fn watch_body(events: &[(&str, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (type_, object) in events {
        out.extend(serde_json::to_vec(&json!({ "type": type_, "object": object })).unwrap());
        out.push(b'\n');
    }
    out
}

/// The pods of the first pod list: running with two addresses and named ports, on the host's
/// network, and finished.
fn pod_items() -> Vec<Value> {
    let pod = |name: &str, spec: Value, status: Value| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                          "labels": { "app": name }, "resourceVersion": "3" },
            "spec": spec, "status": status
        })
    };
    vec![
        pod(
            "web-0",
            json!({ "nodeName": "n1", "containers": [ { "name": "c", "ports": [
                { "name": "http", "containerPort": 8080 },
                { "name": "dns", "containerPort": 53, "protocol": "UDP" },
                { "containerPort": 9000 } ] } ] }),
            json!({ "phase": "Running", "podIP": "10.0.0.5",
                    "podIPs": [ { "ip": "10.0.0.5" }, { "ip": "fd00::5" } ] }),
        ),
        pod(
            "agent",
            json!({ "nodeName": "n1", "hostNetwork": true, "containers": [ { "name": "c" } ] }),
            json!({ "phase": "Running", "podIP": "192.168.0.1" }),
        ),
        pod(
            "job",
            json!({ "nodeName": "n1", "containers": [ { "name": "c" } ] }),
            json!({ "phase": "Succeeded" }),
        ),
    ]
}

/// The Services of the first service list: dual-stack with a named target port, headless, and
/// ExternalName.
fn service_items() -> Vec<Value> {
    let service = |name: &str, spec: Value| {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": "shop", "resourceVersion": "6" },
            "spec": spec
        })
    };
    vec![
        service(
            "web",
            json!({ "selector": { "app": "web-0" }, "clusterIP": "10.96.0.5",
                    "clusterIPs": [ "10.96.0.5", "fd00:96::5" ], "ipFamilies": [ "IPv4", "IPv6" ],
                    "ports": [ { "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" },
                               { "name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP" } ] }),
        ),
        service(
            "db",
            json!({ "selector": { "app": "db" }, "clusterIP": "None", "clusterIPs": [ "None" ],
                    "ports": [ { "port": 5432, "targetPort": 5432 } ] }),
        ),
        service(
            "ext",
            json!({ "type": "ExternalName", "externalName": "db.example.com" }),
        ),
    ]
}

#[tokio::test]
async fn the_api_source_follows_lists_and_watches_and_catches_up_deletes_missed_before_a_relist() {
    let (client, mut api) = ApiServer::client();
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let source = tokio::spawn(kube_source::run(
        client,
        kubesg_operator::netpol::Mode::Enforce,
        tx,
    ));

    // Namespaces: listed (shop, old); a watch adds `new` and deletes `shop`, then ends; the next
    // watch has expired (410); the relist finds `new` only: `old` went while nobody watched.
    // The other kinds are listed once and then watched quietly.
    let mut held = Vec::new();
    let (mut lists, mut watches) = (0, 0);
    while lists < 2 || watches < 3 {
        let call = api.next().await;
        let (path, query) = call.uri.split_once('?').unwrap_or((call.uri.as_str(), ""));
        let watching = query.contains("watch=true");
        match (path, watching) {
            ("/api/v1/namespaces", false) => {
                lists += 1;
                let items = if lists == 1 {
                    vec![namespace_object("shop", "1"), namespace_object("old", "2")]
                } else {
                    vec![namespace_object("new", "11")]
                };
                let rv = if lists == 1 { "10" } else { "20" };
                call.ok(&list_of("v1", "Namespace", rv, items));
            }
            ("/api/v1/namespaces", true) => {
                watches += 1;
                match watches {
                    1 => call.stream(watch_body(&[
                        ("ADDED", namespace_object("new", "11")),
                        ("DELETED", namespace_object("shop", "12")),
                    ])),
                    2 => call.stream(watch_body(&[(
                        "ERROR",
                        json!({ "kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "reason": "Expired", "code": 410,
                                "message": "too old resource version: 12 (15)" }),
                    )])),
                    _ => held.push(call),
                }
            }
            ("/api/v1/nodes", false) => {
                let node = json!({ "apiVersion": "v1", "kind": "Node",
                                   "metadata": { "name": "n1", "resourceVersion": "4" } });
                call.ok(&list_of("v1", "Node", "4", vec![node]));
            }
            ("/api/v1/pods", false) => call.ok(&list_of("v1", "Pod", "3", pod_items())),
            ("/api/v1/services", false) => call.ok(&list_of("v1", "Service", "6", service_items())),
            ("/apis/kubesg.io/v1alpha1/securitygroups", false) => {
                // One group this version reads, one it cannot (the CRD's int-or-string port
                // admits 2^32): the list must not fail for both.
                let group = |name: &str, port: Value| {
                    json!({
                        "apiVersion": "kubesg.io/v1alpha1", "kind": "SecurityGroup",
                        "metadata": { "name": name, "namespace": "shop", "generation": 1,
                                      "resourceVersion": "5" },
                        "spec": { "podSelector": { "matchLabels": { "app": name } },
                                  "ingress": [{ "ports": [{ "port": port }] }] }
                    })
                };
                let items = vec![
                    group("web", json!(8080)),
                    group("broken", json!(4_294_967_296_u64)),
                ];
                call.ok(&list_of("kubesg.io/v1alpha1", "SecurityGroup", "5", items))
            }
            ("/apis/networking.k8s.io/v1/networkpolicies", false) => {
                let policy = json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": { "name": "deny", "namespace": "shop", "generation": 2,
                                  "resourceVersion": "7" },
                    "spec": { "podSelector": {} }
                });
                call.ok(&list_of(
                    "networking.k8s.io/v1",
                    "NetworkPolicy",
                    "7",
                    vec![policy],
                ))
            }
            (_, true) => held.push(call),
            (other, false) => panic!("unexpected request {} {other}", call.method),
        }
    }

    // What the source reported, until the catch-up delete.
    let mut namespaces = Vec::new();
    let mut pods = BTreeMap::new();
    let mut services = BTreeMap::new();
    let mut groups = BTreeMap::new();
    let mut listed = Vec::new();
    while !namespaces.contains(&"delete old".to_owned()) {
        let event = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no catch-up delete; namespaces: {namespaces:?}"))
            .expect("the source runs");
        match event {
            SourceEvent::Listed(kind) => listed.push(kind),
            SourceEvent::Changes(changes) => {
                for change in changes {
                    match change {
                        ClusterChange::UpsertNamespace(n, ns) => {
                            assert_eq!(ns.labels.get("team"), Some(&n));
                            namespaces.push(format!("upsert {n}"));
                        }
                        ClusterChange::DeleteNamespace(n) => namespaces.push(format!("delete {n}")),
                        ClusterChange::UpsertPod(key, pod) => {
                            pods.insert(key.name, pod);
                        }
                        ClusterChange::UpsertService(key, service) => {
                            services.insert(key.name, service);
                        }
                        ClusterChange::UpsertGroup(key, group) => {
                            groups.insert(key, group);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    assert_eq!(
        namespaces,
        [
            "upsert shop",
            "upsert old",
            "upsert new",
            "delete shop",
            "upsert new",
            "delete old"
        ]
    );
    listed.sort_unstable();
    assert_eq!(
        listed,
        [
            "Namespace",
            "NetworkPolicy",
            "Node",
            "Pod",
            "SecurityGroup",
            "Service"
        ]
    );

    // Each SecurityGroup read on its own: the readable one as it is, the other reported as
    // unreadable at its field (its status will say so), neither failing the list.
    let web = &groups[&ObjectKey::new("shop", "web")];
    assert_eq!(web.unreadable, None);
    assert_eq!(web.spec.ingress.as_ref().map(Vec::len), Some(1));
    let broken = &groups[&ObjectKey::new("shop", "broken")];
    let why = broken
        .unreadable
        .as_ref()
        .expect("the broken group is unreadable");
    assert_eq!(why.path, "spec.ingress[0].ports[0].port");
    assert!(why.message.contains("4294967296"), "{why}");

    // A NetworkPolicy is a group of its own layer under its own key: this default deny
    // isolates ingress (policyTypes defaulted) and admits nothing.
    let deny = &groups[&kubesg_operator::netpol::key("shop", "deny")];
    assert!(deny.kind.is_network_policy());
    assert!(deny.kind.isolates(true) && !deny.kind.isolates(false));
    assert_eq!(deny.generation, 2);
    assert_eq!(deny.spec.ingress.as_ref().map(Vec::len), Some(0));

    // Services as the compiler needs them: ClusterIPs of both families, target ports; none for
    // headless and ExternalName Services.
    assert_eq!(
        services["web"],
        Service {
            selector: BTreeMap::from([("app".to_owned(), "web-0".to_owned())]),
            cluster_ips: vec!["10.96.0.5".parse().unwrap(), "fd00:96::5".parse().unwrap()],
            ports: vec![
                ServicePort {
                    protocol: PortProtocol::Tcp,
                    port: 80,
                    target_port: TargetPort::Name("http".into()),
                },
                ServicePort {
                    protocol: PortProtocol::Udp,
                    port: 53,
                    target_port: TargetPort::Number(53),
                },
            ],
        }
    );
    assert!(
        services["db"].cluster_ips.is_empty(),
        "{:?}",
        services["db"]
    );
    assert!(
        services["ext"].cluster_ips.is_empty(),
        "{:?}",
        services["ext"]
    );

    // Pods as the compiler needs them.
    let web = &pods["web-0"];
    assert_eq!(web.uid, "uid-web-0");
    assert_eq!(web.node.as_deref(), Some("n1"));
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web-0"));
    assert_eq!(
        web.ips,
        [
            "10.0.0.5".parse::<std::net::IpAddr>().unwrap(),
            "fd00::5".parse().unwrap()
        ]
    );
    assert_eq!(
        web.ports,
        [
            NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: PortProtocol::Tcp
            },
            NamedPort {
                name: "dns".into(),
                port: 53,
                protocol: PortProtocol::Udp
            },
        ],
        "unnamed ports are left out"
    );
    assert!(!web.host_network && !web.terminated);
    assert!(pods["agent"].host_network, "{:?}", pods["agent"]);
    assert!(
        pods["job"].terminated && pods["job"].ips.is_empty(),
        "{:?}",
        pods["job"]
    );

    source.abort();
    drop(held);
}
