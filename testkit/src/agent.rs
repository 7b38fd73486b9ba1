//! `kubesg-agent` as a real process, for the end-to-end tests: the binary cargo built from this
//! workspace, started with `kubesg-agent run` inside a node's network namespace with private
//! directories (pin directory, state directory, socket) and a free metrics port, so that several
//! run side by side; stopped (SIGTERM), killed (SIGKILL: a crash) and started again on the same
//! directories, as a node's agent is across restarts. Dropping it kills the process and removes
//! everything it created.
//!
//! It enters the namespace with `nsenter --net` rather than `ip netns exec`: the latter also
//! remounts `/sys` for the namespace, which hides the host's bpf filesystem at `/sys/fs/bpf`; the
//! agent would then mount a private one whose pins die with the process, and a restarted agent
//! would find nothing of what it pinned (in a cluster the DaemonSet mounts the host's).

use std::{
    fs::{self, OpenOptions},
    io::{self, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use kubesg_agent::{
    counters,
    endpoints::{EndpointRecord, EndpointStore},
    maps::Maps,
    tls::ClientTlsFiles,
};
use kubesg_common::event::Counters;
use kubesg_proto::v1alpha1::{self as pb, cni_backend_client::CniBackendClient};

use crate::{
    child::{send_signal, signal_and_wait},
    netns::{http_get, in_named, unique_name},
};

/// The binaries the end-to-end tests and the demo run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binaries {
    /// `kubesg-agent`.
    pub agent: PathBuf,
    /// `kubesg-cni`.
    pub cni: PathBuf,
    /// `kubesg-operator`.
    pub operator: PathBuf,
}

/// The workspace's `kubesg-agent`, `kubesg-cni` and `kubesg-operator`, next to the running
/// executable (`target/<profile>/`), built first with
/// `cargo build -p kubesg-agent -p kubesg-cni -p kubesg-operator --bins` in the same profile and
/// target directory.
///
/// The build runs once per test process even when the binaries exist: a test must never run
/// binaries older than the sources it was built with (`cargo test -p kubesg-e2e` does not build
/// other packages' binaries), and when they are current the build is a no-op.
pub fn binaries() -> io::Result<&'static Binaries> {
    static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BINARIES
        .get_or_init(|| build_binaries().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))
}

fn build_binaries() -> io::Result<Binaries> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no directory", exe.display())))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let profile_dir = dir.to_path_buf();
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| io::Error::other("the profile directory has no target directory"))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| io::Error::other("testkit has no workspace directory"))?;
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(workspace)
        .args(["build", "-p", "kubesg-agent", "-p", "kubesg-cni"])
        .args(["-p", "kubesg-operator", "--bins"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cargo.arg("--release");
        }
        Some(other) => {
            cargo.args(["--profile", other]);
        }
        None => return Err(io::Error::other("unnamed profile directory")),
    }
    // What cargo sets for the test process describes the test's package; inherited, it would
    // look like a changed environment to build scripts that watch it (ring reruns on
    // CARGO_MANIFEST_DIR) and every test run would rebuild the agent.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let per_package = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
            || name == "CARGO_PRIMARY_PACKAGE"
            || name == "CARGO_TARGET_TMPDIR";
        if per_package {
            cargo.env_remove(name.as_ref());
        }
    }
    let out = cargo.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "building kubesg-agent, kubesg-cni and kubesg-operator failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let bins = Binaries {
        agent: profile_dir.join("kubesg-agent"),
        cni: profile_dir.join("kubesg-cni"),
        operator: profile_dir.join("kubesg-operator"),
    };
    for bin in [&bins.agent, &bins.cni, &bins.operator] {
        if !bin.is_file() {
            return Err(io::Error::other(format!(
                "{} is missing after the build",
                bin.display()
            )));
        }
    }
    Ok(bins)
}

/// What a pod gets between its CNI ADD and its rules (`--startup-policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Startup {
    /// Nothing passes.
    Deny,
    /// Everything passes (tracked).
    Allow,
    /// The ADD waits for the rules, `--wait-timeout` at most.
    Wait,
}

