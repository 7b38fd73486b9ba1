//! Endpoints as the CNI plugin registers them: which pod sits behind which host interface. They
//! are persisted one file each under the state directory, so a restarted agent knows its pods
//! before the operator reconnects.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// A CNI attachment: the container and the interface name inside its pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointKey {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// A pod by namespace and name; the uid tells a recreated pod of the same name apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID; empty when unknown.
    pub uid: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A registered pod interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// The attachment.
    pub key: EndpointKey,
    /// The pod's network namespace path.
    pub netns: String,
    /// The host side of the pod's veth.
    pub host_ifname: String,
    /// Its index in the agent's network namespace.
    pub host_ifindex: u32,
    /// The pod's addresses on this interface.
    pub ips: Vec<IpNet>,
    /// The pod.
    pub pod: PodRef,
}

/// Why an endpoint registration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidEndpoint {
    /// The container id is not what the CNI spec allows (alphanumerics, then `_ . -`).
    #[error("invalid container id {0:?}")]
    ContainerId(String),
    /// The interface name is not a Linux interface name.
    #[error("invalid interface name {0:?}")]
    Ifname(String),
    /// No host interface index.
    #[error("missing host interface index")]
    HostIfindex,
    /// No pod namespace or name (CNI_ARGS K8S_POD_NAMESPACE / K8S_POD_NAME).
    #[error("missing pod namespace or name")]
    Pod,
}

impl EndpointKey {
    /// Checks that both names are what CNI and the kernel allow, which also keeps them safe as
    /// parts of a file name: every request that names an attachment (ADD, CHECK, DEL, a queued
    /// DEL) is checked, not only ADD, or a DEL of `../../x` would remove a file outside the state
    /// directory.
    pub fn validate(&self) -> Result<(), InvalidEndpoint> {
        let cid = &self.container_id;
        let cid_ok = cid
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && cid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !cid_ok {
            return Err(InvalidEndpoint::ContainerId(cid.clone()));
        }
        if !ifname_ok(&self.ifname) {
            return Err(InvalidEndpoint::Ifname(self.ifname.clone()));
        }
        Ok(())
    }
}

impl EndpointRecord {
    /// Checks what the agent relies on: names safe for file names and the kernel, a host
    /// interface, a pod.
    pub fn validate(&self) -> Result<(), InvalidEndpoint> {
        self.key.validate()?;
        if !ifname_ok(&self.host_ifname) {
            return Err(InvalidEndpoint::Ifname(self.host_ifname.clone()));
        }
        if self.host_ifindex == 0 {
            return Err(InvalidEndpoint::HostIfindex);
        }
        if self.pod.namespace.is_empty() || self.pod.name.is_empty() {
            return Err(InvalidEndpoint::Pod);
        }
        Ok(())
    }
}

/// A Linux interface name: 1–15 bytes, no `/`, `:`, NUL or white space, not `.` or `..`.
fn ifname_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
}

/// The endpoint records on disk: `<dir>/<container id>:<ifname>.json`, written atomically. `:`
/// is in neither name (see [`EndpointKey::validate`]), so each attachment has a file of its own;
/// builds before this one joined the names with `_`, which both may hold (`a_b`+`c` and `a`+`b_c`
/// shared a file), and [`EndpointStore::load_all`] renames their files.
#[derive(Clone, Debug)]
pub struct EndpointStore {
    dir: PathBuf,
}

impl EndpointStore {
    /// The store in `dir` (created if missing).
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(EndpointStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory the records are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &EndpointKey) -> PathBuf {
        self.dir
            .join(format!("{}:{}.json", key.container_id, key.ifname))
    }

