//! Log points: a hardware watchpoint on a probed instruction's oparg byte
//! runs `log_hit`, which checks that the hit is a run of that instruction,
//! captures the values the log point names from the running frame, tests
//! the simple part of its condition and sends the hit to userspace.
//!
//! Dict scans run in `bpf_loop` callbacks, which the verifier checks once
//! whatever the number of iterations.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user_buf,
        generated::{bpf_loop, bpf_ringbuf_output},
    },
    macros::{map, perf_event},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::PerfEventContext,
};
use pyprobe_common::{
    MAX_PROCESSES, calls, dict_keys,
    logpoint::{
        Atom, CMP_EQ, CMP_GE, CMP_GT, CMP_IS_NONE, CMP_IS_NOT_NONE, CMP_LE, CMP_LT, CMP_NE,
        CONST_FLOAT, CONST_INT, CONST_STR, Capture, EVAL_RANGES, HIT_STACK, Hit, KIND_BOOL,
        KIND_FLOAT, KIND_INT, KIND_NONE, KIND_OTHER, KIND_STR, LogLimit, LogProcess, LogState,
        MAX_ARMED, MAX_ATOMS, MAX_CAPTURES, MAX_DICT_SCAN, MAX_LOGPOINTS, MAX_NAMES, MAX_PROGRAMS,
        MAX_STACK, MAX_STEPS, NAME_BYTES, Name, OP_ATTR, OP_KEY_INT, OP_KEY_STR, OP_LEN, Program,
        STATUS_MISSING, STATUS_OK, STATUS_UNREADABLE, STATUS_UNSUPPORTED, STATUS_WRONG_TYPE,
        STR_ASCII, VALUE_BYTES, Value, Watch, WatchKey,
    },
    objects::{
        DICT_KEYS, DICT_VALUES, LIST_ITEMS, LONG_DIGITS, OB_SIZE, OB_TYPE, TP_BASICSIZE,
        TP_DICTOFFSET, TP_FLAGS, TPFLAGS_INLINE_VALUES, TPFLAGS_MANAGED_DICT,
    },
    process::FrameLayout,
    stats,
};

use crate::{
    copy_py_process, count_error, py_process, read,
    thread::{gil_holder, running_frame},
};

/// The log points' part of each process they watch (its facts are in
/// `PY_PROCESS`), written by userspace, or by `process_fork` for a child.
#[map(name = "LOG_PROCESS")]
static LOG_PROCESS: HashMap<u32, LogProcess> = HashMap::with_max_entries(MAX_PROCESSES, 0);

/// Watched addresses.
#[map(name = "LOG_WATCH")]
static LOG_WATCH: HashMap<WatchKey, Watch> = HashMap::with_max_entries(4096, 0);

/// What each log point captures and tests.
#[map(name = "LOG_PROGRAMS")]
static LOG_PROGRAMS: Array<Program> = Array::with_max_entries(MAX_PROGRAMS, 0);

/// Counters and rate-limit state of each log point.
#[map(name = "LOG_STATE")]
static LOG_STATE: Array<LogState> = Array::with_max_entries(MAX_ARMED, 0);

#[map(name = "LOG_LIMITS")]
static LOG_LIMITS: Array<LogLimit> = Array::with_max_entries(MAX_LOGPOINTS, 0);

/// Hits to userspace.
#[map(name = "LOG_HITS")]
static LOG_HITS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Code objects armed on, by process and address: 1 once freed (see
/// [`code_freed`]).
#[map(name = "LOG_FREED")]
static LOG_FREED: HashMap<WatchKey, u32> = HashMap::with_max_entries(MAX_ARMED, 0);

/// Processes forked by watched ones: the watched process each descends
/// from. Its watchpoints were inherited at the fork (`perf_event_attr.inherit`),
/// on the same addresses of a copy of the same memory, so its hits are
/// looked up among that process's watched addresses.
#[map(name = "LOG_ORIGIN")]
static LOG_ORIGIN: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PROCESSES, 0);

/// Forgets `tgid` (it exec'd or exited); whether it was configured.
#[inline(always)]
pub fn forget(tgid: u32) -> bool {
    let _ = LOG_ORIGIN.remove(&tgid);
    LOG_PROCESS.remove(&tgid).is_ok()
}

/// Whether process `tgid` has log points armed.
#[inline(always)]
pub fn armed(tgid: u32) -> bool {
    // SAFETY: only looked up.
    unsafe { LOG_PROCESS.get(&tgid) }.is_some()
}

