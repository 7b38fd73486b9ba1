//! A SYN flood on real traffic against a small conntrack table (4 096 entries). A world-open
//! pod (the victim) gets four times the table in SYNs, spoofed from the node namespace (an
//! `AF_PACKET` socket on its host-side interface, so they pass its `to_pod` hook as SYNs from
//! the network would), while a client pod holds an idle connection to a server pod on the same
//! node. The attack is the one the issue names: with an LRU table the flood's entries evicted the
//! idle connection's, whose next segment was then INVALID and dropped. The defence is the
//! kernel's: nothing tracked is evicted; a NEW connection with no room is refused and counted
//! (`conntrack_full`); and the victim may hold only its share of the table (a quarter by
//! default), so the other pods can still open connections.

use std::net::TcpStream;

use kubesg_agent::{
    datapath::{Datapath, DatapathOptions},
    policy::Protocol,
};
use kubesg_common::Direction;
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    node::TestNode,
    packet::{self, TcpSegment},
    pods::{client_and_server, exchange, Who, ARRIVES},
    rules::{anywhere, egress, ingress, port, rule_with},
};

const TABLE: u32 = 4_096;
const FLOOD: usize = 4 * TABLE as usize;
const SYN: u8 = 0x02;

/// The client, the server and the victim on one node, each a member, the table `TABLE` entries
/// with `limit` per endpoint (`None`: the default share).
struct Flooded {
    /// Declared first: dropped, so detached, before the node goes.
    dp: Datapath,
    node: TestNode,
}

impl Flooded {
    fn new(limit: Option<u32>) -> Self {
        let mut node = client_and_server();
        node.add_pod(
            [192, 168, 1, 9].into(),
            "fd00:1::9".parse().expect("address"),
        )
        .expect("adding the victim");
        let mut dp = Datapath::load(&DatapathOptions {
            ct_entries: Some(TABLE),
            ct_endpoint_limit: limit,
            ..DatapathOptions::default()
        })
        .expect("loading the datapath");
        let client = egress(vec![rule_with(
            Protocol::Tcp,
            vec![port(23), port(24)],
            Who::Server.hosts(),
        )]);
        let server = ingress(vec![rule_with(
            Protocol::Tcp,
            vec![port(23), port(24)],
            Who::Client.hosts(),
        )]);
        let victim = ingress(vec![rule_with(Protocol::Tcp, vec![port(80)], anywhere())]);
        for (pod, policy) in node.pods.iter().zip([client, server, victim]) {
            let handle = dp.install_policy(&policy).expect("installing a policy");
            dp.set_endpoint(pod.host_ifindex, Some(handle))
                .expect("registering an endpoint");
        }
        node.ns.enter(|| {
            for pod in &node.pods {
                dp.attach(pod.host_ifindex).expect("attaching");
            }
        });
        Flooded { dp, node }
    }

    /// Opens a connection from the client to the server's `port` and proves it carries data.
    fn connect(&self, v6: bool, port: u16) -> std::io::Result<(TcpStream, TcpStream)> {
        let (client, server) = (&self.node.pods[0], &self.node.pods[1]);
        let listener = server.tcp_listen(v6, port)?;
        let mut c = client.tcp_connect(server.sockaddr(v6, port), ARRIVES)?;
        let (mut s, _) = listener.accept()?;
        exchange(&mut c, &mut s)?;
        Ok((c, s))
    }

    /// `FLOOD` SYNs to the victim's port 80 from spoofed sources, each a connection of its
    /// own; how many its `to_pod` hook dropped.
    fn flood(&self, v6: bool) -> usize {
        let victim = &self.node.pods[2];
        let mac = victim.ns.mac("eth0").expect("the victim's MAC");
        let frames: Vec<Vec<u8>> = (0..FLOOD)
            .map(|i| {
                let last = (i % 250) as u8 + 1;
                let src = if v6 {
                    format!("2001:db8::{last:x}").parse().expect("address")
                } else {
                    std::net::IpAddr::from([198, 18, 0, last])
                };
                let mut frame = packet::tcp_segment(
                    src,
                    victim.addr(v6),
                    10_000 + i as u16,
                    80,
                    TcpSegment {
                        bits: SYN,
                        seq: i as u32,
                        ..TcpSegment::default()
                    },
                );
                frame[..6].copy_from_slice(&mac);
                frame
            })
            .collect();
        self.node
            .ns
            .send_frames(&victim.host_ifname, &frames)
            .expect("flooding from the node")
    }

