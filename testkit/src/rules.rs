//! Policies as the tests write them: short builders for the agent's `CompiledPolicy` and `Rule`,
//! so that a test states which protocol, ports and peers it allows and nothing else.

use std::net::IpAddr;

use ipnet::IpNet;
use kubesg_agent::policy::{CompiledPolicy, Layer, PeerBlock, PortMatch, Protocol, Rule};

/// Every address of both families: the peers of a rule that is about protocols and ports only.
pub fn anywhere() -> Vec<PeerBlock> {
    vec![cidr("0.0.0.0/0"), cidr("::/0")]
}

/// A peer block by its spelling (`10.0.0.0/8`, `fd00::/16`), without exceptions.
pub fn cidr(spelling: &str) -> PeerBlock {
    let net: IpNet = spelling
        .parse()
        .unwrap_or_else(|e| panic!("{spelling:?} is not a CIDR block: {e}"));
    PeerBlock::cidr(net)
}

/// The host blocks (/32, /128) of `addrs`: peers that are exactly these pods.
pub fn hosts(addrs: &[IpAddr]) -> Vec<PeerBlock> {
    addrs
        .iter()
        .map(|ip| {
            let len = if ip.is_ipv6() { 128 } else { 32 };
            let net = IpNet::new(*ip, len).unwrap_or_else(|e| panic!("host block of {ip}: {e}"));
            PeerBlock::cidr(net)
        })
        .collect()
}

/// One port: the range from `p` to `p`.
pub fn port(p: u16) -> PortMatch {
    range(p, p)
}

/// The ports from `first` to `last`, both included.
pub fn range(first: u16, last: u16) -> PortMatch {
    PortMatch::Range { first, last }
}

/// An ICMP or ICMPv6 type, with one `code` or (`None`) every code.
pub fn icmp(icmp_type: u8, code: Option<u8>) -> PortMatch {
    PortMatch::Icmp { icmp_type, code }
}

/// A rule on `protocol` and `ports` (empty: every port) with any peer.
pub fn rule(protocol: Protocol, ports: Vec<PortMatch>) -> Rule {
    rule_with(protocol, ports, anywhere())
}

/// A rule on `protocol` and `ports` (empty: every port) with these peers only.
pub fn rule_with(protocol: Protocol, ports: Vec<PortMatch>, peers: Vec<PeerBlock>) -> Rule {
    Rule {
        protocol,
        ports,
        peers,
        origin: String::new(),
        layer: Layer::SecurityGroups,
    }
}

/// `rule` moved into `layer`, with `origin` naming where it comes from (what `explain` shows).
pub fn of_layer(layer: Layer, origin: &str, rule: Rule) -> Rule {
    Rule {
        layer,
        origin: origin.to_string(),
        ..rule
    }
}

/// A layered policy: `ingress` rules judged by the layers `ingress_layers`, `egress` rules by
/// `egress_layers` (each rule carries its layer, see [`of_layer`]).
pub fn layered(
    ingress: Vec<Rule>,
    ingress_layers: Vec<Layer>,
    egress: Vec<Rule>,
    egress_layers: Vec<Layer>,
) -> CompiledPolicy {
    CompiledPolicy {
        ingress,
        egress,
        layered: true,
        ingress_layers,
        egress_layers,
        ..CompiledPolicy::default()
    }
}

/// Rules allowing the echo request of both families (ICMP type 8, ICMPv6 type 128) with `peers`,
/// so that one policy lets a pod ping over IPv4 and IPv6.
pub fn echo_requests(peers: Vec<PeerBlock>) -> Vec<Rule> {
    vec![
        rule_with(Protocol::Icmp, vec![icmp(8, None)], peers.clone()),
        rule_with(Protocol::Icmpv6, vec![icmp(128, None)], peers),
    ]
}

/// What the program tests' client pods may open, with any peer: DNS queries (UDP 53), TCP to
/// port 80, and pings of both families.
pub fn dns_http_ping() -> Vec<Rule> {
    let mut rules = vec![
        rule(Protocol::Udp, vec![port(53)]),
        rule(Protocol::Tcp, vec![port(80)]),
    ];
    rules.extend(echo_requests(anywhere()));
    rules
}

/// A stateful policy with these egress rules (what the pod may open) and no ingress rule.
pub fn egress(rules: Vec<Rule>) -> CompiledPolicy {
    CompiledPolicy {
        egress: rules,
        ..CompiledPolicy::default()
    }
}

/// A stateful policy with these ingress rules (what the pod accepts) and no egress rule.
pub fn ingress(rules: Vec<Rule>) -> CompiledPolicy {
    CompiledPolicy {
        ingress: rules,
        ..CompiledPolicy::default()
    }
}

/// Allows every connection both ways: filtering is on but refuses nothing, so whatever such a
/// member drops, it drops for being INVALID.
pub fn allow_all() -> CompiledPolicy {
    CompiledPolicy {
        ingress: vec![rule(Protocol::Any, vec![])],
        egress: vec![rule(Protocol::Any, vec![])],
        ..CompiledPolicy::default()
    }
}
