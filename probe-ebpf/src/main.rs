//! pyprobe's kernel side.
//!
//! Programs here are attached by the userspace daemon (`userspace/src/bpf.rs`).
//! They must never harm the target: they only read, their loops are bounded,
//! and anything they cannot do is counted in `STATS` rather than dropped
//! silently.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_pid_tgid,
    macros::{map, uprobe},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::ProbeContext,
};
use pyprobe_common::{MAX_PROCESSES, stats};

/// Entries into `_PyEval_EvalFrameDefault`, per process (tgid), per CPU.
#[map(name = "EVAL_ENTRIES")]
static EVAL_ENTRIES: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(MAX_PROCESSES, 0);

/// Error counters, see `pyprobe_common::stats`.
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// Adds one to a per-CPU counter. A plain add is enough: the value belongs to
/// this CPU, and the kernel never runs a second tracing program on a CPU while
/// one is still running there (it counts such a run as a recursion miss, which
/// userspace reads from the program's fdinfo and reports).
#[inline(always)]
fn bump(ptr: *mut u64) {
    // SAFETY: `ptr` comes from a successful lookup in a per-CPU map, is 8-byte
    // aligned and stays valid for the whole program run.
    unsafe { *ptr += 1 };
}

#[inline(always)]
fn count_error(index: u32) {
    if let Some(ptr) = STATS.get_ptr_mut(index) {
        bump(ptr);
    }
}

/// Uprobe on `_PyEval_EvalFrameDefault`: counts one entry for the current
/// process. On CPython 3.8-3.10 every Python frame (and generator resumption)
/// enters here; from 3.11 only frames started from C do.
#[uprobe]
pub fn eval_entry(_ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // Two tries: if another CPU (or a task that preempted us) inserts the key
    // between our lookup and insert, the insert fails with EEXIST and the
    // second lookup finds it.
    for _ in 0..2 {
        if let Some(ptr) = EVAL_ENTRIES.get_ptr_mut(&tgid) {
            bump(ptr);
            return 0;
        }
        if EVAL_ENTRIES.insert(&tgid, &1, BPF_NOEXIST as u64).is_ok() {
            return 0;
        }
    }
    count_error(stats::EVAL_MAP_FULL);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Required by the kernel to use GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
