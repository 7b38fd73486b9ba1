//! The clock conntrack timestamps are taken with: CLOCK_MONOTONIC truncated to the kernel tick,
//! which is what nf_conntrack's jiffies mean. Userspace reads CLOCK_MONOTONIC ([`now_ns`]) to
//! compute remaining timeouts and to sweep.
//!
//! The datapath does not call a clock helper per packet: a helper call is the largest fixed cost
//! of the established fast path, while `bpf_jiffies64()` is inlined by the verifier into one load.
//! It computes `jiffies × tick_ns + offset` ([`TickClock`]), which the agent calibrates at load
//! from readings of jiffies and CLOCK_MONOTONIC taken together by the `clock` program.
//!
//! **Why this relation is exact, and stays so.** The kernel advances jiffies from CLOCK_MONOTONIC
//! itself (`tick_do_update_jiffies64()`: `jiffies_64 += ticks; last_jiffies_update += ticks ×
//! TICK_NSEC`), on a grid that it aligns on a multiple of `TICK_NSEC` when the tick starts
//! (`tick_setup_device()`/`tick_init_jiffy_update()`). So `jiffies × TICK_NSEC + K` is the
//! monotonic time of the start of the current tick for one constant `K`, a multiple of
//! `TICK_NSEC`, for the life of the system: NTP slews both alike, and nothing drifts.
//!
//! **What went wrong before.** The earlier calibration related jiffies to
//! CLOCK_MONOTONIC_COARSE, which the kernel advances in steps of its own accumulation interval
//! whose phase against the jiffies grid wanders with NTP's frequency corrections: the same
//! jiffies value pairs with two coarse readings one tick apart, depending on where that phase is
//! and on when the tick ran. A clock aligned on one reading was off by a tick (and a few ns) at
//! another, and the rate measured from two such readings 50 ms apart on a loaded machine could
//! snap to the wrong `CONFIG_HZ` (250 read as 167, or as 300: a clock 20 % fast or slow between
//! re-alignments).
//!
//! **The calibration now** ([`TickClock::calibrate`]) takes readings over at least
//! [`CALIBRATION_SPAN_NS`]; a reading's `mono − jiffies × tick` is never below `K` (jiffies only
//! count ticks that have begun) and exceeds it by the reading's phase in its tick, plus however
//! late the kernel advanced jiffies (a loaded or preempted CPU reads stale jiffies: only ever
//! *above* `K`). So the lowest values are the truth, whatever the load: the rate is the known
//! `CONFIG_HZ` whose lower envelope is flat across the span (a wrong rate tilts it by 17 % or
//! more), and `K` is the lowest value, rounded down to the tick grid.
//!
//! **The worst error.** With `K` on the grid, the datapath's clock is never ahead of
//! CLOCK_MONOTONIC and is behind it by less than one tick plus the kernel's own delay in
//! advancing jiffies ([`MAX_LAG_TICKS`] ticks in all: the kernel forces a jiffies update after
//! five stalled ticks, `MAX_STALLED_JIFFIES`). nf_conntrack's jiffies have the same bound. The
//! agent checks it every few seconds ([`TickClock::lag_ns`], exported as
//! `kubesg_agent_datapath_clock_lag_seconds`) and calibrates again when it is broken. When no
//! calibration can be trusted, the datapath reads CLOCK_MONOTONIC_COARSE with the helper
//! (behind CLOCK_MONOTONIC by less than two ticks plus the same delay), and the agent says so
//! in its log and in `kubesg_agent_datapath_clock_hz` (0).

use std::fmt;

use kubesg_common::config::{ClockSample, Config};

/// Nanoseconds on CLOCK_MONOTONIC, the clock the datapath's timestamps are taken on (truncated
/// to the tick).
pub fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        // This clock cannot fail on Linux; a zero reads every entry as alive.
        Err(_) => 0,
    }
}

/// The kernel tick rates Linux offers (`CONFIG_HZ`). A kernel with another rate gets the helper
/// clock.
pub const KNOWN_HZ: [u64; 4] = [100, 250, 300, 1000];

/// The shortest span a calibration's readings cover. A wrong rate tilts the lower envelope of
/// `mono − jiffies × tick` by at least 1/6 of the span (250 Hz read as 300); over 100 ms that is
/// 16 ms, four times the widest spread a right rate can show (under one tick).
pub const CALIBRATION_SPAN_NS: u64 = 100_000_000;

/// The fewest readings a calibration takes: enough that each segment of the span has several,
/// and that one of them falls early in its tick.
pub const MIN_SAMPLES: usize = 40;

/// The span is cut into this many segments; the lowest reading of each is its envelope.
const SEGMENTS: usize = 5;

