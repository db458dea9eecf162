//! Processes that come and go while pyprobe watches: pool workers replaced
//! every few tasks (fork and spawn), and a watched process that execs.
//!
//! Needs root (run through `cargo xtask test`).

use std::{collections::BTreeMap, thread, time::Duration};

use anyhow::{Context, ensure};
use pyprobe_tests::{
    Fixture, Interpreter, Origin, Probe, final_calls_report, fixture_path,
    for_each_sid_and_pyenv_ends, marks,
};
use serde_json::Value;

/// Tasks the pool runs: 60 workers of 5 tasks each.
const TASKS: u64 = 300;

/// Has the pool fixture run its 300 tasks and returns how many each
/// worker ran, by PID, as the pool's own results say.
fn run_pool(pool: &mut Fixture) -> anyhow::Result<BTreeMap<u64, u64>> {
    let done = pool.call(&format!("run {TASKS}"), "done")?;
    let mut words = done.split_whitespace().skip(1);
    ensure!(
        words.next() == Some(TASKS.to_string().as_str()),
        "the pool answered {done}"
    );
    let mut ran = BTreeMap::new();
    for worker in words.next().unwrap_or("").split(',') {
        let (pid, n) = worker
            .split_once(':')
            .with_context(|| format!("the pool answered {done}"))?;
        ran.insert(pid.parse()?, n.parse()?);
    }
    ensure!(
        ran.values().sum::<u64>() == TASKS,
        "the pool answered {done}"
    );
    Ok(ran)
}

