//! Booting a stock kernel in qemu (TCG) with an initramfs of busybox,
//! mapcountd and the workload.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cache_dir, kernels::Kernel, run_cmd};

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
const BENCH: &str = r#"
ready() {
    for i in $(seq 1 600); do
        wget -q -O /dev/null http://127.0.0.1:9730/-/ready 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
alive() { [ -e /proc/$1 ] && ! grep -q '^State:.*Z' /proc/$1/status 2>/dev/null; }
# Signal $1 with $2 and give it 30 s to exit, then kill it (and say so).
finish() {
    kill -$2 $1
    for i in $(seq 1 300); do alive $1 || break; sleep 0.1; done
    if alive $1; then echo "MAPCOUNT-BENCH-KILLED $1 did not exit after SIG$2"; kill -KILL $1; fi
    wait $1 2>/dev/null
}
stop() { finish $1 TERM; }
# Start-up: exec to /-/ready, five times.
for i in 1 2 3 4 5; do
    line=$(mapcount-workload time-ready -- mapcountd --log.level=warn)
    echo "$line"
    pid=$(echo "$line" | sed -n 's/.*pid=\([0-9]*\).*/\1/p')
    # Not our child (its parent exited): it ends as a zombie of init.
    finish $pid TERM
done
# The scenarios' own event stream, for the host's ingest benchmark: recorded
# here, written raw to the virtio disk the host reads back.
mapcountd --record /tmp/events.rec --ringbuf.size=67108864 --log.level=warn >/tmp/record.log 2>&1 &
d=$!
ready
mapcount-workload check --metrics 127.0.0.1:9730/metrics --file-dir /mnt/ramfs >/dev/null
stop $d
if [ -b /dev/vda ]; then
    dd if=/tmp/events.rec of=/dev/vda bs=1M 2>/dev/null && sync
    echo "MAPCOUNT-RECORD bytes=$(stat -c %s /tmp/events.rec)"
fi
rm -f /tmp/events.rec
# The functions mapcountd attaches, for bpftrace to probe the same ones.
mapcountd --attach.mode=fentry >/tmp/attach.log 2>&1 &
d=$!
ready
stop $d
probes=$(sed -n 's/.*attached probe="\([a-z_]*\)" function="\([a-z_.0-9]*\)".*/\1 \2/p' /tmp/attach.log |
    while read probe function; do
        case $probe in *_return) echo "kretprobe:$function" ;; *) echo "kprobe:$function" ;; esac
    done | sort -u | tr '\n' ',' | sed 's/,$//')
echo "MAPCOUNT-BENCH-PROBES $probes"
tracer() {
    case $1 in
        none) ;;
        mapcountd-fentry|mapcountd-kprobe)
            # Paused while a loop runs: 64 MiB hold every record meanwhile.
            mapcountd --attach.mode=${1#mapcountd-} --ringbuf.size=67108864 --log.level=warn >/tmp/tracer.log 2>&1 &
            tracer_pid=$!; pause="--pause $tracer_pid"; ready ;;
        mapcountd-fentry-running)
            mapcountd --attach.mode=fentry --log.level=warn >/tmp/tracer.log 2>&1 &
            tracer_pid=$!; ready ;;
        mapcountd-fentry-every-record)
            mapcountd --attach.mode=fentry --ringbuf.wakeup=every-record --log.level=warn >/tmp/tracer.log 2>&1 &
            tracer_pid=$!; ready ;;
        bpftrace-empty|bpftrace-count)
            if [ $1 = bpftrace-empty ]; then action='{ }'; else action='{ @calls[probe] = count(); }'; fi
            bpftrace -e "$probes $action" >/tmp/tracer.log 2>&1 &
            tracer_pid=$!
            for i in $(seq 1 600); do grep -q Attaching /tmp/tracer.log && break; sleep 0.1; done
            sleep 1 ;;
    esac
}
# Kernel-side cost: the same loops under each tracer, five rounds.
for round in 1 2 3 4 5; do
    for t in none mapcountd-fentry mapcountd-kprobe mapcountd-fentry-running mapcountd-fentry-every-record bpftrace-empty bpftrace-count; do
        tracer_pid=""
        pause=""
        tracer $t
        mapcount-workload cost --metrics 127.0.0.1:9730/metrics $pause | sed "s/^MAPCOUNT-COST /MAPCOUNT-COST tracer=$t round=$round /"
        if [ -n "$tracer_pid" ]; then
            finish $tracer_pid INT
            grep -q ERROR /tmp/tracer.log && sed "s/^/tracer $t: /" /tmp/tracer.log | head -5
        fi
    done
