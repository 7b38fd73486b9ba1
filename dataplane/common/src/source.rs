//! The source check (anti-spoofing): what a pod may send as, judged on `from_pod`.
//!
//! A pod that could send from any address could pass another pod's ingress rules as an allowed
//! peer, and open conntrack entries under addresses that are not its own. So every IP packet a
//! checked pod sends must come from one of its own addresses (those of its CNI result), with the
//! exceptions IPv6 needs on a link: Neighbor Discovery and MLD from its link-local address or from
//! `::` (duplicate address detection). It may never act as a router (Router Advertisements,
//! Redirects), nor claim another host's address in a Neighbor Advertisement or an ARP packet.
//!
//! The pod's first IPv4 and first IPv6 address live in its [`Endpoint`] (read on every packet at
//! no extra lookup); any further ones (secondary addresses a CNI adds) are keys of the `SOURCES`
//! hash, looked up only for endpoints flagged [`SRC_F_MORE`].

use crate::{
    endpoint::Endpoint,
    parse::{Frame, Packet, FRAG_LATER},
    proto, RawAddr, AF_INET, AF_INET6,
};

/// `Endpoint::sources` bit: the source check is on for this endpoint (the agent knows its
/// addresses). Off, everything the pod sends is judged as before, whatever its source.
pub const SRC_F_CHECK: u32 = 1 << 0;
/// `Endpoint::sources` bit: `Endpoint::addr4` holds an address of the pod.
pub const SRC_F_V4: u32 = 1 << 1;
/// `Endpoint::sources` bit: `Endpoint::addr6` holds an address of the pod.
pub const SRC_F_V6: u32 = 1 << 2;
/// `Endpoint::sources` bit: the pod has more addresses, keys of the `SOURCES` map.
pub const SRC_F_MORE: u32 = 1 << 3;
/// `Endpoint::sources` bit: the pod's IPv6 link-local addresses are known (among its addresses,
/// read from its namespace at CNI ADD). On-link messages from the link scope, DHCPv6 requests and
/// link-local Neighbor Advertisement targets must then be the pod's own, not any link-local
/// address: else a pod could claim a neighbour's or the gateway's link-local address in its
/// neighbours' caches. Without it (an endpoint registered by an older plugin, or a pod with no
/// link-local address at ADD) any link-local address passes there, as before.
pub const SRC_F_LINK_LOCAL: u32 = 1 << 4;

/// Key of the `SOURCES` map: one further address of the pod on `ifindex`. The value is unused
/// (a `u32` 1): the key's presence is the answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceKey {
    /// The pod's host-side interface.
    pub ifindex: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
    /// The address (IPv4 in the first word, the rest zero).
    pub addr: RawAddr,
}

/// ICMPv6 Router Advertisement: only routers send it.
pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
/// ICMPv6 Neighbor Advertisement: its target must be the pod's.
pub const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// ICMPv6 Redirect: only routers send it.
pub const ICMPV6_REDIRECT: u8 = 137;

/// Whether `addr` is IPv6 link-local (`fe80::/10`) or unspecified (`::`): the sources of on-link
/// messages before and besides a pod's own addresses.
#[inline(always)]
pub fn ipv6_link_scope(addr: &RawAddr) -> bool {
    ipv6_link_local(addr) || ipv6_unspecified(addr)
}

/// Whether `addr` is IPv6 link-local (`fe80::/10`).
#[inline(always)]
pub fn ipv6_link_local(addr: &RawAddr) -> bool {
    u32::from_be(addr[0]) & 0xffc0_0000 == 0xfe80_0000
}

/// Whether `addr` is the unspecified IPv6 address (`::`), the source of duplicate address
/// detection.
#[inline(always)]
pub fn ipv6_unspecified(addr: &RawAddr) -> bool {
    (addr[0] | addr[1] | addr[2] | addr[3]) == 0
}

