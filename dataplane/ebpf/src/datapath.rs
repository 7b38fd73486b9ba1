//! The per-packet pipeline: parse → conntrack → (NEW? policy : state verdict) → count, report.

use core::{
    intrinsics::AtomicOrdering,
    sync::atomic::{compiler_fence, Ordering},
};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_skb_load_bytes},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use kubesg_common::{
    config::{timeout, ClockSample, Config, CFG_DENY_EVENTS, CFG_RECHECK_ON_POLICY_CHANGE},
    conntrack::{
        icmp_kind, is_icmp, room_for_one_more, start_tracking, track_packet, CtEntry, CtKey,
        CtState, IcmpKind, Segment, Step, CT_F_FROM_HOST,
    },
    endpoint::{cache_slot, Endpoint},
    event::{Counters, DenyEvent, DenyReason},
    fragment::{FragKey, FragVerdict},
    limits,
    parse::{
        has_tcp_options_to_walk, parse_head_first_into, parse_icmp_error_inner,
        parse_tcp_option_bytes, Frame, Malformed, Packet, TcpFields, TcpOptionBytes, FRAG_FIRST,
        FRAG_LATER, TCP_MAX_OPTION_BYTES,
    },
    policy::{from_host, layered_allows, ClassSet, LayersKey, PolicyQuery},
    source::{not_ip, sent_as_itself, NotIp, SourceKey, SRC_F_CHECK},
    Direction, AF_INET6,
};

use crate::maps::{
    CLOCK, CONFIG, CONNTRACK, COUNTERS, CT_COUNTS, CT_SCRATCH, DENY_EVENTS, ENDPOINTS,
    ENDPOINT_CACHE, FRAGMENTS, PACKET, POLICY_HOSTS, POLICY_LAYERS, POLICY_PEERS, POLICY_PORTS,
    SOURCES, TCP_OPTIONS,
};

/// Accept, and let any later program on the hook have its say (tcx: TCX_NEXT; clsact: continue).
pub const ACCEPT: i32 = TC_ACT_UNSPEC;
/// Drop.
pub const DROP: i32 = TC_ACT_SHOT;

/// An skb read through `bpf_skb_load_bytes`: every read is bounds-checked by the kernel, whatever
/// the offset, which keeps variable-length headers simple for the verifier. For headers past the
/// linear part (see [`LinearFrame`]) and for ICMP errors' quoted headers.
pub struct SkbFrame<'a>(pub &'a TcContext);

impl Frame for SkbFrame<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        self.0.load::<T>(off).ok()
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        is_gso(self.0)
    }
}

/// Whether the skb is a GSO super-packet: one load of `__sk_buff.gso_size`.
#[inline(always)]
fn is_gso(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is the skb the kernel handed the program.
    unsafe { (*ctx.skb.skb).gso_size != 0 }
}

/// The linear part of an skb (all of most packets; the headers of GSO packets, whose payload is
/// paged), read in place: a bounds check the verifier follows, then a load. A read past it is
/// `None`, as if the packet ended there; [`parse_frame`] then parses again through the helper. A
/// helper call is the dearest thing on the per-packet path on kernels with return-thunk
/// mitigations, and a TCP/IPv4 header takes about ten reads.
///
/// The packet pointers are loaded afresh for each read and never kept: a pointer held across
/// reads carries the range its last check proved, and paths that differ only in it are not pruned
/// by the verifier.
pub struct LinearFrame<'a>(pub &'a TcContext);

/// Offsets past this are not read in place: bounds the offsets the verifier must track on a
/// packet pointer (its limit is 0xffff).
const MAX_LINEAR: usize = 0xffff;