/// Called by `process_fork`: process `tgid` was just forked by `parent`.
/// When `parent` has log points armed, the child is set up from the
/// parent's configuration before it runs. Returns the watched process it
/// descends from, when it was set up.
#[inline(always)]
pub fn forked(parent: u32, tgid: u32) -> Option<u32> {
    // SAFETY: values are only read while this program runs.
    let process = unsafe { LOG_PROCESS.get(&parent) }?;
    // SAFETY: as above.
    let origin = unsafe { LOG_ORIGIN.get(&parent) }
        .copied()
        .unwrap_or(parent);
    let facts = py_process(parent)?;
    if LOG_ORIGIN.insert(&tgid, &origin, 0).is_err()
        || !copy_py_process(tgid, facts, 0)
        || LOG_PROCESS.insert(&tgid, process, 0).is_err()
    {
        let _ = LOG_ORIGIN.remove(&tgid);
        let _ = LOG_PROCESS.remove(&tgid);
        count_error(stats::LOG_NO_PROCESS);
        return None;
    }
    Some(origin)
}

/// Called by `code_freed`: code object `code` of process `tgid` is being
/// freed; if a log point is armed on it, userspace is told to take its
/// watchpoints off.
pub fn code_freed(tgid: u32, code: u64) {
    let key = WatchKey {
        tgid,
        _pad: 0,
        addr: code,
    };
    if let Some(freed) = LOG_FREED.get_ptr_mut(&key) {
        // SAFETY: a value of a successful lookup.
        unsafe { *freed = 1 };
    }
}

/// The hit being built on this CPU (too big for the stack).
#[map(name = "LOG_SCRATCH")]
static LOG_SCRATCH: PerCpuArray<Hit> = PerCpuArray::with_max_entries(1, 0);

/// Adds one to a counter shared by all CPUs, atomically: a log point
/// armed in a process also fires in the processes forked from it, which
/// may run on other CPUs at the same moment.
#[inline(always)]
fn add(counter: &mut u64) {
    // `core` offers no atomic add on this target; the instruction is
    // BPF's own (`BPF_ATOMIC | BPF_ADD`).
    // SAFETY: the counter is an aligned u64 in map memory.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({0} + 0) += {1}",
            in(reg) counter as *mut u64,
            in(reg) 1u64,
        )
    };
}

/// Calls `callback(i, ctx)` for `i` in `0..n` through `bpf_loop`: the
/// verifier checks the callback once, where an unrolled loop multiplies
/// the states of each turn's branches. The callback casts `ctx` back to a
/// `C` and returns 1 to stop early.
#[inline(always)]
fn in_bpf_loop<C>(n: u32, callback: extern "C" fn(u64, *mut c_void) -> i64, ctx: &mut C) {
    // SAFETY: the callback takes the context given here, as bpf_loop
    // passes it back, for the length of the call.
    unsafe { bpf_loop(n, callback as *mut c_void, (ctx as *mut C).cast(), 0) };
}

