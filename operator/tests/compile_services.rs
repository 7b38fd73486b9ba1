//! Services, case by case: an egress rule that admits every backend of a Service on the port
//! the Service sends to admits the Service's ClusterIPs on the Service port. Target ports
//! (numbers and names), the every-backend rule, address families, peers of every kind,
//! Services that resolve nothing, and the incremental compiler following Service, backend,
//! namespace and group changes. Every verdict is also checked against the reference
//! evaluation.

mod compile_support;

use std::collections::BTreeMap;

use compile_support::*;
use kubesg_operator::{
    changes::ClusterChange,
    compile::{compile, Compiler},
    model::{Cluster, Namespace, Pod, PortProtocol, Service, ServicePort, TargetPort},
    plan::Plan,
    reference,
};

const DB_V4: &str = "10.96.0.10";
const DB_V6: &str = "fd00:96::10";

/// A Service selecting `app: <app>` with ClusterIPs and (protocol, port, target) ports.
fn service(app: &str, ips: &[&str], ports: &[(PortProtocol, u16, TargetPort)]) -> Service {
    Service {
        selector: BTreeMap::from([("app".to_owned(), app.to_owned())]),
        cluster_ips: ips.iter().map(|s| ip(s)).collect(),
        ports: ports
            .iter()
            .map(|(protocol, port, target_port)| ServicePort {
                protocol: *protocol,
                port: *port,
                target_port: target_port.clone(),
            })
            .collect(),
    }
}

fn number(n: u16) -> TargetPort {
    TargetPort::Number(n)
}

fn name(n: &str) -> TargetPort {
    TargetPort::Name(n.into())
}

/// A client in `shop` and two database backends (dual-stack, on two nodes), with Service
/// `shop/db` (port 5432 → 5432) in front of them; the client's group `client` has the egress
/// rules `egress` (YAML list items).
fn db_world(egress: &str) -> World {
    let mut w = World::default();
    w.ns("shop", &[("team", "shop")])
        .ns("ops", &[("team", "ops")])
        .pod(
            "shop",
            "client",
            pod("n1", &[("app", "client")], &["10.0.1.1", "fd00::1:1"]),
        )
        .pod(
            "shop",
            "db-0",
            pod("n1", &[("app", "db")], &["10.0.1.2", "fd00::1:2"]),
        )
        .pod(
            "shop",
            "db-1",
            pod("n2", &[("app", "db")], &["10.0.2.2", "fd00::2:2"]),
        )
        .group(
            "shop",
            "client",
            &format!("podSelector: {{ matchLabels: {{ app: client }} }}\negress:\n{egress}"),
        );
    w.cluster.services.insert(
        key("shop", "db"),
        service(
            "db",
            &[DB_V4, DB_V6],
            &[(PortProtocol::Tcp, 5432, number(5432))],
        ),
    );
    w
}

/// Whether `src` may open the connection, by the compiled plan; asserts the reference agrees.
fn sends_checked(c: &Cluster, plan: &Plan, src: &str, proto: u8, port: u16, dst: &str) -> bool {
    let from = reference::endpoint(c, ip(src)).expect("the source is a pod");
    let compiled = sends(plan, from, proto, port, dst);
    assert_eq!(
        compiled,
        reference::egress_allows(c, from, proto, port, ip(dst)),
        "{from} → {dst} {proto}/{port}: compiled and reference differ"
    );
    compiled
}

const CLIENT: &str = "10.0.1.1";
const CLIENT_V6: &str = "fd00::1:1";

#[test]
fn a_rule_admitting_every_backend_admits_the_cluster_ips_on_the_service_port() {
    let w = db_world("  - ports: [ { port: 5432 } ]\n    to: [ { podSelector: { matchLabels: { app: db } } } ]\n");
    let c = &w.cluster;
    let plan = compile(c);
    assert!(sends_checked(c, &plan, CLIENT, TCP, 5432, DB_V4));
    assert!(sends_checked(c, &plan, CLIENT_V6, TCP, 5432, DB_V6));
    assert!(
        sends_checked(c, &plan, CLIENT, TCP, 5432, "10.0.2.2"),
        "the pods too"
    );
    assert!(
        !sends_checked(c, &plan, CLIENT, TCP, 5433, DB_V4),
        "only the Service port"
    );
    assert!(
        !sends_checked(c, &plan, CLIENT, UDP, 5432, DB_V4),
        "only its protocol"
    );
    let policy = policy_of(&plan, &key("shop", "client")).unwrap();
    let via: Vec<_> = policy
        .egress
        .iter()
        .filter(|r| r.origin.contains("via"))
        .map(|r| r.origin.as_str())
        .collect();
    assert_eq!(via, ["shop/client egress[0] via Service shop/db"]);
}

