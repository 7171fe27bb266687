//! The loops `cargo xtask bench` times, the lossless-rate driver, start-up
//! timing, and the comparison of a live run with its replay.

use std::{
    process::ExitCode,
    ptr,
    thread::sleep,
    time::{Duration, Instant},
};

use crate::{
    memory::{PAGE, map_anon, unmap, write_each_page},
    metrics::{MetricsSource, Scrape},
};

/// The rmap-heavy loops whose time the kernel-side cost is measured on.
/// Each prints `MAPCOUNT-COST loop=NAME ns=N events=E`, E being the
/// records mapcountd produced meanwhile when one is running (else 0).
/// With `pause`, that mapcountd is stopped (SIGSTOP) while a loop runs, so
/// the loop pays for the probes and the ring buffer only, not for the
/// daemon's user-space work on the same (emulated) CPUs.
pub(crate) fn cost(metrics: &MetricsSource, pause: Option<i32>) {
    let produced = || metrics.scrape().map_or(0.0, |s| s.sum("mapcount_events_produced_total", &[]));
    let signal = |sig: libc::c_int| {
        if let Some(pid) = pause {
            // SAFETY: plain kill(2) on the daemon the caller named.
            unsafe { libc::kill(pid, sig) };
        }
    };
    let time = |name: &str, work: &dyn Fn()| {
        let before = produced();
        signal(libc::SIGSTOP);
        let started = Instant::now();
        work();
        let ns = started.elapsed().as_nanos();
        signal(libc::SIGCONT);
        println!("MAPCOUNT-COST loop={name} ns={ns} events={}", produced() - before);
    };
    // Fault in and unmap small pages: one rmap add and one remove per page.
    time("faults", &|| {
        for _ in 0..500 {
            let p = map_anon(64, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
            write_each_page(p, 64, 1);
            unmap(p, 64);
        }
    });
    // Fork and copy on write: the child writes every page the parent owns.
    time("fork_cow", &|| {
        let p = map_anon(64, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
        for round in 0..100u8 {
            write_each_page(p, 64, round);
            // SAFETY: the child only writes to its copy and exits.
            match unsafe { libc::fork() } {
                0 => {
                    write_each_page(p, 64, round.wrapping_add(1));
                    unsafe { libc::_exit(0) };
                }
                child => unsafe {
                    libc::waitpid(child, ptr::null_mut(), 0);
                },
            }
        }
        unmap(p, 64);
    });
    // Map and unmap THPs: one PMD add and one PMD remove each.
    time("thp", &|| {
        for _ in 0..100 {
            let raw = map_anon(1024, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
            let aligned = (raw as usize).next_multiple_of(512 * PAGE) as *mut u8;
            // SAFETY: within our mapping (1024 pages hold an aligned 512).
            unsafe { libc::madvise(aligned.cast(), 512 * PAGE, libc::MADV_HUGEPAGE) };
            write_each_page(aligned, 1, 1);
            unmap(raw, 1024);
        }
    });
}

/// One process per CPU, pinned, each mapping, touching and unmapping one
/// page at a time (two rmap records) at its share of `events_per_second`.
pub(crate) fn rate(events_per_second: u64, seconds: u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cycles_per_second = (events_per_second as f64 / 2.0 / cpus as f64).max(1.0);
    let mut workers = Vec::new();
    for cpu in 0..cpus {
        // SAFETY: the worker maps, touches, unmaps and exits.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: a zeroed cpu_set_t with one bit set.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
                }
                let started = Instant::now();
                let mut done = 0u64;
                while started.elapsed() < Duration::from_secs(seconds) {
                    let due = (started.elapsed().as_secs_f64() * cycles_per_second) as u64;
                    if done >= due {
                        sleep(Duration::from_micros(200));
                        continue;
                    }
                    let p = map_anon(1, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
                    write_each_page(p, 1, 1);
                    unmap(p, 1);
                    done += 1;
                }
                println!("MAPCOUNT-RATE-WORKER cpu={cpu} cycles={done}");
                unsafe { libc::_exit(0) };
            }
            pid => workers.push(pid),
        }
    }
    for pid in workers {
        unsafe { libc::waitpid(pid, ptr::null_mut(), 0) };
    }
}

/// A process with `mib` MiB of small pages forks while another faults
/// pages in and out at full speed: the events lost meanwhile (the daemon
/// copies every folio's mappings into the child while the faulting
/// process's records pile up in the ring buffer) and the daemon's own
/// time on that copy. Prints `MAPCOUNT-FORK-BIG`.
pub(crate) fn fork_big(metrics: &MetricsSource, mib: usize) -> anyhow::Result<()> {
    // The faulting process first (forked after the big mapping, it would
    // be a second fork of it); it starts when its pipe closes.
    let mut go = [0; 2];
    // SAFETY: a pipe, and a child that reads it, then maps, touches and
    // unmaps until killed.
    unsafe { libc::pipe(go.as_mut_ptr()) };
    let faulting = match unsafe { libc::fork() } {
        0 => {
            unsafe { libc::close(go[1]) };
            let mut byte = [0u8; 1];
            unsafe { libc::read(go[0], byte.as_mut_ptr().cast(), 1) };
            loop {
                let q = map_anon(64, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
                write_each_page(q, 64, 1);
                unmap(q, 64);
            }
        }
        pid => pid,
    };
    unsafe { libc::close(go[0]) };
    let pages = mib * (1 << 20) / PAGE;
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    write_each_page(p, pages, 1);
    let figure = |scrape: &Scrape| {
        [
            scrape.sum("mapcount_events_lost_total", &[]),
            scrape.sum("mapcount_fork_folios_copied_total", &[]),
            scrape.sum("mapcount_fork_copy_seconds_sum", &[]),
            scrape.sum("mapcount_events_total", &[]),
        ]
    };
    // The daemon has taken the big mapping's records; then the faulting
    // process starts, and a second later the fork.
    metrics.settled_scrape()?;
    unsafe { libc::close(go[1]) };
    sleep(Duration::from_secs(1));
    let before = figure(&metrics.scrape()?);
    let started = Instant::now();
    // SAFETY: the child only waits to be killed.
    let child = match unsafe { libc::fork() } {
        0 => loop {
            unsafe { libc::pause() };
        },
        pid => pid,
    };
    let fork_ns = started.elapsed().as_nanos();
    // The daemon has copied the child's mappings once it has taken the
    // records of the second after the fork.
    sleep(Duration::from_secs(1));
    // SAFETY: our own children.
    unsafe {
        libc::kill(faulting, libc::SIGKILL);
        libc::waitpid(faulting, ptr::null_mut(), 0);
    }
    sleep(Duration::from_secs(1));
    let after = figure(&metrics.settled_scrape()?);
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, ptr::null_mut(), 0);
    }
    unmap(p, pages);
    println!(
        "MAPCOUNT-FORK-BIG mib={mib} pages={pages} fork_ms={:.1} folios_copied={} daemon_copy_ms={:.1} events={} lost={}",
        fork_ns as f64 / 1e6,
        after[1] - before[1],
        (after[2] - before[2]) * 1000.0,
        after[3] - before[3],
        after[0] - before[0],
    );
    Ok(())
}