impl Frame for LinearFrame<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }

    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        if off > MAX_LINEAR {
            return None;
        }
        // Hidden from LLVM, which would otherwise turn `at + 1 <= end` into `at < end`, from
        // which the verifier learns no readable range.
        let size = core::hint::black_box(core::mem::size_of::<T>());
        let at = self.0.data() + off;
        if at + size > self.0.data_end() {
            return None;
        }
        // SAFETY: the bytes lie inside the skb's linear data, as checked just above (and by the
        // verifier); the read is unaligned.
        Some(unsafe { core::ptr::read_unaligned(at as *const T) })
    }

    #[inline(always)]
    fn is_gso(&self) -> bool {
        is_gso(self.0)
    }
}

/// Parses the packet in place, and again through the helper only when that ran past the linear
/// part (see [`parse_head_first`]).
///
/// The packet goes to this CPU's slot of `PACKET`, not onto the stack, which the conntrack entry
/// and the rules need. `None` when that slot cannot be had (never, for index 0).
#[inline(always)]
fn parse_frame(ctx: &TcContext) -> Option<(Result<bool, Malformed>, &'static mut Packet)> {
    let slot = PACKET.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of a per-CPU array; tc programs run with bottom halves disabled,
    // so no other run of them on this CPU uses it until this one ends.
    let pkt = unsafe { &mut *slot };
    Some((
        parse_head_first_into(&LinearFrame(ctx), &SkbFrame(ctx), pkt),
        pkt,
    ))
}

/// What became of a packet, for the counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accept,
    AcceptNew,
    AcceptRelated,
    /// INVALID on an endpoint that is not filtered.
    AcceptInvalid,
    /// A NEW connection of an endpoint that is not filtered, passed untracked: no room in the
    /// table (see [`no_room`]).
    AcceptUntracked,
    Drop(DenyReason),
}

/// Runs the pipeline for a packet crossing a pod's interface in `dir`.
#[inline(always)]
pub fn run(ctx: &TcContext, dir: Direction) -> i32 {
    // SAFETY: the context pointer is the skb the kernel handed the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ep = match endpoint(ifindex) {
        Some(ep) => ep,
        None => {
            count(limits::ENDPOINTS, dir, Verdict::Accept);
            return ACCEPT;
        }
    };
    let cfg = match CONFIG.get(0) {
        Some(cfg) => cfg,
        None => return ACCEPT,
    };
    let frame = SkbFrame(ctx);
    // What the pod sends must be sent as itself (crate `kubesg_common::source`), member or not.
    let checked = dir == Direction::Egress && ep.sources & SRC_F_CHECK != 0;
    let Some((parsed, pkt)) = parse_frame(ctx) else {
        return finish(
            invalid(&ep, DenyReason::Malformed),
            &ep,
            ifindex,
            dir,
            None,
            cfg,
        );
    };
    match parsed {
        Ok(true) => {}
        Ok(false) => {
            let v = if checked && not_ip(&ep, ifindex, &frame, is_source) == NotIp::SpoofedArp {
                Verdict::Drop(DenyReason::Spoofed)
            } else {
                Verdict::Accept
            };
            return finish(v, &ep, ifindex, dir, None, cfg);
        }
        Err(_) => {
            // A checked pod's packet whose source cannot be read is refused, member or not.
            let v = if checked {
                Verdict::Drop(DenyReason::Malformed)
            } else {
                invalid(&ep, DenyReason::Malformed)
            };
            return finish(v, &ep, ifindex, dir, None, cfg);
        }
    }
    if checked && !sent_as_itself(&ep, ifindex, pkt, &frame, is_source) {
        return finish(
            Verdict::Drop(DenyReason::Spoofed),
            &ep,
            ifindex,
            dir,
            Some(pkt),
            cfg,
        );
    }
    if has_tcp_options_to_walk(pkt) {
        // SYNs and SACKs: what window tracking needs of the options.
        tcp_options(ctx, pkt);
    }
    let pkt: &Packet = pkt;
    let v = if pkt.frag == FRAG_LATER {
        later_fragment(&ep, ifindex, pkt, cfg)
    } else {
        let v = if ep.is_stateless() {
            stateless(ctx, &ep, dir, pkt)
        } else {
            stateful(ctx, &frame, &ep, ifindex, dir, pkt, cfg)
        };
        if pkt.frag == FRAG_FIRST {
            remember_fragment(ifindex, pkt, v, cfg);
        }
        v
    };
    finish(v, &ep, ifindex, dir, Some(pkt), cfg)
}

