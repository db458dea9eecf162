//! `cargo xtask bench --only agent`: `pyprobe agent` over 20 busy Python
//! processes for 60 s, at its default rate (19 Hz) and at 99 Hz, beside
//! `py-spy record` at the same rate on each process (20 py-spy processes,
//! their CPU summed): the agent's CPU (% of one core) and peak RSS, and the
//! ratio of its CPU to py-spy's. Goals: at most 1/20 of py-spy's CPU, at
//! most 0.5% of a core at the default rate, at most 100 MB RSS.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{interpreters, profile::py_spy, wait_usage};
use crate::util::KillOnDrop;

/// Busy Python processes profiled at once.
const PROCESSES: usize = 20;
/// How long each profiler runs: 60 s, or `$PYPROBE_BENCH_AGENT_SECONDS`
/// for a quick look.
fn window() -> Duration {
    Duration::from_secs(
        std::env::var("PYPROBE_BENCH_AGENT_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    )
}
/// The agent's default rate, and the py-spy habit.
const RATES: [u32; 2] = [19, 99];

/// CPU time (user + system) of process `pid` so far, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis: utime is the 12th,
    // stime the 13th of those (fields 14 and 15 of the line).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Peak resident memory of process `pid` (VmHWM), in kB.
fn peak_rss_kb(pid: u32) -> anyhow::Result<u64> {
    pyprobe_testenv::status_kb(pid, "VmHWM").context("no VmHWM")
}

/// One agent run: its CPU over the window (% of one core), peak RSS (MB)
/// and samples taken.
fn agent_run(pyprobe: &Path, rate: u32) -> anyhow::Result<(f64, f64, u64)> {
    let dir = std::env::temp_dir().join(format!("pyprobe-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let mut child = Command::new(pyprobe)
        .args(["agent", "--rate", &rate.to_string(), "--listen"])
        .arg(addr.to_string())
        .arg("--control")
        .arg(dir.join("control.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting pyprobe agent")?;
    let stderr = BufReader::new(child.stderr.take().expect("piped"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let agent = KillOnDrop(child);
    let pid = agent.0.id();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .context("the agent did not start")?;
        if line.contains("agent sampling every") {
            break;
        }
    }
    // Set-up over, the steady state is measured.
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
    std::thread::sleep(window());
    let (cpu1, t1) = (cpu_seconds(pid)?, Instant::now());
    let rss = peak_rss_kb(pid)? as f64 / 1024.0;
    let samples = metric(addr, "pyprobe_samples_total ").unwrap_or(0.0) as u64;
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let mut agent = agent;
    let stopped = Instant::now();
    let _ = agent.0.wait();
    if stopped.elapsed() > Duration::from_secs(2) {
        bail!("the agent took {:?} to stop", stopped.elapsed());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let percent = (cpu1 - cpu0) / (t1 - t0).as_secs_f64() * 100.0;
    Ok((percent, rss, samples))
}

/// The value of the first `/metrics` line starting with `prefix`.
fn metric(addr: std::net::SocketAddr, prefix: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// py-spy record on every process at once: their CPU summed (% of one
/// core) and the largest peak RSS (MB).
fn py_spy_run(py_spy: &Path, pids: &[u32], rate: u32) -> anyhow::Result<(f64, f64)> {
    let out = std::env::temp_dir().join(format!("pyprobe-bench-agent-{}.raw", std::process::id()));
    let started = Instant::now();
    let children: Vec<_> = pids
        .iter()
        .map(|pid| {
            Command::new(py_spy)
                .args(["record", "--rate", &rate.to_string(), "--duration"])
                .arg(window().as_secs().to_string())
                .args(["--format", "raw", "--pid", &pid.to_string(), "-o"])
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut cpu = 0.0;
    let mut rss: f64 = 0.0;
    for child in children {
        let usage = wait_usage(child, started)?;
        cpu += usage.cpu_ms / 1000.0;
        rss = rss.max(usage.max_rss_kb as f64 / 1024.0);
    }
    let _ = std::fs::remove_file(&out);
    Ok((cpu / window().as_secs_f64() * 100.0, rss))
}

/// Runs the agent bench on the newest pyenv interpreter.
pub fn bench_agent(pyprobe: &Path) -> anyhow::Result<()> {
    let py_spy = py_spy()?;
    let python = interpreters()
        .into_iter()
        .rfind(|p| p.to_string_lossy().contains(".pyenv"))
        .context("no pyenv interpreter to run the agent bench on")?;
    println!(
        "\n== agent: {PROCESSES} busy Python processes ({}), {} s per run ==",
        python.display(),
        window().as_secs()
    );
    let mut fleet = Vec::new();
    for _ in 0..PROCESSES {
        // One worker thread each, busy all the time; it exits when its
        // stdin closes.
        let mut child = Command::new(&python)
            .arg(crate::util::workspace_root().join("fixtures/profile_workload.py"))
            .arg("1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if !line.starts_with("ready") {
            bail!("profile_workload.py did not start: {line:?}");
        }
        fleet.push(KillOnDrop(child));
    }
    let pids: Vec<u32> = fleet.iter().map(|child| child.0.id()).collect();
    for rate in RATES {
        let (agent_cpu, agent_rss, samples) = agent_run(pyprobe, rate)?;
        let (spy_cpu, spy_rss) = py_spy_run(&py_spy, &pids, rate)?;
        println!(
            "{rate} Hz: agent {agent_cpu:.2}% of a core, peak RSS {agent_rss:.1} MB, {samples} samples in {} s; \
             py-spy record x{PROCESSES}: {spy_cpu:.1}% of a core in all (each peak RSS up to {spy_rss:.1} MB); \
             agent/py-spy CPU {:.4} (goal: at most 0.05{})",
            window().as_secs(),
            agent_cpu / spy_cpu,
            if rate == RATES[0] {
                "; goal at this rate: at most 0.5% of a core, 100 MB"
            } else {
                ""
            },
        );
    }
    drop(fleet);
    Ok(())
}

/// The agent's soak at full length: the soak test of `tests/tests/agent.rs`
/// (short-lived processes of two interpreters coming and going under the
/// agent; its RSS must stay flat and losses be exported), run for
/// `$PYPROBE_SOAK_SECONDS` (600 unless set) on the release build, instead
/// of the 40 s the suite gives it.
pub fn soak(pyprobe: &std::path::Path) -> anyhow::Result<()> {
    let seconds = std::env::var("PYPROBE_SOAK_SECONDS").unwrap_or_else(|_| "600".to_owned());
    println!("\n== agent soak: short-lived Python processes for {seconds} s under the agent ==");
    crate::util::run(
        crate::util::cargo()?
            .current_dir(crate::util::workspace_root())
            .env("PYPROBE_BIN", pyprobe)
            .env("PYPROBE_SOAK_SECONDS", &seconds)
            .args([
                "test",
                "--release",
                "-p",
                "pyprobe-tests",
                "--test",
                "agent",
                "--",
                "--exact",
                "agent_soak_short_lived_processes_keep_its_memory_flat",
                "--nocapture",
            ]),
    )
}
