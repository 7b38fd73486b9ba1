//! A directory of manifests standing in for the Kubernetes API (`--manifests DIR`): Namespace,
//! Pod, Node, Service, SecurityGroup and NetworkPolicy YAML (multi-document files and `kind: List` included), re-read
//! when files change. It feeds the same model and the same compile-and-push path as the API.
//!
//! Nothing is lost to a bad edit: a file that does not parse is reported and its previous
//! content stays in force until it parses again, as a failed `kubectl apply` leaves the cluster.
//! Manifests carry no server-side generation, so this source keeps one per group and bumps it
//! when the group's spec changes.

use std::{
    collections::{hash_map::DefaultHasher, BTreeMap, BTreeSet},
    fs,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Namespace as K8sNamespace, Node, Pod as K8sPod, Service as K8sService},
    networking::v1::NetworkPolicy,
};
use kube::api::DynamicObject;
use serde::Deserialize;

use crate::{
    model::{Cluster, Group, Namespace, ObjectKey, Pod, Service},
    netpol, objects,
};

/// One object read from a file. Public only for the fuzz target that feeds [`parse`] any text
/// (`fuzz/fuzz_targets/manifests.rs`); the operator itself reads them through [`ManifestDir`].
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A Namespace: its name and what the model keeps of it.
    Namespace(String, Namespace),
    /// A Pod (in `default` when its manifest names no namespace).
    Pod(ObjectKey, Pod),
    /// A Node, by name.
    Node(String),
    /// A Service (in `default` when its manifest names no namespace).
    Service(ObjectKey, Service),
    /// A SecurityGroup, or a NetworkPolicy read as a group ([`netpol::is_key`]).
    Group(ObjectKey, Group),
}

/// A problem with a file (its previous content, if any, stays in force).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// What is wrong, with the document number when it is about one document.
    pub message: String,
}

#[derive(Debug)]
struct FileState {
    fingerprint: u64,
    objects: Vec<Object>,
}

/// The directory and what was last read from it.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    generations: BTreeMap<ObjectKey, (u64, i64)>,
    problems: BTreeMap<PathBuf, String>,
    parses: u64,
    scans: u64,
}

/// What a scan found.
#[derive(Debug)]
pub struct Scan {
    /// Whether anything changed since the previous scan (files added, changed or removed).
    pub changed: bool,
    /// The cluster the directory describes now.
    pub cluster: Cluster,
    /// Files that could not be read, as of this scan.
    pub problems: Vec<Problem>,
}

const DEFAULT_NAMESPACE: &str = "default";

impl ManifestDir {
    /// The directory `dir` (read on the first [`ManifestDir::scan`]).
    pub fn new(dir: &Path) -> Self {
        ManifestDir {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            generations: BTreeMap::new(),
            problems: BTreeMap::new(),
            parses: 0,
            scans: 0,
        }
    }

    /// Reads the whole directory again, re-parses the files whose content changed and returns
    /// the cluster they describe: the first read, and the fallback when the file-system
    /// notifications cannot say which files changed.
    pub fn scan(&mut self) -> std::io::Result<Scan> {
        self.scans += 1;
        let mut paths = Vec::new();
        collect(&self.dir, &mut paths)?;
        paths.sort();
        let mut changed = false;
        let before: Vec<PathBuf> = self.files.keys().cloned().collect();
        for gone in before.iter().filter(|p| !paths.contains(p)) {
            self.files.remove(gone);
            self.problems.remove(gone);
            changed = true;
        }
        for path in &paths {
            changed |= self.read(path);
        }
        Ok(self.finish(changed))
    }

    /// Reads only `paths` again (files the notifications named: written, created, moved in or
    /// out, removed) and returns the cluster the directory describes now. A path that is not a
    /// manifest file this directory reads (a directory, a hidden or non-YAML name) must go to
    /// [`ManifestDir::scan`] instead: see [`ManifestDir::is_manifest_path`].
    pub fn update(&mut self, paths: &BTreeSet<PathBuf>) -> Scan {
        let mut changed = false;
        for path in paths {
            if path.is_file() {
                changed |= self.read(path);
            } else {
                // Gone (removed, or moved out): its objects go with it, and those of the files
                // under it if it was a directory with a manifest's name.
                let gone: Vec<PathBuf> = self.read_under(path).cloned().collect();
                for f in gone {
                    changed |= self.files.remove(&f).is_some();
                    self.problems.remove(&f);
                }
            }
        }
        self.finish(changed)
    }

