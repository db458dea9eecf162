//! `pyprobe calls` against cProfile: for the same deterministic workload,
//! run once under cProfile in a separate process and once in a process
//! pyprobe watches, every function's count must equal cProfile's `ncalls`.
//!
//! Needs root (run through `cargo xtask test`).

use std::{collections::BTreeMap, process::Command, thread, time::Duration};

use anyhow::{Context, bail, ensure};
use pyprobe_tests::{
    Fixture, Interpreter, Origin, Probe, final_calls_report, fixture_path, for_each_interpreter,
    marks,
};
use serde_json::Value;

/// cProfile's `[first_line, co_name, ncalls]` rows for the fixture's
/// functions, from a separate run.
fn cprofile_counts(interp: &Interpreter) -> anyhow::Result<BTreeMap<i64, (String, u64)>> {
    let out = Command::new(&interp.path)
        .arg(fixture_path("calls_workload.py"))
        .arg("--profile")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .context("running the workload under cProfile")?;
    ensure!(
        out.status.success(),
        "cProfile run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(i64, String, u64)> = serde_json::from_slice(&out.stdout)?;
    Ok(rows.into_iter().map(|(l, n, c)| (l, (n, c))).collect())
}

/// Counts of the fixture's functions in pyprobe's final JSON report:
/// first line -> (qualified name, calls, starts, resumes).
type Counted = BTreeMap<i64, (String, u64, u64, u64)>;

/// Watches one "run" of `fixture` with `pyprobe calls --json`; returns the
/// final report and pyprobe's start-up lines.
fn watch_one_run(fixture: &mut Fixture) -> anyhow::Result<(Value, String)> {
    let pid = fixture.pid().to_string();
    let probe = Probe::start(&["calls", "--json", "--interval", "0.3", "--pid", &pid])?;
    let startup = probe.startup();
    fixture.call("run", "done")?;
    thread::sleep(Duration::from_millis(400));
    probe.interrupt();
    let (ok, stdout, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe failed: {stderr}");
    Ok((final_calls_report(&stdout)?, startup))
}

/// Watches one "run" of a fixture that answers with one JSON line of its
/// own (then "done") with `pyprobe calls --json` plus `extra`; checks that
/// nothing was lost. Returns the final report, the fixture's JSON and
/// pyprobe's start-up lines.
fn watch_measured_run(
    fixture: &mut Fixture,
    extra: &[&str],
) -> anyhow::Result<(Value, Value, String)> {
    let pid = fixture.pid().to_string();
    let mut args = vec!["calls", "--json", "--interval", "0.3", "--pid", &pid];
    args.extend_from_slice(extra);
    let probe = Probe::start(&args)?;
    let startup = probe.startup();
    fixture.send("run")?;
    let measured: Value = serde_json::from_str(&fixture.expect("{")?)?;
    fixture.expect("done")?;
    thread::sleep(Duration::from_millis(400));
    probe.interrupt();
    let (ok, stdout, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe failed: {stderr}");
    let report = final_calls_report(&stdout)?;
    for (field, lost) in report["lost"].as_object().context("lost")? {
        ensure!(*lost == 0, "lost {field}: {}", report["lost"]);
    }
    Ok((report, measured, startup))
}

fn fixture_rows(report: &Value, pid: u32) -> anyhow::Result<Counted> {
    let mut counted = Counted::new();
    for row in report["rows"].as_array().context("rows")? {
        if row["pid"] != pid
            || !row["file"]
                .as_str()
                .unwrap_or("")
                .ends_with("fixtures/calls_workload.py")
        {
            continue;
        }
        let line = row["line"].as_i64().context("line")?;
        let get = |k: &str| row[k].as_u64().with_context(|| format!("{k} in {row}"));
        let previous = counted.insert(
            line,
            (
                row["function"].as_str().unwrap_or("").to_owned(),
                get("calls")?,
                get("starts")?,
                get("resumes")?,
            ),
        );
        ensure!(previous.is_none(), "two rows for line {line}: {report}");
    }
    Ok(counted)
}

#[test]
fn calls_equal_cprofile_ncalls() {
    for_each_interpreter("calls_equal_cprofile_ncalls", |interp| {
        let expected = cprofile_counts(interp)?;
        ensure!(
            expected.get(&27).map(|(n, c)| (n.as_str(), *c)) == Some(("fib", 2073)),
            "the cProfile reference itself is off: {expected:?}"
        );
        let mut fixture = Fixture::start(interp, "calls_workload.py", &[])?;
        let (report, startup) = watch_one_run(&mut fixture)?;
        let lost = &report["lost"];
        for (field, n) in lost.as_object().context("lost")? {
            ensure!(*n == 0, "lost {field}: {lost}");
        }
        // From 3.11 the frame is read from the register the eval loop
        // keeps it in, found from the code (the sampled check against the
        // thread state is in `lost.frame_mismatches`).
        ensure!(
            startup.contains("; frame from r") == (interp.minor() >= (3, 11)),
            "start-up: {startup}"
        );
        let counted = fixture_rows(&report, fixture.pid())?;

        let mut mismatches = Vec::new();
        for (line, (name, ncalls)) in &expected {
            match counted.get(line) {
                Some((function, calls, _, _)) if function.rsplit('.').next() == Some(name) => {
                    if calls != ncalls {
                        mismatches.push(format!(
                            "{name} (line {line}): pyprobe {calls}, cProfile {ncalls}"
                        ));
                    }
                }
                Some((function, ..)) => mismatches.push(format!(
                    "line {line}: pyprobe names it {function}, cProfile {name}"
                )),
                None => mismatches.push(format!(
                    "{name} (line {line}): pyprobe has no count, cProfile {ncalls}"
                )),
            }
        }
        for (line, (function, calls, ..)) in &counted {
            if !expected.contains_key(line) {
                mismatches.push(format!(
                    "{function} (line {line}): pyprobe {calls}, cProfile has no such function"
                ));
            }
        }
        if !mismatches.is_empty() {
            bail!("{}", mismatches.join("; "));
        }

        // Starts and resumptions apart: plain functions only start; each
        // generator object starts once and resumes at every later next().
        let split = |line: i64| counted.get(&line).map(|(_, _, s, r)| (*s, *r));
        ensure!(split(27) == Some((2073, 0)), "fib: {:?}", split(27));
        ensure!(split(64) == Some((1, 6)), "coro_work: {:?}", split(64));
        ensure!(split(60) == Some((6, 6)), "__await__: {:?}", split(60));
        let (starts, _) = split(53).context("countdown")?;
        ensure!(starts == 2, "countdown starts: {:?}", split(53));
        Ok(())
    });
}

#[test]
fn calls_all_picks_up_a_process_started_later() {
    for_each_interpreter("calls_all_picks_up_a_process_started_later", |interp| {
        let probe = Probe::start(&["calls", "--all", "--json", "--interval", "0.2"])?;
        let mut fixture = Fixture::start(interp, "calls_workload.py", &[])?;
        // Set up by pyprobe (`PID N: CPython ...`), or by the kernel when
        // another process of the same interpreter runs on the host already
        // (`PID N (an interpreter already probed; ...)`).
        let wanted = [
            format!("watching PID {}:", fixture.pid()),
            format!("watching PID {} (", fixture.pid()),
        ];
        loop {
            let line = probe
                .stderr_line(Duration::from_secs(10))
                .with_context(|| format!("pyprobe never said {:?}", wanted[0]))?;
            if wanted.iter().any(|w| line.contains(w.as_str())) {
                break;
            }
        }
        fixture.call("run", "done")?;
        thread::sleep(Duration::from_millis(300));
        probe.interrupt();
        let (ok, stdout, stderr) = probe.finish()?;
        ensure!(ok, "pyprobe failed: {stderr}");
        let counted = fixture_rows(&final_calls_report(&stdout)?, fixture.pid())?;
        let fib = counted
            .get(&27)
            .map(|(name, calls, ..)| (name.as_str(), *calls));
        ensure!(fib == Some(("fib", 2073)), "fib: {fib:?}");
        Ok(())
    });
}

#[test]
fn calls_name_counts_the_selected_process_and_never_traps_the_others() {
    for_each_interpreter(
        "calls_name_counts_the_selected_process_and_never_traps_the_others",
        |interp| {
            // The tag is an argument the fixture ignores, on its command line.
            let tag = format!("selected-by-pyprobe-test-{}", std::process::id());
            let mut chosen = Fixture::start(interp, "calls_workload.py", &[&tag])?;
            let mut other = Fixture::start(interp, "calls_workload.py", &[])?;
            let probe = Probe::start(&["calls", "--name", &tag, "--json", "--interval", "0.2"])?;
            let startup = probe.startup();
            ensure!(
                startup.contains(&format!("watching PID {}:", chosen.pid()))
                    && !startup.contains(&format!("PID {}:", other.pid())),
                "start-up: {startup}"
            );
            other.call("run", "done")?;
            chosen.call("run", "done")?;
            thread::sleep(Duration::from_millis(300));
            probe.interrupt();
            let (ok, stdout, stderr) = probe.finish()?;
            ensure!(ok, "pyprobe failed: {stderr}");
            let report = final_calls_report(&stdout)?;
            let counted = fixture_rows(&report, chosen.pid())?;
            let fib = counted
                .get(&27)
                .map(|(name, calls, ..)| (name.as_str(), *calls));
            ensure!(fib == Some(("fib", 2073)), "fib: {fib:?}");
            ensure!(
                fixture_rows(&report, other.pid())?.is_empty(),
                "rows of the unselected process: {report}"
            );
            // Its 2000-odd calls never reached the program: uprobes went on
            // the selected process alone (a probe on the whole file would
            // have counted them as calls of an unconfigured process).
            ensure!(
                report["lost"]["unconfigured"] == 0,
                "lost: {}",
                report["lost"]
            );
            Ok(())
        },
    );
}

#[test]
fn calls_name_counts_short_lived_children_from_their_fork() {
    for_each_interpreter(
        "calls_name_counts_short_lived_children_from_their_fork",
        |interp| {
            let leaf_line = marks("fork_children.py")?["leaf-def"];
            let tag = format!("forking-for-pyprobe-test-{}", std::process::id());
            let mut parent = Fixture::start(interp, "fork_children.py", &[&tag])?;
            let probe = Probe::start(&["calls", "--name", &tag, "--json", "--interval", "0.2"])?;
            let startup = probe.startup();
            ensure!(
                startup.contains(&format!("watching PID {}:", parent.pid())),
                "start-up: {startup}"
            );
            // Five children one after the other, each living a quarter of
            // a second: a look through /proc once a second sees two at
            // most, and too late. Each is set up as it is forked, before
            // its 300 calls of leaf() 0.2 s later.
            let done = parent.call("fork 5 300", "done")?;
            let children: Vec<u32> = done
                .split_whitespace()
                .skip(1)
                .map(str::parse)
                .collect::<Result<_, _>>()?;
            ensure!(children.len() == 5, "{done}");
            thread::sleep(Duration::from_millis(300));
            probe.interrupt();
            let (ok, stdout, stderr) = probe.finish()?;
            ensure!(ok, "pyprobe failed: {stderr}");
            let report = final_calls_report(&stdout)?;
            let leaf_calls = |pid: u32| -> u64 {
                report["rows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| {
                        r["pid"] == pid && r["function"] == "leaf" && r["line"] == leaf_line
                    })
                    .map(|r| r["calls"].as_u64().unwrap_or(0))
                    .sum()
            };
            let got: Vec<u64> = children.iter().map(|&pid| leaf_calls(pid)).collect();
            ensure!(
                got == [300; 5],
                "leaf() calls per child {got:?}, expected 300 each; stderr: {stderr}"
            );
            ensure!(
                leaf_calls(parent.pid()) == 0,
                "leaf() counted in the parent"
            );
            ensure!(
                stderr.contains("5 processes started while watching were counted"),
                "the report says they were picked up after their start: {stderr}"
            );
            Ok(())
        },
    );
}

#[test]
fn calls_filter_stops_counting_other_functions_in_the_kernel() {
    for_each_interpreter(
        "calls_filter_stops_counting_other_functions_in_the_kernel",
        |interp| {
            let mut fixture = Fixture::start(interp, "calls_workload.py", &[])?;
            let pid = fixture.pid().to_string();
            let probe = Probe::start(&[
                "calls",
                "--json",
                "--interval",
                "0.2",
                "--filter",
                "fib",
                // Builtins are filtered in userspace only.
                "--no-builtins",
                "--pid",
                &pid,
            ])?;
            fixture.call("run", "done")?;
            // Idle: every function of the first run gets named, and those
            // that do not match are excluded in the kernel.
            thread::sleep(Duration::from_millis(1200));
            fixture.call("run", "done")?;
            thread::sleep(Duration::from_millis(300));
            probe.interrupt();
            let (ok, stdout, stderr) = probe.finish()?;
            ensure!(ok, "pyprobe failed: {stderr}");
            let docs: Vec<Value> = stdout
                .lines()
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()?;
            let totals: Vec<u64> = docs
                .iter()
                .map(|d| d["total_calls"].as_u64().unwrap_or(0))
                .collect();
            // The idle second: several reports with the same total, that of
            // the first run.
            let after_first = totals
                .windows(3)
                .find(|w| w[0] > 0 && w[0] == w[1] && w[1] == w[2])
                .map(|w| w[0])
                .with_context(|| format!("no idle stretch in totals {totals:?}"))?;
            let report = final_calls_report(&stdout)?;
            let rows = fixture_rows(&report, fixture.pid())?;
            let only: Vec<_> = rows
                .iter()
                .map(|(line, (f, calls, ..))| (*line, f.as_str(), *calls))
                .collect();
            ensure!(only == [(27, "fib", 4146)], "rows: {only:?}");
            // Second run: only fib's 2073 calls were counted.
            let total = report["total_calls"].as_u64().context("total_calls")?;
            ensure!(
                total == after_first + 2073,
                "total after the second run {total}, after the first {after_first}: \
                 functions excluded by --filter were still counted"
            );
            Ok(())
        },
    );
}

/// Builtin counts of pyprobe's final report for `pid`: label -> calls.
fn builtin_rows(report: &Value, pid: u32) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut rows = BTreeMap::new();
    for r in report["rows"].as_array().into_iter().flatten() {
        if r["pid"] != pid || r["file"] != "<builtin>" {
            continue;
        }
        let function = r["function"].as_str().unwrap_or("").to_owned();
        let calls = r["calls"].as_u64().unwrap_or(0);
        if let Some(before) = rows.insert(function.clone(), calls) {
            bail!("{function} on two rows: {before} and {calls} calls");
        }
    }
    Ok(rows)
}

#[test]
fn calls_count_builtins() {
    for_each_interpreter("calls_count_builtins", |interp| {
        let out = Command::new(&interp.path)
            .arg(fixture_path("builtins_workload.py"))
            .arg("--profile")
            .output()?;
        ensure!(out.status.success(), "cProfile run failed");
        let cprofile: BTreeMap<String, u64> = serde_json::from_slice(&out.stdout)?;
        let mut fixture = Fixture::start(interp, "builtins_workload.py", &[])?;
        let (report, startup) = watch_one_run(&mut fixture)?;
        let counted = builtin_rows(&report, fixture.pid())?;
        let get = |label: &str| counted.get(label).copied().unwrap_or(0);
        // Calls from C go through the generic entry points; cProfile does
        // not see them. Exception: in Debian sid's builds (3.13 and 3.14
        // alike, where pyenv's 3.13 counts them) the calls map() makes do
        // not reach the entry point (cause not established; an optimizer's
        // direct call is the likely one).
        ensure!(
            get("builtins.hash") == 30,
            "hash from sorted(key=): {counted:?}"
        );
        let abs_from_map = if interp.origin == Origin::Private {
            0
        } else {
            50
        };
        ensure!(
            get("builtins.abs") == abs_from_map,
            "abs from map(): {counted:?}"
        );
        // One C function called through a bound method and through its
        // method descriptor: one row, both counted.
        ensure!(
            get("re.Pattern.match") == 30 + 20,
            "re.Pattern.match from map(): {counted:?}"
        );
        for label in ["builtins.len", "list.append"] {
            let (ours, theirs) = (get(label), cprofile[label]);
            if interp.minor() < (3, 11) {
                // Every call goes through the generic entry points: exact.
                ensure!(ours == theirs, "{label}: pyprobe {ours}, cProfile {theirs}");
            } else {
                // The specializing interpreter calls them directly once warm:
                // pyprobe sees the first calls only, and says so.
                ensure!(
                    ours >= 1 && ours < theirs,
                    "{label}: pyprobe {ours}, cProfile {theirs}"
                );
                ensure!(
                    startup.contains("makes directly"),
                    "no word about unseen builtin calls: {startup}"
                );
            }
        }
        Ok(())
    });
}

/// The fixture's functions in pyprobe's final report with `--latency`:
/// name -> row.
fn latency_rows(report: &Value, pid: u32) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut rows = BTreeMap::new();
    for row in report["rows"].as_array().context("rows")? {
        if row["pid"] == pid
            && row["file"]
                .as_str()
                .unwrap_or("")
                .ends_with("fixtures/latency_workload.py")
        {
            rows.insert(
                row["function"].as_str().unwrap_or("").to_owned(),
                row.clone(),
            );
        }
    }
    Ok(rows)
}

