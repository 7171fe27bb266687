//! What the kernel says, the known answers: pagemap, kpagecount and
//! kpageflags.

use std::{fs, io::Read as _};

use anyhow::{anyhow, bail};
use mapcount_common::{PSS_SHIFT, SmapsFigures};

use crate::memory::PAGE;

/// The page frame number of the page at `address` in process `pid`.
pub(crate) fn pid_pfn(pid: i32, address: usize) -> anyhow::Result<u64> {
    pagemap_pfn(&format!("/proc/{pid}/pagemap"), address)
}

/// The page frame number of the page at `address` (pagemap).
pub(crate) fn pfn(address: usize) -> anyhow::Result<u64> {
    pagemap_pfn("/proc/self/pagemap", address)
}

/// The 64-bit entry `index` of a `/proc` file of such entries (pagemap,
/// kpagecount, kpageflags).
fn read_entry(path: &str, index: u64) -> anyhow::Result<u64> {
    let mut f = fs::File::open(path).map_err(|e| anyhow!("{path}: {e}"))?;
    let mut buf = [0u8; 8];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(index * 8))?;
    f.read_exact(&mut buf).map_err(|e| anyhow!("{path}: {e}"))?;
    Ok(u64::from_le_bytes(buf))
}

pub(crate) fn pagemap_pfn(path: &str, address: usize) -> anyhow::Result<u64> {
    let entry = read_entry(path, (address / PAGE) as u64)?;
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 || pfn == 0 {
        bail!("page not present or PFN hidden");
    }
    Ok(pfn)
}

/// The kernel's page flags (`/proc/kpageflags`) of the page at `address`.
pub(crate) fn kpageflags(address: usize) -> anyhow::Result<u64> {
    kpage_file("/proc/kpageflags", address)
}

/// `KPF_THP`: the page belongs to a transparent huge page (of any order).
pub(crate) const KPF_THP: u64 = 1 << 22;

/// Whether the page at `address` is part of a THP, as the kernel says.
pub(crate) fn is_thp(address: usize) -> anyhow::Result<bool> {
    Ok(kpageflags(address)? & KPF_THP != 0)
}

/// The kernel's page_count() of the page at `address`: pagemap gives the
/// PFN, kpagecount the count.
pub(crate) fn kpagecount(address: usize) -> anyhow::Result<u64> {
    kpage_file("/proc/kpagecount", address)
}

/// The kernel's page_count() of page frame `pfn`.
pub(crate) fn kpagecount_of_frame(pfn: u64) -> anyhow::Result<u64> {
    read_entry("/proc/kpagecount", pfn)
}

/// The entry of a `/proc/kpage*` file for the page at `address`.
pub(crate) fn kpage_file(file: &str, address: usize) -> anyhow::Result<u64> {
    read_entry(file, pfn(address)?)
}

/// Whether the kernel keeps a mapcount for each page of a large folio (the
/// default), or only for the folio (`CONFIG_NO_PAGE_MAPCOUNT`, 6.15+): the
/// kernel's own configuration says, in /proc/config.gz. A kernel without
/// it is taken to be a default one (Debian's are).
pub(crate) fn per_page_mapcount() -> bool {
    let Ok(out) = std::process::Command::new("busybox").args(["zcat", "/proc/config.gz"]).output() else {
        return true;
    };
    !String::from_utf8_lossy(&out.stdout).lines().any(|l| l == "CONFIG_NO_PAGE_MAPCOUNT=y")
}

