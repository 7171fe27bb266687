//! b. Half of a THP unmapped: one partially mapped order-9 folio; on
//! kernels with anonymous mTHP, 3 pages of a 64 KiB folio dropped: one
//! partially mapped order-4 folio.

use std::{fs, ptr};

use super::{THP, at_least, map_thp_aligned, my_pid, sysfs_write};
use crate::{
    checker::Checker,
    kernel::is_thp,
    memory::{PAGE, unmap, write_each_page},
    metrics::MetricsSource,
};

pub(super) fn partial(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let p = map_thp_aligned(THP);
    unsafe { ptr::write_volatile(p, 1) };
    if !is_thp(p as usize)? {
        checker.not_applicable("b_partial", "the kernel gave no THP");
        unmap(p, THP / PAGE);
        return Ok(());
    }
    unmap(unsafe { p.add(THP / 2) }, THP / 2 / PAGE);
    metrics.settled_scrape()?;
    let rows = metrics.folios_of(my_pid())?;
    let partial9 = rows.iter().filter(|r| r.kind == "anon" && r.order == 9 && r.partial).count();
    // 6.1-6.7 split the PMD inline, without an rmap call: the table
    // infers it at the first PTE remove.
    checker.exact("b_partial/order9_partially_mapped", 1, partial9 as f64);
    unmap(p, THP / 2 / PAGE);

    let mthp = "/sys/kernel/mm/transparent_hugepage/hugepages-64kB/enabled";
    if !at_least((6, 8)) || fs::metadata(mthp).is_err() {
        checker.not_applicable("b_partial/order4_partially_mapped", "no anonymous mTHP on this kernel");
        return Ok(());
    }
    sysfs_write(mthp, "madvise")?;
    let q = map_thp_aligned(64 << 10);
    write_each_page(q, 16, 1);
    if !is_thp(q as usize)? {
        checker.not_applicable("b_partial/order4_partially_mapped", "the kernel gave no 64 KiB folio");
        unmap(q, 16);
        return Ok(());
    }
    unsafe { libc::madvise(q.cast(), 3 * PAGE, libc::MADV_DONTNEED) };
    metrics.settled_scrape()?;
    let rows = metrics.folios_of(my_pid())?;
    let partial4 = rows.iter().filter(|r| r.kind == "anon" && r.order == 4 && r.partial).count();
    checker.exact("b_partial/order4_partially_mapped", 1, partial4 as f64);
    unmap(q, 16);
    Ok(())
}