/// Whether a packet from the link scope passes without being one of the pod's addresses: `::`
/// always (no host owns it), a link-local address only while the pod's own are not known
/// ([`SRC_F_LINK_LOCAL`]).
#[inline(always)]
fn link_scope_unchecked(ep: &Endpoint, addr: &RawAddr) -> bool {
    ipv6_unspecified(addr) || (ep.sources & SRC_F_LINK_LOCAL == 0 && ipv6_link_local(addr))
}

/// ICMPv6 messages a host sends on its link from a link-local or unspecified source: MLD
/// (130 query, 131 report, 132 done, 143 MLDv2 report), Router Solicitation (133), Neighbor
/// Solicitation (135) and Advertisement (136). RFC 4861 and RFC 3810 have them from these sources.
#[inline(always)]
pub fn on_link_message(icmp_type: u8) -> bool {
    matches!(icmp_type, 130..=133 | 135 | 136 | 143)
}

/// Whether a pod may send an ICMPv6 message of this type at all: not as a router (Router
/// Advertisement, Redirect), which would steer its neighbours' traffic.
#[inline(always)]
pub fn pod_may_send_icmpv6(icmp_type: u8) -> bool {
    icmp_type != ICMPV6_ROUTER_ADVERTISEMENT && icmp_type != ICMPV6_REDIRECT
}

/// Whether `addr` of `family` is one of the endpoint's addresses: inline, or (for endpoints with
/// more) a key `more` finds.
#[inline(always)]
pub fn is_own(
    ep: &Endpoint,
    ifindex: u32,
    family: u8,
    addr: &RawAddr,
    more: impl FnOnce(&SourceKey) -> bool,
) -> bool {
    if family == AF_INET {
        if ep.sources & SRC_F_V4 != 0 && addr[0] == ep.addr4 {
            return true;
        }
    } else if ep.sources & SRC_F_V6 != 0 && *addr == ep.addr6 {
        return true;
    }
    if ep.sources & SRC_F_MORE == 0 {
        return false;
    }
    // Word by word: in eBPF `addr` lies in a per-CPU slot, and struct-wide zeroing or copying
    // there is a byte-wise loop (`crate::words`).
    let mut key = SourceKey::default();
    crate::words::zero::<_, u32>(&mut key);
    key.ifindex = ifindex;
    key.family = family;
    if family == AF_INET {
        key.addr[0] = addr[0];
    } else {
        crate::words::copy::<_, u32>(&mut key.addr, addr);
    }
    more(&key)
}

/// Whether the IP packet `pkt` (parsed from `frame`), sent by the pod of `ep`, is sent as the pod
/// itself: from one of its addresses, or an on-link ICMPv6 message from its link scope; never a
/// router's message; a Neighbor Advertisement only for its own target (or any link-local one
/// while the pod's are not known, [`SRC_F_LINK_LOCAL`]). `more` looks a [`SourceKey`] up in
/// `SOURCES` (called at most twice).
#[inline(always)]
pub fn sent_as_itself<F: Frame + ?Sized>(
    ep: &Endpoint,
    ifindex: u32,
    pkt: &Packet,
    frame: &F,
    more: impl Fn(&SourceKey) -> bool,
) -> bool {
    let icmpv6 = pkt.family == AF_INET6 && pkt.proto == proto::ICMPV6 && pkt.frag != FRAG_LATER;
    if icmpv6 && !pod_may_send_icmpv6(pkt.icmp_type) {
        return false;
    }
    if icmpv6 && on_link_message(pkt.icmp_type) && pkt.frag != crate::parse::FRAG_NONE {
        // Neighbor Discovery and MLD are never fragmented (RFC 6980; the kernel ignores such
        // messages): a first fragment would hide a Neighbor Advertisement's target.
        return false;
    }
    let on_link = icmpv6 && on_link_message(pkt.icmp_type) && link_scope_unchecked(ep, &pkt.src);
    let dhcp = dhcp_client_before_address(pkt)
        && (pkt.family == AF_INET || link_scope_unchecked(ep, &pkt.src));
    if !(on_link || dhcp || is_own(ep, ifindex, pkt.family, &pkt.src, &more)) {
        return false;
    }
    if icmpv6 && pkt.icmp_type == ICMPV6_NEIGHBOR_ADVERTISEMENT {
        // The target address follows the 4 reserved bytes after the ICMPv6 header's first 4.
        let target: RawAddr = match frame.read(pkt.l4_off as usize + 8) {
            Some(t) => t,
            None => return false,
        };
        let link_local = ipv6_link_local(&target) && ep.sources & SRC_F_LINK_LOCAL == 0;
        return link_local || is_own(ep, ifindex, AF_INET6, &target, &more);
    }
    true
}

