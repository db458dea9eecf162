//! Per-version knowledge of CPython's internals, in one place, as data.
//!
//! [`Offsets`] holds every field offset the reader (and later the BPF
//! programs) need, named after the CPython field, plus [`Layout`] flags for
//! behaviour that is not an offset. Code branches on those flags, never on
//! version numbers.
//!
//! Sources, in order of preference:
//! 1. `_Py_DebugOffsets` published by CPython 3.13+ in the target itself
//!    ([`from_debug_offsets`]);
//! 2. the built-in tables below ([`builtin`]), measured on CPython builds and
//!    checked against DWARF by the tests (`python::offsets::tests` and
//!    `tests/tests/offsets.rs`).

use super::version::PythonVersion;

/// How a thread state reaches its current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FrameLink {
    /// `tstate->frame` / `tstate->current_frame` at this offset.
    Direct(u64),
    /// `tstate->cframe` (pointer at `cframe`), then `->current_frame` at
    /// `current_frame` (3.11, 3.12).
    ViaCFrame {
        /// Offset of `cframe` in the thread state.
        cframe: u64,
        /// Offset of `current_frame` in `_PyCFrame`.
        current_frame: u64,
    },
}

/// Where the GIL's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum GilLocation {
    /// Inside `_PyRuntime` (`ceval.gil`, up to 3.11): absolute offsets of
    /// `last_holder` and `locked` from `_PyRuntime`.
    Runtime {
        /// `_PyRuntime.ceval.gil.last_holder`.
        last_holder: u64,
        /// `_PyRuntime.ceval.gil.locked`.
        locked: u64,
    },
    /// Behind a pointer in the interpreter state (`interp->ceval.gil`, 3.12+).
    InterpPointer {
        /// Offset of the `gil` pointer in the interpreter state.
        pointer: u64,
        /// `last_holder` in `struct _gil_runtime_state`.
        last_holder: u64,
        /// `locked` in `struct _gil_runtime_state`.
        locked: u64,
    },
}

/// What a frame object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameModel {
    /// `PyFrameObject` chain through `f_back` (3.8-3.10).
    FrameObject,
    /// `_PyInterpreterFrame` chain through `previous` (3.11+).
    Interpreter,
}

/// How the current instruction is recorded in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstructionModel {
    /// `f_lasti` (int) in bytes (3.8, 3.9).
    LastiBytes,
    /// `f_lasti` (int) in code units (3.10).
    LastiUnits,
    /// `prev_instr` pointer to the last executed code unit (3.11, 3.12);
    /// a new frame starts one unit before the code.
    PrevInstr,
    /// `instr_ptr` pointer to the current code unit (3.13+).
    InstrPtr,
}

/// Which frames of a 3.11+ chain are not Python code and must be skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryFrames {
    /// No entry frames (3.8-3.11).
    None,
    /// Skip frames whose `owner` is at least this value (3.12+: owner 3 is
    /// `FRAME_OWNED_BY_CSTACK` in 3.12-3.13 and `..._INTERPRETER` in 3.14).
    OwnerAtLeast(u8),
}

/// How `PyLongObject` stores its sign and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongModel {
    /// Signed `ob_size`: sign times digit count (up to 3.11).
    ObSize,
    /// `lv_tag`: `ndigits << 3 | sign` with sign 0 positive, 1 zero, 2 negative (3.12+).
    LvTag,
}

/// Layout of dict keys objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DictKeysModel {
    /// `dk_size` (Py_ssize_t at 8), `dk_nentries` at 32, indices at 40,
    /// 24-byte entries (3.8-3.10).
    Sized,
    /// `dk_log2_size` at 8, `dk_log2_index_bytes` at 9, `dk_kind` at 10,
    /// `dk_nentries` at 24, indices at 32; unicode-keyed entries are 16
    /// bytes (3.11+).
    Log2,
}

/// Where an instance keeps its attributes (objects of classes written in
/// Python).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceDictModel {
    /// A `__dict__` pointer at the type's `tp_dictoffset` (3.8-3.10); the
    /// dict is often split (shared keys, `ma_values` array).
    TypeOffset,
    /// `Py_TPFLAGS_MANAGED_DICT` (3.11): a values array pointer at
    /// `obj - 32` (keys in the type's `ht_cached_keys`), else a dict at
    /// `obj - 24`.
    ValuesOrDict,
    /// `_PyDictOrValues` at `obj - 24` (3.12): a values pointer tagged with
    /// bit 0, or a dict.
    TaggedDictOrValues,
    /// `Py_TPFLAGS_INLINE_VALUES` (3.13+): values right after the object
    /// (`tp_basicsize`), valid while their `valid` byte is set; a
    /// materialized dict pointer at `obj - 24` wins.
    InlineValues,
}

/// Opcode numbers of the instructions that start a Python function (3.11+):
/// where `start_sites` attaches, in the computed-goto dispatch table.
/// Names are CPython's opcode names; verified against each build's `opcode`
/// module by `interp_binary::start_sites`' tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumeOpcodes {
    /// `RESUME`: the first instruction of every function (and of each
    /// generator resumption).
    pub resume: u8,
    /// `RESUME_QUICK` (3.11 only): what `RESUME` becomes once the code is
    /// quickened.
    pub quick: Option<u8>,
    /// `RESUME_CHECK` (3.13+): the specialized `RESUME`.
    pub check: Option<u8>,
    /// `INSTRUMENTED_RESUME` (3.12+): replaces `RESUME` only while
    /// `sys.monitoring` or `sys.settrace` is active.
    pub instrumented: Option<u8>,
}

impl ResumeOpcodes {
    /// `(opcode name, number)` of every member, `RESUME` first.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, u8)> + use<> {
        [
            ("RESUME", Some(self.resume)),
            ("RESUME_QUICK", self.quick),
            ("RESUME_CHECK", self.check),
            ("INSTRUMENTED_RESUME", self.instrumented),
        ]
        .into_iter()
        .filter_map(|(name, opcode)| Some((name, opcode?)))
    }
}

