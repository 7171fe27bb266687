//! `cargo xtask package`: the Debian package.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{
    checks::Tally,
    kernels,
    workspace::{build_binaries, run_cmd, workspace_root},
};

/// Builds the .deb with cargo-deb (metadata in mapcount-daemon/Cargo.toml)
/// and prints its file list; returns the package's path.
pub fn package() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    build_binaries()?;
    let out_dir = root.join("target/debian");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;
    run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["deb", "-p", "mapcount-daemon", "--no-build", "-o"])
            .arg(&out_dir),
    )?;
    let deb = std::fs::read_dir(&out_dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("cargo deb wrote no .deb")?;
    let listing = Command::new("dpkg-deb").arg("--contents").arg(&deb).output()?;
    let info =
        Command::new("dpkg-deb").arg("--field").arg(&deb).args(["Package", "Version", "Depends"]).output()?;
    println!(
        "{}:\n{}{}",
        deb.display(),
        String::from_utf8_lossy(&info.stdout),
        String::from_utf8_lossy(&listing.stdout)
    );
    Ok(deb)
}

pub fn command(install_test: bool) -> anyhow::Result<()> {
    let deb = package()?;
    if install_test {
        let mut tally = Tally::default();
        crate::install::test(&deb, &kernels::fetch(kernels::find("6.12")?)?, &mut tally)?;
        tally.result("install")?;
    }
    Ok(())
}
