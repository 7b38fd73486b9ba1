//! The source check through the real eBPF programs (BPF_PROG_TEST_RUN on ifindex 1): with its
//! addresses set, the pod may send only as itself: from its own addresses, IPv6 neighbour
//! discovery and MLD from its link scope, ARP for its own address; never as a router. Everything
//! else it sends is dropped as `spoofed`, member or not, and leaves no conntrack entry. What it
//! receives is not the check's business.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kubesg_common::{
    endpoint::{cache_slot, CachedEndpoint},
    event::DenyReason,
    source::{SRC_F_CHECK, SRC_F_V4},
};
use kubesg_testkit::{
    family::{Family, POD_V6, V4, V6},
    ipv4_and_ipv6,
    loopback::{LoopbackDatapath, ACCEPT, DROP, EGRESS, IFINDEX, INGRESS},
    packet::{self, TcpFlags},
    require_privileged,
    rules::allow_all,
};

/// The pod's own addresses in both families, as its CNI result gives them.
fn own() -> Vec<IpAddr> {
    vec![V4.pod, V6.pod]
}

/// Another host on the pod's network: the address a spoofing pod claims.
fn victim(f: Family) -> IpAddr {
    f.addr("10.0.0.9", "fd00::9")
}

/// The pod's flow to the peer, sent from `src` instead of the pod's address.
fn tcp_syn_from(f: Family, src: IpAddr) -> Vec<u8> {
    packet::tcp(src, f.peer, 40000, 80, TcpFlags::SYN)
}

ipv4_and_ipv6!(
    a_member_pod_sending_from_another_address_is_dropped_as_spoofed,
    a_non_member_pod_sending_from_another_address_is_dropped_too,
    without_addresses_the_check_is_off_and_a_spoofed_packet_passes,
    a_later_fragment_from_another_address_is_dropped,
    a_further_address_passes_while_the_pod_has_it,
    what_the_pod_receives_is_not_source_checked,
);

fn a_member_pod_sending_from_another_address_is_dropped_as_spoofed(f: Family) {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    dp.set_sources(&own());
    assert_eq!(dp.pod_sends(&tcp_syn_from(f, victim(f))), DROP);
    let d = dp.assert_denied(DenyReason::Spoofed);
    assert_eq!(d.src, Some(victim(f)), "{d:#?}");
    assert!(dp.conns().is_empty(), "a spoofed packet opens nothing");
    // Its own traffic still works.
    assert_eq!(dp.pod_sends(&f.tcp_out(80, TcpFlags::SYN)), ACCEPT);
    assert_eq!(dp.conns().len(), 1);
    let eg = dp.counters()[EGRESS];
    assert_eq!(
        (eg.dropped_spoofed, eg.dropped_invalid, eg.new_connections),
        (1, 0, 1)
    );
}

fn a_non_member_pod_sending_from_another_address_is_dropped_too(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    dp.set_sources(&own());
    assert_eq!(dp.pod_sends(&tcp_syn_from(f, victim(f))), DROP);
    dp.assert_denied(DenyReason::Spoofed);
    assert_eq!(dp.pod_sends(&f.udp_out(53, b"q")), ACCEPT);
    assert_eq!(dp.counters()[EGRESS].dropped_spoofed, 1);
}

fn without_addresses_the_check_is_off_and_a_spoofed_packet_passes(f: Family) {
    // The attack the check stops: with no addresses set (the check off), it goes through.
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    assert_eq!(dp.pod_sends(&tcp_syn_from(f, victim(f))), ACCEPT);
    assert_eq!(dp.conns().len(), 1);
    // Set, then cleared again: off.
    assert!(dp.set_sources(&own()));
    assert_eq!(dp.pod_sends(&tcp_syn_from(f, victim(f))), DROP);
    assert!(dp.set_sources(&[]));
    assert_eq!(dp.pod_sends(&tcp_syn_from(f, victim(f))), ACCEPT);
}

fn a_later_fragment_from_another_address_is_dropped(f: Family) {
    let mut dp = LoopbackDatapath::load(None);
    dp.set_sources(&own());
    let spoofed = packet::udp(victim(f), f.peer, 40000, 53, &[7; 64]);
    let [_, later] = packet::fragment(&spoofed, 16, 99);
    assert_eq!(dp.pod_sends(&later), DROP);
    dp.assert_denied(DenyReason::Spoofed);
    // The pod's own datagram, fragmented, passes whole.
    let [first, later] = packet::fragment(&f.udp_out(53, &[7; 64]), 16, 100);
    assert_eq!(dp.pod_sends(&first), ACCEPT);
    assert_eq!(dp.pod_sends(&later), ACCEPT);
}

