//! The kernel's news of processes: exec, exit, fork, and processes and
//! code objects met for the first time, read from one ring buffer.

use aya::{Ebpf, maps::MapData};
use pyprobe_common::{
    names,
    process::{self, BuiltinEvent, CodeEvent, ProcessEvent},
};

use super::{BpfError, take_ring};

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
    pub(super) fn attach(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
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

    /// Waits up to `timeout` for news (poll(2) on the ring: no wake-up
    /// while nothing happens); whether some came.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut fd, 1, ms) > 0 }
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
#[derive(Clone)]
pub enum News {
    /// A process configured, forked from a watched one, exec'd or exited.
    Process(ProcessEvent),
    /// A code object counted for the first time, with its names' bytes.
    Code(Box<CodeEvent>),
    /// A builtin counted for the first time, with its names' bytes.
    Builtin(Box<BuiltinEvent>),
}