#[test]
fn the_target_port_is_judged_and_the_service_port_admitted() {
    let mut w = db_world("  - ports: [ { port: 8080 } ]\n    to: [ { podSelector: { matchLabels: { app: db } } } ]\n");
    w.cluster.services.insert(
        key("shop", "db"),
        service(
            "db",
            &[DB_V4],
            &[
                (PortProtocol::Tcp, 80, number(8080)),
                (PortProtocol::Tcp, 8080, number(80)),
            ],
        ),
    );
    let c = &w.cluster;
    let plan = compile(c);
    assert!(sends_checked(c, &plan, CLIENT, TCP, 80, DB_V4), "80 → 8080");
    assert!(
        !sends_checked(c, &plan, CLIENT, TCP, 8080, DB_V4),
        "8080 → 80, which the rule does not admit"
    );
}

#[test]
fn a_named_target_port_resolves_on_each_backend() {
    let http = |p: Pod, port: u16| with_ports(p, &[("http", port, PortProtocol::Tcp)]);
    let world = |egress: &str, db1_port: Option<u16>| {
        let mut w = db_world(egress);
        let db0 = w.cluster.pods[&key("shop", "db-0")].clone();
        let db1 = w.cluster.pods[&key("shop", "db-1")].clone();
        w.pod("shop", "db-0", http(db0, 8080));
        match db1_port {
            Some(port) => w.pod("shop", "db-1", http(db1, port)),
            None => &mut w,
        };
        w.cluster.services.insert(
            key("shop", "db"),
            service("db", &[DB_V4], &[(PortProtocol::Tcp, 80, name("http"))]),
        );
        w
    };
    let to_db = "    to: [ { podSelector: { matchLabels: { app: db } } } ]\n";
    // Both backends' ports admitted.
    let w = world(
        &format!("  - ports: [ {{ port: 8080 }}, {{ port: 8081 }} ]\n{to_db}"),
        Some(8081),
    );
    let plan = compile(&w.cluster);
    assert!(sends_checked(&w.cluster, &plan, CLIENT, TCP, 80, DB_V4));
    // One backend's port is not.
    let w = world(
        &format!("  - ports: [ {{ port: 8080 }} ]\n{to_db}"),
        Some(8081),
    );
    let plan = compile(&w.cluster);
    assert!(!sends_checked(&w.cluster, &plan, CLIENT, TCP, 80, DB_V4));
    // The rule names the port too: resolved on each backend, both admitted.
    let w = world(
        &format!("  - ports: [ {{ port: http }} ]\n{to_db}"),
        Some(8081),
    );
    let plan = compile(&w.cluster);
    assert!(sends_checked(&w.cluster, &plan, CLIENT, TCP, 80, DB_V4));
    // A backend without the port is not admitted, so neither is the ClusterIP.
    let w = world(&format!("  - ports: [ {{ port: 8080 }} ]\n{to_db}"), None);
    let plan = compile(&w.cluster);
    assert!(!sends_checked(&w.cluster, &plan, CLIENT, TCP, 80, DB_V4));
}

