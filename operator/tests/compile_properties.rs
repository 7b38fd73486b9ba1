//! Property tests of the compiler on random small clusters of SecurityGroups and Kubernetes
//! NetworkPolicies (random `networking.k8s.io/v1` objects translated by
//! `kubesg_operator::netpol::group`, as the operator reads them).
//!
//! 1. Verdicts: for random packets between pods, Services' ClusterIPs and outside addresses
//!    (Services resolved to the pods behind them, every backend admitted), what the compiled plan
//!    allows equals the reference evaluation (`kubesg_operator::reference`), written straight
//!    from the SecurityGroup and NetworkPolicy semantics: selectors, peers, named ports and the
//!    composition of layers read from the raw objects, without any of the compiler's data
//!    structures. The compiled side is the agent's own verdict: the pod's policy is sent through
//!    the wire form (`kubesg_operator::wire::policy`) and the agent's conversion into its
//!    `CompiledPolicy`, whose `judge` (layer by layer when the policy is layered) decides; this
//!    test's own evaluation of the compiled rules (`rule_allows`, layers intersected) must agree
//!    with it.
//! 2. Incremental = full: after every change of a random sequence, the incremental compiler's
//!    plan equals a full compile of the resulting cluster, and the changes it reports are
//!    exactly the nodes and groups whose plan and report differ.

mod compile_support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use compile_support::{rule_allows, ICMP, ICMPV6, SCTP, TCP, UDP};
use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use kubesg_agent::policy as agent;
use kubesg_common::Direction;
use kubesg_operator::{
    changes::ClusterChange,
    compile::{compile, Compiler},
    crd::{
        EgressRule, GroupRef, IcmpType, IngressRule, IpBlock, Peer, Port, Protocol,
        SecurityGroupSpec,
    },
    model::{
        Cluster, Group, GroupKind, NamedPort, Namespace, ObjectKey, Pod, PortProtocol, Service,
        ServicePort, TargetPort,
    },
    netpol,
    plan::{Layer, Plan, PlannedPolicy, PlannedRule, PortSpec, RuleProtocol},
    reference, wire,
};
use kubesg_proto::v1alpha1 as pb;
use proptest::{prelude::*, sample::select};

// ---------------------------------------------------------------------------------------------
// Random clusters.

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 2] = ["n1", "n2"];
const POD_KEYS: [&str; 2] = ["app", "tier"];
const POD_VALUES: [&str; 3] = ["x", "y", "z"];
const NS_KEYS: [&str; 2] = ["team", "env"];
const NS_VALUES: [&str; 2] = ["x", "y"];
const MAX_PODS: usize = 8;

fn label_map(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(
        select(keys).prop_map(String::from),
        select(values).prop_map(String::from),
        0..=keys.len(),
    )
}

