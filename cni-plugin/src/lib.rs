//! kubesg-cni: the chained CNI plugin that hands each pod's host-side veth and IPs to the node's
//! kubesg-agent, so that the pod is enforced from the moment its CNI ADD returns.
//!
//! It runs after the plugin that creates the pod's interface (bridge, ptp, …), reads what that
//! plugin did from `prevResult`, registers the endpoint over the agent's unix socket (gRPC
//! `CniBackend`), and passes `prevResult` on. CNI spec 0.3.0 to 1.1.0: ADD, DEL, CHECK, STATUS,
//! GC, VERSION.
//!
//! The library is the plugin's parts, public so that end-to-end tests can drive the same agent
//! client ([`agent`]) and host-side interface discovery ([`veth`]) the binary uses.

#![warn(missing_docs)]

pub mod agent;
pub mod commands;
pub mod config;
pub mod env;
pub mod error;
pub mod link_local;
pub mod netlink;
pub mod result;
pub mod veth;