#[test]
fn calls_latency_times_each_call() {
    for_each_interpreter("calls_latency_times_each_call", |interp| {
        let mut fixture = Fixture::start(interp, "latency_workload.py", &[])?;
        let (report, measured, startup) = watch_measured_run(&mut fixture, &["--latency"])?;
        let timed_line = if interp.minor() >= (3, 11) {
            "frames left by an exception are not timed"
        } else {
            "timed to the return of _PyEval_EvalFrameDefault"
        };
        ensure!(startup.contains(timed_line), "start-up: {startup}");

        let rows = latency_rows(&report, fixture.pid())?;
        let row = |name: &str| {
            rows.get(name)
                .with_context(|| format!("no row {name}: {report}"))
        };
        let ns = |row: &Value, field: &str| {
            row["latency"][field]
                .as_u64()
                .with_context(|| format!("latency.{field} in {row}"))
        };

        // nap(): 20 naps of 5 ms and one of 40 ms. The fixture's own
        // timing wraps each call, so it is a little longer.
        let mut naps: Vec<u64> = measured["nap_ns"]
            .as_array()
            .context("nap_ns")?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        naps.sort_unstable();
        ensure!(naps.len() == 21, "fixture measured {naps:?}");
        let nap = row("nap")?;
        ensure!(nap["calls"] == 21 && ns(nap, "timed")? == 21, "nap: {nap}");
        let (outer_max, outer_median) = (naps[20], naps[10]);
        let max = ns(nap, "max_ns")?;
        ensure!(
            (40_000_000..=outer_max).contains(&max),
            "nap max {max} ns, fixture measured {outer_max} ns around the call"
        );
        ensure!(
            ns(nap, "p99_ns")? == max,
            "p99 of 21 calls is the longest: {nap}"
        );
        let p50 = ns(nap, "p50_ns")? as f64;
        let median = outer_median as f64;
        ensure!(
            (median * 0.93..=median * 1.0625).contains(&p50),
            "nap p50 {p50} ns vs the fixture's median {median} ns (buckets are within 6.25%)"
        );

        // quick(): 1000 tiny calls, all timed, each far below a nap.
        let quick = row("quick")?;
        ensure!(
            quick["calls"] == 1000 && ns(quick, "timed")? == 1000,
            "quick: {quick}"
        );
        ensure!(
            ns(quick, "p50_ns")? < 100_000,
            "quick is not quick: {quick}"
        );

        // steps(): each of the 5 generator steps is timed on its own; the
        // 20 ms the generator waits between two steps is in none of them.
        let steps = row("steps")?;
        ensure!(
            steps["calls"] == 5 && steps["resumes"] == 4 && ns(steps, "timed")? == 5,
            "steps: {steps}"
        );
        ensure!(
            ns(steps, "max_ns")? < 10_000_000,
            "a step took the pause: {steps}"
        );

        // fails(): 7 frames left by an exception.
        let fails = row("fails")?;
        ensure!(fails["calls"] == 7, "fails: {fails}");
        if interp.minor() >= (3, 11) {
            ensure!(fails["latency"].is_null(), "fails timed on 3.11+: {fails}");
        } else {
            ensure!(ns(fails, "timed")? == 7, "fails: {fails}");
        }

        // work(): one call, longer than all its naps together.
        let work = row("work")?;
        let naps_total: u64 = naps.iter().sum();
        ensure!(
            ns(work, "timed")? == 1
                && ns(work, "max_ns")? > naps_total
                && ns(work, "p50_ns")? == ns(work, "max_ns")?,
            "work: {work}, naps took {naps_total} ns"
        );
        Ok(())
    });
}

