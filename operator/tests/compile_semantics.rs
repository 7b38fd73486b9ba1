//! The compiler, case by case: every peer kind, unions of groups, omitted and empty rule lists,
//! named ports, dual-stack, except-blocks, pods without addresses, deleted namespaces,
//! cross-namespace group references, invalid groups, reports and policy ids. Verdicts are read
//! from the compiled plan the way the agent evaluates it.

mod compile_support;

use compile_support::*;
use kubesg_operator::{
    compile::{compile, Compiler},
    model::{Namespace, PortProtocol},
    plan::{GroupGeneration, RuleProtocol},
};

/// A `web` pod in `shop` (members of `web` groups) and clients around it.
fn shop() -> World {
    let mut w = World::default();
    w.ns("shop", &[("team", "shop")])
        .ns("ops", &[("team", "ops")])
        .ns("other", &[("team", "other")])
        .pod(
            "shop",
            "web",
            pod("n1", &[("app", "web")], &["10.0.1.1", "fd00::1:1"]),
        )
        .pod(
            "shop",
            "lb",
            pod("n1", &[("app", "lb")], &["10.0.1.2", "fd00::1:2"]),
        )
        .pod(
            "shop",
            "db",
            pod("n2", &[("app", "db")], &["10.0.2.1", "fd00::2:1"]),
        )
        .pod(
            "ops",
            "mon",
            pod("n2", &[("app", "mon")], &["10.0.2.2", "fd00::2:2"]),
        )
        .pod(
            "other",
            "lb",
            pod("n2", &[("app", "lb")], &["10.0.2.3", "fd00::2:3"]),
        );
    w
}

const WEB_FROM: &str = "podSelector: { matchLabels: { app: web } }\ningress:\n  - ports: [ { port: 443 } ]\n    from:\n";

fn web_from(peers: &str) -> String {
    format!("{WEB_FROM}{peers}")
}

#[test]
fn a_pod_of_no_group_is_on_its_node_without_policy() {
    let w = shop();
    let plan = compile(&w.cluster);
    let pp = &plan.nodes["n1"].pods[&key("shop", "web")];
    assert_eq!(pp.policy, None);
    assert_eq!(pp.uid, w.cluster.pods[&key("shop", "web")].uid);
    assert!(accepts(&plan, &key("shop", "web"), TCP, 1, "192.0.2.1"));
    assert!(plan.nodes["n1"].policies.is_empty());
}

#[test]
fn host_network_terminated_and_unscheduled_pods_are_not_on_any_node() {
    let mut w = shop();
    let mut host = pod("n1", &[("app", "web")], &["192.168.0.1"]);
    host.host_network = true;
    let mut done = pod("n1", &[("app", "web")], &["10.0.1.9"]);
    done.terminated = true;
    let mut pending = pod("n1", &[("app", "web")], &[]);
    pending.node = None;
    w.pod("shop", "host", host)
        .pod("shop", "done", done)
        .pod("shop", "pending", pending)
        .group("shop", "web", "podSelector: {}\n");
    let plan = compile(&w.cluster);
    for name in ["host", "done", "pending"] {
        assert!(
            plan.nodes
                .values()
                .all(|n| !n.pods.contains_key(&key("shop", name))),
            "{name}"
        );
    }
    // The unscheduled pod is a member (it will be enforced once scheduled); host-network and
    // finished pods are not.
    assert_eq!(plan.groups[&key("shop", "web")].members, 4);
}

#[test]
fn security_group_peer_allows_the_members_of_the_named_group() {
    let mut w = shop();
    w.group("shop", "lb", "podSelector: { matchLabels: { app: lb } }\n")
        .group(
            "shop",
            "web",
            &web_from("      - securityGroup: { name: lb }\n"),
        );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(accepts(&plan, &web, TCP, 443, "10.0.1.2"));
    assert!(accepts(&plan, &web, TCP, 443, "fd00::1:2"));
    assert!(
        !accepts(&plan, &web, TCP, 443, "10.0.2.1"),
        "db is no lb member"
    );
    assert!(
        !accepts(&plan, &web, TCP, 443, "10.0.2.3"),
        "other/lb is in another namespace"
    );
    assert!(!accepts(&plan, &web, TCP, 80, "10.0.1.2"), "only port 443");
    assert!(!accepts(&plan, &web, UDP, 443, "10.0.1.2"), "only TCP");
}

