//! The Helm chart installed into the real cluster as a user installs it (README: "Install into
//! a cluster", "Upgrade", "Uninstall"), with the image settings only, and what a user then sees
//! happen to kubesg in that cluster.
//!
//! One release serves every test, so they run one after another in the order below (this file
//! is its own test harness: `harness = false`, libtest-mimic), each named for what it checks:
//! the install (two operators, one leader holding the Lease, the agent Ready and chained into
//! the node's real CNI configuration, connected to the operator through its Service's name and
//! served for its node on its pod's token),
//! a SecurityGroup enforced on pods the kubelet starts, one this version cannot read reported
//! alone while the rest work, the agent replaced under load with no
//! failed request, a pod created while the agent is away, leader failover, operators recreated
//! while kubesg is chained, an upgrade that keeps the certificates and the running operators, no
//! 403 for the operators under the chart's RBAC for the whole run, and the documented uninstall
//! giving the CNI configuration back byte for byte. The release is uninstalled at the end
//! whatever happened.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use kubesg_testkit::{kube::Kube, netns::in_named};
use libtest_mimic::{Arguments, Trial};

#[path = "matrix.rs"]
mod matrix;

/// The node's CNI configuration directory (the cluster's containerd reads it).
const CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// How long a rollout or a leader election may take on this 2-core machine.
const PATIENCE: Duration = Duration::from_secs(180);

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../charts/kubesg");

/// The test workload image `make cluster` builds and imports (scripts/k8s/cluster.sh `images`).
const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.63.0";

