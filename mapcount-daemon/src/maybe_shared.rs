//! The kernel's guesses at "is this large folio mapped by somebody else",
//! next to the exact answer.
//!
//! Three generations of the kernel guess differently; each guess is
//! recomputed here from the folio table, whatever kernel is running, so
//! that what each costs can be measured on any workload:
//!
//! - [`Heuristic::Page0Mapcount`], 6.3-6.9 `folio_estimated_sharers()`:
//!   the mapcount of the folio's first page; above 1 is "shared".
//! - [`Heuristic::LikelyMappedShared`], 6.10-6.14
//!   `folio_likely_mapped_shared()`: shared if mapped more than once and
//!   either mapped by a PMD, or mapped more times than it has pages, or its
//!   first page is mapped more than once.
//! - [`Heuristic::MmIdSlots`], 6.15+ `folio_maybe_mapped_shared()`: two
//!   (address space, mapcount) slots per folio and a shared bit
//!   (`folio->_mm_ids`, `CONFIG_MM_ID`), simulated by [`MmIdSlots`] call by
//!   call as the kernel updates them. Where the kernel has the bit, every
//!   rmap event carries it, and the simulation is checked against it.
//!
//! The first two need the first page's own mapcount. The table counts
//! mappings per address space and address, not per page: where a mapping
//! covers only part of the folio, which pages it covers is not known, and
//! the verdict is [`Verdict::Undecided`] rather than a guess at a guess.

use mapcount_common::FolioKind;

use crate::folios::FolioState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heuristic {
    Page0Mapcount,
    LikelyMappedShared,
    MmIdSlots,
}

impl Heuristic {
    pub const ALL: [Heuristic; 3] =
        [Heuristic::Page0Mapcount, Heuristic::LikelyMappedShared, Heuristic::MmIdSlots];

    /// The `heuristic` label: the kernel function that makes the guess.
    pub fn label(self) -> &'static str {
        match self {
            Heuristic::Page0Mapcount => "folio_estimated_sharers",
            Heuristic::LikelyMappedShared => "folio_likely_mapped_shared",
            Heuristic::MmIdSlots => "folio_maybe_mapped_shared",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Shared,
    Exclusive,
    /// The table cannot tell how the first page is mapped (see the module
    /// documentation).
    Undecided,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Shared, Verdict::Exclusive, Verdict::Undecided];

    pub fn label(self) -> &'static str {
        match self {
            Verdict::Shared => "shared",
            Verdict::Exclusive => "exclusive",
            Verdict::Undecided => "undecided",
        }
    }
}

/// `folio->_mm_ids` of 6.15+, as `folio_add_return_large_mapcount()` and
/// `folio_sub_return_large_mapcount()` (include/linux/rmap.h) keep it.
/// Address spaces are told apart by the daemon's mm key instead of the
/// kernel's `mm_id`: the same identity while the address space lives.
/// Counts are in `folio_mapcount()` units (one per PTE, one per PMD) and,
/// like the kernel's, start at -1; they are `int`s there too. 32 bytes: one
/// per live large folio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmIdSlots {
    /// 0 is the kernel's `MM_ID_DUMMY`: a free slot.
    mm: [u64; 2],
    mapcount: [i32; 2],
    /// `_large_mapcount`.
    total: i32,
    shared: bool,
}

impl Default for MmIdSlots {
    fn default() -> Self {
        Self { mm: [0; 2], mapcount: [-1; 2], total: -1, shared: false }
    }
}

impl MmIdSlots {
    /// `FOLIO_MM_IDS_SHARED_BIT`.
    pub fn shared_bit(&self) -> bool {
        self.shared
    }

