//! The conntrack table as userspace sees it: listing in `/proc/net/nf_conntrack`'s line format
//! (so people can compare it with the kernel's own table line by line), sweeping expired entries,
//! flushing.

use std::{fmt::Write as _, net::IpAddr};

use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use kubesg_common::{
    conntrack::{
        is_icmp, CtEntry, CtKey, TcpState, CT_F_ASSURED, CT_F_ORIG_INGRESS, CT_F_SEEN_REPLY,
    },
    proto, AF_INET6,
};

use crate::{map_batch, maps::Maps, tables::ip_of};

/// One tracked connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The map key (pod-relative).
    pub key: CtKey,
    /// The map value.
    pub entry: CtEntry,
}

/// One direction of a connection, as nf_conntrack prints a tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (TCP/UDP/SCTP), or the ICMP identifier.
    pub sport: u16,
    /// Destination port (TCP/UDP/SCTP), or the ICMP type.
    pub dport: u16,
}

impl Connection {
    /// The tuple of the packet that opened the connection.
    pub fn original(&self) -> Tuple {
        let k = &self.key;
        let pod = ip_of(k.family, &k.pod_addr);
        let peer = ip_of(k.family, &k.peer_addr);
        if is_icmp(k.family, k.proto) {
            let (src, dst) = if self.entry.flags & CT_F_ORIG_INGRESS != 0 {
                (peer, pod)
            } else {
                (pod, peer)
            };
            return Tuple {
                src,
                dst,
                sport: k.pod_port,
                dport: k.peer_port & 0xff,
            };
        }
        if self.entry.flags & CT_F_ORIG_INGRESS != 0 {
            Tuple {
                src: peer,
                dst: pod,
                sport: k.peer_port,
                dport: k.pod_port,
            }
        } else {
            Tuple {
                src: pod,
                dst: peer,
                sport: k.pod_port,
                dport: k.peer_port,
            }
        }
    }

    /// The TCP state, `None` for other protocols.
    pub fn tcp_state(&self) -> Option<TcpState> {
        (self.key.proto == proto::TCP).then(|| TcpState::from_u8(self.entry.state))
    }

    /// Whether a reply was seen.
    pub fn seen_reply(&self) -> bool {
        self.entry.flags & CT_F_SEEN_REPLY != 0
    }

    /// Whether the node's own stack opened the connection towards the pod (`CT_F_FROM_HOST`).
    pub fn from_host(&self) -> bool {
        self.entry.from_host()
    }

    /// Whether the connection is assured.
    pub fn assured(&self) -> bool {
        self.entry.flags & CT_F_ASSURED != 0
    }

    /// Seconds left before the entry expires at `now_ns`, rounded down as the kernel prints it.
    pub fn remaining_secs(&self, now_ns: u64) -> u64 {
        self.entry.expires_ns.saturating_sub(now_ns) / 1_000_000_000
    }

    /// The `/proc/net/nf_conntrack` line for this connection at time `now_ns` (without newline).
    pub fn nf_conntrack_line(&self, now_ns: u64) -> String {
        let k = &self.key;
        let (l3, l3num) = if k.family == AF_INET6 {
            ("ipv6", 10)
        } else {
            ("ipv4", 2)
        };
        let l4 = match k.proto {
            proto::TCP => "tcp",
            proto::UDP => "udp",
            proto::ICMP => "icmp",
            proto::ICMPV6 => "icmpv6",
            proto::SCTP => "sctp",
            _ => "unknown",
        };
        let mut s = format!(
            "{l3:<8} {l3num} {l4:<8} {} {} ",
            k.proto,
            self.remaining_secs(now_ns)
        );
        if let Some(state) = self.tcp_state() {
            let _ = write!(s, "{} ", state.name());
        }
        let orig = self.original();
        let reply = self.reply();
        self.write_tuple(&mut s, &orig);
        if !self.seen_reply() {
            s.push_str("[UNREPLIED] ");
        }
        self.write_tuple(&mut s, &reply);
        if self.assured() {
            s.push_str("[ASSURED] ");
        }
        s.push_str("mark=0 zone=0 use=1");
        s
    }

    /// The tuple replies carry.
    pub fn reply(&self) -> Tuple {
        let o = self.original();
        if is_icmp(self.key.family, self.key.proto) {
            let request = o.dport as u8;
            let reply_type = match kubesg_common::conntrack::icmp_kind(self.key.family, request) {
                kubesg_common::conntrack::IcmpKind::Request(r) => r,
                _ => request,
            };
            return Tuple {
                src: o.dst,
                dst: o.src,
                sport: o.sport,
                dport: reply_type as u16,
            };
        }
        Tuple {
            src: o.dst,
            dst: o.src,
            sport: o.dport,
            dport: o.sport,
        }
    }

    fn write_tuple(&self, s: &mut String, t: &Tuple) {
        let _ = write!(s, "src={} dst={} ", fmt_addr(t.src), fmt_addr(t.dst));
        match self.key.proto {
            proto::TCP | proto::UDP | proto::SCTP => {
                let _ = write!(s, "sport={} dport={} ", t.sport, t.dport);
            }
            p if is_icmp(self.key.family, p) => {
                let _ = write!(s, "type={} code=0 id={} ", t.dport, t.sport);
            }
            _ => {}
        }
    }
}

