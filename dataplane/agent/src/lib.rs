//! The kubesg node agent as a library: it owns the eBPF datapath (load, pin, attach, program
//! endpoints and policies, sweep conntrack) and formats what the CLI prints. `main.rs` only parses
//! arguments and calls in here.

#![warn(missing_docs)]
pub mod attach;
pub mod bpffs;
pub mod clock;
pub mod cni_server;
pub mod conntrack;
pub mod convert;
pub mod counters;
pub mod ct_counts;
pub mod ct_migrate;
pub mod daemon;
pub mod datapath;
pub mod desired;
pub mod endpoints;
pub mod enforcer;
pub mod events;
pub mod explain;
pub mod inspect;
pub mod install_cni;
pub mod map_batch;
pub mod maps;
pub mod metrics;
pub mod node;
pub mod operator_link;
pub mod pin_compat;
pub mod policy;
pub mod policy_in_place;
pub mod startup;
pub mod tables;
pub mod testrun;
pub mod timeouts;
pub mod tls;
