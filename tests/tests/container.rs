//! Processes in containers, traced from the host: `fixtures/container_app.py`
//! in a container-like root (Debian sid's `/usr`, the fixtures at `/app`)
//! entered by chroot inside new mount and PID namespaces and placed in a
//! Docker-style cgroup; in a mount namespace alone (pivot_root); and in a
//! PID namespace alone. Every command must name the container's files as
//! the process sees them, the host's thread ids (with the namespace's), and
//! count, sample and log exactly as for any other process.
//!
//! Needs root (run through `cargo xtask test`).

use std::{collections::BTreeMap, path::PathBuf, process::Command, thread, time::Duration};

use anyhow::{Context, ensure};
use pyprobe_tests::{
    Fixture, Interpreter, Isolation, Origin, Probe, for_each_container_interpreter, marks,
    pyprobe_bin,
};
use serde_json::Value;

const APP: &str = "container_app.py";

/// The fixture's path as its process sees it.
fn app_path(isolation: Isolation) -> String {
    if isolation.has_own_root() {
        format!("/app/{APP}")
    } else {
        // Python makes the script's path absolute, `..` included.
        pyprobe_tests::fixture_path(APP)
            .to_string_lossy()
            .into_owned()
    }
}

/// Whether a file name printed by pyprobe is the fixture's, as the process
/// sees it.
fn is_app(file: &str, isolation: Isolation) -> bool {
    if isolation.has_own_root() {
        file == app_path(isolation)
    } else {
        file.ends_with(&format!("fixtures/{APP}")) && !file.starts_with("/app/")
    }
}

/// The id a host thread has in its process's PID namespace.
fn namespace_tid(pid: u32, tid: u32) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|ids| ids.split_whitespace().last()?.parse().ok())
        .context("no NSpid")
}

/// Runs a pyprobe command to its end; returns (stdout, stderr).
fn run(args: &[&str]) -> anyhow::Result<(String, String)> {
    let out = Command::new(pyprobe_bin())
        .args(args)
        .output()
        .context("running pyprobe")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "pyprobe {args:?} failed: {stderr}");
    Ok((stdout, stderr))
}

/// `dump`: the container's paths, the host's thread ids with the
/// namespace's, and the container id.
fn check_dump(fixture: &Fixture, interp: &Interpreter, isolation: Isolation) -> anyhow::Result<()> {
    let pid = fixture.pid();
    let spin_call = marks(APP)?["spin-call"];
    let (json, _) = run(&["dump", "--pid", &pid.to_string(), "--json"])?;
    let dump: Value = serde_json::from_str(&json)?;
    if isolation.has_own_root() && interp.origin == Origin::Private {
        let binary = format!("/usr/bin/python{}.{}", interp.version.0, interp.version.1);
        ensure!(
            dump["interpreter"] == binary.as_str(),
            "interpreter: {}",
            dump["interpreter"]
        );
    }
    let threads = dump["threads"].as_array().context("threads")?;
    ensure!(threads.len() == 2, "{} threads: {dump}", threads.len());
    let has_spin = |t: &&Value| {
        t["frames"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["function"] == "spin"))
    };
    let spinner = threads
        .iter()
        .find(has_spin)
        .with_context(|| format!("no thread runs spin(): {dump}"))?;
    let frames = spinner["frames"].as_array().context("frames")?;
    let spin = frames
        .iter()
        .find(|f| f["function"] == "spin")
        .context("spin frame")?;
    ensure!(
        is_app(spin["filename"].as_str().unwrap_or(""), isolation) && spin["line"] == spin_call,
        "spin frame: {spin} (expected {}:{spin_call})",
        app_path(isolation)
    );
    let tid = spinner["native_id"].as_u64().context("native_id")? as u32;
    ensure!(
        std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists(),
        "thread id {tid} is not a host thread of PID {pid}"
    );
    if isolation.has_own_pids() {
        let ns = namespace_tid(pid, tid)?;
        ensure!(ns != tid, "the namespace id equals the host's: {tid}");
        ensure!(spinner["namespace_id"] == ns, "namespace_id: {spinner}");
    } else {
        ensure!(
            spinner.get("namespace_id").is_none(),
            "namespace_id: {spinner}"
        );
    }
    match fixture.container_id() {
        Some(id) => {
            ensure!(
                dump["container"]["runtime"] == "docker" && dump["container"]["id"] == id,
                "container: {} (expected docker {id})",
                dump["container"]
            );
            ensure!(
                dump["cgroup"] == format!("/system.slice/docker-{id}.scope").as_str(),
                "cgroup: {}",
                dump["cgroup"]
            );
            let (text, _) = run(&["dump", "--pid", &pid.to_string()])?;
            ensure!(
                text.contains(&format!("Container: docker {}\n", &id[..12])),
                "text dump: {text}"
            );
        }
        None => ensure!(
            dump.get("container").is_none(),
            "container: {}",
            dump["container"]
        ),
    }
    Ok(())
}

