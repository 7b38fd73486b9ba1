//! The demo's SecurityGroups and NetworkPolicy applied with `kubectl apply` into a namespace of Deployments whose
//! pods the kubelet starts through containerd and the chained kubesg-cni, with a Service per
//! tier: the connectivity matrix that real traffic shows, over pod IPs and over the Services'
//! ClusterIPs, both families, equals the reference evaluation of what the API server holds
//! (`kubesg_operator::reference`, on the objects read back with `kubectl get`).
//!
//! Probes run from the test process inside each pod's network namespace (containerd names them
//! under /run/netns), so a probe's packets cross the pod's interface as the pod's own would: a
//! TCP connect, or a UDP `echo` request agnhost netexec answers.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
};

use kubesg_operator::{manifests::ManifestDir, model::Cluster, reference};
use kubesg_testkit::{
    kube::Kube,
    matrix::{Cell, Matrix, Target},
    netns::{in_named, is_timeout},
    probe::{Probe, Verdict, TCP_TIMEOUT, UDP_TIMEOUT},
};

use super::{eventually, netns_of, wait_policy_programmed, wait_programmed, AGNHOST, PATIENCE};

/// The demo's groups (demo/manifests), applied as a user would.
const DEMO_MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../demo/manifests");

/// One workload of the demo: its Deployment's labels, replicas, and the ports its agnhost
/// serves (name, port, UDP?).
struct Workload {
    name: &'static str,
    label: (&'static str, &'static str),
    replicas: u8,
    ports: &'static [(&'static str, u16, bool)],
}

/// The demo's pods (demo/src/main.rs), as Deployments.
const WORKLOADS: &[Workload] = &[
    Workload {
        name: "client",
        label: ("app", "client"),
        replicas: 1,
        ports: &[("", 23, false)],
    },
    Workload {
        name: "server",
        label: ("app", "server"),
        replicas: 1,
        ports: &[("telnet", 23, false), ("", 23, true)],
    },
    Workload {
        name: "lb",
        label: ("app", "lb"),
        replicas: 1,
        ports: &[("http", 80, false)],
    },
    Workload {
        name: "web",
        label: ("tier", "web"),
        replicas: 2,
        ports: &[("http", 8080, false)],
    },
    Workload {
        name: "db",
        label: ("app", "db"),
        replicas: 1,
        ports: &[("postgres", 5432, false)],
    },
    Workload {
        name: "dns",
        label: ("app", "dns"),
        replicas: 1,
        ports: &[("dns", 53, true)],
    },
];

/// The Services (name, selected workload, port, target port, UDP?), dual-stack; the target
/// port's number on the backends is the workload's port of that name.
const SERVICES: &[(&str, &str, u16, &str, bool)] = &[
    ("server", "server", 23, "telnet", false),
    ("server", "server", 23, "23", true),
    ("lb", "lb", 80, "http", false),
    ("web", "web", 80, "http", false),
    ("db", "db", 5432, "postgres", false),
    ("dns", "dns", 53, "dns", true),
];

/// The pods behind a Service column: their workload, then (address, target port) per family
/// (IPv4, IPv6).
type Behind<'a> = (&'a str, Vec<(IpAddr, u16)>, Vec<(IpAddr, u16)>);

/// The number a Service's target port reaches on `workload`'s pods.
fn target_number(workload: &str, target: &str, udp: bool) -> u16 {
    target.parse().unwrap_or_else(|_| {
        WORKLOADS
            .iter()
            .find(|w| w.name == workload)
            .and_then(|w| w.ports.iter().find(|p| p.0 == target && p.2 == udp))
            .map(|p| p.1)
            .expect("a named port of the workload")
    })
}

/// What the reference says of a connection from `src` to a Service's ClusterIP `dst`: the
/// client's egress judges the ClusterIP and the Service port (the operator resolves it to the
/// pods behind it); the backend kube-proxy picks judges its ingress on the target port, with
/// the client's own address. Every backend must agree, or which one is picked would decide.
fn expected_via_service(
    model: &Cluster,
    src: IpAddr,
    dst: IpAddr,
    probe: Probe,
    v6: bool,
    backends: &[(IpAddr, u16)],
) -> Verdict {
    let egress = reference::allows(
        model,
        &reference::Connection {
            src,
            dst,
            protocol: probe.protocol(v6),
            port: probe.port(v6),
        },
    );
    let ingress: Vec<bool> = backends
        .iter()
        .map(|(ip, port)| {
            let pod = reference::endpoint(model, *ip).expect("a backend is an enforced pod");
            reference::ingress_allows(model, pod, probe.protocol(v6), *port, src)
        })
        .collect();
    assert!(
        ingress.windows(2).all(|w| w[0] == w[1]),
        "the backends of {dst} disagree on {src}: {ingress:?}"
    );
    Verdict::from_bool(egress && ingress.first().copied().unwrap_or(false))
}

