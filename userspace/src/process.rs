//! Finding the CPython interpreter inside a live process, from `/proc` only.
//!
//! A Python process runs its interpreter either from a shared `libpython3.X.so`
//! (pyenv, most source builds) or from the executable itself (Debian's
//! `python3.11`, statically linked libpython). The ELF file that defines
//! `_PyEval_EvalFrameDefault` is the one pyprobe probes.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use crate::{
    elf::{ElfError, ElfImage, Symbol},
    python::version::SUPPORTED,
};

/// The interpreter's frame-evaluation function: every frame started from C
/// enters it (on 3.8-3.10, every Python frame does).
pub const EVAL_FRAME_SYMBOL: &str = "_PyEval_EvalFrameDefault";

/// Errors from inspecting a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// No process has this PID.
    #[error("no process with PID {pid}: check the PID (e.g. with `pgrep -a python`)")]
    NoSuchProcess {
        /// PID asked for.
        pid: u32,
    },
    /// The PID is that of a kernel thread.
    #[error("PID {pid} ({name}) is a kernel thread, not a Python process")]
    KernelThread {
        /// PID asked for.
        pid: u32,
        /// Its name.
        name: String,
    },
    /// The process has exited; its parent has not collected it yet.
    #[error(
        "PID {pid} has exited (a zombie until its parent collects it): nothing is left to trace"
    )]
    Exited {
        /// PID asked for.
        pid: u32,
    },
    /// `/proc/PID/...` exists but cannot be read by us: we lack the
    /// privilege.
    #[error(
        "permission denied reading /proc/{pid}/{what}: run pyprobe as root (or with CAP_SYS_PTRACE)"
    )]
    PermissionDenied {
        /// PID asked for.
        pid: u32,
        /// File under `/proc/PID` that failed.
        what: &'static str,
    },
    /// `/proc/PID/...` cannot be read although we have CAP_SYS_PTRACE.
    #[error(
        "the kernel refuses access to /proc/{pid}/{what} although pyprobe has CAP_SYS_PTRACE: {}",
        refusal_reason(.beyond)
    )]
    Refused {
        /// PID asked for.
        pid: u32,
        /// File under `/proc/PID` that failed.
        what: &'static str,
        /// Capabilities the process holds and we do not.
        beyond: Vec<&'static str>,
    },
    /// A CPython outside the supported range, told by its file names (2.x
    /// has no `_PyEval_EvalFrameDefault`).
    #[error("PID {pid} runs CPython {version}, which is not supported ({SUPPORTED})")]
    UnsupportedPython {
        /// PID asked for.
        pid: u32,
        /// `MAJOR.MINOR` from the file name.
        version: String,
    },
    /// Reading `/proc/PID/...` failed for another reason.
    #[error("cannot read /proc/{pid}/{what}: {source}")]
    Io {
        /// PID asked for.
        pid: u32,
        /// File under `/proc/PID` that failed.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Nothing mapped in the process defines `_PyEval_EvalFrameDefault`.
    #[error(
        "PID {pid} ({exe}) is not a Python process: no mapped file defines {EVAL_FRAME_SYMBOL}; \
         pass the PID of a CPython {SUPPORTED} process"
    )]
    NotPython {
        /// PID asked for.
        pid: u32,
        /// The process's executable, for the message.
        exe: String,
    },
    /// The interpreter's ELF file could not be used.
    #[error("PID {pid}: {source}")]
    Elf {
        /// PID asked for.
        pid: u32,
        /// Underlying error.
        #[source]
        source: ElfError,
    },
    /// No path of ours opens a file the process maps.
    #[error(
        "PID {pid} maps {path} (device {}:{}, inode {}), but pyprobe cannot open that file \
         from its own mount namespace ({tried}); run pyprobe as root in the host's namespaces",
        id.dev.0, id.dev.1, id.inode
    )]
    Unreachable {
        /// PID asked for.
        pid: u32,
        /// The file as the process sees it.
        path: PathBuf,
        /// Its device and inode.
        id: FileId,
        /// What was tried and why each failed.
        tried: String,
    },
    /// The interpreter file is mapped, but not where its ELF headers say.
    #[error("PID {pid}: cannot find where {path} is loaded in /proc/{pid}/maps")]
    NoLoadBias {
        /// PID asked for.
        pid: u32,
        /// ELF file.
        path: PathBuf,
    },
}

