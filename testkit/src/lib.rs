//! What kubesg's tests share, so each thing is done one way: network namespaces standing in for
//! nodes and pods, the packet builder for crafted frames, policies, the two IP families, the
//! loopback harness of the program tests, the client/server pods of the real-traffic tests, the
//! gate for privileged tests, and for the end-to-end tests and the demo the agent and the operator
//! as real processes, a CNI runtime running real plugins, a local multi-node cluster wiring them
//! together, traffic probes and the connectivity matrix.

#![warn(missing_docs)]
pub mod agent;
pub mod certs;
pub mod child;
pub mod cluster;
pub mod cni;
pub mod family;
pub mod interrupt;
pub mod iperf;
pub mod kube;
pub mod loopback;
pub mod matrix;
pub mod netns;
pub mod node;
pub mod operator;
pub mod operator_process;
pub mod packet;
pub mod pins;
pub mod pods;
pub mod privileged;
pub mod probe;
pub mod rules;
