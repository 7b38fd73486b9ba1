//! An idle connection and the sweeper: an entry within its timeout survives any number of sweeps,
//! so the connection's next packet after a long silence (and its reply) still pass between
//! member pods, while an expired entry next to it is swept.

mod traffic_fixture;

use std::time::Duration;

use kubesg_agent::{
    conntrack::Sweeper,
    policy::{CompiledPolicy, Protocol},
};
use kubesg_common::{config::timeout, conntrack::TcpState, proto};
use kubesg_testkit::require_privileged;
use traffic_fixture::*;

const PORT: u16 = 8080;
const UDP_PORT: u16 = 9999;

fn idle_connection_survives_sweeps_within_its_timeout(v6: bool) {
    let client = egress(vec![
        rule(Protocol::Tcp, &[PORT], Who::Server),
        rule(Protocol::Udp, &[UDP_PORT], Who::Server),
    ]);
    let server = CompiledPolicy {
        ingress: vec![
            rule(Protocol::Tcp, &[PORT], Who::Client),
            rule(Protocol::Udp, &[UDP_PORT], Who::Client),
        ],
        ..CompiledPolicy::default()
    };
    let mut pods = Pods::new(Some(&client), Some(&server));
    // Unreplied UDP expires after 300 ms here, so the sweeper has something to remove: proof
    // that it runs while the TCP connection sits idle.
    let mut cfg = pods.dp.config().expect("reading the config");
    cfg.timeouts_ns[timeout::UDP_UNREPLIED] = 300_000_000;
    pods.dp.set_config(&cfg).expect("writing the config");
    let maps = pods.dp.maps().try_clone().expect("cloning map handles");
    let _sweeper = Sweeper::start(maps, Duration::from_millis(100));

    let (mut c, mut s) = pods.tcp_open(v6, PORT);
    let sink = pods
        .server()
        .udp_bind(v6, UDP_PORT, ARRIVES)
        .expect("UDP sink");
    let udp = pods.client().udp_bind(v6, 0, ARRIVES).expect("UDP source");
    udp.send_to(b"unreplied", pods.server().sockaddr(v6, UDP_PORT))
        .expect("sending");
    let mut buf = [0u8; 16];
    sink.recv(&mut buf).expect("the datagram arrives");
    let udp_entries = |pods: &Pods| {
        pods.entries(Who::Client)
            .into_iter()
            .filter(|c| c.key.proto == proto::UDP)
            .count()
    };
    // Both flows were tracked (listing the UDP entry now would race with its 300 ms).
    assert_eq!(
        pods.counters(Who::Client)[0].new_connections,
        2,
        "{}",
        pods.dump()
    );

    std::thread::sleep(Duration::from_secs(1));

    assert_eq!(
        udp_entries(&pods),
        0,
        "the expired UDP entry was swept\n{}",
        pods.dump()
    );
    let e = pods.tcp_entries(Who::Client, PORT);
    assert_eq!(
        e.len(),
        1,
        "the idle TCP entry was not swept\n{}",
        pods.dump()
    );
    assert_eq!(e[0].tcp_state(), Some(TcpState::Established));
    exchange(&mut c, &mut s).unwrap_or_else(|e| {
        panic!(
            "the idle connection carries data again: {e}\n{}",
            pods.dump()
        )
    });
    for who in [Who::Client, Who::Server] {
        let [out, inc] = pods.counters(who);
        assert_eq!(
            out.dropped_invalid + inc.dropped_invalid + out.dropped_policy + inc.dropped_policy,
            0,
            "{who:?}\n{}",
            pods.dump()
        );
    }
}

#[test]
fn idle_connection_survives_sweeps_within_its_timeout_v4() {
    require_privileged!();
    idle_connection_survives_sweeps_within_its_timeout(false);
}

#[test]
fn idle_connection_survives_sweeps_within_its_timeout_v6() {
    require_privileged!();
    idle_connection_survives_sweeps_within_its_timeout(true);
}