#[test]
fn security_group_peer_in_another_namespace_names_its_namespace() {
    let mut w = shop();
    w.group("ops", "mon", "podSelector: { matchLabels: { app: mon } }\n")
        .group(
            "shop",
            "web",
            &web_from("      - securityGroup: { name: mon, namespace: ops }\n"),
        );
    let plan = compile(&w.cluster);
    assert!(accepts(&plan, &key("shop", "web"), TCP, 443, "10.0.2.2"));
    let policy = policy_of(&plan, &key("shop", "web")).unwrap();
    assert!(policy.groups.contains(&GroupGeneration {
        group: key("ops", "mon"),
        generation: 1,
    }));
    // ops/mon's report counts the node of the pod whose rules name it.
    assert!(plan.groups[&key("ops", "mon")].nodes.contains("n1"));
}

#[test]
fn unknown_or_invalid_peer_groups_allow_nothing() {
    let mut w = shop();
    w.group(
        "shop",
        "bad",
        "podSelector: { matchLabels: { app: lb } }\ningress: [ { ports: [ { port: 0 } ] } ]\n",
    )
    .group(
        "shop",
        "web",
        &web_from(
            "      - securityGroup: { name: missing }\n      - securityGroup: { name: bad }\n",
        ),
    );
    let plan = compile(&w.cluster);
    let policy = policy_of(&plan, &key("shop", "web")).unwrap();
    assert_eq!(policy.ingress.len(), 1);
    assert!(policy.ingress[0].peers.is_empty(), "matches nobody");
    assert!(!accepts(&plan, &key("shop", "web"), TCP, 443, "10.0.1.2"));
}

#[test]
fn pod_selector_peer_selects_pods_of_the_groups_own_namespace() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        &web_from("      - podSelector: { matchLabels: { app: lb } }\n"),
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(accepts(&plan, &web, TCP, 443, "10.0.1.2"));
    assert!(!accepts(&plan, &web, TCP, 443, "10.0.2.3"), "other/lb");
}

#[test]
fn namespace_selector_peer_selects_every_pod_of_matching_namespaces() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        &web_from("      - namespaceSelector: { matchLabels: { team: ops } }\n"),
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(accepts(&plan, &web, TCP, 443, "10.0.2.2"));
    assert!(!accepts(&plan, &web, TCP, 443, "10.0.1.2"));
    assert!(!accepts(&plan, &web, TCP, 443, "10.0.2.3"));
}

#[test]
fn pod_and_namespace_selectors_together_select_matching_pods_in_matching_namespaces() {
    let mut w = shop();
    w.pod("ops", "lb", pod("n2", &[("app", "lb")], &["10.0.2.4"]))
        .group(
            "shop",
            "web",
            &web_from("      - namespaceSelector: { matchExpressions: [ { key: team, operator: In, values: [ops, other] } ] }\n        podSelector: { matchLabels: { app: lb } }\n"),
        );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(accepts(&plan, &web, TCP, 443, "10.0.2.3"), "other/lb");
    assert!(accepts(&plan, &web, TCP, 443, "10.0.2.4"), "ops/lb");
    assert!(
        !accepts(&plan, &web, TCP, 443, "10.0.2.2"),
        "ops/mon is no lb"
    );
    assert!(
        !accepts(&plan, &web, TCP, 443, "10.0.1.2"),
        "shop does not match"
    );
}

#[test]
fn ip_block_allows_the_cidr_minus_its_excepts() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        &web_from("      - ipBlock: { cidr: 10.0.0.0/8, except: [ 10.0.2.0/24 ] }\n"),
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(accepts(&plan, &web, TCP, 443, "10.0.1.2"));
    assert!(accepts(&plan, &web, TCP, 443, "10.200.0.1"));
    assert!(!accepts(&plan, &web, TCP, 443, "10.0.2.3"), "in the except");
    assert!(!accepts(&plan, &web, TCP, 443, "11.0.0.1"), "outside");
    assert!(!accepts(&plan, &web, TCP, 443, "fd00::1:2"), "other family");
}

