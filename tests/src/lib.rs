//! The harness shared by pyprobe's integration tests (and usable by anything
//! that needs a live Python process with known behaviour):
//!
//! - [`discover`] finds every interpreter on the machine: each pyenv version,
//!   the distribution's own `/usr/bin/python3.X`, and the private Debian sid
//!   3.14 that `cargo xtask setup` installs.
//! - [`Fixture`] starts a program from `fixtures/` under one interpreter,
//!   waits for its `ready` line (never a sleep), talks to it over
//!   stdin/stdout, and kills it on drop.
//! - [`for_each_interpreter`] runs a check on every supported interpreter,
//!   reports each result, and records coverage for `cargo xtask test`'s
//!   summary.

use std::{
    fs::OpenOptions,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::Duration,
};

use anyhow::{Context, bail};

/// Oldest and newest CPython minor versions pyprobe supports.
pub const SUPPORTED: ((u32, u32), (u32, u32)) = ((3, 8), (3, 14));

/// How long a fixture may take to print `ready` or answer a command.
pub const FIXTURE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where an interpreter comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// A pyenv build (`$PYENV_ROOT/versions/X.Y.Z`): shared libpython with
    /// DWARF.
    Pyenv,
    /// The distribution's `/usr/bin/python3.X` (Debian: stripped, libpython
    /// linked into the executable).
    System,
    /// Installed by `cargo xtask setup` in pyprobe's data directory: Debian
    /// sid's stripped 3.14, started by a wrapper through sid's own dynamic
    /// loader (so the process's exe is the loader).
    Private,
}

/// A Python interpreter found on the machine.
#[derive(Debug, Clone)]
pub struct Interpreter {
    /// Human-readable name used in reports, e.g. `pyenv 3.11.7`.
    pub label: String,
    /// Executable to run (for [`Origin::Private`], a wrapper script).
    pub path: PathBuf,
    /// The ELF file that holds the interpreter loop, as pyprobe should
    /// report it: `sys.executable`, symlinks resolved.
    pub binary: PathBuf,
    /// `sys.version_info[:3]`, as reported by the interpreter itself.
    pub version: (u32, u32, u32),
    /// Where it comes from.
    pub origin: Origin,
}

impl Interpreter {
    /// `(major, minor)`.
    pub fn minor(&self) -> (u32, u32) {
        (self.version.0, self.version.1)
    }

    /// Whether pyprobe supports this version.
    pub fn supported(&self) -> bool {
        let (lo, hi) = SUPPORTED;
        (lo..=hi).contains(&self.minor())
    }
}

/// The interpreters found on this machine.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// Interpreters in pyprobe's supported range: every test runs on each.
    pub supported: Vec<Interpreter>,
    /// Interpreters found but outside the supported range (reported, not
    /// tested).
    pub unsupported: Vec<Interpreter>,
}

