//! Loading pyprobe's eBPF object into the kernel and attaching its programs.
//!
//! The object is built from `probe-ebpf` by `build.rs` and embedded in the
//! binary, so nothing but the `pyprobe` executable is needed at run time.

use std::{
    collections::BTreeMap,
    num::NonZeroU32,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{UProbe, uprobe::UProbeScope},
};
use pyprobe_common::{
    calls::{self, BuiltinKey, CacheSlot, CallCounts, CodeKey, Histogram, ProcessConfig, SkipSet},
    logpoint::{LogProcess, LogState, Program, Watch, WatchKey},
    names,
    process::{self, BuiltinEvent, CodeEvent, ProcessEvent},
    sample::{SampleConfig, ThreadState},
    stats,
};

use crate::{privileges, process::Interpreter};

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

/// Counts that pyprobe could not make, so output can show them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Losses {
    /// Entries not counted because the per-process map was full.
    pub map_full: u64,
    /// Program runs the kernel skipped because another BPF program was
    /// already running on that CPU (`recursion_misses` in the program's
    /// fdinfo).
    pub recursion_misses: u64,
}

impl Losses {
    /// Sum of all losses.
    pub fn total(&self) -> u64 {
        self.map_full + self.recursion_misses
    }
}

/// Counts entries into `_PyEval_EvalFrameDefault` per process, in the kernel.
pub struct EvalEntryCounter {
    ebpf: Ebpf,
}

impl EvalEntryCounter {
    /// Checks privileges and loads the eBPF programs (not yet attached).
    pub fn load() -> Result<Self, BpfError> {
        Ok(Self {
            ebpf: load_programs(&[names::PROG_EVAL_ENTRY], &[])?,
        })
    }

    /// Attaches the counter to the interpreter of one process. Only that
    /// process's entries are counted (the kernel filters by PID).
    pub fn attach(&mut self, interp: &Interpreter) -> Result<(), BpfError> {
        let pid = NonZeroU32::new(interp.pid).ok_or(BpfError::ZeroPid)?;
        uprobe_mut(&mut self.ebpf, names::PROG_EVAL_ENTRY)?
            .attach(
                interp.eval_frame_offset,
                &interp.host_path,
                UProbeScope::OneProcess(pid),
            )
            .map_err(|source| BpfError::Attach {
                target: interp.host_path.display().to_string(),
                pid: interp.pid,
                offset: interp.eval_frame_offset,
                source,
            })?;
        Ok(())
    }

    /// Entries counted so far, per PID (summed over CPUs).
    pub fn counts(&self) -> Result<BTreeMap<u32, u64>, BpfError> {
        let map: PerCpuHashMap<&MapData, u32, u64> = open_map(&self.ebpf, names::MAP_EVAL_ENTRIES)?;
        let mut out = BTreeMap::new();
        for item in map.iter() {
            let (pid, per_cpu) = item.map_err(|source| BpfError::Map {
                name: names::MAP_EVAL_ENTRIES,
                source,
            })?;
            out.insert(pid, per_cpu.iter().sum());
        }
        Ok(out)
    }

    /// Entries counted so far for one PID.
    pub fn count(&self, pid: u32) -> Result<u64, BpfError> {
        Ok(self.counts()?.get(&pid).copied().unwrap_or(0))
    }

    /// What could not be counted so far.
    pub fn losses(&self) -> Result<Losses, BpfError> {
        Ok(Losses {
            map_full: read_stat(&self.ebpf, stats::EVAL_MAP_FULL)?,
            recursion_misses: recursion_misses(&self.ebpf, names::PROG_EVAL_ENTRY),
        })
    }
}

/// What the call counter could not count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CallLosses {
    /// Starts not counted because the per-code map was full.
    pub map_full: u64,
    /// Starts in processes not (yet) configured, e.g. started a moment ago
    /// under `--all`.
    pub unconfigured: u64,
    /// Starts whose frame or code object could not be read.
    pub unreadable: u64,
    /// Calls that finished but could not be timed (`--latency`): the
    /// per-code latency map was full.
    pub untimed: u64,
    /// Sampled checks in which the register the frame was read from
    /// disagreed with the thread state (counts may have gone to the wrong
    /// function; 0 unless pyprobe misjudged the build).
    pub frame_mismatches: u64,
    /// News of processes (new, exec'd, exited) the kernel could not pass
    /// on: a full ring buffer. Such a process may go unnamed or be set up
    /// late. Not calls, so not in [`CallLosses::total`].
    pub process_events: u64,
    /// Program runs the kernel skipped (another BPF program was running on
    /// that CPU).
    pub recursion_misses: u64,
}

impl CallLosses {
    /// Sum of all losses.
    pub fn total(&self) -> u64 {
        self.map_full
            + self.unconfigured
            + self.unreadable
            + self.untimed
            + self.frame_mismatches
            + self.recursion_misses
    }
}

/// The programs of the call counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallProgram {
    /// `call_start`: at every function-start site.
    Start,
    /// `call_throw`: at the entry of `_PyEval_EvalFrameDefault` (3.11+),
    /// for generators resumed by `throw()`/`close()`.
    Throw,
    /// `call_empty`: does nothing (benchmarks: the cost of the trap alone).
    Empty,
    /// `builtin_function`: at an entry point of `builtin_function_or_method`
    /// calls.
    BuiltinFunction,
    /// `builtin_method`: at an entry point of `method_descriptor` calls.
    BuiltinMethod,
    /// `call_exit`: at the handlers of the opcodes that return or yield
    /// (3.11+, `--latency`).
    Exit,
    /// `call_exit_stack`: uretprobe on `_PyEval_EvalFrameDefault`
    /// (3.8-3.10, `--latency`).
    ExitStack,
    /// `code_freed`: at the code object type's `tp_dealloc`.
    CodeFreed,
}

