//! Carrying the tracked connections over an upgrade that changed the conntrack entry's layout.
//!
//! A pinned `CONNTRACK` of another layout cannot serve this build's programs, so the load unpins
//! it and creates a new one ([`crate::pin_compat`]). For the layout of the builds before TCP
//! window tracking, the agent keeps a descriptor on the old map before unpinning it and copies
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
    old: HashMap<MapData, CtKey, CtEntryV1>,
}

impl CtMigration {
    /// Opens the table pinned at `path` if it has the layout of the builds before window
    /// tracking; `None` when nothing is pinned there or the layout is another one.
    pub fn open(path: &Path) -> Result<Option<Self>, MapError> {
        let Ok(info) = MapInfo::from_pin(path) else {
            return Ok(None);
        };
        let lru = matches!(info.map_type(), Ok(MapType::LruHash));
        if !lru
            || info.key_size() as usize != size_of::<CtKey>()
            || info.value_size() as usize != size_of::<CtEntryV1>()
        {
            return Ok(None);
        }
        let data = MapData::from_pin(path)?;
        let old = HashMap::try_from(Map::LruHashMap(data))?;
        Ok(Some(CtMigration { old }))
    }

    /// Copies every entry of the old table into `new` (expired ones too, which the sweep then
    /// removes as it would have from the old table), overwriting (`first`) or only filling in
    /// keys `new` does not have (the later pass).
    pub fn copy_into(&self, new: &mut HashMap<MapData, CtKey, CtEntry>, first: bool) -> Copied {
        let mut done = Copied::default();
        for item in self.old.iter() {
            let Ok((key, old)) = item else {
                done.failed += 1;
                continue;
            };
            let entry = CtEntry::migrated(old, key.proto);
            let inserted = if first {
                new.insert(key, entry, BPF_ANY).map(|()| true)
            } else {
                insert_if_absent(new, key, entry)
            };
            match inserted {
                Ok(true) => done.copied += 1,
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