#[test]
fn one_backend_the_rule_does_not_admit_withdraws_the_cluster_ip() {
    let w = db_world("  - ports: [ { port: 5432 } ]\n    to: [ { podSelector: { matchLabels: { app: db, role: primary } } } ]\n");
    let mut c = w.cluster.clone();
    for name in ["db-0", "db-1"] {
        c.pods
            .get_mut(&key("shop", name))
            .unwrap()
            .labels
            .insert("role".into(), "primary".into());
    }
    let mut compiler = Compiler::new(&c);
    assert!(sends_checked(&c, compiler.plan(), CLIENT, TCP, 5432, DB_V4));

    // A new backend the rule does not admit (a replica): a connection to the ClusterIP could
    // land on it, so the ClusterIP is no longer admitted; the primaries still are.
    let replica = pod("n2", &[("app", "db"), ("role", "replica")], &["10.0.2.9"]);
    let change = ClusterChange::UpsertPod(key("shop", "db-2"), replica);
    let changed = compiler.apply(&change);
    c.apply(&change);
    assert!(
        changed.nodes.contains("n1"),
        "the client's node: {changed:?}"
    );
    assert!(!sends_checked(
        &c,
        compiler.plan(),
        CLIENT,
        TCP,
        5432,
        DB_V4
    ));
    assert!(sends_checked(
        &c,
        compiler.plan(),
        CLIENT,
        TCP,
        5432,
        "10.0.1.2"
    ));
    assert_eq!(compiler.plan(), &compile(&c));

    // The replica relabelled as a primary: admitted again.
    let mut primary = c.pods[&key("shop", "db-2")].clone();
    primary.labels.insert("role".into(), "primary".into());
    let change = ClusterChange::UpsertPod(key("shop", "db-2"), primary);
    compiler.apply(&change);
    c.apply(&change);
    assert!(sends_checked(&c, compiler.plan(), CLIENT, TCP, 5432, DB_V4));
    assert_eq!(compiler.plan(), &compile(&c));
}

#[test]
fn each_cluster_ip_is_judged_on_the_backend_addresses_of_its_family() {
    // An ipBlock of the IPv4 pod network admits every backend's IPv4 address only.
    let w =
        db_world("  - ports: [ { port: 5432 } ]\n    to: [ { ipBlock: { cidr: 10.0.0.0/16 } } ]\n");
    let c = &w.cluster;
    let plan = compile(c);
    assert!(sends_checked(c, &plan, CLIENT, TCP, 5432, DB_V4));
    assert!(!sends_checked(c, &plan, CLIENT_V6, TCP, 5432, DB_V6));

    // IPv4-only backends: the IPv6 ClusterIP has no backend, so it is not admitted.
    let mut w = db_world("  - ports: [ { port: 5432 } ]\n    to: [ { podSelector: { matchLabels: { app: db } } } ]\n");
    for name in ["db-0", "db-1"] {
        w.cluster
            .pods
            .get_mut(&key("shop", name))
            .unwrap()
            .ips
            .retain(|a| a.is_ipv4());
    }
    let c = &w.cluster;
    let plan = compile(c);
    assert!(sends_checked(c, &plan, CLIENT, TCP, 5432, DB_V4));
    assert!(!sends_checked(c, &plan, CLIENT_V6, TCP, 5432, DB_V6));

    // A named target port missing on an IPv4-only backend withdraws the IPv4 ClusterIP only:
    // the IPv6 one sends to the IPv6-only backend, which has it (found by the property test).
    let mut w = db_world("  - ports: [ { port: 5432 } ]\n    to: [ { podSelector: { matchLabels: { app: db } } } ]\n");
    let only = |w: &mut World, name: &str, v4: bool| {
        w.cluster
            .pods
            .get_mut(&key("shop", name))
            .unwrap()
            .ips
            .retain(|a| a.is_ipv4() == v4);
    };
    only(&mut w, "db-0", false);
    only(&mut w, "db-1", true);
    let db0 = w.cluster.pods[&key("shop", "db-0")].clone();
    w.pod(
        "shop",
        "db-0",
        with_ports(db0, &[("pg", 5432, PortProtocol::Tcp)]),
    );
    w.cluster.services.insert(
        key("shop", "db"),
        service(
            "db",
            &[DB_V4, DB_V6],
            &[(PortProtocol::Tcp, 5432, name("pg"))],
        ),
    );
    let c = &w.cluster;
    let plan = compile(c);
    assert!(!sends_checked(c, &plan, CLIENT, TCP, 5432, DB_V4));
    assert!(sends_checked(c, &plan, CLIENT_V6, TCP, 5432, DB_V6));
}

