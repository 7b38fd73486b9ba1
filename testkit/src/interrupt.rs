//! Ctrl-C for the long-running programs built on the testkit (the demo, `make bench-traffic`):
//! a signal sets a flag instead of killing the process, which checks the flag between steps
//! (and the local cluster's waits check it too), unwinds, and so cleans up what it created
//! (processes stopped, namespaces deleted, pins removed) instead of dying half-way and leaving
//! it behind.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

/// A flag set on SIGINT or SIGTERM, watched by a thread of its own; `who` names the program in
/// the line it prints when interrupted. The signals are registered before this returns: from
/// then on they only set the flag.
pub fn flag(who: &'static str) -> io::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let flag = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term) = runtime.block_on(async {
        Ok::<_, io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    let set = flag.clone();
    std::thread::spawn(move || {
        runtime.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("\n{who}: interrupted; stopping and cleaning up…");
        set.store(true, Ordering::SeqCst);
    });
    Ok(flag)
}

/// Whether `flag` was set.
pub fn is_set(flag: &AtomicBool) -> bool {
    flag.load(Ordering::SeqCst)
}
