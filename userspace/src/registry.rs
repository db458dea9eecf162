//! The bookkeeping of processes every job shares: which ones a selection
//! takes, which were passed over (not Python, not selected, failed), and
//! which exec'd and wait to be set up again once their new image runs an
//! interpreter (or to be dropped when it does not).
//!
//! A job owns what it set up in each process; the registry owns what is
//! known of the processes themselves, so `calls`, `record`/`top` and `log`
//! find, retry and drop processes the same way.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::selection::{Ignored, Selector, is_not_python};

/// How long a process that exec'd may take to map and start a new
/// interpreter before it is dropped as no longer Python.
pub const EXEC_SETUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Processes found, passed over, and waiting after an exec.
#[derive(Debug)]
pub struct Registry {
    select: Selector,
    ignored: Ignored,
    exec_pending: BTreeMap<u32, ExecPending>,
}

/// A process that exec'd, until set up again.
#[derive(Debug, Clone, Copy)]
struct ExecPending {
    /// When to give up.
    deadline: Instant,
    /// Whether to say what becomes of it (a pool's worker that execs
    /// something else is not worth a line).
    announce: bool,
}

/// What became of a process that exec'd (see [`Registry::exec_tried`]).
#[derive(Debug)]
pub enum ExecOutcome<T> {
    /// Set up again: `value` is what the set-up returned.
    Ready {
        /// The process.
        pid: u32,
        /// What the set-up returned.
        value: T,
        /// As given to [`Registry::exec_seen`].
        announce: bool,
    },
    /// Not set up by its deadline: passed over from now on.
    Dropped {
        /// The process.
        pid: u32,
        /// The line to print (`None` when it is not worth saying).
        line: Option<String>,
    },
}

impl Registry {
    /// A registry for the processes `select` takes (every one when empty).
    pub fn new(select: Selector) -> Self {
        Self {
            select,
            ignored: Ignored::default(),
            exec_pending: BTreeMap::new(),
        }
    }

    /// Processes to set up: every PID in `/proc` but ours that the
    /// selection takes, is not `known` to the job, not passed over and
    /// not waiting after an exec. Those the selection leaves out are
    /// passed over.
    pub fn new_pids(&mut self, known: impl Fn(u32) -> bool) -> Vec<u32> {
        let mut out = Vec::new();
        let pids: std::collections::BTreeSet<u32> =
            crate::selection::all_pids().into_iter().collect();
        self.ignored.keep_only(&pids);
        for pid in pids {
            if !known(pid) && self.takes_new(pid) {
                out.push(pid);
            }
        }
        out
    }

    /// Whether process `pid`, just found (by a scan, or as a child forked
    /// by a watched process), is to be set up: it is not ours, not passed
    /// over, not waiting after an exec, and the selection takes it. One
    /// the selection leaves out is passed over.
    pub fn takes_new(&mut self, pid: u32) -> bool {
        if pid == std::process::id()
            || self.exec_pending.contains_key(&pid)
            || self.ignored.holds(pid)
        {
            return false;
        }
        if self.select.selects(pid) {
            return true;
        }
        self.ignored.insert(pid);
        false
    }

    /// Passes over `pid` as it is now (see [`Ignored`]).
    pub fn pass_over(&mut self, pid: u32) {
        self.ignored.insert(pid);
    }

    /// Reports the set-up of a process found by a scan: the line of one set
    /// up (`verb` says how it is watched), a line saying why not for one
    /// that failed unless it is simply not Python or gone already. A
    /// process that failed is passed over.
    pub fn note_scanned(&mut self, pid: u32, result: anyhow::Result<String>, verb: &str) {
        match result {
            Ok(line) => eprintln!("pyprobe: {verb} {line}"),
            Err(e) => {
                if !is_not_python(&e) {
                    eprintln!(
                        "pyprobe: not {verb} PID {pid}: {}",
                        crate::errors::one_line(e.as_ref())
                    );
                }
                self.ignored.insert(pid);
            }
        }
    }

    /// Process `pid` exec'd: it is set up again (see [`Self::execs_to_retry`])
    /// once it runs an interpreter, or dropped after
    /// [`EXEC_SETUP_TIMEOUT`]; `announce` tells whether to say so.
    pub fn exec_seen(&mut self, pid: u32, announce: bool) {
        self.exec_pending.insert(
            pid,
            ExecPending {
                deadline: Instant::now() + EXEC_SETUP_TIMEOUT,
                announce,
            },
        );
    }

    /// Process `pid` exited: it waits for nothing any more.
    pub fn exited(&mut self, pid: u32) {
        self.exec_pending.remove(&pid);
    }

    /// Whether `pid` exec'd and waits to be set up again.
    pub fn is_exec_pending(&self, pid: u32) -> bool {
        self.exec_pending.contains_key(&pid)
    }

    /// Whether any process waits to be set up again after an exec.
    pub fn any_exec_pending(&self) -> bool {
        !self.exec_pending.is_empty()
    }

    /// The processes that exec'd to try to set up again now (those that
    /// exited since are forgotten); each try goes to
    /// [`Self::exec_tried`].
    pub fn execs_to_retry(&mut self) -> Vec<u32> {
        self.exec_pending
            .retain(|&pid, _| crate::process::is_alive(pid));
        self.exec_pending.keys().copied().collect()
    }

    /// What became of a try to set up process `pid` after its exec: set up
    /// (`Some(Ready)`); not yet (`None`: its new interpreter may still be
    /// starting, tried again until its deadline); or dropped by its
    /// deadline and passed over from now on.
    pub fn exec_tried<T>(&mut self, pid: u32, result: anyhow::Result<T>) -> Option<ExecOutcome<T>> {
        let ExecPending { deadline, announce } = *self.exec_pending.get(&pid)?;
        let error = match result {
            Ok(value) => {
                self.exec_pending.remove(&pid);
                return Some(ExecOutcome::Ready {
                    pid,
                    value,
                    announce,
                });
            }
            Err(e) => e,
        };
        if Instant::now() < deadline {
            log::debug!(
                "PID {pid} after its exec: not set up yet{}: {error:#}",
                if is_not_python(&error) {
                    " (no interpreter)"
                } else {
                    ""
                }
            );
            return None;
        }
        self.exec_pending.remove(&pid);
        self.ignored.insert(pid);
        let line = announce.then(|| {
            let what = crate::process::command_name(pid).unwrap_or_else(|| "a program".into());
            format!(
                "PID {pid} exec'd {what}, which pyprobe cannot watch ({}): dropped",
                crate::errors::one_line(error.as_ref())
            )
        });
        Some(ExecOutcome::Dropped { pid, line })
    }
}