#[test]
fn group_namespace_selector_block_and_anyone_peers_admit_services_too() {
    // Port 80 → 5432: only the Service's resolution admits the ClusterIP on 80 (no rule names
    // port 80 or the ClusterIP's block).
    let rules = [
        "  - ports: [ { port: 5432 } ]\n    to: [ { securityGroup: { name: db } } ]\n",
        "  - ports: [ { port: 5432 } ]\n    to: [ { namespaceSelector: { matchLabels: { team: shop } } } ]\n",
        "  - protocol: Any\n    to: [ { ipBlock: { cidr: 10.0.0.0/16 } } ]\n",
        "  - ports: [ { port: 5432 } ]\n",
    ];
    for rule in rules {
        let mut w = db_world(rule);
        w.group("shop", "db", "podSelector: { matchLabels: { app: db } }\n");
        w.cluster.services.insert(
            key("shop", "db"),
            service("db", &[DB_V4], &[(PortProtocol::Tcp, 80, number(5432))]),
        );
        let c = &w.cluster;
        let plan = compile(c);
        assert!(sends_checked(c, &plan, CLIENT, TCP, 80, DB_V4), "{rule}");
        assert!(!sends_checked(c, &plan, CLIENT, UDP, 80, DB_V4), "{rule}");
        assert!(!sends_checked(c, &plan, CLIENT, TCP, 81, DB_V4), "{rule}");
    }
    // A peer in another namespace admits none of shop's backends.
    let w = db_world("  - to: [ { namespaceSelector: { matchLabels: { team: ops } } } ]\n");
    let plan = compile(&w.cluster);
    assert!(!sends_checked(&w.cluster, &plan, CLIENT, TCP, 5432, DB_V4));
    // ICMP rules admit no Service port.
    let w = db_world("  - protocol: ICMP\n");
    let plan = compile(&w.cluster);
    assert!(!sends_checked(&w.cluster, &plan, CLIENT, TCP, 5432, DB_V4));
}

#[test]
fn services_without_backends_selector_or_cluster_ip_admit_nothing() {
    let rule = "  - to: [ { podSelector: {} } ]\n";
    type Edit = fn(&mut Service);
    let cases: [(&str, Edit); 3] = [
        ("no backend", |s| {
            s.selector.insert("app".into(), "nobody".into());
        }),
        ("no selector", |s| s.selector.clear()),
        ("headless", |s| s.cluster_ips.clear()),
    ];
    for (what, edit) in cases {
        let mut w = db_world(rule);
        let s = w.cluster.services.get_mut(&key("shop", "db")).unwrap();
        edit(s);
        let c = &w.cluster;
        let plan = compile(c);
        assert!(!sends_checked(c, &plan, CLIENT, TCP, 5432, DB_V4), "{what}");
        let policy = policy_of(&plan, &key("shop", "client")).unwrap();
        assert!(
            policy.egress.iter().all(|r| !r.origin.contains("via")),
            "{what}: {policy:?}"
        );
    }
    // Finished pods and pods without an address are no backends; the rest decide.
    let mut w = db_world("  - to: [ { podSelector: { matchLabels: { app: db } } } ]\n");
    let mut done = pod("n2", &[("app", "db"), ("x", "y")], &["10.0.2.8"]);
    done.terminated = true;
    w.pod("shop", "done", done)
        .pod("shop", "pending", pod("n2", &[("app", "db")], &[]));
    let plan = compile(&w.cluster);
    assert!(sends_checked(&w.cluster, &plan, CLIENT, TCP, 5432, DB_V4));
}

#[test]
fn host_network_backends_are_admitted_only_by_their_address() {
    let mut w = db_world("  - to: [ { podSelector: { matchLabels: { app: db } } } ]\n");
    let mut host = pod("n2", &[("app", "db")], &["192.168.0.2"]);
    host.host_network = true;
    w.pod("shop", "db-host", host);
    let plan = compile(&w.cluster);
    assert!(
        !sends_checked(&w.cluster, &plan, CLIENT, TCP, 5432, DB_V4),
        "a pod selector never selects a host-network pod"
    );
    let mut w2 = db_world("  - to: [ { podSelector: { matchLabels: { app: db } } }, { ipBlock: { cidr: 192.168.0.0/24 } } ]\n");
    w2.cluster.pods.insert(
        key("shop", "db-host"),
        w.cluster.pods[&key("shop", "db-host")].clone(),
    );
    let plan = compile(&w2.cluster);
    assert!(sends_checked(&w2.cluster, &plan, CLIENT, TCP, 5432, DB_V4));
}

