//! `kubesg-agent`: the node agent's command line. Argument parsing and wiring only; the work is in
//! the library.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use kubesg_agent::{
    attach::AttachMode,
    clock, cni_server, conntrack, counters,
    daemon::{self, RunSettings},
    datapath::{DatapathOptions, DEFAULT_PIN_DIR},
    enforcer::{StartupPolicy, DEFAULT_STATE_DIR},
    events, explain, inspect,
    maps::Maps,
    operator_link::LinkSettings,
    startup::{PodPattern, Startup},
    timeouts,
    tls::{ClientTlsFiles, DEFAULT_OPERATOR_SERVER_NAME},
};

/// kubesg node agent: stateful security groups for pods, enforced by eBPF.
///
/// Run on the node (or with `kubectl exec` into the agent pod) to inspect the datapath.
#[derive(Parser)]
#[command(name = "kubesg-agent", version, about, long_about = None)]
struct Cli {
    /// Where the datapath's maps and links are pinned.
    #[arg(long, global = true, env = "KUBESG_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Where the agent keeps its endpoint records and the last rules it applied.
    #[arg(long, global = true, env = "KUBESG_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: serve the CNI socket, follow the operator, enforce.
    Run(Box<RunArgs>),
    /// The pods this agent enforces: interfaces, addresses, policies, counters.
    Endpoints,
    /// Would a NEW connection be allowed, by which rule, or why not?
    ///
    /// Judges each end that is a pod on this node (the sender's egress rules, the receiver's
    /// ingress rules) by the rules the operator sent and by the datapath's own maps.
    Explain(ExplainArgs),
    /// Connection tracking table.
    #[command(subcommand)]
    Ct(CtCommand),
    /// Packet counters per endpoint (pod interface) and direction.
    Counters,
    /// Print dropped packets (deny events) as flow-log lines.
    ///
    /// The ring buffer has a single read position: events printed here are not seen by another
    /// reader (such as the agent's own flow log) at the same time.
    Events {
        /// Keep waiting for new events until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Put kubesg-cni into the node's CNI chain: copy the plugin into the CNI bin directory and
    /// append it as the last plugin of the primary network's conflist (the DaemonSet's init
    /// container); with --watch keep it there; with --uninstall take it out again.
    InstallCni(InstallCniArgs),
    /// Mount the bpf filesystem at /sys/fs/bpf (or above --pin-dir) if it is not mounted: the
    /// DaemonSet's privileged init container, so that the agent itself needs no CAP_SYS_ADMIN.
    MountBpffs,
}

/// Options of `kubesg-agent install-cni`.
#[derive(Args)]
struct InstallCniArgs {
    /// The CNI configuration directory (the host's /etc/cni/net.d, as mounted).
    #[arg(long, env = "KUBESG_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// The CNI binary directory (the host's /opt/cni/bin, as mounted).
    #[arg(long, env = "KUBESG_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The kubesg-cni binary to install (default: the one next to this executable).
    #[arg(long)]
    plugin_binary: Option<PathBuf>,
    /// `agentSocket` of the chain entry: the agent's CNI socket as a path on the host.
    #[arg(long, default_value = cni_server::DEFAULT_SOCKET)]
    agent_socket: String,
    /// `timeoutSeconds` of the chain entry: how long one call of the plugin to the agent may
    /// take.
    #[arg(long, default_value = "30")]
    timeout_seconds: u64,
    /// Keep the entry in place (re-insert it when the primary CNI rewrites its file) until
    /// SIGTERM.
    #[arg(long, conflicts_with = "uninstall")]
    watch: bool,
    /// With --watch: take kubesg out of the chain when stopped (set only when uninstalling).
    #[arg(long, requires = "watch")]
    uninstall_on_exit: bool,
    /// Take kubesg out of the chain (restoring every file it changed) and exit.
    #[arg(long)]
    uninstall: bool,
    /// How often --watch checks, in milliseconds.
    #[arg(long, value_name = "MS", default_value = "1000")]
    poll_interval: u64,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "KUBESG_LOG", default_value = "info")]
    log: String,
}