    /// Whether `path` names a file this directory reads (or read) itself, so that a change to it
    /// is handled by [`ManifestDir::update`]: under the directory, no hidden component, a YAML or
    /// JSON name, and not a directory now.
    pub fn is_manifest_path(&self, path: &Path) -> bool {
        let Ok(relative) = path.strip_prefix(&self.dir) else {
            return false;
        };
        let visible = relative
            .components()
            .all(|c| !c.as_os_str().to_string_lossy().starts_with('.'));
        visible && is_manifest_name(path) && !path.is_dir()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether files under `path` (a directory) were read: a directory removed or moved away
    /// takes them with it.
    pub fn holds_under(&self, path: &Path) -> bool {
        self.read_under(path).any(|f| f != path)
    }

    /// The files read (parsed, or found wrong) at `path` or under it.
    fn read_under<'a>(&'a self, path: &'a Path) -> impl Iterator<Item = &'a PathBuf> + 'a {
        self.files
            .keys()
            .chain(self.problems.keys())
            .filter(move |f| f.starts_with(path))
    }

    /// How many times a file was parsed since this directory was opened: a change must cost the
    /// files it touched, not the directory.
    pub fn parses(&self) -> u64 {
        self.parses
    }

    /// How many times the whole directory was read since it was opened ([`ManifestDir::scan`]).
    pub fn scans(&self) -> u64 {
        self.scans
    }

    /// Reads `path` and parses it when its content changed; whether the directory's objects
    /// changed.
    fn read(&mut self, path: &Path) -> bool {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                self.problems.insert(path.to_path_buf(), e.to_string());
                return false;
            }
        };
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        let fingerprint = h.finish();
        if self
            .files
            .get(path)
            .is_some_and(|f| f.fingerprint == fingerprint)
        {
            return false;
        }
        self.parses += 1;
        match parse(&String::from_utf8_lossy(&bytes)) {
            Ok(objects) => {
                self.files.insert(
                    path.to_path_buf(),
                    FileState {
                        fingerprint,
                        objects,
                    },
                );
                self.problems.remove(path);
                true
            }
            Err(message) => {
                // Reported through `Scan::problems` (the manifests source logs them).
                self.problems.insert(path.to_path_buf(), message);
                false
            }
        }
    }

    fn finish(&mut self, changed: bool) -> Scan {
        let (cluster, duplicates) = self.assemble();
        let mut problems: Vec<Problem> = self
            .problems
            .iter()
            .map(|(file, message)| Problem {
                file: file.clone(),
                message: message.clone(),
            })
            .collect();
        problems.extend(duplicates);
        Scan {
            changed,
            cluster,
            problems,
        }
    }

    /// The cluster from every file's objects; a later file wins over an earlier one for the same
    /// object, and the duplicate is reported.
    fn assemble(&mut self) -> (Cluster, Vec<Problem>) {
        let mut cluster = Cluster::default();
        let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for (path, file) in &self.files {
            for object in &file.objects {
                let id = match object {
                    Object::Namespace(n, _) => format!("Namespace {n}"),
                    Object::Pod(k, _) => format!("Pod {k}"),
                    Object::Node(n) => format!("Node {n}"),
                    Object::Service(k, _) => format!("Service {k}"),
                    Object::Group(k, _) if netpol::is_key(k) => netpol::describe(k),
                    Object::Group(k, _) => format!("SecurityGroup {k}"),
                };
                if let Some(first) = seen.insert(id.clone(), path.clone()) {
                    duplicates.push(Problem {
                        file: path.clone(),
                        message: format!(
                            "{id} is also defined in {}; this one wins",
                            first.display()
                        ),
                    });
                }
                match object {
                    Object::Namespace(n, ns) => {
                        cluster.namespaces.insert(n.clone(), ns.clone());
                    }
                    Object::Pod(k, p) => {
                        cluster.pods.insert(k.clone(), p.clone());
                    }
                    Object::Node(n) => {
                        cluster.nodes.insert(n.clone());
                    }
                    Object::Service(k, s) => {
                        cluster.services.insert(k.clone(), s.clone());
                    }
                    Object::Group(k, g) => {
                        cluster.groups.insert(k.clone(), g.clone());
                    }
                }
            }
        }
        for (key, group) in cluster.groups.iter_mut() {
            if group.generation > 0 {
                continue; // the manifest says
            }
            let mut h = DefaultHasher::new();
            format!("{:?} {:?}", group.spec, group.unreadable).hash(&mut h);
            let spec_hash = h.finish();
            let entry = self
                .generations
                .entry(key.clone())
                .or_insert((spec_hash, 1));
            if entry.0 != spec_hash {
                *entry = (spec_hash, entry.1 + 1);
            }
            group.generation = entry.1;
        }
        (cluster, duplicates)
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect(&path, out)?;
        } else if is_manifest_name(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Whether `path` has a manifest's extension (`.yaml`, `.yml`, `.json`).
pub fn is_manifest_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
}

