//! The binary against a fake agent: what DEL, CHECK, STATUS and GC ask it and how each answer
//! becomes a CNI outcome. (ADD needs a real veth: see bridge_chain.rs.)

#[path = "support/fake_agent.rs"]
mod fake_agent;
#[path = "support/plugin.rs"]
mod plugin;

use std::time::Duration;

use fake_agent::{endpoint, FakeAgent};
use kubesg_proto::v1alpha1::{EndpointKey, StatusResponse};
use plugin::{attachment_env, run_plugin};
use serde_json::{json, Value};

const NETNS: &str = "/run/netns/kubesg-fake-agent-pod";

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth1", "mac": "7e:17:cb:f0:fe:bc"},
            {"name": "eth0", "mac": "8a:10:f6:3e:71:d1", "sandbox": NETNS},
        ],
        "ips": [{"interface": 1, "address": "10.99.0.2/24"}],
    })
}

fn config(agent: &FakeAgent, version: &str, extra: Value) -> String {
    let mut conf = json!({
        "cniVersion": version,
        "name": "kubesg-test",
        "type": "kubesg-cni",
        "agentSocket": agent.socket_str(),
        "timeoutSeconds": 5,
    });
    if let (Some(conf), Value::Object(extra)) = (conf.as_object_mut(), extra) {
        conf.extend(extra);
    }
    conf.to_string()
}

fn key(container_id: &str, ifname: &str) -> EndpointKey {
    EndpointKey {
        container_id: container_id.to_owned(),
        ifname: ifname.to_owned(),
    }
}

#[test]
fn del_asks_the_agent_to_forget_the_endpoint() {
    let agent = FakeAgent::start();
    agent.state().endpoints.push(endpoint("c1", "eth0"));
    let env = attachment_env("DEL", "c1", NETNS, "eth0");
    run_plugin(&env, &config(&agent, "1.0.0", json!({}))).assert_silent_success();
    let state = agent.state();
    assert_eq!(state.deleted, [key("c1", "eth0")]);
    assert!(state.endpoints.is_empty());
}

#[test]
fn del_of_an_endpoint_the_agent_does_not_know_succeeds() {
    let agent = FakeAgent::start();
    let env = attachment_env("DEL", "c1", NETNS, "eth0");
    let run = run_plugin(
        &env,
        &config(&agent, "0.4.0", json!({"prevResult": prev_result()})),
    );
    run.assert_silent_success();
    assert_eq!(agent.state().deleted, [key("c1", "eth0")]);
}

#[test]
fn check_of_an_enforced_endpoint_succeeds() {
    let agent = FakeAgent::start();
    agent.state().endpoints.push(endpoint("c1", "eth0"));
    let env = attachment_env("CHECK", "c1", NETNS, "eth0");
    run_plugin(
        &env,
        &config(&agent, "1.0.0", json!({"prevResult": prev_result()})),
    )
    .assert_silent_success();
    assert_eq!(agent.state().checked, [key("c1", "eth0")]);
}

#[test]
fn check_of_an_endpoint_the_agent_does_not_know_is_code_100() {
    let agent = FakeAgent::start();
    let env = attachment_env("CHECK", "c1", NETNS, "eth0");
    let run = run_plugin(
        &env,
        &config(&agent, "1.0.0", json!({"prevResult": prev_result()})),
    );
    let err = run.assert_error(100);
    assert!(err["details"]
        .as_str()
        .unwrap_or_default()
        .contains("c1/eth0"));
}

#[test]
fn check_of_an_endpoint_whose_programs_are_detached_is_code_101_with_the_agents_reason() {
    let agent = FakeAgent::start();
    {
        let mut state = agent.state();
        state.endpoints.push(endpoint("c1", "eth0"));
        state.attached = false;
        state.problem = "tc program missing on ingress".to_owned();
    }
    let env = attachment_env("CHECK", "c1", NETNS, "eth0");
    let run = run_plugin(
        &env,
        &config(&agent, "1.1.0", json!({"prevResult": prev_result()})),
    );
    let err = run.assert_error(101);
    assert!(err["details"]
        .as_str()
        .unwrap_or_default()
        .contains("tc program missing on ingress"));
}

#[test]
fn check_whose_prev_result_lacks_the_pod_interface_is_code_7_without_asking_the_agent() {
    let agent = FakeAgent::start();
    let env = attachment_env("CHECK", "c1", "/run/netns/other", "eth0");
    run_plugin(
        &env,
        &config(&agent, "1.0.0", json!({"prevResult": prev_result()})),
    )
    .assert_error(7);
    assert!(agent.state().checked.is_empty());
}

#[test]
fn status_of_a_ready_agent_succeeds() {
    let agent = FakeAgent::start();
    run_plugin(
        &[("CNI_COMMAND", "STATUS")],
        &config(&agent, "1.1.0", json!({})),
    )
    .assert_silent_success();
}

#[test]
fn status_of_an_agent_that_is_not_ready_is_code_50_with_its_message() {
    let agent = FakeAgent::start();
    agent.state().status = StatusResponse {
        ready: false,
        message: "datapath not loaded".to_owned(),
    };
    let run = run_plugin(
        &[("CNI_COMMAND", "STATUS")],
        &config(&agent, "1.1.0", json!({})),
    );
    let err = run.assert_error(50);
    assert!(err["details"]
        .as_str()
        .unwrap_or_default()
        .contains("datapath not loaded"));
}

#[test]
fn gc_deletes_the_endpoints_missing_from_the_valid_attachments_only() {
    let agent = FakeAgent::start();
    agent.state().endpoints.extend([
        endpoint("keep", "eth0"),
        endpoint("stale", "eth0"),
        endpoint("keep", "net1"),
    ]);
    let conf = config(
        &agent,
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}),
    );
    run_plugin(&[("CNI_COMMAND", "GC")], &conf).assert_silent_success();
    let state = agent.state();
    let mut deleted = state.deleted.clone();
    deleted.sort_by(|a, b| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
    assert_eq!(deleted, [key("keep", "net1"), key("stale", "eth0")]);
    assert_eq!(state.endpoints, [endpoint("keep", "eth0")]);
}

#[test]
fn gc_without_valid_attachments_deletes_nothing() {
    let agent = FakeAgent::start();
    agent.state().endpoints.push(endpoint("c1", "eth0"));
    run_plugin(
        &[("CNI_COMMAND", "GC")],
        &config(&agent, "1.1.0", json!({})),
    )
    .assert_silent_success();
    assert!(agent.state().deleted.is_empty());
}

#[test]
fn agent_that_does_not_answer_in_time_is_code_11() {
    let agent = FakeAgent::start();
    agent.state().endpoints.push(endpoint("c1", "eth0"));
    agent.state().delay = Duration::from_secs(3);
    let env = attachment_env("DEL", "c1", NETNS, "eth0");
    let run = run_plugin(&env, &config(&agent, "1.0.0", json!({"timeoutSeconds": 1})));
    let err = run.assert_error(11);
    let details = err["details"].as_str().unwrap_or_default();
    assert!(details.to_lowercase().contains("timeout"), "{details}");
}
