//! `mapcountd replay`: a record file through the same aggregation.

use std::{
    fs::File,
    io::BufReader,
    path::Path,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use mapcount_daemon::{aggregate::Aggregator, exposition::Scrape, ingest, metrics::Metrics, record, summary};

use crate::{
    run::{folio_table_memory_for_host, folio_table_size_for_host},
    settings,
};

pub(crate) fn replay(
    path: &Path,
    folio_table_memory: u64,
    folio_table_size: Option<usize>,
    report: bool,
) -> anyhow::Result<ExitCode> {
    let folio_table_memory = folio_table_memory_for_host(folio_table_memory);
    let folio_table_size = folio_table_size_for_host(
        folio_table_size.unwrap_or_else(|| settings::default_table_size(folio_table_memory)),
    );
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader =
        record::Reader::new(BufReader::new(file)).with_context(|| format!("{}", path.display()))?;
    let metrics = Arc::new(Metrics::new());
    let mut aggregator = Aggregator::new(Arc::clone(&metrics), folio_table_size);
    aggregator.set_table_memory(folio_table_memory);
    // Records are replayed in the order they were recorded: the live daemon
    // records each batch after sorting it.
    let mut sink =
        ingest::Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);
    let mut records = 0u64;
    while let Some(bytes) = reader.next_record().with_context(|| format!("{}", path.display()))? {
        sink.ingest(&mut aggregator, bytes)?;
        records += 1;
    }
    aggregator.publish_metrics();
    if report {
        print!("{}", summary::report(&Scrape::new(metrics.render())));
    } else {
        print!("{}", metrics.render());
    }
    eprintln!("replayed {records} records from {}", path.display());
    Ok(ExitCode::SUCCESS)
}
