//! Developer commands: `cargo xtask setup | run | test`.

mod kernels;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "mapcount developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent; says what it installs).
    Setup,
    /// Run mapcountd: on this host if it can attach kprobes, else in a VM with a demo workload.
    Run {
        /// Port for /metrics on the host (forwarded from the VM when it runs there).
        #[arg(long, default_value_t = 9730)]
        port: u16,
        /// Always use the VM, even if this host could trace.
        #[arg(long)]
        vm: bool,
    },
    /// Unit tests, then the VM scenario on a stock kernel.
    Test {
        /// Kernels to boot (by short name).
        #[arg(long, value_delimiter = ',', default_value = "6.12")]
        kernel: Vec<String>,
        /// Skip the unit tests.
        #[arg(long)]
        vm_only: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Run { port, vm } => {
            setup::run()?;
            run(port, vm)
        }
        Cmd::Test { kernel, vm_only } => {
            setup::run()?;
            test(&kernel, vm_only)
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
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

/// Builds mapcountd and the workload; returns the directory holding them.
fn build_binaries() -> anyhow::Result<PathBuf> {
    run_cmd(Command::new(env!("CARGO")).current_dir(workspace_root()).args([
        "build",
        "-p",
        "mapcount-daemon",
        "--bins",
    ]))?;
    Ok(workspace_root().join("target/debug"))
}

fn host_can_trace() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

fn run(port: u16, force_vm: bool) -> anyhow::Result<()> {
    let bin = build_binaries()?;
    if host_can_trace() && !force_vm {
        println!("this kernel can attach kprobes: running mapcountd here on port {port}");
        return run_cmd(
            Command::new(bin.join("mapcountd")).arg(format!("--web.listen-address=0.0.0.0:{port}")),
        );
    }
    println!(
        "this kernel cannot attach kprobes (no kprobe PMU): running mapcountd in a VM on Debian's 6.12 kernel with a demo workload; metrics at http://localhost:{port}/metrics, Ctrl-C stops"
    );
    let kernel = kernels::fetch(kernels::find("6.12")?)?;
    let image = vm::Image::build(&bin, &kernel, vm::Mode::Demo)?;
    vm::boot(
        &kernel,
        &image,
        vm::Boot {
            forward_port: Some(port),
            timeout: None,
            echo: true,
        },
    )?;
    Ok(())
}

fn test(kernel_names: &[String], vm_only: bool) -> anyhow::Result<()> {
    let mut passed = 0u32;
    let mut failed = 0u32;
    if !vm_only {
        let (p, f) = unit_tests()?;
        passed += p;
        failed += f;
    }
    let bin = build_binaries()?;
    let mut table = Vec::new();
    for name in kernel_names {
        let kernel = kernels::fetch(kernels::find(name)?)?;
        let image = vm::Image::build(&bin, &kernel, vm::Mode::Test)?;
        let started = std::time::Instant::now();
        let output = vm::boot(
            &kernel,
            &image,
            vm::Boot {
                forward_port: None,
                timeout: Some(600),
                echo: false,
            },
        )?;
        let results = vm::parse_checks(&output);
        let log_path = cache_dir().join(format!("vm-test-{name}.log"));
        std::fs::write(&log_path, &output)?;
        if results.is_empty() || !output.contains("MAPCOUNT-SUMMARY") {
            failed += 1;
            println!(
                "kernel {name}: the VM produced no check results; console log in {}",
                log_path.display()
            );
            let tail: Vec<&str> = output.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                println!("  | {line}");
            }
            continue;
        }
        for r in &results {
            if r.passed { passed += 1 } else { failed += 1 }
        }
        table.push((name.clone(), started.elapsed(), results, log_path));
    }
    for (name, elapsed, results, log_path) in &table {
        println!(
            "\nVM checks on kernel {name} ({:.1} s, console log {}):",
            elapsed.as_secs_f64(),
            log_path.display()
        );
        println!(
            "  {:<34} {:>8} {:>10} {:>14}  result",
            "check", "known", "reported", "accepted"
        );
        for r in results {
            println!(
                "  {:<34} {:>8} {:>10} {:>14}  {}",
                r.name,
                r.known,
                r.reported,
                r.accepted,
                if r.passed { "passed" } else { "FAILED" }
            );
        }
    }
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} test(s) failed");
    }
    Ok(())
}

/// Runs the workspace's unit tests; returns (passed, failed) from cargo's summary lines.
fn unit_tests() -> anyhow::Result<(u32, u32)> {
    let output = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args([
            "test",
            "--workspace",
            "--exclude",
            "mapcount-ebpf",
            "--no-fail-fast",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo test")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    let (mut passed, mut failed) = (0, 0);
    for line in stdout.lines().filter(|l| l.starts_with("test result:")) {
        let number_before = |word: &str| -> u32 {
            line.split(';')
                .find(|part| part.trim_end().ends_with(word))
                .and_then(|part| part.split_whitespace().rev().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        passed += number_before("passed");
        failed += number_before("failed");
    }
    if !output.status.success() && failed == 0 {
        failed = 1; // a build failure has no summary line
    }
    println!("unit tests: {passed} passed, {failed} failed");
    Ok((passed, failed))
}