/// What the tests share: the cluster, and what they learn as they go.
struct Run {
    kube: Kube,
    /// The CNI configuration directory before the install.
    cni_before: BTreeMap<String, Vec<u8>>,
    /// The logs of operator pods the tests deleted, read just before (the 403 check reads them
    /// with the live ones at the end).
    operator_logs: Mutex<Vec<(String, String)>>,
    /// The namespace of a SecurityGroup this version cannot read, kept until the end: every
    /// later test (a failover's relist included) runs with it in the cluster.
    unreadable: Mutex<Option<kubesg_testkit::kube::Namespace>>,
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One release for all: the tests run in order, never side by side.
    args.test_threads = Some(1);
    if !kubesg_testkit::privileged::check() {
        return ExitCode::SUCCESS;
    }
    let kube = Kube::from_env();
    // The CRD first, as the other cluster tests apply it too (Helm skips a CRD that exists).
    kube.apply_crds();
    let run = Arc::new(Run {
        cni_before: cni_files(),
        kube,
        operator_logs: Mutex::new(Vec::new()),
        unreadable: Mutex::new(None),
    });
    let _release = Release(run.kube.kubeconfig().to_path_buf());
    let trial = |name: &str, test: fn(&Run)| {
        let run = run.clone();
        Trial::test(name, move || {
            test(&run);
            Ok(())
        })
    };
    let trials = vec![
        trial(
            "the_chart_installs_with_the_image_settings_only",
            the_chart_installs_with_the_image_settings_only,
        ),
        trial(
            "a_security_group_is_enforced_on_pods_the_kubelet_starts",
            a_security_group_is_enforced_on_pods_the_kubelet_starts,
        ),
        trial(
            "a_security_group_this_version_cannot_read_is_reported_alone_and_the_rest_work",
            a_security_group_this_version_cannot_read_is_reported_alone_and_the_rest_work,
        ),
        trial(
            "network_policies_are_enforced_as_their_own_layer_and_told_by_events",
            network_policies_are_enforced_as_their_own_layer_and_told_by_events,
        ),
        trial(
            "the_demo_groups_matrix_equals_the_reference_over_pod_ips_and_cluster_ips",
            |run| {
                matrix::the_demo_groups_matrix_equals_the_reference_over_pod_ips_and_cluster_ips(
                    &run.kube,
                )
            },
        ),
        trial(
            "the_agent_is_replaced_under_load_with_zero_failed_requests",
            the_agent_is_replaced_under_load_with_zero_failed_requests,
        ),
        trial(
            "a_pod_created_while_the_agent_is_away_is_set_up_once_it_is_back_and_enforced",
            a_pod_created_while_the_agent_is_away_is_set_up_once_it_is_back_and_enforced,
        ),
        trial(
            "the_other_replica_leads_when_the_leader_is_deleted_and_programs_later_changes",
            the_other_replica_leads_when_the_leader_is_deleted_and_programs_later_changes,
        ),
        trial(
            "operators_recreated_while_kubesg_is_chained_lead_again",
            operators_recreated_while_kubesg_is_chained_lead_again,
        ),
        trial(
            "an_upgrade_keeps_the_certificates_and_the_running_operators",
            an_upgrade_keeps_the_certificates_and_the_running_operators,
        ),
        trial(
            "the_operators_met_no_refusal_under_the_charts_rbac_for_the_whole_run",
            the_operators_met_no_refusal_under_the_charts_rbac_for_the_whole_run,
        ),
        trial(
            "the_documented_uninstall_restores_the_cni_configuration_byte_for_byte",
            the_documented_uninstall_restores_the_cni_configuration_byte_for_byte,
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

/// Uninstalls the release when the run ends, whatever happened.
struct Release(PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        let _ = Command::new("helm")
            .arg("--kubeconfig")
            .arg(&self.0)
            .args([
                "uninstall",
                "kubesg",
                "-n",
                "kube-system",
                "--ignore-not-found",
                "--wait",
            ])
            .output();
    }
}

fn the_chart_installs_with_the_image_settings_only(run: &Run) {
    let kube = &run.kube;
    assert!(
        !run.cni_before.is_empty(),
        "the cluster has a primary CNI network"
    );
    let node = kube
        .must(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"])
        .trim()
        .to_string();
    // A pod the kubelet set up before kubesg was in the CNI chain runs without its programs:
    // kubesg must say so, on the pod and on its group.
    let early = kube.namespace("sg-early-");
    agnhost_pod(kube, &early.name, "early", &["pause"]);
    wait_ready(kube, &early.name, &["early"]);
    apply_group(
        kube,
        &early.name,
        "early",
        "early",
        &ingress_from("nobody", 8080),
    );
    // The node registered as the chart documents: nothing that does not tolerate the taint is
    // scheduled there until kubesg enforces.
    let _taint = AgentNotReady::add(kube, &node);
    let tag = env!("CARGO_PKG_VERSION");
    helm(
        kube,
        &[
            "install",
            "kubesg",
            CHART,
            "-n",
            "kube-system",
            "--set",
            "image.repository=localhost/kubesg",
            "--set",
            &format!("image.tag={tag}"),
        ],
    );
    agent_rollout(kube);

    // Two operator replicas, one leader, which alone is Ready and holds the Lease.
    let leader = one_leader_of_two(kube, &[]);
    assert_eq!(
        lease_holder(kube),
        leader,
        "the Ready replica holds the Lease"
    );

    // install-cni made kubesg the last plugin of the node's primary network.
    let chained = cni_files();
    let (primary, text) = chained.iter().next().expect("a primary network");
    let conf: serde_json::Value = serde_json::from_slice(text).expect("the primary is JSON");
    let plugins = conf["plugins"].as_array().expect("a conflist");
    assert_eq!(
        plugins.last().map(|p| &p["type"]),
        Some(&serde_json::json!("kubesg-cni")),
        "{primary}: {conf}"
    );
    assert!(Path::new("/opt/cni/bin/kubesg-cni").is_file());

    // The agent reaches the operator through its Service, by name, over mTLS.
    eventually(
        "the agent connected to the operator",
        || match agent_connections(kube) {
            0 => Err(agent_log(kube)
                .lines()
                .last()
                .unwrap_or_default()
                .to_string()),
            _ => Ok(()),
        },
    );
    // Its certificate is the DaemonSet's (it names no node): the leader served it for its node
    // because the API server bound its pod's token to that node.
    let leader = lease_holder(kube);
    let log = kube.must(&["-n", "kube-system", "logs", &leader]);
    assert!(
        log.lines().any(|l| l.contains("agent connected")
            && l.contains(&format!("node={node}"))
            && l.contains("proof=token")),
        "the leader {leader} never served the agent on its token:\n{log}"
    );

    // The agent enforces: the operator took the taint away.
    eventually(&format!("{AGENT_NOT_READY} removed from {node}"), || {
        let keys = kube.must(&["get", "node", &node, "-o", "jsonpath={.spec.taints[*].key}"]);
        if keys.contains(AGENT_NOT_READY) {
            Err(keys)
        } else {
            Ok(())
        }
    });

    // The pod set up before the install: its group is not Programmed, saying why and where,
    // and the pod has a Warning NotEnforced Event.
    let e = early.name.as_str();
    let programmed = eventually("the early pod's group says it is not enforced", || {
        let s = kube.must(&[
            "-n",
            e,
            "get",
            "sg",
            "early",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Programmed\")].status} {.status.conditions[?(@.type==\"Programmed\")].reason} {.status.conditions[?(@.type==\"Programmed\")].message}",
        ]);
        if s.starts_with("False PodsNotEnforced ") {
            Ok(s)
        } else {
            Err(s)
        }
    });
    assert!(
        programmed.contains(&format!(
            "{e}/early (no endpoint: set up without kubesg in the CNI chain) on {node}"
        )),
        "{programmed}"
    );
    let event = eventually("a Warning NotEnforced Event on the early pod", || {
        let events = kube.must(&[
            "-n",
            e,
            "get",
            "events",
            "--field-selector",
            "involvedObject.kind=Pod,involvedObject.name=early",
            "-o",
            "jsonpath={range .items[*]}{.type} {.reason} {.note}{.message}{\"\\n\"}{end}",
        ]);
        events
            .lines()
            .find(|l| l.starts_with("Warning NotEnforced "))
            .map(str::to_owned)
            .ok_or(events)
    });
    assert!(
        event.contains(&format!(
            "not enforced on node {node}: the node's agent has no endpoint"
        )),
        "{event}"
    );
}

/// The taint a node registers with until kubesg enforces there; removed on drop if it is
/// still there (a failed run must not leave the node unschedulable for the next tests).
const AGENT_NOT_READY: &str = "kubesg.io/agent-not-ready";

struct AgentNotReady<'a> {
    kube: &'a Kube,
    node: String,
}

impl<'a> AgentNotReady<'a> {
    fn add(kube: &'a Kube, node: &str) -> Self {
        kube.must(&[
            "taint",
            "nodes",
            node,
            &format!("{AGENT_NOT_READY}=:NoSchedule"),
        ]);
        AgentNotReady {
            kube,
            node: node.to_owned(),
        }
    }
}

impl Drop for AgentNotReady<'_> {
    fn drop(&mut self) {
        let _ = self.kube.kubectl(&[
            "taint",
            "nodes",
            &self.node,
            &format!("{AGENT_NOT_READY}:NoSchedule-"),
        ]);
    }
}

/// A SecurityGroup on a server admits one client and not another, on pods the kubelet starts
/// through containerd and the chained kubesg-cni; its status says Accepted and Programmed for
/// its generation, and `kubectl describe` shows them and the Programmed Event.
fn a_security_group_is_enforced_on_pods_the_kubelet_starts(run: &Run) {
    let kube = &run.kube;
    let ns = kube.namespace("sg-enforce-");
    let n = ns.name.as_str();
    agnhost_pod(kube, n, "server", &["netexec", "--http-port=8080"]);
    agnhost_pod(kube, n, "allowed", &["pause"]);
    agnhost_pod(kube, n, "other", &["pause"]);
    wait_ready(kube, n, &["server", "allowed", "other"]);
    let server = format!("{}:8080", pod_ip(kube, n, "server"));
    // Before any group, nothing is filtered.
    eventually("other reaches the server before any group", || {
        connects(kube, n, "other", &server)
    });

    apply_group(kube, n, "server", "server", &ingress_from("allowed", 8080));
    wait_programmed(kube, n, "server");
    connects(kube, n, "allowed", &server).expect("the allowed client connects");
    assert!(
        connects(kube, n, "other", &server).is_err(),
        "the other client connected despite the group"
    );

    let status = kube.must(&[
        "-n",
        n,
        "get",
        "sg",
        "server",
        "-o",
        "jsonpath={.status.members} {.status.nodes.programmed}/{.status.nodes.total}",
    ]);
    assert_eq!(status, "1 1/1", "one member, programmed on the node");
    let described = kube.must(&["-n", n, "describe", "sg", "server"]);
    for want in ["Accepted", "Programmed", "Observed Generation", "Events:"] {
        assert!(described.contains(want), "no {want} in:\n{described}");
    }
    let events = kube.must(&[
        "-n",
        n,
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=SecurityGroup,involvedObject.name=server",
        "-o",
        "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
    ]);
    assert!(
        events.lines().any(|l| l == "Normal Programmed"),
        "no Programmed event:\n{events}"
    );

    // The status is the operator's by server-side apply, and a condition another controller
    // applies is its own: the operator's next write (a new generation) keeps it.
    let managed: serde_json::Value = serde_json::from_str(&kube.must(&[
        "-n",
        n,
        "get",
        "sg",
        "server",
        "-o",
        "json",
        "--show-managed-fields",
    ]))
    .expect("kubectl prints JSON");
    let owners: Vec<String> = managed["metadata"]["managedFields"]
        .as_array()
        .expect("managed fields")
        .iter()
        .filter(|f| f["subresource"] == "status")
        .map(|f| format!("{} {}", f["manager"], f["operation"]))
        .collect();
    assert_eq!(
        owners,
        ["\"kubesg-operator\" \"Apply\""],
        "the status's managers"
    );
    let audited = format!(
        "apiVersion: kubesg.io/v1alpha1\nkind: SecurityGroup\nmetadata:\n  name: server\n  namespace: {n}\n\
         status:\n  conditions:\n  - type: Audited\n    status: \"True\"\n    reason: Checked\n    \
         message: checked by another controller\n    lastTransitionTime: \"2026-01-01T00:00:00Z\"\n"
    );
    let out = kube.kubectl_with_input(
        &[
            "apply",
            "--server-side",
            "--subresource=status",
            "--field-manager=auditor",
            "-f",
            "-",
        ],
        Some(&audited),
    );
    assert!(out.ok, "the auditor's apply failed: {}", out.stderr);
    apply_group(kube, n, "server", "server", &ingress_from("other", 8080));
    wait_programmed(kube, n, "server");
    connects(kube, n, "other", &server).expect("the newly allowed client connects");
    let types = kube.must(&[
        "-n",
        n,
        "get",
        "sg",
        "server",
        "-o",
        "jsonpath={.status.conditions[*].type}",
    ]);
    let mut types: Vec<&str> = types.split_whitespace().collect();
    types.sort_unstable();
    assert_eq!(
        types,
        ["Accepted", "Audited", "Programmed"],
        "the operator's write kept the other controller's condition"
    );
}

/// A SecurityGroup the API server stores but this version cannot read (the CRD's int-or-string
/// port admits any integer; no port holds 2^32, as after a schema change an old object may not
/// fit): it is reported on its own status (Accepted=False naming the field, a Warning Event)
/// while a group applied after it is programmed. It stays in the cluster for every later test,
/// so the failover test's new leader must list SecurityGroups with it there (a typed list fails
/// whole on one such object).
fn a_security_group_this_version_cannot_read_is_reported_alone_and_the_rest_work(run: &Run) {
    let kube = &run.kube;
    let ns = kube.namespace("sg-unreadable-");
    let n = ns.name.clone();
    apply_group(
        kube,
        &n,
        "broken",
        "server",
        "  ingress:\n  - ports: [{port: 4294967296}]\n",
    );
    let accepted = eventually("the unreadable group reported not Accepted", || {
        let s = kube.must(&[
            "-n",
            &n,
            "get",
            "sg",
            "broken",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status} {.status.conditions[?(@.type==\"Accepted\")].message}",
        ]);
        if s.starts_with("False ") {
            Ok(s)
        } else {
            Err(s)
        }
    });
    assert!(
        accepted.contains("spec.ingress[0].ports[0].port: this version of kubesg cannot read it")
            && accepted.contains("4294967296"),
        "the condition does not name the field: {accepted}"
    );
    eventually(
        "a Warning InvalidSpec Event on the unreadable group",
        || {
            let events = kube.must(&[
                "-n",
                &n,
                "get",
                "events",
                "--field-selector",
                "involvedObject.kind=SecurityGroup,involvedObject.name=broken",
                "-o",
                "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
            ]);
            if events.lines().any(|l| l == "Warning InvalidSpec") {
                Ok(())
            } else {
                Err(events)
            }
        },
    );
    apply_group(kube, &n, "server", "server", &ingress_from("client", 8080));
    wait_programmed(kube, &n, "server");
    *run.unreadable.lock().unwrap_or_else(|p| p.into_inner()) = Some(ns);
}

/// Kubernetes NetworkPolicies on pods the kubelet starts: a default deny refuses everyone, an
/// allow rule admits one client, and where a SecurityGroup selects the same server a NEW
/// connection must pass both layers (the group admitting only the other client leaves nobody
/// in). `kubectl events --for networkpolicy/<name>` shows the Programmed Event, and `kubesg-agent explain`
/// names the policy that allowed or refused. A version no node can program is refused whole,
/// with a Warning Event, the previous one still enforced.
fn network_policies_are_enforced_as_their_own_layer_and_told_by_events(run: &Run) {
    let kube = &run.kube;
    let ns = kube.namespace("np-enforce-");
    let n = ns.name.as_str();
    agnhost_pod(kube, n, "server", &["netexec", "--http-port=8080"]);
    agnhost_pod(kube, n, "allowed", &["pause"]);
    agnhost_pod(kube, n, "other", &["pause"]);
    wait_ready(kube, n, &["server", "allowed", "other"]);
    let server_ip = pod_ip(kube, n, "server");
    let server = format!("{server_ip}:8080");
    eventually("other reaches the server before any policy", || {
        connects(kube, n, "other", &server)
    });

    kube.must_apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: {n}}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n"
    ));
    eventually(
        "the default deny refuses the allowed client",
        || match connects(kube, n, "allowed", &server) {
            Ok(()) => Err("connected".to_string()),
            Err(_) => Ok(()),
        },
    );
    assert!(connects(kube, n, "other", &server).is_err());

