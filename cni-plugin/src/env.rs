//! The `CNI_*` environment variables: which command, which attachment, the pod's identity in
//! `CNI_ARGS`. Validated before stdin is read, as libcni's `skel` does, so a runtime that forgets
//! a variable gets code 4 whatever it sent on stdin.

use std::{collections::BTreeMap, path::PathBuf};

use kubesg_proto::v1alpha1::PodRef;

use crate::error::{CniError, ErrorCode};

/// The longest interface name Linux accepts (`IFNAMSIZ` - 1).
const MAX_IFNAME_LEN: usize = 15;

/// The operation the runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Register the pod's interface with the agent, pass `prevResult` on.
    Add,
    /// Forget the pod's interface; never fails for what is already gone.
    Del,
    /// Ask the agent whether the pod is still enforced.
    Check,
    /// Ask the agent whether it can serve ADDs.
    Status,
    /// Delete the agent's endpoints the runtime no longer knows.
    Gc,
    /// Report the spec versions this plugin speaks.
    Version,
}

impl Command {
    /// Parses `CNI_COMMAND`.
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    /// Whether the command is about one attachment and so needs `CNI_CONTAINERID` and
    /// `CNI_IFNAME`.
    fn is_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }

    /// Whether the command needs `CNI_NETNS` (DEL does not: the netns may be gone already).
    fn needs_netns(self) -> bool {
        matches!(self, Command::Add | Command::Check)
    }
}

/// One attachment of a container to the network: the key the agent stores endpoints under, and
/// the netns the interface lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`: the interface's name inside the pod.
    pub ifname: String,
    /// `CNI_NETNS`: always present for ADD and CHECK, optional for DEL.
    pub netns: Option<PathBuf>,
}

/// The validated environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// The attachment, for ADD, DEL and CHECK.
    pub attachment: Option<Attachment>,
    /// `CNI_ARGS`, raw (parsed by the commands that need it: only ADD does).
    pub args: String,
}

impl CniEnv {
    /// Reads the process environment.
    pub fn from_process() -> Result<Self, CniError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads and validates the variables through `get`, so tests need not touch the process
    /// environment. An empty variable counts as missing, as in libcni.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let command_name = var("CNI_COMMAND").ok_or_else(|| missing(&["CNI_COMMAND"]))?;
        let command = Command::parse(&command_name).ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("unknown CNI_COMMAND {command_name:?}"),
            )
        })?;
        let container_id = var("CNI_CONTAINERID");
        let ifname = var("CNI_IFNAME");
        let netns = var("CNI_NETNS");
        let mut absent = Vec::new();
        if command.is_attachment() {
            if container_id.is_none() {
                absent.push("CNI_CONTAINERID");
            }
            if command.needs_netns() && netns.is_none() {
                absent.push("CNI_NETNS");
            }
            if ifname.is_none() {
                absent.push("CNI_IFNAME");
            }
        }
        if !absent.is_empty() {
            return Err(missing(&absent));
        }
        let attachment = match (command.is_attachment(), container_id, ifname) {
            (true, Some(container_id), Some(ifname)) => {
                validate_container_id(&container_id)?;
                validate_ifname(&ifname)?;
                Some(Attachment {
                    container_id,
                    ifname,
                    netns: netns.map(PathBuf::from),
                })
            }
            _ => None,
        };
        Ok(CniEnv {
            command,
            attachment,
            args: get("CNI_ARGS").unwrap_or_default(),
        })
    }

    /// The attachment, for the commands that have one (checked when the environment was read).
    pub fn attachment(&self) -> Result<&Attachment, CniError> {
        self.attachment
            .as_ref()
            .ok_or_else(|| missing(&["CNI_CONTAINERID", "CNI_IFNAME"]))
    }
}

/// The code-4 error naming the missing variables.
fn missing(names: &[&str]) -> CniError {
    CniError::new(
        ErrorCode::InvalidEnvironment,
        format!("required env variables [{}] missing", names.join(",")),
    )
}

/// As libcni's `ValidateContainerID`: an alphanumeric first character, then alphanumerics,
/// `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("invalid characters in CNI_CONTAINERID {id:?}"),
        ))
    }
}

/// As the spec says of the interface name: at most 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.len() > MAX_IFNAME_LEN
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("invalid interface name in CNI_IFNAME {name:?}"),
        ));
    }
    Ok(())
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`. kubelet passes the pod's identity there
/// (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`), which the agent matches the operator's
/// rules against. Unknown keys are ignored (as if `IgnoreUnknown=1` were always set): other
/// plugins of the chain get the same variable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pairs: BTreeMap<String, String>,
}

