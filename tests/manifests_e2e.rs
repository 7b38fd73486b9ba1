//! End to end in manifests mode: the real `kubesg-operator` reading a directory of manifests,
//! one real `kubesg-agent` per node, pods attached through the real CNI chain, and eBPF judging
//! real traffic between pods on two nodes. After each change of the manifests (groups applied, a
//! pod relabelled out of a group, a group deleted, a pod added) the connectivity matrix that
//! traffic shows equals the reference evaluation of the SecurityGroups
//! (`kubesg_operator::reference`), over IPv4 and IPv6; an operator restart never changes a
//! verdict.
//!
//! The groups are the demo's (`demo/manifests/`): the seed's client/server case, a web tier
//! reachable only from a load balancer, a database reachable only from the web tier, DNS egress
//! for everyone.

use std::{
    io,
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

use kubesg_testkit::{
    cluster::{ClusterConfig, LocalCluster, PodSpec},
    matrix::{Matrix, Target},
    probe::{echoes, Probe, Verdict},
};

const GROUPS: [&str; 7] = [
    include_str!("../demo/manifests/client.yaml"),
    include_str!("../demo/manifests/server.yaml"),
    include_str!("../demo/manifests/lb.yaml"),
    include_str!("../demo/manifests/web.yaml"),
    include_str!("../demo/manifests/db.yaml"),
    include_str!("../demo/manifests/dns.yaml"),
    include_str!("../demo/manifests/dns-egress.yaml"),
];

/// Both families in every matrix.
const FAMILIES: [bool; 2] = [false, true];
/// How long a held connection's echo may take before it counts as cut.
const ECHO: Duration = Duration::from_secs(1);

/// The demo's pods, spread over both nodes so most pairs cross the underlay.
fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("client", 0).label("app", "client").tcp("", 23),
        PodSpec::new("server", 1)
            .label("app", "server")
            .tcp("telnet", 23)
            .udp("", 23),
        PodSpec::new("lb", 0).label("app", "lb").tcp("http", 80),
        web("web-1", 0),
        web("web-2", 1),
        PodSpec::new("db", 1)
            .label("app", "db")
            .tcp("postgres", 5432),
        PodSpec::new("dns", 0).label("app", "dns").udp("dns", 53),
    ]
}

fn web(name: &str, node: usize) -> PodSpec {
    PodSpec::new(name, node)
        .label("tier", "web")
        .tcp("http", 8080)
}

/// The matrix's columns: every port some pod serves (and a ping to one pod per node).
fn columns(web_pods: &[&str]) -> Vec<Target> {
    let mut c = vec![
        Target::tcp("server", 23),
        Target::udp("server", 23),
        Target::tcp("client", 23),
        Target::tcp("lb", 80),
    ];
    c.extend(web_pods.iter().map(|w| Target::tcp(w, 8080)));
    c.extend([
        Target::tcp("db", 5432),
        Target::udp("dns", 53),
        Target::ping("lb"),
        Target::ping("db"),
    ]);
    c
}

/// A cluster with the demo's pods and groups, every agent in sync.
fn shop(config: ClusterConfig) -> LocalCluster {
    let mut cluster = LocalCluster::start(config).expect("starting the local cluster");
    for pod in pods() {
        cluster.add_pod(pod).expect("adding a pod");
    }
    for group in GROUPS {
        cluster.apply_group(group).expect("applying a group");
    }
    for group in ["client", "server", "lb", "web", "db", "dns", "dns-egress"] {
        cluster.wait_programmed(group).expect("programmed");
    }
    cluster.wait_synced().expect("agents in sync");
    cluster
}

/// Probes `rows` × `columns` over both families and asserts that traffic equals the reference
/// everywhere.
#[track_caller]
fn assert_matrix(cluster: &LocalCluster, step: &str, rows: &[&str], columns: &[Target]) -> Matrix {
    let matrix = cluster
        .matrix(rows, columns, &FAMILIES)
        .unwrap_or_else(|e| panic!("{step}: probing: {e}\n{}", cluster.dump()));
    let mismatches = matrix.mismatches();
    assert!(
        mismatches.is_empty(),
        "{step}: traffic differs from the reference evaluation:\n{}\n{}\n{}",
        mismatches
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        matrix.render(None, false),
        cluster.dump()
    );
    matrix
}

const ROWS: [&str; 7] = ["client", "server", "lb", "web-1", "web-2", "db", "dns"];

