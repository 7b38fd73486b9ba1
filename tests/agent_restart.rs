//! An agent restart while a TCP stream (iperf3) runs between two member pods: the pinned
//! datapath keeps judging every packet, so the established flow loses nothing, and the restarted
//! agent enforces the rules it persisted before the operator says anything, then resumes from
//! its applied version. And what happens to pods while the agent is away: a CNI DEL succeeds and
//! is applied when the agent is back, a pod whose interface vanished is forgotten at start.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{anywhere, hosts, policy, snapshot, tcp, Cluster};
use kubesg_proto::pending_deletes;
use kubesg_testkit::{agent::Startup, cni::CniPod};
use serde_json::Value;

const IPERF_PORT: u16 = 5201;
/// How long the stream runs before the restart and after the agent is back (seconds). The
/// stream itself has no set length (`iperf3 -t 0`): the test ends it once the restarted agent
/// has carried it this long, so a slow restart (a loaded machine) cannot outlast it.
const STREAM_SECONDS_AROUND: u64 = 2;
/// What iperf3 -J reports as its error when it is ended by SIGINT, as the test ends it.
const INTERRUPTED: &str = "interrupt - the client has terminated";

/// A child process killed and reaped on drop (iperf3 must not outlive a failing test).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `iperf3` inside the pod's namespace.
fn iperf3(pod: &CniPod, args: &[&str]) -> Reaped {
    let child = Command::new("ip")
        .args(["netns", "exec", pod.ns.name(), "iperf3"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running iperf3");
    Reaped(child)
}

/// Waits until something listens on TCP `port` in the pod.
fn wait_listening(pod: &CniPod, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = pod
            .ns
            .exec("ss", &["-Hltn", &format!("sport = :{port}")])
            .expect("ss");
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "iperf3 -s never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the iperf3 client in `pod` has its data connection up beside its control
/// connection (two established connections to `port`): the stream is running.
fn wait_streaming(pod: &CniPod, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = pod
            .ns
            .exec(
                "ss",
                &["-Htn", "state", "established", &format!("dport = :{port}")],
            )
            .expect("ss");
        if String::from_utf8_lossy(&out.stdout).lines().count() >= 2 {
            return;
        }
        assert!(Instant::now() < deadline, "the iperf3 stream never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends an unbounded iperf3 client the way a user would (SIGINT: it reports what it sent),
/// waits for it to exit (at most `patience`) and returns its stdout; `None` when it did not
/// finish in time.
fn interrupt(mut child: Reaped, patience: Duration) -> Option<String> {
    let status = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success(), "kill -INT iperf3: {status}");
    let deadline = Instant::now() + patience;
    while child.0.try_wait().expect("waiting for iperf3").is_none() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.0.stdout.take() {
        std::io::Read::read_to_string(&mut stdout, &mut out).expect("iperf3 output");
    }
    Some(out)
}

/// The TCP counters of the pod's network namespace (`/proc/net/snmp` and `/proc/net/netstat`),
/// by name (`RetransSegs`, `TCPDSACKRecvSegs`, …; 0 when absent).
fn tcp_counters(pod: &CniPod) -> impl Fn(&str) -> u64 {
    let mut counters = std::collections::HashMap::new();
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let out = pod
            .ns
            .exec_ok("cat", &[file])
            .expect("reading TCP counters");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some(("Tcp" | "TcpExt", names)), Some((_, values))) =
                (names.split_once(": "), values.split_once(": "))
            else {
                continue;
            };
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                counters.insert(name.to_owned(), value.parse::<u64>().unwrap_or(0));
            }
        }
    }
    move |name| counters.get(name).copied().unwrap_or(0)
}