/// Why the kernel may refuse a privileged reader.
fn refusal_reason(beyond: &[&str]) -> String {
    if beyond.is_empty() {
        "a security module (Landlock, SELinux, AppArmor, Yama) or another user namespace forbids it"
            .to_owned()
    } else {
        format!(
            "the process holds capabilities pyprobe lacks ({}), or a security module forbids it",
            beyond.join(", ")
        )
    }
}

impl ProcessError {
    /// Whether the error only says that the PID is no Python process to
    /// trace: under `--all` such PIDs are skipped without a word. A process
    /// that cannot be read counts as one unless its name or command line
    /// says python.
    pub fn is_not_python(&self) -> bool {
        match self {
            ProcessError::NotPython { .. }
            | ProcessError::NoSuchProcess { .. }
            | ProcessError::KernelThread { .. }
            | ProcessError::Exited { .. } => true,
            ProcessError::Refused { pid, .. } | ProcessError::PermissionDenied { pid, .. } => {
                !looks_like_python(*pid)
            }
            _ => false,
        }
    }

    fn from_io(pid: u32, what: &'static str, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound => ProcessError::NoSuchProcess { pid },
            io::ErrorKind::PermissionDenied if crate::privileges::can_read_others() => {
                ProcessError::Refused {
                    pid,
                    what,
                    beyond: crate::privileges::capabilities_beyond_ours(pid),
                }
            }
            io::ErrorKind::PermissionDenied => ProcessError::PermissionDenied { pid, what },
            _ => match source.raw_os_error() {
                // ESRCH: the process exited while we read it.
                Some(libc::ESRCH) => ProcessError::NoSuchProcess { pid },
                _ => ProcessError::Io { pid, what, source },
            },
        }
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Start address (inclusive).
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Permission string, e.g. `r-xp`.
    pub perms: String,
    /// Offset in the mapped file.
    pub offset: u64,
    /// Device of the mapped file (major, minor; 0:0 for anonymous
    /// mappings).
    pub dev: (u32, u32),
    /// Inode of the mapped file (0 for anonymous mappings).
    pub inode: u64,
    /// Path of the mapped file, or pseudo-name like `[heap]`; `None` if
    /// anonymous.
    pub path: Option<String>,
}

/// Parses the text of `/proc/PID/maps`; malformed lines are skipped.
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<MapEntry> {
    // start-end perms offset dev inode [path, which may contain spaces]
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.to_owned();
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let dev = (
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    );
    let inode = fields.next()?.parse().ok()?;
    let path = fields
        .next()
        .map(str::trim_start)
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    Some(MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms,
        offset,
        dev,
        inode,
        path,
    })
}

/// Reads and parses `/proc/PID/maps`.
pub fn read_maps(pid: u32) -> Result<Vec<MapEntry>, ProcessError> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| ProcessError::from_io(pid, "maps", e))?;
    Ok(parse_maps(&text))
}

/// Reads `len` bytes at `addr` from the memory of process `pid`.
pub fn read_memory(pid: u32, addr: u64, len: usize) -> Result<Vec<u8>, ProcessError> {
    let mut file = fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| ProcessError::from_io(pid, "mem", e))?;
    let mut buf = vec![0; len];
    file.seek(SeekFrom::Start(addr))
        .and_then(|_| file.read_exact(&mut buf))
        .map_err(|e| ProcessError::from_io(pid, "mem", e))?;
    Ok(buf)
}

