//! The manifests directory as a source (`--manifests DIR`): follows the directory through
//! file-system notifications (inotify, by the `notify` crate) and re-reads only the files they
//! name, turning each change into [`ClusterChange`]s with [`changes::diff`] against the previous
//! state, so the runtime sees the same kind of changes as from the API. After the first complete
//! read it reports [`MANIFESTS`] listed: that is when the first full compile runs.
//!
//! Nothing happens while nothing changes: no timer, no read. A file is read once its writer
//! closed it (or moved it into place), so a half-written file is never taken for the whole one:
//! a truncated list of objects would otherwise remove objects for a moment. A writer that keeps
//! the file open is read after [`WRITE_PATIENCE`] of quiet. Manifest problems (a file that does
//! not parse, an unknown kind, an object defined twice) are logged when they appear and when
//! they are fixed.
//!
//! The directory is read whole again when the notifications cannot say what changed: at start,
//! when the kernel's event queue overflowed, when a directory or a symlink appears (a
//! ConfigMap volume swaps its `..data` link), and every `--rescan-interval` if one is given
//! (file systems that deliver no notifications for changes made elsewhere, such as NFS). When
//! the directory itself goes (removed or moved away) or the notifications cannot be set up
//! (`fs.inotify.max_user_watches` reached), the previous content stays in force and the
//! directory is read every [`FALLBACK_POLL`] until it can be followed again; both are logged.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{
    event::{AccessKind, AccessMode, CreateKind, ModifyKind},
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    changes::{self, ClusterChange},
    kube_source::SourceEvent,
    manifests::{is_manifest_name, ManifestDir, Scan},
    model::Cluster,
    netpol::{self, Mode},
    runtime::MANIFESTS,
};

/// How often the directory is read while it cannot be followed by notifications.
pub const FALLBACK_POLL: Duration = Duration::from_millis(500);
/// Quiet time after a notification before the files it named are read: the events of one save
/// (create, write, close, rename) are handled together.
const SETTLE: Duration = Duration::from_millis(5);
/// The longest a batch of events is gathered: a directory written to without pause is still
/// read this often.
const MAX_GATHER: Duration = Duration::from_millis(100);
/// A file written to and not closed is read after this long without a new write.
pub const WRITE_PATIENCE: Duration = Duration::from_secs(1);

/// Follows `dir` and sends its changes to `tx` until `stop` is cancelled or the receiver is
/// gone. `rescan`: also read the whole directory this often (for file systems without
/// notifications). With `network_policies` [`Mode::Ignore`] the directory's NetworkPolicies are
/// read (a broken one is still reported) but left out of the cluster.
pub async fn run(
    dir: PathBuf,
    rescan: Option<Duration>,
    network_policies: Mode,
    tx: mpsc::Sender<SourceEvent>,
    stop: CancellationToken,
) {
    let manifests = ManifestDir::new(&dir);
    follow(
        manifests,
        rescan,
        WRITE_PATIENCE,
        network_policies,
        tx,
        stop,
    )
    .await;
}

