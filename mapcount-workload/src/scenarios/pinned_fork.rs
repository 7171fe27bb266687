//! n. Pages pinned for DMA (FOLL_LONGTERM, by registering them as an
//! io_uring fixed buffer), then fork: the kernel does not share a pinned
//! anonymous page with the child but copies it at fork (copy_present_page),
//! so the child maps a new folio and the parent's stays exclusive. The
//! kernel's answer: the child's frames (pagemap), and the parent's small
//! anonymous pages mapped twice (kpagecount over all of its memory),
//! against the parent's folios with two sharers in the daemon's view.

use std::io;

use super::{Waiters, my_pid};
use crate::{
    checker::Checker,
    kernel::{pfn, pid_pfn, small_anon_pages_mapped},
    memory::{PAGE, map_anon, unmap, write_each_page},
    metrics::MetricsSource,
};

/// include/uapi/linux/io_uring.h
const IORING_REGISTER_BUFFERS: libc::c_uint = 0;

pub(super) fn pinned_fork(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let pages = 16;
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    write_each_page(p, pages, 5);
    // io_uring_params is 120 bytes; zeroed asks for the defaults.
    let mut params = [0u8; 120];
    let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) } as i32;
    if ring < 0 {
        let why = format!("io_uring_setup: {}", io::Error::last_os_error());
        checker.not_applicable("n_pinned_fork/child_copies", &why);
        checker.not_applicable("n_pinned_fork/parent_shared_pages", &why);
        unmap(p, pages);
        return Ok(());
    }
    let buffer = libc::iovec { iov_base: p.cast(), iov_len: pages * PAGE };
    let registered = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring,
            IORING_REGISTER_BUFFERS,
            &buffer as *const libc::iovec,
            1,
        )
    };
    if registered < 0 {
        anyhow::bail!("io_uring_register(IORING_REGISTER_BUFFERS): {}", io::Error::last_os_error());
    }
    let frames: Vec<u64> = (0..pages).map(|i| pfn(p as usize + i * PAGE)).collect::<Result<_, _>>()?;
    let child = Waiters::spawn(1, |_| {});
    let pid = child.pids[0];
    let mut copied = 0;
    for (i, frame) in frames.iter().enumerate() {
        if pid_pfn(pid, p as usize + i * PAGE)? != *frame {
            copied += 1;
        }
    }
    metrics.settled_scrape()?;
    let known_shared = small_anon_pages_mapped(2)?;
    let rows = metrics.folios_of(my_pid())?;
    let reported_shared = rows.iter().filter(|r| r.kind == "anon" && r.order == 0 && r.sharers == 2).count();
    // The kernel's copies are the pinned pages; were they counted as
    // shared, the parent would show `pages` shared folios too many.
    checker.exact("n_pinned_fork/child_copies", pages, copied as f64);
    checker.exact("n_pinned_fork/parent_shared_pages", known_shared, reported_shared as f64);
    println!(
        "MAPCOUNT-NOTE n_pinned_fork: {copied} of {pages} pinned pages copied at fork, {known_shared} other pages shared"
    );
    child.release();
    unsafe { libc::close(ring) };
    unmap(p, pages);
    Ok(())
}
