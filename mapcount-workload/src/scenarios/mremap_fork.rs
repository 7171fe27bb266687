//! h. Two THPs moved by mremap (one to a 2 MiB boundary: the PMD moves;
//! one a page past it: split, then 512 PTEs move), then 3 children
//! forked. No rmap call sees the move. The kernel (kpagecount) and the
//! daemon must both see 4 mappings of each.

use anyhow::anyhow;

use super::{THP, Waiters, map_thp_aligned, thps_mapped, thps_with_sharers};
use crate::{
    checker::Checker,
    memory::{PAGE, unmap, write_each_page},
    metrics::MetricsSource,
};

pub(super) fn mremap_fork(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let p = map_thp_aligned(2 * THP);
    for i in 0..2 {
        write_each_page(unsafe { p.add(i * THP) }, THP / PAGE, 7);
    }
    // A destination area, reserved, then mapped over by mremap.
    let area = map_thp_aligned(4 * THP);
    let targets = [area, unsafe { area.add(2 * THP + PAGE) }];
    for (i, &target) in targets.iter().enumerate() {
        let moved = unsafe {
            libc::mremap(
                p.add(i * THP).cast(),
                THP,
                THP,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target.cast::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            return Err(anyhow!("mremap: {}", std::io::Error::last_os_error()));
        }
    }
    let children = Waiters::spawn(3, |_| {});
    let addresses: Vec<usize> = targets.iter().map(|&t| t as usize).collect();
    let known = thps_mapped(&addresses, 4)?;
    checker.exact("h_mremap_fork/kernel_thps_mapped_4_times", 2, known as f64);
    checker.exact("h_mremap_fork/thps_with_4_sharers", known, thps_with_sharers(metrics, 4)? as f64);
    children.release();
    unmap(area, 4 * THP / PAGE + 1);
    Ok(())
}
