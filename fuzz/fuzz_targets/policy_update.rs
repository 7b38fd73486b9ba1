//! The agent's side of the operator link on any bytes: a `PolicyUpdate` decoded as prost decodes
//! it off the stream, converted (`kubesg_agent::convert::update`), applied to the desired state
//! (`DesiredState::apply`), each policy compiled into the datapath's tables
//! (`kubesg_agent::tables::compile`) and the state written as the agent persists it. Never a
//! panic, and what is applied holds together: every pod's policy and every set a policy names is
//! there, the state file reads back as the state, a snapshot applied again changes nothing and a
//! delta applied again is refused.
//!
//! Input: up to 8 updates, each length-delimited (a varint length, then the message), applied in
//! order to the state the previous ones left, so that deltas meet snapshots.

#![no_main]

use kubesg_agent::{
    convert,
    desired::{DesiredState, UpdateError},
    tables,
};
use kubesg_proto::v1alpha1::PolicyUpdate;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

/// How many updates one input applies at most.
const MAX_UPDATES: usize = 8;

/// What must hold of any state `apply` returns.
fn check_state(state: &DesiredState) {
    for ((ns, name), a) in &state.pods {
        if let Some(p) = &a.policy {
            assert!(
                state.policies.contains_key(p),
                "pod {ns}/{name}: policy {p:?} missing"
            );
        }
    }
    for (id, sp) in &state.set_policies {
        assert!(
            state.policies.contains_key(id),
            "set policy {id:?} not among the policies"
        );
        for set in sp.sets.ingress.iter().chain(&sp.sets.egress).flatten() {
            assert!(
                state.sets.contains_key(set),
                "policy {id:?} names missing set {set:?}"
            );
        }
    }
    // The agent writes the state to desired.json after each update and reads it at start.
    let json = serde_json::to_vec(state).expect("the state serializes");
    let back: DesiredState = serde_json::from_slice(&json).expect("the state file reads back");
    assert_eq!(&back, state, "the state file reads back as the state");
    // What programming the datapath does with each policy first.
    for (i, policy) in state.policies.values().enumerate() {
        let _ = tables::compile(i as u32 + 1, policy);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    let mut state = DesiredState::default();
    for _ in 0..MAX_UPDATES {
        if buf.is_empty() {
            break;
        }
        let Ok(pb) = PolicyUpdate::decode_length_delimited(&mut buf) else {
            break;
        };
        let update = match convert::update(&pb) {
            Ok(update) => update,
            Err(err) => {
                assert!(matches!(err, UpdateError::Invalid(_)), "convert: {err:?}");
                continue;
            }
        };
        let next = match state.apply(&update) {
            Ok(next) => next,
            Err(err) => {
                // The NACK's reason.
                let _ = err.to_string();
                continue;
            }
        };
        assert_eq!(next.version, update.version);
        check_state(&next);
        let again = next.apply(&update);
        if update.snapshot {
            assert_eq!(
                again.as_ref(),
                Ok(&next),
                "a snapshot applied again changes nothing"
            );
        } else {
            assert!(
                matches!(
                    again,
                    Err(UpdateError::Stale { .. } | UpdateError::WrongBase { .. })
                ),
                "a delta applied again: {again:?}"
            );
        }
        state = next;
    }
});
