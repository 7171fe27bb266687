//! `mapcountd audit`: the maybe-shared audit of a running daemon, from its
//! `/metrics` over plain HTTP, or from a saved scrape (`-` for stdin: pipe
//! in `curl` for a daemon behind TLS or basic auth); with `--kernel`, next
//! to this host's own smaps_rollup figures.

use std::{path::Path, process::ExitCode};

use mapcount_daemon::audit;

use crate::scrape;

pub(crate) fn audit(url: &str, file: Option<&Path>, kernel: bool) -> anyhow::Result<ExitCode> {
    let text = scrape::read(url, file)?;
    let kernel = kernel.then(audit::kernel_rollups);
    print!("{}", audit::report(&text, kernel.as_ref()));
    Ok(ExitCode::SUCCESS)
}
