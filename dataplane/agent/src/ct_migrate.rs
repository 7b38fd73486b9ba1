//! Carrying the tracked connections over an upgrade that changed the conntrack table's layout.
//!
//! A pinned `CONNTRACK` of another layout cannot serve this build's programs, so the load unpins
//! it and creates a new one ([`crate::pin_compat`]). For the layouts of earlier builds (the LRU
//! table of the builds before the table-pressure limits, with this build's entries or with the
//! 24-byte entries of the builds before TCP window tracking), the agent keeps a descriptor on the
//! old map before unpinning it and copies
//! its entries over twice: once into the new, still empty table right after the load (before
//! this build's programs are put on the pod interfaces, so no established connection meets an
//! empty table), then again once every interface runs this build's programs, for the
//! connections the old programs opened in between (without overwriting what the new programs
//! have written since). A layout this build does not know is still replaced with its entries
//! lost, which the load says loudly.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError, MapInfo, MapType};
use kubesg_common::conntrack::{CtEntry, CtEntryV1, CtKey};
use tracing::{info, warn};

use crate::conntrack::insert_if_absent;

/// `BPF_ANY`: create or update.
const BPF_ANY: u64 = 0;

/// What a copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Entries written into the new table.
    pub copied: usize,
    /// Entries the new table already had (second pass) and kept.
    pub kept: usize,
    /// Entries that could not be read or written (the table full, or the old one changing
    /// under the iteration).
    pub failed: usize,
}

/// An old-layout conntrack table, held open after its pin is removed.
pub struct CtMigration {
    old: Old,
}

/// The layouts carried over.
enum Old {
    /// An LRU table of 24-byte entries (before TCP window tracking).
    V1(HashMap<MapData, CtKey, CtEntryV1>),
    /// An LRU table of this build's entries (before the table stopped evicting).
    Lru(HashMap<MapData, CtKey, CtEntry>),
}

impl CtMigration {
    /// Opens the table pinned at `path` if it has the layout of an earlier build that this one
    /// carries over; `None` when nothing is pinned there or the layout is another one (this
    /// build's own among them).
    pub fn open(path: &Path) -> Result<Option<Self>, MapError> {
        let Ok(info) = MapInfo::from_pin(path) else {
            return Ok(None);
        };
        let lru = matches!(info.map_type(), Ok(MapType::LruHash));
        if !lru || info.key_size() as usize != size_of::<CtKey>() {
            return Ok(None);
        }
        let value = info.value_size() as usize;
        let old = if value == size_of::<CtEntryV1>() {
            Old::V1(HashMap::try_from(Map::LruHashMap(MapData::from_pin(
                path,
            )?))?)
        } else if value == size_of::<CtEntry>() {
            Old::Lru(HashMap::try_from(Map::LruHashMap(MapData::from_pin(
                path,
            )?))?)
        } else {
            return Ok(None);
        };
        Ok(Some(CtMigration { old }))
    }

    /// Every entry of the old table, in this build's layout.
    fn entries(&self) -> Box<dyn Iterator<Item = Result<(CtKey, CtEntry), MapError>> + '_> {
        match &self.old {
            Old::V1(m) => Box::new(
                m.iter()
                    .map(|r| r.map(|(k, old)| (k, CtEntry::migrated(old, k.proto)))),
            ),
            // Copied while the connections run (this copy, and the programs' next segments,
            // can be milliseconds apart): their windows are learnt again.
            Old::Lru(m) => Box::new(
                m.iter()
                    .map(|r| r.map(|(k, e)| (k, e.relearning_windows(k.proto)))),
            ),
        }
    }

    /// Copies every entry of the old table into `new` (expired ones too, which the sweep then
    /// removes as it would have from the old table), overwriting (`first`) or only filling in
    /// keys `new` does not have (the later pass); `added` is told of each key that is a new
    /// entry of `new` (for the endpoints' entry counts).
    pub fn copy_into(
        &self,
        new: &mut HashMap<MapData, CtKey, CtEntry>,
        first: bool,
        mut added: impl FnMut(&CtKey),
    ) -> Copied {
        let mut done = Copied::default();
        for item in self.entries() {
            let Ok((key, entry)) = item else {
                done.failed += 1;
                continue;
            };
            let inserted = if first {
                // The first pass fills an empty table: every key is new to it.
                new.insert(key, entry, BPF_ANY).map(|()| true)
            } else {
                insert_if_absent(new, key, entry)
            };
            match inserted {
                Ok(true) => {
                    done.copied += 1;
                    added(&key);
                }
                Ok(false) => done.kept += 1,
                Err(_) => done.failed += 1,
            }
        }
        let pass = if first { "first" } else { "second" };
        if done.failed > 0 {
            warn!(
                pass,
                copied = done.copied,
                kept = done.kept,
                failed = done.failed,
                "conntrack migration: some entries of the old table were not carried over"
            );
        } else {
            info!(
                pass,
                copied = done.copied,
                kept = done.kept,
                "conntrack migration: entries of the old table carried over"
            );
        }
        done
    }
}
