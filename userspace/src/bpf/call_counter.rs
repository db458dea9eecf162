//! The call counter's programs and maps (`pyprobe calls`).

use std::{collections::BTreeMap, num::NonZeroU32};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::uprobe::UProbeScope,
};
use pyprobe_common::{
    calls::{self, BuiltinKey, CacheSlot, CallCounts, CodeKey, Histogram, ProcessConfig, SkipSet},
    names,
    process::PyProcess,
    stats,
};

use super::{
    BpfError, SharedObject, hash_insert, open_map, open_map_mut, read_stat, recursion_misses,
    uprobe_mut,
};
use crate::process::Interpreter;

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
    pub(super) fn name(self) -> &'static str {
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
    pub(super) const ALL: [CallProgram; 8] = [
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
pub(super) fn latency_codes() -> u32 {
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1);
    let fit = LATENCY_MAP_BYTES / (std::mem::size_of::<Histogram>() * cpus);
    (fit as u32).clamp(64, calls::MAX_LATENCY_CODES)
}

/// Counts Python function starts per code object, in the kernel.
pub struct CallCounter {
    object: SharedObject,
    /// The programs, loaded for `uprobe_multi` links where the kernel has
    /// them (6.6+); else aya's perf-event uprobes are used.
    multi: Option<super::uprobe_multi::MultiPrograms>,
    /// Probes asked for since the last [`Self::flush`], by program, file
    /// and process, in the order asked.
    pending: Vec<PendingProbes>,
    /// The `uprobe_multi` links made, with the process each is for
    /// (`None`: every process of its file).
    links: Vec<(Option<u32>, super::uprobe_multi::MultiLink)>,
    /// Perf-event uprobes made (kernels without `uprobe_multi`), by
    /// program and process, to take off when the counter goes.
    perf_links: Vec<(
        CallProgram,
        Option<u32>,
        aya::programs::uprobe::UProbeLinkId,
    )>,
    /// What earlier counters of the object had lost (losses are this
    /// counter's own).
    base: CallLosses,
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
    /// The call counter of `object`, which must be made for calls (see
    /// [`Features`](super::Features)); nothing is attached yet.
    ///
    /// One counter at a time per object: a later one (the agent's next
    /// calls job) starts from empty maps.
    pub fn new(object: &SharedObject) -> Result<Self, BpfError> {
        debug_assert!(object.features().calls, "an object made without calls");
        let multi = {
            let mut o = object.lock();
            if o.calls_used {
                clear_maps(&mut o)?;
            }
            o.calls_used = true;
            o.take_multi()
        };
        let mut counter = Self {
            object: object.clone(),
            multi,
            pending: Vec::new(),
            links: Vec::new(),
            perf_links: Vec::new(),
            base: CallLosses::default(),
        };
        counter.base = counter.losses()?;
        Ok(counter)
    }

