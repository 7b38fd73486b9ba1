//! A local "cluster" for the end-to-end tests and the demo: nodes as network namespaces, the real
//! `kubesg-operator` in manifests mode, one real `kubesg-agent` per node, and pods attached
//! through the real CNI chain, described to the operator by manifests this fixture writes.
//!
//! - **Nodes**: one or two [`CniNode`]s, each with its own pod subnets (node `n`, from 1:
//!   `10.77.n.0/24` and `fd77:0:0:n::/64`) behind the bridge + host-local pod network with
//!   `kubesg-cni` chained last. Two nodes are joined by a veth "underlay" (`192.168.77.n`,
//!   `fdff::n`) with routes to each other's pod subnets, so pods on different nodes talk through
//!   both nodes' datapaths, as in a cluster with a routed pod network.
//! - **The operator** runs inside node 1's namespace, listening on `0.0.0.0`; node 1's agent
//!   dials `127.0.0.1`, node 2's dials node 1's underlay address. Agents check the operator's
//!   certificate for its service name, not the address. The PKI is a [`TempPki`].
//! - **Agents**: `kubesg-agent run` per node inside its namespace ([`AgentProcess`]), each with
//!   its own pin directory under `/sys/fs/bpf`, state directory and socket.
//! - **Pods**: [`LocalCluster::add_pod`] runs the CNI chain (loopback, then bridge + host-local
//!   and kubesg-cni, with the `K8S_POD_*` args), starts echo servers on the pod's ports and
//!   writes its Pod manifest (uid, labels, `spec.nodeName`, container ports with their names,
//!   `status.podIPs` from the CNI result), as the kubelet would report it.
//! - **SecurityGroups** are written, edited and deleted by the caller
//!   ([`LocalCluster::apply_group`], [`LocalCluster::delete_group`]); this fixture keeps their
//!   `metadata.generation` (a manifest has no API server to bump it), so a status can be
//!   matched to the edit it reflects.
//!
//! Two waits say when the cluster has caught up with the manifests:
//! [`LocalCluster::wait_programmed`] reads a group's status file (what `kubectl get sg` would
//! show), and [`LocalCluster::wait_synced`] checks that every agent has applied exactly the
//! plan the current manifests compile to (each pod on the node, its uid and its policy id, which
//! is derived from the policy's content). The latter is what a probe must wait for: a group's
//! `Programmed` does not move when a pod's labels change.
//!
//! Connectivity is checked by real traffic ([`LocalCluster::matrix`]) against the reference
//! evaluation of the manifests ([`kubesg_operator::reference`]).
//!
//! Dropping it removes everything, in order: pods (echo servers stopped, namespaces deleted),
//! agents (killed, pin directories removed), the operator (killed), nodes (namespaces deleted),
//! then the directories.

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use kubesg_agent::inspect::load_state;
use kubesg_operator::{
    compile::compile,
    crd::SecurityGroupStatus,
    manifests::ManifestDir,
    model::{Cluster, ObjectKey},
    reference::{self, Connection},
    status_files::{read_status, status_path},
};
use serde_json::{json, Value};

use crate::{
    agent::{AgentConfig, AgentProcess, Startup},
    certs::TempPki,
    cni::{CniNode, CniPod, NetworkList},
    matrix::{Cell, Matrix, Target},
    netns::Netns,
    operator_process::{OperatorConfig, OperatorProcess},
    probe::{self, Probe, Responder, Verdict},
};

/// How long the waits wait for the cluster to catch up.
const PATIENCE: Duration = Duration::from_secs(30);
/// The port agents dial on the operator.
const OPERATOR_PORT: u16 = 9443;

/// The IP protocol of a container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A container port: what the pod's echo servers listen on and its manifest declares (a named
/// one is what a SecurityGroup's named port resolves to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    /// `name`, if any.
    pub name: Option<String>,
    /// `containerPort`.
    pub port: u16,
    /// `protocol`.
    pub transport: Transport,
}

/// A pod to add: its name, node (index from 0), labels and container ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's name (in the cluster's namespace).
    pub name: String,
    /// The node's index in the cluster (0: node 1).
    pub node: usize,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Container ports.
    pub ports: Vec<ContainerPort>,
}