fn stream_survives_an_agent_restart(crash: bool) {
    let mut cluster = Cluster::connected(Startup::Deny);
    let client = cluster.add_pod("client", 51);
    let server = cluster.add_pod("server", 52);
    cluster.push(snapshot(
        1,
        vec![
            policy(
                "cli",
                vec![],
                vec![tcp(&[IPERF_PORT, 8080, 9090], hosts(&[&server]))],
            ),
            policy(
                "srv",
                vec![tcp(&[IPERF_PORT, 8080], hosts(&[&client]))],
                vec![],
            ),
        ],
        &[(&client, Some("cli")), (&server, Some("srv"))],
    ));
    let (client_if, server_if) = (cluster.host_ifindex(&client), cluster.host_ifindex(&server));

    let server_ip = server.ipv4.to_string();
    let _iperf_server = iperf3(
        &server,
        &["-s", "-1", "-B", &server_ip, "-p", &IPERF_PORT.to_string()],
    );
    wait_listening(&server, IPERF_PORT);
    let iperf_client = iperf3(
        &client,
        &[
            "-c",
            &server_ip,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            "0",
            "-b",
            "100M",
            "-J",
            "--connect-timeout",
            "3000",
        ],
    );

    // Mid-stream: the agent goes away and comes back on the same pins and state.
    wait_streaming(&client, IPERF_PORT);
    std::thread::sleep(Duration::from_secs(STREAM_SECONDS_AROUND));
    let restart = Instant::now();
    if crash {
        cluster.agent.kill().expect("killing the agent");
    } else {
        cluster.agent.stop().expect("stopping the agent");
    }
    cluster
        .agent
        .start_again()
        .expect("starting the agent again");
    let mut iperf_client = iperf_client;
    assert!(
        iperf_client.0.try_wait().expect("iperf3").is_none(),
        "the stream ended while the agent was away\n{}",
        cluster.dump()
    );
    let restarted = restart.elapsed();
    std::thread::sleep(Duration::from_secs(STREAM_SECONDS_AROUND));
    let since_restart = restart.elapsed();

    let output = interrupt(iperf_client, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("iperf3 did not end on SIGINT\n{}", cluster.dump()));
    let report: Value = serde_json::from_str(&output).expect("iperf3 -J output");
    assert_eq!(
        report["error"].as_str(),
        Some(INTERRUPTED),
        "iperf3 failed before it was ended\n{}",
        cluster.dump()
    );
    // No segment of the stream was lost: iperf3 counts retransmissions, and the only ones
    // allowed are those the receiver reports as duplicates (D-SACK): a tail loss probe sent
    // because an ACK was late (the machine is busy: the agent's restart verifies its programs,
    // other tests run) retransmits a segment that had arrived. A lost segment's retransmission
    // is never a duplicate.
    let sent = &report["end"]["sum_sent"];
    let retransmits = sent["retransmits"].as_u64().expect("retransmits");
    let tcp = tcp_counters(&client);
    let (retrans_segs, duplicates) = (tcp("RetransSegs"), tcp("TCPDSACKRecvSegs"));
    assert!(
        retransmits <= retrans_segs && retrans_segs == duplicates,
        "segments were lost: iperf3 retransmitted {retransmits}, the client {retrans_segs} \
         segments of which {duplicates} had arrived\n{sent}\n{}",
        cluster.dump()
    );
    // The stream spanned the restart: it was measuring before the agent went away (its setup
    // may be slow on a loaded machine) …
    let seconds = sent["seconds"].as_f64().expect("seconds");
    assert!(
        seconds > since_restart.as_secs_f64(),
        "the stream began after the restart had started: {seconds} s streamed, the restart \
         began {since_restart:?} before the end ({restarted:?} to restart)"
    );
    // … and every whole second of it, before, across and after the restart, carried data (the
    // last interval is cut short by the SIGINT and may be a few microseconds long).
    let intervals = report["intervals"].as_array().expect("intervals");
    let whole = intervals.len().saturating_sub(1);
    for i in &intervals[..whole] {
        let sum = &i["sum"];
        assert!(
            sum["bytes"].as_u64().unwrap_or(0) > 0,
            "an interval without data: {sum}\n{}",
            cluster.dump()
        );
    }
    for (who, ifindex) in [("client", client_if), ("server", server_if)] {
        let c = cluster
            .agent
            .counters(ifindex)
            .expect("counters")
            .unwrap_or_else(|| panic!("{who}'s endpoint is gone\n{}", cluster.dump()));
        let dropped: u64 = c.iter().map(|d| d.dropped_policy + d.dropped_invalid).sum();
        assert_eq!(
            dropped,
            0,
            "{who} dropped packets: {c:?}\n{}",
            cluster.dump()
        );
        assert!(c[0].accepted > 0 && c[1].accepted > 0, "{who}: {c:?}");
    }

    // The restarted agent enforces the persisted rules: the operator has pushed nothing since.
    cluster.assert_opens(&client, &server, false, 8080);
    cluster.assert_dropped(&client, &server, false, 9090);
    cluster.assert_dropped(&server, &client, true, 8080);
    // And it resumes from the version it applied.
    let hello = cluster.hello();
    assert_eq!(hello.applied_version, 1, "{hello:?}");
    assert!(
        cluster.operator.hellos().len() >= 2,
        "a new Hello after the restart"
    );
}

