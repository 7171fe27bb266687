//! Events to metrics. Pure: no kernel, no I/O, so it is tested with
//! synthetic event streams.

use std::sync::{Arc, Mutex};

use mapcount_common::{
    Event, FIELD_ABSENT, FolioKind, FolioRow, Level, PSS_SHIFT, RmapOp, SmapsFigures, WriteFaultOutcome,
    event_flags, fork_copy, shared_hint, vma_class,
};
use prometheus::{
    IntGaugeVec,
    local::{LocalHistogram, LocalIntCounter},
};
use rustc_hash::FxHashMap as HashMap;

use crate::{
    cgroups::{self, CgroupNames},
    decode::Decoded,
    folios::{FolioState, FolioTable, Mapping, Retired, RmapCall},
    maybe_shared::{self, Heuristic, Verdict},
    metrics::Metrics,
    smaps,
};

/// Cgroups shown by name in `mapcount_cgroup_memory_bytes`; the rest are
/// summed as "other" (a bounded number of series on any host).
const CGROUPS_SHOWN: usize = 10;

/// Folio orders as label values, without allocating per event.
const ORDER_LABELS: [&str; 32] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18",
    "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31",
];

pub(crate) fn order_label(order: u8) -> &'static str {
    ORDER_LABELS.get(order as usize).copied().unwrap_or("other")
}

/// Distinct `source` label values before the rest become "other".
pub const MAX_SOURCES: usize = 32;

/// 2^31: the refcount (an `atomic_t`) overflows past it.
const REFCOUNT_LIMIT: f64 = 2147483648.0;

/// Whether the folio at which khugepaged counted one shared PTE too many
/// is mapped by another address space: `exclusive` means the kernel's
/// guess, not the sharing, refused the collapse (with `max_ptes_shared`
/// at 0, entirely; above, at least that PTE). `unnamed`: the kernel did
/// not say which folio.
fn refusal_truth(named: bool, folio: Option<&FolioState>) -> &'static str {
    match folio {
        _ if !named => "unnamed",
        Some(state) if state.sharers() >= 2 => "shared",
        Some(state) if state.complete() && state.unknown == 0 && state.sharers() == 1 => "exclusive",
        _ => "unknown",
    }
}

/// Per-event metrics, by label index, resolved once and counted locally:
/// looking labels up per event (hashing strings) and atomic increments were
/// most of the ingest cost. `flush` publishes them; it runs before every
/// scrape, so scrapes see every event received.
struct Handles {
    /// (calls, pages) by [op][level][kind][order].
    rmap: Vec<Option<(LocalIntCounter, LocalIntCounter)>>,
    /// by [outcome][kind or none][order].
    write_faults: Vec<Option<LocalIntCounter>>,
    events: [LocalIntCounter; 7],
    write_fault_duration: LocalHistogram,
    copy_reasons: Vec<(&'static str, LocalIntCounter)>,
    forks: LocalIntCounter,
    /// Small folios' events outside the table's sample: most events of a
    /// sampled host.
    sampled_out: LocalIntCounter,
    /// Fork VMAs whose page tables were copied, and those left to faults.
    fork_vmas: [LocalIntCounter; 2],
    /// Facts of folios that left the table: sharers by [kind], peak
    /// mapcount and partial lifetimes by [kind][order].
    sharers: Vec<Option<LocalHistogram>>,
    peak_mapcount: Vec<Option<LocalHistogram>>,
    partial_lifetimes: Vec<Option<LocalIntCounter>>,
    /// The kernel's maybe-shared bit against its simulation: [agree, differ]
    /// (checked at most events of large folios).
    shared_bit_checks: [Option<LocalIntCounter>; 2],
}

const OPS: usize = 4;
const LEVELS: usize = 4;
const KINDS: usize = 6;
const ORDERS: usize = 32;
const OUTCOMES: usize = 7;
const ALL_KINDS: [FolioKind; 5] =
    [FolioKind::Anon, FolioKind::Ksm, FolioKind::File, FolioKind::Shmem, FolioKind::NoMapping];

fn kind_order(kind: FolioKind, order: u8) -> usize {
    kind as usize * ORDERS + usize::from(order).min(ORDERS - 1)
}

impl Handles {
    fn new(m: &Metrics) -> Self {
        Self {
            rmap: vec![None; OPS * LEVELS * KINDS * ORDERS],
            write_faults: vec![None; OUTCOMES * KINDS * ORDERS],
            events: ["rmap", "write_fault", "fork", "source", "move", "teardown", "scan_refusal"]
                .map(|t| m.events.with_label_values(&[t]).local()),
            write_fault_duration: m.write_fault_duration.local(),
            copy_reasons: Vec::new(),
            forks: m.forks.local(),
            sampled_out: m.events_sampled_out.local(),
            fork_vmas: ["copied", "lazy"].map(|how| m.fork_vmas.with_label_values(&[how]).local()),
            sharers: vec![None; KINDS],
            peak_mapcount: vec![None; KINDS * ORDERS],
            partial_lifetimes: vec![None; KINDS * ORDERS],
            shared_bit_checks: [None, None],
        }
    }

    fn shared_bit_check(&mut self, m: &Metrics, agrees: bool) -> &LocalIntCounter {
        let (at, label) = if agrees { (0, "agree") } else { (1, "differ") };
        self.shared_bit_checks[at]
            .get_or_insert_with(|| m.shared_bit_checks.with_label_values(&[label]).local())
    }

    fn rmap(
        &mut self,
        m: &Metrics,
        op: RmapOp,
        level: Level,
        kind: FolioKind,
        order: u8,
    ) -> &(LocalIntCounter, LocalIntCounter) {
        let index =
            (((op as usize * LEVELS + level as usize) * KINDS + kind as usize) * ORDERS) + order as usize;
        self.rmap[index].get_or_insert_with(|| {
            let labels = [op.label(), level.label(), kind.label(), order_label(order)];
            (m.rmap_calls.with_label_values(&labels).local(), m.rmap_pages.with_label_values(&labels).local())
        })
    }

    fn write_fault(
        &mut self,
        m: &Metrics,
        outcome: WriteFaultOutcome,
        kind: Option<FolioKind>,
        order: u8,
    ) -> &LocalIntCounter {
        let order = if kind.is_some() { order } else { 0 };
        let index = ((outcome as usize * KINDS + kind.map_or(0, |k| k as usize)) * ORDERS) + order as usize;
        self.write_faults[index].get_or_insert_with(|| {
            m.write_faults
                .with_label_values(&[
                    outcome.label(),
                    kind.map_or("none", FolioKind::label),
                    order_label(order),
                ])
                .local()
        })
    }

    fn copy_reason(&mut self, m: &Metrics, reason: &'static str) -> &LocalIntCounter {
        let index = match self.copy_reasons.iter().position(|(r, _)| *r == reason) {
            Some(i) => i,
            None => {
                self.copy_reasons.push((reason, m.copy_reasons.with_label_values(&[reason]).local()));
                self.copy_reasons.len() - 1
            }
        };
        &self.copy_reasons[index].1
    }

