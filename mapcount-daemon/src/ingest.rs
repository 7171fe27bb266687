//! Loading the object and draining its ring buffers.

use std::{
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
};
use mapcount_common::{Event, EventType, ForkEvent, KernelLayout, MoveEvent, TeardownEvent};
use tokio::io::unix::AsyncFd;

use crate::{aggregate::Aggregator, decode::decode, probes::Wakeup, record};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(
        "loading the eBPF object failed: {0}{hint}",
        hint = permission_hint(.0)
    )]
    Load(aya::EbpfError),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {name}: {error}")]
    Map { name: &'static str, error: aya::maps::MapError },
    #[error("aya-log: {0}")]
    Log(#[from] aya_log::Error),
    #[error("polling the ring buffer: {0}")]
    Poll(#[from] std::io::Error),
}

fn permission_hint(error: &aya::EbpfError) -> &'static str {
    let text = crate::probes::error_chain(error);
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        "; mapcountd needs root, or CAP_BPF and CAP_PERFMON (plus CAP_SYS_ADMIN before 5.8)"
    } else {
        ""
    }
}

/// Loads the embedded object with this kernel's layout. Nothing is attached yet.
/// `whole_fault_windows`: see `probes::whole_fault_windows`.
pub fn load(
    layout: &KernelLayout,
    ring_buffer_bytes: u32,
    wakeup: Wakeup,
    whole_fault_windows: bool,
) -> Result<Ebpf, IngestError> {
    // 0: the kernel's own rule, a wake-up whenever the daemon has caught up.
    let wakeup_bytes: u64 = match wakeup {
        Wakeup::Batch => u64::from(ring_buffer_bytes / 16),
        Wakeup::EveryRecord => 0,
    };
    // The daemon's own address space is left out in the kernel.
    let observer_tgid: u32 = std::process::id();
    EbpfLoader::new()
        .override_global("LAYOUT", layout, true)
        .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
        .override_global("OBSERVER_TGID", &observer_tgid, true)
        .override_global("WHOLE_FAULT_WINDOWS", &u32::from(whole_fault_windows), true)
        .map_max_entries("EVENTS", ring_buffer_bytes)
        .load(crate::EBPF_OBJECT)
        .map_err(IngestError::Load)
}

/// The kernel's per-CPU counters of records produced and lost.
pub struct KernelCounters {
    map: Mutex<PerCpuArray<MapData, u64>>,
}

impl KernelCounters {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, IngestError> {
        let map = ebpf.take_map("COUNTERS").ok_or(IngestError::MissingMap("COUNTERS"))?;
        let map = PerCpuArray::try_from(map).map_err(|error| IngestError::Map { name: "COUNTERS", error })?;
        Ok(Self { map: Mutex::new(map) })
    }

    /// One value per possible CPU for a `counter` slot.
    pub fn per_cpu(&self, slot: u32) -> Vec<u64> {
        let map = self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        map.get(&slot, 0).map(|per_cpu| per_cpu.to_vec()).unwrap_or_default()
    }

    pub fn sum(&self, slot: u32) -> u64 {
        self.per_cpu(slot).iter().sum()
    }
}

/// Per CPU, after detaching and draining: records produced by the kernel
/// side against records received plus records lost to a full ring buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct CpuBalance {
    pub cpu: usize,
    pub produced: u64,
    pub received: u64,
    pub lost: u64,
}

impl CpuBalance {
    pub fn balanced(&self) -> bool {
        self.produced == self.received + self.lost
    }
}

/// The balance of every CPU that produced or received anything.
pub fn balance(produced: &[u64], lost: &[u64], received: &[u64]) -> Vec<CpuBalance> {
    let cpus = produced.len().max(lost.len()).max(received.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    (0..cpus)
        .map(|cpu| CpuBalance {
            cpu,
            produced: at(produced, cpu),
            received: at(received, cpu),
            lost: at(lost, cpu),
        })
        .filter(|b| b.produced + b.received + b.lost > 0)
        .collect()
}

pub fn take_events(ebpf: &mut Ebpf) -> Result<AsyncFd<RingBuf<MapData>>, IngestError> {
    let map = ebpf.take_map("EVENTS").ok_or(IngestError::MissingMap("EVENTS"))?;
    let ring = RingBuf::try_from(map).map_err(|error| IngestError::Map { name: "EVENTS", error })?;
    register(ring)
}

fn register<T: std::os::fd::AsRawFd>(inner: T) -> Result<AsyncFd<T>, IngestError> {
    // SAFETY: `inner` owns its file descriptor, and the AsyncFd owns `inner`,
    // so the descriptor stays open for as long as it is registered.
    unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| IngestError::Poll(e.into_parts().1))
}

/// What the ingest loop feeds.
pub struct Sink {
    pub aggregator: Arc<Mutex<Aggregator>>,
    /// Raw records for `mapcountd replay`, when recording.
    pub record: Option<record::Recording>,
    /// One drained batch, and (timestamp, offset, length) per record.
    batch: Vec<u8>,
    index: Vec<(u64, usize, usize)>,
}

impl Sink {
    pub fn new(aggregator: Arc<Mutex<Aggregator>>, record: Option<record::Recording>) -> Self {
        Self { aggregator, record, batch: Vec::with_capacity(1 << 20), index: Vec::with_capacity(1 << 14) }
    }

