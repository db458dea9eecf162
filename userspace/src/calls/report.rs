//! Reports of `pyprobe calls`: rows per function, as a table for people or
//! one JSON document per report for machines.

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use pyprobe_common::calls::{CallCounts, CodeKey, Histogram};
use serde::Serialize;
use tabled::{builder::Builder, settings::Style};

use super::{
    latency::{Latency, human},
    symbols::{Resolved, Symbols},
};
use crate::{bpf::CallLosses, container::Container};

/// One function of one process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionRow {
    /// Process ID.
    pub pid: u32,
    /// Qualified name (`co_qualname` on 3.11+, else `co_name`), or
    /// `<unknown>` when the code object could not be read.
    pub function: String,
    /// Source file.
    pub file: String,
    /// First line of the function.
    pub line: i64,
    /// Starts plus resumptions (what cProfile reports as `ncalls`).
    pub calls: u64,
    /// Frames started: calls proper.
    pub starts: u64,
    /// Generator and coroutine resumptions.
    pub resumes: u64,
    /// Calls per second over the last interval.
    pub calls_per_s: f64,
    /// Address of the code object.
    pub code: u64,
    /// Why the function has no name, when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
    /// Call durations (`--latency`; `None` when none was timed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
}

/// Whether a function passes `--filter`: the text occurs in its qualified
/// name or its file name.
pub fn matches_filter(filter: &str, function: &str, file: &str) -> bool {
    function.contains(filter) || file.contains(filter)
}

/// One report: printed every interval, and once more at the end.
#[derive(Debug, Clone, Serialize)]
pub struct CallsReport {
    /// `"interval"` or `"final"`.
    pub kind: &'static str,
    /// Seconds since counting started.
    pub elapsed_s: f64,
    /// Length of the interval the rates cover, in seconds.
    pub interval_s: f64,
    /// Calls counted in all processes (all functions, before `--top` and
    /// `--filter`).
    pub total_calls: u64,
    /// Functions with at least one call, before `--top` and `--filter`.
    pub functions: usize,
    /// The rows shown, most calls first.
    pub rows: Vec<FunctionRow>,
    /// Calls that could not be counted or attributed.
    pub lost: CallLosses,
    /// Whether calls are timed (`--latency`): the table then shows TIMED,
    /// P50, P99 and MAX.
    pub latency: bool,
    /// The container of each process of the rows that runs in one, by PID.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub containers: BTreeMap<u32, Container>,
}

impl CallsReport {
    /// The titles of the table's columns.
    pub fn titles(&self) -> Vec<&'static str> {
        let mut titles = vec!["CALLS/S", "CALLS", "RESUMES"];
        if self.latency {
            titles.extend(["TIMED", "P50", "P99", "MAX"]);
        }
        titles.extend(["FUNCTION", "FILE:LINE", "PID"]);
        titles
    }

    /// The cells of one row of the table, under [`Self::titles`].
    pub fn cells(&self, r: &FunctionRow) -> Vec<String> {
        let mut row = vec![
            format!("{:.0}", r.calls_per_s),
            r.calls.to_string(),
            r.resumes.to_string(),
        ];
        if self.latency {
            match &r.latency {
                Some(l) => row.extend([
                    l.timed.to_string(),
                    human(l.p50_ns),
                    human(l.p99_ns),
                    human(l.max_ns),
                ]),
                None => row.extend(["0", "-", "-", "-"].map(String::from)),
            }
        }
        row.extend([
            r.function.clone(),
            if r.file == super::symbols::BUILTIN_FILE {
                r.file.clone()
            } else {
                format!("{}:{}", r.file, r.line)
            },
            r.pid.to_string(),
        ]);
        row
    }

    /// What was lost, in one line (`lost: 0` when nothing was).
    pub fn lost_line(&self) -> String {
        let l = &self.lost;
        let news = if l.process_events > 0 {
            format!(
                " (process news lost: {}; rows may go unnamed)",
                l.process_events
            )
        } else {
            String::new()
        };
        if l.total() == 0 {
            return format!("lost: 0{news}");
        }
        let untimed = if self.latency {
            format!(", not timed (latency map full): {}", l.untimed)
        } else {
            String::new()
        };
        let mismatches = if l.frame_mismatches > 0 {
            format!(", frame register disagreed: {}", l.frame_mismatches)
        } else {
            String::new()
        };
        format!(
            "lost: {} (map full: {}, process not set up: {}, unreadable frame: {}, recursion misses: {}{untimed}{mismatches}){news}",
            l.total(),
            l.map_full,
            l.unconfigured,
            l.unreadable,
            l.recursion_misses
        )
    }

    /// Renders the report as a table for people.
    pub fn to_table(&self) -> String {
        let mut table = Builder::default();
        table.push_record(self.titles());
        for r in &self.rows {
            table.push_record(self.cells(r));
        }
        let title = if self.kind == "final" {
            "final totals"
        } else {
            "Python function calls"
        };
        format!(
            "[{:7.1}s] {title}: {} calls in {} functions, {}\n{}\n",
            self.elapsed_s,
            self.total_calls,
            self.functions,
            self.lost_line(),
            table.build().with(Style::psql())
        )
    }
}

