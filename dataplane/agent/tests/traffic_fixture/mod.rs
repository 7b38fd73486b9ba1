//! What the `traffic_*` tests share: a node with a client pod and a server pod on its bridge, a
//! private datapath attached to both, rule builders, and the traffic patterns every scenario
//! drives (a TCP exchange in both directions, a read that must not be served).
//!
//! Every test file includes it with `mod traffic_fixture;`; not every file uses every item.
#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream},
    time::Duration,
};

use kubesg_agent::{
    conntrack::{self, Connection},
    datapath::{Datapath, DatapathOptions, PolicyHandle},
    policy::{CompiledPolicy, PeerBlock, PortMatch, Protocol, Rule},
};
use kubesg_common::event::Counters;
use kubesg_testkit::{
    netns::{accept_within, is_timeout},
    node::{TestNode, TestPod},
};

/// The seed's client.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 5);
/// The seed's server.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 7);
/// The client's IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5);
/// The server's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7);

/// How long to wait for what must arrive: generous for a veth on an idle machine.
pub const ARRIVES: Duration = Duration::from_secs(2);
/// How long to wait before concluding that something dropped will not arrive (TCP retransmits
/// its first SYN after 1 s, so a dropped connection is still dropped after this).
pub const NEVER: Duration = Duration::from_secs(1);

/// Which of the two pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// The pod that opens connections (192.168.1.5, fd00::5).
    Client,
    /// The pod that accepts them (192.168.1.7, fd00::7).
    Server,
}

impl Who {
    /// Its addresses, IPv4 and IPv6.
    pub fn addrs(self) -> [IpAddr; 2] {
        match self {
            Who::Client => [CLIENT_V4.into(), CLIENT_V6.into()],
            Who::Server => [SERVER_V4.into(), SERVER_V6.into()],
        }
    }
}

/// Host blocks (/32, /128) for both addresses of `who`.
pub fn peers(who: Who) -> Vec<PeerBlock> {
    who.addrs()
        .iter()
        .map(|ip| {
            let len = if ip.is_ipv6() { 128 } else { 32 };
            let net = format!("{ip}/{len}")
                .parse()
                .unwrap_or_else(|e| panic!("host block of {ip}: {e}"));
            PeerBlock::cidr(net)
        })
        .collect()
}

/// A rule on `protocol` and `ports` (empty: all) with both addresses of `peer`.
pub fn rule(protocol: Protocol, ports: &[u16], peer: Who) -> Rule {
    Rule {
        protocol,
        ports: ports
            .iter()
            .map(|p| PortMatch::Range {
                first: *p,
                last: *p,
            })
            .collect(),
        peers: peers(peer),
    }
}

/// Rules allowing the echo request of both families (ICMP type 8, ICMPv6 type 128) with `peer`.
pub fn echo_rules(peer: Who) -> Vec<Rule> {
    [(Protocol::Icmp, 8), (Protocol::Icmpv6, 128)]
        .into_iter()
        .map(|(protocol, icmp_type)| Rule {
            protocol,
            ports: vec![PortMatch::Icmp {
                icmp_type,
                code: None,
            }],
            peers: peers(peer),
        })
        .collect()
}

/// A policy with these egress rules and no ingress rule.
pub fn egress(rules: Vec<Rule>) -> CompiledPolicy {
    CompiledPolicy {
        egress: rules,
        ..CompiledPolicy::default()
    }
}

/// A policy with these ingress rules and no egress rule.
pub fn ingress(rules: Vec<Rule>) -> CompiledPolicy {
    CompiledPolicy {
        ingress: rules,
        ..CompiledPolicy::default()
    }
}

/// A client pod and a server pod on one node, both endpoints registered before the programs are
/// attached (so the first packet is judged), with a private datapath.
pub struct Pods {
    /// The datapath (declared first: dropped, so detached, before the node goes).
    pub dp: Datapath,
    /// The node with the two pods: `pods[0]` the client, `pods[1]` the server.
    pub node: TestNode,
    /// The client's policy, `None` for a non-member.
    pub client_policy: Option<PolicyHandle>,
    /// The server's policy, `None` for a non-member.
    pub server_policy: Option<PolicyHandle>,
}

impl Pods {
    /// The two pods, each a member with its policy or a non-member (`None`).
    pub fn new(client: Option<&CompiledPolicy>, server: Option<&CompiledPolicy>) -> Self {
        let mut node = TestNode::new().expect("creating the node");
        node.add_pod(CLIENT_V4, CLIENT_V6)
            .expect("adding the client");
        node.add_pod(SERVER_V4, SERVER_V6)
            .expect("adding the server");
        let mut dp = Datapath::load(&DatapathOptions::default()).expect("loading the datapath");
        let client_policy = client.map(|p| dp.install_policy(p).expect("client policy"));
        let server_policy = server.map(|p| dp.install_policy(p).expect("server policy"));
        let (ci, si) = (node.pods[0].host_ifindex, node.pods[1].host_ifindex);
        dp.set_endpoint(ci, client_policy).expect("client endpoint");
        dp.set_endpoint(si, server_policy).expect("server endpoint");
        node.ns.enter(|| {
            dp.attach(ci).expect("attaching to the client");
            dp.attach(si).expect("attaching to the server");
        });
        Pods {
            dp,
            node,
            client_policy,
            server_policy,
        }
    }

