//! The end-to-end fixture every test file shares: a node (network namespace with the pod
//! network's bridge), the test operator serving mTLS inside it, the agent as a real process
//! following it, and pods attached through the real CNI chain; the operator's updates as the
//! tests write them; and traffic assertions that print the agent's view when they fail.
// Each test crate includes this file and uses part of it.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{IpAddr, Ipv6Addr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

use kubesg_proto::v1alpha1 as pb;
use kubesg_testkit::{
    agent::{AgentConfig, AgentProcess, Startup},
    certs::{CertFiles, TempPki},
    cni::{pod_v4, pod_v6, CniError, CniNode, CniPod, NetworkList},
    netns::{accept_within, is_timeout, Netns},
    operator::{server_tls_config, TestOperator},
};
use serde_json::Value;

/// How long to wait for what must arrive.
pub const ARRIVES: Duration = Duration::from_secs(3);
/// How long to wait before concluding that a dropped SYN will not be answered (TCP retransmits
/// its first SYN after 1 s).
pub const NEVER: Duration = Duration::from_secs(1);
/// How long to wait for the operator to see a Hello or an ack.
pub const OPERATOR_PATIENCE: Duration = Duration::from_secs(15);
/// The node's name, as the agent tells the operator.
pub const NODE: &str = "node-a";
/// The namespace of every test pod.
pub const NAMESPACE: &str = "shop";

/// A node with the test operator and the agent, and the pod network chained to the agent.
/// Fields drop in order: the agent is killed first, the node namespace goes last.
pub struct Cluster {
    /// The agent process (in the node namespace).
    pub agent: AgentProcess,
    /// The test operator, serving on 127.0.0.1 inside the node namespace.
    pub operator: TestOperator,
    /// The runtime the operator's server runs on.
    pub rt: tokio::runtime::Runtime,
    /// `bridge` + `host-local`, then `kubesg-cni` (cniVersion 1.0.0).
    pub network: NetworkList,
    /// The certificates of both sides.
    pub pki: TempPki,
    /// The node and its CNI runtime.
    pub node: CniNode,
    /// The listeners `assert_opens` and `assert_dropped` made, by (pod namespace, family,
    /// port), kept for the test's life. A closed listener's port cannot always be bound again at once:
    /// another test thread that forks a plugin or `ip` process holds a copy of every open
    /// descriptor until its child execs, the listener's included, and a new bind then fails with
    /// "address in use" (a flake seen in CI under load).
    listeners: Mutex<HashMap<(String, bool, u16), Arc<TcpListener>>>,
}

impl Cluster {
    /// A node whose agent runs with `startup`, trusting the operator's CA and presenting a
    /// client certificate from it; `configure` may change the agent's command line (TLS files,
    /// wait timeout) before it starts. Does not wait for the agent's Hello.
    pub fn start(startup: Startup, configure: impl FnOnce(&TempPki, &mut AgentConfig)) -> Self {
        Cluster::start_serving(startup, |pki| pki.operator.clone(), configure)
    }

    /// Like [`Cluster::start`], the operator presenting the certificate `server` picks.
    pub fn start_serving(
        startup: Startup,
        server: impl FnOnce(&TempPki) -> CertFiles,
        configure: impl FnOnce(&TempPki, &mut AgentConfig),
    ) -> Self {
        let node = CniNode::new().expect("creating the node");
        let pki = TempPki::generate().expect("generating the PKI");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let server = server(&pki);
        let operator = start_operator_in(&node, &rt, &pki, &server);
        let mut config = AgentConfig::new(NODE, startup)
            .with_operator(operator.url(), pki.agent_tls_for(NODE).unwrap());
        configure(&pki, &mut config);
        let agent = AgentProcess::start(node.name(), config).expect("starting kubesg-agent");
        let network = node.pod_network(&agent.socket(), 10);
        Cluster {
            agent,
            operator,
            rt,
            network,
            pki,
            node,
            listeners: Mutex::default(),
        }
    }

