//! The source check on real traffic: a pod that takes another pod's address onto its own
//! interface and sends from it (what any pod with NET_ADMIN can do) is refused on its host-side
//! interface, although the receiver's rules admit the address it claims; the pod's own traffic
//! goes on working, and the agent counts what it dropped.

mod common;

use std::net::UdpSocket;

use common::{any, anywhere, hosts, policy, snapshot, tcp, udp, Cluster, ARRIVES, NEVER};
use kubesg_testkit::{agent::Startup, netns::is_timeout};

const PORT: u16 = 5353;

#[test]
fn a_pod_sending_from_another_pods_address_is_refused_and_its_own_traffic_still_works() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Allow);
    let attacker = cluster.add_pod("attacker", 41);
    let victim = cluster.add_pod("victim", 42);
    let server = cluster.add_pod("server", 43);
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
    let ifindex = cluster.host_ifindex(&attacker).to_string();
    let table = cluster.agent.cli_ok(&["counters"]).expect("counters");
    let column = table
        .lines()
        .next()
        .and_then(|header| header.split_whitespace().position(|h| h == "DROP-SPOOFED"))
        .unwrap_or_else(|| panic!("no DROP-SPOOFED column:\n{table}"));
    let spoofed: u64 = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.first() == Some(&ifindex.as_str()) && c.get(2) == Some(&"egress"))
        .and_then(|c| c.get(column)?.parse().ok())
        .unwrap_or_else(|| panic!("no egress row for {ifindex}:\n{table}"));
    assert!(spoofed >= 6, "DROP-SPOOFED {spoofed}, 6 sent:\n{table}");
}