    kube.must_apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-allowed, namespace: {n}}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: allowed}}}}}}]\n    ports: [{{port: 8080}}]\n"
    ));
    eventually("the allow rule admits the allowed client", || {
        connects(kube, n, "allowed", &server)
    });
    assert!(
        connects(kube, n, "other", &server).is_err(),
        "the other client connected through the default deny"
    );

    // The agent names the policy of the verdict.
    let agent = agent_pod(kube).expect("an agent pod");
    let explain = |from: &str| {
        kube.must(&[
            "-n",
            "kube-system",
            "exec",
            &agent,
            "-c",
            "agent",
            "--",
            "kubesg-agent",
            "explain",
            "--from",
            &pod_ip(kube, n, from),
            "--to",
            &server_ip,
            "--proto",
            "tcp",
            "--dport",
            "8080",
        ])
    };
    let allowed = explain("allowed");
    assert!(
        allowed.contains(&format!("NetworkPolicy {n}/allow-allowed")),
        "explain does not name the policy:\n{allowed}"
    );

    // A SecurityGroup on the same server admitting only `other`: each layer refuses one client.
    apply_group(kube, n, "server", "server", &ingress_from("other", 8080));
    wait_programmed(kube, n, "server");
    assert!(
        connects(kube, n, "allowed", &server).is_err(),
        "the security group layer did not refuse the allowed client"
    );
    assert!(
        connects(kube, n, "other", &server).is_err(),
        "the NetworkPolicy layer did not refuse the other client"
    );
    // The group admits both: the NetworkPolicies decide again.
    apply_group(
        kube,
        n,
        "server",
        "server",
        "  ingress:\n  - protocol: TCP\n    ports: [{port: 8080}]\n    from:\n    - podSelector: {matchExpressions: [{key: app, operator: In, values: [allowed, other]}]}\n",
    );
    wait_programmed(kube, n, "server");
    connects(kube, n, "allowed", &server).expect("both layers admit the allowed client");
    assert!(connects(kube, n, "other", &server).is_err());

    let events = wait_policy_programmed(kube, n, "allow-allowed");
    assert!(!events.contains("Warning"), "{events}");
    // kubectl's describer of NetworkPolicies prints no Events; `kubectl events --for` does.
    let told = kube.must(&["-n", n, "events", "--for", "networkpolicy/allow-allowed"]);
    assert!(
        told.contains("Programmed"),
        "kubectl events shows no Programmed Event:\n{told}"
    );

    // A version the API server accepts but no node can program (129 rules that no merge
    // folds: more classes than a policy direction holds) is refused whole, told by a Warning
    // Event on the policy, and the previous version stays enforced.
    let mut rules = String::new();
    for i in 0..129 {
        rules.push_str(&format!(
            "  - from: [{{ipBlock: {{cidr: 10.{}.{}.0/24}}}}]\n    ports: [{{port: {}}}]\n",
            200 + i / 256,
            i % 256,
            10_000 + i
        ));
    }
    kube.must_apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-allowed, namespace: {n}}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n{rules}"
    ));
    let selector = "involvedObject.kind=NetworkPolicy,involvedObject.name=allow-allowed";
    let refused = eventually("a ProgrammingRefused Event on the policy", || {
        let notes = kube.must(&[
            "-n",
            n,
            "get",
            "events",
            "--field-selector",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.type} {.reason} {.note}{.message}{\"\\n\"}{end}",
        ]);
        match notes
            .lines()
            .find(|l| l.starts_with("Warning ProgrammingRefused"))
        {
            Some(l) => Ok(l.to_string()),
            None => Err(notes),
        }
    });
    assert!(
        refused.contains("classes") && refused.contains("128"),
        "the Event does not give the reason: {refused}"
    );
    connects(kube, n, "allowed", &server).expect("the previous version still admits the client");
    assert!(connects(kube, n, "other", &server).is_err());
    kube.must(&[
        "-n",
        n,
        "delete",
        "networkpolicy",
        "allow-allowed",
        "--wait",
    ]);
}

