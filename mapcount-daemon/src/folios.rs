//! The folio table: what the daemon knows about each live folio.
//!
//! Mappings are counted the way the kernel counts them since 6.10 (one per
//! PTE, one per PMD or PUD), per address space, so that "mapped by somebody
//! else" has an exact answer. The kernel's own counters arrive with every
//! event; the table checks itself against them.

use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use mapcount_common::{FolioKind, Level, RmapOp};
use rustc_hash::{FxBuildHasher, FxHashMap as HashMap};
use smallvec::SmallVec;

/// Consecutive events of a folio whose counts must differ from the
/// kernel's before that is a disagreement (see `FolioTable::apply`).
const CONFIRM_AFTER: u8 = 3;

/// Address spaces tracked per folio; beyond this a folio's further
/// mappings are counted in `unknown` (bounded memory per folio, and
/// sharers fit in a byte).
pub const MAX_MAPPINGS_PER_FOLIO: usize = 64;

/// The mappings one address space (through one VMA) holds on a folio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub mm: u64,
    pub vma: u64,
    pub ptes: u32,
    pub pmds: u16,
    pub puds: u16,
}

impl Mapping {
    fn total(&self) -> u64 {
        u64::from(self.ptes) + u64::from(self.pmds) + u64::from(self.puds)
    }
}

/// Most folios are mapped through one VMA: that mapping is stored inline,
/// and only shared folios allocate.
pub type Mappings = SmallVec<[Mapping; 1]>;

/// One live folio. Kept at 72 bytes: with a million live folios the table
/// is most of the daemon's memory (docs/metrics.md).
#[derive(Clone, Debug)]
pub struct FolioState {
    /// The folio's address, the table's key; never shown.
    folio: u64,
    /// Daemon-assigned identity, safe to show (unlike the folio's address).
    pub serial: u64,
    pub mappings: Mappings,
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
    /// The kernel's maybe-shared bit at the last event (a `shared_hint` value).
    pub shared_hint: u8,
    pub ever_partially_mapped: bool,
    /// Consecutive events at which the kernel's count differed (see `apply`).
    differing_events: u8,
}

/// Counts kept narrower than the kernel's: saturate instead of wrapping.
fn narrow<T: TryFrom<u64> + Copy>(value: u64, max: T) -> T {
    T::try_from(value).unwrap_or(max)
}