/// The program run by a log point's watchpoint.
#[perf_event]
pub fn log_hit(ctx: PerfEventContext) -> u32 {
    // SAFETY: the context of a perf-event program.
    let addr = unsafe { (*ctx.ctx).addr };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    let key = WatchKey {
        tgid,
        _pad: 0,
        addr,
    };
    // SAFETY: values are only read while this program runs.
    let watch = match unsafe { LOG_WATCH.get(&key) } {
        Some(watch) => watch,
        // A forked child's inherited watchpoint: the address its watched
        // ancestor declared.
        // SAFETY: as above.
        None => match unsafe { LOG_ORIGIN.get(&tgid) }.and_then(|&origin| unsafe {
            LOG_WATCH.get(&WatchKey {
                tgid: origin,
                _pad: 0,
                addr,
            })
        }) {
            Some(watch) => watch,
            None => {
                count_error(stats::LOG_NO_WATCH);
                return 0;
            }
        },
    };
    let index = watch.logpoint;
    let Some(state) = LOG_STATE.get_ptr_mut(index) else {
        return 0;
    };
    // SAFETY: as above.
    let state = unsafe { &mut *state };
    add(&mut state.hits);
    // SAFETY: values are only read while this program runs.
    let (Some(process), Some(facts)) = (unsafe { LOG_PROCESS.get(&tgid) }, py_process(tgid)) else {
        count_error(stats::LOG_NO_PROCESS);
        return 0;
    };
    let layout = &facts.frame;
    // The data trap reports the instruction after the access: still inside
    // the eval loop for a read made by it.
    // SAFETY: the context of a perf-event program.
    let ip = unsafe { (*ctx.ctx).regs.rip };
    let mut in_eval = false;
    for r in 0..EVAL_RANGES {
        if ip >= process.eval_code[2 * r] && ip < process.eval_code[2 * r + 1] {
            in_eval = true;
        }
    }
    if !in_eval {
        add(&mut state.foreign);
        return 0;
    }
    // Which frame reads the instruction. At a function's first instruction
    // (3.13+): the newest frame on the thread's data stack, which 3.14 reads
    // before the thread state names it (and which, in a recursive call, is
    // not the caller of the same code). Else the eval loop's frame
    // register, then the thread state's current frame.
    let code_of =
        |f: u64| read::<u64>(f.wrapping_add(layout.code())).unwrap_or(0) & layout.code_mask;
    let mut frame = 0;
    if watch.frame_bytes != 0 && process.tstate_datastack_top != 0 {
        let top = gil_holder(&facts.thread)
            .and_then(|t| read::<u64>(t.wrapping_add(process.tstate_datastack_top)))
            .unwrap_or(0);
        let newest = top.wrapping_sub(watch.frame_bytes);
        if top != 0 && code_of(newest) == watch.code {
            frame = newest;
        }
    }
    if frame == 0 {
        let register = frame_register(&ctx, process.frame_register);
        if register != 0 && code_of(register) == watch.code {
            frame = register;
        }
    }
    if frame == 0 {
        let Some(current) = running_frame(&facts.thread) else {
            count_error(stats::LOG_UNREADABLE);
            return 0;
        };
        frame = current;
    }
    if code_of(frame) != watch.code {
        add(&mut state.other_frame);
        return 0;
    }
    // A second read in one run: the instruction reading itself again
    // after its handler started (see `Watch::started`).
    let own = watch.started != 0
        && read::<u64>(frame.wrapping_add(layout.instruction())) == Some(watch.started);
    if own {
        add(&mut state.repeats);
        return 0;
    }
    let Some(program) = LOG_PROGRAMS.get(watch.program) else {
        return 0;
    };
    let Some(limit) = LOG_LIMITS.get_ptr_mut(watch.point) else {
        return 0;
    };
    // SAFETY: as above. Shared by every process of the log point: its
    // counters are added to atomically; two CPUs passing the tests at
    // once may each send the last hit a limit allows.
    let limit = unsafe { &mut *limit };
    if program.max_hits != 0 && limit.sent >= program.max_hits {
        add(&mut state.over_count);
        return 0;
    }
    let Some(hit) = LOG_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch value is ours for this run.
    let hit = unsafe { &mut *hit };
    hit.tgid = tgid;
    hit.tid = tid;
    hit.logpoint = index;
    hit.flags = 0;
    hit.frame = frame;
    hit.nframes = 0;
    let ncaptures = program.ncaptures.min(MAX_CAPTURES as u32);
    hit.nvalues = ncaptures;
    let mut capture_ctx = CaptureCtx {
        program,
        process,
        ref_mask: layout.code_mask,
        values: &mut hit.values,
        frame,
    };
    in_bpf_loop(ncaptures, capture_one, &mut capture_ctx);
    if !condition_may_hold(program, &hit.values) {
        add(&mut state.condition_false);
        return 0;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if program.rate != 0 {
        if now.wrapping_sub(limit.window_start) >= 1_000_000_000 {
            limit.window_start = now;
            limit.window_sent = 0;
        }
        if limit.window_sent >= u64::from(program.rate) {
            add(&mut state.rate_limited);
            return 0;
        }
    }
    hit.time_ns = now;
    if program.stack != 0 {
        hit.flags |= HIT_STACK;
        walk_stack(hit, layout);
    }
    // SAFETY: `hit` is a whole `Hit` in map memory.
    let sent = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(LOG_HITS) as *mut c_void,
            (hit as *mut Hit).cast(),
            core::mem::size_of::<Hit>() as u64,
            0,
        )
    };
    if sent != 0 {
        add(&mut state.lost);
        return 0;
    }
    add(&mut state.sent);
    add(&mut limit.sent);
    add(&mut limit.window_sent);
    0
}

/// The value of callee-saved register `reg` (`calls::REG_*`) at the hit,
/// 0 for [`NO_REGISTER`].
#[inline(always)]
fn frame_register(ctx: &PerfEventContext, reg: u64) -> u64 {
    // Each register read with a constant offset, volatile: the verifier
    // rejects a context access at a computed offset, which is what the
    // compiler makes of a `match` on the register.
    // SAFETY: the context of a perf-event program: its saved user registers.
    let values = unsafe {
        let regs = &raw const (*ctx.ctx).regs;
        [
            core::ptr::read_volatile(&raw const (*regs).rbx),
            core::ptr::read_volatile(&raw const (*regs).rbp),
            core::ptr::read_volatile(&raw const (*regs).r12),
            core::ptr::read_volatile(&raw const (*regs).r13),
            core::ptr::read_volatile(&raw const (*regs).r14),
            core::ptr::read_volatile(&raw const (*regs).r15),
        ]
    };
    match reg as u8 {
        calls::REG_RBX => values[0],
        calls::REG_RBP => values[1],
        calls::REG_R12 => values[2],
        calls::REG_R13 => values[3],
        calls::REG_R14 => values[4],
        calls::REG_R15 => values[5],
        _ => 0,
    }
}

/// Records the frame chain from the running frame (code and raw
/// instruction word of each), innermost first.
#[inline(always)]
fn walk_stack(hit: &mut Hit, layout: &FrameLayout) {
    let mut frame = hit.frame;
    let mut n = 0u32;
    for i in 0..MAX_STACK {
        if frame == 0 {
            break;
        }
        let code = read::<u64>(frame.wrapping_add(layout.code())).unwrap_or(0);
        let instruction = read::<u64>(frame.wrapping_add(layout.instruction())).unwrap_or(0);
        hit.frames[i].code = code & layout.code_mask;
        hit.frames[i].instruction = instruction;
        n += 1;
        frame = read::<u64>(frame.wrapping_add(layout.previous())).unwrap_or(0);
    }
    hit.nframes = n;
}

