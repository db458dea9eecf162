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
    /// An eval entry could not be counted because the per-process map was full.
    pub const EVAL_MAP_FULL: u32 = 0;
    /// A function start could not be counted because the per-code map was
    /// full.
    pub const CALLS_MAP_FULL: u32 = 1;
    /// A function start in a process with no configuration (a process
    /// pyprobe has not set up yet, e.g. just started under `--all`).
    pub const CALLS_NO_CONFIG: u32 = 2;
    /// A function start whose frame or code object could not be read.
    pub const CALLS_UNREADABLE: u32 = 3;
    /// Number of counters in the `STATS` array.
    pub const COUNT: u32 = 4;
}

/// Names of the maps and programs in the eBPF object, shared so a rename on one
/// side cannot silently break the other.
pub mod names {
    /// Uprobe program counting entries into `_PyEval_EvalFrameDefault`.
    pub const PROG_EVAL_ENTRY: &str = "eval_entry";
    /// Per-CPU hash map: tgid (`u32`) -> entries counted on this CPU (`u64`).
    pub const MAP_EVAL_ENTRIES: &str = "EVAL_ENTRIES";
    /// Per-CPU array of `u64` error counters, indexed by [`super::stats`].
    pub const MAP_STATS: &str = "STATS";
    /// Uprobe program counting Python function starts per code object.
    pub const PROG_CALL_START: &str = "call_start";
    /// Uprobe program counting generator resumptions by `throw()`/`close()`
    /// at the entry of `_PyEval_EvalFrameDefault` (3.11+).
    pub const PROG_CALL_THROW: &str = "call_throw";
    /// Empty uprobe program, for measuring the cost of the trap alone.
    pub const PROG_CALL_EMPTY: &str = "call_empty";
    /// Hash map: tgid (`u32`) -> [`super::calls::ProcessConfig`].
    pub const MAP_CALL_CONFIG: &str = "CALL_CONFIG";
    /// Per-CPU hash map: [`super::calls::CodeKey`] ->
    /// [`super::calls::CallCounts`].
    pub const MAP_CALL_COUNTS: &str = "CALL_COUNTS";
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
    /// site is an opcode handler inside the eval loop, where registers hold
    /// nothing known).
    pub const FRAME_FROM_TSTATE: u8 = 2;

    /// The running thread's state is `*(runtime + runtime_tstate_current)`
    /// (3.11: `_PyRuntime.gilstate.tstate_current`).
    pub const TSTATE_RUNTIME_CURRENT: u8 = 0;
    /// The running thread's state is the GIL's last holder: the thread
    /// running bytecode holds the GIL, and took it by writing itself there
    /// (3.12+: `interp->ceval.gil->last_holder` of the main interpreter).
    pub const TSTATE_GIL_HOLDER: u8 = 1;

    /// A frame starts when its `f_lasti` (int) is negative (3.8-3.10).
    pub const START_LASTI_NEGATIVE: u8 = 0;
    /// A frame starts when the instruction about to run is at or before
    /// `_co_firsttraceable` + 1 (the handler may have stored the RESUME's own
    /// position already): the code-unit index is
    /// `(ptr + instruction_bias - (code + code_adaptive)) / 2` (3.11+).
    pub const START_INDEX_FIRST_TRACEABLE: u8 = 1;

    /// What the program needs to know about one process, built by userspace
    /// from the process model (offsets are data; the program branches on the
    /// mode fields, never on version numbers).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct ProcessConfig {
        /// Runtime address of `_PyRuntime`.
        pub runtime: u64,
        /// `_PyRuntime.gilstate.tstate_current` offset ([`TSTATE_RUNTIME_CURRENT`]).
        pub runtime_tstate_current: u64,
        /// `_PyRuntime.interpreters.head` offset ([`TSTATE_GIL_HOLDER`]).
        pub runtime_interpreters_head: u64,
        /// `PyInterpreterState.ceval.gil` (pointer) offset.
        pub interp_gil: u64,
        /// `last_holder` offset in the GIL structure.
        pub gil_last_holder: u64,
        /// Offset of the current frame (or of `cframe`) in the thread state.
        pub tstate_frame: u64,
        /// `_PyCFrame.current_frame` offset, or `u64::MAX` when
        /// `tstate_frame` points at the frame directly.
        pub cframe_current_frame: u64,
        /// `f_code` / `f_executable` offset in the frame.
        pub frame_code: u64,
        /// `f_lasti` / `prev_instr` / `instr_ptr` offset in the frame.
        pub frame_instruction: u64,
        /// Mask applied to the frame's code word (`_PyStackRef` in 3.14).
        pub code_mask: u64,
        /// `co_code_adaptive` offset (3.11+).
        pub code_adaptive: u64,
        /// `_co_firsttraceable` offset (3.11+, int).
        pub code_firsttraceable: u64,
        /// `co_firstlineno` offset (int).
        pub code_firstlineno: u64,
        /// `co_name` offset.
        pub code_name: u64,
        /// Added to the instruction pointer before computing its index: 2
        /// when it points at the previous code unit (`prev_instr`), else 0.
        pub instruction_bias: u64,
        /// One of `FRAME_*`.
        pub frame_mode: u8,
        /// One of `TSTATE_*`.
        pub tstate_mode: u8,
        /// One of `START_*`.
        pub start_mode: u8,
        /// Padding, zero.
        pub _pad: [u8; 5],
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

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` structs of integers without implicit
    // padding (checked by the size assertions below).
    unsafe impl aya::Pod for super::calls::ProcessConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::CodeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::calls::CallCounts {}

    const _: () = assert!(core::mem::size_of::<super::calls::ProcessConfig>() == 15 * 8 + 8);
    const _: () = assert!(core::mem::size_of::<super::calls::CodeKey>() == 24);
    const _: () = assert!(core::mem::size_of::<super::calls::CallCounts>() == 16);
}
