//! g. One 2 MiB shmem THP PTE-mapped through 1,000 VMAs: each PTE holds
//! a reference, so the refcount passes 512,000; the daemon's headroom
//! ratio must match the kernel's own count (/proc/kpagecount) within 1%.

use std::{ffi::CString, fs, ptr};

use anyhow::anyhow;

use super::{THP, sysfs_write};
use crate::{
    checker::Checker,
    kernel::kpagecount,
    memory::{PAGE, read_each_page},
    metrics::MetricsSource,
};

pub(super) fn refcount(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let shmem = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    let old = fs::read_to_string(shmem).unwrap_or_default();
    sysfs_write(shmem, "always")?;
    let name = CString::new("mapcount-refcount").unwrap();
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    unsafe { libc::ftruncate(fd, THP as i64) };
    let data = vec![9u8; THP];
    unsafe { libc::pwrite(fd, data.as_ptr().cast(), THP, 0) };

    // Every mapping starts one page past a 2 MiB boundary, so no PMD
    // can map it: 512 PTEs, 512 references, per VMA.
    let vmas = 1000usize;
    let stride = 2 * THP;
    let area = unsafe {
        libc::mmap(
            ptr::null_mut(),
            vmas * stride + THP,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if area == libc::MAP_FAILED {
        return Err(anyhow!("reserve: {}", std::io::Error::last_os_error()));
    }
    let base = (area as usize).next_multiple_of(THP) + PAGE;
    let mut maps = Vec::with_capacity(vmas);
    for i in 0..vmas {
        let at = (base + i * stride) as *mut libc::c_void;
        let p = unsafe { libc::mmap(at, THP, libc::PROT_READ, libc::MAP_SHARED | libc::MAP_FIXED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(anyhow!("mapping {i}: {}", std::io::Error::last_os_error()));
        }
        read_each_page(p.cast(), THP / PAGE);
        maps.push(p);
    }
    let scrape = metrics.settled_scrape()?;
    // /proc/kpagecount counts each page's mappings; every PTE mapping
    // holds one reference, so their sum over the folio's pages is the
    // kernel's count of mapping references (the page cache's own 512
    // references are the 0.1% on top).
    let mut kernel_refcount = 0;
    for page in 0..THP / PAGE {
        kernel_refcount += kpagecount(maps[0] as usize + page * PAGE)?;
    }
    let order9 = scrape.sum("mapcount_folio_refcount_max", &[("kind", "shmem"), ("order", "9")]);
    checker.range("g_refcount/highest_refcount", vmas * 512, order9, (vmas * 512) as f64, f64::INFINITY);
    let kernel_ratio = kernel_refcount as f64 / 2147483648.0;
    let ratio = scrape.sum("mapcount_refcount_headroom_ratio", &[]);
    println!(
        "MAPCOUNT-NOTE g_refcount kernel refcount {kernel_refcount}, ratio {kernel_ratio:.6}, daemon ratio {ratio:.6}"
    );
    checker.range(
        "g_refcount/headroom_ratio_ppm",
        (kernel_ratio * 1e6) as usize,
        (ratio * 1e6).round(),
        (kernel_ratio * 0.99 * 1e6).floor(),
        (kernel_ratio * 1.01 * 1e6).ceil(),
    );
    unsafe { libc::munmap(area, vmas * stride + THP) };
    unsafe { libc::close(fd) };
    let _ = sysfs_write(shmem, old.split('[').nth(1).and_then(|s| s.split(']').next()).unwrap_or("never"));
    Ok(())
}
