//! How the agent applies the operator's versions: one it cannot program is refused (NACK with the
//! datapath's reason) and the version before it stays enforced, whole: its held connections
//! carry data, its rules still decide NEW connections, and the next good version applies. A
//! peer joining a large group changes the installed policy in place (the endpoint keeps its
//! policy id, one host entry per address is written); one leaving takes the switch to a new id,
//! which re-checks the connections it held.

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

/// The server's policy, layered on ingress: its security group allows `sg_ports` from the
/// client, a NetworkPolicy `np_ports`; `layers` lists the layers required (as the operator
/// sends them).
fn layered_server(
    version: u64,
    client: &CniPod,
    server: &CniPod,
    sg_ports: &[u16],
    np_ports: &[u16],
    layers: Vec<pb::Layer>,
) -> pb::PolicyUpdate {
    let of = |layer: pb::Layer, ports: &[u16], origin: &str| pb::Rule {
        layer: layer as i32,
        origin: origin.into(),
        ..tcp(ports, hosts(&[client]))
    };
    let srv = pb::Policy {
        layered: true,
        ingress_layers: layers.into_iter().map(|l| l as i32).collect(),
        ..policy(
            "srv",
            vec![
                of(pb::Layer::SecurityGroups, sg_ports, "shop/db ingress[0]"),
                of(
                    pb::Layer::NetworkPolicies,
                    np_ports,
                    "networkpolicy shop/allow-client ingress[0]",
                ),
            ],
            vec![],
        )
    };
    snapshot(version, vec![srv], &[(client, None), (server, Some("srv"))])
}

#[test]
fn a_layered_version_is_enforced_layer_by_layer_and_a_layer_listed_twice_is_nacked() {
    kubesg_testkit::require_privileged!();
    use pb::Layer::{NetworkPolicies as Np, SecurityGroups as Sg};
    let cluster = Cluster::connected(Startup::Deny);
    let client = cluster.add_pod("client", 41);
    let server = cluster.add_pod("server", 42);
    // Version 1: the group allows 8080 and 9090, the NetworkPolicy 8080: only 8080 opens.
    cluster.push(layered_server(
        1,
        &client,
        &server,
        &[8080, 9090],
        &[8080],
        vec![Sg, Np],
    ));
    let (mut held_c, mut held_s) = cluster.assert_opens(&client, &server, false, 8080);
    for v6 in [false, true] {
        cluster.assert_opens(&client, &server, v6, 8080);
        cluster.assert_dropped(&client, &server, v6, 9090);
    }

    // Version 2 lists the NetworkPolicies layer twice: refused, naming why; version 1 holds.
    let ack = cluster.push_for_answer(layered_server(
        2,
        &client,
        &server,
        &[9090],
        &[9090],
        vec![Np, Np],
    ));
    assert!(!ack.applied, "version 2 must be refused: {ack:?}");
    assert!(ack.reason.contains("twice"), "{}", ack.reason);
    assert_eq!(cluster.applied_version(), 1, "{}", cluster.dump());
    cluster.assert_dropped(&client, &server, false, 9090);

    // Version 3: the same rules unlayered are a union: 9090 opens too.
    let mut flat = layered_server(3, &client, &server, &[8080, 9090], &[8080], vec![]);
    flat.upsert_policies[0].layered = false;
    cluster.push(flat);
    assert_eq!(cluster.applied_version(), 3);
    cluster.assert_opens(&client, &server, true, 9090);

    // Version 4: layered again, the NetworkPolicy now allowing 9090 only: 8080 is refused and the
    // connection version 1 allowed on it is cut (re-checked against both layers).
    cluster.push(layered_server(
        4,
        &client,
        &server,
        &[8080, 9090],
        &[9090],
        vec![Sg, Np],
    ));
    assert_eq!(cluster.applied_version(), 4);
    cluster.assert_opens(&client, &server, false, 9090);
    cluster.assert_dropped(&client, &server, false, 8080);
    assert!(
        !common::data_gets_through(&mut held_c, &mut held_s),
        "version 4's NetworkPolicy no longer allows 8080: the held connection is cut\n{}",
        cluster.dump()
    );
}

