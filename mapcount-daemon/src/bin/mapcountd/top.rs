//! `mapcountd top`: a live view of a running daemon for a plain terminal
//! (over SSH, no mouse). It scrapes `/metrics` every interval and shows
//! rates between two scrapes and the live table's figures; `--follow`
//! adds the last lines of a file under them (`cargo xtask run` shows the
//! VM's console there).

use std::{
    collections::BTreeMap,
    fs::File,
    io::{IsTerminal as _, Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::bail;
use clap::Args;
use mapcount_daemon::{config, exposition::Scrape, summary};
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Paragraph, Row, Table},
};

use crate::scrape;

#[derive(Args)]
pub(crate) struct TopArgs {
    /// The daemon's metrics, over plain HTTP.
    #[arg(long, default_value = "http://127.0.0.1:9730/metrics")]
    url: String,
    /// Time between scrapes (`1s`, `500ms`).
    #[arg(long, default_value = "1s", value_parser = config::duration)]
    interval: Duration,
    /// Show the last lines of this file under the figures.
    #[arg(long, value_name = "PATH")]
    follow: Option<PathBuf>,
    /// Quit when the process with this ID has ended.
    #[arg(long, value_name = "PID")]
    while_pid: Option<i32>,
}

/// Write-fault outcomes in a fixed order, so columns do not jump.
const OUTCOMES: [&str; 5] = ["reuse", "copy", "copy_zero_page", "shared", "unshare"];

pub(crate) fn top(args: TopArgs) -> anyhow::Result<ExitCode> {
    if !std::io::stdout().is_terminal() {
        bail!("mapcountd top draws on a terminal; for a one-off summary use mapcountd report");
    }
    let mut terminal = ratatui::init();
    let result = show(&mut terminal, &args);
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

fn show(terminal: &mut DefaultTerminal, args: &TopArgs) -> anyhow::Result<()> {
    let mut view =
        View { url: args.url.clone(), current: None, previous: None, error: None, console: vec![] };
    // Keys typed before the view appeared (while a build ran) are not for it.
    while event::poll(Duration::ZERO)? {
        event::read()?;
    }
    let mut next_scrape = Instant::now();
    loop {
        if Instant::now() >= next_scrape {
            view.scrape(args.interval.max(Duration::from_secs(5)));
            next_scrape = Instant::now() + args.interval;
        }
        if let Some(path) = &args.follow {
            view.console = last_lines(path);
        }
        if args.while_pid.is_some_and(|pid| !alive(pid)) {
            return Ok(());
        }
        terminal.draw(|frame| view.draw(frame, args.follow.as_deref()))?;
        let wait = next_scrape.saturating_duration_since(Instant::now()).min(Duration::from_millis(250));
        if event::poll(wait)?
            && let Event::Key(key) = event::read()?
            && key.kind == KeyEventKind::Press
            && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL)))
        {
            return Ok(());
        }
    }
}

/// Signal 0 tests that the process exists without touching it.
fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The last lines of a file that keeps growing (a console log), with
/// control characters blanked so they cannot move the cursor.
fn last_lines(path: &Path) -> Vec<String> {
    const TAIL: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return vec![format!("({} not readable yet)", path.display())];
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(TAIL)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes)
        .lines()
        .skip(usize::from(length > TAIL))
        .map(|line| line.chars().map(|c| if c.is_control() { ' ' } else { c }).collect())
        .collect()
}

struct View {
    url: String,
    current: Option<Scrape>,
    previous: Option<Scrape>,
    /// Why the last scrape failed (the daemon may still be starting).
    error: Option<String>,
    console: Vec<String>,
}

impl View {
    fn scrape(&mut self, timeout: Duration) {
        match scrape::fetch(&self.url, timeout) {
            Ok(text) => {
                self.previous = self.current.replace(Scrape::new(text));
                self.error = None;
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Per second between the last two scrapes, once there are two.
    fn rate(&self, name: &str, matching: &[(&str, &str)]) -> Option<f64> {
        let (now, before) = (self.current.as_ref()?, self.previous.as_ref()?);
        let seconds = now.taken.duration_since(before.taken).as_secs_f64();
        (seconds > 0.0).then(|| (now.sum(name, matching) - before.sum(name, matching)).max(0.0) / seconds)
    }

    fn rate_text(&self, name: &str, matching: &[(&str, &str)]) -> String {
        self.rate(name, matching).map_or_else(|| "-".to_owned(), summary::count)
    }

    fn draw(&self, frame: &mut Frame, follow: Option<&Path>) {
        let console_height =
            if follow.is_some() { Constraint::Percentage(35) } else { Constraint::Length(0) };
        let [header, figures, table, console] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(8),
            Constraint::Min(4),
            console_height,
        ])
        .areas(frame.area());
        frame.render_widget(Paragraph::new(self.header()), header);
        let Some(now) = &self.current else {
            let waiting = format!("waiting for {}", self.url);
            frame.render_widget(Paragraph::new(waiting).block(Block::bordered()), figures);
            self.draw_console(frame, follow, console);
            return;
        };
        frame.render_widget(
            Paragraph::new(self.figures(now)).block(Block::bordered().title(" now ")),
            figures,
        );
        frame.render_widget(folio_table(now), table);
        self.draw_console(frame, follow, console);
    }

    fn header(&self) -> Line<'static> {
        let kernel = self
            .current
            .as_ref()
            .and_then(|s| s.series("mapcount_kernel_info").into_iter().next())
            .and_then(|(labels, _)| labels.into_iter().find(|(k, _)| k == "release").map(|(_, v)| v))
            .unwrap_or_else(|| "?".to_owned());
        let state = match &self.error {
            Some(e) => format!("  [{e}]"),
            None => String::new(),
        };
        Line::from(format!("mapcountd top  {}  kernel {kernel}  q quits{state}", self.url))
            .style(Style::new().add_modifier(Modifier::BOLD))
    }