    /// Gives the probes whose cookie names template `index`
    /// ([`calls::cookie`]) the facts and configuration a process of their
    /// file gets when the kernel meets it before userspace has configured
    /// it. Its `thread` addresses are link-time ones: the kernel adds the
    /// load bias.
    pub fn set_template(&mut self, index: u32, config: &calls::Template) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        hash_insert(&mut object.ebpf, names::MAP_CALL_TEMPLATES, index, config)
    }

    /// Tells the program how to read process `pid`, known by `facts`
    /// (replaces any earlier configuration).
    pub fn configure(
        &mut self,
        pid: u32,
        facts: &PyProcess,
        config: &ProcessConfig,
    ) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        object.hold_process(pid, facts)?;
        hash_insert(&mut object.ebpf, names::MAP_CALL_CONFIG, pid, config)
    }

    /// Forgets a process that exited.
    pub fn forget(&mut self, pid: u32) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        let mut map: BpfHashMap<&mut MapData, u32, ProcessConfig> =
            open_map_mut(&mut object.ebpf, names::MAP_CALL_CONFIG)?;
        // A PID that was never configured is not an error.
        let _ = map.remove(&pid);
        object.release_process(pid)
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
        let mut object = self.object.lock();
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
        let link = uprobe_mut(&mut object.ebpf, name)?
            .attach(point, &interp.host_path, scope)
            .map_err(|source| BpfError::Attach {
                target: interp.host_path.display().to_string(),
                pid: pid.unwrap_or(0),
                offset: file_offset,
                source,
            })?;
        self.perf_links.push((program, pid, link));
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
            self.links.push((group.pid, link));
        }
        Ok(())
    }

    /// Stops counting process `pid`: the probes put on for it alone come
    /// off (it traps no more) and its configuration goes. Probes on its
    /// whole file stay (they serve other processes); it is then not
    /// counted, at the cost of a trap per call. Returns whether its own
    /// probes came off.
    pub fn detach_process(&mut self, pid: u32) -> Result<bool, BpfError> {
        let before = self.links.len() + self.perf_links.len();
        let (mine, others) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(p, _)| *p == Some(pid));
        self.links = others;
        super::close_all(mine);
        {
            let mut object = self.object.lock();
            let mine: Vec<usize> = (0..self.perf_links.len())
                .rev()
                .filter(|&i| self.perf_links[i].1 == Some(pid))
                .collect();
            for i in mine {
                let (program, _, link) = self.perf_links.remove(i);
                if let Ok(p) = uprobe_mut(&mut object.ebpf, program.name()) {
                    let _ = p.detach(link);
                }
            }
        }
        self.forget(pid)?;
        Ok(self.links.len() + self.perf_links.len() < before)
    }

    /// Runs of the `uprobe_multi` programs it holds, by name (none with
    /// perf-event uprobes: those are the object's).
    pub fn program_runs(&self) -> Vec<(String, super::ProgramRuns)> {
        self.multi.as_ref().map(|m| m.runs()).unwrap_or_default()
    }

    /// Whether probes are `uprobe_multi` links (closed with one wait per
    /// link rather than one per probe).
    pub fn uses_multi(&self) -> bool {
        self.multi.is_some()
    }

    /// Counts so far, per code object (summed over CPUs): (starts, resumes).
    pub fn counts(&self) -> Result<BTreeMap<CodeKey, CallCounts>, BpfError> {
        let object = self.object.lock();
        let map: PerCpuHashMap<&MapData, CodeKey, CallCounts> =
            open_map(&object.ebpf, names::MAP_CALL_COUNTS)?;
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
        let cache: PerCpuArray<&MapData, CacheSlot> =
            open_map(&object.ebpf, names::MAP_CALL_CACHE)?;
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
        let object = self.object.lock();
        let map_error = |source| BpfError::Map {
            name: names::MAP_BUILTIN_COUNTS,
            source,
        };
        let map: PerCpuHashMap<&MapData, BuiltinKey, u64> =
            open_map(&object.ebpf, names::MAP_BUILTIN_COUNTS)?;
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
        let object = self.object.lock();
        let map: PerCpuHashMap<&MapData, CodeKey, Histogram> =
            open_map(&object.ebpf, names::MAP_CALL_LATENCY)?;
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
        let mut object = self.object.lock();
        let map_error = |source| BpfError::Map {
            name: names::MAP_CALL_SKIP,
            source,
        };
        let mut skip: Array<&mut MapData, SkipSet> =
            open_map_mut(&mut object.ebpf, names::MAP_CALL_SKIP)?;
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
        let object = self.object.lock();
        let stat = |index| read_stat(&object.ebpf, index);
        let b = &self.base;
        let all = CallLosses {
            map_full: stat(stats::CALLS_MAP_FULL)?,
            unconfigured: stat(stats::CALLS_NO_CONFIG)?,
            unreadable: stat(stats::CALLS_UNREADABLE)?,
            untimed: stat(stats::LATENCY_MAP_FULL)?,
            frame_mismatches: stat(stats::FRAME_REGISTER_MISMATCH)?,
            process_events: stat(stats::PROCESS_EVENTS_LOST)?,
            recursion_misses: CallProgram::ALL
                .iter()
                .map(|p| recursion_misses(&object.ebpf, p.name()))
                .sum(),
        };
        Ok(CallLosses {
            map_full: all.map_full.saturating_sub(b.map_full),
            unconfigured: all.unconfigured.saturating_sub(b.unconfigured),
            unreadable: all.unreadable.saturating_sub(b.unreadable),
            untimed: all.untimed.saturating_sub(b.untimed),
            frame_mismatches: all.frame_mismatches.saturating_sub(b.frame_mismatches),
            process_events: all.process_events.saturating_sub(b.process_events),
            recursion_misses: all.recursion_misses.saturating_sub(b.recursion_misses),
        })
    }
}