    fn retired(&mut self, m: &Metrics, retired: &Retired) {
        let (kind, order) = (retired.kind.label(), order_label(retired.order));
        let at = kind_order(retired.kind, retired.order);
        self.sharers[retired.kind as usize]
            .get_or_insert_with(|| m.sharers.with_label_values(&[kind]).local())
            .observe(f64::from(retired.peak_sharers));
        self.peak_mapcount[at]
            .get_or_insert_with(|| m.peak_mapcount.with_label_values(&[kind, order]).local())
            .observe(retired.peak_mapcount as f64);
        if retired.ever_partially_mapped {
            self.partial_lifetimes[at]
                .get_or_insert_with(|| m.partial_lifetimes.with_label_values(&[kind, order]).local())
                .inc();
        }
    }

    fn flush(&self) {
        let counters = self.rmap.iter().flatten().flat_map(|(calls, pages)| [calls, pages]);
        let counters = counters
            .chain(self.write_faults.iter().flatten())
            .chain(&self.events)
            .chain(self.copy_reasons.iter().map(|(_, c)| c))
            .chain([&self.forks, &self.sampled_out])
            .chain(&self.fork_vmas)
            .chain(self.partial_lifetimes.iter().flatten())
            .chain(self.shared_bit_checks.iter().flatten());
        counters.for_each(LocalIntCounter::flush);
        let histograms = self.sharers.iter().chain(&self.peak_mapcount).flatten();
        histograms.chain([&self.write_fault_duration]).for_each(LocalHistogram::flush);
    }
}

const PAGE_BYTES: i64 = 4096;

/// How the table's small folios stand for all of them: one in `scale`.
#[derive(Clone, Copy)]
struct Sample {
    scale: i64,
}

impl Sample {
    const EXACT: Sample = Sample { scale: 1 };

    fn of(shift: u32) -> Self {
        Sample { scale: 1 << shift }
    }

    fn label(self) -> &'static str {
        if self.scale == 1 { "exact" } else { "scaled" }
    }

    /// The bound of `sampled * scale` (each folio adding at most `unit`), or
    /// none for an exact count: see `metrics::ERROR_HELP`. The count of
    /// folios in the sample is binomial, with variance n p (1 - p), n
    /// estimated from the sample as (sampled + 1) / p.
    fn error(self, sampled: i64, unit: i64) -> Option<i64> {
        if self.scale == 1 {
            return None;
        }
        let p = 1.0 / self.scale as f64;
        let sigma = ((sampled + 1) as f64 * (1.0 - p)).sqrt() / p;
        Some((3.0 * sigma * unit as f64).ceil() as i64)
    }

    /// Sets a gauge to `sampled` scaled up, and its bound.
    fn publish(self, gauge: &IntGaugeVec, error: &IntGaugeVec, labels: &[&str; 3], sampled: i64, unit: i64) {
        gauge.with_label_values(labels).set(sampled * self.scale);
        if let Some(bound) = self.error(sampled, unit) {
            error.with_label_values(&labels[..2]).set(bound);
        }
    }
}

pub struct Aggregator {
    metrics: Arc<Metrics>,
    handles: Handles,
    table: FolioTable,
    /// Highest refcount seen by [kind][order] over the daemon's life.
    refcount_max: Vec<Option<i32>>,
    sources: Vec<String>,
    /// Records received from each CPU, balanced against the kernel's counts.
    received_per_cpu: Vec<u64>,
    /// For the per-cgroup figures; filled at scrape time (hence the lock).
    cgroups: Mutex<CgroupNames>,
}

/// `folio_mapcount()` from the raw counters, where the kernel keeps one.
fn kernel_mapcount(raw: &Event) -> Option<u64> {
    if raw.mapcount == FIELD_ABSENT {
        return None;
    }
    // Stored minus one. A small folio's `_mapcount` below -1 is a page type
    // (PageType), not a count.
    u64::try_from(i64::from(raw.mapcount) + 1).ok()
}

/// More CPUs than Linux supports (CONFIG_NR_CPUS is at most 8192).
const MAX_CPUS: usize = 8192;

/// Per (kind, order): one gauge update per label set, not per folio.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct Counts {
    folios: i64,
    partial: i64,
    shared: i64,
    maybe_shared: i64,
    unmapped_pages: i64,
}

/// What the gauges need from the folio table, gathered in one walk of
/// it. The walk runs at every scrape over every folio, with the table
/// locked (events wait), so a large table is walked in parts on several
/// cores and the parts' sums are added up.
struct TableWalk<'t> {
    counts: [[Counts; ORDERS]; KINDS],
    /// The highest peak refcount, with its folio's mappings.
    worst: Option<(i32, usize)>,
    /// In the order of VMSTAT_COUNTERS; the small folios' share apart,
    /// to be scaled.
    vmstat: [i64; 5],
    vmstat_small: [i64; 2],
    /// For the maybe-shared audit.
    audited: Vec<&'t FolioState>,
    /// What smaps reports, per address space: [exact, estimate].
    per_mm: smaps::ByAddressSpace,
}

/// Where a folio's mapped pages count in /proc/vmstat: nr_anon_pages (0)
/// or nr_mapped (1), the first of [`crate::metrics::VMSTAT_COUNTERS`].
fn vmstat_counter(kind: FolioKind) -> usize {
    match kind {
        FolioKind::Anon | FolioKind::Ksm => 0,
        FolioKind::File | FolioKind::Shmem | FolioKind::NoMapping => 1,
    }
}

/// Folios each part of a parallel walk takes at least: below this, a
/// thread costs more than it saves.
const WALK_PART_MIN: usize = 1 << 17;

/// How many parts, each on a thread of its own, a scrape walks `table` in.
pub fn walk_parts(table: &FolioTable) -> usize {
    // Asked once: the standard library reads the cgroup's CPU quota to answer.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8));
    (table.slab_len() / WALK_PART_MIN).clamp(1, cores)
}

impl<'t> TableWalk<'t> {
    fn of(table: &'t FolioTable) -> Self {
        Self::in_parts(table, walk_parts(table))
    }

    fn in_parts(table: &'t FolioTable, parts: usize) -> Self {
        if parts <= 1 {
            return Self::part(table, table.iter());
        }
        std::thread::scope(|scope| {
            let walks: Vec<_> =
                table.parts(parts).map(|part| scope.spawn(move || Self::part(table, part))).collect();
            walks
                .into_iter()
                .map(|walk| walk.join().unwrap_or_else(|panicked| std::panic::resume_unwind(panicked)))
                .reduce(Self::merge)
                .unwrap_or_else(|| Self::part(table, std::iter::empty()))
        })
    }

    fn part(table: &'t FolioTable, folios: impl Iterator<Item = &'t FolioState>) -> Self {
        let mut walk = Self {
            counts: [[Counts::default(); ORDERS]; KINDS],
            worst: None,
            vmstat: [0; 5],
            vmstat_small: [0; 2],
            audited: Vec::new(),
            per_mm: smaps::ByAddressSpace::default(),
        };
        for f in folios {
            walk.add(table, f);
        }
        walk
    }

    #[inline(always)]
    fn add(&mut self, table: &FolioTable, f: &'t FolioState) {
        match f.mappings.as_slice() {
            [only] if f.order == 0 => self.add_mapped_once(f, only),
            _ => self.add_any(table, f),
        }
    }

