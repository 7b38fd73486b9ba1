//! `kubesg-agent explain`: would a NEW connection from one address to another be allowed, and by
//! which rule, or why not. Each end on this node is judged the way the datapath judges it (the
//! sender's egress rules, the receiver's ingress rules), twice: by the rules as the operator sent
//! them (which names the rule) and by a lookup in the datapath's own maps (which is what packets
//! meet). A disagreement between the two is a bug, and is reported as one.
//!
//! For a layered policy (security groups and NetworkPolicies on one pod) it names, layer by
//! layer, the rule that allows the connection, or the layer that refuses it.

use std::{fmt::Write as _, net::IpAddr};

use aya::maps::{lpm_trie::Key, MapError};
use kubesg_common::{
    endpoint::POLICY_NONE,
    policy::{self as layers, ClassSet, LayersKey, PolicyQuery},
    Direction,
};

use crate::{
    desired::{Assignment, DesiredState},
    endpoints::EndpointRecord,
    maps::Maps,
    policy::{CompiledPolicy, Judgement, Layer, LayerOutcome},
    tables::raw_addr,
};

/// The connection asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Question {
    /// The side that opens the connection.
    pub from: IpAddr,
    /// The side that accepts it.
    pub to: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port, or ICMP `type << 8 | code`.
    pub port: u16,
    /// The node's own network stack opens the connection (`--from-host`: kubelet probes, say),
    /// which a layered policy's NetworkPolicies layer does not judge on the receiving pod.
    pub from_host: bool,
}

/// What the rules say at one end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleVerdict {
    /// The pod is in no group: everything passes (tracked).
    NotMember,
    /// The operator has not sent this pod's rules: the startup policy applies.
    Pending,
    /// Allowed by rule `rule` (index in its direction) of `policy`.
    Allowed {
        /// The operator's policy id.
        policy: String,
        /// The rule's index.
        rule: usize,
        /// Where the rule comes from, as the operator named it (may be empty).
        origin: String,
    },
    /// No rule of `policy` allows it.
    Refused {
        /// The operator's policy id.
        policy: String,
    },
    /// `policy` is layered: what each layer required in the direction says (none required:
    /// allowed).
    Layered {
        /// The operator's policy id.
        policy: String,
        /// Each required layer, in order, and what it says.
        layers: Vec<LayerVerdict>,
    },
}

/// What one layer of a layered policy says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerVerdict {
    /// The layer.
    pub layer: Layer,
    /// Allowed by a rule, skipped for the host, or refused.
    pub outcome: LayerOutcome,
    /// The allowing rule's origin (e.g. "networkpolicy shop/allow-web ingress[0]"), else empty.
    pub origin: String,
}

impl RuleVerdict {
    /// Whether the rules as sent let the connection open at this end.
    pub fn allows(&self) -> bool {
        match self {
            RuleVerdict::NotMember | RuleVerdict::Allowed { .. } => true,
            RuleVerdict::Pending | RuleVerdict::Refused { .. } => false,
            RuleVerdict::Layered { layers, .. } => {
                layers.iter().all(|l| l.outcome != LayerOutcome::Refused)
            }
        }
    }
}

/// The verdict of `compiled` (the operator's policy `policy`) at one end.
fn rule_verdict(
    policy: String,
    compiled: &CompiledPolicy,
    direction: Direction,
    q: &Question,
    remote: IpAddr,
) -> RuleVerdict {
    let origin = |i: usize| {
        compiled
            .rules(direction)
            .get(i)
            .map(|r| r.origin.clone())
            .unwrap_or_default()
    };
    match compiled.judge(direction, q.proto, q.port, remote, q.from_host) {
        Judgement::Rules(Some(rule)) => RuleVerdict::Allowed {
            origin: origin(rule),
            policy,
            rule,
        },
        Judgement::Rules(None) => RuleVerdict::Refused { policy },
        Judgement::Layers(ls) => RuleVerdict::Layered {
            policy,
            layers: ls
                .into_iter()
                .map(|(layer, outcome)| LayerVerdict {
                    layer,
                    outcome,
                    origin: match outcome {
                        LayerOutcome::Allowed(i) => origin(i),
                        _ => String::new(),
                    },
                })
                .collect(),
        },
    }
}

/// One end of the connection that is a pod on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndVerdict {
    /// Egress: the pod opens the connection; ingress: it accepts it.
    pub direction: Direction,
    /// The pod's endpoint.
    pub endpoint: EndpointRecord,
    /// What the rules as sent say.
    pub rules: RuleVerdict,
    /// What the datapath's maps say (`None` when they could not be read).
    pub datapath: Option<bool>,
}