/// The datapath's clock (CLOCK_MONOTONIC at the start of the tick, as the agent calibrated the
/// tick clock, see [`Config::tick_ns`]): one load of `jiffies_64`, which the verifier inlines,
/// rather than a helper call on every packet.
#[inline(always)]
fn now(cfg: &Config) -> u64 {
    // SAFETY: reading the clocks has no preconditions.
    match cfg.tick_clock_ns(unsafe { bpf_jiffies64() }) {
        Some(t) => t,
        None => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// Reads the kernel's clocks into `CLOCK`, for the agent (the `clock` program, run with
/// BPF_PROG_TEST_RUN, never attached).
#[inline(always)]
pub fn sample_clock() -> i32 {
    if let Some(slot) = CLOCK.get_ptr_mut(0) {
        // SAFETY: reading the clocks has no preconditions; the slot is a live map value.
        unsafe {
            let jiffies = bpf_jiffies64();
            *slot = ClockSample {
                jiffies,
                coarse_ns: bpf_ktime_get_coarse_ns(),
                mono_ns: bpf_ktime_get_ns(),
            };
        }
    }
    ACCEPT
}

/// The endpoint on `ifindex`: from its cache slot when it owns it and was not being rewritten
/// while read (an inlined array access; see `CachedEndpoint::seq`), otherwise from `ENDPOINTS`.
#[inline(always)]
fn endpoint(ifindex: u32) -> Option<Endpoint> {
    if let Some(c) = ENDPOINT_CACHE.get_ptr(cache_slot(ifindex)) {
        // SAFETY: a live array slot. The count's reads are volatile (real loads, not merged)
        // and compiler fences keep the slot's reads between them; the CPU keeps loads in order
        // on x86-64 (see docs/architecture.md on arm64).
        unsafe {
            let seq = core::ptr::read_volatile(&(*c).seq);
            compiler_fence(Ordering::Acquire);
            if seq & 1 == 0 && (*c).ifindex == ifindex {
                let ep = (*c).endpoint;
                compiler_fence(Ordering::Acquire);
                if core::ptr::read_volatile(&(*c).seq) == seq {
                    return Some(ep);
                }
            }
        }
    }
    // SAFETY: the endpoint value is plain data, copied out at once.
    unsafe { ENDPOINTS.get(ifindex) }.copied()
}

/// Whether `key` is one of the further addresses of a pod (`SOURCES`).
#[inline(always)]
fn is_source(key: &SourceKey) -> bool {
    // SAFETY: only the key's presence is read.
    unsafe { SOURCES.get(key) }.is_some()
}

/// Parses only, for the benchmark's baseline: the same parse work, no lookups. The fields are
/// folded into the return value so that none of the loads can be optimised away.
#[inline(always)]
pub fn parse_only(ctx: &TcContext) -> i32 {
    match parse_frame(ctx) {
        Some((Ok(true), p)) => {
            let fold = p.src[0]
                ^ p.src[3]
                ^ p.dst[0]
                ^ p.dst[3]
                ^ ((p.sport as u32) << 16 | p.dport as u32)
                ^ ((p.proto as u32) << 8 | p.tcp_flags as u32);
            if fold == 0x5eed_5eed {
                DROP
            } else {
                ACCEPT
            }
        }
        Some((Ok(false), _)) => ACCEPT,
        _ => DROP,
    }
}

/// Parses and looks the packet's flow up in `CONNTRACK` once (endpoint ifindex 1, egress): the
/// benchmark subtracts `parse_only` from it to price one map lookup.
#[inline(always)]
pub fn parse_lookup(ctx: &TcContext) -> i32 {
    match parse_frame(ctx) {
        Some((Ok(true), p)) => {
            let key = CtKey::for_packet(1, Direction::Egress, p);
            // SAFETY: the value is plain data, only tested for presence.
            match unsafe { CONNTRACK.get(key) } {
                Some(e) if e.expires_ns == 0x5eed_5eed => DROP,
                _ => ACCEPT,
            }
        }
        Some((Ok(false), _)) => ACCEPT,
        _ => DROP,
    }
}

#[inline(always)]
fn finish(
    v: Verdict,
    ep: &Endpoint,
    ifindex: u32,
    dir: Direction,
    pkt: Option<&Packet>,
    cfg: &Config,
) -> i32 {
    count(ep.counter_slot, dir, v);
    match v {
        Verdict::Drop(reason) => {
            if cfg.flags & CFG_DENY_EVENTS != 0 {
                report(ep, ifindex, dir, pkt, reason, cfg);
            }
            DROP
        }
        _ => ACCEPT,
    }
}

#[inline(always)]
fn invalid(ep: &Endpoint, reason: DenyReason) -> Verdict {
    if ep.is_member() {
        Verdict::Drop(reason)
    } else {
        Verdict::AcceptInvalid
    }
}

/// Whether the packet in `ctx`, crossing the pod's interface in `dir`, was sent by the node's
/// own network stack (see [`from_host`]): one load of `skb->skb_iif`.
#[inline(always)]
fn packet_from_host(ctx: &TcContext, dir: Direction) -> bool {
    // SAFETY: the context pointer is the skb the kernel handed the program.
    from_host(dir, unsafe { (*ctx.skb.skb).ingress_ifindex })
}

/// Whether `ep`'s policy allows the connection `q` describes. Unlayered policies: one lookup in
/// each trie, then the intersection of the two class sets. Layered ones also read their
/// `POLICY_LAYERS` entry, whose absence refuses (fail closed). No loop over rules or peers.
/// `from_host` is asked only of layered policies.
#[inline(always)]
fn allowed(ep: &Endpoint, q: &PolicyQuery, from_host: impl FnOnce() -> bool) -> bool {
    if ep.is_layered() {
        layered(ep.policy_id, q, from_host())
    } else {
        unlayered(ep.policy_id, q)
    }
}

/// The two lookups of an unlayered policy, allowed iff both hit and their classes meet.
#[inline(always)]
fn unlayered(policy_id: u32, q: &PolicyQuery) -> bool {
    let (len, data) = q.port_key(policy_id);
    let ports = match POLICY_PORTS.get(Key::new(len, data)) {
        Some(c) => *c,
        None => return false,
    };
    let (len, data) = q.peer_key(policy_id);
    // SAFETY: the value is plain data, copied out at once.
    if let Some(peers) = unsafe { POLICY_HOSTS.get(data) } {
        return peers.intersects(&ports);
    }
    match POLICY_PEERS.get(Key::new(len, data)) {
        Some(peers) => peers.intersects(&ports),
        None => false,
    }
}

/// A layered policy: the classes allowing the connection (a missed lookup allows none), judged
/// layer by layer ([`layered_allows`]). The layers are read first: a direction that requires no
/// layer needs no trie lookup.
#[inline(always)]
fn layered(policy_id: u32, q: &PolicyQuery, from_host: bool) -> bool {
    // SAFETY: the value is plain data, copied out at once.
    let layers = match unsafe { POLICY_LAYERS.get(LayersKey::new(policy_id, q.direction)) } {
        Some(l) => *l,
        None => return false,
    };
    if layers.count == 0 {
        return true;
    }
    let (len, data) = q.port_key(policy_id);
    let classes = match POLICY_PORTS.get(Key::new(len, data)) {
        Some(ports) => {
            let (len, data) = q.peer_key(policy_id);
            // SAFETY: the value is plain data, copied out at once.
            match unsafe { POLICY_HOSTS.get(data) } {
                Some(peers) => peers.and(ports),
                None => match POLICY_PEERS.get(Key::new(len, data)) {
                    Some(peers) => peers.and(ports),
                    None => ClassSet::default(),
                },
            }
        }
        None => ClassSet::default(),
    };
    layered_allows(&classes, &layers, from_host)
}

/// Stateless endpoints: every packet is judged by the rules of its direction, nothing is tracked.
#[inline(always)]
fn stateless(ctx: &TcContext, ep: &Endpoint, dir: Direction, pkt: &Packet) -> Verdict {
    if !ep.is_member()
        || (is_icmp(pkt.family, pkt.proto)
            && icmp_kind(pkt.family, pkt.icmp_type) == IcmpKind::Untracked)
    {
        return Verdict::Accept;
    }
    if allowed(ep, &PolicyQuery::for_packet(dir, pkt), || {
        packet_from_host(ctx, dir)
    }) {
        Verdict::Accept
    } else {
        Verdict::Drop(DenyReason::Policy)
    }
}

#[inline(always)]
fn stateful<F: Frame>(
    ctx: &TcContext,
    frame: &F,
    ep: &Endpoint,
    ifindex: u32,
    dir: Direction,
    pkt: &Packet,
    cfg: &Config,
) -> Verdict {
    if is_icmp(pkt.family, pkt.proto) {
        match icmp_kind(pkt.family, pkt.icmp_type) {
            IcmpKind::Untracked => return Verdict::Accept,
            IcmpKind::Error => return related(frame, ep, ifindex, dir, pkt, cfg),
            IcmpKind::Other => return invalid(ep, DenyReason::Invalid),
            IcmpKind::Request(_) | IcmpKind::Reply(_) => {}
        }
    }
    let key = CtKey::for_packet(ifindex, dir, pkt);
    let seg = Segment::of(pkt);
    let now = now(cfg);
    let Some(scratch) = CT_SCRATCH.get_ptr_mut(0) else {
        return invalid(ep, DenyReason::Invalid);
    };
    // SAFETY: this CPU's slot of a per-CPU array; tc programs run with bottom halves disabled,
    // so no other run of them on this CPU uses it until this one ends.
    let entry = unsafe { &mut *scratch };
    if let Some(slot) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: the pointer is to a live map value. The tracker works on it in place, as the
        // kernel works on its conntrack entry (what it writes before finding a segment INVALID
        // stays, there as here), but without the kernel's per-connection lock: segments of one
        // connection are handled at the same instant on two CPUs, so the window fields that
        // only move forward are stored with compare-and-swap (kubesg_common::forward).
        let live = unsafe { &mut *slot };
        if !live.expired(now) {
            let step = Step::from_code(kubesg_track(slot, &seg, dir as u32, now, cfg));
            let state = match step {
                Step::Invalid | Step::InvalidNoted => return invalid(ep, DenyReason::Invalid),
                Step::Reopen => {
                    // The closed connection goes whether or not the rules admit the new one.
                    forget(ep, &key);
                    return open(ctx, ep, &key, &seg, dir, pkt, now, cfg, entry);
                }
                Step::Update(s) | Step::Delete(s) => s,
            };
            if ep.is_member() {
                if state == CtState::New {
                    // Until a reply is seen, packets in the original direction are NEW and the
                    // rules judge each of them (as iptables' `--ctstate NEW` rules would).
                    if !allowed(ep, &PolicyQuery::for_packet(dir, pkt), || live.from_host()) {
                        // Admitted under earlier rules, refused now: a refused connection leaves
                        // no state behind.
                        forget(ep, &key);
                        return Verdict::Drop(DenyReason::Policy);
                    }
                } else if live.policy_id != ep.policy_id
                    && cfg.flags & CFG_RECHECK_ON_POLICY_CHANGE != 0
                    && !allowed(ep, &PolicyQuery::for_entry(&key, live), || live.from_host())
                {
                    // The rules changed since this connection was admitted and no longer allow
                    // it: cut it, as Neutron deletes the conntrack entries of removed rules.
                    forget(ep, &key);
                    return Verdict::Drop(DenyReason::PolicyChanged);
                }
            }
            live.policy_id = ep.policy_id;
            if let Step::Delete(_) = step {
                forget(ep, &key);
            }
            return Verdict::Accept;
        }
        // Expired: absent to every packet. It goes now rather than at the next sweep, so that
        // the insert below needs no overwrite (which the endpoint's count could not tell from
        // a new entry).
        forget(ep, &key);
    }
    open(ctx, ep, &key, &seg, dir, pkt, now, cfg, entry)
}

/// Removes the entry under `key`, and counts one entry fewer for `ep` when there was one (none:
/// another CPU or the agent's sweep removed it first, and counted it).
#[inline(always)]
fn forget(ep: &Endpoint, key: &CtKey) {
    if CONNTRACK.remove(key).is_ok() {
        add_entries(ep.counter_slot, u64::MAX);
    }
}

/// Adds `delta` (wrapping: `u64::MAX` is one fewer) to the entries counted for the endpoint in
/// `counter_slot`: one atomic add (`lock xadd`), as every CPU and the agent write the count.
/// Through the intrinsic: the BPF target has atomic adds but no compare-and-swap, so `core`
/// gives its `AtomicU64` loads and stores only.
#[inline(always)]
fn add_entries(counter_slot: u32, delta: u64) {
    if let Some(p) = CT_COUNTS.get_ptr_mut(counter_slot) {
        // SAFETY: a live, aligned array value, written only with atomic operations.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta);
        }
    }
}

