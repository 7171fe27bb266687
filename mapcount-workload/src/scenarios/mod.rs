//! The scenarios: each maps, forks, moves or pins memory in a way that
//! has a known answer from the kernel (pagemap, kpagecount, kpageflags),
//! and checks mapcountd's view against it. One file each; `run_all` runs
//! them in order (a to s). See README.md in this folder to add one.

mod daemon_pages;
mod driver_pages;
mod file_pmd_fork;
mod hugetlb;
mod khugepaged;
mod ksm;
mod large_folio_cow;
mod maybe_shared;
mod mprotect_fork;
mod mremap_fork;
mod partial;
mod pinned_fork;
mod pmd_reuse;
mod refcount;
mod shared_file;
mod shared_thp;
mod smaps;
mod thp_cow;
mod unshare;

use std::{fs, ptr};

use anyhow::anyhow;
use daemon_pages::daemon_pages;
use driver_pages::driver_pages;
use file_pmd_fork::file_pmd_fork;
use hugetlb::hugetlb;
use khugepaged::khugepaged;
use ksm::ksm;
use large_folio_cow::large_folio_cow;
use maybe_shared::maybe_shared;
use mprotect_fork::mprotect_fork;
use mremap_fork::mremap_fork;
use partial::partial;
use pinned_fork::pinned_fork;
use pmd_reuse::pmd_reuse;
use refcount::refcount;
use shared_file::shared_file;
use shared_thp::shared_thp;
use smaps::smaps;
use thp_cow::thp_cow;
use unshare::unshare;

use crate::{
    checker::Checker,
    kernel::{is_thp, kpagecount},
    memory::{PAGE, unmap, write_each_page},
    metrics::{MetricsSource, Scrape},
};

pub(super) const THP: usize = 2 << 20;

pub(super) fn kernel_version() -> (u32, u32) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

pub(super) fn at_least(version: (u32, u32)) -> bool {
    kernel_version() >= version
}

pub(super) fn sysfs_write(path: &str, value: &str) -> anyhow::Result<()> {
    fs::write(path, value).map_err(|e| anyhow!("write {value} to {path}: {e}"))
}

