//! One group's rules with their peers resolved to addresses: the part of a policy that depends
//! on the group alone, computed once per group and shared by every policy that includes it.
//!
//! - Ingress rules stay templates: a named port in an ingress rule is the port of the *member*
//!   that accepts the connection, so it is resolved per pod when a policy is built
//!   ([`crate::policy`]).
//! - Egress rules are final: a named port in an egress rule is the port of each *peer* pod, so
//!   the rule is split per resolved number, each part allowing only the peers whose port of that
//!   name has that number (as Kubernetes NetworkPolicy resolves egress named ports). An ipBlock
//!   peer has no container ports: named ports never match it.
//! - Pod peers (groups, selectors) resolve to address sets ([`crate::sets`]) named in the rule,
//!   whose /32 and /128 blocks (both families, so dual-stack pods are reachable on either) are
//!   kept apart; address blocks stay in the rule. Only the parts of egress rules split per named
//!   port list their peers' addresses inline. A rule whose peers resolve to nothing (no blocks,
//!   empty sets) matches nobody, never everybody.
//! - What egress rules gain from Services (the ClusterIPs of those whose every backend they
//!   admit) is kept apart, per Service ([`crate::services`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    fingerprint::{Fingerprint, Hasher},
    index::{GroupEntry, Index, PodId},
    model::PortProtocol,
    plan::{GroupGeneration, Layer, PeerBlock, PlannedRule, PortSpec, RuleProtocol, SetId},
    sets::SetSource,
    validate::{CheckedPeer, CheckedPort, CheckedRule},
};

/// A named port the ingress rules of a group need resolved on the member: name and protocol.
pub(crate) type NamedNeed = (String, PortProtocol);

/// A compiled rule and its fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FingerprintedRule {
    pub rule: PlannedRule,
    pub fingerprint: Fingerprint,
}

/// A port item of an ingress template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TemplatePort {
    /// A number, range or ICMP message.
    Spec(PortSpec),
    /// A named port: an index into [`GroupRules::named_needs`].
    Named(usize),
}

/// An ingress rule with its peers resolved and its named ports not yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IngressTemplate {
    pub layer: Layer,
    pub protocol: RuleProtocol,
    /// `None`: every port.
    pub ports: Option<Vec<TemplatePort>>,
    pub peers: Vec<PeerBlock>,
    pub sets: Vec<SetId>,
    pub peers_fingerprint: Fingerprint,
    pub origin: String,
}

/// A group's resolved rules. Empty for a group that is not accepted (it contributes nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupRules {
    /// The group and its generation (`None`: not accepted).
    pub own: Option<GroupGeneration>,
    pub ingress: Vec<IngressTemplate>,
    pub egress: Vec<FingerprintedRule>,
    /// Named ports of the ingress rules, sorted.
    pub named_needs: Vec<NamedNeed>,
    /// Existing groups the rules name as peers, with their generations, sorted.
    pub peer_groups: Vec<GroupGeneration>,
}

/// The fingerprint of a compiled rule, from its parts (the peers by their own fingerprint, so a
/// policy's id costs a hash per rule, not per peer).
pub(crate) fn rule_fingerprint(
    layer: Layer,
    protocol: RuleProtocol,
    ports: &[PortSpec],
    peers_fingerprint: &Fingerprint,
    origin: &str,
) -> Fingerprint {
    let mut h = Hasher::new("rule");
    // Security-group rules hash as they did before layers existed, so an operator upgrade leaves
    // their policies' ids (and what the agents hold) untouched.
    if layer != Layer::SecurityGroups {
        h.str("layer:network-policies");
    }
    h.protocol(protocol)
        .ports(ports)
        .fingerprint(peers_fingerprint)
        .str(origin);
    h.finish()
}

/// The fingerprint of a rule's peers: its blocks and the ids of its sets.
pub(crate) fn peers_fingerprint(peers: &[PeerBlock], sets: &[SetId]) -> Fingerprint {
    let mut h = Hasher::new("peers");
    h.peers(peers).count(sets.len());
    for s in sets {
        h.str(s);
    }
    h.finish()
}

/// A compiled rule with its fingerprint computed.
pub(crate) fn fingerprinted(rule: PlannedRule) -> FingerprintedRule {
    let pf = peers_fingerprint(&rule.peers, &rule.sets);
    let fingerprint = rule_fingerprint(rule.layer, rule.protocol, &rule.ports, &pf, &rule.origin);
    FingerprintedRule { rule, fingerprint }
}

