//! Regenerates `proto/src/generated/` from the `.proto` files, with no system `protoc`:
//! protox compiles the files in Rust, tonic's generator writes the code. CI runs it and fails
//! when the checked-in code differs (`scripts/check-generated.sh`).
//!
//! Usage: `cargo run -p kubesg-proto --features codegen --bin protogen [OUT_DIR]`.

use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("src/generated"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let files = ["kubesg/v1alpha1/policy.proto", "kubesg/v1alpha1/cni.proto"];
    let fds = protox::compile(files, [&root]).context("compiling the .proto files")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(&out)
        .compile_fds(fds)
        .context("generating Rust code")?;
    println!("generated code in {}", out.display());
    Ok(())
}
