//! `pyprobe top`: the functions with the most samples, every interval.
//!
//! On a terminal it is a full-screen view ([`crate::screen`]) redrawn in
//! place, with keys to sort by own or total samples, pause, show idle
//! threads and split rows per thread; otherwise (or with `--json`) one
//! table (or JSON document) per interval. Either way a last view gives the
//! shares over the whole run.

use std::{
    collections::HashMap,
    ops::ControlFlow,
    time::{Duration, Instant},
};

use serde::Serialize;
use tabled::{builder::Builder, settings::Style};

use super::{
    ProfileOptions, Session, Summary, Wake,
    output::{self, RowsOf, TopRow},
    sample_loop,
};
use crate::{
    live,
    screen::{self, Column, Input, Screen, View},
};

/// Options of `pyprobe top`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopOptions {
    /// What to sample.
    pub profile: ProfileOptions,
    /// Time between two views.
    #[serde(with = "crate::job::seconds")]
    pub interval: Duration,
    /// Rows per view (`None`: all in JSON, 25 in tables, what fits on the
    /// full screen).
    pub rows: Option<usize>,
    /// One JSON document per view instead of a table.
    pub json: bool,
}

/// Rows of a plain table when `--top` does not say.
const DEFAULT_TABLE_ROWS: usize = 25;

/// One view of `pyprobe top`.
#[derive(Debug, Clone, Serialize)]
pub struct TopReport {
    /// `"interval"` or `"final"`.
    pub kind: &'static str,
    /// Sampling rate, Hz.
    pub rate: u64,
    /// Samples in the last interval.
    pub interval_samples: u64,
    /// Length of the last interval, seconds.
    pub interval_s: f64,
    /// Functions: cumulative own and total samples, and their share of the
    /// last interval's samples (the whole run's in the final view).
    pub functions: Vec<TopLine>,
    /// The run so far.
    pub summary: Summary,
}

/// A function in a [`TopReport`].
#[derive(Debug, Clone, Serialize)]
pub struct TopLine {
    /// Cumulative samples.
    #[serde(flatten)]
    pub row: TopRow,
    /// Own samples in the last interval, percent of its samples; in the
    /// final view, over the whole run.
    pub own_percent: f64,
    /// Total samples in the last interval, percent of its samples; in the
    /// final view, over the whole run.
    pub total_percent: f64,
}

/// What the rows are ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortBy {
    /// Share of samples running the function itself.
    Own,
    /// Share of samples with the function anywhere on the stack.
    Total,
}

/// Orders `lines` by `by`, largest first.
fn sort_lines(lines: &mut [TopLine], by: SortBy) {
    lines.sort_by(|a, b| {
        let (a_share, b_share, a_n, b_n, a_m, b_m) = match by {
            SortBy::Own => (
                a.own_percent,
                b.own_percent,
                a.row.own,
                b.row.own,
                a.row.total,
                b.row.total,
            ),
            SortBy::Total => (
                a.total_percent,
                b.total_percent,
                a.row.total,
                b.row.total,
                a.row.own,
                b.row.own,
            ),
        };
        b_share
            .total_cmp(&a_share)
            .then(b_n.cmp(&a_n))
            .then(b_m.cmp(&a_m))
            .then_with(|| a.row.function.cmp(&b.row.function))
            .then(a.row.thread.cmp(&b.row.thread))
    });
}

/// A row of `top`: function, file, first line, thread.
type RowKey = (String, String, i32, Option<u32>);

/// Builds views from the profile, remembering the previous one for shares
/// of the last interval.
struct TopView {
    /// Cumulative (own, total) of each row at the previous view.
    previous: HashMap<RowKey, (u64, u64)>,
    /// Samples counted (under `rows_of`) at the previous view.
    previous_samples: u64,
    previous_at: Instant,
    rate: u64,
    /// Rows kept (`None`: all).
    rows: Option<usize>,
    sort: SortBy,
    rows_of: RowsOf,
}

