//! The server side of the operator ↔ agent mTLS (DESIGN.md "Contracts between the parts"): the
//! push server presents its own certificate and serves only clients whose certificate chains to
//! the agents' CA; there are no anonymous clients.
//!
//! The PEM files are read and checked here, before tonic sees them, so that a missing or broken
//! file is reported by name (tonic silently skips an unparsable CA certificate, which would make
//! the server trust nobody and fail every handshake with an unrelated error). The checks and
//! messages are the agent's (`kubesg_agent::tls`), so both ends report a bad file the same way.
//!
//! [`PeerIdentity`] reads the names out of an agent's client certificate, for the logs and for
//! the optional check that a certificate names the node its Hello claims.

use std::{
    fmt, io,
    path::{Path, PathBuf},
};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

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

/// Why the TLS files could not be used; every variant names the file(s) at fault, since that is
/// what whoever mounted the Secret has to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The file could not be read (missing, permissions).
    #[error("cannot read the {what} file {}: {source}", path.display())]
    Read {
        /// Which file: "CA bundle", "certificate chain" or "private key".
        what: &'static str,
        /// The path as configured.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file was read but holds nothing usable (not PEM, truncated, not a certificate/key).
    #[error("the {what} file {} is not usable: {reason}", path.display())]
    Invalid {
        /// Which file: "CA bundle", "certificate chain" or "private key".
        what: &'static str,
        /// The path as configured.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Both files parse, but the key is not the certificate's.
    #[error(
        "the private key {} does not belong to the certificate {}: {reason}",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate chain file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
        /// rustls's explanation.
        reason: String,
    },
}

const CA_BUNDLE: &str = "CA bundle";
const CERT_CHAIN: &str = "certificate chain";
const PRIVATE_KEY: &str = "private key";

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn invalid(what: &'static str, path: &Path, reason: impl Into<String>) -> TlsFileError {
    TlsFileError::Invalid {
        what,
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Every `CERTIFICATE` block of a PEM file, at least one.
fn pem_certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "no PEM CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Reads a PEM bundle of CA certificates and checks that each one parses as a trust anchor;
/// returns it as tonic's [`Certificate`] (for `ServerTlsConfig::client_ca_root`).
pub fn load_ca_bundle(path: &Path) -> Result<Certificate, TlsFileError> {
    let pem = read(CA_BUNDLE, path)?;
    let certs = pem_certificates(CA_BUNDLE, path, &pem)?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            invalid(
                CA_BUNDLE,
                path,
                format!("certificate #{} is not a valid CA certificate: {e}", i + 1),
            )
        })?;
    }
    Ok(Certificate::from_pem(pem))
}

/// Reads a certificate chain (leaf first) and its private key, checks that both parse and that
/// the key is the leaf's; returns them as tonic's [`Identity`].
pub fn load_identity(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsFileError> {
    let cert_pem = read(CERT_CHAIN, cert_path)?;
    let chain = pem_certificates(CERT_CHAIN, cert_path, &cert_pem)?;
    let key_pem = read(PRIVATE_KEY, key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        invalid(
            PRIVATE_KEY,
            key_path,
            format!("no usable PEM private key: {e}"),
        )
    })?;
    // The same provider tonic falls back to (its `tls-ring` feature).
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(PRIVATE_KEY, key_path, e.to_string()))?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Unknown: the key type cannot tell its public key; rustls accepts it too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e @ rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsFileError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
                reason: e.to_string(),
            })
        }
        Err(e) => {
            return Err(invalid(
                CERT_CHAIN,
                cert_path,
                format!("the first certificate does not parse: {e}"),
            ))
        }
    }
    Ok(Identity::from_pem(cert_pem, key_pem))
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