impl Startup {
    fn flag(self) -> &'static str {
        match self {
            Startup::Deny => "deny",
            Startup::Allow => "allow",
            Startup::Wait => "wait",
        }
    }
}

/// How the agent reaches the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorLink {
    /// `--operator-address` (`https://127.0.0.1:port`).
    pub address: String,
    /// `--tls-ca`, `--tls-cert`, `--tls-key`, `--operator-server-name`.
    pub tls: ClientTlsFiles,
}

/// The agent's command line, changeable between runs ([`AgentProcess::config_mut`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// `--node-name`.
    pub node_name: String,
    /// `--startup-policy`.
    pub startup: Startup,
    /// `--wait-timeout` (whole seconds).
    pub wait_timeout: Option<Duration>,
    /// `--operator-address` and TLS; `None`: the agent runs alone.
    pub operator: Option<OperatorLink>,
    /// Anything else, appended as is.
    pub extra_args: Vec<String>,
}

impl AgentConfig {
    /// An agent for node `node_name` with `startup`, no operator.
    pub fn new(node_name: &str, startup: Startup) -> Self {
        AgentConfig {
            node_name: node_name.to_owned(),
            startup,
            wait_timeout: None,
            operator: None,
            extra_args: Vec::new(),
        }
    }

    /// The same, following the operator at `address` with `tls`.
    pub fn with_operator(mut self, address: String, tls: ClientTlsFiles) -> Self {
        self.operator = Some(OperatorLink { address, tls });
        self
    }
}

/// How long the agent gets to become ready or to stop.
const PATIENCE: Duration = Duration::from_secs(30);

/// A running (or stopped) `kubesg-agent run` in a network namespace. Its pin directory
/// (`/sys/fs/bpf/<unique>`), state directory, socket and log survive restarts and are removed on
/// drop, after the process is killed.
pub struct AgentProcess {
    netns: String,
    bin: PathBuf,
    config: AgentConfig,
    pin_dir: PathBuf,
    dir: tempfile::TempDir,
    metrics: SocketAddr,
    child: Option<Child>,
    runs: u32,
}

impl AgentProcess {
    /// Starts the agent in the named network namespace and waits until it is ready (`/readyz`).
    pub fn start(netns: &str, config: AgentConfig) -> io::Result<AgentProcess> {
        let bin = binaries()?.agent.clone();
        let dir = tempfile::Builder::new().prefix("kubesg-agent-").tempdir()?;
        // A port free in the namespace now; nothing else binds there in a test's namespace.
        let metrics = in_named(netns, || {
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
        })??;
        let mut agent = AgentProcess {
            netns: netns.to_owned(),
            bin,
            config,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(unique_name("kse")),
            dir,
            metrics,
            child: None,
            runs: 0,
        };
        agent.start_again()?;
        Ok(agent)
    }