impl EndVerdict {
    /// Whether this end lets the connection open (per the datapath when known).
    pub fn allows(&self) -> bool {
        self.datapath.unwrap_or(self.rules.allows())
    }
}

/// Judges `q` at every end that is an endpoint of this node. `maps` (the pinned datapath) adds
/// the datapath's own verdict.
pub fn explain(
    q: &Question,
    endpoints: &[EndpointRecord],
    desired: &DesiredState,
    maps: Option<&Maps>,
) -> Vec<EndVerdict> {
    let mut out = Vec::new();
    for (direction, local, remote) in [
        (Direction::Egress, q.from, q.to),
        (Direction::Ingress, q.to, q.from),
    ] {
        for ep in endpoints
            .iter()
            .filter(|e| e.ips.iter().any(|n| n.addr() == local))
        {
            let rules = match desired.assignment(&ep.pod) {
                Assignment::Unknown => RuleVerdict::Pending,
                Assignment::NonMember => RuleVerdict::NotMember,
                Assignment::Member(policy) => match desired.policies.get(&policy) {
                    Some(compiled) => rule_verdict(policy, compiled, direction, q, remote),
                    None => RuleVerdict::Refused { policy },
                },
            };
            let datapath =
                maps.and_then(|m| datapath_allows(m, ep.host_ifindex, direction, remote, q).ok());
            out.push(EndVerdict {
                direction,
                endpoint: ep.clone(),
                rules,
                datapath,
            });
        }
    }
    out
}

