//! The real-traffic tests' fixture: a node with the seed's client pod and server pod on its
//! bridge, a private datapath attached to both, the traffic patterns every scenario drives (a TCP
//! exchange in both directions, data that must or must not get through, a close), and assertions
//! that print both endpoints' conntrack tables and counters when they fail.

use std::{
    fmt::Debug,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, TcpStream, UdpSocket},
    time::Duration,
};

use kubesg_agent::{
    conntrack::{self, Connection},
    datapath::{Datapath, DatapathOptions, PolicyHandle},
    policy::{CompiledPolicy, PeerBlock},
};
use kubesg_common::{conntrack::TcpState, event::Counters, proto, Direction};

use crate::{
    netns::{accept_within, is_timeout},
    node::{TestNode, TestPod},
    pins::PinDir,
    rules,
};

const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 5);
const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 7);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7);

/// How long to wait for what must arrive: generous for a veth on an idle machine.
pub const ARRIVES: Duration = Duration::from_secs(2);
/// How long to wait before concluding that something dropped will not arrive (TCP retransmits
/// its first SYN after 1 s, so a dropped connection is still dropped after this).
pub const NEVER: Duration = Duration::from_secs(1);

/// Which of the two pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// The pod that opens connections (192.168.1.5, fd00::5): the seed's client.
    Client,
    /// The pod that accepts them (192.168.1.7, fd00::7): the seed's server.
    Server,
}

impl Who {
    /// Its host blocks (/32, /128): the peer of the other pod's rules.
    pub fn hosts(self) -> Vec<PeerBlock> {
        let addrs: [IpAddr; 2] = match self {
            Who::Client => [CLIENT_V4.into(), CLIENT_V6.into()],
            Who::Server => [SERVER_V4.into(), SERVER_V6.into()],
        };
        rules::hosts(&addrs)
    }
}

/// A node with the client (`pods[0]`) and the server (`pods[1]`) on its bridge and nothing
/// attached: for tests that wire a datapath themselves (pinning) or none at all (the
/// kernel-conntrack side of a comparison); [`Pods`] stands on it.
pub fn client_and_server() -> TestNode {
    let mut node = TestNode::new().expect("creating the node");
    node.add_pod(CLIENT_V4, CLIENT_V6)
        .expect("adding the client");
    node.add_pod(SERVER_V4, SERVER_V6)
        .expect("adding the server");
    node
}

/// A client pod and a server pod on one node, both endpoints registered before the programs are
/// attached (so the first packet is judged), with a private datapath.
pub struct Pods {
    /// The datapath (declared first: dropped, so detached, before the node goes).
    pub dp: Datapath,
    /// Where the datapath is pinned, when it is (see [`Pods::pinned`]); removed after `dp`.
    pins: Option<PinDir>,
    /// The node with the two pods: `pods[0]` the client, `pods[1]` the server.
    pub node: TestNode,
    /// The client's policy, `None` for a non-member.
    client_policy: Option<PolicyHandle>,
    /// The server's policy, `None` for a non-member.
    server_policy: Option<PolicyHandle>,
}

impl Pods {
    /// The two pods, each a member with its policy or a non-member (`None`).
    pub fn new(client: Option<&CompiledPolicy>, server: Option<&CompiledPolicy>) -> Self {
        Pods::load(client, server, None)
    }

    /// Like [`Pods::new`], with the datapath pinned in a directory of its own as the agent pins
    /// it, so that `kubesg-agent --pin-dir` commands read it.
    pub fn pinned(client: Option<&CompiledPolicy>, server: Option<&CompiledPolicy>) -> Self {
        Pods::load(client, server, Some(PinDir::new()))
    }

