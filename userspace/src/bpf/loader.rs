//! pyprobe's eBPF object, loaded once and shared by the features that run
//! over it: the call counter, the sampler and the log probes each hold a
//! [`SharedObject`] and take from it what is theirs alone (their ring
//! buffer, their `uprobe_multi` programs).

use std::sync::{Arc, Mutex, MutexGuard};

use aya::{Ebpf, EbpfLoader, maps::MapData};
use pyprobe_common::{calls, names, process::PyProcess};

use super::{
    BpfError, CallProgram, CodeFrees, EBPF_OBJECT, ProcessEvents, load_uprobe, perf_event_mut,
    raise_memlock_limit, take_ring,
};
use crate::{privileges, process::Interpreter};

/// What a loaded object is made for: the maps of a feature that will not
/// run are made with one entry (preallocating them is most of the load
/// time), and only the programs of the features that will run are loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// The call counter (`calls`).
    pub calls: bool,
    /// Call timing (`calls --latency`).
    pub latency: bool,
    /// The sampler (`record`, `top`), at this many samples a second at most.
    pub sample_rate: Option<u64>,
    /// Log points (`log`).
    pub log: bool,
    /// Many processes at once (`--all`, a selection, the agent): the rings
    /// of news and hits are sized for the bursts many processes bring. One
    /// process needs an eighth of that, and a mapped ring is resident in
    /// pyprobe in full, twice over.
    pub wide: bool,
}

/// The loaded object: its maps made, the programs of its [`Features`] in
/// the kernel, the process tracepoints attached.
pub struct Object {
    /// aya's handle on the object.
    pub(super) ebpf: Ebpf,
    /// What it was made for.
    features: Features,
    /// The call programs loaded for `uprobe_multi` links (6.6+), until the
    /// call counter takes them; `None` when perf-event uprobes serve.
    multi: Option<super::uprobe_multi::MultiPrograms>,
    /// The kernel's news of processes, until taken.
    news: Option<ProcessEvents>,
    /// The sampler's ring, until taken.
    samples: Option<aya::maps::RingBuf<MapData>>,
    /// The log points' ring, until taken.
    hits: Option<aya::maps::RingBuf<MapData>>,
    /// `code_freed` in each process, for every feature.
    code_frees: CodeFrees,
    /// A call counter was made over it (the next one starts by emptying
    /// the call maps).
    pub(super) calls_used: bool,
    /// The last code epoch userspace gave a process (see
    /// [`Object::hold_process`]).
    last_epoch: u64,
}

/// A loaded object shared by the features of one engine.
#[derive(Clone)]
pub struct SharedObject(Arc<Mutex<Object>>);

impl SharedObject {
    /// The object, for one use of its maps or programs.
    pub(super) fn lock(&self) -> MutexGuard<'_, Object> {
        // A feature that panicked while holding it left nothing half-done
        // that another could trip on: maps are written whole.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What the object was made for.
    pub fn features(&self) -> Features {
        self.lock().features
    }

    /// The kernel's news of processes, to be read by one reader (the
    /// first caller).
    pub fn take_news(&self) -> Option<ProcessEvents> {
        self.lock().news.take()
    }

    /// Has the code type's `tp_dealloc` (at `file_offset` of `interp`)
    /// count the code objects process `pid` frees, in the per-process
    /// maps of every feature, so that names and armed log points are read
    /// again only when one was freed. With `whole_file`, one probe serves
    /// every process of the file (see [`CodeFrees`]).
    pub fn watch_code_frees(
        &self,
        interp: &Interpreter,
        file_offset: u64,
        pid: u32,
        whole_file: bool,
    ) -> Result<(), BpfError> {
        let object = &mut *self.lock();
        object
            .code_frees
            .watch(&mut object.ebpf, interp, file_offset, pid, whole_file)
    }

    /// Runs of each of its programs, by name: those loaded by aya and the
    /// `uprobe_multi` ones it holds (a call counter reports its own).
    pub fn program_runs(&self) -> Vec<(String, super::ProgramRuns)> {
        let object = self.lock();
        let mut runs = super::program_runs(&object.ebpf);
        if let Some(multi) = &object.multi {
            runs.extend(multi.runs());
        }
        runs
    }

    /// Tells `process_fork` where a task's ids are, so that it tells a
    /// new process from a new thread.
    pub fn set_task_offsets(&self, offsets: crate::kernel::TaskOffsets) -> Result<(), BpfError> {
        let object = &mut *self.lock();
        let mut map: aya::maps::Array<&mut MapData, u32> =
            super::open_map_mut(&mut object.ebpf, names::MAP_TASK_OFFSETS)?;
        for (index, value) in [(0, offsets.pid), (1, offsets.tgid)] {
            map.set(index, value, 0).map_err(|source| BpfError::Map {
                name: names::MAP_TASK_OFFSETS,
                source,
            })?;
        }
        Ok(())
    }

    /// Takes off the `code_freed` probe of process `pid` alone (it exited
    /// or exec'd), if it has one.
    pub fn forget_code_frees(&self, pid: u32) {
        self.lock().code_frees.forget(pid);
    }
}