/// [`run`] on a [`ManifestDir`] given and handed back when it ends (so that tests can ask it
/// how much it read), with a file written to and not closed read after `write_patience`.
pub async fn follow(
    manifests: ManifestDir,
    rescan: Option<Duration>,
    write_patience: Duration,
    network_policies: Mode,
    tx: mpsc::Sender<SourceEvent>,
    stop: CancellationToken,
) -> ManifestDir {
    let mut source = Follower {
        manifests,
        network_policies,
        tx,
        previous: Cluster::default(),
        listed: false,
        problems: BTreeSet::new(),
        unreadable: false,
        ignored_policies: 0,
    };
    let mut watch: Option<Watch> = None;
    let mut watch_failed = false;
    loop {
        // The watch first, then the read: a change in between is then seen by both, not missed.
        if watch.is_none() {
            match Watch::start(source.manifests.dir()) {
                Ok(w) => {
                    if watch_failed {
                        info!(dir = %source.manifests.dir().display(), "following the manifests directory again");
                    }
                    watch = Some(w);
                    watch_failed = false;
                }
                Err(e) => {
                    if !watch_failed {
                        warn!(dir = %source.manifests.dir().display(), error = %e, every = ?FALLBACK_POLL,
                              "cannot follow the manifests directory by notifications; reading it periodically");
                    }
                    watch_failed = true;
                }
            }
        }
        if !source.read_all().await {
            return source.manifests;
        }
        let poll = match (&watch, rescan) {
            (None, Some(r)) => Some(r.min(FALLBACK_POLL)),
            (None, None) => Some(FALLBACK_POLL),
            (Some(_), r) => r,
        };
        let next_rescan = poll.map(|p| Instant::now() + p);
        loop {
            let batch = tokio::select! {
                _ = stop.cancelled() => return source.manifests,
                () = sleep_until(next_rescan) => break,
                batch = next_batch(&mut watch, &source.manifests, write_patience) => batch,
            };
            match batch {
                Batch::Files(paths) => {
                    if !source.read_files(&paths).await {
                        return source.manifests;
                    }
                }
                Batch::ReadAll(why) => {
                    debug!(why, "reading the whole manifests directory");
                    break;
                }
                Batch::Lost(why) => {
                    warn!(dir = %source.manifests.dir().display(), why,
                          "no longer following the manifests directory; its previous content stays in force");
                    watch = None;
                    watch_failed = true;
                    break;
                }
            }
        }
    }
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What a batch of notifications asks for.
enum Batch {
    /// Read these files again (written and closed, created, moved, removed).
    Files(BTreeSet<PathBuf>),
    /// Read the whole directory again, for this reason.
    ReadAll(&'static str),
    /// The directory itself went away, or its notifications stopped, for this reason.
    Lost(&'static str),
}

/// The notifications of one directory.
struct Watch {
    root: PathBuf,
    // Held for its watches: dropping it ends them.
    _watcher: RecommendedWatcher,
    events: mpsc::UnboundedReceiver<notify::Result<Event>>,
    /// Files written to and not yet closed, with the time of their last write.
    writing: BTreeMap<PathBuf, Instant>,
}

impl Watch {
    fn start(dir: &Path) -> notify::Result<Watch> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |e: notify::Result<Event>| {
            // The receiver is gone only when the source ends.
            let _ = tx.send(e);
        })?;
        watcher.watch(dir, RecursiveMode::Recursive)?;
        Ok(Watch {
            root: dir.to_path_buf(),
            _watcher: watcher,
            events,
            writing: BTreeMap::new(),
        })
    }
}

/// The next batch of changes from `watch` (never, without one).
async fn next_batch(
    watch: &mut Option<Watch>,
    manifests: &ManifestDir,
    write_patience: Duration,
) -> Batch {
    let Some(w) = watch else {
        return std::future::pending().await;
    };
    loop {
        let mut batch = Gathered::default();
        // The first event, or the end of a writer's patience.
        let patience = w.writing.values().min().map(|last| *last + write_patience);
        tokio::select! {
            e = w.events.recv() => match e {
                Some(e) => batch.absorb(w, manifests, e),
                None => return Batch::Lost("the notifications stopped"),
            },
            () = sleep_until(patience) => {}
        }
        // Then what follows it closely.
        let until = Instant::now() + MAX_GATHER;
        while Instant::now() < until {
            match tokio::time::timeout(SETTLE, w.events.recv()).await {
                Ok(Some(e)) => batch.absorb(w, manifests, e),
                Ok(None) => return Batch::Lost("the notifications stopped"),
                Err(_) => break,
            }
        }
        if let Some(why) = batch.lost {
            return Batch::Lost(why);
        }
        if let Some(why) = batch.read_all {
            w.writing.clear();
            return Batch::ReadAll(why);
        }
        let now = Instant::now();
        let patient: Vec<PathBuf> = w
            .writing
            .iter()
            .filter(|(_, last)| now >= **last + write_patience)
            .map(|(p, _)| p.clone())
            .collect();
        for p in patient {
            w.writing.remove(&p);
            batch.files.insert(p);
        }
        if !batch.files.is_empty() {
            return Batch::Files(batch.files);
        }
    }
}

/// Events gathered into one batch.
#[derive(Default)]
struct Gathered {
    files: BTreeSet<PathBuf>,
    read_all: Option<&'static str>,
    lost: Option<&'static str>,
}

impl Gathered {
    fn absorb(&mut self, w: &mut Watch, manifests: &ManifestDir, event: notify::Result<Event>) {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "manifests directory notification error; reading it whole");
                self.read_all = Some("a notification error");
                return;
            }
        };
        if event.need_rescan() {
            self.read_all = Some("the kernel dropped notifications (queue overflow)");
            return;
        }
        // Opened or read (by anyone, this source's own reads included: a whole read opens every
        // directory, which must not call for another one): nothing changed. Only a writer's
        // close says something.
        if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
        {
            return;
        }
        for path in &event.paths {
            if *path == w.root {
                if matches!(
                    event.kind,
                    EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                ) {
                    self.lost = Some("the directory was removed or moved away");
                }
                continue;
            }
            if !manifests.is_manifest_path(path) {
                self.other_path(manifests, path);
                continue;
            }
            match event.kind {
                EventKind::Access(_) => {
                    // Closed after writing (nothing else gets here).
                    w.writing.remove(path);
                    self.files.insert(path.clone());
                }
                // A symlink is complete when it appears.
                EventKind::Create(_) if is_symlink(path) => {
                    w.writing.remove(path);
                    self.files.insert(path.clone());
                }
                // Being written: read when its writer closes it.
                EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => {
                    w.writing.insert(path.clone(), Instant::now());
                    self.files.remove(path);
                }
                // Moved in or out, removed, linked, its mode changed: read as it is now.
                _ => {
                    w.writing.remove(path);
                    self.files.insert(path.clone());
                }
            }
        }
    }

    /// A path the directory does not read as a file of its own: a directory (moved in, created:
    /// files may have been written in it before its watch was added), a symlink (a ConfigMap
    /// volume's `..data`), a file under a hidden directory (what those links point to) call for
    /// a whole read; a removed directory takes its files; any other file is not a manifest.
    fn other_path(&mut self, manifests: &ManifestDir, path: &Path) {
        let meta = std::fs::symlink_metadata(path);
        if meta.as_ref().is_ok_and(|m| m.is_dir()) {
            self.read_all = Some("a directory appeared or changed");
        } else if meta.as_ref().is_ok_and(|m| m.file_type().is_symlink()) {
            self.read_all = Some("a symlink changed");
        } else if manifests.holds_under(path) {
            self.files.insert(path.to_path_buf());
        } else if is_manifest_name(path) {
            self.read_all = Some("a manifest under a hidden directory changed");
        }
    }
}

