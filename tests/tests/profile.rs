//! `pyprobe record` and `pyprobe top` against a fixture with known CPU
//! shares: 3 threads each spend 75% of their CPU in `hot()` at its loop
//! line and 25% in `cold()` at its own, called from `work()` at known
//! lines; the main thread sleeps in `idle_wait()`.
//!
//! Needs root (run through `cargo xtask test`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use pyprobe_tests::{
    Fixture, Interpreter, Probe, for_each_interpreter, for_each_newest_pyenv, go_pprof,
    pprof_top_rows, pyprobe_bin,
};
use serde_json::Value;

/// Sampling rate of the tests.
const RATE: &str = "499";

/// The fixture and the lines it reported.
struct Workload {
    fixture: Fixture,
    lines: BTreeMap<String, i64>,
}

impl Workload {
    fn start(interp: &Interpreter, args: &[&str]) -> anyhow::Result<Self> {
        let fixture = Fixture::start(interp, "profile_workload.py", args)?;
        Ok(Self {
            fixture,
            lines: fixture_lines()?,
        })
    }

    fn line(&self, mark: &str) -> i64 {
        self.lines[mark]
    }

    fn pid(&self) -> String {
        self.fixture.pid().to_string()
    }
}

/// Line numbers of the fixture's `# mark` comments.
fn fixture_lines() -> anyhow::Result<BTreeMap<String, i64>> {
    let text = std::fs::read_to_string(pyprobe_tests::fixture_path("profile_workload.py"))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if let Some((code, mark)) = line.rsplit_once("  # ")
            && !code.trim_start().starts_with('#')
            && !mark.contains(' ')
        {
            out.insert(mark.to_owned(), i as i64 + 1);
        }
    }
    ensure!(out.len() == 10, "fixture marks: {out:?}");
    Ok(out)
}

/// Runs `pyprobe record` to the end; returns the output file's text and
/// pyprobe's stderr.
fn record(args: &[&str], file: &str) -> anyhow::Result<(String, String)> {
    let path: PathBuf =
        std::env::temp_dir().join(format!("pyprobe-test-{}-{file}", std::process::id()));
    let out = Command::new(pyprobe_bin())
        .arg("record")
        .args(args)
        .arg("-o")
        .arg(&path)
        .output()
        .context("running pyprobe record")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "pyprobe record failed: {stderr}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path:?}"))?;
    Ok((text, stderr))
}

/// One folded stack: its root labels and frames `(function, file, line)`,
/// outermost first, and its count.
#[derive(Debug)]
struct Folded {
    frames: Vec<(String, String, Option<i64>)>,
    count: u64,
}

fn parse_folded(text: &str) -> anyhow::Result<Vec<Folded>> {
    text.lines()
        .map(|line| {
            let (stack, count) = line.rsplit_once(' ').context("no count")?;
            let frames = stack
                .split(';')
                .map(|label| match label.rsplit_once(" (") {
                    Some((function, rest)) => {
                        let rest = rest.trim_end_matches(')');
                        match rest.rsplit_once(':') {
                            Some((file, line)) if line.parse::<i64>().is_ok() => {
                                (function.to_owned(), file.to_owned(), line.parse().ok())
                            }
                            _ => (function.to_owned(), rest.to_owned(), None),
                        }
                    }
                    None => (label.to_owned(), String::new(), None),
                })
                .collect();
            Ok(Folded {
                frames,
                count: count.parse().context("count")?,
            })
        })
        .collect()
}

fn is_fixture(file: &str) -> bool {
    file.ends_with("profile_workload.py")
}

/// Samples whose innermost frame is the fixture's `function`.
fn leaf_samples(stacks: &[Folded], function: &str) -> u64 {
    ending_in(stacks, function).map(|s| s.count).sum()
}

/// Stacks whose innermost frame is the fixture's `function`.
fn ending_in<'a>(stacks: &'a [Folded], function: &'a str) -> impl Iterator<Item = &'a Folded> {
    stacks.iter().filter(move |s| {
        s.frames
            .last()
            .is_some_and(|(f, file, _)| f == function && is_fixture(file))
    })
}

