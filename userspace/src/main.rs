//! The `pyprobe` command line.

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use pyprobe::{
    calls::CallsOptions,
    dump::DumpOptions,
    job::Job,
    profile::{self, Format, ProfileOptions, RecordOptions, TopOptions},
    python::values::Bounds,
    selection::Selector,
};

/// Trace live CPython 3.8-3.15 processes from the kernel, without stopping
/// them or running code inside them.
#[derive(Parser)]
#[command(name = "pyprobe", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Conditional log points: print values when a line or function runs, without stopping the process.
    ///
    /// `--at` names a line (app.py:42), a function (app.py:handle_order,
    /// app.py:Order.total) or MODULE:QUALNAME (pkg.mod:Class.method). A
    /// line log point fires just before the line's first instruction runs;
    /// a function log point fires when the function starts (arguments set).
    /// `--when` is a condition over locals and arguments, `--msg` a message
    /// with {expressions}: names, .attributes of plain objects (their
    /// __dict__), ["keys"] and [0] indexes of dicts, lists and tuples,
    /// len(), comparisons, and/or/not, is None. Values are captured in the
    /// kernel at the moment of the hit, from raw memory: no __repr__,
    /// property or other code of the target ever runs. Comparisons of ints,
    /// floats, bools, None and short strs are tested in the kernel; the rest
    /// in pyprobe. Values read through secret-looking names are redacted.
    ///
    /// Each --at may be followed by its own --when and --msg. A log point
    /// on a file not imported yet waits and arms itself when it is; new
    /// code for it (a reloaded module) is armed too.
    ///
    /// Mechanism: a hardware watchpoint on the probed instruction, so code
    /// that does not reach it never traps; each run of the probed line is
    /// one debug trap. Measured on a framework-like request loop on the
    /// test VM (cargo xtask bench --only logpoint): a hit dropped by its
    /// condition costs 29-38 µs, what the VM charges for a bare debug trap
    /// there (pyprobe's BPF program runs 1.5-2.3 µs of it); an armed log
    /// point never hit slows requests by 1-6% (10% on Debian's 3.11, where
    /// an enabled debug register alone costs 4-5%) and each context switch
    /// of a watched thread by about 1 µs (the debug registers). x86 has 4
    /// watchpoints per thread: at most 4 log points per process. FILE
    /// matches loaded files by the end of their path and must match one.
    /// With --all, every Python process running the code, now or later.
    /// A process forked by a watched one (a pre-fork server's or a fork
    /// pool's new worker; on 3.14+, a forkserver pool's worker once the
    /// forkserver is armed) inherits the armed log points: every run is
    /// seen from its first. One that makes the code itself (exec,
    /// multiprocessing spawn, forkserver before 3.14) is armed once pyprobe
    /// sees the file imported, within about 50 ms: its runs before that are
    /// not seen.
    ///
    /// Needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE).
    Log {
        #[command(flatten)]
        targets: TargetArgs,
        /// Where: FILE:LINE, FILE:FUNCTION or MODULE:QUALNAME (repeat for several log points).
        #[arg(long = "at", value_name = "WHERE", required_unless_present = "probes")]
        at: Vec<String>,
        /// Condition for the preceding --at, e.g. 'order.total > 100 and user.id == 7'.
        #[arg(long = "when", value_name = "CONDITION")]
        when: Vec<String>,
        /// Message for the preceding --at, e.g. 'order={order.id} total={order.total}' (default: the arguments, or the first locals).
        #[arg(long = "msg", value_name = "TEMPLATE")]
        msg: Vec<String>,
        /// Read log points from FILE ('-': standard input): one option per
        /// line without the dashes, `at WHERE` then its `when CONDITION` and
        /// `msg TEMPLATE` lines, '#' comments. Adds to any --at.
        #[arg(long, value_name = "FILE")]
        probes: Option<String>,
        /// Hits printed per second per log point at most, enforced in the kernel (0: no limit).
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Stop after this many hits.
        #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Stop after this many seconds (default: until Ctrl-C, or until every target exits).
        #[arg(short, long, value_parser = positive_seconds)]
        duration: Option<f64>,
        /// Print JSON lines (with the captured values) instead of text.
        #[arg(long)]
        json: bool,
        /// Add the Python stack to each hit.
        #[arg(long)]
        stack: bool,
        /// Show values of secret-looking names instead of <redacted>.
        #[arg(long)]
        no_redact: bool,
    },
    /// Print every thread's Python stack of a running process, like `py-spy dump`.
    ///
    /// Reads the process's memory from outside (/proc/PID/mem): the target is
    /// not stopped and none of its code runs. Values of locals are decoded
    /// from raw memory (None, bool, int, float, str, bytes, tuple, list,
    /// dict; other objects show as <type at address>), bounded in size, and
    /// names that look secret (password, token, key, ...) are redacted.
    ///
    /// Needs root or CAP_SYS_PTRACE.
    Dump {
        /// Process to read.
        #[arg(short, long, value_parser = parse_pid)]
        pid: u32,
        /// Also show arguments and local variables.
        #[arg(short, long)]
        locals: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Show values of secret-looking names instead of <redacted>.
        #[arg(long)]
        no_redact: bool,
    },
    /// Count every Python function call, exactly, live: a histogram per function.
    ///
    /// A uprobe at each place where the interpreter starts a Python frame
    /// (the entry of _PyEval_EvalFrameDefault up to 3.10; the RESUME opcode
    /// handlers from 3.11, found in the interpreter's opcode table or DWARF)
    /// counts per code object in the kernel. Calls made by Python code and
    /// from C are both seen; generator and coroutine resumptions are counted
    /// apart (CALLS includes them, as cProfile's ncalls does).
    ///
    /// Builtins (C functions such as len, time.sleep, list.append) are
    /// counted too, with FILE <builtin>, where the call goes through the
    /// interpreter's generic entry points for them (found from live objects,
    /// so stripped builds work). From 3.11 the specializing interpreter
    /// calls many builtins directly from bytecode (CALL_BUILTIN_O, len,
    /// isinstance, list.append...): those calls are not seen, so builtin
    /// counts there are lower bounds; pyprobe says so when it attaches.
    /// Builtins called from C (map, sorted's key) are seen, and a builtin
    /// is one row whether called bound (p.match) or through its type.
    ///
    /// --filter is applied in the kernel: once a function is named and does
    /// not match, its calls are no longer counted (they still trap).
    ///
    /// --latency times every call from its start to its return (or yield:
    /// each generator step is timed on its own) and shows p50, p99 (each
    /// within 6.25%) and max (exact) per function. Up to 3.10 a frame left
    /// by an exception is timed too; from 3.11 it is not, and TIMED shows
    /// how many calls were. It adds a second trap per call (the return):
    /// about 1.5-2 µs per call in all instead of 0.65-1 µs, up to 6 µs
    /// where a return handler can only be probed on a single-stepped
    /// instruction (RETURN_VALUE on 3.13); the attach line shows each site.
    ///
    /// Cost: every Python call in a watched process traps into the kernel,
    /// 0.65-1 µs per call measured on a busy VM, of which pyprobe's own
    /// program is 0.1-0.2 µs and the rest is the trap any uprobe costs
    /// (fib(25), nothing but tiny calls, ran 8-23 times slower; see `cargo
    /// xtask bench`). Code that makes no Python calls is not slowed. For a
    /// cheap view of where time goes, sample instead.
    ///
    /// Processes that come and go: under --all a process started later (a
    /// pool's or gunicorn's new worker, forked or spawned) is counted from
    /// its first call, set up in the kernel, and its functions are named
    /// from what the kernel reads as they first run, so short-lived workers
    /// are named too. Under --name or --container the probes are each
    /// process's own (others never trap): a child forked by a counted
    /// process is set up as the kernel reports its fork (milliseconds; its
    /// calls before that are not counted), any other new process at the
    /// next look through /proc (within a second); the report says how many
    /// were picked up after their start. A watched process that execs
    /// another interpreter is followed; one that execs anything else is
    /// reported and dropped. The probes of one interpreter file are one `uprobe_multi` link
    /// (Linux 6.6+), which the kernel detaches with one grace period:
    /// with 100 processes of one interpreter, ready in 0.16-0.20 s and gone
    /// 0.26-0.27 s after Ctrl-C (`cargo xtask bench --only scale`). Older
    /// kernels get one perf-event uprobe per probe, about 0.1 s each to
    /// detach (5-18 per file).
    ///
    /// Needs root, or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE.
    Calls {
        #[command(flatten)]
        targets: TargetArgs,
        /// Seconds between reports.
        #[arg(short, long, default_value_t = 1.0, value_parser = positive_seconds)]
        interval: f64,
        /// Stop after this many seconds (default: until Ctrl-C, or until every target exits).
        #[arg(short, long, value_parser = positive_seconds)]
        duration: Option<f64>,
        /// Show only the N functions with most calls (default: what fits on the screen; 20 in tables, all in JSON).
        #[arg(short = 'n', long, value_name = "N")]
        top: Option<usize>,
        /// Show only functions whose file or qualified name contains TEXT (applied in the kernel).
        #[arg(short, long, value_name = "TEXT")]
        filter: Option<String>,
        /// Print one JSON document per report instead of tables.
        #[arg(long)]
        json: bool,
        /// Do not count builtin (C function) calls.
        #[arg(long)]
        no_builtins: bool,
        /// Also time each call: p50, p99 and max per function (see Cost above).
        #[arg(short = 'L', long)]
        latency: bool,
    },
    /// Sample Python stacks and write a flamegraph, speedscope, folded or pprof profile.
    ///
    /// A BPF program on the CPU clock of every CPU interrupts whatever runs
    /// there RATE times a second; when it is a thread of a sampled Python
    /// process it walks the thread's Python frames in the kernel (up to 512
    /// frames; deeper stacks are marked [truncated]) and sends each frame's
    /// code object and instruction. pyprobe names them and computes exact
    /// line numbers. Nothing runs in the target and it is never stopped: it
    /// pays only the interrupt and the walk (a few µs per sample).
    ///
    /// By default only threads on CPU are sampled (running Python or C
    /// code called from it). --idle adds threads that are waiting (sleep,
    /// I/O, the GIL) at the same rate per second of waiting: every 100 ms
    /// pyprobe reads each Python thread's scheduler statistics from /proc,
    /// turns the time it waited into samples and puts them at the stack it
    /// waits at (re-read only if it ran since). Measured cost: about 0.02%
    /// of a CPU per thread whatever the rate (200 threads: 4%).
    ///
    /// Needs root, or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE.
    Record {
        #[command(flatten)]
        sampling: SamplingArgs,
        /// File to write (default: pyprobe-<PID or all>.<svg|json|txt|pb.gz|trace.json>).
        #[arg(short, long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
        /// What to write [default: from the --output name's extension (.svg, .json for speedscope, .trace.json, .txt, .pb.gz), else flamegraph].
        #[arg(short, long, value_enum)]
        format: Option<Format>,
        /// Also write the profile so far every SECONDS while recording
        /// (SIGUSR1 does it at any time); each write replaces the file whole.
        #[arg(long, value_name = "SECONDS", value_parser = positive_seconds)]
        every: Option<f64>,
    },
    /// Live view of the functions with the most samples, like `py-spy top`.
    ///
    /// Samples as `record` does (see `pyprobe record --help`) and shows,
    /// every interval, each function's share of the last interval's samples
    /// where it was running (%Own) and anywhere on the stack (%Total), and
    /// the CPU time so far. The final view, at the end (q, Ctrl-C,
    /// --duration), gives the shares over the whole run.
    ///
    /// On a terminal it is a full-screen view redrawn in place, headed by
    /// the rate, the samples, the GIL and off-CPU shares and what was lost.
    /// Keys: o / t sort by own / total; p pauses; i shows threads off CPU
    /// (sampling them from then on, as --idle does); h splits rows per
    /// thread; q or Ctrl-C quits. Redirected, or with --json, it prints
    /// one table (or JSON document) per interval.
    ///
    /// Needs root, or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE.
    Top {
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Seconds between views.
        #[arg(short, long, default_value_t = 1.0, value_parser = positive_seconds)]
        interval: f64,
        /// Show only the N functions with most samples (default: what fits on the screen; 25 in tables, all in JSON).
        #[arg(short = 'n', long, value_name = "N")]
        top: Option<usize>,
        /// Print one JSON document per view instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// The always-on system-wide daemon: continuous CPU profiling of every Python process, exports over HTTP, control over a root-only socket.
    ///
    /// Samples every Python process on the host (containers and processes
    /// started later included) at a low rate (19 Hz unless --rate) and
    /// serves, on loopback unless --listen says otherwise:
    /// `GET /metrics` (Prometheus), `GET /debug/pprof/profile?seconds=N[&pid=P][&container=ID]`
    /// (gzip'd pprof of the next N seconds, as Go's net/http/pprof; for
    /// go tool pprof, Parca, Pyroscope) and `GET /api/v1/processes` (JSON).
    /// HTTP serves no control: `pyprobe ctl` talks to the control socket
    /// (mode 0600, root only). SIGTERM or Ctrl-C stops it and leaves
    /// nothing attached; SIGHUP reads --config again.
    Agent {
        /// A TOML file with the same keys as the flags (listen, control, rate); flags win.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// HTTP address [default: 127.0.0.1:9465].
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Control socket path [default: /run/pyprobe/control.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<std::path::PathBuf>,
        /// Samples per second of CPU time of the continuous profile [default: 19].
        #[arg(long, value_name = "HZ")]
        rate: Option<u64>,
        /// Where log point hits go, one JSON object per line (keys id, time, pid, tid, container, file, line, message, values): a file, appended to, or - for stdout [default: -].
        #[arg(long, value_name = "FILE|-")]
        hits: Option<String>,
        /// The most a calls job may cost one process, in % of a CPU (a call costs about 1 µs): a process over it stops being counted [default: 5].
        #[arg(long, value_name = "PERCENT")]
        calls_budget: Option<f64>,
    },
    /// Control a running `pyprobe agent` over its socket (as root).
    Ctl {
        /// The agent's control socket.
        #[arg(long, value_name = "PATH", default_value = pyprobe::agent::control::DEFAULT_CONTROL)]
        control: std::path::PathBuf,
        /// Print the agent's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: CtlCommand,
    },
    /// Print a completion script for SHELL.
    ///
    /// bash: `pyprobe completions bash > /etc/bash_completion.d/pyprobe`;
    /// zsh: `pyprobe completions zsh > "${fpath[1]}/_pyprobe"`;
    /// fish: `pyprobe completions fish > ~/.config/fish/completions/pyprobe.fish`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (pyprobe.1, pyprobe-record.1, ...) into DIR
    /// (what `cargo xtask man` runs).
    #[command(hide = true)]
    Man {
        /// Where to write them.
        dir: std::path::PathBuf,
    },
}

/// What `pyprobe ctl` asks.
#[derive(Subcommand)]
enum CtlCommand {
    /// What the agent watches: rate, processes, samples.
    Status,
    /// The continuous profile.
    Profile {
        #[command(subcommand)]
        what: CtlProfile,
    },
    /// Log points: add, list, remove.
    Log {
        #[command(subcommand)]
        what: CtlLog,
    },
    /// Call counts: start a job, show its counts, stop it.
    Calls {
        #[command(subcommand)]
        what: CtlCalls,
    },
}

/// `pyprobe ctl calls ...`
#[derive(Subcommand)]
enum CtlCalls {
    /// Starts counting every Python call of the processes; prints the job's id alone on the last line.
    ///
    /// One job at a time. It stops by itself after --ttl (1h unless given)
    /// or when every process it watches (by --pid) exited.
    Start {
        #[command(flatten)]
        targets: TargetArgs,
        /// Only functions whose file or qualified name contains this.
        #[arg(long, value_name = "TEXT")]
        filter: Option<String>,
        /// Stop after this long (e.g. 90s, 30m, 2h).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
    /// The counts so far (a table; --json for the report).
    Show {
        /// The job's id.
        id: String,
    },
    /// Stops the job (its probes go) and prints its final counts.
    Stop {
        /// The job's id.
        id: String,
    },
}

/// `pyprobe ctl log ...`
#[derive(Subcommand)]
enum CtlLog {
    /// Adds a log point; prints its id alone on the last line.
    ///
    /// Its hits go to the agent's --hits as JSON lines. It ends by itself
    /// after --ttl (1h unless given), after --count hits, or by `ctl log rm`.
    Add {
        #[command(flatten)]
        targets: TargetArgs,
        /// FILE:LINE, FILE:FUNCTION or MODULE:QUALNAME.
        #[arg(long, value_name = "WHERE")]
        at: String,
        /// Condition over the frame's variables: only runs where it holds are written.
        #[arg(long, value_name = "CONDITION")]
        when: Option<String>,
        /// Message with {expressions}.
        #[arg(long, value_name = "TEMPLATE")]
        msg: Option<String>,
        /// Hits written per second at most, enforced in the kernel (0: no limit).
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// End after this many hits.
        #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// End after this long (e.g. 90s, 30m, 2h).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
    /// The log points, with what happened at each.
    List,
    /// Takes a log point off (no hit of it is written after).
    Rm {
        /// Its id (from `ctl log add` or `ctl log list`).
        id: String,
    },
}

/// A duration as people write it (`90s`, `30m`, `1h`).
fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("a time to live must be more than 0".into()),
        Err(e) => Err(format!("not a duration ({e}): write e.g. 90s, 30m, 2h")),
    }
}

/// `pyprobe ctl profile ...`
#[derive(Subcommand)]
enum CtlProfile {
    /// Sets the sampling rate (samples per second of CPU time).
    Rate {
        /// Samples per second.
        hz: u64,
    },
}

/// Runs `pyprobe ctl`: one request, its answer printed.
fn ctl(control: &std::path::Path, json: bool, what: CtlCommand) -> anyhow::Result<()> {
    use pyprobe::agent::control::{Request, call};
    let request = match what {
        CtlCommand::Status => Request::Status,
        CtlCommand::Profile {
            what: CtlProfile::Rate { hz },
        } => Request::ProfileRate { hz },
        CtlCommand::Log {
            what:
                CtlLog::Add {
                    targets,
                    at,
                    when,
                    msg,
                    rate,
                    count,
                    ttl,
                },
        } => Request::LogAdd(pyprobe::agent::control::LogAdd {
            targets: targets.for_agent()?,
            at,
            when,
            msg,
            rate,
            count,
            ttl_seconds: ttl.as_secs_f64(),
        }),
        CtlCommand::Log { what: CtlLog::List } => Request::LogList,
        CtlCommand::Calls {
            what:
                CtlCalls::Start {
                    targets,
                    filter,
                    ttl,
                },
        } => Request::CallsStart(pyprobe::agent::control::CallsStart {
            targets: targets.for_agent()?,
            filter,
            ttl_seconds: ttl.as_secs_f64(),
        }),
        CtlCommand::Calls {
            what: CtlCalls::Show { id },
        } => Request::CallsShow { id },
        CtlCommand::Calls {
            what: CtlCalls::Stop { id },
        } => Request::CallsStop { id },
        CtlCommand::Log {
            what: CtlLog::Rm { id },
        } => Request::LogRm { id },
    };
    let list = matches!(request, Request::LogList);
    let added = matches!(request, Request::LogAdd(_) | Request::CallsStart(_));
    let counts = matches!(
        request,
        Request::CallsShow { .. } | Request::CallsStop { .. }
    );
    let response = call(control, &request)?;
    if !response.ok {
        anyhow::bail!(
            "{}",
            response.error.unwrap_or_else(|| "the agent refused".into())
        );
    }
    if json && counts {
        println!("{}", serde_json::to_string(&response.body["report"])?);
    } else if json {
        println!("{}", serde_json::to_string(&response.body)?);
    } else if counts {
        print!("{}", response.body["table"].as_str().unwrap_or_default());
    } else if added {
        for line in response.body["lines"].as_array().into_iter().flatten() {
            eprintln!("pyprobe: {}", line.as_str().unwrap_or_default());
        }
        println!("{}", response.body["id"].as_str().unwrap_or_default());
    } else if list {
        let points = response.body.as_array().cloned().unwrap_or_default();
        if points.is_empty() {
            println!("no log point");
        }
        for p in points {
            let text = |k: &str| p[k].as_str().map(str::to_owned);
            println!(
                "{}  {}{}{}  [{}]  written {}, dropped by the condition {}, over the rate {}, lost {}; armed on {} code object(s), waiting in {} process(es); ends in {} s",
                text("id").unwrap_or_default(),
                text("at").unwrap_or_default(),
                text("when")
                    .map(|w| format!(" when {w}"))
                    .unwrap_or_default(),
                text("msg")
                    .map(|m| format!(" msg {m:?}"))
                    .unwrap_or_default(),
                text("processes").unwrap_or_default(),
                p["stats"]["written"],
                p["stats"]["condition_false"],
                p["stats"]["rate_limited"],
                p["stats"]["lost"],
                p["stats"]["armed"],
                p["stats"]["waiting"],
                p["expires_in_seconds"],
            );
        }
    } else if let Some(fields) = response.body.as_object() {
        for (k, v) in fields {
            println!("{k}: {v}");
        }
    }
    Ok(())
}

/// What to sample and how, for `record` and `top`.
#[derive(clap::Args)]
struct SamplingArgs {
    #[command(flatten)]
    targets: TargetArgs,
    /// Samples per second of CPU time, per CPU (1 to 20000).
    #[arg(short, long, default_value_t = 99, value_parser = clap::value_parser!(u64).range(1..=profile::MAX_RATE))]
    rate: u64,
    /// Stop after this many seconds (default: until Ctrl-C, or until every target exits).
    #[arg(short, long, value_parser = positive_seconds)]
    duration: Option<f64>,
    /// Also sample threads that are off CPU (sleeping, waiting for I/O or the GIL), at the same rate; costs about 0.02% of a CPU per thread.
    #[arg(long)]
    idle: bool,
    /// Keep only samples of threads holding the GIL.
    #[arg(long)]
    gil: bool,
    /// Keep each thread's stacks apart.
    #[arg(long)]
    threads: bool,
}

/// Which processes to trace: `--pid`s, or a selection (`--all`, `--name`,
/// `--container`) that also takes processes started later.
#[derive(clap::Args)]
struct TargetArgs {
    /// Process to trace, by PID as the host sees it (repeat for several).
    #[arg(
        short,
        long = "pid",
        value_name = "PID",
        value_parser = parse_pid,
        required_unless_present_any = ["all", "name", "container", "program"]
    )]
    pids: Vec<u32>,
    /// Every Python process on the host, containers included, and every one started later.
    #[arg(short, long, conflicts_with = "pids")]
    all: bool,
    /// Python processes whose command line matches REGEX, now and later (others are not touched).
    #[arg(long, value_name = "REGEX", conflicts_with = "pids", value_parser = parse_regex)]
    name: Option<regex::Regex>,
    /// Python processes in the container whose id starts with ID (as `docker ps` shows it), now and later.
    #[arg(long, value_name = "ID", conflicts_with = "pids")]
    container: Option<String>,
    /// Start PROGRAM ARGS... and trace it from its first Python call (it waits, stopped, until pyprobe is set up); pyprobe ends when it exits, with its exit status, and Ctrl-C goes to it.
    #[arg(last = true, value_name = "PROGRAM", conflicts_with_all = ["pids", "all", "name", "container"])]
    program: Vec<String>,
    /// Also trace the Python processes the PROGRAM or --pid starts, forked, spawned or exec'd, at any depth (picked up within a second); end when they have all exited.
    #[arg(long, conflicts_with_all = ["all", "name", "container"])]
    subprocesses: bool,
}

