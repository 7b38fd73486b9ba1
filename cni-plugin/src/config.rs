//! The network configuration on stdin: the spec versions kubesg speaks, the plugin's own keys
//! (`agentSocket`, `timeoutSeconds`), the `prevResult` of the plugins before it in the chain and
//! the GC's `cni.dev/valid-attachments`. Keys kubesg does not know are ignored, as the spec allows
//! (the runtime adds `runtimeConfig`, `args`, `capabilities`, other plugins' keys…).

use std::{fmt, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::Value;

use crate::{
    error::{CniError, ErrorCode},
    result::CniResult,
};

/// Where the agent serves `CniBackend` unless the config says otherwise (DESIGN.md, "Names").
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/kubesg/agent.sock";

/// How long an agent call may take unless the config says otherwise: the agent may hold an ADD
/// until the pod's rules arrive (its own setting), so this is generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A CNI spec version kubesg speaks. 0.1.0 and 0.2.0 had another result shape (`ip4`/`ip6`)
/// and no chaining, so a chained plugin cannot serve them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.3.0: rich results (`interfaces`, `ips` with `version`), chaining.
    V0_3_0,
    /// 0.3.1: a typo fix of 0.3.0.
    V0_3_1,
    /// 0.4.0: CHECK, `prevResult` on DEL.
    V0_4_0,
    /// 1.0.0: `ips[].version` dropped.
    V1_0_0,
    /// 1.1.0: STATUS, GC.
    V1_1_0,
}

impl CniVersion {
    /// Every version kubesg speaks, oldest first (the VERSION command's `supportedVersions`).
    pub const SUPPORTED: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    /// The newest: what VERSION reports and errors carry when the config's version is unknown.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// Parses a version string; `None` when kubesg does not speak it.
    pub fn parse(s: &str) -> Option<CniVersion> {
        CniVersion::SUPPORTED.into_iter().find(|v| v.as_str() == s)
    }

    /// The version as the spec writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Whether results of this version carry `ips[].version` (every version before 1.0.0).
    pub fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// The code-1 error for a version kubesg does not speak.
    pub fn incompatible(found: &str) -> CniError {
        let supported: Vec<&str> = CniVersion::SUPPORTED.iter().map(|v| v.as_str()).collect();
        CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "cniVersion {found:?} is not supported; kubesg-cni supports {}",
                supported.join(", ")
            ),
        )
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `cni.dev/valid-attachments`: an attachment the runtime still has.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct GcAttachment {
    /// The container's id (`CNI_CONTAINERID` of its ADD).
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Its interface name (`CNI_IFNAME` of its ADD).
    pub ifname: String,
}

/// The plugin's config, parsed once per invocation. `prevResult` stays raw here and is parsed by
/// the commands that use it ([`NetConf::prev_result`]): DEL must not fail on a `prevResult` it
/// does not need.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// The version the runtime speaks; the result is printed in it.
    pub cni_version: CniVersion,
    /// The network's name.
    pub name: String,
    /// The agent's unix socket (`agentSocket`).
    pub agent_socket: PathBuf,
    /// The deadline of each agent call, connection included (`timeoutSeconds`).
    pub timeout: Duration,
    /// The result of the plugins before this one, as given.
    pub raw_prev_result: Option<Value>,
    /// GC only: the attachments the runtime still has (`cni.dev/valid-attachments`; libcni also
    /// sends it as `cni.dev/attachments`, the name an earlier draft of the spec used). `None`
    /// when absent, which GC treats as "nothing known to be stale".
    pub valid_attachments: Option<Vec<GcAttachment>>,
}

/// The keys kubesg reads; everything else is ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<GcAttachment>>,
    #[serde(default, rename = "cni.dev/attachments")]
    attachments: Option<Vec<GcAttachment>>,
}

