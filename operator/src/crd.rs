//! The `SecurityGroup` custom resource (`kubesg.io/v1alpha1`): which connections the member pods
//! of a namespace may open (egress) and accept (ingress). Allow-only, stateful, and the union of
//! every group a pod belongs to. The CRD YAML in `charts/kubesg/crds/` is generated from these
//! types (`kubesg-operator crdgen`); validation lives here too, as schema constraints and CEL
//! rules (`x-kubernetes-validations`) the API server enforces.

use k8s_openapi::apimachinery::pkg::{
    apis::meta::v1::{Condition, LabelSelector},
    util::intstr::IntOrString,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A security group: its member pods (in its namespace) and the rules that apply to them.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[kube(
    group = "kubesg.io",
    version = "v1alpha1",
    kind = "SecurityGroup",
    plural = "securitygroups",
    singular = "securitygroup",
    shortname = "sg",
    namespaced,
    status = "SecurityGroupStatus",
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.members"}"#,
    printcolumn = r#"{"name":"Programmed","type":"integer","description":"Nodes that enforce the current generation","jsonPath":".status.nodes.programmed"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","description":"Nodes with a member or an affected peer","jsonPath":".status.nodes.total"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupSpec {
    /// The members: pods of this namespace whose labels match. An empty selector selects every
    /// pod of the namespace.
    pub pod_selector: LabelSelector,
    /// Connections members may accept, each rule allowing what it matches. Omitted or empty
    /// (`[]`): this group allows no ingress (other groups of the pod may).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::validate::MAX_RULES))]
    pub ingress: Option<Vec<IngressRule>>,
    /// Connections members may open, each rule allowing what it matches. Omitted: this group
    /// allows all egress. Empty (`[]`): it allows none (a deny-all egress group), unlike an
    /// empty `to` of a rule, which means anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::validate::MAX_RULES))]
    pub egress: Option<Vec<EgressRule>>,
}

/// The IP protocols a rule can name.
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
    Default,
)]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
    /// ICMP (IPv4).
    #[serde(rename = "ICMP")]
    Icmp,
    /// ICMPv6.
    #[serde(rename = "ICMPv6")]
    Icmpv6,
    /// Every protocol and port.
    Any,
}

/// A destination port, a range of them, or a named container port.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.endPort) || type(self.port) == int", "message": "endPort needs a numeric port"},
    {"rule": "!has(self.endPort) || (type(self.port) == int && self.endPort >= self.port)", "message": "endPort must be >= port"}
]))]
pub struct Port {
    /// The port number (1–65535), or the name of a container port of the pod that accepts the
    /// connection.
    pub port: IntOrString,
    /// With a numeric port: the last port of the range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
}

/// An ICMP or ICMPv6 message type, with one code or all of them.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub struct IcmpType {
    /// The type (e.g. 8: echo request; 128: ICMPv6 echo request).
    #[serde(rename = "type")]
    #[schemars(range(min = 0, max = 255))]
    pub icmp_type: i32,
    /// The code; omitted: every code of the type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 255))]
    pub code: Option<i32>,
}

/// Another security group, whose members are the peers.
#[derive(
    Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub struct GroupRef {
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its namespace; omitted: this group's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A block of addresses, minus some blocks inside it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "isCIDR(self.cidr)", "message": "cidr must be a CIDR, e.g. 10.0.0.0/8"},
    {"rule": "!has(self.except) || self.except.all(e, isCIDR(e) && cidr(self.cidr).containsCIDR(e))", "message": "every except must be a CIDR inside cidr"}
]))]
pub struct IpBlock {
    /// The block, e.g. `10.0.0.0/8` or `fd00::/8`.
    #[schemars(length(max = crate::validate::MAX_CIDR_LEN))]
    pub cidr: String,
    /// Blocks inside `cidr` that are not allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::validate::MAX_EXCEPT), inner(length(max = crate::validate::MAX_CIDR_LEN)))]
    pub except: Option<Vec<String>>,
}

/// Who is on the other end of a connection: members of a group, pods by selectors, or addresses.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.securityGroup) ? 1 : 0) + (has(self.podSelector) || has(self.namespaceSelector) ? 1 : 0) + (has(self.ipBlock) ? 1 : 0) == 1", "message": "a peer is exactly one of securityGroup, podSelector/namespaceSelector, ipBlock"}
]))]
pub struct Peer {
    /// The members of another security group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_group: Option<GroupRef>,
    /// Pods whose labels match, in this namespace, or in the namespaces `namespaceSelector`
    /// matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces whose labels match (every pod in them, or those `podSelector` matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// Connections members may accept.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.ports) || !(self.protocol in ['ICMP', 'ICMPv6', 'Any'])", "message": "ports are for TCP, UDP and SCTP"},
    {"rule": "!has(self.icmpTypes) || self.protocol in ['ICMP', 'ICMPv6']", "message": "icmpTypes are for ICMP and ICMPv6"}
]))]
pub struct IngressRule {
    /// The protocol (default TCP).
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination ports (on the member); omitted or empty (`[]`): every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::validate::MAX_PORTS))]
    pub ports: Option<Vec<Port>>,
    /// ICMP messages; omitted or empty (`[]`): every type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::validate::MAX_ICMP_TYPES))]
    pub icmp_types: Option<Vec<IcmpType>>,
    /// Who may connect; omitted or empty (`[]`): anyone, not no one (to allow no ingress, leave
    /// the rule out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::validate::MAX_PEERS))]
    pub from: Option<Vec<Peer>>,
}

/// Connections members may open.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.ports) || !(self.protocol in ['ICMP', 'ICMPv6', 'Any'])", "message": "ports are for TCP, UDP and SCTP"},
    {"rule": "!has(self.icmpTypes) || self.protocol in ['ICMP', 'ICMPv6']", "message": "icmpTypes are for ICMP and ICMPv6"}
]))]
pub struct EgressRule {
    /// The protocol (default TCP).
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination ports (on the peer; a named port is looked up on each peer pod); omitted or
    /// empty (`[]`): every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::validate::MAX_PORTS))]
    pub ports: Option<Vec<Port>>,
    /// ICMP messages; omitted or empty (`[]`): every type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::validate::MAX_ICMP_TYPES))]
    pub icmp_types: Option<Vec<IcmpType>>,
    /// Whom members may connect to; omitted or empty (`[]`): anyone, not no one (to allow no
    /// egress, set `egress: []`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::validate::MAX_PEERS))]
    pub to: Option<Vec<Peer>>,
}

/// What the operator reports of a group.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecurityGroupStatus {
    /// The generation the rest of the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many pods are members.
    #[serde(default)]
    pub members: i32,
    /// `Accepted` (the spec is valid; the reason when not) and `Programmed` (every node with a
    /// member or an affected peer acked a version that includes this generation; which lag or
    /// refused it when not).
    // A map keyed by `type` for server-side apply: each writer owns its own condition types,
    // so another controller's conditions survive the operator's writes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Nodes that enforce this generation, out of those it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
}

/// Programmed nodes out of the nodes a group concerns.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub struct NodeCounts {
    /// Nodes that acked a version including this generation.
    pub programmed: i32,
    /// Nodes with a member or an endpoint whose rules name this group.
    pub total: i32,
}