#[test]
fn record_attributes_cpu_shares_to_functions_lines_and_call_chains() {
    for_each_interpreter("profile_shares", |interp| {
        let w = Workload::start(interp, &[])?;
        let pid = w.pid();
        let (text, stderr) = record(
            &[
                "--pid",
                &pid,
                "--rate",
                RATE,
                "--duration",
                "3",
                "--format",
                "folded",
                "--threads",
            ],
            "shares.txt",
        )?;
        let stacks = parse_folded(&text)?;
        let total: u64 = stacks.iter().map(|s| s.count).sum();
        // CPU-bound threads behind one GIL: about one CPU busy all along.
        ensure!(
            total >= 499 * 3 * 7 / 10,
            "only {total} samples in 3 s at 499 Hz; stderr: {stderr}"
        );
        let hot = leaf_samples(&stacks, "hot");
        let cold = leaf_samples(&stacks, "cold");
        let share = hot as f64 / (hot + cold) as f64;
        ensure!(
            (0.71..=0.79).contains(&share),
            "hot() has {hot} samples and cold() {cold}: {:.1}% hot, expected 75% ± 4",
            share * 100.0
        );
        ensure!(
            hot + cold >= total * 97 / 100,
            "hot+cold = {} of {total} samples",
            hot + cold
        );
        // Every sample in hot()/cold() is at its loop line, called from
        // work() at the call line, from worker(), from threading's
        // bootstrap, in a worker thread.
        let mut threads = BTreeSet::new();
        let mut off_loop = 0;
        for s in &stacks {
            let Some((leaf, file, line)) = s.frames.last() else {
                continue;
            };
            if !is_fixture(file) || (leaf != "hot" && leaf != "cold") {
                continue;
            }
            let (loop_mark, call_mark) = if leaf == "hot" {
                ("hot-loop", "call-hot")
            } else {
                ("cold-loop", "call-cold")
            };
            // The loop line, or (rarely: once per call) another line of
            // the function, from `def` to `return`.
            let body = w.line(loop_mark) - 2..=w.line(loop_mark) + 1;
            ensure!(
                line.is_some_and(|l| body.contains(&l)),
                "{leaf}() sampled at line {line:?}, expected {body:?}"
            );
            if *line != Some(w.line(loop_mark)) {
                off_loop += s.count;
            }
            let n = s.frames.len();
            ensure!(n >= 5, "short stack {:?}", s.frames);
            let tail: Vec<(&str, Option<i64>)> = s.frames[n - 3..]
                .iter()
                .map(|(f, _, l)| (f.as_str(), *l))
                .collect();
            ensure!(
                tail == [
                    ("worker", Some(w.line("call-work"))),
                    ("work", Some(w.line(call_mark))),
                    (leaf.as_str(), *line),
                ],
                "call chain {:?}",
                s.frames
            );
            let (root, _, _) = &s.frames[0];
            ensure!(
                root.starts_with("thread "),
                "no thread root: {:?}",
                s.frames
            );
            ensure!(
                s.frames[1].0.ends_with("_bootstrap"),
                "outermost Python frame is not threading's bootstrap: {:?}",
                s.frames
            );
            threads.insert(root.clone());
        }
        ensure!(
            off_loop * 100 <= hot + cold,
            "{off_loop} of {} samples in hot()/cold() not at their loop line",
            hot + cold
        );
        ensure!(
            threads.len() == 3,
            "hot()/cold() seen in {} threads: {threads:?}",
            threads.len()
        );
        // The main thread sleeps: on-CPU sampling sees it (almost) never.
        // Almost: it wakes 20 times a second and takes the GIL back from
        // three busy threads, on-CPU time that is really there (2-11
        // samples of 1500 in most runs, up to 29 on a busy VM). Sampled
        // while asleep it would have a quarter of them.
        let idle = leaf_samples(&stacks, "idle_wait");
        ensure!(
            idle * 100 <= total * 3,
            "{idle} samples of idle_wait() without --idle"
        );
        eprintln!(
            "  {}: {total} samples, hot {:.1}%, {} threads, idle_wait {idle}",
            interp.label,
            share * 100.0,
            threads.len()
        );
        Ok(())
    });
}

/// Samples and seconds from the closing line `N samples in S s (K off CPU, ...`.
fn summary_counts(stderr: &str) -> anyhow::Result<(u64, f64, u64)> {
    let line = stderr
        .lines()
        .find(|l| l.contains(" samples in ") && l.contains(" off CPU"))
        .context("no summary line")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |i: usize| words.get(i).copied().unwrap_or("");
    let samples = at(1).parse()?;
    let seconds = at(4).parse()?;
    let off = at(6).trim_start_matches('(').parse()?;
    Ok((samples, seconds, off))
}