impl NetConf {
    /// Parses stdin: not JSON is code 6; a `cniVersion` kubesg does not speak (or none, which
    /// means 0.1.0 as in libcni) is code 1; a known key with the wrong type or value, or a
    /// missing or malformed network name, is code 7.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::DecodingFailure,
                format!("network config is not JSON: {e}"),
            )
        })?;
        let Value::Object(map) = &value else {
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "network config is not a JSON object",
            ));
        };
        let cni_version = match map.get("cniVersion") {
            None => return Err(CniVersion::incompatible("0.1.0 (no cniVersion given)")),
            Some(Value::String(s)) => {
                CniVersion::parse(s).ok_or_else(|| CniVersion::incompatible(s))?
            }
            Some(other) => {
                return Err(CniError::new(
                    ErrorCode::InvalidNetworkConfig,
                    format!("cniVersion must be a string, not {other}"),
                ))
            }
        };
        let raw: RawNetConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("network config: {e}"),
            )
        })?;
        let name = raw.name.unwrap_or_default();
        validate_network_name(&name)?;
        let agent_socket = raw
            .agent_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
        if agent_socket.as_os_str().is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "agentSocket must not be empty",
            ));
        }
        let timeout = match raw.timeout_seconds {
            None => DEFAULT_TIMEOUT,
            Some(0) => {
                return Err(CniError::new(
                    ErrorCode::InvalidNetworkConfig,
                    "timeoutSeconds must be at least 1",
                ))
            }
            Some(s) => Duration::from_secs(s),
        };
        Ok(NetConf {
            cni_version,
            name,
            agent_socket,
            timeout,
            raw_prev_result: raw.prev_result.filter(|v| !v.is_null()),
            valid_attachments: raw.valid_attachments.or(raw.attachments),
        })
    }

    /// The `cniVersion` the stdin declares, when it is JSON and kubesg speaks it: the version an
    /// error is printed in even when the rest of the config is wrong.
    pub fn declared_version(stdin: &[u8]) -> Option<CniVersion> {
        #[derive(Deserialize)]
        struct Declared {
            #[serde(rename = "cniVersion")]
            cni_version: String,
        }
        let declared: Declared = serde_json::from_slice(stdin).ok()?;
        CniVersion::parse(&declared.cni_version)
    }

    /// Parses `prevResult` (once: call it once per command). Its own `cniVersion` says how to
    /// read it; without one it is read in the config's version, as libcni does.
    pub fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        self.raw_prev_result
            .as_ref()
            .map(|raw| CniResult::from_value(raw.clone(), self.cni_version))
            .transpose()
    }

    /// `prevResult` for the commands that cannot work without it (ADD and CHECK of a chained
    /// plugin): missing is code 7.
    pub fn require_prev_result(&self) -> Result<CniResult, CniError> {
        self.prev_result()?.ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "prevResult is required: kubesg-cni is a chained plugin and must run after the \
                 plugin that creates the pod's interface (bridge, ptp, …)",
            )
        })
    }
}

