//! `mapcount-bench`: the user-space side of the performance budget, on
//! this host, without root. `cargo xtask bench` runs it and writes
//! BENCHMARKS.md.
//!
//! - ingest: decode and aggregate, on one core, the scenarios' recorded
//!   stream (`--scenarios FILE`, from the bench VM) followed by synthetic
//!   small-folio churn;
//! - folio table: bytes per live folio (heap growth / folios);
//! - scrape: rendering /metrics with a million live folios.

use std::{
    hint::black_box,
    sync::{Arc, Mutex},
    time::Instant,
};

use mapcount_common::{Event, EventType, FolioKind, ForkEvent, Level, RmapOp, WriteFaultOutcome, fork_copy};
use mapcount_daemon::{
    aggregate::Aggregator,
    decode::{encode, kind_label},
    ingest::Sink,
    metrics::Metrics,
};

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
        event_type: EventType::Rmap as u8,
        op: op as u8,
        level: Level::Pte as u8,
        kind: FolioKind::Anon as u8,
        folio,
        mm,
        base,
        nr_pages: 1,
        mapcount,
        refcount: mapcount + 2,
        ..Event::ZERO
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
            event_type: EventType::WriteFault as u8,
            outcome: outcome as u8,
            kind: FolioKind::Anon as u8,
            folio,
            mm: parent,
            duration_ns: 1500,
            mapcount: others - 1,
            ..Event::ZERO
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
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
        kinds.iter().map(|&k| metrics.disagreements.with_label_values(&[kind_label(k)]).get()).sum()
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
            sink.take(&mut aggregator, record).unwrap();
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
            event_type: EventType::Rmap as u8,
            op: RmapOp::AddNew as u8,
            level: Level::Pte as u8,
            kind: FolioKind::Anon as u8,
            folio: 0xffff_ea00_0000_0000 + i * 64,
            mm: 1 + i % 64,
            base: 0x7f00_0000_0000 + i * 4096,
            nr_pages: 1,
            mapcount: 0,
            refcount: 1,
            ..Event::ZERO
        };
        sink.take(&mut aggregator, &encode(&event)).unwrap();
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