/// The port protocol a named port of a rule of `p` is looked up with.
pub(crate) fn named_port_protocol(p: RuleProtocol) -> Option<PortProtocol> {
    match p {
        RuleProtocol::Tcp => Some(PortProtocol::Tcp),
        RuleProtocol::Udp => Some(PortProtocol::Udp),
        RuleProtocol::Sctp => Some(PortProtocol::Sctp),
        _ => None,
    }
}

/// Everyone: both families' whole address space.
pub(crate) fn anyone() -> Vec<PeerBlock> {
    vec![
        PeerBlock {
            cidr: IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)),
            except: Vec::new(),
        },
        PeerBlock {
            cidr: IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0)),
            except: Vec::new(),
        },
    ]
}

/// A single address as a block (/32 or /128).
pub(crate) fn host_block(ip: IpAddr) -> PeerBlock {
    PeerBlock {
        cidr: IpNet::from(ip),
        except: Vec::new(),
    }
}

/// A rule's peers as a rule names them: address blocks, and the sets of its pod peers.
struct RulePeers {
    blocks: Vec<PeerBlock>,
    sets: Vec<SetId>,
}

/// The peers of one rule of group `g`: omitted → anyone; a block → itself; pods → their set.
fn rule_peers(g: &GroupEntry, rule: &CheckedRule) -> RulePeers {
    let Some(peers) = &rule.peers else {
        return RulePeers {
            blocks: anyone(),
            sets: Vec::new(),
        };
    };
    let mut blocks = Vec::new();
    let mut sets = Vec::new();
    for peer in peers {
        match (peer, SetSource::of_peer(&g.key.namespace, peer)) {
            (CheckedPeer::Block(b), _) => blocks.push(b.clone()),
            (_, Some(source)) => sets.push(source.id()),
            (_, None) => {}
        }
    }
    blocks.sort();
    blocks.dedup();
    sets.sort();
    sets.dedup();
    RulePeers { blocks, sets }
}

/// Resolves the rules of group `g` against the cluster as the index holds it now.
pub(crate) fn resolve(ix: &Index, g: &GroupEntry) -> GroupRules {
    let checked = match &g.checked {
        Ok(c) if g.accepted() => c,
        _ => return GroupRules::default(),
    };
    let key = &g.key;
    let mut peer_groups = BTreeSet::new();
    for rule in checked
        .ingress
        .iter()
        .chain(checked.egress.iter())
        .flatten()
    {
        for peer in rule.peers.iter().flatten() {
            if let CheckedPeer::Group(k) = peer {
                let target = ix.group_ids.get(k).and_then(|&t| ix.group(t));
                if let Some(t) = target.filter(|t| !t.deleted) {
                    peer_groups.insert(GroupGeneration {
                        group: k.clone(),
                        generation: t.group.generation,
                    });
                }
            }
        }
    }

    let mut named_needs = BTreeSet::new();
    for rule in checked.ingress.iter().flatten() {
        for port in rule.ports.iter().flatten() {
            if let (CheckedPort::Named(name), Some(proto)) =
                (port, named_port_protocol(rule.protocol))
            {
                named_needs.insert((name.clone(), proto));
            }
        }
    }
    let named_needs: Vec<NamedNeed> = named_needs.into_iter().collect();

    let ingress = checked
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, rule)| {
            let RulePeers { blocks, sets } = rule_peers(g, rule);
            let ports = rule.ports.as_ref().map(|items| {
                items
                    .iter()
                    .filter_map(|item| match item {
                        CheckedPort::Range { first, last } => {
                            Some(TemplatePort::Spec(PortSpec::Range {
                                first: *first,
                                last: *last,
                            }))
                        }
                        CheckedPort::Icmp { icmp_type, code } => {
                            Some(TemplatePort::Spec(PortSpec::Icmp {
                                icmp_type: *icmp_type,
                                code: *code,
                            }))
                        }
                        CheckedPort::Named(name) => {
                            let need = (name.clone(), named_port_protocol(rule.protocol)?);
                            named_needs
                                .binary_search(&need)
                                .ok()
                                .map(TemplatePort::Named)
                        }
                    })
                    .collect()
            });
            IngressTemplate {
                layer: Layer::of(g.group.kind),
                protocol: rule.protocol,
                ports,
                peers_fingerprint: peers_fingerprint(&blocks, &sets),
                peers: blocks,
                sets,
                origin: rule_origin(g, true, i),
            }
        })
        .collect();

    let egress = match &checked.egress {
        None => vec![fingerprinted(PlannedRule {
            layer: Layer::of(g.group.kind),
            protocol: RuleProtocol::Any,
            ports: Vec::new(),
            peers: anyone(),
            sets: Vec::new(),
            origin: format!("{key} egress (omitted: all)"),
        })],
        Some(rules) => {
            let mut out = Vec::new();
            for (i, rule) in rules.iter().enumerate() {
                egress_rules(ix, g, rule, rule_origin(g, false, i), &mut out);
            }
            out
        }
    };

    GroupRules {
        own: Some(GroupGeneration {
            group: key.clone(),
            generation: g.group.generation,
        }),
        ingress,
        egress,
        named_needs,
        peer_groups: peer_groups.into_iter().collect(),
    }
}

