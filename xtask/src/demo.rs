//! `cargo xtask demo`: build pyprobe, start `fixtures/demo_app.py`, watch its
//! calls live with `pyprobe calls`, sample it with `pyprobe top` and
//! `pyprobe record` (a flamegraph in `target/demo-profile.svg`), then print
//! its stacks with `pyprobe dump`.

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

/// Runs the demo.
pub fn demo(python: Option<PathBuf>, duration: u64) -> anyhow::Result<()> {
    setup::setup()?;
    run(cargo()?.args(["build", "-p", "pyprobe", "--bin", "pyprobe"]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join("target"));
    let pyprobe = target_dir.join("debug").join("pyprobe");

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
    let duration = duration.to_string();
    let svg = target_dir.join("demo-profile.svg");
    let svg = svg.to_string_lossy();
    let runs: [&[&str]; 4] = [
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
        &["dump", "--pid", &pid, "--locals"],
    ];
    for args in runs {
        println!("\n$ pyprobe {}\n", args.join(" "));
        let mut cmd = if util::is_root() {
            Command::new(&pyprobe)
        } else {
            println!("(not root: running pyprobe through sudo)");
            let mut sudo = Command::new("sudo");
            sudo.arg(&pyprobe);
            sudo
        };
        run(cmd.args(args))?;
    }
    drop(fixture);
    Ok(())
}
