//! Which kernel thread runs which Python thread state: read from the
//! interpreter's thread list, so the sampler can go from the interrupted
//! task to its Python frames, and `dump` can name each thread.
//!
//! From 3.11 a thread state records its kernel thread id
//! (`native_thread_id`). Up to 3.10 it records only `pthread_self()`, the
//! address of glibc's `struct pthread`, whose `tid` field is found once per
//! process: the offset where the main thread's structure holds the PID.
//! Either way the id is the one the process sees: in a container with its
//! own PID namespace, not the host's, so it is translated through
//! [`Tasks`].

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    process::Tasks,
    python::{
        memory::Memory,
        reader::{ReadError, Target},
    },
};

/// Where glibc 2.x on x86_64 keeps `tid` in `struct pthread`; tried first.
const GLIBC_TID_OFFSET: u64 = 0x2d0;
/// How far into `struct pthread` the `tid` field is looked for.
const PTHREAD_SCAN: u64 = 0x1000;

/// Maps a process's threads to their thread states.
#[derive(Debug, Default)]
pub struct ThreadMapper {
    /// Offset of `tid` in `struct pthread` (up to 3.10), once found.
    pthread_tid: Option<u64>,
}

impl ThreadMapper {
    /// Every thread of the process: (host thread id, its thread state, or
    /// 0 for a thread the interpreter does not know).
    pub fn map<M: Memory>(
        &mut self,
        pid: u32,
        target: &Target<M>,
    ) -> Result<Vec<(u32, u64)>, ReadError> {
        self.map_tasks(&Tasks::read(pid), target)
    }

    /// [`Self::map`] over threads already listed.
    pub fn map_tasks<M: Memory>(
        &mut self,
        tasks: &Tasks,
        target: &Target<M>,
    ) -> Result<Vec<(u32, u64)>, ReadError> {
        // Ids as the process sees them: the interpreter recorded those.
        let tids: BTreeSet<u32> = tasks.ns_tids().collect();
        let pid = tasks.ns_pid;
        let o = &target.info.offsets;
        let mut states: Vec<(u64, u64)> = Vec::new(); // (tstate, id word)
        for interp in target.interpreters()? {
            for tstate in target.thread_states(interp)? {
                let id = match o.tstate_native_thread_id {
                    Some(off) => u64::from(target.mem.read_u32(tstate.wrapping_add(off))?),
                    None => target
                        .mem
                        .read_u64(tstate.wrapping_add(o.tstate_thread_id))?,
                };
                states.push((tstate, id));
            }
        }
        let mut by_tid: BTreeMap<u32, u64> = tids.iter().map(|&t| (t, 0)).collect();
        let by_host = |by_tid: BTreeMap<u32, u64>| {
            let mut out: Vec<(u32, u64)> = by_tid
                .into_iter()
                .filter_map(|(ns, tstate)| Some((tasks.host_of(ns)?, tstate)))
                .collect();
            out.sort_unstable();
            out
        };
        if o.tstate_native_thread_id.is_some() {
            for (tstate, id) in states {
                if let Some(slot) = by_tid.get_mut(&(id as u32)) {
                    *slot = tstate;
                }
            }
        } else {
            let pthreads: Vec<u64> = states.iter().map(|&(_, p)| p).collect();
            if self.pthread_tid.is_none() {
                self.pthread_tid = find_tid_offset(&target.mem, pid, &pthreads, &tids);
            }
            if let Some(off) = self.pthread_tid {
                for (tstate, pthread) in states {
                    if pthread == 0 {
                        continue;
                    }
                    if let Ok(tid) = target.mem.read_u32(pthread.wrapping_add(off))
                        && let Some(slot) = by_tid.get_mut(&tid)
                    {
                        *slot = tstate;
                    }
                }
            }
        }
        Ok(by_host(by_tid))
    }

    /// Whether threads could be told apart (false when the `struct pthread`
    /// layout was not recognised: only up to 3.10).
    pub fn knows_threads<M: Memory>(&self, target: &Target<M>) -> bool {
        target.info.offsets.tstate_native_thread_id.is_some() || self.pthread_tid.is_some()
    }
}

/// The offset of `tid` in `struct pthread`: where the oldest thread's
/// structure (the main thread's) holds the PID and every other structure
/// holds a thread id of the process.
fn find_tid_offset(
    mem: &impl Memory,
    pid: u32,
    pthreads: &[u64],
    tids: &BTreeSet<u32>,
) -> Option<u64> {
    let main = *pthreads.first()?;
    let fits = |off: u64| {
        mem.read_u32(main.wrapping_add(off)).ok() == Some(pid)
            && pthreads[1..].iter().all(|&p| {
                p == 0
                    || mem
                        .read_u32(p.wrapping_add(off))
                        .is_ok_and(|t| tids.contains(&t) && t != pid)
            })
    };
    std::iter::once(GLIBC_TID_OFFSET)
        .chain((0..PTHREAD_SCAN).step_by(4))
        .find(|&off| fits(off))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::memory::MemoryError;

    /// Memory holding u32 values at given addresses.
    struct Words(BTreeMap<u64, u32>);

    impl Memory for Words {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            for (i, b) in buf.iter_mut().enumerate() {
                let a = addr + i as u64;
                let word = self.0.get(&(a & !3)).copied().unwrap_or(0);
                *b = word.to_le_bytes()[(a & 3) as usize];
            }
            Ok(())
        }
    }

    #[test]
    fn tid_offset_is_where_the_main_thread_holds_the_pid() {
        let mem = Words(BTreeMap::from([
            (0x1000 + 0x2d0, 500),
            (0x9000 + 0x2d0, 501),
            (0x9000 + 0x10, 500), // a stray PID in another thread's struct
        ]));
        let tids = BTreeSet::from([500, 501]);
        assert_eq!(
            find_tid_offset(&mem, 500, &[0x1000, 0x9000], &tids),
            Some(0x2d0)
        );
        // Another layout is found by scanning.
        let mem = Words(BTreeMap::from([
            (0x1000 + 0x2e0, 500),
            (0x9000 + 0x2e0, 501),
        ]));
        assert_eq!(
            find_tid_offset(&mem, 500, &[0x1000, 0x9000], &tids),
            Some(0x2e0)
        );
        // No structure holds the PID: unknown.
        assert_eq!(find_tid_offset(&mem, 77, &[0x1000], &tids), None);
    }
}
