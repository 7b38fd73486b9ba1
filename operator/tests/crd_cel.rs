//! The CRD's CEL rules (`x-kubernetes-validations`), evaluated as an API server evaluates them
//! (kube-cel: Kubernetes' CEL libraries, IP and CIDR included), against the operator's own
//! validation of the same spec (`validate.rs`, which also reports what reaches it from a manifest
//! directory or an older CRD): every spec below is accepted by both or refused by both, with the
//! rule's message naming what is wrong.
//!
//! kube-cel's CEL has no `type()`, which the two `endPort` rules need (a port is an int or a
//! name, and `type()` is how Kubernetes tells them apart cheaply). Those two rules, and only
//! those, are reported as not evaluable here: the test fails if any other rule is, and the
//! operator's refusal of the cases they cover is still checked.

use std::collections::BTreeSet;

use kube::CustomResourceExt as _;
use kubesg_operator::{
    crd::{SecurityGroup, SecurityGroupSpec},
    validate::validate,
};
use serde_json::{json, Value};

/// The schema of the CRD as `crdgen` writes it into the chart.
fn schema() -> Value {
    let crd = serde_json::to_value(SecurityGroup::crd()).expect("the CRD as JSON");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// A SecurityGroup with `spec`, as `kubectl apply` sends it.
fn object(spec: &Value) -> Value {
    json!({
        "apiVersion": "kubesg.io/v1alpha1",
        "kind": "SecurityGroup",
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": spec,
    })
}

/// The rules kube-cel cannot evaluate (see the module's comment).
const NEEDS_TYPE: [&str; 2] = [
    "!has(self.endPort) || type(self.port) == int",
    "!has(self.endPort) || (type(self.port) == int && self.endPort >= self.port)",
];

/// What the CEL rules say of `spec`: the messages of the rules it breaks (empty when it passes)
/// and the rules that could not be evaluated.
fn cel(spec: &Value) -> (Vec<String>, BTreeSet<String>) {
    let mut refusals = Vec::new();
    let mut unevaluable = BTreeSet::new();
    if let Err(errors) = kube_cel::Validator::new().validate(&schema(), &object(spec), None) {
        for e in errors.as_slice() {
            if e.kind == kube_cel::ErrorKind::UnsupportedReference {
                unevaluable.insert(e.rule.clone());
            } else if NEEDS_TYPE.contains(&e.rule.as_str()) {
                // `type(...) == int && ...` short-circuits into "no such overload" on names.
                unevaluable.insert(e.rule.clone());
            } else {
                refusals.push(format!("{}: {}", e.field_path, e.message));
            }
        }
    }
    let unexpected: Vec<&String> = unevaluable
        .iter()
        .filter(|r| !NEEDS_TYPE.contains(&r.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "rules kube-cel cannot evaluate: {unexpected:?}"
    );
    (refusals, unevaluable)
}

/// The operator's verdict on `spec`: `Err` with its message when it refuses it.
fn operator_verdict(spec: &Value) -> Result<(), String> {
    let spec: SecurityGroupSpec =
        serde_json::from_value(spec.clone()).expect("the spec matches the Rust types");
    validate("shop", &spec).map(drop).map_err(|e| e.to_string())
}

/// An ingress rule with `rule`'s fields over a TCP 443 rule from 10.0.0.0/8 (`null`: without it).
fn ingress(rule: Value) -> Value {
    let mut base = json!({
        "protocol": "TCP",
        "ports": [ { "port": 443 } ],
        "from": [ { "ipBlock": { "cidr": "10.0.0.0/8" } } ],
    });
    if let (Some(b), Some(r)) = (base.as_object_mut(), rule.as_object()) {
        for (k, v) in r {
            // `null` removes the field, as leaving it out of the manifest would.
            if v.is_null() {
                b.remove(k);
            } else {
                b.insert(k.clone(), v.clone());
            }
        }
    }
    json!({ "podSelector": { "matchLabels": { "app": "web" } }, "ingress": [ base ] })
}

#[test]
fn valid_groups_pass_the_cel_rules_and_the_operator() {
    let specs = [
        ingress(json!({})),
        ingress(json!({ "ports": [ { "port": 8000, "endPort": 8100 }, { "port": "http" } ] })),
        ingress(json!({ "protocol": "ICMP", "ports": null, "icmpTypes": [ { "type": 8 } ] })),
        ingress(json!({ "protocol": "Any", "ports": null })),
        ingress(json!({ "from": [
            { "securityGroup": { "name": "lb" } },
            { "podSelector": { "matchLabels": { "app": "lb" } },
              "namespaceSelector": { "matchLabels": { "team": "edge" } } },
            { "ipBlock": { "cidr": "10.0.0.0/8", "except": [ "10.1.0.0/16", "10.2.3.4/32" ] } },
            { "ipBlock": { "cidr": "fd00::/8", "except": [ "fd00:1::/32" ] } },
        ] })),
        json!({
            "podSelector": {},
            "egress": [ { "protocol": "UDP", "ports": [ { "port": 53 } ],
                          "to": [ { "ipBlock": { "cidr": "0.0.0.0/0" } },
                                  { "ipBlock": { "cidr": "::/0" } } ] } ],
        }),
    ];
    for spec in &specs {
        assert_eq!(cel(spec).0, Vec::<String>::new(), "CEL refused {spec}");
        assert_eq!(
            operator_verdict(spec),
            Ok(()),
            "the operator refused {spec}"
        );
    }
}

#[test]
fn port_ranges_the_type_rules_judge_are_refused_by_the_operator() {
    for spec in [
        ingress(json!({ "ports": [ { "port": 8100, "endPort": 8000 } ] })),
        ingress(json!({ "ports": [ { "port": "http", "endPort": 8000 } ] })),
    ] {
        let (refusals, unevaluable) = cel(&spec);
        assert!(
            refusals.is_empty() && !unevaluable.is_empty(),
            "only the type() rules judge {spec}: {refusals:?} {unevaluable:?}"
        );
        assert!(
            operator_verdict(&spec).is_err(),
            "the operator must refuse {spec}"
        );
    }
}

#[test]
fn each_invalid_group_is_refused_by_its_cel_rule_and_by_the_operator() {
    let cases = [
        (
            ingress(json!({ "from": [ { "ipBlock": { "cidr": "10.0.0.0/33" } } ] })),
            "cidr must be a CIDR",
        ),
        (
            ingress(json!({ "from": [ { "ipBlock": { "cidr": "web-tier" } } ] })),
            "cidr must be a CIDR",
        ),
        (
            ingress(json!({ "from": [ { "ipBlock": {
                "cidr": "10.0.0.0/8", "except": [ "192.168.0.0/16" ] } } ] })),
            "every except must be a CIDR inside cidr",
        ),
        (
            ingress(json!({ "from": [ { "ipBlock": {
                "cidr": "10.0.0.0/8", "except": [ "fd00::/8" ] } } ] })),
            "every except must be a CIDR inside cidr",
        ),
        (
            ingress(json!({ "from": [ {
                "securityGroup": { "name": "lb" },
                "ipBlock": { "cidr": "10.0.0.0/8" } } ] })),
            "a peer is exactly one of",
        ),
        (
            ingress(json!({ "from": [ {} ] })),
            "a peer is exactly one of",
        ),
        (
            ingress(json!({ "protocol": "ICMP" })),
            "ports are for TCP, UDP and SCTP",
        ),
        (
            ingress(json!({ "icmpTypes": [ { "type": 8 } ] })),
            "icmpTypes are for ICMP and ICMPv6",
        ),
    ];
    for (spec, message) in &cases {
        let refusals = cel(spec).0;
        assert!(
            refusals.iter().any(|r| r.contains(message)),
            "CEL must refuse {spec} with {message:?}, said {refusals:?}"
        );
        assert!(
            operator_verdict(spec).is_err(),
            "the operator must refuse {spec} ({message})"
        );
    }
}
