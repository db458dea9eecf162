//! pyprobe's kernel side.
//!
//! Programs here are attached by the userspace daemon (`userspace/src/bpf.rs`).
//! They must never harm the target: they only read, their loops are bounded,
//! and anything they cannot do is counted in `STATS` rather than dropped
//! silently.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod logpoint;
mod sample;
mod thread;

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user, generated,
    },
    macros::{map, raw_tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext},
};
use pyprobe_common::{
    MAX_PROCESSES,
    calls::{
        self, BuiltinKey, CacheSlot, CallCounts, CodeKey, Histogram, ProcessConfig, Running,
        RunningKey, SkipSet, Template,
    },
    process::{self, BuiltinEvent, CodeEvent, ProcessEvent, PyProcess},
    stats,
};

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

/// What every program knows of each Python process some job watches (see
/// [`PyProcess`]): written by userspace when a job sets a process up, by
/// `call_start` from a template, by `process_fork` from a parent with log
/// points; removed when the process execs or exits, or by userspace when
/// no job's part names it any more.
#[map(name = "PY_PROCESS")]
static PY_PROCESS: HashMap<u32, PyProcess> = HashMap::with_max_entries(MAX_PROCESSES, 0);

/// The facts of process `tgid`, if a job watches it.
#[inline(always)]
pub(crate) fn py_process(tgid: u32) -> Option<&'static PyProcess> {
    // SAFETY: values are only read while a program runs; userspace writes
    // whole entries, the kernel only bumps `code_epoch`.
    unsafe { PY_PROCESS.get(&tgid) }
}

/// Makes `tgid`'s facts a copy of `from` (a template's or a parent's)
/// unless it has some, with its thread addresses moved by `bias` and a
/// fresh code epoch ([`calls::KERNEL_EPOCH`] and the clock): whether it
/// has facts now.
#[inline(always)]
pub(crate) fn copy_py_process(tgid: u32, from: &PyProcess, bias: u64) -> bool {
    // Inserted as is and then patched in place: no room to build one on
    // the BPF stack. Nothing of the process reads it before this
    // returns (a new process's first call, a child not yet run).
    if PY_PROCESS.insert(&tgid, from, BPF_NOEXIST as u64).is_ok()
        && let Some(p) = PY_PROCESS.get_ptr_mut(&tgid)
    {
        // SAFETY: the entry just inserted, not yet seen by userspace.
        unsafe {
            (*p).thread = (*p).thread.moved(bias);
            (*p).code_epoch = calls::KERNEL_EPOCH | now_ns();
        }
    }
    py_process(tgid).is_some()
}

/// The call counter's part of each process it counts, written by
/// userspace or made from a template by `call_start`.
#[map(name = "CALL_CONFIG")]
static CALL_CONFIG: HashMap<u32, ProcessConfig> = HashMap::with_max_entries(MAX_PROCESSES, 0);

/// Per-interpreter-file configurations, written by userspace, indexed by
/// the template part of a probe's cookie ([`calls::cookie`]): a process of
/// that file met for the first time is configured from it in the kernel,
/// from its first call, with no wait for userspace.
#[map(name = "CALL_TEMPLATES")]
static CALL_TEMPLATES: HashMap<u32, Template> = HashMap::with_max_entries(calls::MAX_TEMPLATES, 0);

/// Processes configured, exec'd and exited, as they happen (see
/// [`process`]).
#[map(name = "PROCESS_EVENTS")]
static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Tells userspace about `tgid`; a full ring is counted.
#[inline(always)]
fn process_event(kind: u32, tgid: u32, template: u32) {
    let event = ProcessEvent {
        kind,
        tgid,
        template,
        _pad: 0,
    };
    if PROCESS_EVENTS.output::<ProcessEvent>(&event, 0).is_err() {
        count_error(stats::PROCESS_EVENTS_LOST);
    }
}

/// Bytes of a `str` object's header in every supported version: where a
/// compact ASCII string's characters start (40 from 3.12, 48 before), or
/// past that.
const STR_HEADER: u32 = 48;

