//! a. 4 x 2 MiB of THP, 3 forked children: 4 order-9 folios, 4 sharers each.

use std::ptr;

use super::{THP, Waiters, map_thp_aligned, my_pid, thps_mapped};
use crate::{
    checker::Checker,
    kernel::is_thp,
    memory::{PAGE, unmap},
    metrics::MetricsSource,
};

pub(super) fn shared_thp(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let p = map_thp_aligned(4 * THP);
    for i in 0..4 {
        unsafe { ptr::write_volatile(p.add(i * THP), 1) };
    }
    let children = Waiters::spawn(3, |_| {});
    let addresses: Vec<usize> = (0..4).map(|i| p as usize + i * THP).collect();
    let mut kernel_thps = 0;
    for &address in &addresses {
        kernel_thps += usize::from(is_thp(address)?);
    }
    if kernel_thps == 0 {
        checker.not_applicable("a_shared_thp", "the kernel gave no THP (madvise(MADV_HUGEPAGE) or THP off)");
        children.release();
        unmap(p, 4 * THP / PAGE);
        return Ok(());
    }
    let kernel_four = thps_mapped(&addresses, 4)?;
    metrics.settled_scrape()?;
    let rows = metrics.folios_of(my_pid())?;
    let thps: Vec<_> = rows.iter().filter(|r| r.kind == "anon" && r.order == 9).collect();
    checker.exact("a_shared_thp/order9_folios", kernel_thps, thps.len() as f64);
    let four = thps.iter().filter(|r| r.sharers == 4).count();
    checker.exact("a_shared_thp/folios_with_4_sharers", kernel_four, four as f64);
    children.release();
    unmap(p, 4 * THP / PAGE);
    Ok(())
}