impl PodSpec {
    /// A pod `name` on node `node` (from 0), no labels, no ports.
    pub fn new(name: &str, node: usize) -> PodSpec {
        PodSpec {
            name: name.to_owned(),
            node,
            labels: BTreeMap::new(),
            ports: Vec::new(),
        }
    }

    /// With label `key`=`value`.
    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// With a TCP port, named when `name` is not empty.
    pub fn tcp(self, name: &str, port: u16) -> PodSpec {
        self.port(name, port, Transport::Tcp)
    }

    /// With a UDP port, named when `name` is not empty.
    pub fn udp(self, name: &str, port: u16) -> PodSpec {
        self.port(name, port, Transport::Udp)
    }

    fn port(mut self, name: &str, port: u16, transport: Transport) -> PodSpec {
        self.ports.push(ContainerPort {
            name: (!name.is_empty()).then(|| name.to_owned()),
            port,
            transport,
        });
        self
    }
}

/// A pod of the cluster. Its echo servers stop before its namespace is deleted.
#[derive(Debug)]
pub struct ClusterPod {
    _responder: Responder,
    /// The sandbox: namespace, attachment, identity.
    pub cni: CniPod,
    /// Its node's index.
    pub node: usize,
    /// Its host-side interface index in the node's namespace.
    pub host_ifindex: u32,
    /// Its addresses, as the CNI result gave them.
    pub ips: Vec<IpAddr>,
    /// Its labels (as its manifest says now).
    pub labels: BTreeMap<String, String>,
    /// Its container ports.
    pub ports: Vec<ContainerPort>,
}

impl ClusterPod {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.cni.name
    }

    /// Its namespace (network namespace, not Kubernetes').
    pub fn ns(&self) -> &Netns {
        &self.cni.ns
    }

    /// Its address of the family (`v6`).
    pub fn addr(&self, v6: bool) -> IpAddr {
        self.ips
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == v6)
            .unwrap_or_else(|| self.cni.addr(v6))
    }
}

/// How the cluster runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// 1 or 2 nodes.
    pub nodes: usize,
    /// The Kubernetes namespace of the pods (and of groups that name none).
    pub namespace: String,
    /// The operator's `--recheck-on-policy-change`.
    pub recheck_on_policy_change: bool,
    /// The agents' `--startup-policy`.
    pub startup: Startup,
}

impl Default for ClusterConfig {
    /// Two nodes, namespace `shop`, re-check on (the default), startup policy `deny`.
    fn default() -> Self {
        ClusterConfig {
            nodes: 2,
            namespace: "shop".into(),
            recheck_on_policy_change: true,
            startup: Startup::Deny,
        }
    }
}

/// A node: its name, CNI runtime and pod network.
#[derive(Debug)]
struct Node {
    name: String,
    network: NetworkList,
    next_host: u8,
    cni: CniNode,
}

/// The local cluster. Fields drop in order: pods, agents, operator, nodes, directories.
pub struct LocalCluster {
    pods: Vec<ClusterPod>,
    agents: Vec<AgentProcess>,
    operator: OperatorProcess,
    nodes: Vec<Node>,
    manifests: tempfile::TempDir,
    status: tempfile::TempDir,
    pki: TempPki,
    config: ClusterConfig,
    /// Last applied spec and generation of each group.
    groups: BTreeMap<String, (Value, i64)>,
    cancel: Option<Arc<AtomicBool>>,
}

/// The name of node `i` (from 0).
pub fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

fn underlay_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, (i + 1) as u8)
}

fn underlay_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfdff, 0, 0, 0, 0, 0, 0, (i + 1) as u16)
}

fn subnet_v4(i: usize) -> String {
    format!("10.77.{}.0/24", i + 1)
}

fn subnet_v6(i: usize) -> String {
    format!("fd77:0:0:{:x}::/64", i + 1)
}

fn pod_v4(node: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, (node + 1) as u8, host)
}

fn pod_v6(node: usize, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, (node + 1) as u16, 0, 0, 0, u16::from(host))
}