/// The opcodes that leave a frame by returning or yielding (3.11+): where
/// `pyprobe calls --latency` ends a call's timing. A frame left by an
/// exception runs none of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitOpcodes {
    /// `RETURN_VALUE`.
    pub return_value: u8,
    /// `RETURN_CONST` (3.12, 3.13).
    pub return_const: Option<u8>,
    /// `YIELD_VALUE`.
    pub yield_value: u8,
    /// `INSTRUMENTED_RETURN_VALUE` (3.12+): replaces `RETURN_VALUE` while
    /// `sys.monitoring` or `sys.settrace` is active.
    pub instrumented_return_value: Option<u8>,
    /// `INSTRUMENTED_RETURN_CONST` (3.12, 3.13).
    pub instrumented_return_const: Option<u8>,
    /// `INSTRUMENTED_YIELD_VALUE` (3.12+).
    pub instrumented_yield_value: Option<u8>,
}

impl ExitOpcodes {
    /// `(opcode name, number)` of every member.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, u8)> + use<> {
        [
            ("RETURN_VALUE", Some(self.return_value)),
            ("RETURN_CONST", self.return_const),
            ("YIELD_VALUE", Some(self.yield_value)),
            ("INSTRUMENTED_RETURN_VALUE", self.instrumented_return_value),
            ("INSTRUMENTED_RETURN_CONST", self.instrumented_return_const),
            ("INSTRUMENTED_YIELD_VALUE", self.instrumented_yield_value),
        ]
        .into_iter()
        .filter_map(|(name, opcode)| Some((name, opcode?)))
    }
}

/// Behaviour flags that are not plain offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Frame object kind.
    pub frame_model: FrameModel,
    /// How the current instruction is recorded.
    pub instruction: InstructionModel,
    /// Which frames to skip.
    pub entry_frames: EntryFrames,
    /// Int representation.
    pub long: LongModel,
    /// Dict keys layout.
    pub dict_keys: DictKeysModel,
    /// Where instances keep their attributes.
    pub instance_dict: InstanceDictModel,
    /// Mask to apply to `_PyStackRef` words (frame code, locals) to get a
    /// pointer: `!0` before 3.14, `!3` from 3.14.
    pub stackref_mask: u64,
    /// Whether the line table is `co_lnotab` (≤3.9), the 3.10 table, or the
    /// 3.11+ location table.
    pub line_table: super::linetable::LineTableFormat,
    /// The RESUME-family opcodes (3.11+); `None` for 3.8-3.10, where every
    /// function start enters `_PyEval_EvalFrameDefault`.
    pub resume_opcodes: Option<ResumeOpcodes>,
    /// The opcodes that return or yield (3.11+); `None` for 3.8-3.10, where
    /// every frame leaves by returning from `_PyEval_EvalFrameDefault`.
    pub exit_opcodes: Option<ExitOpcodes>,
}

/// Field offsets, named after CPython's fields. `None` where a version does
/// not have the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Offsets {
    /// `_PyRuntime.interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `_PyRuntime.gilstate.tstate_current` (up to 3.11).
    pub runtime_tstate_current: Option<u64>,
    /// Where the GIL is.
    pub gil: GilLocation,

    /// `PyInterpreterState.next`.
    pub interp_next: u64,
    /// `PyInterpreterState.tstate_head` / `threads.head`.
    pub interp_threads_head: u64,

    /// `PyThreadState.next`.
    pub tstate_next: u64,
    /// `PyThreadState.interp`.
    pub tstate_interp: u64,
    /// `PyThreadState.thread_id` (`pthread_self()`).
    pub tstate_thread_id: u64,
    /// `PyThreadState.native_thread_id` (kernel TID, 3.11+).
    pub tstate_native_thread_id: Option<u64>,
    /// How to reach the current frame.
    pub tstate_frame: FrameLink,

    /// `f_back` / `previous`.
    pub frame_previous: u64,
    /// `f_code` / `f_executable`.
    pub frame_code: u64,
    /// `f_lasti` / `prev_instr` / `instr_ptr`.
    pub frame_instruction: u64,
    /// `f_localsplus` / `localsplus`.
    pub frame_localsplus: u64,
    /// `owner` of an interpreter frame (3.11+).
    pub frame_owner: Option<u64>,

    /// `co_argcount`.
    pub code_argcount: u64,
    /// `co_flags`.
    pub code_flags: u64,
    /// `co_firstlineno`.
    pub code_firstlineno: u64,
    /// `co_nlocals`.
    pub code_nlocals: u64,
    /// `co_nlocalsplus` (3.11+).
    pub code_nlocalsplus: Option<u64>,
    /// `co_code` (a bytes object, up to 3.10).
    pub code_code: Option<u64>,
    /// `co_code_adaptive` (inline bytecode, 3.11+).
    pub code_code_adaptive: Option<u64>,
    /// `co_varnames` (≤3.10) / `co_localsplusnames` (3.11+).
    pub code_varnames: u64,
    /// `co_localspluskinds` (3.11+).
    pub code_localspluskinds: Option<u64>,
    /// `co_filename`.
    pub code_filename: u64,
    /// `co_name`.
    pub code_name: u64,
    /// `co_qualname` (3.11+).
    pub code_qualname: Option<u64>,
    /// `co_lnotab` (≤3.9) / `co_linetable` (3.10+).
    pub code_linetable: u64,
    /// `_co_firsttraceable` (3.11+).
    pub code_firsttraceable: Option<u64>,

    /// `PyTupleObject.ob_item`.
    pub tuple_items: u64,
    /// `sizeof(PyASCIIObject)`: where compact ASCII data starts.
    pub unicode_ascii_data: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where compact non-ASCII data starts
    /// (and where a legacy string keeps its data pointer).
    pub unicode_compact_data: u64,

    /// `PyInterpreterState.sysdict`: the `sys` module's dict.
    pub interp_sysdict: u64,
    /// `PyInterpreterState.builtins`: the `builtins` module's dict.
    pub interp_builtins: u64,
    /// Where the interpreter keeps the per-interpreter state of static
    /// builtin types (3.12+), whose `tp_dict` is then NULL:
    /// `PyInterpreterState.types.builtins` (3.12, an array of
    /// `static_builtin_state`) or `types.builtins.initialized` (3.13+, of
    /// `managed_static_type_state`). A type's entry is number
    /// `tp_subclasses - 1`, and starts with a pointer to the type.
    pub interp_static_types: Option<u64>,
    /// `sizeof` one entry of [`Offsets::interp_static_types`] (3.12+).
    pub static_type_size: Option<u64>,
    /// `tp_dict` in one entry of [`Offsets::interp_static_types`] (3.12+).
    pub static_type_dict: Option<u64>,

    /// `PyCFunctionObject.m_ml` (`builtin_function_or_method`): the
    /// `PyMethodDef`.
    pub cfunction_ml: u64,
    /// `PyCFunctionObject.m_self`: the module, or the object a method is
    /// bound to.
    pub cfunction_self: u64,
    /// `PyCFunctionObject.m_module`: normally the module's name (a `str`),
    /// NULL for bound methods.
    pub cfunction_module: u64,
    /// `PyCFunctionObject.vectorcall` (NULL for `METH_VARARGS` functions,
    /// which are called through `tp_call`).
    pub cfunction_vectorcall: u64,
    /// `PyMethodDescrObject.d_common.d_type`: the type defining the method.
    pub method_descr_type: u64,
    /// `PyMethodDescrObject.d_method`: the `PyMethodDef`.
    pub method_descr_method: u64,
    /// `PyMethodDescrObject.vectorcall`.
    pub method_descr_vectorcall: u64,
    /// `PyMethodDef.ml_name` (a `const char *`).
    pub method_def_name: u64,
    /// `PyMethodDef.ml_flags` (an `int`: `METH_O`, `METH_FASTCALL`, ...).
    pub method_def_flags: u64,
    /// `PyTypeObject.tp_call`.
    pub type_call: u64,

    /// `PyFunctionObject.func_code`.
    pub function_code: u64,
    /// `co_consts`: the code object's constants, nested code objects among
    /// them.
    pub code_consts: u64,
    /// `PyHeapTypeObject.ht_cached_keys`: the keys instances of a class
    /// share (split dicts, inline values).
    pub heaptype_cached_keys: u64,
    /// `PyDictValues.values` (3.11+): where the values array of a split
    /// dict starts; up to 3.10 `ma_values` points at the array itself.
    pub dict_values_items: Option<u64>,
    /// `PyThreadState.datastack_top` (3.11+): where the next frame will be
    /// pushed, just past the newest one.
    pub tstate_datastack_top: Option<u64>,
    /// `co_framesize` (3.11+, an `int`): a frame's size in words.
    pub code_framesize: Option<u64>,
}

