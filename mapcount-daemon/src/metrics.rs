//! The Prometheus registry and every metric the daemon exports.
//!
//! Labels are bounded: op, level, kind, order, outcome and reason take a
//! handful of values each; `source` is capped (see `aggregate`). Nothing
//! carries a pid or an address.

use prometheus::{
    Encoder as _, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

pub struct Metrics {
    pub registry: Registry,
    // Event counters.
    pub rmap_calls: IntCounterVec,
    pub rmap_pages: IntCounterVec,
    pub write_faults: IntCounterVec,
    pub copy_reasons: IntCounterVec,
    pub write_fault_duration: Histogram,
    pub forks: IntCounter,
    /// The table's own work at fork: folios copied (from the events), and
    /// the time it took (this daemon's own; a replay measures its own).
    pub fork_folios_copied: IntCounter,
    pub fork_copy_seconds: Histogram,
    pub fork_vmas: IntCounterVec,
    pub nomapping_pages: IntCounterVec,
    // Folio table.
    pub folios: IntGaugeVec,
    pub partially_mapped: IntGaugeVec,
    pub unmapped_bytes: IntGaugeVec,
    pub shared: IntGaugeVec,
    pub maybe_shared_bit: IntGaugeVec,
    pub maybe_shared_verdicts: IntGaugeVec,
    pub maybe_shared_false_positive_bytes: IntGaugeVec,
    pub cgroup_memory: IntGaugeVec,
    pub shared_bit_checks: IntCounterVec,
    pub exclusive_large_copies: IntCounterVec,
    pub khugepaged_shared_refusals: IntCounterVec,
    pub refcount_max: IntGaugeVec,
    pub headroom_ratio: Gauge,
    pub headroom_vmas: Gauge,
    pub sharers: HistogramVec,
    pub peak_mapcount: HistogramVec,
    pub partial_lifetimes: IntCounterVec,
    pub disagreements: IntCounterVec,
    pub phantoms: IntCounterVec,
    pub preexisting_corrections: IntCounterVec,
    pub pmd_splits_inferred: IntCounter,
    pub moves: IntCounter,
    pub table_vmstat: IntGaugeVec,
    pub table_entries: IntGauge,
    pub table_evictions: IntCounter,
    // Sampling of small folios beyond --folio-table.memory: the bound of
    // each scaled gauge above, by the same labels.
    pub sampling_ratio: Gauge,
    pub table_bytes: IntGauge,
    pub sample_drops: IntCounter,
    pub events_sampled_out: IntCounter,
    pub folios_error: IntGaugeVec,
    pub shared_error: IntGaugeVec,
    pub maybe_shared_bit_error: IntGaugeVec,
    pub table_vmstat_error: IntGaugeVec,
    pub cgroup_memory_error: IntGaugeVec,
    // Daemon health.
    pub events: IntCounterVec,
    pub events_undecodable: IntCounter,
    pub probe_attached: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub kernel_info: IntGaugeVec,
    pub log_lines_suppressed: IntCounter,
    // The HTTP endpoint under load.
    pub http_connections_open: IntGauge,
    pub http_connections_closed: IntCounterVec,
    pub http_requests_rejected: IntCounterVec,
    pub http_accept_failures: IntCounter,
    // Recording (--record).
    pub record_bytes: IntCounter,
    pub recording: IntGauge,
    pub record_stops: IntCounterVec,
}

#[expect(clippy::expect_used, reason = "metric definitions are static: a bad one fails every test")]
fn must<T>(r: prometheus::Result<T>) -> T {
    // Only fails on an invalid metric name or duplicate registration: a bug, found by the tests.
    r.expect("metric definitions are static and valid")
}

const KIND_ORDER: &[&str] = &["kind", "order"];
/// Gauges summed from the folio table say whether their value counts every
/// folio (value="exact") or was scaled up from the sample of small folios
/// (value="scaled"; the bound is in the `_error` gauge of the same name).
const KIND_ORDER_VALUE: &[&str] = &["kind", "order", "value"];

/// What the `_error` gauges state: 3 standard deviations of the scaled
/// value (a sample of binomial draws, each small folio in it with
/// probability p), with one more folio assumed so that an empty sample
/// still has a bound. Values are whole units of the gauge.
pub const ERROR_HELP: &str = "The bound of the scaled value of the gauge of the same name without _error (same labels), present while the folio table samples small folios: 3 standard deviations of a binomial sample, so the true value lies within plus or minus this with 99.7% probability.";

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = must(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels));
            must(registry.register(Box::new(h.clone())));
            h
        };
        let rmap_labels = &["op", "level", "kind", "order"];
        let counts = vec![1.0, 2.0, 3.0, 4.0, 5.0, 8.0, 16.0, 64.0, 512.0, 4096.0];

        let write_fault_duration = must(Histogram::with_opts(
            HistogramOpts::new(
                "mapcount_cow_fault_duration_seconds",
                "Time from do_wp_page entry to return.",
            )
            .buckets(must(prometheus::exponential_buckets(1e-6, 4.0, 10))),
        ));
        must(registry.register(Box::new(write_fault_duration.clone())));
        let fork_copy_seconds = must(Histogram::with_opts(
            HistogramOpts::new(
                "mapcount_fork_copy_seconds",
                "Time mapcountd spent copying a VMA's folio mappings into a child at fork (its own cost, not the kernel's).",
            )
            .buckets(must(prometheus::exponential_buckets(1e-6, 4.0, 12))),
        ));
        must(registry.register(Box::new(fork_copy_seconds.clone())));
        let single = |c: IntCounter| {
            must(registry.register(Box::new(c.clone())));
            c
        };
        let headroom_ratio = must(Gauge::new(
            "mapcount_refcount_headroom_ratio",
            "Highest folio refcount seen, divided by 2^31 (where the refcount overflows).",
        ));
        let headroom_vmas = must(Gauge::new(
            "mapcount_refcount_headroom_vmas",
            "How many more VMAs mapping the live folio with the highest refcount, at its references per VMA, would reach 2^31.",
        ));
        must(registry.register(Box::new(headroom_ratio.clone())));
        must(registry.register(Box::new(headroom_vmas.clone())));
        let int_gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let table_entries = int_gauge("mapcount_folio_table_entries", "Live folios in the daemon's table.");
        let table_bytes = int_gauge(
            "mapcount_folio_table_bytes",
            "Heap the folio table holds (its containers' capacities), against --folio-table.memory: beyond it, small folios are sampled.",
        );

        let metrics = Self {
            rmap_calls: counter(
                "mapcount_rmap_calls_total",
                "Calls of the rmap add/remove functions, by operation, page-table level, folio kind and folio order.",
                rmap_labels,
            ),
            rmap_pages: counter(
                "mapcount_rmap_pages_total",
                "Pages mapped (add, add_new) or unmapped (remove) by rmap calls; a PMD mapping counts 512 pages.",
                rmap_labels,
            ),
            write_faults: counter(
                "mapcount_cow_faults_total",
                "Write faults on present, write-protected PTEs (do_wp_page) by outcome (reuse, copy, copy_zero_page, shared, other) and the faulting folio's kind and order.",
                &["outcome", "kind", "order"],
            ),
            copy_reasons: counter(
                "mapcount_cow_copy_reasons_total",
                "Why a write fault copied: mapped_elsewhere, ksm, swapcache, shared (the kernel's shared bit), large_folio (never reused before 6.15), extra_references.",
                &["reason"],
            ),
            write_fault_duration,
            fork_copy_seconds,
            forks: single(must(IntCounter::new(
                "mapcount_forks_total",
                "Fork VMA copies seen (copy_page_range calls); one fork copies every VMA.",
            ))),
            fork_folios_copied: single(must(IntCounter::new(
                "mapcount_fork_folios_copied_total",
                "Folios whose mappings the table copied into a child at fork: the work a fork costs mapcountd.",
            ))),
            fork_vmas: counter(
                "mapcount_fork_vmas_total",
                "VMAs seen at fork, by whether the kernel copied their page-table entries (copied) or left them to be faulted in (lazy).",
                &["copy"],
            ),
            nomapping_pages: counter(
                "mapcount_nomapping_pages_mapped_total",
                "Pages that are neither anonymous nor file-backed (driver pages) mapped to userspace, by VMA type and a bounded source name.",
                &["vma", "source"],
            ),
            folios: gauge(
                "mapcount_folios",
                "Live mapped folios in the table; value=scaled while small folios are sampled (mapcount_folio_table_sampling_ratio).",
                KIND_ORDER_VALUE,
            ),
            partially_mapped: gauge(
                "mapcount_folios_partially_mapped",
                "Live large folios with only some pages mapped and no PMD/PUD mapping.",
                KIND_ORDER,
            ),
            unmapped_bytes: gauge(
                "mapcount_partially_mapped_unmapped_bytes",
                "Bytes of mapped large folios that no page table maps (where the table knows each page's mapcount): what deferred splits would free, and what AnonPages (anon) or Mapped (file, shmem) over-count on a CONFIG_NO_PAGE_MAPCOUNT kernel.",
                KIND_ORDER,
            ),
            shared: gauge(
                "mapcount_folios_shared",
                "Live folios mapped by two or more address spaces; value=scaled while small folios are sampled.",
                KIND_ORDER_VALUE,
            ),
            maybe_shared_bit: gauge(
                "mapcount_folios_maybe_shared_bit",
                "Live folios whose kernel maybe-shared bit (6.15+; large folios) was set at their last event; value=scaled while small folios are sampled.",
                KIND_ORDER_VALUE,
            ),
            maybe_shared_verdicts: gauge(
                "mapcount_maybe_shared_folios",
                "Live large folios by what each kernel generation's guess at \"mapped by somebody else\" says (heuristic: folio_estimated_sharers 6.3-6.9, folio_likely_mapped_shared 6.10-6.14, folio_maybe_mapped_shared 6.15+; verdict: shared, exclusive, or undecided where the table cannot tell) and by the exact answer (truth), computed from the table whatever the running kernel. Folios with mappings the table could not place are left out. docs/audit.md.",
                &["heuristic", "verdict", "truth", "kind", "order"],
            ),
            maybe_shared_false_positive_bytes: gauge(
                "mapcount_maybe_shared_false_positive_bytes",
                "Bytes of live large folios a heuristic calls shared that only one address space maps (see mapcount_maybe_shared_folios).",
                &["heuristic", "kind"],
            ),
            cgroup_memory: gauge(
                "mapcount_cgroup_memory_bytes",
                "What smaps reports for the processes of a cgroup (the 10 that map most, then cgroup=\"other\"), summed from the folio table: model=exact as a kernel with per-page mapcounts reports it, model=no_page_mapcount as CONFIG_NO_PAGE_MAPCOUNT estimates it; figure=rss, pss, private (USS), shared, or undetermined (bytes the daemon cannot place, left out of the others; docs/audit.md).",
                &["cgroup", "figure", "model", "value"],
            ),
            shared_bit_checks: counter(
                "mapcount_maybe_shared_bit_checks_total",
                "rmap events of large folios at which the kernel's maybe-shared bit (folio->_mm_ids, 6.15+) was compared with the table's simulation of it; result=differ means a missed event or a wrong simulation (should stay 0).",
                &["result"],
            ),
            exclusive_large_copies: counter(
                "mapcount_cow_copies_of_exclusive_large_folios_total",
                "Write faults that copied a page of a large anonymous folio only the faulting address space mapped, where reusing it was possible: 6.15+ copy when the maybe-shared bit is set, earlier kernels never reuse a large folio. By folio order.",
                &["order"],
            ),
            khugepaged_shared_refusals: counter(
                "mapcount_khugepaged_shared_pte_refusals_total",
                "khugepaged scans of a PMD range refused for too many shared PTEs (SCAN_EXCEED_SHARED_PTE), by whether the folio whose PTE crossed khugepaged/max_ptes_shared is mapped by another address space: exclusive means the kernel's guess refused it (6.10-6.14 ask folio_likely_mapped_shared, 6.15+ folio_maybe_mapped_shared); unknown: the table cannot tell; unnamed: the kernel named no folio.",
                &["truth"],
            ),
            refcount_max: gauge(
                "mapcount_folio_refcount_max",
                "Highest folio refcount seen since the daemon started.",
                KIND_ORDER,
            ),
            headroom_ratio,
            headroom_vmas,
            sharers: histogram(
                "mapcount_folio_sharers",
                "Most address spaces that mapped a folio at once, observed when its last mapping went.",
                &["kind"],
                counts.clone(),
            ),
            peak_mapcount: histogram(
                "mapcount_folio_peak_mapcount",
                "Highest folio mapcount over a folio's mapped life, observed when its last mapping went.",
                KIND_ORDER,
                counts,
            ),
            partial_lifetimes: counter(
                "mapcount_folios_ever_partially_mapped_total",
                "Large folios that were partially mapped at some point of their mapped life (counted when it ends).",
                KIND_ORDER,
            ),
            disagreements: counter(
                "mapcount_mapcount_disagreements_total",
                "Events where the daemon's count of a folio's mappings differed from the kernel's own counter (should stay 0).",
                &["kind"],
            ),
            phantoms: counter(
                "mapcount_phantom_mappings_total",
                "Mappings the table held that the kernel did not, dropped; by folio kind and how they were found: at the address space's teardown (teardown) or by the kernel's own count (selfcheck). Should stay 0.",
                &["kind", "found"],
            ),
            preexisting_corrections: counter(
                "mapcount_preexisting_corrections_total",
                "Folios mapped before mapcountd saw them whose count the table took from the kernel's: mappings made before it started, and their copies at fork (the kernel duplicates them without saying whose they are). Expected; not disagreements.",
                &["kind"],
            ),
            pmd_splits_inferred: single(must(IntCounter::new(
                "mapcount_pmd_splits_inferred_total",
                "PMD mappings turned into 512 PTE mappings at the first PTE-level event after a split no rmap call reported (6.1-6.7 split PMDs inline).",
            ))),
            moves: single(must(IntCounter::new(
                "mapcount_page_table_moves_total",
                "Ranges of page-table entries moved without rmap calls (move_page_tables: mremap, exec's stack), followed by the table.",
            ))),
            table_vmstat: gauge(
                "mapcount_table_vmstat",
                "What the folio table holds in the units of the kernel's vmstat counter of the same name (mapcount_kernel_vmstat): pages of anonymous and KSM folios mapped, pages of file, shmem and driver folios mapped, PMD-mapped anonymous, shmem and file THPs. The difference stays constant while processes that predate mapcountd keep their mappings. value=scaled while small folios are sampled.",
                &["counter", "value"],
            ),
            table_entries,
            table_evictions: single(must(IntCounter::new(
                "mapcount_folio_table_evictions_total",
                "Folios dropped from the full table (raise --folio-table.size).",
            ))),
            sampling_ratio: {
                let g = must(Gauge::new(
                    "mapcount_folio_table_sampling_ratio",
                    "The share of small folios the table tracks: 1 while it holds every folio; below --folio-table.memory's budget it halves (1/2, 1/4, ...), chosen by a hash of the page frame. Large folios are always tracked.",
                ));
                must(registry.register(Box::new(g.clone())));
                g
            },
            table_bytes,
            sample_drops: single(must(IntCounter::new(
                "mapcount_folio_table_sample_drops_total",
                "Entries of small folios dropped from the table when it reached its memory budget and halved its sample.",
            ))),
            events_sampled_out: single(must(IntCounter::new(
                "mapcount_events_sampled_out_total",
                "Events of small folios outside the sample that reached the daemon anyway (sent before the kernel side learnt the new sample, or replayed): left out of the table.",
            ))),
            folios_error: gauge("mapcount_folios_error", ERROR_HELP, KIND_ORDER),
            shared_error: gauge("mapcount_folios_shared_error", ERROR_HELP, KIND_ORDER),
            maybe_shared_bit_error: gauge("mapcount_folios_maybe_shared_bit_error", ERROR_HELP, KIND_ORDER),
            table_vmstat_error: gauge("mapcount_table_vmstat_error", ERROR_HELP, &["counter"]),
            cgroup_memory_error: gauge(
                "mapcount_cgroup_memory_bytes_error",
                ERROR_HELP,
                &["cgroup", "figure", "model"],
            ),
            events: counter("mapcount_events_total", "Events received from the kernel, by type.", &["type"]),
            events_undecodable: single(must(IntCounter::new(
                "mapcount_events_undecodable_total",
                "Ring-buffer records that did not decode (wrong size or unknown values); should stay 0.",
            ))),
            probe_attached: gauge(
                "mapcount_probe_attached",
                "1 if the probe is attached, 0 if its function is missing or attaching failed.",
                &["probe", "function", "mode"],
            ),
            build_info: gauge(
                "mapcount_build_info",
                "Always 1; labels describe the mapcountd build.",
                &["version"],
            ),
            kernel_info: gauge(
                "mapcount_kernel_info",
                "Always 1; labels describe the running kernel.",
                &["release"],
            ),
            log_lines_suppressed: single(must(IntCounter::new(
                "mapcount_log_lines_suppressed_total",
                "Log lines held back by rate limits (a repeated warning is written once a minute with the count of the others).",
            ))),
            http_connections_open: int_gauge(
                "mapcount_http_connections_open",
                "HTTP connections open now (capped by --web.max-connections).",
            ),
            http_connections_closed: counter(
                "mapcount_http_connections_closed_total",
                "HTTP connections the daemon closed itself, by reason: connection_limit (the idlest of the address holding the most, to make room), idle_timeout (no byte of a request within --web.idle-timeout), header_read_timeout (a request header or TLS handshake begun and not finished within --web.header-read-timeout), tls_handshake_timeout.",
                &["reason"],
            ),
            http_requests_rejected: counter(
                "mapcount_http_requests_rejected_total",
                "HTTP requests refused, by reason: max_requests (503, --web.max-requests in flight), debug_walk_budget (429, /debug/folios asked again too soon).",
                &["reason"],
            ),
            http_accept_failures: single(must(IntCounter::new(
                "mapcount_http_accept_failures_total",
                "Failed accepts of HTTP connections (out of descriptors): should stay 0 with the connection cap below the descriptor limit.",
            ))),
            record_bytes: single(must(IntCounter::new(
                "mapcount_record_bytes_total",
                "Bytes written to the --record file.",
            ))),
            recording: int_gauge(
                "mapcount_recording",
                "1 while the event stream is written to the --record file; 0 when not asked or stopped.",
            ),
            record_stops: counter(
                "mapcount_record_stops_total",
                "Recordings stopped before the daemon, by reason: size_limit (--record.max-size reached), write_error (e.g. the disk is full).",
                &["reason"],
            ),
            registry,
        };
        metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics
    }

    #[expect(clippy::expect_used, reason = "encoding into a Vec cannot fail, and the text format is UTF-8")]
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Metrics {
    /// The metrics read at scrape time rather than counted by the daemon:
    /// the kernel side's per-CPU counters (`read` sums one slot of
    /// `mapcount_common::counter` over the CPUs) and the kernel's vmstat.
    pub fn register_read_at_scrape(
        &self,
        read: impl Fn(u32) -> u64 + Clone + Send + Sync + 'static,
    ) -> prometheus::Result<()> {
        use mapcount_common::counter;
        let lost = read.clone();
        self.registry.register(Box::new(ReadAtScrape::new(
            "mapcount_events_lost_total",
            "Events the kernel side could not deliver, by reason; every loss is counted here.",
            Some("reason"),
            &["ring_buffer_full", "task_state_full"],
            move || vec![lost(counter::RING_BUFFER_FULL), lost(counter::TASK_STATE_FULL)],
        )))?;
        let produced = read.clone();
        self.registry.register(Box::new(ReadAtScrape::new(
            "mapcount_events_produced_total",
            "Records the kernel side tried to put in the ring buffer: received plus lost to ring_buffer_full.",
            None,
            &[],
            move || vec![produced(counter::PRODUCED)],
        )))?;
        let left_out = read;
        self.registry.register(Box::new(ReadAtScrape::new(
            "mapcount_rmap_calls_left_out_total",
            "rmap calls and write faults the kernel side leaves out on purpose, by reason: \
             mapcountd's own address space but its page-cache folios (observer), hugetlb VMAs (hugetlb).",
            Some("reason"),
            &["observer", "hugetlb"],
            move || vec![left_out(counter::OBSERVER_SKIPPED), left_out(counter::HUGETLB_SKIPPED)],
        )))?;
        self.registry.register(Box::new(ReadAtScrape::gauge(
            "mapcount_kernel_vmstat",
            "The kernel's own counters of mapped memory, from /proc/vmstat, in its units (pages; THPs for the *_transparent_hugepages and *_pmdmapped counters): compare with mapcount_table_vmstat.",
            Some("counter"),
            VMSTAT_COUNTERS,
            read_vmstat,
        )))
    }
}

