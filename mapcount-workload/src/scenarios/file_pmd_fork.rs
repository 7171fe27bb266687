//! j. A shmem THP mapped by PMD in a private mapping that also holds an
//! anonymous page (so fork copies the VMA), then a child forked: the
//! kernel leaves file PMDs to be faulted in again (`copy_huge_pmd`), so
//! the THP keeps one mapping.

use std::{ffi::CString, fs, ptr};

use anyhow::anyhow;

use super::{THP, Waiters, map_thp_aligned, my_pid, sysfs_write};
use crate::{
    checker::Checker,
    kernel::{kpagecount, kpageflags},
    metrics::MetricsSource,
};

pub(super) fn file_pmd_fork(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let shmem = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    let old = fs::read_to_string(shmem).unwrap_or_default();
    sysfs_write(shmem, "always")?;
    let name = CString::new("mapcount-file-pmd").unwrap();
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    unsafe { libc::ftruncate(fd, 2 * THP as i64) };
    let data = vec![5u8; 2 * THP];
    unsafe { libc::pwrite(fd, data.as_ptr().cast(), 2 * THP, 0) };
    let area = map_thp_aligned(2 * THP);
    let p = unsafe {
        libc::mmap(
            area.cast(),
            2 * THP,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(anyhow!("mmap: {}", std::io::Error::last_os_error()));
    }
    let p = p.cast::<u8>();
    let _ = unsafe { ptr::read_volatile(p) }; // the first THP, by PMD
    unsafe { ptr::write_volatile(p.add(THP), 1) }; // an anonymous copy: an anon_vma
    let flags = kpageflags(p as usize)?;
    let result = if flags & (1 << 22) == 0 {
        checker.not_applicable("j_file_pmd_fork", "the kernel gave the file no THP");
        Ok(())
    } else {
        let children = Waiters::spawn(1, |_| {});
        let known = kpagecount(p as usize)?;
        checker.exact("j_file_pmd_fork/kernel_mappings_after_fork", 1, known as f64);
        metrics.settled_scrape()?;
        let rows = metrics.folios_of(my_pid())?;
        let thp = rows.iter().filter(|r| r.kind == "shmem" && r.order == 9);
        let single = thp.clone().filter(|r| r.sharers == 1).count();
        checker.exact("j_file_pmd_fork/thp_with_1_sharer", 1, single as f64);
        checker.exact("j_file_pmd_fork/thp_with_2_sharers", 0, thp.filter(|r| r.sharers == 2).count() as f64);
        children.release();
        Ok(())
    };
    unsafe { libc::munmap(p.cast(), 2 * THP) };
    unsafe { libc::close(fd) };
    let _ = sysfs_write(shmem, old.split('[').nth(1).and_then(|s| s.split(']').next()).unwrap_or("never"));
    result
}
