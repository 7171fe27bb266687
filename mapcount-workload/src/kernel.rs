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

pub(crate) fn pagemap_pfn(path: &str, address: usize) -> anyhow::Result<u64> {
    let mut f = fs::File::open(path).map_err(|e| anyhow!("{path}: {e}"))?;
    let mut buf = [0u8; 8];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start((address / PAGE) as u64 * 8))?;
    f.read_exact(&mut buf).map_err(|e| anyhow!("pagemap: {e}"))?;
    let entry = u64::from_le_bytes(buf);
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

/// The kernel's page_count() of the page at `address`: pagemap gives the
/// PFN, kpagecount the count.
pub(crate) fn kpagecount(address: usize) -> anyhow::Result<u64> {
    kpage_file("/proc/kpagecount", address)
}

/// The entry of a `/proc/kpage*` file for the page at `address`.
pub(crate) fn kpage_file(file: &str, address: usize) -> anyhow::Result<u64> {
    let read_u64 = |path: &str, index: u64| -> anyhow::Result<u64> {
        let mut f = fs::File::open(path).map_err(|e| anyhow!("{path}: {e}"))?;
        let mut buf = [0u8; 8];
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(index * 8))?;
        f.read_exact(&mut buf).map_err(|e| anyhow!("{path}: {e}"))?;
        Ok(u64::from_le_bytes(buf))
    };
    let entry = read_u64("/proc/self/pagemap", (address / PAGE) as u64)?;
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 || pfn == 0 {
        bail!("page not present or PFN hidden");
    }
    read_u64(file, pfn)
}

/// `/proc/kpageflags` bits (include/uapi/linux/kernel-page-flags.h).
pub(crate) mod kpf {
    pub const COMPOUND_HEAD: u64 = 1 << 15;
    pub const COMPOUND_TAIL: u64 = 1 << 16;
    pub const ANON: u64 = 1 << 12;
}

/// Small anonymous pages this process maps that the kernel counts as
/// mapped `count` times (kpagecount), over every private mapping in
/// `/proc/self/maps`: those without a file, and the copies written into
/// private file mappings (a library's data). Large folios' pages are left
/// out: kpagecount counts their pages, not address spaces.
pub(crate) fn small_anon_pages_mapped(count: u64) -> anyhow::Result<usize> {
    let maps = fs::read_to_string("/proc/self/maps")?;
    let mut pagemap = fs::File::open("/proc/self/pagemap")?;
    let mut kpageflags = fs::File::open("/proc/kpageflags")?;
    let mut kpagecount = fs::File::open("/proc/kpagecount")?;
    let read_u64 = |f: &mut fs::File, index: u64| -> anyhow::Result<u64> {
        let mut buf = [0u8; 8];
        std::io::Seek::seek(f, std::io::SeekFrom::Start(index * 8))?;
        f.read_exact(&mut buf)?;
        Ok(u64::from_le_bytes(buf))
    };
    let mut found = 0;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(perms)) = (fields.first(), fields.get(1)) else { continue };
        // A path (a file, [vdso], [vvar]) other than the heap and stack.
        if fields.get(5).is_some_and(|path| *path != "[heap]" && *path != "[stack]") || !perms.ends_with('p')
        {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else { continue };
        let (start, end) = (u64::from_str_radix(start, 16)?, u64::from_str_radix(end, 16)?);
        for page in start / PAGE as u64..end / PAGE as u64 {
            let entry = read_u64(&mut pagemap, page)?;
            let pfn = entry & ((1 << 55) - 1);
            if entry >> 63 == 0 || pfn == 0 {
                continue;
            }
            let flags = read_u64(&mut kpageflags, pfn)?;
            // KPF_KSM is no help here: 6.12 sets it on every anonymous page
            // (PAGE_MAPPING_KSM includes PAGE_MAPPING_ANON in the test of
            // stable_page_flags). The KSM scenario unmaps its pages.
            if flags & kpf::ANON == 0 || flags & (kpf::COMPOUND_HEAD | kpf::COMPOUND_TAIL) != 0 {
                continue;
            }
            if read_u64(&mut kpagecount, pfn)? == count {
                found += 1;
            }
        }
    }
    Ok(found)
}
