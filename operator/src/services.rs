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
        Backends, EgressReach, GroupEntry, GroupId, Index, NsSelectorId, PodEntry, PodId,
        ServiceEntry, StoredPod, Targets,
    },
    model::{ObjectKey, PortProtocol, ServicePort, TargetPort},
    peers::{fingerprinted, host_block, FingerprintedRule},
    plan::{PeerBlock, PlannedRule, PortSpec, RuleProtocol},
    selector::Selector,
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
        return ports_allow(rule, port, protocol, None);
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
            let each: Option<Vec<u16>> = pods
                .iter()
                .map(|&id| ix.pod(id).and_then(|p| target_port(sp, &p.pod)))
                .collect();
            each.map(|each| {
                let mut distinct = each.clone();
                distinct.sort_unstable();
                distinct.dedup();
                Targets { each, distinct }
            })
        })
        .collect();
    Backends { pods, targets }
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

/// Whether `rule` may admit a Service port whose backends' target ports are `targets`,
/// decided without judging each backend: the protocol matches, every backend has the target
/// port, and the rule's ports can allow all of them (each numerically, unless a named rule port
/// may resolve to it on a backend).
fn may_admit(rule: &CheckedRule, p: &ServicePort, targets: Option<&Targets>) -> bool {
    if rule.protocol != RuleProtocol::Any && rule.protocol != rule_protocol(p.protocol) {
        return false;
    }
    let Some(targets) = targets.filter(|t| !t.each.is_empty()) else {
        return false;
    };
    let Some(items) = &rule.ports else {
        return true;
    };
    if items.iter().any(|i| matches!(i, CheckedPort::Named(_))) {
        return true;
    }
    targets.distinct.iter().all(|t| {
        items.iter().any(
            |i| matches!(i, CheckedPort::Range { first, last } if (*first..=*last).contains(t)),
        )
    })
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
    let peers = Matcher::of(ix, g, rule);
    let peers = peers.as_deref();
    // (protocol, admitted ClusterIPs) → ports.
    let mut parts: BTreeMap<(RuleProtocol, Vec<PeerBlock>), Vec<PortSpec>> = BTreeMap::new();
    for (p, targets) in s.service.ports.iter().zip(&s.backends.targets) {
        let Some(targets) = targets.as_ref().filter(|t| may_admit(rule, p, Some(t))) else {
            continue;
        };
        let mut ips: Vec<PeerBlock> = s
            .service
            .cluster_ips
            .iter()
            .filter(|c| !admits_directly(rule, **c, p))
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
            protocol,
            ports,
            peers,
            sets: Vec::new(),
            origin: format!("{origin} via Service {ns}/{name}"),
        }));
    }
}

/// The compiled rules the egress rules of group `g` gain from Service `name` of namespace `ns`,
/// in rule order; empty when it is gone, `g` is not accepted, or none of them admits it.
pub(crate) fn service_rules(
    ix: &Index,
    g: &GroupEntry,
    ns: &str,
    name: &str,
) -> Vec<FingerprintedRule> {
    let mut out = Vec::new();
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
    out: &mut Vec<FingerprintedRule>,
) {
    if s.resolvable().is_none() {
        return;
    }
    let mut backends: Option<Option<Vec<(PodId, &PodEntry)>>> = None;
    for (i, rule) in egress.into_iter().flatten().enumerate() {
        let some_port = s
            .service
            .ports
            .iter()
            .zip(&s.backends.targets)
            .any(|(p, t)| may_admit(rule, p, t.as_ref()));
        if !some_port || !reaches(ix, g, rule, ns) {
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
        let origin = format!("{} egress[{i}]", g.key);
        admitted(ix, g, rule, &origin, (ns, name, s), backends, out);
    }
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
        for (name, s) in &entry.services {
            let mut rules = Vec::new();
            judge(ix, g, checked.egress.as_deref(), (ns, name, s), &mut rules);
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

/// Whether the rule admits ClusterIP `c` on port `p`, which sends to `targets` (in `backends`
/// order): some backend has an address of `c`'s family, and the rule admits every such
/// address on the backend's target port.
fn cluster_ip_admitted(
    ix: &Index,
    rule: &CheckedRule,
    peers: Option<&[Matcher<'_>]>,
    backends: &[(PodId, &PodEntry)],
    targets: &[u16],
    c: IpAddr,
    p: &ServicePort,
) -> bool {
    let mut some = false;
    for (&(id, b), &port) in backends.iter().zip(targets) {
        for &addr in b.pod.ips.iter().filter(|a| a.is_ipv4() == c.is_ipv4()) {
            some = true;
            if !admits(ix, rule, peers, (id, b), addr, p.protocol, port) {
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
