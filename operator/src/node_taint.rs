//! The `kubesg.io/agent-not-ready` taint, as Cilium's `node.cilium.io/agent-not-ready`: a node
//! registered with it (`kubelet --register-with-taints=kubesg.io/agent-not-ready=:NoSchedule`)
//! gets no pods that do not tolerate it until kubesg enforces there, so no pod of a new node
//! starts before its agent and runs unenforced. The operator removes it once the node's agent
//! has acked a plan (it is connected and applied what the operator placed there), rather than
//! the agent itself: agents then need no right to patch Node objects, which a compromised node
//! could use on every other node.
//!
//! Only the leader removes taints. A node is checked when its agent becomes connected and acked
//! (a new agent, a restarted one, a new leader's first look), not at every ack: one GET per
//! agent connection.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    api::{Api, Patch, PatchParams},
    Client,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::push::PushServer;

/// The taint's key.
pub const AGENT_NOT_READY: &str = "kubesg.io/agent-not-ready";

/// Removes the taint from each node whose agent is connected and acked a plan, while
/// `leading`; runs until `stop`.
pub async fn run(
    client: Client,
    push: PushServer,
    mut leading: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let nodes: Api<Node> = Api::all(client);
    let mut changes = push.subscribe();
    // Nodes checked since their agent became ready; forgotten when it is not any more.
    let mut checked: BTreeSet<String> = BTreeSet::new();
    loop {
        if *leading.borrow_and_update() {
            let ready: BTreeSet<String> = push
                .node_statuses()
                .into_iter()
                .filter(|(_, s)| s.connected && s.acked.is_some())
                .map(|(node, _)| node)
                .collect();
            checked.retain(|n| ready.contains(n));
            for node in ready.difference(&checked.clone()) {
                match untaint(&nodes, node).await {
                    Ok(()) => {
                        checked.insert(node.clone());
                    }
                    Err(e) => warn!(node = %node, error = %e,
                        "could not remove the {AGENT_NOT_READY} taint; trying again at the next change"),
                }
            }
        } else {
            // A new leader looks at every node again.
            checked.clear();
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            changed = leading.changed() => if changed.is_err() { return },
        }
    }
}

/// Removes the taint from `node` if it has it. The patch carries the resourceVersion read, so
/// the API server applies it only to that version (409 Conflict otherwise, retried at the next
/// change): a taint another controller added meanwhile is never dropped.
async fn untaint(nodes: &Api<Node>, node: &str) -> Result<(), kube::Error> {
    let Some(object) = nodes.get_opt(node).await? else {
        return Ok(());
    };
    let taints: Vec<Taint> = object.spec.and_then(|s| s.taints).unwrap_or_default();
    let kept: Vec<&Taint> = taints.iter().filter(|t| t.key != AGENT_NOT_READY).collect();
    if kept.len() == taints.len() {
        return Ok(());
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": object.metadata.resource_version },
        "spec": { "taints": kept },
    });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    info!(node = %node, "the node's agent enforces: removed the {AGENT_NOT_READY} taint");
    Ok(())
}
