//! Reading a whole BPF hash map in a few system calls: `BPF_MAP_LOOKUP_BATCH` (Linux 5.6) hands
//! back thousands of entries a call, where aya's iterator takes two calls an entry
//! (`BPF_MAP_GET_NEXT_KEY`, then `BPF_MAP_LOOKUP_ELEM`). The sweep reads the conntrack table
//! every `--sweep-interval`: at 100 000 entries that was 200 000 system calls a sweep, the
//! agent's CPU at rest. aya 0.14 has no batch calls, hence this one.

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{maps::MapData, Pod};

/// `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call: large enough for any hash bucket (the kernel refuses a batch
/// smaller than the bucket it stops in with ENOSPC, and the call is retried with more), small
/// enough that the buffers stay well under a megabyte for the conntrack table's entries.
const BATCH: usize = 4096;

/// The `bpf_attr` of the batch commands (`struct { ... } batch` in `linux/bpf.h`).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of the hash map `map` (keys `K`, values `V`: the map's own sizes), in the
/// kernel's bucket order. Entries the datapath adds or removes meanwhile may or may not be in
/// it, as with any read of a live map. `Err` with `ErrorKind::Unsupported` when the kernel has
/// no batch calls for this map (the caller reads it entry by entry instead).
pub fn read_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut out = Vec::new();
    let mut capacity = BATCH;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The hash map's batch token is a bucket index (u32); u64 leaves room for any map's.
    let mut token_in: u64 = 0;
    let mut token_out: u64 = 0;
    let mut first = true;
    loop {
        keys.resize_with(capacity, MaybeUninit::uninit);
        values.resize_with(capacity, MaybeUninit::uninit);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: capacity as u32,
            map_fd: fd,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is the batch form of bpf_attr and its size is passed; the key and
        // value buffers hold `count` elements of the map's key and value sizes (aya checked
        // them against K and V when the map was opened); the tokens are live u64s, larger than
        // the hash map's u32 token.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (r != 0).then(io::Error::last_os_error);
        let done = match err.as_ref().and_then(io::Error::raw_os_error) {
            None => false,
            // The end of the map: what this call filled (`count`) is still valid.
            Some(libc::ENOENT) => true,
            // A bucket holds more than `count`: again from the same place, with room for it.
            Some(libc::ENOSPC) => {
                capacity *= 2;
                continue;
            }
            Some(libc::EINVAL | libc::ENOTSUP | libc::EOPNOTSUPP) if first => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "BPF_MAP_LOOKUP_BATCH is not supported here",
                ))
            }
            Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
        };
        let filled = (attr.count as usize).min(capacity);
        for i in 0..filled {
            // SAFETY: the kernel wrote the first `count` keys and values.
            out.push(unsafe { (keys[i].assume_init(), values[i].assume_init()) });
        }
        if done {
            return Ok(out);
        }
        token_in = token_out;
        first = false;
    }
}
