//! What `kubesg-agent endpoints` shows: each pod interface with its addresses, its policy (as the
//! operator named it and as the datapath holds it), where its enforcement stands, and its
//! counters. Read from the agent's state directory and the pinned maps, so it works whether or
//! not the agent runs.

use std::{fmt::Write as _, path::Path};

use crate::{
    counters,
    desired::{Assignment, DesiredState},
    endpoints::{EndpointRecord, EndpointStore},
    enforcer::desired_state_path,
    maps::Maps,
};

/// The endpoint records and the last applied state in `state_dir`.
pub fn load_state(state_dir: &Path) -> anyhow::Result<(Vec<EndpointRecord>, DesiredState)> {
    let records = EndpointStore::open(&state_dir.join("endpoints"))?.load_all()?;
    let desired = match std::fs::read(desired_state_path(state_dir)) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DesiredState::default(),
        Err(e) => return Err(e.into()),
    };
    Ok((records, desired))
}

/// The endpoints table.
pub fn endpoints_table(
    records: &[EndpointRecord],
    desired: &DesiredState,
    maps: Option<&Maps>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<32} {:<24} {:<16} {:<34} {:<18} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "POD",
        "CONTAINER/IF",
        "HOST IF",
        "IPS",
        "POLICY",
        "DP-ID",
        "ACCEPTED",
        "DROP-POL",
        "DROP-INV",
        "DROP-SPOOF"
    );
    for r in records {
        let policy = match desired.assignment(&r.pod) {
            Assignment::Unknown => "(pending)".to_string(),
            Assignment::NonMember => "(none)".to_string(),
            Assignment::Member(p) => p,
        };
        let (dp_id, totals) = match maps {
            Some(m) => match m.endpoints.get(&r.host_ifindex, 0) {
                Ok(ep) => (
                    ep.policy_id.to_string(),
                    counters::read(m, ep.counter_slot).ok().map(|c| {
                        (
                            c[0].accepted + c[1].accepted,
                            c[0].dropped_policy + c[1].dropped_policy,
                            c[0].dropped_invalid + c[1].dropped_invalid,
                            c[0].dropped_spoofed,
                        )
                    }),
                ),
                Err(_) => ("missing".to_string(), None),
            },
            None => ("-".to_string(), None),
        };
        let (acc, dpol, dinv, dspoof) = totals
            .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
            .unwrap_or_else(|| ("-".into(), "-".into(), "-".into(), "-".into()));
        let cid: String = r.key.container_id.chars().take(12).collect();
        let ips: Vec<String> = r.ips.iter().map(|n| n.addr().to_string()).collect();
        let _ = writeln!(
            s,
            "{:<32} {:<24} {:<16} {:<34} {:<18} {:>8} {:>10} {:>10} {:>10} {:>10}",
            r.pod.to_string(),
            format!("{cid}/{}", r.key.ifname),
            format!("{}({})", r.host_ifname, r.host_ifindex),
            ips.join(","),
            policy,
            dp_id,
            acc,
            dpol,
            dinv,
            dspoof
        );
    }
    let _ = writeln!(s, "applied version: {}", desired.version);
    s
}
