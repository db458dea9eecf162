//! Launch mode (`pyprobe record -- python app.py`): start a program held
//! at its first Python call, let the job set it up as a `--pid` target,
//! then release it, so that nothing it runs is missed and nothing races.
//!
//! Holding needs the program to stop once its interpreter is initialized
//! and before it evaluates its first frame. The program is pyprobe's own
//! child, so its start-up is followed with ptrace (only there: a process
//! pyprobe did not start is never stopped): the child asks to be traced
//! and execs; pyprobe follows its system calls (and its execs: a pyenv
//! shim is a shell that execs the interpreter) until the interpreter's
//! code is mapped executable, puts a breakpoint on the first instruction
//! of `_PyEval_EvalFrameDefault`, and lets it run. At the breakpoint the
//! original byte goes back, the instruction pointer is moved back onto
//! it, and the program waits, stopped, while the job attaches
//! ([`release_held`] detaches ptrace and it goes on as if nothing
//! happened).

use std::{os::unix::process::CommandExt, process::Command};

use anyhow::{Context, bail};

/// A launched program, stopped at its first Python call until
/// [`release_held`].
pub struct Launched {
    child: std::process::Child,
}

/// What starting a program came to.
pub enum Start {
    /// Stopped at its first Python call.
    Held(Launched),
    /// It ended before running any Python code (or never ran Python):
    /// its exit code, as a shell gives it (128 + signal when killed).
    Ended(i32),
}

/// The program waiting to be released, by PID.
static HELD: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);

/// The `PTRACE_O_*` options pyprobe follows the start-up with: execs are
/// reported, system-call stops are told apart from signals, and the
/// program is killed if pyprobe dies while it is held.
const OPTIONS: libc::c_int =
    libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL;

/// `mmap` on x86_64.
const SYS_MMAP: u64 = 9;

/// Starts `program` (a path or a name looked up in `PATH`) with `args` and
/// holds it at its first Python call. Must be called from the thread that
/// will call [`release_held`] (ptrace answers its tracer thread alone).
pub fn start_held(program: &str, args: &[String]) -> anyhow::Result<Start> {
    let mut command = Command::new(program);
    command.args(args);
    // SAFETY: PTRACE_TRACEME only marks the calling (child) process as
    // traced by its parent; async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let pid = child.id() as libc::pid_t;
    let launched = Launched { child };
    // Stopped by its exec.
    if let Stop::Exited(code) = wait(pid)? {
        return Ok(Start::Ended(code));
    }
    // SAFETY: our stopped tracee; options are plain flags.
    if unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, OPTIONS as libc::c_ulong) } == -1 {
        bail!(
            "cannot follow {program} as it starts: {}",
            std::io::Error::last_os_error()
        );
    }
    loop {
        // Until the interpreter's code is mapped executable: each system
        // call, and each exec; then to its first Python call.
        let address = match follow_to_interpreter(pid)? {
            Progress::At(address) => address,
            Progress::Exited(code) => return Ok(Start::Ended(code)),
            Progress::Exec => continue,
        };
        match run_to_breakpoint(pid, address)? {
            Progress::At(_) => {
                *HELD.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid as u32);
                return Ok(Start::Held(launched));
            }
            // It exec'd meanwhile: follow the new image.
            Progress::Exec => continue,
            Progress::Exited(code) => return Ok(Start::Ended(code)),
        }
    }
}

/// Where following the start-up got to.
enum Progress {
    /// At this address: `_PyEval_EvalFrameDefault` mapped (following), or
    /// stopped on it (at the breakpoint).
    At(u64),
    /// The program exec'd.
    Exec,
    /// The program ended (reaped), with this code.
    Exited(i32),
}