/// Finds every pyenv version, every `/usr/bin/python3.N` and every wrapper in
/// [`private_dir`]`/bin`.
pub fn discover() -> Discovery {
    let mut found: Vec<Interpreter> = Vec::new();
    let pyenv_root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")));
    if let Some(root) = pyenv_root {
        let mut dirs: Vec<_> = std::fs::read_dir(root.join("versions"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        dirs.sort();
        for dir in dirs {
            let name = dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let mut parts = name.split('.');
            let (Some(major), Some(minor)) = (parts.next(), parts.next()) else {
                continue;
            };
            let exe = dir.join("bin").join(format!("python{major}.{minor}"));
            if let Some((version, binary)) = query(&exe) {
                found.push(Interpreter {
                    label: format!("pyenv {}.{}.{}", version.0, version.1, version.2),
                    path: exe,
                    binary,
                    version,
                    origin: Origin::Pyenv,
                });
            }
        }
    }
    let mut system: Vec<PathBuf> = std::fs::read_dir("/usr/bin")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.strip_prefix("python3.")
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    system.sort();
    for exe in system {
        // Skip symlinks into a pyenv tree already listed.
        let real = std::fs::canonicalize(&exe).unwrap_or_else(|_| exe.clone());
        if found
            .iter()
            .any(|i| std::fs::canonicalize(&i.path).ok().as_ref() == Some(&real))
        {
            continue;
        }
        if let Some((version, binary)) = query(&exe) {
            found.push(Interpreter {
                binary,
                label: format!(
                    "system {} ({}.{}.{})",
                    exe.display(),
                    version.0,
                    version.1,
                    version.2
                ),
                path: exe,
                version,
                origin: Origin::System,
            });
        }
    }
    let private = private_dir().join("bin");
    let mut wrappers: Vec<PathBuf> = std::fs::read_dir(&private)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    wrappers.sort();
    for exe in wrappers {
        if let Some((version, binary)) = query(&exe) {
            found.push(Interpreter {
                label: format!("debian-sid {}.{}.{}", version.0, version.1, version.2),
                path: exe,
                binary,
                version,
                origin: Origin::Private,
            });
        }
    }
    found.sort_by_key(|i| (i.version, i.origin));
    let (supported, unsupported) = found.into_iter().partition(Interpreter::supported);
    Discovery {
        supported,
        unsupported,
    }
}

/// Where `cargo xtask setup` puts private interpreters:
/// `${XDG_DATA_HOME:-~/.local/share}/pyprobe/debian-sid`.
pub fn private_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_default()
        .join("pyprobe")
        .join("debian-sid")
}

/// `sys.version_info[:3]` and the real path of `sys.executable`.
fn query(exe: &Path) -> Option<((u32, u32, u32), PathBuf)> {
    let out = Command::new(exe)
        .args([
            "-c",
            "import sys; print('%d %d %d' % sys.version_info[:3]); print(sys.executable)",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut lines = text.lines();
    let mut it = lines.next()?.split_whitespace().map(|s| s.parse::<u32>());
    let version = match (it.next(), it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => (a, b, c),
        _ => return None,
    };
    let binary = std::fs::canonicalize(lines.next()?).ok()?;
    Some((version, binary))
}

/// Path of a program in `fixtures/`.
pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fixtures")
        .join(name)
}

/// A fixture program running under one interpreter. Killed on drop.
pub struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    name: String,
}

impl Fixture {
    /// Starts `fixtures/<script>` under `interp` with `args` and waits for its
    /// `ready` line.
    pub fn start(interp: &Interpreter, script: &str, args: &[&str]) -> anyhow::Result<Fixture> {
        let path = fixture_path(script);
        let mut child = Command::new(&interp.path)
            .arg(&path)
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} {}", interp.path.display(), path.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut fixture = Fixture {
            stdin: child.stdin.take(),
            child,
            lines,
            name: format!("{script} under {}", interp.label),
        };
        fixture.expect("ready")?;
        Ok(fixture)
    }

    /// Process ID of the fixture.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command line, in a single write so the fixture reads it in
    /// one piece.
    pub fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("fixture stdin closed")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .with_context(|| format!("writing to {}", self.name))
    }

    /// Waits for the next output line and checks that it starts with
    /// `prefix`; returns the whole line.
    pub fn expect(&mut self, prefix: &str) -> anyhow::Result<String> {
        match self.lines.recv_timeout(FIXTURE_TIMEOUT) {
            Ok(line) if line.starts_with(prefix) => Ok(line),
            Ok(line) => bail!(
                "{}: expected a line starting with {prefix:?}, got {line:?}",
                self.name
            ),
            Err(_) => {
                let status = self.child.try_wait().ok().flatten();
                bail!(
                    "{}: no line {prefix:?} within {FIXTURE_TIMEOUT:?} (process status: {status:?})",
                    self.name
                )
            }
        }
    }

    /// Sends `command` and waits for an answer starting with `answer`.
    pub fn call(&mut self, command: &str, answer: &str) -> anyhow::Result<String> {
        self.send(command)?;
        self.expect(answer)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `pyprobe` whose stderr is read line by line on a thread.
pub struct Probe {
    child: Child,
    stderr: Receiver<String>,
    startup: Vec<String>,
}

impl Probe {
    /// Starts `pyprobe args...` and waits until it prints a stderr line
    /// containing "attached to PID" (or, under `--all`, "watching every";
    /// for the sampler "Hz; Ctrl-C to stop"), so everything a fixture does
    /// afterwards is seen.
    pub fn start(args: &[&str]) -> anyhow::Result<Probe> {
        let mut child = Command::new(pyprobe_bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pyprobe")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut probe = Probe {
            child,
            stderr: rx,
            startup: Vec::new(),
        };
        let mut seen = Vec::new();
        loop {
            let line = match probe.stderr.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => line,
                Err(_) => {
                    let status = probe.child.try_wait().ok().flatten();
                    bail!(
                        "pyprobe did not say it attached (status {status:?}); stderr: {}",
                        seen.join("\n")
                    );
                }
            };
            let ready = line.contains("attached to PID")
                || line.contains("watching every")
                || line.contains("Hz; Ctrl-C to stop");
            seen.push(line);
            if ready {
                probe.startup = seen;
                return Ok(probe);
            }
        }
    }

    /// The stderr lines printed until it attached.
    pub fn startup(&self) -> String {
        self.startup.join("\n")
    }

    /// Process ID of pyprobe.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stderr line, if one comes within `timeout`.
    pub fn stderr_line(&self, timeout: Duration) -> Option<String> {
        self.stderr.recv_timeout(timeout).ok()
    }

    /// Sends SIGINT (Ctrl-C).
    pub fn interrupt(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
    }

    /// Waits for pyprobe to exit; returns (success, stdout, rest of stderr).
    pub fn finish(mut self) -> anyhow::Result<(bool, String, String)> {
        let mut stdout = String::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            use std::io::Read;
            pipe.read_to_string(&mut stdout)?;
        }
        let status = self.child.wait()?;
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        Ok((status.success(), stdout, stderr.join("\n")))
    }
}