impl CallProgram {
    /// The program's name in the eBPF object.
    fn name(self) -> &'static str {
        match self {
            CallProgram::Start => names::PROG_CALL_START,
            CallProgram::Throw => names::PROG_CALL_THROW,
            CallProgram::Empty => names::PROG_CALL_EMPTY,
            CallProgram::BuiltinFunction => names::PROG_BUILTIN_FUNCTION,
            CallProgram::BuiltinMethod => names::PROG_BUILTIN_METHOD,
            CallProgram::Exit => names::PROG_CALL_EXIT,
            CallProgram::ExitStack => names::PROG_CALL_EXIT_STACK,
            CallProgram::CodeFreed => names::PROG_CODE_FREED,
        }
    }

    /// Every program.
    const ALL: [CallProgram; 8] = [
        CallProgram::Start,
        CallProgram::Throw,
        CallProgram::Empty,
        CallProgram::BuiltinFunction,
        CallProgram::BuiltinMethod,
        CallProgram::Exit,
        CallProgram::ExitStack,
        CallProgram::CodeFreed,
    ];
}

/// Most memory the per-CPU latency map may take (all CPUs together).
const LATENCY_MAP_BYTES: usize = 64 << 20;

/// Entries of the per-code latency map: [`calls::MAX_LATENCY_CODES`], or
/// fewer on hosts with so many CPUs that it would pass
/// [`LATENCY_MAP_BYTES`] (the map holds a histogram per CPU).
fn latency_codes() -> u32 {
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1);
    let fit = LATENCY_MAP_BYTES / (std::mem::size_of::<Histogram>() * cpus);
    (fit as u32).clamp(64, calls::MAX_LATENCY_CODES)
}

/// The kernel's news of watched processes (see
/// [`pyprobe_common::process`]): the `sched_process_exec` and
/// `sched_process_exit` raw tracepoints, attached for as long as this
/// lives, and the ring buffer they (and `call_start`) write to.
pub struct ProcessEvents {
    ring: aya::maps::RingBuf<MapData>,
}

impl ProcessEvents {
    /// Loads and attaches the tracepoint programs of `ebpf` and takes its
    /// event ring.
    fn attach(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        for (name, tracepoint) in [
            (names::PROG_PROCESS_EXEC, "sched_process_exec"),
            (names::PROG_PROCESS_EXIT, "sched_process_exit"),
            (names::PROG_PROCESS_FORK, "sched_process_fork"),
        ] {
            let program: &mut aya::programs::RawTracePoint = ebpf
                .program_mut(name)
                .ok_or(BpfError::Missing(name))?
                .try_into()
                .map_err(|source| BpfError::Program { name, source })?;
            program
                .load()
                .map_err(|source| BpfError::Program { name, source })?;
            program
                .attach(tracepoint)
                .map_err(|source| BpfError::Program { name, source })?;
        }
        Ok(Self {
            ring: take_ring(ebpf, names::MAP_PROCESS_EVENTS)?,
        })
    }

    /// Hands the events waiting to `f`, oldest first.
    pub fn drain(&mut self, mut f: impl FnMut(News)) {
        while let Some(item) = self.ring.next() {
            let kind = item
                .get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
            if kind == Some(process::CODE) && item.len() >= std::mem::size_of::<CodeEvent>() {
                // SAFETY: the program writes whole `CodeEvent`s under this
                // kind (repr(C), integers and bytes); the read is
                // unaligned-safe.
                let event: CodeEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                f(News::Code(Box::new(event)));
            } else if kind == Some(process::BUILTIN)
                && item.len() >= std::mem::size_of::<BuiltinEvent>()
            {
                // SAFETY: as above, a whole `BuiltinEvent`.
                let event: BuiltinEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                f(News::Builtin(Box::new(event)));
            } else if item.len() >= std::mem::size_of::<ProcessEvent>() {
                // SAFETY: as above, a whole `ProcessEvent`.
                f(News::Process(unsafe {
                    std::ptr::read_unaligned(item.as_ptr().cast())
                }));
            }
        }
    }
}

/// One piece of the kernel's news of processes.
pub enum News {
    /// A process configured, forked from a watched one, exec'd or exited.
    Process(ProcessEvent),
    /// A code object counted for the first time, with its names' bytes.
    Code(Box<CodeEvent>),
    /// A builtin counted for the first time, with its names' bytes.
    Builtin(Box<BuiltinEvent>),
}

/// Counts Python function starts per code object, in the kernel.
pub struct CallCounter {
    ebpf: Ebpf,
    /// News of exec'd, exited and newly configured processes, until taken.
    events: Option<ProcessEvents>,
    /// The programs, loaded for `uprobe_multi` links where the kernel has
    /// them (6.6+); else aya's perf-event uprobes are used.
    multi: Option<crate::uprobe_multi::MultiPrograms>,
    /// Probes asked for since the last [`Self::flush`], by program, file
    /// and process, in the order asked.
    pending: Vec<PendingProbes>,
    /// The `uprobe_multi` links made.
    links: Vec<crate::uprobe_multi::MultiLink>,
}

/// Probes of one program on one file, for one process or all, waiting to
/// become one `uprobe_multi` link.
struct PendingProbes {
    program: CallProgram,
    path: std::path::PathBuf,
    pid: Option<u32>,
    offsets: Vec<u64>,
    cookies: Vec<u64>,
}

impl CallCounter {
    /// Checks privileges and loads the call-counting programs (not
    /// attached). Without `latency`, the timing maps are shrunk to one
    /// entry.
    pub fn load(latency: bool) -> Result<Self, BpfError> {
        let names = CallProgram::ALL.map(CallProgram::name);
        let sizes = if latency {
            vec![
                (names::MAP_CALL_LATENCY, latency_codes()),
                (names::MAP_CALL_RUNNING, calls::MAX_RUNNING),
            ]
        } else {
            vec![(names::MAP_CALL_LATENCY, 1), (names::MAP_CALL_RUNNING, 1)]
        };
        let mut ebpf = load_programs(&[], &sizes)?;
        let multi = match crate::uprobe_multi::MultiPrograms::load(EBPF_OBJECT, &ebpf, &names) {
            Ok(multi) => Some(multi),
            Err(e) => {
                log::debug!("uprobe_multi programs not loaded ({e}): perf-event uprobes");
                for name in names {
                    load_uprobe(&mut ebpf, name)?;
                }
                None
            }
        };
        let events = Some(ProcessEvents::attach(&mut ebpf)?);
        Ok(Self {
            ebpf,
            events,
            multi,
            pending: Vec::new(),
            links: Vec::new(),
        })
    }