#[test]
fn idle_adds_waiting_threads_at_their_line_at_the_sampling_rate() {
    for_each_interpreter("profile_idle", |interp| {
        // One worker on CPU, the main thread sleeping, and 200 threads
        // parked: reading every waiting thread at every tick could not keep
        // up at 999 Hz.
        let w = Workload::start(interp, &["1", "--parked", "200"])?;
        let pid = w.pid();
        let mut on_per_off = Vec::new();
        for rate in [99u64, 999] {
            let (text, stderr) = record(
                &[
                    "--pid",
                    &pid,
                    "--rate",
                    &rate.to_string(),
                    "--duration",
                    "1.5",
                    "--format",
                    "folded",
                    "--idle",
                ],
                "idle.txt",
            )?;
            let stacks = parse_folded(&text)?;
            let idle: Vec<&Folded> = ending_in(&stacks, "idle_wait").collect();
            let samples: u64 = idle.iter().map(|s| s.count).sum();
            // At its sleep line; a few at the loop line, where it may wait
            // to take the GIL back (off CPU there too).
            let at_sleep: u64 = idle
                .iter()
                .filter(|s| s.frames.last().map(|f| f.2) == Some(Some(w.line("sleep"))))
                .map(|s| s.count)
                .sum();
            ensure!(
                at_sleep * 10 >= samples * 9,
                "{at_sleep} of {samples} idle_wait() samples at the sleep line: {idle:?}"
            );
            // The main thread waits nearly all the time: it is owed `rate`
            // samples per second of the run, whatever the rate (the summary
            // gives the seconds to 0.1 s, hence the upper bound).
            let (_, seconds, off) = summary_counts(&stderr)?;
            let want = rate as f64 * seconds;
            ensure!(
                (0.85 * want..=1.06 * want).contains(&(samples as f64)),
                "{samples} idle_wait() samples at {rate} Hz in {seconds} s (want about {want:.0}); stderr: {stderr}"
            );
            ensure!(off >= samples, "summary's off-CPU count {off} < {samples}");
            // Each parked thread too (its samples are all in one stack: the
            // threads are not told apart without --threads).
            let parked: u64 = stacks
                .iter()
                .filter(|s| s.frames.iter().any(|f| f.0 == "parked"))
                .map(|s| s.count)
                .sum();
            let want = 200.0 * want;
            ensure!(
                (0.85 * want..=1.06 * want).contains(&(parked as f64)),
                "{parked} parked() samples at {rate} Hz in {seconds} s (want about {want:.0})"
            );
            // The worker's on-CPU samples against the main thread's off-CPU
            // ones: the same share at both rates.
            let on: u64 = ending_in(&stacks, "hot")
                .chain(ending_in(&stacks, "cold"))
                .map(|s| s.count)
                .sum();
            on_per_off.push(on as f64 / samples as f64);
        }
        let ratio = on_per_off[1] / on_per_off[0];
        ensure!(
            (0.8..=1.25).contains(&ratio),
            "on/off CPU shares change with the rate: {on_per_off:?}"
        );
        Ok(())
    });
}

#[test]
fn deep_stacks_are_walked_to_512_frames_then_marked_truncated() {
    for_each_interpreter("profile_deep", |interp| {
        for (depth, truncated) in [(300usize, false), (700, true)] {
            let w = Workload::start(interp, &["--deep", &depth.to_string()])?;
            let pid = w.pid();
            let (text, _) = record(
                &[
                    "--pid",
                    &pid,
                    "--rate",
                    RATE,
                    "--duration",
                    "1",
                    "--format",
                    "folded",
                ],
                "deep.txt",
            )?;
            let stacks = parse_folded(&text)?;
            let in_hot: Vec<&Folded> = ending_in(&stacks, "hot").collect();
            ensure!(!in_hot.is_empty(), "no samples in hot() at depth {depth}");
            for s in in_hot {
                let downs = s.frames.iter().filter(|(f, _, _)| f == "down").count();
                let marked = s.frames[0].0 == "[truncated]";
                if truncated {
                    // The innermost 512 Python frames: hot() and 511 down().
                    ensure!(
                        marked && downs == 511 && s.frames.len() == 513,
                        "depth {depth}: {} frames, {downs} down(), marked {marked}",
                        s.frames.len()
                    );
                } else {
                    ensure!(
                        !marked && downs == depth,
                        "depth {depth}: {downs} down() frames, marked {marked}"
                    );
                    let bottom = &s.frames[s.frames.len() - 2];
                    ensure!(
                        bottom.0 == "down" && bottom.2 == Some(w.line("call-bottom")),
                        "bottom frame {bottom:?}"
                    );
                }
            }
        }
        Ok(())
    });
}