#[test]
fn ip_blocks_of_one_family_never_match_the_other() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\negress:\n  - to: [ { ipBlock: { cidr: 0.0.0.0/0 } } ]\n",
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(sends(&plan, &web, TCP, 80, "203.0.113.1"));
    assert!(!sends(&plan, &web, TCP, 80, "2001:db8::1"));
}

#[test]
fn dual_stack_peers_are_allowed_on_both_families() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\negress:\n  - to: [ { podSelector: { matchLabels: { app: db } } } ]\n",
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(sends(&plan, &web, TCP, 5432, "10.0.2.1"));
    assert!(sends(&plan, &web, TCP, 5432, "fd00::2:1"));
    assert!(!sends(&plan, &web, TCP, 5432, "fd00::2:2"));
    let peers = &policy_of(&plan, &web).unwrap().egress[0].peers;
    let lens: Vec<u8> = peers.iter().map(|b| b.cidr.prefix_len()).collect();
    assert_eq!(lens, vec![32, 128]);
}

#[test]
fn omitted_from_allows_anyone_on_both_families() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\ningress: [ { ports: [ { port: 443 } ] } ]\n",
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(accepts(&plan, &web, TCP, 443, "198.51.100.7"));
    assert!(accepts(&plan, &web, TCP, 443, "2001:db8::7"));
    assert!(!accepts(&plan, &web, TCP, 444, "198.51.100.7"));
}

#[test]
fn omitted_ingress_allows_no_ingress_and_omitted_egress_allows_all_egress() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\n",
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    let policy = policy_of(&plan, &web).unwrap();
    assert!(policy.ingress.is_empty());
    assert!(!accepts(&plan, &web, TCP, 443, "10.0.1.2"));
    assert!(sends(&plan, &web, TCP, 1, "198.51.100.7"));
    assert!(sends(&plan, &web, UDP, 53, "2001:db8::1"));
    assert!(sends(&plan, &web, 47, 0, "10.0.2.1"), "any protocol");
    assert_eq!(policy.egress[0].origin, "shop/web egress (omitted: all)");
    assert_eq!(policy.egress[0].protocol, RuleProtocol::Any);
}

#[test]
fn empty_egress_allows_no_egress() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\ningress: []\negress: []\n",
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(!sends(&plan, &web, TCP, 80, "10.0.2.1"));
    assert!(!accepts(&plan, &web, TCP, 80, "10.0.2.1"));
}