    fn figures(&self, now: &Scrape) -> Vec<Line<'static>> {
        let faults: Vec<String> = OUTCOMES
            .iter()
            .map(|o| format!("{o} {}", self.rate_text("mapcount_cow_faults_total", &[("outcome", o)])))
            .collect();
        let lost_total = now.sum("mapcount_events_lost_total", &[]);
        let refcount = now.max("mapcount_folio_refcount_max").unwrap_or(0.0);
        let headroom = now.max("mapcount_refcount_headroom_ratio").unwrap_or(0.0);
        let sources = now.by("mapcount_nomapping_pages_mapped_total", &["source"]);
        let driver_pages: f64 = sources.values().sum();
        let (attached, asked, modes) = summary::probes(now);
        let (were_shared, went) = summary::folios_that_were_shared(now);
        vec![
            Line::from(format!("write faults/s  {}", faults.join("  "))),
            Line::from(format!(
                "events/s        {}   rmap calls/s {}   forks/s {}",
                self.rate_text("mapcount_events_total", &[]),
                self.rate_text("mapcount_rmap_calls_total", &[]),
                self.rate_text("mapcount_forks_total", &[]),
            )),
            Line::from(format!(
                "lost events     {} in all, {}/s{}",
                summary::count(lost_total),
                self.rate_text("mapcount_events_lost_total", &[]),
                if lost_total > 0.0 { "  (figures are not exact)" } else { "" }
            ))
            .style(if lost_total > 0.0 {
                Style::new().add_modifier(Modifier::REVERSED)
            } else {
                Style::new()
            }),
            Line::from(format!(
                "refcount        highest {}: {:.6}% of the 2^31 limit",
                summary::count(refcount),
                headroom * 100.0
            )),
            Line::from(format!(
                "driver-mapped   {} pages without folio->mapping{}",
                summary::count(driver_pages),
                top_sources(&sources)
            )),
            Line::from(format!(
                "probes          {attached} of {asked} attached ({})   folios gone: {} of {} were shared",
                modes.join(", "),
                summary::count(were_shared),
                summary::count(went)
            )),
        ]
    }

    fn draw_console(&self, frame: &mut Frame, follow: Option<&Path>, area: ratatui::layout::Rect) {
        let Some(path) = follow else { return };
        let rows = usize::from(area.height.saturating_sub(2));
        let lines: Vec<Line> = self.console[self.console.len().saturating_sub(rows)..]
            .iter()
            .map(|l| Line::from(l.clone()))
            .collect();
        frame.render_widget(
            Paragraph::new(lines).block(Block::bordered().title(format!(" {} ", path.display()))),
            area,
        );
    }
}

fn top_sources(sources: &BTreeMap<Vec<String>, f64>) -> String {
    let mut rows: Vec<_> = sources.iter().filter(|(_, v)| **v > 0.0).collect();
    rows.sort_by(|a, b| b.1.total_cmp(a.1));
    let shown: Vec<String> =
        rows.iter().take(3).map(|(k, v)| format!("{} {}", k.concat(), summary::count(**v))).collect();
    if shown.is_empty() { String::new() } else { format!(": {}", shown.join(", ")) }
}

/// Live folios by kind and order: how many, how many shared, how many
/// partially mapped, and the bytes of them no page table maps.
fn folio_table(now: &Scrape) -> Table<'static> {
    let keys = ["kind", "order"];
    let live = now.by("mapcount_folios", &keys);
    let shared = now.by("mapcount_folios_shared", &keys);
    let partial = now.by("mapcount_folios_partially_mapped", &keys);
    let unmapped = now.by("mapcount_partially_mapped_unmapped_bytes", &keys);
    let mut rows: Vec<&Vec<String>> = live.keys().chain(shared.keys()).chain(partial.keys()).collect();
    rows.sort_by_key(|k| (k[0].clone(), k[1].parse::<u32>().unwrap_or(u32::MAX)));
    rows.dedup();
    let get = |map: &BTreeMap<Vec<String>, f64>, k: &Vec<String>| map.get(k).copied().unwrap_or(0.0);
    let rows: Vec<Row> = rows
        .into_iter()
        .filter(|k| get(&live, k) > 0.0 || get(&shared, k) > 0.0 || get(&partial, k) > 0.0)
        .map(|k| {
            Row::new(vec![
                k[0].clone(),
                k[1].clone(),
                summary::count(get(&live, k)),
                summary::count(get(&shared, k)),
                summary::count(get(&partial, k)),
                summary::bytes(get(&unmapped, k)),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(10),
        Constraint::Length(6),
        Constraint::Length(12),
        Constraint::Length(12),
        Constraint::Length(17),
        Constraint::Length(14),
    ];
    Table::new(rows, widths)
        .header(
            Row::new(vec!["kind", "order", "live", "shared", "partially mapped", "unmapped"])
                .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title(" folios mapped now "))
}
