//! The reference evaluation of SecurityGroups: whether one NEW connection is allowed, decided
//! straight from the raw [`Cluster`] model by the semantics of DESIGN.md ("SecurityGroup
//! semantics"), without any of the compiler's data structures. Its only purpose is to be the
//! yardstick: the compiler's property tests compare compiled verdicts with it, and the end-to-end
//! tests and the demo compare the connectivity that real traffic sees with it. It is written for
//! clarity, not speed (every question rescans the cluster).
//!
//! What it shares with the compiler: label selector matching ([`crate::selector`]) and the
//! acceptance of a spec ([`crate::validate::validate_group`]: an invalid group selects no member and
//! allows nothing, as the compiler treats it; re-implementing the API server's checks here would
//! only copy them). Everything else — membership, peers, named ports, address blocks, the union
//! of groups, the default of omitted rule lists — is evaluated here on its own.
//!
//! Services: a connection to a ClusterIP and Service port is judged as a connection to the pods
//! behind it (kube-proxy translates it after the client's interface): an egress rule admits it
//! when the Service has backends of that address family and the rule admits every one of them
//! on the port the Service sends to ([`service_admitted`]). Ingress sees the real pods.
//!
//! Ports: for TCP, UDP and SCTP the destination port; for ICMP and ICMPv6 `type << 8 | code`.
//! Protocols are IANA numbers (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6).

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString};

use crate::{
    crd::{EgressRule, IcmpType, IpBlock, Peer, Port, Protocol},
    model::{Cluster, ObjectKey, Pod, PortProtocol, Service, ServicePort, TargetPort},
    selector::Selector,
    validate::validate_group,
};

/// IANA protocol number of TCP.
pub const TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const UDP: u8 = 17;
/// IANA protocol number of SCTP.
pub const SCTP: u8 = 132;
/// IANA protocol number of ICMP.
pub const ICMP: u8 = 1;
/// IANA protocol number of ICMPv6.
pub const ICMPV6: u8 = 58;

/// One NEW connection: who opens it, to whom, on what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    /// The address that opens it.
    pub src: IpAddr,
    /// The address that accepts it.
    pub dst: IpAddr,
    /// IANA protocol number.
    pub protocol: u8,
    /// Destination port (TCP, UDP, SCTP) or `type << 8 | code` (ICMP, ICMPv6).
    pub port: u16,
}

/// Whether both ends let `conn` open: the sender's egress rules, if the sender is an enforced
/// pod on a node, and the receiver's ingress rules, if the receiver is one. An address that is
/// no such pod judges nothing (kubesg only filters at pods' interfaces).
pub fn allows(c: &Cluster, conn: &Connection) -> bool {
    let egress_ok = endpoint(c, conn.src)
        .is_none_or(|pod| egress_allows(c, pod, conn.protocol, conn.port, conn.dst));
    let ingress_ok = endpoint(c, conn.dst)
        .is_none_or(|pod| ingress_allows(c, pod, conn.protocol, conn.port, conn.src));
    egress_ok && ingress_ok
}

/// Whether kubesg enforces the pod at all: not on the host's network and not finished.
pub fn enforced(p: &Pod) -> bool {
    !p.host_network && !p.terminated
}

/// The enforced pod on a node that owns `addr`, as an agent knows it from the CNI.
pub fn endpoint(c: &Cluster, addr: IpAddr) -> Option<&ObjectKey> {
    c.pods
        .iter()
        .find(|(_, p)| enforced(p) && p.node.is_some() && p.ips.contains(&addr))
        .map(|(k, _)| k)
}

/// Whether group `g` exists and its spec is valid.
pub fn accepted(c: &Cluster, g: &ObjectKey) -> bool {
    c.groups
        .get(g)
        .is_some_and(|grp| validate_group(&g.namespace, grp).is_ok())
}

fn selector_matches(
    sel: &LabelSelector,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    Selector::parse(sel).is_ok_and(|s| s.matches(labels))
}

/// Whether pod `p` is a member of group `g`: the group is accepted, in the pod's namespace, the
/// pod is enforced and its labels match the group's pod selector.
pub fn is_member(c: &Cluster, g: &ObjectKey, p: &ObjectKey) -> bool {
    let Some(pod) = c.pods.get(p) else {
        return false;
    };
    accepted(c, g)
        && p.namespace == g.namespace
        && enforced(pod)
        && selector_matches(&c.groups[g].spec.pod_selector, &pod.labels)
}