    /// The kernel's news of processes, to be read (once).
    pub fn take_events(&mut self) -> Option<ProcessEvents> {
        self.events.take()
    }

    /// Gives the probes whose cookie names template `index`
    /// ([`calls::cookie`]) the configuration a process of their file gets
    /// when the kernel meets it before userspace has configured it. Its
    /// `tstate_slot` is a link-time address: the kernel adds the load bias.
    pub fn set_template(&mut self, index: u32, config: &ProcessConfig) -> Result<(), BpfError> {
        let mut map: BpfHashMap<&mut MapData, u32, ProcessConfig> =
            open_map_mut(&mut self.ebpf, names::MAP_CALL_TEMPLATES)?;
        map.insert(index, config, 0)
            .map_err(|source| BpfError::Map {
                name: names::MAP_CALL_TEMPLATES,
                source,
            })
    }

    /// Tells the program how to read process `pid` (replaces any earlier
    /// configuration).
    pub fn configure(&mut self, pid: u32, config: &ProcessConfig) -> Result<(), BpfError> {
        self.config_map()?
            .insert(pid, config, 0)
            .map_err(|source| BpfError::Map {
                name: names::MAP_CALL_CONFIG,
                source,
            })
    }

    /// Forgets a process that exited.
    pub fn forget(&mut self, pid: u32) -> Result<(), BpfError> {
        // A PID that was never configured is not an error.
        let _ = self.config_map()?.remove(&pid);
        Ok(())
    }

    fn config_map(&mut self) -> Result<BpfHashMap<&mut MapData, u32, ProcessConfig>, BpfError> {
        open_map_mut(&mut self.ebpf, names::MAP_CALL_CONFIG)
    }

    /// Attaches `program` at `file_offset` of `interp`'s ELF file, for one
    /// process (`Some(pid)`) or for every process that maps the file,
    /// including ones started later (`None`), with `cookie`
    /// ([`calls::cookie`]).
    ///
    /// With `uprobe_multi`, the probe is put on at the next
    /// [`Self::flush`], with the others of its program, file and process.
    pub fn attach(
        &mut self,
        program: CallProgram,
        interp: &Interpreter,
        file_offset: u64,
        pid: Option<u32>,
        cookie: u64,
    ) -> Result<(), BpfError> {
        if self.multi.is_some() {
            let found = self
                .pending
                .iter_mut()
                .find(|p| p.program == program && p.path == interp.host_path && p.pid == pid);
            let group = match found {
                Some(group) => group,
                None => {
                    self.pending.push(PendingProbes {
                        program,
                        path: interp.host_path.clone(),
                        pid,
                        offsets: Vec::new(),
                        cookies: Vec::new(),
                    });
                    self.pending.last_mut().expect("pushed")
                }
            };
            if !group.offsets.contains(&file_offset) {
                group.offsets.push(file_offset);
                group.cookies.push(cookie);
            }
            return Ok(());
        }
        let scope = match pid {
            Some(pid) => UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(BpfError::ZeroPid)?),
            None => UProbeScope::AllProcesses,
        };
        let name = program.name();
        let point = aya::programs::uprobe::UProbeAttachPoint {
            location: file_offset.into(),
            cookie: Some(cookie),
        };
        uprobe_mut(&mut self.ebpf, name)?
            .attach(point, &interp.host_path, scope)
            .map_err(|source| BpfError::Attach {
                target: interp.host_path.display().to_string(),
                pid: pid.unwrap_or(0),
                offset: file_offset,
                source,
            })?;
        Ok(())
    }

    /// Puts on the probes [`Self::attach`] was asked for since the last
    /// flush: one `uprobe_multi` link per program, file and process, in
    /// the order first asked.
    pub fn flush(&mut self) -> Result<(), BpfError> {
        let Some(multi) = &self.multi else {
            return Ok(());
        };
        for group in self.pending.drain(..) {
            let link = multi
                .attach(
                    group.program.name(),
                    &group.path,
                    &group.offsets,
                    &group.cookies,
                    group.pid,
                    group.program == CallProgram::ExitStack,
                )
                .map_err(|e| BpfError::Attach {
                    target: group.path.display().to_string(),
                    pid: group.pid.unwrap_or(0),
                    offset: group.offsets.first().copied().unwrap_or(0),
                    source: aya::programs::ProgramError::IOError(e),
                })?;
            self.links.push(link);
        }
        Ok(())
    }

    /// Whether probes are `uprobe_multi` links (closed with one wait per
    /// link rather than one per probe).
    pub fn uses_multi(&self) -> bool {
        self.multi.is_some()
    }

    /// Counts so far, per code object (summed over CPUs): (starts, resumes).
    pub fn counts(&self) -> Result<BTreeMap<CodeKey, CallCounts>, BpfError> {
        let map: PerCpuHashMap<&MapData, CodeKey, CallCounts> =
            open_map(&self.ebpf, names::MAP_CALL_COUNTS)?;
        let mut out = BTreeMap::new();
        for item in map.iter() {
            let (key, per_cpu) = item.map_err(|source| BpfError::Map {
                name: names::MAP_CALL_COUNTS,
                source,
            })?;
            let sum: &mut CallCounts = out.entry(key).or_default();
            for c in per_cpu.iter() {
                sum.starts += c.starts;
                sum.resumes += c.resumes;
            }
        }
        let cache: PerCpuArray<&MapData, CacheSlot> = open_map(&self.ebpf, names::MAP_CALL_CACHE)?;
        for index in 0..calls::CACHE_SLOTS {
            let per_cpu = cache.get(&index, 0).map_err(|source| BpfError::Map {
                name: names::MAP_CALL_CACHE,
                source,
            })?;
            for slot in per_cpu.iter().filter(|s| s.key.code != 0) {
                let sum = out.entry(slot.key).or_default();
                sum.starts += slot.counts.starts;
                sum.resumes += slot.counts.resumes;
            }
        }
        Ok(out)
    }

    /// Builtin calls so far (summed over CPUs).
    pub fn builtin_counts(&self) -> Result<BTreeMap<BuiltinKey, u64>, BpfError> {
        let map_error = |source| BpfError::Map {
            name: names::MAP_BUILTIN_COUNTS,
            source,
        };
        let map: PerCpuHashMap<&MapData, BuiltinKey, u64> =
            open_map(&self.ebpf, names::MAP_BUILTIN_COUNTS)?;
        let mut out = BTreeMap::new();
        for item in map.iter() {
            let (key, per_cpu) = item.map_err(map_error)?;
            out.insert(key, per_cpu.iter().sum());
        }
        Ok(out)
    }

    /// Call durations so far (`--latency`), per code object (summed over
    /// CPUs; the maximum is the largest of any CPU).
    pub fn latencies(&self) -> Result<BTreeMap<CodeKey, Histogram>, BpfError> {
        let map: PerCpuHashMap<&MapData, CodeKey, Histogram> =
            open_map(&self.ebpf, names::MAP_CALL_LATENCY)?;
        let mut out: BTreeMap<CodeKey, Histogram> = BTreeMap::new();
        for item in map.iter() {
            let (key, per_cpu) = item.map_err(|source| BpfError::Map {
                name: names::MAP_CALL_LATENCY,
                source,
            })?;
            let sum = out.entry(key).or_default();
            for h in per_cpu.iter() {
                for (total, n) in sum.buckets.iter_mut().zip(h.buckets.iter()) {
                    *total += n;
                }
                sum.count += h.count;
                sum.total_ns += h.total_ns;
                sum.max_ns = sum.max_ns.max(h.max_ns);
            }
        }
        Ok(out)
    }

    /// Stops counting `key` in the kernel (`--filter` excludes it), if its
    /// set in the skip array has a free entry (or one of a process that
    /// exited). Returns whether it was written; a key that finds its set
    /// full stays counted (and is dropped from reports by userspace).
    pub fn skip(&mut self, key: &CodeKey) -> Result<bool, BpfError> {
        let map_error = |source| BpfError::Map {
            name: names::MAP_CALL_SKIP,
            source,
        };
        let mut skip: Array<&mut MapData, SkipSet> =
            open_map_mut(&mut self.ebpf, names::MAP_CALL_SKIP)?;
        let index = calls::cache_slot(key.tgid, key.code) & (calls::SKIP_SETS - 1);
        let mut set = skip.get(&index, 0).map_err(map_error)?;
        if set.keys.contains(key) {
            return Ok(true);
        }
        let Some(free) = set
            .keys
            .iter_mut()
            .find(|k| k.code == 0 || !crate::process::is_alive(k.tgid))
        else {
            return Ok(false);
        };
        *free = *key;
        skip.set(index, set, 0).map_err(map_error)?;
        Ok(true)
    }

    /// What could not be counted so far.
    pub fn losses(&self) -> Result<CallLosses, BpfError> {
        let stat = |index| read_stat(&self.ebpf, index);
        Ok(CallLosses {
            map_full: stat(stats::CALLS_MAP_FULL)?,
            unconfigured: stat(stats::CALLS_NO_CONFIG)?,
            unreadable: stat(stats::CALLS_UNREADABLE)?,
            untimed: stat(stats::LATENCY_MAP_FULL)?,
            frame_mismatches: stat(stats::FRAME_REGISTER_MISMATCH)?,
            process_events: stat(stats::PROCESS_EVENTS_LOST)?,
            recursion_misses: CallProgram::ALL
                .iter()
                .map(|p| recursion_misses(&self.ebpf, p.name()))
                .sum(),
        })
    }
}

