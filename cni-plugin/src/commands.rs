//! The CNI commands, as containernetworking/plugins write them: one function per command over
//! the parsed environment and config, and [`run`], which turns an invocation into what the
//! plugin prints and its exit status.

use std::{collections::BTreeSet, io::Read};

use ipnet::{IpNet, Ipv6Net};
use kubesg_proto::{
    pending_deletes,
    v1alpha1::{Endpoint, EndpointKey, EnforcementState},
};
use serde_json::Value;

use crate::{
    agent::{AgentClient, AgentError},
    config::{CniVersion, GcAttachment, NetConf},
    env::{CniArgs, CniEnv, Command},
    error::{CniError, ErrorCode},
    result::version_info,
    veth,
};

/// What one invocation produced: stdout carries exactly this, stderr only logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The JSON to print (ADD's result, VERSION's answer, or the error), if any.
    pub stdout: Option<Value>,
    /// The process's exit status: 0 on success, 1 with an error object on stdout.
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: Option<Value>) -> Self {
        Outcome {
            stdout,
            exit_code: 0,
        }
    }

    fn failed(err: &CniError, version: CniVersion) -> Self {
        tracing::error!(code = err.code.code(), "{err}");
        Outcome {
            stdout: Some(err.to_json(version)),
            exit_code: 1,
        }
    }
}

/// The most stdin may hold. A configuration with a previous result is a few KiB, and GC's list
/// of valid attachments about 150 bytes an attachment: 1 MiB is room for several thousand, far
/// past a node's pods, while a runaway writer cannot make the plugin hold more.
pub const MAX_STDIN: u64 = 1 << 20;

/// Runs one invocation: validates the environment (before reading stdin, as libcni's `skel`),
/// reads and parses the config, dispatches. Errors are printed in the config's version when it
/// declared one kubesg speaks, in the latest otherwise.
pub fn run(get_env: impl Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Outcome {
    let env = match CniEnv::from_lookup(get_env) {
        Ok(env) => env,
        Err(err) => return Outcome::failed(&err, CniVersion::LATEST),
    };
    if env.command == Command::Version {
        return Outcome::ok(Some(version_info()));
    }
    let mut input = Vec::new();
    if let Err(e) = stdin.take(MAX_STDIN + 1).read_to_end(&mut input) {
        let err = CniError::new(ErrorCode::IoFailure, format!("reading stdin: {e}"));
        return Outcome::failed(&err, CniVersion::LATEST);
    }
    if input.len() as u64 > MAX_STDIN {
        let err = CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!("the network configuration on stdin is larger than {MAX_STDIN} bytes"),
        );
        return Outcome::failed(&err, CniVersion::LATEST);
    }
    let version = NetConf::declared_version(&input).unwrap_or(CniVersion::LATEST);
    let conf = match NetConf::parse(&input) {
        Ok(conf) => conf,
        Err(err) => return Outcome::failed(&err, version),
    };
    let result = match env.command {
        Command::Add => cmd_add(&env, &conf).map(Some),
        Command::Del => cmd_del(&env, &conf).map(|()| None),
        Command::Check => cmd_check(&env, &conf).map(|()| None),
        Command::Status => cmd_status(&conf).map(|()| None),
        Command::Gc => cmd_gc(&conf).map(|()| None),
        Command::Version => Ok(Some(version_info())),
    };
    match result {
        Ok(stdout) => Outcome::ok(stdout),
        Err(err) => Outcome::failed(&err, conf.cni_version),
    }
}

