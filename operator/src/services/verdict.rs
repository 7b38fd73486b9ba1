//! The verdict on one Service for one group: which ClusterIPs and ports its egress rules admit,
//! every backend judged as a connection straight to it would be, and the compiled rules that
//! admit them.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use super::reach::{reaches, rule_namespaces};
use crate::{
    index::{GroupEntry, Index, NsSelectorId, PodEntry, PodId, ServiceEntry, StoredPod, Targets},
    model::{ObjectKey, PortProtocol, ServicePort},
    peers::{fingerprinted, host_block, FingerprintedRule},
    plan::{Layer, PeerBlock, PlannedRule, PortSpec, RuleProtocol},
    selector::Selector,
    validate::{CheckedPeer, CheckedPort, CheckedRule},
};

/// An address a base egress rule must not admit by itself: a ClusterIP inside one of its
/// address blocks (or anyone) whose Service it does not admit as it admits the backends. Traffic
/// to a Service is judged as traffic to the pods behind it, so a block that happens to hold the
/// ClusterIP (`0.0.0.0/0`, a large range around the Service CIDR) must not let through what the
/// rule refuses to the backends (an `except` holding a backend, a port the backends do not
/// serve). The ports it does admit come back as rules of their own ([`ServiceVerdict::rules`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Exclusion {
    /// The base rule, by its origin (unique per rule of a group; only its parts with address
    /// blocks can hold a ClusterIP).
    pub origin: String,
    /// The ClusterIP.
    pub address: IpAddr,
}

/// What a group's egress rules make of one Service: the rules they gain, the ClusterIPs their
/// own blocks must except.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ServiceVerdict {
    /// Rules admitting the ClusterIPs and ports whose every backend they admit.
    pub rules: Vec<FingerprintedRule>,
    /// ClusterIPs the base rules' blocks must except.
    pub excluded: Vec<Exclusion>,
}

impl ServiceVerdict {
    /// Whether the Service changes nothing for the group.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.excluded.is_empty()
    }
}

/// The rule protocol of a Service port.
fn rule_protocol(p: PortProtocol) -> RuleProtocol {
    match p {
        PortProtocol::Tcp => RuleProtocol::Tcp,
        PortProtocol::Udp => RuleProtocol::Udp,
        PortProtocol::Sctp => RuleProtocol::Sctp,
    }
}

/// Whether a port item of a rule allows `port`; a named one resolves on `on` with `protocol`
/// (`None`: an address, which has no named ports).
fn item_allows(
    item: &CheckedPort,
    port: u16,
    protocol: PortProtocol,
    on: Option<&StoredPod>,
) -> bool {
    match item {
        CheckedPort::Range { first, last } => (*first..=*last).contains(&port),
        CheckedPort::Named(name) => on.is_some_and(|b| {
            b.ports
                .iter()
                .any(|np| np.name == *name && np.protocol == protocol && np.port == port)
        }),
        CheckedPort::Icmp { .. } => false,
    }
}

/// Whether the ports of `rule` allow `port` (omitted: every port).
fn ports_allow(
    rule: &CheckedRule,
    port: u16,
    protocol: PortProtocol,
    on: Option<&StoredPod>,
) -> bool {
    rule.ports
        .as_ref()
        .is_none_or(|items| items.iter().any(|i| item_allows(i, port, protocol, on)))
}