/// A DHCP client message sent before (or besides) the client's address: DHCPv4 from 0.0.0.0,
/// port 68 to 67; DHCPv6 from the link scope, port 546 to 547 (RFC 8415 has clients send from
/// their link-local address). A pod whose CNI hands out addresses by DHCP sends these.
#[inline(always)]
pub fn dhcp_client_before_address(pkt: &Packet) -> bool {
    if pkt.proto != proto::UDP || pkt.frag != crate::parse::FRAG_NONE {
        return false;
    }
    if pkt.family == AF_INET {
        pkt.src[0] == 0 && pkt.sport == 68 && pkt.dport == 67
    } else {
        ipv6_link_scope(&pkt.src) && pkt.sport == 546 && pkt.dport == 547
    }
}

const ETH_P_ARP: u16 = 0x0806;

/// What the source check makes of a frame that is not IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotIp {
    /// Not ARP: not the source check's business (the parser refuses VLAN tags).
    Other,
    /// ARP for IPv4 over Ethernet from the pod's own address, or a probe from 0.0.0.0.
    OwnArp,
    /// ARP claiming another sender address, or ARP the check cannot read (not IPv4 over
    /// Ethernet, truncated).
    SpoofedArp,
}

/// Judges a non-IP frame the pod sent: ARP must name one of the pod's IPv4 addresses (or
/// 0.0.0.0, an address probe) as its sender, or the pod could poison its neighbours' caches.
#[inline(always)]
pub fn not_ip<F: Frame + ?Sized>(
    ep: &Endpoint,
    ifindex: u32,
    frame: &F,
    more: impl FnOnce(&SourceKey) -> bool,
) -> NotIp {
    match frame.read::<u16>(12) {
        Some(t) if u16::from_be(t) == ETH_P_ARP => {}
        _ => return NotIp::Other,
    }
    // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4; the sender's IPv4 address at 14 + 14.
    let fixed: Option<[u8; 6]> = frame.read(14);
    let sender: Option<u32> = frame.read(28);
    match (fixed, sender) {
        (Some([0, 1, 8, 0, 6, 4]), Some(spa)) => {
            let addr = [spa, 0, 0, 0];
            if spa == 0 || is_own(ep, ifindex, AF_INET, &addr, more) {
                NotIp::OwnArp
            } else {
                NotIp::SpoofedArp
            }
        }
        _ => NotIp::SpoofedArp,
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for SourceKey {}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::parse::parse;

    fn v4(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    fn v6(s: &str) -> RawAddr {
        let a: std::net::Ipv6Addr = s.parse().unwrap();
        let o = a.octets();
        core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }

    fn ep() -> Endpoint {
        Endpoint {
            policy_id: 1,
            sources: SRC_F_CHECK | SRC_F_V4 | SRC_F_V6,
            addr4: v4([10, 0, 0, 2]),
            addr6: v6("fd00::2"),
            ..Endpoint::default()
        }
    }

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = std::vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn icmpv6(src: &str, ty: u8, target: Option<&str>) -> Vec<u8> {
        let mut body = std::vec![ty, 0, 0, 0, 0, 0, 0, 0];
        if let Some(t) = target {
            let a: std::net::Ipv6Addr = t.parse().unwrap();
            body.extend_from_slice(&a.octets());
        }
        let mut ip = std::vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(body.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[58, 255]);
        ip.extend_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&"ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&body);
        eth(0x86dd, &ip)
    }

    fn judge(f: &[u8], more: &[SourceKey]) -> bool {
        let pkt = parse(f).unwrap().unwrap();
        sent_as_itself(&ep(), 7, &pkt, f, |k| more.contains(k))
    }

    #[test]
    fn link_scope_is_fe80_slash_10_and_unspecified() {
        assert!(ipv6_link_scope(&v6("fe80::1")));
        assert!(ipv6_link_scope(&v6("febf::1")));
        assert!(ipv6_link_scope(&v6("::")));
        assert!(!ipv6_link_scope(&v6("fec0::1")));
        assert!(!ipv6_link_scope(&v6("::1")));
        assert!(!ipv6_link_scope(&v6("fd00::2")));
    }

    #[test]
    fn own_addresses_pass_and_others_do_not() {
        let e = ep();
        assert!(is_own(
            &e,
            7,
            AF_INET,
            &[v4([10, 0, 0, 2]), 0, 0, 0],
            |_| false
        ));
        assert!(!is_own(
            &e,
            7,
            AF_INET,
            &[v4([10, 0, 0, 3]), 0, 0, 0],
            |_| true
        ));
        assert!(is_own(&e, 7, AF_INET6, &v6("fd00::2"), |_| false));
        assert!(!is_own(&e, 7, AF_INET6, &v6("fd00::3"), |_| false));
    }

    #[test]
    fn further_addresses_are_looked_up_only_when_flagged() {
        let mut e = ep();
        let extra = SourceKey {
            ifindex: 7,
            family: AF_INET,
            addr: [v4([10, 0, 0, 9]), 0, 0, 0],
            ..SourceKey::default()
        };
        let addr = [v4([10, 0, 0, 9]), 0, 0, 0];
        assert!(!is_own(&e, 7, AF_INET, &addr, |k| *k == extra));
        e.sources |= SRC_F_MORE;
        assert!(is_own(&e, 7, AF_INET, &addr, |k| *k == extra));
        assert!(!is_own(&e, 8, AF_INET, &addr, |k| *k == extra));
    }

    #[test]
    fn a_family_without_an_address_has_no_own_source() {
        let mut e = ep();
        e.sources = SRC_F_CHECK | SRC_F_V6;
        assert!(!is_own(
            &e,
            7,
            AF_INET,
            &[v4([10, 0, 0, 2]), 0, 0, 0],
            |_| false
        ));
    }

    #[test]
    fn neighbor_discovery_from_link_scope_passes_but_not_other_icmpv6() {
        assert!(judge(&icmpv6("fe80::1", 135, Some("fd00::2")), &[]));
        assert!(judge(&icmpv6("::", 135, Some("fd00::2")), &[]));
        assert!(judge(&icmpv6("fe80::1", 143, None), &[]));
        assert!(judge(&icmpv6("fe80::1", 133, None), &[]));
        // An echo request from the link-local address is not on-link signalling.
        assert!(!judge(&icmpv6("fe80::1", 128, None), &[]));
        // Nor is ND from another global address.
        assert!(!judge(&icmpv6("fd00::3", 135, Some("fd00::2")), &[]));
    }

    #[test]
    fn fragmented_neighbor_discovery_never_passes() {
        let f = icmpv6("fd00::2", 136, Some("fd00::2"));
        let mut pkt = parse(&f[..]).unwrap().unwrap();
        assert!(sent_as_itself(&ep(), 7, &pkt, &f[..], |_| false));
        pkt.frag = crate::parse::FRAG_FIRST;
        assert!(!sent_as_itself(&ep(), 7, &pkt, &f[..], |_| false));
    }

    #[test]
    fn router_messages_never_pass() {
        assert!(!judge(&icmpv6("fe80::1", 134, None), &[]));
        assert!(!judge(&icmpv6("fd00::2", 137, None), &[]));
    }

    #[test]
    fn neighbor_advertisements_must_be_for_the_pods_own_target() {
        assert!(judge(&icmpv6("fe80::1", 136, Some("fd00::2")), &[]));
        assert!(judge(&icmpv6("fe80::1", 136, Some("fe80::1")), &[]));
        assert!(!judge(&icmpv6("fe80::1", 136, Some("fd00::3")), &[]));
        assert!(!judge(&icmpv6("fd00::2", 136, Some("fd00::99")), &[]));
        // Truncated: no target to check.
        assert!(!judge(&icmpv6("fe80::1", 136, None), &[]));
    }

    /// The pod's own link-local address fe80::2 known: a further address in `SOURCES`.
    fn with_link_local(f: &[u8]) -> bool {
        let own = SourceKey {
            ifindex: 7,
            family: AF_INET6,
            addr: v6("fe80::2"),
            ..SourceKey::default()
        };
        let mut e = ep();
        e.sources |= SRC_F_MORE | SRC_F_LINK_LOCAL;
        let pkt = parse(f).unwrap().unwrap();
        sent_as_itself(&e, 7, &pkt, f, |k| *k == own)
    }

    fn dhcpv6(src: &str) -> Vec<u8> {
        let mut udp = std::vec![0x02, 0x22, 0x02, 0x23, 0, 12, 0, 0];
        udp.extend_from_slice(&[1, 2, 3, 4]);
        let mut ip = std::vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        ip.extend_from_slice(&[17, 1]);
        ip.extend_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&"ff02::1:2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&udp);
        eth(0x86dd, &ip)
    }

    #[test]
    fn with_its_link_local_address_known_a_pod_may_not_use_a_neighbours() {
        // Its own, and duplicate address detection from `::`, pass.
        assert!(with_link_local(&icmpv6("fe80::2", 135, Some("fd00::7"))));
        assert!(with_link_local(&icmpv6("::", 135, Some("fe80::2"))));
        assert!(with_link_local(&icmpv6("fe80::2", 136, Some("fe80::2"))));
        assert!(with_link_local(&dhcpv6("fe80::2")));
        // A neighbour's (or the gateway's) link-local address, as source or as target: refused;
        // without the flag the same messages pass.
        for f in [
            icmpv6("fe80::1", 135, Some("fd00::7")),
            icmpv6("fe80::1", 143, None),
            icmpv6("fe80::2", 136, Some("fe80::1")),
            icmpv6("::", 136, Some("fe80::1")),
            dhcpv6("fe80::1"),
        ] {
            assert!(!with_link_local(&f), "{f:?}");
            assert!(judge(&f, &[]), "{f:?} passes without the flag");
        }
        // Its link-local address is its own for anything else too.
        assert!(with_link_local(&icmpv6("fe80::2", 128, None)));
    }

    fn arp(spa: [u8; 4], fixed: [u8; 6]) -> Vec<u8> {
        let mut body = fixed.to_vec();
        body.extend_from_slice(&[0, 1]); // request
        body.extend_from_slice(&[2; 6]);
        body.extend_from_slice(&spa);
        body.extend_from_slice(&[0; 6]);
        body.extend_from_slice(&[10, 0, 0, 1]);
        eth(ETH_P_ARP, &body)
    }

    #[test]
    fn arp_must_name_the_pods_address_or_none() {
        let e = ep();
        let fixed = [0, 1, 8, 0, 6, 4];
        assert_eq!(
            not_ip(&e, 7, &arp([10, 0, 0, 2], fixed)[..], |_| false),
            NotIp::OwnArp
        );
        assert_eq!(
            not_ip(&e, 7, &arp([0, 0, 0, 0], fixed)[..], |_| false),
            NotIp::OwnArp
        );
        assert_eq!(
            not_ip(&e, 7, &arp([10, 0, 0, 1], fixed)[..], |_| false),
            NotIp::SpoofedArp
        );
        // Not IPv4 over Ethernet, or cut short: nothing to check, so refused.
        assert_eq!(
            not_ip(&e, 7, &arp([10, 0, 0, 2], [0, 6, 8, 0, 6, 4])[..], |_| {
                false
            }),
            NotIp::SpoofedArp
        );
        assert_eq!(
            not_ip(&e, 7, &arp([10, 0, 0, 2], fixed)[..27], |_| false),
            NotIp::SpoofedArp
        );
        assert_eq!(
            not_ip(&e, 7, &eth(0x88cc, &[0; 40])[..], |_| false),
            NotIp::Other
        );
    }
}
