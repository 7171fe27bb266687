//! Mappings made for the scenarios, and pages touched in them.

use std::ptr;

/// The page size of every kernel mapcount runs on.
pub(crate) const PAGE: usize = 4096;

/// A private anonymous mapping of `pages` small pages (THP disabled for it).
pub(crate) fn map_anon(pages: usize, flags: libc::c_int, prot: libc::c_int) -> *mut u8 {
    // SAFETY: plain anonymous mmap; failure is checked.
    let p = unsafe { libc::mmap(ptr::null_mut(), pages * PAGE, prot, flags | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap failed: {}", std::io::Error::last_os_error());
    // SAFETY: p is our mapping.
    unsafe { libc::madvise(p, pages * PAGE, libc::MADV_NOHUGEPAGE) };
    p.cast()
}

pub(crate) fn unmap(p: *mut u8, pages: usize) {
    // SAFETY: p was returned by mmap for this length.
    unsafe { libc::munmap(p.cast(), pages * PAGE) };
}

pub(crate) fn write_each_page(p: *mut u8, pages: usize, value: u8) {
    for i in 0..pages {
        // SAFETY: within the mapping; volatile so the write really happens.
        unsafe { ptr::write_volatile(p.add(i * PAGE), value) };
    }
}

pub(crate) fn read_each_page(p: *const u8, pages: usize) -> u64 {
    (0..pages).map(|i| u64::from(unsafe { ptr::read_volatile(p.add(i * PAGE)) })).sum()
}
