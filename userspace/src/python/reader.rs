//! Reading threads, frames and code objects of a CPython process from any
//! [`Memory`]: the live process or a saved [`Snapshot`].
//!
//! All loops are bounded and every pointer is checked by reading through it,
//! so a process that changes under us yields an error or a truncated stack,
//! never a hang or a panic.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap, HashSet},
};

use serde::{Deserialize, Serialize};

use super::{
    linetable,
    memory::{Memory, MemoryError, ProcessMemory, Snapshot, SnapshotMeta},
    offsets::{
        self, EntryFrames, FrameLink, FrameModel, GilLocation, InstructionModel, VersionInfo,
        common,
    },
    offsets_dwarf,
    values::{Bounds, TypeKind, Value, is_secret_name},
    version::{self, PythonVersion, VersionError},
};
use crate::{
    elf::ElfImage,
    process::{self, ProcessError},
};

/// Most frames walked per thread.
pub const MAX_FRAMES: usize = 4096;
/// Most threads read per interpreter.
pub const MAX_THREADS: usize = 4096;
/// Most interpreters read.
pub const MAX_INTERPRETERS: usize = 64;
/// Longest name or file name read.
const MAX_NAME: usize = 4096;
/// Whether a code object is one CPython makes for frames of its own, not
/// Python code: 3.12's interpreter trampoline (the code of the entry frame
/// each C-level call of the eval loop pushes) and the 3.13+ `__init__`
/// cleanup shim (`CO_NO_MONITORING_EVENTS`). Their file is `<shim>`.
fn is_shim(code: &CodeInfo, layout: &super::offsets::Layout) -> bool {
    layout.frame_model == FrameModel::Interpreter
        && (code.filename == "<shim>" || code.flags & CO_NO_MONITORING_EVENTS != 0)
}

/// `CO_NO_MONITORING_EVENTS`: marks the 3.13+ `__init__` cleanup shim frame.
const CO_NO_MONITORING_EVENTS: u32 = 0x200_0000;
/// 3.11+ local kinds.
const CO_FAST_HIDDEN: u8 = 0x10;
const CO_FAST_CELL: u8 = 0x40;
const CO_FAST_FREE: u8 = 0x80;
/// `PyCellObject.ob_ref`.
const CELL_REF: u64 = 16;

/// Errors while reading a Python process.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Finding the process or its interpreter failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The version is unknown or unsupported.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// Reading memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A value read makes no sense (the process changed under us, or the
    /// offsets are wrong).
    #[error("inconsistent data: {0}")]
    Corrupt(&'static str),
    /// A symbol the reader needs is missing.
    #[error("the interpreter has no symbol {0}")]
    MissingSymbol(&'static str),
}

/// Runtime addresses of objects and types the reader compares against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownObjects {
    /// `_Py_NoneStruct`.
    pub none: u64,
    /// `_Py_TrueStruct`.
    pub true_: u64,
    /// `_Py_FalseStruct`.
    pub false_: u64,
    /// Type object addresses by symbol name (`PyLong_Type`, ...).
    pub types: BTreeMap<String, u64>,
}

/// Symbols of the type objects the value decoder knows.
pub const TYPE_SYMBOLS: &[&str] = &[
    "PyLong_Type",
    "PyBool_Type",
    "PyFloat_Type",
    "PyUnicode_Type",
    "PyBytes_Type",
    "PyTuple_Type",
    "PyList_Type",
    "PyDict_Type",
    "PyCode_Type",
];

/// A CPython process (or a snapshot of one) ready to be read.
pub struct Target<M> {
    /// Memory source.
    pub mem: M,
    /// Version.
    pub version: PythonVersion,
    /// Offsets and layout flags.
    pub info: VersionInfo,
    /// Where the offsets came from (`_Py_DebugOffsets`, DWARF or built-in
    /// table).
    pub offsets_source: &'static str,
    /// Runtime address of `_PyRuntime`.
    pub runtime: u64,
    /// Known object and type addresses.
    pub known: KnownObjects,
    /// The interpreter file, when reading a live process.
    pub interpreter: Option<process::Interpreter>,
    code_cache: RefCell<HashMap<u64, std::rc::Rc<CodeInfo>>>,
}