#[test]
fn flamegraph_and_speedscope_files_are_valid_and_name_the_functions() {
    for_each_interpreter("profile_formats", |interp| {
        let w = Workload::start(interp, &[])?;
        let pid = w.pid();
        let (svg, _) = record(
            &["--pid", &pid, "--rate", RATE, "--duration", "1"],
            "profile.svg",
        )?;
        let mut reader = quick_xml::Reader::from_str(&svg);
        let mut titles = Vec::new();
        let mut in_title = false;
        loop {
            match reader.read_event() {
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(quick_xml::events::Event::Start(e)) => in_title = e.name().as_ref() == b"title",
                Ok(quick_xml::events::Event::Text(t)) if in_title => {
                    titles.push(String::from_utf8_lossy(&t).into_owned());
                }
                Ok(_) => {}
                Err(e) => bail!(
                    "flamegraph is not valid XML at {}: {e}",
                    reader.buffer_position()
                ),
            }
        }
        for name in ["hot (", "cold (", "work ("] {
            ensure!(
                titles.iter().any(|t| t.starts_with(name)),
                "no {name:?} frame in the flamegraph"
            );
        }

        let (json, _) = record(
            &[
                "--pid",
                &pid,
                "--rate",
                RATE,
                "--duration",
                "1",
                "--format",
                "speedscope",
                "--threads",
            ],
            "profile.speedscope.json",
        )?;
        let doc: Value = serde_json::from_str(&json).context("speedscope is not JSON")?;
        ensure!(
            doc["$schema"] == "https://www.speedscope.app/file-format-schema.json",
            "schema {}",
            doc["$schema"]
        );
        let frames = doc["shared"]["frames"].as_array().context("frames")?;
        let profiles = doc["profiles"].as_array().context("profiles")?;
        ensure!(
            profiles.len() >= 3,
            "{} profiles (one per thread)",
            profiles.len()
        );
        let mut names = BTreeSet::new();
        for p in profiles {
            ensure!(p["type"] == "sampled" && p["unit"] == "seconds", "{p}");
            let samples = p["samples"].as_array().context("samples")?;
            let weights = p["weights"].as_array().context("weights")?;
            ensure!(samples.len() == weights.len(), "samples and weights differ");
            for s in samples {
                for i in s.as_array().context("stack")? {
                    let frame = frames
                        .get(i.as_u64().context("index")? as usize)
                        .context("frame index out of range")?;
                    names.insert(frame["name"].as_str().unwrap_or("").to_owned());
                }
            }
        }
        for name in ["hot", "cold", "work", "worker"] {
            ensure!(names.contains(name), "speedscope lacks {name}: {names:?}");
        }

        let (json, _) = record(
            &[
                "--pid",
                &pid,
                "--rate",
                RATE,
                "--duration",
                "1",
                "--format",
                "chrometrace",
            ],
            "profile.trace.json",
        )?;
        check_chrometrace(&json, &w)?;
        Ok(())
    });
}