/// What the sampler could not sample, so output can show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SampleLosses {
    /// Ticks on a thread of a profiled process not yet mapped to its
    /// thread state (a new thread, mapped at the next thread-list read).
    pub unknown_thread: u64,
    /// Ticks on threads the interpreter does not know (no thread state).
    pub not_python: u64,
    /// Ticks on Python threads with no Python frame (in C outside any call).
    pub no_frame: u64,
    /// Ticks whose thread state could not be read.
    pub unreadable: u64,
    /// Samples dropped because the ring buffer was full.
    pub ring_full: u64,
    /// Ticks the kernel skipped because another BPF program was running on
    /// that CPU.
    pub recursion_misses: u64,
}

/// Samples Python stacks on the CPU clock of every CPU.
pub struct Sampler {
    ebpf: Ebpf,
    ring: aya::maps::RingBuf<MapData>,
    /// `code_freed` in each process.
    code_frees: CodeFrees,
    attached: bool,
    /// What `SAMPLE_THREADS` holds per process: thread id -> state.
    threads: std::collections::HashMap<u32, BTreeMap<u32, u64>>,
}

impl Sampler {
    /// Checks privileges and loads the sampling programs (not attached),
    /// with a ring buffer sized for `rate` samples a second on every CPU.
    pub fn load(rate: u64) -> Result<Self, BpfError> {
        privileges::check()?;
        raise_memlock_limit();
        let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u64;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::MAP_SAMPLES, ring_bytes(cpus, rate))
            .load(EBPF_OBJECT)
            .map_err(BpfError::Load)?;
        for name in [names::PROG_SAMPLE_CPU, names::PROG_SAMPLE_WALK] {
            perf_event_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        load_uprobe(&mut ebpf, names::PROG_CODE_FREED)?;
        let walk = perf_event_mut(&mut ebpf, names::PROG_SAMPLE_WALK)?
            .fd()
            .map_err(|source| BpfError::Program {
                name: names::PROG_SAMPLE_WALK,
                source,
            })?
            .try_clone()
            .map_err(|e| BpfError::Program {
                name: names::PROG_SAMPLE_WALK,
                source: aya::programs::ProgramError::IOError(e),
            })?;
        let mut progs: aya::maps::ProgramArray<&mut MapData> =
            open_map_mut(&mut ebpf, names::MAP_SAMPLE_PROGS)?;
        progs.set(0, &walk, 0).map_err(|source| BpfError::Map {
            name: names::MAP_SAMPLE_PROGS,
            source,
        })?;
        let ring = take_ring(&mut ebpf, names::MAP_SAMPLES)?;
        Ok(Self {
            ebpf,
            ring,
            code_frees: CodeFrees::default(),
            attached: false,
            threads: std::collections::HashMap::new(),
        })
    }