impl TargetArgs {
    /// The same, as the agent's control socket takes it.
    fn for_agent(self) -> anyhow::Result<pyprobe::agent::control::Targets> {
        anyhow::ensure!(
            self.program.is_empty(),
            "the agent starts no program: start it yourself, then give its --pid"
        );
        anyhow::ensure!(
            !self.subprocesses,
            "the agent does not follow subprocesses of a --pid yet: select them with --name or --container"
        );
        Ok(pyprobe::agent::control::Targets {
            all: self.all,
            pids: self.pids,
            name: self.name.map(|r| r.as_str().to_owned()),
            container: self.container,
        })
    }

    /// The PIDs, whether a selection was asked for, and the selection.
    fn split(self) -> (Vec<u32>, bool, Selector) {
        let selector = Selector {
            name: self.name,
            container: self.container,
            family: if self.subprocesses {
                self.pids.clone()
            } else {
                Vec::new()
            },
        };
        let all = self.all || !selector.is_everything();
        (self.pids, all, selector)
    }
}

/// A PID, or a one-line hint for a name given as one.
fn parse_pid(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(0) => Err("0 is not a process ID".to_owned()),
        Ok(pid) => Ok(pid),
        Err(_) if !text.is_empty() && !text.starts_with(|c: char| c.is_ascii_digit()) => {
            Err(format!(
                "'{text}' is not a process ID: to select processes by command line, use --name {text}"
            ))
        }
        Err(_) => Err(format!("'{text}' is not a process ID (a positive number)")),
    }
}