/// Runs the pool fixture's 300 tasks under `method` while `pyprobe calls
/// --all` watches, and checks that every task call of every replacement
/// worker was counted and named.
fn pool_counted_from_first_call(interp: &Interpreter, method: &str) -> anyhow::Result<()> {
    let marks = marks("pool_churn.py")?;
    let exe = interp.path.display().to_string();
    let mut args = vec![method];
    // A wrapper-started interpreter's sys.executable cannot start alone.
    if interp.origin == Origin::Private {
        args.push(&exe);
    }
    let mut pool = Fixture::start(interp, "pool_churn.py", &args)?;
    // One report, the final one: a spawned worker alone has 30k rows.
    let probe = Probe::start(&["calls", "--all", "--json", "--interval", "600"])?;
    let ran = run_pool(&mut pool)?;
    thread::sleep(Duration::from_millis(300));
    probe.interrupt();
    let (ok, stdout, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe failed: {stderr}");
    let report = final_calls_report(&stdout)?;
    let rows = report["rows"].as_array().context("rows")?;
    let mut per_function: BTreeMap<(&str, i64), u64> = BTreeMap::new();
    let mut workers = std::collections::BTreeSet::new();
    for row in rows {
        // A spawned worker names the file by its normalized path.
        if !row["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("/fixtures/pool_churn.py"))
        {
            continue;
        }
        let name = row["function"].as_str().unwrap_or("");
        let line = row["line"].as_i64().unwrap_or(-1);
        let calls = row["calls"].as_u64().context("calls")?;
        *per_function.entry((name, line)).or_default() += calls;
        if name == "task" {
            ensure!(
                row["pid"] != pool.pid(),
                "task() ran in the pool's parent: {row}"
            );
            let pid = row["pid"].as_u64().context("pid")?;
            ensure!(
                ran.get(&pid) == Some(&calls),
                "task() counted {calls} times in PID {pid}, which ran it {:?} times",
                ran.get(&pid)
            );
            workers.insert(pid);
        }
    }
    let task = per_function.get(&("task", marks["task-def"] as i64));
    let work = per_function.get(&("work", marks["work-def"] as i64));
    ensure!(
        task == Some(&TASKS) && work == Some(&TASKS),
        "task {task:?}, work {work:?} of {TASKS} ({} workers): {per_function:?}",
        workers.len()
    );
    ensure!(
        workers.len() == ran.len(),
        "{} of {} workers counted",
        workers.len(),
        ran.len()
    );
    let unnamed: Vec<&Value> = rows
        .iter()
        .filter(|r| r["function"] == "<unknown>")
        .collect();
    // Known: a worker that lives milliseconds may end before userspace
    // reads a name the kernel could not capture (a page of its memory not
    // present yet), for code no relative ran; the row says so. Seen for 1
    // row of about 8000 (1-3 calls) in 3 of 5 suite runs; anything more is a
    // failure.
    let ended = |r: &&Value| {
        r["unknown"] == "the process ended before its names were read"
            && r["calls"].as_u64().is_some_and(|c| c <= 3)
    };
    let unnamed = if unnamed.len() <= 2 && unnamed.iter().all(ended) {
        if !unnamed.is_empty() {
            eprintln!(
                "note: {} of {} rows unnamed, their process gone before they were read: {unnamed:?}",
                unnamed.len(),
                rows.len()
            );
        }
        Vec::new()
    } else {
        unnamed
    };
    ensure!(
        unnamed.is_empty(),
        "{} of {} rows unnamed, e.g. {:?}",
        unnamed.len(),
        rows.len(),
        unnamed.iter().take(3).collect::<Vec<_>>()
    );
    let lost = &report["lost"];
    ensure!(
        lost["unconfigured"] == 0 && lost["unreadable"] == 0 && lost["process_events"] == 0,
        "lost: {lost}"
    );
    Ok(())
}

#[test]
fn calls_all_counts_every_task_of_replaced_pool_workers_under_fork_and_spawn() {
    for_each_sid_and_pyenv_ends(
        "calls_all_counts_every_task_of_replaced_pool_workers_under_fork_and_spawn",
        "60 workers started twice take 10-20 s per interpreter",
        "not run (churn: sid and two pyenv builds)",
        |interp| {
            pool_counted_from_first_call(interp, "fork").context("fork")?;
            pool_counted_from_first_call(interp, "spawn").context("spawn")
        },
    );
}

/// `calls_workload.py`'s `fib` starts at this line and is called 2073
/// times per run.
const FIB: (i64, u64) = (27, 2073);

/// The calls of `fib` counted for `pid` in a final report.
fn fib_calls(report: &Value, pid: u32) -> u64 {
    report["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["pid"] == pid && r["function"] == "fib" && r["line"] == FIB.0)
        .filter_map(|r| r["calls"].as_u64())
        .sum()
}

#[test]
fn calls_follows_a_watched_process_into_a_new_interpreter_image() {
    for_each_sid_and_pyenv_ends(
        "calls_follows_a_watched_process_into_a_new_interpreter_image",
        "exec is followed alike on every version; CI time is budgeted",
        "not run (exec: sid and two pyenv builds)",
        |interp| {
            let mut fixture = Fixture::start(interp, "exec_into.py", &[])?;
            let pid = fixture.pid();
            let probe = Probe::start(&[
                "calls",
                "--json",
                "--interval",
                "600",
                "--pid",
                &pid.to_string(),
            ])?;
            fixture.send(&format!(
                "exec {} {}",
                interp.path.display(),
                fixture_path("calls_workload.py").display()
            ))?;
            fixture.expect("ready")?;
            // pyprobe says when it has set the new image up.
            let mut said = Vec::new();
            while let Some(line) = probe.stderr_line(Duration::from_secs(5)) {
                let done = line.contains(&format!("PID {pid} exec'd: watching"));
                said.push(line);
                if done {
                    break;
                }
            }
            ensure!(
                said.iter().any(|l| l.contains("exec'd: watching")),
                "no re-attach: {said:?}"
            );
            fixture.call("run", "done")?;
            thread::sleep(Duration::from_millis(300));
            probe.interrupt();
            let (ok, stdout, stderr) = probe.finish()?;
            ensure!(ok, "pyprobe failed: {stderr}");
            let report = final_calls_report(&stdout)?;
            let fib = fib_calls(&report, pid);
            ensure!(
                fib == FIB.1,
                "fib counted {fib} times after exec, not {}",
                FIB.1
            );
            Ok(())
        },
    );
}

#[test]
fn calls_reports_and_drops_a_watched_process_that_execs_no_python() {
    for_each_sid_and_pyenv_ends(
        "calls_reports_and_drops_a_watched_process_that_execs_no_python",
        "exec is followed alike on every version; CI time is budgeted",
        "not run (exec: sid and two pyenv builds)",
        |interp| {
            let mut fixture = Fixture::start(interp, "exec_into.py", &[])?;
            let pid = fixture.pid();
            let probe = Probe::start(&["calls", "--interval", "600", "--pid", &pid.to_string()])?;
            fixture.send("exec /bin/sleep 30")?;
            // pyprobe ends by itself: its one target runs no Python now.
            let (ok, _, stderr) = probe.finish()?;
            ensure!(ok, "pyprobe failed: {stderr}");
            let dropped = format!("PID {pid} exec'd /usr/bin/sleep");
            ensure!(
                stderr
                    .lines()
                    .any(|l| l.contains(&dropped) && l.ends_with("dropped")),
                "stderr: {stderr}"
            );
            ensure!(
                stderr.contains("no target process runs Python any more"),
                "stderr: {stderr}"
            );
            Ok(())
        },
    );
}

/// `log --all` on a pool started after pyprobe whose workers are replaced
/// every 5 tasks, under `method`: each printed run is one task with the
/// values the worker held, and every run is printed. Under forkserver
/// (3.14+: the forkserver imports the main module, and the workers fork
/// from it) the forkserver is started first and the pool runs once
/// pyprobe has armed it: every worker inherits its watchpoint. (A worker
/// forked before then lives too short for the scan to find it.)
fn pool_logged(interp: &Interpreter, method: &str) -> anyhow::Result<()> {
    let marks = marks("pool_churn.py")?;
    let line = marks["task-line"];
    let exe = interp.path.display().to_string();
    let mut args = vec![method];
    // A wrapper-started interpreter's sys.executable cannot start alone.
    if interp.origin == Origin::Private {
        args.push(&exe);
    }
    let mut pool = Fixture::start(interp, "pool_churn.py", &args)?;
    let at = format!("pool_churn.py:{line}");
    let mut probe = Probe::start(&[
        "log",
        "--all",
        "--json",
        "--rate",
        "0",
        "--at",
        &at,
        "--msg",
        "i={i} id={order[\"id\"]}",
    ])?;
    if method == "forkserver" {
        let server = pool.call("server", "server")?;
        let server = server
            .split_whitespace()
            .nth(1)
            .context("no forkserver PID")?;
        probe.wait_for(&format!("(task) in PID {server}:"), Duration::from_secs(15))?;
    }
    let ran = run_pool(&mut pool)?;
    thread::sleep(Duration::from_millis(300));
    probe.interrupt();
    let (ok, stdout, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe failed: {stderr}");
    let mut seen = std::collections::BTreeSet::new();
    let mut per_worker: BTreeMap<u64, u64> = BTreeMap::new();
    for hit in stdout.lines() {
        let hit: Value = serde_json::from_str(hit).with_context(|| format!("not JSON: {hit}"))?;
        let i = hit["values"]["i"].as_i64().context("i")?;
        ensure!(
            hit["values"]["order[\"id\"]"] == 1000 + i && hit["line"] == line,
            "wrong values or line: {hit}"
        );
        ensure!(seen.insert(i), "task({i}) printed twice");
        let pid = hit["pid"].as_u64().context("pid")?;
        ensure!(
            ran.contains_key(&pid),
            "a hit in PID {pid}, not one of the pool's workers: {hit}"
        );
        *per_worker.entry(pid).or_default() += 1;
    }
    let printed = seen.len() as u64;
    ensure!(
        printed == TASKS && seen.iter().copied().eq(0..TASKS as i64),
        "{method}: {printed} of {TASKS} task runs printed; stderr: {stderr}"
    );
    ensure!(
        per_worker == ran,
        "{method}: hits per worker: {per_worker:?}; tasks the workers ran: {ran:?}"
    );
    // One summary line per origin (a forkserver and the workers it forks,
    // or a worker armed on its own): their counts add up to the lines.
    let summed: u64 = stderr
        .lines()
        .filter(|l| l.starts_with("pyprobe: log point 1 "))
        .filter_map(|l| {
            l.split(": ")
                .nth(2)?
                .split(" printed;")
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    ensure!(
        summed == printed && !stderr.contains("not watched"),
        "the summaries count {summed} printed, stdout has {printed}: {stderr}"
    );
    Ok(())
}

#[test]
fn log_all_prints_every_hit_of_replaced_fork_pool_workers() {
    for_each_sid_and_pyenv_ends(
        "log_all_prints_every_hit_of_replaced_fork_pool_workers",
        "60 forked workers take 5 s per interpreter",
        "not run (churn: sid and two pyenv builds)",
        |interp| {
            pool_logged(interp, "fork").context("fork")?;
            // 3.14 made forkserver the default start method, and its
            // forkserver imports the main module (3.8-3.13's do not:
            // their workers make their own code, as spawn's do).
            if interp.minor() >= (3, 14) {
                pool_logged(interp, "forkserver").context("forkserver")?;
            }
            Ok(())
        },
    );
}

/// `record --pid` on a Python process that execs another Python program:
/// the new image is sampled, its hot function named at its line.
fn record_after_exec(interp: &Interpreter) -> anyhow::Result<()> {
    let mut fixture = Fixture::start(interp, "exec_into.py", &[])?;
    let pid = fixture.pid();
    let hot_line = marks("profile_workload.py")?["hot-loop"];
    let out = std::env::temp_dir().join(format!(
        "pyprobe-test-{}-exec-{}.txt",
        std::process::id(),
        interp.minor().1
    ));
    let out_text = out.display().to_string();
    let probe = Probe::start(&[
        "record",
        "--pid",
        &pid.to_string(),
        "--rate",
        "499",
        "--format",
        "folded",
        "-o",
        &out_text,
    ])?;
    fixture.send(&format!(
        "exec {} {}",
        interp.path.display(),
        fixture_path("profile_workload.py").display()
    ))?;
    fixture.expect("ready")?;
    let mut said = Vec::new();
    while let Some(line) = probe.stderr_line(Duration::from_secs(5)) {
        let done = line.contains(&format!("PID {pid} exec'd: sampling"));
        said.push(line);
        if done {
            break;
        }
    }
    ensure!(
        said.iter().any(|l| l.contains("exec'd: sampling")),
        "not set up again after its exec: {said:?}"
    );
    // Three threads share one GIL: about 499 samples a second, 3 in 4
    // in hot().
    thread::sleep(Duration::from_secs(2));
    probe.interrupt();
    let (ok, _, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe failed: {stderr}");
    let text = std::fs::read_to_string(&out)?;
    let _ = std::fs::remove_file(&out);
    let at_hot = format!("/profile_workload.py:{hot_line})");
    let hot: u64 = text
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(stack, _)| {
            let last = stack.rsplit(';').next().unwrap_or("");
            last.starts_with("hot (") && last.ends_with(&at_hot)
        })
        .filter_map(|(_, n)| n.parse::<u64>().ok())
        .sum();
    ensure!(
        hot >= 499,
        "{hot} samples in hot() at line {hot_line} in 2 s after the exec; profile:\n{text}\nstderr: {stderr}"
    );
    Ok(())
}

#[test]
fn record_follows_a_watched_process_into_a_new_interpreter_image() {
    for_each_sid_and_pyenv_ends(
        "record_follows_a_watched_process_into_a_new_interpreter_image",
        "exec is followed alike on every version; CI time is budgeted",
        "not run (exec: sid and two pyenv builds)",
        record_after_exec,
    );
}

/// A shell that pyprobe passed over (not Python), then execs an
/// interpreter: it is watched from then on.
fn passed_over_then_python(interp: &Interpreter) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut shell = std::process::Command::new("sh")
        .args(["-c", "read go; exec \"$0\" \"$1\""])
        .arg(&interp.path)
        .arg(fixture_path("calls_workload.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting sh")?;
    let pid = shell.id();
    let result = (|| {
        let probe = Probe::start(&["calls", "--all", "--json", "--interval", "600"])?;
        // Passed over at the first scans, old enough not to be looked at
        // again for its youth.
        thread::sleep(Duration::from_millis(2500));
        let mut stdin = shell.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(shell.stdout.take().context("stdout")?);
        writeln!(stdin, "go")?;
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        ensure!(line.trim() == "ready", "the workload said {line:?}");
        // The next scan (every second) sets it up.
        thread::sleep(Duration::from_millis(1500));
        writeln!(stdin, "run")?;
        line.clear();
        stdout.read_line(&mut line)?;
        ensure!(line.trim() == "done", "the workload said {line:?}");
        thread::sleep(Duration::from_millis(300));
        probe.interrupt();
        let (ok, out, stderr) = probe.finish()?;
        ensure!(ok, "pyprobe failed: {stderr}");
        let fib = fib_calls(&final_calls_report(&out)?, pid);
        ensure!(
            fib == FIB.1,
            "fib counted {fib} times, not {}: {stderr}",
            FIB.1
        );
        Ok(())
    })();
    let _ = shell.kill();
    let _ = shell.wait();
    result
}

#[test]
fn calls_all_watches_a_passed_over_process_once_it_execs_python() {
    for_each_sid_and_pyenv_ends(
        "calls_all_watches_a_passed_over_process_once_it_execs_python",
        "the scan's bookkeeping is the same on every version; CI time is budgeted",
        "not run (exec into Python: sid and two pyenv builds)",
        passed_over_then_python,
    );
}
