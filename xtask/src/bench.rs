//! `cargo xtask bench`: performance goals checked by measurement, not by
//! timed tests. Everything is measured in one run on this machine, and
//! pyprobe's own CPU time and peak RSS are printed with each figure.
//!
//! - `pyprobe dump` of a 50-thread process (each thread 20 calls deep), on
//!   every interpreter: wall time per dump (goal: under 100 ms).

use std::{
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use crate::{
    setup,
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
    out
}

fn start_fixture(python: &Path, script: &str) -> anyhow::Result<KillOnDrop> {
    let mut child = Command::new(python)
        .arg(workspace_root().join("fixtures").join(script))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let child = KillOnDrop(child);
    if line.trim() != "ready" {
        bail!("{script} under {} did not start", python.display());
    }
    Ok(child)
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
        let fixture = start_fixture(&python, "threads50.py")?;
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
    Ok(())
}
