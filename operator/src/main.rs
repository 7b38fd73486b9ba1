//! `kubesg-operator`: argument parsing and wiring only; the work is in the library.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context as _};
use clap::{ArgAction, Args, Parser, Subcommand};
use kubesg_operator::{
    crdgen,
    daemon::{Operator, OperatorSettings, Source, DEFAULT_TLS_POLL},
    leader::{default_identity, LeaseSettings},
    netpol,
    node_identity::{AgentTokens, DEFAULT_TOKEN_AUDIENCE},
    push::{NodeIdentityCheck, PushSettings},
    tls::ServerTlsFiles,
};
use tracing::{info, warn};

/// kubesg operator: compiles SecurityGroups and NetworkPolicies into per-node rule sets and
/// pushes them to agents.
#[derive(Parser)]
#[command(name = "kubesg-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: watch the cluster (the Kubernetes API, or a directory of manifests),
    /// compile per-node rule sets, push them to the agents over mTLS and report each
    /// SecurityGroup's status.
    Run(Box<RunArgs>),
    /// Write the CustomResourceDefinition YAML (to stdout, or into a directory).
    Crdgen {
        /// Directory to write `securitygroups.kubesg.io.yaml` into (e.g. charts/kubesg/crds).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Options of `kubesg-operator run`.
#[derive(Args)]
struct RunArgs {
    /// Take the cluster from this directory of Namespace, Pod, Node, Service, SecurityGroup and
    /// NetworkPolicy YAML instead of the Kubernetes API; changes apply live (followed by
    /// file-system notifications: a file is read again when its writer closes it or moves it
    /// into place). Without it: the API (in-cluster config, or the kubeconfig).
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Manifests mode: write each SecurityGroup's status to DIR/<namespace>_<name>.yaml.
    #[arg(long, value_name = "DIR", requires = "manifests")]
    status_dir: Option<PathBuf>,
    /// Manifests mode: also read the whole directory every MS milliseconds, for file systems
    /// that deliver no notifications of changes made elsewhere (NFS, some network mounts).
    /// Without it the directory is read only when notifications say it changed.
    #[arg(long, value_name = "MS", requires = "manifests")]
    rescan_interval: Option<u64>,
    /// Where agents connect (gRPC over mTLS).
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// The operator's server certificate chain (PEM).
    #[arg(long, value_name = "PEM")]
    tls_cert: PathBuf,
    /// The operator's private key (PEM).
    #[arg(long, value_name = "PEM")]
    tls_key: PathBuf,
    /// The CA bundle agents' client certificates must chain to (PEM).
    #[arg(long, value_name = "PEM")]
    client_ca: PathBuf,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:9966")]
    metrics_address: SocketAddr,
    /// Elect a leader through a Lease so several replicas can run (API mode; the default).
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "no_leader_election")]
    leader_election: bool,
    /// Run without leader election: this replica always leads (one replica only).
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "leader_election")]
    no_leader_election: bool,
    /// The namespace of the `kubesg-operator` Lease (default: the client's namespace, i.e. the
    /// operator's own in a cluster).
    #[arg(long, value_name = "NAMESPACE", env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Cut tracked connections a rule change no longer allows (true, as Neutron) or let them
    /// live on (false, as AWS).
    #[arg(long, value_name = "BOOL", default_value = "true", action = ArgAction::Set)]
    recheck_on_policy_change: bool,
    /// Kubernetes NetworkPolicies: enforce them as a layer of their own beside SecurityGroups
    /// (a NEW connection must pass both where both select the pod), or ignore them, to leave
    /// them to another enforcer chained on the same pods.
    #[arg(long, value_enum, value_name = "MODE", default_value = "enforce")]
    network_policies: netpol::Mode,
    /// What to do with an agent that does not prove the node its Hello names (by a client
    /// certificate naming it, or, API mode, a node token the API server binds to it): refuse it
    /// (the default), or log and count it and serve it anyway.
    #[arg(long, value_enum, value_name = "MODE", default_value = "require")]
    node_identity: NodeIdentityCheck,
    /// API mode: the audience agents' node tokens must carry (the chart's projected token).
    #[arg(long, value_name = "AUDIENCE", default_value = DEFAULT_TOKEN_AUDIENCE)]
    node_token_audience: String,
    /// API mode: the agents' ServiceAccount, NAMESPACE/NAME; a token of any other account
    /// proves no node. Default: kubesg-agent in the operator's namespace.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    agent_service_account: Option<String>,
    /// Log filter (tracing's EnvFilter syntax), e.g. info or kubesg_operator=debug.
    #[arg(long, env = "KUBESG_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubesg-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_new(&args.log)
                        .with_context(|| format!("--log {}", args.log))?,
                )
                .with_writer(std::io::stderr)
                // Colour only on a terminal: `kubectl logs` and log collectors get plain text.
                .with_ansi(std::io::stderr().is_terminal())
                .init();
            tokio::runtime::Runtime::new()?.block_on(run_operator(*args))
        }
        Command::Crdgen { out } => {
            let yaml = crdgen::securitygroup_crd_yaml()?;
            match out {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    let path = dir.join(crdgen::CRD_FILE);
                    std::fs::write(&path, yaml)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                None => print!("{yaml}"),
            }
            Ok(())
        }
    }
}

async fn run_operator(args: RunArgs) -> anyhow::Result<()> {
    if args.node_identity == NodeIdentityCheck::LogOnly {
        warn!("--node-identity log-only: agents that do not prove their node are served; any holder of an agent certificate can read every node's rules and ack for any node");
    }
    let source = match args.manifests {
        Some(dir) => {
            if args.leader_election {
                bail!("--leader-election needs the Kubernetes API (not --manifests)");
            }
            Source::Manifests {
                dir,
                rescan: args
                    .rescan_interval
                    .map(|ms| Duration::from_millis(ms.max(10))),
                status_dir: args.status_dir,
            }
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?;
            let identity = default_identity();
            let namespace = args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            let (agents_namespace, agents_account) = match &args.agent_service_account {
                Some(account) => match account.split_once('/') {
                    Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
                        (ns.to_owned(), name.to_owned())
                    }
                    _ => bail!("--agent-service-account {account:?}: expected NAMESPACE/NAME"),
                },
                None => (namespace.clone(), "kubesg-agent".to_owned()),
            };
            let election =
                (!args.no_leader_election).then(|| LeaseSettings::new(namespace, identity.clone()));
            Source::Api {
                client,
                election,
                instance: identity,
                agent_tokens: AgentTokens {
                    audience: args.node_token_audience.clone(),
                    namespace: agents_namespace,
                    service_account: agents_account,
                },
            }
        }
    };
    let settings = OperatorSettings {
        source,
        listen: args.listen,
        tls: ServerTlsFiles {
            client_ca: args.client_ca,
            cert: args.tls_cert,
            key: args.tls_key,
        },
        metrics_address: Some(args.metrics_address),
        push: PushSettings {
            recheck_on_policy_change: args.recheck_on_policy_change,
            node_identity: args.node_identity,
            ..PushSettings::default()
        },
        tls_poll: DEFAULT_TLS_POLL,
        network_policies: args.network_policies,
    };
    let operator = Operator::start(settings).await?;
    let stopper = operator.stopper();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping; agents keep enforcing what they have"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping; agents keep enforcing what they have"),
            _ = stopper.cancelled() => return,
        }
        stopper.cancel();
    });
    operator.wait().await?;
    Ok(())
}
