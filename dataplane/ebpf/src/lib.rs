//! kubesg's eBPF programs are in `main.rs` (built for the bpf target by the agent's build
//! script). This empty library only lets the agent name the crate as a build dependency, so that
//! cargo rebuilds the programs when this crate or `kubesg-common` changes.
#![no_std]