    /// The pod `who`.
    pub fn pod(&self, who: Who) -> &TestPod {
        match who {
            Who::Client => &self.node.pods[0],
            Who::Server => &self.node.pods[1],
        }
    }

    /// The client pod.
    pub fn client(&self) -> &TestPod {
        self.pod(Who::Client)
    }

    /// The server pod.
    pub fn server(&self) -> &TestPod {
        self.pod(Who::Server)
    }

    /// The host-side interface of `who`: its endpoint.
    pub fn ifindex(&self, who: Who) -> u32 {
        self.pod(who).host_ifindex
    }

    /// The connections tracked for `who`'s endpoint.
    pub fn entries(&self, who: Who) -> Vec<Connection> {
        let ifindex = self.ifindex(who);
        conntrack::list(self.dp.maps())
            .expect("listing conntrack")
            .into_iter()
            .filter(|c| c.key.ifindex == ifindex)
            .collect()
    }

    /// `who`'s tracked TCP connections to or from `port` on the peer or the pod.
    pub fn tcp_entries(&self, who: Who, port: u16) -> Vec<Connection> {
        self.entries(who)
            .into_iter()
            .filter(|c| {
                c.key.proto == kubesg_common::proto::TCP
                    && (c.key.peer_port == port || c.key.pod_port == port)
            })
            .collect()
    }

    /// `who`'s counters: `[egress (what it sends), ingress (what it receives)]`.
    pub fn counters(&self, who: Who) -> [Counters; 2] {
        self.dp
            .counters(self.ifindex(who))
            .expect("reading counters")
            .expect("the endpoint is registered")
    }

    /// The whole table and both endpoints' counters, for failure messages.
    pub fn dump(&self) -> String {
        let now = kubesg_agent::clock::now_ns();
        let mut s = String::new();
        for who in [Who::Client, Who::Server] {
            s.push_str(&format!("{who:?} (ifindex {}):\n", self.ifindex(who)));
            for c in self.entries(who) {
                s.push_str(&format!("  {}\n", c.nf_conntrack_line(now)));
            }
            s.push_str(&format!("  counters {:?}\n", self.counters(who)));
        }
        s
    }

    /// Opens a TCP connection from the client to the server's `port` and proves it carries data
    /// both ways; returns (client side, server side).
    pub fn tcp_open(&self, v6: bool, port: u16) -> (TcpStream, TcpStream) {
        let listener = self.server().tcp_listen(v6, port).expect("listening");
        let mut c = self
            .client()
            .tcp_connect(self.server().sockaddr(v6, port), ARRIVES)
            .unwrap_or_else(|e| panic!("connecting: {e}\n{}", self.dump()));
        let mut s = accept_within(&listener, ARRIVES).expect("accepting");
        exchange(&mut c, &mut s).unwrap_or_else(|e| panic!("exchanging: {e}\n{}", self.dump()));
        (c, s)
    }
}

/// Sends `ping` from `a` to `b` and `pong` back: the connection carries data both ways.
pub fn exchange(a: &mut TcpStream, b: &mut TcpStream) -> io::Result<()> {
    a.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    b.write_all(b"pong")?;
    a.read_exact(&mut buf)?;
    assert_eq!(&buf, b"pong");
    Ok(())
}

/// Whether `from` can still send data that `to` reads within [`NEVER`].
pub fn data_gets_through(from: &mut TcpStream, to: &mut TcpStream) -> bool {
    from.write_all(b"more")
        .expect("writing into the socket buffer");
    to.set_read_timeout(Some(NEVER)).expect("setting a timeout");
    let mut buf = [0u8; 4];
    match to.read_exact(&mut buf) {
        Ok(()) => {
            assert_eq!(&buf, b"more");
            true
        }
        Err(e) if is_timeout(&e) => false,
        Err(e) => panic!("reading: {e}"),
    }
}

/// Asserts that a connect attempt was dropped (no answer at all), not refused or accepted.
pub fn assert_dropped<T: std::fmt::Debug>(r: io::Result<T>, what: &str, pods: &Pods) {
    match r {
        Err(e) if is_timeout(&e) => {}
        other => panic!("{what}: expected no answer, got {other:?}\n{}", pods.dump()),
    }
}