done
# Lossless rate: a fresh daemon per rate, per-CPU accounting at its exit;
# with the default ring buffer, then with a 64 KiB one that overflows.
for ring in 8388608 65536; do
    for rate in 10000 20000 40000 80000 160000 320000; do
        mapcountd --ringbuf.size=$ring --log.level=info >/tmp/rate.log 2>&1 &
        d=$!
        ready
        mapcount-workload rate --events-per-second $rate --seconds 10 | sed "s/^/MAPCOUNT-RATE ring=$ring target=$rate /"
        stop $d
        grep 'event accounting' /tmp/rate.log | sed "s/^/MAPCOUNT-RATE ring=$ring target=$rate /"
    done
done
echo "MAPCOUNT-BENCH-DONE"
poweroff -f
"#;

pub struct Image {
    pub initramfs: PathBuf,
}

/// Network drivers the demo VM needs to reach the host (with their dependencies).
const NET_MODULES: &[&str] = &["virtio_net"];

const PREAMBLE: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tmpfs tmpfs /tmp
# ramfs: page-cache folios that are not swap-backed, i.e. kind "file".
mkdir -p /mnt/ramfs && mount -t ramfs ramfs /mnt/ramfs
ip link set lo up
for m in $(cat /modules.order 2>/dev/null); do insmod /modules/$m; done
if ip link show eth0 >/dev/null 2>&1; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
fi
echo "MAPCOUNT-KERNEL $(uname -r)"
"#;

const INIT: &str = r#"attach=$(sed -n 's/.*mapcount\.attach=\([a-z]*\).*/\1/p' /proc/cmdline)
[ -n "$attach" ] || attach=auto
extra=""
# 64 MiB of ring buffer: the refcount scenario makes a million rmap calls
# in seconds on 6.1, which has no batched rmap functions.
[ "$MODE" = test ] && extra="--record /tmp/events.rec --metrics.dump-on-exit /tmp/final.prom --ringbuf.size=67108864"
[ "$MODE" = selftests ] && extra="--ringbuf.size=67108864"
# Overload: a ring buffer the storm overflows, a folio table it fills.
[ "$MODE" = soak ] && extra="--ringbuf.size=65536 --folio-table.size=20000"
mapcountd --web.listen-address=0.0.0.0:9730 --attach.mode=$attach --log.level=info,mapcount_daemon::aggregate=debug,mapcount_daemon::folios=debug $extra >/tmp/mapcountd.log 2>&1 &
daemon=$!
ready=0
for i in $(seq 1 300); do
    if wget -q -O /dev/null http://127.0.0.1:9730/-/ready 2>/dev/null; then ready=1; break; fi
    sleep 0.2