/// Computes the load bias of `image` (mapped from `path`) in a process: the
/// value to add to a link-time virtual address to get the runtime address.
///
/// Uses the mapping of the file's first page (offset 0), which holds the
/// first `PT_LOAD` segment.
pub fn load_bias(maps: &[MapEntry], path: &Path, image: &ElfImage) -> Option<u64> {
    let first = image.load_segments().iter().min_by_key(|s| s.offset)?;
    let page = 4096;
    let first_vaddr = first.vaddr & !(page - 1);
    let first_offset = first.offset & !(page - 1);
    let wanted = path.to_str()?;
    maps.iter()
        .find(|m| m.path.as_deref() == Some(wanted) && m.offset == first_offset)
        .map(|m| m.start.wrapping_sub(first_vaddr))
}

/// How the interpreter is linked into the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Linkage {
    /// Interpreter in a shared `libpython*.so`.
    SharedLibrary,
    /// Interpreter linked into the executable.
    Executable,
}

/// A file as the kernel knows it, whatever path reaches it: the device
/// and inode that `/proc/PID/maps` shows and `stat` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    /// Device (major, minor).
    pub dev: (u32, u32),
    /// Inode on that device.
    pub inode: u64,
}

impl FileId {
    /// The file a maps line maps.
    pub fn of_mapping(entry: &MapEntry) -> Self {
        FileId {
            dev: entry.dev,
            inode: entry.inode,
        }
    }

    /// The file a path of ours opens (symlinks followed).
    fn of_path(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path)?;
        let dev = meta.dev();
        Ok(FileId {
            dev: (libc::major(dev), libc::minor(dev)),
            inode: meta.ino(),
        })
    }
}

/// A file mapped in a process, as the process names it and as pyprobe
/// opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedFile {
    /// The path as the process sees it (inside its container, if any).
    pub seen_as: PathBuf,
    /// A path in pyprobe's own mount namespace that opens the same file
    /// (checked by device and inode): the path itself when pyprobe shares
    /// the process's root, else through `/proc/PID/root` or
    /// `/proc/PID/map_files`.
    pub reach: PathBuf,
    /// The file's device and inode.
    pub id: FileId,
}

/// Finds a path of ours to the file of mapping `entry` of process `pid`.
///
/// `/proc/PID/maps` names a file relative to the reader's root: a chrooted
/// process's files show as host paths (under its root directory), while a
/// process in another mount namespace (a container after `pivot_root`)
/// shows its own paths, which on the host name other files or none. So
/// the candidates are tried in turn and the first that opens the mapped
/// device and inode wins: the path as shown, the process's own path under
/// `/proc/PID/root`, and `/proc/PID/map_files/START-END` (which needs
/// CAP_SYS_ADMIN).
pub fn reach_mapped(pid: u32, entry: &MapEntry) -> Result<MappedFile, ProcessError> {
    let shown = entry.path.as_deref().unwrap_or_default();
    let id = FileId::of_mapping(entry);
    let root = fs::read_link(format!("/proc/{pid}/root"))
        .map_err(|e| ProcessError::from_io(pid, "root", e))?;
    let seen_as = seen_by_process(&root, Path::new(shown));
    let candidates = [
        PathBuf::from(shown),
        Path::new(&format!("/proc/{pid}/root")).join(seen_as.strip_prefix("/").unwrap_or(&seen_as)),
        PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            entry.start, entry.end
        )),
    ];
    let mut tried = Vec::new();
    for path in candidates {
        match FileId::of_path(&path) {
            Ok(found) if found == id => {
                return Ok(MappedFile {
                    seen_as,
                    reach: path,
                    id,
                });
            }
            Ok(found) => tried.push(format!(
                "{} is another file (device {}:{}, inode {})",
                path.display(),
                found.dev.0,
                found.dev.1,
                found.inode
            )),
            Err(e) => tried.push(format!("{}: {}", path.display(), e)),
        }
    }
    if !is_alive(pid) {
        return Err(ProcessError::NoSuchProcess { pid });
    }
    Err(ProcessError::Unreachable {
        pid,
        path: seen_as,
        id,
        tried: tried.join("; "),
    })
}

