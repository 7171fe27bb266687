//! Booting a stock kernel in qemu (TCG) with an initramfs of busybox,
//! mapcountd and the workload.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    checks::CheckResult,
    kernels::Kernel,
    workspace::{cache_dir, run_cmd, spinner},
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run the workload's checks once, stop the daemon, power off.
    Test,
    /// Serve metrics to the host while the workload repeats, until killed.
    Demo,
    /// Overload: a small ring buffer and folio table under a fork/mmap
    /// storm for `mapcount.soak=` seconds, sampling the daemon every 10 s.
    Soak,
    /// The kernel-side budget: start-up, loop timings under each tracer,
    /// and the event rates the daemon takes without loss.
    Bench,
    /// The kernel's mm selftests under mapcountd (`selftests.rs`).
    Selftests,
}

/// `cargo xtask bench` in the guest. Every figure comes from this one boot.
const BENCH: &str = include_str!("../guest/bench.sh");

pub struct Image {
    pub initramfs: PathBuf,
}

/// Network drivers the demo VM needs to reach the host (with their dependencies).
const NET_MODULES: &[&str] = &["virtio_pci", "virtio_net"];

/// The same, and virtiofs for a directory shared with the host. Debian's
/// cloud kernels have no 9p; 6.12 and later build virtiofs in.
const SHARE_MODULES: &[&str] = &["virtio_pci", "virtio_net", "virtiofs"];

/// Drivers some kernels build in (6.12 and later: both); those are
/// installed only when the package has them.
const MAYBE_BUILT_IN: &[&str] = &["virtio_pci", "virtiofs"];

const PREAMBLE: &str = include_str!("../guest/preamble.sh");

const INIT: &str = include_str!("../guest/init.sh");

/// What a caller puts into an image beyond mapcountd, the workload and
/// bpftool: the kernel's selftests, Redis, Prometheus and its files.
#[derive(Default)]
pub struct Extra {
    /// Programs for /usr/bin, with their shared libraries.
    pub binaries: Vec<PathBuf>,
    /// Executables: (file on this host, path in the image).
    pub files: Vec<(PathBuf, PathBuf)>,
    /// (path in the image, contents).
    pub texts: Vec<(PathBuf, String)>,
    /// `$NAME` in the init script and its value.
    pub init_vars: Vec<(&'static str, String)>,
    /// The guest mounts a directory shared by the host (its drivers go in).
    pub share: bool,
}

impl Image {
    pub fn build(bin_dir: &Path, kernel: &Kernel, mode: Mode, extra: Extra) -> anyhow::Result<Self> {
        let name = match mode {
            Mode::Test => "test",
            Mode::Demo => "demo",
            Mode::Soak => "soak",
            Mode::Bench => "bench",
            Mode::Selftests => "selftests",
        };
        let root = cache_dir().join(format!("initramfs-{}-{name}", kernel.name));
        let _ = fs::remove_dir_all(&root);
        for d in ["bin", "usr/bin", "proc", "sys", "dev", "tmp", "mnt", "modules"] {
            fs::create_dir_all(root.join(d))?;
        }
        let busybox = Path::new("/bin/busybox");
        fs::copy(busybox, root.join("bin/busybox")).context("copy busybox (busybox-static)")?;
        let mut script = if mode == Mode::Bench { BENCH.to_owned() } else { INIT.replace("$MODE", name) };
        for (var, value) in &extra.init_vars {
            script = script.replace(var, value);
        }
        fs::write(root.join("init"), format!("{PREAMBLE}{script}"))?;
        set_executable(&root.join("init"))?;
        for (src, dst) in &extra.files {
            let dst = root.join(dst);
            fs::create_dir_all(dst.parent().context("a file in a directory")?)?;
            fs::copy(src, &dst).with_context(|| format!("copy {}", src.display()))?;
            set_executable(&dst)?;
        }
        for (dst, text) in &extra.texts {
            let dst = root.join(dst);
            fs::create_dir_all(dst.parent().context("a file in a directory")?)?;
            fs::write(&dst, text)?;
        }

        let mut libraries = BTreeSet::new();
        let bpftool = which("bpftool")?;
        let mut binaries = vec![bin_dir.join("mapcountd"), bin_dir.join("mapcount-workload"), bpftool];
        if mode == Mode::Bench {
            binaries.push(which("bpftrace")?);
        }
        binaries.extend(extra.binaries.iter().cloned());
        for src in binaries {
            let binary = src.file_name().context("a file")?.to_owned();
            fs::copy(&src, root.join("usr/bin").join(binary))
                .with_context(|| format!("copy {}", src.display()))?;
            libraries.extend(shared_libraries(&src)?);
        }
        for lib in &libraries {
            let dst = root.join(lib.strip_prefix("/").unwrap_or(lib));
            fs::create_dir_all(dst.parent().context("a library has a directory")?)?;
            fs::copy(lib, &dst).with_context(|| format!("copy {}", lib.display()))?;
        }
        let modules: &[&str] = match mode {
            Mode::Demo | Mode::Test if extra.share => SHARE_MODULES,
            Mode::Demo => NET_MODULES,
            Mode::Bench => &["virtio_blk"],
            _ => &[],
        };
        // A kernel given without modules has its drivers built in, and
        // so may a kernel with modules (`cargo xtask run` checked its BTF
        // before).
        if !modules.is_empty() && !kernel.modules.as_os_str().is_empty() {
            let packaged = module_index(&kernel.modules)?;
            let modules: Vec<&str> = modules
                .iter()
                .copied()
                .filter(|m| !MAYBE_BUILT_IN.contains(m) || packaged.contains_key(*m))
                .collect();
            let order = install_modules(&packaged, &modules, &root.join("modules"))?;
            fs::write(root.join("modules.order"), order.join("\n"))?;
        }

        let initramfs = cache_dir().join(format!("initramfs-{}-{name}.cpio.gz", kernel.name));
        pack(&root, &initramfs)?;
        Ok(Self { initramfs })
    }
}

/// A directory tree as a gzip-compressed newc cpio archive, the format the
/// kernel unpacks as its initramfs.
pub fn pack(root: &Path, initramfs: &Path) -> anyhow::Result<()> {
    let script = format!(
        "cd '{}' && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > '{}'",
        root.display(),
        initramfs.display()
    );
    run_cmd(Command::new("sh").args(["-c", &script]))
}

pub fn which(program: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("sh").args(["-c", &format!("command -v {program}")]).output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if path.is_empty() {
        bail!("{program} not found (cargo xtask setup installs it)");
    }
    Ok(PathBuf::from(path))
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The libraries `ldd` lists, so dynamically linked binaries run in the initramfs.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(PathBuf::from))
        .collect())
}

