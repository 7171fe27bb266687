//! b. Half of a THP unmapped: one partially mapped order-9 folio; on
//! kernels with anonymous mTHP, 3 pages of a 64 KiB folio dropped: one
//! partially mapped order-4 folio. The kernel's answers: which of the
//! folio's frames pagemap still shows mapped (the rest is what a kernel
//! without per-page mapcounts still counts in AnonPages, and what a
//! deferred split would free), and, where the kernel keeps it (6.12+),
//! its own count of partially mapped folios of that size.

use std::{fs, ptr};

use super::{THP, map_64k_folio, map_thp_aligned, my_pid};
use crate::{
    checker::Checker,
    kernel::{is_thp, pfn},
    memory::{PAGE, unmap},
    metrics::{MetricsSource, Scrape},
};

pub(super) fn partial(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let p = map_thp_aligned(THP);
    unsafe { ptr::write_volatile(p, 1) };
    if !is_thp(p as usize)? {
        checker.not_applicable("b_partial", "the kernel gave no THP");
        unmap(p, THP / PAGE);
        return Ok(());
    }
    let first_frame = pfn(p as usize)?;
    let before = Snapshot::take(metrics, "2048kB", "9")?;
    unmap(unsafe { p.add(THP / 2) }, THP / 2 / PAGE);
    let after = Snapshot::take(metrics, "2048kB", "9")?;
    let rows = metrics.folios_of(my_pid())?;
    let partial9 = rows.iter().filter(|r| r.kind == "anon" && r.order == 9 && r.partial).count();
    // 6.1-6.7 split the PMD inline, without an rmap call: the table
    // infers it at the first PTE remove.
    checker.exact("b_partial/order9_partially_mapped", 1, partial9 as f64);
    let unmapped = THP - mapped_pages(p, THP / PAGE, first_frame)? * PAGE;
    after.compare(&before, checker, "b_partial/order9", unmapped);
    unmap(p, THP / 2 / PAGE);

    let Some(q) = map_64k_folio(checker, "b_partial/order4_partially_mapped", 1)? else { return Ok(()) };
    let first_frame = pfn(q as usize)?;
    let before = Snapshot::take(metrics, "64kB", "4")?;
    unsafe { libc::madvise(q.cast(), 3 * PAGE, libc::MADV_DONTNEED) };
    let after = Snapshot::take(metrics, "64kB", "4")?;
    let rows = metrics.folios_of(my_pid())?;
    let partial4 = rows.iter().filter(|r| r.kind == "anon" && r.order == 4 && r.partial).count();
    checker.exact("b_partial/order4_partially_mapped", 1, partial4 as f64);
    let unmapped = 16 * PAGE - mapped_pages(q, 16, first_frame)? * PAGE;
    after.compare(&before, checker, "b_partial/order4", unmapped);
    unmap(q, 16);
    Ok(())
}

/// Pages of the folio whose frames start at `first_frame` that pagemap
/// shows mapped among the `pages` from `start`.
fn mapped_pages(start: *mut u8, pages: usize, first_frame: u64) -> anyhow::Result<usize> {
    let frames = first_frame..first_frame + pages as u64;
    Ok((0..pages).filter(|i| pfn(start as usize + i * PAGE).is_ok_and(|f| frames.contains(&f))).count())
}

/// mapcountd's unmapped bytes and partially mapped folios of one order,
/// and the kernel's own count of partially mapped folios of that size.
struct Snapshot {
    scrape: Scrape,
    order: &'static str,
    kernel_partially_mapped: Option<u64>,
}

impl Snapshot {
    fn take(metrics: &MetricsSource, size: &str, order: &'static str) -> anyhow::Result<Snapshot> {
        let scrape = metrics.settled_scrape()?;
        let path =
            format!("/sys/kernel/mm/transparent_hugepage/hugepages-{size}/stats/nr_anon_partially_mapped");
        let kernel_partially_mapped = fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok());
        Ok(Snapshot { scrape, order, kernel_partially_mapped })
    }

    fn compare(&self, before: &Snapshot, checker: &mut Checker, name: &str, unmapped_bytes: usize) {
        let labels = [("kind", "anon"), ("order", self.order)];
        let gauge = |s: &Snapshot, metric: &str| s.scrape.sum(metric, &labels);
        let unmapped = "mapcount_partially_mapped_unmapped_bytes";
        checker.exact(
            &format!("{name}_unmapped_bytes"),
            unmapped_bytes,
            gauge(self, unmapped) - gauge(before, unmapped),
        );
        let partially = "mapcount_folios_partially_mapped";
        match (before.kernel_partially_mapped, self.kernel_partially_mapped) {
            (Some(then), Some(now)) => checker.exact(
                &format!("{name}_kernel_partially_mapped"),
                (now as i64 - then as i64).max(0) as usize,
                gauge(self, partially) - gauge(before, partially),
            ),
            _ => checker.not_applicable(
                &format!("{name}_kernel_partially_mapped"),
                "the kernel keeps no count of partially mapped folios (before 6.12)",
            ),
        }
    }
}
