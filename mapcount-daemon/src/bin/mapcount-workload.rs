//! `mapcount-workload`: drives the kernel's rmap and write-fault paths with
//! known numbers of pages, and checks that `mapcountd` reported them.
//!
//! `check` runs every scenario once and prints one `MAPCOUNT-CHECK` line per
//! comparison (parsed by `cargo xtask test`); `demo` repeats the scenarios
//! forever so that a dashboard has something to show.

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::ExitCode,
    ptr,
    thread::sleep,
    time::{Duration, Instant},
};

const PAGE: usize = 4096;

/// Pages touched once each in the anonymous scenario.
const ANON_PAGES: usize = 1000;
/// Pages of the file mapped and read.
const FILE_PAGES: usize = 256;
/// Pages the parent owns before fork and the child writes afterwards.
const COW_PAGES: usize = 100;
/// Pages read (zero page mapped) and then written.
const ZERO_PAGES: usize = 50;
/// Pages of a shared mapping read, made writable and written.
const SHARED_PAGES: usize = 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let metrics_url = args.iter().position(|a| a == "--metrics").and_then(|i| args.get(i + 1));
    let metrics_url = metrics_url.map_or("127.0.0.1:9730", |s| s.as_str()).trim_start_matches("http://");
    let (address, path) = metrics_url.split_once('/').map_or((metrics_url, "metrics"), |(a, p)| (a, p));
    let scratch = args.iter().position(|a| a == "--file-dir").and_then(|i| args.get(i + 1));
    let scratch = scratch.map_or("/tmp", |s| s.as_str());
    let metrics = MetricsSource { address: address.to_owned(), path: format!("/{path}") };
    // In a forced attach mode, the core probes must be attached in that mode.
    let expect_mode = args.iter().position(|a| a == "--expect-mode").and_then(|i| args.get(i + 1));
    let expect_mode = expect_mode.map_or("auto", |s| s.as_str());
    match args.get(1).map(String::as_str) {
        Some("check") => check(&metrics, scratch, expect_mode),
        Some("demo") => loop {
            run_anon(ANON_PAGES);
            run_file(scratch, FILE_PAGES);
            run_fork_cow(COW_PAGES);
            run_zero_page(ZERO_PAGES);
            run_shared(SHARED_PAGES);
            sleep(Duration::from_secs(2));
        },
        _ => {
            eprintln!(
                "usage: mapcount-workload check|demo [--metrics HOST:PORT/PATH] [--file-dir DIR] [--expect-mode MODE]"
            );
            ExitCode::from(2)
        }
    }
}

// ---- scenarios ------------------------------------------------------------

