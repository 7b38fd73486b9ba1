//! The operator's manifests source on valid YAML shaped like real manifests with random values:
//! the demo's groups and a small cluster around them (`fuzz/templates/cluster.yaml`), some
//! documents dropped, then values replaced, keys added or removed and list items copied or
//! dropped, as the input says. Each document is one file of the directory (a refused one
//! contributes nothing). A first cluster and a second (the first mutated again) are compiled and
//! checked as the `manifests` target checks one: snapshots the agent accepts, and the delta
//! between them equal to the second's snapshot (`kubesg_fuzz::check_push`).

#![no_main]

use std::sync::OnceLock;

use kubesg_operator::{manifests::Object, model::Cluster};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use serde::Deserialize as _;
use serde_yaml::{Mapping, Value};

const TEXTS: [&str; 9] = [
    include_str!("../templates/cluster.yaml"),
    include_str!("../../demo/manifests/client.yaml"),
    include_str!("../../demo/manifests/db.yaml"),
    include_str!("../../demo/manifests/dns-egress.yaml"),
    include_str!("../../demo/manifests/dns-networkpolicy.yaml"),
    include_str!("../../demo/manifests/dns.yaml"),
    include_str!("../../demo/manifests/lb.yaml"),
    include_str!("../../demo/manifests/server.yaml"),
    include_str!("../../demo/manifests/web.yaml"),
];

/// One document (one file of the directory) and what the manifests source reads of it.
#[derive(Clone)]
struct Doc {
    value: Value,
    /// `None`: changed since it was last read.
    read: Option<Option<Vec<Object>>>,
}

impl Doc {
    /// Its objects, reading it again only when it changed: a document the input leaves alone is
    /// not written and parsed again (most of the time an execution takes would go there).
    fn objects(&mut self) -> &Option<Vec<Object>> {
        let value = &self.value;
        self.read.get_or_insert_with(|| {
            serde_yaml::to_string(value)
                .ok()
                .and_then(|text| kubesg_fuzz::read_manifest(&text))
        })
    }
}

/// Every document of the templates, read.
fn templates() -> &'static [Doc] {
    static DOCS: OnceLock<Vec<Doc>> = OnceLock::new();
    DOCS.get_or_init(|| {
        TEXTS
            .iter()
            .flat_map(|text| serde_yaml::Deserializer::from_str(text))
            .map(|doc| Value::deserialize(doc).expect("the templates are YAML"))
            .filter(|v| !v.is_null())
            .map(|value| {
                let mut doc = Doc { value, read: None };
                doc.objects();
                doc
            })
            .collect()
    })
}

/// Keys the readers know (and a few they do not), for keys added to maps.
const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "generation",
    "deletionTimestamp",
    "spec",
    "status",
    "items",
    "podSelector",
    "namespaceSelector",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "ingress",
    "egress",
    "from",
    "to",
    "ports",
    "port",
    "endPort",
    "protocol",
    "icmpTypes",
    "type",
    "code",
    "ipBlock",
    "cidr",
    "except",
    "securityGroup",
    "policyTypes",
    "nodeName",
    "hostNetwork",
    "containers",
    "containerPort",
    "podIP",
    "podIPs",
    "ip",
    "phase",
    "selector",
    "clusterIP",
    "clusterIPs",
    "targetPort",
    "image",
    "unknownField",
];

/// Strings that mean something to some reader.
const STRINGS: &[&str] = &[
    "",
    "TCP",
    "UDP",
    "SCTP",
    "ICMP",
    "ICMPv6",
    "QUIC",
    "tcp",
    "http",
    "dns",
    "pg",
    "web",
    "db",
    "lb",
    "shop",
    "default",
    "node-a",
    "node-b",
    "In",
    "NotIn",
    "Exists",
    "DoesNotExist",
    "Ingress",
    "Egress",
    "Running",
    "Succeeded",
    "Failed",
    "0.0.0.0/0",
    "::/0",
    "10.0.0.0/8",
    "10.0.0.10/32",
    "10.0.0.10",
    "fd00::10",
    "fd00::/8",
    "10.0.0.1/33",
    "fd00::/129",
    "256.0.0.1",
    "10.0.0.0/-1",
    "v1",
    "kubesg.io/v1alpha1",
    "networking.k8s.io/v1",
    "Pod",
    "Namespace",
    "Node",
    "Service",
    "SecurityGroup",
    "NetworkPolicy",
    "List",
    "0",
    "-1",
    "65535",
    "65536",
    "a/b",
    "kubernetes.io/config.mirror",
    "2024-01-01T00:00:00Z",
];

