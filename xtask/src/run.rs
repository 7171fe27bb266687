//! `cargo xtask run`: mapcountd on this host if it can trace, else in a VM with a demo workload.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    kernels::{self, Kernel},
    vm,
    workspace::{build_binaries, run_cmd},
};

pub fn host_can_trace() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

/// The VM's kernel when none is asked for.
const DEFAULT_KERNEL: &str = "6.12";

pub fn run(port: u16, force_vm: bool, kernel: Option<&str>, modules: Option<&Path>) -> anyhow::Result<()> {
    let bin = build_binaries()?;
    if host_can_trace() && !force_vm && kernel.is_none() {
        println!("this kernel can attach kprobes: running mapcountd here on port {port}");
        return run_cmd(
            Command::new(bin.join("mapcountd")).arg(format!("--web.listen-address=0.0.0.0:{port}")),
        );
    }
    let kernel = match kernel {
        Some(path) if path.contains('/') || Path::new(path).is_file() => {
            kernels::from_path(Path::new(path), modules)?
        }
        Some(name) => kernels::get(name)?,
        None => kernels::get(DEFAULT_KERNEL)?,
    };
    let shown = kernel.vmlinuz.display().to_string();
    preflight(&bin, &kernel, &shown)?;
    println!(
        "running mapcountd in a VM on {shown} with a demo workload; metrics at http://localhost:{port}/metrics, Ctrl-C stops"
    );
    let image = vm::Image::build(&bin, &kernel, vm::Mode::Demo, vm::Extra::default())?;
    vm::boot(
        &kernel,
        &image,
        vm::Boot { forward_port: Some(port), timeout: None, echo: true, ..vm::Boot::new("auto", 0) },
    )?;
    Ok(())
}

/// What the kernel lacks, said before it boots: BTF, and the fields and
/// probe points mapcountd reads (`mapcountd check --btf` on the image's
/// BTF). Missing optional ones are listed; missing core ones stop the run.
fn preflight(bin: &Path, kernel: &Kernel, shown: &str) -> anyhow::Result<()> {
    let btf = kernels::extract_btf(kernel).with_context(|| format!("{shown}: reading its BTF"))?;
    let output = Command::new(bin.join("mapcountd")).arg("check").arg("--btf").arg(&btf).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let lacking: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("MISSING") || l.contains("UNREADABLE") || l.contains(" absent "))
        .collect();
    if lacking.is_empty() {
        println!("{shown}: every field and probe point mapcountd reads is there");
    } else {
        println!("{shown} lacks (and what stays empty without it):");
        for line in &lacking {
            println!("  {}", line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    if !output.status.success() {
        bail!(
            "{shown}: mapcountd cannot work on this kernel: {}{}",
            String::from_utf8_lossy(&output.stderr).trim(),
            if lacking.is_empty() { "" } else { " (core probe points missing, listed above)" }
        );
    }
    Ok(())
}
