//! CNI errors: the well-known codes of the CNI spec (1.1.0, "Error codes"), kubesg's own codes
//! (≥ 100, which the spec leaves to plugins), and the one place where what went wrong with the
//! agent or the kernel becomes a code the runtime acts on.
//!
//! | what happened | ADD | CHECK | DEL | GC | STATUS |
//! | --- | --- | --- | --- | --- | --- |
//! | agent socket missing | 11 | 11 | success, logged | success, logged | 50 |
//! | socket there, connection refused; timeout; `Unavailable`, `DeadlineExceeded`, `ResourceExhausted`, `Aborted`, `Cancelled` | 11 | 11 | 11 | 11 | 50 |
//! | `InvalidArgument`, `FailedPrecondition`, `OutOfRange` | 7 | 7 | 7 | 7 | 50 |
//! | `NotFound` | 3 | 100 | success | success (that one) | 50 |
//! | any other gRPC code (`Internal`, `PermissionDenied`, `Unimplemented`, …) | 5 | 5 | 5 | 5 | 50 |
//! | agent answers CHECK: unknown / not attached | | 100 / 101 | | | |
//! | agent answers STATUS: not ready | | | | | 50 |
//!
//! The agent's own message always goes into `details`. 11 ("try again later") is what the runtime
//! retries: the agent restarting is a transient state. 51 is never returned: while the agent is
//! away the pinned programs keep enforcing the last rules (fail static), so existing pods keep
//! their connectivity.

use serde_json::{json, Value};

use crate::{agent::AgentError, config::CniVersion, env::Command, veth::DiscoveryError};

/// The codes a runtime may see, so that every error the plugin prints carries one the spec
/// defines (or one of ours, ≥ 100) rather than a catch-all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: the config's `cniVersion` is not one this plugin speaks (or not one the command allows).
    IncompatibleVersion,
    /// 2: a field of the config the plugin cannot honour (kubesg ignores unknown keys, as the spec
    /// allows, so it never sends this; listed for completeness).
    UnsupportedField,
    /// 3: the container (its netns or its interface) does not exist; the runtime need not clean up.
    ContainerUnknown,
    /// 4: a required `CNI_*` environment variable is missing or malformed.
    InvalidEnvironment,
    /// 5: an I/O failure (stdin, netlink, an agent error that is not the caller's fault).
    IoFailure,
    /// 6: stdin is not JSON.
    DecodingFailure,
    /// 7: the JSON is valid but the config (or its `prevResult`) is not usable.
    InvalidNetworkConfig,
    /// 11: transient: the agent is not reachable now; the runtime should retry.
    TryAgainLater,
    /// 50 (STATUS): the plugin cannot serve ADDs.
    PluginNotAvailable,
    /// 51 (STATUS): not available and existing pods may have limited connectivity (unused: the
    /// datapath fails static).
    PluginNotAvailableLimitedConnectivity,
    /// 100 (CHECK): the agent does not know the endpoint.
    EndpointNotRegistered,
    /// 101 (CHECK): the agent knows the endpoint but its programs are not attached.
    ProgramsNotAttached,
}

impl ErrorCode {
    /// The number printed in the error JSON's `code`.
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::ContainerUnknown => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::IoFailure => 5,
            ErrorCode::DecodingFailure => 6,
            ErrorCode::InvalidNetworkConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::PluginNotAvailable => 50,
            ErrorCode::PluginNotAvailableLimitedConnectivity => 51,
            ErrorCode::EndpointNotRegistered => 100,
            ErrorCode::ProgramsNotAttached => 101,
        }
    }

    /// The short message (`msg`), the spec's wording for well-known codes.
    pub fn msg(self) -> &'static str {
        match self {
            ErrorCode::IncompatibleVersion => "incompatible CNI version",
            ErrorCode::UnsupportedField => "unsupported field in network configuration",
            ErrorCode::ContainerUnknown => "container unknown or does not exist",
            ErrorCode::InvalidEnvironment => "invalid necessary environment variables",
            ErrorCode::IoFailure => "I/O failure",
            ErrorCode::DecodingFailure => "failed to decode content",
            ErrorCode::InvalidNetworkConfig => "invalid network config",
            ErrorCode::TryAgainLater => "try again later",
            ErrorCode::PluginNotAvailable => "the plugin is not available",
            ErrorCode::PluginNotAvailableLimitedConnectivity => {
                "the plugin is not available, and existing containers in the network may have \
                 limited connectivity"
            }
            ErrorCode::EndpointNotRegistered => "endpoint not registered with kubesg-agent",
            ErrorCode::ProgramsNotAttached => "endpoint programs not attached",
        }
    }
}

/// A typed CNI error, as the plugins in containernetworking/plugins return them: a code the
/// runtime acts on, a short message and the specifics in `details`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} (code {}): {details}", code.msg(), code.code())]
pub struct CniError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// The specifics: what was wrong, with names and paths.
    pub details: String,
}

impl CniError {
    /// An error with `code` and `details`.
    pub fn new(code: ErrorCode, details: impl Into<String>) -> Self {
        CniError {
            code,
            details: details.into(),
        }
    }