/// A private anonymous mapping of `pages` small pages (THP disabled for it).
fn map_anon(pages: usize, flags: libc::c_int, prot: libc::c_int) -> *mut u8 {
    // SAFETY: plain anonymous mmap; failure is checked.
    let p = unsafe { libc::mmap(ptr::null_mut(), pages * PAGE, prot, flags | libc::MAP_ANONYMOUS, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap failed: {}", std::io::Error::last_os_error());
    // SAFETY: p is our mapping.
    unsafe { libc::madvise(p, pages * PAGE, libc::MADV_NOHUGEPAGE) };
    p.cast()
}

fn unmap(p: *mut u8, pages: usize) {
    // SAFETY: p was returned by mmap for this length.
    unsafe { libc::munmap(p.cast(), pages * PAGE) };
}

fn write_each_page(p: *mut u8, pages: usize, value: u8) {
    for i in 0..pages {
        // SAFETY: within the mapping; volatile so the write really happens.
        unsafe { ptr::write_volatile(p.add(i * PAGE), value) };
    }
}

fn read_each_page(p: *const u8, pages: usize) -> u64 {
    (0..pages).map(|i| u64::from(unsafe { ptr::read_volatile(p.add(i * PAGE)) })).sum()
}

/// Fault in `pages` new anonymous pages, then unmap them.
fn run_anon(pages: usize) {
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    write_each_page(p, pages, 1);
    unmap(p, pages);
}

/// Map a file of `pages` pages and read every page, then unmap it.
fn run_file(dir: &str, pages: usize) {
    let path = format!("{dir}/mapcount-workload.data");
    std::fs::write(&path, vec![7u8; pages * PAGE]).expect("write the scratch file");
    let c_path = CString::new(path.clone()).expect("no NUL in path");
    // SAFETY: plain open/mmap with checked results.
    let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0, "open {path}: {}", std::io::Error::last_os_error());
    let p = unsafe { libc::mmap(ptr::null_mut(), pages * PAGE, libc::PROT_READ, libc::MAP_PRIVATE, fd, 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap {path}: {}", std::io::Error::last_os_error());
    let sum = read_each_page(p.cast(), pages);
    assert_eq!(sum, 7 * pages as u64);
    unmap(p.cast(), pages);
    unsafe { libc::close(fd) };
    let _ = std::fs::remove_file(&path);
}

/// The parent faults in `pages` pages and forks; the child writes one byte
/// in each (one COW copy per page) and exits; then the parent writes them
/// again (one reuse per page: nobody else maps them any more).
fn run_fork_cow(pages: usize) {
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    write_each_page(p, pages, 1);
    // SAFETY: the child only touches memory and calls _exit.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            write_each_page(p, pages, 2);
            unsafe { libc::_exit(0) };
        }
        child => {
            let mut status = 0;
            unsafe { libc::waitpid(child, &mut status, 0) };
            write_each_page(p, pages, 3);
            unmap(p, pages);
        }
    }
}

/// Read `pages` pages (each maps the shared zero page), then write them:
/// each write copies from the zero page.
fn run_zero_page(pages: usize) {
    let p = map_anon(pages, libc::MAP_PRIVATE, libc::PROT_READ | libc::PROT_WRITE);
    assert_eq!(read_each_page(p, pages), 0);
    write_each_page(p, pages, 1);
    unmap(p, pages);
}

/// Write faults on a shared mapping: in a child (so nothing else of the
/// workload is affected), fault in a shared mapping, write-protect every PTE
/// by clearing the soft-dirty bits (`/proc/self/clear_refs`), then write each
/// page again. Shared mappings never COW: each write is a "shared" fault.
fn run_shared(pages: usize) {
    // SAFETY: the child only touches memory, writes a proc file and calls _exit.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let p = map_anon(pages, libc::MAP_SHARED, libc::PROT_READ | libc::PROT_WRITE);
            write_each_page(p, pages, 1);
            let cleared = std::fs::write("/proc/self/clear_refs", "4");
            write_each_page(p, pages, 2);
            unsafe { libc::_exit(i32::from(cleared.is_err())) };
        }
        child => {
            let mut status = 0;
            unsafe { libc::waitpid(child, &mut status, 0) };
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "clear_refs failed in the child"
            );
        }
    }
}

// ---- checking -------------------------------------------------------------

struct MetricsSource {
    address: String,
    path: String,
}

/// One scrape: (series, value) pairs of the text exposition format.
struct Scrape(Vec<(String, f64)>);

