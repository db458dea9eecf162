//! `pyprobe dump`: every thread's Python stack (and optionally locals) of a
//! live process, read from outside without stopping it, like `py-spy dump`.

use std::{io::Write, path::PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::python::{
    memory::{Memory, ProcessMemory, Recorder},
    reader::{Target, Thread},
    values::Bounds,
};

/// Options of `pyprobe dump`.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// Process to read.
    pub pid: u32,
    /// Also read local variables.
    pub locals: bool,
    /// Print JSON instead of text.
    pub json: bool,
    /// Limits and redaction for locals.
    pub bounds: Bounds,
    /// Save the memory that was read (for offline tests) to this file.
    pub save_snapshot: Option<PathBuf>,
}

/// The result of a dump.
#[derive(Debug, Clone, Serialize)]
pub struct Dump {
    /// Process ID.
    pub pid: u32,
    /// Command line of the process.
    pub command: String,
    /// Python version.
    pub version: String,
    /// ELF file holding the interpreter.
    pub interpreter: String,
    /// Where the offsets came from.
    pub offsets: String,
    /// Threads, main thread first.
    pub threads: Vec<DumpThread>,
}

/// A thread in a dump.
#[derive(Debug, Clone, Serialize)]
pub struct DumpThread {
    /// What the reader found.
    #[serde(flatten)]
    pub thread: Thread,
    /// Kernel thread name (`/proc/PID/task/TID/comm`), when the TID is known.
    pub name: Option<String>,
}

/// Reads the process and builds a [`Dump`]. Also used by tests.
pub fn read(opts: &DumpOptions) -> anyhow::Result<Dump> {
    let bounds = opts.locals.then_some(&opts.bounds);
    let (version, offsets, interp, threads) = match &opts.save_snapshot {
        None => {
            let target = Target::attach(opts.pid)?;
            let threads = target.threads(bounds)?;
            (
                target.version,
                target.offsets_source,
                target.interpreter,
                threads,
            )
        }
        Some(path) => {
            let target = Target::attach_with(opts.pid, Recorder::new)?;
            let threads = target.threads(bounds)?;
            let meta = target.snapshot_meta(&format!("pyprobe dump of PID {}", opts.pid));
            let (version, source, interp) =
                (target.version, target.offsets_source, target.interpreter);
            let mut snapshot = target.mem.into_snapshot();
            snapshot.meta = meta;
            std::fs::write(path, serde_json::to_vec(&snapshot)?)
                .with_context(|| format!("writing {}", path.display()))?;
            (version, source, interp, threads)
        }
    };
    let interp = interp.context("a live target knows its interpreter")?;
    let threads = threads
        .into_iter()
        .map(|mut thread| {
            if thread.native_id.is_none() {
                thread.native_id = glibc_tid(opts.pid, thread.thread_id);
            }
            let name = thread.native_id.and_then(|tid| {
                std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", opts.pid))
                    .ok()
                    .map(|s| s.trim_end().to_owned())
            });
            DumpThread { thread, name }
        })
        .collect();
    let command = std::fs::read(format!("/proc/{}/cmdline", opts.pid))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Ok(Dump {
        pid: opts.pid,
        command,
        version: version.to_string(),
        interpreter: interp.binary.display().to_string(),
        offsets: offsets.to_owned(),
        threads,
    })
}

/// Before 3.11 CPython does not record the kernel TID. glibc keeps it in
/// `struct pthread` (whose address is `pthread_self()`), at offset 0x2d0 on
/// x86_64; the value is accepted only if that TID is a thread of the process.
fn glibc_tid(pid: u32, pthread: u64) -> Option<u32> {
    const PTHREAD_TID_OFFSET: u64 = 0x2d0;
    let mem = ProcessMemory::open(pid).ok()?;
    let tid = mem.read_u32(pthread + PTHREAD_TID_OFFSET).ok()?;
    std::path::Path::new(&format!("/proc/{pid}/task/{tid}"))
        .exists()
        .then_some(tid)
}

/// Renders a dump as text, in the layout py-spy users know.
pub fn to_text(dump: &Dump) -> String {
    let mut out = String::new();
    out.push_str(&format!("Process {}: {}\n", dump.pid, dump.command));
    out.push_str(&format!(
        "Python v{} ({}), offsets from {}\n",
        dump.version, dump.interpreter, dump.offsets
    ));
    for t in &dump.threads {
        let th = &t.thread;
        let id = th
            .native_id
            .map(|tid| format!("{tid} "))
            .unwrap_or_default();
        let state = if th.holds_gil { " (holds the GIL)" } else { "" };
        let name = t
            .name
            .as_deref()
            .map(|n| format!(": \"{n}\""))
            .unwrap_or_default();
        out.push_str(&format!(
            "\nThread {id}({:#x}){state}{name}\n",
            th.thread_id
        ));
        for frame in &th.frames {
            let line = frame
                .line
                .map(|l| l.to_string())
                .unwrap_or_else(|| "?".into());
            out.push_str(&format!(
                "    {} ({}:{line})\n",
                frame.function, frame.filename
            ));
            let (args, locals): (Vec<_>, Vec<_>) = frame.locals.iter().partition(|l| l.argument);
            for (title, vars) in [("Arguments", args), ("Locals", locals)] {
                if vars.is_empty() {
                    continue;
                }
                out.push_str(&format!("        {title}:\n"));
                for v in vars {
                    out.push_str(&format!("            {}: {}\n", v.name, v.value));
                }
            }
        }
        if let Some(reason) = &th.truncated {
            out.push_str(&format!("    ... stack truncated: {reason}\n"));
        }
    }
    out
}

/// Runs `pyprobe dump`.
pub fn run(opts: &DumpOptions) -> anyhow::Result<()> {
    let dump = read(opts)?;
    let mut stdout = std::io::stdout().lock();
    if opts.json {
        serde_json::to_writer(&mut stdout, &dump)?;
        writeln!(stdout)?;
    } else {
        stdout.write_all(to_text(&dump).as_bytes())?;
    }
    Ok(())
}
