//! `cargo xtask bench`: performance goals checked by measurement, not by
//! timed tests. Everything is measured in one run on this machine, and
//! pyprobe's own CPU time and peak RSS are printed with each figure.
//!
//! - `pyprobe dump` of a 50-thread process (each thread 20 calls deep), on
//!   every interpreter: wall time per dump (goal: under 100 ms).
//! - `pyprobe calls` on a call-heavy workload (`fixtures/call_bench.py`,
//!   fib(25)), on every interpreter: the workload's time bare, watched by
//!   pyprobe, with an empty BPF program on the same uprobes, under a
//!   `sys.settrace` call tracer and (3.12+) a `sys.monitoring` PY_START
//!   counter, as slowdown ratios; pyprobe's cost per hooked call over the
//!   empty program's (goal: at most 1.2); pyprobe's CPU time and peak RSS.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use crate::{
    python314, setup,
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

/// Interpreters to benchmark: pyenv 3.8+ and /usr/bin/python3.N.
fn interpreters() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")));
    if let Some(root) = root {
        let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir(root.join("versions"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let mut parts = name.split('.');
                let (major, minor) = (
                    parts.next()?.parse::<u32>().ok()?,
                    parts.next()?.parse::<u32>().ok()?,
                );
                (major == 3 && (8..=14).contains(&minor))
                    .then(|| (minor, e.path().join("bin").join(format!("python3.{minor}"))))
            })
            .collect();
        dirs.sort();
        out.extend(dirs.into_iter().map(|(_, p)| p));
    }
    for minor in 8..=14 {
        let p = PathBuf::from(format!("/usr/bin/python3.{minor}"));
        if p.exists() {
            out.push(p);
        }
    }
    // The private Debian sid 3.14 that setup installs.
    if let Ok(data) = setup::data_dir() {
        let p = python314::sid_dir(&data).join("bin").join("python3.14");
        if p.exists() {
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
    if line.trim() != "ready" {
        bail!("{script} under {} did not start", python.display());
    }
    Ok((child, stdin, stdout))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmarks.
pub fn bench(runs: usize) -> anyhow::Result<()> {
    setup::setup()?;
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    run(cargo()?.args(["build", "--release", "-p", "pyprobe", "--bin", "pyprobe"]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join("target"));
    let pyprobe = target_dir.join("release").join("pyprobe");

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
            let u = measure(Command::new(&pyprobe).args(["dump", "--pid", &pid]))?;
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

    bench_calls(&pyprobe, runs.min(7))?;
    Ok(())
}

/// Calls in one run of `call_bench.py` (fib(25)).
const BENCH_CALLS: f64 = 242_785.0;

/// Median seconds of `runs` runs of the call benchmark in a fixture started
/// with `mode`, optionally watched by `pyprobe calls` (extra arguments);
/// with pyprobe's usage when it watched.
fn calls_run(
    python: &Path,
    mode: &str,
    pyprobe: Option<(&Path, &[&str])>,
    runs: usize,
) -> anyhow::Result<(f64, Option<Usage>)> {
    use std::io::Write;
    let (fixture, mut stdin, mut stdout) = start_fixture_with(python, "call_bench.py", &[mode])?;
    let watcher = match pyprobe {
        Some((bin, extra)) => {
            let pid = fixture.0.id().to_string();
            let started = Instant::now();
            let mut child = Command::new(bin)
                .args(["calls", "--pid", &pid, "--interval", "3600", "--json"])
                .args(extra)
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
            Some((child, started))
        }
        None => None,
    };
    let mut times = Vec::new();
    for _ in 0..runs {
        writeln!(stdin, "go")?;
        stdin.flush()?;
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let secs: f64 = line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad answer {line:?}"))?;
        times.push(secs);
    }
    times.sort_by(f64::total_cmp);
    let usage = match watcher {
        Some((child, started)) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            Some(wait_usage(child, started)?)
        }
        None => None,
    };
    drop(fixture);
    Ok((percentile(&times, 0.5), usage))
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

fn bench_calls(pyprobe: &Path, runs: usize) -> anyhow::Result<()> {
    println!(
        "\n== pyprobe calls on fib(25) ({BENCH_CALLS} Python calls), median of {runs} runs, release build =="
    );
    println!(
        "{:<44} {:>8} {:>15} {:>15} {:>15} {:>15} {:>9} {:>9} {:>7} {:>16}",
        "interpreter",
        "bare",
        "pyprobe",
        "empty BPF",
        "settrace",
        "monitoring",
        "ns/call",
        "empty",
        "ratio",
        "pyprobe cpu/rss"
    );
    for python in interpreters() {
        let (bare, _) = calls_run(&python, "bare", None, runs)?;
        let (probed, usage) = calls_run(&python, "bare", Some((pyprobe, &[])), runs)?;
        let (empty, _) = calls_run(
            &python,
            "bare",
            Some((pyprobe, &["--bench-empty-program"])),
            runs,
        )?;
        let (traced, _) = calls_run(&python, "settrace", None, runs)?;
        let has_monitoring = Command::new(&python)
            .args(["-c", "import sys; sys.monitoring"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let monitored = if has_monitoring {
            Some(calls_run(&python, "monitoring", None, runs)?.0)
        } else {
            None
        };
        let ratio = |t: f64| format!("{:.0}ms x{:.2}", t * 1e3, t / bare);
        let per_call = |t: f64| (t - bare) / BENCH_CALLS * 1e9;
        let usage = usage.context("pyprobe usage")?;
        println!(
            "{:<44} {:>6.0}ms {:>15} {:>15} {:>15} {:>15} {:>9.0} {:>9.0} {:>7.2} {:>9.0}ms/{}MB",
            python.display(),
            bare * 1e3,
            ratio(probed),
            ratio(empty),
            ratio(traced),
            monitored.map(ratio).unwrap_or_else(|| "n/a (<3.12)".into()),
            per_call(probed),
            per_call(empty),
            per_call(probed) / per_call(empty),
            usage.cpu_ms,
            usage.max_rss_kb / 1024,
        );
    }
    println!(
        "ns/call: extra time per Python call over bare; ratio: pyprobe's ns/call over the empty program's (goal: at most 1.2)"
    );
    Ok(())
}
