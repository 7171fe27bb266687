//! `mapcountd audit`: the maybe-shared audit of a running daemon, from its
//! `/metrics` over plain HTTP, or from a saved scrape (`-` for stdin: pipe
//! in `curl` for a daemon behind TLS or basic auth); with `--kernel`, next
//! to this host's own smaps_rollup figures.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use mapcount_daemon::audit;

pub(crate) fn audit(url: &str, file: Option<&Path>, kernel: bool) -> anyhow::Result<ExitCode> {
    let text = match file {
        Some(path) if path == Path::new("-") => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading the metrics from stdin")?;
            text
        }
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        None => fetch(url)?,
    };
    if !text.contains("mapcount_") {
        bail!("no mapcount metrics in what was read");
    }
    let kernel = kernel.then(audit::kernel_rollups);
    print!("{}", audit::report(&text, kernel.as_ref()));
    Ok(ExitCode::SUCCESS)
}

/// GET over HTTP/1.0 (the server closes the connection after the answer).
fn fetch(url: &str) -> anyhow::Result<String> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!(
            "{url}: only http:// is read directly; for https or basic auth pipe a scrape in: curl ... | mapcountd audit --file -"
        );
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, format!("/{path}")),
        None => (rest, "/metrics".to_owned()),
    };
    let mut stream =
        TcpStream::connect(authority).with_context(|| format!("cannot connect to {authority}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
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
