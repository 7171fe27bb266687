//! mapcountd as the workload sees it: scrapes of /metrics and the rows of
//! /debug/folios.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use mapcount_common::{FolioRow, SmapsReport};

pub(crate) struct MetricsSource {
    pub(crate) address: String,
    pub(crate) path: String,
}

/// One scrape: (series, value) pairs of the text exposition format.
pub(crate) struct Scrape(pub(crate) Vec<(String, f64)>);

impl MetricsSource {
    pub(crate) fn get(&self, path: &str) -> anyhow::Result<String> {
        let mut stream =
            TcpStream::connect(&self.address).map_err(|e| anyhow!("connect {}: {e}", self.address))?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.address)?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header end"))?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(anyhow!("HTTP status: {}", head.lines().next().unwrap_or("")));
        }
        Ok(body.to_owned())
    }

    pub(crate) fn scrape(&self) -> anyhow::Result<Scrape> {
        Ok(Scrape::parse(&self.get(&self.path)?))
    }

    /// The daemon's view of one process's folios.
    pub(crate) fn folios_of(&self, pid: i32) -> anyhow::Result<Vec<FolioRow>> {
        let body = self.get(&format!("/debug/folios?tgid={pid}"))?;
        Ok(body.lines().filter(|l| !l.starts_with('#')).filter_map(FolioRow::parse).collect())
    }

    /// The daemon's figures for a process's pages in `[from, to)`. The
    /// debug views share a time budget: asked again too soon, it says retry.
    pub(crate) fn smaps_of(&self, pid: i32, from: usize, to: usize) -> anyhow::Result<SmapsReport> {
        let path = format!("/debug/smaps?tgid={pid}&from={from:#x}&to={to:#x}");
        let mut attempts = 0;
        let body = loop {
            match self.get(&path) {
                Err(e) if attempts < 20 && e.to_string().contains(" 429 ") => {
                    attempts += 1;
                    sleep(Duration::from_millis(100));
                }
                other => break other?,
            }
        };
        SmapsReport::parse(&body).ok_or_else(|| anyhow!("{path}: unreadable answer: {body}"))
    }

    /// Scrapes until the daemon has drained the events of what just ran.
    pub(crate) fn settled_scrape(&self) -> anyhow::Result<Scrape> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = self.scrape()?.sum("mapcount_events_total", &[]);
        loop {
            sleep(Duration::from_millis(500));
            let scrape = self.scrape()?;
            let now = scrape.sum("mapcount_events_total", &[]);
            // The scrape itself makes the daemon fault a few pages; a small
            // change is the noise floor, not pending work.
            if now - last < 64.0 || Instant::now() > deadline {
                return Ok(scrape);
            }
            last = now;
        }
    }
}

impl Scrape {
    pub(crate) fn parse(body: &str) -> Scrape {
        Scrape(
            body.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_owned(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// Sum over every series of `name` whose labels include all of `labels`.
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
                series_name == name
                    && labels.iter().all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }
}