done
echo "MAPCOUNT-DAEMON-READY $ready"
if [ "$MODE" = test ]; then
    if [ -x /usr/bin/prometheus ]; then
        # The operator's view: Prometheus scrapes the daemon throughout.
        prometheus --config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/tmp/prometheus \
            --web.listen-address=127.0.0.1:9090 >/tmp/prometheus.log 2>&1 &
        prom=$!
        for i in $(seq 1 300); do
            wget -q -O /dev/null http://127.0.0.1:9090/-/ready 2>/dev/null && break
            sleep 0.2
        done
        # Scraped, and the rules evaluated on that data, before the scenarios.
        for i in $(seq 1 60); do
            ratio=$(wget -q -O - 'http://127.0.0.1:9090/api/v1/query?query=mapcount_refcount_headroom_ratio')
            case "$ratio" in *'"result":[{'*) break ;; esac
            sleep 1
        done
        sleep 3
        echo "MAPCOUNT-PROM-RATIO-BEFORE $ratio"
        echo "MAPCOUNT-PROM-ALERTS-BEFORE $(wget -q -O - http://127.0.0.1:9090/api/v1/alerts)"
    fi
    mapcount-workload check --metrics 127.0.0.1:9730/metrics --file-dir /mnt/ramfs --expect-mode $attach
    echo "MAPCOUNT-WORKLOAD-EXIT $?"
    if [ -x /usr/bin/prometheus ]; then
        for i in $(seq 1 30); do
            alerts=$(wget -q -O - http://127.0.0.1:9090/api/v1/alerts)
            case "$alerts" in *firing*) break ;; esac
            sleep 1
        done
        echo "MAPCOUNT-PROM-ALERTS-AFTER $alerts"
        while read -r index query; do
            echo "MAPCOUNT-PROMQL $index $(wget -q -O - "http://127.0.0.1:9090/api/v1/query?query=$query")"
        done </etc/prometheus/queries.txt
        kill $prom
        wait $prom
        sed 's/^/prometheus: /' /tmp/prometheus.log | grep -v ' level=info ' | head -20
    fi
    # Clean shutdown: every program and link gone, within a second.
    progs=$(bpftool prog show | grep -c '^[0-9]*:')
    links=$(bpftool link show | grep -c '^[0-9]*:')
    start=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    kill -TERM $daemon
    wait $daemon
    echo "MAPCOUNT-DAEMON-EXIT $?"
    end=$(cut -d' ' -f1 /proc/uptime | tr -d .)
    echo "MAPCOUNT-SHUTDOWN progs_before=$progs links_before=$links progs_after=$(bpftool prog show | grep -c '^[0-9]*:') links_after=$(bpftool link show | grep -c '^[0-9]*:') centiseconds=$((end - start))"
    mapcountd replay /tmp/events.rec >/tmp/replay.prom 2>/tmp/replay.log
    cat /tmp/replay.log
    mapcount-workload compare /tmp/final.prom /tmp/replay.prom
    # SIGINT takes the same way out as SIGTERM.
    mapcountd --web.listen-address=127.0.0.1:9731 --attach.mode=$attach >/tmp/mapcountd-int.log 2>&1 &
    second=$!
    for i in $(seq 1 300); do
        wget -q -O /dev/null http://127.0.0.1:9731/-/ready 2>/dev/null && break
        sleep 0.2
    done
    kill -INT $second
    wait $second
    echo "MAPCOUNT-SIGINT exit=$? progs_after=$(bpftool prog show | grep -c '^[0-9]*:') links_after=$(bpftool link show | grep -c '^[0-9]*:')"
    sed 's/^/metrics: /' /tmp/final.prom
    sed 's/^/mapcountd: /' /tmp/mapcountd.log