impl Drop for Probe {
    /// A pyprobe left running would keep its uprobes in place (and, with
    /// `--all`, slow every Python process on the machine): kill it.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `pyprobe` executable to test: `$PYPROBE_BIN` (set by `cargo xtask
/// test`), else the one beside the test binary in the target directory.
pub fn pyprobe_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PYPROBE_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test> -> target/<profile>/pyprobe
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("pyprobe"))
        .expect("test binary lives in target/<profile>/deps")
}

/// Appends `test<TAB>interpreter<TAB>result` to `$PYPROBE_COVERAGE_FILE`, which
/// `cargo xtask test` reads to print which interpreters each test covered.
pub fn record_coverage(test: &str, interp: &Interpreter, result: &str) {
    let Some(path) = std::env::var_os("PYPROBE_COVERAGE_FILE") else {
        return;
    };
    if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(file, "{test}\t{}\t{result}", interp.label);
    }
}

/// Runs `check` on every supported interpreter, prints one line per
/// interpreter, records coverage, and panics listing every failure. Panics if
/// no supported interpreter exists (a test that covers nothing must not
/// pass).
pub fn for_each_interpreter(test: &str, mut check: impl FnMut(&Interpreter) -> anyhow::Result<()>) {
    let found = discover();
    assert!(
        !found.supported.is_empty(),
        "{test}: no CPython 3.8-3.14 interpreter found (looked in $PYENV_ROOT/versions and /usr/bin/python3.N)"
    );
    for interp in &found.unsupported {
        eprintln!("{test}: not tested on {} (outside 3.8-3.14)", interp.label);
        record_coverage(test, interp, "unsupported");
    }
    let mut failures = Vec::new();
    for interp in &found.supported {
        match check(interp) {
            Ok(()) => {
                eprintln!("{test}: ok on {}", interp.label);
                record_coverage(test, interp, "ok");
            }
            Err(e) => {
                eprintln!("{test}: FAILED on {}: {e:#}", interp.label);
                record_coverage(test, interp, "FAILED");
                failures.push(format!("{}: {e:#}", interp.label));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{test} failed on {} of {} interpreters:\n{}",
        failures.len(),
        found.supported.len(),
        failures.join("\n")
    );
}