fn selector(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = LabelSelector> {
    let requirement = (
        select(keys),
        select(&["In", "NotIn", "Exists", "DoesNotExist"][..]),
        proptest::sample::subsequence(values, 1..=2),
    )
        .prop_map(|(k, op, vals)| LabelSelectorRequirement {
            key: k.into(),
            operator: op.into(),
            values: matches!(op, "In" | "NotIn")
                .then(|| vals.iter().map(|v| v.to_string()).collect()),
        });
    (
        proptest::option::of(proptest::collection::btree_map(
            select(keys).prop_map(String::from),
            select(values).prop_map(String::from),
            0..=1,
        )),
        proptest::option::of(proptest::collection::vec(requirement, 0..=2)),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

/// Pod `i`'s addresses: 10.0.0.(i+1) and fd00::(i+1), both, one or none.
fn pod_ips(i: usize, family: u8) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    if family & 1 != 0 {
        ips.push(format!("10.0.0.{}", i + 1).parse().unwrap());
    }
    if family & 2 != 0 {
        ips.push(format!("fd00::{:x}", i + 1).parse().unwrap());
    }
    ips
}

/// The data of a pod, its key and addresses fixed by its index.
fn pod_data(i: usize) -> impl Strategy<Value = Pod> {
    (
        label_map(&POD_KEYS, &POD_VALUES),
        prop_oneof![Just(3u8), Just(1), Just(2), Just(0)],
        prop_oneof![
            4 => select(&NODES[..]).prop_map(|n| Some(n.to_string())),
            1 => Just(None),
        ],
        proptest::bool::weighted(0.1),
        proptest::bool::weighted(0.1),
        select(
            &[
                None,
                Some((80u16, PortProtocol::Tcp)),
                Some((8080, PortProtocol::Tcp)),
                Some((80, PortProtocol::Udp)),
            ][..],
        ),
        select(&[None, Some(53u16), Some(5353)][..]),
        0u8..3,
    )
        .prop_map(
            move |(labels, family, node, host_network, terminated, http, dns, uid)| {
                let mut ports = Vec::new();
                if let Some((port, protocol)) = http {
                    ports.push(NamedPort {
                        name: "http".into(),
                        port,
                        protocol,
                    });
                }
                if let Some(port) = dns {
                    ports.push(NamedPort {
                        name: "dns".into(),
                        port,
                        protocol: PortProtocol::Udp,
                    });
                }
                Pod {
                    uid: format!("uid-{i}-{uid}"),
                    node,
                    labels,
                    ips: pod_ips(i, family),
                    ports,
                    host_network,
                    terminated,
                    deleting: false,
                }
            },
        )
}

fn pod_key(i: usize) -> ObjectKey {
    ObjectKey::new(NAMESPACES[i % NAMESPACES.len()], format!("p{i}"))
}

/// Services per namespace.
const SERVICES_PER_NS: usize = 2;

/// Service `j` of namespace `ns` (index into [`NAMESPACES`]).
fn service_key(ns: usize, j: usize) -> ObjectKey {
    ObjectKey::new(NAMESPACES[ns], format!("s{j}"))
}

/// A Service's ClusterIPs, fixed by its key: 10.96.0.N and fd00:96::N (N numbers the keys),
/// both, one or none (headless), apart from every pod and outside address.
fn cluster_ips(ns: usize, j: usize, family: u8) -> Vec<IpAddr> {
    let n = ns * SERVICES_PER_NS + j + 1;
    let mut ips = Vec::new();
    if family & 1 != 0 {
        ips.push(format!("10.96.0.{n}").parse().unwrap());
    }
    if family & 2 != 0 {
        ips.push(format!("fd00:96::{n:x}").parse().unwrap());
    }
    ips
}

fn service_port() -> impl Strategy<Value = ServicePort> {
    let number = |n| TargetPort::Number(n);
    let name = |n: &str| TargetPort::Name(n.into());
    select(vec![
        (PortProtocol::Tcp, 80, number(8080)),
        (PortProtocol::Tcp, 80, name("http")),
        (PortProtocol::Tcp, 80, number(80)),
        (PortProtocol::Udp, 53, name("dns")),
        (PortProtocol::Udp, 53, number(5353)),
        (PortProtocol::Tcp, 443, number(443)),
        (PortProtocol::Tcp, 8080, number(80)),
        (PortProtocol::Udp, 80, name("http")),
        (PortProtocol::Sctp, 80, number(80)),
        (PortProtocol::Tcp, 53, name("nope")),
    ])
    .prop_map(|(protocol, port, target_port)| ServicePort {
        protocol,
        port,
        target_port,
    })
}

/// A Service of namespace `ns`, number `j`: a selector of pod labels (empty: selector-less),
/// its ClusterIPs, one or two ports.
fn service_data(ns: usize, j: usize) -> impl Strategy<Value = Service> {
    (
        proptest::collection::btree_map(
            select(&POD_KEYS[..]).prop_map(String::from),
            select(&POD_VALUES[..]).prop_map(String::from),
            0..=2,
        ),
        prop_oneof![4 => Just(3u8), 2 => Just(1), 1 => Just(2), 1 => Just(0)],
        proptest::collection::vec(service_port(), 1..=2),
    )
        .prop_map(move |(selector, family, ports)| Service {
            selector,
            cluster_ips: cluster_ips(ns, j, family),
            ports,
        })
}

fn any_service() -> impl Strategy<Value = (ObjectKey, Service)> {
    (0..NAMESPACES.len(), 0..SERVICES_PER_NS)
        .prop_flat_map(|(ns, j)| service_data(ns, j).prop_map(move |s| (service_key(ns, j), s)))
}

fn port_item() -> impl Strategy<Value = Port> {
    select(vec![
        (IntOrString::Int(53), None),
        (IntOrString::Int(80), None),
        (IntOrString::Int(443), None),
        (IntOrString::Int(8080), None),
        (IntOrString::Int(8000), Some(8100)),
        (IntOrString::Int(50), Some(90)),
        (IntOrString::String(String::new()), None),
    ])
    .prop_flat_map(|(port, end_port)| {
        let named = matches!(&port, IntOrString::String(_));
        let port = port.clone();
        select(&["http", "dns", "nope"][..]).prop_map(move |name| Port {
            port: if named {
                IntOrString::String(name.into())
            } else {
                port.clone()
            },
            end_port,
        })
    })
}

fn peer() -> impl Strategy<Value = Peer> {
    let blocks: &[(&str, &[&str])] = &[
        ("10.0.0.0/24", &[]),
        ("10.0.0.0/24", &["10.0.0.0/28"]),
        ("10.0.0.0/24", &["10.0.0.8/29", "10.0.0.2/32"]),
        ("10.0.0.0/28", &[]),
        ("0.0.0.0/0", &["10.0.0.0/30"]),
        ("fd00::/120", &["fd00::/126"]),
        ("::/0", &[]),
        ("192.0.2.0/24", &[]),
        // Invalid: the except is outside the cidr (the group is not accepted).
        ("10.0.1.0/24", &["10.0.0.0/24"]),
    ];
    prop_oneof![
        (0usize..5, proptest::option::of(select(&NAMESPACES[..]))).prop_map(|(g, ns)| Peer {
            security_group: Some(GroupRef {
                name: format!("g{g}"),
                namespace: ns.map(String::from),
            }),
            ..Peer::default()
        }),
        selector(&POD_KEYS, &POD_VALUES).prop_map(|s| Peer {
            pod_selector: Some(s),
            ..Peer::default()
        }),
        selector(&NS_KEYS, &NS_VALUES).prop_map(|s| Peer {
            namespace_selector: Some(s),
            ..Peer::default()
        }),
        (
            selector(&POD_KEYS, &POD_VALUES),
            selector(&NS_KEYS, &NS_VALUES)
        )
            .prop_map(|(p, n)| {
                Peer {
                    pod_selector: Some(p),
                    namespace_selector: Some(n),
                    ..Peer::default()
                }
            }),
        select(blocks).prop_map(|(cidr, except)| Peer {
            ip_block: Some(IpBlock {
                cidr: cidr.into(),
                except: (!except.is_empty())
                    .then(|| except.iter().map(|e| e.to_string()).collect()),
            }),
            ..Peer::default()
        }),
    ]
}

/// A rule as (protocol, ports, icmpTypes, peers), valid for its protocol.
type RawRule = (
    Protocol,
    Option<Vec<Port>>,
    Option<Vec<IcmpType>>,
    Option<Vec<Peer>>,
);

fn rule() -> impl Strategy<Value = RawRule> {
    let icmp = [
        IcmpType {
            icmp_type: 8,
            code: None,
        },
        IcmpType {
            icmp_type: 8,
            code: Some(0),
        },
        IcmpType {
            icmp_type: 128,
            code: None,
        },
        IcmpType {
            icmp_type: 13,
            code: Some(1),
        },
    ];
    (
        select(
            &[
                Protocol::Tcp,
                Protocol::Tcp,
                Protocol::Udp,
                Protocol::Sctp,
                Protocol::Icmp,
                Protocol::Icmpv6,
                Protocol::Any,
            ][..],
        ),
        proptest::option::of(proptest::collection::vec(port_item(), 0..=3)),
        proptest::option::of(proptest::sample::subsequence(icmp.to_vec(), 0..=2)),
        proptest::option::weighted(0.8, proptest::collection::vec(peer(), 0..=3)),
    )
        .prop_map(|(protocol, ports, icmp, peers)| {
            let has_ports = matches!(protocol, Protocol::Tcp | Protocol::Udp | Protocol::Sctp);
            let is_icmp = matches!(protocol, Protocol::Icmp | Protocol::Icmpv6);
            (
                protocol,
                ports.filter(|_| has_ports),
                icmp.filter(|_| is_icmp),
                peers,
            )
        })
}

fn group_spec() -> impl Strategy<Value = Group> {
    (
        1i64..=3,
        selector(&POD_KEYS, &POD_VALUES),
        proptest::option::weighted(0.8, proptest::collection::vec(rule(), 0..=3)),
        proptest::option::weighted(0.8, proptest::collection::vec(rule(), 0..=3)),
    )
        .prop_map(|(generation, pod_selector, ingress, egress)| Group {
            generation,
            spec: SecurityGroupSpec {
                pod_selector,
                ingress: ingress.map(|rs| {
                    rs.into_iter()
                        .map(|(protocol, ports, icmp_types, from)| IngressRule {
                            protocol,
                            ports,
                            icmp_types,
                            from,
                        })
                        .collect()
                }),
                egress: egress.map(|rs| {
                    rs.into_iter()
                        .map(|(protocol, ports, icmp_types, to)| EgressRule {
                            protocol,
                            ports,
                            icmp_types,
                            to,
                        })
                        .collect()
                }),
            },
            kind: GroupKind::SecurityGroup,
            origins: None,
            unreadable: None,
        })
}

fn group_key() -> impl Strategy<Value = ObjectKey> {
    (select(&NAMESPACES[..]), 0usize..4).prop_map(|(ns, g)| ObjectKey::new(ns, format!("g{g}")))
}

// Random NetworkPolicies, as the API server would accept them (it validates them before the
// operator sees them): an `endPort` only with a numeric port, excepts inside their cidr.

/// A NetworkPolicy port item: protocol omitted (TCP) or named, and no port (every port of the
/// protocol), a number, a range or a container port's name.
fn np_port() -> impl Strategy<Value = NetworkPolicyPort> {
    let protocol = select(&[None, Some("TCP"), Some("UDP"), Some("SCTP")][..]);
    let port = prop_oneof![
        1 => Just((None, None)),
        3 => select(&[53, 80, 443, 8080, 5353][..]).prop_map(|n| (Some(IntOrString::Int(n)), None)),
        2 => select(&[(8000, 8100), (50, 90), (53, 80)][..])
            .prop_map(|(n, e)| (Some(IntOrString::Int(n)), Some(e))),
        3 => select(&["http", "dns", "nope"][..])
            .prop_map(|n| (Some(IntOrString::String(n.into())), None)),
    ];
    (protocol, port).prop_map(|(protocol, (port, end_port))| NetworkPolicyPort {
        protocol: protocol.map(String::from),
        port,
        end_port,
    })
}

/// A NetworkPolicy peer: a pod selector (this namespace), a namespace selector (often `{}`:
/// every namespace), both in one peer, or an ipBlock (some with excepts, some holding pods).
fn np_peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    let blocks: &[(&str, &[&str])] = &[
        ("10.0.0.0/24", &[]),
        ("10.0.0.0/24", &["10.0.0.0/28"]),
        ("10.0.0.0/24", &["10.0.0.8/29", "10.0.0.2/32"]),
        ("10.0.0.0/28", &[]),
        ("10.0.0.3/32", &[]),
        ("0.0.0.0/0", &["10.0.0.0/30"]),
        // Upstream's "except clause" test: a large block holding pods and ClusterIPs alike,
        // except one pod.
        ("0.0.0.0/4", &["10.0.0.2/32"]),
        ("fd00::/16", &["fd00::2/128"]),
        ("fd00::/120", &["fd00::/126"]),
        ("::/0", &[]),
        ("192.0.2.0/24", &[]),
    ];
    let ns_selector = prop_oneof![
        1 => Just(LabelSelector::default()),
        2 => selector(&NS_KEYS, &NS_VALUES),
    ];
    prop_oneof![
        2 => selector(&POD_KEYS, &POD_VALUES).prop_map(|s| NetworkPolicyPeer {
            pod_selector: Some(s),
            ..NetworkPolicyPeer::default()
        }),
        2 => ns_selector.clone().prop_map(|s| NetworkPolicyPeer {
            namespace_selector: Some(s),
            ..NetworkPolicyPeer::default()
        }),
        2 => (selector(&POD_KEYS, &POD_VALUES), ns_selector).prop_map(|(p, n)| {
            NetworkPolicyPeer {
                pod_selector: Some(p),
                namespace_selector: Some(n),
                ..NetworkPolicyPeer::default()
            }
        }),
        2 => select(blocks).prop_map(|(cidr, except)| NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.into(),
                except: (!except.is_empty())
                    .then(|| except.iter().map(|e| e.to_string()).collect()),
            }),
            ..NetworkPolicyPeer::default()
        }),
    ]
}

