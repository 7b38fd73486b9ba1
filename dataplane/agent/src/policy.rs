//! Compiled rules: what the operator sends for one policy (the set of security groups a pod
//! belongs to), already resolved to addresses and ports. This is the agent's domain model; the
//! gRPC types are converted into it at the edge.
//!
//! Semantics, as the datapath enforces them: a NEW connection in a direction is allowed iff some
//! rule of that direction matches its protocol, its destination port (or ICMP type/code) and the
//! remote address. A rule with no peers matches nobody (unresolved peers never widen access); a
//! rule with no ports matches every port of its protocol.

use std::net::IpAddr;

use ipnet::IpNet;
use kubesg_common::{proto, Direction};
use serde::{Deserialize, Serialize};

/// The protocol a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// Every IP protocol, every port.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// ICMP (IPv4).
    Icmp,
    /// ICMPv6.
    Icmpv6,
    /// Another IP protocol by number (no ports).
    Number(u8),
}

impl Protocol {
    /// The IP protocol number, `None` for [`Protocol::Any`].
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Any => None,
            Protocol::Tcp => Some(proto::TCP),
            Protocol::Udp => Some(proto::UDP),
            Protocol::Sctp => Some(proto::SCTP),
            Protocol::Icmp => Some(proto::ICMP),
            Protocol::Icmpv6 => Some(proto::ICMPV6),
            Protocol::Number(n) => Some(n),
        }
    }

    /// Whether the protocol has ports (TCP, UDP, SCTP).
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
    }

    /// Whether the protocol is ICMP or ICMPv6 (matched by type and code).
    pub fn is_icmp(self) -> bool {
        matches!(self, Protocol::Icmp | Protocol::Icmpv6)
    }
}

/// Which ports (or ICMP messages) of its protocol a rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PortMatch {
    /// Destination ports `first..=last` (TCP, UDP, SCTP).
    Range {
        /// First port.
        first: u16,
        /// Last port (inclusive).
        last: u16,
    },
    /// An ICMP type, with one code or any code.
    Icmp {
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code; `None` matches every code.
        code: Option<u8>,
    },
}

/// A block of remote addresses: `cidr` minus the `except` blocks inside it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerBlock {
    /// The block.
    pub cidr: IpNet,
    /// Blocks inside `cidr` that are not allowed.
    pub except: Vec<IpNet>,
}

impl PeerBlock {
    /// A block with no exceptions.
    pub fn cidr(cidr: IpNet) -> Self {
        PeerBlock {
            cidr: cidr.trunc(),
            except: Vec::new(),
        }
    }

    /// Whether `addr` is in the block and in none of its exceptions.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.cidr.contains(&addr) && !self.except.iter().any(|e| e.contains(&addr))
    }
}

/// One allow rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// The protocol.
    pub protocol: Protocol,
    /// Ports or ICMP messages; empty means all of them. Must be empty for protocols without ports.
    pub ports: Vec<PortMatch>,
    /// Remote addresses; empty matches nobody.
    pub peers: Vec<PeerBlock>,
    /// Where the rule comes from (e.g. `shop/web ingress[0]`), for `explain`; not used to match.
    #[serde(default)]
    pub origin: String,
}

impl Rule {
    /// Whether the rule allows a connection with `remote` on protocol `proto` to `port` (the
    /// destination port, or `type << 8 | code` for ICMP).
    pub fn allows(&self, proto: u8, port: u16, remote: IpAddr) -> bool {
        let proto_ok = match self.protocol.number() {
            None => true,
            Some(p) => p == proto,
        };
        proto_ok
            && (self.protocol == Protocol::Any
                || self.ports.is_empty()
                || self.ports.iter().any(|m| m.matches(port)))
            && self.peers.iter().any(|b| b.contains(remote))
    }
}

impl PortMatch {
    /// Whether this match allows `port` (a port, or `type << 8 | code` for ICMP).
    pub fn matches(&self, port: u16) -> bool {
        match *self {
            PortMatch::Range { first, last } => first <= port && port <= last,
            PortMatch::Icmp { icmp_type, code } => {
                (port >> 8) as u8 == icmp_type && code.is_none_or(|c| c == port as u8)
            }
        }
    }
}

/// The compiled rules of one policy: every endpoint with the same set of groups shares it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledPolicy {
    /// Rules for connections the pod accepts.
    pub ingress: Vec<Rule>,
    /// Rules for connections the pod opens.
    pub egress: Vec<Rule>,
    /// Stateless (UNTRACKED): every packet is judged by the rules of its direction and nothing is
    /// tracked, so replies need rules of their own, like a network ACL.
    pub stateless: bool,
}

impl CompiledPolicy {
    /// The rules of one direction.
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// The reference evaluation, rule by rule: the index of the first rule of `dir` that allows
    /// the connection. The datapath must agree with this on every packet (tests compare them),
    /// and `explain` uses it to name the rule.
    pub fn first_match(
        &self,
        dir: Direction,
        proto: u8,
        port: u16,
        remote: IpAddr,
    ) -> Option<usize> {
        self.rules(dir)
            .iter()
            .position(|r| r.allows(proto, port, remote))
    }
}
