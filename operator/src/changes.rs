//! Changes to the cluster, one object at a time: what the sources emit and the incremental
//! compiler consumes. The API source turns watch events into changes directly; the manifests
//! source diffs the directory's cluster against the previous one.

use crate::model::{Cluster, Group, Namespace, ObjectKey, Pod, Service};

/// One object added, changed or removed.
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterChange {
    /// A namespace appeared or its labels changed.
    UpsertNamespace(String, Namespace),
    /// A namespace is gone.
    DeleteNamespace(String),
    /// A pod appeared or changed.
    UpsertPod(ObjectKey, Pod),
    /// A pod is gone.
    DeletePod(ObjectKey),
    /// A node appeared.
    UpsertNode(String),
    /// A node is gone.
    DeleteNode(String),
    /// A group appeared or changed.
    UpsertGroup(ObjectKey, Group),
    /// A group is gone.
    DeleteGroup(ObjectKey),
    /// A Service appeared or changed.
    UpsertService(ObjectKey, Service),
    /// A Service is gone.
    DeleteService(ObjectKey),
}

impl Cluster {
    /// Applies one change.
    pub fn apply(&mut self, change: &ClusterChange) {
        match change {
            ClusterChange::UpsertNamespace(n, ns) => {
                self.namespaces.insert(n.clone(), ns.clone());
            }
            ClusterChange::DeleteNamespace(n) => {
                self.namespaces.remove(n);
            }
            ClusterChange::UpsertPod(k, p) => {
                self.pods.insert(k.clone(), p.clone());
            }
            ClusterChange::DeletePod(k) => {
                self.pods.remove(k);
            }
            ClusterChange::UpsertNode(n) => {
                self.nodes.insert(n.clone());
            }
            ClusterChange::DeleteNode(n) => {
                self.nodes.remove(n);
            }
            ClusterChange::UpsertGroup(k, g) => {
                self.groups.insert(k.clone(), g.clone());
            }
            ClusterChange::DeleteGroup(k) => {
                self.groups.remove(k);
            }
            ClusterChange::UpsertService(k, s) => {
                self.services.insert(k.clone(), s.clone());
            }
            ClusterChange::DeleteService(k) => {
                self.services.remove(k);
            }
        }
    }
}

/// The changes that turn `old` into `new`, deletions first.
pub fn diff(old: &Cluster, new: &Cluster) -> Vec<ClusterChange> {
    let mut out = Vec::new();
    out.extend(
        old.groups
            .keys()
            .filter(|k| !new.groups.contains_key(*k))
            .map(|k| ClusterChange::DeleteGroup(k.clone())),
    );
    out.extend(
        old.services
            .keys()
            .filter(|k| !new.services.contains_key(*k))
            .map(|k| ClusterChange::DeleteService(k.clone())),
    );
    out.extend(
        old.pods
            .keys()
            .filter(|k| !new.pods.contains_key(*k))
            .map(|k| ClusterChange::DeletePod(k.clone())),
    );
    out.extend(
        old.namespaces
            .keys()
            .filter(|k| !new.namespaces.contains_key(*k))
            .map(|k| ClusterChange::DeleteNamespace(k.clone())),
    );
    out.extend(
        old.nodes
            .iter()
            .filter(|k| !new.nodes.contains(*k))
            .map(|k| ClusterChange::DeleteNode(k.clone())),
    );
    out.extend(
        new.nodes
            .iter()
            .filter(|k| !old.nodes.contains(*k))
            .map(|k| ClusterChange::UpsertNode(k.clone())),
    );
    out.extend(
        new.namespaces
            .iter()
            .filter(|(k, v)| old.namespaces.get(*k) != Some(*v))
            .map(|(k, v)| ClusterChange::UpsertNamespace(k.clone(), v.clone())),
    );
    out.extend(
        new.pods
            .iter()
            .filter(|(k, v)| old.pods.get(*k) != Some(*v))
            .map(|(k, v)| ClusterChange::UpsertPod(k.clone(), v.clone())),
    );
    out.extend(
        new.services
            .iter()
            .filter(|(k, v)| old.services.get(*k) != Some(*v))
            .map(|(k, v)| ClusterChange::UpsertService(k.clone(), v.clone())),
    );
    out.extend(
        new.groups
            .iter()
            .filter(|(k, v)| old.groups.get(*k) != Some(*v))
            .map(|(k, v)| ClusterChange::UpsertGroup(k.clone(), v.clone())),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applying_the_diff_turns_old_into_new() {
        let mut old = Cluster::default();
        old.nodes.insert("n1".into());
        old.namespaces.insert("a".into(), Namespace::default());
        old.pods.insert(ObjectKey::new("a", "p"), Pod::default());
        old.pods.insert(ObjectKey::new("a", "gone"), Pod::default());
        old.services
            .insert(ObjectKey::new("a", "old-svc"), Service::default());
        let mut new = old.clone();
        new.nodes.insert("n2".into());
        new.pods.remove(&ObjectKey::new("a", "gone"));
        new.pods.get_mut(&ObjectKey::new("a", "p")).unwrap().uid = "changed".into();
        new.services.remove(&ObjectKey::new("a", "old-svc"));
        new.services.insert(
            ObjectKey::new("a", "svc"),
            Service {
                cluster_ips: vec!["10.96.0.1".parse().unwrap()],
                ..Service::default()
            },
        );
        let changes = diff(&old, &new);
        assert_eq!(changes.len(), 5);
        let mut applied = old.clone();
        for c in &changes {
            applied.apply(c);
        }
        assert_eq!(applied, new);
        assert!(diff(&new, &new).is_empty());
    }
}
