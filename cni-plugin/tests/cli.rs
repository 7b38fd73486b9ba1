//! The binary as a runtime sees it, without an agent: VERSION, every malformed invocation with
//! its CNI code, and what each command does when the agent's socket does not exist.

#[path = "support/plugin.rs"]
mod plugin;

use std::path::Path;

use kubesg_proto::pending_deletes;
use plugin::{attachment_env, run_plugin};
use serde_json::{json, Value};
use tempfile::TempDir;

/// A socket path in a fresh directory, where no agent listens.
fn absent_socket() -> (TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock").display().to_string();
    (dir, socket)
}

/// A bridge plugin's result for pod netns `netns`.
fn prev_result(netns: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "a6:2b:0a:c4:8c:ef"},
            {"name": "veth8ae5ce40", "mac": "7e:17:cb:f0:fe:bc"},
            {"name": "eth0", "mac": "8a:10:f6:3e:71:d1", "sandbox": netns},
        ],
        "ips": [
            {"interface": 2, "address": "10.99.0.2/24", "gateway": "10.99.0.1"},
            {"interface": 2, "address": "fd99::2/64", "gateway": "fd99::1"},
        ],
        "dns": {},
    })
}

fn config(version: &str, socket: &str, prev: Option<Value>) -> String {
    let mut conf = json!({
        "cniVersion": version,
        "name": "kubesg-test",
        "type": "kubesg-cni",
        "agentSocket": socket,
        "timeoutSeconds": 5,
    });
    if let Some(prev) = prev {
        conf["prevResult"] = prev;
    }
    conf.to_string()
}

const NETNS: &str = "/run/netns/kubesg-cli-test-pod";