/// A NetworkPolicy rule's ports and peers, each omitted, empty (both: every port, anyone) or
/// listed.
type NpRule = (
    Option<Vec<NetworkPolicyPort>>,
    Option<Vec<NetworkPolicyPeer>>,
);

fn np_rule() -> impl Strategy<Value = NpRule> {
    (
        proptest::option::weighted(0.7, proptest::collection::vec(np_port(), 0..=3)),
        proptest::option::weighted(0.8, proptest::collection::vec(np_peer(), 0..=3)),
    )
}

/// A NetworkPolicy object, `policyTypes` omitted (defaulted by the translation), empty or
/// listed, with rules in either direction or none (a default deny).
fn network_policy(ns: &'static str, name: String) -> impl Strategy<Value = NetworkPolicy> {
    let types: &[Option<&[&str]>] = &[
        None,
        None,
        Some(&[]),
        Some(&["Ingress"]),
        Some(&["Egress"]),
        Some(&["Ingress", "Egress"]),
        Some(&["Egress", "Ingress"]),
    ];
    (
        1i64..=3,
        prop_oneof![
            1 => Just(LabelSelector::default()),
            3 => selector(&POD_KEYS, &POD_VALUES),
        ],
        select(types),
        proptest::option::weighted(0.75, proptest::collection::vec(np_rule(), 0..=3)),
        proptest::option::weighted(0.6, proptest::collection::vec(np_rule(), 0..=3)),
    )
        .prop_map(
            move |(generation, pod_selector, types, ingress, egress)| NetworkPolicy {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.into()),
                    generation: Some(generation),
                    ..ObjectMeta::default()
                },
                spec: Some(NetworkPolicySpec {
                    pod_selector: Some(pod_selector),
                    policy_types: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
                    ingress: ingress.map(|rs| {
                        rs.into_iter()
                            .map(|(ports, from)| NetworkPolicyIngressRule { ports, from })
                            .collect()
                    }),
                    egress: egress.map(|rs| {
                        rs.into_iter()
                            .map(|(ports, to)| NetworkPolicyEgressRule { ports, to })
                            .collect()
                    }),
                }),
            },
        )
}