/// How `explain` and the logs name rule `i` of a direction of group `g`: `shop/web ingress[0]`,
/// or the NetworkPolicy rule it was translated from.
pub(crate) fn rule_origin(g: &GroupEntry, ingress: bool, i: usize) -> String {
    let direction = if ingress { "ingress" } else { "egress" };
    g.group
        .origins
        .as_ref()
        .and_then(|o| if ingress { &o.ingress } else { &o.egress }.get(i).cloned())
        .unwrap_or_else(|| format!("{} {direction}[{i}]", g.key))
}

/// One egress rule, split per resolved named port.
fn egress_rules(
    ix: &Index,
    g: &GroupEntry,
    rule: &CheckedRule,
    origin: String,
    out: &mut Vec<FingerprintedRule>,
) {
    let named = rule_peers(g, rule);
    let Some(items) = &rule.ports else {
        out.push(fingerprinted(PlannedRule {
            layer: Layer::of(g.group.kind),
            protocol: rule.protocol,
            ports: Vec::new(),
            peers: named.blocks,
            sets: named.sets,
            origin,
        }));
        return;
    };
    let mut numeric: Vec<PortSpec> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for item in items {
        match item {
            CheckedPort::Range { first, last } => numeric.push(PortSpec::Range {
                first: *first,
                last: *last,
            }),
            CheckedPort::Icmp { icmp_type, code } => numeric.push(PortSpec::Icmp {
                icmp_type: *icmp_type,
                code: *code,
            }),
            CheckedPort::Named(n) => names.push(n),
        }
    }
    numeric.sort();
    numeric.dedup();
    if !numeric.is_empty() {
        out.push(fingerprinted(PlannedRule {
            layer: Layer::of(g.group.kind),
            protocol: rule.protocol,
            ports: numeric,
            peers: named.blocks,
            sets: named.sets,
            origin: origin.clone(),
        }));
    }
    let Some(proto) = named_port_protocol(rule.protocol) else {
        return;
    };
    if names.is_empty() {
        return;
    }
    let mut by_number: BTreeMap<u16, Vec<PeerBlock>> = BTreeMap::new();
    for id in peer_pods(ix, g, rule) {
        let Some(p) = ix.pod(id) else { continue };
        for np in &p.pod.ports {
            if np.protocol == proto && names.contains(&np.name.as_str()) {
                by_number
                    .entry(np.port)
                    .or_default()
                    .extend(p.pod.ips.iter().map(|&ip| host_block(ip)));
            }
        }
    }
    for (port, mut peers) in by_number {
        peers.sort();
        peers.dedup();
        out.push(fingerprinted(PlannedRule {
            layer: Layer::of(g.group.kind),
            protocol: rule.protocol,
            ports: vec![PortSpec::Range {
                first: port,
                last: port,
            }],
            peers,
            sets: Vec::new(),
            origin: origin.clone(),
        }));
    }
}

/// The pods the peers of one rule of group `g` select (address blocks select none: they have
/// no container ports).
fn peer_pods(ix: &Index, g: &GroupEntry, rule: &CheckedRule) -> Vec<PodId> {
    let mut pods = Vec::new();
    for source in rule
        .named_port_peers()
        .iter()
        .filter_map(|peer| SetSource::of_peer(&g.key.namespace, peer))
    {
        source.for_each_pod(ix, |id, p| {
            if p.enforced() && !p.pod.ips.is_empty() {
                pods.push(id);
            }
        });
    }
    pods.sort_unstable();
    pods.dedup();
    pods
}
