//! `pyprobe entries`: a live count of entries into the CPython eval loop.
//!
//! The first probe pyprobe ships: a uprobe on `_PyEval_EvalFrameDefault`
//! counted per process in the kernel. On CPython 3.8-3.10 every Python call
//! and generator resumption enters there; from 3.11 only frames started from C
//! (callbacks from `map`, `sorted(key=...)`, C extensions, threads, imports).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use tabled::{Table, Tabled, settings::Style};

use crate::{
    bpf::{EvalEntryCounter, Losses},
    live,
    process::{self, Interpreter, Linkage},
};

/// Options of `pyprobe entries`.
#[derive(Debug, Clone)]
pub struct EntriesOptions {
    /// Processes to watch.
    pub pids: Vec<u32>,
    /// Time between two reports.
    pub interval: Duration,
    /// Stop after this long; `None` runs until Ctrl-C or until every target
    /// has exited.
    pub duration: Option<Duration>,
    /// One JSON document per report instead of tables.
    pub json: bool,
}

/// One process's line in a report.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessRow {
    /// Process ID.
    pub pid: u32,
    /// ELF file holding the interpreter.
    pub interpreter: String,
    /// Shared library or executable.
    pub linkage: Linkage,
    /// Entries since pyprobe attached.
    pub entries: u64,
    /// Entries per second over the last interval.
    pub entries_per_s: f64,
    /// Whether the process was still running at report time.
    pub alive: bool,
}

/// One report: printed every interval, and once more at the end.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `"interval"` or `"final"`.
    pub kind: &'static str,
    /// Seconds since pyprobe attached.
    pub elapsed_s: f64,
    /// Length of the interval the rates cover, in seconds.
    pub interval_s: f64,
    /// One row per watched process.
    pub processes: Vec<ProcessRow>,
    /// Entries that could not be counted.
    pub lost: Losses,
}

#[derive(Tabled)]
struct TableRow {
    #[tabled(rename = "PID")]
    pid: u32,
    #[tabled(rename = "ENTRIES/S")]
    rate: String,
    #[tabled(rename = "ENTRIES")]
    entries: u64,
    #[tabled(rename = "INTERPRETER")]
    interpreter: String,
}

impl Report {
    /// Renders the report as a table for people.
    pub fn to_table(&self) -> String {
        let rows = self.processes.iter().map(|p| TableRow {
            pid: p.pid,
            rate: format!("{:.0}", p.entries_per_s),
            entries: p.entries,
            interpreter: if p.alive {
                p.interpreter.clone()
            } else {
                format!("{} (exited)", p.interpreter)
            },
        });
        let title = if self.kind == "final" {
            "final totals"
        } else {
            "entries into _PyEval_EvalFrameDefault"
        };
        let lost = if self.lost.total() == 0 {
            "lost: 0".to_owned()
        } else {
            format!(
                "lost: {} (map full: {}, recursion misses: {})",
                self.lost.total(),
                self.lost.map_full,
                self.lost.recursion_misses
            )
        };
        format!(
            "[{:7.1}s] {title}, {lost}\n{}\n",
            self.elapsed_s,
            Table::new(rows).with(Style::psql())
        )
    }
}

/// Tracks the previous totals to turn them into rates.
struct Reporter {
    targets: Vec<Interpreter>,
    started: Instant,
    last_at: Instant,
    last: BTreeMap<u32, u64>,
}

impl Reporter {
    fn report(&mut self, counter: &EvalEntryCounter, kind: &'static str) -> anyhow::Result<Report> {
        let now = Instant::now();
        let counts = counter.counts()?;
        let interval = now.duration_since(self.last_at).as_secs_f64();
        let processes = self
            .targets
            .iter()
            .map(|t| {
                let entries = counts.get(&t.pid).copied().unwrap_or(0);
                let before = self.last.get(&t.pid).copied().unwrap_or(0);
                ProcessRow {
                    pid: t.pid,
                    interpreter: t.binary.display().to_string(),
                    linkage: t.linkage,
                    entries,
                    entries_per_s: if interval > 0.0 {
                        (entries - before) as f64 / interval
                    } else {
                        0.0
                    },
                    alive: process::is_alive(t.pid),
                }
            })
            .collect();
        let report = Report {
            kind,
            elapsed_s: now.duration_since(self.started).as_secs_f64(),
            interval_s: interval,
            processes,
            lost: counter.losses()?,
        };
        self.last = counts;
        self.last_at = now;
        Ok(report)
    }
}

fn emit(report: &Report, json: bool) -> anyhow::Result<()> {
    live::emit(report, json, Report::to_table)
}

/// Runs `pyprobe entries` until Ctrl-C, SIGTERM, the duration, or the exit of
/// every target; then prints the final totals.
pub async fn run(opts: EntriesOptions) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    for &pid in &opts.pids {
        targets.push(process::find_interpreter(pid)?);
    }
    let mut counter = EvalEntryCounter::load()?;
    for t in &targets {
        counter
            .attach(t)
            .with_context(|| format!("attaching to PID {}", t.pid))?;
        eprintln!(
            "pyprobe: attached to PID {} ({}, {} at file offset {:#x}); Ctrl-C to stop",
            t.pid,
            t.binary.display(),
            process::EVAL_FRAME_SYMBOL,
            t.eval_frame_offset,
        );
    }

    let started = Instant::now();
    let mut reporter = Reporter {
        targets,
        started,
        last_at: started,
        last: BTreeMap::new(),
    };
    let mut ticker = live::ticker(opts.interval);
    let stop = live::stop_requested(opts.duration);
    tokio::pin!(stop);

    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let report = reporter.report(&counter, "interval")?;
                emit(&report, opts.json)?;
                if report.processes.iter().all(|p| !p.alive) {
                    eprintln!("pyprobe: every target process has exited");
                    break;
                }
            }
            r = &mut stop => {
                r?;
                break;
            }
        }
    }
    let mut final_report = reporter.report(&counter, "final")?;
    // Totals cover the whole run.
    final_report.interval_s = final_report.elapsed_s;
    for p in &mut final_report.processes {
        p.entries_per_s = if final_report.elapsed_s > 0.0 {
            p.entries as f64 / final_report.elapsed_s
        } else {
            0.0
        };
    }
    emit(&final_report, opts.json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_counts_rates_and_losses() {
        let report = Report {
            kind: "interval",
            elapsed_s: 2.0,
            interval_s: 1.0,
            processes: vec![ProcessRow {
                pid: 42,
                interpreter: "/usr/bin/python3.11".into(),
                linkage: Linkage::Executable,
                entries: 1234,
                entries_per_s: 617.0,
                alive: false,
            }],
            lost: Losses {
                map_full: 2,
                recursion_misses: 1,
            },
        };
        let text = report.to_table();
        assert!(
            text.contains("lost: 3 (map full: 2, recursion misses: 1)"),
            "{text}"
        );
        let row = text.lines().find(|l| l.contains("42")).unwrap();
        assert!(row.contains("617"), "{row}");
        assert!(row.contains("1234"), "{row}");
        assert!(row.contains("/usr/bin/python3.11 (exited)"), "{row}");
    }

    #[test]
    fn json_report_has_stable_field_names() {
        let report = Report {
            kind: "final",
            elapsed_s: 1.5,
            interval_s: 1.5,
            processes: vec![],
            lost: Losses::default(),
        };
        let v: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(v["kind"], "final");
        assert_eq!(v["lost"]["map_full"], 0);
        assert_eq!(v["lost"]["recursion_misses"], 0);
        assert!(v["processes"].as_array().unwrap().is_empty());
    }
}
