//! Small helpers for running commands and locating things.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output},
};

use anyhow::{Context, bail};

/// The workspace root (parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// `$HOME`.
pub fn home() -> anyhow::Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// `$CARGO_HOME`, or `~/.cargo`.
pub fn cargo_home() -> anyhow::Result<PathBuf> {
    match std::env::var_os("CARGO_HOME") {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(home()?.join(".cargo")),
    }
}

/// `PATH` with `$CARGO_HOME/bin` first, so the `bpf-linker` that setup
/// installed is the one builds find.
pub fn path_with_cargo_bin() -> anyhow::Result<std::ffi::OsString> {
    let mut dirs = vec![cargo_home()?.join("bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    Ok(std::env::join_paths(dirs)?)
}

/// A `cargo` command (the one running xtask) in the workspace root, with
/// `$CARGO_HOME/bin` on `PATH`.
pub fn cargo() -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env("PATH", path_with_cargo_bin()?);
    Ok(cmd)
}

/// Runs `cmd`, inheriting stdio; fails if it does not succeed.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and captures its output; fails if it cannot start.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot run {}", describe(cmd)))
}

/// Runs `cmd` and returns its stdout as text if it succeeds.
pub fn stdout_of(cmd: &mut Command) -> anyhow::Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Whether we run as root.
pub fn is_root() -> bool {
    // /proc/self/status "Uid: real effective saved fs"
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A child process (a fixture) killed and reaped however the task ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