impl CniArgs {
    /// Parses `CNI_ARGS`; a segment without `=` is code 4.
    pub fn parse(raw: &str) -> Result<Self, CniError> {
        let mut pairs = BTreeMap::new();
        for pair in raw.split(';').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS: invalid pair {pair:?} (want KEY=VALUE)"),
                ));
            };
            pairs.insert(key.to_owned(), value.to_owned());
        }
        Ok(CniArgs { pairs })
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.get(key).map(String::as_str)
    }

    /// The pod this attachment belongs to, when the runtime named it (kubelet always does; a
    /// bare runtime may not, and ADD then fails with code 4: the agent enforces pods by name).
    pub fn pod(&self) -> Option<PodRef> {
        let namespace = self.get("K8S_POD_NAMESPACE").unwrap_or_default();
        let name = self.get("K8S_POD_NAME").unwrap_or_default();
        if namespace.is_empty() && name.is_empty() {
            return None;
        }
        Some(PodRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: self.get("K8S_POD_UID").unwrap_or_default().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|name| map.get(name).cloned())
    }

    const FULL: [(&str, &str); 4] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
    ];

    fn without(cmd: &str, drop: &str) -> Vec<(&'static str, String)> {
        FULL.iter()
            .filter(|(k, _)| *k != drop)
            .map(|(k, v)| {
                (
                    *k,
                    if *k == "CNI_COMMAND" {
                        cmd.to_owned()
                    } else {
                        v.to_string()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn full_add_environment_gives_the_attachment() {
        let env = env_of(&FULL).expect("valid");
        assert_eq!(env.command, Command::Add);
        assert_eq!(
            env.attachment,
            Some(Attachment {
                container_id: "c0ffee".into(),
                ifname: "eth0".into(),
                netns: Some(PathBuf::from("/run/netns/pod")),
            })
        );
    }

    #[test]
    fn each_required_variable_missing_is_code_4_naming_it() {
        let required: &[(&str, &[&str])] = &[
            (
                "ADD",
                &["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            ),
            (
                "CHECK",
                &["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            ),
            ("DEL", &["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME"]),
            ("STATUS", &["CNI_COMMAND"]),
            ("GC", &["CNI_COMMAND"]),
            ("VERSION", &["CNI_COMMAND"]),
        ];
        for (cmd, vars) in required {
            for var in *vars {
                let vars = without(cmd, var);
                let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let err = env_of(&pairs).expect_err(&format!("{cmd} without {var}"));
                assert_eq!(
                    err.code,
                    ErrorCode::InvalidEnvironment,
                    "{cmd} without {var}"
                );
                assert!(
                    err.details.contains(var),
                    "{cmd} without {var}: {}",
                    err.details
                );
            }
        }
    }

    #[test]
    fn del_without_netns_is_fine() {
        let vars = without("DEL", "CNI_NETNS");
        let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let env = env_of(&pairs).expect("DEL needs no netns");
        assert_eq!(env.attachment.expect("attachment").netns, None);
    }

    #[test]
    fn status_gc_and_version_need_only_the_command() {
        for (cmd, want) in [
            ("STATUS", Command::Status),
            ("GC", Command::Gc),
            ("VERSION", Command::Version),
        ] {
            let env = env_of(&[("CNI_COMMAND", cmd)]).expect(cmd);
            assert_eq!(env.command, want);
            assert_eq!(env.attachment, None);
        }
    }

    #[test]
    fn empty_variable_counts_as_missing() {
        let mut vars = FULL.to_vec();
        vars[2] = ("CNI_NETNS", "");
        let err = env_of(&vars).expect_err("empty netns");
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.details.contains("CNI_NETNS"));
    }

    #[test]
    fn unknown_command_is_code_4() {
        let err = env_of(&[("CNI_COMMAND", "FROB")]).expect_err("unknown");
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.details.contains("FROB"));
    }

    #[test]
    fn malformed_container_id_or_ifname_is_code_4() {
        for (var, value) in [
            ("CNI_CONTAINERID", "-leading-dash"),
            ("CNI_CONTAINERID", "has space"),
            ("CNI_IFNAME", "averyveryverylongname"),
            ("CNI_IFNAME", "et/h0"),
            ("CNI_IFNAME", ".."),
        ] {
            let mut vars = FULL.to_vec();
            for v in vars.iter_mut().filter(|(k, _)| *k == var) {
                v.1 = value;
            }
            let err = env_of(&vars).expect_err(value);
            assert_eq!(err.code, ErrorCode::InvalidEnvironment, "{var}={value}");
        }
    }

    #[test]
    fn cni_args_give_the_pod_and_ignore_unknown_keys() {
        let args =
            CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID=u")
                .expect("valid");
        assert_eq!(args.get("IgnoreUnknown"), Some("1"));
        assert_eq!(
            args.pod(),
            Some(PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
            })
        );
    }

    #[test]
    fn cni_args_without_pod_keys_name_no_pod() {
        assert_eq!(CniArgs::parse("").expect("empty").pod(), None);
        assert_eq!(CniArgs::parse("FOO=bar;").expect("one").pod(), None);
    }

    #[test]
    fn cni_args_value_may_contain_equals_sign() {
        let args = CniArgs::parse("K8S_POD_NAME=a=b").expect("valid");
        assert_eq!(args.get("K8S_POD_NAME"), Some("a=b"));
    }

    #[test]
    fn cni_args_pair_without_equals_is_code_4() {
        let err = CniArgs::parse("K8S_POD_NAME=p;garbage").expect_err("bad pair");
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert!(err.details.contains("garbage"));
    }
}
