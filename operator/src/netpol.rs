//! Kubernetes NetworkPolicies (`networking.k8s.io/v1`) read as groups of their own layer.
//!
//! A NetworkPolicy selects pods of its namespace and lists allow rules whose peers (pod and
//! namespace selectors, ipBlocks with `except`) and ports (numbers, ranges with `endPort`, named
//! container ports, TCP/UDP/SCTP) are exactly what a SecurityGroup rule can say, so each one is
//! translated into a SecurityGroup spec and compiled by the same compiler into the same address
//! sets and per-node policies. What differs is kept beside the spec ([`GroupKind`]):
//!
//! - a NetworkPolicy judges only the directions its `policyTypes` name, defaulted as the API
//!   server does when the field is empty: Ingress always, Egress when the policy has egress
//!   rules;
//! - its rules form the NetworkPolicies layer: on a pod both kinds select, a NEW connection must
//!   be allowed by the pod's security groups and by its NetworkPolicies (docs/architecture.md,
//!   "NetworkPolicies");
//! - a rule without `ports` admits every protocol, one with ports becomes one rule per protocol.
//!
//! Its key is its namespace and `networkpolicy/<name>`: a name no SecurityGroup can have (the API
//! refuses `/` in names, and a group peer naming one is refused), so both kinds share the
//! compiler's group table without meeting.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort,
};
use kube::ResourceExt as _;

use crate::{
    crd::{EgressRule, IngressRule, IpBlock, Peer, Port, Protocol, SecurityGroupSpec},
    model::{Group, GroupKind, ObjectKey, RuleOrigins},
    objects::ObjectError,
};

/// Whether kubesg enforces NetworkPolicies (`--network-policies`, chart value
/// `operator.networkPolicies`). `Ignore` leaves them to another enforcer chained on the same pods
/// (or to none): they are neither watched nor read from manifests, and SecurityGroups alone judge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Watch NetworkPolicies and enforce them as their own layer.
    #[default]
    Enforce,
    /// Do not read them at all.
    Ignore,
}

/// Whether `key` is a NetworkPolicy's.
pub fn is_key(key: &ObjectKey) -> bool {
    key.name.starts_with(KEY_PREFIX)
}

/// What a NetworkPolicy's key name starts with.
pub const KEY_PREFIX: &str = "networkpolicy/";

/// The compiler's key of a NetworkPolicy.
pub fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, format!("{KEY_PREFIX}{name}"))
}

/// The NetworkPolicy's own name when `key` is a NetworkPolicy's key.
pub fn name(key: &ObjectKey) -> Option<&str> {
    key.name.strip_prefix(KEY_PREFIX)
}

/// How logs, Events and rule origins name a group: `shop/web` for a SecurityGroup,
/// `NetworkPolicy shop/allow-web` for a NetworkPolicy.
pub fn describe(key: &ObjectKey) -> String {
    match name(key) {
        Some(n) => format!("NetworkPolicy {}/{n}", key.namespace),
        None => key.to_string(),
    }
}

/// A NetworkPolicy's key and group. Its generation is `metadata.generation`.
pub fn group(np: &NetworkPolicy) -> Result<(ObjectKey, Group), ObjectError> {
    let name = np.name_any();
    if name.is_empty() {
        return Err(ObjectError::NoName("NetworkPolicy"));
    }
    let namespace = match np.namespace() {
        Some(ns) if !ns.is_empty() => ns,
        _ => {
            return Err(ObjectError::NoNamespace {
                kind: "NetworkPolicy",
                name,
            })
        }
    };
    let key = key(&namespace, &name);
    let label = describe(&key);
    let spec = np.spec.clone().unwrap_or_default();
    let (ingress_types, egress_types) = policy_types(&spec).map_err(|t| {
        ObjectError::Invalid(format!(
            "{label}: spec.policyTypes: {t:?} is not Ingress or Egress"
        ))
    })?;
    // A direction the policy does not judge gets no rules at all (never the SecurityGroup
    // reading of an omitted egress, "allow all"): the layer is not listed for it, and its rules
    // could only widen another policy's.
    let mut origins = RuleOrigins::default();
    let mut ingress = Vec::new();
    if ingress_types {
        for (j, r) in spec.ingress.iter().flatten().enumerate() {
            ingress.extend(ingress_rules(&label, j, r, &mut origins.ingress)?);
        }
    }
    let mut egress = Vec::new();
    if egress_types {
        for (j, r) in spec.egress.iter().flatten().enumerate() {
            egress.extend(egress_rules(&label, j, r, &mut origins.egress)?);
        }
    }
    Ok((
        key,
        Group {
            generation: np.metadata.generation.unwrap_or(0),
            spec: SecurityGroupSpec {
                pod_selector: spec.pod_selector.unwrap_or_default(),
                ingress: Some(ingress),
                egress: Some(egress),
            },
            kind: GroupKind::NetworkPolicy {
                ingress: ingress_types,
                egress: egress_types,
            },
            origins: Some(origins),
            unreadable: None,
        },
    ))
}

