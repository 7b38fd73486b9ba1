//! The kubesg operator as a library: the SecurityGroup API, the compiler from cluster objects to
//! per-node rule sets, the push to agents and the status writer. `main.rs` only wires them.

pub mod changes;
pub mod crd;
pub mod crdgen;
pub mod kube_source;
pub mod manifests;
pub mod model;
pub mod objects;
pub mod plan;
pub mod status;
