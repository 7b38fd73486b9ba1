//! Compiled rules: what the operator sends for one policy (the set of security groups a pod
//! belongs to), already resolved to addresses and ports. This is the agent's domain model; the
//! gRPC types are converted into it at the edge.
//!
//! Semantics, as the datapath enforces them: a NEW connection in a direction is allowed iff some
//! rule of that direction matches its protocol, its destination port (or ICMP type/code) and the
//! remote address. A rule with no peers matches nobody (unresolved peers never widen access); a
//! rule with no ports matches every port of its protocol.
//!
//! A *layered* policy (security groups and NetworkPolicies on one pod) asks that question once per
//! layer listed for the direction: allowed iff each listed layer has a rule allowing it (none
//! listed: everything is allowed). A connection the node itself opens to the pod skips the
//! NetworkPolicies layer (the NetworkPolicy API lets a node reach its pods, e.g. kubelet probes).

use std::net::IpAddr;

use ipnet::IpNet;
use kubesg_common::{policy as layers, proto, Direction};
use serde::{Deserialize, Serialize};

/// The protocol a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// Every IP protocol, every port.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// ICMP (IPv4).
    Icmp,
    /// ICMPv6.
    Icmpv6,
    /// Another IP protocol by number (no ports).
    Number(u8),
}

impl Protocol {
    /// The IP protocol number, `None` for [`Protocol::Any`].
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Any => None,
            Protocol::Tcp => Some(proto::TCP),
            Protocol::Udp => Some(proto::UDP),
            Protocol::Sctp => Some(proto::SCTP),
            Protocol::Icmp => Some(proto::ICMP),
            Protocol::Icmpv6 => Some(proto::ICMPV6),
            Protocol::Number(n) => Some(n),
        }
    }

    /// Whether the protocol has ports (TCP, UDP, SCTP).
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
    }

    /// Whether the protocol is ICMP or ICMPv6 (matched by type and code).
    pub fn is_icmp(self) -> bool {
        matches!(self, Protocol::Icmp | Protocol::Icmpv6)
    }
}

/// Which ports (or ICMP messages) of its protocol a rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PortMatch {
    /// Destination ports `first..=last` (TCP, UDP, SCTP).
    Range {
        /// First port.
        first: u16,
        /// Last port (inclusive).
        last: u16,
    },
    /// An ICMP type, with one code or any code.
    Icmp {
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code; `None` matches every code.
        code: Option<u8>,
    },
}

/// A block of remote addresses: `cidr` minus the `except` blocks inside it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerBlock {
    /// The block.
    pub cidr: IpNet,
    /// Blocks inside `cidr` that are not allowed.
    pub except: Vec<IpNet>,
}

impl PeerBlock {
    /// A block with no exceptions.
    pub fn cidr(cidr: IpNet) -> Self {
        PeerBlock {
            cidr: cidr.trunc(),
            except: Vec::new(),
        }
    }

    /// Whether `addr` is in the block and in none of its exceptions.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.cidr.contains(&addr) && !self.except.iter().any(|e| e.contains(&addr))
    }
}

/// The kind of policy object a rule comes from. In a layered policy rules add up within a layer
/// and layers intersect.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Layer {
    /// SecurityGroups (the default: every rule before NetworkPolicies).
    #[default]
    SecurityGroups,
    /// Kubernetes NetworkPolicies.
    NetworkPolicies,
}

impl Layer {
    /// The layer's index in the datapath ([`layers::LAYER_SECURITY_GROUPS`],
    /// [`layers::LAYER_NETWORK_POLICIES`]).
    pub fn index(self) -> u8 {
        match self {
            Layer::SecurityGroups => layers::LAYER_SECURITY_GROUPS,
            Layer::NetworkPolicies => layers::LAYER_NETWORK_POLICIES,
        }
    }

    /// The layer of a datapath index, `None` for an unknown one.
    pub fn of_index(i: u8) -> Option<Layer> {
        match i {
            layers::LAYER_SECURITY_GROUPS => Some(Layer::SecurityGroups),
            layers::LAYER_NETWORK_POLICIES => Some(Layer::NetworkPolicies),
            _ => None,
        }
    }

    /// Whether a connection the node opens towards the pod skips this layer in `dir`.
    pub fn host_exempt(self, dir: Direction) -> bool {
        layers::host_exempt(dir, self.index())
    }

    /// How `explain` names the layer.
    pub fn name(self) -> &'static str {
        match self {
            Layer::SecurityGroups => "security groups",
            Layer::NetworkPolicies => "network policies",
        }
    }
}

/// One allow rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// The protocol.
    pub protocol: Protocol,
    /// Ports or ICMP messages; empty means all of them. Must be empty for protocols without ports.
    pub ports: Vec<PortMatch>,
    /// Remote addresses; empty matches nobody.
    pub peers: Vec<PeerBlock>,
    /// Where the rule comes from (e.g. `shop/web ingress[0]`), for `explain`; not used to match.
    #[serde(default)]
    pub origin: String,
    /// The layer the rule belongs to; only a layered policy reads it (older stored state has
    /// none: security groups).
    #[serde(default)]
    pub layer: Layer,
}

impl Rule {
    /// Whether the rule allows a connection with `remote` on protocol `proto` to `port` (the
    /// destination port, or `type << 8 | code` for ICMP).
    pub fn allows(&self, proto: u8, port: u16, remote: IpAddr) -> bool {
        let proto_ok = match self.protocol.number() {
            None => true,
            Some(p) => p == proto,
        };
        proto_ok
            && (self.protocol == Protocol::Any
                || self.ports.is_empty()
                || self.ports.iter().any(|m| m.matches(port)))
            && self.peers.iter().any(|b| b.contains(remote))
    }
}