/// What `capture_one` works with.
struct CaptureCtx<'a> {
    program: &'a Program,
    process: &'a LogProcess,
    /// [`FrameLayout::code_mask`], applied to local variables too.
    ref_mask: u64,
    values: &'a mut [Value; MAX_CAPTURES],
    frame: u64,
}

/// `bpf_loop` callback: captures path `index` of the program.
extern "C" fn capture_one(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the context given to it.
    let ctx = unsafe { &mut *ctx.cast::<CaptureCtx>() };
    let i = index as usize;
    if i >= MAX_CAPTURES {
        return 1;
    }
    let capture = &ctx.program.captures[i];
    let value = &mut ctx.values[i];
    *value = Value::default();
    capture_path(
        capture,
        &ctx.program.names,
        ctx.process,
        ctx.ref_mask,
        ctx.frame,
        value,
    );
    0
}

/// Follows one path from the frame's local to its value and describes it.
#[inline(always)]
fn capture_path(
    capture: &Capture,
    names: &[Name; MAX_NAMES],
    process: &LogProcess,
    ref_mask: u64,
    frame: u64,
    value: &mut Value,
) {
    let slot = frame
        .wrapping_add(process.frame_localsplus)
        .wrapping_add(u64::from(capture.local).wrapping_mul(8));
    let Some(word) = read::<u64>(slot) else {
        value.status = STATUS_UNREADABLE;
        return;
    };
    let obj = word & ref_mask;
    if obj == 0 {
        value.status = STATUS_MISSING;
        return;
    }
    let nsteps = (capture.nsteps as usize).min(MAX_STEPS);
    let mut ctx = StepCtx {
        capture,
        names,
        process,
        value,
        obj,
        done: false,
    };
    // In a `bpf_loop` callback, checked once by the verifier: unrolled,
    // each step's dict scans and instance layouts multiplied the states
    // of the steps before (a third of the verifier's time on `log_hit`).
    in_bpf_loop(nsteps as u32, step_one, &mut ctx);
    if !ctx.done {
        describe(ctx.obj, process, ctx.value);
    }
}

/// What [`step_one`] reads and writes.
struct StepCtx<'a> {
    capture: &'a Capture,
    names: &'a [Name; MAX_NAMES],
    process: &'a LogProcess,
    value: &'a mut Value,
    /// The object reached so far.
    obj: u64,
    /// Set when the value is final (an error, or a `len()`).
    done: bool,
}

/// `bpf_loop` callback: takes step `index` of a capture path from
/// `ctx.obj`; stops the loop once the value is final.
extern "C" fn step_one(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the context given to it.
    let ctx = unsafe { &mut *ctx.cast::<StepCtx>() };
    let s = index as usize;
    if s >= MAX_STEPS {
        return 1;
    }
    let step = &ctx.capture.steps[s];
    let (obj, process) = (ctx.obj, ctx.process);
    let name = &ctx.names[(step.arg as usize) & (MAX_NAMES - 1)];
    let key = if step.op == OP_KEY_INT {
        Key::Int(step.int_arg)
    } else {
        Key::Str(name)
    };
    let next = match step.op {
        OP_ATTR => attribute(obj, process),
        OP_KEY_STR => {
            let ty = read::<u64>(obj.wrapping_add(OB_TYPE)).unwrap_or(0);
            if ty != process.type_dict {
                Err(STATUS_WRONG_TYPE)
            } else {
                dict_table(obj, process)
            }
        }
        OP_KEY_INT => subscript_int(obj, step.int_arg, process),
        OP_LEN => {
            length(obj, process, ctx.value);
            ctx.done = true;
            return 1;
        }
        _ => Err(STATUS_UNSUPPORTED),
    };
    // One scan for every kind of step: inlined at each of the places
    // that find a table, its setup was verified once per place.
    let outcome = next.and_then(|next| match next {
        Next::Object(obj) => Ok(obj),
        Next::Table { keys, values } => scan(keys, values, key, process),
    });
    match outcome {
        Ok(next) => {
            ctx.obj = next;
            0
        }
        Err(status) => {
            ctx.value.status = status;
            ctx.done = true;
            1
        }
    }
}

/// Where a step leads: an object, or a table of keys (and values) to scan
/// for the step's key.
#[derive(Clone, Copy)]
enum Next {
    Object(u64),
    Table {
        /// The dict keys object.
        keys: u64,
        /// The values array of a split dict or an instance, or 0 (each
        /// value is beside its key).
        values: u64,
    },
}