/// Runs `command` and prints the milliseconds from exec to the first
/// successful GET of `/-/ready` at the metrics address; leaves it running.
pub(crate) fn time_ready(metrics: &MetricsSource, command: &[String]) -> ExitCode {
    let Some((program, rest)) = command.split_first() else {
        eprintln!("usage: mapcount-workload time-ready [--metrics HOST:PORT/PATH] -- PROGRAM ARGS...");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    // Not our stdout: a shell reading it through $(...) would wait for the daemon to exit.
    let child = std::process::Command::new(program).args(rest).stdout(std::process::Stdio::null()).spawn();
    let Ok(child) = child else {
        eprintln!("cannot run {program}");
        return ExitCode::FAILURE;
    };
    while started.elapsed() < Duration::from_secs(120) {
        if metrics.get("/-/ready").is_ok() {
            println!("MAPCOUNT-READY ms={} pid={}", started.elapsed().as_millis(), child.id());
            return ExitCode::SUCCESS;
        }
        sleep(Duration::from_millis(2));
    }
    println!("MAPCOUNT-READY ms=timeout pid={}", child.id());
    ExitCode::FAILURE
}

/// The daemon's final metrics against `mapcountd replay` of its record
/// file: every series derived from events must be identical.
pub(crate) fn compare(live: &str, replayed: &str) -> ExitCode {
    let read = |path: &str| std::fs::read_to_string(path).map(|t| Scrape::parse(&t));
    let (Ok(live), Ok(replayed)) = (read(live), read(replayed)) else {
        println!("MAPCOUNT-CHECK replay/identical_series known=0 reported=unreadable FAIL");
        return ExitCode::FAILURE;
    };
    // Not derived from events: attach state, build and kernel facts, the
    // kernel-side counters read at scrape time (losses, left-out calls), and
    // the daemon's own serving, recording and logging.
    let skip = [
        "mapcount_http_",
        "mapcount_record",
        "mapcount_log_lines_suppressed_total",
        "mapcount_probe_attached",
        "mapcount_build_info",
        "mapcount_kernel_info",
        "mapcount_events_lost_total",
        "mapcount_events_produced_total",
        "mapcount_rmap_calls_left_out_total",
        "mapcount_kernel_vmstat",
        "mapcount_exact_",
        "mapcount_fork_copy_seconds",
    ];
    // Cgroups are named from /proc at scrape time, which a replay cannot
    // do: per-cgroup series are compared as totals over cgroups.
    let derived = |s: &Scrape| -> Vec<(String, f64)> {
        let mut totals = std::collections::BTreeMap::<String, f64>::new();
        for (name, value) in s.0.iter().filter(|(name, _)| !skip.iter().any(|k| name.starts_with(k))) {
            *totals.entry(without_cgroup_label(name)).or_default() += value;
        }
        totals.into_iter().collect()
    };
    let live_scrape = live;
    let (live, replayed) = (derived(&live_scrape), derived(&replayed));
    // Histogram sums of fractional values (durations) are the same values
    // added in different groups: the daemon adds per scrape, replay once.
    // They may differ in the last bits; everything else must be exact.
    let same = |series: &str, a: f64, b: f64| {
        let name = series.split('{').next().unwrap_or(series);
        a == b || (name.ends_with("_sum") && (a - b).abs() <= 1e-9 * a.abs().max(b.abs()))
    };
    // A series at zero is the same as none: the daemon shows some counters
    // at zero from the start where the kernel can feed them (khugepaged
    // refusals), which a replay cannot know.
    let mut mismatches = 0;
    for (series, value) in &live {
        let other = replayed.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
        if !same(series, *value, other.unwrap_or(0.0)) {
            mismatches += 1;
            println!("MAPCOUNT-NOTE replay differs: {series} live={value} replay={other:?}");
        }
    }
    mismatches += replayed.iter().filter(|(s, v)| *v != 0.0 && !live.iter().any(|(l, _)| l == s)).count();
    let ok = mismatches == 0 && !live.is_empty();
    println!(
        "MAPCOUNT-CHECK replay/identical_series known={} reported={mismatches} accepted=0..=0 {}",
        live.len(),
        if ok { "PASS" } else { "FAIL" }
    );
    let exact_ok = exact_totals_match_events(&live_scrape);
    if ok && exact_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// With no event lost, the kernel side's exact totals and the counters the
/// daemon built from the events are the same series with the same values.
fn exact_totals_match_events(live: &Scrape) -> bool {
    let lost = live.sum("mapcount_events_lost_total", &[]);
    let pairs = ["rmap_calls_total", "rmap_pages_total", "cow_faults_total"];
    let series = |prefix: &str| -> Vec<(String, f64)> {
        let mut all: Vec<(String, f64)> = live
            .0
            .iter()
            .filter_map(|(series, value)| {
                let rest = series.strip_prefix(prefix)?;
                pairs.iter().any(|p| rest.starts_with(&format!("{p}{{"))).then(|| (rest.to_owned(), *value))
            })
            .filter(|(_, value)| *value != 0.0)
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    };
    let (exact, from_events) = (series("mapcount_exact_"), series("mapcount_"));
    let differing: Vec<_> = exact
        .iter()
        .filter(|e| !from_events.contains(e))
        .chain(from_events.iter().filter(|e| !exact.contains(e)))
        .collect();
    for (series, value) in differing.iter().take(10) {
        println!("MAPCOUNT-NOTE exact totals and events differ: {series} {value}");
    }
    if lost > 0.0 {
        println!("MAPCOUNT-NOTE exact totals not compared with the events: {lost} events lost");
        return true;
    }
    let ok = differing.is_empty() && !exact.is_empty();
    println!(
        "MAPCOUNT-CHECK exact/equal_to_event_counters known={} reported={} accepted=0..=0 {}",
        exact.len(),
        differing.len(),
        if ok { "PASS" } else { "FAIL" }
    );
    ok
}

/// A `mapcount_cgroup_*` series without its `cgroup` label.
fn without_cgroup_label(series: &str) -> String {
    let Some(start) = series.find("cgroup=\"").filter(|_| series.starts_with("mapcount_cgroup_")) else {
        return series.to_owned();
    };
    let value = start + "cgroup=\"".len();
    let end = series[value..].find('"').map_or(series.len(), |e| value + e + 1);
    let rest = &series[end..];
    format!("{}{}", &series[..start], rest.strip_prefix(',').unwrap_or(rest))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cgroup_labels_are_dropped() {
        assert_eq!(
            super::without_cgroup_label(
                r#"mapcount_cgroup_memory_bytes{cgroup="/a,b",figure="pss",model="exact"}"#
            ),
            r#"mapcount_cgroup_memory_bytes{figure="pss",model="exact"}"#
        );
        let other = r#"mapcount_folios{kind="anon",order="0"}"#;
        assert_eq!(super::without_cgroup_label(other), other);
    }
}
