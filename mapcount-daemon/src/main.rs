//! `mapcountd`: the daemon and its command line.

use std::{
    fs::File,
    io::{BufReader, IsTerminal as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mapcount_common::counter;
use mapcount_daemon::{
    DEFAULT_LISTEN_ADDRESS,
    aggregate::Aggregator,
    config::{self, Config},
    http, ingest,
    layout::{self, DEFAULT_BTF_PATH},
    metrics::{Metrics, ReadAtScrape, VMSTAT_COUNTERS},
    privileges,
    probes::{self, AttachMode, KernelSymbols, Need, ProbeStatus, Wakeup},
    record, resources,
    web_config::WebSecurity,
};
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
        /// Most folios the table tracks, lowered to fit a cgroup memory limit.
        #[arg(long = "folio-table.size", value_name = "N", default_value_t = 1 << 20, value_parser = parse_at_least_one)]
        folio_table_size: usize,
    },
}

/// Flags of the daemon. Each has a key in the configuration file; a flag
/// given here wins over the file, the file over the default.
#[derive(clap::Args)]
struct RunArgs {
    /// TOML configuration file (see docs/configuration in the README).
    #[arg(long = "config.file", value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Address to serve metrics on [default: 0.0.0.0:9730].
    #[arg(long = "web.listen-address", value_name = "ADDR")]
    listen_address: Option<SocketAddr>,
    /// Path under which metrics are served [default: /metrics].
    #[arg(long = "web.telemetry-path", value_name = "PATH", value_parser = config::telemetry_path)]
    telemetry_path: Option<String>,
    /// Most HTTP connections open at once; at the cap the idlest one is closed to make room
    /// [default: 256, lowered to fit the open-file limit].
    #[arg(long = "web.max-connections", value_name = "N", value_parser = parse_at_least_one)]
    max_connections: Option<usize>,
    /// Most HTTP requests answered at once; beyond it, 503 [default: 40].
    #[arg(long = "web.max-requests", value_name = "N", value_parser = parse_at_least_one)]
    max_requests: Option<usize>,
    /// A connection without a request for this long is closed [default: 90s].
    #[arg(long = "web.idle-timeout", value_name = "DURATION", value_parser = config::duration)]
    idle_timeout: Option<Duration>,
    /// A request header (or TLS handshake) not complete after this long is dropped [default: 10s].
    #[arg(long = "web.header-read-timeout", value_name = "DURATION", value_parser = config::duration)]
    header_read_timeout: Option<Duration>,
    /// Size of the event ring buffer in bytes, a power of two [default: 8 MiB].
    #[arg(long = "ringbuf.size", value_name = "BYTES", value_parser = parse_ring_size)]
    ring_buffer_bytes: Option<u32>,
    /// When the kernel wakes the daemon: batch (at 1/16 full, and a 20 ms drain timer) or every-record [default: batch].
    #[arg(long = "ringbuf.wakeup", value_name = "WHEN", value_enum)]
    wakeup: Option<Wakeup>,
    /// fentry/fexit where the kernel allows, else kprobes (auto), or only one kind [default: auto].
    #[arg(long = "attach.mode", value_name = "MODE", value_enum)]
    attach_mode: Option<AttachMode>,
    /// Most folios the table tracks; beyond it, entries are evicted and counted
    /// [default: 1048576, lowered to fit a cgroup memory limit].
    #[arg(long = "folio-table.size", value_name = "N", value_parser = parse_at_least_one)]
    folio_table_size: Option<usize>,
    /// TLS and basic authentication, in the Prometheus exporter-toolkit format.
    #[arg(long = "web.config.file", value_name = "PATH")]
    web_config_file: Option<PathBuf>,
    /// The kernel's BTF [default: /sys/kernel/btf/vmlinux].
    #[arg(long = "kernel.btf", value_name = "PATH")]
    btf: Option<PathBuf>,
    /// Also write the raw event stream to this file (for `mapcountd replay`).
    #[arg(long = "record", value_name = "PATH")]
    record: Option<PathBuf>,
    /// The record file stops growing here; the daemon goes on [default: 1G].
    #[arg(long = "record.max-size", value_name = "BYTES", value_parser = config::byte_size)]
    record_max_size: Option<u64>,
    /// At exit, after the last event, write the metrics to this file.
    #[arg(long = "metrics.dump-on-exit", value_name = "PATH")]
    dump_on_exit: Option<PathBuf>,
    /// Log filter, as in RUST_LOG: error, warn, info, debug, trace [default: info].
    #[arg(long = "log.level", value_name = "LEVEL", value_parser = config::log_level)]
    log_level: Option<String>,
}

