//! kubesg's conntrack table against the kernel's own, on the same traffic.
//!
//! The same client (192.168.1.5 / fd00::5) and server (192.168.1.7 / fd00::7) exchange the same
//! traffic twice, from the same fixed client ports: once on a node where kubesg's programs sit on
//! the pods' interfaces, once on a node without them where the client namespace runs the kernel's
//! conntrack (`iptables -m conntrack` in OUTPUT, `nf_conntrack_tcp_loose=0`). kubesg's entries of
//! the client endpoint, as `kubesg-agent ct list --ifindex` prints them from the pinned datapath
//! in `/proc/net/nf_conntrack`'s format, must then read as the
//! client namespace's `/proc/net/nf_conntrack`: the same states, tuples, `[UNREPLIED]` and
//! `[ASSURED]`; only the remaining timeout may differ by a second or two and the `use=` count
//! (a kernel reference count) is ignored.

use std::{
    io::{ErrorKind, Read},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use kubesg_agent::policy::CompiledPolicy;
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    netns::{abort, accept_within, read_within, RecvWithin},
    node::TestPod,
    pods::{client_and_server, close_from, exchange, Pods, Who, ARRIVES},
    rules::allow_all,
};

/// The server's TCP ports: one listening, one nothing listens on, one whose SYNs the server's
/// firewall drops.
const TCP_OPEN: u16 = 8080;
const TCP_CLOSED: u16 = 8081;
const TCP_DROPPED: u16 = 8082;
/// The client's listening port, for connections opened towards it.
const CLIENT_PORT: u16 = 7070;
/// The server's UDP ports: one that answers, one that stays silent, one nothing listens on.
const UDP_ECHO: u16 = 5353;
const UDP_SILENT: u16 = 5354;
const UDP_CLOSED: u16 = 5355;
/// The ICMP echo identifier.
const ECHO_ID: u16 = 0x4b53;
/// How far the remaining-timeout columns of the two tables may differ, in seconds: the two
/// snapshots are taken a moment apart and each side rounds down.
const TIMEOUT_TOLERANCE: i64 = 2;

/// What must stay open until the tables are read (connections that are not closed).
#[derive(Default)]
struct Open {
    _listeners: Vec<TcpListener>,
    _conns: Vec<TcpStream>,
    _udp: Vec<UdpSocket>,
}

/// Traffic run identically on both nodes.
type Driver = fn(&TestPod, &TestPod, bool) -> Open;

/// A connection from `client`'s port `from` to `to`, accepted on `listener`, that carried data
/// both ways: (client side, server side).
fn open_from(
    client: &TestPod,
    from: u16,
    to: SocketAddr,
    listener: &TcpListener,
) -> (TcpStream, TcpStream) {
    let mut c = client
        .tcp_connect_from(from, to, ARRIVES)
        .unwrap_or_else(|e| panic!("connecting from port {from}: {e}"));
    let mut s = accept_within(listener, ARRIVES).expect("accepting");
    exchange(&mut c, &mut s).expect("exchanging");
    (c, s)
}

