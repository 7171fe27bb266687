//! Which cgroup a process is in, for the per-cgroup memory figures: the
//! cgroup v2 path (the `0::` line of `/proc/PID/cgroup`), read again when
//! older than [`REREAD_AFTER`] (processes move: systemd moves what it
//! starts), and forgotten when the process maps nothing.

use std::{
    fs,
    sync::Arc,
    time::{Duration, Instant},
};

use rustc_hash::FxHashMap as HashMap;

/// The label of processes whose cgroup cannot be read: gone by the time
/// of the scrape, or seen in a replayed record (whose processes are not
/// this host's).
pub const UNKNOWN: &str = "unknown";

/// How stale a process's cgroup may be: one read per process per this
/// long, whatever the scrape interval.
pub const REREAD_AFTER: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct CgroupNames {
    /// Reads /proc; off when replaying a record.
    live: bool,
    by_tgid: HashMap<u32, (Arc<str>, Instant)>,
}

impl CgroupNames {
    pub fn live() -> Self {
        Self { live: true, by_tgid: HashMap::default() }
    }

    pub fn name(&mut self, tgid: u32) -> Arc<str> {
        if !self.live {
            return Arc::from(UNKNOWN);
        }
        let now = Instant::now();
        let fresh = |(_, read_at): &(Arc<str>, Instant)| now.duration_since(*read_at) < REREAD_AFTER;
        match self.by_tgid.get(&tgid) {
            Some(entry) if fresh(entry) => entry.0.clone(),
            _ => {
                let name: Arc<str> = Arc::from(read(tgid).as_deref().unwrap_or(UNKNOWN));
                self.by_tgid.insert(tgid, (name.clone(), now));
                name
            }
        }
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
