//! r. What the guess at "mapped by somebody else" costs khugepaged: it
//! refuses to collapse a PMD range when more than
//! `khugepaged/max_ptes_shared` of its PTEs map folios it takes for shared
//! (`SCAN_EXCEED_SHARED_PTE`, counted by the kernel in /proc/vmstat as
//! `thp_scan_exceed_share_pte`). With the limit at 0, one such PTE is
//! enough, and mapcountd must count each refusal, by whether the folio
//! that crossed the limit is shared in truth:
//!
//! 1. Shared in truth (every kernel): small pages a fork child also maps.
//! 2. Exclusive in truth (6.8+, mTHP): a 64 KiB folio left to a second
//!    fork child alone, as in scenario p. It never had one of the folio's
//!    two `_mm_ids` slots, so 6.15+ keep the shared bit set and refuse;
//!    6.10-6.14's `folio_likely_mapped_shared` says exclusive and collapse.
//!    Then the limit goes back up and khugepaged collapses the range: the
//!    table must show the child's new PMD-mapped THP.

use std::{fs, ptr, thread, time::Duration};

use super::{Cue, THP, Waiters, at_least, frames_mapped_once, map_thp_aligned, sysfs_write};
use crate::{
    checker::Checker,
    kernel::{is_thp, pfn, pid_pfn, vmstat},
    memory::{PAGE, map_anon, unmap, write_each_page},
    metrics::{MetricsSource, Scrape},
};

const KHUGEPAGED: &str = "/sys/kernel/mm/transparent_hugepage/khugepaged";
const PMD_SIZE_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/enabled";
const MTHP_64K_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/hugepages-64kB/enabled";
const REFUSALS: &str = "thp_scan_exceed_share_pte";
const PAGES: usize = 16;

pub(super) fn khugepaged(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let watched = metrics
        .settled_scrape()?
        .sum("mapcount_probe_attached", &[("probe", "khugepaged_shared_refusals"), ("mode", "tracepoint")]);
    // Every kernel the tests boot has the tracepoint: not attached is a failure.
    checker.exact("r_khugepaged/tracepoint_attached", 1, watched);
    if watched == 0.0 {
        return Ok(());
    }
    if vmstat(REFUSALS)?.is_none() {
        let why = "the kernel counts no VM events (CONFIG_VM_EVENT_COUNTERS=n): no known answer";
        checker.not_applicable("r_khugepaged", why);
        return Ok(());
    }
    let settings = Settings::save()?;
    quiet()?;
    let result = truly_shared(metrics, checker).and_then(|()| guessed_shared(metrics, checker, &settings));
    settings.restore();
    result
}

/// The sysfs settings the scenario changes, as they were.
struct Settings {
    max_ptes_shared: String,
    scan_sleep: String,
    pmd_size: Option<String>,
    mthp_64k: Option<String>,
}

/// The selected value of a sysfs choice ("always [madvise] never").
fn selected(path: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let start = text.find('[')? + 1;
    let end = text[start..].find(']')? + start;
    Some(text[start..end].to_owned())
}

impl Settings {
    fn save() -> anyhow::Result<Self> {
        let read = |name: &str| -> anyhow::Result<String> {
            Ok(fs::read_to_string(format!("{KHUGEPAGED}/{name}"))?.trim().to_owned())
        };
        Ok(Settings {
            max_ptes_shared: read("max_ptes_shared")?,
            scan_sleep: read("scan_sleep_millisecs")?,
            pmd_size: selected(PMD_SIZE_ENABLED),
            mthp_64k: selected(MTHP_64K_ENABLED),
        })
    }

    fn restore(&self) {
        let _ = sysfs_write(&format!("{KHUGEPAGED}/max_ptes_shared"), &self.max_ptes_shared);
        let _ = sysfs_write(&format!("{KHUGEPAGED}/scan_sleep_millisecs"), &self.scan_sleep);
        if let Some(value) = &self.pmd_size {
            let _ = sysfs_write(PMD_SIZE_ENABLED, value);
        }
        if let Some(value) = &self.mthp_64k {
            let _ = sysfs_write(MTHP_64K_ENABLED, value);
        }
    }
}

