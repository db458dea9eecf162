//! `cargo xtask demo`: build pyprobe, start `fixtures/demo_app.py` (three
//! busy worker threads), watch its calls live with `pyprobe calls`, sample
//! it with `pyprobe top` and `pyprobe record` (a flamegraph in
//! `target/demo-profile.svg`), print conditional log point hits with
//! `pyprobe log`, then its stacks and locals with `pyprobe dump`; fails
//! unless the log point hit and the profile has at least 100 samples, and
//! ends with what to try next.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::{
    setup,
    util::{self, KillOnDrop, cargo, run, workspace_root},
};

fn default_python() -> PathBuf {
    // Debian's own python3 is a stripped build with libpython linked in:
    // the harder case, and the one production machines run.
    for candidate in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "python3".into()
}

/// Sets up and builds pyprobe (debug); returns the binary and the
/// target directory.
fn built() -> anyhow::Result<(PathBuf, PathBuf)> {
    setup::setup()?;
    run(cargo()?.args(["build", "-p", "pyprobe", "--bin", "pyprobe"]))?;
    let target_dir: PathBuf = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok((target_dir.join("debug").join("pyprobe"), target_dir))
}

/// Writes the man pages into `out` (default: the target directory's
/// `man`), as the built binary renders them from its command line.
pub fn man(out: Option<PathBuf>) -> anyhow::Result<()> {
    let (pyprobe, target_dir) = built()?;
    let out = out.unwrap_or_else(|| target_dir.join("man"));
    run(Command::new(&pyprobe).arg("man").arg(&out))?;
    println!("read one with: man -l {}", out.join("pyprobe.1").display());
    Ok(())
}

/// Runs the demo, with `pyprobe` if given (else one built now).
pub fn demo(
    python: Option<PathBuf>,
    duration: u64,
    pyprobe: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (pyprobe, target_dir) = match pyprobe {
        Some(path) => (path, std::env::temp_dir()),
        None => built()?,
    };

    let python = python.unwrap_or_else(default_python);
    let script = workspace_root().join("fixtures").join("demo_app.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let fixture = KillOnDrop(child);
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first)?;
    if first.trim() != "ready" {
        bail!("the demo fixture did not start: {first:?}");
    }
    let pid = fixture.0.id().to_string();
    println!(
        "\nxtask demo: fixtures/demo_app.py runs under {} as PID {pid}",
        python.display()
    );
    let line = std::fs::read_to_string(&script)?
        .lines()
        .position(|l| l.ends_with("# checkout"))
        .context("demo_app.py has no '# checkout' line")?
        + 1;
    let at = format!("demo_app.py:{line}");
    let duration = duration.to_string();
    let svg = target_dir.join("demo-profile.svg");
    let svg = svg.to_string_lossy();
    let runs: [&[&str]; 5] = [
        &[
            "calls",
            "--pid",
            &pid,
            "--duration",
            &duration,
            "--top",
            "12",
        ],
        &["top", "--pid", &pid, "--duration", "2.5", "-n", "10"],
        &["record", "--pid", &pid, "--duration", "3", "-o", &svg],
        &[
            "log",
            "--pid",
            &pid,
            "--at",
            &at,
            "--when",
            "order.quantity == 5 and total > 450",
            "--msg",
            "order {order.order_id} for {order.customer}: total={total}",
            "--count",
            "5",
            "--duration",
            "5",
        ],
        &["dump", "--pid", &pid, "--locals"],
    ];
    let mut seen = Vec::new();
    for args in runs {
        println!("\n$ pyprobe {}\n", shell_words(args));
        let mut cmd = if util::is_root() {
            Command::new(&pyprobe)
        } else {
            println!("(not root: running pyprobe through sudo)");
            let mut sudo = Command::new("sudo");
            sudo.arg(&pyprobe);
            sudo
        };
        let (status, stdout, stderr) = shown_and_kept(cmd.args(args))?;
        if !status.success() {
            bail!("pyprobe {} failed ({status})", args[0]);
        }
        seen.push((args[0], stdout, stderr));
    }
    let hits = seen
        .iter()
        .filter(|(c, _, _)| *c == "log")
        .map(|(_, out, _)| out.lines().filter(|l| l.contains(": total=")).count())
        .sum::<usize>();
    let samples = seen
        .iter()
        .filter(|(c, _, _)| *c == "record")
        .find_map(|(_, _, err)| {
            err.lines().find_map(|l| {
                l.strip_prefix("pyprobe: ")?
                    .split(" samples in ")
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
        })
        .unwrap_or(0);
    if hits == 0 || samples < 100 {
        bail!(
            "the demo showed {hits} log point hits and a profile of {samples} samples \
             (expected hits and at least 100 samples)"
        );
    }
    println!(
        "\nxtask demo: done: {hits} log point hits, a flamegraph of {samples} samples in {svg}.\n\
         Try next, on your own Python process (as root):"
    );
    for (command, what) in [
        (
            "pyprobe top --pid PID",
            "live view of the hottest functions",
        ),
        (
            "pyprobe record --pid PID -d 30 -o out.svg",
            "a flamegraph (-f speedscope, folded, pprof)",
        ),
        (
            "pyprobe calls --pid PID --latency",
            "exact calls and latency per function",
        ),
        (
            "pyprobe log --pid PID --at app.py:42 --msg 'x={x}'",
            "values when a line runs (--when COND)",
        ),
        (
            "pyprobe calls --all",
            "every Python process, containers included",
        ),
        (
            "pyprobe agent",
            "always on: /metrics, pprof, control with pyprobe ctl",
        ),
    ] {
        println!("  {command:<51} {what}");
    }
    println!("and pyprobe COMMAND --help; man pages: cargo xtask man.");
    drop(fixture);
    Ok(())
}

/// `args` as a shell would need them quoted, for display.
fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=".contains(c))
            {
                (*a).to_owned()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd`, showing its output as it comes (stdout to stdout, stderr to
/// stderr) and keeping it, to check what the demo promises.
fn shown_and_kept(cmd: &mut Command) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting pyprobe")?;
    let echo = |from: Box<dyn std::io::Read + Send>, to_stderr: bool| {
        std::thread::spawn(move || {
            let mut kept = String::new();
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                if to_stderr {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
                kept.push_str(&line);
                kept.push('\n');
            }
            kept
        })
    };
    let out = echo(Box::new(child.stdout.take().expect("piped")), false);
    let err = echo(Box::new(child.stderr.take().expect("piped")), true);
    let status = child.wait()?;
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok((status, stdout, stderr))
}
