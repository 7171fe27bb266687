//! What the host lets the daemon use: open files and memory. Both are
//! read at start, so that the limits the daemon sets itself (connections,
//! table size) stay inside them and it degrades instead of failing.

use std::path::{Path, PathBuf};

/// Descriptors kept free for everything that is not an HTTP connection:
/// the BPF programs, maps and links (one each, about 60), the record
/// file, the configuration file on reload.
const RESERVED_DESCRIPTORS: u64 = 128;

/// Raises the soft open-file limit to the hard one, as Go programs do by
/// default: systemd gives services a soft limit of 1024 for the sake of
/// select(2), which mapcountd does not use. Returns the soft limit now
/// in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur);
        }
    }
    Ok(limit.rlim_cur)
}

/// The most HTTP connections that fit in `open_files` with room for the
/// rest of the daemon: half of what is left after the reserve.
pub fn connections_that_fit(open_files: u64) -> usize {
    usize::try_from(open_files.saturating_sub(RESERVED_DESCRIPTORS) / 2).unwrap_or(usize::MAX).max(1)
}

/// The memory limit of the cgroup this process runs in (`MemoryMax=` of
/// its systemd unit), cgroup v2 or v1; `None` when unlimited or unknown.
pub fn cgroup_memory_limit() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    memory_limit_from(&membership, Path::new("/sys/fs/cgroup"))
}

fn memory_limit_from(membership: &str, root: &Path) -> Option<u64> {
    // The tightest limit on the way up: a slice's limit holds for its services.
    let tightest = |base: PathBuf, path: &str, file: &str, unlimited_above: u64| {
        let mut dir = base.join(path);
        let mut tightest: Option<u64> = None;
        loop {
            let limit =
                std::fs::read_to_string(dir.join(file)).ok().and_then(|t| t.trim().parse::<u64>().ok());
            if let Some(limit) = limit.filter(|&l| l < unlimited_above) {
                tightest = Some(tightest.map_or(limit, |t| t.min(limit)));
            }
            if dir == base || !dir.pop() {
                return tightest;
            }
        }
    };
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        let limit = if controllers.is_empty() {
            // v2: "max" when unlimited, which does not parse.
            tightest(root.to_path_buf(), path, "memory.max", u64::MAX)
        } else if controllers.split(',').any(|c| c == "memory") {
            // v1: unlimited is a huge number, rounded to the page size.
            tightest(root.join("memory"), path, "memory.limit_in_bytes", 1 << 62)
        } else {
            continue;
        };
        if limit.is_some() {
            return limit;
        }
    }
    None
}

/// Heap bytes one live folio costs, with room above the measured 90 to
/// 100 (entry, hash bucket, index; BENCHMARKS.md) for the hash table's
/// growth by doubling.
pub const BYTES_PER_FOLIO: u64 = 160;

/// The share of a memory limit the folio table may take: the rest is for
/// the batch buffers, the metrics and the runtime.
pub const TABLE_SHARE_OF_LIMIT: u64 = 2;

/// How many folios the table may hold under `memory_limit`, at most `asked`.
pub fn table_size_under(memory_limit: Option<u64>, asked: usize) -> usize {
    match memory_limit {
        Some(limit) => {
            let fits = limit / TABLE_SHARE_OF_LIMIT / BYTES_PER_FOLIO;
            asked.min(usize::try_from(fits).unwrap_or(usize::MAX)).max(1)
        }
        None => asked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v2_and_v1_limits() {
        let root = std::env::temp_dir().join(format!("mapcount-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(root.join("system.slice/mapcountd.service")).unwrap();
        std::fs::create_dir_all(root.join("memory/test")).unwrap();
        std::fs::write(root.join("system.slice/mapcountd.service/memory.max"), "536870912\n").unwrap();
        assert_eq!(memory_limit_from("0::/system.slice/mapcountd.service\n", &root), Some(512 << 20));
        std::fs::write(root.join("system.slice/mapcountd.service/memory.max"), "max\n").unwrap();
        assert_eq!(memory_limit_from("0::/system.slice/mapcountd.service\n", &root), None);
        std::fs::write(root.join("memory/test/memory.limit_in_bytes"), "67108864\n").unwrap();
        assert_eq!(memory_limit_from("4:cpu:/\n7:memory:/test\n0::/\n", &root), Some(64 << 20));
        std::fs::write(root.join("memory/test/memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(memory_limit_from("7:memory:/test\n", &root), None);
        // A slice's limit holds for the services in it.
        std::fs::write(root.join("system.slice/memory.max"), "1073741824\n").unwrap();
        assert_eq!(memory_limit_from("0::/system.slice/mapcountd.service\n", &root), Some(1 << 30));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_table_shrinks_to_fit_the_limit() {
        assert_eq!(table_size_under(None, 1 << 20), 1 << 20);
        // 512 MiB holds the default million folios.
        assert_eq!(table_size_under(Some(512 << 20), 1 << 20), 1 << 20);
        assert_eq!(table_size_under(Some(64 << 20), 1 << 20), (64 << 20) / 2 / 160);
    }

    #[test]
    fn connections_leave_room_for_the_rest() {
        assert_eq!(connections_that_fit(1024), 448);
        assert_eq!(connections_that_fit(10), 1);
    }
}