/// The operator names a policy by a hash of its content, so a peer added to a group's ipBlocks
/// comes as a new policy id that the group's pods move to. When every pod of the old policy
/// moves to the new one, the agent changes the old one in place (the same datapath policy, one
/// host entry per address) rather than installing a copy of 2 000 peers and deleting the old.
#[test]
fn an_ip_block_joining_under_a_new_policy_id_changes_the_old_policy_in_place() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    let client = cluster.add_pod("client", 45);
    let server = cluster.add_pod("server", 46);
    let cli = policy("cli", vec![], vec![tcp(&[8080], hosts(&[&server]))]);
    cluster.push(snapshot(
        1,
        vec![cli, large_group_as("srv-a", None)],
        &[(&client, Some("cli")), (&server, Some("srv-a"))],
    ));
    cluster.assert_dropped(&client, &server, false, 8080);
    let first = datapath_policy(&cluster, &server);
    assert_eq!(host_entries(&cluster, first), 2_000);

    cluster.push(renamed(
        2,
        "srv-a",
        large_group_as("srv-b", Some(&client)),
        &server,
    ));
    for v6 in [false, true] {
        cluster.assert_opens(&client, &server, v6, 8080);
    }
    assert_eq!(
        datapath_policy(&cluster, &server),
        first,
        "the policy was installed anew, not changed in place\n{}",
        cluster.dump()
    );
    assert_eq!(
        host_entries(&cluster, first),
        2_002,
        "the client's two addresses added"
    );

    // Narrowing under re-check takes a new datapath policy (its id makes the datapath re-check
    // established connections), and the old one goes.
    cluster.push(renamed(3, "srv-b", large_group_as("srv-c", None), &server));
    let after = datapath_policy(&cluster, &server);
    assert_ne!(
        after, first,
        "a narrowing change under re-check takes a new id"
    );
    assert_eq!(host_entries(&cluster, after), 2_000);
    assert_eq!(host_entries(&cluster, first), 0, "the old version is gone");
    cluster.assert_dropped(&client, &server, false, 8080);
}

/// A policy two pods leave for two different ones is not changed in place: between the change
/// and the second pod's switch, that pod would get the first one's new rules.
#[test]
fn a_policy_whose_pods_leave_for_different_ones_is_not_changed_in_place() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    let client = cluster.add_pod("client", 47);
    let one = cluster.add_pod("server-1", 48);
    let two = cluster.add_pod("server-2", 49);
    let cli = policy("cli", vec![], vec![tcp(&[8080], hosts(&[&one, &two]))]);
    cluster.push(snapshot(
        1,
        vec![cli, large_group_as("srv-a", None)],
        &[
            (&client, Some("cli")),
            (&one, Some("srv-a")),
            (&two, Some("srv-a")),
        ],
    ));
    let first = datapath_policy(&cluster, &one);
    assert_eq!(datapath_policy(&cluster, &two), first);

    let mut update = renamed(2, "srv-a", large_group_as("srv-b", Some(&client)), &one);
    // The second pod's new policy: the same peers on another port.
    let mut other = large_group_as("srv-c", None);
    other.ingress[0] = tcp(&[8081], other.ingress[0].peers.clone());
    update.upsert_pods.push(pb::PodPolicy {
        pod: Some(two.pod_ref()),
        policy_id: other.id.clone(),
    });
    update.upsert_policies.push(other);
    cluster.push(update);
    cluster.assert_opens(&client, &one, false, 8080);
    cluster.assert_dropped(&client, &two, false, 8080);
    let (a, b) = (
        datapath_policy(&cluster, &one),
        datapath_policy(&cluster, &two),
    );
    assert!(
        a != first && b != first && a != b,
        "each pod has a policy of its own, neither the old one changed: {first} → {a}, {b}\n{}",
        cluster.dump()
    );
    assert_eq!(host_entries(&cluster, first), 0, "the old version is gone");
}

