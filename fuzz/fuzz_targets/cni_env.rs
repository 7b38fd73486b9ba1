//! The CNI plugin's environment on any values: `CniEnv::from_lookup` (the `CNI_*` variables, as
//! `from_process` reads them, given as data here), `Command::parse` and `CniArgs::parse`. Never
//! a panic; every refusal is code 4 (invalid environment); what is accepted is what the spec
//! requires of each command.
//!
//! Input: the values of CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and CNI_ARGS, in
//! that order, separated by NUL bytes (an environment variable cannot hold one). A value that is
//! not UTF-8 is unset, as `std::env::var(..).ok()` leaves it; so is a missing one.

#![no_main]

use kubesg_cni::{
    env::{CniArgs, CniEnv, Command},
    error::ErrorCode,
};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 5] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
];

fuzz_target!(|data: &[u8]| {
    let mut values: [Option<&str>; 5] = [None; 5];
    for (slot, raw) in values.iter_mut().zip(data.split(|b| *b == 0)) {
        *slot = std::str::from_utf8(raw).ok();
    }
    let get = |name: &str| {
        NAMES
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values[i])
            .map(str::to_owned)
    };
    let set = |i: usize| values[i].filter(|v| !v.is_empty());

    // CNI_ARGS on its own, as ADD parses it whatever the rest says.
    if let Some(raw) = values[4] {
        match CniArgs::parse(raw) {
            Ok(args) => {
                if let Some(pod) = args.pod() {
                    assert!(!pod.namespace.is_empty() || !pod.name.is_empty());
                }
            }
            Err(err) => assert_eq!(err.code, ErrorCode::InvalidEnvironment, "CNI_ARGS: {err}"),
        }
    }

    let env = match CniEnv::from_lookup(get) {
        Ok(env) => env,
        Err(err) => {
            assert_eq!(err.code, ErrorCode::InvalidEnvironment, "{err}");
            return;
        }
    };
    let command = set(0).and_then(Command::parse);
    assert_eq!(Some(env.command), command, "the command is CNI_COMMAND's");
    assert_eq!(env.args, values[4].unwrap_or_default());
    let attachment_command = matches!(env.command, Command::Add | Command::Del | Command::Check);
    assert_eq!(env.attachment.is_some(), attachment_command);
    assert_eq!(env.attachment().is_ok(), attachment_command);
    if let Some(a) = &env.attachment {
        assert_eq!(Some(a.container_id.as_str()), set(1));
        assert_eq!(Some(a.ifname.as_str()), set(3));
        assert!(a.ifname.len() <= 15 && a.ifname != "." && a.ifname != "..");
        assert!(a
            .container_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric()));
        if matches!(env.command, Command::Add | Command::Check) {
            assert!(a.netns.is_some(), "ADD and CHECK have a netns");
        }
    }
});