#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Every object of a (multi-document) file, or what is wrong with it. Unknown kinds are an
/// error: a typo must not silently remove objects. Public only so that the fuzz target
/// (`fuzz/fuzz_targets/manifests.rs`) can feed it any text, as an edit in the directory would.
pub fn parse(text: &str) -> Result<Vec<Object>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        object(value, &mut out).map_err(|e| format!("document {}: {e}", i + 1))?;
    }
    Ok(out)
}

fn object(value: serde_yaml::Value, out: &mut Vec<Object>) -> Result<(), String> {
    let meta: TypeMeta = serde_yaml::from_value(value.clone()).map_err(|e| e.to_string())?;
    let typed = |e: serde_yaml::Error| format!("{} {}: {e}", meta.api_version, meta.kind);
    match (meta.api_version.as_str(), meta.kind.as_str()) {
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(|v| v.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                object(item, out)?;
            }
        }
        ("v1", "Namespace") => {
            let ns: K8sNamespace = serde_yaml::from_value(value).map_err(typed)?;
            let (name, model) = objects::namespace(&ns).map_err(|e| e.to_string())?;
            out.push(Object::Namespace(name, model));
        }
        ("v1", "Pod") => {
            let mut pod: K8sPod = serde_yaml::from_value(value).map_err(typed)?;
            if pod.metadata.namespace.is_none() {
                pod.metadata.namespace = Some(DEFAULT_NAMESPACE.into());
            }
            let (key, model) = objects::pod(&pod).map_err(|e| e.to_string())?;
            out.push(Object::Pod(key, model));
        }
        ("v1", "Node") => {
            let node: Node = serde_yaml::from_value(value).map_err(typed)?;
            let name = node.metadata.name.unwrap_or_default();
            if name.is_empty() {
                return Err("a Node without a name".into());
            }
            out.push(Object::Node(name));
        }
        ("v1", "Service") => {
            let mut svc: K8sService = serde_yaml::from_value(value).map_err(typed)?;
            if svc.metadata.namespace.is_none() {
                svc.metadata.namespace = Some(DEFAULT_NAMESPACE.into());
            }
            let (key, model) = objects::service(&svc).map_err(|e| e.to_string())?;
            out.push(Object::Service(key, model));
        }
        ("kubesg.io/v1alpha1", "SecurityGroup") => {
            // Its spec read on its own, as the API source reads it: one this version cannot
            // read is a group that is not Accepted, with the field in its status.
            let mut sg: DynamicObject = serde_yaml::from_value(value).map_err(typed)?;
            if sg.metadata.namespace.is_none() {
                sg.metadata.namespace = Some(DEFAULT_NAMESPACE.into());
            }
            let (key, model) = objects::stored_group(&sg).map_err(|e| e.to_string())?;
            out.push(Object::Group(key, model));
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let mut np: NetworkPolicy = serde_yaml::from_value(value).map_err(typed)?;
            if np.metadata.namespace.is_none() {
                np.metadata.namespace = Some(DEFAULT_NAMESPACE.into());
            }
            let (key, model) = netpol::group(&np).map_err(|e| e.to_string())?;
            out.push(Object::Group(key, model));
        }
        (api, kind) => {
            return Err(format!(
                "unsupported object {api} {kind}: expected v1 Namespace, Pod, Node, Service or \
                 List, kubesg.io/v1alpha1 SecurityGroup or networking.k8s.io/v1 NetworkPolicy"
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir()
                .join(format!("kubesg-manifests-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { team: a } }
---
apiVersion: v1
kind: Node
metadata: { name: node-1 }
---
apiVersion: v1
kind: Pod
metadata: { name: web-0, namespace: shop, uid: u1, labels: { app: web } }
spec:
  nodeName: node-1
  containers:
    - name: web
      image: nginx
      ports: [ { name: http, containerPort: 8080 }, { name: dns, containerPort: 53, protocol: UDP } ]
status:
  podIPs: [ { ip: 10.0.0.5 }, { ip: "fd00::5" } ]
---
apiVersion: kubesg.io/v1alpha1
kind: SecurityGroup
metadata: { name: web, namespace: shop }
spec:
  podSelector: { matchLabels: { app: web } }
  ingress:
    - protocol: TCP
      ports: [ { port: http } ]
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  selector: { app: web }
  clusterIPs: [ 10.96.0.20 ]
  ports: [ { port: 80, targetPort: http } ]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: web-from-shop, namespace: shop }
spec:
  podSelector: { matchLabels: { app: web } }
  ingress:
    - from: [ { podSelector: {} } ]
      ports: [ { port: http } ]
"#;

    #[test]
    fn a_directory_of_manifests_becomes_the_cluster() {
        let d = TempDir::new("read");
        fs::write(d.0.join("cluster.yaml"), CLUSTER).unwrap();
        let mut m = ManifestDir::new(&d.0);
        let s = m.scan().unwrap();
        assert!(s.changed);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let c = s.cluster;
        assert_eq!(c.namespaces["shop"].labels["team"], "a");
        assert!(c.nodes.contains("node-1"));
        let pod = &c.pods[&ObjectKey::new("shop", "web-0")];
        assert_eq!(pod.node.as_deref(), Some("node-1"));
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.ports.len(), 2);
        assert_eq!(pod.uid, "u1");
        let g = &c.groups[&ObjectKey::new("shop", "web")];
        assert_eq!(g.generation, 1);
        let svc = &c.services[&ObjectKey::new("shop", "web")];
        assert_eq!(
            svc.cluster_ips,
            ["10.96.0.20".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(svc.selector["app"], "web");
        let np = &c.groups[&crate::netpol::key("shop", "web-from-shop")];
        assert!(np.kind.is_network_policy());
        assert_eq!(np.generation, 1);
        assert_eq!(np.spec.ingress.as_ref().map(Vec::len), Some(1));
        assert!(!m.scan().unwrap().changed, "nothing changed on disk");
    }

    #[test]
    fn a_network_policy_kubesg_cannot_read_is_reported_and_its_previous_version_kept() {
        let d = TempDir::new("badnp");
        let file = d.0.join("cluster.yaml");
        fs::write(&file, CLUSTER).unwrap();
        let mut m = ManifestDir::new(&d.0);
        m.scan().unwrap();
        fs::write(
            &file,
            CLUSTER.replace(
                "from: [ { podSelector: {} } ]\n      ports: [ { port: http } ]",
                "from: [ { podSelector: {} } ]\n      ports: [ { port: http, protocol: QUIC } ]",
            ),
        )
        .unwrap();
        let s = m.scan().unwrap();
        assert_eq!(s.problems.len(), 1, "{:?}", s.problems);
        assert!(
            s.problems[0]
                .message
                .contains("NetworkPolicy shop/web-from-shop")
                && s.problems[0].message.contains("QUIC"),
            "{}",
            s.problems[0].message
        );
        let np = &s.cluster.groups[&crate::netpol::key("shop", "web-from-shop")];
        assert_eq!(np.generation, 1, "the previous version stays in force");
    }

    #[test]
    fn a_spec_change_bumps_the_generation_and_a_broken_file_keeps_its_last_content() {
        let d = TempDir::new("edit");
        let file = d.0.join("cluster.yaml");
        fs::write(&file, CLUSTER).unwrap();
        let mut m = ManifestDir::new(&d.0);
        m.scan().unwrap();
        fs::write(&file, CLUSTER.replace("port: http", "port: 8443")).unwrap();
        let s = m.scan().unwrap();
        assert!(s.changed);
        assert_eq!(
            s.cluster.groups[&ObjectKey::new("shop", "web")].generation,
            2
        );
        fs::write(&file, "apiVersion: v1\nkind: Pod\nmetadata: [oops").unwrap();
        let s = m.scan().unwrap();
        assert!(!s.changed);
        assert_eq!(s.problems.len(), 1);
        assert!(s
            .cluster
            .pods
            .contains_key(&ObjectKey::new("shop", "web-0")));
        assert_eq!(
            s.cluster.groups[&ObjectKey::new("shop", "web")].generation,
            2
        );
    }

    #[test]
    fn a_security_group_this_version_cannot_read_is_a_group_not_a_problem() {
        let d = TempDir::new("unreadable");
        fs::write(
            d.0.join("sg.yaml"),
            "apiVersion: kubesg.io/v1alpha1\nkind: SecurityGroup\nmetadata: { name: web }\n\
             spec:\n  podSelector: {}\n  ingress:\n  - ports: [{ port: 4294967296 }]\n",
        )
        .unwrap();
        let s = ManifestDir::new(&d.0).scan().unwrap();
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let g = &s.cluster.groups[&ObjectKey::new(DEFAULT_NAMESPACE, "web")];
        let why = g.unreadable.as_ref().expect("unreadable");
        assert_eq!(why.path, "spec.ingress[0].ports[0].port");
        assert_eq!(g.generation, 1);
    }

    #[test]
    fn unknown_kinds_are_reported_not_ignored() {
        let d = TempDir::new("unknown");
        fs::write(
            d.0.join("x.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: x }\n",
        )
        .unwrap();
        let s = ManifestDir::new(&d.0).scan().unwrap();
        assert!(s.problems[0]
            .message
            .contains("unsupported object apps/v1 Deployment"));
    }

    #[test]
    fn removing_a_file_removes_its_objects() {
        let d = TempDir::new("remove");
        fs::write(d.0.join("a.yaml"), CLUSTER).unwrap();
        let mut m = ManifestDir::new(&d.0);
        assert_eq!(m.scan().unwrap().cluster.pods.len(), 1);
        fs::remove_file(d.0.join("a.yaml")).unwrap();
        let s = m.scan().unwrap();
        assert!(s.changed);
        assert!(s.cluster.pods.is_empty());
    }
}
