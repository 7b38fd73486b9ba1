//! The Helm chart installed into the real cluster as a user installs it (README: "Install into
//! a cluster", "Upgrade", "Uninstall"), with the image settings only: the operator runs two
//! replicas of which one leads and is Ready, the agent DaemonSet becomes Ready and chains
//! kubesg into the node's real CNI configuration, the agent reaches the operator by its
//! Service's name (cluster DNS), the operator meets no 403 under the chart's RBAC, `helm upgrade`
//! keeps the certificates and the running operators, operators recreated while kubesg is chained
//! lead again (the startup policy exempts them), a SecurityGroup is enforced on pods the kubelet
//! starts, and the documented uninstall gives the CNI configuration back byte for byte.

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use kubesg_testkit::{kube::Kube, require_privileged};

/// The node's CNI configuration directory (the cluster's containerd reads it).
const CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// How long a rollout or a leader election may take on this 2-core machine.
const PATIENCE: Duration = Duration::from_secs(180);

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../charts/kubesg");

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
fn helm(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new("helm")
        .arg("--kubeconfig")
        .arg(kubeconfig)
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

/// Polls `check` until it returns `Some`, or fails with `what` and the last state.
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

/// Uninstalls the release if the test leaves it behind (it failed half-way).
struct Release<'a>(&'a Path);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let _ = Command::new("helm")
            .arg("--kubeconfig")
            .arg(self.0)
            .args([
                "uninstall",
                "kubesg",
                "-n",
                "kube-system",
                "--ignore-not-found",
            ])
            .output();
    }
}