#[test]
fn a_pod_in_several_groups_gets_the_union_of_their_rules() {
    let mut w = shop();
    w.group(
        "shop",
        "https",
        "podSelector: { matchLabels: { app: web } }\ningress: [ { ports: [ { port: 443 } ] } ]\negress: []\n",
    )
    .group(
        "shop",
        "metrics",
        "podSelector: {}\ningress: [ { ports: [ { port: 9100 } ], from: [ { namespaceSelector: { matchLabels: { team: ops } } } ] } ]\n",
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(accepts(&plan, &web, TCP, 443, "198.51.100.7"));
    assert!(accepts(&plan, &web, TCP, 9100, "10.0.2.2"));
    assert!(!accepts(&plan, &web, TCP, 9100, "198.51.100.7"));
    // `https` allows no egress, but `metrics` omits egress: the union allows all.
    assert!(sends(&plan, &web, TCP, 80, "198.51.100.7"));
    // The lb pod is only in `metrics`.
    assert!(!accepts(
        &plan,
        &key("shop", "lb"),
        TCP,
        443,
        "198.51.100.7"
    ));
    let groups: Vec<_> = policy_of(&plan, &web)
        .unwrap()
        .groups
        .iter()
        .map(|g| g.group.name.clone())
        .collect();
    assert_eq!(groups, vec!["https", "metrics"]);
}

#[test]
fn ingress_named_ports_resolve_on_each_member() {
    let mut w = shop();
    w.pod(
        "shop",
        "web",
        with_ports(
            pod("n1", &[("app", "web")], &["10.0.1.1"]),
            &[("http", 8080, PortProtocol::Tcp)],
        ),
    )
    .pod(
        "shop",
        "web2",
        with_ports(
            pod("n1", &[("app", "web")], &["10.0.1.5"]),
            &[("http", 9090, PortProtocol::Tcp)],
        ),
    )
    .pod(
        "shop",
        "web3",
        with_ports(
            pod("n1", &[("app", "web")], &["10.0.1.6"]),
            &[("http", 8080, PortProtocol::Udp)],
        ),
    )
    .group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\ningress: [ { ports: [ { port: http } ] } ]\n",
    );
    let plan = compile(&w.cluster);
    let (web, web2, web3) = (key("shop", "web"), key("shop", "web2"), key("shop", "web3"));
    assert!(accepts(&plan, &web, TCP, 8080, "198.51.100.7"));
    assert!(!accepts(&plan, &web, TCP, 9090, "198.51.100.7"));
    assert!(accepts(&plan, &web2, TCP, 9090, "198.51.100.7"));
    assert!(!accepts(&plan, &web2, TCP, 8080, "198.51.100.7"));
    // web3's `http` is UDP; the rule is TCP: nothing resolves, nothing is allowed.
    assert!(!accepts(&plan, &web3, TCP, 8080, "198.51.100.7"));
    assert!(!accepts(&plan, &web3, TCP, 1, "198.51.100.7"));
    let n1 = &plan.nodes["n1"];
    assert_ne!(n1.pods[&web].policy, n1.pods[&web2].policy);
    assert_ne!(n1.pods[&web].policy, n1.pods[&web3].policy);
}

#[test]
fn egress_named_ports_resolve_on_each_peer() {
    let mut w = shop();
    w.pod(
        "shop",
        "db",
        with_ports(
            pod("n2", &[("app", "db")], &["10.0.2.1", "fd00::2:1"]),
            &[("sql", 5432, PortProtocol::Tcp)],
        ),
    )
    .pod(
        "shop",
        "db2",
        with_ports(
            pod("n2", &[("app", "db")], &["10.0.2.5"]),
            &[("sql", 3306, PortProtocol::Tcp)],
        ),
    )
    .pod("shop", "db3", pod("n2", &[("app", "db")], &["10.0.2.6"]))
    .pod(
        "shop",
        "db4",
        with_ports(
            pod("n2", &[("app", "db")], &["10.0.2.7"]),
            &[("sql", 5432, PortProtocol::Udp)],
        ),
    )
    .group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\negress:\n  - ports: [ { port: sql }, { port: 22 } ]\n    to: [ { podSelector: { matchLabels: { app: db } } }, { ipBlock: { cidr: 192.0.2.0/24 } } ]\n",
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(sends(&plan, &web, TCP, 5432, "10.0.2.1"));
    assert!(sends(&plan, &web, TCP, 5432, "fd00::2:1"));
    assert!(!sends(&plan, &web, TCP, 3306, "10.0.2.1"));
    assert!(sends(&plan, &web, TCP, 3306, "10.0.2.5"));
    assert!(!sends(&plan, &web, TCP, 5432, "10.0.2.5"));
    assert!(
        !sends(&plan, &web, TCP, 5432, "10.0.2.6"),
        "db3 has no sql port"
    );
    assert!(
        !sends(&plan, &web, TCP, 5432, "10.0.2.7"),
        "db4's sql port is UDP, the rule TCP"
    );
    assert!(
        sends(&plan, &web, TCP, 22, "10.0.2.6"),
        "numeric ports apply to every peer"
    );
    assert!(sends(&plan, &web, TCP, 22, "192.0.2.9"));
    assert!(
        !sends(&plan, &web, TCP, 5432, "192.0.2.9"),
        "an ipBlock has no named ports"
    );
    let policy = policy_of(&plan, &web).unwrap();
    let origins: Vec<_> = policy.egress.iter().map(|r| r.origin.as_str()).collect();
    assert_eq!(origins, vec!["shop/web egress[0]"; 3]);
}

