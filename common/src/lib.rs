//! Types and constants shared by pyprobe's eBPF programs (`probe-ebpf`) and its
//! userspace daemon (`userspace`).
//!
//! Everything here is `#[repr(C)]` and `Copy` so that both sides agree on the
//! byte layout of map keys and values. Userspace enables the `user` feature to
//! get `aya::Pod` impls.
#![no_std]

/// Maximum number of processes the eval-entry counter map can hold at once.
pub const MAX_PROCESSES: u32 = 4096;

/// Indices into the `STATS` per-CPU array: counters of things the BPF side
/// could not do. Userspace sums them over CPUs and shows them, so nothing is
/// lost silently.
pub mod stats {
    // 0 is free (it counted the eval-entry counter's misses).
    /// A function start could not be counted because the per-code map was
    /// full.
    pub const CALLS_MAP_FULL: u32 = 1;
    /// A function start in a process with no configuration (a process
    /// pyprobe has not set up yet, e.g. just started under `--all`).
    pub const CALLS_NO_CONFIG: u32 = 2;
    /// A function start whose frame or code object could not be read.
    pub const CALLS_UNREADABLE: u32 = 3;
    /// A finished call could not be timed because the per-code latency map
    /// was full.
    pub const LATENCY_MAP_FULL: u32 = 4;
    /// A sampled check found the frame register disagreeing with the
    /// thread state's current frame (the count went to the register's).
    pub const FRAME_REGISTER_MISMATCH: u32 = 5;
    /// A CPU sample of a thread of a profiled process that pyprobe has not
    /// mapped to a thread state yet (a new thread; userspace re-reads the
    /// thread list when this grows).
    pub const SAMPLE_UNKNOWN_THREAD: u32 = 6;
    /// A CPU sample of a thread with no Python thread state (a thread the
    /// interpreter does not know, e.g. one started by a C library).
    pub const SAMPLE_NOT_PYTHON: u32 = 7;
    /// A CPU sample of a Python thread that had no Python frame (running C
    /// code outside any Python call: starting up, finalizing).
    pub const SAMPLE_NO_FRAME: u32 = 8;
    /// A CPU sample whose thread state or first frame could not be read.
    pub const SAMPLE_UNREADABLE: u32 = 9;
    /// A CPU sample dropped because the ring buffer to userspace was full.
    pub const SAMPLE_LOST: u32 = 10;
    /// A watchpoint hit in a process without log point configuration.
    pub const LOG_NO_PROCESS: u32 = 11;
    /// A watchpoint hit at an address no log point watches (a log point
    /// removed while its breakpoint was still installed).
    pub const LOG_NO_WATCH: u32 = 12;
    /// A watchpoint hit whose thread state or frame could not be read.
    pub const LOG_UNREADABLE: u32 = 13;
    /// A process event (see [`super::process`]) dropped because its ring
    /// buffer was full.
    pub const PROCESS_EVENTS_LOST: u32 = 14;
    /// Number of counters in the `STATS` array.
    pub const COUNT: u32 = 15;
}

/// Names of the maps and programs in the eBPF object, shared so a rename on one
/// side cannot silently break the other.
pub mod names {
    /// Per-CPU array of `u64` error counters, indexed by [`super::stats`].
    pub const MAP_STATS: &str = "STATS";
    /// Uprobe program counting Python function starts per code object.
    pub const PROG_CALL_START: &str = "call_start";
    /// Uprobe program counting generator resumptions by `throw()`/`close()`
    /// at the entry of `_PyEval_EvalFrameDefault` (3.11+).
    pub const PROG_CALL_THROW: &str = "call_throw";
    /// Empty uprobe program, for measuring the cost of the trap alone.
    pub const PROG_CALL_EMPTY: &str = "call_empty";
    /// Hash map: tgid (`u32`) -> [`super::process::PyProcess`]: what every
    /// program needs to know of a Python process, whatever the jobs.
    pub const MAP_PY_PROCESS: &str = "PY_PROCESS";
    /// Hash map: tgid (`u32`) -> [`super::calls::ProcessConfig`], the call
    /// counter's part of a process it counts.
    pub const MAP_CALL_CONFIG: &str = "CALL_CONFIG";
    /// Per-CPU hash map: [`super::calls::CodeKey`] ->
    /// [`super::calls::CallCounts`].
    pub const MAP_CALL_COUNTS: &str = "CALL_COUNTS";
    /// Per-CPU array of [`super::calls::CacheSlot`].
    pub const MAP_CALL_CACHE: &str = "CALL_CACHE";
    /// Uprobe program counting calls of `builtin_function_or_method`
    /// objects (at their vectorcall and `tp_call` entry points).
    pub const PROG_BUILTIN_FUNCTION: &str = "builtin_function";
    /// Uprobe program counting calls through `method_descriptor` objects.
    pub const PROG_BUILTIN_METHOD: &str = "builtin_method";
    /// Per-CPU hash map: [`super::calls::BuiltinKey`] -> calls (`u64`).
    pub const MAP_BUILTIN_COUNTS: &str = "BUILTIN_COUNTS";
    /// Array of [`super::calls::SkipSet`]: code objects `--filter` excludes.
    pub const MAP_CALL_SKIP: &str = "CALL_SKIP";
    /// Uprobe program at the sites where Python frames return or yield
    /// (3.11+, `--latency`).
    pub const PROG_CALL_EXIT: &str = "call_exit";
    /// Uretprobe program on `_PyEval_EvalFrameDefault` (3.8-3.10,
    /// `--latency`).
    pub const PROG_CALL_EXIT_STACK: &str = "call_exit_stack";
    /// Uprobe program on the code object's `tp_dealloc`: bumps the
    /// process's [`super::process::PyProcess::code_epoch`].
    pub const PROG_CODE_FREED: &str = "code_freed";
    /// LRU hash map: [`super::calls::RunningKey`] ->
    /// [`super::calls::Running`]: frames being timed.
    pub const MAP_CALL_RUNNING: &str = "CALL_RUNNING";
    /// Per-CPU hash map: [`super::calls::CodeKey`] ->
    /// [`super::calls::Histogram`].
    pub const MAP_CALL_LATENCY: &str = "CALL_LATENCY";
    /// Perf-event program (CPU clock) that walks the sampled thread's
    /// Python stack.
    pub const PROG_SAMPLE_CPU: &str = "sample_cpu";
    /// Perf-event program that goes on walking a stack too deep for one
    /// run, reached by tail call.
    pub const PROG_SAMPLE_WALK: &str = "sample_walk";
    /// Hash map: tgid (`u32`) -> `u32` (0): the processes the sampler
    /// walks.
    pub const MAP_SAMPLE_PROCESSES: &str = "SAMPLE_PROCESSES";
    /// Hash map: thread id (`u32`) -> [`super::sample::ThreadState`].
    pub const MAP_SAMPLE_THREADS: &str = "SAMPLE_THREADS";
    /// Ring buffer of [`super::sample::Sample`]s (header and the frames
    /// walked only).
    pub const MAP_SAMPLES: &str = "SAMPLES";
    /// Program array holding `sample_walk` at index 0.
    pub const MAP_SAMPLE_PROGS: &str = "SAMPLE_PROGS";
    /// Perf-event program run by a log point's hardware watchpoint.
    pub const PROG_LOG_HIT: &str = "log_hit";
    /// Hash map: tgid (`u32`) -> [`super::logpoint::LogProcess`].
    pub const MAP_LOG_PROCESS: &str = "LOG_PROCESS";
    /// Hash map: [`super::logpoint::WatchKey`] -> [`super::logpoint::Watch`].
    pub const MAP_LOG_WATCH: &str = "LOG_WATCH";
    /// Array of [`super::logpoint::Program`] ([`super::logpoint::Watch::program`]).
    pub const MAP_LOG_PROGRAMS: &str = "LOG_PROGRAMS";
    /// Array of [`super::logpoint::LogState`], one per armed code object
    /// ([`super::logpoint::Watch::logpoint`]).
    pub const MAP_LOG_STATE: &str = "LOG_STATE";
    /// Array of [`super::logpoint::LogLimit`], one per log point
    /// ([`super::logpoint::Watch::point`]).
    pub const MAP_LOG_LIMITS: &str = "LOG_LIMITS";
    /// Ring buffer of [`super::logpoint::Hit`]s.
    pub const MAP_LOG_HITS: &str = "LOG_HITS";
    /// Code objects log points are armed on ([`super::logpoint::WatchKey`]
    /// with the code object's address): `code_freed` sets the value to 1
    /// when one is freed, so its watchpoints come off before the memory
    /// holds something else.
    pub const MAP_LOG_FREED: &str = "LOG_FREED";
    /// Hash map: template index (`u32`) -> [`super::calls::Template`]
    /// of one interpreter file, from which `call_start` configures a
    /// process of that file it meets for the first time
    /// ([`super::calls::cookie`]).
    pub const MAP_CALL_TEMPLATES: &str = "CALL_TEMPLATES";
    /// Ring buffer of [`super::process::ProcessEvent`]s.
    pub const MAP_PROCESS_EVENTS: &str = "PROCESS_EVENTS";
    /// Raw tracepoint program on `sched_process_exec`.
    pub const PROG_PROCESS_EXEC: &str = "process_exec";
    /// Raw tracepoint program on `sched_process_exit`.
    pub const PROG_PROCESS_EXIT: &str = "process_exit";
    /// Raw tracepoint program on `sched_process_fork`.
    pub const PROG_PROCESS_FORK: &str = "process_fork";
    /// Array of 2 `u32`: the byte offsets of `pid` and `tgid` in the
    /// kernel's `struct task_struct` (from its BTF), for `process_fork` to
    /// read a new task's ids; 0 when unknown (forks are then not followed).
    pub const MAP_TASK_OFFSETS: &str = "TASK_OFFSETS";
    /// Hash map: tgid (`u32`) of a process forked by a log-watched one ->
    /// the watched process it descends from (`u32`), whose watched
    /// addresses its inherited watchpoints trap on.
    pub const MAP_LOG_ORIGIN: &str = "LOG_ORIGIN";
}

