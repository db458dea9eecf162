//! `pyprobe agent` against two fixtures on different interpreters, one
//! started before the agent and one after in a container-like root, with the real tools its users
//! feed: `go tool pprof` reads its profiles, `promtool check metrics` its
//! metrics; `pyprobe ctl` controls it over a socket that refuses non-root
//! users; SIGTERM ends it cleanly.
//!
//! Needs root (run through `cargo xtask test`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use pyprobe_tests::{
    Fixture, Interpreter, Isolation, Probe, go_pprof, marks, on_two_interpreters, pprof_top_rows,
    pyprobe_bin,
};
use serde_json::Value;

/// Starts `pyprobe agent` on a free loopback port with its control socket
/// in `dir`, `extra` flags after; returns it, its HTTP address and socket.
fn start_agent(dir: &Path, extra: &[&str]) -> anyhow::Result<(Probe, SocketAddr, PathBuf)> {
    let socket = dir.join("control.sock");
    let addr = free_addr().to_string();
    let mut args = vec![
        "agent",
        "--listen",
        &addr,
        "--control",
        socket.to_str().context("path")?,
    ];
    args.extend_from_slice(extra);
    let agent = Probe::start(&args)?;
    Ok((agent, addr.parse()?, socket))
}

/// A free loopback port.
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// `GET path`: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

/// The body of a chunked response.
fn dechunk(mut raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size")?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end])?.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `pyprobe ctl --control SOCKET args...`
fn ctl(socket: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(pyprobe_bin())
        .arg("ctl")
        .arg("--control")
        .arg(socket)
        .args(args)
        .output()?)
}

/// The processes the agent lists, by PID.
fn processes(addr: SocketAddr) -> anyhow::Result<Vec<Value>> {
    let (status, body) = get(addr, "/api/v1/processes")?;
    ensure!(status == 200, "processes: status {status}");
    Ok(serde_json::from_slice::<Vec<Value>>(&body)?)
}

/// Waits until the agent lists `pid`; returns its entry.
fn wait_listed(addr: SocketAddr, pid: u32) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(p) = processes(addr)?.into_iter().find(|p| p["pid"] == pid) {
            return Ok(p);
        }
        ensure!(
            Instant::now() < deadline,
            "the agent never listed PID {pid}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn agent_profiles_and_exports_two_interpreters_and_stops_cleanly() {
    on_two_interpreters(
        "agent_profiles_and_exports_two_interpreters_and_stops_cleanly",
        "one agent watches two fixtures at once: the newest pyenv build, and a sid build in a container-like root",
        run,
    );
}

