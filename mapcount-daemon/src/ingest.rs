//! Draining the ring buffers: records decoded, sorted by when the kernel
//! read their counters, aggregated, and recorded when asked.

use std::{
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, RingBuf};
use mapcount_common::{Event, EventType, ForkEvent, MoveEvent, ScanRefusalEvent, TeardownEvent};
use tokio::io::unix::AsyncFd;

use crate::{
    aggregate::Aggregator,
    config::Wakeup,
    decode::decode,
    object::{KernelSampling, ObjectError, register},
    record,
};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("polling the ring buffer: {0}")]
    Poll(#[from] std::io::Error),
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

/// What the ingest loop feeds.
pub struct Sink {
    pub aggregator: Arc<Mutex<Aggregator>>,
    /// Raw records for `mapcountd replay`, when recording.
    pub record: Option<record::Recording>,
    /// One drained batch, and (timestamp, offset, length) per record.
    batch: Vec<u8>,
    index: Vec<(u64, usize, usize)>,
    /// No record of the batch so far has an earlier timestamp than the
    /// one before it.
    in_order: bool,
    /// The kernel side's sample, kept equal to the table's after each batch.
    sampling: Option<KernelSampling>,
}

impl Sink {
    pub fn new(aggregator: Arc<Mutex<Aggregator>>, record: Option<record::Recording>) -> Self {
        Self {
            aggregator,
            record,
            batch: Vec::with_capacity(1 << 20),
            index: Vec::with_capacity(1 << 14),
            in_order: true,
            sampling: None,
        }
    }

    /// Tracing a kernel: its sample follows the table's.
    pub fn with_kernel_sampling(mut self, sampling: KernelSampling) -> Self {
        self.sampling = Some(sampling);
        self
    }

    /// Decodes and aggregates one record (and records it).
    pub fn ingest(&mut self, aggregator: &mut Aggregator, bytes: &[u8]) -> Result<(), IngestError> {
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
            self.take(&record);
        }
        self.ingest_batch()
    }

    /// [`Sink::drain`] of records at hand instead of a ring buffer's: the
    /// same copy, sort and aggregation (the ingest benchmark feeds it a
    /// ring buffer's worth at a time).
    pub fn drain_records<'r>(
        &mut self,
        records: impl IntoIterator<Item = &'r [u8]>,
    ) -> Result<(), IngestError> {
        self.batch.clear();
        self.index.clear();
        for record in records {
            self.take(record);
        }
        self.ingest_batch()
    }

    /// Copies a record out of the ring buffer into the batch.
    fn take(&mut self, record: &[u8]) {
        let ts = timestamp(record);
        self.in_order &= self.index.last().is_none_or(|&(last, _, _)| ts >= last);
        self.index.push((ts, self.batch.len(), record.len()));
        self.batch.extend_from_slice(record);
    }

    /// Aggregates the batch in timestamp order (see [`Sink::drain`]).
    fn ingest_batch(&mut self) -> Result<(), IngestError> {
        // Most batches arrive in order: the sort would change nothing.
        if !std::mem::replace(&mut self.in_order, true) {
            self.index.sort_by_key(|&(ts, offset, _)| (ts, offset));
        }
        let aggregator = Arc::clone(&self.aggregator);
        let mut aggregator = aggregator.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let batch = std::mem::take(&mut self.batch);
        let index = std::mem::take(&mut self.index);
        let result = index
            .iter()
            .try_for_each(|&(_, offset, len)| self.ingest(&mut aggregator, &batch[offset..offset + len]));
        self.batch = batch;
        self.index = index;
        result?;
        if let Some(sampling) = &mut self.sampling {
            // Until the kernel side knows, it sends what the daemon drops
            // (mapcount_events_sampled_out_total).
            sampling.follow(aggregator.table().sample_shift())?;
        }
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
        Some(&t) if t == EventType::ScanRefusal as u8 => {
            at(std::mem::offset_of!(ScanRefusalEvent, timestamp_ns))
        }
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
    use mapcount_common::{FolioKind, Level, RmapOp};

    use super::*;
    use crate::{decode::encode, metrics::Metrics};

    /// An order-0 anonymous folio's rmap record, read at `timestamp_ns`.
    fn rmap(op: RmapOp, timestamp_ns: u64) -> Vec<u8> {
        let mapcount = if op == RmapOp::Remove { 0 } else { -1 };
        encode(&Event {
            timestamp_ns,
            mapcount,
            ..Event::rmap(op, Level::Pte, FolioKind::Anon, 0, 0xffff_ea00_0000_0040, 1, 0x7f00_0000_0000, 1)
        })
    }

    fn new_sink() -> Sink {
        Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 16))), None)
    }

    #[test]
    fn a_batch_is_aggregated_in_timestamp_order() {
        // The unmap's record reached the ring buffer first, but the kernel
        // read the counters for the map first: mapped, then unmapped.
        let mut sink = new_sink();
        let (add, remove) = (rmap(RmapOp::AddNew, 1), rmap(RmapOp::Remove, 2));
        sink.drain_records([remove.as_slice(), add.as_slice()]).unwrap();
        assert_eq!(sink.aggregator.lock().unwrap().table().len(), 0, "the folio came and went");
        // Taken as delivered, the unmap would find nothing and the map
        // would leave the folio behind.
        let mut sink = new_sink();
        let (add, remove) = (rmap(RmapOp::AddNew, 2), rmap(RmapOp::Remove, 1));
        sink.drain_records([remove.as_slice(), add.as_slice()]).unwrap();
        assert_eq!(sink.aggregator.lock().unwrap().table().len(), 1);
    }

    #[test]
    fn an_ordered_batch_keeps_its_order_and_the_next_batch_is_sorted_again() {
        let mut sink = new_sink();
        let (add, remove) = (rmap(RmapOp::AddNew, 1), rmap(RmapOp::Remove, 2));
        sink.drain_records([add.as_slice(), remove.as_slice()]).unwrap();
        assert_eq!(sink.aggregator.lock().unwrap().table().len(), 0);
        let (add, remove) = (rmap(RmapOp::AddNew, 3), rmap(RmapOp::Remove, 4));
        sink.drain_records([remove.as_slice(), add.as_slice()]).unwrap();
        assert_eq!(sink.aggregator.lock().unwrap().table().len(), 0);
    }

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
