//! l. A THP shared with a child, which writes its first page: the child's
//! PMD is split (inline on 6.1-6.7) and that page copied. The THP keeps
//! the parent's PMD and the child's other 511 pages: 2 sharers, as the
//! kernel's kpagecount of its second page says; its first page is
//! mapped by the parent alone.

use std::{ptr, thread::sleep, time::Duration};

use super::{THP, Waiters, map_thp_aligned, thps_with_sharers};
use crate::{
    checker::Checker,
    kernel::{kpagecount, kpageflags},
    memory::{PAGE, unmap, write_each_page},
    metrics::MetricsSource,
};

pub(super) fn thp_cow(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let p = map_thp_aligned(THP);
    write_each_page(p, THP / PAGE, 6);
    if kpageflags(p as usize)? & (1 << 22) == 0 {
        checker.not_applicable("l_thp_cow", "the kernel gave no THP");
        unmap(p, THP / PAGE);
        return Ok(());
    }
    let address = p as usize;
    let child = Waiters::spawn(1, move |_| unsafe { ptr::write_volatile(address as *mut u8, 7) });
    // The child has written once it waits; give it time to get there.
    for _ in 0..100 {
        if kpagecount(address)? == 1 {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    let (first, second) = (kpagecount(address)?, kpagecount(address + PAGE)?);
    checker.exact("l_thp_cow/kernel_first_page_mappings", 1, first as f64);
    checker.exact("l_thp_cow/kernel_second_page_mappings", 2, second as f64);
    checker.exact(
        "l_thp_cow/thps_with_2_sharers",
        usize::from(second == 2),
        thps_with_sharers(metrics, 2)? as f64,
    );
    child.release();
    checker.exact("l_thp_cow/thps_with_1_sharer_after_exit", 1, thps_with_sharers(metrics, 1)? as f64);
    unmap(p, THP / PAGE);
    Ok(())
}
