//! A group's status from what the compiler reported and what the agents acked: pure, so the
//! conditions can be tested without a cluster, and written by whichever writer the source has
//! (the API's status subresource, or files in manifests mode).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::{
    crd::{NodeCounts, SecurityGroupStatus},
    model::ObjectKey,
    plan::GroupReport,
};

/// What one node's agent has acked, as the push server knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAcks {
    /// Every (group, generation) carried by the last version the node acked.
    pub programmed: BTreeSet<(ObjectKey, i64)>,
    /// The reason of the node's last NACK, if its last answer was one.
    pub nack: Option<String>,
    /// Whether its agent is connected.
    pub connected: bool,
    /// The member pods of each group that the agent does not enforce (its answer lacked their
    /// endpoint, or named another uid), each `namespace/name (why)`; see [`crate::coverage`].
    pub unenforced: BTreeMap<ObjectKey, Vec<String>>,
}

/// `Accepted` reasons.
pub mod reason {
    /// The spec is valid.
    pub const VALID: &str = "Valid";
    /// The spec is not.
    pub const INVALID: &str = "Invalid";
    /// Every concerned node acked it.
    pub const PROGRAMMED: &str = "Programmed";
    /// Some nodes have not acked it yet.
    pub const PENDING: &str = "Pending";
    /// Some node refused the version carrying it.
    pub const REFUSED: &str = "Refused";
    /// No node has a member or an affected peer.
    pub const NO_NODES: &str = "NoNodes";
    /// Nodes enforce it, but some member pods run without kubesg's programs.
    pub const NOT_ENFORCED: &str = "PodsNotEnforced";
}

/// The status of a group at time `now`. Condition transition times move only when the status
/// of the condition changes (`previous` holds the current ones).
pub fn group_status(
    key: &ObjectKey,
    report: &GroupReport,
    acks: &BTreeMap<String, NodeAcks>,
    previous: Option<&SecurityGroupStatus>,
    now: Timestamp,
) -> SecurityGroupStatus {
    let accepted = match &report.accepted {
        Ok(()) => condition("Accepted", true, reason::VALID, "the spec is valid".into()),
        Err(why) => condition("Accepted", false, reason::INVALID, why.clone()),
    };
    let wanted = (key.clone(), report.generation);
    let mut lagging = Vec::new();
    let mut refused = Vec::new();
    let mut programmed = 0;
    let mut unenforced = Vec::new();
    for node in &report.nodes {
        let a = acks.get(node);
        if a.is_some_and(|a| a.programmed.contains(&wanted)) {
            programmed += 1;
            let pods = a.and_then(|a| a.unenforced.get(key)).into_iter().flatten();
            unenforced.extend(pods.map(|p| format!("{p} on {node}")));
        } else if let Some(why) = a.and_then(|a| a.nack.as_ref()) {
            refused.push(format!("{node} ({why})"));
        } else if a.is_some_and(|a| a.connected) {
            lagging.push(node.clone());
        } else {
            lagging.push(format!("{node} (agent not connected)"));
        }
    }
    let total = report.nodes.len();
    let programmed_cond = if report.accepted.is_err() {
        condition(
            "Programmed",
            false,
            reason::INVALID,
            "not programmed: the spec is invalid".into(),
        )
    } else if total == 0 {
        condition(
            "Programmed",
            true,
            reason::NO_NODES,
            "no node has a member or a pod naming this group".into(),
        )
    } else if !refused.is_empty() {
        condition(
            "Programmed",
            false,
            reason::REFUSED,
            format!(
                "{programmed}/{total} nodes enforce generation {}; refused by {}",
                report.generation,
                list(&refused)
            ),
        )
    } else if !unenforced.is_empty() {
        condition(
            "Programmed",
            false,
            reason::NOT_ENFORCED,
            format!(
                "{programmed}/{total} nodes enforce generation {}, but {} member pods run \
                 without kubesg's programs: {}",
                report.generation,
                unenforced.len(),
                list(&unenforced)
            ),
        )
    } else if !lagging.is_empty() {
        condition(
            "Programmed",
            false,
            reason::PENDING,
            format!(
                "{programmed}/{total} nodes enforce generation {}; waiting for {}",
                report.generation,
                list(&lagging)
            ),
        )
    } else {
        condition(
            "Programmed",
            true,
            reason::PROGRAMMED,
            format!("all {total} nodes enforce generation {}", report.generation),
        )
    };
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    SecurityGroupStatus {
        observed_generation: Some(report.generation),
        members: i32::try_from(report.members).unwrap_or(i32::MAX),
        conditions: [accepted, programmed_cond]
            .into_iter()
            .map(|mut c| {
                c.observed_generation = Some(report.generation);
                c.last_transition_time = Time(
                    previous_conditions
                        .iter()
                        .find(|p| p.type_ == c.type_ && p.status == c.status)
                        .map(|p| p.last_transition_time.0)
                        .unwrap_or(now),
                );
                c
            })
            .collect(),
        nodes: Some(NodeCounts {
            programmed,
            total: i32::try_from(total).unwrap_or(i32::MAX),
        }),
    }
}

