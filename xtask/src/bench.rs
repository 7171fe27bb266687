//! The kernel-side figures of `cargo xtask bench`, read from one boot's
//! console: start-up, loop timings under each tracer, lossless rates.

use std::collections::BTreeMap;

/// `key=value` of a console line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn number(line: &str, key: &str) -> Option<f64> {
    field(line, key)?.parse().ok()
}

pub const TRACERS: &[&str] = &[
    "none",
    "mapcountd-fentry",
    "mapcountd-kprobe",
    "mapcountd-fentry-running",
    "mapcountd-fentry-every-record",
    "bpftrace-empty",
    "bpftrace-count",
];
pub const LOOPS: &[&str] = &["faults", "fork_cow", "thp"];

pub struct VmFigures {
    /// exec to /-/ready, milliseconds, in boot order.
    pub startup_ms: Vec<f64>,
    /// (tracer, loop) -> loop times over the rounds, nanoseconds.
    pub loop_ns: BTreeMap<(String, String), Vec<f64>>,
    /// loop -> records mapcountd produced during it (fentry runs, smallest).
    pub loop_events: BTreeMap<String, f64>,
    pub rates: Vec<RateStep>,
    pub probes: String,
    pub tracer_errors: Vec<String>,
}

pub struct RateStep {
    pub ring: u64,
    pub target: u64,
    pub seconds: f64,
    pub produced: u64,
    pub received: u64,
    pub lost: u64,
    pub cpus: usize,
    pub unbalanced: usize,
}

impl RateStep {
    pub fn achieved(&self) -> f64 {
        self.received as f64 / self.seconds
    }
}

