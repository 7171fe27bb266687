//! The ingest benchmark: the user-space side of the performance budget,
//! on this host, without root (`cargo bench --bench ingest`). `cargo xtask
//! bench` runs it and writes BENCHMARKS.md.
//!
//! - ingest: drain, decode and aggregate, on one core, the scenarios'
//!   recorded stream (`--scenarios FILE`, from the bench VM) followed by
//!   synthetic small-folio churn, in the batches a daemon that keeps up
//!   drains; and where an event's time goes;
//! - folio table: bytes per live folio (heap growth / folios);
//! - scrape: rendering /metrics with a million live folios, and what
//!   bounds it;
//! - `--uptime EVENTS`: instead of all that, a long uptime in one run
//!   (see [`uptime`]).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test program: a failure here is a failed test, with its message"
)]

use std::{
    hint::black_box,
    sync::{Arc, Mutex},
    time::Instant,
};

use mapcount_common::{
    Event, EventType, FolioKind, ForkEvent, Level, RmapOp, SOURCE_NAME_LEN, SourceEvent, TeardownEvent,
    WriteFaultOutcome, fork_copy, vma_class,
};
use mapcount_daemon::{aggregate::Aggregator, decode::encode, ingest::Sink, metrics::Metrics};

/// Records back to back, as `Sink::drain` holds a drained batch.
#[derive(Default)]
struct Stream {
    bytes: Vec<u8>,
    records: Vec<(usize, usize)>,
}

impl Stream {
    fn push(&mut self, record: &[u8]) {
        self.records.push((self.bytes.len(), record.len()));
        self.bytes.extend_from_slice(record);
    }

    fn len(&self) -> usize {
        self.records.len()
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.records.iter().map(|&(offset, len)| &self.bytes[offset..offset + len])
    }
}

/// `copy_page_range` of an anonymous VMA `[start, end)` from `parent` into
/// `child`: the kernel copies its page-table entries, huge ones included.
fn fork_event(parent: u64, child: u64, start: u64, end: u64) -> ForkEvent {
    ForkEvent {
        event_type: EventType::Fork as u8,
        copy: fork_copy::ENTRIES | fork_copy::HUGE_ENTRIES,
        _pad: [0; 6],
        src_mm: parent,
        start,
        dst_mm: child,
        end,
        timestamp_ns: 0,
        tgid: 1,
        cpu: 0,
    }
}

/// `exit_mmap` of `mm` returned: the address space is gone.
fn teardown_event(mm: u64) -> TeardownEvent {
    TeardownEvent { event_type: EventType::Teardown as u8, _pad: [0; 3], cpu: 0, mm, timestamp_ns: 0 }
}

/// A reproducible stream: small-folio churn over `folios` distinct folios,
/// the shape of the VM scenarios' streams. Each folio is faulted in, one
/// in eight is shared by a fork (and copied at the write fault that
/// follows), it is mapped a second time and unmapped everywhere. The
/// kernel counts in the records agree with the table's, as they would
/// from a kernel.
fn synthetic_stream(records: &mut Stream, folios: u64) {
    // `mapcount` is the kernel's stored value: mappings before the call, minus one.
    let rmap = |op: RmapOp, folio: u64, mm: u64, base: u64, mapcount: i32| Event {
        mapcount,
        refcount: mapcount + 2,
        ..Event::rmap(op, Level::Pte, FolioKind::Anon, 0, folio, mm, base, 1)
    };
    for i in 0..folios {
        let folio = 0xffff_ea00_0000_0000 + i * 64;
        let (parent, child) = (1 + i % 64, 1000 + i % 64);
        let forked = i % 8 == 0;
        let others = i32::from(forked); // the child's mapping
        let base = 0x7f00_0000_0000 + (i % (1 << 20)) * 4096;
        records.push(&encode(&rmap(RmapOp::AddNew, folio, parent, base, 0)));
        if forked {
            records.push(&encode(&fork_event(parent, child, base, base + 4096)));
        }
        let outcome = if forked { WriteFaultOutcome::Copy } else { WriteFaultOutcome::Reuse };
        records.push(&encode(&Event {
            duration_ns: 1500,
            mapcount: others - 1,
            ..Event::write_fault(outcome, FolioKind::Anon, 0, folio, parent)
        }));
        records.push(&encode(&rmap(RmapOp::Add, folio, parent, base, others)));
        records.push(&encode(&rmap(RmapOp::Remove, folio, parent, base, others + 1)));
        records.push(&encode(&rmap(RmapOp::Remove, folio, parent, base, others)));
        if forked {
            records.push(&encode(&rmap(RmapOp::Remove, folio, child, base, 0)));
        }
    }
}

/// Counts live heap bytes, so the table's cost per folio is measured, not
/// estimated.
struct CountingAllocator;