/// The entries counted for the endpoint in `counter_slot`.
#[inline(always)]
fn entries_held(counter_slot: u32) -> u64 {
    match CT_COUNTS.get_ptr(counter_slot) {
        // SAFETY: a live, aligned array value, written only with atomic operations; an aligned
        // 8-byte load is whole (the BPF target has no atomic load before cpu v4).
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => 0,
    }
}

/// A NEW connection the table has no room for: refused for a member, as nf_conntrack drops a
/// packet when its table is full and nothing can be evicted; passed untracked for an endpoint
/// that is not filtered (it loses only what tracking buys: its flows are not known should it
/// become a member). Counted as `conntrack_full` either way.
#[inline(always)]
fn no_room(ep: &Endpoint) -> Verdict {
    if ep.is_member() {
        Verdict::Drop(DenyReason::ConntrackFull)
    } else {
        Verdict::AcceptUntracked
    }
}

/// Moves a tracked connection's entry on one packet ([`track_packet`]; see [`Step::code`]).
///
/// A global function: the verifier checks it once, on its own, and its callers see a number.
/// Inlined, TCP window tracking's many independent branches multiplied with the paths of the
/// parser and of the rules after it, past the verifier's budget of a million instructions.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn kubesg_track(
    entry: *mut CtEntry,
    seg: *const Segment,
    dir: u32,
    now: u64,
    cfg: *const Config,
) -> u32 {
    // SAFETY: the callers pass a live CONNTRACK value, a segment on their stack and the CONFIG
    // map's value; a global function must still check each for null.
    let (Some(entry), Some(seg), Some(cfg)) =
        (unsafe { (entry.as_mut(), seg.as_ref(), cfg.as_ref()) })
    else {
        return Step::Invalid.code();
    };
    track_packet(entry, seg, Direction::from_u8(dir as u8), now, cfg).code()
}