#[test]
fn a_service_change_recompiles_only_the_groups_that_can_reach_it() {
    let mut w = db_world("  - to: [ { podSelector: { matchLabels: { app: db } } } ]\n");
    // A client in ops whose rules reach only ops: a shop Service cannot change its policy.
    w.pod("ops", "mon", pod("n2", &[("app", "mon")], &["10.0.2.5"]))
        .group(
            "ops",
            "mon",
            "podSelector: {}\negress: [ { to: [ { podSelector: {} } ] } ]\n",
        );
    let mut c = w.cluster.clone();
    c.services.clear();
    let mut compiler = Compiler::new(&c);
    let policy_id = |plan: &Plan, node: &str, ns: &str, pod: &str| {
        plan.nodes[node].pods[&key(ns, pod)].policy.clone()
    };
    let client_before = policy_id(compiler.plan(), "n1", "shop", "client");
    let mon_before = policy_id(compiler.plan(), "n2", "ops", "mon");
    assert!(!sends_checked(
        &c,
        compiler.plan(),
        CLIENT,
        TCP,
        5432,
        DB_V4
    ));

    let change = ClusterChange::UpsertService(
        key("shop", "db"),
        w.cluster.services[&key("shop", "db")].clone(),
    );
    let changed = compiler.apply(&change);
    c.apply(&change);
    assert!(sends_checked(&c, compiler.plan(), CLIENT, TCP, 5432, DB_V4));
    assert_ne!(
        client_before,
        policy_id(compiler.plan(), "n1", "shop", "client")
    );
    assert_eq!(mon_before, policy_id(compiler.plan(), "n2", "ops", "mon"));
    assert_eq!(changed.nodes.into_iter().collect::<Vec<_>>(), ["n1"]);
    assert!(changed.groups.is_empty(), "reports do not change");
    assert_eq!(compiler.plan(), &compile(&c));

    // The Service's port moves: the ClusterIP is admitted on the new one only.
    let mut moved = c.services[&key("shop", "db")].clone();
    moved.ports[0].port = 5433;
    let change = ClusterChange::UpsertService(key("shop", "db"), moved);
    compiler.apply(&change);
    c.apply(&change);
    assert!(!sends_checked(
        &c,
        compiler.plan(),
        CLIENT,
        TCP,
        5432,
        DB_V4
    ));
    assert!(sends_checked(&c, compiler.plan(), CLIENT, TCP, 5433, DB_V4));

    // Deleted: nothing left of it.
    let change = ClusterChange::DeleteService(key("shop", "db"));
    compiler.apply(&change);
    c.apply(&change);
    assert!(!sends_checked(
        &c,
        compiler.plan(),
        CLIENT,
        TCP,
        5433,
        DB_V4
    ));
    assert_eq!(
        client_before,
        policy_id(compiler.plan(), "n1", "shop", "client")
    );
    assert_eq!(compiler.plan(), &compile(&c));
}

