//! Reading a daemon's `/metrics` for `audit`, `report` and `top`.

use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// GET over HTTP/1.0 (the server closes the connection after the answer).
/// Plain HTTP only: a daemon behind TLS or basic auth is read with `curl`
/// into `--file -`.
pub(crate) fn fetch(url: &str, timeout: Duration) -> anyhow::Result<String> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!(
            "{url}: only http:// is read directly; for https or basic auth pipe a scrape in: curl ... | mapcountd <command> --file -"
        );
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, format!("/{path}")),
        None => (rest, "/metrics".to_owned()),
    };
    let address = authority
        .to_socket_addrs()
        .with_context(|| format!("{authority}: not a host and port"))?
        .next()
        .with_context(|| format!("{authority}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("cannot connect to {authority}"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).with_context(|| format!("reading the answer of {url}"))?;
    let (head, body) = answer.split_once("\r\n\r\n").context("an answer without headers")?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{url}: {status}");
    }
    Ok(body.to_owned())
}

/// A saved scrape (`-`: stdin) or, without one, the daemon at `url`;
/// refused when it holds no mapcount metrics.
pub(crate) fn read(url: &str, file: Option<&Path>) -> anyhow::Result<String> {
    let text = match file {
        Some(path) if path == Path::new("-") => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading the metrics from stdin")?;
            text
        }
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        None => fetch(url, Duration::from_secs(30))?,
    };
    if !text.contains("mapcount_") {
        bail!("no mapcount metrics in what was read");
    }
    Ok(text)
}
