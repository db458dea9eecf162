//! The log point program, its maps and its hardware watchpoints
//! (`pyprobe log`).

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use pyprobe_common::{
    logpoint::{LogProcess, LogState, Program, Watch, WatchKey},
    names,
    process::PyProcess,
    stats,
};

use super::{
    BpfError, SharedObject, hash_insert, open_map, open_map_mut, perf_event_mut,
    perf_event_with_program, read_stat,
};

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
    object: SharedObject,
    ring: aya::maps::RingBuf<MapData>,
    /// Why forked children are not followed, when they are not.
    forks_unfollowed: Option<String>,
}

impl LogProbes {
    /// The loaded object this handle shares.
    pub fn object(&self) -> &SharedObject {
        &self.object
    }

    /// The log probes of `object`, which must be made for log points
    /// (see [`Features`](super::Features)); no watchpoint yet.
    pub fn new(object: &SharedObject) -> Result<Self, BpfError> {
        let ring = object
            .lock()
            .take_hits()
            .ok_or(BpfError::Missing(names::MAP_LOG_HITS))?;
        Ok(Self {
            object: object.clone(),
            ring,
            forks_unfollowed: Some("the kernel's task layout is not read yet".to_owned()),
        })
    }

    /// Takes what the engine says of following forks
    /// ([`crate::engine::Engine::forks_unfollowed`]): when the programs
    /// can, a process forked by a watched one is set up in the kernel.
    pub fn follow_forks(&mut self, unfollowed: Option<&str>) {
        self.forks_unfollowed = unfollowed.map(str::to_owned);
    }

    /// Why processes forked by watched ones are not followed (their
    /// inherited watchpoints' hits are then counted as "at addresses not
    /// watched"), if they are not.
    pub fn forks_unfollowed(&self) -> Option<&str> {
        self.forks_unfollowed.as_deref()
    }

    /// The watched process `pid` descends from by fork, as the kernel set
    /// it up ([`process::FORKED`]), if it does.
    pub fn origin_of(&self, pid: u32) -> Option<u32> {
        let object = self.object.lock();
        let map: BpfHashMap<&MapData, u32, u32> =
            open_map(&object.ebpf, names::MAP_LOG_ORIGIN).ok()?;
        map.get(&pid, 0).ok()
    }

