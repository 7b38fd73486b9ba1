//! The one TLS setup of the agent's link to the operator (mTLS both ways, DESIGN.md "Contracts
//! between the parts"): the agent trusts only servers whose certificate chains to the configured
//! CA bundle and carries the operator's expected name, and presents its own client certificate.
//!
//! The PEM files are read and checked here, before tonic sees them, so that a missing or broken
//! file is reported by name (tonic would silently skip an unparsable CA certificate and fail
//! later with an unrelated handshake error). [`ClientTlsFiles::load`] is called again on every
//! reconnect, so certificates rotated on disk (a renewed Secret) are picked up without a restart.
//!
//! The TLS itself is tonic's (rustls with ring): chain and name verification happen there.
//! The PEM checks themselves ([`load_ca_bundle`], [`load_identity`]) are `kubesg_proto::tls`'s,
//! shared with the operator's server side.

use std::path::PathBuf;

use rustls::pki_types::ServerName;
use tonic::transport::ClientTlsConfig;

pub use kubesg_proto::tls::{load_ca_bundle, load_identity, TlsFileError};

/// The name the operator's server certificate carries by default: its Service in the chart's
/// namespace. The agent verifies it whatever address it dials (an IP, a node-local proxy).
pub const DEFAULT_OPERATOR_SERVER_NAME: &str = "kubesg-operator.kube-system.svc";

/// Where the agent's TLS material lives and which server name it expects, so the daemon can load
/// it again on each reconnect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM bundle of the CA certificates the operator's certificate must chain to.
    pub ca: PathBuf,
    /// PEM chain of the agent's client certificate (leaf first).
    pub cert: PathBuf,
    /// PEM private key of the agent's client certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The DNS name the operator's certificate must carry (e.g.
    /// [`DEFAULT_OPERATOR_SERVER_NAME`]), checked instead of the dialled host.
    pub server_name: String,
}

impl ClientTlsFiles {
    /// Reads and checks the three files and returns the client configuration for tonic: the CA
    /// bundle as the only trust roots, the client identity, and the expected server name.
    pub fn load(&self) -> Result<ClientTlsConfig, TlsFileError> {
        let ca = load_ca_bundle(&self.ca)?;
        let identity = load_identity(&self.cert, &self.key)?;
        ServerName::try_from(self.server_name.as_str()).map_err(|e| TlsFileError::ServerName {
            name: self.server_name.clone(),
            reason: e.to_string(),
        })?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(identity)
            .domain_name(self.server_name.clone()))
    }
}