#[test]
fn unknown_named_ports_allow_nothing() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\ningress: [ { ports: [ { port: nope } ] } ]\negress: [ { ports: [ { port: nope } ] } ]\n",
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    let policy = policy_of(&plan, &web).unwrap();
    assert!(policy.ingress.is_empty(), "{policy:?}");
    assert!(policy.egress.is_empty(), "{policy:?}");
    assert!(!accepts(&plan, &web, TCP, 80, "198.51.100.7"));
    assert!(!sends(&plan, &web, TCP, 80, "198.51.100.7"));
}

#[test]
fn icmp_rules_match_type_and_code_and_any_matches_every_protocol() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\ningress:\n  - protocol: ICMP\n    icmpTypes: [ { type: 8, code: 0 } ]\n  - protocol: ICMPv6\n  - protocol: Any\n    from: [ { ipBlock: { cidr: 10.0.2.0/24 } } ]\n",
    );
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert!(accepts(&plan, &web, ICMP, 8 << 8, "198.51.100.7"));
    assert!(!accepts(&plan, &web, ICMP, (8 << 8) | 1, "198.51.100.7"));
    assert!(!accepts(&plan, &web, ICMP, 13 << 8, "198.51.100.7"));
    assert!(accepts(&plan, &web, ICMPV6, 128 << 8, "2001:db8::1"));
    assert!(accepts(&plan, &web, 47, 0, "10.0.2.9"));
    assert!(accepts(&plan, &web, UDP, 53, "10.0.2.9"));
    assert!(!accepts(&plan, &web, UDP, 53, "10.0.1.9"));
}

#[test]
fn pods_without_addresses_are_members_but_nobodys_peers() {
    let mut w = shop();
    w.pod("shop", "new-lb", pod("n1", &[("app", "lb")], &[]))
        .group("shop", "lb", "podSelector: { matchLabels: { app: lb } }\n")
        .group(
            "shop",
            "web",
            &web_from("      - securityGroup: { name: lb }\n"),
        );
    let plan = compile(&w.cluster);
    assert_eq!(plan.groups[&key("shop", "lb")].members, 2);
    assert!(plan.nodes["n1"].pods[&key("shop", "new-lb")]
        .policy
        .is_some());
    let peers = &policy_of(&plan, &key("shop", "web")).unwrap().ingress[0].peers;
    assert_eq!(peers.len(), 2, "only lb's two addresses: {peers:?}");
}

#[test]
fn a_deleted_namespace_still_compiles_but_no_namespace_selector_matches_it() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        &web_from("      - namespaceSelector: {}\n        podSelector: { matchLabels: { app: lb } }\n      - podSelector: { matchLabels: { app: lb } }\n"),
    );
    w.cluster.namespaces.remove("shop");
    w.cluster.namespaces.remove("other");
    let plan = compile(&w.cluster);
    let web = key("shop", "web");
    assert_eq!(plan.groups[&key("shop", "web")].accepted, Ok(()));
    assert!(
        accepts(&plan, &web, TCP, 443, "10.0.1.2"),
        "podSelector alone: own namespace"
    );
    assert!(!accepts(&plan, &web, TCP, 443, "10.0.2.3"), "other is gone");
    // Through the incremental path: the namespace comes back.
    let mut c = Compiler::new(&w.cluster);
    let changes = c.upsert_namespace(
        "other",
        Namespace {
            labels: labels(&[("team", "other")]),
        },
    );
    assert!(changes.nodes.contains("n1"));
    assert!(accepts(c.plan(), &web, TCP, 443, "10.0.2.3"));
}

#[test]
fn an_invalid_group_reports_why_and_contributes_nothing() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\ningress: [ { from: [ { ipBlock: { cidr: 10.1.0.0/16, except: [ 10.2.0.0/16 ] } } ] } ]\n",
    );
    let plan = compile(&w.cluster);
    let report = &plan.groups[&key("shop", "web")];
    assert_eq!(
        report.accepted,
        Err(
            "spec.ingress[0].from[0].ipBlock.except[0]: 10.2.0.0/16 is not inside 10.1.0.0/16"
                .into()
        )
    );
    assert_eq!(report.members, 0);
    assert!(report.nodes.is_empty());
    assert_eq!(plan.nodes["n1"].pods[&key("shop", "web")].policy, None);
}

