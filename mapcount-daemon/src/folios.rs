//! The folio table: what the daemon knows about each live folio.
//!
//! Mappings are counted the way the kernel counts them since 6.10 (one per
//! PTE, one per PMD or PUD), per address space, so that "mapped by somebody
//! else" has an exact answer. The kernel's own counters arrive with every
//! event; the table checks itself against them, both ways.
//!
//! A mapping is filed by address space and by the user address of the
//! folio's first page there (`Event::base`), not by VMA: VMA splits and
//! merges (mprotect, mlock, madvise) re-home page-table entries without an
//! rmap call, and a VMA pointer goes stale while the address does not.
//! mremap moves the address, and is followed (`FolioTable::move_range`).

use std::{collections::BTreeMap, hash::BuildHasher as _};

use hashbrown::HashTable;
use mapcount_common::{FolioKind, Level, RmapOp, SmapsReport, sampling, shared_hint};
use rustc_hash::{FxBuildHasher, FxHashMap as HashMap, FxHashSet as HashSet};
use smallvec::SmallVec;

use crate::{
    maybe_shared::{self, MmIdSlots},
    smaps,
};

/// Consecutive events of a folio whose counts must differ from the
/// kernel's before that is a disagreement (see `FolioTable::apply`).
const CONFIRM_AFTER: u8 = 3;
/// And for how long, from the first differing event, for a folio whose
/// every mapping the table saw: a batched rmap call updates the kernel's
/// count only after it has walked its pages, and a vCPU (or a task in a
/// VM) stalled in that walk lets several events of other CPUs overtake it
/// (children splitting a shared THP at once).
const CONFIRM_AFTER_NS: u64 = 1_000_000_000;

/// Address spaces tracked per folio; beyond this a folio's further
/// mappings are counted in `unknown` (bounded memory per folio, and
/// sharers fit in a byte).
pub const MAX_MAPPINGS_PER_FOLIO: usize = 64;

/// Pages a PMD maps.
const PMD_PAGES: u32 = 512;
const PMD_ORDER: u8 = 9;

/// The index files mappings by 2 MiB region of the address space: fork and
/// mremap ask for an address range, teardown for a whole address space.
/// A sampled table widens the regions by its sampling factor (see
/// [`FolioTable::region_shift`]).
const REGION_SHIFT: u32 = 21;

/// Mappings waiting to be filed in the index (`FolioTable::unfiled`):
/// 96 KiB.
const UNFILED_MAX: usize = 4096;

/// The mappings one address space holds on a folio at one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub mm: u64,
    /// User address of the folio's first page in this mapping.
    pub base: u64,
    pub ptes: u32,
    pub pmds: u16,
    pub puds: u16,
}

impl Mapping {
    pub fn total(&self) -> u64 {
        u64::from(self.ptes) + u64::from(self.pmds) + u64::from(self.puds)
    }
}

/// Most folios are mapped through one VMA: that mapping is stored inline,
/// and only shared folios allocate.
pub type Mappings = SmallVec<[Mapping; 1]>;

/// One live folio. Kept at 64 bytes, one cache line: with a million live
/// folios the table is most of the daemon's memory (docs/metrics.md), and
/// an event reads and writes its folio's entry.
#[derive(Clone, Debug)]
pub struct FolioState {
    /// The folio's address, the table's key; never shown.
    folio: u64,
    pub mappings: Mappings,
    /// Daemon-assigned identity, safe to show (unlike the folio's address).
    /// Wraps after 2^32 folios: the debug view orders by age (see
    /// [`FolioTable::mapped_by_tgid`]), which stays right unless a folio
    /// outlives 2^32 others.
    pub serial: u32,
    /// Mappings by address spaces the daemon did not see being made
    /// (mapped before it started, or by paths no probe sees).
    pub unknown: u32,
    pub peak_mapcount: u32,
    pub peak_refcount: i32,
    /// Write faults on the folio that copied it, and that reused it
    /// (saturating: these are for the debug view).
    pub cow_copies: u16,
    pub cow_reuses: u16,
    pub kind: FolioKind,
    pub order: u8,
    /// At most [`MAX_MAPPINGS_PER_FOLIO`].
    pub peak_sharers: u8,
    marks: Marks,
}

/// A folio's flags and small counts, in one byte of its entry.
#[derive(Clone, Copy, Debug, Default)]
struct Marks(u8);

impl Marks {
    /// Consecutive events at which the kernel's count differed (see
    /// `FolioTable::apply`), saturating at 3 = [`CONFIRM_AFTER`].
    const DIFFERING: u8 = 0b11;
    /// The daemon saw every mapping of the folio being made (it was new,
    /// or first mapped after the daemon started). Only such a folio's
    /// differences from the kernel are disagreements; the others hold
    /// mappings made before the daemon started, which fork duplicates
    /// without the daemon knowing whose they are.
    const COMPLETE: u8 = 1 << 2;
    const EVER_PARTIALLY_MAPPED: u8 = 1 << 3;
    /// The kernel's maybe-shared bit at the last event: a `shared_hint`
    /// value (0 to 2) in two bits.
    const HINT_SHIFT: u32 = 4;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    fn set(&mut self, bit: u8, on: bool) {
        self.0 = if on { self.0 | bit } else { self.0 & !bit };
    }

    fn differing_events(self) -> u8 {
        self.0 & Self::DIFFERING
    }

    fn set_differing_events(&mut self, events: u8) {
        self.0 = (self.0 & !Self::DIFFERING) | events.min(Self::DIFFERING);
    }

    fn shared_hint(self) -> u8 {
        self.0 >> Self::HINT_SHIFT
    }

    fn set_shared_hint(&mut self, hint: u8) {
        self.0 = (self.0 & !(0b11 << Self::HINT_SHIFT)) | ((hint & 0b11) << Self::HINT_SHIFT);
    }
}

const _: () = assert!(CONFIRM_AFTER <= Marks::DIFFERING, "the differing count saturates below CONFIRM_AFTER");

/// Counts kept narrower than the kernel's: saturate instead of wrapping.
fn narrow<T: TryFrom<u64> + Copy>(value: u64, max: T) -> T {
    T::try_from(value).unwrap_or(max)
}

impl FolioState {
    fn new(folio: u64, serial: u32, kind: FolioKind, order: u8) -> Self {
        Self {
            folio,
            serial,
            mappings: Mappings::new(),
            unknown: 0,
            peak_mapcount: 0,
            peak_refcount: 0,
            cow_copies: 0,
            cow_reuses: 0,
            kind,
            order,
            peak_sharers: 0,
            marks: Marks::default(),
        }
    }

    /// A folio whose every mapping the daemon saw being made.
    pub fn complete(&self) -> bool {
        self.marks.has(Marks::COMPLETE)
    }

    /// Some of its pages were unmapped while others stayed, at some point.
    pub fn ever_partially_mapped(&self) -> bool {
        self.marks.has(Marks::EVER_PARTIALLY_MAPPED)
    }

    /// The kernel's maybe-shared bit at the last event (a `shared_hint` value).
    pub fn shared_hint(&self) -> u8 {
        self.marks.shared_hint()
    }

    #[cfg(test)]
    pub fn for_test(kind: FolioKind, order: u8, mappings: &[Mapping]) -> Self {
        let mut state = Self::new(0, 0, kind, order);
        state.mappings = mappings.iter().copied().collect();
        state.marks.set(Marks::COMPLETE, true);
        state
    }

    /// Mappings as the kernel counts them (`folio_mapcount`).
    pub fn mapcount(&self) -> u64 {
        self.mappings.iter().map(Mapping::total).sum::<u64>() + u64::from(self.unknown)
    }

    /// Distinct address spaces mapping the folio (those the daemon knows).
    #[inline(always)]
    pub fn sharers(&self) -> u32 {
        if let [only] = self.mappings.as_slice() {
            return u32::from(only.total() > 0); // most folios
        }
        let mut count = 0;
        self.ptes_per_mm(|_| count += 1);
        count
    }

    /// Hands `each` the PTEs mapped by each address space with a live
    /// mapping of the folio, once per address space. Called at every event
    /// of a folio and for every folio at a scrape, so without allocating
    /// and in n log n: a file folio mapped by dozens of processes made the
    /// pairwise comparison most of the ingest's time.
    #[inline(never)]
    fn ptes_per_mm(&self, mut each: impl FnMut(u64)) {
        let live = |m: &&Mapping| m.total() > 0;
        if self.mappings.len() <= 8 {
            // Few (a fork's parent and child): each address space at its
            // first live mapping, without a copy.
            for (i, m) in self.mappings.iter().enumerate().filter(|(_, m)| live(m)) {
                if !self.mappings[..i].iter().filter(live).any(|earlier| earlier.mm == m.mm) {
                    each(self.mappings[i..].iter().filter(|o| o.mm == m.mm).map(|o| u64::from(o.ptes)).sum());
                }
            }
            return;
        }
        // Many: sorted by address space on the stack (a folio holds at most
        // MAX_MAPPINGS_PER_FOLIO mappings).
        let mut sorted: SmallVec<[(u64, u64); MAX_MAPPINGS_PER_FOLIO]> =
            self.mappings.iter().filter(live).map(|m| (m.mm, u64::from(m.ptes))).collect();
        sorted.sort_unstable_by_key(|&(mm, _)| mm);
        for same_mm in sorted.chunk_by(|a, b| a.0 == b.0) {
            each(same_mm.iter().map(|&(_, ptes)| ptes).sum());
        }
    }

    pub fn pages(&self) -> u64 {
        1u64 << self.order
    }

    /// A large folio of which only some pages are mapped, and none by a
    /// PMD or PUD: the kernel's deferred-split candidates, where PSS and
    /// "mapped" statistics get imprecise.
    pub fn partially_mapped(&self) -> bool {
        if self.order == 0 || self.mappings.iter().any(|m| m.pmds > 0 || m.puds > 0) {
            return false;
        }
        // One mapping of every page (most folios) settles it.
        let pages = self.pages();
        if self.mappings.iter().any(|m| u64::from(m.ptes) >= pages) {
            return false;
        }
        // Else the address space that maps most of it.
        let mut most = 0;
        self.ptes_per_mm(|ptes| most = most.max(ptes));
        most > 0 && most < pages
    }

    /// Pages of the folio mapped at all, as the kernel's statistics count
    /// them: all of them under a PMD or PUD, else as many as the address
    /// space that maps most of them maps (fork gives every sharer the same).
    /// Mappings the table cannot place count nothing.
    pub fn pages_mapped(&self) -> u64 {
        if self.mappings.iter().any(|m| m.pmds > 0 || m.puds > 0) {
            return self.pages();
        }
        self.mappings.iter().map(|m| u64::from(m.ptes)).max().unwrap_or(0).min(self.pages())
    }

    /// Mapped by a PMD somewhere.
    pub fn pmd_mapped(&self) -> bool {
        self.mappings.iter().any(|m| m.pmds > 0)
    }

