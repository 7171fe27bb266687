//! `cargo xtask test`: lints, unit and host tests, the VM matrix (kernel x attach mode), the
//! kernel's mm selftests, and the report.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    checks::{CheckResult, Tally},
    fuzz::{FUZZ_SECONDS_IN_TEST, fuzz},
    install, kernels,
    package::package,
    prometheus::{self, promtool, promtool_check_metrics},
    run, selftests,
    soak::{OVERLOAD_SECONDS_IN_TEST, soak},
    vm,
    workspace::{build_binaries, cache_dir, workspace_root},
};

/// One cell of the VM matrix.
pub struct Cell {
    kernel: String,
    mode: String,
    elapsed: std::time::Duration,
    results: Vec<CheckResult>,
    log: PathBuf,
}

pub fn test(kernel_names: &[String], modes: &[String], vm_only: bool, full: bool) -> anyhow::Result<()> {
    let mut tally = Tally::default();

    let mut kernels = Vec::new();
    for name in kernel_names {
        kernels.push(kernels::get(name)?);
    }
    let btf_dir = cache_dir().join("btf");
    std::fs::create_dir_all(&btf_dir)?;
    for kernel in &kernels {
        let btf = kernels::extract_btf(kernel)?;
        std::fs::copy(&btf, btf_dir.join(format!("{}.btf", kernel.name)))?;
    }

    let bin = build_binaries()?;
    if !vm_only {
        for (name, passed) in lints()? {
            println!("lint {name}: {}", if passed { "pass" } else { "FAIL" });
            tally.add(passed);
        }
        let (passed, failed) = unit_tests(&btf_dir)?;
        tally.passed += passed;
        tally.failed += failed;
        let (passed, failed) = fuzz(FUZZ_SECONDS_IN_TEST, &[])?;
        tally.passed += passed;
        tally.failed += failed;
        tally.add(host_verifier_test(&bin));
        tally.add(long_uptime()?);
        deploy_checks(&bin, &mut tally)?;
        for kernel in &kernels {
            tally.add(check_against_btf(&bin, kernel, &btf_dir)?);
        }
    }

    let mut cells = Vec::new();
    for kernel in &kernels {
        // Prometheus runs in the 7.3 cells, where every metric has data.
        let prometheus = kernel.name == "7.3";
        let mut extra = if prometheus { prometheus::image_extra()? } else { vm::Extra::default() };
        // MAPCOUNT_KEEP_RECORDS=DIR: each cell's record file and daemon log
        // are copied there (virtiofs), to replay a failing cell on the host.
        let keep = keep_records_dir()?;
        if let Some(dir) = &keep {
            extra.texts.push(("share-path".into(), dir.display().to_string()));
            extra.share = true;
        }
        let image = vm::Image::build(&bin, kernel, vm::Mode::Test, extra)?;
        for mode in modes {
            if kernel.name == kernels::SMALL && mode == "kprobe" {
                // Its scenarios pass in kprobe mode, then the kernel itself
                // jumps to a NULL or non-executable address from the
                // ftrace call site of a probed function (handle_mm_fault,
                // folio_add_file_rmap_ptes) while probes attach or detach;
                // Debian's kernels do not. Its cell tests fentry mode.
                println!(
                    "kernel {} ({mode}): not run (the kernel crashes in ftrace-based kprobes)",
                    kernel.name
                );
                continue;
            }
            if !full && kernel.name == "6.12" && mode == "kprobe" {
                println!("kernel 6.12 (kprobe): not run (kprobe mode runs on 6.1 and 7.3; --full runs it)");
                continue;
            }
            let started = std::time::Instant::now();
            // The small kernel finds one CPU without ACPI tables to read.
            let cpus = if kernel.name == kernels::SMALL { 1 } else { 2 };
            let boot = || vm::Boot { cpus, share: keep.as_deref(), ..vm::Boot::new(mode, 600) };
            let output =
                boot_past_tcg_oops(kernel, &image, &format!("kernel {} ({mode})", kernel.name), boot)?;
            let log = cache_dir().join(format!("vm-test-{}-{mode}.log", kernel.name));
            std::fs::write(&log, &output)?;
            let mut results = vm::parse_checks(&output);
            if prometheus {
                results.extend(prometheus::parse(&output)?);
            }
            if !output.contains("MAPCOUNT-SUMMARY") {
                results.push(CheckResult::failed("vm/completed", "the VM produced no summary: see the log"));
            }
            for r in &results {
                tally.add(r.passed);
            }
            cells.push(Cell {
                kernel: kernel.name.clone(),
                mode: mode.clone(),
                elapsed: started.elapsed(),
                results,
                log,
            });
        }
    }

    // The kernel's own mm selftests, once per kernel in the first mode.
    let mut selftest_reports = Vec::new();
    if let Some(mode) = modes.first() {
        // Debian's kernels: the small one is there for what inlining changes
        // (write-fault classification), which the scenarios cover.
        for kernel in kernels.iter().filter(|k| k.name != kernels::SMALL) {
            if !full && kernel.name == "6.12" {
                println!(
                    "kernel 6.12: mm selftests not run (6.1 and 7.3 run them; 6.12 has 7.3's rmap interface; \
                     --full runs them)"
                );
                continue;
            }
            let started = std::time::Instant::now();
            let image = vm::Image::build(&bin, kernel, vm::Mode::Selftests, selftests::image_extra()?)?;
            let timeout = selftests::TEST_TIMEOUT * selftests::TESTS.len() as u64 + 300;
            let cell = format!("kernel {} ({mode}, mm selftests)", kernel.name);
            let output = boot_past_tcg_oops(kernel, &image, &cell, || vm::Boot::new(mode, timeout))?;
            let log = cache_dir().join(format!("vm-selftests-{}-{mode}.log", kernel.name));
            std::fs::write(&log, &output)?;
            let (rows, mut results) = selftests::parse(&output, &kernel.name);
            results.push(vm::Accounting::parse(&output).check("events/balanced_per_cpu"));
            for r in &results {
                tally.add(r.passed);
            }
            let edges: Vec<String> = output
                .lines()
                .filter(|l| l.starts_with("MAPCOUNT-SELFTEST-"))
                .map(|l| l.trim().to_owned())
                .collect();
            selftest_reports.push((kernel.name.clone(), mode.clone(), started.elapsed(), rows, edges));
            cells.push(Cell {
                kernel: kernel.name.clone(),
                mode: format!("{mode}, mm selftests"),
                elapsed: started.elapsed(),
                results,
                log,
            });
        }
    }

    for cell in &cells {
        println!(
            "\nVM checks, kernel {} in {} mode ({:.1} s, console log {}):",
            cell.kernel,
            cell.mode,
            cell.elapsed.as_secs_f64(),
            cell.log.display()
        );
        println!("  {:<34} {:>8} {:>10} {:>14}  result", "check", "known", "reported", "accepted");
        for r in &cell.results {
            let verdict = if r.passed { "passed" } else { "FAILED" };
            println!("  {:<34} {:>8} {:>10} {:>14}  {verdict}", r.name, r.known, r.reported, r.accepted);
        }
    }
    for (kernel, mode, elapsed, rows, edges) in &selftest_reports {
        println!(
            "\nmm selftests (Debian's 6.12 source) on kernel {kernel}, {mode} mode, {:.0} s:",
            elapsed.as_secs_f64()
        );
        for row in rows {
            println!("  {row}");
        }
        for edge in edges {
            println!("  {edge}");
        }
    }
    if !vm_only && let Some(kernel) = kernels.iter().find(|k| k.name == "6.12") {
        soak(&bin, kernel, OVERLOAD_SECONDS_IN_TEST, &mut tally)?;
        let deb = package()?;
        install::test(&deb, kernel, &mut tally)?;
    }
    // A developer's command on 6.1, whose virtio and virtiofs drivers are
    // modules (6.12 and later build them in).
    if !vm_only && kernels.iter().any(|k| k.name == "6.1") {
        run::command_test(&bin, "6.1", &mut tally)?;
    }
    // Every VM's final metrics, as the daemon exported them, through promtool's linter.
    if let Ok(promtool) = promtool() {
        for cell in &cells {
            let console = std::fs::read_to_string(&cell.log).unwrap_or_default();
            let text: String = console
                .lines()
                .filter_map(|l| l.strip_prefix("metrics: "))
                .map(|l| format!("{l}\n"))
                .collect();
            let ok = !text.is_empty() && promtool_check_metrics(&promtool, &text);
            println!(
                "promtool check metrics on the {} {} VM's metrics: {}",
                cell.kernel,
                cell.mode,
                if ok { "passed" } else { "FAILED" }
            );
            tally.add(ok);
        }
    }
    if !cells.is_empty() {
        println!("\nVM matrix:");
        println!("  {:<8} {:<8} {:>8} {:>8} {:>9}", "kernel", "mode", "passed", "failed", "seconds");
        for cell in &cells {
            let ok = cell.results.iter().filter(|r| r.passed).count();
            let bad = cell.results.len() - ok;
            println!(
                "  {:<8} {:<8} {:>8} {:>8} {:>9.1}",
                cell.kernel,
                cell.mode,
                ok,
                bad,
                cell.elapsed.as_secs_f64()
            );
        }
    }
    println!("\n{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        bail!("{} test(s) failed", tally.failed);
    }
    Ok(())
}