    /// Starts sampling every online CPU `rate` times a second (of CPU
    /// time: an idle CPU is not sampled).
    pub fn start(&mut self, rate: u64) -> Result<(), BpfError> {
        use aya::programs::perf_event::{
            PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent,
        };
        let cpus = aya::util::online_cpus().map_err(|(_, e)| BpfError::Program {
            name: names::PROG_SAMPLE_CPU,
            source: aya::programs::ProgramError::IOError(e),
        })?;
        let period = 1_000_000_000 / rate.max(1);
        let program = perf_event_mut(&mut self.ebpf, names::PROG_SAMPLE_CPU)?;
        for cpu in cpus {
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(period),
                    false,
                )
                .map_err(|source| BpfError::Program {
                    name: names::PROG_SAMPLE_CPU,
                    source,
                })?;
        }
        self.attached = true;
        Ok(())
    }

    /// Counts the code object frees of process `pid` (uprobe at
    /// `file_offset` of its interpreter: the code type's `tp_dealloc`), so
    /// names of code objects are re-read only when one was freed. With
    /// `whole_file`, one probe serves every process of the file (see
    /// [`CodeFrees`]).
    pub fn watch_code_frees(
        &mut self,
        interp: &Interpreter,
        file_offset: u64,
        pid: u32,
        whole_file: bool,
    ) -> Result<(), BpfError> {
        self.code_frees
            .watch(&mut self.ebpf, interp, file_offset, pid, whole_file)
    }

    /// Tells the sampler how to walk process `pid`.
    pub fn configure(&mut self, pid: u32, config: &SampleConfig) -> Result<(), BpfError> {
        let mut map: BpfHashMap<&mut MapData, u32, SampleConfig> =
            open_map_mut(&mut self.ebpf, names::MAP_SAMPLE_CONFIG)?;
        map.insert(pid, config, 0).map_err(|source| BpfError::Map {
            name: names::MAP_SAMPLE_CONFIG,
            source,
        })
    }

    /// Forgets a process (and its threads) that exited.
    pub fn forget(&mut self, pid: u32) -> Result<(), BpfError> {
        let mut map: BpfHashMap<&mut MapData, u32, SampleConfig> =
            open_map_mut(&mut self.ebpf, names::MAP_SAMPLE_CONFIG)?;
        let _ = map.remove(&pid);
        self.code_frees.forget(pid);
        self.set_threads(pid, &[])
    }

    /// Replaces the threads of process `pid`: (thread id, thread state or
    /// 0 for a thread the interpreter does not know). Only the differences
    /// from the last call for `pid` reach the kernel.
    pub fn set_threads(&mut self, pid: u32, threads: &[(u32, u64)]) -> Result<(), BpfError> {
        let wanted: BTreeMap<u32, u64> = threads.iter().copied().collect();
        let old = self.threads.remove(&pid).unwrap_or_default();
        let mut map: BpfHashMap<&mut MapData, u32, ThreadState> =
            open_map_mut(&mut self.ebpf, names::MAP_SAMPLE_THREADS)?;
        for tid in old.keys().filter(|tid| !wanted.contains_key(tid)) {
            // The id may belong to another process by now.
            if map.get(tid, 0).is_ok_and(|t| t.tgid == pid) {
                let _ = map.remove(tid);
            }
        }
        for (&tid, &tstate) in &wanted {
            if old.get(&tid) != Some(&tstate) {
                let value = ThreadState {
                    tgid: pid,
                    _pad: 0,
                    tstate,
                };
                map.insert(tid, value, 0).map_err(|source| BpfError::Map {
                    name: names::MAP_SAMPLE_THREADS,
                    source,
                })?;
            }
        }
        if !wanted.is_empty() {
            self.threads.insert(pid, wanted);
        }
        Ok(())
    }

    /// Hands every sample waiting in the ring buffer to `f`.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) {
        while let Some(item) = self.ring.next() {
            f(&item);
        }
    }

    /// Ticks on threads of sampled processes not mapped yet (what tells
    /// userspace to read thread lists again).
    pub fn unknown_threads(&self) -> Result<u64, BpfError> {
        read_stat(&self.ebpf, stats::SAMPLE_UNKNOWN_THREAD)
    }

    /// Counts of ticks that gave no sample, by reason.
    pub fn losses(&self) -> Result<SampleLosses, BpfError> {
        let stat = |index| read_stat(&self.ebpf, index);
        Ok(SampleLosses {
            unknown_thread: stat(stats::SAMPLE_UNKNOWN_THREAD)?,
            not_python: stat(stats::SAMPLE_NOT_PYTHON)?,
            no_frame: stat(stats::SAMPLE_NO_FRAME)?,
            unreadable: stat(stats::SAMPLE_UNREADABLE)?,
            ring_full: stat(stats::SAMPLE_LOST)?,
            recursion_misses: recursion_misses(&self.ebpf, names::PROG_SAMPLE_CPU)
                + recursion_misses(&self.ebpf, names::PROG_SAMPLE_WALK),
        })
    }
}