/// As libcni's `ValidateNetworkName`: non-empty, an alphanumeric first character, then
/// alphanumerics, `_`, `.` or `-`.
fn validate_network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            "missing network name",
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !(first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!("invalid characters in network name {name:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn conf(value: Value) -> Result<NetConf, CniError> {
        NetConf::parse(value.to_string().as_bytes())
    }

    #[test]
    fn every_supported_version_parses_with_defaults() {
        for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
            let c = conf(json!({"cniVersion": v, "name": "kubenet", "type": "kubesg-cni"}))
                .unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(c.cni_version.as_str(), v);
            assert_eq!(c.name, "kubenet");
            assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
            assert_eq!(c.timeout, DEFAULT_TIMEOUT);
            assert_eq!(c.raw_prev_result, None);
            assert_eq!(c.valid_attachments, None);
        }
    }

    #[test]
    fn plugin_keys_are_read_and_unknown_keys_ignored() {
        let c = conf(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "kubesg-cni",
            "agentSocket": "/tmp/agent.sock", "timeoutSeconds": 5,
            "runtimeConfig": {"portMappings": []}, "args": {"cni": {}}, "somethingElse": [1, 2],
        }))
        .expect("valid");
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/agent.sock"));
        assert_eq!(c.timeout, Duration::from_secs(5));
    }

    #[test]
    fn unsupported_versions_are_code_1() {
        for v in ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "banana"] {
            let err = conf(json!({"cniVersion": v, "name": "n"})).expect_err(v);
            assert_eq!(err.code, ErrorCode::IncompatibleVersion, "{v}");
            assert!(err.details.contains(v), "{}", err.details);
        }
    }

    #[test]
    fn missing_version_means_0_1_0_which_is_code_1() {
        let err = conf(json!({"name": "n"})).expect_err("no version");
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
    }

    #[test]
    fn malformed_json_is_code_6() {
        for bad in ["", "{", "{\"cniVersion\": \"1.0.0\",}", "not json"] {
            let err = NetConf::parse(bad.as_bytes()).expect_err(bad);
            assert_eq!(err.code, ErrorCode::DecodingFailure, "{bad:?}");
        }
    }

    #[test]
    fn wrong_types_or_values_of_known_keys_are_code_7() {
        for bad in [
            json!([1, 2]),
            json!({"cniVersion": 1, "name": "n"}),
            json!({"cniVersion": "1.0.0", "name": "n", "timeoutSeconds": "soon"}),
            json!({"cniVersion": "1.0.0", "name": "n", "timeoutSeconds": 0}),
            json!({"cniVersion": "1.0.0", "name": "n", "agentSocket": ""}),
            json!({"cniVersion": "1.0.0", "name": "n", "cni.dev/valid-attachments": {}}),
            json!({"cniVersion": "1.0.0"}),
            json!({"cniVersion": "1.0.0", "name": "bad name"}),
        ] {
            let err = conf(bad.clone()).expect_err(&bad.to_string());
            assert_eq!(err.code, ErrorCode::InvalidNetworkConfig, "{bad}");
        }
    }

    #[test]
    fn missing_prev_result_is_code_7_when_required() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "n"})).expect("valid");
        assert_eq!(c.prev_result().expect("absent is fine"), None);
        let err = c.require_prev_result().expect_err("required");
        assert_eq!(err.code, ErrorCode::InvalidNetworkConfig);
        assert!(err.details.contains("prevResult"));
    }

    #[test]
    fn null_prev_result_counts_as_missing() {
        let c =
            conf(json!({"cniVersion": "1.0.0", "name": "n", "prevResult": null})).expect("valid");
        assert_eq!(c.raw_prev_result, None);
    }

    #[test]
    fn prev_result_that_is_not_a_result_is_code_7() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "n", "prevResult": "nope"}))
            .expect("the config itself is valid");
        let err = c.require_prev_result().expect_err("not a result");
        assert_eq!(err.code, ErrorCode::InvalidNetworkConfig);
    }

    #[test]
    fn gc_valid_attachments_are_parsed() {
        let c = conf(json!({
            "cniVersion": "1.1.0", "name": "n",
            "cni.dev/valid-attachments": [
                {"containerID": "a1", "ifname": "eth0"},
                {"containerID": "b2", "ifname": "net1", "extra": true},
            ],
        }))
        .expect("valid");
        assert_eq!(
            c.valid_attachments,
            Some(vec![
                GcAttachment {
                    container_id: "a1".into(),
                    ifname: "eth0".into()
                },
                GcAttachment {
                    container_id: "b2".into(),
                    ifname: "net1".into()
                },
            ])
        );
    }

    #[test]
    fn gc_attachments_under_the_older_key_are_read_too() {
        let c = conf(json!({
            "cniVersion": "1.1.0", "name": "n",
            "cni.dev/attachments": [{"containerID": "a1", "ifname": "eth0"}],
        }))
        .expect("valid");
        assert_eq!(c.valid_attachments.map(|v| v.len()), Some(1));
    }

    #[test]
    fn gc_empty_list_is_not_the_same_as_no_list() {
        let c = conf(json!({"cniVersion": "1.1.0", "name": "n", "cni.dev/valid-attachments": []}))
            .expect("valid");
        assert_eq!(c.valid_attachments, Some(vec![]));
    }

    #[test]
    fn declared_version_is_read_even_from_an_invalid_config() {
        let stdin = br#"{"cniVersion": "0.4.0", "timeoutSeconds": "x"}"#;
        assert_eq!(NetConf::declared_version(stdin), Some(CniVersion::V0_4_0));
        assert_eq!(NetConf::declared_version(b"{"), None);
        assert_eq!(NetConf::declared_version(br#"{"cniVersion": "9"}"#), None);
    }
}