/// A Deployment running agnhost netexec on the workload's ports.
fn deployment(w: &Workload) -> String {
    let tcp = w.ports.iter().find(|p| !p.2).map(|p| p.1);
    let udp = w.ports.iter().find(|p| p.2).map(|p| p.1);
    // netexec always serves HTTP; a UDP-only workload serves it on a port nobody probes.
    let mut args = format!("netexec, \"--http-port={}\"", tcp.unwrap_or(8081));
    if let Some(u) = udp {
        args.push_str(&format!(", \"--udp-port={u}\""));
    }
    let ports: String = w
        .ports
        .iter()
        .map(|(name, port, udp)| {
            let proto = if *udp { "UDP" } else { "TCP" };
            let name = if name.is_empty() {
                String::new()
            } else {
                format!("name: {name}, ")
            };
            format!("        - {{{name}containerPort: {port}, protocol: {proto}}}\n")
        })
        .collect();
    let (k, v) = w.label;
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{{k}: {v}}}}}\n  template:\n    metadata:\n      labels: {{{k}: {v}}}\n    spec:\n      containers:\n      - name: agnhost\n        image: {AGNHOST}\n        imagePullPolicy: Never\n        args: [{args}]\n        ports:\n{ports}",
        name = w.name,
        replicas = w.replicas,
    )
}