#[test]
fn namespace_labels_and_peer_groups_changing_move_the_cluster_ips_admitted() {
    let mut w = db_world(
        "  - to: [ { namespaceSelector: { matchLabels: { team: shop } } } ]\n  - to: [ { securityGroup: { name: db } } ]\n    ports: [ { port: 5432 } ]\n",
    );
    w.cluster.services.insert(
        key("shop", "db"),
        service(
            "db",
            &[DB_V4],
            &[
                (PortProtocol::Tcp, 5432, number(5432)),
                (PortProtocol::Tcp, 6000, number(6000)),
            ],
        ),
    );
    let mut c = w.cluster.clone();
    let mut compiler = Compiler::new(&c);
    let mut step = |c: &mut Cluster, change: ClusterChange| {
        compiler.apply(&change);
        c.apply(&change);
        assert_eq!(compiler.plan(), &compile(c), "after {change:?}");
        compiler.plan().clone()
    };
    assert!(sends_checked(&c, &compile(&c), CLIENT, TCP, 6000, DB_V4));

    // shop no longer matches the namespace selector: port 6000 goes; 5432 stays through the
    // group peer, which does not exist yet.
    let plan = step(
        &mut c,
        ClusterChange::UpsertNamespace(
            "shop".into(),
            Namespace {
                labels: labels(&[("team", "elsewhere")]),
            },
        ),
    );
    assert!(!sends_checked(&c, &plan, CLIENT, TCP, 6000, DB_V4));
    assert!(!sends_checked(&c, &plan, CLIENT, TCP, 5432, DB_V4));

    // The group appears with the backends as members.
    let plan = step(
        &mut c,
        ClusterChange::UpsertGroup(
            key("shop", "db"),
            group("podSelector: { matchLabels: { app: db } }\n"),
        ),
    );
    assert!(sends_checked(&c, &plan, CLIENT, TCP, 5432, DB_V4));
    assert!(!sends_checked(&c, &plan, CLIENT, TCP, 6000, DB_V4));

    // Its selector narrows to one backend: the other is no member, the ClusterIP goes.
    let plan = step(
        &mut c,
        ClusterChange::UpsertGroup(
            key("shop", "db"),
            group_gen("podSelector: { matchLabels: { app: db, shard: a } }\n", 2),
        ),
    );
    assert!(!sends_checked(&c, &plan, CLIENT, TCP, 5432, DB_V4));
}

#[test]
fn a_named_rule_port_matches_a_backend_port_of_the_service_protocol_only() {
    let mut w = db_world("  - ports: [ { port: http } ]\n    to: [ { podSelector: { matchLabels: { app: db } } } ]\n");
    for name in ["db-0", "db-1"] {
        let p = w.cluster.pods[&key("shop", name)].clone();
        w.pod(
            "shop",
            name,
            with_ports(p, &[("http", 80, PortProtocol::Udp)]),
        );
    }
    w.cluster.services.insert(
        key("shop", "db"),
        service("db", &[DB_V4], &[(PortProtocol::Tcp, 80, number(80))]),
    );
    let plan = compile(&w.cluster);
    assert!(
        !sends_checked(&w.cluster, &plan, CLIENT, TCP, 80, DB_V4),
        "the backends' http port is UDP, the Service's TCP"
    );
}

#[test]
fn backend_changes_move_the_cluster_ips_admitted_incrementally() {
    let http = |p: Pod, port: u16| with_ports(p, &[("http", port, PortProtocol::Tcp)]);
    let mut w = db_world("  - ports: [ { port: 8080 } ]\n    to: [ { podSelector: { matchLabels: { app: db } } } ]\n");
    for name in ["db-0", "db-1"] {
        let p = w.cluster.pods[&key("shop", name)].clone();
        w.pod("shop", name, http(p, 8080));
    }
    w.cluster.services.insert(
        key("shop", "db"),
        service("db", &[DB_V4], &[(PortProtocol::Tcp, 80, name("http"))]),
    );
    let mut c = w.cluster.clone();
    let mut compiler = Compiler::new(&c);
    let db1 = key("shop", "db-1");
    let mut edit = |c: &mut Cluster, f: &dyn Fn(&mut Pod)| {
        let mut p = c.pods[&db1].clone();
        f(&mut p);
        let change = ClusterChange::UpsertPod(db1.clone(), p);
        compiler.apply(&change);
        c.apply(&change);
        assert_eq!(compiler.plan(), &compile(c), "after {change:?}");
        sends_checked(c, compiler.plan(), CLIENT, TCP, 80, DB_V4)
    };
    assert!(sends_checked(&c, &compile(&c), CLIENT, TCP, 80, DB_V4));
    // Its http port moves where the rule does not go.
    assert!(!edit(&mut c, &|p| p.ports[0].port = 9090));
    // It finishes: no backend any more, the other one decides.
    assert!(edit(&mut c, &|p| p.terminated = true));
    // It runs again, on the host's network: no pod selector admits it.
    assert!(!edit(&mut c, &|p| {
        p.terminated = false;
        p.host_network = true;
        p.ports[0].port = 8080;
    }));
    // Back on its own network.
    assert!(edit(&mut c, &|p| p.host_network = false));
    // Deleted.
    let change = ClusterChange::DeletePod(db1.clone());
    compiler.apply(&change);
    c.apply(&change);
    assert_eq!(compiler.plan(), &compile(&c));
    assert!(sends_checked(&c, compiler.plan(), CLIENT, TCP, 80, DB_V4));
}