/// `MAPCOUNT_KEEP_RECORDS`, created and made absolute, if set.
fn keep_records_dir() -> anyhow::Result<Option<PathBuf>> {
    let Some(dir) = std::env::var_os("MAPCOUNT_KEEP_RECORDS") else { return Ok(None) };
    std::fs::create_dir_all(&dir)?;
    Ok(Some(Path::new(&dir).canonicalize()?))
}

/// What an operator installs, checked with the real tools: the systemd
/// unit (systemd-analyze verify, security exposure), the alerting and
/// recording rules (promtool check rules) and a live scrape (promtool
/// check metrics).
pub fn deploy_checks(bin: &Path, tally: &mut Tally) -> anyhow::Result<()> {
    let deploy = workspace_root().join("deploy");
    let scratch = cache_dir().join("deploy-check");
    std::fs::create_dir_all(&scratch)?;
    // verify wants the ExecStart binary to exist: point it at this build.
    let unit = std::fs::read_to_string(deploy.join("systemd/mapcountd.service"))?
        .replace("/usr/bin/mapcountd", &bin.join("mapcountd").display().to_string());
    let unit_path = scratch.join("mapcountd.service");
    std::fs::write(&unit_path, unit)?;
    let verify = Command::new("systemd-analyze").arg("verify").arg(&unit_path).output()?;
    let complaints =
        format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    let ok = verify.status.success() && complaints.trim().is_empty();
    println!("systemd-analyze verify: {}{}", if ok { "passed" } else { "FAILED: " }, complaints.trim());
    tally.add(ok);
    let security =
        Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(&unit_path).output()?;
    let text = String::from_utf8_lossy(&security.stdout);
    let overall = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("").trim().to_owned();
    let ok = overall.contains(" OK") || overall.contains(" SAFE");
    println!("systemd-analyze security: {} ({overall})", if ok { "passed" } else { "FAILED" });
    tally.add(ok);

    let promtool = promtool()?;
    let rules = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(deploy.join("prometheus/mapcount.rules.yml"))
        .output()?;
    let ok = rules.status.success();
    println!(
        "promtool check rules: {} ({})",
        if ok { "passed" } else { "FAILED" },
        String::from_utf8_lossy(&rules.stdout).trim().replace('\n', " ")
    );
    tally.add(ok);

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut daemon = Command::new(bin.join("mapcountd"))
        .args(["--web.listen-address", &format!("127.0.0.1:{port}"), "--log.level", "error"])
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let started = std::time::Instant::now();
    let scrape = loop {
        let out = Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/metrics")]).output()?;
        if out.status.success() || started.elapsed() > std::time::Duration::from_secs(30) {
            break String::from_utf8_lossy(&out.stdout).to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = daemon.kill();
    let _ = daemon.wait();
    let ok = !scrape.is_empty() && promtool_check_metrics(&promtool, &scrape);
    println!("promtool check metrics on a live scrape: {}", if ok { "passed" } else { "FAILED" });
    tally.add(ok);
    Ok(())
}

/// Every kprobe and tracepoint program passes this machine's verifier (loaded, not attached).
pub fn host_verifier_test(bin: &Path) -> bool {
    let output = Command::new(bin.join("mapcountd")).args(["check", "--load"]).output();
    let Ok(output) = output else {
        println!("host verifier test: cannot run mapcountd");
        return false;
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().find(|l| l.starts_with("verifier:")) {
        Some(line) => {
            println!("host verifier test: passed ({line})");
            true
        }
        None => {
            println!("host verifier test: FAILED\n{stdout}{}", String::from_utf8_lossy(&output.stderr));
            false
        }
    }
}

/// `mapcountd check --btf` on a kernel's BTF: every core probe and field resolves.
pub fn check_against_btf(bin: &Path, kernel: &kernels::Kernel, btf_dir: &Path) -> anyhow::Result<bool> {
    let btf = btf_dir.join(format!("{}.btf", kernel.name));
    let output = Command::new(bin.join("mapcountd")).arg("check").arg("--btf").arg(&btf).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    std::fs::write(cache_dir().join(format!("check-{}.txt", kernel.name)), text.as_bytes())?;
    println!("\nmapcountd check --btf ({}):\n{text}{}", kernel.name, String::from_utf8_lossy(&output.stderr));
    let ok = output.status.success();
    println!("check on {} BTF: {}", kernel.name, if ok { "passed" } else { "FAILED" });
    Ok(ok)
}

/// Runs the workspace's unit tests; returns (passed, failed) from cargo's summary lines.
/// Events a long uptime replays: past 2^32 rmap pages, tens of millions
/// of folios created and freed at reused addresses, processes exiting,
/// driver pages from more sources than the label keeps (about 20 s).
pub const UPTIME_EVENTS: u64 = 100_000_000;

/// The aggregator over a long uptime: every counter equal to what the
/// stream put in, no folio left, RSS flat (the ingest benchmark's --uptime).
pub fn long_uptime() -> anyhow::Result<bool> {
    let events = UPTIME_EVENTS.to_string();
    let output = crate::workspace::ingest_bench(&["--uptime".as_ref(), events.as_ref()])?;
    print!("{}", String::from_utf8_lossy(&output.stdout));
    println!("long uptime: {}", if output.status.success() { "pass" } else { "FAIL" });
    Ok(output.status.success())
}

/// clippy (warnings are errors) on the userspace crates and on the eBPF
/// crate for its target, and rustfmt with the nightly toolchain that
/// understands rustfmt.toml. Each is a check of its own.
pub fn lints() -> anyhow::Result<Vec<(&'static str, bool)>> {
    let root = workspace_root();
    let run = |cmd: &mut Command| -> anyhow::Result<bool> {
        Ok(cmd.current_dir(&root).status().with_context(|| format!("cannot run {cmd:?}"))?.success())
    };
    Ok(vec![
        (
            "clippy",
            run(Command::new(env!("CARGO")).args([
                "clippy",
                "--workspace",
                "--exclude",
                "mapcount-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?,
        ),
        (
            "clippy-ebpf",
            run(Command::new("cargo").args([
                "+nightly",
                "clippy",
                "-p",
                "mapcount-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
                "--",
                "-D",
                "warnings",
            ]))?,
        ),
        ("rustfmt", run(Command::new("cargo").args(["+nightly", "fmt", "--all", "--check"]))?),
        ("shellcheck", shellcheck()?),
    ])
}

/// The guest scripts as the VMs run them (the preamble, then the body of
/// one mode), checked with shellcheck at warning level.
fn shellcheck() -> anyhow::Result<bool> {
    let guest = workspace_root().join("xtask/guest");
    let read =
        |name: &str| std::fs::read_to_string(guest.join(name)).with_context(|| format!("xtask/guest/{name}"));
    let preamble = read("preamble.sh")?;
    let dir = cache_dir().join("shellcheck");
    std::fs::create_dir_all(&dir)?;
    let mut clean = true;
    for (name, text) in [
        ("init.sh", format!("{preamble}{}", read("init.sh")?)),
        ("bench.sh", format!("{preamble}{}", read("bench.sh")?)),
        ("install-check.sh", read("install-check.sh")?),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        let status = Command::new("shellcheck")
            .args(["--shell=sh", "--severity=warning"])
            .arg(&path)
            .status()
            .context("cannot run shellcheck (cargo xtask setup installs it)")?;
        clean &= status.success();
    }
    Ok(clean)
}

/// Figures the daemon's resource tests leave behind (hostile clients, the
/// memory limit), printed into the run's log.
pub const TEST_REPORTS: &[&str] = &["hostile-clients.txt", "memory-limit.txt"];

pub fn unit_tests(btf_dir: &Path) -> anyhow::Result<(u32, u32)> {
    let reports = workspace_root().join("target/tmp");
    for report in TEST_REPORTS {
        let _ = std::fs::remove_file(reports.join(report));
    }
    // The per-kernel BTF tests are #[ignore]d in a plain `cargo test`
    // (they need the kernels this command downloads); here they run.
    let output = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .env("MAPCOUNT_BTF_DIR", btf_dir)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "mapcount-ebpf",
            "--no-fail-fast",
            "--",
            "--include-ignored",
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
    for report in TEST_REPORTS {
        if let Ok(text) = std::fs::read_to_string(reports.join(report)) {
            println!("\n{text}");
        }
    }
    Ok((passed, failed))
}

/// Boots a test VM. Multi-threaded TCG sometimes executes code the kernel
/// is patching (text_poke's int3 while a static key, a trampoline or a
/// kprobe is installed) and the guest oopses on the int3, in early boot or
/// while mapcountd attaches. Once (6.1, a second mapcountd attaching its
/// fentry programs) both vCPUs instead stayed in the kernel in mapcountd's
/// threads until the cell timed out (soft lockups), and the same cell
/// passed when run again. That is the emulator, not mapcount: boot once
/// more with one host thread for all vCPUs, and say so under `cell`. A
/// lockup of mapcount's own making comes back there and fails the cell.
fn boot_past_tcg_oops<'a>(
    kernel: &kernels::Kernel,
    image: &vm::Image,
    cell: &str,
    boot: impl Fn() -> vm::Boot<'a>,
) -> anyhow::Result<String> {
    let output = vm::boot(kernel, image, boot())?;
    let died = if !output.contains("MAPCOUNT-KERNEL") {
        "the VM did not reach /init"
    } else if output.contains("Oops: int3") {
        "the guest oopsed on an int3 (code patching under multi-threaded TCG)"
    } else if output.contains("BUG: soft lockup") {
        "the guest's vCPUs stayed in the kernel (soft lockup) under multi-threaded TCG"
    } else {
        return Ok(output);
    };
    println!("{cell}: {died}; booting again with single-threaded TCG");
    vm::boot(kernel, image, vm::Boot { single_threaded: true, ..boot() })
}
