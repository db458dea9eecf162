//! `pyprobe log` against `fixtures/logpoint_workload.py`, whose 12 orders
//! have known values: every printed line must be exactly the one the
//! fixture's data gives, in order, and no other.
//!
//! Needs root (run through `cargo xtask test`).

use std::{process::Command, thread, time::Duration};

use anyhow::{Context, ensure};
use pyprobe_tests::{
    Fixture, Probe, for_each_interpreter, for_each_newest_pyenv, marks, pyprobe_bin,
};
use serde_json::Value;

/// The message of an output line `time pid tid file:line message`.
fn message(line: &str) -> &str {
    line.splitn(5, ' ').nth(4).unwrap_or("")
}

/// The messages of the output lines of process `pid`, in order.
fn messages_of(stdout: &str, pid: u32) -> Vec<&str> {
    let pid = pid.to_string();
    stdout
        .lines()
        .filter(|l| l.split(' ').nth(1) == Some(pid.as_str()))
        .map(message)
        .collect()
}

/// Lets pyprobe print what it has, stops it (Ctrl-C) and checks it exited
/// cleanly; returns its stdout and the rest of its stderr.
fn stop(probe: Probe) -> anyhow::Result<(String, String)> {
    thread::sleep(Duration::from_millis(300));
    probe.interrupt();
    let (ok, stdout, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe failed: {stderr}");
    Ok((stdout, stderr))
}

/// The fixture's order `i` (see its docstring).
struct Order {
    id: u32,
    total: f64,
    user: (u32, &'static str, Option<&'static str>),
    items: usize,
    source: &'static str,
    priority: u32,
    rush: bool,
}

fn orders() -> Vec<Order> {
    let users = [
        (1, "ana", Some("pro")),
        (2, "bo", None),
        (7, "zoë", Some("free")),
    ];
    (0..12u32)
        .map(|i| {
            let id = 100 + i;
            Order {
                id,
                total: 20.5 * f64::from(i),
                user: users[(i % 3) as usize],
                items: (i % 4) as usize,
                source: if id % 2 == 0 { "web" } else { "api" },
                priority: id % 3,
                rush: i % 2 == 0,
            }
        })
        .collect()
}

/// Python's `str()` of a float with one decimal at most (the fixture's
/// totals are multiples of 0.5).
fn py_float(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// Runs `pyprobe log --pid PID args...` around one "run" of the fixture;
/// returns the messages printed (after `file:line `) and pyprobe's stderr.
fn log_one_run(fixture: &mut Fixture, args: &[&str]) -> anyhow::Result<(Vec<String>, String)> {
    let pid = fixture.pid().to_string();
    let mut all = vec!["log", "--pid", &pid];
    all.extend_from_slice(args);
    let probe = Probe::start(&all)?;
    let startup = probe.startup();
    fixture.call("run", "done")?;
    thread::sleep(Duration::from_millis(300));
    probe.interrupt();
    let (ok, stdout, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe failed: {startup}\n{stderr}");
    let messages = stdout
        .lines()
        .map(|l| {
            // time pid tid file:line message
            let mut parts = l.splitn(5, ' ');
            let (_, p, _, at) = (parts.next(), parts.next(), parts.next(), parts.next());
            ensure!(p == Some(pid.as_str()), "line of another PID: {l}");
            ensure!(
                at.is_some_and(|a| a.contains("logpoint_")),
                "no file:line in {l}"
            );
            Ok(parts.next().unwrap_or("").to_owned())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((messages, format!("{startup}\n{stderr}")))
}

#[test]
fn line_log_point_prints_exactly_the_matching_hits_with_their_values() {
    let express = marks("logpoint_workload.py").unwrap()["handle-express"];
    for_each_interpreter("logpoint_line", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let at = format!("logpoint_workload.py:{express}");
        let (messages, stderr) = log_one_run(
            &mut fixture,
            &[
                "--at",
                &at,
                "--when",
                "total > 100 and order.user.id != 2",
                "--msg",
                "id={order.id} total={total} user={user.name} plan={user.plan} \
                 src={order.meta[\"source\"]} coupon={order.meta[\"coupon\"]} rush={rush}",
            ],
        )?;
        let expected: Vec<String> = orders()
            .iter()
            .filter(|o| o.total > 100.0 && o.user.0 != 2)
            .map(|o| {
                format!(
                    "id={} total={} user={} plan={} src={} coupon=None rush={}",
                    o.id,
                    py_float(o.total),
                    o.user.1,
                    o.user.2.unwrap_or("None"),
                    o.source,
                    if o.rush { "True" } else { "False" }
                )
            })
            .collect();
        ensure!(expected.len() == 5, "model: {expected:?}");
        ensure!(
            messages == expected,
            "got {messages:#?}\nexpected {expected:#?}\nstderr: {stderr}"
        );
        // The two comparisons are tested in the kernel: the 7 other runs
        // never reach userspace.
        ensure!(
            stderr.contains("kernel tests (total > 100) and (order.user.id != 2)"),
            "{stderr}"
        );
        ensure!(
            stderr.contains("5 printed; 12 runs")
                && stderr.contains(
                    "dropped: 7 by the condition in the kernel, 0 by the condition in userspace"
                ),
            "summary: {stderr}"
        );
        Ok(())
    });
}

#[test]
fn function_log_point_sees_arguments_at_the_start() {
    for_each_interpreter("logpoint_function", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let (messages, stderr) = log_one_run(
            &mut fixture,
            &[
                "--at",
                "logpoint_workload.py:handle_order",
                "--when",
                "rush",
                "--msg",
                "order={order.id} n={len(order.items)} pri={order.meta[\"priority\"]} \
                 first={order.items[0]} last={order.items[-1]} total={total}",
            ],
        )?;
        let expected: Vec<String> = orders()
            .iter()
            .filter(|o| o.rush)
            .map(|o| {
                let item = if o.items > 0 {
                    "item"
                } else {
                    "<error: order.items[0]: not found>"
                };
                let last = if o.items > 0 {
                    "item"
                } else {
                    "<error: order.items[-1]: not found>"
                };
                // `total` is not assigned yet when the function starts.
                format!(
                    "order={} n={} pri={} first={item} last={last} total=<error: total: not set>",
                    o.id, o.items, o.priority
                )
            })
            .collect();
        ensure!(
            messages == expected,
            "got {messages:#?}\nexpected {expected:#?}\nstderr: {stderr}"
        );
        ensure!(stderr.contains("function start"), "{stderr}");
        Ok(())
    });
}

#[test]
fn a_probe_file_sets_several_log_points_beside_the_command_line_ones() {
    let express = marks("logpoint_workload.py").unwrap()["handle-express"];
    let file = std::env::temp_dir().join(format!("pyprobe-probes-{}.txt", std::process::id()));
    std::fs::write(
        &file,
        format!(
            "# a line and a function log point\n\
             at   logpoint_workload.py:{express}\n\
             when total > 100 and order.user.id != 2\n\
             msg  express id={{order.id}} user={{user.name}} # kept\n\
             \n\
             at: logpoint_workload.py:handle_order\n\
             when: rush\n\
             msg: start id={{order.id}} rush={{rush}}\n"
        ),
    )
    .unwrap();
    let path = file.to_str().unwrap().to_owned();
    for_each_interpreter("logpoint_probe_file", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let (messages, stderr) = log_one_run(
            &mut fixture,
            &[
                "--at",
                "logpoint_workload.py:never_called",
                "--probes",
                &path,
            ],
        )?;
        // Hits of both log points come in the order they ran: each rush
        // order's start, then its express line if it qualifies.
        let mut expected = Vec::new();
        for o in orders() {
            if o.rush {
                expected.push(format!("start id={} rush=True", o.id));
            }
            if o.total > 100.0 && o.user.0 != 2 {
                expected.push(format!("express id={} user={} # kept", o.id, o.user.1));
            }
        }
        ensure!(expected.len() == 11, "model: {expected:?}");
        ensure!(
            messages == expected,
            "got {messages:#?}\nexpected {expected:#?}\nstderr: {stderr}"
        );
        // The command line's log point comes first and never runs.
        ensure!(
            stderr.contains("0 printed; 0 runs")
                && stderr.contains("5 printed; 12 runs")
                && stderr.contains("6 printed; 12 runs"),
            "summary: {stderr}"
        );
        Ok(())
    });
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_condition_that_never_holds_prints_nothing() {
    let total = marks("logpoint_workload.py").unwrap()["handle-total"];
    for_each_interpreter("logpoint_never", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let at = format!("logpoint_workload.py:{total}");
        let never = "logpoint_workload.py:never_called";
        let (messages, stderr) = log_one_run(
            &mut fixture,
            &[
                "--at",
                &at,
                "--when",
                "order.id == 999",
                "--at",
                never,
                "--json",
            ],
        )?;
        ensure!(messages.is_empty(), "printed {messages:?}");
        ensure!(
            stderr.contains("0 printed; 12 runs")
                && stderr.contains("dropped: 12 by the condition in the kernel"),
            "{stderr}"
        );
        ensure!(
            stderr.contains("0 printed; 0 runs"),
            "never_called: {stderr}"
        );
        Ok(())
    });
}

#[test]
fn json_hits_carry_the_captured_values() {
    let express = marks("logpoint_workload.py").unwrap()["handle-express"];
    for_each_interpreter("logpoint_json", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let pid = fixture.pid().to_string();
        let at = format!("logpoint_workload.py:{express}");
        let probe = Probe::start(&[
            "log",
            "--pid",
            &pid,
            "--at",
            &at,
            "--when",
            "order.id == 107",
            "--msg",
            "{user.name}",
            "--json",
            "--stack",
        ])?;
        fixture.call("run", "done")?;
        let (stdout, _) = stop(probe)?;
        let lines: Vec<Value> = stdout
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .context("JSON lines")?;
        ensure!(lines.len() == 1, "{stdout}");
        let hit = &lines[0];
        ensure!(hit["message"] == "bo", "{hit}");
        ensure!(
            hit["line"] == express && hit["function"] == "handle_order",
            "{hit}"
        );
        ensure!(hit["values"]["order.id"] == 107, "{hit}");
        ensure!(hit["values"]["user.name"] == "bo", "{hit}");
        let stack: Vec<String> = hit["stack"]
            .as_array()
            .context("stack")?
            .iter()
            .map(|f| format!("{}:{}", f["function"].as_str().unwrap_or("?"), f["line"]))
            .collect();
        // Exactly the Python frames, as `dump` shows them: no 3.12
        // interpreter trampoline or other frame of CPython's own.
        let m = marks("logpoint_workload.py")?;
        let expected = [
            format!("handle_order:{express}"),
            format!("run:{}", m["run-call"]),
            format!("main:{}", m["main-run"]),
            format!("<module>:{}", m["module-main"]),
        ];
        ensure!(stack == expected, "stack {stack:?}");
        Ok(())
    });
}

#[test]
fn a_log_point_arms_after_the_import_and_again_on_the_code_of_a_reload() {
    let greet = marks("logpoint_late.py").unwrap()["late-greet"];
    for_each_interpreter("logpoint_late_import", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let pid = fixture.pid().to_string();
        let at = format!("logpoint_late.py:{greet}");
        let probe = Probe::start(&[
            "log",
            "--pid",
            &pid,
            "--at",
            &at,
            "--msg",
            "name={name} times={times}",
        ])?;
        ensure!(probe.startup().contains("waits"), "{}", probe.startup());
        // The process is scanned again every second. Lines read on the
        // way are kept.
        let mut seen = Vec::new();
        let mut armed = |probe: &Probe, what: &str| -> anyhow::Result<String> {
            for _ in 0..30 {
                if let Some(line) = probe.stderr_line(Duration::from_millis(200)) {
                    seen.push(line.clone());
                    if line.contains("armed") {
                        return Ok(line);
                    }
                }
            }
            anyhow::bail!("the log point did not arm after the {what}: {seen:?}")
        };
        fixture.call("import", "imported")?;
        armed(&probe, "import")?;
        fixture.call("late", "done")?;
        // A reload makes new code objects for the file and frees the old
        // ones: the new ones arm, the old ones' watchpoints come off. Five
        // reloads would need six debug registers (x86 has four) if they
        // did not.
        const RELOADS: usize = 5;
        for _ in 0..RELOADS {
            fixture.call("reload", "reloaded")?;
            let line = armed(&probe, "reload")?;
            ensure!(line.contains("(new code object)"), "{line}");
            fixture.call("late", "done")?;
        }
        let (stdout, stderr) = stop(probe)?;
        let messages: Vec<&str> = stdout.lines().map(message).collect();
        ensure!(
            messages == ["name=late times=3"; RELOADS + 1],
            "{stdout}\n{seen:?}\n{stderr}"
        );
        let freed = seen
            .iter()
            .map(String::as_str)
            .chain(stderr.lines())
            .filter(|l| l.contains("greet") && l.contains("was freed"))
            .count();
        ensure!(freed == RELOADS, "{seen:#?}\n{stderr}");
        ensure!(
            stderr
                .matches("(code object freed since): 1 printed; 1 runs")
                .count()
                == RELOADS,
            "summary: {stderr}"
        );
        Ok(())
    });
}

