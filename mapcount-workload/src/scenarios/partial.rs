//! b. Half of a THP unmapped: one partially mapped order-9 folio; on
//! kernels with anonymous mTHP, 3 pages of a 64 KiB folio dropped: one
//! partially mapped order-4 folio.

use std::ptr;

use super::{THP, map_64k_folio, map_thp_aligned, my_pid};
use crate::{
    checker::Checker,
    kernel::is_thp,
    memory::{PAGE, unmap},
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

    let Some(q) = map_64k_folio(checker, "b_partial/order4_partially_mapped", 1)? else { return Ok(()) };
    unsafe { libc::madvise(q.cast(), 3 * PAGE, libc::MADV_DONTNEED) };
    metrics.settled_scrape()?;
    let rows = metrics.folios_of(my_pid())?;
    let partial4 = rows.iter().filter(|r| r.kind == "anon" && r.order == 4 && r.partial).count();
    checker.exact("b_partial/order4_partially_mapped", 1, partial4 as f64);
    unmap(q, 16);
    Ok(())
}
