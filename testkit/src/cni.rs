//! The end-to-end tests' container runtime: runs CNI network configurations the way libcni
//! (containerd, CRI-O) does, with real plugins as processes, on network namespaces standing in
//! for a node and its pods.
//!
//! - ADD runs each plugin of the list in order, giving each the previous one's result as
//!   `prevResult`, and caches the last result; DEL runs them in reverse order with the cached
//!   result as `prevResult`, then forgets it; CHECK runs them in order with the cached result.
//! - Each plugin's config is the list's entry with the list's `name` and `cniVersion`, the
//!   `prevResult`, and `runtimeConfig` for the capabilities it declares (libcni's
//!   `buildOneConfig`); the environment is `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`,
//!   `CNI_IFNAME`, `CNI_ARGS` (`IgnoreUnknown=1;K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;K8S_POD_UID=…`,
//!   as the kubelet passes them) and `CNI_PATH` (`/usr/lib/cni` and the directory of the built
//!   `kubesg-cni`), nothing else but `PATH`.
//! - A plugin's stdout is its result, or on a non-zero exit its error object.
//! - STATUS and GC are 1.1.0 verbs, and libcni sends them only for 1.1.0 lists; Debian's reference
//!   plugins (1.1.1) speak up to 1.0.0, so the chain runs at 1.0.0 and [`CniRuntime::status`] and
//!   [`CniRuntime::gc`] send them at 1.1.0 to the plugins whose VERSION lists 1.1.0 (kubesg-cni),
//!   skipping the others.
//!
//! Plugins run inside the node's namespace (`ip netns exec <node>`), where the bridge and the
//! host ends of the pods' veths live, as a runtime runs them in the host's.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use kubesg_proto::v1alpha1 as pb;
use serde_json::{json, Map, Value};

use crate::{
    agent::binaries,
    netns::{unique_name, Netns},
};

/// Where Debian's `containernetworking-plugins` live.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The bridge the pod network's `bridge` plugin uses in the node namespace.
pub const BRIDGE: &str = "kbr0";

/// How long a plugin may run before the test gives up on it (a kubesg-cni ADD under the `wait`
/// startup policy blocks for the agent's wait timeout).
const PLUGIN_PATIENCE: Duration = Duration::from_secs(60);

/// A network configuration list (a `.conflist`).
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkList {
    /// `name`.
    pub name: String,
    /// `cniVersion`.
    pub cni_version: String,
    /// `plugins`, in chain order.
    pub plugins: Vec<Value>,
}

impl NetworkList {
    /// The `type` of plugin `index`.
    pub fn plugin_type(&self, index: usize) -> &str {
        self.plugins
            .get(index)
            .and_then(|p| p["type"].as_str())
            .unwrap_or("")
    }

    /// The index of the plugin of type `plugin_type`.
    pub fn index_of(&self, plugin_type: &str) -> Option<usize> {
        (0..self.plugins.len()).find(|i| self.plugin_type(*i) == plugin_type)
    }

    /// Plugin `index`'s config as libcni builds it (`buildOneConfig`): the entry with the list's
    /// `name` and `cniVersion` (or `version` when given), `prevResult` when given, and
    /// `runtimeConfig` with the attachment's capability arguments the plugin declares.
    pub fn plugin_config(
        &self,
        index: usize,
        version: Option<&str>,
        prev_result: Option<&Value>,
        attachment: Option<&Attachment>,
    ) -> Value {
        let mut conf = self.plugins.get(index).cloned().unwrap_or(Value::Null);
        let Some(obj) = conf.as_object_mut() else {
            return conf;
        };
        obj.insert("name".into(), json!(self.name));
        obj.insert(
            "cniVersion".into(),
            json!(version.unwrap_or(&self.cni_version)),
        );
        if let Some(prev) = prev_result {
            obj.insert("prevResult".into(), prev.clone());
        }
        if let Some(att) = attachment {
            let declared = obj.get("capabilities").cloned().unwrap_or(Value::Null);
            let mut runtime_config = Map::new();
            for (cap, arg) in &att.capability_args {
                if declared[cap] == Value::Bool(true) {
                    runtime_config.insert(cap.clone(), arg.clone());
                }
            }
            if !runtime_config.is_empty() {
                obj.insert("runtimeConfig".into(), Value::Object(runtime_config));
            }
        }
        conf
    }
}

