//! Which cgroup a process is in, for the per-cgroup memory figures: the
//! cgroup v2 path (the `0::` line of `/proc/PID/cgroup`), read once per
//! process and kept while it maps folios.

use std::{fs, sync::Arc};

use rustc_hash::FxHashMap as HashMap;

/// The label of processes whose cgroup cannot be read: gone by the time
/// of the scrape, or seen in a replayed record (whose processes are not
/// this host's).
pub const UNKNOWN: &str = "unknown";

#[derive(Default)]
pub struct CgroupNames {
    /// Reads /proc; off when replaying a record.
    live: bool,
    by_tgid: HashMap<u32, Arc<str>>,
}

impl CgroupNames {
    pub fn live() -> Self {
        Self { live: true, by_tgid: HashMap::default() }
    }

    pub fn name(&mut self, tgid: u32) -> Arc<str> {
        if !self.live {
            return Arc::from(UNKNOWN);
        }
        self.by_tgid
            .entry(tgid)
            .or_insert_with(|| Arc::from(read(tgid).as_deref().unwrap_or(UNKNOWN)))
            .clone()
    }

    /// Forgets processes `keep` does not name (they unmapped everything).
    pub fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        self.by_tgid.retain(|tgid, _| keep(*tgid));
    }
}

fn read(tgid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}
