//! The bpf filesystem pinned objects live in. Nodes do not always mount it (this machine does
//! not), so the agent mounts it where it is missing, as Cilium's agent does.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

/// Errors preparing the bpf filesystem.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    /// The pin directory is not below a bpf filesystem and one could not be mounted.
    #[error("cannot mount a bpf filesystem at {path}: {source}")]
    Mount {
        /// Where.
        path: PathBuf,
        /// Why.
        source: nix::Error,
    },
    /// A directory could not be created.
    #[error("cannot create {path}: {source}")]
    Create {
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Makes sure `pin_dir` lies on a bpf filesystem, mounting one at `/sys/fs/bpf` (or at the pin
/// directory's parent when it is elsewhere) if needed, then creates `pin_dir`.
pub fn ensure_mounted(pin_dir: &Path) -> Result<(), BpffsError> {
    let mount_point = if pin_dir.starts_with("/sys/fs/bpf") {
        PathBuf::from("/sys/fs/bpf")
    } else {
        pin_dir.parent().unwrap_or(pin_dir).to_path_buf()
    };
    if !is_bpffs(&mount_point) {
        create_dir(&mount_point)?;
        mount(
            Some("bpf"),
            &mount_point,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| BpffsError::Mount {
            path: mount_point.clone(),
            source,
        })?;
        tracing::info!(path = %mount_point.display(), "mounted the bpf filesystem");
    }
    create_dir(pin_dir)
}

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// `mkdir -p`.
pub fn create_dir(path: &Path) -> Result<(), BpffsError> {
    fs::create_dir_all(path).map_err(|source| BpffsError::Create {
        path: path.to_path_buf(),
        source,
    })
}
