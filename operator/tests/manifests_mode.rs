//! The whole operator in manifests mode, in process, against real agents' operator links over
//! mTLS on loopback (their sinks apply updates with the agent's own acceptance logic; no
//! datapath: the end-to-end tests in `tests/` add the CNI chain and eBPF). Manifests are written,
//! edited and deleted on disk; the agents must end up with what the compiler makes of the
//! directory, the rules must say what the SecurityGroups mean, and the status files must follow
//! the agents' acks. An operator restart must hand the agents exactly what they had. Not
//! privileged.

mod push_support;

use std::{fs, net::SocketAddr, path::Path, time::Duration};

use kubesg_agent::desired::DesiredState;
use kubesg_operator::{
    compile::compile,
    crd::SecurityGroupStatus,
    daemon::{Operator, OperatorSettings, Source},
    manifests::ManifestDir,
    model::ObjectKey,
    plan::{NodePlan, Plan},
    push::PushSettings,
    status_files::{read_status, status_path},
    tls::ServerTlsFiles,
};
use kubesg_testkit::certs::TempPki;
use push_support::{expected_state, wait_node, AgentSink, TestAgent, WAIT};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { team: shop } }
---
apiVersion: v1
kind: Node
metadata: { name: node-a }
---
apiVersion: v1
kind: Node
metadata: { name: node-b }
"#;

/// Members of `web` accept TCP 8080 from members of `lb`.
const SG_WEB: &str = r#"
apiVersion: kubesg.io/v1alpha1
kind: SecurityGroup
metadata: { name: web, namespace: shop }
spec:
  podSelector: { matchLabels: { app: web } }
  ingress:
    - protocol: TCP
      ports: [ { port: 8080 } ]
      from: [ { securityGroup: { name: lb } } ]
"#;

/// Members of `lb` accept TCP 443 from anywhere.
const SG_LB: &str = r#"
apiVersion: kubesg.io/v1alpha1
kind: SecurityGroup
metadata: { name: lb, namespace: shop }
spec:
  podSelector: { matchLabels: { app: lb } }
  ingress:
    - protocol: TCP
      ports: [ { port: 443 } ]
      from: [ { ipBlock: { cidr: 0.0.0.0/0 } } ]
"#;

/// Members of `db` accept TCP 5432 from members of `web`.
const SG_DB: &str = r#"
apiVersion: kubesg.io/v1alpha1
kind: SecurityGroup
metadata: { name: db, namespace: shop }
spec:
  podSelector: { matchLabels: { app: db } }
  ingress:
    - protocol: TCP
      ports: [ { port: 5432 } ]
      from: [ { securityGroup: { name: web } } ]
"#;

const WEB_0: &str = "10.0.0.10";
const LB_0: &str = "10.0.0.20";
const WEB_2: &str = "10.0.0.30";
const WEB_1: &str = "10.0.1.10";
const DB_0: &str = "10.0.1.20";

fn pod(name: &str, node: &str, app: &str, ip: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{ name: {name}, namespace: shop, uid: uid-{name}, labels: {{ app: {app} }} }}
spec:
  nodeName: {node}
  containers: [ {{ name: main, image: example }} ]
status:
  phase: Running
  podIPs: [ {{ ip: "{ip}" }} ]
"#
    )
}