/// `len()` of a str, list, tuple or dict, as an int value.
#[inline(always)]
fn length(obj: u64, process: &LogProcess, value: &mut Value) {
    let ty = read::<u64>(obj.wrapping_add(OB_TYPE)).unwrap_or(0);
    if ty != process.type_str
        && ty != process.type_list
        && ty != process.type_tuple
        && ty != process.type_dict
    {
        value.status = STATUS_UNSUPPORTED;
        value.type_ = ty;
        return;
    }
    let Some(n) = read::<i64>(obj.wrapping_add(OB_SIZE)) else {
        value.status = STATUS_UNREADABLE;
        return;
    };
    value.status = STATUS_OK;
    value.kind = KIND_INT;
    value.type_ = process.type_int;
    value.addr = 0;
    value.raw = n as u64;
    value.negative = 0;
    // Digits, for userspace's exact decoding.
    let n = n as u64;
    value.len = if n == 0 {
        0
    } else if n < (1 << 30) {
        1
    } else {
        2
    };
    value.bytes[..4].copy_from_slice(&((n & 0x3fff_ffff) as u32).to_le_bytes());
    value.bytes[4..8].copy_from_slice(&(((n >> 30) & 0x3fff_ffff) as u32).to_le_bytes());
}

/// Fills `value` from the object at `obj`.
#[inline(always)]
fn describe(obj: u64, process: &LogProcess, value: &mut Value) {
    value.addr = obj;
    value.status = STATUS_OK;
    if obj == process.none {
        value.kind = KIND_NONE;
        return;
    }
    if obj == process.true_ || obj == process.false_ {
        value.kind = KIND_BOOL;
        value.raw = u64::from(obj == process.true_);
        return;
    }
    // The header in one read: type at 8, size (or length, or the float's
    // value) at 16, a str's state at 32 (an int's digits from 24).
    let Some(head) = read::<[u64; 5]>(obj).or_else(|| {
        // A small object at the very end of a mapping.
        read::<[u64; 3]>(obj).map(|h| [h[0], h[1], h[2], 0, 0])
    }) else {
        value.status = STATUS_UNREADABLE;
        return;
    };
    let ty = head[1];
    value.type_ = ty;
    let size = head[2] as i64;
    if ty == process.type_int {
        let (ndigits, negative) = if process.long_tag != 0 {
            let tag = size as u64;
            (tag >> 3, (tag & 3) == 2)
        } else {
            (size.unsigned_abs(), size < 0)
        };
        value.kind = KIND_INT;
        value.len = ndigits.min(u64::from(u32::MAX)) as u32;
        value.negative = u8::from(negative);
        if ndigits <= 2 {
            // The two first digits are in the header read.
            value.bytes[..8].copy_from_slice(&head[3].to_le_bytes());
        } else if
        // SAFETY: reads target memory into our buffer; a failure leaves
        // zeros (then the header's two digits).
        unsafe {
            bpf_probe_read_user_buf((obj + LONG_DIGITS) as *const u8, &mut value.bytes)
        }
        .is_err()
        {
            value.bytes[..8].copy_from_slice(&head[3].to_le_bytes());
        }
        let d0 = u64::from(
            u32::from_le_bytes([
                value.bytes[0],
                value.bytes[1],
                value.bytes[2],
                value.bytes[3],
            ]) & 0x3fff_ffff,
        );
        let d1 = u64::from(
            u32::from_le_bytes([
                value.bytes[4],
                value.bytes[5],
                value.bytes[6],
                value.bytes[7],
            ]) & 0x3fff_ffff,
        );
        let magnitude = match ndigits {
            0 => 0,
            1 => d0,
            _ => d0 | (d1 << 30),
        };
        value.raw = if negative {
            (magnitude as i64).wrapping_neg() as u64
        } else {
            magnitude
        };
        return;
    }
    if ty == process.type_float {
        value.kind = KIND_FLOAT;
        value.raw = size as u64;
        return;
    }
    if ty == process.type_str {
        let state = head[4] & 0xffff_ffff;
        let kind = (state >> 2) & 7;
        let compact = (state >> 5) & 1;
        let ascii = (state >> 6) & 1;
        value.kind = KIND_STR;
        value.len = (size as u64).min(u64::from(u32::MAX)) as u32;
        value.str_kind = (kind as u8) | if ascii != 0 { STR_ASCII } else { 0 };
        if compact == 0 {
            value.status = STATUS_UNSUPPORTED;
            return;
        }
        let data = obj.wrapping_add(if ascii != 0 {
            process.unicode_ascii_data
        } else {
            process.unicode_compact_data
        });
        let bytes = (size as u64).wrapping_mul(kind).min(VALUE_BYTES as u64) as usize;
        if bytes > 0 && bytes <= VALUE_BYTES {
            // SAFETY: reads target memory into our buffer.
            if unsafe { bpf_probe_read_user_buf(data as *const u8, &mut value.bytes[..bytes]) }
                .is_err()
            {
                value.status = STATUS_UNREADABLE;
            }
        }
        return;
    }
    value.kind = KIND_OTHER;
    if ty == process.type_list || ty == process.type_tuple || ty == process.type_dict {
        value.len = (size as u64).min(u64::from(u32::MAX)) as u32;
    }
}