fn run(before_interp: &Interpreter, after_interp: &Interpreter) -> anyhow::Result<()> {
    let lines = marks("profile_workload.py")?;
    // The later fixture runs in a container-like root (its own root with
    // the fixtures at /app, PID and mount namespaces, a Docker-style
    // cgroup): its file is named as the container sees it.
    let hot = format!("/app/profile_workload.py:{}", lines["hot-loop"]);
    let cold = format!("/app/profile_workload.py:{}", lines["cold-loop"]);

    let dir = tempdir()?;
    let before = Fixture::start(before_interp, "profile_workload.py", &[])?;
    let (mut agent, addr, socket) = start_agent(&dir, &[])?;
    let after = Fixture::start_isolated(
        after_interp,
        Isolation::Container,
        "profile_workload.py",
        &[],
    )?;
    let container = after.container_id().context("no container id")?.to_owned();

    // Both listed, with their versions, the later one with its container.
    for (fixture, interp, in_container) in [
        (&before, before_interp, Value::Null),
        (&after, after_interp, Value::from(container.clone())),
    ] {
        let p = wait_listed(addr, fixture.pid())?;
        let (a, b, c) = interp.version;
        ensure!(
            p["version"] == format!("{a}.{b}.{c}") && p["container"] == in_container,
            "PID {} listed as {p}, expected version {a}.{b}.{c} and container {in_container}",
            fixture.pid()
        );
    }
    // The socket is root's alone.
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "control socket mode {mode:o}");

    // A process the agent does not watch has no profile: said at once.
    let (status, body) = get(addr, "/debug/pprof/profile?seconds=1&pid=999999999")?;
    let body = String::from_utf8_lossy(&body);
    ensure!(
        status == 404 && body.contains("PID 999999999 is not watched by the agent"),
        "profile of an unwatched PID: status {status}, {body}"
    );

    // A profile of the container alone (asked by the short id `docker ps`
    // shows), read by go tool pprof: its three workers spend 75% in hot()
    // at its loop line, 25% in cold().
    let (status, profile) = get(
        addr,
        &format!(
            "/debug/pprof/profile?seconds=4&container={}",
            &container[..12]
        ),
    )?;
    ensure!(status == 200, "profile: status {status}");
    let report = go_pprof(&profile, &["-top", "-lines"])?;
    let rows = pprof_top_rows(&report);
    ensure!(rows.len() >= 2, "pprof -top: {report}");
    ensure!(
        (rows[0].1.as_str(), rows[0].2.as_str()) == ("hot", hot.as_str())
            && (rows[1].1.as_str(), rows[1].2.as_str()) == ("cold", cold.as_str()),
        "hot then cold expected on top ({hot}, {cold}): {report}"
    );
    let share = rows[0].0 / (rows[0].0 + rows[1].0);
    ensure!(
        (0.6..=0.9).contains(&share),
        "hot's share {share:.2} is far from the fixture's 0.75: {report}"
    );
    // Every sample is labelled with the one process asked for and its
    // container.
    let tags = go_pprof(&profile, &["-tags"])?;
    ensure!(
        tags.contains(&format!("{}", after.pid()))
            && !tags.contains(&format!("{}", before.pid()))
            && tags.contains(&container),
        "pid and container labels: {tags}"
    );

    // Metrics: valid for promtool, a series per watched PID that counted
    // samples.
    let (status, metrics) = get(addr, "/metrics")?;
    ensure!(status == 200, "metrics: status {status}");
    let metrics = String::from_utf8(metrics)?;
    promtool_check(&metrics)?;
    for pid in [before.pid(), after.pid()] {
        let series = format!("pyprobe_process_samples_total{{pid=\"{pid}\"}} ");
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .with_context(|| format!("no {series}in\n{metrics}"))?
            .parse()?;
        ensure!(value > 0.0, "{series}is {value}");
    }
    let (a, b, c) = after_interp.version;
    let kind =
        format!("pyprobe_processes{{version=\"{a}.{b}.{c}\",container=\"{container}\"}} 1\n");
    ensure!(metrics.contains(&kind), "no {kind}in\n{metrics}");
    ensure!(
        metrics.contains("pyprobe_sampling_rate_hertz 19\n"),
        "default rate: {metrics}"
    );
    // The kernel's measure of the sampler's runs.
    let runs = series(
        &metrics,
        "pyprobe_bpf_program_runs_total",
        &[("program", "sample_cpu")],
    )?;
    let spent = series(
        &metrics,
        "pyprobe_bpf_program_run_seconds_total",
        &[("program", "sample_cpu")],
    )?;
    ensure!(
        runs > 0.0 && spent > 0.0 && spent / runs < 1e-4,
        "sample_cpu ran {runs} times in {spent} s"
    );

    // Control: status, a new rate, a refused one.
    let out = ctl(&socket, &["--json", "status"])?;
    ensure!(out.status.success(), "ctl status: {}", text(&out));
    let status: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(status["rate"] == 19, "status: {status}");
    ensure!(status["processes"].as_u64() >= Some(2), "status: {status}");
    let out = ctl(&socket, &["profile", "rate", "49"])?;
    ensure!(out.status.success(), "ctl profile rate 49: {}", text(&out));
    let (_, metrics) = get(addr, "/metrics")?;
    ensure!(
        String::from_utf8(metrics)?.contains("pyprobe_sampling_rate_hertz 49\n"),
        "rate not changed"
    );
    let out = ctl(&socket, &["profile", "rate", "0"])?;
    ensure!(
        !out.status.success() && text(&out).contains("out of range"),
        "ctl profile rate 0: {}",
        text(&out)
    );

    // A non-root user is refused: by the file's mode, and by the agent
    // when the mode would let it in.
    let nobody_bin = dir.join("pyprobe");
    std::fs::copy(pyprobe_bin(), &nobody_bin)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&nobody_bin, std::fs::Permissions::from_mode(0o755))?;
    let as_nobody = || {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(&nobody_bin)
            .arg("ctl")
            .arg("--control")
            .arg(&socket)
            .arg("status")
            .output()
    };
    let out = as_nobody()?;
    ensure!(
        !out.status.success() && text(&out).contains("Permission denied"),
        "non-root ctl through a 0600 socket: {}",
        text(&out)
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let out = as_nobody()?;
    ensure!(
        !out.status.success() && text(&out).contains("answers root only"),
        "non-root ctl through an open socket: {}",
        text(&out)
    );

    // SIGTERM: exit 0 within 2 s, the socket gone, HTTP closed.
    let asked = Instant::now();
    agent.terminate();
    let Some(exit) = agent.wait_exit(Duration::from_secs(2)) else {
        bail!("the agent still runs 2 s after SIGTERM");
    };
    ensure!(
        exit.success(),
        "agent exit {exit} after {:?}",
        asked.elapsed()
    );
    ensure!(!socket.exists(), "control socket left behind");
    ensure!(
        TcpStream::connect(addr).is_err(),
        "HTTP still listens after exit"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `promtool check metrics` passes `metrics`.
fn promtool_check(metrics: &str) -> anyhow::Result<()> {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (installed by cargo xtask setup)")?;
    promtool
        .stdin
        .take()
        .context("stdin")?
        .write_all(metrics.as_bytes())?;
    let checked = promtool.wait_with_output()?;
    ensure!(
        checked.status.success(),
        "promtool check metrics: {}\n{metrics}",
        text(&checked)
    );
    Ok(())
}

/// The value of the one series of `metrics` whose name is `name` and
/// whose labels include every one of `labels`.
fn series(metrics: &str, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let found: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .collect();
    ensure!(
        found.len() == 1,
        "{} series {name} with {labels:?} in\n{metrics}",
        found.len()
    );
    Ok(found[0].rsplit_once(' ').context("no value")?.1.parse()?)
}

/// A fresh private directory for the control socket (root only).
fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("pyprobe-agent-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// The hits file's lines, parsed. Every hit must be a whole line: a
/// line without its newline fails (the agent writes each hit at once).
fn hits(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    anyhow::ensure!(
        text.is_empty() || text.ends_with('\n'),
        "the hits file ends in half a line: {:?}",
        text.lines().last()
    );
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("hit line {l:?}")))
        .collect()
}

/// Waits until the hits file holds `n` lines, then a moment more to see
/// that no other comes; returns them. Read while the agent writes, so it
/// also checks that no reader ever sees half a hit.
fn wait_hits(path: &Path, n: usize) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits(path)?.len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    hits(path)
}