/// A held TCP connection and a loop of new connections between two pods, each in a group that
/// admits exactly that traffic, live through `kubectl rollout restart daemonset/kubesg-agent`
/// with zero failed requests: the pinned programs judge every packet while the agent pod is
/// replaced. (One node: the pods share it; the cluster has no second node.)
fn the_agent_is_replaced_under_load_with_zero_failed_requests(run: &Run) {
    let kube = &run.kube;
    let ns = kube.namespace("sg-load-");
    let n = ns.name.as_str();
    agnhost_pod(kube, n, "server", &["netexec", "--http-port=8080"]);
    agnhost_pod(kube, n, "client", &["pause"]);
    wait_ready(kube, n, &["server", "client"]);
    apply_group(kube, n, "server", "server", &ingress_from("client", 8080));
    apply_group(kube, n, "client", "client", &egress_to("server", 8080));
    wait_programmed(kube, n, "server");
    wait_programmed(kube, n, "client");
    let server: SocketAddr = format!("{}:8080", pod_ip(kube, n, "server"))
        .parse()
        .expect("the server's address");
    let client_netns = netns_of(&pod_ip(kube, n, "client"));
    let agent_before = agent_pod(kube);

    let mut held = HttpConn::open(&client_netns, server).expect("the held connection opens");
    held.echo("held-0").expect("the held connection works");
    let stop = AtomicBool::new(false);
    let outcomes: Mutex<Vec<Result<(), String>>> = Mutex::new(Vec::new());
    let count = |ok: bool| {
        outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|o| o.is_ok() == ok)
            .count()
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let msg = format!("req-{i}");
                let fresh = HttpConn::open(&client_netns, server)
                    .and_then(|mut c| c.echo(&msg))
                    .map_err(|e| format!("new connection {i}: {e}"));
                let kept = held
                    .echo(&format!("held-{i}"))
                    .map_err(|e| format!("held connection, request {i}: {e}"));
                let mut log = outcomes.lock().unwrap_or_else(|p| p.into_inner());
                log.push(fresh);
                log.push(kept);
                drop(log);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let wait_for = |n: usize| {
            eventually(&format!("{n} successful requests"), || {
                if count(true) >= n {
                    Ok(())
                } else {
                    Err(format!("{} ok, {} failed", count(true), count(false)))
                }
            })
        };
        wait_for(20);
        kube.must(&[
            "-n",
            "kube-system",
            "rollout",
            "restart",
            "daemonset/kubesg-agent",
        ]);
        agent_rollout(kube);
        let after = count(true);
        wait_for(after + 20);
        stop.store(true, Ordering::Relaxed);
    });
    let outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the agent's replacement: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    assert_ne!(agent_pod(kube), agent_before, "the agent pod was replaced");
    eprintln!(
        "agent replaced under load: {} requests, 0 failed",
        outcomes.len()
    );
}

