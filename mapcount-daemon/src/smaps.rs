//! What smaps, pagemap and kpagecount report about the pages a process
//! maps, computed from the folio table twice: exactly, as a kernel with
//! per-page mapcounts reports it (the default), and as a kernel built with
//! `CONFIG_NO_PAGE_MAPCOUNT` (6.15+, the mode upstream means to make the
//! only one) estimates it.
//!
//! Without per-page mapcounts the kernel uses, for every page of a large
//! folio (fs/proc/task_mmu.c `smaps_account` and
//! `__folio_page_mapped_exclusively`, fs/proc/page.c `get_kpage_count`):
//! - the folio's average mapcount per page (`folio_average_page_mapcount`)
//!   for PSS and kpagecount, even for pages nobody maps, and
//! - "not maybe mapped shared" (`folio_maybe_mapped_shared`, the two-slot
//!   bit simulated in [`MmIdSlots`]) for Private/Shared and pagemap's
//!   `PM_MMAP_EXCLUSIVE`.
//!
//! Small folios keep their own mapcount in both modes: the two columns
//! differ only on large folios.
//!
//! The exact column needs each page's mapcount. The table counts mappings
//! per address space and address, not per page, but a page's count is
//! still known where at most one mapping covers part of the folio and
//! every other covers all of it (by PMD, or by a PTE for each page): the
//! pages of the partial mapping have one mapping more. Where two mappings
//! each cover a part, which pages they share is not known, and the folio's
//! bytes are counted as undetermined rather than guessed. The estimate
//! needs only folio-wide counts and the simulated bit, so it is known for
//! every large folio whose every mapping the daemon saw being made.

use mapcount_common::{PSS_SHIFT, SmapsFigures};
use rustc_hash::FxHashMap as HashMap;

use crate::{
    folios::{FolioState, Mapping},
    maybe_shared::MmIdSlots,
};

/// x86-64's base page.
const PAGE_SIZE: u64 = 4096;

/// Adds `pages` pages with `mapcount` mappings each, as `smaps_account`
/// and `smaps_page_accumulate` do.
fn add_pages(figures: &mut SmapsFigures, pages: u64, mapcount: u64, exclusive: bool) {
    if pages == 0 {
        return;
    }
    let pss = if mapcount >= 2 { (PAGE_SIZE << PSS_SHIFT) / mapcount } else { PAGE_SIZE << PSS_SHIFT };
    let bytes = pages * PAGE_SIZE;
    figures.rss_bytes += bytes;
    figures.pss_shifted += pages * pss;
    if exclusive {
        figures.private_bytes += bytes;
        figures.exclusive_pages += pages;
    } else {
        figures.shared_bytes += bytes;
    }
    figures.kpagecount_sum += pages * mapcount;
}

/// Pages one mapping covers: all of them per PMD or PUD, one per PTE.
fn pages_covered(m: &Mapping, pages: u64) -> u64 {
    (u64::from(m.pmds) + u64::from(m.puds)) * pages + u64::from(m.ptes).min(pages)
}

/// `folio_average_page_mapcount()` (fs/proc/internal.h) of a large folio
/// with `mapcount` mappings, `entire` of them by PMD or PUD.
pub fn average_page_mapcount(mapcount: u64, entire: u64, order: u8) -> u64 {
    if mapcount == 0 {
        return 0;
    }
    if mapcount <= entire {
        return entire;
    }
    let pages = 1u64 << order;
    let average = ((mapcount - entire) + pages / 2) >> order;
    (average + entire).max(1)
}

/// Each page's mapcount, where the table can tell it: `all` for every
/// page, plus one for the pages of the one mapping that covers a part.
struct PageMapcounts {
    all: u64,
    partial: Option<(usize, u64)>,
}

impl PageMapcounts {
    fn of(folio: &FolioState) -> Option<Self> {
        let pages = folio.pages();
        let mut all = 0;
        let mut partial = None;
        for (i, m) in folio.mappings.iter().enumerate() {
            all += u64::from(m.pmds) + u64::from(m.puds);
            match u64::from(m.ptes) {
                0 => {}
                ptes if ptes == pages => all += 1,
                ptes if ptes < pages && partial.is_none() => partial = Some((i, ptes)),
                // A second partial mapping, or more PTEs than pages.
                _ => return None,
            }
        }
        Some(Self { all, partial })
    }

