//! Any bytes as a ring-buffer record: decode, and aggregate what decodes.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mapcount_daemon::{aggregate::Aggregator, decode::decode, metrics::Metrics};

fuzz_target!(|data: &[u8]| {
    let mut aggregator = Aggregator::new(Arc::new(Metrics::new()), 64);
    // Several records in one input: a length byte before each.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (record, next) = tail.split_at(usize::from(len).min(tail.len()));
        if let Ok(event) = decode(record) {
            aggregator.apply(&event);
        }
        rest = next;
    }
    aggregator.publish_metrics();
});
