//! What the kernel says, the known answers: pagemap, kpagecount and
//! kpageflags.

use std::{fs, io::Read as _};

use anyhow::{anyhow, bail};

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
