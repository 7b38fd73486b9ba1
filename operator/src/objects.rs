//! Kubernetes objects → the compiler's model. Both sources (the API and a manifests directory)
//! go through these functions, so a pod means the same thing whichever way it arrives.

use std::net::IpAddr;

use k8s_openapi::{
    api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod, Service as K8sService},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{api::DynamicObject, ResourceExt as _};

use crate::{
    crd::SecurityGroupSpec,
    model::{
        Group, GroupKind, NamedPort, Namespace, ObjectKey, Pod, PortProtocol, Service, ServicePort,
        TargetPort,
    },
    validate::FieldError,
};

/// Why an object cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    /// A namespaced object without a namespace (the manifests source may give it a default).
    #[error("{kind} {name} has no namespace")]
    NoNamespace {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
    },
    /// An object without a name.
    #[error("a {0} without a name")]
    NoName(&'static str),
    /// An object the API server would have refused (only a manifests directory can hold one):
    /// the message names the object and the field.
    #[error("{0}")]
    Invalid(String),
}

fn key(
    kind: &'static str,
    meta_ns: Option<String>,
    name: String,
) -> Result<ObjectKey, ObjectError> {
    if name.is_empty() {
        return Err(ObjectError::NoName(kind));
    }
    match meta_ns {
        Some(ns) if !ns.is_empty() => Ok(ObjectKey::new(ns, name)),
        _ => Err(ObjectError::NoNamespace { kind, name }),
    }
}

/// A namespace's name and model.
pub fn namespace(ns: &K8sNamespace) -> Result<(String, Namespace), ObjectError> {
    let name = ns.name_any();
    if name.is_empty() {
        return Err(ObjectError::NoName("Namespace"));
    }
    Ok((
        name,
        Namespace {
            labels: ns.labels().clone(),
        },
    ))
}