/// ADD: finds the pod's interface and IPs in `prevResult` and the host end of its veth in the
/// kernel, registers the endpoint with the agent (which attaches the programs before it answers)
/// and passes `prevResult` on, in the config's version.
///
/// The agent is dialled before the netns is looked at: when it is down, "try again later" (11)
/// is the useful answer, whatever the pod looks like.
pub fn cmd_add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let attachment = env.attachment()?;
    let netns = attachment
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(ErrorCode::InvalidEnvironment, "CNI_NETNS missing"))?;
    let pod = CniArgs::parse(&env.args)?.pod();
    let prev = conf.require_prev_result()?;
    let pod_index = prev.pod_interface(netns, &attachment.ifname)?;
    let ips = prev.pod_ips(pod_index);
    if ips.is_empty() {
        return Err(CniError::new(
            ErrorCode::InvalidNetworkConfig,
            format!(
                "prevResult assigns no IP to {}: kubesg-cni must run after the plugin that \
                 assigns the pod's addresses",
                attachment.ifname
            ),
        ));
    }
    let mut agent = AgentClient::connect(&conf.agent_socket, conf.timeout)
        .map_err(|e| CniError::from_agent(&e, Command::Add))?;
    // The agent enforces pods by namespace and name (the operator's rules name them) and
    // refuses an endpoint without them: say which variables are missing.
    let pod = match pod {
        Some(pod) if !pod.namespace.is_empty() && !pod.name.is_empty() => pod,
        _ => {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                "required CNI_ARGS [K8S_POD_NAMESPACE,K8S_POD_NAME] missing: kubesg-agent \
                 enforces pods by namespace and name",
            ))
        }
    };
    let (host, source) = veth::discover_host_veth(&prev, netns, &attachment.ifname)?;
    // The pod's link-local addresses (never in prevResult) go with its addresses: the agent's
    // source check then refuses on-link messages from any other link-local address. Without
    // them the pod is still registered, and judged as by an older plugin.
    let mut ips = ips;
    match crate::link_local::addresses(netns, &attachment.ifname) {
        Ok(found) => {
            for addr in found {
                if !ips.iter().any(|n| n.addr() == addr) {
                    ips.push(IpNet::V6(Ipv6Net::new_assert(addr, 64)));
                }
            }
        }
        Err(e) => tracing::warn!(
            error = %e,
            "cannot read the pod's link-local addresses: any link-local source passes its \
             source check"
        ),
    }
    tracing::info!(
        container = %attachment.container_id,
        ifname = %attachment.ifname,
        host_ifname = %host.name,
        host_ifindex = host.ifindex,
        found_by = ?source,
        ips = ?ips,
        "registering endpoint"
    );
    let endpoint = Endpoint {
        key: Some(key_of(&attachment.container_id, &attachment.ifname)),
        netns: netns.display().to_string(),
        host_ifname: host.name,
        host_ifindex: host.ifindex,
        ips: ips.iter().map(ToString::to_string).collect(),
        pod: Some(pod),
    };
    let answer = agent
        .add_endpoint(endpoint)
        .map_err(|e| CniError::from_agent(&e, Command::Add))?;
    tracing::info!(
        state = ?EnforcementState::try_from(answer.state).unwrap_or_default(),
        policy = %answer.policy_id,
        "endpoint registered"
    );
    serde_json::to_value(prev.into_version(conf.cni_version))
        .map_err(|e| CniError::new(ErrorCode::IoFailure, format!("encoding the result: {e}")))
}

/// DEL: asks the agent to forget the endpoint. Idempotent: an endpoint the agent does not know
/// is success. An agent that cannot be reached (stopped, crashed, restarting, hung) is success
/// too, as the spec asks of DEL, without losing the deletion: it is queued beside the agent's
/// socket (`kubesg_proto::pending_deletes`) and the agent applies it when it is back. Only a
/// node where no agent ever ran has nothing to queue.
pub fn cmd_del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let attachment = env.attachment()?;
    let key = key_of(&attachment.container_id, &attachment.ifname);
    let result = AgentClient::connect(&conf.agent_socket, conf.timeout)
        .and_then(|mut agent| agent.delete_endpoint(key.clone()));
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.grpc_code() == Some(tonic::Code::NotFound) => {
            tracing::info!(
                container = %key.container_id,
                ifname = %key.ifname,
                "DEL: the agent does not know the endpoint; nothing to clean"
            );
            Ok(())
        }
        Err(e) if agent_is_away(&e) => queue_for_agent(conf, &key, &e),
        Err(e) => Err(CniError::from_agent(&e, Command::Del)),
    }
}