/// Turns successive totals into reports with rates.
pub struct Reporter {
    started: Instant,
    last_at: Instant,
    last: HashMap<CodeKey, u64>,
    /// Rows kept (`None`: all).
    pub top: Option<usize>,
    filter: Option<String>,
}

impl Reporter {
    /// A reporter whose clock starts at `started`.
    pub fn new(started: Instant, top: Option<usize>, filter: Option<String>) -> Self {
        Self {
            started,
            last_at: started,
            last: HashMap::new(),
            top,
            filter,
        }
    }

    /// Builds a report from the totals read from the kernel, and the call
    /// durations when they are measured.
    pub fn report(
        &mut self,
        counts: &BTreeMap<CodeKey, CallCounts>,
        latencies: Option<&BTreeMap<CodeKey, Histogram>>,
        symbols: &Symbols,
        lost: CallLosses,
        kind: &'static str,
    ) -> CallsReport {
        let now = Instant::now();
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let interval = if kind == "final" {
            elapsed
        } else {
            now.duration_since(self.last_at).as_secs_f64()
        };
        let mut rows: Vec<FunctionRow> = counts
            .iter()
            .map(|(key, c)| {
                let calls = c.starts + c.resumes;
                let before = if kind == "final" {
                    0
                } else {
                    self.last.get(key).copied().unwrap_or(0)
                };
                let (function, file, line, unknown) = match symbols.get(key) {
                    Some(Resolved::Code(code)) => (
                        code.qualname.clone(),
                        code.filename.clone(),
                        i64::from(code.first_line),
                        None,
                    ),
                    Some(Resolved::Unknown(why)) => (
                        "<unknown>".to_owned(),
                        "?".to_owned(),
                        i64::from(key.firstlineno),
                        Some(why.clone()),
                    ),
                    None => (
                        "<unknown>".to_owned(),
                        "?".to_owned(),
                        i64::from(key.firstlineno),
                        Some("process not set up".to_owned()),
                    ),
                };
                FunctionRow {
                    pid: key.tgid,
                    function,
                    file,
                    line,
                    calls,
                    starts: c.starts,
                    resumes: c.resumes,
                    calls_per_s: if interval > 0.0 {
                        calls.saturating_sub(before) as f64 / interval
                    } else {
                        0.0
                    },
                    code: key.code,
                    unknown,
                    latency: latencies.and_then(|l| l.get(key)).and_then(Latency::of),
                }
            })
            .collect();
        let total_calls = rows.iter().map(|r| r.calls).sum();
        let functions = rows.len();
        if let Some(filter) = &self.filter {
            rows.retain(|r| matches_filter(filter, &r.function, &r.file));
        }
        rows.sort_by(|a, b| {
            b.calls
                .cmp(&a.calls)
                .then_with(|| a.function.cmp(&b.function))
                .then_with(|| a.pid.cmp(&b.pid))
        });
        if let Some(top) = self.top {
            rows.truncate(top);
        }
        self.last = counts
            .iter()
            .map(|(k, c)| (*k, c.starts + c.resumes))
            .collect();
        self.last_at = now;
        let containers = rows
            .iter()
            .filter_map(|r| Some((r.pid, symbols.container(r.pid)?.clone())))
            .collect();
        CallsReport {
            kind,
            elapsed_s: elapsed,
            interval_s: interval,
            total_calls,
            functions,
            rows,
            lost,
            latency: latencies.is_some(),
            containers,
        }
    }
}