    /// Most of any table: a small folio one address space maps once (its
    /// entry holds that mapping inline). The figures [`TableWalk::add_any`]
    /// gives it, without walking a list of mappings twice or calling out
    /// per folio: the scrape reads every entry.
    #[inline(always)]
    fn add_mapped_once(&mut self, f: &FolioState, m: &Mapping) {
        let c = &mut self.counts[f.kind as usize][0];
        c.folios += 1;
        // One address space: not shared.
        c.maybe_shared += i64::from(f.shared_hint() == shared_hint::MAYBE_SHARED);
        let total = m.total();
        let live = total > 0;
        if self.worst.is_none_or(|(refcount, _)| f.peak_refcount > refcount) {
            self.worst = Some((f.peak_refcount, usize::from(live)));
        }
        if live {
            self.per_mm.add_small_mapping(m, total + u64::from(f.unknown));
        }
        // Its one page, if mapped at all (`FolioState::pages_mapped`).
        self.vmstat_small[vmstat_counter(f.kind)] += i64::from(live);
    }

    fn add_any(&mut self, table: &FolioTable, f: &'t FolioState) {
        let counter = vmstat_counter(f.kind);
        let c = &mut self.counts[f.kind as usize][usize::from(f.order).min(ORDERS - 1)];
        c.folios += 1;
        c.shared += i64::from(f.sharers() >= 2);
        c.maybe_shared += i64::from(f.shared_hint() == shared_hint::MAYBE_SHARED);
        if self.worst.is_none_or(|(refcount, _)| f.peak_refcount > refcount) {
            self.worst = Some((f.peak_refcount, f.vmas()));
        }
        if f.order == 0 {
            // Most of any table: never partially mapped, nor by a PMD, nor audited.
            self.per_mm.add(f, None);
            self.vmstat_small[counter] += f.pages_mapped() as i64;
            return;
        }
        self.per_mm.add(f, table.mm_id_slots(f));
        if maybe_shared::applies(f.kind, f.order) && f.unknown == 0 {
            self.audited.push(f);
        }
        self.vmstat[counter] += f.pages_mapped() as i64;
        if f.pmd_mapped() {
            match f.kind {
                FolioKind::Anon => self.vmstat[2] += 1,
                FolioKind::Shmem => self.vmstat[3] += 1,
                FolioKind::File => self.vmstat[4] += 1,
                _ => {}
            }
        }
        c.partial += i64::from(f.partially_mapped());
        c.unmapped_pages += smaps::unmapped_pages(f).unwrap_or(0) as i64;
    }

    fn merge(mut self, other: Self) -> Self {
        for (mine, theirs) in self.counts.iter_mut().flatten().zip(other.counts.iter().flatten()) {
            mine.folios += theirs.folios;
            mine.partial += theirs.partial;
            mine.shared += theirs.shared;
            mine.maybe_shared += theirs.maybe_shared;
            mine.unmapped_pages += theirs.unmapped_pages;
        }
        if let Some((refcount, vmas)) = other.worst
            && self.worst.is_none_or(|(mine, _)| refcount > mine)
        {
            self.worst = Some((refcount, vmas));
        }
        for (mine, theirs) in self.vmstat.iter_mut().zip(other.vmstat) {
            *mine += theirs;
        }
        for (mine, theirs) in self.vmstat_small.iter_mut().zip(other.vmstat_small) {
            *mine += theirs;
        }
        self.audited.extend(other.audited);
        self.per_mm.merge(other.per_mm);
        self
    }
}

impl Aggregator {
    /// Names the cgroups of live processes (reading /proc), for a daemon
    /// tracing this host; a replay leaves them "unknown".
    pub fn name_cgroups_from_proc(&mut self) {
        self.cgroups = Mutex::new(CgroupNames::live());
    }

    pub fn received_per_cpu(&self) -> &[u64] {
        &self.received_per_cpu
    }

