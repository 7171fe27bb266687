//! o. Huge pages of the hugetlb pool mapped, written and unmapped. The
//! table leaves hugetlb out by design (docs/metrics.md: 6.12+ maps them
//! through inline helpers no probe sees, 6.1 reports removes without
//! adds): while the kernel says the pages are in use (HugePages_Free in
//! /proc/meminfo), the daemon must hold none of them for this process, and
//! once they are unmapped nothing of them may be left (the run's phantom
//! check).

use std::{fs, ptr};

use super::{THP, my_pid, sysfs_write};
use crate::{checker::Checker, metrics::MetricsSource};

fn huge_pages_free() -> anyhow::Result<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:")?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HugePages_Free in /proc/meminfo"))
}

pub(super) fn hugetlb(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let pages = 4;
    let pool = "/proc/sys/vm/nr_hugepages";
    let not_applicable = |checker: &mut Checker, why: &str| {
        checker.not_applicable("o_hugetlb/in_use", why);
        checker.not_applicable("o_hugetlb/table_folios", why);
    };
    let Ok(before_pool) = fs::read_to_string(pool) else {
        not_applicable(checker, "no hugetlb in this kernel (CONFIG_HUGETLBFS)");
        return Ok(());
    };
    sysfs_write(pool, &pages.to_string())?;
    let free_before = huge_pages_free()?;
    if free_before < pages as u64 {
        not_applicable(checker, "the kernel could not reserve 4 huge pages");
        sysfs_write(pool, before_pool.trim())?;
        return Ok(());
    }
    // Large folios the daemon holds for this process before: any left by
    // earlier scenarios are theirs to answer for.
    metrics.settled_scrape()?;
    let large = |metrics: &MetricsSource| -> anyhow::Result<usize> {
        Ok(metrics.folios_of(my_pid())?.iter().filter(|r| r.order >= 9).count())
    };
    let held_before = large(metrics)?;
    let bytes = pages * THP;
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        anyhow::bail!("mmap(MAP_HUGETLB): {}", std::io::Error::last_os_error());
    }
    for i in 0..pages {
        unsafe { ptr::write_volatile(p.cast::<u8>().add(i * THP), 1) };
    }
    let in_use = free_before - huge_pages_free()?;
    metrics.settled_scrape()?;
    let held = large(metrics)?.saturating_sub(held_before);
    checker.exact("o_hugetlb/in_use", pages, in_use as f64);
    checker.exact("o_hugetlb/table_folios", 0, held as f64);
    unsafe { libc::munmap(p, bytes) };
    sysfs_write(pool, before_pool.trim())?;
    Ok(())
}