/// A random NetworkPolicy as the compiler's group, under its key (`networkpolicy/np<i>`).
fn np_group() -> impl Strategy<Value = (ObjectKey, Group)> {
    (select(&NAMESPACES[..]), 0usize..3).prop_flat_map(|(ns, i)| {
        network_policy(ns, format!("np{i}")).prop_map(|np| {
            netpol::group(&np).expect("a NetworkPolicy the API server accepts translates")
        })
    })
}

fn np_key() -> impl Strategy<Value = ObjectKey> {
    (select(&NAMESPACES[..]), 0usize..3).prop_map(|(ns, i)| netpol::key(ns, &format!("np{i}")))
}

fn namespaces() -> impl Strategy<Value = BTreeMap<String, Namespace>> {
    proptest::collection::vec(
        proptest::option::weighted(0.85, label_map(&NS_KEYS, &NS_VALUES)),
        NAMESPACES.len(),
    )
    .prop_map(|v| {
        v.into_iter()
            .zip(NAMESPACES)
            .filter_map(|(labels, name)| {
                labels.map(|labels| (name.to_string(), Namespace { labels }))
            })
            .collect()
    })
}

fn cluster() -> impl Strategy<Value = Cluster> {
    (
        namespaces(),
        (0..MAX_PODS)
            .map(|i| proptest::option::weighted(0.8, pod_data(i)))
            .collect::<Vec<_>>(),
        proptest::collection::vec((group_key(), group_spec()), 0..=5),
        proptest::bool::ANY,
        proptest::collection::vec(
            (
                any_service(),
                proptest::option::weighted(0.75, (0..MAX_PODS, 1u8..4)),
            ),
            0..=4,
        ),
        // Last, so that the SecurityGroup part of a stored seed's cluster stays what it was.
        proptest::collection::vec(np_group(), 0..=3),
    )
        .prop_map(|(namespaces, pods, groups, extra_node, services, nps)| {
            let mut c = Cluster {
                namespaces,
                ..Cluster::default()
            };
            c.nodes.insert("n1".into());
            if extra_node {
                c.nodes.insert("n2".into());
            }
            for (i, p) in pods.into_iter().enumerate() {
                if let Some(p) = p {
                    c.pods.insert(pod_key(i), p);
                }
            }
            c.groups.extend(groups);
            c.groups.extend(nps);
            for ((key, service), backend) in services {
                let (key, service) = match backend {
                    Some((i, mask)) => selecting(&c, i, mask, key, service),
                    None => (key, service),
                };
                c.services.insert(key, service);
            }
            c
        })
}