#[test]
fn tcp_stream_loses_nothing_when_the_agent_is_stopped_and_started() {
    kubesg_testkit::require_privileged!();
    stream_survives_an_agent_restart(false);
}

#[test]
fn tcp_stream_loses_nothing_when_the_agent_crashes_and_starts_again() {
    kubesg_testkit::require_privileged!();
    stream_survives_an_agent_restart(true);
}

/// The DELs queued beside the agent's socket.
fn queued(cluster: &Cluster) -> usize {
    pending_deletes::read_all(&pending_deletes::dir_beside(&cluster.agent.socket()))
        .expect("reading the queue")
        .len()
}

#[test]
fn pods_deleted_or_gone_while_the_agent_was_down_are_forgotten_when_it_is_back() {
    kubesg_testkit::require_privileged!();
    let mut cluster = Cluster::connected(Startup::Deny);
    let client = cluster.add_pod("client", 61);
    let kept = cluster.add_pod("kept", 62);
    let deleted = cluster.add_pod("deleted", 63);
    let vanished = cluster.add_pod("vanished", 64);
    cluster.push(snapshot(
        1,
        vec![policy("srv", vec![tcp(&[8080], anywhere())], vec![])],
        &[
            (&client, None),
            (&kept, Some("srv")),
            (&deleted, None),
            (&vanished, None),
        ],
    ));
    let deleted_if = cluster.host_ifindex(&deleted);
    let vanished_if = cluster.host_ifindex(&vanished);

    // A crash leaves the socket behind: nothing answers on it.
    cluster.agent.kill().expect("killing the agent");
    cluster
        .node
        .del(&cluster.network, &deleted)
        .unwrap_or_else(|e| panic!("DEL while the agent is down must succeed: {e}"));
    assert_eq!(queued(&cluster), 1, "the DEL waits for the agent");
    // A pod whose sandbox went without any DEL (its namespace, and so its veth, destroyed).
    drop(vanished);

    cluster.agent.start_again().expect("starting the agent");
    cluster.assert_nothing_registered(deleted.container_id(), Some(deleted_if), "deleted");
    let table = cluster.agent.cli_ok(&["endpoints"]).expect("endpoints");
    assert!(!table.contains("/vanished "), "{table}");
    assert!(
        !cluster
            .agent
            .datapath_has_endpoint(vanished_if)
            .expect("maps"),
        "the vanished pod's interface is still judged\n{table}"
    );
    assert_eq!(
        queued(&cluster),
        0,
        "the queued DEL was applied and removed"
    );
    assert!(
        cluster
            .agent
            .log()
            .contains("applying a CNI DEL queued while the agent was away"),
        "the agent says what it did"
    );

    // The pod that stayed is enforced as before.
    assert!(cluster
        .agent
        .knows_container(kept.container_id())
        .expect("ListEndpoints"));
    for v6 in [false, true] {
        cluster.assert_opens(&client, &kept, v6, 8080);
        cluster.assert_dropped(&client, &kept, v6, 9090);
    }
}

