//! The CPU sampler's programs and maps (`pyprobe record`, `top`).

use std::collections::BTreeMap;

use aya::maps::{HashMap as BpfHashMap, MapData};
use pyprobe_common::{names, process::PyProcess, sample::ThreadState, stats};

use super::{
    BpfError, SharedObject, hash_insert, open_map_mut, perf_event_mut, read_stat, recursion_misses,
};

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
    object: SharedObject,
    ring: aya::maps::RingBuf<MapData>,
    /// The CPU clock events sampling, one per CPU (taken off when the
    /// sampler goes: the object may serve others longer).
    links: Vec<aya::programs::perf_event::PerfEventLinkId>,
    /// What `SAMPLE_THREADS` holds per process: thread id -> state.
    threads: std::collections::HashMap<u32, BTreeMap<u32, u64>>,
}

impl Sampler {
    /// The loaded object this handle shares.
    pub fn object(&self) -> &SharedObject {
        &self.object
    }

    /// The sampler of `object`, which must be made for sampling (see
    /// [`Features`](super::Features)); it samples nothing until started.
    pub fn new(object: &SharedObject) -> Result<Self, BpfError> {
        let ring = object
            .lock()
            .take_samples()
            .ok_or(BpfError::Missing(names::MAP_SAMPLES))?;
        Ok(Self {
            object: object.clone(),
            ring,
            links: Vec::new(),
            threads: std::collections::HashMap::new(),
        })
    }

    /// Starts sampling every online CPU `rate` times a second (of CPU
    /// time: an idle CPU is not sampled).
    /// Started again, it samples at the new rate.
    pub fn start(&mut self, rate: u64) -> Result<(), BpfError> {
        use aya::programs::perf_event::{
            PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent,
        };
        self.stop();
        let mut object = self.object.lock();
        let cpus = aya::util::online_cpus().map_err(|(_, e)| BpfError::Program {
            name: names::PROG_SAMPLE_CPU,
            source: aya::programs::ProgramError::IOError(e),
        })?;
        let period = 1_000_000_000 / rate.max(1);
        let program = perf_event_mut(&mut object.ebpf, names::PROG_SAMPLE_CPU)?;
        for cpu in cpus {
            let link = program
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
            self.links.push(link);
        }
        Ok(())
    }

    /// Has the sampler walk process `pid`, known by `facts`; with
    /// `follow_children` the kernel tells of its children as they fork
    /// (news [`pyprobe_common::process::CHILD`]).
    pub fn configure(
        &mut self,
        pid: u32,
        facts: &PyProcess,
        follow_children: bool,
    ) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        object.hold_process(pid, facts)?;
        let flags = if follow_children {
            pyprobe_common::sample::FOLLOW_CHILDREN
        } else {
            0
        };
        hash_insert(&mut object.ebpf, names::MAP_SAMPLE_PROCESSES, pid, &flags)
    }

    /// Forgets a process (and its threads) that exited.
    pub fn forget(&mut self, pid: u32) -> Result<(), BpfError> {
        {
            let mut object = self.object.lock();
            let mut map: BpfHashMap<&mut MapData, u32, u32> =
                open_map_mut(&mut object.ebpf, names::MAP_SAMPLE_PROCESSES)?;
            let _ = map.remove(&pid);
            object.release_process(pid)?;
        }
        self.object.forget_code_frees(pid);
        self.set_threads(pid, &[])
    }

    /// Replaces the threads of process `pid`: (thread id, thread state or
    /// 0 for a thread the interpreter does not know). Only the differences
    /// from the last call for `pid` reach the kernel.
    pub fn set_threads(&mut self, pid: u32, threads: &[(u32, u64)]) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        let wanted: BTreeMap<u32, u64> = threads.iter().copied().collect();
        let old = self.threads.remove(&pid).unwrap_or_default();
        let mut map: BpfHashMap<&mut MapData, u32, ThreadState> =
            open_map_mut(&mut object.ebpf, names::MAP_SAMPLE_THREADS)?;
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
        let object = self.object.lock();
        read_stat(&object.ebpf, stats::SAMPLE_UNKNOWN_THREAD)
    }

    /// Counts of ticks that gave no sample, by reason.
    pub fn losses(&self) -> Result<SampleLosses, BpfError> {
        let object = self.object.lock();
        let stat = |index| read_stat(&object.ebpf, index);
        Ok(SampleLosses {
            unknown_thread: stat(stats::SAMPLE_UNKNOWN_THREAD)?,
            not_python: stat(stats::SAMPLE_NOT_PYTHON)?,
            no_frame: stat(stats::SAMPLE_NO_FRAME)?,
            unreadable: stat(stats::SAMPLE_UNREADABLE)?,
            ring_full: stat(stats::SAMPLE_LOST)?,
            recursion_misses: recursion_misses(&object.ebpf, names::PROG_SAMPLE_CPU)
                + recursion_misses(&object.ebpf, names::PROG_SAMPLE_WALK),
        })
    }
}

impl Sampler {
    /// Stops sampling (the CPU clock events go).
    pub fn stop(&mut self) {
        let mut object = self.object.lock();
        if let Ok(program) = perf_event_mut(&mut object.ebpf, names::PROG_SAMPLE_CPU) {
            for link in self.links.drain(..) {
                let _ = program.detach(link);
            }
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bytes of the sample ring buffer: room for 4 drains' worth of samples
/// of 1 KB (a 60-frame stack) on every CPU at `rate`, a power of two from
/// 1 MB to 64 MB.
pub(super) fn ring_bytes(cpus: u64, rate: u64) -> u32 {
    let want = cpus * rate * 1024 * 4 / 10;
    want.clamp(1 << 20, 64 << 20)
        .next_power_of_two()
        .min(64 << 20) as u32
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
}
