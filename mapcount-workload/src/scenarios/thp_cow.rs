//! l. A THP shared with a child, which writes its first page: the child's
//! PMD is split (inline on 6.1-6.7) and that page copied. The THP keeps
//! the parent's PMD and the child's other 511 pages: 2 sharers, as the
//! kernel's kpagecount of its second page says; its first page is
//! mapped by the parent alone. (Without per-page mapcounts kpagecount
//! reports the folio's average; pagemap's frames say the same everywhere.)

use std::{ptr, thread::sleep, time::Duration};

use super::{THP, Waiters, map_thp_aligned, thps_with_sharers};
use crate::{
    checker::Checker,
    kernel::{kpagecount, kpageflags, per_page_mapcount, pfn, pid_pfn},
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
    let child_pid = child.pids()[0];
    // The child has written once its first page is a frame of its own.
    for _ in 0..100 {
        if pid_pfn(child_pid, address)? != pfn(address)? {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    // The THP's sharers, from the frames: the child still maps its second page.
    let sharers = 1 + usize::from(pid_pfn(child_pid, address + PAGE)? == pfn(address + PAGE)?);
    if per_page_mapcount() {
        let (first, second) = (kpagecount(address)?, kpagecount(address + PAGE)?);
        checker.exact("l_thp_cow/kernel_first_page_mappings", 1, first as f64);
        checker.exact("l_thp_cow/kernel_second_page_mappings", sharers, second as f64);
    } else {
        checker.not_applicable(
            "l_thp_cow/kernel_first_page_mappings",
            "kpagecount is the folio's average mapcount on this kernel",
        );
    }
    checker.exact(
        "l_thp_cow/thps_with_2_sharers",
        usize::from(sharers == 2),
        thps_with_sharers(metrics, 2)? as f64,
    );
    child.release();
    checker.exact("l_thp_cow/thps_with_1_sharer_after_exit", 1, thps_with_sharers(metrics, 1)? as f64);
    unmap(p, THP / PAGE);
    Ok(())
}