/// A regular expression for `--name`.
fn parse_regex(text: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(text).map_err(|e| {
        let detail = e.to_string();
        let last = detail.lines().last().unwrap_or("").trim();
        let last = last.strip_prefix("error: ").unwrap_or(last);
        format!("not a regular expression: {last}")
    })
}

impl SamplingArgs {
    fn options(self) -> ProfileOptions {
        let (pids, all, select) = self.targets.split();
        ProfileOptions {
            pids,
            all,
            select,
            rate: self.rate,
            duration: self.duration.map(Duration::from_secs_f64),
            idle: self.idle,
            gil: self.gil,
            threads: self.threads,
        }
    }
}

/// Gives each `--when` and `--msg` to the `--at` before it on the command
/// line.
fn pair_with_at(
    matches: &clap::ArgMatches,
    at: &[String],
    when: &[String],
    msg: &[String],
) -> anyhow::Result<Vec<pyprobe::logpoint::session::PointSpec>> {
    let indices = |id: &str| -> Vec<usize> {
        matches
            .indices_of(id)
            .map(|i| i.collect())
            .unwrap_or_default()
    };
    let at_index = indices("at");
    let mut points: Vec<pyprobe::logpoint::session::PointSpec> = at
        .iter()
        .map(|a| pyprobe::logpoint::session::PointSpec {
            at: a.clone(),
            when: None,
            msg: None,
            origin: None,
        })
        .collect();
    for (option, values, index) in [
        ("--when", when, indices("when")),
        ("--msg", msg, indices("msg")),
    ] {
        for (value, i) in values.iter().zip(index) {
            let Some(owner) = at_index.iter().rposition(|&a| a < i) else {
                anyhow::bail!(
                    "{option} {value:?} comes before any --at: put it after the --at it belongs to"
                );
            };
            let slot = if option == "--when" {
                &mut points[owner].when
            } else {
                &mut points[owner].msg
            };
            if slot.is_some() {
                anyhow::bail!("two {option} for --at {}: give one", points[owner].at);
            }
            *slot = Some(value.clone());
        }
    }
    Ok(points)
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(v)
    } else {
        Err(format!("`{s}` must be a positive number of seconds"))
    }
}

