//! Makes a fresh machine of the project's kind ready to build and test.
//! Every step checks first and installs only what is missing.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::workspace::run_cmd;

/// Debian packages: LLVM 22 for bpf-linker (matching the nightly's LLVM),
/// qemu and the initramfs tools for the VM tests, decompressors for kernel
/// images and modules, bpftool and objcopy for the BTF cross-checks,
/// openssl, curl and setpriv for the TLS and privilege tests, dpkg-dev
/// (dpkg-shlibdeps) for the package's dependencies, debootstrap for the
/// install test's root file system, bpftrace for the kernel-side
/// comparison in `cargo xtask bench`, make for the kernel's mm selftests,
/// Redis as a real application forking under load, and what building a
/// small kernel from Debian's source needs (BTF comes from pahole in dwarves).
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "qemu-system-x86",
    "cpio",
    "busybox-static",
    "xz-utils",
    "zstd",
    "lz4",
    "bpftool",
    "binutils",
    "openssl",
    "curl",
    "util-linux",
    "dpkg-dev",
    "debootstrap",
    "bpftrace",
    "make",
    "redis-server",
    "redis-tools",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "dwarves",
    // The guest scripts' lint.
    "shellcheck",
    // The live view's test reads the screen of `mapcountd top` in tmux.
    "tmux",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    debian_packages()?;
    bpf_linker()?;
    cargo_fuzz()?;
    cargo_deb()?;
    Ok(())
}

const CARGO_DEB_VERSION: &str = "3.8.0";

fn cargo_deb() -> anyhow::Result<()> {
    if Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION))
    {
        return Ok(());
    }
    println!("setup: installing cargo-deb {CARGO_DEB_VERSION} (builds the Debian package)");
    // Without default features: xz compression and debug-id support pull in
    // C libraries the package does not need (it is gzip-compressed).
    run_cmd(Command::new(env!("CARGO")).args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
        "--no-default-features",
    ]))
}

fn cargo_fuzz() -> anyhow::Result<()> {
    if Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz (libFuzzer driver for the fuzz targets)");
    run_cmd(Command::new(env!("CARGO")).args(["install", "cargo-fuzz", "--locked"]))
}

fn rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup not found; the nightly toolchain builds the eBPF object")?;
    // rust-src: the eBPF build rebuilds core; clippy and rustfmt: the lint
    // step checks the eBPF crate, and rustfmt.toml needs nightly's rustfmt.
    let installed = String::from_utf8_lossy(&installed.stdout).to_string();
    for component in ["rust-src", "clippy", "rustfmt"] {
        if installed.lines().any(|l| l.starts_with(component)) {
            continue;
        }
        println!("setup: installing {component} for the nightly toolchain");
        run_cmd(Command::new("rustup").args(["component", "add", component, "--toolchain", "nightly"]))?;
    }
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| {
        let mut all: Vec<&str> = sudo.to_vec();
        all.push("apt-get");
        all.extend_from_slice(args);
        let mut cmd = Command::new(all[0]);
        cmd.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    // A new machine's package lists may be empty or stale.
    run_cmd(&mut apt(&["update", "-qq"]))?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(missing.iter());
    run_cmd(&mut apt(&install))
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output()
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run_cmd(Command::new(env!("CARGO")).env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))?;
    if Command::new("bpf-linker").arg("--version").output().is_err() {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
