//! A node in a box: a network namespace with a bridge, and pods as network namespaces plugged
//! into it through veth pairs, the way a bridge CNI wires them. The host-side veth of each pod is
//! where kubesg attaches.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
};

use crate::netns::{unique_name, Netns};

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
    pub fn new() -> io::Result<Self> {
        let ns = Netns::new("kn")?;
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
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
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", pod.name(),
        ])?;
        self.ns.ip(&["link", "set", &host, "master", BRIDGE, "up"])?;
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