#[test]
fn reports_count_members_and_the_nodes_of_members_and_of_pods_naming_the_group() {
    let mut w = shop();
    w.node("n3")
        .group("shop", "lb", "podSelector: { matchLabels: { app: lb } }\n")
        .group("ops", "mon", "podSelector: { matchLabels: { app: mon } }\ningress: [ { from: [ { securityGroup: { name: lb, namespace: shop } } ] } ]\n");
    let plan = compile(&w.cluster);
    let lb = &plan.groups[&key("shop", "lb")];
    assert_eq!((lb.generation, lb.members), (1, 1));
    // lb's member runs on n1; mon's member (whose rules name lb) on n2.
    assert_eq!(
        lb.nodes.iter().map(String::as_str).collect::<Vec<_>>(),
        vec!["n1", "n2"]
    );
    let mon = &plan.groups[&key("ops", "mon")];
    assert_eq!(
        mon.nodes.iter().map(String::as_str).collect::<Vec<_>>(),
        vec!["n2"]
    );
    assert!(
        plan.nodes["n3"].pods.is_empty(),
        "a node without pods has an empty plan"
    );
}

#[test]
fn origins_name_the_group_direction_and_rule_index() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\ningress: [ { ports: [ { port: 1 } ] }, { ports: [ { port: 2 } ] } ]\negress: [ { ports: [ { port: 3 } ] } ]\n",
    );
    let plan = compile(&w.cluster);
    let policy = policy_of(&plan, &key("shop", "web")).unwrap();
    let ingress: Vec<_> = policy.ingress.iter().map(|r| r.origin.as_str()).collect();
    assert_eq!(ingress, vec!["shop/web ingress[0]", "shop/web ingress[1]"]);
    assert_eq!(policy.egress[0].origin, "shop/web egress[0]");
}

#[test]
fn pods_with_the_same_groups_share_a_policy_whose_id_survives_unrelated_changes() {
    let mut w = shop();
    w.pod("shop", "web2", pod("n1", &[("app", "web")], &["10.0.1.7"]))
        .group(
            "shop",
            "web",
            &web_from("      - podSelector: { matchLabels: { app: lb } }\n"),
        );
    let mut c = Compiler::new(&w.cluster);
    let n1 = &c.plan().nodes["n1"];
    let id = n1.pods[&key("shop", "web")].policy.clone().unwrap();
    assert_eq!(n1.pods[&key("shop", "web2")].policy.as_ref(), Some(&id));
    assert_eq!(n1.policies.len(), 1);
    assert_eq!(id.len(), 32);
    // A pod nobody selects as a peer changes labels: nothing changes.
    let changes = c.upsert_pod(
        key("ops", "mon"),
        pod("n2", &[("app", "mon2")], &["10.0.2.2", "fd00::2:2"]),
    );
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(
        c.plan().nodes["n1"].pods[&key("shop", "web")]
            .policy
            .as_ref(),
        Some(&id)
    );
    // Same content compiled from scratch: same id.
    let again = compile(&w.cluster);
    assert_eq!(
        again.nodes["n1"].pods[&key("shop", "web")].policy.as_ref(),
        Some(&id)
    );
    // A new lb address changes the address set the policy names, not the policy (and only
    // n1, where web runs, changes).
    let sets_before = c.plan().nodes["n1"].sets.clone();
    let mut moved = w.cluster.pods[&key("shop", "lb")].clone();
    moved.ips = vec![ip("10.0.1.3")];
    let changes = c.upsert_pod(key("shop", "lb"), moved);
    assert_eq!(changes.nodes.iter().collect::<Vec<_>>(), vec!["n1"]);
    assert_eq!(
        c.plan().nodes["n1"].pods[&key("shop", "web")]
            .policy
            .as_ref(),
        Some(&id)
    );
    assert_eq!(c.plan().nodes["n1"].policies.len(), 1);
    let sets_after = &c.plan().nodes["n1"].sets;
    assert_eq!(sets_after.len(), 1);
    assert_ne!(sets_after, &sets_before, "the lb set moved");
    assert!(accepts(c.plan(), &key("shop", "web"), TCP, 443, "10.0.1.3"));
    assert!(!accepts(
        c.plan(),
        &key("shop", "web"),
        TCP,
        443,
        "10.0.1.2"
    ));
}

