//! The seed's questions answered in a dozen lines, from one scrape: the
//! end-of-run report of `cargo xtask run`, `mapcountd report` against a
//! live daemon and `mapcountd replay --report` for a record file. Counters
//! say what happened over the whole run; gauges only what is mapped now.

use std::fmt::Write as _;

use crate::exposition::Scrape;

/// `1234567` as `1,234,567` (counts are whole numbers).
pub fn count(value: f64) -> String {
    // Negative and -0 (from subtracting) show as 0.
    let digits = format!("{:.0}", if value > 0.0 { value } else { 0.0 });
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in the largest binary unit that keeps a whole part.
pub fn bytes(value: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = if value > 0.0 { value } else { 0.0 };
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{value:.0} B") } else { format!("{value:.1} {}", units[unit]) }
}

/// `rows` as `name value, name value`, largest first, zeros left out.
fn breakdown(rows: impl IntoIterator<Item = (String, f64)>) -> String {
    let mut rows: Vec<_> = rows.into_iter().filter(|(_, v)| *v > 0.0).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    rows.iter().map(|(name, value)| format!("{name} {}", count(*value))).collect::<Vec<_>>().join(", ")
}

/// Folios of the `mapcount_folio_sharers` histogram observed with at least
/// two address spaces mapping them at once, and all it observed.
pub fn folios_that_were_shared(scrape: &Scrape) -> (f64, f64) {
    let all = scrape.sum("mapcount_folio_sharers_count", &[]);
    let one = scrape.sum("mapcount_folio_sharers_bucket", &[("le", "1")]);
    (all - one, all)
}

/// Attached probes, probes asked for, and the attach modes in use.
pub fn probes(scrape: &Scrape) -> (usize, usize, Vec<String>) {
    let series = scrape.series("mapcount_probe_attached");
    let attached: Vec<_> = series.iter().filter(|(_, v)| *v >= 1.0).collect();
    let mut modes: Vec<String> = attached
        .iter()
        .filter_map(|(labels, _)| labels.iter().find(|(k, _)| k == "mode").map(|(_, v)| v.clone()))
        .collect();
    modes.sort();
    modes.dedup();
    (attached.len(), series.len(), modes)
}

pub fn report(scrape: &Scrape) -> String {
    let mut out = String::new();
    let release = scrape
        .series("mapcount_kernel_info")
        .into_iter()
        .find_map(|(labels, _)| labels.into_iter().find(|(k, _)| k == "release").map(|(_, v)| v));
    let (attached, asked, modes) = probes(scrape);
    let probes = if asked == 0 {
        "probes not recorded".to_owned()
    } else {
        format!("{attached} of {asked} probes attached ({})", modes.join(", "))
    };
    let _ = writeln!(out, "mapcount report: kernel {}, {probes}", release.as_deref().unwrap_or("unknown"));

    let (were_shared, went) = folios_that_were_shared(scrape);
    let _ = writeln!(
        out,
        "  sharing      {} of {} folios that went were mapped by 2+ address spaces at once; now {} of {} live folios are shared",
        count(were_shared),
        count(went),
        count(scrape.sum("mapcount_folios_shared", &[])),
        count(scrape.sum("mapcount_folios", &[])),
    );

    let outcomes = scrape.by("mapcount_cow_faults_total", &["outcome"]);
    let faults: f64 = outcomes.values().sum();
    let _ = writeln!(
        out,
        "  write faults {} on write-protected pages: {}",
        count(faults),
        if faults > 0.0 {
            breakdown(outcomes.into_iter().map(|(k, v)| (k.concat(), v)))
        } else {
            "none".to_owned()
        }
    );
    let reasons = breakdown(
        scrape.by("mapcount_cow_copy_reasons_total", &["reason"]).into_iter().map(|(k, v)| (k.concat(), v)),
    );
    if !reasons.is_empty() {
        let _ = writeln!(out, "               copied because: {reasons}");
    }
    let needless = scrape.sum("mapcount_cow_copies_of_exclusive_large_folios_total", &[]);
    if needless > 0.0 {
        let _ = writeln!(
            out,
            "               {} copies of large folios only the faulting address space mapped",
            count(needless)
        );
    }

    let partial = scrape.by("mapcount_folios_ever_partially_mapped_total", &["kind"]);
    let _ = writeln!(
        out,
        "  statistics   {} large folios were partially mapped{}; now {} of mapped large folios is in no page table",
        count(partial.values().sum()),
        match breakdown(partial.into_iter().map(|(k, v)| (k.concat(), v))) {
            kinds if kinds.is_empty() => String::new(),
            kinds => format!(" ({kinds})"),
        },
        bytes(scrape.sum("mapcount_partially_mapped_unmapped_bytes", &[])),
    );
    let wrong = scrape.by("mapcount_maybe_shared_false_positive_bytes", &["heuristic"]);
    if !wrong.is_empty() {
        let _ = writeln!(
            out,
            "               maybe-shared guesses wrong now: {}",
            wrong.iter().map(|(h, v)| format!("{} {}", h.concat(), bytes(*v))).collect::<Vec<_>>().join(", ")
        );
    }

    let refcount = scrape.max("mapcount_folio_refcount_max").unwrap_or(0.0);
    let _ = writeln!(
        out,
        "  refcount     highest folio refcount {}: {:.6}% of the 2^31 limit",
        count(refcount),
        scrape.max("mapcount_refcount_headroom_ratio").unwrap_or(0.0) * 100.0,
    );

    let sources = scrape.by("mapcount_nomapping_pages_mapped_total", &["source"]);
    let _ = writeln!(
        out,
        "  no mapping   {} pages without folio->mapping mapped to user space{}",
        count(sources.values().sum()),
        if sources.values().any(|v| *v > 0.0) {
            format!(": {}", breakdown(sources.into_iter().map(|(k, v)| (k.concat(), v))))
        } else {
            String::new()
        }
    );

    let _ = writeln!(
        out,
        "  forks        {} VMAs copied by fork",
        count(scrape.sum("mapcount_forks_total", &[]))
    );
    let lost = scrape.sum("mapcount_events_lost_total", &[]);
    let disagreements = scrape.sum("mapcount_mapcount_disagreements_total", &[]);
    let _ = writeln!(
        out,
        "  exactness    {} events taken, {} lost, {} disagreements with the kernel's mapcount{}",
        count(scrape.sum("mapcount_events_total", &[])),
        count(lost),
        count(disagreements),
        if lost > 0.0 || disagreements > 0.0 { ": the figures above are not exact" } else { "" },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_counts_and_bytes() {
        assert_eq!(count(0.0), "0");
        assert_eq!(count(999.0), "999");
        assert_eq!(count(1000.0), "1,000");
        assert_eq!(count(1234567.0), "1,234,567");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(2.0 * 1024.0 * 1024.0), "2.0 MiB");
    }

    #[test]
    fn answers_from_a_scrape() {
        let text = "mapcount_kernel_info{release=\"7.3.0-1-amd64\"} 1\n\
            mapcount_probe_attached{function=\"a\",mode=\"fentry\",probe=\"a\"} 1\n\
            mapcount_probe_attached{function=\"b\",mode=\"none\",probe=\"b\"} 0\n\
            mapcount_folio_sharers_bucket{kind=\"anon\",le=\"1\"} 10\n\
            mapcount_folio_sharers_bucket{kind=\"anon\",le=\"2\"} 14\n\
            mapcount_folio_sharers_count{kind=\"anon\"} 16\n\
            mapcount_cow_faults_total{kind=\"anon\",order=\"0\",outcome=\"copy\"} 3000\n\
            mapcount_cow_faults_total{kind=\"anon\",order=\"0\",outcome=\"reuse\"} 5\n\
            mapcount_cow_copy_reasons_total{reason=\"mapped_elsewhere\"} 3000\n\
            mapcount_folio_refcount_max{kind=\"anon\",order=\"0\"} 5\n\
            mapcount_events_lost_total{reason=\"ring_buffer_full\"} 2\n";
        let report = report(&Scrape::new(text.to_owned()));
        assert!(report.contains("kernel 7.3.0-1-amd64, 1 of 2 probes attached (fentry)"), "{report}");
        assert!(report.contains("6 of 16 folios that went"), "{report}");
        assert!(report.contains("3,005 on write-protected pages: copy 3,000, reuse 5"), "{report}");
        assert!(report.contains("copied because: mapped_elsewhere 3,000"), "{report}");
        assert!(report.contains("highest folio refcount 5"), "{report}");
        assert!(report.contains("2 lost"), "{report}");
        assert!(report.contains("not exact"), "{report}");
    }
}