/// A peer of an egress rule, looked up once for a whole judgement of a Service.
enum Matcher<'a> {
    /// An address block.
    Block(&'a PeerBlock),
    /// The members of a group (`None`: it does not exist or is not accepted).
    Members(Option<&'a HashSet<PodId>>),
    /// Enforced pods of one namespace whose labels match (`None`: every pod).
    Local(&'a str, Option<&'a Selector>),
    /// Enforced pods of the namespaces a selector matches (`None`: not in the index, so none).
    Selected(Option<NsSelectorId>, Option<&'a Selector>),
}

impl Matcher<'_> {
    /// The peers of `rule` of group `g`; `None`: anyone.
    fn of<'a>(ix: &'a Index, g: &'a GroupEntry, rule: &'a CheckedRule) -> Option<Vec<Matcher<'a>>> {
        let peers = rule.peers.as_ref()?;
        Some(
            peers
                .iter()
                .map(|peer| match peer {
                    CheckedPeer::Block(b) => Matcher::Block(b),
                    CheckedPeer::Group(k) => Matcher::Members(
                        ix.group_ids
                            .get(k)
                            .and_then(|&t| ix.group(t))
                            .filter(|t| t.accepted())
                            .map(|t| &t.members),
                    ),
                    CheckedPeer::Pods {
                        namespaces: None,
                        pods,
                    } => Matcher::Local(&g.key.namespace, pods.as_ref()),
                    CheckedPeer::Pods {
                        namespaces: Some(sel),
                        pods,
                    } => Matcher::Selected(ix.ns_selector_ids.get(sel).copied(), pods.as_ref()),
                })
                .collect(),
        )
    }

    /// Whether this pod peer selects backend `id` (`b` its entry); never for a block.
    fn selects(&self, ix: &Index, id: PodId, b: &PodEntry) -> bool {
        let selected =
            |pods: Option<&Selector>| b.enforced() && pods.is_none_or(|s| s.matches(&b.pod.labels));
        match self {
            Matcher::Block(_) => false,
            Matcher::Members(members) => members.is_some_and(|m| m.contains(&id)),
            Matcher::Local(ns, pods) => b.key.namespace == *ns && selected(*pods),
            Matcher::Selected(sid, pods) => {
                sid.is_some_and(|sid| ix.ns_selector_matches(sid, &b.key.namespace))
                    && selected(*pods)
            }
        }
    }
}