/// What the kernel reports about process `pid`'s pages in `[from, to)`:
/// smaps of the VMAs inside the range (none may straddle its ends), and
/// pagemap's `PM_MMAP_EXCLUSIVE` and kpagecount over its present pages.
/// Also how many of those pages pagemap calls exclusive where kpagecount
/// is not 1, or the other way round: on a kernel with per-page mapcounts
/// the two must agree, and where they do not, the kernel contradicts itself.
pub(crate) fn smaps_of(pid: i32, from: usize, to: usize) -> anyhow::Result<(SmapsFigures, u64)> {
    let path = format!("/proc/{pid}/smaps");
    let text = fs::read_to_string(&path).map_err(|e| anyhow!("{path}: {e}"))?;
    let mut figures = SmapsFigures::default();
    let mut inside = false;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            if start < to && end > from && (start < from || end > to) {
                bail!("the VMA {first} of process {pid} straddles [{from:#x}, {to:#x})");
            }
            inside = start >= from && end <= to;
            continue;
        }
        let bytes = words.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) << 10;
        match first {
            _ if !inside => {}
            "Rss:" => figures.rss_bytes += bytes,
            "Pss:" => figures.pss_shifted += bytes << PSS_SHIFT,
            "Shared_Clean:" | "Shared_Dirty:" => figures.shared_bytes += bytes,
            "Private_Clean:" | "Private_Dirty:" => figures.private_bytes += bytes,
            _ => {}
        }
    }
    let pagemap = format!("/proc/{pid}/pagemap");
    let mut contradictions = 0;
    for address in (from..to).step_by(PAGE) {
        let entry = read_entry(&pagemap, (address / PAGE) as u64)?;
        if entry >> 63 == 0 {
            continue;
        }
        let exclusive = (entry >> PM_MMAP_EXCLUSIVE_BIT) & 1;
        let count = kpagecount_of_frame(entry & ((1 << 55) - 1))?;
        figures.exclusive_pages += exclusive;
        figures.kpagecount_sum += count;
        contradictions += u64::from((exclusive == 1) != (count == 1));
    }
    Ok((figures, contradictions))
}

/// pagemap's "page exclusively mapped" bit.
const PM_MMAP_EXCLUSIVE_BIT: u64 = 56;

/// The exact figures of each of `pids` over `[from, to)`, from the page
/// frames pagemap gives: a frame that n of the processes map counts
/// 1/n of a page to each one's PSS, and is private where n is 1. Exact
/// where no other process maps the frames, whatever the kernel estimates.
pub(crate) fn frame_sharing(pids: &[i32], from: usize, to: usize) -> anyhow::Result<Vec<SmapsFigures>> {
    let mut frames_of = Vec::new();
    let mut mappers = std::collections::HashMap::<u64, u64>::new();
    for pid in pids {
        let pagemap = format!("/proc/{pid}/pagemap");
        let mut frames = Vec::new();
        for address in (from..to).step_by(PAGE) {
            let entry = read_entry(&pagemap, (address / PAGE) as u64)?;
            if entry >> 63 == 1 {
                let frame = entry & ((1 << 55) - 1);
                frames.push(frame);
                *mappers.entry(frame).or_default() += 1;
            }
        }
        frames_of.push(frames);
    }
    Ok(frames_of
        .iter()
        .map(|frames| {
            let mut figures = SmapsFigures::default();
            for frame in frames {
                let n = mappers[frame];
                figures.rss_bytes += PAGE as u64;
                figures.pss_shifted += ((PAGE as u64) << PSS_SHIFT) / n;
                figures.kpagecount_sum += n;
                if n == 1 {
                    figures.private_bytes += PAGE as u64;
                    figures.exclusive_pages += 1;
                } else {
                    figures.shared_bytes += PAGE as u64;
                }
            }
            figures
        })
        .collect())
}

/// smaps_rollup of process `pid`: Rss, Pss, Shared and Private over its
/// whole address space.
pub(crate) fn smaps_rollup(pid: i32) -> anyhow::Result<SmapsFigures> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = fs::read_to_string(&path).map_err(|e| anyhow!("{path}: {e}"))?;
    Ok(SmapsFigures::from_smaps_rollup(&text))
}

/// A counter of `/proc/vmstat`; `None` where this kernel keeps no such
/// counter (event counters need `CONFIG_VM_EVENT_COUNTERS`).
pub(crate) fn vmstat(name: &str) -> anyhow::Result<Option<u64>> {
    let text = fs::read_to_string("/proc/vmstat").map_err(|e| anyhow!("/proc/vmstat: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.trim().parse().ok()))
}