/// What the kernel tells userspace about watched processes as it happens:
/// a process configured from its interpreter's template at its first call,
/// one that called `exec`, one that exited. The per-process configurations
/// of an exec'ing or exiting process are removed in the kernel at that
/// moment, before any of its later calls could be read with stale offsets.
pub mod process {
    /// Where the fields every program reads lie in a frame: one window of
    /// the frame, read at once, and the fields' offsets in it.
    ///
    /// Fields named `*_at` are offsets inside the window, which starts
    /// `window` bytes into the frame; each is 4-byte aligned (but
    /// `owner_at`) and at most [`super::calls::WINDOW`] - 8.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct FrameLayout {
        /// Start of the window in a frame.
        pub window: u64,
        /// Bytes of the window: up to the end of its last field, so the
        /// read never goes past the object.
        pub window_len: u64,
        /// `f_code` / `f_executable` in the window.
        pub code_at: u64,
        /// `f_lasti` / `prev_instr` / `instr_ptr` in the window (8 bytes
        /// are read; userspace interprets them).
        pub instruction_at: u64,
        /// `f_back` / `previous` in the window.
        pub previous_at: u64,
        /// The `owner` byte in the window (any byte of it when frames have
        /// no owner, 3.8-3.11: then `owner_min` is 256).
        pub owner_at: u64,
        /// Mask applied to the code word and to local variables
        /// (`_PyStackRef` in 3.14).
        pub code_mask: u64,
        /// Frames whose owner is at least this are not Python code (entry
        /// frames pushed by C); 256 when frames have no owner.
        pub owner_min: u64,
        /// Added to the instruction pointer before computing its index: 2
        /// when it points at the previous code unit (`prev_instr`), else 0.
        pub instruction_bias: u64,
    }

    impl FrameLayout {
        /// Offset of the code word in a frame.
        #[inline(always)]
        pub fn code(&self) -> u64 {
            self.window.wrapping_add(self.code_at)
        }

        /// Offset of the instruction word in a frame.
        #[inline(always)]
        pub fn instruction(&self) -> u64 {
            self.window.wrapping_add(self.instruction_at)
        }

        /// Offset of the previous frame's address in a frame.
        #[inline(always)]
        pub fn previous(&self) -> u64 {
            self.window.wrapping_add(self.previous_at)
        }
    }

    /// What every program needs to know of one Python process, whichever
    /// jobs watch it: how its threads lead to their frames, how a frame
    /// reads, and the generation of its code objects. One entry per
    /// process in the `PY_PROCESS` map, made by the first job that sets
    /// the process up (or by the kernel, from a template or a parent) and
    /// kept while any job's part (`CALL_CONFIG`, `SAMPLE_PROCESSES`,
    /// `LOG_PROCESS`) names the process.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct PyProcess {
        /// Who holds the GIL, and how a thread state leads to its frame.
        pub thread: super::thread::ThreadFrame,
        /// How a frame reads.
        pub frame: FrameLayout,
        /// Code-object generation: bumped by `code_freed` each time the
        /// process frees a code object (while that probe watches it).
        /// While it is unchanged, no code object address named before can
        /// hold another one: the call counter trusts its cache slots
        /// filled under the current value, samples carry it, log points
        /// look for reloaded code when it changed. Userspace sets it to the
        /// monotonic clock each time it writes the facts, the kernel to
        /// [`super::calls::KERNEL_EPOCH`] and the clock: a process never
        /// gets a value an earlier owner of its PID reached.
        pub code_epoch: u64,
    }

    /// `call_start` configured the process from a template at its first
    /// Python call (a process started after pyprobe, e.g. a new worker).
    pub const NEW: u32 = 0;
    /// A watched process called `exec`: whatever it runs now, nothing of
    /// its old image applies.
    pub const EXEC: u32 = 1;
    /// A watched process exited.
    pub const EXIT: u32 = 2;
    /// `call_start` counted a code object for the first time (on this
    /// CPU): a [`CodeEvent`] carries the bytes that name it, read in the
    /// kernel at that moment, so that even a process gone a millisecond
    /// later has its functions named.
    pub const CODE: u32 = 3;
    /// A process with log points armed forked a child: the child inherited
    /// the watchpoints (its memory is a copy), and `process_fork` set it up
    /// in the kernel from the parent's configuration before it ran.
    /// [`ProcessEvent::template`] holds the watched process it descends
    /// from.
    pub const FORKED: u32 = 5;
    /// A process whose calls are counted, set up by userspace (its
    /// probes are its own), forked a child: userspace decides at once
    /// whether the child is counted too, rather than at its next look
    /// through `/proc` (a pool's or gunicorn's new worker). Not sent for
    /// threads. [`ProcessEvent::template`] holds the parent.
    pub const CHILD: u32 = 6;

    /// One [`NEW`], [`EXEC`] or [`EXIT`] event in the `PROCESS_EVENTS`
    /// ring buffer.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct ProcessEvent {
        /// [`NEW`], [`EXEC`] or [`EXIT`].
        pub kind: u32,
        /// The process (host tgid).
        pub tgid: u32,
        /// [`NEW`]: the template it was configured from; [`FORKED`]: the
        /// watched process (tgid) it descends from.
        pub template: u32,
        /// Padding, zero.
        pub _pad: u32,
    }

    /// `builtin_function` or `builtin_method` counted a builtin for the
    /// first time: a [`BuiltinEvent`] carries what names it.
    pub const BUILTIN: u32 = 4;

    /// Bytes captured of a C string (a `PyMethodDef`'s `ml_name`).
    pub const CSTR_CAPTURE: usize = 64;

    /// A [`BUILTIN`] event: a builtin counted for the first time, with
    /// what names it as it was at that moment: its `PyMethodDef`'s name and
    /// its owner (a module name `str`, or a type and its `tp_name`).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct BuiltinEvent {
        /// [`BUILTIN`].
        pub kind: u32,
        /// The process's template.
        pub template: u32,
        /// The builtin, as counted.
        pub key: super::calls::BuiltinKey,
        /// `ml_name`.
        pub name: u64,
        /// The owner's `ob_type` (0 without an owner).
        pub owner_type: u64,
        /// That type's `tp_flags`.
        pub owner_flags: u64,
        /// A type owner's `tp_name` (0 otherwise).
        pub owner_name: u64,
        /// Bytes of `ml_name` copied, its NUL included (0: not read;
        /// [`CSTR_CAPTURE`]: maybe cut short).
        pub name_len: u32,
        /// Bytes copied into `owner_bytes` (as `name_len`, for a type's
        /// name; [`STR_CAPTURE`] for a `str` owner).
        pub owner_len: u32,
        /// `ml_name`'s bytes.
        pub name_bytes: [u8; CSTR_CAPTURE],
        /// A `str` owner's first [`STR_CAPTURE`] bytes, or a type owner's
        /// `tp_name`.
        pub owner_bytes: [u8; STR_CAPTURE],
    }

    /// Bytes captured from the start of each `str` object a [`CodeEvent`]
    /// names: the object header and then the characters (152 ASCII
    /// characters from 3.12, 144 before).
    pub const STR_CAPTURE: usize = 192;

    /// A [`CODE`] event: a code object counted for the first time, with
    /// the two strings that name it as they were at that moment.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CodeEvent {
        /// [`CODE`].
        pub kind: u32,
        /// The process's template ([`super::calls::ProcessConfig::template`]).
        pub template: u32,
        /// The code object, as counted.
        pub key: super::calls::CodeKey,
        /// Address of `co_qualname` (`co_name` up to 3.10).
        pub qualname: u64,
        /// Address of `co_filename`.
        pub filename: u64,
        /// [`STR_CAPTURE`] bytes from `qualname` (zero if unreadable).
        pub qualname_bytes: [u8; STR_CAPTURE],
        /// [`STR_CAPTURE`] bytes from `filename` (zero if unreadable).
        pub filename_bytes: [u8; STR_CAPTURE],
    }
}

