//! kubesg-cni after a real primary plugin: Debian's `bridge` + `host-local` attach a pod netns to
//! a node netns, and host-side interface discovery must find the veth the bridge plugin created
//! (from its result, and from the kernel alone) and the pod's addresses; ADD must register exactly
//! that with the agent (the real kubesg-agent process, in the node namespace) and pass the result
//! on unchanged.

#[path = "support/bridge.rs"]
mod bridge;
#[path = "support/plugin.rs"]
mod plugin;

use std::{collections::BTreeSet, path::Path};

use bridge::{BridgeChain, BRIDGE, IFNAME};
use ipnet::IpNet;
use kubesg_cni::{
    config::CniVersion,
    error::{CniError, ErrorCode},
    result::CniResult,
    veth::{self, DiscoveryError, HostVeth, Source},
};
use kubesg_proto::v1alpha1::{EndpointKey, PodRef};
use kubesg_testkit::{
    agent::{AgentConfig, AgentProcess, Startup},
    netns::{unique_name, Netns},
};
use plugin::{attachment_env, run_plugin_in};
use serde_json::{json, Value};

/// The host end the bridge plugin reports: the host-side interface that is not the bridge.
fn reported_veth(result: &Value) -> String {
    let names: Vec<&str> = result["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .filter(|i| i.get("sandbox").is_none())
        .filter_map(|i| i["name"].as_str())
        .filter(|n| *n != BRIDGE)
        .collect();
    assert_eq!(names.len(), 1, "bridge result: {result}");
    names[0].to_owned()
}

/// The global addresses of the pod's interface, as the kernel has them (and its link-local ones
/// with `link_local`).
fn kernel_addresses(chain: &BridgeChain, link_local: bool) -> BTreeSet<IpNet> {
    let out = chain
        .pod
        .ip(&["-j", "addr", "show", "dev", IFNAME])
        .expect("ip addr");
    let links: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    links[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["scope"] == "global" || (link_local && a["scope"] == "link"))
        .map(|a| {
            format!("{}/{}", a["local"].as_str().expect("local"), a["prefixlen"])
                .parse()
                .expect("CIDR")
        })
        .collect()
}

fn parse(result: &Value) -> CniResult {
    CniResult::from_value(result.clone(), CniVersion::V1_0_0).expect("bridge result parses")
}

#[test]
fn prev_result_gives_the_bridge_plugins_host_veth_and_the_pods_addresses() {
    kubesg_testkit::require_privileged!();
    let chain = BridgeChain::new();
    let raw = chain.add();
    let result = parse(&raw);
    let netns = chain.netns_path();
    let name = reported_veth(&raw);
    let want = HostVeth {
        ifindex: chain.node.ifindex(&name).expect("veth in node netns"),
        name,
    };

    let found = chain
        .node
        .enter(|| veth::discover_host_veth(&result, Path::new(&netns), IFNAME))
        .expect("discovery");
    assert_eq!(found, (want, Source::PrevResult));

    let pod_index = result
        .pod_interface(Path::new(&netns), IFNAME)
        .expect("pod interface");
    let ips: BTreeSet<IpNet> = result.pod_ips(pod_index).into_iter().collect();
    assert_eq!(ips, kernel_addresses(&chain, false));
    assert!(ips.iter().any(|n| matches!(n, IpNet::V4(_))), "{ips:?}");
    assert!(ips.iter().any(|n| matches!(n, IpNet::V6(_))), "{ips:?}");
}

#[test]
fn iflink_fallback_finds_the_same_veth_without_prev_result_naming_it() {
    kubesg_testkit::require_privileged!();
    let chain = BridgeChain::new();
    let raw = chain.add();
    let netns = chain.netns_path();
    let name = reported_veth(&raw);
    let want = HostVeth {
        ifindex: chain.node.ifindex(&name).expect("veth in node netns"),
        name,
    };

    let by_iflink = chain
        .node
        .enter(|| veth::host_veth_by_iflink(Path::new(&netns), IFNAME))
        .expect("iflink discovery");
    assert_eq!(by_iflink, want);

    // A primary plugin that reports only the pod side.
    let mut pod_only = raw.clone();
    pod_only["interfaces"] = json!([{"name": IFNAME, "sandbox": netns}]);
    pod_only["ips"] = json!(raw["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|ip| {
            let mut ip = ip.clone();
            ip["interface"] = json!(0);
            ip
        })
        .collect::<Vec<_>>());
    let result = parse(&pod_only);
    let found = chain
        .node
        .enter(|| veth::discover_host_veth(&result, Path::new(&netns), IFNAME))
        .expect("discovery");
    assert_eq!(found, (want, Source::Iflink));
}

#[test]
fn veth_named_in_prev_result_whose_peer_is_not_in_the_pod_is_not_taken() {
    kubesg_testkit::require_privileged!();
    let chain = BridgeChain::new();
    let raw = chain.add();
    let netns = chain.netns_path();
    let real = reported_veth(&raw);
    let (decoy, decoy_peer) = (unique_name("vd"), unique_name("vd"));
    chain
        .node
        .ip(&[
            "link",
            "add",
            &decoy,
            "type",
            "veth",
            "peer",
            "name",
            &decoy_peer,
        ])
        .expect("decoy veth pair");
    let mut lying = raw.clone();
    for iface in lying["interfaces"].as_array_mut().expect("interfaces") {
        if iface["name"] == real.as_str() {
            iface["name"] = json!(decoy);
        }
    }
    let result = parse(&lying);

    let named = chain
        .node
        .enter(|| veth::host_veths_in_result(&result, Path::new(&netns)))
        .expect("candidates");
    assert_eq!(named, []);
    let (found, source) = chain
        .node
        .enter(|| veth::discover_host_veth(&result, Path::new(&netns), IFNAME))
        .expect("discovery");
    assert_eq!(found.name, real);
    assert_eq!(source, Source::Iflink);
}

