//! `--idle`: samples of Python threads while they are off CPU, at the same
//! rate as the kernel samples threads on CPU, at a cost that does not grow
//! with the rate.
//!
//! Every [`IDLE_PERIOD`] each known Python thread's scheduler statistics
//! are read (`/proc/PID/task/TID/schedstat`: time run, time waiting for a
//! CPU, times scheduled; and its state from `stat`). The time it spent
//! neither running nor runnable since the last read, times the sampling
//! rate, is the number of off-CPU samples it is owed (fractions carried
//! over, so nothing is rounded away). They go to the stack it waits at: a
//! thread that has not been scheduled since its stack was read is still
//! where it was (it ran no code), so its stack is read from the process
//! only when it has run since; a thread running now is credited at the
//! stack it last waited at. A thread that woke and slept again within one
//! period has all of that period's waiting put at the stack it waits at
//! now: attribution is exact for threads that wait long (the point of
//! `--idle`) and, for ones that wake often, as good as a 10 Hz sampler's.
//! Time spent runnable but waiting for a CPU is not counted (the thread
//! is neither sampled on CPU nor waiting on anything of its own).
//!
//! Cost: two small `/proc` reads per thread per period (about 10-20 µs),
//! plus a stack read when the thread has run since the last one; see
//! `cargo xtask bench --only profile`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::python::{memory::ProcessMemory, reader::Frame, reader::Target};

/// How often off-CPU threads are accounted for.
pub const IDLE_PERIOD: Duration = Duration::from_millis(100);

/// What `/proc` says of a thread's scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedStat {
    /// Nanoseconds on a CPU.
    pub run_ns: u64,
    /// Nanoseconds runnable, waiting for a CPU.
    pub wait_ns: u64,
    /// Times scheduled onto a CPU.
    pub timeslices: u64,
    /// Whether it is running or runnable now (state `R`).
    pub runnable: bool,
}

impl SchedStat {
    /// Reads thread `tid` of `pid`; `None` when it is gone (or the kernel
    /// keeps no schedstat).
    pub fn read(pid: u32, tid: u32) -> Option<SchedStat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        // The state follows the parenthesised command, which may hold spaces.
        let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
        let sched = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
        Self::parse(state, &sched)
    }

    fn parse(state: &str, schedstat: &str) -> Option<SchedStat> {
        let mut it = schedstat.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(run_ns)), Some(Ok(wait_ns)), Some(Ok(timeslices))) =
            (it.next(), it.next(), it.next())
        else {
            return None;
        };
        Some(SchedStat {
            run_ns,
            wait_ns,
            timeslices,
            runnable: state == "R",
        })
    }
}

/// What is kept of one thread between periods.
struct Seen {
    at: Instant,
    stat: SchedStat,
    /// The stack it waits at, and the `timeslices` it was read at.
    stack: Option<(u64, Vec<Frame>)>,
    /// Samples owed but not yet whole.
    carry: f64,
}

/// Off-CPU accounting of every watched Python thread.
#[derive(Default)]
pub struct IdleSampler {
    seen: HashMap<(u32, u32), Seen>,
    /// Stacks read from the processes (for the bench and the tests).
    pub stack_reads: u64,
}

/// Off-CPU nanoseconds between two reads `wall_ns` apart.
pub fn off_cpu_ns(before: &SchedStat, after: &SchedStat, wall_ns: u64) -> u64 {
    let busy =
        after.run_ns.saturating_sub(before.run_ns) + after.wait_ns.saturating_sub(before.wait_ns);
    wall_ns.saturating_sub(busy)
}

impl IdleSampler {
    /// Accounts for one thread: returns its stack and the whole samples it
    /// is owed since the last call (none at the first).
    pub fn account(
        &mut self,
        target: &Target<ProcessMemory>,
        pid: u32,
        tid: u32,
        tstate: u64,
        rate: u64,
    ) -> Option<(Vec<Frame>, u64)> {
        let stat = SchedStat::read(pid, tid)?;
        self.account_stat((pid, tid), Instant::now(), stat, rate, || {
            let frames = match target.frames(tstate, None) {
                Ok(frames) => frames,
                Err((frames, _)) => frames,
            };
            (frames, SchedStat::read(pid, tid))
        })
    }

    /// [`Self::account`] for thread `key` read at `now` as `stat`;
    /// `read_stack` reads its frames, then its scheduling again (to tell
    /// whether it ran during the read).
    fn account_stat(
        &mut self,
        key: (u32, u32),
        now: Instant,
        stat: SchedStat,
        rate: u64,
        read_stack: impl FnOnce() -> (Vec<Frame>, Option<SchedStat>),
    ) -> Option<(Vec<Frame>, u64)> {
        let seen = self.seen.entry(key).or_insert(Seen {
            at: now,
            stat,
            stack: None,
            carry: 0.0,
        });
        let wall = now.duration_since(seen.at).as_nanos() as u64;
        let off = off_cpu_ns(&seen.stat, &stat, wall);
        seen.at = now;
        seen.stat = stat;
        // Where it waits: read again only if it has been scheduled since
        // the stack was read (else it ran no code), and only while it is off
        // CPU (a running thread's frames change under the read).
        let fresh = seen
            .stack
            .as_ref()
            .is_some_and(|(slices, _)| *slices == stat.timeslices);
        if !fresh && !stat.runnable {
            let (frames, again) = read_stack();
            self.stack_reads += 1;
            // A thread that ran during the read may have moved on: keep the
            // read only if it was not scheduled meanwhile. Else the stack it
            // waited at before stays (and is read again next period).
            if again.is_some_and(|a| a.timeslices == stat.timeslices && !a.runnable) {
                seen.stack = Some((stat.timeslices, frames));
            }
        }
        let owed = seen.carry + off as f64 * rate as f64 / 1e9;
        let Some((_, frames)) = seen.stack.as_ref() else {
            // No stack known yet: what it is owed waits for one.
            seen.carry = owed;
            return None;
        };
        let whole = owed.floor();
        seen.carry = owed - whole;
        if frames.is_empty() {
            return None;
        }
        Some((frames.clone(), whole as u64))
    }