#[test]
fn the_chart_installs_upgrades_and_uninstalls_as_the_readme_says() {
    require_privileged!();
    let kube = Kube::from_env();
    let kubeconfig = kube.kubeconfig().to_path_buf();
    // The CRD first, as the other cluster tests apply it too (Helm skips a CRD that exists).
    kube.apply_crds();
    let before = cni_files();
    assert!(!before.is_empty(), "the cluster has a primary CNI network");

    let tag = env!("CARGO_PKG_VERSION");
    let _release = Release(&kubeconfig);
    helm(
        &kubeconfig,
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
    kube.must(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/kubesg-agent",
        &format!("--timeout={}s", PATIENCE.as_secs()),
    ]);

    // Two operator replicas, one leader, which alone is Ready and holds the Lease.
    let leader = eventually("one Ready operator of two", || {
        let pods = operator_pods(&kube);
        let ready: Vec<_> = pods.iter().filter(|(_, r)| *r).collect();
        match (pods.len(), &ready[..]) {
            (2, [(name, _)]) => Ok(name.clone()),
            _ => Err(format!("{pods:?}")),
        }
    });
    let holder = kube.must(&[
        "-n",
        "kube-system",
        "get",
        "lease",
        "kubesg-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, leader, "the Ready replica holds the Lease");

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
        || match agent_connections(&kube) {
            0 => Err(agent_log(&kube)
                .lines()
                .last()
                .unwrap_or_default()
                .to_string()),
            _ => Ok(()),
        },
    );

    // Under the chart's RBAC alone the operators met no refusal.
    for (pod, _) in operator_pods(&kube) {
        let log = kube.must(&["-n", "kube-system", "logs", &pod]);
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "{pod} was refused something:\n{log}"
        );
    }

    // An upgrade keeps the certificates (the chart's `lookup` path), and with them the running
    // operators: their pod template, certificates annotation included, is unchanged.
    let certs = certificates(&kube);
    let generation = operator_generation(&kube);
    helm(
        &kubeconfig,
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
        certificates(&kube),
        certs,
        "helm upgrade replaced certificates"
    );
    assert_eq!(
        operator_generation(&kube),
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

    // Operator pods created while kubesg is chained and no operator runs (a reboot, a drain, an
    // upgrade that recreates them) get no rules until an operator leads: the startup policy
    // exempts them (`--startup-exempt`), so they reach the API server and one leads again.
    let connections = agent_connections(&kube);
    let old: Vec<String> = operator_pods(&kube).into_iter().map(|(p, _)| p).collect();
    kube.must(&[
        "-n",
        "kube-system",
        "delete",
        "pod",
        "-l",
        "app.kubernetes.io/component=operator",
        "--wait=true",
    ]);
    eventually(
        "one Ready operator of two, after both were recreated",
        || {
            let pods = operator_pods(&kube);
            let ready = pods.iter().filter(|(_, r)| *r).count();
            if pods.len() == 2 && ready == 1 && pods.iter().all(|(p, _)| !old.contains(p)) {
                Ok(())
            } else {
                Err(format!("{pods:?}"))
            }
        },
    );
    eventually("the agent reconnected to the new leader", || {
        let now = agent_connections(&kube);
        if now > connections {
            Ok(())
        } else {
            Err(format!("{now} connections"))
        }
    });

    // With kubesg installed, pods the kubelet starts are enforced.
    enforces_a_security_group_on_pods_the_kubelet_starts(&kube);

    // Uninstall as the README says; the CNI configuration comes back byte for byte.
    helm(
        &kubeconfig,
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
    kube.must(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "daemonset/kubesg-agent",
        &format!("--timeout={}s", PATIENCE.as_secs()),
    ]);
    helm(
        &kubeconfig,
        &["uninstall", "kubesg", "-n", "kube-system", "--wait"],
    );
    eventually("the CNI configuration restored byte for byte", || {
        let now = cni_files();
        if now == before {
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
/// The test workload image `make cluster` builds and imports (scripts/k8s/cluster.sh `images`).
const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.63.0";

/// Starts pod `name` labelled `app=<name>` running `agnhost ARGS` in `ns`.
fn agnhost_pod(kube: &Kube, ns: &str, name: &str, args: &[&str]) {
    let mut cmd = vec![
        "-n",
        ns,
        "run",
        name,
        "--image",
        AGNHOST,
        "--image-pull-policy=Never",
        "--restart=Never",
    ];
    let labels = format!("--labels=app={name}");
    cmd.push(&labels);
    cmd.push("--");
    cmd.extend_from_slice(args);
    kube.must(&cmd);
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

/// A SecurityGroup on a server admits one client and not another, on pods the kubelet starts
/// through containerd and the chained kubesg-cni; its status says Accepted and Programmed for
/// its generation, and `kubectl describe` shows them.
fn enforces_a_security_group_on_pods_the_kubelet_starts(kube: &Kube) {
    let ns = kube.namespace("sg-enforce-");
    let n = ns.name.as_str();
    agnhost_pod(kube, n, "server", &["netexec", "--http-port=8080"]);
    agnhost_pod(kube, n, "allowed", &["pause"]);
    agnhost_pod(kube, n, "other", &["pause"]);
    kube.must(&[
        "-n",
        n,
        "wait",
        "--for=condition=Ready",
        "pod/server",
        "pod/allowed",
        "pod/other",
        &format!("--timeout={}s", PATIENCE.as_secs()),
    ]);
    let server_ip = kube.must(&[
        "-n",
        n,
        "get",
        "pod",
        "server",
        "-o",
        "jsonpath={.status.podIP}",
    ]);
    let server = format!("{server_ip}:8080");
    // Before any group, nothing is filtered.
    eventually("other reaches the server before any group", || {
        connects(kube, n, "other", &server)
    });

    kube.must_apply(&format!(
        "apiVersion: kubesg.io/v1alpha1\nkind: SecurityGroup\nmetadata:\n  name: server\n  namespace: {n}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - protocol: TCP\n    ports: [{{port: 8080}}]\n    from:\n    - podSelector: {{matchLabels: {{app: allowed}}}}\n"
    ));
    kube.must(&[
        "-n",
        n,
        "wait",
        "--for=condition=Programmed",
        "sg/server",
        &format!("--timeout={}s", PATIENCE.as_secs()),
    ]);
    connects(kube, n, "allowed", &server).expect("the allowed client connects");
    let refused = connects(kube, n, "other", &server);
    assert!(
        refused.is_err(),
        "the other client connected despite the group"
    );

    let status = kube.must(&[
        "-n",
        n,
        "get",
        "sg",
        "server",
        "-o",
        "jsonpath={.metadata.generation} {.status.observedGeneration} {.status.members} {.status.nodes.programmed}/{.status.nodes.total}",
    ]);
    let fields: Vec<&str> = status.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "{status}");
    assert_eq!(
        fields[0], fields[1],
        "observedGeneration is the generation: {status}"
    );
    assert_eq!(fields[2], "1", "one member: {status}");
    assert_eq!(fields[3], "1/1", "programmed on the node: {status}");
    let described = kube.must(&["-n", n, "describe", "sg", "server"]);
    for want in ["Accepted", "Programmed", "Observed Generation"] {
        assert!(described.contains(want), "no {want} in:\n{described}");
    }
}
