//! Writing a profile: folded stacks, flamegraph SVG (inferno), speedscope
//! JSON, and the rows of `pyprobe top`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
};

use serde::Serialize;
use serde_json::json;

use super::stacks::{Profile, StackKey};

/// Names of the processes and threads sampled, for the synthetic root
/// frames that keep them apart.
#[derive(Debug, Default, Clone)]
pub struct Roots {
    /// Put a `process PID (command)` frame at the root of every stack.
    pub processes: bool,
    /// Command line of each process.
    pub process_names: HashMap<u32, String>,
    /// Name of each thread (`comm`).
    pub thread_names: HashMap<u32, String>,
    /// The id a thread has in its process's PID namespace, where it
    /// differs from the host's.
    pub namespace_tids: HashMap<u32, u32>,
}

impl Roots {
    /// The synthetic frames above a stack's Python frames.
    fn labels(&self, key: &StackKey) -> Vec<String> {
        let mut out = Vec::new();
        if self.processes {
            match self.process_names.get(&key.pid) {
                Some(name) => out.push(format!("process {} ({name})", key.pid)),
                None => out.push(format!("process {}", key.pid)),
            }
        }
        if key.tid != 0 {
            out.push(self.thread(key.tid));
        }
        if key.truncated {
            out.push("[truncated]".to_owned());
        }
        out
    }

    /// `thread TID (name)`, with the namespace's id where it differs.
    fn thread(&self, tid: u32) -> String {
        let id = crate::process::thread_id_text(tid, self.namespace_tids.get(&tid).copied());
        match self.thread_names.get(&tid) {
            Some(name) => format!("thread {id} ({name})"),
            None => format!("thread {id}"),
        }
    }
}

/// Folded stacks, one line per distinct stack: frames outermost first,
/// separated by `;`, then a space and the sample count (the format of
/// Brendan Gregg's flamegraph.pl and inferno). Sorted.
pub fn folded(profile: &Profile, roots: &Roots) -> Vec<String> {
    let mut merged: BTreeMap<String, u64> = BTreeMap::new();
    for (key, &count) in &profile.stacks {
        let mut parts = roots.labels(key);
        parts.extend(
            key.frames
                .iter()
                .map(|&i| profile.frames[i as usize].label().replace(';', ":")),
        );
        if parts.is_empty() {
            parts.push("[no Python frame]".to_owned());
        }
        *merged.entry(parts.join(";")).or_insert(0) += count;
    }
    merged
        .into_iter()
        .map(|(stack, count)| format!("{stack} {count}"))
        .collect()
}

/// Writes a flamegraph SVG of folded `lines`.
pub fn flamegraph(lines: &[String], title: &str, out: impl Write) -> anyhow::Result<()> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = "samples".to_owned();
    if lines.is_empty() {
        // inferno refuses an empty profile; say so in the picture instead.
        let empty = ["[no samples] 1".to_owned()];
        inferno::flamegraph::from_lines(&mut options, empty.iter().map(String::as_str), out)?;
    } else {
        inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)?;
    }
    Ok(())
}

