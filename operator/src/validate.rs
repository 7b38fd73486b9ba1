//! Checks a SecurityGroup spec and turns it into the typed form the compiler works on.
//!
//! The CRD's schema and CEL rules (`crd.rs`) make the API server refuse invalid groups, but in
//! manifests mode there is no API server, and an object written before a schema change may still
//! be stored: so everything the schema says is checked again here. A group that fails is not
//! Accepted and contributes nothing (no members, no rules); the error message names the field,
//! as the API server's would (`spec.ingress[0].from[1].ipBlock.except[0]: 10.2.0.0/16 is not
//! inside 10.1.0.0/16`), and lists every problem so one status read tells the user all of them.

use std::fmt;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString};

use crate::{
    crd::{IcmpType, IpBlock, Peer, Port, Protocol, SecurityGroupSpec},
    model::{Group, ObjectKey},
    plan::{PeerBlock, RuleProtocol},
    selector::Selector,
};

// The CRD's limits. The API server prices each CEL rule at its worst case: the ipBlock rules run
// once per peer of every rule (MAX_RULES × MAX_PEERS times), the `except` rule parses up to
// MAX_EXCEPT strings of MAX_CIDR_LEN characters each time, and the product must stay within
// the per-rule budget (1e7). At 64 × 64 × 16 the real estimator (kube-apiserver 1.36) prices it
// at about half the budget; 256 × 128 × 64 with unbounded strings was refused at over 100 times
// it (the e2e test `crd_is_accepted_by_the_api_server` applies the CRD).

/// The most rules per direction (the CRD's `maxItems`).
pub const MAX_RULES: usize = 64;
/// The most ports per rule.
pub const MAX_PORTS: usize = 128;
/// The most ICMP types per rule.
pub const MAX_ICMP_TYPES: usize = 64;
/// The most peers per rule.
pub const MAX_PEERS: usize = 64;
/// The most `except` blocks per ipBlock.
pub const MAX_EXCEPT: usize = 16;
/// The longest CIDR text: an IPv6 address with an embedded IPv4 one, every group written out
/// (`0000:0000:0000:0000:0000:ffff:255.255.255.255/128`); nothing longer parses.
pub const MAX_CIDR_LEN: usize = 49;

/// A checked group: selectors compiled, CIDRs parsed, ports typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedGroup {
    /// Which pods of the namespace are members.
    pub pod_selector: Selector,
    /// `None`: the field was omitted (this group allows no ingress).
    pub ingress: Option<Vec<CheckedRule>>,
    /// `None`: the field was omitted (this group allows all egress).
    pub egress: Option<Vec<CheckedRule>>,
}

/// A checked rule of either direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedRule {
    /// The protocol.
    pub protocol: RuleProtocol,
    /// `None`: every port (or ICMP message) of the protocol: `ports` or `icmpTypes` omitted or
    /// empty, as Kubernetes NetworkPolicy reads an empty `ports`, and always for `Any`.
    pub ports: Option<Vec<CheckedPort>>,
    /// `None`: anyone (`from`/`to` omitted or empty, as Kubernetes NetworkPolicy reads them).
    pub peers: Option<Vec<CheckedPeer>>,
}

impl CheckedRule {
    /// The peers a named port of this (egress) rule resolves on: its pod peers, or, when it
    /// admits anyone, every pod of every namespace (as `namespaceSelector: {}` selects them):
    /// a NetworkPolicy egress rule naming only a port, e.g. `serve-80-tcp`, admits that port of
    /// whichever pod has it.
    pub fn named_port_peers(&self) -> std::borrow::Cow<'_, [CheckedPeer]> {
        match &self.peers {
            Some(peers) => std::borrow::Cow::Borrowed(peers),
            None => std::borrow::Cow::Owned(vec![CheckedPeer::Pods {
                namespaces: Some(Selector::everything()),
                pods: None,
            }]),
        }
    }

    /// Whether some port item is a named port.
    pub fn has_named_ports(&self) -> bool {
        self.ports
            .iter()
            .flatten()
            .any(|p| matches!(p, CheckedPort::Named(_)))
    }
}