/// Numbers at the edges of what the fields hold.
const NUMBERS: &[i64] = &[
    0,
    1,
    -1,
    3,
    8,
    53,
    80,
    128,
    255,
    256,
    1024,
    5432,
    8080,
    65535,
    65536,
    2147483647,
    2147483648,
    -2147483649,
    i64::MAX,
    i64::MIN,
];

fn scalar(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => Value::String((*u.choose(STRINGS)?).to_owned()),
        1 => Value::Number((*u.choose(NUMBERS)?).into()),
        2 => Value::Number(u.arbitrary::<i32>()?.into()),
        3 => Value::Bool(u.arbitrary()?),
        4 => Value::Null,
        5 => Value::Number(u.arbitrary::<f64>()?.into()),
        6 => Value::String(u.arbitrary::<&str>()?.chars().take(40).collect()),
        _ => {
            if u.arbitrary()? {
                Value::Sequence(Vec::new())
            } else {
                Value::Mapping(Mapping::new())
            }
        }
    })
}

/// One change somewhere in `v`: descend a random path, then change what is there.
fn mutate(u: &mut Unstructured, v: &mut Value) -> Result<()> {
    // Stop here, or go on into a child (a map's value, a list's item) when there is one.
    let descend = u.ratio(7u8, 8u8)?;
    match v {
        Value::Mapping(m) if descend && !m.is_empty() => {
            let i = u.choose_index(m.len())?;
            if let Some((_, child)) = m.iter_mut().nth(i) {
                return mutate(u, child);
            }
        }
        Value::Sequence(s) if descend && !s.is_empty() => {
            let i = u.choose_index(s.len())?;
            return mutate(u, &mut s[i]);
        }
        Value::Tagged(t) if descend => return mutate(u, &mut t.value),
        _ => {}
    }
    match (u.int_in_range(0..=3u8)?, v) {
        (0, Value::Mapping(m)) => {
            let key = Value::String((*u.choose(KEYS)?).to_owned());
            let value = scalar(u)?;
            m.insert(key, value);
        }
        (1, Value::Mapping(m)) if !m.is_empty() => {
            let i = u.choose_index(m.len())?;
            if let Some(key) = m.keys().nth(i).cloned() {
                m.remove(&key);
            }
        }
        (0, Value::Sequence(s)) if !s.is_empty() => {
            let i = u.choose_index(s.len())?;
            s.push(s[i].clone());
        }
        (1, Value::Sequence(s)) if !s.is_empty() => {
            let i = u.choose_index(s.len())?;
            s.remove(i);
        }
        (2, Value::Sequence(s)) => s.push(scalar(u)?),
        (_, v) => *v = scalar(u)?,
    }
    Ok(())
}

/// The templates, some dropped, then up to 8 changes.
fn first(u: &mut Unstructured) -> Result<Vec<Doc>> {
    let mut docs = Vec::new();
    for doc in templates() {
        // Most documents stay: a dropped one is a file removed.
        if u.ratio(7u8, 8u8)? {
            docs.push(doc.clone());
        }
    }
    change(u, &mut docs)?;
    Ok(docs)
}

fn change(u: &mut Unstructured, docs: &mut [Doc]) -> Result<()> {
    if docs.is_empty() {
        return Ok(());
    }
    for _ in 0..u.int_in_range(0..=8u8)? {
        let doc = &mut docs[u.choose_index(docs.len())?];
        doc.read = None;
        mutate(u, &mut doc.value)?;
    }
    Ok(())
}

/// The cluster of `docs`, each document one file as the manifests directory reads it.
fn cluster(docs: &mut [Doc]) -> Cluster {
    let mut objects = Vec::new();
    for doc in docs {
        objects.extend(doc.objects().iter().flatten().cloned());
    }
    kubesg_fuzz::cluster_of(objects)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mut old) = first(&mut u) else {
        return;
    };
    let old_cluster = cluster(&mut old);
    let mut new = old;
    if change(&mut u, &mut new).is_err() {
        return;
    }
    kubesg_fuzz::check_push(&old_cluster, &cluster(&mut new));
});