/// A speedscope document (<https://www.speedscope.app> file format): one
/// sampled profile per process, or per thread with `--threads`; weights in
/// seconds (samples / rate).
pub fn speedscope(profile: &Profile, roots: &Roots, rate: u64, name: &str) -> serde_json::Value {
    let mut frames: Vec<serde_json::Value> = profile
        .frames
        .iter()
        .map(|f| json!({"name": f.function, "file": f.file, "line": f.line}))
        .collect();
    let mut extra: HashMap<String, usize> = HashMap::new();
    // (pid, tid) -> (stack of frame indices, samples).
    type Stacks = Vec<(Vec<usize>, u64)>;
    let mut groups: BTreeMap<(u32, u32), Stacks> = BTreeMap::new();
    let mut keys: Vec<&StackKey> = profile.stacks.keys().collect();
    keys.sort();
    for key in keys {
        let count = profile.stacks[key];
        let mut stack = Vec::new();
        if key.truncated {
            let i = *extra.entry("[truncated]".to_owned()).or_insert_with(|| {
                frames.push(json!({"name": "[truncated]"}));
                frames.len() - 1
            });
            stack.push(i);
        }
        stack.extend(key.frames.iter().map(|&i| i as usize));
        groups
            .entry((key.pid, key.tid))
            .or_default()
            .push((stack, count));
    }
    let seconds = 1.0 / rate.max(1) as f64;
    let profiles: Vec<serde_json::Value> = groups
        .into_iter()
        .map(|((pid, tid), stacks)| {
            let total: u64 = stacks.iter().map(|(_, c)| c).sum();
            let mut title = match roots.process_names.get(&pid) {
                Some(cmd) => format!("process {pid} ({cmd})"),
                None => format!("process {pid}"),
            };
            if tid != 0 {
                title.push(' ');
                title.push_str(&roots.thread(tid));
            }
            json!({
                "type": "sampled",
                "name": title,
                "unit": "seconds",
                "startValue": 0.0,
                "endValue": total as f64 * seconds,
                "samples": stacks.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
                "weights": stacks.iter().map(|(_, c)| *c as f64 * seconds).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": frames},
        "profiles": profiles,
        "name": name,
        "activeProfileIndex": 0,
        "exporter": format!("pyprobe {}", env!("CARGO_PKG_VERSION")),
    })
}

/// A function in `pyprobe top`: samples where it was running (own) and
/// where it was on the stack (total, once per sample however deep it
/// recursed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopRow {
    /// Qualified name.
    pub function: String,
    /// File.
    pub file: String,
    /// First line of the function.
    pub first_line: i32,
    /// The thread, when rows are kept per thread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread: Option<u32>,
    /// Samples with this function innermost.
    pub own: u64,
    /// Samples with this function anywhere on the stack.
    pub total: u64,
}

/// Which samples make the rows of `pyprobe top`, and how they are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsOf {
    /// Count samples of threads off CPU (kept only with `--idle`).
    pub idle: bool,
    /// One row per function and thread (the profile must keep threads
    /// apart), instead of one per function.
    pub threads: bool,
}

impl Default for RowsOf {
    fn default() -> Self {
        Self {
            idle: true,
            threads: false,
        }
    }
}

/// For each frame of `profile`, the index of the first frame of the same
/// function (name, file, first line): frames at different lines of one
/// function are one function.
fn function_ids(profile: &Profile) -> Vec<u32> {
    let mut first_frame: HashMap<(&str, &str, i32), u32> = HashMap::new();
    profile
        .frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            *first_frame
                .entry((&f.function, &f.file, f.first_line))
                .or_insert(i as u32)
        })
        .collect()
}

/// Rows of `pyprobe top`, most own samples first (then most total).
pub fn top_rows(profile: &Profile) -> Vec<TopRow> {
    top_rows_of(profile, RowsOf::default())
}

