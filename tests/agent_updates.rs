//! How the agent applies the operator's versions: one it cannot program is refused (NACK with the
//! datapath's reason) and the version before it stays enforced, whole: its held connections
//! carry data, its rules still decide NEW connections, and the next good version applies.

mod common;

use common::{hosts, policy, snapshot, tcp, Cluster};
use kubesg_common::policy::MAX_CLASSES;
use kubesg_proto::v1alpha1 as pb;
use kubesg_testkit::{agent::Startup, cni::CniPod};

/// Version `version`: the client may open TCP `port` to the server, which accepts it from the
/// client; the server's egress is `server_egress`.
fn rules(
    version: u64,
    port: u16,
    client: &CniPod,
    server: &CniPod,
    server_egress: Vec<pb::Rule>,
) -> pb::PolicyUpdate {
    snapshot(
        version,
        vec![
            policy(
                &format!("cli-{port}"),
                vec![],
                vec![tcp(&[port], hosts(&[server]))],
            ),
            policy(
                &format!("srv-{port}"),
                vec![tcp(&[port], hosts(&[client]))],
                server_egress,
            ),
        ],
        &[
            (client, Some(&format!("cli-{port}"))),
            (server, Some(&format!("srv-{port}"))),
        ],
    )
}

/// Egress rules no policy table can hold: one more class than a class set has, each rule a
/// distinct (port, peer) pair so that no two can share a class.
fn more_rules_than_classes() -> Vec<pb::Rule> {
    (0..=MAX_CLASSES)
        .map(|i| {
            let peer = pb::PeerBlock {
                cidr: format!("10.99.{}.{}/32", i / 256, i % 256),
                except: vec![],
            };
            tcp(&[20_000 + i as u16], vec![peer])
        })
        .collect()
}

#[test]
fn a_version_the_datapath_cannot_hold_is_nacked_and_the_previous_one_stays_enforced() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    let client = cluster.add_pod("client", 41);
    let server = cluster.add_pod("server", 42);
    cluster.push(rules(1, 8080, &client, &server, vec![]));
    let (mut held_c, mut held_s) = cluster.assert_opens(&client, &server, false, 8080);

    // Version 2 moves both pods to port 9090; the server's new policy cannot be programmed.
    let ack = cluster.push_for_answer(rules(2, 9090, &client, &server, more_rules_than_classes()));
    assert!(!ack.applied, "version 2 must be refused: {ack:?}");
    assert!(
        ack.reason.contains("classes"),
        "the NACK names what does not fit: {}",
        ack.reason
    );
    assert_eq!(cluster.applied_version(), 1, "{}", cluster.dump());

    // Version 1, whole: its connection lives, its port opens, version 2's does not.
    assert!(
        common::data_gets_through(&mut held_c, &mut held_s),
        "the connection version 1 allowed was cut\n{}",
        cluster.dump()
    );
    assert!(
        common::data_gets_through(&mut held_s, &mut held_c),
        "the reply direction was cut\n{}",
        cluster.dump()
    );
    for v6 in [false, true] {
        cluster.assert_opens(&client, &server, v6, 8080);
        cluster.assert_dropped(&client, &server, v6, 9090);
    }

    // The next version the datapath can hold applies, and re-checks what version 1 allowed.
    cluster.push(rules(3, 9090, &client, &server, vec![]));
    assert_eq!(cluster.applied_version(), 3);
    for v6 in [false, true] {
        cluster.assert_opens(&client, &server, v6, 9090);
        cluster.assert_dropped(&client, &server, v6, 8080);
    }
    assert!(
        !common::data_gets_through(&mut held_c, &mut held_s),
        "version 3 no longer allows port 8080: its held connection is cut\n{}",
        cluster.dump()
    );
}
