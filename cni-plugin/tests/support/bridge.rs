//! A real primary plugin for kubesg-cni to chain after: Debian's `bridge` plugin with `host-local`
//! IPAM (containernetworking-plugins, /usr/lib/cni, up to cniVersion 1.0.0), run inside a node
//! netns against a pod netns. Dropping it runs the bridge plugin's DEL, then removes the
//! namespaces and host-local's data directory.
// Each test crate includes this file and uses part of it.
#![allow(dead_code)]

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use kubesg_testkit::netns::{unique_name, Netns};
use serde_json::{json, Value};
use tempfile::TempDir;

/// Where Debian installs the reference plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";
/// The pod's interface name.
pub const IFNAME: &str = "eth0";
/// The bridge the plugin creates in the node netns.
pub const BRIDGE: &str = "kbr0";

/// A pod attached to a node's bridge by the bridge plugin.
pub struct BridgeChain {
    /// The pod's netns (dropped first: its end of the veth goes, and the host end with it).
    pub pod: Netns,
    /// The node's netns, where the bridge and the host ends live.
    pub node: Netns,
    /// The CNI_CONTAINERID used.
    pub container_id: String,
    config: String,
    _ipam_dir: TempDir,
}

impl BridgeChain {
    /// A node netns and a pod netns, not yet attached.
    pub fn new() -> Self {
        let node = Netns::new("cn").expect("node netns");
        let pod = Netns::new("cp").expect("pod netns");
        let ipam_dir = tempfile::tempdir().expect("host-local data dir");
        let config = json!({
            "cniVersion": "1.0.0",
            "name": "kubesg-test",
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipam": {
                "type": "host-local",
                "dataDir": ipam_dir.path().display().to_string(),
                "ranges": [
                    [{"subnet": "10.99.0.0/24"}],
                    [{"subnet": "fd99::/64"}],
                ],
            },
        })
        .to_string();
        BridgeChain {
            container_id: unique_name("ctr"),
            pod,
            node,
            config,
            _ipam_dir: ipam_dir,
        }
    }

    /// The pod netns' path (CNI_NETNS).
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.pod.name())
    }

    /// Runs the bridge plugin's ADD and returns its result.
    pub fn add(&self) -> Value {
        let out = self.bridge("ADD");
        assert!(
            out.status.success(),
            "bridge ADD failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("bridge result is JSON")
    }

    /// The bridge plugin with `command`, inside the node netns.
    fn bridge(&self, command: &str) -> Output {
        let netns = self.netns_path();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.node.name(),
                &format!("{CNI_PATH}/bridge"),
            ])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", &netns)
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running the bridge plugin");
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.config.as_bytes())
                .expect("writing the bridge config");
        }
        child
            .wait_with_output()
            .expect("waiting for the bridge plugin")
    }
}

impl Drop for BridgeChain {
    fn drop(&mut self) {
        let out = self.bridge("DEL");
        if !out.status.success() {
            eprintln!(
                "bridge DEL failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