/// Queued DELs are files the agent did not write. One naming no valid attachment (a NUL byte in
/// the container id, a path out of the state directory) is moved aside (`.rejected`) and
/// reported; it neither stops the agent from starting nor holds up the valid DEL queued with it,
/// and removes no file. Before, the first made the agent fail at start, again at each restart,
/// and the second removed the file its path led to.
#[test]
fn queued_dels_naming_no_valid_attachment_are_set_aside_and_the_rest_applied() {
    kubesg_testkit::require_privileged!();
    let mut cluster = Cluster::connected(Startup::Deny);
    let deleted = cluster.add_pod("deleted-q", 67);
    let deleted_if = cluster.host_ifindex(&deleted);
    cluster.agent.kill().expect("killing the agent");
    cluster
        .node
        .del(&cluster.network, &deleted)
        .unwrap_or_else(|e| panic!("DEL while the agent is down must succeed: {e}"));
    // Files a path of `../bait` would reach from the endpoint records' directory, under the
    // names this build and the one before gave records.
    let state = cluster.agent.state_dir();
    let baits = [state.join("bait:eth0.json"), state.join("bait_eth0.json")];
    for bait in &baits {
        std::fs::write(bait, b"{}").expect("a bait file");
    }
    let dir = pending_deletes::dir_beside(&cluster.agent.socket());
    for (file, container_id) in [
        ("planted-nul.del", "abc\0def"),
        ("planted-up.del", "../bait"),
    ] {
        let key = kubesg_proto::v1alpha1::EndpointKey {
            container_id: container_id.into(),
            ifname: "eth0".into(),
        };
        std::fs::write(dir.join(file), prost::Message::encode_to_vec(&key)).expect("planting");
    }
    assert_eq!(queued(&cluster), 3);

    cluster
        .agent
        .start_again()
        .unwrap_or_else(|e| panic!("the agent starts: {e}\n{}", cluster.agent.log()));
    cluster.assert_nothing_registered(deleted.container_id(), Some(deleted_if), "deleted-q");
    assert_eq!(queued(&cluster), 0, "no DEL left in the queue");
    for file in ["planted-nul.rejected", "planted-up.rejected"] {
        assert!(dir.join(file).exists(), "{file} kept for inspection");
    }
    for bait in &baits {
        assert!(bait.exists(), "{} was removed", bait.display());
    }
    assert_eq!(
        cluster
            .agent
            .log()
            .matches("rejecting a queued CNI DEL that names no valid attachment")
            .count(),
        2,
        "each is reported"
    );
}

/// A record that cannot be read at start leaves the agent unable to name the pod on that
/// interface, so it cannot know the pod's rules: the pod is denied everything (its programs
/// stay), not left unfiltered, and the agent says so; the other pods are enforced as before.
/// Before, the interface's programs were detached and every packet to the pod passed.
#[test]
fn a_pod_whose_record_is_unreadable_at_start_is_denied_not_left_open() {
    kubesg_testkit::require_privileged!();
    let mut cluster = Cluster::connected(Startup::Allow);
    let client = cluster.add_pod("client", 68);
    let server = cluster.add_pod("unreadable", 69);
    cluster.push(snapshot(
        1,
        vec![policy("srv", vec![tcp(&[8080], anywhere())], vec![])],
        &[(&client, None), (&server, Some("srv"))],
    ));
    cluster.assert_opens(&client, &server, false, 8080);

    cluster.agent.stop().expect("stopping the agent");
    let files = cluster
        .agent
        .record_files(server.container_id())
        .expect("the state directory");
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::write(&files[0], b"{not a record").expect("corrupting the record");
    cluster.agent.start_again().expect("starting the agent");

    for v6 in [false, true] {
        cluster.assert_dropped(&client, &server, v6, 8080);
        cluster.assert_dropped(&client, &server, v6, 9090);
    }
    assert!(
        cluster
            .agent
            .log()
            .contains("no endpoint record explains this enforced interface"),
        "the agent says what it did\n{}",
        cluster.agent.log()
    );
    assert!(
        files[0].exists(),
        "the unreadable record is kept for inspection"
    );
}

