use which::which;

/// Rebuild the object when bpf-linker changes: it is the object's linker,
/// but cargo does not know that. Without it the link fails and says so.
fn main() {
    match which("bpf-linker") {
        Ok(bpf_linker) => println!("cargo:rerun-if-changed={}", bpf_linker.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found: run `cargo xtask setup`"),
    }
}