impl PortMatch {
    /// Whether this match allows `port` (a port, or `type << 8 | code` for ICMP).
    pub fn matches(&self, port: u16) -> bool {
        match *self {
            PortMatch::Range { first, last } => first <= port && port <= last,
            PortMatch::Icmp { icmp_type, code } => {
                (port >> 8) as u8 == icmp_type && code.is_none_or(|c| c == port as u8)
            }
        }
    }
}

/// The compiled rules of one policy: every endpoint with the same set of groups shares it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledPolicy {
    /// Rules for connections the pod accepts.
    pub ingress: Vec<Rule>,
    /// Rules for connections the pod opens.
    pub egress: Vec<Rule>,
    /// Stateless (UNTRACKED): every packet is judged by the rules of its direction and nothing is
    /// tracked, so replies need rules of their own, like a network ACL.
    pub stateless: bool,
    /// Judged layer by layer (see the module's documentation); `false` for every policy of a pod
    /// no NetworkPolicy selects, and for state stored by older agents.
    #[serde(default)]
    pub layered: bool,
    /// With `layered`: the layers that must each allow a connection the pod accepts.
    #[serde(default)]
    pub ingress_layers: Vec<Layer>,
    /// With `layered`: the layers that must each allow a connection the pod opens.
    #[serde(default)]
    pub egress_layers: Vec<Layer>,
}

/// What one layer of a layered policy says about a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerOutcome {
    /// Allowed by this rule (index in its direction).
    Allowed(usize),
    /// The layer is skipped: the node's own connection to the pod (NetworkPolicies, ingress).
    HostExempt,
    /// No rule of the layer allows it.
    Refused,
}

/// The reference verdict on a NEW connection, with what decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// Unlayered policy: the first rule allowing it, `None` when none does.
    Rules(Option<usize>),
    /// Layered policy: each layer required in the direction, in order, with its outcome
    /// (empty: no layer is required, so everything is allowed).
    Layers(Vec<(Layer, LayerOutcome)>),
}

impl Judgement {
    /// Whether the connection is allowed.
    pub fn allowed(&self) -> bool {
        match self {
            Judgement::Rules(r) => r.is_some(),
            Judgement::Layers(ls) => ls.iter().all(|(_, o)| *o != LayerOutcome::Refused),
        }
    }
}

/// Why a policy's layers cannot be enforced; each is refused rather than guessed at.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayersError {
    /// A layer listed twice for a direction.
    #[error("{0:?} layers list {1:?} twice")]
    Duplicate(Direction, Layer),
    /// More layers than the datapath holds per direction.
    #[error("{0:?} lists {1} layers, at most {max} exist", max = layers::MAX_LAYERS)]
    TooMany(Direction, usize),
}

impl CompiledPolicy {
    /// The layers required in `dir` (meaningful when `layered`).
    pub fn layers(&self, dir: Direction) -> &[Layer] {
        match dir {
            Direction::Ingress => &self.ingress_layers,
            Direction::Egress => &self.egress_layers,
        }
    }

    /// Checks the layer lists: each at most [`layers::MAX_LAYERS`] long, without repeats.
    pub fn check_layers(&self) -> Result<(), LayersError> {
        for dir in [Direction::Ingress, Direction::Egress] {
            let ls = self.layers(dir);
            if ls.len() > layers::MAX_LAYERS {
                return Err(LayersError::TooMany(dir, ls.len()));
            }
            for (i, l) in ls.iter().enumerate() {
                if ls[..i].contains(l) {
                    return Err(LayersError::Duplicate(dir, *l));
                }
            }
        }
        Ok(())
    }

    /// The reference evaluation of a NEW connection in `dir` with `remote` on `proto`/`port`
    /// (`from_host`: the node's own stack opened it towards the pod; only layered policies care).
    /// The datapath must agree with it on every packet (tests compare them), and `explain` names
    /// the deciding rules from it.
    pub fn judge(
        &self,
        dir: Direction,
        proto: u8,
        port: u16,
        remote: IpAddr,
        from_host: bool,
    ) -> Judgement {
        if !self.layered {
            return Judgement::Rules(self.first_match(dir, proto, port, remote));
        }
        let from_host = from_host && dir == Direction::Ingress;
        Judgement::Layers(
            self.layers(dir)
                .iter()
                .map(|&layer| {
                    let outcome = if from_host && layer.host_exempt(dir) {
                        LayerOutcome::HostExempt
                    } else {
                        match self
                            .rules(dir)
                            .iter()
                            .position(|r| r.layer == layer && r.allows(proto, port, remote))
                        {
                            Some(i) => LayerOutcome::Allowed(i),
                            None => LayerOutcome::Refused,
                        }
                    };
                    (layer, outcome)
                })
                .collect(),
        )
    }

    /// Whether the policy allows the connection ([`CompiledPolicy::judge`]).
    pub fn allows(
        &self,
        dir: Direction,
        proto: u8,
        port: u16,
        remote: IpAddr,
        from_host: bool,
    ) -> bool {
        self.judge(dir, proto, port, remote, from_host).allowed()
    }
    /// The rules of one direction.
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// The index of the first rule of `dir` that allows the connection, whatever its layer: the
    /// whole verdict of an unlayered policy; a layered one needs [`CompiledPolicy::judge`], so
    /// this is not public.
    fn first_match(&self, dir: Direction, proto: u8, port: u16, remote: IpAddr) -> Option<usize> {
        self.rules(dir)
            .iter()
            .position(|r| r.allows(proto, port, remote))
    }
}