/// Most Services of a random cluster select pods that exist (random selectors seldom would):
/// the Service moves to pod `i`'s namespace and selects some of its labels (bits of `mask`
/// pick among them; all of them when none is picked). Unchanged when the pod has no labels.
fn selecting(
    c: &Cluster,
    i: usize,
    mask: u8,
    key: ObjectKey,
    mut service: Service,
) -> (ObjectKey, Service) {
    let Some(pod) = c.pods.get(&pod_key(i)).filter(|p| !p.labels.is_empty()) else {
        return (key, service);
    };
    let mut selector: BTreeMap<String, String> = pod
        .labels
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, (k, v))| (k.clone(), v.clone()))
        .collect();
    if selector.is_empty() {
        selector = pod.labels.clone();
    }
    let ns = i % NAMESPACES.len();
    let j: usize = key.name[1..].parse().unwrap();
    let family = u8::from(service.cluster_ips.iter().any(|a| a.is_ipv4()))
        | (u8::from(service.cluster_ips.iter().any(|a| a.is_ipv6())) << 1);
    service.selector = selector;
    service.cluster_ips = cluster_ips(ns, j, family);
    (service_key(ns, j), service)
}

// ---------------------------------------------------------------------------------------------
// The compiled side.

/// The pod's policy with its address sets resolved, as the agent enforces it.
fn planned_policy(plan: &Plan, c: &Cluster, pod: &ObjectKey) -> Option<PlannedPolicy> {
    let node = c.pods[pod].node.as_ref()?;
    let np = plan.nodes.get(node)?;
    let id = np.pods.get(pod)?.policy.as_ref()?;
    np.resolved_policy(id)
}

fn to_agent(r: &PlannedRule) -> agent::Rule {
    agent::Rule {
        protocol: match r.protocol {
            RuleProtocol::Any => agent::Protocol::Any,
            RuleProtocol::Tcp => agent::Protocol::Tcp,
            RuleProtocol::Udp => agent::Protocol::Udp,
            RuleProtocol::Sctp => agent::Protocol::Sctp,
            RuleProtocol::Icmp => agent::Protocol::Icmp,
            RuleProtocol::Icmpv6 => agent::Protocol::Icmpv6,
        },
        ports: r
            .ports
            .iter()
            .map(|p| match *p {
                PortSpec::Range { first, last } => agent::PortMatch::Range { first, last },
                PortSpec::Icmp { icmp_type, code } => agent::PortMatch::Icmp { icmp_type, code },
            })
            .collect(),
        peers: r
            .peers
            .iter()
            .map(|b| agent::PeerBlock {
                cidr: b.cidr,
                except: b.except.clone(),
            })
            .collect(),
        origin: r.origin.clone(),
        layer: match r.layer {
            Layer::SecurityGroups => agent::Layer::SecurityGroups,
            Layer::NetworkPolicies => agent::Layer::NetworkPolicies,
        },
    }
}

/// The policy as the agent holds it: the operator's wire form of it, converted by the agent as
/// an update it receives (addresses resolved already, so no address sets).
fn agent_policy(p: &PlannedPolicy) -> agent::CompiledPolicy {
    let update = pb::PolicyUpdate {
        version: 1,
        snapshot: true,
        upsert_policies: vec![wire::policy("p", p)],
        ..pb::PolicyUpdate::default()
    };
    let mut converted = kubesg_agent::convert::update(&update)
        .unwrap_or_else(|e| panic!("the agent refuses {p:?}: {e}"))
        .upsert_policies;
    assert_eq!(converted.len(), 1);
    let (_, policy) = converted.remove(0);
    // The rules are the ones this test maps itself, layer included.
    let rules = |rs: &[PlannedRule]| rs.iter().map(to_agent).collect::<Vec<_>>();
    assert_eq!(policy.ingress, rules(&p.ingress), "ingress rules of {p:?}");
    assert_eq!(policy.egress, rules(&p.egress), "egress rules of {p:?}");
    policy
}

/// Whether the policy allows a NEW connection in `dir` with `remote`, as the agent judges it
/// (`CompiledPolicy::judge`, not from the node itself). Asserts that this test's own evaluation
/// agrees: each compiled rule read by `rule_allows` as the agent's `Rule::allows` reads it, and
/// the rules of an unlayered policy adding up, those of a layered one adding up within each
/// layer listed for the direction, every listed layer having to allow.
fn compiled_allows(
    p: &PlannedPolicy,
    dir: Direction,
    proto: u8,
    port: u16,
    remote: IpAddr,
) -> bool {
    let rules = match dir {
        Direction::Ingress => &p.ingress,
        Direction::Egress => &p.egress,
    };
    let agent = agent_policy(p);
    let mut allowing = BTreeSet::new();
    for (r, a) in rules.iter().zip(agent.rules(dir)) {
        let ours = rule_allows(r, proto, port, remote);
        assert_eq!(
            ours,
            a.allows(proto, port, remote),
            "the agent reads {r:?} differently"
        );
        if ours {
            allowing.insert(r.layer);
        }
    }
    let ours = match &p.layers {
        None => !allowing.is_empty(),
        Some(l) => {
            let listed = match dir {
                Direction::Ingress => &l.ingress,
                Direction::Egress => &l.egress,
            };
            listed.iter().all(|layer| allowing.contains(layer))
        }
    };
    let judged = agent.judge(dir, proto, port, remote, false).allowed();
    assert_eq!(
        ours, judged,
        "the agent judges {dir:?} {proto}/{port} with {remote} differently under {p:?}"
    );
    judged
}