/// Offsets that are the same in every supported version (shared with the
/// kernel programs).
pub use pyprobe_common::objects as common;

/// Everything known about one CPython minor version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionInfo {
    /// Offsets.
    pub offsets: Offsets,
    /// Behaviour flags.
    pub layout: Layout,
}

use super::linetable::LineTableFormat;

const fn layout_38_310(instruction: InstructionModel, line_table: LineTableFormat) -> Layout {
    Layout {
        frame_model: FrameModel::FrameObject,
        instruction,
        entry_frames: EntryFrames::None,
        long: LongModel::ObSize,
        dict_keys: DictKeysModel::Sized,
        instance_dict: InstanceDictModel::TypeOffset,
        stackref_mask: !0,
        line_table,
        resume_opcodes: None,
        exit_opcodes: None,
    }
}

const fn layout_311_plus(
    instruction: InstructionModel,
    instance_dict: InstanceDictModel,
    entry_frames: EntryFrames,
    long: LongModel,
    stackref_mask: u64,
    resume_opcodes: ResumeOpcodes,
    exit_opcodes: ExitOpcodes,
) -> Layout {
    Layout {
        frame_model: FrameModel::Interpreter,
        instruction,
        entry_frames,
        long,
        dict_keys: DictKeysModel::Log2,
        instance_dict,
        stackref_mask,
        line_table: LineTableFormat::Locations,
        resume_opcodes: Some(resume_opcodes),
        exit_opcodes: Some(exit_opcodes),
    }
}

// `PyCFunctionObject`, `PyMethodDescrObject`, `PyMethodDef` and `tp_call`
// have the same layout in every supported version (3.8-3.14): both helpers
// below use these values.
const CFUNCTION_ML: u64 = 16;
const CFUNCTION_SELF: u64 = 24;
const CFUNCTION_MODULE: u64 = 32;
// After `m_weakreflist` (40).
const CFUNCTION_VECTORCALL: u64 = 48;
const METHOD_DESCR_TYPE: u64 = 16;
// After `d_name` (24) and `d_qualname` (32).
const METHOD_DESCR_METHOD: u64 = 40;
const METHOD_DESCR_VECTORCALL: u64 = 48;
const METHOD_DEF_NAME: u64 = 0;
const METHOD_DEF_FLAGS: u64 = 16;
const TYPE_CALL: u64 = 128;