#[test]
fn the_matrix_follows_the_reference_through_apply_relabel_delete_and_add() {
    kubesg_testkit::require_privileged!();
    let mut cluster = shop(ClusterConfig::default());
    let cols = columns(&["web-1", "web-2"]);
    let applied = assert_matrix(&cluster, "groups applied", &ROWS, &cols);
    // The matrix is not trivial: the groups allow some connections and refuse others.
    let lb_web2 = Target::tcp("web-2", 8080);
    assert_eq!(applied.verdict("lb", &lb_web2), Some(Verdict::Allowed));
    assert_eq!(
        applied.verdict("server", &Target::tcp("client", 23)),
        Some(Verdict::Refused)
    );

    // web-2 leaves the web tier: the load balancer's open connections to it are cut (the
    // default re-check), and new ones are refused.
    let mut held: Vec<TcpStream> = FAMILIES
        .iter()
        .map(|&v6| {
            cluster
                .connect("lb", "web-2", 8080, v6)
                .expect("lb -> web-2")
        })
        .collect();
    for s in &mut held {
        assert!(
            echoes(s, b"before", ECHO).expect("echo"),
            "lb -> web-2 carries data"
        );
    }
    cluster
        .set_labels("web-2", &[("tier", "canary")])
        .expect("relabelling web-2");
    cluster
        .wait_synced()
        .expect("agents in sync after the relabel");
    for (s, v6) in held.iter_mut().zip(FAMILIES) {
        assert!(
            !echoes(s, b"after", ECHO).expect("echo"),
            "lb -> web-2 (v6: {v6}) still carries data after web-2 left the web group\n{}",
            cluster.dump()
        );
    }
    let relabelled = assert_matrix(&cluster, "web-2 relabelled", &ROWS, &cols);
    assert_eq!(relabelled.verdict("lb", &lb_web2), Some(Verdict::Refused));

    // The database's group goes: nothing names web's peers any more.
    cluster.delete_group("db").expect("deleting db");
    cluster
        .wait_synced()
        .expect("agents in sync after the delete");
    let deleted = assert_matrix(&cluster, "db deleted", &ROWS, &cols);
    assert_ne!(
        deleted.verdict("web-1", &Target::tcp("db", 5432)),
        relabelled.verdict("web-1", &Target::tcp("db", 5432)),
        "deleting db changes web-1 -> db"
    );

    // A new web pod joins the tier on node 2.
    cluster.add_pod(web("web-3", 1)).expect("adding web-3");
    cluster.wait_synced().expect("agents in sync after the add");
    let rows: Vec<&str> = ROWS.iter().copied().chain(["web-3"]).collect();
    let added = assert_matrix(
        &cluster,
        "web-3 added",
        &rows,
        &columns(&["web-1", "web-2", "web-3"]),
    );
    assert_eq!(
        added.verdict("lb", &Target::tcp("web-3", 8080)),
        Some(Verdict::Allowed)
    );
}

#[test]
fn without_recheck_a_pod_leaving_its_group_keeps_its_established_connections() {
    kubesg_testkit::require_privileged!();
    let mut cluster = LocalCluster::start(ClusterConfig {
        recheck_on_policy_change: false,
        ..ClusterConfig::default()
    })
    .expect("starting the local cluster");
    for pod in [
        PodSpec::new("lb", 0).label("app", "lb").tcp("http", 80),
        web("web-1", 0),
        web("web-2", 1),
    ] {
        cluster.add_pod(pod).expect("adding a pod");
    }
    // lb, web, and dns-egress: every pod is a member of some group, so web-2 leaving the web
    // tier is left with rules that refuse the load balancer (not with no rules at all).
    for group in [GROUPS[2], GROUPS[3], GROUPS[6]] {
        let name = cluster.apply_group(group).expect("applying");
        cluster.wait_programmed(&name).expect("programmed");
    }
    cluster.wait_synced().expect("in sync");
    let rows = ["lb", "web-1", "web-2"];
    let cols = [
        Target::tcp("lb", 80),
        Target::tcp("web-1", 8080),
        Target::tcp("web-2", 8080),
    ];
    assert_matrix(&cluster, "groups applied", &rows, &cols);

    let mut held: Vec<TcpStream> = FAMILIES
        .iter()
        .map(|&v6| {
            cluster
                .connect("lb", "web-2", 8080, v6)
                .expect("lb -> web-2")
        })
        .collect();
    cluster
        .set_labels("web-2", &[("tier", "canary")])
        .expect("relabelling web-2");
    cluster.wait_synced().expect("in sync after the relabel");
    assert_eq!(
        cluster
            .expected("lb", "web-2", Probe::Tcp(8080), false)
            .expect("reference"),
        Verdict::Refused,
        "the rules refuse lb -> web-2 now"
    );
    for (s, v6) in held.iter_mut().zip(FAMILIES) {
        assert!(
            echoes(s, b"still", ECHO).expect("echo"),
            "without re-check, lb -> web-2 (v6: {v6}) lives on\n{}",
            cluster.dump()
        );
    }
    let after = assert_matrix(&cluster, "web-2 relabelled", &rows, &cols);
    assert_eq!(
        after.verdict("lb", &Target::tcp("web-2", 8080)),
        Some(Verdict::Refused),
        "new connections follow the new rules"
    );
}

/// What the watchers saw: wrong verdicts, and how many probes each started in each phase.
#[derive(Default)]
struct Watch {
    wrong: Vec<String>,
    started: Vec<[usize; PHASES]>,
}

/// Phases of the restart: before, operator down, operator back (agents reconnecting), after.
const PHASES: usize = 4;
const PHASE_NAMES: [&str; PHASES] = [
    "before",
    "operator down",
    "agents reconnecting",
    "after the resync",
];

