//! `--record` on a full disk: the recording stops with an error and a
//! metric, the daemon goes on, and the file keeps whole batches that
//! replay. On a real 1 MiB tmpfs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "an integration test: a panic is a failed test, with its message"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
};

use mapcount_common::{Event, FolioKind, Level, RmapOp};
use mapcount_daemon::{aggregate::Aggregator, decode::encode, ingest::Sink, metrics::Metrics, record};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("small-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount runs");
        assert!(status.success(), "cannot mount a tmpfs (needs root)");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn event(i: u64) -> Vec<u8> {
    let (folio, base) = (0xffff_ea00_0000_0000 + i * 64, 0x7f00_0000_0000 + i * 4096);
    encode(&Event {
        mapcount: 0,
        refcount: 2,
        ..Event::rmap(RmapOp::AddNew, Level::Pte, FolioKind::Anon, 0, folio, 1, base, 1)
    })
}

fn records_in(path: &Path) -> u64 {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = record::Reader::new(file).unwrap();
    let mut n = 0;
    while reader.next_record().unwrap().is_some() {
        n += 1;
    }
    n
}

#[test]
#[ignore = "mounts a tmpfs, which needs root: run through `cargo xtask test`"]
fn a_full_disk_stops_the_recording_not_the_daemon() {
    let fs = Tmpfs::mount("1m");
    let path = fs.0.join("events.rec");
    let metrics = Arc::new(Metrics::new());
    let aggregator = Arc::new(Mutex::new(Aggregator::new(Arc::clone(&metrics), 1 << 20)));
    let recording = record::Recording::create(&path, 1 << 30).unwrap();
    let mut sink = Sink::new(Arc::clone(&aggregator), Some(recording));
    // Batches of 1,000 records, flushed after each as the ingest loop does,
    // until well past what the file system holds.
    let mut taken = 0u64;
    for batch in 0..100u64 {
        let mut agg = aggregator.lock().unwrap();
        for i in 0..1000 {
            sink.ingest(&mut agg, &event(batch * 1000 + i)).expect("the daemon goes on");
            taken += 1;
        }
        drop(agg);
        sink.flush_recording();
    }
    sink.finish_recording();
    let recorded = records_in(&path);
    let size = std::fs::metadata(&path).unwrap().len();
    eprintln!("{taken} records taken, {recorded} recorded in {size} bytes before the disk filled");
    assert_eq!(metrics.record_stops.with_label_values(&["write_error"]).get(), 1);
    assert_eq!(metrics.recording.get(), 0);
    // Every record went to the table, recorded or not.
    aggregator.lock().unwrap().publish_metrics();
    assert_eq!(metrics.table_entries.get(), taken as i64);
    // The file holds whole batches only.
    assert!(recorded > 0 && recorded < taken && recorded.is_multiple_of(1000), "{recorded}");
    assert_eq!(size, 16 + recorded * (2 + event(0).len() as u64));
}
