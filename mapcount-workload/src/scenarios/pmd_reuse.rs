//! k. A THP whose fork child has exited, written by the parent: a write
//! fault at PMD level (`do_huge_pmd_wp_page`), outside any do_wp_page.
//! Whether the kernel reused or copied it is read from the page frame
//! before and after (pagemap); the daemon must count the same.

use std::ptr;

use super::{THP, Waiters, map_thp_aligned};
use crate::{
    checker::Checker,
    kernel::{kpageflags, pfn},
    memory::{PAGE, unmap, write_each_page},
    metrics::{MetricsSource, Scrape},
};

pub(super) fn pmd_reuse(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let p = map_thp_aligned(THP);
    write_each_page(p, THP / PAGE, 4);
    Waiters::spawn(1, |_| {}).release();
    let frame_before = pfn(p as usize)?;
    let thp = kpageflags(p as usize)? & (1 << 22) != 0;
    let before = metrics.settled_scrape()?;
    unsafe { ptr::write_volatile(p, 5) };
    let after = metrics.settled_scrape()?;
    let reused = usize::from(pfn(p as usize)? == frame_before);
    let outcome = |s: &Scrape, o: &str| {
        s.sum("mapcount_cow_faults_total", &[("outcome", o), ("kind", "anon"), ("order", "9")])
    };
    if thp {
        let reported = outcome(&after, "reuse") - outcome(&before, "reuse");
        checker.exact("k_pmd_reuse/order9_reuses", reused, reported);
    } else {
        checker.not_applicable("k_pmd_reuse/order9_reuses", "the kernel gave no THP");
    }
    unmap(p, THP / PAGE);
    Ok(())
}
