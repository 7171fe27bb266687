//! d. 2 MiB of shmem mapped and read by 5 of 6 processes: 5 sharers.

use std::{ffi::CString, ptr};

use anyhow::anyhow;

use super::{THP, Waiters, mapped_ranges, pipe};
use crate::{
    checker::Checker,
    memory::{PAGE, read_each_page},
    metrics::MetricsSource,
};

pub(super) fn shared_file(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let name = CString::new("mapcount-shared").unwrap();
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(anyhow!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    unsafe { libc::ftruncate(fd, THP as i64) };
    let map_and_read = move || {
        let p = unsafe { libc::mmap(ptr::null_mut(), THP, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        read_each_page(p.cast(), THP / PAGE);
        p
    };
    // The parent writes the data, so every page exists before anyone maps it.
    let data = vec![3u8; THP];
    unsafe { libc::pwrite(fd, data.as_ptr().cast(), THP, 0) };
    // The parent runs the readers' code once too (and unmaps the file):
    // code pages that only the readers ran would have 5 sharers as well.
    let own = map_and_read();
    unsafe { libc::munmap(own, THP) };
    // Six children, five of which map the file: code pages that only
    // the children run (waiting, exiting) have six sharers or more,
    // whatever the parent ran, so exactly five is the file's pages.
    // Each child says when it has mapped and read (or, the sixth, when
    // it is about to wait): until then its page faults are still coming,
    // and a code page can have five sharers for a moment.
    let (ready_read, ready_write) = pipe();
    let readers = Waiters::spawn(6, |i| {
        if i < 5 {
            map_and_read();
        }
        unsafe { libc::write(ready_write, [0u8].as_ptr().cast(), 1) };
    });
    for _ in 0..6 {
        let mut byte = [0u8; 1];
        unsafe { libc::read(ready_read, byte.as_mut_ptr().cast(), 1) };
    }
    for fd in [ready_read, ready_write] {
        unsafe { libc::close(fd) };
    }
    metrics.settled_scrape()?;
    // The readers also map the workload's own binary, which lives in the
    // initramfs (tmpfs, so shmem too): its pages can have 5 sharers for a
    // moment (the sixth child wrote to the pipe and has yet to run the
    // code it waits in). Only the file's range in the first reader counts,
    // where the kernel's maps put it.
    let reader = readers.pids[0];
    let ranges = mapped_ranges(reader, "/memfd:mapcount-shared")?;
    if ranges.len() != 1 {
        return Err(anyhow!("the first reader maps the shared file {} times: {ranges:x?}", ranges.len()));
    }
    let (start, end) = ranges[0];
    let rows = metrics.folios_of(reader)?;
    let in_file = |address: u64| (start..end).contains(&(address as usize));
    let five = rows.iter().filter(|r| in_file(r.address) && r.kind == "shmem" && r.sharers == 5);
    let pages: usize = five.map(|r| 1usize << r.order).sum();
    checker.exact("d_shared_file/shmem_pages_with_5_sharers", THP / PAGE, pages as f64);
    readers.release();
    unsafe { libc::close(fd) };
    Ok(())
}