/// What a code object says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CodeInfo {
    /// Address of the code object.
    pub address: u64,
    /// `co_qualname` (3.11+), else `co_name`.
    pub qualname: String,
    /// `co_name`.
    pub name: String,
    /// `co_filename`.
    pub filename: String,
    /// `co_firstlineno`.
    pub first_line: i32,
    /// `co_argcount`.
    pub argcount: u32,
    /// `co_flags`.
    pub flags: u32,
    /// Names of local slots in order (`co_varnames` / `co_localsplusnames`).
    pub local_names: Vec<String>,
    /// 3.11+ kinds of local slots.
    pub local_kinds: Vec<u8>,
    /// Raw line table.
    #[serde(skip)]
    pub line_table: Vec<u8>,
}

/// The names of a code object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CodeSummary {
    /// `co_qualname` (3.11+), else `co_name`.
    pub qualname: String,
    /// `co_filename`.
    pub filename: String,
    /// `co_firstlineno`.
    pub first_line: i32,
}

/// One Python frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Frame {
    /// Qualified function name.
    pub function: String,
    /// Source file.
    pub filename: String,
    /// Line being executed, if known.
    pub line: Option<i32>,
    /// First line of the function.
    pub first_line: i32,
    /// Index (code units) of the current instruction.
    pub instruction: i64,
    /// Address of the code object.
    pub code: u64,
    /// Local variables (when asked for): name, value, whether an argument.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locals: Vec<Local>,
}

/// A local variable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Local {
    /// Name.
    pub name: String,
    /// Value.
    pub value: Value,
    /// Whether it is a positional argument.
    pub argument: bool,
}

/// Where a frame is: function, file, line. Serialized as a
/// `[function, file, line]` array (line `null` when unknown), the shape a
/// Python program can produce from `sys._current_frames()`, so stacks read by
/// pyprobe and stacks a program reports about itself compare directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location(pub String, pub String, pub Option<i32>);

/// One thread.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Thread {
    /// Address of the thread state.
    pub tstate: u64,
    /// `pthread_self()` of the thread (`threading.get_ident()`).
    pub thread_id: u64,
    /// Kernel TID, when the interpreter records it (3.11+).
    pub native_id: Option<u32>,
    /// Whether the thread holds the GIL.
    pub holds_gil: bool,
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
    /// Set when the frame chain could not be read to its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<String>,
}

impl Thread {
    /// Each frame's [`Location`], innermost first.
    pub fn locations(&self) -> Vec<Location> {
        self.frames
            .iter()
            .map(|f| Location(f.function.clone(), f.filename.clone(), f.line))
            .collect()
    }
}

impl Target<ProcessMemory> {
    /// Finds the interpreter of a live process and prepares to read it.
    pub fn attach(pid: u32) -> Result<Self, ReadError> {
        Self::attach_with(pid, |mem| mem)
    }
}

/// Facts about the live process besides memory.
impl<M: Memory> Target<M> {
    /// Like [`Target::attach`], reading memory through `wrap(process memory)`
    /// (e.g. a [`super::memory::Recorder`] to save a snapshot).
    pub fn attach_with(pid: u32, wrap: impl FnOnce(ProcessMemory) -> M) -> Result<Self, ReadError> {
        Self::attach_with_image(pid, wrap).map(|(target, _)| target)
    }