/// Runs pyprobe expecting failure within 20 s; returns its stderr.
fn fails(args: &[&str]) -> anyhow::Result<String> {
    let out = output_within(args, Duration::from_secs(20))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "pyprobe {args:?} succeeded: {stderr}"
    );
    ensure!(
        out.stdout.is_empty(),
        "printed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(stderr)
}

/// Runs pyprobe to its end, killing it (an error) if it runs longer than
/// `limit`.
fn output_within(args: &[&str], limit: Duration) -> anyhow::Result<std::process::Output> {
    let child = Command::new(pyprobe_bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            anyhow::bail!("pyprobe {args:?} still ran after {limit:?}")
        }
    }
}

#[test]
fn bad_log_points_get_clear_errors() {
    let interp_marks = marks("logpoint_workload.py").unwrap();
    for_each_interpreter("logpoint_errors", |interp| {
        let fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let pid = fixture.pid().to_string();
        // Line 1 is the docstring; the line after `class User:` is code,
        // the blank line before it is not.
        let blank = interp_marks["handle-total"] - 2;
        let at_blank = format!("logpoint_workload.py:{blank}");
        let e = fails(&["log", "--pid", &pid, "--at", &at_blank])?;
        ensure!(e.contains("no code at") && e.contains("nearby"), "{e}");
        let e = fails(&[
            "log",
            "--pid",
            &pid,
            "--at",
            "logpoint_workload.py:no_such_function",
        ])?;
        ensure!(
            e.contains("no function") && e.contains("handle_order"),
            "{e}"
        );
        let e = fails(&[
            "log",
            "--pid",
            &pid,
            "--at",
            "logpoint_workload.py:handle_order",
            "--when",
            "order.id ==",
        ])?;
        ensure!(e.contains("column 12") && e.lines().count() == 1, "{e}");
        let probes = std::env::temp_dir().join(format!("pyprobe-bad-{}.txt", fixture.pid()));
        std::fs::write(
            &probes,
            "at logpoint_workload.py:handle_order\nwhen order.id ==\n",
        )?;
        let e = fails(&["log", "--pid", &pid, "--probes", probes.to_str().unwrap()]);
        let _ = std::fs::remove_file(&probes);
        let e = e?;
        ensure!(
            e.contains(&format!("{}:2: when", probes.display()))
                && e.contains("column 12")
                && e.lines().count() == 1,
            "{e}"
        );
        let e = fails(&[
            "log",
            "--pid",
            &pid,
            "--at",
            "logpoint_workload.py:handle_order",
            "--when",
            "customer.id == 7",
        ])?;
        ensure!(
            e.contains("unknown name \"customer\"") && e.contains("order, rush"),
            "{e}"
        );
        // Five log points need five watchpoints per thread; x86 has four.
        let mut args = vec!["log", "--pid", &pid];
        let lines: Vec<String> = ["handle-total", "handle-express", "handle-return"]
            .iter()
            .map(|m| format!("logpoint_workload.py:{}", interp_marks[*m]))
            .collect();
        for l in &lines {
            args.extend(["--at", l.as_str()]);
        }
        args.extend([
            "--at",
            "logpoint_workload.py:handle_order",
            "--at",
            "logpoint_workload.py:never_called",
        ]);
        let e = fails(&args)?;
        ensure!(
            e.contains("too many line and function log points") && e.contains("4"),
            "{e}"
        );
        for line in e.lines() {
            ensure!(line.starts_with("pyprobe:"), "not one-line errors: {e}");
        }
        Ok(())
    });
}