impl MetricsSource {
    fn scrape(&self) -> Result<Scrape, String> {
        let mut stream =
            TcpStream::connect(&self.address).map_err(|e| format!("connect {}: {e}", self.address))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        write!(stream, "GET {} HTTP/1.0\r\nHost: {}\r\n\r\n", self.path, self.address)
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(format!("HTTP status: {}", head.lines().next().unwrap_or("")));
        }
        let series = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect();
        Ok(Scrape(series))
    }

    /// Scrapes until the daemon has drained the events of what just ran.
    fn settled_scrape(&self) -> Result<Scrape, String> {
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
    /// Sum over every series of `name` whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
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

struct Checker {
    passed: u32,
    failed: u32,
}

impl Checker {
    /// `reported` must lie in `[at_least, at_most]`.
    fn range(&mut self, name: &str, known: usize, reported: f64, at_least: f64, at_most: f64) {
        let ok = reported >= at_least && reported <= at_most;
        if ok {
            self.passed += 1
        } else {
            self.failed += 1
        }
        println!(
            "MAPCOUNT-CHECK {name} known={known} reported={reported} accepted={at_least}..={at_most} {}",
            if ok { "PASS" } else { "FAIL" }
        );
    }
}

/// The daemon and the shell fault pages of their own while a scenario runs;
/// the guest runs nothing else, so a margin this size separates that noise
/// from double counting.
fn noise_margin(known: usize) -> f64 {
    (known as f64 / 4.0).max(64.0)
}

fn check(metrics: &MetricsSource, scratch: &str, expect_mode: &str) -> ExitCode {
    let mut checker = Checker { passed: 0, failed: 0 };
    let result = (|| -> Result<(), String> {
        let base = metrics.settled_scrape()?;
        for probe in [
            "anon_add_ptes",
            "anon_add_new",
            "anon_add_new_return",
            "file_add_ptes",
            "remove_ptes",
            "write_fault",
            "write_fault_return",
        ] {
            let mut labels = vec![("probe", probe)];
            if expect_mode != "auto" {
                labels.push(("mode", expect_mode));
            }
            let attached = base.sum("mapcount_probe_attached", &labels);
            checker.range(&format!("probe_attached/{probe}"), 1, attached, 1.0, 1.0);
        }

        let delta = |before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]| {
            after.sum(name, labels) - before.sum(name, labels)
        };
        let mut expect = |name: &str,
                          known: usize,
                          before: &Scrape,
                          after: &Scrape,
                          metric: &str,
                          labels: &[(&str, &str)]| {
            let reported = delta(before, after, metric, labels);
            checker.range(name, known, reported, known as f64, known as f64 + noise_margin(known));
        };

        run_anon(ANON_PAGES);
        let after = metrics.settled_scrape()?;
        let new_anon = [("op", "add_new"), ("kind", "anon"), ("order", "0")];
        expect("anon/new_pages", ANON_PAGES, &base, &after, "mapcount_rmap_pages_total", &new_anon);
        let removed = [("op", "remove"), ("kind", "anon"), ("order", "0")];
        expect("anon/removed_pages", ANON_PAGES, &base, &after, "mapcount_rmap_pages_total", &removed);

        let before = after;
        run_file(scratch, FILE_PAGES);
        let after = metrics.settled_scrape()?;
        expect(
            "file/mapped_pages",
            FILE_PAGES,
            &before,
            &after,
            "mapcount_rmap_pages_total",
            &[("op", "add"), ("kind", "file")],
        );
        expect(
            "file/unmapped_pages",
            FILE_PAGES,
            &before,
            &after,
            "mapcount_rmap_pages_total",
            &[("op", "remove"), ("kind", "file")],
        );

        let before = after;
        run_fork_cow(COW_PAGES);
        let after = metrics.settled_scrape()?;
        expect(
            "cow/child_copies",
            COW_PAGES,
            &before,
            &after,
            "mapcount_cow_faults_total",
            &[("outcome", "copy")],
        );
        expect(
            "cow/parent_reuses",
            COW_PAGES,
            &before,
            &after,
            "mapcount_cow_faults_total",
            &[("outcome", "reuse")],
        );

        let before = after;
        run_zero_page(ZERO_PAGES);
        let after = metrics.settled_scrape()?;
        expect(
            "cow/zero_page_copies",
            ZERO_PAGES,
            &before,
            &after,
            "mapcount_cow_faults_total",
            &[("outcome", "copy_zero_page")],
        );

        let before = after;
        run_shared(SHARED_PAGES);
        let after = metrics.settled_scrape()?;
        expect(
            "cow/shared_mapping_faults",
            SHARED_PAGES,
            &before,
            &after,
            "mapcount_cow_faults_total",
            &[("outcome", "shared")],
        );

        let lost = after.sum("mapcount_events_lost_total", &[]);
        checker.range("daemon/events_lost", 0, lost, 0.0, 0.0);
        let undecodable = after.sum("mapcount_events_undecodable_total", &[]);
        checker.range("daemon/events_undecodable", 0, undecodable, 0.0, 0.0);
        Ok(())
    })();
    if let Err(e) = result {
        println!("MAPCOUNT-CHECK workload known=0 reported=error:{e} FAIL");
        checker.failed += 1;
    }
    println!("MAPCOUNT-SUMMARY {} passed, {} failed", checker.passed, checker.failed);
    if checker.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