#[test]
fn a_group_edit_changes_the_generation_listed_and_reports_the_group() {
    let mut w = shop();
    w.group("shop", "lb", "podSelector: { matchLabels: { app: lb } }\n")
        .group(
            "shop",
            "web",
            &web_from("      - securityGroup: { name: lb }\n"),
        );
    let mut c = Compiler::new(&w.cluster);
    let changes = c.upsert_group(
        key("shop", "lb"),
        group_gen("podSelector: { matchLabels: { app: lb } }\negress: []\n", 2),
    );
    assert!(changes.groups.contains(&key("shop", "lb")));
    assert_eq!(c.plan().groups[&key("shop", "lb")].generation, 2);
    // web's policy names lb as a peer, so it lists the new generation.
    let web = policy_of(c.plan(), &key("shop", "web")).unwrap();
    assert!(web.groups.contains(&GroupGeneration {
        group: key("shop", "lb"),
        generation: 2,
    }));
    assert!(!sends(c.plan(), &key("shop", "lb"), TCP, 80, "10.0.2.1"));
}

#[test]
fn deleting_a_group_removes_its_report_and_frees_its_members() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\n",
    );
    let mut c = Compiler::new(&w.cluster);
    let changes = c.delete_group(&key("shop", "web"));
    assert!(changes.groups.contains(&key("shop", "web")));
    assert!(changes.nodes.contains("n1"));
    assert!(!c.plan().groups.contains_key(&key("shop", "web")));
    assert_eq!(c.plan().nodes["n1"].pods[&key("shop", "web")].policy, None);
    assert!(c.plan().nodes["n1"].policies.is_empty());
}

#[test]
fn node_plans_follow_nodes_and_the_pods_that_name_them() {
    let w = shop();
    let mut c = Compiler::new(&w.cluster);
    let changes = c.upsert_node("n9");
    assert_eq!(changes.nodes.iter().collect::<Vec<_>>(), vec!["n9"]);
    assert!(c.plan().nodes["n9"].pods.is_empty());
    assert_eq!(
        c.delete_node("n9").nodes.iter().collect::<Vec<_>>(),
        vec!["n9"]
    );
    assert!(!c.plan().nodes.contains_key("n9"));
    // A pod on a node without a Node object still gets a plan for that node; the plan stays
    // while the pod is there, then goes.
    c.upsert_pod(key("shop", "x"), pod("n7", &[], &["10.0.7.1"]));
    assert!(c.plan().nodes["n7"].pods.contains_key(&key("shop", "x")));
    c.delete_pod(&key("shop", "x"));
    assert!(!c.plan().nodes.contains_key("n7"));
    // Deleting n1's Node object keeps its plan while pods run there.
    c.delete_node("n1");
    assert!(c.plan().nodes.contains_key("n1"));
}

#[test]
fn a_pod_moving_between_nodes_moves_its_entry_and_policy() {
    let mut w = shop();
    w.group(
        "shop",
        "web",
        "podSelector: { matchLabels: { app: web } }\n",
    );
    let mut c = Compiler::new(&w.cluster);
    let changes = c.upsert_pod(
        key("shop", "web"),
        pod("n2", &[("app", "web")], &["10.0.1.1", "fd00::1:1"]),
    );
    assert_eq!(changes.nodes.iter().collect::<Vec<_>>(), vec!["n1", "n2"]);
    assert!(!c.plan().nodes["n1"].pods.contains_key(&key("shop", "web")));
    assert!(c.plan().nodes["n1"].policies.is_empty());
    assert!(policy_of(c.plan(), &key("shop", "web")).is_some());
    assert!(c.plan().groups[&key("shop", "web")].nodes.contains("n2"));
    assert!(!c.plan().groups[&key("shop", "web")].nodes.contains("n1"));
}