/// `obj[int]`: a dict key (its table), or a list or tuple index (negative
/// from the end).
#[inline(always)]
fn subscript_int(obj: u64, key: i64, process: &LogProcess) -> Result<Next, u8> {
    let ty = read::<u64>(obj.wrapping_add(OB_TYPE)).ok_or(STATUS_UNREADABLE)?;
    if ty == process.type_dict {
        return dict_table(obj, process);
    }
    let items = if ty == process.type_list {
        read::<u64>(obj.wrapping_add(LIST_ITEMS)).ok_or(STATUS_UNREADABLE)?
    } else if ty == process.type_tuple {
        obj.wrapping_add(process.tuple_items)
    } else {
        return Err(STATUS_WRONG_TYPE);
    };
    let len = read::<i64>(obj.wrapping_add(OB_SIZE)).ok_or(STATUS_UNREADABLE)?;
    let at = if key < 0 { key.wrapping_add(len) } else { key };
    if at < 0 || at >= len {
        return Err(STATUS_MISSING);
    }
    let item =
        read::<u64>(items.wrapping_add((at as u64).wrapping_mul(8))).ok_or(STATUS_UNREADABLE)?;
    if item == 0 {
        return Err(STATUS_MISSING);
    }
    Ok(Next::Object(item))
}

/// A key to find.
#[derive(Clone, Copy)]
enum Key<'a> {
    Str(&'a Name),
    Int(i64),
}

/// The table holding the instance's own attributes (never the class's).
#[inline(always)]
fn attribute(obj: u64, process: &LogProcess) -> Result<Next, u8> {
    let ty = read::<u64>(obj.wrapping_add(OB_TYPE)).ok_or(STATUS_UNREADABLE)?;
    let flags = read::<u64>(ty.wrapping_add(TP_FLAGS)).ok_or(STATUS_UNREADABLE)?;
    let shared_keys = |values: u64| -> Result<Next, u8> {
        let keys =
            read::<u64>(ty.wrapping_add(process.heaptype_cached_keys)).ok_or(STATUS_UNREADABLE)?;
        Ok(Next::Table {
            keys,
            values: values.wrapping_add(process.dict_values_items),
        })
    };
    let dict = if process.instance_model != 0 && flags & TPFLAGS_MANAGED_DICT != 0 {
        match process.instance_model {
            1 => {
                // 3.11: values array at obj - 32, else a dict at obj - 24.
                let values = read::<u64>(obj.wrapping_sub(32)).ok_or(STATUS_UNREADABLE)?;
                if values != 0 {
                    return shared_keys(values);
                }
                read::<u64>(obj.wrapping_sub(24)).ok_or(STATUS_UNREADABLE)?
            }
            2 => {
                // 3.12: tagged dict-or-values at obj - 24.
                let word = read::<u64>(obj.wrapping_sub(24)).ok_or(STATUS_UNREADABLE)?;
                if word & 1 != 0 {
                    // Stored as the values pointer minus one (an odd word).
                    return shared_keys(word + 1);
                }
                word
            }
            _ => {
                // 3.13+: a materialized dict at obj - 24 wins over the
                // inline values.
                let dict = read::<u64>(obj.wrapping_sub(24)).ok_or(STATUS_UNREADABLE)?;
                if dict == 0 {
                    if flags & TPFLAGS_INLINE_VALUES == 0 {
                        return Err(STATUS_MISSING);
                    }
                    let basicsize =
                        read::<u64>(ty.wrapping_add(TP_BASICSIZE)).ok_or(STATUS_UNREADABLE)?;
                    let values = obj.wrapping_add(basicsize);
                    let valid = read::<u8>(values.wrapping_add(3)).ok_or(STATUS_UNREADABLE)?;
                    if valid == 0 {
                        return Err(STATUS_MISSING);
                    }
                    return shared_keys(values);
                }
                dict
            }
        }
    } else {
        let offset = read::<i64>(ty.wrapping_add(TP_DICTOFFSET)).ok_or(STATUS_UNREADABLE)?;
        if offset <= 0 {
            return Err(STATUS_UNSUPPORTED);
        }
        read::<u64>(obj.wrapping_add(offset as u64)).ok_or(STATUS_UNREADABLE)?
    };
    if dict == 0 {
        return Err(STATUS_MISSING);
    }
    dict_table(dict, process)
}

/// The table of a dict (combined or split).
#[inline(always)]
fn dict_table(dict: u64, process: &LogProcess) -> Result<Next, u8> {
    let keys = read::<u64>(dict.wrapping_add(DICT_KEYS)).ok_or(STATUS_UNREADABLE)?;
    let values = read::<u64>(dict.wrapping_add(DICT_VALUES)).ok_or(STATUS_UNREADABLE)?;
    let values = if values == 0 {
        0
    } else {
        values.wrapping_add(process.dict_values_items)
    };
    Ok(Next::Table { keys, values })
}