    fn counters(&self, pod: usize, dir: Direction) -> kubesg_common::event::Counters {
        self.dp
            .counters(self.node.pods[pod].host_ifindex)
            .expect("reading counters")
            .expect("a registered endpoint")[dir as usize]
    }

    fn held(&self, pod: usize) -> i64 {
        self.dp
            .conntrack_held(self.node.pods[pod].host_ifindex)
            .expect("reading CT_COUNTS")
            .expect("a registered endpoint")
    }

    fn entries(&self) -> usize {
        self.dp.maps().conntrack.keys().count()
    }
}

const CLIENT: usize = 0;
const VICTIM: usize = 2;

ipv4_and_ipv6!(
    a_flooded_pod_takes_only_its_share_and_the_others_keep_and_open_connections,
    a_flood_that_fills_the_table_evicts_no_idle_connection,
);

fn a_flooded_pod_takes_only_its_share_and_the_others_keep_and_open_connections(f: Family) {
    let v6 = f.is_v6();
    let pods = Flooded::new(None);
    let (mut c, mut s) = pods.connect(v6, 23).expect("the idle connection");
    let dropped = pods.flood(v6);
    let share = (TABLE / 4) as usize;
    let victim = pods.counters(VICTIM, Direction::Ingress);
    assert_eq!(
        (
            victim.new_connections as usize,
            victim.conntrack_full as usize
        ),
        (share, FLOOD - share),
        "the victim tracks its share, refuses and counts the rest"
    );
    assert_eq!(
        dropped,
        FLOOD - share,
        "the refused SYNs never reached the victim"
    );
    assert_eq!(pods.held(VICTIM), share as i64);
    // The idle connection carries data both ways, and the client opens another.
    exchange(&mut c, &mut s).expect("the idle connection after the flood");
    exchange(&mut s, &mut c).expect("its replies after the flood");
    let second = pods.connect(v6, 24);
    assert!(
        second.is_ok(),
        "a new connection after the flood: {second:?}"
    );
    assert_eq!(pods.counters(CLIENT, Direction::Egress).conntrack_full, 0);
    assert_eq!(
        pods.entries(),
        share + 4,
        "the victim's share and two connections"
    );
}

fn a_flood_that_fills_the_table_evicts_no_idle_connection(f: Family) {
    let v6 = f.is_v6();
    let pods = Flooded::new(Some(0));
    let (mut c, mut s) = pods.connect(v6, 23).expect("the idle connection");
    let dropped = pods.flood(v6);
    // Nothing was evicted for the flood: the idle connection carries data both ways.
    exchange(&mut c, &mut s).expect("the idle connection after the flood");
    exchange(&mut s, &mut c).expect("its replies after the flood");
    assert_eq!(pods.entries(), TABLE as usize, "the table is full");
    let victim = pods.counters(VICTIM, Direction::Ingress);
    let tracked = TABLE as usize - 2;
    assert_eq!(
        (
            victim.new_connections as usize,
            victim.conntrack_full as usize
        ),
        (tracked, FLOOD - tracked),
        "the victim tracks what fits, refuses and counts the rest"
    );
    assert_eq!(dropped, FLOOD - tracked);
    // A new connection finds no room: refused, and counted where it was refused.
    assert!(
        pods.connect(v6, 24).is_err(),
        "no room for a new connection"
    );
    assert!(pods.counters(CLIENT, Direction::Egress).conntrack_full >= 1);
}