/// Copies [`process::STR_CAPTURE`] bytes of the `str` object at `addr` to
/// `dst`; when they cannot all be read (a new object near the end of its
/// heap), [`STR_HEADER`] bytes and then the bytes after them up to a NUL:
/// all of a compact ASCII string's characters, and little past them. A
/// failed read leaves zeros.
///
/// # Safety
///
/// `dst` must point at [`process::STR_CAPTURE`] writable bytes.
#[inline(always)]
unsafe fn capture_str(dst: *mut u8, addr: u64) {
    const SIZE: u32 = process::STR_CAPTURE as u32;
    // SAFETY: `dst` holds `SIZE` bytes (the caller's promise); the helpers
    // fail cleanly on bad user addresses, zero-filling what they did not
    // copy.
    unsafe {
        if generated::bpf_probe_read_user(dst.cast(), SIZE, addr as *const core::ffi::c_void) == 0 {
            return;
        }
        if generated::bpf_probe_read_user(dst.cast(), STR_HEADER, addr as *const core::ffi::c_void)
            == 0
        {
            generated::bpf_probe_read_user_str(
                dst.add(STR_HEADER as usize).cast(),
                SIZE - STR_HEADER,
                addr.wrapping_add(STR_HEADER as u64) as *const core::ffi::c_void,
            );
        }
    }
}

/// Tells userspace of a code object counted for the first time, with the
/// bytes of its qualified name and file name as they are now: the process
/// may be gone before userspace could read them (a full ring is counted;
/// userspace then reads the names itself while it can).
#[inline(always)]
fn code_event(config: &ProcessConfig, key: &CodeKey) {
    let Some(mut entry) = PROCESS_EVENTS.reserve::<CodeEvent>(0) else {
        count_error(stats::PROCESS_EVENTS_LOST);
        return;
    };
    let base = key.code.wrapping_add(config.code_window);
    let qualname = read::<u64>(base.wrapping_add(config.code_qualname_at as u64)).unwrap_or(0);
    let filename = read::<u64>(base.wrapping_add(config.code_filename_at as u64)).unwrap_or(0);
    let event = entry.as_mut_ptr();
    // SAFETY: `event` is the reserved record, ours until submitted; every
    // field is written before the submit (a failed read zero-fills its
    // buffer).
    unsafe {
        (*event).kind = process::CODE;
        (*event).template = config.template;
        (*event).key = *key;
        (*event).qualname = qualname;
        (*event).filename = filename;
        capture_str(
            core::ptr::addr_of_mut!((*event).qualname_bytes).cast(),
            qualname,
        );
        capture_str(
            core::ptr::addr_of_mut!((*event).filename_bytes).cast(),
            filename,
        );
    }
    entry.submit(0);
}

/// The facts and the counter's part of the process running the probe
/// `ctx`: those userspace wrote, or else ones made now from the template
/// of the probed file, its thread-state slot moved by the file's load bias
/// in this process (the instruction pointer minus the probed
/// instruction's link-time address, both known here) and its code epoch
/// fresh ([`calls::KERNEL_EPOCH`]). Userspace hears of it by a
/// [`process::NEW`] event, to name its code objects.
#[inline(always)]
fn call_config(
    ctx: &ProbeContext,
    tgid: u32,
) -> Result<(&'static PyProcess, &'static ProcessConfig), u32> {
    // SAFETY: the value is only read while this program runs; userspace
    // replaces whole entries, never part of one.
    if let Some(config) = unsafe { CALL_CONFIG.get(&tgid) } {
        return Ok((py_process(tgid).ok_or(stats::CALLS_NO_CONFIG)?, config));
    }
    // SAFETY: a helper reading the probe's own cookie (0 when none).
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let index = (cookie >> calls::COOKIE_VADDR_BITS) as u32;
    let vaddr = cookie & ((1 << calls::COOKIE_VADDR_BITS) - 1);
    // SAFETY: as above.
    let template = unsafe { CALL_TEMPLATES.get(&index) }.ok_or(stats::CALLS_NO_CONFIG)?;
    // SAFETY: `regs` is the probe's pt_regs; at a uprobe, `rip` is the
    // probed instruction's address.
    let ip = unsafe { core::ptr::read_volatile(&(*ctx.regs).rip) };
    let bias = ip.wrapping_sub(vaddr);
    // No other thread of a process can run Python before its first call
    // has: nothing races these inserts.
    if !copy_py_process(tgid, &template.process, bias) {
        return Err(stats::CALLS_NO_CONFIG);
    }
    CALL_CONFIG
        .insert(&tgid, &template.calls, BPF_NOEXIST as u64)
        .map_err(|_| stats::CALLS_NO_CONFIG)?;
    process_event(process::NEW, tgid, index);
    // SAFETY: as above.
    let config = unsafe { CALL_CONFIG.get(&tgid) }.ok_or(stats::CALLS_NO_CONFIG)?;
    Ok((py_process(tgid).ok_or(stats::CALLS_NO_CONFIG)?, config))
}