elif [ "$MODE" = selftests ]; then
    # map_hugetlb and hugepage-mmap map 256 MiB of huge pages.
    echo 160 > /proc/sys/vm/nr_hugepages
    # THP for every size the kernel offers, as a test host would run.
    echo always > /sys/kernel/mm/transparent_hugepage/enabled
    metric() {
        wget -q -O - http://127.0.0.1:9730/metrics | grep "^$1" | awk '{s+=$2} END {printf "%d", s}'
    }
    # Until the daemon has taken every record the kernel had produced when
    # asked (the asking itself keeps producing records).
    settle() {
        produced=$(metric mapcount_events_produced_total)
        for i in $(seq 1 100); do
            sleep 0.2
            taken=$(( $(metric mapcount_events_total) + $(metric mapcount_events_lost_total) ))
            [ $taken -ge $produced ] && break
        done
    }
    # The kernel's counters against the table's: the difference is what
    # processes older than mapcountd map, and must not move.
    drift() {
        wget -q -O /tmp/drift.prom http://127.0.0.1:9730/metrics
        for c in nr_anon_pages nr_mapped nr_anon_transparent_hugepages nr_shmem_pmdmapped nr_file_pmdmapped; do
            k=$(grep "^mapcount_kernel_vmstat{counter=\"$c\"}" /tmp/drift.prom | awk '{printf "%d", $2}')
            t=$(grep "^mapcount_table_vmstat{counter=\"$c\"}" /tmp/drift.prom | awk '{printf "%d", $2}')
            echo "MAPCOUNT-DRIFT phase=$1 counter=$c kernel=$k table=$t"
        done
    }
    settle
    drift begin
    echo "MAPCOUNT-SELFTEST-BEGIN anon_folios=$(metric 'mapcount_folios{kind="anon"')"
    for t in $SELFTESTS; do
        settle
        d0=$(metric mapcount_mapcount_disagreements_total)
        p0=$(metric mapcount_phantom_mappings_total)
        start=$(cut -d. -f1 /proc/uptime)
        (cd /selftests && timeout $SELFTEST_TIMEOUT ./$t >/tmp/selftest.log 2>&1)
        rc=$?
        end=$(cut -d. -f1 /proc/uptime)
        settle
        d1=$(metric mapcount_mapcount_disagreements_total)
        p1=$(metric mapcount_phantom_mappings_total)
        alive=0; kill -0 $daemon 2>/dev/null && alive=1
        echo "MAPCOUNT-SELFTEST test=$t exit=$rc ok=$(grep -c '^ok ' /tmp/selftest.log) not_ok=$(grep -c '^not ok ' /tmp/selftest.log) skip=$(grep -c 'SKIP' /tmp/selftest.log) disagreements=$((d1 - d0)) phantoms=$((p1 - p0)) seconds=$((end - start)) daemon_alive=$alive"
        grep '^not ok ' /tmp/selftest.log | head -20 | sed "s/^/selftest $t: /"
        tail -n 4 /tmp/selftest.log | sed "s/^/selftest $t (last lines): /"
    done
    echo "MAPCOUNT-SELFTEST-END anon_folios=$(metric 'mapcount_folios{kind="anon"')"
    # A real application: Redis forks a child for BGSAVE while a client
    # overwrites keys (mapcount-workload redis, which forks nothing: the
    # shell waits). Redis reports the child's copy-on-write size (its smaps
    # Private_Dirty); mapcount counts the copies made meanwhile.
    echo never > /sys/kernel/mm/transparent_hugepage/enabled
    echo 0 > /proc/sys/vm/nr_hugepages
    mkdir -p /tmp/redis
    # A delay per key keeps the child alive while the client writes.
    redis-server --port 6379 --dir /tmp/redis --save '' --appendonly no --rdbcompression no \
        --rdb-key-save-delay 20 --enable-debug-command yes \
        --logfile /tmp/redis.log >/dev/null 2>&1 &
    redis=$!
    for i in $(seq 1 150); do redis-cli ping 2>/dev/null | grep -q PONG && break; sleep 0.2; done
    mapcount-workload redis --metrics 127.0.0.1:9730/metrics --log /tmp/redis.log --keys 200000
    grep -iE 'copy-on-write|CoW|Background saving' /tmp/redis.log | sed 's/^/redis: /'
    redis-cli SHUTDOWN NOSAVE >/dev/null 2>&1
    wait $redis 2>/dev/null
    settle
    drift end
    grep 'disagree' /tmp/mapcountd.log | head -20 | sed 's/^/mapcountd: /'
    grep 'left at teardown' /tmp/mapcountd.log | head -20 | sed 's/^/mapcountd: /'
    wget -q -O - http://127.0.0.1:9730/metrics | sed 's/^/metrics: /'
    kill -TERM $daemon
    wait $daemon
    echo "MAPCOUNT-DAEMON-EXIT $?"
    grep -E 'event accounting|events lost' /tmp/mapcountd.log | sed 's/^/mapcountd: /'
elif [ "$MODE" = soak ]; then
    seconds=$(sed -n 's/.*mapcount\.soak=\([0-9]*\).*/\1/p' /proc/cmdline)
    mapcount-workload storm --seconds $seconds &
    storm=$!
    start=$(cut -d. -f1 /proc/uptime)
    while kill -0 $storm 2>/dev/null; do
        sleep 10
        now=$(cut -d. -f1 /proc/uptime)
        rss=$(awk '/^VmRSS/ {print $2}' /proc/$daemon/status)
        wget -q -O /tmp/scrape http://127.0.0.1:9730/metrics
        ok=$?
        lost=$(grep '^mapcount_events_lost_total' /tmp/scrape | awk '{s+=$2} END {print s+0}')
        events=$(grep '^mapcount_events_total' /tmp/scrape | awk '{s+=$2} END {print s+0}')
        entries=$(grep '^mapcount_folio_table_entries' /tmp/scrape | awk '{print $2}')
        echo "MAPCOUNT-SOAK t=$((now - start)) rss_kb=$rss scrape_ok=$((ok == 0)) events=$events lost=$lost entries=$entries"
    done
    kill -TERM $daemon
    wait $daemon
    echo "MAPCOUNT-DAEMON-EXIT $?"
    grep -E 'event accounting|events lost' /tmp/mapcountd.log | sed 's/^/mapcountd: /'
else
    tail -f /tmp/mapcountd.log &
    mapcount-workload demo --metrics 127.0.0.1:9730/metrics --file-dir /mnt/ramfs &
    wait $daemon
fi
poweroff -f
"#;

