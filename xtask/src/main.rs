//! `cargo xtask`: pyprobe's developer tasks. Runs on stable Rust.
//!
//! - `setup`: installs what building pyprobe needs (nightly `rust-src`,
//!   `bpf-linker` built against rustc's own LLVM), idempotently.
//! - `test`: setup, lint, unprivileged tests, then the privileged
//!   integration tests as root, and a summary naming every interpreter.
//! - `demo`: setup, build, run pyprobe against a bundled fixture.
//! - `man`: setup, build, write pyprobe's man pages into `target/man`.

mod bench;
mod demo;
mod setup;
mod sid;
mod test;
mod util;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "pyprobe developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing to build pyprobe (idempotent; minutes the first time, seconds after).
    Setup,
    /// Set up, lint, run the unprivileged tests, then the privileged integration tests (needs root).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Only run privileged tests whose name contains this.
        filter: Option<String>,
    },
    /// Benchmarks, measured side by side in one run (needs root).
    Bench {
        /// Runs per measurement.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Only these benchmarks (repeatable): startup, dump, profile, calls, scale, logpoint, agent,
        /// agent-soak (the agent's soak test for $PYPROBE_SOAK_SECONDS, 600 by default)
        /// (logpoint-framework: only its framework-like workload).
        #[arg(long, value_name = "NAME", value_parser = ["startup", "dump", "profile", "calls", "scale", "logpoint", "logpoint-framework", "agent", "agent-soak"])]
        only: Vec<String>,
        /// Only interpreters whose path contains this (e.g. 3.12, /usr/bin).
        #[arg(long, value_name = "TEXT")]
        python: Option<String>,
    },
    /// Regenerate the memory snapshots the offline tests replay (needs root).
    Snapshots,
    /// Set up, build, and write pyprobe's man pages (pyprobe.1, pyprobe-record.1, ...).
    Man {
        /// Where to write them (default: target/man).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Set up, build, and run pyprobe against a live demo fixture.
    Demo {
        /// Python interpreter to run the fixture with (default: the system python3).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Seconds to watch the fixture.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Run this pyprobe binary instead of building one (the test of
        /// the demo does: a cargo build inside a test run would wait on
        /// cargo's lock).
        #[arg(long, value_name = "PATH")]
        pyprobe: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::setup().map(|_| ()),
        Task::Test { no_lint, filter } => test::test(!no_lint, filter.as_deref()),
        Task::Demo {
            python,
            duration,
            pyprobe,
        } => demo::demo(python, duration, pyprobe),
        Task::Man { out } => demo::man(out),
        Task::Snapshots => test::snapshots(),
        Task::Bench { runs, only, python } => bench::bench(runs, &only, python),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
