//! `mapcountd`: the command line and its dispatch. The daemon itself is
//! `run`; `check`, `replay`, `audit`, `report` and `top` are its
//! subcommands; `settings` merges flags and the configuration file.

mod audit;
mod check;
mod replay;
mod run;
mod scrape;
mod settings;
mod top;

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mapcount_daemon::{exposition::Scrape, summary};
use settings::{RunArgs, Settings, parse_at_least_one};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

#[derive(Parser)]
#[command(
    name = "mapcountd",
    version,
    about = "Measures how folios are mapped, from the kernel's rmap calls, for Prometheus."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print what would be attached and the resolved field offsets; exit 1 if core probes are missing.
    Check {
        /// Read this BTF file instead of the running kernel's (needs no root).
        #[arg(long, value_name = "PATH")]
        btf: Option<PathBuf>,
        /// Also load every kprobe program into this kernel without attaching
        /// (the verifier checks each); needs root.
        #[arg(long, conflicts_with = "btf")]
        load: bool,
    },
    /// Aggregate a record file (written with --record) and print the metrics.
    Replay {
        file: PathBuf,
        /// Print the short report of `mapcountd report` instead of the metrics.
        #[arg(long)]
        report: bool,
        /// Memory for the folio table, as for the daemon (small folios are
        /// sampled beyond it).
        #[arg(long = "folio-table.memory", value_name = "BYTES", default_value_t = settings::DEFAULT_TABLE_MEMORY, value_parser = mapcount_daemon::config::byte_size)]
        folio_table_memory: u64,
        /// Most folios the table holds [default: twice what --folio-table.memory holds].
        #[arg(long = "folio-table.size", value_name = "N", value_parser = parse_at_least_one)]
        folio_table_size: Option<usize>,
    },
    /// How wrong the kernel's maybe-shared guesses are on this host: a
    /// table from a running daemon's metrics (docs/audit.md).
    Audit {
        /// The daemon's metrics, over plain HTTP.
        #[arg(long, default_value = "http://127.0.0.1:9730/metrics")]
        url: String,
        /// Read a saved scrape instead (`-`: stdin).
        #[arg(long, value_name = "PATH", conflicts_with = "url")]
        file: Option<PathBuf>,
        /// Also show what this host's kernel says per cgroup (its
        /// smaps_rollup, summed over the cgroup's processes; needs root).
        #[arg(long)]
        kernel: bool,
    },
    /// What happened to the memory system, in a dozen lines: sharing,
    /// write faults, statistics, refcount, pages without a mapping.
    Report {
        /// The daemon's metrics, over plain HTTP.
        #[arg(long, default_value = "http://127.0.0.1:9730/metrics")]
        url: String,
        /// Read a saved scrape instead (`-`: stdin).
        #[arg(long, value_name = "PATH", conflicts_with = "url")]
        file: Option<PathBuf>,
    },
    /// A live view of a running daemon in the terminal (q quits).
    Top(top::TopArgs),
}

/// Exit status for bad flags or configuration, as clap uses for bad flags.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (command, settings) = match cli.command {
        Some(command) => (Some(command), None),
        None => match Settings::resolve(cli.run) {
            Ok(settings) => (None, Some(settings)),
            Err(e) => {
                eprintln!("mapcountd: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let log_level = settings.as_ref().map_or("info", |s| s.log_level.as_str());
    let filter = match EnvFilter::try_new(log_level) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("mapcountd: bad log level {log_level:?}: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // The filter sits behind a reload handle: SIGHUP can change the log level.
    let (filter, log_filter) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .init();
    // aya-log records arrive through the `log` crate.
    if let Err(e) = tracing_log::LogTracer::init() {
        eprintln!("mapcountd: cannot route eBPF log records: {e}");
    }

    let result = match (command, settings) {
        (Some(Command::Check { btf, load }), _) => check::check(btf, load),
        (Some(Command::Replay { file, report, folio_table_memory, folio_table_size }), _) => {
            replay::replay(&file, folio_table_memory, folio_table_size, report)
        }
        (Some(Command::Audit { url, file, kernel }), _) => audit::audit(&url, file.as_deref(), kernel),
        (Some(Command::Report { url, file }), _) => scrape::read(&url, file.as_deref()).map(|text| {
            print!("{}", summary::report(&Scrape::new(text)));
            ExitCode::SUCCESS
        }),
        (Some(Command::Top(args)), _) => top::top(args),
        (None, Some(settings)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(run::run(settings, log_filter))),
        (None, None) => unreachable!("settings are resolved when there is no subcommand"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
