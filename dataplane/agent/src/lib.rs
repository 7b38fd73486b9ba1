//! The kubesg node agent as a library: it owns the eBPF datapath (load, pin, attach, program
//! endpoints and policies, sweep conntrack) and formats what the CLI prints. `main.rs` only parses
//! arguments and calls in here.

pub mod attach;
pub mod bpffs;
pub mod clock;
pub mod conntrack;
pub mod counters;
pub mod datapath;
pub mod events;
pub mod maps;
pub mod policy;
pub mod tables;
pub mod testrun;
pub mod timeouts;