    /// Like [`Target::attach_with`], also returning the interpreter's parsed
    /// ELF file for callers that need more from it (probe sites).
    pub fn attach_with_image(
        pid: u32,
        wrap: impl FnOnce(ProcessMemory) -> M,
    ) -> Result<(Self, std::sync::Arc<ElfImage>), ReadError> {
        let (interp, image) = process::find_interpreter_image(pid)?;
        let file_version = version::detect(&image)?;
        let mem = wrap(ProcessMemory::open(pid)?);
        let sym = |name: &'static str| -> Result<u64, ReadError> {
            let s = image
                .symbol(name)
                .map_err(|_| ReadError::MissingSymbol(name))?;
            Ok(interp.load_bias.wrapping_add(s.vaddr))
        };
        let runtime = sym("_PyRuntime")?;
        let mut known = KnownObjects {
            none: sym("_Py_NoneStruct")?,
            true_: sym("_Py_TrueStruct")?,
            false_: sym("_Py_FalseStruct")?,
            types: BTreeMap::new(),
        };
        for name in TYPE_SYMBOLS {
            if let Ok(addr) = sym(name) {
                known.types.insert((*name).to_owned(), addr);
            }
        }
        // DWARF (when the build has it) is read once per build: the result
        // is cached by build-id. A DWARF that lacks a field is not fatal:
        // the built-in table is used and the reason logged.
        let dwarf = if file_version.minor_version() >= (3, 13) {
            None // _Py_DebugOffsets comes first; do not parse DWARF for nothing.
        } else {
            match offsets_dwarf::cached_from_elf(&image, &file_version) {
                Ok(info) => info,
                Err(e) => {
                    log::warn!(
                        "not using DWARF offsets of {}: {e}",
                        interp.binary.display()
                    );
                    None
                }
            }
        };
        let mut target = Self::new_with_dwarf(mem, file_version, runtime, known, dwarf)?;
        target.interpreter = Some(interp);
        Ok((target, image))
    }
}

impl Target<Snapshot> {
    /// Prepares to read a saved snapshot.
    pub fn from_snapshot(snapshot: Snapshot) -> Result<Self, ReadError> {
        let meta = snapshot.meta.clone();
        let (major, minor, micro) = meta.version;
        let version = PythonVersion {
            major,
            minor,
            micro,
            hex: None,
        };
        let get = |name: &'static str| {
            meta.symbols
                .get(name)
                .copied()
                .ok_or(ReadError::MissingSymbol(name))
        };
        let known = KnownObjects {
            none: get("_Py_NoneStruct")?,
            true_: get("_Py_TrueStruct")?,
            false_: get("_Py_FalseStruct")?,
            types: meta
                .symbols
                .iter()
                .filter(|(k, _)| TYPE_SYMBOLS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        };
        Self::new(snapshot, version, meta.runtime, known)
    }
}

impl<M: Memory> Target<M> {
    /// Prepares to read `mem`: takes offsets from `_Py_DebugOffsets` when the
    /// target publishes them (3.13+), else from the built-in table.
    pub fn new(
        mem: M,
        version: PythonVersion,
        runtime: u64,
        known: KnownObjects,
    ) -> Result<Self, ReadError> {
        Self::new_with_dwarf(mem, version, runtime, known, None)
    }

    /// Like [`Target::new`], with offsets read from the binary's DWARF (if
    /// it has any) preferred over the built-in table. `_Py_DebugOffsets`,
    /// which the running process itself publishes, still comes first.
    pub fn new_with_dwarf(
        mem: M,
        version: PythonVersion,
        runtime: u64,
        known: KnownObjects,
        dwarf: Option<VersionInfo>,
    ) -> Result<Self, ReadError> {
        let fallback = |version: PythonVersion| -> Result<_, ReadError> {
            Ok(match dwarf {
                Some(info) => (version, info, "DWARF"),
                None => (
                    version,
                    offsets::builtin(&version).ok_or(VersionError::Unsupported { version })?,
                    "built-in table",
                ),
            })
        };
        let (version, info, offsets_source) = if version.minor_version() >= (3, 13) {
            let header = mem.read_vec(runtime, offsets::DEBUG_OFFSETS_HEADER)?;
            let hex = u64::from_le_bytes(header[8..16].try_into().expect("16 bytes"));
            let size = offsets::debug_offsets_size(&PythonVersion::from_hex(hex as u32));
            let bytes = mem.read_vec(runtime, size)?;
            match offsets::from_debug_offsets(&bytes) {
                Ok((v, info)) => (v, info, "_Py_DebugOffsets"),
                Err(offsets::DebugOffsetsError::FreeThreaded) => {
                    return Err(VersionError::FreeThreaded { version }.into());
                }
                Err(_) => fallback(version)?,
            }
        } else {
            fallback(version)?
        };
        Ok(Target {
            mem,
            version,
            info,
            offsets_source,
            runtime,
            known,
            interpreter: None,
            code_cache: RefCell::new(HashMap::new()),
        })
    }

