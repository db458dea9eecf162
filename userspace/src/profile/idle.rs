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
        let now = Instant::now();
        let stat = SchedStat::read(pid, tid)?;
        let seen = self.seen.entry((pid, tid)).or_insert(Seen {
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
            let frames = match target.frames(tstate, None) {
                Ok(frames) => frames,
                Err((frames, _)) => frames,
            };
            self.stack_reads += 1;
            // A thread that ran during the read may have moved on: keep the
            // read only if it was not scheduled meanwhile.
            match SchedStat::read(pid, tid) {
                Some(again) if again.timeslices == stat.timeslices && !again.runnable => {
                    seen.stack = Some((stat.timeslices, frames));
                }
                _ => seen.stack = None,
            }
        }
        let owed = seen.carry + off as f64 * rate as f64 / 1e9;
        let whole = owed.floor();
        let (_, frames) = seen.stack.as_ref()?;
        if frames.is_empty() {
            return None;
        }
        seen.carry = owed - whole;
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
