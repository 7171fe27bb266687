//! q. What smaps, pagemap and kpagecount report for THPs shared in part,
//! where a kernel without per-page mapcounts (`CONFIG_NO_PAGE_MAPCOUNT`)
//! reports an average instead. Two THPs, mapped by PMD in a parent; a fork
//! child unmaps half of the first (its PMD is split: 256 pages are mapped
//! twice, 256 once) and three quarters of the second (128 twice, 384
//! once). The average mapcount per page of the first rounds up to 2, of
//! the second down to 1, so the estimate's PSS is wrong both ways, and the
//! two-slot bit calls every page of both shared.
//!
//! Known answers: pagemap's frames (which pages each process maps) give
//! the exact figures on every kernel; the kernel's own smaps, pagemap and
//! kpagecount give the figures mapcountd must predict for it.

use super::{THP, Waiters, check_smaps, map_thp_aligned, my_pid, pipe};
use crate::{
    checker::Checker,
    kernel::is_thp,
    memory::{PAGE, unmap, write_each_page},
    metrics::MetricsSource,
};

pub(super) fn smaps(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let pages = 2 * THP / PAGE;
    let region = map_thp_aligned(2 * THP);
    write_each_page(region, pages, 5);
    if !is_thp(region as usize)? || !is_thp(region as usize + THP)? {
        checker.not_applicable("q_smaps", "the kernel gave no PMD-mapped THPs");
        unmap(region, pages);
        return Ok(());
    }
    let (done_read, done_write) = pipe();
    let child = Waiters::spawn(1, |_| {
        unsafe { libc::close(done_read) };
        let start = region as usize;
        unmap((start + THP / 2) as *mut u8, THP / 2 / PAGE);
        unmap((start + THP + THP / 4) as *mut u8, 3 * THP / 4 / PAGE);
        unsafe { libc::write(done_write, [1u8].as_ptr().cast(), 1) };
    });
    unsafe { libc::close(done_write) };
    let mut byte = [0u8; 1];
    unsafe { libc::read(done_read, byte.as_mut_ptr().cast(), 1) };
    unsafe { libc::close(done_read) };
    let from = region as usize;
    let result = check_smaps(
        metrics,
        checker,
        "q_smaps",
        &[("parent", my_pid()), ("child", child.pids()[0])],
        from,
        from + 2 * THP,
    );
    child.release();
    unmap(region, pages);
    result
}