    /// What is known of this target's build, over no memory: to be put
    /// over other memory with [`Target::over`].
    pub fn facts(&self) -> Target<super::memory::NoMemory> {
        self.over(super::memory::NoMemory)
    }

    /// This target's build facts (version, offsets, known objects) over
    /// `mem`, e.g. bytes captured from another process of the same build.
    pub fn over<N: Memory>(&self, mem: N) -> Target<N> {
        Target {
            mem,
            version: self.version,
            info: self.info,
            offsets_source: self.offsets_source,
            runtime: self.runtime,
            known: self.known.clone(),
            interpreter: self.interpreter.clone(),
            code_cache: RefCell::new(HashMap::new()),
        }
    }

    /// What a snapshot of this target needs besides memory.
    pub fn snapshot_meta(&self, note: &str) -> SnapshotMeta {
        let mut symbols: BTreeMap<String, u64> = self.known.types.clone();
        symbols.insert("_Py_NoneStruct".into(), self.known.none);
        symbols.insert("_Py_TrueStruct".into(), self.known.true_);
        symbols.insert("_Py_FalseStruct".into(), self.known.false_);
        SnapshotMeta {
            version: (self.version.major, self.version.minor, self.version.micro),
            runtime: self.runtime,
            symbols,
            note: note.to_owned(),
        }
    }

    /// Interpreter states, main interpreter first.
    pub fn interpreters(&self) -> Result<Vec<u64>, ReadError> {
        let o = &self.info.offsets;
        let head = self.runtime.wrapping_add(o.runtime_interpreters_head);
        self.oldest_first(
            head,
            o.interp_next,
            MAX_INTERPRETERS,
            "interpreter list loops",
        )
    }

    /// Thread states of an interpreter, oldest (main thread) first.
    pub fn thread_states(&self, interp: u64) -> Result<Vec<u64>, ReadError> {
        let o = &self.info.offsets;
        let head = interp.wrapping_add(o.interp_threads_head);
        self.oldest_first(head, o.tstate_next, MAX_THREADS, "thread list loops")
    }