    pub fn new(metrics: Arc<Metrics>, table_capacity: usize) -> Self {
        Self {
            handles: Handles::new(&metrics),
            metrics,
            table: FolioTable::new(table_capacity),
            refcount_max: vec![None; KINDS * ORDERS],
            received_per_cpu: Vec::new(),
            sources: Vec::new(),
            cgroups: Mutex::new(CgroupNames::default()),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn table(&self) -> &FolioTable {
        &self.table
    }

    /// Heap bytes the table may take before it samples small folios.
    pub fn set_table_memory(&mut self, bytes: u64) {
        self.table.set_memory_budget(bytes);
    }

    /// Sample small folios from the start, one in 2^`shift`.
    pub fn sample_from_now(&mut self, shift: u32) {
        self.table.sample_from_now(shift);
    }

    pub fn apply(&mut self, event: &Decoded) {
        // Bounded: a corrupt record must not make the daemon allocate.
        let cpu = event.cpu() as usize;
        if cpu < MAX_CPUS {
            if cpu >= self.received_per_cpu.len() {
                self.received_per_cpu.resize(cpu + 1, 0);
            }
            self.received_per_cpu[cpu] += 1;
        }
        let m = &*self.metrics;
        match *event {
            Decoded::Rmap { op, level, kind, raw } => {
                self.handles.events[0].inc();
                let (calls, pages) = self.handles.rmap(m, op, level, kind, raw.order);
                calls.inc();
                pages.inc_by(u64::from(raw.nr_pages));
                if raw.flags & event_flags::OWN_MM != 0 {
                    self.table.note_owner(raw.mm, raw.tgid);
                }
                if raw.refcount != FIELD_ABSENT {
                    let max = &mut self.refcount_max[kind_order(kind, raw.order)];
                    *max = Some(max.unwrap_or(0).max(raw.refcount));
                }
                let applied = self.table.apply(&RmapCall {
                    folio: raw.folio,
                    mm: raw.mm,
                    base: raw.base,
                    op,
                    level,
                    nr_pages: raw.nr_pages,
                    kind,
                    order: raw.order,
                    kernel_mapcount: kernel_mapcount(&raw),
                    refcount: raw.refcount,
                    shared_hint: raw.shared_hint,
                    own_mm: raw.flags & event_flags::OWN_MM != 0,
                    timestamp_ns: raw.timestamp_ns,
                });
                if let Some((own, kernel)) = applied.disagreement {
                    m.disagreements.with_label_values(&[kind.label()]).inc();
                    tracing::debug!(
                        kind = kind.label(),
                        order = raw.order,
                        op = op.label(),
                        level = level.label(),
                        nr = raw.nr_pages,
                        own,
                        kernel,
                        tgid = raw.tgid,
                        "daemon and kernel disagree on a folio's mapcount"
                    );
                }
                if applied.preexisting_corrected {
                    m.preexisting_corrections.with_label_values(&[kind.label()]).inc();
                }
                if applied.phantoms > 0 {
                    m.phantoms.with_label_values(&[kind.label(), "selfcheck"]).inc_by(applied.phantoms);
                }
                if applied.pmd_split_inferred {
                    m.pmd_splits_inferred.inc();
                }
                if applied.evicted {
                    m.table_evictions.inc();
                }
                if applied.sampled_out {
                    self.handles.sampled_out.inc();
                }
                if let Some(dropped) = applied.sample_tightened.filter(|&dropped| dropped > 0) {
                    m.sample_drops.inc_by(dropped as u64);
                    tracing::info!(
                        entries = self.table.len(),
                        dropped,
                        one_small_folio_in = 1u64 << self.table.sample_shift(),
                        "folio table at its memory budget: small folios sampled"
                    );
                }
                if let Some(agrees) = applied.shared_bit_agrees {
                    self.handles.shared_bit_check(m, agrees).inc();
                    if !agrees {
                        tracing::debug!(
                            kind = kind.label(),
                            order = raw.order,
                            op = op.label(),
                            level = level.label(),
                            nr = raw.nr_pages,
                            "the kernel's maybe-shared bit differs from its simulation"
                        );
                    }
                }
                if let Some(retired) = applied.retired {
                    self.handles.retired(m, &retired);
                }
            }
            Decoded::WriteFault { outcome, kind, raw } => {
                self.handles.events[1].inc();
                self.handles.write_fault(m, outcome, kind, raw.order).inc();
                self.handles.write_fault_duration.observe(f64::from(raw.duration_ns) * 1e-9);
                if outcome == WriteFaultOutcome::Copy {
                    self.handles.copy_reason(m, copy_reason(kind, &raw)).inc();
                }
                if let Some(state) = self.table.get_mut(raw.folio) {
                    match outcome {
                        WriteFaultOutcome::Copy => state.count_write_fault(true),
                        WriteFaultOutcome::Reuse => state.count_write_fault(false),
                        _ => {}
                    }
                    // The copy's unmap of the old page came first: what is
                    // left of a large folio all belonging to the faulting
                    // address space means nobody else mapped it.
                    if outcome == WriteFaultOutcome::Copy
                        && kind == Some(FolioKind::Anon)
                        && raw.order > 0
                        && state.unknown == 0
                        && state.mappings.iter().all(|m| m.mm == raw.mm)
                    {
                        m.exclusive_large_copies.with_label_values(&[order_label(raw.order)]).inc();
                    }
                }
            }
            Decoded::Fork(fork) => {
                self.handles.events[2].inc();
                self.handles.forks.inc();
                let copies = fork.copy & fork_copy::ENTRIES != 0;
                self.handles.fork_vmas[usize::from(!copies)].inc();
                if copies {
                    let copy_huge = fork.copy & fork_copy::HUGE_ENTRIES != 0;
                    let started = std::time::Instant::now();
                    let copied = self.table.fork(fork.src_mm, fork.dst_mm, fork.start, fork.end, copy_huge);
                    m.fork_copy_seconds.observe(started.elapsed().as_secs_f64());
                    m.fork_folios_copied.inc_by(copied as u64);
                }
            }
            Decoded::Move(moved) => {
                self.handles.events[4].inc();
                m.moves.inc();
                self.table.move_range(moved.mm, moved.old_addr, moved.new_addr, moved.len);
            }
            Decoded::Teardown(teardown) => {
                self.handles.events[5].inc();
                let torn = self.table.teardown(teardown.mm);
                for (kind, count) in torn.phantoms {
                    m.phantoms.with_label_values(&[kind.label(), "teardown"]).inc_by(count);
                }
                for retired in &torn.retired {
                    self.handles.retired(m, retired);
                }
            }
            Decoded::ScanRefusal(refusal) => {
                self.handles.events[6].inc();
                let folio = self.table.get(refusal.folio);
                let truth = refusal_truth(refusal.folio != 0, folio);
                m.khugepaged_shared_refusals.with_label_values(&[truth]).inc();
                tracing::debug!(
                    truth,
                    named = refusal.folio != 0,
                    in_table = folio.is_some(),
                    sharers = folio.map(FolioState::sharers),
                    complete = folio.map(FolioState::complete),
                    order = folio.map(|f| f.order),
                    "khugepaged refused a range for shared PTEs"
                );
            }
            Decoded::Source { op, raw } => {
                self.handles.events[3].inc();
                if op != RmapOp::Remove {
                    let vma = match raw.vma_class {
                        vma_class::MIXEDMAP => "mixedmap",
                        vma_class::PFNMAP => "pfnmap",
                        _ => "other",
                    };
                    let source = self.source_label(&raw.fs_type, &raw.name);
                    let pages = self.metrics.nomapping_pages.with_label_values(&[vma, &source]);
                    pages.inc_by(u64::from(raw.nr_pages));
                }
            }
        }
    }

    /// A short, bounded name for what was mapped: the dentry name with
    /// digits dropped ("socket:[123]" and "renderD128" do not multiply),
    /// else the file system type; at most [`MAX_SOURCES`] distinct values.
    fn source_label(&mut self, fs_type: &[u8], name: &[u8]) -> String {
        let text = |bytes: &[u8]| -> String {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end])
                .chars()
                .filter(|c| !c.is_ascii_digit() && (c.is_ascii_graphic() || *c == ' '))
                .collect()
        };
        let name = text(name);
        let fs_type = text(fs_type);
        let label = match (name.is_empty(), fs_type.is_empty()) {
            (false, _) => name,
            (true, false) => fs_type,
            (true, true) => "other".to_owned(),
        };
        if self.sources.contains(&label) {
            return label;
        }
        if self.sources.len() < MAX_SOURCES {
            self.sources.push(label.clone());
            return label;
        }
        "other".to_owned()
    }

