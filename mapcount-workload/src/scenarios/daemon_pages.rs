//! s. Pages mapcountd itself maps after a workload did. The daemon's own
//! address space is left out of the table, but for the page cache: its
//! binary and libraries are the same pages every process maps. Here the
//! kernel unmaps the daemon's code (process_madvise MADV_PAGEOUT: reclaim
//! unmaps the pages; tmpfs without swap keeps them cached), this process
//! maps the daemon's binary, and the daemon then runs its code again
//! (scrapes), mapping many of the same pages once more. The kernel's
//! answer: each page's mapcount (kpagecount); the daemon's: the mapcount
//! of the folio at each address of this process (`/debug/folios`).

use std::{ffi::CString, fs, io, ptr};

use anyhow::{anyhow, bail};

use super::{mapped_ranges, my_pid};
use crate::{
    checker::Checker,
    kernel::kpagecount,
    memory::{PAGE, read_each_page},
    metrics::MetricsSource,
};

pub(super) fn daemon_pages(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let daemon = daemon_pid()?;
    let binary = fs::read_link(format!("/proc/{daemon}/exe"))?;
    // The daemon's mappings of its binary: every page only it maps is
    // unmapped by reclaim (MADV_PAGEOUT skips pages mapped elsewhere).
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, daemon, 0) } as i32;
    if pidfd < 0 {
        bail!("pidfd_open({daemon}): {}", io::Error::last_os_error());
    }
    for (start, end) in mapped_ranges(daemon, &binary.display().to_string())? {
        let range = libc::iovec { iov_base: start as *mut libc::c_void, iov_len: end - start };
        let done = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd,
                &range as *const libc::iovec,
                1,
                libc::MADV_PAGEOUT,
                0,
            )
        };
        if done < 0 {
            let why = format!("process_madvise(MADV_PAGEOUT): {}", io::Error::last_os_error());
            checker.not_applicable("s_daemon_pages/mapcount_equals_kernel", &why);
            unsafe { libc::close(pidfd) };
            return Ok(());
        }
    }
    unsafe { libc::close(pidfd) };

    let path = CString::new(binary.as_os_str().as_encoded_bytes())?;
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    if fd < 0 {
        bail!("open {}: {}", binary.display(), io::Error::last_os_error());
    }
    let pages = (fs::metadata(&binary)?.len() as usize).div_ceil(PAGE);
    let p = unsafe { libc::mmap(ptr::null_mut(), pages * PAGE, libc::PROT_READ, libc::MAP_PRIVATE, fd, 0) };
    unsafe { libc::close(fd) };
    if p == libc::MAP_FAILED {
        bail!("mmap {}: {}", binary.display(), io::Error::last_os_error());
    }
    let p = p.cast::<u8>();
    read_each_page(p, pages);
    // Mapped by this process alone: what the daemon maps of these from
    // now on, it maps after the table saw this process's mapping.
    let alone = mapcounts(p, pages)?;
    // Scrapes run the daemon's exposition and HTTP code: its pages come
    // back into its address space, now mapped by this process too. The
    // first answer of /debug/folios brings that code's pages back as well.
    metrics.settled_scrape()?;
    metrics.folios_of(my_pid())?;
    metrics.settled_scrape()?;

    // The daemon may still map a page while it answers: compare only the
    // pages whose kernel mapcount held across the daemon's answer.
    let before = mapcounts(p, pages)?;
    let rows = metrics.folios_of(my_pid())?;
    let after = mapcounts(p, pages)?;
    let mut compared = 0;
    let mut differ = 0;
    let mut mapped_again = 0;
    for i in 0..pages {
        let (Some(kernel), Some(again)) = (before[i], after[i]) else { continue };
        if kernel != again {
            continue;
        }
        let address = p as u64 + (i * PAGE) as u64;
        let daemon = rows.iter().find(|r| r.address == address && r.order == 0).map_or(0, |r| r.mapcount);
        compared += 1;
        if alone[i] == Some(1) && kernel == 2 {
            mapped_again += 1;
        }
        if daemon != kernel {
            differ += 1;
        }
    }
    println!(
        "MAPCOUNT-NOTE s_daemon_pages: {pages} pages of {}, {compared} compared, {mapped_again} mapped by the \
         daemon after this process (kpagecount 1, then 2)",
        binary.display()
    );
    // Without pages the daemon mapped after this process, the comparison
    // proves nothing: that must not pass.
    checker.range(
        "s_daemon_pages/pages_the_daemon_mapped_after_us",
        1,
        mapped_again as f64,
        1.0,
        pages as f64,
    );
    checker.exact("s_daemon_pages/pages_whose_mapcount_differs_from_kernel", 0, differ as f64);
    unsafe { libc::munmap(p.cast(), pages * PAGE) };
    Ok(())
}

/// The kernel's mapcount of each page at `p` (None: not mapped now).
fn mapcounts(p: *const u8, pages: usize) -> anyhow::Result<Vec<Option<u64>>> {
    Ok((0..pages).map(|i| kpagecount(p as usize + i * PAGE).ok()).collect())
}

/// The running mapcountd's process ID (the only one while scenarios run).
fn daemon_pid() -> anyhow::Result<i32> {
    let mine = my_pid();
    for entry in fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid != mine
            && fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "mapcountd")
        {
            return Ok(pid);
        }
    }
    Err(anyhow!("no mapcountd process"))
}