/// Which directions the policy judges: `policyTypes`, or when it is empty what the API server
/// defaults it to (Ingress, plus Egress when there are egress rules). An unknown type is
/// returned as the error.
fn policy_types(
    spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec,
) -> Result<(bool, bool), String> {
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let mut ingress = false;
            let mut egress = false;
            for t in types {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => return Err(other.to_string()),
                }
            }
            Ok((ingress, egress))
        }
        _ => Ok((true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))),
    }
}

/// One protocol's ports of a NetworkPolicy rule: `None` is every port of it.
type ProtocolPorts = (Protocol, Option<Vec<Port>>);

/// The rules of one NetworkPolicy rule, one per protocol its ports name (in the order they first
/// appear), or one for every protocol when it names no port; `origins` gets each one's name.
fn split_ports(
    label: &str,
    direction: &str,
    j: usize,
    ports: Option<&[NetworkPolicyPort]>,
    origins: &mut Vec<String>,
) -> Result<Vec<ProtocolPorts>, ObjectError> {
    let ports = match ports {
        Some(p) if !p.is_empty() => p,
        _ => {
            origins.push(format!("{label} {direction}[{j}]"));
            return Ok(vec![(Protocol::Any, None)]);
        }
    };
    // Per protocol: `None` once a port of it has no number (every port of the protocol).
    let mut by_protocol: Vec<ProtocolPorts> = Vec::new();
    for (k, p) in ports.iter().enumerate() {
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            other => {
                return Err(ObjectError::Invalid(format!(
                    "{label}: spec.{direction}[{j}].ports[{k}].protocol: {other:?} is not TCP, UDP or SCTP"
                )))
            }
        };
        let item = p.port.clone().map(|port| Port {
            port,
            end_port: p.end_port,
        });
        match by_protocol.iter_mut().find(|(proto, _)| *proto == protocol) {
            Some((_, list)) => match (list.as_mut(), item) {
                (Some(list), Some(item)) => list.push(item),
                _ => *list = None,
            },
            None => by_protocol.push((protocol, item.map(|i| vec![i]))),
        }
    }
    for (protocol, _) in &by_protocol {
        let name = match protocol {
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            _ => "TCP",
        };
        origins.push(format!("{label} {direction}[{j}] {name}"));
    }
    Ok(by_protocol)
}

/// A NetworkPolicy peer as a SecurityGroup peer: the same three kinds, read the same way (a pod
/// selector alone means this namespace; a namespace selector alone, every pod of the namespaces
/// it matches).
fn peer(p: &NetworkPolicyPeer) -> Peer {
    Peer {
        security_group: None,
        pod_selector: p.pod_selector.clone(),
        namespace_selector: p.namespace_selector.clone(),
        ip_block: p.ip_block.as_ref().map(|b| IpBlock {
            cidr: b.cidr.clone(),
            except: b.except.clone(),
        }),
    }
}

fn peers(list: Option<&Vec<NetworkPolicyPeer>>) -> Option<Vec<Peer>> {
    // Omitted or empty: anyone, in both APIs.
    list.filter(|l| !l.is_empty())
        .map(|l| l.iter().map(peer).collect())
}

