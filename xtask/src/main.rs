//! Developer commands: `cargo xtask setup | run | test | bench | soak | fuzz | package`.
//! This file is the command line and the dispatch; each command is a module
//! of its own, and the VM harness (`vm`), the kernels (`kernels`) and the
//! result types (`checks`) are shared below them.

mod bench;
mod checks;
mod fuzz;
mod install;
mod kernels;
mod package;
mod prometheus;
mod run;
mod selftests;
mod setup;
mod soak;
mod test;
mod vm;
mod workspace;

use std::process::ExitCode;

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
        /// The VM's kernel: 6.1, 6.12, 7.3 (Debian's), 7.3-small (built
        /// here), or the path of a kernel image (bzImage or vmlinuz) built
        /// with BTF; implies --vm.
        #[arg(long, value_name = "NAME|PATH")]
        kernel: Option<String>,
        /// The `lib/modules/<release>` directory of a kernel given by path
        /// (without it, its virtio drivers must be built in).
        #[arg(long, value_name = "DIR", requires = "kernel")]
        modules: Option<std::path::PathBuf>,
        /// A directory shared with the VM at the same path (default with
        /// a command: the current directory); the command runs in it.
        #[arg(long, value_name = "DIR")]
        share: Option<std::path::PathBuf>,
        /// Run this in the VM next to mapcountd instead of the demo; the
        /// VM stops when it ends and its exit status is returned.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Overload in the VM: a fork/mmap storm against a small ring buffer, sampling the daemon's RSS.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        #[arg(long, default_value = "6.12")]
        kernel: String,
    },
    /// Build the Debian package (mapcountd, unit, configuration, dashboard, rules) into target/debian/.
    Package {
        /// Then install it into a debootstrapped Debian booted with systemd in the VM.
        #[arg(long)]
        install_test: bool,
    },
    /// Measure the performance budget (user space on this host, kernel side in a VM) and write BENCHMARKS.md.
    Bench {
        /// Only boot the VM part and print its raw figures.
        #[arg(long)]
        vm_only: bool,
        /// Only the kernel side's cost, in a short boot (a few minutes
        /// instead of 18): one round of the loops under mapcountd fentry,
        /// sampled and bpftrace fentry, and instructions per call of each
        /// program. Printed, not written to BENCHMARKS.md.
        #[arg(long, conflicts_with = "vm_only")]
        kernel_cost: bool,
    },
    /// Fuzz the event decoder, the record-file reader and the configuration parser.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all).
        #[arg(long, value_delimiter = ',')]
        target: Vec<String>,
    },
    /// Unit tests, the host verifier test, then the VM matrix (kernel x attach mode).
    Test {
        /// Kernels to boot (by short name). `7.3-small` is built here from
        /// Debian's 7.3 source with a small configuration, where
        /// do_wp_page is inlined (about 12 minutes on 2 cores, then cached).
        #[arg(long, value_delimiter = ',', default_value = "6.1,6.12,7.3,7.3-small")]
        kernel: Vec<String>,
        /// Attach modes to run each kernel in.
        #[arg(long, value_delimiter = ',', default_value = "fentry,kprobe")]
        mode: Vec<String>,
        /// Skip the unit and host tests.
        #[arg(long)]
        vm_only: bool,
        /// Also the cells a default run leaves out to stay within CI's
        /// time: 6.12 in kprobe mode and the mm selftests on 6.12 (the
        /// same rmap interface as 7.3, which runs both).
        #[arg(long)]
        full: bool,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // Every command needs what setup installs; it says what it installs.
    setup::run()?;
    let done = match cli.command {
        Cmd::Setup => Ok(()),
        // The developer's command's exit status is run's own.
        Cmd::Run { port, vm, kernel, modules, share, command } => {
            return run::run(run::RunArgs {
                port,
                force_vm: vm,
                kernel: kernel.as_deref(),
                modules: modules.as_deref(),
                share: share.as_deref(),
                command: &command,
                timeout: None,
                single_threaded: false,
            });
        }
        Cmd::Package { install_test } => package::command(install_test),
        Cmd::Bench { vm_only, kernel_cost } => bench::command(vm_only, kernel_cost),
        Cmd::Soak { minutes, kernel } => soak::command(minutes, &kernel),
        Cmd::Fuzz { seconds, target } => fuzz::command(seconds, &target),
        Cmd::Test { kernel, mode, vm_only, full } => test::test(&kernel, &mode, vm_only, full),
    };
    done.map(|()| ExitCode::SUCCESS)
}
