//! The SecurityGroup CRD in the real API server (kube-apiserver of `make cluster`): the CRD the
//! chart ships is accepted (its CEL rules within the API server's cost budget), every invalid
//! SecurityGroup of a table is refused by `kubectl apply` with its rule's or its schema's message,
//! a valid one is stored, and `kubectl get sg` shows the printer columns.

use kubesg_testkit::{kube::Kube, require_privileged};

/// A SecurityGroup named `name` with `spec` (YAML, indented under `spec:`) in `namespace`.
fn group(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: kubesg.io/v1alpha1\nkind: SecurityGroup\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

/// Spec bodies the API server must refuse, with what its answer must say.
const INVALID: &[(&str, &str, &str)] = &[
    (
        "bad-cidr",
        "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.300/8}\n",
        "cidr must be a CIDR, e.g. 10.0.0.0/8",
    ),
    (
        "except-outside",
        "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}\n",
        "every except must be a CIDR inside cidr",
    ),
    (
        "except-not-cidr",
        "  podSelector: {}\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [nope]}\n",
        "every except must be a CIDR inside cidr",
    ),
    (
        "endport-named",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: http, endPort: 90}]\n",
        "endPort needs a numeric port",
    ),
    (
        "endport-below",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: 90, endPort: 80}]\n",
        "endPort must be >= port",
    ),
    (
        "ports-with-icmp",
        "  podSelector: {}\n  ingress:\n  - protocol: ICMP\n    ports: [{port: 80}]\n",
        "ports are for TCP, UDP and SCTP",
    ),
    (
        "icmp-types-with-tcp",
        "  podSelector: {}\n  egress:\n  - protocol: TCP\n    icmpTypes: [{type: 8}]\n",
        "icmpTypes are for ICMP and ICMPv6",
    ),
    (
        "two-peer-kinds",
        "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8}\n      securityGroup: {name: lb}\n",
        "a peer is exactly one of securityGroup, podSelector/namespaceSelector, ipBlock",
    ),
    (
        "no-peer-kind",
        "  podSelector: {}\n  ingress:\n  - from:\n    - {}\n",
        "a peer is exactly one of securityGroup, podSelector/namespaceSelector, ipBlock",
    ),
    (
        "unknown-protocol",
        "  podSelector: {}\n  ingress:\n  - protocol: GRE\n",
        "Unsupported value: \"GRE\"",
    ),
    (
        "port-out-of-range",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 70000}]\n",
        "should be less than or equal to 65535",
    ),
    (
        "cidr-too-long",
        "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 0000:0000:0000:0000:0000:ffff:255.255.255.255/1280}\n",
        "Too long: may not be more than 49 bytes",
    ),
    (
        "no-pod-selector",
        "  ingress:\n  - protocol: TCP\n",
        "spec.podSelector: Required value",
    ),
];

#[test]
fn the_crd_is_accepted_by_the_api_server() {
    require_privileged!();
    let kube = Kube::from_env();
    kube.apply_crds();
    let served = kube.must(&["api-resources", "--api-group=kubesg.io", "-o", "name"]);
    assert_eq!(served.trim(), "securitygroups.kubesg.io");
}

#[test]
fn every_invalid_security_group_is_refused_with_its_message() {
    require_privileged!();
    let kube = Kube::from_env();
    kube.apply_crds();
    let ns = kube.namespace("sg-invalid-");
    let mut wrong = Vec::new();
    for (name, spec, message) in INVALID {
        let out =
            kube.kubectl_with_input(&["apply", "-f", "-"], Some(&group(&ns.name, name, spec)));
        if out.ok || !out.stderr.contains(message) {
            wrong.push(format!(
                "{name}: accepted={} want {message:?}, got {}",
                out.ok,
                out.stderr.trim()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let stored = kube.must(&["get", "sg", "-n", &ns.name, "-o", "name"]);
    assert_eq!(stored.trim(), "", "nothing invalid was stored");
}

#[test]
fn a_valid_group_is_stored_and_listed_with_the_printer_columns() {
    require_privileged!();
    let kube = Kube::from_env();
    kube.apply_crds();
    let ns = kube.namespace("sg-valid-");
    let spec = "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - protocol: TCP\n    ports: [{port: 443}, {port: 8000, endPort: 8100}, {port: http}]\n    from:\n    - securityGroup: {name: lb}\n    - podSelector: {matchLabels: {role: probe}}\n      namespaceSelector: {}\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}\n  - protocol: ICMP\n    icmpTypes: [{type: 8}]\n  egress:\n  - protocol: UDP\n    ports: [{port: 53}]\n    to:\n    - ipBlock: {cidr: 0.0.0.0/0}\n    - ipBlock: {cidr: '::/0'}\n";
    kube.must_apply(&group(&ns.name, "web", spec));
    let table = kube.must(&["get", "sg", "-n", &ns.name]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "MEMBERS", "PROGRAMMED", "NODES", "ACCEPTED", "AGE"],
        "{table}"
    );
    assert!(
        table.lines().nth(1).is_some_and(|l| l.starts_with("web ")),
        "{table}"
    );
    let short = kube.must(&["get", "sg/web", "-n", &ns.name, "-o", "name"]);
    assert_eq!(short.trim(), "securitygroup.kubesg.io/web");
}

/// What an empty list means differs by field (`to: []` is anyone, `egress: []` is no one), so
/// `kubectl explain` says it for each list that can be empty, as the API server serves the
/// CRD's field docs.
#[test]
fn kubectl_explain_says_what_each_empty_list_means() {
    require_privileged!();
    let kube = Kube::from_env();
    kube.apply_crds();
    let explain = |field: &str| {
        kube.must(&["explain", &format!("securitygroups.{field}")])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let want = [
        (
            "spec.ingress",
            "Omitted or empty (`[]`): this group allows no ingress",
        ),
        (
            "spec.egress",
            "Empty (`[]`): it allows none (a deny-all egress group)",
        ),
        (
            "spec.ingress.from",
            "omitted or empty (`[]`): anyone, not no one",
        ),
        (
            "spec.egress.to",
            "omitted or empty (`[]`): anyone, not no one",
        ),
        ("spec.ingress.ports", "omitted or empty (`[]`): every port"),
        ("spec.egress.ports", "omitted or empty (`[]`): every port"),
        (
            "spec.ingress.icmpTypes",
            "omitted or empty (`[]`): every type",
        ),
        (
            "spec.egress.icmpTypes",
            "omitted or empty (`[]`): every type",
        ),
    ];
    let wrong: Vec<String> = want
        .iter()
        .filter_map(|(field, says)| {
            let text = explain(field);
            (!text.contains(says)).then(|| format!("{field}: want {says:?} in\n{text}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}