/// Forgets `tgid` everywhere it may be configured; whether it was.
#[inline(always)]
fn forget_process(tgid: u32) -> bool {
    let known = PY_PROCESS.remove(&tgid).is_ok();
    let calls = CALL_CONFIG.remove(&tgid).is_ok();
    let sampled = sample::forget(tgid);
    let logged = logpoint::forget(tgid);
    known | calls | sampled | logged
}

/// Raw tracepoint `sched_process_exec`: the calling process now runs a new
/// image, so nothing configured for the old one may be applied to it.
/// Forgets it and tells userspace, which sets the new image up if it is a
/// Python interpreter and reports it dropped if not.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(_ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if forget_process(tgid) {
        process_event(process::EXEC, tgid, 0);
    }
    0
}

/// Byte offsets of `pid` and `tgid` in `struct task_struct`, written by
/// userspace from the kernel's BTF (0: unknown).
#[map(name = "TASK_OFFSETS")]
static TASK_OFFSETS: Array<u32> = Array::with_max_entries(2, 0);

/// The process id of task `child`, just created by process `parent`, when
/// it is a new process (not a thread) and the task offsets are known.
#[inline(always)]
fn new_process(parent: u32, child: u64) -> Option<u32> {
    let (Some(&pid_at), Some(&tgid_at)) = (TASK_OFFSETS.get(0), TASK_OFFSETS.get(1)) else {
        return None;
    };
    if pid_at == 0 || tgid_at == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copies from kernel memory and fails
    // cleanly; `child` is the tracepoint's new task.
    let read_id = |at: u32| unsafe {
        bpf_probe_read_kernel(child.wrapping_add(u64::from(at)) as *const u32).unwrap_or(0)
    };
    let (pid, tgid) = (read_id(pid_at), read_id(tgid_at));
    // A new thread of a process is that process.
    (tgid != 0 && pid == tgid && tgid != parent).then_some(tgid)
}

/// Raw tracepoint `sched_process_fork` (`(parent, child)` tasks), run in
/// the parent for every new process and thread: a child of a process with
/// log points armed is set up before it runs (see [`logpoint::forked`]);
/// userspace hears at once of a child of a process whose calls it counts
/// with probes of its own, or that it samples under a selection
/// ([`process::CHILD`]).
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn process_fork(ctx: RawTracePointContext) -> i32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: only looked up.
    let counted = unsafe { CALL_CONFIG.get(&parent) }.is_some_and(|c| c.follow_children != 0);
    let sampled = sample::follows_children(parent);
    if !counted && !sampled && !logpoint::armed(parent) {
        return 0;
    }
    let Some(tgid) = new_process(parent, ctx.arg(1)) else {
        return 0;
    };
    if let Some(origin) = logpoint::forked(parent, tgid) {
        process_event(process::FORKED, tgid, origin);
    }
    if counted || sampled {
        process_event(process::CHILD, tgid, parent);
    }
    0
}

/// Raw tracepoint `sched_process_exit`, run by every exiting thread: when
/// the thread group's leader exits, forgets the process (keeping the maps
/// to live processes) and tells userspace.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn process_exit(_ctx: RawTracePointContext) -> i32 {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if tgid == id as u32 && forget_process(tgid) {
        process_event(process::EXIT, tgid, 0);
    }
    0
}

/// Function starts and resumptions per code object, per CPU.
#[map(name = "CALL_COUNTS")]
static CALL_COUNTS: PerCpuHashMap<CodeKey, CallCounts> =
    PerCpuHashMap::with_max_entries(calls::MAX_CODES, 0);

/// Per-CPU count cache, see [`calls::CacheSlot`].
#[map(name = "CALL_CACHE")]
static CALL_CACHE: PerCpuArray<CacheSlot> = PerCpuArray::with_max_entries(calls::CACHE_SLOTS, 0);

/// Code objects that `--filter` excludes, written by userspace once it has
/// named them (see [`calls::SkipSet`]).
#[map(name = "CALL_SKIP")]
static CALL_SKIP: Array<SkipSet> = Array::with_max_entries(calls::SKIP_SETS, 0);

/// Reads a `T` from the traced process. `None` if the address is not
/// mapped (the kernel never faults on our behalf).
#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user copies from user memory and fails cleanly
    // on bad addresses; the pointer is never dereferenced directly.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// The first three integer arguments (rdi, rsi, rdx) at a function entry.
