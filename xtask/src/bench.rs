//! The kernel-side figures of `cargo xtask bench`, read from one boot's
//! console: start-up, loop timings under each tracer, lossless rates.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    kernels, vm,
    workspace::{build_binaries, cache_dir, ingest_bench, workspace_root},
};

/// `key=value` of a console line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn number(line: &str, key: &str) -> Option<f64> {
    field(line, key)?.parse().ok()
}

pub const TRACERS: &[&str] = &[
    "none",
    "mapcountd-fentry",
    "mapcountd-kprobe",
    "mapcountd-fentry-sampled",
    "mapcountd-fentry-running",
    "mapcountd-fentry-every-record",
    "bpftrace-fentry-empty",
    "bpftrace-fentry-count",
    "bpftrace-kprobe-empty",
    "bpftrace-kprobe-count",
];

/// Like with like: each mapcountd attach mode against bpftrace's programs
/// of the same kind on the same functions, (empty, counting).
pub fn bpftrace_counterparts(tracer: &str) -> (&'static str, &'static str) {
    if tracer.contains("kprobe") {
        ("bpftrace-kprobe-empty", "bpftrace-kprobe-count")
    } else {
        ("bpftrace-fentry-empty", "bpftrace-fentry-count")
    }
}
pub const LOOPS: &[&str] = &["faults", "fork_cow", "thp"];

pub struct VmFigures {
    /// exec to /-/ready, milliseconds, in boot order.
    pub startup_ms: Vec<f64>,
    /// (tracer, loop) -> loop times over the rounds, nanoseconds.
    pub loop_ns: BTreeMap<(String, String), Vec<f64>>,
    /// loop -> records mapcountd produced during it (fentry runs, smallest).
    pub loop_events: BTreeMap<String, f64>,
    pub rates: Vec<RateStep>,
    pub probes: String,
    pub tracer_errors: Vec<String>,
    /// The `MAPCOUNT-FORK-BIG` line's fields: a 1 GiB process's fork.
    pub fork_big: Option<String>,
    /// (tracer, program name as bpftool shows it) -> (run time ns, calls):
    /// the kernel's BPF statistics over one run of the loops.
    pub programs: BTreeMap<(String, String), (f64, f64)>,
}

pub struct RateStep {
    pub ring: u64,
    pub target: u64,
    pub seconds: f64,
    pub produced: u64,
    pub received: u64,
    pub lost: u64,
    pub cpus: usize,
    pub unbalanced: usize,
}

impl RateStep {
    pub fn achieved(&self) -> f64 {
        self.received as f64 / self.seconds
    }
}