/// How far behind CLOCK_MONOTONIC the datapath's clock may be, in ticks: one tick of truncation
/// plus the five stalled ticks after which the kernel forces jiffies on (`MAX_STALLED_JIFFIES`
/// in kernel/time/tick-sched.c).
pub const MAX_LAG_TICKS: u64 = 6;

const NSEC_PER_SEC: u64 = 1_000_000_000;

/// `TICK_NSEC` for `hz`, as the kernel rounds it.
pub const fn tick_ns(hz: u64) -> u64 {
    (NSEC_PER_SEC + hz / 2) / hz
}

/// How the datapath turns jiffies into CLOCK_MONOTONIC nanoseconds (the start of the tick).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TickClock {
    /// The kernel's tick rate.
    pub hz: u64,
    /// Nanoseconds per tick, as the kernel rounds it (`TICK_NSEC`).
    pub tick_ns: u64,
    /// CLOCK_MONOTONIC at the start of a tick minus `jiffies × tick_ns` (wrapping).
    pub offset_ns: u64,
}

/// A calibration and what it saw, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    /// The clock.
    pub clock: TickClock,
    /// How many readings it took.
    pub samples: usize,
    /// Over how long.
    pub span_ns: u64,
    /// Whether the lowest reading fell within a quarter tick after a boundary of the
    /// `TICK_NSEC` grid, so that the offset was rounded onto it. When not (a kernel that does not
    /// align its tick, or no reading early in its tick), the offset is the lowest reading's, and
    /// the clock may read ahead of CLOCK_MONOTONIC by as much as that reading was into its tick:
    /// less than one tick ([`Calibration::lead_ns`]).
    pub on_grid: bool,
    /// The lowest reading's position on the `TICK_NSEC` grid.
    pub phase_ns: u64,
}

/// Why readings did not give a clock that can be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CalibrationError {
    /// Too few readings, or over too short a span.
    TooFew {
        /// Readings.
        samples: usize,
        /// Their span.
        span_ns: u64,
    },
    /// A segment of the span had no reading (the sampler was held up).
    Gap,
    /// No known rate, or more than one, has a flat lower envelope: the spread of each, in ns.
    NoRate(Vec<(u64, i128)>),
}