    /// Walks a CPython list whose head pointer is at `head` and whose nodes
    /// link through `next`. CPython prepends, so the list is reversed to
    /// put the oldest node first. At most `max` nodes; a loop is an error.
    fn oldest_first(
        &self,
        head: u64,
        next: u64,
        max: usize,
        looped: &'static str,
    ) -> Result<Vec<u64>, ReadError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut node = self.mem.read_u64(head)?;
        while node != 0 && out.len() < max {
            if !seen.insert(node) {
                return Err(ReadError::Corrupt(looped));
            }
            out.push(node);
            node = self.mem.read_u64(node.wrapping_add(next))?;
        }
        out.reverse();
        Ok(out)
    }

    /// The thread state holding the GIL of `interp`, if any.
    pub fn gil_holder(&self, interp: u64) -> Result<Option<u64>, ReadError> {
        let o = &self.info.offsets;
        if let Some(current) = o.runtime_tstate_current {
            let t = self.mem.read_u64(self.runtime.wrapping_add(current))?;
            return Ok((t != 0).then_some(t));
        }
        let (gil, last_holder, locked) = match o.gil {
            GilLocation::Runtime {
                last_holder,
                locked,
            } => (self.runtime, last_holder, locked),
            GilLocation::InterpPointer {
                pointer,
                last_holder,
                locked,
            } => (
                self.mem.read_u64(interp.wrapping_add(pointer))?,
                last_holder,
                locked,
            ),
        };
        if gil == 0 || self.mem.read_i32(gil.wrapping_add(locked))? == 0 {
            return Ok(None);
        }
        let holder = self.mem.read_u64(gil.wrapping_add(last_holder))?;
        Ok((holder != 0).then_some(holder))
    }

    /// Reads every thread of every interpreter.
    pub fn threads(&self, locals: Option<&Bounds>) -> Result<Vec<Thread>, ReadError> {
        let mut out = Vec::new();
        for interp in self.interpreters()? {
            let holder = self.gil_holder(interp).unwrap_or(None);
            for tstate in self.thread_states(interp)? {
                out.push(self.thread(tstate, holder == Some(tstate), locals)?);
            }
        }
        Ok(out)
    }

    /// Reads one thread and its stack.
    pub fn thread(
        &self,
        tstate: u64,
        holds_gil: bool,
        locals: Option<&Bounds>,
    ) -> Result<Thread, ReadError> {
        let o = &self.info.offsets;
        let thread_id = self.mem.read_u64(tstate.wrapping_add(o.tstate_thread_id))?;
        let native_id = match o.tstate_native_thread_id {
            Some(off) => Some(self.mem.read_u32(tstate.wrapping_add(off))?),
            None => None,
        };
        let (frames, truncated) = match self.frames(tstate, locals) {
            Ok(frames) => (frames, None),
            Err((frames, e)) => (frames, Some(e.to_string())),
        };
        Ok(Thread {
            tstate,
            thread_id,
            native_id,
            holds_gil,
            frames,
            truncated,
        })
    }

    /// The current frame of a thread state (0 if none).
    fn current_frame(&self, tstate: u64) -> Result<u64, ReadError> {
        Ok(match self.info.offsets.tstate_frame {
            FrameLink::Direct(off) => self.mem.read_u64(tstate.wrapping_add(off))?,
            FrameLink::ViaCFrame {
                cframe,
                current_frame,
            } => {
                let cf = self.mem.read_u64(tstate.wrapping_add(cframe))?;
                if cf == 0 {
                    0
                } else {
                    self.mem.read_u64(cf.wrapping_add(current_frame))?
                }
            }
        })
    }

    /// Walks the frame chain of a thread, innermost first. On error returns
    /// the frames read so far with the error.
    pub fn frames(
        &self,
        tstate: u64,
        locals: Option<&Bounds>,
    ) -> Result<Vec<Frame>, (Vec<Frame>, ReadError)> {
        let mut frames = Vec::new();
        let mut frame = match self.current_frame(tstate) {
            Ok(f) => f,
            Err(e) => return Err((frames, e)),
        };
        let mut seen = HashSet::new();
        let mut steps = 0;
        while frame != 0 {
            steps += 1;
            if steps > MAX_FRAMES {
                return Err((frames, ReadError::Corrupt("more than 4096 frames")));
            }
            if !seen.insert(frame) {
                return Err((frames, ReadError::Corrupt("frame chain loops")));
            }
            match self.frame(frame, locals) {
                Ok((Some(f), previous)) => {
                    frames.push(f);
                    frame = previous;
                }
                Ok((None, previous)) => frame = previous,
                Err(e) => return Err((frames, e)),
            }
        }
        Ok(frames)
    }

    /// Reads one frame; returns it (or `None` for frames that are not
    /// Python code) and the address of the previous frame.
    fn frame(
        &self,
        frame: u64,
        locals: Option<&Bounds>,
    ) -> Result<(Option<Frame>, u64), ReadError> {
        let o = &self.info.offsets;
        let layout = &self.info.layout;
        let previous = self.mem.read_u64(frame.wrapping_add(o.frame_previous))?;
        if let (EntryFrames::OwnerAtLeast(min), Some(owner_off)) =
            (layout.entry_frames, o.frame_owner)
            && self.mem.read_u8(frame.wrapping_add(owner_off))? >= min
        {
            return Ok((None, previous));
        }
        let code_addr = self.mem.read_u64(frame.wrapping_add(o.frame_code))? & layout.stackref_mask;
        let raw_instruction = match layout.instruction {
            InstructionModel::LastiBytes | InstructionModel::LastiUnits => {
                u64::from(self.mem.read_u32(frame.wrapping_add(o.frame_instruction))?)
            }
            InstructionModel::PrevInstr | InstructionModel::InstrPtr => {
                self.mem.read_u64(frame.wrapping_add(o.frame_instruction))?
            }
        };
        let Some((mut f, code)) = self.code_frame(code_addr, raw_instruction)? else {
            return Ok((None, previous));
        };
        if let Some(bounds) = locals {
            f.locals = self.locals(frame, &code, bounds)?;
        }
        Ok((Some(f), previous))
    }

    /// The frame a code object and an instruction word make (as read from
    /// a frame's code and instruction fields: for `f_lasti` versions the
    /// low 32 bits are the int), without locals; `None` when `code_addr` is
    /// not Python code (no code object, or a [`is_shim`] one). Every output
    /// names frames through here, so `dump`, `record`, `top` and `log
    /// --stack` show the same frames.
    pub fn code_frame(
        &self,
        code_addr: u64,
        raw_instruction: u64,
    ) -> Result<Option<(Frame, std::rc::Rc<CodeInfo>)>, ReadError> {
        let o = &self.info.offsets;
        let layout = &self.info.layout;
        if code_addr == 0 || !self.is_code(code_addr)? {
            return Ok(None);
        }
        let code = self.code(code_addr)?;
        if is_shim(&code, layout) {
            return Ok(None);
        }
        let instruction = match layout.instruction {
            InstructionModel::LastiBytes => i64::from(raw_instruction as u32 as i32) / 2,
            InstructionModel::LastiUnits => i64::from(raw_instruction as u32 as i32),
            InstructionModel::PrevInstr | InstructionModel::InstrPtr => {
                let base = code_addr.wrapping_add(o.code_code_adaptive.unwrap_or(0));
                (raw_instruction as i64).wrapping_sub(base as i64) / 2
            }
        };
        let index = u32::try_from(instruction.max(0)).unwrap_or(u32::MAX);
        let line =
            linetable::line_for_index(layout.line_table, code.first_line, &code.line_table, index)
                .ok()
                .flatten();
        Ok(Some((
            Frame {
                function: code.qualname.clone(),
                filename: code.filename.clone(),
                line,
                first_line: code.first_line,
                instruction,
                code: code_addr,
                locals: Vec::new(),
            },
            code,
        )))
    }

    fn locals(
        &self,
        frame: u64,
        code: &CodeInfo,
        bounds: &Bounds,
    ) -> Result<Vec<Local>, ReadError> {
        let o = &self.info.offsets;
        let mut out = Vec::new();
        for (i, name) in code.local_names.iter().enumerate() {
            let kind = code.local_kinds.get(i).copied().unwrap_or(0);
            if kind & CO_FAST_HIDDEN != 0 {
                continue;
            }
            let slot = self.mem.read_u64(
                frame
                    .wrapping_add(o.frame_localsplus)
                    .wrapping_add(8 * i as u64),
            )? & self.info.layout.stackref_mask;
            if slot == 0 {
                continue; // unbound
            }
            let mut addr = slot;
            if kind & (CO_FAST_CELL | CO_FAST_FREE) != 0 {
                // The slot holds a cell (unless MAKE_CELL has not run yet).
                if self.type_kind_of(slot).ok() == Some(TypeKind::Other)
                    && self.type_name_of(slot).ok().as_deref() == Some("cell")
                {
                    addr = self.mem.read_u64(slot.wrapping_add(CELL_REF))?;
                    if addr == 0 {
                        continue;
                    }
                }
            }
            let value = if bounds.redact && is_secret_name(name) {
                Value::Redacted
            } else {
                self.value(addr, bounds)
            };
            out.push(Local {
                name: name.clone(),
                value,
                argument: (i as u32) < code.argcount,
            });
        }
        Ok(out)
    }

    fn is_code(&self, addr: u64) -> Result<bool, ReadError> {
        let ty = self.mem.read_u64(addr.wrapping_add(common::OB_TYPE))?;
        Ok(match self.known.types.get("PyCode_Type") {
            Some(&code_type) => ty == code_type,
            None => self.type_name(ty)? == "code",
        })
    }

    /// Reads what names a code object (qualified name, file, first line),
    /// without caching: callers that see code objects come and go keep their
    /// own cache keyed by more than the address.
    pub fn code_summary(&self, addr: u64) -> Result<CodeSummary, ReadError> {
        let o = &self.info.offsets;
        let name = self.read_str(self.mem.read_u64(addr.wrapping_add(o.code_name))?)?;
        let qualname = match o.code_qualname {
            Some(off) => self.read_str(self.mem.read_u64(addr.wrapping_add(off))?)?,
            None => name,
        };
        let filename = self.read_str(self.mem.read_u64(addr.wrapping_add(o.code_filename))?)?;
        let first_line = self.mem.read_i32(addr.wrapping_add(o.code_firstlineno))?;
        Ok(CodeSummary {
            qualname,
            filename,
            first_line,
        })
    }

    /// Forgets what was read of the code object at `addr` (it was freed and
    /// something else may live there now).
    pub fn forget_code(&self, addr: u64) {
        self.code_cache.borrow_mut().remove(&addr);
    }

    /// The code object's identity as cheaply as it can be read: its name
    /// pointer and first line (a code object freed and replaced at the same
    /// address almost always differs in one of them).
    pub fn code_identity(&self, addr: u64) -> Result<(u64, i32), ReadError> {
        let o = &self.info.offsets;
        Ok((
            self.mem.read_u64(addr.wrapping_add(o.code_name))?,
            self.mem.read_i32(addr.wrapping_add(o.code_firstlineno))?,
        ))
    }

    /// Reads (and caches) a code object.
    pub fn code(&self, addr: u64) -> Result<std::rc::Rc<CodeInfo>, ReadError> {
        if let Some(c) = self.code_cache.borrow().get(&addr) {
            return Ok(c.clone());
        }
        let o = &self.info.offsets;
        let name = self.read_str(self.mem.read_u64(addr.wrapping_add(o.code_name))?)?;
        let qualname = match o.code_qualname {
            Some(off) => self.read_str(self.mem.read_u64(addr.wrapping_add(off))?)?,
            None => name.clone(),
        };
        let filename = self.read_str(self.mem.read_u64(addr.wrapping_add(o.code_filename))?)?;
        let first_line = self.mem.read_i32(addr.wrapping_add(o.code_firstlineno))?;
        let argcount = self.mem.read_u32(addr.wrapping_add(o.code_argcount))?;
        let flags = self.mem.read_u32(addr.wrapping_add(o.code_flags))?;
        let line_table = self.read_bytes_object(
            self.mem.read_u64(addr.wrapping_add(o.code_linetable))?,
            1 << 20,
        )?;
        let names_tuple = self.mem.read_u64(addr.wrapping_add(o.code_varnames))?;
        let count = self.read_size_checked(names_tuple, 1 << 16)?;
        let nlocals = match o.code_nlocalsplus {
            Some(_) => count,
            None => u64::from(self.mem.read_u32(addr.wrapping_add(o.code_nlocals))?).min(count),
        };
        let mut local_names = Vec::with_capacity(nlocals as usize);
        for i in 0..nlocals {
            let item = self
                .mem
                .read_u64(names_tuple.wrapping_add(o.tuple_items).wrapping_add(8 * i))?;
            local_names.push(self.read_str(item)?);
        }
        let local_kinds = match o.code_localspluskinds {
            Some(off) => {
                self.read_bytes_object(self.mem.read_u64(addr.wrapping_add(off))?, 1 << 16)?
            }
            None => Vec::new(),
        };
        let info = std::rc::Rc::new(CodeInfo {
            address: addr,
            qualname,
            name,
            filename,
            first_line,
            argcount,
            flags,
            local_names,
            local_kinds,
            line_table,
        });
        self.code_cache.borrow_mut().insert(addr, info.clone());
        Ok(info)
    }

    fn read_size_checked(&self, addr: u64, max: u64) -> Result<u64, ReadError> {
        let size = self.mem.read_i64(addr.wrapping_add(common::OB_SIZE))?;
        match u64::try_from(size) {
            Ok(s) if s <= max => Ok(s),
            _ => Err(ReadError::Corrupt("object size out of range")),
        }
    }

    fn read_bytes_object(&self, addr: u64, max: u64) -> Result<Vec<u8>, ReadError> {
        let len = self.read_size_checked(addr, max)?;
        Ok(self
            .mem
            .read_vec(addr.wrapping_add(common::BYTES_DATA), len as usize)?)
    }

    /// Reads a whole `str` (up to an internal bound).
    pub fn read_str(&self, addr: u64) -> Result<String, ReadError> {
        Ok(self.read_str_bounded(addr, MAX_NAME)?.0)
    }

    /// Reads at most `max_chars` code points of a `str`; returns the text and
    /// the full length.
    pub fn read_str_bounded(
        &self,
        addr: u64,
        max_chars: usize,
    ) -> Result<(String, u64), ReadError> {
        let o = &self.info.offsets;
        let len = self.read_size_at_unicode(addr)?;
        let state = self
            .mem
            .read_u32(addr.wrapping_add(common::UNICODE_STATE))?;
        let kind = (state >> 2) & 7;
        let compact = state & (1 << 5) != 0;
        let ascii = state & (1 << 6) != 0;
        let data = if compact {
            addr.wrapping_add(if ascii {
                o.unicode_ascii_data
            } else {
                o.unicode_compact_data
            })
        } else {
            self.mem
                .read_u64(addr.wrapping_add(o.unicode_compact_data))?
        };
        let n = len.min(max_chars as u64) as usize;
        let text = match kind {
            1 => self
                .mem
                .read_vec(data, n)?
                .into_iter()
                .map(char::from)
                .collect(),
            2 => {
                let bytes = self.mem.read_vec(data, n * 2)?;
                let units: Vec<u16> = bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                char::decode_utf16(units)
                    .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
                    .collect()
            }
            4 => {
                let bytes = self.mem.read_vec(data, n * 4)?;
                bytes
                    .chunks_exact(4)
                    .map(|c| {
                        char::from_u32(u32::from_le_bytes(c.try_into().expect("4")))
                            .unwrap_or(char::REPLACEMENT_CHARACTER)
                    })
                    .collect()
            }
            _ => return Err(ReadError::Corrupt("str kind")),
        };
        Ok((text, len))
    }

    fn read_size_at_unicode(&self, addr: u64) -> Result<u64, ReadError> {
        let len = self
            .mem
            .read_i64(addr.wrapping_add(common::UNICODE_LENGTH))?;
        u64::try_from(len).map_err(|_| ReadError::Corrupt("negative str length"))
    }

    /// `tp_name` of a type object.
    pub fn type_name(&self, ty: u64) -> Result<String, ReadError> {
        let name = self.mem.read_u64(ty.wrapping_add(common::TP_NAME))?;
        // Read up to 128 bytes, stopping at NUL; tolerate a short mapping.
        let mut out = Vec::new();
        for chunk in 0..8u64 {
            let mut buf = [0u8; 16];
            if self
                .mem
                .read(name.wrapping_add(chunk * 16), &mut buf)
                .is_err()
            {
                break;
            }
            if let Some(end) = buf.iter().position(|&b| b == 0) {
                out.extend_from_slice(&buf[..end]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&buf);
        }
        if out.is_empty() {
            return Err(ReadError::Corrupt("type name"));
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn type_name_of(&self, obj: u64) -> Result<String, ReadError> {
        self.type_name(self.mem.read_u64(obj.wrapping_add(common::OB_TYPE))?)
    }

    fn type_kind_of(&self, obj: u64) -> Result<TypeKind, ReadError> {
        self.type_kind(self.mem.read_u64(obj.wrapping_add(common::OB_TYPE))?)
    }

    /// Which value decoder applies to objects of type `ty`.
    pub(crate) fn type_kind(&self, ty: u64) -> Result<TypeKind, ReadError> {
        const KINDS: &[(&str, &str, TypeKind)] = &[
            ("PyLong_Type", "int", TypeKind::Int),
            ("PyBool_Type", "bool", TypeKind::Bool),
            ("PyFloat_Type", "float", TypeKind::Float),
            ("PyUnicode_Type", "str", TypeKind::Str),
            ("PyBytes_Type", "bytes", TypeKind::Bytes),
            ("PyTuple_Type", "tuple", TypeKind::Tuple),
            ("PyList_Type", "list", TypeKind::List),
            ("PyDict_Type", "dict", TypeKind::Dict),
        ];
        for (symbol, _, kind) in KINDS {
            if self.known.types.get(*symbol) == Some(&ty) {
                return Ok(*kind);
            }
        }
        if self.known.types.len() >= KINDS.len() {
            return Ok(TypeKind::Other);
        }
        let name = self.type_name(ty)?;
        Ok(KINDS
            .iter()
            .find(|(sym, tp, _)| !self.known.types.contains_key(*sym) && *tp == name)
            .map(|(_, _, k)| *k)
            .unwrap_or(TypeKind::Other))
    }
}
