//! Which of the pods the operator places on a node its agent actually enforces.
//!
//! A pod whose network was set up while kubesg was not in the node's CNI chain (a node that
//! started pods before the install-cni step ran, a primary CNI that rewrote its configuration)
//! has no endpoint in the agent: no program is attached to its interface and nothing in the
//! cluster would otherwise notice. Each agent answer carries the pods it holds endpoints for
//! ([`pb::EndpointReport`]); compared with the plan the agent applied in that same answer, the
//! difference is exact: the operator places a pod with `set_up` only once the kubelet reported its
//! address, which it does after the CNI ADD returned, and the agent records the endpoint before
//! it answers that ADD. Pods being deleted are left out (their DEL may come first).

use std::{collections::BTreeMap, fmt};

use kubesg_proto::v1alpha1 as pb;

use crate::{model::ObjectKey, plan::NodePlan};

/// The pods a node's agent holds endpoints for, with the uid the CNI gave each.
pub type Endpoints = BTreeMap<ObjectKey, String>;

/// The endpoints of an agent's report.
pub fn endpoints(report: &pb::EndpointReport) -> Endpoints {
    report
        .pods
        .iter()
        .map(|p| (ObjectKey::new(&p.namespace, &p.name), p.uid.clone()))
        .collect()
}

/// Why a pod placed on a node is not enforced there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gap {
    /// The agent has no endpoint of it: its network was set up without kubesg.
    NoEndpoint,
    /// The agent's endpoint of that name carries another uid than the Pod object: the agent
    /// keeps it pending (denied) until they agree.
    OtherUid {
        /// The uid the CNI gave the agent (`K8S_POD_UID`).
        agent: String,
        /// The Pod object's.
        pod: String,
    },
}

impl Gap {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Gap::NoEndpoint => "no-endpoint",
            Gap::OtherUid { .. } => "uid-mismatch",
        }
    }
}

impl Gap {
    /// The reason in a few words, for a list in a group's status.
    pub fn brief(&self) -> String {
        match self {
            Gap::NoEndpoint => "no endpoint: set up without kubesg in the CNI chain".into(),
            Gap::OtherUid { agent, .. } => format!("its endpoint has another uid, {agent}"),
        }
    }
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gap::NoEndpoint => f.write_str(
                "the node's agent has no endpoint for it: its network was set up without \
                 kubesg in the CNI chain, so no rule applies to it; delete the pod to have it \
                 set up again",
            ),
            Gap::OtherUid { agent, pod } => write!(
                f,
                "the node's agent holds an endpoint of this name with uid {agent}, not the \
                 pod's {pod}: it stays denied until they agree"
            ),
        }
    }
}

/// The pods of `plan` that its node's agent does not enforce according to `endpoints`.
pub fn gaps(plan: &NodePlan, endpoints: &Endpoints) -> BTreeMap<ObjectKey, Gap> {
    plan.pods
        .iter()
        .filter(|(_, p)| p.set_up)
        .filter_map(|(key, p)| {
            let gap = match endpoints.get(key) {
                None => Gap::NoEndpoint,
                Some(uid) if !uid.is_empty() && !p.uid.is_empty() && *uid != p.uid => {
                    Gap::OtherUid {
                        agent: uid.clone(),
                        pod: p.uid.clone(),
                    }
                }
                Some(_) => return None,
            };
            Some((key.clone(), gap))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PodPlan;

    fn plan(pods: &[(&str, &str, bool)]) -> NodePlan {
        let mut plan = NodePlan::default();
        for &(name, uid, set_up) in pods {
            plan.pods.insert(
                ObjectKey::new("shop", name),
                PodPlan {
                    uid: uid.into(),
                    policy: None,
                    set_up,
                },
            );
        }
        plan
    }

    fn report(pods: &[(&str, &str)]) -> Endpoints {
        endpoints(&pb::EndpointReport {
            pods: pods
                .iter()
                .map(|&(name, uid)| pb::PodRef {
                    namespace: "shop".into(),
                    name: name.into(),
                    uid: uid.into(),
                })
                .collect(),
        })
    }

    #[test]
    fn a_set_up_pod_without_endpoint_and_one_with_another_uid_are_gaps() {
        let plan = plan(&[
            ("web", "u1", true),
            ("old", "u2", true),
            ("static", "hash", true),
            ("starting", "u4", false),
        ]);
        let gaps = gaps(&plan, &report(&[("web", "u1"), ("static", "u3")]));
        assert_eq!(
            gaps,
            BTreeMap::from([
                (ObjectKey::new("shop", "old"), Gap::NoEndpoint),
                (
                    ObjectKey::new("shop", "static"),
                    Gap::OtherUid {
                        agent: "u3".into(),
                        pod: "hash".into()
                    }
                ),
            ])
        );
    }

    #[test]
    fn an_unknown_uid_on_either_side_is_no_gap_and_extra_endpoints_do_not_matter() {
        let plan = plan(&[("web", "", true), ("db", "u2", true)]);
        assert!(gaps(&plan, &report(&[("web", "u1"), ("db", ""), ("x", "u9")])).is_empty());
    }
}
