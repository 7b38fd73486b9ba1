//! Kubernetes objects → the compiler's model. Both sources (the API and a manifests directory)
//! go through these functions, so a pod means the same thing whichever way it arrives.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use kube::ResourceExt as _;

use crate::{
    crd::SecurityGroup,
    model::{Group, NamedPort, Namespace, ObjectKey, Pod, PortProtocol},
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
                    let protocol = match cp.protocol.as_deref() {
                        Some("UDP") => PortProtocol::Udp,
                        Some("SCTP") => PortProtocol::Sctp,
                        _ => PortProtocol::Tcp,
                    };
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
    Ok((
        key,
        Pod {
            uid: p.uid().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            labels: p.labels().clone(),
            ips,
            ports,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminated: matches!(phase, Some("Succeeded") | Some("Failed")),
        },
    ))
}

/// A group's key and model. Its generation is `metadata.generation` (the API server's); the
/// manifests source, which has none, supplies its own.
pub fn group(sg: &SecurityGroup) -> Result<(ObjectKey, Group), ObjectError> {
    let key = key("SecurityGroup", sg.namespace(), sg.name_any())?;
    Ok((
        key,
        Group {
            generation: sg.metadata.generation.unwrap_or(0),
            spec: sg.spec.clone(),
        },
    ))
}
