//! `make demo`: kubesg on a local two-node "cluster", narrated for people.
//!
//! Two network namespaces stand in for nodes (joined by a routed link), more namespaces for
//! pods, attached through the real CNI chain (loopback, bridge + host-local, kubesg-cni). The
//! real `kubesg-operator` runs in manifests mode and one real `kubesg-agent` per node enforces
//! with eBPF. The demo applies example SecurityGroups (`demo/manifests/`), shows the
//! connectivity matrix real traffic sees next to the reference evaluation of the groups, the
//! agent's conntrack table and `explain`, then relabels a pod and shows what changed. It cleans
//! up after itself, on Ctrl-C too, and checks that nothing is left behind.
//!
//! The machinery is the end-to-end tests' (`kubesg_testkit::cluster`), so what the demo shows is
//! what the tests assert.

use std::{
    io::{self, IsTerminal as _},
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use kubesg_testkit::{
    cluster::{node_name, ClusterConfig, LocalCluster, PodSpec, Transport},
    matrix::{Matrix, Target},
    probe::echoes,
};

/// The example groups, in the order they are applied, with what each one is for.
const GROUPS: [(&str, &str, &str); 7] = [
    (
        "client",
        include_str!("../manifests/client.yaml"),
        "(a) the client may open TCP and UDP to the server's port 23; nobody may connect to it",
    ),
    (
        "server",
        include_str!("../manifests/server.yaml"),
        "(a) the server accepts port 23 from the client group only",
    ),
    (
        "lb",
        include_str!("../manifests/lb.yaml"),
        "(b) the load balancer accepts port 80 from anywhere, opens only to the web tier",
    ),
    (
        "web",
        include_str!("../manifests/web.yaml"),
        "(b) the web tier accepts its \"http\" port from the lb group only, opens only to db",
    ),
    (
        "db",
        include_str!("../manifests/db.yaml"),
        "(c) the database accepts 5432 from the web group only",
    ),
    (
        "dns",
        include_str!("../manifests/dns.yaml"),
        "(d) the DNS server accepts UDP 53 from every pod of the namespace",
    ),
    (
        "dns-egress",
        include_str!("../manifests/dns-egress.yaml"),
        "(d) every pod may send UDP 53 to the DNS pods",
    ),
];

/// The example NetworkPolicy, applied last.
const NETWORK_POLICY: &str = include_str!("../manifests/dns-networkpolicy.yaml");

/// Both address families in every matrix.
const FAMILIES: [bool; 2] = [false, true];
/// How long a held connection's echo may take before it counts as cut.
const ECHO: Duration = Duration::from_secs(1);

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("client", 0).label("app", "client").tcp("", 23),
        PodSpec::new("server", 1)
            .label("app", "server")
            .tcp("telnet", 23)
            .udp("", 23),
        PodSpec::new("lb", 0).label("app", "lb").tcp("http", 80),
        PodSpec::new("web-1", 0)
            .label("tier", "web")
            .tcp("http", 8080),
        PodSpec::new("web-2", 1)
            .label("tier", "web")
            .tcp("http", 8080),
        PodSpec::new("db", 1)
            .label("app", "db")
            .tcp("postgres", 5432),
        PodSpec::new("dns", 0).label("app", "dns").udp("dns", 53),
    ]
}

fn columns() -> Vec<Target> {
    vec![
        Target::tcp("server", 23),
        Target::udp("server", 23),
        Target::tcp("client", 23),
        Target::tcp("lb", 80),
        Target::tcp("web-1", 8080),
        Target::tcp("web-2", 8080),
        Target::tcp("db", 5432),
        Target::udp("dns", 53),
    ]
}

const ROWS: [&str; 7] = ["client", "server", "lb", "web-1", "web-2", "db", "dns"];

/// Terminal styling, off when stdout is not a terminal or `NO_COLOR` is set.
struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn step(&self, n: usize, title: &str) {
        println!("\n{}", self.paint("1", &format!("{n}. {title}")));
    }

    fn dim(&self, text: &str) -> String {
        self.paint("2", text)
    }
}

/// Why the demo stopped early.
#[derive(Debug)]
enum Failure {
    /// Ctrl-C or SIGTERM.
    Interrupted,
    /// Something did not work; the message says what.
    Error(String),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::Interrupted {
            Failure::Interrupted
        } else {
            Failure::Error(e.to_string())
        }
    }
}

type Result<T> = std::result::Result<T, Failure>;