/// Read with constant offsets, each volatile: the verifier rejects a context
/// access whose offset is computed, which is what the compiler makes of
/// `ctx.arg(n)` with `n` chosen at run time.
#[inline(always)]
fn args(ctx: &ProbeContext) -> (u64, u64, u64) {
    let regs = ctx.regs;
    // SAFETY: `regs` is the probe's pt_regs, valid for the whole run.
    unsafe {
        (
            core::ptr::read_volatile(&(*regs).rdi),
            core::ptr::read_volatile(&(*regs).rsi),
            core::ptr::read_volatile(&(*regs).rdx),
        )
    }
}

/// The frame whose function is starting, found as the process config says.
#[inline(always)]
fn starting_frame(ctx: &ProbeContext, py: &PyProcess, config: &ProcessConfig) -> Option<u64> {
    match config.frame_mode {
        calls::FRAME_ARG0 => Some(args(ctx).0),
        calls::FRAME_ARG1 => Some(args(ctx).1),
        calls::FRAME_REGISTER => Some(frame_register(ctx, config.frame_register)),
        _ => thread::running_frame(&py.thread),
    }
}

/// The callee-saved register `reg` (`calls::REG_*`). All six are read,
/// each with a constant offset, and then one is picked: a read through an
/// offset chosen at run time is what the verifier rejects (see `args`),
/// and volatile reads keep the compiler from merging them into one.
#[inline(always)]
fn frame_register(ctx: &ProbeContext, reg: u8) -> u64 {
    let regs = ctx.regs;
    // SAFETY: `regs` is the probe's pt_regs, valid for the whole run.
    let values = unsafe {
        [
            core::ptr::read_volatile(&(*regs).rbx),
            core::ptr::read_volatile(&(*regs).rbp),
            core::ptr::read_volatile(&(*regs).r12),
            core::ptr::read_volatile(&(*regs).r13),
            core::ptr::read_volatile(&(*regs).r14),
            core::ptr::read_volatile(&(*regs).r15),
        ]
    };
    match reg {
        calls::REG_RBX => values[0],
        calls::REG_RBP => values[1],
        calls::REG_R12 => values[2],
        calls::REG_R13 => values[3],
        calls::REG_R14 => values[4],
        _ => values[5],
    }
}

/// [`calls::WINDOW`] bytes of a frame or code object, read at once, with
/// accessors for the fields inside it.
#[repr(C)]
pub struct Window([u32; (calls::WINDOW / 4) as usize]);

/// Scratch space for the two windows (frame, code): too big for the BPF
/// stack together.
#[map(name = "WINDOWS")]
static WINDOWS: PerCpuArray<Window> = PerCpuArray::with_max_entries(2, 0);

impl Window {
    /// Reads `len` bytes (at most [`calls::WINDOW`]) starting at `addr`
    /// into scratch slot `slot`.
    #[inline(always)]
    fn read(slot: u32, addr: u64, len: u64) -> Option<&'static Self> {
        let len = if len > calls::WINDOW {
            calls::WINDOW
        } else {
            len
        };
        let buf = WINDOWS.get_ptr_mut(slot)?;
        // SAFETY: the per-CPU scratch value is ours for this run (see
        // `bump`); bpf_probe_read_user fills it (zeroes it on failure).
        unsafe {
            let ret = aya_ebpf::helpers::generated::bpf_probe_read_user(
                buf.cast(),
                len as u32,
                addr as *const core::ffi::c_void,
            );
            if ret < 0 {
                return None;
            }
            Some(&*buf)
        }
    }

    /// The 4-byte-aligned int at `at` (bounded: the verifier sees the index
    /// masked into the array).
    #[inline(always)]
    fn u32_at(&self, at: u64) -> u32 {
        let i = ((at >> 2) as usize) & ((calls::WINDOW / 4) as usize - 1);
        self.0[i]
    }

    /// The 8-byte-aligned pointer at `at`.
    #[inline(always)]
    fn u64_at(&self, at: u64) -> u64 {
        let i = ((at >> 2) as usize) & ((calls::WINDOW / 4) as usize - 2);
        (self.0[i] as u64) | ((self.0[i + 1] as u64) << 32)
    }
}

/// Reads the starting frame's code object and whether this is a start (as
/// opposed to a resumption), then counts it.
#[inline(always)]
fn count_call(ctx: &ProbeContext) -> Result<(), u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let (py, config) = call_config(ctx, tgid)?;
    let frame = starting_frame(ctx, py, config).ok_or(stats::CALLS_UNREADABLE)?;
    let at = if config.latency == calls::LATENCY_BY_STACK {
        stack_pointer(ctx.regs)
    } else {
        frame
    };
    count_frame(tgid, py, config, frame, None, at)
}

