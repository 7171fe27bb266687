//! a. 4 x 2 MiB of THP, 3 forked children: 4 order-9 folios, 4 sharers each.

use std::ptr;

use super::{THP, Waiters, map_thp_aligned, my_pid};
use crate::{
    checker::Checker,
    memory::{PAGE, unmap},
    metrics::MetricsSource,
};

pub(super) fn shared_thp(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let p = map_thp_aligned(4 * THP);
    for i in 0..4 {
        unsafe { ptr::write_volatile(p.add(i * THP), 1) };
    }
    let children = Waiters::spawn(3, |_| {});
    metrics.settled_scrape()?;
    let rows = metrics.folios_of(my_pid())?;
    let thps: Vec<_> = rows.iter().filter(|r| r.kind == "anon" && r.order == 9).collect();
    checker.exact("a_shared_thp/order9_folios", 4, thps.len() as f64);
    let four = thps.iter().filter(|r| r.sharers == 4).count();
    checker.exact("a_shared_thp/folios_with_4_sharers", 4, four as f64);
    children.release();
    unmap(p, 4 * THP / PAGE);
    Ok(())
}