    /// Like [`Cluster::start`] with the agent's defaults, then waits for its Hello.
    pub fn connected(startup: Startup) -> Self {
        let cluster = Cluster::start(startup, |_, _| {});
        let hello = cluster.hello();
        assert_eq!(hello.node, NODE);
        cluster
    }

    /// The next Hello the operator receives; fails with the agent's log when none comes.
    pub fn hello(&self) -> pb::Hello {
        self.rt
            .block_on(self.operator.next_hello(OPERATOR_PATIENCE))
            .unwrap_or_else(|| panic!("no Hello from the agent\n{}", self.agent.log()))
    }

    /// Pushes `update` and waits for its ack, which must say applied.
    pub fn push(&self, update: pb::PolicyUpdate) -> pb::Ack {
        let version = update.version;
        let ack = self.push_for_answer(update);
        assert!(ack.applied, "version {version} NACKed: {}", ack.reason);
        ack
    }

    /// Pushes `update` and returns the agent's answer to it, ACK or NACK.
    pub fn push_for_answer(&self, update: pb::PolicyUpdate) -> pb::Ack {
        let version = update.version;
        self.operator
            .push(update)
            .unwrap_or_else(|e| panic!("pushing version {version}: {e}\n{}", self.agent.log()));
        let ack = self
            .rt
            .block_on(self.operator.next_ack(OPERATOR_PATIENCE))
            .unwrap_or_else(|| panic!("no ack for version {version}\n{}", self.agent.log()));
        assert_eq!(ack.version, version, "{ack:?}");
        ack
    }

    /// The version the agent last applied, as `kubesg-agent endpoints` reports it.
    pub fn applied_version(&self) -> u64 {
        let table = self.agent.cli_ok(&["endpoints"]).expect("endpoints");
        table
            .lines()
            .find_map(|l| l.strip_prefix("applied version: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no applied version in:\n{table}"))
    }

    /// A pod sandbox `NAMESPACE/name` asking for 10.77.0.`host` and fd77::`host`.
    pub fn pod(&self, name: &str, host: u8) -> CniPod {
        CniPod::new(NAMESPACE, name, pod_v4(host), pod_v6(host)).expect("pod netns")
    }

    /// Attaches `pod` through the loopback network and the pod network; the pod network's
    /// result.
    pub fn try_add(&self, pod: &CniPod) -> Result<Value, CniError> {
        self.node.add(&self.network, pod)
    }

    /// A pod attached through the chain; fails with the agent's log when the ADD fails.
    pub fn add_pod(&self, name: &str, host: u8) -> CniPod {
        let pod = self.pod(name, host);
        if let Err(e) = self.try_add(&pod) {
            panic!("ADD of {name}: {e}\n{}", self.dump());
        }
        pod
    }

    /// The host-side interface index of an attached pod (from its cached result).
    pub fn host_ifindex(&self, pod: &CniPod) -> u32 {
        let result = self
            .node
            .runtime
            .cached_result(&self.network, &pod.attachment)
            .expect("the pod was added");
        self.node.host_veth(&result).expect("host veth").1
    }

    /// Asserts that the agent has nothing of `container_id` (and of host interface `ifindex`):
    /// not among its endpoints, no record, no datapath entry, no attached programs.
    #[track_caller]
    pub fn assert_nothing_registered(&self, container_id: &str, ifindex: Option<u32>, what: &str) {
        let agent = &self.agent;
        assert!(
            !agent.knows_container(container_id).expect("ListEndpoints"),
            "{what}: the agent lists the endpoint\n{}",
            self.dump()
        );
        assert_eq!(
            agent.record_files(container_id).expect("state dir"),
            Vec::<std::path::PathBuf>::new(),
            "{what}: a record file was left"
        );
        if let Some(ifindex) = ifindex {
            assert!(
                !agent.datapath_has_endpoint(ifindex).expect("maps"),
                "{what}: the datapath has an endpoint on {ifindex}"
            );
            assert!(
                agent.pinned_links(ifindex).expect("links").is_empty(),
                "{what}: programs are attached to {ifindex}"
            );
        }
    }

