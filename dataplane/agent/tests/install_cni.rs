//! `kubesg-agent install-cni` on the network configurations real primary CNIs write
//! (`tests/cni_conf/`): kubesg becomes the last plugin and nothing else changes, a second run
//! writes nothing, uninstalling gives every original byte back, a rewrite by the primary is
//! survived (and never lost), the watch loop and the init container behave as the DaemonSet
//! needs, and the resulting chain runs for real: Debian's reference plugins, then the installed
//! `kubesg-cni`, registering the pod with a real agent.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use kubesg_agent::install_cni::{
    insert_entry, ChainEntry, Chained, CniInstaller, InstallError, ORIGINAL_SUFFIX,
};
use kubesg_testkit::{
    agent::{binaries, AgentConfig, AgentProcess, Startup},
    cni::{pod_v4, pod_v6, CniNode, CniPod, NetworkList},
    netns::unique_name,
};
use serde_json::Value;

/// The conflists of primary CNIs kubesg chains into, as `(directory, file name)`.
const CONFLISTS: [(&str, &str); 5] = [
    ("containerd-bridge", "10-containerd-net.conflist"),
    ("kindnet-ptp", "10-kindnet.conflist"),
    ("flannel", "10-flannel.conflist"),
    ("calico", "10-calico.conflist"),
    ("aws-vpc-cni", "10-aws.conflist"),
];

/// A single-plugin `.conf` (CRI-O's bridge example).
const SINGLE: (&str, &str) = ("crio-bridge", "11-crio-ipv4-bridge.conf");

/// How long to wait for what the watcher must do.
const PATIENCE: Duration = Duration::from_secs(10);

/// A private directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique_name("kubesg-install-cni-"));
        fs::create_dir_all(&dir).expect("creating a temporary directory");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The bytes of fixture `dir/name`.
fn fixture(dir: &str, name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cni_conf")
        .join(dir)
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("reading the directory")
        .map(|e| {
            let path = e.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).expect("reading a file"))
        })
        .collect()
}

fn entry() -> ChainEntry {
    ChainEntry {
        agent_socket: "/var/run/kubesg/agent.sock".into(),
        timeout_seconds: 30,
    }
}

/// A node's two CNI directories (configuration, binaries) and an installer for them; the
/// "plugin binary" is a small file unless a test needs the real one.
struct Node {
    conf: TempDir,
    bin: TempDir,
    _src: TempDir,
    installer: CniInstaller,
}

impl Node {
    fn new() -> Node {
        let conf = TempDir::new();
        let bin = TempDir::new();
        let src = TempDir::new();
        let plugin = src.path().join("kubesg-cni");
        fs::write(&plugin, b"#!/bin/false\nnot the real plugin\n").expect("writing the plugin");
        let installer = CniInstaller {
            conf_dir: conf.path().to_path_buf(),
            bin_dir: bin.path().to_path_buf(),
            plugin_binary: plugin,
            entry: entry(),
        };
        Node {
            conf,
            bin,
            _src: src,
            installer,
        }
    }

    /// A node whose configuration directory holds fixture `dir/name`.
    fn with(dir: &str, name: &str) -> Node {
        let node = Node::new();
        node.write(name, &fixture(dir, name));
        node
    }

    fn file(&self, name: &str) -> PathBuf {
        self.conf.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.file(name), text).expect("writing a configuration");
    }

    /// Writes `text` to `name` as kindnetd does: a temporary file renamed over it.
    fn rewrite_by_rename(&self, name: &str, text: &str) {
        let tmp = self.file(&format!("{name}.temp"));
        fs::write(&tmp, text).expect("writing");
        fs::rename(&tmp, self.file(name)).expect("renaming");
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.file(name)).expect("reading a configuration")
    }
}

fn plugins(text: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    v["plugins"].as_array().expect("plugins").clone()
}

