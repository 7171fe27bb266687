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

/// The cgroup of process `tgid` as the figures name it, if it can be read.
pub fn read(tgid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok().map(|text| name_in(&text).to_owned())
}

/// The cgroup named in a `/proc/PID/cgroup` text: the cgroup v2 path; on a
/// host with only cgroup v1, the memory controller's; where no hierarchy
/// is mounted (the file is empty), the root, where every process is.
fn name_in(text: &str) -> &str {
    let v2 = text.lines().find_map(|l| l.strip_prefix("0::"));
    let memory_v1 = || {
        text.lines().find_map(|l| {
            let mut fields = l.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            controllers.split(',').any(|c| c == "memory").then_some(path)
        })
    };
    v2.or_else(memory_v1).unwrap_or("/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn cgroup_names() {
        use super::name_in;
        assert_eq!(name_in("0::/system.slice/redis.service\n"), "/system.slice/redis.service");
        assert_eq!(name_in("12:pids:/a\n5:memory:/b\n0::/c\n"), "/c");
        assert_eq!(name_in("12:pids:/a\n5:cpu,memory:/b\n"), "/b");
        assert_eq!(name_in(""), "/");
    }
}
