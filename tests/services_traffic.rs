//! Traffic to a Service's ClusterIP across nodes, on the local two-node cluster (real operator
//! in manifests mode, real agents, the CNI chain, eBPF, real TCP): the client's node translates
//! the ClusterIP to the backend on the other node as kube-proxy does (an nftables DNAT in the
//! node's namespace, after the packet has left the client's interface), so the client's egress
//! is judged on the ClusterIP and the Service port, the backend's ingress on its own port, and
//! the reply comes back un-translated through the client's node. The one-node real cluster
//! (tests/cluster) covers same-node backends.

use std::{net::SocketAddr, time::Duration};

use kubesg_testkit::{
    cluster::{ClusterConfig, LocalCluster, PodSpec},
    probe::{self, echoes, Verdict},
};

const CLUSTER_IP4: &str = "10.96.7.7";
const CLUSTER_IP6: &str = "fd00:96::7";
const SERVICE_PORT: u16 = 15432;

/// The client may open 5432 to the db pods; `other` may open 5432 only to pods nobody runs.
const GROUPS: [&str; 3] = [
    "apiVersion: kubesg.io/v1alpha1\nkind: SecurityGroup\nmetadata: {name: client}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  egress:\n  - protocol: TCP\n    ports: [{port: 5432}]\n    to: [{podSelector: {matchLabels: {app: db}}}]\n",
    "apiVersion: kubesg.io/v1alpha1\nkind: SecurityGroup\nmetadata: {name: other}\nspec:\n  podSelector: {matchLabels: {app: other}}\n  egress:\n  - protocol: TCP\n    ports: [{port: 5432}]\n    to: [{podSelector: {matchLabels: {app: nobody}}}]\n",
    "apiVersion: kubesg.io/v1alpha1\nkind: SecurityGroup\nmetadata: {name: db}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - protocol: TCP\n    ports: [{port: postgres}]\n    from: [{podSelector: {matchLabels: {app: client}}}, {podSelector: {matchLabels: {app: other}}}]\n",
];

/// Translates the ClusterIP's port to `backend` in node namespace `netns` (kube-proxy's job).
fn dnat(netns: &str, family: &str, cluster_ip: &str, backend: SocketAddr) {
    let to = match backend {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let addr = if family == "ip" { "ip" } else { "ip6" };
    let rules = format!(
        "table {family} kubesg_svc {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n  {addr} daddr {cluster_ip} tcp dport {SERVICE_PORT} dnat to {to}\n }}\n}}\n"
    );
    let path = std::env::temp_dir().join(format!("kubesg-svc-{netns}-{family}.nft"));
    std::fs::write(&path, rules).expect("writing the nftables rules");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f"])
        .arg(&path)
        .output()
        .expect("running nft");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_cluster_ip_whose_backend_is_on_another_node_is_judged_as_the_backend_and_replies_return() {
    kubesg_testkit::require_privileged!();
    let mut cluster = LocalCluster::start(ClusterConfig::default()).expect("the local cluster");
    cluster
        .add_pod(PodSpec::new("client", 0).label("app", "client"))
        .expect("client");
    cluster
        .add_pod(PodSpec::new("other", 0).label("app", "other"))
        .expect("other");
    cluster
        .add_pod(
            PodSpec::new("db", 1)
                .label("app", "db")
                .tcp("postgres", 5432),
        )
        .expect("db");
    for g in GROUPS {
        cluster.apply_group(g).expect("a group");
    }
    let namespace = cluster.config().namespace.clone();
    std::fs::write(
        cluster.manifests_dir().join("service-db.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: {namespace}}}\nspec:\n  selector: {{app: db}}\n  ipFamilyPolicy: PreferDualStack\n  clusterIP: {CLUSTER_IP4}\n  clusterIPs: [{CLUSTER_IP4}, \"{CLUSTER_IP6}\"]\n  ports: [{{port: {SERVICE_PORT}, targetPort: postgres}}]\n"
        ),
    )
    .expect("writing the Service");
    for g in ["client", "other", "db"] {
        cluster.wait_programmed(g).expect("programmed");
    }
    cluster.wait_synced().expect("agents in sync");

    let client_node = cluster.node_netns(0).to_owned();
    for (v6, family, cluster_ip) in [(false, "ip", CLUSTER_IP4), (true, "ip6", CLUSTER_IP6)] {
        let db = cluster.pod("db").expect("db").addr(v6);
        dnat(&client_node, family, cluster_ip, SocketAddr::new(db, 5432));
        let service = SocketAddr::new(cluster_ip.parse().expect("an address"), SERVICE_PORT);

        // The client reaches the backend on node 2 through the ClusterIP, and data flows both
        // ways over the held connection (the replies come back un-translated).
        let client = cluster.pod("client").expect("client").ns();
        let mut stream = client
            .tcp_connect(None, service, probe::TCP_TIMEOUT)
            .unwrap_or_else(|e| panic!("client -> {service}: {e}\n{}", cluster.dump()));
        assert!(
            echoes(
                &mut stream,
                b"through the ClusterIP",
                Duration::from_secs(2)
            )
            .expect("echo"),
            "client -> {service}: no echo\n{}",
            cluster.dump()
        );
        // `other` is admitted by the backend's ingress but its own egress admits no db pod:
        // the ClusterIP is refused at its interface.
        let other = cluster.pod("other").expect("other").ns();
        assert_eq!(
            probe::tcp(other, service).expect("probe"),
            Verdict::Refused,
            "other -> {service}\n{}",
            cluster.dump()
        );
    }
}