impl Metrics {
    /// The kernel side's exact totals (`mapcount_common::totals`), read at
    /// scrape time: `read` returns every slot summed over the CPUs.
    pub fn register_exact_totals(
        &self,
        read: impl Fn() -> Vec<u64> + Send + Sync + 'static,
    ) -> prometheus::Result<()> {
        self.registry.register(Box::new(ExactTotals::new(read)?))
    }
}

/// The exact totals as three counter families, one series per slot that
/// counted something.
struct ExactTotals<F> {
    descs: Vec<Desc>,
    read: F,
}

const EXACT_RMAP_LABELS: [&str; 4] = ["op", "level", "kind", "order"];
const EXACT_FAULT_LABELS: [&str; 3] = ["outcome", "kind", "order"];
const EXACT_TOTALS: [(&str, &str); 3] = [
    (
        "mapcount_exact_rmap_calls_total",
        "rmap calls as mapcount_rmap_calls_total, counted in the kernel before the ring buffer: exact when events are lost.",
    ),
    (
        "mapcount_exact_rmap_pages_total",
        "Pages of those calls as mapcount_rmap_pages_total, counted in the kernel: exact when events are lost.",
    ),
    (
        "mapcount_exact_cow_faults_total",
        "Write faults as mapcount_cow_faults_total, counted in the kernel: exact when events are lost.",
    ),
];

