//! What `kubesg-agent endpoints` shows: each pod interface with its addresses, its policy (as the
//! operator named it and as the datapath holds it), where its enforcement stands, and its
//! counters. Read from the agent's state directory and the pinned maps, so it works whether or
//! not the agent runs.

use std::{collections::BTreeSet, fmt::Write as _, path::Path};

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
            Assignment::Unknown if desired.other_uid(&r.pod).is_some() => {
                "(pending: uid-mismatch)".to_string()
            }
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
    // The operator's side of the same comparison: pods it places here that have no endpoint
    // run without kubesg's programs once they are up (the operator, which sees their
    // addresses, reports those as not enforced; here they may also be starting).
    let with_endpoint: BTreeSet<(&str, &str)> = records
        .iter()
        .map(|r| (r.pod.namespace.as_str(), r.pod.name.as_str()))
        .collect();
    let without: Vec<String> = desired
        .pods
        .keys()
        .filter(|(ns, name)| !with_endpoint.contains(&(ns.as_str(), name.as_str())))
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect();
    if !without.is_empty() {
        let _ = writeln!(
            s,
            "placed on this node without an endpoint ({}; not enforced unless still starting: \
             a pod set up without kubesg in the CNI chain): {}",
            without.len(),
            without.join(", ")
        );
    }
    let _ = writeln!(s, "applied version: {}", desired.version);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        desired::PodAssignment,
        endpoints::{EndpointKey, PodRef},
    };

    fn record(name: &str, uid: &str, ifindex: u32) -> EndpointRecord {
        EndpointRecord {
            key: EndpointKey {
                container_id: format!("c-{name}"),
                ifname: "eth0".into(),
            },
            netns: format!("/var/run/netns/{name}"),
            host_ifname: format!("veth{ifindex}"),
            host_ifindex: ifindex,
            ips: vec!["10.0.0.2/32".parse().unwrap()],
            pod: PodRef {
                namespace: "shop".into(),
                name: name.into(),
                uid: uid.into(),
            },
        }
    }

    #[test]
    fn the_table_names_a_uid_mismatch_and_the_placed_pods_without_an_endpoint() {
        let mut desired = DesiredState::default();
        for (name, uid) in [("web", "u1"), ("static", "hash"), ("old", "u3")] {
            desired.pods.insert(
                ("shop".into(), name.into()),
                PodAssignment {
                    uid: uid.into(),
                    policy: None,
                },
            );
        }
        let records = [record("web", "u1", 7), record("static", "mirror", 8)];
        let table = endpoints_table(&records, &desired, None);
        let row = |pod: &str| {
            table
                .lines()
                .find(|l| l.starts_with(pod))
                .unwrap_or_else(|| panic!("no row for {pod} in\n{table}"))
                .to_string()
        };
        assert!(row("shop/web ").contains("(none)"), "{table}");
        assert!(
            row("shop/static ").contains("(pending: uid-mismatch)"),
            "{table}"
        );
        assert!(
            table.contains("placed on this node without an endpoint (1; ")
                && table.contains("): shop/old\n"),
            "{table}"
        );
    }
}
