//! Benchmark of the compiler (not a test): a synthetic cluster of 150 000 pods on 5 000 nodes in
//! 1 000 namespaces with 10 000 SecurityGroups, compiled in full and then changed one object at
//! a time. Prints a table: full compile time and peak memory, and the compute time of single
//! changes (median over several runs). Targets (issue 4): full < 10 s and < 2 GiB; one pod
//! change < 10 ms.
//!
//! Run: `cargo bench -p kubesg-operator --bench compile`.
//!
//! The cluster: namespaces labelled team (50 teams) and env (prod/staging/dev), `ns-0000` the
//! monitoring namespace and `ns-0001` the one serving DNS; in each, 10 apps of 15 replicas with
//! app/tier/version labels and named ports (`http`, `grpc`, `sql`, `metrics`; one namespace in
//! ten runs two versions of its web app with different `http` numbers), dual-stack addresses
//! from per-node /24 and /64 pod ranges, pods spread at random over the nodes. Per namespace ten
//! groups: a default group selecting every pod (metrics scraped from the monitoring namespace:
//! podSelector + namespaceSelector), one per tier (web ← ipBlocks, api ← web of this and the
//! next namespace by securityGroup, db ← api, cache ← podSelector In, worker → db by a named
//! port and → api pods of same-team same-env namespaces; DNS egress to `ns-0001/dns`), and a few
//! small ipBlock/ICMP groups. A Service per app (10 000, dual-stack ClusterIPs, target ports by
//! tier, named for web and api; `ns-0001/app-3` serves DNS): the egress rules admitting their
//! backends admit their ClusterIPs too.
//!
//! Memory is counted by a counting global allocator (live bytes, peak since a reset), so the
//! figure is the compile's own, not the process's; the process's VmHWM is printed too.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use kubesg_operator::{
    compile::{compile, Compiler},
    model::{
        Cluster, Group, NamedPort, Namespace, ObjectKey, Pod, PortProtocol, Service, ServicePort,
        TargetPort,
    },
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded to the system allocator with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's pointer, layout and size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NAMESPACES: usize = 1_000;
const NODES: usize = 5_000;
const APPS: usize = 10;
const REPLICAS: usize = 15;
const TIERS: [&str; 5] = ["web", "api", "worker", "db", "cache"];

/// splitmix64: a fixed sequence, so every run compiles the same cluster.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn ns_name(i: usize) -> String {
    format!("ns-{i:04}")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn named(name: &str, port: u16, protocol: PortProtocol) -> NamedPort {
    NamedPort {
        name: name.into(),
        port,
        protocol,
    }
}

/// The next free address of a node's pod ranges (10.x.y.0/24 and fd00:0:n::/64).
fn node_address(node: usize, next: &mut [u8]) -> (IpAddr, IpAddr) {
    next[node] += 1;
    let host = next[node];
    let v4 = Ipv4Addr::new(10, (node / 256) as u8, (node % 256) as u8, host);
    let v6 = Ipv6Addr::new(0xfd00, 0, node as u16, 0, 0, 0, 0, u16::from(host));
    (IpAddr::V4(v4), IpAddr::V6(v6))
}

fn pod_for(ns: usize, app: usize, replica: usize, node: usize, addr: (IpAddr, IpAddr)) -> Pod {
    let tier = TIERS[app % TIERS.len()];
    // One namespace in ten runs two versions of its web app, with different `http` ports.
    let v2 = ns.is_multiple_of(10) && replica % 2 == 1;
    let mut ports = vec![named("metrics", 9100, PortProtocol::Tcp)];
    match tier {
        "web" => ports.push(named(
            "http",
            if v2 { 8081 } else { 8080 },
            PortProtocol::Tcp,
        )),
        "api" => {
            ports.push(named("grpc", 9090, PortProtocol::Tcp));
            ports.push(named("http", 8080, PortProtocol::Tcp));
        }
        "db" => ports.push(named("sql", 5432, PortProtocol::Tcp)),
        "cache" => ports.push(named("redis", 6379, PortProtocol::Tcp)),
        _ => {}
    }
    let app_name = format!("app-{app}");
    Pod {
        uid: format!("{ns}-{app}-{replica}"),
        node: Some(format!("node-{node:04}")),
        labels: labels(&[
            ("app", &app_name),
            ("tier", tier),
            ("version", if v2 { "v2" } else { "v1" }),
            (
                "pod-template-hash",
                &format!("{:08x}", (ns * 31 + app) * 7919),
            ),
        ]),
        ips: vec![addr.0, addr.1],
        ports,
        host_network: false,
        terminated: false,
        deleting: false,
    }
}

