//! The real `kubesg-operator` as a process, in manifests mode (`kubesg-operator run --manifests
//! DIR --status-dir DIR --no-leader-election`), for the end-to-end tests and the demo: started
//! inside a node's network namespace (where the agents reach it), stopped (SIGTERM), killed
//! (SIGKILL: a crash) and started again with the same directories and address, as an operator
//! Deployment's pod is replaced. Dropping it kills the process; its log goes with it.
//!
//! It enters the namespace with `nsenter --net`, as [`crate::agent::AgentProcess`] does, so its
//! sockets are the namespace's while everything else (files, /sys) is the host's.

use std::{
    fs::{self, OpenOptions},
    io::{self, Write},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::{agent::binaries, child::signal_and_wait, netns::http_get, operator::ServerTlsFiles};

/// How long the operator gets to become ready or to stop.
const PATIENCE: Duration = Duration::from_secs(30);

/// The operator's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorConfig {
    /// `--manifests`: the directory of Namespace, Node, Pod and SecurityGroup manifests.
    pub manifests: PathBuf,
    /// `--status-dir`: where each SecurityGroup's status is written.
    pub status_dir: PathBuf,
    /// `--listen`: where agents connect (inside the namespace).
    pub listen: SocketAddr,
    /// `--metrics-address` (inside the namespace): `/readyz` says when it compiled the cluster.
    pub metrics: SocketAddr,
    /// `--tls-cert`, `--tls-key`, `--client-ca`.
    pub tls: ServerTlsFiles,
    /// `--recheck-on-policy-change`.
    pub recheck_on_policy_change: bool,
}

/// A running (or stopped) `kubesg-operator run` in a network namespace. Its methods take
/// `&self` (the process is behind a lock), so a test can stop and start it while other threads
/// use the rest of the cluster.
pub struct OperatorProcess {
    netns: String,
    bin: PathBuf,
    config: OperatorConfig,
    dir: tempfile::TempDir,
    /// The process, if running, and how many times it was started.
    process: Mutex<(Option<Child>, u32)>,
}

impl OperatorProcess {
    /// Starts the operator in the named network namespace and waits until it is ready (it read
    /// the manifests and compiled them: `/readyz` answers 200).
    pub fn start(netns: &str, config: OperatorConfig) -> io::Result<OperatorProcess> {
        let operator = OperatorProcess {
            netns: netns.to_owned(),
            bin: binaries()?.operator.clone(),
            config,
            dir: tempfile::Builder::new()
                .prefix("kubesg-operator-")
                .tempdir()?,
            process: Mutex::new((None, 0)),
        };
        operator.start_again()?;
        Ok(operator)
    }

    /// The process id of the running operator (what a benchmark reads its CPU time by).
    pub fn pid(&self) -> Option<u32> {
        self.process
            .lock()
            .ok()
            .and_then(|p| p.0.as_ref().map(Child::id))
    }

    /// Its command line.
    pub fn config(&self) -> &OperatorConfig {
        &self.config
    }

    /// Its private directory (the log), removed on drop.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("operator.log")
    }

    /// Everything the operator wrote, all runs, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn process(&self) -> MutexGuard<'_, (Option<Child>, u32)> {
        self.process.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.process().0.is_some()
    }

    /// Starts the operator (again) with the same command line and waits until it is ready.
    pub fn start_again(&self) -> io::Result<()> {
        let mut process = self.process();
        if process.0.is_some() {
            return Err(io::Error::other("the operator is already running"));
        }
        process.1 += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        writeln!(log, "=== kubesg-operator run #{} ===", process.1)?;
        let c = &self.config;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(&self.bin)
            .arg("run")
            .arg("--manifests")
            .arg(&c.manifests)
            .arg("--status-dir")
            .arg(&c.status_dir)
            .args(["--listen", &c.listen.to_string()])
            .args(["--metrics-address", &c.metrics.to_string()])
            .arg("--tls-cert")
            .arg(&c.tls.cert)
            .arg("--tls-key")
            .arg(&c.tls.key)
            .arg("--client-ca")
            .arg(&c.tls.client_ca)
            .arg("--no-leader-election")
            .args([
                "--recheck-on-policy-change",
                if c.recheck_on_policy_change {
                    "true"
                } else {
                    "false"
                },
            ])
            .args(["--log", "info"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        process.0 = Some(cmd.spawn()?);
        self.wait_ready(&mut process.0)
    }

    fn wait_ready(&self, child: &mut Option<Child>) -> io::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.as_mut().and_then(|c| c.try_wait().transpose()) {
                *child = None;
                return Err(io::Error::other(format!(
                    "kubesg-operator exited before it was ready ({}):\n{}",
                    status?,
                    self.log()
                )));
            }
            if matches!(self.http_get("/readyz"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "kubesg-operator not ready within {PATIENCE:?}:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the operator with SIGTERM and waits for it to exit; the agents keep enforcing what
    /// they have and redial. Fails when it does not exit cleanly.
    pub fn stop(&self) -> io::Result<()> {
        match self.signal_and_wait(libc::SIGTERM)? {
            Some(s) if !s.success() => Err(io::Error::other(format!(
                "kubesg-operator exited with {s} on SIGTERM:\n{}",
                self.log()
            ))),
            _ => Ok(()),
        }
    }

    /// Kills the operator with SIGKILL (a crash) and reaps it.
    pub fn kill(&self) -> io::Result<()> {
        self.signal_and_wait(libc::SIGKILL).map(drop)
    }

    fn signal_and_wait(&self, signal: libc::c_int) -> io::Result<Option<std::process::ExitStatus>> {
        let Some(child) = self.process().0.take() else {
            return Ok(None);
        };
        signal_and_wait(child, signal, PATIENCE)
            .map(Some)
            .map_err(|e| io::Error::new(e.kind(), format!("kubesg-operator: {e}:\n{}", self.log())))
    }

    /// One HTTP GET on the metrics address, from inside the namespace: (status, body).
    pub fn http_get(&self, path: &str) -> io::Result<(u16, String)> {
        http_get(&self.netns, self.config.metrics, path)
    }

    /// The value of an unlabelled sample of `/metrics` (e.g.
    /// `kubesg_operator_agents_connected`); `None` when absent.
    pub fn metric(&self, name: &str) -> io::Result<Option<f64>> {
        let body = match self.http_get("/metrics")? {
            (200, body) => body,
            (status, body) => {
                return Err(io::Error::other(format!("/metrics: {status} {body}")));
            }
        };
        Ok(body.lines().find_map(|line| {
            let (sample, value) = line.split_once(' ')?;
            (sample == name).then(|| value.trim().parse().ok())?
        }))
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.process().0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl std::fmt::Debug for OperatorProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorProcess")
            .field("netns", &self.netns)
            .field("pid", &self.process().0.as_ref().map(Child::id))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