    /// Publishes the counts kept since the last call and sets the gauges
    /// that summarise the folio table; called before each scrape, so that
    /// it describes every event received and the table as it is now.
    pub fn publish_metrics(&self) {
        self.handles.flush();
        let m = &*self.metrics;
        for g in [
            &m.folios,
            &m.partially_mapped,
            &m.unmapped_bytes,
            &m.shared,
            &m.maybe_shared_bit,
            &m.refcount_max,
            &m.maybe_shared_verdicts,
            &m.maybe_shared_false_positive_bytes,
            &m.folios_error,
            &m.shared_error,
            &m.maybe_shared_bit_error,
            &m.table_vmstat,
            &m.table_vmstat_error,
        ] {
            g.reset();
        }
        let sample = Sample::of(self.table.sample_shift());
        m.sampling_ratio.set(1.0 / sample.scale as f64);
        let TableWalk { counts, worst, vmstat, vmstat_small, audited, per_mm } = TableWalk::of(&self.table);
        for kind in ALL_KINDS {
            for (order, c) in counts[kind as usize].iter().enumerate().filter(|(_, c)| c.folios > 0) {
                let labels = [kind.label(), order_label(order as u8)];
                // Small folios are the sampled ones; large folios are all here.
                let sample = if order == 0 { sample } else { Sample::EXACT };
                let with_value = [labels[0], labels[1], sample.label()];
                sample.publish(&m.folios, &m.folios_error, &with_value, c.folios, 1);
                m.partially_mapped.with_label_values(&labels).set(c.partial);
                if c.unmapped_pages > 0 {
                    m.unmapped_bytes.with_label_values(&labels).set(c.unmapped_pages * 4096);
                }
                sample.publish(&m.shared, &m.shared_error, &with_value, c.shared, 1);
                if c.maybe_shared > 0 {
                    sample.publish(
                        &m.maybe_shared_bit,
                        &m.maybe_shared_bit_error,
                        &with_value,
                        c.maybe_shared,
                        1,
                    );
                }
            }
        }
        let mut highest = 0;
        for kind in ALL_KINDS {
            for order in 0..ORDERS as u8 {
                let Some(max) = self.refcount_max[kind_order(kind, order)] else { continue };
                m.refcount_max.with_label_values(&[kind.label(), order_label(order)]).set(i64::from(max));
                highest = highest.max(max);
            }
        }
        m.headroom_ratio.set(f64::from(highest) / REFCOUNT_LIMIT);
        let vmas_left = match worst {
            Some((refcount, vmas)) if refcount > 0 && vmas > 0 => {
                let per_vma = f64::from(refcount) / vmas as f64;
                ((REFCOUNT_LIMIT - f64::from(refcount)) / per_vma).max(0.0)
            }
            _ => f64::INFINITY,
        };
        m.headroom_vmas.set(vmas_left);
        m.table_entries.set(self.table.len() as i64);
        m.table_bytes.set(i64::try_from(self.table.heap_bytes()).unwrap_or(i64::MAX));
        self.publish_maybe_shared(&audited);
        self.publish_cgroups(per_mm, sample);
        for (i, (counter, value)) in crate::metrics::VMSTAT_COUNTERS.iter().zip(vmstat).enumerate() {
            // The PMD counters are of large folios only.
            let small = vmstat_small.get(i).copied().unwrap_or(0);
            let sample = if small > 0 { sample } else { Sample::EXACT };
            let labels = [*counter, sample.label()];
            m.table_vmstat.with_label_values(&labels).set(value + small * sample.scale);
            if let Some(error) = sample.error(small, 1) {
                m.table_vmstat_error.with_label_values(&[counter]).set(error);
            }
        }
    }

    /// `mapcount_cgroup_memory_bytes`: the address spaces' figures summed
    /// per cgroup; the [`CGROUPS_SHOWN`] that map most by name, the rest
    /// as "other".
    fn publish_cgroups(&self, per_mm: smaps::ByAddressSpace, sample: Sample) {
        let mut names = self.cgroups.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Exact and estimated figures, and the small pages sampled in them.
        let mut per_cgroup: HashMap<Arc<str>, ([SmapsFigures; 2], u64)> = HashMap::default();
        let mut seen = rustc_hash::FxHashSet::default();
        for (mm, exact, estimate, small_pages) in per_mm.into_figures(sample.scale as u64) {
            let name = match self.table.tgid_of(mm) {
                Some(tgid) => {
                    seen.insert(tgid);
                    names.name(tgid)
                }
                None => Arc::from(cgroups::UNKNOWN),
            };
            let (sums, sampled) = per_cgroup.entry(name).or_default();
            sums[0].add(&exact);
            sums[1].add(&estimate);
            *sampled += small_pages;
        }
        names.retain(|tgid| seen.contains(&tgid));
        let mut ranked: Vec<_> = per_cgroup.into_iter().collect();
        ranked.sort_by(|a, b| b.1.0[0].rss_bytes.cmp(&a.1.0[0].rss_bytes).then_with(|| a.0.cmp(&b.0)));
        let mut other = ([SmapsFigures::default(); 2], 0);
        for (_, (sums, sampled)) in ranked.iter().skip(CGROUPS_SHOWN) {
            other.0[0].add(&sums[0]);
            other.0[1].add(&sums[1]);
            other.1 += sampled;
        }
        let shown = ranked.iter().take(CGROUPS_SHOWN).map(|(name, sums)| (&**name, sums));
        let (m, errors) = (&self.metrics.cgroup_memory, &self.metrics.cgroup_memory_error);
        m.reset();
        errors.reset();
        let other_row = (ranked.len() > CGROUPS_SHOWN).then_some(("other", &other));
        for (cgroup, (sums, sampled)) in shown.chain(other_row) {
            let sample = if *sampled > 0 { sample } else { Sample::EXACT };
            for (model, figures) in ["exact", "no_page_mapcount"].into_iter().zip(sums) {
                let rows = [
                    ("rss", figures.rss_bytes),
                    ("pss", figures.pss_shifted >> PSS_SHIFT),
                    ("private", figures.private_bytes),
                    ("shared", figures.shared_bytes),
                    ("undetermined", figures.undetermined_bytes),
                ];
                for (figure, value) in rows {
                    // Undetermined bytes are of large folios only.
                    let sample = if figure == "undetermined" { Sample::EXACT } else { sample };
                    m.with_label_values(&[cgroup, figure, model, sample.label()]).set(value as i64);
                    // A small folio adds at most a page to each figure.
                    if let Some(error) = sample.error(*sampled as i64, PAGE_BYTES) {
                        errors.with_label_values(&[cgroup, figure, model]).set(error);
                    }
                }
            }
        }
    }

    /// The confusion matrix of the kernel's maybe-shared guesses against
    /// the exact answer, over the live large folios whose every mapping
    /// the table places (see [`maybe_shared`]).
    fn publish_maybe_shared(&self, folios: &[&FolioState]) {
        const HEURISTICS: usize = Heuristic::ALL.len();
        const VERDICTS: usize = Verdict::ALL.len();
        // [heuristic][verdict][truth][kind][order]
        let mut counts = vec![0i64; HEURISTICS * VERDICTS * 2 * KINDS * ORDERS];
        let mut false_positive_bytes = [[0i64; KINDS]; HEURISTICS];
        let index = |h: usize, v: usize, t: usize, k: usize, o: usize| {
            (((h * VERDICTS + v) * 2 + t) * KINDS + k) * ORDERS + o
        };
        for &f in folios {
            let facts = maybe_shared::Facts::of(f);
            let slots = self.table.mm_id_slots(f);
            let order = usize::from(f.order).min(ORDERS - 1);
            for (h, &heuristic) in Heuristic::ALL.iter().enumerate() {
                let verdict = maybe_shared::verdict(heuristic, &facts, slots);
                let v = Verdict::ALL.iter().position(|&x| x == verdict).unwrap_or(0);
                counts[index(h, v, usize::from(facts.truly_shared), f.kind as usize, order)] += 1;
                if verdict == Verdict::Shared && !facts.truly_shared {
                    false_positive_bytes[h][f.kind as usize] += (f.pages() * 4096) as i64;
                }
            }
        }
        let m = &*self.metrics;
        for (h, heuristic) in Heuristic::ALL.iter().enumerate() {
            for (v, verdict) in Verdict::ALL.iter().enumerate() {
                for (t, truth) in ["exclusive", "shared"].iter().enumerate() {
                    for kind in ALL_KINDS {
                        for order in 0..ORDERS {
                            let n = counts[index(h, v, t, kind as usize, order)];
                            if n > 0 {
                                let labels = [
                                    heuristic.label(),
                                    verdict.label(),
                                    truth,
                                    kind.label(),
                                    order_label(order as u8),
                                ];
                                m.maybe_shared_verdicts.with_label_values(&labels).set(n);
                            }
                        }
                    }
                }
            }
            for kind in ALL_KINDS {
                let bytes = false_positive_bytes[h][kind as usize];
                if bytes > 0 {
                    m.maybe_shared_false_positive_bytes
                        .with_label_values(&[heuristic.label(), kind.label()])
                        .set(bytes);
                }
            }
        }
    }

