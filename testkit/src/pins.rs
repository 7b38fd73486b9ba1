//! A pin directory of a test's own under `/sys/fs/bpf`, so tests that pin maps and links (as the
//! agent does) run in parallel without colliding and leave nothing behind.

use std::path::{Path, PathBuf};

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
