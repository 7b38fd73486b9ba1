//! The cluster as the compiler sees it: namespaces, pods, nodes, services and security groups,
//! reduced to what decides connectivity. Both sources (the Kubernetes API and a directory of manifests) fill
//! this same model, so one compile-and-push path serves both.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{crd::SecurityGroupSpec, validate::FieldError};

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A namespace: its labels (namespace selectors match them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// The IP protocol of a named container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortProtocol {
    /// TCP (Kubernetes' default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A named container port of a pod (named ports in rules resolve through these, per pod).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    /// The name (`containers[].ports[].name`).
    pub name: String,
    /// The container port.
    pub port: u16,
    /// Its protocol.
    pub protocol: PortProtocol,
}

/// A pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// Its UID (the agent tells a recreated pod of the same name apart by it).
    pub uid: String,
    /// The node it is scheduled on; `None` while pending scheduling.
    pub node: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Its addresses (`status.podIPs`); empty until the CNI gave it some. A pod without
    /// addresses can be a member but is nobody's peer yet.
    pub ips: Vec<IpAddr>,
    /// Named container ports.
    pub ports: Vec<NamedPort>,
    /// Whether it runs on the host's network (`spec.hostNetwork`): kubesg does not enforce
    /// those, and their addresses are the node's.
    pub host_network: bool,
    /// Whether it is finished (phase Succeeded or Failed): it holds no address any more.
    pub terminated: bool,
    /// Whether it is being deleted (`metadata.deletionTimestamp`): the kubelet tears its
    /// network down (CNI DEL) before the object goes, so its endpoint may be gone already.
    pub deleting: bool,
}

/// Where a Service port sends its connections on a backend pod (`spec.ports[].targetPort`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetPort {
    /// A port number (the Service port's own number when `targetPort` is omitted).
    Number(u16),
    /// The name of a container port, looked up on each backend pod with the Service port's
    /// protocol (a backend without it is sent nothing on this port).
    Name(String),
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePort {
    /// Its protocol.
    pub protocol: PortProtocol,
    /// The port clients connect to on the ClusterIP.
    pub port: u16,
    /// Where kube-proxy forwards it on the chosen backend.
    pub target_port: TargetPort,
}

/// A Service, as far as it decides which ClusterIP connections reach which pods: egress rules
/// are judged on the pods behind a ClusterIP, because kube-proxy translates the destination only
/// after the packet has left the client's interface (docs/architecture.md, "Services").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// `spec.selector`. Empty: a Service without a selector (its EndpointSlices are written by
    /// hand or by another controller): kubesg does not resolve its backends.
    pub selector: BTreeMap<String, String>,
    /// `spec.clusterIPs` (both families). Empty for headless and ExternalName Services, whose
    /// clients connect to pod addresses or names directly.
    pub cluster_ips: Vec<IpAddr>,
    /// Its ports.
    pub ports: Vec<ServicePort>,
}

/// A security group as the compiler needs it, or a Kubernetes NetworkPolicy read as one
/// (`crate::netpol`): both select members in their namespace and list allow rules with the same
/// peers and ports, so one compiler, one set of indexes and one datapath serve both.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// `metadata.generation`, reported back as `status.observedGeneration`.
    pub generation: i64,
    /// The spec.
    pub spec: SecurityGroupSpec,
    /// Which API object it is, which decides the layer its rules are in.
    pub kind: GroupKind,
    /// For a NetworkPolicy, the rule of the NetworkPolicy each rule of `spec` comes from (one
    /// NetworkPolicy rule becomes one rule per protocol it names), for `kubesg-agent explain`
    /// and the logs. `None`: the rules are the object's own.
    pub origins: Option<RuleOrigins>,
    /// Why the stored object's spec could not be read by this version (e.g. a number the API
    /// server's schema admits but no field here can hold): the group is then not Accepted and
    /// contributes nothing, like an invalid one, and says which field. `None`: `spec` is the
    /// object's.
    pub unreadable: Option<FieldError>,
}

/// Names of the rules a group's rules were translated from, by direction and index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleOrigins {
    /// One per `spec.ingress` rule.
    pub ingress: Vec<String>,
    /// One per `spec.egress` rule.
    pub egress: Vec<String>,
}

/// The API object a [`Group`] comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKind {
    /// A kubesg SecurityGroup: it judges both directions of its members (ingress omitted allows
    /// none, egress omitted allows all).
    #[default]
    SecurityGroup,
    /// A `networking.k8s.io/v1` NetworkPolicy: it judges only the directions its `policyTypes`
    /// name (a pod is isolated for ingress only by policies of type Ingress), and its rules form
    /// a layer of their own that must agree with the pod's security groups.
    NetworkPolicy {
        /// `policyTypes` includes Ingress.
        ingress: bool,
        /// `policyTypes` includes Egress.
        egress: bool,
    },
}

impl GroupKind {
    /// Whether groups of this kind judge a pod's connections in `ingress` (else egress).
    pub fn isolates(self, ingress: bool) -> bool {
        match self {
            GroupKind::SecurityGroup => true,
            GroupKind::NetworkPolicy {
                ingress: i,
                egress: e,
            } => {
                if ingress {
                    i
                } else {
                    e
                }
            }
        }
    }

    /// Whether this is a NetworkPolicy.
    pub fn is_network_policy(self) -> bool {
        matches!(self, GroupKind::NetworkPolicy { .. })
    }
}

/// Everything that decides connectivity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cluster {
    /// Namespaces by name. A pod or group in a namespace missing here is treated as in a
    /// namespace without labels.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by namespace/name.
    pub pods: BTreeMap<ObjectKey, Pod>,
    /// Nodes by name.
    pub nodes: BTreeSet<String>,
    /// Security groups by namespace/name, and NetworkPolicies by the keys
    /// `crate::netpol::key` gives them (a name no SecurityGroup can have).
    pub groups: BTreeMap<ObjectKey, Group>,
    /// Services by namespace/name.
    pub services: BTreeMap<ObjectKey, Service>,
}