/// Why a hardware watchpoint could not be set on a thread.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The thread already has 4 watchpoints (x86 has 4 debug registers).
    #[error(
        "thread {tid} has no free hardware watchpoint (x86 has 4 per thread, shared with debuggers)"
    )]
    NoSlot {
        /// The thread.
        tid: u32,
    },
    /// The thread is gone.
    #[error("thread {tid} exited")]
    Gone {
        /// The thread.
        tid: u32,
    },
    /// Anything else the kernel said.
    #[error("cannot set a hardware watchpoint on thread {tid}: {source}")]
    Other {
        /// The thread.
        tid: u32,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A hardware watchpoint running `log_hit`, set on one thread and inherited
/// by the threads and processes it starts from then on; taken off (with
/// every inherited copy) when dropped. An `exec` removes it from the task
/// that execs: the new image's memory is something else.
pub struct Watchpoint {
    /// The perf event: closing it detaches the program.
    _event: std::os::fd::OwnedFd,
}

impl Watchpoint {
    /// Opens a read/write watchpoint on the byte at `addr` in thread `tid`
    /// and attaches `program` (the loaded `log_hit`).
    fn open(program: std::os::fd::BorrowedFd<'_>, tid: u32, addr: u64) -> std::io::Result<Self> {
        /// `PERF_TYPE_BREAKPOINT`.
        const PERF_TYPE_BREAKPOINT: u32 = 5;
        /// `HW_BREAKPOINT_RW`.
        const HW_BREAKPOINT_RW: u32 = 3;
        /// `PERF_SAMPLE_RAW`.
        const PERF_SAMPLE_RAW: u64 = 1 << 10;
        /// `perf_event_attr` flag bits: `disabled`, `inherit`,
        /// `precise_ip` = 2, `remove_on_exec`.
        const FLAGS: u64 = 1 | (1 << 1) | (2 << 15) | (1 << 36);
        /// `PERF_EVENT_IOC_ENABLE`: `_IO('$', 0)`.
        const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
        // struct perf_event_attr (128 bytes): type, size, sample_period 1,
        // sample_type, flags, wakeup_events 1, bp_type, bp_addr, bp_len 1.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&PERF_TYPE_BREAKPOINT.to_ne_bytes());
        attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
        attr[16..24].copy_from_slice(&1u64.to_ne_bytes());
        attr[24..32].copy_from_slice(&PERF_SAMPLE_RAW.to_ne_bytes());
        attr[40..48].copy_from_slice(&FLAGS.to_ne_bytes());
        attr[48..52].copy_from_slice(&1u32.to_ne_bytes());
        attr[52..56].copy_from_slice(&HW_BREAKPOINT_RW.to_ne_bytes());
        attr[56..64].copy_from_slice(&addr.to_ne_bytes());
        attr[64..72].copy_from_slice(&1u64.to_ne_bytes());
        let fd = perf_event_with_program(&attr, tid, program)?;
        // SAFETY: the ioctl takes no argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { _event: fd })
    }
}

/// Counters of one log point, as the kernel keeps them.
pub type LogCounters = pyprobe_common::logpoint::LogState;

/// The log point program, its maps and its watchpoints.
pub struct LogProbes {
    ebpf: Ebpf,
    ring: aya::maps::RingBuf<MapData>,
    /// `code_freed` in each process.
    code_frees: CodeFrees,
    /// News of processes forked by watched ones, exec'd and exited.
    news: ProcessEvents,
    /// Why forked children are not followed, when they are not.
    forks_unfollowed: Option<String>,
}

impl LogProbes {
    /// Checks privileges and loads the hit program (no watchpoint yet).
    pub fn load() -> Result<Self, BpfError> {
        privileges::check()?;
        raise_memlock_limit();
        // The maps of the other commands are created too: make them small,
        // preallocating them is most of the load time.
        let mut loader = EbpfLoader::new();
        for map in [
            names::MAP_EVAL_ENTRIES,
            names::MAP_CALL_COUNTS,
            names::MAP_CALL_RUNNING,
            names::MAP_CALL_LATENCY,
            names::MAP_BUILTIN_COUNTS,
            names::MAP_SAMPLE_THREADS,
            names::MAP_SAMPLE_CONFIG,
            names::MAP_CALL_CONFIG,
        ] {
            loader.map_max_entries(map, 1);
        }
        loader.map_max_entries(names::MAP_SAMPLES, 4096);
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(BpfError::Load)?;
        perf_event_mut(&mut ebpf, names::PROG_LOG_HIT)?
            .load()
            .map_err(|source| BpfError::Program {
                name: names::PROG_LOG_HIT,
                source,
            })?;
        load_uprobe(&mut ebpf, names::PROG_CODE_FREED)?;
        if let Ok(program) = perf_event_mut(&mut ebpf, names::PROG_LOG_HIT)
            && let Ok(info) = program.info()
        {
            log::debug!(
                "log_hit: {:?} instructions verified, {:?} translated bytes",
                info.verified_instruction_count(),
                info.size_translated()
            );
        }
        let ring = take_ring(&mut ebpf, names::MAP_LOG_HITS)?;
        // `process_fork` follows forks once the offsets are set.
        let news = ProcessEvents::attach(&mut ebpf)?;
        Ok(Self {
            ebpf,
            ring,
            code_frees: CodeFrees::default(),
            news,
            forks_unfollowed: Some("the kernel's task layout is not read yet".to_owned()),
        })
    }

    /// Gives `process_fork` where a task's ids are
    /// ([`crate::kernel::TaskOffsets::read`]), before anything is armed:
    /// from then on a process forked by a watched one is set up in the
    /// kernel. An error is kept for [`Self::forks_unfollowed`].
    pub fn follow_forks(
        &mut self,
        offsets: anyhow::Result<crate::kernel::TaskOffsets>,
    ) -> Result<(), BpfError> {
        let offsets = match offsets {
            Ok(offsets) => offsets,
            Err(e) => {
                self.forks_unfollowed = Some(e.to_string());
                return Ok(());
            }
        };
        let mut map: Array<&mut MapData, u32> =
            open_map_mut(&mut self.ebpf, names::MAP_TASK_OFFSETS)?;
        for (index, value) in [(0, offsets.pid), (1, offsets.tgid)] {
            map.set(index, value, 0).map_err(|source| BpfError::Map {
                name: names::MAP_TASK_OFFSETS,
                source,
            })?;
        }
        self.forks_unfollowed = None;
        Ok(())
    }

    /// Why processes forked by watched ones are not followed (their
    /// inherited watchpoints' hits are then counted as "at addresses not
    /// watched"), if they are not.
    pub fn forks_unfollowed(&self) -> Option<&str> {
        self.forks_unfollowed.as_deref()
    }

    /// Hands the news of processes waiting to `f`, oldest first.
    pub fn drain_news(&mut self, f: impl FnMut(News)) {
        self.news.drain(f);
    }

    /// The watched process `pid` descends from by fork, as the kernel set
    /// it up ([`process::FORKED`]), if it does.
    pub fn origin_of(&self, pid: u32) -> Option<u32> {
        let map: BpfHashMap<&MapData, u32, u32> =
            open_map(&self.ebpf, names::MAP_LOG_ORIGIN).ok()?;
        map.get(&pid, 0).ok()
    }

    /// Tells the program how to read process `pid`.
    pub fn configure(&mut self, pid: u32, config: &LogProcess) -> Result<(), BpfError> {
        let mut map: BpfHashMap<&mut MapData, u32, LogProcess> =
            open_map_mut(&mut self.ebpf, names::MAP_LOG_PROCESS)?;
        map.insert(pid, config, 0).map_err(|source| BpfError::Map {
            name: names::MAP_LOG_PROCESS,
            source,
        })
    }

    /// Sets what log point `index` captures and tests.
    pub fn set_program(&mut self, index: u32, program: &Program) -> Result<(), BpfError> {
        let mut map: Array<&mut MapData, Program> =
            open_map_mut(&mut self.ebpf, names::MAP_LOG_PROGRAMS)?;
        map.set(index, program, 0).map_err(|source| BpfError::Map {
            name: names::MAP_LOG_PROGRAMS,
            source,
        })
    }

    /// Declares a watched address (before its watchpoints are set), and
    /// its code object, whose free [`Self::freed_code`] reports.
    pub fn watch(&mut self, key: WatchKey, watch: &Watch) -> Result<(), BpfError> {
        let mut map: BpfHashMap<&mut MapData, WatchKey, Watch> =
            open_map_mut(&mut self.ebpf, names::MAP_LOG_WATCH)?;
        map.insert(key, watch, 0).map_err(|source| BpfError::Map {
            name: names::MAP_LOG_WATCH,
            source,
        })?;
        let mut freed: BpfHashMap<&mut MapData, WatchKey, u32> =
            open_map_mut(&mut self.ebpf, names::MAP_LOG_FREED)?;
        freed
            .insert(code_key(key.tgid, watch.code), 0, 0)
            .map_err(|source| BpfError::Map {
                name: names::MAP_LOG_FREED,
                source,
            })
    }

    /// Forgets a watched address and its code object (its watchpoints
    /// removed first, with [`Self::remove_watchpoint`]).
    pub fn unwatch(&mut self, key: WatchKey, code: u64) -> Result<(), BpfError> {
        let mut map: BpfHashMap<&mut MapData, WatchKey, Watch> =
            open_map_mut(&mut self.ebpf, names::MAP_LOG_WATCH)?;
        // Absent keys are fine: forgetting twice is not an error.
        let _ = map.remove(&key);
        let mut freed: BpfHashMap<&mut MapData, WatchKey, u32> =
            open_map_mut(&mut self.ebpf, names::MAP_LOG_FREED)?;
        let _ = freed.remove(&code_key(key.tgid, code));
        Ok(())
    }

    /// Whether code object `code` of `pid`, declared with [`Self::watch`],
    /// was freed since.
    pub fn freed_code(&self, pid: u32, code: u64) -> Result<bool, BpfError> {
        let freed: BpfHashMap<&MapData, WatchKey, u32> =
            open_map(&self.ebpf, names::MAP_LOG_FREED)?;
        Ok(freed.get(&code_key(pid, code), 0).is_ok_and(|v| v != 0))
    }

    /// Forgets process `pid` (it exited): its `code_freed` probe is
    /// detached.
    pub fn forget(&mut self, pid: u32) {
        self.code_frees.forget(pid);
    }

    /// How many code objects `pid` freed since it was configured.
    pub fn code_frees(&self, pid: u32) -> Result<u64, BpfError> {
        let map: BpfHashMap<&MapData, u32, LogProcess> =
            open_map(&self.ebpf, names::MAP_LOG_PROCESS)?;
        Ok(map.get(&pid, 0).map_or(0, |p| p.code_frees))
    }

    /// Has the code type's `tp_dealloc` (at `file_offset` of `interp`)
    /// report the code objects process `pid` frees (with `whole_file`,
    /// every process of the file: see [`CodeFrees`]).
    pub fn watch_code_frees(
        &mut self,
        interp: &Interpreter,
        file_offset: u64,
        pid: u32,
        whole_file: bool,
    ) -> Result<(), BpfError> {
        self.code_frees
            .watch(&mut self.ebpf, interp, file_offset, pid, whole_file)
    }

    /// Sets a read/write hardware watchpoint on the byte at `addr` (an
    /// instruction's oparg) in thread `tid`, inherited by the threads and
    /// processes it starts from now on. Dropping it takes it off.
    pub fn set_watchpoint(&mut self, tid: u32, addr: u64) -> Result<Watchpoint, WatchError> {
        let program =
            perf_event_mut(&mut self.ebpf, names::PROG_LOG_HIT).map_err(|e| WatchError::Other {
                tid,
                source: std::io::Error::other(e.to_string()),
            })?;
        let fd = program.fd().map_err(|e| WatchError::Other {
            tid,
            source: std::io::Error::other(e.to_string()),
        })?;
        Watchpoint::open(fd.as_fd(), tid, addr).map_err(|source| match source.raw_os_error() {
            Some(libc::ENOSPC) => WatchError::NoSlot { tid },
            Some(libc::ESRCH) => WatchError::Gone { tid },
            _ => WatchError::Other { tid, source },
        })
    }

    /// Hands every hit waiting in the ring buffer to `f`.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) {
        while let Some(item) = self.ring.next() {
            f(&item);
        }
    }

    /// The counters of log point `index`.
    pub fn counters(&self, index: u32) -> Result<LogCounters, BpfError> {
        let map: Array<&MapData, LogState> = open_map(&self.ebpf, names::MAP_LOG_STATE)?;
        map.get(&index, 0).map_err(|source| BpfError::Map {
            name: names::MAP_LOG_STATE,
            source,
        })
    }

    /// Hits in processes or at addresses pyprobe did not set up, and hits
    /// whose frame could not be read.
    pub fn losses(&self) -> Result<(u64, u64, u64), BpfError> {
        let stat = |index| read_stat(&self.ebpf, index);
        Ok((
            stat(stats::LOG_NO_PROCESS)?,
            stat(stats::LOG_NO_WATCH)?,
            stat(stats::LOG_UNREADABLE)?,
        ))
    }
}

