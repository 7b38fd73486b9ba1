//! `make bench-traffic`: kubesg against the kernel's own filters, with real traffic between two
//! pods of a local cluster (`kubesg_testkit::cluster::LocalCluster`: network namespaces for the
//! node and the pods, the real CNI chain, the real `kubesg-operator` in manifests mode and a real
//! `kubesg-agent` with its eBPF datapath).
//!
//! Why: the datapath benchmark (`make bench`) times the programs on crafted frames; this one
//! asks what a user sees. Between a client pod and a server pod whose ingress admits N peers
//! (N = 10, 1 000, 10 000 by default; the client is the one peer that connects, placed last), it
//! measures, for each way of filtering:
//!
//! - the new-connection rate (`wrk` with `Connection: close`: one TCP connection per request);
//! - the keep-alive request rate with its p50 and p99 latency (`wrk --latency`), against a small
//!   HTTP server of this binary's own running inside the server pod's namespace;
//! - bulk TCP throughput (`iperf3`, one stream);
//! - ping-pong round-trip time on one TCP connection (`sockperf ping-pong --tcp --full-rtt`);
//! - the time from a change to its enforcement: (a) the whole N-peer filter written, from a
//!   state where the client is refused, until a TCP connect from the client succeeds; (b) the
//!   client added to a filter of the other N−1 peers, until it is allowed;
//! - the memory a tracked connection costs in kubesg's conntrack map and in `nf_conntrack`.
//!
//! Ways of filtering: none; iptables in the seed form (conntrack ESTABLISHED,RELATED accept, one
//! `-s PEER/32 -p tcp --dport … -j ACCEPT` rule per peer, then DROP); iptables with an ipset
//! (`hash:ip`, one rule); nftables with a set (one rule); kubesg with the equivalent
//! SecurityGroup (ipBlocks /32); and kubesg's datapath attached to a pod in no group. The kernel
//! filters sit in the INPUT hook of the server pod's own network namespace, on pods the bench
//! joins to the node's bridge by hand (no kubesg program on their veths); kubesg filters on the
//! server pod's host-side veth (tcx) of pods attached through the CNI chain. Every client and
//! server is on the same node and bridge.
//!
//! Rounds are interleaved: each round runs every configuration once, in an order rotated by one
//! each round; a figure is the median across rounds, and a ratio is the median of the per-round
//! ratios to "none" of the same round. It prints tables; it asserts nothing about speed.
//!
//! Everything it creates lives in network namespaces it deletes (the cluster's and its own), so
//! the filter state goes with them, on failure and on Ctrl-C too.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, ExitCode, Output, Stdio},
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;
use kubesg_common::conntrack::{CtEntry, CtKey};
use kubesg_testkit::{
    cluster::{ClusterConfig, LocalCluster, PodSpec, StagedGroup},
    netns::Netns,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The HTTP server's port; sockperf's and iperf3's follow it. Every filter admits this range.
const HTTP_PORT: u16 = 8080;
const SOCKPERF_PORT: u16 = 8081;
const IPERF_PORT: u16 = 8082;
const LAST_PORT: u16 = IPERF_PORT;
/// wrk's connections (one thread).
const WRK_CONNECTIONS: &str = "16";
/// The cluster's namespace (Kubernetes').
const NAMESPACE: &str = "bench";
/// kubesg's CRD limits: peers per rule, rules per group.
const PEERS_PER_RULE: usize = 64;
const RULES_PER_GROUP: usize = 64;
/// How long an enforcement poll's connect waits, and how long the whole poll may take.
const POLL_CONNECT: Duration = Duration::from_millis(5);
const POLL_PATIENCE: Duration = Duration::from_secs(60);
/// How long a "refused" check waits for a connection that must not open.
const REFUSED_WAIT: Duration = Duration::from_millis(300);

#[derive(Parser, Debug)]
#[command(
    name = "bench-traffic",
    about = "Real traffic between two pods: kubesg against iptables, ipset and nftables \
             (new connections/s, keep-alive requests/s and latency, iperf3 throughput, \
             sockperf ping-pong, time to enforcement, memory per tracked connection). As root."
)]
struct Args {
    /// Interleaved rounds; each runs every configuration once.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Peer counts N (the client is the last of the N peers).
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 1000, 10000])]
    peers: Vec<usize>,
    /// Seconds per traffic measurement (wrk, iperf3, sockperf each).
    #[arg(long, default_value_t = 2)]
    seconds: u64,
    /// Seconds of quiet, after each N's rounds with kubesg's N-peer groups in force, over which
    /// the operator's and the agent's CPU time is read (0: not measured).
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
    /// Also write the tables (with an introduction) to this markdown file, between its lines
    /// `<!-- make bench-traffic writes from here -->` and `… up to here -->` (the rest of the
    /// file is kept; a new file is just that section); a relative path is taken from the
    /// workspace root (`cargo bench` runs the bench in `tests/`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A way of filtering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    None,
    Iptables,
    Ipset,
    Nft,
    KubesgNoGroup,
    Kubesg,
}

const CONFIGS: [Config; 6] = [
    Config::None,
    Config::Iptables,
    Config::Ipset,
    Config::Nft,
    Config::KubesgNoGroup,
    Config::Kubesg,
];

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Iptables => "iptables (seed form)",
            Config::Ipset => "iptables + ipset",
            Config::Nft => "nftables set",
            Config::KubesgNoGroup => "kubesg attached, no group",
            Config::Kubesg => "kubesg SecurityGroup",
        }
    }

    /// Whether N matters to it (and it has a change to time).
    fn filters(self) -> bool {
        matches!(
            self,
            Config::Iptables | Config::Ipset | Config::Nft | Config::Kubesg
        )
    }
}

/// One round's traffic figures for one configuration.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    conn_rate: f64,
    req_rate: f64,
    req_p50_us: f64,
    req_p99_us: f64,
    gbps: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
}