    pub fn add(&mut self, mm: u64, diff: u64) {
        let diff = i32::try_from(diff).unwrap_or(i32::MAX);
        if diff == 0 {
            return;
        }
        self.total = self.total.wrapping_add(diff);
        if self.mm[0] == mm {
            self.mapcount[0] = self.mapcount[0].wrapping_add(diff);
        } else if self.mm[1] == mm {
            self.mapcount[1] = self.mapcount[1].wrapping_add(diff);
        } else if self.mm[0] == 0 {
            self.mm[0] = mm;
            self.mapcount[0] = diff - 1;
            // Other address spaces may hold mappings already.
            if self.total != diff - 1 {
                self.shared = true;
            }
        } else if self.mm[1] == 0 {
            self.mm[1] = mm;
            self.mapcount[1] = diff - 1;
            // Slot 0 certainly has mappings as well.
            self.shared = true;
        } else {
            // No free slot: a third address space. The kernel sets no bit
            // here; the bit was set when slot 1 was taken.
        }
    }

    pub fn sub(&mut self, mm: u64, diff: u64) {
        let diff = i32::try_from(diff).unwrap_or(i32::MAX);
        if diff == 0 {
            return;
        }
        self.total = self.total.wrapping_sub(diff);
        for i in 0..2 {
            if self.mm[i] == mm {
                self.mapcount[i] = self.mapcount[i].wrapping_sub(diff);
                if self.mapcount[i] >= 0 {
                    return;
                }
                // Some mappings were added while no slot was free: the
                // count can go below zero. The slot is freed.
                self.mapcount[i] = -1;
                self.mm[i] = 0;
                break;
            }
        }
        // One slot owns every mapping (or none is left): exclusive again.
        if self.mapcount[0] == self.total || self.mapcount[1] == self.total {
            self.shared = false;
        }
    }
}

/// What the guesses need of a folio, from the table.
pub struct Facts {
    /// `folio_mapcount()`.
    pub mapcount: u64,
    /// PMD and PUD mappings (`folio_entire_mapcount()`).
    pub entire: u64,
    pub pages: u64,
    /// Mappings of the first page by PTE, when the table knows it.
    pub page0_ptes: Option<u64>,
    /// Exact: distinct address spaces mapping the folio, at least two.
    pub truly_shared: bool,
}

impl Facts {
    pub fn of(folio: &FolioState) -> Self {
        let pages = folio.pages();
        let mut entire = 0;
        let mut page0_ptes = Some(0u64);
        for m in folio.mappings.iter().filter(|m| m.total() > 0) {
            entire += u64::from(m.pmds) + u64::from(m.puds);
            let ptes = u64::from(m.ptes);
            page0_ptes = match page0_ptes {
                // A mapping of every page covers the first one.
                Some(n) if ptes == pages => Some(n + 1),
                Some(n) if ptes == 0 => Some(n),
                _ => None,
            };
        }
        if folio.unknown > 0 {
            page0_ptes = None;
        }
        Self { mapcount: folio.mapcount(), entire, pages, page0_ptes, truly_shared: folio.sharers() >= 2 }
    }
}

/// The guess of `heuristic` about a large folio; `slots` is its simulated
/// `_mm_ids` (None where the table cannot simulate it).
pub fn verdict(heuristic: Heuristic, facts: &Facts, slots: Option<&MmIdSlots>) -> Verdict {
    let shared = |yes: bool| if yes { Verdict::Shared } else { Verdict::Exclusive };
    match heuristic {
        // page_mapcount() of those kernels counts the entire mappings too.
        Heuristic::Page0Mapcount => match facts.page0_ptes {
            Some(ptes) => shared(ptes + facts.entire > 1),
            None => Verdict::Undecided,
        },
        Heuristic::LikelyMappedShared => {
            if facts.mapcount <= 1 {
                Verdict::Exclusive
            } else if facts.entire > 0 || facts.mapcount > facts.pages {
                Verdict::Shared
            } else {
                match facts.page0_ptes {
                    Some(ptes) => shared(ptes > 1),
                    None => Verdict::Undecided,
                }
            }
        }
        Heuristic::MmIdSlots => match slots {
            _ if facts.mapcount <= 1 => Verdict::Exclusive,
            Some(slots) => shared(slots.shared_bit()),
            None => Verdict::Undecided,
        },
    }
}

