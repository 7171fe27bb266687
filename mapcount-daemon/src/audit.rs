//! `mapcountd audit`: the kernel's maybe-shared guesses against the exact
//! answer, and what smaps would report per cgroup without per-page
//! mapcounts, as short tables, from a daemon's `/metrics` text (see
//! [`crate::maybe_shared`], [`crate::smaps`] and docs/audit.md).

use std::collections::HashMap;

use mapcount_common::{PSS_SHIFT, SmapsFigures};

use crate::{cgroups, exposition::samples, maybe_shared::Heuristic};

#[derive(Clone, Copy, Default)]
struct Row {
    shared: f64,
    wrongly_shared: f64,
    missed: f64,
    undecided: f64,
    wrong_bytes: f64,
}

fn kernels(heuristic: Heuristic) -> &'static str {
    match heuristic {
        Heuristic::Page0Mapcount => "6.3-6.9",
        Heuristic::LikelyMappedShared => "6.10-6.14",
        Heuristic::MmIdSlots => "6.15+",
    }
}

/// What the kernel's own `smaps_rollup` says, summed per cgroup over
/// this host's processes (`mapcountd audit --kernel`, run as root).
/// Processes that go away while they are read are left out.
pub fn kernel_rollups() -> HashMap<String, SmapsFigures> {
    let mut by_cgroup: HashMap<String, SmapsFigures> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return by_cgroup };
    for tgid in entries.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        let (Some(cgroup), Ok(text)) =
            (cgroups::read(tgid), std::fs::read_to_string(format!("/proc/{tgid}/smaps_rollup")))
        else {
            continue;
        };
        by_cgroup.entry(cgroup).or_default().add(&SmapsFigures::from_smaps_rollup(&text));
    }
    by_cgroup
}

