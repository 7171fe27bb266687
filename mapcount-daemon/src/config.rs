//! The optional configuration file (`--config.file`, TOML). Every key has
//! a flag of the same name; a flag given on the command line wins.
//!
//! ```toml
//! [web]
//! listen_address = "0.0.0.0:9730"
//! telemetry_path = "/metrics"
//! max_connections = 256    # open at once; the idlest makes room for a new one
//! max_requests = 40        # answered at once; beyond it, 503
//! idle_timeout = "90s"     # no request for this long: closed
//! header_read_timeout = "10s"  # request header, or TLS handshake, not done: closed
//! [attach]
//! mode = "auto"            # auto | fentry | kprobe
//! [ringbuf]
//! size = 8388608           # bytes, a power of two of at least 4096
//! [folio_table]
//! size = 1048576           # folios
//! [record]
//! max_size = "1G"          # the --record file stops here
//! [log]
//! level = "info"
//! ```
//!
//! Values that parse but make no sense (a log level nobody spells, a
//! telemetry path without its `/`, a table of no folios) are refused here
//! and as flags, with the key or flag named.

use std::{net::SocketAddr, path::Path};

use serde::Deserialize;

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// fentry/fexit where the kernel allows it, else kprobe/kretprobe.
    Auto,
    Fentry,
    Kprobe,
}

/// When the kernel side wakes the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wakeup {
    /// Only once 1/16 of the ring buffer is waiting; the daemon also drains
    /// every 20 ms. Fewer wake-ups on the traced CPUs.
    Batch,
    /// The kernel's default: wake the daemon at each record it has not yet seen.
    EveryRecord,
}

