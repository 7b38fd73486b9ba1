//! One test, both IP families: the addresses of a crafted flow for IPv4 ([`V4`]) and IPv6
//! ([`V6`]), the frames that flow carries, and [`ipv4_and_ipv6!`](crate::ipv4_and_ipv6) to run a
//! test body once with each.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use kubesg_agent::{conntrack::Tuple, policy::Protocol};
use kubesg_common::proto;

use crate::packet::{self, TcpFlags};

/// The pod's port in the flows it opens (an ephemeral port).
pub const POD_PORT: u16 = 40000;
/// The peer's port in the flows it opens to the pod.
pub const PEER_PORT: u16 = 50000;

/// [`V6`]'s pod, as the builders of IPv6-only messages (neighbour discovery) take it.
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5);
/// An on-link neighbour of [`V6`]'s pod (the same /64): neighbour discovery stays on the link.
pub const NEIGHBOR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7);

/// The hosts of crafted traffic in one IP family: a test written against it runs unchanged over
/// IPv4 and IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    /// The pod whose endpoint is under test.
    pub pod: IpAddr,
    /// The host it talks to, on another subnet.
    pub peer: IpAddr,
    /// A router between them, the source of ICMP errors.
    pub router: IpAddr,
}

/// IPv4: pod 10.0.0.5, peer 10.0.1.7, router 10.0.9.1.
pub const V4: Family = Family {
    pod: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
    peer: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 7)),
    router: IpAddr::V4(Ipv4Addr::new(10, 0, 9, 1)),
};

/// IPv6: pod fd00::5 ([`POD_V6`]), peer fd00:1::7, router fd00:9::1.
pub const V6: Family = Family {
    pod: IpAddr::V6(POD_V6),
    peer: IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 7)),
    router: IpAddr::V6(Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1)),
};

impl Family {
    /// Whether this is IPv6, for the APIs that take the family as a flag.
    pub fn is_v6(self) -> bool {
        self.pod.is_ipv6()
    }

    /// `v4` or `v6`, whichever belongs to this family: the one place a test branches on it.
    pub fn pick<T>(self, v4: T, v6: T) -> T {
        if self.is_v6() {
            v6
        } else {
            v4
        }
    }

    /// An address by its IPv4 or IPv6 spelling, whichever is this family's.
    pub fn addr(self, v4: &str, v6: &str) -> IpAddr {
        let s = self.pick(v4, v6);
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} is not an address: {e}"))
    }

    /// A network by its IPv4 or IPv6 spelling, whichever is this family's.
    pub fn cidr(self, v4: &str, v6: &str) -> IpNet {
        let s = self.pick(v4, v6);
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} is not a CIDR block: {e}"))
    }

    /// The rules' protocol for this family's ICMP: `Icmp` or `Icmpv6`.
    pub fn icmp_protocol(self) -> Protocol {
        self.pick(Protocol::Icmp, Protocol::Icmpv6)
    }

    /// The IP protocol number of this family's ICMP, as conntrack keys carry it.
    pub fn icmp_proto(self) -> u8 {
        self.pick(proto::ICMP, proto::ICMPV6)
    }

    /// The echo request's ICMP type: 8, or 128 for ICMPv6.
    pub fn echo_request_type(self) -> u8 {
        self.pick(8, 128)
    }

    /// The original tuple of a flow the pod opened to peer:`port` (from [`POD_PORT`]), as
    /// `Connection::original` reports it.
    pub fn out_tuple(self, port: u16) -> Tuple {
        Tuple {
            src: self.pod,
            dst: self.peer,
            sport: POD_PORT,
            dport: port,
        }
    }

    /// The original tuple of a flow the peer opened to pod:`port` (from [`PEER_PORT`]).
    pub fn in_tuple(self, port: u16) -> Tuple {
        Tuple {
            src: self.peer,
            dst: self.pod,
            sport: PEER_PORT,
            dport: port,
        }
    }

    /// TCP pod:[`POD_PORT`] → peer:`port`: the pod's own connection.
    pub fn tcp_out(self, port: u16, flags: TcpFlags) -> Vec<u8> {
        packet::tcp(self.pod, self.peer, POD_PORT, port, flags)
    }

    /// TCP peer:`port` → pod:[`POD_PORT`]: the other side of [`Family::tcp_out`].
    pub fn tcp_out_reply(self, port: u16, flags: TcpFlags) -> Vec<u8> {
        packet::tcp(self.peer, self.pod, port, POD_PORT, flags)
    }

    /// TCP peer:[`PEER_PORT`] → pod:`port`: a connection to the pod.
    pub fn tcp_in(self, port: u16, flags: TcpFlags) -> Vec<u8> {
        packet::tcp(self.peer, self.pod, PEER_PORT, port, flags)
    }

    /// TCP pod:`port` → peer:[`PEER_PORT`]: the pod's side of [`Family::tcp_in`].
    pub fn tcp_in_reply(self, port: u16, flags: TcpFlags) -> Vec<u8> {
        packet::tcp(self.pod, self.peer, port, PEER_PORT, flags)
    }

    /// UDP pod:[`POD_PORT`] → peer:`port`: a datagram the pod sends first.
    pub fn udp_out(self, port: u16, payload: &[u8]) -> Vec<u8> {
        packet::udp(self.pod, self.peer, POD_PORT, port, payload)
    }

    /// UDP peer:`port` → pod:[`POD_PORT`]: the answer to [`Family::udp_out`].
    pub fn udp_out_reply(self, port: u16, payload: &[u8]) -> Vec<u8> {
        packet::udp(self.peer, self.pod, port, POD_PORT, payload)
    }

    /// UDP peer:[`PEER_PORT`] → pod:`port`: a datagram the peer sends first.
    pub fn udp_in(self, port: u16, payload: &[u8]) -> Vec<u8> {
        packet::udp(self.peer, self.pod, PEER_PORT, port, payload)
    }

    /// UDP pod:`port` → peer:[`PEER_PORT`]: the pod's answer to [`Family::udp_in`].
    pub fn udp_in_reply(self, port: u16, payload: &[u8]) -> Vec<u8> {
        packet::udp(self.pod, self.peer, port, PEER_PORT, payload)
    }

    /// The pod pings the peer with identifier `id` (sequence 1).
    pub fn echo_out(self, id: u16) -> Vec<u8> {
        packet::icmp_echo_request(self.pod, self.peer, id, 1)
    }

    /// The peer answers the pod's ping `id`.
    pub fn echo_out_reply(self, id: u16) -> Vec<u8> {
        packet::icmp_echo_reply(self.peer, self.pod, id, 1)
    }

    /// The peer pings the pod with identifier `id` (sequence 1).
    pub fn echo_in(self, id: u16) -> Vec<u8> {
        packet::icmp_echo_request(self.peer, self.pod, id, 1)
    }

    /// The pod answers the peer's ping `id`.
    pub fn echo_in_reply(self, id: u16) -> Vec<u8> {
        packet::icmp_echo_reply(self.pod, self.peer, id, 1)
    }
}

/// Runs every test body once over IPv4 and once over IPv6: for each `name`, a module `name` with
/// the privileged tests `ipv4` and `ipv6`, calling `name(V4)` and `name(V6)` (`fn name(f:
/// Family)` in the calling module).
#[macro_export]
macro_rules! ipv4_and_ipv6 {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn ipv4() {
                $crate::require_privileged!();
                super::$name($crate::family::V4);
            }
            #[test]
            fn ipv6() {
                $crate::require_privileged!();
                super::$name($crate::family::V6);
            }
        }
    )*};
}
