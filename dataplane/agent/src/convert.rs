//! The edge between the gRPC types (`kubesg-proto`) and the agent's own: everything that
//! arrives on the wire is converted and checked here, once; the rest of the agent never sees a
//! prost struct.

use ipnet::IpNet;
use kubesg_proto::v1alpha1 as pb;

use std::collections::BTreeMap;

use crate::{
    desired::{PolicySets, SetChange, Update, UpdateError},
    endpoints::{EndpointKey, EndpointRecord, PodRef},
    policy::{CompiledPolicy, Layer, PeerBlock, PortMatch, Protocol, Rule},
};

/// Converts an operator update, refusing it whole at the first thing that does not make sense.
pub fn update(u: &pb::PolicyUpdate) -> Result<Update, UpdateError> {
    let invalid = UpdateError::Invalid;
    let mut policies = Vec::with_capacity(u.upsert_policies.len());
    let mut policy_sets = BTreeMap::new();
    for p in &u.upsert_policies {
        if p.id.is_empty() {
            return Err(invalid("a policy without id".into()));
        }
        policies.push((
            p.id.clone(),
            policy(p).map_err(|e| invalid(format!("policy {}: {e}", p.id)))?,
        ));
        let named = |rules: &[pb::Rule]| rules.iter().map(|r| r.peer_sets.clone()).collect();
        let sets = PolicySets {
            ingress: named(&p.ingress),
            egress: named(&p.egress),
        };
        if sets
            .ingress
            .iter()
            .chain(&sets.egress)
            .any(|s| !s.is_empty())
        {
            policy_sets.insert(p.id.clone(), sets);
        }
    }
    let mut upsert_sets = Vec::with_capacity(u.upsert_sets.len());
    for s in &u.upsert_sets {
        if s.id.is_empty() {
            return Err(invalid("an address set without id".into()));
        }
        let addrs = s
            .cidrs
            .iter()
            .map(|c| cidr(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("address set {}: {e}", s.id)))?;
        upsert_sets.push((s.id.clone(), addrs));
    }
    let mut change_sets = Vec::with_capacity(u.change_sets.len());
    for c in &u.change_sets {
        if c.id.is_empty() {
            return Err(invalid("an address set change without id".into()));
        }
        let parse = |cidrs: &[String]| {
            cidrs
                .iter()
                .map(|c| cidr(c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("address set change {}: {e}", c.id)))
        };
        change_sets.push(SetChange {
            id: c.id.clone(),
            add: parse(&c.add)?,
            remove: parse(&c.remove)?,
        });
    }
    let mut pods = Vec::with_capacity(u.upsert_pods.len());
    for pp in &u.upsert_pods {
        let pod = pod_ref(pp.pod.as_ref()).map_err(invalid)?;
        let policy = (!pp.policy_id.is_empty()).then(|| pp.policy_id.clone());
        pods.push((pod, policy));
    }
    let remove_pods = u
        .remove_pods
        .iter()
        .map(|p| pod_ref(Some(p)))
        .collect::<Result<_, _>>()
        .map_err(invalid)?;
    Ok(Update {
        version: u.version,
        snapshot: u.snapshot,
        base_version: u.base_version,
        upsert_policies: policies,
        remove_policies: u.remove_policies.clone(),
        policy_sets,
        upsert_sets,
        remove_sets: u.remove_sets.clone(),
        change_sets,
        upsert_pods: pods,
        remove_pods,
        recheck_on_policy_change: u.settings.as_ref().map(|s| s.recheck_on_policy_change),
    })
}

fn pod_ref(p: Option<&pb::PodRef>) -> Result<PodRef, String> {
    let p = p.ok_or("a pod without reference")?;
    if p.namespace.is_empty() || p.name.is_empty() {
        return Err(format!(
            "pod {:?}/{:?} lacks a namespace or name",
            p.namespace, p.name
        ));
    }
    Ok(PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
    })
}

/// The wire form of a pod reference.
pub fn pod_ref_to_pb(p: &PodRef) -> pb::PodRef {
    pb::PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
    }
}