/// Every module file of a kernel's `lib/modules/<release>`, by module name.
pub fn module_index(modules_dir: &Path) -> anyhow::Result<HashMap<String, PathBuf>> {
    let mut index = HashMap::new();
    // A kernel built without modules has an empty directory.
    let mut stack: Vec<PathBuf> =
        Some(modules_dir.join("kernel")).filter(|d| d.is_dir()).into_iter().collect();
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(file) = p.file_name().map(|f| f.to_string_lossy().into_owned())
                && let Some(stem) = file.split(".ko").next()
                && file.contains(".ko")
            {
                index.insert(stem.replace('-', "_"), p);
            }
        }
    }
    Ok(index)
}

/// Decompresses `names` and their dependencies into `dest`; returns the load order.
fn install_modules(
    index: &HashMap<String, PathBuf>,
    names: &[&str],
    dest: &Path,
) -> anyhow::Result<Vec<String>> {
    let mut order = Vec::new();
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        dest: &Path,
        order: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let file = format!("{name}.ko");
        if order.contains(&file) {
            return Ok(());
        }
        let src = index.get(name).with_context(|| format!("kernel module {name} not in the package"))?;
        let tool = match src.extension().and_then(|e| e.to_str()) {
            Some("xz") => Some("xz"),
            Some("zst") => Some("zstd"),
            Some("ko") => None,
            other => bail!("unknown module compression {other:?}"),
        };
        let bytes = match tool {
            Some(tool) => {
                Command::new(tool).arg("-dc").arg(src).output().context("decompress module")?.stdout
            }
            None => fs::read(src)?,
        };
        for dep in modinfo_depends(&bytes) {
            visit(&dep, index, dest, order)?;
        }
        fs::write(dest.join(&file), &bytes)?;
        order.push(file);
        Ok(())
    }
    for name in names {
        visit(name, index, dest, &mut order)?;
    }
    Ok(order)
}

/// The `depends=` entry of a module's `.modinfo` section.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(start) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let value = &ko[start + key.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(0);
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

