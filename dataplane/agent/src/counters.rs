//! Reading the per-CPU counters: one slot per endpoint and direction, summed over CPUs.

use aya::maps::MapError;
use kubesg_common::event::Counters;

use crate::maps::Maps;

/// The counters of endpoint counter slot `slot`: `[egress (from the pod), ingress (to the pod)]`.
pub fn read(maps: &Maps, slot: u32) -> Result<[Counters; 2], MapError> {
    let mut out = [Counters::default(); 2];
    for (dir, total) in out.iter_mut().enumerate() {
        for c in maps.counters.get(&(slot * 2 + dir as u32), 0)?.iter() {
            total.add(c);
        }
    }
    Ok(out)
}