/// The traffic, from fixed client ports so that both tables carry the same tuples.
fn drive(client: &TestPod, server: &TestPod, v6: bool) -> Open {
    let listener = server.tcp_listen(v6, TCP_OPEN).expect("listening");
    let to = server.sockaddr(v6, TCP_OPEN);

    // A complete short exchange, closed by the client first: TIME_WAIT.
    let (c, s) = open_from(client, 41001, to, &listener);
    close_from(c, s);

    // A connection that stays ESTABLISHED.
    let (est_c, est_s) = open_from(client, 41002, to, &listener);

    // A short exchange closed by the server first: TIME_WAIT too, through CLOSE_WAIT and
    // LAST_ACK.
    let (c, s) = open_from(client, 41007, to, &listener);
    close_from(s, c);

    // A connection reopened by a SYN from the same port while its flow is in TIME_WAIT
    // (the server closed first, so the client's socket is gone).
    let (c, s) = open_from(client, 41013, to, &listener);
    close_from(s, c);
    // Let the server's last ACK reach the client's side before the new SYN leaves.
    std::thread::sleep(Duration::from_millis(100));
    let (re_c, re_s) = open_from(client, 41013, to, &listener);

    // A connection half-closed by the client, the server's side still open.
    let (half_c, mut half_s) = open_from(client, 41008, to, &listener);
    half_c
        .shutdown(Shutdown::Write)
        .expect("closing the client's side");
    half_s
        .read_to_end(&mut Vec::new())
        .expect("the server sees the FIN");

    // A connection aborted by the client's RST: CLOSE.
    let (c, s) = open_from(client, 41009, to, &listener);
    abort(c).expect("aborting");
    match read_within(&s, &mut [0u8; 4]) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the server must see the RST, got {other:?}"),
    }
    drop(s);

    // A connection refused by RST.
    match client.tcp_connect_from(41003, server.sockaddr(v6, TCP_CLOSED), ARRIVES) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("the closed port must answer RST, got {other:?}"),
    }

    let mut buf = [0u8; 16];
    // A replied UDP exchange.
    let echo = server.udp_bind(v6, UDP_ECHO, ARRIVES).expect("UDP echo");
    let u = client.udp_bind(v6, 41004, ARRIVES).expect("UDP client");
    u.send_to(b"query", server.sockaddr(v6, UDP_ECHO))
        .expect("sending");
    let (_, from) = echo.recv_from_within(&mut buf).expect("the query arrives");
    echo.send_to(b"answer", from).expect("answering");
    u.recv_within(&mut buf).expect("the answer arrives");

    // An unreplied UDP datagram to a silent socket.
    let silent = server.udp_bind(v6, UDP_SILENT, ARRIVES).expect("UDP sink");
    let u2 = client.udp_bind(v6, 41005, ARRIVES).expect("UDP client");
    u2.send_to(b"hello?", server.sockaddr(v6, UDP_SILENT))
        .expect("sending");
    silent.recv_within(&mut buf).expect("the datagram arrives");

    // An unreplied UDP datagram to a closed port: the port unreachable is RELATED, no reply.
    let u3 = client.udp_bind(v6, 41006, ARRIVES).expect("UDP client");
    u3.connect(server.sockaddr(v6, UDP_CLOSED))
        .expect("connecting");
    u3.send(b"anyone?").expect("sending");
    match u3.recv_within(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("expected the port unreachable, got {other:?}"),
    }

    // A SYN nobody answers (the server's own firewall drops it): SYN_SENT, [UNREPLIED].
    let dport = TCP_DROPPED.to_string();
    for ipv6 in [false, true] {
        server
            .firewall_input(ipv6, &["-p", "tcp", "--dport", &dport, "-j", "DROP"])
            .expect("dropping SYNs on the server");
    }
    let short = Duration::from_millis(300);
    match client.tcp_connect_from(41010, server.sockaddr(v6, TCP_DROPPED), short) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!("the SYN must go unanswered, got {other:?}"),
    }

    // An ICMP echo.
    assert!(
        client
            .ping_id(server.addr(v6), ECHO_ID, ARRIVES)
            .expect("running ping"),
        "the echo is answered"
    );

    // Connections opened towards the client: their original tuple starts at the server.
    let inbound = client
        .tcp_listen(v6, CLIENT_PORT)
        .expect("client listening");
    let mut in_s = server
        .tcp_connect_from(42001, client.sockaddr(v6, CLIENT_PORT), ARRIVES)
        .expect("the server connecting to the client");
    let mut in_c = accept_within(&inbound, ARRIVES).expect("the client accepting");
    exchange(&mut in_s, &mut in_c).expect("exchanging");
    assert!(
        server
            .ping_id(client.addr(v6), ECHO_ID + 1, ARRIVES)
            .expect("running ping"),
        "the inbound echo is answered"
    );

    settle();
    Open {
        _listeners: vec![listener, inbound],
        _conns: vec![est_c, est_s, re_c, re_s, half_c, half_s, in_s, in_c],
        _udp: vec![echo, u, silent, u2, u3],
    }
}