/// The source's state between two reads.
struct Follower {
    manifests: ManifestDir,
    network_policies: Mode,
    tx: mpsc::Sender<SourceEvent>,
    previous: Cluster,
    listed: bool,
    problems: BTreeSet<(PathBuf, String)>,
    unreadable: bool,
    ignored_policies: usize,
}

impl Follower {
    /// Reads the whole directory and sends what changed; false when the receiver is gone.
    async fn read_all(&mut self) -> bool {
        match self.manifests.scan() {
            Ok(scan) => {
                if self.unreadable {
                    info!(dir = %self.manifests.dir().display(), "manifests directory readable again");
                    self.unreadable = false;
                }
                self.publish(scan).await
            }
            Err(e) => {
                if !self.unreadable {
                    warn!(dir = %self.manifests.dir().display(), error = %e,
                          "cannot read the manifests directory; its previous content stays in force");
                    self.unreadable = true;
                }
                true
            }
        }
    }

    /// Reads `paths` again and sends what changed; false when the receiver is gone.
    async fn read_files(&mut self, paths: &BTreeSet<PathBuf>) -> bool {
        let scan = self.manifests.update(paths);
        debug!(
            files = paths.len(),
            changed = scan.changed,
            "manifest files re-read"
        );
        self.publish(scan).await
    }