/// Writes `contents` to `path` atomically (a hidden file beside it, then a rename), so the
/// operator never reads half a manifest (it skips hidden files).
fn write_atomically(path: &Path, contents: &str) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)
}

fn yaml(value: &Value) -> io::Result<String> {
    serde_yaml::to_string(value).map_err(io::Error::other)
}

/// A SecurityGroup or NetworkPolicy manifest rendered for the manifests directory and not yet
/// written ([`LocalCluster::stage_group`]).
#[derive(Debug)]
pub struct StagedGroup {
    name: String,
    path: PathBuf,
    contents: String,
    spec: Value,
    generation: i64,
    unchanged: bool,
}

impl StagedGroup {
    /// The name the fixture will know it by (see [`LocalCluster::apply_group`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the manifest in place already has this spec: writing it would change nothing
    /// but its file (the operator reads it again and finds nothing new).
    pub fn unchanged(&self) -> bool {
        self.unchanged
    }
}

impl LocalCluster {
    /// Creates the nodes, the PKI, the operator and the agents; no pods, no groups yet.
    pub fn start(config: ClusterConfig) -> io::Result<LocalCluster> {
        if !(1..=2).contains(&config.nodes) {
            return Err(io::Error::other("a local cluster has 1 or 2 nodes"));
        }
        let mut cnis = Vec::new();
        for i in 0..config.nodes {
            let cni = CniNode::with_subnets(&subnet_v4(i), &subnet_v6(i))?;
            // The node routes between its pods, the underlay and the other node's pods; the
            // bridge's gateway addresses must be usable at once (no duplicate address
            // detection holding them tentative while the first pods start).
            cni.ns.exec_ok(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    &format!("net.ipv6.conf.{}.accept_dad=0", crate::cni::BRIDGE),
                ],
            )?;
            cnis.push(cni);
        }
        if let [a, b] = &cnis[..] {
            connect_underlay(&a.ns, &b.ns)?;
        }
        let pki = TempPki::generate()?;
        let manifests = tempfile::Builder::new()
            .prefix("kubesg-manifests-")
            .tempdir()?;
        let status = tempfile::Builder::new()
            .prefix("kubesg-status-")
            .tempdir()?;
        for sub in ["pods", "groups"] {
            fs::create_dir(manifests.path().join(sub))?;
        }
        let mut cluster_objects = vec![json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": config.namespace,
                "labels": {"kubernetes.io/metadata.name": config.namespace},
            },
        })];
        cluster_objects.extend((0..cnis.len()).map(
            |i| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_name(i)}}),
        ));
        write_atomically(
            &manifests.path().join("cluster.yaml"),
            &yaml(&json!({"apiVersion": "v1", "kind": "List", "items": cluster_objects}))?,
        )?;
        let operator = OperatorProcess::start(
            cnis[0].name(),
            OperatorConfig {
                manifests: manifests.path().to_owned(),
                status_dir: status.path().to_owned(),
                listen: (Ipv4Addr::UNSPECIFIED, OPERATOR_PORT).into(),
                metrics: (Ipv4Addr::LOCALHOST, 9966).into(),
                tls: pki.operator_tls(&pki.operator),
                recheck_on_policy_change: config.recheck_on_policy_change,
            },
        )?;
        let mut agents = Vec::new();
        let mut nodes = Vec::new();
        for (i, cni) in cnis.into_iter().enumerate() {
            let operator_ip = if i == 0 {
                Ipv4Addr::LOCALHOST
            } else {
                underlay_v4(0)
            };
            let address = format!("https://{operator_ip}:{OPERATOR_PORT}");
            let agent = AgentProcess::start(
                cni.name(),
                AgentConfig::new(&node_name(i), config.startup)
                    .with_operator(address, pki.agent_tls_for(&node_name(i))?),
            )?;
            nodes.push(Node {
                name: node_name(i),
                network: cni.pod_network(&agent.socket(), 10),
                next_host: 10,
                cni,
            });
            agents.push(agent);
        }
        Ok(LocalCluster {
            pods: Vec::new(),
            agents,
            operator,
            nodes,
            manifests,
            status,
            pki,
            config,
            groups: BTreeMap::new(),
            cancel: None,
        })
    }

    /// Makes every wait give up with `ErrorKind::Interrupted` once `flag` is set (the demo's
    /// Ctrl-C: the caller then unwinds and dropping the cluster cleans up).
    pub fn set_cancel(&mut self, flag: Arc<AtomicBool>) {
        self.cancel = Some(flag);
    }

    fn check_cancel(&self) -> io::Result<()> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
        {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
        Ok(())
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The manifests directory the operator reads.
    pub fn manifests_dir(&self) -> &Path {
        self.manifests.path()
    }

    /// The directory the operator writes group statuses into.
    pub fn status_dir(&self) -> &Path {
        self.status.path()
    }

    /// The PKI of the operator and the agents.
    pub fn pki(&self) -> &TempPki {
        &self.pki
    }

    /// The number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The name of node `i`'s network namespace.
    pub fn node_netns(&self, i: usize) -> &str {
        self.nodes[i].cni.name()
    }

    /// Node `i`'s agent.
    pub fn agent(&self, i: usize) -> &AgentProcess {
        &self.agents[i]
    }

    /// Node `i`'s agent, to stop and start it.
    pub fn agent_mut(&mut self, i: usize) -> &mut AgentProcess {
        &mut self.agents[i]
    }

    /// The operator (to stop and start it, too: it needs no exclusive access).
    pub fn operator(&self) -> &OperatorProcess {
        &self.operator
    }

    /// The pods, in the order they were added.
    pub fn pods(&self) -> &[ClusterPod] {
        &self.pods
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> io::Result<&ClusterPod> {
        self.pods
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| io::Error::other(format!("no pod {name}")))
    }

    /// Adds a pod through the CNI chain on its node, starts its echo servers and writes its
    /// manifest.
    pub fn add_pod(&mut self, spec: PodSpec) -> io::Result<&ClusterPod> {
        self.check_cancel()?;
        if self.pods.iter().any(|p| p.name() == spec.name) {
            return Err(io::Error::other(format!("pod {} exists", spec.name)));
        }
        let node = self
            .nodes
            .get_mut(spec.node)
            .ok_or_else(|| io::Error::other(format!("no node {}", spec.node)))?;
        let host = node.next_host;
        node.next_host = host
            .checked_add(1)
            .ok_or_else(|| io::Error::other("node full"))?;
        let cni = CniPod::new(
            &self.config.namespace,
            &spec.name,
            pod_v4(spec.node, host),
            pod_v6(spec.node, host),
        )?;
        let result = node
            .cni
            .add(&node.network, &cni)
            .map_err(|e| io::Error::other(format!("CNI ADD of {}: {e}", spec.name)))?;
        let (_, host_ifindex) = node.cni.host_veth(&result)?;
        let ips: Vec<IpAddr> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect();
        if ips.is_empty() {
            return Err(io::Error::other(format!("no address in {result}")));
        }
        let ports_of = |t: Transport| -> Vec<u16> {
            spec.ports
                .iter()
                .filter(|p| p.transport == t)
                .map(|p| p.port)
                .collect()
        };
        let responder = Responder::start(
            &cni.ns,
            &ports_of(Transport::Tcp),
            &ports_of(Transport::Udp),
        )?;
        let pod = ClusterPod {
            _responder: responder,
            cni,
            node: spec.node,
            host_ifindex,
            ips,
            labels: spec.labels,
            ports: spec.ports,
        };
        self.write_pod(&pod)?;
        self.pods.push(pod);
        Ok(&self.pods[self.pods.len() - 1])
    }

    fn pod_path(&self, name: &str) -> PathBuf {
        self.manifests
            .path()
            .join("pods")
            .join(format!("{name}.yaml"))
    }

    /// Writes the pod's manifest as the API would hold it once the pod runs.
    fn write_pod(&self, pod: &ClusterPod) -> io::Result<()> {
        let ports: Vec<Value> = pod
            .ports
            .iter()
            .map(|p| {
                let mut port = json!({
                    "containerPort": p.port,
                    "protocol": match p.transport {
                        Transport::Tcp => "TCP",
                        Transport::Udp => "UDP",
                    },
                });
                if let Some(name) = &p.name {
                    port["name"] = json!(name);
                }
                port
            })
            .collect();
        let manifest = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name(),
                "namespace": self.config.namespace,
                "uid": pod.cni.uid,
                "labels": pod.labels,
            },
            "spec": {
                "nodeName": self.nodes[pod.node].name,
                "containers": [{"name": "main", "image": "registry.invalid/echo", "ports": ports}],
            },
            "status": {
                "phase": "Running",
                "podIP": pod.ips[0].to_string(),
                "podIPs": pod.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
            },
        });
        write_atomically(&self.pod_path(pod.name()), &yaml(&manifest)?)
    }

    /// Replaces the labels of pod `name` (its manifest is rewritten, as `kubectl label` would
    /// change the object).
    pub fn set_labels(&mut self, name: &str, labels: &[(&str, &str)]) -> io::Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name() == name)
            .ok_or_else(|| io::Error::other(format!("no pod {name}")))?;
        self.pods[i].labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.write_pod(&self.pods[i])
    }

    fn group_path(&self, name: &str) -> PathBuf {
        self.manifests
            .path()
            .join("groups")
            .join(format!("{}.yaml", name.replace('/', "_")))
    }

    /// Writes (creates or replaces) a SecurityGroup or a NetworkPolicy from its YAML, as
    /// `kubectl apply` would: the namespace defaults to the cluster's, and
    /// `metadata.generation` is set (1, then bumped when the spec changes). Returns the name
    /// this fixture knows it by: a group's name, `networkpolicy/<name>` for a policy (the
    /// operator's key, so [`LocalCluster::wait_programmed`] finds its status file).
    pub fn apply_group(&mut self, manifest: &str) -> io::Result<String> {
        let staged = self.stage_group(manifest)?;
        self.write_group(staged)
    }

    /// [`LocalCluster::apply_group`]'s parsing and rendering, without the write: what a bench
    /// does before it starts its clock, so that what it times is the write and what follows,
    /// as a user's `kubectl apply` of a file already written. `unchanged` says whether the
    /// manifest in place already says the same (writing it would change nothing).
    pub fn stage_group(&self, manifest: &str) -> io::Result<StagedGroup> {
        let mut value: Value = serde_yaml::from_str(manifest).map_err(io::Error::other)?;
        let prefix = match value["kind"].as_str() {
            Some("SecurityGroup") => "",
            Some("NetworkPolicy") => kubesg_operator::netpol::KEY_PREFIX,
            _ => {
                return Err(io::Error::other(
                    "not a SecurityGroup or NetworkPolicy manifest",
                ))
            }
        };
        let name = value["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(|n| format!("{prefix}{n}"))
            .ok_or_else(|| io::Error::other("a manifest without metadata.name"))?;
        let spec = value["spec"].clone();
        let (generation, unchanged) = match self.groups.get(&name) {
            Some((old, g)) if *old == spec => (*g, true),
            Some((_, g)) => (g + 1, false),
            None => (1, false),
        };
        let meta = value["metadata"]
            .as_object_mut()
            .ok_or_else(|| io::Error::other("metadata is not a map"))?;
        meta.entry("namespace")
            .or_insert_with(|| json!(self.config.namespace));
        meta.insert("generation".into(), json!(generation));
        Ok(StagedGroup {
            path: self.group_path(&name),
            contents: yaml(&value)?,
            name,
            spec,
            generation,
            unchanged,
        })
    }

    /// Writes a manifest [`LocalCluster::stage_group`] rendered; returns its name (as
    /// [`LocalCluster::apply_group`]).
    pub fn write_group(&mut self, staged: StagedGroup) -> io::Result<String> {
        write_atomically(&staged.path, &staged.contents)?;
        self.groups
            .insert(staged.name.clone(), (staged.spec, staged.generation));
        Ok(staged.name)
    }

    /// Deletes group `name`'s manifest.
    pub fn delete_group(&mut self, name: &str) -> io::Result<()> {
        fs::remove_file(self.group_path(name))?;
        self.groups.remove(name);
        Ok(())
    }

    /// The generation this fixture gave group `name`.
    pub fn generation(&self, name: &str) -> Option<i64> {
        self.groups.get(name).map(|(_, g)| *g)
    }

    /// The status the operator wrote for group `name` (in the cluster's namespace), if any.
    pub fn status(&self, name: &str) -> Option<SecurityGroupStatus> {
        read_status(&status_path(
            self.status.path(),
            &ObjectKey::new(&self.config.namespace, name),
        ))
    }

    /// Waits until group `name`'s status says `Programmed=True` for its current generation (or
    /// a later one), and returns that status.
    pub fn wait_programmed(&self, name: &str) -> io::Result<SecurityGroupStatus> {
        let generation = self
            .generation(name)
            .ok_or_else(|| io::Error::other(format!("no group {name} was applied")))?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.check_cancel()?;
            let status = self.status(name);
            if let Some(s) = &status {
                let programmed = s
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Programmed" && c.status == "True");
                if programmed && s.observed_generation.unwrap_or(0) >= generation {
                    return Ok(s.clone());
                }
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "group {name} not Programmed at generation {generation} within \
                     {PATIENCE:?}; status: {status:?}\n{}",
                    self.dump()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The cluster the manifests describe now, as the operator reads them.
    pub fn model(&self) -> io::Result<Cluster> {
        let scan = ManifestDir::new(self.manifests.path()).scan()?;
        if !scan.problems.is_empty() {
            return Err(io::Error::other(format!(
                "manifest problems: {:?}",
                scan.problems
            )));
        }
        Ok(scan.cluster)
    }

    /// What the reference evaluation of the current manifests says of `probe` from pod `from`
    /// to pod `to` over the family (`v6`).
    pub fn expected(&self, from: &str, to: &str, probe: Probe, v6: bool) -> io::Result<Verdict> {
        let model = self.model()?;
        Ok(self.expected_in(&model, self.pod(from)?, self.pod(to)?, probe, v6))
    }

    fn expected_in(
        &self,
        model: &Cluster,
        from: &ClusterPod,
        to: &ClusterPod,
        probe: Probe,
        v6: bool,
    ) -> Verdict {
        Verdict::from_bool(reference::allows(
            model,
            &Connection {
                src: from.addr(v6),
                dst: to.addr(v6),
                protocol: probe.protocol(v6),
                port: probe.port(v6),
            },
        ))
    }

    /// What differs between what the agents applied and what the current manifests compile to;
    /// empty when every agent is in sync.
    fn sync_gaps(&self) -> io::Result<Vec<String>> {
        let plan = compile(&self.model()?);
        let mut gaps = Vec::new();
        for (node, agent) in self.nodes.iter().zip(&self.agents) {
            let (_, desired) = load_state(&agent.state_dir()).map_err(io::Error::other)?;
            let expected: BTreeMap<(String, String), (String, Option<String>)> = plan
                .nodes
                .get(&node.name)
                .map(|np| {
                    np.pods
                        .iter()
                        .map(|(k, p)| {
                            (
                                (k.namespace.clone(), k.name.clone()),
                                (p.uid.clone(), p.policy.clone()),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let actual: BTreeMap<(String, String), (String, Option<String>)> = desired
                .pods
                .iter()
                .map(|(k, a)| (k.clone(), (a.uid.clone(), a.policy.clone())))
                .collect();
            if actual != expected {
                gaps.push(format!(
                    "{}: the agent applied {actual:?}, the manifests compile to {expected:?}",
                    node.name
                ));
            } else if !expected.is_empty()
                && desired.recheck_on_policy_change != self.config.recheck_on_policy_change
            {
                gaps.push(format!(
                    "{}: the agent's re-check setting is {}",
                    node.name, desired.recheck_on_policy_change
                ));
            }
        }
        Ok(gaps)
    }

    /// Waits until every agent has applied exactly what the current manifests compile to: each
    /// pod of its node with its uid and policy (ids are derived from the compiled content), and
    /// the re-check setting.
    pub fn wait_synced(&self) -> io::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.check_cancel()?;
            let gaps = self.sync_gaps()?;
            if gaps.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "the agents did not catch up with the manifests within {PATIENCE:?}:\n{}\n{}",
                    gaps.join("\n"),
                    self.dump()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The version each agent last applied (0: none).
    pub fn applied_versions(&self) -> io::Result<Vec<u64>> {
        self.agents
            .iter()
            .map(|a| {
                load_state(&a.state_dir())
                    .map(|(_, d)| d.version)
                    .map_err(io::Error::other)
            })
            .collect()
    }

    /// Waits until every agent whose node has pods applied a version above `before` (its
    /// version then, from [`LocalCluster::applied_versions`]) and all are in sync: after an
    /// operator restart, the new operator has reached every agent.
    pub fn wait_resynced_since(&self, before: &[u64]) -> io::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.check_cancel()?;
            let now = self.applied_versions()?;
            let behind: Vec<String> = now
                .iter()
                .zip(before)
                .enumerate()
                .filter(|(i, (n, b))| n <= b && self.pods.iter().any(|p| p.node == *i))
                .map(|(i, (n, _))| format!("{} at version {n}", self.nodes[i].name))
                .collect();
            if behind.is_empty() {
                return self.wait_synced();
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "no new version from the operator within {PATIENCE:?}: {}\n{}",
                    behind.join(", "),
                    self.dump()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Opens a TCP connection from pod `from` to pod `to`'s `port` (its echo server) over the
    /// family (`v6`): a connection to hold across changes and test with [`probe::echoes`].
    pub fn connect(&self, from: &str, to: &str, port: u16, v6: bool) -> io::Result<TcpStream> {
        let target = SocketAddr::new(self.pod(to)?.addr(v6), port);
        self.pod(from)?
            .ns()
            .tcp_connect(None, target, probe::TCP_TIMEOUT)
    }

    /// Probes every (row pod, column) pair over each family in `families` (`false`: IPv4,
    /// `true`: IPv6), all at once, and sets each cell's expectation from the reference
    /// evaluation of the current manifests. A pod does not probe itself.
    pub fn matrix(
        &self,
        rows: &[&str],
        columns: &[Target],
        families: &[bool],
    ) -> io::Result<Matrix> {
        self.check_cancel()?;
        let model = self.model()?;
        let row_pods: Vec<&ClusterPod> = rows
            .iter()
            .map(|r| self.pod(r))
            .collect::<io::Result<_>>()?;
        let column_pods: Vec<&ClusterPod> = columns
            .iter()
            .map(|c| self.pod(&c.pod))
            .collect::<io::Result<_>>()?;
        let mut jobs = Vec::new();
        for (r, from) in row_pods.iter().enumerate() {
            for (c, (target, to)) in columns.iter().zip(&column_pods).enumerate() {
                if from.name() == to.name() {
                    continue;
                }
                for &v6 in families {
                    jobs.push((r, c, v6, *from, *to, target.probe));
                }
            }
        }
        let results: Vec<(usize, usize, bool, io::Result<Verdict>, Verdict)> =
            std::thread::scope(|s| {
                let handles: Vec<_> = jobs
                    .iter()
                    .map(|&(r, c, v6, from, to, probe)| {
                        let expected = self.expected_in(&model, from, to, probe, v6);
                        (
                            r,
                            c,
                            v6,
                            expected,
                            s.spawn(move || probe.run(from.ns(), to.addr(v6))),
                        )
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(r, c, v6, expected, h)| {
                        let observed = h
                            .join()
                            .unwrap_or_else(|_| Err(io::Error::other("a probe panicked")));
                        (r, c, v6, observed, expected)
                    })
                    .collect()
            });
        let mut cells = BTreeMap::new();
        for (r, c, v6, observed, expected) in results {
            let observed = observed.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("probe {} -> {}: {e}", rows[r], columns[c].label()),
                )
            })?;
            cells.insert((r, c, v6), Cell { observed, expected });
        }
        Ok(Matrix {
            rows: rows.iter().map(|r| r.to_string()).collect(),
            columns: columns.to_vec(),
            cells,
        })
    }

    /// Every path this cluster created that must be gone once it is dropped: the network
    /// namespaces of nodes and pods (`/run/netns/…`), the agents' pin directories under
    /// `/sys/fs/bpf`, and the temporary directories (manifests, statuses, PKI, agents', the
    /// operator's, host-local's). The demo checks them after cleaning up.
    pub fn footprint(&self) -> Vec<PathBuf> {
        let netns = |name: &str| PathBuf::from("/run/netns").join(name);
        let mut paths: Vec<PathBuf> = self.nodes.iter().map(|n| netns(n.cni.name())).collect();
        paths.extend(self.pods.iter().map(|p| netns(p.ns().name())));
        for agent in &self.agents {
            paths.push(agent.pin_dir().to_owned());
            paths.push(agent.dir().to_owned());
        }
        paths.extend(self.nodes.iter().map(|n| n.cni.ipam_dir().to_owned()));
        paths.push(self.operator.dir().to_owned());
        paths.push(self.manifests.path().to_owned());
        paths.push(self.status.path().to_owned());
        paths.push(self.pki.dir().to_owned());
        paths
    }

    /// What the operator and the agents know, for failure messages: each agent's `endpoints`
    /// and `ct list -w`, the manifests, and the logs.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for (node, agent) in self.nodes.iter().zip(&self.agents) {
            let cli = |args: &[&str]| {
                agent
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
            s.push_str(&format!(
                "--- {}: kubesg-agent endpoints\n{}--- {}: kubesg-agent ct list -w\n{}",
                node.name,
                cli(&["endpoints"]),
                node.name,
                cli(&["ct", "list", "-w"])
            ));
        }
        s.push_str(&format!(
            "--- operator log\n{}",
            tail(&self.operator.log(), 60)
        ));
        for (node, agent) in self.nodes.iter().zip(&self.agents) {
            s.push_str(&format!(
                "--- {} agent log\n{}",
                node.name,
                tail(&agent.log(), 60)
            ));
        }
        s
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

/// Joins two nodes with a veth pair (`ul0` on both sides) carrying their underlay addresses,
/// and routes each node's pod subnets to the other.
///
/// The neighbours across the underlay are static entries: a neighbour resolution is one more
/// thing that can lose the first packet of a connection (its solicitation leaves while the link
/// is still being set up), which a probe with a short timeout would report as refused.
fn connect_underlay(a: &Netns, b: &Netns) -> io::Result<()> {
    a.ip(&[
        "link",
        "add",
        "ul0",
        "type",
        "veth",
        "peer",
        "name",
        "ul0",
        "netns",
        b.name(),
    ])?;
    let nodes = [a, b];
    for (i, me) in nodes.iter().enumerate() {
        let v4 = format!("{}/24", underlay_v4(i));
        let v6 = format!("{}/64", underlay_v6(i));
        me.ip(&["addr", "add", &v4, "dev", "ul0"])?;
        me.ip(&["-6", "addr", "add", &v6, "dev", "ul0", "nodad"])?;
        me.ip(&["link", "set", "ul0", "up"])?;
    }
    for (i, me) in nodes.iter().enumerate() {
        let other = 1 - i;
        let mac = link_address(nodes[other], "ul0")?;
        for (family, addr) in [
            ("-4", underlay_v4(other).to_string()),
            ("-6", underlay_v6(other).to_string()),
        ] {
            me.ip(&[
                family,
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &mac,
                "dev",
                "ul0",
                "nud",
                "permanent",
            ])?;
        }
        me.ip(&[
            "route",
            "add",
            &subnet_v4(other),
            "via",
            &underlay_v4(other).to_string(),
        ])?;
        me.ip(&[
            "-6",
            "route",
            "add",
            &subnet_v6(other),
            "via",
            &underlay_v6(other).to_string(),
        ])?;
    }
    Ok(())
}

/// The link-layer address of interface `ifname` in `ns` (`ip -o link show`).
fn link_address(ns: &Netns, ifname: &str) -> io::Result<String> {
    let out = ns.ip(&["-o", "link", "show", ifname])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("no link/ether address in {text}")))
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("config", &self.config)
            .field("nodes", &self.nodes)
            .field("manifests", &self.manifests.path())
            .field("operator", &self.operator)
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}