    /// Places mapping the folio (address space and address; one per VMA in
    /// practice): refcount grows per mapping, so per VMA.
    pub fn vmas(&self) -> usize {
        self.mappings.iter().filter(|m| m.total() > 0).count()
    }

    /// Whether the index's entry for `mm` and `region` (of 2^`shift`
    /// bytes) is still current.
    fn filed_at(&self, mm: u64, region: u64, shift: u32) -> bool {
        self.mappings.iter().any(|m| m.mm == mm && m.base >> shift == region && m.total() > 0)
    }

    /// Drops `excess` mappings the kernel does not have: those of other
    /// address spaces first (most recently added first: fork copies the
    /// kernel did not make), then those of `mm`, the one the current event
    /// is about, which is certainly live. Returns how many went.
    fn drop_phantoms(&mut self, mut excess: u64, mm: u64) -> u64 {
        let before = excess;
        for pass_own in [false, true] {
            for m in self.mappings.iter_mut().rev().filter(|m| (m.mm == mm) == pass_own) {
                if excess == 0 {
                    break;
                }
                let ptes = u64::from(m.ptes).min(excess);
                m.ptes -= ptes as u32;
                excess -= ptes;
                let pmds = u64::from(m.pmds).min(excess);
                m.pmds -= pmds as u16;
                excess -= pmds;
                let puds = u64::from(m.puds).min(excess);
                m.puds -= puds as u16;
                excess -= puds;
            }
        }
        self.mappings.retain(|m| m.total() > 0);
        before - excess
    }

    /// After the mappings changed; `mapcount` is theirs. Sharers only grow
    /// when a mapping entry is added, and counting them is quadratic in the
    /// entries (up to 64 for a folio mapped everywhere): only then.
    fn note_peaks(&mut self, mapcount: u64, entry_added: bool) {
        self.peak_mapcount = self.peak_mapcount.max(narrow(mapcount, u32::MAX));
        if entry_added {
            self.peak_sharers = self.peak_sharers.max(narrow(u64::from(self.sharers()), u8::MAX));
        }
    }

    /// A PTE removed from an address space that maps the folio by PMD and
    /// by no PTE can only follow a PMD split the table did not see (6.1-6.7
    /// raise every page's `_mapcount` inline in `__split_huge_pmd_locked`;
    /// 6.8+ report the split as an add of 512 PTEs and a PMD remove, after
    /// which this never holds). Turn that PMD into its 512 PTEs first.
    fn infer_pmd_split(&mut self, call: &RmapCall) -> bool {
        if call.level != Level::Pte || self.order != PMD_ORDER {
            return false;
        }
        let in_mm = |m: &&mut Mapping| m.mm == call.mm;
        if self.mappings.iter_mut().filter(in_mm).any(|m| m.ptes > 0) {
            return false;
        }
        match self.mappings.iter_mut().filter(in_mm).find(|m| m.pmds > 0) {
            Some(m) => {
                m.pmds -= 1;
                m.ptes += PMD_PAGES;
                true
            }
            None => false,
        }
    }

    pub fn count_write_fault(&mut self, copied: bool) {
        let count = if copied { &mut self.cow_copies } else { &mut self.cow_reuses };
        *count = count.saturating_add(1);
    }
}

/// What applying one rmap event found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The daemon's own count disagreed with the kernel's before this
    /// event: (own, kernel).
    pub disagreement: Option<(u64, u64)>,
    /// The same for a folio mapped before the daemon saw it: the kernel's
    /// count was adopted, and this is expected, not a fault of the table.
    pub preexisting_corrected: bool,
    /// Mappings the daemon held that the kernel had not (found by that
    /// disagreement), dropped.
    pub phantoms: u64,
    /// A PTE went from an address space that held the folio only by PMD:
    /// the PMD was split without an rmap call (6.1-6.7 do it inline).
    pub pmd_split_inferred: bool,
    /// The last mapping went: the folio left the table with these facts.
    pub retired: Option<Retired>,
    /// A new folio pushed another out of the full table.
    pub evicted: bool,
    /// A small folio outside the sample (see [`FolioTable::set_budget`]):
    /// the event changed nothing.
    pub sampled_out: bool,
    /// The table reached its budget at this event and halved its sample of
    /// small folios (maybe more than once): how many entries it dropped.
    pub sample_tightened: Option<usize>,
    /// The kernel's maybe-shared bit came with the event, and the
    /// simulated one ([`MmIdSlots`]) was compared with it: equal or not.
    pub shared_bit_agrees: Option<bool>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Retired {
    pub kind: FolioKind,
    pub order: u8,
    pub peak_sharers: u32,
    pub peak_mapcount: u64,
    pub ever_partially_mapped: bool,
}

impl Retired {
    fn of(state: &FolioState) -> Self {
        Retired {
            kind: state.kind,
            order: state.order,
            peak_sharers: u32::from(state.peak_sharers),
            peak_mapcount: u64::from(state.peak_mapcount),
            ever_partially_mapped: state.ever_partially_mapped(),
        }
    }
}

/// What an address space's teardown found still filed under it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TornDown {
    /// Mappings whose removal was never seen, by the folio's kind.
    pub phantoms: Vec<(FolioKind, u64)>,
    /// Folios left with no mapping at all.
    pub retired: Vec<Retired>,
}

/// One rmap call, as the table needs it.
pub struct RmapCall {
    pub folio: u64,
    pub mm: u64,
    /// `Event::base`: where the folio's first page is in this mapping.
    pub base: u64,
    pub op: RmapOp,
    pub level: Level,
    pub nr_pages: u32,
    pub kind: FolioKind,
    pub order: u8,
    /// `folio_mapcount()` before the call, when the kernel keeps it (small
    /// folios always, large ones since 6.10); after it for `AddNew`.
    pub kernel_mapcount: Option<u64>,
    pub refcount: i32,
    pub shared_hint: u8,
    /// The calling task uses `mm` itself (`event_flags::OWN_MM`); not so
    /// when fork maps a page into the child.
    pub own_mm: bool,
    /// When the kernel side read the folio (`Event::timestamp_ns`).
    pub timestamp_ns: u64,
}

/// Index of a folio's entry in `FolioTable::slots`.
type Slot = u32;

/// Slots of the folios one address space maps, by region. Two slots fit
/// inline at no cost (a SmallVec of two `u32` is the size of a Vec): an
/// address space's few large folios each have a region of their own.
type RegionIndex = BTreeMap<u64, SmallVec<[Slot; 2]>>;

/// The live folios. Entries sit in a slab (`slots`) and a hash table of
/// slot numbers finds them by address: 4 bytes per hash bucket instead of
/// key and entry, which the table's load factor would multiply.
pub struct FolioTable {
    /// Slot numbers, hashed by the folio address stored in the slot.
    by_folio: HashTable<Slot>,
    slots: Vec<Option<FolioState>>,
    /// Empty slots, reused before the slab grows.
    free: Vec<Slot>,
    /// Where the next eviction looks for a victim in the slab.
    evict_next: usize,
    /// Address space → region → slots of folios mapped there: what fork,
    /// mremap and teardown look up. Entries go stale (the folio left, the
    /// mapping moved): a region's list is pruned when it is read, and the
    /// whole index is rebuilt when it grows to four times the table.
    by_mm: HashMap<u64, RegionIndex>,
    by_mm_len: usize,
    /// Mappings made since `by_mm` was last asked: (address space, base,
    /// slot), filed when fork, mremap or teardown asks, or when this is
    /// full. Most small folios come and go between two such questions
    /// (a fault, a write, an unmap): their mappings are never filed, and
    /// the index does not fill with entries only to prune them.
    unfiled: Vec<(u64, u64, Slot)>,
    /// Regions listed in `by_mm`, for [`FolioTable::heap_bytes`].
    regions: usize,
    capacity: usize,
    next_serial: u32,
    /// Address space → the tgid seen using it, for the debug view.
    mm_tgid: HashMap<u64, u32>,
    /// The address space last given an owner in `mm_tgid`: a task's
    /// events come in runs, and most carry their owner (so no hash
    /// lookup per event). 0 when none.
    last_owner_noted: u64,
    /// Children whose fork is under way: the table copied their parent's
    /// mappings, and their own task has not run yet.
    forking: HashSet<u64>,
    /// Large folios' simulated `_mm_ids`, by folio address: for folios
    /// whose every mapping the table saw being made, until the table has
    /// to correct itself (then the history the bit depends on is lost).
    mm_ids: HashMap<u64, MmIdSlots>,
    /// Folios whose count differs from the kernel's now, by folio address:
    /// when the first differing event of the current run was read.
    differing_since: HashMap<u64, u64>,
    /// Heap bytes the table may take before it samples small folios
    /// (`--folio-table.memory`; see [`FolioTable::heap_bytes`]).
    memory_budget: u64,
    /// Small folios are tracked one in 2^`sample_shift`
    /// (`mapcount_common::sampling`); 0 while the table is exact.
    sample_shift: u32,
}

fn hash(folio: u64) -> u64 {
    FxBuildHasher.hash_one(folio)
}

impl FolioTable {
    pub fn new(capacity: usize) -> Self {
        Self {
            by_folio: HashTable::new(),
            slots: Vec::new(),
            evict_next: 0,
            free: Vec::new(),
            by_mm: HashMap::default(),
            by_mm_len: 0,
            unfiled: Vec::new(),
            regions: 0,
            // Slot numbers are 32 bits.
            capacity: capacity.clamp(1, Slot::MAX as usize),
            next_serial: 1,
            mm_tgid: HashMap::default(),
            last_owner_noted: 0,
            forking: HashSet::default(),
            mm_ids: HashMap::default(),
            differing_since: HashMap::default(),
            memory_budget: u64::MAX,
            sample_shift: 0,
        }
    }

    /// Small folios are tracked exactly while the table takes less than
    /// `bytes` of heap; at that point it keeps a sample of them (every
    /// large folio stays, up to the capacity).
    pub fn set_memory_budget(&mut self, bytes: u64) {
        self.memory_budget = bytes;
    }

    /// The heap the table holds, from its containers' capacities (what
    /// was allocated, not what is in use): the slab of entries, the hash
    /// table, the address-space index and the side maps. Mappings of folios
    /// shared by more than one address space spill to the heap and are not
    /// counted (a small share: 32 bytes per further mapping).
    pub fn heap_bytes(&self) -> u64 {
        /// A region of `by_mm`: a B-tree entry (two slots inline), the
        /// tree's nodes amortised; longer lists count in `by_mm_len`.
        const REGION_BYTES: usize = 64;
        let hashed = |capacity: usize, entry: usize| capacity * (entry + 1); // control byte
        let bytes = self.slots.capacity() * size_of::<Option<FolioState>>()
            + self.free.capacity() * size_of::<Slot>()
            + hashed(self.by_folio.capacity(), size_of::<Slot>())
            + hashed(self.mm_ids.capacity(), size_of::<(u64, MmIdSlots)>())
            + hashed(self.differing_since.capacity(), size_of::<(u64, u64)>())
            + hashed(self.forking.capacity(), size_of::<u64>())
            + hashed(self.mm_tgid.capacity(), size_of::<(u64, u32)>())
            + hashed(self.by_mm.capacity(), size_of::<(u64, RegionIndex)>())
            + self.regions * REGION_BYTES
            + self.by_mm_len * size_of::<Slot>()
            + self.unfiled.capacity() * size_of::<(u64, u64, Slot)>();
        bytes as u64
    }

