//! Start-up and exit of each command, as a user waits for them: the time
//! from starting `pyprobe COMMAND` to its first output (its stacks for
//! `dump`; the line that says it is at work for the others), and, for a
//! command given `--duration 1`, how long it takes to exit once that
//! second is over; median of 5 runs, against a busy fixture (three
//! threads on CPU, as a loaded service is). Each command's peak RSS is
//! printed beside `py-spy record`'s on the same fixture.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{interpreters, percentile, start_fixture};
use crate::util::workspace_root;

/// Runs per command.
const RUNS: usize = 5;

/// One run: seconds to the first output and to exit, CPU ms, peak RSS kB.
struct Run {
    first: f64,
    exit: f64,
    cpu_ms: f64,
    rss_kb: i64,
}

/// Starts `pyprobe args`, notes when a line containing `marker` comes
/// (stdout or stderr), and waits for it to exit.
fn run_once(pyprobe: &Path, args: &[&str], marker: &str) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut child = Command::new(pyprobe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting pyprobe")?;
    let (tx, rx) = mpsc::channel();
    for stream in [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send((started.elapsed(), line));
            }
        });
    }
    drop(tx);
    let mut first = None;
    let mut seen = Vec::new();
    while let Ok((at, line)) = rx.recv_timeout(Duration::from_secs(30)) {
        if first.is_none() && line.contains(marker) {
            first = Some(at);
        }
        seen.push(line);
    }
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid pointers.
    let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let exit = started.elapsed().as_secs_f64();
    if ret != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("pyprobe {} failed: {}", args.join(" "), seen.join("\n"));
    }
    let first = first
        .with_context(|| {
            format!(
                "pyprobe {} never printed {marker:?}: {}",
                args.join(" "),
                seen.join("\n")
            )
        })?
        .as_secs_f64();
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    Ok(Run {
        first,
        exit,
        cpu_ms: tv(usage.ru_utime) + tv(usage.ru_stime),
        rss_kb: usage.ru_maxrss,
    })
}

/// Time to first output and to exit per command.
pub fn bench_startup(pyprobe: &Path) -> anyhow::Result<()> {
    // The newest pyenv build (sid's run through a wrapper that the
    // fixture helper does not start), else the newest of the others.
    let all = interpreters();
    let python = all
        .iter()
        .rfind(|p| p.to_string_lossy().contains("/.pyenv/"))
        .or(all.last())
        .cloned()
        .context("no interpreter")?;
    println!(
        "\n== start-up and exit per command: busy fixture (3 threads on CPU) under {}, median of {RUNS} runs ==",
        python.display()
    );
    let (fixture, _stdin) = start_fixture(&python, "profile_workload.py")?;
    let pid = fixture.0.id().to_string();
    let hot = std::fs::read_to_string(workspace_root().join("fixtures/profile_workload.py"))?
        .lines()
        .position(|l| l.trim_end().ends_with("# hot-loop"))
        .context("no hot-loop mark")?
        + 1;
    let at = format!("profile_workload.py:{hot}");
    let svg = std::env::temp_dir().join("pyprobe-bench-startup.svg");
    let svg = svg.to_string_lossy().into_owned();
    // (name, arguments, the line that shows it is at work, its duration).
    let commands: [(&str, Vec<&str>, &str, Option<f64>); 5] = [
        ("dump", vec!["dump", "--pid", &pid], "Thread ", None),
        (
            "calls",
            vec!["calls", "--pid", &pid, "-d", "1"],
            "Ctrl-C to stop",
            Some(1.0),
        ),
        (
            "record",
            vec!["record", "--pid", &pid, "-d", "1", "-o", &svg],
            "Ctrl-C to stop",
            Some(1.0),
        ),
        (
            "top",
            vec!["top", "--pid", &pid, "-d", "1"],
            "Ctrl-C to stop",
            Some(1.0),
        ),
        (
            "log",
            vec!["log", "--pid", &pid, "--at", &at, "--rate", "1", "-d", "1"],
            "attached to PID",
            Some(1.0),
        ),
    ];
    // py-spy's peak RSS beside, measured the same way: the goal is each
    // command's peak at most twice `py-spy record`'s.
    let py_spy = super::profile::py_spy()?;
    let raw = std::env::temp_dir().join("pyprobe-bench-startup.txt");
    let raw = raw.to_string_lossy().into_owned();
    let py_spy_peak = |args: &[&str], marker: &str| -> anyhow::Result<i64> {
        let mut peak = 0;
        for _ in 0..RUNS {
            peak = peak.max(run_once(&py_spy, args, marker)?.rss_kb);
        }
        Ok(peak)
    };
    let spy_record = py_spy_peak(
        &["record", "--pid", &pid, "-d", "1", "-f", "raw", "-o", &raw],
        "Sampling process",
    )?;
    let spy_dump = py_spy_peak(&["dump", "--pid", &pid], "Thread ")?;
    let _ = std::fs::remove_file(&raw);
    println!(
        "{:<8} {:>14} {:>16} {:>10} {:>10} {:>12}",
        "command", "first output", "exit after end", "cpu/run", "peak RSS", "/py-spy rec"
    );
    for (name, args, marker, duration) in commands {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(run_once(pyprobe, &args, marker)?);
        }
        let peak = runs.iter().map(|r| r.rss_kb).max().unwrap_or(0);
        let median = |f: &dyn Fn(&Run) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            percentile(&v, 0.5)
        };
        let first = median(&|r| r.first);
        // The duration runs from the first output on.
        let exit = duration.map(|d| median(&|r| r.exit - r.first - d));
        println!(
            "{:<8} {:>12.2} s {:>14} {:>8.0}ms {:>7} KB {:>11.2}x",
            name,
            first,
            exit.map(|e| format!("{e:.2} s"))
                .unwrap_or_else(|| "-".into()),
            median(&|r| r.cpu_ms),
            peak,
            peak as f64 / spy_record.max(1) as f64
        );
    }
    let _ = std::fs::remove_file(&svg);
    println!("py-spy record -d 1: peak RSS {spy_record} KB; py-spy dump: {spy_dump} KB");
    println!(
        "goal: first output within 1 s, exit within 0.5 s of the end, peak RSS at most 2x py-spy record's"
    );
    Ok(())
}