fn a_further_address_passes_while_the_pod_has_it(f: Family) {
    let extra = f.addr("10.0.0.77", "fd00::77");
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    let mut addrs = own();
    addrs.push(extra);
    dp.set_sources(&addrs);
    assert_eq!(dp.datapath.maps().sources.keys().count(), 1);
    assert_eq!(dp.pod_sends(&tcp_syn_from(f, extra)), ACCEPT);
    assert!(!dp.set_sources(&addrs), "the same addresses change nothing");
    // Taken away: refused, and its key is gone.
    dp.set_sources(&own());
    assert_eq!(dp.datapath.maps().sources.keys().count(), 0);
    assert_eq!(dp.pod_sends(&tcp_syn_from(f, extra)), DROP);
    dp.assert_denied(DenyReason::Spoofed);
}

fn what_the_pod_receives_is_not_source_checked(f: Family) {
    let dp = checked_member();
    let from_anyone = packet::tcp(victim(f), f.pod, 40000, 80, TcpFlags::SYN);
    assert_eq!(dp.pod_receives(&from_anyone), ACCEPT);
    assert_eq!(dp.counters()[INGRESS].dropped_spoofed, 0);
}

/// A link-local address of the pod (any: it picks its own).
const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 5);

fn checked_member() -> LoopbackDatapath {
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    dp.set_sources(&own());
    dp
}

#[test]
fn neighbor_discovery_from_the_link_local_address_and_duplicate_detection_pass() {
    require_privileged!();
    let dp = checked_member();
    dp.assert_neighbor_discovery_passes();
    assert_solicits_from_its_link_local_and_for_duplicates(&dp);
}

/// A Neighbor Solicitation from the pod's link-local address, and one from `::` for its own
/// address (duplicate address detection), pass.
fn assert_solicits_from_its_link_local_and_for_duplicates(dp: &LoopbackDatapath) {
    let target = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    assert_eq!(
        dp.pod_sends(&packet::neighbor_solicitation(LINK_LOCAL, target)),
        ACCEPT
    );
    assert_eq!(
        dp.pod_sends(&packet::neighbor_solicitation(
            Ipv6Addr::UNSPECIFIED,
            POD_V6
        )),
        ACCEPT
    );
}

/// With the pod's link-local address among its addresses (as kubesg-cni registers it), on-link
/// messages must come from it: another link-local source, or a Neighbor Advertisement naming
/// another link-local target, is spoofing. `::` still passes (duplicate address detection).
#[test]
fn with_its_link_local_address_known_only_it_passes_on_the_link() {
    require_privileged!();
    let mut dp = checked_member();
    let mut addrs = own();
    addrs.push(LINK_LOCAL.into());
    dp.set_sources(&addrs);
    let neighbour = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 9);
    let target = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    assert_solicits_from_its_link_local_and_for_duplicates(&dp);
    assert_eq!(
        dp.pod_sends(&packet::neighbor_advertisement(LINK_LOCAL, neighbour)),
        ACCEPT
    );
    assert_eq!(
        dp.pod_sends(&packet::neighbor_solicitation(neighbour, target)),
        DROP
    );
    dp.assert_denied(DenyReason::Spoofed);
    assert_eq!(
        dp.pod_sends(&packet::neighbor_advertisement_of(
            LINK_LOCAL, neighbour, neighbour
        )),
        DROP
    );
    dp.assert_denied(DenyReason::Spoofed);
    // Its own link-local address is its own for anything.
    let echo = packet::icmp_echo_request(LINK_LOCAL.into(), V6.peer, 1, 1);
    assert_eq!(dp.pod_sends(&echo), ACCEPT);
}

#[test]
fn the_link_local_address_carries_only_on_link_messages() {
    require_privileged!();
    let mut dp = checked_member();
    let echo = packet::icmp_echo_request(LINK_LOCAL.into(), V6.peer, 1, 1);
    assert_eq!(dp.pod_sends(&echo), DROP);
    dp.assert_denied(DenyReason::Spoofed);
}

#[test]
fn router_advertisements_and_redirects_from_the_pod_are_dropped() {
    require_privileged!();
    let mut dp = checked_member();
    let all_nodes: IpAddr = "ff02::1".parse().unwrap();
    for ty in [134, 137] {
        let from_ll = packet::icmp_raw(LINK_LOCAL.into(), all_nodes, ty, 0, [0; 4], &[0; 32]);
        assert_eq!(dp.pod_sends(&from_ll), DROP, "type {ty} from fe80::5");
        dp.assert_denied(DenyReason::Spoofed);
        let from_own = packet::icmp_raw(V6.pod, all_nodes, ty, 0, [0; 4], &[0; 32]);
        assert_eq!(dp.pod_sends(&from_own), DROP, "type {ty} from the pod");
        dp.assert_denied(DenyReason::Spoofed);
    }
}

