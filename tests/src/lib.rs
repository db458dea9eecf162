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
pub const SUPPORTED: ((u32, u32), (u32, u32)) = ((3, 8), (3, 15));

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
    for (_, exe) in pyprobe_testenv::pyenv_versions() {
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
    let system = pyprobe_testenv::system_pythons()
        .into_iter()
        .map(|(_, exe)| exe);
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
    pyprobe_testenv::sid_dir()
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

/// Lines of a fixture file marked with a trailing `# name` comment.
pub fn marks(file: &str) -> anyhow::Result<std::collections::BTreeMap<String, u32>> {
    let text = std::fs::read_to_string(fixture_path(file))?;
    let mut out = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if let Some((code, mark)) = line.rsplit_once("  # ")
            && !code.trim_start().starts_with('#')
            && !mark.contains(' ')
        {
            out.insert(mark.to_owned(), i as u32 + 1);
        }
    }
    Ok(out)
}

/// A fixture program running under one interpreter. Killed on drop.
pub struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    name: String,
    /// The Python process's host PID (under `unshare --fork`, a child of
    /// `child`).
    pid: u32,
    /// What an isolated fixture leaves to clean up.
    isolated: Option<Isolated>,
}

/// How a fixture is kept apart from the host, the ways container runtimes
/// do it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// A container: its own root directory (holding Debian sid's `/usr`,
    /// the fixtures at `/app`), entered by `chroot` inside new mount and
    /// PID namespaces, and a Docker-style cgroup
    /// (`system.slice/docker-<64 hex>.scope`).
    Container,
    /// Only a mount namespace whose root is that directory (`pivot_root`,
    /// as Docker does): host PIDs, container paths.
    MountNamespace,
    /// Only a PID namespace: host paths, thread ids of its own.
    PidNamespace,
}

impl Isolation {
    /// Every kind.
    pub const ALL: [Isolation; 3] = [
        Isolation::Container,
        Isolation::MountNamespace,
        Isolation::PidNamespace,
    ];

    /// Whether the process sees its own root (files at `/app`).
    pub fn has_own_root(self) -> bool {
        self != Isolation::PidNamespace
    }

    /// Whether the process has its own PID namespace.
    pub fn has_own_pids(self) -> bool {
        self != Isolation::MountNamespace
    }
}

/// The root directory and cgroup of an isolated fixture, removed on drop.
struct Isolated {
    root: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    container_id: Option<String>,
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(cgroup) = &self.cgroup {
            // Empty once its process is gone.
            for _ in 0..50 {
                if std::fs::remove_dir(cgroup).is_ok() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(root) = &self.root {
            // Only empty mount points and symlinks: never a recursive
            // removal, which could reach through a bind mount still alive.
            for link in ["lib64", "lib", "bin"] {
                let _ = std::fs::remove_file(root.join(link));
            }
            for dir in ["usr", "app", "proc", ".old", "tmp"] {
                let _ = std::fs::remove_dir(root.join(dir));
            }
            let _ = remove_empty_dirs_up(root, &pyenv_mount_point(root));
            let _ = std::fs::remove_dir(root);
        }
    }
}

/// Removes `dir` and its parents up to (not including) `root` while they
/// are empty.
fn remove_empty_dirs_up(root: &Path, dir: &Option<PathBuf>) -> std::io::Result<()> {
    let Some(mut dir) = dir.clone() else {
        return Ok(());
    };
    while dir.starts_with(root) && dir != root {
        std::fs::remove_dir(&dir)?;
        dir = dir.parent().map(Path::to_owned).unwrap_or_default();
    }
    Ok(())
}

/// The pyenv prefix a root holds a mount point for, if any (recorded in
/// `.pyenv-prefix`).
fn pyenv_mount_point(root: &Path) -> Option<PathBuf> {
    let prefix = std::fs::read_to_string(root.join(".pyenv-prefix")).ok()?;
    let _ = std::fs::remove_file(root.join(".pyenv-prefix"));
    Some(root.join(prefix.trim().trim_start_matches('/')))
}

/// The unified cgroup hierarchy's mount point (`/sys/fs/cgroup` or, on a
/// hybrid host, `/sys/fs/cgroup/unified`).
fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(at))
    })
}