/// Reads the TCP options of `pkt` into its `tcp` fields: one skb helper call copies them to this
/// CPU's `TCP_OPTIONS` slot, and [`kubesg_tcp_options`] walks them. Options that cannot be read
/// are left out, as a truncated option list is in the kernel.
#[inline(always)]
fn tcp_options(ctx: &TcContext, pkt: &mut Packet) {
    let Some(buf) = TCP_OPTIONS.get_ptr_mut(0) else {
        return;
    };
    let len = (pkt.tcp.opt_len as u32) & 0x3f;
    if len == 0 || len > TCP_MAX_OPTION_BYTES as u32 {
        return;
    }
    let off = pkt.l4_off + 20;
    // SAFETY: the destination is this CPU's slot, `len` (1 to 40) bytes fit in it.
    let copied = unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), off, buf.cast(), len) };
    if copied == 0 {
        kubesg_tcp_options(buf, len, &mut pkt.tcp);
    }
}

/// Walks the TCP options in `opts` ([`parse_tcp_option_bytes`]). A global function, for the same
/// reason as [`kubesg_track`]: its loop of up to 40 steps, inlined, would be verified once for
/// each path of the parser and the source check around it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn kubesg_tcp_options(
    opts: *const TcpOptionBytes,
    len: u32,
    tcp: *mut TcpFields,
) -> u32 {
    // SAFETY: the caller passes this CPU's TCP_OPTIONS slot and the per-CPU packet's fields; a
    // global function must still check each for null.
    let (Some(opts), Some(tcp)) = (unsafe { (opts.as_ref(), tcp.as_mut()) }) else {
        return 0;
    };
    parse_tcp_option_bytes(opts, len as usize, tcp);
    0
}