fn policy(p: &pb::Policy) -> Result<CompiledPolicy, String> {
    let rules = |rs: &[pb::Rule], dir: &str| -> Result<Vec<Rule>, String> {
        rs.iter()
            .enumerate()
            .map(|(i, r)| rule(r, p.layered).map_err(|e| format!("{dir} rule {i}: {e}")))
            .collect()
    };
    let layers = |ls: &[i32], dir: &str| -> Result<Vec<Layer>, String> {
        if !p.layered {
            return Ok(Vec::new()); // the contract: layers mean nothing in an unlayered policy
        }
        ls.iter()
            .map(|l| layer(*l).map_err(|e| format!("{dir} layers: {e}")))
            .collect()
    };
    let compiled = CompiledPolicy {
        ingress: rules(&p.ingress, "ingress")?,
        egress: rules(&p.egress, "egress")?,
        stateless: p.stateless,
        layered: p.layered,
        ingress_layers: layers(&p.ingress_layers, "ingress")?,
        egress_layers: layers(&p.egress_layers, "egress")?,
    };
    compiled.check_layers().map_err(|e| e.to_string())?;
    Ok(compiled)
}

fn layer(l: i32) -> Result<Layer, String> {
    match pb::Layer::try_from(l) {
        Ok(pb::Layer::SecurityGroups) => Ok(Layer::SecurityGroups),
        Ok(pb::Layer::NetworkPolicies) => Ok(Layer::NetworkPolicies),
        Err(_) => Err(format!("unknown layer {l}")),
    }
}

