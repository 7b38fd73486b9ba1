//! The Kubernetes API as a source: one watcher per kind (Namespace, Pod, Node, Service,
//! SecurityGroup), each event turned into a [`ClusterChange`]. After every (re)list a watcher reports the objects
//! it no longer sees as deleted, so a missed delete during a disconnect is caught up.

use std::{collections::BTreeSet, fmt::Debug};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Node, Pod as K8sPod, Service};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource, ResourceExt as _,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{changes::ClusterChange, crd::SecurityGroup, model::ObjectKey, objects};

/// What the sources send the operator's main loop.
#[derive(Debug)]
pub enum SourceEvent {
    /// Objects changed.
    Changes(Vec<ClusterChange>),
    /// This kind has been listed once: when every kind is, the first full compile can run
    /// (pushing before that would hand agents a partial cluster).
    Listed(&'static str),
}

/// How one kind maps to changes.
trait Kind: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    const NAME: &'static str;
    type Key: Ord + Clone + Send;
    fn key(obj: &Self) -> Option<Self::Key>;
    fn upsert(obj: &Self) -> Option<ClusterChange>;
    fn delete(key: Self::Key) -> ClusterChange;
}

impl Kind for K8sNamespace {
    const NAME: &'static str = "Namespace";
    type Key = String;
    fn key(obj: &Self) -> Option<String> {
        Some(obj.name_any())
    }
    fn upsert(obj: &Self) -> Option<ClusterChange> {
        objects::namespace(obj)
            .ok()
            .map(|(n, ns)| ClusterChange::UpsertNamespace(n, ns))
    }
    fn delete(key: String) -> ClusterChange {
        ClusterChange::DeleteNamespace(key)
    }
}

impl Kind for Node {
    const NAME: &'static str = "Node";
    type Key = String;
    fn key(obj: &Self) -> Option<String> {
        Some(obj.name_any())
    }
    fn upsert(obj: &Self) -> Option<ClusterChange> {
        Some(ClusterChange::UpsertNode(obj.name_any()))
    }
    fn delete(key: String) -> ClusterChange {
        ClusterChange::DeleteNode(key)
    }
}

impl Kind for K8sPod {
    const NAME: &'static str = "Pod";
    type Key = ObjectKey;
    fn key(obj: &Self) -> Option<ObjectKey> {
        Some(ObjectKey::new(obj.namespace()?, obj.name_any()))
    }
    fn upsert(obj: &Self) -> Option<ClusterChange> {
        objects::pod(obj)
            .ok()
            .map(|(k, p)| ClusterChange::UpsertPod(k, p))
    }
    fn delete(key: ObjectKey) -> ClusterChange {
        ClusterChange::DeletePod(key)
    }
}

impl Kind for SecurityGroup {
    const NAME: &'static str = "SecurityGroup";
    type Key = ObjectKey;
    fn key(obj: &Self) -> Option<ObjectKey> {
        Some(ObjectKey::new(obj.namespace()?, obj.name_any()))
    }
    fn upsert(obj: &Self) -> Option<ClusterChange> {
        objects::group(obj)
            .ok()
            .map(|(k, g)| ClusterChange::UpsertGroup(k, g))
    }
    fn delete(key: ObjectKey) -> ClusterChange {
        ClusterChange::DeleteGroup(key)
    }
}

impl Kind for Service {
    const NAME: &'static str = "Service";
    type Key = ObjectKey;
    fn key(obj: &Self) -> Option<ObjectKey> {
        Some(ObjectKey::new(obj.namespace()?, obj.name_any()))
    }
    fn upsert(obj: &Self) -> Option<ClusterChange> {
        objects::service(obj)
            .ok()
            .map(|(k, s)| ClusterChange::UpsertService(k, s))
    }
    fn delete(key: ObjectKey) -> ClusterChange {
        ClusterChange::DeleteService(key)
    }
}

/// The kinds [`run`] watches, each reported [`SourceEvent::Listed`] once listed: the runtime
/// compiles once all of them are.
pub const KINDS: [&str; 5] = [
    <K8sNamespace as Kind>::NAME,
    <Node as Kind>::NAME,
    <K8sPod as Kind>::NAME,
    <Service as Kind>::NAME,
    <SecurityGroup as Kind>::NAME,
];

/// Watches every kind until `tx` is closed.
pub async fn run(client: Client, tx: mpsc::Sender<SourceEvent>) {
    tokio::join!(
        watch::<K8sNamespace>(Api::all(client.clone()), tx.clone()),
        watch::<Node>(Api::all(client.clone()), tx.clone()),
        watch::<K8sPod>(Api::all(client.clone()), tx.clone()),
        watch::<Service>(Api::all(client.clone()), tx.clone()),
        watch::<SecurityGroup>(Api::all(client), tx),
    );
}

async fn watch<K: Kind>(api: Api<K>, tx: mpsc::Sender<SourceEvent>) {
    let mut known: BTreeSet<K::Key> = BTreeSet::new();
    let mut relisting: Option<BTreeSet<K::Key>> = None;
    let mut listed_once = false;
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = stream.next().await {
        let mut changes = Vec::new();
        match event {
            Ok(watcher::Event::Apply(obj)) => {
                if let (Some(k), Some(c)) = (K::key(&obj), K::upsert(&obj)) {
                    known.insert(k);
                    changes.push(c);
                }
            }
            Ok(watcher::Event::Delete(obj)) => {
                if let Some(k) = K::key(&obj) {
                    known.remove(&k);
                    changes.push(K::delete(k));
                }
            }
            Ok(watcher::Event::Init) => relisting = Some(BTreeSet::new()),
            Ok(watcher::Event::InitApply(obj)) => {
                if let (Some(k), Some(c)) = (K::key(&obj), K::upsert(&obj)) {
                    if let Some(seen) = relisting.as_mut() {
                        seen.insert(k.clone());
                    }
                    known.insert(k);
                    changes.push(c);
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(seen) = relisting.take() {
                    let gone: Vec<K::Key> = known.difference(&seen).cloned().collect();
                    for k in gone {
                        known.remove(&k);
                        changes.push(K::delete(k));
                    }
                }
                if !listed_once {
                    listed_once = true;
                    info!(kind = K::NAME, objects = known.len(), "listed");
                    if tx.send(SourceEvent::Changes(changes)).await.is_err()
                        || tx.send(SourceEvent::Listed(K::NAME)).await.is_err()
                    {
                        return;
                    }
                    continue;
                }
            }
            Err(e) => warn!(kind = K::NAME, error = %e, "watch failed; retrying"),
        }
        if !changes.is_empty() && tx.send(SourceEvent::Changes(changes)).await.is_err() {
            return;
        }
    }
}