    /// Mapping `i`'s figures.
    fn account(&self, figures: &mut SmapsFigures, i: usize, m: &Mapping, pages: u64) {
        let in_partial = self.partial.map_or(0, |(_, ptes)| ptes);
        let whole = |figures: &mut SmapsFigures| {
            add_pages(figures, pages - in_partial, self.all, self.all < 2);
            add_pages(figures, in_partial, self.all + 1, self.all + 1 < 2);
        };
        for _ in 0..u64::from(m.pmds) + u64::from(m.puds) {
            whole(figures);
        }
        match self.partial {
            Some((partial, ptes)) if partial == i => add_pages(figures, ptes, self.all + 1, self.all + 1 < 2),
            _ if u64::from(m.ptes) == pages => whole(figures),
            _ => {}
        }
    }
}

/// Pages of a mapped large folio that no page table maps, where the table
/// knows each page's mapcount (see the module documentation). Without
/// per-page mapcounts the kernel counts them in AnonPages or Mapped all
/// the same (`__folio_add_rmap` adds the whole folio at its first
/// mapping); with them, they are what a deferred split frees.
pub fn unmapped_pages(folio: &FolioState) -> Option<u64> {
    if folio.order == 0 || folio.mapcount() == 0 {
        return Some(0);
    }
    if folio.unknown > 0 || !folio.complete() {
        return None;
    }
    let counts = PageMapcounts::of(folio)?;
    Some(if counts.all > 0 { 0 } else { folio.pages() - counts.partial.map_or(0, |(_, ptes)| ptes) })
}

/// Hands `each` every live mapping of the folio with its figures, exact
/// and estimated. `slots` is the folio's simulated `_mm_ids`, if any.
pub fn account(
    folio: &FolioState,
    slots: Option<&MmIdSlots>,
    mut each: impl FnMut(&Mapping, &SmapsFigures, &SmapsFigures),
) {
    let pages = folio.pages();
    let mapcount = folio.mapcount();
    let live = folio.mappings.iter().enumerate().filter(|(_, m)| m.total() > 0);
    if folio.order == 0 {
        // The folio's own mapcount, in either mode (mappings the table
        // could not place are mappings all the same).
        for (_, m) in live {
            let mut figures = SmapsFigures::default();
            add_pages(&mut figures, pages_covered(m, pages), mapcount, mapcount < 2);
            each(m, &figures, &figures);
        }
        return;
    }
    let known = folio.unknown == 0 && folio.complete();
    let page_mapcounts = if known { PageMapcounts::of(folio) } else { None };
    let entire: u64 = folio.mappings.iter().map(|m| u64::from(m.pmds) + u64::from(m.puds)).sum();
    let average = average_page_mapcount(mapcount, entire, folio.order);
    // `folio_maybe_mapped_shared()`: one mapping is exclusive whatever the bit.
    let exclusive = match slots {
        _ if !known => None,
        _ if mapcount <= 1 => Some(true),
        Some(slots) => Some(!slots.shared_bit()),
        None => None,
    };
    for (i, m) in live {
        let covered = pages_covered(m, pages);
        let (mut exact, mut estimate) = (SmapsFigures::default(), SmapsFigures::default());
        match &page_mapcounts {
            Some(counts) => counts.account(&mut exact, i, m, pages),
            None => exact.undetermined_bytes += covered * PAGE_SIZE,
        }
        match exclusive {
            Some(exclusive) => add_pages(&mut estimate, covered, average, exclusive),
            None => estimate.undetermined_bytes += covered * PAGE_SIZE,
        }
        each(m, &exact, &estimate);
    }
}

/// The figures of every address space, gathered in one walk of the table
/// for the per-cgroup metrics. It runs at every scrape over every folio,
/// so small folios, most of any table, take a short path (their two
/// columns are the same: three sums), and address spaces are found
/// through a small direct-mapped cache before the hash map.
pub struct ByAddressSpace {
    index: HashMap<u64, usize>,
    small: Vec<SmallSums>,
    /// Large folios: exactly, and as estimated.
    large: Vec<[SmapsFigures; 2]>,
    mms: Vec<u64>,
    recent: [(u64, usize); RECENT],
}

/// Ways of the cache: a host's processes (at 8 bytes and a number each,
/// 16 KiB: it stays in the L1 and L2 caches).
const RECENT: usize = 1024;