/// The monotonic clock, ns.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// The stack pointer in `regs`.
#[inline(always)]
fn stack_pointer(regs: *mut aya_ebpf::bindings::pt_regs) -> u64 {
    // SAFETY: `regs` is the probe's pt_regs, valid for the whole run.
    unsafe { core::ptr::read_volatile(&(*regs).rsp) }
}

/// Counts one start or resumption of `frame`'s code object; `resume` forces
/// the kind, else the frame's instruction position decides. One read of the
/// target when the code object owns its cache slot and none was freed since
/// the slot was filled (see [`PyProcess::code_epoch`]): the frame's
/// window; else two, the code object's window too. With `--latency`, also
/// notes the time under `at` (see [`RunningKey`]).
#[inline(always)]
fn count_frame(
    tgid: u32,
    py: &PyProcess,
    config: &ProcessConfig,
    frame: u64,
    resume: Option<bool>,
    at: u64,
) -> Result<(), u32> {
    let layout = &py.frame;
    let f = Window::read(0, frame.wrapping_add(layout.window), layout.window_len)
        .ok_or(stats::CALLS_UNREADABLE)?;
    let code = f.u64_at(layout.code_at) & layout.code_mask;
    let index = calls::cache_slot(tgid, code);
    // SAFETY: a per-CPU value of a successful lookup, valid and exclusively
    // ours for this run (see `bump`).
    let slot = CALL_CACHE.get_ptr_mut(index).map(|s| unsafe { &mut *s });
    let epoch = py.code_epoch;
    let (key, first_traceable, in_slot) = match slot {
        Some(slot)
            if config.epoch_watched != 0
                && slot.epoch == epoch
                && slot.key.code == code
                && slot.key.tgid == tgid =>
        {
            (slot.key, slot.first_traceable, Some(slot))
        }
        slot => {
            let c = Window::read(
                1,
                code.wrapping_add(config.code_window),
                config.code_window_len,
            )
            .ok_or(stats::CALLS_UNREADABLE)?;
            let key = CodeKey {
                tgid,
                firstlineno: c.u32_at(config.code_firstlineno_at),
                code,
                name: c.u64_at(config.code_name_at),
            };
            let first_traceable = c.u32_at(config.code_firsttraceable_at) as i32;
            let in_slot = slot.and_then(|slot| {
                if slot.key.code == 0 {
                    *slot = CacheSlot {
                        key,
                        ..CacheSlot::default()
                    };
                    check_frame_register(py, config, frame, resume);
                    code_event(config, &key);
                }
                (slot.key == key).then(|| {
                    slot.epoch = epoch;
                    slot.first_traceable = first_traceable;
                    slot
                })
            });
            (key, first_traceable, in_slot)
        }
    };
    let start = if let Some(resume) = resume {
        !resume
    } else if config.start_mode == calls::START_LASTI_NEGATIVE {
        (f.u32_at(layout.instruction_at) as i32) < 0
    } else {
        let ptr = f.u64_at(layout.instruction_at);
        let units = (ptr
            .wrapping_add(layout.instruction_bias)
            .wrapping_sub(code.wrapping_add(config.code_adaptive)) as i64)
            / 2;
        // 3.15's generator expressions run a RESUME before their start
        // (`RESUME_AT_GEN_EXPR_START`, in the call that makes the generator
        // and takes the iterator); the generator starts at the RESUME at
        // `_co_firsttraceable`, later. That early one is no call.
        if units < first_traceable as i64 - 1 {
            return Ok(());
        }
        // A start runs RESUME at `_co_firsttraceable`; depending on where in
        // the handler the probe sits, the frame's pointer may already have
        // been advanced to the RESUME itself (one unit further). A resumption
        // runs a RESUME after a yield, at least three units further.
        units <= first_traceable as i64 + 1
    };
    let skipped = config.filtering != 0
        && CALL_SKIP
            .get(index & (calls::SKIP_SETS - 1))
            .is_some_and(|set| set.keys.contains(&key));
    if config.latency != calls::LATENCY_OFF {
        let running = RunningKey { tgid, _pad: 0, at };
        if skipped {
            // A frame or stack slot used earlier by a timed call must not
            // be matched with this one's exit.
            let _ = CALL_RUNNING.remove(&running);
        } else {
            let value = Running {
                started_ns: now_ns(),
                key,
            };
            let _ = CALL_RUNNING.insert(&running, &value, 0);
        }
    }
    if skipped {
        return Ok(());
    }
    if let Some(slot) = in_slot {
        if start {
            slot.counts.starts += 1;
        } else {
            slot.counts.resumes += 1;
        }
        return Ok(());
    }
    for _ in 0..2 {
        if let Some(counts) = CALL_COUNTS.get_ptr_mut(&key) {
            // SAFETY: as above.
            unsafe {
                if start {
                    (*counts).starts += 1;
                } else {
                    (*counts).resumes += 1;
                }
            }
            return Ok(());
        }
        let first = CallCounts {
            starts: start as u64,
            resumes: !start as u64,
        };
        if CALL_COUNTS.insert(&key, &first, BPF_NOEXIST as u64).is_ok() {
            code_event(config, &key);
            return Ok(());
        }
    }
    Err(stats::CALLS_MAP_FULL)
}

