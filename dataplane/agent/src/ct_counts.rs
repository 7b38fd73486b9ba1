//! How many conntrack entries each endpoint holds (`CT_COUNTS`, by counter slot): what the
//! datapath checks a NEW connection against (`Config::ct_endpoint_limit`), so that one pod
//! cannot fill the node's table.
//!
//! The programs count with atomic adds (one more per entry they insert, one fewer per entry they
//! remove); the agent counts the entries its sweep and flushes remove. Both write the same
//! numbers at once, so the agent writes them with atomic instructions too: the map is created
//! `BPF_F_MMAPABLE` and mapped into the agent's memory here. A write through the map syscalls
//! (read, then write back) would lose the updates the programs make in between.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Array, IterableMap as _, Map, MapData, MapError};

/// The counts, mapped.
pub struct CtCounts {
    /// Keeps the map (and so the mapping's object) alive.
    array: Array<MapData, u64>,
    mem: NonNull<AtomicU64>,
    len: u32,
    bytes: usize,
}

// SAFETY: the mapping is shared memory that every access reads and writes atomically; the
// handle owns it (unmapped once, on drop).
unsafe impl Send for CtCounts {}
// SAFETY: as above: `&CtCounts` only ever does atomic operations on the mapping.
unsafe impl Sync for CtCounts {}

impl CtCounts {
    /// Maps `map`, which must be the `CT_COUNTS` array (u64 values, created mmapable).
    pub fn new(map: Map) -> Result<Self, MapError> {
        let array: Array<MapData, u64> = Array::try_from(map)?;
        let len = array.len();
        let bytes = (len as usize) * size_of::<u64>();
        if bytes == 0 {
            return Err(MapError::OutOfBounds {
                index: 0,
                max_entries: 0,
            });
        }
        let fd = array.map().fd().as_fd().as_raw_fd();
        // SAFETY: a shared read-write mapping of an mmapable array map's values (contiguous
        // 8-byte values from offset 0); the kernel refuses it for any other map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MapError::IoError(std::io::Error::last_os_error()));
        }
        let mem = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| MapError::IoError(std::io::Error::other("mmap returned null")))?;
        Ok(CtCounts {
            array,
            mem,
            len,
            bytes,
        })
    }

    fn slot(&self, slot: u32) -> Option<&AtomicU64> {
        if slot >= self.len {
            return None;
        }
        // SAFETY: in bounds of the live mapping, which is 8-byte aligned (page-aligned start).
        Some(unsafe { &*self.mem.as_ptr().add(slot as usize) })
    }

    /// The entries counted for the endpoint in `slot` (a wrapping count read as signed: a
    /// transient dip below zero reads as such).
    pub fn get(&self, slot: u32) -> Option<i64> {
        self.slot(slot).map(|c| c.load(Ordering::Relaxed) as i64)
    }

    /// Adds `delta` to the count of `slot` (negative: entries removed).
    pub fn add(&self, slot: u32, delta: i64) {
        if let Some(c) = self.slot(slot) {
            c.fetch_add(delta as u64, Ordering::Relaxed);
        }
    }

    /// Zeroes the count of `slot`: a slot given to a new endpoint, whose entries are none.
    pub fn reset(&self, slot: u32) {
        if let Some(c) = self.slot(slot) {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Zeroes every count: a new, empty conntrack table.
    pub fn reset_all(&self) {
        for slot in 0..self.len {
            self.reset(slot);
        }
    }

    /// The map, for another handle on it.
    pub fn map(&self) -> &MapData {
        self.array.map()
    }
}

impl Drop for CtCounts {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length, unmapped only here.
        unsafe {
            libc::munmap(self.mem.as_ptr().cast(), self.bytes);
        }
    }
}
