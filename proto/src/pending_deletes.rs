//! CNI DELs that could not reach the agent, kept for it on disk.
//!
//! DEL must succeed when the agent is gone (CNI spec: DEL of what is already gone is success),
//! or the runtime retries the pod's teardown until the agent is back; and no DEL may be lost, or
//! a restarted agent would keep judging an interface index the kernel may hand to another pod.
//! So when `kubesg-cni` cannot reach the agent it leaves the attachment's [`EndpointKey`] in
//! `pending-deletes/` beside the agent's socket (protobuf-encoded, one file per attachment,
//! written atomically), and the agent applies and removes these files when it starts and
//! periodically while it runs (a DEL queued while it hung). Cilium's CNI plugin keeps a
//! deletion queue for the same reason.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use prost::Message as _;

use crate::v1alpha1::EndpointKey;

/// The queue's directory name, beside the agent's socket.
pub const DIR_NAME: &str = "pending-deletes";

/// The queue directory of the agent serving `socket`.
pub fn dir_beside(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join(DIR_NAME)
}

/// The file of one attachment. `:` appears neither in a container id (the CNI spec allows
/// letters, digits, `-`, `_` and `.`) nor in an interface name (the kernel refuses it), so the
/// name is unique per attachment.
fn file_of(dir: &Path, key: &EndpointKey) -> PathBuf {
    dir.join(format!("{}:{}.del", key.container_id, key.ifname))
}

/// Queues the deletion of `key` in `dir`. `Ok(None)` when the directory's parent (the agent's
/// runtime directory) does not exist: no agent ever ran here, so there is nothing to delete.
pub fn queue(dir: &Path, key: &EndpointKey) -> io::Result<Option<PathBuf>> {
    let Some(runtime_dir) = dir.parent() else {
        return Ok(None);
    };
    if !runtime_dir.is_dir() {
        return Ok(None);
    }
    fs::create_dir_all(dir)?;
    let path = file_of(dir, key);
    let tmp = dir.join(format!(".{}.tmp", std::process::id()));
    fs::write(&tmp, key.encode_to_vec())?;
    fs::rename(&tmp, &path)?;
    Ok(Some(path))
}

/// One queued deletion as read back.
#[derive(Debug)]
pub struct PendingDelete {
    /// Its file, to remove once applied.
    pub path: PathBuf,
    /// The attachment to delete, or why the file could not be read (it is left for inspection).
    pub key: Result<EndpointKey, String>,
}

/// Every deletion queued in `dir`, oldest name first; none when the directory does not exist.
pub fn read_all(dir: &Path) -> io::Result<Vec<PendingDelete>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "del") {
            continue;
        }
        let key = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| EndpointKey::decode(bytes.as_slice()).map_err(|e| e.to_string()));
        out.push(PendingDelete { path, key });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Drops the queued deletion of `key`, if any: an ADD of the same attachment supersedes it.
pub fn forget(dir: &Path, key: &EndpointKey) -> io::Result<bool> {
    match fs::remove_file(file_of(dir, key)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(cid: &str) -> EndpointKey {
        EndpointKey {
            container_id: cid.into(),
            ifname: "eth0".into(),
        }
    }

    fn temp_runtime_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kubesg-pd-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the runtime dir");
        dir
    }

    #[test]
    fn queued_deletions_read_back_until_forgotten() {
        let runtime = temp_runtime_dir("roundtrip");
        let dir = dir_beside(&runtime.join("agent.sock"));
        for cid in ["b2", "a1", "a1"] {
            assert!(queue(&dir, &key(cid)).expect("queueing").is_some());
        }
        let keys: Vec<EndpointKey> = read_all(&dir)
            .expect("reading")
            .into_iter()
            .map(|p| p.key.expect("readable"))
            .collect();
        assert_eq!(keys, vec![key("a1"), key("b2")], "one file per attachment");
        assert!(forget(&dir, &key("a1")).expect("forgetting"));
        assert!(!forget(&dir, &key("a1")).expect("forgetting again"));
        assert_eq!(read_all(&dir).expect("reading").len(), 1);
        fs::remove_dir_all(&runtime).expect("cleaning up");
    }

    #[test]
    fn nothing_is_queued_where_no_agent_ever_ran() {
        let dir = Path::new("/nonexistent-kubesg-runtime").join(DIR_NAME);
        assert_eq!(queue(&dir, &key("c1")).expect("no error"), None);
        assert!(read_all(&dir).expect("no error").is_empty());
    }

    #[test]
    fn an_unreadable_file_is_reported_not_fatal() {
        let runtime = temp_runtime_dir("garbage");
        let dir = dir_beside(&runtime.join("agent.sock"));
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join("x:eth0.del"), [0xff, 0xff, 0xff]).expect("garbage");
        queue(&dir, &key("ok")).expect("queueing");
        let all = read_all(&dir).expect("reading");
        assert_eq!(all.len(), 2);
        assert!(all.iter().any(|p| p.key.is_err()));
        assert!(all
            .iter()
            .any(|p| p.key.as_ref().is_ok_and(|k| *k == key("ok"))));
        fs::remove_dir_all(&runtime).expect("cleaning up");
    }
}