/// The sampled check of [`calls::FRAME_REGISTER`]: whether the thread
/// state agrees that `frame` (from the register) is the current frame.
/// Not for `call_throw` (`resume` forced), whose frame is an argument and
/// not yet current.
#[inline(always)]
fn check_frame_register(py: &PyProcess, config: &ProcessConfig, frame: u64, resume: Option<bool>) {
    if config.frame_mode == calls::FRAME_REGISTER
        && resume.is_none()
        && thread::running_frame(&py.thread) != Some(frame)
    {
        count_error(stats::FRAME_REGISTER_MISMATCH);
    }
}

/// Uprobe at a site where Python functions start: `_PyEval_EvalFrameDefault`
/// up to 3.10, the RESUME-family opcode handlers from 3.11. Counts one start
/// or resumption for the starting frame's code object.
#[uprobe]
pub fn call_start(ctx: ProbeContext) -> u32 {
    if let Err(index) = count_call(&ctx) {
        count_error(index);
    }
    0
}

/// Uprobe on the code object type's `tp_dealloc` (`code_dealloc`): a code
/// object of this process is being freed, and its address may soon hold
/// another, so cache slots filled before no longer vouch for their owner
/// ([`PyProcess::code_epoch`]), and a log point armed on it must come
/// off. Frees happen under the GIL, as do the calls counted, so the plain
/// increment is not raced by this process.
#[uprobe]
pub fn code_freed(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(code) = ctx.arg::<u64>(0) {
        logpoint::code_freed(tgid, code);
    }
    if let Some(p) = PY_PROCESS.get_ptr_mut(&tgid) {
        // SAFETY: a value of a successful lookup; userspace writes whole
        // entries only when it sets a process up, before probing it.
        unsafe { (*p).code_epoch = (*p).code_epoch.wrapping_add(1) };
    }
    0
}

/// Uprobe on the entry of `_PyEval_EvalFrameDefault`, 3.11+: a generator
/// or coroutine resumed by `throw()` or `close()` (throwflag set) continues
/// in its exception handling without running a RESUME instruction, so it is
/// counted here as a resumption. Other entries are left to `call_start`.
#[uprobe]
pub fn call_throw(ctx: ProbeContext) -> u32 {
    let (_, frame, throwflag) = args(&ctx);
    if throwflag as u32 == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let (py, config) = match call_config(&ctx, tgid) {
        Ok(found) => found,
        Err(index) => {
            count_error(index);
            return 0;
        }
    };
    if let Err(index) = count_frame(tgid, py, config, frame, Some(true), frame) {
        count_error(index);
    }
    0
}

/// Frames being timed (`--latency`): where each started and when.
#[map(name = "CALL_RUNNING")]
static CALL_RUNNING: LruHashMap<RunningKey, Running> =
    LruHashMap::with_max_entries(calls::MAX_RUNNING, 0);

/// Durations per code object, per CPU (`--latency`). Userspace shrinks the
/// map to one entry when calls are not timed.
#[map(name = "CALL_LATENCY")]
static CALL_LATENCY: PerCpuHashMap<CodeKey, Histogram> =
    PerCpuHashMap::with_max_entries(calls::MAX_LATENCY_CODES, 0);

/// An all-zero histogram to insert from (too big for the BPF stack).
#[map(name = "ZERO_HISTOGRAM")]
static ZERO_HISTOGRAM: PerCpuArray<Histogram> = PerCpuArray::with_max_entries(1, 0);