/// The groups pod `p` is a member of.
pub fn groups_of<'a>(c: &'a Cluster, p: &ObjectKey) -> Vec<&'a ObjectKey> {
    c.groups.keys().filter(|g| is_member(c, g, p)).collect()
}

/// The pods a pod-kind peer (a group, or pod/namespace selectors) of group `g` names; `None`
/// for an address block.
fn peer_pods<'a>(c: &'a Cluster, g: &ObjectKey, peer: &Peer) -> Option<Vec<&'a ObjectKey>> {
    if let Some(r) = &peer.security_group {
        let target = ObjectKey::new(
            r.namespace.clone().unwrap_or_else(|| g.namespace.clone()),
            r.name.clone(),
        );
        return Some(c.pods.keys().filter(|p| is_member(c, &target, p)).collect());
    }
    if peer.ip_block.is_some() {
        return None;
    }
    Some(
        c.pods
            .iter()
            .filter(|(k, p)| {
                let namespace_ok = match &peer.namespace_selector {
                    None => k.namespace == g.namespace,
                    Some(sel) => c
                        .namespaces
                        .get(&k.namespace)
                        .is_some_and(|ns| selector_matches(sel, &ns.labels)),
                };
                namespace_ok
                    && enforced(p)
                    && peer
                        .pod_selector
                        .as_ref()
                        .is_none_or(|s| selector_matches(s, &p.labels))
            })
            .map(|(k, _)| k)
            .collect(),
    )
}

fn block_contains(b: &IpBlock, addr: IpAddr) -> bool {
    let inside = |cidr: &str| cidr.parse::<IpNet>().is_ok_and(|n| n.contains(&addr));
    inside(&b.cidr) && !b.except.iter().flatten().any(|e| inside(e))
}

fn protocol_matches(p: Protocol, proto: u8) -> bool {
    match p {
        Protocol::Any => true,
        Protocol::Tcp => proto == TCP,
        Protocol::Udp => proto == UDP,
        Protocol::Sctp => proto == SCTP,
        Protocol::Icmp => proto == ICMP,
        Protocol::Icmpv6 => proto == ICMPV6,
    }
}

fn port_protocol(p: Protocol) -> Option<PortProtocol> {
    match p {
        Protocol::Tcp => Some(PortProtocol::Tcp),
        Protocol::Udp => Some(PortProtocol::Udp),
        Protocol::Sctp => Some(PortProtocol::Sctp),
        _ => None,
    }
}

/// Whether a port item matches `port`, a named one resolved on `on` (`None`: no pod to resolve
/// it on, e.g. an address block: a named port then matches nothing).
fn port_item_matches(item: &Port, protocol: Protocol, port: u16, on: Option<&Pod>) -> bool {
    match &item.port {
        IntOrString::Int(n) => {
            let first = i64::from(*n);
            let last = item.end_port.map_or(first, i64::from);
            first <= i64::from(port) && i64::from(port) <= last
        }
        IntOrString::String(name) => on.is_some_and(|pod| {
            pod.ports.iter().any(|np| {
                &np.name == name && Some(np.protocol) == port_protocol(protocol) && np.port == port
            })
        }),
    }
}

/// Whether a rule's ports (or ICMP messages) allow `port`; `on` resolves named ports. Omitted or
/// empty lists allow every port.
fn ports_match(
    protocol: Protocol,
    ports: Option<&[Port]>,
    icmp: Option<&[IcmpType]>,
    port: u16,
    on: Option<&Pod>,
) -> bool {
    match protocol {
        Protocol::Any => true,
        Protocol::Icmp | Protocol::Icmpv6 => match icmp {
            None | Some([]) => true,
            Some(types) => types.iter().any(|t| {
                i32::from(port >> 8) == t.icmp_type
                    && t.code.is_none_or(|c| c == i32::from(port & 0xff))
            }),
        },
        _ => match ports {
            None | Some([]) => true,
            Some(items) => items
                .iter()
                .any(|i| port_item_matches(i, protocol, port, on)),
        },
    }
}

