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
