//! Rebuild when the bpf-linker binary changes: linking the programs depends on it, and cargo
//! cannot see that dependency otherwise.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found on PATH: {err}"),
    }
}