/// A packet with no live entry: it opens a connection if it can and the rules allow it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn open(
    ctx: &TcContext,
    ep: &Endpoint,
    key: &CtKey,
    seg: &Segment,
    dir: Direction,
    pkt: &Packet,
    now: u64,
    cfg: &Config,
    entry: &mut CtEntry,
) -> Verdict {
    if !start_tracking(entry, seg, dir, now, cfg) {
        return invalid(ep, DenyReason::Invalid);
    }
    if ep.is_member()
        && !allowed(ep, &PolicyQuery::for_packet(dir, pkt), || {
            packet_from_host(ctx, dir)
        })
    {
        // A refused connection leaves no state behind.
        return Verdict::Drop(DenyReason::Policy);
    }
    // Recorded whatever the policy (one load per accepted connection; a refused one, which
    // unlayered policies decide exactly as before, costs nothing more): a connection the node
    // opened keeps its NetworkPolicies exemption when the pod later gets a layered policy.
    if packet_from_host(ctx, dir) {
        entry.flags |= CT_F_FROM_HOST;
    }
    entry.policy_id = ep.policy_id;
    if !room_for_one_more(entries_held(ep.counter_slot), cfg.ct_endpoint_limit) {
        return no_room(ep);
    }
    // By reference: the entry is not copied onto the stack. Never over an entry: nothing live
    // is evicted to make room.
    let value: &CtEntry = entry;
    match CONNTRACK.insert(key, value, BPF_NOEXIST as u64) {
        Ok(()) => {
            add_entries(ep.counter_slot, 1);
            Verdict::AcceptNew
        }
        // Another CPU opened the same connection at this instant: its entry stands.
        Err(e) if i64::from(e) == -EEXIST => Verdict::AcceptNew,
        // -E2BIG: the table is full.
        Err(_) => no_room(ep),
    }
}