impl AttachMode {
    pub fn label(self) -> &'static str {
        match self {
            AttachMode::Auto => "auto",
            AttachMode::Fentry => "fentry",
            AttachMode::Kprobe => "kprobe",
        }
    }
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub web: Web,
    pub attach: Attach,
    pub ringbuf: Ringbuf,
    pub folio_table: FolioTable,
    pub record: Record,
    pub log: Log,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Web {
    pub listen_address: Option<SocketAddr>,
    pub telemetry_path: Option<toml::Spanned<String>>,
    pub max_connections: Option<toml::Spanned<usize>>,
    pub max_requests: Option<toml::Spanned<usize>>,
    pub idle_timeout: Option<toml::Spanned<String>>,
    pub header_read_timeout: Option<toml::Spanned<String>>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Record {
    pub max_size: Option<toml::Spanned<String>>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Attach {
    pub mode: Option<AttachMode>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Ringbuf {
    pub size: Option<toml::Spanned<u32>>,
    pub wakeup: Option<Wakeup>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FolioTable {
    pub size: Option<toml::Spanned<usize>>,
    pub memory: Option<toml::Spanned<String>>,
    pub sample_shift: Option<toml::Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub level: Option<toml::Spanned<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `file:line:column: what`, as compilers say it.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: String, line: usize, column: usize, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let invalid = |offset: usize, message: String| {
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            ConfigError::Invalid { path: path.to_owned(), line, column, message }
        };
        let config: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            invalid(offset, e.message().to_owned())
        })?;
        let check = |key: &str, span: std::ops::Range<usize>, result: Result<(), ValueError>| {
            result.map_err(|why| invalid(span.start, format!("{key}: {why}")))
        };
        if let Some(size) = &config.ringbuf.size {
            check("ringbuf.size", size.span(), ring_buffer_size(*size.get_ref()).map(drop))?;
        }
        if let Some(path) = &config.web.telemetry_path {
            check("web.telemetry_path", path.span(), telemetry_path(path.get_ref()).map(drop))?;
        }
        for (key, value) in [
            ("web.max_connections", &config.web.max_connections),
            ("web.max_requests", &config.web.max_requests),
            ("folio_table.size", &config.folio_table.size),
        ] {
            if let Some(n) = value {
                check(key, n.span(), at_least_one(*n.get_ref()).map(drop))?;
            }
        }
        for (key, value) in [
            ("web.idle_timeout", &config.web.idle_timeout),
            ("web.header_read_timeout", &config.web.header_read_timeout),
        ] {
            if let Some(text) = value {
                check(key, text.span(), duration(text.get_ref()).map(drop))?;
            }
        }
        if let Some(size) = &config.record.max_size {
            check("record.max_size", size.span(), byte_size(size.get_ref()).map(drop))?;
        }
        if let Some(memory) = &config.folio_table.memory {
            check("folio_table.memory", memory.span(), byte_size(memory.get_ref()).map(drop))?;
        }
        if let Some(shift) = &config.folio_table.sample_shift
            && *shift.get_ref() > mapcount_common::sampling::MAX_SHIFT
        {
            check("folio_table.sample_shift", shift.span(), Err(ValueError::SampleShift(*shift.get_ref())))?;
        }
        if let Some(level) = &config.log.level {
            check("log.level", level.span(), log_level(level.get_ref()).map(drop))?;
        }
        Ok(config)
    }
}

// Checks shared by the flags (as clap value parsers) and the file's keys.

/// A value that parses but makes no sense, with what was given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValueError {
    #[error("{0} is not a power of two of at least 4096")]
    RingBufferSize(u32),
    #[error("must be at least 1")]
    Zero,
    #[error("{0:?} does not start with /: no request could reach it")]
    PathWithoutSlash(String),
    #[error("{0:?} holds a ?, # or space: no request path equals it")]
    PathWithQuery(String),
    #[error("{0:?} is not a duration like 90s, 2m or 500ms")]
    Duration(String),
    #[error("{0:?}: must be longer than 0")]
    ZeroDuration(String),
    #[error("{0:?} is not a size like 1048576, 512M or 1G")]
    Size(String),
    #[error("{0:?} is too large")]
    SizeTooLarge(String),
    #[error("{0:?} is below 1M")]
    SizeTooSmall(String),
    #[error("{0} is above 20 (one small folio in 2^20)")]
    SampleShift(u32),
    #[error("{0:?} names no level: use one of off, error, warn, info, debug, trace (or target=level)")]
    LogLevel(String),
    #[error("empty: use one of error, warn, info, debug, trace")]
    EmptyLogLevel,
    #[error("{0}")]
    NotANumber(#[from] std::num::ParseIntError),
}

/// `--ringbuf.size` unless set: the most records one drain can find.
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 8 << 20;

pub fn ring_buffer_size(n: u32) -> Result<u32, ValueError> {
    if n < 4096 || !n.is_power_of_two() {
        return Err(ValueError::RingBufferSize(n));
    }
    Ok(n)
}

pub fn at_least_one(n: usize) -> Result<usize, ValueError> {
    if n == 0 {
        return Err(ValueError::Zero);
    }
    Ok(n)
}

/// A path the endpoint can serve: `/` and then no query or fragment.
pub fn telemetry_path(path: &str) -> Result<String, ValueError> {
    if !path.starts_with('/') {
        return Err(ValueError::PathWithoutSlash(path.to_owned()));
    }
    if path.contains(['?', '#', ' ']) {
        return Err(ValueError::PathWithQuery(path.to_owned()));
    }
    Ok(path.to_owned())
}

/// `90s`, `2m`, `500ms`, `1h`: a positive duration in Prometheus's spelling.
pub fn duration(text: &str) -> Result<std::time::Duration, ValueError> {
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(unit_at);
    let n: u64 = number.parse().map_err(|_| ValueError::Duration(text.to_owned()))?;
    let millis = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(ValueError::Duration(text.to_owned())),
    };
    if millis == 0 {
        return Err(ValueError::ZeroDuration(text.to_owned()));
    }
    Ok(std::time::Duration::from_millis(millis))
}

/// `4096`, `512K`, `100M`, `1G`: bytes, at least 1 MiB (a record file's
/// batch is larger than that at a busy moment).
pub fn byte_size(text: &str) -> Result<u64, ValueError> {
    let (number, shift) = match text.strip_suffix(['K', 'M', 'G', 'T']) {
        Some(number) => {
            (number, 10 * (1 + "KMGT".find(text.chars().last().unwrap_or('K')).unwrap_or(0) as u32))
        }
        None => (text, 0),
    };
    let n: u64 = number.parse().map_err(|_| ValueError::Size(text.to_owned()))?;
    let bytes = n
        .checked_shl(shift)
        .filter(|b| b >> shift == n)
        .ok_or_else(|| ValueError::SizeTooLarge(text.to_owned()))?;
    if bytes < 1 << 20 {
        return Err(ValueError::SizeTooSmall(text.to_owned()));
    }
    Ok(bytes)
}