pub struct Boot<'a> {
    pub forward_port: Option<u16>,
    /// `--attach.mode` for mapcountd in the guest.
    pub attach_mode: &'a str,
    /// Soak mode: seconds of storm.
    pub soak_seconds: u64,
    /// Seconds before the VM is killed.
    pub timeout: Option<u64>,
    /// Copy the console to our stdout as it arrives.
    pub echo: bool,
    /// The initramfs's init, when it is not the busybox script (`rdinit=`).
    pub init: Option<&'a str>,
    pub cpus: u32,
    /// A raw virtio disk for the guest to write results to (`/dev/vda`).
    pub disk: Option<&'a Path>,
    /// One host thread for every vCPU. Multi-threaded TCG can deliver a
    /// kprobe's int3 to a vCPU after another finished patching the text,
    /// which oopses the guest (seen when attaching during a benchmark).
    pub single_threaded: bool,
    /// Guest time counted in instructions, each 2^shift ns (qemu's
    /// `-icount`, single-threaded): the same work takes the same guest time
    /// whatever else the host runs.
    pub icount_shift: Option<u8>,
    /// A host directory the guest mounts at the same path (virtiofs).
    pub share: Option<&'a Path>,
    /// Write the console to this file as it arrives.
    pub console_log: Option<&'a Path>,
    /// Set by another thread to stop the VM.
    pub stop: Option<&'a AtomicBool>,
    /// Told qemu's process ID once it runs.
    pub started: Option<mpsc::Sender<u32>>,
}

impl<'a> Boot<'a> {
    /// A test boot: 2 vCPUs, multi-threaded TCG, no network, no disk,
    /// killed after `timeout` seconds.
    pub fn new(attach_mode: &'a str, timeout: u64) -> Self {
        Self {
            forward_port: None,
            attach_mode,
            soak_seconds: 0,
            timeout: Some(timeout),
            echo: false,
            init: None,
            cpus: 2,
            disk: None,
            single_threaded: false,
            icount_shift: None,
            share: None,
            console_log: None,
            stop: None,
            started: None,
        }
    }
}