/// The datapath's verdict for a NEW connection at endpoint `ifindex`: the same lookups the
/// programs make (two, plus the layers of a layered endpoint), done by the kernel's own map code.
pub fn datapath_allows(
    maps: &Maps,
    ifindex: u32,
    direction: Direction,
    remote: IpAddr,
    q: &Question,
) -> Result<bool, MapError> {
    let ep = match maps.endpoints.get(&ifindex, 0) {
        Ok(ep) => ep,
        Err(MapError::KeyNotFound) => return Ok(true), // not judged at all
        Err(e) => return Err(e),
    };
    if ep.policy_id == POLICY_NONE {
        return Ok(true);
    }
    let (family, addr) = raw_addr(remote);
    let query = PolicyQuery {
        direction: direction as u8,
        family,
        proto: q.proto,
        remote: addr,
        port: q.port,
    };
    let (len, key) = query.port_key(ep.policy_id);
    let ports = match maps.ports.get(&Key::new(len, key), 0) {
        Ok(c) => Some(c),
        Err(MapError::KeyNotFound) => None,
        Err(e) => return Err(e),
    };
    let (len, key) = query.peer_key(ep.policy_id);
    let peers = match maps.hosts.get(&key, 0) {
        Ok(c) => Some(c),
        Err(MapError::KeyNotFound) => match maps.peers.get(&Key::new(len, key), 0) {
            Ok(c) => Some(c),
            Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    if !ep.is_layered() {
        return Ok(matches!((peers, ports), (Some(a), Some(b)) if a.intersects(&b)));
    }
    let layers = match maps
        .layers
        .get(&LayersKey::new(ep.policy_id, direction as u8), 0)
    {
        Ok(l) => l,
        Err(MapError::KeyNotFound) => return Ok(false), // as the datapath: fail closed
        Err(e) => return Err(e),
    };
    let classes = match (peers, ports) {
        (Some(a), Some(b)) => a.and(&b),
        _ => ClassSet::default(),
    };
    let from_host = q.from_host && direction == Direction::Ingress;
    Ok(layers::layered_allows(&classes, &layers, from_host))
}

/// How one layer's verdict reads.
fn layer_text(l: &LayerVerdict) -> String {
    match l.outcome {
        LayerOutcome::Allowed(rule) if l.origin.is_empty() => {
            format!("{}: allowed by rule {rule}", l.layer.name())
        }
        LayerOutcome::Allowed(rule) => {
            format!("{}: allowed by rule {rule} ({})", l.layer.name(), l.origin)
        }
        LayerOutcome::HostExempt => format!(
            "{}: not applied (the connection comes from the node itself)",
            l.layer.name()
        ),
        LayerOutcome::Refused => format!("{}: no rule allows it", l.layer.name()),
    }
}

/// The human answer: one line per end, then the overall verdict.
pub fn render(q: &Question, ends: &[EndVerdict]) -> String {
    let mut s = String::new();
    if ends.is_empty() {
        let _ = writeln!(
            s,
            "neither {} nor {} is a pod on this node: kubesg on this node does not judge it",
            q.from, q.to
        );
        return s;
    }
    for end in ends {
        let side = match end.direction {
            Direction::Egress => "egress of",
            Direction::Ingress => "ingress of",
        };
        let rules = match &end.rules {
            RuleVerdict::NotMember => "not in any security group: allowed (tracked only)".into(),
            RuleVerdict::Pending => {
                "its rules have not arrived: the agent's startup policy applies".into()
            }
            RuleVerdict::Allowed {
                policy,
                rule,
                origin,
            } => {
                if origin.is_empty() {
                    format!("allowed by rule {rule} of policy {policy}")
                } else {
                    format!("allowed by rule {rule} ({origin}) of policy {policy}")
                }
            }
            RuleVerdict::Refused { policy } => {
                format!("refused: no rule of policy {policy} allows it")
            }
            RuleVerdict::Layered { policy, layers } => {
                let each: Vec<String> = layers.iter().map(layer_text).collect();
                let refusing: Vec<&str> = layers
                    .iter()
                    .filter(|l| l.outcome == LayerOutcome::Refused)
                    .map(|l| l.layer.name())
                    .collect();
                if layers.is_empty() {
                    format!("allowed: layered policy {policy} requires no layer in this direction")
                } else if refusing.is_empty() {
                    format!(
                        "allowed by every layer of policy {policy}: {}",
                        each.join("; ")
                    )
                } else {
                    format!(
                        "refused by the {} layer of policy {policy}: {}",
                        refusing.join(" and "),
                        each.join("; ")
                    )
                }
            }
        };
        let dp = match end.datapath {
            Some(true) => "datapath: allows",
            Some(false) => "datapath: refuses",
            None => "datapath: not readable",
        };
        let disagree = match (&end.rules, end.datapath) {
            (RuleVerdict::Pending, _) | (_, None) => false,
            (rules, Some(dp)) => rules.allows() != dp,
        };
        let _ = writeln!(
            s,
            "{side} {} ({} on {}): {rules} [{dp}]{}",
            end.endpoint.pod,
            end.endpoint.key,
            end.endpoint.host_ifname,
            if disagree {
                "  <- the datapath disagrees with the rules: please report this"
            } else {
                ""
            }
        );
    }
    let verdict = if ends.iter().all(EndVerdict::allows) {
        "ALLOWED"
    } else {
        "REFUSED"
    };
    let _ = writeln!(
        s,
        "verdict: {verdict} (a NEW connection needs every end above)"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        desired::PodAssignment,
        endpoints::{EndpointKey, PodRef},
        policy::{CompiledPolicy, PeerBlock, PortMatch, Protocol, Rule},
    };

    fn ep(name: &str, ip: &str, ifindex: u32) -> EndpointRecord {
        EndpointRecord {
            key: EndpointKey {
                container_id: format!("c-{name}"),
                ifname: "eth0".into(),
            },
            netns: String::new(),
            host_ifname: format!("veth{ifindex}"),
            host_ifindex: ifindex,
            ips: vec![format!("{ip}/24").parse().unwrap()],
            pod: PodRef {
                namespace: "shop".into(),
                name: name.into(),
                uid: String::new(),
            },
        }
    }

    fn state() -> DesiredState {
        let web_to_db = Rule {
            protocol: Protocol::Tcp,
            ports: vec![PortMatch::Range {
                first: 5432,
                last: 5432,
            }],
            peers: vec![PeerBlock::cidr("10.0.0.0/24".parse().unwrap())],
            origin: "shop/web egress[0]".into(),
            layer: Default::default(),
        };
        let mut s = DesiredState::default();
        s.policies.insert(
            "web".into(),
            CompiledPolicy {
                egress: vec![web_to_db],
                ..CompiledPolicy::default()
            },
        );
        s.policies.insert("db".into(), CompiledPolicy::default());
        for (pod, policy) in [("web", Some("web")), ("db", Some("db")), ("tools", None)] {
            s.pods.insert(
                ("shop".into(), pod.into()),
                PodAssignment {
                    uid: String::new(),
                    policy: policy.map(String::from),
                },
            );
        }
        s
    }

    fn q(from: &str, to: &str, port: u16) -> Question {
        Question {
            from: from.parse().unwrap(),
            to: to.parse().unwrap(),
            proto: kubesg_common::proto::TCP,
            port,
            from_host: false,
        }
    }

    #[test]
    fn both_ends_are_judged_and_the_rule_is_named() {
        let eps = [ep("web", "10.0.0.5", 5), ep("db", "10.0.0.7", 7)];
        let ends = explain(&q("10.0.0.5", "10.0.0.7", 5432), &eps, &state(), None);
        assert_eq!(ends.len(), 2);
        assert_eq!(ends[0].direction, Direction::Egress);
        assert_eq!(
            ends[0].rules,
            RuleVerdict::Allowed {
                policy: "web".into(),
                rule: 0,
                origin: "shop/web egress[0]".into()
            }
        );
        assert_eq!(ends[1].direction, Direction::Ingress);
        assert_eq!(
            ends[1].rules,
            RuleVerdict::Refused {
                policy: "db".into()
            }
        );
        let text = render(&q("10.0.0.5", "10.0.0.7", 5432), &ends);
        assert!(
            text.contains("allowed by rule 0 (shop/web egress[0]) of policy web"),
            "{text}"
        );
        assert!(
            text.contains("refused: no rule of policy db allows it"),
            "{text}"
        );
        assert!(text.contains("verdict: REFUSED"), "{text}");
    }

    /// The db pod, layered on ingress: its group allows 5432 from the subnet, a NetworkPolicy
    /// allows 5432 from the web pod only.
    fn layered_state() -> DesiredState {
        let tcp_5432 = |peer: &str, origin: &str, layer: Layer| Rule {
            protocol: Protocol::Tcp,
            ports: vec![PortMatch::Range {
                first: 5432,
                last: 5432,
            }],
            peers: vec![PeerBlock::cidr(peer.parse().unwrap())],
            origin: origin.into(),
            layer,
        };
        let mut s = state();
        s.policies.insert(
            "db".into(),
            CompiledPolicy {
                ingress: vec![
                    tcp_5432("10.0.0.0/24", "shop/db ingress[0]", Layer::SecurityGroups),
                    tcp_5432(
                        "10.0.0.5/32",
                        "networkpolicy shop/allow-web ingress[0]",
                        Layer::NetworkPolicies,
                    ),
                ],
                layered: true,
                ingress_layers: vec![Layer::SecurityGroups, Layer::NetworkPolicies],
                ..CompiledPolicy::default()
            },
        );
        s
    }

    #[test]
    fn a_layered_policy_names_each_layers_rule_or_the_refusing_layer() {
        let eps = [ep("web", "10.0.0.5", 5), ep("db", "10.0.0.7", 7)];
        let s = layered_state();
        let allowed = q("10.0.0.5", "10.0.0.7", 5432);
        let ends = explain(&allowed, &eps, &s, None);
        let text = render(&allowed, &ends);
        assert!(
            text.contains(
                "allowed by every layer of policy db: security groups: allowed by rule 0 \
                 (shop/db ingress[0]); network policies: allowed by rule 1 \
                 (networkpolicy shop/allow-web ingress[0])"
            ),
            "{text}"
        );
        assert!(text.contains("verdict: ALLOWED"), "{text}");
        // From another address of the subnet the group allows it, the NetworkPolicy does not.
        let tools = [ep("tools", "10.0.0.9", 9), ep("db", "10.0.0.7", 7)];
        let refused = q("10.0.0.9", "10.0.0.7", 5432);
        let ends = explain(&refused, &tools, &s, None);
        let text = render(&refused, &ends);
        assert!(
            text.contains("refused by the network policies layer of policy db"),
            "{text}"
        );
        assert!(
            text.contains("network policies: no rule allows it"),
            "{text}"
        );
        assert!(text.contains("verdict: REFUSED"), "{text}");
        // From the node, the NetworkPolicies layer is not applied; the group still is.
        let node = Question {
            from_host: true,
            ..q("10.0.0.1", "10.0.0.7", 5432)
        };
        let text = render(&node, &explain(&node, &eps, &s, None));
        assert!(
            text.contains(
                "network policies: not applied (the connection comes from the node itself)"
            ),
            "{text}"
        );
        assert!(text.contains("verdict: ALLOWED"), "{text}");
        let node_other_port = Question { port: 5433, ..node };
        let text = render(&node_other_port, &explain(&node_other_port, &eps, &s, None));
        assert!(
            text.contains("refused by the security groups layer of policy db"),
            "{text}"
        );
    }

    #[test]
    fn non_members_and_pending_pods_are_said_so() {
        let eps = [ep("tools", "10.0.0.9", 9), ep("new", "10.0.0.11", 11)];
        let ends = explain(&q("10.0.0.9", "10.0.0.11", 80), &eps, &state(), None);
        assert_eq!(ends[0].rules, RuleVerdict::NotMember);
        assert_eq!(ends[1].rules, RuleVerdict::Pending);
    }

    #[test]
    fn addresses_of_no_local_pod_are_not_judged_here() {
        let ends = explain(&q("192.0.2.1", "192.0.2.2", 80), &[], &state(), None);
        assert!(ends.is_empty());
        assert!(render(&q("192.0.2.1", "192.0.2.2", 80), &ends).contains("does not judge it"));
    }
}