/// `record`: the spinning thread's samples land in `crunch` at its loop
/// line, under a thread label with both ids.
fn check_record(fixture: &Fixture, isolation: Isolation) -> anyhow::Result<()> {
    let pid = fixture.pid();
    let loop_line = marks(APP)?["crunch-loop"];
    let path: PathBuf = std::env::temp_dir().join(format!(
        "pyprobe-container-{}-{pid}.folded",
        std::process::id()
    ));
    let (_, stderr) = run(&[
        "record",
        "--pid",
        &pid.to_string(),
        "--duration",
        "1.5",
        "--threads",
        "-f",
        "folded",
        "-o",
        path.to_str().unwrap(),
    ])?;
    let text = std::fs::read_to_string(&path)?;
    let _ = std::fs::remove_file(&path);
    let mut total = 0;
    let mut in_crunch = 0;
    let mut labels = BTreeMap::new();
    for line in text.lines() {
        let (stack, count) = line.rsplit_once(' ').context("no count")?;
        let count: u64 = count.parse()?;
        total += count;
        let frames: Vec<&str> = stack.split(';').collect();
        let leaf = frames.last().copied().unwrap_or("");
        if leaf == format!("crunch ({}:{loop_line})", app_path(isolation)) {
            in_crunch += count;
            *labels.entry(frames[0].to_owned()).or_insert(0) += count;
        }
    }
    ensure!(
        total >= 50 && in_crunch * 10 >= total * 9,
        "{in_crunch} of {total} samples in crunch at line {loop_line}: {text}\n{stderr}"
    );
    // One thread spins (the one that is not the main thread): its label
    // carries the host id, and the namespace's where it differs.
    let tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&t| t != pid)
        .collect();
    ensure!(tids.len() == 1, "threads besides the main one: {tids:?}");
    let tid = tids[0];
    let id = if isolation.has_own_pids() {
        format!("{tid}(ns:{})", namespace_tid(pid, tid)?)
    } else {
        tid.to_string()
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))?;
    let expected = format!("thread {id} ({})", comm.trim());
    ensure!(
        labels.len() == 1 && labels.contains_key(&expected),
        "thread labels {labels:?}, expected {expected}"
    );
    Ok(())
}