#[derive(Subcommand)]
enum CtCommand {
    /// Print tracked connections in /proc/net/nf_conntrack's format.
    ///
    /// Each pod interface has its own table (as each network namespace has its own conntrack),
    /// so a connection between two pods of this node appears once per pod.
    List {
        /// Only connections of this endpoint (host-side interface index).
        #[arg(long)]
        ifindex: Option<u32>,
        /// Append the endpoint's interface index and the policy id that admitted the connection.
        #[arg(long, short = 'w')]
        wide: bool,
        /// Include entries that have expired but were not swept yet.
        #[arg(long)]
        all: bool,
    },
    /// Delete tracked connections (of one endpoint, or all). Member pods' connections that were
    /// open are then judged as new: TCP without a SYN is INVALID and dropped.
    Flush {
        /// Only connections of this endpoint (host-side interface index).
        #[arg(long)]
        ifindex: Option<u32>,
    },
    /// Show the conntrack timeouts, or change them for every packet from now on.
    ///
    /// Names follow the kernel's sysctls (net.netfilter.nf_conntrack_<name>), e.g.
    /// `--set tcp_timeout_established=3600 --set udp_timeout=10`. The agent re-applies its own
    /// settings when it restarts.
    Timeouts {
        /// NAME=SECONDS (repeatable).
        #[arg(long = "set", value_name = "NAME=SECONDS")]
        set: Vec<String>,
    },
}

/// Options of `kubesg-agent run`.
#[derive(Args)]
struct RunArgs {
    /// This node's name (the operator sends it its pods and rules).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The operator's gRPC address; without it the agent runs alone (pods get the startup policy
    /// or the last rules applied before a restart).
    #[arg(
        long,
        env = "KUBESG_OPERATOR_ADDRESS",
        value_name = "https://HOST:PORT"
    )]
    operator_address: Option<String>,
    /// The name the operator's certificate must carry.
    #[arg(long, default_value = DEFAULT_OPERATOR_SERVER_NAME)]
    operator_server_name: String,
    /// CA bundle the operator's certificate must chain to.
    #[arg(long, env = "KUBESG_TLS_CA", default_value = "/etc/kubesg/tls/ca.crt")]
    tls_ca: PathBuf,
    /// The agent's client certificate (chain).
    #[arg(
        long,
        env = "KUBESG_TLS_CERT",
        default_value = "/etc/kubesg/tls/tls.crt"
    )]
    tls_cert: PathBuf,
    /// The agent's private key.
    #[arg(
        long,
        env = "KUBESG_TLS_KEY",
        default_value = "/etc/kubesg/tls/tls.key"
    )]
    tls_key: PathBuf,
    /// A token that proves to the operator which node this agent runs on, re-read at every
    /// connection (the kubelet rotates it). In a cluster the chart mounts the pod's projected
    /// ServiceAccount token here (audience kubesg-operator), which the operator reviews with the
    /// API server; without it the client certificate must name the node (CN system:node:NAME,
    /// CN NAME or a DNS name NAME) or the operator refuses the agent.
    #[arg(long, env = "KUBESG_NODE_TOKEN", value_name = "FILE")]
    node_token: Option<PathBuf>,
    /// The CNI socket (created 0600, root only).
    #[arg(long, default_value = cni_server::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// What a pod gets between its CNI ADD and the arrival of its rules.
    #[arg(long, value_enum, default_value = "deny")]
    startup_policy: StartupPolicy,
    /// Pods that get `allow` whatever the startup policy, NAMESPACE/NAME-PREFIX (repeatable):
    /// the operator's own pods, whose rules only a running operator can send (the chart sets
    /// it), and anything else the agent needs to reach it.
    #[arg(long = "startup-exempt", value_name = "NAMESPACE/NAME-PREFIX")]
    startup_exempt: Vec<PodPattern>,
    /// How long a CNI ADD waits for the pod's rules under `--startup-policy wait` (less when
    /// the plugin's own timeout is shorter: the agent answers, and undoes the ADD, before it).
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    wait_timeout: u64,
    /// A conntrack timeout, NAME=SECONDS with the kernel's sysctl names (repeatable), e.g.
    /// tcp_timeout_established=86400.
    #[arg(long = "conntrack-timeout", value_name = "NAME=SECONDS")]
    conntrack_timeouts: Vec<String>,
    /// Conntrack table size (entries; 200 bytes of kernel memory each, 50 MiB at the default
    /// 262 144); only used when the table is created. Nothing is evicted to make room: a NEW
    /// connection that finds the table full is refused and counted (conntrack_full).
    #[arg(long, value_name = "ENTRIES")]
    conntrack_entries: Option<u32>,
    /// The most conntrack entries one pod may hold, so that one pod (flooded, or opening
    /// connections itself) cannot take the node's table; its NEW connections past it are
    /// refused and counted (conntrack_full). Default: a quarter of the table. 0: no limit.
    #[arg(long, value_name = "ENTRIES")]
    conntrack_endpoint_limit: Option<u32>,
    /// How often expired conntrack entries are swept.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    sweep_interval: u64,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:9965")]
    metrics_address: SocketAddr,
    /// How to attach: tcx (kernel ≥ 6.6) or clsact; default by kernel version.
    #[arg(long, value_parser = parse_attach_mode)]
    attach_mode: Option<AttachMode>,
    /// Log every dropped packet at info level (flow logs).
    #[arg(long)]
    flow_logs: bool,
    /// Log filter (tracing's EnvFilter syntax), e.g. info or kubesg_agent=debug.
    #[arg(long, env = "KUBESG_LOG", default_value = "info")]
    log: String,
}

