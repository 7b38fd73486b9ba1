//! Services: traffic to a ClusterIP is judged as traffic to the pods behind it.
//!
//! kube-proxy translates a ClusterIP destination after the packet has left the client's
//! interface, so the client's egress check sees `ClusterIP:servicePort`, which no rule naming
//! pods admits. The operator therefore resolves Services itself (as the AWS network policy
//! agent does): an egress rule admits port `P` of Service `S` on a ClusterIP of family `F` iff
//! `S` has at least one backend with an address of family `F` and the rule admits **every**
//! such backend address on `P`'s protocol and on `P`'s target port as resolved on that backend
//! (a named `targetPort` is the backend's container port of that name and protocol; a backend
//! without it is not admitted). Every rather than any: kube-proxy may pick any backend for a
//! connection, so admitting the ClusterIP when only some backends are admitted would let the
//! client reach the others. The rule then also admits `P`'s protocol and port on that ClusterIP,
//! as extra compiled rules kept per group and Service (`… egress[i] via Service ns/name`;
//! omitted where the rule admits that address and port by itself), so a Service's change, or
//! its backends', re-judges that Service for the groups that can reach it, nothing else.
//!
//! Backends are the pods of the Service's namespace its selector matches that hold an address
//! and are not finished, as the EndpointSlice controller lists them (readiness aside: a pod
//! about to become ready must be admitted before it gets traffic). A Service without a selector
//! (EndpointSlices written by hand), headless and ExternalName Services resolve nothing.
//!
//! Which groups a change can affect: a rule with an ipBlock peer or no peers can admit the
//! Services of every namespace; a rule with pod peers only those of the namespaces its peers
//! select pods in. [`crate::index::EgressReach`] records that per group, and [`mark_reaching`]
//! marks (group, Service) pairs to judge again: a Service of a namespace with the groups
//! reaching it when the Service changes or a pod there that it selects (before or after)
//! changes, every Service of a namespace with the groups whose namespace selector starts or
//! stops matching it. A group whose own rules are redone (its spec, a group it names) judges
//! every Service it reaches again.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use crate::{
    index::{
        EgressReach, GroupEntry, GroupId, Index, NsSelectorId, PodEntry, PodId, ServiceEntry,
        StoredPod,
    },
    model::{ObjectKey, PortProtocol, ServicePort, TargetPort},
    peers::{fingerprinted, host_block, FingerprintedRule},
    plan::{PeerBlock, PlannedRule, PortSpec, RuleProtocol},
    sets::SetSource,
    validate::{CheckedPeer, CheckedPort, CheckedRule},
};

/// The rule protocol of a Service port.
fn rule_protocol(p: PortProtocol) -> RuleProtocol {
    match p {
        PortProtocol::Tcp => RuleProtocol::Tcp,
        PortProtocol::Udp => RuleProtocol::Udp,
        PortProtocol::Sctp => RuleProtocol::Sctp,
    }
}

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

/// Whether egress rule `rule` of group `g` admits a connection to address `addr` of backend
/// `id` on port `port` with `protocol`: the same test a connection straight to the backend
/// meets. A pod peer admits it when its set holds the backend and the rule's ports allow
/// `port`, named ports resolved on the backend; an address block or "anyone" when it holds
/// `addr` and the rule's numeric ports allow `port` (addresses have no named ports).
fn admits(
    ix: &Index,
    g: &GroupEntry,
    rule: &CheckedRule,
    (id, b): (PodId, &PodEntry),
    addr: IpAddr,
    protocol: PortProtocol,
    port: u16,
) -> bool {
    let Some(peers) = &rule.peers else {
        return ports_allow(rule, port, protocol, None);
    };
    peers.iter().any(|peer| match peer {
        CheckedPeer::Block(block) => {
            block.cidr.contains(&addr)
                && !block.except.iter().any(|e| e.contains(&addr))
                && ports_allow(rule, port, protocol, None)
        }
        _ => SetSource::of_peer(&g.key.namespace, peer).is_some_and(|source| {
            source.holds(ix, id, b) && ports_allow(rule, port, protocol, Some(&b.pod))
        }),
    })
}