impl<F: Fn() -> Vec<u64> + Send + Sync> ExactTotals<F> {
    fn new(read: F) -> prometheus::Result<Self> {
        let descs = EXACT_TOTALS
            .iter()
            .zip([&EXACT_RMAP_LABELS[..], &EXACT_RMAP_LABELS[..], &EXACT_FAULT_LABELS[..]])
            .map(|((name, help), labels)| {
                let labels = labels.iter().map(|l| (*l).to_owned()).collect();
                Desc::new((*name).to_owned(), (*help).to_owned(), labels, Default::default())
            })
            .collect::<prometheus::Result<_>>()?;
        Ok(Self { descs, read })
    }
}

impl<F: Fn() -> Vec<u64> + Send + Sync> Collector for ExactTotals<F> {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    #[expect(clippy::expect_used, reason = "the descriptions were valid when registered")]
    fn collect(&self) -> Vec<MetricFamily> {
        use mapcount_common::{FolioKind, Level, RmapOp, WriteFaultOutcome, totals};

        use crate::aggregate::order_label;
        let family = |(name, help): (&str, &str), labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let [calls_help, pages_help, faults_help] = EXACT_TOTALS;
        let (calls, pages) = (family(calls_help, &EXACT_RMAP_LABELS), family(pages_help, &EXACT_RMAP_LABELS));
        let faults = family(faults_help, &EXACT_FAULT_LABELS);
        let kind_label = |kind: u8| FolioKind::try_from(kind).map_or("none", FolioKind::label);
        let sum = (self.read)();
        let at = |slot: usize| sum.get(slot).copied().unwrap_or(0);
        for kind in 0..totals::KINDS as u8 {
            for order in 0..totals::ORDERS as u8 {
                for op in [RmapOp::Add, RmapOp::AddNew, RmapOp::Remove] {
                    for level in [Level::Pte, Level::Pmd, Level::Pud] {
                        let (op, level) = (op as u8, level as u8);
                        let count = at(totals::rmap_calls(op, level, kind, order));
                        if count == 0 {
                            continue;
                        }
                        let labels = [
                            RmapOp::try_from(op).map_or("other", RmapOp::label),
                            Level::try_from(level).map_or("other", Level::label),
                            kind_label(kind),
                            order_label(order),
                        ];
                        calls.with_label_values(&labels).inc_by(count);
                        pages
                            .with_label_values(&labels)
                            .inc_by(at(totals::rmap_pages(op, level, kind, order)));
                    }
                }
                for outcome in 1..=totals::OUTCOMES as u8 {
                    let count = at(totals::write_faults(outcome, kind, order));
                    if count > 0 {
                        let outcome =
                            WriteFaultOutcome::try_from(outcome).map_or("other", WriteFaultOutcome::label);
                        faults
                            .with_label_values(&[outcome, kind_label(kind), order_label(order)])
                            .inc_by(count);
                    }
                }
            }
        }
        [calls, pages, faults].iter().flat_map(Collector::collect).collect()
    }
}

