//! The `pyprobe` binary as a user runs it: live output, Ctrl-C, JSON, and
//! one-line errors with a non-zero exit for bad input.
//!
//! Needs root (run through `cargo xtask test`).

use std::{
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use pyprobe_tests::{Fixture, Probe, for_each_interpreter, pyprobe_bin};

/// The line of `def f(x):` in `map_calls.py`, where calls names `f`.
fn f_line() -> u64 {
    let text = std::fs::read_to_string(pyprobe_tests::fixture_path("map_calls.py")).unwrap();
    let index = text.lines().position(|l| l == "def f(x):").unwrap();
    index as u64 + 1
}

#[test]
fn calls_json_is_one_document_per_report_and_ctrl_c_prints_the_exact_total() {
    for_each_interpreter(
        "calls_json_is_one_document_per_report_and_ctrl_c_prints_the_exact_total",
        |interp| {
            let mut fixture = Fixture::start(interp, "map_calls.py", &[])?;
            let pid = fixture.pid().to_string();
            let probe = Probe::start(&["calls", "--json", "--interval", "0.2", "--pid", &pid])?;
            fixture.call("2500", "done 2500")?;
            // Let at least one interval report pass, then Ctrl-C.
            thread::sleep(Duration::from_millis(500));
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(probe.pid() as i32, libc::SIGINT) };
            let (ok, stdout, stderr) = probe.finish()?;
            ensure!(ok, "pyprobe failed: {stderr}");
            let docs: Vec<serde_json::Value> = stdout
                .lines()
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()
                .context("every stdout line is one JSON document")?;
            ensure!(
                docs.len() >= 2,
                "expected interval reports and a final one: {stdout}"
            );
            let last = docs.last().unwrap();
            ensure!(
                last["kind"] == "final",
                "last document is not final: {last}"
            );
            ensure!(
                docs[..docs.len() - 1]
                    .iter()
                    .all(|d| d["kind"] == "interval"),
                "{stdout}"
            );
            // f, called 2500 times from C (map), and no other Python
            // function (the rest are the builtins that read and write the
            // fixture's pipes).
            let rows: Vec<&serde_json::Value> = last["rows"]
                .as_array()
                .context("rows")?
                .iter()
                .filter(|r| r["file"] != "<builtin>")
                .collect();
            ensure!(rows.len() == 1, "{last}");
            let row = rows[0];
            ensure!(
                row["pid"] == fixture.pid()
                    && row["function"] == "f"
                    && row["line"] == f_line()
                    && row["calls"] == 2500,
                "{row}"
            );
            let lost = last["lost"].as_object().context("lost")?;
            ensure!(lost.values().all(|v| v == 0), "{last}");
            Ok(())
        },
    );
}

#[test]
fn calls_table_stops_when_the_target_exits() {
    let found = pyprobe_tests::discover();
    let interp = &found.supported[0];
    let mut fixture = Fixture::start(interp, "map_calls.py", &[]).unwrap();
    let pid = fixture.pid().to_string();
    let probe = Probe::start(&["calls", "--interval", "0.2", "--pid", &pid]).unwrap();
    fixture.call("321", "done 321").unwrap();
    fixture.send("quit").unwrap();
    let (ok, stdout, stderr) = probe.finish().unwrap();
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("every target process has exited"),
        "{stderr}"
    );
    let final_part = stdout.split("final totals").nth(1).expect(&stdout);
    let row = final_part
        .lines()
        .find(|l| l.contains(" f "))
        .expect(final_part);
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(
        cells[1..],
        [
            "321",
            "0",
            "f",
            &format!(
                "{}:{}",
                pyprobe_tests::fixture_path("map_calls.py").display(),
                f_line()
            ),
            &pid,
        ],
        "{row}"
    );
}

