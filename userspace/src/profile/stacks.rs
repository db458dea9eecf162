//! Samples as they arrive from the kernel, named and counted: each distinct
//! stack once, with the number of samples that hit it.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use pyprobe_common::sample::{self, FRAME_LEN, FrameRecord, HEADER_LEN, SampleHeader};
use serde::Serialize;

use crate::python::{
    memory::ProcessMemory,
    reader::{Frame, Target},
};

/// A named frame: a function at a line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FrameName {
    /// Qualified name (`co_qualname` from 3.11, else `co_name`).
    pub function: String,
    /// `co_filename`.
    pub file: String,
    /// Line being run (or, in a caller, the line of the call).
    pub line: Option<i32>,
    /// The function's first line (`co_firstlineno`).
    pub first_line: i32,
}

impl FrameName {
    fn of(frame: &Frame) -> Self {
        Self {
            function: frame.function.clone(),
            file: frame.filename.clone(),
            line: frame.line,
            first_line: frame.first_line,
        }
    }

    /// `function (file:line)`, as py-spy prints frames.
    pub fn label(&self) -> String {
        match self.line {
            Some(line) => format!("{} ({}:{line})", self.function, self.file),
            None => format!("{} ({})", self.function, self.file),
        }
    }
}

/// A distinct stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKey {
    /// Process.
    pub pid: u32,
    /// Thread (0 unless threads are kept apart).
    pub tid: u32,
    /// Sampled off CPU (`--idle`).
    pub idle: bool,
    /// The outermost frames are missing (too deep, or torn while read).
    pub truncated: bool,
    /// Frames as indices into [`Profile::frames`], outermost first.
    pub frames: Vec<u32>,
}

/// Counts of samples that were taken but not kept, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Dropped {
    /// Samples of a process pyprobe no longer (or never) knew.
    pub unknown_process: u64,
    /// Frames whose code object could not be read (left out of their stack).
    pub unreadable_frames: u64,
    /// Samples of threads not holding the GIL (with `--gil`).
    pub not_holding_gil: u64,
    /// Kernel records too short to be samples (a bug if ever non-zero).
    pub malformed: u64,
}

/// Everything sampled so far.
#[derive(Debug, Default)]
pub struct Profile {
    /// Distinct frames.
    pub frames: Vec<FrameName>,
    index: HashMap<FrameName, u32>,
    /// Samples per distinct stack.
    pub stacks: HashMap<StackKey, u64>,
    /// Samples kept.
    pub samples: u64,
    /// Of which off CPU (`--idle`).
    pub idle_samples: u64,
    /// Of which the thread held the GIL (on-CPU samples only).
    pub gil_samples: u64,
    /// Of which truncated (deeper than the kernel walks).
    pub truncated: u64,
    /// Of which torn (a frame changed while being read).
    pub torn: u64,
    /// Samples or frames not kept.
    pub dropped: Dropped,
    /// On-CPU samples in time order, when a timeline is kept
    /// (`-f chrometrace`).
    pub timeline: Option<Timeline>,
}

/// Most samples a [`Timeline`] holds (16 bytes each: 32 MB; at 100 Hz, 5
/// hours of one busy thread).
pub const TIMELINE_CAP: usize = 2_000_000;

/// On-CPU samples with the time each was taken, for a trace.
#[derive(Debug, Default)]
pub struct Timeline {
    /// Samples as they came (roughly, not strictly, in time order).
    pub samples: Vec<TimedSample>,
    /// Distinct stacks: frame indices, outermost first.
    pub stacks: Vec<Vec<u32>>,
    index: HashMap<Vec<u32>, u32>,
    /// Samples not kept once [`TIMELINE_CAP`] were.
    pub left_out: u64,
}

/// One sample of a [`Timeline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedSample {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub time_ns: u64,
    /// Process.
    pub pid: u32,
    /// Thread.
    pub tid: u32,
    /// Index into [`Timeline::stacks`].
    pub stack: u32,
}

impl Timeline {
    /// Keeps a sample of `frames` (innermost first), unless full.
    fn push(&mut self, time_ns: u64, pid: u32, tid: u32, frames: &[u32]) {
        if self.samples.len() >= TIMELINE_CAP {
            self.left_out += 1;
            return;
        }
        let outermost_first: Vec<u32> = frames.iter().rev().copied().collect();
        let stack = match self.index.get(&outermost_first) {
            Some(&i) => i,
            None => {
                let i = self.stacks.len() as u32;
                self.stacks.push(outermost_first.clone());
                self.index.insert(outermost_first, i);
                i
            }
        };
        self.samples.push(TimedSample {
            time_ns,
            pid,
            tid,
            stack,
        });
    }
}

