//! Deny events from the datapath's ring buffer, turned into flow-log records.

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use kubesg_common::{
    event::{DenyEvent, DenyReason},
    proto, Direction,
};

use crate::tables::ip_of;

/// One dropped packet, as a flow log reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The datapath clock (CLOCK_MONOTONIC, truncated to the tick) when it was dropped.
    pub ts_ns: u64,
    /// The endpoint's interface.
    pub ifindex: u32,
    /// The endpoint's policy at the time.
    pub policy_id: u32,
    /// Sent (egress) or received (ingress) by the pod.
    pub direction: Direction,
    /// Why; `None` for a reason this agent does not know (a newer datapath).
    pub reason: Option<DenyReason>,
    /// IP protocol (0 when the packet could not be parsed that far).
    pub proto: u8,
    /// Source address, when parsed.
    pub src: Option<IpAddr>,
    /// Destination address, when parsed.
    pub dst: Option<IpAddr>,
    /// Source port or ICMP identifier.
    pub sport: u16,
    /// Destination port, or ICMP `type << 8 | code`.
    pub dport: u16,
}

impl From<&DenyEvent> for Denial {
    fn from(ev: &DenyEvent) -> Self {
        let parsed = ev.family != 0;
        Denial {
            ts_ns: ev.ts_ns,
            ifindex: ev.ifindex,
            policy_id: ev.policy_id,
            direction: Direction::from_u8(ev.direction),
            reason: DenyReason::from_u8(ev.reason),
            proto: ev.proto,
            src: parsed.then(|| ip_of(ev.family, &ev.src)),
            dst: parsed.then(|| ip_of(ev.family, &ev.dst)),
            sport: ev.sport,
            dport: ev.dport,
        }
    }
}

impl Denial {
    /// One line for logs: `deny reason=policy direction=ingress ifindex=7 policy=3 tcp
    /// 192.168.1.7:40000 -> 192.168.1.5:23`.
    pub fn flow_log_line(&self) -> String {
        let reason = self.reason.map_or("unknown", DenyReason::name);
        let dir = match self.direction {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        };
        let head = format!(
            "deny reason={reason} direction={dir} ifindex={} policy={}",
            self.ifindex, self.policy_id
        );
        let (Some(src), Some(dst)) = (self.src, self.dst) else {
            return format!("{head} (unparsed packet)");
        };
        let addr = |ip: IpAddr, port: u16| match ip {
            IpAddr::V4(v4) => format!("{v4}:{port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        };
        match self.proto {
            proto::TCP | proto::UDP | proto::SCTP => {
                let name = match self.proto {
                    proto::TCP => "tcp",
                    proto::UDP => "udp",
                    _ => "sctp",
                };
                format!(
                    "{head} {name} {} -> {}",
                    addr(src, self.sport),
                    addr(dst, self.dport)
                )
            }
            proto::ICMP | proto::ICMPV6 => format!(
                "{head} icmp {src} -> {dst} type={} code={} id={}",
                self.dport >> 8,
                self.dport & 0xff,
                self.sport
            ),
            p => format!("{head} proto={p} {src} -> {dst}"),
        }
    }
}

/// Every event waiting in the ring buffer.
pub fn drain(ring: &mut RingBuf<MapData>) -> Vec<Denial> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<DenyEvent>() {
            // SAFETY: the datapath writes whole DenyEvents; the length was checked and the read is
            // unaligned.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DenyEvent) };
            out.push(Denial::from(&ev));
        }
    }
    out
}

/// Waits up to `timeout` for events to arrive; returns whether some did.
pub fn wait(ring: &RingBuf<MapData>, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: ring.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}