impl Drop for CallCounter {
    /// Takes its probes off (the object may serve another counter later:
    /// the agent's next calls job), forgets the processes it configured
    /// (their facts go unless another job holds them; `process_fork` stops
    /// telling of their children) and gives the `uprobe_multi` programs
    /// back.
    fn drop(&mut self) {
        super::close_all(std::mem::take(&mut self.links));
        let mut object = self.object.lock();
        for (program, _, link) in self.perf_links.drain(..) {
            if let Ok(p) = uprobe_mut(&mut object.ebpf, program.name()) {
                let _ = p.detach(link);
            }
        }
        if let Err(e) = forget_processes(&mut object) {
            log::debug!("forgetting the counted processes: {e}");
        }
        if let Some(multi) = self.multi.take() {
            object.put_multi(multi);
        }
    }
}

/// Removes every process's configuration from `CALL_CONFIG`, and its
/// facts unless another feature's part names it.
fn forget_processes(object: &mut super::Object) -> Result<(), BpfError> {
    let pids: Vec<u32> = {
        let mut map: BpfHashMap<&mut MapData, u32, ProcessConfig> =
            open_map_mut(&mut object.ebpf, names::MAP_CALL_CONFIG)?;
        let keys: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for k in &keys {
            let _ = map.remove(k);
        }
        keys
    };
    for pid in pids {
        object.release_process(pid)?;
    }
    Ok(())
}

/// Empties what an earlier counter left in the call maps: processes'
/// configurations and templates, counts, the count cache, durations and
/// skip sets.
fn clear_maps(object: &mut super::Object) -> Result<(), BpfError> {
    let error = |name: &'static str| move |source| BpfError::Map { name, source };
    forget_processes(object)?;
    let ebpf = &mut object.ebpf;
    {
        let mut map: BpfHashMap<&mut MapData, u32, calls::Template> =
            open_map_mut(ebpf, names::MAP_CALL_TEMPLATES)?;
        let keys: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = map.remove(&k);
        }
    }
    {
        let mut map: PerCpuHashMap<&mut MapData, CodeKey, CallCounts> =
            open_map_mut(ebpf, names::MAP_CALL_COUNTS)?;
        let keys: Vec<CodeKey> = map.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = map.remove(&k);
        }
    }
    {
        let mut map: PerCpuHashMap<&mut MapData, CodeKey, Histogram> =
            open_map_mut(ebpf, names::MAP_CALL_LATENCY)?;
        let keys: Vec<CodeKey> = map.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = map.remove(&k);
        }
    }
    {
        let mut map: PerCpuHashMap<&mut MapData, BuiltinKey, u64> =
            open_map_mut(ebpf, names::MAP_BUILTIN_COUNTS)?;
        let keys: Vec<BuiltinKey> = map.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = map.remove(&k);
        }
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| BpfError::Map {
        name: names::MAP_CALL_CACHE,
        source: aya::maps::MapError::IoError(e),
    })?;
    {
        let mut cache: PerCpuArray<&mut MapData, CacheSlot> =
            open_map_mut(ebpf, names::MAP_CALL_CACHE)?;
        for index in 0..calls::CACHE_SLOTS {
            let empty = aya::maps::PerCpuValues::try_from(vec![CacheSlot::default(); cpus])
                .map_err(|e| BpfError::Map {
                    name: names::MAP_CALL_CACHE,
                    source: aya::maps::MapError::IoError(e),
                })?;
            cache
                .set(index, empty, 0)
                .map_err(error(names::MAP_CALL_CACHE))?;
        }
    }
    let mut skip: Array<&mut MapData, SkipSet> = open_map_mut(ebpf, names::MAP_CALL_SKIP)?;
    for index in 0..calls::SKIP_SETS {
        skip.set(index, SkipSet::default(), 0)
            .map_err(error(names::MAP_CALL_SKIP))?;
    }
    Ok(())
}
