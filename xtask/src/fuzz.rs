//! `cargo xtask fuzz`: the event decoder, the record reader and the configuration parser.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::workspace::workspace_root;

/// Each fuzz target's share of `cargo xtask test`; `cargo xtask fuzz
/// --seconds N` runs longer.
pub const FUZZ_SECONDS_IN_TEST: u64 = 20;

pub const FUZZ_TARGETS: &[&str] = &["decode", "record_reader", "config"];

/// Runs libFuzzer on each target; a crash fails it and leaves the input in
/// mapcount-daemon/fuzz/artifacts/<target>/ (turn it into a regression test).
pub fn fuzz(seconds: u64, only: &[String]) -> anyhow::Result<(u32, u32)> {
    let (mut passed, mut failed) = (0, 0);
    for &target in FUZZ_TARGETS.iter().filter(|t| only.is_empty() || only.iter().any(|o| o == *t)) {
        let output = Command::new("cargo")
            .current_dir(workspace_root().join("mapcount-daemon"))
            .args([
                "+nightly",
                "fuzz",
                "run",
                target,
                "--",
                &format!("-max_total_time={seconds}"),
                "-print_final_stats=1",
            ])
            .stdout(std::process::Stdio::inherit())
            .output()
            .context("cannot run cargo fuzz (cargo xtask setup installs it)")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stat = |key: &str| {
            stderr
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| "?".to_owned())
        };
        let executions = stat("stat::number_of_executed_units:");
        if output.status.success() {
            passed += 1;
            println!("fuzz {target}: passed, {executions} executions in {seconds} s, no crash");
        } else {
            failed += 1;
            let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
            println!("fuzz {target}: FAILED after {executions} executions");
            for line in tail.into_iter().rev() {
                println!("  | {line}");
            }
        }
    }
    Ok((passed, failed))
}

pub fn command(seconds: u64, targets: &[String]) -> anyhow::Result<()> {
    let (_, failed) = fuzz(seconds, targets)?;
    if failed > 0 {
        bail!("{failed} fuzz target(s) failed");
    }
    Ok(())
}