/// The Service of app `app` in namespace `ns`: ports by tier (DNS for `ns-0001/app-3`).
fn service_for(ns: usize, app: usize) -> Service {
    let n = (ns * APPS + app + 1) as u16;
    let port = |protocol, port, target_port| ServicePort {
        protocol,
        port,
        target_port,
    };
    let tcp = PortProtocol::Tcp;
    let ports = match (ns, app, TIERS[app % TIERS.len()]) {
        (1, 3, _) => vec![
            port(PortProtocol::Udp, 53, TargetPort::Number(53)),
            port(tcp, 53, TargetPort::Number(53)),
        ],
        (_, _, "web") => vec![port(tcp, 80, TargetPort::Name("http".into()))],
        (_, _, "api") => vec![
            port(tcp, 9090, TargetPort::Name("grpc".into())),
            port(tcp, 80, TargetPort::Name("http".into())),
        ],
        (_, _, "db") => vec![port(tcp, 5432, TargetPort::Number(5432))],
        (_, _, "cache") => vec![port(tcp, 6379, TargetPort::Number(6379))],
        _ => vec![port(tcp, 8080, TargetPort::Number(8080))],
    };
    Service {
        selector: labels(&[("app", &format!("app-{app}"))]),
        cluster_ips: vec![
            IpAddr::V4(Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, n)),
        ],
        ports,
    }
}

fn group(spec: &str) -> Group {
    Group {
        generation: 1,
        spec: serde_yaml::from_str(spec).expect("bench group YAML"),
        kind: kubesg_operator::model::GroupKind::SecurityGroup,
        origins: None,
        unreadable: None,
    }
}

fn groups_for(i: usize) -> Vec<(&'static str, Group)> {
    let team = format!("team-{}", i % 50);
    let env = ["prod", "staging", "dev"][i % 3];
    let next = ns_name((i + 1) % NAMESPACES);
    vec![
        (
            "default",
            group(
                "podSelector: {}
ingress:
  - ports: [ { port: metrics } ]
    from: [ { namespaceSelector: { matchLabels: { role: monitoring } }, podSelector: { matchLabels: { app: app-0 } } } ]
",
            ),
        ),
        (
            "web",
            group(
                "podSelector: { matchLabels: { tier: web } }
ingress:
  - ports: [ { port: 443 }, { port: http } ]
    from: [ { ipBlock: { cidr: 0.0.0.0/0, except: [ 10.0.0.0/8 ] } }, { ipBlock: { cidr: '::/0' } } ]
egress:
  - ports: [ { port: grpc } ]
    to: [ { securityGroup: { name: api } } ]
  - protocol: UDP
    ports: [ { port: 53 } ]
    to: [ { securityGroup: { name: dns, namespace: ns-0001 } } ]
",
            ),
        ),
        (
            "api",
            group(&format!(
                "podSelector: {{ matchLabels: {{ tier: api }} }}
ingress:
  - ports: [ {{ port: grpc }} ]
    from: [ {{ securityGroup: {{ name: web }} }}, {{ securityGroup: {{ name: web, namespace: {next} }} }} ]
egress:
  - ports: [ {{ port: 5432 }} ]
    to: [ {{ securityGroup: {{ name: db }} }} ]
  - ports: [ {{ port: 6379 }} ]
    to: [ {{ securityGroup: {{ name: cache }} }} ]
  - protocol: UDP
    ports: [ {{ port: 53 }} ]
    to: [ {{ securityGroup: {{ name: dns, namespace: ns-0001 }} }} ]
"
            )),
        ),
        (
            "worker",
            group(&format!(
                "podSelector: {{ matchLabels: {{ tier: worker }} }}
egress:
  - ports: [ {{ port: sql }} ]
    to: [ {{ securityGroup: {{ name: db }} }} ]
  - ports: [ {{ port: 9090 }} ]
    to: [ {{ namespaceSelector: {{ matchLabels: {{ team: {team}, env: {env} }} }}, podSelector: {{ matchLabels: {{ app: app-1 }} }} }} ]
  - protocol: UDP
    ports: [ {{ port: 53 }} ]
    to: [ {{ securityGroup: {{ name: dns, namespace: ns-0001 }} }} ]
"
            )),
        ),
        (
            "db",
            group(
                "podSelector: { matchLabels: { tier: db } }
ingress:
  - ports: [ { port: 5432 } ]
    from: [ { securityGroup: { name: api } } ]
egress: []
",
            ),
        ),
        (
            "cache",
            group(
                "podSelector: { matchLabels: { tier: cache } }
ingress:
  - ports: [ { port: 6379 } ]
    from: [ { podSelector: { matchExpressions: [ { key: tier, operator: In, values: [api, worker] } ] } } ]
egress: []
",
            ),
        ),
        (
            "public",
            group(
                "podSelector: { matchLabels: { app: app-0 } }
ingress:
  - ports: [ { port: 80 } ]
    from: [ { ipBlock: { cidr: 0.0.0.0/0 } } ]
",
            ),
        ),
        (
            "ops",
            group(
                "podSelector: { matchExpressions: [ { key: app, operator: In, values: [app-1, app-2] } ] }
ingress:
  - ports: [ { port: 22 } ]
    from: [ { ipBlock: { cidr: 10.250.0.0/16 } } ]
  - protocol: ICMP
    icmpTypes: [ { type: 8 } ]
",
            ),
        ),
        (
            "backup",
            group(
                "podSelector: { matchLabels: { tier: db } }
egress:
  - ports: [ { port: 443 } ]
    to: [ { ipBlock: { cidr: 10.0.0.0/8, except: [ 10.250.0.0/16 ] } } ]
",
            ),
        ),
        (
            "dns",
            group(
                "podSelector: { matchLabels: { app: app-3 } }
ingress:
  - protocol: UDP
    ports: [ { port: 53 } ]
  - ports: [ { port: 53 } ]
",
            ),
        ),
    ]
}

