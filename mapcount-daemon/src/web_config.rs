//! `--web.config.file`: TLS and basic authentication in the format of the
//! Prometheus exporter toolkit, so one file serves every exporter on a host.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: mapcountd.crt      # relative paths are relative to this file
//!   key_file: mapcountd.key
//! basic_auth_users:
//!   prometheus: $2y$10$...        # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! Other exporter-toolkit keys (client certificates, cipher lists, HTTP
//! headers) are not supported and are rejected by name.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::Engine as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Deserialize;
use tokio_rustls::{TlsAcceptor, rustls};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFiles>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Syntax { path: String, error: serde_norway::Error },
    #[error("{path}: basic_auth_users.{user}: not a bcrypt hash")]
    NotBcrypt { path: String, user: String },
    #[error("{path}: {error}")]
    Tls { path: String, error: TlsError },
}

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_server_config.cert_file {}: {error}", path.display())]
    Certificate { path: PathBuf, error: rustls_pki_types::pem::Error },
    #[error("tls_server_config.cert_file {}: no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("tls_server_config.key_file {}: {error}", path.display())]
    Key { path: PathBuf, error: rustls_pki_types::pem::Error },
    #[error("tls_server_config: {0}")]
    Config(#[from] rustls::Error),
}

/// What the HTTP server enforces.
#[derive(Clone, Default)]
pub struct WebSecurity {
    pub tls: Option<TlsAcceptor>,
    /// user → bcrypt hash; empty: no authentication.
    users: BTreeMap<String, String>,
}

impl WebSecurity {
    pub fn load(path: &Path) -> Result<WebSecurity, WebConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|error| WebConfigError::Read { path: name.clone(), error })?;
        let file: File = serde_norway::from_str(&text)
            .map_err(|error| WebConfigError::Syntax { path: name.clone(), error })?;
        for (user, hash) in &file.basic_auth_users {
            if !hash.starts_with("$2") {
                return Err(WebConfigError::NotBcrypt { path: name, user: user.clone() });
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            None => None,
            Some(files) => Some(
                acceptor(&base.join(&files.cert_file), &base.join(&files.key_file))
                    .map_err(|error| WebConfigError::Tls { path: name, error })?,
            ),
        };
        Ok(WebSecurity { tls, users: file.basic_auth_users })
    }

    /// Whether a request's `Authorization` header lets it in.
    pub fn authorized(&self, authorization: Option<&str>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some(encoded) = authorization.and_then(|h| h.strip_prefix("Basic ")) else { return false };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else { return false };
        let Some((user, password)) = decoded.split_once(':') else { return false };
        self.users.get(user).is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false))
    }
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certificate = |error| TlsError::Certificate { path: cert.to_owned(), error };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(certificate)?
        .collect::<Result<_, _>>()
        .map_err(certificate)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: cert.to_owned() });
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|error| TlsError::Key { path: key.to_owned(), error })?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_checks_bcrypt() {
        let mut users = BTreeMap::new();
        users.insert("prometheus".to_owned(), bcrypt::hash("s3cret", 4).unwrap());
        let security = WebSecurity { tls: None, users };
        let header = |credentials: &str| {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials))
        };
        assert!(security.authorized(Some(&header("prometheus:s3cret"))));
        assert!(!security.authorized(Some(&header("prometheus:wrong"))));
        assert!(!security.authorized(Some(&header("mallory:s3cret"))));
        assert!(!security.authorized(Some("Basic !!!")));
        assert!(!security.authorized(None));
        assert!(WebSecurity::default().authorized(None), "no users configured: open");
    }

    #[test]
    fn rejects_unsupported_keys_by_name() {
        let dir = std::env::temp_dir().join(format!("mapcount-webcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("web.yml");
        std::fs::write(&path, "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n").unwrap();
        let error = WebSecurity::load(&path).err().unwrap().to_string();
        assert!(error.contains("unknown field `client_auth_type`"), "{error}");
        std::fs::write(&path, "basic_auth_users:\n  alice: plaintext\n").unwrap();
        let error = WebSecurity::load(&path).err().unwrap().to_string();
        assert!(error.contains("basic_auth_users.alice: not a bcrypt hash"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