/// Boots the kernel and returns everything it wrote to the serial console.
pub fn boot(kernel: &Kernel, image: &Image, boot: Boot<'_>) -> anyhow::Result<String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        if boot.single_threaded { "tcg,thread=single" } else { "tcg" },
        "-m",
        "2048",
        "-smp",
        &boot.cpus.to_string(),
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(&image.initramfs)
    .args([
        "-append",
        &format!(
            "console=ttyS0 quiet panic=-1 oops=panic transparent_hugepage=madvise mapcount.attach={} mapcount.soak={}{}",
            boot.attach_mode,
            boot.soak_seconds,
            boot.init.map(|init| format!(" rdinit={init}")).unwrap_or_default()
        ),
    ]);
    if let Some(shift) = boot.icount_shift {
        // sleep=off: an idle guest's clock jumps to its next timer instead
        // of following the host's, so guest time is instructions only.
        cmd.args(["-icount", &format!("shift={shift},sleep=off,align=off")]);
    }
    // virtiofs: qemu hands the guest's memory to virtiofsd, so it must be
    // a shared memory object of the same size as -m.
    let _virtiofsd = match boot.share {
        Some(share) => {
            let daemon = Virtiofsd::start(share)?;
            cmd.args([
                "-object",
                "memory-backend-memfd,id=mem,size=2048M,share=on",
                "-numa",
                "node,memdev=mem",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=share,path={}", daemon.socket.display()))
            .args(["-device", "vhost-user-fs-pci,chardev=share,tag=share"]);
            Some(daemon)
        }
        None => None,
    };
    if let Some(disk) = boot.disk {
        cmd.arg("-drive").arg(format!("file={},if=virtio,format=raw", disk.display()));
    }
    match boot.forward_port {
        Some(port) => {
            cmd.args([
                "-netdev",
                &format!("user,id=net0,hostfwd=tcp::{port}-:9730"),
                "-device",
                "virtio-net-pci,netdev=net0",
            ]);
        }
        None => {
            cmd.args(["-nic", "none"]);
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe. The VM must not outlive xtask when
    // xtask is killed by something other than a terminal's Ctrl-C.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64 (cargo xtask setup installs it)")?;
    if let Some(started) = &boot.started {
        let _ = started.send(child.id());
    }
    let mut console_log = match boot.console_log {
        Some(path) => {
            Some(fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?)
        }
        None => None,
    };
    let stdout = child.stdout.take().context("qemu's console is piped")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = boot.timeout.map(|s| Instant::now() + Duration::from_secs(s));
    // The VM's progress on a terminal: its last console line.
    let title = format!("VM {} ({})", kernel.name, boot.attach_mode);
    let progress = (!boot.echo && boot.console_log.is_none()).then(|| spinner(title.clone()));
    let mut output = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if boot.echo {
                    println!("{line}");
                }
                if let Some(log) = &mut console_log {
                    let _ = writeln!(log, "{}", line.trim_end_matches('\r'));
                }
                if let Some(progress) = &progress {
                    let last: String = line.trim_end_matches('\r').chars().take(70).collect();
                    progress.set_message(format!("{title}: {last}"));
                }
                output.push_str(line.trim_end_matches('\r'));
                output.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if boot.stop.is_some_and(|stop| stop.load(Ordering::Relaxed)) {
            let _ = child.kill();
            break;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            let _ = child.kill();
            output.push_str("MAPCOUNT-TIMEOUT the VM did not finish in time\n");
            break;
        }
    }
    let _ = child.wait();
    let _ = reader.join();
    if let Some(progress) = progress {
        progress.finish_and_clear();
    }
    Ok(output)
}

/// virtiofsd serving a host directory to one VM; stopped when dropped.
struct Virtiofsd {
    child: std::process::Child,
    socket: PathBuf,
}

impl Virtiofsd {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        // The Rust virtiofsd (its own package from Debian 13), or the C one
        // qemu 7 ships.
        let (program, rust) = [("/usr/libexec/virtiofsd", true), ("/usr/lib/qemu/virtiofsd", false)]
            .into_iter()
            .find(|(path, _)| Path::new(path).exists())
            .context(
                "no virtiofsd (Debian's qemu-system-common up to 12, virtiofsd from 13) to share a directory",
            )?;
        let socket = cache_dir().join(format!("virtiofsd-{}.sock", std::process::id()));
        let _ = fs::remove_file(&socket);
        let mut cmd = Command::new(program);
        cmd.arg(format!("--socket-path={}", socket.display()));
        if rust {
            cmd.arg(format!("--shared-dir={}", dir.display())).args(["--cache=auto", "--sandbox=none"]);
        } else {
            cmd.arg("-o").arg(format!("source={}", dir.display())).args([
                "-o",
                "cache=auto",
                "-o",
                "sandbox=chroot",
            ]);
        }
        let log = fs::File::create(cache_dir().join("virtiofsd.log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let mut daemon = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon.socket.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("{program} ended ({status}); see {}", cache_dir().join("virtiofsd.log").display());
            }
            if Instant::now() > deadline {
                bail!("{program} did not create {} in 10 s", daemon.socket.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.socket);
    }
}

/// Whether a line holds something shaped like a kernel address: 16 hex
/// digits starting with `ffff`, or the same number in decimal (20 digits
/// from 18446462598732840960).
pub fn has_kernel_address(line: &str) -> bool {
    let words = line.split(|c: char| !c.is_ascii_alphanumeric());
    words.into_iter().any(|w| {
        let w = w.trim_start_matches("0x");
        (w.len() == 16 && w.starts_with("ffff") && w.chars().all(|c| c.is_ascii_hexdigit()))
            || (w.len() == 20 && w.chars().all(|c| c.is_ascii_digit()) && w >= "18446462598732840960")
    })
}

/// `MAPCOUNT-CHECK name known=K reported=R accepted=A..=B PASS|FAIL` lines, plus
/// the daemon's exit status after SIGTERM, the shutdown figures, and a scan
/// of everything the daemon exported or logged for kernel addresses.
pub fn parse_checks(console: &str) -> Vec<CheckResult> {
    let mut results = Vec::new();
    let daemon_output: Vec<&str> =
        console.lines().filter(|l| l.starts_with("mapcountd: ") || l.starts_with("metrics: ")).collect();
    let leaks: Vec<&&str> = daemon_output.iter().filter(|l| has_kernel_address(l)).collect();
    for leak in leaks.iter().take(3) {
        println!("  kernel address in daemon output: {leak}");
    }
    results.push(CheckResult {
        name: "leak/kernel_addresses".to_owned(),
        known: "0".to_owned(),
        reported: format!("{} of {} lines", leaks.len(), daemon_output.len()),
        accepted: "0".to_owned(),
        passed: leaks.is_empty() && !daemon_output.is_empty(),
    });
    // The daemon goes on without a program the verifier refused (a warning
    // names it): its probe's events and metrics would be missing.
    let refused = daemon_output.iter().filter(|l| l.contains("BPF_PROG_LOAD syscall returned")).count();
    results.push(CheckResult {
        name: "verifier/programs_refused".to_owned(),
        known: "0".to_owned(),
        reported: refused.to_string(),
        accepted: "0".to_owned(),
        passed: refused == 0,
    });
    results.push(Accounting::parse(console).check("events/balanced_per_cpu"));
    for line in console.lines() {
        if let Some(rest) = line.strip_prefix("MAPCOUNT-CHECK ") {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or("?").to_owned();
            let field = |key: &str| {
                rest.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or("-").to_owned()
            };
            let known = field("known=");
            let reported = field("reported=");
            let accepted = field("accepted=");
            results.push(CheckResult { name, known, reported, accepted, passed: rest.ends_with(" PASS") });
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-SHUTDOWN ") {
            let field = |key: &str| -> Option<u64> {
                rest.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
            };
            let mut check = |name: &str, reported: Option<u64>, ok: fn(u64) -> bool, accepted: &str| {
                results.push(CheckResult {
                    name: name.to_owned(),
                    known: accepted.to_owned(),
                    reported: reported.map_or("-".to_owned(), |v| v.to_string()),
                    accepted: accepted.to_owned(),
                    passed: reported.is_some_and(ok),
                });
            };
            check("shutdown/programs_while_running", field("progs_before="), |v| v > 0, ">0");
            check("shutdown/programs_left", field("progs_after="), |v| v == 0, "0");
            check("shutdown/links_left", field("links_after="), |v| v == 0, "0");
            // The time to exit is reported, not judged: detaching waits for
            // RCU grace periods, which TCG stretches 10-50 times.
            println!("  (shutdown took {} centiseconds under TCG)", field("centiseconds=").unwrap_or(0));
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-SIGINT ") {
            let field = |key: &str| {
                rest.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or("-").to_owned()
            };
            let ok = field("exit=") == "0" && field("progs_after=") == "0" && field("links_after=") == "0";
            results.push(CheckResult {
                name: "shutdown/sigint_clean".to_owned(),
                known: "exit 0, 0 left".to_owned(),
                reported: format!(
                    "exit {}, {} progs, {} links",
                    field("exit="),
                    field("progs_after="),
                    field("links_after=")
                ),
                accepted: "-".to_owned(),
                passed: ok,
            });
        } else if let Some(code) = line.strip_prefix("MAPCOUNT-DAEMON-EXIT ") {
            results.push(CheckResult {
                name: "daemon/exit_after_sigterm".to_owned(),
                known: "0".to_owned(),
                reported: code.trim().to_owned(),
                accepted: "0".to_owned(),
                passed: code.trim() == "0",
            });
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::has_kernel_address;

    #[test]
    fn spots_kernel_addresses() {
        assert!(has_kernel_address("folio=ffff888012345678 mapped"));
        assert!(has_kernel_address("x 0xffffea0000400000"));
        assert!(has_kernel_address("value 18446612682059825152"));
        assert!(!has_kernel_address("mapcount_rmap_pages_total{kind=\"anon\"} 1000"));
        assert!(!has_kernel_address("refcount 512512 ratio 0.000239"));
        assert!(!has_kernel_address("timestamp 1732760000123456789"));
    }
}

/// The daemon's per-CPU event accounting at exit (after detaching and
/// draining): produced = received + lost on every CPU.
#[derive(Debug, Default)]
pub struct Accounting {
    pub cpus: usize,
    pub unbalanced: usize,
    pub produced: u64,
    pub received: u64,
    pub lost: u64,
}

impl Accounting {
    pub fn parse(console: &str) -> Self {
        let mut a = Self::default();
        for line in console.lines().filter(|l| l.starts_with("mapcountd: ") && l.contains("event accounting"))
        {
            let field =
                |key: &str| -> Option<&str> { line.split_whitespace().find_map(|w| w.strip_prefix(key)) };
            let number = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            a.cpus += 1;
            a.produced += number("produced=");
            a.received += number("received=");
            a.lost += number("lost=");
            if field("balanced=") != Some("true") {
                a.unbalanced += 1;
            }
        }
        a
    }

    pub fn check(&self, name: &str) -> CheckResult {
        CheckResult {
            name: name.to_owned(),
            known: "produced = received + lost".to_owned(),
            reported: format!(
                "{} = {} + {} on {} CPUs, {} unbalanced",
                self.produced, self.received, self.lost, self.cpus, self.unbalanced
            ),
            accepted: "every CPU".to_owned(),
            passed: self.cpus > 0 && self.unbalanced == 0,
        }
    }
}

/// One `MAPCOUNT-SOAK` sample.
#[derive(Debug)]
pub struct SoakSample {
    pub seconds: u64,
    pub rss_kb: u64,
    pub scrape_ok: bool,
    pub events: u64,
    pub lost: u64,
    pub entries: u64,
}

pub fn parse_soak(console: &str) -> Vec<SoakSample> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("MAPCOUNT-SOAK "))
        .map(|rest| {
            let field = |key: &str| -> u64 {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            SoakSample {
                seconds: field("t="),
                rss_kb: field("rss_kb="),
                scrape_ok: field("scrape_ok=") == 1,
                events: field("events="),
                lost: field("lost="),
                entries: field("entries="),
            }
        })
        .collect()
}