/// Anonymous memory aligned to 2 MiB, THP requested.
pub(super) fn map_thp_aligned(bytes: usize) -> *mut u8 {
    // SAFETY: plain anonymous mmap; failure is checked.
    let raw = unsafe {
        libc::mmap(
            ptr::null_mut(),
            bytes + THP,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(raw, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    let aligned = (raw as usize).next_multiple_of(THP) as *mut u8;
    // SAFETY: within our mapping.
    unsafe { libc::madvise(aligned.cast(), bytes, libc::MADV_HUGEPAGE) };
    aligned
}

/// A 64 KiB anonymous folio (mTHP, order 4), its 16 pages written with
/// `fill`; `None` after saying why not (`name` not applicable) where the
/// kernel has no anonymous mTHP or gave a folio of another size.
pub(super) fn map_64k_folio(checker: &mut Checker, name: &str, fill: u8) -> anyhow::Result<Option<*mut u8>> {
    const PAGES: usize = 16;
    let mthp = "/sys/kernel/mm/transparent_hugepage/hugepages-64kB/enabled";
    if !at_least((6, 8)) || fs::metadata(mthp).is_err() {
        checker.not_applicable(name, "no anonymous mTHP on this kernel");
        return Ok(None);
    }
    sysfs_write(mthp, "madvise")?;
    let q = map_thp_aligned(PAGES * PAGE);
    write_each_page(q, PAGES, fill);
    if !is_thp(q as usize)? {
        checker.not_applicable(name, "the kernel gave no 64 KiB folio");
        unmap(q, PAGES);
        return Ok(None);
    }
    Ok(Some(q))
}

/// Children that wait until the returned pipe's write end is closed.
pub(super) struct Waiters {
    pids: Vec<i32>,
    release: i32,
}

impl Waiters {
    /// `child(i)` runs in the i-th child before it waits.
    pub(crate) fn spawn(n: usize, child: impl Fn(usize)) -> Waiters {
        Self::spawn_into(None, n, child)
    }

    /// The same, with the children born in the cgroup whose directory
    /// `cgroup` is open on, if any.
    pub(crate) fn spawn_into(cgroup: Option<i32>, n: usize, child: impl Fn(usize)) -> Waiters {
        let mut fds = [0; 2];
        // SAFETY: plain pipe/fork; the children only wait and _exit.
        unsafe { libc::pipe(fds.as_mut_ptr()) };
        let mut pids = Vec::new();
        for i in 0..n {
            match fork_into(cgroup) {
                0 => {
                    unsafe { libc::close(fds[1]) };
                    child(i);
                    let mut byte = [0u8; 1];
                    unsafe { libc::read(fds[0], byte.as_mut_ptr().cast(), 1) };
                    unsafe { libc::_exit(0) };
                }
                pid => pids.push(pid),
            }
        }
        unsafe { libc::close(fds[0]) };
        Waiters { pids, release: fds[1] }
    }

    pub(crate) fn pids(&self) -> &[i32] {
        &self.pids
    }

    /// For a process forked after these children: it inherited the write
    /// end that releases them, and must close it, or they never return.
    pub(crate) fn forget_in_child(&self) {
        unsafe { libc::close(self.release) };
    }

    pub(crate) fn release(self) {
        unsafe { libc::close(self.release) };
        for pid in self.pids {
            let mut status = 0;
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
    }
}

/// fork(); or, given a cgroup directory's descriptor, clone3() with
/// `CLONE_INTO_CGROUP`: the child is born in that cgroup, so no reader of
/// `/proc/PID/cgroup` ever sees it anywhere else.
fn fork_into(cgroup: Option<i32>) -> i32 {
    let Some(fd) = cgroup else { return unsafe { libc::fork() } };
    /// `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: fd as u64,
        ..CloneArgs::default()
    };
    // SAFETY: like fork() (no new stack); the child only waits and _exits.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, size_of::<CloneArgs>()) };
    assert!(pid >= 0, "clone3 into a cgroup: {}", std::io::Error::last_os_error());
    pid as i32
}

/// A new cgroup v2 directory `name`, opened; `None` where the kernel has
/// no cgroup v2 (it is mounted here if it is not yet).
pub(super) fn new_cgroup(name: &str) -> Option<(String, i32)> {
    let root = "/sys/fs/cgroup";
    if fs::metadata(format!("{root}/cgroup.procs")).is_err() {
        fs::create_dir_all(root).ok()?;
        let mounted = unsafe {
            libc::mount(c"none".as_ptr(), c"/sys/fs/cgroup".as_ptr(), c"cgroup2".as_ptr(), 0, ptr::null())
        };
        if mounted != 0 {
            return None;
        }
    }
    let dir = format!("{root}/{name}");
    let _ = fs::create_dir(&dir);
    let path = std::ffi::CString::new(dir.clone()).ok()?;
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    (fd >= 0).then_some((format!("/{name}"), fd))
}

/// The address ranges of `pid` that map the file at `path` (as
/// /proc/PID/maps names it, "(deleted)" or not).
pub(super) fn mapped_ranges(pid: i32, path: &str) -> anyhow::Result<Vec<(usize, usize)>> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut ranges = Vec::new();
    for line in maps.lines().filter(|l| l.trim_end_matches(" (deleted)").ends_with(path)) {
        let Some((start, end)) = line.split_whitespace().next().and_then(|r| r.split_once('-')) else {
            continue;
        };
        ranges.push((usize::from_str_radix(start, 16)?, usize::from_str_radix(end, 16)?));
    }
    Ok(ranges)
}

pub(super) fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    unsafe { libc::pipe(fds.as_mut_ptr()) };
    (fds[0], fds[1])
}

/// A child told when to act, and the parent told when it has: two pipes,
/// made before the fork. The child calls [`Cue::wait`] then
/// [`Cue::done`]; the parent [`Cue::go_and_wait`].
pub(super) struct Cue {
    go: (i32, i32),
    done: (i32, i32),
}

impl Cue {
    pub(super) fn new() -> Cue {
        Cue { go: pipe(), done: pipe() }
    }

    /// In the child: blocks until the parent says go.
    pub(super) fn wait(&self) {
        unsafe { libc::close(self.go.1) };
        unsafe { libc::close(self.done.0) };
        let mut byte = [0u8; 1];
        unsafe { libc::read(self.go.0, byte.as_mut_ptr().cast(), 1) };
    }

    /// In the child: tells the parent it has acted.
    pub(super) fn done(&self) {
        unsafe { libc::write(self.done.1, [0u8].as_ptr().cast(), 1) };
    }

    /// In the parent: lets the child act and waits until it has.
    pub(super) fn go_and_wait(self) {
        unsafe { libc::close(self.go.1) };
        let mut byte = [0u8; 1];
        unsafe { libc::read(self.done.0, byte.as_mut_ptr().cast(), 1) };
        for fd in [self.go.0, self.done.0, self.done.1] {
            unsafe { libc::close(fd) };
        }
    }
}

/// The kernel's view of the pages at `pages` (indexes from `start`) of
/// process `pid` that still map frames of `frames`: how many do, and how
/// many of those frames are mapped once (kpagecount 1).
pub(super) fn frames_mapped_once(
    pid: i32,
    start: usize,
    pages: std::ops::Range<usize>,
    frames: &std::ops::Range<u64>,
) -> anyhow::Result<(usize, usize)> {
    let (mut mapped, mut once) = (0, 0);
    for i in pages {
        if let Ok(frame) = crate::kernel::pid_pfn(pid, start + i * PAGE)
            && frames.contains(&frame)
        {
            mapped += 1;
            once += usize::from(crate::kernel::kpagecount_of_frame(frame)? == 1);
        }
    }
    Ok((mapped, once))
}

pub(super) fn my_pid() -> i32 {
    unsafe { libc::getpid() }
}

pub fn run_all(metrics: &MetricsSource, checker: &mut Checker, base: &Scrape) -> anyhow::Result<()> {
    type Scenario = fn(&MetricsSource, &mut Checker) -> anyhow::Result<()>;
    let scenarios: [(&str, Scenario); 19] = [
        ("a_shared_thp", shared_thp),
        ("b_partial", partial),
        ("c_cow_large", large_folio_cow),
        ("d_shared_file", shared_file),
        ("e_ksm", ksm),
        ("f_driver", driver_pages),
        ("g_refcount", refcount),
        ("h_mremap_fork", mremap_fork),
        ("i_mprotect_fork", mprotect_fork),
        ("j_file_pmd_fork", file_pmd_fork),
        ("k_pmd_reuse", pmd_reuse),
        ("l_thp_cow", thp_cow),
        ("m_unshare", unshare),
        ("n_pinned_fork", pinned_fork),
        ("o_hugetlb", hugetlb),
        ("p_maybe_shared", maybe_shared),
        ("q_smaps", smaps),
        ("r_khugepaged", khugepaged),
        ("s_daemon_pages", daemon_pages),
    ];
    let mut last = metrics.settled_scrape()?.sum("mapcount_mapcount_disagreements_total", &[]);
    for (name, scenario) in scenarios {
        scenario(metrics, checker)?;
        let now = metrics.settled_scrape()?.sum("mapcount_mapcount_disagreements_total", &[]);
        println!("MAPCOUNT-NOTE {name}: {} disagreements", now - last);
        last = now;
    }
    let after = metrics.settled_scrape()?;
    // Every event of every scenario, checked against the kernel's own counter.
    let disagreements = after.sum("mapcount_mapcount_disagreements_total", &[])
        - base.sum("mapcount_mapcount_disagreements_total", &[]);
    // None. The 1 to 7 per run once accepted as noise were the daemon's
    // own mappings of library pages, left out (s_daemon_pages).
    checker.exact("crosscheck/disagreements", 0, disagreements);
    // Every scenario's processes have exited: nothing of theirs may be
    // left in the table when the kernel tore their address spaces down.
    // (Corrections by the self-check are disagreements, counted above.)
    let teardown = [("found", "teardown")];
    let phantoms = after.sum("mapcount_phantom_mappings_total", &teardown)
        - base.sum("mapcount_phantom_mappings_total", &teardown);
    checker.exact("crosscheck/phantom_mappings", 0, phantoms);
    Ok(())
}

/// Order-9 anonymous folios of this process that the kernel says are
/// mapped `count` times at these addresses (kpagecount of the first page).
pub(super) fn thps_mapped(addresses: &[usize], count: u64) -> anyhow::Result<usize> {
    let mut found = 0;
    for &address in addresses {
        if is_thp(address)? && kpagecount(address)? == count {
            found += 1;
        }
    }
    Ok(found)
}

/// Order-9 anonymous folios of this process with `sharers` sharers, in the daemon's view.
pub(super) fn thps_with_sharers(metrics: &MetricsSource, sharers: u32) -> anyhow::Result<usize> {
    metrics.settled_scrape()?;
    let rows = metrics.folios_of(my_pid())?;
    Ok(rows.iter().filter(|r| r.kind == "anon" && r.order == 9 && r.sharers == sharers).count())
}

/// Checks mapcountd's `/debug/smaps` for the pages each of `processes`
/// (a name, a pid) maps in `[from, to)`, which no other process may map:
/// - its exact column against the sharing of page frames in pagemap, on
///   every kernel;
/// - the column for this kernel (exact, or the estimate of a kernel
///   without per-page mapcounts) against what the kernel's smaps, pagemap
///   and kpagecount report.
///
/// The other column is printed next to it: where the two differ is what
/// the estimate gets wrong.
pub(super) fn check_smaps(
    metrics: &MetricsSource,
    checker: &mut Checker,
    name: &str,
    processes: &[(&str, i32)],
    from: usize,
    to: usize,
) -> anyhow::Result<()> {
    let per_page = crate::kernel::per_page_mapcount();
    let pids: Vec<i32> = processes.iter().map(|(_, pid)| *pid).collect();
    let truths = crate::kernel::frame_sharing(&pids, from, to)?;
    metrics.settled_scrape()?;
    for ((who, pid), truth) in processes.iter().zip(truths) {
        let (kernel, contradictions) = crate::kernel::smaps_of(*pid, from, to)?;
        let daemon = metrics.smaps_of(*pid, from, to)?;
        let kb = |bytes: u64| (bytes >> 10) as usize;
        let exact = &daemon.exact;
        checker.exact(&format!("{name}/{who}_exact_pss_kb"), truth.pss_kb() as usize, exact.pss_kb() as f64);
        checker.exact(
            &format!("{name}/{who}_exact_private_kb"),
            kb(truth.private_bytes),
            (exact.private_bytes >> 10) as f64,
        );
        checker.exact(
            &format!("{name}/{who}_exact_exclusive_pages"),
            truth.exclusive_pages as usize,
            exact.exclusive_pages as f64,
        );
        checker.exact(&format!("{name}/{who}_undetermined_kb"), 0, (exact.undetermined_bytes >> 10) as f64);
        let (column, label) =
            if per_page { (&daemon.exact, "exact") } else { (&daemon.no_page_mapcount, "estimate") };
        let rows: [(&str, u64, u64); 6] = [
            ("rss_kb", kernel.rss_bytes >> 10, column.rss_bytes >> 10),
            ("pss_kb", kernel.pss_kb(), column.pss_kb()),
            ("shared_kb", kernel.shared_bytes >> 10, column.shared_bytes >> 10),
            ("private_kb", kernel.private_bytes >> 10, column.private_bytes >> 10),
            ("exclusive_pages", kernel.exclusive_pages, column.exclusive_pages),
            ("kpagecount_sum", kernel.kpagecount_sum, column.kpagecount_sum),
        ];
        for (field, known, reported) in rows {
            let check = format!("{name}/{who}_kernel_{field}");
            // 6.1's and 7.3's pagemap judge every page of a PMD-mapped THP
            // by the first page's mapcount (6.12 looks at each page): their
            // own kpagecount says otherwise (docs/audit.md).
            if field == "exclusive_pages" && per_page && contradictions > 0 {
                println!(
                    "MAPCOUNT-NOTE {check}: the kernel's pagemap calls {known} pages exclusive, mapcountd \
                     {reported}; on {contradictions} pages pagemap and kpagecount contradict each other"
                );
                checker.not_applicable(&check, "the kernel's pagemap contradicts its own kpagecount");
                continue;
            }
            checker.exact(&check, known as usize, reported as f64);
        }
        let estimate = &daemon.no_page_mapcount;
        println!(
            "MAPCOUNT-NOTE {name} {who}: the kernel's figures match mapcountd's {label} column; \
             Pss {} kB exact, {} kB estimated; Private {} kB exact, {} kB estimated; \
             exclusive pages {} exact, {} estimated; kpagecount sum {} exact, {} estimated",
            exact.pss_kb(),
            estimate.pss_kb(),
            exact.private_bytes >> 10,
            estimate.private_bytes >> 10,
            exact.exclusive_pages,
            estimate.exclusive_pages,
            exact.kpagecount_sum,
            estimate.kpagecount_sum
        );
    }
    Ok(())
}