/// While the agent is away from the node (its DaemonSet steered off it), a new pod's network
/// setup fails with kubesg-cni's "try again later" and the kubelet retries it; once the agent
/// is back the pod starts, gets its group's rules, and is enforced by them.
fn a_pod_created_while_the_agent_is_away_is_set_up_once_it_is_back_and_enforced(run: &Run) {
    let kube = &run.kube;
    let ns = kube.namespace("sg-away-");
    let n = ns.name.as_str();
    agnhost_pod(kube, n, "allowed", &["pause"]);
    agnhost_pod(kube, n, "other", &["pause"]);
    wait_ready(kube, n, &["allowed", "other"]);
    apply_group(kube, n, "late", "late", &ingress_from("allowed", 8080));

    {
        let _away = AgentAway::start(kube);
        eventually("the agent gone from the node", || match agent_pod(kube) {
            None => Ok(()),
            Some(p) => Err(p),
        });
        agnhost_pod(kube, n, "late", &["netexec", "--http-port=8080"]);
        let messages = eventually("the late pod's network setup refused", || {
            let events = kube.must(&[
                "-n",
                n,
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=late,reason=FailedCreatePodSandBox",
                "-o",
                "jsonpath={.items[*].message}",
            ]);
            if events.contains("kubesg-cni") {
                Ok(events)
            } else {
                Err(events)
            }
        });
        assert!(
            messages.contains("try again later") && messages.contains("kubesg-agent"),
            "{messages}"
        );
        let phase = kube.must(&[
            "-n",
            n,
            "get",
            "pod",
            "late",
            "-o",
            "jsonpath={.status.phase}",
        ]);
        assert_eq!(phase, "Pending", "the pod did not start without the agent");
    }
    agent_rollout(kube);
    wait_ready(kube, n, &["late"]);
    wait_programmed(kube, n, "late");
    let late = format!("{}:8080", pod_ip(kube, n, "late"));
    connects(kube, n, "allowed", &late).expect("the allowed client connects");
    assert!(
        connects(kube, n, "other", &late).is_err(),
        "the other client connected despite the group"
    );
}

/// Steers the agent's DaemonSet off every node (a nodeSelector no node matches) until dropped,
/// then puts it back as the chart made it.
struct AgentAway<'a>(&'a Kube);

impl<'a> AgentAway<'a> {
    fn start(kube: &'a Kube) -> Self {
        kube.must(&[
            "-n",
            "kube-system",
            "patch",
            "daemonset",
            "kubesg-agent",
            "--type=merge",
            "-p",
            r#"{"spec":{"template":{"spec":{"nodeSelector":{"kubesg.io/e2e-no-agent":"true"}}}}}"#,
        ]);
        AgentAway(kube)
    }
}

impl Drop for AgentAway<'_> {
    fn drop(&mut self) {
        let _ = self.0.kubectl(&[
            "-n",
            "kube-system",
            "patch",
            "daemonset",
            "kubesg-agent",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/template/spec/nodeSelector/kubesg.io~1e2e-no-agent"}]"#,
        ]);
    }
}