    /// Whether a new folio would take the table over its budget:
    /// over its memory, or to the hard bound on entries (where it would
    /// evict). A folio that takes a free slot grows nothing (the slab and
    /// the hash table keep their size when entries leave), so only a table
    /// without one is asked, and the slab's next doubling counts.
    fn over_budget(&self) -> bool {
        if !self.free.is_empty() {
            return false;
        }
        if self.len() + 1 >= self.capacity {
            return true;
        }
        let slot = size_of::<Option<FolioState>>();
        let growth =
            if self.slots.len() == self.slots.capacity() { self.slots.capacity().max(4) * slot } else { 0 };
        self.memory_budget != u64::MAX && self.heap_bytes() + growth as u64 >= self.memory_budget
    }

    /// Track one small folio in 2^`shift` from now on, before the budget
    /// asks for it (a sample only ever gets sparser: entries outside it go).
    pub fn sample_from_now(&mut self, shift: u32) -> usize {
        let mut dropped = 0;
        while self.sample_shift < shift.min(sampling::MAX_SHIFT) {
            self.sample_shift += 1;
            dropped += self.drop_outside_sample();
        }
        dropped
    }

    /// Small folios are tracked one in 2^shift (0: all).
    pub fn sample_shift(&self) -> u32 {
        self.sample_shift
    }

    /// The table is at its budget: track half as many small folios (drop
    /// the entries of those that leave the sample; their slots take the
    /// next folios), halving again while that frees nothing, down to the
    /// sparsest sample. Returns the entries dropped. Raising the shift only
    /// ever drops folios (the samples are nested): nothing is counted twice.
    fn tighten_sample(&mut self) -> usize {
        let mut dropped = 0;
        while dropped == 0 && self.sample_shift < sampling::MAX_SHIFT {
            self.sample_shift += 1;
            dropped = self.drop_outside_sample();
        }
        dropped
    }

    /// Drops the entries of small folios outside the current sample, and
    /// files what stays in regions as much wider as the sample is sparser.
    fn drop_outside_sample(&mut self) -> usize {
        let mut dropped = 0;
        for slot in 0..self.slots.len() {
            if let Some(state) = &self.slots[slot]
                && !sampling::sampled(state.folio, state.order, self.sample_shift)
            {
                self.remove(slot as Slot);
                dropped += 1;
            }
        }
        self.rebuild_index();
        dropped
    }

    /// log2 of the index's region size. Exact, 2 MiB: up to 512 small
    /// folios per region. Sampled one in 2^n, 2^n times wider, so that a
    /// region still holds about as many entries: at 2 MiB, most regions of
    /// a sparse sample would hold one folio, and their index cost more than
    /// the entries (the terabyte replay: a million regions, 64 MB).
    fn region_shift(&self) -> u32 {
        REGION_SHIFT + self.sample_shift
    }