/// The path a process uses for a file that `/proc/PID/maps` shows as
/// `shown`: without the process's root directory when it is chrooted below
/// ours.
fn seen_by_process(root: &Path, shown: &Path) -> PathBuf {
    if root == Path::new("/") {
        return shown.to_owned();
    }
    match shown.strip_prefix(root) {
        Ok(rest) => Path::new("/").join(rest),
        Err(_) => shown.to_owned(),
    }
}

/// The interpreter of a live Python process, as found from `/proc`.
#[derive(Debug, Clone)]
pub struct Interpreter {
    /// Process ID.
    pub pid: u32,
    /// Path of the ELF file holding the interpreter, as the process sees it.
    pub binary: PathBuf,
    /// The same file reached from our mount namespace (see
    /// [`reach_mapped`]), so processes in containers work too: where
    /// pyprobe reads it and attaches uprobes.
    pub host_path: PathBuf,
    /// The file's device and inode: one file for every process that maps
    /// it, whatever the path.
    pub file: FileId,
    /// Shared library or executable.
    pub linkage: Linkage,
    /// Runtime address minus link-time address for this file.
    pub load_bias: u64,
    /// `_PyEval_EvalFrameDefault` in that file.
    pub eval_frame: Symbol,
    /// File offset of `_PyEval_EvalFrameDefault`, where uprobes attach.
    pub eval_frame_offset: u64,
}

/// The threads of a process by host thread id, with the id each has in
/// the process's own PID namespace: a containerised Python records, and
/// shows, the ids of its namespace, while the kernel (and BPF) give host
/// ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tasks {
    /// Host TID -> TID in the process's PID namespace (the same number
    /// when the process shares pyprobe's).
    ns_tid: BTreeMap<u32, u32>,
    /// The process's PID in its own namespace.
    pub ns_pid: u32,
}

impl Tasks {
    /// Lists the threads of `pid` (none if it is gone). A thread's ids come
    /// from the `NSpid` line of `/proc/PID/task/TID/status`, read only when
    /// the process is in another PID namespace.
    pub fn read(pid: u32) -> Tasks {
        let status = |path: String| fs::read_to_string(path).ok();
        let own = status(format!("/proc/{pid}/status"))
            .as_deref()
            .and_then(innermost_nspid);
        let ns_pid = own.unwrap_or(pid);
        let hosts = fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
        let ns_tid = if ns_pid == pid {
            hosts.map(|t| (t, t)).collect()
        } else {
            hosts
                .filter_map(|t| {
                    let status = status(format!("/proc/{pid}/task/{t}/status"))?;
                    Some((t, innermost_nspid(&status)?))
                })
                .collect()
        };
        Tasks { ns_tid, ns_pid }
    }

    /// Host thread ids.
    pub fn host_tids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ns_tid.keys().copied()
    }

    /// Thread ids as the process sees them.
    pub fn ns_tids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ns_tid.values().copied()
    }

    /// The host id of the thread the process knows as `ns_tid`.
    pub fn host_of(&self, ns_tid: u32) -> Option<u32> {
        if self.in_own_namespace() {
            return self
                .ns_tid
                .iter()
                .find(|&(_, &ns)| ns == ns_tid)
                .map(|(&h, _)| h);
        }
        self.ns_tid.contains_key(&ns_tid).then_some(ns_tid)
    }

    /// The id the process knows host thread `tid` by, when it differs.
    pub fn ns_of(&self, tid: u32) -> Option<u32> {
        self.ns_tid.get(&tid).copied().filter(|&ns| ns != tid)
    }

    /// Whether the process is in a PID namespace of its own.
    pub fn in_own_namespace(&self) -> bool {
        self.ns_tid.iter().next().is_some_and(|(h, n)| h != n)
    }

    /// Builds a list from (host, namespace) pairs (tests).
    #[cfg(test)]
    pub fn from_pairs(ns_pid: u32, pairs: &[(u32, u32)]) -> Tasks {
        Tasks {
            ns_tid: pairs.iter().copied().collect(),
            ns_pid,
        }
    }
}