/// What a dict scan looks for and finds.
struct ScanCtx {
    entries: u64,
    entry_size: u64,
    /// Offset of the key in an entry.
    key_at: u64,
    /// Values array of a split dict, or 0 (value after the key).
    values: u64,
    want_str: u32,
    want_len: u64,
    want: [u64; NAME_BYTES / 8],
    want_int: i64,
    type_str: u64,
    type_int: u64,
    ascii_data: u64,
    long_tag: u64,
    found: u64,
}

/// Scans the entries of a dict keys object for `key`; the value comes from
/// the entry, or from `values[i]` for a split dict.
#[inline(always)]
fn scan(keys: u64, values: u64, key: Key, process: &LogProcess) -> Result<u64, u8> {
    // One read of the keys object's header.
    let head = read::<[u64; 5]>(keys).ok_or(STATUS_UNREADABLE)?;
    let dict_keys::Entries {
        count: nentries,
        start: entries,
        size: entry_size,
        key_at,
    } = dict_keys::entries(process.dict_sized != 0, keys, &head);
    if nentries > u64::from(MAX_DICT_SCAN) {
        return Err(STATUS_UNSUPPORTED);
    }
    let mut ctx = ScanCtx {
        entries,
        entry_size,
        key_at,
        values,
        want_str: 0,
        want_len: 0,
        want: [0; NAME_BYTES / 8],
        want_int: 0,
        type_str: process.type_str,
        type_int: process.type_int,
        ascii_data: process.unicode_ascii_data,
        long_tag: process.long_tag,
        found: 0,
    };
    match key {
        Key::Str(name) => {
            ctx.want_str = 1;
            ctx.want_len = u64::from(name.len);
            for w in 0..NAME_BYTES / 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&name.bytes[w * 8..w * 8 + 8]);
                ctx.want[w] = u64::from_le_bytes(b);
            }
        }
        Key::Int(i) => ctx.want_int = i,
    }
    in_bpf_loop(nentries as u32, scan_entry, &mut ctx);
    if ctx.found == 0 {
        Err(STATUS_MISSING)
    } else {
        Ok(ctx.found)
    }
}

/// `bpf_loop` callback: tests entry `index`; stops the loop when found.
extern "C" fn scan_entry(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the context given to it.
    let ctx = unsafe { &mut *ctx.cast::<ScanCtx>() };
    let entry = ctx.entries.wrapping_add(index.wrapping_mul(ctx.entry_size));
    // The key and the value beside it, in one read.
    let Some([key, inline_value]) = read::<[u64; 2]>(entry.wrapping_add(ctx.key_at)) else {
        return 1;
    };
    if key == 0 {
        return 0;
    }
    // The key's header (type at 8; for a str, length at 16, state at 32),
    // in one read.
    let Some(head) = read::<[u64; 5]>(key) else {
        return 0;
    };
    let ty = head[1];
    let matched = if ctx.want_str != 0 {
        if ty != ctx.type_str {
            return 0;
        }
        let len = head[2];
        let state = head[4] as u32;
        // Compact ASCII only: names and constants compared here are ASCII.
        if len != ctx.want_len || (state >> 5) & 3 != 3 {
            return 0;
        }
        let Some(data) = read::<[u64; NAME_BYTES / 8]>(key.wrapping_add(ctx.ascii_data)) else {
            return 0;
        };
        let mut same = true;
        for w in 0..NAME_BYTES / 8 {
            let used = len.saturating_sub(w as u64 * 8).min(8);
            let mask = if used >= 8 {
                u64::MAX
            } else {
                (1u64 << (used * 8)) - 1
            };
            if (data[w] ^ ctx.want[w]) & mask != 0 {
                same = false;
            }
        }
        same
    } else {
        if ty != ctx.type_int {
            return 0;
        }
        let size = head[2] as i64;
        let (ndigits, negative) = if ctx.long_tag != 0 {
            ((size as u64) >> 3, (size as u64) & 3 == 2)
        } else {
            (size.unsigned_abs(), size < 0)
        };
        if ndigits > 2 {
            return 0;
        }
        // The digits start at 24: in the header read.
        let digits = head[3];
        let d0 = digits & 0x3fff_ffff;
        let d1 = (digits >> 32) & 0x3fff_ffff;
        let magnitude = match ndigits {
            0 => 0,
            1 => d0,
            _ => d0 | (d1 << 30),
        } as i64;
        let v = if negative { -magnitude } else { magnitude };
        v == ctx.want_int
    };
    if !matched {
        return 0;
    }
    ctx.found = if ctx.values != 0 {
        read::<u64>(ctx.values.wrapping_add(index.wrapping_mul(8))).unwrap_or(0)
    } else {
        inline_value
    };
    1
}

