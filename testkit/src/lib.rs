//! What kubesg's tests share, so each thing is done one way: network namespaces standing in for
//! nodes and pods, the packet builder for crafted frames, policies, the two IP families, the
//! loopback harness of the program tests, the client/server pods of the real-traffic tests, the
//! gate for privileged tests, and for the end-to-end tests the agent as a real process and a CNI
//! runtime running real plugins.

#![warn(missing_docs)]
pub mod agent;
pub mod certs;
pub mod cni;
pub mod family;
pub mod loopback;
pub mod netns;
pub mod node;
pub mod operator;
pub mod packet;
pub mod pods;
pub mod privileged;
pub mod rules;