/// How every output names a thread: its host id, and the id the process
/// knows it by when that differs (a container's PID namespace), as
/// `4066(ns:2)`: one word, so columns stay columns.
pub fn thread_id_text(tid: u32, namespace_tid: Option<u32>) -> String {
    match namespace_tid {
        Some(ns) => format!("{tid}(ns:{ns})"),
        None => tid.to_string(),
    }
}

/// The last id of a `status` file's `NSpid:` line: the id in the
/// innermost PID namespace, the one the process itself sees.
fn innermost_nspid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The parent of process `pid` (`PPid` in its status).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// When process `pid` started (clock ticks after boot, field 22 of
/// `/proc/PID/stat`): with the PID, it names one process for good (an exec
/// keeps it).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The CPU time process `pid` has used so far, user and system (fields 14
/// and 15 of `/proc/PID/stat`), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some((user + system) as f64 / hz as f64)
}

/// Whether process `child` maps its programs and libraries where `parent`
/// does: every file both map with code is at the same address, as after a
/// fork and before any exec (an exec'd image is laid out anew). Data files
/// (shared memory, semaphores) are left out: either may map one again
/// after the fork. False when either cannot be read or they share no
/// file.
pub fn same_image(child: u32, parent: u32) -> bool {
    let (Ok(a), Ok(b)) = (read_maps(child), read_maps(parent)) else {
        return false;
    };
    let starts = |maps: &[MapEntry]| -> BTreeMap<(u32, u32, u64), Vec<u64>> {
        let mut out: BTreeMap<_, Vec<u64>> = BTreeMap::new();
        for m in maps
            .iter()
            .filter(|m| m.inode != 0 && m.perms.contains('x'))
        {
            out.entry((m.dev.0, m.dev.1, m.inode))
                .or_default()
                .push(m.start);
        }
        out
    };
    let (a, b) = (starts(&a), starts(&b));
    let shared: Vec<_> = a.keys().filter(|k| b.contains_key(k)).collect();
    !shared.is_empty() && shared.iter().all(|k| a[*k].first() == b[*k].first())
}

/// What process `pid` runs, for messages: its executable's path (as the
/// process sees it), else its `comm`.
pub fn command_name(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
        .or_else(|| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim_end().to_owned())
        })
}

/// The executable of process `pid` (`/proc/PID/exe`), if readable.
pub fn exe_of(pid: u32) -> Option<std::path::PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Whether a process is running with its memory: a zombie still has
/// `/proc/PID` but is not, and neither is a process in the middle of its
/// exit, which has let go of its memory (its reads fail) before it becomes
/// a zombie.
pub fn is_alive(pid: u32) -> bool {
    // The state letter follows the comm field, which may contain ')'.
    let running = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(false);
    // No memory: `statm` says 0 pages (as for a kernel thread).
    running
        && std::fs::read_to_string(format!("/proc/{pid}/statm"))
            .is_ok_and(|s| s.split(' ').next().is_some_and(|size| size != "0"))
}

