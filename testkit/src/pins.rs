//! A pin directory of a test's own under `/sys/fs/bpf`, so tests that pin maps and links (as the
//! agent does) run in parallel without colliding and leave nothing behind.

use std::{
    ffi::CString,
    io,
    os::{fd::FromRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use crate::netns::unique_name;

/// A unique directory under `/sys/fs/bpf`, removed with every pin in it on drop (pinned links
/// detach when their pin goes and nothing else holds them).
#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// A fresh name; the datapath creates the directory when it pins.
    pub fn new() -> Self {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            unique_name("kubesg-test-")
        )))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for PinDir {
    fn default() -> Self {
        PinDir::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `BPF_MAP_TYPE_ARRAY`.
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_LRU_HASH`.
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// Creates an array map of one `value_size`-byte element and pins it at `path`, as a map left by
/// another build would be: the agent must notice that it does not fit.
pub fn pin_foreign_array(path: &Path, value_size: u32) -> io::Result<()> {
    pin_foreign_map(path, BPF_MAP_TYPE_ARRAY, 4, value_size, 1)
}

/// Creates a map of `map_type` with the given sizes and pins it at `path`, as a map left by
/// another build of the agent would be (an older conntrack layout, say).
pub fn pin_foreign_map(
    path: &Path,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, then
    // fields that stay zero.
    let mut create = [0u32; 32];
    create[..4].copy_from_slice(&[map_type, key_size, value_size, max_entries]);
    // SAFETY: a zeroed bpf_attr prefix with the four fields set.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut create)? };
    // SAFETY: the kernel just returned this descriptor; the OwnedFd closes it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr for BPF_OBJ_PIN: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut pin = [0u64; 2];
    pin[0] = name.as_ptr() as u64;
    pin[1] = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
    // SAFETY: the attr carries a NUL-terminated path that outlives the call and an open map fd.
    unsafe { bpf(BPF_OBJ_PIN, &mut pin)? };
    Ok(())
}

/// The `bpf(2)` system call with `attr` as its `union bpf_attr` prefix; the returned value, or the
/// error it signalled.
///
/// # Safety
///
/// `attr` must be a valid `bpf_attr` prefix for `cmd`, and any pointers in it must outlive the call.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: as the caller promises; the size passed is the attr's own.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