/// Offsets shared by 3.8-3.10, which differ only in a few fields.
#[allow(clippy::too_many_arguments)] // one per field that differs
const fn offsets_38_310(
    interpreters_head: u64,
    tstate_current: u64,
    gil_last_holder: u64,
    frame_lasti: u64,
    frame_localsplus: u64,
    interp_sysdict: u64,
    function_code: u64,
    heaptype_cached_keys: u64,
) -> Offsets {
    Offsets {
        runtime_interpreters_head: interpreters_head,
        runtime_tstate_current: Some(tstate_current),
        gil: GilLocation::Runtime {
            last_holder: gil_last_holder,
            locked: gil_last_holder + 8,
        },
        interp_next: 0,
        interp_threads_head: 8,
        tstate_next: 8,
        tstate_interp: 16,
        tstate_thread_id: 176,
        tstate_native_thread_id: None,
        tstate_frame: FrameLink::Direct(24),
        frame_previous: 24,
        frame_code: 32,
        frame_instruction: frame_lasti,
        frame_localsplus,
        frame_owner: None,
        code_argcount: 16,
        code_flags: 36,
        code_firstlineno: 40,
        code_nlocals: 28,
        code_nlocalsplus: None,
        code_code: Some(48),
        code_code_adaptive: None,
        code_varnames: 72,
        code_localspluskinds: None,
        code_filename: 104,
        code_name: 112,
        code_qualname: None,
        code_linetable: 120,
        code_firsttraceable: None,
        tuple_items: 24,
        unicode_ascii_data: 48,
        unicode_compact_data: 72,
        interp_sysdict,
        interp_builtins: interp_sysdict + 8,
        interp_static_types: None,
        static_type_size: None,
        static_type_dict: None,
        cfunction_ml: CFUNCTION_ML,
        cfunction_self: CFUNCTION_SELF,
        cfunction_module: CFUNCTION_MODULE,
        cfunction_vectorcall: CFUNCTION_VECTORCALL,
        method_descr_type: METHOD_DESCR_TYPE,
        method_descr_method: METHOD_DESCR_METHOD,
        method_descr_vectorcall: METHOD_DESCR_VECTORCALL,
        method_def_name: METHOD_DEF_NAME,
        method_def_flags: METHOD_DEF_FLAGS,
        type_call: TYPE_CALL,
        function_code,
        code_consts: 56,
        heaptype_cached_keys,
        dict_values_items: None,
        tstate_datastack_top: None,
        code_framesize: None,
    }
}

/// CPython 3.8 (measured on 3.8.18).
pub const PY38: VersionInfo = VersionInfo {
    offsets: offsets_38_310(32, 1368, 1160, 104, 360, 72, 16, 872),
    layout: layout_38_310(InstructionModel::LastiBytes, LineTableFormat::Lnotab),
};

/// CPython 3.9 (measured on 3.9.18).
pub const PY39: VersionInfo = VersionInfo {
    offsets: offsets_38_310(32, 568, 360, 104, 360, 872, 16, 864),
    layout: layout_38_310(InstructionModel::LastiBytes, LineTableFormat::Lnotab),
};

/// CPython 3.10 (measured on 3.10.13).
pub const PY310: VersionInfo = VersionInfo {
    offsets: offsets_38_310(32, 568, 360, 96, 352, 872, 48, 872),
    layout: layout_38_310(InstructionModel::LastiUnits, LineTableFormat::Linetable310),
};

/// Code object offsets of 3.11+, which move only `co_argcount`,
/// `co_firstlineno`, `co_nlocalsplus`, `co_code_adaptive` and
/// `_co_firsttraceable`.
const fn offsets_311_plus(
    argcount: u64,
    firstlineno: u64,
    nlocalsplus: u64,
    code_adaptive: u64,
    firsttraceable: u64,
) -> Offsets {
    Offsets {
        runtime_interpreters_head: 0,
        runtime_tstate_current: None,
        gil: GilLocation::InterpPointer {
            pointer: 0,
            last_holder: 8,
            locked: 16,
        },
        interp_next: 0,
        interp_threads_head: 0,
        tstate_next: 8,
        tstate_interp: 16,
        tstate_thread_id: 0,
        tstate_native_thread_id: None,
        tstate_frame: FrameLink::Direct(0),
        frame_previous: 8,
        frame_code: 0,
        frame_instruction: 56,
        frame_localsplus: 72,
        frame_owner: Some(70),
        code_argcount: argcount,
        code_flags: 48,
        code_firstlineno: firstlineno,
        code_nlocals: 80,
        code_nlocalsplus: Some(nlocalsplus),
        code_code: None,
        code_code_adaptive: Some(code_adaptive),
        code_varnames: 96,
        code_localspluskinds: Some(104),
        code_filename: 112,
        code_name: 120,
        code_qualname: Some(128),
        code_linetable: 136,
        code_firsttraceable: Some(firsttraceable),
        tuple_items: 24,
        unicode_ascii_data: 40,
        unicode_compact_data: 56,
        interp_sysdict: 0,
        interp_builtins: 0,
        interp_static_types: None,
        static_type_size: None,
        static_type_dict: None,
        cfunction_ml: CFUNCTION_ML,
        cfunction_self: CFUNCTION_SELF,
        cfunction_module: CFUNCTION_MODULE,
        cfunction_vectorcall: CFUNCTION_VECTORCALL,
        method_descr_type: METHOD_DESCR_TYPE,
        method_descr_method: METHOD_DESCR_METHOD,
        method_descr_vectorcall: METHOD_DESCR_VECTORCALL,
        method_def_name: METHOD_DEF_NAME,
        method_def_flags: METHOD_DEF_FLAGS,
        type_call: TYPE_CALL,
        function_code: 48,
        code_consts: 24,
        heaptype_cached_keys: 0,
        dict_values_items: Some(0),
        tstate_datastack_top: None,
        code_framesize: None,
    }
}

/// CPython 3.11 (measured on 3.11.7; Debian's 3.11.2 agrees).
pub const PY311: VersionInfo = VersionInfo {
    offsets: Offsets {
        runtime_interpreters_head: 40,
        runtime_tstate_current: Some(576),
        gil: GilLocation::Runtime {
            last_holder: 368,
            locked: 376,
        },
        interp_threads_head: 16,
        tstate_thread_id: 152,
        tstate_native_thread_id: Some(160),
        tstate_frame: FrameLink::ViaCFrame {
            cframe: 56,
            current_frame: 8,
        },
        frame_previous: 48,
        frame_code: 32,
        frame_owner: Some(69),
        unicode_ascii_data: 48,
        unicode_compact_data: 72,
        interp_sysdict: 904,
        interp_builtins: 912,
        heaptype_cached_keys: 872,
        ..offsets_311_plus(56, 72, 76, 184, 168)
    },
    layout: layout_311_plus(
        InstructionModel::PrevInstr,
        InstanceDictModel::ValuesOrDict,
        EntryFrames::None,
        LongModel::ObSize,
        !0,
        ResumeOpcodes {
            resume: 151,
            quick: Some(150),
            check: None,
            instrumented: None,
        },
        ExitOpcodes {
            return_value: 83,
            return_const: None,
            yield_value: 86,
            instrumented_return_value: None,
            instrumented_return_const: None,
            instrumented_yield_value: None,
        },
    ),
};