    fn load(
        client: Option<&CompiledPolicy>,
        server: Option<&CompiledPolicy>,
        pins: Option<PinDir>,
    ) -> Self {
        let node = client_and_server();
        let opts = DatapathOptions {
            pin_dir: pins.as_ref().map(|p| p.path().to_path_buf()),
            ..DatapathOptions::default()
        };
        let mut dp = Datapath::load(&opts).expect("loading the datapath");
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
            pins,
            node,
            client_policy,
            server_policy,
        }
    }

    /// The pin directory of a [`Pods::pinned`] datapath.
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pins.as_ref().map(PinDir::path)
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

    /// `who`'s policy, `None` for a non-member.
    pub fn policy(&self, who: Who) -> Option<PolicyHandle> {
        match who {
            Who::Client => self.client_policy,
            Who::Server => self.server_policy,
        }
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

    /// `who`'s tracked connections of IP protocol `proto`.
    pub fn proto_entries(&self, who: Who, proto: u8) -> Vec<Connection> {
        self.entries(who)
            .into_iter()
            .filter(|c| c.key.proto == proto)
            .collect()
    }

    /// `who`'s tracked TCP connections to or from `port` on the peer or the pod.
    pub fn tcp_entries(&self, who: Who, port: u16) -> Vec<Connection> {
        self.proto_entries(who, proto::TCP)
            .into_iter()
            .filter(|c| c.key.peer_port == port || c.key.pod_port == port)
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

    /// Asserts `left == right`, with `what` and the table in the failure message.
    #[track_caller]
    pub fn assert_eq<T: PartialEq + Debug>(&self, left: T, right: T, what: &str) {
        assert_eq!(left, right, "{what}\n{}", self.dump());
    }

    /// Asserts `cond`, with `what` and the table in the failure message.
    #[track_caller]
    pub fn assert(&self, cond: bool, what: &str) {
        assert!(cond, "{what}\n{}", self.dump());
    }

    /// Asserts that neither pod dropped anything, by policy or as INVALID: the traffic was
    /// allowed all the way.
    #[track_caller]
    pub fn assert_nothing_dropped(&self) {
        for who in [Who::Client, Who::Server] {
            let [out, inc] = self.counters(who);
            self.assert_eq(
                out.dropped_invalid + inc.dropped_invalid + out.dropped_policy + inc.dropped_policy,
                0,
                &format!("{who:?} dropped"),
            );
        }
    }

    /// A UDP socket on the server's `port` and one on the client (ephemeral port), both giving
    /// up reads after `read_timeout`: (client, server).
    pub fn udp_sockets(
        &self,
        v6: bool,
        port: u16,
        read_timeout: Duration,
    ) -> (UdpSocket, UdpSocket) {
        let server = self
            .server()
            .udp_bind(v6, port, read_timeout)
            .expect("server socket");
        let client = self
            .client()
            .udp_bind(v6, 0, read_timeout)
            .expect("client socket");
        (client, server)
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

    /// Whether the connection `(c, s)` still carries data from the client to the server after
    /// `who`'s rules changed to `policy`; when it does, asserts that replies flow too and that
    /// `who`'s entry is ESTABLISHED and now carries `policy`.
    pub fn still_carries(
        &self,
        (c, s): (&mut TcpStream, &mut TcpStream),
        who: Who,
        port: u16,
        policy: PolicyHandle,
    ) -> bool {
        let flows = data_gets_through(c, s);
        if flows {
            self.assert(data_gets_through(s, c), "replies flow");
            let e = self.tcp_entries(who, port);
            self.assert_eq(e.len(), 1, "one entry");
            self.assert_eq(e[0].tcp_state(), Some(TcpState::Established), "established");
            self.assert_eq(e[0].entry.policy_id, policy.id, "judged by the new rules");
        }
        flows
    }

    /// Asserts that `who`'s rules cut the connection on `port`: `who` dropped it by policy (the
    /// client's egress rules judge what it sends, the server's ingress rules what it receives)
    /// and its entry is gone.
    #[track_caller]
    pub fn assert_cut(&self, who: Who, port: u16) {
        let judged = match who {
            Who::Client => Direction::Egress,
            Who::Server => Direction::Ingress,
        };
        self.assert(
            self.counters(who)[judged as usize].dropped_policy >= 1,
            &format!("{who:?} dropped it by policy"),
        );
        self.assert(self.tcp_entries(who, port).is_empty(), "the entry is gone");
    }

    /// Asserts that a connect attempt was dropped (no answer at all), not refused or accepted.
    #[track_caller]
    pub fn assert_dropped<T: Debug>(&self, r: io::Result<T>, what: &str) {
        match r {
            Err(e) if is_timeout(&e) => {}
            other => panic!("{what}: expected no answer, got {other:?}\n{}", self.dump()),
        }
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

/// Closes a connection from `first`'s side: `first` sends its FIN, `second` reads to the end and
/// closes, `first` reads the second FIN. Both sockets are gone afterwards; the flow ends in
/// TIME_WAIT for conntrack (`first` closed first).
pub fn close_from(mut first: TcpStream, mut second: TcpStream) {
    first
        .shutdown(Shutdown::Write)
        .expect("closing the first side");
    let mut rest = Vec::new();
    second
        .read_to_end(&mut rest)
        .expect("the second side sees the FIN");
    drop(second);
    first
        .read_to_end(&mut rest)
        .expect("the first side sees the FIN");
}

/// Whether `from` can still send data that `to` reads within [`NEVER`].
fn data_gets_through(from: &mut TcpStream, to: &mut TcpStream) -> bool {
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
