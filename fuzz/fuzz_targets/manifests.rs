//! The operator's manifests source on any text: a file of the manifests directory read
//! (`kubesg_operator::manifests::parse`: multi-document YAML, `kind: List`, every kind it knows)
//! never panics and refuses what it cannot read with a message; what it accepts, compiled, gives
//! each node a snapshot the agent accepts and a delta equal to it (see `kubesg_fuzz::check_push`).
//!
//! The text is the bytes read as the source reads them (lossily as UTF-8).

#![no_main]

use kubesg_operator::model::Cluster;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(objects) = kubesg_fuzz::read_manifest(&text) {
        let cluster = kubesg_fuzz::cluster_of(objects);
        kubesg_fuzz::check_push(&Cluster::default(), &cluster);
    }
});
