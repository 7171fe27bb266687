//! `mapcount-workload`: drives the kernel's rmap and write-fault paths with
//! known numbers of pages, and checks that `mapcountd` reported them.
//!
//! `check` runs every scenario once and prints one `MAPCOUNT-CHECK` line per
//! comparison (parsed by `cargo xtask test`); `demo` repeats a workload
//! forever so that a dashboard has something to show. The rest serve the
//! overload test and `cargo xtask bench`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test program: a failure here is a failed test, with its message"
)]

mod bench;
mod check;
mod checker;
mod demo;
mod exact;
mod kernel;
mod memory;
mod metrics;
mod redis;
mod scenarios;

use std::{process::ExitCode, thread::sleep, time::Duration};

use clap::{Parser, Subcommand};

use crate::metrics::MetricsSource;

#[derive(Parser)]
#[command(name = "mapcount-workload", about = "Known answers for mapcountd, from the kernel")]
struct Cli {
    /// mapcountd's metrics: HOST:PORT/PATH.
    #[arg(long, global = true, default_value = "127.0.0.1:9730/metrics")]
    metrics: String,
    /// A directory for the files the scenarios map.
    #[arg(long = "file-dir", global = true, default_value = "/tmp")]
    file_dir: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario once, checked against the kernel's own counts.
    Check {
        /// In a forced attach mode, the core probes must be attached in that mode.
        #[arg(long = "expect-mode", default_value = "auto")]
        expect_mode: String,
    },
    /// The demo workload, forever.
    Demo,
    /// A fork/mmap storm for the overload test.
    Storm {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The rmap-heavy loops whose kernel-side cost `cargo xtask bench` measures.
    Cost {
        /// Stop this mapcountd (SIGSTOP) while a loop runs.
        #[arg(long)]
        pause: Option<i32>,
        /// Run the loops this many times, one after the other (the times of
        /// one tracer's session, for a best of more rounds on a noisy host).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Map and unmap pages at a target rate, for the lossless-rate table.
    Rate {
        #[arg(long = "events-per-second", default_value_t = 10_000)]
        events_per_second: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Start a command (mapcountd) and time it from exec to /-/ready.
    TimeReady {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Redis under BGSAVE while keys are overwritten: its copy-on-write
    /// against mapcount's copies.
    Redis {
        #[arg(long, default_value_t = 6379)]
        port: u16,
        #[arg(long, default_value_t = 200_000)]
        keys: u32,
        #[arg(long, default_value = "/tmp/redis.log")]
        log: String,
    },
    /// A process of MIB MiB of small pages forks while another faults:
    /// events lost meanwhile and the daemon's time on the copy.
    ForkBig {
        #[arg(long, default_value_t = 1024)]
        mib: usize,
    },
    /// THPs mapped and copied during a storm that overflows the ring
    /// buffer: the exact totals against the kernel's page maps.
    ExactTotals,
    /// Compare the live daemon's final metrics with its replay's.
    Compare { live: String, replayed: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let url = cli.metrics.trim_start_matches("http://");
    let (address, path) = url.split_once('/').unwrap_or((url, "metrics"));
    let metrics = MetricsSource { address: address.to_owned(), path: format!("/{path}") };
    match cli.command {
        Command::Check { expect_mode } => check::check(&metrics, &cli.file_dir, &expect_mode),
        Command::Demo => loop {
            demo::run_all(&cli.file_dir);
            sleep(Duration::from_secs(2));
        },
        Command::Storm { seconds } => {
            demo::storm(seconds);
            ExitCode::SUCCESS
        }
        Command::Cost { pause, repeat } => {
            for _ in 0..repeat {
                bench::cost(&metrics, pause);
            }
            ExitCode::SUCCESS
        }
        Command::Rate { events_per_second, seconds } => {
            bench::rate(events_per_second, seconds);
            ExitCode::SUCCESS
        }
        Command::TimeReady { command } => bench::time_ready(&metrics, &command),
        Command::Redis { port, keys, log } => redis::redis(&metrics, port, &log, keys),
        Command::Compare { live, replayed } => bench::compare(&live, &replayed),
        Command::ForkBig { mib } => match bench::fork_big(&metrics, mib) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("MAPCOUNT-FORK-BIG failed: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::ExactTotals => match exact::exact_totals(&metrics) {
            Ok(checker) if checker.failed == 0 => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                println!("MAPCOUNT-CHECK exact/scenario_ran known=0 reported=1 accepted=0..=0 FAIL ({e:#})");
                ExitCode::FAILURE
            }
        },
    }
}