pub fn parse(console: &str) -> VmFigures {
    let mut f = VmFigures {
        startup_ms: Vec::new(),
        loop_ns: BTreeMap::new(),
        loop_events: BTreeMap::new(),
        rates: Vec::new(),
        probes: String::new(),
        tracer_errors: Vec::new(),
        fork_big: None,
        programs: BTreeMap::new(),
    };
    let mut rates: BTreeMap<(std::cmp::Reverse<u64>, u64), RateStep> = BTreeMap::new();
    for line in console.lines() {
        if let Some(rest) = line.strip_prefix("MAPCOUNT-READY ") {
            if let Some(ms) = number(rest, "ms") {
                f.startup_ms.push(ms);
            }
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-FORK-BIG ") {
            f.fork_big = Some(rest.to_owned());
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-PROG ") {
            if let (Some(tracer), Some(name), Some(ns), Some(calls)) =
                (field(rest, "tracer"), field(rest, "name"), number(rest, "ns"), number(rest, "calls"))
            {
                // Names are cut at 15 characters: bpftrace's can repeat.
                let entry = f.programs.entry((tracer.to_owned(), name.to_owned())).or_default();
                *entry = (entry.0 + ns, entry.1 + calls);
            }
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-BENCH-PROBES ") {
            f.probes = rest.to_owned();
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-COST ") {
            let (Some(tracer), Some(name), Some(ns)) =
                (field(rest, "tracer"), field(rest, "loop"), number(rest, "ns"))
            else {
                continue;
            };
            f.loop_ns.entry((tracer.to_owned(), name.to_owned())).or_default().push(ns);
            if tracer == "mapcountd-fentry"
                && let Some(events) = number(rest, "events")
            {
                let e = f.loop_events.entry(name.to_owned()).or_insert(f64::INFINITY);
                *e = e.min(events);
            }
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-RATE ") {
            let Some(target) = number(rest, "target").map(|t| t as u64) else { continue };
            let ring = number(rest, "ring").map_or(0, |r| r as u64);
            let step = rates.entry((std::cmp::Reverse(ring), target)).or_insert(RateStep {
                ring,
                target,
                seconds: 10.0,
                produced: 0,
                received: 0,
                lost: 0,
                cpus: 0,
                unbalanced: 0,
            });
            if rest.contains("event accounting") {
                step.cpus += 1;
                step.produced += number(rest, "produced").unwrap_or(0.0) as u64;
                step.received += number(rest, "received").unwrap_or(0.0) as u64;
                step.lost += number(rest, "lost").unwrap_or(0.0) as u64;
                if field(rest, "balanced") != Some("true") {
                    step.unbalanced += 1;
                }
            }
        } else if line.starts_with("tracer ") || line.starts_with("MAPCOUNT-BENCH-KILLED ") {
            f.tracer_errors.push(line.to_owned());
        }
    }
    f.rates = rates.into_values().collect();
    f
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl VmFigures {
    fn best(&self, tracer: &str, name: &str) -> f64 {
        self.loop_ns.get(&(tracer.to_owned(), name.to_owned())).map_or(f64::NAN, |v| min(v))
    }

    /// Extra nanoseconds per traced call: (traced - untraced) / calls.
    pub fn cost_per_event(&self, tracer: &str, name: &str) -> f64 {
        let events = self.loop_events.get(name).copied().unwrap_or(f64::NAN);
        (self.best(tracer, name) - self.best("none", name)) / events
    }

    /// Markdown for BENCHMARKS.md.
    pub fn report(&self) -> String {
        let mut out = String::new();
        out.push_str("| loop | records | none | mapcountd fentry | mapcountd kprobe | mapcountd fentry, one small folio in 2^20 | mapcountd fentry, daemon running | same, a wake-up per record | empty fentry program | bpftrace counting (fentry) | empty kprobe program | bpftrace counting (kprobe) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for name in LOOPS {
            let none = self.best("none", name);
            let cell = |tracer: &str| {
                let t = self.best(tracer, name);
                if tracer == "none" {
                    format!("{:.1} ms", t / 1e6)
                } else {
                    format!(
                        "{:.1} ms (x{:.3}; {:+.0} ns/record)",
                        t / 1e6,
                        t / none,
                        self.cost_per_event(tracer, name)
                    )
                }
            };
            out.push_str(&format!(
                "| {name} | {:.0} | {} |\n",
                self.loop_events.get(*name).copied().unwrap_or(f64::NAN),
                TRACERS.iter().map(|t| cell(t)).collect::<Vec<_>>().join(" | ")
            ));
        }
        let spreads: Vec<String> =
            LOOPS.iter().map(|name| format!("{name} x{:.2}", self.untraced_spread(name))).collect();
        out.push_str(&format!(
            "\nThe untraced loop's slowest run against its fastest, in this boot: {}. Differences between\n\
             tracers smaller than that are noise.\n",
            spreads.join(", ")
        ));
        out
    }

    /// Per loop: a tracer's cost per record as a multiple of an empty
    /// program's of the same attach kind; NaN where the empty program's
    /// cost is within the untraced loop's own spread (a multiple of noise).
    pub fn multiples_of_empty(&self, tracer: &str) -> Vec<(String, f64)> {
        let (empty, _) = bpftrace_counterparts(tracer);
        LOOPS
            .iter()
            .map(|name| {
                let multiple =
                    if self.best(empty, name) <= self.best("none", name) * self.untraced_spread(name) {
                        f64::NAN
                    } else {
                        self.cost_per_event(tracer, name) / self.cost_per_event(empty, name)
                    };
                (name.to_string(), multiple)
            })
            .collect()
    }

    /// The untraced loop's slowest run over its fastest.
    fn untraced_spread(&self, name: &str) -> f64 {
        let rounds = self.loop_ns.get(&("none".to_owned(), name.to_owned()));
        rounds.map_or(f64::NAN, |v| v.iter().copied().fold(0.0, f64::max)) / self.best("none", name)
    }

    /// Whether a mapcountd mode slows every loop no more than bpftrace
    /// counting with programs of the same kind does.
    pub fn no_slower_than_bpftrace(&self, tracer: &str) -> bool {
        let (_, counting) = bpftrace_counterparts(tracer);
        LOOPS.iter().all(|name| self.best(tracer, name) <= self.best(counting, name))
    }

    /// Instructions per call, from the BPF statistics, over the calls of
    /// `tracer`'s programs: every program, or only those of `handlers`.
    pub fn instructions_per_call(&self, tracer: &str, handlers: Option<&[&str]>) -> f64 {
        let (ns, calls) = self
            .programs
            .iter()
            .filter(|((t, name), _)| {
                t == tracer && handlers.is_none_or(|handlers| handlers.contains(&handler(name).as_str()))
            })
            .fold((0.0, 0.0), |(ns, calls), (_, &(n, c))| (ns + n, calls + c));
        if calls > 0.0 { ns / calls / NS_PER_INSTRUCTION } else { f64::NAN }
    }

    /// Instructions per call of each program that ran, by mode: where a
    /// record's cost goes. Both attach kinds of a handler share a row.
    pub fn program_table(&self) -> String {
        let mut rows: BTreeMap<String, BTreeMap<&str, (f64, f64)>> = BTreeMap::new();
        for ((tracer, name), &(ns, calls)) in &self.programs {
            let Some(&(_, column)) = PROFILED.iter().find(|(t, _)| t == tracer) else { continue };
            if calls > 0.0 {
                let cell = rows.entry(handler(name)).or_default().entry(column).or_default();
                *cell = (cell.0 + ns, cell.1 + calls);
            }
        }
        if rows.is_empty() {
            return "No BPF statistics in the console (no MAPCOUNT-PROG line).\n".to_owned();
        }
        let mut table = String::from("| program |");
        for (_, column) in PROFILED {
            table.push_str(&format!(" {column}: calls | instructions per call |"));
        }
        table.push_str("\n|---|");
        table.push_str(&"---|---|".repeat(PROFILED.len()));
        table.push('\n');
        for (name, cells) in rows {
            table.push_str(&format!("| {name} |"));
            for (_, column) in PROFILED {
                match cells.get(column) {
                    Some(&(ns, calls)) => {
                        table.push_str(&format!(" {calls:.0} | {:.0} |", ns / calls / NS_PER_INSTRUCTION))
                    }
                    None => table.push_str(" | |"),
                }
            }
            table.push('\n');
        }
        table
    }
}

/// A program's handler: its name without the attach kind.
fn handler(name: &str) -> String {
    ["_fentry", "_fexit", "_kprobe", "_kretprobe"]
        .iter()
        .find_map(|kind| name.strip_suffix(kind))
        .unwrap_or(name)
        .to_owned()
}

/// The handlers that run in the faults loop, once per page each.
const FAULTS_LOOP_HANDLERS: &[&str] = &["add_new_anon", "remove_ptes"];

/// BENCHMARKS.md's account of the kernel-side goals not met, from this
/// boot's BPF statistics: where the instructions go.
pub fn kernel_gaps(vm: &VmFigures) -> String {
    let per_call = |tracer: &str| vm.instructions_per_call(tracer, None);
    let empty = per_call("bpftrace-fentry-empty");
    let empty_kprobe = per_call("bpftrace-kprobe-empty");
    let own = |tracer: &str, empty: f64| per_call(tracer) - empty;
    let sampled = vm.instructions_per_call("mapcountd-fentry-sampled", Some(FAULTS_LOOP_HANDLERS)) - empty;
    let entering = vm.cost_per_event("bpftrace-fentry-empty", "faults") / NS_PER_INSTRUCTION;
    let mut out = format!(
        "Kernel side, from this boot's BPF statistics over one run of the three loops under each tracer\n\
         (instructions per call, averaged over every call of the tracer's programs; an empty program's figure\n\
         is the statistics' own timing, so a tracer's own work is its figure minus the empty one's):\n\n\
         - fentry: mapcountd's programs do {:.0} instructions of their own per call, bpftrace's counting\n  \
           {:.0} (x{:.1}); the empty program's figure is {empty:.0}. A record costs mapcountd the ring\n  \
           buffer's reserve and submit, the clock and the exact totals; bpftrace's counting is one map update.\n",
        own("mapcountd-fentry", empty),
        own("bpftrace-fentry-count", empty),
        own("mapcountd-fentry", empty) / own("bpftrace-fentry-count", empty),
    );
    if empty_kprobe.is_finite() {
        out.push_str(&format!(
            "- kprobe: mapcountd {:.0}, bpftrace's counting {:.0} (x{:.1}); the empty program's figure is\n  \
             {empty_kprobe:.0}. A kprobe's arguments are plain numbers, so mapcountd copies the folio and the VMA\n  \
             with helper calls where its fentry programs load their fields.\n",
            own("mapcountd-kprobe", empty_kprobe),
            own("bpftrace-kprobe-count", empty_kprobe),
            own("mapcountd-kprobe", empty_kprobe) / own("bpftrace-kprobe-count", empty_kprobe),
        ));
    }
    out.push_str(&format!(
        "- Sampled, faults loop: entering an empty fentry program costs the loop {entering:.0} instructions per\n  \
         call (its loop time over the untraced loop's, per record). x2 leaves mapcountd's programs that much\n  \
         work of their own; the loop's two programs ({}) do {sampled:.0} per call with small folios sampled:\n  \
         the sample test, the folio's kind, the observer test and the exact totals.\n",
        FAULTS_LOOP_HANDLERS.join(", "),
    ));
    out
}

/// BENCHMARKS.md's account of the host-side goals not met, from the
/// ingest benchmark's figures (`figure` reads one): where the time goes.
pub fn host_gaps(figure: impl Fn(&str) -> f64) -> String {
    let ns = |key: &str| figure(&format!("ingest_ns_per_event_{key}"));
    let whole = figure("ingest_ns_per_event_whole");
    let outside = ns("outside_table");
    let scrape_ms = figure("scrape_seconds_best_of_5") * 1e3;
    let read_ms = figure("scrape_read_entries_seconds") * 1e3;
    let render_ms = figure("scrape_render_seconds") * 1e3;
    format!(
        "Ingest, per event on one core (this host, this run; the daemon's drain of wake-up-sized batches):\n\n\
         - reading each record's bytes once {:.1} ns; decoding {:.1} ns; the whole drain with the folio table\n  \
           left out (every small folio outside a sample of one in 2^20: the copy out of the ring buffer, the\n  \
           order test, decoding, counters, fork and write-fault bookkeeping) {outside:.1} ns; everything\n  \
           {whole:.1} ns. So the folio table's state takes {:.1} ns of each event and the rest {outside:.1}\n  \
           ns; 30 M events/s is 33.3 ns.\n\
         - The same stream ingested from one array of {:.0} MB (each record read from memory rather than from\n  \
           a ring buffer's worth; no copy, no order test): {:.0} events/s; reading its records alone takes\n  \
           {:.1} ns per event.\n\n\
         Scrape with 1,000,000 live folios: {scrape_ms:.1} ms, of which reading each 64-byte entry once, in the\n\
         walk's {:.0} parts on as many cores, takes {read_ms:.1} ms and rendering the text {render_ms:.3} ms;\n\
         the gauges' own work in the walk is the rest.\n",
        ns("read"),
        ns("decode"),
        whole - outside,
        figure("ingest_array_bytes") / 1e6,
        figure("ingest_array_events_per_second"),
        figure("ingest_array_ns_per_event_read"),
        figure("scrape_parts"),
    )
}

/// The bench VM's `-icount` shift: guest time advances 2^shift ns per
/// instruction.
const ICOUNT_SHIFT: u8 = 3;

/// Guest nanoseconds per instruction in the bench VM.
const NS_PER_INSTRUCTION: f64 = (1u32 << ICOUNT_SHIFT) as f64;

/// The modes whose programs the BPF statistics cover, as table columns.
const PROFILED: &[(&str, &str)] = &[
    ("mapcountd-fentry", "fentry"),
    ("mapcountd-fentry-sampled", "fentry, sampled"),
    ("mapcountd-kprobe", "kprobe"),
];

pub fn rate_or_none(rate: f64) -> String {
    if rate > 0.0 { format!("{rate:.0} records/s") } else { "none of the rates tried".to_owned() }
}

/// Per loop: the tracer's time over bpftrace counting's with programs of
/// the same kind (below 1: cheaper).
pub fn fmt_slowdowns(vm: &VmFigures, tracer: &str) -> String {
    let (_, counting) = bpftrace_counterparts(tracer);
    LOOPS
        .iter()
        .map(|name| {
            let key = |t: &str| (t.to_owned(), (*name).to_owned());
            let best = |t: &str| vm.loop_ns.get(&key(t)).map_or(f64::NAN, |v| min(v));
            format!("{name} x{:.2} of bpftrace's time", best(tracer) / best(counting))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the bench VM runs.
#[derive(Clone, Copy, PartialEq)]
pub enum BenchPart {
    All,
    /// The loops under the fentry tracers, one round, and the programs'
    /// instructions per call: for trying a change to the eBPF programs.
    KernelCost,
}

impl BenchPart {
    fn name(self) -> &'static str {
        match self {
            BenchPart::All => "all",
            BenchPart::KernelCost => "kernel-cost",
        }
    }
}

/// The kernel-side budget in one boot of Debian's 7.3 kernel with 4 vCPUs;
/// returns the console.
pub fn bench_vm(bin: &Path, part: BenchPart) -> anyhow::Result<String> {
    let kernel = kernels::fetch(kernels::find("7.3")?)?;
    let extra = vm::Extra { init_vars: vec![("$BENCH_PART", part.name().to_owned())], ..Default::default() };
    let image = vm::Image::build(bin, &kernel, vm::Mode::Bench, extra)?;
    // 256 MiB of zeroes for the scenarios' record (about 25 MB).
    let disk = cache_dir().join("bench-disk.img");
    std::fs::File::create(&disk)?.set_len(256 << 20)?;
    let output = vm::boot(
        &kernel,
        &image,
        vm::Boot {
            echo: true,
            cpus: 4,
            disk: Some(&disk),
            single_threaded: true,
            // 8 ns an instruction: the shift only sets the figures' scale
            // (and how long guest time-outs last in instructions).
            icount_shift: Some(ICOUNT_SHIFT),
            ..vm::Boot::new("auto", 3600)
        },
    )?;
    std::fs::write(cache_dir().join(format!("vm-bench-7.3-{}.log", part.name())), &output)?;
    if part == BenchPart::KernelCost {
        return Ok(output);
    }
    // The record file the guest wrote to the disk, cut to its length.
    let bytes = output
        .lines()
        .find_map(|l| l.strip_prefix("MAPCOUNT-RECORD bytes="))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .context("the bench VM wrote no scenario record")?;
    let mut record = std::fs::read(&disk)?;
    record.truncate(bytes);
    std::fs::write(cache_dir().join("scenarios.rec"), record)?;
    Ok(output)
}

/// Runs the ingest benchmark and times mapcountd's start-up on this host, then
/// writes BENCHMARKS.md with the figures, the machine and the commit.
/// The table's memory in the terabyte replay: half the RSS goal.
const TERABYTE_TABLE_MEMORY: &str = "128M";

/// The figure on the line `KEY VALUE` of the ingest benchmark's output,
/// or NaN. The whole key: some keys begin others.
fn host_figure(output: &str, key: &str) -> f64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

pub fn bench() -> anyhow::Result<()> {
    let root = workspace_root();
    let release = build_binaries()?;
    println!(
        "bench: booting Debian 7.3 with 4 vCPUs for the kernel-side figures (several minutes under TCG)"
    );
    let vm = parse(&bench_vm(&release, BenchPart::All)?);
    let scenarios = cache_dir().join("scenarios.rec");
    let output = ingest_bench(&["--scenarios".as_ref(), scenarios.as_os_str()])?;
    if !output.status.success() {
        bail!("the ingest benchmark failed");
    }
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    // A terabyte host, replayed in a process of its own (its peak RSS is the daemon's).
    let terabyte = ingest_bench(&["--terabyte".as_ref(), TERABYTE_TABLE_MEMORY.as_ref()])?;
    let terabyte_ok = terabyte.status.success();
    let terabyte = String::from_utf8_lossy(&terabyte.stdout).to_string();
    let terabyte_figure = |key: &str| host_figure(&terabyte, key);
    let terabyte_rss = terabyte_figure("terabyte_peak_rss_mib");
    let terabyte_rate = terabyte_figure("terabyte_events_per_second");
    let terabyte_ratio = terabyte_figure("terabyte_sampling_ratio");
    let terabyte_lines: String =
        terabyte.lines().filter(|l| l.starts_with("terabyte_")).map(|l| format!("    {l}\n")).collect();
    let figure = |key: &str| host_figure(&text, key);

    // Start-up: exec to /-/ready, loading every program (attach fails on a
    // host without kprobes, which is what this measures here).
    let mut startups = Vec::new();
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let started = std::time::Instant::now();
        let mut child = Command::new(release.join("mapcountd"))
            .args(["--web.listen-address", &format!("127.0.0.1:{port}"), "--log.level", "error"])
            .spawn()?;
        let ready = loop {
            // Asked here, not by a curl per try: on two cores a process
            // started every few milliseconds slowed the start-up it timed.
            if ready_at(port) {
                break Some(started.elapsed());
            }
            if started.elapsed() > std::time::Duration::from_secs(30) {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let _ = child.kill();
        let _ = child.wait();
        if let Some(t) = ready {
            startups.push(t.as_secs_f64() * 1000.0);
        }
    }
    startups.sort_by(f64::total_cmp);
    let startup_ms = startups.get(startups.len() / 2).copied().unwrap_or(f64::NAN);

    let commit = Command::new("git").current_dir(&root).args(["rev-parse", "--short", "HEAD"]).output()?;
    let commit = String::from_utf8_lossy(&commit.stdout).trim().to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    let rate = figure("ingest_events_per_second");
    let bytes = figure("table_bytes_per_folio");
    let scrape_ms = figure("scrape_seconds_best_of_5") * 1000.0;
    let scrape_cores = figure("scrape_cores");
    let fork_copy_ns = figure("fork_copy_ns_per_folio");
    let fork_unmap_ns = figure("fork_child_unmap_ns_per_event");

    let vm_startup = median(&vm.startup_ms);
    let sampled_faults = vm
        .multiples_of_empty("mapcountd-fentry-sampled")
        .into_iter()
        .find(|(name, _)| name == "faults")
        .map_or(f64::NAN, |(_, multiple)| multiple);
    let multiples =
        |tracer: &str| {
            vm.multiples_of_empty(tracer)
                .iter()
                // Within noise of the untraced loop, a ratio means nothing.
                .map(|(l, m)| {
                    if m.is_finite() && *m > 0.0 {
                        format!("{l} x{m:.1}")
                    } else {
                        format!("{l} within noise")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
    let lossless = |ring: u64| {
        vm.rates
            .iter()
            .filter(|r| r.ring == ring && r.lost == 0 && r.cpus > 0)
            .map(|r| r.achieved())
            .fold(0.0, f64::max)
    };
    let produced_most = vm.rates.iter().map(|r| r.achieved()).fold(0.0, f64::max);
    let all_balanced = !vm.rates.is_empty() && vm.rates.iter().all(|r| r.cpus > 0 && r.unbalanced == 0);
    let mut rate_table = String::from(
        "| ring buffer | target records/s | received records/s | produced | received | lost | CPUs | produced = received + lost |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in &vm.rates {
        rate_table.push_str(&format!(
            "| {} KiB | {} | {:.0} | {} | {} | {} | {} | {} |\n",
            r.ring / 1024,
            r.target,
            r.achieved(),
            r.produced,
            r.received,
            r.lost,
            r.cpus,
            if r.cpus > 0 && r.unbalanced == 0 { "every CPU" } else { "NO" }
        ));
    }
    let fork_big = match &vm.fork_big {
        Some(line) => {
            let get = |key: &str| number(line, key).unwrap_or(f64::NAN);
            format!(
                "{:.0} lost; the daemon copied {:.0} folios' mappings in {:.0} ms of its own time (the kernel's fork: {:.0} ms, TCG)",
                get("lost"),
                get("folios_copied"),
                get("daemon_copy_ms"),
                get("fork_ms"),
            )
        }
        None => "not measured (no MAPCOUNT-FORK-BIG line)".to_owned(),
    };
    let fork_big_lost = vm.fork_big.as_deref().and_then(|l| number(l, "lost"));
    let errors = if vm.tracer_errors.is_empty() {
        String::new()
    } else {
        format!("\nTracer errors in the guest:\n\n```\n{}\n```\n", vm.tracer_errors.join("\n"))
    };

    let report = format!(
        "# mapcount benchmarks\n\n\
         Measured at commit `{commit}` by `cargo xtask bench` on {cores} cores ({cpu}), kernel {kernel}\n\
         Kernel-side figures: one boot of Debian's 7.3 kernel in qemu (TCG, 4 vCPUs on one host thread), with\n\
         the guest's clock counting instructions (`-icount shift=3`: 8 ns each). The same work takes the same\n\
         guest time whatever else the host runs, so the figures compare across boots and hosts; they count\n\
         instructions, not cache misses. Rerun: `cargo xtask bench` (rewrites this file).\n\n\
         | goal | target | measured | |\n|---|---|---|---|\n\
         | 1. ingest: decode and aggregate, one core | >= 30,000,000 events/s | {rate:.0} events/s ({events} events: the {scenario_records} records the VM scenarios produced on 7.3, then synthetic small-folio churn: fault, fork, reuse, map, unmap; drained as the daemon drains, {batches} batches of what the default ring buffer holds when the kernel wakes the daemon, copied out and aggregated in timestamp order) | {} |\n\
         | 1. ingest of the VM scenarios' records alone (the kernel's streams: file folios mapped by dozens of processes, forks of processes mapping them), one core | reported | {scenarios_rate:.0} events/s (best of 20 passes) | |\n\
         | 1. folio table memory | <= 96 bytes per live folio | {bytes:.0} bytes (heap bytes / live folios, 1,000,000 folios mapped once, counted by the allocator) | {} |\n\
         | 2. kernel side, fentry: loop time vs bpftrace counting with fentry/fexit programs on the same functions | no larger | {} (table below) | {} |\n\
         | 2. kernel side, kprobe: loop time vs bpftrace counting with kprobes on the same functions | no larger | {} | {} |\n\
         | 2. cost per record vs an empty program of the same kind on the same functions | reported | fentry: {}; kprobe: {}; bpftrace counting: fentry {}, kprobe {} | |\n\
         | 2. small folios sampled (one in 2^20): the faults loop's overhead over untraced, as a multiple of an empty fentry program's | at most x2 | x{sampled_faults:.2} (every loop: {}) | {} |\n\
         | 3. no silent loss, 4 vCPUs | produced = received + lost, per CPU | {} at every rate tried; highest rate without loss: {} with the default 8 MiB ring buffer (the guest produced at most {produced_most:.0} records/s), {} with 64 KiB (table below) | {} |\n\
         | 4. scrape with 1,000,000 live folios | <= 5 ms | {scrape_ms:.1} ms (best of 5; the table walked on {scrape_cores:.0} cores) | {} |\n\
         | fork of a 1 GiB process (262,144 small folios) while another process faults at full speed, default 8 MiB ring buffer | 0 lost events | {fork_big} | {} |\n\
         | fork of a 1 GiB process (262,144 small folios, table exact) on this host, one core: the daemon's copy of the parent's mappings, per folio, against its work per event of the child's end (exec or exit unmaps each page, one event each) | reported | {fork_copy_ns:.0} ns per folio copied; {fork_unmap_ns:.0} ns per event of the child's unmaps (the copy: x{:.2} of an event; best of 3) | |\n\
         | replay of a synthetic terabyte host (2^28 small and 500,000 large folios over 50,000 address spaces, two forks of a 100 GiB process), `--folio-table.memory {TERABYTE_TABLE_MEMORY}` | peak RSS <= 256 MiB, >= 30 M events/s on one core, exact counters equal to the truth, scaled gauges within their bound | {terabyte_rss:.0} MiB, {terabyte_rate:.0} events/s, one small folio in {:.0} tracked; counters and gauges: {} (below) | {} |\n\
         | 5. start-up, host (exec to /-/ready, programs loaded, attach refused) | <= 300 ms | {startup_ms:.0} ms (median of 5) | {} |\n\
         | 5. start-up, VM (exec to /-/ready, every probe attached) | reported | {vm_startup:.0} ms (median of {}, TCG) | |\n\n\
         ## Where the goals not met stand\n\n{kernel_gaps}\n{host_gaps}\n\
         ## Terabyte host replay\n\n\
         Every event reaches the daemon (no kernel side filters them), which drops the small folios outside its\n\
         sample itself: the worst case for ingest. The truth is the generator's own count; the bound is the\n\
         `_error` gauge's (3 standard deviations).\n\n{terabyte_lines}\n\
         ## Kernel-side cost\n\n\
         Best of 15 runs per cell (5 rounds, each starting every tracer in turn and running the loops 3 times\n\
         under it); the ratio is to the untraced loop, ns/record is the extra time divided by the\n\
         rmap and write-fault records mapcountd produced in that loop. In the \"mapcountd fentry\" and \"kprobe\"\n\
         columns the daemon is stopped (SIGSTOP, 64 MiB ring buffer) while a loop runs: the loop pays for the\n\
         probes and the ring buffer, the kernel side, as bpftrace's loops pay for its programs and maps. The\n\
         \"daemon running\" columns add mapcountd's user-space work, which under TCG shares the emulated CPUs\n\
         (and the one host thread) with the loop. The empty and counting programs are bpftrace (Debian's\n\
         package) on the functions mapcountd attached in that boot, as kprobes/kretprobes and as fentry/fexit:\n\
         `{probes}`.\n\n{table}{errors}\n\
         ### Instructions per call, by program\n\n\
         From the kernel's BPF statistics (`kernel.bpf_stats_enabled`: run time and calls per program) over one\n\
         more run of the three loops under each mode, the daemon stopped meanwhile; guest time counts\n\
         instructions, so run time / 8 ns is the program's instructions per call, without the trampoline or\n\
         kprobe that enters it (an empty program's whole cost is in the table above).\n\n{programs}\n\
         ## Lossless rate\n\n\
         One process per vCPU, pinned, maps, touches and unmaps one page at a time (two records) at its share of\n\
         the target rate for 10 s, against a fresh mapcountd with the default 8 MiB ring buffer, then with 64 KiB.\n\
         Received records/s counts everything the daemon received (the guest's other processes too). Counts are\n\
         from the kernel's per-CPU counters and the CPU field of each record, after mapcountd detached and drained.\n\n{rate_table}\n\
         ## What was tried and what each change bought\n\n\
         User space (`cargo bench --bench ingest` on this host; before and after measured back to back):\n\n\
         - Counter handles resolved once per label set instead of a label lookup per event, folio table on FxHash,\n  \
           no allocation when counting sharers or checking partial mappings: ingest 0.56 M -> 2.2 M events/s,\n  \
           scrape with 1 M folios 274 ms -> 41 ms (gauges summed per (kind, order) before one update each).\n\
         - Mappings grow one at a time (a Vec starts at four): 291 -> 219 bytes per folio.\n\
         - Folio table as a slab of 72-byte entries holding the first mapping inline, found through a hash table\n  \
           of 4-byte slot numbers (the old map kept key and 80-byte entry in each of up to twice as many slots as\n  \
           folios): 219 -> 90 bytes per folio; scrape 46 ms -> 2 ms (the gauges walk a dense slab).\n\
         - Fork read a VMA's list of every folio ever mapped through it, cloned; lists are now pruned as they are\n  \
           read. Per-event counters and histograms are prometheus local metrics published before each scrape, not\n  \
           atomics: synthetic churn 3.2 M -> 21 M events/s.\n\
         - Fat LTO and one codegen unit for release builds (the per-event path crosses prometheus, hashbrown and\n  \
           smallvec): 21 M -> 37 M events/s.\n\
         - The VM scenarios leave 19,000 folios live; a slot freed and reused in one VMA was listed again at each\n  \
           use, and fork walked the repeats: with the scenarios' records first, 15 M -> 30 M events/s.\n\
         - Terabyte replay: at one small folio in 512, most 2 MiB regions of the index held one entry, a B-tree\n  \
           entry each (a million regions, 64 MB); regions are now 2^N times wider at one in 2^N. The replay also\n  \
           buffered a child's 262,144 removals at once (48 MiB of its own). Table estimate 197 -> 138 MB, peak RSS\n  \
           284 -> 191 MiB, the same sample and figures.\n\
         - Start-up: the layout's BTF read whole and parsed from memory (btf-rs through a seeking BufReader made\n  \
           read and lseek calls per string on sysfs), /proc/kallsyms and aya's BTF parse on other cores meanwhile:\n  \
           host start-up, seven interleaved pairs with the previous binary, 412 -> 341 ms.\n\
         - A folio's PTEs per address space were summed by comparing every mapping with every other at each of its\n  \
           events: the scenarios' 42,820 adds of file folios mapped by dozens of processes took 56.6 ms, now 7.2 ms\n  \
           (sorted on the stack). Ingest with the scenarios' records first 17 M -> 20 M events/s.\n\
         - The scrape's walk of the table in parts on the available cores (2^17 slots at least each), its small\n  \
           folios on a short path, a 1024-way address-space cache: 1 M folios 15.3 -> 9.1 ms on one core, 5-9 ms\n  \
           on two. The million-folio table had measured 500,001 folios (it sampled at its entry bound).\n\
         - Start-up: BTF read in place (one pass noting each type's record, named types hashed) instead of btf-rs\n  \
           building every type and a String per name, 110-190 -> 10-28 ms; /proc/kallsyms kept as read, its text\n  \
           symbols hashed as ranges, 110-140 -> 50-70 ms. Whole process, exec to ready and stop, nine interleaved\n  \
           pairs with the previous binary: median 393 -> 298 ms, peak memory 87 -> 59 MiB.\n\
         - Entries of 64 bytes, one cache line (a 32-bit serial; four small fields in one byte): 97.9 -> 89.6\n  \
           bytes per folio. A new mapping waits in a list of 4,096 and is filed in the address-space index only\n  \
           when fork, mremap or teardown asks (if still mapped), so short-lived folios are never filed: ingest\n  \
           22.5 M -> 25.3 M events/s (median of 3, side by side). Tried and not kept: one reused buffer for the\n  \
           index's answers and fork's copies (three allocations fewer per fork), 25.6 M -> 23.8 M, reverted.\n\
         - Where the 30 M goal went: the binary of 96d5672, whose table was keyed by VMA, ingests the same stream\n  \
           at 32.1 M events/s on this host. Keying by address (exact across mremap, partial forks and VMA merges)\n  \
           needs the index by address space and region: with filing skipped the stream runs at 27.2 M, and the\n  \
           fork path (one event in 42) takes 12% of the time.\n\
         - The scrape: a small folio mapped once (most of a table) takes a short path through the walk, its\n  \
           address space's sums found without a call per folio: 169 -> 85 instructions per folio (callgrind);\n  \
           1 M folios, six interleaved pairs with the previous binary: median 10.5 -> 7.4 ms.\n\
         - A sampled host's events: the set of forks under way was asked at every event of a task's own\n  \
           address space (a hash lookup, the set almost always empty), the address space's owner noted in a\n  \
           hash map at each, and the sampled-out count was an atomic counter. Now: the set only when not\n  \
           empty, the owner once per run of a task's events, a local counter published at the scrape.\n  \
           Terabyte replay, interleaved runs: 24.6-29.1 M -> 31.9-38.2 M events/s.\n\
         - Fork of a 1 GiB process (the row above): filing the waiting mappings in the address-space index\n  \
           looked up the address space and the region's B-tree entry for each mapping. They come in runs of one\n  \
           address space and region (a process faulting its pages in, a fork copying a VMA): one lookup per run.\n  \
           Callgrind over that measurement (three tables of 262,144 folios built, forked, the child's unmaps):\n  \
           2,334 M -> 1,954 M instructions, the filing 518 M -> 138 M. The ingest streams above: 13.67 G ->\n  \
           13.58 G (their forks copy one page each).\n\n\
         Kernel side (fentry loop time as a multiple of bpftrace counting, in the same boot; faults, fork_cow):\n\n\
         - Before: 13 helper calls per small-folio record (one probe read per field): x1.06, x1.14.\n\
         - A folio's fields from one 64-byte copy per struct page, current->mm as a plain load through\n  \
           bpf_get_current_task_btf, the ring buffer's fill level asked every 64th record: x0.95, x1.08.\n\
         - One 128-byte snapshot per folio or VMA (one copy where a page is its own folio), one read of a new\n  \
           anonymous folio instead of two, fewer reads at write faults and forks: x0.94, x1.17 (boot-to-boot\n  \
           noise is of this size: compare the rounds in the console log).\n\
         - Write-fault windows updated in place in an LRU map instead of an insert and a delete per fault, and\n  \
           an rmap record's tgid loaded with current->mm instead of a helper call: the table above.\n\
         - The plain loads cost start-up instead: the verifier checks each pointer loaded through a BTF-typed task\n  \
           (current->mm) by searching the kernel's BTF by name (btf_nested_type_is_trusted, btf_find_by_name_kind:\n  \
           17% of a host start-up's samples). Host start-up, side by side with the binary of 002fa87: 320 -> 515 ms.\n\
         - current->mm read by a helper again (tgid stays a plain load), kprobe programs loaded only when needed and\n  \
           then verified on every CPU at once: host start-up, median of 11 interleaved runs on a slower 2-core host,\n  \
           1129 ms (previous binary) -> 554 ms; the binary of 002fa87 took 394 ms there.\n\
         - Exact totals: every rmap call and write fault also counted in a per-CPU array before the ring buffer is\n  \
           asked for room (the folio is now read before that request): the table above includes them.\n\
         - Records carry their CPU (80 bytes instead of 72) so that every CPU's balance can be checked exactly.\n\
         - Wake-ups batched (the kernel wakes mapcountd at 1/16 of the ring buffer, the daemon drains every 20 ms):\n  \
           compare the \"daemon running\" column with \"a wake-up per record\" (the kernel's default).\n\
         - Small folios sampled: a small folio outside the sample is told from its address and one 64-byte copy of\n  \
           its struct page, before the VMA, the clock and the counters are read; the observer test compares with\n  \
           the daemon's mm once learnt instead of reading current->mm: the sampled faults loop's overhead, as a\n  \
           multiple of an empty fentry program's, x3.28 -> x2.63 (one boot each; bpftrace counting x2.71, x3.28).\n\
         - Snapshot fields read without a test of the copy each (a failed copy leaves zeroes; the counters test it\n  \
           once): the kprobe programs that add mappings verify in about 30 ms each instead of 34-37 (host).\n\
         - A new anonymous folio recorded at the entry of folio_add_new_anon_rmap, with the counters the call\n  \
           sets, instead of at its return: one program per anonymous fault instead of two (no fexit trampoline\n  \
           calling the function, no kretprobe and its map of arguments). Overhead over the untraced loop, this\n  \
           boot against the one before: faults 171 -> 144 ms (fentry), 259 -> 191 ms (kprobe); fork_cow\n  \
           175 -> 128 ms and 240 -> 211 ms. As multiples of bpftrace counting: fentry faults x1.15 -> x1.22\n  \
           (bpftrace's counting itself 413 -> 367 ms between the boots), fork_cow x1.07 -> x0.94; kprobe faults\n  \
           x1.32 -> x1.10, fork_cow x1.20 -> x1.14.\n\
         - Guest time counted in instructions (qemu -icount): with the host's clock, the untraced loop's slowest\n  \
           of five rounds was up to twice its fastest on a shared host, more than the differences measured;\n  \
           counted in instructions, runs of a loop agree within 1-2%. Counted so, each rmap program ran about\n  \
           3,000 instructions per call where bpftrace's counting ran 600: most were `memset` and `memmove`,\n  \
           which LLVM calls on this target as loops of one-byte stores (5 instructions a byte), for each\n  \
           zero-initialised 128-byte snapshot and for each record copied into the ring buffer.\n\
         - Snapshots left uninitialised until the helper copies into them (the words it does not copy zeroed one\n  \
           by one), records copied into the ring buffer a word at a time: no `memset` or `memmove` on any rmap\n  \
           path. Instructions per call, from the kernel's BPF statistics in one boot each: folio_add_new_anon_rmap\n  \
           3,150 -> 1,470, folio_remove_rmap_ptes 3,050 -> 1,340; small folios sampled 1,750 -> 900 and\n  \
           1,530 -> 655; write-fault entry 2,160 -> 1,160; fork's copy 2,890 -> 990. The faults loop under\n  \
           mapcountd fentry, as a multiple of bpftrace counting's time: x1.73 -> x1.24 (same boots).\n\
         - Where a record's instructions go (remove_ptes, fentry, a build returning at each step in turn, one\n  \
           boot): arguments and the sample test 60, the VMA 186 (its mm read by a helper), the clock 55, the\n  \
           folio's 128-byte copy 229, its fields and the observer test 157, totals 84, the ring buffer's\n  \
           reserve 208, current->mm 138 (a helper), the record's copy and submit 48. A helper call costs\n  \
           about 130 whatever it copies; bpftrace's counting makes none but its map's.\n\
         - A first-touch fault's new folio asked the map of write-fault windows whether one was open (an LRU\n  \
           hash lookup, about 200 instructions); an array of open-window counts by thread id answers first.\n  \
           Opening a window looked the thread up twice, now once. VMA fields as plain loads through the typed\n  \
           argument in fentry programs. Instructions per call: folio_add_new_anon_rmap 1,462 -> 1,279,\n  \
           write-fault entry 1,154 -> 1,011, folio_remove_rmap_ptes 1,336 -> 1,266. Faults loop as a multiple\n  \
           of bpftrace counting's time: fentry x1.25 -> x1.21, kprobe x1.24 -> x1.21; sampled x6.4 -> x5.9.\n\
         - On the sampled path, the observer test's address space (the VMA's mm, a helper call) read only for a\n  \
           folio kind the daemon's own pages can be: never for page cache. Instructions per call, sampled:\n  \
           folio_add_file_rmap_ptes 652 -> 530, folio_remove_rmap_ptes 652 -> 633 (mostly anonymous folios).\n\
         - Pointer fields as plain loads where the kernel's BTF is sorted by name (7.x, this boot's kernel):\n  \
           its verifier then finds a loaded pointer's trust annotations by binary search, where older kernels\n  \
           search linearly at each load (the start-up cost above). vma->vm_mm in fentry programs and\n  \
           current->mm in every program; 6.1-6.18 keep the helper calls. The run before, same boot setup:\n  \
           instructions per call, fentry, add_new_anon 1,263, remove_ptes 1,266, add_file_ptes 1,546;\n  \
           sampled remove_ptes 632, add_new_anon 794; faults loop x1.21 of bpftrace counting (fentry and\n  \
           kprobe), sampled x6.23; VM start-up 33,225 ms. This run: the tables above.\n\
         - The folio's fields as plain loads too, through the typed struct folio argument of the folio-based\n  \
           rmap programs (fentry, sorted BTF), instead of a helper's 128-byte copy of its first two pages (64\n  \
           bytes on the sampled path). folio->mapping is a pointer field, on which the verifier refuses `&`;\n  \
           its type bits come from its low half, taken by a 32-bit register move (a privileged program's move\n  \
           of a pointer gives a plain number). A VM bench run of that commit alone, against the run at 96f1e08:\n  \
           instructions per call, fentry, add_new_anon 1,077 -> 862, remove_ptes 1,048 -> 858, add_file_ptes\n  \
           1,050 -> 958; sampled add_new_anon 606 -> 464, remove_ptes 551 -> 425. Loop time as a multiple of\n  \
           bpftrace counting, fentry: faults x1.15 -> x1.09, fork_cow x1.22 -> x1.17; sampled faults loop x4.58\n  \
           -> x3.59 of an empty fentry program's overhead.\n\
         - Then a write fault's VMA, its mm and flags and the fault's flags as plain loads through the typed\n  \
           struct vm_fault argument (three helper calls fewer; write-fault entry 1,011 instructions per call in\n  \
           the run before), and on the sampled path only the flags and mapping read (no counters), the totals'\n  \
           two slots added after one lookup of their array, and the VMA argument read after the sample test:\n  \
           the tables above.\n\
         - Where the sampled path's instructions go (`cargo xtask bench --kernel-cost`, one boot each): a build\n  \
           whose rmap programs return right after the sample test ran remove_ptes in 184 instructions per call,\n  \
           against 298 for the whole sampled path and 97 for the smallest program (teardown_entry). So the\n  \
           arguments and the sample test cost about 90, the folio's kind, the observer test and the totals about\n  \
           115; add_new_anon (337) also looks for an open write-fault window first.\n",
        verdict(rate >= 30e6),
        verdict(bytes <= 96.0),
        fmt_slowdowns(&vm, "mapcountd-fentry"),
        verdict(vm.no_slower_than_bpftrace("mapcountd-fentry")),
        fmt_slowdowns(&vm, "mapcountd-kprobe"),
        verdict(vm.no_slower_than_bpftrace("mapcountd-kprobe")),
        multiples("mapcountd-fentry"),
        multiples("mapcountd-kprobe"),
        multiples("bpftrace-fentry-count"),
        multiples("bpftrace-kprobe-count"),
        multiples("mapcountd-fentry-sampled"),
        verdict(sampled_faults <= 2.0),
        if all_balanced { "balanced" } else { "NOT balanced" },
        rate_or_none(lossless(8 << 20)),
        rate_or_none(lossless(64 << 10)),
        verdict(all_balanced),
        verdict(scrape_ms <= 5.0),
        verdict(fork_big_lost == Some(0.0)),
        fork_copy_ns / fork_unmap_ns,
        1.0 / terabyte_ratio,
        if terabyte_ok { "all equal and within" } else { "NOT all equal and within" },
        verdict(terabyte_ok && terabyte_rss <= 256.0 && terabyte_rate >= 30e6),
        verdict(startup_ms <= 300.0),
        vm.startup_ms.len(),
        events = figure("ingest_events"),
        scenario_records = figure("ingest_scenario_records"),
        scenarios_rate = figure("ingest_scenarios_alone_events_per_second"),
        probes = vm.probes,
        table = vm.report(),
        programs = vm.program_table(),
        batches = figure("ingest_batches"),
        kernel_gaps = kernel_gaps(&vm),
        host_gaps = host_gaps(figure),
    );
    std::fs::write(root.join("BENCHMARKS.md"), &report)?;
    print!("{report}");
    Ok(())
}

pub fn command(vm_only: bool, kernel_cost: bool) -> anyhow::Result<()> {
    if kernel_cost {
        let vm = parse(&bench_vm(&build_binaries()?, BenchPart::KernelCost)?);
        for tracer in ["mapcountd-fentry", "mapcountd-fentry-sampled"] {
            let multiples: Vec<String> = vm
                .multiples_of_empty(tracer)
                .iter()
                .map(
                    |(name, m)| {
                        if m.is_nan() { format!("{name} within noise") } else { format!("{name} x{m:.2}") }
                    },
                )
                .collect();
            println!(
                "{tracer}: loop time {}; cost per record as a multiple of an empty fentry program's: {}",
                fmt_slowdowns(&vm, tracer),
                multiples.join(", ")
            );
        }
        print!("\n{}\n{}", vm.program_table(), kernel_gaps(&vm));
        return Ok(());
    }
    if vm_only {
        let output = bench_vm(&build_binaries()?, BenchPart::All)?;
        for line in output.lines().filter(|l| l.starts_with("MAPCOUNT-") || l.starts_with("tracer ")) {
            println!("{line}");
        }
        return Ok(());
    }
    bench()
}

/// Whether mapcountd on this local port answers /-/ready with 200.
fn ready_at(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
    if stream.write_all(b"GET /-/ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).is_ok() && status.ends_with(b" 200")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_console() {
        let console = "MAPCOUNT-READY ms=812 pid=77\n\
            MAPCOUNT-COST tracer=none round=1 loop=faults ns=1000 events=0\n\
            MAPCOUNT-COST tracer=mapcountd-fentry round=1 loop=faults ns=1500 events=100\n\
            MAPCOUNT-COST tracer=bpftrace-fentry-empty round=1 loop=faults ns=1100 events=0\n\
            MAPCOUNT-PROG tracer=mapcountd-fentry name=remove_ptes_fentry ns=80000 calls=10\n\
            MAPCOUNT-PROG tracer=mapcountd-kprobe name=remove_ptes ns=160000 calls=10\n\
            MAPCOUNT-PROG tracer=mapcountd-kprobe name=remove_pmd ns=0 calls=0\n\
            MAPCOUNT-RATE ring=4096 target=1000 2026 INFO mapcountd: event accounting cpu=0 produced=7 received=5 lost=2 balanced=true\n\
            MAPCOUNT-RATE ring=4096 target=1000 2026 INFO mapcountd: event accounting cpu=1 produced=3 received=3 lost=0 balanced=true\n";
        let f = parse(console);
        assert_eq!(f.startup_ms, [812.0]);
        assert_eq!(f.cost_per_event("mapcountd-fentry", "faults"), 5.0);
        assert_eq!(f.multiples_of_empty("mapcountd-fentry")[0].1, 5.0);
        // 8 ns an instruction; kinds of one handler on one row; idle programs left out.
        let programs = f.program_table();
        assert!(programs.contains("| remove_ptes | 10 | 1000 | | | 10 | 2000 |"), "{programs}");
        assert!(!programs.contains("remove_pmd"), "{programs}");
        assert_eq!(f.instructions_per_call("mapcountd-fentry", None), 1000.0);
        let step = &f.rates[0];
        assert_eq!(
            (step.ring, step.target, step.produced, step.received, step.lost, step.cpus),
            (4096, 1000, 10, 8, 2, 2)
        );
    }

    #[test]
    fn an_empty_program_within_the_untraced_loops_spread_gives_no_multiple() {
        let console = "MAPCOUNT-COST tracer=none round=1 loop=thp ns=1000 events=0\n\
            MAPCOUNT-COST tracer=none round=2 loop=thp ns=1100 events=0\n\
            MAPCOUNT-COST tracer=mapcountd-fentry round=1 loop=thp ns=1500 events=100\n\
            MAPCOUNT-COST tracer=bpftrace-fentry-empty round=1 loop=thp ns=1050 events=0\n";
        let f = parse(console);
        let thp = f.multiples_of_empty("mapcountd-fentry").into_iter().find(|(name, _)| name == "thp");
        assert!(thp.is_some_and(|(_, multiple)| multiple.is_nan()));
    }

    #[test]
    fn a_host_figure_is_read_by_its_whole_key() {
        let output = "ingest_ns_per_event_read 6.5\ningest_ns_per_event_whole 40.0\n";
        assert_eq!(host_figure(output, "ingest_ns_per_event_whole"), 40.0);
        assert!(host_figure(output, "ingest_ns_per_event").is_nan());
    }

    #[test]
    fn instructions_per_call_weigh_each_call_and_add_up_repeated_names() {
        // bpftrace's names are cut at 15 characters: two programs, one name.
        let console = "MAPCOUNT-PROG tracer=bpftrace-fentry-count name=kfunc_vmlinux_f ns=8000 calls=10\n\
            MAPCOUNT-PROG tracer=bpftrace-fentry-count name=kfunc_vmlinux_f ns=24000 calls=30\n\
            MAPCOUNT-PROG tracer=mapcountd-fentry-sampled name=add_new_anon_fentry ns=8000 calls=4\n\
            MAPCOUNT-PROG tracer=mapcountd-fentry-sampled name=remove_ptes_fentry ns=16000 calls=4\n\
            MAPCOUNT-PROG tracer=mapcountd-fentry-sampled name=write_fault_return_fexit ns=80000 calls=2\n";
        let f = parse(console);
        assert_eq!(f.instructions_per_call("bpftrace-fentry-count", None), 100.0);
        // (8000 + 16000) ns / 8 calls / 8 ns.
        assert_eq!(f.instructions_per_call("mapcountd-fentry-sampled", Some(FAULTS_LOOP_HANDLERS)), 375.0);
        assert!(f.instructions_per_call("mapcountd-kprobe", None).is_nan());
    }
}