/// Ends the timing of the frame noted under `at`, if one was, adding its
/// duration to its code object's histogram.
#[inline(always)]
fn time_exit(tgid: u32, at: u64) -> Result<(), u32> {
    let now = now_ns();
    let running = RunningKey { tgid, _pad: 0, at };
    // SAFETY: the value is copied out at once; the entry is ours to remove.
    let Some(started) = (unsafe { CALL_RUNNING.get(&running) }).copied() else {
        return Ok(());
    };
    let _ = CALL_RUNNING.remove(&running);
    let ns = now.wrapping_sub(started.started_ns);
    let mut hist = CALL_LATENCY.get_ptr_mut(&started.key);
    if hist.is_none() {
        let zero = ZERO_HISTOGRAM.get(0).ok_or(stats::LATENCY_MAP_FULL)?;
        let _ = CALL_LATENCY.insert(&started.key, zero, BPF_NOEXIST as u64);
        hist = CALL_LATENCY.get_ptr_mut(&started.key);
    }
    let hist = hist.ok_or(stats::LATENCY_MAP_FULL)?;
    // SAFETY: a per-CPU value of a successful lookup (see `bump`).
    let hist = unsafe { &mut *hist };
    if let Some(bucket) = hist.buckets.get_mut(calls::latency_bucket(ns) as usize) {
        *bucket += 1;
    }
    hist.count += 1;
    hist.total_ns += ns;
    if ns > hist.max_ns {
        hist.max_ns = ns;
    }
    Ok(())
}

/// Uprobe at the handlers of the opcodes that leave a frame by returning
/// or yielding (3.11+, `--latency`): the frame leaving is still in the
/// frame register (no probe is moved past a write of it) or, without one,
/// still the thread's current frame. Frames left by an exception pass none
/// of them and are not timed.
#[uprobe]
pub fn call_exit(ctx: ProbeContext) -> u32 {
    let run = || -> Result<(), u32> {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let (py, config) = call_config(&ctx, tgid)?;
        let frame = starting_frame(&ctx, py, config).ok_or(stats::CALLS_UNREADABLE)?;
        time_exit(tgid, frame)
    };
    if let Err(index) = run() {
        count_error(index);
    }
    0
}

/// Uretprobe on `_PyEval_EvalFrameDefault` (3.8-3.10, `--latency`): every
/// frame, returned, yielded or unwound by an exception, ends here. The
/// return lands with the stack pointer 8 bytes above the entry's (the
/// return address is popped).
#[uretprobe]
pub fn call_exit_stack(ctx: RetProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Err(index) = time_exit(tgid, stack_pointer(ctx.regs).wrapping_sub(8)) {
        count_error(index);
    }
    0
}

/// Builtin calls per (process, `PyMethodDef`, owner), per CPU.
#[map(name = "BUILTIN_COUNTS")]
static BUILTIN_COUNTS: PerCpuHashMap<BuiltinKey, u64> =
    PerCpuHashMap::with_max_entries(calls::MAX_BUILTINS, 0);

/// Counts one call of the builtin `key`; the first one (on this CPU) is
/// also told to userspace with what names it.
#[inline(always)]
fn count_builtin(config: &ProcessConfig, key: &BuiltinKey) -> Result<(), u32> {
    for _ in 0..2 {
        if let Some(ptr) = BUILTIN_COUNTS.get_ptr_mut(key) {
            bump(ptr);
            return Ok(());
        }
        if BUILTIN_COUNTS.insert(key, &1, BPF_NOEXIST as u64).is_ok() {
            builtin_event(config, key);
            return Ok(());
        }
    }
    Err(stats::CALLS_MAP_FULL)
}

/// `ob_type` in every object.
const OB_TYPE: u64 = 8;
/// `tp_name` in `PyTypeObject`.
const TP_NAME: u64 = 24;
/// `tp_flags` in `PyTypeObject`.
const TP_FLAGS: u64 = 168;
/// `Py_TPFLAGS_UNICODE_SUBCLASS`: a module name owner.
const TPFLAGS_UNICODE_SUBCLASS: u64 = 1 << 28;
/// `Py_TPFLAGS_TYPE_SUBCLASS`: a type owner.
const TPFLAGS_TYPE_SUBCLASS: u64 = 1 << 31;