/// Whether member `member` may accept a NEW connection from `src` on `proto`/`port`: in each
/// layer that judges its ingress ([`layers_agree`]), some ingress rule of some group allows it
/// (named ports resolve on the member). A pod in no group accepts everything; a SecurityGroup
/// that omits `ingress` allows none.
pub fn ingress_allows(c: &Cluster, member: &ObjectKey, proto: u8, port: u16, src: IpAddr) -> bool {
    let pod = c.pods.get(member);
    layers_agree(c, member, true, |g| {
        c.groups[g].spec.ingress.iter().flatten().any(|r| {
            protocol_matches(r.protocol, proto)
                && ports_match(
                    r.protocol,
                    r.ports.as_deref(),
                    r.icmp_types.as_deref(),
                    port,
                    pod,
                )
                && match r.from.as_deref() {
                    None | Some([]) => true,
                    Some(peers) => peers.iter().any(|peer| match &peer.ip_block {
                        Some(b) => block_contains(b, src),
                        None => peer_pods(c, g, peer)
                            .unwrap_or_default()
                            .iter()
                            .any(|k| c.pods[*k].ips.contains(&src)),
                    }),
                }
        })
    })
}

/// The composition of the two kinds of groups on pod `member`, for one direction (`ingress`,
/// else egress): the SecurityGroups it is a member of judge as one layer (some group's rules
/// allow), the NetworkPolicies that select it and isolate it in that direction as another (some
/// policy's rules allow), and the connection must pass every layer that has a group. A pod no
/// group judges in that direction allows it. `allows` says whether one group's rules allow it.
fn layers_agree(
    c: &Cluster,
    member: &ObjectKey,
    ingress: bool,
    allows: impl Fn(&ObjectKey) -> bool,
) -> bool {
    let groups = groups_of(c, member);
    let layer = |network_policies: bool| {
        let judging: Vec<&ObjectKey> = groups
            .iter()
            .copied()
            .filter(|g| {
                let kind = c.groups[*g].kind;
                kind.is_network_policy() == network_policies && kind.isolates(ingress)
            })
            .collect();
        judging.is_empty() || judging.into_iter().any(&allows)
    };
    layer(false) && layer(true)
}

/// Whether member `member` may open a NEW connection to `dst` on `proto`/`port`: in each layer
/// that judges its egress ([`layers_agree`]), some egress rule of some group allows it, straight
/// to `dst` or through a Service whose ClusterIP `dst` is ([`service_admitted`]). A pod in no
/// group may open anything; a SecurityGroup that omits `egress` allows all.
pub fn egress_allows(c: &Cluster, member: &ObjectKey, proto: u8, port: u16, dst: IpAddr) -> bool {
    layers_agree(c, member, false, |g| match &c.groups[g].spec.egress {
        None => true,
        Some(rules) => rules.iter().any(|r| {
            egress_rule_admits(c, g, r, proto, port, dst)
                || service_admitted(c, g, r, proto, port, dst)
        }),
    })
}

/// Whether egress rule `r` of group `g` admits a connection straight to `dst` on
/// `proto`/`port` (named ports resolve on the peer pod that owns `dst`).
fn egress_rule_admits(
    c: &Cluster,
    g: &ObjectKey,
    r: &EgressRule,
    proto: u8,
    port: u16,
    dst: IpAddr,
) -> bool {
    let ports_ok = |on: Option<&Pod>| {
        ports_match(
            r.protocol,
            r.ports.as_deref(),
            r.icmp_types.as_deref(),
            port,
            on,
        )
    };
    protocol_matches(r.protocol, proto)
        && match r.to.as_deref() {
            // Anyone: numeric ports hold for every address; a named port resolves on the pod
            // that owns `dst`, whichever pod of whichever namespace (one with a Namespace
            // object, as `namespaceSelector: {}` reads it) that is.
            None | Some([]) => {
                (ports_ok(None) && !cluster_ip_refused(c, g, r, dst))
                    || c.pods
                        .iter()
                        .filter(|(k, p)| {
                            enforced(p)
                                && p.ips.contains(&dst)
                                && c.namespaces.contains_key(&k.namespace)
                        })
                        .any(|(_, p)| ports_ok(Some(p)))
            }
            Some(peers) => peers.iter().any(|peer| match &peer.ip_block {
                Some(b) => {
                    block_contains(b, dst) && ports_ok(None) && !cluster_ip_refused(c, g, r, dst)
                }
                None => peer_pods(c, g, peer)
                    .unwrap_or_default()
                    .iter()
                    .filter(|k| c.pods[**k].ips.contains(&dst))
                    .any(|k| ports_ok(Some(&c.pods[*k]))),
            }),
        }
}