/// Kinds the guesses are made for: hugetlb is left out of the table, and
/// small folios have an exact mapcount in every kernel.
pub fn applies(kind: FolioKind, order: u8) -> bool {
    order > 0 && kind != FolioKind::NoMapping
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 1;
    const A: u64 = 2;
    const B: u64 = 3;

    /// The example: a PTE-mapped 64 KiB folio in three processes
    /// (parent, then two fork children); the parent and the first child
    /// unmap it. One address space is left, which held no slot: the bit
    /// stays set, a false positive.
    #[test]
    fn a_third_address_space_keeps_the_bit_set() {
        let mut slots = MmIdSlots::default();
        slots.add(P, 16);
        assert!(!slots.shared_bit());
        slots.add(A, 16);
        assert!(slots.shared_bit());
        slots.add(B, 16);
        slots.sub(P, 16);
        slots.sub(A, 16);
        assert!(slots.shared_bit(), "B holds every mapping but no slot");
        assert_eq!(slots.total, 15);
    }

    #[test]
    fn the_slot_holder_left_alone_is_exclusive() {
        let mut slots = MmIdSlots::default();
        slots.add(P, 1); // a PMD
        slots.add(A, 1);
        slots.add(B, 1);
        slots.sub(B, 1);
        assert!(slots.shared_bit(), "P and A still share it");
        slots.sub(A, 1);
        assert!(!slots.shared_bit());
    }

    #[test]
    fn unmapped_is_exclusive() {
        let mut slots = MmIdSlots::default();
        slots.add(P, 16);
        slots.add(A, 16);
        slots.sub(P, 16);
        slots.sub(A, 16);
        assert_eq!(slots, MmIdSlots::default());
    }

    #[test]
    fn mapcount_one_is_exclusive_whatever_the_bit() {
        let facts = Facts { mapcount: 1, entire: 1, pages: 512, page0_ptes: Some(0), truly_shared: false };
        let slots = MmIdSlots { shared: true, ..MmIdSlots::default() };
        assert_eq!(verdict(Heuristic::MmIdSlots, &facts, Some(&slots)), Verdict::Exclusive);
        assert_eq!(verdict(Heuristic::LikelyMappedShared, &facts, None), Verdict::Exclusive);
        assert_eq!(verdict(Heuristic::Page0Mapcount, &facts, None), Verdict::Exclusive);
    }

    #[test]
    fn the_first_page_decides_the_older_guesses() {
        // Two address spaces map 8 and 4 of the 16 pages (which ones is not
        // known): undecided. With more mappings than pages: shared, as the
        // kernel says without looking at the first page. Both full: shared.
        let partial = Facts { mapcount: 12, entire: 0, pages: 16, page0_ptes: None, truly_shared: true };
        assert_eq!(verdict(Heuristic::Page0Mapcount, &partial, None), Verdict::Undecided);
        assert_eq!(verdict(Heuristic::LikelyMappedShared, &partial, None), Verdict::Undecided);
        let over = Facts { mapcount: 24, ..partial };
        assert_eq!(verdict(Heuristic::LikelyMappedShared, &over, None), Verdict::Shared);
        let full = Facts { mapcount: 32, entire: 0, pages: 16, page0_ptes: Some(2), truly_shared: true };
        assert_eq!(verdict(Heuristic::Page0Mapcount, &full, None), Verdict::Shared);
        assert_eq!(verdict(Heuristic::LikelyMappedShared, &full, None), Verdict::Shared);
        // Mapped twice by PMD: shared by the entire mapcount.
        let pmds = Facts { mapcount: 2, entire: 2, pages: 512, page0_ptes: Some(0), truly_shared: true };
        assert_eq!(verdict(Heuristic::LikelyMappedShared, &pmds, None), Verdict::Shared);
    }
}