pub fn parse(console: &str) -> VmFigures {
    let mut f = VmFigures {
        startup_ms: Vec::new(),
        loop_ns: BTreeMap::new(),
        loop_events: BTreeMap::new(),
        rates: Vec::new(),
        probes: String::new(),
        tracer_errors: Vec::new(),
    };
    let mut rates: BTreeMap<(std::cmp::Reverse<u64>, u64), RateStep> = BTreeMap::new();
    for line in console.lines() {
        if let Some(rest) = line.strip_prefix("MAPCOUNT-READY ") {
            if let Some(ms) = number(rest, "ms") {
                f.startup_ms.push(ms);
            }
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-BENCH-PROBES ") {
            f.probes = rest.to_owned();
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-COST ") {
            let (Some(tracer), Some(name), Some(ns)) =
                (field(rest, "tracer"), field(rest, "loop"), number(rest, "ns"))
            else {
                continue;
            };
            f.loop_ns.entry((tracer.to_owned(), name.to_owned())).or_default().push(ns);
            if tracer == "mapcountd-fentry"
                && let Some(events) = number(rest, "events")
            {
                let e = f.loop_events.entry(name.to_owned()).or_insert(f64::INFINITY);
                *e = e.min(events);
            }
        } else if let Some(rest) = line.strip_prefix("MAPCOUNT-RATE ") {
            let Some(target) = number(rest, "target").map(|t| t as u64) else { continue };
            let ring = number(rest, "ring").map_or(0, |r| r as u64);
            let step = rates.entry((std::cmp::Reverse(ring), target)).or_insert(RateStep {
                ring,
                target,
                seconds: 10.0,
                produced: 0,
                received: 0,
                lost: 0,
                cpus: 0,
                unbalanced: 0,
            });
            if rest.contains("event accounting") {
                step.cpus += 1;
                step.produced += number(rest, "produced").unwrap_or(0.0) as u64;
                step.received += number(rest, "received").unwrap_or(0.0) as u64;
                step.lost += number(rest, "lost").unwrap_or(0.0) as u64;
                if field(rest, "balanced") != Some("true") {
                    step.unbalanced += 1;
                }
            }
        } else if line.starts_with("tracer ") || line.starts_with("MAPCOUNT-BENCH-KILLED ") {
            f.tracer_errors.push(line.to_owned());
        }
    }
    f.rates = rates.into_values().collect();
    f
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl VmFigures {
    fn best(&self, tracer: &str, name: &str) -> f64 {
        self.loop_ns.get(&(tracer.to_owned(), name.to_owned())).map_or(f64::NAN, |v| min(v))
    }

    /// Extra nanoseconds per traced call: (traced - untraced) / calls.
    pub fn cost_per_event(&self, tracer: &str, name: &str) -> f64 {
        let events = self.loop_events.get(name).copied().unwrap_or(f64::NAN);
        (self.best(tracer, name) - self.best("none", name)) / events
    }

    /// Markdown for BENCHMARKS.md.
    pub fn report(&self) -> String {
        let mut out = String::new();
        out.push_str("| loop | records | none | mapcountd fentry | mapcountd kprobe | mapcountd fentry, daemon running | same, a wake-up per record | empty program (kprobe) | bpftrace counting (kprobe) |\n|---|---|---|---|---|---|---|---|---|\n");
        for name in LOOPS {
            let none = self.best("none", name);
            let cell = |tracer: &str| {
                let t = self.best(tracer, name);
                if tracer == "none" {
                    format!("{:.1} ms", t / 1e6)
                } else {
                    format!(
                        "{:.1} ms (x{:.3}; {:+.0} ns/record)",
                        t / 1e6,
                        t / none,
                        self.cost_per_event(tracer, name)
                    )
                }
            };
            out.push_str(&format!(
                "| {name} | {:.0} | {} |\n",
                self.loop_events.get(*name).copied().unwrap_or(f64::NAN),
                TRACERS.iter().map(|t| cell(t)).collect::<Vec<_>>().join(" | ")
            ));
        }
        let spreads: Vec<String> = LOOPS
            .iter()
            .map(|name| {
                let rounds = self.loop_ns.get(&("none".to_owned(), (*name).to_owned()));
                let slowest = rounds.map_or(f64::NAN, |v| v.iter().copied().fold(0.0, f64::max));
                format!("{name} x{:.2}", slowest / self.best("none", name))
            })
            .collect();
        out.push_str(&format!(
            "\nThe untraced loop's slowest round against its fastest, in this boot: {}. Differences between\n\
             tracers smaller than that are within the noise of TCG on a shared host.\n",
            spreads.join(", ")
        ));
        out
    }

    /// Per loop: mapcountd's cost per record as a multiple of the empty program's.
    pub fn multiples_of_empty(&self, tracer: &str) -> Vec<(String, f64)> {
        LOOPS
            .iter()
            .map(|name| {
                (
                    name.to_string(),
                    self.cost_per_event(tracer, name) / self.cost_per_event("bpftrace-empty", name),
                )
            })
            .collect()
    }

    /// Whether mapcountd (fentry, the default) slows every loop no more than bpftrace counting does.
    pub fn no_slower_than_bpftrace(&self, tracer: &str) -> bool {
        LOOPS.iter().all(|name| self.best(tracer, name) <= self.best("bpftrace-count", name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_console() {
        let console = "MAPCOUNT-READY ms=812 pid=77\n\
            MAPCOUNT-COST tracer=none round=1 loop=faults ns=1000 events=0\n\
            MAPCOUNT-COST tracer=mapcountd-fentry round=1 loop=faults ns=1500 events=100\n\
            MAPCOUNT-COST tracer=bpftrace-empty round=1 loop=faults ns=1100 events=0\n\
            MAPCOUNT-RATE ring=4096 target=1000 2026 INFO mapcountd: event accounting cpu=0 produced=7 received=5 lost=2 balanced=true\n\
            MAPCOUNT-RATE ring=4096 target=1000 2026 INFO mapcountd: event accounting cpu=1 produced=3 received=3 lost=0 balanced=true\n";
        let f = parse(console);
        assert_eq!(f.startup_ms, [812.0]);
        assert_eq!(f.cost_per_event("mapcountd-fentry", "faults"), 5.0);
        assert_eq!(f.multiples_of_empty("mapcountd-fentry")[0].1, 5.0);
        let step = &f.rates[0];
        assert_eq!(
            (step.ring, step.target, step.produced, step.received, step.lost, step.cpus),
            (4096, 1000, 10, 8, 2, 2)
        );
    }
}