fn parse_attach_mode(s: &str) -> Result<AttachMode, String> {
    match s {
        "tcx" => Ok(AttachMode::Tcx),
        "clsact" => Ok(AttachMode::Clsact),
        _ => Err(format!("{s:?}: expected tcx or clsact")),
    }
}

/// Options of `kubesg-agent explain`.
#[derive(Args)]
struct ExplainArgs {
    /// The address that opens the connection.
    #[arg(long)]
    from: std::net::IpAddr,
    /// The address that accepts it.
    #[arg(long)]
    to: std::net::IpAddr,
    /// tcp, udp, sctp, icmp, icmpv6, or a protocol number.
    #[arg(long, default_value = "tcp")]
    proto: String,
    /// Destination port (tcp, udp, sctp).
    #[arg(long)]
    dport: Option<u16>,
    /// ICMP type (icmp, icmpv6; default: echo request).
    #[arg(long = "type")]
    icmp_type: Option<u8>,
    /// ICMP code.
    #[arg(long, default_value = "0")]
    code: u8,
    /// The node itself opens the connection (`--from` is one of its addresses), as kubelet
    /// probes do: the receiving pod's NetworkPolicies do not judge it.
    #[arg(long)]
    from_host: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubesg-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn open(pin_dir: &std::path::Path) -> Result<Maps> {
    Maps::open_pinned(pin_dir).with_context(|| {
        format!(
            "the datapath is not loaded (no pinned maps under {}); is the agent running?",
            pin_dir.display()
        )
    })
}

fn run_agent(args: RunArgs, pin_dir: PathBuf, state_dir: PathBuf) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("--log {}", args.log))?,
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: `kubectl logs` and log collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let operator = args.operator_address.map(|address| LinkSettings {
        token_file: args.node_token,
        ..LinkSettings::new(
            args.node_name.clone(),
            address,
            ClientTlsFiles {
                ca: args.tls_ca,
                cert: args.tls_cert,
                key: args.tls_key,
                server_name: args.operator_server_name,
            },
        )
    });
    let settings = RunSettings {
        datapath: DatapathOptions {
            pin_dir: Some(pin_dir),
            attach_mode: args.attach_mode,
            ct_entries: args.conntrack_entries,
            ct_endpoint_limit: args.conntrack_endpoint_limit,
            ..DatapathOptions::default()
        },
        state_dir,
        socket: args.socket,
        startup: Startup {
            policy: args.startup_policy,
            exempt: args.startup_exempt,
        },
        wait_timeout: Duration::from_secs(args.wait_timeout),
        timeouts: args.conntrack_timeouts,
        sweep_interval: Duration::from_secs(args.sweep_interval.max(1)),
        metrics_address: args.metrics_address,
        operator,
        flow_logs: args.flow_logs,
    };
    tokio::runtime::Runtime::new()?.block_on(daemon::run(settings))
}

