//! The loaded datapath: programs, maps and attachments, and the typed API that programs endpoints
//! and compiled policies into it.
//!
//! Policies are replaced atomically: a new policy is written under a fresh policy id while the old
//! one keeps judging, then each endpoint is switched with a single map update, then the old
//! entries are deleted. No packet ever sees a half-written policy.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, IterableMap as _, MapData, MapError, PerCpuValues, RingBuf},
    programs::{ProgramError, ProgramFd, SchedClassifier},
    Ebpf, EbpfError, EbpfLoader,
};
use kubesg_common::{
    config::{ClockSample, Config},
    conntrack::CtKey,
    endpoint::{cache_slot, CachedEndpoint, Endpoint, EP_F_LAYERED, EP_F_STATELESS, POLICY_NONE},
    event::Counters,
    limits,
    policy::{ClassSet, PeerKey},
    source::{SourceKey, SRC_F_CHECK, SRC_F_LINK_LOCAL, SRC_F_MORE, SRC_F_V4, SRC_F_V6},
    AF_INET, AF_INET6,
};
use tracing::{debug, info, warn};

use crate::{
    attach::{self, AttachError, AttachMode, Hook},
    bpffs,
    clock::{self, TickClock},
    ct_counts::CtCounts,
    ct_migrate::{Copied, CtMigration},
    maps::{map_pin_path, names, Maps, MapsError},
    pin_compat,
    policy::CompiledPolicy,
    policy_in_place::{self, is_host},
    tables::{self, TablesError},
};

/// The eBPF object built from `dataplane/ebpf` by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kubesg"));

/// The production pin directory (the brief fixes it).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/kubesg";

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Pin maps and attachments here so they outlive the agent (production:
    /// [`DEFAULT_PIN_DIR`]); `None` keeps everything private to this process (tests, benchmark).
    pub pin_dir: Option<PathBuf>,
    /// tcx or clsact; `None` picks by kernel version.
    pub attach_mode: Option<AttachMode>,
    /// Conntrack table size; `None` keeps [`limits::CT_ENTRIES`]. Ignored when reusing pinned maps.
    pub ct_entries: Option<u32>,
    /// The most conntrack entries one endpoint may hold (0: no limit but the table's size);
    /// `None`: [`default_ct_endpoint_limit`] of the table's size.
    pub ct_endpoint_limit: Option<u32>,
    /// Settings written at load.
    pub config: Config,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        DatapathOptions {
            pin_dir: None,
            attach_mode: None,
            ct_entries: None,
            ct_endpoint_limit: None,
            config: Config::defaults(),
        }
    }
}

/// The default share of the conntrack table one endpoint may hold: a quarter (65 536 entries of
/// the default 262 144). A pod flooded with NEW connections, or opening them itself, then takes
/// at most a quarter of the node's table and every other pod keeps room to open connections
/// until four pods at once are at their limit; and a quarter is still far more than one pod
/// needs in normal service (more connections than a client has ephemeral ports towards one
/// server, 28 232 by Linux's default `ip_local_port_range`). Busy proxies that need more get a
/// larger table or an explicit limit (`--conntrack-endpoint-limit`).
pub fn default_ct_endpoint_limit(table_entries: u32) -> u32 {
    (table_entries / 4).max(1)
}

/// A compiled policy installed in the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyHandle {
    /// Its id in the maps.
    pub id: u32,
    /// Whether endpoints using it are judged statelessly.
    pub stateless: bool,
    /// Whether it is layered: its endpoints are flagged so that the datapath reads its layers.
    pub layered: bool,
}

impl PolicyHandle {
    /// The `EP_F_*` flags of an endpoint judged by this policy.
    pub fn endpoint_flags(&self) -> u32 {
        let mut flags = 0;
        if self.stateless {
            flags |= EP_F_STATELESS;
        }
        if self.layered {
            flags |= EP_F_LAYERED;
        }
        flags
    }
}

/// What one in-place policy change wrote ([`Datapath::update_policy_in_place`]), in order.
#[derive(Debug)]
pub struct InPlaceChange {
    policy_id: u32,
    ops: Vec<policy_in_place::HostOp>,
}

impl InPlaceChange {
    /// How many `POLICY_HOSTS` entries it wrote or deleted: what the change cost the maps.
    pub fn entries(&self) -> usize {
        self.ops.len()
    }
}