/// CPython 3.12 (measured on 3.12.1).
pub const PY312: VersionInfo = VersionInfo {
    offsets: Offsets {
        runtime_interpreters_head: 40,
        gil: GilLocation::InterpPointer {
            pointer: 384,
            last_holder: 8,
            locked: 16,
        },
        interp_threads_head: 72,
        tstate_thread_id: 136,
        tstate_native_thread_id: Some(144),
        tstate_frame: FrameLink::ViaCFrame {
            cframe: 56,
            current_frame: 0,
        },
        interp_sysdict: 352,
        interp_builtins: 360,
        interp_static_types: Some(373_704),
        static_type_size: Some(40),
        static_type_dict: Some(16),
        heaptype_cached_keys: 880,
        ..offsets_311_plus(52, 68, 72, 192, 176)
    },
    layout: layout_311_plus(
        InstructionModel::PrevInstr,
        InstanceDictModel::TaggedDictOrValues,
        EntryFrames::OwnerAtLeast(3),
        LongModel::LvTag,
        !0,
        ResumeOpcodes {
            resume: 151,
            quick: None,
            check: None,
            instrumented: Some(240),
        },
        ExitOpcodes {
            return_value: 83,
            return_const: Some(121),
            yield_value: 150,
            instrumented_return_value: Some(242),
            instrumented_return_const: Some(247),
            instrumented_yield_value: Some(243),
        },
    ),
};

/// CPython 3.13 (measured on 3.13.0; `_Py_DebugOffsets` is preferred when
/// the target has it).
pub const PY313: VersionInfo = VersionInfo {
    offsets: Offsets {
        runtime_interpreters_head: 632,
        gil: GilLocation::InterpPointer {
            pointer: 16,
            last_holder: 8,
            locked: 16,
        },
        interp_next: 7264,
        interp_threads_head: 7344,
        tstate_thread_id: 152,
        tstate_native_thread_id: Some(160),
        tstate_frame: FrameLink::Direct(72),
        interp_sysdict: 7640,
        interp_builtins: 7648,
        interp_static_types: Some(182_968),
        static_type_size: Some(48),
        static_type_dict: Some(24),
        heaptype_cached_keys: 880,
        dict_values_items: Some(8),
        tstate_datastack_top: Some(240),
        code_framesize: Some(76),
        ..offsets_311_plus(52, 68, 72, 200, 184)
    },
    layout: layout_311_plus(
        InstructionModel::InstrPtr,
        InstanceDictModel::InlineValues,
        EntryFrames::OwnerAtLeast(3),
        LongModel::LvTag,
        !0,
        ResumeOpcodes {
            resume: 149,
            quick: None,
            check: Some(207),
            instrumented: Some(236),
        },
        ExitOpcodes {
            return_value: 36,
            return_const: Some(103),
            yield_value: 118,
            instrumented_return_value: Some(239),
            instrumented_return_const: Some(240),
            instrumented_yield_value: Some(241),
        },
    ),
};

/// CPython 3.14 (measured on 3.14.10; `_Py_DebugOffsets` is preferred).
pub const PY314: VersionInfo = VersionInfo {
    offsets: Offsets {
        runtime_interpreters_head: 808,
        gil: GilLocation::InterpPointer {
            pointer: 16,
            last_holder: 8,
            locked: 16,
        },
        interp_next: 7272,
        interp_threads_head: 7344,
        tstate_thread_id: 152,
        tstate_native_thread_id: Some(160),
        tstate_frame: FrameLink::Direct(72),
        frame_owner: Some(74),
        frame_localsplus: 80,
        tuple_items: 32,
        interp_sysdict: 7672,
        interp_builtins: 7680,
        // Measured on 3.14.10: `_Py_DebugOffsets` does not publish these.
        interp_static_types: Some(180_240),
        static_type_size: Some(48),
        static_type_dict: Some(24),
        heaptype_cached_keys: 880,
        dict_values_items: Some(8),
        tstate_datastack_top: Some(240),
        code_framesize: Some(76),
        ..offsets_311_plus(52, 68, 72, 208, 192)
    },
    layout: layout_311_plus(
        InstructionModel::InstrPtr,
        InstanceDictModel::InlineValues,
        EntryFrames::OwnerAtLeast(3),
        LongModel::LvTag,
        !3,
        ResumeOpcodes {
            resume: 128,
            quick: None,
            check: Some(196),
            instrumented: Some(245),
        },
        ExitOpcodes {
            return_value: 35,
            return_const: None,
            yield_value: 120,
            instrumented_return_value: Some(246),
            instrumented_return_const: None,
            instrumented_yield_value: Some(247),
        },
    ),
};

/// CPython 3.15: the thread state grew (ids moved), the runtime's
/// small-int cache grew (the interpreter list moved), opcodes were
/// renumbered; frames and code objects are laid out as in 3.14.
pub const PY315: VersionInfo = VersionInfo {
    offsets: Offsets {
        runtime_interpreters_head: 936,
        interp_next: 7264,
        interp_threads_head: 7336,
        tstate_thread_id: 176,
        tstate_native_thread_id: Some(184),
        interp_sysdict: 7576,
        interp_builtins: 7584,
        // Measured on a gcc build of 3.15.0rc1 (gdb): `_Py_DebugOffsets`
        // does not publish these (3.15 publishes ht_cached_keys).
        interp_static_types: Some(180_264),
        heaptype_cached_keys: 888,
        tstate_datastack_top: Some(264),
        ..PY314.offsets
    },
    layout: Layout {
        resume_opcodes: Some(ResumeOpcodes {
            resume: 128,
            quick: None,
            check: Some(200),
            instrumented: Some(244),
        }),
        exit_opcodes: Some(ExitOpcodes {
            return_value: 33,
            return_const: None,
            yield_value: 119,
            instrumented_return_value: Some(245),
            instrumented_return_const: None,
            instrumented_yield_value: Some(246),
        }),
        ..PY314.layout
    },
};