static LIVE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only adds bookkeeping.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as u64, std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as u64, std::sync::atomic::Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn heap_bytes() -> u64 {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Every record of a `mapcountd --record` file.
fn recorded_stream(records: &mut Stream, path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    let mut reader = mapcount_daemon::record::Reader::new(std::io::BufReader::new(file))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    while let Some(record) = reader.next_record().unwrap_or_else(|e| panic!("{path}: {e}")) {
        records.push(record);
    }
}

/// A memory figure of this process from /proc/self/status, in KiB:
/// `VmRSS:` now, `VmHWM:` at its peak.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

/// Every series of a counter, summed.
fn sum(counter: &prometheus::IntCounterVec) -> u64 {
    use prometheus::core::Collector as _;
    counter.collect().iter().flat_map(|f| f.get_metric()).map(|m| m.get_counter().get_value() as u64).sum()
}

/// Weeks of a busy host's events through one aggregator, generated as
/// they are consumed: folios of every kind and order created and freed
/// over and over at reused addresses, processes that live for a million
/// folios and exit, write faults, and driver pages from more sources than
/// the `source` label keeps. Prints RSS samples and every counter next to
/// the count the stream put in, and exits 1 if one differs, a folio is
/// left, or RSS grows after the first tenth.
fn uptime(total_events: u64) -> bool {
    const LIFECYCLES_PER_PROCESS: u64 = 1_000_000;
    let kinds = [FolioKind::Anon, FolioKind::File, FolioKind::Shmem];
    let metrics = Arc::new(Metrics::new());
    let mut aggregator = Aggregator::new(Arc::clone(&metrics), 1 << 20);
    let mut sink = Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);
    let (mut events, mut rmap_calls, mut rmap_pages, mut faults, mut teardowns, mut sources) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut samples = Vec::new();
    let started = Instant::now();
    let take = |sink: &mut Sink, aggregator: &mut Aggregator, record: &[u8], events: &mut u64| {
        sink.ingest(aggregator, record).expect("no recording");
        *events += 1;
    };
    let mut i = 0u64;
    while events < total_events {
        let process = 1 + i / LIFECYCLES_PER_PROCESS;
        let (mm, tgid) = (process, process as u32);
        if i > 0 && i.is_multiple_of(LIFECYCLES_PER_PROCESS) {
            let exit = teardown_event(mm - 1);
            take(&mut sink, &mut aggregator, &encode(&exit), &mut events);
            teardowns += 1;
        }
        // Orders 0 to 9, every kind; a PMD mapping for order 9.
        let order = (i % 10) as u8;
        let kind = kinds[(i / 10 % 3) as usize];
        let (level, nr_pages) = if order == 9 { (Level::Pmd, 512) } else { (Level::Pte, 1u32 << order) };
        let add = if kind == FolioKind::Anon { RmapOp::AddNew } else { RmapOp::Add };
        let folio = 0xffff_ea00_0000_0000 + (i % 65_536) * 4096;
        let base = 0x7f00_0000_0000 + (i % 65_536) * (2 << 20);
        // The kernel's stored count before the call, minus one: pages
        // mapped by PTE, or one for the PMD (_large_mapcount for a large folio).
        let mapped = if level == Level::Pmd { 1 } else { nr_pages as i32 };
        let rmap = |op: RmapOp, mapped_before: bool| Event {
            tgid,
            mapcount: if mapped_before { mapped - 1 } else { -1 },
            refcount: 2,
            ..Event::rmap(op, level, kind, order, folio, mm, base, nr_pages)
        };
        take(&mut sink, &mut aggregator, &encode(&rmap(add, false)), &mut events);
        if i.is_multiple_of(8) {
            let fault = Event {
                tgid,
                duration_ns: 1500,
                mapcount: 0,
                ..Event::write_fault(WriteFaultOutcome::Reuse, kind, order, folio, mm)
            };
            take(&mut sink, &mut aggregator, &encode(&fault), &mut events);
            faults += 1;
        }
        take(&mut sink, &mut aggregator, &encode(&rmap(RmapOp::Remove, true)), &mut events);
        rmap_calls += 2;
        rmap_pages += 2 * u64::from(nr_pages);
        // A driver page now and then, from one of 100 sources (the label keeps 32).
        if i.is_multiple_of(1024) {
            let mut name = [0u8; SOURCE_NAME_LEN];
            // Letters: the label drops digits.
            let n = (i / 1024) % 100;
            let text =
                format!("dev{}{}", char::from(b'a' + (n / 26) as u8), char::from(b'a' + (n % 26) as u8));
            name[..text.len()].copy_from_slice(text.as_bytes());
            let source = SourceEvent {
                event_type: EventType::Source as u8,
                vma_class: vma_class::PFNMAP,
                op: RmapOp::Add as u8,
                _pad: [0; 1],
                nr_pages: 1,
                cpu: 0,
                _pad2: 0,
                fs_type: [0; SOURCE_NAME_LEN],
                name,
            };
            take(&mut sink, &mut aggregator, &encode(&source), &mut events);
            sources += 1;
        }
        i += 1;
        if i.is_multiple_of((total_events / 20 / 3).max(1)) {
            samples.push((events, status_kib("VmRSS:")));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    aggregator.publish_metrics();
    let checks = [
        ("mapcount_rmap_calls_total", sum(&metrics.rmap_calls), rmap_calls),
        ("mapcount_rmap_pages_total", sum(&metrics.rmap_pages), rmap_pages),
        ("mapcount_cow_faults_total", sum(&metrics.write_faults), faults),
        (
            "mapcount_events_total{type=\"teardown\"}",
            metrics.events.with_label_values(&["teardown"]).get(),
            teardowns,
        ),
        (
            "mapcount_events_total{type=\"source\"}",
            metrics.events.with_label_values(&["source"]).get(),
            sources,
        ),
        ("mapcount_mapcount_disagreements_total", sum(&metrics.disagreements), 0),
        ("mapcount_folio_table_entries", metrics.table_entries.get() as u64, 0),
    ];
    println!(
        "uptime_events {events} in {seconds:.1} s ({:.1} M events/s); {i} folios created and freed; {teardowns} processes exited",
        events as f64 / seconds / 1e6
    );
    let mut ok = true;
    for (name, got, put_in) in checks {
        let same = got == put_in;
        ok &= same;
        println!(
            "uptime_counter {name} = {got}, the stream put in {put_in}: {}",
            if same { "equal" } else { "DIFFERENT" }
        );
    }
    let source_labels =
        metrics.render().lines().filter(|l| l.starts_with("mapcount_nomapping_pages_mapped_total{")).count();
    println!(
        "uptime_source_series {source_labels} (100 sources, the label keeps {} and \"other\")",
        mapcount_daemon::aggregate::MAX_SOURCES
    );
    ok &= source_labels <= mapcount_daemon::aggregate::MAX_SOURCES + 1;
    let rss: Vec<String> = samples
        .iter()
        .map(|(e, kib)| format!("{:.0}M:{:.1}MiB", *e as f64 / 1e6, *kib as f64 / 1024.0))
        .collect();
    println!("uptime_rss_samples {}", rss.join(" "));
    let warm = samples.get(1).map_or(0, |s| s.1);
    let last = samples.last().map_or(0, |s| s.1);
    // Flat: no more than 10% (and 4 MiB) above the level after the first tenth.
    let flat = last <= warm + (warm / 10).max(4096);
    ok &= flat;
    println!(
        "uptime_rss_flat {flat} (after the first tenth {:.1} MiB, at the end {:.1} MiB)",
        warm as f64 / 1024.0,
        last as f64 / 1024.0
    );
    ok
}

/// A record's bytes, without a copy: the records are `repr(C)` without
/// padding (mapcount-common's tests check every size).
fn bytes_of<T: Copy>(record: &T) -> &[u8] {
    // SAFETY: plain integers without padding, read as bytes for their lifetime.
    unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }
}

/// The events of a synthetic terabyte host, generated in chunks and fed to
/// one aggregator whose table has `memory` bytes: 2^28 live small folios
/// (1 TiB of 4 KiB pages) and 500,000 large ones over 50,000 address
/// spaces, the first a 100 GiB process that forks twice; each child copies
/// some pages at write faults, then exits. The generator knows the truth;
/// the metrics are checked against it at two points: while both children
/// live, and after they exited. Every event reaches the daemon (no kernel
/// side to filter): the daemon drops what is outside its sample itself,
/// the worst case for ingest.
fn terabyte(memory: u64) -> bool {
    const PAGE: u64 = 4096;
    const SMALL: u64 = 1 << 28;
    const SPACES: u64 = 50_000;
    const BIG_PAGES: u64 = 100 << 18; // 100 GiB of small folios
    const LARGE_PER_SPACE: u64 = 10; // 8 of order 4, 2 of order 9
    const HEAP: u64 = 0x7f00_0000_0000;
    const CHILDREN: [(u64, u64); 2] = [(SPACES + 1, 1 << 18), (SPACES + 2, 1 << 17)]; // mm, pages copied
    let small_folio = |index: u64| 0xffff_ea00_0000_0000 + index * 64;
    let metrics = Arc::new(Metrics::new());
    let capacity = usize::try_from(2 * memory / mapcount_daemon::resources::BYTES_PER_FOLIO).unwrap();
    let mut aggregator = Aggregator::new(Arc::clone(&metrics), capacity);
    aggregator.set_table_memory(memory);
    let mut sink = Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);
    let mut chunk = Stream::default();
    let (mut events, mut ingest_seconds) = (0u64, 0f64);
    let (mut rmap_calls, mut rmap_pages, mut copies) = (0u64, 0u64, 0u64);
    let mut flush = |chunk: &mut Stream, aggregator: &mut Aggregator, force: bool| {
        if chunk.len() < 1 << 16 && !force {
            return;
        }
        let started = Instant::now();
        for record in chunk.iter() {
            sink.ingest(aggregator, record).unwrap();
        }
        ingest_seconds += started.elapsed().as_secs_f64();
        events += chunk.len() as u64;
        chunk.bytes.clear();
        chunk.records.clear();
    };
    // Every task maps into its own address space (`event_flags::OWN_MM`).
    let rmap = |op, level, order, folio, mm, base, nr_pages, mapcount| Event {
        mapcount,
        refcount: mapcount + 2,
        flags: mapcount_common::event_flags::OWN_MM,
        ..Event::rmap(op, level, FolioKind::Anon, order, folio, mm, base, nr_pages)
    };
    // Address spaces and their folios; the first is the 100 GiB process.
    let per_space = (SMALL - BIG_PAGES) / (SPACES - 1);
    let mut next_small = 0u64;
    let mut large = 0u64;
    for mm in 1..=SPACES {
        let pages = match mm {
            1 => BIG_PAGES,
            SPACES => SMALL - BIG_PAGES - per_space * (SPACES - 2),
            _ => per_space,
        };
        for j in 0..LARGE_PER_SPACE {
            let (order, level, nr) = if j < 8 { (4, Level::Pte, 16) } else { (9, Level::Pmd, 512) };
            let folio = 0xffff_ec00_0000_0000 + large * 512 * 64;
            let base = 0x7e00_0000_0000 + j * (2 << 20);
            chunk.push(bytes_of(&rmap(RmapOp::AddNew, level, order, folio, mm, base, nr, 0)));
            (rmap_calls, rmap_pages, large) = (rmap_calls + 1, rmap_pages + u64::from(nr), large + 1);
        }
        for page in 0..pages {
            let event = rmap(
                RmapOp::AddNew,
                Level::Pte,
                0,
                small_folio(next_small + page),
                mm,
                HEAP + page * PAGE,
                1,
                0,
            );
            chunk.push(bytes_of(&event));
            flush(&mut chunk, &mut aggregator, false);
        }
        (rmap_calls, rmap_pages, next_small) = (rmap_calls + pages, rmap_pages + pages, next_small + pages);
    }
    // The 100 GiB process forks twice; each child copies its first pages.
    let copy_folio = |n: u64| 0xffff_ee00_0000_0000 + n * 64;
    for &(child, _) in &CHILDREN {
        let fork = fork_event(1, child, HEAP, HEAP + BIG_PAGES * PAGE);
        chunk.push(bytes_of(&fork));
    }
    let mappings = |page: u64, after_copies_of: usize| {
        1 + CHILDREN
            .iter()
            .enumerate()
            .filter(|&(i, &(_, copied))| i >= after_copies_of || page >= copied)
            .count() as i32
    };
    for (i, &(child, copied)) in CHILDREN.iter().enumerate() {
        for page in 0..copied {
            let (old, base) = (small_folio(page), HEAP + page * PAGE);
            chunk.push(bytes_of(&rmap(RmapOp::AddNew, Level::Pte, 0, copy_folio(copies), child, base, 1, 0)));
            chunk.push(bytes_of(&rmap(
                RmapOp::Remove,
                Level::Pte,
                0,
                old,
                child,
                base,
                1,
                mappings(page, i) - 1,
            )));
            let fault = Event {
                duration_ns: 1500,
                ..Event::write_fault(WriteFaultOutcome::Copy, FolioKind::Anon, 0, old, child)
            };
            chunk.push(bytes_of(&fault));
            flush(&mut chunk, &mut aggregator, false);
            (rmap_calls, rmap_pages, copies) = (rmap_calls + 2, rmap_pages + 2, copies + 1);
        }
    }
    flush(&mut chunk, &mut aggregator, true);
    let shared_truth = (0..BIG_PAGES).filter(|&page| mappings(page, CHILDREN.len()) >= 2).count() as u64;
    let mut ok = true;
    let mut check = |when: &str,
                     aggregator: &Aggregator,
                     small_truth: u64,
                     shared_truth: u64,
                     pages_truth: u64| {
        aggregator.publish_metrics();
        let gauges = [
            ("mapcount_folios", &metrics.folios, &metrics.folios_error, small_truth),
            ("mapcount_folios_shared", &metrics.shared, &metrics.shared_error, shared_truth),
        ];
        for (name, gauge, error, truth) in gauges {
            let value = gauge.with_label_values(&["anon", "0", "scaled"]).get();
            let bound = error.with_label_values(&["anon", "0"]).get();
            let within = (value - truth as i64).unsigned_abs() <= bound as u64;
            ok &= within;
            println!(
                "terabyte_gauge {when} {name}{{kind=\"anon\",order=\"0\"}} truth={truth} scaled={value} bound={bound} error={:.3}% within={within}",
                (value - truth as i64) as f64 * 100.0 / truth.max(1) as f64
            );
        }
        let value = metrics.table_vmstat.with_label_values(&["nr_anon_pages", "scaled"]).get();
        let bound = metrics.table_vmstat_error.with_label_values(&["nr_anon_pages"]).get();
        let within = (value - pages_truth as i64).unsigned_abs() <= bound as u64;
        ok &= within;
        println!(
            "terabyte_gauge {when} mapcount_table_vmstat{{counter=\"nr_anon_pages\"}} truth={pages_truth} scaled={value} bound={bound} error={:.3}% within={within}",
            (value - pages_truth as i64) as f64 * 100.0 / pages_truth as f64
        );
        let exact = metrics.folios.with_label_values(&["anon", "4", "exact"]).get()
            + metrics.folios.with_label_values(&["anon", "9", "exact"]).get();
        ok &= exact == large as i64;
        println!("terabyte_large_folios {when} truth={large} exact={exact} equal={}", exact == large as i64);
    };
    let large_pages = (SPACES * 8 * 16) + (SPACES * 2 * 512);
    let small_live = SMALL + copies;
    check("children_alive", &aggregator, small_live, shared_truth, small_live + large_pages);
    // The children exit: every page they map is unmapped, then the space goes.
    for (i, &(child, copied)) in CHILDREN.iter().enumerate().rev() {
        let first_copy: u64 = CHILDREN[..i].iter().map(|&(_, c)| c).sum();
        for page in 0..copied {
            let base = HEAP + page * PAGE;
            chunk.push(bytes_of(&rmap(
                RmapOp::Remove,
                Level::Pte,
                0,
                copy_folio(first_copy + page),
                child,
                base,
                1,
                0,
            )));
            flush(&mut chunk, &mut aggregator, false);
        }
        for page in copied..BIG_PAGES {
            // Children still mapping the page (this one included), and the parent.
            let before = 1 + CHILDREN[..=i].iter().filter(|&&(_, c)| page >= c).count() as i32;
            chunk.push(bytes_of(&rmap(
                RmapOp::Remove,
                Level::Pte,
                0,
                small_folio(page),
                child,
                HEAP + page * PAGE,
                1,
                before - 1,
            )));
            flush(&mut chunk, &mut aggregator, false);
        }
        (rmap_calls, rmap_pages) = (rmap_calls + BIG_PAGES, rmap_pages + BIG_PAGES);
        let exit = teardown_event(child);
        chunk.push(bytes_of(&exit));
    }
    flush(&mut chunk, &mut aggregator, true);
    check("children_exited", &aggregator, SMALL, 0, SMALL + large_pages);
    let peak_mib = status_kib("VmHWM:") as f64 / 1024.0;
    for (name, value, truth) in [
        ("mapcount_rmap_calls_total", sum(&metrics.rmap_calls), rmap_calls),
        ("mapcount_rmap_pages_total", sum(&metrics.rmap_pages), rmap_pages),
        ("mapcount_cow_faults_total", sum(&metrics.write_faults), copies),
        ("mapcount_mapcount_disagreements_total", sum(&metrics.disagreements), 0),
        ("mapcount_phantom_mappings_total", sum(&metrics.phantoms), 0),
    ] {
        ok &= value == truth;
        println!("terabyte_counter {name} truth={truth} value={value} equal={}", value == truth);
    }
    let forks = metrics.fork_copy_seconds.get_sample_count();
    println!(
        "terabyte_fork forks={forks} folios_copied={} seconds={:.4} (the 100 GiB process: {BIG_PAGES} small folios)",
        metrics.fork_folios_copied.get(),
        metrics.fork_copy_seconds.get_sample_sum()
    );
    println!("terabyte_sampling_ratio {}", metrics.sampling_ratio.get());
    println!("terabyte_table_entries {}", aggregator.table().len());
    println!("terabyte_table_bytes {} (--folio-table.memory {memory})", aggregator.table().heap_bytes());
    println!("terabyte_heap_bytes {}", heap_bytes());
    println!("terabyte_events_sampled_out {}", metrics.events_sampled_out.get());
    println!("terabyte_events {events}");
    println!("terabyte_ingest_seconds {ingest_seconds:.2}");
    println!("terabyte_events_per_second {:.0}", events as f64 / ingest_seconds);
    println!("terabyte_peak_rss_mib {peak_mib:.1}");
    println!("terabyte_ok {ok}");
    ok
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    if let Some(memory) = flag("--terabyte") {
        let memory =
            mapcount_daemon::config::byte_size(memory).expect("--terabyte MEMORY (as --folio-table.memory)");
        std::process::exit(if terabyte(memory) { 0 } else { 1 });
    }
    if let Some(events) = flag("--uptime") {
        let events: u64 = events.parse().expect("--uptime EVENTS");
        std::process::exit(if uptime(events) { 0 } else { 1 });
    }
    if args.iter().any(|a| a == "--fork-cost") {
        fork_cost(&mut Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None));
        return;
    }
    let live_folios: u64 = flag("--live-folios").and_then(|s| s.parse().ok()).unwrap_or(1_000_000);

    // Ingest: best of three passes, each into a fresh aggregator.
    let mut stream = Stream::default();
    if let Some(path) = flag("--scenarios") {
        recorded_stream(&mut stream, path);
    }
    let scenario_records = stream.len();
    println!("ingest_scenario_records {scenario_records}");
    if scenario_records > 0 {
        // The kernel's own streams alone: file folios mapped by dozens of
        // processes, forks of processes that map them. Short, so best of 20.
        let mut best = f64::INFINITY;
        for _ in 0..20 {
            let mut aggregator = Aggregator::new(Arc::new(Metrics::new()), 1 << 20);
            let mut sink =
                Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);
            let started = Instant::now();
            for record in stream.iter() {
                sink.ingest(&mut aggregator, record).unwrap();
            }
            best = best.min(started.elapsed().as_secs_f64());
        }
        println!("ingest_scenarios_alone_events_per_second {:.0}", scenario_records as f64 / best);
    }
    synthetic_stream(&mut stream, 1_000_000);
    let kinds = [FolioKind::Anon, FolioKind::Ksm, FolioKind::File, FolioKind::Shmem, FolioKind::NoMapping];
    let disagreements = |metrics: &Metrics| -> u64 {
        kinds.iter().map(|&k| metrics.disagreements.with_label_values(&[k.label()]).get()).sum()
    };
    // As the daemon drains them: what the ring buffer holds when the
    // kernel wakes the daemon, copied out, put in timestamp order and
    // aggregated (`Sink::drain`).
    let batches = ring_batches(&stream, scenario_records);
    let mut ring = Ring::default();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let metrics = Arc::new(Metrics::new());
        let aggregator = Arc::new(Mutex::new(Aggregator::new(Arc::clone(&metrics), 1 << 20)));
        let mut sink = Sink::new(Arc::clone(&aggregator), None);
        let mut after_scenarios = (0, 0);
        let mut seconds = 0.0;
        for batch in &batches {
            if batch.start == scenario_records {
                after_scenarios = (aggregator.lock().unwrap().table().len(), disagreements(&metrics));
            }
            ring.fill(&stream, batch.clone());
            seconds += timed(|| sink.drain_records(ring.records()).unwrap());
        }
        let aggregator = aggregator.lock().unwrap();
        seconds += timed(|| aggregator.publish_metrics());
        best = best.min(seconds);
        // The synthetic churn is consistent, as a kernel's events are: it
        // adds no disagreement and leaves no folio behind.
        println!("ingest_synthetic_disagreements {}", disagreements(&metrics) - after_scenarios.1);
        println!("ingest_synthetic_folios_left {}", aggregator.table().len() - after_scenarios.0);
    }
    println!("ingest_events {}", stream.len());
    println!("ingest_batches {}", batches.len());
    println!("ingest_seconds_best_of_3 {best:.3}");
    println!("ingest_events_per_second {:.0}", stream.len() as f64 / best);
    ingest_breakdown(&stream, &batches, &mut ring, best);
    ingest_from_one_array(&stream);
    drop(stream);
    let mut sink = Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);

    // Folio table: a million live folios, each mapped once.
    let metrics = Arc::new(Metrics::new());
    // Room for more than the folios: at its bound the table would sample.
    let mut aggregator = Aggregator::new(Arc::clone(&metrics), 2 * live_folios as usize);
    let before = heap_bytes();
    for i in 0..live_folios {
        let event = Event {
            mapcount: 0,
            refcount: 1,
            ..Event::rmap(
                RmapOp::AddNew,
                Level::Pte,
                FolioKind::Anon,
                0,
                0xffff_ea00_0000_0000 + i * 64,
                1 + i % 64,
                0x7f00_0000_0000 + i * 4096,
                1,
            )
        };
        sink.ingest(&mut aggregator, &encode(&event)).unwrap();
    }
    let grown = heap_bytes().saturating_sub(before);
    assert_eq!(aggregator.table().len() as u64, live_folios, "every folio has an entry");
    assert_eq!(aggregator.table().sample_shift(), 0, "the table tracks every folio");
    println!("table_live_folios {}", aggregator.table().len());
    println!("table_bytes_per_folio {:.1}", grown as f64 / live_folios as f64);

    // Scrape with the table full.
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        aggregator.publish_metrics();
        let text = black_box(metrics.render());
        best = best.min(started.elapsed().as_secs_f64());
        black_box(text.len());
    }
    println!("scrape_seconds_best_of_5 {best:.4}");
    // The table's walk takes up to this many cores (parts of 2^17 folios).
    println!("scrape_cores {}", std::thread::available_parallelism().map_or(1, |n| n.get()).min(8));
    scrape_breakdown(&aggregator, &metrics);
    drop(aggregator);
    fork_cost(&mut sink);
}

