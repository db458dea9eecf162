//! `pyprobe dump`: every thread's Python stack (and optionally locals) of a
//! live process, read from outside without stopping it, like `py-spy dump`.

use std::{collections::HashMap, io::Write, path::PathBuf};

use anyhow::Context;
use serde::Serialize;

use crate::{
    container::Placement,
    process::{Tasks, thread_id_text},
    python::{
        memory::{Memory, Recorder},
        reader::{Target, Thread},
        threads::ThreadMapper,
        values::Bounds,
    },
};

/// Options of `pyprobe dump`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_snapshot: Option<PathBuf>,
}

/// The result of a dump.
#[derive(Debug, Clone, Serialize)]
pub struct Dump {
    /// Process ID.
    pub pid: u32,
    /// Command line of the process.
    pub command: String,
    /// Its container (if any) and cgroup.
    #[serde(flatten)]
    pub placement: Option<Placement>,
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
    /// What the reader found; `native_id` is the host's thread id.
    #[serde(flatten)]
    pub thread: Thread,
    /// The thread's id in the process's own PID namespace, when it differs
    /// from the host's (a container).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_id: Option<u32>,
    /// Kernel thread name (`/proc/PID/task/TID/comm`), when the TID is known.
    pub name: Option<String>,
}

/// Reads the process and builds a [`Dump`]. Also used by tests.
pub fn read(opts: &DumpOptions) -> anyhow::Result<Dump> {
    let bounds = opts.locals.then_some(&opts.bounds);
    let tasks = Tasks::read(opts.pid);
    let (version, offsets, interp, threads, host_tids) = match &opts.save_snapshot {
        None => {
            let target = Target::attach(opts.pid)?;
            let threads = target.threads(bounds)?;
            let host_tids = host_tids(&tasks, &target);
            (
                target.version,
                target.offsets_source,
                target.interpreter,
                threads,
                host_tids,
            )
        }
        Some(path) => {
            let target = Target::attach_with(opts.pid, Recorder::new)?;
            let threads = target.threads(bounds)?;
            let host_tids = host_tids(&tasks, &target);
            let meta = target.snapshot_meta(&format!("pyprobe dump of PID {}", opts.pid));
            let (version, source, interp) =
                (target.version, target.offsets_source, target.interpreter);
            let mut snapshot = target.mem.into_snapshot();
            snapshot.meta = meta;
            std::fs::write(path, serde_json::to_vec(&snapshot)?)
                .with_context(|| format!("writing {}", path.display()))?;
            (version, source, interp, threads, host_tids)
        }
    };
    let interp = interp.context("a live target knows its interpreter")?;
    let threads = threads
        .into_iter()
        .map(|mut thread| {
            // The host's id, whatever the process calls the thread.
            thread.native_id = host_tids.get(&thread.tstate).copied();
            let name = thread.native_id.and_then(|tid| {
                std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", opts.pid))
                    .ok()
                    .map(|s| s.trim_end().to_owned())
            });
            let namespace_id = thread.native_id.and_then(|tid| tasks.ns_of(tid));
            DumpThread {
                thread,
                namespace_id,
                name,
            }
        })
        .collect();
    let command = crate::selection::command_line(opts.pid).unwrap_or_default();
    Ok(Dump {
        pid: opts.pid,
        command,
        placement: Placement::of(opts.pid),
        version: version.to_string(),
        interpreter: interp.binary.display().to_string(),
        offsets: offsets.to_owned(),
        threads,
    })
}

/// Thread state -> host thread id, for the threads that could be matched.
fn host_tids<M: Memory>(tasks: &Tasks, target: &Target<M>) -> HashMap<u64, u32> {
    ThreadMapper::default()
        .map_tasks(tasks, target)
        .unwrap_or_default()
        .into_iter()
        .filter(|&(_, tstate)| tstate != 0)
        .map(|(tid, tstate)| (tstate, tid))
        .collect()
}

/// Renders a dump as text, in the layout py-spy users know.
pub fn to_text(dump: &Dump) -> String {
    let mut out = String::new();
    out.push_str(&format!("Process {}: {}\n", dump.pid, dump.command));
    if let Some(c) = dump.placement.as_ref().and_then(|p| p.container.as_ref()) {
        let pod = c
            .pod
            .as_deref()
            .map(|p| format!(", pod {p}"))
            .unwrap_or_default();
        out.push_str(&format!("Container: {}{pod}\n", c.short()));
    }
    out.push_str(&format!(
        "Python v{} ({}), offsets from {}\n",
        dump.version, dump.interpreter, dump.offsets
    ));
    for t in &dump.threads {
        let th = &t.thread;
        let id = th
            .native_id
            .map(|tid| format!("{} ", thread_id_text(tid, t.namespace_id)))
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
