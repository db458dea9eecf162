//! `cargo xtask bench --only scale`: pyprobe watching 100 Python processes
//! at once under `--all`: for `calls`, `record` and `log`, the time from
//! start to ready (its "Ctrl-C to stop" or "watching every" line), the
//! time from Ctrl-C to exit, and pyprobe's CPU time and peak RSS, over a
//! 3 s watch. Set-up and detach that grew with the processes would show
//! here.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{interpreters, start_fixture, wait_usage};
use crate::util::workspace_root;

/// Python processes watched at once.
const PROCESSES: usize = 100;

/// How long each command watches before Ctrl-C.
const WATCH: Duration = Duration::from_secs(3);

/// Runs the scale bench on the newest interpreter found.
pub fn bench_scale(pyprobe: &Path) -> anyhow::Result<()> {
    let python = interpreters()
        .into_iter()
        .rfind(|p| p.to_string_lossy().contains(".pyenv"))
        .context("no pyenv interpreter to run the scale bench on")?;
    println!(
        "\n== scale: {PROCESSES} Python processes ({}), {} s watched ==",
        python.display(),
        WATCH.as_secs()
    );
    let mut fleet = Vec::new();
    for _ in 0..PROCESSES {
        fleet.push(start_fixture(&python, "idle_service.py")?);
    }
    let fixture = workspace_root().join("fixtures").join("idle_service.py");
    let at = format!("{}:13", fixture.display());
    let svg = std::env::temp_dir().join("pyprobe-bench-scale.svg");
    let pids: BTreeSet<u32> = fleet.iter().map(|(child, _)| child.0.id()).collect();
    // Each command: its arguments, its ready line, and what precedes the
    // PID in the line that says one process is set up.
    let commands: [(&str, Vec<&str>, &str, &str); 3] = [
        (
            "calls --all",
            vec!["calls", "--all", "--interval", "60"],
            "Ctrl-C to stop",
            "pyprobe: watching PID ",
        ),
        (
            "record --all",
            vec!["record", "--all", "-o", svg.to_str().context("temp path")?],
            "Ctrl-C to stop",
            "pyprobe: sampling PID ",
        ),
        (
            "log --all",
            vec!["log", "--all", "--at", &at],
            "watching every",
            " armed at ",
        ),
    ];
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9}",
        "command", "ready s", "exit s", "cpu s", "rss MB"
    );
    for (label, args, marker, set_up) in commands {
        let started = Instant::now();
        let mut child = Command::new(pyprobe)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pyprobe")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Ready counts only once every process of the fleet is set up.
        let mut seen = BTreeSet::new();
        let ready = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains(marker) => break started.elapsed(),
                Ok(line) => {
                    if let Some(pid) = set_up_pid(&line, set_up) {
                        seen.insert(pid);
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    bail!("{label}: no ready line within 60 s");
                }
            }
        };
        let missing = pids.difference(&seen).count();
        if missing != 0 {
            let _ = child.kill();
            bail!(
                "{label}: ready with {missing} of the {PROCESSES} processes not set up (no \"{}\" line)",
                set_up.trim()
            );
        }
        std::thread::sleep(WATCH);
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let stopped = Instant::now();
        let usage = wait_usage(child, started)?;
        let exit = stopped.elapsed();
        println!(
            "{label:<14} {:>9.2} {:>9.2} {:>9.2} {:>9.1}",
            ready.as_secs_f64(),
            exit.as_secs_f64(),
            usage.cpu_ms / 1000.0,
            usage.max_rss_kb as f64 / 1024.0
        );
    }
    drop(fleet);
    let _ = std::fs::remove_file(svg);
    Ok(())
}

/// The PID a set-up line names: the number after `set_up` (for a log
/// point, after "in PID " later in the line).
fn set_up_pid(line: &str, set_up: &str) -> Option<u32> {
    let (_, rest) = line.split_once(set_up)?;
    let rest = match rest.split_once("in PID ") {
        Some((_, pid)) => pid,
        None => rest,
    };
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