/// The datapath policy id `pod`'s interface points at.
fn datapath_policy(cluster: &Cluster, pod: &CniPod) -> u32 {
    let maps = cluster.agent.maps().expect("the agent's maps");
    maps.endpoints
        .get(&cluster.host_ifindex(pod), 0)
        .expect("the pod's endpoint")
        .policy_id
}

/// How many single-address peer entries datapath policy `id` has.
fn host_entries(cluster: &Cluster, id: u32) -> usize {
    let maps = cluster.agent.maps().expect("the agent's maps");
    maps.hosts
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.policy_id == id)
        .count()
}

/// Version `version`: policy `old` replaced by `new`, which `pod` moves to.
fn renamed(version: u64, old: &str, new: pb::Policy, pod: &CniPod) -> pb::PolicyUpdate {
    pb::PolicyUpdate {
        version,
        base_version: version - 1,
        remove_policies: vec![old.into()],
        upsert_pods: vec![pb::PodPolicy {
            pod: Some(pod.pod_ref()),
            policy_id: new.id.clone(),
        }],
        upsert_policies: vec![new],
        ..pb::PolicyUpdate::default()
    }
}

/// The server's policy: TCP 8080 from 2 000 filler hosts and, with `client`, the client.
fn large_group(client: Option<&CniPod>) -> pb::Policy {
    large_group_as("srv", client)
}

/// [`large_group`] under policy id `id`.
fn large_group_as(id: &str, client: Option<&CniPod>) -> pb::Policy {
    let mut peers: Vec<pb::PeerBlock> = (0..2_000)
        .map(|i| pb::PeerBlock {
            cidr: format!("10.88.{}.{}/32", i / 250, i % 250 + 1),
            except: vec![],
        })
        .collect();
    if let Some(c) = client {
        peers.extend(hosts(&[c]));
    }
    policy(id, vec![tcp(&[8080], peers)], vec![])
}

fn delta(version: u64, policy: pb::Policy) -> pb::PolicyUpdate {
    pb::PolicyUpdate {
        version,
        base_version: version - 1,
        upsert_policies: vec![policy],
        ..pb::PolicyUpdate::default()
    }
}

#[test]
fn a_peer_joining_a_large_group_changes_its_policy_in_place_and_one_leaving_switches_it() {
    kubesg_testkit::require_privileged!();
    let cluster = Cluster::connected(Startup::Deny);
    let client = cluster.add_pod("client", 43);
    let server = cluster.add_pod("server", 44);
    let cli = policy("cli", vec![], vec![tcp(&[8080], hosts(&[&server]))]);
    cluster.push(snapshot(
        1,
        vec![cli, large_group(None)],
        &[(&client, Some("cli")), (&server, Some("srv"))],
    ));
    cluster.assert_dropped(&client, &server, false, 8080);
    let policy_id = || datapath_policy(&cluster, &server);
    let hosts_of = |id| host_entries(&cluster, id);
    let first = policy_id();
    assert_eq!(hosts_of(first), 2_000);

    cluster.push(delta(2, large_group(Some(&client))));
    let (mut held_c, mut held_s) = cluster.assert_opens(&client, &server, false, 8080);
    cluster.assert_opens(&client, &server, true, 8080);
    assert_eq!(
        policy_id(),
        first,
        "the policy was switched, not changed in place\n{}",
        cluster.dump()
    );
    assert_eq!(hosts_of(first), 2_002, "the client's two addresses added");

    cluster.push(delta(3, large_group(None)));
    let after = policy_id();
    assert_ne!(
        after, first,
        "a narrowing change under re-check takes a new id"
    );
    assert_eq!(hosts_of(after), 2_000);
    assert_eq!(hosts_of(first), 0, "the old version is gone");
    cluster.assert_dropped(&client, &server, false, 8080);
    assert!(
        !common::data_gets_through(&mut held_c, &mut held_s),
        "the client left the group: its held connection is cut\n{}",
        cluster.dump()
    );
}
