//! Builds the eBPF programs (`dataplane/ebpf`, for the bpf target, with nightly and build-std)
//! and leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../ebpf");
    println!("cargo:rerun-if-changed={manifest_dir}/../common/src");
    let package = aya_build::Package {
        name: "kubesg-ebpf",
        root_dir: &ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