/// A chrometrace of the workload: per thread, slices begin and end in
/// order, properly nested, and each worker spends about 75% of its hot +
/// cold time in hot() (the fixture's share), named with its first line.
fn check_chrometrace(json: &str, w: &Workload) -> anyhow::Result<()> {
    let doc: Value = serde_json::from_str(json).context("chrometrace is not JSON")?;
    let events = doc["traceEvents"].as_array().context("traceEvents")?;
    // Open slices (name, start), µs in hot, µs in cold.
    type Thread = (Vec<(String, f64)>, f64, f64);
    let mut threads: BTreeMap<(u64, u64), Thread> = BTreeMap::new();
    let mut last_ts: BTreeMap<(u64, u64), f64> = BTreeMap::new();
    let hot_line = w.line("hot-loop") - 2;
    for e in events {
        let ph = e["ph"].as_str().context("ph")?;
        if ph == "M" {
            continue;
        }
        let thread = (
            e["pid"].as_u64().context("pid")?,
            e["tid"].as_u64().context("tid")?,
        );
        let name = e["name"].as_str().context("name")?.to_owned();
        let ts = e["ts"].as_f64().context("ts")?;
        let before = last_ts.insert(thread, ts).unwrap_or(0.0);
        ensure!(
            ts >= before,
            "time goes back on {thread:?}: {before} then {e}"
        );
        let (open, hot, cold) = threads.entry(thread).or_default();
        match ph {
            "B" => {
                if name == "hot" {
                    ensure!(e["args"]["line"].as_i64() == Some(hot_line), "{e}");
                }
                open.push((name, ts));
            }
            "E" => {
                let (begun, at) = open
                    .pop()
                    .with_context(|| format!("E with nothing open: {e}"))?;
                ensure!(begun == name, "{name} ends inside {begun}: {e}");
                match name.as_str() {
                    "hot" => *hot += ts - at,
                    "cold" => *cold += ts - at,
                    _ => {}
                }
            }
            other => bail!("unexpected phase {other}: {e}"),
        }
    }
    let workers: Vec<_> = threads
        .iter()
        .filter(|(_, (_, hot, cold))| hot + cold > 0.0)
        .collect();
    ensure!(
        workers.len() == 3,
        "{} threads ran hot/cold, want 3",
        workers.len()
    );
    for (thread, (open, hot, cold)) in workers {
        ensure!(open.is_empty(), "{thread:?} left slices open: {open:?}");
        let share = hot / (hot + cold);
        ensure!(
            (0.6..=0.9).contains(&share),
            "{thread:?}: hot {share:.2} of hot + cold time, want about 0.75"
        );
    }
    Ok(())
}

