//! Layered policies on real traffic, in network namespaces: a node with a bridge (as the CNI
//! bridge plugin builds it, the bridge holding the pods' gateway address) and a routed pod (as
//! the ptp plugin builds it: the host side of its veth is a routed interface of the node).
//!
//! - a pod selected by both layers accepts a connection only when both allow it;
//! - a pod under a NetworkPolicies-only default deny on ingress still accepts its node's
//!   connections, bridged or routed, and refuses another pod's: the datapath tells them apart by
//!   `ingress_ifindex` (0 for what the node's own stack sends, the receiving interface for what
//!   it forwards or bridges), which this test checks on real packets;
//! - under a security-groups layer the node gets no such exemption.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    time::Duration,
};

use kubesg_agent::{
    datapath::{Datapath, DatapathOptions},
    policy::{CompiledPolicy, Layer, Protocol},
};
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    netns::{unique_name, Netns},
    node::{TestNode, TestPod, BRIDGE},
    pods::{ARRIVES, NEVER},
    rules::{hosts, layered, of_layer, port, rule_with},
};

use Layer::{NetworkPolicies as Np, SecurityGroups as Sg};

/// A port both layers allow on the web pod.
const BOTH: u16 = 8080;
/// A port only the web pod's security group allows.
const SG_ONLY: u16 = 7070;
/// A port only the web pod's NetworkPolicy allows.
const NP_ONLY: u16 = 9090;

/// The bridge's (the pods' gateway's) addresses on the node.
const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
/// The node's end of the routed pod's link.
const ROUTED_GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 5, 1);
const ROUTED_GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 5, 0, 0, 0, 0, 0, 1);

/// Indices of the pods in `node.pods`.
const WEB: usize = 0;
const OTHER: usize = 1;
const DB_BRIDGED: usize = 2;
const DB_ROUTED: usize = 3;

/// The node, its pods and the datapath on them (declared first: detached before the node goes).
struct Cluster {
    dp: Datapath,
    node: TestNode,
}

fn v4(last: u8, subnet: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, subnet, last)
}

fn v6(last: u16, subnet: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, subnet, 0, 0, 0, 0, 0, last)
}

fn sh(ns: &Netns, args: &[&str]) {
    ns.ip(args)
        .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e}", ns.name()));
}

/// A pod whose host-side veth is a routed interface of the node (not a bridge port): the node
/// holds the link's gateway addresses, the pod routes everything through them.
fn add_routed_pod(node: &mut TestNode, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> usize {
    let pod = Netns::new("kp").expect("the routed pod's namespace");
    let host = unique_name("vr");
    sh(
        &node.ns,
        &[
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
        ],
    );
    let (gw4, gw6) = (format!("{ROUTED_GW_V4}/24"), format!("{ROUTED_GW_V6}/64"));
    sh(&node.ns, &["addr", "add", &gw4, "dev", &host]);
    sh(
        &node.ns,
        &["-6", "addr", "add", &gw6, "dev", &host, "nodad"],
    );
    sh(&node.ns, &["link", "set", &host, "up"]);
    let (a4, a6) = (format!("{ipv4}/24"), format!("{ipv6}/64"));
    sh(&pod, &["addr", "add", &a4, "dev", "eth0"]);
    sh(&pod, &["-6", "addr", "add", &a6, "dev", "eth0", "nodad"]);
    sh(&pod, &["link", "set", "eth0", "up"]);
    sh(
        &pod,
        &["route", "add", "default", "via", &ROUTED_GW_V4.to_string()],
    );
    sh(
        &pod,
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &ROUTED_GW_V6.to_string(),
        ],
    );
    let host_ifindex = node.ns.ifindex(&host).expect("the routed pod's ifindex");
    node.pods.push(TestPod {
        ns: pod,
        host_ifname: host,
        host_ifindex,
        ipv4,
        ipv6,
    });
    node.pods.len() - 1
}