/// Whether egress rule `rule`, whose peers are `peers` (`None`: anyone), admits a connection to
/// address `addr` of backend `id` on port `port` with `protocol`: the same test a connection
/// straight to the backend meets. A pod peer admits it when it selects the backend (as the
/// peer's address set would hold it) and the rule's ports allow `port`, named ports resolved on
/// the backend; an address block or anyone when it holds `addr` and the rule's numeric ports
/// allow `port` (addresses have no named ports).
fn admits(
    ix: &Index,
    rule: &CheckedRule,
    peers: Option<&[Matcher<'_>]>,
    (id, b): (PodId, &PodEntry),
    addr: IpAddr,
    protocol: PortProtocol,
    port: u16,
) -> bool {
    let Some(peers) = peers else {
        // Anyone: numeric ports for any address; named ones on the backend, as on any pod
        // (`CheckedRule::named_port_peers`).
        return ports_allow(rule, port, protocol, None)
            || (rule.has_named_ports()
                && b.enforced()
                && ix
                    .namespaces
                    .get(&b.key.namespace)
                    .is_some_and(|n| n.labels.is_some())
                && ports_allow(rule, port, protocol, Some(&b.pod)));
    };
    peers.iter().any(|peer| match peer {
        Matcher::Block(block) => {
            block.cidr.contains(&addr)
                && !block.except.iter().any(|e| e.contains(&addr))
                && ports_allow(rule, port, protocol, None)
        }
        _ => peer.selects(ix, id, b) && ports_allow(rule, port, protocol, Some(&b.pod)),
    })
}

/// Whether `rule` may admit a Service port whose backends' target ports are `targets`,
/// decided without judging each backend: the protocol matches, some backend has the target
/// port, and the rule's ports can allow one of them (numerically, unless a named rule port may
/// resolve on a backend). One is enough: a ClusterIP is judged on the backends of its family
/// only (later), and a named target port can resolve to another number on the other family's.
fn may_admit(rule: &CheckedRule, p: &ServicePort, targets: &Targets) -> bool {
    if rule.protocol != RuleProtocol::Any && rule.protocol != rule_protocol(p.protocol) {
        return false;
    }
    if targets.distinct.is_empty() {
        return false;
    }
    let Some(items) = &rule.ports else {
        return true;
    };
    if items.iter().any(|i| matches!(i, CheckedPort::Named(_))) {
        return true;
    }
    targets.distinct.iter().any(|t| {
        items.iter().any(
            |i| matches!(i, CheckedPort::Range { first, last } if (*first..=*last).contains(t)),
        )
    })
}

/// Whether `rule` admits address `c` on port `p` by itself (an address block holding it, or
/// anyone, with a numeric port allowing the Service port): a rule for it would add nothing.
fn admits_directly(rule: &CheckedRule, c: IpAddr, p: &ServicePort) -> bool {
    block_holds(rule, c) && ports_allow(rule, p.port, p.protocol, None)
}

/// Whether an address block of `rule` (or anyone) holds `c`, whatever the ports.
fn block_holds(rule: &CheckedRule, c: IpAddr) -> bool {
    rule.peers.as_ref().is_none_or(|peers| {
        peers.iter().any(|peer| {
            matches!(peer, CheckedPeer::Block(b)
                if b.cidr.contains(&c) && !b.except.iter().any(|e| e.contains(&c)))
        })
    })
}

/// The compiled rules egress rule `rule` gains from Service `s` (namespace `ns`, name `name`),
/// whose backends are `backends`: one per protocol allowing the admitted ports on the
/// ClusterIPs admitted, named `{origin} via Service ns/name`. A ClusterIP the rule admits by
/// itself needs none, unless it is `excluded` from the rule's blocks.
fn admitted(
    ix: &Index,
    g: &GroupEntry,
    rule: &CheckedRule,
    origin: &str,
    (ns, name, s): (&str, &str, &ServiceEntry),
    (backends, excluded): (&[(PodId, &PodEntry)], &[IpAddr]),
    out: &mut Vec<FingerprintedRule>,
) {
    let peers = Matcher::of(ix, g, rule);
    let peers = peers.as_deref();
    // (protocol, admitted ClusterIPs) → ports.
    let mut parts: BTreeMap<(RuleProtocol, Vec<PeerBlock>), Vec<PortSpec>> = BTreeMap::new();
    for (p, targets) in s.service.ports.iter().zip(&s.backends.targets) {
        if !may_admit(rule, p, targets) {
            continue;
        }
        let mut ips: Vec<PeerBlock> = s
            .service
            .cluster_ips
            .iter()
            .filter(|c| excluded.contains(c) || !admits_directly(rule, **c, p))
            .filter(|c| cluster_ip_admitted(ix, rule, peers, backends, &targets.each, **c, p))
            .map(|&c| host_block(c))
            .collect();
        if ips.is_empty() {
            continue;
        }
        ips.sort();
        ips.dedup();
        parts
            .entry((rule_protocol(p.protocol), ips))
            .or_default()
            .push(PortSpec::Range {
                first: p.port,
                last: p.port,
            });
    }
    for ((protocol, peers), mut ports) in parts {
        ports.sort();
        ports.dedup();
        out.push(fingerprinted(PlannedRule {
            layer: Layer::of(g.group.kind),
            protocol,
            ports,
            peers,
            sets: Vec::new(),
            origin: format!("{origin} via Service {ns}/{name}"),
        }));
    }
}

/// What the egress rules of group `g` make of Service `name` of namespace `ns` (rules in rule
/// order); empty when it is gone, `g` is not accepted, or it concerns none of them.
pub(crate) fn service_rules(ix: &Index, g: &GroupEntry, ns: &str, name: &str) -> ServiceVerdict {
    let mut out = ServiceVerdict::default();
    if let (Some(s), Ok(checked)) = (
        ix.namespaces.get(ns).and_then(|e| e.services.get(name)),
        &g.checked,
    ) {
        if g.accepted() {
            judge(ix, g, checked.egress.as_deref(), (ns, name, s), &mut out);
        }
    }
    out
}

/// Appends the compiled rules `egress` (the rules of accepted group `g`) gain from Service `s`
/// (namespace `ns`, name `name`), in rule order.
fn judge(
    ix: &Index,
    g: &GroupEntry,
    egress: Option<&[CheckedRule]>,
    (ns, name, s): (&str, &str, &ServiceEntry),
    out: &mut ServiceVerdict,
) {
    if s.resolvable().is_none() {
        return;
    }
    let mut backends: Option<Option<Vec<(PodId, &PodEntry)>>> = None;
    for (i, rule) in egress.into_iter().flatten().enumerate() {
        // ClusterIPs the rule's own blocks hold on a port of the Service it allows.
        let held: Vec<IpAddr> = s
            .service
            .cluster_ips
            .iter()
            .copied()
            .filter(|&c| block_holds(rule, c))
            .filter(|_| s.service.ports.iter().any(|p| directly_on(rule, p)))
            .collect();
        let some_port = s
            .service
            .ports
            .iter()
            .zip(&s.backends.targets)
            .any(|(p, t)| may_admit(rule, p, t));
        if held.is_empty() && (!some_port || !reaches(ix, g, rule, ns)) {
            continue;
        }
        // Refreshed in this change when any of them changed, so every one is live.
        let Some(backends) = backends
            .get_or_insert_with(|| {
                s.backends
                    .pods
                    .iter()
                    .map(|&id| ix.pod(id).map(|p| (id, p)))
                    .collect()
            })
            .as_deref()
        else {
            return;
        };
        let origin = crate::peers::rule_origin(g, false, i);
        let peers = Matcher::of(ix, g, rule);
        let excluded: Vec<IpAddr> = held
            .into_iter()
            .filter(|&c| {
                s.service
                    .ports
                    .iter()
                    .zip(&s.backends.targets)
                    .any(|(p, t)| {
                        directly_on(rule, p)
                            && !cluster_ip_admitted(
                                ix,
                                rule,
                                peers.as_deref(),
                                backends,
                                &t.each,
                                c,
                                p,
                            )
                    })
            })
            .collect();
        out.excluded
            .extend(excluded.iter().map(|&address| Exclusion {
                origin: origin.clone(),
                address,
            }));
        if some_port && reaches(ix, g, rule, ns) {
            admitted(
                ix,
                g,
                rule,
                &origin,
                (ns, name, s),
                (backends, &excluded),
                &mut out.rules,
            );
        }
    }
}

/// Whether `rule`'s protocol and numeric ports allow Service port `p` (the test a block holding
/// the ClusterIP passes on that port).
fn directly_on(rule: &CheckedRule, p: &ServicePort) -> bool {
    (rule.protocol == RuleProtocol::Any || rule.protocol == rule_protocol(p.protocol))
        && ports_allow(rule, p.port, p.protocol, None)
}

/// Every Service group `g` may admit, with the rules it gains from each (only those gaining
/// some): what [`service_rules`] says for every Service of the namespaces its egress rules
/// reach.
pub(crate) fn group_service_rules(
    ix: &Index,
    g: &GroupEntry,
) -> BTreeMap<ObjectKey, ServiceVerdict> {
    let mut out = BTreeMap::new();
    let Ok(checked) = &g.checked else {
        return out;
    };
    if !g.accepted() || ix.service_namespaces.is_empty() {
        return out;
    }
    let mut namespaces: Vec<&str> = checked
        .egress
        .iter()
        .flatten()
        .flat_map(|rule| rule_namespaces(ix, g, rule))
        .collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    for ns in namespaces {
        let Some(entry) = ix.namespaces.get(ns) else {
            continue;
        };
        for (name, s) in &entry.services {
            let mut verdict = ServiceVerdict::default();
            judge(
                ix,
                g,
                checked.egress.as_deref(),
                (ns, name, s),
                &mut verdict,
            );
            if !verdict.is_empty() {
                out.insert(ObjectKey::new(ns, name.clone()), verdict);
            }
        }
    }
    out
}

/// Whether the rule admits ClusterIP `c` on port `p`, which sends to `targets` (in `backends`
/// order): some backend has an address of `c`'s family, and the rule admits every such
/// address on the backend's target port (a backend of that family without the target port
/// refuses it; backends of the other family only do not count).
fn cluster_ip_admitted(
    ix: &Index,
    rule: &CheckedRule,
    peers: Option<&[Matcher<'_>]>,
    backends: &[(PodId, &PodEntry)],
    targets: &[Option<u16>],
    c: IpAddr,
    p: &ServicePort,
) -> bool {
    let mut some = false;
    for (&(id, b), &port) in backends.iter().zip(targets) {
        for &addr in b.pod.ips.iter().filter(|a| a.is_ipv4() == c.is_ipv4()) {
            some = true;
            let Some(port) = port else {
                return false;
            };
            if !admits(ix, rule, peers, (id, b), addr, p.protocol, port) {
                return false;
            }
        }
    }
    some
}