    async fn publish(&mut self, mut scan: Scan) -> bool {
        if self.network_policies == Mode::Ignore {
            let before = scan.cluster.groups.len();
            scan.cluster.groups.retain(|k, _| !netpol::is_key(k));
            let ignored = before - scan.cluster.groups.len();
            if ignored != self.ignored_policies {
                info!(
                    ignored,
                    "NetworkPolicies left to another enforcer (--network-policies ignore)"
                );
                self.ignored_policies = ignored;
            }
        }
        let now: BTreeSet<(PathBuf, String)> = scan
            .problems
            .iter()
            .map(|p| (p.file.clone(), p.message.clone()))
            .collect();
        for (file, message) in now.difference(&self.problems) {
            warn!(
                file = %file.display(),
                %message,
                "manifest problem; the file's previous content (if any) stays in force"
            );
        }
        for (file, _) in self.problems.difference(&now) {
            if !now.iter().any(|(f, _)| f == file) {
                info!(file = %file.display(), "manifest problem resolved");
            }
        }
        self.problems = now;
        if scan.changed || !self.listed {
            let changes: Vec<ClusterChange> = changes::diff(&self.previous, &scan.cluster);
            if !changes.is_empty() {
                info!(
                    changes = changes.len(),
                    pods = scan.cluster.pods.len(),
                    groups = scan.cluster.groups.len(),
                    "manifests changed"
                );
            }
            self.previous = scan.cluster;
            if !changes.is_empty() && self.tx.send(SourceEvent::Changes(changes)).await.is_err() {
                return false;
            }
        }
        if !self.listed {
            self.listed = true;
            if self.tx.send(SourceEvent::Listed(MANIFESTS)).await.is_err() {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, io::Write as _};

    use super::*;
    use crate::model::ObjectKey;

    /// Long enough for any change to arrive on a loaded machine: the waits below end as soon
    /// as it does.
    const WAIT: Duration = Duration::from_secs(20);

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: { name: shop }\n";

    fn group(name: &str, port: u16) -> String {
        format!(
            "apiVersion: kubesg.io/v1alpha1\nkind: SecurityGroup\n\
             metadata: {{ name: {name}, namespace: shop }}\n\
             spec:\n  podSelector: {{ matchLabels: {{ app: {name} }} }}\n  ingress:\n\
             \x20   - protocol: TCP\n      ports: [ {{ port: {port} }} ]\n\
             \x20     from: [ {{ ipBlock: {{ cidr: 10.0.0.0/8 }} }} ]\n"
        )
    }

    struct Following {
        rx: mpsc::Receiver<SourceEvent>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<ManifestDir>,
    }

    impl Following {
        fn start(dir: &Path, write_patience: Duration) -> Self {
            let (tx, rx) = mpsc::channel(16);
            let stop = CancellationToken::new();
            let task = tokio::spawn(follow(
                ManifestDir::new(dir),
                None,
                write_patience,
                Mode::Enforce,
                tx,
                stop.clone(),
            ));
            Following { rx, stop, task }
        }

        /// The next changes (the first read's, then each change's).
        async fn changes(&mut self) -> Vec<ClusterChange> {
            loop {
                match tokio::time::timeout(WAIT, self.rx.recv()).await {
                    Ok(Some(SourceEvent::Changes(c))) => return c,
                    Ok(Some(SourceEvent::Listed(_))) => continue,
                    Ok(None) => panic!("the source ended"),
                    Err(_) => panic!("no change within {WAIT:?}"),
                }
            }
        }

        fn nothing_yet(&mut self) {
            match self.rx.try_recv() {
                Err(mpsc::error::TryRecvError::Empty) => {}
                other => panic!("expected nothing yet, got {other:?}"),
            }
        }

        async fn stop(self) -> ManifestDir {
            self.stop.cancel();
            self.task.await.expect("the source task")
        }
    }

    fn port_of(changes: &[ClusterChange], name: &str) -> Option<String> {
        changes.iter().find_map(|c| match c {
            ClusterChange::UpsertGroup(k, g) if *k == ObjectKey::new("shop", name) => {
                Some(format!("{:?}", g.spec))
            }
            _ => None,
        })
    }

    #[tokio::test]
    async fn an_edit_is_read_from_its_notification_alone_and_only_its_file_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ns.yaml"), NAMESPACE).unwrap();
        // A subdirectory: a whole read opens it, which must not call for another whole read.
        fs::create_dir(dir.path().join("groups")).unwrap();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let file = dir.path().join("groups").join(format!("{name}.yaml"));
            fs::write(file, group(name, 8000 + i as u16)).unwrap();
        }
        let mut source = Following::start(dir.path(), WRITE_PATIENCE);
        let first = source.changes().await;
        assert_eq!(first.len(), 4, "{first:?}");

        fs::write(dir.path().join("groups/b.yaml"), group("b", 9443)).unwrap();
        let edit = source.changes().await;
        assert_eq!(edit.len(), 1, "{edit:?}");
        assert!(
            port_of(&edit, "b").is_some_and(|s| s.contains("9443")),
            "{edit:?}"
        );

        fs::remove_file(dir.path().join("groups/c.yaml")).unwrap();
        let removal = source.changes().await;
        assert_eq!(
            removal,
            vec![ClusterChange::DeleteGroup(ObjectKey::new("shop", "c"))]
        );

        let manifests = source.stop().await;
        // One whole read (the first); then the edited file alone, parsed once; the removed
        // one not at all.
        assert_eq!(manifests.scans(), 1, "the directory was read whole again");
        assert_eq!(manifests.parses(), 4 + 1);
    }

