//! What the compiler produces: for each node, the pods on it with the policy each one uses and
//! those policies' rules, resolved to addresses and ports; for each group, what its status
//! reports. The push turns a node's plan into snapshots and deltas; the status writer turns the
//! group reports and the agents' acks into conditions.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ipnet::IpNet;

use crate::model::ObjectKey;

/// A policy's id: derived from its content, so pods whose groups compile to the same rules
/// share one policy, and an unchanged policy keeps its id across recompiles (nothing to push).
pub type PolicyId = String;

/// An address set's id: derived from what the set selects (a group's members, or the pods a
/// selector pair matches), so it stays put while the addresses in it change.
pub type SetId = String;

/// The addresses of an address set (/32 and /128 blocks of pods), sorted, without duplicates.
pub type AddressSet = Vec<IpNet>;

/// The protocol of a compiled rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleProtocol {
    /// Every protocol and port.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// ICMP.
    Icmp,
    /// ICMPv6.
    Icmpv6,
}

/// Ports (or ICMP messages) a compiled rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSpec {
    /// Destination ports `first..=last`.
    Range {
        /// First.
        first: u16,
        /// Last (inclusive).
        last: u16,
    },
    /// An ICMP type, one code or all.
    Icmp {
        /// Type.
        icmp_type: u8,
        /// Code; `None`: every code.
        code: Option<u8>,
    },
}

/// A block of peer addresses minus the blocks inside it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerBlock {
    /// The block (a single address is a /32 or /128).
    pub cidr: IpNet,
    /// Blocks inside `cidr` that are not allowed.
    pub except: Vec<IpNet>,
}

/// Where a rule comes from, as far as composing them goes: rules of one layer add up, and on a
/// pod that both kinds select each layer must allow a NEW connection (docs/architecture.md,
/// "NetworkPolicies").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layer {
    /// SecurityGroups.
    #[default]
    SecurityGroups,
    /// Kubernetes NetworkPolicies.
    NetworkPolicies,
}

impl Layer {
    /// The layer of a group's rules.
    pub fn of(kind: crate::model::GroupKind) -> Layer {
        if kind.is_network_policy() {
            Layer::NetworkPolicies
        } else {
            Layer::SecurityGroups
        }
    }
}

/// The layers that judge a pod's connections, per direction (a layer absent from a direction
/// does not constrain it; a direction with none allows everything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyLayers {
    /// For the connections the pod accepts, sorted.
    pub ingress: Vec<Layer>,
    /// For the connections the pod opens, sorted.
    pub egress: Vec<Layer>,
}

/// One compiled allow rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlannedRule {
    /// The layer it belongs to.
    pub layer: Layer,
    /// The protocol.
    pub protocol: RuleProtocol,
    /// Empty: every port of the protocol.
    pub ports: Vec<PortSpec>,
    /// Address blocks (ipBlocks, or everyone). Empty, with no sets: nobody (unresolved peers
    /// never widen access).
    pub peers: Vec<PeerBlock>,
    /// Address sets whose addresses are peers too, sorted: pod peers go through sets, so a
    /// pod's address change rewrites a set, not the policies that name it.
    pub sets: Vec<SetId>,
    /// Where it comes from, e.g. `shop/web ingress[0]`, for `kubesg-agent explain`.
    pub origin: String,
}

/// A group's generation a policy was compiled from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupGeneration {
    /// The group.
    pub group: ObjectKey,
    /// Its `metadata.generation`.
    pub generation: i64,
}

/// The compiled rules shared by the pods of one set of groups (and one resolution of named
/// ports).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PlannedPolicy {
    /// Rules for connections the pods accept.
    pub ingress: Vec<PlannedRule>,
    /// Rules for connections the pods open.
    pub egress: Vec<PlannedRule>,
    /// Every group whose generation this policy reflects: the groups the pods are members of and
    /// the groups their rules name as peers. The status reports a generation programmed on a node
    /// once the node acked a version carrying a policy that lists it.
    pub groups: BTreeSet<GroupGeneration>,
    /// `None` for the pods only SecurityGroups select: a NEW connection is allowed when any rule
    /// allows it. `Some` when a NetworkPolicy selects them: each listed layer must allow it.
    pub layers: Option<PolicyLayers>,
}

/// A pod on a node and the policy it uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodPlan {
    /// The pod's UID.
    pub uid: String,
    /// Its policy; `None`: a member of no group (tracked, not filtered).
    pub policy: Option<PolicyId>,
    /// The kubelet set its network up (it has an address) and is not tearing it down, so the
    /// node's agent must hold its endpoint: one it lacks runs without kubesg's programs
    /// ([`crate::coverage`]). Not sent to the agent.
    pub set_up: bool,
}

/// Everything one node's agent needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePlan {
    /// Every pod on the node that kubesg enforces (not host-network ones), members or not.
    pub pods: BTreeMap<ObjectKey, PodPlan>,
    /// The policies those pods use.
    /// Shared: a policy used on many nodes is kept once (150 000 pods with 9 200 distinct
    /// policies would otherwise hold 150 000 copies).
    pub policies: BTreeMap<PolicyId, Arc<PlannedPolicy>>,
    /// The address sets those policies' rules name. Shared like the policies.
    pub sets: BTreeMap<SetId, Arc<AddressSet>>,
}

impl NodePlan {
    /// Policy `id` with its rules' sets replaced by their addresses: what the agent enforces
    /// (tests and tools compare verdicts on it). A set the plan lacks adds nothing.
    pub fn resolved_policy(&self, id: &str) -> Option<PlannedPolicy> {
        let p = self.policies.get(id)?;
        let resolve = |rules: &[PlannedRule]| -> Vec<PlannedRule> {
            rules
                .iter()
                .map(|r| {
                    let mut peers = r.peers.clone();
                    for s in &r.sets {
                        if let Some(set) = self.sets.get(s) {
                            peers.extend(set.iter().map(|&cidr| PeerBlock {
                                cidr,
                                except: Vec::new(),
                            }));
                        }
                    }
                    peers.sort();
                    peers.dedup();
                    PlannedRule {
                        peers,
                        sets: Vec::new(),
                        ..r.clone()
                    }
                })
                .collect()
        };
        Some(PlannedPolicy {
            ingress: resolve(&p.ingress),
            egress: resolve(&p.egress),
            groups: p.groups.clone(),
            layers: p.layers.clone(),
        })
    }
}

/// What a group's status reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupReport {
    /// The generation compiled.
    pub generation: i64,
    /// `Ok`: the spec is valid; `Err`: why not (the `Accepted` condition's message). An invalid
    /// group contributes nothing (allows nothing, selects no member).
    pub accepted: Result<(), String>,
    /// Member pods.
    pub members: usize,
    /// Nodes with a member, or with a pod whose rules name this group as a peer.
    pub nodes: BTreeSet<String>,
}

/// The compiler's whole output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per node.
    pub nodes: BTreeMap<String, NodePlan>,
    /// Per group.
    pub groups: BTreeMap<ObjectKey, GroupReport>,
}
