//! c (large folios). A 64 KiB folio that only the parent maps after its
//! child exits: reused since 6.15, copied before.

use std::{fs, ptr};

use super::{Waiters, at_least, map_thp_aligned, sysfs_write};
use crate::{
    checker::Checker,
    kernel::{is_thp, pfn},
    memory::{unmap, write_each_page},
    metrics::{MetricsSource, Scrape},
};

pub(super) fn large_folio_cow(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let mthp = "/sys/kernel/mm/transparent_hugepage/hugepages-64kB/enabled";
    if !at_least((6, 8)) || fs::metadata(mthp).is_err() {
        checker.not_applicable("c_cow/large_folio", "no anonymous mTHP on this kernel");
        return Ok(());
    }
    sysfs_write(mthp, "madvise")?;
    let q = map_thp_aligned(64 << 10);
    write_each_page(q, 16, 1);
    if !is_thp(q as usize)? {
        checker.not_applicable("c_cow/large_folio", "the kernel gave no 64 KiB folio");
        unmap(q, 16);
        return Ok(());
    }
    Waiters::spawn(1, |_| {}).release();
    let before = metrics.settled_scrape()?;
    let frame_before = pfn(q as usize)?;
    unsafe { ptr::write_volatile(q, 2) };
    // The kernel's answer: the same frame after the write is a reuse.
    let reused = pfn(q as usize)? == frame_before;
    let after = metrics.settled_scrape()?;
    let outcome = |s: &Scrape, o: &str| {
        s.sum("mapcount_cow_faults_total", &[("outcome", o), ("kind", "anon"), ("order", "4")])
    };
    // 6.15+ reuse an exclusive large folio after the fork child exited;
    // earlier kernels copy it.
    let (reuses, copies) = if reused { (1, 0) } else { (0, 1) };
    checker.exact("c_cow/large_folio_reuse", reuses, outcome(&after, "reuse") - outcome(&before, "reuse"));
    checker.exact("c_cow/large_folio_copy", copies, outcome(&after, "copy") - outcome(&before, "copy"));
    unmap(q, 16);
    Ok(())
}