/// Prints a report to stdout.
pub fn emit(report: &CallsReport, json: bool) -> anyhow::Result<()> {
    crate::live::emit(report, json, CallsReport::to_table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: u64) -> CodeKey {
        CodeKey {
            tgid: 7,
            firstlineno: 3,
            code,
            name: 0,
        }
    }

    #[test]
    fn rows_are_sorted_filtered_truncated_and_unknowns_say_why() {
        let mut counts = BTreeMap::new();
        counts.insert(
            key(1),
            CallCounts {
                starts: 5,
                resumes: 0,
            },
        );
        counts.insert(
            key(2),
            CallCounts {
                starts: 1,
                resumes: 9,
            },
        );
        counts.insert(
            key(3),
            CallCounts {
                starts: 1,
                resumes: 0,
            },
        );
        let symbols = Symbols::default();
        let mut reporter = Reporter::new(Instant::now(), Some(2), None);
        let r = reporter.report(&counts, None, &symbols, CallLosses::default(), "final");
        assert_eq!(r.total_calls, 16);
        assert_eq!(r.functions, 3);
        assert_eq!(
            r.rows.iter().map(|r| (r.code, r.calls)).collect::<Vec<_>>(),
            vec![(2, 10), (1, 5)]
        );
        assert_eq!(r.rows[0].unknown.as_deref(), Some("process not set up"));
        let text = r.to_table();
        assert!(text.contains("16 calls in 3 functions, lost: 0"), "{text}");

        let mut filtered = Reporter::new(Instant::now(), None, Some("nomatch".into()));
        let r = filtered.report(&counts, None, &symbols, CallLosses::default(), "interval");
        assert!(r.rows.is_empty());
        assert_eq!(r.total_calls, 16);
    }

    #[test]
    fn latency_adds_columns_and_json_fields() {
        let mut counts = BTreeMap::new();
        counts.insert(
            key(1),
            CallCounts {
                starts: 2,
                resumes: 0,
            },
        );
        counts.insert(
            key(2),
            CallCounts {
                starts: 3,
                resumes: 0,
            },
        );
        let mut hist = Histogram::default();
        for ns in [5_000_000u64, 40_000_000] {
            hist.buckets[pyprobe_common::calls::latency_bucket(ns) as usize] += 1;
            hist.count += 1;
            hist.total_ns += ns;
            hist.max_ns = hist.max_ns.max(ns);
        }
        let latencies = BTreeMap::from([(key(1), hist)]);
        let mut reporter = Reporter::new(Instant::now(), None, None);
        let r = reporter.report(
            &counts,
            Some(&latencies),
            &Symbols::default(),
            CallLosses::default(),
            "final",
        );
        let text = r.to_table();
        assert!(
            text.contains("CALLS/S | CALLS | RESUMES | TIMED | P50    | P99    | MAX    |"),
            "{text}"
        );
        // One call of two under each: p50 is the 5 ms bucket's middle, p99
        // the exact maximum; key 2 was never timed.
        assert!(
            text.contains("| 2     | 4.98ms | 40.0ms | 40.0ms |"),
            "{text}"
        );
        assert!(
            text.contains("| 0     | -      | -      | -      |"),
            "{text}"
        );
        let v = serde_json::to_value(&r).unwrap();
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows[1]["latency"]["p99_ns"], 40_000_000);
        assert_eq!(rows[1]["latency"]["mean_ns"], 22_500_000);
        assert!(rows[0].get("latency").is_none());
    }

    #[test]
    fn losses_are_spelled_out() {
        let r = CallsReport {
            kind: "interval",
            elapsed_s: 1.0,
            interval_s: 1.0,
            total_calls: 0,
            functions: 0,
            rows: vec![],
            lost: CallLosses {
                map_full: 1,
                unconfigured: 2,
                unreadable: 3,
                untimed: 0,
                frame_mismatches: 0,
                process_events: 0,
                recursion_misses: 4,
            },
            containers: BTreeMap::new(),
            latency: false,
        };
        assert!(r.to_table().contains(
            "lost: 10 (map full: 1, process not set up: 2, unreadable frame: 3, recursion misses: 4)"
        ));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["lost"]["unconfigured"], 2);
    }
}