/// Bytes of the sample ring buffer: room for 4 drains' worth of samples
/// of 1 KB (a 60-frame stack) on every CPU at `rate`, a power of two from
/// 1 MB to 64 MB.
fn ring_bytes(cpus: u64, rate: u64) -> u32 {
    let want = cpus * rate * 1024 * 4 / 10;
    want.clamp(1 << 20, 64 << 20)
        .next_power_of_two()
        .min(64 << 20) as u32
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

/// Checks privileges, loads the embedded object (with the maps in
/// `max_entries` resized) and loads `programs` into the kernel (none
/// attached yet).
fn load_programs(
    programs: &[&'static str],
    max_entries: &[(&'static str, u32)],
) -> Result<Ebpf, BpfError> {
    privileges::check()?;
    raise_memlock_limit();
    let mut loader = EbpfLoader::new();
    for &(map, entries) in max_entries {
        loader.map_max_entries(map, entries);
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(BpfError::Load)?;
    for &name in programs {
        load_uprobe(&mut ebpf, name)?;
    }
    Ok(ebpf)
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

/// Key of [`names::MAP_LOG_FREED`]: a code object of a process.
fn code_key(tgid: u32, code: u64) -> WatchKey {
    WatchKey {
        tgid,
        _pad: 0,
        addr: code,
    }
}

/// Attaches the loaded `code_freed` uprobe at `file_offset` of `interp`
/// (the code type's `tp_dealloc`) for process `pid`.
/// `code_freed` on the code type's deallocator in process `pid`, as a
/// [`QuietUprobe`].
fn attach_code_freed(
    ebpf: &mut Ebpf,
    interp: &Interpreter,
    file_offset: u64,
    pid: u32,
) -> Result<QuietUprobe, BpfError> {
    let attach_error = |source: std::io::Error| BpfError::Attach {
        target: interp.host_path.display().to_string(),
        pid,
        offset: file_offset,
        source: aya::programs::ProgramError::IOError(source),
    };
    let program = uprobe_mut(ebpf, names::PROG_CODE_FREED)?;
    let fd = program.fd().map_err(|source| BpfError::Program {
        name: names::PROG_CODE_FREED,
        source,
    })?;
    QuietUprobe::attach(fd.as_fd(), &interp.host_path, file_offset, pid).map_err(attach_error)
}

/// The `code_freed` probes of one loaded object: one per process
/// ([`QuietUprobe`]s: the other processes of the file never trap), or one
/// per interpreter file for every process that maps it (under plain
/// `--all`: set-up and detach cost no longer grow with the processes, and
/// a process started later is covered from its first free).
#[derive(Default)]
pub struct CodeFrees {
    /// Per-process probes.
    per_process: std::collections::HashMap<u32, QuietUprobe>,
    /// Files probed for every process.
    files: std::collections::HashSet<crate::process::FileId>,
}

impl CodeFrees {
    /// Watches the frees of `pid` (of every process of its file with
    /// `whole_file`).
    fn watch(
        &mut self,
        ebpf: &mut Ebpf,
        interp: &Interpreter,
        file_offset: u64,
        pid: u32,
        whole_file: bool,
    ) -> Result<(), BpfError> {
        if !whole_file {
            let probe = attach_code_freed(ebpf, interp, file_offset, pid)?;
            self.per_process.insert(pid, probe);
        } else if self.files.insert(interp.file) {
            uprobe_mut(ebpf, names::PROG_CODE_FREED)?
                .attach(file_offset, &interp.host_path, UProbeScope::AllProcesses)
                .map_err(|source| BpfError::Attach {
                    target: interp.host_path.display().to_string(),
                    pid: 0,
                    offset: file_offset,
                    source,
                })?;
        }
        Ok(())
    }

    /// Drops the probe of `pid` alone, if it has one.
    fn forget(&mut self, pid: u32) {
        self.per_process.remove(&pid);
    }
}

/// A uprobe in one process whose perf event is never enabled: the kernel
/// installs the probe in the process and runs the attached BPF program at
/// every hit (the program hangs off the probe), while a disabled event is
/// not switched in and out with the process's threads. Detached when
/// dropped.
pub struct QuietUprobe {
    /// The perf event: closing it detaches.
    _event: std::os::fd::OwnedFd,
}

impl QuietUprobe {
    /// Opens the uprobe at `offset` of `path` for process `pid` (disabled)
    /// and attaches `program` (a loaded uprobe program) to it.
    fn attach(
        program: std::os::fd::BorrowedFd<'_>,
        path: &std::path::Path,
        offset: u64,
        pid: u32,
    ) -> std::io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let pmu: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")?
            .trim()
            .parse()
            .map_err(std::io::Error::other)?;
        let c_path =
            std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // struct perf_event_attr (128 bytes): type, size, config1 = the
        // file's path, config2 = the offset, flags: disabled. (Not
        // inherit: threads could then not be started in the process.)
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&pmu.to_ne_bytes());
        attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
        attr[40..48].copy_from_slice(&1u64.to_ne_bytes());
        attr[56..64].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
        attr[64..72].copy_from_slice(&offset.to_ne_bytes());
        // `c_path` outlives the call.
        let fd = perf_event_with_program(&attr, pid, program)?;
        Ok(Self { _event: fd })
    }
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

/// `recursion_misses` of a loaded program, from its fdinfo (aya does not
/// expose it).
fn recursion_misses(ebpf: &Ebpf, program: &str) -> u64 {
    let Some(program) = ebpf.program(program) else {
        return 0;
    };
    let Ok(fd) = program.fd() else { return 0 };
    let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| fdinfo_field(&text, "recursion_misses"))
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_grows_with_cpus_and_rate_within_bounds() {
        assert_eq!(ring_bytes(2, 99), 1 << 20);
        assert_eq!(ring_bytes(2, 10_000), 8 << 20);
        assert_eq!(ring_bytes(256, 20_000), 64 << 20);
        assert!(ring_bytes(7, 333).is_power_of_two());
    }

    #[test]
    fn reads_recursion_misses_from_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t2\nrun_cnt:\t10\nrecursion_misses:\t3\nverified_insns:\t40\n";
        assert_eq!(fdinfo_field(text, "recursion_misses"), Some(3));
        assert_eq!(fdinfo_field(text, "run_cnt"), Some(10));
        assert_eq!(fdinfo_field(text, "absent"), None);
    }

    #[test]
    fn the_embedded_object_is_a_bpf_elf_with_our_program() {
        let obj = aya_obj_parse(EBPF_OBJECT);
        assert!(
            obj.contains(&names::PROG_EVAL_ENTRY.to_owned()),
            "programs: {obj:?}"
        );
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
