//! n. Pages pinned for DMA (FOLL_LONGTERM, by registering them as an
//! io_uring fixed buffer), then fork: the kernel does not share a pinned
//! anonymous page with the child but copies it at fork (copy_present_page),
//! so the parent's page stays mapped once. Beside them, as many pages not
//! pinned, which fork shares. The kernel's answer: each page's mapcount
//! (kpagecount); the daemon's: the sharers of the folio at each address of
//! the parent (`/debug/folios` rows carry the process's own address).

use std::io;

use super::{Waiters, my_pid};
use crate::{
    checker::Checker,
    kernel::kpagecount,
    memory::{PAGE, map_anon, unmap, write_each_page},
    metrics::MetricsSource,
};

/// include/uapi/linux/io_uring.h
const IORING_REGISTER_BUFFERS: libc::c_uint = 0;

pub(super) fn pinned_fork(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let pages = 16;
    let pinned = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    let shared = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    write_each_page(pinned, pages, 5);
    write_each_page(shared, pages, 6);
    // io_uring_params is 120 bytes; zeroed asks for the defaults.
    let mut params = [0u8; 120];
    let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) } as i32;
    if ring < 0 {
        let why = format!("io_uring_setup: {}", io::Error::last_os_error());
        for name in ["pinned_pages_shared", "other_pages_shared"] {
            checker.not_applicable(&format!("n_pinned_fork/{name}"), &why);
        }
        unmap(pinned, pages);
        unmap(shared, pages);
        return Ok(());
    }
    let buffer = libc::iovec { iov_base: pinned.cast(), iov_len: pages * PAGE };
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
    let child = Waiters::spawn(1, |_| {});
    metrics.settled_scrape()?;
    let rows = metrics.folios_of(my_pid())?;
    // Of the pages at `p`, how many the kernel and the daemon see mapped by two.
    let twice = |p: *mut u8| -> anyhow::Result<(usize, usize)> {
        let mut kernel = 0;
        let mut daemon = 0;
        for i in 0..pages {
            let address = p as u64 + (i * PAGE) as u64;
            kernel += usize::from(kpagecount(address as usize)? == 2);
            daemon += rows.iter().filter(|r| r.address == address && r.order == 0 && r.sharers == 2).count();
        }
        Ok((kernel, daemon))
    };
    let (pinned_known, pinned_reported) = twice(pinned)?;
    let (shared_known, shared_reported) = twice(shared)?;
    checker.exact("n_pinned_fork/pinned_pages_shared", pinned_known, pinned_reported as f64);
    checker.exact("n_pinned_fork/other_pages_shared", shared_known, shared_reported as f64);
    println!(
        "MAPCOUNT-NOTE n_pinned_fork: the kernel shares {pinned_known} of {pages} pinned pages and {shared_known} of {pages} others with the child"
    );
    child.release();
    unsafe { libc::close(ring) };
    unmap(pinned, pages);
    unmap(shared, pages);
    Ok(())
}