fn protocol_number(p: PortProtocol) -> u8 {
    match p {
        PortProtocol::Tcp => TCP,
        PortProtocol::Udp => UDP,
        PortProtocol::Sctp => SCTP,
    }
}

/// The backends of Service `s` in namespace `ns`: the pods there whose labels include every
/// label of its selector, that are not finished and hold an address. A Service without a
/// selector has none (its endpoints are not ours to know).
pub fn backends<'a>(c: &'a Cluster, ns: &str, s: &Service) -> Vec<&'a ObjectKey> {
    if s.selector.is_empty() {
        return Vec::new();
    }
    c.pods
        .iter()
        .filter(|(k, p)| {
            k.namespace == ns
                && !p.terminated
                && !p.ips.is_empty()
                && s.selector.iter().all(|(l, v)| p.labels.get(l) == Some(v))
        })
        .map(|(k, _)| k)
        .collect()
}

/// Whether egress rule `r` of group `g` admits `dst:port` over `proto` as the ClusterIP and port
/// of some Service: for a Service with `dst` among its ClusterIPs and a port `port` of protocol
/// `proto`, the backends with an address of `dst`'s family are not none, and the rule admits a
/// connection straight to each such address of each of them on the Service port's target port
/// as that backend resolves it (a named one: its container port of that name and protocol; a
/// backend without one refuses the whole ClusterIP).
pub fn service_admitted(
    c: &Cluster,
    g: &ObjectKey,
    r: &EgressRule,
    proto: u8,
    port: u16,
    dst: IpAddr,
) -> bool {
    c.services.iter().any(|(key, s)| {
        s.cluster_ips.contains(&dst)
            && s.ports.iter().any(|sp| {
                protocol_number(sp.protocol) == proto
                    && sp.port == port
                    && service_port_admitted(c, g, r, &key.namespace, s, sp, dst)
            })
    })
}

/// Whether egress rule `r` of group `g` admits ClusterIP `dst` of Service `s` (namespace `ns`)
/// on its port `sp`: the backends with an address of `dst`'s family are not none, and the rule
/// admits each such address on the target port as that backend resolves it.
fn service_port_admitted(
    c: &Cluster,
    g: &ObjectKey,
    r: &EgressRule,
    ns: &str,
    s: &Service,
    sp: &ServicePort,
    dst: IpAddr,
) -> bool {
    let proto = protocol_number(sp.protocol);
    let addresses: Vec<(&Pod, IpAddr)> = backends(c, ns, s)
        .into_iter()
        .map(|k| &c.pods[k])
        .flat_map(|p| p.ips.iter().map(move |a| (p, *a)))
        .filter(|(_, a)| a.is_ipv4() == dst.is_ipv4())
        .collect();
    !addresses.is_empty()
        && addresses.iter().all(|(p, a)| {
            let target = match &sp.target_port {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(name) => p
                    .ports
                    .iter()
                    .find(|np| &np.name == name && np.protocol == sp.protocol)
                    .map(|np| np.port),
            };
            target.is_some_and(|t| egress_rule_admits(c, g, r, proto, t, *a))
        })
}