#[test]
fn version_prints_the_supported_versions() {
    let run = run_plugin(&[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(run.exit_code, 0, "{}", run.stderr);
    assert_eq!(
        run.json(),
        json!({
            "cniVersion": "1.1.0",
            "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
        })
    );
}

#[test]
fn missing_cni_command_is_code_4() {
    let run = run_plugin(&[], "{}");
    let err = run.assert_error(4);
    assert!(err["details"]
        .as_str()
        .unwrap_or_default()
        .contains("CNI_COMMAND"));
}

#[test]
fn unknown_cni_command_is_code_4() {
    run_plugin(&[("CNI_COMMAND", "EXPLODE")], "{}").assert_error(4);
}

#[test]
fn each_missing_required_variable_is_code_4_whatever_stdin_holds() {
    let (_dir, socket) = absent_socket();
    let conf = config("1.0.0", &socket, Some(prev_result(NETNS)));
    let required: &[(&str, &[&str])] = &[
        ("ADD", &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
        ("CHECK", &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]),
        ("DEL", &["CNI_CONTAINERID", "CNI_IFNAME"]),
    ];
    for (command, vars) in required {
        for var in *vars {
            let env: Vec<(&str, &str)> = attachment_env(command, "c1", NETNS, "eth0")
                .into_iter()
                .filter(|(k, _)| k != var)
                .collect();
            for stdin in [conf.as_str(), "not json"] {
                let run = run_plugin(&env, stdin);
                let err = run.assert_error(4);
                let details = err["details"].as_str().unwrap_or_default();
                assert!(details.contains(var), "{command} without {var}: {details}");
            }
        }
    }
}

#[test]
fn invalid_container_id_is_code_4() {
    let (_dir, socket) = absent_socket();
    let env = attachment_env("ADD", "bad id!", NETNS, "eth0");
    run_plugin(&env, &config("1.0.0", &socket, Some(prev_result(NETNS)))).assert_error(4);
}

/// stdin is read up to 1 MiB: a larger configuration (valid JSON here) is refused with code 7
/// rather than held whole.
#[test]
fn a_configuration_over_1_mib_is_code_7() {
    let (_dir, socket) = absent_socket();
    let mut conf: Value = serde_json::from_str(&config("1.0.0", &socket, None)).expect("JSON");
    conf["padding"] = Value::String("x".repeat(2 << 20));
    let env = attachment_env("DEL", "c1", NETNS, "eth0");
    let err = run_plugin(&env, &conf.to_string()).assert_error(7);
    assert!(
        err["details"]
            .as_str()
            .unwrap_or_default()
            .contains("larger than 1048576 bytes"),
        "{err}"
    );
}

#[test]
fn unsupported_version_is_code_1_in_the_latest_version() {
    let (_dir, socket) = absent_socket();
    for version in ["0.2.0", "1.2.0"] {
        let env = attachment_env("ADD", "c1", NETNS, "eth0");
        let run = run_plugin(&env, &config(version, &socket, Some(prev_result(NETNS))));
        let err = run.assert_error(1);
        assert_eq!(err["msg"], "incompatible CNI version");
        assert_eq!(err["cniVersion"], "1.1.0");
        assert!(err["details"]
            .as_str()
            .unwrap_or_default()
            .contains(version));
    }
}

#[test]
fn malformed_json_is_code_6() {
    let env = attachment_env("ADD", "c1", NETNS, "eth0");
    for stdin in ["", "{\"cniVersion\": ", "cniVersion=1.0.0"] {
        run_plugin(&env, stdin).assert_error(6);
    }
}

#[test]
fn add_and_check_without_prev_result_are_code_7() {
    let (_dir, socket) = absent_socket();
    for command in ["ADD", "CHECK"] {
        let env = attachment_env(command, "c1", NETNS, "eth0");
        let err = run_plugin(&env, &config("1.0.0", &socket, None)).assert_error(7);
        assert!(err["details"]
            .as_str()
            .unwrap_or_default()
            .contains("prevResult"));
    }
}

#[test]
fn errors_are_printed_in_the_config_version() {
    let (_dir, socket) = absent_socket();
    let env = attachment_env("ADD", "c1", NETNS, "eth0");
    let err = run_plugin(&env, &config("0.4.0", &socket, None)).assert_error(7);
    assert_eq!(err["cniVersion"], "0.4.0");
}

#[test]
fn add_whose_prev_result_lacks_the_pod_interface_is_code_7() {
    let (_dir, socket) = absent_socket();
    let env = attachment_env("ADD", "c1", NETNS, "net1");
    let err = run_plugin(&env, &config("1.0.0", &socket, Some(prev_result(NETNS)))).assert_error(7);
    assert!(err["details"].as_str().unwrap_or_default().contains("net1"));
}

#[test]
fn add_when_the_agent_socket_does_not_exist_is_code_11() {
    let (_dir, socket) = absent_socket();
    let env = attachment_env("ADD", "c1", NETNS, "eth0");
    let err =
        run_plugin(&env, &config("1.0.0", &socket, Some(prev_result(NETNS)))).assert_error(11);
    assert!(err["details"]
        .as_str()
        .unwrap_or_default()
        .contains(&socket));
}

#[test]
fn add_when_nobody_listens_on_the_socket_is_code_11() {
    let (_dir, socket) = absent_socket();
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    let env = attachment_env("ADD", "c1", NETNS, "eth0");
    run_plugin(&env, &config("1.0.0", &socket, Some(prev_result(NETNS)))).assert_error(11);
}

/// The attachments whose DEL is queued beside `socket` for the agent.
fn queued_deletes(socket: &str) -> Vec<(String, String)> {
    let dir = pending_deletes::dir_beside(Path::new(socket));
    pending_deletes::read_all(&dir)
        .expect("reading the queue")
        .into_iter()
        .map(|p| {
            let key = p.key.expect("a readable queued DEL");
            (key.container_id, key.ifname)
        })
        .collect()
}

#[test]
fn del_when_the_agent_socket_does_not_exist_succeeds_and_queues_the_deletion() {
    let (_dir, socket) = absent_socket();
    let env: Vec<(&str, &str)> = attachment_env("DEL", "c1", NETNS, "eth0")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    for conf in [
        config("1.0.0", &socket, None),
        config("0.3.1", &socket, Some(prev_result(NETNS))),
        config("1.0.0", &socket, Some(json!("not a result"))),
    ] {
        let run = run_plugin(&env, &conf);
        run.assert_silent_success();
        assert!(
            run.stderr.contains("does not exist") && run.stderr.contains("queued"),
            "stderr: {}",
            run.stderr
        );
        assert_eq!(queued_deletes(&socket), [("c1".into(), "eth0".into())]);
    }
}

#[test]
fn del_when_nobody_listens_on_the_socket_succeeds_and_queues_the_deletion() {
    let (_dir, socket) = absent_socket();
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    let env = attachment_env("DEL", "c1", NETNS, "eth0");
    run_plugin(&env, &config("1.0.0", &socket, None)).assert_silent_success();
    let env = attachment_env("DEL", "c2", NETNS, "net1");
    run_plugin(&env, &config("1.0.0", &socket, None)).assert_silent_success();
    assert_eq!(
        queued_deletes(&socket),
        [("c1".into(), "eth0".into()), ("c2".into(), "net1".into())]
    );
}

#[test]
fn del_where_no_agent_ever_ran_succeeds_and_queues_nothing() {
    let (dir, _) = absent_socket();
    let socket = dir.path().join("never-created").join("agent.sock");
    let env = attachment_env("DEL", "c1", NETNS, "eth0");
    let run = run_plugin(&env, &config("1.0.0", &socket.display().to_string(), None));
    run.assert_silent_success();
    assert!(
        run.stderr.contains("no agent ever ran"),
        "stderr: {}",
        run.stderr
    );
    assert!(
        !socket.parent().expect("parent").exists(),
        "nothing created"
    );
}

#[test]
fn del_that_can_neither_reach_the_agent_nor_be_queued_is_code_11() {
    let (_dir, socket) = absent_socket();
    // A file where the queue directory belongs: the deletion cannot be written.
    std::fs::write(
        pending_deletes::dir_beside(Path::new(&socket)),
        b"in the way",
    )
    .expect("file");
    let env = attachment_env("DEL", "c1", NETNS, "eth0");
    let err = run_plugin(&env, &config("1.0.0", &socket, None)).assert_error(11);
    assert!(
        err["details"]
            .as_str()
            .unwrap_or_default()
            .contains("queueing the deletion"),
        "{err}"
    );
}

#[test]
fn check_without_agent_is_code_11() {
    let (_dir, socket) = absent_socket();
    let env = attachment_env("CHECK", "c1", NETNS, "eth0");
    run_plugin(&env, &config("1.0.0", &socket, Some(prev_result(NETNS)))).assert_error(11);
}

#[test]
fn check_in_a_version_before_0_4_0_is_code_1() {
    let (_dir, socket) = absent_socket();
    let env = attachment_env("CHECK", "c1", NETNS, "eth0");
    run_plugin(&env, &config("0.3.1", &socket, Some(prev_result(NETNS)))).assert_error(1);
}

#[test]
fn status_without_agent_is_code_50_with_the_reason() {
    let (_dir, socket) = absent_socket();
    let run = run_plugin(
        &[("CNI_COMMAND", "STATUS")],
        &config("1.1.0", &socket, None),
    );
    let err = run.assert_error(50);
    assert_eq!(err["msg"], "the plugin is not available");
    assert!(err["details"]
        .as_str()
        .unwrap_or_default()
        .contains(&socket));
}

#[test]
fn status_and_gc_before_1_1_0_are_code_1() {
    let (_dir, socket) = absent_socket();
    for command in ["STATUS", "GC"] {
        run_plugin(&[("CNI_COMMAND", command)], &config("1.0.0", &socket, None)).assert_error(1);
    }
}

#[test]
fn gc_without_agent_succeeds() {
    let (_dir, socket) = absent_socket();
    let mut conf: Value =
        serde_json::from_str(&config("1.1.0", &socket, None)).expect("config is JSON");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "eth0"}]);
    run_plugin(&[("CNI_COMMAND", "GC")], &conf.to_string()).assert_silent_success();
}

#[test]
fn missing_network_name_is_code_7() {
    let (_dir, socket) = absent_socket();
    let mut conf: Value =
        serde_json::from_str(&config("1.0.0", &socket, None)).expect("config is JSON");
    conf.as_object_mut().expect("object").remove("name");
    let env = attachment_env("DEL", "c1", NETNS, "eth0");
    run_plugin(&env, &conf.to_string()).assert_error(7);
}