/// The report for a daemon's metrics text; with `kernel` (from
/// [`kernel_rollups`]), the cgroup table shows the kernel's own figures too.
pub fn report(metrics: &str, kernel: Option<&HashMap<String, SmapsFigures>>) -> String {
    let mut rows: HashMap<&str, Row> = HashMap::new();
    let mut truth = [0.0f64; 2]; // exclusive, shared (counted once, from one heuristic)
    let (mut agree, mut differ, mut checked) = (0.0, 0.0, false);
    // khugepaged refusals by truth: exclusive, shared, unknown or unnamed;
    // None unwatched.
    let mut refusals: Option<[f64; 3]> = None;
    let reference = Heuristic::MmIdSlots.label();
    for s in samples(metrics) {
        let heuristic = s.label("heuristic").unwrap_or("");
        match s.name {
            "mapcount_maybe_shared_folios" => {
                let truly_shared = s.label("truth") == Some("shared");
                if heuristic == reference {
                    truth[usize::from(truly_shared)] += s.value;
                }
                let row = rows.entry(heuristic).or_default();
                match s.label("verdict") {
                    Some("shared") => {
                        row.shared += s.value;
                        if !truly_shared {
                            row.wrongly_shared += s.value;
                        }
                    }
                    Some("exclusive") if truly_shared => row.missed += s.value,
                    Some("undecided") => row.undecided += s.value,
                    _ => {}
                }
            }
            "mapcount_maybe_shared_false_positive_bytes" => {
                rows.entry(heuristic).or_default().wrong_bytes += s.value;
            }
            "mapcount_khugepaged_shared_pte_refusals_total" => {
                let counts = refusals.get_or_insert([0.0; 3]);
                match s.label("truth") {
                    Some("exclusive") => counts[0] += s.value,
                    Some("shared") => counts[1] += s.value,
                    _ => counts[2] += s.value,
                }
            }
            "mapcount_maybe_shared_bit_checks_total" => {
                checked = true;
                match s.label("result") {
                    Some("agree") => agree += s.value,
                    Some("differ") => differ += s.value,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let mut cgroups: HashMap<&str, HashMap<(&str, &str), f64>> = HashMap::new();
    for s in samples(metrics).filter(|s| s.name == "mapcount_cgroup_memory_bytes") {
        let label = |name| s.label(name).unwrap_or("");
        *cgroups.entry(label("cgroup")).or_default().entry((label("figure"), label("model"))).or_default() +=
            s.value;
    }
    let mut out = format!(
        "Live large folios whose every mapping mapcountd placed: {:.0} ({:.0} mapped by two or more address spaces, {:.0} by one).\n\n",
        truth[0] + truth[1],
        truth[1],
        truth[0]
    );
    out.push_str(&format!(
        "{:<40} {:>8} {:>8} {:>11} {:>7} {:>10}\n",
        "guess (kernels)", "shared", "wrongly", "wrong MiB", "missed", "undecided"
    ));
    for heuristic in Heuristic::ALL {
        let row = rows.get(heuristic.label()).copied().unwrap_or_default();
        out.push_str(&format!(
            "{:<40} {:>8.0} {:>8.0} {:>11.1} {:>7.0} {:>10.0}\n",
            format!("{} ({})", heuristic.label(), kernels(heuristic)),
            row.shared,
            row.wrongly_shared,
            row.wrong_bytes / f64::from(1u32 << 20),
            row.missed,
            row.undecided
        ));
    }
    out.push_str(
        "\nshared: folios the guess calls shared; wrongly: of those, mapped by one address space;\n\
         missed: mapped by several, called exclusive; undecided: the table cannot tell how\n\
         the first page is mapped (docs/audit.md).\n",
    );
    out.push_str(&if checked {
        format!(
            "\nThe kernel's own maybe-shared bit against the simulation: {agree:.0} events agree, {differ:.0} differ{}.\n",
            if differ > 0.0 { " (a missed event or a wrong simulation)" } else { "" }
        )
    } else {
        "\nThis kernel keeps no maybe-shared bit (before 6.15): the 6.15+ row is a simulation only.\n".to_owned()
    });
    if let Some([exclusive, shared, unknown]) = refusals {
        out.push_str(&format!(
            "\nkhugepaged ranges refused for shared PTEs: {:.0}; at a folio one address space maps: {exclusive:.0}, \
             several: {shared:.0}, not known or not named: {unknown:.0}.\n",
            exclusive + shared + unknown
        ));
    }
    out.push_str(&cgroup_table(&cgroups, kernel));
    out
}

/// PSS and USS per cgroup, exact and as a kernel without per-page
/// mapcounts estimates them, in MiB; the cgroups that map most first.
/// With the kernel's own figures, those of cgroups the daemon does not
/// list go to `other`, as the daemon's own do.
fn cgroup_table(
    cgroups: &HashMap<&str, HashMap<(&str, &str), f64>>,
    kernel: Option<&HashMap<String, SmapsFigures>>,
) -> String {
    if cgroups.is_empty() {
        return String::new();
    }
    let mut kernel_by_row: HashMap<&str, SmapsFigures> = HashMap::new();
    for (cgroup, figures) in kernel.into_iter().flatten() {
        let row = cgroups.get_key_value(cgroup.as_str()).map_or("other", |(name, _)| *name);
        kernel_by_row.entry(row).or_default().add(figures);
    }
    let mut rows: Vec<_> = cgroups.iter().collect();
    let figure = |values: &HashMap<(&str, &str), f64>, figure, model| {
        values.get(&(figure, model)).copied().unwrap_or(0.0) / f64::from(1u32 << 20)
    };
    rows.sort_by(|a, b| {
        figure(b.1, "rss", "exact").total_cmp(&figure(a.1, "rss", "exact")).then(a.0.cmp(b.0))
    });
    let mut out = format!(
        "\nWhat smaps reports per cgroup (MiB): exact, and estimated without per-page mapcounts\n\
         (CONFIG_NO_PAGE_MAPCOUNT: PSS from the folio's average mapcount, USS from the maybe-shared bit){}.\n\
         {:<32} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>12}{}\n",
        if kernel.is_some() {
            ";\nkernel: what this kernel's smaps_rollup says, over all of the cgroup's processes"
        } else {
            ""
        },
        "cgroup",
        "Rss",
        "PSS",
        "estimate",
        "error",
        "USS",
        "estimate",
        "error",
        "undetermined",
        if kernel.is_some() { format!(" {:>10} {:>10}", "kernel PSS", "kernel USS") } else { String::new() }
    );
    for (cgroup, values) in rows {
        let (pss, pss_estimate) = (figure(values, "pss", "exact"), figure(values, "pss", "no_page_mapcount"));
        let (uss, uss_estimate) =
            (figure(values, "private", "exact"), figure(values, "private", "no_page_mapcount"));
        let kernel_columns = match (kernel, kernel_by_row.get(*cgroup)) {
            (None, _) => String::new(),
            (Some(_), None) => format!(" {:>10.2} {:>10.2}", 0.0, 0.0),
            (Some(_), Some(figures)) => format!(
                " {:>10.2} {:>10.2}",
                (figures.pss_shifted >> PSS_SHIFT) as f64 / f64::from(1u32 << 20),
                figures.private_bytes as f64 / f64::from(1u32 << 20)
            ),
        };
        out.push_str(&format!(
            "{:<32} {:>9.2} {:>9.2} {:>9.2} {:>+8.2} {:>9.2} {:>9.2} {:>+8.2} {:>12.2}{kernel_columns}\n",
            cgroup,
            figure(values, "rss", "exact"),
            pss,
            pss_estimate,
            pss_estimate - pss,
            uss,
            uss_estimate,
            uss_estimate - uss,
            figure(values, "undetermined", "exact")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mapcount_common::{
        Event, EventType, FolioKind, ForkEvent, Level, RmapOp, ScanRefusalEvent, event_flags, fork_copy,
        shared_hint,
    };

    use super::*;
    use crate::{aggregate::Aggregator, decode::Decoded, metrics::Metrics};

    /// Scenario p's folio through the aggregator: the report counts the
    /// one false positive of the two-slot bit, and the kernel's bit checks.
    #[test]
    fn reports_the_two_slot_false_positive() {
        let metrics = Arc::new(Metrics::new());
        let mut aggregator = Aggregator::new(Arc::clone(&metrics), 16);
        let rmap = |op: RmapOp, mm: u64, nr: u32, mapcount: i32, hint: u8| {
            let mut raw = Event::ZERO;
            raw.event_type = EventType::Rmap as u8;
            raw.op = op as u8;
            raw.level = Level::Pte as u8;
            raw.kind = FolioKind::Anon as u8;
            raw.order = 4;
            raw.folio = 0xffff_ea00_0010_0000;
            raw.mm = mm;
            raw.base = 0x7f00_0000_0000;
            raw.nr_pages = nr;
            raw.mapcount = mapcount;
            raw.shared_hint = hint;
            raw.flags = event_flags::OWN_MM;
            Decoded::Rmap { op, level: Level::Pte, kind: FolioKind::Anon, raw }
        };
        aggregator.apply(&rmap(RmapOp::AddNew, 1, 16, 15, shared_hint::EXCLUSIVE));
        for child in [2, 3] {
            aggregator.apply(&Decoded::Fork(ForkEvent {
                event_type: EventType::Fork as u8,
                copy: fork_copy::ENTRIES | fork_copy::HUGE_ENTRIES,
                _pad: [0; 6],
                src_mm: 1,
                start: 0x7f00_0000_0000,
                dst_mm: child,
                end: 0x7f00_0020_0000,
                timestamp_ns: 0,
                tgid: 0,
                cpu: 0,
            }));
        }
        aggregator.apply(&rmap(RmapOp::Remove, 1, 16, 47, shared_hint::MAYBE_SHARED));
        aggregator.apply(&rmap(RmapOp::Remove, 2, 16, 31, shared_hint::MAYBE_SHARED));
        // khugepaged (max_ptes_shared 0) refuses the survivor's range there.
        aggregator.apply(&Decoded::ScanRefusal(ScanRefusalEvent {
            event_type: EventType::ScanRefusal as u8,
            _pad: [0; 3],
            cpu: 0,
            mm: 3,
            folio: 0xffff_ea00_0010_0000,
            timestamp_ns: 0,
        }));
        aggregator.publish_metrics();
        let text = report(&metrics.render(), None);
        let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).unwrap_or("").to_owned();
        assert!(
            text.starts_with("Live large folios whose every mapping mapcountd placed: 1 (0 mapped by two"),
            "{text}"
        );
        let fields: Vec<String> =
            line("folio_maybe_mapped_shared").split_whitespace().map(str::to_owned).collect();
        // name, (6.15+), shared, wrongly, MiB, missed, undecided
        assert_eq!(fields[2..], ["1", "1", "0.1", "0", "0"], "{text}");
        assert!(text.contains("3 events agree, 0 differ."), "{text}");
        assert!(text.contains("refused for shared PTEs: 1; at a folio one address space maps: 1,"), "{text}");
        // The address space left holds 64 KiB, private in truth, shared
        // by the bit: USS 0.06 MiB exact, 0 estimated.
        let fields: Vec<String> = line("unknown").split_whitespace().map(str::to_owned).collect();
        assert_eq!(fields[1..], ["0.06", "0.06", "0.06", "+0.00", "0.06", "0.00", "-0.06", "0.00"], "{text}");
    }

    /// The kernel's own figures go to the daemon's row of their cgroup,
    /// or to `other`.
    #[test]
    fn kernel_columns_follow_the_daemon_rows() {
        let mib = 1u64 << 20;
        let daemon =
            |pss: f64| HashMap::from([(("rss", "exact"), 4.0 * mib as f64), (("pss", "exact"), pss)]);
        let cgroups = HashMap::from([("/a", daemon(2.0 * mib as f64)), ("other", daemon(1.0 * mib as f64))]);
        let kernel_figures = |pss: u64, private: u64| SmapsFigures {
            pss_shifted: pss << PSS_SHIFT,
            private_bytes: private,
            ..SmapsFigures::default()
        };
        let kernel = HashMap::from([
            ("/a".to_owned(), kernel_figures(2 * mib, mib)),
            ("/b".to_owned(), kernel_figures(mib, mib)),
            ("/c".to_owned(), kernel_figures(mib, 0)),
        ]);
        let text = cgroup_table(&cgroups, Some(&kernel));
        let row = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(row("/a")[9..], ["2.00", "1.00"], "{text}");
        assert_eq!(row("other")[9..], ["2.00", "1.00"], "{text}");
        assert!(!cgroup_table(&cgroups, None).contains("kernel"));
    }
}