impl Profile {
    fn intern(&mut self, name: FrameName) -> u32 {
        if let Some(&i) = self.index.get(&name) {
            return i;
        }
        let i = self.frames.len() as u32;
        self.frames.push(name.clone());
        self.index.insert(name, i);
        i
    }

    fn add(&mut self, key: StackKey) {
        self.add_n(key, 1);
    }

    fn add_n(&mut self, mut key: StackKey, n: u64) {
        self.samples += n;
        if key.idle {
            self.idle_samples += n;
        }
        key.frames.reverse();
        *self.stacks.entry(key).or_insert(0) += n;
    }
}

/// How long a code object's name is trusted before its identity is read
/// again.
const RECHECK: Duration = Duration::from_secs(1);

/// One process being sampled: its reader and the names of the frames seen.
pub struct Process {
    /// What was read of it to set it up (shared with the run's other
    /// jobs while they hold it).
    pub attachment: std::rc::Rc<crate::registry::Attachment>,
    /// Reader of its memory.
    pub target: Target<ProcessMemory>,
    /// Code object -> (instruction word -> frame index, or `None` for
    /// frames that are not Python code).
    names: HashMap<u64, HashMap<u64, Option<u32>>>,
    /// Code object -> when its identity was last read (time and code
    /// epoch), and what it was.
    checked: HashMap<u64, Checked>,
    /// The kernel counts this process's code object frees
    /// ([`SampleHeader::code_epoch`] can be trusted).
    watched: bool,
}

/// When a code object's identity was last read, and what it was.
struct Checked {
    at: Instant,
    epoch: u64,
    identity: (u64, i32),
}

impl Process {
    /// Starts naming frames of `target` (a reader of `attachment`'s
    /// process); `watched` when the kernel counts
    /// its code object frees.
    pub fn new(
        attachment: std::rc::Rc<crate::registry::Attachment>,
        target: Target<ProcessMemory>,
        watched: bool,
    ) -> Self {
        Self {
            attachment,
            target,
            names: HashMap::new(),
            checked: HashMap::new(),
            watched,
        }
    }

    /// Drops what is known of the code object at `code` if it is no longer
    /// the one named. Its identity is read again only when the process
    /// freed some code object since the last read (the sample's `epoch`
    /// differs), or, when frees are not watched, once per [`RECHECK`].
    fn recheck(&mut self, code: u64, epoch: u64, now: Instant) {
        if let Some(c) = self.checked.get(&code) {
            let fresh = if self.watched {
                c.epoch == epoch
            } else {
                now.duration_since(c.at) < RECHECK
            };
            if fresh {
                return;
            }
        }
        let Ok(identity) = self.target.code_identity(code) else {
            return;
        };
        let new = Checked {
            at: now,
            epoch,
            identity,
        };
        if let Some(old) = self.checked.insert(code, new)
            && old.identity != identity
        {
            self.names.remove(&code);
            self.target.forget_code(code);
        }
    }
}

/// How samples are kept.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keep {
    /// Keep threads apart.
    pub threads: bool,
    /// Keep only samples of threads holding the GIL.
    pub gil_only: bool,
}