#[test]
fn agent_log_points_write_exact_hits_until_removed_or_expired() {
    on_two_interpreters(
        "agent_log_points_write_exact_hits_until_removed_or_expired",
        "one agent watches two fixtures at once: the newest pyenv build and a sid build",
        run_log,
    );
}

fn run_log(first: &Interpreter, second: &Interpreter) -> anyhow::Result<()> {
    let lines = marks("logpoint_workload.py")?;
    let file = pyprobe_tests::fixture_path("logpoint_workload.py");
    let dir = tempdir()?;
    let hits_file = dir.join("hits.jsonl");
    let mut a = Fixture::start(first, "logpoint_workload.py", &[])?;
    let mut b = Fixture::start(second, "logpoint_workload.py", &[])?;
    let (agent, addr, socket) =
        start_agent(&dir, &["--hits", hits_file.to_str().context("path")?])?;
    wait_listed(addr, a.pid())?;
    wait_listed(addr, b.pid())?;

    // A condition and a message on one process: orders 105-111 pass
    // (total = 20.5 * i > 100), in A only though B runs the same code.
    let at = format!("logpoint_workload.py:{}", lines["handle-express"]);
    let out = ctl(
        &socket,
        &[
            "log",
            "add",
            "--pid",
            &a.pid().to_string(),
            "--at",
            &at,
            "--when",
            "order.total > 100",
            "--msg",
            "id={order.id} user={order.user.name}",
        ],
    )?;
    ensure!(out.status.success(), "ctl log add: {}", text(&out));
    let stdout = String::from_utf8(out.stdout)?;
    let id = stdout.lines().last().context("no id")?.trim().to_owned();
    ensure!(
        id.starts_with("lp"),
        "the id alone on the last line: {stdout:?}"
    );
    for f in [&mut a, &mut b] {
        f.send("run")?;
        f.expect("done")?;
    }
    let got = wait_hits(&hits_file, 7)?;
    let users = ["ana", "bo", "zoë"];
    let expected: Vec<String> = (5..12)
        .map(|i| format!("id={} user={}", 100 + i, users[i % 3]))
        .collect();
    let messages: Vec<&str> = got.iter().filter_map(|h| h["message"].as_str()).collect();
    ensure!(messages == expected, "hits: {got:#?}");
    for (h, i) in got.iter().zip(5..) {
        ensure!(
            h["id"] == id.as_str()
                && h["pid"] == a.pid()
                && h["tid"].as_u64().is_some()
                && h["time"].as_f64().is_some()
                && h["container"].is_null()
                && h["file"]
                    .as_str()
                    .is_some_and(|f| f.ends_with("logpoint_workload.py"))
                && h["line"] == lines["handle-express"]
                && h["values"]["order.id"] == 100 + i,
            "hit {h}"
        );
    }
    let _ = file;

    // Listed with its counts; after `ctl log rm`, no hit is written.
    let out = ctl(&socket, &["--json", "log", "list"])?;
    let list: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        list[0]["id"] == id.as_str() && list[0]["stats"]["written"] == 7,
        "log list: {list}"
    );
    let out = ctl(&socket, &["log", "rm", &id])?;
    ensure!(out.status.success(), "ctl log rm: {}", text(&out));
    a.send("run")?;
    a.expect("done")?;
    ensure!(
        wait_hits(&hits_file, 8)?.len() == 7,
        "hits after ctl log rm"
    );
    let out = ctl(&socket, &["log", "rm", &id])?;
    ensure!(
        !out.status.success() && text(&out).contains("no log point"),
        "a second rm: {}",
        text(&out)
    );

    // By command line, in both processes, for 2 s: every run of the
    // function's first line in each, then nothing once it expired.
    let at = format!("logpoint_workload.py:{}", lines["handle-total"]);
    let out = ctl(
        &socket,
        &[
            "log",
            "add",
            "--name",
            "logpoint_workload",
            "--at",
            &at,
            "--msg",
            "{order.id}",
            "--ttl",
            "2s",
        ],
    )?;
    ensure!(out.status.success(), "ctl log add --ttl: {}", text(&out));
    let added = Instant::now();
    let ttl_id = String::from_utf8(out.stdout)?
        .lines()
        .last()
        .context("no id")?
        .trim()
        .to_owned();
    for f in [&mut a, &mut b] {
        f.send("run")?;
        f.expect("done")?;
    }
    let got = wait_hits(&hits_file, 7 + 24)?;
    let new: Vec<&Value> = got[7..].iter().collect();
    for pid in [a.pid(), b.pid()] {
        let mine: Vec<&str> = new
            .iter()
            .filter(|h| h["pid"] == pid && h["id"] == ttl_id.as_str())
            .filter_map(|h| h["message"].as_str())
            .collect();
        let want: Vec<String> = (100..112).map(|i| i.to_string()).collect();
        ensure!(mine == want, "PID {pid}'s hits: {mine:?}");
    }
    ensure!(new.len() == 24, "{} hits in all", new.len());
    std::thread::sleep(Duration::from_secs(3).saturating_sub(added.elapsed()));
    let out = ctl(&socket, &["--json", "log", "list"])?;
    ensure!(
        serde_json::from_slice::<Value>(&out.stdout)? == serde_json::json!([]),
        "expired log point still listed: {}",
        text(&out)
    );
    for f in [&mut a, &mut b] {
        f.send("run")?;
        f.expect("done")?;
    }
    ensure!(
        wait_hits(&hits_file, 7 + 24 + 1)?.len() == 7 + 24,
        "hits after the time to live"
    );

    // An always-on agent sees log points come and go for ever: 300 added
    // and taken off, each with a program of its own (its condition's
    // constant), go past the kernel's 256 programs; every one is added,
    // and the last writes exactly its hit.
    let at = format!("logpoint_workload.py:{}", lines["handle-express"]);
    let pid = a.pid().to_string();
    let mut last_id = String::new();
    for i in 0..300 {
        let when = format!("order.id == {}", 1000 + i);
        let when = if i == 299 { "order.id == 107" } else { &when };
        let out = ctl(
            &socket,
            &[
                "log",
                "add",
                "--pid",
                &pid,
                "--at",
                &at,
                "--when",
                when,
                "--msg",
                "again {order.id}",
            ],
        )?;
        ensure!(out.status.success(), "log point {i}: {}", text(&out));
        last_id = String::from_utf8(out.stdout)?
            .lines()
            .last()
            .context("no id")?
            .trim()
            .to_owned();
        if i < 299 {
            let out = ctl(&socket, &["log", "rm", &last_id])?;
            ensure!(out.status.success(), "rm {i}: {}", text(&out));
        }
    }
    // A moment for the entries of the points taken off to be recycled:
    // they are on the same line, and must not take the last one's away.
    std::thread::sleep(Duration::from_secs(1));
    a.send("run")?;
    a.expect("done")?;
    let got = wait_hits(&hits_file, 7 + 24 + 1)?;
    let new: Vec<(&str, &str)> = got[7 + 24..]
        .iter()
        .filter_map(|h| Some((h["id"].as_str()?, h["message"].as_str()?)))
        .collect();
    ensure!(
        new == [(last_id.as_str(), "again 107")],
        "after 300 log points: {new:?}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The Python rows of a calls report (builtins, which read and write the
/// fixture's pipes, left out).
fn python_rows(report: &Value) -> Vec<Value> {
    report["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["file"] != "<builtin>")
        .cloned()
        .collect()
}

#[test]
fn agent_calls_jobs_count_exactly_and_start_afresh() {
    on_two_interpreters(
        "agent_calls_jobs_count_exactly_and_start_afresh",
        "one agent watches two fixtures at once: the newest pyenv build and a sid build",
        run_calls,
    );
}

fn run_calls(first: &Interpreter, second: &Interpreter) -> anyhow::Result<()> {
    let f_line = {
        let text = std::fs::read_to_string(pyprobe_tests::fixture_path("map_calls.py"))?;
        text.lines()
            .position(|l| l == "def f(x):")
            .context("def f")? as u64
            + 1
    };
    let dir = tempdir()?;
    let mut a = Fixture::start(first, "map_calls.py", &[])?;
    let mut b = Fixture::start(second, "map_calls.py", &[])?;
    // A budget of 0.5% of a CPU: 5000 calls/s at the agent's 1 µs a call.
    let (agent, addr, socket) = start_agent(&dir, &["--calls-budget", "0.5"])?;
    let start = |args: &[&str]| -> anyhow::Result<String> {
        let mut all = vec!["calls", "start"];
        all.extend_from_slice(args);
        let out = ctl(&socket, &all)?;
        ensure!(out.status.success(), "ctl calls start: {}", text(&out));
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .last()
            .context("no id")?
            .trim()
            .to_owned())
    };
    let report = |verb: &str, id: &str| -> anyhow::Result<Value> {
        let out = ctl(&socket, &["--json", "calls", verb, id])?;
        ensure!(out.status.success(), "ctl calls {verb}: {}", text(&out));
        Ok(serde_json::from_slice(&out.stdout)?)
    };

    // One process: exactly the calls it made while counted.
    let id = start(&["--pid", &a.pid().to_string()])?;
    a.call("2500", "done 2500")?;
    b.call("700", "done 700")?;
    let shown = report("show", &id)?;
    let rows = python_rows(&shown);
    ensure!(
        rows.len() == 1
            && rows[0]["pid"] == a.pid()
            && rows[0]["function"] == "f"
            && rows[0]["line"] == f_line
            && rows[0]["calls"] == 2500,
        "show: {shown}"
    );
    // The same count in /metrics, under the job's id, and the call
    // program's runs as the kernel counts them: at least one a call.
    let (_, metrics) = get(addr, "/metrics")?;
    let metrics = String::from_utf8(metrics)?;
    promtool_check(&metrics)?;
    let pid = a.pid().to_string();
    let line = f_line.to_string();
    let calls = series(
        &metrics,
        "pyprobe_function_calls_total",
        &[
            ("job", &id),
            ("pid", &pid),
            ("function", "f"),
            ("line", &line),
        ],
    )?;
    ensure!(calls == 2500.0, "f's calls in /metrics: {calls}");
    ensure!(
        series(&metrics, "pyprobe_calls_functions", &[("job", &id)])? >= 1.0,
        "functions of {id}: {metrics}"
    );
    let runs = series(
        &metrics,
        "pyprobe_bpf_program_runs_total",
        &[("program", "call_start")],
    )?;
    ensure!(runs >= 2500.0, "call_start ran {runs} times for 2500 calls");
    // A second job while one runs is refused.
    let out = ctl(&socket, &["calls", "start", "--all"])?;
    ensure!(
        !out.status.success() && text(&out).contains("runs already"),
        "{}",
        text(&out)
    );
    a.call("500", "done 500")?;
    let last = report("stop", &id)?;
    let rows = python_rows(&last);
    ensure!(
        last["kind"] == "final" && rows.len() == 1 && rows[0]["calls"] == 3000,
        "stop: {last}"
    );
    ensure!(
        last["lost"]
            .as_object()
            .context("lost")?
            .values()
            .all(|v| v == 0),
        "{last}"
    );
    // Stopped: calls made now are counted nowhere, and the final report
    // stays readable.
    a.call("100", "done 100")?;
    ensure!(python_rows(&report("show", &id)?)[0]["calls"] == 3000);

    // A second job by command line counts both processes from zero.
    let id2 = start(&["--name", "map_calls"])?;
    a.call("40", "done 40")?;
    b.call("60", "done 60")?;
    let last = report("stop", &id2)?;
    let mut got: Vec<(u64, u64)> = python_rows(&last)
        .iter()
        .map(|r| {
            (
                r["pid"].as_u64().unwrap_or(0),
                r["calls"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![(u64::from(a.pid()), 40), (u64::from(b.pid()), 60)];
    want.sort();
    ensure!(got == want, "second job: {last}");
    ensure!(
        last["over_budget"] == serde_json::json!([]) && last["picked_up_late"] == 0,
        "within the budget, both running before it started: {last}"
    );

    // Over the budget: 200000 calls in a moment are counted, then the
    // process is no longer counted (its probes come off) and show says so.
    let id3 = start(&["--pid", &a.pid().to_string()])?;
    a.call("200000", "done 200000")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let shown = loop {
        let shown = report("show", &id3)?;
        if shown["over_budget"]
            .as_array()
            .is_some_and(|o| !o.is_empty())
            || Instant::now() > deadline
        {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let over = &shown["over_budget"][0];
    ensure!(
        over["pid"] == a.pid()
            && over["detached"] == true
            && over["cost_percent"].as_f64().is_some_and(|c| c > 0.5),
        "over budget: {shown}"
    );
    // What was counted when it stopped (all 200000 unless the guard looked
    // in the middle of the burst) and nothing after.
    let at_stop = python_rows(&shown)
        .first()
        .and_then(|r| r["calls"].as_u64())
        .context("no row")?;
    ensure!(at_stop > 5000 && at_stop <= 200000, "{shown}");
    a.call("1000", "done 1000")?;
    let last = report("stop", &id3)?;
    // Known: probes taken off in the middle of the burst may leave one
    // count at an address that is no code object (a row called unknown,
    // with the reason); the function's own count is exact.
    let (named, unknown): (Vec<Value>, Vec<Value>) = python_rows(&last)
        .into_iter()
        .partition(|r| r["function"] != "<unknown>");
    let stray: u64 = unknown.iter().filter_map(|r| r["calls"].as_u64()).sum();
    ensure!(
        named.len() == 1 && named[0]["calls"] == at_stop && stray <= 1,
        "counted until stopped ({at_stop}): {last}"
    );
    let out = ctl(&socket, &["calls", "show", &id3])?;
    ensure!(
        text(&out).contains(&format!("PID {} not counted since it made", a.pid())),
        "the table says so: {}",
        text(&out)
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Resident memory of process `pid` now (VmRSS), in kB.
fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    pyprobe_testenv::status_kb(pid, "VmRSS").context("no VmRSS")
}

/// How long the soak runs: `$PYPROBE_SOAK_SECONDS` (600 for the full
/// soak), 40 s in the suite.
fn soak_seconds() -> u64 {
    std::env::var("PYPROBE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

#[test]
fn agent_soak_short_lived_processes_keep_its_memory_flat() {
    on_two_interpreters(
        "agent_soak_short_lived_processes_keep_its_memory_flat",
        "short-lived processes of two interpreters at once: the newest pyenv build and a sid build",
        run_soak,
    );
}

fn run_soak(first: &Interpreter, second: &Interpreter) -> anyhow::Result<()> {
    let dir = tempdir()?;
    let hits_file = dir.join("hits.jsonl");
    let (mut agent, addr, socket) = start_agent(
        &dir,
        &[
            "--rate",
            "99",
            "--hits",
            hits_file.to_str().context("path")?,
        ],
    )?;
    let soak = Duration::from_secs(soak_seconds());
    // Busy for 0.2-1.1 s each, 8 alive at a time, alternating interpreters,
    // with a log point on the loop's line in every one (5 hits a second in
    // all): each new process arms it, each exit leaves its entry to
    // recycle.
    let busy = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    sum(i * i for i in range(200))\n";
    let script = dir.join("soak_busy.py");
    std::fs::write(&script, busy)?;
    let out = ctl(
        &socket,
        &[
            "log",
            "add",
            "--all",
            "--at",
            "soak_busy.py:4",
            "--rate",
            "5",
            "--ttl",
            "2h",
            "--msg",
            "busy",
        ],
    )?;
    ensure!(out.status.success(), "ctl log add: {}", text(&out));
    let started = Instant::now();
    let mut alive: Vec<std::process::Child> = Vec::new();
    let mut spawned: Vec<u32> = Vec::new();
    let mut baseline: Option<u64> = None;
    let mut peak = 0;
    while started.elapsed() < soak {
        alive.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        while alive.len() < 8 {
            let interp = if spawned.len().is_multiple_of(2) {
                first
            } else {
                second
            };
            let secs = 0.2 + (spawned.len() % 10) as f64 * 0.1;
            let child = Command::new(&interp.path)
                .arg(&script)
                .arg(secs.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            spawned.push(child.id());
            alive.push(child);
        }
        // The first 10 s fill what is kept per interpreter file and frame
        // names; from then on memory must stay flat.
        let rss = rss_kb(agent.pid())?;
        if started.elapsed() >= Duration::from_secs(10) && baseline.is_none() {
            baseline = Some(rss);
        }
        if baseline.is_some() {
            peak = peak.max(rss);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for mut c in alive {
        let _ = c.wait();
    }
    let baseline = baseline.context("the soak ran under 10 s")?;
    ensure!(
        spawned.len() >= 100,
        "only {} processes in {soak:?}",
        spawned.len()
    );
    // Per-process state goes with the process: none listed, no series.
    std::thread::sleep(Duration::from_secs(2));
    let listed: Vec<u64> = processes(addr)?
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .filter(|pid| spawned.contains(&(*pid as u32)))
        .collect();
    ensure!(
        listed.is_empty(),
        "exited processes still listed: {listed:?}"
    );
    let (_, metrics) = get(addr, "/metrics")?;
    let metrics = String::from_utf8(metrics)?;
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("pyprobe_process_samples_total{"))
        .filter(|l| spawned.iter().any(|pid| l.contains(&format!("\"{pid}\""))))
        .count();
    ensure!(
        series == 0,
        "series of exited processes: {series}\n{metrics}"
    );
    let samples: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pyprobe_samples_total "))
        .context("no pyprobe_samples_total")?
        .parse()?;
    ensure!(samples > 0.0, "no sample taken: {metrics}");
    ensure!(
        metrics.contains("pyprobe_samples_lost_total{reason=\"unknown_process\"}"),
        "losses not exported: {metrics}"
    );
    // The log point armed in processes to the end: hits from processes
    // started in the soak's last quarter, each a process of the soak.
    let hits = hits(&hits_file)?;
    let late = &spawned[spawned.len() * 3 / 4..];
    let hit_pids: std::collections::BTreeSet<u64> =
        hits.iter().filter_map(|h| h["pid"].as_u64()).collect();
    ensure!(
        hit_pids.iter().all(|pid| spawned.contains(&(*pid as u32)))
            && late.iter().any(|pid| hit_pids.contains(&u64::from(*pid))),
        "{} hits from {} processes, none of the last {} started",
        hits.len(),
        hit_pids.len(),
        late.len()
    );
    // Flat: at most 8 MB above what it held after 10 s.
    ensure!(
        peak <= baseline + 8 * 1024,
        "RSS grew from {baseline} kB (at 10 s) to {peak} kB over {} processes",
        spawned.len()
    );
    eprintln!(
        "soak: {} processes in {soak:?}; agent RSS {baseline} kB at 10 s, peak {peak} kB after; {samples} samples; {} log point hits from {} processes",
        spawned.len(),
        hits.len(),
        hit_pids.len()
    );
    agent.terminate();
    ensure!(
        agent
            .wait_exit(Duration::from_secs(2))
            .is_some_and(|s| s.success()),
        "the agent did not stop cleanly"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