/// The built-in table for a version, if supported.
pub fn builtin(version: &PythonVersion) -> Option<VersionInfo> {
    Some(match version.minor_version() {
        (3, 8) => PY38,
        (3, 9) => PY39,
        (3, 10) => PY310,
        (3, 11) => PY311,
        (3, 12) => PY312,
        (3, 13) => PY313,
        (3, 14) => PY314,
        (3, 15) => PY315,
        _ => return None,
    })
}

/// Errors from reading `_Py_DebugOffsets`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DebugOffsetsError {
    /// The bytes do not start with the `xdebugpy` cookie.
    #[error("no _Py_DebugOffsets cookie at the start of _PyRuntime")]
    NoCookie,
    /// Fewer bytes than the structure needs.
    #[error("_Py_DebugOffsets is truncated ({0} bytes)")]
    Truncated(usize),
    /// A free-threaded build, which pyprobe does not read yet.
    #[error("free-threaded CPython builds are not supported yet")]
    FreeThreaded,
    /// A version whose field list pyprobe does not know.
    #[error("_Py_DebugOffsets of CPython {0} has a field list pyprobe does not know")]
    UnknownLayout(String),
}

/// The cookie at the start of `_Py_DebugOffsets`.
pub const DEBUG_OFFSETS_COOKIE: &[u8; 8] = b"xdebugpy";

/// Bytes of `_Py_DebugOffsets` that hold the cookie and the version.
pub const DEBUG_OFFSETS_HEADER: usize = 16;

/// Bytes of `_Py_DebugOffsets` to read from the start of `_PyRuntime` for a
/// version (read [`DEBUG_OFFSETS_HEADER`] bytes first to learn it): the
/// length of its field list, or the longest known one.
pub fn debug_offsets_size(version: &PythonVersion) -> usize {
    let words = match version.minor_version() {
        (3, 13) => DEBUG313.words,
        (3, 14) => DEBUG314.words,
        _ => DEBUG315.words,
    };
    8 + 8 * words
}

/// Where each field pyprobe uses sits in one version's `_Py_DebugOffsets`,
/// as a u64 index after the cookie. The struct only grows between minor
/// versions, but fields are inserted in the middle, so each minor has its
/// own list. `pyobject_ob_type`, `list_ob_item` and `float_ob_fval` have the
/// same value in every build and serve to check the list fits the bytes.
struct DebugFieldIndex {
    runtime_interpreters_head: usize,
    interp_next: usize,
    interp_threads_head: usize,
    interp_sysdict: usize,
    interp_builtins: usize,
    interp_ceval_gil: usize,
    interp_gil_runtime_state: usize,
    interp_gil_locked: usize,
    interp_gil_holder: usize,
    tstate_next: usize,
    tstate_interp: usize,
    tstate_current_frame: usize,
    tstate_thread_id: usize,
    tstate_native_thread_id: usize,
    frame_previous: usize,
    frame_executable: usize,
    frame_instr_ptr: usize,
    frame_localsplus: usize,
    frame_owner: usize,
    code_filename: usize,
    code_name: usize,
    code_qualname: usize,
    code_linetable: usize,
    code_firstlineno: usize,
    code_argcount: usize,
    code_localsplusnames: usize,
    code_localspluskinds: usize,
    code_code_adaptive: usize,
    pyobject_ob_type: usize,
    tuple_ob_item: usize,
    list_ob_item: usize,
    float_ob_fval: usize,
    unicode_asciiobject_size: usize,
    /// Number of u64 words after the cookie.
    words: usize,
}

/// Word 0 is `version`, word 1 `free_threaded` in every version.
const DEBUG_VERSION: usize = 0;
const DEBUG_FREE_THREADED: usize = 1;

/// CPython 3.13's field list.
const DEBUG313: DebugFieldIndex = DebugFieldIndex {
    runtime_interpreters_head: 4,
    interp_next: 7,
    interp_threads_head: 8,
    interp_sysdict: 11,
    interp_builtins: 12,
    interp_ceval_gil: 13,
    interp_gil_runtime_state: 14,
    interp_gil_locked: 16,
    interp_gil_holder: 17,
    tstate_next: 20,
    tstate_interp: 21,
    tstate_current_frame: 22,
    tstate_thread_id: 23,
    tstate_native_thread_id: 24,
    frame_previous: 28,
    frame_executable: 29,
    frame_instr_ptr: 30,
    frame_localsplus: 31,
    frame_owner: 32,
    code_filename: 34,
    code_name: 35,
    code_qualname: 36,
    code_linetable: 37,
    code_firstlineno: 38,
    code_argcount: 39,
    code_localsplusnames: 40,
    code_localspluskinds: 41,
    code_code_adaptive: 42,
    pyobject_ob_type: 44,
    tuple_ob_item: 50,
    list_ob_item: 53,
    float_ob_fval: 59,
    unicode_asciiobject_size: 69,
    words: 72,
};

