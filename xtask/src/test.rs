//! `cargo xtask test`: the whole suite, the way CI runs it.
//!
//! 1. setup (idempotent);
//! 2. lint: `cargo fmt --check`, `cargo clippy -D warnings`;
//! 3. unprivileged tests: `cargo test` on the default members;
//! 4. privileged integration tests (`tests/`), as root, one test thread;
//! 5. a summary naming every interpreter each privileged test covered.
//!
//! Not being root, or a kernel without BPF/BTF/uprobes, is an error with the
//! reason: the privileged half is never skipped silently.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use crate::{
    setup,
    util::{self, cargo, describe, run, workspace_root},
};

/// Totals parsed from cargo's `test result:` lines.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Self) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
fn parse_result_line(line: &str) -> Option<Totals> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut totals = Totals::default();
    for part in rest.split([';', '.']) {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => totals.passed = n,
            "failed" => totals.failed = n,
            "ignored" => totals.ignored = n,
            _ => {}
        }
    }
    Some(totals)
}

/// Runs a `cargo test` command, echoing its stdout and adding up its results.
fn cargo_test(cmd: &mut Command) -> anyhow::Result<(Totals, bool)> {
    println!("$ {}", describe(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    let mut totals = Totals::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(t) = parse_result_line(&line) {
            totals += t;
        }
    }
    let ok = child.wait()?.success();
    Ok((totals, ok))
}

/// Why the privileged tests cannot run here, if they cannot.
fn privileged_blocker() -> Option<String> {
    if !util::is_root() {
        return Some(
            "the privileged integration tests need root: run `sudo -E cargo xtask test` \
             (or as root)"
                .into(),
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("this kernel has no BTF (/sys/kernel/btf/vmlinux): pyprobe needs CONFIG_DEBUG_INFO_BTF=y".into());
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        return Some("this kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe): pyprobe needs CONFIG_UPROBES=y".into());
    }
    None
}

/// Runs the whole suite.
pub fn test(lint: bool, filter: Option<&str>) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::setup()?;

    if lint {
        println!("\n== lint ==");
        run(cargo()?.args(["fmt", "--all", "--check"]))
            .context("formatting differs: run `cargo fmt --all`")?;
        run(cargo()?.args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
        run(cargo()?.args([
            "clippy",
            "-p",
            "pyprobe-tests",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }

    println!("\n== unprivileged tests ==");
    let (unprivileged, unprivileged_ok) = cargo_test(cargo()?.args(["test"]))?;

    println!("\n== privileged integration tests ==");
    if let Some(reason) = privileged_blocker() {
        bail!("cannot run the privileged tests: {reason}");
    }
    run(cargo()?.args(["build", "-p", "pyprobe", "--bin", "pyprobe"]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join("target"));
    let coverage = target_dir.join("pyprobe-coverage.tsv");
    let _ = std::fs::remove_file(&coverage);
    let mut cmd = cargo()?;
    cmd.args([
        "test",
        "--no-fail-fast",
        "-p",
        "pyprobe-tests",
        "--",
        "--test-threads=1",
    ])
    .env("PYPROBE_BIN", target_dir.join("debug").join("pyprobe"))
    // The demo's test runs this very binary.
    .env("PYPROBE_XTASK", std::env::current_exe()?)
    .env("PYPROBE_COVERAGE_FILE", &coverage);
    if let Some(filter) = filter {
        cmd.arg(filter);
    }
    let (privileged, privileged_ok) = cargo_test(&mut cmd)?;

    println!("\n== summary ==");
    let interpreters = print_coverage(&coverage)?;
    println!(
        "unprivileged tests: {} passed, {} failed; privileged tests: {} passed, {} failed",
        unprivileged.passed, unprivileged.failed, privileged.passed, privileged.failed
    );
    println!("wall time: {:.0}s", started.elapsed().as_secs_f64());
    let mut all = unprivileged;
    all += privileged;
    println!("summary: {} passed, {} failed", all.passed, all.failed);
    if !unprivileged_ok || !privileged_ok || all.failed > 0 {
        bail!("tests failed");
    }
    if interpreters == 0 && filter.is_none() {
        bail!("the privileged tests covered no Python interpreter");
    }
    Ok(())
}

/// Regenerates `userspace/tests/data/snapshots` from live fixtures.
pub fn snapshots() -> anyhow::Result<()> {
    setup::setup()?;
    if let Some(reason) = privileged_blocker() {
        bail!("cannot take snapshots: {reason}");
    }
    run(cargo()?.args([
        "test",
        "-p",
        "pyprobe-tests",
        "--test",
        "dump",
        "--",
        "--ignored",
        "--exact",
        "save_snapshots_for_offline_tests",
        "--nocapture",
    ]))
}

/// Prints, per interpreter, how many per-interpreter tests passed on it;
/// returns how many supported interpreters were covered.
fn print_coverage(path: &Path) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // interpreter -> (ok, failed, not run), in the order the tests ran
    // them
    let mut table: Vec<(String, (u32, u32, u32))> = Vec::new();
    let mut unsupported = BTreeSet::new();
    for line in text.lines() {
        let mut cols = line.split('\t');
        let (Some(_test), Some(interp), Some(result)) = (cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        if result == "unsupported" {
            unsupported.insert(interp.to_owned());
            continue;
        }
        let index = match table.iter().position(|(name, _)| name == interp) {
            Some(i) => i,
            None => {
                table.push((interp.to_owned(), (0, 0, 0)));
                table.len() - 1
            }
        };
        let counts = &mut table[index].1;
        if result == "ok" {
            counts.0 += 1;
        } else if result.starts_with("not run") {
            // A test for a subset (containers), which says why.
            counts.2 += 1;
        } else {
            counts.1 += 1;
        }
    }
    println!("Python interpreters covered by the privileged tests:");
    for (interp, (ok, failed, not_run)) in &table {
        let status = if *failed == 0 { "ok" } else { "FAILED" };
        let not_run = if *not_run == 0 {
            String::new()
        } else {
            format!(", {not_run} not run (subset tests)")
        };
        println!("  {interp:<40} {ok} passed, {failed} failed{not_run}  {status}");
    }
    let missing: Vec<String> = (8..=15)
        .filter(|minor| {
            !table
                .iter()
                .any(|(interp, _)| label_minor(interp) == Some(*minor))
        })
        .map(|minor| format!("3.{minor}"))
        .collect();
    if !missing.is_empty() {
        println!(
            "supported versions with no interpreter here, NOT covered: {} (cargo xtask setup installs Debian sid's 3.13, 3.14 and 3.15)",
            missing.join(", ")
        );
    }
    if !unsupported.is_empty() {
        println!(
            "found but outside pyprobe's 3.8-3.15 range, not tested: {}",
            unsupported.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(table.len())
}

/// The minor version in an interpreter label such as `pyenv 3.11.7` or
/// `system /usr/bin/python3.11 (3.11.2)`: the last `3.N.M` in it.
fn label_minor(label: &str) -> Option<u32> {
    label
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|word| {
            let mut parts = word.split('.');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("3"), Some(minor), Some(micro), None) if !micro.is_empty() => {
                    minor.parse().ok()
                }
                _ => None,
            }
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_test_result_lines() {
        let t = parse_result_line(
            "test result: ok. 17 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.08s",
        )
        .unwrap();
        assert_eq!((t.passed, t.failed, t.ignored), (17, 2, 1));
        assert!(parse_result_line("running 3 tests").is_none());
    }

    #[test]
    fn finds_the_minor_version_in_interpreter_labels() {
        assert_eq!(label_minor("pyenv 3.11.7"), Some(11));
        assert_eq!(label_minor("system /usr/bin/python3.11 (3.11.2)"), Some(11));
        assert_eq!(label_minor("debian-sid 3.14.10"), Some(14));
        assert_eq!(label_minor("something else"), None);
    }
}