impl Fixture {
    /// Starts `fixtures/<script>` under `interp` with `args` and waits for its
    /// `ready` line.
    pub fn start(interp: &Interpreter, script: &str, args: &[&str]) -> anyhow::Result<Fixture> {
        let path = fixture_path(script);
        let mut command = Command::new(&interp.path);
        command.arg(&path).args(args);
        Self::spawn(command, format!("{script} under {}", interp.label), None)
            .with_context(|| format!("starting {} {}", interp.path.display(), path.display()))
    }

    /// Starts `command` with the fixtures' environment and pipes, reads its
    /// stdout on a thread and waits for its `ready` line.
    fn spawn(
        mut command: Command,
        name: String,
        isolated: Option<Isolated>,
    ) -> anyhow::Result<Fixture> {
        let mut child = command
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
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
            pid: child.id(),
            child,
            lines,
            name,
            isolated,
        };
        fixture.expect("ready")?;
        Ok(fixture)
    }

    /// Whether `interp` can run inside [`Isolation`]s that change the root:
    /// Debian sid's (its `/usr` is the root's) and pyenv's (its prefix is
    /// mounted at the same path and runs on sid's C library).
    pub fn can_isolate(interp: &Interpreter) -> bool {
        matches!(interp.origin, Origin::Private | Origin::Pyenv)
    }

    /// Starts `fixtures/<script>` under `interp` as [`Isolation`] says, and
    /// waits for its `ready` line. Inside its own root the fixtures are at
    /// `/app`.
    pub fn start_isolated(
        interp: &Interpreter,
        isolation: Isolation,
        script: &str,
        args: &[&str],
    ) -> anyhow::Result<Fixture> {
        anyhow::ensure!(
            Self::can_isolate(interp),
            "{} cannot run in a container root",
            interp.label
        );
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fixtures = fixture_path("");
        let sid_usr = private_dir().join("root").join("usr");
        // The interpreter as the process starts it, and a pyenv prefix to
        // mount at the same path.
        let (python, pyenv) = match interp.origin {
            Origin::Private => (
                PathBuf::from(format!(
                    "/usr/bin/python{}.{}",
                    interp.version.0, interp.version.1
                )),
                None,
            ),
            _ => (
                interp.path.clone(),
                interp
                    .path
                    .parent()
                    .and_then(Path::parent)
                    .map(Path::to_owned),
            ),
        };
        let mut command = Command::new("unshare");
        let mut root = None;
        match isolation {
            Isolation::PidNamespace => {
                command
                    .args(["--pid", "--fork", "--kill-child"])
                    .arg(&interp.path)
                    .arg(fixture_path(script));
            }
            Isolation::Container | Isolation::MountNamespace => {
                let dir = std::env::temp_dir()
                    .join(format!("pyprobe-root-{}-{serial}", std::process::id()));
                for sub in ["usr", "app", "proc", ".old", "tmp"] {
                    std::fs::create_dir_all(dir.join(sub))?;
                }
                for (link, to) in [
                    ("lib64", "usr/lib64"),
                    ("lib", "usr/lib"),
                    ("bin", "usr/bin"),
                ] {
                    let _ = std::fs::remove_file(dir.join(link));
                    std::os::unix::fs::symlink(to, dir.join(link))?;
                }
                if let Some(prefix) = &pyenv {
                    std::fs::create_dir_all(dir.join(prefix.strip_prefix("/").unwrap_or(prefix)))?;
                    std::fs::write(
                        dir.join(".pyenv-prefix"),
                        prefix.to_string_lossy().as_bytes(),
                    )?;
                }
                let mounts = "mount --bind \"$SID_USR\" \"$R/usr\"; \
                     mount --bind \"$FIXTURES\" \"$R/app\"; \
                     if [ -n \"$PYENV_PREFIX\" ]; then mount --bind \"$PYENV_PREFIX\" \"$R$PYENV_PREFIX\"; fi; \
                     mount -t proc proc \"$R/proc\"";
                let script_text = if isolation == Isolation::Container {
                    command.args([
                        "--mount",
                        "--pid",
                        "--fork",
                        "--kill-child",
                        "--propagation",
                        "private",
                    ]);
                    format!("set -e; R=\"$0\"; {mounts}; exec chroot \"$R\" \"$@\"")
                } else {
                    command.args(["--mount", "--propagation", "private"]);
                    format!(
                        "set -e; R=\"$0\"; mount --bind \"$R\" \"$R\"; {mounts}; \
                         cd \"$R\"; pivot_root . .old; exec \"$@\""
                    )
                };
                command
                    .arg("sh")
                    .arg("-c")
                    .arg(script_text)
                    .arg(&dir)
                    .arg(&python)
                    .arg(format!("/app/{script}"))
                    .env("SID_USR", &sid_usr)
                    .env("FIXTURES", &fixtures)
                    .env("PYENV_PREFIX", pyenv.as_deref().unwrap_or(Path::new("")));
                root = Some(dir);
            }
        }
        command.args(args);
        let isolated = Isolated {
            root,
            cgroup: None,
            container_id: None,
        };
        let name = format!("{script} under {} ({isolation:?})", interp.label);
        let mut fixture = Self::spawn(command, name, Some(isolated)).context("starting unshare")?;
        if isolation.has_own_pids() {
            // unshare --fork: Python is its only child.
            let children = std::fs::read_to_string(format!(
                "/proc/{0}/task/{0}/children",
                fixture.child.id()
            ))?;
            fixture.pid = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .context("the forked Python process")?;
        }
        if isolation == Isolation::Container {
            let unified = cgroup2_mount().context("no cgroup2 hierarchy is mounted")?;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos();
            let id = format!("{:0>64}", format!("{:x}{:08x}", nanos, fixture.pid));
            let cgroup = unified.join(format!("system.slice/docker-{id}.scope"));
            std::fs::create_dir_all(&cgroup)?;
            let isolated = fixture.isolated.as_mut().expect("isolated");
            isolated.cgroup = Some(cgroup.clone());
            std::fs::write(cgroup.join("cgroup.procs"), fixture.pid.to_string())
                .with_context(|| format!("placing PID {} in {}", fixture.pid, cgroup.display()))?;
            isolated.container_id = Some(id);
        }
        Ok(fixture)
    }

    /// Process ID of the fixture's Python process, as the host sees it.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The Docker-style container id of a fixture started in an
    /// [`Isolation::Container`].
    pub fn container_id(&self) -> Option<&str> {
        self.isolated.as_ref()?.container_id.as_deref()
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
        if self.pid != self.child.id() {
            // A PID namespace's init ignores SIGTERM; SIGKILL reaches it.
            // SAFETY: plain kill(2) on the fixture's process.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `isolated` drops after this: its cgroup is empty by then.
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
                || line.contains("agent sampling every")
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

    /// Waits until a stderr line contains `needle` (or one printed before
    /// [`Probe::start`] returned did): under `--all`, `start` returns at the
    /// first process attached, and "watching every" follows once every
    /// process running then is set up.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        if self.startup.iter().any(|l| l.contains(needle)) {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.startup.push(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(_) => break,
            }
        }
        bail!(
            "pyprobe did not say {needle:?} within {timeout:?}: {}",
            self.startup()
        )
    }

    /// Sends SIGTERM (what systemd sends).
    pub fn terminate(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Waits up to `timeout` for pyprobe to exit; its exit status, or
    /// `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
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

/// The final report of a `pyprobe calls --json` run: every stdout line is
/// one JSON document, and the last must be the final one.
pub fn final_calls_report(stdout: &str) -> anyhow::Result<serde_json::Value> {
    let docs: Vec<serde_json::Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("every stdout line is one JSON document")?;
    let last = docs.last().context("no report")?.clone();
    anyhow::ensure!(last["kind"] == "final", "last report is not final: {last}");
    Ok(last)
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

/// Runs `check` on the interpreters that container tests use: every Debian
/// sid one (a container root is built from sid's packages) and the oldest
/// and newest pyenv builds (mounted into the root). The others are listed
/// as not run, with the reason.
pub fn for_each_container_interpreter(
    test: &str,
    check: impl FnMut(&Interpreter) -> anyhow::Result<()>,
) {
    for_each_sid_and_pyenv_ends(
        test,
        "container roots hold Debian sid's interpreters and the oldest and newest pyenv builds",
        "not run (containers: sid and two pyenv builds)",
        check,
    );
}

/// Runs `check` on every Debian sid interpreter and the oldest and newest
/// pyenv builds, for tests too long to run on all ten; the others are
/// listed as not run, saying `why` (and `coverage` in the coverage table).
pub fn for_each_sid_and_pyenv_ends(
    test: &str,
    why: &str,
    coverage: &str,
    check: impl FnMut(&Interpreter) -> anyhow::Result<()>,
) {
    let found = discover();
    let pyenv = pyenv_builds(&found);
    let chosen: Vec<Interpreter> = found
        .supported
        .iter()
        .filter(|i| {
            i.origin == Origin::Private
                || pyenv.first().is_some_and(|p| p.path == i.path)
                || pyenv.last().is_some_and(|p| p.path == i.path)
        })
        .cloned()
        .collect();
    run_chosen(test, why, coverage, &found, &chosen, check);
}

/// The pyenv builds among the supported interpreters, oldest first.
fn pyenv_builds(found: &Discovery) -> Vec<&Interpreter> {
    found
        .supported
        .iter()
        .filter(|i| i.origin == Origin::Pyenv)
        .collect()
}

/// Runs `check` once on two interpreters at once, for tests that run one
/// fixture on each: the newest pyenv build and a Debian sid one (stripped,
/// other layout; the oldest pyenv build when sid's are missing). Both are
/// recorded as covered, ok or failed, after the check; the others are
/// listed as not run, saying `why`. Panics with the check's error.
pub fn on_two_interpreters(
    test: &str,
    why: &str,
    check: impl FnOnce(&Interpreter, &Interpreter) -> anyhow::Result<()>,
) {
    let found = discover();
    let pyenv = pyenv_builds(&found);
    let first = (*pyenv.last().expect("a pyenv build to test on")).clone();
    let second = found
        .supported
        .iter()
        .rfind(|i| i.origin == Origin::Private && i.minor() >= (3, 14))
        .or_else(|| pyenv.first().copied())
        .expect("a second interpreter to test on")
        .clone();
    let chosen = |i: &Interpreter| i.path == first.path || i.path == second.path;
    for interp in found.supported.iter().filter(|i| !chosen(i)) {
        eprintln!("{test}: not run on {}: {why}", interp.label);
        record_coverage(test, interp, "not run (two interpreters at once)");
    }
    for interp in &found.unsupported {
        eprintln!("{test}: not tested on {} (outside 3.8-3.15)", interp.label);
        record_coverage(test, interp, "unsupported");
    }
    let result = check(&first, &second);
    let verdict = if result.is_ok() { "ok" } else { "FAILED" };
    for interp in [&first, &second] {
        eprintln!("{test}: {verdict} on {}", interp.label);
        record_coverage(test, interp, verdict);
    }
    if let Err(e) = result {
        panic!("{test} failed on {} + {}: {e:#}", first.label, second.label);
    }
}

/// Runs `check` on the newest pyenv build only, for tests of what does not
/// depend on the interpreter and is long to set up; the others are listed
/// as not run, saying `why` (and `coverage` in the coverage table).
pub fn for_each_newest_pyenv(
    test: &str,
    why: &str,
    coverage: &str,
    check: impl FnMut(&Interpreter) -> anyhow::Result<()>,
) {
    let found = discover();
    let chosen: Vec<Interpreter> = found
        .supported
        .iter()
        .rfind(|i| i.origin == Origin::Pyenv)
        .cloned()
        .into_iter()
        .collect();
    run_chosen(test, why, coverage, &found, &chosen, check);
}

/// Runs `check` on `chosen` of the interpreters `found`; lists the others
/// as not run, saying `why` (and `coverage` in the coverage table).
fn run_chosen(
    test: &str,
    why: &str,
    coverage: &str,
    found: &Discovery,
    chosen: &[Interpreter],
    check: impl FnMut(&Interpreter) -> anyhow::Result<()>,
) {
    for interp in &found.supported {
        if !chosen.iter().any(|c| c.path == interp.path) {
            eprintln!("{test}: not run on {}: {why}", interp.label);
            record_coverage(test, interp, coverage);
        }
    }
    run_on(test, chosen, &found.unsupported, check);
}

/// Runs `check` on every supported interpreter, prints one line per
/// interpreter, records coverage, and panics listing every failure. Panics if
/// no supported interpreter exists (a test that covers nothing must not
/// pass).
pub fn for_each_interpreter(test: &str, check: impl FnMut(&Interpreter) -> anyhow::Result<()>) {
    let found = discover();
    run_on(test, &found.supported, &found.unsupported, check);
}

/// Runs `check` on each of `chosen` (see [`for_each_interpreter`]).
fn run_on(
    test: &str,
    chosen: &[Interpreter],
    unsupported: &[Interpreter],
    mut check: impl FnMut(&Interpreter) -> anyhow::Result<()>,
) {
    assert!(
        !chosen.is_empty(),
        "{test}: no CPython 3.8-3.15 interpreter found (looked in $PYENV_ROOT/versions and /usr/bin/python3.N)"
    );
    for interp in unsupported {
        eprintln!("{test}: not tested on {} (outside 3.8-3.15)", interp.label);
        record_coverage(test, interp, "unsupported");
    }
    let mut failures = Vec::new();
    for interp in chosen {
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
        chosen.len(),
        failures.join("\n")
    );
}

/// `go tool pprof ARGS profile` on a profile saved to a file.
pub fn go_pprof(profile: &[u8], args: &[&str]) -> anyhow::Result<String> {
    let path = std::env::temp_dir().join(format!("pyprobe-test-{}.pb.gz", std::process::id()));
    std::fs::write(&path, profile)?;
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(&path)
        .env("HOME", std::env::temp_dir())
        .output()
        .context("running go tool pprof (installed by cargo xtask setup)")?;
    let _ = std::fs::remove_file(&path);
    anyhow::ensure!(
        out.status.success(),
        "go tool pprof failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The rows of `go tool pprof -top -lines`: (flat samples, function,
/// file:line), hottest first.
pub fn pprof_top_rows(report: &str) -> Vec<(f64, String, String)> {
    report
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let flat = pprof_seconds(cols.first()?)?;
            Some((flat, cols.get(5)?.to_string(), cols.get(6)?.to_string()))
        })
        .collect()
}

/// A duration as pprof prints it (`1.63s`, `789.47ms`, `50us`), in
/// seconds.
fn pprof_seconds(s: &str) -> Option<f64> {
    for (unit, scale) in [
        ("ms", 1e-3),
        ("us", 1e-6),
        ("µs", 1e-6),
        ("ns", 1e-9),
        ("s", 1.0),
    ] {
        if let Some(v) = s.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    s.parse().ok()
}