/// The [`VMSTAT_COUNTERS`] from `/proc/vmstat`; 0 for a counter this
/// kernel lacks. mapcountd's own anonymous pages are taken out, as the
/// kernel side leaves its address space out of the table (its heap grows
/// with the table). Its file and driver mappings (binary, ring buffer) are
/// made once at start and left in: RssFile counts the ring buffer's pages
/// twice (it is mapped twice, to wrap), nr_mapped once.
fn read_vmstat() -> Vec<u64> {
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let own_pages = |names: &[&str]| names.iter().map(|n| field(&status, n)).sum::<u64>() / 4;
    VMSTAT_COUNTERS
        .iter()
        .map(|counter| {
            let kernel = field(&vmstat, &format!("{counter} "));
            match *counter {
                "nr_anon_pages" => kernel.saturating_sub(own_pages(&["RssAnon:"])),
                _ => kernel,
            }
        })
        .collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A counter whose value is read from somewhere else at scrape time
/// (the kernel's per-CPU drop counters).
pub struct ReadAtScrape<F> {
    desc: Desc,
    labels: &'static [&'static str],
    read: F,
    /// A gauge (a level the kernel keeps) rather than a counter.
    gauge: bool,
}

/// The kernel's own counters of mapped memory (`/proc/vmstat`) that the
/// table's totals are checked against, in the order of their values.
pub const VMSTAT_COUNTERS: &[&str] = &[
    "nr_anon_pages",
    "nr_mapped",
    "nr_anon_transparent_hugepages",
    "nr_shmem_pmdmapped",
    "nr_file_pmdmapped",
];

