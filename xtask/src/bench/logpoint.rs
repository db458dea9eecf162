//! Log points side by side (`fixtures/logpoint_bench.py`): a call-heavy
//! workload (fib(22), 57,313 calls per run) with a breakpoint on a line
//! that never runs, (a) bare, (b) with a pyprobe log point there, (c) with
//! a pdb-style `sys.settrace` breakpoint there, (d) on 3.12+ with a
//! `sys.monitoring` breakpoint there; then pyprobe's cost per hit on a line
//! that runs, dropped by a kernel condition and printed.
//!
//! This VM's speed jumps by up to 50% within a second, so rounds timed
//! apart cannot show a 1% difference. Every figure here comes from pairs
//! of runs in two processes pinned to the same CPU, run back to back (the
//! order alternating): the speed hardly changes within a pair. For (b) the
//! log point is set on one process, then on the other, so a difference
//! between the two processes cancels. Two controls run in the same
//! rounds: A/A (nobody watches: the noise floor) and a bare hardware
//! breakpoint (a perf breakpoint on an address never executed, no BPF
//! program, no pyprobe: what an enabled debug register costs by itself,
//! 0-1.5% on the test VM depending on the interpreter build, also for an
//! execute breakpoint on an address never executed). Ratios are medians of
//! the pairs with a 95% interval from order statistics.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use super::{
    BpfStats, KillOnDrop, Usage, interpreters, median, percentile, prog_ns_per_run,
    start_fixture_with, wait_usage,
};

/// Rounds of the three conditions (A/A, pyprobe, bare breakpoint).
const ROUNDS: usize = 4;
/// Pairs of runs per condition, per watched process, per round.
const BLOCK: usize = 100;
/// Pairs of runs against sys.monitoring.
const PAIRS: usize = 800;
/// fib(N) per run of a pair (about 3-8 ms).
const PAIR_FIB: &str = "go 22";
/// Pairs against the settrace breakpoint (10-20x slower runs).
const TRACE_PAIRS: usize = 60;
/// Calls of hit() per run to time the cost per hit.
const HITS: usize = 2_000;
/// Pairs of runs per cost-per-hit figure.
const HIT_PAIRS: usize = 40;

struct Bench {
    _fixture: KillOnDrop,
    pid: u32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Bench {
    fn start(python: &Path, mode: &str) -> anyhow::Result<Self> {
        Self::start_script(python, "logpoint_bench.py", &[mode])
    }

    fn start_script(python: &Path, script: &str, args: &[&str]) -> anyhow::Result<Self> {
        let (fixture, stdin, stdout) = start_fixture_with(python, script, args)?;
        Ok(Self {
            pid: fixture.0.id(),
            _fixture: fixture,
            stdin,
            stdout,
        })
    }

    /// Seconds and breakpoint hits of one command.
    fn once(&mut self, command: &str) -> anyhow::Result<(f64, u64)> {
        let words = self.answer(command)?;
        match (words.first(), words.get(1)) {
            (Some(&s), Some(&h)) => Ok((s, h as u64)),
            _ => bail!("bad answer {words:?} to {command:?}"),
        }
    }

    /// The numbers of the answer to one command.
    fn answer(&mut self, command: &str) -> anyhow::Result<Vec<f64>> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.split_whitespace()
            .map(|w| w.parse().with_context(|| format!("bad answer {line:?}")))
            .collect()
    }

    /// Starts `pyprobe log` on this process; returns once it is armed.
    fn log(&self, pyprobe: &Path, args: &[&str]) -> anyhow::Result<Probe> {
        self.log_env(pyprobe, args, None)
    }

    /// [`Self::log`] with `RUST_LOG` set (its start-up lines are kept).
    fn log_env(
        &self,
        pyprobe: &Path,
        args: &[&str],
        rust_log: Option<&str>,
    ) -> anyhow::Result<Probe> {
        let pid = self.pid.to_string();
        let started = Instant::now();
        let mut command = Command::new(pyprobe);
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let mut child = command
            .args(["log", "--pid", &pid])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        let mut seen = String::new();
        loop {
            line.clear();
            if err.read_line(&mut line)? == 0 {
                bail!("pyprobe log exited before attaching: {seen}");
            }
            seen.push_str(&line);
            if line.contains("attached to PID") {
                break;
            }
        }
        // Keep reading stderr so pyprobe never blocks on it; the summary
        // it prints at exit is kept.
        let kept = std::sync::Arc::new(std::sync::Mutex::new(seen));
        let sink = kept.clone();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).is_ok_and(|n| n > 0) {
                if let Ok(mut k) = sink.lock() {
                    k.push_str(&line);
                }
                line.clear();
            }
        });
        Ok(Probe {
            child,
            started,
            reader,
            stderr: kept,
        })
    }
}