#[test]
fn log_without_privileges_says_what_to_do() {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(pyprobe_bin())
        .args(["log", "--pid", "1", "--at", "x.py:1"])
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("root") || stderr.contains("CAP_"),
        "{stderr}"
    );
}

#[test]
fn rate_limit_and_count_are_enforced_in_the_kernel() {
    for_each_interpreter("logpoint_limits", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        // 12 runs within well under a second: a rate of 3 per second lets
        // the first 3 through.
        let (messages, stderr) = log_one_run(
            &mut fixture,
            &[
                "--at",
                "logpoint_workload.py:handle_order",
                "--msg",
                "{order.id}",
                "--rate",
                "3",
            ],
        )?;
        ensure!(messages == ["100", "101", "102"], "{messages:?}\n{stderr}");
        ensure!(
            stderr.contains("3 printed; 12 runs") && stderr.contains("9 over the rate limit (3/s)"),
            "{stderr}"
        );

        // --count 2: two lines, then pyprobe stops by itself.
        let pid = fixture.pid().to_string();
        let probe = Probe::start(&[
            "log",
            "--pid",
            &pid,
            "--at",
            "logpoint_workload.py:handle_order",
            "--msg",
            "{order.id}",
            "--count",
            "2",
        ])?;
        fixture.call("run", "done")?;
        let mut exited = false;
        for _ in 0..50 {
            if probe
                .stderr_line(Duration::from_millis(100))
                .is_some_and(|l| l.contains("log point 1"))
            {
                exited = true;
                break;
            }
        }
        ensure!(exited, "pyprobe did not stop after --count 2");
        let (ok, stdout, stderr) = probe.finish()?;
        ensure!(ok, "{stderr}");
        let ids: Vec<&str> = stdout.lines().map(message).collect();
        ensure!(ids == ["100", "101"], "{stdout}");
        Ok(())
    });
}

