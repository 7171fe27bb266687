//! Events to metrics. Pure: no kernel, no I/O, so it is tested with
//! synthetic event streams.

use crate::{
    decode::{Decoded, kind_label, level_label, op_label, outcome_label},
    metrics::Metrics,
};

/// Folio orders as label values, without allocating per event.
const ORDER_LABELS: [&str; 32] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18",
    "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31",
];

fn order_label(order: u8) -> &'static str {
    ORDER_LABELS.get(order as usize).copied().unwrap_or("other")
}

pub struct Aggregator<'m> {
    metrics: &'m Metrics,
}

impl<'m> Aggregator<'m> {
    pub fn new(metrics: &'m Metrics) -> Self {
        Self { metrics }
    }

    pub fn apply(&mut self, event: &Decoded) {
        let m = self.metrics;
        match *event {
            Decoded::Rmap { op, level, kind, raw } => {
                m.events.with_label_values(&["rmap"]).inc();
                let labels = [op_label(op), level_label(level), kind_label(kind), order_label(raw.order)];
                m.rmap_calls.with_label_values(&labels).inc();
                m.rmap_pages.with_label_values(&labels).inc_by(u64::from(raw.nr_pages));
            }
            Decoded::WriteFault { outcome, raw, .. } => {
                m.events.with_label_values(&["write_fault"]).inc();
                m.write_faults.with_label_values(&[outcome_label(outcome)]).inc();
                m.write_fault_duration.observe(f64::from(raw.duration_ns) * 1e-9);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mapcount_common::{Event, EventType, FolioKind, Level, RmapOp, WriteFaultOutcome};

    use super::*;
    use crate::decode::{decode, encode};

    fn rmap(op: RmapOp, level: Level, kind: FolioKind, order: u8, nr_pages: u32) -> Decoded {
        let event = Event {
            event_type: EventType::Rmap as u8,
            op: op as u8,
            level: level as u8,
            kind: kind as u8,
            order,
            nr_pages,
            ..Event::ZERO
        };
        decode(&encode(&event)).unwrap()
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

    #[test]
    fn counts_calls_and_pages_per_label_set() {
        let metrics = Metrics::new();
        let mut agg = Aggregator::new(&metrics);
        for _ in 0..3 {
            agg.apply(&rmap(RmapOp::Add, Level::Pte, FolioKind::File, 0, 16));
        }
        agg.apply(&rmap(RmapOp::AddNew, Level::Pmd, FolioKind::Anon, 9, 512));
        agg.apply(&rmap(RmapOp::Remove, Level::Pmd, FolioKind::Anon, 9, 512));

        let calls = |l: [&str; 4]| metrics.rmap_calls.with_label_values(&l).get();
        let pages = |l: [&str; 4]| metrics.rmap_pages.with_label_values(&l).get();
        assert_eq!(calls(["add", "pte", "file", "0"]), 3);
        assert_eq!(pages(["add", "pte", "file", "0"]), 48);
        assert_eq!(calls(["add_new", "pmd", "anon", "9"]), 1);
        assert_eq!(pages(["remove", "pmd", "anon", "9"]), 512);
        assert_eq!(metrics.events.with_label_values(&["rmap"]).get(), 5);
    }

    #[test]
    fn counts_write_faults_by_outcome_with_durations() {
        let metrics = Metrics::new();
        let mut agg = Aggregator::new(&metrics);
        agg.apply(&write_fault(WriteFaultOutcome::Copy, 2_000));
        agg.apply(&write_fault(WriteFaultOutcome::Copy, 3_000));
        agg.apply(&write_fault(WriteFaultOutcome::Reuse, 1_000));
        assert_eq!(metrics.write_faults.with_label_values(&["copy"]).get(), 2);
        assert_eq!(metrics.write_faults.with_label_values(&["reuse"]).get(), 1);
        assert_eq!(metrics.write_fault_duration.get_sample_count(), 3);
        assert!((metrics.write_fault_duration.get_sample_sum() - 6e-6).abs() < 1e-12);
    }

    #[test]
    fn rendered_text_has_help_and_no_addresses() {
        let metrics = Metrics::new();
        let mut agg = Aggregator::new(&metrics);
        let mut event = Event {
            event_type: EventType::Rmap as u8,
            op: RmapOp::Add as u8,
            level: Level::Pte as u8,
            kind: FolioKind::Anon as u8,
            nr_pages: 1,
            ..Event::ZERO
        };
        event.folio = 0xffff_8880_1234_5678;
        event.mm = 0xffff_8880_8765_4321;
        agg.apply(&decode(&encode(&event)).unwrap());
        let text = metrics.render();
        assert!(text.contains("# HELP mapcount_rmap_calls_total"));
        assert!(text.contains(r#"mapcount_rmap_calls_total{kind="anon",level="pte",op="add",order="0"} 1"#));
        assert!(!text.contains("ffff8880") && !text.contains("18446612"), "kernel address leaked");
    }
}
