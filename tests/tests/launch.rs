//! Launch mode: `pyprobe record|calls -- PROGRAM ARGS...` starts the
//! program held at its first Python call, traces it from there, ends when
//! it exits and exits with its status.
//!
//! Needs root (run through `cargo xtask test`).

use std::process::Command;

use anyhow::{Context, ensure};
use pyprobe_tests::{
    Interpreter, final_calls_report, fixture_path, for_each_sid_and_pyenv_ends, marks, pyprobe_bin,
};
use serde_json::Value;

/// Runs `pyprobe ARGS -- INTERPRETER launch_workload.py OUT`; returns its
/// exit code, stdout, stderr and what the workload wrote to OUT.
fn launch(
    interp: &Interpreter,
    args: &[&str],
    tag: &str,
) -> anyhow::Result<(i32, String, String, Value)> {
    let dir = std::env::temp_dir();
    let out = dir.join(format!("pyprobe-test-{}-{tag}.json", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let run = Command::new(pyprobe_bin())
        .args(args)
        .arg("--")
        .arg(&interp.path)
        .arg(fixture_path("launch_workload.py"))
        .arg(&out)
        .output()
        .context("running pyprobe")?;
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    let spent: Value = serde_json::from_str(
        &std::fs::read_to_string(&out)
            .with_context(|| format!("the workload wrote nothing; stderr: {stderr}"))?,
    )?;
    let _ = std::fs::remove_file(&out);
    Ok((run.status.code().unwrap_or(-1), stdout, stderr, spent))
}

/// `record -- PROGRAM`: exit status passed through; hot()'s share of the
/// samples at its loop line within 5 points of the share the workload
/// timed itself.
fn recorded(interp: &Interpreter) -> anyhow::Result<()> {
    let lines = marks("launch_workload.py")?;
    let profile =
        std::env::temp_dir().join(format!("pyprobe-test-{}-launch.txt", std::process::id()));
    let profile_text = profile.display().to_string();
    let (code, _, stderr, spent) = launch(
        interp,
        &[
            "record",
            "--rate",
            "499",
            "--format",
            "folded",
            "-o",
            &profile_text,
        ],
        "record",
    )?;
    ensure!(
        code == 7,
        "pyprobe exited with {code}, not the program's 7: {stderr}"
    );
    let text = std::fs::read_to_string(&profile)?;
    let _ = std::fs::remove_file(&profile);
    let at = |function: &str, mark: &str| -> u64 {
        let leaf = format!("{function} (");
        let line = format!("/launch_workload.py:{})", lines[mark]);
        text.lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(stack, _)| {
                let last = stack.rsplit(';').next().unwrap_or("");
                last.starts_with(&leaf) && last.ends_with(&line)
            })
            .filter_map(|(_, n)| n.parse::<u64>().ok())
            .sum()
    };
    let (hot, cold) = (at("hot", "hot-loop"), at("cold", "cold-loop"));
    let timed_hot = spent["hot"].as_f64().context("hot")?;
    let timed_cold = spent["cold"].as_f64().context("cold")?;
    let want = timed_hot / (timed_hot + timed_cold);
    let got = hot as f64 / (hot + cold).max(1) as f64;
    ensure!(
        hot + cold >= 200 && (got - want).abs() <= 0.05,
        "hot's share of {} samples is {got:.3}, the workload timed {want:.3}; profile:\n{text}\nstderr: {stderr}",
        hot + cold
    );
    Ok(())
}

/// `calls -- PROGRAM`: every call from the first, exactly as the
/// workload made them.
fn counted(interp: &Interpreter) -> anyhow::Result<()> {
    let lines = marks("launch_workload.py")?;
    let (code, stdout, stderr, spent) = launch(interp, &["calls", "--json"], "calls")?;
    ensure!(
        code == 7,
        "pyprobe exited with {code}, not the program's 7: {stderr}"
    );
    let rounds = spent["rounds"].as_u64().context("rounds")?;
    let report = final_calls_report(&stdout)?;
    let calls = |function: &str, line: i64| -> u64 {
        report["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                r["function"] == function
                    && r["line"] == line
                    && r["file"]
                        .as_str()
                        .is_some_and(|f| f.ends_with("/launch_workload.py"))
            })
            .filter_map(|r| r["calls"].as_u64())
            .sum()
    };
    let got = (
        calls("hot", lines["hot-def"].into()),
        calls("cold", lines["cold-def"].into()),
        calls("<module>", 1),
    );
    ensure!(
        got == (rounds, rounds, 1),
        "hot, cold, <module> counted {got:?}, the workload made ({rounds}, {rounds}, 1): {stderr}"
    );
    Ok(())
}

#[test]
fn launched_programs_are_traced_from_their_first_call_and_pass_their_status_on() {
    for_each_sid_and_pyenv_ends(
        "launched_programs_are_traced_from_their_first_call_and_pass_their_status_on",
        "launching is the same on every version; CI time is budgeted",
        "not run (launch mode: sid and two pyenv builds)",
        |interp| {
            recorded(interp).context("record")?;
            counted(interp).context("calls")
        },
    );
}
