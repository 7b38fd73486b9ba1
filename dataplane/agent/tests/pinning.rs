//! Pinned datapath: maps and attachments outlive the agent, a restarted agent reuses them, and the
//! CLI reads the pinned maps. tcx (this kernel's default) and clsact (older kernels) both. A map
//! pinned by a build with another layout is replaced rather than reused.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use aya::maps::MapInfo;
use kubesg_agent::{
    attach::{link_pin_path, AttachMode, Hook},
    conntrack,
    datapath::{Datapath, DatapathOptions},
    maps::{map_pin_path, names},
    policy::{CompiledPolicy, Protocol},
};
use kubesg_common::config::Config;
use kubesg_testkit::{
    pins::{pin_foreign_array, PinDir},
    pods::client_and_server,
    require_privileged,
    rules::{cidr, egress, ingress, port, rule_with},
};

fn opts(dir: &Path, mode: AttachMode) -> DatapathOptions {
    DatapathOptions {
        pin_dir: Some(dir.to_path_buf()),
        attach_mode: Some(mode),
        ..DatapathOptions::default()
    }
}

/// Client 192.168.1.5 may open TCP to 192.168.1.7:23; the server accepts it from the client.
fn seed_policies() -> (CompiledPolicy, CompiledPolicy) {
    let tcp_23 = |peer: &str| rule_with(Protocol::Tcp, vec![port(23)], vec![cidr(peer)]);
    let client = egress(vec![tcp_23("192.168.1.7/32")]);
    let server = ingress(vec![tcp_23("192.168.1.5/32")]);
    (client, server)
}

fn echo(stream: &mut TcpStream, peer: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    stream.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    peer.read_exact(&mut buf)?;
    assert_eq!(buf, msg);
    Ok(())
}

fn restart_keeps_connections_and_enforcement(mode: AttachMode) {
    let pins = PinDir::new();
    // The seed's client (192.168.1.5, pods[0]) and server (192.168.1.7, pods[1]).
    let node = client_and_server();
    let (c, s) = (0, 1);
    let (ci, si) = (node.pods[c].host_ifindex, node.pods[s].host_ifindex);
    let (client_policy, server_policy) = seed_policies();

    let mut dp = Datapath::load(&opts(pins.path(), mode)).expect("load");
    let ch = dp.install_policy(&client_policy).expect("client policy");
    let sh = dp.install_policy(&server_policy).expect("server policy");
    dp.set_endpoint(ci, Some(ch)).expect("client endpoint");
    dp.set_endpoint(si, Some(sh)).expect("server endpoint");
    node.ns
        .enter(|| dp.attach(ci).and_then(|()| dp.attach(si)))
        .expect("attach");

    let listener = node.pods[s]
        .ns
        .enter(|| TcpListener::bind("0.0.0.0:23"))
        .expect("listen");
    // The client listens too, so a refused connection back is kubesg's doing, not a closed port.
    let back_listener = node.pods[c]
        .ns
        .enter(|| TcpListener::bind("0.0.0.0:22"))
        .expect("listen on the client");
    let mut client = node.pods[c]
        .ns
        .enter(|| {
            TcpStream::connect_timeout(
                &"192.168.1.7:23".parse().expect("addr"),
                Duration::from_secs(2),
            )
        })
        .expect("the seed's connection opens");
    let (mut server, _) = listener.accept().expect("accept");
    echo(&mut client, &mut server, b"before").expect("data before restart");

    // The agent goes away: programs, links and maps stay.
    drop(dp);
    echo(&mut client, &mut server, b"agent down").expect("data while the agent is down");
    let back = node.pods[s].ns.enter(|| {
        TcpStream::connect_timeout(
            &"192.168.1.5:22".parse().expect("addr"),
            Duration::from_millis(500),
        )
    });
    assert!(
        back.is_err(),
        "the server's connection back to the client must stay refused while the agent is down"
    );

    // The agent comes back: it reuses the pinned maps and takes the links over.
    let mut dp = Datapath::load(&opts(pins.path(), mode)).expect("reload");
    let before = conntrack::list(dp.maps()).expect("list");
    assert!(
        before
            .iter()
            .any(|x| x.key.ifindex == ci && x.key.peer_port == 23),
        "the client's connection survived the restart in the pinned table"
    );
    node.ns
        .enter(|| dp.attach(ci).and_then(|()| dp.attach(si)))
        .expect("re-attach");
    echo(&mut client, &mut server, b"after").expect("data after restart");
    echo(&mut server, &mut client, b"reply").expect("reply after restart");
    if mode == AttachMode::Tcx {
        for hook in Hook::ALL {
            assert!(link_pin_path(pins.path(), ci, hook).exists());
        }
    }
    let back = node.pods[s].ns.enter(|| {
        TcpStream::connect_timeout(
            &"192.168.1.5:22".parse().expect("addr"),
            Duration::from_millis(500),
        )
    });
    assert!(back.is_err(), "still refused after the restart");

    // The CLI reads the same pinned table.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubesg-agent"))
        .args([
            "--pin-dir",
            &pins.path().to_string_lossy(),
            "ct",
            "list",
            "--ifindex",
        ])
        .arg(ci.to_string())
        .output()
        .expect("run kubesg-agent");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ct list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines().any(|l| l.starts_with("ipv4     2 tcp      6 ")
            && l.contains(" ESTABLISHED src=192.168.1.5 dst=192.168.1.7 ")
            && l.contains(" dport=23 ")
            && l.contains("[ASSURED]")),
        "ct list shows the connection: {text}"
    );

    // The CLI changes a timeout in the running datapath.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubesg-agent"))
        .args([
            "--pin-dir",
            &pins.path().to_string_lossy(),
            "ct",
            "timeouts",
        ])
        .args(["--set", "tcp_timeout_established=3600"])
        .output()
        .expect("run kubesg-agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["tcp_timeout_established", "3600"]));
    assert_eq!(
        dp.config().expect("config").timeouts_ns[3],
        3_600_000_000_000,
        "the datapath sees the new ESTABLISHED timeout"
    );

    node.ns
        .enter(|| dp.detach(ci).and_then(|()| dp.detach(si)))
        .expect("detach");
    for hook in Hook::ALL {
        assert!(!link_pin_path(pins.path(), ci, hook).exists());
    }
    // Detached: nothing judges the server's connection back any more.
    let back = node.pods[s].ns.enter(|| {
        TcpStream::connect_timeout(
            &"192.168.1.5:22".parse().expect("addr"),
            Duration::from_secs(2),
        )
    });
    assert!(back.is_ok(), "after detach the connection back opens");
    drop(back_listener);
}