/// One attachment of a container to a network.
#[derive(Clone, Debug, PartialEq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` pairs.
    pub args: Vec<(String, String)>,
    /// Capability arguments (`runtimeConfig`), e.g. `ips`.
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    /// `CNI_ARGS` as the kubelet writes it: `IgnoreUnknown=1;K=V;…`.
    pub fn cni_args(&self) -> String {
        std::iter::once("IgnoreUnknown=1".to_owned())
            .chain(self.args.iter().map(|(k, v)| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The `CNI_*` environment of `command` on this attachment.
    pub fn env(&self, command: &str, cni_path: &str) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), self.container_id.clone()),
            ("CNI_NETNS".into(), self.netns.display().to_string()),
            ("CNI_IFNAME".into(), self.ifname.clone()),
            ("CNI_ARGS".into(), self.cni_args()),
            ("CNI_PATH".into(), cni_path.into()),
        ]
    }
}

/// What one plugin run printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginRun {
    /// The plugin's type.
    pub plugin: String,
    /// Its exit status (-1 when killed by a signal).
    pub exit_code: i32,
    /// stdout: the result or the error object.
    pub stdout: String,
    /// stderr: its logs.
    pub stderr: String,
}

impl PluginRun {
    /// The result (`None` when stdout is empty), or the error it printed.
    pub fn outcome(&self) -> Result<Option<Value>, CniError> {
        if self.exit_code == 0 {
            if self.stdout.trim().is_empty() {
                return Ok(None);
            }
            return serde_json::from_str(&self.stdout)
                .map(Some)
                .map_err(|e| self.malformed(&format!("stdout is not JSON: {e}")));
        }
        let json: Value = serde_json::from_str(&self.stdout)
            .map_err(|e| self.malformed(&format!("error output is not JSON: {e}")))?;
        Err(CniError {
            plugin: self.plugin.clone(),
            code: json["code"].as_u64().unwrap_or(0),
            details: json["details"].as_str().unwrap_or_default().to_owned(),
            exit_code: self.exit_code,
            output: Box::new(ErrorOutput {
                msg: json["msg"].as_str().unwrap_or_default().to_owned(),
                json,
                stderr: self.stderr.clone(),
            }),
        })
    }

    fn malformed(&self, what: &str) -> CniError {
        CniError {
            plugin: self.plugin.clone(),
            code: 0,
            details: self.stdout.clone(),
            exit_code: self.exit_code,
            output: Box::new(ErrorOutput {
                msg: format!("the plugin broke the protocol: {what}"),
                json: Value::Null,
                stderr: self.stderr.clone(),
            }),
        }
    }
}

/// A plugin's error, as printed on stdout.
#[derive(Clone, Debug, PartialEq)]
pub struct CniError {
    /// The plugin that failed.
    pub plugin: String,
    /// `code` (0 when the plugin printed no valid error object).
    pub code: u64,
    /// `details`.
    pub details: String,
    /// The process's exit status.
    pub exit_code: i32,
    /// The rest of what it printed (boxed: errors travel in `Result`s).
    pub output: Box<ErrorOutput>,
}

/// The rest of a plugin's error output.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorOutput {
    /// `msg`.
    pub msg: String,
    /// The whole error object.
    pub json: Value,
    /// The plugin's stderr.
    pub stderr: String,
}

impl CniError {
    /// An error of the runtime itself (not of a plugin's output).
    fn runtime(plugin: &str, msg: String, details: String) -> CniError {
        CniError {
            plugin: plugin.to_owned(),
            code: 0,
            details,
            exit_code: -1,
            output: Box::new(ErrorOutput {
                msg,
                json: Value::Null,
                stderr: String::new(),
            }),
        }
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed (exit {}) with code {}: {}: {}\nstderr:\n{}",
            self.plugin,
            self.exit_code,
            self.code,
            self.output.msg,
            self.details,
            self.output.stderr
        )
    }
}

