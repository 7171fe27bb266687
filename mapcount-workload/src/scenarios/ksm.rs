//! e. 64 identical pages merged by ksmd; one write copies a KSM folio.

use std::{collections::HashMap, fs, ptr, thread::sleep, time::Duration};

use super::sysfs_write;
use crate::{
    checker::Checker,
    kernel::pfn,
    memory::{PAGE, map_anon, unmap, write_each_page},
    metrics::{MetricsSource, Scrape},
};

pub(super) fn ksm(metrics: &MetricsSource, checker: &mut Checker) -> anyhow::Result<()> {
    let ksm = "/sys/kernel/mm/ksm";
    if fs::metadata(ksm).is_err() {
        checker.not_applicable("e_ksm", "no KSM in this kernel");
        return Ok(());
    }
    sysfs_write(&format!("{ksm}/pages_to_scan"), "10000")?;
    sysfs_write(&format!("{ksm}/sleep_millisecs"), "0")?;
    sysfs_write(&format!("{ksm}/run"), "1")?;
    let pages = 64;
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    write_each_page(p, pages, 0x5a);
    if unsafe { libc::madvise(p.cast(), pages * PAGE, libc::MADV_MERGEABLE) } != 0 {
        let error = std::io::Error::last_os_error();
        checker.not_applicable("e_ksm", &format!("madvise(MADV_MERGEABLE): {error}"));
        unmap(p, pages);
        return Ok(());
    }
    let sharing = || -> u64 {
        fs::read_to_string(format!("{ksm}/pages_sharing"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    for _ in 0..120 {
        if sharing() >= pages as u64 - 1 {
            break;
        }
        sleep(Duration::from_millis(250));
    }
    // Stop ksmd (merged pages stay merged): a merge that fails half-way
    // makes ksmd itself break a KSM page with a write fault, and that
    // must not land inside the measurement.
    sysfs_write(&format!("{ksm}/run"), "0")?;
    // The kernel's answer: frames that several of the pages now share
    // (kpageflags' KSM bit is no help: 6.12 sets it on every anonymous page).
    let mut frames = HashMap::new();
    for i in 0..pages {
        *frames.entry(pfn(p as usize + i * PAGE)?).or_insert(0u32) += 1;
    }
    let merged = frames.values().filter(|&&n| n > 1).count();
    // The write below copies the first page if (and only if) it was merged.
    let first_merged = frames.get(&pfn(p as usize)?).is_some_and(|&n| n > 1);
    if merged == 0 {
        checker.not_applicable("e_ksm", "ksmd merged none of the pages");
        unmap(p, pages);
        return Ok(());
    }
    let before = metrics.settled_scrape()?;
    let ksm_folios = before.sum("mapcount_folios", &[("kind", "ksm")]);
    checker.exact("e_ksm/ksm_folios", merged, ksm_folios);
    unsafe { ptr::write_volatile(p, 1) };
    let after = metrics.settled_scrape()?;
    let copies = |s: &Scrape| s.sum("mapcount_cow_faults_total", &[("outcome", "copy"), ("kind", "ksm")]);
    for (series, value) in after.0.iter().filter(|(s, _)| s.starts_with("mapcount_cow_faults_total")) {
        let earlier: f64 = before.0.iter().filter(|(s, _)| s == series).map(|(_, v)| *v).sum();
        if value - earlier > 0.0 {
            println!("MAPCOUNT-NOTE e_ksm write: {series} +{}", value - earlier);
        }
    }
    checker.exact("e_ksm/ksm_copies", usize::from(first_merged), copies(&after) - copies(&before));
    sysfs_write(&format!("{ksm}/run"), "2")?; // unmerge everything
    unmap(p, pages);
    Ok(())
}
