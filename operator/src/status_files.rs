//! The manifests mode's status writer: without an API server, each group's status is written as
//! YAML to `<dir>/<namespace>_<name>.yaml` (the `status` of the SecurityGroup, as the API would
//! hold it) and its conditions are logged at info level, so the demo and the tests can read
//! what `kubectl get sg` would show.
//!
//! Files are replaced atomically (written beside, then renamed), so a reader never sees half a
//! status. A status file left by an earlier run is read back as the previous status, which keeps
//! condition transition times across restarts. A deleted group's file is removed: a stale file
//! would claim a group that no longer exists.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use k8s_openapi::jiff::Timestamp;
use tracing::info;

use crate::{
    crd::SecurityGroupStatus,
    metrics::Metrics,
    model::ObjectKey,
    netpol,
    plan::GroupReport,
    status::{group_status, NodeAcks},
    status_writer::{StatusSink, WriteError},
};

/// Statuses as files (or only as log lines, without a directory).
pub struct StatusFiles {
    dir: Option<PathBuf>,
    known: BTreeMap<ObjectKey, SecurityGroupStatus>,
    metrics: Metrics,
}

/// The file name (without `.yaml`) of `key`'s status: `<namespace>_<name>` for a SecurityGroup,
/// `<namespace>_networkpolicy_<name>` for a NetworkPolicy. Kubernetes names hold no `_`, so no
/// two objects share a file.
fn file_stem(key: &ObjectKey) -> String {
    match netpol::name(key) {
        Some(name) => format!("{}_networkpolicy_{name}", key.namespace),
        None => format!("{}_{}", key.namespace, key.name),
    }
}

/// The file of `key`'s status under `dir`.
pub fn status_path(dir: &Path, key: &ObjectKey) -> PathBuf {
    dir.join(format!("{}.yaml", file_stem(key)))
}

/// Reads a status file written by [`StatusFiles`]; `None` if absent or unreadable.
pub fn read_status(path: &Path) -> Option<SecurityGroupStatus> {
    let text = fs::read_to_string(path).ok()?;
    serde_yaml::from_str(&text).ok()
}

impl StatusFiles {
    /// Writes into `dir` (created if missing), or only logs when `None`.
    pub fn new(dir: Option<PathBuf>, metrics: Metrics) -> io::Result<Self> {
        if let Some(d) = &dir {
            fs::create_dir_all(d)?;
        }
        Ok(StatusFiles {
            dir,
            known: BTreeMap::new(),
            metrics,
        })
    }

    fn write(&self, key: &ObjectKey, status: &SecurityGroupStatus) -> Result<(), WriteError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let path = status_path(dir, key);
        let yaml = serde_yaml::to_string(status).map_err(|e| WriteError::Encode(e.to_string()))?;
        let tmp = dir.join(format!(".{}.yaml.tmp", file_stem(key)));
        fs::write(&tmp, yaml)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| WriteError::File { path, source })
    }
}

fn describe(status: &SecurityGroupStatus, type_: &str) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| format!("{} ({}: {})", c.status, c.reason, c.message))
        .unwrap_or_default()
}

impl StatusSink for StatusFiles {
    async fn publish(
        &mut self,
        key: &ObjectKey,
        report: &GroupReport,
        acks: &BTreeMap<String, NodeAcks>,
        now: Timestamp,
    ) -> Result<(), WriteError> {
        if !self.known.contains_key(key) {
            if let Some(previous) = self
                .dir
                .as_ref()
                .and_then(|d| read_status(&status_path(d, key)))
            {
                self.known.insert(key.clone(), previous);
            }
        }
        let previous = self.known.get(key);
        let status = group_status(key, report, acks, previous, now);
        if previous == Some(&status) {
            return Ok(());
        }
        let written = self.write(key, &status);
        self.metrics.status_write(written.is_ok());
        written?;
        let nodes = status.nodes.unwrap_or_default();
        info!(
            group = %netpol::describe(key),
            generation = report.generation,
            members = status.members,
            nodes = format!("{}/{}", nodes.programmed, nodes.total),
            accepted = %describe(&status, "Accepted"),
            programmed = %describe(&status, "Programmed"),
            "status"
        );
        self.known.insert(key.clone(), status);
        Ok(())
    }

    async fn forget(&mut self, key: &ObjectKey) {
        self.known.remove(key);
        if let Some(dir) = &self.dir {
            let path = status_path(dir, key);
            match fs::remove_file(&path) {
                Ok(()) => {
                    info!(group = %netpol::describe(key), "group deleted: status file removed")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "could not remove a status file")
                }
            }
        }
    }

    fn reset(&mut self) {
        self.known.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(generation: i64, accepted: Result<(), String>) -> GroupReport {
        GroupReport {
            generation,
            accepted,
            members: 1,
            nodes: Default::default(),
        }
    }

    #[tokio::test]
    async fn statuses_are_files_read_back_after_a_restart_and_removed_with_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let key = ObjectKey::new("shop", "web");
        let path = status_path(dir.path(), &key);
        let t0 = Timestamp::from_second(1_000).unwrap();
        let mut files = StatusFiles::new(Some(dir.path().into()), Metrics::default()).unwrap();
        files
            .publish(&key, &report(1, Ok(())), &BTreeMap::new(), t0)
            .await
            .unwrap();
        let written = read_status(&path).expect("the status file parses");
        assert_eq!(written.observed_generation, Some(1));
        assert_eq!(written.conditions[0].last_transition_time.0, t0);

        // A new writer (an operator restart) keeps the transition time of an unchanged
        // condition.
        let mut again = StatusFiles::new(Some(dir.path().into()), Metrics::default()).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        again
            .publish(&key, &report(2, Ok(())), &BTreeMap::new(), t1)
            .await
            .unwrap();
        let rewritten = read_status(&path).unwrap();
        assert_eq!(rewritten.observed_generation, Some(2));
        assert_eq!(rewritten.conditions[0].last_transition_time.0, t0);

        again.forget(&key).await;
        assert!(!path.exists(), "a deleted group's status file is removed");
    }

    #[tokio::test]
    async fn a_network_policys_status_has_its_own_file_beside_a_group_of_the_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let group = ObjectKey::new("shop", "web");
        let policy = netpol::key("shop", "web");
        let t0 = Timestamp::from_second(1_000).unwrap();
        let mut files = StatusFiles::new(Some(dir.path().into()), Metrics::default()).unwrap();
        files
            .publish(&group, &report(1, Ok(())), &BTreeMap::new(), t0)
            .await
            .unwrap();
        files
            .publish(&policy, &report(3, Ok(())), &BTreeMap::new(), t0)
            .await
            .unwrap();
        let path = status_path(dir.path(), &policy);
        assert_eq!(
            path.file_name().and_then(|n| n.to_str()),
            Some("shop_networkpolicy_web.yaml")
        );
        assert_eq!(read_status(&path).unwrap().observed_generation, Some(3));
        assert_eq!(
            read_status(&status_path(dir.path(), &group))
                .unwrap()
                .observed_generation,
            Some(1)
        );
    }
}
