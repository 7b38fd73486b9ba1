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
//! as extra compiled rules of the group's own (`… egress[i] via Service ns/name`), so a
//! Service's change redoes the rules of the groups that can reach it, nothing else.
//!
//! Backends are the pods of the Service's namespace its selector matches that hold an address
//! and are not finished, as the EndpointSlice controller lists them (readiness aside: a pod
//! about to become ready must be admitted before it gets traffic). A Service without a selector
//! (EndpointSlices written by hand), headless and ExternalName Services resolve nothing.
//!
//! Which groups a change can affect: a rule with an ipBlock peer or no peers can admit the
//! Services of every namespace; a rule with pod peers only those of the namespaces its peers
//! select pods in. [`crate::index::EgressReach`] records that per group and
//! [`mark_reaching`] marks the groups reaching a namespace when one of its Services changes, when
//! a pod there that a Service selects (before or after) changes, or when a namespace selector
//! of an egress peer starts or stops matching it.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use crate::{
    index::{
        EgressReach, GroupEntry, GroupId, Index, NsSelectorId, PodEntry, PodId, ServiceEntry,
        StoredPod,
    },
    model::{PortProtocol, ServicePort, TargetPort},
    peers::host_block,
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
fn backends<'a>(ix: &'a Index, ns: &str, s: &ServiceEntry) -> Vec<(PodId, &'a PodEntry)> {
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

/// The compiled rules egress rule `rule` of group `g` gains from Services: for each Service
/// it admits some port of, one rule per protocol allowing those ports on the ClusterIPs
/// admitted (named `{origin} via Service ns/name`). Sorted by Service, then protocol.
pub(crate) fn admitted(
    ix: &Index,
    g: &GroupEntry,
    rule: &CheckedRule,
    origin: &str,
) -> Vec<PlannedRule> {
    let mut out = Vec::new();
    if ix.service_namespaces.is_empty() {
        return out;
    }
    for ns in rule_namespaces(ix, g, rule) {
        let Some(entry) = ix.namespaces.get(ns) else {
            continue;
        };
        for (name, s) in &entry.services {
            let backends = backends(ix, ns, s);
            if backends.is_empty() {
                continue;
            }
            // (protocol, admitted ClusterIPs) → ports.
            let mut parts: BTreeMap<(RuleProtocol, Vec<PeerBlock>), Vec<PortSpec>> =
                BTreeMap::new();
            for p in &s.service.ports {
                let protocol = rule_protocol(p.protocol);
                if rule.protocol != RuleProtocol::Any && rule.protocol != protocol {
                    continue;
                }
                let mut ips: Vec<PeerBlock> = s
                    .service
                    .cluster_ips
                    .iter()
                    .filter(|c| cluster_ip_admitted(ix, g, rule, &backends, **c, p))
                    .map(|&c| host_block(c))
                    .collect();
                if ips.is_empty() {
                    continue;
                }
                ips.sort();
                ips.dedup();
                parts
                    .entry((protocol, ips))
                    .or_default()
                    .push(PortSpec::Range {
                        first: p.port,
                        last: p.port,
                    });
            }
            for ((protocol, peers), mut ports) in parts {
                ports.sort();
                ports.dedup();
                out.push(PlannedRule {
                    protocol,
                    ports,
                    peers,
                    sets: Vec::new(),
                    origin: format!("{origin} via Service {ns}/{name}"),
                });
            }
        }
    }
    out
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

/// Marks the rules of every group whose egress rules may admit the Services of namespace
/// `ns`.
pub(crate) fn mark_reaching(ix: &Index, rules: &mut HashSet<GroupId>, ns: &str) {
    rules.extend(ix.egress_everywhere.iter().copied());
    let Some(entry) = ix.namespaces.get(ns) else {
        return;
    };
    rules.extend(entry.egress_reach.iter().copied());
    for &sid in &entry.selected_by {
        mark_selector_users(ix, rules, sid);
    }
}

/// Marks the rules of the groups whose egress peers use namespace selector `sid`.
pub(crate) fn mark_selector_users(ix: &Index, rules: &mut HashSet<GroupId>, sid: NsSelectorId) {
    let Some(sel) = ix.ns_selectors.get(sid) else {
        return;
    };
    rules.extend(sel.groups.keys().copied().filter(|&g| {
        ix.group(g)
            .is_some_and(|ge| ge.egress_reach.selectors.contains(&sid))
    }));
}

/// Whether namespace `ns` has a Service whose ClusterIPs can be admitted.
pub(crate) fn has_resolvable(ix: &Index, ns: &str) -> bool {
    ix.namespaces
        .get(ns)
        .is_some_and(|e| e.services.values().any(|s| s.resolvable().is_some()))
}

/// Whether a pod change in namespace `ns` (from `old` to `new`; `None`: absent) can change
/// what a Service there admits: something a backend is judged on changed (labels, addresses,
/// ports, host network, finished) and some Service selects the pod before or after.
pub(crate) fn pod_change_matters(
    ix: &Index,
    ns: &str,
    old: Option<&StoredPod>,
    new: Option<&StoredPod>,
) -> bool {
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
    if same {
        return false;
    }
    let Some(entry) = ix.namespaces.get(ns) else {
        return false;
    };
    entry.services.values().any(|s| {
        s.resolvable().is_some_and(|sel| {
            old.is_some_and(|p| sel.matches(&p.labels))
                || new.is_some_and(|p| sel.matches(&p.labels))
        })
    })
}