impl Object {
    /// Checks privileges, makes the maps, loads the programs of `features`
    /// and attaches the process tracepoints.
    pub fn load(features: Features) -> Result<SharedObject, BpfError> {
        privileges::check()?;
        raise_memlock_limit();
        let started = std::time::Instant::now();
        let mut loader = EbpfLoader::new();
        // The programs make no CO-RE relocations (the task offsets they
        // need come from `kernel.rs`, for the jobs that follow forks), so
        // no kernel BTF: the patched aya (third_party/README.md) no longer
        // parses it in `new` (record's peak RSS 25.5 -> 12.1 MB).
        loader.btf(None);
        for (map, entries) in map_sizes(&features) {
            loader.map_max_entries(map, entries);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(BpfError::Load)?;
        let maps_made = started.elapsed();
        // Before any map is taken out: the `uprobe_multi` programs point at
        // every map they use.
        let multi = if features.calls {
            load_call_programs(&mut ebpf)?
        } else {
            None
        };
        load_uprobe(&mut ebpf, names::PROG_CODE_FREED)?;
        let samples = match features.sample_rate {
            Some(_) => Some(load_sampler(&mut ebpf)?),
            None => None,
        };
        let hits = if features.log {
            Some(load_log_hit(&mut ebpf)?)
        } else {
            None
        };
        let news = Some(ProcessEvents::attach(&mut ebpf)?);
        log::debug!(
            "eBPF object for {features:?}: maps made in {maps_made:?}, loaded in {:?}",
            started.elapsed()
        );
        Ok(SharedObject(Arc::new(Mutex::new(Object {
            ebpf,
            features,
            multi,
            news,
            samples,
            hits,
            code_frees: CodeFrees::default(),
            calls_used: false,
            last_epoch: 0,
        }))))
    }

    /// The call programs as `uprobe_multi` programs, for the call counter
    /// (once).
    pub(super) fn take_multi(&mut self) -> Option<super::uprobe_multi::MultiPrograms> {
        self.multi.take()
    }

    /// The call programs back from a call counter that went.
    pub(super) fn put_multi(&mut self, multi: super::uprobe_multi::MultiPrograms) {
        self.multi = Some(multi);
    }

    /// The sampler's ring (once).
    pub(super) fn take_samples(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.samples.take()
    }

    /// The log points' ring (once).
    pub(super) fn take_hits(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        self.hits.take()
    }

    /// Has every program know process `pid` by `facts` (see
    /// [`PyProcess`]), before a feature writes its part. Written whole,
    /// whatever was there (facts read before an exec and written after the
    /// kernel dropped the old ones are repaired by the next set-up), with a
    /// fresh code epoch: the monotonic clock, the one the kernel reads.
    /// Every earlier epoch of this PID is below it (an epoch set at time t
    /// is bumped once per code object freed, fewer than the nanoseconds
    /// since t; the kernel's carry [`calls::KERNEL_EPOCH`]), so no cache
    /// slot or name is trusted across the write, and a bump the write
    /// loses changes nothing.
    pub(super) fn hold_process(&mut self, pid: u32, facts: &PyProcess) -> Result<(), BpfError> {
        let ns = crate::kernel::monotonic_ns();
        self.last_epoch = ns.max(self.last_epoch + 1) & !calls::KERNEL_EPOCH;
        let facts = PyProcess {
            code_epoch: self.last_epoch,
            ..*facts
        };
        let mut map: aya::maps::HashMap<&mut MapData, u32, PyProcess> =
            super::open_map_mut(&mut self.ebpf, names::MAP_PY_PROCESS)?;
        map.insert(pid, facts, 0).map_err(|source| BpfError::Map {
            name: names::MAP_PY_PROCESS,
            source,
        })
    }

    /// Takes process `pid`'s facts away once no feature's part names it
    /// (a feature calls this after removing its own part).
    pub(super) fn release_process(&mut self, pid: u32) -> Result<(), BpfError> {
        fn holds<V: aya::Pod>(ebpf: &Ebpf, name: &'static str, pid: u32) -> bool {
            super::open_map::<aya::maps::HashMap<&MapData, u32, V>>(ebpf, name)
                .is_ok_and(|map| map.get(&pid, 0).is_ok())
        }
        if holds::<calls::ProcessConfig>(&self.ebpf, names::MAP_CALL_CONFIG, pid)
            || holds::<u32>(&self.ebpf, names::MAP_SAMPLE_PROCESSES, pid)
            || holds::<pyprobe_common::logpoint::LogProcess>(
                &self.ebpf,
                names::MAP_LOG_PROCESS,
                pid,
            )
        {
            return Ok(());
        }
        let mut map: aya::maps::HashMap<&mut MapData, u32, PyProcess> =
            super::open_map_mut(&mut self.ebpf, names::MAP_PY_PROCESS)?;
        // A process gone already is not an error.
        let _ = map.remove(&pid);
        Ok(())
    }

    /// The code epoch of process `pid` (see [`PyProcess::code_epoch`]),
    /// if it has facts.
    pub(super) fn code_epoch(&self, pid: u32) -> Option<u64> {
        let map: aya::maps::HashMap<&MapData, u32, PyProcess> =
            super::open_map(&self.ebpf, names::MAP_PY_PROCESS).ok()?;
        map.get(&pid, 0).ok().map(|p| p.code_epoch)
    }
}

/// Bytes of the ring of process news when no calls job needs code names:
/// forks, execs and exits (16 bytes each), 16k of them.
const PROCESS_NEWS_RING: u32 = 256 << 10;

/// Bytes of the ring of process news for a calls job on one process (or a
/// few): about 1200 code objects' names (430 bytes each) counted for the
/// first time before userspace reads them, which it does at once; one seen
/// after a full ring is counted as lost and named from the process itself.
/// Wide jobs keep the object's 8 MB.
const CALLS_NEWS_RING_NARROW: u32 = 512 << 10;

/// Bytes of the log points' ring for one process (or a few): about 800
/// hits of 1.2 KB waiting to be printed; wide jobs keep the object's 4 MB.
const LOG_HITS_RING_NARROW: u32 = 1 << 20;

/// Entries of the maps whose size depends on the features: the maps of a
/// feature that will not run get one.
fn map_sizes(features: &Features) -> Vec<(&'static str, u32)> {
    let mut sizes = Vec::new();
    if !features.calls {
        for map in [
            names::MAP_CALL_COUNTS,
            names::MAP_BUILTIN_COUNTS,
            names::MAP_CALL_CONFIG,
        ] {
            sizes.push((map, 1));
        }
        sizes.push((names::MAP_PROCESS_EVENTS, PROCESS_NEWS_RING));
    } else if !features.wide {
        sizes.push((names::MAP_PROCESS_EVENTS, CALLS_NEWS_RING_NARROW));
    }
    if !features.log {
        // A ring has at least a page.
        sizes.push((names::MAP_LOG_HITS, 4096));
    } else if !features.wide {
        sizes.push((names::MAP_LOG_HITS, LOG_HITS_RING_NARROW));
    }
    if features.calls && features.latency {
        sizes.push((
            names::MAP_CALL_LATENCY,
            super::call_counter::latency_codes(),
        ));
        sizes.push((names::MAP_CALL_RUNNING, calls::MAX_RUNNING));
    } else {
        sizes.push((names::MAP_CALL_LATENCY, 1));
        sizes.push((names::MAP_CALL_RUNNING, 1));
    }
    match features.sample_rate {
        Some(rate) => {
            let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u64;
            sizes.push((names::MAP_SAMPLES, super::sampler::ring_bytes(cpus, rate)));
        }
        None => {
            // A ring has at least a page.
            sizes.push((names::MAP_SAMPLES, 4096));
            sizes.push((names::MAP_SAMPLE_THREADS, 1));
            sizes.push((names::MAP_SAMPLE_PROCESSES, 1));
        }
    }
    sizes
}

/// Loads the call programs: as `uprobe_multi` programs where the kernel
/// has them (returned), else as aya's perf-event uprobes.
fn load_call_programs(
    ebpf: &mut Ebpf,
) -> Result<Option<super::uprobe_multi::MultiPrograms>, BpfError> {
    let names = CallProgram::ALL.map(CallProgram::name);
    match super::uprobe_multi::MultiPrograms::load(EBPF_OBJECT, ebpf, &names) {
        Ok(multi) => Ok(Some(multi)),
        Err(e) => {
            log::debug!("uprobe_multi programs not loaded ({e}): perf-event uprobes");
            for name in names {
                load_uprobe(ebpf, name)?;
            }
            Ok(None)
        }
    }
}

/// Loads the sampling programs, puts the stack walk in the program array
/// and takes the sample ring.
fn load_sampler(ebpf: &mut Ebpf) -> Result<aya::maps::RingBuf<MapData>, BpfError> {
    for name in [names::PROG_SAMPLE_CPU, names::PROG_SAMPLE_WALK] {
        perf_event_mut(ebpf, name)?
            .load()
            .map_err(|source| BpfError::Program { name, source })?;
    }
    let walk = perf_event_mut(ebpf, names::PROG_SAMPLE_WALK)?
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
        super::open_map_mut(ebpf, names::MAP_SAMPLE_PROGS)?;
    progs.set(0, &walk, 0).map_err(|source| BpfError::Map {
        name: names::MAP_SAMPLE_PROGS,
        source,
    })?;
    take_ring(ebpf, names::MAP_SAMPLES)
}

/// Loads `log_hit` and takes the hit ring.
fn load_log_hit(ebpf: &mut Ebpf) -> Result<aya::maps::RingBuf<MapData>, BpfError> {
    perf_event_mut(ebpf, names::PROG_LOG_HIT)?
        .load()
        .map_err(|source| BpfError::Program {
            name: names::PROG_LOG_HIT,
            source,
        })?;
    if let Ok(program) = perf_event_mut(ebpf, names::PROG_LOG_HIT)
        && let Ok(info) = program.info()
    {
        log::debug!(
            "log_hit: {:?} instructions verified, {:?} translated bytes",
            info.verified_instruction_count(),
            info.size_translated(),
        );
    }
    take_ring(ebpf, names::MAP_LOG_HITS)
}
