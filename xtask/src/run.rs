//! `cargo xtask run`: mapcountd on this host if it can trace, else in a VM with a demo workload.

use std::{path::Path, process::Command};

use crate::{
    kernels, vm,
    workspace::{build_binaries, run_cmd},
};

pub fn host_can_trace() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

pub fn run(port: u16, force_vm: bool) -> anyhow::Result<()> {
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
    let image = vm::Image::build(&bin, &kernel, vm::Mode::Demo, vm::Extra::default())?;
    vm::boot(
        &kernel,
        &image,
        vm::Boot { forward_port: Some(port), timeout: None, echo: true, ..vm::Boot::new("auto", 0) },
    )?;
    Ok(())
}