impl TopView {
    fn new(rate: u64, rows: Option<usize>, rows_of: RowsOf) -> Self {
        Self {
            previous: HashMap::new(),
            previous_samples: 0,
            previous_at: Instant::now(),
            rate,
            rows,
            sort: SortBy::Own,
            rows_of,
        }
    }

    /// The view of now: shares of the interval since the previous view, or
    /// of the whole run when `kind` is `"final"`. Either way the next view
    /// counts from now.
    fn report(
        &mut self,
        session: &Session,
        started: Instant,
        kind: &'static str,
    ) -> anyhow::Result<TopReport> {
        let profile = &session.profile;
        let rows = output::top_rows_of(profile, self.rows_of);
        let counted = if self.rows_of.idle {
            profile.samples
        } else {
            profile.samples - profile.idle_samples
        };
        let interval_samples = counted.saturating_sub(self.previous_samples);
        // The final view gives shares over the whole run: its last interval
        // is a partial one, perhaps without a sample.
        let whole_run = kind == "final";
        let of = if whole_run { counted } else { interval_samples };
        let pct = |n: u64| percent(n, of);
        let mut lines: Vec<TopLine> = rows
            .into_iter()
            .map(|row| {
                let key = (
                    row.function.clone(),
                    row.file.clone(),
                    row.first_line,
                    row.thread,
                );
                let (own0, total0) = if whole_run {
                    (0, 0)
                } else {
                    self.previous.get(&key).copied().unwrap_or((0, 0))
                };
                self.previous.insert(key, (row.own, row.total));
                TopLine {
                    own_percent: pct(row.own.saturating_sub(own0)),
                    total_percent: pct(row.total.saturating_sub(total0)),
                    row,
                }
            })
            .collect();
        let now = Instant::now();
        let interval_s = if whole_run {
            now.duration_since(started)
        } else {
            now.duration_since(self.previous_at)
        }
        .as_secs_f64();
        self.previous_samples = counted;
        self.previous_at = now;
        sort_lines(&mut lines, self.sort);
        if let Some(n) = self.rows {
            lines.truncate(n);
        }
        Ok(TopReport {
            kind,
            rate: self.rate,
            interval_samples: if whole_run { counted } else { interval_samples },
            interval_s,
            functions: lines,
            summary: Summary::of(session, started)?,
        })
    }
}

/// The cells of one row, for the plain table and the full-screen view;
/// `thread` names a thread when rows are per thread.
fn cells(r: &TopReport, l: &TopLine, thread: impl Fn(u32) -> String) -> Vec<String> {
    let seconds = |n: u64| format!("{:.2}s", n as f64 / r.rate.max(1) as f64);
    let mut row = vec![
        format!("{:.1}", l.own_percent),
        format!("{:.1}", l.total_percent),
        seconds(l.row.own),
        seconds(l.row.total),
    ];
    if let Some(tid) = l.row.thread {
        row.push(thread(tid));
    }
    row.push(format!(
        "{} ({}:{})",
        l.row.function, l.row.file, l.row.first_line
    ));
    row
}

/// The table of a [`TopReport`].
fn top_table(r: &TopReport) -> String {
    let threads = r.functions.iter().any(|l| l.row.thread.is_some());
    let mut b = Builder::default();
    let mut titles = vec!["%Own", "%Total", "OwnTime", "TotalTime"];
    if threads {
        titles.push("Thread");
    }
    titles.push("Function (filename:line)");
    b.push_record(titles);
    for l in &r.functions {
        b.push_record(cells(r, l, |tid| tid.to_string()));
    }
    let s = &r.summary;
    let view = if r.kind == "final" {
        format!("whole run: {} samples in {:.1} s", s.samples, s.seconds)
    } else {
        format!(
            "{} samples in the last interval, {} in {:.0} s",
            r.interval_samples, s.samples, s.seconds
        )
    };
    format!(
        "{view}; GIL held in {:.0}% of samples; {} distinct stacks\n{}\n",
        percent(s.gil_samples, s.samples),
        s.stacks,
        b.build().with(Style::blank())
    )
}

