//! `cargo xtask bench`: performance goals checked by measurement, not by
//! timed tests. Everything is measured in one run on this machine, and
//! pyprobe's own CPU time and peak RSS are printed with each figure.
//!
//! - Each command's time to first output and to exit after its end,
//!   against a busy fixture (see [`startup`]).
//! - `pyprobe dump` of a 50-thread process (each thread 20 calls deep), on
//!   every interpreter: wall time per dump (goal: under 100 ms).
//! - `pyprobe calls` on a call-heavy workload (`fixtures/call_bench.py`,
//!   fib(25)), on every interpreter: the workload's time bare, watched by
//!   pyprobe, with an empty BPF program on the same uprobes, under a
//!   `sys.settrace` call tracer and (3.12+) a `sys.monitoring` PY_START
//!   counter, as slowdown ratios; pyprobe's cost per hooked call over the
//!   empty program's (goal: at most 1.2), taken within interleaved rounds
//!   in one process; the programs' in-kernel run time (`bpf_stats`);
//!   pyprobe's CPU time and peak RSS.
//! - `pyprobe record` against `py-spy record` at 100 Hz and 1 kHz (see
//!   [`profile`]).
//! - `calls`, `record` and `log` under `--all` with 100 Python processes:
//!   time to ready and to exit, CPU and peak RSS (see [`scale`]).
//! - `pyprobe agent` over 20 busy processes against `py-spy record` on
//!   each (see [`agent`]).

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

mod agent;
mod logpoint;
mod profile;
mod scale;
mod startup;

use crate::{
    setup, sid,
    util::{KillOnDrop, cargo, run, workspace_root},
};

/// Resources one child process used, from `wait4`.
struct Usage {
    wall_ms: f64,
    cpu_ms: f64,
    max_rss_kb: i64,
}

/// Runs `cmd` to completion and measures it.
fn measure(cmd: &mut Command) -> anyhow::Result<Usage> {
    let started = Instant::now();
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid pointers.
    let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    if ret != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let exit = std::process::ExitStatus::from_raw(status);
    if !exit.success() {
        bail!("{cmd:?} failed: {exit}");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    Ok(Usage {
        wall_ms,
        cpu_ms: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kb: usage.ru_maxrss,
    })
}

/// `--python`: only interpreters whose path contains it.
static PYTHON_FILTER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Interpreters to benchmark: pyenv 3.8+, /usr/bin/python3.N and the
/// private sid 3.13-3.15, as `--python` narrows them.
fn interpreters() -> Vec<PathBuf> {
    let mut out = all_interpreters();
    if let Some(Some(filter)) = PYTHON_FILTER.get() {
        out.retain(|p| p.to_string_lossy().contains(filter.as_str()));
    }
    out
}

fn all_interpreters() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = pyprobe_testenv::pyenv_versions()
        .into_iter()
        .filter(|((major, minor, _), _)| *major == 3 && (8..=15).contains(minor))
        .map(|(_, exe)| exe)
        .collect();
    out.extend(
        pyprobe_testenv::system_pythons()
            .into_iter()
            .filter(|(minor, _)| (8..=15).contains(minor))
            .map(|(_, exe)| exe),
    );
    // The private Debian sid interpreters that setup installs.
    for v in sid::VERSIONS {
        let minor = v.rsplit_once('.').and_then(|(_, m)| m.parse().ok());
        if let Some(p) = minor.map(pyprobe_testenv::sid_python)
            && p.exists()
        {
            out.push(p);
        }
    }
    out
}

/// Starts a fixture; returns it with its stdin (the fixture exits when stdin
/// closes).
fn start_fixture(
    python: &Path,
    script: &str,
) -> anyhow::Result<(KillOnDrop, std::process::ChildStdin)> {
    start_fixture_with(python, script, &[]).map(|(child, stdin, _)| (child, stdin))
}