/// The backends of a Service: the pods of namespace `ns` its selector matches that hold an
/// address and are not finished (host-network ones included: they are endpoints too, at the
/// node's address).
fn backends_of<'a>(ix: &'a Index, ns: &str, s: &ServiceEntry) -> Vec<(PodId, &'a PodEntry)> {
    let mut ids = Vec::new();
    if let Some(sel) = s.resolvable() {
        ix.for_each_pod_matching(ns, Some(sel), |id, p| {
            if !p.deleted && !p.pod.terminated && !p.pod.ips.is_empty() {
                ids.push(id);
            }
        });
    }
    ids.sort_unstable();
    ids.into_iter()
        .filter_map(|id| ix.pod(id).map(|p| (id, p)))
        .collect()
}

/// The namespaces with Services that `rule` may admit some of: every one when the rule has an
/// address block or no peers (they admit pods wherever they are), else those its pod peers
/// select pods in. Sorted.
fn rule_namespaces<'a>(ix: &'a Index, g: &'a GroupEntry, rule: &'a CheckedRule) -> Vec<&'a str> {
    let with_services = ix.service_namespaces.iter().map(String::as_str);
    let Some(peers) = &rule.peers else {
        return with_services.collect();
    };
    if peers.iter().any(|p| matches!(p, CheckedPeer::Block(_))) {
        return with_services.collect();
    }
    let mut out: Vec<&str> = Vec::new();
    for peer in peers {
        match peer {
            CheckedPeer::Block(_) => {}
            CheckedPeer::Group(k) => out.push(&k.namespace),
            CheckedPeer::Pods {
                namespaces: None, ..
            } => out.push(&g.key.namespace),
            CheckedPeer::Pods {
                namespaces: Some(sel),
                ..
            } => {
                // The namespaces with Services are usually fewer than those a selector
                // matches (one that matches every namespace, say).
                if let Some(&sid) = ix.ns_selector_ids.get(sel) {
                    out.extend(
                        ix.service_namespaces
                            .iter()
                            .filter(|ns| ix.ns_selector_matches(sid, ns))
                            .map(String::as_str),
                    );
                }
            }
        }
    }
    out.retain(|ns| ix.service_namespaces.contains(*ns));
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether `rule` may admit port `p` at all, decided without looking at backends: the
/// protocol matches, and the rule's ports can allow the target port (a numeric target outside
/// every numeric port of the rule is allowed only by a named rule port resolving to it).
fn may_admit(rule: &CheckedRule, p: &ServicePort) -> bool {
    if rule.protocol != RuleProtocol::Any && rule.protocol != rule_protocol(p.protocol) {
        return false;
    }
    match (&rule.ports, &p.target_port) {
        (Some(items), TargetPort::Number(t)) => items.iter().any(|item| match item {
            CheckedPort::Range { first, last } => (*first..=*last).contains(t),
            CheckedPort::Named(_) => true,
            CheckedPort::Icmp { .. } => false,
        }),
        _ => true,
    }
}

/// Whether `rule` admits address `c` on port `p` by itself (an address block holding it, or
/// anyone, with a numeric port allowing the Service port): a rule for it would add nothing.
fn admits_directly(rule: &CheckedRule, c: IpAddr, p: &ServicePort) -> bool {
    let peers_ok = rule.peers.as_ref().is_none_or(|peers| {
        peers.iter().any(|peer| {
            matches!(peer, CheckedPeer::Block(b)
                if b.cidr.contains(&c) && !b.except.iter().any(|e| e.contains(&c)))
        })
    });
    peers_ok && ports_allow(rule, p.port, p.protocol, None)
}

