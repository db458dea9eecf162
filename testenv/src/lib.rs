//! Where the interpreters pyprobe is tested and benchmarked on live: the
//! pyenv builds, the system's `/usr/bin/python3.N` and the private Debian
//! sid interpreters `cargo xtask setup` unpacks. One place for the
//! integration tests, the benchmarks and the unit tests that read real
//! builds, so that a moved directory is changed once.
//!
//! Only paths: nothing here runs an interpreter.

use std::path::PathBuf;

/// The pyenv builds the unit tests read by name (their offsets, DWARF and
/// machine code are checked against each other); `cargo xtask setup`
/// installs them.
pub const PYENV_BUILDS: [&str; 6] = ["3.8.18", "3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0"];

/// `$HOME`.
pub fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
}

/// `$PYENV_ROOT`, else `~/.pyenv`.
pub fn pyenv_root() -> PathBuf {
    std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".pyenv"))
}

/// `x.y` of `x.y.z`.
fn minor_of(version: &str) -> &str {
    version.rsplit_once('.').map_or(version, |(minor, _)| minor)
}

/// The executable of pyenv build `version` (`x.y.z`).
pub fn pyenv_python(version: &str) -> PathBuf {
    pyenv_root().join(format!(
        "versions/{version}/bin/python{}",
        minor_of(version)
    ))
}

/// The `libpython` of pyenv build `version` (`x.y.z`, built shared).
pub fn pyenv_library(version: &str) -> PathBuf {
    pyenv_root().join(format!(
        "versions/{version}/lib/libpython{}.so.1.0",
        minor_of(version)
    ))
}

/// Every pyenv version directory with a `3.N` or `2.N` name, sorted by
/// (major, minor, micro), with its executable `bin/pythonX.Y` (which may
/// be missing in a broken install).
pub fn pyenv_versions() -> Vec<((u32, u32, u32), PathBuf)> {
    let mut out: Vec<((u32, u32, u32), PathBuf)> = std::fs::read_dir(pyenv_root().join("versions"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('.').map(|p| p.parse::<u32>().ok());
            let (major, minor) = (parts.next()??, parts.next()??);
            let micro = parts.next().flatten().unwrap_or(0);
            let exe = entry
                .path()
                .join("bin")
                .join(format!("python{major}.{minor}"));
            Some(((major, minor, micro), exe))
        })
        .collect();
    out.sort();
    out
}

/// Every `/usr/bin/python3.N`, by N.
pub fn system_pythons() -> Vec<(u32, PathBuf)> {
    let mut out: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/bin")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let minor = name.strip_prefix("python3.")?.parse().ok()?;
            Some((minor, entry.path()))
        })
        .collect();
    out.sort();
    out
}

/// A Python process that sleeps for 30 s (killed when dropped), on the
/// first interpreter installed (a system one, else pyenv's), for tests
/// that need one live: panics when there is none.
pub fn sleeping_python() -> KilledOnDrop {
    let python = system_pythons()
        .into_iter()
        .map(|(_, exe)| exe)
        .chain(pyenv_versions().into_iter().map(|(_, exe)| exe))
        .find(|exe| exe.exists())
        .expect("a Python interpreter (cargo xtask setup installs them)");
    let child = std::process::Command::new(&python)
        .args(["-c", "import time; time.sleep(30)"])
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", python.display()));
    KilledOnDrop(child)
}

/// A child process killed and reaped when this goes.
pub struct KilledOnDrop(pub std::process::Child);

impl KilledOnDrop {
    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pyprobe's data directory: `${XDG_DATA_HOME:-~/.local/share}/pyprobe`.
pub fn data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".local/share"))
        .join("pyprobe")
}

/// Where `cargo xtask setup` unpacks Debian sid's interpreters:
/// `<data dir>/debian-sid` (`bin/` wrappers, `root/` the packages).
pub fn sid_dir() -> PathBuf {
    data_dir().join("debian-sid")
}

/// The wrapper that runs sid's `python3.N` (it `exec`s the interpreter, so
/// its PID is the interpreter's).
pub fn sid_python(minor: u32) -> PathBuf {
    sid_dir().join(format!("bin/python3.{minor}"))
}

/// A memory figure of process `pid` from `/proc/PID/status`, in kB:
/// `field` is e.g. `VmRSS` (resident now) or `VmHWM` (peak resident).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyenv_paths_follow_the_version() {
        // SAFETY (edition 2024 marks set_var unsafe): single-threaded here
        // in that no other test of this crate reads PYENV_ROOT.
        unsafe { std::env::set_var("PYENV_ROOT", "/opt/pyenv") };
        assert_eq!(
            pyenv_python("3.10.13"),
            PathBuf::from("/opt/pyenv/versions/3.10.13/bin/python3.10")
        );
        assert_eq!(
            pyenv_library("3.8.18"),
            PathBuf::from("/opt/pyenv/versions/3.8.18/lib/libpython3.8.so.1.0")
        );
    }
}