#[test]
fn top_shows_hot_first_with_its_share() {
    for_each_interpreter("profile_top", |interp| {
        let w = Workload::start(interp, &[])?;
        let pid = w.pid();
        let out = Command::new(pyprobe_bin())
            .args([
                "top",
                "--pid",
                &pid,
                "--rate",
                RATE,
                "--json",
                "--interval",
                "1",
                "--duration",
                "2",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last: Value = serde_json::from_str(stdout.lines().last().context("no view")?)?;
        ensure!(last["kind"] == "final", "{last}");
        let functions = last["functions"].as_array().context("functions")?;
        let row = |name: &str| {
            functions
                .iter()
                .find(|f| f["function"] == name)
                .with_context(|| format!("no {name} row"))
        };
        let hot = row("hot")?;
        let cold = row("cold")?;
        ensure!(
            functions[0]["function"] == "hot",
            "first row {}",
            functions[0]
        );
        ensure!(
            hot["first_line"].as_i64() == Some(w.line("hot-loop") - 2),
            "{hot}"
        );
        let (h, c) = (
            hot["own"].as_u64().unwrap_or(0),
            cold["own"].as_u64().unwrap_or(0),
        );
        let share = h as f64 / (h + c) as f64;
        ensure!((0.71..=0.79).contains(&share), "hot own share {share}");
        // work() is on the stack of both: its total covers them, its own is ~0.
        let work = row("work")?;
        ensure!(work["total"].as_u64() >= Some(h + c), "{work}");
        // The final view's shares are over the whole run, not its last
        // (partial, perhaps empty) interval.
        let samples = last["summary"]["samples"].as_u64().context("samples")? as f64;
        for f in [hot, cold, work] {
            for (share, count) in [("own_percent", "own"), ("total_percent", "total")] {
                let want = 100.0 * f[count].as_u64().unwrap_or(0) as f64 / samples;
                let got = f[share].as_f64().unwrap_or(-1.0);
                ensure!((got - want).abs() < 1e-6, "{share} {got}, want {want}: {f}");
            }
        }
        ensure!(
            hot["own_percent"].as_f64() > Some(50.0),
            "hot's share of the run: {hot}"
        );
        Ok(())
    });
}

#[test]
fn code_objects_at_a_reused_address_keep_their_own_names() {
    for_each_interpreter("profile_code_reuse", |interp| {
        let mut fixture = Fixture::start(interp, "code_reuse.py", &["--spin", "0.3"])?;
        let pid = fixture.pid().to_string();
        let path =
            std::env::temp_dir().join(format!("pyprobe-test-{}-reuse.txt", std::process::id()));
        let path_arg = path.to_str().context("temp path")?;
        let probe = Probe::start(&[
            "record", "--pid", &pid, "--rate", RATE, "--format", "folded", "-o", path_arg,
        ])?;
        let report: Value = serde_json::from_str(&fixture.call("run", "{")?)?;
        fixture.expect("done")?;
        probe.interrupt();
        let (ok, _, stderr) = probe.finish()?;
        ensure!(ok, "pyprobe record failed: {stderr}");
        ensure!(
            report["reused"].as_u64() >= Some(3),
            "the fixture reused too few addresses: {report}"
        );
        let stacks = parse_folded(&std::fs::read_to_string(&path)?)?;
        let mut per_generation: BTreeMap<String, u64> = BTreeMap::new();
        for s in &stacks {
            let Some((function, file, line)) = s.frames.last() else {
                continue;
            };
            if file != "<code_reuse>" {
                continue;
            }
            let g: i64 = function
                .strip_prefix("gen_")
                .and_then(|g| g.parse().ok())
                .with_context(|| format!("frame {function:?}"))?;
            // gen_g starts at line g + 1 and spins at its 4th line.
            ensure!(
                line.is_some_and(|l| (g + 1..=g + 4).contains(&l)),
                "{function} sampled at line {line:?}, outside its lines {}..={}",
                g + 1,
                g + 4
            );
            *per_generation.entry(function.clone()).or_default() += s.count;
        }
        // 0.3 s of CPU each at 499 Hz: about 150 samples per generation.
        for g in 0..6 {
            let n = per_generation
                .get(&format!("gen_{g}"))
                .copied()
                .unwrap_or(0);
            ensure!(
                (100..=200).contains(&n),
                "gen_{g}: {n} samples, expected about 150: {per_generation:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn gil_keeps_only_samples_of_the_thread_holding_it() {
    for_each_interpreter("profile_gil", |interp| {
        let w = Workload::start(interp, &["--hash"])?;
        let pid = w.pid();
        let hashing = |stacks: &[Folded]| -> u64 {
            stacks
                .iter()
                .filter(|s| {
                    s.frames
                        .iter()
                        .any(|(f, _, l)| f == "hashing" && *l == Some(w.line("hash")))
                })
                .map(|s| s.count)
                .sum()
        };
        let args = [
            "--pid",
            &pid,
            "--rate",
            RATE,
            "--duration",
            "2",
            "--format",
            "folded",
        ];
        let (all, _) = record(&args, "gil-all.txt")?;
        let all = parse_folded(&all)?;
        let (held, stderr) = record(&[&args[..], &["--gil"]].concat(), "gil-held.txt")?;
        let held = parse_folded(&held)?;
        // sha256 of 8 MB runs without the GIL: on CPU beside the worker.
        let (free, kept) = (hashing(&all), hashing(&held));
        ensure!(free >= 250, "{free} samples in hashing() without --gil");
        ensure!(
            kept * 10 <= free,
            "--gil kept {kept} of hashing()'s {free} samples; stderr: {stderr}"
        );
        let hot = leaf_samples(&held, "hot");
        ensure!(hot >= 250, "--gil kept only {hot} samples of hot()");
        ensure!(
            !stderr.contains(" 0 not holding the GIL"),
            "no sample was dropped for not holding the GIL: {stderr}"
        );
        Ok(())
    });
}

#[test]
fn all_samples_every_python_process_apart() {
    let found = pyprobe_tests::discover();
    let interps: Vec<&Interpreter> = found.supported.iter().take(2).collect();
    assert!(
        interps.len() == 2,
        "needs two interpreters: {:?}",
        found.supported
    );
    let a = Workload::start(interps[0], &["1"]).unwrap();
    let b = Workload::start(interps[1], &["1"]).unwrap();
    let (text, stderr) = record(
        &[
            "--all",
            "--rate",
            RATE,
            "--duration",
            "2",
            "--format",
            "folded",
        ],
        "all.txt",
    )
    .unwrap();
    let stacks = parse_folded(&text).unwrap();
    for w in [&a, &b] {
        // The root frame `process PID (command)`, split like any frame.
        let root = format!("process {}", w.pid());
        let hot: u64 = ending_in(&stacks, "hot")
            .filter(|s| s.frames[0].0 == root)
            .map(|s| s.count)
            .sum();
        // Two single-threaded CPU-bound processes on their own CPUs.
        assert!(
            hot >= 499 * 2 / 2,
            "{hot} samples of hot() under {root}; stderr: {stderr}"
        );
    }
}

/// `record -o x.pb.gz --every 1` (pprof, from the name): a file there
/// before stays as it was until the first write; the profile so far is
/// written every second and at SIGUSR1 while recording goes on (each a whole gzip'd
/// profile.proto that `go tool pprof` reads), and the last one at the end
/// has the fixture's hot function and line on top, then cold.
fn pprof_written_so_far_and_at_the_end(interp: &Interpreter) -> anyhow::Result<()> {
    let w = Workload::start(interp, &[])?;
    let pid = w.pid();
    let path =
        std::env::temp_dir().join(format!("pyprobe-test-{}-every.pb.gz", std::process::id()));
    let path_text = path.display().to_string();
    // A file there before is left alone until the first profile replaces
    // it; the format follows the name (.pb.gz).
    std::fs::write(&path, b"an older profile")?;
    let probe = Probe::start(&[
        "record", "--pid", &pid, "--rate", RATE, "--every", "1", "-o", &path_text,
    ])?;
    ensure!(
        std::fs::read(&path)? == b"an older profile",
        "the file was changed before the first write"
    );
    // The writes so far, as pyprobe reports them: (samples, file's bytes).
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut said = Vec::new();
    let wrote = |line: &str| -> Option<u64> {
        line.split("wrote ")
            .nth(1)?
            .split(" (")
            .nth(1)?
            .split(' ')
            .next()?
            .parse()
            .ok()
    };
    while writes.len() < 2 {
        let line = probe
            .stderr_line(Duration::from_secs(3))
            .with_context(|| format!("no periodic write within 3 s: {said:?}"))?;
        if let Some(n) = wrote(&line) {
            writes.push((n, std::fs::read(&path)?));
        }
        said.push(line);
    }
    // SIGUSR1 writes one more at once: samples taken since the last
    // write, well before the next periodic one.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(probe.pid() as i32, libc::SIGUSR1) };
    let line = probe
        .stderr_line(Duration::from_millis(400))
        .context("no write within 0.4 s of SIGUSR1")?;
    let n = wrote(&line).with_context(|| format!("after SIGUSR1: {line}"))?;
    writes.push((n, std::fs::read(&path)?));
    ensure!(
        writes.windows(2).all(|p| p[0].0 < p[1].0),
        "sample counts of the writes do not grow: {:?}",
        writes.iter().map(|w| w.0).collect::<Vec<_>>()
    );
    for (samples, bytes) in &writes {
        let report = go_pprof(bytes, &["-raw"])?;
        let total: u64 = report
            .lines()
            .skip_while(|l| !l.starts_with("Samples:"))
            .skip(2)
            .take_while(|l| !l.starts_with("Locations"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        ensure!(
            total == *samples,
            "the profile written at {samples} samples holds {total}: {report}"
        );
    }
    probe.interrupt();
    let (ok, _, stderr) = probe.finish()?;
    ensure!(ok, "pyprobe failed: {stderr}");
    let last = std::fs::read(&path)?;
    let _ = std::fs::remove_file(&path);
    let report = go_pprof(&last, &["-top", "-lines"])?;
    let rows = pprof_top_rows(&report);
    let hot = format!("/profile_workload.py:{}", w.line("hot-loop"));
    let cold = format!("/profile_workload.py:{}", w.line("cold-loop"));
    ensure!(
        rows.len() >= 2
            && rows[0].1 == "hot"
            && rows[0].2.ends_with(&hot)
            && rows[1].1 == "cold"
            && rows[1].2.ends_with(&cold),
        "hot then cold expected on top ({hot}, {cold}): {report}"
    );
    Ok(())
}

#[test]
fn record_writes_pprof_so_far_every_interval_and_at_sigusr1() {
    for_each_newest_pyenv(
        "record_writes_pprof_so_far_every_interval_and_at_sigusr1",
        "writing a profile does not depend on the interpreter",
        "not run (pprof output: newest pyenv build)",
        pprof_written_so_far_and_at_the_end,
    );
}