fn synthetic_cluster() -> Cluster {
    let mut rng = Rng(0x6b75_6265_7367);
    let mut c = Cluster::default();
    let mut next_host = vec![0u8; NODES];
    for n in 0..NODES {
        c.nodes.insert(format!("node-{n:04}"));
    }
    for i in 0..NAMESPACES {
        let name = ns_name(i);
        let team = format!("team-{}", i % 50);
        let env = ["prod", "staging", "dev"][i % 3];
        let mut l = labels(&[
            ("team", &team),
            ("env", env),
            ("kubernetes.io/metadata.name", &name),
        ]);
        if i == 0 {
            l.insert("role".into(), "monitoring".into());
        }
        c.namespaces.insert(name.clone(), Namespace { labels: l });
        for app in 0..APPS {
            for replica in 0..REPLICAS {
                // A node with room left (a /24 holds 250 pods; ~30 land on each).
                let node = loop {
                    let n = rng.below(NODES);
                    if next_host[n] < 250 {
                        break n;
                    }
                };
                let addr = node_address(node, &mut next_host);
                c.pods.insert(
                    ObjectKey::new(name.clone(), format!("app-{app}-{replica}")),
                    pod_for(i, app, replica, node, addr),
                );
            }
        }
        for (g, spec) in groups_for(i) {
            c.groups.insert(ObjectKey::new(name.clone(), g), spec);
        }
        for app in 0..APPS {
            c.services.insert(
                ObjectKey::new(name.clone(), format!("app-{app}")),
                service_for(i, app),
            );
        }
    }
    c
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Row {
    what: String,
    median: Duration,
    max: Duration,
    runs: usize,
    note: String,
}

/// Runs `op` `runs` times on the compiler; `op(i)` performs the i-th change and returns how
/// many nodes it changed.
fn measure(what: &str, runs: usize, mut op: impl FnMut(usize) -> (Duration, usize)) -> Row {
    let mut times = Vec::with_capacity(runs);
    let mut nodes = Vec::with_capacity(runs);
    for i in 0..runs {
        let (t, n) = op(i);
        times.push(t);
        nodes.push(n);
    }
    times.sort();
    nodes.sort();
    Row {
        what: what.into(),
        median: times[runs / 2],
        max: times[runs - 1],
        runs,
        note: format!("{} nodes changed", nodes[runs / 2]),
    }
}

fn main() {
    let t = Instant::now();
    let cluster = synthetic_cluster();
    let build = t.elapsed();
    println!(
        "synthetic cluster: {} namespaces, {} pods, {} nodes, {} groups, {} services (built in {:.1} s)",
        cluster.namespaces.len(),
        cluster.pods.len(),
        cluster.nodes.len(),
        cluster.groups.len(),
        cluster.services.len(),
        build.as_secs_f64()
    );

    // Full compile: memory of the first run, time as the median of three.
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t = Instant::now();
    let compiler = Compiler::new(&cluster);
    let first = t.elapsed();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let kept = LIVE.load(Ordering::Relaxed) - base;
    let stats = compiler.stats();
    let plan = compiler.plan();
    let policy_instances: usize = plan.nodes.values().map(|n| n.policies.len()).sum();
    let set_instances: usize = plan.nodes.values().map(|n| n.sets.len()).sum();
    let set_addresses: usize = plan
        .nodes
        .values()
        .flat_map(|n| n.sets.values())
        .map(|s| s.len())
        .sum();
    let blocks: usize = plan
        .nodes
        .values()
        .flat_map(|n| n.policies.values())
        .map(|p| {
            p.ingress
                .iter()
                .chain(p.egress.iter())
                .map(|r| r.peers.len())
                .sum::<usize>()
        })
        .sum();
    // What each node's agent receives on connecting: its plan's snapshot, encoded.
    let mut snapshot_bytes: Vec<(usize, String)> = plan
        .nodes
        .iter()
        .map(|(node, p)| {
            let update = kubesg_operator::wire::snapshot(
                p,
                1,
                &kubesg_proto::v1alpha1::DatapathSettings::default(),
            );
            (prost::Message::encoded_len(&update), node.clone())
        })
        .collect();
    snapshot_bytes.sort();
    let plan_only = {
        let plan = compiler.into_plan();
        let live = LIVE.load(Ordering::Relaxed) - base;
        drop(plan);
        live
    };
    let mut full_times = vec![first];
    for _ in 0..2 {
        let t = Instant::now();
        let plan = compile(&cluster);
        full_times.push(t.elapsed());
        drop(plan);
    }
    full_times.sort();

    // Incremental: one compiler, changes applied one at a time.
    let mut compiler = Compiler::new(&cluster);
    let runs = 21;
    let key =
        |ns: usize, app: usize, r: usize| ObjectKey::new(ns_name(ns), format!("app-{app}-{r}"));
    let mut rows = Vec::new();

    rows.push(measure(
        "pod label change, no effect (version)",
        runs,
        |i| {
            let k = key(100 + i, 2, 3);
            let mut p = cluster.pods[&k].clone();
            p.labels.insert("version".into(), "v9".into());
            let t = Instant::now();
            let ch = compiler.upsert_pod(k, p);
            (t.elapsed(), ch.nodes.len())
        },
    ));
    rows.push(measure("pod label change, tier web -> api", runs, |i| {
        let k = key(200 + i, 0, 4);
        let mut p = cluster.pods[&k].clone();
        p.labels.insert("tier".into(), "api".into());
        let t = Instant::now();
        let ch = compiler.upsert_pod(k, p);
        (t.elapsed(), ch.nodes.len())
    }));
    rows.push(measure("pod IP change (a db pod)", runs, |i| {
        let k = key(300 + i, 3, 5);
        let mut p = cluster.pods[&k].clone();
        p.ips = vec![
            IpAddr::V4(Ipv4Addr::new(10, 251, 0, i as u8)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0xfb, 0, 0, 0, 0, 0, i as u16)),
        ];
        let t = Instant::now();
        let ch = compiler.upsert_pod(k, p);
        (t.elapsed(), ch.nodes.len())
    }));
    rows.push(measure("pod added (api replica)", runs, |i| {
        let k = ObjectKey::new(ns_name(400 + i), "app-1-new");
        let mut p = cluster.pods[&key(400 + i, 1, 0)].clone();
        p.uid = format!("new-{i}");
        p.ips = vec![IpAddr::V4(Ipv4Addr::new(10, 252, 0, i as u8))];
        let t = Instant::now();
        let ch = compiler.upsert_pod(k, p);
        (t.elapsed(), ch.nodes.len())
    }));
    rows.push(measure("pod deleted (web replica)", runs, |i| {
        let k = key(500 + i, 0, 7);
        let t = Instant::now();
        let ch = compiler.delete_pod(&k);
        (t.elapsed(), ch.nodes.len())
    }));
    rows.push(measure("group rule edit (api: +port 9091)", runs, |i| {
        let gk = ObjectKey::new(ns_name(600 + i), "api");
        let mut g = cluster.groups[&gk].clone();
        g.generation = 2;
        if let Some(rules) = g.spec.ingress.as_mut() {
            if let Some(ports) = rules[0].ports.as_mut() {
                ports.push(serde_yaml::from_str("{ port: 9091 }").expect("port"));
            }
        }
        let t = Instant::now();
        let ch = compiler.upsert_group(gk, g);
        (t.elapsed(), ch.nodes.len())
    }));
    rows.push(measure("namespace label change (env)", runs, |i| {
        let n = ns_name(700 + i);
        let mut ns = cluster.namespaces[&n].clone();
        ns.labels.insert("env".into(), "prod-eu".into());
        let t = Instant::now();
        let ch = compiler.upsert_namespace(&n, ns);
        (t.elapsed(), ch.nodes.len())
    }));
    // The widest fan-out: every pod's policy admits the monitoring pods, so moving one changes
    // what every node holds: the monitoring address set (policies name it, they do not move).
    rows.push(measure(
        "monitoring pod IP change (every node)",
        runs,
        |i| {
            let k = key(0, 0, i % 15);
            let mut p = cluster.pods[&k].clone();
            p.ips = vec![IpAddr::V4(Ipv4Addr::new(10, 253, 0, i as u8))];
            let t = Instant::now();
            let ch = compiler.upsert_pod(k, p);
            (t.elapsed(), ch.nodes.len())
        },
    ));

    // A DNS pod behind the Service every group's DNS rule admits: each of those groups judges
    // that Service again (its ClusterIPs stay admitted: nothing else changes).
    rows.push(measure("DNS Service backend IP change", runs, |i| {
        let k = key(1, 3, i % 15);
        let mut p = cluster.pods[&k].clone();
        p.ips = vec![
            IpAddr::V4(Ipv4Addr::new(10, 254, 0, i as u8)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0xfe, 0, 0, 0, 0, 0, i as u16)),
        ];
        let t = Instant::now();
        let ch = compiler.upsert_pod(k, p);
        (t.elapsed(), ch.nodes.len())
    }));
    rows.push(measure("Service port added (api: +8443)", runs, |i| {
        let k = ObjectKey::new(ns_name(800 + i), "app-1");
        let mut svc = cluster.services[&k].clone();
        svc.ports.push(ServicePort {
            protocol: PortProtocol::Tcp,
            port: 8443,
            target_port: TargetPort::Name("grpc".into()),
        });
        let t = Instant::now();
        let ch = compiler.upsert_service(k, svc);
        (t.elapsed(), ch.nodes.len())
    }));

    println!();
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| full compile (median of 3) | {:.2} s (runs: {}) |",
        full_times[1].as_secs_f64(),
        full_times
            .iter()
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| full compile peak memory (allocated, above the cluster) | {:.0} MiB |",
        mib(peak)
    );
    println!(
        "| kept after compile: plan / compiler's indexes | {:.0} MiB / {:.0} MiB |",
        mib(plan_only),
        mib(kept - plan_only)
    );
    println!(
        "| process VmHWM (cluster + compilers) | {} |",
        vm_hwm_kib().map_or("n/a".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
    );
    println!(
        "| member pods / classes / distinct policies / address sets | {} / {} / {} / {} |",
        stats.member_pods, stats.classes, stats.policies, stats.sets
    );
    println!(
        "| policy copies on nodes / avg peer blocks per copy | {} / {:.0} |",
        policy_instances,
        blocks as f64 / policy_instances.max(1) as f64
    );
    println!(
        "| set copies on nodes / avg addresses per copy | {} / {:.0} |",
        set_instances,
        set_addresses as f64 / set_instances.max(1) as f64
    );
    if let (Some((largest, node)), Some((median, _))) = (
        snapshot_bytes.last(),
        snapshot_bytes.get(snapshot_bytes.len() / 2),
    ) {
        println!(
            "| node snapshot, encoded: largest ({node}) / median | {:.2} MiB / {:.2} MiB (message limit {} MiB) |",
            mib(*largest),
            mib(*median),
            kubesg_proto::MAX_MESSAGE_BYTES >> 20
        );
    }
    println!();
    println!("| incremental change | median | max | runs | |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {:.3} ms | {:.3} ms | {} | {} |",
            r.what,
            ms(r.median),
            ms(r.max),
            r.runs,
            r.note
        );
    }
}