/// `EEXIST`, as map helpers return it (negated).
const EEXIST: i64 = 17;

/// An ICMP error is RELATED when the packet it quotes belongs to a live connection of this
/// endpoint. The quoted packet travelled the other way.
#[inline(always)]
fn related<F: Frame>(
    frame: &F,
    ep: &Endpoint,
    ifindex: u32,
    dir: Direction,
    pkt: &Packet,
    cfg: &Config,
) -> Verdict {
    let inner = match parse_icmp_error_inner(frame, pkt) {
        Some(i) => i,
        None => return invalid(ep, DenyReason::UnrelatedIcmp),
    };
    if inner.src != pkt.dst {
        // An error goes back to the sender of the packet it quotes (nf_conntrack_inet_error):
        // otherwise "errors" about a tracked flow could reach any address.
        return invalid(ep, DenyReason::UnrelatedIcmp);
    }
    let key = CtKey::for_packet(ifindex, dir.reverse(), &inner);
    let now = now(cfg);
    // SAFETY: the value is plain data, read once.
    match unsafe { CONNTRACK.get(key) } {
        Some(e) if !e.expired(now) => Verdict::AcceptRelated,
        _ => invalid(ep, DenyReason::UnrelatedIcmp),
    }
}

#[inline(always)]
fn frag_key(ifindex: u32, pkt: &Packet) -> FragKey {
    FragKey {
        ifindex,
        id: pkt.frag_id,
        family: pkt.family,
        // IPv6 identifies a datagram by its addresses and identification alone (RFC 8200 §4.5):
        // a later fragment's Fragment header names the header after it (destination options,
        // say), not the layer 4 protocol its first fragment found.
        proto: if pkt.family == AF_INET6 { 0 } else { pkt.proto },
        _pad: [0; 2],
        src: pkt.src,
        dst: pkt.dst,
    }
}

