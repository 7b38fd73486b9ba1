//! The clock conntrack timestamps are taken with. The datapath reads `bpf_ktime_get_coarse_ns()`
//! (CLOCK_MONOTONIC_COARSE: one tick of resolution, as nf_conntrack's jiffies, for a tenth of the
//! cost of the precise clock on the per-packet path), so userspace reads the same clock to compute
//! remaining timeouts and to sweep: with a finer clock it could call an entry expired a tick
//! before the datapath does.

/// Nanoseconds on CLOCK_MONOTONIC_COARSE, comparable with the datapath's timestamps.
pub fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        // This clock cannot fail on Linux; a zero reads every entry as alive.
        Err(_) => 0,
    }
}