/// Addresses as the kernel's `%pI4` / `%pI6` print them (IPv6 in full, zero-padded groups).
fn fmt_addr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(39);
            for (i, g) in v6.segments().iter().enumerate() {
                if i > 0 {
                    s.push(':');
                }
                let _ = write!(s, "{g:04x}");
            }
            s
        }
    }
}

/// Every entry of the table (expired ones included: the sweep removes those), in a stable order.
pub fn list(maps: &Maps) -> Result<Vec<Connection>, MapError> {
    let mut v: Vec<Connection> = entries(maps)?
        .into_iter()
        .map(|(key, entry)| Connection { key, entry })
        .collect();
    v.sort_by_key(|c| {
        (
            c.key.ifindex,
            c.key.family,
            c.key.proto,
            c.key.pod_addr,
            c.key.peer_addr,
            c.key.pod_port,
            c.key.peer_port,
        )
    });
    Ok(v)
}

/// Removes every entry (and fragment record) that expired before `now_ns`; returns how many
/// connections were removed. The datapath already treats them as absent: this frees the room
/// (the table evicts nothing by itself) and counts them off their endpoints' entry counts.
pub fn sweep(maps: &mut Maps, now_ns: u64) -> Result<usize, MapError> {
    sweep_with(maps, now_ns, |_| {})
}