#[inline(always)]
fn remember_fragment(ifindex: u32, pkt: &Packet, v: Verdict, cfg: &Config) {
    let now = now(cfg);
    let accepted = !matches!(v, Verdict::Drop(_));
    let verdict = FragVerdict {
        expires_ns: now.saturating_add(cfg.timeout(timeout::FRAGMENT)),
        accepted: accepted as u64,
    };
    let _ = FRAGMENTS.insert(frag_key(ifindex, pkt), verdict, BPF_ANY as u64);
}

#[inline(always)]
fn later_fragment(ep: &Endpoint, ifindex: u32, pkt: &Packet, cfg: &Config) -> Verdict {
    let now = now(cfg);
    // SAFETY: the value is plain data, read once.
    match unsafe { FRAGMENTS.get(frag_key(ifindex, pkt)) } {
        Some(v) if v.expires_ns > now => {
            if v.accepted != 0 {
                Verdict::Accept
            } else if ep.is_member() {
                Verdict::Drop(DenyReason::Fragment)
            } else {
                Verdict::Accept
            }
        }
        _ => invalid(ep, DenyReason::Fragment),
    }
}

#[inline(always)]
fn count(counter_slot: u32, dir: Direction, v: Verdict) {
    let idx = counter_slot.wrapping_mul(2).wrapping_add(dir as u32);
    let c: &mut Counters = match COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot: no other writer while this program runs on this CPU.
        Some(p) => unsafe { &mut *p },
        None => return,
    };
    match v {
        Verdict::Accept => c.accepted += 1,
        Verdict::AcceptNew => {
            c.accepted += 1;
            c.new_connections += 1;
        }
        Verdict::AcceptRelated => {
            c.accepted += 1;
            c.related += 1;
        }
        Verdict::AcceptInvalid => {
            c.accepted += 1;
            c.invalid_passed += 1;
        }
        Verdict::AcceptUntracked => {
            c.accepted += 1;
            c.conntrack_full += 1;
        }
        Verdict::Drop(DenyReason::Policy) | Verdict::Drop(DenyReason::PolicyChanged) => {
            c.dropped_policy += 1
        }
        Verdict::Drop(DenyReason::Spoofed) => c.dropped_spoofed += 1,
        Verdict::Drop(DenyReason::ConntrackFull) => c.conntrack_full += 1,
        Verdict::Drop(_) => c.dropped_invalid += 1,
    }
}

#[inline(always)]
fn report(
    ep: &Endpoint,
    ifindex: u32,
    dir: Direction,
    pkt: Option<&Packet>,
    reason: DenyReason,
    cfg: &Config,
) {
    let mut slot = match DENY_EVENTS.reserve::<DenyEvent>(0) {
        Some(s) => s,
        None => return,
    };
    let mut ev = DenyEvent {
        ts_ns: now(cfg),
        ifindex,
        policy_id: ep.policy_id,
        direction: dir as u8,
        reason: reason as u8,
        ..DenyEvent::default()
    };
    if let Some(p) = pkt {
        ev.family = p.family;
        ev.proto = p.proto;
        ev.sport = p.sport;
        ev.dport = p.dport;
        ev.src = p.src;
        ev.dst = p.dst;
    }
    slot.write(ev);
    slot.submit(0);
}
