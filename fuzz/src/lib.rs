//! What the manifest targets share: a file's text read as the operator's manifests source reads
//! it, the cluster it describes compiled, and what the operator would push each node checked
//! against what the agent does with it.

use std::collections::BTreeSet;

use kubesg_agent::{convert, desired::DesiredState, tables};
use kubesg_operator::{
    compile::compile,
    manifests::{self, Object},
    model::Cluster,
    plan::NodePlan,
    wire,
};
use kubesg_proto::v1alpha1 as pb;

/// The objects of one manifest file (`manifests::parse`, which never panics), checked for what
/// every object the rest of the operator relies on has: a name, and a namespace when the object
/// is namespaced. `None`: the file is refused (its message is what the operator logs).
pub fn read_manifest(text: &str) -> Option<Vec<Object>> {
    let objects = match manifests::parse(text) {
        Ok(objects) => objects,
        Err(message) => {
            assert!(!message.is_empty(), "a refusal says why");
            return None;
        }
    };
    for object in &objects {
        match object {
            Object::Namespace(name, _) | Object::Node(name) => assert!(!name.is_empty()),
            Object::Pod(key, _) | Object::Service(key, _) | Object::Group(key, _) => {
                assert!(!key.namespace.is_empty() && !key.name.is_empty(), "{key:?}")
            }
        }
    }
    Some(objects)
}

/// The cluster `objects` describe, as `ManifestDir` assembles it (a later object wins; a group
/// whose manifest gives no generation is at generation 1).
pub fn cluster_of(objects: Vec<Object>) -> Cluster {
    let mut cluster = Cluster::default();
    for object in objects {
        match object {
            Object::Namespace(name, ns) => {
                cluster.namespaces.insert(name, ns);
            }
            Object::Pod(key, pod) => {
                cluster.pods.insert(key, pod);
            }
            Object::Node(name) => {
                cluster.nodes.insert(name);
            }
            Object::Service(key, svc) => {
                cluster.services.insert(key, svc);
            }
            Object::Group(key, mut group) => {
                if group.generation <= 0 {
                    group.generation = 1;
                }
                cluster.groups.insert(key, group);
            }
        }
    }
    cluster
}

/// The datapath settings the operator sends by default.
fn settings() -> pb::DatapathSettings {
    pb::DatapathSettings {
        recheck_on_policy_change: true,
    }
}

/// The agent's state after `update` on top of `state`: the operator's output must never be
/// refused (a NACK of a well-formed update leaves the node on old rules for ever).
fn agent_applies(state: &DesiredState, update: &pb::PolicyUpdate, what: &str) -> DesiredState {
    let converted = convert::update(update)
        .unwrap_or_else(|e| panic!("the agent cannot convert the operator's {what}: {e}"));
    state
        .apply(&converted)
        .unwrap_or_else(|e| panic!("the agent refuses the operator's {what}: {e}"))
}

/// Compiles `old` and `new` and checks, node by node, what the push server would send: each
/// snapshot is one the agent accepts, whose policies compile into the datapath's tables without
/// panicking, and the delta from `old` to `new` applied on top of `old`'s snapshot gives exactly
/// the state `new`'s snapshot gives (`wire`'s promise).
pub fn check_push(old: &Cluster, new: &Cluster) {
    let old_plan = compile(old);
    let new_plan = compile(new);
    let empty = NodePlan::default();
    let nodes: BTreeSet<&String> = old_plan.nodes.keys().chain(new_plan.nodes.keys()).collect();
    for node in nodes {
        let before = old_plan.nodes.get(node).unwrap_or(&empty);
        let after = new_plan.nodes.get(node).unwrap_or(&empty);
        let at_old = agent_applies(
            &DesiredState::default(),
            &wire::snapshot(before, 1, &settings()),
            "snapshot (old)",
        );
        let at_new = agent_applies(
            &DesiredState::default(),
            &wire::snapshot(after, 2, &settings()),
            "snapshot (new)",
        );
        for (i, policy) in at_new.policies.values().enumerate() {
            let _ = tables::compile(i as u32 + 1, policy);
        }
        for form in [wire::SetForm::Whole, wire::SetForm::Changes] {
            match wire::delta(before, after, 1, 2, form) {
                None => assert_eq!(before, after, "no delta between different plans"),
                Some(delta) => {
                    let by_delta = agent_applies(&at_old, &delta, "delta");
                    assert_eq!(
                        by_delta, at_new,
                        "node {node}: the delta ({form:?} sets) and the snapshot disagree"
                    );
                }
            }
        }
    }
}
