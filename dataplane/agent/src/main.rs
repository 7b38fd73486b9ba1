//! `kubesg-agent`: the node agent's command line. Argument parsing and wiring only; the work is in
//! the library.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kubesg_agent::{
    clock, conntrack, counters, datapath::DEFAULT_PIN_DIR, events, maps::Maps, timeouts,
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
        Command::Counters => {
            let maps = open(&cli.pin_dir)?;
            println!(
                "{:>8} {:>7} {:>9} {:>12} {:>8} {:>8} {:>11} {:>12}",
                "IFINDEX",
                "POLICY",
                "DIRECTION",
                "ACCEPTED",
                "NEW",
                "RELATED",
                "DROP-POLICY",
                "DROP-INVALID"
            );
            let mut eps: Vec<_> = maps.endpoints.iter().collect::<Result<_, _>>()?;
            eps.sort_by_key(|(i, _)| *i);
            for (ifindex, ep) in eps {
                let c = counters::read(&maps, ep.counter_slot)?;
                for (dir, name) in [(0, "egress"), (1, "ingress")] {
                    let c = &c[dir];
                    println!(
                        "{:>8} {:>7} {:>9} {:>12} {:>8} {:>8} {:>11} {:>12}",
                        ifindex,
                        ep.policy_id,
                        name,
                        c.accepted,
                        c.new_connections,
                        c.related,
                        c.dropped_policy,
                        c.dropped_invalid
                    );
                }
            }
        }
    }
    Ok(())
}
