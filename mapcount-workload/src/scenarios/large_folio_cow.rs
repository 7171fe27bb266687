//! c (large folios). A 64 KiB folio that only the parent maps after its
//! child exits: reused since 6.15, copied before.

use std::ptr;

use super::{Waiters, map_64k_folio};
use crate::{
    checker::Checker,
    kernel::pfn,
    memory::unmap,
    metrics::{MetricsSource, Scrape},
};

pub(super) fn large_folio_cow(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let Some(q) = map_64k_folio(checker, "c_cow/large_folio", 1)? else { return Ok(()) };
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
