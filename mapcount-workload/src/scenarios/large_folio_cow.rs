//! c (large folios). A 64 KiB folio that only the parent maps after its
//! child exits: reused since 6.15, copied before.

use std::{fs, ptr};

use super::{Waiters, at_least, map_thp_aligned, sysfs_write};
use crate::{
    checker::Checker,
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
    Waiters::spawn(1, |_| {}).release();
    let before = metrics.settled_scrape()?;
    unsafe { ptr::write_volatile(q, 2) };
    let after = metrics.settled_scrape()?;
    let outcome = |s: &Scrape, o: &str| {
        s.sum("mapcount_cow_faults_total", &[("outcome", o), ("kind", "anon"), ("order", "4")])
    };
    let (expected, other) = if at_least((6, 15)) { ("reuse", "copy") } else { ("copy", "reuse") };
    checker.exact(
        &format!("c_cow/large_folio_{expected}"),
        1,
        outcome(&after, expected) - outcome(&before, expected),
    );
    checker.exact(&format!("c_cow/large_folio_{other}"), 0, outcome(&after, other) - outcome(&before, other));
    unmap(q, 16);
    Ok(())
}
