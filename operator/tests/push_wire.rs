//! The wire form of node plans against the agent's own acceptance logic: a delta between any
//! two plans, applied by the agent on top of the first, gives exactly the state a snapshot of the
//! second gives. Not privileged.

mod push_support;

use kubesg_agent::{convert, desired::DesiredState};
use kubesg_operator::{
    model::ObjectKey,
    plan::{NodePlan, PodPlan},
    wire,
};
use kubesg_proto::v1alpha1 as pb;
use proptest::prelude::*;
use push_support::web_policy;

const SETTINGS: pb::DatapathSettings = pb::DatapathSettings {
    recheck_on_policy_change: true,
};

/// A random plan: up to 4 policies (ids p0..p3 with varying rules and generations, some
/// naming one of 3 address sets), the sets they name (with varying addresses), and up to 6
/// pods (with varying uids), each using one of the plan's policies or none.
fn plans() -> impl Strategy<Value = NodePlan> {
    let policies = proptest::collection::btree_map(
        0u8..4,
        (1u16..4, 1i64..3, proptest::option::of(0u8..3)),
        0..=4,
    );
    let contents = proptest::collection::vec(proptest::collection::btree_set(1u8..5, 0..3), 3);
    let pods =
        proptest::collection::btree_map(0u8..6, (0u8..2, any::<prop::sample::Index>()), 0..=6);
    (policies, contents, pods).prop_map(|(policies, contents, pods)| {
        let mut plan = NodePlan::default();
        for (id, (port, generation, set)) in policies {
            let mut policy = web_policy(port, generation);
            if let Some(set) = set {
                let name = format!("set{set}");
                policy.ingress[0].sets.push(name.clone());
                let addrs = contents[usize::from(set)]
                    .iter()
                    .map(|a| format!("192.0.2.{a}/32").parse().unwrap())
                    .collect();
                plan.sets.insert(name, std::sync::Arc::new(addrs));
            }
            plan.policies
                .insert(format!("p{id}"), std::sync::Arc::new(policy));
        }
        let ids: Vec<String> = plan.policies.keys().cloned().collect();
        for (pod, (uid, pick)) in pods {
            // Index 0 of the choices is "no group".
            let choice = pick.index(ids.len() + 1);
            plan.pods.insert(
                ObjectKey::new("shop", format!("pod{pod}")),
                PodPlan {
                    uid: format!("uid-{pod}-{uid}"),
                    policy: choice.checked_sub(1).map(|i| ids[i].clone()),
                    set_up: true,
                },
            );
        }
        plan
    })
}

fn apply(state: &DesiredState, update: &pb::PolicyUpdate) -> DesiredState {
    let update = convert::update(update).expect("the update converts");
    state.apply(&update).expect("the agent accepts the update")
}

proptest! {
    #[test]
    fn delta_applied_on_the_old_plan_equals_a_snapshot_of_the_new(
        old in plans(),
        new in plans(),
    ) {
        let base = apply(&DesiredState::default(), &wire::snapshot(&old, 10, &SETTINGS));
        let via_snapshot = apply(&base, &wire::snapshot(&new, 11, &SETTINGS));
        for form in [wire::SetForm::Whole, wire::SetForm::Changes] {
            let via_delta = match wire::delta(&old, &new, 10, 11, form) {
                Some(delta) => {
                    prop_assert!(!delta.snapshot);
                    prop_assert_eq!(delta.base_version, 10);
                    if form == wire::SetForm::Whole {
                        prop_assert!(delta.change_sets.is_empty());
                    }
                    apply(&base, &delta)
                }
                None => {
                    prop_assert_eq!(&old, &new);
                    DesiredState { version: 11, ..base.clone() }
                }
            };
            prop_assert_eq!(&via_delta, &via_snapshot, "{:?}", form);
        }
    }

    #[test]
    fn delta_carries_no_unchanged_policy_or_pod(old in plans(), new in plans()) {
        if let Some(delta) = wire::delta(&old, &new, 1, 2, wire::SetForm::Changes) {
            for p in &delta.upsert_policies {
                let planned = &new.policies[&p.id];
                prop_assert_ne!(old.policies.get(&p.id), Some(planned));
            }
            for pp in &delta.upsert_pods {
                let r = pp.pod.as_ref().unwrap();
                let key = ObjectKey::new(r.namespace.clone(), r.name.clone());
                prop_assert_ne!(old.pods.get(&key), new.pods.get(&key));
            }
            for id in &delta.remove_policies {
                prop_assert!(!new.policies.contains_key(id));
            }
            for s in &delta.upsert_sets {
                prop_assert_ne!(old.sets.get(&s.id), new.sets.get(&s.id));
            }
            for id in &delta.remove_sets {
                prop_assert!(!new.sets.contains_key(id));
            }
        }
    }
}