impl std::error::Error for CniError {}

/// The runtime: runs plugins inside a node namespace and caches ADD results per attachment.
#[derive(Debug)]
pub struct CniRuntime {
    node: String,
    cni_path: Vec<PathBuf>,
    cache: Mutex<HashMap<(String, String, String), Value>>,
}

impl CniRuntime {
    /// A runtime running plugins inside the named namespace, finding them in `/usr/lib/cni` and
    /// next to the built `kubesg-cni`.
    pub fn new(node_netns: &str) -> io::Result<CniRuntime> {
        let cni = &binaries()?.cni;
        let kubesg_dir = cni
            .parent()
            .ok_or_else(|| io::Error::other("kubesg-cni has no directory"))?;
        Ok(CniRuntime {
            node: node_netns.to_owned(),
            cni_path: vec![PathBuf::from(REFERENCE_PLUGINS), kubesg_dir.to_path_buf()],
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// `CNI_PATH`.
    pub fn cni_path(&self) -> String {
        self.cni_path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The executable of plugin type `plugin_type`, searched in `CNI_PATH`.
    pub fn find_plugin(&self, plugin_type: &str) -> io::Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                io::Error::other(format!(
                    "no plugin {plugin_type:?} in CNI_PATH {}",
                    self.cni_path()
                ))
            })
    }

    /// Runs plugin `plugin_type` inside the node namespace with exactly `env` (and `PATH`) and
    /// `stdin`: the raw invocation, for tests that send what a runtime never would.
    pub fn exec(
        &self,
        plugin_type: &str,
        env: &[(String, String)],
        stdin: &[u8],
    ) -> io::Result<PluginRun> {
        let plugin = self.find_plugin(plugin_type)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node])
            .arg(&plugin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // A plugin that fails before reading stdin (VERSION, a bad environment) may close it.
        if let Some(mut input) = child.stdin.take() {
            match input.write_all(stdin) {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e),
                _ => {}
            }
        }
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("stdout"))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("stderr"))?;
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + PLUGIN_PATIENCE;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other(format!(
                    "{plugin_type} did not finish within {PLUGIN_PATIENCE:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(PluginRun {
            plugin: plugin_type.to_owned(),
            exit_code: status.code().unwrap_or(-1),
            stdout: out_reader.join().unwrap_or_default(),
            stderr: err_reader.join().unwrap_or_default(),
        })
    }

    /// Runs `command` of plugin `index` of `list` on `attachment` (or none: STATUS, GC,
    /// VERSION) with this config.
    fn invoke(
        &self,
        list: &NetworkList,
        index: usize,
        command: &str,
        attachment: Option<&Attachment>,
        conf: &Value,
    ) -> Result<Option<Value>, CniError> {
        let plugin = list.plugin_type(index).to_owned();
        let env = match attachment {
            Some(att) => att.env(command, &self.cni_path()),
            None => vec![
                ("CNI_COMMAND".into(), command.into()),
                ("CNI_PATH".into(), self.cni_path()),
            ],
        };
        let run = self
            .exec(&plugin, &env, conf.to_string().as_bytes())
            .map_err(|e| {
                CniError::runtime(
                    &plugin,
                    format!("could not run the plugin: {e}"),
                    String::new(),
                )
            })?;
        run.outcome()
    }

    fn cache_key(list: &NetworkList, att: &Attachment) -> (String, String, String) {
        (
            list.name.clone(),
            att.container_id.clone(),
            att.ifname.clone(),
        )
    }

    /// The result of the attachment's last successful ADD on `list`.
    pub fn cached_result(&self, list: &NetworkList, att: &Attachment) -> Option<Value> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&Self::cache_key(list, att))
            .cloned()
    }

    /// ADD: every plugin in order, each with the previous result; caches and returns the last.
    pub fn add(&self, list: &NetworkList, att: &Attachment) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for i in 0..list.plugins.len() {
            let conf = list.plugin_config(i, None, prev.as_ref(), Some(att));
            prev = self.invoke(list, i, "ADD", Some(att), &conf)?;
        }
        let result = prev.unwrap_or(Value::Null);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Self::cache_key(list, att), result.clone());
        Ok(result)
    }

    /// DEL: every plugin in reverse order with the cached result; forgets it on success.
    pub fn del(&self, list: &NetworkList, att: &Attachment) -> Result<(), CniError> {
        let cached = self.cached_result(list, att);
        for i in (0..list.plugins.len()).rev() {
            let conf = list.plugin_config(i, None, cached.as_ref(), Some(att));
            self.invoke(list, i, "DEL", Some(att), &conf)?;
        }
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&Self::cache_key(list, att));
        Ok(())
    }

    /// CHECK: every plugin in order with the cached result (libcni refuses without one).
    pub fn check(&self, list: &NetworkList, att: &Attachment) -> Result<(), CniError> {
        let cached = self.cached_result(list, att).ok_or_else(|| {
            CniError::runtime(
                "runtime",
                "no cached result for this attachment".into(),
                format!("{}/{}", att.container_id, att.ifname),
            )
        })?;
        for i in 0..list.plugins.len() {
            let conf = list.plugin_config(i, None, Some(&cached), Some(att));
            self.invoke(list, i, "CHECK", Some(att), &conf)?;
        }
        Ok(())
    }

    /// Runs one command of one plugin of the list alone, on an attachment, with the cached
    /// result as `prevResult` (e.g. the DEL of kubesg-cni only, as a half-done teardown leaves
    /// it).
    pub fn run_one(
        &self,
        list: &NetworkList,
        plugin_type: &str,
        command: &str,
        att: &Attachment,
    ) -> Result<Option<Value>, CniError> {
        let i = list.index_of(plugin_type).unwrap_or(usize::MAX);
        let cached = self.cached_result(list, att);
        let conf = list.plugin_config(i, None, cached.as_ref(), Some(att));
        self.invoke(list, i, command, Some(att), &conf)
    }

    /// VERSION of plugin `index` of the list.
    pub fn version(&self, list: &NetworkList, index: usize) -> Result<Value, CniError> {
        let conf = list.plugin_config(index, None, None, None);
        Ok(self
            .invoke(list, index, "VERSION", None, &conf)?
            .unwrap_or(Value::Null))
    }

    /// The plugins of the list whose VERSION lists 1.1.0: those STATUS and GC go to.
    fn speak_1_1_0(&self, list: &NetworkList) -> Result<Vec<usize>, CniError> {
        let mut out = Vec::new();
        for i in 0..list.plugins.len() {
            let v = self.version(list, i)?;
            let speaks = v["supportedVersions"]
                .as_array()
                .is_some_and(|vs| vs.iter().any(|s| s == "1.1.0"));
            if speaks {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// STATUS (at 1.1.0) to every plugin of the list that speaks it.
    pub fn status(&self, list: &NetworkList) -> Result<(), CniError> {
        for i in self.speak_1_1_0(list)? {
            let conf = list.plugin_config(i, Some("1.1.0"), None, None);
            self.invoke(list, i, "STATUS", None, &conf)?;
        }
        Ok(())
    }

    /// GC (at 1.1.0) to every plugin of the list that speaks it, with these attachments as
    /// `cni.dev/valid-attachments`.
    pub fn gc(&self, list: &NetworkList, valid: &[&Attachment]) -> Result<(), CniError> {
        let valid: Vec<Value> = valid
            .iter()
            .map(|a| json!({"containerID": a.container_id, "ifname": a.ifname}))
            .collect();
        for i in self.speak_1_1_0(list)? {
            let mut conf = list.plugin_config(i, Some("1.1.0"), None, None);
            conf["cni.dev/valid-attachments"] = json!(valid);
            self.invoke(list, i, "GC", None, &conf)?;
        }
        Ok(())
    }
}

/// A pod sandbox: its network namespace and identity, attached to networks by [`CniNode`].
#[derive(Debug)]
pub struct CniPod {
    /// The pod's namespace (`CNI_NETNS` is its path).
    pub ns: Netns,
    /// The attachment to the pod network (`eth0`), with the pod's identity in `CNI_ARGS` and
    /// the addresses it asks host-local for in `runtimeConfig.ips`.
    pub attachment: Attachment,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes name.
    pub name: String,
    /// Kubernetes UID.
    pub uid: String,
    /// The IPv4 address asked for.
    pub ipv4: Ipv4Addr,
    /// The IPv6 address asked for.
    pub ipv6: Ipv6Addr,
}

impl CniPod {
    /// A sandbox for pod `namespace/name` that will ask for `ipv4` and `ipv6` (in the pod
    /// network's subnets) on `eth0`; nothing is attached yet.
    pub fn new(namespace: &str, name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> io::Result<Self> {
        let ns = Netns::new("kp")?;
        let uid = unique_name("uid-");
        let mut capability_args = Map::new();
        capability_args.insert(
            "ips".into(),
            json!([
                format!("{ipv4}/{}", POD_V4_PREFIX),
                format!("{ipv6}/{}", POD_V6_PREFIX)
            ]),
        );
        let attachment = Attachment {
            container_id: unique_name("ctr"),
            netns: PathBuf::from(format!("/run/netns/{}", ns.name())),
            ifname: "eth0".into(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), namespace.into()),
                ("K8S_POD_NAME".into(), name.into()),
                ("K8S_POD_UID".into(), uid.clone()),
            ],
            capability_args,
        };
        Ok(CniPod {
            ns,
            attachment,
            namespace: namespace.into(),
            name: name.into(),
            uid,
            ipv4,
            ipv6,
        })
    }

    /// The attachment of the loopback network (`lo`).
    pub fn loopback_attachment(&self) -> Attachment {
        Attachment {
            ifname: "lo".into(),
            capability_args: Map::new(),
            ..self.attachment.clone()
        }
    }

    /// The pod as the operator names it.
    pub fn pod_ref(&self) -> pb::PodRef {
        pb::PodRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }

    /// The container id.
    pub fn container_id(&self) -> &str {
        &self.attachment.container_id
    }

    /// The pod's address of the family (`v6`).
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

    /// Connects from the pod to `to` within `timeout` (see [`Netns::tcp_connect`]).
    pub fn tcp_connect(&self, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.ns.tcp_connect(None, to, timeout)
    }

    /// A UDP socket of the pod (`port` 0: ephemeral) whose receives give up after `timeout`.
    pub fn udp_bind(&self, v6: bool, port: u16, timeout: Duration) -> io::Result<UdpSocket> {
        self.ns.udp_bind(self.sockaddr(v6, port), timeout)
    }
}

/// The IPv4 pod subnet of [`CniNode`]'s pod network.
pub const POD_V4_SUBNET: &str = "10.77.0.0/24";
/// The IPv6 pod subnet of [`CniNode`]'s pod network.
pub const POD_V6_SUBNET: &str = "fd77::/64";
const POD_V4_PREFIX: u8 = 24;
const POD_V6_PREFIX: u8 = 64;

/// A pod's IPv4 address on [`CniNode`]'s pod network: 10.77.0.`host`.
pub fn pod_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, host)
}

