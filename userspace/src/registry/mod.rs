//! The bookkeeping of processes every job shares: which ones a selection
//! takes, which were passed over (not Python, not selected, failed), and
//! which exec'd and wait to be set up again once their new image runs an
//! interpreter (or to be dropped when it does not).
//!
//! A job owns what it set up in each process; the registry owns what is
//! known of the processes themselves, so `calls`, `record`/`top` and `log`
//! find, retry and drop processes the same way. What is true of a process
//! whatever the job (it runs no interpreter pyprobe can watch) is judged
//! once for every job of the run ([`runs_no_python`]): under the agent,
//! the profile, the log points and a calls job do not each parse the
//! program of every new shell, `sleep` or daemon. What is read of a Python
//! process to set it up (its interpreter, reader, kernel facts, container)
//! is read once for every job holding it ([`attach`]).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::selection::{Ignored, Selector, is_not_python};

mod attachment;

pub use attachment::{Attachment, attach, note_changed};

/// The processes found to run no Python interpreter pyprobe can watch,
/// for every job of this run (see [`Ignored`]: a process that execs, a
/// PID reused and a process passed over while starting are looked at
/// again).
static NO_PYTHON: std::sync::Mutex<Option<Ignored>> = std::sync::Mutex::new(None);

/// Whether process `pid` runs no interpreter pyprobe can watch (no
/// `_PyEval_EvalFrameDefault` in its program or a mapped libpython, a
/// kernel thread, gone), judged once for all jobs while it stays the same
/// program. A process that cannot be judged (its memory map unreadable
/// for another reason) is not: the job's own set-up says why.
pub fn runs_no_python(pid: u32) -> bool {
    let mut known = NO_PYTHON.lock().unwrap_or_else(|p| p.into_inner());
    let known = known.get_or_insert_with(Ignored::default);
    if known.holds(pid) {
        return true;
    }
    match crate::process::find_interpreter(pid) {
        Err(e) if e.is_not_python() => {
            known.insert(pid);
            true
        }
        _ => {
            // Looked at again (young, or it exec'd) and Python now: no
            // verdict stays, or the next job asking would pass it over.
            known.remove(pid);
            false
        }
    }
}

/// Forgets the verdicts and news of processes not in `alive` (they
/// exited).
fn forget_exited(alive: &std::collections::BTreeSet<u32>) {
    attachment::forget_exited(alive);
    if let Some(known) = NO_PYTHON.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        known.keep_only(alive);
    }
}

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
        forget_exited(&pids);
        for pid in pids {
            if !known(pid) && self.takes_new(pid) {
                out.push(pid);
            }
        }
        out
    }

    /// Whether process `pid`, just found (by a scan, or as a child forked
    /// by a watched process), is to be set up: it is not ours, not passed
    /// over, not waiting after an exec, the selection takes it, and it
    /// may run Python ([`runs_no_python`]). One the selection leaves out,
    /// or that runs no Python, is passed over.
    pub fn takes_new(&mut self, pid: u32) -> bool {
        if pid == std::process::id()
            || self.exec_pending.contains_key(&pid)
            || self.ignored.holds(pid)
        {
            return false;
        }
        if !self.select.selects(pid) || runs_no_python(pid) {
            self.ignored.insert(pid);
            return false;
        }
        // Its children are of the family too (--subprocesses), even once
        // it has exited.
        self.select.adopt(pid);
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_without_python_is_judged_so_for_every_job() {
        // This test binary runs no interpreter; a PID that does not exist
        // runs nothing.
        let me = std::process::id();
        assert!(runs_no_python(me));
        assert!(runs_no_python(u32::MAX - 1));
        // The verdict is kept while the process is the same program (a
        // young one, as this test may be, is looked at once more first).
        {
            let mut known = NO_PYTHON.lock().unwrap();
            let known = known.as_mut().expect("verdicts kept");
            let _ = known.holds(me);
            assert!(known.holds(me));
        }
        // Every registry passes a program without Python over, and keeps
        // passing it over.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        for _ in 0..2 {
            let mut registry = Registry::new(Selector::default());
            assert!(!registry.takes_new(pid));
            assert!(!registry.takes_new(pid));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_process_judged_while_starting_is_not_passed_over_once_it_runs_python() {
        let child = pyprobe_testenv::sleeping_python();
        let pid = child.pid();
        // Judged while starting, as a scan may find it: no Python yet.
        NO_PYTHON
            .lock()
            .unwrap()
            .get_or_insert_with(Ignored::default)
            .insert(pid);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while crate::process::find_interpreter(pid).is_err() {
            assert!(std::time::Instant::now() < deadline, "Python never ran");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Every job asking from now on finds Python (the look again a
        // young process gets is not used up by the first).
        for job in 0..3 {
            assert!(!runs_no_python(pid), "job {job} passed it over");
        }
    }
}