fn main() -> ExitCode {
    if !kubesg_testkit::privileged::is_root() {
        eprintln!("kubesg demo: needs root (network namespaces, eBPF); run `make demo` as root");
        return ExitCode::FAILURE;
    }
    let interrupted = match kubesg_testkit::interrupt::flag("kubesg demo") {
        Ok(flag) => flag,
        Err(e) => {
            eprintln!("kubesg demo: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let style = Style {
        color: io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let started = Instant::now();
    match demo(&style, &interrupted) {
        Ok(()) => {
            println!("\nDone in {:.0} s.", started.elapsed().as_secs_f64().ceil());
            ExitCode::SUCCESS
        }
        // A Ctrl-C also reaches the plugins and processes the demo runs, whose failure may
        // surface first: it is still the interruption.
        Err(_) if kubesg_testkit::interrupt::is_set(&interrupted) => {
            eprintln!("\nkubesg demo: interrupted; cleaned up.");
            ExitCode::from(130)
        }
        Err(Failure::Interrupted) => {
            eprintln!("\nkubesg demo: interrupted; cleaned up.");
            ExitCode::from(130)
        }
        Err(Failure::Error(e)) => {
            eprintln!("\nkubesg demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(interrupted: &AtomicBool) -> Result<()> {
    if kubesg_testkit::interrupt::is_set(interrupted) {
        return Err(Failure::Interrupted);
    }
    Ok(())
}

/// Runs the steps on a fresh cluster, then drops it and checks that nothing it created is left.
fn demo(style: &Style, interrupted: &Arc<AtomicBool>) -> Result<()> {
    println!(
        "{}",
        style.paint(
            "1",
            "kubesg demo: stateful security groups for pods, on a local two-node cluster"
        )
    );
    style.step(1, "Starting a local cluster");
    println!(
        "   Two network namespaces are the nodes, joined by a routed link; each has a bridge\n   \
         with its own pod subnets (node-1: 10.77.1.0/24, fd77:0:0:1::/64; node-2: 10.77.2.0/24,\n   \
         fd77:0:0:2::/64). kubesg-operator runs in manifests mode (a directory of YAML stands in\n   \
         for the API server); one kubesg-agent per node loads the eBPF datapath and follows it\n   \
         over mTLS."
    );
    check(interrupted)?;
    let mut cluster = LocalCluster::start(ClusterConfig {
        namespace: "shop".into(),
        ..ClusterConfig::default()
    })?;
    cluster.set_cancel(interrupted.clone());
    println!(
        "   {} {}\n   {} {}",
        style.dim("manifests:"),
        cluster.manifests_dir().display(),
        style.dim("statuses: "),
        cluster.status_dir().display()
    );
    let result = steps(style, &mut cluster, interrupted);
    let footprint = cluster.footprint();
    println!("\n{}", style.paint("1", "Cleaning up"));
    println!(
        "   Stopping the operator and the agents, deleting the namespaces, unpinning the eBPF\n   \
         objects, removing the directories."
    );
    drop(cluster);
    let left: Vec<PathBuf> = footprint.into_iter().filter(|p| p.exists()).collect();
    if left.is_empty() {
        println!("   Nothing left behind (checked /run/netns, /sys/fs/bpf and the directories).");
    } else {
        let list: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
        let message = format!("left behind: {}", list.join(", "));
        return match result {
            Err(e) => Err(e),
            Ok(()) => Err(Failure::Error(message)),
        };
    }
    result
}

fn steps(style: &Style, cluster: &mut LocalCluster, interrupted: &AtomicBool) -> Result<()> {
    style.step(
        2,
        "Adding 7 pods through the CNI chain (loopback, bridge + host-local, kubesg-cni)",
    );
    println!(
        "   Each pod's Pod manifest (labels, node, named container ports, the addresses the CNI\n   \
         gave it) is written for the operator, as the kubelet would report it. Every pod runs\n   \
         echo servers on its ports."
    );
    for spec in pods() {
        check(interrupted)?;
        let pod = cluster.add_pod(spec)?;
        let labels: Vec<String> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let ports: Vec<String> = pod
            .ports
            .iter()
            .map(|p| {
                let proto = match p.transport {
                    Transport::Tcp => "tcp",
                    Transport::Udp => "udp",
                };
                match &p.name {
                    Some(n) => format!("{n}={}/{proto}", p.port),
                    None => format!("{}/{proto}", p.port),
                }
            })
            .collect();
        println!(
            "   {:<7} {}  {:<11} {:<15} {:<16} ports {}",
            pod.name(),
            node_name(pod.node),
            pod.addr(false),
            pod.addr(true),
            labels.join(","),
            ports.join(" ")
        );
    }
    cluster.wait_synced()?;

    style.step(3, "Before any SecurityGroup: nobody is filtered");
    println!(
        "   A pod that belongs to no group is not filtered (its connections are still tracked).\n   \
         Each cell is a real connection attempt, over IPv4 and IPv6: ✓ opened, ✗ refused\n   \
         (dropped: no answer), · a pod and itself."
    );
    matrix(style, cluster, None)?;

    style.step(4, "Applying the example SecurityGroups (demo/manifests/)");
    for (name, manifest, what) in GROUPS {
        check(interrupted)?;
        cluster.apply_group(manifest)?;
        println!("   {:<11} {what}", name);
    }
    println!(
        "   Waiting until every group is Programmed (the operator's status files: every node\n   \
         concerned acked a version that carries the group's generation):"
    );
    for (name, _, _) in GROUPS {
        let status = cluster.wait_programmed(name)?;
        let nodes = status.nodes.unwrap_or_default();
        println!(
            "   {:<11} Programmed  generation {}  members {}  nodes {}/{}",
            name,
            status.observed_generation.unwrap_or(0),
            status.members,
            nodes.programmed,
            nodes.total
        );
    }
    cluster.wait_synced()?;

    style.step(5, "The connectivity matrix with the groups");
    println!(
        "   Rules are allow-only and stateful: replies pass, so the client's connections to the\n   \
         server work both ways while the server's own attempts to reach the client are refused."
    );
    let enforced = matrix(style, cluster, None)?;

    style.step(6, "What node-2's agent tracks: `kubesg-agent ct list`");
    check(interrupted)?;
    let mut held = cluster.connect("client", "server", 23, false)?;
    if !echoes(&mut held, b"hello", ECHO)? {
        return Err(Failure::Error(
            "the client's connection to the server carries no data".into(),
        ));
    }
    let server = cluster.pod("server")?;
    let ifindex = server.host_ifindex.to_string();
    let client_v4 = cluster.pod("client")?.addr(false).to_string();
    println!(
        "   The client now holds a TCP connection to server:23 open. The server's interface on\n   \
         node-2 (index {ifindex}) has its own table, as each network namespace has its own\n   \
         conntrack; here are its IPv4 entries with the client ({client_v4}), in\n   \
         /proc/net/nf_conntrack's format:"
    );
    println!(
        "   {}",
        style.dim(&format!(
            "$ kubesg-agent ct list --ifindex {ifindex} | grep {client_v4}"
        ))
    );
    let ct = cluster
        .agent(1)
        .cli_ok(&["ct", "list", "--ifindex", &ifindex])?;
    let with_client = format!("={client_v4} ");
    let lines: Vec<&str> = ct.lines().filter(|l| l.contains(&with_client)).collect();
    print_indented(&established_first(&lines.join("\n"), 12));
    println!(
        "   ESTABLISHED: the held connection. TIME_WAIT: the matrix's probes, closed. udp: the\n   \
         UDP probes, answered. SYN_SENT [UNREPLIED]: the server's attempt to reach the client:\n   \
         its own rules let it out, the client's node dropped it (no state is kept there)."
    );

    style.step(7, "Why is a connection refused? `kubesg-agent explain`");
    check(interrupted)?;
    let client_ip = cluster.pod("client")?.addr(false).to_string();
    let server_ip = cluster.pod("server")?.addr(false).to_string();
    println!(
        "   The server (node-2) opening TCP to the client's port 23 (node-1): node-2's agent judges\n   \
         the server's egress, node-1's the client's ingress."
    );
    for node in [1, 0] {
        let args = [
            "explain", "--from", &server_ip, "--to", &client_ip, "--proto", "tcp", "--dport", "23",
        ];
        println!(
            "   {}",
            style.dim(&format!(
                "{}$ kubesg-agent {}",
                node_name(node),
                args.join(" ")
            ))
        );
        print_indented(&cluster.agent(node).cli_ok(&args)?);
    }

    style.step(8, "Changing a manifest: web-2 leaves the web tier");
    check(interrupted)?;
    let mut lb_web2 = cluster.connect("lb", "web-2", 8080, false)?;
    let before = echoes(&mut lb_web2, b"hello", ECHO)?;
    println!(
        "   The load balancer holds a connection to web-2:8080 open (it carries data: {}).\n   \
         Relabelling web-2 from tier=web to tier=canary takes it out of the web group; it stays\n   \
         in dns-egress, so its rules are now that group's only.",
        if before { "yes" } else { "no" }
    );
    println!(
        "   {}",
        style.dim(&format!(
            "$ edit {}/pods/web-2.yaml: labels {{tier: canary}}",
            cluster.manifests_dir().display()
        ))
    );
    cluster.set_labels("web-2", &[("tier", "canary")])?;
    cluster.wait_synced()?;
    let after = echoes(&mut lb_web2, b"again", ECHO)?;
    println!(
        "   Both agents applied the change. The held lb -> web-2 connection {}: tracked\n   \
         connections are re-checked against the new rules (the default; `kubesg-operator run\n   \
         --recheck-on-policy-change false` lets them live on, as AWS does).",
        if after {
            style.paint("33", "still carries data")
        } else {
            style.paint("1", "was cut")
        }
    );
    println!("   The matrix now (* marks what changed):");
    let changed = matrix(style, cluster, Some(&enforced))?;
    let changes = changed.changes_since(&enforced);
    for (from, to) in &changes {
        println!(
            "   {from} -> {}: {} -> {}",
            to.label(),
            verdict_text(&enforced, from, to),
            verdict_text(&changed, from, to)
        );
    }
    if changes.is_empty() {
        return Err(Failure::Error(
            "relabelling web-2 changed nothing in the matrix".into(),
        ));
    }

    style.step(9, "A Kubernetes NetworkPolicy beside the groups");
    check(interrupted)?;
    println!(
        "   demo/manifests/dns-networkpolicy.yaml lets only the web tier and the load balancer\n   \
         query the DNS pod (its UDP port named \"dns\"). The dns group admits every pod of the\n   \
         namespace; where both kinds select a pod, a new connection must pass both layers."
    );
    let policy = cluster.apply_group(NETWORK_POLICY)?;
    let status = cluster.wait_programmed(&policy)?;
    println!(
        "   NetworkPolicy dns-clients Programmed  generation {}  members {}",
        status.observed_generation.unwrap_or(0),
        status.members
    );
    cluster.wait_synced()?;
    println!("   The matrix now (* marks what changed):");
    let layered = matrix(style, cluster, Some(&changed))?;
    let narrowed = layered.changes_since(&changed);
    for (from, to) in &narrowed {
        println!(
            "   {from} -> {}: {} -> {}",
            to.label(),
            verdict_text(&changed, from, to),
            verdict_text(&layered, from, to)
        );
    }
    if narrowed.is_empty() {
        return Err(Failure::Error(
            "the NetworkPolicy changed nothing in the matrix".into(),
        ));
    }
    let client_ip = cluster.pod("client")?.addr(false).to_string();
    let dns_ip = cluster.pod("dns")?.addr(false).to_string();
    let args = [
        "explain", "--from", &client_ip, "--to", &dns_ip, "--proto", "udp", "--dport", "53",
    ];
    println!(
        "   Which layer refuses the client? {}",
        style.dim(&format!(
            "{}$ kubesg-agent {}",
            node_name(0),
            args.join(" ")
        ))
    );
    print_indented(&cluster.agent(0).cli_ok(&args)?);
    Ok(())
}

fn verdict_text(m: &Matrix, from: &str, to: &Target) -> String {
    m.verdict(from, to)
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

/// Probes the matrix, prints it (cells changed since `before` marked) and whether it matches
/// the reference; a mismatch is a failure.
fn matrix(style: &Style, cluster: &LocalCluster, before: Option<&Matrix>) -> Result<Matrix> {
    let m = cluster.matrix(&ROWS, &columns(), &FAMILIES)?;
    println!();
    print_indented(&m.render(before, style.color));
    let mismatches = m.mismatches();
    let probes = m.cells.len();
    if mismatches.is_empty() {
        println!(
            "   {} probes; every one matches the reference evaluation of the manifests.",
            probes
        );
        Ok(m)
    } else {
        let list: Vec<String> = mismatches.iter().map(|x| x.to_string()).collect();
        println!(
            "   {} {} of {probes} probes differ from the reference evaluation (marked !):\n   {}",
            style.paint("31", "MISMATCH:"),
            mismatches.len(),
            list.join("\n   ")
        );
        Err(Failure::Error(
            "traffic differs from the reference evaluation".into(),
        ))
    }
}

/// The conntrack lines with ESTABLISHED ones first, at most `max` of them (and how many more).
fn established_first(ct: &str, max: usize) -> String {
    let mut lines: Vec<&str> = ct.lines().filter(|l| !l.trim().is_empty()).collect();
    lines.sort_by_key(|l| !l.contains("ESTABLISHED"));
    let total = lines.len();
    let mut out: Vec<String> = lines.into_iter().take(max).map(str::to_owned).collect();
    if total > max {
        out.push(format!("… and {} more", total - max));
    }
    out.join("\n")
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("   {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_connections_come_first_and_the_rest_is_counted() {
        let ct = "a TIME_WAIT\nb ESTABLISHED\nc udp\n";
        assert_eq!(
            established_first(ct, 2),
            "b ESTABLISHED\na TIME_WAIT\n… and 1 more"
        );
    }
}