/// The job a command asks for (every command but `agent` and `ctl`): the
/// flags as a [`Job`] spec, the same data the job reads from JSON.
fn job_of(command: Command, matches: &clap::ArgMatches) -> anyhow::Result<Job> {
    Ok(match command {
        Command::Dump {
            pid,
            locals,
            json,
            no_redact,
        } => Job::Dump(DumpOptions {
            pid,
            locals,
            json,
            bounds: Bounds {
                redact: !no_redact,
                ..Bounds::default()
            },
            save_snapshot: None,
        }),
        Command::Calls {
            targets,
            interval,
            duration,
            top,
            filter,
            json,
            no_builtins,
            latency,
        } => {
            let (pids, all, select) = targets.split();
            Job::Calls(CallsOptions {
                per_process_probes: false,
                builtins: !no_builtins,
                latency,
                empty_program: false,
                pids,
                all,
                select,
                interval: Duration::from_secs_f64(interval),
                duration: duration.map(Duration::from_secs_f64),
                top,
                filter,
                json,
            })
        }
        Command::Record {
            sampling,
            output,
            format,
            every,
        } => {
            let format = format
                .or_else(|| output.as_deref().and_then(Format::of_path))
                .unwrap_or(Format::Flamegraph);
            let output = output.unwrap_or_else(|| {
                let who = match sampling.targets.pids.as_slice() {
                    [pid] => pid.to_string(),
                    _ => "all".to_owned(),
                };
                format!("pyprobe-{who}.{}", format.extension()).into()
            });
            Job::Record(RecordOptions {
                profile: sampling.options(),
                output,
                format,
                every: every.map(Duration::from_secs_f64),
            })
        }
        Command::Top {
            sampling,
            interval,
            top,
            json,
        } => Job::Top(TopOptions {
            profile: sampling.options(),
            interval: Duration::from_secs_f64(interval),
            rows: top,
            json,
        }),
        Command::Log {
            targets,
            at,
            when,
            msg,
            probes,
            rate,
            count,
            duration,
            json,
            stack,
            no_redact,
        } => {
            let Some(("log", sub)) = matches.subcommand() else {
                unreachable!("parsed as log")
            };
            let mut points = pair_with_at(sub, &at, &when, &msg)?;
            if let Some(file) = &probes {
                points.extend(pyprobe::logpoint::probe_file::read(file)?);
            }
            let (pids, all, select) = targets.split();
            Job::Log(pyprobe::logpoint::session::LogOptions {
                pids,
                all,
                select,
                points,
                rate,
                count,
                duration: duration.map(Duration::from_secs_f64),
                json,
                stack,
                redact: !no_redact,
            })
        }
        Command::Agent { .. }
        | Command::Ctl { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => {
            unreachable!("the agent, ctl, completions and man run no job of their own")
        }
    })
}

impl Command {
    /// The processes a tracing command is for (`None` for the others).
    fn targets_mut(&mut self) -> Option<&mut TargetArgs> {
        match self {
            Command::Log { targets, .. } | Command::Calls { targets, .. } => Some(targets),
            Command::Record { sampling, .. } | Command::Top { sampling, .. } => {
                Some(&mut sampling.targets)
            }
            _ => None,
        }
    }
}

/// Writes `pyprobe.1` and one page per visible command (`pyprobe-record.1`,
/// `pyprobe-ctl-log.1`, ...) into `dir`; returns how many.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<usize> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut command = <Cli as clap::CommandFactory>::command();
    command.build();
    let mut pages = 0;
    let mut todo = vec![("pyprobe".to_owned(), command)];
    while let Some((name, command)) = todo.pop() {
        for sub in command.get_subcommands() {
            if !sub.is_hide_set() && sub.get_name() != "help" {
                todo.push((format!("{name}-{}", sub.get_name()), sub.clone()));
            }
        }
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(command)
            .title(name.clone())
            .render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
        pages += 1;
    }
    Ok(pages)
}

