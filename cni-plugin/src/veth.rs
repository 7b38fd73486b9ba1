//! Host-side interface discovery: which interface of this (the host's) network namespace is the
//! other end of the pod's veth, the one kubesg-agent attaches the programs to.
//!
//! First from `prevResult`: the host-side entries (no `sandbox`) that exist here, are veths (not
//! the bridge, not another device) and whose peer lives in the pod's netns. When that gives
//! exactly one, it is the answer. Otherwise (a primary plugin that does not report its host
//! side, or several candidates) from the kernel: inside the pod's netns, the pod interface's
//! `IFLA_LINK` is its peer's index here (what `/sys/class/net/<if>/iflink` shows, read through
//! netlink because sysfs does not follow `setns`, see `netlink.rs`).
//!
//! Every answer is checked against the kernel: the host end must be a veth whose peer is in the
//! pod's netns (its `IFLA_LINK_NETNSID` is the pod netns' id here), so a stale or foreign name in
//! `prevResult` never makes the agent enforce the wrong pod.

use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use nix::sched::{setns, CloneFlags};

use crate::{netlink, result::CniResult};

/// The host end of a pod's veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVeth {
    /// Its name in the host's namespace.
    pub name: String,
    /// Its index in the host's namespace (what the agent attaches to).
    pub ifindex: u32,
}

/// How the host end was found (for logs, and for tests that exercise each way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Named in `prevResult`.
    PrevResult,
    /// The pod interface's peer index, read inside the pod's netns.
    Iflink,
}

/// What went wrong finding the host end; `error.rs` maps each to a CNI code.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The pod's netns cannot be opened or entered (the pod is gone).
    #[error("cannot use the pod's netns {}: {source}", path.display())]
    Netns {
        /// `CNI_NETNS`.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The pod's netns has no interface of that name.
    #[error("the pod's netns {} has no interface {ifname:?}", netns.display())]
    PodInterfaceMissing {
        /// `CNI_NETNS`.
        netns: PathBuf,
        /// `CNI_IFNAME`.
        ifname: String,
    },
    /// The pod's interface is not a veth (macvlan, ipvlan, …): there is no host end to attach to.
    #[error(
        "the pod's interface {ifname:?} is a {kind}, not a veth: kubesg-cni needs a primary \
         plugin that connects pods with veth pairs (bridge, ptp)"
    )]
    NotVeth {
        /// `CNI_IFNAME`.
        ifname: String,
        /// Its kind ("device" when it has none).
        kind: String,
    },
    /// The pod interface's peer is not a veth of this namespace pointing back at it.
    #[error(
        "the peer of the pod's {ifname:?} (index {peer_index}) is not a veth of this network \
         namespace linked to the pod's netns"
    )]
    PeerNotHere {
        /// `CNI_IFNAME`.
        ifname: String,
        /// The peer index the pod side reported.
        peer_index: u32,
    },
    /// A netlink request failed.
    #[error("netlink ({context}): {source}")]
    Netlink {
        /// What was asked.
        context: String,
        /// Why it failed.
        source: io::Error,
    },
}

/// Finds the host end of the pod's interface `ifname` in `netns`: from `result` when it names
/// exactly one veth whose peer is in `netns`, from the kernel (`host_veth_by_iflink`) otherwise.
/// Runs in the calling thread's network namespace, which is the host's.
pub fn discover_host_veth(
    result: &CniResult,
    netns: &Path,
    ifname: &str,
) -> Result<(HostVeth, Source), DiscoveryError> {
    let named = host_veths_in_result(result, netns)?;
    if let [only] = named.as_slice() {
        return Ok((only.clone(), Source::PrevResult));
    }
    let found = host_veth_by_iflink(netns, ifname)?;
    if named.len() > 1 {
        tracing::info!(
            candidates = ?named,
            chosen = %found.name,
            "prevResult names several veths into the pod's netns; chose the peer of {ifname}"
        );
    }
    Ok((found, Source::Iflink))
}