/// Runs pyprobe with `args`; returns (exit code, stderr).
fn run_pyprobe(args: &[&str], as_nobody: bool) -> (i32, String) {
    let mut cmd = Command::new(pyprobe_bin());
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    if as_nobody {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().expect("run pyprobe");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(
    args: &[&str],
    as_nobody: bool,
    code: i32,
    needle: &str,
) -> anyhow::Result<()> {
    let (status, stderr) = run_pyprobe(args, as_nobody);
    if status != code {
        bail!("pyprobe {args:?}: exit {status}, expected {code}; stderr: {stderr}");
    }
    ensure!(stderr.lines().count() == 1, "not one line: {stderr:?}");
    ensure!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    Ok(())
}

#[test]
fn bad_input_gets_one_line_errors_and_nonzero_exit() {
    assert_one_line_error(
        &["calls", "--pid", "99999999"],
        false,
        1,
        "no process with PID 99999999",
    )
    .unwrap();

    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let result = assert_one_line_error(
        &["calls", "--pid", &pid],
        false,
        1,
        "is not a Python process",
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    result.unwrap();

    // Without privileges: refused before touching the kernel, saying what to do.
    let found = pyprobe_tests::discover();
    let fixture = Fixture::start(&found.supported[0], "map_calls.py", &[]).unwrap();
    let pid = fixture.pid().to_string();
    let (status, stderr) = run_pyprobe(&["calls", "--pid", &pid], true);
    assert_eq!(status, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("run pyprobe as root") || stderr.contains("run it with sudo"),
        "{stderr}"
    );

    // A container id that matches nothing is said at once (pyprobe then
    // waits for one, as for a process started later).
    for command in ["top", "calls"] {
        let (status, stderr) = run_pyprobe(
            &[command, "--container", "0123456789abcdef", "-d", "0.5"],
            false,
        );
        assert_eq!(status, 0, "{stderr}");
        assert_eq!(
            stderr
                .lines()
                .filter(|l| l.contains(
                    "no process runs in a container whose id starts with '0123456789abcdef' now"
                ))
                .count(),
            1,
            "{command}: {stderr}"
        );
    }

    // Usage errors are clap's: exit code 2.
    let (status, stderr) = run_pyprobe(&["calls", "--pid", "1", "--interval", "0"], false);
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("--interval"), "{stderr}");
    for rate in ["0", "20001"] {
        let (status, stderr) = run_pyprobe(&["record", "--pid", "1", "--rate", rate], false);
        assert_eq!(status, 2, "{stderr}");
        assert!(stderr.contains("--rate"), "{stderr}");
    }

    // The sampler checks its targets the same way, and leaves no file.
    let out = std::env::temp_dir().join("pyprobe-cli-test-none.svg");
    let _ = std::fs::remove_file(&out);
    let out_arg = out.to_str().unwrap();
    assert_one_line_error(
        &["record", "--pid", "99999999", "-o", out_arg],
        false,
        1,
        "no process with PID 99999999",
    )
    .unwrap();
    assert!(!out.exists(), "a failed record left {out:?}");
    assert_one_line_error(
        &["top", "--pid", "99999999"],
        false,
        1,
        "no process with PID 99999999",
    )
    .unwrap();
    let (status, stderr) = run_pyprobe(&["record", "--pid", &pid, "-o", out_arg], true);
    assert_eq!(status, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("run pyprobe as root") || stderr.contains("run it with sudo"),
        "{stderr}"
    );
}

/// A PID that is no Python process to trace is named for what it is, in
/// one line with exit 1, and `--all` passes such processes by quietly.
#[test]
fn untraceable_pids_are_named_for_what_they_are() {
    // A kernel thread: kthreadd is PID 2.
    let comm = std::fs::read_to_string("/proc/2/comm").unwrap_or_default();
    assert_eq!(comm.trim(), "kthreadd", "PID 2 is not kthreadd here");
    for command in ["dump", "calls", "log"] {
        let mut args = vec![command, "--pid", "2"];
        if command == "log" {
            args.extend(["--at", "app.py:1"]);
        }
        assert_one_line_error(&args, false, 1, "PID 2 (kthreadd) is a kernel thread").unwrap();
    }

    // A zombie: a child that exited and was not collected.
    let mut child = Command::new("true").spawn().unwrap();
    let zombie = child.id();
    for _ in 0..100 {
        let stat = std::fs::read_to_string(format!("/proc/{zombie}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let result = assert_one_line_error(
        &["dump", "--pid", &zombie.to_string()],
        false,
        1,
        &format!("PID {zombie} has exited"),
    );
    let _ = child.wait();
    result.unwrap();

    // CPython 2.7, when the machine has one.
    let found = pyprobe_tests::discover();
    match found.unsupported.iter().find(|i| i.version.0 == 2) {
        Some(py2) => {
            let mut old = Command::new(&py2.path)
                .args(["-c", "import sys; sys.stdin.read()"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            thread::sleep(Duration::from_millis(300));
            let result = assert_one_line_error(
                &["dump", "--pid", &old.id().to_string()],
                false,
                1,
                &format!(
                    "PID {} runs CPython {}.{}, which is not supported (3.8-3.15)",
                    old.id(),
                    py2.version.0,
                    py2.version.1
                ),
            );
            let _ = old.kill();
            let _ = old.wait();
            result.unwrap();
        }
        None => eprintln!("untraceable_pids: NOT checked: no CPython 2 on this machine"),
    }

    // --all: nothing said about processes that are not Python (PID 1, the
    // kernel threads), however unreadable.
    let (status, stderr) = run_pyprobe(
        &["record", "--all", "--duration", "0.3", "-o", "/dev/null"],
        false,
    );
    assert_eq!(status, 0, "{stderr}");
    assert!(
        !stderr.contains("not sampling"),
        "non-Python processes reported: {stderr}"
    );
    // Written to, not replaced: /dev/null stays the null device.
    use std::os::unix::fs::FileTypeExt;
    let null = std::fs::metadata("/dev/null").expect("/dev/null");
    assert!(
        null.file_type().is_char_device(),
        "record -o /dev/null replaced the null device with a file"
    );
}

/// Ctrl-C as soon as a command says it attached stops it cleanly, with its
/// summary and exit 0 (a signal that came before the command listened for
/// it used to kill it, or be lost).
#[test]
fn ctrl_c_right_after_attaching_stops_cleanly() {
    let found = pyprobe_tests::discover();
    let interp = found.supported.last().expect("an interpreter");
    let fixture = Fixture::start(interp, "logpoint_workload.py", &[]).unwrap();
    let pid = fixture.pid().to_string();
    let out = std::env::temp_dir().join(format!("pyprobe-ctrlc-{}.txt", std::process::id()));
    let out = out.to_str().unwrap();
    let commands: [(&[&str], &str); 3] = [
        (
            &[
                "log",
                "--pid",
                &pid,
                "--at",
                "logpoint_workload.py:handle_order",
            ],
            "log point 1",
        ),
        (&["calls", "--pid", &pid], "final totals"),
        (
            &["record", "--pid", &pid, "-f", "folded", "-o", out],
            "samples in",
        ),
    ];
    for (args, summary) in commands {
        for _ in 0..3 {
            let probe = Probe::start(args).unwrap();
            probe.interrupt();
            let (ok, stdout, stderr) = probe.finish().unwrap();
            assert!(ok, "{args:?} did not exit cleanly: {stderr}");
            assert!(
                stderr.contains(summary) || stdout.contains(summary),
                "{args:?}: no summary: {stdout}\n{stderr}"
            );
        }
    }
    let _ = std::fs::remove_file(out);
}
