//! The real Kubernetes cluster of `make cluster` (scripts/k8s/cluster.sh), as the tests that run
//! against it see it: `kubectl` with the cluster's kubeconfig, and a namespace of the test's own
//! that is deleted when the test ends, passed or failed.
//!
//! `make test` starts the cluster before the tests and exports `KUBESG_KUBECONFIG` (the admin
//! kubeconfig) and `KUBESG_KUBECTL` (the kubectl built with the cluster). A test run without
//! them fails with a message saying so: these tests are privileged and never pass silently.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use crate::netns::unique_name;

/// The cluster the tests run against.
#[derive(Clone, Debug)]
pub struct Kube {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

/// What one `kubectl` call did.
#[derive(Clone, Debug)]
pub struct Kubectl {
    /// Whether it exited 0.
    pub ok: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl From<Output> for Kubectl {
    fn from(o: Output) -> Self {
        Kubectl {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Kube {
    /// The cluster `make test` started; fails the test when there is none.
    pub fn from_env() -> Kube {
        let var = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    panic!(
                        "{name} is not set: these tests run against the cluster that `make test` \
                     starts (scripts/k8s/cluster.sh up); run them through it, or start the \
                     cluster and export KUBESG_KUBECONFIG and KUBESG_KUBECTL"
                    )
                })
        };
        let kube = Kube {
            kubeconfig: var("KUBESG_KUBECONFIG"),
            kubectl: var("KUBESG_KUBECTL"),
        };
        assert!(
            kube.kubeconfig.is_file(),
            "KUBESG_KUBECONFIG={} is not a file",
            kube.kubeconfig.display()
        );
        kube
    }

    /// The admin kubeconfig (for tools other than kubectl, e.g. helm).
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// Runs `kubectl ARGS` against the cluster.
    pub fn kubectl(&self, args: &[&str]) -> Kubectl {
        self.kubectl_with_input(args, None)
    }

    /// Runs `kubectl ARGS` with `input` on its standard input (`-f -`).
    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Kubectl {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.kubectl.display()));
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .expect("writing kubectl's input");
        }
        child
            .wait_with_output()
            .expect("waiting for kubectl")
            .into()
    }

    /// Runs `kubectl ARGS` and fails the test, with kubectl's error, when it fails.
    #[track_caller]
    pub fn must(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.ok, "kubectl {}: {}", args.join(" "), out.stderr);
        out.stdout
    }

    /// Applies `manifest` (`kubectl apply -f -`) and fails the test when it is refused.
    #[track_caller]
    pub fn must_apply(&self, manifest: &str) -> String {
        let out = self.kubectl_with_input(&["apply", "-f", "-"], Some(manifest));
        assert!(out.ok, "kubectl apply: {}\n{manifest}", out.stderr);
        out.stdout
    }

    /// Applies the chart's CRDs and waits until the API server serves them.
    #[track_caller]
    pub fn apply_crds(&self) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/kubesg/crds");
        self.must(&["apply", "--server-side", "--force-conflicts", "-f", dir]);
        self.must(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/securitygroups.kubesg.io",
        ]);
    }

    /// A namespace of this test's own, deleted when the returned guard drops.
    pub fn namespace(&self, prefix: &str) -> Namespace {
        let name = unique_name(prefix);
        self.must(&["create", "namespace", &name]);
        Namespace {
            kube: self.clone(),
            name,
        }
    }
}

/// A namespace a test created; deleted (without waiting) on drop.
#[derive(Debug)]
pub struct Namespace {
    kube: Kube,
    /// Its name.
    pub name: String,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self
            .kube
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}
