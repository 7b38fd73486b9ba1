//! The server side of the operator ↔ agent mTLS (DESIGN.md "Contracts between the parts"): the
//! push server presents its own certificate and serves only clients whose certificate chains to
//! the agents' CA; there are no anonymous clients.
//!
//! The PEM files are read and checked by `kubesg_proto::tls`, the same checks and messages as the
//! agent's, so both ends report a bad file the same way.
//!
//! [`PeerIdentity`] reads the names out of an agent's client certificate, for the logs and for
//! the optional check that a certificate names the node its Hello claims.

use std::{fmt, path::PathBuf};

use tonic::transport::ServerTlsConfig;

pub use kubesg_proto::tls::{load_ca_bundle, load_identity, TlsFileError};

/// The operator's TLS files: its server certificate and the CA its clients (agents) must chain
/// to. Kept as paths so the server can be restarted with rotated files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM bundle of the CA(s) client certificates must chain to.
    pub client_ca: PathBuf,
    /// The server's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl ServerTlsFiles {
    /// Reads and checks the three files; see [`server_tls_config`].
    pub fn load(&self) -> Result<ServerTlsConfig, TlsFileError> {
        server_tls_config(self)
    }
}

/// The push server's TLS configuration: present `cert`/`key`, require a client certificate
/// chaining to `client_ca` (a client without one, or with one from another CA, fails the
/// handshake and never reaches the service).
pub fn server_tls_config(files: &ServerTlsFiles) -> Result<ServerTlsConfig, TlsFileError> {
    Ok(ServerTlsConfig::new()
        .identity(load_identity(&files.cert, &files.key)?)
        .client_ca_root(load_ca_bundle(&files.client_ca)?)
        .client_auth_optional(false))
}

/// The names an agent's client certificate carries (its leaf certificate; the chain was
/// already verified by the TLS handshake).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's common names (usually one).
    pub common_names: Vec<String>,
    /// The DNS names of the subject alternative name extension.
    pub dns_names: Vec<String>,
}

impl PeerIdentity {
    /// The names of a DER certificate; `None` when it does not parse (it passed the handshake,
    /// so this happens only with certificate features the parser does not know).
    pub fn from_der(der: &[u8]) -> Option<PeerIdentity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect();
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Some(PeerIdentity {
            common_names,
            dns_names,
        })
    }

    /// Whether the certificate names this node: a common name `node` or `system:node:node`
    /// (the kubelet's convention), or a DNS name `node`. A per-node certificate lets the
    /// operator refuse an agent that asks for another node's rules (which would reveal them,
    /// and let a compromised node learn its neighbours' peers).
    pub fn names_node(&self, node: &str) -> bool {
        let kubelet_style = format!("system:node:{node}");
        self.common_names
            .iter()
            .any(|cn| cn == node || *cn == kubelet_style)
            || self.dns_names.iter().any(|dns| dns == node)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CN={}", self.common_names.join(","))?;
        if !self.dns_names.is_empty() {
            write!(f, " DNS={}", self.dns_names.join(","))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with this common name and these DNS names, as DER.
    fn cert(common_name: &str, dns: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_reads_common_and_dns_names() {
        let id =
            PeerIdentity::from_der(&cert("kubesg-agent", &["node-a", "node-a.example"])).unwrap();
        assert_eq!(id.common_names, ["kubesg-agent"]);
        assert_eq!(id.dns_names, ["node-a", "node-a.example"]);
        assert_eq!(id.to_string(), "CN=kubesg-agent DNS=node-a,node-a.example");
        assert_eq!(PeerIdentity::from_der(b"not a certificate"), None);
    }

    #[test]
    fn node_is_named_by_common_name_kubelet_style_name_or_dns_name() {
        let by_cn = PeerIdentity::from_der(&cert("node-a", &[])).unwrap();
        let kubelet = PeerIdentity::from_der(&cert("system:node:node-a", &[])).unwrap();
        let by_dns = PeerIdentity::from_der(&cert("kubesg-agent", &["node-a"])).unwrap();
        for id in [&by_cn, &kubelet, &by_dns] {
            assert!(id.names_node("node-a"), "{id}");
            assert!(!id.names_node("node-b"), "{id}");
        }
        let shared = PeerIdentity::from_der(&cert("kubesg-agent", &[])).unwrap();
        assert!(!shared.names_node("node-a"));
        assert!(!shared.names_node("kubesg"));
    }
}
