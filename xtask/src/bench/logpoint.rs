//! Log points side by side (`fixtures/logpoint_bench.py`): a call-heavy
//! workload (fib(27)) with a breakpoint on a line that never runs,
//! (a) bare, (b) with a pyprobe log point there, (c) with a pdb-style
//! `sys.settrace` breakpoint there, (d) on 3.12+ with a `sys.monitoring`
//! breakpoint there; then pyprobe's cost per hit on a line that runs,
//! dropped by a kernel condition and printed.
//!
//! (a) and (b) run in the same process, interleaved: each log point round
//! sits between two bare rounds and is compared with their mean (the VM
//! drifts by up to 20% over seconds). (c) and (d) need their own process
//! and are compared with the median bare round.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use super::{
    BpfStats, KillOnDrop, Usage, interpreters, median, prog_ns_per_run, start_fixture_with,
    wait_usage,
};

/// Interleaved rounds of (a) and (b).
const ROUNDS: usize = 11;
/// Runs of the workload per round (their median is the round's time).
const RUNS: usize = 7;
/// Calls of hit() to time the cost per hit.
const HITS: usize = 20_000;

struct Bench {
    _fixture: KillOnDrop,
    pid: u32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Bench {
    fn start(python: &Path, mode: &str) -> anyhow::Result<Self> {
        let (fixture, stdin, stdout) = start_fixture_with(python, "logpoint_bench.py", &[mode])?;
        Ok(Self {
            pid: fixture.0.id(),
            _fixture: fixture,
            stdin,
            stdout,
        })
    }

    /// Seconds and breakpoint hits of one command.
    fn once(&mut self, command: &str) -> anyhow::Result<(f64, u64)> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let mut words = line.split_whitespace();
        let secs = words.next().and_then(|s| s.parse().ok());
        let hits = words.next().and_then(|s| s.parse().ok());
        match (secs, hits) {
            (Some(s), Some(h)) => Ok((s, h)),
            _ => bail!("bad answer {line:?}"),
        }
    }

    /// Median seconds of `RUNS` runs of `command`.
    fn time(&mut self, command: &str) -> anyhow::Result<f64> {
        let mut times = Vec::new();
        for _ in 0..RUNS {
            times.push(self.once(command)?.0);
        }
        Ok(median(times))
    }

    /// Starts `pyprobe log` on this process; returns once it is armed.
    fn log(&self, pyprobe: &Path, args: &[&str]) -> anyhow::Result<Probe> {
        let pid = self.pid.to_string();
        let started = Instant::now();
        let mut child = Command::new(pyprobe)
            .args(["log", "--pid", &pid])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut err = BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        let mut seen = String::new();
        loop {
            line.clear();
            if err.read_line(&mut line)? == 0 {
                bail!("pyprobe log exited before attaching: {seen}");
            }
            seen.push_str(&line);
            if line.contains("attached to PID") {
                break;
            }
        }
        // Keep reading stderr so pyprobe never blocks on it; the summary
        // it prints at exit is kept.
        let kept = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = kept.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).is_ok_and(|n| n > 0) {
                if let Ok(mut k) = sink.lock() {
                    k.push_str(&line);
                }
                line.clear();
            }
        });
        Ok(Probe {
            child,
            started,
            stderr: kept,
        })
    }
}

/// A running `pyprobe log`.
struct Probe {
    child: Child,
    started: Instant,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

/// What a `pyprobe log` cost and saw.
struct Stopped {
    usage: Usage,
    /// Run time of its BPF program per run (`bpf_stats`), when the kernel
    /// gave it.
    prog_ns: Option<f64>,
    /// Watchpoint hits in all (runs and other accesses), from its summary.
    hits: u64,
}

impl Probe {
    /// Stops it (Ctrl-C) and measures it.
    fn stop(self) -> anyhow::Result<Stopped> {
        let prog_ns = prog_ns_per_run(self.child.id());
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let usage = wait_usage(self.child, self.started)?;
        // The reader thread ends with the pipe.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let text = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let number_before = |marker: &str| -> Option<u64> {
            let at = text.find(marker)?;
            text[..at].split_whitespace().last()?.parse().ok()
        };
        let hits = number_before(" runs in").context("no runs in pyprobe's summary")?
            + number_before(" watchpoint hits were not runs")
                .context("no hit count in pyprobe's summary")?;
        Ok(Stopped {
            usage,
            prog_ns,
            hits,
        })
    }
}

