//! `cargo xtask run`: mapcountd on this host if it can trace, else in a VM
//! with a demo workload or the developer's own command, shown live by
//! `mapcountd top` and summed up by `mapcountd report` at the end.

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{atomic::AtomicBool, mpsc},
};

use anyhow::{Context as _, bail};

use crate::{
    checks::Tally,
    kernels::{self, Kernel},
    vm,
    workspace::{build_binaries, cache_dir, run_cmd},
};

pub fn host_can_trace() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

/// The VM's kernel when none is asked for.
const DEFAULT_KERNEL: &str = "6.12";

pub struct RunArgs<'a> {
    pub port: u16,
    pub force_vm: bool,
    pub kernel: Option<&'a str>,
    pub modules: Option<&'a Path>,
    /// Shared with the guest at the same path; the command runs there.
    pub share: Option<&'a Path>,
    /// The developer's command, run in the VM instead of the demo.
    pub command: &'a [String],
    /// Kill the VM after this many seconds (a test's run; a developer's
    /// runs until it ends).
    pub timeout: Option<u64>,
    /// One host thread for all vCPUs (see `vm::Boot::single_threaded`).
    pub single_threaded: bool,
}

pub fn run(args: RunArgs<'_>) -> anyhow::Result<ExitCode> {
    let bin = build_binaries()?;
    if host_can_trace() && !args.force_vm && args.kernel.is_none() && args.command.is_empty() {
        println!("this kernel can attach kprobes: running mapcountd here on port {}", args.port);
        run_cmd(
            Command::new(bin.join("mapcountd")).arg(format!("--web.listen-address=0.0.0.0:{}", args.port)),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let (status, _) = run_in_vm(&bin, &args, std::io::stdout().is_terminal())?;
    Ok(ExitCode::from(status))
}

/// The VM run: the demo or the command, live on a terminal (`mapcountd
/// top`) or with the console printed. Returns the exit status to give
/// (the command's) and the console.
fn run_in_vm(bin: &Path, args: &RunArgs<'_>, live: bool) -> anyhow::Result<(u8, String)> {
    let kernel = match args.kernel {
        Some(path) if path.contains('/') || Path::new(path).is_file() => {
            kernels::from_path(Path::new(path), args.modules)?
        }
        Some(name) => kernels::get(name)?,
        None => kernels::get(DEFAULT_KERNEL)?,
    };
    let shown = kernel.vmlinuz.display().to_string();
    let share = match (args.share, args.command.is_empty()) {
        (Some(dir), _) => Some(dir.canonicalize().with_context(|| format!("--share {}", dir.display()))?),
        (None, false) => Some(std::env::current_dir()?),
        (None, true) => None,
    };
    let btf = preflight(bin, &kernel, &shown)?;
    drivers_preflight(&kernel, &btf, &shown, share.is_some())?;
    let mut extra = vm::Extra::default();
    if let Some(dir) = &share {
        extra.share = true;
        extra.texts.push(("share-path".into(), dir.display().to_string()));
        extra.texts.push(("command".into(), format!("exec {}\n", shell_words(args.command))));
    }
    let image = vm::Image::build(bin, &kernel, vm::Mode::Demo, extra)?;
    let url = format!("http://127.0.0.1:{}/metrics", args.port);
    let what = if args.command.is_empty() { "a demo workload".to_owned() } else { shell_words(args.command) };
    println!("running mapcountd in a VM on {shown} with {what}; metrics at {url}");
    if let Some(dir) = &share {
        println!("{} is shared with the VM at the same path", dir.display());
    }

    let log = cache_dir().join(format!("run-{}.log", kernel.name));
    let stop = AtomicBool::new(false);
    let (started_tx, started_rx) = mpsc::channel();
    let boot = vm::Boot {
        forward_port: Some(args.port),
        timeout: args.timeout,
        single_threaded: args.single_threaded,
        echo: !live,
        share: share.as_deref(),
        console_log: Some(&log),
        stop: Some(&stop),
        started: Some(started_tx),
        ..vm::Boot::new("auto", 0)
    };
    let console = std::thread::scope(|scope| -> anyhow::Result<String> {
        let vm = scope.spawn(|| vm::boot(&kernel, &image, boot));
        if live {
            if let Ok(pid) = started_rx.recv() {
                // The live view until the VM ends or the developer quits.
                let _ = Command::new(bin.join("mapcountd"))
                    .arg("top")
                    .arg(format!("--url={url}"))
                    .arg("--follow")
                    .arg(&log)
                    .arg(format!("--while-pid={pid}"))
                    .status();
            }
            if !ended_on_its_own(&log) {
                // Quit before the VM ended: what the daemon saw so far.
                println!("{}", report_from(bin, &url));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        vm.join().map_err(|_| anyhow::anyhow!("the VM's thread panicked"))?
    })?;

    println!("console and mapcountd's log: {}", log.display());
    if let Some(failure) = console.lines().find_map(|l| l.strip_prefix("MAPCOUNT-RUN-FAILED ")) {
        bail!("in the VM: {failure}");
    }
    let report: Vec<&str> = console.lines().filter_map(|l| l.strip_prefix("MAPCOUNT-REPORT ")).collect();
    if live && !report.is_empty() {
        println!("{}", report.join("\n"));
    }
    let status = match console.lines().find_map(|l| l.strip_prefix("MAPCOUNT-COMMAND-EXIT ")) {
        Some(status) => {
            let status: u8 = status.trim().parse().context("the command's exit status")?;
            println!("{what} exited with status {status}");
            status
        }
        None if args.command.is_empty() => 0,
        // Stopped before the command ended (q in the live view).
        None => {
            println!("{what} did not finish: the VM was stopped");
            130
        }
    };
    Ok((status, console))
}

/// `cargo xtask run -- COMMAND` as a developer uses it, on `kernel`: the
/// command writes the guest's kernel release into the shared directory
/// and exits with 7; the file must come back, the status must be run's,
/// and the report must be there with nothing lost.
/// The command test's VM takes about 10 s; a stuck guest must not hang the tests.
const COMMAND_TEST_TIMEOUT: u64 = 180;

pub fn command_test(bin: &Path, kernel: &str, tally: &mut Tally) -> anyhow::Result<()> {
    let dir = cache_dir().join("run-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let command: Vec<String> =
        ["sh", "-c", "uname -r > release.txt; exit 7"].iter().map(|w| (*w).to_owned()).collect();
    // Any free port: the test host may run a mapcountd of its own on 9730.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut args = RunArgs {
        port,
        force_vm: true,
        kernel: Some(kernel),
        modules: None,
        share: Some(&dir),
        command: &command,
        timeout: Some(COMMAND_TEST_TIMEOUT),
        single_threaded: false,
    };
    let (mut status, mut console) = run_in_vm(bin, &args, false)?;
    // Multi-threaded TCG can run code the kernel is patching as probes
    // attach or detach: an oops on the int3, or a vCPU that loops on it
    // (a soft lockup in whichever task called the patched function, seen
    // once in mapcountd as it stopped). The emulator, not mapcount: run
    // once more with one host thread for all vCPUs, and say so.
    let emulator = ["Oops: int3", "soft lockup", "MAPCOUNT-TIMEOUT"];
    if let Some(seen) = emulator.iter().find(|s| console.contains(*s)) {
        println!(
            "run -- COMMAND on {kernel}: the VM showed {seen:?}; running again with single-threaded TCG"
        );
        args.single_threaded = true;
        (status, console) = run_in_vm(bin, &args, false)?;
    }
    let release =
        console.lines().find_map(|l| l.strip_prefix("MAPCOUNT-KERNEL ")).unwrap_or("-").trim().to_owned();
    let written = std::fs::read_to_string(dir.join("release.txt")).unwrap_or_default().trim().to_owned();
    let exactness = console
        .lines()
        .filter_map(|l| l.strip_prefix("MAPCOUNT-REPORT "))
        .find(|l| l.trim_start().starts_with("exactness"))
        .unwrap_or("");
    let results = [
        ("exit_status", "7".to_owned(), status.to_string(), status == 7),
        ("output_file", release.clone(), written.clone(), !written.is_empty() && written == release),
        ("report_nothing_lost", "0 lost".to_owned(), exactness.to_owned(), exactness.contains(" 0 lost")),
    ];
    for (name, known, reported, passed) in results {
        println!(
            "run -- COMMAND on {kernel}: {name}: known {known:?}, reported {reported:?}: {}",
            if passed { "passed" } else { "FAILED" }
        );
        tally.add(passed);
    }
    Ok(())
}

/// Whether the VM ended on its own: the command finished and the guest
/// printed its report (a stop from the live view leaves neither).
fn ended_on_its_own(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|console| console.contains("MAPCOUNT-COMMAND-EXIT "))
}

/// `mapcountd report` against the VM's forwarded port.
fn report_from(bin: &Path, url: &str) -> String {
    match Command::new(bin.join("mapcountd")).arg("report").arg(format!("--url={url}")).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim_end().to_owned(),
        Ok(out) => format!("no report: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("no report: {e}"),
    }
}

/// Words quoted for `sh`: each in single quotes, embedded ones escaped.
fn shell_words(words: &[String]) -> String {
    words.iter().map(|w| format!("'{}'", w.replace('\'', r"'\''"))).collect::<Vec<_>>().join(" ")
}

/// What the kernel lacks, said before it boots: BTF, and the fields and
/// probe points mapcountd reads (`mapcountd check --btf` on the image's
/// BTF). Missing optional ones are listed; missing core ones stop the run.
fn preflight(bin: &Path, kernel: &Kernel, shown: &str) -> anyhow::Result<PathBuf> {
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
    Ok(btf)
}

/// The drivers the VM needs, built in (the kernel's BTF names their
/// structures) or as modules: virtio_net to reach the host's port, and
/// virtiofs to share a directory.
fn drivers_preflight(kernel: &Kernel, btf: &Path, shown: &str, share: bool) -> anyhow::Result<()> {
    let btf = std::fs::read(btf)?;
    let built_in = |structure: &str| {
        let name = format!("\0{structure}\0");
        btf.windows(name.len()).any(|w| w == name.as_bytes())
    };
    let modules = if kernel.modules.as_os_str().is_empty() {
        Default::default()
    } else {
        vm::module_index(&kernel.modules)?
    };
    let has = |structure: &str, module: &str| built_in(structure) || modules.contains_key(module);
    if !has("virtnet_info", "virtio_net") {
        bail!(
            "{shown} has no virtio_net (CONFIG_VIRTIO_NET, built in or as a module): the VM could not reach the host"
        );
    }
    if share && !has("virtio_fs", "virtiofs") {
        bail!(
            "{shown} has no virtiofs (CONFIG_VIRTIO_FS, built in or as a module): no directory can be shared with the VM"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_words_for_sh() {
        let words = ["./a b".to_owned(), "it's".to_owned()];
        assert_eq!(shell_words(&words), r"'./a b' 'it'\''s'");
    }
}