fn install_cni(args: InstallCniArgs) -> Result<()> {
    use kubesg_agent::install_cni::{self, ChainEntry, Chained, CniInstaller};
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("--log {}", args.log))?,
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: `kubectl logs` and log collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let plugin_binary = match args.plugin_binary {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name(install_cni::PLUGIN_TYPE),
    };
    let installer = CniInstaller {
        conf_dir: args.cni_conf_dir,
        bin_dir: args.cni_bin_dir,
        plugin_binary,
        entry: ChainEntry {
            agent_socket: args.agent_socket,
            timeout_seconds: args.timeout_seconds,
        },
    };
    if args.uninstall {
        for path in installer.uninstall()? {
            tracing::info!(file = %path.display(), "took kubesg-cni out of the chain");
        }
        return Ok(());
    }
    let interval = Duration::from_millis(args.poll_interval.max(10));
    installer.install_binary()?;
    if !args.watch {
        // The init container: wait until the primary network exists and is chained, so that the
        // agent starts only once new pods go through kubesg-cni.
        loop {
            match installer.reconcile()? {
                Chained::NoNetwork => std::thread::sleep(interval),
                _ => return Ok(()),
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        install_cni::watch(&installer, interval, shutdown).await;
        anyhow::Ok(())
    })?;
    if args.uninstall_on_exit {
        for path in installer.uninstall()? {
            tracing::info!(file = %path.display(), "took kubesg-cni out of the chain");
        }
    }
    Ok(())
}

