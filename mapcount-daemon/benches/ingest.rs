//! The ingest benchmark: the user-space side of the performance budget,
//! on this host, without root (`cargo bench --bench ingest`). `cargo xtask
//! bench` runs it and writes BENCHMARKS.md.
//!
//! - ingest: decode and aggregate, on one core, the scenarios' recorded
//!   stream (`--scenarios FILE`, from the bench VM) followed by synthetic
//!   small-folio churn;
//! - folio table: bytes per live folio (heap growth / folios);
//! - scrape: rendering /metrics with a million live folios;
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
            records.push(&encode(&ForkEvent {
                event_type: EventType::Fork as u8,
                copy: fork_copy::ENTRIES | fork_copy::HUGE_ENTRIES,
                _pad: [0; 6],
                src_mm: parent,
                start: base,
                dst_mm: child,
                end: base + 4096,
                timestamp_ns: 0,
                tgid: 1,
                cpu: 0,
            }));
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

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
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
            let exit = TeardownEvent {
                event_type: EventType::Teardown as u8,
                _pad: [0; 3],
                cpu: 0,
                mm: mm - 1,
                timestamp_ns: 0,
            };
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
            samples.push((events, rss_kib()));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    aggregator.publish_metrics();
    let sum = |c: &prometheus::IntCounterVec| -> u64 {
        use prometheus::core::Collector as _;
        c.collect().iter().flat_map(|f| f.get_metric()).map(|m| m.get_counter().get_value() as u64).sum()
    };
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    if let Some(events) = flag("--uptime") {
        let events: u64 = events.parse().expect("--uptime EVENTS");
        std::process::exit(if uptime(events) { 0 } else { 1 });
    }
    let live_folios: u64 = flag("--live-folios").and_then(|s| s.parse().ok()).unwrap_or(1_000_000);

    // Ingest: best of three passes, each into a fresh aggregator.
    let mut stream = Stream::default();
    if let Some(path) = flag("--scenarios") {
        recorded_stream(&mut stream, path);
    }
    let scenario_records = stream.len();
    println!("ingest_scenario_records {scenario_records}");
    synthetic_stream(&mut stream, 1_000_000);
    let kinds = [FolioKind::Anon, FolioKind::Ksm, FolioKind::File, FolioKind::Shmem, FolioKind::NoMapping];
    let disagreements = |metrics: &Metrics| -> u64 {
        kinds.iter().map(|&k| metrics.disagreements.with_label_values(&[k.label()]).get()).sum()
    };
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let metrics = Arc::new(Metrics::new());
        let mut aggregator = Aggregator::new(Arc::clone(&metrics), 1 << 20);
        let mut sink = Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);
        let mut after_scenarios = (0, 0);
        let started = Instant::now();
        for (i, record) in stream.iter().enumerate() {
            if i == scenario_records {
                after_scenarios = (aggregator.table().len(), disagreements(&metrics));
            }
            sink.ingest(&mut aggregator, record).unwrap();
        }
        aggregator.publish_metrics();
        best = best.min(started.elapsed().as_secs_f64());
        // The synthetic churn is consistent, as a kernel's events are: it
        // adds no disagreement and leaves no folio behind.
        println!("ingest_synthetic_disagreements {}", disagreements(&metrics) - after_scenarios.1);
        println!("ingest_synthetic_folios_left {}", aggregator.table().len() - after_scenarios.0);
    }
    println!("ingest_events {}", stream.len());
    println!("ingest_seconds_best_of_3 {best:.3}");
    println!("ingest_events_per_second {:.0}", stream.len() as f64 / best);
    drop(stream);
    let mut sink = Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);

    // Folio table: a million live folios, each mapped once.
    let metrics = Arc::new(Metrics::new());
    let mut aggregator = Aggregator::new(Arc::clone(&metrics), live_folios as usize);
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
}