    /// `/debug/smaps`: see `FolioTable::smaps_of`.
    pub fn smaps_of(&self, tgid: u32, from: u64, to: u64) -> mapcount_common::SmapsReport {
        self.table.smaps_of(tgid, from, to)
    }

    /// Text for the debug view: the folios one process maps, by serial.
    /// At most `max_rows` rows; a last comment line says how many more there were.
    pub fn describe_tgid(&self, tgid: u32, max_rows: usize) -> String {
        let mut out = format!("{}\n", FolioRow::HEADER);
        let folios = self.table.mapped_by_tgid(tgid);
        if folios.len() > max_rows {
            out.push_str(&format!("# {} folios, the first {max_rows} by serial\n", folios.len()));
        }
        for (f, address) in folios.into_iter().take(max_rows) {
            let row = FolioRow {
                serial: u64::from(f.serial),
                address,
                kind: f.kind.label().to_owned(),
                order: f.order,
                sharers: f.sharers(),
                mapcount: f.mapcount(),
                ptes: f.mappings.iter().map(|m| u64::from(m.ptes)).sum(),
                pmds: f.mappings.iter().map(|m| u64::from(m.pmds)).sum(),
                partial: f.partially_mapped(),
                ever_partial: f.ever_partially_mapped(),
                peak_sharers: u32::from(f.peak_sharers),
                peak_mapcount: f.peak_mapcount,
                peak_refcount: f.peak_refcount,
                cow_copies: f.cow_copies,
                cow_reuses: f.cow_reuses,
                kernel_bit: match f.shared_hint() {
                    shared_hint::MAYBE_SHARED => "set",
                    shared_hint::EXCLUSIVE => "clear",
                    _ => "-",
                }
                .to_owned(),
                simulated_bit: match self.table.mm_id_slots(f) {
                    Some(slots) if slots.shared_bit() => "set",
                    Some(_) => "clear",
                    None => "-",
                }
                .to_owned(),
            };
            out.push_str(&row.line());
            out.push('\n');
        }
        out
    }
}

/// Why a write fault copied, from the old folio's state at the fault's return.
fn copy_reason(kind: Option<FolioKind>, raw: &Event) -> &'static str {
    if kind == Some(FolioKind::Ksm) {
        return "ksm";
    }
    if raw.flags & event_flags::SWAPCACHE != 0 {
        return "swapcache";
    }
    if raw.order > 0 {
        return match raw.shared_hint {
            shared_hint::MAYBE_SHARED => "shared",
            shared_hint::EXCLUSIVE => "extra_references",
            _ => "large_folio",
        };
    }
    // The faulting task's mapping is gone by now: any left belong to others.
    match kernel_mapcount(raw) {
        Some(n) if n >= 1 => "mapped_elsewhere",
        _ => "extra_references",
    }
}

#[cfg(test)]
mod tests {
    use mapcount_common::{Event, EventType, FolioKind, Level, RmapOp, WriteFaultOutcome};

    use super::*;
    use crate::decode::{decode, encode};

    fn rmap(op: RmapOp, level: Level, kind: FolioKind, order: u8, nr_pages: u32) -> Decoded {
        decode(&encode(&Event::rmap(op, level, kind, order, 0, 0, 0, nr_pages))).unwrap()
    }

    fn write_fault(outcome: WriteFaultOutcome, duration_ns: u32) -> Decoded {
        let event = Event {
            event_type: EventType::WriteFault as u8,
            outcome: outcome as u8,
            duration_ns,
            ..Event::ZERO
        };
        decode(&encode(&event)).unwrap()
    }

