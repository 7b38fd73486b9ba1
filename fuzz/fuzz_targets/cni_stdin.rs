//! The CNI plugin's stdin on any bytes: the network config (`NetConf::parse`), the version an
//! error is printed in (`NetConf::declared_version`), then what ADD and CHECK read of it: the
//! `prevResult` (`CniResult::from_value`), converted to every version kubesg speaks and passed
//! on. Never a panic; every refusal is a `CniError` with the code the spec gives that kind of
//! fault; and a result the plugin passes on reads back as itself.

#![no_main]

use std::path::Path;

use kubesg_cni::{
    config::{CniVersion, NetConf},
    error::{CniError, ErrorCode},
    result::CniResult,
};
use libfuzzer_sys::fuzz_target;

/// The error object the plugin prints must be one a runtime can read.
fn printable(err: &CniError, version: CniVersion) {
    let json = err.to_json(version);
    assert_eq!(json["code"].as_u64(), Some(u64::from(err.code.code())));
    assert!(serde_json::to_vec(&json).is_ok());
}

fuzz_target!(|stdin: &[u8]| {
    let declared = NetConf::declared_version(stdin);
    let conf = match NetConf::parse(stdin) {
        Ok(conf) => conf,
        Err(err) => {
            // Not JSON: 6; a version kubesg does not speak: 1; anything else wrong: 7.
            assert!(
                matches!(
                    err.code,
                    ErrorCode::DecodingFailure
                        | ErrorCode::IncompatibleVersion
                        | ErrorCode::InvalidNetworkConfig
                ),
                "NetConf::parse: {err}"
            );
            printable(&err, declared.unwrap_or(CniVersion::LATEST));
            return;
        }
    };
    if let Some(declared) = declared {
        assert_eq!(
            declared, conf.cni_version,
            "the declared version is the one parsed"
        );
    }
    assert!(!conf.name.is_empty());
    assert!(!conf.agent_socket.as_os_str().is_empty());
    assert!(!conf.timeout.is_zero());

    let prev = match conf.prev_result() {
        Ok(prev) => prev,
        Err(err) => {
            assert!(
                matches!(
                    err.code,
                    ErrorCode::IncompatibleVersion | ErrorCode::InvalidNetworkConfig
                ),
                "prevResult: {err}"
            );
            printable(&err, conf.cni_version);
            return;
        }
    };
    let required = conf.require_prev_result();
    assert_eq!(required.is_ok(), prev.is_some());
    let Some(prev) = prev else {
        return;
    };
    assert!(
        prev.version().is_some(),
        "a parsed result knows its version"
    );

    // What ADD reads: the pod's interface (no such netns here, so only exact names match), its
    // addresses, the host-side interfaces.
    let netns = Path::new("/nonexistent/kubesg-fuzz/netns");
    if let Ok(index) = prev.pod_interface(netns, "eth0") {
        let _ = prev.pod_ips(index);
    }
    let _ = prev.pod_ips(0);
    let _ = prev.host_interfaces().count();

    // What ADD prints: the result in the config's version (and in every other), which the next
    // plugin of the chain reads as its prevResult.
    for to in CniVersion::SUPPORTED {
        let out = prev.clone().into_version(to);
        assert_eq!(out.version(), Some(to));
        let value = serde_json::to_value(&out).expect("a result serializes");
        let back = CniResult::from_value(value, to).expect("a result passed on reads back");
        assert_eq!(back, out, "a result passed on reads back as itself");
    }
});