impl FolioState {
    fn new(folio: u64, serial: u64, kind: FolioKind, order: u8) -> Self {
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
            shared_hint: 0,
            ever_partially_mapped: false,
            differing_events: 0,
        }
    }

    /// Mappings as the kernel counts them (`folio_mapcount`).
    pub fn mapcount(&self) -> u64 {
        self.mappings.iter().map(Mapping::total).sum::<u64>() + u64::from(self.unknown)
    }

    /// Distinct address spaces mapping the folio (those the daemon knows).
    pub fn sharers(&self) -> u32 {
        // Called per event: no allocation. Mappings are few; count each mm
        // at its first live mapping.
        if let [only] = self.mappings.as_slice() {
            return u32::from(only.total() > 0); // most folios
        }
        let live = |m: &&Mapping| m.total() > 0;
        let mut count = 0;
        for (i, m) in self.mappings.iter().enumerate().filter(|(_, m)| live(m)) {
            if !self.mappings[..i].iter().filter(live).any(|earlier| earlier.mm == m.mm) {
                count += 1;
            }
        }
        count
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
        // The address space that maps most of it, without allocating.
        let most = self
            .mappings
            .iter()
            .map(|m| self.mappings.iter().filter(|o| o.mm == m.mm).map(|o| u64::from(o.ptes)).sum::<u64>())
            .max()
            .unwrap_or(0);
        most > 0 && most < self.pages()
    }

    /// VMAs mapping the folio: refcount grows per mapping, so per VMA.
    pub fn vmas(&self) -> usize {
        self.mappings.iter().filter(|m| m.total() > 0).count()
    }

    fn maps_through(&self, vma: u64) -> bool {
        self.mappings.iter().any(|m| m.vma == vma && m.total() > 0)
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
    /// The last mapping went: the folio left the table with these facts.
    pub retired: Option<Retired>,
    /// A new folio pushed another out of the full table.
    pub evicted: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Retired {
    pub kind: FolioKind,
    pub order: u8,
    pub peak_sharers: u32,
    pub peak_mapcount: u64,
    pub ever_partially_mapped: bool,
}

/// One rmap call, as the table needs it.
pub struct RmapCall {
    pub folio: u64,
    pub mm: u64,
    pub vma: u64,
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
}

/// Index of a folio's entry in `FolioTable::slots`.
type Slot = u32;

/// The live folios. Entries sit in a slab (`slots`) and a hash table of
/// slot numbers finds them by address: 4 bytes per hash bucket instead of
/// key and entry, which the table's load factor would multiply.
pub struct FolioTable {
    /// Slot numbers, hashed by the folio address stored in the slot.
    by_folio: HashTable<Slot>,
    slots: Vec<Option<FolioState>>,
    /// Empty slots, reused before the slab grows.
    free: Vec<Slot>,
    /// VMA → slots of folios mapped through it, for carrying mappings
    /// across fork. Entries go stale (the folio left, the VMA was split):
    /// a VMA's list is pruned when fork reads it, and the whole index is
    /// rebuilt when it grows to four times the table.
    by_vma: HashMap<u64, Vec<Slot>>,
    by_vma_len: usize,
    capacity: usize,
    next_serial: u64,
    /// Address space → the tgid seen using it, for the debug view.
    mm_tgid: HashMap<u64, u32>,
}

fn hash(folio: u64) -> u64 {
    FxBuildHasher.hash_one(folio)
}

impl FolioTable {
    pub fn new(capacity: usize) -> Self {
        Self {
            by_folio: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_vma: HashMap::default(),
            by_vma_len: 0,
            // Slot numbers are 32 bits.
            capacity: capacity.clamp(1, Slot::MAX as usize),
            next_serial: 1,
            mm_tgid: HashMap::default(),
        }
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

    fn find(&self, folio: u64) -> Option<Slot> {
        let slots = &self.slots;
        self.by_folio
            .find(hash(folio), |&slot| slots[slot as usize].as_ref().is_some_and(|s| s.folio == folio))
            .copied()
    }

    fn state(&mut self, slot: Slot) -> &mut FolioState {
        self.slots[slot as usize].as_mut().expect("indexed slots hold a folio")
    }

    pub fn get_mut(&mut self, folio: u64) -> Option<&mut FolioState> {
        self.find(folio).map(|slot| self.state(slot))
    }

    pub fn note_owner(&mut self, mm: u64, tgid: u32) {
        if mm != 0 {
            self.mm_tgid.insert(mm, tgid);
        }
    }

    /// Folios mapped by the address space(s) a tgid was seen using.
    pub fn mapped_by_tgid(&self, tgid: u32) -> Vec<&FolioState> {
        let mms: Vec<u64> = self.mm_tgid.iter().filter(|(_, t)| **t == tgid).map(|(mm, _)| *mm).collect();
        let mut found: Vec<&FolioState> =
            self.iter().filter(|f| f.mappings.iter().any(|m| m.total() > 0 && mms.contains(&m.mm))).collect();
        found.sort_by_key(|f| f.serial);
        found
    }

    /// Adds a folio the table does not hold; returns its slot and whether
    /// another folio was evicted to make room.
    fn insert(&mut self, state: FolioState) -> (Slot, bool) {
        let mut evicted = false;
        if self.by_folio.len() >= self.capacity {
            // Any entry will do: the table is a cache of live folios, and
            // the count of evictions tells how much it missed.
            if let Some(&victim) = self.by_folio.iter().next() {
                self.remove(victim);
                evicted = true;
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

    fn remove(&mut self, slot: Slot) -> FolioState {
        let state = self.slots[slot as usize].take().expect("indexed slots hold a folio");
        if let Ok(entry) = self.by_folio.find_entry(hash(state.folio), |&s| s == slot) {
            entry.remove();
        }
        self.free.push(slot);
        state
    }

    fn index(&mut self, vma: u64, slot: Slot) {
        let list = self.by_vma.entry(vma).or_default();
        if list.last() == Some(&slot) {
            return; // the slot just freed and reused, in the same VMA
        }
        list.push(slot);
        self.by_vma_len += 1;
        if self.by_vma_len > 4 * self.len().max(1024) {
            self.rebuild_index();
        }
    }

    fn rebuild_index(&mut self) {
        self.by_vma.clear();
        for (slot, state) in self.slots.iter().enumerate() {
            let Some(state) = state else { continue };
            for m in state.mappings.iter().filter(|m| m.total() > 0) {
                self.by_vma.entry(m.vma).or_default().push(slot as Slot);
            }
        }
        for list in self.by_vma.values_mut() {
            list.sort_unstable();
            list.dedup();
        }
        self.by_vma_len = self.by_vma.values().map(Vec::len).sum();
    }

    pub fn apply(&mut self, call: &RmapCall) -> Applied {
        let mut applied = Applied::default();
        let found = self.find(call.folio);
        let known = found.is_some() && call.op != RmapOp::AddNew;
        let slot = if known {
            found.expect("known")
        } else {
            // A new folio, or one the daemon first sees now: whatever the
            // kernel already counts belongs to address spaces not yet seen.
            let serial = self.next_serial;
            self.next_serial += 1;
            let mut state = FolioState::new(call.folio, serial, call.kind, call.order);
            if call.op != RmapOp::AddNew {
                let unknown = call.kernel_mapcount.unwrap_or(match call.op {
                    RmapOp::Remove => mappings_of(call),
                    _ => 0,
                });
                state.unknown = narrow(unknown, u32::MAX);
            }
            match found {
                // Freshly allocated at an address the table still holds
                // (its last unmap was missed): start over in place.
                Some(slot) => {
                    *self.state(slot) = state;
                    slot
                }
                None => {
                    let (slot, evicted) = self.insert(state);
                    applied.evicted = evicted;
                    slot
                }
            }
        };
        let state = self.state(slot);
        if known && let Some(kernel) = call.kernel_mapcount {
            // The kernel reads its counter in the probe and changes it after
            // the probe returns; a task preempted in between, on another CPU,
            // lets other tasks' changes overtake it. Such differences come
            // and go within an event or two. A missed mapping stays: only a
            // difference seen at CONFIRM_AFTER consecutive events counts.
            let own = state.mapcount();
            if own == kernel {
                state.differing_events = 0;
            } else {
                state.differing_events += 1;
                if state.differing_events >= CONFIRM_AFTER {
                    applied.disagreement = Some((own, kernel));
                    state.differing_events = 0;
                    // Adopt the kernel's count for mappings the daemon cannot place.
                    let placed = own - u64::from(state.unknown);
                    state.unknown = narrow(kernel.saturating_sub(placed), u32::MAX);
                }
            }
        }
        // Kind and order change (an anon folio becomes KSM, a split): the
        // latest event is right.
        state.kind = call.kind;
        state.order = call.order;
        state.peak_refcount = state.peak_refcount.max(call.refcount);
        state.shared_hint = call.shared_hint;

        let mut new_vma = false;
        match call.op {
            RmapOp::Add | RmapOp::AddNew => {
                let existing = state.mappings.iter().position(|m| m.mm == call.mm && m.vma == call.vma);
                let slot = match existing {
                    Some(i) => Some(i),
                    None if state.mappings.len() < MAX_MAPPINGS_PER_FOLIO => {
                        state.mappings.push(Mapping {
                            mm: call.mm,
                            vma: call.vma,
                            ptes: 0,
                            pmds: 0,
                            puds: 0,
                        });
                        new_vma = true;
                        Some(state.mappings.len() - 1)
                    }
                    None => None,
                };
                match slot {
                    Some(i) => add_to(&mut state.mappings[i], call, 1),
                    None => state.unknown = state.unknown.saturating_add(narrow(mappings_of(call), u32::MAX)),
                }
            }
            RmapOp::Remove => {
                // The VMA may have been split or moved since the mapping
                // was made: fall back to any mapping of the same mm.
                let existing = state
                    .mappings
                    .iter()
                    .position(|m| m.mm == call.mm && m.vma == call.vma && holds(m, call))
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
        state.note_peaks(mapcount, new_vma);
        if state.partially_mapped() {
            state.ever_partially_mapped = true;
        }
        if mapcount == 0 {
            let state = self.remove(slot);
            applied.retired = Some(Retired {
                kind: state.kind,
                order: state.order,
                peak_sharers: u32::from(state.peak_sharers),
                peak_mapcount: u64::from(state.peak_mapcount),
                ever_partially_mapped: state.ever_partially_mapped,
            });
        } else if new_vma {
            self.index(call.vma, slot);
        }
        applied
    }

    /// Fork copied `src_vma` of `src_mm` into `dst_vma` of `dst_mm`: every
    /// mapping through the source VMA now exists in the child too. Returns
    /// how many folios gained a sharer.
    pub fn fork(&mut self, src_mm: u64, src_vma: u64, dst_mm: u64, dst_vma: u64) -> usize {
        let Some(mut candidates) = self.by_vma.remove(&src_vma) else { return 0 };
        // Prune what went stale since the last read. Any mm: a VMA's address
        // may be reused by another address space, whose folios stay listed.
        // A slot freed and reused by a folio of the same VMA is listed once
        // per use: drop the repeats too.
        let listed = candidates.len();
        let slots = &self.slots;
        candidates.retain(|&slot| slots[slot as usize].as_ref().is_some_and(|s| s.maps_through(src_vma)));
        candidates.sort_unstable();
        candidates.dedup();
        self.by_vma_len -= listed - candidates.len();

        let mut copied = Vec::new();
        for &slot in &candidates {
            let state = self.state(slot);
            let Some(source) = state.mappings.iter().find(|m| m.mm == src_mm && m.vma == src_vma).copied()
            else {
                continue;
            };
            if state.mappings.iter().any(|m| m.mm == dst_mm && m.vma == dst_vma) {
                continue; // the same folio twice in the list
            }
            let child = Mapping { mm: dst_mm, vma: dst_vma, ..source };
            if state.mappings.len() < MAX_MAPPINGS_PER_FOLIO {
                state.mappings.push(child);
            } else {
                state.unknown = state.unknown.saturating_add(narrow(child.total(), u32::MAX));
            }
            state.note_peaks(state.mapcount(), true);
            copied.push(slot);
        }
        if !candidates.is_empty() {
            self.by_vma.insert(src_vma, candidates);
        }
        for &slot in &copied {
            self.index(dst_vma, slot);
        }
        copied.len()
    }
}

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

    impl FolioTable {
        fn folio(&self, folio: u64) -> &FolioState {
            self.iter().find(|s| s.folio == folio).expect("folio in the table")
        }
    }

    fn call(
        folio: u64,
        mm: u64,
        vma: u64,
        op: RmapOp,
        level: Level,
        nr: u32,
        kernel: Option<u64>,
    ) -> RmapCall {
        RmapCall {
            folio,
            mm,
            vma,
            op,
            level,
            nr_pages: nr,
            kind: FolioKind::Anon,
            order: 9,
            kernel_mapcount: kernel,
            refcount: 1,
            shared_hint: 0,
        }
    }

    /// A THP mapped by one PMD, forked three times: four sharers, and the
    /// kernel's count at the next event agrees.
    #[test]
    fn fork_carries_mappings_to_children() {
        let mut table = FolioTable::new(16);
        for folio in 1..=4 {
            table.apply(&call(folio, 100, 1000, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        }
        for child in 1..=3 {
            assert_eq!(table.fork(100, 1000, 100 + child, 1000 + child), 4);
        }
        for state in table.iter() {
            assert_eq!((state.sharers(), state.mapcount()), (4, 4));
        }
        // A child exits: the kernel said 4 before, and the daemon agrees.
        let applied = table.apply(&call(1, 102, 1002, RmapOp::Remove, Level::Pmd, 512, Some(4)));
        assert_eq!(applied.disagreement, None);
        assert_eq!(table.folio(1).sharers(), 3);
    }

    /// Folios come and go in one VMA, reusing one slot: fork reads one
    /// entry for the live folio, not one per folio that ever lived there.
    #[test]
    fn reused_slots_are_listed_once() {
        let mut table = FolioTable::new(16);
        for folio in 1..=1000 {
            table.apply(&call(folio, 100, 1000, RmapOp::AddNew, Level::Pte, 1, Some(1)));
            table.apply(&call(folio, 100, 1000, RmapOp::Remove, Level::Pte, 1, Some(1)));
        }
        table.apply(&call(5000, 100, 1000, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        table.apply(&call(5001, 100, 1000, RmapOp::AddNew, Level::Pte, 1, Some(1)));
        assert_eq!(table.by_vma[&1000].len(), 2);
        assert_eq!(table.fork(100, 1000, 101, 1001), 2);
        assert_eq!(table.by_vma[&1000].len(), 2);
        assert_eq!(table.folio(5001).sharers(), 2);
    }

    #[test]
    fn a_vma_without_mappings_copies_nothing() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, 1000, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        assert_eq!(table.fork(100, 2000, 101, 2001), 0);
        assert_eq!(table.folio(1).sharers(), 1);
    }

    /// Unmapping half of a PTE-mapped THP leaves it partially mapped.
    #[test]
    fn partial_unmap_is_detected() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, 1000, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        // Split the PMD into 512 PTEs, then unmap the second half.
        table.apply(&call(1, 100, 1000, RmapOp::Add, Level::Pte, 512, Some(1)));
        table.apply(&call(1, 100, 1000, RmapOp::Remove, Level::Pmd, 512, Some(513)));
        assert!(!table.folio(1).partially_mapped(), "all 512 pages still mapped");
        let applied = table.apply(&call(1, 100, 1001, RmapOp::Remove, Level::Pte, 256, Some(512)));
        assert_eq!(applied.disagreement, None, "the split VMA falls back to the same mm");
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

    /// Two CPUs unmapping one folio: the events arrive in the opposite
    /// order to the counter reads. No disagreement.
    #[test]
    fn reordered_events_cancel_out() {
        let mut table = FolioTable::new(16);
        table.apply(&call(1, 100, 1000, RmapOp::AddNew, Level::Pmd, 512, Some(1)));
        table.fork(100, 1000, 200, 2000);
        table.fork(100, 1000, 300, 3000);
        // True order: 300 unmaps (3 -> 2), then 200 (2 -> 1); delivered 200 first.
        let first = table.apply(&call(1, 200, 2000, RmapOp::Remove, Level::Pmd, 512, Some(2)));
        let second = table.apply(&call(1, 300, 3000, RmapOp::Remove, Level::Pmd, 512, Some(3)));
        assert_eq!((first.disagreement, second.disagreement), (None, None));
        assert_eq!(table.folio(1).mapcount(), 1);
        let last = table.apply(&call(1, 100, 1000, RmapOp::Remove, Level::Pmd, 512, Some(1)));
        assert_eq!(last.disagreement, None);
        assert!(last.retired.is_some());
    }

    /// docs/metrics.md quotes these sizes.
    #[test]
    fn entry_sizes_are_as_documented() {
        assert_eq!(size_of::<Option<FolioState>>(), 72);
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
}
