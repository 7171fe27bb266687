//! Builds the eBPF object (`mapcount-ebpf`) with the nightly toolchain and
//! bpf-linker, so that a plain `cargo build` of the daemon embeds it.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = format!("{manifest_dir}/../mapcount-ebpf");
    // The object also embeds the event ABI: rebuild it when that changes.
    println!("cargo:rerun-if-changed={manifest_dir}/../mapcount-common");
    let ebpf = aya_build::Package { name: "mapcount-ebpf", root_dir: &ebpf_dir, ..Default::default() };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
        .context("building the eBPF object failed; `cargo xtask setup` installs what it needs")
}
