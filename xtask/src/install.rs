//! The install test: the .deb goes into a Debian root file system made by
//! debootstrap, which boots in the VM with systemd as init. The service
//! must start by itself, serve metrics to a scrape from inside the guest,
//! and leave no BPF program behind after `systemctl stop`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{
    checks::{self, Tally},
    kernels, vm,
    workspace::{cache_dir, run_cmd},
};

/// The user space the test installs into: the release mapcountd is built
/// on (its glibc), with systemd, and curl and bpftool for the checks.
const SUITE: &str = "bookworm";
const INCLUDE: &str = "systemd,systemd-sysv,dbus,curl,bpftool";

/// Runs inside the guest once the system is up; what it prints reaches
/// the serial console.
const CHECK_SCRIPT: &str = include_str!("../guest/install-check.sh");

const CHECK_UNIT: &str = "[Unit]
Description=mapcount install test
After=mapcountd.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/mapcount-install-check
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

/// A trimmed debootstrap tree, made once and kept in the cache.
fn base_root() -> anyhow::Result<PathBuf> {
    let base = cache_dir().join(format!("debootstrap-{SUITE}"));
    if base.join(".complete").exists() {
        return Ok(base);
    }
    let _ = fs::remove_dir_all(&base);
    let (archive, _) = kernels::archive_uris()?;
    println!("install test: debootstrap {SUITE} ({INCLUDE})");
    run_cmd(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
            .arg(&base)
            .arg(&archive)
            .stdout(std::process::Stdio::null()),
    )?;
    // It all lives in the VM's memory: no documentation, locales or apt lists.
    for dir in ["usr/share/doc", "usr/share/man", "usr/share/locale", "var/cache/apt", "var/lib/apt/lists"] {
        let _ = fs::remove_dir_all(base.join(dir));
    }
    fs::write(base.join(".complete"), "")?;
    Ok(base)
}

pub fn test(deb: &Path, kernel: &kernels::Kernel, tally: &mut Tally) -> anyhow::Result<()> {
    let base = base_root()?;
    let root = cache_dir().join("install-root");
    let _ = fs::remove_dir_all(&root);
    run_cmd(Command::new("cp").arg("-a").arg(&base).arg(&root))?;
    let _ = fs::remove_file(root.join(".complete"));

    // dpkg in the chroot: the maintainer scripts enable the unit; they do
    // not start it, as systemd is not running there. Booting must.
    fs::copy(deb, root.join("tmp/mapcount.deb"))?;
    let install = Command::new("chroot").arg(&root).args(["dpkg", "-i", "/tmp/mapcount.deb"]).output()?;
    let install_log =
        format!("{}{}", String::from_utf8_lossy(&install.stdout), String::from_utf8_lossy(&install.stderr));
    println!("\ninstall test: dpkg -i in a {SUITE} root:\n{}", install_log.trim_end());
    let mut results = vec![checks::CheckResult {
        name: "install/dpkg".to_owned(),
        known: "exit 0".to_owned(),
        reported: format!("exit {}", install.status.code().unwrap_or(-1)),
        accepted: "exit 0".to_owned(),
        passed: install.status.success(),
    }];
    fs::remove_file(root.join("tmp/mapcount.deb"))?;

    let check = root.join("usr/local/sbin/mapcount-install-check");
    fs::create_dir_all(check.parent().context("a directory")?)?;
    fs::write(&check, CHECK_SCRIPT)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&check, fs::Permissions::from_mode(0o755))?;
    }
    let units = root.join("etc/systemd/system");
    fs::write(units.join("mapcount-install-check.service"), CHECK_UNIT)?;
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/mapcount-install-check.service",
        wants.join("mapcount-install-check.service"),
    )?;
    // No console logins: the test's own unit is all that talks. Without
    // udev (not in minbase), a getty would wait 90 s for its tty device.
    for getty in ["serial-getty@ttyS0.service", "getty@tty1.service"] {
        std::os::unix::fs::symlink("/dev/null", units.join(getty))?;
    }

    // As shipped (auto: fentry on these kernels), then with kprobes, which
    // take the perf_event_open path and its permission checks.
    let config_path = root.join("etc/mapcount/mapcountd.toml");
    let shipped_config = fs::read_to_string(&config_path)?;
    for mode in ["auto", "kprobe"] {
        let config = shipped_config.replace("mode = \"auto\"", &format!("mode = \"{mode}\""));
        fs::write(&config_path, config)?;
        // Debian kernels default to kernel.perf_event_paranoid=3, which
        // refuses perf_event_open (the kprobe path) without CAP_SYS_ADMIN:
        // the unit's documented remedy, applied by systemd-sysctl at boot.
        let sysctl = root.join("etc/sysctl.d/50-mapcount-kprobe.conf");
        if mode == "kprobe" {
            fs::write(&sysctl, "kernel.perf_event_paranoid = 2\n")?;
        } else {
            let _ = fs::remove_file(&sysctl);
        }
        let initramfs = cache_dir().join("install-root.cpio.gz");
        vm::pack(&root, &initramfs)?;
        let image = vm::Image { initramfs };
        let started = std::time::Instant::now();
        let boot = || vm::Boot { init: Some("/sbin/init"), ..vm::Boot::new(mode, 600) };
        let mut output = vm::boot(kernel, &image, boot())?;
        if !output.contains("MAPCOUNT-INSTALL ") && output.contains("Oops") {
            // The emulator's early-boot oops (see the VM matrix): boot again.
            println!("install test ({mode}): the kernel oopsed before systemd ran; booting again");
            output = vm::boot(kernel, &image, boot())?;
        }
        let log = cache_dir().join(format!("vm-install-{}-{mode}.log", kernel.name));
        fs::write(&log, &output)?;
        for mut r in parse(&output) {
            r.name = r.name.replacen("install/", &format!("install/{mode}/"), 1);
            results.push(r);
        }
        println!(
            "install test, {SUITE} with systemd on kernel {}, attach.mode = {mode} ({:.1} s, console log {}):",
            kernel.name,
            started.elapsed().as_secs_f64(),
            log.display()
        );
        for line in output.lines().filter_map(|l| l.find("MAPCOUNT-INSTALL ").map(|at| &l[at..])) {
            if !line.starts_with("MAPCOUNT-INSTALL journal: ") || !line.contains(" INFO ") {
                println!("  | {line}");
            }
        }
    }
    for r in &results {
        println!(
            "  {:<34} {:>24} {:>16}  {}",
            r.name,
            r.reported,
            r.accepted,
            if r.passed { "passed" } else { "FAILED" }
        );
        tally.add(r.passed);
    }
    Ok(())
}

