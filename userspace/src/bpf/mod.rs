//! Loading pyprobe's eBPF object into the kernel and attaching its programs.
//!
//! The object is built from `probe-ebpf` by `build.rs` and embedded in the
//! binary, so nothing but the `pyprobe` executable is needed at run time.
//!
//! The object is loaded once per engine (`loader`: [`Object::load`] for
//! the [`Features`] that will run) and shared by one handle per feature:
//! `call_counter` (calls), `sampler` (record, top), `log_probes` (log).
//! What they share: `news` (the kernel's news of processes), `code_frees`
//! (which processes freed code objects), `uprobe_multi` (one link for many
//! probes), and here the map and program helpers.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    programs::UProbe,
};
use pyprobe_common::names;

use crate::privileges;

mod call_counter;
mod code_frees;
mod loader;
mod log_probes;
mod news;
mod sampler;
mod uprobe_multi;

pub use call_counter::{CallCounter, CallLosses, CallProgram};
pub use code_frees::{CodeFrees, QuietUprobe};
pub use loader::{Features, Object, SharedObject};
pub use log_probes::{LogCounters, LogProbes, WatchError, Watchpoint};
pub use news::{News, ProcessEvents};
pub use sampler::{SampleLosses, Sampler};

/// The eBPF object built from `probe-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pyprobe"));

/// Errors from loading or attaching BPF programs.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// We lack the privileges to load BPF programs or open perf events.
    #[error(transparent)]
    Privileges(#[from] privileges::PrivilegeError),
    /// The kernel refused the object.
    #[error("cannot load pyprobe's eBPF programs: {0}")]
    Load(#[source] aya::EbpfError),
    /// A program or map is missing from the embedded object (a build bug).
    #[error("the embedded eBPF object has no {0}; rebuild pyprobe")]
    Missing(&'static str),
    /// The kernel refused a program.
    #[error("cannot load program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Underlying error.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Attaching a uprobe failed.
    #[error("cannot attach uprobe to {target} (PID {pid}) at file offset {offset:#x}: {source}")]
    Attach {
        /// Probed file.
        target: String,
        /// Process the probe is limited to.
        pid: u32,
        /// File offset of the probe.
        offset: u64,
        /// Underlying error.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Reading a map failed.
    #[error("cannot read BPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Underlying error.
        #[source]
        source: aya::maps::MapError,
    },
    /// PID 0 cannot be probed.
    #[error("PID 0 is not a process")]
    ZeroPid,
}

fn perf_event_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::PerfEvent, BpfError> {
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(|source| BpfError::Program { name, source })
}

/// Loads uprobe program `name` into the kernel (not attached).
fn load_uprobe(ebpf: &mut Ebpf, name: &'static str) -> Result<(), BpfError> {
    uprobe_mut(ebpf, name)?
        .load()
        .map_err(|source| BpfError::Program { name, source })
}

/// Takes ring buffer map `name` out of the loaded object.
fn take_ring(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::RingBuf<MapData>, BpfError> {
    let map = ebpf.take_map(name).ok_or(BpfError::Missing(name))?;
    aya::maps::RingBuf::try_from(map).map_err(|source| BpfError::Map { name, source })
}

/// Opens map `name` of the loaded object as `T` (read-only).
fn open_map<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(ebpf.map(name).ok_or(BpfError::Missing(name))?)
        .map_err(|source| BpfError::Map { name, source })
}

/// Opens map `name` of the loaded object as `T`, for writing.
fn open_map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(ebpf.map_mut(name).ok_or(BpfError::Missing(name))?)
        .map_err(|source| BpfError::Map { name, source })
}

/// Sets `key` to `value` in hash map `name` of the loaded object.
fn hash_insert<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    key: K,
    value: &V,
) -> Result<(), BpfError> {
    let mut map: aya::maps::HashMap<&mut MapData, K, V> = open_map_mut(ebpf, name)?;
    map.insert(key, value, 0)
        .map_err(|source| BpfError::Map { name, source })
}

/// Opens the perf event `attr` (a 128-byte `struct perf_event_attr`, whose
/// pointers outlive the call) on task `pid` and attaches `program` to it.
fn perf_event_with_program(
    attr: &[u8; 128],
    pid: u32,
    program: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    /// `PERF_FLAG_FD_CLOEXEC`.
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
    /// `PERF_EVENT_IOC_SET_BPF`: `_IOW('$', 8, __u32)`.
    const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
    // SAFETY: perf_event_open with a valid attr buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            pid as i32,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the ioctl takes the program's fd as its argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, program.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn uprobe_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, BpfError> {
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing(name))?
        .try_into()
        .map_err(|source| BpfError::Program { name, source })
}