/// A log filter as in RUST_LOG, where every directive names a level:
/// `info`, `debug,hyper=warn`. An unknown word would otherwise be taken as
/// a module name and leave every line silenced.
pub fn log_level(filter: &str) -> Result<String, ValueError> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    for directive in filter.split(',').filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(ValueError::LogLevel(directive.to_owned()));
        }
    }
    if filter.split(',').all(str::is_empty) {
        return Err(ValueError::EmptyLogLevel);
    }
    Ok(filter.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        Config::parse(text, "mapcountd.toml").unwrap_err().to_string()
    }

    #[test]
    fn reads_every_key() {
        let config = Config::parse(
            "[web]\nlisten_address = \"127.0.0.1:9999\"\ntelemetry_path = \"/m\"\n[attach]\nmode = \"kprobe\"\n\
             [ringbuf]\nsize = 65536\nwakeup = \"every-record\"\n[folio_table]\nsize = 10\n[log]\nlevel = \"debug\"\n",
            "x",
        )
        .unwrap();
        assert_eq!(config.web.listen_address, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(config.attach.mode, Some(AttachMode::Kprobe));
        assert_eq!(config.ringbuf.size.map(|s| s.into_inner()), Some(65536));
        assert_eq!(config.ringbuf.wakeup, Some(Wakeup::EveryRecord));
        assert_eq!(config.folio_table.size.map(|s| s.into_inner()), Some(10));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        assert_eq!(
            error("[web]\nlisten_adress = \"x\"\n"),
            "mapcountd.toml:2:1: unknown field `listen_adress`, expected one of `listen_address`, \
             `telemetry_path`, `max_connections`, `max_requests`, `idle_timeout`, `header_read_timeout`"
        );
        assert!(
            error("[attach]\nmode = \"fast\"\n").starts_with("mapcountd.toml:2:8: unknown variant `fast`")
        );
        assert!(error("[web\n").starts_with("mapcountd.toml:1:"));
        assert_eq!(
            error("[ringbuf]\nsize = 1000\n"),
            "mapcountd.toml:2:8: ringbuf.size: 1000 is not a power of two of at least 4096"
        );
        assert!(
            error("[web]\nlisten_address = \"nowhere\"\n")
                .starts_with("mapcountd.toml:2:18: invalid socket address")
        );
    }

    #[test]
    fn values_that_make_no_sense_are_refused() {
        assert!(
            error("[log]\nlevel = \"shout\"\n")
                .starts_with("mapcountd.toml:2:9: log.level: \"shout\" names no level")
        );
        assert!(
            error("[web]\ntelemetry_path = \"nope\"\n")
                .starts_with("mapcountd.toml:2:18: web.telemetry_path:")
        );
        assert_eq!(
            error("[folio_table]\nsize = 0\n"),
            "mapcountd.toml:2:8: folio_table.size: must be at least 1"
        );
        assert!(error("[web]\nidle_timeout = \"0s\"\n").contains("web.idle_timeout"));
        assert!(error("[record]\nmax_size = \"lots\"\n").contains("record.max_size"));
        assert!(error("[web]\nmax_connections = 0\n").contains("web.max_connections: must be at least 1"));
    }

    #[test]
    fn values_parse_as_documented() {
        assert_eq!(log_level("debug,hyper=WARN"), Ok("debug,hyper=WARN".to_owned()));
        assert!(log_level("").is_err());
        assert!(log_level("mapcount_daemon").is_err());
        assert_eq!(duration("90s"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(duration("2m"), Ok(std::time::Duration::from_secs(120)));
        assert_eq!(duration("500ms"), Ok(std::time::Duration::from_millis(500)));
        assert!(duration("90").is_err());
        assert_eq!(byte_size("1G"), Ok(1 << 30));
        assert_eq!(byte_size("2097152"), Ok(2 << 20));
        assert!(byte_size("512K").is_err());
        assert!(byte_size("99999999999T").is_err());
        assert_eq!(telemetry_path("/metrics"), Ok("/metrics".to_owned()));
        assert!(telemetry_path("nope").is_err());
    }
}