/// The host-side interfaces `result` names that exist in this namespace, are veths and have
/// their peer in `netns`.
pub fn host_veths_in_result(
    result: &CniResult,
    netns: &Path,
) -> Result<Vec<HostVeth>, DiscoveryError> {
    let mut veths = Vec::new();
    for iface in result.host_interfaces() {
        let link =
            netlink::link_by_name(&iface.name).map_err(|source| DiscoveryError::Netlink {
                context: format!("link {}", iface.name),
                source,
            })?;
        match link {
            Some(link) if link.is_veth() => veths.push(link),
            Some(link) => tracing::debug!(
                name = %iface.name,
                kind = ?link.kind,
                "prevResult host interface is not a veth"
            ),
            None => tracing::debug!(name = %iface.name, "prevResult host interface not found"),
        }
    }
    if veths.is_empty() {
        return Ok(Vec::new());
    }
    // Asked after the links: the kernel assigns the id when it first reports a link into it.
    let pod_nsid = netnsid_here(netns)?;
    let found = veths
        .into_iter()
        .filter(|link| pod_nsid.is_some() && link.link_netnsid == pod_nsid)
        .map(|link| HostVeth {
            name: link.name,
            ifindex: link.index,
        })
        .collect();
    Ok(found)
}

/// Finds the host end from the kernel alone: enters `netns` on a thread to read the pod
/// interface's peer index, then checks that this namespace has a veth at that index whose own
/// peer is the pod interface, in `netns`.
pub fn host_veth_by_iflink(netns: &Path, ifname: &str) -> Result<HostVeth, DiscoveryError> {
    let pod = in_netns(netns, || netlink::link_by_name(ifname))?.map_err(|source| {
        DiscoveryError::Netlink {
            context: format!("link {ifname} in {}", netns.display()),
            source,
        }
    })?;
    let pod = pod.ok_or_else(|| DiscoveryError::PodInterfaceMissing {
        netns: netns.to_path_buf(),
        ifname: ifname.to_owned(),
    })?;
    let peer_index = match (pod.is_veth(), pod.link) {
        (true, Some(peer)) => peer,
        _ => {
            return Err(DiscoveryError::NotVeth {
                ifname: ifname.to_owned(),
                kind: pod.kind.unwrap_or_else(|| "device".to_owned()),
            })
        }
    };
    let not_here = || DiscoveryError::PeerNotHere {
        ifname: ifname.to_owned(),
        peer_index,
    };
    let host = netlink::link_by_index(peer_index)
        .map_err(|source| DiscoveryError::Netlink {
            context: format!("link index {peer_index}"),
            source,
        })?
        .ok_or_else(not_here)?;
    let pod_nsid = netnsid_here(netns)?;
    if !host.is_veth()
        || host.link != Some(pod.index)
        || pod_nsid.is_none()
        || host.link_netnsid != pod_nsid
    {
        return Err(not_here());
    }
    Ok(HostVeth {
        name: host.name,
        ifindex: host.index,
    })
}

/// The id this namespace gives `netns` (what its veths report as their peer's namespace).
fn netnsid_here(netns: &Path) -> Result<Option<i32>, DiscoveryError> {
    let file = File::open(netns).map_err(|source| DiscoveryError::Netns {
        path: netns.to_path_buf(),
        source,
    })?;
    netlink::netnsid_of(file.as_fd()).map_err(|source| DiscoveryError::Netlink {
        context: format!("id of netns {}", netns.display()),
        source,
    })
}

/// Runs `f` on a thread that entered the network namespace `netns` (the thread ends with it, so
/// no other code ever runs in the wrong namespace), as `kubesg_testkit::netns::Netns::enter`.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, DiscoveryError> {
    let netns_error = |source| DiscoveryError::Netns {
        path: netns.to_path_buf(),
        source,
    };
    let file = File::open(netns).map_err(netns_error)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the thread inside the netns panicked")))
    })
    .map_err(netns_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_netns_is_a_netns_error() {
        let err = host_veth_by_iflink(Path::new("/run/netns/kubesg-no-such-ns"), "eth0")
            .expect_err("no netns");
        assert!(matches!(err, DiscoveryError::Netns { .. }), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_netns_cannot_be_entered() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let err = in_netns(file.path(), || ()).expect_err("not a netns");
        assert!(matches!(err, DiscoveryError::Netns { .. }), "{err}");
    }
}