/// Whether the kernel part of the condition may hold: false only when an
/// atom is surely false as Python would compute it.
#[inline(always)]
fn condition_may_hold(program: &Program, values: &[Value; MAX_CAPTURES]) -> bool {
    let natoms = (program.natoms as usize).min(MAX_ATOMS);
    let mut ctx = AtomCtx {
        program,
        values,
        holds: true,
    };
    // In a `bpf_loop` callback, checked once by the verifier: unrolled,
    // each atom's branches multiplied the states of the ones before.
    in_bpf_loop(natoms as u32, test_atom, &mut ctx);
    ctx.holds
}

/// What [`test_atom`] reads and writes.
struct AtomCtx<'a> {
    program: &'a Program,
    values: &'a [Value; MAX_CAPTURES],
    /// Cleared by the first atom found false.
    holds: bool,
}

/// `bpf_loop` callback: tests atom `index`; stops at a false one.
extern "C" fn test_atom(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the context given to it.
    let ctx = unsafe { &mut *ctx.cast::<AtomCtx>() };
    let a = index as usize;
    if a >= MAX_ATOMS {
        return 1;
    }
    let atom = &ctx.program.atoms[a];
    let value = &ctx.values[(atom.capture as usize) & (MAX_CAPTURES - 1)];
    if atom_is_false(atom, value) {
        ctx.holds = false;
        return 1;
    }
    0
}

/// Whether one comparison is surely false.
#[inline(always)]
fn atom_is_false(atom: &Atom, value: &Value) -> bool {
    if value.status != STATUS_OK {
        return false; // userspace reports the error
    }
    match atom.cmp {
        CMP_IS_NONE => return value.kind != KIND_NONE,
        CMP_IS_NOT_NONE => return value.kind == KIND_NONE,
        _ => {}
    }
    let equality = atom.cmp == CMP_EQ || atom.cmp == CMP_NE;
    match atom.kind {
        CONST_INT => {
            let small_int = value.kind == KIND_INT && value.len <= 2;
            if value.kind == KIND_BOOL || small_int {
                return !holds(atom.cmp, value.raw as i64, atom.int);
            }
            if value.kind == KIND_FLOAT && atom.has_float != 0 {
                return float_atom_is_false(atom, value);
            }
            if value.kind == KIND_INT || value.kind == KIND_FLOAT {
                return false; // big int, or an int no float holds: userspace decides
            }
            // None, str, other: never equal to an int; ordering raises.
            equality && atom.cmp == CMP_EQ && value.kind != KIND_OTHER
        }
        CONST_FLOAT => {
            if value.kind == KIND_FLOAT {
                return float_atom_is_false(atom, value);
            }
            if value.kind == KIND_BOOL || value.kind == KIND_INT {
                return false; // userspace compares ints with floats
            }
            equality && atom.cmp == CMP_EQ && value.kind != KIND_OTHER
        }
        CONST_STR => {
            if value.kind != KIND_STR {
                return equality && atom.cmp == CMP_EQ && value.kind != KIND_OTHER;
            }
            if !equality {
                return false;
            }
            let same = value.str_kind & STR_ASCII != 0
                && value.len == atom.str.len
                && same_prefix(&value.bytes, &atom.str);
            let ascii = value.str_kind & STR_ASCII != 0;
            if !ascii {
                // A non-ASCII str never equals an ASCII constant.
                return atom.cmp == CMP_EQ;
            }
            if atom.cmp == CMP_EQ { !same } else { same }
        }
        _ => false,
    }
}

/// A float's bits as an integer that orders like the float (for non-NaN
/// values other than -0.0, which the caller makes 0.0).
#[inline(always)]
fn float_key(bits: u64) -> u64 {
    if bits >> 63 != 0 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// Whether a comparison of a captured float with a float constant is surely
/// false (NaN is left to userspace).
#[inline(always)]
fn float_atom_is_false(atom: &Atom, value: &Value) -> bool {
    // -0.0 == 0.0.
    let positive_zero = |b: u64| if b == 1 << 63 { 0 } else { b };
    let x = positive_zero(value.raw);
    let y = positive_zero(atom.float);
    let nan = |b: u64| (b >> 52) & 0x7ff == 0x7ff && b & ((1 << 52) - 1) != 0;
    if nan(x) || nan(y) {
        return false;
    }
    !holds(atom.cmp, float_key(x), float_key(y))
}

/// Whether `x CMP y` holds (true for an unknown comparison: never drops).
#[inline(always)]
fn holds<T: PartialOrd>(cmp: u32, x: T, y: T) -> bool {
    match cmp {
        CMP_EQ => x == y,
        CMP_NE => x != y,
        CMP_LT => x < y,
        CMP_LE => x <= y,
        CMP_GT => x > y,
        CMP_GE => x >= y,
        _ => true,
    }
}

/// Whether the first `name.len` bytes of `bytes` are the name's.
#[inline(always)]
fn same_prefix(bytes: &[u8; VALUE_BYTES], name: &Name) -> bool {
    let len = (name.len as usize).min(NAME_BYTES);
    let mut same = true;
    for i in 0..NAME_BYTES {
        if i < len && bytes[i] != name.bytes[i] {
            same = false;
        }
    }
    same
}
