//! Run-time settings of the datapath, held in a one-element array map so the agent can change
//! them (conntrack timeouts above all) without reloading the programs.

use crate::conntrack::TcpState;

/// Index into [`Config::timeouts_ns`] for each kind of conntrack timeout.
///
/// The TCP states use their own numeric value as index, as nf_conntrack's `timeouts[state]`.
pub mod timeout {
    /// UDP before any reply (`nf_conntrack_udp_timeout`).
    pub const UDP_UNREPLIED: usize = 10;
    /// UDP stream, after a reply and 2 s of traffic (`nf_conntrack_udp_timeout_stream`).
    pub const UDP_REPLIED: usize = 11;
    /// ICMP and ICMPv6 request/reply (`nf_conntrack_icmp_timeout`).
    pub const ICMP: usize = 12;
    /// Any other protocol, SCTP included (`nf_conntrack_generic_timeout`).
    pub const GENERIC: usize = 13;
    /// Later fragments wait this long for the verdict of their first fragment (`ipfrag_time`).
    pub const FRAGMENT: usize = 14;
    /// A TCP connection whose same segment was retransmitted `max_retrans` times, or whose
    /// receiver announced a zero window, lives at most this long without progress
    /// (`nf_conntrack_tcp_timeout_max_retrans`).
    pub const TCP_RETRANS: usize = 15;
    /// A TCP connection with data in flight lives at most this long without an acknowledgment
    /// (`nf_conntrack_tcp_timeout_unacknowledged`): a peer that vanished is forgotten in 5
    /// minutes, not the 5 days of ESTABLISHED.
    pub const TCP_UNACK: usize = 16;
    /// Number of timeout slots.
    pub const COUNT: usize = 17;
}

/// Bit in [`Config::flags`]: when an endpoint's policy changes, re-check its tracked connections
/// against the new rules and cut the ones they no longer allow (Neutron's behaviour). Without it,
/// tracked connections live on until they close or time out (AWS security groups' behaviour).
pub const CFG_RECHECK_ON_POLICY_CHANGE: u64 = 1 << 0;
/// Bit in [`Config::flags`]: emit a deny event on the ring buffer for every dropped packet.
pub const CFG_DENY_EVENTS: u64 = 1 << 1;

const SEC: u64 = 1_000_000_000;

/// The datapath's settings. One element of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Timeouts in nanoseconds, indexed by [`TcpState`] value for TCP and by [`timeout`] otherwise.
    pub timeouts_ns: [u64; timeout::COUNT],
    /// A replied UDP flow becomes a stream (`[ASSURED]`, long timeout) only when it still carries
    /// traffic this long after its first packet (2 s in nf_conntrack_proto_udp.c).
    pub udp_stream_after_ns: u64,
    /// `CFG_*` bits.
    pub flags: u64,
    /// Nanoseconds per kernel tick (`1e9 / CONFIG_HZ`), or 0. When set, the datapath's clock is
    /// `jiffies × tick_ns + tick_offset_ns`: `bpf_jiffies64()` is inlined by the verifier into one
    /// load, where `bpf_ktime_get_coarse_ns()` is a helper call, the largest fixed cost of the
    /// established fast path. The agent calibrates both so that the sum reads as
    /// CLOCK_MONOTONIC at the start of the current tick (see `kubesg_agent::clock`). 0: the
    /// datapath calls the coarse-clock helper.
    pub tick_ns: u64,
    /// See [`Config::tick_ns`]: CLOCK_MONOTONIC at a tick's start minus `jiffies × tick_ns`,
    /// wrapping.
    pub tick_offset_ns: u64,
    /// The most conntrack entries one endpoint may hold (`CT_COUNTS`); a NEW connection past it
    /// is refused (`conntrack_full`). 0: no limit but the table's size.
    pub ct_endpoint_limit: u64,
}

/// One reading of the kernel's clocks, taken by the `clock` program in one run so that the agent
/// can relate jiffies to CLOCK_MONOTONIC (the value of the one-element `CLOCK` map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClockSample {
    /// `bpf_jiffies64()`.
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns()`, read right after.
    pub coarse_ns: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC), read right after.
    pub mono_ns: u64,
}

impl Config {
    /// nf_conntrack's defaults (kernel 6.x), re-check on policy change, deny events on.
    pub const fn defaults() -> Self {
        let mut t = [0u64; timeout::COUNT];
        t[TcpState::SynSent as usize] = 120 * SEC;
        t[TcpState::SynRecv as usize] = 60 * SEC;
        t[TcpState::Established as usize] = 432_000 * SEC;
        t[TcpState::FinWait as usize] = 120 * SEC;
        t[TcpState::CloseWait as usize] = 60 * SEC;
        t[TcpState::LastAck as usize] = 30 * SEC;
        t[TcpState::TimeWait as usize] = 120 * SEC;
        t[TcpState::Close as usize] = 10 * SEC;
        t[TcpState::SynSent2 as usize] = 120 * SEC;
        t[timeout::UDP_UNREPLIED] = 30 * SEC;
        t[timeout::UDP_REPLIED] = 120 * SEC;
        t[timeout::ICMP] = 30 * SEC;
        t[timeout::GENERIC] = 600 * SEC;
        t[timeout::FRAGMENT] = 30 * SEC;
        t[timeout::TCP_RETRANS] = 300 * SEC;
        t[timeout::TCP_UNACK] = 300 * SEC;
        Config {
            timeouts_ns: t,
            udp_stream_after_ns: 2 * SEC,
            flags: CFG_RECHECK_ON_POLICY_CHANGE | CFG_DENY_EVENTS,
            tick_ns: 0,
            tick_offset_ns: 0,
            ct_endpoint_limit: 0,
        }
    }

    /// The timeout in slot `i`; an out-of-range slot reads as the generic timeout.
    #[inline(always)]
    pub fn timeout(&self, i: usize) -> u64 {
        match self.timeouts_ns.get(i) {
            Some(t) => *t,
            None => self.timeouts_ns[timeout::GENERIC],
        }
    }

    /// Whether a `CFG_*` bit is set.
    #[inline(always)]
    pub fn has(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }

    /// The datapath's clock at `jiffies`, when the tick clock is set up ([`Config::tick_ns`]).
    #[inline(always)]
    pub fn tick_clock_ns(&self, jiffies: u64) -> Option<u64> {
        if self.tick_ns == 0 {
            None
        } else {
            Some(
                jiffies
                    .wrapping_mul(self.tick_ns)
                    .wrapping_add(self.tick_offset_ns),
            )
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::defaults()
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Config {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ClockSample {}