    /// 200,000 small folios, a third of them shared with a child, in a
    /// table with room for 5,000: the small folios' gauges are scaled, say
    /// so, and hold the truth within their stated bound; the large folios'
    /// stay exact.
    #[test]
    fn sampled_gauges_are_scaled_within_their_bound() {
        let metrics = Arc::new(Metrics::new());
        let mut aggregator = Aggregator::new(Arc::clone(&metrics), 1 << 20);
        aggregator.set_table_memory(1 << 20);
        let apply = |aggregator: &mut Aggregator, op, level, order, folio: u64, mm, base, nr, mapcount| {
            let event = Event {
                mapcount,
                refcount: 2,
                ..Event::rmap(op, level, FolioKind::Anon, order, folio, mm, base, nr)
            };
            aggregator.apply(&decode(&encode(&event)).unwrap());
        };
        for i in 0..100u64 {
            apply(&mut aggregator, RmapOp::AddNew, Level::Pmd, 9, (1 << 40) | (i << 15), 1, i << 21, 512, 0);
        }
        let (small, shared) = (200_000u64, 66_667u64);
        for i in 0..small {
            let (folio, base) = (0xffff_ea00_0000_0000 + i * 64, 0x7f00_0000_0000 + i * 4096);
            apply(&mut aggregator, RmapOp::AddNew, Level::Pte, 0, folio, 1, base, 1, 0);
            if i % 3 == 0 {
                apply(&mut aggregator, RmapOp::Add, Level::Pte, 0, folio, 2, base, 1, 0);
            }
        }
        aggregator.publish_metrics();
        let shift = aggregator.table().sample_shift();
        assert!(shift >= 5, "shift {shift}");
        assert_eq!(metrics.sampling_ratio.get(), 1.0 / f64::from(1u32 << shift));
        let within = |gauge: &IntGaugeVec, error: &IntGaugeVec, truth: u64| {
            let value = gauge.with_label_values(&["anon", "0", "scaled"]).get();
            let bound = error.with_label_values(&["anon", "0"]).get();
            assert!(bound > 0 && (value - truth as i64).abs() <= bound, "{value} ± {bound}, truth {truth}");
            // An honest bound, not a wide one: under a fifth of the truth.
            assert!(bound < truth as i64 / 5, "{bound} for {truth}");
        };
        within(&metrics.folios, &metrics.folios_error, small);
        within(&metrics.shared, &metrics.shared_error, shared);
        assert_eq!(metrics.folios.with_label_values(&["anon", "9", "exact"]).get(), 100);
        let text = metrics.render();
        assert!(!text.contains(r#"mapcount_folios{kind="anon",order="0",value="exact"}"#));
        assert!(text.contains(r#"mapcount_table_vmstat{counter="nr_anon_pages",value="scaled"}"#), "{text}");
        assert!(!text.contains(r#"mapcount_folios_error{kind="anon",order="9"}"#));
    }

    /// The gauges' walk of the table, in parts on several threads, adds up
    /// to the walk in one: a table of small and large folios of several
    /// kinds, some shared between address spaces that fall in different
    /// parts, some partially mapped, some mapped by a PMD.
    #[test]
    fn a_walk_in_parts_adds_up_to_one_walk() {
        let mut aggregator = Aggregator::new(Arc::new(Metrics::new()), 1 << 20);
        let mut apply = |op, level, kind, order, folio: u64, mm: u64, base: u64, nr, mapcount, refcount| {
            let event =
                Event { mapcount, refcount, ..Event::rmap(op, level, kind, order, folio, mm, base, nr) };
            aggregator.apply(&decode(&encode(&event)).unwrap());
        };
        let kinds = [FolioKind::Anon, FolioKind::File, FolioKind::Shmem];
        for i in 0..30_000u64 {
            let (folio, mm, base) = (0xffff_ea00_0000_0000 + i * 64, 1 + i % 7, 0x7f00_0000_0000 + i * 4096);
            let kind = kinds[i as usize % 3];
            let refcount = (i % 1000) as i32;
            apply(RmapOp::AddNew, Level::Pte, kind, 0, folio, mm, base, 1, 0, refcount);
            if i % 5 == 0 {
                apply(RmapOp::Add, Level::Pte, kind, 0, folio, 100 + i % 3, base, 1, 0, refcount);
            }
        }
        for i in 0..300u64 {
            let (folio, base) = ((1 << 40) | (i << 15), i << 21);
            if i % 2 == 0 {
                apply(RmapOp::AddNew, Level::Pmd, FolioKind::Anon, 9, folio, 1 + i % 7, base, 512, 0, 1);
            } else {
                // 16 of 32 pages mapped: partially.
                apply(RmapOp::Add, Level::Pte, FolioKind::File, 5, folio, 1 + i % 7, base, 16, 0, 3);
            }
        }
        let table = aggregator.table();
        let one = TableWalk::in_parts(table, 1);
        let figures = |walk: TableWalk| {
            let mut per_mm: Vec<_> = walk.per_mm.into_figures(1).collect();
            per_mm.sort_by_key(|row| row.0);
            (walk.counts, walk.worst, walk.vmstat, walk.vmstat_small, walk.audited.len(), per_mm)
        };
        let expected = figures(one);
        assert_eq!(expected.0[FolioKind::File as usize][5].partial, 150, "the table as built");
        assert_eq!(expected.0[FolioKind::Anon as usize][0].shared, 2_000);
        for parts in [2, 3, 8] {
            assert_eq!(figures(TableWalk::in_parts(table, parts)), expected, "{parts} parts");
        }
    }

    /// A small folio mapped once takes a short path through the walk; it
    /// gives the figures the general path gives: folios of three kinds, of
    /// refcounts rising and falling, some first seen mapped by others (the
    /// kernel's count is higher: mappings the table cannot place).
    #[test]
    fn the_short_path_agrees_with_the_general_one() {
        let mut aggregator = Aggregator::new(Arc::new(Metrics::new()), 1 << 16);
        let kinds = [FolioKind::Anon, FolioKind::File, FolioKind::Shmem];
        for i in 0..3_000u64 {
            let (folio, mm, base) = (0xffff_ea00_0000_0000 + i * 64, 1 + i % 7, 0x7f00_0000_0000 + i * 4096);
            // Every third folio is first seen at a mapping, with the kernel
            // counting up to two more it does not place.
            let (op, mapcount) =
                if i % 3 == 0 { (RmapOp::Add, (i / 3 % 3) as i32) } else { (RmapOp::AddNew, 0) };
            let refcount = (i * 7919 % 1000) as i32;
            let event = Event {
                mapcount,
                refcount,
                ..Event::rmap(op, Level::Pte, kinds[i as usize % 3], 0, folio, mm, base, 1)
            };
            aggregator.apply(&decode(&encode(&event)).unwrap());
        }
        let table = aggregator.table();
        assert!(table.iter().any(|f| f.unknown > 0), "some mappings are not placed");
        assert!(table.iter().all(|f| f.mappings.len() == 1), "every folio takes the short path");
        let figures = |walk: TableWalk| {
            let per_mm: Vec<_> = walk.per_mm.into_figures(1).collect();
            (walk.counts, walk.worst, walk.vmstat, walk.vmstat_small, per_mm)
        };
        let mut general = TableWalk::part(table, std::iter::empty());
        for f in table.iter() {
            general.add_any(table, f);
        }
        assert_eq!(figures(TableWalk::in_parts(table, 1)), figures(general));
    }

    #[test]
    fn counts_calls_and_pages_per_label_set() {
        let metrics = Arc::new(Metrics::new());
        let mut agg = Aggregator::new(Arc::clone(&metrics), 1024);
        for _ in 0..3 {
            agg.apply(&rmap(RmapOp::Add, Level::Pte, FolioKind::File, 0, 16));
        }
        agg.apply(&rmap(RmapOp::AddNew, Level::Pmd, FolioKind::Anon, 9, 512));
        agg.apply(&rmap(RmapOp::Remove, Level::Pmd, FolioKind::Anon, 9, 512));

        let calls = |l: [&str; 4]| metrics.rmap_calls.with_label_values(&l).get();
        assert_eq!(calls(["add", "pte", "file", "0"]), 0, "counted locally until published");
        agg.publish_metrics();
        let pages = |l: [&str; 4]| metrics.rmap_pages.with_label_values(&l).get();
        assert_eq!(calls(["add", "pte", "file", "0"]), 3);
        assert_eq!(pages(["add", "pte", "file", "0"]), 48);
        assert_eq!(calls(["add_new", "pmd", "anon", "9"]), 1);
        assert_eq!(pages(["remove", "pmd", "anon", "9"]), 512);
        assert_eq!(metrics.events.with_label_values(&["rmap"]).get(), 5);
    }

    #[test]
    fn counts_write_faults_by_outcome_with_durations() {
        let metrics = Arc::new(Metrics::new());
        let mut agg = Aggregator::new(Arc::clone(&metrics), 1024);
        agg.apply(&write_fault(WriteFaultOutcome::Copy, 2_000));
        agg.apply(&write_fault(WriteFaultOutcome::Copy, 3_000));
        agg.apply(&write_fault(WriteFaultOutcome::Reuse, 1_000));
        agg.publish_metrics();
        assert_eq!(metrics.write_faults.with_label_values(&["copy", "none", "0"]).get(), 2);
        assert_eq!(metrics.write_faults.with_label_values(&["reuse", "none", "0"]).get(), 1);
        assert_eq!(metrics.write_fault_duration.get_sample_count(), 3);
        assert!((metrics.write_fault_duration.get_sample_sum() - 6e-6).abs() < 1e-12);
    }

    #[test]
    fn rendered_text_has_help_and_no_addresses() {
        let metrics = Arc::new(Metrics::new());
        let mut agg = Aggregator::new(Arc::clone(&metrics), 1024);
        let event = Event::rmap(
            RmapOp::Add,
            Level::Pte,
            FolioKind::Anon,
            0,
            0xffff_8880_1234_5678,
            0xffff_8880_8765_4321,
            0,
            1,
        );
        agg.apply(&decode(&encode(&event)).unwrap());
        agg.publish_metrics();
        let text = metrics.render();
        assert!(text.contains("# HELP mapcount_rmap_calls_total"));
        assert!(text.contains(r#"mapcount_rmap_calls_total{kind="anon",level="pte",op="add",order="0"} 1"#));
        assert!(!text.contains("ffff8880") && !text.contains("18446612"), "kernel address leaked");
    }

    /// Driver-page sources: digits dropped, capped, never unbounded.
    #[test]
    fn source_labels_are_bounded() {
        let metrics = Arc::new(Metrics::new());
        let mut agg = Aggregator::new(Arc::clone(&metrics), 16);
        let name = |s: &str| {
            let mut out = [0u8; mapcount_common::SOURCE_NAME_LEN];
            out[..s.len()].copy_from_slice(s.as_bytes());
            out
        };
        assert_eq!(agg.source_label(&name("sockfs"), &name("")), "sockfs");
        assert_eq!(agg.source_label(&name("devtmpfs"), &name("renderD128")), "renderD");
        for i in 0..100u8 {
            let distinct = format!("dev{}{}", (b'a' + i % 26) as char, (b'a' + i / 26) as char);
            agg.source_label(&name("x"), &name(&distinct));
        }
        assert!(agg.sources.len() <= MAX_SOURCES);
        assert_eq!(agg.source_label(&name("x"), &name("never-seen-before")), "other");
    }

    /// The copy reason comes from the old folio's state at return.
    #[test]
    fn copy_reasons() {
        let small = |mapcount: i32, flags: u8| Event { mapcount, flags, ..Event::ZERO };
        assert_eq!(copy_reason(Some(FolioKind::Anon), &small(0, 0)), "mapped_elsewhere");
        assert_eq!(copy_reason(Some(FolioKind::Anon), &small(-1, 0)), "extra_references");
        assert_eq!(copy_reason(Some(FolioKind::Ksm), &small(5, 0)), "ksm");
        assert_eq!(copy_reason(Some(FolioKind::Anon), &small(-1, event_flags::SWAPCACHE)), "swapcache");
        let large = |hint: u8| Event { order: 4, shared_hint: hint, ..Event::ZERO };
        assert_eq!(copy_reason(Some(FolioKind::Anon), &large(shared_hint::UNKNOWN)), "large_folio");
        assert_eq!(copy_reason(Some(FolioKind::Anon), &large(shared_hint::MAYBE_SHARED)), "shared");
        assert_eq!(copy_reason(Some(FolioKind::Anon), &large(shared_hint::EXCLUSIVE)), "extra_references");
    }

    /// A recorded stream, replayed: one THP, a parent and three forked
    /// children, then everyone unmaps. Four sharers at the peak, shared
    /// while they live, nothing left afterwards.
    /// A refusal is judged by the folio that crossed the limit: shared
    /// when two address spaces map it, exclusive when one does and the
    /// table saw every mapping made, unknown otherwise.
    #[test]
    fn khugepaged_refusals_by_truth() {
        use mapcount_common::ScanRefusalEvent;

        const FOLIO: u64 = 0xffff_ea00_0080_0000;
        let add = |op: RmapOp, mm: u64, mapcount: i32| Event {
            folio: FOLIO,
            mm,
            base: 0x7f00_0000_0000,
            mapcount,
            refcount: mapcount + 1,
            ..Event::rmap(op, Level::Pte, FolioKind::Anon, 0, 0, 0, 0, 1)
        };
        let refusal = |folio: u64| ScanRefusalEvent {
            event_type: EventType::ScanRefusal as u8,
            _pad: [0; 3],
            cpu: 0,
            mm: 1,
            folio,
            timestamp_ns: 0,
        };
        let metrics = Arc::new(Metrics::new());
        let mut agg = Aggregator::new(Arc::clone(&metrics), 64);
        let apply = |agg: &mut Aggregator, event: &[u8]| agg.apply(&decode(event).unwrap());
        apply(&mut agg, &encode(&add(RmapOp::AddNew, 1, 0)));
        apply(&mut agg, &encode(&refusal(FOLIO)));
        apply(&mut agg, &encode(&add(RmapOp::Add, 2, 1)));
        apply(&mut agg, &encode(&refusal(FOLIO)));
        apply(&mut agg, &encode(&refusal(FOLIO)));
        apply(&mut agg, &encode(&refusal(0)));
        apply(&mut agg, &encode(&refusal(FOLIO + 4096)));
        agg.publish_metrics();
        let refusals = |truth: &str| metrics.khugepaged_shared_refusals.with_label_values(&[truth]).get();
        let counts = ["exclusive", "shared", "unknown", "unnamed"].map(refusals);
        assert_eq!(counts, [1, 2, 1, 1]);
        assert_eq!(metrics.events.with_label_values(&["scan_refusal"]).get(), 5);
    }

    #[test]
    fn replays_a_recorded_fork_stream() {
        use mapcount_common::ForkEvent;

        use crate::{ingest::Sink, record};

        const BASE: u64 = 0x7f00_0000_0000;
        let thp = |op: RmapOp, mm: u64, mapcount: i32| Event {
            event_type: EventType::Rmap as u8,
            op: op as u8,
            level: Level::Pmd as u8,
            kind: FolioKind::Anon as u8,
            order: 9,
            nr_pages: 512,
            folio: 0xffff_ea00_0040_0000,
            mm,
            base: BASE,
            mapcount,
            refcount: mapcount + 1,
            ..Event::ZERO
        };
        let fork = |child: u64| ForkEvent {
            event_type: EventType::Fork as u8,
            copy: fork_copy::ENTRIES | fork_copy::HUGE_ENTRIES,
            _pad: [0; 6],
            src_mm: 1,
            start: BASE,
            dst_mm: child,
            end: BASE + (2 << 20),
            timestamp_ns: 0,
            tgid: 1,
            cpu: 0,
        };
        let mut writer = record::Writer::new(Vec::new()).unwrap();
        writer.write(&encode(&thp(RmapOp::AddNew, 1, 0))).unwrap();
        for child in 2..=4 {
            writer.write(&encode(&fork(child))).unwrap();
        }
        let stream = writer.into_inner();

        let metrics = Arc::new(Metrics::new());
        let mut aggregator = Aggregator::new(Arc::clone(&metrics), 64);
        let mut sink =
            Sink::new(Arc::new(std::sync::Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);
        let mut reader = record::Reader::new(&stream[..]).unwrap();
        while let Some(bytes) = reader.next_record().unwrap() {
            sink.ingest(&mut aggregator, bytes).unwrap();
        }
        aggregator.publish_metrics();
        assert_eq!(metrics.shared.with_label_values(&["anon", "9", "exact"]).get(), 1);
        assert_eq!(metrics.forks.get(), 3);

        // Children exit, then the parent unmaps: the kernel's counts agree.
        for (mm, before) in [(2, 3), (3, 2), (4, 1), (1, 0)] {
            aggregator.apply(&decode(&encode(&thp(RmapOp::Remove, mm, before))).unwrap());
        }
        aggregator.publish_metrics();
        assert_eq!(metrics.disagreements.with_label_values(&["anon"]).get(), 0);
        assert_eq!(metrics.folios.with_label_values(&["anon", "9", "exact"]).get(), 0);
        assert_eq!(metrics.sharers.with_label_values(&["anon"]).get_sample_count(), 1);
        assert_eq!(metrics.sharers.with_label_values(&["anon"]).get_sample_sum(), 4.0);
    }
}
