//! `cargo xtask soak`: overload in the VM, a fork/mmap storm against a small ring buffer.

use std::path::Path;

use crate::{
    checks::Tally,
    kernels, vm,
    workspace::{build_binaries, cache_dir},
};

/// The overload run inside `cargo xtask test`; `cargo xtask soak` runs longer.
pub const OVERLOAD_SECONDS_IN_TEST: u64 = 60;

/// Overload: the daemon keeps serving, counts every lost event, stays
/// within its folio-table bound, and its RSS stops growing.
pub fn soak(bin: &Path, kernel: &kernels::Kernel, seconds: u64, tally: &mut Tally) -> anyhow::Result<()> {
    let image = vm::Image::build(bin, kernel, vm::Mode::Soak, vm::Extra::default())?;
    let boot = vm::Boot { soak_seconds: seconds, ..vm::Boot::new("auto", seconds + 300) };
    let output = vm::boot(kernel, &image, boot)?;
    let log = cache_dir().join(format!("vm-soak-{}.log", kernel.name));
    std::fs::write(&log, &output)?;
    let samples = vm::parse_soak(&output);
    println!("\noverload on {} for {seconds} s (console log {}):", kernel.name, log.display());
    println!("  {:>5} {:>8} {:>7} {:>12} {:>12} {:>8}", "t", "rss_kb", "scrape", "events", "lost", "entries");
    for s in &samples {
        println!(
            "  {:>5} {:>8} {:>7} {:>12} {:>12} {:>8}",
            s.seconds, s.rss_kb, s.scrape_ok, s.events, s.lost, s.entries
        );
    }
    let check = |tally: &mut Tally, name: &str, ok: bool, detail: String| {
        println!("  {name}: {} ({detail})", if ok { "passed" } else { "FAILED" });
        tally.add(ok);
    };
    check(tally, "overload/samples", samples.len() >= 3, format!("{} samples", samples.len()));
    check(
        tally,
        "overload/serving_throughout",
        !samples.is_empty() && samples.iter().all(|s| s.scrape_ok),
        "every scrape answered".into(),
    );
    let last = samples.last();
    check(
        tally,
        "overload/losses_counted",
        last.is_some_and(|s| s.lost > 0),
        format!("{} lost events counted", last.map_or(0, |s| s.lost)),
    );
    check(
        tally,
        "overload/table_bounded",
        samples.iter().all(|s| s.entries <= 20000),
        "entries <= 20000".into(),
    );
    // RSS flat: after the first third of the run, it grows by at most 10%.
    let settled = samples.get(samples.len() / 3).map_or(0, |s| s.rss_kb);
    let peak = samples.iter().skip(samples.len() / 3).map(|s| s.rss_kb).max().unwrap_or(0);
    check(
        tally,
        "overload/rss_flat",
        settled > 0 && peak * 10 <= settled * 11,
        format!("{settled} kB after warm-up, {peak} kB at most"),
    );
    // THPs mapped and copied while the ring buffer overflows: the kernel
    // side's exact totals against the kernel's page maps.
    // With small folios sampled: the kernel side keeps the events of the others.
    for line in
        output.lines().filter(|l| l.starts_with("MAPCOUNT-EXACT ") || l.starts_with("MAPCOUNT-SAMPLING "))
    {
        println!("  {line}");
    }
    let exact: Vec<_> = vm::parse_checks(&output)
        .into_iter()
        .filter(|c| c.name.starts_with("exact/") || c.name.starts_with("sampling/"))
        .collect();
    check(tally, "overload/exact_totals_ran", !exact.is_empty(), format!("{} checks", exact.len()));
    for c in exact {
        check(
            tally,
            &c.name,
            c.passed,
            format!("known {}, reported {}, accepted {}", c.known, c.reported, c.accepted),
        );
    }
    let accounting = vm::Accounting::parse(&output);
    let balance = accounting.check("overload/balanced_per_cpu");
    check(tally, "overload/balanced_per_cpu", balance.passed, balance.reported);
    let exit_ok = output.contains("MAPCOUNT-DAEMON-EXIT 0");
    check(tally, "overload/clean_exit", exit_ok, "SIGTERM -> exit 0".into());
    Ok(())
}

pub fn command(minutes: u64, kernel: &str) -> anyhow::Result<()> {
    let bin = build_binaries()?;
    let kernel = kernels::fetch(kernels::find(kernel)?)?;
    let mut tally = Tally::default();
    soak(&bin, &kernel, minutes * 60, &mut tally)?;
    tally.result("soak")
}