    /// Forgets the threads of `pid` not in `alive` (exited threads).
    pub fn retain(&mut self, pid: u32, alive: &[(u32, u64)]) {
        self.seen
            .retain(|&(p, t), _| p != pid || alive.iter().any(|&(tid, _)| tid == t));
    }

    /// Forgets every thread of `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.seen.retain(|&(p, _), _| p != pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schedstat_and_state() {
        assert_eq!(
            SchedStat::parse("S", "1200 300 7\n"),
            Some(SchedStat {
                run_ns: 1200,
                wait_ns: 300,
                timeslices: 7,
                runnable: false
            })
        );
        assert!(SchedStat::parse("R", "1 2 3").unwrap().runnable);
        assert_eq!(SchedStat::parse("S", "garbage"), None);
    }

    #[test]
    fn a_blocked_thread_is_not_runnable_and_not_scheduled_while_it_waits() {
        let pid = std::process::id();
        // This thread is running while it reads its own state.
        // SAFETY: a plain system call.
        let me = unsafe { libc::gettid() } as u32;
        assert!(SchedStat::read(pid, me).expect("readable").runnable);

        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        let (wake, wait) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            // SAFETY: as above.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            wait.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        // Give it time to block in recv().
        let mut first = None;
        for _ in 0..200 {
            first = SchedStat::read(pid, tid).filter(|s| !s.runnable);
            if first.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let first = first.expect("the waiting thread is never seen off CPU");
        std::thread::sleep(Duration::from_millis(20));
        let later = SchedStat::read(pid, tid).expect("still there");
        assert_eq!(later.timeslices, first.timeslices, "it did not run");
        assert_eq!(later.run_ns, first.run_ns, "it did not run");
        wake.send(()).unwrap();
        sleeper.join().unwrap();
        assert_eq!(SchedStat::read(pid, tid), None, "gone");
    }

    /// A frame named `name`, for the accounting tests.
    fn frame(name: &str) -> Frame {
        Frame {
            function: name.to_owned(),
            filename: "app.py".to_owned(),
            line: Some(7),
            first_line: 5,
            instruction: 0,
            code: 0x1000,
            locals: Vec::new(),
        }
    }

    #[test]
    fn a_thread_that_runs_during_every_stack_read_loses_no_samples() {
        let mut idle = IdleSampler::default();
        let start = Instant::now();
        let key = (1, 2);
        // Off CPU the whole time, but scheduled for a moment each period
        // (a thread that wakes every 50 ms): 100 ms periods at 1000 Hz owe
        // 100 samples each.
        let stat = |slices: u64| SchedStat {
            run_ns: 0,
            wait_ns: 0,
            timeslices: slices,
            runnable: false,
        };
        let first = idle.account_stat(key, start, stat(1), 1000, || {
            (vec![frame("idle_wait")], Some(stat(1)))
        });
        assert_eq!(
            first.map(|(_, n)| n),
            Some(0),
            "the first read owes nothing yet"
        );
        let mut total = 0;
        for period in 1..=10u64 {
            let now = start + Duration::from_millis(100 * period);
            // It ran during the read every other period.
            let moved = period % 2 == 1;
            let after = stat(period * 2 + u64::from(moved));
            let got = idle.account_stat(key, now, stat(period * 2), 1000, || {
                (vec![frame("idle_wait")], Some(after))
            });
            let (frames, samples) = got.expect("a stack is known");
            assert_eq!(frames[0].function, "idle_wait");
            total += samples;
        }
        assert_eq!(total, 1000, "every sample owed over 1 s at 1000 Hz");
    }

    #[test]
    fn samples_owed_before_any_stack_is_known_are_kept_for_it() {
        let mut idle = IdleSampler::default();
        let start = Instant::now();
        let stat = |slices: u64| SchedStat {
            run_ns: 0,
            wait_ns: 0,
            timeslices: slices,
            runnable: false,
        };
        let key = (1, 3);
        idle.account_stat(key, start, stat(1), 100, || (vec![], None));
        // The read raced the thread: no stack yet, 10 samples owed.
        let got = idle.account_stat(
            key,
            start + Duration::from_millis(100),
            stat(2),
            100,
            || (vec![frame("wait")], Some(stat(3))),
        );
        assert_eq!(got, None);
        // Read whole now: the 10 from before and 10 of this period.
        let got = idle.account_stat(
            key,
            start + Duration::from_millis(200),
            stat(4),
            100,
            || (vec![frame("wait")], Some(stat(4))),
        );
        assert_eq!(got.map(|(_, n)| n), Some(20));
    }

    #[test]
    fn off_cpu_time_is_what_was_neither_run_nor_waited_for() {
        let a = SchedStat {
            run_ns: 1_000,
            wait_ns: 500,
            timeslices: 3,
            runnable: false,
        };
        let b = SchedStat {
            run_ns: 31_000_000,
            wait_ns: 1_000_500,
            timeslices: 5,
            runnable: false,
        };
        // 100 ms, of which 31 ms ran and 1 ms waited for a CPU.
        assert_eq!(off_cpu_ns(&a, &b, 100_000_000), 68_001_000);
        // Not scheduled at all: the whole period.
        assert_eq!(off_cpu_ns(&a, &a, 100_000_000), 100_000_000);
        // Clock skew between the reads never makes it negative.
        assert_eq!(off_cpu_ns(&a, &b, 1_000), 0);
    }
}