/// CPython 3.14's field list: `interpreter_state` gains `threads_main`
/// (after `threads_head`), `code_object_generation` and `tlbc_generation`;
/// `interpreter_frame` gains `stackpointer` and `tlbc_index`; `code_object`
/// gains `co_tlbc`; `set_object` appears before `dict_object`; `gen_object`,
/// `llist_node` and `debugger_support` are appended.
const DEBUG314: DebugFieldIndex = DebugFieldIndex {
    runtime_interpreters_head: 4,
    interp_next: 7,
    interp_threads_head: 8,
    interp_sysdict: 12,
    interp_builtins: 13,
    interp_ceval_gil: 14,
    interp_gil_runtime_state: 15,
    interp_gil_locked: 17,
    interp_gil_holder: 18,
    tstate_next: 23,
    tstate_interp: 24,
    tstate_current_frame: 25,
    tstate_thread_id: 26,
    tstate_native_thread_id: 27,
    frame_previous: 31,
    frame_executable: 32,
    frame_instr_ptr: 33,
    frame_localsplus: 34,
    frame_owner: 35,
    code_filename: 39,
    code_name: 40,
    code_qualname: 41,
    code_linetable: 42,
    code_firstlineno: 43,
    code_argcount: 44,
    code_localsplusnames: 45,
    code_localspluskinds: 46,
    code_code_adaptive: 47,
    pyobject_ob_type: 50,
    tuple_ob_item: 56,
    list_ob_item: 59,
    float_ob_fval: 69,
    unicode_asciiobject_size: 79,
    words: 94,
};

/// CPython 3.15's field list: `thread_state` gains `base_frame`,
/// `last_profiled_frame` and `last_profiled_frame_seq` (after
/// `current_frame`) and `holds_gil`, `gil_requested`,
/// `current_exception`, `exc_state` (after `status`); `err_stackitem`,
/// `type_object.tp_basicsize`/`tp_dictoffset`, `heap_type_object`,
/// `unicode_object.compactunicodeobject_size` and three `gc` fields are
/// new.
const DEBUG315: DebugFieldIndex = DebugFieldIndex {
    tstate_thread_id: 29,
    tstate_native_thread_id: 30,
    frame_previous: 39,
    frame_executable: 40,
    frame_instr_ptr: 41,
    frame_localsplus: 42,
    frame_owner: 43,
    code_filename: 47,
    code_name: 48,
    code_qualname: 49,
    code_linetable: 50,
    code_firstlineno: 51,
    code_argcount: 52,
    code_localsplusnames: 53,
    code_localspluskinds: 54,
    code_code_adaptive: 55,
    pyobject_ob_type: 58,
    tuple_ob_item: 68,
    list_ob_item: 71,
    float_ob_fval: 81,
    unicode_asciiobject_size: 91,
    words: 110,
    // The interpreter state and the thread state up to current_frame
    // are 3.14's.
    ..DEBUG314
};

