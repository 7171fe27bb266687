//! What every command needs: where the workspace and the cache are,
//! running a command, and building the binaries the VMs run.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};

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
    run_quiet_cargo(Command::new(env!("CARGO")).current_dir(workspace_root()).args([
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

/// Runs cargo, leaving out of its output the eBPF build's progress lines,
/// which aya-build forwards as `warning: mapcount-daemon@…: Compiling …`
/// (a dozen on every build that touches the daemon). Real warnings and
/// errors of that build, and everything else cargo prints, pass through.
pub fn run_quiet_cargo(cmd: &mut Command) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let mut child =
        cmd.stderr(std::process::Stdio::piped()).spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    if let Some(stderr) = child.stderr.take() {
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line?;
            if !is_forwarded_progress(&line) {
                eprintln!("{line}");
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// A line of the eBPF build's own cargo progress, as aya-build forwards it.
fn is_forwarded_progress(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("warning: mapcount-daemon@") else { return false };
    let message = rest.split_once(": ").map_or("", |(_, m)| m).trim_start();
    message.is_empty()
        || [
            "Compiling ",
            "Finished ",
            "Checking ",
            "Blocking ",
            "Updating ",
            "Locking ",
            "Downloading ",
            "Downloaded ",
        ]
        .iter()
        .any(|p| message.starts_with(p))
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

/// A spinner on stderr that counts seconds; drawn only on a terminal
/// (indicatif hides it otherwise, so CI logs stay as they are).
pub fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(message);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Runs `apt-get download` (`cmd`, in `dir`) with a progress bar of the
/// bytes apt has written to `<package>_*.deb` out of `size` (from
/// `apt-cache show`, when known).
pub fn download_with_progress(
    cmd: &mut Command,
    package: &str,
    dir: &Path,
    size: Option<u64>,
) -> anyhow::Result<()> {
    let bar = match size {
        Some(size) => ProgressBar::new(size).with_style(
            ProgressStyle::with_template(
                "downloading {msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => spinner(String::new()),
    }
    .with_message(package.to_owned());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let prefix = format!("{package}_");
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let written: u64 = fs::read_dir(dir)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        bar.set_position(written);
        std::thread::sleep(Duration::from_millis(200));
    };
    bar.finish_and_clear();
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The `Size:` of a package's candidate version, from `apt-cache show`.
pub fn package_size(mut apt_cache: Command, package: &str) -> Option<u64> {
    let out = apt_cache.args(["show", "--no-all-versions", package]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.strip_prefix("Size: ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_ebpf_builds_progress_is_left_out() {
        let quiet = super::is_forwarded_progress;
        assert!(quiet(
            "warning: mapcount-daemon@0.1.0:    Compiling mapcount-ebpf v0.1.0 (/w/mapcount-ebpf)"
        ));
        assert!(quiet("warning: mapcount-daemon@0.1.0:     Finished `release` profile [optimized] in 9.62s"));
        assert!(quiet("warning: mapcount-daemon@0.1.0: "));
        assert!(!quiet("warning: mapcount-daemon@0.1.0: warning: unused variable: `x`"));
        assert!(!quiet("warning: variable does not need to be mutable"));
        assert!(!quiet("   Compiling mapcount-daemon v0.1.0 (/w/mapcount-daemon)"));
    }
}
