//! q. What smaps, pagemap and kpagecount report for THPs shared in part,
//! where a kernel without per-page mapcounts (`CONFIG_NO_PAGE_MAPCOUNT`)
//! reports an average instead. Two THPs, mapped by PMD in a parent; a fork
//! child unmaps half of the first (its PMD is split: 256 pages are mapped
//! twice, 256 once) and three quarters of the second (128 twice, 384
//! once). The average mapcount per page of the first rounds up to 2, of
//! the second down to 1, so the estimate's PSS is wrong both ways, and the
//! two-slot bit calls every page of both shared.
//!
//! Known answers: pagemap's frames (which pages each process maps) give
//! the exact figures on every kernel; the kernel's own smaps, pagemap and
//! kpagecount give the figures mapcountd must predict for it. The child is
//! born alone in a cgroup (where the kernel has cgroup v2): mapcountd's
//! figures for that cgroup must equal the child's smaps_rollup.

use super::{THP, Waiters, check_smaps, map_thp_aligned, my_pid, new_cgroup, pipe};
use crate::{
    checker::Checker,
    kernel::{is_thp, per_page_mapcount, smaps_rollup},
    memory::{PAGE, unmap, write_each_page},
    metrics::MetricsSource,
};

pub(super) fn smaps(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let pages = 2 * THP / PAGE;
    let region = map_thp_aligned(2 * THP);
    write_each_page(region, pages, 5);
    if !is_thp(region as usize)? || !is_thp(region as usize + THP)? {
        checker.not_applicable("q_smaps", "the kernel gave no PMD-mapped THPs");
        unmap(region, pages);
        return Ok(());
    }
    // The child alone in a cgroup: its figures per cgroup are its own.
    let cgroup = new_cgroup("mapcount-q");
    let (done_read, done_write) = pipe();
    let child = Waiters::spawn_into(cgroup.as_ref().map(|(_, fd)| *fd), 1, |_| {
        unsafe { libc::close(done_read) };
        let start = region as usize;
        unmap((start + THP / 2) as *mut u8, THP / 2 / PAGE);
        unmap((start + THP + THP / 4) as *mut u8, 3 * THP / 4 / PAGE);
        unsafe { libc::write(done_write, [1u8].as_ptr().cast(), 1) };
    });
    unsafe { libc::close(done_write) };
    let mut byte = [0u8; 1];
    unsafe { libc::read(done_read, byte.as_mut_ptr().cast(), 1) };
    unsafe { libc::close(done_read) };
    let from = region as usize;
    let result = check_smaps(
        metrics,
        checker,
        "q_smaps",
        &[("parent", my_pid()), ("child", child.pids()[0])],
        from,
        from + 2 * THP,
    );
    let result = result.and_then(|()| match &cgroup {
        Some((name, _)) => check_cgroup(metrics, checker, name, child.pids()[0]),
        None => {
            checker.not_applicable("q_smaps/cgroup", "the kernel has no cgroup v2");
            Ok(())
        }
    });
    child.release();
    unmap(region, pages);
    if let Some((name, fd)) = cgroup {
        unsafe { libc::close(fd) };
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup{name}"));
    }
    result
}

/// mapcountd's figures for the cgroup against the smaps_rollup of the one
/// process in it: its whole address space, every page of which the
/// daemon saw being mapped (the process was forked while it ran).
fn check_cgroup(
    metrics: &MetricsSource,
    checker: &mut Checker,
    cgroup: &str,
    pid: i32,
) -> anyhow::Result<()> {
    // The child shares its anonymous pages with this process, whose every
    // write to one of them (the heap, while it scrapes) makes the child's
    // copy private: sharing only ever decreases. A scrape between two equal
    // readings of smaps_rollup saw the state they read.
    let mut attempts = 0;
    let (scrape, rollup) = loop {
        let before = smaps_rollup(pid)?;
        let scrape = metrics.settled_scrape()?;
        let after = smaps_rollup(pid)?;
        attempts += 1;
        if before == after || attempts == 10 {
            break (scrape, after);
        }
    };
    let model = if per_page_mapcount() { "exact" } else { "no_page_mapcount" };
    let kb = |figure: &str, model: &str| {
        scrape
            .sum("mapcount_cgroup_memory_bytes", &[("cgroup", cgroup), ("figure", figure), ("model", model)])
            / 1024.0
    };
    let rows = [
        ("rss", rollup.rss_bytes >> 10),
        ("pss", rollup.pss_kb()),
        ("private", rollup.private_bytes >> 10),
        ("shared", rollup.shared_bytes >> 10),
    ];
    for (figure, known) in rows {
        checker.exact(&format!("q_smaps/cgroup_{figure}_kb"), known as usize, kb(figure, model).floor());
    }
    checker.exact("q_smaps/cgroup_undetermined_kb", 0, kb("undetermined", "exact"));
    // The audit table while the child lives, for the log.
    if let Ok(out) = std::process::Command::new("mapcountd").args(["audit", "--kernel"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("MAPCOUNT-NOTE q_smaps audit: {line}");
        }
    }
    Ok(())
}