    /// The error object printed on stdout: `{"cniVersion", "code", "msg", "details"}`.
    pub fn to_json(&self, version: CniVersion) -> Value {
        json!({
            "cniVersion": version.as_str(),
            "code": self.code.code(),
            "msg": self.code.msg(),
            "details": self.details,
        })
    }

    /// What an agent failure means to the runtime for `command` (the table at the top of this
    /// module). DEL and GC treat "socket missing" and `NotFound` as success before calling this.
    pub fn from_agent(err: &AgentError, command: Command) -> Self {
        let details = err.to_string();
        if command == Command::Status {
            return CniError::new(ErrorCode::PluginNotAvailable, details);
        }
        let code = match err {
            AgentError::SocketMissing(_)
            | AgentError::Unreachable { .. }
            | AgentError::Timeout(_) => ErrorCode::TryAgainLater,
            AgentError::Runtime(_) => ErrorCode::IoFailure,
            AgentError::Rpc(status) => match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
                | tonic::Code::Cancelled => ErrorCode::TryAgainLater,
                tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::OutOfRange => ErrorCode::InvalidNetworkConfig,
                tonic::Code::NotFound if command == Command::Check => {
                    ErrorCode::EndpointNotRegistered
                }
                tonic::Code::NotFound => ErrorCode::ContainerUnknown,
                _ => ErrorCode::IoFailure,
            },
        };
        CniError::new(code, details)
    }
}

/// Host-side interface discovery failures: a missing netns or interface is a container that is
/// gone (3); an interface that is not a veth, or a veth whose peer is elsewhere, is a chain kubesg
/// cannot work with (7); netlink failing is I/O (5).
impl From<DiscoveryError> for CniError {
    fn from(err: DiscoveryError) -> Self {
        let code = match &err {
            DiscoveryError::Netns { .. } | DiscoveryError::PodInterfaceMissing { .. } => {
                ErrorCode::ContainerUnknown
            }
            DiscoveryError::NotVeth { .. } | DiscoveryError::PeerNotHere { .. } => {
                ErrorCode::InvalidNetworkConfig
            }
            DiscoveryError::Netlink { .. } => ErrorCode::IoFailure,
        };
        CniError::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;

    #[test]
    fn error_json_has_version_code_msg_and_details() {
        let err = CniError::new(ErrorCode::InvalidNetworkConfig, "prevResult is required");
        let json = err.to_json(CniVersion::V1_0_0);
        assert_eq!(
            json,
            json!({
                "cniVersion": "1.0.0",
                "code": 7,
                "msg": "invalid network config",
                "details": "prevResult is required",
            })
        );
    }

    #[test]
    fn well_known_codes_have_the_numbers_of_the_spec() {
        let codes = [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::UnsupportedField, 2),
            (ErrorCode::ContainerUnknown, 3),
            (ErrorCode::InvalidEnvironment, 4),
            (ErrorCode::IoFailure, 5),
            (ErrorCode::DecodingFailure, 6),
            (ErrorCode::InvalidNetworkConfig, 7),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::PluginNotAvailable, 50),
            (ErrorCode::PluginNotAvailableLimitedConnectivity, 51),
        ];
        for (code, n) in codes {
            assert_eq!(code.code(), n, "{code:?}");
        }
        assert!(ErrorCode::EndpointNotRegistered.code() >= 100);
        assert!(ErrorCode::ProgramsNotAttached.code() >= 100);
    }

    #[test]
    fn unreachable_agent_is_try_again_later_except_for_status() {
        let missing = AgentError::SocketMissing(PathBuf::from("/nonexistent.sock"));
        let timeout = AgentError::Timeout(Duration::from_secs(1));
        for err in [&missing, &timeout] {
            for cmd in [Command::Add, Command::Check, Command::Del, Command::Gc] {
                assert_eq!(
                    CniError::from_agent(err, cmd).code,
                    ErrorCode::TryAgainLater
                );
            }
            assert_eq!(
                CniError::from_agent(err, Command::Status).code,
                ErrorCode::PluginNotAvailable
            );
        }
    }

    #[test]
    fn grpc_codes_map_to_cni_codes_with_the_agent_message_in_details() {
        let cases = [
            (
                tonic::Code::Unavailable,
                Command::Add,
                ErrorCode::TryAgainLater,
            ),
            (
                tonic::Code::FailedPrecondition,
                Command::Add,
                ErrorCode::InvalidNetworkConfig,
            ),
            (
                tonic::Code::InvalidArgument,
                Command::Add,
                ErrorCode::InvalidNetworkConfig,
            ),
            (
                tonic::Code::NotFound,
                Command::Add,
                ErrorCode::ContainerUnknown,
            ),
            (
                tonic::Code::NotFound,
                Command::Check,
                ErrorCode::EndpointNotRegistered,
            ),
            (tonic::Code::Internal, Command::Add, ErrorCode::IoFailure),
            (
                tonic::Code::Internal,
                Command::Status,
                ErrorCode::PluginNotAvailable,
            ),
        ];
        for (grpc, cmd, want) in cases {
            let err = AgentError::Rpc(Box::new(tonic::Status::new(grpc, "agent says no")));
            let cni = CniError::from_agent(&err, cmd);
            assert_eq!(cni.code, want, "{grpc:?} on {cmd:?}");
            assert!(cni.details.contains("agent says no"), "{}", cni.details);
        }
    }
}
