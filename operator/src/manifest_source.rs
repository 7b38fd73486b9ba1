//! The manifests directory as a source (`--manifests DIR`): polls the directory
//! ([`ManifestDir::scan`] re-reads only files whose content changed) and turns each scan into
//! [`ClusterChange`]s with [`changes::diff`] against the previous scan, so the runtime sees the
//! same kind of changes as from the API. After the first complete scan it reports
//! [`MANIFESTS`] listed: that is when the first full compile runs.
//!
//! Polling rather than inotify: it works the same on every filesystem (bind mounts, editors that
//! replace files, a directory recreated under the same name) and a scan of a demo-sized
//! directory costs next to nothing. Manifest problems (a file that does not parse, an unknown
//! kind, an object defined twice) are logged when they appear and when they are fixed.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    changes::{self, ClusterChange},
    kube_source::SourceEvent,
    manifests::ManifestDir,
    model::Cluster,
    netpol::{self, Mode},
    runtime::MANIFESTS,
};

/// The default time between two scans.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// Polls `dir` every `interval` and sends the changes to `tx` until `stop` is cancelled or the
/// receiver is gone. With `network_policies` [`Mode::Ignore`] the directory's NetworkPolicies
/// are read (a broken one is still reported) but left out of the cluster.
pub async fn run(
    dir: PathBuf,
    interval: Duration,
    network_policies: Mode,
    tx: mpsc::Sender<SourceEvent>,
    stop: CancellationToken,
) {
    let mut manifests = ManifestDir::new(&dir);
    let mut previous = Cluster::default();
    let mut listed = false;
    let mut problems: BTreeSet<(PathBuf, String)> = BTreeSet::new();
    let mut unreadable = false;
    let mut ignored_policies = 0;
    loop {
        match manifests.scan() {
            Ok(mut scan) => {
                if network_policies == Mode::Ignore {
                    let before = scan.cluster.groups.len();
                    scan.cluster.groups.retain(|k, _| !netpol::is_key(k));
                    let ignored = before - scan.cluster.groups.len();
                    if ignored != ignored_policies {
                        info!(
                            ignored,
                            "NetworkPolicies left to another enforcer (--network-policies ignore)"
                        );
                        ignored_policies = ignored;
                    }
                }
                if unreadable {
                    info!(dir = %dir.display(), "manifests directory readable again");
                    unreadable = false;
                }
                let now: BTreeSet<(PathBuf, String)> = scan
                    .problems
                    .iter()
                    .map(|p| (p.file.clone(), p.message.clone()))
                    .collect();
                for (file, message) in now.difference(&problems) {
                    warn!(
                        file = %file.display(),
                        %message,
                        "manifest problem; the file's previous content (if any) stays in force"
                    );
                }
                for (file, _) in problems.difference(&now) {
                    if !now.iter().any(|(f, _)| f == file) {
                        info!(file = %file.display(), "manifest problem resolved");
                    }
                }
                problems = now;
                if scan.changed || !listed {
                    let changes: Vec<ClusterChange> = changes::diff(&previous, &scan.cluster);
                    if !changes.is_empty() {
                        info!(
                            changes = changes.len(),
                            pods = scan.cluster.pods.len(),
                            groups = scan.cluster.groups.len(),
                            "manifests changed"
                        );
                    }
                    previous = scan.cluster;
                    if !changes.is_empty() && tx.send(SourceEvent::Changes(changes)).await.is_err()
                    {
                        return;
                    }
                }
                if !listed {
                    listed = true;
                    if tx.send(SourceEvent::Listed(MANIFESTS)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if !unreadable {
                    warn!(dir = %dir.display(), error = %e, "cannot read the manifests directory; retrying");
                    unreadable = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