/// The compiled rules egress rule `rule` gains from Service `s` (namespace `ns`, name `name`),
/// whose backends are `backends`: one per protocol allowing the admitted ports on the
/// ClusterIPs admitted, named `{origin} via Service ns/name`.
fn admitted(
    ix: &Index,
    g: &GroupEntry,
    rule: &CheckedRule,
    origin: &str,
    (ns, name, s): (&str, &str, &ServiceEntry),
    backends: &[(PodId, &PodEntry)],
    out: &mut Vec<FingerprintedRule>,
) {
    // (protocol, admitted ClusterIPs) → ports.
    let mut parts: BTreeMap<(RuleProtocol, Vec<PeerBlock>), Vec<PortSpec>> = BTreeMap::new();
    for p in s.service.ports.iter().filter(|p| may_admit(rule, p)) {
        let mut ips: Vec<PeerBlock> = s
            .service
            .cluster_ips
            .iter()
            .filter(|c| !admits_directly(rule, **c, p))
            .filter(|c| cluster_ip_admitted(ix, g, rule, backends, **c, p))
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
            protocol,
            ports,
            peers,
            sets: Vec::new(),
            origin: format!("{origin} via Service {ns}/{name}"),
        }));
    }
}

/// The compiled rules the egress rules of group `g` (accepted) gain from Service `name` of
/// namespace `ns`, in rule order; empty when it is gone or none of them admits it.
pub(crate) fn service_rules(
    ix: &Index,
    g: &GroupEntry,
    ns: &str,
    name: &str,
) -> Vec<FingerprintedRule> {
    let mut out = Vec::new();
    let Some(s) = ix.namespaces.get(ns).and_then(|e| e.services.get(name)) else {
        return out;
    };
    let Ok(checked) = &g.checked else {
        return out;
    };
    if !g.accepted() || s.resolvable().is_none() {
        return out;
    }
    let mut backends: Option<Vec<(PodId, &PodEntry)>> = None;
    for (i, rule) in checked.egress.iter().flatten().enumerate() {
        if !s.service.ports.iter().any(|p| may_admit(rule, p)) || !reaches(ix, g, rule, ns) {
            continue;
        }
        let backends = backends.get_or_insert_with(|| backends_of(ix, ns, s));
        if backends.is_empty() {
            break;
        }
        let origin = format!("{} egress[{i}]", g.key);
        admitted(ix, g, rule, &origin, (ns, name, s), backends, &mut out);
    }
    out
}

/// Every Service group `g` may admit, with the rules it gains from each (only those gaining
/// some): what [`service_rules`] says for every Service of the namespaces its egress rules
/// reach.
pub(crate) fn group_service_rules(
    ix: &Index,
    g: &GroupEntry,
) -> BTreeMap<ObjectKey, Vec<FingerprintedRule>> {
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
        for name in entry.services.keys() {
            let rules = service_rules(ix, g, ns, name);
            if !rules.is_empty() {
                out.insert(ObjectKey::new(ns, name.clone()), rules);
            }
        }
    }
    out
}

/// Whether `rule` of group `g` may admit pods of namespace `ns`.
fn reaches(ix: &Index, g: &GroupEntry, rule: &CheckedRule, ns: &str) -> bool {
    let Some(peers) = &rule.peers else {
        return true;
    };
    peers.iter().any(|peer| match peer {
        CheckedPeer::Block(_) => true,
        CheckedPeer::Group(k) => k.namespace == ns,
        CheckedPeer::Pods {
            namespaces: None, ..
        } => g.key.namespace == ns,
        CheckedPeer::Pods {
            namespaces: Some(sel),
            ..
        } => ix
            .ns_selector_ids
            .get(sel)
            .is_some_and(|&sid| ix.ns_selector_matches(sid, ns)),
    })
}

/// Whether the rule admits ClusterIP `c` on port `p`: some backend has an address of `c`'s
/// family, and the rule admits every such address.
fn cluster_ip_admitted(
    ix: &Index,
    g: &GroupEntry,
    rule: &CheckedRule,
    backends: &[(PodId, &PodEntry)],
    c: IpAddr,
    p: &ServicePort,
) -> bool {
    let mut some = false;
    for &(id, b) in backends {
        for &addr in b.pod.ips.iter().filter(|a| a.is_ipv4() == c.is_ipv4()) {
            some = true;
            let Some(port) = target_port(p, &b.pod) else {
                return false;
            };
            if !admits(ix, g, rule, (id, b), addr, p.protocol, port) {
                return false;
            }
        }
    }
    some
}

