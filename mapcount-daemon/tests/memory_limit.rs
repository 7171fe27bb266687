//! Under a cgroup memory limit (`MemoryMax=` in the unit) the folio
//! table's budget follows the limit: two million live small folios
//! replayed in 64 MiB are sampled, none evicted, the daemon is not killed,
//! and the scaled count of folios holds the two million within its stated
//! bound. The figures go to `target/tmp/memory-limit.txt` for `cargo xtask test`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "an integration test: a panic is a failed test, with its message"
)]

use std::{
    fs,
    io::BufWriter,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use mapcount_common::{Event, FolioKind, Level, RmapOp};
use mapcount_daemon::{decode::encode, record};

const LIMIT: u64 = 64 << 20;
const LIVE_FOLIOS: u64 = 2_000_000;

/// A memory cgroup to run in, below the one this test runs in (v1 or v2).
struct Cgroup {
    dir: PathBuf,
    /// The file that reports the highest usage.
    peak_file: &'static str,
}

impl Cgroup {
    fn create(limit: u64) -> Cgroup {
        let membership = fs::read_to_string("/proc/self/cgroup").unwrap();
        let name = format!("mapcount-memory-test-{}", std::process::id());
        for line in membership.lines() {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) =
                (fields.next().unwrap(), fields.next().unwrap(), fields.next().unwrap());
            let path = path.trim_start_matches('/');
            let (dir, limit_file, peak_file) = if controllers.split(',').any(|c| c == "memory") {
                (
                    Path::new("/sys/fs/cgroup/memory").join(path).join(&name),
                    "memory.limit_in_bytes",
                    "memory.max_usage_in_bytes",
                )
            } else if controllers.is_empty()
                && Path::new("/sys/fs/cgroup").join(path).join("memory.max").exists()
            {
                (Path::new("/sys/fs/cgroup").join(path).join(&name), "memory.max", "memory.peak")
            } else {
                continue;
            };
            if fs::create_dir(&dir).is_ok() && fs::write(dir.join(limit_file), limit.to_string()).is_ok() {
                return Cgroup { dir, peak_file };
            }
            let _ = fs::remove_dir(&dir);
        }
        panic!("cannot create a memory cgroup with a limit below this process's (v1 or v2): needs root");
    }

    fn peak(&self) -> u64 {
        fs::read_to_string(self.dir.join(self.peak_file))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Two million small anonymous folios faulted in and never unmapped.
fn write_record(path: &Path) {
    let file = BufWriter::with_capacity(1 << 20, fs::File::create(path).unwrap());
    let mut writer = record::Writer::new(file).unwrap();
    for i in 0..LIVE_FOLIOS {
        let (folio, mm, base) = (0xffff_ea00_0000_0000 + i * 64, 1 + i % 64, 0x7f00_0000_0000 + i * 4096);
        let event = Event {
            mapcount: 0,
            refcount: 2,
            ..Event::rmap(RmapOp::AddNew, Level::Pte, FolioKind::Anon, 0, folio, mm, base, 1)
        };
        writer.write(&encode(&event)).unwrap();
    }
    writer.flush().unwrap();
}

/// The value of one series, by its name and labels as rendered.
fn series(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok()).unwrap_or(f64::NAN)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0) as u64
}

#[test]
#[ignore = "creates a memory cgroup, which needs root: run through `cargo xtask test`"]
fn the_table_fits_a_cgroup_memory_limit() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let record = tmp.join("memory-limit.rec");
    write_record(&record);
    let cgroup = Cgroup::create(LIMIT);
    let procs = cgroup.dir.join("cgroup.procs");
    let mut replay = Command::new(env!("CARGO_BIN_EXE_mapcountd"));
    replay.arg("replay").arg(&record);
    // SAFETY: only a write to cgroupfs runs between fork and exec.
    unsafe {
        replay.pre_exec(move || fs::write(&procs, "0"));
    }
    let output = replay.output().unwrap();
    let peak = cgroup.peak();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let entries = metric(&stdout, "mapcount_folio_table_entries");
    let evictions = metric(&stdout, "mapcount_folio_table_evictions_total");
    let ratio = series(&stdout, "mapcount_folio_table_sampling_ratio");
    let scaled = series(&stdout, r#"mapcount_folios{kind="anon",order="0",value="scaled"}"#);
    let bound = series(&stdout, r#"mapcount_folios_error{kind="anon",order="0"}"#);
    let report = format!(
        "memory limit: mapcountd replay of {LIVE_FOLIOS} live small folios in a cgroup of {} MiB: {:?}; \
         table {entries} folios, {evictions} evicted; one small folio in {:.0} tracked, \
         {scaled} ± {bound} folios counted; peak memory {:.1} MiB\n{}\n",
        LIMIT >> 20,
        output.status,
        1.0 / ratio,
        peak as f64 / (1 << 20) as f64,
        stderr
            .lines()
            .find(|l| l.contains("folio table memory lowered"))
            .unwrap_or("(no line about the table)")
    );
    fs::write(tmp.join("memory-limit.txt"), &report).unwrap();
    fs::remove_file(&record).unwrap();
    assert!(output.status.success(), "{report}\n{stderr}");
    assert_eq!(evictions, 0, "{report}");
    assert!(ratio < 1.0 && entries < LIVE_FOLIOS, "{report}");
    assert!((scaled - LIVE_FOLIOS as f64).abs() <= bound, "{report}");
    // A useful bound: within 5% of the truth.
    assert!(bound > 0.0 && bound < LIVE_FOLIOS as f64 / 20.0, "{report}");
    assert!(peak < LIMIT, "{report}");
}