/// `calls`: a window of 40 orders counts handle() 40 times exactly. The
/// container is selected by `--container` and an id prefix, the others by
/// PID.
fn check_calls(fixture: &mut Fixture, isolation: Isolation) -> anyhow::Result<()> {
    let pid = fixture.pid().to_string();
    let select = match fixture.container_id() {
        Some(id) => ["--container", &id[..12]],
        None => ["--pid", pid.as_str()],
    };
    let mut args = vec!["calls", "--json", "--interval", "0.3"];
    args.extend(select);
    let probe = Probe::start(&args)?;
    fixture.call("run 40", "done")?;
    thread::sleep(Duration::from_millis(400));
    probe.interrupt();
    let (ok, stdout, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe calls failed: {stderr}");
    let last: Value = serde_json::from_str(stdout.lines().last().context("no report")?)?;
    ensure!(last["kind"] == "final", "not final: {last}");
    // By first line (up to 3.10 both constructors are named `__init__`).
    let mut counted = BTreeMap::new();
    for row in last["rows"].as_array().context("rows")? {
        if is_app(row["file"].as_str().unwrap_or(""), isolation) {
            let name = row["function"].as_str().unwrap_or("");
            let short = name.rsplit('.').next().unwrap_or(name).to_owned();
            let previous = counted.insert(
                (row["line"].as_u64().unwrap_or(0), short),
                row["calls"].as_u64().unwrap_or(0),
            );
            ensure!(previous.is_none(), "two rows for {name}: {last}");
        }
    }
    let defs = marks(APP)?;
    if let Some(id) = fixture.container_id() {
        ensure!(
            last["containers"][&pid]["id"] == id,
            "containers: {}",
            last["containers"]
        );
    }
    for (function, mark) in [
        ("handle", "handle-def"),
        ("__init__", "order-init"),
        ("__init__", "user-init"),
    ] {
        let key = (u64::from(defs[mark]), function.to_owned());
        ensure!(
            counted.get(&key) == Some(&40),
            "{function} (line {}): {:?} calls, expected 40 (rows of the app: {counted:?})",
            key.0,
            counted.get(&key)
        );
    }
    Ok(())
}

/// `log`: a conditional line log point prints exactly the orders of user 1,
/// with the host's thread id (and the namespace's) and the container's
/// path.
fn check_log(fixture: &mut Fixture, isolation: Isolation) -> anyhow::Result<()> {
    let pid = fixture.pid();
    let line = marks(APP)?["handle-line"];
    let at = format!("{APP}:{line}");
    let pid_text = pid.to_string();
    let probe = Probe::start(&[
        "log",
        "--pid",
        &pid_text,
        "--at",
        &at,
        "--when",
        "user.id == 1",
        "--msg",
        "order={order.id}",
    ])?;
    fixture.call("run 12", "done")?;
    thread::sleep(Duration::from_millis(300));
    probe.interrupt();
    let (ok, stdout, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe log failed: {stderr}");
    let main_tid = pid;
    let tid = if isolation.has_own_pids() {
        format!("{main_tid}(ns:{})", namespace_tid(pid, main_tid)?)
    } else {
        main_tid.to_string()
    };
    let expected: Vec<String> = [1001, 1004, 1007, 1010]
        .iter()
        .map(|id| format!("{pid} {tid} {}:{line} order={id}", app_path(isolation)))
        .collect();
    let got: Vec<String> = stdout
        .lines()
        .map(|l| l.split_once(' ').map_or("", |(_, rest)| rest).to_owned())
        .collect();
    ensure!(
        got == expected,
        "printed:\n{stdout}\nexpected (after the time):\n{}",
        expected.join("\n")
    );
    Ok(())
}

/// Every command on the fixture under one isolation.
fn every_command(interp: &Interpreter, isolation: Isolation) -> anyhow::Result<()> {
    let mut fixture = Fixture::start_isolated(interp, isolation, APP, &[])?;
    check_dump(&fixture, interp, isolation).context("dump")?;
    check_record(&fixture, isolation).context("record")?;
    check_calls(&mut fixture, isolation).context("calls")?;
    check_log(&mut fixture, isolation).context("log")?;
    Ok(())
}

#[test]
fn a_container_with_its_own_root_pids_and_cgroup_is_traced_from_the_host() {
    for_each_container_interpreter("container_all_namespaces", |interp| {
        every_command(interp, Isolation::Container)
    });
}

#[test]
fn a_process_in_its_own_mount_namespace_is_traced_from_the_host() {
    for_each_container_interpreter("container_mount_namespace", |interp| {
        every_command(interp, Isolation::MountNamespace)
    });
}

#[test]
fn a_process_in_its_own_pid_namespace_is_traced_from_the_host() {
    for_each_container_interpreter("container_pid_namespace", |interp| {
        every_command(interp, Isolation::PidNamespace)
    });
}