/// Sampling Python stacks on a CPU clock (`pyprobe record`, `pyprobe top`).
///
/// A perf-event program runs on every CPU at the chosen rate. When the
/// interrupted task is a thread userspace mapped to a Python thread state
/// ([`ThreadState`]), it reads the thread's current frame and walks the
/// frame chain, one read of the target per frame, recording each frame's
/// code object and raw instruction word. Userspace names them and computes
/// line numbers. Deep stacks are walked by [`FRAMES_PER_RUN`] per program
/// run, the walk going on in a tail call, up to [`MAX_FRAMES`].
/// Offsets and flags of CPython objects that are the same in every
/// supported version (3.8-3.15, x86_64): one table for the kernel programs
/// and userspace's readers.
pub mod objects {
    /// `PyObject.ob_refcnt`.
    pub const OB_REFCNT: u64 = 0;
    /// `PyObject.ob_type`.
    pub const OB_TYPE: u64 = 8;
    /// `PyVarObject.ob_size`.
    pub const OB_SIZE: u64 = 16;
    /// `PyTypeObject.tp_name`.
    pub const TP_NAME: u64 = 24;
    /// `PyTypeObject.tp_flags` (`unsigned long`).
    pub const TP_FLAGS: u64 = 168;
    /// `PyTypeObject.tp_methods`: the `PyMethodDef` array a C type was
    /// defined with (NULL for classes written in Python).
    pub const TP_METHODS: u64 = 232;
    /// `PyTypeObject.tp_dict` (NULL for static builtin types from 3.12: see
    /// `Offsets::interp_static_types`).
    pub const TP_DICT: u64 = 264;
    /// `PyTypeObject.tp_subclasses` (from 3.12, for a static builtin type,
    /// its index in the interpreter's static type states plus one).
    pub const TP_SUBCLASSES: u64 = 360;
    /// `PyModuleObject.md_dict`.
    pub const MODULE_DICT: u64 = 16;
    /// `PyFloatObject.ob_fval`.
    pub const FLOAT_VALUE: u64 = 16;
    /// `PyListObject.ob_item` (pointer to the items).
    pub const LIST_ITEMS: u64 = 24;
    /// `PyBytesObject.ob_sval`.
    pub const BYTES_DATA: u64 = 32;
    /// `PyUnicodeObject.length` (code points).
    pub const UNICODE_LENGTH: u64 = 16;
    /// `PyUnicodeObject.state` (bit field, u32).
    pub const UNICODE_STATE: u64 = 32;
    /// `PyLongObject` `ob_size` (≤3.11) or `lv_tag` (3.12+).
    pub const LONG_SIZE: u64 = 16;
    /// `PyLongObject.ob_digit`.
    pub const LONG_DIGITS: u64 = 24;
    /// `PyDictObject.ma_used`.
    pub const DICT_USED: u64 = 16;
    /// `PyDictObject.ma_keys`.
    pub const DICT_KEYS: u64 = 32;
    /// `PyDictObject.ma_values`.
    pub const DICT_VALUES: u64 = 40;
    /// `PyTypeObject.tp_basicsize`.
    pub const TP_BASICSIZE: u64 = 32;
    /// `PyTypeObject.tp_dictoffset`.
    pub const TP_DICTOFFSET: u64 = 288;
    /// `staticmethod.sm_callable` and `classmethod.cm_callable`: the
    /// wrapped function.
    pub const WRAPPED_CALLABLE: u64 = 16;
    /// `propertyobject.prop_get`: a property's getter.
    pub const PROPERTY_GET: u64 = 16;
    /// `Py_TPFLAGS_INLINE_VALUES` (`Include/object.h`, 3.13+): instances
    /// keep their attribute values right after the object.
    pub const TPFLAGS_INLINE_VALUES: u64 = 1 << 2;
    /// `Py_TPFLAGS_MANAGED_DICT` (`Include/object.h`, 3.11+): the
    /// interpreter manages the instance `__dict__` in the pre-header.
    pub const TPFLAGS_MANAGED_DICT: u64 = 1 << 4;
}

/// How any program finds the frame a thread of one process is running:
/// the facts every feature's per-process configuration starts with (one
/// definition, filled by one userspace function, read by one kernel
/// routine, `probe-ebpf/src/thread.rs`).
pub mod thread {
    /// Where a process publishes which thread runs bytecode, and how a
    /// thread state leads to its current frame.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct ThreadFrame {
        /// Address of the word naming the thread state that holds the GIL
        /// (3.8-3.11: `_PyRuntime.gilstate.tstate_current`), or 0.
        pub gil_current: u64,
        /// Address of the GIL's `last_holder` (3.12+), or 0.
        pub gil_last_holder: u64,
        /// Address of the GIL's `locked` (int, 3.12+), or 0.
        pub gil_locked: u64,
        /// Offset of the current frame (or of `cframe`) in the thread state.
        pub tstate_frame: u64,
        /// `_PyCFrame.current_frame`, or `u64::MAX` when `tstate_frame`
        /// points at the frame directly.
        pub cframe_current_frame: u64,
    }

    impl ThreadFrame {
        /// The word naming the thread that runs bytecode: `tstate_current`
        /// where the process has one, else the GIL's last holder (the
        /// thread running bytecode holds the GIL and wrote itself there
        /// when taking it); 0 when neither is known.
        #[inline(always)]
        pub fn holder_slot(&self) -> u64 {
            if self.gil_current != 0 {
                self.gil_current
            } else {
                self.gil_last_holder
            }
        }

        /// The same facts with every address moved by `bias` (a template's
        /// link-time addresses placed in one process).
        #[inline(always)]
        pub fn moved(&self, bias: u64) -> Self {
            let at = |a: u64| if a == 0 { 0 } else { a.wrapping_add(bias) };
            Self {
                gil_current: at(self.gil_current),
                gil_last_holder: at(self.gil_last_holder),
                gil_locked: at(self.gil_locked),
                ..*self
            }
        }
    }
}

pub mod sample {
    /// Most frames recorded per sample; a deeper stack keeps its innermost
    /// `MAX_FRAMES` and is marked [`TRUNCATED`].
    pub const MAX_FRAMES: usize = 512;
    /// Frames walked per program run (the verifier checks a bounded loop of
    /// this many steps); the walk goes on by tail call.
    pub const FRAMES_PER_RUN: u32 = 32;
    /// Tail calls one sample may take.
    pub const MAX_RUNS: u32 = MAX_FRAMES as u32 / FRAMES_PER_RUN;