impl<F> ReadAtScrape<F>
where
    F: Fn() -> Vec<u64> + Send + Sync,
{
    /// `read` returns one value per entry of `labels`; with no label name,
    /// one value for a counter without labels.
    #[expect(clippy::expect_used, reason = "the names are static: a bad one fails every test")]
    pub fn new(
        name: &str,
        help: &str,
        label: Option<&str>,
        labels: &'static [&'static str],
        read: F,
    ) -> Self {
        let variable_labels = label.map(|l| vec![l.to_owned()]).unwrap_or_default();
        let desc = Desc::new(name.to_owned(), help.to_owned(), variable_labels, Default::default())
            .expect("valid metric description");
        Self { desc, labels, read, gauge: false }
    }

    /// The same for a gauge.
    pub fn gauge(
        name: &str,
        help: &str,
        label: Option<&str>,
        labels: &'static [&'static str],
        read: F,
    ) -> Self {
        Self { gauge: true, ..Self::new(name, help, label, labels, read) }
    }
}

impl<F> Collector for ReadAtScrape<F>
where
    F: Fn() -> Vec<u64> + Send + Sync,
{
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    #[expect(clippy::expect_used, reason = "the description was valid when registered")]
    fn collect(&self) -> Vec<MetricFamily> {
        let opts = Opts::new(self.desc.fq_name.clone(), self.desc.help.clone());
        let values = (self.read)();
        if self.gauge {
            let label = self.desc.variable_labels.first().map_or("counter", String::as_str);
            let gauge = IntGaugeVec::new(opts, &[label]).expect("valid metric");
            for (value_label, value) in self.labels.iter().zip(values) {
                gauge.with_label_values(&[*value_label]).set(i64::try_from(value).unwrap_or(i64::MAX));
            }
            return gauge.collect();
        }
        match self.desc.variable_labels.first() {
            Some(label) => {
                let counter = IntCounterVec::new(opts, &[label.as_str()]).expect("valid metric");
                for (value_label, value) in self.labels.iter().zip(values) {
                    counter.with_label_values(&[*value_label]).inc_by(value);
                }
                counter.collect()
            }
            None => {
                let counter = prometheus::IntCounter::with_opts(opts).expect("valid metric");
                counter.inc_by(values.first().copied().unwrap_or(0));
                counter.collect()
            }
        }
    }
}