/// Asserts that `after` is `before` with one contiguous insertion: `,`, whitespace, kubesg's
/// entry. Returns the inserted text.
fn assert_one_insertion(before: &str, after: &str) -> String {
    let prefix = before
        .bytes()
        .zip(after.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let suffix = before[prefix..]
        .bytes()
        .rev()
        .zip(after[prefix..].bytes().rev())
        .take_while(|(a, b)| a == b)
        .count();
    assert_eq!(
        prefix + suffix,
        before.len(),
        "the original bytes are not all kept:\n--- before\n{before}\n--- after\n{after}"
    );
    let inserted = &after[prefix..after.len() - suffix];
    let object = inserted
        .strip_prefix(',')
        .unwrap_or_else(|| panic!("the insertion does not start with a comma: {inserted:?}"))
        .trim_start();
    let value: Value = serde_json::from_str(object)
        .unwrap_or_else(|e| panic!("the insertion is not one object ({e}): {inserted:?}"));
    assert_eq!(value, entry().to_value());
    inserted.to_owned()
}

#[test]
fn every_primary_cni_gets_kubesg_as_its_last_plugin_with_nothing_else_changed() {
    for (dir, name) in CONFLISTS {
        let node = Node::with(dir, name);
        let before = node.read(name);
        let chained = node.installer.ensure_chained().expect("installing");
        assert_eq!(chained, Chained::Inserted(node.file(name)), "{dir}");
        let after = node.read(name);

        let (old, new) = (plugins(&before), plugins(&after));
        assert_eq!(new.len(), old.len() + 1, "{dir}:\n{after}");
        assert_eq!(
            new[..old.len()],
            old[..],
            "{dir}: the primary's plugins changed"
        );
        assert_eq!(new[old.len()], entry().to_value(), "{dir}");

        let inserted = assert_one_insertion(&before, &after);
        // Written in the file's own style: kindnet indents with tabs, the others with spaces.
        if dir == "kindnet-ptp" {
            assert!(
                inserted.contains("\n\t\t\"type\": \"kubesg-cni\""),
                "{inserted:?}"
            );
        } else {
            assert!(!inserted.contains('\t'), "{dir}: {inserted:?}");
        }
        // Only the configuration file is there (no temporary files left).
        assert_eq!(
            snapshot(node.conf.path()).keys().collect::<Vec<_>>(),
            [name],
            "{dir}"
        );
    }
}

#[test]
fn installing_again_writes_nothing() {
    for (dir, name) in CONFLISTS {
        let node = Node::with(dir, name);
        node.installer.ensure_chained().expect("installing");
        let first = fs::metadata(node.file(name)).expect("metadata");
        let bytes = node.read(name);
        assert_eq!(
            node.installer.ensure_chained().expect("installing again"),
            Chained::Already(node.file(name)),
            "{dir}"
        );
        let second = fs::metadata(node.file(name)).expect("metadata");
        assert_eq!(second.ino(), first.ino(), "{dir}: the file was replaced");
        assert_eq!(second.mtime_nsec(), first.mtime_nsec(), "{dir}");
        assert_eq!(node.read(name), bytes, "{dir}");
    }
}

#[test]
fn uninstalling_restores_every_original_byte_for_byte() {
    for (dir, name) in CONFLISTS.into_iter().chain([SINGLE]) {
        let node = Node::with(dir, name);
        let before = snapshot(node.conf.path());
        node.installer.ensure_chained().expect("installing");
        assert_ne!(
            snapshot(node.conf.path()),
            before,
            "{dir}: nothing was installed"
        );
        let changed = node.installer.uninstall().expect("uninstalling");
        assert_eq!(changed, [node.file(name)], "{dir}");
        assert_eq!(snapshot(node.conf.path()), before, "{dir}");
        // Nothing left to remove.
        assert!(
            node.installer.uninstall().expect("again").is_empty(),
            "{dir}"
        );
    }
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist_and_the_original_waits_aside() {
    let (dir, name) = SINGLE;
    let node = Node::with(dir, name);
    let original = node.read(name);
    let conflist = "11-crio-ipv4-bridge.conflist";
    let aside = format!("{name}{ORIGINAL_SUFFIX}");

    let chained = node.installer.ensure_chained().expect("installing");
    assert_eq!(
        chained,
        Chained::Converted {
            original: node.file(name),
            conflist: node.file(conflist),
        }
    );
    // The runtime now loads the conflist; the .conf is out of its sight, kept as it was.
    assert_eq!(
        snapshot(node.conf.path()).keys().collect::<Vec<_>>(),
        [&aside, &conflist.to_owned()]
    );
    assert_eq!(node.read(&aside), original);
    let list: Value = serde_json::from_str(&node.read(conflist)).expect("JSON");
    let single: Value = serde_json::from_str(&original).expect("JSON");
    assert_eq!(list["cniVersion"], single["cniVersion"]);
    assert_eq!(list["name"], single["name"]);
    assert_eq!(list["plugins"][0], single);
    assert_eq!(list["plugins"][1], entry().to_value());
    assert_eq!(list["plugins"].as_array().map(Vec::len), Some(2));

    assert_eq!(
        node.installer.ensure_chained().expect("again"),
        Chained::Already(node.file(conflist))
    );

    // The primary writes its .conf again (a reinstall): it is converted again, and the newer
    // version is what uninstalling restores.
    let newer = original.replace("10.85.0.0/16", "10.86.0.0/16");
    node.write(name, &newer);
    assert!(matches!(
        node.installer.ensure_chained().expect("after the rewrite"),
        Chained::Converted { .. }
    ));
    assert!(node.read(conflist).contains("10.86.0.0/16"));
    node.installer.uninstall().expect("uninstalling");
    assert_eq!(
        snapshot(node.conf.path()),
        BTreeMap::from([(name.to_owned(), newer.into_bytes())])
    );
}

#[test]
fn a_network_at_cni_0_2_0_is_refused_and_left_untouched() {
    let node = Node::with("cni-readme-0.2.0", "10-mynet.conf");
    let before = snapshot(node.conf.path());
    let err = node
        .installer
        .ensure_chained()
        .expect_err("0.2.0 has no chaining");
    assert!(
        matches!(&err, InstallError::Conf { .. }) && err.to_string().contains("0.2.0"),
        "{err}"
    );
    assert_eq!(snapshot(node.conf.path()), before);
}

#[test]
fn a_half_written_file_is_left_for_the_next_pass() {
    let (dir, name) = CONFLISTS[2];
    let node = Node::new();
    let text = fixture(dir, name);
    node.write(name, &text[..text.len() / 2]);
    let err = node.installer.ensure_chained().expect_err("not JSON yet");
    assert!(matches!(err, InstallError::Conf { .. }), "{err}");
    assert_eq!(node.read(name), text[..text.len() / 2]);
    // Once the writer is done, the next pass chains it.
    node.write(name, &text);
    assert_eq!(
        node.installer.ensure_chained().expect("installing"),
        Chained::Inserted(node.file(name))
    );
}

#[test]
fn a_new_primary_network_takes_the_entry_and_the_old_one_gets_its_bytes_back() {
    let node = Node::with("flannel", "10-flannel.conflist");
    let flannel = node.read("10-flannel.conflist");
    node.installer.ensure_chained().expect("installing");
    // Calico is installed on the node and its file sorts first.
    let calico = fixture("calico", "10-calico.conflist").replace("k8s-pod-network", "calico");
    node.write("05-calico.conflist", &calico);
    assert_eq!(
        node.installer.ensure_chained().expect("installing"),
        Chained::Inserted(node.file("05-calico.conflist"))
    );
    assert_eq!(node.read("10-flannel.conflist"), flannel);
    assert_one_insertion(&calico, &node.read("05-calico.conflist"));
}

#[test]
fn the_files_mode_and_owner_are_kept() {
    let (dir, name) = CONFLISTS[0];
    let node = Node::with(dir, name);
    let path = node.file(name);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    std::os::unix::fs::chown(&path, Some(4321), Some(4322)).expect("chown (run the tests as root)");
    node.installer.ensure_chained().expect("installing");
    let meta = fs::metadata(&path).expect("metadata");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (4321, 4322));
}

#[test]
fn the_plugin_binary_is_copied_once_and_executable() {
    let node = Node::new();
    assert!(node.installer.install_binary().expect("installing"));
    let installed = node.installer.installed_binary();
    assert_eq!(
        fs::read(&installed).expect("installed"),
        fs::read(&node.installer.plugin_binary).expect("source")
    );
    assert_eq!(
        fs::metadata(&installed)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert!(!node.installer.install_binary().expect("again"));
    assert_eq!(
        snapshot(node.bin.path()).keys().collect::<Vec<_>>(),
        ["kubesg-cni"]
    );
}

#[test]
fn concurrent_rewrites_by_the_primary_are_never_lost() {
    let (dir, name) = CONFLISTS[1];
    let node = Node::with(dir, name);
    let template = fixture(dir, name);
    let version = |i: usize| template.replace("\"mtu\": 1500", &format!("\"mtu\": {}", 1000 + i));
    let done = AtomicBool::new(false);
    let last = 400;
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..=last {
                node.rewrite_by_rename(name, &version(i));
                if i % 8 == 0 {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        while !done.load(Ordering::SeqCst) {
            match node.installer.ensure_chained() {
                Ok(_) | Err(InstallError::Conflict(_)) => {}
                Err(e) => panic!("installing during rewrites: {e}"),
            }
        }
    });
    node.installer.ensure_chained().expect("installing");
    let want = insert_entry(&version(last), &entry())
        .expect("chainable")
        .expect("changed");
    assert_eq!(
        node.read(name),
        want,
        "the primary's last version was lost or not chained"
    );
}

/// Forks of this test process against the writing of an installed plugin. A child forked while
/// a thread holds the plugin's temporary file open for writing keeps that descriptor until it
/// execs, and running the plugin meanwhile fails with ETXTBSY ("Text file busy"; it did, 2 runs
/// in 30 of `scripts/flake-check.sh` with both cores busy). A runtime on a node runs the plugin
/// from another process, which inherits nothing of install-cni's: the race is this test
/// process's own, so the tests that fork take this lock shared and the plugin is written under
/// it exclusively.
static FORKS: RwLock<()> = RwLock::new(());

/// The installed-chain tests, one at a time: they fork (agent, plugins, `ip`) without taking
/// [`FORKS`], so two of them must not overlap.
static CHAINS: Mutex<()> = Mutex::new(());

/// Runs the real `kubesg-agent install-cni` on the node's directories with `args`.
fn spawn_install_cni(node: &Node, args: &[&str]) -> Child {
    let agent = &binaries().expect("building kubesg-agent").agent;
    let _fork = FORKS.read().unwrap_or_else(|p| p.into_inner());
    Command::new(agent)
        .arg("install-cni")
        .arg("--cni-conf-dir")
        .arg(node.conf.path())
        .arg("--cni-bin-dir")
        .arg(node.bin.path())
        .arg("--plugin-binary")
        .arg(&node.installer.plugin_binary)
        .args(["--poll-interval", "20"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kubesg-agent install-cni")
}

/// Kills and reaps a child on drop (a failed test leaves no process behind).
struct Reaped(Option<Child>);

impl Reaped {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::Output {
        let deadline = Instant::now() + within;
        while self.child().try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "install-cni did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0
            .take()
            .expect("child")
            .wait_with_output()
            .expect("output")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_watcher_puts_kubesg_back_after_the_primary_rewrites_and_takes_it_out_on_exit_when_told() {
    let (dir, name) = CONFLISTS[1];
    let node = Node::with(dir, name);
    let original = snapshot(node.conf.path());
    let text = node.read(name);
    let chained = |node: &Node| {
        plugins(&node.read(name))
            .last()
            .is_some_and(|p| *p == entry().to_value())
    };
    let mut watcher = Reaped(Some(spawn_install_cni(
        &node,
        &["--watch", "--uninstall-on-exit"],
    )));
    wait_for("the watcher chains kubesg", || chained(&node));
    // kindnetd writes its file again (it does whenever its inputs change).
    node.rewrite_by_rename(name, &text);
    wait_for("the watcher chains kubesg again", || chained(&node));
    assert_one_insertion(&text, &node.read(name));
    assert_eq!(
        fs::read(node.installer.installed_binary()).expect("installed plugin"),
        fs::read(&node.installer.plugin_binary).expect("plugin")
    );

    // SIGTERM (the pod is deleted by `helm uninstall`): the original file comes back.
    // SAFETY: plain kill(2) of our own, not yet reaped child.
    assert_eq!(
        unsafe { libc::kill(watcher.child().id() as i32, libc::SIGTERM) },
        0
    );
    let out = watcher.wait_exit(PATIENCE);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot(node.conf.path()), original);
}

#[test]
fn a_watcher_stopped_without_uninstall_leaves_the_chain_in_place() {
    let (dir, name) = CONFLISTS[2];
    let node = Node::with(dir, name);
    let mut watcher = Reaped(Some(spawn_install_cni(&node, &["--watch"])));
    wait_for("the watcher chains kubesg", || {
        plugins(&node.read(name)).len() == 3
    });
    // SAFETY: plain kill(2) of our own, not yet reaped child.
    assert_eq!(
        unsafe { libc::kill(watcher.child().id() as i32, libc::SIGTERM) },
        0
    );
    assert!(watcher.wait_exit(PATIENCE).status.success());
    // An agent upgrade must not open a window without kubesg in the chain.
    assert_eq!(plugins(&node.read(name))[2], entry().to_value());
}

#[test]
fn the_init_container_waits_for_the_primary_network_then_exits() {
    let node = Node::new();
    let mut init = Reaped(Some(spawn_install_cni(&node, &[])));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        init.child().try_wait().expect("try_wait").is_none(),
        "install-cni exited before any network configuration existed"
    );
    let (dir, name) = CONFLISTS[3];
    let text = fixture(dir, name);
    node.write(name, &text);
    let out = init.wait_exit(PATIENCE);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_one_insertion(&text, &node.read(name));
}

#[test]
fn the_init_container_fails_on_a_network_it_cannot_chain() {
    let node = Node::with("cni-readme-0.2.0", "10-mynet.conf");
    let out = Reaped(Some(spawn_install_cni(&node, &[]))).wait_exit(PATIENCE);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0.2.0"), "{stderr}");
}

/// Installs into the fixture, then runs the installed chain for real: the reference plugins of
/// the fixture (with their state redirected into the test's directories) and the installed
/// `kubesg-cni`, which registers the pod with a real agent.
fn installed_chain_runs_for_real(dir: &str, name: &str) {
    let _one_at_a_time = CHAINS.lock().unwrap_or_else(|p| p.into_inner());
    let node_ns = CniNode::new().expect("node namespace");
    let agent = AgentProcess::start(node_ns.name(), AgentConfig::new("node-a", Startup::Allow))
        .expect("starting kubesg-agent");
    let mut node = Node::with(dir, name);
    node.installer.plugin_binary = binaries().expect("binaries").cni.clone();
    node.installer.entry = ChainEntry {
        agent_socket: agent.socket().display().to_string(),
        timeout_seconds: 10,
    };
    {
        let _no_fork = FORKS.write().unwrap_or_else(|p| p.into_inner());
        node.installer
            .install_binary()
            .expect("installing the plugin");
    }
    let file = match node.installer.ensure_chained().expect("chaining") {
        Chained::Inserted(p) | Chained::Already(p) => p,
        Chained::Converted { conflist, .. } => conflist,
        Chained::NoNetwork => panic!("no network"),
    };

    // The installed copy is the plugin, and speaks the chain's version.
    let version = Command::new(node.installer.installed_binary())
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .expect("running the installed plugin");
    let version: Value = serde_json::from_slice(&version.stdout).expect("VERSION is JSON");
    let installed: Value =
        serde_json::from_str(&fs::read_to_string(&file).expect("reading")).expect("JSON");
    assert!(
        version["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&installed["cniVersion"])),
        "{version}"
    );

    // The list as the runtime loads it; host-local keeps its leases in the test's directory.
    let ipam_dir = TempDir::new();
    let mut plugins = installed["plugins"].as_array().expect("plugins").clone();
    for p in &mut plugins {
        if p.get("ipam").is_some() {
            p["ipam"]["dataDir"] = Value::from(ipam_dir.path().display().to_string());
        }
    }
    let list = NetworkList {
        name: installed["name"].as_str().expect("name").to_owned(),
        cni_version: installed["cniVersion"]
            .as_str()
            .expect("version")
            .to_owned(),
        plugins,
    };
    assert_eq!(list.plugin_type(list.plugins.len() - 1), "kubesg-cni");

    let pod = CniPod::new("shop", "web", pod_v4(5), pod_v6(5)).expect("pod namespace");
    let result = node_ns
        .runtime
        .add(&list, &pod.attachment)
        .unwrap_or_else(|e| {
            panic!(
                "{dir}: ADD through the installed chain: {e}\n{}",
                agent.log()
            )
        });
    assert!(
        result["ips"].as_array().is_some_and(|ips| !ips.is_empty()),
        "{dir}: {result}"
    );
    assert!(
        agent
            .knows_container(pod.container_id())
            .expect("ListEndpoints"),
        "{dir}: the agent did not register the pod\n{}",
        agent.log()
    );
    node_ns
        .runtime
        .del(&list, &pod.attachment)
        .unwrap_or_else(|e| panic!("{dir}: DEL: {e}"));
    assert!(!agent
        .knows_container(pod.container_id())
        .expect("ListEndpoints"));
    drop(node);
}

#[test]
fn kindnets_ptp_chain_runs_for_real_with_kubesg_installed() {
    kubesg_testkit::require_privileged!();
    installed_chain_runs_for_real("kindnet-ptp", "10-kindnet.conflist");
}

#[test]
fn containerds_bridge_chain_runs_for_real_with_kubesg_installed() {
    kubesg_testkit::require_privileged!();
    installed_chain_runs_for_real("containerd-bridge", "10-containerd-net.conflist");
}

#[test]
fn a_converted_single_bridge_conf_runs_for_real_with_kubesg_installed() {
    kubesg_testkit::require_privileged!();
    installed_chain_runs_for_real(SINGLE.0, SINGLE.1);
}