impl Image {
    /// `prometheus`: Debian's Prometheus binary, to run in a test VM with
    /// the shipped rules and the dashboard's queries.
    pub fn build(
        bin_dir: &Path,
        kernel: &Kernel,
        mode: Mode,
        prometheus: Option<&Path>,
    ) -> anyhow::Result<Self> {
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
        let script = if mode == Mode::Bench { BENCH.to_owned() } else { INIT.replace("$MODE", name) };
        fs::write(root.join("init"), format!("{PREAMBLE}{script}"))?;
        set_executable(&root.join("init"))?;

        let mut libraries = BTreeSet::new();
        let bpftool = which("bpftool")?;
        let mut binaries = vec![bin_dir.join("mapcountd"), bin_dir.join("mapcount-workload"), bpftool];
        if mode == Mode::Bench {
            binaries.push(which("bpftrace")?);
        }
        if mode == Mode::Selftests {
            for program in ["redis-server", "redis-cli"] {
                binaries.push(which(program)?);
            }
        }
        if mode == Mode::Selftests {
            let tests = crate::selftests::build()?;
            fs::create_dir_all(root.join("selftests"))?;
            for test in crate::selftests::TESTS {
                fs::copy(tests.join(test), root.join("selftests").join(test))?;
                set_executable(&root.join("selftests").join(test))?;
            }
            // MAPCOUNT_SELFTESTS=cow,mremap_test runs only those.
            let list = std::env::var("MAPCOUNT_SELFTESTS")
                .map(|only| only.replace(',', " "))
                .unwrap_or_else(|_| crate::selftests::TESTS.join(" "));
            let script = format!("{PREAMBLE}{}", INIT.replace("$MODE", name))
                .replace("$SELFTESTS", &list)
                .replace("$SELFTEST_TIMEOUT", &crate::selftests::TEST_TIMEOUT.to_string());
            fs::write(root.join("init"), script)?;
        }
        if let Some(prometheus) = prometheus {
            crate::prometheus::stage(&root)?;
            binaries.push(prometheus.to_path_buf());
        }
        for src in binaries {
            let binary = src.file_name().expect("a file").to_owned();
            fs::copy(&src, root.join("usr/bin").join(binary))
                .with_context(|| format!("copy {}", src.display()))?;
            libraries.extend(shared_libraries(&src)?);
        }
        for lib in &libraries {
            let dst = root.join(lib.strip_prefix("/").unwrap_or(lib));
            fs::create_dir_all(dst.parent().expect("a library has a directory"))?;
            fs::copy(lib, &dst).with_context(|| format!("copy {}", lib.display()))?;
        }
        let modules: &[&str] = match mode {
            Mode::Demo => NET_MODULES,
            Mode::Bench => &["virtio_blk"],
            _ => &[],
        };
        if !modules.is_empty() {
            let order = install_modules(&kernel.modules, modules, &root.join("modules"))?;
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

fn which(program: &str) -> anyhow::Result<PathBuf> {
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

/// Decompresses `names` and their dependencies into `dest`; returns the load order.
fn install_modules(modules_dir: &Path, names: &[&str], dest: &Path) -> anyhow::Result<Vec<String>> {
    let mut index = std::collections::HashMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
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
    let mut order = Vec::new();
    fn visit(
        name: &str,
        index: &std::collections::HashMap<String, PathBuf>,
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
        visit(name, &index, dest, &mut order)?;
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
            "console=ttyS0 quiet panic=-1 transparent_hugepage=madvise mapcount.attach={} mapcount.soak={}{}",
            boot.attach_mode,
            boot.soak_seconds,
            boot.init.map(|init| format!(" rdinit={init}")).unwrap_or_default()
        ),
    ]);
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
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = boot.timeout.map(|s| Instant::now() + Duration::from_secs(s));
    let mut output = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if boot.echo {
                    println!("{line}");
                }
                output.push_str(line.trim_end_matches('\r'));
                output.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            let _ = child.kill();
            output.push_str("MAPCOUNT-TIMEOUT the VM did not finish in time\n");
            break;
        }
    }
    let _ = child.wait();
    let _ = reader.join();
    Ok(output)
}

pub struct CheckResult {
    pub name: String,
    pub known: String,
    pub reported: String,
    pub accepted: String,
    pub passed: bool,
}

impl CheckResult {
    pub fn failed(name: &str, why: &str) -> Self {
        Self {
            name: name.to_owned(),
            known: "-".to_owned(),
            reported: why.to_owned(),
            accepted: "-".to_owned(),
            passed: false,
        }
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