impl fmt::Display for CalibrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalibrationError::TooFew { samples, span_ns } => write!(
                f,
                "{samples} readings over {span_ns} ns (need {MIN_SAMPLES} over {CALIBRATION_SPAN_NS} ns)"
            ),
            CalibrationError::Gap => write!(f, "a segment of the span has no reading"),
            CalibrationError::NoRate(spreads) => {
                write!(f, "no single known tick rate fits; envelope spread by HZ:")?;
                for (hz, s) in spreads {
                    write!(f, " {hz}={s}ns")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CalibrationError {}

/// `mono − jiffies × tick` of a reading, exact (no wrapping).
fn residual(s: &ClockSample, tick_ns: u64) -> i128 {
    s.mono_ns as i128 - s.jiffies as i128 * tick_ns as i128
}

impl Calibration {
    /// How far ahead of CLOCK_MONOTONIC the clock may read: nothing on the grid, less than a
    /// tick off it.
    pub fn lead_ns(&self) -> u64 {
        if self.on_grid {
            0
        } else {
            self.clock.tick_ns
        }
    }
}

impl TickClock {
    /// Calibrates from `samples` (module documentation): readings of jiffies and
    /// CLOCK_MONOTONIC, in the order taken.
    pub fn calibrate(samples: &[ClockSample]) -> Result<Calibration, CalibrationError> {
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            return Err(CalibrationError::TooFew {
                samples: 0,
                span_ns: 0,
            });
        };
        let span_ns = last.mono_ns.saturating_sub(first.mono_ns);
        if samples.len() < MIN_SAMPLES || span_ns < CALIBRATION_SPAN_NS {
            return Err(CalibrationError::TooFew {
                samples: samples.len(),
                span_ns,
            });
        }
        let segment = |s: &ClockSample| {
            let at = s.mono_ns.saturating_sub(first.mono_ns) as u128;
            ((at * SEGMENTS as u128 / (span_ns as u128 + 1)) as usize).min(SEGMENTS - 1)
        };
        let mut spreads = Vec::new();
        let mut fits = Vec::new();
        for hz in KNOWN_HZ {
            let tick = tick_ns(hz);
            let mut envelope = [None::<i128>; SEGMENTS];
            for s in samples {
                let r = residual(s, tick);
                let e = &mut envelope[segment(s)];
                *e = Some(e.map_or(r, |m| m.min(r)));
            }
            let Some(envelope) = envelope.into_iter().collect::<Option<Vec<_>>>() else {
                return Err(CalibrationError::Gap);
            };
            let (lo, hi) = envelope
                .iter()
                .fold((i128::MAX, i128::MIN), |(lo, hi), &e| {
                    (lo.min(e), hi.max(e))
                });
            spreads.push((hz, hi - lo));
            if hi - lo < tick as i128 {
                fits.push((hz, lo));
            }
        }
        let [(hz, lowest)] = fits[..] else {
            return Err(CalibrationError::NoRate(spreads));
        };
        let tick = tick_ns(hz);
        let phase = lowest.rem_euclid(tick as i128);
        let on_grid = phase <= (tick / 4) as i128;
        let k = if on_grid { lowest - phase } else { lowest };
        Ok(Calibration {
            clock: TickClock {
                hz,
                tick_ns: tick,
                // K is negative (jiffies start near 2^32); the datapath adds it wrapping.
                offset_ns: k as i64 as u64,
            },
            samples: samples.len(),
            span_ns,
            on_grid,
            phase_ns: phase as u64,
        })
    }

    /// The datapath's reading for `jiffies`.
    pub fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.offset_ns)
    }

    /// How far the datapath's clock is behind CLOCK_MONOTONIC at reading `s` (negative: ahead).
    /// Within `0..MAX_LAG_TICKS × tick_ns` when the calibration holds.
    pub fn lag_ns(&self, s: &ClockSample) -> i64 {
        s.mono_ns.wrapping_sub(self.at(s.jiffies)) as i64
    }

    /// Whether `lag` (the lowest of a few readings' [`TickClock::lag_ns`]) is within the bound
    /// this clock promises (`lead_ns`: how far ahead its calibration allows it to read).
    pub fn lag_within_bound(&self, lag: i64, lead_ns: u64) -> bool {
        lag >= -(lead_ns as i64) && lag < (MAX_LAG_TICKS * self.tick_ns) as i64
    }

    /// Puts this clock in `cfg` (`None`: the datapath reads the coarse clock with the helper).
    pub fn install(clock: Option<TickClock>, cfg: &mut Config) {
        cfg.tick_ns = clock.map_or(0, |c| c.tick_ns);
        cfg.tick_offset_ns = clock.map_or(0, |c| c.offset_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's grid: jiffies start near 2^32 (INITIAL_JIFFIES) and tick `k` begins at
    /// `k × tick` on CLOCK_MONOTONIC, a multiple of the tick.
    const JIFFIES_AT_ZERO: u64 = 4_294_000_000;

    /// A reading at `mono` of a kernel at `hz` whose jiffies lag by `stale` ns.
    fn reading(hz: u64, mono: u64, stale: u64) -> ClockSample {
        ClockSample {
            jiffies: JIFFIES_AT_ZERO + mono.saturating_sub(stale) / tick_ns(hz),
            coarse_ns: 0,
            mono_ns: mono,
        }
    }

    /// Readings every `step` ns from `start`, spanning `span`, with `stale(i)` of jiffies lag.
    fn readings(
        hz: u64,
        start: u64,
        step: u64,
        span: u64,
        stale: impl Fn(usize) -> u64,
    ) -> Vec<ClockSample> {
        (0..=(span / step) as usize)
            .map(|i| reading(hz, start + i as u64 * step, stale(i)))
            .collect()
    }

    /// The start of the tick at `mono`.
    fn truncated(hz: u64, mono: u64) -> u64 {
        mono / tick_ns(hz) * tick_ns(hz)
    }

    #[test]
    fn each_kernel_tick_rate_is_found_and_the_clock_reads_the_start_of_the_tick() {
        for hz in KNOWN_HZ {
            let samples = readings(hz, 77_000_123_457, 1_070_000, 120_000_000, |_| 0);
            let cal = TickClock::calibrate(&samples).expect("calibrates");
            assert_eq!(cal.clock.hz, hz);
            assert_eq!(cal.clock.tick_ns, tick_ns(hz));
            assert!(cal.on_grid, "{cal:?}");
            for mono in [77_000_000_000, 77_123_456_789, 900_000_000_001] {
                let s = reading(hz, mono, 0);
                assert_eq!(cal.clock.at(s.jiffies), truncated(hz, mono), "HZ {hz}");
            }
        }
    }

    #[test]
    fn stale_jiffies_on_a_loaded_machine_do_not_move_the_clock() {
        // Most readings see jiffies late by up to five ticks (a preempted timekeeping CPU);
        // a few are fresh. The rate and the offset are the same as on an idle machine.
        for hz in KNOWN_HZ {
            let t = tick_ns(hz);
            let samples = readings(hz, 5_000_000_000, 900_000, 150_000_000, |i| {
                if i % 7 == 0 {
                    0
                } else {
                    (i as u64 * 7_919) % (5 * t)
                }
            });
            let cal = TickClock::calibrate(&samples).expect("calibrates");
            assert_eq!(cal.clock.hz, hz);
            let s = reading(hz, 5_432_109_876, 0);
            assert_eq!(cal.clock.at(s.jiffies), truncated(hz, 5_432_109_876));
        }
    }

    #[test]
    fn the_two_closest_rates_are_told_apart() {
        // 250 and 300 Hz are 20 % apart: over the minimum span the wrong one's envelope tilts
        // by several ticks.
        for (hz, other) in [(250, 300), (300, 250)] {
            let samples = readings(
                hz,
                1_000_000_000,
                2_300_000,
                CALIBRATION_SPAN_NS + 10_000_000,
                |_| 0,
            );
            let cal = TickClock::calibrate(&samples).expect("calibrates");
            assert_eq!(cal.clock.hz, hz, "not {other}");
        }
    }

    #[test]
    fn an_unknown_tick_rate_is_refused() {
        let samples = readings(1200, 1_000_000_000, 1_000_000, 150_000_000, |_| 0);
        assert!(matches!(
            TickClock::calibrate(&samples),
            Err(CalibrationError::NoRate(_))
        ));
    }

    #[test]
    fn too_few_readings_too_short_a_span_or_a_gap_calibrate_nothing() {
        let short = readings(250, 1_000_000_000, 1_000_000, 60_000_000, |_| 0);
        assert!(matches!(
            TickClock::calibrate(&short),
            Err(CalibrationError::TooFew { .. })
        ));
        let sparse = readings(250, 1_000_000_000, 10_000_000, 200_000_000, |_| 0);
        assert!(matches!(
            TickClock::calibrate(&sparse),
            Err(CalibrationError::TooFew { .. })
        ));
        let mut gap = readings(250, 1_000_000_000, 1_000_000, 150_000_000, |_| 0);
        // The third of five 30 ms segments.
        gap.retain(|s| !(1_059_000_000..=1_091_000_000).contains(&s.mono_ns));
        assert_eq!(TickClock::calibrate(&gap), Err(CalibrationError::Gap));
        assert!(matches!(
            TickClock::calibrate(&[]),
            Err(CalibrationError::TooFew { samples: 0, .. })
        ));
    }

    #[test]
    fn a_kernel_off_the_grid_gets_the_lowest_reading_as_offset() {
        // Tick k begins at k × tick + 1.5 ms; readings every millisecond land 0.5, 1.5, 2.5 and
        // 3.5 ms into their ticks, so the lowest is 2 ms past a grid boundary: nothing is
        // rounded, and the clock reads the lowest reading (0.5 ms after the tick began).
        let hz = 250;
        let shift = 1_500_000;
        let samples: Vec<_> = readings(hz, 2_000_000_000, 1_000_000, 150_000_000, |_| 0)
            .into_iter()
            .map(|s| ClockSample {
                jiffies: JIFFIES_AT_ZERO + (s.mono_ns - shift) / tick_ns(hz),
                ..s
            })
            .collect();
        let cal = TickClock::calibrate(&samples).expect("calibrates");
        assert!(!cal.on_grid);
        assert_eq!(cal.phase_ns, 2_000_000);
        let s = samples[17];
        let lag = cal.clock.lag_ns(&s);
        assert!(lag >= 0 && lag < tick_ns(hz) as i64, "lag {lag}");
    }

    #[test]
    fn lag_is_measured_against_the_bound() {
        let hz = 250;
        let samples = readings(hz, 3_000_000_000, 1_000_000, 110_000_000, |_| 0);
        let clock = TickClock::calibrate(&samples).expect("calibrates").clock;
        let t = tick_ns(hz) as i64;
        let fresh = reading(hz, 3_500_000_100, 0);
        assert_eq!(clock.lag_ns(&fresh), 100);
        assert!(clock.lag_within_bound(100, 0));
        let stale = reading(hz, 3_500_000_100, 5 * tick_ns(hz));
        assert_eq!(clock.lag_ns(&stale), 5 * t + 100);
        assert!(clock.lag_within_bound(5 * t + 100, 0));
        assert!(!clock.lag_within_bound(6 * t, 0), "six ticks behind");
        assert!(!clock.lag_within_bound(-1, 0), "ahead");
        assert!(clock.lag_within_bound(-1, 10));
    }

    #[test]
    fn install_without_a_tick_clock_falls_back_to_the_helper() {
        let mut cfg = Config::defaults();
        let samples = readings(250, 1_000_000_000, 1_000_000, 110_000_000, |_| 0);
        let c = TickClock::calibrate(&samples).expect("calibrates").clock;
        TickClock::install(Some(c), &mut cfg);
        assert_eq!((cfg.tick_ns, cfg.tick_offset_ns), (c.tick_ns, c.offset_ns));
        assert_eq!(cfg.tick_clock_ns(12_345), Some(c.at(12_345)));
        TickClock::install(None, &mut cfg);
        assert_eq!(cfg.tick_clock_ns(5), None);
    }
}
