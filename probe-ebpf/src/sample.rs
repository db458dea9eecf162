//! CPU sampling: on each tick of the CPU clock, walk the interrupted Python
//! thread's frame chain and send its frames to userspace.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::bpf_ringbuf_output,
    },
    macros::{map, perf_event},
    maps::{HashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::PerfEventContext,
};
use pyprobe_common::{
    MAX_PROCESSES, calls,
    process::PyProcess,
    sample::{
        self, FRAME_LEN, FRAMES_PER_RUN, HEADER_LEN, MAX_FRAMES, MAX_RUNS, Sample, ThreadState,
    },
    stats,
};

use crate::{
    WINDOWS, count_error, py_process,
    thread::{current_frame, holds_gil},
};

/// The processes the sampler walks (their facts are in `PY_PROCESS`),
/// written by userspace.
#[map(name = "SAMPLE_PROCESSES")]
static SAMPLE_PROCESSES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PROCESSES, 0);

/// The facts of `tgid` when the sampler walks it.
#[inline(always)]
fn sampled(tgid: u32) -> Option<&'static PyProcess> {
    // SAFETY: only looked up.
    unsafe { SAMPLE_PROCESSES.get(&tgid) }?;
    py_process(tgid)
}

/// Whether userspace asked to hear of `tgid`'s children as they fork
/// ([`sample::FOLLOW_CHILDREN`]).
#[inline(always)]
pub fn follows_children(tgid: u32) -> bool {
    // SAFETY: only looked up.
    unsafe { SAMPLE_PROCESSES.get(&tgid) }.is_some_and(|&v| v & sample::FOLLOW_CHILDREN != 0)
}

/// Kernel thread id -> thread state, written by userspace from each
/// process's thread list.
#[map(name = "SAMPLE_THREADS")]
static SAMPLE_THREADS: HashMap<u32, ThreadState> = HashMap::with_max_entries(65536, 0);

/// Samples to userspace. Userspace drains it on a timer, so samples are
/// sent without waking it; it sizes the buffer for its rate and CPUs at
/// load time.
#[map(name = "SAMPLES")]
static SAMPLES: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// The sample being built on this CPU (too big for the stack).
#[map(name = "SAMPLE_SCRATCH")]
static SAMPLE_SCRATCH: PerCpuArray<Sample> = PerCpuArray::with_max_entries(1, 0);

/// `sample_walk` at index 0, for walks longer than one run.
#[map(name = "SAMPLE_PROGS")]
static SAMPLE_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `BPF_RB_NO_WAKEUP`: userspace polls on a timer.
const RB_NO_WAKEUP: u64 = 1;

/// Entry: the CPU clock ticked while some task ran on this CPU.
#[perf_event]
pub fn sample_cpu(ctx: PerfEventContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    if tid == 0 {
        return 0; // the idle task
    }
    // SAFETY: values are only read while this program runs; userspace
    // replaces whole entries.
    let Some(thread) = (unsafe { SAMPLE_THREADS.get(&tid) }) else {
        // SAFETY: as above.
        if unsafe { SAMPLE_PROCESSES.get(&tgid) }.is_some() {
            count_error(stats::SAMPLE_UNKNOWN_THREAD);
        }
        return 0;
    };
    if thread.tgid != tgid {
        return 0; // a reused thread id, not mapped yet
    }
    if thread.tstate == 0 {
        count_error(stats::SAMPLE_NOT_PYTHON);
        return 0;
    }
    let Some(config) = sampled(tgid) else {
        return 0;
    };
    let Some(sample) = SAMPLE_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let Some(frame) = current_frame(thread.tstate, &config.thread) else {
        count_error(stats::SAMPLE_UNREADABLE);
        return 0;
    };
    if frame == 0 {
        count_error(stats::SAMPLE_NO_FRAME);
        return 0;
    }
    // SAFETY: the per-CPU scratch value is ours for this run.
    let header = unsafe { &mut (*sample).header };
    header.tgid = tgid;
    header.tid = tid;
    header.flags = if holds_gil(thread.tstate, &config.thread) {
        sample::HOLDS_GIL
    } else {
        0
    };
    header.frames = 0;
    header.next = frame;
    header.runs = 0;
    // SAFETY: a helper without arguments.
    header.cpu = unsafe { bpf_get_smp_processor_id() };
    header.code_epoch = config.code_epoch;
    // SAFETY: a helper without arguments.
    header.time_ns = unsafe { bpf_ktime_get_ns() };
    walk(&ctx, sample, config);
    0
}