/// Flags and configuration file merged.
struct Settings {
    config_file: Option<PathBuf>,
    web_security: WebSecurity,
    listen_address: SocketAddr,
    telemetry_path: String,
    web_limits: http::Limits,
    /// --web.max-connections given (or in the file), not the default.
    max_connections_asked: bool,
    ring_buffer_bytes: u32,
    wakeup: Wakeup,
    attach_mode: AttachMode,
    folio_table_size: usize,
    btf: PathBuf,
    record: Option<PathBuf>,
    record_max_size: u64,
    dump_on_exit: Option<PathBuf>,
    log_level: String,
}

impl Settings {
    fn resolve(args: RunArgs) -> Result<Settings, String> {
        let file = match &args.config_file {
            Some(path) => Config::load(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        let web_security = match &args.web_config_file {
            Some(path) => WebSecurity::load(path).map_err(|e| e.to_string())?,
            None => WebSecurity::default(),
        };
        // The file's values were checked when it was read.
        let file_duration =
            |d: &Option<toml::Spanned<String>>| d.as_ref().and_then(|t| config::duration(t.get_ref()).ok());
        let defaults = http::Limits::default();
        let max_connections =
            args.max_connections.or(file.web.max_connections.as_ref().map(|n| *n.get_ref()));
        let web_limits = http::Limits {
            max_connections: max_connections.unwrap_or(defaults.max_connections),
            max_requests: args
                .max_requests
                .or(file.web.max_requests.map(|n| n.into_inner()))
                .unwrap_or(defaults.max_requests),
            idle_timeout: args
                .idle_timeout
                .or(file_duration(&file.web.idle_timeout))
                .unwrap_or(defaults.idle_timeout),
            header_read_timeout: args
                .header_read_timeout
                .or(file_duration(&file.web.header_read_timeout))
                .unwrap_or(defaults.header_read_timeout),
            tls_handshake_timeout: args
                .header_read_timeout
                .or(file_duration(&file.web.header_read_timeout))
                .unwrap_or(defaults.tls_handshake_timeout),
        };
        Ok(Settings {
            config_file: args.config_file.clone(),
            web_limits,
            max_connections_asked: max_connections.is_some(),
            web_security,
            listen_address: args.listen_address.or(file.web.listen_address).unwrap_or(DEFAULT_LISTEN_ADDRESS),
            telemetry_path: args
                .telemetry_path
                .or(file.web.telemetry_path.map(|p| p.into_inner()))
                .unwrap_or_else(|| "/metrics".to_owned()),
            ring_buffer_bytes: args
                .ring_buffer_bytes
                .or(file.ringbuf.size.map(|s| s.into_inner()))
                .unwrap_or(8 << 20),
            wakeup: args.wakeup.or(file.ringbuf.wakeup).unwrap_or(Wakeup::Batch),
            attach_mode: args.attach_mode.or(file.attach.mode).unwrap_or(AttachMode::Auto),
            folio_table_size: args
                .folio_table_size
                .or(file.folio_table.size.map(|n| n.into_inner()))
                .unwrap_or(1 << 20),
            btf: args.btf.unwrap_or_else(|| DEFAULT_BTF_PATH.into()),
            record: args.record,
            record_max_size: args
                .record_max_size
                .or(file.record.max_size.and_then(|s| config::byte_size(s.get_ref()).ok()))
                .unwrap_or(1 << 30),
            dump_on_exit: args.dump_on_exit,
            log_level: args
                .log_level
                .or(file.log.level.map(|l| l.into_inner()))
                .unwrap_or_else(|| "info".to_owned()),
        })
    }
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    config::ring_buffer_size(s.parse().map_err(|e| format!("{e}"))?)
}

fn parse_at_least_one(s: &str) -> Result<usize, String> {
    config::at_least_one(s.parse().map_err(|e| format!("{e}"))?)
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
        (Some(Command::Check { btf, load }), _) => check(btf, load),
        (Some(Command::Replay { file, folio_table_size }), _) => replay(&file, folio_table_size),
        (None, Some(settings)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(run(settings, log_filter))),
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

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Handle to change the log filter of the running daemon.
type LogFilter = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// SIGHUP: read the configuration file again. The log level applies at
/// once; anything else that changed is named, and needs a restart (the
/// ring buffer and the programs are sized and attached at start).
fn reload(config_file: Option<&Path>, running: &Settings, log_filter: &LogFilter) {
    let Some(path) = config_file else {
        tracing::warn!("SIGHUP: no --config.file, nothing to reload");
        return;
    };
    let file = match Config::load(path) {
        Ok(file) => file,
        Err(e) => {
            tracing::error!("SIGHUP: configuration not reloaded, the running one stays: {e}");
            return;
        }
    };
    if let Some(level) = file.log.level.as_ref().map(|l| l.get_ref()) {
        let applied = EnvFilter::try_new(level).ok().is_some_and(|filter| log_filter.reload(filter).is_ok());
        if applied {
            tracing::info!(level, "SIGHUP: log level applied");
        } else {
            tracing::error!(level, "SIGHUP: bad log.level, kept the running one");
        }
    }
    let restart_needed = [
        ("web.listen_address", file.web.listen_address.is_some_and(|a| a != running.listen_address)),
        (
            "web.telemetry_path",
            file.web.telemetry_path.as_ref().is_some_and(|p| *p.get_ref() != running.telemetry_path),
        ),
        ("attach.mode", file.attach.mode.is_some_and(|m| m != running.attach_mode)),
        (
            "ringbuf.size",
            file.ringbuf.size.as_ref().is_some_and(|s| *s.get_ref() != running.ring_buffer_bytes),
        ),
        ("ringbuf.wakeup", file.ringbuf.wakeup.is_some_and(|w| w != running.wakeup)),
        (
            "folio_table.size",
            file.folio_table.size.as_ref().is_some_and(|n| *n.get_ref() != running.folio_table_size),
        ),
    ];
    for (key, changed) in restart_needed {
        if changed {
            tracing::warn!(key, "SIGHUP: changed in the configuration file; takes effect after a restart");
        }
    }
}

async fn run(mut args: Settings, log_filter: LogFilter) -> anyhow::Result<ExitCode> {
    let listener = http::bind(args.listen_address).await?;
    privileges::check()?;
    fit_to_host(&mut args);

    let btf = layout::load_btf(&args.btf)?;
    let resolved = layout::resolve(&btf).context("resolving folio field offsets from the kernel's BTF")?;
    for field in resolved.fields.iter().filter(|f| f.offset.is_none()) {
        tracing::info!(field = field.slot, "field absent on this kernel; metrics that need it stay empty");
    }

    let symbols = KernelSymbols::read().context("reading /proc/kallsyms")?;
    let whole_fault_windows = probes::whole_fault_windows(&symbols);
    if whole_fault_windows {
        tracing::info!(
            "do_wp_page is not out of line in this kernel: write faults are classified over handle_mm_fault"
        );
    }
    let mut ebpf = ingest::load(&resolved.layout, args.ring_buffer_bytes, args.wakeup, whole_fault_windows)?;
    let logger = aya_log::EbpfLogger::init(&mut ebpf).context("setting up eBPF logging")?;
    // aya's own BTF parse, for fentry targets; without it every probe uses kprobes.
    let aya_btf = match aya::Btf::from_sys_fs() {
        Ok(btf) => Some(btf),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read kernel BTF for fentry; using kprobes");
            None
        }
    };
    let reports = probes::attach_all(&mut ebpf, &symbols, aya_btf.as_ref(), args.attach_mode)?;

    let metrics = Arc::new(Metrics::new());
    metrics.kernel_info.with_label_values(&[&kernel_release()]).set(1);
    let mut core_attached = 0;
    for report in &reports {
        let (function, mode, attached) = match &report.status {
            ProbeStatus::Attached { function, mode } => {
                tracing::info!(probe = report.spec.name, function, mode = mode.label(), "attached");
                if report.spec.need == Need::Core {
                    core_attached += 1;
                }
                (function.as_str(), mode.label(), 1)
            }
            ProbeStatus::NoFunction => {
                let candidates: Vec<_> = report.spec.candidates.iter().map(|c| c.function).collect();
                tracing::warn!(
                    probe = report.spec.name,
                    ?candidates,
                    "not attached: no such function in this kernel"
                );
                ("", "none", 0)
            }
            ProbeStatus::AttachFailed { function, error } => {
                tracing::warn!(probe = report.spec.name, function, error, "not attached: attach failed");
                (function.as_str(), "none", 0)
            }
        };
        metrics.probe_attached.with_label_values(&[report.spec.name, function, mode]).set(attached);
    }
    if core_attached == 0 {
        tracing::error!("no core rmap probe attached: mapcount metrics will stay empty on this kernel");
    }

    let counters = Arc::new(ingest::KernelCounters::take(&mut ebpf)?);
    let for_scrape = Arc::clone(&counters);
    metrics.registry.register(Box::new(ReadAtScrape::new(
        "mapcount_events_lost_total",
        "Events the kernel side could not deliver, by reason; every loss is counted here.",
        Some("reason"),
        &["ring_buffer_full", "task_state_full"],
        move || vec![for_scrape.sum(counter::RING_BUFFER_FULL), for_scrape.sum(counter::TASK_STATE_FULL)],
    )))?;
    let for_scrape = Arc::clone(&counters);
    metrics.registry.register(Box::new(ReadAtScrape::new(
        "mapcount_events_produced_total",
        "Records the kernel side tried to put in the ring buffer: received plus lost to ring_buffer_full.",
        None,
        &[],
        move || vec![for_scrape.sum(counter::PRODUCED)],
    )))?;
    let for_scrape = Arc::clone(&counters);
    metrics.registry.register(Box::new(ReadAtScrape::new(
        "mapcount_rmap_calls_left_out_total",
        "rmap calls and write faults the kernel side leaves out on purpose, by reason: \
         mapcountd's own address space (observer), hugetlb VMAs (hugetlb).",
        Some("reason"),
        &["observer", "hugetlb"],
        move || vec![for_scrape.sum(counter::OBSERVER_SKIPPED), for_scrape.sum(counter::HUGETLB_SKIPPED)],
    )))?;
    metrics.registry.register(Box::new(ReadAtScrape::gauge(
        "mapcount_kernel_vmstat",
        "The kernel's own counters of mapped memory, from /proc/vmstat, in its units (pages; THPs for the *_transparent_hugepages and *_pmdmapped counters): compare with mapcount_table_vmstat.",
        Some("counter"),
        VMSTAT_COUNTERS,
        read_vmstat,
    )))?;
    let mut events = ingest::take_events(&mut ebpf)?;

    let aggregator = Arc::new(Mutex::new(Aggregator::new(Arc::clone(&metrics), args.folio_table_size)));
    let record = match &args.record {
        Some(path) => {
            let recording = record::Recording::create(path, args.record_max_size)
                .with_context(|| format!("cannot create record file {}", path.display()))?;
            metrics.recording.set(1);
            Some(recording)
        }
        None => None,
    };
    let mut sink = ingest::Sink::new(Arc::clone(&aggregator), record);

    let state = Arc::new(http::HttpState::new(
        Arc::clone(&aggregator),
        Arc::clone(&metrics),
        args.telemetry_path.clone(),
        args.web_security.clone(),
        args.web_limits,
    ));
    tracing::info!(address = %args.listen_address, "serving metrics");
    let server = tokio::spawn(http::serve(listener, state));

    // Readiness for systemd (Type=notify); a no-op outside systemd.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reload_loop = async {
        loop {
            sighup.recv().await;
            reload(args.config_file.as_deref(), &args, &log_filter);
        }
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        result = ingest::run(&mut events, &mut sink, args.wakeup) => result.map_err(anyhow::Error::from),
        result = ingest::run_log(logger) => result.map_err(anyhow::Error::from),
        () = reload_loop => unreachable!("the reload loop never ends"),
        _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching"); Ok(()) }
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: detaching"); Ok(()) }
    };
    server.abort();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Detach first, then take what is still in the ring buffer: nothing
    // that reached it is lost at shutdown.
    let stopping = std::time::Instant::now();
    let mut events = events.into_inner();
    probes::detach_all(&mut ebpf);
    drop(ebpf);
    let detached = stopping.elapsed();
    sink.drain(&mut events)?;
    sink.finish_recording();
    tracing::info!(
        detach_ms = detached.as_millis() as u64,
        total_ms = stopping.elapsed().as_millis() as u64,
        "every program detached, ring buffer drained"
    );
    if let Some(path) = &args.dump_on_exit {
        let aggregator = aggregator.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        aggregator.publish_metrics();
        std::fs::write(path, aggregator.metrics().render())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    // Nothing runs any more and the ring buffer is empty: every record a
    // CPU produced was either received or counted as lost.
    let received =
        aggregator.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).received_per_cpu().to_vec();
    let balances = ingest::balance(
        &counters.per_cpu(counter::PRODUCED),
        &counters.per_cpu(counter::RING_BUFFER_FULL),
        &received,
    );
    for b in &balances {
        tracing::info!(
            cpu = b.cpu,
            produced = b.produced,
            received = b.received,
            lost = b.lost,
            balanced = b.balanced(),
            "event accounting"
        );
    }
    tracing::info!(
        ring_buffer_full = counters.sum(counter::RING_BUFFER_FULL),
        task_state_full = counters.sum(counter::TASK_STATE_FULL),
        unbalanced_cpus = balances.iter().filter(|b| !b.balanced()).count(),
        "events lost over the daemon's life"
    );
    outcome.map(|()| ExitCode::SUCCESS)
}

/// Keeps the daemon's own bounds inside the host's: HTTP connections
/// below the open-file limit, the folio table inside a cgroup memory limit.
fn fit_to_host(args: &mut Settings) {
    match resources::raise_open_file_limit() {
        Ok(open_files) => {
            let fit = resources::connections_that_fit(open_files);
            if args.web_limits.max_connections > fit {
                if args.max_connections_asked {
                    tracing::warn!(
                        asked = args.web_limits.max_connections,
                        open_files,
                        "--web.max-connections lowered to fit the open-file limit"
                    );
                }
                args.web_limits.max_connections = fit;
            }
            tracing::info!(open_files, max_connections = args.web_limits.max_connections, "descriptors");
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
    args.folio_table_size = folio_table_size_for_host(args.folio_table_size);
}

/// `asked`, or fewer if a cgroup memory limit (`MemoryMax=`) would not
/// hold that many: beyond it the table evicts and counts, rather than
/// the daemon being killed.
fn folio_table_size_for_host(asked: usize) -> usize {
    let limit = resources::cgroup_memory_limit();
    let size = resources::table_size_under(limit, asked);
    if size < asked {
        tracing::warn!(
            asked,
            size,
            memory_limit = limit,
            bytes_per_folio = resources::BYTES_PER_FOLIO,
            "folio table lowered to half the cgroup's memory limit; beyond it folios are evicted and counted"
        );
    }
    size
}

fn replay(path: &Path, folio_table_size: usize) -> anyhow::Result<ExitCode> {
    let folio_table_size = folio_table_size_for_host(folio_table_size);
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader =
        record::Reader::new(BufReader::new(file)).with_context(|| format!("{}", path.display()))?;
    let metrics = Arc::new(Metrics::new());
    let mut aggregator = Aggregator::new(Arc::clone(&metrics), folio_table_size);
    // Records are replayed in the order they were recorded: the live daemon
    // records each batch after sorting it.
    let mut sink =
        ingest::Sink::new(Arc::new(Mutex::new(Aggregator::new(Arc::new(Metrics::new()), 1))), None);
    let mut records = 0u64;
    while let Some(bytes) = reader.next_record().with_context(|| format!("{}", path.display()))? {
        sink.take(&mut aggregator, bytes)?;
        records += 1;
    }
    aggregator.publish_metrics();
    print!("{}", metrics.render());
    eprintln!("replayed {records} records from {}", path.display());
    Ok(ExitCode::SUCCESS)
}

fn check(btf_path: Option<PathBuf>, load: bool) -> anyhow::Result<ExitCode> {
    let path = btf_path.clone().unwrap_or_else(|| DEFAULT_BTF_PATH.into());
    let btf = layout::load_btf(&path)?;
    let resolved = layout::resolve(&btf)?;
    println!("BTF: {}", path.display());
    println!("\n{:<32} {:<18} {:>7}  consequence", "field", "member", "offset");
    for f in &resolved.fields {
        let offset = f.offset.map_or("absent".to_owned(), |o| o.to_string());
        let consequence = if f.offset.is_none() { layout::consequence(f.slot) } else { "" };
        println!("{:<32} {:<18} {:>7}  {consequence}", f.slot, f.member.unwrap_or("-"), offset);
    }

    // With a BTF file, a function counts as present when BTF describes it;
    // on the running kernel, when it is in /proc/kallsyms (out of line).
    let symbols = match &btf_path {
        Some(_) => None,
        None => Some(KernelSymbols::read().context("reading /proc/kallsyms")?),
    };
    let traceable = if btf_path.is_none() { KernelSymbols::traceable() } else { None };
    let kprobes_possible =
        btf_path.is_some() || Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    let mut core_missing = 0;
    println!("\n{:<22} {:<30} {:<8} {:<8} empty without it", "probe", "function", "mode", "need");
    for spec in probes::PROBES {
        let found = spec.candidates.iter().find_map(|c| {
            let function = match &symbols {
                Some(symbols) => symbols.find(c.function)?,
                None => layout::has_function(&btf, c.function).then(|| c.function.to_owned())?,
            };
            let fentry = layout::has_function(&btf, c.function)
                && traceable.as_ref().is_none_or(|t| t.contains(c.function));
            Some((function, fentry))
        });
        let (function, mode) = match &found {
            Some((f, true)) => (f.as_str(), "fentry"),
            Some((f, false)) => (f.as_str(), "kprobe"),
            None => ("MISSING", "-"),
        };
        let need = if spec.need == Need::Core { "core" } else { "optional" };
        if found.is_none() && spec.need == Need::Core {
            core_missing += 1;
        }
        let feeds = if found.is_none() { spec.feeds } else { "" };
        println!("{:<22} {:<30} {:<8} {:<8} {feeds}", spec.name, function, mode, need);
    }
    let whole_fault = match &symbols {
        Some(symbols) => probes::whole_fault_windows(symbols),
        None => !layout::has_function(&btf, "do_wp_page"),
    };
    println!(
        "\nwrite faults: {}",
        if whole_fault {
            "do_wp_page is inlined: classified over handle_mm_fault (a COW is a cleared present PTE and a new anonymous folio)"
        } else {
            "classified inside do_wp_page"
        }
    );
    println!(
        "\nmode: fentry where BTF describes the function and ftrace can trace it{}; else kprobe",
        if traceable.is_none() { " (tracefs not readable: assumed)" } else { "" }
    );
    if !kprobes_possible {
        println!("this kernel has no kprobe PMU (CONFIG_KPROBES=n): kprobes cannot attach");
    }
    if load {
        let mut ebpf = ingest::load(&resolved.layout, 1 << 16, Wakeup::Batch, false)?;
        let _logger = aya_log::EbpfLogger::init(&mut ebpf).context("setting up eBPF logging")?;
        let loaded = probes::load_kprobes(&mut ebpf)?;
        println!("\nverifier: {loaded} kprobe programs loaded into this kernel (not attached)");
    }
    Ok(if core_missing == 0 && kprobes_possible { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The [`VMSTAT_COUNTERS`] from `/proc/vmstat`; 0 for a counter this
/// kernel lacks. mapcountd's own anonymous pages are taken out, as the
/// kernel side leaves its address space out of the table (its heap grows
/// with the table). Its file and driver mappings (binary, ring buffer) are
/// made once at start and left in: RssFile counts the ring buffer's pages
/// twice (it is mapped twice, to wrap), nr_mapped once.
fn read_vmstat() -> Vec<u64> {
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let own_pages = |names: &[&str]| names.iter().map(|n| field(&status, n)).sum::<u64>() / 4;
    VMSTAT_COUNTERS
        .iter()
        .map(|counter| {
            let kernel = field(&vmstat, &format!("{counter} "));
            match *counter {
                "nr_anon_pages" => kernel.saturating_sub(own_pages(&["RssAnon:"])),
                _ => kernel,
            }
        })
        .collect()
}
