//! The optional configuration file (`--config.file`, TOML). Every key has
//! a flag of the same name; a flag given on the command line wins.
//!
//! ```toml
//! [web]
//! listen_address = "0.0.0.0:9730"
//! telemetry_path = "/metrics"
//! [attach]
//! mode = "auto"            # auto | fentry | kprobe
//! [ringbuf]
//! size = 8388608           # bytes, a power of two of at least 4096
//! [folio_table]
//! size = 1048576           # folios
//! [log]
//! level = "info"
//! ```

use std::{net::SocketAddr, path::Path};

use serde::Deserialize;

use crate::probes::{AttachMode, Wakeup};

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub web: Web,
    pub attach: Attach,
    pub ringbuf: Ringbuf,
    pub folio_table: FolioTable,
    pub log: Log,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Web {
    pub listen_address: Option<SocketAddr>,
    pub telemetry_path: Option<String>,
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
    pub size: Option<usize>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    pub level: Option<String>,
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
        if let Some(size) = &config.ringbuf.size {
            let n = *size.get_ref();
            if n < 4096 || !n.is_power_of_two() {
                return Err(invalid(
                    size.span().start,
                    format!("ringbuf.size: {n} is not a power of two of at least 4096"),
                ));
            }
        }
        Ok(config)
    }
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
        assert_eq!(config.ringbuf.wakeup, Some(crate::probes::Wakeup::EveryRecord));
        assert_eq!(config.folio_table.size, Some(10));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        assert_eq!(
            error("[web]\nlisten_adress = \"x\"\n"),
            "mapcountd.toml:2:1: unknown field `listen_adress`, expected `listen_address` or `telemetry_path`"
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
}