/// khugepaged asleep while a scene is set, so that it finds it whole.
fn quiet() -> anyhow::Result<()> {
    sysfs_write(&format!("{KHUGEPAGED}/scan_sleep_millisecs"), "60000")
}

/// Wakes khugepaged every 100 ms until `done` or 30 s have passed; then
/// lets it sleep again.
fn scan_until(mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<bool> {
    sysfs_write(&format!("{KHUGEPAGED}/scan_sleep_millisecs"), "100")?;
    let mut finished = false;
    for _ in 0..300 {
        if done()? {
            finished = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    quiet()?;
    Ok(finished)
}

/// The kernel's count of refusals for shared PTEs.
fn kernel_refusals() -> anyhow::Result<u64> {
    Ok(vmstat(REFUSALS)?.unwrap_or(0))
}

fn refusals(scrape: &Scrape, truth: &str) -> f64 {
    let labels: &[(&str, &str)] = if truth.is_empty() { &[] } else { &[("truth", truth)] };
    scrape.sum("mapcount_khugepaged_shared_pte_refusals_total", labels)
}

/// 1. Small pages the parent and a child map: refused, shared in truth.
fn truly_shared(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    // Faulted before MADV_HUGEPAGE (the VM boots with THP on madvise):
    // small folios.
    let raw = map_anon(2 * THP / PAGE, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    let range = (raw as usize).next_multiple_of(THP) as *mut u8;
    write_each_page(range, PAGES, 7);
    let child = Waiters::spawn(1, |_| {});
    let before = metrics.settled_scrape()?;
    let kernel_before = kernel_refusals()?;
    sysfs_write(&format!("{KHUGEPAGED}/max_ptes_shared"), "0")?;
    // Now eligible: the parent's address space joins khugepaged's list.
    unsafe { libc::madvise(range.cast(), THP, libc::MADV_HUGEPAGE) };
    let refused = scan_until(|| Ok(kernel_refusals()? > kernel_before))?;
    // What the table holds of the range: the pages and who maps them.
    metrics.settled_scrape()?;
    let rows = metrics.folios_of(super::my_pid())?;
    let in_range: Vec<_> =
        rows.iter().filter(|r| (range as u64..range as u64 + THP as u64).contains(&r.address)).collect();
    println!(
        "MAPCOUNT-NOTE r_khugepaged: the table holds {} folios of the range, {} mapped by two address spaces",
        in_range.len(),
        in_range.iter().filter(|r| r.sharers == 2).count()
    );
    // Unmapping waits for a scan in progress (it holds the mmap lock).
    unmap(raw, 2 * THP / PAGE);
    let known = kernel_refusals()? - kernel_before;
    child.release();
    let after = metrics.settled_scrape()?;
    println!(
        "MAPCOUNT-NOTE r_khugepaged: shared pages refused {known} times (kernel), refused before 30 s: {refused}"
    );
    // The refused PTE is the range's first: before 6.10 the kernel may
    // name the folio of the PTE before it (Debian's 6.1 does), here none.
    let truth = if at_least((6, 10)) { "shared" } else { "unnamed" };
    checker.exact(
        "r_khugepaged/shared_refusals",
        known as usize,
        refusals(&after, truth) - refusals(&before, truth),
    );
    checker.exact(
        "r_khugepaged/all_refusals_of_shared",
        known as usize,
        refusals(&after, "") - refusals(&before, ""),
    );
    Ok(())
}

/// 2. A 64 KiB folio one child alone maps, with the shared bit set.
fn guessed_shared(metrics: &MetricsSource, checker: &mut Checker, settings: &Settings) -> anyhow::Result<()> {
    if !at_least((6, 8)) || settings.mthp_64k.is_none() || settings.pmd_size.is_none() {
        checker.not_applicable("r_khugepaged/guessed", "no anonymous mTHP on this kernel");
        return Ok(());
    }
    // A 64 KiB folio at the start of a 2 MiB range: PMD-sized THPs off
    // while it is faulted, then mTHP off, so that khugepaged later
    // considers the range for a PMD only.
    sysfs_write(PMD_SIZE_ENABLED, "never")?;
    sysfs_write(MTHP_64K_ENABLED, "always")?;
    let range = map_thp_aligned(THP);
    write_each_page(range, PAGES, 8);
    sysfs_write(MTHP_64K_ENABLED, "never")?;
    if !is_thp(range as usize)? {
        checker.not_applicable("r_khugepaged/guessed", "the kernel gave no 64 KiB folio");
        unmap(range, THP / PAGE);
        return Ok(());
    }
    let first_frame = pfn(range as usize)?;
    let frames = first_frame..first_frame + PAGES as u64;
    // The first child takes the folio's second slot; the second finds none.
    let first = Waiters::spawn(1, |_| {});
    let cue = Cue::new();
    let survivor = Waiters::spawn(1, |_| {
        first.forget_in_child();
        cue.wait();
        // A change of flags puts this address space on khugepaged's list
        // (a fork child of a listed one is on it already).
        unsafe { libc::madvise(range.cast(), THP, libc::MADV_NOHUGEPAGE) };
        unsafe { libc::madvise(range.cast(), THP, libc::MADV_HUGEPAGE) };
        // Young PTEs (khugepaged collapses only referenced ranges), and
        // one writable one (6.1-6.x want one): the last page's copy.
        for i in 0..PAGES {
            unsafe { ptr::read_volatile(range.add(i * PAGE)) };
        }
        unsafe { ptr::write_volatile(range.add((PAGES - 1) * PAGE), 9) };
        cue.done();
    });
    let child = survivor.pids()[0];
    unmap(range, THP / PAGE);
    first.release();
    let before = metrics.settled_scrape()?;
    let kernel_before = kernel_refusals()?;
    // The limit first: turning PMD-sized THPs back on wakes khugepaged.
    sysfs_write(&format!("{KHUGEPAGED}/max_ptes_shared"), "0")?;
    if let Some(value) = &settings.pmd_size {
        sysfs_write(PMD_SIZE_ENABLED, if value == "never" { "inherit" } else { value })?;
    }
    cue.go_and_wait();
    // The kernel: the child alone maps what is left of the folio.
    let (mapped, mapped_once) = frames_mapped_once(child, range as usize, 0..PAGES, &frames)?;
    let exclusive = mapped > 0 && mapped_once == mapped;
    // Collapsed: a page never touched is present, in a 2 MiB-aligned frame run.
    let collapsed = || -> anyhow::Result<bool> {
        let (Ok(head), Ok(middle)) =
            (pid_pfn(child, range as usize), pid_pfn(child, range as usize + 300 * PAGE))
        else {
            return Ok(false);
        };
        Ok(head % 512 == 0 && middle == head + 300)
    };
    let refused = scan_until(|| Ok(kernel_refusals()? > kernel_before || collapsed()?))?;
    // The limit back up: nothing else stands in the way. Once collapsed,
    // the range is refused no more: the kernel's count is final.
    sysfs_write(&format!("{KHUGEPAGED}/max_ptes_shared"), &settings.max_ptes_shared)?;
    let done = scan_until(&collapsed)?;
    let known = kernel_refusals()? - kernel_before;
    let after = metrics.settled_scrape()?;
    println!(
        "MAPCOUNT-NOTE r_khugepaged: exclusive 64 KiB folio ({mapped} pages mapped, {mapped_once} once) refused {known} times (kernel), scan ended {refused}, collapsed {done}"
    );
    checker.exact(
        "r_khugepaged/exclusive_refusals",
        known as usize * usize::from(exclusive),
        refusals(&after, "exclusive") - refusals(&before, "exclusive"),
    );
    checker.exact(
        "r_khugepaged/all_refusals_of_exclusive",
        known as usize,
        refusals(&after, "") - refusals(&before, ""),
    );
    // The table after the collapse: one PMD-mapped THP at the range.
    let rows = metrics.folios_of(child)?;
    let thps = rows
        .iter()
        .filter(|r| r.address == range as u64 && r.order == 9 && r.pmds == 1 && r.sharers == 1)
        .count();
    checker.exact("r_khugepaged/collapsed_thp", usize::from(collapsed()?), thps as f64);
    survivor.release();
    Ok(())
}