/// A replied UDP flow that still carries traffic more than 2 s after its first packet: a
/// stream, `[ASSURED]`, with the long timeout.
fn drive_udp_stream(client: &TestPod, server: &TestPod, v6: bool) -> Open {
    let echo = server.udp_bind(v6, UDP_ECHO, ARRIVES).expect("UDP echo");
    let u = client.udp_bind(v6, 41011, ARRIVES).expect("UDP client");
    let mut buf = [0u8; 16];
    let round = || {
        let mut buf = [0u8; 16];
        u.send_to(b"query", server.sockaddr(v6, UDP_ECHO))
            .expect("sending");
        let (_, from) = echo.recv_from_within(&mut buf).expect("the query arrives");
        echo.send_to(b"answer", from).expect("answering");
        u.recv_within(&mut buf).expect("the answer arrives");
    };
    round();
    std::thread::sleep(Duration::from_millis(2200));
    round();
    // A replied flow that stopped before 2 s, beside it: not assured.
    let short = client.udp_bind(v6, 41012, ARRIVES).expect("UDP client");
    short
        .send_to(b"query", server.sockaddr(v6, UDP_ECHO))
        .expect("sending");
    let (_, from) = echo.recv_from_within(&mut buf).expect("the query arrives");
    echo.send_to(b"answer", from).expect("answering");
    short.recv_within(&mut buf).expect("the answer arrives");
    settle();
    Open {
        _udp: vec![echo, u, short],
        ..Open::default()
    }
}

/// Lets delayed ACKs go out: the tables must describe a quiet network.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

/// The kernel's table of the client namespace after `drive`.
fn kernel_table(drive: Driver, v6: bool) -> Vec<String> {
    let node = client_and_server();
    let (client, server) = (&node.pods[0], &node.pods[1]);
    client
        .ns
        .track_with_kernel_conntrack()
        .expect("turning on the kernel's conntrack");
    let _open = drive(client, server, v6);
    client
        .ns
        .nf_conntrack()
        .expect("reading the kernel's table")
}

