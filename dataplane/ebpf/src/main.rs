//! kubesg's tc programs, attached to the host-side interface of each pod.
//!
//! `from_pod` runs at tc ingress of that interface (what the pod sends: its egress rules),
//! `to_pod` at tc egress (what the pod receives: its ingress rules). `parse_only` and
//! `parse_lookup` are never attached: they are the benchmark's baselines; nor is `clock`, which the
//! agent runs to set up the datapath's clock.
#![no_std]
#![no_main]
// For `core::intrinsics::atomic_xadd` (see `datapath::add_entries`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod datapath;
mod maps;

use aya_ebpf::{macros::classifier, programs::TcContext};
use kubesg_common::Direction;

/// Traffic from the pod.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    datapath::run(&ctx, Direction::Egress)
}

/// Traffic to the pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    datapath::run(&ctx, Direction::Ingress)
}

/// Parse only: the benchmark's baseline.
#[classifier]
pub fn parse_only(ctx: TcContext) -> i32 {
    datapath::parse_only(&ctx)
}

/// Parse and one conntrack lookup: with `parse_only`, the benchmark's measure of one map lookup.
#[classifier]
pub fn parse_lookup(ctx: TcContext) -> i32 {
    datapath::parse_lookup(&ctx)
}

/// Reads the kernel's clocks for the agent: never attached.
#[classifier]
pub fn clock(_ctx: TcContext) -> i32 {
    datapath::sample_clock()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so this is never run.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