/// Sums one `STATS` counter over CPUs.
fn read_stat(ebpf: &Ebpf, index: u32) -> Result<u64, BpfError> {
    let map: PerCpuArray<&MapData, u64> = open_map(ebpf, names::MAP_STATS)?;
    Ok(map
        .get(&index, 0)
        .map_err(|source| BpfError::Map {
            name: names::MAP_STATS,
            source,
        })?
        .iter()
        .sum())
}

/// `recursion_misses` of a loaded program (aya does not expose it).
fn recursion_misses(ebpf: &Ebpf, program: &str) -> u64 {
    ebpf.program(program)
        .and_then(|p| p.fd().ok())
        .map_or(0, |fd| ProgramRuns::of(fd.as_fd()).recursion_misses)
}

/// What the kernel keeps of one loaded program's runs, from its fdinfo:
/// runs and their time while run-time statistics are on
/// (`BPF_ENABLE_STATS`; both stay 0 otherwise), and runs it skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgramRuns {
    /// Times the program ran.
    pub runs: u64,
    /// Nanoseconds it ran in all.
    pub run_time_ns: u64,
    /// Runs the kernel skipped (another BPF program was running on that
    /// CPU).
    pub recursion_misses: u64,
}

impl ProgramRuns {
    /// `run_cnt`, `run_time_ns` and `recursion_misses` of the program
    /// behind `fd`, from its fdinfo.
    fn of(fd: impl AsRawFd) -> Self {
        let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Self {
            runs: fdinfo_field(&text, "run_cnt").unwrap_or(0),
            run_time_ns: fdinfo_field(&text, "run_time_ns").unwrap_or(0),
            recursion_misses: fdinfo_field(&text, "recursion_misses").unwrap_or(0),
        }
    }

    /// Adds `other` in.
    pub fn add(&mut self, other: ProgramRuns) {
        self.runs += other.runs;
        self.run_time_ns += other.run_time_ns;
        self.recursion_misses += other.recursion_misses;
    }
}

/// Runs of every program of `ebpf` that is loaded, by name.
fn program_runs(ebpf: &Ebpf) -> Vec<(String, ProgramRuns)> {
    ebpf.programs()
        .filter_map(|(name, program)| {
            let fd = program.fd().ok()?;
            Some((name.to_owned(), ProgramRuns::of(fd.as_fd())))
        })
        .collect()
}

/// Reads a numeric `name:\tvalue` line from an fdinfo text.
fn fdinfo_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == name).then(|| value.trim().parse().ok())?
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so loading
/// does not fail there. Harmless on newer kernels.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        log::debug!(
            "setrlimit(RLIMIT_MEMLOCK) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Most threads [`close_all`] closes links on.
const CLOSING_THREADS: usize = 32;

/// Drops `links` (probes: `uprobe_multi` links, uprobe perf events) on
/// several threads at once: closing one waits for the kernel's RCU grace
/// period (30-70 ms on the test VM), and one after the other the 25 links
/// of 5 processes under `calls --name` took 1.1 s to exit.
pub(super) fn close_all<T: Send>(links: Vec<T>) {
    if links.len() < 2 {
        return;
    }
    let per_thread = links.len().div_ceil(CLOSING_THREADS);
    let mut links = links;
    std::thread::scope(|scope| {
        while !links.is_empty() {
            let chunk: Vec<T> = links.drain(..per_thread.min(links.len())).collect();
            scope.spawn(move || drop(chunk));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_recursion_misses_from_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t2\nrun_cnt:\t10\nrecursion_misses:\t3\nverified_insns:\t40\n";
        assert_eq!(fdinfo_field(text, "recursion_misses"), Some(3));
        assert_eq!(fdinfo_field(text, "run_cnt"), Some(10));
        assert_eq!(fdinfo_field(text, "run_time_ns"), None);
        assert_eq!(fdinfo_field(text, "run_cnt"), Some(10));
        assert_eq!(fdinfo_field(text, "absent"), None);
    }

    #[test]
    fn the_embedded_object_is_a_bpf_elf_with_our_programs() {
        let obj = aya_obj_parse(EBPF_OBJECT);
        for program in [
            names::PROG_CALL_START,
            names::PROG_CODE_FREED,
            names::PROG_SAMPLE_CPU,
            names::PROG_LOG_HIT,
            names::PROG_PROCESS_EXEC,
        ] {
            assert!(obj.contains(&program.to_owned()), "programs: {obj:?}");
        }
    }

    fn aya_obj_parse(bytes: &[u8]) -> Vec<String> {
        use object::{Object, ObjectSymbol};
        let file = object::File::parse(bytes).expect("embedded object parses");
        assert_eq!(file.architecture(), object::Architecture::Bpf);
        file.symbols()
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .collect()
    }
}