#[test]
fn a_group_peer_in_another_namespace_follows_its_members_behind_a_service() {
    let mut w = db_world("  - to: []\n");
    w.pod("ops", "job", pod("n2", &[("app", "job")], &["10.0.2.5"]))
        .group(
            "ops",
            "job",
            "podSelector: {}\negress: [ { to: [ { securityGroup: { name: db, namespace: shop } } ] } ]\n",
        )
        .group("shop", "db", "podSelector: { matchLabels: { tier: a } }\n");
    for name in ["db-0", "db-1"] {
        w.cluster
            .pods
            .get_mut(&key("shop", name))
            .unwrap()
            .labels
            .insert("tier".into(), "a".into());
    }
    let mut c = w.cluster.clone();
    let svc = c.services.remove(&key("shop", "db")).unwrap();
    let mut compiler = Compiler::new(&c);
    let job = "10.0.2.5";
    assert!(!sends_checked(&c, compiler.plan(), job, TCP, 5432, DB_V4));
    let mut step = |c: &mut Cluster, change: ClusterChange| {
        compiler.apply(&change);
        c.apply(&change);
        assert_eq!(compiler.plan(), &compile(c), "after {change:?}");
        compiler.plan().clone()
    };
    // The Service appears in shop: ops/job's rule names shop's group, so it is recompiled.
    let plan = step(&mut c, ClusterChange::UpsertService(key("shop", "db"), svc));
    assert!(sends_checked(&c, &plan, job, TCP, 5432, DB_V4));
    // A backend leaves the group (it is still behind the Service): the ClusterIP goes.
    let mut db1 = c.pods[&key("shop", "db-1")].clone();
    db1.labels.remove("tier");
    let plan = step(&mut c, ClusterChange::UpsertPod(key("shop", "db-1"), db1));
    assert!(!sends_checked(&c, &plan, job, TCP, 5432, DB_V4));
    assert!(sends_checked(&c, &plan, job, TCP, 5432, "10.0.1.2"));
}

#[test]
fn an_ip_block_rule_follows_backends_in_every_namespace() {
    let mut w =
        db_world("  - ports: [ { port: 5432 } ]\n    to: [ { ipBlock: { cidr: 10.0.0.0/16 } } ]\n");
    w.pod("ops", "pg", pod("n2", &[("app", "pg")], &["10.0.2.7"]));
    let pg = service("pg", &[DB_V4], &[(PortProtocol::Tcp, 5432, number(5432))]);
    w.cluster.services.clear();
    let mut c = w.cluster.clone();
    let mut compiler = Compiler::new(&c);
    let mut step = |c: &mut Cluster, change: ClusterChange| {
        compiler.apply(&change);
        c.apply(&change);
        assert_eq!(compiler.plan(), &compile(c), "after {change:?}");
        compiler.plan().clone()
    };
    let plan = step(&mut c, ClusterChange::UpsertService(key("ops", "pg"), pg));
    assert!(sends_checked(&c, &plan, CLIENT, TCP, 5432, DB_V4));
    // Its backend moves out of the block: the ClusterIP goes.
    let mut moved = c.pods[&key("ops", "pg")].clone();
    moved.ips = vec![ip("10.1.0.7")];
    let plan = step(&mut c, ClusterChange::UpsertPod(key("ops", "pg"), moved));
    assert!(!sends_checked(&c, &plan, CLIENT, TCP, 5432, DB_V4));
}

