//! What kubesg's tests share, so each thing is done one way: network namespaces standing in for
//! nodes and pods, the packet builder for crafted frames, and the gate for privileged tests.

pub mod netns;
pub mod node;
pub mod packet;
pub mod privileged;