/// Parses a kernel sample: its header and frames (innermost first).
pub fn parse(bytes: &[u8]) -> Option<(SampleHeader, Vec<FrameRecord>)> {
    if bytes.len() < HEADER_LEN {
        return None;
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let header = SampleHeader {
        tgid: u32_at(0),
        tid: u32_at(4),
        flags: u32_at(8),
        frames: u32_at(12),
        next: u64_at(16),
        runs: u32_at(24),
        cpu: u32_at(28),
        code_epoch: u64_at(32),
        time_ns: u64_at(40),
    };
    let n = header.frames as usize;
    if bytes.len() < HEADER_LEN + n * FRAME_LEN {
        return None;
    }
    let frames = (0..n)
        .map(|i| {
            let at = HEADER_LEN + i * FRAME_LEN;
            FrameRecord {
                code: u64_at(at),
                instruction: u64_at(at + 8),
            }
        })
        .collect();
    Some((header, frames))
}

impl Profile {
    /// Adds a sample from the kernel.
    pub fn add_kernel_sample(
        &mut self,
        bytes: &[u8],
        processes: &mut HashMap<u32, Process>,
        keep: Keep,
    ) {
        let Some((header, records)) = parse(bytes) else {
            self.dropped.malformed += 1;
            return;
        };
        let holds_gil = header.flags & sample::HOLDS_GIL != 0;
        if keep.gil_only && !holds_gil {
            self.dropped.not_holding_gil += 1;
            return;
        }
        let Some(process) = processes.get_mut(&header.tgid) else {
            self.dropped.unknown_process += 1;
            return;
        };
        let mut frames = Vec::with_capacity(records.len());
        let now = Instant::now();
        for r in records {
            process.recheck(r.code, header.code_epoch, now);
            let known = process
                .names
                .get(&r.code)
                .and_then(|by_instruction| by_instruction.get(&r.instruction))
                .copied();
            let name = match known {
                Some(name) => name,
                None => match process.target.code_frame(r.code, r.instruction) {
                    Ok(frame) => {
                        let name = frame.map(|(f, _)| self.intern(FrameName::of(&f)));
                        process
                            .names
                            .entry(r.code)
                            .or_default()
                            .insert(r.instruction, name);
                        name
                    }
                    Err(_) => {
                        self.dropped.unreadable_frames += 1;
                        None
                    }
                },
            };
            frames.extend(name);
        }
        if holds_gil {
            self.gil_samples += 1;
        }
        let torn = header.flags & sample::TORN != 0;
        let truncated = torn || header.flags & sample::TRUNCATED != 0;
        self.torn += u64::from(torn);
        self.truncated += u64::from(header.flags & sample::TRUNCATED != 0);
        if let Some(timeline) = &mut self.timeline {
            timeline.push(header.time_ns, header.tgid, header.tid, &frames);
        }
        self.add(StackKey {
            pid: header.tgid,
            tid: if keep.threads { header.tid } else { 0 },
            idle: false,
            truncated,
            frames,
        });
    }

    /// Adds `n` samples of a thread off CPU, read from userspace (`--idle`):
    /// its frames innermost first.
    pub fn add_idle_samples(&mut self, pid: u32, tid: u32, frames: &[Frame], keep: Keep, n: u64) {
        if n == 0 {
            return;
        }
        if keep.gil_only {
            self.dropped.not_holding_gil += n;
            return;
        }
        let frames = frames
            .iter()
            .map(|f| self.intern(FrameName::of(f)))
            .collect();
        self.add_n(
            StackKey {
                pid,
                tid: if keep.threads { tid } else { 0 },
                idle: true,
                truncated: false,
                frames,
            },
            n,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_kernel_sample() {
        let mut bytes = Vec::new();
        for v in [7u32, 8, sample::HOLDS_GIL, 2] {
            bytes.extend(v.to_le_bytes());
        }
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(1u32.to_le_bytes());
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(9u64.to_le_bytes());
        bytes.extend(12345u64.to_le_bytes());
        for v in [0x10u64, 0x20, 0x30, 0x40] {
            bytes.extend(v.to_le_bytes());
        }
        let (h, frames) = parse(&bytes).expect("parses");
        assert_eq!(
            (
                h.tgid,
                h.tid,
                h.flags,
                h.frames,
                h.cpu,
                h.code_epoch,
                h.time_ns
            ),
            (7, 8, 1, 2, 3, 9, 12345)
        );
        assert_eq!(
            frames,
            vec![
                FrameRecord {
                    code: 0x10,
                    instruction: 0x20
                },
                FrameRecord {
                    code: 0x30,
                    instruction: 0x40
                }
            ]
        );
        // Shorter than its frame count says: rejected.
        assert!(parse(&bytes[..bytes.len() - 1]).is_none());
    }

    #[test]
    fn identical_stacks_are_counted_once_outermost_first() {
        let mut p = Profile::default();
        let f = |name: &str, line| Frame {
            function: name.into(),
            filename: "app.py".into(),
            line: Some(line),
            first_line: 1,
            instruction: 0,
            code: 0,
            locals: Vec::new(),
        };
        let stack = [f("leaf", 3), f("main", 9)];
        let keep = Keep::default();
        p.add_idle_samples(1, 2, &stack, keep, 1);
        p.add_idle_samples(1, 3, &stack, keep, 4);
        p.add_idle_samples(1, 3, &stack, keep, 0);
        assert_eq!((p.samples, p.idle_samples), (5, 5));
        assert_eq!(p.stacks.len(), 1);
        let (key, count) = p.stacks.iter().next().expect("one stack");
        assert_eq!(*count, 5);
        let labels: Vec<String> = key
            .frames
            .iter()
            .map(|&i| p.frames[i as usize].label())
            .collect();
        assert_eq!(labels, ["main (app.py:9)", "leaf (app.py:3)"]);
        // Threads kept apart: two stacks.
        let mut p = Profile::default();
        let keep = Keep {
            threads: true,
            ..Keep::default()
        };
        p.add_idle_samples(1, 2, &stack, keep, 1);
        p.add_idle_samples(1, 3, &stack, keep, 1);
        assert_eq!(p.stacks.len(), 2);
    }
}