/// Whether `dst` is the ClusterIP of a Service with a selector that egress rule `r` of group
/// `g` would reach by an address block (or anyone) on one of its ports but does not admit there
/// as it admits the backends: then the block does not admit `dst` at all (its admitted ports
/// come through [`service_admitted`]). Traffic to a Service is traffic to the pods behind it;
/// a block that happens to hold its ClusterIP must not let through what it refuses to them.
fn cluster_ip_refused(c: &Cluster, g: &ObjectKey, r: &EgressRule, dst: IpAddr) -> bool {
    c.services.iter().any(|(key, s)| {
        !s.selector.is_empty()
            && s.cluster_ips.contains(&dst)
            && s.ports.iter().any(|sp| {
                protocol_matches(r.protocol, protocol_number(sp.protocol))
                    && ports_match(
                        r.protocol,
                        r.ports.as_deref(),
                        r.icmp_types.as_deref(),
                        sp.port,
                        None,
                    )
                    && !service_port_admitted(c, g, r, &key.namespace, s, sp, dst)
            })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::Group;

    fn pod(node: &str, app: &str, ip: &str) -> Pod {
        Pod {
            uid: format!("uid-{app}"),
            node: Some(node.into()),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            ips: vec![ip.parse().unwrap()],
            ..Pod::default()
        }
    }

    fn group(yaml: &str) -> Group {
        Group {
            generation: 1,
            spec: serde_yaml::from_str(yaml).unwrap(),
            kind: crate::model::GroupKind::SecurityGroup,
            origins: None,
            unreadable: None,
        }
    }

    /// The seed's case: the client may open TCP 23 to the server, nothing else is allowed
    /// between members; a pod in no group and an outside address judge nothing themselves.
    fn seed() -> Cluster {
        let mut c = Cluster::default();
        c.pods.insert(
            ObjectKey::new("a", "client"),
            pod("n1", "client", "10.0.0.1"),
        );
        c.pods.insert(
            ObjectKey::new("a", "server"),
            pod("n2", "server", "10.0.0.2"),
        );
        c.pods
            .insert(ObjectKey::new("a", "other"), pod("n1", "other", "10.0.0.3"));
        c.groups.insert(
            ObjectKey::new("a", "client"),
            group(
                "podSelector: { matchLabels: { app: client } }\n\
                 egress: [ { protocol: TCP, ports: [ { port: 23 } ], to: [ { securityGroup: { name: server } } ] } ]",
            ),
        );
        c.groups.insert(
            ObjectKey::new("a", "server"),
            group(
                "podSelector: { matchLabels: { app: server } }\n\
                 ingress: [ { protocol: TCP, ports: [ { port: 23 } ], from: [ { securityGroup: { name: client } } ] } ]",
            ),
        );
        c
    }

    fn conn(src: &str, dst: &str, protocol: u8, port: u16) -> Connection {
        Connection {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol,
            port,
        }
    }

    #[test]
    fn a_connection_needs_the_senders_egress_and_the_receivers_ingress() {
        let c = seed();
        assert!(allows(&c, &conn("10.0.0.1", "10.0.0.2", TCP, 23)));
        assert!(!allows(&c, &conn("10.0.0.1", "10.0.0.2", TCP, 24)));
        assert!(!allows(&c, &conn("10.0.0.1", "10.0.0.2", UDP, 23)));
        // The server's egress is all (omitted), but the client accepts nothing.
        assert!(!allows(&c, &conn("10.0.0.2", "10.0.0.1", TCP, 23)));
        // The client may open nothing but the server's port 23, even to a pod in no group.
        assert!(!allows(&c, &conn("10.0.0.1", "10.0.0.3", TCP, 23)));
        // A pod in no group sends to the server, which accepts only the client group.
        assert!(!allows(&c, &conn("10.0.0.3", "10.0.0.2", TCP, 23)));
        // A pod in no group accepts anything; an outside address judges nothing.
        assert!(allows(&c, &conn("10.0.0.2", "10.0.0.3", TCP, 80)));
        assert!(allows(&c, &conn("192.0.2.1", "10.0.0.3", UDP, 53)));
    }

    #[test]
    fn a_pod_that_is_not_enforced_judges_nothing() {
        let mut c = seed();
        c.pods
            .get_mut(&ObjectKey::new("a", "client"))
            .unwrap()
            .terminated = true;
        assert_eq!(endpoint(&c, "10.0.0.1".parse().unwrap()), None);
        assert!(allows(&c, &conn("10.0.0.2", "10.0.0.1", TCP, 23)));
        // Nor is it a member any more, so the server refuses it as any stranger.
        assert!(!allows(&c, &conn("10.0.0.1", "10.0.0.2", TCP, 23)));
    }
}