    pub fn len(&self) -> usize {
        self.by_folio.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_folio.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FolioState> {
        self.slots.iter().flatten()
    }

    /// Slots in the slab, free ones included: what a walk of it reads.
    pub fn slab_len(&self) -> usize {
        self.slots.len()
    }

    /// The folios in `n` parts of about equal slab length, for walks on
    /// several cores.
    pub fn parts(&self, n: usize) -> impl Iterator<Item = impl Iterator<Item = &FolioState>> {
        let part = self.slots.len().div_ceil(n.max(1)).max(1);
        self.slots.chunks(part).map(|slots| slots.iter().flatten())
    }

    fn find(&self, folio: u64) -> Option<Slot> {
        let slots = &self.slots;
        self.by_folio
            .find(hash(folio), |&slot| slots[slot as usize].as_ref().is_some_and(|s| s.folio == folio))
            .copied()
    }

    #[expect(clippy::expect_used, reason = "the index only holds slots of live folios")]
    fn state(&mut self, slot: Slot) -> &mut FolioState {
        self.slots[slot as usize].as_mut().expect("indexed slots hold a folio")
    }

    pub fn get(&self, folio: u64) -> Option<&FolioState> {
        self.find(folio).and_then(|slot| self.slots[slot as usize].as_ref())
    }

    pub fn get_mut(&mut self, folio: u64) -> Option<&mut FolioState> {
        self.find(folio).map(|slot| self.state(slot))
    }

    /// The simulated `_mm_ids` of a large folio, where the table keeps one.
    pub fn mm_id_slots(&self, folio: &FolioState) -> Option<&MmIdSlots> {
        self.mm_ids.get(&folio.folio)
    }

    /// Records the process using an address space: the first one seen.
    /// A vfork child (posix_spawn, a shell running a command) runs in its
    /// parent's address space until it execs, and then exits: its tgid
    /// would name the space after a process that is gone. (The entry goes
    /// at teardown, so a reused `mm` gets its new owner.)
    pub fn note_owner(&mut self, mm: u64, tgid: u32) {
        if mm != 0 && mm != self.last_owner_noted {
            self.mm_tgid.entry(mm).or_insert(tgid);
            self.last_owner_noted = mm;
        }
    }

    /// The process seen using an address space.
    pub fn tgid_of(&self, mm: u64) -> Option<u32> {
        self.mm_tgid.get(&mm).copied()
    }

    /// Folios mapped by the address space(s) a tgid was seen using.
    /// The folios a process maps, by serial, each with the lowest user
    /// address it has in that process (of the folio's first page).
    pub fn mapped_by_tgid(&self, tgid: u32) -> Vec<(&FolioState, u64)> {
        let mms: Vec<u64> = self.mm_tgid.iter().filter(|(_, t)| **t == tgid).map(|(mm, _)| *mm).collect();
        let mut found: Vec<(&FolioState, u64)> = self
            .iter()
            .filter_map(|f| {
                let base = f
                    .mappings
                    .iter()
                    .filter(|m| m.total() > 0 && mms.contains(&m.mm))
                    .map(|m| m.base)
                    .min()?;
                Some((f, base))
            })
            .collect();
        // Oldest first: by age, which a wrapped serial keeps.
        found.sort_by_key(|(f, _)| std::cmp::Reverse(self.next_serial.wrapping_sub(f.serial)));
        found
    }

    /// What smaps, pagemap and kpagecount report for a process's mappings
    /// of folios that start in `[from, to)` of its address space: exact,
    /// and without per-page mapcounts (see `crate::smaps`).
    pub fn smaps_of(&self, tgid: u32, from: u64, to: u64) -> SmapsReport {
        let mms: Vec<u64> = self.mm_tgid.iter().filter(|(_, t)| **t == tgid).map(|(mm, _)| *mm).collect();
        let mut report = SmapsReport::default();
        for folio in self.iter() {
            smaps::account(folio, self.mm_id_slots(folio), |m, exact, estimate| {
                if mms.contains(&m.mm) && (from..to).contains(&m.base) {
                    report.exact.add(exact);
                    report.no_page_mapcount.add(estimate);
                }
            });
        }
        report
    }

    /// Adds a folio the table does not hold; returns its slot and whether
    /// another folio was evicted to make room.
    fn insert(&mut self, state: FolioState) -> (Slot, bool) {
        let mut evicted = false;
        if self.by_folio.len() >= self.capacity {
            // Any entry will do: the table is a cache of live folios, and
            // the count of evictions tells how much it missed. A cursor
            // over the slab finds one at once (the slab of a full table
            // has few holes); the hash table's first entry would not: it
            // lies further from the start after every removal, and a
            // table under eviction pressure slowed down without bound.
            let slab = self.slots.len();
            for _ in 0..slab {
                let slot = self.evict_next % slab;
                self.evict_next = slot + 1;
                if self.slots[slot].is_some() {
                    self.remove(slot as Slot);
                    evicted = true;
                    break;
                }
            }
        }
        let hash = hash(state.folio);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(state);
                slot
            }
            None => {
                self.slots.push(Some(state));
                (self.slots.len() - 1) as Slot
            }
        };
        let slots = &self.slots;
        self.by_folio.insert_unique(hash, slot, |&s| hash_of(slots, s));
        (slot, evicted)
    }

    #[expect(clippy::expect_used, reason = "the index only holds slots of live folios")]
    fn remove(&mut self, slot: Slot) -> FolioState {
        let state = self.slots[slot as usize].take().expect("indexed slots hold a folio");
        // Only large folios have one: no lookup for the many small ones.
        if state.order > 0 {
            self.mm_ids.remove(&state.folio);
        }
        if state.marks.differing_events() > 0 {
            self.differing_since.remove(&state.folio);
        }
        if let Ok(entry) = self.by_folio.find_entry(hash(state.folio), |&s| s == slot) {
            entry.remove();
        }
        self.free.push(slot);
        state
    }

    /// `slot` has a new mapping of `mm` at `base`: filed in the index
    /// before anything asks the index (see `unfiled`).
    fn index(&mut self, mm: u64, base: u64, slot: Slot) {
        if self.unfiled.len() == UNFILED_MAX {
            self.file_unfiled();
        }
        self.unfiled.push((mm, base, slot));
    }

    /// Files the mappings made since the index was last asked that are
    /// still there. They come in runs of one address space and region (a
    /// process faulting its pages in, a fork copying a VMA): each run's
    /// list is looked up once, not once per mapping, which made this most
    /// of a large fork's cost.
    fn file_unfiled(&mut self) {
        let shift = self.region_shift();
        let slots = &self.slots;
        // In place: each base becomes its region, and what went is dropped.
        self.unfiled.retain_mut(|(mm, base, slot)| {
            *base >>= shift;
            slots[*slot as usize].as_ref().is_some_and(|s| s.filed_at(*mm, *base, shift))
        });
        for run in self.unfiled.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (mm, region, _) = run[0];
            let list = match self.by_mm.entry(mm).or_default().entry(region) {
                std::collections::btree_map::Entry::Occupied(list) => list.into_mut(),
                std::collections::btree_map::Entry::Vacant(place) => {
                    self.regions += 1;
                    place.insert(SmallVec::new())
                }
            };
            for &(_, _, slot) in run {
                // Not when the slot was just freed and reused in the region.
                if list.last() != Some(&slot) {
                    list.push(slot);
                    self.by_mm_len += 1;
                }
            }
        }
        self.unfiled.clear(); // its room kept
        if self.by_mm_len > 4 * self.len().max(1024) {
            self.rebuild_index();
        }
    }

    fn rebuild_index(&mut self) {
        let shift = self.region_shift();
        self.by_mm.clear();
        self.unfiled.clear(); // what they list is in the slots
        for (slot, state) in self.slots.iter().enumerate() {
            let Some(state) = state else { continue };
            for m in state.mappings.iter().filter(|m| m.total() > 0) {
                self.by_mm.entry(m.mm).or_default().entry(m.base >> shift).or_default().push(slot as Slot);
            }
        }
        self.by_mm_len = 0;
        self.regions = self.by_mm.values().map(BTreeMap::len).sum();
        for regions in self.by_mm.values_mut() {
            for list in regions.values_mut() {
                list.sort_unstable();
                list.dedup();
                self.by_mm_len += list.len();
            }
        }
    }

    /// Slots of folios that `mm` maps at a base in `[start, end)`, pruned of
    /// stale entries on the way. Each slot once, though it may be listed in
    /// more than one region (see the end).
    fn slots_in(&mut self, mm: u64, start: u64, end: u64) -> Vec<Slot> {
        self.file_unfiled();
        let shift = self.region_shift();
        let Some(regions) = self.by_mm.get_mut(&mm) else { return Vec::new() };
        if end <= start {
            return Vec::new();
        }
        let slots = &self.slots;
        let mut found = Vec::new();
        let mut pruned = 0;
        let mut emptied = Vec::new();
        for (&region, list) in regions.range_mut(start >> shift..=(end - 1) >> shift) {
            let listed = list.len();
            // Not sorted here: `found` is, once. A slot listed twice in a
            // region (freed and reused there, with others between) stays
            // so until the index is rebuilt.
            list.retain(|slot| slots[*slot as usize].as_ref().is_some_and(|s| s.filed_at(mm, region, shift)));
            list.dedup();
            pruned += listed - list.len();
            found.extend_from_slice(list);
            if list.is_empty() {
                emptied.push(region);
            }
        }
        // Only the regions read: a fork calls this once per VMA, and a walk
        // of every region of a large process at each made forks quadratic.
        for region in &emptied {
            regions.remove(region);
        }
        self.regions -= emptied.len();
        self.by_mm_len -= pruned;
        // A folio `mm` maps at two bases in two regions (the halves of a
        // THP after mremap of one of them) is in both lists. Callers handle
        // all of a folio's mappings at once: met twice, fork would copy its
        // pages in the VMA twice, and mremap move them twice.
        found.sort_unstable();
        found.dedup();
        found
    }

    #[expect(clippy::expect_used, reason = "the index only holds slots of live folios")]
    pub fn apply(&mut self, call: &RmapCall) -> Applied {
        let mut applied = Applied::default();
        // Most events are a task's own (`own_mm`) and no fork is under way.
        if call.own_mm {
            if !self.forking.is_empty() {
                self.forking.remove(&call.mm);
            }
        } else if call.op == RmapOp::AddNew && call.order == 0 && self.forking.contains(&call.mm) {
            applied.phantoms += self.replace_fork_copy(call);
        }
        // A small folio outside the sample is none of the table's business.
        // The table cannot hold it as the large folio it was before a split:
        // the kernel splits only unmapped folios (the large folio's entry
        // left with its last unmap), and an order-0 event cannot come from
        // an inline PMD split, which keeps the folio large. So no lookup:
        // these are most events of a sampled host.
        let outside = |table: &Self| call.order == 0 && !sampling::sampled(call.folio, 0, table.sample_shift);
        if outside(self) {
            applied.sampled_out = true;
            return applied;
        }
        let found = self.find(call.folio);
        // A large folio is always tracked, but the budget is the whole
        // table's: small folios make room for it.
        if found.is_none() && self.over_budget() {
            applied.sample_tightened = Some(self.tighten_sample());
            if outside(self) {
                applied.sampled_out = true;
                return applied;
            }
        }
        let known = found.filter(|_| call.op != RmapOp::AddNew);
        let slot = if let Some(slot) = known {
            slot
        } else {
            // A new folio, or one the daemon first sees now: whatever the
            // kernel already counts belongs to address spaces not yet seen.
            let serial = self.next_serial;
            self.next_serial = self.next_serial.wrapping_add(1);
            let mut state = FolioState::new(call.folio, serial, call.kind, call.order);
            let complete = call.op == RmapOp::AddNew || call.kernel_mapcount == Some(0);
            state.marks.set(Marks::COMPLETE, complete);
            if call.op != RmapOp::AddNew {
                let unknown = call.kernel_mapcount.unwrap_or(match call.op {
                    RmapOp::Remove => mappings_of(call),
                    _ => 0,
                });
                state.unknown = narrow(unknown, u32::MAX);
            }
            let simulated = complete && maybe_shared::applies(call.kind, call.order);
            let slot = match found {
                // Freshly allocated at an address the table still holds
                // (its last unmap was missed): start over in place.
                Some(slot) => {
                    let old = std::mem::replace(self.state(slot), state);
                    if old.order > 0 {
                        self.mm_ids.remove(&call.folio);
                    }
                    slot
                }
                None => {
                    let (slot, evicted) = self.insert(state);
                    applied.evicted = evicted;
                    slot
                }
            };
            if simulated {
                self.mm_ids.insert(call.folio, MmIdSlots::default());
            }
            slot
        };
        // Taken out while the folio's state is borrowed; put back at the end.
        // A simulation exists only while the folio is large as the table
        // knows it (it is dropped when the order changes).
        let mut sim = if self.state(slot).order > 0 { self.mm_ids.remove(&call.folio) } else { None };
        let state = self.slots[slot as usize].as_mut().expect("indexed slots hold a folio");
        if known.is_some()
            && let Some(kernel) = call.kernel_mapcount
        {
            // The kernel reads its counter in the probe and changes it after
            // the probe returns; a task preempted in between, on another CPU,
            // lets other tasks' changes overtake it. Such differences come
            // and go within an event or two. A missed mapping (or a phantom)
            // stays: only a difference seen at CONFIRM_AFTER consecutive
            // events counts, and for a folio whose every mapping the table
            // saw, one that lasted CONFIRM_AFTER_NS.
            let own = state.mapcount();
            let differing = state.marks.differing_events();
            if own == kernel {
                if differing > 0 {
                    self.differing_since.remove(&call.folio);
                }
                state.marks.set_differing_events(0);
            } else {
                state.marks.set_differing_events(differing + 1);
                let since = *self.differing_since.entry(call.folio).or_insert(call.timestamp_ns);
                let lasted = !state.complete() || call.timestamp_ns.saturating_sub(since) >= CONFIRM_AFTER_NS;
                if differing + 1 >= CONFIRM_AFTER && lasted {
                    self.differing_since.remove(&call.folio);
                    if state.complete() {
                        applied.disagreement = Some((own, kernel));
                    } else {
                        applied.preexisting_corrected = true;
                    }
                    state.marks.set_differing_events(0);
                    sim = None;
                    // Adopt the kernel's count: mappings the daemon cannot
                    // place become unknown, mappings the kernel lacks go.
                    let placed = own - u64::from(state.unknown);
                    if kernel >= placed {
                        state.unknown = narrow(kernel - placed, u32::MAX);
                    } else {
                        state.unknown = 0;
                        applied.phantoms = state.drop_phantoms(placed - kernel, call.mm);
                    }
                }
            }
        }
        // Kind and order change (an anon folio becomes KSM, a split): the
        // latest event is right. A split folio's pages start new `_mm_ids`
        // the table did not see.
        if state.order != call.order || state.kind != call.kind {
            sim = None;
        }
        let kernel_bit = match call.shared_hint {
            shared_hint::MAYBE_SHARED => Some(true),
            shared_hint::EXCLUSIVE => Some(false),
            _ => None,
        };
        // Read at the call's entry, before it changed the bit; for a new
        // folio, after.
        if call.op != RmapOp::AddNew
            && let (Some(kernel), Some(sim)) = (kernel_bit, &sim)
        {
            applied.shared_bit_agrees = Some(sim.shared_bit() == kernel);
        }
        state.kind = call.kind;
        state.order = call.order;
        state.peak_refcount = state.peak_refcount.max(call.refcount);
        state.marks.set_shared_hint(call.shared_hint);

        let mut new_entry = false;
        match call.op {
            RmapOp::Add | RmapOp::AddNew => {
                let existing = state.mappings.iter().position(|m| m.mm == call.mm && m.base == call.base);
                let slot = match existing {
                    Some(i) => Some(i),
                    None if state.mappings.len() < MAX_MAPPINGS_PER_FOLIO => {
                        state.mappings.push(Mapping {
                            mm: call.mm,
                            base: call.base,
                            ptes: 0,
                            pmds: 0,
                            puds: 0,
                        });
                        new_entry = true;
                        Some(state.mappings.len() - 1)
                    }
                    None => None,
                };
                match slot {
                    Some(i) => add_to(&mut state.mappings[i], call, 1),
                    None => state.unknown = state.unknown.saturating_add(narrow(mappings_of(call), u32::MAX)),
                }
                if let Some(sim) = &mut sim {
                    sim.add(call.mm, mappings_of(call));
                }
            }
            RmapOp::Remove => {
                applied.pmd_split_inferred = state.infer_pmd_split(call);
                if let Some(sim) = &mut sim {
                    if applied.pmd_split_inferred {
                        // As 6.8+ split: 512 PTEs added, then the PMD removed.
                        sim.add(call.mm, u64::from(PMD_PAGES));
                        sim.sub(call.mm, 1);
                    }
                    sim.sub(call.mm, mappings_of(call));
                }
                // Filed at this address, else (a KSM or driver page whose
                // VMA changed since) anywhere in the same address space.
                let existing = state
                    .mappings
                    .iter()
                    .position(|m| m.mm == call.mm && m.base == call.base && holds(m, call))
                    .or_else(|| state.mappings.iter().position(|m| m.mm == call.mm && holds(m, call)));
                match existing {
                    Some(i) => add_to(&mut state.mappings[i], call, -1),
                    None => state.unknown = state.unknown.saturating_sub(narrow(mappings_of(call), u32::MAX)),
                }
                state.mappings.retain(|m| m.total() > 0);
                if state.mappings.spilled() && state.mappings.len() <= 1 {
                    state.mappings.shrink_to_fit(); // back inline
                }
            }
        }
        // After a remove too: a folio first seen at its unmap, or one whose
        // count was just adopted from the kernel.
        let mapcount = state.mapcount();
        state.note_peaks(mapcount, new_entry);
        if state.partially_mapped() {
            state.marks.set(Marks::EVER_PARTIALLY_MAPPED, true);
        }
        if call.op == RmapOp::AddNew
            && let (Some(kernel), Some(sim)) = (kernel_bit, &sim)
        {
            applied.shared_bit_agrees = Some(sim.shared_bit() == kernel);
        }
        if mapcount == 0 {
            let state = self.remove(slot);
            applied.retired = Some(Retired::of(&state));
        } else {
            if let Some(sim) = sim {
                self.mm_ids.insert(call.folio, sim);
            }
            if new_entry {
                self.index(call.mm, call.base, slot);
            }
        }
        applied
    }

    /// A fresh small folio mapped into a child's address space by the
    /// forking task: fork found the parent's page pinned
    /// (`folio_try_dup_anon_rmap_*` returns -EBUSY) and gave the child a
    /// copy (`copy_present_page`) instead of a mapping of the original; a
    /// pinned THP is split first and each page copied. The table copied the
    /// original when the VMA's fork began: that page of it is a phantom.
    fn replace_fork_copy(&mut self, call: &RmapCall) -> u64 {
        const PAGE: u64 = 4096;
        let address = call.base;
        let start = address.saturating_sub(u64::from(PMD_PAGES) * PAGE - PAGE);
        for slot in self.slots_in(call.mm, start, address + 1) {
            let state = self.state(slot);
            if state.folio == call.folio {
                continue;
            }
            let size = state.pages() * PAGE;
            let Some(m) = state
                .mappings
                .iter_mut()
                .find(|m| m.mm == call.mm && m.base <= address && address < m.base + size && m.total() > 0)
            else {
                continue;
            };
            if m.ptes == 0 && m.pmds > 0 {
                m.pmds -= 1; // split before the pages were copied
                m.ptes += PMD_PAGES;
            }
            if m.ptes == 0 {
                continue;
            }
            m.ptes -= 1;
            state.mappings.retain(|m| m.total() > 0);
            let folio = state.folio;
            if state.mapcount() == 0 {
                self.remove(slot);
            }
            // The kernel never added the mapping the table just took back.
            self.mm_ids.remove(&folio);
            return 1;
        }
        0
    }

    /// Fork copied the VMA at `[start, end)` of `src_mm` into `dst_mm`: the
    /// mappings the kernel duplicated (`copy_huge`: PMD and PUD entries as
    /// well as PTEs) now exist in the child too. A large folio may lie
    /// across the VMA's edge (madvise(MADV_DONTFORK) on part of it, an
    /// mprotect): only its pages inside the range are copied, which for a
    /// partially mapped folio the table can only estimate (its mapped pages
    /// are taken to be inside first). Over the VMAs of one fork the child
    /// never gets more of a folio than the parent maps: a folio across two
    /// copied VMAs is copied once, however its pages were estimated.
    /// Returns how many folios gained a sharer.
    pub fn fork(&mut self, src_mm: u64, dst_mm: u64, start: u64, end: u64, copy_huge: bool) -> usize {
        const PAGE: u64 = 4096;
        self.forking.insert(dst_mm);
        // A folio that starts before the range may still reach into it.
        let reach = u64::from(PMD_PAGES) * PAGE - PAGE;
        let candidates = self.slots_in(src_mm, start.saturating_sub(reach), end);
        let mut copied = Vec::new();
        for slot in candidates {
            let Some(state) = self.slots[slot as usize].as_mut() else { continue };
            let mut sim = if state.order > 0 { self.mm_ids.get_mut(&state.folio) } else { None };
            let size = state.pages() * PAGE;
            let mut gained = false;
            for i in 0..state.mappings.len() {
                let source = state.mappings[i];
                if source.mm != src_mm || source.base >= end || source.base.saturating_add(size) <= start {
                    continue;
                }
                let inside = (end.min(source.base + size) - start.max(source.base)) / PAGE;
                let whole = source.base >= start && source.base + size <= end;
                let mut source = source;
                if !whole && source.pmds > 0 && source.ptes == 0 {
                    // A VMA edge inside a PMD: the kernel split it, inline
                    // on 6.1-6.7 (mprotect or madvise of part of a THP).
                    let m = &mut state.mappings[i];
                    m.pmds -= 1;
                    m.ptes += PMD_PAGES;
                    source = *m;
                    if let Some(sim) = sim.as_deref_mut() {
                        sim.add(src_mm, u64::from(PMD_PAGES));
                        sim.sub(src_mm, 1);
                    }
                }
                let ptes = source.ptes.min(narrow(inside, u32::MAX));
                let (pmds, puds) = if copy_huge && whole { (source.pmds, source.puds) } else { (0, 0) };
                if u64::from(ptes) + u64::from(pmds) + u64::from(puds) == 0 {
                    continue;
                }
                // The child's entry exists when another VMA over the same
                // folio was copied already. The first VMA's share was an
                // estimate: together they copy no more than the parent maps
                // (6.1 does not align anonymous mmaps on 2 MiB, and a THP
                // whose pages below a VMA edge were zapped lies across it).
                if let Some(child) =
                    state.mappings.iter_mut().find(|m| m.mm == dst_mm && m.base == source.base)
                {
                    let left = source.ptes.saturating_sub(child.ptes);
                    child.ptes = child.ptes.saturating_add(ptes.min(left));
                    child.pmds = child.pmds.saturating_add(pmds);
                    child.puds = child.puds.saturating_add(puds);
                    if let Some(sim) = sim.as_deref_mut() {
                        sim.add(dst_mm, u64::from(ptes.min(left)) + u64::from(pmds) + u64::from(puds));
                    }
                    continue;
                }
                let child = Mapping { mm: dst_mm, base: source.base, ptes, pmds, puds };
                // The child's mappings are added to the folio's counts
                // (folio_try_dup_anon_rmap_*, folio_dup_file_rmap_*).
                if let Some(sim) = sim.as_deref_mut() {
                    sim.add(dst_mm, child.total());
                }
                if state.mappings.len() < MAX_MAPPINGS_PER_FOLIO {
                    state.mappings.push(child);
                    copied.push((slot, child.base));
                } else {
                    state.unknown = state.unknown.saturating_add(narrow(child.total(), u32::MAX));
                }
                gained = true;
            }
            if gained {
                state.note_peaks(state.mapcount(), true);
            }
        }
        let folios = {
            let mut slots: Vec<Slot> = copied.iter().map(|&(slot, _)| slot).collect();
            slots.dedup();
            slots.len()
        };
        for (slot, base) in copied {
            self.index(dst_mm, base, slot);
        }
        folios
    }

    /// `move_page_tables`: the entries of `mm` at `[old, old + len)` now sit
    /// at `new`. A large folio only partly inside the range is split in
    /// two entries (mremap of half a THP): the pages inside move, filed at
    /// where the folio's first page would be at the destination; for a
    /// partially mapped folio, how many of its mapped pages were inside is
    /// an estimate. Returns how many mappings moved.
    pub fn move_range(&mut self, mm: u64, old: u64, new: u64, len: u64) -> usize {
        const PAGE: u64 = 4096;
        let end = old.saturating_add(len);
        let reach = u64::from(PMD_PAGES) * PAGE - PAGE;
        let mut moved = Vec::new();
        for slot in self.slots_in(mm, old.saturating_sub(reach), end) {
            let Some(state) = self.slots[slot as usize].as_mut() else { continue };
            let mut sim = if state.order > 0 { self.mm_ids.get_mut(&state.folio) } else { None };
            let size = state.pages() * PAGE;
            for i in 0..state.mappings.len() {
                let m = state.mappings[i];
                if m.mm != mm || m.base >= end || m.base.saturating_add(size) <= old || m.total() == 0 {
                    continue;
                }
                let base = (m.base.wrapping_sub(old)).wrapping_add(new);
                let whole = m.base >= old && m.base + size <= end;
                let part = if whole {
                    m
                } else {
                    // A PMD cannot move in part: the kernel split it first.
                    let m = &mut state.mappings[i];
                    if m.pmds > 0 && m.ptes == 0 {
                        m.pmds -= 1;
                        m.ptes += PMD_PAGES;
                        if let Some(sim) = sim.as_deref_mut() {
                            sim.add(mm, u64::from(PMD_PAGES));
                            sim.sub(mm, 1);
                        }
                    }
                    let inside = (end.min(m.base + size) - old.max(m.base)) / PAGE;
                    let ptes = m.ptes.min(narrow(inside, u32::MAX));
                    m.ptes -= ptes;
                    Mapping { mm, base, ptes, pmds: 0, puds: 0 }
                };
                if whole {
                    state.mappings[i] = Mapping { ptes: 0, pmds: 0, puds: 0, ..m };
                }
                // The same folio already filed at the destination (moved
                // back and forth, or its other part): one entry holds both.
                if let Some(target) = state.mappings.iter_mut().find(|o| o.mm == mm && o.base == base) {
                    target.ptes = target.ptes.saturating_add(part.ptes);
                    target.pmds = target.pmds.saturating_add(part.pmds);
                    target.puds = target.puds.saturating_add(part.puds);
                } else if part.total() > 0 {
                    state.mappings.push(Mapping { base, ..part });
                    moved.push((slot, base));
                }
            }
            state.mappings.retain(|m| m.total() > 0);
        }
        let count = moved.len();
        for (slot, base) in moved {
            self.index(mm, base, slot);
        }
        count
    }

    /// `exit_mmap` returned: nothing is mapped by `mm` any more. What the
    /// table still files under it are mappings whose removal it missed.
    pub fn teardown(&mut self, mm: u64) -> TornDown {
        let mut torn = TornDown::default();
        self.mm_tgid.remove(&mm);
        if self.last_owner_noted == mm {
            self.last_owner_noted = 0;
        }
        self.forking.remove(&mm);
        self.file_unfiled();
        let Some(regions) = self.by_mm.remove(&mm) else { return torn };
        self.regions -= regions.len();
        let mut slots: Vec<Slot> = regions.into_values().flatten().collect();
        self.by_mm_len -= slots.len();
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            let Some(state) = self.slots[slot as usize].as_mut() else { continue };
            let phantoms: u64 = state.mappings.iter().filter(|m| m.mm == mm).map(Mapping::total).sum();
            if phantoms == 0 {
                continue;
            }
            tracing::debug!(
                kind = ?state.kind,
                order = state.order,
                phantoms,
                mapcount = state.mapcount(),
                sharers = state.sharers(),
                complete = state.complete(),
                "mappings left at teardown"
            );
            state.mappings.retain(|m| m.mm != mm);
            // The table was wrong about this folio: its simulated bit too.
            self.mm_ids.remove(&state.folio);
            match torn.phantoms.iter_mut().find(|(kind, _)| *kind == state.kind) {
                Some((_, count)) => *count += phantoms,
                None => torn.phantoms.push((state.kind, phantoms)),
            }
            if state.mapcount() == 0 {
                let state = self.remove(slot);
                torn.retired.push(Retired::of(&state));
            }
        }
        torn
    }
}

