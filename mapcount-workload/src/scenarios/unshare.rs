//! m. Pages a child shares with its parent, read by the parent with
//! process_vm_readv: a read-only pin (FOLL_PIN) of a page that may be
//! shared makes the kernel unshare it in the child first
//! (FAULT_FLAG_UNSHARE), which is not a write. The kernel's answer:
//! the child's pages that no longer share the parent's frame (pagemap).

use anyhow::anyhow;

use super::Waiters;
use crate::{
    checker::Checker,
    kernel::{pfn, pid_pfn},
    memory::{PAGE, map_anon, unmap, write_each_page},
    metrics::{MetricsSource, Scrape},
};

pub(super) fn unshare(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let pages = 16;
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    unsafe { libc::madvise(p.cast(), pages * PAGE, libc::MADV_NOHUGEPAGE) };
    write_each_page(p, pages, 3);
    let frames: Vec<u64> = (0..pages).map(|i| pfn(p as usize + i * PAGE)).collect::<Result<_, _>>()?;
    let child = Waiters::spawn(1, |_| {});
    let pid = child.pids[0];
    let before = metrics.settled_scrape()?;
    let mut buffer = vec![0u8; pages * PAGE];
    let local = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
    let remote = libc::iovec { iov_base: p.cast(), iov_len: pages * PAGE };
    let read = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if read < 0 {
        return Err(anyhow!("process_vm_readv: {}", std::io::Error::last_os_error()));
    }
    let after = metrics.settled_scrape()?;
    let mut unshared = 0;
    for (i, frame) in frames.iter().enumerate() {
        if pid_pfn(pid, p as usize + i * PAGE)? != *frame {
            unshared += 1;
        }
    }
    let outcome = |s: &Scrape, o: &str| s.sum("mapcount_cow_faults_total", &[("outcome", o)]);
    checker.exact(
        "m_unshare/unshare_faults",
        unshared,
        outcome(&after, "unshare") - outcome(&before, "unshare"),
    );
    println!("MAPCOUNT-NOTE m_unshare: the kernel unshared {unshared} of {pages} pages");
    child.release();
    unmap(p, pages);
    Ok(())
}
