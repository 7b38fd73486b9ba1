//! Loading the operator link's TLS files: every missing or broken file is reported by its path,
//! so whoever mounted the Secret knows which file to fix. Not privileged.

use std::path::Path;

use kubesg_agent::tls::{load_ca_bundle, ClientTlsFiles, TlsFileError};
use kubesg_testkit::{certs::TempPki, operator::server_tls_config};

/// The error text of loading `files`, which must fail.
fn load_error(files: &ClientTlsFiles) -> String {
    files.load().expect_err("loading must fail").to_string()
}

fn write(pki: &TempPki, name: &str, contents: &str) -> std::path::PathBuf {
    let path = pki.dir().join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn assert_names(error: &str, path: &Path, what: &str) {
    assert!(
        error.contains(&path.display().to_string()) && error.contains(what),
        "expected the {what} file {} in {error:?}",
        path.display()
    );
}

#[test]
fn the_generated_files_load() {
    let pki = TempPki::generate().unwrap();
    pki.agent_tls().load().expect("the agent's files load");
    server_tls_config(&pki.operator_tls(&pki.operator)).expect("the operator's files load");
}

#[test]
fn missing_ca_bundle_is_named_in_the_error() {
    let pki = TempPki::generate().unwrap();
    let mut files = pki.agent_tls();
    files.ca = pki.dir().join("absent-ca.pem");
    let error = files.load().expect_err("loading must fail");
    assert!(matches!(error, TlsFileError::Read { .. }), "{error:?}");
    assert_names(&error.to_string(), &files.ca, "CA bundle");
}

#[test]
fn ca_bundle_without_any_certificate_is_named_in_the_error() {
    let pki = TempPki::generate().unwrap();
    let mut files = pki.agent_tls();
    files.ca = write(&pki, "ca.txt", "this is not a certificate\n");
    let error = load_error(&files);
    assert_names(&error, &files.ca, "CA bundle");
    assert!(error.contains("no PEM CERTIFICATE"), "{error}");
}

#[test]
fn ca_bundle_with_a_certificate_that_does_not_parse_is_named_in_the_error() {
    // Well-formed PEM around bytes that are no certificate: tonic alone would drop it silently
    // and trust nobody.
    let pki = TempPki::generate().unwrap();
    let mut files = pki.agent_tls();
    let good = std::fs::read_to_string(&pki.ca).unwrap();
    files.ca = write(
        &pki,
        "bad-ca.pem",
        &format!("{good}-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n"),
    );
    let error = load_error(&files);
    assert_names(&error, &files.ca, "CA bundle");
    assert!(error.contains("certificate #2"), "{error}");
}

#[test]
fn truncated_certificate_chain_is_named_in_the_error() {
    let pki = TempPki::generate().unwrap();
    let mut files = pki.agent_tls();
    let good = std::fs::read_to_string(&pki.agent.cert).unwrap();
    files.cert = write(&pki, "truncated.pem", &good[..good.len() / 2]);
    assert_names(&load_error(&files), &files.cert, "certificate chain");
}

#[test]
fn corrupt_private_key_is_named_in_the_error() {
    let pki = TempPki::generate().unwrap();
    let mut files = pki.agent_tls();
    files.key = write(
        &pki,
        "bad-key.pem",
        "-----BEGIN PRIVATE KEY-----\nAAAAAAAA\n-----END PRIVATE KEY-----\n",
    );
    assert_names(&load_error(&files), &files.key, "private key");
}

#[test]
fn private_key_of_another_certificate_is_named_with_that_certificate() {
    let pki = TempPki::generate().unwrap();
    let mut files = pki.agent_tls();
    files.key = pki.other_agent.key.clone();
    let error = files.load().expect_err("loading must fail");
    assert!(
        matches!(error, TlsFileError::KeyMismatch { .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert_names(&text, &files.key, "private key");
    assert_names(&text, &files.cert, "certificate");
}

#[test]
fn invalid_expected_server_name_is_refused() {
    let pki = TempPki::generate().unwrap();
    let mut files = pki.agent_tls();
    files.server_name = "not a name".into();
    let error = files.load().expect_err("loading must fail");
    assert!(
        matches!(error, TlsFileError::ServerName { .. }),
        "{error:?}"
    );
}

#[test]
fn operator_side_files_are_named_in_the_error_too() {
    let pki = TempPki::generate().unwrap();
    let mut files = pki.operator_tls(&pki.operator);
    files.client_ca = pki.dir().join("absent-agents-ca.pem");
    let error = server_tls_config(&files)
        .expect_err("loading must fail")
        .to_string();
    assert_names(&error, &files.client_ca, "CA bundle");
    // And the CA loader alone, as the operator will use it.
    assert!(load_ca_bundle(&pki.ca).is_ok());
}
