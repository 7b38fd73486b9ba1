//! The source check on real traffic: a pod that takes another pod's address onto its own
//! interface and sends from it (what any pod with NET_ADMIN can do) is refused on its host-side
//! interface, although the receiver's rules admit the address it claims; the pod's own traffic
//! goes on working, and the agent counts what it dropped. Likewise on the link: a pod that
//! claims a neighbour's link-local address in a Neighbor Advertisement is refused.

mod common;

use std::net::{Ipv6Addr, UdpSocket};

use common::{
    any, anywhere, hosts, link_local, policy, snapshot, tcp, udp, Cluster, ARRIVES, NEVER,
};
use kubesg_testkit::{
    agent::Startup,
    cni::CniPod,
    netns::{is_timeout, Netns},
    packet,
};

const PORT: u16 = 5353;

/// The three pods of an attack, through the real CNI chain, at host numbers `first` and the two
/// after it (each test its own, so that tests running side by side do not collide).
fn attacker_victim_server(cluster: &Cluster, first: u8) -> [CniPod; 3] {
    [
        cluster.add_pod("attacker", first),
        cluster.add_pod("victim", first + 1),
        cluster.add_pod("server", first + 2),
    ]
}

#[test]
fn a_pod_sending_from_another_pods_address_is_refused_and_its_own_traffic_still_works() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Allow);
    let [attacker, victim, server] = attacker_victim_server(&cluster, 41);
    // The server takes datagrams from the victim only, and TCP from the attacker; the others
    // may send anything.
    cluster.push(snapshot(
        1,
        vec![
            policy(
                "srv",
                vec![
                    udp(&[PORT], hosts(&[&victim])),
                    tcp(&[8080, 8081, 8082], hosts(&[&attacker])),
                ],
                vec![],
            ),
            policy("out", vec![], vec![any(anywhere())]),
        ],
        &[
            (&attacker, Some("out")),
            (&victim, Some("out")),
            (&server, Some("srv")),
        ],
    ));
    for v6 in [false, true] {
        let inbox = server.udp_bind(v6, PORT, NEVER).expect("binding");
        let to = server.sockaddr(v6, PORT);
        // The victim's own datagram arrives: the rules admit its address.
        let sock = victim.udp_bind(v6, 0, ARRIVES).expect("binding");
        sock.send_to(b"real", to).expect("sending");
        let mut buf = [0u8; 16];
        let (n, from) = inbox
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("the victim's datagram (v6={v6}): {e}\n{}", cluster.dump()));
        assert_eq!((&buf[..n], from.ip()), (&b"real"[..], victim.addr(v6)));

        // The attacker's own traffic works (and leaves it the server's link-layer address, so
        // what follows is refused for its IP source, not for a neighbour lookup).
        cluster.assert_opens(&attacker, &server, v6, 8080);

        // It takes the victim's address and sends from it.
        let claimed = victim.addr(v6);
        let prefix = if v6 { "128" } else { "32" };
        let mut args = vec!["addr", "add"];
        let cidr = format!("{claimed}/{prefix}");
        args.push(&cidr);
        args.extend(["dev", "eth0"]);
        if v6 {
            args.push("nodad");
        }
        let out = attacker.ns.ip(&args).expect("ip addr add");
        assert!(out.status.success(), "{out:?}");
        attacker.ns.enter(|| {
            let s = UdpSocket::bind((claimed, 0)).expect("binding the claimed address");
            for _ in 0..3 {
                s.send_to(b"spoofed", to).expect("sending");
            }
        });
        match inbox.recv_from(&mut buf) {
            Err(e) if is_timeout(&e) => {}
            other => panic!(
                "a datagram from the claimed {claimed} reached the server: {other:?}\n{}",
                cluster.dump()
            ),
        }
        // Given the address back (while it has it, the kernel may pick it as the source of the
        // pod's own connections: IPv6 prefers the longest match), its own traffic passes.
        args[1] = "del";
        let out = attacker.ns.ip(&args).expect("ip addr del");
        assert!(out.status.success(), "{out:?}");
        cluster.assert_opens(&attacker, &server, v6, 8081 + u16::from(v6));
    }

    // The agent counted them: the attacker's egress row, column DROP-SPOOFED.
    let spoofed = spoofed_count(&cluster, &attacker);
    assert!(spoofed >= 6, "DROP-SPOOFED {spoofed}, 6 sent");
}