#[test]
fn an_operator_restart_and_the_agents_reconnecting_never_change_a_verdict() {
    kubesg_testkit::require_privileged!();
    let cluster = shop(ClusterConfig::default());
    // NEW connections allowed and refused, within a node and across nodes, both families.
    let checks: Vec<(&str, &str, Probe, bool)> = vec![
        ("client", "server", Probe::Tcp(23), false),
        ("client", "server", Probe::Udp(23), true),
        ("lb", "web-2", Probe::Tcp(8080), true),
        ("web-1", "db", Probe::Tcp(5432), false),
        ("server", "client", Probe::Tcp(23), false),
        ("web-1", "web-2", Probe::Tcp(8080), true),
        ("lb", "db", Probe::Tcp(5432), false),
        ("client", "lb", Probe::Ping, false),
    ];
    let expected: Vec<Verdict> = checks
        .iter()
        .map(|&(f, t, p, v6)| cluster.expected(f, t, p, v6).expect("reference"))
        .collect();
    assert!(expected.contains(&Verdict::Allowed) && expected.contains(&Verdict::Refused));
    // Held connections, each echoing every 100 ms.
    let mut held: Vec<(String, TcpStream)> =
        [("client", "server", 23, false), ("lb", "web-1", 8080, true)]
            .iter()
            .map(|&(f, t, port, v6)| {
                let s = cluster.connect(f, t, port, v6).expect("held connection");
                (format!("held {f} -> {t}:{port} (v6: {v6})"), s)
            })
            .collect();

    let phase = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let watch = Mutex::new(Watch {
        wrong: Vec::new(),
        started: vec![[0; PHASES]; checks.len() + held.len()],
    });
    let record = |i: usize, at: usize, what: String, ok: bool| {
        let mut w = watch.lock().unwrap_or_else(|p| p.into_inner());
        w.started[i][at] += 1;
        if !ok {
            w.wrong
                .push(format!("{what} during \"{}\"", PHASE_NAMES[at]));
        }
    };
    std::thread::scope(|s| {
        for (i, (&(from, to, probe, v6), want)) in checks.iter().zip(&expected).enumerate() {
            let (phase, done, record, cluster) = (&phase, &done, &record, &cluster);
            s.spawn(move || {
                let from_pod = cluster.pod(from).expect("pod");
                let to_addr = cluster.pod(to).expect("pod").addr(v6);
                while !done.load(Ordering::SeqCst) {
                    let at = phase.load(Ordering::SeqCst);
                    let got = probe.run(from_pod.ns(), to_addr);
                    let what = format!("{from} -> {to} {probe} (v6: {v6}): {got:?}, want {want}");
                    record(i, at, what, matches!(&got, Ok(v) if v == want));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        for (j, (what, stream)) in held.iter_mut().enumerate() {
            let (phase, done, record) = (&phase, &done, &record);
            let i = checks.len() + j;
            s.spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let at = phase.load(Ordering::SeqCst);
                    let ok = echoes(stream, b"ping", ECHO);
                    record(i, at, format!("{what}: {ok:?}"), matches!(ok, Ok(true)));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }

        let result = (|| -> io::Result<()> {
            std::thread::sleep(Duration::from_secs(2));
            let versions = cluster.applied_versions()?;
            phase.store(1, Ordering::SeqCst);
            cluster.operator().stop()?;
            // Long enough for every watcher to start probes while the operator is away.
            std::thread::sleep(Duration::from_secs(2));
            phase.store(2, Ordering::SeqCst);
            cluster.operator().start_again()?;
            cluster.wait_resynced_since(&versions)?;
            phase.store(3, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(2));
            Ok(())
        })();
        done.store(true, Ordering::SeqCst);
        result.unwrap_or_else(|e| panic!("restarting the operator: {e}\n{}", cluster.dump()));
    });
    let watch = watch.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(
        watch.wrong.is_empty(),
        "wrong verdicts around the operator restart:\n{}\n{}",
        watch.wrong.join("\n"),
        cluster.dump()
    );
    for (i, started) in watch.started.iter().enumerate() {
        assert!(
            started[1] > 0 && started[3] > 0,
            "watcher {i} did not probe while the operator was down and after: {started:?}"
        );
    }

    // The restarted operator still turns edits into rules: the client now accepts the server.
    let mut cluster = cluster;
    cluster
        .apply_group(&GROUPS[0].replace(
            "  egress:\n",
            "  ingress:\n    - protocol: TCP\n      ports: [ { port: 23 } ]\n      from: [ { securityGroup: { name: server } } ]\n  egress:\n",
        ))
        .expect("editing client");
    cluster.wait_programmed("client").expect("programmed");
    cluster.wait_synced().expect("in sync");
    let after = assert_matrix(
        &cluster,
        "edited after the restart",
        &["server", "lb", "web-1"],
        &[Target::tcp("client", 23), Target::tcp("server", 23)],
    );
    assert_eq!(
        after.verdict("server", &Target::tcp("client", 23)),
        Some(Verdict::Allowed)
    );
}
