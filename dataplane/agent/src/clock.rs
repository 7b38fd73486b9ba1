//! The clock conntrack timestamps are taken with: CLOCK_MONOTONIC_COARSE, one tick of resolution,
//! as nf_conntrack's jiffies. Userspace reads it to compute remaining timeouts and to sweep.
//!
//! The datapath does not call `bpf_ktime_get_coarse_ns()` per packet: a helper call is the largest
//! fixed cost of the established fast path, while `bpf_jiffies64()` is inlined by the verifier
//! into one load. It computes `jiffies × tick_ns + offset` ([`TickClock`]), which the agent sets
//! up at load from readings of both clocks taken by the `clock` program, and re-aligns
//! periodically (NTP slews CLOCK_MONOTONIC_COARSE against the tick count by up to 500 ppm).

use kubesg_common::config::{ClockSample, Config};

/// Nanoseconds on CLOCK_MONOTONIC_COARSE, comparable with the datapath's timestamps.
pub fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        // This clock cannot fail on Linux; a zero reads every entry as alive.
        Err(_) => 0,
    }
}

/// The kernel tick rates Linux offers (`CONFIG_HZ`); a measured rate is taken as the nearest of
/// them when it is within [`SNAP`] of it.
const KNOWN_HZ: [u64; 4] = [100, 250, 300, 1000];

/// How far (as a ratio) a measured rate may be from a known one and still be taken as it.
const SNAP: f64 = 0.25;

/// The shortest span a rate is measured over. Each reading pairs a tick count with the time of
/// the last timekeeping update, which on a tickless (NO_HZ) kernel is when the CPU woke, up to a
/// tick after the tick the count says: a span is measured within one tick either way. Over
/// 50 ms that is under 20 % at 100 Hz and under 10 % at 250 Hz and up, so the nearest known rate
/// is the right one (two ticks, as a first version measured, could read 250 Hz as 167).
pub const MIN_SPAN_NS: u64 = 50_000_000;

const NSEC_PER_SEC: u64 = 1_000_000_000;

/// How the datapath turns jiffies into CLOCK_MONOTONIC_COARSE nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickClock {
    /// The kernel's tick rate.
    pub hz: u64,
    /// Nanoseconds per tick, as the kernel rounds it (`TICK_NSEC`).
    pub tick_ns: u64,
    /// CLOCK_MONOTONIC_COARSE minus `jiffies × tick_ns` (wrapping).
    pub offset_ns: u64,
}

impl TickClock {
    /// Measures the tick rate from two readings at least two ticks and [`MIN_SPAN_NS`] apart and
    /// aligns the clock on the later one. `None` when they are too close or the clocks went
    /// backwards.
    pub fn measure(first: ClockSample, last: ClockSample) -> Option<TickClock> {
        let ticks = last.jiffies.checked_sub(first.jiffies)?;
        let ns = last.coarse_ns.checked_sub(first.coarse_ns)?;
        if ticks < 2 || ns < MIN_SPAN_NS {
            return None;
        }
        let measured = (ticks as f64) * (NSEC_PER_SEC as f64) / (ns as f64);
        let distance = |hz: u64| (measured / hz as f64).ln().abs();
        let hz = KNOWN_HZ
            .iter()
            .copied()
            .min_by(|&a, &b| distance(a).total_cmp(&distance(b)))
            .filter(|&hz| distance(hz) < (1.0 + SNAP).ln())
            .unwrap_or_else(|| measured.round().max(1.0) as u64);
        let tick_ns = (NSEC_PER_SEC + hz / 2) / hz;
        Some(
            TickClock {
                hz,
                tick_ns,
                offset_ns: 0,
            }
            .aligned(last),
        )
    }

    /// The same rate, aligned on `s`: from then on, `jiffies × tick_ns + offset_ns` reads as
    /// CLOCK_MONOTONIC_COARSE did when `s` was taken.
    pub fn aligned(self, s: ClockSample) -> TickClock {
        TickClock {
            offset_ns: s
                .coarse_ns
                .wrapping_sub(s.jiffies.wrapping_mul(self.tick_ns)),
            ..self
        }
    }

    /// Puts this clock in `cfg` (`None`: the datapath reads the coarse clock with the helper).
    pub fn install(clock: Option<TickClock>, cfg: &mut Config) {
        cfg.tick_ns = clock.map_or(0, |c| c.tick_ns);
        cfg.tick_offset_ns = clock.map_or(0, |c| c.offset_ns);
    }
}