/// Starts a fixture with arguments; returns it with its stdin and a reader
/// of its stdout, after its `ready` line.
fn start_fixture_with(
    python: &Path,
    script: &str,
    args: &[&str],
) -> anyhow::Result<(
    KillOnDrop,
    std::process::ChildStdin,
    BufReader<std::process::ChildStdout>,
)> {
    let mut child = Command::new(python)
        .arg(workspace_root().join("fixtures").join(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    stdout.read_line(&mut line)?;
    let stdin = child.stdin.take().expect("piped");
    let child = KillOnDrop(child);
    // "ready", or "ready" and what the fixture tells of itself.
    if line.split_whitespace().next() != Some("ready") {
        bail!("{script} under {} did not start", python.display());
    }
    Ok((child, stdin, stdout))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmarks.
pub fn bench(runs: usize, only: &[String], python: Option<String>) -> anyhow::Result<()> {
    PYTHON_FILTER.get_or_init(|| python.clone());
    if interpreters().is_empty() {
        bail!(
            "--python {:?} matches none of {:?}",
            python.unwrap_or_default(),
            all_interpreters()
        );
    }
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    setup::setup()?;
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    run(cargo()?.args(["build", "--release", "-p", "pyprobe", "--bin", "pyprobe"]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join("target"));
    let pyprobe = target_dir.join("release").join("pyprobe");

    if wanted("startup") {
        startup::bench_startup(&pyprobe)?;
    }
    if wanted("dump") {
        bench_dump(&pyprobe, runs)?;
    }
    if wanted("profile") {
        profile::bench_profile(&pyprobe)?;
    }
    if wanted("calls") {
        // The counter's empty twin, for the cost of the trap alone.
        run(cargo()?.args([
            "build",
            "--release",
            "-p",
            "pyprobe-tests",
            "--bin",
            "pyprobe-empty-calls",
        ]))?;
        let empty_calls = target_dir.join("release").join("pyprobe-empty-calls");
        bench_calls(&pyprobe, &empty_calls, runs.min(7))?;
    }
    if wanted("scale") {
        scale::bench_scale(&pyprobe)?;
    }
    if wanted("agent") {
        agent::bench_agent(&pyprobe)?;
    }
    if wanted("agent-soak") {
        agent::soak(&pyprobe)?;
    }
    if wanted("logpoint") {
        logpoint::bench_logpoint(&pyprobe)?;
    } else if only.iter().any(|o| o == "logpoint-framework") {
        logpoint::bench_logpoint_framework(&pyprobe)?;
    }
    Ok(())
}

/// `pyprobe dump` of a 50-thread process.
fn bench_dump(pyprobe: &Path, runs: usize) -> anyhow::Result<()> {
    println!(
        "\n== pyprobe dump of a 50-thread process (20 frames each), {runs} runs, release build =="
    );
    println!(
        "{:<48} {:>9} {:>9} {:>9} {:>11} {:>11}",
        "interpreter", "median", "p95", "max", "cpu/run", "peak RSS"
    );
    for python in interpreters() {
        let (fixture, _stdin) = start_fixture(&python, "threads50.py")?;
        let pid = fixture.0.id().to_string();
        let mut walls = Vec::new();
        let mut cpu = 0.0;
        let mut rss = 0;
        for _ in 0..runs {
            let u = measure(Command::new(pyprobe).args(["dump", "--pid", &pid]))?;
            walls.push(u.wall_ms);
            cpu += u.cpu_ms;
            rss = rss.max(u.max_rss_kb);
        }
        walls.sort_by(f64::total_cmp);
        println!(
            "{:<48} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>9.1}ms {:>8} KB",
            python.display(),
            percentile(&walls, 0.5),
            percentile(&walls, 0.95),
            walls[walls.len() - 1],
            cpu / runs as f64,
            rss
        );
    }
    println!("goal: median under 100 ms");
    Ok(())
}

/// Calls in one run of `call_bench.py` (fib(25)).
const BENCH_CALLS: f64 = 242_785.0;

/// Rounds of (bare, pyprobe, empty program) timings in one fixture process
/// for the cost ratio: this VM's speed drifts between processes and over
/// seconds, so the ratio is taken within each round and its median shown.
const RATIO_ROUNDS: usize = 5;

/// One `call_bench.py` process: times its workload, bare or watched.
struct CallBench {
    fixture: KillOnDrop,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

/// A `pyprobe calls` watching a [`CallBench`].
struct Watcher {
    child: std::process::Child,
    started: Instant,
}

/// What a watcher cost: its resources, and its BPF programs' own run time
/// per run (`bpf_stats`), when the kernel gave it.
struct WatchCost {
    usage: Usage,
    prog_ns: Option<f64>,
}

impl CallBench {
    /// Starts the fixture in `mode` (`bare`, `settrace`, `monitoring`).
    fn start(python: &Path, mode: &str) -> anyhow::Result<Self> {
        let (fixture, stdin, stdout) = start_fixture_with(python, "call_bench.py", &[mode])?;
        Ok(Self {
            fixture,
            stdin,
            stdout,
        })
    }

    /// Median seconds of `runs` runs of the workload.
    fn time(&mut self, runs: usize) -> anyhow::Result<f64> {
        use std::io::Write;
        let mut times = Vec::new();
        for _ in 0..runs {
            writeln!(self.stdin, "go")?;
            self.stdin.flush()?;
            let mut line = String::new();
            self.stdout.read_line(&mut line)?;
            let secs: f64 = line
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("bad answer {line:?}"))?;
            times.push(secs);
        }
        times.sort_by(f64::total_cmp);
        Ok(percentile(&times, 0.5))
    }

    /// The fixture's PID.
    fn pid(&self) -> String {
        self.fixture.0.id().to_string()
    }

    /// Starts `program` with `args` (a calls counter on the fixture);
    /// returns once it counts.
    fn watch(&self, program: &Path, args: &[&str]) -> anyhow::Result<Watcher> {
        let started = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        loop {
            line.clear();
            if err.read_line(&mut line)? == 0 {
                bail!("pyprobe calls exited before attaching");
            }
            if line.contains("counting calls") {
                break;
            }
        }
        Ok(Watcher { child, started })
    }
}

impl Watcher {
    /// Stops pyprobe (Ctrl-C) and measures what it cost.
    fn stop(self) -> anyhow::Result<WatchCost> {
        let prog_ns = prog_ns_per_run(self.child.id());
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        Ok(WatchCost {
            usage: wait_usage(self.child, self.started)?,
            prog_ns,
        })
    }
}

/// Run time per run of the busiest BPF program `pid` holds, from its
/// fdinfo (`run_time_ns` / `run_cnt`, kept while `kernel.bpf_stats_enabled`
/// is 1).
fn prog_ns_per_run(pid: u32) -> Option<f64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    let field = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|t| Some((field(&t, "run_cnt")?, field(&t, "run_time_ns")?)))
        .filter(|&(cnt, _)| cnt > 0.0)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(cnt, ns)| ns / cnt)
}

/// Sets `kernel.bpf_stats_enabled` for as long as it lives, then restores
/// it.
struct BpfStats(Option<String>);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Self {
        let old = std::fs::read_to_string(Self::PATH).ok();
        if std::fs::write(Self::PATH, "1").is_err() {
            return Self(None);
        }
        Self(old)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(Self::PATH, old.trim());
        }
    }
}