/// Whether `e` means the agent is not there to answer (rather than answering with an error).
fn agent_is_away(e: &AgentError) -> bool {
    match e {
        AgentError::SocketMissing(_) | AgentError::Unreachable { .. } | AgentError::Timeout(_) => {
            true
        }
        AgentError::Rpc(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled
        ),
        AgentError::Runtime(_) => false,
    }
}

/// Leaves the deletion of `key` for the agent (see [`cmd_del`]); fails with 11 only when it
/// cannot be written, so that the runtime retries.
fn queue_for_agent(conf: &NetConf, key: &EndpointKey, why: &AgentError) -> Result<(), CniError> {
    let dir = pending_deletes::dir_beside(&conf.agent_socket);
    match pending_deletes::queue(&dir, key) {
        Ok(Some(path)) => {
            tracing::warn!(
                container = %key.container_id,
                ifname = %key.ifname,
                queued = %path.display(),
                error = %why,
                "DEL: the agent is away; the deletion is queued for it"
            );
            Ok(())
        }
        Ok(None) => {
            tracing::warn!(
                container = %key.container_id,
                ifname = %key.ifname,
                error = %why,
                "DEL: no agent ever ran on this node; nothing to clean"
            );
            Ok(())
        }
        Err(e) => Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "{why}; queueing the deletion in {} failed: {e}",
                dir.display()
            ),
        )),
    }
}

/// CHECK: the pod must still be enforced: `prevResult` must name its interface, the agent must
/// know the endpoint (else 100) and have its programs attached (else 101).
pub fn cmd_check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    require_version(conf, CniVersion::V0_4_0, "CHECK")?;
    let attachment = env.attachment()?;
    let netns = attachment
        .netns
        .as_deref()
        .ok_or_else(|| CniError::new(ErrorCode::InvalidEnvironment, "CNI_NETNS missing"))?;
    let prev = conf.require_prev_result()?;
    prev.pod_interface(netns, &attachment.ifname)?;
    let mut agent = AgentClient::connect(&conf.agent_socket, conf.timeout)
        .map_err(|e| CniError::from_agent(&e, Command::Check))?;
    let answer = agent
        .check_endpoint(key_of(&attachment.container_id, &attachment.ifname))
        .map_err(|e| CniError::from_agent(&e, Command::Check))?;
    let what = |problem: &str| {
        format!(
            "{}/{}: {}",
            attachment.container_id,
            attachment.ifname,
            if answer.problem.is_empty() {
                problem
            } else {
                &answer.problem
            }
        )
    };
    if !answer.known {
        return Err(CniError::new(
            ErrorCode::EndpointNotRegistered,
            what("kubesg-agent does not know this endpoint"),
        ));
    }
    if !answer.attached {
        return Err(CniError::new(
            ErrorCode::ProgramsNotAttached,
            what("the endpoint's programs are not attached"),
        ));
    }
    Ok(())
}

/// STATUS: the agent must be reachable and ready, else 50 with the reason.
pub fn cmd_status(conf: &NetConf) -> Result<(), CniError> {
    require_version(conf, CniVersion::V1_1_0, "STATUS")?;
    let mut agent = AgentClient::connect(&conf.agent_socket, conf.timeout)
        .map_err(|e| CniError::from_agent(&e, Command::Status))?;
    let status = agent
        .status()
        .map_err(|e| CniError::from_agent(&e, Command::Status))?;
    if !status.ready {
        return Err(CniError::new(
            ErrorCode::PluginNotAvailable,
            format!("kubesg-agent is not ready: {}", status.message),
        ));
    }
    Ok(())
}

