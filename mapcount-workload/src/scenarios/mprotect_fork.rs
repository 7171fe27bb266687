//! i. One of two THPs made read-only in its second half (the VMA and
//! the PMD split), then writable again (the VMAs merge back), then 3
//! children forked: 4 sharers each, as the kernel counts.

use anyhow::anyhow;

use super::{THP, Waiters, map_thp_aligned, thps_mapped, thps_with_sharers};
use crate::{
    checker::Checker,
    memory::{PAGE, unmap, write_each_page},
    metrics::MetricsSource,
};

pub(super) fn mprotect_fork(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let p = map_thp_aligned(2 * THP);
    for i in 0..2 {
        write_each_page(unsafe { p.add(i * THP) }, THP / PAGE, 8);
    }
    let half = unsafe { p.add(THP / 2) };
    if unsafe { libc::mprotect(half.cast(), THP / 2, libc::PROT_READ) } != 0 {
        return Err(anyhow!("mprotect: {}", std::io::Error::last_os_error()));
    }
    unsafe { libc::mprotect(half.cast(), THP / 2, libc::PROT_READ | libc::PROT_WRITE) };
    let children = Waiters::spawn(3, |_| {});
    let known = thps_mapped(&[p as usize, p as usize + THP], 4)?;
    checker.exact("i_mprotect_fork/kernel_thps_mapped_4_times", 2, known as f64);
    checker.exact("i_mprotect_fork/thps_with_4_sharers", known, thps_with_sharers(metrics, 4)? as f64);
    children.release();
    unmap(p, 2 * THP / PAGE);
    Ok(())
}