/// Whether process `pid` is gone, or goes within `wait`: a process that
/// cannot be read while it seems alive may be finalizing (an exiting
/// interpreter frees and unmaps its memory before the process ends).
pub fn exits_within(pid: u32, wait: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + wait;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Finds the CPython interpreter of process `pid`: the executable or a mapped
/// `libpython*` that defines `_PyEval_EvalFrameDefault`.
pub fn find_interpreter(pid: u32) -> Result<Interpreter, ProcessError> {
    find_interpreter_image(pid).map(|(interp, _)| interp)
}

/// Interpreter files read in this round of set-ups, by file and size:
/// every process of one interpreter shares one parsed copy (with 100
/// processes, reading and parsing a 10-30 MB file for each was most of the
/// set-up time).
static IMAGES: std::sync::Mutex<BTreeMap<(FileId, u64), std::sync::Arc<ElfImage>>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Lets go of the interpreter files read so far: called after each round
/// of set-ups, so that the cache lasts one scan (the 100 processes of one
/// interpreter share a copy) and not the whole run (peak memory).
pub fn release_images() {
    IMAGES.lock().expect("not poisoned").clear();
}

/// The file at `path` (`id`), parsed once per round of set-ups (see
/// [`release_images`]).
fn cached_image(path: &Path, id: FileId) -> Result<std::sync::Arc<ElfImage>, ElfError> {
    let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let key = (id, size);
    if let Some(image) = IMAGES.lock().expect("not poisoned").get(&key) {
        return Ok(image.clone());
    }
    let image = std::sync::Arc::new(ElfImage::open(path)?);
    IMAGES
        .lock()
        .expect("not poisoned")
        .insert(key, image.clone());
    Ok(image)
}

/// The parsed file of interpreter `interp`, shared with every process of
/// that file set up in this round (see [`release_images`]).
pub fn interpreter_image(interp: &Interpreter) -> Result<std::sync::Arc<ElfImage>, ElfError> {
    cached_image(&interp.host_path, interp.file)
}

/// Like [`find_interpreter`], also returning the parsed ELF file (shared
/// by every process of that file), so callers that need more symbols do
/// not read the (often 10-30 MB) file again.
pub fn find_interpreter_image(
    pid: u32,
) -> Result<(Interpreter, std::sync::Arc<ElfImage>), ProcessError> {
    check_live_user_process(pid)?;
    let maps = read_maps(pid)?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(|e| ProcessError::from_io(pid, "exe", e))?;
    let exe_str = exe.to_string_lossy().into_owned();

    // The executable first (static builds), then any mapped libpython.
    // Paths are as /proc/PID/maps shows them (see `reach_mapped`).
    let mut candidates: Vec<(String, Linkage)> = vec![(exe_str.clone(), Linkage::Executable)];
    for m in &maps {
        if let Some(path) = &m.path {
            let name = path.rsplit('/').next().unwrap_or(path);
            if candidates.iter().any(|(p, _)| p == path) {
                continue;
            }
            // Mapped for its code, not only read (pyprobe itself maps
            // interpreter files to read them).
            let runs = maps
                .iter()
                .any(|e| e.path.as_deref() == Some(path.as_str()) && e.perms.contains('x'));
            if !runs {
                continue;
            }
            if name.starts_with("libpython") && name.contains(".so") {
                candidates.push((path.clone(), Linkage::SharedLibrary));
            } else if name.starts_with("python") && !name.contains(".so") {
                // A program started through the dynamic loader
                // (`ld-linux-x86-64.so.2 /usr/bin/python3.14 ...`) has the
                // loader as its exe and maps the interpreter like a library.
                candidates.push((path.clone(), Linkage::Executable));
            }
        }
    }

    for (path, linkage) in candidates {
        // A file replaced on disk shows as "path (deleted)"; it cannot be
        // probed by path.
        if path.ends_with(" (deleted)") {
            continue;
        }
        // The mapping of the file's first page: its device and inode, and
        // where the load bias is read.
        let Some(first) = maps
            .iter()
            .filter(|m| m.path.as_deref() == Some(path.as_str()))
            .min_by_key(|m| m.offset)
        else {
            continue;
        };
        let file = reach_mapped(pid, first)?;
        let image = match cached_image(&file.reach, file.id) {
            Ok(image) => image,
            Err(ElfError::Parse { .. }) => continue,
            Err(ElfError::Io { source, .. }) => {
                return Err(ProcessError::from_io(pid, "root", source));
            }
            Err(source) => return Err(ProcessError::Elf { pid, source }),
        };
        let Ok(eval_frame) = image.symbol(EVAL_FRAME_SYMBOL) else {
            continue;
        };
        let eval_frame_offset = image
            .vaddr_to_file_offset(eval_frame.vaddr)
            .map_err(|source| ProcessError::Elf { pid, source })?;
        let load_bias =
            load_bias(&maps, Path::new(&path), &image).ok_or_else(|| ProcessError::NoLoadBias {
                pid,
                path: file.seen_as.clone(),
            })?;
        let interp = Interpreter {
            pid,
            binary: file.seen_as,
            host_path: file.reach,
            file: file.id,
            linkage,
            load_bias,
            eval_frame,
            eval_frame_offset,
        };
        return Ok((interp, image));
    }
    // CPython 2 has no _PyEval_EvalFrameDefault: tell it by its files.
    let version = std::iter::once(exe_str.as_str())
        .chain(maps.iter().filter_map(|m| m.path.as_deref()))
        .find_map(python2_version);
    if let Some(version) = version {
        return Err(ProcessError::UnsupportedPython { pid, version });
    }
    Err(ProcessError::NotPython { pid, exe: exe_str })
}

/// `2.7` for `/usr/bin/python2.7`, `libpython2.7.so.1.0`.
fn python2_version(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    let rest = name
        .strip_prefix("libpython")
        .or_else(|| name.strip_prefix("python"))?;
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let version = version.trim_end_matches('.');
    (version.starts_with("2.") && version.len() > 2).then(|| version.to_owned())
}

/// Whether a process's name or program (`/proc/PID/comm`, the first word
/// of `/proc/PID/cmdline`, both readable where its memory is not) says
/// python.
fn looks_like_python(pid: u32) -> bool {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let program = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let program = String::from_utf8_lossy(program);
    let program = program.rsplit('/').next().unwrap_or_default();
    comm.contains("python") || program.contains("python")
}

/// `PF_KTHREAD` in `/proc/PID/stat`'s flags.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Fails for a PID that is a kernel thread or a process that has exited
/// (both still have a `/proc/PID` directory).
fn check_live_user_process(pid: u32) -> Result<(), ProcessError> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| ProcessError::from_io(pid, "stat", e))?;
    let Some((head, rest)) = stat.rsplit_once(')') else {
        return Ok(());
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&("Z" | "X"))) {
        return Err(ProcessError::Exited { pid });
    }
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    if flags & PF_KTHREAD != 0 {
        let name = head.split_once('(').map_or("", |(_, n)| n).to_owned();
        return Err(ProcessError::KernelThread { pid, name });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_process_is_alive_and_unknown_pid_is_not() {
        assert!(super::is_alive(std::process::id()));
        assert!(!super::is_alive(99_999_999));
    }

    #[test]
    fn a_task_without_memory_is_not_alive() {
        // kthreadd: a kernel thread has no memory, as a process has none
        // between letting go of it in its exit and becoming a zombie.
        if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            assert!(!super::is_alive(2));
        }
    }

    use super::*;

    #[test]
    fn parses_maps_lines_with_and_without_paths() {
        let text = "\
00400000-00423000 r--p 00000000 fe:01 1835106                    /usr/bin/python3.11
7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0 \n\
7ffd1b1c4000-7ffd1b1e5000 rw-p 00000000 00:00 0                  [stack]
7f00 garbage line
7f1c2b000000-7f1c2b200000 r-xp 00096000 fe:01 42                 /opt/my python/libpython3.12.so.1.0
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].start, 0x400000);
        assert_eq!(maps[0].end, 0x423000);
        assert_eq!(maps[0].inode, 1835106);
        assert_eq!(maps[0].dev, (0xfe, 0x01));
        assert_eq!(maps[0].path.as_deref(), Some("/usr/bin/python3.11"));
        assert_eq!(maps[1].path, None);
        assert_eq!(maps[2].path.as_deref(), Some("[stack]"));
        assert_eq!(maps[3].perms, "r-xp");
        assert_eq!(maps[3].offset, 0x96000);
        assert_eq!(
            maps[3].path.as_deref(),
            Some("/opt/my python/libpython3.12.so.1.0")
        );
    }

    #[test]
    fn a_chrooted_process_sees_its_files_below_its_root() {
        let seen = |root: &str, shown: &str| seen_by_process(Path::new(root), Path::new(shown));
        // Chrooted: maps shows host paths under the process's root.
        assert_eq!(
            seen("/srv/ctr", "/srv/ctr/usr/bin/python3"),
            Path::new("/usr/bin/python3")
        );
        // Another mount namespace: its root reads as "/", paths are its own.
        assert_eq!(seen("/", "/usr/bin/python3"), Path::new("/usr/bin/python3"));
        // Not below the root (a file opened before chroot): as shown.
        assert_eq!(seen("/srv/ctr", "/opt/lib.so"), Path::new("/opt/lib.so"));
        // A sibling directory whose name only starts like the root.
        assert_eq!(
            seen("/srv/ctr", "/srv/ctr2/lib.so"),
            Path::new("/srv/ctr2/lib.so")
        );
    }

    #[test]
    fn our_own_executable_is_reached_by_its_path() {
        let pid = std::process::id();
        let maps = read_maps(pid).unwrap();
        let exe = fs::read_link("/proc/self/exe").unwrap();
        let first = maps
            .iter()
            .find(|m| m.path.as_deref() == exe.to_str())
            .unwrap();
        let file = reach_mapped(pid, first).unwrap();
        assert_eq!(file.seen_as, exe);
        assert_eq!(file.reach, exe);
        assert_eq!(file.id, FileId::of_path(&exe).unwrap());
    }

    #[test]
    fn a_thread_in_a_pid_namespace_is_known_by_its_innermost_id() {
        let status = "Name:\tpython3\nTgid:\t4065\nNSpid:\t4066\t2\nNSsid:\t1\n";
        assert_eq!(innermost_nspid(status), Some(2));
        assert_eq!(innermost_nspid("NSpid:\t77\n"), Some(77));
        assert_eq!(innermost_nspid("Name: x\n"), None);
        let tasks = Tasks::from_pairs(1, &[(4065, 1), (4066, 2)]);
        assert!(tasks.in_own_namespace());
        assert_eq!(tasks.host_of(2), Some(4066));
        assert_eq!(tasks.host_of(3), None);
        assert_eq!(tasks.ns_of(4066), Some(2));
        // Our own threads: the same ids.
        let ours = Tasks::read(std::process::id());
        assert!(!ours.in_own_namespace());
        assert_eq!(ours.ns_pid, std::process::id());
        assert_eq!(ours.host_of(std::process::id()), Some(std::process::id()));
        assert_eq!(ours.ns_of(std::process::id()), None);
    }

    #[test]
    fn unknown_pid_is_no_such_process() {
        // PIDs above pid_max (at most 2^22) never exist.
        let err = find_interpreter(99_999_999).unwrap_err();
        assert!(matches!(
            err,
            ProcessError::NoSuchProcess { pid: 99_999_999 }
        ));
        assert!(err.to_string().contains("no process with PID 99999999"));
    }

    #[test]
    fn a_non_python_process_is_reported_as_such() {
        // The test binary itself is not Python.
        let err = find_interpreter(std::process::id()).unwrap_err();
        assert!(
            matches!(err, ProcessError::NotPython { .. }),
            "unexpected: {err}"
        );
        assert!(err.to_string().contains("is not a Python process"));
    }
}