/// Tells userspace of a builtin counted for the first time, with the bytes
/// that name it (see [`process::BuiltinEvent`]).
#[inline(always)]
fn builtin_event(config: &ProcessConfig, key: &BuiltinKey) {
    let Some(mut entry) = PROCESS_EVENTS.reserve::<BuiltinEvent>(0) else {
        count_error(stats::PROCESS_EVENTS_LOST);
        return;
    };
    // `ml_name` is the first field of `PyMethodDef`.
    let name = read::<u64>(key.method_def).unwrap_or(0);
    let (owner_type, owner_flags) = if key.owner == 0 {
        (0, 0)
    } else {
        let ty = read::<u64>(key.owner.wrapping_add(OB_TYPE)).unwrap_or(0);
        (ty, read::<u64>(ty.wrapping_add(TP_FLAGS)).unwrap_or(0))
    };
    let owner_name = if owner_flags & TPFLAGS_TYPE_SUBCLASS != 0 {
        read::<u64>(key.owner.wrapping_add(TP_NAME)).unwrap_or(0)
    } else {
        0
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` is the reserved record, ours until submitted; every
    // field userspace reads is written before the submit.
    unsafe {
        (*event).kind = process::BUILTIN;
        (*event).template = config.template;
        (*event).key = *key;
        (*event).name = name;
        (*event).owner_type = owner_type;
        (*event).owner_flags = owner_flags;
        (*event).owner_name = owner_name;
        let copied = generated::bpf_probe_read_user_str(
            core::ptr::addr_of_mut!((*event).name_bytes).cast(),
            process::CSTR_CAPTURE as u32,
            name as *const core::ffi::c_void,
        );
        (*event).name_len = if copied > 0 { copied as u32 } else { 0 };
        (*event).owner_len = if owner_flags & TPFLAGS_UNICODE_SUBCLASS != 0 {
            let failed = generated::bpf_probe_read_user(
                core::ptr::addr_of_mut!((*event).owner_bytes).cast(),
                process::STR_CAPTURE as u32,
                key.owner as *const core::ffi::c_void,
            );
            if failed == 0 {
                process::STR_CAPTURE as u32
            } else {
                0
            }
        } else if owner_name != 0 {
            let copied = generated::bpf_probe_read_user_str(
                core::ptr::addr_of_mut!((*event).owner_bytes).cast(),
                process::STR_CAPTURE as u32,
                owner_name as *const core::ffi::c_void,
            );
            if copied > 0 { copied as u32 } else { 0 }
        } else {
            0
        };
    }
    entry.submit(0);
}

/// The callable (first argument) at a builtin call site, with the
/// process's config.
#[inline(always)]
fn builtin_site(ctx: &ProbeContext) -> Result<(u32, &'static ProcessConfig, u64), u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let (_, config) = call_config(ctx, tgid)?;
    Ok((tgid, config, args(ctx).0))
}

/// Uprobe at the entry points every call of a `builtin_function_or_method`
/// goes through unless the 3.11+ specializing interpreter calls its C
/// function directly (`cfunction_vectorcall_*`, `cfunction_call`): the
/// first argument is the function object.
#[uprobe]
pub fn builtin_function(ctx: ProbeContext) -> u32 {
    let run = || -> Result<(), u32> {
        let (tgid, config, func) = builtin_site(&ctx)?;
        let w = Window::read(
            0,
            func.wrapping_add(config.cfunction_window),
            config.cfunction_window_len,
        )
        .ok_or(stats::CALLS_UNREADABLE)?;
        let module = w.u64_at(config.cfunction_module_at);
        let owner = if module != 0 {
            module
        } else {
            let bound = w.u64_at(config.cfunction_self_at);
            if bound == 0 {
                0
            } else {
                // `ob_type` is at 8 in every object.
                read::<u64>(bound.wrapping_add(8)).ok_or(stats::CALLS_UNREADABLE)?
            }
        };
        count_builtin(
            config,
            &BuiltinKey {
                tgid,
                kind: calls::BUILTIN_FUNCTION,
                method_def: w.u64_at(config.cfunction_ml_at),
                owner,
            },
        )
    };
    if let Err(index) = run() {
        count_error(index);
    }
    0
}

/// Uprobe at the entry points of calls through a `method_descriptor`
/// (`method_vectorcall_*`): the first argument is the descriptor.
#[uprobe]
pub fn builtin_method(ctx: ProbeContext) -> u32 {
    let run = || -> Result<(), u32> {
        let (tgid, config, descr) = builtin_site(&ctx)?;
        let w = Window::read(
            0,
            descr.wrapping_add(config.descr_window),
            config.descr_window_len,
        )
        .ok_or(stats::CALLS_UNREADABLE)?;
        count_builtin(
            config,
            &BuiltinKey {
                tgid,
                kind: calls::BUILTIN_METHOD,
                method_def: w.u64_at(config.descr_method_at),
                owner: w.u64_at(config.descr_type_at),
            },
        )
    };
    if let Err(index) = run() {
        count_error(index);
    }
    0
}

/// An empty uprobe program: `cargo xtask bench` attaches it at the same
/// sites as `call_start` to measure what the trap alone costs.
#[uprobe]
pub fn call_empty(_ctx: ProbeContext) -> u32 {
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