const OUTSIDE: [&str; 5] = [
    "10.0.0.200",
    "192.0.2.5",
    "203.0.113.9",
    "fd00::ff",
    "2001:db8::1",
];
const PROTOS: [u8; 6] = [TCP, TCP, UDP, SCTP, ICMP, ICMPV6];
const PORTS: [u16; 7] = [53, 80, 443, 8080, 8050, 5353, 1];
const ICMP_MESSAGES: [u16; 5] = [8 << 8, (8 << 8) | 1, 0, (13 << 8) | 1, 128 << 8];

type Packet = (usize, usize, usize, usize);

fn check_verdicts(c: &Cluster, plan: &Plan, packets: &[Packet]) -> Result<(), TestCaseError> {
    // Every enforced pod on a node is on that node's plan, and nothing else is.
    for (k, p) in &c.pods {
        let on_plan = plan.nodes.values().any(|n| n.pods.contains_key(k));
        prop_assert_eq!(on_plan, reference::enforced(p) && p.node.is_some(), "{}", k);
    }
    let mut addrs: Vec<IpAddr> = c
        .pods
        .values()
        .flat_map(|p| p.ips.iter().copied())
        .collect();
    addrs.extend(OUTSIDE.iter().map(|a| a.parse::<IpAddr>().unwrap()));
    addrs.extend(
        c.services
            .values()
            .flat_map(|s| s.cluster_ips.iter().copied()),
    );
    let mut checks: Vec<(IpAddr, IpAddr, u8, u16)> = Vec::new();
    for &(s, d, pr, po) in packets {
        let src = addrs[s % addrs.len()];
        let same_family: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == src.is_ipv4())
            .collect();
        let dst = same_family[d % same_family.len()];
        let proto = PROTOS[pr % PROTOS.len()];
        let port = if proto == ICMP || proto == ICMPV6 {
            ICMP_MESSAGES[po % ICMP_MESSAGES.len()]
        } else {
            PORTS[po % PORTS.len()]
        };
        checks.push((src, dst, proto, port));
    }
    // Random packets seldom hit a ClusterIP on a Service port: every pod address tries every
    // ClusterIP of its family on every Service port, and on the ports its targets name.
    for p in c.pods.values() {
        for &src in &p.ips {
            for s in c.services.values() {
                for &dst in s
                    .cluster_ips
                    .iter()
                    .filter(|a| a.is_ipv4() == src.is_ipv4())
                {
                    for sp in &s.ports {
                        let proto = match sp.protocol {
                            PortProtocol::Tcp => TCP,
                            PortProtocol::Udp => UDP,
                            PortProtocol::Sctp => SCTP,
                        };
                        checks.push((src, dst, proto, sp.port));
                        if let TargetPort::Number(n) = sp.target_port {
                            checks.push((src, dst, proto, n));
                        }
                    }
                }
            }
        }
    }
    for (src, dst, proto, port) in checks {
        if let Some(a) = reference::endpoint(c, src) {
            let expected = reference::egress_allows(c, a, proto, port, dst);
            let got = planned_policy(plan, c, a)
                .is_none_or(|p| compiled_allows(&p, Direction::Egress, proto, port, dst));
            prop_assert_eq!(
                got,
                expected,
                "egress of {} to {} proto {} port {}: {:?}",
                a,
                dst,
                proto,
                port,
                planned_policy(plan, c, a)
            );
        }
        if let Some(b) = reference::endpoint(c, dst) {
            let expected = reference::ingress_allows(c, b, proto, port, src);
            let got = planned_policy(plan, c, b)
                .is_none_or(|p| compiled_allows(&p, Direction::Ingress, proto, port, src));
            prop_assert_eq!(
                got,
                expected,
                "ingress of {} from {} proto {} port {}: {:?}",
                b,
                src,
                proto,
                port,
                planned_policy(plan, c, b)
            );
        }
    }
    Ok(())
}

