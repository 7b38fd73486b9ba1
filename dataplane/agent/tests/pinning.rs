//! Pinned datapath: maps and attachments outlive the agent, a restarted agent reuses them, and the
//! CLI reads the pinned maps. tcx (this kernel's default) and clsact (older kernels) both. A map
//! pinned by a build with another layout is replaced rather than reused, and the conntrack table
//! of the layout before window tracking is carried over.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use aya::maps::{HashMap, IterableMap as _, Map, MapData, MapInfo};
use kubesg_agent::{
    attach::{link_pin_path, AttachMode, Hook},
    conntrack,
    datapath::{Datapath, DatapathOptions},
    maps::{map_pin_path, names},
    policy::{CompiledPolicy, Protocol},
};
use kubesg_common::{
    config::Config,
    conntrack::{CtEntry, CtEntryV1, CtKey, TcpState, CT_F_ASSURED},
    window::{SIDE_BE_LIBERAL, SIDE_SACK_PERM},
};
use kubesg_testkit::{
    iperf,
    node::TestNode,
    pins::{pin_foreign_array, pin_foreign_map, PinDir, BPF_MAP_TYPE_LRU_HASH},
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

/// The seed's client (192.168.1.5, `pods[0]`) and server (192.168.1.7, `pods[1]`) under a
/// datapath pinned in a directory of its own, with a TCP connection from the client to the
/// server's port 23 that has carried data.
struct Seeded {
    pins: PinDir,
    node: TestNode,
    dp: Datapath,
    client: TcpStream,
    server: TcpStream,
    /// The server's listener on 23, and the client's on 22: the client listens too, so a refused
    /// connection back is kubesg's doing, not a closed port.
    listeners: [TcpListener; 2],
}

fn seeded(mode: AttachMode) -> Seeded {
    let pins = PinDir::new();
    let node = client_and_server();
    let (ci, si) = (node.pods[0].host_ifindex, node.pods[1].host_ifindex);
    let (client_policy, server_policy) = seed_policies();

    let mut dp = Datapath::load(&opts(pins.path(), mode)).expect("load");
    let ch = dp.install_policy(&client_policy).expect("client policy");
    let sh = dp.install_policy(&server_policy).expect("server policy");
    dp.set_endpoint(ci, Some(ch)).expect("client endpoint");
    dp.set_endpoint(si, Some(sh)).expect("server endpoint");
    node.ns
        .enter(|| dp.attach(ci).and_then(|()| dp.attach(si)))
        .expect("attach");

    let listener = node.pods[1]
        .ns
        .enter(|| TcpListener::bind("0.0.0.0:23"))
        .expect("listen");
    let back_listener = node.pods[0]
        .ns
        .enter(|| TcpListener::bind("0.0.0.0:22"))
        .expect("listen on the client");
    let mut client = node.pods[0]
        .ns
        .enter(|| {
            TcpStream::connect_timeout(
                &"192.168.1.7:23".parse().expect("addr"),
                Duration::from_secs(2),
            )
        })
        .expect("the seed's connection opens");
    let (mut server, _) = listener.accept().expect("accept");
    echo(&mut client, &mut server, b"before").expect("data before");
    Seeded {
        pins,
        node,
        dp,
        client,
        server,
        listeners: [listener, back_listener],
    }
}

fn restart_keeps_connections_and_enforcement(mode: AttachMode) {
    let Seeded {
        pins,
        node,
        dp,
        mut client,
        mut server,
        listeners,
    } = seeded(mode);
    let (c, s) = (0, 1);
    let (ci, si) = (node.pods[c].host_ifindex, node.pods[s].host_ifindex);

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
    drop(listeners);
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

/// What an upgrade over a pinned conntrack table of `old_value_size` bytes per entry does to a
/// TCP connection the older build tracked: the older build is played by this build's programs
/// (they keep running on the pinned links with the table they were loaded with) while the pin
/// is swapped for a table of the older layout holding the same connections, as the older build
/// would have left it (for the 24-byte layout and for the LRU table of this build's entries; any
/// other is left empty).
struct Upgrade {
    node: TestNode,
    pins: PinDir,
    client: TcpStream,
    server: TcpStream,
    /// The older table of the 24-byte layout, held open past the load that unpins it.
    old: Option<HashMap<MapData, CtKey, CtEntryV1>>,
    /// The older LRU table of this build's entries, held open likewise.
    old_lru: Option<HashMap<MapData, CtKey, CtEntry>>,
    /// How many connections the older table held.
    held: usize,
    _listeners: [TcpListener; 2],
}

impl Upgrade {
    fn from_layout(old_value_size: usize) -> Upgrade {
        Upgrade::swap(seeded(AttachMode::Tcx), old_value_size)
    }

    /// The older build leaves the seeded datapath's programs running and its table pinned in
    /// the older layout, holding what the seeded table holds now.
    fn swap(seeded: Seeded, old_value_size: usize) -> Upgrade {
        let Seeded {
            pins,
            node,
            dp,
            client,
            server,
            listeners,
        } = seeded;
        let dir = pins.path();
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("read timeout");
        }
        let tracked: Vec<_> = conntrack::list(dp.maps()).expect("list");
        drop(dp);

        let path = map_pin_path(dir, names::CONNTRACK);
        std::fs::remove_file(&path).expect("unpinning CONNTRACK");
        pin_foreign_map(
            &path,
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<CtKey>() as u32,
            old_value_size as u32,
            4096,
        )
        .expect("pinning the older table");
        let mut held = 0;
        let old = (old_value_size == size_of::<CtEntryV1>()).then(|| {
            let data = MapData::from_pin(&path).expect("opening the older table");
            let mut old: HashMap<MapData, CtKey, CtEntryV1> =
                HashMap::try_from(Map::LruHashMap(data)).expect("typed");
            for t in &tracked {
                let e = t.entry;
                let v1 = CtEntryV1 {
                    expires_ns: e.expires_ns,
                    created_ns: e.created_ns,
                    policy_id: e.policy_id,
                    state: e.state,
                    flags: e.flags,
                    _pad: [0; 2],
                };
                old.insert(t.key, v1, 0).expect("filling the older table");
                held += 1;
            }
            old
        });
        let old_lru = (old_value_size == size_of::<CtEntry>()).then(|| {
            let data = MapData::from_pin(&path).expect("opening the older table");
            let mut old: HashMap<MapData, CtKey, CtEntry> =
                HashMap::try_from(Map::LruHashMap(data)).expect("typed");
            for t in &tracked {
                old.insert(t.key, t.entry, 0)
                    .expect("filling the older table");
                held += 1;
            }
            old
        });
        Upgrade {
            node,
            pins,
            client,
            server,
            old,
            old_lru,
            held,
            _listeners: listeners,
        }
    }

    fn ifindexes(&self) -> (u32, u32) {
        (
            self.node.pods[0].host_ifindex,
            self.node.pods[1].host_ifindex,
        )
    }

    /// The client's tracked connection (to the server's port 23) in `dp`'s table.
    fn client_connection(&self, dp: &Datapath) -> conntrack::Connection {
        let (ci, _) = self.ifindexes();
        conntrack::list(dp.maps())
            .expect("list")
            .into_iter()
            .find(|x| x.key.ifindex == ci && x.key.peer_port == 23)
            .expect("the client's connection is in the new table")
    }

    /// After the upgrade the connection carries data both ways, the new programs learn both
    /// windows from those segments, and the server still cannot connect back.
    #[track_caller]
    fn assert_flows_both_ways_and_not_back(&mut self, dp: &Datapath) {
        echo(&mut self.client, &mut self.server, b"after").expect("data after the upgrade");
        echo(&mut self.server, &mut self.client, b"reply").expect("reply after the upgrade");
        let learnt = self.client_connection(dp).entry;
        assert!(
            learnt.seen.iter().all(|s| s.td_maxwin != 0),
            "both windows learnt from the segments since: {:?}",
            learnt.seen
        );
        let back = self.node.pods[1].ns.enter(|| {
            TcpStream::connect_timeout(
                &"192.168.1.5:22".parse().expect("addr"),
                Duration::from_millis(500),
            )
        });
        assert!(
            back.is_err(),
            "the way back stays refused after the upgrade"
        );
    }

    /// The upgraded agent loads and puts its programs on both interfaces.
    fn load(&self) -> Datapath {
        let mut dp = Datapath::load(&opts(self.pins.path(), AttachMode::Tcx)).expect("upgrade");
        let (ci, si) = self.ifindexes();
        self.node
            .ns
            .enter(|| dp.attach(ci).and_then(|()| dp.attach(si)))
            .expect("re-attach");
        dp
    }
}

/// An upgrade from the build before TCP window tracking (24-byte entries) carries the tracked
/// connections over: the connection keeps flowing both ways, its entry is ESTABLISHED with
/// liberal windows that the next segments fill in, the way back stays refused, and entries the
/// older programs create after the first copy arrive with the second without overwriting what
/// the new programs wrote.
#[test]
fn an_upgrade_from_the_layout_before_window_tracking_keeps_tcp_connections() {
    require_privileged!();
    let mut up = Upgrade::from_layout(size_of::<CtEntryV1>());
    assert!(up.held >= 1, "the older table holds the connection");
    let mut dp = up.load();
    let migrated = up.client_connection(&dp);
    assert_eq!(migrated.entry.state, TcpState::Established as u8);
    assert_ne!(migrated.entry.flags & CT_F_ASSURED, 0);
    assert_counted(&dp, &up);
    for side in migrated.entry.seen {
        assert_eq!(side.flags, SIDE_BE_LIBERAL | SIDE_SACK_PERM);
    }

    // The older programs go on creating entries until the interfaces run the new ones: the
    // second pass adds what the new table lacks and keeps what it has.
    let late = late_key(4242);
    let late_entry = CtEntryV1 {
        expires_ns: u64::MAX,
        state: 0,
        ..CtEntryV1::default()
    };
    let old = up.old.as_mut().expect("the older table");
    old.insert(late, late_entry, 0).expect("a late entry");
    let stale = CtEntryV1 {
        expires_ns: 1,
        state: TcpState::Close as u8,
        ..CtEntryV1::default()
    };
    old.insert(migrated.key, stale, 0).expect("a stale copy");
    let second = dp
        .finish_conntrack_migration()
        .expect("a pending migration");
    assert_eq!(
        (second.copied, second.kept, second.failed),
        (1, up.held, 0),
        "{second:?}"
    );
    assert!(
        dp.finish_conntrack_migration().is_none(),
        "the older table is released"
    );
    assert_eq!(
        dp.maps()
            .conntrack
            .get(&late, 0)
            .expect("the late entry")
            .expires_ns,
        u64::MAX
    );
    assert_eq!(
        up.client_connection(&dp).entry.state,
        TcpState::Established as u8,
        "the second pass keeps what the new table has"
    );

    up.assert_flows_both_ways_and_not_back(&dp);
}

/// A UDP entry the older programs create after the first copy (a DNS query of the client's).
fn late_key(ifindex: u32) -> CtKey {
    CtKey {
        ifindex,
        family: kubesg_common::AF_INET,
        proto: 17,
        pod_port: 5353,
        peer_port: 53,
        ..CtKey::default()
    }
}

/// Every endpoint's entry count is what the table holds for it (the limit checks the count).
#[track_caller]
fn assert_counted(dp: &Datapath, up: &Upgrade) {
    let entries = conntrack::list(dp.maps()).expect("list");
    for (name, ifindex) in ["client", "server"]
        .into_iter()
        .zip([up.ifindexes().0, up.ifindexes().1])
    {
        let n = entries.iter().filter(|c| c.key.ifindex == ifindex).count() as i64;
        assert!(n >= 1, "the {name}'s connection was carried over");
        assert_eq!(
            dp.conntrack_held(ifindex).expect("reading CT_COUNTS"),
            Some(n),
            "the {name}'s entries are counted"
        );
    }
}

/// An upgrade from the builds whose table was an LRU (which evicted live connections under
/// pressure) to the table that evicts nothing carries the connections over as they were, window
/// state included, counts them against their endpoints' limits, and copies what the older
/// programs open before the interfaces run the new ones.
#[test]
fn an_upgrade_from_the_lru_table_keeps_tcp_connections_and_counts_them() {
    require_privileged!();
    let mut up = Upgrade::from_layout(size_of::<CtEntry>());
    assert!(up.held >= 1, "the older table holds the connection");
    let (ci, _) = up.ifindexes();
    let before: Vec<_> = up
        .old_lru
        .as_ref()
        .expect("the older table")
        .iter()
        .collect::<Result<_, _>>()
        .expect("reading the older table");
    let mut dp = up.load();
    let info = dp
        .maps()
        .conntrack
        .map()
        .info()
        .expect("the new table's info");
    assert!(
        matches!(info.map_type(), Ok(aya::maps::MapType::Hash)),
        "the new table is a plain hash: {:?}",
        info.map_type()
    );
    for (key, entry) in &before {
        let now = dp.maps().conntrack.get(key, 0).expect("carried over");
        assert_eq!(
            (now.state, now.flags, now.policy_id, now.expires_ns),
            (entry.state, entry.flags, entry.policy_id, entry.expires_ns),
            "carried over as it was"
        );
        if key.proto == kubesg_common::proto::TCP {
            assert!(
                now.seen.iter().all(|s| s.td_maxwin == 0),
                "windows to be learnt again from the next segments: {:?}",
                now.seen
            );
        }
    }
    assert_counted(&dp, &up);
    let held = dp.conntrack_held(ci).expect("reading").expect("counted");

    // What the older programs open before the new ones take the interfaces is copied and
    // counted on the second pass.
    let late = late_key(ci);
    let late_entry = CtEntry {
        expires_ns: u64::MAX,
        ..CtEntry::default()
    };
    let old = up.old_lru.as_mut().expect("the older table");
    old.insert(late, late_entry, 0).expect("a late entry");
    let second = dp
        .finish_conntrack_migration()
        .expect("a pending migration");
    assert_eq!(
        (second.copied, second.kept, second.failed),
        (1, up.held, 0),
        "{second:?}"
    );
    assert_eq!(dp.conntrack_held(ci).expect("reading"), Some(held + 1));

    up.assert_flows_both_ways_and_not_back(&dp);
}

/// An iperf3 stream (100 Mbit/s) between the two pods across the upgrade from the LRU table:
/// it never stops and none of its segments is refused. The migrated copy of its entry is stale
/// by the time the new programs run (and under load the first segment they see may be a
/// retransmission), so its windows are learnt again, liberally, from the next segments.
#[test]
fn an_upgrade_from_the_lru_table_keeps_a_running_iperf3_stream() {
    require_privileged!();
    const SECONDS: u64 = 8;
    let mut seeded = seeded(AttachMode::Tcx);
    // iperf3 takes the seed's port 23 (the only one the rules open).
    let replacement = TcpListener::bind("127.0.0.1:0").expect("a placeholder");
    drop(std::mem::replace(&mut seeded.listeners[0], replacement));
    let server_addr = IpAddr::V4(seeded.node.pods[1].ipv4);
    let _server = iperf::server(&seeded.node.pods[1].ns, server_addr, 23);
    let started = std::time::Instant::now();
    let mut client = iperf::client(
        &seeded.node.pods[0].ns,
        server_addr,
        23,
        SECONDS,
        Some("100M"),
    );
    // Mid-stream: the older build's table is swapped in and the new build loads over it.
    std::thread::sleep(Duration::from_millis(1500));
    let up = Upgrade::swap(seeded, size_of::<CtEntry>());
    let mut dp = up.load();
    let upgraded = started.elapsed().as_secs_f64();
    if let Some(out) = client.ended() {
        panic!("the stream ended before the upgrade was done: {out}");
    }
    dp.finish_conntrack_migration()
        .expect("a pending migration");
    for i in client.intervals() {
        assert!(
            iperf::bytes(&i) > 0,
            "an interval without data (upgraded at {upgraded:.2} s): {}",
            i["sum"]
        );
    }
    let (ci, si) = up.ifindexes();
    for (who, ifindex) in [("client", ci), ("server", si)] {
        let c = dp.counters(ifindex).expect("counters").expect("endpoint");
        assert_eq!(
            c[0].dropped_invalid + c[1].dropped_invalid,
            0,
            "the new programs refused none of the {who}'s segments"
        );
    }
    drop(dp);
}

/// The other side of the upgrade tests above: a conntrack layout this build does not know is replaced
/// with its entries lost, and the connection it tracked is cut (its next segment has no entry
/// and is INVALID), which is what the migration prevents.
#[test]
fn an_upgrade_from_an_unknown_conntrack_layout_loses_the_connections() {
    require_privileged!();
    let mut up = Upgrade::from_layout(16);
    let mut dp = up.load();
    assert!(
        dp.finish_conntrack_migration().is_none(),
        "nothing to carry over"
    );
    assert_eq!(dp.maps().conntrack.keys().count(), 0, "a new, empty table");
    assert!(
        echo(&mut up.client, &mut up.server, b"after").is_err(),
        "the connection's segments are dropped"
    );
}