/// Replaces `dir/name` atomically (the operator never reads half a file).
fn put(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The manifests, status and PKI directories of one test.
struct Cluster {
    pki: TempPki,
    manifests: tempfile::TempDir,
    statuses: tempfile::TempDir,
}

impl Cluster {
    /// web-0 and lb-0 on node-a, web-1 and db-0 on node-b; groups web, lb, db.
    fn new() -> Cluster {
        let c = Cluster {
            pki: TempPki::generate().unwrap(),
            manifests: tempfile::tempdir().unwrap(),
            statuses: tempfile::tempdir().unwrap(),
        };
        c.put("cluster.yaml", CLUSTER);
        c.put("sg-web.yaml", SG_WEB);
        c.put("sg-lb.yaml", SG_LB);
        c.put("sg-db.yaml", SG_DB);
        c.put("web-0.yaml", &pod("web-0", "node-a", "web", WEB_0));
        c.put("lb-0.yaml", &pod("lb-0", "node-a", "lb", LB_0));
        c.put("web-1.yaml", &pod("web-1", "node-b", "web", WEB_1));
        c.put("db-0.yaml", &pod("db-0", "node-b", "db", DB_0));
        c
    }

    fn put(&self, name: &str, text: &str) {
        put(self.manifests.path(), name, text);
    }

    async fn start(&self, listen: SocketAddr) -> (Operator, SocketAddr) {
        self.start_with(listen, self.pki.operator_tls(&self.pki.operator))
            .await
    }

    async fn start_with(&self, listen: SocketAddr, tls: ServerTlsFiles) -> (Operator, SocketAddr) {
        let mut operator = Operator::start(OperatorSettings {
            source: Source::Manifests {
                dir: self.manifests.path().into(),
                rescan: None,
                status_dir: Some(self.statuses.path().into()),
            },
            listen,
            tls,
            metrics_address: None,
            push: PushSettings::default(),
            tls_poll: Duration::from_millis(100),
            network_policies: kubesg_operator::netpol::Mode::Enforce,
        })
        .await
        .expect("the operator starts");
        let addr = tokio::time::timeout(WAIT, operator.serving_address())
            .await
            .expect("the operator serves agents")
            .expect("serving");
        (operator, addr)
    }

    fn agent(&self, node: &str, addr: SocketAddr) -> TestAgent {
        TestAgent::start(
            node,
            &format!("https://{addr}"),
            self.pki.agent_tls_for(node).unwrap(),
            AgentSink::new(),
        )
    }

    /// What the compiler makes of the directory now: the reference the agents must hold.
    fn expected_plan(&self) -> Plan {
        compile(
            &ManifestDir::new(self.manifests.path())
                .scan()
                .unwrap()
                .cluster,
        )
    }

    fn status(&self, name: &str) -> Option<SecurityGroupStatus> {
        read_status(&status_path(
            self.statuses.path(),
            &ObjectKey::new("shop", name),
        ))
    }
}

/// `Ok` when the agent holds exactly `plan`'s pods and policies.
fn holds(sink: &AgentSink, plan: &NodePlan) -> Result<(), String> {
    let state = sink.state();
    let expected = expected_state(plan, state.recheck_on_policy_change);
    if state.pods != expected.pods || state.policies != expected.policies {
        return Err(format!(
            "agent has pods {:?}, the plan {:?}",
            state.pods, expected.pods
        ));
    }
    Ok(())
}

/// `Ok` when the group's status file says Programmed (every concerned node acked) for
/// generation 1, with `members`.
fn programmed(c: &Cluster, name: &str, members: i32) -> Result<(), String> {
    let s = c
        .status(name)
        .ok_or_else(|| format!("no status file for {name}"))?;
    let cond = |t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| c.status.clone())
    };
    let nodes = s.nodes.unwrap_or_default();
    if s.observed_generation != Some(1)
        || s.members != members
        || cond("Accepted").as_deref() != Some("True")
        || cond("Programmed").as_deref() != Some("True")
        || nodes.programmed != nodes.total
    {
        return Err(format!("{name}: {s:?}"));
    }
    Ok(())
}