fn explain_question(a: &ExplainArgs) -> Result<explain::Question> {
    use kubesg_common::proto;
    let v6 = a.from.is_ipv6();
    if v6 != a.to.is_ipv6() {
        bail!("--from and --to must be of the same family");
    }
    let p = match a.proto.as_str() {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "sctp" => proto::SCTP,
        "icmp" => proto::ICMP,
        "icmpv6" => proto::ICMPV6,
        n => n
            .parse()
            .with_context(|| format!("--proto {n}: not a protocol name or number"))?,
    };
    let port = if p == proto::ICMP || p == proto::ICMPV6 {
        let t = a.icmp_type.unwrap_or(if v6 { 128 } else { 8 });
        (t as u16) << 8 | a.code as u16
    } else if p == proto::TCP || p == proto::UDP || p == proto::SCTP {
        a.dport
            .context("--dport is required for tcp, udp and sctp")?
    } else {
        0
    };
    Ok(explain::Question {
        from: a.from,
        to: a.to,
        proto: p,
        port,
        from_host: a.from_host,
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run_agent(*args, cli.pin_dir, cli.state_dir)?,
        Command::Endpoints => {
            let (records, desired) = inspect::load_state(&cli.state_dir)?;
            let maps = Maps::open_pinned(&cli.pin_dir).ok();
            print!(
                "{}",
                inspect::endpoints_table(&records, &desired, maps.as_ref())
            );
        }
        Command::Explain(args) => {
            let q = explain_question(&args)?;
            let (records, desired) = inspect::load_state(&cli.state_dir)?;
            let maps = Maps::open_pinned(&cli.pin_dir).ok();
            let ends = explain::explain(&q, &records, &desired, maps.as_ref());
            print!("{}", explain::render(&q, &ends));
        }
        Command::Ct(CtCommand::List { ifindex, wide, all }) => {
            let maps = open(&cli.pin_dir)?;
            let now = clock::now_ns();
            for c in conntrack::list(&maps)? {
                if ifindex.is_some_and(|i| i != c.key.ifindex) || (!all && c.entry.expired(now)) {
                    continue;
                }
                if wide {
                    println!(
                        "{} ifindex={} policy={}",
                        c.nf_conntrack_line(now),
                        c.key.ifindex,
                        c.entry.policy_id
                    );
                } else {
                    println!("{}", c.nf_conntrack_line(now));
                }
            }
        }
        Command::Ct(CtCommand::Timeouts { set }) => {
            let mut maps = open(&cli.pin_dir)?;
            let mut cfg = maps.config.get(&0, 0)?;
            if !set.is_empty() {
                for s in &set {
                    timeouts::apply(&mut cfg, s)?;
                }
                maps.config.set(0, cfg, 0)?;
            }
            for (name, d) in timeouts::list(&cfg) {
                println!("{name:<24} {}", d.as_secs_f64());
            }
        }
        Command::Ct(CtCommand::Flush { ifindex }) => {
            let mut maps = open(&cli.pin_dir)?;
            let n = conntrack::flush(&mut maps, ifindex)?;
            println!("{n} connection(s) deleted");
        }
        Command::Events { follow } => {
            let mut ring = Maps::open_pinned_events(&cli.pin_dir).with_context(|| {
                format!("no pinned deny-event ring under {}", cli.pin_dir.display())
            })?;
            loop {
                for d in events::drain(&mut ring) {
                    println!("{}", d.flow_log_line());
                }
                if !follow {
                    break;
                }
                events::wait(&ring, std::time::Duration::from_secs(1));
            }
        }
        Command::InstallCni(args) => install_cni(args)?,
        Command::MountBpffs => kubesg_agent::bpffs::ensure_mounted(&cli.pin_dir)?,
        Command::Counters => {
            let maps = open(&cli.pin_dir)?;
            println!(
                "{:>8} {:>7} {:>9} {:>12} {:>8} {:>8} {:>11} {:>12} {:>12} {:>9} {:>10}",
                "IFINDEX",
                "POLICY",
                "DIRECTION",
                "ACCEPTED",
                "NEW",
                "RELATED",
                "DROP-POLICY",
                "DROP-INVALID",
                "DROP-SPOOFED",
                "CT-FULL",
                "CT-ENTRIES"
            );
            let mut eps: Vec<_> = maps.endpoints.iter().collect::<Result<_, _>>()?;
            eps.sort_by_key(|(i, _)| *i);
            for (ifindex, ep) in eps {
                let c = counters::read(&maps, ep.counter_slot)?;
                let held = maps
                    .ct_counts
                    .get(ep.counter_slot)
                    .map_or("-".to_string(), |n| n.to_string());
                for (dir, name) in [(0, "egress"), (1, "ingress")] {
                    let c = &c[dir];
                    println!(
                        "{:>8} {:>7} {:>9} {:>12} {:>8} {:>8} {:>11} {:>12} {:>12} {:>9} {:>10}",
                        ifindex,
                        ep.policy_id,
                        name,
                        c.accepted,
                        c.new_connections,
                        c.related,
                        c.dropped_policy,
                        c.dropped_invalid,
                        c.dropped_spoofed,
                        c.conntrack_full,
                        if dir == 0 { held.as_str() } else { "" }
                    );
                }
            }
        }
    }
    Ok(())
}
