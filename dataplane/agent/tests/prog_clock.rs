//! The datapath's clock: `jiffies × tick + offset`, calibrated by the agent from the `clock`
//! program's readings, reads as CLOCK_MONOTONIC truncated to the tick (which the sweep and
//! `ct list` compare with): never ahead of it, behind by under a tick, and still so when the
//! calibration ran with both cores busy; without it the datapath falls back to the coarse-clock
//! helper; and a clock check puts settings someone else wrote back in line.

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use kubesg_agent::clock::{KNOWN_HZ, MAX_LAG_TICKS};
use kubesg_common::config::Config;
use kubesg_testkit::{family::Family, ipv4_and_ipv6, loopback::LoopbackDatapath};

ipv4_and_ipv6!(
    timestamps_read_as_the_monotonic_clock_truncated_to_the_tick,
    without_a_tick_clock_timestamps_come_from_the_coarse_clock_helper,
    a_clock_check_puts_settings_written_behind_its_back_in_line,
);

/// `CONFIG_HZ` of the running kernel, when it publishes its configuration.
fn kernel_hz() -> Option<u64> {
    let out = Command::new("zcat").arg("/proc/config.gz").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

/// Changes CONFIG directly in the map, which `Datapath::set_config` would not let through.
fn tamper_with_config(dp: &mut LoopbackDatapath, change: impl FnOnce(&mut Config)) {
    let mut cfg = dp.datapath.config().expect("reading the config");
    change(&mut cfg);
    dp.datapath
        .maps_mut()
        .config
        .set(0, cfg, 0)
        .expect("writing CONFIG behind the datapath's back");
}

/// Sends a UDP query and returns when its entry says it was created, with the window of
/// CLOCK_MONOTONIC around the run.
fn created_at(dp: &LoopbackDatapath, f: Family) -> (u64, (u64, u64)) {
    dp.pod_sends(&f.udp_out(53, b"query"));
    (dp.conn().entry.created_ns, dp.last_run_window())
}

/// Asserts the bound of `kubesg_agent::clock`: a reading taken during a run whose window was
/// `before..after` on CLOCK_MONOTONIC is not after `after` and at most `lag_ticks` ticks
/// before `before`.
#[track_caller]
fn assert_within(reading: u64, (before, after): (u64, u64), tick_ns: u64, lag_ticks: u64) {
    assert!(
        reading <= after,
        "{reading} is ahead of CLOCK_MONOTONIC ({after} after the run)"
    );
    assert!(
        reading + lag_ticks * tick_ns >= before,
        "{reading} is more than {lag_ticks} ticks of {tick_ns} ns behind {before}"
    );
}

fn timestamps_read_as_the_monotonic_clock_truncated_to_the_tick(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    let tick = dp
        .datapath
        .tick_clock()
        .expect("the tick clock is calibrated at load");
    if let Some(hz) = kernel_hz() {
        assert_eq!(
            tick.hz, hz,
            "calibrated tick rate vs the kernel's CONFIG_HZ"
        );
    }
    let cfg = dp.datapath.config().expect("reading the config");
    assert_eq!(
        (cfg.tick_ns, cfg.tick_offset_ns),
        (tick.tick_ns, tick.offset_ns)
    );
    // Over a few ticks, not just those the calibration saw.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(30));
        let (created, window) = created_at(&dp, f);
        assert_within(created, window, tick.tick_ns, MAX_LAG_TICKS);
        kubesg_agent::conntrack::flush(dp.datapath.maps_mut(), None).expect("flushing");
    }
}

fn without_a_tick_clock_timestamps_come_from_the_coarse_clock_helper(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    let tick_ns = dp.datapath.tick_clock().expect("tick clock").tick_ns;
    tamper_with_config(&mut dp, |cfg| {
        cfg.tick_ns = 0;
        cfg.tick_offset_ns = 12_345;
    });
    let (created, window) = created_at(&dp, f);
    // CLOCK_MONOTONIC_COARSE moves in steps of a tick that start up to a tick before the
    // jiffies grid's: one tick more of lag than the tick clock.
    // (Were the tampered offset used, the reading would be 12 345 ns after boot.)
    assert_within(created, window, tick_ns, MAX_LAG_TICKS + 1);
}

fn a_clock_check_puts_settings_written_behind_its_back_in_line(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    let tick = dp.datapath.tick_clock().expect("tick clock");
    tamper_with_config(&mut dp, |cfg| {
        cfg.tick_offset_ns = cfg.tick_offset_ns.wrapping_add(5_000_000_000)
    });
    let (drifted, (_, after)) = created_at(&dp, f);
    assert!(
        drifted > after + 4_000_000_000,
        "the drift shows: {drifted} vs {after}"
    );
    kubesg_agent::conntrack::flush(dp.datapath.maps_mut(), None).expect("flushing");

    let check = dp.datapath.check_clock().expect("checking the clock");
    assert_eq!(check.hz, tick.hz);
    assert!(
        !check.recalibrated,
        "{check:?}: the settings were restored, not recalibrated"
    );
    assert!(
        (0..(MAX_LAG_TICKS * tick.tick_ns) as i64).contains(&check.lag_ns),
        "{check:?}"
    );
    assert_eq!(dp.datapath.tick_clock(), Some(tick), "the same calibration");
    let (created, window) = created_at(&dp, f);
    assert_within(created, window, tick.tick_ns, MAX_LAG_TICKS);
}

/// Calibrated while two threads keep both cores busy, the clock still has the right rate and
/// its bound: over readings spread across many ticks, none is ahead of CLOCK_MONOTONIC, none is
/// [`MAX_LAG_TICKS`] behind, and the freshest is less than a tick behind (a calibration a tick
/// off would show in all of them).
#[test]
fn calibrated_under_load_the_clock_is_within_its_bound() {
    kubesg_testkit::require_privileged!();
    let stop = AtomicBool::new(false);
    let dp = std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        let dp = LoopbackDatapath::load(None);
        stop.store(true, Ordering::Relaxed);
        dp
    });
    let tick = dp
        .datapath
        .tick_clock()
        .expect("calibrated under load, not the helper fallback");
    assert!(KNOWN_HZ.contains(&tick.hz), "{tick:?}");
    if let Some(hz) = kernel_hz() {
        assert_eq!(
            tick.hz, hz,
            "calibrated tick rate vs the kernel's CONFIG_HZ"
        );
    }
    let mut lags = Vec::new();
    for i in 0..200u64 {
        let s = dp.datapath.read_clocks().expect("reading the clocks");
        lags.push(tick.lag_ns(&s));
        std::thread::sleep(Duration::from_micros(300 + (i * 577) % 900));
    }
    let bound = (MAX_LAG_TICKS * tick.tick_ns) as i64;
    assert!(
        lags.iter().all(|l| (0..bound).contains(l)),
        "lags outside 0..{bound} ns: {:?}",
        lags.iter()
            .filter(|l| !(0..bound).contains(l))
            .collect::<Vec<_>>()
    );
    let freshest = lags.iter().min().copied().unwrap_or(i64::MAX);
    assert!(
        freshest < tick.tick_ns as i64,
        "even the freshest reading is {freshest} ns behind (a tick is {} ns)",
        tick.tick_ns
    );
}