/// What `kubesg-agent counters` says the source check dropped from `pod`: its egress row,
/// column DROP-SPOOFED.
fn spoofed_count(cluster: &Cluster, pod: &CniPod) -> u64 {
    let ifindex = cluster.host_ifindex(pod).to_string();
    let table = cluster.agent.cli_ok(&["counters"]).expect("counters");
    let column = table
        .lines()
        .next()
        .and_then(|header| header.split_whitespace().position(|h| h == "DROP-SPOOFED"))
        .unwrap_or_else(|| panic!("no DROP-SPOOFED column:\n{table}"));
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.first() == Some(&ifindex.as_str()) && c.get(2) == Some(&"egress"))
        .and_then(|c| c.get(column)?.parse().ok())
        .unwrap_or_else(|| panic!("no egress row for {ifindex}:\n{table}"))
}

/// The link-layer address `ns` has cached for `addr` on eth0, if any.
fn cached_lladdr(ns: &Netns, addr: Ipv6Addr) -> Option<String> {
    let out = ns
        .ip(&["-6", "neigh", "show", &addr.to_string(), "dev", "eth0"])
        .expect("ip neigh show");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(String::from)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The kubesg-cni plugin registers each pod's link-local address (its CNI result has none), so
/// the source check knows it: an unsolicited Neighbor Advertisement in which a pod claims its
/// neighbour's link-local address is refused, while the same advertisement for its own address
/// goes through. Before, any link-local target passed, and the server's cache took the
/// attacker's MAC for the victim.
#[test]
fn a_pod_claiming_a_neighbours_link_local_address_is_refused() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Allow);
    let [attacker, victim, server] = attacker_victim_server(&cluster, 44);
    cluster.push(snapshot(
        1,
        vec![policy("open", vec![any(anywhere())], vec![any(anywhere())])],
        &[
            (&attacker, Some("open")),
            (&victim, Some("open")),
            (&server, Some("open")),
        ],
    ));
    let (attacker_ll, victim_ll) = (link_local(&attacker.ns), link_local(&victim.ns));
    let attacker_mac = attacker.ns.mac("eth0").expect("the attacker's MAC");
    let victim_mac = victim.ns.mac("eth0").expect("the victim's MAC");
    // The server knows both neighbours, the attacker under an old address: an advertisement
    // with Override replaces a cached one.
    let old = "02:00:00:00:00:99";
    for (addr, mac) in [
        (attacker_ll, old.to_string()),
        (victim_ll, mac_text(victim_mac)),
    ] {
        let out = server
            .ns
            .ip(&[
                "-6",
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "stale",
            ])
            .expect("ip neigh replace");
        assert!(out.status.success(), "{out:?}");
    }
    let advertise = |target: Ipv6Addr| {
        let frame = packet::unsolicited_neighbor_advertisement(
            attacker_ll,
            attacker_mac,
            target,
            attacker_mac,
        );
        attacker
            .ns
            .send_frames("eth0", &[frame])
            .expect("sending from the attacker");
        std::thread::sleep(std::time::Duration::from_millis(300));
    };

    // For its own address the advertisement arrives: the server takes its new MAC.
    advertise(attacker_ll);
    assert_eq!(
        cached_lladdr(&server.ns, attacker_ll),
        Some(mac_text(attacker_mac)),
        "the attacker's advertisement of its own address reached the server\n{}",
        cluster.dump()
    );
    // For the victim's it is refused: the server keeps the victim's MAC.
    advertise(victim_ll);
    assert_eq!(
        cached_lladdr(&server.ns, victim_ll),
        Some(mac_text(victim_mac)),
        "the server still has the victim's MAC for {victim_ll}\n{}",
        cluster.dump()
    );
    assert_eq!(spoofed_count(&cluster, &attacker), 1, "DROP-SPOOFED");
}
