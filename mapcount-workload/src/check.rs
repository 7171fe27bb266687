//! `check`: every scenario once, one `MAPCOUNT-CHECK` line per comparison
//! (parsed by `cargo xtask test`).

use std::process::ExitCode;

use crate::{
    checker::Checker,
    demo::{
        ANON_PAGES, COW_PAGES, FILE_PAGES, SHARED_PAGES, ZERO_PAGES, run_anon, run_file, run_fork_cow,
        run_shared, run_zero_page,
    },
    metrics::{MetricsSource, Scrape},
};

/// The daemon and the shell fault pages of their own while a scenario runs;
/// the guest runs nothing else, so a margin this size separates that noise
/// from double counting.
pub(crate) fn noise_margin(known: usize) -> f64 {
    (known as f64 / 4.0).max(64.0)
}

pub(crate) fn check(metrics: &MetricsSource, scratch: &str, expect_mode: &str) -> ExitCode {
    let mut checker = Checker::default();
    let result = (|| -> anyhow::Result<()> {
        let base = metrics.settled_scrape()?;
        for probe in [
            "anon_add_ptes",
            "anon_add_new",
            "file_add_ptes",
            "remove_ptes",
            "write_fault",
            "write_fault_return",
        ] {
            let mut labels = vec![("probe", probe)];
            if expect_mode != "auto" {
                labels.push(("mode", expect_mode));
            }
            let attached = base.sum("mapcount_probe_attached", &labels);
            checker.range(&format!("probe_attached/{probe}"), 1, attached, 1.0, 1.0);
        }

        let delta = |before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]| {
            after.sum(name, labels) - before.sum(name, labels)
        };
        let mut expect = |name: &str,
                          known: usize,
                          before: &Scrape,
                          after: &Scrape,
                          metric: &str,
                          labels: &[(&str, &str)]| {
            let reported = delta(before, after, metric, labels);
            checker.range(name, known, reported, known as f64, known as f64 + noise_margin(known));
        };

        run_anon(ANON_PAGES);
        let after = metrics.settled_scrape()?;
        let new_anon = [("op", "add_new"), ("kind", "anon"), ("order", "0")];
        expect("anon/new_pages", ANON_PAGES, &base, &after, "mapcount_rmap_pages_total", &new_anon);
        let removed = [("op", "remove"), ("kind", "anon"), ("order", "0")];
        expect("anon/removed_pages", ANON_PAGES, &base, &after, "mapcount_rmap_pages_total", &removed);

        let before = after;
        run_file(scratch, FILE_PAGES);
        let after = metrics.settled_scrape()?;
        expect(
            "file/mapped_pages",
            FILE_PAGES,
            &before,
            &after,
            "mapcount_rmap_pages_total",
            &[("op", "add"), ("kind", "file")],
        );
        expect(
            "file/unmapped_pages",
            FILE_PAGES,
            &before,
            &after,
            "mapcount_rmap_pages_total",
            &[("op", "remove"), ("kind", "file")],
        );

        let before = after;
        run_fork_cow(COW_PAGES);
        let after = metrics.settled_scrape()?;
        expect(
            "cow/child_copies",
            COW_PAGES,
            &before,
            &after,
            "mapcount_cow_faults_total",
            &[("outcome", "copy")],
        );
        expect(
            "cow/parent_reuses",
            COW_PAGES,
            &before,
            &after,
            "mapcount_cow_faults_total",
            &[("outcome", "reuse")],
        );

        let before = after;
        run_zero_page(ZERO_PAGES);
        let after = metrics.settled_scrape()?;
        expect(
            "cow/zero_page_copies",
            ZERO_PAGES,
            &before,
            &after,
            "mapcount_cow_faults_total",
            &[("outcome", "copy_zero_page")],
        );

        let before = after;
        run_shared(SHARED_PAGES);
        let after = metrics.settled_scrape()?;
        expect(
            "cow/shared_mapping_faults",
            SHARED_PAGES,
            &before,
            &after,
            "mapcount_cow_faults_total",
            &[("outcome", "shared")],
        );

        crate::scenarios::run_all(metrics, &mut checker, &base)?;

        let after = metrics.settled_scrape()?;
        let lost = after.sum("mapcount_events_lost_total", &[]);
        checker.range("daemon/events_lost", 0, lost, 0.0, 0.0);
        let undecodable = after.sum("mapcount_events_undecodable_total", &[]);
        checker.range("daemon/events_undecodable", 0, undecodable, 0.0, 0.0);
        Ok(())
    })();
    if let Err(e) = result {
        println!("MAPCOUNT-CHECK workload known=0 reported=error:{e} FAIL");
        checker.failed += 1;
    }
    println!("MAPCOUNT-SUMMARY {} passed, {} failed", checker.passed, checker.failed);
    if checker.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
