//! Reading mapcountd's own `/metrics` text back: the audit, the report and
//! `mapcountd top` work from a scrape, so they answer the same for a live
//! daemon, a saved scrape and a replayed record file.
//!
//! Only what mapcountd writes is parsed: one sample per line, label values
//! without commas or escaped quotes. Lines that do not parse are skipped.

use std::{collections::BTreeMap, time::Instant};

/// One sample of the text exposition: metric name, labels, value.
pub struct Sample<'a> {
    pub name: &'a str,
    labels: Vec<(&'a str, &'a str)>,
    pub value: f64,
}

impl<'a> Sample<'a> {
    pub fn label(&self, key: &str) -> Option<&'a str> {
        self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

/// The samples of `text` (Prometheus text format), comments left out.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let value = value.parse().ok()?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                let (key, value) = l.split_once('=')?;
                Some((key, value.strip_prefix('"')?.strip_suffix('"')?))
            })
            .collect();
        Some(Sample { name, labels, value })
    })
}

/// One scrape of a daemon's metrics and when it was taken.
pub struct Scrape {
    text: String,
    pub taken: Instant,
}

impl Scrape {
    pub fn new(text: String) -> Self {
        Self { text, taken: Instant::now() }
    }

    /// Whether the scrape has the metric at all (a probe that is not
    /// attached, or a kernel without the field, leaves some out).
    pub fn has(&self, name: &str) -> bool {
        samples(&self.text).any(|s| s.name == name)
    }

    /// The metric's samples whose labels match every `(key, value)`, summed.
    pub fn sum(&self, name: &str, matching: &[(&str, &str)]) -> f64 {
        samples(&self.text)
            .filter(|s| s.name == name && matching.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }

    /// The metric summed by the values of the labels `keys` (one key: a
    /// one-element vector per row).
    pub fn by(&self, name: &str, keys: &[&str]) -> BTreeMap<Vec<String>, f64> {
        let mut rows = BTreeMap::new();
        for s in samples(&self.text).filter(|s| s.name == name) {
            let key = keys.iter().map(|k| s.label(k).unwrap_or("").to_owned()).collect();
            *rows.entry(key).or_insert(0.0) += s.value;
        }
        rows
    }

    /// The largest value among the metric's samples, if it has any.
    pub fn max(&self, name: &str) -> Option<f64> {
        samples(&self.text).filter(|s| s.name == name).map(|s| s.value).reduce(f64::max)
    }

    /// The metric's samples with every label, for a table of its own.
    pub fn series(&self, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
        samples(&self.text)
            .filter(|s| s.name == name)
            .map(|s| (s.labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(), s.value))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP mapcount_cow_faults_total x\n\
        mapcount_cow_faults_total{kind=\"anon\",order=\"0\",outcome=\"copy\"} 3\n\
        mapcount_cow_faults_total{kind=\"anon\",order=\"9\",outcome=\"copy\"} 4\n\
        mapcount_cow_faults_total{kind=\"anon\",order=\"0\",outcome=\"reuse\"} 5\n\
        mapcount_forks_total 7\n\
        not a sample\n";

    #[test]
    fn sums_by_labels() {
        let scrape = Scrape::new(TEXT.to_owned());
        assert_eq!(scrape.sum("mapcount_cow_faults_total", &[("outcome", "copy")]), 7.0);
        assert_eq!(scrape.sum("mapcount_cow_faults_total", &[]), 12.0);
        assert_eq!(scrape.sum("mapcount_forks_total", &[]), 7.0);
        let by = scrape.by("mapcount_cow_faults_total", &["outcome"]);
        assert_eq!(by[&vec!["copy".to_owned()]], 7.0);
        assert_eq!(by[&vec!["reuse".to_owned()]], 5.0);
        assert_eq!(scrape.max("mapcount_cow_faults_total"), Some(5.0));
        assert!(!scrape.has("mapcount_folios"));
    }
}