    /// Every record; unreadable files, and records whose names are not valid, are reported and
    /// skipped (and left for inspection). A record under another name than its key's (an
    /// earlier build's `_`-joined name) is moved to its own.
    pub fn load_all(&self) -> io::Result<Vec<EndpointRecord>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let rec = match fs::read(&path).map(|b| serde_json::from_slice::<EndpointRecord>(&b)) {
                Ok(Ok(rec)) => rec,
                Ok(Err(e)) => {
                    warn!(file = %path.display(), error = %e, "skipping unreadable endpoint record");
                    continue;
                }
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "skipping unreadable endpoint record");
                    continue;
                }
            };
            if let Err(e) = rec.key.validate() {
                warn!(file = %path.display(), error = %e, "skipping an endpoint record with an invalid name");
                continue;
            }
            let own = self.path(&rec.key);
            if path != own {
                if own.exists() {
                    // Written under the new name since: this copy is older.
                    info!(file = %path.display(), "removing an endpoint record superseded by its file under the new name");
                    fs::remove_file(&path)?;
                    continue;
                }
                info!(from = %path.display(), to = %own.display(), "renaming an endpoint record to its own file name");
                fs::rename(&path, &own)?;
            }
            out.push(rec);
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Writes a record (replacing any with the same key).
    pub fn save(&self, rec: &EndpointRecord) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(rec).map_err(io::Error::other)?;
        write_atomically(&self.path(&rec.key), &json)
    }

    /// Removes a record; succeeds when there is none.
    pub fn remove(&self, key: &EndpointKey) -> io::Result<()> {
        match fs::remove_file(self.path(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash leaves the old
/// content or the new, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cid: &str) -> EndpointRecord {
        EndpointRecord {
            key: EndpointKey {
                container_id: cid.into(),
                ifname: "eth0".into(),
            },
            netns: "/var/run/netns/x".into(),
            host_ifname: "veth1234".into(),
            host_ifindex: 7,
            ips: vec![
                "10.0.0.5/24".parse().unwrap(),
                "fd00::5/64".parse().unwrap(),
            ],
            pod: PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "u1".into(),
            },
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kubesg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_survive_a_reload_and_removal_is_idempotent() {
        let dir = temp_dir("store");
        let store = EndpointStore::open(&dir).unwrap();
        store.save(&record("abc")).unwrap();
        store.save(&record("def")).unwrap();
        let mut changed = record("abc");
        changed.host_ifindex = 9;
        store.save(&changed).unwrap();
        let all = EndpointStore::open(&dir).unwrap().load_all().unwrap();
        assert_eq!(all, vec![changed, record("def")]);
        store.remove(&record("def").key).unwrap();
        store.remove(&record("def").key).unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_record_is_skipped_not_fatal() {
        let dir = temp_dir("corrupt");
        let store = EndpointStore::open(&dir).unwrap();
        store.save(&record("abc")).unwrap();
        fs::write(dir.join("broken_eth0.json"), b"{not json").unwrap();
        assert_eq!(store.load_all().unwrap(), vec![record("abc")]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_that_share_an_underscore_have_files_of_their_own() {
        let dir = temp_dir("underscore");
        let store = EndpointStore::open(&dir).unwrap();
        let mut first = record("a_b");
        first.key.ifname = "c".into();
        let mut second = record("a");
        second.key.ifname = "b_c".into();
        second.host_ifindex = 8;
        store.save(&first).unwrap();
        store.save(&second).unwrap();
        assert_eq!(
            store.load_all().unwrap(),
            vec![second.clone(), first.clone()]
        );
        store.remove(&first.key).unwrap();
        assert_eq!(store.load_all().unwrap(), vec![second]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_of_the_underscore_naming_move_to_their_own_names() {
        let dir = temp_dir("legacy");
        let store = EndpointStore::open(&dir).unwrap();
        let old = record("abc");
        let json = serde_json::to_vec(&old).unwrap();
        fs::write(dir.join("abc_eth0.json"), &json).unwrap();
        // One whose new file was written since: the new one wins.
        let mut newer = record("def");
        newer.host_ifindex = 11;
        store.save(&newer).unwrap();
        fs::write(
            dir.join("def_eth0.json"),
            serde_json::to_vec(&record("def")).unwrap(),
        )
        .unwrap();
        assert_eq!(store.load_all().unwrap(), vec![old.clone(), newer.clone()]);
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["abc:eth0.json", "def:eth0.json"]);
        store.remove(&old.key).unwrap();
        assert_eq!(store.load_all().unwrap(), vec![newer]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_with_an_invalid_name_is_skipped() {
        let dir = temp_dir("invalid-name");
        let store = EndpointStore::open(&dir).unwrap();
        store.save(&record("abc")).unwrap();
        let json = serde_json::to_vec(&record("../x")).unwrap();
        fs::write(dir.join("planted.json"), json).unwrap();
        assert_eq!(store.load_all().unwrap(), vec![record("abc")]);
        assert!(dir.join("planted.json").exists(), "left for inspection");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unsafe_names_are_refused() {
        let mut r = record("../../etc");
        assert_eq!(
            r.validate(),
            Err(InvalidEndpoint::ContainerId("../../etc".into()))
        );
        r = record("abc");
        r.key.ifname = "a/b".into();
        assert!(matches!(r.validate(), Err(InvalidEndpoint::Ifname(_))));
        r = record("abc");
        r.host_ifname = "x".repeat(16);
        assert!(matches!(r.validate(), Err(InvalidEndpoint::Ifname(_))));
        for bad in ["", ".", "..", "a:b", "a\0b", "a b", "x".repeat(16).as_str()] {
            let key = EndpointKey {
                container_id: "abc".into(),
                ifname: bad.into(),
            };
            assert!(
                matches!(key.validate(), Err(InvalidEndpoint::Ifname(_))),
                "{bad:?}"
            );
        }
        for bad in ["", "-a", "a/b", "a\0b", "a:b", "../x"] {
            let key = EndpointKey {
                container_id: bad.into(),
                ifname: "eth0".into(),
            };
            assert!(
                matches!(key.validate(), Err(InvalidEndpoint::ContainerId(_))),
                "{bad:?}"
            );
        }
        r = record("abc");
        r.pod.name.clear();
        assert_eq!(r.validate(), Err(InvalidEndpoint::Pod));
        assert_eq!(record("abc").validate(), Ok(()));
    }
}