/// Reads the version and offsets from the `_Py_DebugOffsets` structure at the
/// start of `_PyRuntime` (CPython 3.13+). Fields the structure does not
/// publish (`co_nlocalsplus`, `_co_firsttraceable`, behaviour flags) come
/// from the built-in table of the same version.
pub fn from_debug_offsets(bytes: &[u8]) -> Result<(PythonVersion, VersionInfo), DebugOffsetsError> {
    if bytes.len() < 16 || &bytes[..8] != DEBUG_OFFSETS_COOKIE {
        return Err(DebugOffsetsError::NoCookie);
    }
    let word = |i: usize| -> Option<u64> {
        let at = 8 + i * 8;
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let version = PythonVersion::from_hex(word(DEBUG_VERSION).unwrap_or(0) as u32);
    let (index, mut info) = match version.minor_version() {
        (3, 13) => (&DEBUG313, PY313),
        (3, 14) => (&DEBUG314, PY314),
        // The field list settled in 3.15.0b4.
        (3, 15) if version >= PythonVersion::from_hex(0x030f_00b4) => (&DEBUG315, PY315),
        _ => return Err(DebugOffsetsError::UnknownLayout(version.to_string())),
    };
    if bytes.len() < 8 + index.words * 8 {
        return Err(DebugOffsetsError::Truncated(bytes.len()));
    }
    let w = |i| word(i).expect("length checked");
    if w(DEBUG_FREE_THREADED) != 0 {
        return Err(DebugOffsetsError::FreeThreaded);
    }
    if (
        w(index.pyobject_ob_type),
        w(index.list_ob_item),
        w(index.float_ob_fval),
    ) != (8, 24, 16)
    {
        return Err(DebugOffsetsError::UnknownLayout(version.to_string()));
    }
    let o = &mut info.offsets;
    o.runtime_interpreters_head = w(index.runtime_interpreters_head);
    o.interp_next = w(index.interp_next);
    o.interp_threads_head = w(index.interp_threads_head);
    o.interp_sysdict = w(index.interp_sysdict);
    o.interp_builtins = w(index.interp_builtins);
    let gil_struct = w(index.interp_gil_runtime_state);
    o.gil = GilLocation::InterpPointer {
        pointer: w(index.interp_ceval_gil),
        last_holder: w(index.interp_gil_holder).wrapping_sub(gil_struct),
        locked: w(index.interp_gil_locked).wrapping_sub(gil_struct),
    };
    o.tstate_next = w(index.tstate_next);
    o.tstate_interp = w(index.tstate_interp);
    o.tstate_frame = FrameLink::Direct(w(index.tstate_current_frame));
    o.tstate_thread_id = w(index.tstate_thread_id);
    o.tstate_native_thread_id = Some(w(index.tstate_native_thread_id));
    o.frame_previous = w(index.frame_previous);
    o.frame_code = w(index.frame_executable);
    o.frame_instruction = w(index.frame_instr_ptr);
    o.frame_localsplus = w(index.frame_localsplus);
    o.frame_owner = Some(w(index.frame_owner));
    o.code_filename = w(index.code_filename);
    o.code_name = w(index.code_name);
    o.code_qualname = Some(w(index.code_qualname));
    o.code_linetable = w(index.code_linetable);
    o.code_firstlineno = w(index.code_firstlineno);
    o.code_argcount = w(index.code_argcount);
    o.code_varnames = w(index.code_localsplusnames);
    o.code_localspluskinds = Some(w(index.code_localspluskinds));
    o.code_code_adaptive = Some(w(index.code_code_adaptive));
    o.tuple_items = w(index.tuple_ob_item);
    let ascii = w(index.unicode_asciiobject_size);
    o.unicode_ascii_data = ascii;
    o.unicode_compact_data = ascii + 16;
    Ok((version, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 3.13.0 `_Py_DebugOffsets` words as read from pyenv's
    /// libpython3.13.so.1.0 (after the cookie).
    const PY3130_WORDS: [u64; 72] = [
        0x030d00f0, 0, 283320, 608, 632, 194968, 7272, 7264, 7344, 7400, 7656, 7640, 7648, 16,
        7752, 0, 7768, 7760, 304, 0, 8, 16, 72, 152, 160, 232, 32, 80, 8, 0, 56, 72, 70, 208, 112,
        120, 128, 136, 68, 52, 96, 104, 200, 16, 8, 416, 24, 88, 168, 32, 24, 16, 40, 24, 16, 48,
        32, 40, 24, 16, 32, 16, 24, 40, 16, 32, 64, 32, 16, 40, 240, 200,
    ];

    /// The 3.14.10 `_Py_DebugOffsets` words as read from Debian sid's
    /// stripped python3.14 (after the cookie).
    const PY31410_WORDS: [u64; 94] = [
        0x030e0af0, 0, 316616, 784, 808, 225864, 7280, 7272, 7344, 7360, 7408, 7688, 7672, 7680,
        16, 7784, 0, 7800, 7792, 7992, 0, 832, 0, 8, 16, 72, 152, 160, 232, 32, 88, 8, 0, 56, 80,
        74, 64, 0, 216, 112, 120, 128, 136, 68, 52, 96, 104, 208, 0, 16, 8, 416, 24, 88, 168, 40,
        32, 16, 40, 24, 16, 200, 24, 40, 32, 48, 32, 40, 24, 16, 32, 16, 24, 40, 16, 32, 64, 32,
        16, 40, 264, 192, 160, 24, 72, 67, 0, 8, 24, 304, 8076, 0, 4, 512,
    ];

    fn debug_bytes(words: &[u64]) -> Vec<u8> {
        let mut bytes = DEBUG_OFFSETS_COOKIE.to_vec();
        for w in words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn debug_offsets_of_3130_agree_with_the_builtin_table() {
        let (version, info) = from_debug_offsets(&debug_bytes(&PY3130_WORDS)).unwrap();
        assert_eq!(version.to_string(), "3.13.0");
        assert_eq!(info, PY313);
    }

    #[test]
    fn debug_offsets_of_31410_agree_with_the_builtin_table() {
        let (version, info) = from_debug_offsets(&debug_bytes(&PY31410_WORDS)).unwrap();
        assert_eq!(version.to_string(), "3.14.10");
        assert_eq!(info, PY314);
    }

    /// The 3.15.2 `_Py_DebugOffsets` words of Debian sid's stripped
    /// python3.15 (its `.PyRuntime` section as the file holds it, after
    /// the cookie).
    const PY3152_WORDS: [u64; 110] = [
        51315440, 0, 346568, 912, 936, 226240, 7272, 7264, 7336, 7352, 7400, 7592, 7576, 7584, 16,
        7736, 0, 7752, 7744, 7944, 0, 888, 0, 8, 16, 72, 80, 88, 96, 176, 184, 256, 32, 36, 40,
        136, 288, 0, 88, 8, 0, 56, 80, 74, 64, 0, 216, 112, 120, 128, 136, 68, 52, 96, 104, 208, 0,
        16, 8, 424, 24, 88, 168, 32, 288, 944, 888, 40, 32, 16, 40, 24, 16, 200, 24, 40, 32, 48,
        32, 40, 24, 16, 32, 16, 24, 40, 16, 32, 64, 32, 16, 40, 56, 176, 112, 120, 1120, 104, 160,
        24, 72, 67, 0, 8, 24, 344, 8028, 0, 4, 512,
    ];

    #[test]
    fn reads_the_debug_offsets_of_3_15() {
        let (version, info) = from_debug_offsets(&debug_bytes(&PY3152_WORDS)).unwrap();
        assert_eq!(version.to_string(), "3.15.2");
        assert_eq!(info, PY315);
        // 3.14's field list does not fit 3.15's bytes.
        let mut words = PY3152_WORDS;
        words[0] = 0x030e_0af0;
        assert!(matches!(
            from_debug_offsets(&debug_bytes(&words)),
            Err(DebugOffsetsError::UnknownLayout(_))
        ));
    }

    #[test]
    fn a_field_list_that_does_not_fit_is_refused() {
        // 3.14 bytes announced as 3.13: the check fields do not line up.
        let mut words = PY31410_WORDS;
        words[0] = 0x030d00f0;
        assert!(matches!(
            from_debug_offsets(&debug_bytes(&words)),
            Err(DebugOffsetsError::UnknownLayout(_))
        ));
    }

    #[test]
    fn bad_debug_offsets_are_errors() {
        assert_eq!(
            from_debug_offsets(b"notdebug"),
            Err(DebugOffsetsError::NoCookie)
        );
        let bytes = debug_bytes(&PY3130_WORDS);
        assert!(matches!(
            from_debug_offsets(&bytes[..100]),
            Err(DebugOffsetsError::Truncated(100))
        ));
        let mut words = PY3130_WORDS;
        words[1] = 1;
        assert_eq!(
            from_debug_offsets(&debug_bytes(&words)),
            Err(DebugOffsetsError::FreeThreaded)
        );
        words[0] = 0x031000f0;
        assert!(matches!(
            from_debug_offsets(&debug_bytes(&words)),
            Err(DebugOffsetsError::UnknownLayout(_))
        ));
        // 3.15's field list changed until 3.15.0b4.
        words[0] = 0x030f00a3;
        assert!(matches!(
            from_debug_offsets(&debug_bytes(&words)),
            Err(DebugOffsetsError::UnknownLayout(_))
        ));
    }

    #[test]
    fn every_supported_minor_has_a_table() {
        for minor in 8..=15 {
            let v = PythonVersion {
                major: 3,
                minor,
                micro: None,
                hex: None,
            };
            assert!(builtin(&v).is_some(), "3.{minor}");
        }
        let v37 = PythonVersion {
            major: 3,
            minor: 7,
            micro: None,
            hex: None,
        };
        assert!(builtin(&v37).is_none());
    }
}