/// Lets the held program go on (a no-op when none is held): called by a
/// job once it has set the program up.
pub fn release_held() -> anyhow::Result<()> {
    let Some(pid) = HELD.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return Ok(());
    };
    // SAFETY: detaching our stopped tracee, no signal.
    if unsafe { libc::ptrace(libc::PTRACE_DETACH, pid as libc::pid_t, 0, 0) } == -1 {
        bail!(
            "cannot release PID {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Whether a launched program is being traced (see [`crate::live`]:
/// Ctrl-C goes to it, not to pyprobe).
pub fn any_launched() -> bool {
    LAUNCHED_PID.load(std::sync::atomic::Ordering::Relaxed) != 0
}

/// The launched program's PID (0: none).
static LAUNCHED_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Sends SIGINT to the launched program, as Ctrl-C in its terminal would
/// (the full-screen view takes Ctrl-C as a key); false when none runs.
pub fn interrupt_launched() -> bool {
    let pid = LAUNCHED_PID.load(std::sync::atomic::Ordering::Relaxed);
    if pid == 0 || !crate::process::is_alive(pid) {
        return false;
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) == 0 }
}

impl Launched {
    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Marks it as the run's launched program (Ctrl-C goes to it).
    pub fn mark(&self) {
        LAUNCHED_PID.store(self.pid(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for it to end; its exit code as a shell gives it.
    pub fn exit_code(&mut self) -> anyhow::Result<i32> {
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.wait().context("waiting for the program")?;
        Ok(status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(1))
    }
}

/// Why `waitpid` returned.
enum Stop {
    /// It exited (code as a shell gives it).
    Exited(i32),
    /// A system-call stop.
    Syscall,
    /// A ptrace event (`PTRACE_EVENT_*`).
    Event,
    /// A signal stop, with the signal to deliver.
    Stopped(i32),
}

fn wait(pid: libc::pid_t) -> anyhow::Result<Stop> {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, libc::__WALL) } != pid {
        bail!(
            "waiting for the program: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(if libc::WIFEXITED(status) {
        Stop::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Stop::Exited(128 + libc::WTERMSIG(status))
    } else {
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        if sig == libc::SIGTRAP | 0x80 {
            Stop::Syscall
        } else if sig == libc::SIGTRAP && event != 0 {
            Stop::Event
        } else {
            Stop::Stopped(sig)
        }
    })
}

/// Resumes the tracee with `request` (`PTRACE_SYSCALL`, `PTRACE_CONT`),
/// delivering `sig` (0: none).
fn resume(pid: libc::pid_t, request: libc::c_uint, sig: i32) -> anyhow::Result<()> {
    // SAFETY: resuming our stopped tracee.
    if unsafe { libc::ptrace(request, pid, 0, sig as libc::c_ulong) } == -1 {
        bail!(
            "cannot resume the program: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn regs(pid: libc::pid_t) -> anyhow::Result<libc::user_regs_struct> {
    // SAFETY: zeroed registers are a valid value; GETREGS fills them.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: our stopped tracee, a valid pointer.
    if unsafe { libc::ptrace(libc::PTRACE_GETREGS, pid, 0, &mut regs) } == -1 {
        bail!(
            "cannot read the program's registers: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(regs)
}

/// Follows the stopped tracee's system calls until its interpreter's
/// `_PyEval_EvalFrameDefault` is mapped executable (its address), it
/// execs, or it exits.
fn follow_to_interpreter(pid: libc::pid_t) -> anyhow::Result<Progress> {
    let mut deliver = 0;
    loop {
        if let Some(address) = eval_frame_mapped(pid as u32) {
            return Ok(Progress::At(address));
        }
        loop {
            resume(pid, libc::PTRACE_SYSCALL, deliver)?;
            deliver = 0;
            match wait(pid)? {
                Stop::Exited(code) => return Ok(Progress::Exited(code)),
                Stop::Stopped(sig) => deliver = sig,
                Stop::Event => break, // an exec: look at the new image
                Stop::Syscall => {
                    let r = regs(pid)?;
                    // After an mmap (at entry rax holds -ENOSYS).
                    if r.orig_rax == SYS_MMAP && r.rax != (-libc::ENOSYS) as u64 {
                        break;
                    }
                }
            }
        }
    }
}

/// The address of `_PyEval_EvalFrameDefault` in process `pid` once the
/// interpreter file's mapping that holds it is executable.
fn eval_frame_mapped(pid: u32) -> Option<u64> {
    let interp = crate::process::find_interpreter(pid).ok()?;
    let address = interp.load_bias.wrapping_add(interp.eval_frame.vaddr);
    let maps = crate::process::read_maps(pid).ok()?;
    maps.iter()
        .any(|m| m.start <= address && address < m.end && m.perms.starts_with("r-x"))
        .then_some(address)
}

/// Puts a breakpoint at `address`, runs the tracee to it, takes it off and
/// leaves the tracee stopped with its instruction pointer on `address`;
/// or it exec'd first (the breakpoint went with its old image), or exited.
fn run_to_breakpoint(pid: libc::pid_t, address: u64) -> anyhow::Result<Progress> {
    // SAFETY: reading a word of our stopped tracee's memory; errno tells
    // a failure from a word of all ones.
    let original = unsafe {
        *libc::__errno_location() = 0;
        libc::ptrace(libc::PTRACE_PEEKTEXT, pid, address, 0)
    };
    // SAFETY: errno of this thread.
    if original == -1 && unsafe { *libc::__errno_location() } != 0 {
        bail!(
            "cannot read the program's code: {}",
            std::io::Error::last_os_error()
        );
    }
    let trapping = (original & !0xff) | 0xcc;
    // SAFETY: writing one word of our stopped tracee's private text copy.
    if unsafe { libc::ptrace(libc::PTRACE_POKETEXT, pid, address, trapping) } == -1 {
        bail!(
            "cannot stop the program at its first Python call: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut deliver = 0;
    loop {
        resume(pid, libc::PTRACE_CONT, deliver)?;
        deliver = 0;
        match wait(pid)? {
            Stop::Exited(code) => return Ok(Progress::Exited(code)),
            Stop::Event => return Ok(Progress::Exec),
            Stop::Syscall => {}
            Stop::Stopped(libc::SIGTRAP) => {
                let mut r = regs(pid)?;
                if r.rip != address + 1 {
                    deliver = libc::SIGTRAP;
                    continue;
                }
                // SAFETY: restoring the word read above.
                if unsafe { libc::ptrace(libc::PTRACE_POKETEXT, pid, address, original) } == -1 {
                    bail!(
                        "cannot restore the program's code: {}",
                        std::io::Error::last_os_error()
                    );
                }
                r.rip = address;
                // SAFETY: our stopped tracee, a valid pointer.
                if unsafe { libc::ptrace(libc::PTRACE_SETREGS, pid, 0, &r) } == -1 {
                    bail!(
                        "cannot set the program's registers: {}",
                        std::io::Error::last_os_error()
                    );
                }
                return Ok(Progress::At(address));
            }
            Stop::Stopped(sig) => deliver = sig,
        }
    }
}