/// Cordons the node (nothing new is scheduled on it) until dropped.
struct Cordon<'a>(&'a Kube, String);

impl<'a> Cordon<'a> {
    fn start(kube: &'a Kube) -> Self {
        let node = kube.must(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"]);
        kube.must(&["cordon", &node]);
        Cordon(kube, node)
    }
}

impl Drop for Cordon<'_> {
    fn drop(&mut self) {
        let _ = self.0.kubectl(&["uncordon", &self.1]);
    }
}

/// Deleting the leader: the other replica takes the Lease and alone is Ready, the agent
/// reconnects to it, and a SecurityGroup changed afterwards is programmed at its new generation
/// (the new leader listed every kind with an unreadable SecurityGroup in the cluster: see
/// `a_security_group_this_version_cannot_read_is_reported_alone_and_the_rest_work`).
fn the_other_replica_leads_when_the_leader_is_deleted_and_programs_later_changes(run: &Run) {
    let kube = &run.kube;
    let ns = kube.namespace("sg-failover-");
    let n = ns.name.as_str();
    agnhost_pod(kube, n, "member", &["pause"]);
    wait_ready(kube, n, &["member"]);
    apply_group(kube, n, "member", "member", &ingress_from("client", 8080));
    wait_programmed(kube, n, "member");

    let leader = lease_holder(kube);
    let follower = operator_pods(kube)
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| *p != leader)
        .expect("a second replica");
    let connections = agent_connections(kube);
    run.save_operator_logs(std::slice::from_ref(&leader));
    // The leader's replacement must not start (it would race the follower for the released
    // Lease): the node is cordoned, as a node that died would be, until the follower leads.
    let cordon = Cordon::start(kube);
    let deleted = Instant::now();
    kube.must(&[
        "-n",
        "kube-system",
        "delete",
        "pod",
        &leader,
        "--wait=false",
    ]);
    eventually("the follower holds the Lease", || {
        match lease_holder(kube) {
            h if h == follower => Ok(()),
            h => Err(h),
        }
    });
    eprintln!(
        "failover: the follower {follower} holds the Lease {:?} after the leader {leader} was deleted",
        deleted.elapsed()
    );
    assert_eq!(
        one_leader_of_two(kube, std::slice::from_ref(&leader)),
        follower,
        "the follower, holding the Lease, is the Ready replica"
    );
    drop(cordon);
    eventually("the agent reconnected to the new leader", || {
        let now = agent_connections(kube);
        if now > connections {
            Ok(())
        } else {
            Err(format!("{now} connections"))
        }
    });

    // A change after the failover is programmed at its new generation.
    apply_group(kube, n, "member", "member", &ingress_from("client", 9090));
    wait_programmed(kube, n, "member");
}

/// Operator pods created while kubesg is chained and no operator runs (a reboot, a drain, an
/// upgrade that recreates them) get no rules until an operator leads: the startup policy exempts
/// them (`--startup-exempt`), so they reach the API server and one leads again.
fn operators_recreated_while_kubesg_is_chained_lead_again(run: &Run) {
    let kube = &run.kube;
    let connections = agent_connections(kube);
    let old: Vec<String> = operator_pods(kube).into_iter().map(|(p, _)| p).collect();
    run.save_operator_logs(&old);
    kube.must(&[
        "-n",
        "kube-system",
        "delete",
        "pod",
        "-l",
        "app.kubernetes.io/component=operator",
        "--wait=true",
    ]);
    let leader = one_leader_of_two(kube, &old);
    assert_eq!(
        lease_holder(kube),
        leader,
        "the Ready replica holds the Lease"
    );
    eventually("the agent reconnected to the new leader", || {
        let now = agent_connections(kube);
        if now > connections {
            Ok(())
        } else {
            Err(format!("{now} connections"))
        }
    });
}

/// An upgrade keeps the certificates (the chart's `lookup` path), and with them the running
/// operators: their pod template, certificates annotation included, is unchanged.
fn an_upgrade_keeps_the_certificates_and_the_running_operators(run: &Run) {
    let kube = &run.kube;
    let certs = certificates(kube);
    let generation = operator_generation(kube);
    helm(
        kube,
        &[
            "upgrade",
            "kubesg",
            CHART,
            "-n",
            "kube-system",
            "--reuse-values",
        ],
    );
    assert_eq!(
        certificates(kube),
        certs,
        "helm upgrade replaced certificates"
    );
    assert_eq!(
        operator_generation(kube),
        generation,
        "an upgrade that keeps the certificates changed the operators' Deployment: {}",
        kube.must(&[
            "-n",
            "kube-system",
            "get",
            "deployment",
            "kubesg-operator",
            "-o",
            "yaml"
        ])
    );
}

/// Every operator pod of the run, deleted or alive, logged no refusal from the API server.
fn the_operators_met_no_refusal_under_the_charts_rbac_for_the_whole_run(run: &Run) {
    let live: Vec<String> = operator_pods(&run.kube)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    run.save_operator_logs(&live);
    let logs = run.operator_logs.lock().unwrap_or_else(|p| p.into_inner());
    // The first two replicas, the deleted leader's replacement, and the two recreated ones.
    assert!(logs.len() >= 4, "only {} operator logs read", logs.len());
    // An authorization refusal names the requester: `... is forbidden: User "system:...`.
    // (A 403 for an Event into a namespace being deleted is the API server's, not RBAC's.)
    for (pod, log) in logs.iter() {
        assert!(
            !log.contains("is forbidden: User"),
            "{pod} was refused something by RBAC:\n{log}"
        );
    }
}