/// A child process killed and reaped when dropped.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !kubesg_testkit::privileged::is_root() {
        eprintln!("bench-traffic: needs root (network namespaces, eBPF, netfilter)");
        return ExitCode::FAILURE;
    }
    let interrupted = match kubesg_testkit::interrupt::flag("bench-traffic") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("bench-traffic: cannot handle signals: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(&args, &interrupted) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if kubesg_testkit::interrupt::is_set(&interrupted) => {
            eprintln!("bench-traffic: interrupted; cleaned up");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("bench-traffic failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(interrupted: &AtomicBool) -> Result<()> {
    if kubesg_testkit::interrupt::is_set(interrupted) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Commands inside namespaces.

/// Runs `cmd args` inside namespace `ns` (`ip netns exec`), with `stdin` fed when given; fails
/// with its stderr when it exits non-zero.
fn exec_in(ns: &str, cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd} in {ns}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("feeding {cmd}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} in {ns}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

fn spawn_in(ns: &str, cmd: &str, args: &[&str]) -> Result<Kid> {
    Ok(Kid(Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd} in {ns}"))?))
}

/// Waits until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &str, port: u16) -> Result<()> {
    let filter = format!("sport = :{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = exec_in(ns, "ss", &["-Hltn", &filter], None)?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listened on port {port} in {ns} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// The HTTP server: a tokio runtime of one worker serving every server pod's listener.

/// Serves `GET`s with a 2-byte body on each listener; keeps the connection unless the request
/// says `Connection: close`. Dropping it stops the runtime and closes the listeners.
struct HttpServer {
    runtime: Option<tokio::runtime::Runtime>,
}

impl HttpServer {
    fn start(listeners: Vec<std::net::TcpListener>) -> Result<HttpServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("building the HTTP server's runtime")?;
        for listener in listeners {
            listener.set_nonblocking(true)?;
            let listener = {
                let _guard = runtime.enter();
                tokio::net::TcpListener::from_std(listener)?
            };
            runtime.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(serve_http(stream));
                        }
                        // Out of descriptors, or a connection reset before it was accepted.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
        }
        Ok(HttpServer {
            runtime: Some(runtime),
        })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn serve_http(mut stream: tokio::net::TcpStream) {
    const KEEP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    const CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let close = find(&buf[..end], b"Connection: close").is_some()
                || find(&buf[..end], b"connection: close").is_some();
            let reply = if close { CLOSE } else { KEEP };
            if stream.write_all(reply).await.is_err() {
                return;
            }
            if close {
                let _ = stream.shutdown().await;
                return;
            }
            buf.drain(..end + 4);
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Pods joined to the node's bridge by hand: no kubesg program on their veths.

struct PlainPod {
    ns: Netns,
    addr: Ipv4Addr,
}

/// A namespace with `eth0` (address `10.77.1.<host>/24`) whose peer `bpv<host>` is a port of
/// node `node_ns`'s bridge, as the CNI bridge plugin would attach it, without the CNI chain.
/// Deleting the namespace deletes the pair.
fn plain_pod(node_ns: &str, host: u8) -> Result<PlainPod> {
    let ns = Netns::new("bp")?;
    let host_if = format!("bpv{host}");
    let ip = |args: &[&str]| -> Result<()> {
        let mut full = vec!["-n", node_ns];
        full.extend_from_slice(args);
        kubesg_testkit::netns::run("ip", &full)?;
        Ok(())
    };
    ip(&[
        "link",
        "add",
        &host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    ip(&[
        "link",
        "set",
        &host_if,
        "master",
        kubesg_testkit::cni::BRIDGE,
        "up",
    ])?;
    let addr = Ipv4Addr::new(10, 77, 1, host);
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(PlainPod { ns, addr })
}

// ---------------------------------------------------------------------------------------------
// The bench's world: the cluster, its pods, the plain pods, the HTTP server.

/// Field order is drop order: the HTTP server (its listeners) first, then the plain pods, then
/// the cluster (its pods, agent, operator, node).
struct World {
    _http: HttpServer,
    plain_client: PlainPod,
    plain_servers: BTreeMap<Config, PlainPod>,
    cluster: LocalCluster,
    kubesg_client: (String, Ipv4Addr),
    kubesg_servers: BTreeMap<Config, (String, Ipv4Addr)>,
    /// The kubesg peer groups applied now.
    groups: Vec<String>,
}

impl World {
    fn start(interrupted: &Arc<AtomicBool>) -> Result<World> {
        let mut cluster = LocalCluster::start(ClusterConfig {
            nodes: 1,
            namespace: NAMESPACE.into(),
            ..ClusterConfig::default()
        })
        .context("starting the local cluster")?;
        cluster.set_cancel(interrupted.clone());
        let mut kubesg_servers = BTreeMap::new();
        let mut listeners = Vec::new();
        let client = cluster
            .add_pod(PodSpec::new("client", 0).label("app", "client"))
            .context("adding the client pod")?;
        let client_addr = v4(client.addr(false))?;
        let kubesg_client = ("client".to_owned(), client_addr);
        for (config, name, app) in [
            (Config::Kubesg, "server", "server"),
            (Config::KubesgNoGroup, "open", "open"),
        ] {
            let pod = cluster
                .add_pod(PodSpec::new(name, 0).label("app", app))
                .with_context(|| format!("adding pod {name}"))?;
            listeners.push(
                pod.ns()
                    .tcp_listen((Ipv6Addr::UNSPECIFIED, HTTP_PORT).into())
                    .with_context(|| format!("listening in pod {name}"))?,
            );
            kubesg_servers.insert(config, (pod.ns().name().to_owned(), v4(pod.addr(false))?));
        }
        // The server is isolated for good: a group admitting nobody. The peer groups add to it.
        cluster.apply_group(&group_manifest("bench-isolate", &[]))?;
        cluster.wait_programmed("bench-isolate")?;
        cluster.wait_synced()?;
        let node = cluster.node_netns(0).to_owned();
        let plain_client = plain_pod(&node, 200)?;
        let mut plain_servers = BTreeMap::new();
        for (i, config) in [Config::None, Config::Iptables, Config::Ipset, Config::Nft]
            .into_iter()
            .enumerate()
        {
            let pod = plain_pod(&node, 201 + i as u8)?;
            listeners.push(
                pod.ns
                    .tcp_listen((Ipv6Addr::UNSPECIFIED, HTTP_PORT).into())
                    .context("listening in a plain pod")?,
            );
            plain_servers.insert(config, pod);
        }
        let http = HttpServer::start(listeners)?;
        Ok(World {
            _http: http,
            plain_client,
            plain_servers,
            cluster,
            kubesg_client,
            kubesg_servers,
            groups: Vec::new(),
        })
    }

    /// (client namespace, client address, server namespace, server address) of `config`.
    fn endpoints(&self, config: Config) -> Result<(&str, Ipv4Addr, &str, Ipv4Addr)> {
        if let Some(pod) = self.plain_servers.get(&config) {
            return Ok((
                self.plain_client.ns.name(),
                self.plain_client.addr,
                pod.ns.name(),
                pod.addr,
            ));
        }
        let (server_ns, server) = self
            .kubesg_servers
            .get(&config)
            .ok_or_else(|| anyhow!("no server for {config:?}"))?;
        let client = self.cluster.pod(&self.kubesg_client.0)?;
        Ok((client.ns().name(), self.kubesg_client.1, server_ns, *server))
    }

    fn client_ns(&self, config: Config) -> Result<&Netns> {
        if self.plain_servers.contains_key(&config) {
            Ok(&self.plain_client.ns)
        } else {
            Ok(self.cluster.pod(&self.kubesg_client.0)?.ns())
        }
    }
}

fn v4(ip: IpAddr) -> Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(a) => bail!("{a} is not IPv4"),
    }
}

/// The N peers: N−1 addresses of 198.18.0.0/15 (RFC 2544's benchmarking range), then the
/// client's.
fn peers(n: usize, client: Ipv4Addr) -> Vec<Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 1));
    let mut v: Vec<Ipv4Addr> = (0..n.saturating_sub(1) as u32)
        .map(|i| Ipv4Addr::from(base + i))
        .collect();
    v.push(client);
    v
}

// ---------------------------------------------------------------------------------------------
// Filters: the deny state, the whole N-peer set, N−1 peers then the client.

fn group_manifest(name: &str, peers: &[Ipv4Addr]) -> String {
    let rules: Vec<Value> = peers
        .chunks(PEERS_PER_RULE)
        .map(|chunk| {
            json!({
                "protocol": "TCP",
                "ports": [{"port": HTTP_PORT, "endPort": LAST_PORT}],
                "from": chunk
                    .iter()
                    .map(|p| json!({"ipBlock": {"cidr": format!("{p}/32")}}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "apiVersion": "kubesg.io/v1alpha1",
        "kind": "SecurityGroup",
        "metadata": {"name": name},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": rules},
    })
    .to_string()
}

/// kubesg: the peer groups (64 rules of 64 ipBlocks each at most, the CRD's limits), all
/// selecting the server.
/// kubesg's groups for `peers`, rendered (the clock not started yet): the manifests to write
/// (only those whose spec changes, as a user applies the one group they edit) and the groups to
/// delete.
struct KubesgChange {
    write: Vec<StagedGroup>,
    delete: Vec<String>,
    names: Vec<String>,
}

fn kubesg_stage(world: &World, peers: &[Ipv4Addr]) -> Result<KubesgChange> {
    let mut write = Vec::new();
    let mut names = Vec::new();
    for (i, chunk) in peers.chunks(PEERS_PER_RULE * RULES_PER_GROUP).enumerate() {
        let name = format!("bench-peers-{i}");
        let staged = world.cluster.stage_group(&group_manifest(&name, chunk))?;
        if !staged.unchanged() {
            write.push(staged);
        }
        names.push(name);
    }
    let delete = world
        .groups
        .iter()
        .filter(|old| !names.contains(old))
        .cloned()
        .collect();
    Ok(KubesgChange {
        write,
        delete,
        names,
    })
}

fn kubesg_commit(world: &mut World, change: KubesgChange) -> Result<()> {
    for staged in change.write {
        world.cluster.write_group(staged)?;
    }
    for old in &change.delete {
        world.cluster.delete_group(old)?;
    }
    world.groups = change.names;
    Ok(())
}

fn kubesg_apply(world: &mut World, peers: &[Ipv4Addr]) -> Result<()> {
    let change = kubesg_stage(world, peers)?;
    kubesg_commit(world, change)
}

fn kubesg_settle(world: &World) -> Result<()> {
    world.cluster.wait_synced()?;
    Ok(())
}

fn ports_range() -> String {
    format!("{HTTP_PORT}:{LAST_PORT}")
}

/// iptables-restore input: conntrack accept, one rule per peer, DROP.
fn iptables_rules(peers: &[Ipv4Addr]) -> String {
    let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
    s.push_str("-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    for p in peers {
        let _ = writeln!(
            s,
            "-A INPUT -s {p}/32 -p tcp --dport {} -j ACCEPT",
            ports_range()
        );
    }
    s.push_str("-A INPUT -j DROP\nCOMMIT\n");
    s
}

fn ipset_deny(ns: &str) -> Result<()> {
    exec_in(
        ns,
        "ipset",
        &["create", "-exist", "peers", "hash:ip", "maxelem", "1000000"],
        None,
    )?;
    exec_in(ns, "ipset", &["flush", "peers"], None)?;
    let rules = format!(
        "*filter\n:INPUT ACCEPT [0:0]\n\
         -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n\
         -A INPUT -m set --match-set peers src -p tcp --dport {} -j ACCEPT\n\
         -A INPUT -j DROP\nCOMMIT\n",
        ports_range()
    );
    exec_in(ns, "iptables-restore", &[], Some(&rules))?;
    Ok(())
}

fn ipset_adds(peers: &[Ipv4Addr]) -> String {
    let mut s = String::new();
    for p in peers {
        let _ = writeln!(s, "add peers {p}");
    }
    s
}

fn nft_deny(ns: &str) -> Result<()> {
    let script = format!(
        "table inet bench\ndelete table inet bench\n\
         table inet bench {{\n\
           set peers {{ type ipv4_addr; size 1000000; }}\n\
           chain input {{\n\
             type filter hook input priority 0; policy accept;\n\
             ct state established,related accept\n\
             ip saddr @peers tcp dport {HTTP_PORT}-{LAST_PORT} accept\n\
             drop\n\
           }}\n\
         }}\n"
    );
    exec_in(ns, "nft", &["-f", "-"], Some(&script))?;
    Ok(())
}

fn nft_elements(peers: &[Ipv4Addr]) -> String {
    let mut s = String::new();
    for chunk in peers.chunks(1000) {
        let list: Vec<String> = chunk.iter().map(|p| p.to_string()).collect();
        let _ = writeln!(s, "add element inet bench peers {{ {} }}", list.join(", "));
    }
    s
}

/// Puts `config`'s filter in the deny state (the client refused).
fn deny(world: &mut World, config: Config) -> Result<()> {
    let (_, _, ns, _) = world.endpoints(config)?;
    let ns = ns.to_owned();
    match config {
        Config::Iptables => {
            exec_in(&ns, "iptables-restore", &[], Some(&iptables_rules(&[])))?;
        }
        Config::Ipset => ipset_deny(&ns)?,
        Config::Nft => nft_deny(&ns)?,
        Config::Kubesg => {
            kubesg_apply(world, &[])?;
            kubesg_settle(world)?;
        }
        Config::None | Config::KubesgNoGroup => bail!("{config:?} has no filter"),
    }
    Ok(())
}

/// A change to a filter, prepared before the clock starts (rules, element lists and manifests
/// rendered) so that what is timed is the change itself and its taking effect.
enum Change {
    /// A command run in the server's namespace (its standard input, if any).
    Command {
        program: &'static str,
        args: Vec<String>,
        stdin: Option<String>,
    },
    Kubesg(KubesgChange),
}

impl Change {
    fn command(program: &'static str, args: &[&str], stdin: Option<String>) -> Change {
        Change::Command {
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
            stdin,
        }
    }
}

/// The filter for `peers` in one go (from the deny state): what (a) times.
fn whole(world: &World, config: Config, peers: &[Ipv4Addr]) -> Result<Change> {
    Ok(match config {
        Config::Iptables => Change::command("iptables-restore", &[], Some(iptables_rules(peers))),
        Config::Ipset => Change::command("ipset", &["restore", "-exist"], Some(ipset_adds(peers))),
        Config::Nft => Change::command("nft", &["-f", "-"], Some(nft_elements(peers))),
        Config::Kubesg => Change::Kubesg(kubesg_stage(world, peers)?),
        Config::None | Config::KubesgNoGroup => bail!("{config:?} has no filter"),
    })
}

/// The client (the last peer) added to a filter of the others: what (b) times.
fn client_added(world: &World, config: Config, peers: &[Ipv4Addr]) -> Result<Change> {
    let (_, client, _, _) = world.endpoints(config)?;
    let client = client.to_string();
    Ok(match config {
        // Before the DROP: after the conntrack rule and the N−1 peers.
        Config::Iptables => Change::command(
            "iptables",
            &[
                "-I",
                "INPUT",
                &(peers.len() + 1).to_string(),
                "-s",
                &format!("{client}/32"),
                "-p",
                "tcp",
                "--dport",
                &ports_range(),
                "-j",
                "ACCEPT",
            ],
            None,
        ),
        Config::Ipset => Change::command("ipset", &["add", "peers", &client], None),
        Config::Nft => Change::command(
            "nft",
            &[
                "add",
                "element",
                "inet",
                "bench",
                "peers",
                &format!("{{ {client} }}"),
            ],
            None,
        ),
        Config::Kubesg => Change::Kubesg(kubesg_stage(world, peers)?),
        Config::None | Config::KubesgNoGroup => bail!("{config:?} has no filter"),
    })
}

/// Makes a prepared change: the command run, or the manifests written.
fn commit(world: &mut World, config: Config, change: Change) -> Result<()> {
    match change {
        Change::Command {
            program,
            args,
            stdin,
        } => {
            let (_, _, ns, _) = world.endpoints(config)?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            exec_in(ns, program, &args, stdin.as_deref())?;
        }
        Change::Kubesg(change) => kubesg_commit(world, change)?,
    }
    Ok(())
}

/// Fails unless a connection from the client to the server's HTTP port stays unanswered.
fn expect_refused(world: &World, config: Config) -> Result<()> {
    let (_, _, _, server) = world.endpoints(config)?;
    let target = SocketAddr::from((server, HTTP_PORT));
    match world
        .client_ns(config)?
        .tcp_connect(None, target, REFUSED_WAIT)
    {
        Ok(_) => bail!(
            "{}: the client reaches the server in the deny state",
            config.label()
        ),
        Err(_) => Ok(()),
    }
}

/// Connects from the client to the server's HTTP port over and over (each attempt a new
/// connection waiting [`POLL_CONNECT`]) until one opens; returns the time since `start`.
fn poll_allowed(world: &World, config: Config, start: Instant) -> Result<Duration> {
    let (_, _, _, server) = world.endpoints(config)?;
    let target = SocketAddr::from((server, HTTP_PORT));
    let ns = world.client_ns(config)?;
    loop {
        let attempt = Instant::now();
        if ns.tcp_connect(None, target, POLL_CONNECT).is_ok() {
            return Ok(start.elapsed());
        }
        // A refusal that came back at once (not a dropped SYN): do not spin.
        if let Some(rest) = POLL_CONNECT.checked_sub(attempt.elapsed()) {
            std::thread::sleep(rest);
        }
        if start.elapsed() > POLL_PATIENCE {
            bail!(
                "{}: the client was not allowed within {POLL_PATIENCE:?}",
                config.label()
            );
        }
    }
}

/// (a) and (b) for a filtering configuration; leaves the full N-peer filter in place.
fn enforce(world: &mut World, config: Config, peers: &[Ipv4Addr]) -> Result<(f64, f64)> {
    let others = &peers[..peers.len() - 1];
    deny(world, config)?;
    expect_refused(world, config)?;
    let change = whole(world, config, peers)?;
    let start = Instant::now();
    commit(world, config, change)?;
    let a = poll_allowed(world, config, start)?;
    // (b): the others only, settled, then the client added.
    deny(world, config)?;
    let change = whole(world, config, others)?;
    commit(world, config, change)?;
    if config == Config::Kubesg {
        kubesg_settle(world)?;
    }
    expect_refused(world, config)?;
    let change = client_added(world, config, peers)?;
    let start = Instant::now();
    commit(world, config, change)?;
    let b = poll_allowed(world, config, start)?;
    if config == Config::Kubesg {
        kubesg_settle(world)?;
    }
    Ok((a.as_secs_f64() * 1e3, b.as_secs_f64() * 1e3))
}

// ---------------------------------------------------------------------------------------------
// Traffic.

fn wrk(client_ns: &str, server: Ipv4Addr, seconds: u64, close: bool) -> Result<(f64, f64, f64)> {
    let url = format!("http://{server}:{HTTP_PORT}/");
    let duration = format!("{seconds}s");
    let mut args = vec!["-t1", "-c", WRK_CONNECTIONS, "-d", &duration, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let out = exec_in(client_ns, "wrk", &args, None)?;
    let report = text(&out);
    parse_wrk(&report).with_context(|| format!("wrk's report:\n{report}"))
}

/// (requests/s, p50 µs, p99 µs) of a `wrk --latency` report.
fn parse_wrk(report: &str) -> Result<(f64, f64, f64)> {
    if let Some(line) = report.lines().find(|l| l.contains("Socket errors")) {
        // Errors other than the connects and reads of closed connections make the rate wrong.
        if line.contains("timeout") && !line.trim_end().ends_with("timeout 0") {
            bail!("wrk timed out requests: {line}");
        }
    }
    if let Some(line) = report.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk: {line}");
    }
    let rate = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .ok_or_else(|| anyhow!("no Requests/sec"))?
        .trim()
        .parse::<f64>()?;
    let pct = |p: &str| -> Result<f64> {
        let v = report
            .lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .ok_or_else(|| anyhow!("no {p} latency"))?;
        duration_us(v.trim())
    };
    Ok((rate, pct("50%")?, pct("99%")?))
}

/// wrk's durations: `250.00us`, `1.20ms`, `2.00s`, `1.00m`.
fn duration_us(s: &str) -> Result<f64> {
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| anyhow!("no unit in {s}"))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().with_context(|| format!("duration {s}"))?;
    Ok(match unit {
        "us" => v,
        "ms" => v * 1e3,
        "s" => v * 1e6,
        "m" => v * 60e6,
        _ => bail!("unit {unit} in {s}"),
    })
}

fn iperf(client_ns: &str, server_ns: &str, server: Ipv4Addr, seconds: u64) -> Result<f64> {
    let port = IPERF_PORT.to_string();
    let addr = server.to_string();
    let _server = spawn_in(server_ns, "iperf3", &["-s", "-1", "-B", &addr, "-p", &port])?;
    wait_listening(server_ns, IPERF_PORT)?;
    let secs = seconds.to_string();
    let out = exec_in(
        client_ns,
        "iperf3",
        &["-c", &addr, "-p", &port, "-t", &secs, "-J"],
        None,
    )?;
    let report: Value = serde_json::from_slice(&out.stdout).context("iperf3's JSON report")?;
    if let Some(e) = report.get("error") {
        bail!("iperf3: {e}");
    }
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no end.sum_received.bits_per_second in iperf3's report"))?;
    Ok(bps / 1e9)
}

fn sockperf(
    client_ns: &str,
    server_ns: &str,
    server: Ipv4Addr,
    seconds: u64,
) -> Result<(f64, f64)> {
    let port = SOCKPERF_PORT.to_string();
    let addr = server.to_string();
    let mut server_proc = spawn_in(
        server_ns,
        "sockperf",
        &["server", "--tcp", "-i", &addr, "-p", &port],
    )?;
    wait_listening(server_ns, SOCKPERF_PORT)?;
    let secs = seconds.to_string();
    let result = exec_in(
        client_ns,
        "sockperf",
        &[
            "ping-pong",
            "--tcp",
            "--full-rtt",
            "-i",
            &addr,
            "-p",
            &port,
            "-t",
            &secs,
        ],
        None,
    );
    let _ = server_proc.0.kill();
    let _ = server_proc.0.wait();
    let mut server_log = String::new();
    if let Some(mut e) = server_proc.0.stderr.take() {
        let _ = e.read_to_string(&mut server_log);
    }
    let out = result.with_context(|| format!("sockperf server said: {server_log}"))?;
    let report = text(&out);
    let pct = |p: &str| -> Result<f64> {
        let key = format!("percentile {p} =");
        report
            .lines()
            .find_map(|l| l.split_once(&key).map(|(_, v)| v.trim().to_owned()))
            .ok_or_else(|| anyhow!("no {key} in sockperf's report:\n{report}"))?
            .parse::<f64>()
            .with_context(|| format!("sockperf {key}"))
    };
    Ok((pct("50.000")?, pct("99.000")?))
}

fn measure(world: &World, config: Config, seconds: u64, stop: &AtomicBool) -> Result<Sample> {
    let (client_ns, _, server_ns, server) = world.endpoints(config)?;
    let label = config.label();
    let (conn_rate, _, _) =
        wrk(client_ns, server, seconds, true).with_context(|| format!("{label}: wrk close"))?;
    check(stop)?;
    let (req_rate, req_p50_us, req_p99_us) = wrk(client_ns, server, seconds, false)
        .with_context(|| format!("{label}: wrk keep-alive"))?;
    check(stop)?;
    let gbps =
        iperf(client_ns, server_ns, server, seconds).with_context(|| format!("{label}: iperf3"))?;
    check(stop)?;
    let (rtt_p50_us, rtt_p99_us) = sockperf(client_ns, server_ns, server, seconds)
        .with_context(|| format!("{label}: sockperf"))?;
    Ok(Sample {
        conn_rate,
        req_rate,
        req_p50_us,
        req_p99_us,
        gbps,
        rtt_p50_us,
        rtt_p99_us,
    })
}

// ---------------------------------------------------------------------------------------------
// The run and its report.

#[derive(Default)]
struct Results {
    /// (N, config) → one sample per round.
    traffic: BTreeMap<(usize, Config), Vec<Sample>>,
    /// (N, config) → the "none" sample of each round (for the per-round ratios).
    baseline: BTreeMap<(usize, Config), Vec<Sample>>,
    /// (N, config) → (a, b) in ms per round.
    enforcement: BTreeMap<(usize, Config), Vec<(f64, f64)>>,
    /// N → (operator, agent) CPU seconds over the quiet window.
    idle: BTreeMap<usize, (f64, f64)>,
}

/// User plus system CPU seconds `pid` has used so far (`/proc/PID/stat`, fields 14 and 15).
fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat: no command field"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let tick = |i: usize| -> Result<f64> {
        fields
            .get(i - 3)
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: no field {i}"))?
            .parse::<f64>()
            .with_context(|| format!("/proc/{pid}/stat field {i}"))
    };
    Ok((tick(14)? + tick(15)?) / ticks_per_second)
}

/// The operator's and the agent's CPU seconds over `seconds` in which nothing changes.
fn idle_cpu(world: &World, seconds: u64, interrupted: &AtomicBool) -> Result<(f64, f64)> {
    let ticks: f64 = text(&Command::new("getconf").arg("CLK_TCK").output()?)
        .trim()
        .parse()
        .context("getconf CLK_TCK")?;
    let operator = world
        .cluster
        .operator()
        .pid()
        .ok_or_else(|| anyhow!("the operator is not running"))?;
    let agent = world
        .cluster
        .agent(0)
        .pid()
        .ok_or_else(|| anyhow!("the agent is not running"))?;
    let before = (cpu_seconds(operator, ticks)?, cpu_seconds(agent, ticks)?);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        check(interrupted)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((
        cpu_seconds(operator, ticks)? - before.0,
        cpu_seconds(agent, ticks)? - before.1,
    ))
}

fn run(args: &Args, interrupted: &Arc<AtomicBool>) -> Result<()> {
    if args.rounds == 0 || args.peers.is_empty() || args.seconds == 0 {
        bail!("--rounds, --peers and --seconds must not be empty or zero");
    }
    if args.peers.contains(&0) {
        bail!("every N must be at least 1 (the client)");
    }
    for tool in [
        "wrk", "sockperf", "iperf3", "iptables", "ipset", "nft", "ss",
    ] {
        which(tool)?;
    }
    let started = Instant::now();
    let estimate = args.peers.len() as u64
        * args.rounds as u64
        * CONFIGS.len() as u64
        * (4 * args.seconds + 2);
    eprintln!(
        "bench-traffic: {} rounds × N in {:?}, {} s per measurement: about {} min of traffic, \
         plus setup",
        args.rounds,
        args.peers,
        args.seconds,
        estimate.div_ceil(60)
    );
    eprintln!("bench-traffic: starting a local cluster (operator, agent, pods)…");
    let mut world = World::start(interrupted)?;
    eprintln!(
        "bench-traffic: cluster up after {:.0} s (including building the binaries)",
        started.elapsed().as_secs_f64()
    );
    let mut results = Results::default();
    for &n in &args.peers {
        for round in 0..args.rounds {
            eprintln!(
                "bench-traffic: N = {n}, round {}/{}",
                round + 1,
                args.rounds
            );
            let mut order = CONFIGS.to_vec();
            order.rotate_left(round % CONFIGS.len());
            let mut samples = BTreeMap::new();
            for config in order {
                check(interrupted)?;
                if config.filters() {
                    let (_, client, _, _) = world.endpoints(config)?;
                    let peers = peers(n, client);
                    let (a, b) = enforce(&mut world, config, &peers)
                        .with_context(|| format!("{}: time to enforcement", config.label()))?;
                    results
                        .enforcement
                        .entry((n, config))
                        .or_default()
                        .push((a, b));
                }
                check(interrupted)?;
                let sample = measure(&world, config, args.seconds, interrupted)?;
                eprintln!(
                    "  {:<26} {:>8.0} conn/s {:>8.0} req/s {:>6.2} Gbit/s rtt p50 {:>6.1} µs",
                    config.label(),
                    sample.conn_rate,
                    sample.req_rate,
                    sample.gbps,
                    sample.rtt_p50_us
                );
                samples.insert(config, sample);
            }
            let none = *samples
                .get(&Config::None)
                .ok_or_else(|| anyhow!("no baseline in round {round}"))?;
            for (config, sample) in samples {
                results.traffic.entry((n, config)).or_default().push(sample);
                results.baseline.entry((n, config)).or_default().push(none);
            }
        }
        if args.idle_seconds > 0 {
            // kubesg's N-peer groups are in force (its last time-to-enforcement left them).
            eprintln!(
                "bench-traffic: N = {n}, {} s of quiet for the CPU at rest",
                args.idle_seconds
            );
            let (op, agent) = idle_cpu(&world, args.idle_seconds, interrupted)?;
            results.idle.insert(n, (op, agent));
        }
        // The next N starts from kubesg's deny state.
        kubesg_apply(&mut world, &[])?;
    }
    let memory = memory_table();
    let nodes = world.cluster.node_count();
    let footprint = world.cluster.footprint();
    drop(world);
    let left: Vec<String> = footprint
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !left.is_empty() {
        bail!("left behind: {}", left.join(", "));
    }
    let report = report(args, &results, &memory, nodes, started.elapsed())?;
    println!("{report}");
    if let Some(out) = &args.out {
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or_else(|| anyhow!("tests/ has no parent directory"))?;
        let out = workspace.join(out);
        let existing = match std::fs::read_to_string(&out) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
        };
        let doc = splice(existing.as_deref(), &format!("{INTRO}{report}"))
            .with_context(|| format!("updating {}", out.display()))?;
        std::fs::write(&out, doc).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("bench-traffic: wrote {}", out.display());
    }
    Ok(())
}

fn which(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{tool} is not installed (`make bench-traffic` installs it)");
    }
    Ok(())
}

/// The lines around this bench's section of its output file: the rest of the file (the other
/// benchmarks' prose) is kept as it is.
const BEGIN: &str = "<!-- make bench-traffic writes from here -->\n";
const END: &str = "<!-- make bench-traffic writes up to here -->\n";

/// `existing` (the output file, if any) with its section between [`BEGIN`] and [`END`]
/// replaced by `section`; a new file is the section alone. A file with no such section is
/// refused rather than overwritten: it holds something else.
fn splice(existing: Option<&str>, section: &str) -> Result<String> {
    let Some(text) = existing else {
        return Ok(format!("{BEGIN}{section}{END}"));
    };
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        bail!("it has no section between the lines {BEGIN:?} and {END:?}: not overwriting it");
    };
    if end < begin {
        bail!("its end line comes before its begin line");
    }
    Ok(format!(
        "{}{BEGIN}{section}{}",
        &text[..begin],
        &text[end..]
    ))
}

const INTRO: &str = "## Real traffic (`make bench-traffic`)\n\n\
`make bench-traffic` (as root) runs `cargo bench -p kubesg-e2e --bench traffic`: two pods on a \
local cluster (network namespaces, the real CNI chain, the operator in manifests mode, the agent \
with its eBPF datapath) exchange real traffic while the server's ingress admits N peers, the \
client last, filtered by iptables (seed form), iptables + ipset, nftables with a set, or a kubesg \
SecurityGroup. Options: `--rounds`, `--peers 10,1000,10000`, `--seconds` (per measurement), \
`--out FILE`; pass them as `make bench-traffic BENCH_ARGS='--rounds 1 --peers 10'`. The source \
(`tests/bench_traffic.rs`) says what is measured and how. The figures below are one run on the \
machine named in them: compare ratios within a run, not absolute figures across machines.\n\n";

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn machine() -> (String, String, usize) {
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    (kernel, model, cores)
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            text(&o)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("?")
                .to_owned()
        })
        .unwrap_or_else(|_| "?".into())
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// The memory rows: kubesg's conntrack map element and nf_conntrack's slab object.
fn memory_table() -> String {
    let key = std::mem::size_of::<CtKey>();
    let value = std::mem::size_of::<CtEntry>();
    // A BPF hash map element: struct htab_elem's header (48 bytes on 64-bit kernels since 5.x:
    // the list node, the LRU/per-CPU union, the hash), then key and value, each rounded up to 8.
    let elem = 48 + key.next_multiple_of(8) + value.next_multiple_of(8);
    let entries = kubesg_common::limits::CT_ENTRIES as usize;
    // nf_conntrack's objects are in a slab cache of their own; it exists once a namespace used
    // conntrack (the iptables configurations did).
    let slab = std::fs::read_to_string("/proc/slabinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                // name, active_objs, num_objs, objsize, …
                (f.next() == Some("nf_conntrack"))
                    .then(|| f.nth(2).and_then(|s| s.parse::<usize>().ok()))
                    .flatten()
            })
        });
    let mut s = String::new();
    s.push_str("| table | key | value | per tracked connection | allocated |\n");
    s.push_str("| --- | ---: | ---: | ---: | --- |\n");
    let _ = writeln!(
        s,
        "| kubesg `CONNTRACK` (BPF hash map: `CtKey`, `CtEntry`) | {key} B | {value} B | \
         {elem} B (48 B `htab_elem` header + key + value, 8-aligned) | preallocated: \
         {entries} entries × {elem} B = {:.1} MiB per node, whatever the load |",
        (entries * elem) as f64 / (1024.0 * 1024.0)
    );
    match slab {
        Some(obj) => {
            let _ = writeln!(
                s,
                "| `nf_conntrack` (slab `nf_conntrack`, `/proc/slabinfo` objsize) | — | — | \
                 {obj} B (both directions' tuples in one object; extensions such as NAT, \
                 labels or timestamps allocated apart) | per connection, up to \
                 `nf_conntrack_max` |"
            );
        }
        None => s.push_str(
            "| `nf_conntrack` | — | — | not read: no `nf_conntrack` line in /proc/slabinfo | — |\n",
        ),
    }
    s.push_str(
        "\nElements only: both tables also have a bucket array (kubesg's sized for its maximum, \
         nf_conntrack's `nf_conntrack_buckets`). kubesg keys an entry by endpoint (the host-side \
         interface is part of `CtKey`), so a connection between two kubesg pods of one node \
         holds two entries, one per pod's interface; nf_conntrack holds one per network \
         namespace the connection crosses with conntrack in use.\n",
    );
    s
}

