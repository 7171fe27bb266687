//! The daemon's flags and configuration file merged into its settings,
//! and SIGHUP's reload of the file.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use mapcount_daemon::{
    DEFAULT_LISTEN_ADDRESS,
    config::{self, AttachMode, Config, Wakeup},
    http,
    layout::DEFAULT_BTF_PATH,
    resources,
    web_config::WebSecurity,
};
use tracing_subscriber::EnvFilter;

/// Flags of the daemon. Each has a key in the configuration file; a flag
/// given here wins over the file, the file over the default.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
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
    /// Memory for the folio table: small folios are tracked exactly until it
    /// is full, then a sample of them (large folios always) [default: 256M,
    /// lowered to half a cgroup memory limit].
    #[arg(long = "folio-table.memory", value_name = "BYTES", value_parser = config::byte_size)]
    folio_table_memory: Option<u64>,
    /// Track one small folio in 2^N from the start, not only once
    /// --folio-table.memory is reached (a cheaper kernel side) [default: 0].
    #[arg(long = "folio-table.sample-shift", value_name = "N", value_parser = clap::value_parser!(u32).range(0..=20))]
    folio_table_sample_shift: Option<u32>,
    /// Most folios the table holds, large ones included; beyond it, entries
    /// are evicted and counted [default: twice what --folio-table.memory holds].
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
pub(crate) struct Settings {
    pub(crate) config_file: Option<PathBuf>,
    pub(crate) web_security: WebSecurity,
    pub(crate) listen_address: SocketAddr,
    pub(crate) telemetry_path: String,
    pub(crate) web_limits: http::Limits,
    /// --web.max-connections given (or in the file), not the default.
    pub(crate) max_connections_asked: bool,
    pub(crate) ring_buffer_bytes: u32,
    pub(crate) wakeup: Wakeup,
    pub(crate) attach_mode: AttachMode,
    pub(crate) folio_table_memory: u64,
    pub(crate) folio_table_sample_shift: u32,
    pub(crate) folio_table_size: usize,
    pub(crate) btf: PathBuf,
    pub(crate) record: Option<PathBuf>,
    pub(crate) record_max_size: u64,
    pub(crate) dump_on_exit: Option<PathBuf>,
    pub(crate) log_level: String,
}

/// A configuration file that cannot be used (exit status 2).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SettingsError {
    #[error(transparent)]
    Config(#[from] mapcount_daemon::config::ConfigError),
    #[error(transparent)]
    Web(#[from] mapcount_daemon::web_config::WebConfigError),
}

impl Settings {
    pub(crate) fn resolve(args: RunArgs) -> Result<Settings, SettingsError> {
        let file = match &args.config_file {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let web_security = match &args.web_config_file {
            Some(path) => WebSecurity::load(path)?,
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
        let folio_table_memory = args
            .folio_table_memory
            .or(file.folio_table.memory.and_then(|s| config::byte_size(s.get_ref()).ok()))
            .unwrap_or(DEFAULT_TABLE_MEMORY);
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
                .unwrap_or(mapcount_daemon::config::DEFAULT_RING_BUFFER_BYTES),
            wakeup: args.wakeup.or(file.ringbuf.wakeup).unwrap_or(Wakeup::Batch),
            attach_mode: args.attach_mode.or(file.attach.mode).unwrap_or(AttachMode::Auto),
            folio_table_memory,
            folio_table_sample_shift: args
                .folio_table_sample_shift
                .or(file.folio_table.sample_shift.map(|n| n.into_inner()))
                .unwrap_or(0),
            folio_table_size: args
                .folio_table_size
                .or(file.folio_table.size.map(|n| n.into_inner()))
                .unwrap_or_else(|| default_table_size(folio_table_memory)),
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

/// What a test host gives the folio table by default: 1.6 million folios
/// (6.4 GiB of small folios mapped) tracked exactly.
pub(crate) const DEFAULT_TABLE_MEMORY: u64 = 256 << 20;

/// The hard bound on entries: twice what `memory` holds at the measured
/// bytes per folio, room for large folios, which are never sampled.
pub(crate) fn default_table_size(memory: u64) -> usize {
    usize::try_from(memory / resources::BYTES_PER_FOLIO).unwrap_or(usize::MAX).saturating_mul(2).max(1)
}

pub(crate) fn parse_ring_size(s: &str) -> Result<u32, config::ValueError> {
    config::ring_buffer_size(s.parse()?)
}

pub(crate) fn parse_at_least_one(s: &str) -> Result<usize, config::ValueError> {
    config::at_least_one(s.parse()?)
}

/// Handle to change the log filter of the running daemon.
pub(crate) type LogFilter = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// SIGHUP: read the configuration file again. The log level applies at
/// once; anything else that changed is named, and needs a restart (the
/// ring buffer and the programs are sized and attached at start).
pub(crate) fn reload(config_file: Option<&Path>, running: &Settings, log_filter: &LogFilter) {
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
        (
            "folio_table.memory",
            file.folio_table
                .memory
                .as_ref()
                .is_some_and(|m| config::byte_size(m.get_ref()).ok() != Some(running.folio_table_memory)),
        ),
    ];
    for (key, changed) in restart_needed {
        if changed {
            tracing::warn!(key, "SIGHUP: changed in the configuration file; takes effect after a restart");
        }
    }
}
