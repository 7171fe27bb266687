//! The basic paths with known page counts: anonymous faults, file reads,
//! fork and copy-on-write, the zero page, a shared mapping. `check` runs
//! each once and compares; the demo (`cargo xtask run`) loops over them so
//! that a dashboard has something to show. And the overload test's storm.

use std::{
    ffi::CString,
    ptr,
    time::{Duration, Instant},
};

use crate::memory::{PAGE, map_anon, read_each_page, unmap, write_each_page};

/// Pages touched once each in the anonymous run.
pub(crate) const ANON_PAGES: usize = 1000;
/// Pages of the file mapped and read.
pub(crate) const FILE_PAGES: usize = 256;
/// Pages the parent owns before fork and the child writes afterwards.
pub(crate) const COW_PAGES: usize = 100;
/// Pages read (zero page mapped) and then written.
pub(crate) const ZERO_PAGES: usize = 50;
/// Pages of a shared mapping read, made writable and written.
pub(crate) const SHARED_PAGES: usize = 20;

/// Every basic path once.
pub(crate) fn run_all(file_dir: &str) {
    run_anon(ANON_PAGES);
    run_file(file_dir, FILE_PAGES);
    run_fork_cow(COW_PAGES);
    run_zero_page(ZERO_PAGES);
    run_shared(SHARED_PAGES);
}

/// Fault in `pages` new anonymous pages, then unmap them.
pub(crate) fn run_anon(pages: usize) {
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    write_each_page(p, pages, 1);
    unmap(p, pages);
}

/// Map a file of `pages` pages and read every page, then unmap it.
pub(crate) fn run_file(dir: &str, pages: usize) {
    let path = format!("{dir}/mapcount-workload.data");
    std::fs::write(&path, vec![7u8; pages * PAGE]).expect("write the scratch file");
    let c_path = CString::new(path.clone()).expect("no NUL in path");
    // SAFETY: plain open/mmap with checked results.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0, "open {path}: {}", std::io::Error::last_os_error());
    let p = unsafe { libc::mmap(ptr::null_mut(), pages * PAGE, libc::PROT_READ, libc::MAP_PRIVATE, fd, 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap {path}: {}", std::io::Error::last_os_error());
    let sum = read_each_page(p.cast(), pages);
    assert_eq!(sum, 7 * pages as u64);
    unmap(p.cast(), pages);
    unsafe { libc::close(fd) };
    let _ = std::fs::remove_file(&path);
}

/// The parent faults in `pages` pages and forks; the child writes one byte
/// in each (one COW copy per page) and exits; then the parent writes them
/// again (one reuse per page: nobody else maps them any more).
pub(crate) fn run_fork_cow(pages: usize) {
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    write_each_page(p, pages, 1);
    // SAFETY: the child only touches memory and calls _exit.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            write_each_page(p, pages, 2);
            unsafe { libc::_exit(0) };
        }
        child => {
            let mut status = 0;
            unsafe { libc::waitpid(child, &mut status, 0) };
            write_each_page(p, pages, 3);
            unmap(p, pages);
        }
    }
}

/// Read `pages` pages (each maps the shared zero page), then write them:
/// each write copies from the zero page.
pub(crate) fn run_zero_page(pages: usize) {
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    assert_eq!(read_each_page(p, pages), 0);
    write_each_page(p, pages, 1);
    unmap(p, pages);
}

/// Write faults on a shared mapping: in a child (so nothing else of the
/// workload is affected), fault in a shared mapping, write-protect every PTE
/// by clearing the soft-dirty bits (`/proc/self/clear_refs`), then write each
/// page again. Shared mappings never COW: each write is a "shared" fault.
pub(crate) fn run_shared(pages: usize) {
    // SAFETY: the child only touches memory, writes a proc file and calls _exit.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let p = map_anon(pages, libc::MAP_SHARED, libc::PROT_READ | libc::PROT_WRITE);
            write_each_page(p, pages, 1);
            let cleared = std::fs::write("/proc/self/clear_refs", "4");
            write_each_page(p, pages, 2);
            unsafe { libc::_exit(i32::from(cleared.is_err())) };
        }
        child => {
            let mut status = 0;
            unsafe { libc::waitpid(child, &mut status, 0) };
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "clear_refs failed in the child"
            );
        }
    }
}

/// A fork / mmap / munmap storm on every CPU for `seconds`: many more rmap
/// events than a small ring buffer holds.
pub(crate) fn storm(seconds: u64) {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for _ in 0..cpus {
        // SAFETY: the worker only maps, touches, forks and exits.
        match unsafe { libc::fork() } {
            0 => {
                while Instant::now() < deadline {
                    let p = map_anon(64, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
                    write_each_page(p, 64, 1);
                    match unsafe { libc::fork() } {
                        0 => {
                            write_each_page(p, 64, 2);
                            unsafe { libc::_exit(0) };
                        }
                        child => unsafe {
                            libc::waitpid(child, ptr::null_mut(), 0);
                        },
                    }
                    unmap(p, 64);
                }
                unsafe { libc::_exit(0) };
            }
            pid => workers.push(pid),
        }
    }
    for pid in workers {
        unsafe { libc::waitpid(pid, ptr::null_mut(), 0) };
    }
}
