//! An idle connection and the sweeper: an entry within its timeout survives any number of sweeps,
//! so the connection's next packet after a long silence (and its reply) still pass between
//! member pods, while an expired entry next to it is swept.

use std::time::Duration;

use kubesg_agent::{conntrack::Sweeper, policy::Protocol};
use kubesg_common::{config::timeout, conntrack::TcpState, proto};
use kubesg_testkit::{
    family::Family,
    ipv4_and_ipv6,
    netns::RecvWithin,
    pods::{exchange, Pods, Who, ARRIVES},
    rules::{egress, ingress, port, rule_with},
};

const PORT: u16 = 8080;
const UDP_PORT: u16 = 9999;

ipv4_and_ipv6!(idle_connection_survives_sweeps_within_its_timeout);

fn idle_connection_survives_sweeps_within_its_timeout(f: Family) {
    let v6 = f.is_v6();
    let client = egress(vec![
        rule_with(Protocol::Tcp, vec![port(PORT)], Who::Server.hosts()),
        rule_with(Protocol::Udp, vec![port(UDP_PORT)], Who::Server.hosts()),
    ]);
    let server = ingress(vec![
        rule_with(Protocol::Tcp, vec![port(PORT)], Who::Client.hosts()),
        rule_with(Protocol::Udp, vec![port(UDP_PORT)], Who::Client.hosts()),
    ]);
    let mut pods = Pods::new(Some(&client), Some(&server));
    // Unreplied UDP expires after 300 ms here, so the sweeper has something to remove: proof
    // that it runs while the TCP connection sits idle.
    let mut cfg = pods.dp.config().expect("reading the config");
    cfg.timeouts_ns[timeout::UDP_UNREPLIED] = 300_000_000;
    pods.dp.set_config(&cfg).expect("writing the config");
    let maps = pods.dp.maps().try_clone().expect("cloning map handles");
    let _sweeper = Sweeper::start(maps, Duration::from_millis(100));

    let (mut c, mut s) = pods.tcp_open(v6, PORT);
    let (udp, sink) = pods.udp_sockets(v6, UDP_PORT, ARRIVES);
    udp.send_to(b"unreplied", pods.server().sockaddr(v6, UDP_PORT))
        .expect("sending");
    let mut buf = [0u8; 16];
    sink.recv_within(&mut buf).expect("the datagram arrives");
    // Both flows were tracked (listing the UDP entry now would race with its 300 ms).
    pods.assert_eq(
        pods.counters(Who::Client)[0].new_connections,
        2,
        "both flows tracked",
    );

    std::thread::sleep(Duration::from_secs(1));

    pods.assert(
        pods.proto_entries(Who::Client, proto::UDP).is_empty(),
        "the expired UDP entry was swept",
    );
    let e = pods.tcp_entries(Who::Client, PORT);
    pods.assert_eq(e.len(), 1, "the idle TCP entry was not swept");
    assert_eq!(e[0].tcp_state(), Some(TcpState::Established));
    exchange(&mut c, &mut s).unwrap_or_else(|e| {
        panic!(
            "the idle connection carries data again: {e}\n{}",
            pods.dump()
        )
    });
    pods.assert_nothing_dropped();
}
