//! `mapcountd top` in a terminal it does not own: tmux runs it against a
//! small server that plays a daemon whose counters grow at known rates,
//! and the test reads the screen at two moments. The captures go to
//! `target/tmp/live-view-{1,2}.txt`.
//!
//! The test waits for what it reads rather than for a fixed time: on a
//! loaded machine the first rates may take several seconds to appear, and
//! the played daemon changes state when the test says so, not on a clock.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "an integration test: a panic is a failed test, with its message"
)]

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, sleep},
    time::{Duration, Instant},
};

/// Copies per second the played daemon counts, and reuses.
const COPY_RATE: f64 = 500.0;
const REUSE_RATE: f64 = 120.0;
/// How long the test waits for a screen it expects.
const PATIENCE: Duration = Duration::from_secs(30);

/// The played daemon's `/metrics` at `elapsed` after it started; `later`
/// is its second state: more shared folios and lost events.
fn scrape(elapsed: Duration, later: bool) -> String {
    let t = elapsed.as_secs_f64();
    format!(
        "mapcount_kernel_info{{release=\"6.12.99-test\"}} 1\n\
         mapcount_probe_attached{{function=\"folio_add_anon_rmap_ptes\",mode=\"fentry\",probe=\"add_anon\"}} 1\n\
         mapcount_probe_attached{{function=\"do_wp_page\",mode=\"none\",probe=\"wp\"}} 0\n\
         mapcount_cow_faults_total{{kind=\"anon\",order=\"0\",outcome=\"copy\"}} {}\n\
         mapcount_cow_faults_total{{kind=\"anon\",order=\"0\",outcome=\"reuse\"}} {}\n\
         mapcount_events_total{{type=\"rmap\"}} {}\n\
         mapcount_events_lost_total{{reason=\"ring_buffer_full\"}} {}\n\
         mapcount_folios{{kind=\"anon\",order=\"0\"}} 12000\n\
         mapcount_folios{{kind=\"anon\",order=\"9\"}} 4\n\
         mapcount_folios{{kind=\"shmem\",order=\"4\"}} 16\n\
         mapcount_folios_shared{{kind=\"anon\",order=\"9\"}} {}\n\
         mapcount_folios_partially_mapped{{kind=\"anon\",order=\"9\"}} 1\n\
         mapcount_partially_mapped_unmapped_bytes{{kind=\"anon\",order=\"9\"}} 1048576\n\
         mapcount_folio_refcount_max{{kind=\"anon\",order=\"0\"}} 1025\n\
         mapcount_refcount_headroom_ratio {}\n\
         mapcount_nomapping_pages_mapped_total{{source=\"PACKET\",vma=\"mixedmap\"}} 512\n",
        (1000.0 + COPY_RATE * t).floor(),
        (REUSE_RATE * t).floor(),
        (10_000.0 * t).floor(),
        if later { 12 } else { 0 },
        if later { 3 } else { 1 },
        1025.0 / 2f64.powi(31),
    )
}

/// Serves the played daemon's `/metrics` until the test ends; it is in
/// its second state once `later` is set.
fn serve(later: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let start = Instant::now();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let body = scrape(start.elapsed(), later.load(Ordering::SeqCst));
            let _ = write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    port
}

