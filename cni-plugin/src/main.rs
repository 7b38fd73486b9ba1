//! The `kubesg-cni` binary: environment and stdin in, result or error JSON on stdout, logs on
//! stderr (level from `KUBESG_CNI_LOG`, default `info`), exit status 0 or 1.

use std::io::Write;

use tracing_subscriber::EnvFilter;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            EnvFilter::try_from_env("KUBESG_CNI_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let outcome = kubesg_cni::commands::run(|name| std::env::var(name).ok(), &mut std::io::stdin());
    if let Some(json) = &outcome.stdout {
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = writeln!(stdout, "{json}").and_then(|()| stdout.flush()) {
            tracing::error!("writing to stdout: {e}");
            std::process::exit(1);
        }
    }
    std::process::exit(outcome.exit_code);
}