/// A rule; its layer is read only in a layered policy (where an unknown one is refused).
fn rule(r: &pb::Rule, layered: bool) -> Result<Rule, String> {
    let protocol = match pb::Protocol::try_from(r.protocol) {
        Ok(pb::Protocol::Any) => Protocol::Any,
        Ok(pb::Protocol::Tcp) => Protocol::Tcp,
        Ok(pb::Protocol::Udp) => Protocol::Udp,
        Ok(pb::Protocol::Sctp) => Protocol::Sctp,
        Ok(pb::Protocol::Icmp) => Protocol::Icmp,
        Ok(pb::Protocol::Icmpv6) => Protocol::Icmpv6,
        Ok(pb::Protocol::Number) => Protocol::Number(
            u8::try_from(r.protocol_number)
                .map_err(|_| format!("protocol number {} > 255", r.protocol_number))?,
        ),
        Ok(pb::Protocol::Unspecified) | Err(_) => {
            return Err(format!("unknown protocol {}", r.protocol))
        }
    };
    let ports = r
        .ports
        .iter()
        .map(|m| port_match(m, protocol))
        .collect::<Result<Vec<_>, _>>()?;
    let peers = r
        .peers
        .iter()
        .map(|b| {
            Ok(PeerBlock {
                cidr: cidr(&b.cidr)?,
                except: b
                    .except
                    .iter()
                    .map(|e| cidr(e))
                    .collect::<Result<_, String>>()?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Rule {
        protocol,
        ports,
        peers,
        origin: r.origin.clone(),
        layer: if layered {
            layer(r.layer)?
        } else {
            Layer::SecurityGroups
        },
    })
}

fn port_match(m: &pb::PortMatch, protocol: Protocol) -> Result<PortMatch, String> {
    let port = |v: u32| u16::try_from(v).map_err(|_| format!("port {v} > 65535"));
    let byte = |v: u32, what: &str| u8::try_from(v).map_err(|_| format!("ICMP {what} {v} > 255"));
    match &m.kind {
        Some(pb::port_match::Kind::Range(r)) if protocol.has_ports() => {
            let (first, last) = (port(r.first)?, port(r.last)?);
            if first > last {
                return Err(format!("port range {first}-{last} is empty"));
            }
            Ok(PortMatch::Range { first, last })
        }
        Some(pb::port_match::Kind::Icmp(i)) if protocol.is_icmp() => Ok(PortMatch::Icmp {
            icmp_type: byte(i.r#type, "type")?,
            code: i.code.map(|c| byte(c, "code")).transpose()?,
        }),
        Some(_) => Err(format!(
            "a port match that protocol {protocol:?} cannot have"
        )),
        None => Err("an empty port match".into()),
    }
}

fn cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|e| format!("invalid CIDR {s:?}: {e}"))
}

/// Converts a CNI registration; the caller validates what the datapath relies on.
pub fn endpoint(e: &pb::Endpoint) -> Result<EndpointRecord, String> {
    let key = e.key.as_ref().ok_or("an endpoint without key")?;
    let ips = e
        .ips
        .iter()
        .map(|ip| {
            ip.parse::<IpNet>()
                .map_err(|err| format!("invalid address {ip:?}: {err}"))
        })
        .collect::<Result<_, _>>()?;
    let pod = e.pod.as_ref().map(|p| PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
    });
    Ok(EndpointRecord {
        key: endpoint_key(key),
        netns: e.netns.clone(),
        host_ifname: e.host_ifname.clone(),
        host_ifindex: e.host_ifindex,
        ips,
        pod: pod.unwrap_or_default(),
    })
}

/// The agent's key for a wire key.
pub fn endpoint_key(k: &pb::EndpointKey) -> EndpointKey {
    EndpointKey {
        container_id: k.container_id.clone(),
        ifname: k.ifname.clone(),
    }
}

/// The wire form of a registration.
pub fn endpoint_to_pb(r: &EndpointRecord) -> pb::Endpoint {
    pb::Endpoint {
        key: Some(pb::EndpointKey {
            container_id: r.key.container_id.clone(),
            ifname: r.key.ifname.clone(),
        }),
        netns: r.netns.clone(),
        host_ifname: r.host_ifname.clone(),
        host_ifindex: r.host_ifindex,
        ips: r.ips.iter().map(|n| n.to_string()).collect(),
        pod: Some(pod_ref_to_pb(&r.pod)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_rule(ports: Vec<pb::PortMatch>) -> pb::Rule {
        pb::Rule {
            protocol: pb::Protocol::Tcp as i32,
            ports,
            peers: vec![pb::PeerBlock {
                cidr: "10.0.0.7/8".into(),
                except: vec!["10.1.0.0/16".into()],
            }],
            ..pb::Rule::default()
        }
    }

    fn range(first: u32, last: u32) -> pb::PortMatch {
        pb::PortMatch {
            kind: Some(pb::port_match::Kind::Range(pb::PortRange { first, last })),
        }
    }

    fn update_with(rule: pb::Rule) -> pb::PolicyUpdate {
        pb::PolicyUpdate {
            version: 3,
            snapshot: true,
            upsert_policies: vec![pb::Policy {
                id: "p".into(),
                ingress: vec![rule],
                ..pb::Policy::default()
            }],
            upsert_pods: vec![pb::PodPolicy {
                pod: Some(pb::PodRef {
                    namespace: "ns".into(),
                    name: "a".into(),
                    uid: String::new(),
                }),
                policy_id: "p".into(),
            }],
            ..pb::PolicyUpdate::default()
        }
    }

    #[test]
    fn a_valid_update_converts_with_normalized_cidrs() {
        let u = update(&update_with(tcp_rule(vec![range(80, 81)]))).unwrap();
        let (id, p) = &u.upsert_policies[0];
        assert_eq!(id, "p");
        let r = &p.ingress[0];
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!(
            r.ports,
            vec![PortMatch::Range {
                first: 80,
                last: 81
            }]
        );
        assert_eq!(r.peers[0].cidr.to_string(), "10.0.0.0/8");
        assert_eq!(u.upsert_pods[0].1.as_deref(), Some("p"));
    }

    #[test]
    fn nonsense_is_refused_with_the_reason() {
        for (rule, why) in [
            (tcp_rule(vec![range(90, 80)]), "empty"),
            (tcp_rule(vec![range(1, 70000)]), "65535"),
            (
                pb::Rule {
                    protocol: 42,
                    ..tcp_rule(vec![])
                },
                "unknown protocol",
            ),
            (
                pb::Rule {
                    protocol: pb::Protocol::Udp as i32,
                    ports: vec![pb::PortMatch {
                        kind: Some(pb::port_match::Kind::Icmp(pb::IcmpMatch {
                            r#type: 8,
                            code: None,
                        })),
                    }],
                    ..tcp_rule(vec![])
                },
                "cannot have",
            ),
            (
                pb::Rule {
                    peers: vec![pb::PeerBlock {
                        cidr: "10.0.0.0/33".into(),
                        except: vec![],
                    }],
                    ..tcp_rule(vec![])
                },
                "invalid CIDR",
            ),
        ] {
            let err = update(&update_with(rule)).unwrap_err().to_string();
            assert!(err.contains(why), "{err} should mention {why}");
        }
    }

    fn layered_update(ingress_layers: Vec<i32>, rule_layer: i32) -> pb::PolicyUpdate {
        let mut u = update_with(pb::Rule {
            layer: rule_layer,
            origin: "networkpolicy shop/allow-web ingress[0]".into(),
            ..tcp_rule(vec![])
        });
        u.upsert_policies[0].layered = true;
        u.upsert_policies[0].ingress_layers = ingress_layers;
        u.upsert_policies[0].egress_layers = vec![pb::Layer::SecurityGroups as i32];
        u
    }

    #[test]
    fn layers_convert() {
        let (sg, np) = (
            pb::Layer::SecurityGroups as i32,
            pb::Layer::NetworkPolicies as i32,
        );
        let u = update(&layered_update(vec![np, sg], np)).unwrap();
        let p = &u.upsert_policies[0].1;
        assert!(p.layered);
        assert_eq!(
            p.ingress_layers,
            vec![Layer::NetworkPolicies, Layer::SecurityGroups]
        );
        assert_eq!(p.egress_layers, vec![Layer::SecurityGroups]);
        assert_eq!(p.ingress[0].layer, Layer::NetworkPolicies);
        // Unlayered, layers mean nothing and are not kept (the rules are one union).
        let mut flat = layered_update(vec![np], np);
        flat.upsert_policies[0].layered = false;
        let p = &update(&flat).unwrap().upsert_policies[0].1;
        assert!(!p.layered && p.ingress_layers.is_empty() && p.egress_layers.is_empty());
        assert_eq!(p.ingress[0].layer, Layer::SecurityGroups);
    }

    #[test]
    fn layers_that_cannot_be_enforced_are_refused_with_the_reason() {
        let (sg, np) = (
            pb::Layer::SecurityGroups as i32,
            pb::Layer::NetworkPolicies as i32,
        );
        for (layers, rule_layer, why) in [
            (vec![np, np], np, "twice"),
            (vec![sg, np, sg], sg, "at most 2"),
            (vec![sg, 7], sg, "unknown layer 7"),
            (vec![sg], 9, "unknown layer 9"),
        ] {
            let err = update(&layered_update(layers, rule_layer))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{err} should mention {why}");
            assert!(err.contains("policy p"), "{err} should name the policy");
        }
    }

    #[test]
    fn address_sets_and_the_sets_rules_name_convert() {
        let mut u = update_with(pb::Rule {
            peer_sets: vec!["group:shop/lb".into()],
            ..tcp_rule(vec![])
        });
        u.upsert_sets = vec![pb::AddressSet {
            id: "group:shop/lb".into(),
            cidrs: vec!["10.0.0.7/32".into(), "fd00::7/128".into()],
        }];
        u.remove_sets = vec!["gone".into()];
        let c = update(&u).unwrap();
        assert_eq!(c.policy_sets["p"].ingress, vec![vec!["group:shop/lb"]]);
        assert_eq!(c.upsert_sets[0].0, "group:shop/lb");
        assert_eq!(c.upsert_sets[0].1[1].to_string(), "fd00::7/128");
        assert_eq!(c.remove_sets, vec!["gone"]);
        // A policy naming no set has no entry.
        let plain = update(&update_with(tcp_rule(vec![]))).unwrap();
        assert!(plain.policy_sets.is_empty());
        // A set with a bad address or without id is refused, naming it.
        u.upsert_sets[0].cidrs.push("10.0.0.300/32".into());
        let err = update(&u).unwrap_err().to_string();
        assert!(err.contains("address set group:shop/lb"), "{err}");
        u.upsert_sets[0].id.clear();
        assert!(update(&u).unwrap_err().to_string().contains("without id"));
    }
}
