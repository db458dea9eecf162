//! The full-screen view of `pyprobe calls` on a terminal (see
//! [`crate::screen`]): the report of every interval redrawn in place,
//! sorted by calls, rate or latency, with a pause.

use std::{cmp::Ordering, collections::BTreeSet, ops::ControlFlow};

use super::report::{CallsReport, FunctionRow};
use crate::screen::{Column, Input, Screen, View};

/// What the rows are ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    /// Calls so far.
    Calls,
    /// Calls per second over the last interval.
    Rate,
    /// 99th percentile of the duration (`--latency`).
    Latency,
}

impl SortBy {
    /// The title of the column it sorts by.
    fn title(self) -> &'static str {
        match self {
            SortBy::Calls => "CALLS",
            SortBy::Rate => "CALLS/S",
            SortBy::Latency => "P99",
        }
    }
}

/// Lines above the table.
const HEADER_LINES: usize = 2;

/// What the view remembers between frames.
pub struct CallsScreen {
    /// Order of the rows.
    pub sort: SortBy,
    /// Reports are not drawn while paused (counting goes on).
    pub paused: bool,
    /// `--top` when given: at most that many rows.
    pub most: Option<usize>,
    /// The last report, drawn again on a key or a resize.
    pub last: Option<CallsReport>,
}

impl CallsScreen {
    /// A view sorted by calls.
    pub fn new(most: Option<usize>) -> Self {
        Self {
            sort: SortBy::Calls,
            paused: false,
            most,
            last: None,
        }
    }

    /// Takes a key: `Break` to quit.
    pub fn key(&mut self, input: Input) -> ControlFlow<()> {
        match input {
            Input::Quit => return ControlFlow::Break(()),
            Input::Key('c' | '1') => self.sort = SortBy::Calls,
            Input::Key('r' | '2') => self.sort = SortBy::Rate,
            Input::Key('l' | '3') => {
                if self.last.as_ref().is_some_and(|r| r.latency) {
                    self.sort = SortBy::Latency;
                }
            }
            Input::Key('p' | ' ') => self.paused = !self.paused,
            Input::Key(_) | Input::Resize => {}
        }
        ControlFlow::Continue(())
    }

    /// The frame of the last report, with `fits` rows of table.
    fn frame(&mut self, fits: usize) -> Option<View> {
        let sort = self.sort;
        let r = self.last.as_mut()?;
        r.rows.sort_by(|a, b| order(a, b, sort));
        let r = self.last.as_ref()?;
        let processes: BTreeSet<u32> = r.rows.iter().map(|row| row.pid).collect();
        let rate: f64 = r.rows.iter().map(|row| row.calls_per_s).sum();
        let header = vec![
            format!(
                "pyprobe calls: {:.0} s, {} calls in {} functions of {} process{}; {rate:.0} calls/s over the last {:.1} s{}",
                r.elapsed_s,
                r.total_calls,
                r.functions,
                processes.len(),
                if processes.len() == 1 { "" } else { "es" },
                r.interval_s,
                if self.paused { "  [PAUSED]" } else { "" }
            ),
            r.lost_line(),
        ];
        debug_assert_eq!(header.len(), HEADER_LINES);
        let columns = r
            .titles()
            .into_iter()
            .map(|t| {
                let title = if t == sort.title() {
                    format!("{t}▼")
                } else {
                    t.to_owned()
                };
                if matches!(t, "FUNCTION" | "FILE:LINE") {
                    Column::text(&title)
                } else {
                    Column::number(&title)
                }
            })
            .collect::<Vec<_>>();
        let shown = self.most.map_or(fits, |m| m.min(fits));
        let rows = r.rows.iter().take(shown).map(|row| r.cells(row)).collect();
        let latency = if r.latency { "  l latency" } else { "" };
        Some(View {
            header,
            columns,
            rows,
            keys: format!(
                " q quit  sort by: c calls  r rate{latency}  p {}",
                if self.paused { "resume" } else { "pause" }
            ),
        })
    }

    /// Draws the frame of the last report on `screen`, if there is one.
    pub fn draw(&mut self, screen: &mut Screen) -> anyhow::Result<()> {
        match self.frame(screen.table_rows(HEADER_LINES)) {
            Some(frame) => screen.draw(&frame),
            None => Ok(()),
        }
    }
}

/// Largest first by `sort`, then by calls, name and process.
fn order(a: &FunctionRow, b: &FunctionRow, sort: SortBy) -> Ordering {
    let first = match sort {
        SortBy::Calls => b.calls.cmp(&a.calls),
        SortBy::Rate => b.calls_per_s.total_cmp(&a.calls_per_s),
        SortBy::Latency => {
            let p99 = |r: &FunctionRow| r.latency.as_ref().map(|l| l.p99_ns);
            p99(b).cmp(&p99(a))
        }
    };
    first
        .then_with(|| b.calls.cmp(&a.calls))
        .then_with(|| a.function.cmp(&b.function))
        .then_with(|| a.pid.cmp(&b.pid))
}