/// A pod's IPv6 address on [`CniNode`]'s pod network: fd77::`host`.
pub fn pod_v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, u16::from(host))
}

/// A node as a CNI runtime sees it: a network namespace, a runtime running plugins in it, and
/// the two networks a containerd node runs for each pod: `cni-loopback` (Debian's `loopback`)
/// and the pod network, `bridge` with `host-local` IPAM (dual-stack, [`POD_V4_SUBNET`] and
/// [`POD_V6_SUBNET`] unless [`CniNode::with_subnets`] says otherwise, state in a private
/// temporary directory) with `kubesg-cni` chained after it, at cniVersion 1.0.0.
#[derive(Debug)]
pub struct CniNode {
    /// The runtime, running plugins inside `ns`.
    pub runtime: CniRuntime,
    /// The loopback network.
    pub loopback: NetworkList,
    /// The pod network's IPv4 and IPv6 subnets (host-local's ranges).
    subnets: (String, String),
    ipam_dir: tempfile::TempDir,
    /// The node's namespace (dropped last).
    pub ns: Netns,
}

impl CniNode {
    /// A node namespace with the pod network's bridge already there, pods in
    /// [`POD_V4_SUBNET`] and [`POD_V6_SUBNET`].
    pub fn new() -> io::Result<CniNode> {
        CniNode::with_subnets(POD_V4_SUBNET, POD_V6_SUBNET)
    }