    /// A `SAMPLE_PROCESSES` value bit: tell userspace of the process's
    /// children as they fork ([`super::process::CHILD`]), so a selection
    /// samples them from their start instead of from the next scan.
    pub const FOLLOW_CHILDREN: u32 = 1;

    /// The thread held the GIL when sampled.
    pub const HOLDS_GIL: u32 = 1;
    /// The stack was deeper than [`MAX_FRAMES`]: the outermost frames are
    /// missing.
    pub const TRUNCATED: u32 = 2;
    /// A frame could not be read part way up the chain (the thread changed
    /// it while we read): the outer frames are missing.
    pub const TORN: u32 = 4;

    /// A thread of a profiled process, keyed by its kernel thread id.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct ThreadState {
        /// Its process.
        pub tgid: u32,
        /// Padding, zero.
        pub _pad: u32,
        /// Address of its `PyThreadState`, or 0 for a thread the interpreter
        /// does not know.
        pub tstate: u64,
    }

    /// One walked frame.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct FrameRecord {
        /// The frame's code object (masked).
        pub code: u64,
        /// The 8 bytes at the frame's instruction field.
        pub instruction: u64,
    }

    /// The fixed part of a sample.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct SampleHeader {
        /// Process.
        pub tgid: u32,
        /// Thread.
        pub tid: u32,
        /// `HOLDS_GIL`, `TRUNCATED`, `TORN`.
        pub flags: u32,
        /// Frames recorded (innermost first).
        pub frames: u32,
        /// Frame to read next (walk state between tail calls).
        pub next: u64,
        /// Program runs so far for this sample (walk state).
        pub runs: u32,
        /// CPU the sample was taken on.
        pub cpu: u32,
        /// The process's [`super::process::PyProcess::code_epoch`] when
        /// sampled.
        pub code_epoch: u64,
        /// When the sample was taken: `CLOCK_MONOTONIC`, nanoseconds.
        pub time_ns: u64,
    }

    /// A sample as built in the kernel's scratch space; only the header and
    /// `header.frames` records are sent.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct Sample {
        /// Header.
        pub header: SampleHeader,
        /// Frames, innermost first.
        pub frames: [FrameRecord; MAX_FRAMES],
    }

    /// Bytes of a header.
    pub const HEADER_LEN: usize = core::mem::size_of::<SampleHeader>();
    /// Bytes of a frame record.
    pub const FRAME_LEN: usize = core::mem::size_of::<FrameRecord>();
}

/// Counting Python function starts (`pyprobe calls`).
///
/// One uprobe program runs at every site where a Python function starts (the
/// entry of `_PyEval_EvalFrameDefault` up to 3.10, the RESUME-family opcode
/// handlers from 3.11). It finds the starting frame as the process's
/// [`ProcessConfig`] says, reads the frame's code object, and adds one to the
/// per-CPU [`CallCounts`] of that code object: userspace reads aggregates,
/// never one event per call.
pub mod calls {
    /// Entries the per-code count map can hold.
    pub const MAX_CODES: u32 = 65536;

    /// The frame is the first argument of `_PyEval_EvalFrameDefault` (3.8).
    pub const FRAME_ARG0: u8 = 0;
    /// The frame is the second argument of `_PyEval_EvalFrameDefault`
    /// (3.9, 3.10).
    pub const FRAME_ARG1: u8 = 1;
    /// The frame is the current thread state's current frame (3.11+: the
    /// site is an opcode handler inside the eval loop whose frame register
    /// is not known).
    pub const FRAME_FROM_TSTATE: u8 = 2;
    /// The frame is in the callee-saved register
    /// [`ProcessConfig::frame_register`], where the eval loop keeps its
    /// `frame` local at every probed handler (3.11+, found from the code by
    /// userspace). The thread-state path is kept as a check, run the first
    /// time a code object is counted in a cache slot.
    pub const FRAME_REGISTER: u8 = 3;

    /// A frame starts when its `f_lasti` (int) is negative (3.8-3.10).
    pub const START_LASTI_NEGATIVE: u8 = 0;
    /// A frame starts when the instruction about to run is at or before
    /// `_co_firsttraceable` + 1 (the handler may have stored the RESUME's own
    /// position already): the code-unit index is
    /// `(ptr + instruction_bias - (code + code_adaptive)) / 2` (3.11+).
    pub const START_INDEX_FIRST_TRACEABLE: u8 = 1;

    /// Bytes read at once from a frame and from a code object: the fields
    /// the program needs from each lie in one window of this size, so each
    /// object costs one read of the target's memory.
    pub const WINDOW: u64 = 256;