/// A desired state that cannot be read at start (a torn or corrupted file) leaves the agent
/// without the rules it applied. It keeps what the datapath enforces (each pod's last rules,
/// pinned) and asks the operator for a snapshot, rather than give every pod the startup policy
/// (here `allow`: every port open); the snapshot then replaces it. Before, the pod was open
/// until the operator came back.
#[test]
fn a_corrupt_desired_state_keeps_what_the_datapath_enforces_until_the_snapshot() {
    kubesg_testkit::require_privileged!();
    let mut cluster = Cluster::connected(Startup::Allow);
    let client = cluster.add_pod("client", 70);
    let server = cluster.add_pod("kept-rules", 71);
    let rules = |version, ports: &[u16]| {
        snapshot(
            version,
            vec![policy("srv", vec![tcp(ports, anywhere())], vec![])],
            &[(&client, None), (&server, Some("srv"))],
        )
    };
    cluster.push(rules(1, &[8080]));
    cluster.assert_dropped(&client, &server, false, 9090);

    cluster.agent.stop().expect("stopping the agent");
    let state = cluster.agent.state_dir().join("desired.json");
    std::fs::write(&state, b"{\"version\": 1, \"policies\": {").expect("tearing the file");
    cluster.agent.start_again().expect("starting the agent");
    let hello = cluster.hello();
    assert_eq!(
        hello.applied_version, 0,
        "it asks for a snapshot: {hello:?}"
    );
    for v6 in [false, true] {
        cluster.assert_opens(&client, &server, v6, 8080);
        cluster.assert_dropped(&client, &server, v6, 9090);
    }
    assert!(
        cluster
            .agent
            .log()
            .contains("the desired state cannot be read: keeping what the datapath enforces"),
        "the agent says what it did\n{}",
        cluster.agent.log()
    );

    cluster.push(rules(2, &[8080, 9090]));
    cluster.assert_opens(&client, &server, false, 9090);
    cluster.assert_dropped(&client, &server, false, 7070);
}

#[test]
fn a_del_that_timed_out_on_a_hung_agent_is_applied_once_it_answers_again() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    let pod = cluster.add_pod("hung-del", 65);
    let ifindex = cluster.host_ifindex(&pod);

    cluster.agent.freeze().expect("freezing the agent");
    let del = cluster.node.del(&cluster.network, &pod);
    let queued_while_frozen = queued(&cluster);
    cluster.agent.thaw().expect("thawing the agent");
    del.unwrap_or_else(|e| panic!("DEL with a hung agent must succeed: {e}"));
    assert_eq!(queued_while_frozen, 1, "the DEL that timed out was queued");

    let deadline = Instant::now() + Duration::from_secs(10);
    while queued(&cluster) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        queued(&cluster),
        0,
        "the running agent applied the queued DEL"
    );
    cluster.assert_nothing_registered(pod.container_id(), Some(ifindex), "hung-del");
}

#[test]
fn an_add_supersedes_a_queued_del_of_the_same_attachment() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    let pod = cluster.pod("re-added", 66);
    // A DEL of this attachment left in the queue (the agent was away when it came); then the
    // runtime adds the attachment again.
    let dir = pending_deletes::dir_beside(&cluster.agent.socket());
    let key = kubesg_proto::v1alpha1::EndpointKey {
        container_id: pod.attachment.container_id.clone(),
        ifname: pod.attachment.ifname.clone(),
    };
    pending_deletes::queue(&dir, &key)
        .expect("queueing")
        .expect("the agent's directory exists");
    if let Err(e) = cluster.try_add(&pod) {
        panic!("ADD: {e}\n{}", cluster.dump());
    }
    assert_eq!(queued(&cluster), 0, "the ADD dropped the queued DEL");
    // Past the agent's next look at the queue, the pod is still registered and enforced.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        cluster
            .agent
            .knows_container(pod.container_id())
            .expect("ListEndpoints"),
        "the new registration was deleted\n{}",
        cluster.dump()
    );
    assert!(cluster
        .agent
        .datapath_has_endpoint(cluster.host_ifindex(&pod))
        .expect("maps"));
}