fn mark(name: &str) -> anyhow::Result<usize> {
    let text =
        std::fs::read_to_string(crate::util::workspace_root().join("fixtures/logpoint_bench.py"))?;
    text.lines()
        .position(|l| l.trim_end().ends_with(&format!("# {name}")))
        .map(|i| i + 1)
        .with_context(|| format!("no `# {name}` line in logpoint_bench.py"))
}

/// Runs the log point benchmark on every interpreter.
pub fn bench_logpoint(pyprobe: &Path) -> anyhow::Result<()> {
    let _stats = BpfStats::enable();
    let never = format!("logpoint_bench.py:{}", mark("never-runs")?);
    let hit_line = format!("logpoint_bench.py:{}", mark("hit-line")?);
    println!(
        "\n== log points: fib(27) with a breakpoint on a line that never runs, release build ==\n\
         bare and pyprobe: {ROUNDS} interleaved rounds in one process (each the median of {RUNS} runs; \
         pyprobe's time over the mean of the bare rounds around it); settrace (pdb-style) and \
         sys.monitoring: their own process, over the median bare round. Per hit: {HITS} calls of a \
         line, dropped by a kernel condition / printed (to /dev/null, no rate limit). hits: watchpoint \
         hits during all the pyprobe rounds (the line never runs: any hit would be a cost)"
    );
    println!(
        "{:<44} {:>8} {:>22} {:>5} {:>10} {:>11} {:>13} {:>13} {:>8} {:>16}",
        "interpreter",
        "bare",
        "pyprobe (range)",
        "hits",
        "settrace",
        "monitoring",
        "µs/hit drop",
        "µs/hit print",
        "prog ns",
        "pyprobe cpu/rss"
    );
    for python in interpreters() {
        let mut bench = Bench::start(&python, "bare")?;
        let mut bares = Vec::new();
        let mut ratios = Vec::new();
        let mut usage = None;
        let mut before = bench.time("go")?;
        bares.push(before);
        let mut never_hits = 0;
        for _ in 0..ROUNDS {
            let probe = bench.log(pyprobe, &["--at", &never])?;
            let with = bench.time("go")?;
            let stopped = probe.stop()?;
            never_hits += stopped.hits;
            usage.get_or_insert(stopped.usage);
            let after = bench.time("go")?;
            bares.push(after);
            ratios.push(with / ((before + after) / 2.0));
            before = after;
        }
        let bare = median(bares);
        let ratio = median(ratios.clone());
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));

        // Per hit, in the same process.
        let hits_cmd = format!("hits {HITS}");
        let bare_hits = bench.time(&hits_cmd)?;
        let probe = bench.log(
            pyprobe,
            &["--at", &hit_line, "--when", "i < 0", "--msg", "{i}"],
        )?;
        let dropped = bench.time(&hits_cmd)?;
        let prog_ns = probe.stop()?.prog_ns;
        let probe = bench.log(
            pyprobe,
            &["--at", &hit_line, "--msg", "i={i}", "--rate", "0"],
        )?;
        let printed = bench.time(&hits_cmd)?;
        probe.stop()?;
        let per_hit = |t: f64| (t - bare_hits) / HITS as f64 * 1e6;
        drop(bench);

        let mut settrace = Bench::start(&python, "settrace")?;
        let (trace_secs, trace_hits) = settrace.once("go")?;
        if trace_hits != 0 {
            bail!("the settrace breakpoint hit {trace_hits} times on a line that never runs");
        }
        let trace = settrace.time("go")?.min(trace_secs);
        drop(settrace);
        let monitoring = match Bench::start(&python, "monitoring") {
            Ok(mut m) => Some(m.time("go")?),
            Err(_) => None, // before 3.12: no sys.monitoring
        };
        let u = usage.context("no pyprobe round")?;
        println!(
            "{:<44} {:>7.1}ms {:>6.3}x ({:.3}-{:.3}) {:>5} {:>9.2}x {:>11} {:>13.2} {:>13.2} {:>8} {:>7.0}ms/{:.0}MB",
            python.display().to_string(),
            bare * 1000.0,
            ratio,
            lo,
            hi,
            never_hits,
            trace / bare,
            monitoring.map_or("-".to_owned(), |m| format!("{:.3}x", m / bare)),
            per_hit(dropped),
            per_hit(printed),
            prog_ns.map_or("-".to_owned(), |n| format!("{n:.0}")),
            u.cpu_ms,
            u.max_rss_kb as f64 / 1024.0,
        );
    }
    Ok(())
}