/// A running `pyprobe log`.
struct Probe {
    child: Child,
    started: Instant,
    /// Reads its stderr into `stderr` until the pipe closes.
    reader: std::thread::JoinHandle<()>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

/// What a `pyprobe log` cost and saw.
struct Stopped {
    usage: Usage,
    /// Run time of its BPF program per run (`bpf_stats`), when the kernel
    /// gave it.
    prog_ns: Option<f64>,
    /// Watchpoint hits in all (runs and other accesses), from its summary.
    hits: u64,
    /// Runs of the line, from its summary.
    runs: u64,
}

impl Probe {
    /// Stops it (Ctrl-C) and measures it.
    fn stop(self) -> anyhow::Result<Stopped> {
        let prog_ns = prog_ns_per_run(self.child.id());
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let usage = wait_usage(self.child, self.started)?;
        // The reader thread ends with the pipe: then the summary is in.
        let _ = self.reader.join();
        let text = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let number_before = |marker: &str| -> Option<u64> {
            let at = text.find(marker)?;
            text[..at].split_whitespace().last()?.parse().ok()
        };
        let runs = number_before(" runs in")
            .with_context(|| format!("no runs in pyprobe's summary: {text}"))?;
        let hits = runs
            + number_before(" watchpoint hits were not runs")
                .context("no hit count in pyprobe's summary")?;
        Ok(Stopped {
            usage,
            prog_ns,
            hits,
            runs,
        })
    }
}

fn mark(name: &str) -> anyhow::Result<usize> {
    mark_in("logpoint_bench.py", name)
}

/// The line of `fixtures/<file>` marked `# name`.
fn mark_in(file: &str, name: &str) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(crate::util::workspace_root().join("fixtures").join(file))?;
    text.lines()
        .position(|l| l.trim_end().ends_with(&format!("# {name}")))
        .map(|i| i + 1)
        .with_context(|| format!("no `# {name}` line in {file}"))
}

/// A median with its 95% confidence interval.
struct Estimate {
    median: f64,
    lo: f64,
    hi: f64,
}

impl Estimate {
    /// The median of `values` and the order statistics that bound it with
    /// 95% confidence (distribution-free: the count of values below the
    /// true median is Binomial(n, 1/2)).
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let half = 1.96 * (n as f64).sqrt() / 2.0;
        let lo = ((n as f64 / 2.0 - half).floor().max(0.0)) as usize;
        let hi = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
        Self {
            median: percentile(&values, 0.5),
            lo: values[lo],
            hi: values[hi],
        }
    }

    fn ratio(&self) -> String {
        format!("{:.4}x [{:.4}-{:.4}]", self.median, self.lo, self.hi)
    }
}

/// Pins every thread of process `pid` to `cpu`.
fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for tid in tids {
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and
        // sched_setaffinity get valid pointers to it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) != 0 {
                bail!(
                    "pinning {pid} (thread {tid}) to CPU {cpu}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    Ok(())
}

/// A perf hardware breakpoint on a thread, with no BPF program: the
/// debug-register control.
struct RawBreakpoint(std::os::fd::OwnedFd);

impl RawBreakpoint {
    /// An execute breakpoint on the first byte of `pid`'s first mapping
    /// (the executable's ELF header: never executed).
    fn set(pid: u32) -> anyhow::Result<Self> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        let addr = maps
            .split('-')
            .next()
            .and_then(|a| u64::from_str_radix(a, 16).ok())
            .context("no mapping")?;
        // struct perf_event_attr (version 8, 128 bytes): type
        // PERF_TYPE_BREAKPOINT, size, sample_period 1, bp_type X, bp_addr,
        // bp_len 8; enabled, not inherited.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&5u32.to_ne_bytes());
        attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
        attr[16..24].copy_from_slice(&1u64.to_ne_bytes());
        attr[52..56].copy_from_slice(&4u32.to_ne_bytes());
        attr[56..64].copy_from_slice(&addr.to_ne_bytes());
        attr[64..72].copy_from_slice(&8u64.to_ne_bytes());
        // SAFETY: perf_event_open with a valid attr buffer; the fd it
        // returns is owned here.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                pid as i32,
                -1,
                -1,
                0,
            )
        };
        if fd < 0 {
            bail!(
                "perf_event_open(breakpoint): {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a new fd nothing else owns.
        Ok(Self(unsafe {
            std::os::fd::FromRawFd::from_raw_fd(fd as i32)
        }))
    }

    /// Times it triggered.
    fn hits(&self) -> anyhow::Result<u64> {
        let mut count = [0u8; 8];
        std::io::Read::read_exact(&mut std::fs::File::from(self.0.try_clone()?), &mut count)?;
        Ok(u64::from_ne_bytes(count))
    }
}