    /// The call counter's part of a process it counts (beside its
    /// [`super::process::PyProcess`]), built by userspace from the process
    /// model (offsets are data; the program branches on the mode fields,
    /// never on version numbers).
    ///
    /// Fields named `*_at` are offsets inside the object's window, which
    /// starts `code_window` (or `cfunction_window`, `descr_window`) bytes
    /// into the object; each is 4-byte aligned and at most [`WINDOW`] - 8.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct ProcessConfig {
        /// Start of the code window in the code object.
        pub code_window: u64,
        /// Bytes of the code window.
        pub code_window_len: u64,
        /// `co_name` in the code window.
        pub code_name_at: u64,
        /// `co_firstlineno` (int) in the code window.
        pub code_firstlineno_at: u64,
        /// `_co_firsttraceable` (int, 3.11+) in the code window.
        pub code_firsttraceable_at: u64,
        /// `co_code_adaptive` offset in the code object (3.11+; an address
        /// computation, not a read).
        pub code_adaptive: u64,
        /// Start of the window read from a `builtin_function_or_method`
        /// (`PyCFunctionObject`) at a builtin call site.
        pub cfunction_window: u64,
        /// Bytes of that window.
        pub cfunction_window_len: u64,
        /// `m_ml` (the `PyMethodDef`) in the window.
        pub cfunction_ml_at: u64,
        /// `m_self` in the window.
        pub cfunction_self_at: u64,
        /// `m_module` in the window.
        pub cfunction_module_at: u64,
        /// Start of the window read from a `method_descriptor`
        /// (`PyMethodDescrObject`).
        pub descr_window: u64,
        /// Bytes of that window.
        pub descr_window_len: u64,
        /// `d_common.d_type` in the window.
        pub descr_type_at: u64,
        /// `d_method` (the `PyMethodDef`) in the window.
        pub descr_method_at: u64,
        /// One of `FRAME_*`.
        pub frame_mode: u8,
        /// One of `START_*`.
        pub start_mode: u8,
        /// One of `LATENCY_*`: whether (and how) calls are timed.
        pub latency: u8,
        /// [`FRAME_REGISTER`]: one of `REG_*`.
        pub frame_register: u8,
        /// 1 when `code_freed` watches this process, so that
        /// [`super::process::PyProcess::code_epoch`] can be trusted; 0 makes every call
        /// read its code object.
        pub epoch_watched: u8,
        /// 1 when `--filter` may put code objects of this process in the
        /// skip sets; 0 skips that lookup.
        pub filtering: u8,
        /// 1 when userspace wants to hear of the process's children as
        /// they are forked ([`super::process::CHILD`]): it counts them with
        /// probes of their own, so the kernel cannot set them up itself.
        pub follow_children: u8,
        /// Padding, zero.
        pub _pad: u8,
        /// The template index of the process's interpreter file, passed on
        /// in [`super::process::CodeEvent`]s so userspace knows how to read
        /// what they carry.
        pub template: u32,
        /// `co_qualname` (3.11+; `co_name` before) in the code window.
        pub code_qualname_at: u32,
        /// `co_filename` in the code window.
        pub code_filename_at: u32,
        /// Padding, zero.
        pub _pad2: u32,
    }

    /// Set in the first [`super::process::PyProcess::code_epoch`] of a process that
    /// the kernel configured from a template, whose low bits are the
    /// monotonic clock at that moment: a later owner of the same PID starts
    /// later than its predecessor, which freed fewer code objects than the
    /// nanoseconds it lived, so the two never share an epoch; and the bit
    /// keeps them apart from the epochs userspace writes (the clock alone).
    pub const KERNEL_EPOCH: u64 = 1 << 63;

    /// Templates the kernel can hold: one per interpreter file watched.
    pub const MAX_TEMPLATES: u32 = 256;

    /// Bits of a uprobe's cookie holding the probed instruction's link-time
    /// address; the template index sits above them.
    pub const COOKIE_VADDR_BITS: u32 = 48;

    /// The cookie of a probe on an interpreter file: the file's template
    /// index and the link-time address of the probed instruction, so that
    /// the program finds the file's template and, from the instruction
    /// pointer, the file's load bias in the process that hit it.
    pub const fn cookie(template: u32, vaddr: u64) -> u64 {
        ((template as u64) << COOKIE_VADDR_BITS) | (vaddr & ((1 << COOKIE_VADDR_BITS) - 1))
    }

    /// A process of one interpreter file as the kernel configures it at
    /// its first call when userspace has not ([`cookie`]): thread
    /// addresses are link-time ones, moved by the load bias.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Template {
        /// What every program needs.
        pub process: super::process::PyProcess,
        /// The counter's part.
        pub calls: ProcessConfig,
    }

    /// `rbx` (for [`ProcessConfig::frame_register`]).
    pub const REG_RBX: u8 = 0;
    /// `rbp`.
    pub const REG_RBP: u8 = 1;
    /// `r12`.
    pub const REG_R12: u8 = 2;
    /// `r13`.
    pub const REG_R13: u8 = 3;
    /// `r14`.
    pub const REG_R14: u8 = 4;
    /// `r15`.
    pub const REG_R15: u8 = 5;

    /// Calls are not timed.
    pub const LATENCY_OFF: u8 = 0;
    /// Calls are timed from their start to the return or yield that leaves
    /// the frame, matched by the frame's address (3.11+: exits are opcode
    /// handlers where the frame is still in the frame register, or still the
    /// thread's current frame).
    pub const LATENCY_BY_FRAME: u8 = 1;
    /// Calls are timed from the entry of `_PyEval_EvalFrameDefault` to its
    /// return, matched by the stack pointer (3.8-3.10: one C call per frame;
    /// the return lands 8 bytes above the entry's stack pointer).
    pub const LATENCY_BY_STACK: u8 = 2;

    /// Frames being timed at once (all processes); the least recently
    /// started are dropped first, which only frames that never return
    /// through a timed exit (exceptions on 3.11+) should be.
    pub const MAX_RUNNING: u32 = 32768;

    /// Code objects whose latency can be kept (at most; userspace may ask
    /// for fewer on hosts with many CPUs, the map being per CPU).
    pub const MAX_LATENCY_CODES: u32 = 4096;

    /// A frame being timed: its process and its address (or, for
    /// [`LATENCY_BY_STACK`], the stack pointer at the eval loop's entry).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct RunningKey {
        /// Process.
        pub tgid: u32,
        /// Padding, zero.
        pub _pad: u32,
        /// Frame address or stack pointer.
        pub at: u64,
    }

    /// When a timed frame started, and what it runs.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Running {
        /// `bpf_ktime_get_ns` at the start.
        pub started_ns: u64,
        /// The frame's code object.
        pub key: CodeKey,
    }

    /// Sub-buckets per power of two in a [`Histogram`]: each bucket is
    /// 1/8 of its octave wide, so a value known only by its bucket is off
    /// by at most 6.25% from the bucket's middle.
    pub const SUB_BUCKETS: u32 = 8;
    /// log2 of [`SUB_BUCKETS`].
    pub const SUB_BUCKET_BITS: u32 = 3;
    /// Buckets of a [`Histogram`]: up to 2^42 ns (73 minutes); longer
    /// calls land in the last one (the exact maximum is kept apart).
    pub const LATENCY_BUCKETS: usize = 320;

    /// The bucket of a duration: values below [`SUB_BUCKETS`] ns have a
    /// bucket each; above, octave `e` (2^e <= ns < 2^(e+1)) has
    /// [`SUB_BUCKETS`] equal buckets.
    #[inline(always)]
    pub fn latency_bucket(ns: u64) -> u32 {
        if ns < SUB_BUCKETS as u64 {
            return ns as u32;
        }
        // Position of the highest set bit, by halving (no loop, no clz:
        // the BPF instruction set has neither).
        let mut e = 0u32;
        let mut v = ns;
        if v >> 32 != 0 {
            v >>= 32;
            e += 32;
        }
        if v >> 16 != 0 {
            v >>= 16;
            e += 16;
        }
        if v >> 8 != 0 {
            v >>= 8;
            e += 8;
        }
        if v >> 4 != 0 {
            v >>= 4;
            e += 4;
        }
        if v >> 2 != 0 {
            v >>= 2;
            e += 2;
        }
        if v >> 1 != 0 {
            e += 1;
        }
        let sub = ((ns >> (e - SUB_BUCKET_BITS)) as u32) & (SUB_BUCKETS - 1);
        let bucket = (e - SUB_BUCKET_BITS + 1) * SUB_BUCKETS + sub;
        if bucket >= LATENCY_BUCKETS as u32 {
            LATENCY_BUCKETS as u32 - 1
        } else {
            bucket
        }
    }

    /// The durations bucket `b` holds: `lower..upper` ns.
    pub fn latency_bucket_range(b: u32) -> (u64, u64) {
        if b < SUB_BUCKETS {
            return (b as u64, b as u64 + 1);
        }
        let e = b / SUB_BUCKETS + SUB_BUCKET_BITS - 1;
        let sub = (b % SUB_BUCKETS) as u64;
        let width = 1u64 << (e - SUB_BUCKET_BITS);
        let lower = (1u64 << e) + sub * width;
        (lower, lower + width)
    }

    /// Durations of one code object's calls on one CPU.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Histogram {
        /// Calls per bucket (see [`latency_bucket`]).
        pub buckets: [u32; LATENCY_BUCKETS],
        /// Calls timed.
        pub count: u64,
        /// Sum of their durations, ns.
        pub total_ns: u64,
        /// Longest, ns.
        pub max_ns: u64,
    }

    impl Default for Histogram {
        fn default() -> Self {
            Self {
                buckets: [0; LATENCY_BUCKETS],
                count: 0,
                total_ns: 0,
                max_ns: 0,
            }
        }
    }

    /// Key of a count: a code object of a process. `name` and `firstlineno`
    /// are part of the key so that a code object freed and replaced by
    /// another at the same address starts a new count instead of adding to
    /// the old function's.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct CodeKey {
        /// Process.
        pub tgid: u32,
        /// `co_firstlineno`.
        pub firstlineno: u32,
        /// Address of the code object.
        pub code: u64,
        /// Address of its `co_name` string.
        pub name: u64,
    }

    /// Slots in the per-CPU count cache (a power of two).
    pub const CACHE_SLOTS: u32 = 4096;

    /// One slot of the per-CPU count cache: the program counts a code
    /// object in the slot its address picks (an array lookup, far cheaper
    /// than a hash lookup), and only when another code object already owns
    /// that slot in the per-CPU hash map instead. A slot with `key.code ==
    /// 0` is free. Userspace adds the two.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct CacheSlot {
        /// Owner of the slot.
        pub key: CodeKey,
        /// Its counts on this CPU.
        pub counts: CallCounts,
        /// [`ProcessConfig::code_epoch`] when the owner was last read from
        /// the code object.
        pub epoch: u64,
        /// The owner's `_co_firsttraceable` (3.11+), kept so that a call
        /// found in the slot needs no read of the code object.
        pub first_traceable: i32,
        /// Padding, zero.
        pub _pad: u32,
    }

    /// The cache slot of a code object: address bits above the allocator's
    /// 16-byte alignment, mixed with the process.
    #[inline(always)]
    pub fn cache_slot(tgid: u32, code: u64) -> u32 {
        let h = (code >> 4) ^ (code >> 17) ^ (tgid as u64).wrapping_mul(0x9e37);
        (h as u32) & (CACHE_SLOTS - 1)
    }

    /// Sets in the skip array.
    pub const SKIP_SETS: u32 = 1024;
    /// Code objects per set.
    pub const SKIP_WAYS: usize = 4;

    /// Code objects that `--filter` excludes, whose [`cache_slot`] modulo
    /// [`SKIP_SETS`] picks this set; free entries have `code == 0`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct SkipSet {
        /// The excluded code objects.
        pub keys: [CodeKey; SKIP_WAYS],
    }

    /// A builtin called as a `builtin_function_or_method` (`len`,
    /// `time.sleep`, a bound method of a C object).
    pub const BUILTIN_FUNCTION: u32 = 0;
    /// A builtin called through a `method_descriptor` (`list.append` called
    /// as `xs.append(v)`).
    pub const BUILTIN_METHOD: u32 = 1;

    /// Entries the builtin count map can hold.
    pub const MAX_BUILTINS: u32 = 16384;

    /// Key of a builtin's count.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct BuiltinKey {
        /// Process.
        pub tgid: u32,
        /// [`BUILTIN_FUNCTION`] or [`BUILTIN_METHOD`].
        pub kind: u32,
        /// Address of the `PyMethodDef` (static in the C module: it names
        /// the builtin and outlives its callers).
        pub method_def: u64,
        /// What qualifies the name: a function's `m_module` (the module's
        /// name, a `str`) or, when that is NULL, the type of its `m_self`
        /// (0 without one); a method descriptor's `d_type`.
        pub owner: u64,
    }

    /// Counts of one code object on one CPU.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct CallCounts {
        /// Frames that started (a call).
        pub starts: u64,
        /// Frames that resumed (a generator or coroutine continuing after
        /// `yield`/`await`).
        pub resumes: u64,
    }
}

