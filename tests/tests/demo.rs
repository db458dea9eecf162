//! `cargo xtask demo`, the first thing a newcomer runs: every job shows
//! real figures on the bundled demo service.
//!
//! Needs root (run through `cargo xtask test`).

use std::{path::PathBuf, process::Command};

use pyprobe_tests::pyprobe_bin;

#[test]
fn the_demo_shows_every_job_with_real_figures() {
    // `cargo xtask test` says where its binary is; else it sits beside
    // pyprobe's (both built into one target directory).
    let xtask = std::env::var_os("PYPROBE_XTASK")
        .map(PathBuf::from)
        .unwrap_or_else(|| pyprobe_bin().with_file_name("xtask"));
    assert!(
        xtask.exists(),
        "no xtask binary at {} (run the tests through cargo xtask test, or set PYPROBE_XTASK)",
        xtask.display()
    );
    let out = Command::new(&xtask)
        .args(["demo", "--pyprobe"])
        .arg(pyprobe_bin())
        .output()
        .expect("running cargo xtask demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed: {stdout}\n{stderr}");
    for command in ["calls", "top", "record", "log", "dump"] {
        assert!(
            stdout.contains(&format!("$ pyprobe {command} ")),
            "the demo did not run pyprobe {command}: {stdout}"
        );
    }
    // Its closing line, and the hits themselves: --count 5.
    let done = stdout
        .lines()
        .find_map(|l| l.strip_prefix("xtask demo: done: "))
        .unwrap_or_else(|| panic!("no closing line: {stdout}"));
    let numbers: Vec<u64> = done
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let hits = stdout
        .lines()
        .filter(|l| !l.starts_with("$ ") && l.contains(": total="))
        .count() as u64;
    assert!(
        numbers.len() == 2 && numbers[0] == 5 && hits == 5 && numbers[1] >= 100,
        "expected 5 log point hits and a profile of at least 100 samples: {done} ({hits} hit lines)"
    );
}