/// `pairs` pairs of runs of `command`, (seconds in `a`, seconds in `b`),
/// back to back, `a` first in even pairs and `b` first in odd ones.
fn pairs(
    a: &mut Bench,
    b: &mut Bench,
    command: &str,
    pairs: usize,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut out = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let (ta, tb) = if i % 2 == 0 {
            let ta = a.once(command)?.0;
            (ta, b.once(command)?.0)
        } else {
            let tb = b.once(command)?.0;
            (a.once(command)?.0, tb)
        };
        out.push((ta, tb));
    }
    Ok(out)
}

fn ratios(pairs: &[(f64, f64)]) -> Vec<f64> {
    pairs.iter().map(|&(a, b)| a / b).collect()
}

/// Requests per run of the framework workload.
const REQUESTS: usize = 2_000;
/// Pairs of runs per condition of the framework workload, per watched
/// process (the log point is set on one process, then on the other).
const FRAMEWORK_PAIRS: usize = 40;
/// Pipe round trips to time a context switch with an armed log point.
const SWITCHES: usize = 5_000;

/// Pairs of (watched, bare) times: `x` watched then `y` watched.
type BothWays = [Vec<(f64, f64)>; 2];

/// Pairs of runs of `command` (watched, bare): `x` watched by a log point
/// set with `args` against `y` bare, then the other way round; and the log
/// point's summary of the last.
fn watched_ratios(
    pyprobe: &Path,
    x: &mut Bench,
    y: &mut Bench,
    command: &str,
    args: &[&str],
) -> anyhow::Result<(BothWays, Stopped)> {
    watched_ratios_n(pyprobe, x, y, command, args, FRAMEWORK_PAIRS)
}

/// [`watched_ratios`] with `n` pairs per direction.
fn watched_ratios_n(
    pyprobe: &Path,
    x: &mut Bench,
    y: &mut Bench,
    command: &str,
    args: &[&str],
    n: usize,
) -> anyhow::Result<(BothWays, Stopped)> {
    let mut out = [Vec::new(), Vec::new()];
    let mut last = None;
    for (i, first) in [true, false].into_iter().enumerate() {
        let (w, b) = if first {
            (&mut *x, &mut *y)
        } else {
            (&mut *y, &mut *x)
        };
        let probe = w.log(pyprobe, args)?;
        out[i] = pairs(w, b, command, n)?;
        last = Some(probe.stop()?);
    }
    Ok((out, last.expect("two rounds")))
}

/// The watched/bare ratio from both directions: two identical processes
/// on one CPU can differ by a few percent (A/A), which multiplies one
/// direction's ratio and divides the other's, so the geometric mean of the
/// two medians cancels it (the interval likewise, from each median's).
fn unbiased_ratio(both: &BothWays) -> Estimate {
    let [a, b] = [
        Estimate::of(ratios(&both[0])),
        Estimate::of(ratios(&both[1])),
    ];
    Estimate {
        median: (a.median * b.median).sqrt(),
        lo: (a.lo * b.lo).sqrt(),
        hi: (a.hi * b.hi).sqrt(),
    }
}

/// The time watched runs add per unit, from both directions (the mean of
/// the two medians cancels a difference between the processes).
fn unbiased_added(both: &BothWays, units: usize) -> f64 {
    let one = |p: &[(f64, f64)]| {
        median(
            p.iter()
                .map(|&(w, b)| (w - b) / units as f64 * 1e6)
                .collect(),
        )
    };
    (one(&both[0]) + one(&both[1])) / 2.0
}