/// Best of `runs` timings of `work`, in seconds.
fn best_of(runs: usize, mut work: impl FnMut()) -> f64 {
    (0..runs).map(|_| timed(&mut work)).fold(f64::INFINITY, f64::min)
}

/// The ring buffer holds each record after an 8-byte header.
const RING_HEADER_BYTES: usize = 8;

/// The stream cut into the batches a daemon that keeps up drains: what the
/// default ring buffer holds when the kernel wakes the daemon. Ranges of
/// records, a new one also at `cut` (where the recorded scenarios end and
/// the synthetic churn starts).
fn ring_batches(stream: &Stream, cut: usize) -> Vec<std::ops::Range<usize>> {
    let capacity = mapcount_daemon::object::wakeup_bytes(
        mapcount_daemon::config::DEFAULT_RING_BUFFER_BYTES,
        mapcount_daemon::config::Wakeup::Batch,
    ) as usize;
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, record) in stream.iter().enumerate() {
        let size = RING_HEADER_BYTES + record.len().next_multiple_of(8);
        if bytes + size > capacity || (i == cut && i > start) {
            batches.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    batches.push(start..stream.len());
    batches
}

/// One ring buffer's records, written as the kernel writes them (in the
/// benchmark, untimed): what a drain reads, from memory the size of the
/// ring buffer.
#[derive(Default)]
struct Ring {
    bytes: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl Ring {
    fn fill(&mut self, stream: &Stream, records: std::ops::Range<usize>) {
        self.bytes.clear();
        self.spans.clear();
        for &(offset, len) in &stream.records[records] {
            self.spans.push((self.bytes.len(), len));
            self.bytes.extend_from_slice(&stream.bytes[offset..offset + len]);
        }
    }

    fn records(&self) -> impl Iterator<Item = &[u8]> {
        self.spans.iter().map(|&(offset, len)| &self.bytes[offset..offset + len])
    }
}

/// Reads one byte of each 8-byte word of a record: the memory traffic of
/// any pass over it.
fn read_once(record: &[u8]) -> u64 {
    record.chunks(8).map(|word| u64::from(word[0])).sum()
}

/// Seconds `work` took.
fn timed(work: impl FnOnce()) -> f64 {
    let started = Instant::now();
    work();
    started.elapsed().as_secs_f64()
}

/// Best of three passes of `work` over every batch, each batch written
/// into the ring first (untimed); `work` is timed alone. `before` starts
/// each pass afresh.
fn best_over_batches(
    stream: &Stream,
    batches: &[std::ops::Range<usize>],
    ring: &mut Ring,
    mut before: impl FnMut(),
    mut work: impl FnMut(&Ring),
) -> f64 {
    (0..3)
        .map(|_| {
            before();
            batches
                .iter()
                .map(|batch| {
                    ring.fill(stream, batch.clone());
                    timed(|| work(ring))
                })
                .sum::<f64>()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Where an event's time goes in the ingest above (`whole` seconds), on
/// the same batches: reading each record's bytes once; decoding alone;
/// the whole drain with every small folio outside a sample of one in 2^20,
/// so the folio table is never asked about one (the copy, the order test, the
/// counters, fork and write-fault bookkeeping: all but the table's state).
fn ingest_breakdown(stream: &Stream, batches: &[std::ops::Range<usize>], ring: &mut Ring, whole: f64) {
    let read = best_over_batches(
        stream,
        batches,
        ring,
        || {},
        |ring| {
            for record in ring.records() {
                black_box(read_once(record));
            }
        },
    );
    let decode = best_over_batches(
        stream,
        batches,
        ring,
        || {},
        |ring| {
            for record in ring.records() {
                black_box(mapcount_daemon::decode::decode(black_box(record)).ok());
            }
        },
    );
    let aggregator = Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1 << 20)));
    let mut sink = Sink::new(Arc::clone(&aggregator), None);
    let outside_table = best_over_batches(
        stream,
        batches,
        ring,
        || {
            let mut fresh = Aggregator::new(Arc::new(Metrics::new()), 1 << 20);
            fresh.sample_from_now(mapcount_common::sampling::MAX_SHIFT);
            *aggregator.lock().unwrap() = fresh;
        },
        |ring| sink.drain_records(ring.records()).unwrap(),
    );
    let per_event = |seconds: f64| seconds * 1e9 / stream.len() as f64;
    println!("ingest_ns_per_event_read {:.1}", per_event(read));
    println!("ingest_ns_per_event_decode {:.1}", per_event(decode));
    println!("ingest_ns_per_event_outside_table {:.1}", per_event(outside_table));
    println!("ingest_ns_per_event_whole {:.1}", per_event(whole));
}

/// The same stream read from one array the size of the whole stream (far
/// more than any cache: each record comes from memory), record by record
/// without the drain's copy and sort; and reading each record once.
fn ingest_from_one_array(stream: &Stream) {
    let read = best_of(3, || {
        for record in stream.iter() {
            black_box(read_once(record));
        }
    });
    let whole = best_of(3, || {
        let mut aggregator = Aggregator::new(Arc::new(Metrics::new()), 1 << 20);
        let mut sink = Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);
        for record in stream.iter() {
            sink.ingest(&mut aggregator, record).unwrap();
        }
        aggregator.publish_metrics();
    });
    let per_event = |seconds: f64| seconds * 1e9 / stream.len() as f64;
    println!("ingest_array_bytes {}", stream.bytes.len());
    println!("ingest_array_events_per_second {:.0}", stream.len() as f64 / whole);
    println!("ingest_array_ns_per_event_read {:.1}", per_event(read));
}

/// What bounds the scrape above: the same walk's parts, each only reading
/// every entry once (the memory traffic any walk of the table costs), and
/// the text rendering alone.
fn scrape_breakdown(aggregator: &Aggregator, metrics: &Metrics) {
    let table = aggregator.table();
    let parts = mapcount_daemon::aggregate::walk_parts(table);
    let read_entries = best_of(5, || {
        let sum: u64 = std::thread::scope(|scope| {
            let walks: Vec<_> = table
                .parts(parts)
                .map(|part| {
                    scope.spawn(move || {
                        part.map(|f| u64::from(f.order) + f.mappings.len() as u64).sum::<u64>()
                    })
                })
                .collect();
            walks.into_iter().map(|walk| walk.join().unwrap()).sum()
        });
        black_box(sum);
    });
    aggregator.publish_metrics();
    let render = best_of(5, || {
        black_box(metrics.render().len());
    });
    println!("scrape_parts {parts}");
    println!("scrape_read_entries_seconds {read_entries:.4}");
    println!("scrape_render_seconds {render:.6}");
}

/// A 1 GiB process of small folios forks, and the child goes (exec or
/// exit: the kernel unmaps each page, one event each): the daemon's copy
/// of the parent's mappings at fork, per folio, against its work on one of
/// the child's unmaps. Best of three, each on a fresh table.
fn fork_cost(sink: &mut Sink) {
    const PAGE: u64 = 4096;
    const FOLIOS: u64 = 1 << 18;
    const HEAP: u64 = 0x7f00_0000_0000;
    let (parent, child) = (1, 2);
    let folio = |i: u64| 0xffff_ea00_0000_0000 + i * 64;
    let rmap = |op, mm, i: u64, mapcount| Event {
        mapcount,
        refcount: mapcount + 2,
        flags: mapcount_common::event_flags::OWN_MM,
        ..Event::rmap(op, Level::Pte, FolioKind::Anon, 0, folio(i), mm, HEAP + i * PAGE, 1)
    };
    let fork = fork_event(parent, child, HEAP, HEAP + FOLIOS * PAGE);
    let exit = teardown_event(child);
    let mut unmaps = Stream::default();
    for i in 0..FOLIOS {
        unmaps.push(bytes_of(&rmap(RmapOp::Remove, child, i, 1)));
    }
    unmaps.push(bytes_of(&exit));
    let (mut copy, mut unmap) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        let metrics = Arc::new(Metrics::new());
        let mut aggregator = Aggregator::new(Arc::clone(&metrics), 4 * FOLIOS as usize);
        for i in 0..FOLIOS {
            sink.ingest(&mut aggregator, bytes_of(&rmap(RmapOp::AddNew, parent, i, 0))).unwrap();
        }
        let started = Instant::now();
        sink.ingest(&mut aggregator, bytes_of(&fork)).unwrap();
        copy = copy.min(started.elapsed().as_secs_f64());
        assert_eq!(metrics.fork_folios_copied.get(), FOLIOS, "every folio gained the child");
        let started = Instant::now();
        for record in unmaps.iter() {
            sink.ingest(&mut aggregator, record).unwrap();
        }
        unmap = unmap.min(started.elapsed().as_secs_f64());
        let disagreements: u64 = [FolioKind::Anon]
            .iter()
            .map(|&k| metrics.disagreements.with_label_values(&[k.label()]).get())
            .sum();
        assert_eq!(disagreements, 0, "the counts in the stream agree with the table");
        assert_eq!(aggregator.table().len() as u64, FOLIOS, "the parent's folios stay");
    }
    println!("fork_folios {FOLIOS}");
    println!("fork_copy_ns_per_folio {:.1}", copy * 1e9 / FOLIOS as f64);
    println!("fork_child_unmap_ns_per_event {:.1}", unmap * 1e9 / unmaps.len() as f64);
}