/// Continuation of a walk too long for one run (reached by tail call).
#[perf_event]
pub fn sample_walk(ctx: PerfEventContext) -> u32 {
    let Some(sample) = SAMPLE_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch value is ours for this run.
    let tgid = unsafe { (*sample).header.tgid };
    let Some(config) = sampled(tgid) else {
        return 0;
    };
    walk(&ctx, sample, config);
    0
}

/// Walks up to [`FRAMES_PER_RUN`] frames from `header.next`, then either
/// tail-calls `sample_walk` to go on or sends the sample.
#[inline(always)]
fn walk(ctx: &PerfEventContext, sample: *mut Sample, process: &PyProcess) {
    let config = &process.frame;
    // SAFETY: the per-CPU scratch value is ours for this run.
    let s = unsafe { &mut *sample };
    let mut next = s.header.next;
    let mut n = s.header.frames;
    // Loop-invariant, and the loop body has no branch that rejoins with
    // different values (the verifier would follow each combination):
    // the window length is clamped once, and whether a frame counts is
    // computed without a branch.
    let len = if config.window_len > calls::WINDOW {
        calls::WINDOW
    } else {
        config.window_len
    };
    let Some(buf) = WINDOWS.get_ptr_mut(0) else {
        return;
    };
    for _ in 0..FRAMES_PER_RUN {
        if next == 0 {
            break;
        }
        if n as usize >= MAX_FRAMES {
            s.header.flags |= sample::TRUNCATED;
            next = 0;
            break;
        }
        // SAFETY: the per-CPU scratch value is ours for this run;
        // bpf_probe_read_user fails cleanly on bad addresses.
        let ret = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                buf.cast(),
                len as u32,
                next.wrapping_add(config.window) as *const core::ffi::c_void,
            )
        };
        if ret < 0 {
            s.header.flags |= sample::TORN;
            next = 0;
            break;
        }
        // SAFETY: filled above.
        let w = unsafe { &*buf };
        let word = w.u32_at(config.owner_at & !3);
        let owner = ((word >> ((config.owner_at & 3) * 8)) & 0xff) as u64;
        // 1 when owner < owner_min: a Python frame (owner_min is 256 when
        // frames have no owner).
        let python = owner.wrapping_sub(config.owner_min) >> 63;
        let at = config.instruction_at;
        let slot = &mut s.frames[(n as usize) & (MAX_FRAMES - 1)];
        slot.code = w.u64_at(config.code_at) & config.code_mask;
        slot.instruction = (w.u32_at(at) as u64) | ((w.u32_at(at + 4) as u64) << 32);
        n += python as u32;
        next = w.u64_at(config.previous_at);
    }
    s.header.frames = n;
    s.header.next = next;
    if next != 0 {
        if s.header.runs < MAX_RUNS {
            s.header.runs += 1;
            // SAFETY: on success control never comes back; on failure we
            // fall through and send what we have.
            unsafe { SAMPLE_PROGS.tail_call(ctx, 0) };
        }
        s.header.flags |= sample::TRUNCATED;
    }
    send(s);
}

/// Sends the header and the recorded frames.
#[inline(always)]
fn send(s: &Sample) {
    let frames = (s.header.frames as usize).min(MAX_FRAMES);
    let len = HEADER_LEN + frames * FRAME_LEN;
    let len = if len > core::mem::size_of::<Sample>() {
        core::mem::size_of::<Sample>()
    } else {
        len
    };
    // SAFETY: `s` is a valid per-CPU buffer of at least `len` bytes.
    let ret = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(SAMPLES).cast_mut().cast(),
            (s as *const Sample).cast_mut().cast(),
            len as u64,
            RB_NO_WAKEUP,
        )
    };
    if ret < 0 {
        count_error(stats::SAMPLE_LOST);
    }
}

/// Forgets `tgid` (it exec'd or exited); whether it was configured.
#[inline(always)]
pub fn forget(tgid: u32) -> bool {
    SAMPLE_PROCESSES.remove(&tgid).is_ok()
}
