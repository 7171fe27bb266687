//! What every command needs: where the workspace and the cache are,
//! running a command, and building the binaries the VMs run.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

#[expect(clippy::expect_used, reason = "xtask/ is a directory of the workspace")]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Where downloaded kernels and built images are kept between runs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MAPCOUNT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/mapcount-cache"))
}

pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds mapcountd and the workload for the VM; returns the directory
/// holding them. Release builds: under TCG a debug daemon falls behind
/// the kernel's event rate.
pub fn build_binaries() -> anyhow::Result<PathBuf> {
    run_cmd(Command::new(env!("CARGO")).current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "mapcount-daemon",
        "-p",
        "mapcount-workload",
        "--bins",
    ]))?;
    Ok(workspace_root().join("target/release"))
}

/// The ingest benchmark (mapcount-daemon/benches/ingest.rs) with `args`,
/// built first by cargo; its figures are on stdout.
pub fn ingest_bench(args: &[&std::ffi::OsStr]) -> anyhow::Result<std::process::Output> {
    Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["bench", "-p", "mapcount-daemon", "--bench", "ingest", "--"])
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run the ingest benchmark")
}