/// Errors of the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The eBPF object could not be loaded (verifier, missing privileges, bpffs).
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] EbpfError),
    /// A program could not be prepared.
    #[error("program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        source: ProgramError,
    },
    /// The bpf filesystem is not available.
    #[error("bpf filesystem: {0}")]
    Bpffs(#[from] bpffs::BpffsError),
    /// The maps do not match.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// A map operation failed.
    #[error("{op}: {source}")]
    Map {
        /// What was being done.
        op: String,
        /// The kernel's answer.
        source: MapError,
    },
    /// The policy cannot be expressed in the datapath.
    #[error(transparent)]
    Tables(#[from] TablesError),
    /// Attaching or detaching failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// Every endpoint slot is taken.
    #[error("the datapath is full: {0} endpoints")]
    TooManyEndpoints(u32),
    /// The operation needs a registered endpoint.
    #[error("no endpoint on interface {0}")]
    NoEndpoint(u32),
    /// The pods' further addresses would not fit the `SOURCES` map.
    #[error("interface {ifindex}: {wanted} further addresses do not fit the {limit} the datapath has room for")]
    TooManySources {
        /// The endpoint.
        ifindex: u32,
        /// Its further addresses.
        wanted: usize,
        /// `limits::SOURCES`.
        limit: u32,
    },
    /// A policy that endpoints still use cannot be removed.
    #[error("policy {0} is still used by endpoint(s) {1:?}")]
    PolicyInUse(u32, Vec<u32>),
    /// Pinned maps of another build could not be checked or replaced.
    #[error("pinned maps: {0}")]
    PinnedMaps(String),
    /// The `clock` program could not read the kernel's clocks.
    #[error("reading the kernel clocks: {0}")]
    Clock(String),
}

/// Deletes `key`; one already gone is no error.
fn remove_key<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<MapData, K, V>,
    key: &K,
    name: &str,
) -> Result<(), DatapathError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(map_err(format!("deleting from {name}"))(e)),
    }
}

/// Each endpoint's counter slot, by interface index.
fn counter_slots(maps: &Maps) -> Result<HashMap<u32, u32>, DatapathError> {
    maps.endpoints
        .iter()
        .map(|r| r.map(|(ifindex, ep)| (ifindex, ep.counter_slot)))
        .collect::<Result<_, _>>()
        .map_err(map_err("listing endpoints"))
}

/// One more entry for the endpoint of `key`, if it is registered.
fn count_in(counts: &CtCounts, slots: &HashMap<u32, u32>, key: &CtKey) {
    if let Some(slot) = slots.get(&key.ifindex) {
        counts.add(*slot, 1);
    }
}

fn map_err(op: impl Into<String>) -> impl FnOnce(MapError) -> DatapathError {
    let op = op.into();
    move |source| DatapathError::Map { op, source }
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    events: Option<RingBuf<MapData>>,
    pin_dir: Option<PathBuf>,
    mode: AttachMode,
    /// Attachments of an unpinned datapath (they detach when dropped).
    links: HashMap<(u32, Hook), aya::programs::tc::SchedClassifierLink>,
    next_policy_id: u32,
    /// Where the `clock` program leaves its readings (private to this process, never pinned).
    clock_map: Array<MapData, ClockSample>,
    /// The datapath's tick clock; `None`: it could not be calibrated and the datapath calls the
    /// coarse-clock helper per packet.
    tick: Option<TickClock>,
    /// How far ahead of CLOCK_MONOTONIC the tick clock may read ([`clock::Calibration::lead_ns`]).
    tick_lead_ns: u64,
    /// The conntrack table of an older layout this load replaced, until its entries are
    /// carried over a second time ([`Datapath::finish_conntrack_migration`]).
    ct_migration: Option<CtMigration>,
}

/// How many times a calibration is tried before the datapath falls back to the helper clock.
const CALIBRATION_ATTEMPTS: usize = 3;

/// How long one calibration may take to gather its readings (it needs
/// [`clock::CALIBRATION_SPAN_NS`], 100 ms, of them; a starved sampler gets ten times that).
const CALIBRATION_LIMIT: Duration = Duration::from_secs(1);

/// How many back-to-back readings a clock check takes; the lowest lag counts (the others may
/// have met jiffies a moment before the kernel advanced them).
const CHECK_READINGS: usize = 8;

/// What [`Datapath::check_clock`] measured and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockCheck {
    /// How far the datapath's clock was behind CLOCK_MONOTONIC (negative: ahead), in ns.
    pub lag_ns: i64,
    /// The tick rate the datapath's clock runs at; 0: it reads the coarse-clock helper.
    pub hz: u64,
    /// Whether the lag was out of bounds, so the clock was calibrated again.
    pub recalibrated: bool,
}