/// A checked port item.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CheckedPort {
    /// Ports `first..=last`.
    Range {
        /// First.
        first: u16,
        /// Last (inclusive).
        last: u16,
    },
    /// A named container port, resolved per pod.
    Named(String),
    /// An ICMP message type, one code or all.
    Icmp {
        /// Type.
        icmp_type: u8,
        /// Code; `None`: every code.
        code: Option<u8>,
    },
}

/// A checked peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CheckedPeer {
    /// The members of a group (the namespace already defaulted to the rule's group's).
    Group(ObjectKey),
    /// Pods by selectors.
    Pods {
        /// `None`: the group's own namespace; `Some`: namespaces whose labels match.
        namespaces: Option<Selector>,
        /// `None`: every pod of those namespaces.
        pods: Option<Selector>,
    },
    /// Addresses.
    Block(PeerBlock),
}

/// One problem: the field (`spec.ingress[0].ports[1].port`) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The path of the field from the object's root.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem of an invalid spec. Its `Display` (problems joined by `; `) is the `Accepted`
/// condition's message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Invalid(pub Vec<FieldError>);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Checks the spec of a group in `namespace` (needed to default `securityGroup.namespace`).
pub fn validate(namespace: &str, spec: &SecurityGroupSpec) -> Result<CheckedGroup, Invalid> {
    check(namespace, spec, true)
}

/// Checks a group of either kind. A NetworkPolicy's spec is its translation
/// (`crate::netpol`): the API server validated the NetworkPolicy itself, and the SecurityGroup
/// CRD's size limits (there for the CEL cost budget) do not apply to it.
pub fn validate_group(namespace: &str, group: &Group) -> Result<CheckedGroup, Invalid> {
    if let Some(unreadable) = &group.unreadable {
        return Err(Invalid(vec![unreadable.clone()]));
    }
    check(namespace, &group.spec, !group.kind.is_network_policy())
}

fn check(namespace: &str, spec: &SecurityGroupSpec, limits: bool) -> Result<CheckedGroup, Invalid> {
    let mut v = Checker {
        namespace,
        errors: Vec::new(),
        limits,
    };
    let pod_selector = v.selector("spec.podSelector", &spec.pod_selector);
    let ingress = spec.ingress.as_ref().map(|rules| {
        v.max_len("spec.ingress", rules.len(), MAX_RULES);
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                v.rule(
                    &format!("spec.ingress[{i}]"),
                    "from",
                    r.protocol,
                    r.ports.as_deref(),
                    r.icmp_types.as_deref(),
                    r.from.as_deref(),
                )
            })
            .collect::<Vec<_>>()
    });
    let egress = spec.egress.as_ref().map(|rules| {
        v.max_len("spec.egress", rules.len(), MAX_RULES);
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                v.rule(
                    &format!("spec.egress[{i}]"),
                    "to",
                    r.protocol,
                    r.ports.as_deref(),
                    r.icmp_types.as_deref(),
                    r.to.as_deref(),
                )
            })
            .collect::<Vec<_>>()
    });
    if !v.errors.is_empty() {
        return Err(Invalid(v.errors));
    }
    Ok(CheckedGroup {
        pod_selector: pod_selector.unwrap_or_default(),
        ingress,
        egress,
    })
}

/// The compiler's protocol for the API's.
pub fn rule_protocol(p: Protocol) -> RuleProtocol {
    match p {
        Protocol::Tcp => RuleProtocol::Tcp,
        Protocol::Udp => RuleProtocol::Udp,
        Protocol::Sctp => RuleProtocol::Sctp,
        Protocol::Icmp => RuleProtocol::Icmp,
        Protocol::Icmpv6 => RuleProtocol::Icmpv6,
        Protocol::Any => RuleProtocol::Any,
    }
}