#[expect(clippy::expect_used, reason = "the index only holds slots of live folios")]
fn hash_of(slots: &[Option<FolioState>], slot: Slot) -> u64 {
    hash(slots[slot as usize].as_ref().expect("indexed slots hold a folio").folio)
}

/// Mappings one call makes or removes, in `folio_mapcount` units.
fn mappings_of(call: &RmapCall) -> u64 {
    match call.level {
        Level::Pte => u64::from(call.nr_pages),
        Level::Pmd | Level::Pud => 1,
    }
}

fn holds(m: &Mapping, call: &RmapCall) -> bool {
    match call.level {
        Level::Pte => m.ptes > 0,
        Level::Pmd => m.pmds > 0,
        Level::Pud => m.puds > 0,
    }
}

fn add_to(m: &mut Mapping, call: &RmapCall, sign: i64) {
    match call.level {
        Level::Pte => m.ptes = (i64::from(m.ptes) + sign * i64::from(call.nr_pages)).max(0) as u32,
        Level::Pmd => m.pmds = (i64::from(m.pmds) + sign).max(0) as u16,
        Level::Pud => m.puds = (i64::from(m.puds) + sign).max(0) as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;
    const THP: u64 = 2 << 20;

    impl FolioTable {
        fn folio(&self, folio: u64) -> &FolioState {
            self.iter().find(|s| s.folio == folio).expect("folio in the table")
        }
    }

    fn call(
        folio: u64,
        mm: u64,
        base: u64,
        op: RmapOp,
        level: Level,
        nr: u32,
        kernel: Option<u64>,
    ) -> RmapCall {
        RmapCall {
            folio,
            mm,
            base,
            op,
            level,
            nr_pages: nr,
            kind: FolioKind::Anon,
            order: 9,
            kernel_mapcount: kernel,
            refcount: 1,
            shared_hint: 0,
            own_mm: true,
            timestamp_ns: next_timestamp(),
        }
    }

    /// Events a second apart: differences the table must confirm last
    /// longer than `CONFIRM_AFTER_NS` by their third event.
    fn next_timestamp() -> u64 {
        thread_local!(static NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
        NOW.with(|now| {
            now.set(now.get() + 1_000_000_000);
            now.get()
        })
    }

    /// A THP mapped by one PMD, forked three times: four sharers, and the
    /// kernel's count at the next event agrees.
    /// Sharers and partial mapping agree with a count by address space
    /// built the plain way, for a few mappings (compared in place) and
    /// many (sorted): address spaces mapping the folio twice, unmapped
    /// entries, up to the table's limit.
    #[test]
    fn sharers_and_partial_mapping_by_address_space() {
        for count in [2usize, 5, 8, 9, 30, MAX_MAPPINGS_PER_FOLIO] {
            let mappings: Vec<Mapping> = (0..count as u64)
                .map(|i| Mapping { mm: 1 + i % 7, base: i << 21, ptes: (i % 4) as u32 * 4, pmds: 0, puds: 0 })
                .collect();
            let folio = FolioState::for_test(FolioKind::File, 5, &mappings);
            let mut per_mm = std::collections::BTreeMap::<u64, u64>::new();
            for m in mappings.iter().filter(|m| m.total() > 0) {
                *per_mm.entry(m.mm).or_default() += u64::from(m.ptes);
            }
            assert_eq!(folio.sharers(), per_mm.len() as u32, "{count} mappings");
            let most = per_mm.values().max().copied().unwrap_or(0);
            assert_eq!(folio.partially_mapped(), most > 0 && most < 32, "{count} mappings, most {most}");
        }
    }

    #[test]
    fn fork_carries_mappings_to_children() {
        let mut table = FolioTable::new(16);
        for folio in 1..=4 {
            table.apply(&call(folio, 100, folio * THP, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        }
        for child in 1..=3 {
            assert_eq!(table.fork(100, 100 + child, THP, 5 * THP, true), 4);
        }
        for state in table.iter() {
            assert_eq!((state.sharers(), state.mapcount()), (4, 4));
        }
        // A child exits: the kernel said 4 before, and the daemon agrees.
        let applied = table.apply(&call(1, 102, THP, RmapOp::Remove, Level::Pmd, 512, Some(4)));
        assert_eq!(applied.disagreement, None);
        assert_eq!(table.folio(1).sharers(), 3);
    }

    /// A PTE-mapped 64 KiB folio, forked twice; the parent and the first
    /// child unmap it. The second child alone maps it, but held no slot of
    /// `_mm_ids`: the simulated bit stays set, as the kernel's does, and the
    /// kernel's bit at each event is checked against it.
    #[test]
    fn the_maybe_shared_bit_is_simulated_through_fork() {
        use crate::maybe_shared::{Facts, Heuristic, Verdict, verdict};
        let with = |op, mm, kernel, hint| RmapCall {
            order: 4,
            shared_hint: hint,
            ..call(7, mm, THP, op, Level::Pte, 16, Some(kernel))
        };
        let mut table = FolioTable::new(16);
        let applied = table.apply(&with(RmapOp::AddNew, 100, 16, shared_hint::EXCLUSIVE));
        assert_eq!(applied.shared_bit_agrees, Some(true));
        table.fork(100, 101, THP, 2 * THP, true);
        table.fork(100, 102, THP, 2 * THP, true);
        // Read at entry: set since the first fork.
        let applied = table.apply(&with(RmapOp::Remove, 100, 48, shared_hint::MAYBE_SHARED));
        assert_eq!(applied.shared_bit_agrees, Some(true));
        let applied = table.apply(&with(RmapOp::Remove, 101, 32, shared_hint::EXCLUSIVE));
        assert_eq!(applied.shared_bit_agrees, Some(false), "a kernel saying otherwise is caught");
        let state = table.folio(7);
        let facts = Facts::of(state);
        assert!(!facts.truly_shared);
        let slots = table.mm_id_slots(state);
        assert_eq!(slots.map(|s| s.shared_bit()), Some(true));
        assert_eq!(verdict(Heuristic::MmIdSlots, &facts, slots), Verdict::Shared, "the false positive");
        assert_eq!(verdict(Heuristic::LikelyMappedShared, &facts, slots), Verdict::Exclusive);
    }

    /// Folios come and go at one address, reusing one slot: fork reads one
    /// entry for the live folio, not one per folio that ever lived there.
    #[test]
    fn reused_slots_are_listed_once() {
        let mut table = FolioTable::new(16);
        for folio in 1..=1000 {
            table.apply(&call(folio, 100, THP, RmapOp::AddNew, Level::Pte, 1, Some(1)));
            table.apply(&call(folio, 100, THP, RmapOp::Remove, Level::Pte, 1, Some(1)));
        }
        table.apply(&call(5000, 100, THP, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        table.apply(&call(5001, 100, THP + PAGE, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        let listed = |table: &mut FolioTable| {
            table.file_unfiled();
            table.by_mm[&100][&1].len()
        };
        assert_eq!(listed(&mut table), 2);
        assert_eq!(table.fork(100, 101, THP, 2 * THP, true), 2);
        assert_eq!(listed(&mut table), 2);
        assert_eq!(table.folio(5001).sharers(), 2);
    }

    #[test]
    fn a_range_without_mappings_copies_nothing() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        assert_eq!(table.fork(100, 101, 4 * THP, 5 * THP, true), 0);
        assert_eq!(table.folio(1).sharers(), 1);
    }

    /// mremap moves the entries without an rmap call: a fork of the new
    /// range finds them there, and one of the old range does not.
    #[test]
    fn moved_mappings_fork_from_their_new_address() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        assert_eq!(table.move_range(100, THP, 8 * THP, THP), 1);
        assert_eq!(table.fork(100, 101, THP, 2 * THP, true), 0);
        assert_eq!(table.fork(100, 101, 8 * THP, 9 * THP, true), 1);
        assert_eq!(table.folio(1).sharers(), 2);
        // The unmap comes from the new address.
        let applied = table.apply(&call(1, 100, 8 * THP, RmapOp::Remove, Level::Pmd, 512, Some(2)));
        assert_eq!(applied.disagreement, None);
        assert_eq!(table.folio(1).sharers(), 1);
    }

    /// mprotect splits a VMA in two and merges it back: addresses do not
    /// change, so a fork of the merged VMA copies every folio in it.
    #[test]
    fn split_and_merged_vmas_fork_whole() {
        let mut table = FolioTable::new(64);
        for page in 0..32 {
            table.apply(&call(10 + page, 100, THP + page * PAGE, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        }
        assert_eq!(table.fork(100, 101, THP, THP + 32 * PAGE, true), 32);
    }

    /// Fork into a non-anonymous VMA leaves PMDs to be refaulted
    /// (`copy_huge_pmd`): a file THP gains no sharer; its PTEs would.
    #[test]
    fn file_pmds_are_not_copied_at_fork() {
        let mut table = FolioTable::new(16);
        let mut file = call(1, 100, THP, RmapOp::Add, Level::Pmd, 512, Some(0));
        file.kind = FolioKind::File;
        table.apply(&file);
        assert_eq!(table.fork(100, 101, THP, 2 * THP, false), 0);
        assert_eq!(table.folio(1).sharers(), 1);
    }

    /// A child whose mappings the daemon copied at fork but the kernel did
    /// not (a pinned page, copied into a new folio) exits: its mappings are
    /// phantoms, counted and dropped; the parent's stay.
    /// A vfork child runs in its parent's address space, then exits: the
    /// space keeps its first owner until it is torn down.
    #[test]
    fn an_address_space_keeps_its_first_owner() {
        let mut table = FolioTable::new(16);
        table.note_owner(100, 10);
        table.note_owner(100, 11);
        assert_eq!(table.tgid_of(100), Some(10));
        table.teardown(100);
        table.note_owner(100, 12);
        assert_eq!(table.tgid_of(100), Some(12));
    }

    #[test]
    fn teardown_drops_what_is_left() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        table.apply(&call(2, 101, 2 * THP, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        table.fork(100, 101, THP, 2 * THP, true);
        let torn = table.teardown(101);
        assert_eq!(torn.phantoms, vec![(FolioKind::Anon, 2)]);
        assert_eq!(torn.retired.len(), 1, "folio 2 had no other mapping");
        assert_eq!(table.folio(1).sharers(), 1);
        assert_eq!(table.len(), 1);
        assert_eq!(table.teardown(101), TornDown::default());
    }

    /// Fork met a pinned page: the child gets a copy, mapped by the parent
    /// task into the child's address space where the table had put the
    /// original. The original keeps only the parent.
    #[test]
    fn pinned_pages_are_copied_at_fork() {
        let mut table = FolioTable::new(16);
        let mut small = call(1, 100, THP, RmapOp::AddNew, Level::Pte, 1, Some(1));
        small.order = 0;
        table.apply(&small);
        table.fork(100, 101, THP, 2 * THP, true);
        assert_eq!(table.folio(1).sharers(), 2);
        let mut copy = call(2, 101, THP, RmapOp::AddNew, Level::Pte, 1, Some(1));
        (copy.order, copy.own_mm) = (0, false);
        let applied = table.apply(&copy);
        assert_eq!(applied.phantoms, 1);
        assert_eq!((table.folio(1).sharers(), table.folio(2).sharers()), (1, 1));
    }

    /// A pinned THP at fork: split, and each of its pages copied for the
    /// child. The child's copy of the THP goes page by page.
    #[test]
    fn pinned_thps_are_copied_page_by_page_at_fork() {
        let mut table = FolioTable::new(1024);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        table.fork(100, 101, THP, 2 * THP, true);
        for page in 0..512 {
            let mut copy = call(10 + page, 101, THP + page * PAGE, RmapOp::AddNew, Level::Pte, 1, Some(1));
            (copy.order, copy.own_mm) = (0, false);
            assert_eq!(table.apply(&copy).phantoms, 1, "page {page}");
        }
        assert_eq!(table.folio(1).sharers(), 1);
        assert_eq!(table.folio(1).mapcount(), 1);
        // Once the child runs, its own faults are not fork copies.
        let mut own = call(2000, 101, 4 * THP, RmapOp::AddNew, Level::Pte, 1, Some(1));
        own.order = 0;
        table.apply(&own);
        let mut later = call(2001, 101, THP, RmapOp::AddNew, Level::Pte, 1, Some(1));
        (later.order, later.own_mm) = (0, false);
        assert_eq!(table.apply(&later).phantoms, 0);
    }

    /// 6.1: a THP's PMD split inline by madvise(MADV_DONTFORK) on all but
    /// its first page: the fork of the one-page VMA copies one PTE, not
    /// the PMD the table still holds.
    #[test]
    fn inline_split_at_a_vma_edge_forks_one_page() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pmd, 512, None));
        assert_eq!(table.fork(100, 101, THP, THP + PAGE, true), 1);
        assert_eq!(table.folio(1).mapcount(), 513);
        let applied = table.apply(&call(1, 101, THP, RmapOp::Remove, Level::Pte, 1, None));
        assert!(!applied.pmd_split_inferred, "the child's one PTE, not a PMD");
        assert_eq!(table.folio(1).mapcount(), 512);
        assert_eq!(table.teardown(101), TornDown::default());
    }

    /// mremap of the second half of a PTE-mapped THP: that half is filed
    /// at its new place, and a fork of the destination VMA copies it.
    #[test]
    fn half_a_thp_moves_and_forks() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pte, 512, Some(1)));
        let dest = 8 * THP;
        assert_eq!(table.move_range(100, THP + THP / 2, dest, THP / 2), 1);
        assert_eq!(table.folio(1).mapcount(), 512);
        assert_eq!(table.fork(100, 101, dest, dest + THP / 2, true), 1);
        assert_eq!(table.fork(100, 101, THP, THP + THP / 2, true), 1);
        assert_eq!(table.folio(1).mapcount(), 1024);
        // The child unmaps the moved half from its new place.
        let applied = table.apply(&call(1, 101, dest - THP / 2, RmapOp::Remove, Level::Pte, 256, Some(1024)));
        assert_eq!(applied.disagreement, None);
        assert_eq!(table.folio(1).mapcount(), 768);
    }

    /// cow.c's THP_RUN_PARTIAL_MREMAP with a 512 KiB mTHP: the half moved
    /// below the mmap is filed in another 2 MiB region than the half left
    /// in place, and the fork of the VMA over the latter reads both
    /// regions. It meets the folio once: the child maps each half once.
    #[test]
    fn a_folio_filed_in_two_regions_forks_once() {
        const SIZE: u64 = 128 * PAGE;
        let mut table = FolioTable::new(16);
        // mmap(2 * SIZE) at `mem - SIZE`; the mTHP at `mem`, 2 MiB-aligned.
        let mem = 2 * THP;
        let mut fault = call(1, 100, mem, RmapOp::AddNew, Level::Pte, 128, Some(1));
        fault.order = 7;
        table.apply(&fault);
        // mremap of its second half to a new mmap just below.
        let dest = mem - SIZE - SIZE / 2;
        assert_eq!(table.move_range(100, mem + SIZE / 2, dest, SIZE / 2), 1);
        // The test function forks: dup_mmap copies the VMAs in address
        // order (the moved half, the rest of the mmap, the half in place).
        assert_eq!(table.fork(100, 101, dest, dest + SIZE / 2, true), 1);
        assert_eq!(table.fork(100, 101, dest + SIZE / 2, mem, true), 0);
        assert_eq!(table.fork(100, 101, mem, mem + SIZE / 2, true), 1);
        assert_eq!(table.folio(1).mapcount(), 256);
        // The parent writes its half (a copy per page), the child exits.
        let mut cow = call(1, 100, mem, RmapOp::Remove, Level::Pte, 1, Some(256));
        cow.order = 7;
        assert_eq!(table.apply(&cow).disagreement, None);
        for (base, kernel) in [(mem, 255), (dest - SIZE / 2, 191)] {
            let mut unmap = call(1, 101, base, RmapOp::Remove, Level::Pte, 64, Some(kernel));
            unmap.order = 7;
            assert_eq!(table.apply(&unmap).disagreement, None);
        }
        assert_eq!(table.teardown(101), TornDown::default());
        assert_eq!(table.folio(1).mapcount(), 127);
    }

    /// The same folio, then mremap of the first quarter of the half left
    /// in place: the move reads both regions, and moves those pages once.
    #[test]
    fn a_folio_filed_in_two_regions_moves_once() {
        const SIZE: u64 = 128 * PAGE;
        let mut table = FolioTable::new(16);
        let mem = 2 * THP;
        let mut fault = call(1, 100, mem, RmapOp::AddNew, Level::Pte, 128, Some(1));
        fault.order = 7;
        table.apply(&fault);
        let dest = mem - SIZE - SIZE / 2;
        assert_eq!(table.move_range(100, mem + SIZE / 2, dest, SIZE / 2), 1);
        let far = 16 * THP;
        assert_eq!(table.move_range(100, mem, far, SIZE / 4), 1);
        let ptes_at = |table: &FolioTable, base: u64| {
            table.folio(1).mappings.iter().find(|m| m.base == base).map_or(0, |m| m.ptes)
        };
        let filed = (ptes_at(&table, far), ptes_at(&table, mem), ptes_at(&table, dest - SIZE / 2));
        assert_eq!(filed, (32, 32, 64), "a quarter moved, a quarter in place, the half below");
        // A fork finds each quarter and the moved half where it is.
        assert_eq!(table.fork(100, 101, dest, dest + SIZE / 2, true), 1);
        assert_eq!(table.fork(100, 101, mem + SIZE / 4, mem + SIZE / 2, true), 1);
        assert_eq!(table.fork(100, 101, far, far + SIZE / 4, true), 1);
        assert_eq!(table.folio(1).mapcount(), 256);
    }

    /// madvise(MADV_DONTFORK) on all but the first page of a PTE-mapped
    /// THP: fork copies the one page in the copied VMA, as the kernel does.
    #[test]
    fn fork_copies_only_the_pages_inside_the_vma() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pte, 512, Some(1)));
        assert_eq!(table.fork(100, 101, THP, THP + PAGE, true), 1);
        assert_eq!(table.folio(1).mapcount(), 513);
        // A VMA over the second half, copied as well, adds to the child's entry.
        assert_eq!(table.fork(100, 101, THP + THP / 2, 2 * THP, true), 0);
        assert_eq!(table.folio(1).mapcount(), 513 + 256);
        assert_eq!(table.folio(1).sharers(), 2);
    }

    /// uffd-unit-tests on 6.1, which does not align anonymous mmaps on
    /// 2 MiB: area_dst and area_src, mapped back to back, meet inside a
    /// THP. MADV_DONTNEED of area_dst zaps its 195 pages below the edge
    /// (the PMD split inline), registering area_dst splits the VMA at the
    /// edge, and fork copies both VMAs: the child maps the parent's 317
    /// pages once, and its exit leaves nothing behind.
    #[test]
    fn a_thp_across_two_copied_vmas_forks_once() {
        let mut table = FolioTable::new(16);
        let base = 32 * THP;
        let edge = base + 195 * PAGE;
        table.apply(&call(1, 100, base, RmapOp::AddNew, Level::Pmd, 512, None));
        for _ in 0..195 {
            table.apply(&call(1, 100, base, RmapOp::Remove, Level::Pte, 1, None));
        }
        assert_eq!(table.folio(1).mapcount(), 317);
        assert_eq!(table.fork(100, 101, edge - 16 * THP, edge, true), 1);
        assert_eq!(table.fork(100, 101, edge, edge + 16 * THP, true), 0);
        assert_eq!(table.folio(1).mapcount(), 2 * 317);
        for _ in 0..317 {
            table.apply(&call(1, 101, base, RmapOp::Remove, Level::Pte, 1, None));
        }
        assert_eq!(table.teardown(101), TornDown::default());
        assert_eq!((table.folio(1).sharers(), table.folio(1).mapcount()), (1, 317));
    }

    /// The daemon holds more than the kernel, event after event: the
    /// excess goes, from the other address spaces first.
    #[test]
    fn overcounts_are_dropped() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        table.fork(100, 101, THP, 2 * THP, true); // the kernel did not copy it
        table.apply(&call(1, 100, THP, RmapOp::Add, Level::Pte, 1, Some(1)));
        table.apply(&call(1, 100, THP, RmapOp::Add, Level::Pte, 1, Some(2)));
        let applied = table.apply(&call(1, 100, THP, RmapOp::Remove, Level::Pte, 1, Some(3)));
        assert_eq!(applied.disagreement, Some((4, 3)));
        assert_eq!(applied.phantoms, 1);
        assert_eq!((table.folio(1).sharers(), table.folio(1).mapcount()), (1, 2));
    }

    /// 6.1-6.7 split a PMD inline: the first PTE remove turns the PMD into
    /// 512 PTEs, and half an unmap leaves the folio partially mapped.
    #[test]
    fn inline_pmd_split_is_inferred() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pmd, 512, None));
        let first = table.apply(&call(1, 100, THP, RmapOp::Remove, Level::Pte, 1, None));
        assert!(first.pmd_split_inferred);
        for _ in 1..256 {
            let applied = table.apply(&call(1, 100, THP, RmapOp::Remove, Level::Pte, 1, None));
            assert!(!applied.pmd_split_inferred);
        }
        assert_eq!(table.folio(1).mapcount(), 256);
        assert!(table.folio(1).partially_mapped());
    }

    /// Unmapping half of a PTE-mapped THP leaves it partially mapped.
    #[test]
    fn partial_unmap_is_detected() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        // Split the PMD into 512 PTEs, then unmap the second half.
        table.apply(&call(1, 100, THP, RmapOp::Add, Level::Pte, 512, Some(1)));
        table.apply(&call(1, 100, THP, RmapOp::Remove, Level::Pmd, 512, Some(513)));
        assert!(!table.folio(1).partially_mapped(), "all 512 pages still mapped");
        let applied = table.apply(&call(1, 100, THP, RmapOp::Remove, Level::Pte, 256, Some(512)));
        assert_eq!(applied.disagreement, None);
        assert!(table.folio(1).partially_mapped());
        assert_eq!(table.folio(1).mapcount(), 256);
    }

    /// Mapped before the daemon started: the kernel's count seeds it.
    #[test]
    fn unknown_mappings_come_from_the_kernel() {
        let mut table = FolioTable::new(16);
        let applied = table.apply(&call(7, 100, 1000, RmapOp::Add, Level::Pte, 1, Some(2)));
        assert_eq!(applied.disagreement, None);
        assert_eq!(table.folio(7).mapcount(), 3);
        // The two unknown mappings go; then ours.
        table.apply(&call(7, 200, 2000, RmapOp::Remove, Level::Pte, 1, Some(3)));
        table.apply(&call(7, 300, 3000, RmapOp::Remove, Level::Pte, 1, Some(2)));
        let applied = table.apply(&call(7, 100, 1000, RmapOp::Remove, Level::Pte, 1, Some(1)));
        let retired = applied.retired.expect("last mapping gone");
        assert_eq!(retired.peak_mapcount, 3);
        assert!(table.is_empty());
    }

    /// An inline path the daemon missed shows up as a disagreement that
    /// persists to the next event; then the kernel's count is adopted.
    #[test]
    fn disagreement_is_counted_and_adopted() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, 1000, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        let applied = table.apply(&call(1, 100, 1000, RmapOp::Add, Level::Pte, 1, Some(2)));
        assert_eq!(applied.disagreement, None, "one difference may be a race");
        let applied = table.apply(&call(1, 100, 1000, RmapOp::Add, Level::Pte, 1, Some(3)));
        assert_eq!(applied.disagreement, None, "two may be too");
        let applied = table.apply(&call(1, 100, 1000, RmapOp::Add, Level::Pte, 1, Some(4)));
        assert_eq!(applied.disagreement, Some((3, 4)));
        let applied = table.apply(&call(1, 100, 1000, RmapOp::Remove, Level::Pte, 1, Some(5)));
        assert_eq!(applied.disagreement, None);
    }

    /// Children splitting a shared THP at once: one CPU's batched call
    /// has read the kernel's count and not yet added its 512 pages while
    /// three events of other CPUs pass. Within a millisecond that is a
    /// race, not a disagreement; a difference that lasts is one.
    #[test]
    fn a_difference_must_last_to_be_a_disagreement() {
        let mut table = FolioTable::new(16);
        let at = |call: RmapCall, ms: u64| RmapCall { timestamp_ns: ms * 1_000_000, ..call };
        table.apply(&at(call(1, 100, THP, RmapOp::AddNew, Level::Pmd, 512, Some(1)), 0));
        table.fork(100, 200, THP, 2 * THP, true);
        // 200 splits its PMD: 512 PTEs added (the kernel's count lags by
        // 512 until that call has walked its pages)...
        let split = table.apply(&at(call(1, 200, THP, RmapOp::Add, Level::Pte, 512, Some(2)), 10));
        assert_eq!(split.disagreement, None);
        // ...while another address space maps and unmaps a page of it three
        // times, reading the lagging count at each event.
        for ms in [11, 12, 13] {
            let lagging = table.apply(&at(call(1, 300, THP, RmapOp::Add, Level::Pte, 1, Some(2)), ms));
            assert_eq!(lagging.disagreement, None, "a race at {ms} ms");
            let lagging = table.apply(&at(call(1, 300, THP, RmapOp::Remove, Level::Pte, 1, Some(3)), ms));
            assert_eq!(lagging.disagreement, None, "a race at {ms} ms");
        }
        assert_eq!(table.folio(1).mapcount(), 514);
        // The call has landed: the counts agree again, nothing was adopted.
        let agreed = table.apply(&at(call(1, 100, THP, RmapOp::Add, Level::Pte, 1, Some(514)), 14));
        assert_eq!(agreed.disagreement, None);
        assert_eq!(table.folio(1).mapcount(), 515);
    }

    /// Two CPUs unmapping one folio: the events arrive in the opposite
    /// order to the counter reads. No disagreement.
    #[test]
    fn reordered_events_cancel_out() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, THP, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        table.fork(100, 200, THP, 2 * THP, true);
        table.fork(100, 300, THP, 2 * THP, true);
        // True order: 300 unmaps (3 -> 2), then 200 (2 -> 1); delivered 200 first.
        let first = table.apply(&call(1, 200, THP, RmapOp::Remove, Level::Pmd, 512, Some(2)));
        let second = table.apply(&call(1, 300, THP, RmapOp::Remove, Level::Pmd, 512, Some(3)));
        assert_eq!((first.disagreement, second.disagreement), (None, None));
        assert_eq!(table.folio(1).mapcount(), 1);
        let last = table.apply(&call(1, 100, THP, RmapOp::Remove, Level::Pmd, 512, Some(1)));
        assert_eq!(last.disagreement, None);
        assert!(last.retired.is_some());
    }

    /// docs/metrics.md quotes these sizes.
    #[test]
    fn entry_sizes_are_as_documented() {
        assert_eq!(size_of::<Option<FolioState>>(), 64);
        assert_eq!(size_of::<Mapping>(), 24);
    }

    #[test]
    fn full_table_evicts() {
        let mut table = FolioTable::new(2);
        table.apply(&call(1, 100, 1000, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        table.apply(&call(2, 100, 1000, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        let applied = table.apply(&call(3, 100, 1000, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        assert!(applied.evicted);
        assert_eq!(table.len(), 2);
    }

    /// Small folios mapped once and then forked: the shape of the sampling
    /// tests. `kernel` is the kernel's count before the call.
    /// A sampled table files its entries in regions 2^shift times wider:
    /// fork and mremap of part of a region still touch only the folios
    /// mapped inside their range, and one sample shift later as well.
    #[test]
    fn sampled_regions_keep_ranges_exact() {
        let mut table = FolioTable::new(1 << 20);
        table.sample_from_now(4);
        let heap = 0x7f00_0000_0000u64;
        let at = |page: u64| call(0, 7, heap + page * PAGE, RmapOp::AddNew, Level::Pte, 1, Some(0));
        // Small folios one page apart over 8 MiB, and the sampled ones.
        let folio_of = |page: u64| (1 << 30) + page * 64;
        let mut kept = Vec::new();
        for page in 0..2048 {
            let applied = table.apply(&RmapCall { folio: folio_of(page), order: 0, ..at(page) });
            if !applied.sampled_out {
                kept.push(page);
            }
        }
        assert!(kept.len() > 64 && kept.len() < 2048 / 8, "{} of 2048 sampled at 1/16", kept.len());
        // The child copies the VMA [1 MiB + 3 pages, 5 MiB): inside one wide region.
        let (start, end) = (256 + 3, 1280);
        let inside = kept.iter().filter(|&&p| (start..end).contains(&p)).count();
        assert_eq!(table.fork(7, 8, heap + start * PAGE, heap + end * PAGE, true), inside);
        for &page in &kept {
            let sharers = if (start..end).contains(&page) { 2 } else { 1 };
            assert_eq!(table.folio(folio_of(page)).sharers(), sharers, "page {page}");
        }
        // Sparser: the index is refiled; mremap of [0, 64 pages) to 1 GiB up.
        table.sample_from_now(5);
        let kept: Vec<u64> = kept.into_iter().filter(|&p| sampling::sampled(folio_of(p), 0, 5)).collect();
        let moved = kept.iter().filter(|&&p| p < 64).count();
        assert_eq!(table.move_range(7, heap, heap + (1 << 30), 64 * PAGE), moved);
        for &page in &kept {
            let base = if page < 64 { heap + (1 << 30) + page * PAGE } else { heap + page * PAGE };
            assert!(
                table.folio(folio_of(page)).mappings.iter().any(|m| m.mm == 7 && m.base == base),
                "page {page}"
            );
        }
        // The child's exit leaves the parent's mappings alone.
        table.teardown(8);
        for &page in &kept {
            assert_eq!(table.folio(folio_of(page)).sharers(), 1);
        }
        assert_eq!(table.len(), kept.len());
    }

    fn small(folio: u64, mm: u64, op: RmapOp, kernel: u64) -> RmapCall {
        RmapCall {
            order: 0,
            ..call(folio, mm, 0x7f00_0000_0000 + folio * 64, op, Level::Pte, 1, Some(kernel))
        }
    }

    /// Over its budget the table keeps a nested sample of small folios and
    /// every large one; the small folios it dropped, and those outside the
    /// sample, change nothing from then on, and what it keeps stays exact.
    #[test]
    fn a_full_budget_samples_small_folios() {
        let mut table = FolioTable::new(1 << 20);
        table.set_memory_budget(256 << 10);
        let large = |i: u64| (1 << 40) | (i * 512 * 64);
        for i in 0..300 {
            table.apply(&call(large(i), 7, i * THP, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        }
        let mut dropped = 0;
        for folio in 1..=20_000u64 {
            let applied = table.apply(&small(folio * 64, 7, RmapOp::AddNew, 1));
            dropped += applied.sample_tightened.unwrap_or(0);
        }
        let shift = table.sample_shift();
        assert!(shift >= 2, "20,000 small folios in 256 KiB: shift {shift}");
        // The large folios are never sampled: they alone may take more.
        assert!(table.heap_bytes() < 2 * (256 << 10), "{} bytes", table.heap_bytes());
        assert!(dropped > 0);
        let sampled: Vec<u64> =
            (1..=20_000u64).map(|f| f * 64).filter(|&f| sampling::sampled(f, 0, shift)).collect();
        assert_eq!(table.len(), 300 + sampled.len(), "every large folio and exactly the sampled small ones");
        for i in 0..300 {
            assert_eq!(table.folio(large(i)).mapcount(), 1);
        }
        // A fork: the sampled folios gain a sharer; their kernel counts agree.
        for &folio in &sampled {
            let applied = table.apply(&small(folio, 8, RmapOp::Add, 1));
            assert_eq!(applied.disagreement, None);
            assert_eq!(table.folio(folio).sharers(), 2);
        }
        // Folios outside the sample: nothing happens, whatever their events say.
        let outside = (1..=20_000u64).map(|f| f * 64).find(|&f| !sampling::sampled(f, 0, shift)).unwrap();
        assert!(table.apply(&small(outside, 8, RmapOp::Add, 1)).sampled_out);
        assert!(table.apply(&small(outside, 8, RmapOp::Remove, 2)).sampled_out);
        // Everything unmapped: the table empties, no disagreement, no phantom.
        for &folio in &sampled {
            for (mm, kernel) in [(7, 2), (8, 1)] {
                let applied = table.apply(&small(folio, mm, RmapOp::Remove, kernel));
                assert_eq!((applied.disagreement, applied.phantoms), (None, 0));
            }
        }
        for i in 0..300 {
            table.apply(&call(large(i), 7, i * THP, RmapOp::Remove, Level::Pmd, 512, Some(1)));
        }
        assert!(table.is_empty());
    }

    /// Under steady eviction pressure the oldest entries go, one each time.
    #[test]
    fn eviction_goes_round_the_slab() {
        let mut table = FolioTable::new(3);
        for folio in 1..=3 {
            table.apply(&call(folio, 100, 1000, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        }
        for folio in 4..=100_000 {
            let applied = table.apply(&call(folio, 100, 1000, RmapOp::AddNew, Level::Pte, 1, Some(1)));
            assert!(applied.evicted);
            assert!(table.find(folio - 3).is_none(), "folio {} should have gone", folio - 3);
            assert!(table.find(folio - 2).is_some());
        }
        assert_eq!(table.len(), 3);
    }
}
