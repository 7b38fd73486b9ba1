//! Attaching the programs to a pod's host-side interface: tcx links on kernels that have them
//! (≥ 6.6), clsact filters otherwise. When the datapath is pinned, attachments outlive the agent
//! (pinned tcx links; netlink filters stay by themselves), and a restarted agent swaps its own
//! program into the existing attachment atomically, so no packet passes unjudged.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, Link as _, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
};

/// The two attach points of a pod interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// tc ingress of the host-side interface: what the pod sends (its egress rules).
    FromPod,
    /// tc egress of the host-side interface: what the pod receives (its ingress rules).
    ToPod,
}

impl Hook {
    /// Both hooks.
    pub const ALL: [Hook; 2] = [Hook::FromPod, Hook::ToPod];

    /// The program that runs at this hook.
    pub fn program_name(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
        }
    }

    fn tc_attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod => TcAttachType::Ingress,
            Hook::ToPod => TcAttachType::Egress,
        }
    }
}

/// How programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (kernel ≥ 6.6): owned by a link object, pinnable, atomically replaceable.
    Tcx,
    /// A clsact qdisc with direct-action bpf filters (older kernels).
    Clsact,
}

impl AttachMode {
    /// tcx where the running kernel has it, clsact otherwise.
    pub fn detect() -> Self {
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => AttachMode::Tcx,
            _ => AttachMode::Clsact,
        }
    }
}

/// Errors attaching or detaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No interface has this index (in the agent's network namespace).
    #[error("no interface with index {0}")]
    NoInterface(u32),
    /// The kernel refused the attachment.
    #[error("attaching {program} to ifindex {ifindex}: {source}")]
    Program {
        /// The program.
        program: &'static str,
        /// The interface.
        ifindex: u32,
        /// The kernel's answer.
        source: ProgramError,
    },
    /// A pinned link could not be written, read or removed.
    #[error("pinned link {path}: {message}")]
    Pin {
        /// The pin.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Priority and handle of our clsact filters: fixed, so a restarted agent finds and replaces its
/// own filter instead of stacking a second one.
const CLSACT_PRIORITY: u16 = 0x4b53;
const CLSACT_HANDLE: u16 = 1;

/// The name of interface `ifindex` in this network namespace.
pub fn ifname(ifindex: u32) -> Result<String, AttachError> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(AttachError::NoInterface(ifindex));
    }
    // SAFETY: on success if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// Where the tcx link of `hook` on `ifindex` is pinned.
pub fn link_pin_path(pin_dir: &Path, ifindex: u32, hook: Hook) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("{ifindex}-{}", hook.program_name()))
}

/// Attaches `prog` at `hook` of `ifindex`. With `pin_dir` the attachment is made to outlive this
/// process and an existing one is taken over; the returned link (unpinned mode only) detaches when
/// dropped.
pub(crate) fn attach(
    prog: &mut SchedClassifier,
    ifindex: u32,
    hook: Hook,
    mode: AttachMode,
    pin_dir: Option<&Path>,
) -> Result<Option<SchedClassifierLink>, AttachError> {
    let name = ifname(ifindex)?;
    let err = |source| AttachError::Program {
        program: hook.program_name(),
        ifindex,
        source,
    };
    match mode {
        AttachMode::Tcx => {
            if let Some(dir) = pin_dir {
                let path = link_pin_path(dir, ifindex, hook);
                if let Some(link) = live_pinned_link(&path, &name, hook)? {
                    // Swap our program into the existing link: bpf_link_update is atomic.
                    let id = prog.attach_to_link(link).map_err(err)?;
                    // The pin keeps the link; dropping our handle only closes a descriptor.
                    drop(prog.take_link(id).map_err(err)?);
                    return Ok(None);
                }
                let link = new_tcx_link(prog, &name, hook).map_err(err)?;
                let fd_link = FdLink::try_from(link).map_err(|e| pin_err(&path, e))?;
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(|e| pin_err(&path, e))?;
                }
                fd_link.pin(&path).map_err(|e| pin_err(&path, e))?;
                Ok(None)
            } else {
                new_tcx_link(prog, &name, hook).map(Some).map_err(err)
            }
        }
        AttachMode::Clsact => {
            if let Err(e) = tc::qdisc_add_clsact(&name) {
                // Another program (or our previous run) may have added it already.
                if !is_exists(&e) {
                    return Err(err(ProgramError::from(e)));
                }
            }
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: CLSACT_PRIORITY,
                handle: TcHandle::new(0, CLSACT_HANDLE),
                classid: None,
            });
            let id = match prog.attach_with_options(&name, hook.tc_attach_type(), options) {
                Ok(id) => id,
                Err(ProgramError::TcError(e)) if is_exists(&e) => {
                    // Our filter from a previous run: replace its program in place.
                    let link = clsact_link(&name, hook)?;
                    prog.attach_to_link(link).map_err(err)?
                }
                Err(e) => return Err(err(e)),
            };
            let link = prog.take_link(id).map_err(err)?;
            if pin_dir.is_some() {
                // Netlink filters persist on their own; forgetting the handle keeps it attached
                // when this process exits.
                std::mem::forget(link);
                Ok(None)
            } else {
                Ok(Some(link))
            }
        }
    }
}