#[derive(Clone, Copy, Default)]
struct SmallSums {
    pages: u64,
    pss_shifted: u64,
    private_pages: u64,
}

impl Default for ByAddressSpace {
    fn default() -> Self {
        Self {
            index: HashMap::default(),
            small: Vec::new(),
            large: Vec::new(),
            mms: Vec::new(),
            recent: [(0, usize::MAX); RECENT],
        }
    }
}

impl ByAddressSpace {
    #[inline(always)]
    fn slot(&mut self, mm: u64) -> usize {
        // mm_struct addresses differ in their middle bits.
        let way = (mm.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - RECENT.trailing_zeros())) as usize;
        let (cached, i) = self.recent[way];
        if cached == mm && i != usize::MAX {
            return i;
        }
        self.slot_uncached(mm, way)
    }

    #[cold]
    #[inline(never)]
    fn slot_uncached(&mut self, mm: u64, way: usize) -> usize {
        let next = self.mms.len();
        let i = *self.index.entry(mm).or_insert(next);
        if i == next {
            self.mms.push(mm);
            self.small.push(SmallSums::default());
            self.large.push(Default::default());
        }
        self.recent[way] = (mm, i);
        i
    }

    pub fn add(&mut self, folio: &FolioState, slots: Option<&MmIdSlots>) {
        if folio.order == 0 {
            let mapcount = folio.mapcount();
            for m in folio.mappings.iter().filter(|m| m.total() > 0) {
                self.add_small_mapping(m, mapcount);
            }
            return;
        }
        account(folio, slots, |m, exact, estimate| {
            let i = self.slot(m.mm);
            self.large[i][0].add(exact);
            self.large[i][1].add(estimate);
        });
    }

    /// One live mapping `m` of a small folio mapped `mapcount` times in all.
    #[inline(always)]
    pub fn add_small_mapping(&mut self, m: &Mapping, mapcount: u64) {
        let pages = pages_covered(m, 1);
        let i = self.slot(m.mm);
        let sums = &mut self.small[i];
        sums.pages += pages;
        if mapcount < 2 {
            sums.pss_shifted += pages * (PAGE_SIZE << PSS_SHIFT);
            sums.private_pages += pages;
        } else {
            sums.pss_shifted += pages * ((PAGE_SIZE << PSS_SHIFT) / mapcount);
        }
    }

    /// Adds another walk's figures (of other folios) to these.
    pub fn merge(&mut self, other: Self) {
        for ((mm, small), large) in other.mms.into_iter().zip(other.small).zip(other.large) {
            let i = self.slot(mm);
            let sums = &mut self.small[i];
            sums.pages += small.pages;
            sums.pss_shifted += small.pss_shifted;
            sums.private_pages += small.private_pages;
            self.large[i][0].add(&large[0]);
            self.large[i][1].add(&large[1]);
        }
    }

    /// Each address space with its Rss, PSS, private, shared and
    /// undetermined figures, exact and estimated (pagemap and kpagecount
    /// sums are left at 0: the metrics do not need them), and the small
    /// folios' pages counted in them before scaling. Small folios' figures
    /// are multiplied by `small_scale`: the table tracks one small folio in
    /// that many (`FolioTable::sample_shift`).
    pub fn into_figures(
        self,
        small_scale: u64,
    ) -> impl Iterator<Item = (u64, SmapsFigures, SmapsFigures, u64)> {
        self.mms.into_iter().zip(self.small).zip(self.large).map(
            move |((mm, small), [large_exact, large_estimate])| {
                let sampled_pages = small.pages;
                let small = SmapsFigures {
                    rss_bytes: small.pages * PAGE_SIZE * small_scale,
                    pss_shifted: small.pss_shifted * small_scale,
                    private_bytes: small.private_pages * PAGE_SIZE * small_scale,
                    shared_bytes: (small.pages - small.private_pages) * PAGE_SIZE * small_scale,
                    ..SmapsFigures::default()
                };
                let figures = |large: &SmapsFigures| SmapsFigures {
                    exclusive_pages: 0,
                    kpagecount_sum: 0,
                    ..SmapsFigures {
                        rss_bytes: small.rss_bytes + large.rss_bytes,
                        pss_shifted: small.pss_shifted + large.pss_shifted,
                        private_bytes: small.private_bytes + large.private_bytes,
                        shared_bytes: small.shared_bytes + large.shared_bytes,
                        undetermined_bytes: large.undetermined_bytes,
                        ..SmapsFigures::default()
                    }
                };
                (mm, figures(&large_exact), figures(&large_estimate), sampled_pages)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use mapcount_common::FolioKind;

    use super::*;

    const PARENT: u64 = 1;
    const CHILD: u64 = 2;

    fn folio(order: u8, mappings: &[Mapping]) -> FolioState {
        FolioState::for_test(FolioKind::Anon, order, mappings)
    }

    fn mapping(mm: u64, ptes: u32, pmds: u16) -> Mapping {
        Mapping { mm, base: 0x20_0000, ptes, pmds, puds: 0 }
    }

    fn figures_of(folio: &FolioState, slots: Option<&MmIdSlots>, mm: u64) -> (SmapsFigures, SmapsFigures) {
        let (mut exact, mut estimate) = (SmapsFigures::default(), SmapsFigures::default());
        account(folio, slots, |m, e, n| {
            if m.mm == mm {
                exact.add(e);
                estimate.add(n);
            }
        });
        (exact, estimate)
    }

    #[test]
    fn the_average_is_rounded_and_at_least_one() {
        assert_eq!(average_page_mapcount(0, 0, 9), 0);
        assert_eq!(average_page_mapcount(1, 0, 9), 1);
        assert_eq!(average_page_mapcount(257, 1, 9), 2); // a PMD and half the pages
        assert_eq!(average_page_mapcount(640, 0, 9), 1); // 512 + 128 PTEs
        assert_eq!(average_page_mapcount(768, 0, 9), 2); // 512 + 256 rounds up
        assert_eq!(average_page_mapcount(3, 3, 9), 3);
    }

    /// A THP a parent maps by PMD; its fork child unmapped the second half
    /// (its PMD was split, 256 PTEs remain). Half the pages are mapped
    /// twice: the parent's PSS is 1.5 MiB. The estimate averages 257
    /// mappings over 512 pages: 2 each, 1 MiB.
    #[test]
    fn a_half_unmapped_thp_pss() {
        let mut slots = MmIdSlots::default();
        slots.add(PARENT, 1);
        slots.add(CHILD, 256);
        let thp = folio(9, &[mapping(PARENT, 0, 1), mapping(CHILD, 256, 0)]);
        let (exact, estimate) = figures_of(&thp, Some(&slots), PARENT);
        assert_eq!(exact.rss_bytes, 2 << 20);
        assert_eq!(exact.pss_shifted >> PSS_SHIFT, 1536 << 10);
        assert_eq!((exact.private_bytes, exact.shared_bytes), (1 << 20, 1 << 20));
        assert_eq!((exact.exclusive_pages, exact.kpagecount_sum), (256, 768));
        assert_eq!(estimate.pss_shifted >> PSS_SHIFT, 1 << 20);
        assert_eq!((estimate.private_bytes, estimate.shared_bytes), (0, 2 << 20));
        assert_eq!((estimate.exclusive_pages, estimate.kpagecount_sum), (0, 1024));
        let (exact, estimate) = figures_of(&thp, Some(&slots), CHILD);
        assert_eq!(exact.pss_shifted >> PSS_SHIFT, 512 << 10);
        assert_eq!(estimate.pss_shifted >> PSS_SHIFT, 512 << 10);
        assert_eq!(exact.rss_bytes, 1 << 20);
    }

    /// The false positive of the two slots: a 64 KiB folio left mapped by
    /// one address space that never held a slot. Exact: private. Estimate:
    /// shared, and no page exclusively mapped.
    #[test]
    fn a_false_positive_makes_private_memory_shared() {
        let mut slots = MmIdSlots::default();
        for mm in [PARENT, CHILD, 3] {
            slots.add(mm, 16);
        }
        slots.sub(PARENT, 16);
        slots.sub(CHILD, 16);
        let mthp = folio(4, &[mapping(3, 16, 0)]);
        let (exact, estimate) = figures_of(&mthp, Some(&slots), 3);
        assert_eq!((exact.private_bytes, exact.exclusive_pages), (64 << 10, 16));
        assert_eq!((estimate.shared_bytes, estimate.exclusive_pages), (64 << 10, 0));
        assert_eq!(exact.pss_shifted, estimate.pss_shifted);
    }

    #[test]
    fn two_partial_mappings_are_undetermined_exactly_but_estimated() {
        let mut slots = MmIdSlots::default();
        slots.add(PARENT, 8);
        slots.add(CHILD, 4);
        let mthp = folio(4, &[mapping(PARENT, 8, 0), mapping(CHILD, 4, 0)]);
        let (exact, estimate) = figures_of(&mthp, Some(&slots), PARENT);
        assert_eq!((exact.rss_bytes, exact.undetermined_bytes), (0, 32 << 10));
        // 12 mappings over 16 pages: 1 each.
        assert_eq!((estimate.pss_shifted >> PSS_SHIFT, estimate.kpagecount_sum), (32 << 10, 8));
        assert_eq!(estimate.undetermined_bytes, 0);
    }

    /// Over every address space, exact PSS adds up to the mapped bytes
    /// (to within the fixed point's rounding: a third of a page is cut).
    #[test]
    fn exact_pss_adds_up_to_the_mapped_bytes() {
        let folios = [
            folio(9, &[mapping(PARENT, 0, 1), mapping(CHILD, 128, 0), mapping(3, 0, 1)]),
            folio(4, &[mapping(PARENT, 16, 0), mapping(CHILD, 16, 0), mapping(3, 16, 0)]),
            folio(4, &[mapping(PARENT, 5, 0)]),
            folio(0, &[mapping(PARENT, 1, 0), mapping(CHILD, 1, 0), mapping(3, 1, 0)]),
        ];
        let mapped_pages = 512 + 16 + 5 + 1;
        let mut pss = 0;
        for f in &folios {
            account(f, None, |_, exact, _| pss += exact.pss_shifted);
        }
        let mapped = mapped_pages * (PAGE_SIZE << PSS_SHIFT);
        assert!(pss <= mapped && mapped - pss < mapped_pages * 3, "{pss} vs {mapped}");
    }

    #[test]
    fn unmapped_pages_of_partially_mapped_folios() {
        // The child's 256 pages of a THP the parent maps by PMD: all mapped.
        let shared = folio(9, &[mapping(PARENT, 0, 1), mapping(CHILD, 256, 0)]);
        assert_eq!(unmapped_pages(&shared), Some(0));
        // One process left with 5 of 16 pages.
        assert_eq!(unmapped_pages(&folio(4, &[mapping(PARENT, 5, 0)])), Some(11));
        // Two parts: which pages they cover is not known.
        assert_eq!(unmapped_pages(&folio(4, &[mapping(PARENT, 5, 0), mapping(CHILD, 3, 0)])), None);
    }

    #[test]
    fn sums_by_address_space_are_the_per_mapping_figures() {
        let folios = [
            folio(0, &[mapping(PARENT, 1, 0), mapping(CHILD, 1, 0)]),
            folio(9, &[mapping(PARENT, 0, 1), mapping(CHILD, 256, 0)]),
            folio(0, &[mapping(CHILD, 1, 0)]),
        ];
        let mut by_mm = ByAddressSpace::default();
        for f in &folios {
            by_mm.add(f, None);
        }
        let mut sums: Vec<_> = by_mm.into_figures(1).collect();
        sums.sort_by_key(|(mm, _, _, _)| *mm);
        for (mm, exact, estimate, _) in sums {
            let (mut want_exact, mut want_estimate) = (SmapsFigures::default(), SmapsFigures::default());
            for f in &folios {
                let (e, n) = figures_of(f, None, mm);
                want_exact.add(&e);
                want_estimate.add(&n);
            }
            for want in [&mut want_exact, &mut want_estimate] {
                (want.exclusive_pages, want.kpagecount_sum) = (0, 0);
            }
            assert_eq!((exact, estimate), (want_exact, want_estimate), "mm {mm}");
        }
    }

    #[test]
    fn small_folios_agree() {
        let page = folio(0, &[mapping(PARENT, 1, 0), mapping(CHILD, 1, 0)]);
        let (exact, estimate) = figures_of(&page, None, CHILD);
        assert_eq!(exact, estimate);
        assert_eq!((exact.pss_shifted >> PSS_SHIFT, exact.shared_bytes), (2048, 4096));
    }
}
