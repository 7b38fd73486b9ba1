//! A node in a box: a network namespace with a bridge, and pods as network namespaces plugged
//! into it through veth pairs, the way a bridge CNI wires them. The host-side veth of each pod is
//! where kubesg attaches.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use crate::netns::{unique_name, Netns, RawSocket};

/// The bridge's name inside the node namespace.
pub const BRIDGE: &str = "br0";

/// A pod: its namespace (interface `eth0`) and its host side in the node namespace.
#[derive(Debug)]
pub struct TestPod {
    /// The pod's namespace.
    pub ns: Netns,
    /// The host-side veth in the node namespace.
    pub host_ifname: String,
    /// Its index in the node namespace.
    pub host_ifindex: u32,
    /// The pod's IPv4 address (/24 on the bridge's subnet).
    pub ipv4: Ipv4Addr,
    /// The pod's IPv6 address (/64).
    pub ipv6: Ipv6Addr,
}

/// A node namespace with a bridge and its pods. Dropping it removes the pods, then the node.
#[derive(Debug)]
pub struct TestNode {
    /// The pods, in creation order (dropped before the node).
    pub pods: Vec<TestPod>,
    /// The node's namespace.
    pub ns: Netns,
}

impl TestNode {
    /// A node namespace with bridge `br0` up.
    ///
    /// Multicast snooping is off: with it on, the bridge joins 224.0.0.106 (multicast router
    /// discovery) and sends IGMP reports from 0.0.0.0 to every pod a second or so after it comes
    /// up, a NEW flow member pods drop by policy at random moments of a test, which would make
    /// packet counters unpredictable. Without it the bridge floods multicast (neighbour discovery
    /// still works) and sends nothing of its own but untracked ICMPv6.
    pub fn new() -> io::Result<Self> {
        let ns = Netns::new("kn")?;
        ns.ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ns.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(TestNode {
            pods: Vec::new(),
            ns,
        })
    }

    /// Adds a pod with `ipv4`/24 and `ipv6`/64 on `eth0`, its host side enslaved to the bridge;
    /// returns its index in `pods`.
    pub fn add_pod(&mut self, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> io::Result<usize> {
        let pod = Netns::new("kp")?;
        let host = unique_name("vh");
        let v4 = format!("{ipv4}/24");
        let v6 = format!("{ipv6}/64");
        self.ns.ip(&[
            "link",
            "add",
            &host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name(),
        ])?;
        self.ns
            .ip(&["link", "set", &host, "master", BRIDGE, "up"])?;
        pod.ip(&["addr", "add", &v4, "dev", "eth0"])?;
        pod.ip(&["-6", "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        let host_ifindex = self.ns.ifindex(&host)?;
        self.pods.push(TestPod {
            ns: pod,
            host_ifname: host,
            host_ifindex,
            ipv4,
            ipv6,
        });
        Ok(self.pods.len() - 1)
    }
}

/// Traffic to and from the pod, in its namespace, by address family (`v6` picks the pod's IPv6
/// address, else its IPv4 one): what the tests drive through the datapath.
impl TestPod {
    /// The pod's address of the family.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }

    /// The pod's address of the family with `port`.
    pub fn sockaddr(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.addr(v6), port)
    }

    /// A TCP listener on the pod's address and `port`.
    pub fn tcp_listen(&self, v6: bool, port: u16) -> io::Result<TcpListener> {
        self.ns.tcp_listen(self.sockaddr(v6, port))
    }

    /// Connects from the pod (ephemeral source port) to `to` within `timeout`; see
    /// [`Netns::tcp_connect`].
    pub fn tcp_connect(&self, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.ns.tcp_connect(None, to, timeout)
    }

    /// Connects from the pod's `port` to `to` within `timeout`: a fixed source port.
    pub fn tcp_connect_from(
        &self,
        port: u16,
        to: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        self.ns
            .tcp_connect(Some(self.sockaddr(to.is_ipv6(), port)), to, timeout)
    }

    /// A UDP socket on the pod's address and `port` (0: ephemeral) whose receives give up after
    /// `read_timeout`.
    pub fn udp_bind(&self, v6: bool, port: u16, read_timeout: Duration) -> io::Result<UdpSocket> {
        self.ns.udp_bind(self.sockaddr(v6, port), read_timeout)
    }

    /// One ICMP echo from the pod to `to`: whether the reply came within `timeout`.
    pub fn ping(&self, to: IpAddr, timeout: Duration) -> io::Result<bool> {
        self.ns.ping(to, None, timeout)
    }

    /// One ICMP echo with identifier `id` from the pod to `to`.
    pub fn ping_id(&self, to: IpAddr, id: u16, timeout: Duration) -> io::Result<bool> {
        self.ns.ping(to, Some(id), timeout)
    }

    /// Sends a crafted IP packet (header included) from the pod towards `to`, bypassing its
    /// TCP/UDP stack: for segments a real socket would never send (a stray ACK).
    pub fn send_raw_ip(&self, packet: &[u8], to: IpAddr) -> io::Result<()> {
        self.ns
            .raw_socket(to.is_ipv6(), libc::IPPROTO_RAW)?
            .send_to(packet, to)
    }

    /// Appends `rule` to the pod's own INPUT chain (`iptables`, or `ip6tables` for IPv6): the
    /// pod's firewall, which kubesg does not see, rejecting or dropping what reaches the pod.
    pub fn firewall_input(&self, v6: bool, rule: &[&str]) -> io::Result<()> {
        let tool = if v6 { "ip6tables" } else { "iptables" };
        let args: Vec<&str> = ["-A", "INPUT"].iter().chain(rule).copied().collect();
        self.ns.exec_ok(tool, &args).map(drop)
    }

    /// A raw socket that receives a copy of every TCP segment of the family addressed to the
    /// pod (RSTs included, which no TCP socket would report for a segment it did not send).
    /// Open it before sending what should provoke the segment.
    pub fn tcp_sniffer(&self, v6: bool) -> io::Result<RawSocket> {
        self.ns.raw_socket(v6, libc::IPPROTO_TCP)
    }
}