/// Conditional log points (`pyprobe log`).
///
/// A hardware watchpoint (read/write) sits on the opcode byte of the probed
/// instruction, in the threads of the target. The interpreter reads that
/// byte exactly when it is about to run the instruction, so the perf-event
/// program `log_hit` runs then, and only then: code that never reaches the
/// instruction pays nothing. The program
/// 1. looks the address up in `LOG_WATCH` and drops writes (the byte
///    changed since the last hit: quickening, specialization,
///    instrumentation) and reads made from another code object's frame;
/// 2. applies the log point's rate limit and hit count;
/// 3. captures the values the log point's [`Program`] names, from the
///    frame's locals, following attribute, key and index steps;
/// 4. evaluates the simple part of the condition ([`Atom`]s) and drops the
///    hit when it is false;
/// 5. sends a [`Hit`] to userspace, which evaluates the full condition and
///    renders the message from the captured values.
pub mod logpoint {
    /// Log points at once (`--at`s).
    pub const MAX_LOGPOINTS: u32 = 64;
    /// Armed code objects at once, over every process (one set of
    /// [`LogState`] counters each).
    pub const MAX_ARMED: u32 = 4096;
    /// Distinct compiled [`Program`]s at once: armed code objects of the
    /// same log point with the same layout (the same file on the same
    /// interpreter, in any number of processes) share one.
    pub const MAX_PROGRAMS: u32 = 256;
    /// Values one log point captures.
    pub const MAX_CAPTURES: usize = 8;
    /// Steps after the local in one captured path (`a.b["k"][0]` is 3).
    pub const MAX_STEPS: usize = 4;
    /// Comparisons the kernel evaluates (joined by `and`).
    pub const MAX_ATOMS: usize = 4;
    /// Attribute names and string keys one log point uses.
    pub const MAX_NAMES: usize = 8;
    /// Longest attribute name or string key / constant compared in the kernel.
    pub const NAME_BYTES: usize = 32;
    /// Bytes of a string (or digits of an int) captured.
    pub const VALUE_BYTES: usize = 64;
    /// Dict entries scanned by a key or attribute lookup.
    pub const MAX_DICT_SCAN: u32 = 64;
    /// Frames recorded with a hit (`--stack`).
    pub const MAX_STACK: usize = 32;

    /// Step: instance attribute (`arg`: name index).
    pub const OP_ATTR: u32 = 1;
    /// Step: `[str]` on a dict (`arg`: name index).
    pub const OP_KEY_STR: u32 = 2;
    /// Step: `[int]` on a dict, list or tuple (`int_arg`).
    pub const OP_KEY_INT: u32 = 3;
    /// Step: `len()` of the value so far; always the last step.
    pub const OP_LEN: u32 = 4;

    /// Captured.
    pub const STATUS_OK: u8 = 0;
    /// The local is not set yet (unbound), or an attribute, key or index is
    /// not there.
    pub const STATUS_MISSING: u8 = 1;
    /// Memory could not be read.
    pub const STATUS_UNREADABLE: u8 = 2;
    /// The value is of a kind the kernel does not follow (an object without
    /// a plain `__dict__`, a dict beyond [`MAX_DICT_SCAN`], `len()` of an
    /// object without a length).
    pub const STATUS_UNSUPPORTED: u8 = 3;
    /// A path step was asked of a value of the wrong type (`.x` of an int,
    /// `["k"]` of a list).
    pub const STATUS_WRONG_TYPE: u8 = 4;

    /// `None`.
    pub const KIND_NONE: u8 = 0;
    /// `True` / `False` (`raw` 1 / 0).
    pub const KIND_BOOL: u8 = 1;
    /// An int: `len` digits of 30 bits in `bytes` (at most 16), `negative`
    /// set for a negative one; `raw` is its value when `len` ≤ 2.
    pub const KIND_INT: u8 = 2;
    /// A float: `raw` holds its bits.
    pub const KIND_FLOAT: u8 = 3;
    /// A str: `len` code points, `str_kind` bytes per code point (1, 2 or
    /// 4; 1 plus [`STR_ASCII`] for ASCII), the first bytes in `bytes`.
    pub const KIND_STR: u8 = 4;
    /// Any other object: `type_` and `addr` name it; `len` is its length
    /// for a list, tuple or dict.
    pub const KIND_OTHER: u8 = 5;
    /// Flag in `str_kind`: the str is ASCII.
    pub const STR_ASCII: u8 = 0x80;

    /// Comparison `==`.
    pub const CMP_EQ: u32 = 0;
    /// `!=`.
    pub const CMP_NE: u32 = 1;
    /// `<`.
    pub const CMP_LT: u32 = 2;
    /// `<=`.
    pub const CMP_LE: u32 = 3;
    /// `>`.
    pub const CMP_GT: u32 = 4;
    /// `>=`.
    pub const CMP_GE: u32 = 5;
    /// `is None`.
    pub const CMP_IS_NONE: u32 = 6;
    /// `is not None`.
    pub const CMP_IS_NOT_NONE: u32 = 7;

    /// Constant of an atom: an int (bools are 0 and 1).
    pub const CONST_INT: u32 = 0;
    /// Constant of an atom: an ASCII str of `str_len` bytes.
    pub const CONST_STR: u32 = 1;
    /// No constant (`is None`, `is not None`).
    pub const CONST_NONE: u32 = 2;
    /// Constant of an atom: a float (bits in `int`); an int constant that a
    /// float represents exactly also sets [`Atom::has_float`].
    pub const CONST_FLOAT: u32 = 3;

    /// Hit flag: the thread's stack is in `frames`.
    pub const HIT_STACK: u32 = 1;