impl Datapath {
    /// Loads the programs, creating the maps or, when pinned maps exist under the pin directory,
    /// reusing them so that tracked connections survive an agent restart.
    pub fn load(opts: &DatapathOptions) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                bpffs::ensure_mounted(dir)?;
                bpffs::create_dir(&dir.join("maps"))?;
                names::ALL
                    .iter()
                    .map(|n| (*n, map_pin_path(dir, n)))
                    .collect()
            }
            None => Vec::new(),
        };
        let mut ct_migration = None;
        // Whether the load creates the conntrack table (empty) or the entry counts rather than
        // reusing pinned ones: a new table starts every count at zero (and counts what the
        // migration copies into it); new counts beside a reused table are counted from it.
        let pinned = |name: &str| pin_paths.iter().any(|(n, p)| *n == name && p.exists());
        let mut ct_new = !pinned(names::CONNTRACK);
        let mut counts_new = !pinned(names::CT_COUNTS);
        if !pin_paths.is_empty() {
            // Held open before its pin goes, so its entries can be carried over.
            if let Some((_, path)) = pin_paths.iter().find(|(n, _)| *n == names::CONNTRACK) {
                ct_migration = CtMigration::open(path).map_err(|e| {
                    DatapathError::PinnedMaps(format!("opening the older conntrack table: {e}"))
                })?;
            }
            let expected = pin_compat::shapes(OBJECT, &[names::CONNTRACK])
                .map_err(|e| DatapathError::PinnedMaps(format!("reading the object: {e}")))?;
            let replaced = pin_compat::unpin_incompatible(&expected, &pin_paths)
                .map_err(|e| DatapathError::PinnedMaps(format!("unpinning: {e}")))?;
            ct_new |= replaced.contains(&names::CONNTRACK);
            counts_new |= replaced.contains(&names::CT_COUNTS);
            if !replaced.contains(&names::CONNTRACK) {
                ct_migration = None;
            } else if ct_migration.is_some() {
                info!("the conntrack table has a new layout: carrying its entries over");
            } else {
                warn!("the conntrack table is new: connections tracked before are not known");
            }
        }
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(n) = opts.ct_entries {
            loader.map_max_entries(names::CONNTRACK, n);
        }
        let mut ebpf = loader.load(OBJECT)?;
        for name in ["from_pod", "to_pod", "parse_only", "parse_lookup", "clock"] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Program {
                    name,
                    source: ProgramError::NotLoaded,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            // The verifier gives up with EAGAIN when a signal is pending on the loading thread
            // (e.g. a SIGCHLD queued while another thread spawns a process); like libbpf, retry.
            let mut attempts = 0;
            let started = Instant::now();
            loop {
                match prog.load() {
                    Err(ProgramError::LoadError { io_error, .. })
                        if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts < 5 =>
                    {
                        attempts += 1;
                    }
                    r => {
                        r.map_err(|source| DatapathError::Program { name, source })?;
                        break;
                    }
                }
            }
            // What the verifier walked (the kernel's budget is 1 000 000 instructions): the
            // margin left to a change that makes the programs harder to verify.
            debug!(
                program = name,
                verified_insns = ?prog.info().ok().and_then(|i| i.verified_instruction_count()),
                load_ms = started.elapsed().as_millis() as u64,
                "program loaded"
            );
        }
        let (mut maps, events) = Maps::take(&mut ebpf)?;
        if ct_new {
            maps.ct_counts.reset_all();
            if let Some(m) = &ct_migration {
                let slots = counter_slots(&maps)?;
                let counts = &maps.ct_counts;
                m.copy_into(&mut maps.conntrack, true, |key| {
                    count_in(counts, &slots, key);
                });
            }
        } else if counts_new {
            // Counted while the programs on pinned interfaces may still open and close
            // connections: a count can be off by the few they change during the walk.
            maps.ct_counts.reset_all();
            let slots = counter_slots(&maps)?;
            for key in maps.conntrack.keys() {
                let key = key.map_err(map_err("counting CONNTRACK"))?;
                count_in(&maps.ct_counts, &slots, &key);
            }
        }
        let table_entries = maps
            .conntrack
            .map()
            .info()
            .map_err(map_err("reading CONNTRACK's size"))?
            .max_entries();
        let ct_endpoint_limit = opts
            .ct_endpoint_limit
            .unwrap_or_else(|| default_ct_endpoint_limit(table_entries));
        let clock_map = ebpf
            .take_map("CLOCK")
            .ok_or_else(|| DatapathError::Clock("the object has no CLOCK map".into()))
            .and_then(|m| Array::try_from(m).map_err(map_err("opening CLOCK")))?;
        let mut dp = Datapath {
            ebpf,
            maps,
            events: Some(events),
            pin_dir: opts.pin_dir.clone(),
            mode: opts.attach_mode.unwrap_or_else(AttachMode::detect),
            links: HashMap::new(),
            next_policy_id: 1,
            clock_map,
            tick: None,
            tick_lead_ns: 0,
            ct_migration,
        };
        dp.calibrate_clock()?;
        dp.set_config(&Config {
            ct_endpoint_limit: ct_endpoint_limit.into(),
            ..opts.config
        })?;
        dp.next_policy_id = dp.highest_policy_id()?.saturating_add(1).max(1);
        info!(
            pinned = ?dp.pin_dir,
            mode = ?dp.mode,
            next_policy_id = dp.next_policy_id,
            clock = %dp.tick.map_or("coarse-clock helper".to_string(), |t| format!("jiffies, HZ={}", t.hz)),
            conntrack_entries = table_entries,
            conntrack_endpoint_limit = ct_endpoint_limit,
            "datapath loaded"
        );
        Ok(dp)
    }

    /// Carries over, a second time, the entries of an older-layout conntrack table this load
    /// replaced: those its programs created after the first copy. Call it once this build's
    /// programs are on every pod interface; entries the new programs wrote are kept. `None`
    /// when no migration was pending.
    pub fn finish_conntrack_migration(&mut self) -> Option<Copied> {
        let m = self.ct_migration.take()?;
        let slots = counter_slots(&self.maps).unwrap_or_else(|e| {
            warn!(error = %e, "conntrack migration: endpoints unreadable, copies not counted");
            HashMap::new()
        });
        let counts = &self.maps.ct_counts;
        Some(m.copy_into(&mut self.maps.conntrack, false, |key| {
            count_in(counts, &slots, key);
        }))
    }

    /// The typed maps, for reading state (conntrack, counters) and tests.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The typed maps, mutable: for conntrack sweeps and flushes.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Takes the deny-event ring buffer (it has one reader).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// How programs are attached.
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// The pin directory, if pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The descriptor of a program, for `BPF_PROG_TEST_RUN`.
    pub fn program_fd(&self, name: &'static str) -> Result<&ProgramFd, DatapathError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::Program {
                name,
                source: ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        prog.fd()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// The descriptor of the program at `hook`.
    pub fn hook_fd(&self, hook: Hook) -> Result<&ProgramFd, DatapathError> {
        self.program_fd(hook.program_name())
    }

    /// The current settings.
    pub fn config(&self) -> Result<Config, DatapathError> {
        self.maps
            .config
            .get(&0, 0)
            .map_err(map_err("reading CONFIG"))
    }

    /// Changes the settings (timeouts, re-check, deny events) for every packet from now on. The
    /// clock fields are this datapath's own ([`Datapath::tick_clock`]), whatever `cfg` says.
    pub fn set_config(&mut self, cfg: &Config) -> Result<(), DatapathError> {
        let mut cfg = *cfg;
        TickClock::install(self.tick, &mut cfg);
        self.maps
            .config
            .set(0, cfg, 0)
            .map_err(map_err("writing CONFIG"))
    }

    /// The datapath's tick clock (`None`: it reads the coarse clock with a helper call).
    pub fn tick_clock(&self) -> Option<TickClock> {
        self.tick
    }

    /// Both kernel clocks, read together by the `clock` program.
    pub fn read_clocks(&self) -> Result<ClockSample, DatapathError> {
        let fd = self.program_fd("clock")?;
        // The shortest frame BPF_PROG_TEST_RUN takes: an Ethernet header.
        crate::testrun::test_run(fd, &[0u8; 14], 1, 1)
            .map_err(|e| DatapathError::Clock(e.to_string()))?;
        self.clock_map.get(&0, 0).map_err(map_err("reading CLOCK"))
    }

    /// Readings for a calibration: at least [`clock::MIN_SAMPLES`] over at least
    /// [`clock::CALIBRATION_SPAN_NS`], spaced unevenly so that they fall at every phase of the
    /// tick (one early in its tick gives the offset exactly).
    fn calibration_readings(&self) -> Result<Vec<ClockSample>, DatapathError> {
        let deadline = Instant::now() + CALIBRATION_LIMIT;
        let mut samples = vec![self.read_clocks()?];
        loop {
            let span = samples[samples.len() - 1]
                .mono_ns
                .saturating_sub(samples[0].mono_ns);
            if samples.len() >= clock::MIN_SAMPLES && span >= clock::CALIBRATION_SPAN_NS {
                return Ok(samples);
            }
            if Instant::now() > deadline {
                return Ok(samples); // calibrate() says what is missing
            }
            // 0.6 to 2.4 ms: never a multiple of any tick, so the phases spread.
            let step = 600 + (samples.len() as u64 * 1_237) % 1_800;
            std::thread::sleep(Duration::from_micros(step));
            samples.push(self.read_clocks()?);
        }
    }

    /// Calibrates the tick clock (`kubesg_agent::clock`), or falls back to the coarse-clock
    /// helper when [`CALIBRATION_ATTEMPTS`] calibrations fail, saying why in the log. Only a
    /// failure to read the clocks at all is an error.
    fn calibrate_clock(&mut self) -> Result<(), DatapathError> {
        let started = Instant::now();
        let mut why = Vec::new();
        for _ in 0..CALIBRATION_ATTEMPTS {
            let samples = self.calibration_readings()?;
            match TickClock::calibrate(&samples) {
                Ok(cal) => {
                    info!(
                        hz = cal.clock.hz,
                        readings = cal.samples,
                        span_ms = cal.span_ns / 1_000_000,
                        on_grid = cal.on_grid,
                        phase_ns = cal.phase_ns,
                        took_ms = started.elapsed().as_millis() as u64,
                        "datapath clock calibrated: jiffies × {} ns, {} CLOCK_MONOTONIC, behind it by under one tick (up to {} when the kernel stalls jiffies)",
                        cal.clock.tick_ns,
                        if cal.on_grid { "never ahead of" } else { "ahead by less than a tick (the kernel's tick is off the TICK_NSEC grid) or" },
                        clock::MAX_LAG_TICKS,
                    );
                    self.tick = Some(cal.clock);
                    self.tick_lead_ns = cal.lead_ns();
                    return Ok(());
                }
                Err(e) => why.push(e.to_string()),
            }
        }
        warn!(
            attempts = CALIBRATION_ATTEMPTS,
            why = ?why,
            "datapath clock: no calibration could be trusted; the datapath reads CLOCK_MONOTONIC_COARSE with a helper call per packet (slower: docs/benchmarks.md, the datapath per packet)"
        );
        self.tick = None;
        self.tick_lead_ns = 0;
        Ok(())
    }

    /// Checks the datapath's clock against CLOCK_MONOTONIC (the agent does it every few
    /// seconds): puts the clock fields of CONFIG back if someone else wrote them, measures the
    /// lag, and calibrates again when it is out of the bound the calibration promised (a
    /// kernel whose jiffies lost ticks). With the helper clock, the lag is measured only.
    pub fn check_clock(&mut self) -> Result<ClockCheck, DatapathError> {
        let mut cfg = self.config()?;
        let want = {
            let mut w = cfg;
            TickClock::install(self.tick, &mut w);
            w
        };
        if (cfg.tick_ns, cfg.tick_offset_ns) != (want.tick_ns, want.tick_offset_ns) {
            warn!(
                found = ?(cfg.tick_ns, cfg.tick_offset_ns),
                want = ?(want.tick_ns, want.tick_offset_ns),
                "the datapath clock's settings were changed behind the agent's back; restored"
            );
            cfg = want;
            self.set_config(&cfg)?;
        }
        let mut lag = i64::MAX;
        for _ in 0..CHECK_READINGS {
            let s = self.read_clocks()?;
            let l = match self.tick {
                Some(t) => t.lag_ns(&s),
                None => s.mono_ns.wrapping_sub(s.coarse_ns) as i64,
            };
            lag = lag.min(l);
        }
        let Some(tick) = self.tick else {
            return Ok(ClockCheck {
                lag_ns: lag,
                hz: 0,
                recalibrated: false,
            });
        };
        if tick.lag_within_bound(lag, self.tick_lead_ns) {
            return Ok(ClockCheck {
                lag_ns: lag,
                hz: tick.hz,
                recalibrated: false,
            });
        }
        warn!(
            lag_ns = lag,
            hz = tick.hz,
            "the datapath clock is out of its bound against CLOCK_MONOTONIC; calibrating again"
        );
        self.calibrate_clock()?;
        self.set_config(&cfg)?;
        Ok(ClockCheck {
            lag_ns: lag,
            hz: self.tick.map_or(0, |t| t.hz),
            recalibrated: true,
        })
    }

    /// Attaches both programs to the pod interface `ifindex`. Packets cross it unjudged until the
    /// endpoint is registered with [`Datapath::set_endpoint`]; register it first to enforce from
    /// the first packet.
    pub fn attach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        for hook in Hook::ALL {
            let mode = self.mode;
            let pin_dir = self.pin_dir.clone();
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(hook.program_name())
                .ok_or(DatapathError::Program {
                    name: hook.program_name(),
                    source: ProgramError::NotLoaded,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    name: hook.program_name(),
                    source,
                })?;
            if let Some(link) = attach::attach(prog, ifindex, hook, mode, pin_dir.as_deref())? {
                self.links.insert((ifindex, hook), link);
            }
        }
        debug!(ifindex, mode = ?self.mode, "attached");
        Ok(())
    }

    /// Detaches both programs from `ifindex`; succeeds when they are already gone.
    pub fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        for hook in Hook::ALL {
            if self.links.remove(&(ifindex, hook)).is_some() {
                continue; // dropping the link detached it
            }
            if let Some(dir) = &self.pin_dir {
                attach::detach_persistent(ifindex, hook, self.mode, dir)?;
            }
        }
        debug!(ifindex, "detached");
        Ok(())
    }

    /// Whether both programs are attached to `ifindex` (as far as this datapath can tell: its own
    /// links, or the pinned tcx links; clsact filters are taken on trust).
    pub fn is_attached(&self, ifindex: u32) -> bool {
        Hook::ALL.iter().all(|hook| {
            if self.links.contains_key(&(ifindex, *hook)) {
                return true;
            }
            match (&self.pin_dir, self.mode) {
                (Some(dir), AttachMode::Tcx) => attach::link_pin_path(dir, ifindex, *hook).exists(),
                (Some(_), AttachMode::Clsact) => true,
                (None, _) => false,
            }
        })
    }

    /// Deletes the entries of every policy whose id is not in `keep` (what an earlier run left).
    pub fn retain_policies(&mut self, keep: &BTreeSet<u32>) -> Result<(), DatapathError> {
        for id in self.policy_ids_in_maps().difference(keep) {
            self.delete_policy_entries(*id)?;
        }
        Ok(())
    }

    /// The ids of every policy with entries in the tries or the host table.
    fn policy_ids_in_maps(&self) -> BTreeSet<u32> {
        let peers = self.maps.peers.keys().filter_map(Result::ok);
        let ports = self.maps.ports.keys().filter_map(Result::ok);
        let hosts = self.maps.hosts.keys().filter_map(Result::ok);
        let layers = self.maps.layers.keys().filter_map(Result::ok);
        peers
            .map(|k| k.data().policy_id)
            .chain(ports.map(|k| k.data().policy_id))
            .chain(hosts.map(|k| k.policy_id))
            .chain(layers.map(|k| k.policy_id))
            .collect()
    }

    /// Writes a compiled policy under a fresh id. Endpoints start using it when pointed at it.
    /// On error nothing of it is left in the maps.
    pub fn install_policy(
        &mut self,
        policy: &CompiledPolicy,
    ) -> Result<PolicyHandle, DatapathError> {
        let id = self.next_policy_id;
        let tables = tables::compile(id, policy)?;
        self.next_policy_id = id.checked_add(1).unwrap_or(1);
        if let Err(e) = self.write_tables(&tables) {
            let _ = self.delete_policy_entries(id);
            return Err(e);
        }
        debug!(
            policy_id = id,
            peer_prefixes = tables.peers.len(),
            port_prefixes = tables.ports.len(),
            layered = policy.layered,
            "policy installed"
        );
        Ok(PolicyHandle {
            id,
            stateless: policy.stateless,
            layered: policy.layered,
        })
    }

    /// Writes every entry of a policy; the caller points endpoints at it only afterwards, so a
    /// layered endpoint never meets its policy without its `POLICY_LAYERS` entries.
    fn write_tables(&mut self, t: &tables::PolicyTables) -> Result<(), DatapathError> {
        for (key, layers) in &t.layers {
            self.maps
                .layers
                .insert(key, layers, 0)
                .map_err(map_err("writing POLICY_LAYERS"))?;
        }
        for (len, key, classes) in &t.ports {
            let k = aya::maps::lpm_trie::Key::new(*len, *key);
            self.maps
                .ports
                .insert(&k, classes, 0)
                .map_err(map_err("writing POLICY_PORTS"))?;
        }
        for (len, key, classes) in &t.peers {
            if is_host(*len, key) {
                self.maps
                    .hosts
                    .insert(key, classes, 0)
                    .map_err(map_err("writing POLICY_HOSTS"))?;
            } else {
                let k = aya::maps::lpm_trie::Key::new(*len, *key);
                self.maps
                    .peers
                    .insert(&k, classes, 0)
                    .map_err(map_err("writing POLICY_PEERS"))?;
            }
        }
        Ok(())
    }

    /// Changes installed policy `h` from `old` to `new` where it stands, when
    /// [`policy_in_place::plan`] finds that as safe as the switch (only host entries change, and
    /// only widening unless `narrowing_allowed`): returns what it did, to undo it, or `None`
    /// (nothing written) when the change needs [`Datapath::install_policy`] and a switch. On
    /// error what it wrote is undone.
    pub fn update_policy_in_place(
        &mut self,
        h: PolicyHandle,
        old: &CompiledPolicy,
        new: &CompiledPolicy,
        narrowing_allowed: bool,
    ) -> Result<Option<InPlaceChange>, DatapathError> {
        if (old.stateless, old.layered) != (new.stateless, new.layered)
            || (new.stateless, new.layered) != (h.stateless, h.layered)
        {
            return Ok(None);
        }
        let Some(ops) = policy_in_place::plan(
            &tables::compile(h.id, old)?,
            &tables::compile(h.id, new)?,
            narrowing_allowed,
        ) else {
            return Ok(None);
        };
        let mut done = InPlaceChange {
            policy_id: h.id,
            ops: Vec::with_capacity(ops.len()),
        };
        for op in ops {
            if let Err(e) = self.write_host(&op.key, op.new) {
                self.undo_in_place(done);
                return Err(e);
            }
            done.ops.push(op);
        }
        debug!(
            policy_id = h.id,
            host_entries = done.ops.len(),
            "policy changed in place"
        );
        Ok(Some(done))
    }

    /// Puts back what [`Datapath::update_policy_in_place`] changed (best effort: an entry that
    /// cannot be restored is logged).
    pub fn undo_in_place(&mut self, change: InPlaceChange) {
        for op in change.ops.iter().rev() {
            if let Err(e) = self.write_host(&op.key, op.old) {
                warn!(policy_id = change.policy_id, error = %e, "could not undo a policy's in-place change");
            }
        }
    }

    fn write_host(&mut self, key: &PeerKey, value: Option<ClassSet>) -> Result<(), DatapathError> {
        match value {
            Some(classes) => self
                .maps
                .hosts
                .insert(key, classes, 0)
                .map_err(map_err("writing POLICY_HOSTS")),
            None => self
                .maps
                .hosts
                .remove(key)
                .map_err(map_err("deleting from POLICY_HOSTS")),
        }
    }

    /// Replaces the policy of every endpoint using `old` by `policy`, atomically per endpoint,
    /// then deletes `old`. On error the old policy stays in force everywhere.
    pub fn replace_policy(
        &mut self,
        old: PolicyHandle,
        policy: &CompiledPolicy,
    ) -> Result<PolicyHandle, DatapathError> {
        let new = self.install_policy(policy)?;
        for (ifindex, _) in self.endpoints_using(old.id)? {
            self.set_endpoint(ifindex, Some(new))?;
        }
        self.remove_policy(old.id)?;
        Ok(new)
    }

    /// Deletes a policy's entries. Refused while an endpoint uses it.
    pub fn remove_policy(&mut self, id: u32) -> Result<(), DatapathError> {
        let users: Vec<u32> = self
            .endpoints_using(id)?
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        if !users.is_empty() {
            return Err(DatapathError::PolicyInUse(id, users));
        }
        self.delete_policy_entries(id)
    }

    fn delete_policy_entries(&mut self, id: u32) -> Result<(), DatapathError> {
        let peers: Vec<_> = self
            .maps
            .peers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().policy_id == id)
            .collect();
        for k in peers {
            self.maps
                .peers
                .remove(&k)
                .map_err(map_err("deleting from POLICY_PEERS"))?;
        }
        let hosts: Vec<_> = self
            .maps
            .hosts
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.policy_id == id)
            .collect();
        for k in hosts {
            self.maps
                .hosts
                .remove(&k)
                .map_err(map_err("deleting from POLICY_HOSTS"))?;
        }
        let ports: Vec<_> = self
            .maps
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().policy_id == id)
            .collect();
        for k in ports {
            self.maps
                .ports
                .remove(&k)
                .map_err(map_err("deleting from POLICY_PORTS"))?;
        }
        let layers: Vec<_> = self
            .maps
            .layers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.policy_id == id)
            .collect();
        for k in layers {
            self.maps
                .layers
                .remove(&k)
                .map_err(map_err("deleting from POLICY_LAYERS"))?;
        }
        debug!(policy_id = id, "policy removed");
        Ok(())
    }

    /// Registers (or updates) the endpoint on `ifindex`: `Some(policy)` makes it a member judged
    /// by that policy, `None` a non-member whose connections are only tracked. The switch is one
    /// map update.
    pub fn set_endpoint(
        &mut self,
        ifindex: u32,
        policy: Option<PolicyHandle>,
    ) -> Result<(), DatapathError> {
        let ep = match self.endpoint(ifindex)? {
            Some(ep) => ep,
            None => Endpoint {
                counter_slot: self.allocate_counter_slot()?,
                ..Endpoint::default()
            },
        };
        let ep = Endpoint {
            policy_id: policy.map_or(POLICY_NONE, |p| p.id),
            flags: policy.map_or(0, |p| p.endpoint_flags()),
            ..ep
        };
        self.write_endpoint(ifindex, ep)?;
        debug!(ifindex, policy_id = ep.policy_id, "endpoint set");
        Ok(())
    }

    /// Sets what the pod on `ifindex` may send as (the source check, see
    /// `kubesg_common::source`): its addresses, the first of each family in its endpoint, the
    /// others in `SOURCES`. No address turns the check off: the agent cannot tell the pod's own
    /// traffic from anyone's. Returns whether anything changed; the endpoint must be registered.
    pub fn set_sources(&mut self, ifindex: u32, addrs: &[IpAddr]) -> Result<bool, DatapathError> {
        let old = self
            .endpoint(ifindex)?
            .ok_or(DatapathError::NoEndpoint(ifindex))?;
        let mut ep = Endpoint {
            sources: 0,
            addr4: 0,
            addr6: [0; 4],
            ..old
        };
        let mut more = BTreeSet::new();
        for addr in addrs {
            let (family, raw) = tables::raw_addr(*addr);
            if family == AF_INET && ep.sources & SRC_F_V4 == 0 {
                ep.sources |= SRC_F_V4;
                ep.addr4 = raw[0];
            } else if family == AF_INET6 && ep.sources & SRC_F_V6 == 0 {
                ep.sources |= SRC_F_V6;
                ep.addr6 = raw;
            } else {
                let inline = if family == AF_INET {
                    raw[0] == ep.addr4
                } else {
                    raw == ep.addr6
                };
                if inline {
                    continue;
                }
                more.insert(SourceKey {
                    ifindex,
                    family,
                    addr: raw,
                    ..SourceKey::default()
                });
            }
        }
        if !addrs.is_empty() {
            ep.sources |= SRC_F_CHECK;
        }
        if addrs
            .iter()
            .any(|a| matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        {
            // The pod's link-local addresses are known: only they pass where the link scope
            // did (Neighbor Discovery, MLD, DHCPv6).
            ep.sources |= SRC_F_LINK_LOCAL;
        }
        if !more.is_empty() {
            ep.sources |= SRC_F_MORE;
        }
        // Read whatever the flags say: keys an interrupted update or an earlier endpoint on
        // this interface index left behind go too.
        let had = self.sources_of(ifindex)?;
        if ep == old && had == more {
            return Ok(false);
        }
        if more.len() > limits::SOURCES as usize {
            return Err(DatapathError::TooManySources {
                ifindex,
                wanted: more.len(),
                limit: limits::SOURCES,
            });
        }
        // Added before the endpoint points at them, removed after it no longer does: the check
        // never refuses an address the pod has both before and after.
        for key in more.difference(&had) {
            self.maps
                .sources
                .insert(key, 1, 0)
                .map_err(map_err(format!("writing SOURCES for interface {ifindex}")))?;
        }
        self.write_endpoint(ifindex, ep)?;
        for key in had.difference(&more) {
            remove_key(&mut self.maps.sources, key, "SOURCES")?;
        }
        debug!(ifindex, addresses = addrs.len(), "source check set");
        Ok(true)
    }

    /// The further addresses (`SOURCES` keys) of the pod on `ifindex`.
    fn sources_of(&self, ifindex: u32) -> Result<BTreeSet<SourceKey>, DatapathError> {
        self.maps
            .sources
            .keys()
            .filter(|k| k.as_ref().map_or(true, |k| k.ifindex == ifindex))
            .collect::<Result<_, _>>()
            .map_err(map_err("listing SOURCES"))
    }

    /// Writes the endpoint record: `ENDPOINTS` (the kernel swaps the element whole), then the
    /// cache slot.
    fn write_endpoint(&mut self, ifindex: u32, ep: Endpoint) -> Result<(), DatapathError> {
        self.maps
            .endpoints
            .insert(ifindex, ep, 0)
            .map_err(map_err(format!("writing endpoint {ifindex}")))?;
        self.cache_endpoint(ifindex, Some(ep))
    }

    /// Updates the endpoint's cache slot if it owns it or it is free (`None` frees it). The hash
    /// map was written first: a packet that misses the slot finds the endpoint there. A slot is
    /// written by copy, not atomically, so under the sequence count `CachedEndpoint::seq`: made
    /// odd (the contents as they were), the contents written, made even again. A packet that
    /// reads the slot meanwhile sees an odd or a changed count and asks `ENDPOINTS` instead.
    fn cache_endpoint(&mut self, ifindex: u32, ep: Option<Endpoint>) -> Result<(), DatapathError> {
        let slot = cache_slot(ifindex);
        let mut current = self
            .maps
            .endpoint_cache
            .get(&slot, 0)
            .map_err(map_err("reading ENDPOINT_CACHE"))?;
        if current.ifindex != 0 && current.ifindex != ifindex {
            return Ok(()); // another endpoint owns the slot; this one is served from ENDPOINTS
        }
        let mut write = |value: CachedEndpoint| {
            self.maps
                .endpoint_cache
                .set(slot, value, 0)
                .map_err(map_err("writing ENDPOINT_CACHE"))
        };
        current.seq = current.seq.wrapping_add(1) | 1;
        write(current)?;
        let mut value = match ep {
            Some(endpoint) => CachedEndpoint {
                endpoint,
                ifindex,
                seq: current.seq,
            },
            None => CachedEndpoint {
                seq: current.seq,
                ..CachedEndpoint::default()
            },
        };
        write(value)?;
        value.seq = value.seq.wrapping_add(1);
        write(value)
    }

    /// Forgets the endpoint on `ifindex`, its further addresses and its tracked connections.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.cache_endpoint(ifindex, None)?;
        match self.maps.endpoints.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(format!("deleting endpoint {ifindex}"))(e)),
        }
        for key in self.sources_of(ifindex)? {
            remove_key(&mut self.maps.sources, &key, "SOURCES")?;
        }
        crate::conntrack::flush(&mut self.maps, Some(ifindex))
            .map_err(map_err("flushing conntrack"))?;
        Ok(())
    }

    /// The endpoint on `ifindex`, if registered.
    pub fn endpoint(&self, ifindex: u32) -> Result<Option<Endpoint>, DatapathError> {
        match self.maps.endpoints.get(&ifindex, 0) {
            Ok(ep) => Ok(Some(ep)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(format!("reading endpoint {ifindex}"))(e)),
        }
    }

    /// Every registered endpoint.
    pub fn endpoints(&self) -> Result<Vec<(u32, Endpoint)>, DatapathError> {
        self.maps
            .endpoints
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("listing endpoints"))
    }

    fn endpoints_using(&self, policy_id: u32) -> Result<Vec<(u32, Endpoint)>, DatapathError> {
        Ok(self
            .endpoints()?
            .into_iter()
            .filter(|(_, ep)| ep.policy_id == policy_id)
            .collect())
    }

    /// Counters of the endpoint on `ifindex`: `[egress, ingress]`, summed over CPUs.
    pub fn counters(&self, ifindex: u32) -> Result<Option<[Counters; 2]>, DatapathError> {
        match self.endpoint(ifindex)? {
            Some(ep) => crate::counters::read(&self.maps, ep.counter_slot)
                .map(Some)
                .map_err(map_err("reading COUNTERS")),
            None => Ok(None),
        }
    }

    /// The conntrack entries the endpoint on `ifindex` holds (what its limit is checked against).
    pub fn conntrack_held(&self, ifindex: u32) -> Result<Option<i64>, DatapathError> {
        Ok(self
            .endpoint(ifindex)?
            .and_then(|ep| self.maps.ct_counts.get(ep.counter_slot)))
    }

    /// The most conntrack entries one endpoint may hold (0: no limit).
    pub fn ct_endpoint_limit(&self) -> Result<u64, DatapathError> {
        Ok(self.config()?.ct_endpoint_limit)
    }

    fn allocate_counter_slot(&mut self) -> Result<u32, DatapathError> {
        let used: BTreeSet<u32> = self
            .endpoints()?
            .into_iter()
            .map(|(_, ep)| ep.counter_slot)
            .collect();
        let slot = (0..limits::ENDPOINTS)
            .find(|s| !used.contains(s))
            .ok_or(DatapathError::TooManyEndpoints(limits::ENDPOINTS))?;
        // A slot may carry counts of a departed endpoint: start from zero (its conntrack
        // entries were flushed with it).
        self.maps.ct_counts.reset(slot);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Map {
            op: "counting CPUs".into(),
            source: MapError::IoError(e),
        })?;
        for dir in 0..2 {
            let zero = PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(|e| {
                DatapathError::Map {
                    op: "zeroing COUNTERS".into(),
                    source: MapError::IoError(e),
                }
            })?;
            self.maps
                .counters
                .set(slot * 2 + dir, zero, 0)
                .map_err(map_err("zeroing COUNTERS"))?;
        }
        Ok(slot)
    }

    fn highest_policy_id(&self) -> Result<u32, DatapathError> {
        let in_endpoints = self.endpoints()?.into_iter().map(|(_, ep)| ep.policy_id);
        Ok(in_endpoints
            .chain(self.policy_ids_in_maps())
            .max()
            .unwrap_or(0))
    }
}