/// A condition; its message is bounded to what the API server accepts (a validation error of
/// a huge group, or many refusing nodes' reasons, would otherwise make every status write of the
/// group fail).
fn condition(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: kubesg_proto::text::bounded(&message, kubesg_proto::text::MAX_CONDITION_MESSAGE),
        observed_generation: None,
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
    }
}

/// At most five names, then how many more.
fn list(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(5).map(String::as_str).collect();
    if items.len() > 5 {
        format!("{} and {} more", shown.join(", "), items.len() - 5)
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(nodes: &[&str]) -> GroupReport {
        GroupReport {
            generation: 3,
            accepted: Ok(()),
            members: 2,
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn key() -> ObjectKey {
        ObjectKey::new("shop", "web")
    }

    fn acked(generation: i64) -> NodeAcks {
        NodeAcks {
            programmed: [(key(), generation)].into_iter().collect(),
            nack: None,
            connected: true,
            unenforced: BTreeMap::new(),
        }
    }

    fn cond<'a>(s: &'a SecurityGroupStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn programmed_when_every_concerned_node_acked_the_generation() {
        let acks = [("n1".to_string(), acked(3)), ("n2".to_string(), acked(3))]
            .into_iter()
            .collect();
        let s = group_status(
            &key(),
            &report(&["n1", "n2"]),
            &acks,
            None,
            Timestamp::now(),
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.members, 2);
        assert_eq!(
            s.nodes,
            Some(NodeCounts {
                programmed: 2,
                total: 2
            })
        );
        assert_eq!(cond(&s, "Accepted").status, "True");
        assert_eq!(cond(&s, "Programmed").status, "True");
    }

    #[test]
    fn a_member_pod_the_agent_does_not_enforce_keeps_the_group_from_programmed() {
        let mut n2 = acked(3);
        n2.unenforced.insert(
            key(),
            vec!["shop/web-0 (the node's agent has no endpoint for it)".to_string()],
        );
        // Another group's pod on the same node does not concern this one.
        n2.unenforced.insert(
            ObjectKey::new("shop", "db"),
            vec!["shop/db-0 (no endpoint)".to_string()],
        );
        let acks = [("n1".to_string(), acked(3)), ("n2".to_string(), n2)]
            .into_iter()
            .collect();
        let s = group_status(
            &key(),
            &report(&["n1", "n2"]),
            &acks,
            None,
            Timestamp::now(),
        );
        let p = cond(&s, "Programmed");
        assert_eq!(p.status, "False");
        assert_eq!(p.reason, reason::NOT_ENFORCED);
        assert_eq!(
            p.message,
            "2/2 nodes enforce generation 3, but 1 member pods run without kubesg's programs: \
             shop/web-0 (the node's agent has no endpoint for it) on n2"
        );
        assert_eq!(s.nodes.map(|n| n.programmed), Some(2));

        let mut other = acks.clone();
        if let Some(n2) = other.get_mut("n2") {
            n2.unenforced.remove(&key());
        }
        let s = group_status(
            &key(),
            &report(&["n1", "n2"]),
            &other,
            None,
            Timestamp::now(),
        );
        assert_eq!(cond(&s, "Programmed").status, "True");
    }

    #[test]
    fn a_huge_validation_error_is_cut_to_what_the_api_server_accepts() {
        let mut r = report(&["n1"]);
        r.accepted = Err(format!("rule 7: {}", "invalid peer; ".repeat(10_000)));
        let s = group_status(&key(), &r, &BTreeMap::new(), None, Timestamp::now());
        let message = &cond(&s, "Accepted").message;
        assert!(message.len() <= 32 * 1024, "{}", message.len());
        assert!(
            message.starts_with("rule 7: invalid peer; "),
            "{message:.40}"
        );
        assert!(message.ends_with("more bytes)"), "says what was cut");
    }

    #[test]
    fn lagging_and_refusing_nodes_are_named() {
        let mut nack = acked(2);
        nack.nack = Some("too many classes".into());
        let acks = [
            ("n1".to_string(), acked(3)),
            ("n2".to_string(), acked(2)),
            ("n3".to_string(), nack),
        ]
        .into_iter()
        .collect();
        let s = group_status(
            &key(),
            &report(&["n1", "n2", "n3", "n4"]),
            &acks,
            None,
            Timestamp::now(),
        );
        let p = cond(&s, "Programmed");
        assert_eq!(p.status, "False");
        assert_eq!(p.reason, reason::REFUSED);
        assert!(p.message.contains("1/4 nodes"), "{}", p.message);
        assert!(p.message.contains("n3 (too many classes)"), "{}", p.message);
        let without_nack: BTreeMap<_, _> =
            [("n1".to_string(), acked(3)), ("n2".to_string(), acked(2))]
                .into_iter()
                .collect();
        let s = group_status(
            &key(),
            &report(&["n1", "n2", "n4"]),
            &without_nack,
            None,
            Timestamp::now(),
        );
        let p = cond(&s, "Programmed");
        assert_eq!(p.reason, reason::PENDING);
        assert!(
            p.message
                .contains("waiting for n2, n4 (agent not connected)"),
            "{}",
            p.message
        );
    }

    #[test]
    fn invalid_spec_is_not_accepted_with_its_reason() {
        let mut r = report(&["n1"]);
        r.accepted = Err("spec.ingress[0].ports[0]: endPort 80 < port 90".into());
        let s = group_status(&key(), &r, &BTreeMap::new(), None, Timestamp::now());
        let a = cond(&s, "Accepted");
        assert_eq!(a.status, "False");
        assert_eq!(a.reason, reason::INVALID);
        assert!(a.message.contains("endPort 80 < port 90"));
        assert_eq!(cond(&s, "Programmed").status, "False");
    }

    #[test]
    fn transition_time_moves_only_when_the_condition_status_changes() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let acks: BTreeMap<_, _> = [("n1".to_string(), acked(2))].into_iter().collect();
        let first = group_status(&key(), &report(&["n1"]), &acks, None, t0);
        let again = group_status(&key(), &report(&["n1"]), &acks, Some(&first), t1);
        assert_eq!(cond(&again, "Programmed").last_transition_time.0, t0);
        let acks: BTreeMap<_, _> = [("n1".to_string(), acked(3))].into_iter().collect();
        let done = group_status(&key(), &report(&["n1"]), &acks, Some(&again), t1);
        assert_eq!(cond(&done, "Programmed").status, "True");
        assert_eq!(cond(&done, "Programmed").last_transition_time.0, t1);
        assert_eq!(cond(&done, "Accepted").last_transition_time.0, t0);
    }
}
