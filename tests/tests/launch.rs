//! Launch mode: `pyprobe record|calls -- PROGRAM ARGS...` starts the
//! program held at its first Python call, traces it from there, ends when
//! it exits and exits with its status.
//!
//! Needs root (run through `cargo xtask test`).

use std::process::Command;

use anyhow::{Context, ensure};
use pyprobe_tests::{
    Interpreter, Origin, final_calls_report, fixture_path, for_each_sid_and_pyenv_ends, marks,
    pyprobe_bin,
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

/// `record --subprocesses -- PROGRAM`: the children it starts by fork and
/// by fork + exec are sampled too, each under its own process, at the line
/// they spin on, and what they ran before they were picked up is said; the
/// program's exit status is passed on.
fn family(interp: &Interpreter) -> anyhow::Result<()> {
    let lines = marks("launch_family.py")?;
    let dir = std::env::temp_dir();
    let tag = format!("pyprobe-test-{}-family", std::process::id());
    let profile = dir.join(format!("{tag}.txt"));
    let out = dir.join(format!("{tag}.json"));
    let run = Command::new(pyprobe_bin())
        .args([
            "record",
            "--subprocesses",
            "--rate",
            "499",
            "--format",
            "folded",
            "-o",
        ])
        .arg(&profile)
        .arg("--")
        .arg(&interp.path)
        .arg(fixture_path("launch_family.py"))
        .arg(&out)
        // A wrapper-started interpreter's sys.executable cannot start alone.
        .args((interp.origin == Origin::Private).then_some(&interp.path))
        .output()
        .context("running pyprobe")?;
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    ensure!(
        run.status.code() == Some(5),
        "pyprobe exited with {:?}, not the program's 5: {stderr}",
        run.status.code()
    );
    let children: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let text = std::fs::read_to_string(&profile)?;
    let _ = std::fs::remove_file(&profile);
    let _ = std::fs::remove_file(&out);
    // What the children ran before they were picked up is not sampled:
    // the summary says so with the CPU they had run, and what was
    // sampled plus what it says was not adds up to their CPU time (2 s
    // each, and the spawned one's interpreter start-up) at 499 Hz.
    let missed: u64 = stderr
        .split("2 processes started while sampling had run ")
        .nth(1)
        .and_then(|rest| rest.split("(about ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no line for the children picked up late: {stderr}"))?;
    let sampled: u64 = ["forked", "spawned"]
        .iter()
        .filter_map(|child| children[child].as_u64())
        .map(|pid| {
            let root = format!("process {pid} (");
            text.lines()
                .filter(|l| l.starts_with(&root))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    let want = 2.0 * 2.0 * 499.0;
    ensure!(
        ((sampled + missed) as f64 - want).abs() <= 0.1 * want,
        "{sampled} samples of the children and {missed} said missed, want about {want}: {stderr}"
    );
    // The kernel tells of each child as it forks: sampled from its first
    // moments (the spawned one from its exec), not from the next scan.
    ensure!(
        sampled as f64 >= 0.85 * want,
        "{sampled} samples of the children, want most of {want}: {stderr}"
    );
    let spin = "spin (/";
    let spin_line = format!("/launch_family.py:{})", lines["spin-loop"]);
    for (child, function) in [("forked", "forked_spin"), ("spawned", "spawned_spin")] {
        let pid = children[child].as_u64().context("child pid")?;
        let root = format!("process {pid} (");
        let caller = format!(";{function} (");
        let samples: u64 = text
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(stack, _)| {
                let leaf = stack.rsplit(';').next().unwrap_or("");
                stack.starts_with(&root)
                    && stack.contains(&caller)
                    && leaf.starts_with(spin)
                    && leaf.ends_with(&spin_line)
            })
            .filter_map(|(_, n)| n.parse::<u64>().ok())
            .sum();
        // 2 s of CPU at 499 Hz, picked up within a second of its start.
        ensure!(
            samples >= 100,
            "{samples} samples of the {child} child {pid} in {function} at its spin line; profile:\n{text}\nstderr: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn subprocesses_of_a_launched_program_are_followed_through_fork_and_exec() {
    for_each_sid_and_pyenv_ends(
        "subprocesses_of_a_launched_program_are_followed_through_fork_and_exec",
        "following children is the same on every version; CI time is budgeted",
        "not run (--subprocesses: sid and two pyenv builds)",
        family,
    );
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
