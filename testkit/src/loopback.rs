//! The program tests' harness: a private datapath whose one endpoint sits on loopback (ifindex 1,
//! which `BPF_PROG_TEST_RUN` needs no device for), crafted frames run through its tc programs as
//! if the pod sent or received them, and what the datapath made of them: the verdict, the
//! conntrack entries, the counters and the deny events.

use std::{cell::Cell, io, net::IpAddr, time::Duration};

use aya::maps::{MapData, RingBuf};
use kubesg_agent::{
    clock,
    conntrack::{self, Connection},
    datapath::{Datapath, DatapathOptions, PolicyHandle},
    events::{self, Denial},
    policy::CompiledPolicy,
    testrun::test_run_from,
};
use kubesg_common::{
    config::CFG_RECHECK_ON_POLICY_CHANGE,
    event::{Counters, DenyReason},
    Direction,
};

use crate::{
    family::{NEIGHBOR_V6, POD_V6},
    packet,
};

/// The verdict of an accepted frame: `TC_ACT_UNSPEC`, the packet goes on.
pub const ACCEPT: i32 = -1;
/// The verdict of a dropped frame: `TC_ACT_SHOT`.
pub const DROP: i32 = 2;
/// Loopback, where the endpoint sits: `BPF_PROG_TEST_RUN` needs no device for it.
pub const IFINDEX: u32 = 1;
/// The `ingress_ifindex` of a packet the pod receives from another pod or node (forwarded or
/// bridged from that interface); [`LoopbackDatapath::host_sends`] uses 0, the node's own stack.
pub const FORWARDED_FROM: u32 = 1000;
/// The index of what the pod sends in [`LoopbackDatapath::counters`].
pub const EGRESS: usize = Direction::Egress as usize;
/// The index of what the pod receives in [`LoopbackDatapath::counters`].
pub const INGRESS: usize = Direction::Ingress as usize;

/// One private datapath with one endpoint on loopback, a member of a policy or not; every test
/// loads its own, so tests run in parallel without seeing each other's state.
pub struct LoopbackDatapath {
    /// The datapath, for what the harness does not wrap (config, maps, programs).
    pub datapath: Datapath,
    /// The endpoint's policy, `None` for a non-member.
    policy: Option<PolicyHandle>,
    events: RingBuf<MapData>,
    /// CLOCK_MONOTONIC just before and after the last run: the datapath's `now` is not after
    /// the second and a tick or so before the first (`kubesg_agent::clock`).
    window: Cell<(u64, u64)>,
}

impl LoopbackDatapath {
    /// The endpoint as a member of `policy`, or a non-member with `None`.
    pub fn load(policy: Option<&CompiledPolicy>) -> Self {
        Self::load_with(policy, &DatapathOptions::default())
    }

    /// [`LoopbackDatapath::load`] with `opts` (a small conntrack table, an entry limit).
    pub fn load_with(policy: Option<&CompiledPolicy>, opts: &DatapathOptions) -> Self {
        let mut datapath = Datapath::load(opts).expect("loading the datapath");
        let handle = policy.map(|p| datapath.install_policy(p).expect("installing the policy"));
        datapath
            .set_endpoint(IFINDEX, handle)
            .expect("registering the endpoint");
        let events = datapath.take_events().expect("the deny-event ring");
        LoopbackDatapath {
            datapath,
            policy: handle,
            events,
            window: Cell::new((0, 0)),
        }
    }

    /// The conntrack entries the endpoint holds, as its limit counts them.
    pub fn held(&self) -> i64 {
        self.datapath
            .conntrack_held(IFINDEX)
            .expect("reading CT_COUNTS")
            .expect("the endpoint's count")
    }

    /// The endpoint's policy, `None` for a non-member: denials and entries carry its id.
    pub fn policy(&self) -> Option<PolicyHandle> {
        self.policy
    }

    /// Replaces the member's policy with `policy`, as the agent does when rules change.
    pub fn replace(&mut self, policy: &CompiledPolicy) {
        let old = self.policy.expect("a member");
        self.policy = Some(
            self.datapath
                .replace_policy(old, policy)
                .expect("replacing the policy"),
        );
    }

    /// Makes the endpoint a member of `policy` (a non-member joins, a member moves).
    pub fn join(&mut self, policy: &CompiledPolicy) {
        let handle = self
            .datapath
            .install_policy(policy)
            .expect("installing the policy");
        self.datapath
            .set_endpoint(IFINDEX, Some(handle))
            .expect("moving the endpoint");
        self.policy = Some(handle);
    }

    /// Sets the pod's addresses, as the agent does from its CNI result: what it sends from any
    /// other is refused (the source check; none turns it off, the harness's default).
    pub fn set_sources(&mut self, addrs: &[IpAddr]) -> bool {
        self.datapath
            .set_sources(IFINDEX, addrs)
            .expect("setting the sources")
    }

    /// Turns re-checking established connections on policy change on or off.
    pub fn set_recheck(&mut self, on: bool) {
        let mut cfg = self.datapath.config().expect("reading the config");
        if on {
            cfg.flags |= CFG_RECHECK_ON_POLICY_CHANGE;
        } else {
            cfg.flags &= !CFG_RECHECK_ON_POLICY_CHANGE;
        }
        self.datapath.set_config(&cfg).expect("writing the config");
    }