/// `n` as a percentage of `of` (0 when `of` is).
fn percent(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

/// Runs `pyprobe top`: a live view of the functions with the most samples.
pub async fn top(opts: TopOptions) -> anyhow::Result<()> {
    let full_screen = screen::wanted(opts.json);
    let mut sampling = opts.profile.clone();
    // The full-screen view can split rows per thread at a key press.
    sampling.threads |= full_screen;
    let mut session = super::start(&sampling, "sampling")?;
    let started = Instant::now();
    let rows_of = RowsOf {
        idle: true,
        threads: opts.profile.threads,
    };
    // Plain tables and the final one: --top, else 25 rows (JSON: all); the
    // full-screen view shows what fits.
    let table_rows = opts.rows.or((!opts.json).then_some(DEFAULT_TABLE_ROWS));
    let mut view = TopView::new(opts.profile.rate, None, rows_of);
    if full_screen {
        let result = full_screen_view(&mut session, &opts, &mut view, started).await;
        // The terminal is back: the last view stays in the scrollback.
        result?;
    } else {
        view.rows = table_rows;
        let json = opts.json;
        sample_loop(
            &mut session,
            &opts.profile,
            Some(opts.interval),
            None,
            None,
            |session, _| {
                live::emit(&view.report(session, started, "interval")?, json, top_table)?;
                Ok(ControlFlow::Continue(()))
            },
        )
        .await?;
    }
    view.rows = table_rows;
    let report = view.report(&session, started, "final")?;
    live::emit(&report, opts.json, top_table)?;
    eprintln!("pyprobe: {}", report.summary.line());
    Ok(())
}

/// Lines of the full-screen view above its table.
const HEADER_LINES: usize = 2;

/// What the full-screen view remembers between frames.
struct Live {
    /// The last report, drawn again on a key or a resize.
    last: Option<TopReport>,
    paused: bool,
    /// `--top` when given: at most that many rows.
    most: Option<usize>,
}

/// Runs the full-screen view until `q`, Ctrl-C, the duration or the end of
/// the targets; the terminal is given back when it returns.
async fn full_screen_view(
    session: &mut Session,
    opts: &TopOptions,
    view: &mut TopView,
    started: Instant,
) -> anyhow::Result<()> {
    let (mut screen, mut inputs) = Screen::open()?;
    let mut live = Live {
        last: None,
        paused: false,
        most: opts.rows,
    };
    // Something at once: the header, an empty table.
    let first = view.report(session, started, "interval")?;
    screen.draw(&frame(&first, view, &live, session, &screen))?;
    live.last = Some(first);
    let mut quits = 0;
    sample_loop(
        session,
        &opts.profile,
        Some(opts.interval),
        None,
        Some(&mut inputs),
        |session, wake| {
            match wake {
                Wake::Interval if live.paused => return Ok(ControlFlow::Continue(())),
                Wake::Interval | Wake::Signal => {
                    live.last = Some(view.report(session, started, "interval")?);
                }
                Wake::Input(Input::Quit) => {
                    quits += 1;
                    // Ctrl-C is the launched program's, as it would be
                    // without the view; a second one leaves at once.
                    if quits == 1 && crate::launch::interrupt_launched() {
                        return Ok(ControlFlow::Continue(()));
                    }
                    return Ok(ControlFlow::Break(()));
                }
                Wake::Input(Input::Key('o' | '1')) => view.sort = SortBy::Own,
                Wake::Input(Input::Key('t' | '2')) => view.sort = SortBy::Total,
                Wake::Input(Input::Key('p' | ' ')) => live.paused = !live.paused,
                Wake::Input(Input::Key('i')) => {
                    if !session.idle {
                        session.start_idle();
                        view.rows_of.idle = true;
                    } else {
                        view.rows_of.idle = !view.rows_of.idle;
                    }
                    // Counted anew: shares over the whole run for now.
                    live.last = Some(view.report(session, started, "final")?);
                }
                Wake::Input(Input::Key('h')) => {
                    view.rows_of.threads = !view.rows_of.threads;
                    live.last = Some(view.report(session, started, "final")?);
                }
                Wake::Input(_) => {}
            }
            if let Some(last) = &mut live.last {
                sort_lines(&mut last.functions, view.sort);
            }
            if let Some(last) = &live.last {
                screen.draw(&frame(last, view, &live, session, &screen))?;
            }
            Ok(ControlFlow::Continue(()))
        },
    )
    .await
}

/// One frame of the full-screen view.
fn frame(r: &TopReport, view: &TopView, live: &Live, session: &Session, screen: &Screen) -> View {
    let s = &r.summary;
    let processes = session.processes.len();
    let shares = if r.kind == "final" {
        "shares over the whole run (counted anew)".to_owned()
    } else {
        format!(
            "{} samples in the last {:.1} s",
            r.interval_samples, r.interval_s
        )
    };
    let idle = if session.idle {
        format!(
            "off CPU {:.0}%{}",
            percent(s.idle_samples, s.samples),
            if view.rows_of.idle { "" } else { " (hidden)" }
        )
    } else {
        "off CPU not sampled".to_owned()
    };
    let header = vec![
        format!(
            "pyprobe top: {processes} process{} at {} Hz, {:.0} s, {} samples; {shares}{}",
            if processes == 1 { "" } else { "es" },
            r.rate,
            s.seconds,
            s.samples,
            if live.paused { "  [PAUSED]" } else { "" }
        ),
        format!(
            "GIL held {:.0}%, {idle}; {}",
            percent(s.gil_samples, s.samples),
            losses(s)
        ),
    ];
    debug_assert_eq!(header.len(), HEADER_LINES);
    let mark = |title: &str, by: SortBy| {
        if view.sort == by {
            format!("{title}▼")
        } else {
            title.to_owned()
        }
    };
    let mut columns = vec![
        Column::number(&mark("%Own", SortBy::Own)),
        Column::number(&mark("%Total", SortBy::Total)),
        Column::number("OwnTime"),
        Column::number("TotalTime"),
    ];
    if view.rows_of.threads {
        columns.push(Column::text("Thread"));
    }
    columns.push(Column::text("Function (filename:line)"));
    let fits = screen.table_rows(HEADER_LINES);
    let shown = live.most.map_or(fits, |m| m.min(fits));
    let rows = r
        .functions
        .iter()
        .take(shown)
        .map(|l| {
            cells(r, l, |tid| match session.roots.thread_names.get(&tid) {
                Some(name) => format!("{tid} {name}"),
                None => tid.to_string(),
            })
        })
        .collect();
    let on = |b: bool| if b { "on" } else { "off" };
    View {
        header,
        columns,
        rows,
        keys: format!(
            " q quit  o/t sort by own/total  p {}  i idle: {}  h threads: {}",
            if live.paused { "resume" } else { "pause" },
            on(session.idle && view.rows_of.idle),
            on(view.rows_of.threads)
        ),
    }
}

/// The samples not taken or not kept, in a few words.
fn losses(s: &Summary) -> String {
    let k = &s.kernel;
    let d = &s.dropped;
    let missed = (s.late.cpu_seconds * s.rate as f64).round() as u64;
    let parts: Vec<String> = [
        (missed, "before their process was picked up"),
        (k.ring_full, "ring buffer full"),
        (k.unknown_thread, "thread not yet known"),
        (k.unreadable, "unreadable thread"),
        (k.recursion_misses, "skipped by the kernel"),
        (d.unreadable_frames, "unreadable frames"),
        (d.unknown_process, "unknown process"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, why)| format!("{n} {why}"))
    .collect();
    if parts.is_empty() {
        "lost: 0".to_owned()
    } else {
        format!("lost: {}", parts.join(", "))
    }
}