fn ingress_rules(
    label: &str,
    j: usize,
    r: &NetworkPolicyIngressRule,
    origins: &mut Vec<String>,
) -> Result<Vec<IngressRule>, ObjectError> {
    let from = peers(r.from.as_ref());
    Ok(
        split_ports(label, "ingress", j, r.ports.as_deref(), origins)?
            .into_iter()
            .map(|(protocol, ports)| IngressRule {
                protocol,
                ports,
                icmp_types: None,
                from: from.clone(),
            })
            .collect(),
    )
}

fn egress_rules(
    label: &str,
    j: usize,
    r: &NetworkPolicyEgressRule,
    origins: &mut Vec<String>,
) -> Result<Vec<EgressRule>, ObjectError> {
    let to = peers(r.to.as_ref());
    Ok(
        split_ports(label, "egress", j, r.ports.as_deref(), origins)?
            .into_iter()
            .map(|(protocol, ports)| EgressRule {
                protocol,
                ports,
                icmp_types: None,
                to: to.clone(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::{
        apis::meta::v1::LabelSelector, util::intstr::IntOrString,
    };

    use super::*;

    /// A NetworkPolicy from its YAML, as `kubectl apply` would send it (without defaulting:
    /// `policyTypes` and port protocols stay as written).
    fn np(yaml: &str) -> NetworkPolicy {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// `np` translated, with the spec written under `metadata: { name: p, namespace: shop }`.
    fn translate(spec_yaml: &str) -> Group {
        let doc = format!(
            "apiVersion: networking.k8s.io/v1\n\
             kind: NetworkPolicy\n\
             metadata: {{ name: p, namespace: shop, generation: 3 }}\n\
             spec:\n{}",
            indent(spec_yaml)
        );
        let (key, group) = group(&np(&doc)).unwrap();
        assert_eq!(key, ObjectKey::new("shop", "networkpolicy/p"));
        group
    }

    fn indent(s: &str) -> String {
        s.lines().map(|l| format!("  {l}\n")).collect()
    }

    fn kind(ingress: bool, egress: bool) -> GroupKind {
        GroupKind::NetworkPolicy { ingress, egress }
    }

    fn ingress(g: &Group) -> &[IngressRule] {
        g.spec.ingress.as_deref().unwrap()
    }

    fn egress(g: &Group) -> &[EgressRule] {
        g.spec.egress.as_deref().unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            match_expressions: None,
        }
    }

    fn num(port: i32, end_port: Option<i32>) -> Port {
        Port {
            port: IntOrString::Int(port),
            end_port,
        }
    }

    fn named(name: &str) -> Port {
        Port {
            port: IntOrString::String(name.into()),
            end_port: None,
        }
    }

    #[test]
    fn key_name_and_description_tell_a_network_policy_from_a_security_group() {
        let k = key("shop", "allow-web");
        assert_eq!(k, ObjectKey::new("shop", "networkpolicy/allow-web"));
        assert_eq!(name(&k), Some("allow-web"));
        assert_eq!(describe(&k), "NetworkPolicy shop/allow-web");
        let sg = ObjectKey::new("shop", "web");
        assert_eq!(name(&sg), None);
        assert_eq!(describe(&sg), "shop/web");
    }

    #[test]
    fn generation_and_pod_selector_are_the_policys_own() {
        let g = translate("podSelector: { matchLabels: { app: web } }");
        assert_eq!(g.generation, 3);
        assert_eq!(g.spec.pod_selector, labels(&[("app", "web")]));
    }

    #[test]
    fn policy_types_omitted_without_egress_rules_isolate_ingress_only() {
        let g = translate("podSelector: {}\ningress: [ {} ]");
        assert_eq!(g.kind, kind(true, false));
        assert_eq!(ingress(&g).len(), 1);
        assert!(egress(&g).is_empty());
    }

    #[test]
    fn policy_types_omitted_with_an_empty_egress_list_isolate_ingress_only() {
        let g = translate("podSelector: {}\negress: []");
        assert_eq!(g.kind, kind(true, false));
        assert!(ingress(&g).is_empty());
        assert!(egress(&g).is_empty());
    }

    #[test]
    fn policy_types_omitted_with_egress_rules_isolate_both_directions() {
        let g =
            translate("podSelector: {}\negress: [ { ports: [ { port: 53, protocol: UDP } ] } ]");
        assert_eq!(g.kind, kind(true, true));
        // Ingress is isolated with no rule: nothing may connect to the pods.
        assert!(ingress(&g).is_empty());
        assert_eq!(egress(&g).len(), 1);
    }

    #[test]
    fn policy_types_empty_list_is_defaulted_like_omitted() {
        let g = translate("podSelector: {}\npolicyTypes: []\negress: [ {} ]");
        assert_eq!(g.kind, kind(true, true));
    }

    #[test]
    fn policy_types_egress_only_leave_ingress_unisolated_and_drop_ingress_rules() {
        let g = translate(
            "podSelector: {}\n\
             policyTypes: [ Egress ]\n\
             ingress: [ {} ]\n\
             egress: [ { to: [ { podSelector: {} } ] } ]",
        );
        assert_eq!(g.kind, kind(false, true));
        assert!(!g.kind.isolates(true));
        assert!(g.kind.isolates(false));
        // Not "no ingress rule" of a SecurityGroup reading: no rule at all, and the layer is
        // not listed for ingress (GroupKind says so).
        assert!(ingress(&g).is_empty());
        assert_eq!(egress(&g).len(), 1);
        assert_eq!(g.origins.as_ref().unwrap().ingress, Vec::<String>::new());
    }

    #[test]
    fn policy_types_ingress_only_drop_egress_rules_and_leave_egress_unisolated() {
        let g = translate(
            "podSelector: {}\n\
             policyTypes: [ Ingress ]\n\
             egress: [ { ports: [ { port: 53, protocol: UDP } ] } ]",
        );
        assert_eq!(g.kind, kind(true, false));
        assert!(ingress(&g).is_empty());
        // Never the SecurityGroup reading of an omitted egress (allow all): no rule.
        assert_eq!(g.spec.egress, Some(Vec::new()));
    }

    #[test]
    fn policy_types_both_without_rules_deny_both_directions() {
        let g = translate("podSelector: {}\npolicyTypes: [ Ingress, Egress ]");
        assert_eq!(g.kind, kind(true, true));
        assert_eq!(g.spec.ingress, Some(Vec::new()));
        assert_eq!(g.spec.egress, Some(Vec::new()));
    }

    #[test]
    fn default_deny_ingress_selects_every_pod_and_allows_no_ingress() {
        let g = translate("podSelector: {}\npolicyTypes: [ Ingress ]");
        assert_eq!(g.kind, kind(true, false));
        assert_eq!(g.spec.pod_selector, LabelSelector::default());
        assert_eq!(g.spec.ingress, Some(Vec::new()));
        assert_eq!(g.spec.egress, Some(Vec::new()));
    }

    #[test]
    fn a_missing_spec_is_a_default_deny_ingress_of_every_pod() {
        let (_, g) = group(&np("apiVersion: networking.k8s.io/v1\n\
             kind: NetworkPolicy\n\
             metadata: { name: p, namespace: shop }"))
        .unwrap();
        assert_eq!(g.kind, kind(true, false));
        assert_eq!(g.generation, 0);
        assert_eq!(g.spec.pod_selector, LabelSelector::default());
        assert_eq!(g.spec.ingress, Some(Vec::new()));
    }

    #[test]
    fn an_empty_ingress_rule_allows_every_protocol_from_anyone() {
        let g = translate("podSelector: {}\ningress: [ {} ]");
        assert_eq!(
            ingress(&g),
            [IngressRule {
                protocol: Protocol::Any,
                ports: None,
                icmp_types: None,
                from: None,
            }]
        );
    }

    #[test]
    fn an_empty_egress_rule_allows_every_protocol_to_anyone() {
        let g = translate("podSelector: {}\npolicyTypes: [ Egress ]\negress: [ {} ]");
        assert_eq!(
            egress(&g),
            [EgressRule {
                protocol: Protocol::Any,
                ports: None,
                icmp_types: None,
                to: None,
            }]
        );
    }

    #[test]
    fn empty_from_and_missing_from_both_mean_anyone() {
        let g = translate(
            "podSelector: {}\n\
             ingress: [ { from: [], ports: [ { port: 80 } ] }, { ports: [ { port: 80 } ] } ]",
        );
        assert_eq!(ingress(&g).len(), 2);
        assert_eq!(ingress(&g)[0], ingress(&g)[1]);
        assert_eq!(ingress(&g)[0].from, None);
    }

    #[test]
    fn empty_to_and_missing_to_both_mean_anyone() {
        let g = translate(
            "podSelector: {}\n\
             policyTypes: [ Egress ]\n\
             egress: [ { to: [] }, {} ]",
        );
        assert_eq!(egress(&g).len(), 2);
        assert_eq!(egress(&g)[0], egress(&g)[1]);
        assert_eq!(egress(&g)[0].to, None);
    }

    #[test]
    fn ports_missing_or_empty_mean_every_protocol_and_port() {
        for ports in ["", ", ports: []"] {
            let g = translate(&format!(
                "podSelector: {{}}\ningress: [ {{ from: [ {{ podSelector: {{}} }} ]{ports} }} ]"
            ));
            assert_eq!(ingress(&g).len(), 1, "{ports}");
            assert_eq!(ingress(&g)[0].protocol, Protocol::Any, "{ports}");
            assert_eq!(ingress(&g)[0].ports, None, "{ports}");
        }
    }

    #[test]
    fn a_port_item_without_port_or_protocol_means_every_tcp_port() {
        let g = translate("podSelector: {}\ningress: [ { ports: [ {} ] } ]");
        assert_eq!(
            ingress(&g),
            [IngressRule {
                protocol: Protocol::Tcp,
                ports: None,
                icmp_types: None,
                from: None,
            }]
        );
    }

    #[test]
    fn a_port_item_with_a_protocol_and_no_port_means_every_port_of_that_protocol() {
        let g = translate("podSelector: {}\ningress: [ { ports: [ { protocol: UDP } ] } ]");
        assert_eq!(ingress(&g).len(), 1);
        assert_eq!(ingress(&g)[0].protocol, Protocol::Udp);
        assert_eq!(ingress(&g)[0].ports, None);
    }

    #[test]
    fn numeric_ports_default_to_tcp_and_are_kept_in_order() {
        let g =
            translate("podSelector: {}\ningress: [ { ports: [ { port: 443 }, { port: 80 } ] } ]");
        assert_eq!(ingress(&g).len(), 1);
        assert_eq!(ingress(&g)[0].protocol, Protocol::Tcp);
        assert_eq!(
            ingress(&g)[0].ports,
            Some(vec![num(443, None), num(80, None)])
        );
    }

    #[test]
    fn end_port_makes_a_range() {
        let g = translate(
            "podSelector: {}\n\
             policyTypes: [ Egress ]\n\
             egress: [ { ports: [ { port: 32000, endPort: 32768 }, { port: 22 } ] } ]",
        );
        assert_eq!(
            egress(&g)[0].ports,
            Some(vec![num(32000, Some(32768)), num(22, None)])
        );
        assert_eq!(egress(&g)[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn named_ports_are_kept_by_name_for_the_compiler_to_resolve() {
        let g = translate(
            "podSelector: {}\n\
             ingress: [ { ports: [ { port: http }, { port: dns, protocol: UDP } ] } ]\n\
             egress: [ { ports: [ { port: metrics } ] } ]",
        );
        assert_eq!(ingress(&g).len(), 2);
        assert_eq!(ingress(&g)[0].protocol, Protocol::Tcp);
        assert_eq!(ingress(&g)[0].ports, Some(vec![named("http")]));
        assert_eq!(ingress(&g)[1].protocol, Protocol::Udp);
        assert_eq!(ingress(&g)[1].ports, Some(vec![named("dns")]));
        assert_eq!(egress(&g)[0].ports, Some(vec![named("metrics")]));
    }

    #[test]
    fn mixed_protocols_in_one_rule_become_one_rule_per_protocol_in_first_appearance_order() {
        let g = translate(
            "podSelector: {}\n\
             ingress:\n\
             - from: [ { podSelector: { matchLabels: { app: lb } } } ]\n\
             \x20 ports:\n\
             \x20 - { port: 53, protocol: UDP }\n\
             \x20 - { port: 80 }\n\
             \x20 - { port: 3868, protocol: SCTP }\n\
             \x20 - { port: 5353, protocol: UDP }\n\
             \x20 - { port: 8000, endPort: 8100, protocol: TCP }",
        );
        let rules = ingress(&g);
        assert_eq!(
            rules
                .iter()
                .map(|r| (r.protocol, r.ports.clone().unwrap()))
                .collect::<Vec<_>>(),
            vec![
                (Protocol::Udp, vec![num(53, None), num(5353, None)]),
                (Protocol::Tcp, vec![num(80, None), num(8000, Some(8100))]),
                (Protocol::Sctp, vec![num(3868, None)]),
            ]
        );
        // Every part keeps the rule's peers.
        for r in rules {
            assert_eq!(
                r.from,
                Some(vec![Peer {
                    pod_selector: Some(labels(&[("app", "lb")])),
                    ..Peer::default()
                }])
            );
        }
        assert_eq!(
            g.origins.unwrap().ingress,
            [
                "NetworkPolicy shop/p ingress[0] UDP",
                "NetworkPolicy shop/p ingress[0] TCP",
                "NetworkPolicy shop/p ingress[0] SCTP",
            ]
        );
    }

    #[test]
    fn a_port_item_without_a_port_widens_its_protocol_to_every_port() {
        let g = translate(
            "podSelector: {}\n\
             ingress: [ { ports: [ { port: 80 }, { protocol: UDP, port: 53 }, { protocol: TCP }, { port: 443 } ] } ]",
        );
        let rules = ingress(&g);
        assert_eq!(rules.len(), 2);
        assert_eq!(
            (rules[0].protocol, rules[0].ports.clone()),
            (Protocol::Tcp, None)
        );
        assert_eq!(
            (rules[1].protocol, rules[1].ports.clone()),
            (Protocol::Udp, Some(vec![num(53, None)]))
        );
    }

    #[test]
    fn pod_and_namespace_selector_in_one_peer_stay_one_peer_meaning_both() {
        let g = translate(
            "podSelector: {}\n\
             ingress: [ { from: [ { podSelector: { matchLabels: { app: web } }, namespaceSelector: { matchLabels: { team: a } } } ] } ]",
        );
        assert_eq!(
            ingress(&g)[0].from,
            Some(vec![Peer {
                pod_selector: Some(labels(&[("app", "web")])),
                namespace_selector: Some(labels(&[("team", "a")])),
                ..Peer::default()
            }])
        );
    }

    #[test]
    fn pod_and_namespace_selector_in_two_peers_stay_two_peers_meaning_either() {
        let g = translate(
            "podSelector: {}\n\
             ingress: [ { from: [ { podSelector: { matchLabels: { app: web } } }, { namespaceSelector: { matchLabels: { team: a } } } ] } ]",
        );
        assert_eq!(
            ingress(&g)[0].from,
            Some(vec![
                Peer {
                    pod_selector: Some(labels(&[("app", "web")])),
                    ..Peer::default()
                },
                Peer {
                    namespace_selector: Some(labels(&[("team", "a")])),
                    ..Peer::default()
                },
            ])
        );
    }

    #[test]
    fn an_empty_namespace_selector_is_kept_to_select_every_namespace() {
        let g = translate(
            "podSelector: {}\n\
             ingress: [ { from: [ { namespaceSelector: {} } ] } ]\n\
             egress: [ { to: [ { namespaceSelector: {}, podSelector: { matchLabels: { app: dns } } } ] } ]",
        );
        // Not the omitted namespaceSelector (the policy's own namespace).
        assert_eq!(
            ingress(&g)[0].from,
            Some(vec![Peer {
                namespace_selector: Some(LabelSelector::default()),
                ..Peer::default()
            }])
        );
        assert_eq!(
            egress(&g)[0].to,
            Some(vec![Peer {
                namespace_selector: Some(LabelSelector::default()),
                pod_selector: Some(labels(&[("app", "dns")])),
                ..Peer::default()
            }])
        );
    }

    #[test]
    fn an_empty_pod_selector_peer_means_every_pod_of_the_policys_namespace() {
        let g = translate("podSelector: {}\ningress: [ { from: [ { podSelector: {} } ] } ]");
        assert_eq!(
            ingress(&g)[0].from,
            Some(vec![Peer {
                pod_selector: Some(LabelSelector::default()),
                ..Peer::default()
            }])
        );
    }

    #[test]
    fn ip_blocks_keep_their_cidr_and_excepts() {
        let g = translate(
            "podSelector: {}\n\
             policyTypes: [ Egress ]\n\
             egress: [ { to: [ { ipBlock: { cidr: 10.0.0.0/8, except: [ 10.1.0.0/16, 10.2.0.0/16 ] } }, { ipBlock: { cidr: 'fd00::/8' } } ] } ]",
        );
        assert_eq!(
            egress(&g)[0].to,
            Some(vec![
                Peer {
                    ip_block: Some(IpBlock {
                        cidr: "10.0.0.0/8".into(),
                        except: Some(vec!["10.1.0.0/16".into(), "10.2.0.0/16".into()]),
                    }),
                    ..Peer::default()
                },
                Peer {
                    ip_block: Some(IpBlock {
                        cidr: "fd00::/8".into(),
                        except: None,
                    }),
                    ..Peer::default()
                },
            ])
        );
    }

    #[test]
    fn origins_name_each_translated_rule_by_direction_index_and_protocol() {
        let g = translate(
            "podSelector: {}\n\
             ingress: [ {}, { ports: [ { port: 80 } ] } ]\n\
             egress: [ { ports: [ { port: 53, protocol: UDP }, { port: 53 } ] }, { to: [] } ]",
        );
        let origins = g.origins.clone().unwrap();
        assert_eq!(
            origins.ingress,
            [
                "NetworkPolicy shop/p ingress[0]",
                "NetworkPolicy shop/p ingress[1] TCP",
            ]
        );
        assert_eq!(
            origins.egress,
            [
                "NetworkPolicy shop/p egress[0] UDP",
                "NetworkPolicy shop/p egress[0] TCP",
                "NetworkPolicy shop/p egress[1]",
            ]
        );
        assert_eq!(origins.ingress.len(), ingress(&g).len());
        assert_eq!(origins.egress.len(), egress(&g).len());
    }

    #[test]
    fn the_translation_is_a_valid_group() {
        let g = translate(
            "podSelector: { matchExpressions: [ { key: app, operator: In, values: [ web ] } ] }\n\
             policyTypes: [ Ingress, Egress ]\n\
             ingress:\n\
             - from: [ { namespaceSelector: {}, podSelector: {} }, { ipBlock: { cidr: 10.0.0.0/8, except: [ 10.1.0.0/16 ] } } ]\n\
             \x20 ports: [ { port: http }, { port: 8000, endPort: 8100 }, { protocol: SCTP } ]\n\
             egress: [ {}, { to: [ { podSelector: { matchLabels: { app: db } } } ], ports: [ { port: 5432 } ] } ]",
        );
        crate::validate::validate_group("shop", &g).unwrap();
    }

    #[test]
    fn an_unknown_policy_type_is_refused_naming_the_field() {
        let err = group(&np("apiVersion: networking.k8s.io/v1\n\
             kind: NetworkPolicy\n\
             metadata: { name: p, namespace: shop }\n\
             spec: { podSelector: {}, policyTypes: [ Ingress, Sideways ] }"))
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("NetworkPolicy shop/p"), "{msg}");
        assert!(msg.contains("spec.policyTypes"), "{msg}");
        assert!(msg.contains("Sideways"), "{msg}");
    }

    #[test]
    fn an_unknown_port_protocol_is_refused_naming_the_field() {
        let err = group(&np(
            "apiVersion: networking.k8s.io/v1\n\
             kind: NetworkPolicy\n\
             metadata: { name: p, namespace: shop }\n\
             spec: { podSelector: {}, ingress: [ { ports: [ { port: 80 }, { port: 1, protocol: ICMP } ] } ] }",
        ))
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("spec.ingress[0].ports[1].protocol"), "{msg}");
        assert!(msg.contains("ICMP"), "{msg}");
    }

    #[test]
    fn a_policy_without_name_or_namespace_is_refused() {
        let no_ns = group(&np(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: p }",
        ))
        .unwrap_err();
        assert!(
            matches!(no_ns, ObjectError::NoNamespace { .. }),
            "{no_ns:?}"
        );
        let no_name = group(&np(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { namespace: shop }",
        ))
        .unwrap_err();
        assert!(matches!(no_name, ObjectError::NoName(_)), "{no_name:?}");
    }
}
