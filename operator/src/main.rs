//! `kubesg-operator`: argument parsing and wiring only; the work is in the library.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kubesg_operator::crdgen;

/// kubesg operator: compiles SecurityGroups into per-node rule sets and pushes them to agents.
#[derive(Parser)]
#[command(name = "kubesg-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CustomResourceDefinition YAML (to stdout, or into a directory).
    Crdgen {
        /// Directory to write `securitygroups.kubesg.io.yaml` into (e.g. charts/kubesg/crds).
        #[arg(long)]
        out: Option<PathBuf>,
    },
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
        }
    }
    Ok(())
}