/// Where the egress rules of a group of `namespace` may admit Services: every namespace when a
/// rule admits addresses (an ipBlock, or anyone), else the namespaces its pod peers name
/// (selectors as their ids, which the caller has acquired). Nowhere when `egress` is omitted:
/// that allows everything already.
pub(crate) fn reach(ix: &Index, namespace: &str, egress: Option<&Vec<CheckedRule>>) -> EgressReach {
    let mut r = EgressReach::default();
    for rule in egress.into_iter().flatten() {
        let Some(peers) = &rule.peers else {
            r.everywhere = true;
            continue;
        };
        for peer in peers {
            match peer {
                CheckedPeer::Block(_) => r.everywhere = true,
                CheckedPeer::Group(k) => r.namespaces.push(k.namespace.clone()),
                CheckedPeer::Pods {
                    namespaces: None, ..
                } => r.namespaces.push(namespace.to_string()),
                CheckedPeer::Pods {
                    namespaces: Some(sel),
                    ..
                } => r.selectors.extend(ix.ns_selector_ids.get(sel).copied()),
            }
        }
    }
    r.namespaces.sort();
    r.namespaces.dedup();
    r.selectors.sort_unstable();
    r.selectors.dedup();
    r
}

/// (group, Service) pairs to judge again.
pub(crate) type Pairs = HashSet<(GroupId, ObjectKey)>;

/// Marks Services `names` of namespace `ns` to be judged again by every group whose egress
/// rules may admit them.
pub(crate) fn mark_reaching(ix: &Index, pairs: &mut Pairs, ns: &str, names: &[String]) {
    if names.is_empty() {
        return;
    }
    let mut mark = |g: GroupId| {
        for name in names {
            pairs.insert((g, ObjectKey::new(ns, name.clone())));
        }
    };
    ix.egress_everywhere.iter().copied().for_each(&mut mark);
    let Some(entry) = ix.namespaces.get(ns) else {
        return;
    };
    entry.egress_reach.iter().copied().for_each(&mut mark);
    for &sid in &entry.selected_by {
        selector_users(ix, sid).for_each(&mut mark);
    }
}

/// The groups whose egress peers use namespace selector `sid`.
pub(crate) fn selector_users(ix: &Index, sid: NsSelectorId) -> impl Iterator<Item = GroupId> + '_ {
    ix.ns_selectors
        .get(sid)
        .into_iter()
        .flat_map(|sel| sel.groups.keys().copied())
        .filter(move |&g| {
            ix.group(g)
                .is_some_and(|ge| ge.egress_reach.selectors.contains(&sid))
        })
}

/// The Services of namespace `ns` whose ClusterIPs can be admitted, by name.
pub(crate) fn resolvable_in(ix: &Index, ns: &str) -> Vec<String> {
    ix.namespaces
        .get(ns)
        .map(|e| {
            e.services
                .iter()
                .filter(|(_, s)| s.resolvable().is_some())
                .map(|(n, _)| n.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The Services of namespace `ns` a pod change (from `old` to `new`; `None`: absent) can
/// change the verdict on: something a backend is judged on changed (labels, addresses, ports,
/// host network, finished), and the Service selects the pod before or after.
pub(crate) fn touched_by_pod(
    ix: &Index,
    ns: &str,
    old: Option<&StoredPod>,
    new: Option<&StoredPod>,
) -> Vec<String> {
    let same = match (old, new) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.labels == b.labels
                && a.ips == b.ips
                && a.ports == b.ports
                && a.host_network == b.host_network
                && a.terminated == b.terminated
        }
        _ => false,
    };
    let Some(entry) = ix.namespaces.get(ns).filter(|_| !same) else {
        return Vec::new();
    };
    entry
        .services
        .iter()
        .filter(|(_, s)| {
            s.resolvable().is_some_and(|sel| {
                old.is_some_and(|p| sel.matches(&p.labels))
                    || new.is_some_and(|p| sel.matches(&p.labels))
            })
        })
        .map(|(n, _)| n.clone())
        .collect()
}
