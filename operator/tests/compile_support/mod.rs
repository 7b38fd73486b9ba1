//! Shared fixtures of the compiler's tests: clusters written tersely (groups as YAML, as users
//! write them) and the verdict of compiled rules, evaluated as the agent's `Rule::allows` does
//! (protocol, then port or ICMP type/code, then a peer block containing the address outside its
//! excepts; no rule → refused).

#![allow(dead_code)]

use std::{collections::BTreeMap, net::IpAddr};

use kubesg_operator::{
    model::{Cluster, Group, GroupKind, NamedPort, Namespace, ObjectKey, Pod, PortProtocol},
    plan::{Plan, PlannedPolicy, PlannedRule, PortSpec, RuleProtocol},
};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A group from the YAML of its spec, generation 1.
pub fn group(spec_yaml: &str) -> Group {
    group_gen(spec_yaml, 1)
}

pub fn group_gen(spec_yaml: &str, generation: i64) -> Group {
    Group {
        generation,
        spec: serde_yaml::from_str(spec_yaml).unwrap(),
        kind: GroupKind::SecurityGroup,
        origins: None,
        unreadable: None,
    }
}

/// A running pod on `node` with labels and addresses.
pub fn pod(node: &str, pairs: &[(&str, &str)], ips: &[&str]) -> Pod {
    Pod {
        uid: format!("uid-{node}-{}", ips.join("-")),
        node: Some(node.to_string()),
        labels: labels(pairs),
        ips: ips.iter().map(|s| ip(s)).collect(),
        ports: Vec::new(),
        host_network: false,
        terminated: false,
        deleting: false,
    }
}

/// The pod with named container ports.
pub fn with_ports(mut p: Pod, ports: &[(&str, u16, PortProtocol)]) -> Pod {
    p.ports = ports
        .iter()
        .map(|(name, port, protocol)| NamedPort {
            name: name.to_string(),
            port: *port,
            protocol: *protocol,
        })
        .collect();
    p
}

/// A cluster under construction.
#[derive(Default)]
pub struct World {
    pub cluster: Cluster,
}

impl World {
    pub fn ns(&mut self, name: &str, pairs: &[(&str, &str)]) -> &mut Self {
        self.cluster.namespaces.insert(
            name.to_string(),
            Namespace {
                labels: labels(pairs),
            },
        );
        self
    }

    pub fn node(&mut self, name: &str) -> &mut Self {
        self.cluster.nodes.insert(name.to_string());
        self
    }

    pub fn pod(&mut self, ns: &str, name: &str, p: Pod) -> &mut Self {
        if let Some(n) = &p.node {
            self.cluster.nodes.insert(n.clone());
        }
        self.cluster.pods.insert(key(ns, name), p);
        self
    }

    pub fn group(&mut self, ns: &str, name: &str, spec_yaml: &str) -> &mut Self {
        self.cluster.groups.insert(key(ns, name), group(spec_yaml));
        self
    }
}

/// Whether a compiled rule allows a connection with `remote` on `proto` to `port` (`type << 8
/// | code` for ICMP), exactly as the agent's `Rule::allows`.
pub fn rule_allows(r: &PlannedRule, proto: u8, port: u16, remote: IpAddr) -> bool {
    let proto_ok = match r.protocol {
        RuleProtocol::Any => true,
        RuleProtocol::Tcp => proto == TCP,
        RuleProtocol::Udp => proto == UDP,
        RuleProtocol::Sctp => proto == SCTP,
        RuleProtocol::Icmp => proto == ICMP,
        RuleProtocol::Icmpv6 => proto == ICMPV6,
    };
    let port_ok = r.protocol == RuleProtocol::Any
        || r.ports.is_empty()
        || r.ports.iter().any(|p| match *p {
            PortSpec::Range { first, last } => first <= port && port <= last,
            PortSpec::Icmp { icmp_type, code } => {
                (port >> 8) as u8 == icmp_type && code.is_none_or(|c| c == port as u8)
            }
        });
    let peer_ok = r
        .peers
        .iter()
        .any(|b| b.cidr.contains(&remote) && !b.except.iter().any(|e| e.contains(&remote)));
    proto_ok && port_ok && peer_ok
}

/// The pod's entry in the plan: its node's policy with the address sets its rules name
/// resolved (what the agent enforces), `None` for a non-member. Panics when the pod is on no
/// node's plan or its policy is missing there.
pub fn policy_of(plan: &Plan, pod: &ObjectKey) -> Option<PlannedPolicy> {
    let (node, pp) = plan
        .nodes
        .iter()
        .find_map(|(n, np)| np.pods.get(pod).map(|pp| (n, pp)))
        .unwrap_or_else(|| panic!("{pod} is on no node's plan"));
    pp.policy.as_ref().map(|id| {
        let np = &plan.nodes[node];
        for r in np
            .policies
            .get(id)
            .iter()
            .flat_map(|p| p.ingress.iter().chain(&p.egress))
        {
            for s in &r.sets {
                assert!(
                    np.sets.contains_key(s),
                    "set {s} of policy {id} is missing on {node}"
                );
            }
        }
        np.resolved_policy(id)
            .unwrap_or_else(|| panic!("policy {id} of {pod} is missing on {node}"))
    })
}

/// Whether `dst` accepts a NEW connection from `src` (non-members accept everything).
pub fn accepts(plan: &Plan, dst: &ObjectKey, proto: u8, port: u16, src: &str) -> bool {
    policy_of(plan, dst).is_none_or(|p| {
        p.ingress
            .iter()
            .any(|r| rule_allows(r, proto, port, ip(src)))
    })
}

/// Whether `src` may open a NEW connection to `dst` (non-members may open anything).
pub fn sends(plan: &Plan, src: &ObjectKey, proto: u8, port: u16, dst: &str) -> bool {
    policy_of(plan, src).is_none_or(|p| {
        p.egress
            .iter()
            .any(|r| rule_allows(r, proto, port, ip(dst)))
    })
}