/// Upstream's "should enforce except clause while egress access to server in CIDR block": a
/// block large enough to hold the pods and the ClusterIPs alike, except one backend. The
/// ClusterIP sits inside the block too, but traffic to it goes to the backends, one of which the
/// rule refuses: the block must not admit the ClusterIP by itself. A second peer of the rule
/// admitting that backend makes the Service whole again.
#[test]
fn a_block_holding_a_cluster_ip_does_not_admit_it_where_it_excepts_a_backend() {
    let w = db_world(
        "  - protocol: TCP\n    to: [ { ipBlock: { cidr: 0.0.0.0/4, except: [ 10.0.2.2/32 ] } } ]\n",
    );
    let c = &w.cluster;
    let plan = compile(c);
    assert!(sends_checked(c, &plan, CLIENT, TCP, 5432, "10.0.1.2"));
    assert!(!sends_checked(c, &plan, CLIENT, TCP, 5432, "10.0.2.2"));
    assert!(
        !sends_checked(c, &plan, CLIENT, TCP, 5432, DB_V4),
        "the ClusterIP reaches the excepted backend too"
    );
    assert!(
        !sends_checked(c, &plan, CLIENT, TCP, 80, DB_V4),
        "nor any other port of it"
    );
    assert!(
        sends_checked(c, &plan, CLIENT, TCP, 5432, "10.96.0.99"),
        "an address of the block that is no Service's stays admitted"
    );

    let w = db_world(
        "  - protocol: TCP\n    to: [ { ipBlock: { cidr: 0.0.0.0/4, except: [ 10.0.2.2/32 ] } }, { ipBlock: { cidr: 10.0.2.2/32 } } ]\n",
    );
    let c = &w.cluster;
    let plan = compile(c);
    assert!(sends_checked(c, &plan, CLIENT, TCP, 5432, "10.0.2.2"));
    assert!(
        sends_checked(c, &plan, CLIENT, TCP, 5432, DB_V4),
        "every backend is admitted again, so is the ClusterIP on the Service port"
    );
}

/// A rule open to anyone on port 80 admits a ClusterIP's port 80 only if the backends serve it
/// there: a Service sending 80 to 8080 is judged on 8080.
#[test]
fn anyone_on_the_service_port_does_not_admit_a_cluster_ip_whose_backends_listen_elsewhere() {
    let mut w = db_world("  - protocol: TCP\n    ports: [ { port: 80 } ]\n");
    w.cluster.services.insert(
        key("shop", "db"),
        service(
            "db",
            &[DB_V4, DB_V6],
            &[(PortProtocol::Tcp, 80, number(8080))],
        ),
    );
    let c = &w.cluster;
    let plan = compile(c);
    assert!(!sends_checked(c, &plan, CLIENT, TCP, 80, DB_V4));
    assert!(!sends_checked(c, &plan, CLIENT_V6, TCP, 80, DB_V6));
    assert!(
        sends_checked(c, &plan, CLIENT, TCP, 80, "192.0.2.1"),
        "anyone else on port 80"
    );
}

/// A named target port resolving to different numbers on the backends of the two families
/// (single-stack pods behind a dual-stack Service): each ClusterIP is judged on the port of its
/// own family's backends, so a rule allowing only one of the numbers admits that family's.
#[test]
fn a_named_target_port_differing_by_family_admits_the_family_whose_port_is_allowed() {
    for egress in [
        "  - ports: [ { port: 5432 } ]\n    to: [ { podSelector: { matchLabels: { app: db } } } ]\n",
        "  - protocol: TCP\n    ports: [ { port: 5432 } ]\n",
    ] {
        let mut w = db_world(egress);
        for (name, v4, port) in [("db-0", true, 5432), ("db-1", false, 6543)] {
            let mut p = w.cluster.pods[&key("shop", name)].clone();
            p.ips.retain(|a| a.is_ipv4() == v4);
            w.pod("shop", name, with_ports(p, &[("pg", port, PortProtocol::Tcp)]));
        }
        w.cluster.services.insert(
            key("shop", "db"),
            service("db", &[DB_V4, DB_V6], &[(PortProtocol::Tcp, 5432, name("pg"))]),
        );
        let c = &w.cluster;
        let plan = compile(c);
        assert!(
            sends_checked(c, &plan, CLIENT, TCP, 5432, DB_V4),
            "{egress}: the IPv4 backend listens on 5432"
        );
        assert!(
            !sends_checked(c, &plan, CLIENT_V6, TCP, 5432, DB_V6),
            "{egress}: the IPv6 backend listens on 6543"
        );
    }
}