fn report(
    args: &Args,
    results: &Results,
    memory: &str,
    nodes: usize,
    elapsed: Duration,
) -> Result<String> {
    let (kernel, model, cores) = machine();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Measured {} on kernel {kernel}, {model}, {cores} cores; {} round(s), N in {:?}, {} s per \
         measurement, {:.0} s in all; {} node(s), every pod on the same node and bridge (no \
         cross-node figures yet).\n",
        date(),
        args.rounds,
        args.peers,
        args.seconds,
        elapsed.as_secs_f64(),
        nodes,
    );
    let _ = writeln!(
        s,
        "Tools: {}; {}; {}; {}; {}.\n",
        version("iptables", &["-V"]),
        version("ipset", &["version"]),
        version("nft", &["-v"]),
        version("wrk", &["-v"]),
        version("iperf3", &["-v"]),
    );
    let _ = writeln!(
        s,
        "Where each filter sits: iptables, ipset and nftables in the INPUT hook of the server \
         pod's own network namespace (pods joined to the node's bridge by the bench, no kubesg \
         program on their veths; \"none\" is such a pair); kubesg as tcx programs on the server \
         pod's host-side veth in the node's namespace (pods attached through the CNI chain; \
         \"kubesg attached, no group\" is a server in no group, so its traffic goes through \
         the programs without policy). Every filter admits TCP ports {HTTP_PORT}–{LAST_PORT} \
         (HTTP, sockperf, iperf3) from the N peers: N−1 addresses of 198.18.0.0/15, then the \
         client. The kubesg SecurityGroup has ipBlocks /32, 64 per rule and 64 rules per group \
         (the CRD's limits), so N = 10 000 takes 3 groups.\n"
    );
    let _ = writeln!(
        s,
        "Figures: median across rounds; ×none: median of each round's ratio to \"none\" in the \
         same round. new conn/s: `wrk -t1 -c{WRK_CONNECTIONS} -H 'Connection: close'` (one \
         connection per request); req/s, p50, p99: `wrk -t1 -c{WRK_CONNECTIONS} --latency` on \
         kept-alive connections; Gbit/s: `iperf3`, one stream; RTT: `sockperf ping-pong --tcp \
         --full-rtt`, one connection. The HTTP server is this bench's own (tokio, one worker).\n"
    );
    s.push_str(
        "| N | configuration | new conn/s | ×none | req/s | ×none | req p50 µs | req p99 µs | \
         Gbit/s | ×none | RTT p50 µs | ×none | RTT p99 µs |\n",
    );
    s.push_str(
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | \
         ---: |\n",
    );
    for &n in &args.peers {
        for config in CONFIGS {
            let (Some(samples), Some(base)) = (
                results.traffic.get(&(n, config)),
                results.baseline.get(&(n, config)),
            ) else {
                continue;
            };
            let med =
                |f: fn(&Sample) -> f64| median(&mut samples.iter().map(f).collect::<Vec<_>>());
            let ratio = |f: fn(&Sample) -> f64| {
                median(
                    &mut samples
                        .iter()
                        .zip(base)
                        .map(|(x, b)| f(x) / f(b))
                        .collect::<Vec<_>>(),
                )
            };
            let _ = writeln!(
                s,
                "| {n} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} | \
                 {:.1} | {:.2} | {:.1} |",
                config.label(),
                med(|x| x.conn_rate),
                ratio(|x| x.conn_rate),
                med(|x| x.req_rate),
                ratio(|x| x.req_rate),
                med(|x| x.req_p50_us),
                med(|x| x.req_p99_us),
                med(|x| x.gbps),
                ratio(|x| x.gbps),
                med(|x| x.rtt_p50_us),
                ratio(|x| x.rtt_p50_us),
                med(|x| x.rtt_p99_us),
            );
        }
    }
    let poll = POLL_CONNECT.as_millis();
    let _ = write!(
        s,
        "\nTime from a change to enforcement, median ms: from the start of the change to the \
         first TCP connect from the client that opens (a new connection every {poll} ms, each \
         waiting {poll} ms for its SYN-ACK, so the figures are good to {poll} ms). (a) the whole N-peer filter written from a state that refuses the \
         client; (b) the client added to a filter of the other N−1 peers. Each change is \
         rendered (rules, element lists, manifests) before the clock starts. kubesg: the group \
         manifests that change written to the operator's manifests directory (at 10 000 peers \
         three groups of 4 096, the CRD's limits: (b) rewrites one), then the operator reads \
         the change, compiles, pushes the plan to the agent over mTLS, the agent programs its \
         maps; iptables: \
         `iptables-restore` of the whole rule set / `iptables -I INPUT <before the DROP>`; \
         ipset: `ipset restore` of N members into the set the rule matches / `ipset add`; \
         nftables: `nft -f` adding N elements / `nft add element`. The kernel filters' figures include \
         starting the command (`ip netns exec`), which returns once the change is in place.\n\n",
    );
    s.push_str("| N | configuration | (a) whole filter, ms | (b) one peer added, ms |\n");
    s.push_str("| ---: | --- | ---: | ---: |\n");
    for &n in &args.peers {
        for config in CONFIGS {
            let Some(v) = results.enforcement.get(&(n, config)) else {
                continue;
            };
            let _ = writeln!(
                s,
                "| {n} | {} | {:.0} | {:.0} |",
                config.label(),
                median(&mut v.iter().map(|x| x.0).collect::<Vec<_>>()),
                median(&mut v.iter().map(|x| x.1).collect::<Vec<_>>()),
            );
        }
    }
    if !results.idle.is_empty() {
        let _ = write!(
            s,
            "\nCPU at rest: the operator's and the agent's user + system CPU time (`/proc/PID/stat`) over {} s in which nothing changes, kubesg's N-peer groups in force (after the rounds of that N), as CPU seconds per minute.\n\n",
            args.idle_seconds
        );
        s.push_str("| N | operator, CPU s/min | agent, CPU s/min |\n| ---: | ---: | ---: |\n");
        let per_minute = 60.0 / args.idle_seconds as f64;
        for (n, (op, agent)) in &results.idle {
            let _ = writeln!(
                s,
                "| {n} | {:.3} | {:.3} |",
                op * per_minute,
                agent * per_minute
            );
        }
    }
    s.push_str("\nMemory per tracked connection:\n\n");
    s.push_str(memory);
    Ok(s)
}