/// [`sweep`], calling `between` after the expired entries were read and before they are
/// removed: where the datapath may re-open a connection under the same key (tests use it to
/// make that happen).
///
/// An entry is not deleted by its key, which might by then name a connection the datapath
/// opened since; it is taken out (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, one step in the kernel) and
/// put back when what came out is not the expired entry that was read but a live one. Only
/// while it is out, a syscall's length, does a packet of that new connection find no entry.
pub fn sweep_with(
    maps: &mut Maps,
    now_ns: u64,
    between: impl FnOnce(&mut Maps),
) -> Result<usize, MapError> {
    let dead: Vec<CtKey> = entries(maps)?
        .into_iter()
        .filter(|(_, e)| e.expired(now_ns))
        .map(|(k, _)| k)
        .collect();
    between(maps);
    let slots = counter_slots(maps)?;
    let mut removed = 0;
    for k in &dead {
        // None: the datapath removed it meanwhile (and counted it).
        let Some(entry) = take(maps.conntrack.map(), k)? else {
            continue;
        };
        if entry.expired(now_ns) {
            removed += 1;
            count_off(maps, &slots, k);
            continue;
        }
        // Live: a connection opened since the read. Back it goes, unless the datapath has
        // written it again meanwhile (then its own copy is the newer, and counted: the one
        // taken out is one entry fewer).
        match insert_if_absent(&mut maps.conntrack, *k, entry) {
            Ok(true) => {}
            Ok(false) => count_off(maps, &slots, k),
            Err(e) => {
                count_off(maps, &slots, k);
                return Err(e);
            }
        }
    }
    let stale: Vec<_> = maps
        .fragments
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| v.expires_ns <= now_ns)
        .map(|(k, _)| k)
        .collect();
    for k in &stale {
        match maps.fragments.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Every conntrack entry: in batches where the kernel has them (a few system calls for the
/// whole table), else entry by entry.
fn entries(maps: &Maps) -> Result<Vec<(CtKey, CtEntry)>, MapError> {
    match map_batch::read_all(maps.conntrack.map()) {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => maps.conntrack.iter().collect(),
        Err(e) => Err(MapError::IoError(e)),
    }
}

/// Each endpoint's counter slot, by interface index: whose count an entry's key belongs to.
fn counter_slots(maps: &Maps) -> Result<std::collections::HashMap<u32, u32>, MapError> {
    maps.endpoints
        .iter()
        .map(|r| r.map(|(ifindex, ep)| (ifindex, ep.counter_slot)))
        .collect()
}

/// One entry fewer for the endpoint of `key` (none when the endpoint is gone: its slot is
/// zeroed before it serves another).
fn count_off(maps: &Maps, slots: &std::collections::HashMap<u32, u32>, key: &CtKey) {
    if let Some(slot) = slots.get(&key.ifindex) {
        maps.ct_counts.add(*slot, -1);
    }
}

/// Inserts `entry` under `key` unless the table already has an entry there, which is then
/// newer (the datapath wrote it) and kept; whether it inserted.
pub(crate) fn insert_if_absent(
    table: &mut HashMap<MapData, CtKey, CtEntry>,
    key: CtKey,
    entry: CtEntry,
) -> Result<bool, MapError> {
    /// `BPF_NOEXIST`: insert only where there is no entry.
    const BPF_NOEXIST: u64 = 1;
    match table.insert(key, entry, BPF_NOEXIST) {
        Ok(()) => Ok(true),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (Linux 5.14 for hash maps).
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// Takes the entry under `key` out of the conntrack map in one step: the entry that was
/// deleted, `None` when there was none. aya 0.14 has no call for it on hash maps.
fn take(map: &aya::maps::MapData, key: &CtKey) -> Result<Option<CtEntry>, MapError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    /// The `bpf_attr` of the map element commands.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = std::mem::MaybeUninit::<CtEntry>::zeroed();
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const CtKey as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command, its size is passed; the key
    // and value pointers are live and of the map's key and value sizes (the map was checked to
    // be of these types when opened).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r == 0 {
        // SAFETY: the kernel wrote the whole value (value_size bytes) on success.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(MapError::IoError(e))
    }
}

/// Removes every entry, or those of one endpoint; returns how many.
pub fn flush(maps: &mut Maps, ifindex: Option<u32>) -> Result<usize, MapError> {
    let keys: Vec<CtKey> = maps
        .conntrack
        .keys()
        .filter_map(Result::ok)
        .filter(|k| ifindex.is_none_or(|i| k.ifindex == i))
        .collect();
    let slots = counter_slots(maps)?;
    let mut removed = 0;
    for k in &keys {
        match maps.conntrack.remove(k) {
            Ok(()) => {
                removed += 1;
                count_off(maps, &slots, k);
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// A background thread that sweeps expired entries every `interval` until dropped (give it its
/// own handles: [`Maps::try_clone`]). The datapath
/// treats expired entries as absent already; sweeping frees their room (nothing else does: the
/// table is not an LRU) and keeps `ct list` short.
pub struct Sweeper {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// See [`Sweeper::start`]: the most the datapath's clock can be behind CLOCK_MONOTONIC
/// ([`crate::clock::MAX_LAG_TICKS`] ticks) at the slowest tick rate, HZ=100, with margin.
const SWEEP_GRACE_NS: u64 = 100_000_000;

impl Sweeper {
    /// Starts sweeping `maps` every `interval`.
    pub fn start(mut maps: Maps, interval: std::time::Duration) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || loop {
            match stopped.recv_timeout(interval) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            // Entries are removed a little after they expire: the datapath's clock is behind
            // CLOCK_MONOTONIC by up to a tick (a few more when the kernel stalls jiffies,
            // `crate::clock`), and an entry must never go while it still counts as live there.
            // Expired entries are absent to the datapath either way.
            let now = crate::clock::now_ns().saturating_sub(SWEEP_GRACE_NS);
            match sweep(&mut maps, now) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "conntrack sweep"),
                Err(e) => tracing::warn!(error = %e, "conntrack sweep failed"),
            }
        });
        Sweeper {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubesg_common::{conntrack::TcpState, AF_INET};

    fn v4(a: [u8; 4]) -> [u32; 4] {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    #[test]
    fn unreplied_tcp_connection_prints_like_nf_conntrack() {
        let c = Connection {
            key: CtKey {
                ifindex: 7,
                family: AF_INET,
                proto: proto::TCP,
                pod_port: 38822,
                peer_port: 23,
                _pad: 0,
                pod_addr: v4([192, 168, 1, 5]),
                peer_addr: v4([192, 168, 1, 7]),
            },
            entry: CtEntry {
                expires_ns: 117_500_000_000,
                created_ns: 0,
                policy_id: 1,
                state: TcpState::SynSent as u8,
                flags: 0,
                ..CtEntry::default()
            },
        };
        assert_eq!(
            c.nf_conntrack_line(0),
            "ipv4     2 tcp      6 117 SYN_SENT src=192.168.1.5 dst=192.168.1.7 sport=38822 \
             dport=23 [UNREPLIED] src=192.168.1.7 dst=192.168.1.5 sport=23 dport=38822 \
             mark=0 zone=0 use=1"
        );
    }

    #[test]
    fn inbound_icmpv6_echo_prints_full_addresses_and_reply_type() {
        let mut pod = [0u8; 16];
        pod[0] = 0xfd;
        pod[15] = 7;
        let mut peer = pod;
        peer[15] = 5;
        let raw = |b: [u8; 16]| -> [u32; 4] {
            [0, 4, 8, 12].map(|i| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]))
        };
        let c = Connection {
            key: CtKey {
                ifindex: 7,
                family: AF_INET6,
                proto: proto::ICMPV6,
                pod_port: 3558,
                peer_port: 128 | (1 << 8),
                _pad: 0,
                pod_addr: raw(pod),
                peer_addr: raw(peer),
            },
            entry: CtEntry {
                expires_ns: 29_000_000_000,
                created_ns: 0,
                policy_id: 0,
                state: 0,
                flags: CT_F_ORIG_INGRESS | CT_F_SEEN_REPLY,
                ..CtEntry::default()
            },
        };
        assert_eq!(
            c.nf_conntrack_line(0),
            "ipv6     10 icmpv6   58 29 src=fd00:0000:0000:0000:0000:0000:0000:0005 \
             dst=fd00:0000:0000:0000:0000:0000:0000:0007 type=128 code=0 id=3558 \
             src=fd00:0000:0000:0000:0000:0000:0000:0007 \
             dst=fd00:0000:0000:0000:0000:0000:0000:0005 type=129 code=0 id=3558 \
             mark=0 zone=0 use=1"
        );
    }
}