    /// What the agent knows, for failure messages: `kubesg-agent endpoints`, `ct list -w`, its
    /// log.
    pub fn dump(&self) -> String {
        let cli = |args: &[&str]| {
            self.agent
                .cli(args)
                .map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_else(|e| e.to_string())
        };
        format!(
            "--- kubesg-agent endpoints\n{}--- kubesg-agent ct list -w\n{}--- agent log\n{}",
            cli(&["endpoints"]),
            cli(&["ct", "list", "-w"]),
            self.agent.log()
        )
    }

    /// `pod`'s listener on `port` of the family, made on first use and kept (see `listeners`).
    fn listener(&self, pod: &CniPod, v6: bool, port: u16) -> Arc<TcpListener> {
        let mut all = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        all.entry((pod.ns.name().to_string(), v6, port))
            .or_insert_with(|| Arc::new(pod.tcp_listen(v6, port).expect("listening")))
            .clone()
    }

    /// Asserts that a NEW TCP connection from `from` to `to`:`port` opens and carries data both
    /// ways; returns (client side, server side).
    #[track_caller]
    pub fn assert_opens(
        &self,
        from: &CniPod,
        to: &CniPod,
        v6: bool,
        port: u16,
    ) -> (TcpStream, TcpStream) {
        let listener = self.listener(to, v6, port);
        let mut c = from
            .tcp_connect(to.sockaddr(v6, port), ARRIVES)
            .unwrap_or_else(|e| {
                panic!(
                    "{} -> {}:{port} should open: {e}\n{}",
                    from.name,
                    to.addr(v6),
                    self.dump()
                )
            });
        let mut s = accept_within(&listener, ARRIVES).expect("accepting");
        exchange(&mut c, &mut s).unwrap_or_else(|e| {
            panic!(
                "{} <-> {}:{port} should carry data both ways: {e}\n{}",
                from.name,
                to.addr(v6),
                self.dump()
            )
        });
        (c, s)
    }

    /// Asserts that a NEW TCP connection from `from` to `to`:`port` gets no answer at all
    /// although `to` listens there: kubesg dropped the SYN.
    #[track_caller]
    pub fn assert_dropped(&self, from: &CniPod, to: &CniPod, v6: bool, port: u16) {
        let listener = self.listener(to, v6, port);
        match from.tcp_connect(to.sockaddr(v6, port), NEVER) {
            Err(e) if is_timeout(&e) => {}
            other => panic!(
                "{} -> {}:{port} should be dropped, got {other:?}\n{}",
                from.name,
                to.addr(v6),
                self.dump()
            ),
        }
        assert!(
            accept_within(&listener, Duration::from_millis(10)).is_err(),
            "{} -> {}:{port} reached the listener",
            from.name,
            to.addr(v6)
        );
    }
}

/// Starts the test operator inside the node's namespace (where the agent can reach
/// 127.0.0.1: its listening socket is created on a thread in that namespace), presenting
/// `server` and accepting clients of the PKI's CA only.
pub fn start_operator_in(
    node: &CniNode,
    rt: &tokio::runtime::Runtime,
    pki: &TempPki,
    server: &CertFiles,
) -> TestOperator {
    let tls = server_tls_config(&pki.operator_tls(server)).expect("operator TLS");
    node.ns
        .enter(|| rt.block_on(TestOperator::start(tls)))
        .expect("starting the test operator")
}

/// Sends `ping` from `a` to `b` and `pong` back.
pub fn exchange(a: &mut TcpStream, b: &mut TcpStream) -> io::Result<()> {
    a.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf)?;
    if &buf != b"ping" {
        return Err(io::Error::other(format!("got {buf:?}")));
    }
    b.write_all(b"pong")?;
    a.read_exact(&mut buf)?;
    if &buf != b"pong" {
        return Err(io::Error::other(format!("got {buf:?}")));
    }
    Ok(())
}