struct Checker<'a> {
    namespace: &'a str,
    errors: Vec<FieldError>,
    /// Whether the CRD's size limits apply (SecurityGroups; not translated NetworkPolicies).
    limits: bool,
}

impl Checker<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn max_len(&mut self, path: &str, len: usize, max: usize) {
        if self.limits && len > max {
            self.error(path, format!("{len} items, at most {max} allowed"));
        }
    }

    fn selector(&mut self, path: &str, sel: &LabelSelector) -> Option<Selector> {
        match Selector::parse(sel) {
            Ok(s) => Some(s),
            Err(errors) => {
                for e in errors {
                    self.error(format!("{path}.{}", e.field), e.message);
                }
                None
            }
        }
    }

    fn rule(
        &mut self,
        path: &str,
        peers_field: &str,
        protocol: Protocol,
        ports: Option<&[Port]>,
        icmp_types: Option<&[IcmpType]>,
        peers: Option<&[Peer]>,
    ) -> CheckedRule {
        let proto = rule_protocol(protocol);
        let name = protocol_name(protocol);
        let mut items = Vec::new();
        if let Some(ports) = ports {
            if matches!(protocol, Protocol::Icmp | Protocol::Icmpv6 | Protocol::Any) {
                self.error(
                    format!("{path}.ports"),
                    format!("ports are for TCP, UDP and SCTP, not {name}"),
                );
            }
            self.max_len(&format!("{path}.ports"), ports.len(), MAX_PORTS);
            for (i, p) in ports.iter().enumerate() {
                if let Some(item) = self.port(&format!("{path}.ports[{i}]"), p) {
                    items.push(item);
                }
            }
        }
        if let Some(types) = icmp_types {
            if !matches!(protocol, Protocol::Icmp | Protocol::Icmpv6) {
                self.error(
                    format!("{path}.icmpTypes"),
                    format!("icmpTypes are for ICMP and ICMPv6, not {name}"),
                );
            }
            self.max_len(&format!("{path}.icmpTypes"), types.len(), MAX_ICMP_TYPES);
            for (i, t) in types.iter().enumerate() {
                let p = format!("{path}.icmpTypes[{i}]");
                let icmp_type = self.byte(&format!("{p}.type"), "ICMP type", t.icmp_type);
                let code = t
                    .code
                    .and_then(|c| self.byte(&format!("{p}.code"), "ICMP code", c));
                if let Some(icmp_type) = icmp_type {
                    items.push(CheckedPort::Icmp { icmp_type, code });
                }
            }
        }
        let peers = peers.map(|peers| {
            let path = format!("{path}.{peers_field}");
            self.max_len(&path, peers.len(), MAX_PEERS);
            peers
                .iter()
                .enumerate()
                .filter_map(|(i, p)| self.peer(&format!("{path}[{i}]"), p))
                .collect::<Vec<_>>()
        });
        CheckedRule {
            protocol: proto,
            // Empty lists read as omitted (Kubernetes: "if this field is empty or missing, this
            // rule matches all ports / all sources").
            ports: (proto != RuleProtocol::Any && !items.is_empty()).then_some(items),
            peers: peers.filter(|p| !p.is_empty()),
        }
    }

    fn byte(&mut self, path: &str, what: &str, v: i32) -> Option<u8> {
        match u8::try_from(v) {
            Ok(b) => Some(b),
            Err(_) => {
                self.error(path, format!("{v} is not an {what} (0-255)"));
                None
            }
        }
    }

    fn port(&mut self, path: &str, p: &Port) -> Option<CheckedPort> {
        match &p.port {
            IntOrString::Int(n) => {
                let first = self.port_number(&format!("{path}.port"), *n)?;
                let last = match p.end_port {
                    None => first,
                    Some(end) => {
                        let last = self.port_number(&format!("{path}.endPort"), end)?;
                        if last < first {
                            self.error(
                                format!("{path}.endPort"),
                                format!("{last} is less than port {first}"),
                            );
                            return None;
                        }
                        last
                    }
                };
                Some(CheckedPort::Range { first, last })
            }
            IntOrString::String(name) => {
                let mut ok = true;
                if !is_iana_svc_name(name) {
                    self.error(
                        format!("{path}.port"),
                        format!(
                            "{name:?} is not a port number or a valid port name (IANA_SVC_NAME: \
                             1-15 lowercase letters, digits and '-', with a letter, no '-' at \
                             either end or twice in a row)"
                        ),
                    );
                    ok = false;
                }
                if p.end_port.is_some() {
                    self.error(format!("{path}.endPort"), "endPort needs a numeric port");
                    ok = false;
                }
                ok.then(|| CheckedPort::Named(name.clone()))
            }
        }
    }

    fn port_number(&mut self, path: &str, n: i32) -> Option<u16> {
        match u16::try_from(n) {
            Ok(p) if p >= 1 => Some(p),
            _ => {
                self.error(path, format!("{n} is not a port (1-65535)"));
                None
            }
        }
    }

    fn peer(&mut self, path: &str, p: &Peer) -> Option<CheckedPeer> {
        let kinds = usize::from(p.security_group.is_some())
            + usize::from(p.pod_selector.is_some() || p.namespace_selector.is_some())
            + usize::from(p.ip_block.is_some());
        if kinds != 1 {
            self.error(
                path,
                format!(
                    "a peer is exactly one of securityGroup, podSelector/namespaceSelector, \
                     ipBlock (found {kinds})"
                ),
            );
            return None;
        }
        if let Some(g) = &p.security_group {
            let mut ok = true;
            if g.name.is_empty() || g.name.len() > 253 {
                self.error(
                    format!("{path}.securityGroup.name"),
                    format!("{:?} must be 1-253 characters", g.name),
                );
                ok = false;
            } else if g.name.contains('/') {
                // No object name has one; NetworkPolicies' keys do (crate::netpol), and a group
                // must not select a NetworkPolicy's pods under its name.
                self.error(
                    format!("{path}.securityGroup.name"),
                    format!("{:?} is not a SecurityGroup name (no '/' allowed)", g.name),
                );
                ok = false;
            }
            let ns = g.namespace.as_deref().unwrap_or(self.namespace);
            return ok.then(|| CheckedPeer::Group(ObjectKey::new(ns, g.name.clone())));
        }
        if let Some(b) = &p.ip_block {
            return self.ip_block(&format!("{path}.ipBlock"), b);
        }
        let errors_before = self.errors.len();
        let pods = p
            .pod_selector
            .as_ref()
            .and_then(|s| self.selector(&format!("{path}.podSelector"), s));
        let namespaces = p
            .namespace_selector
            .as_ref()
            .and_then(|s| self.selector(&format!("{path}.namespaceSelector"), s));
        (self.errors.len() == errors_before).then_some(CheckedPeer::Pods { namespaces, pods })
    }

    fn ip_block(&mut self, path: &str, b: &IpBlock) -> Option<CheckedPeer> {
        let Ok(cidr) = b.cidr.parse::<IpNet>() else {
            self.error(
                format!("{path}.cidr"),
                format!("{:?} is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)", b.cidr),
            );
            return None;
        };
        let cidr = cidr.trunc();
        let mut except = Vec::new();
        let mut ok = true;
        if let Some(list) = &b.except {
            self.max_len(&format!("{path}.except"), list.len(), MAX_EXCEPT);
            for (i, e) in list.iter().enumerate() {
                let p = format!("{path}.except[{i}]");
                match e.parse::<IpNet>() {
                    Err(_) => {
                        self.error(p, format!("{e:?} is not a CIDR"));
                        ok = false;
                    }
                    Ok(net) if !cidr.contains(&net.trunc()) => {
                        self.error(p, format!("{e} is not inside {}", b.cidr));
                        ok = false;
                    }
                    Ok(net) => except.push(net.trunc()),
                }
            }
        }
        except.sort();
        except.dedup();
        ok.then_some(CheckedPeer::Block(PeerBlock { cidr, except }))
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
        Protocol::Icmp => "ICMP",
        Protocol::Icmpv6 => "ICMPv6",
        Protocol::Any => "Any",
    }
}