#[test]
fn pod_interface_that_is_not_a_veth_is_refused_as_invalid_config() {
    kubesg_testkit::require_privileged!();
    let chain = BridgeChain::new();
    chain.add();
    let netns = chain.netns_path();
    let err = chain
        .node
        .enter(|| veth::host_veth_by_iflink(Path::new(&netns), "lo"))
        .expect_err("lo is not a veth");
    assert!(matches!(err, DiscoveryError::NotVeth { .. }), "{err}");
    assert_eq!(CniError::from(err).code, ErrorCode::InvalidNetworkConfig);
}

#[test]
fn pod_interface_missing_from_the_netns_is_container_unknown() {
    kubesg_testkit::require_privileged!();
    let chain = BridgeChain::new();
    chain.add();
    let netns = chain.netns_path();
    let err = chain
        .node
        .enter(|| veth::host_veth_by_iflink(Path::new(&netns), "eth9"))
        .expect_err("no eth9");
    assert!(
        matches!(err, DiscoveryError::PodInterfaceMissing { .. }),
        "{err}"
    );
    assert_eq!(CniError::from(err).code, ErrorCode::ContainerUnknown);
}

/// The kubesg-cni config chained after the bridge plugin.
fn chained_config(agent: &AgentProcess, prev: &Value) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "kubesg-test",
        "type": "kubesg-cni",
        "agentSocket": agent.socket().display().to_string(),
        "timeoutSeconds": 10,
        "prevResult": prev,
    })
    .to_string()
}

/// The agent as a real process in network namespace `netns`.
fn agent_in(netns: &str) -> AgentProcess {
    AgentProcess::start(netns, AgentConfig::new("node-a", Startup::Deny))
        .expect("starting kubesg-agent")
}

#[test]
fn add_registers_the_bridge_veth_and_pod_addresses_and_passes_the_result_on_unchanged() {
    kubesg_testkit::require_privileged!();
    let chain = BridgeChain::new();
    let prev = chain.add();
    let agent = agent_in(chain.node.name());
    let netns = chain.netns_path();
    let mut env = attachment_env("ADD", &chain.container_id, &netns, IFNAME);
    env.push((
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=u-1",
    ));

    let run = run_plugin_in(chain.node.name(), &env, &chained_config(&agent, &prev));
    assert_eq!(
        run.exit_code,
        0,
        "stdout: {}\nstderr: {}\nagent: {}",
        run.stdout,
        run.stderr,
        agent.log()
    );
    assert_eq!(run.json(), prev);

    let name = reported_veth(&prev);
    let endpoints = agent.list_endpoints().expect("ListEndpoints");
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    let endpoint = &endpoints[0];
    assert_eq!(
        endpoint.key,
        Some(EndpointKey {
            container_id: chain.container_id.clone(),
            ifname: IFNAME.to_owned(),
        })
    );
    assert_eq!(endpoint.netns, netns);
    let ifindex = chain.node.ifindex(&name).expect("veth");
    assert_eq!(endpoint.host_ifindex, ifindex);
    assert_eq!(endpoint.host_ifname, name);
    let ips: BTreeSet<IpNet> = endpoint
        .ips
        .iter()
        .map(|ip| ip.parse().expect("CIDR"))
        .collect();
    // The result's addresses and the pod's link-local one, which kubesg-cni reads from the pod's
    // namespace (the source check needs it).
    assert_eq!(ips, kernel_addresses(&chain, true));
    assert!(
        ips.iter()
            .any(|n| matches!(n, IpNet::V6(v6) if v6.addr().is_unicast_link_local())),
        "{ips:?}"
    );
    assert_eq!(
        endpoint.pod,
        Some(PodRef {
            namespace: "shop".to_owned(),
            name: "cart-0".to_owned(),
            uid: "u-1".to_owned(),
        })
    );
    // Registered means enforced: the datapath has the endpoint and the programs are attached.
    assert!(agent.datapath_has_endpoint(ifindex).expect("maps"));
    assert_eq!(agent.pinned_links(ifindex).expect("links").len(), 2);
}

#[test]
fn add_refused_by_the_agent_as_failed_precondition_is_code_7_with_its_message() {
    kubesg_testkit::require_privileged!();
    let chain = BridgeChain::new();
    let prev = chain.add();
    // The agent runs in another network namespace than the plugin (a misdeployed agent): the
    // host veth the plugin found is not there, which the agent refuses as a failed
    // precondition.
    let elsewhere = Netns::new("ce").expect("another netns");
    let agent = agent_in(elsewhere.name());
    let netns = chain.netns_path();
    let mut env = attachment_env("ADD", &chain.container_id, &netns, IFNAME);
    env.push((
        "CNI_ARGS",
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=u-1",
    ));

    let run = run_plugin_in(chain.node.name(), &env, &chained_config(&agent, &prev));
    let err = run.assert_error(7);
    let details = err["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("FailedPrecondition")
            && details.contains(&reported_veth(&prev))
            && details.contains("does not exist"),
        "the agent's message: {details}"
    );
    assert_eq!(agent.list_endpoints().expect("ListEndpoints"), []);
    assert!(agent.records().expect("records").is_empty());
}
