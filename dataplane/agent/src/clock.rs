//! The clock conntrack timestamps are taken with: `bpf_ktime_get_ns()` is CLOCK_MONOTONIC, so
//! userspace must read the same clock to compute remaining timeouts and sweep.

/// Nanoseconds on CLOCK_MONOTONIC, comparable with the datapath's timestamps.
pub fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        // CLOCK_MONOTONIC cannot fail on Linux; a zero reads every entry as alive.
        Err(_) => 0,
    }
}