/// The reading most of `samples` agree on (`None` when no two agree). The kernel bumps jiffies a
/// moment before it moves CLOCK_MONOTONIC_COARSE, so a single reading taken in between pairs a new
/// tick with the old time; of three readings taken back to back, two agree.
pub fn consensus(samples: &[ClockSample]) -> Option<ClockSample> {
    samples
        .iter()
        .find(|s| samples.iter().filter(|o| o == s).count() >= 2)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hz: u64, tick: u64) -> ClockSample {
        // jiffies start at INITIAL_JIFFIES; any origin will do.
        let tick_ns = (NSEC_PER_SEC + hz / 2) / hz;
        ClockSample {
            jiffies: 4_294_000_000 + tick,
            coarse_ns: 77_000_000_000 + tick * tick_ns,
        }
    }

    /// Ticks in a span over [`MIN_SPAN_NS`] by more than a tick.
    fn span_ticks(hz: u64) -> u64 {
        MIN_SPAN_NS * hz / NSEC_PER_SEC + 2
    }

    #[test]
    fn measures_each_kernel_tick_rate_over_the_minimum_span() {
        for hz in KNOWN_HZ {
            let c = TickClock::measure(at(hz, 10), at(hz, 10 + span_ticks(hz)))
                .expect("far enough apart");
            assert_eq!(c.hz, hz);
            assert_eq!(c.tick_ns, (NSEC_PER_SEC + hz / 2) / hz);
            // Aligned: the datapath's clock reads the coarse clock of every later tick.
            let mut cfg = Config::defaults();
            TickClock::install(Some(c), &mut cfg);
            for t in [10 + span_ticks(hz), 11 + span_ticks(hz), 1_000_000] {
                let s = at(hz, t);
                let now = cfg.tick_clock_ns(s.jiffies).expect("tick clock installed");
                let err = now.abs_diff(s.coarse_ns);
                assert!(err < 1_000_000, "HZ {hz}, tick {t}: off by {err} ns");
            }
        }
    }

    #[test]
    fn a_reading_taken_late_in_its_tick_still_gives_the_right_rate() {
        // Tickless idle: the time read is when the CPU woke, up to a tick after the tick the
        // count says. Either end of the span may be late by almost a tick.
        for hz in KNOWN_HZ {
            let tick_ns = (NSEC_PER_SEC + hz / 2) / hz;
            let late = |s: ClockSample| ClockSample {
                coarse_ns: s.coarse_ns + tick_ns * 99 / 100,
                ..s
            };
            let (a, b) = (at(hz, 0), at(hz, span_ticks(hz)));
            for (first, last) in [(late(a), b), (a, late(b))] {
                let c = TickClock::measure(first, last).expect("far enough apart");
                assert_eq!(c.hz, hz, "{first:?} → {last:?}");
            }
        }
    }

    #[test]
    fn an_unknown_tick_rate_is_taken_as_measured() {
        let c = TickClock::measure(at(2000, 0), at(2000, 200)).expect("far enough apart");
        assert_eq!(c.hz, 2000);
    }

    #[test]
    fn readings_too_close_or_backwards_measure_nothing() {
        assert_eq!(TickClock::measure(at(250, 3), at(250, 4)), None);
        assert_eq!(
            TickClock::measure(at(250, 3), at(250, 5)),
            None,
            "two ticks, but 8 ms"
        );
        assert_eq!(TickClock::measure(at(250, 9), at(250, 3)), None);
    }

    #[test]
    fn consensus_drops_a_reading_that_pairs_a_new_tick_with_the_old_time() {
        let good = at(250, 7);
        let torn = ClockSample {
            jiffies: good.jiffies + 1,
            ..good
        };
        assert_eq!(consensus(&[torn, good, good]), Some(good));
        assert_eq!(consensus(&[good, torn, good]), Some(good));
        assert_eq!(consensus(&[good, torn, at(250, 9)]), None);
    }

    #[test]
    fn install_without_a_tick_clock_falls_back_to_the_helper() {
        let mut cfg = Config::defaults();
        let c = TickClock::measure(at(250, 0), at(250, span_ticks(250))).expect("measured");
        TickClock::install(Some(c), &mut cfg);
        assert_eq!((cfg.tick_ns, cfg.tick_offset_ns), (c.tick_ns, c.offset_ns));
        assert!(cfg.tick_clock_ns(5).is_some());
        TickClock::install(None, &mut cfg);
        assert_eq!(cfg.tick_clock_ns(5), None);
    }
}