    fn run(&self, prog: &'static str, frame: &[u8], ingress_ifindex: u32) -> io::Result<i32> {
        let fd = self.datapath.program_fd(prog).expect("program fd");
        let before = clock::now_ns();
        let r = test_run_from(fd, frame, IFINDEX, ingress_ifindex, 1)?;
        self.window.set((before, clock::now_ns()));
        Ok(r.retval)
    }

    /// Runs `frame` as sent by the pod (received on its interface, as the kernel marks it);
    /// returns the verdict ([`ACCEPT`] or [`DROP`]).
    pub fn pod_sends(&self, frame: &[u8]) -> i32 {
        self.run("from_pod", frame, IFINDEX)
            .expect("BPF_PROG_TEST_RUN")
    }

    /// Runs `frame` as received by the pod from another pod or node ([`FORWARDED_FROM`]);
    /// returns the verdict ([`ACCEPT`] or [`DROP`]).
    pub fn pod_receives(&self, frame: &[u8]) -> i32 {
        self.run("to_pod", frame, FORWARDED_FROM)
            .expect("BPF_PROG_TEST_RUN")
    }

    /// Runs `frame` as received by the pod from the node's own network stack (ingress_ifindex
    /// 0: kubelet probes, say); returns the verdict ([`ACCEPT`] or [`DROP`]).
    pub fn host_sends(&self, frame: &[u8]) -> i32 {
        self.run("to_pod", frame, 0).expect("BPF_PROG_TEST_RUN")
    }

    /// Runs `frame` through `from_pod` with `ingress_ifindex` 0, as if the node had sent it:
    /// what the pod sends is never the node's, whatever the context says.
    pub fn pod_sends_marked_from_host(&self, frame: &[u8]) -> i32 {
        self.run("from_pod", frame, 0).expect("BPF_PROG_TEST_RUN")
    }

    /// Asserts that the pod's neighbour solicitation for [`NEIGHBOR_V6`] and the neighbour's
    /// advertisement both pass: whatever the rules, neighbour discovery is never filtered.
    #[track_caller]
    pub fn assert_neighbor_discovery_passes(&self) {
        let solicitation = packet::neighbor_solicitation(POD_V6, NEIGHBOR_V6);
        assert_eq!(self.pod_sends(&solicitation), ACCEPT, "solicitation");
        let advertisement = packet::neighbor_advertisement(NEIGHBOR_V6, POD_V6);
        assert_eq!(self.pod_receives(&advertisement), ACCEPT, "advertisement");
    }

    /// Every tracked connection.
    pub fn conns(&self) -> Vec<Connection> {
        conntrack::list(self.datapath.maps()).expect("listing conntrack")
    }

    /// The one tracked connection; fails the test when there are none or several.
    #[track_caller]
    pub fn conn(&self) -> Connection {
        let c = self.conns();
        assert_eq!(c.len(), 1, "expected exactly one entry: {c:#?}");
        c[0]
    }

    /// The endpoint's counters, indexed by [`EGRESS`] and [`INGRESS`].
    pub fn counters(&self) -> [Counters; 2] {
        self.datapath
            .counters(IFINDEX)
            .expect("reading counters")
            .expect("endpoint registered")
    }

    /// The deny events since the last call.
    pub fn denials(&mut self) -> Vec<Denial> {
        events::drain(&mut self.events)
    }

    /// Asserts that exactly one deny event came since the last call, with `reason`; returns it
    /// for more checks.
    #[track_caller]
    pub fn assert_denied(&mut self, reason: DenyReason) -> Denial {
        let d = self.denials();
        assert_eq!(d.len(), 1, "expected one deny event: {d:#?}");
        assert_eq!(d[0].reason, Some(reason), "{d:#?}");
        d[0].clone()
    }

    /// Asserts that `c` expires `timeout` after the last run: the run's clock reading is not
    /// after the instant taken just after it (the datapath's clock is never ahead of
    /// CLOCK_MONOTONIC) and at most [`clock::MAX_LAG_TICKS`] ticks before the instant taken
    /// just before it (`kubesg_agent::clock`).
    #[track_caller]
    pub fn assert_expires_in(&self, c: &Connection, timeout: Duration) {
        let timeout_ns = u64::try_from(timeout.as_nanos()).expect("a timeout within u64 ns");
        let (before, after) = self.window.get();
        let tick = self
            .datapath
            .tick_clock()
            .expect("the tick clock is calibrated")
            .tick_ns;
        let lag = clock::MAX_LAG_TICKS * tick;
        let e = c.entry.expires_ns;
        assert!(
            before + timeout_ns <= e + lag && e <= after + timeout_ns,
            "expires_ns {e} is not last run + {timeout_ns} ns ({before}..{after}, the clock up to {lag} ns behind)"
        );
    }

    /// CLOCK_MONOTONIC just before and just after the last run.
    pub fn last_run_window(&self) -> (u64, u64) {
        self.window.get()
    }
}

/// Lets the datapath's clock (CLOCK_MONOTONIC truncated to the tick) move on, so that a
/// timeout the next packet renews differs from the one before it.
pub fn next_tick() {
    std::thread::sleep(Duration::from_millis(20));
}