/// Median of unsorted values.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5)
}

/// Median seconds of `runs` runs of a fresh fixture in `mode`.
fn mode_time(python: &Path, mode: &str, runs: usize) -> anyhow::Result<f64> {
    CallBench::start(python, mode)?.time(runs)
}

/// Waits for a child and returns its resource usage.
fn wait_usage(child: std::process::Child, started: Instant) -> anyhow::Result<Usage> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid pointers.
    let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if ret != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    Ok(Usage {
        wall_ms: started.elapsed().as_secs_f64() * 1000.0,
        cpu_ms: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kb: usage.ru_maxrss,
    })
}

fn bench_calls(pyprobe: &Path, empty_calls: &Path, runs: usize) -> anyhow::Result<()> {
    let _stats = BpfStats::enable();
    println!(
        "\n== pyprobe calls on fib(25) ({BENCH_CALLS} Python calls), release build ==\n\
         bare, pyprobe and empty BPF: {RATIO_ROUNDS} interleaved rounds in one process, each the median of {runs} runs; \
         settrace and monitoring: median of {runs} runs"
    );
    println!(
        "{:<44} {:>8} {:>15} {:>15} {:>15} {:>15} {:>8} {:>6} {:>13} {:>11} {:>16}",
        "interpreter",
        "bare",
        "pyprobe",
        "empty BPF",
        "settrace",
        "monitoring",
        "ns/call",
        "empty",
        "ratio (range)",
        "prog ns",
        "pyprobe cpu/rss"
    );
    for python in interpreters() {
        let mut bench = CallBench::start(&python, "bare")?;
        let (mut bares, mut probed, mut empties, mut ratios) = (vec![], vec![], vec![], vec![]);
        let (mut prog_ns, mut empty_prog_ns) = (vec![], vec![]);
        let mut usage = None;
        for _ in 0..RATIO_ROUNDS {
            let bare = bench.time(runs)?;
            let pid = bench.pid();
            let watcher = bench.watch(
                pyprobe,
                &["calls", "--pid", &pid, "--interval", "3600", "--json"],
            )?;
            let with = bench.time(runs)?;
            let cost = watcher.stop()?;
            prog_ns.extend(cost.prog_ns);
            usage.get_or_insert(cost.usage);
            let watcher = bench.watch(empty_calls, &[&pid])?;
            let empty = bench.time(runs)?;
            empty_prog_ns.extend(watcher.stop()?.prog_ns);
            let per_call = |t: f64| (t - bare) / BENCH_CALLS * 1e9;
            ratios.push(per_call(with) / per_call(empty));
            bares.push(bare);
            probed.push(per_call(with));
            empties.push(per_call(empty));
        }
        drop(bench);
        let bare = median(bares);
        let traced = mode_time(&python, "settrace", runs)?;
        let has_monitoring = Command::new(&python)
            .args(["-c", "import sys; sys.monitoring"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let monitored = if has_monitoring {
            Some(mode_time(&python, "monitoring", runs)?)
        } else {
            None
        };
        let slowdown = |t: f64| format!("{:.0}ms x{:.2}", t * 1e3, t / bare);
        let (ns_probed, ns_empty) = (median(probed), median(empties));
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let prog = match (prog_ns.is_empty(), empty_prog_ns.is_empty()) {
            (false, false) => format!("{:.0}/{:.0}", median(prog_ns), median(empty_prog_ns)),
            _ => "n/a".to_owned(),
        };
        let usage = usage.context("pyprobe usage")?;
        println!(
            "{:<44} {:>6.0}ms {:>15} {:>15} {:>15} {:>15} {:>8.0} {:>6.0} {:>13} {:>11} {:>9.0}ms/{}MB",
            python.display(),
            bare * 1e3,
            slowdown(bare + ns_probed * BENCH_CALLS / 1e9),
            slowdown(bare + ns_empty * BENCH_CALLS / 1e9),
            slowdown(traced),
            monitored
                .map(slowdown)
                .unwrap_or_else(|| "n/a (<3.12)".into()),
            ns_probed,
            ns_empty,
            format!("{:.2} ({lo:.2}-{hi:.2})", median(ratios)),
            prog,
            usage.cpu_ms,
            usage.max_rss_kb / 1024,
        );
    }
    println!(
        "ns/call: extra time per Python call over bare (median of rounds); ratio: pyprobe's ns/call over the empty \
         program's within each round, median (and range) of rounds (goal: at most 1.2); prog ns: in-kernel run time \
         per run of pyprobe's program / of the empty one (bpf_stats, includes the stats' own clock reads)"
    );
    Ok(())
}