/// Whether `s` is a valid IANA service name, as apimachinery's `IsValidPortName`: 1-15
/// characters of `[-a-z0-9]`, at least one letter, no `-` at either end, no `--`.
pub fn is_iana_svc_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;
    use crate::crd::{EgressRule, GroupRef, IngressRule};

    fn spec(ingress: Vec<IngressRule>, egress: Option<Vec<EgressRule>>) -> SecurityGroupSpec {
        SecurityGroupSpec {
            pod_selector: LabelSelector::default(),
            ingress: Some(ingress),
            egress,
        }
    }

    fn block(cidr: &str, except: &[&str]) -> Peer {
        Peer {
            ip_block: Some(IpBlock {
                cidr: cidr.into(),
                except: (!except.is_empty())
                    .then(|| except.iter().map(|s| s.to_string()).collect()),
            }),
            ..Peer::default()
        }
    }

    fn from(peers: Vec<Peer>) -> IngressRule {
        IngressRule {
            from: Some(peers),
            ..IngressRule::default()
        }
    }

    fn ports(ports: Vec<Port>) -> IngressRule {
        IngressRule {
            ports: Some(ports),
            ..IngressRule::default()
        }
    }

    fn port(p: IntOrString, end_port: Option<i32>) -> Port {
        Port { port: p, end_port }
    }

    fn message(spec: &SecurityGroupSpec) -> String {
        validate("shop", spec).unwrap_err().to_string()
    }

    #[test]
    fn except_outside_the_cidr_is_refused_naming_the_field() {
        let s = spec(
            vec![from(vec![
                block("10.0.0.0/8", &[]),
                block("10.1.0.0/16", &["10.2.0.0/16"]),
            ])],
            None,
        );
        assert_eq!(
            message(&s),
            "spec.ingress[0].from[1].ipBlock.except[0]: 10.2.0.0/16 is not inside 10.1.0.0/16"
        );
    }

    #[test]
    fn except_of_the_other_family_is_not_inside() {
        let s = spec(vec![from(vec![block("10.0.0.0/8", &["fd00::/8"])])], None);
        assert_eq!(
            message(&s),
            "spec.ingress[0].from[0].ipBlock.except[0]: fd00::/8 is not inside 10.0.0.0/8"
        );
    }

    #[test]
    fn malformed_cidrs_are_refused() {
        let s = spec(
            vec![from(vec![
                block("10.0.0/8", &[]),
                block("10.0.0.0/8", &["nope"]),
            ])],
            None,
        );
        assert_eq!(
            message(&s),
            "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0/8\" is not a CIDR (e.g. 10.0.0.0/8 \
             or fd00::/8); spec.ingress[0].from[1].ipBlock.except[0]: \"nope\" is not a CIDR"
        );
    }

    #[test]
    fn cidr_with_host_bits_is_accepted_and_truncated() {
        let s = spec(
            vec![from(vec![block("10.1.2.3/16", &["10.1.2.3/24"])])],
            None,
        );
        let g = validate("shop", &s).unwrap();
        let peers = g.ingress.unwrap()[0].peers.clone().unwrap();
        assert_eq!(
            peers,
            vec![CheckedPeer::Block(PeerBlock {
                cidr: "10.1.0.0/16".parse().unwrap(),
                except: vec!["10.1.2.0/24".parse().unwrap()],
            })]
        );
    }

    #[test]
    fn end_port_below_port_is_refused() {
        let s = spec(
            vec![ports(vec![port(IntOrString::Int(80), Some(79))])],
            None,
        );
        assert_eq!(
            message(&s),
            "spec.ingress[0].ports[0].endPort: 79 is less than port 80"
        );
    }

    #[test]
    fn end_port_with_a_named_port_is_refused() {
        let s = spec(
            vec![ports(vec![port(
                IntOrString::String("http".into()),
                Some(90),
            )])],
            None,
        );
        assert_eq!(
            message(&s),
            "spec.ingress[0].ports[0].endPort: endPort needs a numeric port"
        );
    }

    #[test]
    fn ports_out_of_range_are_refused() {
        let s = spec(
            vec![ports(vec![
                port(IntOrString::Int(0), None),
                port(IntOrString::Int(65536), None),
                port(IntOrString::Int(1), Some(70000)),
            ])],
            None,
        );
        assert_eq!(
            message(&s),
            "spec.ingress[0].ports[0].port: 0 is not a port (1-65535); \
             spec.ingress[0].ports[1].port: 65536 is not a port (1-65535); \
             spec.ingress[0].ports[2].endPort: 70000 is not a port (1-65535)"
        );
    }

    #[test]
    fn named_ports_must_be_iana_service_names() {
        for bad in [
            "HTTP",
            "80",
            "-http",
            "http-",
            "ht--tp",
            "a-very-long-port-name",
            "",
        ] {
            let s = spec(
                vec![ports(vec![port(IntOrString::String(bad.into()), None)])],
                None,
            );
            let m = message(&s);
            assert!(
                m.starts_with(&format!(
                    "spec.ingress[0].ports[0].port: {bad:?} is not a port number or a valid port name"
                )),
                "{bad}: {m}"
            );
        }
        for good in ["http", "h2c", "web-8080", "x"] {
            let s = spec(
                vec![ports(vec![port(IntOrString::String(good.into()), None)])],
                None,
            );
            assert!(validate("shop", &s).is_ok(), "{good}");
        }
    }

    #[test]
    fn icmp_types_on_a_tcp_rule_are_refused() {
        let rule = IngressRule {
            icmp_types: Some(vec![IcmpType {
                icmp_type: 8,
                code: None,
            }]),
            ..IngressRule::default()
        };
        assert_eq!(
            message(&spec(vec![rule], None)),
            "spec.ingress[0].icmpTypes: icmpTypes are for ICMP and ICMPv6, not TCP"
        );
    }

    #[test]
    fn ports_on_icmp_and_any_rules_are_refused() {
        let egress = vec![
            EgressRule {
                protocol: Protocol::Icmp,
                ports: Some(vec![port(IntOrString::Int(80), None)]),
                ..EgressRule::default()
            },
            EgressRule {
                protocol: Protocol::Any,
                ports: Some(vec![]),
                ..EgressRule::default()
            },
        ];
        assert_eq!(
            message(&spec(vec![], Some(egress))),
            "spec.egress[0].ports: ports are for TCP, UDP and SCTP, not ICMP; \
             spec.egress[1].ports: ports are for TCP, UDP and SCTP, not Any"
        );
    }

    #[test]
    fn icmp_type_and_code_must_be_bytes() {
        let rule = IngressRule {
            protocol: Protocol::Icmpv6,
            icmp_types: Some(vec![IcmpType {
                icmp_type: 256,
                code: Some(-1),
            }]),
            ..IngressRule::default()
        };
        assert_eq!(
            message(&spec(vec![rule], None)),
            "spec.ingress[0].icmpTypes[0].type: 256 is not an ICMP type (0-255); \
             spec.ingress[0].icmpTypes[0].code: -1 is not an ICMP code (0-255)"
        );
    }

    #[test]
    fn a_peer_must_be_exactly_one_kind() {
        let two = Peer {
            security_group: Some(GroupRef {
                name: "lb".into(),
                namespace: None,
            }),
            ip_block: Some(IpBlock {
                cidr: "10.0.0.0/8".into(),
                except: None,
            }),
            ..Peer::default()
        };
        let egress = vec![EgressRule {
            to: Some(vec![Peer::default(), two]),
            ..EgressRule::default()
        }];
        assert_eq!(
            message(&spec(vec![], Some(egress))),
            "spec.egress[0].to[0]: a peer is exactly one of securityGroup, \
             podSelector/namespaceSelector, ipBlock (found 0); spec.egress[0].to[1]: a peer is \
             exactly one of securityGroup, podSelector/namespaceSelector, ipBlock (found 2)"
        );
    }

    #[test]
    fn pod_and_namespace_selector_together_are_one_peer() {
        let peer = Peer {
            pod_selector: Some(LabelSelector::default()),
            namespace_selector: Some(LabelSelector::default()),
            ..Peer::default()
        };
        let g = validate("shop", &spec(vec![from(vec![peer])], None)).unwrap();
        assert_eq!(
            g.ingress.unwrap()[0].peers,
            Some(vec![CheckedPeer::Pods {
                namespaces: Some(Selector::everything()),
                pods: Some(Selector::everything()),
            }])
        );
    }

    #[test]
    fn invalid_selectors_are_refused_with_their_path() {
        let bad = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "app".into(),
                operator: "Equals".into(),
                values: Some(vec!["x".into()]),
            }]),
        };
        let mut s = spec(
            vec![from(vec![Peer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([("env".into(), "not ok!".into())])),
                    match_expressions: None,
                }),
                ..Peer::default()
            }])],
            None,
        );
        s.pod_selector = bad;
        let m = message(&s);
        assert!(
            m.starts_with(
                "spec.podSelector.matchExpressions[0].operator: \"Equals\" is not In, NotIn, \
                 Exists or DoesNotExist; spec.ingress[0].from[0].namespaceSelector.matchLabels[\"env\"]: \
                 label value \"not ok!\""
            ),
            "{m}"
        );
    }

    #[test]
    fn empty_group_reference_name_is_refused() {
        let peer = Peer {
            security_group: Some(GroupRef {
                name: String::new(),
                namespace: None,
            }),
            ..Peer::default()
        };
        assert_eq!(
            message(&spec(vec![from(vec![peer])], None)),
            "spec.ingress[0].from[0].securityGroup.name: \"\" must be 1-253 characters"
        );
    }

    #[test]
    fn too_many_items_are_refused() {
        let rules = vec![IngressRule::default(); MAX_RULES + 1];
        assert_eq!(
            message(&spec(rules, None)),
            format!(
                "spec.ingress: {} items, at most {MAX_RULES} allowed",
                MAX_RULES + 1
            )
        );
    }

    #[test]
    fn group_reference_namespace_defaults_to_the_groups_own() {
        let peers = vec![
            Peer {
                security_group: Some(GroupRef {
                    name: "lb".into(),
                    namespace: None,
                }),
                ..Peer::default()
            },
            Peer {
                security_group: Some(GroupRef {
                    name: "mon".into(),
                    namespace: Some("ops".into()),
                }),
                ..Peer::default()
            },
        ];
        let g = validate("shop", &spec(vec![from(peers)], None)).unwrap();
        assert_eq!(
            g.ingress.unwrap()[0].peers,
            Some(vec![
                CheckedPeer::Group(ObjectKey::new("shop", "lb")),
                CheckedPeer::Group(ObjectKey::new("ops", "mon")),
            ])
        );
    }

    #[test]
    fn empty_lists_read_as_omitted_and_omitted_directions_stay_omitted() {
        let rule = IngressRule {
            ports: Some(vec![]),
            from: Some(vec![]),
            ..IngressRule::default()
        };
        let s = SecurityGroupSpec {
            pod_selector: LabelSelector::default(),
            ingress: Some(vec![rule]),
            egress: None,
        };
        let g = validate("shop", &s).unwrap();
        let r = &g.ingress.unwrap()[0];
        assert_eq!((r.ports.clone(), r.peers.clone()), (None, None));
        assert!(g.egress.is_none());
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let s = spec(
            vec![
                ports(vec![port(IntOrString::Int(0), None)]),
                from(vec![block("x", &[])]),
            ],
            None,
        );
        assert_eq!(validate("shop", &s).unwrap_err().0.len(), 2);
    }
}