/// Whether `from` can still send data that `to` reads within [`NEVER`].
pub fn data_gets_through(from: &mut TcpStream, to: &mut TcpStream) -> bool {
    from.write_all(b"more")
        .expect("writing into the socket buffer");
    to.set_read_timeout(Some(NEVER)).expect("setting a timeout");
    let mut buf = [0u8; 4];
    match to.read_exact(&mut buf) {
        Ok(()) => buf == *b"more",
        Err(e) if is_timeout(&e) => false,
        Err(e) => panic!("reading: {e}"),
    }
}

/// The host blocks (/32 and /128) of `pods`: rule peers that are exactly these pods.
pub fn hosts(pods: &[&CniPod]) -> Vec<pb::PeerBlock> {
    pods.iter()
        .flat_map(|p| [(p.addr(false), 32), (p.addr(true), 128)])
        .map(|(ip, len): (IpAddr, u8)| pb::PeerBlock {
            cidr: format!("{ip}/{len}"),
            except: vec![],
        })
        .collect()
}

/// Every address of both families.
pub fn anywhere() -> Vec<pb::PeerBlock> {
    ["0.0.0.0/0", "::/0"]
        .into_iter()
        .map(|c| pb::PeerBlock {
            cidr: c.into(),
            except: vec![],
        })
        .collect()
}

fn ports_of(ports: &[u16]) -> Vec<pb::PortMatch> {
    ports
        .iter()
        .map(|p| pb::PortMatch {
            kind: Some(pb::port_match::Kind::Range(pb::PortRange {
                first: u32::from(*p),
                last: u32::from(*p),
            })),
        })
        .collect()
}

/// A rule allowing TCP to `ports` with `peers`.
pub fn tcp(ports: &[u16], peers: Vec<pb::PeerBlock>) -> pb::Rule {
    pb::Rule {
        protocol: pb::Protocol::Tcp as i32,
        ports: ports_of(ports),
        peers,
        origin: format!("tcp {ports:?}"),
        ..pb::Rule::default()
    }
}

/// A rule allowing UDP to `ports` with `peers`.
pub fn udp(ports: &[u16], peers: Vec<pb::PeerBlock>) -> pb::Rule {
    pb::Rule {
        protocol: pb::Protocol::Udp as i32,
        ports: ports_of(ports),
        peers,
        origin: format!("udp {ports:?}"),
        ..pb::Rule::default()
    }
}

/// A rule allowing every protocol with `peers`.
pub fn any(peers: Vec<pb::PeerBlock>) -> pb::Rule {
    pb::Rule {
        protocol: pb::Protocol::Any as i32,
        peers,
        origin: "any".into(),
        ..pb::Rule::default()
    }
}

/// A compiled policy.
pub fn policy(id: &str, ingress: Vec<pb::Rule>, egress: Vec<pb::Rule>) -> pb::Policy {
    pb::Policy {
        id: id.into(),
        ingress,
        egress,
        ..pb::Policy::default()
    }
}

/// A snapshot at `version` with `policies` and `pods` (each with its policy id, `None`: in no
/// group); no datapath settings, so the agent's defaults (re-check) hold.
pub fn snapshot(
    version: u64,
    policies: Vec<pb::Policy>,
    pods: &[(&CniPod, Option<&str>)],
) -> pb::PolicyUpdate {
    pb::PolicyUpdate {
        version,
        snapshot: true,
        upsert_policies: policies,
        upsert_pods: pods
            .iter()
            .map(|(pod, policy)| pb::PodPolicy {
                pod: Some(pod.pod_ref()),
                policy_id: policy.unwrap_or_default().to_owned(),
            })
            .collect(),
        ..pb::PolicyUpdate::default()
    }
}

/// The link-local address of `eth0` in `ns`: kubesg-cni registers it with the pod's addresses.
pub fn link_local(ns: &Netns) -> Ipv6Addr {
    let out = ns
        .ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"])
        .expect("ip addr show");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address on eth0 in {}: {text}", ns.name()))
}