#[test]
fn a_neighbor_advertisement_for_another_hosts_address_is_dropped() {
    require_privileged!();
    let mut dp = checked_member();
    let neighbor = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7);
    let own = packet::neighbor_advertisement_of(LINK_LOCAL, neighbor, POD_V6);
    assert_eq!(dp.pod_sends(&own), ACCEPT);
    let theirs = packet::neighbor_advertisement_of(LINK_LOCAL, neighbor, neighbor);
    assert_eq!(dp.pod_sends(&theirs), DROP);
    dp.assert_denied(DenyReason::Spoofed);
}

#[test]
fn arp_must_name_the_pods_own_address_or_none() {
    require_privileged!();
    let mut dp = checked_member();
    let gateway = Ipv4Addr::new(10, 0, 0, 1);
    let IpAddr::V4(pod) = V4.pod else {
        unreachable!()
    };
    assert_eq!(dp.pod_sends(&packet::arp_request(pod, gateway)), ACCEPT);
    assert_eq!(
        dp.pod_sends(&packet::arp_request(Ipv4Addr::UNSPECIFIED, pod)),
        ACCEPT,
        "an address probe"
    );
    // Claiming the gateway's address: the neighbours' caches would send its traffic here.
    assert_eq!(dp.pod_sends(&packet::arp_request(gateway, pod)), DROP);
    let d = dp.assert_denied(DenyReason::Spoofed);
    assert_eq!(d.src, None, "no IP header: {d:#?}");
    assert_eq!(dp.counters()[EGRESS].dropped_spoofed, 1);
}

#[test]
fn a_dhcp_request_from_no_address_or_the_link_local_one_passes() {
    require_privileged!();
    let dp = checked_member();
    let discover = packet::udp(
        Ipv4Addr::UNSPECIFIED.into(),
        Ipv4Addr::BROADCAST.into(),
        68,
        67,
        &[0; 240],
    );
    assert_eq!(dp.pod_sends(&discover), ACCEPT);
    let elsewhere = packet::udp(
        Ipv4Addr::UNSPECIFIED.into(),
        Ipv4Addr::BROADCAST.into(),
        68,
        80,
        &[0; 240],
    );
    assert_eq!(dp.pod_sends(&elsewhere), DROP);
    // DHCPv6: from the link-local address to the servers' multicast address.
    let all_servers: IpAddr = "ff02::1:2".parse().unwrap();
    let solicit = packet::udp(LINK_LOCAL.into(), all_servers, 546, 547, &[1; 40]);
    assert_eq!(dp.pod_sends(&solicit), ACCEPT);
    let mdns = packet::udp(
        LINK_LOCAL.into(),
        "ff02::fb".parse().unwrap(),
        5353,
        5353,
        &[0; 40],
    );
    assert_eq!(dp.pod_sends(&mdns), DROP, "other link-local traffic");
}

#[test]
fn a_malformed_packet_from_a_checked_non_member_is_dropped() {
    require_privileged!();
    let mut dp = LoopbackDatapath::load(None);
    let bad = packet::with_tcp_data_offset(V4.tcp_out(80, TcpFlags::SYN), 2);
    // Unchecked, a non-member passes it as INVALID ...
    assert_eq!(dp.pod_sends(&bad), ACCEPT);
    // ... checked, its source cannot be vouched for: dropped.
    dp.set_sources(&own());
    assert_eq!(dp.pod_sends(&bad), DROP);
    dp.assert_denied(DenyReason::Malformed);
}

#[test]
fn a_slot_being_rewritten_is_not_read_and_the_endpoint_map_answers() {
    require_privileged!();
    // ENDPOINTS has the check off; the cache slot is made to say otherwise, as a half-written
    // slot could. With an odd sequence count the program must not believe the slot.
    let mut dp = LoopbackDatapath::load(Some(&allow_all()));
    let spoofed = tcp_syn_from(V4, victim(V4));
    let slot = cache_slot(IFINDEX);
    let mut cached: CachedEndpoint = dp
        .datapath
        .maps()
        .endpoint_cache
        .get(&slot, 0)
        .expect("reading the slot");
    assert_eq!(cached.ifindex, IFINDEX, "the endpoint owns its slot");
    cached.endpoint.sources = SRC_F_CHECK | SRC_F_V4;
    let IpAddr::V4(pod) = V4.pod else {
        unreachable!()
    };
    cached.endpoint.addr4 = u32::from_ne_bytes(pod.octets());
    let mut write = |dp: &mut LoopbackDatapath, seq: u32| {
        cached.seq = seq;
        dp.datapath
            .maps_mut()
            .endpoint_cache
            .set(slot, cached, 0)
            .expect("writing the slot");
    };
    write(&mut dp, 7);
    assert_eq!(dp.pod_sends(&spoofed), ACCEPT, "odd: ENDPOINTS answers");
    write(&mut dp, 8);
    assert_eq!(dp.pod_sends(&spoofed), DROP, "even: the slot answers");
}