/// web, other and db on the bridge, db-routed on a routed link; the node forwards between them.
fn cluster() -> Cluster {
    let mut node = TestNode::new().expect("creating the node");
    for (i, (last, name)) in [(10, "web"), (11, "other"), (12, "db")]
        .into_iter()
        .enumerate()
    {
        let idx = node
            .add_pod(v4(last, 0), v6(u16::from(last), 0))
            .unwrap_or_else(|e| panic!("adding {name}: {e}"));
        assert_eq!(idx, i);
    }
    let (gw4, gw6) = (format!("{GW_V4}/24"), format!("{GW_V6}/64"));
    sh(&node.ns, &["addr", "add", &gw4, "dev", BRIDGE]);
    sh(
        &node.ns,
        &["-6", "addr", "add", &gw6, "dev", BRIDGE, "nodad"],
    );
    for pod in &node.pods {
        sh(
            &pod.ns,
            &["route", "add", "default", "via", &GW_V4.to_string()],
        );
        sh(
            &pod.ns,
            &["-6", "route", "add", "default", "via", &GW_V6.to_string()],
        );
    }
    assert_eq!(add_routed_pod(&mut node, v4(10, 5), v6(10, 5)), DB_ROUTED);
    for knob in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        node.ns
            .exec_ok("sysctl", &["-qw", knob])
            .unwrap_or_else(|e| panic!("sysctl {knob}: {e}"));
    }
    let dp = Datapath::load(&DatapathOptions::default()).expect("loading the datapath");
    Cluster { dp, node }
}

impl Cluster {
    /// Makes pod `i` a member of `policy` and attaches the programs to its interface.
    fn enforce(&mut self, i: usize, policy: &CompiledPolicy) {
        let h = self.dp.install_policy(policy).expect("installing");
        let ifindex = self.node.pods[i].host_ifindex;
        self.dp.set_endpoint(ifindex, Some(h)).expect("endpoint");
        let dp = &mut self.dp;
        self.node
            .ns
            .enter(|| dp.attach(ifindex).expect("attaching"));
    }

    fn listen(&self, i: usize, v6: bool, port: u16) -> TcpListener {
        self.node.pods[i]
            .tcp_listen(v6, port)
            .expect("listening in the pod")
    }

    fn to(&self, i: usize, v6: bool, port: u16) -> SocketAddr {
        self.node.pods[i].sockaddr(v6, port)
    }

    /// Whether pod `from` connects to pod `to`'s `port` within `timeout` (a dropped SYN times
    /// out): [`ARRIVES`] where it should open, [`NEVER`] where it should not.
    fn pod_connects(&self, from: usize, to: usize, v6: bool, port: u16, timeout: Duration) -> bool {
        self.node.pods[from]
            .tcp_connect(self.to(to, v6, port), timeout)
            .is_ok()
    }

    /// Whether the node itself connects to pod `to`'s `port` within `timeout`.
    fn node_connects(&self, to: usize, v6: bool, port: u16, timeout: Duration) -> bool {
        self.node
            .ns
            .tcp_connect(None, self.to(to, v6, port), timeout)
            .is_ok()
    }

    fn counters_in(&self, i: usize) -> kubesg_common::event::Counters {
        self.dp
            .counters(self.node.pods[i].host_ifindex)
            .expect("counters")
            .expect("an endpoint")[1]
    }
}

ipv4_and_ipv6!(
    a_pod_selected_by_both_layers_accepts_only_what_both_allow,
    a_networkpolicy_default_deny_lets_the_node_in_and_no_other_pod,
    a_security_groups_layer_gives_the_node_no_exemption,
);

fn a_pod_selected_by_both_layers_accepts_only_what_both_allow(f: Family) {
    let v6 = f.is_v6();
    let mut c = cluster();
    let other = hosts(&[c.node.pods[OTHER].addr(v6)]);
    let web = layered(
        vec![
            of_layer(
                Sg,
                "shop/web ingress[0]",
                rule_with(
                    Protocol::Tcp,
                    vec![port(BOTH), port(SG_ONLY)],
                    other.clone(),
                ),
            ),
            of_layer(
                Np,
                "networkpolicy shop/allow-web ingress[0]",
                rule_with(Protocol::Tcp, vec![port(BOTH), port(NP_ONLY)], other),
            ),
        ],
        vec![Sg, Np],
        vec![],
        vec![],
    );
    c.enforce(WEB, &web);
    let _l: Vec<TcpListener> = [BOTH, SG_ONLY, NP_ONLY]
        .iter()
        .map(|p| c.listen(WEB, v6, *p))
        .collect();
    assert!(
        c.pod_connects(OTHER, WEB, v6, BOTH, ARRIVES),
        "both layers allow it"
    );
    assert!(
        !c.pod_connects(OTHER, WEB, v6, SG_ONLY, NEVER),
        "the NetworkPolicy does not allow {SG_ONLY}"
    );
    assert!(
        !c.pod_connects(OTHER, WEB, v6, NP_ONLY, NEVER),
        "the security group does not allow {NP_ONLY}"
    );
    assert!(
        !c.pod_connects(DB_BRIDGED, WEB, v6, BOTH, NEVER),
        "neither layer allows the db pod"
    );
    let counted = c.counters_in(WEB);
    assert_eq!(counted.new_connections, 1, "{counted:?}");
    assert!(counted.dropped_policy >= 3, "{counted:?}");
}

