//! The Prometheus registry and every metric the daemon exports.
//!
//! Labels are bounded: op, level, kind, order and outcome take a handful of
//! values each; nothing carries a pid or an address.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

pub struct Metrics {
    pub registry: Registry,
    pub rmap_calls: IntCounterVec,
    pub rmap_pages: IntCounterVec,
    pub write_faults: IntCounterVec,
    pub write_fault_duration: Histogram,
    pub events: IntCounterVec,
    pub events_undecodable: IntCounter,
    pub probe_attached: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub kernel_info: IntGaugeVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only fails on an invalid metric name or duplicate registration: a bug, found by the tests.
    r.expect("metric definitions are static and valid")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let rmap_labels = &["op", "level", "kind", "order"];
        let rmap_calls = must(IntCounterVec::new(
            Opts::new(
                "mapcount_rmap_calls_total",
                "Calls of the rmap add/remove functions, by operation, page-table level, folio kind and folio order.",
            ),
            rmap_labels,
        ));
        let rmap_pages = must(IntCounterVec::new(
            Opts::new(
                "mapcount_rmap_pages_total",
                "Pages mapped (add, add_new) or unmapped (remove) by rmap calls; a PMD mapping counts 512 pages.",
            ),
            rmap_labels,
        ));
        let write_faults = must(IntCounterVec::new(
            Opts::new(
                "mapcount_cow_faults_total",
                "Write faults on present, write-protected PTEs (do_wp_page) by outcome: reuse, copy, copy_zero_page, shared, other.",
            ),
            &["outcome"],
        ));
        let write_fault_duration = must(Histogram::with_opts(
            HistogramOpts::new(
                "mapcount_cow_fault_duration_seconds",
                "Time from do_wp_page entry to return.",
            )
            .buckets(prometheus::exponential_buckets(1e-6, 4.0, 10).expect("valid buckets")),
        ));
        let events = must(IntCounterVec::new(
            Opts::new("mapcount_events_total", "Events received from the kernel, by type."),
            &["type"],
        ));
        let events_undecodable = must(IntCounter::new(
            "mapcount_events_undecodable_total",
            "Ring-buffer records that did not decode (wrong size or unknown values); should stay 0.",
        ));
        let probe_attached = must(IntGaugeVec::new(
            Opts::new(
                "mapcount_probe_attached",
                "1 if the probe is attached, 0 if its function is missing or attaching failed.",
            ),
            &["probe", "function", "mode"],
        ));
        let build_info = must(IntGaugeVec::new(
            Opts::new("mapcount_build_info", "Always 1; labels describe the mapcountd build."),
            &["version"],
        ));
        let kernel_info = must(IntGaugeVec::new(
            Opts::new("mapcount_kernel_info", "Always 1; labels describe the running kernel."),
            &["release"],
        ));
        for c in [&rmap_calls, &rmap_pages, &write_faults, &events] {
            must(registry.register(Box::new(c.clone())));
        }
        must(registry.register(Box::new(write_fault_duration.clone())));
        must(registry.register(Box::new(events_undecodable.clone())));
        for g in [&probe_attached, &build_info, &kernel_info] {
            must(registry.register(Box::new(g.clone())));
        }
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Self {
            registry,
            rmap_calls,
            rmap_pages,
            write_faults,
            write_fault_duration,
            events,
            events_undecodable,
            probe_attached,
            build_info,
            kernel_info,
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
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
}

impl<F> ReadAtScrape<F>
where
    F: Fn() -> Vec<u64> + Send + Sync,
{
    /// `read` returns one value per entry of `labels`.
    pub fn new(name: &str, help: &str, label: &str, labels: &'static [&'static str], read: F) -> Self {
        let desc = Desc::new(name.to_owned(), help.to_owned(), vec![label.to_owned()], Default::default())
            .expect("valid metric description");
        Self { desc, labels, read }
    }
}

impl<F> Collector for ReadAtScrape<F>
where
    F: Fn() -> Vec<u64> + Send + Sync,
{
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let counter = IntCounterVec::new(
            Opts::new(self.desc.fq_name.clone(), self.desc.help.clone()),
            &[self.desc.variable_labels[0].as_str()],
        )
        .expect("valid metric");
        for (label, value) in self.labels.iter().zip((self.read)()) {
            counter.with_label_values(&[*label]).inc_by(value);
        }
        counter.collect()
    }
}
