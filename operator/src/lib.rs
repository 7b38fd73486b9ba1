//! The kubesg operator as a library: the SecurityGroup API, the compiler from cluster objects to
//! per-node rule sets, the push to agents and the status writer. `main.rs` only wires them.

#![warn(missing_docs)]
pub mod changes;
pub mod compile;
pub mod coverage;
pub mod crd;
pub mod crdgen;
pub mod daemon;
mod fingerprint;
mod index;
pub mod kube_source;
pub mod leader;
pub mod manifest_source;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netpol;
pub mod node_identity;
pub mod node_taint;
pub mod objects;
mod peers;
pub mod plan;
mod policy;
pub mod push;
pub mod reference;
pub mod runtime;
pub mod selector;
mod services;
mod sets;
pub mod status;
pub mod status_api;
pub mod status_controller;
pub mod status_files;
pub mod status_writer;
pub mod tls;
pub mod validate;
pub mod wire;