#[test]
fn a_function_log_point_sees_each_recursive_call_in_its_own_frame() {
    for_each_interpreter("logpoint_recursion", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let pid = fixture.pid().to_string();
        let probe = Probe::start(&[
            "log",
            "--pid",
            &pid,
            "--at",
            "logpoint_workload.py:countdown",
            "--msg",
            "n={n}",
        ])?;
        fixture.call("recurse", "done")?;
        fixture.call("recurse", "done")?;
        let (stdout, stderr) = stop(probe)?;
        let messages: Vec<&str> = stdout.lines().map(message).collect();
        // Each call's own argument: the callee's frame, never the caller's.
        let once = ["n=3", "n=2", "n=1", "n=0"];
        ensure!(messages == [once, once].concat(), "{stdout}\n{stderr}");
        Ok(())
    });
}

/// `log --all` printing the id of each order every process handles.
const LOG_ALL_ORDER_IDS: [&str; 6] = [
    "log",
    "--all",
    "--at",
    "logpoint_workload.py:handle_order",
    "--msg",
    "{order.id}",
];

#[test]
fn all_arms_in_every_process_running_the_file_including_later_ones() {
    for_each_interpreter("logpoint_all", |interp| {
        let mut first = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let probe = Probe::start(&LOG_ALL_ORDER_IDS)?;
        ensure!(
            probe
                .startup()
                .contains(&format!("attached to PID {}", first.pid())),
            "{}",
            probe.startup()
        );
        // A process started afterwards is picked up within a second or two.
        let mut second = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let wanted = format!("attached to PID {}", second.pid());
        let mut attached = false;
        let mut said = Vec::new();
        for _ in 0..40 {
            if let Some(line) = probe.stderr_line(Duration::from_millis(100)) {
                attached = line.contains(&wanted);
                said.push(line);
                if attached {
                    break;
                }
            }
        }
        ensure!(
            attached,
            "the second process (PID {}) was not picked up; pyprobe said: {said:?}",
            second.pid()
        );
        first.call("run", "done")?;
        second.call("run", "done")?;
        let (stdout, stderr) = stop(probe)?;
        for fixture in [&first, &second] {
            let pid = fixture.pid();
            let ids = messages_of(&stdout, pid);
            let expected: Vec<String> = (100..112).map(|i| i.to_string()).collect();
            ensure!(ids == expected, "PID {pid}: {ids:?}\n{stderr}");
        }
        Ok(())
    });
}