    #[tokio::test]
    async fn a_file_is_read_once_its_writer_closes_it_not_half_written() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("ns.yaml"), NAMESPACE).unwrap();
        // No patience: a file left open is never read while it is.
        let mut source = Following::start(dir.path(), Duration::from_secs(3600));
        source.changes().await;

        // Two groups in one file, written in two steps; the first step alone is valid YAML of
        // one group, which must not be taken for the file.
        let mut file = fs::File::create(dir.path().join("groups.yaml")).unwrap();
        file.write_all(group("a", 8000).as_bytes()).unwrap();
        file.flush().unwrap();
        // The source has seen the writes (a later edit of another file is read first).
        fs::write(dir.path().join("other.yaml"), group("z", 7000)).unwrap();
        let other = source.changes().await;
        assert_eq!(other.len(), 1, "only the closed file: {other:?}");
        assert!(port_of(&other, "z").is_some(), "{other:?}");
        source.nothing_yet();

        file.write_all(format!("---\n{}", group("b", 8001)).as_bytes())
            .unwrap();
        drop(file);
        let both = source.changes().await;
        assert!(
            port_of(&both, "a").is_some() && port_of(&both, "b").is_some(),
            "{both:?}"
        );
        source.stop().await;
    }

    #[tokio::test]
    async fn a_file_its_writer_keeps_open_is_read_after_the_patience() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = Following::start(dir.path(), Duration::from_millis(50));
        let mut file = fs::File::create(dir.path().join("ns.yaml")).unwrap();
        file.write_all(NAMESPACE.as_bytes()).unwrap();
        file.flush().unwrap();
        let changes = source.changes().await;
        assert!(
            matches!(&changes[..], [ClusterChange::UpsertNamespace(n, _)] if n == "shop"),
            "{changes:?}"
        );
        drop(file);
        source.stop().await;
    }

    #[tokio::test]
    async fn a_directory_moved_away_keeps_its_content_and_the_one_put_back_is_followed() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("manifests");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("ns.yaml"), NAMESPACE).unwrap();
        fs::write(dir.join("a.yaml"), group("a", 8000)).unwrap();
        let mut source = Following::start(&dir, WRITE_PATIENCE);
        source.changes().await;

        fs::rename(&dir, parent.path().join("gone")).unwrap();
        // Put back with another content: read by the fallback poll, then followed again.
        let staging = parent.path().join("staging");
        fs::create_dir(&staging).unwrap();
        fs::write(staging.join("ns.yaml"), NAMESPACE).unwrap();
        fs::write(staging.join("a.yaml"), group("a", 8100)).unwrap();
        fs::rename(&staging, &dir).unwrap();
        let back = source.changes().await;
        assert_eq!(back.len(), 1, "nothing was removed meanwhile: {back:?}");
        assert!(
            port_of(&back, "a").is_some_and(|s| s.contains("8100")),
            "{back:?}"
        );

        fs::write(dir.join("a.yaml"), group("a", 8200)).unwrap();
        let edit = source.changes().await;
        assert!(
            port_of(&edit, "a").is_some_and(|s| s.contains("8200")),
            "{edit:?}"
        );
        source.stop().await;
    }

    #[tokio::test]
    async fn a_configmap_volume_swapping_its_data_link_is_read_again() {
        // The layout the kubelet gives a ConfigMap volume: the files are links through `..data`,
        // which is swapped atomically to a new timestamped directory on an update.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("..2026_01")).unwrap();
        fs::write(
            d.join("..2026_01/a.yaml"),
            format!("{NAMESPACE}---\n{}", group("a", 8000)),
        )
        .unwrap();
        std::os::unix::fs::symlink("..2026_01", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/a.yaml", d.join("a.yaml")).unwrap();
        let mut source = Following::start(d, WRITE_PATIENCE);
        let first = source.changes().await;
        assert!(
            port_of(&first, "a").is_some_and(|s| s.contains("8000")),
            "{first:?}"
        );

        fs::create_dir(d.join("..2026_02")).unwrap();
        fs::write(
            d.join("..2026_02/a.yaml"),
            format!("{NAMESPACE}---\n{}", group("a", 8001)),
        )
        .unwrap();
        std::os::unix::fs::symlink("..2026_02", d.join("..data_tmp")).unwrap();
        fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        let update = source.changes().await;
        assert_eq!(update.len(), 1, "{update:?}");
        assert!(
            port_of(&update, "a").is_some_and(|s| s.contains("8001")),
            "{update:?}"
        );
        source.stop().await;
    }
}