/// Uninstall as the README says; the CNI configuration comes back byte for byte.
fn the_documented_uninstall_restores_the_cni_configuration_byte_for_byte(run: &Run) {
    let kube = &run.kube;
    helm(
        kube,
        &[
            "upgrade",
            "kubesg",
            CHART,
            "-n",
            "kube-system",
            "--reuse-values",
            "--set",
            "cni.uninstall=true",
        ],
    );
    agent_rollout(kube);
    helm(
        kube,
        &["uninstall", "kubesg", "-n", "kube-system", "--wait"],
    );
    eventually("the CNI configuration restored byte for byte", || {
        let now = cni_files();
        if now == run.cni_before {
            Ok(())
        } else {
            Err(format!(
                "{:?}",
                now.iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(v).into_owned()))
                    .collect::<Vec<_>>()
            ))
        }
    });
    // What the README leaves on the node for the user to remove: the plugin binary (once no pod
    // set up with it remains), the pins and the agent's socket directory.
    fs::remove_file("/opt/cni/bin/kubesg-cni").expect("the plugin binary was left in place");
    fs::remove_dir_all("/sys/fs/bpf/kubesg").expect("the pins were left in place");
    let _ = fs::remove_dir_all("/var/run/kubesg");
}

impl Run {
    /// Reads the logs of operator `pods` (before they are deleted).
    fn save_operator_logs(&self, pods: &[String]) {
        let mut logs = self.operator_logs.lock().unwrap_or_else(|p| p.into_inner());
        for pod in pods {
            let log = self.kube.must(&["-n", "kube-system", "logs", pod]);
            logs.retain(|(p, _)| p != pod);
            logs.push((pod.clone(), log));
        }
    }
}

/// Every file of the CNI configuration directory, with its bytes (but libcni's lock file, which
/// the runtime creates and keeps empty).
fn cni_files() -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(CNI_CONF_DIR)
        .expect("reading the CNI configuration directory")
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file() && e.file_name() != "cni.lock")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).expect("reading a CNI file"),
            )
        })
        .collect()
}