/// Waits until `check` passes.
async fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("never {what}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Waits until both agents hold what the compiler makes of the directory and every listed
/// group's status file says Programmed with its member count.
async fn converged(c: &Cluster, a: &TestAgent, b: &TestAgent, groups: &[(&str, i32)]) {
    eventually("converged", || {
        let plan = c.expected_plan();
        let empty = NodePlan::default();
        holds(&a.sink, plan.nodes.get("node-a").unwrap_or(&empty))?;
        holds(&b.sink, plan.nodes.get("node-b").unwrap_or(&empty))?;
        for (group, members) in groups {
            programmed(c, group, *members)?;
        }
        Ok(())
    })
    .await;
}

/// Whether `pod` (namespace shop) accepts a TCP connection to `port` from `from`, by the
/// agent's own rule evaluation.
fn accepts(state: &DesiredState, pod: &str, port: u16, from: &str) -> bool {
    let assignment = &state.pods[&("shop".to_owned(), pod.to_owned())];
    match &assignment.policy {
        None => true,
        Some(id) => state.policies[id]
            .ingress
            .iter()
            .any(|r| r.allows(6, port, from.parse().unwrap())),
    }
}

fn policy_of(state: &DesiredState, pod: &str) -> Option<String> {
    state.pods[&("shop".to_owned(), pod.to_owned())]
        .policy
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_reach_the_agents_and_edits_follow_with_statuses() {
    let c = Cluster::new();
    let (operator, addr) = c.start("127.0.0.1:0".parse().unwrap()).await;
    let a = c.agent("node-a", addr);
    let b = c.agent("node-b", addr);

    // Applied: what the groups say.
    converged(&c, &a, &b, &[("web", 2), ("lb", 1), ("db", 1)]).await;
    let (sa, sb) = (a.sink.state(), b.sink.state());
    assert!(accepts(&sa, "web-0", 8080, LB_0), "web accepts lb");
    assert!(!accepts(&sa, "web-0", 8080, DB_0), "web refuses db");
    assert!(
        !accepts(&sa, "web-0", 9090, LB_0),
        "web accepts lb on 8080 only"
    );
    assert!(
        accepts(&sa, "lb-0", 443, "192.0.2.1"),
        "lb accepts anyone on 443"
    );
    assert!(accepts(&sb, "db-0", 5432, WEB_0), "db accepts web-0");
    assert!(accepts(&sb, "db-0", 5432, WEB_1), "db accepts web-1");
    assert!(!accepts(&sb, "db-0", 5432, LB_0), "db refuses lb");

    // A label change: web-1 leaves the web group.
    c.put("web-1.yaml", &pod("web-1", "node-b", "batch", WEB_1));
    converged(&c, &a, &b, &[("web", 1), ("lb", 1), ("db", 1)]).await;
    let sb = b.sink.state();
    assert_eq!(policy_of(&sb, "web-1"), None, "web-1 is in no group");
    assert!(accepts(&sb, "db-0", 5432, WEB_0));
    assert!(!accepts(&sb, "db-0", 5432, WEB_1), "web-1 is no web member");

    // A group deleted: lb's members are in no group, and web accepts nobody.
    fs::remove_file(c.manifests.path().join("sg-lb.yaml")).unwrap();
    converged(&c, &a, &b, &[("web", 1), ("db", 1)]).await;
    eventually("the lb status file is removed", || match c.status("lb") {
        None => Ok(()),
        Some(s) => Err(format!("{s:?}")),
    })
    .await;
    let sa = a.sink.state();
    assert_eq!(policy_of(&sa, "lb-0"), None, "lb-0 is in no group");
    assert!(
        !accepts(&sa, "web-0", 8080, LB_0),
        "no lb group, no lb peers"
    );

    // A pod added: web-2 joins web, and db accepts it.
    c.put("web-2.yaml", &pod("web-2", "node-a", "web", WEB_2));
    converged(&c, &a, &b, &[("web", 2), ("db", 1)]).await;
    let (sa, sb) = (a.sink.state(), b.sink.state());
    assert!(policy_of(&sa, "web-2").is_some());
    assert_eq!(
        policy_of(&sa, "web-2"),
        policy_of(&sa, "web-0"),
        "one policy for both"
    );
    assert!(
        accepts(&sb, "db-0", 5432, WEB_2),
        "db accepts the new web pod"
    );

    operator.stop().await.expect("the operator stops cleanly");
}

/// Whether `pod` (namespace shop) may open a TCP connection to `to:port`, by the agent's own
/// rule evaluation.
fn sends(state: &DesiredState, pod: &str, port: u16, to: &str) -> bool {
    let assignment = &state.pods[&("shop".to_owned(), pod.to_owned())];
    match &assignment.policy {
        None => true,
        Some(id) => state.policies[id]
            .egress
            .iter()
            .any(|r| r.allows(6, port, to.parse().unwrap())),
    }
}

/// Members of `web` may open TCP 5432 to members of `db` only.
const SG_WEB_EGRESS: &str = r#"
apiVersion: kubesg.io/v1alpha1
kind: SecurityGroup
metadata: { name: web-out, namespace: shop }
spec:
  podSelector: { matchLabels: { app: web } }
  egress:
    - protocol: TCP
      ports: [ { port: 5432 } ]
      to: [ { securityGroup: { name: db } } ]
"#;

const DB_CLUSTER_IP: &str = "10.96.0.50";

/// Service `shop/db`: port 15432 of its ClusterIP sends to 5432 on the `tier: data` pods.
const SVC_DB: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  selector: { tier: data }
  clusterIP: 10.96.0.50
  clusterIPs: [ 10.96.0.50 ]
  ports: [ { port: 15432, targetPort: 5432 } ]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_in_the_directory_opens_its_cluster_ip_to_the_clients_of_its_pods() {
    let c = Cluster::new();
    // web itself allows no egress; web-out allows db on 5432.
    c.put("sg-web.yaml", &format!("{SG_WEB}  egress: []\n"));
    c.put("sg-web-egress.yaml", SG_WEB_EGRESS);
    let (operator, addr) = c.start("127.0.0.1:0".parse().unwrap()).await;
    let a = c.agent("node-a", addr);
    let b = c.agent("node-b", addr);
    converged(&c, &a, &b, &[("web", 2), ("web-out", 2), ("db", 1)]).await;
    assert!(
        sends(&a.sink.state(), "web-0", 5432, DB_0),
        "web may reach db"
    );
    assert!(!sends(&a.sink.state(), "web-0", 15432, DB_CLUSTER_IP));

    // The Service appears in front of db-0: its ClusterIP on its port is admitted as db-0 is.
    c.put(
        "db-0.yaml",
        &pod("db-0", "node-b", "db", DB_0).replace("app: db", "app: db, tier: data"),
    );
    c.put("svc-db.yaml", SVC_DB);
    converged(&c, &a, &b, &[("web", 2), ("web-out", 2), ("db", 1)]).await;
    let (sa, sb) = (a.sink.state(), b.sink.state());
    assert!(sends(&sa, "web-0", 15432, DB_CLUSTER_IP));
    assert!(sends(&sb, "web-1", 15432, DB_CLUSTER_IP));
    assert!(
        !sends(&sa, "web-0", 5432, DB_CLUSTER_IP),
        "only the Service port"
    );

    // A web pod labelled into the Service: it is no db member, and a connection to the
    // ClusterIP could land on it, so the ClusterIP is refused (db-0 itself is still admitted).
    let web_1 = pod("web-1", "node-b", "web", WEB_1);
    c.put(
        "web-1.yaml",
        &web_1.replace("app: web", "app: web, tier: data"),
    );
    converged(&c, &a, &b, &[("web", 2), ("web-out", 2), ("db", 1)]).await;
    let sa = a.sink.state();
    assert!(!sends(&sa, "web-0", 15432, DB_CLUSTER_IP));
    assert!(sends(&sa, "web-0", 5432, DB_0), "db-0 itself still");

    // Out of the Service again: every backend is a db member, the ClusterIP is admitted; the
    // Service deleted, nothing is left of it.
    c.put("web-1.yaml", &web_1);
    converged(&c, &a, &b, &[("web", 2), ("web-out", 2), ("db", 1)]).await;
    assert!(sends(&a.sink.state(), "web-0", 15432, DB_CLUSTER_IP));
    fs::remove_file(c.manifests.path().join("svc-db.yaml")).unwrap();
    converged(&c, &a, &b, &[("web", 2), ("web-out", 2), ("db", 1)]).await;
    assert!(!sends(&a.sink.state(), "web-0", 15432, DB_CLUSTER_IP));

    operator.stop().await.expect("the operator stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_hands_agents_exactly_what_they_had() {
    let c = Cluster::new();
    let (first, addr) = c.start("127.0.0.1:0".parse().unwrap()).await;
    let mut a = c.agent("node-a", addr);
    let mut b = c.agent("node-b", addr);
    converged(&c, &a, &b, &[("web", 2), ("lb", 1), ("db", 1)]).await;
    let before = [a.sink.state(), b.sink.state()];
    let received = [a.sink.received().len(), b.sink.received().len()];

    first.stop().await.expect("the operator stops cleanly");
    a.wait_status("disconnected", |s| !s.connected).await;
    b.wait_status("disconnected", |s| !s.connected).await;
    assert_eq!(
        [a.sink.state(), b.sink.state()],
        before,
        "without an operator the agents keep what they had"
    );

    // Same manifests, same address: the agents redial the new operator.
    let (second, again) = c.start(addr).await;
    assert_eq!(again, addr);
    for node in ["node-a", "node-b"] {
        wait_node(second.push(), node, "the snapshot acked", &mut |n| {
            n.up_to_date
        })
        .await;
    }
    for (i, sink) in [&a.sink, &b.sink].into_iter().enumerate() {
        let after = sink.received();
        assert_eq!(
            after.len(),
            received[i] + 1,
            "one update after the restart, not a partial cluster first: {after:?}"
        );
        let last = &after[received[i]];
        assert!(last.snapshot && last.result.is_ok(), "{last:?}");
        let state = sink.state();
        assert_eq!(state.pods, before[i].pods, "the same pods");
        assert_eq!(state.policies, before[i].policies, "the same policies");
    }
    converged(&c, &a, &b, &[("web", 2), ("lb", 1), ("db", 1)]).await;
    second.stop().await.expect("the operator stops cleanly");
}

#[tokio::test]
async fn a_rotated_server_certificate_is_served_without_a_restart() {
    let c = Cluster::new();
    // The operator serves copies of its files, which the test then rotates in place.
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let install = |from: &kubesg_testkit::certs::CertFiles| {
        put(
            dir.path(),
            "tls.crt",
            &fs::read_to_string(&from.cert).unwrap(),
        );
        put(
            dir.path(),
            "tls.key",
            &fs::read_to_string(&from.key).unwrap(),
        );
    };
    install(&c.pki.operator);
    let tls = ServerTlsFiles {
        client_ca: c.pki.operator_tls(&c.pki.operator).client_ca,
        cert: cert.clone(),
        key: key.clone(),
    };
    // A fixed port: serving restarts with the new files and binds again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (operator, addr) = c.start_with(port, tls).await;
    let mut a = c.agent("node-a", addr);
    a.wait_status("connected", |s| s.connected).await;
    let opened = a.status.borrow().streams_opened;

    // A certificate the agent cannot accept (right CA, wrong name) replaces the served one:
    // the operator must present it without restarting, and the agent refuses it by name.
    install(&c.pki.misnamed_operator);
    a.wait_status("the new certificate refused", |s| {
        !s.connected
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("not valid for name"))
    })
    .await;

    // The good one back: the agent reconnects to the same operator process.
    install(&c.pki.operator);
    a.wait_status("reconnected", |s| s.connected && s.streams_opened > opened)
        .await;
    a.stop().await;
    operator.stop().await.unwrap();
}