/// Structural invariants of a plan: policies listed on a node are used there, reports name
/// exactly the nodes hosting a member or a pod whose policy lists the group.
fn check_structure(c: &Cluster, plan: &Plan) -> Result<(), TestCaseError> {
    let mut listed_on: BTreeMap<ObjectKey, BTreeSet<String>> = BTreeMap::new();
    for (node, np) in &plan.nodes {
        let used: BTreeSet<_> = np.pods.values().filter_map(|p| p.policy.clone()).collect();
        let held: BTreeSet<_> = np.policies.keys().cloned().collect();
        prop_assert_eq!(used, held, "node {}", node);
        // The node holds exactly the address sets its policies name.
        let named: BTreeSet<_> = np
            .policies
            .values()
            .flat_map(|p| p.ingress.iter().chain(&p.egress))
            .flat_map(|r| r.sets.iter().cloned())
            .collect();
        let held_sets: BTreeSet<_> = np.sets.keys().cloned().collect();
        prop_assert_eq!(named, held_sets, "sets of node {}", node);
        for pp in np.pods.values() {
            if let Some(id) = &pp.policy {
                for g in &np.policies[id].groups {
                    listed_on
                        .entry(g.group.clone())
                        .or_default()
                        .insert(node.clone());
                }
            }
        }
    }
    for (k, report) in &plan.groups {
        let members = c
            .pods
            .keys()
            .filter(|p| reference::is_member(c, k, p))
            .count();
        prop_assert_eq!(report.members, members, "{}", k);
        prop_assert_eq!(report.accepted.is_ok(), reference::accepted(c, k), "{}", k);
        prop_assert_eq!(
            &report.nodes,
            &listed_on.remove(k).unwrap_or_default(),
            "{}",
            k
        );
    }
    prop_assert_eq!(
        plan.groups.keys().collect::<Vec<_>>(),
        c.groups.keys().collect::<Vec<_>>()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn compiled_verdicts_equal_the_reference_evaluation(
        c in cluster(),
        packets in proptest::collection::vec((0usize..64, 0usize..64, 0usize..64, 0usize..64), 256),
    ) {
        let plan = compile(&c);
        check_structure(&c, &plan)?;
        check_verdicts(&c, &plan, &packets)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Incremental = full.

fn change() -> impl Strategy<Value = ClusterChange> {
    prop_oneof![
        4 => (0..MAX_PODS).prop_flat_map(|i| pod_data(i).prop_map(move |p| ClusterChange::UpsertPod(pod_key(i), p))),
        1 => (0..MAX_PODS).prop_map(|i| ClusterChange::DeletePod(pod_key(i))),
        1 => (select(&NAMESPACES[..]), label_map(&NS_KEYS, &NS_VALUES))
            .prop_map(|(n, labels)| ClusterChange::UpsertNamespace(n.into(), Namespace { labels })),
        1 => select(&NAMESPACES[..]).prop_map(|n| ClusterChange::DeleteNamespace(n.into())),
        3 => (group_key(), group_spec()).prop_map(|(k, g)| ClusterChange::UpsertGroup(k, g)),
        1 => group_key().prop_map(ClusterChange::DeleteGroup),
        3 => np_group().prop_map(|(k, g)| ClusterChange::UpsertGroup(k, g)),
        1 => np_key().prop_map(ClusterChange::DeleteGroup),
        1 => select(&["n1", "n2", "n3"][..]).prop_map(|n| ClusterChange::UpsertNode(n.into())),
        1 => select(&["n1", "n2", "n3"][..]).prop_map(|n| ClusterChange::DeleteNode(n.into())),
        2 => any_service().prop_map(|(k, s)| ClusterChange::UpsertService(k, s)),
        1 => (0..NAMESPACES.len(), 0..SERVICES_PER_NS)
            .prop_map(|(ns, j)| ClusterChange::DeleteService(service_key(ns, j))),
    ]
}

/// Changes that keep a pod's labels but move its other fields, so the sequence also exercises
/// address, port, node, UID, phase and host-network changes of the same pod (a Service backend
/// changing under the rules that admit it).
fn pod_tweak() -> impl Strategy<Value = (usize, u8)> {
    (0..MAX_PODS, 0u8..8)
}

fn tweak(c: &Cluster, (i, what): (usize, u8)) -> Option<ClusterChange> {
    let key = pod_key(i);
    let mut p = c.pods.get(&key)?.clone();
    match what {
        0 => p.ips = pod_ips(i, if p.ips.len() == 2 { 1 } else { 3 }),
        1 => p.ports.retain(|np| np.name != "http"),
        2 => {
            p.node = if p.node.as_deref() == Some("n1") {
                Some("n2".into())
            } else {
                Some("n1".into())
            }
        }
        3 => p.uid.push('x'),
        4 => p.terminated = !p.terminated,
        5 => p.host_network = !p.host_network,
        6 => {
            for np in p.ports.iter_mut().filter(|np| np.name == "http") {
                np.port = if np.port == 80 { 8080 } else { 80 };
            }
        }
        _ => p.labels.clear(),
    }
    Some(ClusterChange::UpsertPod(key, p))
}

fn changed_nodes(before: &Plan, after: &Plan) -> BTreeSet<String> {
    before
        .nodes
        .keys()
        .chain(after.nodes.keys())
        .filter(|n| before.nodes.get(*n) != after.nodes.get(*n))
        .cloned()
        .collect()
}

fn changed_groups(before: &Plan, after: &Plan) -> BTreeSet<ObjectKey> {
    before
        .groups
        .keys()
        .chain(after.groups.keys())
        .filter(|g| before.groups.get(*g) != after.groups.get(*g))
        .cloned()
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn incremental_compile_equals_full_compile_after_every_change(
        initial in cluster(),
        steps in proptest::collection::vec(
            (change(), pod_tweak(), proptest::bool::ANY, (0..MAX_PODS, 1u8..4)),
            1..16,
        ),
    ) {
        let mut c = initial.clone();
        let mut compiler = Compiler::new(&c);
        prop_assert_eq!(compiler.plan(), &compile(&c));
        for (change, tw, use_tweak, (backend, mask)) in steps {
            let change = match change {
                _ if use_tweak => tweak(&c, tw).unwrap_or(change),
                // A Service selecting pods that exist, so its backends' changes matter.
                ClusterChange::UpsertService(k, s) => {
                    let (k, s) = selecting(&c, backend, mask, k, s);
                    ClusterChange::UpsertService(k, s)
                }
                change => change,
            };
            let before = compiler.plan().clone();
            let reported = compiler.apply(&change);
            c.apply(&change);
            let full = compile(&c);
            prop_assert_eq!(compiler.plan(), &full, "after {:?}", change);
            prop_assert_eq!(&reported.nodes, &changed_nodes(&before, &full), "nodes after {:?}", change);
            prop_assert_eq!(&reported.groups, &changed_groups(&before, &full), "groups after {:?}", change);
        }
        check_structure(&c, compiler.plan())?;
    }

    #[test]
    fn a_batch_of_changes_compiles_like_the_resulting_cluster(
        initial in cluster(),
        changes in proptest::collection::vec(change(), 1..12),
    ) {
        let mut c = initial.clone();
        let mut compiler = Compiler::new(&c);
        let before = compiler.plan().clone();
        let reported = compiler.apply_all(&changes);
        for ch in &changes {
            c.apply(ch);
        }
        let full = compile(&c);
        prop_assert_eq!(compiler.plan(), &full);
        // A batch may report a node that changed and changed back within it; never misses one.
        prop_assert!(reported.nodes.is_superset(&changed_nodes(&before, &full)));
        prop_assert_eq!(reported.groups, changed_groups(&before, &full));
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions the properties found, written out (their seeds are kept in
// compile_properties.proptest-regressions too).

fn translated(yaml: &str) -> (ObjectKey, Group) {
    let np: NetworkPolicy = serde_yaml::from_str(yaml).unwrap();
    netpol::group(&np).unwrap()
}

/// Applies `changes` one by one and as one batch, each time comparing with a full compile.
fn assert_incremental_equals_full(initial: &Cluster, changes: &[ClusterChange]) {
    let mut c = initial.clone();
    let mut one_by_one = Compiler::new(&c);
    for change in changes {
        one_by_one.apply(change);
        c.apply(change);
        assert_eq!(one_by_one.plan(), &compile(&c), "after {change:?}");
    }
    let mut batch = Compiler::new(initial);
    batch.apply_all(changes);
    assert_eq!(batch.plan(), &compile(&c), "after the batch {changes:?}");
}

/// A NetworkPolicy whose `policyTypes` alone change, at the same generation and with the same
/// (no) rules (a manifests directory gives every object generation 0): the layers its members'
/// policy lists follow. The compiler used to keep the policy, since no rule moved.
#[test]
fn a_network_policy_whose_policy_types_alone_change_moves_its_members_layers() {
    let mut c = Cluster::default();
    c.nodes.insert("n1".into());
    c.pods.insert(
        compile_support::key("b", "p4"),
        compile_support::pod("n1", &[], &["10.0.0.5", "fd00::5"]),
    );
    let np = |types: &str| {
        translated(&format!(
            "metadata: {{ name: np2, namespace: b, generation: 2 }}\n\
             spec: {{ podSelector: {{}}, policyTypes: [ {types} ] }}"
        ))
    };
    let (key, ingress_only) = np("Ingress");
    c.groups.insert(key.clone(), ingress_only);
    let (_, egress_only) = np("Egress");
    assert_incremental_equals_full(&c, &[ClusterChange::UpsertGroup(key, egress_only)]);
}

/// An egress rule open to anyone naming a port resolves it on the pods of every namespace
/// (with a Namespace object, as `namespaceSelector: {}` reads it), Services' backends too: when
/// the backend's Namespace goes, the rule no longer admits the Service's ClusterIP. The
/// compiler used to keep the Service rule, not judging the namespace's Services again.
#[test]
fn deleting_a_namespace_rejudges_the_services_an_open_named_port_egress_rule_admits() {
    let mut c = Cluster::default();
    c.nodes.insert("n1".into());
    c.namespaces.insert("a".into(), Namespace::default());
    c.pods.insert(
        compile_support::key("a", "p6"),
        compile_support::with_ports(
            compile_support::pod("n1", &[("app", "y")], &["10.0.0.7", "fd00::7"]),
            &[("dns", 5353, PortProtocol::Udp)],
        ),
    );
    let (key, np) = translated(
        "metadata: { name: np0, namespace: a, generation: 1 }\n\
         spec: { podSelector: {}, egress: [ { ports: [ { port: dns, protocol: UDP } ] } ] }",
    );
    c.groups.insert(key, np);
    let service = Service {
        selector: BTreeMap::from([("app".to_owned(), "y".to_owned())]),
        cluster_ips: cluster_ips(0, 0, 3),
        ports: vec![ServicePort {
            protocol: PortProtocol::Udp,
            port: 53,
            target_port: TargetPort::Name("dns".into()),
        }],
    };
    let changes = [
        ClusterChange::UpsertService(service_key(0, 0), service),
        ClusterChange::DeleteNamespace("a".into()),
    ];
    assert_incremental_equals_full(&c, &changes);
    // And the same SecurityGroup rule.
    let mut sg = c.clone();
    sg.groups.clear();
    sg.groups.insert(
        compile_support::key("a", "g0"),
        compile_support::group(
            "podSelector: {}\n\
             egress: [ { protocol: UDP, ports: [ { port: dns } ] } ]",
        ),
    );
    assert_incremental_equals_full(&sg, &changes);
}
