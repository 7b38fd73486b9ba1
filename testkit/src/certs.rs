//! Throwaway PKI for the mTLS tests of the operator link: a CA with the operator's server
//! certificate and an agent's client certificate, a server certificate from that CA for another
//! name, and a second, unrelated CA with its own server and client certificates (the negative
//! tests). Everything is written as PEM files into a temporary directory removed on drop.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use kubesg_agent::tls::{ClientTlsFiles, DEFAULT_OPERATOR_SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::operator::ServerTlsFiles;

/// The name the test operator's good certificate carries (the chart's Service name), which the
/// agent is configured to expect.
pub const OPERATOR_SERVER_NAME: &str = DEFAULT_OPERATOR_SERVER_NAME;

/// A certificate and its private key, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// The generated PKI; its directory (and every file in it) is removed on drop.
#[derive(Debug)]
pub struct TempPki {
    dir: tempfile::TempDir,
    /// Signs per-node agent certificates ([`TempPki::agent_tls_for`]).
    issuer: CaIssuer,
    /// The CA both sides trust.
    pub ca: PathBuf,
    /// The operator's server certificate from `ca`: SAN DNS [`OPERATOR_SERVER_NAME`] and
    /// `localhost`, IP 127.0.0.1.
    pub operator: CertFiles,
    /// An agent's client certificate from `ca` (CN `kubesg-agent`): one for every node, as
    /// the chart's, so it proves no node.
    pub agent: CertFiles,
    /// A server certificate from `ca` that lacks [`OPERATOR_SERVER_NAME`] (it is for
    /// `kubesg-operator.elsewhere.svc`, `localhost` and 127.0.0.1).
    pub misnamed_operator: CertFiles,
    /// A second CA nobody trusts.
    pub other_ca: PathBuf,
    /// A server certificate from `other_ca` with the right names.
    pub other_operator: CertFiles,
    /// A client certificate from `other_ca`.
    pub other_agent: CertFiles,
}

impl TempPki {
    /// Generates all keys and certificates (ECDSA P-256) into a new temporary directory.
    pub fn generate() -> io::Result<TempPki> {
        let dir = tempfile::Builder::new().prefix("kubesg-pki-").tempdir()?;
        let path = dir.path().to_owned();

        let (ca_pem, ca) = new_ca("kubesg test CA")?;
        let (other_ca_pem, other_ca) = new_ca("unrelated test CA")?;
        let good_names = [OPERATOR_SERVER_NAME, "localhost"];
        let pki = TempPki {
            ca: write(&path, "ca.pem", &ca_pem)?,
            operator: leaf(&path, "operator", &ca, Leaf::Server(&good_names))?,
            agent: leaf(&path, "agent", &ca, Leaf::Client("kubesg-agent"))?,
            misnamed_operator: leaf(
                &path,
                "misnamed-operator",
                &ca,
                Leaf::Server(&["kubesg-operator.elsewhere.svc", "localhost"]),
            )?,
            other_ca: write(&path, "other-ca.pem", &other_ca_pem)?,
            other_operator: leaf(
                &path,
                "other-operator",
                &other_ca,
                Leaf::Server(&good_names),
            )?,
            other_agent: leaf(
                &path,
                "other-agent",
                &other_ca,
                Leaf::Client("kubesg-agent"),
            )?,
            dir,
            issuer: CaIssuer(ca),
        };
        Ok(pki)
    }

    /// The directory holding the files (tests may write variants of them there, e.g. to
    /// simulate rotation).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's TLS configuration: trusts `ca`, presents `agent`, expects
    /// [`OPERATOR_SERVER_NAME`].
    pub fn agent_tls(&self) -> ClientTlsFiles {
        ClientTlsFiles {
            ca: self.ca.clone(),
            cert: self.agent.cert.clone(),
            key: self.agent.key.clone(),
            server_name: OPERATOR_SERVER_NAME.to_owned(),
        }
    }

    /// The TLS configuration of `node`'s agent with a certificate of its own from `ca`
    /// (CN `system:node:<node>`, as the kubelet's), which proves that node to the operator.
    /// Each call issues a new certificate (files named for the node).
    pub fn agent_tls_for(&self, node: &str) -> io::Result<ClientTlsFiles> {
        let common_name = format!("system:node:{node}");
        let files = leaf(
            self.dir(),
            &format!("agent-{node}"),
            &self.issuer.0,
            Leaf::Client(&common_name),
        )?;
        Ok(ClientTlsFiles {
            cert: files.cert,
            key: files.key,
            ..self.agent_tls()
        })
    }

    /// The operator's TLS configuration: presents `server`, accepts clients of `ca` only.
    pub fn operator_tls(&self, server: &CertFiles) -> ServerTlsFiles {
        ServerTlsFiles {
            client_ca: self.ca.clone(),
            cert: server.cert.clone(),
            key: server.key.clone(),
        }
    }
}

/// The CA's signing half (rcgen's issuer has no `Debug`).
struct CaIssuer(Issuer<'static, KeyPair>);

impl std::fmt::Debug for CaIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaIssuer")
    }
}

enum Leaf<'a> {
    /// A server certificate for these DNS names (and 127.0.0.1).
    Server(&'a [&'a str]),
    /// A client certificate with this common name.
    Client(&'a str),
}

fn rcgen_error(e: rcgen::Error) -> io::Error {
    io::Error::other(format!("rcgen: {e}"))
}

fn write(dir: &Path, name: &str, contents: &str) -> io::Result<PathBuf> {
    let path = dir.join(name);
    fs::write(&path, contents)?;
    Ok(path)
}

fn new_ca(name: &str) -> io::Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = params.self_signed(&key).map_err(rcgen_error)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn leaf(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'static, KeyPair>,
    kind: Leaf<'_>,
) -> io::Result<CertFiles> {
    let mut params = match kind {
        Leaf::Server(names) => {
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .map_err(rcgen_error)?;
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            params.distinguished_name.push(DnType::CommonName, names[0]);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params
        }
        Leaf::Client(common_name) => {
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params
        }
    };
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = params.signed_by(&key, issuer).map_err(rcgen_error)?;
    Ok(CertFiles {
        cert: write(dir, &format!("{name}.pem"), &cert.pem())?,
        key: write(dir, &format!("{name}-key.pem"), &key.serialize_pem())?,
    })
}