    /// Tells the program how to read process `pid`, known by `facts`.
    pub fn configure(
        &mut self,
        pid: u32,
        facts: &PyProcess,
        config: &LogProcess,
    ) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        object.hold_process(pid, facts)?;
        hash_insert(&mut object.ebpf, names::MAP_LOG_PROCESS, pid, config)
    }

    /// Sets what log point `index` captures and tests.
    pub fn set_program(&mut self, index: u32, program: &Program) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        let mut map: Array<&mut MapData, Program> =
            open_map_mut(&mut object.ebpf, names::MAP_LOG_PROGRAMS)?;
        map.set(index, program, 0).map_err(|source| BpfError::Map {
            name: names::MAP_LOG_PROGRAMS,
            source,
        })
    }

    /// Declares a watched address (before its watchpoints are set), and
    /// its code object, whose free [`Self::freed_code`] reports.
    pub fn watch(&mut self, key: WatchKey, watch: &Watch) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        hash_insert(&mut object.ebpf, names::MAP_LOG_WATCH, key, watch)?;
        hash_insert(
            &mut object.ebpf,
            names::MAP_LOG_FREED,
            code_key(key.tgid, watch.code),
            &0u32,
        )
    }

    /// Forgets a watched address and its code object (its watchpoints
    /// removed first, with [`Self::remove_watchpoint`]).
    pub fn unwatch(&mut self, key: WatchKey, code: u64) -> Result<(), BpfError> {
        self.forget_watch(key)?;
        self.forget_code(key.tgid, code)
    }

    /// Forgets a watched address (see [`Self::unwatch`]).
    pub fn forget_watch(&mut self, key: WatchKey) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        let mut map: BpfHashMap<&mut MapData, WatchKey, Watch> =
            open_map_mut(&mut object.ebpf, names::MAP_LOG_WATCH)?;
        // Absent keys are fine: forgetting twice is not an error.
        let _ = map.remove(&key);
        Ok(())
    }

    /// Stops looking out for the free of code object `code` of `pid`
    /// (see [`Self::unwatch`]).
    pub fn forget_code(&mut self, pid: u32, code: u64) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        let mut freed: BpfHashMap<&mut MapData, WatchKey, u32> =
            open_map_mut(&mut object.ebpf, names::MAP_LOG_FREED)?;
        let _ = freed.remove(&code_key(pid, code));
        Ok(())
    }

    /// Whether code object `code` of `pid`, declared with [`Self::watch`],
    /// was freed since.
    pub fn freed_code(&self, pid: u32, code: u64) -> Result<bool, BpfError> {
        let object = self.object.lock();
        let freed: BpfHashMap<&MapData, WatchKey, u32> =
            open_map(&object.ebpf, names::MAP_LOG_FREED)?;
        Ok(freed.get(&code_key(pid, code), 0).is_ok_and(|v| v != 0))
    }

    /// Forgets process `pid` (it exited): its `code_freed` probe is
    /// detached.
    pub fn forget(&mut self, pid: u32) {
        self.object.forget_code_frees(pid);
    }

    /// The code epoch of `pid` ([`PyProcess::code_epoch`]): it changes
    /// each time the process frees a code object.
    pub fn code_epoch(&self, pid: u32) -> Option<u64> {
        self.object.lock().code_epoch(pid)
    }

    /// Sets a read/write hardware watchpoint on the byte at `addr` (an
    /// instruction's oparg) in thread `tid`, inherited by the threads and
    /// processes it starts from now on. Dropping it takes it off.
    pub fn set_watchpoint(&mut self, tid: u32, addr: u64) -> Result<Watchpoint, WatchError> {
        let mut object = self.object.lock();
        let program = perf_event_mut(&mut object.ebpf, names::PROG_LOG_HIT).map_err(|e| {
            WatchError::Other {
                tid,
                source: std::io::Error::other(e.to_string()),
            }
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

    /// Starts log point `point`'s rate window and count afresh (its slot
    /// serves a new log point).
    pub fn reset_limit(&mut self, point: u32) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        let mut map: Array<&mut MapData, pyprobe_common::logpoint::LogLimit> =
            open_map_mut(&mut object.ebpf, names::MAP_LOG_LIMITS)?;
        map.set(point, pyprobe_common::logpoint::LogLimit::default(), 0)
            .map_err(|source| BpfError::Map {
                name: names::MAP_LOG_LIMITS,
                source,
            })
    }

    /// Zeroes the counters of armed entry `index`, for its next owner.
    pub fn reset_state(&mut self, index: u32) -> Result<(), BpfError> {
        let mut object = self.object.lock();
        let mut map: Array<&mut MapData, LogState> =
            open_map_mut(&mut object.ebpf, names::MAP_LOG_STATE)?;
        map.set(index, LogState::default(), 0)
            .map_err(|source| BpfError::Map {
                name: names::MAP_LOG_STATE,
                source,
            })
    }

    /// The counters of armed code object `index`.
    pub fn counters(&self, index: u32) -> Result<LogCounters, BpfError> {
        let object = self.object.lock();
        let map: Array<&MapData, LogState> = open_map(&object.ebpf, names::MAP_LOG_STATE)?;
        map.get(&index, 0).map_err(|source| BpfError::Map {
            name: names::MAP_LOG_STATE,
            source,
        })
    }

    /// Hits in processes or at addresses pyprobe did not set up, and hits
    /// whose frame could not be read.
    pub fn losses(&self) -> Result<(u64, u64, u64), BpfError> {
        let object = self.object.lock();
        let stat = |index| read_stat(&object.ebpf, index);
        Ok((
            stat(stats::LOG_NO_PROCESS)?,
            stat(stats::LOG_NO_WATCH)?,
            stat(stats::LOG_UNREADABLE)?,
        ))
    }
}

/// Key of [`names::MAP_LOG_FREED`]: a code object of a process.
fn code_key(tgid: u32, code: u64) -> WatchKey {
    WatchKey {
        tgid,
        _pad: 0,
        addr: code,
    }
}