fn main() -> ExitCode {
    // Milliseconds: debug lines time the steps of attaching.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "pyprobe", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            return match write_man_pages(dir) {
                Ok(n) => {
                    eprintln!("pyprobe: wrote {n} man pages to {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pyprobe: error: {}", pyprobe::errors::one_line(e.as_ref()));
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pyprobe: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // From now on a Ctrl-C waits for a live command to take it, even
        // one pressed while it attaches (`dump` is over in a moment: Ctrl-C
        // still ends it at once).
        if !matches!(cli.command, Command::Dump { .. } | Command::Ctl { .. }) {
            pyprobe::live::listen_for_stop()?;
        }
        match cli.command {
            Command::Agent {
                config,
                listen,
                control,
                rate,
                hits,
                calls_budget,
            } => {
                let base = match &config {
                    Some(path) => pyprobe::agent::AgentConfig::read(path),
                    None => Ok(pyprobe::agent::AgentConfig::default()),
                };
                match base {
                    Ok(mut c) => {
                        c.listen = listen.unwrap_or(c.listen);
                        c.control = control.unwrap_or(c.control);
                        c.rate = rate.unwrap_or(c.rate);
                        c.hits = hits.unwrap_or(c.hits);
                        c.calls_budget = calls_budget.unwrap_or(c.calls_budget);
                        pyprobe::agent::run(c, config).await.map(|()| None)
                    }
                    Err(e) => Err(e),
                }
            }
            Command::Ctl {
                control,
                json,
                what,
            } => ctl(&control, json, what).map(|()| None),
            mut command => {
                // `-- PROGRAM ARGS...`: started and held at its first
                // Python call, then traced as a --pid target.
                let mut launched = None;
                if let Some(targets) = command.targets_mut()
                    && let Some((program, args)) = targets.program.split_first()
                {
                    match pyprobe::launch::start_held(program, args)? {
                        pyprobe::launch::Start::Held(held) => {
                            held.mark();
                            targets.pids = vec![held.pid()];
                            targets.program.clear();
                            launched = Some(held);
                        }
                        pyprobe::launch::Start::Ended(code) => {
                            eprintln!(
                                "pyprobe: {program} exited (status {code}) without running Python in its own \
                                 process (a Python it starts as a child is not followed)"
                            );
                            return Ok(Some(code));
                        }
                    }
                }
                let ran = match job_of(command, &matches) {
                    Ok(job) => job.run().await,
                    Err(e) => Err(e),
                };
                match launched {
                    // pyprobe's error first; the program's status when it
                    // ran its course.
                    Some(mut held) => {
                        ran?;
                        Ok(Some(held.exit_code()?))
                    }
                    None => ran.map(|()| None),
                }
            }
        }
    });
    match result {
        Ok(Some(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pyprobe: error: {}", pyprobe::errors::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The job `args` asks for, as JSON.
    fn job(args: &[&str]) -> serde_json::Value {
        let matches = <Cli as clap::CommandFactory>::command()
            .try_get_matches_from(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        serde_json::to_value(job_of(cli.command, &matches).unwrap()).unwrap()
    }

    #[test]
    fn commands_build_the_job_specs_they_run() {
        let calls = job(&[
            "pyprobe",
            "calls",
            "--name",
            "gunicorn",
            "--filter",
            "app.py",
            "-d",
            "5",
            "--latency",
        ]);
        assert_eq!(
            calls,
            serde_json::json!({
                "job": "calls", "pids": [], "all": true,
                "select": {"name": "gunicorn", "container": null},
                "interval": 1.0, "duration": 5.0, "top": null, "filter": "app.py",
                "json": false, "builtins": true, "latency": true,
            })
        );
        let record = job(&["pyprobe", "record", "--pid", "7", "-r", "49", "--gil"]);
        assert_eq!(
            record,
            serde_json::json!({
                "job": "record",
                "profile": {
                    "pids": [7], "all": false, "select": {"name": null, "container": null},
                    "rate": 49, "duration": null, "idle": false, "gil": true, "threads": false,
                },
                "output": "pyprobe-7.svg", "format": "flamegraph", "every": null,
            })
        );
        // The format follows the output's name unless given.
        for (output, format) in [
            ("p.pb.gz", "pprof"),
            ("p.pprof", "pprof"),
            ("t.trace.json", "chrometrace"),
            ("p.json", "speedscope"),
            ("p.folded", "folded"),
            ("P.SVG", "flamegraph"),
            ("profile", "flamegraph"),
        ] {
            let record = job(&["pyprobe", "record", "--pid", "7", "-o", output]);
            assert_eq!(record["format"], format, "{output}");
        }
        let record = job(&[
            "pyprobe", "record", "--pid", "7", "-o", "p.json", "-f", "folded",
        ]);
        assert_eq!(record["format"], "folded");
        let record = job(&["pyprobe", "record", "--pid", "7", "-f", "pprof"]);
        assert_eq!(record["output"], "pyprobe-7.pb.gz");
        let log = job(&[
            "pyprobe",
            "log",
            "--pid",
            "7",
            "--at",
            "app.py:42",
            "--when",
            "user.id == 7",
            "--msg",
            "order={order.id}",
            "--at",
            "app.py:50",
            "--json",
        ]);
        assert_eq!(
            log["points"],
            serde_json::json!([
                {"at": "app.py:42", "when": "user.id == 7", "msg": "order={order.id}"},
                {"at": "app.py:50", "when": null, "msg": null},
            ])
        );
        assert_eq!(
            (&log["job"], &log["pids"], &log["json"], &log["redact"]),
            (
                &serde_json::json!("log"),
                &serde_json::json!([7]),
                &serde_json::json!(true),
                &serde_json::json!(true)
            )
        );
        // What the command line built reads back as the same job.
        for value in [calls, record, log] {
            let again: Job = serde_json::from_value(value.clone()).unwrap();
            assert_eq!(serde_json::to_value(again).unwrap(), value);
        }
    }

    #[test]
    fn man_pages_cover_every_visible_command_and_completions_name_them() {
        let dir = std::env::temp_dir().join(format!("pyprobe-man-{}", std::process::id()));
        let pages = write_man_pages(&dir).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // The top page, one per command and one per command of ctl's
        // tree; `man` itself is hidden.
        assert_eq!(pages, names.len());
        for name in [
            "pyprobe.1",
            "pyprobe-record.1",
            "pyprobe-completions.1",
            "pyprobe-ctl-log-add.1",
            "pyprobe-ctl-calls-stop.1",
        ] {
            assert!(
                names.contains(&name.to_owned()),
                "{name} missing: {names:?}"
            );
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("-man") || n.contains("help"))
        );
        let record = std::fs::read_to_string(dir.join("pyprobe-record.1")).unwrap();
        assert!(record.contains("\n.TH pyprobe-record 1"), "{record}");
        assert!(record.contains("every"), "--every documented");
        std::fs::remove_dir_all(&dir).unwrap();

        let mut script = Vec::new();
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut command,
            "pyprobe",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        for word in ["record", "calls", "agent", "--every", "--container"] {
            assert!(script.contains(word), "{word} not completed");
        }
    }

    #[test]
    fn a_program_after_two_dashes_is_launched_and_excludes_other_targets() {
        use clap::Parser;
        let mut cli = Cli::try_parse_from([
            "pyprobe", "record", "-o", "p.svg", "--", "python3", "app.py", "-v",
        ])
        .unwrap();
        let targets = cli.command.targets_mut().expect("record has targets");
        assert_eq!(targets.program, ["python3", "app.py", "-v"]);
        assert!(targets.pids.is_empty());
        for other in [["--pid", "7"], ["--name", "x"]] {
            let err = Cli::try_parse_from(
                ["pyprobe", "calls"]
                    .into_iter()
                    .chain(other)
                    .chain(["--", "python3"]),
            )
            .err()
            .expect("refused");
            assert!(err.to_string().contains("cannot be used with"), "{err}");
        }
        // Nothing to trace at all is refused too.
        assert!(Cli::try_parse_from(["pyprobe", "top"]).is_err());
    }
}
