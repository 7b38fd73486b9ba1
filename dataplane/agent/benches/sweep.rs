//! What the agent's periodic conntrack sweep costs at rest, by table size: reading the table
//! entry by entry (aya's iterator, two system calls an entry: what the sweep did before) against
//! reading it in batches (`BPF_MAP_LOOKUP_BATCH`, what it does now), and the whole sweep of a
//! table where nothing has expired (the usual case: the sweep reads everything and removes
//! nothing). Cases interleaved, medians of several rounds, the batch's time as a ratio of the
//! entry-by-entry read's. The last column is what the sweep costs a minute at the default
//! `--sweep-interval` of 10 s.
//!
//! Run: `make bench` (or `cargo bench -p kubesg-agent --bench sweep`), as root.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::IterableMap as _;
use kubesg_agent::{
    conntrack,
    datapath::{Datapath, DatapathOptions},
    map_batch,
};
use kubesg_common::conntrack::{CtEntry, CtKey};

/// Table sizes (live entries).
const SIZES: [u32; 3] = [1_000, 10_000, 100_000];
/// Rounds; the table reports medians.
const ROUNDS: usize = 5;
/// The agent's default `--sweep-interval`.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Read {
    EntryByEntry,
    Batched,
    Sweep,
}

/// A datapath whose conntrack table holds `n` live TCP entries.
fn table(n: u32) -> Result<Datapath> {
    let mut dp = Datapath::load(&DatapathOptions::default())
        .context("loading the datapath (run as root)")?;
    let maps = dp.maps_mut();
    for i in 0..n {
        let key = CtKey {
            ifindex: 1,
            family: 2,
            proto: 6,
            pod_port: (i % 60_000) as u16,
            peer_port: 80,
            pod_addr: [0x0a00_0001, 0, 0, 0],
            peer_addr: [0x0a01_0000 + i / 60_000, 0, 0, 0],
            ..CtKey::default()
        };
        let entry = CtEntry {
            expires_ns: u64::MAX,
            ..CtEntry::default()
        };
        maps.conntrack.insert(key, entry, 0)?;
    }
    Ok(dp)
}

fn time(dp: &mut Datapath, read: Read, n: u32) -> Result<Duration> {
    let start = Instant::now();
    let seen = match read {
        Read::EntryByEntry => dp
            .maps()
            .conntrack
            .iter()
            .collect::<Result<Vec<_>, _>>()?
            .len(),
        Read::Batched => map_batch::read_all::<CtKey, CtEntry>(dp.maps().conntrack.map())?.len(),
        Read::Sweep => {
            // Nothing has expired (time 1 ns): it reads all and removes none.
            let removed = conntrack::sweep(dp.maps_mut(), 1)?;
            anyhow::ensure!(removed == 0, "the sweep removed {removed} live entries");
            n as usize
        }
    };
    let took = start.elapsed();
    anyhow::ensure!(seen == n as usize, "{read:?} read {seen} of {n} entries");
    Ok(took)
}

fn main() -> Result<()> {
    let mut tables = Vec::new();
    for n in SIZES {
        tables.push((n, table(n)?));
    }
    let mut samples: BTreeMap<(u32, Read), Vec<Duration>> = BTreeMap::new();
    for round in 0..ROUNDS {
        eprintln!("round {}/{ROUNDS}", round + 1);
        for (n, dp) in &mut tables {
            for read in [Read::EntryByEntry, Read::Batched, Read::Sweep] {
                let t = time(dp, read, *n)?;
                samples.entry((*n, read)).or_default().push(t);
            }
        }
    }
    let med = |n: u32, read: Read| -> Duration {
        let mut v = samples[&(n, read)].clone();
        v.sort_unstable();
        v[v.len() / 2]
    };
    println!("\nconntrack table read and sweep, median of {ROUNDS} rounds\n");
    println!(
        "{:>8} {:>16} {:>12} {:>8} {:>12} {:>22}",
        "entries", "entry by entry", "batched", "ratio", "sweep", "sweep CPU s/min at 10 s"
    );
    for n in SIZES {
        let one = med(n, Read::EntryByEntry);
        let batch = med(n, Read::Batched);
        let sweep = med(n, Read::Sweep);
        let per_minute = sweep.as_secs_f64() * (60.0 / SWEEP_INTERVAL.as_secs_f64());
        println!(
            "{n:>8} {:>13.2} ms {:>9.2} ms {:>8.3} {:>9.2} ms {:>22.3}",
            one.as_secs_f64() * 1e3,
            batch.as_secs_f64() * 1e3,
            batch.as_secs_f64() / one.as_secs_f64(),
            sweep.as_secs_f64() * 1e3,
            per_minute
        );
    }
    Ok(())
}