fn tmux(socket: &str, args: &[&str]) -> String {
    let out = Command::new("tmux")
        .arg("-L")
        .arg(socket)
        .args(args)
        .output()
        .expect("tmux (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number after `label` on the screen (commas removed), if there is
/// one yet: a rate shows `-` until the second scrape.
fn figure_after(screen: &str, label: &str) -> Option<f64> {
    let rest = &screen[screen.find(label)? + label.len()..];
    rest.split_whitespace().next()?.replace(',', "").parse().ok()
}

/// Captures the screen until `ready` holds of it, or the patience ends
/// (then the last capture is returned and the assertions say what is
/// missing).
fn capture_when(socket: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let screen = tmux(socket, &["capture-pane", "-p"]);
        if ready(&screen) || Instant::now() >= deadline {
            return screen;
        }
        sleep(Duration::from_millis(200));
    }
}

/// Both rates are on the screen.
fn has_rates(screen: &str) -> bool {
    figure_after(screen, " copy ").is_some() && figure_after(screen, "reuse ").is_some()
}

/// The rows of the folio table: the words of each line after its header.
fn table_rows(screen: &str) -> Vec<Vec<&str>> {
    screen
        .lines()
        .skip_while(|l| !l.contains("partially mapped"))
        .skip(1)
        .map(|l| {
            l.trim_matches(|c: char| c == '│' || c.is_whitespace()).split_whitespace().collect::<Vec<_>>()
        })
        .take_while(|words| words.len() >= 6)
        .collect()
}

#[test]
fn top_shows_rates_and_the_table_and_quits_on_q() {
    let later = Arc::new(AtomicBool::new(false));
    let port = serve(Arc::clone(&later));
    let socket = format!("mapcount-live-view-{}", std::process::id());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let exit_file = dir.join("live-view-exit.txt");
    let _ = std::fs::remove_file(&exit_file);
    let command = format!(
        "{} top --url http://127.0.0.1:{port}/metrics --interval 1s; echo $? > {}",
        env!("CARGO_BIN_EXE_mapcountd"),
        exit_file.display()
    );
    tmux(&socket, &["new-session", "-d", "-x", "110", "-y", "30", &command]);

    // Moment one: two scrapes in, before the played daemon changes.
    let first = capture_when(&socket, has_rates);
    std::fs::write(dir.join("live-view-1.txt"), &first).unwrap();
    // Moment two: the played daemon has lost events and more sharing, and
    // the view has scraped it twice since (rates span the change).
    later.store(true, Ordering::SeqCst);
    let changed = capture_when(&socket, |screen| screen.contains("12 in all"));
    let second = capture_when(&socket, |screen| screen != changed && has_rates(screen));
    std::fs::write(dir.join("live-view-2.txt"), &second).unwrap();
    tmux(&socket, &["send-keys", "q"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !exit_file.exists() && Instant::now() < deadline {
        sleep(Duration::from_millis(100));
    }
    tmux(&socket, &["kill-server"]);

    for screen in [&first, &second] {
        assert!(screen.contains("kernel 6.12.99-test"), "{screen}");
        // Rates between two scrapes about a second apart: within 15%.
        let copy = figure_after(screen, " copy ").unwrap_or_else(|| panic!("no copy rate:\n{screen}"));
        let reuse = figure_after(screen, "reuse ").unwrap_or_else(|| panic!("no reuse rate:\n{screen}"));
        assert!((copy - COPY_RATE).abs() <= COPY_RATE * 0.15, "copy {copy}/s, played {COPY_RATE}:\n{screen}");
        assert!(
            (reuse - REUSE_RATE).abs() <= REUSE_RATE * 0.15,
            "reuse {reuse}/s, played {REUSE_RATE}:\n{screen}"
        );
        assert!(screen.contains("1 of 2 attached (fentry)"), "{screen}");
        assert!(screen.contains("highest 1,025"), "{screen}");
        assert!(screen.contains("512 pages without folio->mapping: PACKET 512"), "{screen}");
        // The table: anon order 0, anon order 9, shmem order 4, in that order.
        let rows: Vec<Vec<&str>> = table_rows(screen);
        let order: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
        assert_eq!(order, [("anon", "0"), ("anon", "9"), ("shmem", "4")], "{screen}");
    }
    // live, shared, partially mapped, unmapped bytes of anon order 9.
    assert_eq!(table_rows(&first)[1][2..7], ["4", "1", "1", "1.0", "MiB"], "{first}");
    assert_eq!(table_rows(&second)[1][2..7], ["4", "3", "1", "1.0", "MiB"], "{second}");
    assert!(first.contains("0 in all") && !first.contains("not exact"), "{first}");
    assert!(second.contains("12 in all") && second.contains("not exact"), "{second}");
    let status =
        std::fs::read_to_string(&exit_file).unwrap_or_else(|_| panic!("top did not quit on q:\n{second}"));
    assert_eq!(status.trim(), "0");
}