/// A new tcx link of `prog` at `hook` of interface `name`, handed to the caller (to pin, or to
/// hold: dropping it detaches).
fn new_tcx_link(
    prog: &mut SchedClassifier,
    name: &str,
    hook: Hook,
) -> Result<SchedClassifierLink, ProgramError> {
    let id = prog.attach_with_options(
        name,
        hook.tc_attach_type(),
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    )?;
    prog.take_link(id)
}

/// Detaches a persistent attachment (pinned mode). Succeeds when there is nothing to detach.
pub(crate) fn detach_persistent(
    ifindex: u32,
    hook: Hook,
    mode: AttachMode,
    pin_dir: &Path,
) -> Result<(), AttachError> {
    match mode {
        AttachMode::Tcx => {
            let path = link_pin_path(pin_dir, ifindex, hook);
            match PinnedLink::from_pin(&path) {
                Ok(link) => {
                    // Unpinning drops the last reference: the link detaches.
                    drop(link.unpin().map_err(|e| pin_err(&path, e))?);
                    Ok(())
                }
                Err(_) if !path.exists() => Ok(()),
                Err(e) => Err(pin_err(&path, e)),
            }
        }
        AttachMode::Clsact => {
            let name = match ifname(ifindex) {
                Ok(n) => n,
                // The interface is gone, and its filters with it.
                Err(AttachError::NoInterface(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            match clsact_link(&name, hook)?.detach() {
                Ok(()) => Ok(()),
                Err(ProgramError::TcError(tc::TcError::NetlinkError(e)))
                    if e.raw_os_error() == Some(libc::ENOENT) =>
                {
                    Ok(())
                }
                Err(e) => Err(AttachError::Program {
                    program: hook.program_name(),
                    ifindex,
                    source: e,
                }),
            }
        }
    }
}

/// The pinned tcx link at `path`, if it is still attached to `ifname` at `hook`. A stale pin
/// (the interface is gone, or its index now names another interface) is removed.
fn live_pinned_link(
    path: &Path,
    ifname: &str,
    hook: Hook,
) -> Result<Option<SchedClassifierLink>, AttachError> {
    if !path.exists() {
        return Ok(None);
    }
    let link = match PinnedLink::from_pin(path) {
        Ok(l) => FdLink::from(l),
        Err(_) => {
            fs::remove_file(path).map_err(|e| pin_err(path, e))?;
            return Ok(None);
        }
    };
    let prog_id = link.info().map(|i| i.program_id()).unwrap_or(0);
    let attached = aya::programs::SchedClassifier::query_tcx(ifname, hook.tc_attach_type())
        .map(|(_, progs)| progs.iter().any(|p| p.id() == prog_id))
        .unwrap_or(false);
    if prog_id == 0 || !attached {
        drop(link);
        fs::remove_file(path).map_err(|e| pin_err(path, e))?;
        return Ok(None);
    }
    SchedClassifierLink::try_from(link)
        .map(Some)
        .map_err(|e| pin_err(path, e))
}

fn clsact_link(ifname: &str, hook: Hook) -> Result<SchedClassifierLink, AttachError> {
    SchedClassifierLink::attached(
        ifname,
        hook.tc_attach_type(),
        CLSACT_PRIORITY,
        TcHandle::new(0, CLSACT_HANDLE),
        None,
    )
    .map_err(|e| AttachError::Pin {
        path: PathBuf::from(ifname),
        message: e.to_string(),
    })
}

fn is_exists(e: &tc::TcError) -> bool {
    match e {
        tc::TcError::AlreadyAttached => true,
        tc::TcError::NetlinkError(n) => n.raw_os_error() == Some(libc::EEXIST),
        tc::TcError::IoError(io) => io.kind() == io::ErrorKind::AlreadyExists,
        _ => false,
    }
}

fn pin_err(path: &Path, e: impl std::fmt::Display) -> AttachError {
    AttachError::Pin {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}
