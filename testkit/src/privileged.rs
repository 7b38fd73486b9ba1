//! The gate of privileged tests (root, network namespaces, eBPF). They run in CI and fail when
//! they cannot; the only way to skip them is an explicit `KUBESG_SKIP_PRIVILEGED=1`.

/// Whether the privileged test calling it should run. Returns `false` only when
/// `KUBESG_SKIP_PRIVILEGED=1`; panics (failing the test) when not running as root.
pub fn check() -> bool {
    if std::env::var("KUBESG_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("KUBESG_SKIP_PRIVILEGED=1: privileged test not run");
        return false;
    }
    assert!(
        is_root(),
        "this test needs root (network namespaces, eBPF); run the suite as root, or set \
         KUBESG_SKIP_PRIVILEGED=1 to skip privileged tests explicitly"
    );
    true
}

/// Whether this process runs as root: the programs built on the testkit (the demo, the traffic
/// bench) say so plainly up front rather than failing at their first namespace.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// First line of every privileged test: returns from the test when privileged tests are
/// explicitly skipped, fails it when they cannot run.
#[macro_export]
macro_rules! require_privileged {
    () => {
        if !$crate::privileged::check() {
            return;
        }
    };
}