    /// Decodes and aggregates one record (and records it).
    pub fn take(&mut self, aggregator: &mut Aggregator, bytes: &[u8]) -> Result<(), IngestError> {
        match self.record.as_mut().map(|r| r.write(bytes)) {
            Some(Ok(size)) => aggregator.metrics().record_bytes.inc_by(size),
            Some(Err(stop)) => self.stop_recording(aggregator, stop),
            None => {}
        }
        match decode(bytes) {
            Ok(event) => aggregator.apply(&event),
            Err(e) => {
                aggregator.metrics().events_undecodable.inc();
                tracing::warn!(error = %e, "undecodable ring-buffer record");
            }
        }
        Ok(())
    }

    /// Everything that is in the ring buffer now, in the order the kernel
    /// read the folios' counters.
    ///
    /// The ring buffer orders records by reservation, and a probe reserves
    /// before it reads; two CPUs working on one folio can therefore deliver
    /// their records in the opposite order to their reads. Sorting a batch
    /// by the read's timestamp undoes that (records without a timestamp
    /// keep their place relative to each other).
    pub fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<(), IngestError> {
        self.batch.clear();
        self.index.clear();
        while let Some(record) = ring.next() {
            self.index.push((timestamp(&record), self.batch.len(), record.len()));
            self.batch.extend_from_slice(&record);
        }
        self.index.sort_by_key(|&(ts, offset, _)| (ts, offset));
        let aggregator = Arc::clone(&self.aggregator);
        let mut aggregator = aggregator.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let batch = std::mem::take(&mut self.batch);
        let index = std::mem::take(&mut self.index);
        let result = index
            .iter()
            .try_for_each(|&(_, offset, len)| self.take(&mut aggregator, &batch[offset..offset + len]));
        self.batch = batch;
        self.index = index;
        result?;
        drop(aggregator);
        self.flush_recording();
        Ok(())
    }

    /// After each batch: the batch reaches the record file whole, or the
    /// recording stops.
    pub fn flush_recording(&mut self) {
        if let Some(Err(stop)) = self.record.as_mut().map(record::Recording::flush) {
            let aggregator = Arc::clone(&self.aggregator);
            let aggregator = aggregator.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            self.stop_recording(&aggregator, stop);
        }
    }

    /// The recording ends; the daemon goes on without it.
    fn stop_recording(&mut self, aggregator: &Aggregator, stop: record::Stop) {
        let metrics = aggregator.metrics();
        metrics.record_stops.with_label_values(&[stop.label()]).inc();
        metrics.recording.set(0);
        tracing::error!("recording stopped, the daemon goes on: {stop}");
        if let Some(recording) = self.record.take()
            && let Err(e) = recording.finish()
        {
            tracing::error!(error = %e, "cannot cut the record file back to its last whole batch");
        }
    }

    /// At the daemon's end: what was recorded reaches the file.
    pub fn finish_recording(&mut self) {
        if let Some(recording) = self.record.take()
            && let Err(e) = recording.finish()
        {
            tracing::error!(error = %e, "cannot finish the record file");
        }
    }
}

/// When the kernel read the counters the record carries; 0 for records
/// that carry none.
fn timestamp(record: &[u8]) -> u64 {
    let at = |offset: usize| {
        record.get(offset..offset + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
    };
    match record.first() {
        Some(&t) if t == EventType::Rmap as u8 || t == EventType::WriteFault as u8 => {
            at(std::mem::offset_of!(Event, timestamp_ns))
        }
        Some(&t) if t == EventType::Fork as u8 => at(std::mem::offset_of!(ForkEvent, timestamp_ns)),
        Some(&t) if t == EventType::Move as u8 => at(std::mem::offset_of!(MoveEvent, timestamp_ns)),
        Some(&t) if t == EventType::Teardown as u8 => at(std::mem::offset_of!(TeardownEvent, timestamp_ns)),
        _ => 0,
    }
}

/// Drains the ring buffer for as long as the daemon runs.
pub async fn run(
    events: &mut AsyncFd<RingBuf<MapData>>,
    sink: &mut Sink,
    wakeup: Wakeup,
) -> Result<(), IngestError> {
    tracing::debug!(fd = events.get_ref().as_raw_fd(), "draining the event ring buffer");
    // With batched wake-ups the kernel stays quiet below its threshold:
    // the timer bounds how stale the metrics get.
    let mut timer = tokio::time::interval(BATCH_DRAIN_INTERVAL);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard?;
                sink.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = timer.tick(), if wakeup == Wakeup::Batch => sink.drain(events.get_mut())?,
        }
    }
}

/// How often the daemon drains the ring buffer without being woken.
pub const BATCH_DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Forwards the programs' aya-log records to `tracing` for as long as the daemon runs.
pub async fn run_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> Result<(), IngestError> {
    let mut logger = register(logger)?;
    loop {
        let mut guard = logger.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_is_per_cpu() {
        // CPU 0 balanced with losses, CPU 1 idle (left out), CPU 2 missing
        // a record, CPU 3 only known from what was received.
        let produced = [10, 0, 5];
        let lost = [4, 0, 0];
        let received = [6, 0, 4, 2];
        let b = balance(&produced, &lost, &received);
        assert_eq!(b.iter().map(|b| b.cpu).collect::<Vec<_>>(), [0, 2, 3]);
        assert_eq!(b.iter().map(CpuBalance::balanced).collect::<Vec<_>>(), [true, false, false]);
    }
}
