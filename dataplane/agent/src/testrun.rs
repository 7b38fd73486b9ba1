//! `BPF_PROG_TEST_RUN`: runs a loaded tc program on a crafted frame without attaching it. The
//! program tests and the benchmark use it; aya does not expose the command, so this is the one
//! place that issues it.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::programs::ProgramFd;

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// The first fields of `struct __sk_buff`, up to `ifindex`, which is what a test sets: the kernel
/// rejects a context with other fields set (see `convert___skb_to_skb`).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct SkbContext {
    len: u32,
    pkt_type: u32,
    mark: u32,
    queue_mapping: u32,
    protocol: u32,
    vlan_present: u32,
    vlan_tci: u32,
    vlan_proto: u32,
    priority: u32,
    ingress_ifindex: u32,
    ifindex: u32,
}

/// What one test run returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (a `TC_ACT_*` code; -1 is `TC_ACT_UNSPEC`).
    pub retval: i32,
    /// Average nanoseconds per run, as the kernel measured over `repeat` runs.
    pub duration_ns: u32,
}

/// Runs the program behind `fd` on `frame` (an Ethernet frame) `repeat` times. With an `ifindex`
/// above 1 the skb appears to cross that interface (it must exist in the caller's network
/// namespace); otherwise the namespace's loopback (ifindex 1).
pub fn test_run(fd: &ProgramFd, frame: &[u8], ifindex: u32, repeat: u32) -> io::Result<TestRun> {
    test_run_from(fd, frame, ifindex, 0, repeat)
}

/// [`test_run`] with `__sk_buff.ingress_ifindex` (`skb->skb_iif`: the interface the packet was
/// received on) set to `ingress_ifindex`: 0 is a packet the node's own stack sent, anything else
/// one forwarded or bridged from that interface. The datapath reads it to tell the node's
/// connections to a pod (exempt from its NetworkPolicies) from everyone else's.
pub fn test_run_from(
    fd: &ProgramFd,
    frame: &[u8],
    ifindex: u32,
    ingress_ifindex: u32,
    repeat: u32,
) -> io::Result<TestRun> {
    let ctx = SkbContext {
        ifindex,
        ingress_ifindex,
        ..SkbContext::default()
    };
    let data_size_in = u32::try_from(frame.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut attr = TestRunAttr {
        prog_fd: fd.as_fd().as_raw_fd() as u32,
        data_size_in,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of::<SkbContext>() as u32,
        ctx_in: &ctx as *const SkbContext as u64,
        ..TestRunAttr::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_PROG_TEST_RUN; the pointers it carries
    // (frame, ctx) outlive the call and the sizes match them; data_out and ctx_out are null, which
    // the kernel accepts.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TestRun {
        retval: attr.retval as i32,
        duration_ns: attr.duration,
    })
}