    /// Its private directory (state, socket, log), removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CNI socket (`--socket`).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("agent.sock")
    }

    /// The state directory (`--state-dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The pin directory (`--pin-dir`).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, inside the namespace.
    pub fn metrics_address(&self) -> SocketAddr {
        self.metrics
    }

    /// The command line of the next start, to change it before [`AgentProcess::start_again`].
    pub fn config_mut(&mut self) -> &mut AgentConfig {
        &mut self.config
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Everything the agent wrote to stdout and stderr, all runs, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the agent (again) on the same directories and waits until it is ready.
    pub fn start_again(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Err(io::Error::other("the agent is already running"));
        }
        self.runs += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        writeln!(log, "=== kubesg-agent run #{} ===", self.runs)?;
        let c = &self.config;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(&self.bin)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["run", "--node-name", &c.node_name])
            .args(["--startup-policy", c.startup.flag()])
            .arg("--socket")
            .arg(self.socket())
            .args(["--metrics-address", &self.metrics.to_string()])
            .args(["--log", "info,kubesg_agent=debug"]);
        if let Some(t) = c.wait_timeout {
            cmd.args(["--wait-timeout", &t.as_secs().max(1).to_string()]);
        }
        if let Some(op) = &c.operator {
            cmd.args(["--operator-address", &op.address])
                .arg("--tls-ca")
                .arg(&op.tls.ca)
                .arg("--tls-cert")
                .arg(&op.tls.cert)
                .arg("--tls-key")
                .arg(&op.tls.key)
                .args(["--operator-server-name", &op.tls.server_name]);
        }
        cmd.args(&c.extra_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        self.child = Some(cmd.spawn()?);
        self.wait_ready()
    }

    /// Waits until `/readyz` answers 200; fails with the log when the process exits first or
    /// does not get ready in time.
    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()) {
                self.child = None;
                return Err(io::Error::other(format!(
                    "kubesg-agent exited before it was ready ({}):\n{}",
                    status?,
                    self.log()
                )));
            }
            if matches!(self.http_get("/readyz"), Ok((200, _))) && self.socket().exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "kubesg-agent not ready within {PATIENCE:?}:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent with SIGTERM (what the kubelet does) and waits for it to exit; the
    /// datapath keeps enforcing meanwhile. Fails when it does not exit cleanly.
    pub fn stop(&mut self) -> io::Result<()> {
        let status = self.signal_and_wait(libc::SIGTERM)?;
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(io::Error::other(format!(
                "kubesg-agent exited with {s} on SIGTERM:\n{}",
                self.log()
            ))),
            None => Ok(()),
        }
    }

    /// Kills the agent with SIGKILL (a crash: no cleanup at all) and reaps it.
    pub fn kill(&mut self) -> io::Result<()> {
        self.signal_and_wait(libc::SIGKILL).map(drop)
    }

    /// Freezes the agent (SIGSTOP): it keeps its socket and answers nothing, as a hung agent.
    pub fn freeze(&self) -> io::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a frozen agent go on (SIGCONT).
    pub fn thaw(&self) -> io::Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| io::Error::other("the agent is not running"))?;
        send_signal(child, signal)
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again).
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop()?;
        self.start_again()
    }

    fn signal_and_wait(
        &mut self,
        signal: libc::c_int,
    ) -> io::Result<Option<std::process::ExitStatus>> {
        let Some(child) = self.child.take() else {
            return Ok(None);
        };
        signal_and_wait(child, signal, PATIENCE)
            .map(Some)
            .map_err(|e| io::Error::new(e.kind(), format!("kubesg-agent: {e}:\n{}", self.log())))
    }

    /// One HTTP GET on the metrics address, from inside the namespace: (status, body).
    pub fn http_get(&self, path: &str) -> io::Result<(u16, String)> {
        http_get(&self.netns, self.metrics, path)
    }

    /// The agent's `/metrics` text.
    pub fn metrics(&self) -> io::Result<String> {
        match self.http_get("/metrics")? {
            (200, body) => Ok(body),
            (status, body) => Err(io::Error::other(format!("/metrics: {status} {body}"))),
        }
    }

    /// Runs the agent's CLI (`kubesg-agent --pin-dir … --state-dir … args…`) on this agent's
    /// directories, as a person on the node would; the output whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> io::Result<Output> {
        Command::new(&self.bin)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .env("NO_COLOR", "1")
            .output()
    }

    /// The CLI's stdout, failing with its stderr when it exits non-zero.
    pub fn cli_ok(&self, args: &[&str]) -> io::Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "kubesg-agent {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `call` with a client of the running agent's CNI socket, giving up after 10 s.
    fn with_client<T, F>(
        &self,
        what: &str,
        call: impl FnOnce(CniBackendClient<tonic::transport::Channel>) -> F,
    ) -> io::Result<Result<T, tonic::Status>>
    where
        F: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let socket = self.socket();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let answer = async {
                let channel = tonic::transport::Endpoint::from_static("http://kubesg-agent.local")
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let socket = socket.clone();
                        async move {
                            tokio::net::UnixStream::connect(socket)
                                .await
                                .map(TokioIo::new)
                        }
                    }))
                    .await
                    .map_err(io::Error::other)?;
                Ok(call(CniBackendClient::new(channel)).await)
            };
            tokio::time::timeout(Duration::from_secs(10), answer)
                .await
                .map_err(|_| io::Error::other(format!("{what}: no answer within 10 s")))?
        })
    }

    /// The endpoints the running agent knows (`ListEndpoints` on its socket).
    pub fn list_endpoints(&self) -> io::Result<Vec<pb::Endpoint>> {
        self.with_client("ListEndpoints", |mut c| async move {
            c.list_endpoints(pb::ListEndpointsRequest {})
                .await
                .map(|r| r.into_inner().endpoints)
        })?
        .map_err(io::Error::other)
    }

    /// An `AddEndpoint` call as a caller other than kubesg-cni could make it: the agent's
    /// answer (`Err` with its status when it refused).
    pub fn add_endpoint(&self, endpoint: pb::Endpoint) -> io::Result<Result<(), tonic::Status>> {
        self.with_client("AddEndpoint", |mut c| async move {
            c.add_endpoint(pb::AddEndpointRequest {
                endpoint: Some(endpoint),
            })
            .await
            .map(|_| ())
        })
    }

    /// A `DeleteEndpoint` call as a caller other than kubesg-cni could make it: the agent's
    /// answer (`Err` with its status when it refused).
    pub fn delete_endpoint(&self, key: pb::EndpointKey) -> io::Result<Result<(), tonic::Status>> {
        self.with_client("DeleteEndpoint", |mut c| async move {
            c.delete_endpoint(key).await.map(|_| ())
        })
    }

    /// Whether the running agent knows an endpoint of container `container_id`.
    pub fn knows_container(&self, container_id: &str) -> io::Result<bool> {
        Ok(self.list_endpoints()?.iter().any(|e| {
            e.key
                .as_ref()
                .is_some_and(|k| k.container_id == container_id)
        }))
    }

    /// The endpoint records in the state directory (what a restarted agent starts from).
    pub fn records(&self) -> io::Result<Vec<EndpointRecord>> {
        EndpointStore::open(&self.state_dir().join("endpoints"))?.load_all()
    }

    /// The record files of container `container_id` in the state directory.
    pub fn record_files(&self, container_id: &str) -> io::Result<Vec<PathBuf>> {
        let dir = self.state_dir().join("endpoints");
        let mut out = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry?.path();
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if name.starts_with(&format!("{container_id}:")) {
                        out.push(path);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    }

    /// The pinned maps (whether or not the agent runs).
    pub fn maps(&self) -> io::Result<Maps> {
        Maps::open_pinned(&self.pin_dir).map_err(io::Error::other)
    }

    /// Whether the datapath has an endpoint entry for host interface `ifindex`.
    pub fn datapath_has_endpoint(&self, ifindex: u32) -> io::Result<bool> {
        match self.maps()?.endpoints.get(&ifindex, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// The counters of host interface `ifindex`'s endpoint, `[egress, ingress]` of the pod;
    /// `None` when the datapath has no such endpoint.
    pub fn counters(&self, ifindex: u32) -> io::Result<Option<[Counters; 2]>> {
        let maps = self.maps()?;
        let ep = match maps.endpoints.get(&ifindex, 0) {
            Ok(ep) => ep,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(io::Error::other(e)),
        };
        counters::read(&maps, ep.counter_slot)
            .map(Some)
            .map_err(io::Error::other)
    }

    /// The pinned links (tcx attachments) of host interface `ifindex`.
    pub fn pinned_links(&self, ifindex: u32) -> io::Result<Vec<PathBuf>> {
        let dir = self.pin_dir.join("links");
        let mut out = Vec::new();
        match fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry?.path();
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if name.split('-').next() == Some(&ifindex.to_string()) {
                        out.push(path);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(out)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Unpinning the links detaches the programs; the maps go with their last reference.
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

impl std::fmt::Debug for AgentProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentProcess")
            .field("netns", &self.netns)
            .field("pid", &self.pid())
            .field("pin_dir", &self.pin_dir)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}
