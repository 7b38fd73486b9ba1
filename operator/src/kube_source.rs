//! The Kubernetes API as a source: one watcher per kind (Namespace, Pod, Node, Service,
//! SecurityGroup and, unless they are left to another enforcer, NetworkPolicy), each event turned into a [`ClusterChange`]. After every (re)list a watcher reports the objects
//! it no longer sees as deleted, so a missed delete during a disconnect is caught up.

use std::{collections::BTreeSet, fmt::Debug};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace as K8sNamespace, Node, Pod as K8sPod, Service},
    networking::v1::NetworkPolicy,
};
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource, ResourceExt as _,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    changes::ClusterChange,
    crd::SecurityGroup,
    model::ObjectKey,
    netpol::{self, Mode},
    objects,
};

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

/// SecurityGroups, watched untyped and read one by one ([`objects::stored_group`]): one this
/// version cannot read is reported on its own status instead of failing every list and watch
/// of the kind. The only kind watched as a [`DynamicObject`].
impl Kind for DynamicObject {
    const NAME: &'static str = "SecurityGroup";
    type Key = ObjectKey;
    fn key(obj: &Self) -> Option<ObjectKey> {
        Some(ObjectKey::new(obj.namespace()?, obj.name_any()))
    }
    fn upsert(obj: &Self) -> Option<ClusterChange> {
        let (key, group) = objects::stored_group(obj).ok()?;
        if let Some(unreadable) = &group.unreadable {
            warn!(group = %key, error = %unreadable, "SecurityGroup this version cannot read: not Accepted, contributes nothing");
        }
        Some(ClusterChange::UpsertGroup(key, group))
    }
    fn delete(key: ObjectKey) -> ClusterChange {
        ClusterChange::DeleteGroup(key)
    }
}

impl Kind for NetworkPolicy {
    const NAME: &'static str = "NetworkPolicy";
    type Key = ObjectKey;
    fn key(obj: &Self) -> Option<ObjectKey> {
        Some(netpol::key(&obj.namespace()?, &obj.name_any()))
    }
    fn upsert(obj: &Self) -> Option<ClusterChange> {
        match netpol::group(obj) {
            Ok((k, g)) => Some(ClusterChange::UpsertGroup(k, g)),
            Err(e) => {
                // The API server validated it; what is left is a protocol this version does not
                // know. Its previous version (if any) stays enforced.
                warn!(
                    policy = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any()),
                    error = %e,
                    "NetworkPolicy not understood; its previous version (if any) stays enforced"
                );
                None
            }
        }
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

/// The kinds [`run`] watches in `mode`, each reported [`SourceEvent::Listed`] once listed: the
/// runtime compiles once all of them are.
pub fn kinds(mode: Mode) -> Vec<&'static str> {
    let mut kinds = vec![
        <K8sNamespace as Kind>::NAME,
        <Node as Kind>::NAME,
        <K8sPod as Kind>::NAME,
        <Service as Kind>::NAME,
        <DynamicObject as Kind>::NAME,
    ];
    if mode == Mode::Enforce {
        kinds.push(<NetworkPolicy as Kind>::NAME);
    }
    kinds
}

/// Watches every kind of [`kinds`] until `tx` is closed.
pub async fn run(client: Client, mode: Mode, tx: mpsc::Sender<SourceEvent>) {
    let (c, t) = (client.clone(), tx.clone());
    let policies = async move {
        if mode == Mode::Enforce {
            watch::<NetworkPolicy>(Api::all(c), t).await;
        } else {
            info!("NetworkPolicies are left to another enforcer (--network-policies ignore)");
        }
    };
    tokio::join!(
        policies,
        watch::<K8sNamespace>(Api::all(client.clone()), tx.clone()),
        watch::<Node>(Api::all(client.clone()), tx.clone()),
        watch::<K8sPod>(Api::all(client.clone()), tx.clone()),
        watch::<Service>(Api::all(client.clone()), tx.clone()),
        watch::<DynamicObject>(
            Api::all_with(client, &ApiResource::erase::<SecurityGroup>(&())),
            tx
        ),
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
            // An object that cannot be read (upsert: None) stays known, so the version read
            // before it stays in force, also across a relist.
            Ok(watcher::Event::Apply(obj)) => {
                if let Some(k) = K::key(&obj) {
                    known.insert(k);
                    changes.extend(K::upsert(&obj));
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
                if let Some(k) = K::key(&obj) {
                    if let Some(seen) = relisting.as_mut() {
                        seen.insert(k.clone());
                    }
                    known.insert(k);
                    changes.extend(K::upsert(&obj));
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