fn a_networkpolicy_default_deny_lets_the_node_in_and_no_other_pod(f: Family) {
    let v6 = f.is_v6();
    let mut c = cluster();
    // A NetworkPolicy selects both db pods for ingress and allows nothing; no security group.
    let deny = layered(vec![], vec![Np], vec![], vec![]);
    for db in [DB_BRIDGED, DB_ROUTED] {
        c.enforce(db, &deny);
    }
    let _l = [
        c.listen(DB_BRIDGED, v6, BOTH),
        c.listen(DB_ROUTED, v6, BOTH),
    ];
    for (db, how) in [(DB_BRIDGED, "bridged"), (DB_ROUTED, "routed")] {
        assert!(
            c.node_connects(db, v6, BOTH, ARRIVES),
            "{how}: the node reaches its pod (kubelet probes) whatever its NetworkPolicies"
        );
        assert!(
            !c.pod_connects(OTHER, db, v6, BOTH, NEVER),
            "{how}: another pod is refused"
        );
        let counted = c.counters_in(db);
        assert_eq!(counted.new_connections, 1, "{how}: {counted:?}");
        assert!(counted.dropped_policy >= 1, "{how}: {counted:?}");
        let from_host: Vec<bool> = kubesg_agent::conntrack::list(c.dp.maps())
            .expect("conntrack")
            .into_iter()
            .filter(|e| e.key.ifindex == c.node.pods[db].host_ifindex)
            .map(|e| e.from_host())
            .collect();
        assert_eq!(
            from_host,
            vec![true],
            "{how}: the node's connection, marked"
        );
    }
    // The routed pod and a bridged one reach each other only through the node's forwarding:
    // forwarded, not the node's own, so refused too.
    assert!(
        !c.pod_connects(DB_BRIDGED, DB_ROUTED, v6, BOTH, NEVER),
        "a pod routed through the node is not the node"
    );
}

fn a_security_groups_layer_gives_the_node_no_exemption(f: Family) {
    let v6 = f.is_v6();
    let mut c = cluster();
    // A security group selects db-bridged and allows nothing from the node: the node is refused.
    c.enforce(DB_BRIDGED, &layered(vec![], vec![Sg], vec![], vec![]));
    // Both layers on db-routed, the group allowing the node's link address, the NetworkPolicy
    // nothing: the node gets in (its NetworkPolicies requirement skipped, the group's met).
    let node_addr = if v6 {
        std::net::IpAddr::V6(ROUTED_GW_V6)
    } else {
        std::net::IpAddr::V4(ROUTED_GW_V4)
    };
    let sg_allows_node = layered(
        vec![of_layer(
            Sg,
            "shop/db ingress[0]",
            rule_with(Protocol::Tcp, vec![port(BOTH)], hosts(&[node_addr])),
        )],
        vec![Sg, Np],
        vec![],
        vec![],
    );
    c.enforce(DB_ROUTED, &sg_allows_node);
    let _l = [
        c.listen(DB_BRIDGED, v6, BOTH),
        c.listen(DB_ROUTED, v6, BOTH),
    ];
    assert!(
        !c.node_connects(DB_BRIDGED, v6, BOTH, NEVER),
        "the security group judges the node as any peer"
    );
    assert!(
        c.node_connects(DB_ROUTED, v6, BOTH, ARRIVES),
        "the group allows the node"
    );
    assert!(
        !c.pod_connects(OTHER, DB_ROUTED, v6, BOTH, NEVER),
        "another pod: the group refuses it"
    );
}
