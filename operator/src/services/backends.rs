//! A Service's backends: the pods its selector matches that can receive its connections, and
//! where each of its ports sends on each of them. Found once per Service and change, then read
//! by every group that judges it.

use crate::{
    index::{Backends, Index, ServiceEntry, StoredPod, Targets},
    model::{ServicePort, TargetPort},
};

/// The port a Service port sends to on backend `b`; `None` when a named target port is not
/// one of the backend's container ports (with the Service port's protocol). The first
/// container port of that name wins, as kube-proxy's endpoints take it.
fn target_port(p: &ServicePort, b: &StoredPod) -> Option<u16> {
    match &p.target_port {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => b
            .ports
            .iter()
            .find(|np| np.name == *name && np.protocol == p.protocol)
            .map(|np| np.port),
    }
}

/// The backends of Service `s` of namespace `ns`, as the index has the cluster now: the pods
/// there its selector matches that hold an address and are not finished (host-network ones
/// included: they are endpoints too, at the node's address), with where each port sends.
pub(crate) fn find_backends(ix: &Index, ns: &str, s: &ServiceEntry) -> Backends {
    let mut pods = Vec::new();
    if let Some(sel) = s.resolvable() {
        ix.for_each_pod_matching(ns, Some(sel), |id, p| {
            if !p.deleted && !p.pod.terminated && !p.pod.ips.is_empty() {
                pods.push(id);
            }
        });
    }
    pods.sort_unstable();
    let targets = s
        .service
        .ports
        .iter()
        .map(|sp| {
            let each: Vec<Option<u16>> = pods
                .iter()
                .map(|&id| ix.pod(id).and_then(|p| target_port(sp, &p.pod)))
                .collect();
            let mut distinct: Vec<u16> = each.iter().flatten().copied().collect();
            distinct.sort_unstable();
            distinct.dedup();
            Targets { each, distinct }
        })
        .collect();
    Backends { pods, targets }
}