/// kubesg's table of the client endpoint after `drive`, with these policies, as the user reads
/// it: `kubesg-agent ct list --ifindex <client>` on the pinned datapath.
fn kubesg_table(
    drive: Driver,
    client: Option<&CompiledPolicy>,
    server: Option<&CompiledPolicy>,
    v6: bool,
) -> Vec<String> {
    let pods = Pods::pinned(client, server);
    let _open = drive(pods.client(), pods.server(), v6);
    let pins = pods.pin_dir().expect("a pinned datapath");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubesg-agent"))
        .arg("--pin-dir")
        .arg(pins)
        .args(["ct", "list", "--ifindex"])
        .arg(pods.ifindex(Who::Client).to_string())
        .env("NO_COLOR", "1")
        .output()
        .expect("running kubesg-agent ct list");
    assert!(
        out.status.success(),
        "kubesg-agent ct list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A line split into what must be identical (every field but the timeout and `use=`) and the
/// remaining timeout.
fn normalize(line: &str) -> (Vec<String>, i64) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(fields.len() > 5, "not a conntrack line: {line:?}");
    let timeout: i64 = fields[4]
        .parse()
        .unwrap_or_else(|e| panic!("timeout column of {line:?}: {e}"));
    let rest = fields
        .iter()
        .enumerate()
        .filter(|(i, f)| *i != 4 && !f.starts_with("use="))
        .map(|(_, f)| f.to_string())
        .collect();
    (rest, timeout)
}

/// Asserts that the two tables describe the same connections.
fn assert_same_tables(kubesg: &[String], kernel: &[String]) {
    if let Some(diff) = table_difference(kubesg, kernel) {
        panic!(
            "{diff}\nkubesg (client endpoint):\n  {}\nkernel (client netns \
             /proc/net/nf_conntrack):\n  {}",
            kubesg.join("\n  "),
            kernel.join("\n  ")
        );
    }
}

/// The first difference between two tables that is not timeout jitter or `use=`, if any.
fn table_difference(kubesg: &[String], kernel: &[String]) -> Option<String> {
    let mut a: Vec<_> = kubesg.iter().map(|l| normalize(l)).collect();
    let mut b: Vec<_> = kernel.iter().map(|l| normalize(l)).collect();
    a.sort();
    b.sort();
    if a.len() != b.len() {
        return Some(format!("{} entries against {}", a.len(), b.len()));
    }
    for ((fa, ta), (fb, tb)) in a.iter().zip(&b) {
        if fa != fb {
            return Some(format!(
                "entries differ:\n  {}\n  {}",
                fa.join(" "),
                fb.join(" ")
            ));
        }
        if (ta - tb).abs() > TIMEOUT_TOLERANCE {
            return Some(format!(
                "remaining timeouts differ: {ta} vs {tb} for {}",
                fa.join(" ")
            ));
        }
    }
    None
}

/// Runs `drive` on both sides at once (each on its own node) and returns (kubesg, kernel).
fn tables(
    drive: Driver,
    client: Option<&CompiledPolicy>,
    server: Option<&CompiledPolicy>,
    v6: bool,
) -> (Vec<String>, Vec<String>) {
    std::thread::scope(|s| {
        let k = s.spawn(|| kernel_table(drive, v6));
        let ours = kubesg_table(drive, client, server, v6);
        (
            ours,
            k.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
        )
    })
}

/// Asserts that `table` has a line containing all of `parts`: the traffic did leave the entry
/// the comparison relies on (so an empty comparison cannot pass by accident).
fn assert_has(table: &[String], parts: &[&str]) {
    assert!(
        table.iter().any(|l| parts.iter().all(|p| l.contains(p))),
        "no line with {parts:?} in:\n{}",
        table.join("\n")
    );
}

fn compare(client: Option<&CompiledPolicy>, server: Option<&CompiledPolicy>, v6: bool) {
    let (kubesg, kernel) = tables(drive, client, server, v6);
    for parts in [
        &["TIME_WAIT", "sport=41001"][..],
        &["ESTABLISHED", "sport=41002"],
        &["TIME_WAIT", "sport=41007"],
        &["CLOSE_WAIT", "sport=41008"],
        &["CLOSE ", "sport=41009"],
        &["SYN_SENT", "sport=41010", "[UNREPLIED]"],
        &["ESTABLISHED", "sport=41013"],
        &["ESTABLISHED", "sport=42001"],
        &["udp", "sport=41004"],
        &["udp", "sport=41005", "[UNREPLIED]"],
        &["udp", "sport=41006", "[UNREPLIED]"],
        &[
            if v6 { "type=128" } else { "type=8" },
            &format!("id={ECHO_ID} "),
        ],
        &[
            if v6 { "type=128" } else { "type=8" },
            &format!("id={} ", ECHO_ID + 1),
        ],
    ] {
        assert_has(&kernel, parts);
    }
    assert!(
        !kernel.iter().any(|l| l.contains("sport=41003")),
        "the kernel forgets a connection refused by RST"
    );
    assert_same_tables(&kubesg, &kernel);
}

ipv4_and_ipv6!(
    non_member_table_reads_as_kernel_conntrack,
    permissive_member_table_reads_as_kernel_conntrack,
    udp_stream_is_assured_after_two_seconds_as_in_kernel_conntrack,
);

fn non_member_table_reads_as_kernel_conntrack(f: Family) {
    compare(None, None, f.is_v6());
}

/// Members whose rules allow everything, so that filtering is on but refuses nothing.
fn permissive_member_table_reads_as_kernel_conntrack(f: Family) {
    let p = allow_all();
    compare(Some(&p), Some(&p), f.is_v6());
}

#[test]
fn comparison_ignores_only_timeout_jitter_and_use_count() {
    // The normalisation itself: a line equals itself with another `use=` and a timeout one
    // second off, and differs as soon as a state, a flag or a port differs.
    let base = "ipv4     2 udp      17 29 src=192.168.1.5 dst=192.168.1.7 sport=41005 dport=5354 \
                [UNREPLIED] src=192.168.1.7 dst=192.168.1.5 sport=5354 dport=41005 mark=0 zone=0 \
                use=2";
    let jitter = base.replace(" 29 ", " 28 ").replace("use=2", "use=1");
    assert_same_tables(&[jitter], &[base.to_string()]);
    for changed in [
        base.replace("[UNREPLIED] ", ""),
        base.replace("dport=5354 ", "dport=5355 "),
        base.replace(" 29 ", " 25 "),
    ] {
        assert!(
            table_difference(std::slice::from_ref(&changed), &[base.to_string()]).is_some(),
            "{changed:?} must not compare equal to {base:?}"
        );
    }
}

fn udp_stream_is_assured_after_two_seconds_as_in_kernel_conntrack(f: Family) {
    let (kubesg, kernel) = tables(drive_udp_stream, None, None, f.is_v6());
    assert_has(&kernel, &["udp", "sport=41011", "[ASSURED]"]);
    assert_has(&kernel, &["udp", "sport=41012"]);
    assert_same_tables(&kubesg, &kernel);
}