    /// The log points' part of a process (beside its
    /// [`super::process::PyProcess`]; offsets are data).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct LogProcess {
        /// `f_localsplus` / `localsplus` in a frame.
        pub frame_localsplus: u64,
        /// 1 when ints use `lv_tag` (3.12+), 0 for a signed `ob_size`.
        pub long_tag: u64,
        /// `&_Py_NoneStruct`.
        pub none: u64,
        /// `&_Py_TrueStruct`.
        pub true_: u64,
        /// `&_Py_FalseStruct`.
        pub false_: u64,
        /// `&PyLong_Type`.
        pub type_int: u64,
        /// `&PyFloat_Type`.
        pub type_float: u64,
        /// `&PyUnicode_Type`.
        pub type_str: u64,
        /// `&PyDict_Type`.
        pub type_dict: u64,
        /// `&PyList_Type`.
        pub type_list: u64,
        /// `&PyTuple_Type`.
        pub type_tuple: u64,
        /// `sizeof(PyASCIIObject)`.
        pub unicode_ascii_data: u64,
        /// `sizeof(PyCompactUnicodeObject)`.
        pub unicode_compact_data: u64,
        /// `PyTupleObject.ob_item`.
        pub tuple_items: u64,
        /// 1 for the 3.8-3.10 dict keys layout (`dk_size`), 0 for 3.11+.
        pub dict_sized: u64,
        /// Where a split dict's values array starts in `PyDictValues`
        /// (3.11+), 0 up to 3.10.
        pub dict_values_items: u64,
        /// `InstanceDictModel` as a number: 0 `tp_dictoffset`, 1 values or
        /// dict (3.11), 2 tagged dict-or-values (3.12), 3 inline values
        /// (3.13+).
        pub instance_model: u64,
        /// `PyHeapTypeObject.ht_cached_keys`.
        pub heaptype_cached_keys: u64,
        /// The code of `_PyEval_EvalFrameDefault` in the process, as up to
        /// [`EVAL_RANGES`] `[start, end)` pairs (its body and the parts the
        /// compiler split off; unused pairs are 0, 0): only reads made by
        /// the eval loop's code are runs of the instruction (not
        /// `_PyCode_Quicken`, not `dis`).
        pub eval_code: [u64; 2 * EVAL_RANGES],
        /// The callee-saved register (`calls::REG_*`) the eval loop keeps
        /// its `frame` in, or [`NO_REGISTER`]: the frame reading the
        /// instruction even before the thread state names it (3.14 reads a
        /// callee's first instruction before storing its frame there).
        pub frame_register: u64,
        /// `PyThreadState.datastack_top` (3.13+), or 0.
        pub tstate_datastack_top: u64,
    }

    /// No frame register.
    pub const NO_REGISTER: u64 = 0xff;

    /// Code ranges of the eval loop the hit program checks.
    pub const EVAL_RANGES: usize = 4;

    /// Key of [`Watch`]: a watched address in a process.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
    pub struct WatchKey {
        /// Process.
        pub tgid: u32,
        /// Padding, zero.
        pub _pad: u32,
        /// Address of the watched byte.
        pub addr: u64,
    }

    /// A watched instruction (the oparg byte of its code unit: every run
    /// reads it, and an instruction reading or rewriting its own opcode
    /// does not).
    ///
    /// The program never reads the unit itself: a read from the kernel
    /// would set off the watchpoint again (a second debug trap, about 12 µs
    /// on a VM). Whole-unit writes (3.11 quickening) come from outside the
    /// eval loop and are told apart by where they come from.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Watch {
        /// The armed code object (index into `LOG_STATE`; hits carry it).
        pub logpoint: u32,
        /// Its program (index into `LOG_PROGRAMS`).
        pub program: u32,
        /// The code object the instruction belongs to: a hit from a frame
        /// of another code object is not a run of this instruction.
        pub code: u64,
        /// What the frame's instruction field (`prev_instr`, `instr_ptr`)
        /// holds once this instruction has started in it, or 0 for no such
        /// test (3.8-3.10, and a 3.13+ function's unit 0, where a new frame
        /// starts). The eval loop reads the next opcode before its handler
        /// stores the field, so a run's dispatch read finds the field still
        /// naming the instruction before; a read that finds it naming this
        /// one is the instruction reading itself again within its run (a
        /// specializing instruction re-dispatching after rewriting itself,
        /// 3.11+).
        pub started: u64,
        /// Bytes of a frame of the code (3.13+), or 0: a function's first
        /// instruction may be read while the thread state still names the
        /// caller (3.14); the callee is then the newest frame on the
        /// thread's data stack, this many bytes below its top.
        pub frame_bytes: u64,
        /// The log point (index into `LOG_LIMITS`): its rate and count
        /// limits hold over every process it is armed in.
        pub point: u32,
        /// Padding, zero.
        pub _pad: u32,
    }

    /// One step of a captured path.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Step {
        /// `OP_*`, 0 for no step.
        pub op: u32,
        /// Name index for [`OP_ATTR`] and [`OP_KEY_STR`].
        pub arg: u32,
        /// Key or index for [`OP_KEY_INT`].
        pub int_arg: i64,
    }

    /// A captured path: a local, then steps.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Capture {
        /// Slot in the frame's locals (`localsplus`).
        pub local: u32,
        /// Steps used.
        pub nsteps: u32,
        /// Steps.
        pub steps: [Step; MAX_STEPS],
    }

    /// A name (attribute or str key) or str constant, ASCII.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Name {
        /// Bytes used.
        pub len: u32,
        /// Padding, zero.
        pub _pad: u32,
        /// The bytes, zero-padded.
        pub bytes: [u8; NAME_BYTES],
    }

    /// A comparison of a captured value with a constant, evaluated in the
    /// kernel. It only drops hits Python would find false: when the value
    /// is of a kind it cannot compare exactly (a float, a big int, a
    /// non-ASCII str), it lets the hit through to userspace.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Atom {
        /// Index of the captured value.
        pub capture: u32,
        /// `CMP_*`.
        pub cmp: u32,
        /// `CONST_*`.
        pub kind: u32,
        /// 1 when `float` holds the constant as a float, exactly (to
        /// compare a captured float with it).
        pub has_float: u32,
        /// The int constant.
        pub int: i64,
        /// The constant's float bits.
        pub float: u64,
        /// The str constant.
        pub str: Name,
    }

    /// What one log point captures and tests.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Program {
        /// Captures used.
        pub ncaptures: u32,
        /// Atoms used (all must hold).
        pub natoms: u32,
        /// Hits sent per second at most (0: no limit).
        pub rate: u32,
        /// Record the stack with each hit.
        pub stack: u32,
        /// Hits sent in all, at most (0: no limit).
        pub max_hits: u64,
        /// Captured paths.
        pub captures: [Capture; MAX_CAPTURES],
        /// Kernel-side condition.
        pub atoms: [Atom; MAX_ATOMS],
        /// Names used by steps.
        pub names: [Name; MAX_NAMES],
    }

    /// Counters and rate-limit state of one log point, updated by the
    /// program.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct LogState {
        /// Watchpoint hits at this log point's address (all kinds).
        pub hits: u64,
        /// Of which accesses made outside the eval loop (specialization,
        /// quickening and instrumentation writes; `dis`, `co_code`).
        pub foreign: u64,
        /// Of which reads while the running frame was of another code
        /// object.
        pub other_frame: u64,
        /// Of which second accesses of one run (3.12's separate opcode and
        /// oparg loads; 3.13+ `RESUME` rewriting itself).
        pub repeats: u64,
        /// Runs of the instruction dropped by the kernel condition.
        pub condition_false: u64,
        /// Runs dropped by the rate limit.
        pub rate_limited: u64,
        /// Runs dropped after `max_hits` were sent.
        pub over_count: u64,
        /// Runs dropped because the ring buffer was full.
        pub lost: u64,
        /// Hits sent.
        pub sent: u64,
    }

    /// Rate and count limits of one log point, over every process and
    /// code object it is armed in; updated by the program.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct LogLimit {
        /// Hits sent.
        pub sent: u64,
        /// Start of the current one-second rate window (ns).
        pub window_start: u64,
        /// Hits sent in the current window.
        pub window_sent: u64,
    }

    /// One captured value.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Value {
        /// `STATUS_*`.
        pub status: u8,
        /// `KIND_*`.
        pub kind: u8,
        /// For a str: bytes per code point, plus [`STR_ASCII`].
        pub str_kind: u8,
        /// For an int: 1 when negative.
        pub negative: u8,
        /// Str length, int digit count, container length.
        pub len: u32,
        /// The object's address.
        pub addr: u64,
        /// Its type's address.
        pub type_: u64,
        /// Small int value, bool 0/1, float bits.
        pub raw: u64,
        /// Str bytes or int digits.
        pub bytes: [u8; VALUE_BYTES],
    }

    impl Default for Value {
        fn default() -> Self {
            Value {
                status: STATUS_UNREADABLE,
                kind: 0,
                str_kind: 0,
                negative: 0,
                len: 0,
                addr: 0,
                type_: 0,
                raw: 0,
                bytes: [0; VALUE_BYTES],
            }
        }
    }

    /// A frame of a hit's stack.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct StackFrame {
        /// Code object (masked).
        pub code: u64,
        /// The 8 bytes at the frame's instruction field.
        pub instruction: u64,
    }

    /// One run of a probed instruction whose condition held, as sent.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct Hit {
        /// Process.
        pub tgid: u32,
        /// Thread.
        pub tid: u32,
        /// The armed code object ([`Watch::logpoint`]).
        pub logpoint: u32,
        /// `HIT_*`.
        pub flags: u32,
        /// `bpf_ktime_get_ns` at the hit.
        pub time_ns: u64,
        /// The frame running the instruction.
        pub frame: u64,
        /// Frames in `frames` (with [`HIT_STACK`]).
        pub nframes: u32,
        /// Captured values (as many as the program's captures).
        pub nvalues: u32,
        /// Values.
        pub values: [Value; MAX_CAPTURES],
        /// The stack, innermost first (with [`HIT_STACK`]).
        pub frames: [StackFrame; MAX_STACK],
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` structs of integers without implicit
    // padding (checked by the size assertions below).
    unsafe impl aya::Pod for super::calls::ProcessConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::process::ProcessEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::process::CodeEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::process::BuiltinEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::CodeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::CallCounts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::CacheSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::SkipSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::BuiltinKey {}

    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::RunningKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::Running {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::Histogram {}

    // SAFETY: as above.
    unsafe impl aya::Pod for super::process::PyProcess {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::Template {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::thread::ThreadFrame {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::sample::ThreadState {}

    // SAFETY: as above.
    unsafe impl aya::Pod for super::logpoint::LogProcess {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::logpoint::WatchKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::logpoint::Watch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::logpoint::Program {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::logpoint::LogState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::logpoint::LogLimit {}

    const _: () = assert!(core::mem::size_of::<super::logpoint::LogProcess>() == 28 * 8);
    const _: () = assert!(core::mem::size_of::<super::logpoint::Watch>() == 40);
    const _: () = assert!(core::mem::size_of::<super::logpoint::Step>() == 16);
    const _: () = assert!(core::mem::size_of::<super::logpoint::Capture>() == 8 + 4 * 16);
    const _: () = assert!(core::mem::size_of::<super::logpoint::Name>() == 40);
    const _: () = assert!(core::mem::size_of::<super::logpoint::Atom>() == 32 + 40);
    const _: () = assert!(core::mem::size_of::<super::logpoint::Value>() == 32 + 64);
    const _: () = assert!(core::mem::size_of::<super::logpoint::Hit>() == 40 + 8 * 96 + 32 * 16);
    const _: () = assert!(core::mem::size_of::<super::process::PyProcess>() == 15 * 8);
    const _: () = assert!(core::mem::size_of::<super::thread::ThreadFrame>() == 5 * 8);
    const _: () = assert!(core::mem::size_of::<super::sample::ThreadState>() == 16);
    const _: () = assert!(core::mem::size_of::<super::sample::SampleHeader>() == 48);
    const _: () = assert!(core::mem::size_of::<super::calls::ProcessConfig>() == 15 * 8 + 8 + 16);
    const _: () = assert!(core::mem::size_of::<super::process::ProcessEvent>() == 16);
    const _: () = assert!(
        core::mem::size_of::<super::process::CodeEvent>()
            == 8 + 24 + 16 + 2 * super::process::STR_CAPTURE
    );
    const _: () = assert!(
        core::mem::size_of::<super::process::BuiltinEvent>()
            == 8 + 24 + 32 + 8 + super::process::CSTR_CAPTURE + super::process::STR_CAPTURE
    );
    const _: () = assert!(core::mem::size_of::<super::calls::Running>() == 32);
    const _: () = assert!(
        core::mem::size_of::<super::calls::Histogram>() == super::calls::LATENCY_BUCKETS * 4 + 24
    );
    const _: () = assert!(core::mem::size_of::<super::calls::CodeKey>() == 24);
    const _: () = assert!(core::mem::size_of::<super::calls::CallCounts>() == 16);
    const _: () = assert!(core::mem::size_of::<super::calls::CacheSlot>() == 56);
}

/// `PyDictKeysObject` (`Objects/dict-common.h` up to 3.10,
/// `Include/internal/pycore_dict.h` from 3.11): where a dict's entries are.
/// One description for the kernel's dict scan (`log_hit`) and every
/// userspace reader, which read the first [`HEADER`](dict_keys::HEADER)
/// bytes of the keys object as five words and ask [`entries`](dict_keys::entries).
pub mod dict_keys {
    /// Bytes of the keys object read: every field either layout needs.
    pub const HEADER: usize = 40;
    /// `dk_size` (3.8-3.10): slots of the index array.
    pub const SIZED_SIZE: usize = 8;
    /// `dk_nentries` (3.8-3.10).
    pub const SIZED_NENTRIES: usize = 32;
    /// `dk_indices` (3.8-3.10).
    pub const SIZED_INDICES: u64 = 40;
    /// `dk_log2_size` (3.11+).
    pub const LOG2_SIZE: usize = 8;
    /// `dk_log2_index_bytes` (3.11+).
    pub const LOG2_INDEX_BYTES: usize = 9;
    /// `dk_kind` (3.11+): 0 general, 1 unicode, 2 split.
    pub const KIND: usize = 10;
    /// `dk_nentries` (3.11+).
    pub const LOG2_NENTRIES: usize = 24;
    /// `dk_indices` (3.11+).
    pub const LOG2_INDICES: u64 = 32;
    /// `DICT_KEYS_GENERAL`: entries hold the key's hash.
    pub const KIND_GENERAL: u8 = 0;
    /// `DICT_KEYS_SPLIT`: the values are in the dict's `ma_values`.
    pub const KIND_SPLIT: u8 = 2;

    /// Where the entries of a keys object are.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Entries {
        /// `dk_nentries`: entries used so far (deleted ones included).
        pub count: u64,
        /// Address of the first entry.
        pub start: u64,
        /// Bytes of one entry: 24 with the hash, 16 without (3.11+
        /// unicode-only keys).
        pub size: u64,
        /// Offset of the key in an entry (the value follows it).
        pub key_at: u64,
    }

    /// Bytes of one slot of a 3.8-3.10 index array of `size` slots.
    #[inline(always)]
    pub fn index_width(size: u64) -> u64 {
        if size <= 0xff {
            1
        } else if size <= 0xffff {
            2
        } else if size <= 0xffff_ffff {
            4
        } else {
            8
        }
    }

    /// `dk_log2_index_bytes` (3.11+) from the header words.
    #[inline(always)]
    pub fn log2_index_bytes(head: &[u64; 5]) -> u8 {
        (head[1] >> 8) as u8
    }

    /// Where the entries of the keys object at `keys` are, from its first
    /// [`HEADER`] bytes as five little-endian words; `sized` for the
    /// 3.8-3.10 layout.
    #[inline(always)]
    pub fn entries(sized: bool, keys: u64, head: &[u64; 5]) -> Entries {
        if sized {
            let size = head[SIZED_SIZE / 8];
            Entries {
                count: head[SIZED_NENTRIES / 8],
                start: keys
                    .wrapping_add(SIZED_INDICES)
                    .wrapping_add(size.wrapping_mul(index_width(size))),
                size: 24,
                key_at: 8,
            }
        } else {
            let shift = u64::from(log2_index_bytes(head) & 63);
            let general = (head[1] >> (8 * (KIND - 8))) as u8 == KIND_GENERAL;
            Entries {
                count: head[LOG2_NENTRIES / 8],
                start: keys.wrapping_add(LOG2_INDICES).wrapping_add(1u64 << shift),
                size: if general { 24 } else { 16 },
                key_at: if general { 8 } else { 0 },
            }
        }
    }
}
