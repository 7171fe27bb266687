use which::which;

/// Rebuild the object when bpf-linker changes: it is the object's linker,
/// but cargo does not know that.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