#[test]
fn restarted_agent_reuses_pinned_tcx_links_and_maps() {
    require_privileged!();
    restart_keeps_connections_and_enforcement(AttachMode::Tcx);
}

#[test]
fn restarted_agent_replaces_its_clsact_filters_and_reuses_maps() {
    require_privileged!();
    restart_keeps_connections_and_enforcement(AttachMode::Clsact);
}

#[test]
fn cli_reports_a_missing_datapath_clearly() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubesg-agent"))
        .args(["--pin-dir", "/nonexistent/kubesg", "ct", "list"])
        .output()
        .expect("run kubesg-agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the datapath is not loaded"), "{err}");
}

/// A map pinned by another build with another layout (here CONFIG with 8-byte values) is
/// replaced at load, where aya alone would hand it to programs that read past its values; the
/// maps that fit are reused as they are.
#[test]
fn a_pinned_map_of_another_layout_is_replaced_and_the_others_reused() {
    require_privileged!();
    let pins = PinDir::new();
    let dir = pins.path();
    let conntrack_id = {
        let dp = Datapath::load(&opts(dir, AttachMode::Tcx)).expect("first load");
        drop(dp);
        MapInfo::from_pin(map_pin_path(dir, names::CONNTRACK))
            .expect("pinned CONNTRACK")
            .id()
    };
    let config = map_pin_path(dir, names::CONFIG);
    std::fs::remove_file(&config).expect("unpinning CONFIG");
    pin_foreign_array(&config, 8).expect("pinning a CONFIG of another layout");

    let dp = Datapath::load(&opts(dir, AttachMode::Tcx)).expect("load over the foreign pin");
    let pinned = MapInfo::from_pin(&config).expect("CONFIG pinned again");
    assert_eq!(pinned.value_size() as usize, std::mem::size_of::<Config>());
    assert_eq!(
        dp.config().expect("reading the settings").flags,
        Config::defaults().flags
    );
    let reused = MapInfo::from_pin(map_pin_path(dir, names::CONNTRACK)).expect("CONNTRACK");
    assert_eq!(
        reused.id(),
        conntrack_id,
        "a fitting map is reused, not recreated"
    );
}

/// An agent upgraded from a build without layers: its pins lack `POLICY_LAYERS`, which the load
/// creates and pins, while CONNTRACK and ENDPOINTS (whose layouts did not change) are reused as
/// they are, entries and all; the new build's layered policies then work over them.
#[test]
fn an_upgrade_to_layers_adds_their_map_and_keeps_conntrack_and_endpoints() {
    require_privileged!();
    let pins = PinDir::new();
    let dir = pins.path();
    let ids =
        |names: [&str; 2]| names.map(|n| MapInfo::from_pin(map_pin_path(dir, n)).map(|i| i.id()));
    let before = {
        let mut dp = Datapath::load(&opts(dir, AttachMode::Tcx)).expect("first load");
        let (client, _) = seed_policies();
        let h = dp.install_policy(&client).expect("policy");
        dp.set_endpoint(42, Some(h)).expect("endpoint");
        ids([names::CONNTRACK, names::ENDPOINTS]).map(|r| r.expect("pinned"))
    };
    // What the older build left: every map but POLICY_LAYERS.
    std::fs::remove_file(map_pin_path(dir, names::POLICY_LAYERS)).expect("unpinning");

    let mut dp = Datapath::load(&opts(dir, AttachMode::Tcx)).expect("load after the upgrade");
    assert_eq!(
        ids([names::CONNTRACK, names::ENDPOINTS]).map(|r| r.expect("pinned")),
        before,
        "CONNTRACK and ENDPOINTS are reused, not recreated"
    );
    assert!(
        dp.endpoint(42).expect("reading").is_some(),
        "the endpoint survived"
    );
    assert!(
        map_pin_path(dir, names::POLICY_LAYERS).exists(),
        "POLICY_LAYERS pinned"
    );
    let layered = kubesg_testkit::rules::layered(
        vec![],
        vec![kubesg_agent::policy::Layer::NetworkPolicies],
        vec![],
        vec![],
    );
    let h = dp
        .install_policy(&layered)
        .expect("a layered policy over the old pins");
    dp.set_endpoint(42, Some(h))
        .expect("switching the endpoint");
    assert_eq!(
        dp.maps().layers.keys().count(),
        2,
        "one entry per direction"
    );
}
