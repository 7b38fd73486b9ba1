//! The Helm chart installed into the real cluster as a user installs it (README: "Install into
//! a cluster", "Upgrade", "Uninstall"), with the image settings only: the operator runs two
//! replicas of which one leads and is Ready, the agent DaemonSet becomes Ready and chains
//! kubesg into the node's real CNI configuration, the agent reaches the operator by its
//! Service's name (cluster DNS), `helm upgrade` keeps the certificates, the operator meets no 403
//! under the chart's RBAC, and the documented uninstall gives the CNI configuration back byte for
//! byte.
//!
//! Not here yet: traffic between pods the kubelet starts once kubesg is chained. A first try
//! (commit "Chart test: a SecurityGroup enforced on pods the kubelet starts") found that a pod in
//! no group could not reach another before any group existed (issue #12's notes).

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
    eventually("the agent connected to the operator", || {
        let log = kube.must(&[
            "-n",
            "kube-system",
            "logs",
            "daemonset/kubesg-agent",
            "-c",
            "agent",
        ]);
        if log.contains("connected to the operator") {
            Ok(())
        } else {
            Err(log.lines().last().unwrap_or_default().to_string())
        }
    });

    // Under the chart's RBAC alone the operators met no refusal (read before the upgrade, which
    // may recreate them: the first upgrade changes their certificates annotation).
    for (pod, _) in operator_pods(&kube) {
        let log = kube.must(&["-n", "kube-system", "logs", &pod]);
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "{pod} was refused something:\n{log}"
        );
    }

    // An upgrade keeps the certificates (the chart's `lookup` path).
    let certs = certificates(&kube);
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