/// The address of the byte a log point at `at` watches in `bench`'s
/// process, from pyprobe's debug log.
fn watched_byte(pyprobe: &Path, bench: &Bench, at: &str) -> anyhow::Result<u64> {
    let probe = bench.log_env(
        pyprobe,
        &["--at", at, "--when", "request is None"],
        Some("pyprobe=debug"),
    )?;
    let text = probe.stderr.lock().map(|s| s.clone()).unwrap_or_default();
    probe.stop()?;
    text.split("watchpoint at ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .context("pyprobe did not say where its watchpoint is")
}

/// The framework-like workload (`fixtures/logpoint_framework.py`): requests
/// per second bare, with a log point armed and never hit, and with one hit
/// and dropped by its condition in the kernel on every request; what a
/// hit costs, what a bare debug trap costs on this machine (the part that
/// is not pyprobe's), traps per run of the line, the BPF program's run time
/// per hit, and what an armed log point adds to a context switch.
fn bench_framework(pyprobe: &Path) -> anyhow::Result<()> {
    let never = format!(
        "logpoint_framework.py:{}",
        mark_in("logpoint_framework.py", "never-runs")?
    );
    let view = format!(
        "logpoint_framework.py:{}",
        mark_in("logpoint_framework.py", "view-line")?
    );
    let cpu = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
    println!(
        "\n== log points on a framework-like request loop (fixtures/logpoint_framework.py), release build ==\n\
         {REQUESTS} requests per run through middleware, router, view, service and models; pairs of runs in \
         two processes pinned to CPU {cpu}, the log point set on each in turn ({} pairs per condition); \
         each figure combines the two directions (geometric mean of the medians of the ratios, mean of \
         the medians of the added times), which cancels a difference between the two processes; \
         [95% interval]. never hit: a log point armed on a function no request calls. \
         hit+dropped: on the view's first line, once per request, its condition (request.user_id < 0) \
         false in the kernel. µs/hit: the added time per request; µs/local: the same with a condition \
         on a local alone (request is None: no attribute lookup). bare trap: the added time with a bare \
         perf read/write breakpoint on the same byte instead (no BPF program, no pyprobe: what this \
         machine charges for a debug trap there). pyprobe: µs/hit minus bare trap. traps/run: watchpoint traps per run of the line. prog: BPF run time per hit. \
         switch: µs added to a pipe round trip between two threads (two context switches) with a log \
         point armed, never hit / with a bare perf breakpoint armed instead ({SWITCHES} round trips).",
        2 * FRAMEWORK_PAIRS
    );
    println!(
        "{:<44} {:>9} {:>26} {:>26} {:>7} {:>8} {:>10} {:>8} {:>9} {:>7} {:>12} {:>14}",
        "interpreter",
        "req/s",
        "never hit",
        "hit+dropped",
        "µs/hit",
        "µs/local",
        "bare trap",
        "pyprobe",
        "traps/run",
        "prog",
        "switch µs",
        "pyprobe cpu/rss"
    );
    let serve = format!("serve {REQUESTS}");
    for python in interpreters() {
        let mut x = Bench::start_script(&python, "logpoint_framework.py", &[])?;
        let mut y = Bench::start_script(&python, "logpoint_framework.py", &[])?;
        pin(x.pid, cpu)?;
        pin(y.pid, cpu)?;
        let warm = pairs(&mut x, &mut y, &serve, 20)?;
        let bare = median(warm.iter().flat_map(|&(a, b)| [a, b]).collect());
        let (never_pairs, never_stop) =
            watched_ratios(pyprobe, &mut x, &mut y, &serve, &["--at", &never])?;
        let (hit_pairs, hit_stop) = watched_ratios(
            pyprobe,
            &mut x,
            &mut y,
            &serve,
            &["--at", &view, "--when", "request.user_id < 0"],
        )?;
        let (local_pairs, _) = watched_ratios(
            pyprobe,
            &mut x,
            &mut y,
            &serve,
            &["--at", &view, "--when", "request is None"],
        )?;
        let per_hit = unbiased_added(&hit_pairs, REQUESTS);
        let per_local_hit = unbiased_added(&local_pairs, REQUESTS);
        // The control: a bare breakpoint (no BPF program, no pyprobe) on
        // the byte the log point watches, in the same workload; both
        // directions, as for the log point.
        let mut controls = [Vec::new(), Vec::new()];
        for (k, first) in [true, false].into_iter().enumerate() {
            let (w, b) = if first {
                (&mut x, &mut y)
            } else {
                (&mut y, &mut x)
            };
            let trapat = format!("trapat {:x} {REQUESTS}", watched_byte(pyprobe, w, &view)?);
            for i in 0..FRAMEWORK_PAIRS {
                let (t, bare) = if i % 2 == 0 {
                    let t = w.once(&trapat)?;
                    (t, b.once(&serve)?.0)
                } else {
                    let bare = b.once(&serve)?.0;
                    (w.once(&trapat)?, bare)
                };
                if t.1 != REQUESTS as u64 {
                    bail!(
                        "the bare breakpoint trapped {} times in {REQUESTS} requests",
                        t.1
                    );
                }
                controls[k].push((t.0, bare));
            }
        }
        let trap = unbiased_added(&controls, REQUESTS);
        let switch = format!("switch {SWITCHES}");
        let (switched, _) =
            watched_ratios_n(pyprobe, &mut x, &mut y, &switch, &["--at", &never], 10)?;
        let per_switch = unbiased_added(&switched, SWITCHES);
        let switch_bp = format!("switchbp {SWITCHES}");
        let mut bare_switch = [Vec::new(), Vec::new()];
        for _ in 0..10 {
            bare_switch[0].push((x.once(&switch_bp)?.0, y.once(&switch)?.0));
            bare_switch[1].push((y.once(&switch_bp)?.0, x.once(&switch)?.0));
        }
        let bare_switch = unbiased_added(&bare_switch, SWITCHES);
        println!(
            "{:<44} {:>9.0} {:>26} {:>26} {:>7.2} {:>8.2} {:>9.2}µs {:>7.2}µs {:>9.2} {:>7} {:>12} {:>7.0}ms/{:.0}MB",
            python.display().to_string(),
            REQUESTS as f64 / bare,
            unbiased_ratio(&never_pairs).ratio(),
            unbiased_ratio(&hit_pairs).ratio(),
            per_hit,
            per_local_hit,
            trap,
            per_hit - trap,
            hit_stop.hits as f64 / hit_stop.runs.max(1) as f64,
            hit_stop
                .prog_ns
                .map_or("-".to_owned(), |n| format!("{n:.0}ns")),
            format!("{per_switch:.2}/{bare_switch:.2}"),
            hit_stop.usage.cpu_ms.max(never_stop.usage.cpu_ms),
            hit_stop.usage.max_rss_kb as f64 / 1024.0,
        );
    }
    Ok(())
}

/// Runs the framework-like log point benchmark alone.
pub fn bench_logpoint_framework(pyprobe: &Path) -> anyhow::Result<()> {
    let _stats = BpfStats::enable();
    bench_framework(pyprobe)
}

/// Runs the log point benchmarks on every interpreter.
pub fn bench_logpoint(pyprobe: &Path) -> anyhow::Result<()> {
    let _stats = BpfStats::enable();
    bench_framework(pyprobe)?;
    let never = format!("logpoint_bench.py:{}", mark("never-runs")?);
    let hit_line = format!("logpoint_bench.py:{}", mark("hit-line")?);
    let cpu = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
    let n = ROUNDS * 2 * BLOCK;
    println!(
        "\n== log points: fib(22) with a breakpoint on a line that never runs, release build ==\n\
         Each ratio: median over pairs of back-to-back runs in two processes pinned to CPU {cpu}, \
         [95% interval], the three first in {ROUNDS} interleaved rounds, {n} pairs each. A/A: nobody \
         watches (the noise floor). pyprobe: a log point on the never-run line, set on one process, \
         then on the other (watched/bare). hw bp: a bare perf breakpoint instead (no pyprobe, no BPF: \
         what an enabled debug register costs on this machine). hits: hits of both meanwhile (any \
         would be a cost). settrace (pdb-style, {TRACE_PAIRS} pairs) and sys.monitoring ({PAIRS} \
         pairs): against a bare process. µs/hit: {HITS} calls of a line, dropped by a kernel \
         condition / printed (to /dev/null, no rate limit), over a bare process ({HIT_PAIRS} pairs). \
         Goal: pyprobe's median within 1.01."
    );
    println!(
        "{:<44} {:>7} {:>26} {:>26} {:>26} {:>4} {:>4} {:>9} {:>10} {:>8} {:>9} {:>7} {:>14}",
        "interpreter",
        "bare",
        "A/A",
        "pyprobe",
        "hw bp",
        "hits",
        "goal",
        "settrace",
        "monitoring",
        "µs/drop",
        "µs/print",
        "prog ns",
        "pyprobe cpu/rss"
    );
    for python in interpreters() {
        let mut x = Bench::start(&python, "bare")?;
        let mut y = Bench::start(&python, "bare")?;
        pin(x.pid, cpu)?;
        pin(y.pid, cpu)?;
        pairs(&mut x, &mut y, PAIR_FIB, 20)?; // warm-up
        let (mut aa, mut watched, mut raw) = (Vec::new(), Vec::new(), Vec::new());
        let mut never_hits = 0;
        let mut usage = None;
        for _ in 0..ROUNDS {
            aa.extend(pairs(&mut x, &mut y, PAIR_FIB, 2 * BLOCK)?);
            for first in [true, false] {
                let (w, b) = if first {
                    (&mut x, &mut y)
                } else {
                    (&mut y, &mut x)
                };
                let probe = w.log(pyprobe, &["--at", &never])?;
                watched.extend(ratios(&pairs(w, b, PAIR_FIB, BLOCK)?));
                let stopped = probe.stop()?;
                never_hits += stopped.hits;
                usage.get_or_insert(stopped.usage);

                let bp = RawBreakpoint::set(w.pid)?;
                raw.extend(ratios(&pairs(w, b, PAIR_FIB, BLOCK)?));
                never_hits += bp.hits()?;
            }
        }
        let bare = median(aa.iter().flat_map(|&(a, b)| [a, b]).collect());
        let aa = Estimate::of(ratios(&aa));
        let with = Estimate::of(watched);
        let raw = Estimate::of(raw);
        let goal = with.median <= 1.01;

        // Per hit: watched `x` against bare `y`.
        let hits_cmd = format!("hits {HITS}");
        let per_hit = |p: Vec<(f64, f64)>| {
            median(
                p.iter()
                    .map(|&(w, b)| (w - b) / HITS as f64 * 1e6)
                    .collect(),
            )
        };
        let probe = x.log(
            pyprobe,
            &["--at", &hit_line, "--when", "i < 0", "--msg", "{i}"],
        )?;
        let dropped = per_hit(pairs(&mut x, &mut y, &hits_cmd, HIT_PAIRS)?);
        let prog_ns = probe.stop()?.prog_ns;
        let probe = x.log(
            pyprobe,
            &["--at", &hit_line, "--msg", "i={i}", "--rate", "0"],
        )?;
        let printed = per_hit(pairs(&mut x, &mut y, &hits_cmd, HIT_PAIRS)?);
        probe.stop()?;
        drop(x);

        let mut settrace = Bench::start(&python, "settrace")?;
        pin(settrace.pid, cpu)?;
        let (_, trace_hits) = settrace.once(PAIR_FIB)?;
        if trace_hits != 0 {
            bail!("the settrace breakpoint hit {trace_hits} times on a line that never runs");
        }
        let trace = Estimate::of(ratios(&pairs(
            &mut settrace,
            &mut y,
            PAIR_FIB,
            TRACE_PAIRS,
        )?));
        drop(settrace);
        let monitoring = match Bench::start(&python, "monitoring") {
            Ok(mut m) => {
                pin(m.pid, cpu)?;
                Some(Estimate::of(ratios(&pairs(
                    &mut m, &mut y, PAIR_FIB, PAIRS,
                )?)))
            }
            Err(_) => None, // before 3.12: no sys.monitoring
        };
        let u = usage.context("no pyprobe round")?;
        println!(
            "{:<44} {:>5.2}ms {:>26} {:>26} {:>26} {:>4} {:>4} {:>8.2}x {:>10} {:>8.2} {:>9.2} {:>7} {:>7.0}ms/{:.0}MB",
            python.display().to_string(),
            bare * 1000.0,
            aa.ratio(),
            with.ratio(),
            raw.ratio(),
            never_hits,
            if goal { "met" } else { "NOT" },
            trace.median,
            monitoring.map_or("-".to_owned(), |m| format!("{:.4}x", m.median)),
            dropped,
            printed,
            prog_ns.map_or("-".to_owned(), |n| format!("{n:.0}")),
            u.cpu_ms,
            u.max_rss_kb as f64 / 1024.0,
        );
    }
    Ok(())
}
