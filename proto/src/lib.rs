//! kubesg's gRPC contracts: `PolicyDistribution` (operator → agent: versioned policy snapshots
//! and deltas, acked) and `CniBackend` (CNI plugin → agent over a unix socket). The code in
//! `generated/` comes from `kubesg/v1alpha1/*.proto` (`cargo run -p kubesg-proto --features
//! codegen --bin protogen`); never edit it by hand.
//!
//! These types stay at the edges: the agent and the operator convert them into their own domain
//! types as they arrive.

#![warn(missing_docs)]

/// The largest `PolicyDistribution` message either end sends or accepts (gRPC's default is
/// 4 MiB, which a node's snapshot outgrows: every stream then failed and the agent redialled for
/// ever). The operator checks each update against it before sending and refuses, with a status,
/// one that is larger; see docs/architecture.md for the sizes the benchmark cluster gives.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The gRPC metadata key of the token an agent proves its node with (`Bearer <token>`): in a
/// cluster one certificate serves the whole DaemonSet, so the certificate cannot say which node
/// an agent runs on; its pod's ServiceAccount token, reviewed by the API server, can.
pub const NODE_TOKEN_METADATA: &str = "authorization";

/// The `Hello.capabilities` entry of an agent that applies `PolicyUpdate.change_sets` (address
/// sets changed in part): the operator sends them to such agents only.
pub const CAPABILITY_SET_CHANGES: &str = "set-changes";

pub mod pending_deletes;
pub mod text;
pub mod tls;

/// Version v1alpha1 of the contracts.
#[allow(clippy::all, missing_docs)]
pub mod v1alpha1 {
    include!("generated/kubesg.v1alpha1.rs");
}
