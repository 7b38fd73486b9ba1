//! The one PEM loading of kubesg's mTLS, for both ends of the operator ↔ agent link: the CA
//! bundle, the certificate chain and the private key are read and checked here, before tonic sees
//! them, so that a missing or broken file is reported by name (tonic silently skips an
//! unparsable CA certificate, which would make a server trust nobody or a client trust no
//! server, and fail later with an unrelated handshake error). The agent builds its client
//! configuration on these, the operator its server configuration.

use std::{
    io,
    path::{Path, PathBuf},
};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity};

/// Why the TLS files could not be used; every variant names the file(s) at fault, since that is
/// what whoever mounted the files has to fix.
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
    /// The expected server name (a client's setting) is not a valid DNS name or IP address.
    #[error("invalid expected operator server name {name:?}: {reason}")]
    ServerName {
        /// The configured name.
        name: String,
        /// Why it is invalid.
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
/// returns it as tonic's [`Certificate`] (for `ClientTlsConfig::ca_certificate` or
/// `ServerTlsConfig::client_ca_root`).
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
/// the key is the leaf's; returns them as tonic's [`Identity`] (for a client or a server).
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