/// The Service of `name` with its ports.
fn service(name: &str) -> String {
    let w = WORKLOADS
        .iter()
        .find(|w| SERVICES.iter().any(|s| s.0 == name && s.1 == w.name))
        .expect("a workload");
    let (k, v) = w.label;
    let ports: String = SERVICES
        .iter()
        .filter(|s| s.0 == name)
        .map(|(_, _, port, target, udp)| {
            let proto = if *udp { "UDP" } else { "TCP" };
            let target = if target.parse::<u16>().is_ok() {
                target.to_string()
            } else {
                format!("\"{target}\"")
            };
            format!(
                "  - {{name: {}-{port}, port: {port}, targetPort: {target}, protocol: {proto}}}\n",
                proto.to_lowercase()
            )
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ipFamilyPolicy: PreferDualStack\n  selector: {{{k}: {v}}}\n  ports:\n{ports}"
    )
}

/// A pod of the namespace: its name, addresses (IPv4, IPv6) and network namespace.
struct PodAt {
    name: String,
    v4: IpAddr,
    v6: IpAddr,
    netns: String,
}

/// The namespace's pods, named for their workload (`web-1`, `web-2` for the two web pods).
fn pods(kube: &Kube, ns: &str) -> Vec<PodAt> {
    let out = kube.must(&[
        "-n",
        ns,
        "get",
        "pods",
        "-o",
        "jsonpath={range .items[*]}{.metadata.labels.app}{.metadata.labels.tier} {.status.podIPs[*].ip}{\"\\n\"}{end}",
    ]);
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    lines
        .iter()
        .map(|line| {
            let mut f = line.split_whitespace();
            let workload = f.next().expect("a workload label").to_string();
            let ips: Vec<IpAddr> = f.map(|a| a.parse().expect("a pod IP")).collect();
            let v4 = *ips.iter().find(|a| a.is_ipv4()).expect("an IPv4 address");
            let v6 = *ips.iter().find(|a| a.is_ipv6()).expect("an IPv6 address");
            let replicas = WORKLOADS
                .iter()
                .find(|w| w.name == workload)
                .map_or(1, |w| w.replicas);
            let n = seen.entry(workload.clone()).or_default();
            *n += 1;
            let name = if replicas > 1 {
                format!("{workload}-{n}")
            } else {
                workload
            };
            PodAt {
                name,
                v4,
                v6,
                netns: netns_of(&v4.to_string()),
            }
        })
        .collect()
}

/// The cluster as the API server holds it, read back with `kubectl get` and loaded as the
/// operator's manifests mode loads objects.
fn model(kube: &Kube) -> Cluster {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let list = kube.must(&[
        "get",
        "namespaces,pods,securitygroups,networkpolicies,services",
        "-A",
        "-o",
        "json",
    ]);
    let list: serde_json::Value = serde_json::from_str(&list).expect("kubectl's JSON");
    for (i, item) in list["items"].as_array().expect("a list").iter().enumerate() {
        fs::write(
            dir.path().join(format!("{i:05}.yaml")),
            serde_json::to_vec(item).expect("JSON"),
        )
        .expect("writing an object");
    }
    let scan = ManifestDir::new(dir.path())
        .scan()
        .expect("scanning the objects");
    assert!(
        scan.problems.is_empty(),
        "objects the model refused: {:?}",
        scan.problems
    );
    scan.cluster
}

/// Runs `probe` from inside `netns` to `to`: a RST or an ICMP error (nothing listens) fails
/// the test, it is not a verdict.
fn probe(netns: &str, probe: Probe, to: IpAddr) -> Verdict {
    let what = format!("{probe} probe {netns} -> {to}");
    match probe {
        Probe::Tcp(port) => {
            let addr = SocketAddr::new(to, port);
            match in_named(netns, || TcpStream::connect_timeout(&addr, TCP_TIMEOUT))
                .expect("entering the pod's namespace")
            {
                Ok(_) => Verdict::Allowed,
                Err(e) if is_timeout(&e) => Verdict::Refused,
                Err(e) => panic!("{what}: {e}"),
            }
        }
        Probe::Udp(port) => {
            let addr = SocketAddr::new(to, port);
            let local: SocketAddr = if to.is_ipv6() {
                "[::]:0".parse().expect("an address")
            } else {
                "0.0.0.0:0".parse().expect("an address")
            };
            let sock = in_named(netns, || UdpSocket::bind(local))
                .expect("entering the pod's namespace")
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            sock.set_read_timeout(Some(UDP_TIMEOUT)).expect("timeout");
            sock.connect(addr).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut buf = [0u8; 64];
            for _ in 0..2 {
                sock.send(b"echo probe")
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                match sock.recv(&mut buf) {
                    Ok(n) if &buf[..n] == b"probe" => return Verdict::Allowed,
                    Ok(n) => panic!("{what}: unexpected answer {:?}", &buf[..n]),
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => panic!("{what}: {e}"),
                }
            }
            Verdict::Refused
        }
        Probe::Ping => unreachable!("the matrix sends no ping"),
    }
}

/// Applies the demo into a namespace of its own and asserts that the connectivity matrix over
/// pod IPs and ClusterIPs equals the reference evaluation.
pub fn the_demo_groups_matrix_equals_the_reference_over_pod_ips_and_cluster_ips(kube: &Kube) {
    let ns = kube.namespace("sg-demo-");
    let n = ns.name.as_str();
    for w in WORKLOADS {
        kube.must_apply(&format!(
            "{}---\n",
            deployment(w).replace(
                "metadata:\n  name:",
                &format!("metadata:\n  namespace: {n}\n  name:")
            )
        ));
    }
    let mut names: Vec<&str> = SERVICES.iter().map(|s| s.0).collect();
    names.dedup();
    for name in &names {
        kube.must_apply(&service(name).replace(
            "metadata:\n  name:",
            &format!("metadata:\n  namespace: {n}\n  name:"),
        ));
    }
    kube.must(&["-n", n, "apply", "-f", DEMO_MANIFESTS]);
    for w in WORKLOADS {
        kube.must(&[
            "-n",
            n,
            "rollout",
            "status",
            &format!("deployment/{}", w.name),
            &format!("--timeout={}s", PATIENCE.as_secs()),
        ]);
    }
    for group in ["client", "server", "lb", "web", "db", "dns", "dns-egress"] {
        wait_programmed(kube, n, group);
    }
    wait_policy_programmed(kube, n, "dns-clients");
    let pods = pods(kube, n);
    let services: BTreeMap<String, (IpAddr, IpAddr)> = names
        .iter()
        .map(|name| {
            let ips = eventually(&format!("service {name} has both ClusterIPs"), || {
                let out = kube.must(&[
                    "-n",
                    n,
                    "get",
                    "service",
                    name,
                    "-o",
                    "jsonpath={.spec.clusterIPs[*]}",
                ]);
                let ips: Vec<IpAddr> = out
                    .split_whitespace()
                    .filter_map(|a| a.parse().ok())
                    .collect();
                match (
                    ips.iter().find(|a| a.is_ipv4()),
                    ips.iter().find(|a| a.is_ipv6()),
                ) {
                    (Some(a), Some(b)) => Ok((*a, *b)),
                    _ => Err(out),
                }
            });
            (name.to_string(), ips)
        })
        .collect();
    let model = model(kube);

    let mut columns: Vec<Target> = Vec::new();
    let mut addrs: Vec<(IpAddr, IpAddr)> = Vec::new();
    // For a Service column, its backends.
    let mut via: Vec<Option<Behind>> = Vec::new();
    for pod in &pods {
        let workload = pod.name.split('-').next().unwrap_or_default();
        let w = WORKLOADS
            .iter()
            .find(|w| w.name == workload)
            .expect("a workload");
        for (_, port, udp) in w.ports {
            let probe = if *udp {
                Probe::Udp(*port)
            } else {
                Probe::Tcp(*port)
            };
            columns.push(Target {
                pod: pod.name.clone(),
                probe,
            });
            addrs.push((pod.v4, pod.v6));
            via.push(None);
        }
    }
    for (name, workload, port, target, udp) in SERVICES {
        let probe = if *udp {
            Probe::Udp(*port)
        } else {
            Probe::Tcp(*port)
        };
        columns.push(Target {
            pod: format!("svc/{name}"),
            probe,
        });
        addrs.push(services[*name]);
        let number = target_number(workload, target, *udp);
        let behind: Vec<&PodAt> = pods
            .iter()
            .filter(|p| p.name.split('-').next() == Some(*workload))
            .collect();
        via.push(Some((
            workload,
            behind.iter().map(|p| (p.v4, number)).collect(),
            behind.iter().map(|p| (p.v6, number)).collect(),
        )));
    }
    let rows: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();

    let cells: BTreeMap<(usize, usize, bool), Cell> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(r, from)| {
                let (columns, addrs, via, model) = (&columns, &addrs, &via, &model);
                s.spawn(move || {
                    let mut cells = Vec::new();
                    for (c, target) in columns.iter().enumerate() {
                        // A pod does not probe itself, nor a Service it is behind (kube-proxy
                        // would masquerade the hairpin connection as from the node).
                        let workload = from.name.split('-').next().unwrap_or_default();
                        if target.pod == from.name
                            || via[c].as_ref().is_some_and(|(w, _, _)| *w == workload)
                        {
                            continue;
                        }
                        for v6 in [false, true] {
                            let (to4, to6) = addrs[c];
                            let to = if v6 { to6 } else { to4 };
                            let src = if v6 { from.v6 } else { from.v4 };
                            let expected = match &via[c] {
                                Some((_, b4, b6)) => expected_via_service(
                                    model,
                                    src,
                                    to,
                                    target.probe,
                                    v6,
                                    if v6 { b6 } else { b4 },
                                ),
                                None => Verdict::from_bool(reference::allows(
                                    model,
                                    &reference::Connection {
                                        src,
                                        dst: to,
                                        protocol: target.probe.protocol(v6),
                                        port: target.probe.port(v6),
                                    },
                                )),
                            };
                            let observed = probe(&from.netns, target.probe, to);
                            cells.push(((r, c, v6), Cell { observed, expected }));
                        }
                    }
                    cells
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let matrix = Matrix {
        rows,
        columns,
        cells,
    };
    let rendered = matrix.render(None, false);
    eprintln!("{rendered}");
    let mismatches = matrix.mismatches();
    assert!(
        mismatches.is_empty(),
        "traffic differs from the reference evaluation:\n{rendered}\n{}",
        mismatches
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let allowed = matrix
        .cells
        .values()
        .filter(|c| c.observed == Verdict::Allowed)
        .count();
    assert!(
        allowed > 0 && allowed < matrix.cells.len(),
        "the matrix allows some and refuses some: {allowed} of {}",
        matrix.cells.len()
    );
}