/// GC: deletes the agent's endpoints that are not in `cni.dev/valid-attachments`. Without the
/// list nothing is known to be stale and nothing is deleted; without the agent there is nothing
/// to delete. Every stale endpoint is tried; the failures are reported together.
///
/// The agent's endpoints are all taken to belong to this network: kubesg is chained into one
/// pod network per node.
pub fn cmd_gc(conf: &NetConf) -> Result<(), CniError> {
    require_version(conf, CniVersion::V1_1_0, "GC")?;
    let Some(valid) = &conf.valid_attachments else {
        tracing::warn!("GC without cni.dev/valid-attachments: nothing is known to be stale");
        return Ok(());
    };
    let mut agent = match AgentClient::connect(&conf.agent_socket, conf.timeout) {
        Ok(agent) => agent,
        Err(AgentError::SocketMissing(socket)) => {
            tracing::warn!(
                socket = %socket.display(),
                "GC: agent socket does not exist; nothing to clean"
            );
            return Ok(());
        }
        Err(e) => return Err(CniError::from_agent(&e, Command::Gc)),
    };
    let endpoints = agent
        .list_endpoints()
        .map_err(|e| CniError::from_agent(&e, Command::Gc))?;
    let stale = stale_endpoints(valid, endpoints.iter().filter_map(|e| e.key.clone()));
    let mut failures: Vec<(EndpointKey, CniError)> = Vec::new();
    for key in stale {
        tracing::info!(container = %key.container_id, ifname = %key.ifname, "GC: deleting stale endpoint");
        match agent.delete_endpoint(key.clone()) {
            Ok(()) => {}
            Err(e) if e.grpc_code() == Some(tonic::Code::NotFound) => {}
            Err(e) => failures.push((key, CniError::from_agent(&e, Command::Gc))),
        }
    }
    match failures.first() {
        None => Ok(()),
        Some((_, first)) => Err(CniError::new(
            first.code,
            failures
                .iter()
                .map(|(k, e)| format!("{}/{}: {}", k.container_id, k.ifname, e.details))
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}

/// The endpoints (by key) that no valid attachment names, in a stable order.
pub fn stale_endpoints(
    valid: &[GcAttachment],
    endpoints: impl IntoIterator<Item = EndpointKey>,
) -> Vec<EndpointKey> {
    let valid: BTreeSet<(&str, &str)> = valid
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let mut stale: Vec<EndpointKey> = endpoints
        .into_iter()
        .filter(|k| !valid.contains(&(k.container_id.as_str(), k.ifname.as_str())))
        .collect();
    stale.sort_by(|a, b| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
    stale.dedup();
    stale
}

/// CHECK needs 0.4.0, STATUS and GC 1.1.0: earlier configs do not allow them (code 1), as in
/// libcni's `skel`.
fn require_version(conf: &NetConf, least: CniVersion, command: &str) -> Result<(), CniError> {
    if conf.cni_version < least {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!(
                "config version {} does not allow {command} (needs {least} or later)",
                conf.cni_version
            ),
        ));
    }
    Ok(())
}

/// The agent's key of an attachment.
fn key_of(container_id: &str, ifname: &str) -> EndpointKey {
    EndpointKey {
        container_id: container_id.to_owned(),
        ifname: ifname.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str, i: &str) -> EndpointKey {
        key_of(c, i)
    }

    fn attachment(c: &str, i: &str) -> GcAttachment {
        GcAttachment {
            container_id: c.into(),
            ifname: i.into(),
        }
    }

    #[test]
    fn gc_deletes_only_endpoints_missing_from_the_valid_attachments() {
        let valid = [attachment("a", "eth0"), attachment("b", "net1")];
        let endpoints = [
            key("a", "eth0"),
            key("b", "eth0"),
            key("b", "net1"),
            key("c", "eth0"),
        ];
        assert_eq!(
            stale_endpoints(&valid, endpoints),
            vec![key("b", "eth0"), key("c", "eth0")]
        );
    }

    #[test]
    fn gc_with_an_empty_list_deletes_every_endpoint() {
        assert_eq!(
            stale_endpoints(&[], [key("x", "eth0")]),
            vec![key("x", "eth0")]
        );
    }
}