/// The annotation of a static pod's mirror object holding the uid the kubelet gave the pod
/// (`kubernetes.io/config.mirror`, the hash of its manifest).
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A pod's key and model: addresses from `status.podIPs` (or `podIP`), named ports from its
/// containers, the node from `spec.nodeName`.
pub fn pod(p: &K8sPod) -> Result<(ObjectKey, Pod), ObjectError> {
    let key = key("Pod", p.namespace(), p.name_any())?;
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|i| i.parse().ok())
        {
            ips.push(ip);
        }
    }
    let ports = spec
        .map(|s| {
            s.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|cp| {
                    let name = cp.name.clone()?;
                    let port = u16::try_from(cp.container_port).ok()?;
                    let protocol = port_protocol(cp.protocol.as_deref());
                    Some(NamedPort {
                        name,
                        port,
                        protocol,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let phase = status.and_then(|s| s.phase.as_deref());
    // A static pod's object is its mirror, whose uid is not the one the kubelet runs it (and
    // calls the CNI) with: that one is the config hash the mirror carries.
    let uid = p
        .annotations()
        .get(MIRROR_ANNOTATION)
        .filter(|hash| !hash.is_empty())
        .cloned()
        .or_else(|| p.uid())
        .unwrap_or_default();
    Ok((
        key,
        Pod {
            uid,
            node: spec.and_then(|s| s.node_name.clone()),
            labels: p.labels().clone(),
            ips,
            ports,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminated: matches!(phase, Some("Succeeded") | Some("Failed")),
            deleting: p.metadata.deletion_timestamp.is_some(),
        },
    ))
}

/// A port's protocol as Kubernetes spells it (TCP when omitted).
fn port_protocol(p: Option<&str>) -> PortProtocol {
    match p {
        Some("UDP") => PortProtocol::Udp,
        Some("SCTP") => PortProtocol::Sctp,
        _ => PortProtocol::Tcp,
    }
}

/// A Service's key and model: its selector, its ClusterIPs (`spec.clusterIPs`, else
/// `spec.clusterIP`; `None` — headless — and an ExternalName Service give none) and its ports,
/// a `targetPort` defaulting to the port as the API server defaults it.
pub fn service(s: &K8sService) -> Result<(ObjectKey, Service), ObjectError> {
    let key = key("Service", s.namespace(), s.name_any())?;
    let Some(spec) = s.spec.as_ref() else {
        return Ok((key, Service::default()));
    };
    let external_name = spec.type_.as_deref() == Some("ExternalName");
    let parse = |ips: &[String]| -> Vec<IpAddr> {
        ips.iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .collect()
    };
    let mut cluster_ips = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => parse(ips),
        _ => parse(spec.cluster_ip.as_slice()),
    };
    if external_name {
        cluster_ips.clear();
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|sp| {
            let port = u16::try_from(sp.port).ok().filter(|&p| p != 0)?;
            let target_port = match &sp.target_port {
                Some(IntOrString::String(name)) if !name.is_empty() => {
                    TargetPort::Name(name.clone())
                }
                Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                    Ok(n) if n != 0 => TargetPort::Number(n),
                    _ => TargetPort::Number(port),
                },
                _ => TargetPort::Number(port),
            };
            Some(ServicePort {
                protocol: port_protocol(sp.protocol.as_deref()),
                port,
                target_port,
            })
        })
        .collect();
    Ok((
        key,
        Service {
            selector: spec.selector.clone().unwrap_or_default(),
            cluster_ips,
            ports,
        },
    ))
}

/// A SecurityGroup as the API server stores it, its spec read here rather than by the watch: a
/// stored object this version cannot read (written before a schema change, or holding a number
/// the schema admits and no field here can, such as a port of 2^32) becomes an unreadable group
/// naming the field, reported on its own status, while every other group keeps working (read
/// as a typed list, one such object fails the whole list, and nothing compiles again).
pub fn stored_group(sg: &DynamicObject) -> Result<(ObjectKey, Group), ObjectError> {
    let key = key("SecurityGroup", sg.namespace(), sg.name_any())?;
    let spec = sg.data.get("spec").cloned().unwrap_or_default();
    let (spec, unreadable) = match serde_path_to_error::deserialize::<_, SecurityGroupSpec>(spec) {
        Ok(spec) => (spec, None),
        Err(e) => {
            let path = match e.path().to_string() {
                root if root == "." => "spec".to_owned(),
                field => format!("spec.{field}"),
            };
            let message = format!("this version of kubesg cannot read it: {}", e.inner());
            (
                SecurityGroupSpec::default(),
                Some(FieldError { path, message }),
            )
        }
    };
    Ok((
        key,
        Group {
            generation: sg.metadata.generation.unwrap_or(0),
            spec,
            kind: GroupKind::SecurityGroup,
            origins: None,
            unreadable,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SecurityGroup;

    fn stored(spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kubesg.io/v1alpha1",
            "kind": "SecurityGroup",
            "metadata": { "name": "web", "namespace": "shop", "generation": 3 },
            "spec": spec,
        }))
        .unwrap()
    }

    fn k8s_pod(metadata: serde_json::Value, status: serde_json::Value) -> K8sPod {
        serde_json::from_value(serde_json::json!({
            "metadata": metadata,
            "spec": { "nodeName": "vm", "containers": [] },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_static_pods_uid_is_the_one_the_kubelet_gives_the_cni_not_its_mirrors() {
        let mirror = k8s_pod(
            serde_json::json!({
                "name": "etcd-vm", "namespace": "kube-system", "uid": "mirror-uid",
                "annotations": { "kubernetes.io/config.mirror": "3f2e1d", "kubernetes.io/config.hash": "3f2e1d" },
            }),
            serde_json::json!({ "podIP": "10.0.0.9" }),
        );
        let (_, p) = pod(&mirror).unwrap();
        assert_eq!(p.uid, "3f2e1d");
        assert!(!p.deleting);
        let plain = k8s_pod(
            serde_json::json!({
                "name": "web", "namespace": "shop", "uid": "u1",
                "deletionTimestamp": "2026-12-07T00:00:00Z",
            }),
            serde_json::json!({}),
        );
        let (_, p) = pod(&plain).unwrap();
        assert_eq!(p.uid, "u1");
        assert!(
            p.deleting,
            "a pod with a deletion timestamp is being torn down"
        );
    }

    #[test]
    fn a_stored_group_reads_as_the_typed_one() {
        let spec = serde_json::json!({
            "podSelector": { "matchLabels": { "app": "web" } },
            "ingress": [{ "ports": [{ "port": 8080 }, { "port": "http" }] }],
        });
        let typed: SecurityGroup =
            serde_json::from_value(serde_json::to_value(stored(spec.clone())).unwrap()).unwrap();
        let (key, g) = stored_group(&stored(spec)).unwrap();
        assert_eq!(key, ObjectKey::new("shop", "web"));
        assert_eq!(
            (g.generation, &g.spec, g.unreadable),
            (3, &typed.spec, None)
        );
        assert_eq!(g.kind, GroupKind::SecurityGroup);
    }

    #[test]
    fn a_stored_group_this_version_cannot_read_is_invalid_and_names_the_field() {
        // The CRD's int-or-string port admits any integer; no port field holds 2^32.
        let spec = serde_json::json!({
            "podSelector": {},
            "ingress": [{ "ports": [{ "port": 80 }, { "port": 4_294_967_296_u64 }] }],
        });
        let (key, g) = stored_group(&stored(spec)).unwrap();
        assert_eq!(key, ObjectKey::new("shop", "web"));
        assert_eq!(g.generation, 3);
        let why = crate::validate::validate_group("shop", &g)
            .unwrap_err()
            .to_string();
        assert!(
            why.starts_with(
                "spec.ingress[0].ports[1].port: this version of kubesg cannot read it:"
            ) && why.contains("4294967296"),
            "{why}"
        );
        // A spec that is not an object at all names the spec.
        let (_, g) = stored_group(&stored(serde_json::json!("web"))).unwrap();
        assert_eq!(g.unreadable.unwrap().path, "spec");
    }

    fn service_yaml(yaml: &str) -> (ObjectKey, Service) {
        service(&serde_yaml::from_str::<K8sService>(yaml).unwrap()).unwrap()
    }

    #[test]
    fn a_dual_stack_service_keeps_both_cluster_ips_and_its_target_ports() {
        let (key, s) = service_yaml(
            "metadata: { name: web, namespace: shop }\n\
             spec:\n\
             \x20 selector: { app: web }\n\
             \x20 clusterIP: 10.96.0.10\n\
             \x20 clusterIPs: [ 10.96.0.10, 'fd00:96::10' ]\n\
             \x20 ports:\n\
             \x20   - { port: 80, targetPort: http }\n\
             \x20   - { port: 53, protocol: UDP, targetPort: 5353 }\n\
             \x20   - { port: 443 }\n",
        );
        assert_eq!(key, ObjectKey::new("shop", "web"));
        assert_eq!(s.selector["app"], "web");
        assert_eq!(
            s.cluster_ips,
            [
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00:96::10".parse().unwrap()
            ]
        );
        assert_eq!(
            s.ports,
            [
                ServicePort {
                    protocol: PortProtocol::Tcp,
                    port: 80,
                    target_port: TargetPort::Name("http".into())
                },
                ServicePort {
                    protocol: PortProtocol::Udp,
                    port: 53,
                    target_port: TargetPort::Number(5353)
                },
                ServicePort {
                    protocol: PortProtocol::Tcp,
                    port: 443,
                    target_port: TargetPort::Number(443)
                },
            ]
        );
    }

    #[test]
    fn headless_and_external_name_services_have_no_cluster_ip() {
        let (_, headless) = service_yaml(
            "metadata: { name: db, namespace: shop }\n\
             spec: { selector: { app: db }, clusterIP: None, clusterIPs: [ None ], ports: [ { port: 5432 } ] }\n",
        );
        assert!(headless.cluster_ips.is_empty());
        let (_, external) = service_yaml(
            "metadata: { name: ext, namespace: shop }\n\
             spec: { type: ExternalName, externalName: example.com, ports: [ { port: 443 } ] }\n",
        );
        assert!(external.cluster_ips.is_empty());
        assert!(external.selector.is_empty());
    }
}
