//! Runs the built `kubesg-cni` binary the way a runtime does: a clean environment with the
//! `CNI_*` variables, the config on stdin, the answer on stdout.
// Each test crate includes this file and uses part of it.
#![allow(dead_code)]

use std::{
    io::Write,
    process::{Command, Stdio},
};

use serde_json::Value;

/// What one run of the plugin gave.
#[derive(Debug)]
pub struct PluginRun {
    /// The exit status (-1 when killed by a signal).
    pub exit_code: i32,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr (the logs).
    pub stderr: String,
}

impl PluginRun {
    /// stdout as one JSON value; fails the test when stdout is anything else.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON value ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts the run failed with CNI error `code`: non-zero exit, and stdout exactly one error
    /// object with `cniVersion`, `code`, `msg` and `details`. Returns the error object.
    pub fn assert_error(&self, code: u64) -> Value {
        assert_ne!(
            self.exit_code, 0,
            "expected failure; stderr:\n{}",
            self.stderr
        );
        let err = self.json();
        assert_eq!(err["code"], code, "error: {err}\nstderr:\n{}", self.stderr);
        for key in ["cniVersion", "msg", "details"] {
            assert!(err[key].is_string(), "{key} missing from {err}");
        }
        assert_eq!(err.as_object().map(|o| o.len()), Some(4), "{err}");
        err
    }

    /// Asserts the run succeeded with nothing on stdout (DEL, CHECK, STATUS, GC).
    pub fn assert_silent_success(&self) {
        assert_eq!(
            self.exit_code, 0,
            "expected success; stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert_eq!(
            self.stdout, "",
            "stdout must be empty; stderr:\n{}",
            self.stderr
        );
    }
}

/// Runs the plugin with exactly `env` (plus `PATH`) and `stdin`.
pub fn run_plugin(env: &[(&str, &str)], stdin: &str) -> PluginRun {
    run(Command::new(env!("CARGO_BIN_EXE_kubesg-cni")), env, stdin)
}

/// Runs the plugin as user `uid` (and its group), as a process other than the runtime would.
pub fn run_plugin_as(uid: u32, env: &[(&str, &str)], stdin: &str) -> PluginRun {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubesg-cni"));
    cmd.uid(uid).gid(uid);
    run(cmd, env, stdin)
}

/// Runs the plugin inside the named network namespace (`ip netns exec`, which also mounts that
/// namespace's /sys), as a runtime on that node would.
pub fn run_plugin_in(netns: &str, env: &[(&str, &str)], stdin: &str) -> PluginRun {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_kubesg-cni")]);
    run(cmd, env, stdin)
}

fn run(mut cmd: Command, env: &[(&str, &str)], stdin: &str) -> PluginRun {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning kubesg-cni");
    // A plugin that fails before reading stdin (VERSION, a bad environment) may have closed it.
    let written = child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(stdin.as_bytes());
    if let Err(e) = written {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "writing stdin: {e}"
        );
    }
    let out = child.wait_with_output().expect("waiting for kubesg-cni");
    PluginRun {
        exit_code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The `CNI_*` variables of an attachment command.
pub fn attachment_env<'a>(
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
    ifname: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}