/// A code object freed and replaced by another at the same address: each
/// is counted under its own name. The kernel trusts a cache slot's owner
/// only while no code object of the process was freed since the slot was
/// filled; this catches a slot that outlives its owner.
#[test]
fn calls_keep_apart_code_objects_at_a_reused_address() {
    for_each_interpreter(
        "calls_keep_apart_code_objects_at_a_reused_address",
        |interp| {
            let mut fixture = Fixture::start(interp, "code_reuse.py", &[])?;
            let (report, made, _) = watch_measured_run(&mut fixture, &[])?;
            let reused = made["reused"].as_u64().context("reused")?;
            ensure!(
                reused >= 3,
                "the fixture reused an address {reused} times: {made}"
            );

            let mut counted = BTreeMap::new();
            for row in report["rows"].as_array().context("rows")? {
                // The template's `<module>` code runs once per exec() and is
                // freed at once: named when pyprobe reads it first, else
                // counted as unknown. Only the generations matter here.
                if row["pid"] == fixture.pid()
                    && row["file"] == "<code_reuse>"
                    && row["function"] != "<module>"
                {
                    let function = row["function"].as_str().unwrap_or("").to_owned();
                    counted.insert(function, (row["line"].clone(), row["calls"].clone()));
                }
            }
            let mut expected = BTreeMap::new();
            for g in made["generations"].as_array().context("generations")? {
                let name = g[0].as_str().context("name")?.to_owned();
                expected.insert(name, (g[1].clone(), g[2].clone()));
            }
            ensure!(expected.len() == 6, "fixture: {made}");
            ensure!(
                counted == expected,
                "pyprobe (name: (line, calls)) {counted:?}, fixture {expected:?}"
            );
            Ok(())
        },
    );
}
