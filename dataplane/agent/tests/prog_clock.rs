//! The datapath's clock: `jiffies × tick + offset`, set up by the agent from the `clock`
//! program's readings, reads as CLOCK_MONOTONIC_COARSE (which the sweep and `ct list` use) to
//! within a tick; without it the datapath falls back to the coarse-clock helper; and
//! `Datapath::sync_clock` puts a clock that drifted back in line.

use std::{process::Command, time::Duration};

use kubesg_agent::clock;
use kubesg_common::config::Config;
use kubesg_testkit::{family::Family, ipv4_and_ipv6, loopback::LoopbackDatapath};

ipv4_and_ipv6!(
    timestamps_read_as_the_coarse_clock_within_a_tick,
    without_a_tick_clock_timestamps_come_from_the_coarse_clock_helper,
    sync_clock_puts_a_drifted_clock_back_in_line,
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
/// CLOCK_MONOTONIC_COARSE around the run.
fn created_at(dp: &LoopbackDatapath, f: Family) -> (u64, (u64, u64)) {
    dp.pod_sends(&f.udp_out(53, b"query"));
    (dp.conn().entry.created_ns, dp.last_run_window())
}

fn timestamps_read_as_the_coarse_clock_within_a_tick(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    let tick = dp
        .datapath
        .tick_clock()
        .expect("the tick clock is set up at load");
    if let Some(hz) = kernel_hz() {
        assert_eq!(tick.hz, hz, "measured tick rate vs the kernel's CONFIG_HZ");
    }
    let cfg = dp.datapath.config().expect("reading the config");
    assert_eq!(
        (cfg.tick_ns, cfg.tick_offset_ns),
        (tick.tick_ns, tick.offset_ns)
    );
    // Over a few ticks, not just the one the clock was aligned on.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(30));
        let (created, (before, after)) = created_at(&dp, f);
        assert!(
            before <= created + tick.tick_ns && created <= after + tick.tick_ns,
            "created {created} outside {before}..{after} ± {} ns",
            tick.tick_ns
        );
        kubesg_agent::conntrack::flush(dp.datapath.maps_mut(), None).expect("flushing");
    }
}

fn without_a_tick_clock_timestamps_come_from_the_coarse_clock_helper(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    tamper_with_config(&mut dp, |cfg| {
        cfg.tick_ns = 0;
        cfg.tick_offset_ns = 12_345;
    });
    let (created, (before, after)) = created_at(&dp, f);
    // The helper reads CLOCK_MONOTONIC_COARSE itself: no tick of slack.
    assert!(
        before <= created && created <= after,
        "created {created} outside {before}..{after}"
    );
}

fn sync_clock_puts_a_drifted_clock_back_in_line(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    tamper_with_config(&mut dp, |cfg| {
        cfg.tick_offset_ns = cfg.tick_offset_ns.wrapping_add(5_000_000_000)
    });
    let (drifted, (_, after)) = created_at(&dp, f);
    assert!(
        drifted > after + 4_000_000_000,
        "the drift shows: {drifted} vs {after}"
    );
    kubesg_agent::conntrack::flush(dp.datapath.maps_mut(), None).expect("flushing");

    dp.datapath.sync_clock().expect("re-aligning the clock");
    let tick = dp.datapath.tick_clock().expect("tick clock").tick_ns;
    let (created, (before, after)) = created_at(&dp, f);
    assert!(
        before <= created + tick && created <= after + tick,
        "created {created} outside {before}..{after} ± {tick} ns after sync"
    );
    let now = clock::now_ns();
    assert!(
        created <= now + tick,
        "{created} is not in the past of {now}"
    );
}