/// Runs `helm ARGS` against the cluster; fails the test with helm's error.
#[track_caller]
fn helm(kube: &Kube, args: &[&str]) -> String {
    let out = Command::new("helm")
        .arg("--kubeconfig")
        .arg(kube.kubeconfig())
        .args(args)
        .output()
        .expect("running helm (scripts/bootstrap.sh installs it)");
    assert!(
        out.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` until it returns `Ok`, or fails with `what` and the last state.
#[track_caller]
fn eventually<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not within {PATIENCE:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Waits until the agent DaemonSet's rollout is complete.
#[track_caller]
fn agent_rollout(kube: &Kube) {
    kube.must(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/kubesg-agent",
        &format!("--timeout={}s", PATIENCE.as_secs()),
    ]);
}

/// The operator pods' names and readiness.
fn operator_pods(kube: &Kube) -> Vec<(String, bool)> {
    kube.must(&[
        "-n",
        "kube-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=operator",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
    ])
    .lines()
    .filter_map(|l| l.split_once(' '))
    .map(|(name, ready)| (name.to_string(), ready == "True"))
    .collect()
}

/// Waits until two operator pods run, none of them in `gone`, exactly one Ready; its name.
#[track_caller]
fn one_leader_of_two(kube: &Kube, gone: &[String]) -> String {
    eventually("one Ready operator of two", || {
        let pods = operator_pods(kube);
        let ready: Vec<_> = pods.iter().filter(|(_, r)| *r).collect();
        match (pods.len(), &ready[..]) {
            (2, [(name, _)]) if pods.iter().all(|(p, _)| !gone.contains(p)) => Ok(name.clone()),
            _ => Err(format!("{pods:?}")),
        }
    })
}

/// Who holds the operators' Lease.
fn lease_holder(kube: &Kube) -> String {
    kube.must(&[
        "-n",
        "kube-system",
        "get",
        "lease",
        "kubesg-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
}

/// The agent pod on the node, if any.
fn agent_pod(kube: &Kube) -> Option<String> {
    let pods = kube.must(&[
        "-n",
        "kube-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=agent",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    pods.split_whitespace().next().map(str::to_owned)
}

/// The agent's log (the one node's).
fn agent_log(kube: &Kube) -> String {
    kube.must(&[
        "-n",
        "kube-system",
        "logs",
        "daemonset/kubesg-agent",
        "-c",
        "agent",
    ])
}

/// How many times the agent has connected to an operator.
fn agent_connections(kube: &Kube) -> usize {
    agent_log(kube).matches("connected to the operator").count()
}

/// The operator Deployment's generation: it changes with its pod template.
fn operator_generation(kube: &Kube) -> String {
    kube.must(&[
        "-n",
        "kube-system",
        "get",
        "deployment",
        "kubesg-operator",
        "-o",
        "jsonpath={.metadata.generation}",
    ])
}

/// The data of the chart's four certificate Secrets.
fn certificates(kube: &Kube) -> String {
    kube.must(&[
        "-n",
        "kube-system",
        "get",
        "secret",
        "kubesg-operator-ca",
        "kubesg-agent-ca",
        "kubesg-operator-tls",
        "kubesg-agent-tls",
        "-o",
        "jsonpath={.items[*].data}",
    ])
}

/// Starts pod `name` labelled `app=<name>` running `agnhost ARGS` in `ns`.
fn agnhost_pod(kube: &Kube, ns: &str, name: &str, args: &[&str]) {
    let labels = format!("--labels=app={name}");
    let mut cmd = vec![
        "-n",
        ns,
        "run",
        name,
        "--image",
        AGNHOST,
        "--image-pull-policy=Never",
        "--restart=Never",
        &labels,
        "--",
    ];
    cmd.extend_from_slice(args);
    kube.must(&cmd);
}

/// Waits until `pods` of `ns` are Ready.
#[track_caller]
fn wait_ready(kube: &Kube, ns: &str, pods: &[&str]) {
    let mut cmd = vec!["-n", ns, "wait", "--for=condition=Ready"];
    let pods: Vec<String> = pods.iter().map(|p| format!("pod/{p}")).collect();
    cmd.extend(pods.iter().map(String::as_str));
    let timeout = format!("--timeout={}s", PATIENCE.as_secs());
    cmd.push(&timeout);
    kube.must(&cmd);
}

/// A pod's (first) IP.
fn pod_ip(kube: &Kube, ns: &str, pod: &str) -> String {
    kube.must(&[
        "-n",
        ns,
        "get",
        "pod",
        pod,
        "-o",
        "jsonpath={.status.podIP}",
    ])
}

/// One TCP ingress rule: port `port` from the pods labelled `app=<from>`.
fn ingress_from(from: &str, port: u16) -> String {
    format!(
        "  ingress:\n  - protocol: TCP\n    ports: [{{port: {port}}}]\n    from:\n    - podSelector: {{matchLabels: {{app: {from}}}}}\n"
    )
}

/// One TCP egress rule: port `port` to the pods labelled `app=<to>`.
fn egress_to(to: &str, port: u16) -> String {
    format!(
        "  egress:\n  - protocol: TCP\n    ports: [{{port: {port}}}]\n    to:\n    - podSelector: {{matchLabels: {{app: {to}}}}}\n"
    )
}

/// Applies SecurityGroup `name` selecting the pods labelled `app=<app>` with `rules`.
#[track_caller]
fn apply_group(kube: &Kube, ns: &str, name: &str, app: &str, rules: &str) {
    kube.must_apply(&format!(
        "apiVersion: kubesg.io/v1alpha1\nkind: SecurityGroup\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n{rules}"
    ));
}

/// Waits until group `name` is Programmed at its current generation.
#[track_caller]
fn wait_programmed(kube: &Kube, ns: &str, name: &str) {
    eventually(&format!("{ns}/{name} Programmed at its generation"), || {
        let s = kube.must(&[
            "-n",
            ns,
            "get",
            "sg",
            name,
            "-o",
            "jsonpath={.metadata.generation} {.status.observedGeneration} {.status.conditions[?(@.type==\"Programmed\")].status} {.status.conditions[?(@.type==\"Programmed\")].observedGeneration}",
        ]);
        let f: Vec<&str> = s.split_whitespace().collect();
        match f[..] {
            [g, o, "True", c] if g == o && g == c => Ok(()),
            _ => Err(s),
        }
    });
}

/// Waits until NetworkPolicy `name` has kubesg's Normal `Programmed` Event (a NetworkPolicy has
/// no status: the Events tell its state) and returns its Events, one `type reason` a line.
#[track_caller]
fn wait_policy_programmed(kube: &Kube, ns: &str, name: &str) -> String {
    let selector = format!("involvedObject.kind=NetworkPolicy,involvedObject.name={name}");
    eventually(
        &format!("a Programmed Event on NetworkPolicy {ns}/{name}"),
        || {
            let events = kube.must(&[
                "-n",
                ns,
                "get",
                "events",
                "--field-selector",
                &selector,
                "-o",
                "jsonpath={range .items[*]}{.type} {.reason}{\"\\n\"}{end}",
            ]);
            if events.lines().any(|l| l == "Normal Programmed") {
                Ok(events)
            } else {
                Err(events)
            }
        },
    )
}

/// Whether `from` (a pod in `ns`) opens a TCP connection to `to` within 3 s (agnhost connect:
/// exit 0 on a connection, non-zero on a timeout or a refusal).
fn connects(kube: &Kube, ns: &str, from: &str, to: &str) -> Result<(), String> {
    let out = kube.kubectl(&[
        "-n",
        ns,
        "exec",
        from,
        "--",
        "/agnhost",
        "connect",
        "--timeout=3s",
        to,
    ]);
    if out.ok {
        Ok(())
    } else {
        Err(format!("{}{}", out.stdout, out.stderr).trim().to_string())
    }
}

/// The network namespace (under /run/netns, where containerd's CNI setup names them) holding
/// the pod address `ip`.
fn netns_of(ip: &str) -> String {
    let needle = format!(" {ip}/");
    fs::read_dir("/run/netns")
        .expect("listing /run/netns")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| {
            Command::new("ip")
                .args(["-n", name, "-o", "addr", "show"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&needle))
        })
        .unwrap_or_else(|| panic!("no network namespace holds {ip}"))
}

/// An HTTP/1.1 keep-alive connection to agnhost netexec, opened from inside a pod's network
/// namespace: its traffic crosses the pod's interface as the pod's own would.
struct HttpConn {
    reader: BufReader<TcpStream>,
}

impl HttpConn {
    fn open(netns: &str, addr: SocketAddr) -> io::Result<Self> {
        let stream = in_named(netns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })??;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(HttpConn {
            reader: BufReader::new(stream),
        })
    }

    /// `GET /echo?msg=MSG`: the server must answer 200 with MSG.
    fn echo(&mut self, msg: &str) -> io::Result<()> {
        write!(
            self.reader.get_mut(),
            "GET /echo?msg={msg} HTTP/1.1\r\nHost: server\r\n\r\n"
        )?;
        let mut status = String::new();
        self.reader.read_line(&mut status)?;
        let mut length = None;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::other("the server closed the connection"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.ok_or_else(|| io::Error::other(format!("no length: {status}")))?;
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        if !status.contains(" 200 ") || body != msg.as_bytes() {
            return Err(io::Error::other(format!(
                "{}: {:?}",
                status.trim(),
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(())
    }
}