    /// A node whose pods get addresses in `v4_subnet` and `v6_subnet` (each node of a
    /// multi-node cluster has its own, routed between the nodes).
    ///
    /// The bridge is created before the first ADD (the bridge plugin adopts an existing one) to
    /// turn multicast snooping off: with it on, the bridge sends IGMP queries and reports to the
    /// pods, NEW flows that member pods drop by policy at random moments, which would make drop
    /// counters unpredictable (see `node::TestNode::new`).
    pub fn with_subnets(v4_subnet: &str, v6_subnet: &str) -> io::Result<CniNode> {
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
        let ipam_dir = tempfile::Builder::new().prefix("kubesg-ipam-").tempdir()?;
        Ok(CniNode {
            runtime: CniRuntime::new(ns.name())?,
            loopback: NetworkList {
                name: "cni-loopback".into(),
                cni_version: "1.0.0".into(),
                plugins: vec![json!({"type": "loopback"})],
            },
            subnets: (v4_subnet.to_owned(), v6_subnet.to_owned()),
            ipam_dir,
            ns,
        })
    }

    /// host-local's state directory (removed on drop).
    pub fn ipam_dir(&self) -> &Path {
        self.ipam_dir.path()
    }

    /// The node namespace's name (for `AgentProcess::start`).
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// The pod network: `bridge` + `host-local`, then `kubesg-cni` talking to the agent on
    /// `agent_socket` with `timeout_seconds` per call. The bridge is the pods' default gateway
    /// (as on a real node), so pods reach other nodes' pods through the node's routes.
    pub fn pod_network(&self, agent_socket: &Path, timeout_seconds: u64) -> NetworkList {
        NetworkList {
            name: "kubesg-e2e".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![
                json!({
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "isDefaultGateway": true,
                    "capabilities": {"ips": true},
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.ipam_dir.path().display().to_string(),
                        "ranges": [
                            [{"subnet": self.subnets.0}],
                            [{"subnet": self.subnets.1}],
                        ],
                    },
                }),
                json!({
                    "type": "kubesg-cni",
                    "agentSocket": agent_socket.display().to_string(),
                    "timeoutSeconds": timeout_seconds,
                }),
            ],
        }
    }

    /// Attaches `pod` as containerd does: the loopback network, then `network`. Returns the pod
    /// network's result.
    pub fn add(&self, network: &NetworkList, pod: &CniPod) -> Result<Value, CniError> {
        self.runtime
            .add(&self.loopback, &pod.loopback_attachment())?;
        self.runtime.add(network, &pod.attachment)
    }

    /// Detaches `pod` from `network`, then from the loopback network.
    pub fn del(&self, network: &NetworkList, pod: &CniPod) -> Result<(), CniError> {
        self.runtime.del(network, &pod.attachment)?;
        self.runtime.del(&self.loopback, &pod.loopback_attachment())
    }

    /// The host end of a pod's veth named in a bridge result: its name and its index in the
    /// node namespace.
    pub fn host_veth(&self, result: &Value) -> io::Result<(String, u32)> {
        let name = result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i.get("sandbox").is_none_or(|s| s == ""))
            .filter_map(|i| i["name"].as_str())
            .find(|n| *n != BRIDGE)
            .ok_or_else(|| io::Error::other(format!("no host veth in {result}")))?
            .to_owned();
        let ifindex = self.ns.ifindex(&name)?;
        Ok((name, ifindex))
    }
}