/// The line shapes of `fixtures/logpoint_shapes.py` (mark, what its first
/// instruction is), four per session: a thread has four debug registers.
const SHAPE_SESSIONS: [[&str; 4]; 2] = [
    ["shape-global", "shape-fast", "shape-call", "shape-method"],
    ["shape-attr", "shape-raise", "shape-except", "shape-while"],
];

/// Turns of the fixture's loop: the first ones run before the interpreter
/// specializes the lines (3.11+), the later ones after, and the attribute
/// line is respecialized as its two classes take turns.
const SHAPE_TURNS: u32 = 40;

#[test]
fn every_line_shape_prints_exactly_one_line_per_run() {
    let marks = marks("logpoint_shapes.py").unwrap();
    for_each_interpreter("logpoint_shapes", |interp| {
        for shapes in SHAPE_SESSIONS {
            // A fresh process per session: its lines are not specialized
            // yet when the log points arm.
            let mut fixture = Fixture::start(interp, "logpoint_shapes.py", &[])?;
            let pid = fixture.pid().to_string();
            let mut args = vec![
                "log".to_owned(),
                "--pid".to_owned(),
                pid.clone(),
                "--rate".to_owned(),
                "1000".to_owned(),
            ];
            for shape in shapes {
                args.extend([
                    "--at".to_owned(),
                    format!("logpoint_shapes.py:{}", marks[shape]),
                    "--when".to_owned(),
                    "name == \"alpha\"".to_owned(),
                    "--msg".to_owned(),
                    format!("{shape} counter={{counter}}"),
                ]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let probe = Probe::start(&args)?;
            let startup = probe.startup();
            fixture.call(&format!("run alpha {SHAPE_TURNS}"), "done")?;
            // Dropped by the condition in the kernel.
            fixture.call("run beta 3", "done")?;
            let (stdout, stderr) = stop(probe)?;
            let mut lines = 0;
            for shape in shapes {
                let got: Vec<&str> = stdout
                    .lines()
                    .map(message)
                    .filter_map(|m| m.strip_prefix(shape)?.strip_prefix(' '))
                    .collect();
                lines += got.len();
                // The loop's test runs once more than its body, and where
                // the compiler repeats it at the loop's end (3.10-3.13) the
                // watch is on the first copy, which runs once: pyprobe must
                // say so when it arms.
                let (runs, expected) = if shape != "shape-while" {
                    (SHAPE_TURNS, (0..SHAPE_TURNS).collect::<Vec<u32>>())
                } else if startup.contains(&format!(
                    "logpoint_shapes.py:{} (shapes) in PID {pid}: hardware watchpoint on 1 thread, kernel tests \
                     (name == \"alpha\"); note: the line's code is in 2 places",
                    marks[shape]
                )) {
                    (1, vec![0])
                } else {
                    (SHAPE_TURNS + 1, (0..=SHAPE_TURNS).collect())
                };
                let expected: Vec<String> =
                    expected.iter().map(|i| format!("counter={i}")).collect();
                ensure!(
                    got == expected,
                    "{shape} (line {}): got {} lines {got:?}\n{startup}\n{stderr}",
                    marks[shape],
                    got.len()
                );
                let beta = if runs == 1 { 1 } else { runs - SHAPE_TURNS + 3 };
                let summary = format!(
                    "logpoint_shapes.py:{} in PID {pid}: {runs} printed; {} runs",
                    marks[shape],
                    runs + beta
                );
                ensure!(
                    stderr.contains(&summary),
                    "{shape}: no {summary:?} in {stderr}"
                );
            }
            // One trap per run: no access of a watched byte was anything
            // but a run of its instruction.
            ensure!(
                stderr.matches("; 0 watchpoint hits were not runs").count() == shapes.len(),
                "traps that were not runs: {stderr}"
            );
            ensure!(stdout.lines().count() == lines, "{stdout}");
        }
        Ok(())
    });
}

/// `fixtures/logpoint_twins.py` loads two files named `app.py`, as a Flask
/// application beside `flask/app.py`: a path matching both is refused with
/// both named, and a longer one picks one file, whose own lines and
/// functions are the only ones suggested. A path that matches no loaded
/// file waits, naming the loaded files it may have meant, and pyprobe ends
/// with an error when it never armed. Under --all, a path that is right
/// in one process and ambiguous in another arms in the first and is said
/// once of the second.
#[test]
fn a_file_path_names_one_file_or_pyprobe_says_which_it_could_be() {
    let shop_line = marks("twins/shop/app.py").unwrap()["twin-shop"];
    for_each_interpreter("logpoint_files", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_twins.py", &[])?;
        let pid = fixture.pid().to_string();
        let dir = pyprobe_tests::fixture_path("twins").canonicalize()?;
        let shop = dir.join("shop/app.py").display().to_string();
        let framework = dir.join("framework/app.py").display().to_string();
        let both = format!(
            "app.py matches 2 loaded files: {framework}, {shop}; give more of the path (e.g. framework/app.py)"
        );
        for at in [
            format!("app.py:{shop_line}"),
            "app.py:handle".into(),
            "app.py:5000".into(),
        ] {
            let e = fails(&["log", "--pid", &pid, "--at", &at])?;
            ensure!(
                e.contains(&both) && e.lines().count() == 1,
                "--at {at}: {e}"
            );
        }
        // Under --all the same refusal, at once, not a retry every second
        // and "never armed" at the end.
        let out = output_within(
            &["log", "--all", "--at", "app.py:5000", "--duration", "10"],
            Duration::from_secs(6),
        )?;
        let e = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && e.lines().last().is_some_and(|l| l.contains(&both))
                && !e.contains("trying again")
                && !e.contains("never armed"),
            "--all --at app.py:5000: {e}"
        );
        // Suggestions from the one file: shop/app.py ends at line 6, the
        // framework's at line 20.
        let e = fails(&["log", "--pid", &pid, "--at", "shop/app.py:5000"])?;
        ensure!(
            e.trim_end()
                .ends_with("no code at shop/app.py:5000; lines with code nearby: 4, 5, 6"),
            "{e}"
        );
        let e = fails(&["log", "--pid", &pid, "--at", "twins/shop/app.py:setup"])?;
        ensure!(
            e.trim_end()
                .ends_with("no function setup in twins/shop/app.py; functions there: handle"),
            "{e}"
        );
        // The longer path arms on the application's file only.
        let at = format!("shop/app.py:{shop_line}");
        let probe = Probe::start(&["log", "--pid", &pid, "--at", &at, "--msg", "order={order}"])?;
        fixture.call("run", "done")?;
        let (stdout, stderr) = stop(probe)?;
        let messages: Vec<&str> = stdout.lines().map(message).collect();
        ensure!(
            messages == ["order=1", "order=2", "order=3"],
            "{stdout}\n{stderr}"
        );
        ensure!(
            stdout
                .lines()
                .all(|l| l.contains(&format!("{shop}:{shop_line} "))),
            "{stdout}"
        );
        // A typo: it waits, says which loaded files look like it, and ends
        // with an error saying it never armed.
        let out = output_within(
            &[
                "log",
                "--pid",
                &pid,
                "--at",
                "shopp/app.py:5",
                "--duration",
                "0.5",
            ],
            Duration::from_secs(20),
        )?;
        let e = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success() && out.stdout.is_empty(), "{e}");
        ensure!(
            e.contains(&format!(
                "log point 1 (shopp/app.py:5) waits for shopp/app.py to be imported in PID {pid}; it arms when it is \
                 (loaded now with a similar name: {framework}, {shop})"
            )),
            "{e}"
        );
        ensure!(
            e.contains(&format!(
                "log point 1 (shopp/app.py:5) never armed: shopp/app.py was not loaded in PID {pid}"
            )) && e
                .lines()
                .last()
                .is_some_and(|l| l.contains("error: log point 1 never armed")),
            "{e}"
        );
        // Armed in a process where app.py names one file, the same --at
        // is wrong in this one: said once for it, never "trying again",
        // and the other process's hits printed.
        drop(fixture);
        let mut alone = Fixture::start(interp, "logpoint_twins.py", &["shop"])?;
        // Started after: --all sets it up after the other one.
        let twins = Fixture::start(interp, "logpoint_twins.py", &[])?;
        let pid = twins.pid().to_string();
        let probe = Probe::start(&[
            "log",
            "--all",
            "--at",
            "app.py:handle",
            "--msg",
            "order={order}",
        ])?;
        alone.call("run", "done")?;
        let (stdout, stderr) = stop(probe)?;
        let messages: Vec<&str> = stdout.lines().map(message).collect();
        ensure!(
            messages == ["order=1", "order=2", "order=3"],
            "--all, one process with one app.py: {stdout}\n{stderr}"
        );
        let said = format!(
            "--at app.py:handle: not armed in PID {pid} (nor in other processes where this holds): {both}"
        );
        ensure!(
            stderr.lines().filter(|l| l.contains(&said)).count() == 1
                && !stderr.contains("trying again"),
            "--all, one process with two app.py: {stderr}"
        );
        drop(alone);
        drop(twins);
        Ok(())
    });
    // Under --all (any interpreter): one line for the log point, none per
    // process.
    let out = Command::new(pyprobe_bin())
        .args([
            "log",
            "--all",
            "--at",
            "shopp/app.py:5",
            "--duration",
            "0.5",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    let never: Vec<&str> = e.lines().filter(|l| l.contains("never armed")).collect();
    assert!(
        never
            == [
                "pyprobe: log point 1 (shopp/app.py:5) never armed: shopp/app.py was not loaded by any Python process",
                "pyprobe: error: log point 1 never armed: check the path or module name in --at (a file matches by the end of its path)"
            ],
        "{e}"
    );
}

/// A watched process that exits (a worker replaced by its server) is said
/// once to have exited, not as code freed by a reload; one that exits
/// while pyprobe sets it up (or right after) is said to have exited and the
/// others go on; pyprobe ends with exit 0 and its summary.
#[test]
fn processes_that_exit_are_said_to_have_exited() {
    for_each_interpreter("logpoint_exits", |interp| {
        let mut fixture = Fixture::start(interp, "logpoint_workload.py", &[])?;
        let pid = fixture.pid().to_string();
        // A second process, gone a moment after pyprobe attached to it:
        // while the programs load (about 1 s), or just after.
        let mut brief = Command::new(&interp.path)
            .args(["-c", "import time; time.sleep(0.3)"])
            .spawn()?;
        let brief_pid = brief.id().to_string();
        let probe = Probe::start(&[
            "log",
            "--pid",
            &pid,
            "--pid",
            &brief_pid,
            "--at",
            "logpoint_workload.py:handle_order",
            "--msg",
            "{order.id}",
            "--rate",
            "0",
        ]);
        let _ = brief.wait();
        let probe = probe?;
        let startup = probe.startup();
        fixture.call("run", "done")?;
        // Let the rescan see the brief one gone, then end the fixture.
        thread::sleep(Duration::from_millis(1200));
        fixture.send("quit")?;
        let (ok, stdout, rest) = probe.finish()?;
        let stderr = format!("{startup}\n{rest}");
        ensure!(ok, "pyprobe failed: {stderr}");
        ensure!(stdout.lines().count() == 12, "{stdout}");
        ensure!(
            stderr.contains(&format!("PID {brief_pid} exited while pyprobe set it up"))
                || stderr.contains(&format!("pyprobe: PID {brief_pid} exited\n")),
            "{stderr}"
        );
        ensure!(
            stderr.contains(&format!("pyprobe: PID {pid} exited\n"))
                && stderr.contains("every watched process exited")
                && !stderr.contains("was freed"),
            "{stderr}"
        );
        ensure!(
            stderr.contains(&format!("in PID {pid} (exited since): 12 printed; 12 runs"))
                && stderr.contains("over the rate limit (none set)"),
            "{stderr}"
        );
        ensure!(!stderr.contains("pyprobe: error"), "{stderr}");
        Ok(())
    });
}

/// Processes the scale test watches at once: more than the 64 armed code
/// objects pyprobe once had room for in the kernel.
const MANY: usize = 70;

#[test]
fn all_arms_in_many_processes_and_limits_the_rate_over_all_of_them() {
    for_each_newest_pyenv(
        "logpoint_many",
        "how many processes a log point arms in does not depend on the interpreter",
        "not run (scale: newest pyenv build)",
        |interp| {
            let mut fleet = (0..MANY)
                .map(|_| Fixture::start(interp, "logpoint_workload.py", &[]))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let args = |rate: &'static str| [&LOG_ALL_ORDER_IDS[..], &["--rate", rate]].concat();
            // No rate limit: every run of every process, exactly once.
            let mut probe = Probe::start(&args("0"))?;
            probe.wait_for("watching every", Duration::from_secs(60))?;
            for fixture in &mut fleet {
                fixture.call("run", "done")?;
            }
            let (stdout, stderr) = stop(probe)?;
            let expected: Vec<String> = (100..112).map(|i| i.to_string()).collect();
            for fixture in &fleet {
                let pid = fixture.pid();
                let ids = messages_of(&stdout, pid);
                ensure!(
                    ids == expected,
                    "PID {pid} of {MANY}: {ids:?}\n{}",
                    stderr
                        .lines()
                        .filter(|l| !l.contains("passed over"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            // --rate 5 holds for the log point, over every process: three
            // processes' 36 runs, well within a second, print 5 lines.
            let mut probe = Probe::start(&args("5"))?;
            probe.wait_for("watching every", Duration::from_secs(60))?;
            for fixture in &mut fleet[..3] {
                fixture.call("run", "done")?;
            }
            let (stdout, stderr) = stop(probe)?;
            ensure!(
                stdout.lines().count() == 5,
                "{stdout}\n{}",
                stderr
                    .lines()
                    .filter(|l| l.contains("over the rate limit") && !l.contains(" 0 runs"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            let over: u64 = stderr
                .lines()
                .filter_map(|l| {
                    let (before, _) = l.split_once(" over the rate limit")?;
                    before.rsplit(' ').next()?.parse::<u64>().ok()
                })
                .sum();
            ensure!(
                over == 31,
                "{over} runs over the rate limit, not 31:\n{stderr}"
            );
            Ok(())
        },
    );
}