/// Rows of `pyprobe top` made of the samples `of` says, most own samples
/// first (then most total).
pub fn top_rows_of(profile: &Profile, of: RowsOf) -> Vec<TopRow> {
    // (thread or 0, function's first frame) -> (own, total).
    let mut rows: HashMap<(u32, u32), (u64, u64)> = HashMap::new();
    // Frames at different lines of one function are one row.
    let function_of = function_ids(profile);
    for (key, &count) in &profile.stacks {
        if key.idle && !of.idle {
            continue;
        }
        let thread = if of.threads { key.tid } else { 0 };
        let mut seen = HashSet::new();
        for &frame in &key.frames {
            let id = function_of[frame as usize];
            if seen.insert(id) {
                rows.entry((thread, id)).or_default().1 += count;
            }
        }
        if let Some(&leaf) = key.frames.last() {
            rows.entry((thread, function_of[leaf as usize]))
                .or_default()
                .0 += count;
        }
    }
    let mut out: Vec<TopRow> = rows
        .into_iter()
        .map(|((thread, id), (own, total))| {
            let f = &profile.frames[id as usize];
            TopRow {
                function: f.function.clone(),
                file: f.file.clone(),
                first_line: f.first_line,
                thread: of.threads.then_some(thread),
                own,
                total,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (b.own, b.total, &a.function, &a.file, a.thread).cmp(&(
            a.own,
            a.total,
            &b.function,
            &b.file,
            b.thread,
        ))
    });
    out
}

/// A trace in Chrome's trace-event format (the JSON that Perfetto,
/// chrome://tracing and speedscope open), as `py-spy record -f
/// chrometrace` writes: for each thread, a function begins (`B`) at the
/// first sample that has it on the stack and ends (`E`) at the first that
/// does not, or one sampling period after the thread's last sample before
/// a gap (the thread was off CPU). Times are microseconds since `start_ns`
/// (`CLOCK_MONOTONIC`).
pub fn chrometrace(
    profile: &Profile,
    roots: &Roots,
    rate: u64,
    start_ns: u64,
) -> serde_json::Value {
    let Some(timeline) = &profile.timeline else {
        return json!({"traceEvents": []});
    };
    let period_ns = 1_000_000_000 / rate.max(1);
    // A thread with no sample for longer than this was off CPU meanwhile.
    let gap_ns = period_ns + period_ns / 2;
    let us = |ns: u64| ns.saturating_sub(start_ns) as f64 / 1000.0;
    // Frames at different lines of one function are one slice.
    let function_of = function_ids(profile);
    let mut threads: BTreeMap<(u32, u32), Vec<(u64, u32)>> = BTreeMap::new();
    for s in &timeline.samples {
        threads
            .entry((s.pid, s.tid))
            .or_default()
            .push((s.time_ns, s.stack));
    }
    let mut events = Vec::new();
    let mut named_processes = HashSet::new();
    for ((pid, tid), mut samples) in threads {
        if named_processes.insert(pid) {
            let name = match roots.process_names.get(&pid) {
                Some(cmd) => format!("process {pid} ({cmd})"),
                None => format!("process {pid}"),
            };
            events.push(
                json!({"name": "process_name", "ph": "M", "pid": pid, "tid": tid,
                               "args": {"name": name}}),
            );
        }
        events.push(
            json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                           "args": {"name": roots.thread(tid)}}),
        );
        samples.sort_unstable();
        // Functions open now, outermost first.
        let mut open: Vec<u32> = Vec::new();
        let mut last_ns = 0;
        let slice = |phase: &str, function: u32, at: u64| {
            let f = &profile.frames[function as usize];
            json!({"name": f.function, "cat": "python", "ph": phase, "ts": us(at),
                   "pid": pid, "tid": tid,
                   "args": {"file": f.file, "line": f.first_line}})
        };
        for (time_ns, stack) in samples {
            if !open.is_empty() && time_ns.saturating_sub(last_ns) > gap_ns {
                for &f in open.iter().rev() {
                    events.push(slice("E", f, last_ns + period_ns));
                }
                open.clear();
            }
            let now: Vec<u32> = timeline.stacks[stack as usize]
                .iter()
                .map(|&frame| function_of[frame as usize])
                .collect();
            let common = open.iter().zip(&now).take_while(|(a, b)| a == b).count();
            for &f in open[common..].iter().rev() {
                events.push(slice("E", f, time_ns));
            }
            for &f in &now[common..] {
                events.push(slice("B", f, time_ns));
            }
            open = now;
            last_ns = time_ns;
        }
        for &f in open.iter().rev() {
            events.push(slice("E", f, last_ns + period_ns));
        }
    }
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "exporter": format!("pyprobe {}", env!("CARGO_PKG_VERSION")),
            "samples_left_out": timeline.left_out,
        },
    })
}