/// The guest's `MAPCOUNT-INSTALL` lines, as checks.
fn parse(console: &str) -> Vec<checks::CheckResult> {
    // systemd prefixes console output of units with nothing, but the kernel
    // may interleave: look for the marker anywhere in the line.
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.find("MAPCOUNT-INSTALL ").map(|i| &l[i + "MAPCOUNT-INSTALL ".len()..]))
        .collect();
    let field = |key: &str| -> String {
        lines
            .iter()
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or("-")
            .to_owned()
    };
    let check = |name: &str, reported: String, accepted: &str, passed: bool| checks::CheckResult {
        name: name.to_owned(),
        known: "-".to_owned(),
        reported,
        accepted: accepted.to_owned(),
        passed,
    };
    let active = field("is-active=");
    let enabled = field("enabled=");
    let uid = field("uid=");
    let scrape_lines: usize = field("lines=").parse().unwrap_or(0);
    let build_info = lines.iter().any(|l| l.starts_with("scrape: mapcount_build_info{"));
    let attached = lines
        .iter()
        .filter(|l| l.starts_with("scrape: mapcount_probe_attached{") && l.ends_with(" 1"))
        .count();
    vec![
        check(
            "install/service_active",
            format!("{active}, {enabled}"),
            "active, enabled",
            active == "active" && enabled == "enabled",
        ),
        check("install/unprivileged", format!("uid {uid}"), "uid != 0", uid != "-" && uid != "0"),
        check(
            "install/scrape_in_guest",
            format!("{scrape_lines} lines, {attached} probes"),
            "build_info, probes",
            field("scrape_exit=") == "0" && build_info && attached > 0,
        ),
        check(
            "install/stop_detaches",
            format!("{}, {} progs, {} links", field("state="), field("progs_after="), field("links_after=")),
            "inactive, 0, 0",
            field("stop_exit=") == "0"
                && field("state=") == "inactive"
                && field("progs_after=") == "0"
                && field("links_after=") == "0"
                && field("progs_before=").parse::<u32>().is_ok_and(|n| n > 0),
        ),
    ]
}
