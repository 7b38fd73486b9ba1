//! Link flags for the eBPF programs, and a rebuild when the bpf-linker binary changes (linking
//! depends on it, and cargo cannot see that dependency otherwise).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found on PATH: {err}"),
    }
    // 32-bit ALU instructions (BPF ISA v3, kernel 5.1), which 32-bit atomics need: the window
    // tracker moves its fields forward with a 32-bit compare-and-swap (kubesg_common::forward,
    // kernel 5.12), which the `generic` CPU rustc asks bpf-linker for cannot express.
    println!("cargo:rustc-link-arg=--cpu-features=+alu32");
}
