//! Where every Python function start executes: code addresses in an
//! interpreter binary, for uprobes (attached by ELF file offset).
//!
//! - **3.8-3.10**: every Python call enters `_PyEval_EvalFrameDefault`, so its
//!   entry is the one site ([`SiteKind::EvalEntry`]).
//! - **3.11+**: calls made by bytecode run inside the same C frame, but every
//!   function starts with an instruction of the RESUME family
//!   ([`ResumeOpcodes`], from [`Layout::resume_opcodes`]). The sites are the
//!   handlers of those opcodes in `_PyEval_EvalFrameDefault`'s computed-goto
//!   dispatch ([`SiteKind::Resume`]). `INSTRUMENTED_RESUME` is included: it
//!   only runs while `sys.monitoring` or `sys.settrace` is active, and then
//!   replaces `RESUME`.
//!
//! Handlers are found in one of two ways:
//!
//! 1. The dispatch table itself, `static void *opcode_targets[256]`
//!    ([`find_opcode_table`]): the handler of opcode `n` is `table[n]`. It is
//!    what the machine jumps through, so it is preferred. It is found by its
//!    local symbol `opcode_targets.N` when `.symtab` survives, else by scanning
//!    the loaded, non-executable data for a run of exactly 256 pointers into
//!    the code of `_PyEval_EvalFrameDefault`. Pointers are absolute in a non-PIE
//!    executable (Debian's `python3.11`), and `R_X86_64_RELATIVE` relocations
//!    whose addends are the targets in a PIE or shared library (pyenv's
//!    `libpython3.X.so`).
//! 2. The DWARF labels `TARGET_<OPNAME>` inside `_PyEval_EvalFrameDefault`
//!    ([`sites_from_dwarf`]), when the binary keeps debug information: the
//!    fallback, and the cross-check in the tests.
//!
//! "The code of `_PyEval_EvalFrameDefault`" is its symbol's range plus the
//! pieces GCC split off it (`.cold`): a symbol `_PyEval_EvalFrameDefault.cold`
//! if `.symtab` has one, and otherwise every `.eh_frame` FDE that the function
//! body enters in the middle with a direct `jmp`/`jcc` (a tail call would enter
//! at the start). In Debian's 3.14 nearly the whole interpreter loop lives in
//! that cold part. If no table fits those bounds, the search is repeated with
//! the bounds of the executable sections, and then must find exactly one.
//!
//! ## Where in a handler the probe goes
//!
//! On x86-64 the kernel *emulates* a few probed instructions (`jmp`/`jcc`
//! rel8/rel32, `call` rel32, `push` of a 64-bit register: see
//! `branch_setup_xol_ops` and `push_setup_xol_ops` in
//! `arch/x86/kernel/uprobes.c`) and single-steps every other one out of line,
//! which costs a debug trap more per hit (about 5 µs instead of well under
//! 1 µs on a VM). A handler usually starts with a few plain `mov`s and reaches
//! a `jcc` soon after, so each table-found handler's probe is moved
//! ([`Placement`]) onto the first instruction of its first basic block that
//! the kernel emulates, when that is safe: every instruction before it falls
//! through to the next, and nothing in `_PyEval_EvalFrameDefault` may jump
//! between the handler's start (excluded) and the new site (included), so the
//! new site runs exactly once each time the handler starts, and never
//! otherwise. "May jump" is decided on a linear-sweep decoding (iced-x86) of
//! all the function's code (`CodeMap`): direct branch targets, the 256
//! table entries, code addresses the code itself takes (RIP-relative operands,
//! immediates), code pointers anywhere in the loaded data (absolute pointers
//! and `R_X86_64_RELATIVE` addends: switch tables of a non-PIE build), the
//! entries of relative switch tables the code points at, and whatever decodes
//! as a rel32 `jmp`/`jcc`/`call` at any byte of any executable section (code
//! the sweep did not cover). If the sweep meets bytes that are no instruction,
//! or a branch target or table entry falls inside an instruction, or a table
//! entry is outside the delimited code, no probe moves ([`Unmoved`]). The
//! probed instruction itself has not run yet when the BPF program runs,
//! which only reads memory; a moved probe runs after the handler's first
//! instructions, e.g. after it stored the frame's instruction pointer.

use std::{fmt, ops::Range, path::PathBuf};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};

use crate::elf::{ElfError, ElfImage, Section, Symbol};
use crate::python::{
    dwarf::{DwarfError, DwarfInfo},
    offsets::{FrameLink, Layout, ResumeOpcodes},
    version::PythonVersion,
};

/// The interpreter loop's symbol.
pub const EVAL_FRAME: &str = "_PyEval_EvalFrameDefault";

/// Entries in the computed-goto dispatch table: one per opcode byte.
pub const OPCODE_TABLE_LEN: usize = 256;

/// Bytes per table entry (a code pointer).
const POINTER: u64 = 8;

/// Largest function body scanned for branch instructions (the real one is
/// 50-60 KB; this only bounds garbage symbol sizes).
const MAX_FUNCTION_BYTES: u64 = 16 << 20;

/// Distinct places inside an FDE that `_PyEval_EvalFrameDefault` must jump
/// to for the FDE to count as its split-off part.
const MIN_COLD_ENTRIES: usize = 2;

/// Most instructions decoded from a handler's start when looking for one the
/// kernel emulates.
pub const MAX_WALK: usize = 64;

/// Most entries read from one candidate relative switch table.
const MAX_SWITCH_TABLE: u64 = 4096;

/// What runs at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SiteKind {
    /// The entry of `_PyEval_EvalFrameDefault` (3.8-3.10: one hit per Python
    /// frame, including each generator resumption).
    EvalEntry,
    /// The handler of a RESUME-family opcode (3.11+).
    Resume {
        /// Opcode number.
        opcode: u8,
        /// CPython's name of the opcode, e.g. `RESUME_CHECK`.
        name: &'static str,
    },
    /// The handler of an opcode that leaves the frame by returning or
    /// yielding (3.11+, [`find_exit_sites`]).
    Exit {
        /// Opcode number.
        opcode: u8,
        /// CPython's name of the opcode, e.g. `RETURN_VALUE`.
        name: &'static str,
    },
}

impl SiteKind {
    /// Whether the site only runs while `sys.monitoring` or `sys.settrace`
    /// instruments the code (`INSTRUMENTED_RESUME`).
    pub fn only_when_instrumented(&self) -> bool {
        match self {
            SiteKind::EvalEntry => false,
            SiteKind::Resume { name, .. } | SiteKind::Exit { name, .. } => {
                name.starts_with("INSTRUMENTED_")
            }
        }
    }
}

/// Where the running thread's current frame is kept (3.11+). An exit
/// handler soon makes the caller the current frame, and the program reads
/// the frame that leaves from there, so an exit site's probe is not moved
/// past a store that may be that change ([`Unmoved::Store`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CurrentFrameSlot {
    /// `cframe.current_frame`, in a `_PyCFrame` local to the eval loop
    /// (3.11, 3.12): any store to the stack may be it.
    StackLocal,
    /// `tstate->current_frame` (3.13+): any store at this displacement from
    /// a register may be it, as may stores whose address is implicit.
    ThreadState {
        /// Offset of the field in the thread state.
        offset: u64,
    },
}

impl CurrentFrameSlot {
    /// The slot for a version's link from thread state to frame.
    pub fn of(link: FrameLink) -> Self {
        match link {
            FrameLink::ViaCFrame { .. } => CurrentFrameSlot::StackLocal,
            FrameLink::Direct(offset) => CurrentFrameSlot::ThreadState { offset },
        }
    }

    /// Whether `insn` (not a branch) may write the slot.
    fn may_write(self, insn: &Instruction) -> bool {
        if insn.op_count() == 0 {
            return false;
        }
        match insn.op0_kind() {
            OpKind::Memory => match self {
                CurrentFrameSlot::StackLocal => matches!(
                    insn.memory_base(),
                    Register::RSP | Register::RBP | Register::ESP | Register::EBP
                ),
                CurrentFrameSlot::ThreadState { offset } => insn.memory_displacement64() == offset,
            },
            kind => is_memory(kind),
        }
    }
}

/// A callee-saved register: where `_PyEval_EvalFrameDefault` may keep its
/// `frame` local across the calls its handlers make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum FrameRegister {
    /// `rbx`.
    Rbx,
    /// `rbp`.
    Rbp,
    /// `r12`.
    R12,
    /// `r13`.
    R13,
    /// `r14`.
    R14,
    /// `r15`.
    R15,
}

impl FrameRegister {
    const ALL: [FrameRegister; 6] = [
        FrameRegister::Rbx,
        FrameRegister::Rbp,
        FrameRegister::R12,
        FrameRegister::R13,
        FrameRegister::R14,
        FrameRegister::R15,
    ];

    fn iced(self) -> Register {
        match self {
            FrameRegister::Rbx => Register::RBX,
            FrameRegister::Rbp => Register::RBP,
            FrameRegister::R12 => Register::R12,
            FrameRegister::R13 => Register::R13,
            FrameRegister::R14 => Register::R14,
            FrameRegister::R15 => Register::R15,
        }
    }

    fn of(register: Register) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.iced() == register.full_register())
    }

    /// Its number for the BPF side (`pyprobe_common::calls::REG_*`).
    pub fn bpf_index(self) -> u8 {
        use pyprobe_common::calls as c;
        match self {
            FrameRegister::Rbx => c::REG_RBX,
            FrameRegister::Rbp => c::REG_RBP,
            FrameRegister::R12 => c::REG_R12,
            FrameRegister::R13 => c::REG_R13,
            FrameRegister::R14 => c::REG_R14,
            FrameRegister::R15 => c::REG_R15,
        }
    }

    /// Whether `insn` may write the register (judged by its operands, and
    /// the few instructions that write one implicitly).
    fn written_by(self, insn: &Instruction) -> bool {
        let reg = self.iced();
        let is = |i: u32| {
            insn.op_kind(i) == OpKind::Register && insn.op_register(i).full_register() == reg
        };
        match insn.mnemonic() {
            Mnemonic::Xchg | Mnemonic::Xadd => (0..insn.op_count()).any(is),
            Mnemonic::Leave => reg == Register::RBP,
            Mnemonic::Cpuid => reg == Register::RBX,
            _ => insn.op_count() > 0 && is(0),
        }
    }
}

impl fmt::Display for FrameRegister {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameRegister::Rbx => "rbx",
            FrameRegister::Rbp => "rbp",
            FrameRegister::R12 => "r12",
            FrameRegister::R13 => "r13",
            FrameRegister::R14 => "r14",
            FrameRegister::R15 => "r15",
        })
    }
}

/// What a probe must not be moved past: a change of the thread's current
/// frame (exit sites, [`CurrentFrameSlot`]) or of the register the frame is
/// read from ([`FrameRegister`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Guard {
    slot: Option<CurrentFrameSlot>,
    register: Option<FrameRegister>,
}

impl Guard {
    fn stops_at(&self, insn: &Instruction) -> bool {
        self.slot.is_some_and(|slot| slot.may_write(insn))
            || self.register.is_some_and(|reg| reg.written_by(insn))
    }
}

/// Where a site's address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SiteSource {
    /// The symbol table (`_PyEval_EvalFrameDefault` itself).
    Symbol,
    /// The opcode dispatch table at this virtual address.
    OpcodeTable {
        /// Link-time virtual address of `opcode_targets`.
        table: u64,
    },
    /// A DWARF `TARGET_<OPNAME>` label.
    DwarfLabel,
}

/// An x86-64 instruction that the kernel's uprobe code emulates instead of
/// single-stepping it out of line, in the exact encodings accepted here (no
/// prefix, except REX.B `41` on `push`; the kernel refuses a branch with a
/// `66` prefix outright).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Emulated {
    /// `jcc rel8` (`70`-`7f`) or `jcc rel32` (`0f 80`-`0f 8f`).
    Jcc,
    /// `jmp rel8` (`eb`) or `jmp rel32` (`e9`).
    Jmp,
    /// `call rel32` (`e8`).
    Call,
    /// `push r64` (`50`-`57`, or `41 50`-`41 57` for `r8`-`r15`).
    Push,
}

impl Emulated {
    /// The kind of the one instruction whose whole encoding is `bytes`, if
    /// the kernel emulates it.
    pub fn of(bytes: &[u8]) -> Option<Self> {
        match *bytes {
            [0x70..=0x7f, _] | [0x0f, 0x80..=0x8f, _, _, _, _] => Some(Self::Jcc),
            [0xeb, _] | [0xe9, _, _, _, _] => Some(Self::Jmp),
            [0xe8, _, _, _, _] => Some(Self::Call),
            [0x50..=0x57] | [0x41, 0x50..=0x57] => Some(Self::Push),
            _ => None,
        }
    }

    /// Lower-case name: `jcc`, `jmp`, `call` or `push`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Jcc => "jcc",
            Self::Jmp => "jmp",
            Self::Call => "call",
            Self::Push => "push",
        }
    }
}

impl fmt::Display for Emulated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the probe of a site is, relative to the code it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Placement {
    /// At the first instruction of the handler (or function).
    Start {
        /// Why it is not moved.
        reason: Unmoved,
    },
    /// Moved into the handler's first basic block, onto the first
    /// instruction there that the kernel emulates (see the module docs).
    Moved {
        /// That instruction.
        instruction: Emulated,
        /// How many instructions of the handler run before it.
        skipped: usize,
    },
}

/// Why a probe stays at the start of its handler (or function).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Unmoved {
    /// It is a function's entry, not an opcode handler (3.8-3.10).
    FunctionEntry,
    /// The handler was found through a DWARF label: without the dispatch
    /// table not every address the code jumps to is known.
    NoDispatchTable,
    /// A table entry, at `entry`, is outside the code delimited as
    /// `_PyEval_EvalFrameDefault`'s, so the branches into the handler are
    /// not all known.
    UnknownCode {
        /// The entry.
        entry: u64,
    },
    /// The file's section headers or relocations could not be read, so the
    /// code pointers in its data are not known.
    DataUnreadable,
    /// The function's code does not decode consistently at `at`: bytes that
    /// are no instruction, or a branch target or table entry inside an
    /// instruction.
    Undecodable {
        /// Where.
        at: u64,
    },
    /// The handler's first instruction is emulated already.
    StartEmulated {
        /// That instruction.
        instruction: Emulated,
    },
    /// The handler's first basic block ends at `at` (an indirect jump, a
    /// return, a branch the kernel does not emulate, or the end of the code)
    /// before any emulated instruction.
    BlockEnds {
        /// Where.
        at: u64,
    },
    /// None of the handler's first [`MAX_WALK`] instructions is emulated.
    TooFar,
    /// An instruction at `at`, before the first emulated one, may change
    /// the thread's current frame, which an exit site must read before
    /// that ([`CurrentFrameSlot`]), or the register the frame is read from
    /// ([`FrameRegister`]).
    Store {
        /// Where.
        at: u64,
    },
    /// The first emulated instruction is at `site`, but the code may jump to
    /// `target`, after the handler's start and not after `site`: a probe
    /// there could run without a start, or twice for one.
    BranchTarget {
        /// The first such address.
        target: u64,
        /// The instruction the probe would have moved to.
        site: u64,
    },
}

impl Unmoved {
    /// A few words for one-line reports; addresses are given relative to
    /// `handler` (the handler's virtual address) when they follow it, e.g.
    /// `branch target +0x8`.
    pub fn short(&self, handler: u64) -> String {
        let at = |address: u64| match address.checked_sub(handler) {
            Some(offset) => format!("+{offset:#x}"),
            None => format!("vaddr {address:#x}"),
        };
        match *self {
            Unmoved::FunctionEntry => "function entry".into(),
            Unmoved::NoDispatchTable => "no table".into(),
            Unmoved::UnknownCode { .. } => "code bounds unknown".into(),
            Unmoved::DataUnreadable => "data unreadable".into(),
            Unmoved::Undecodable { at: address } => format!("undecodable at {}", at(address)),
            Unmoved::StartEmulated { instruction } => instruction.name().into(),
            Unmoved::BlockEnds { at: address } => format!("block ends at {}", at(address)),
            Unmoved::TooFar => format!("no emulated instruction in {MAX_WALK}"),
            Unmoved::Store { at: address } => format!("store at {}", at(address)),
            Unmoved::BranchTarget { target, .. } => format!("branch target {}", at(target)),
        }
    }
}

impl fmt::Display for Unmoved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmoved::FunctionEntry => write!(f, "a function entry"),
            Unmoved::NoDispatchTable => write!(
                f,
                "found through DWARF, without the dispatch table, so not every branch target is known"
            ),
            Unmoved::UnknownCode { entry } => write!(
                f,
                "the table entry {entry:#x} is outside the code delimited as {EVAL_FRAME}'s"
            ),
            Unmoved::DataUnreadable => write!(
                f,
                "the file's sections or relocations are unreadable, so the code pointers in \
                 its data are not known"
            ),
            Unmoved::Undecodable { at } => {
                write!(
                    f,
                    "{EVAL_FRAME}'s code does not decode consistently at {at:#x}"
                )
            }
            Unmoved::StartEmulated { instruction } => {
                write!(
                    f,
                    "its first instruction ({instruction}) is emulated already"
                )
            }
            Unmoved::BlockEnds { at } => write!(
                f,
                "its first basic block ends at {at:#x} before any emulated instruction"
            ),
            Unmoved::TooFar => write!(f, "none of its first {MAX_WALK} instructions is emulated"),
            Unmoved::Store { at } => write!(
                f,
                "the instruction at {at:#x}, before the first emulated one, may change the \
                 thread's current frame or the register holding the frame"
            ),
            Unmoved::BranchTarget { target, site } => write!(
                f,
                "the code may jump to {target:#x}, between its start and the first emulated \
                 instruction at {site:#x}"
            ),
        }
    }
}

/// A code address where Python function starts execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StartSite {
    /// Link-time virtual address of the probe.
    pub vaddr: u64,
    /// Offset in the ELF file of the probe: where a uprobe attaches.
    pub file_offset: u64,
    /// Link-time virtual address of the handler (or function) the probe is
    /// in: where the probe would be without [`Placement::Moved`].
    pub handler_vaddr: u64,
    /// Offset in the ELF file of `handler_vaddr`.
    pub handler_file_offset: u64,
    /// What runs there.
    pub kind: SiteKind,
    /// How the handler's address was found.
    pub source: SiteSource,
    /// Where in the handler the probe is.
    pub placement: Placement,
}

impl StartSite {
    /// A site at the start of its code.
    fn at_start(
        vaddr: u64,
        file_offset: u64,
        kind: SiteKind,
        source: SiteSource,
        reason: Unmoved,
    ) -> Self {
        Self {
            vaddr,
            file_offset,
            handler_vaddr: vaddr,
            handler_file_offset: file_offset,
            kind,
            source,
            placement: Placement::Start { reason },
        }
    }

    /// Whether the probe was moved off the handler's start.
    pub fn moved(&self) -> bool {
        matches!(self.placement, Placement::Moved { .. })
    }

    /// A short description for one-line reports (file offsets), e.g.
    /// `RESUME_CHECK(207)@0x90a87→0x90aa2(jcc)` for a probe moved onto a
    /// `jcc`, `RESUME(149)@0x90a49(branch target +0x8)` for one left at the
    /// handler's start (addresses in the reason are relative to the handler).
    pub fn describe(&self) -> String {
        let name = match self.kind {
            SiteKind::EvalEntry => return format!("{EVAL_FRAME}@{:#x}", self.file_offset),
            SiteKind::Resume { opcode, name } | SiteKind::Exit { opcode, name } => {
                format!("{name}({opcode})")
            }
        };
        match self.placement {
            Placement::Moved { instruction, .. } => format!(
                "{name}@{:#x}→{:#x}({instruction})",
                self.handler_file_offset, self.file_offset
            ),
            Placement::Start { reason } => {
                format!(
                    "{name}@{:#x}({})",
                    self.file_offset,
                    reason.short(self.handler_vaddr)
                )
            }
        }
    }
}

impl fmt::Display for StartSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SiteKind::EvalEntry => write!(f, "entry of {EVAL_FRAME}")?,
            SiteKind::Resume { opcode, name } | SiteKind::Exit { opcode, name } => {
                write!(f, "handler of {name} ({opcode})")?
            }
        }
        write!(
            f,
            " at {:#x} (file offset {:#x}, from ",
            self.handler_vaddr, self.handler_file_offset
        )?;
        match self.source {
            SiteSource::Symbol => write!(f, "the symbol table)")?,
            SiteSource::OpcodeTable { table } => write!(f, "the opcode table at {table:#x})")?,
            SiteSource::DwarfLabel => write!(f, "a DWARF label)")?,
        }
        match self.placement {
            Placement::Start {
                reason: Unmoved::FunctionEntry,
            } => Ok(()),
            Placement::Start { reason } => write!(f, "; probed at its start: {reason}"),
            Placement::Moved {
                instruction,
                skipped,
            } => write!(
                f,
                "; probed {skipped} instructions in, at the {instruction} at {:#x} (file offset \
                 {:#x})",
                self.vaddr, self.file_offset
            ),
        }
    }
}

/// How the opcode table was located.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum TableOrigin {
    /// A `.symtab`/`.dynsym` symbol (`opcode_targets` or `opcode_targets.N`).
    Symbol {
        /// The symbol's name.
        name: String,
    },
    /// Scanning the loaded data for a run of 256 code pointers.
    Scan,
}

/// What the table's 256 entries were required to point into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CodeBounds {
    /// The code of `_PyEval_EvalFrameDefault`, its split-off parts included.
    Function,
    /// Any executable section (fallback when the function's parts could not
    /// be delimited; the table must then be unique).
    ExecutableSections,
}

/// `_PyEval_EvalFrameDefault`'s computed-goto dispatch table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpcodeTable {
    /// Link-time virtual address of the table.
    pub vaddr: u64,
    /// The 256 handler addresses (link-time), indexed by opcode.
    pub targets: Vec<u64>,
    /// How it was found.
    pub origin: TableOrigin,
    /// What the entries were checked against.
    pub bounds: CodeBounds,
    /// The code ranges of `_PyEval_EvalFrameDefault` (its symbol's, then its
    /// split-off parts'), as delimited when the table was searched.
    pub code: Vec<Range<u64>>,
}

impl OpcodeTable {
    /// The handler of `opcode` (`None` only if `targets` is short).
    pub fn target(&self, opcode: u8) -> Option<u64> {
        self.targets.get(usize::from(opcode)).copied()
    }

    /// The handler shared by the most opcodes, when more than one shares it:
    /// the one for opcodes the build does not define (`_unknown_opcode`).
    pub fn catch_all(&self) -> Option<u64> {
        let mut sorted = self.targets.clone();
        sorted.sort_unstable();
        let mut best: Option<(u64, usize)> = None;
        for run in sorted.chunk_by(|a, b| a == b) {
            if run.len() > 1 && best.is_none_or(|(_, n)| run.len() > n) {
                best = Some((run[0], run.len()));
            }
        }
        best.map(|(target, _)| target)
    }
}

/// Errors from finding start sites.
#[derive(Debug, thiserror::Error)]
pub enum StartSitesError {
    /// Reading the ELF file failed.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// The file has no `_PyEval_EvalFrameDefault`.
    #[error(
        "{path} has no symbol {EVAL_FRAME}: it is not a CPython interpreter \
         (probe the python executable, or the libpython it loads)"
    )]
    NoEvalFrame {
        /// The file.
        path: PathBuf,
    },
    /// The file is not for x86-64.
    #[error(
        "{path} is an ELF file for machine {machine}, not x86-64: \
         pyprobe only reads x86-64 interpreters"
    )]
    UnsupportedMachine {
        /// The file.
        path: PathBuf,
        /// `e_machine`.
        machine: u16,
    },
    /// No dispatch table fits.
    #[error(
        "no opcode dispatch table (256 code pointers into {EVAL_FRAME}, \
         `opcode_targets`) in {path}: {reason}"
    )]
    TableNotFound {
        /// The file.
        path: PathBuf,
        /// What was tried.
        reason: String,
    },
    /// Several runs of 256 pointers fit equally well.
    #[error(
        "{} candidate opcode dispatch tables in {path} (at {}); cannot tell which one \
         {EVAL_FRAME} uses", candidates.len(), hex_list(candidates)
    )]
    AmbiguousTable {
        /// The file.
        path: PathBuf,
        /// Virtual addresses of the candidates.
        candidates: Vec<u64>,
    },
    /// A RESUME opcode's table entry is the handler of undefined opcodes.
    #[error(
        "the opcode table of {path} sends {name} ({opcode}) to {target:#x}, the handler \
         of undefined opcodes: the RESUME opcode numbers for CPython {version} in \
         offsets.rs do not match this build (compare with `python -c 'import opcode; \
         print(opcode.opmap)'`)"
    )]
    UndefinedOpcode {
        /// The file.
        path: PathBuf,
        /// Version the numbers were taken for.
        version: String,
        /// Opcode name.
        name: &'static str,
        /// Opcode number.
        opcode: u8,
        /// Its table entry.
        target: u64,
    },
    /// The DWARF has no `TARGET_<name>` label in `_PyEval_EvalFrameDefault`.
    #[error(
        "the DWARF of {path} has no label TARGET_{name} in {EVAL_FRAME} \
         (was the interpreter built without computed gotos?)"
    )]
    LabelNotFound {
        /// The file.
        path: PathBuf,
        /// Opcode name.
        name: &'static str,
    },
    /// The DWARF could not be read.
    #[error("reading the DWARF of {path}: {source}")]
    Dwarf {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: DwarfError,
    },
    /// Neither the table nor DWARF labels gave the handlers.
    #[error(
        "cannot find where CPython {version} starts Python functions in {path}: {table}; \
         and {dwarf}. Probe a build that keeps its debug information (e.g. pyenv's), or \
         report this binary"
    )]
    NotFound {
        /// The file.
        path: PathBuf,
        /// The interpreter's version.
        version: String,
        /// Why the opcode table was not found.
        table: Box<StartSitesError>,
        /// Why the DWARF labels did not help.
        dwarf: String,
    },
}

fn hex_list(values: &[u64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds every site where a Python function start executes in `image`, the
/// interpreter of CPython `version` with behaviour flags `layout`.
///
/// 3.8-3.10: the entry of `_PyEval_EvalFrameDefault`. 3.11+: the handlers of
/// `layout.resume_opcodes`, from the opcode table when found, else from the
/// DWARF labels (the DWARF is parsed only then). Sites with the same address
/// are reported once (the first opcode in [`ResumeOpcodes::all`] order).
pub fn find_start_sites(
    image: &ElfImage,
    version: &PythonVersion,
    layout: &Layout,
) -> Result<Vec<StartSite>, StartSitesError> {
    let Some(opcodes) = layout.resume_opcodes else {
        let eval = eval_symbol(image)?;
        return Ok(vec![StartSite::at_start(
            eval.vaddr,
            image.vaddr_to_file_offset(eval.vaddr)?,
            SiteKind::EvalEntry,
            SiteSource::Symbol,
            Unmoved::FunctionEntry,
        )]);
    };
    let resume: Vec<_> = opcodes.all().collect();
    find_opcode_sites(image, version, &resume, resume_kind, Guard::default())
}

/// Finds the handlers of the opcodes that leave a frame by returning or
/// yielding ([`Layout::exit_opcodes`], 3.11+) in `image`, like
/// [`find_start_sites`] finds the RESUME family; none for 3.8-3.10. A probe
/// is moved only if nothing before its new place may change the thread's
/// current frame, kept in `slot` ([`Unmoved::Store`]).
pub fn find_exit_sites(
    image: &ElfImage,
    version: &PythonVersion,
    layout: &Layout,
    slot: CurrentFrameSlot,
) -> Result<Vec<StartSite>, StartSitesError> {
    let Some(opcodes) = layout.exit_opcodes else {
        return Ok(Vec::new());
    };
    let exits: Vec<_> = opcodes.all().collect();
    let guard = Guard {
        slot: Some(slot),
        register: None,
    };
    find_opcode_sites(image, version, &exits, exit_kind, guard)
}

/// Where `pyprobe calls` probes one interpreter, and how its programs find
/// the frame there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSites {
    /// Where functions start ([`find_start_sites`]).
    pub starts: Vec<StartSite>,
    /// Where frames return or yield ([`find_exit_sites`]; empty unless
    /// asked for, and for 3.8-3.10).
    pub exits: Vec<StartSite>,
    /// The register holding the starting (or leaving) frame at every one
    /// of those sites, when the build has one ([`find_probe_sites`]).
    pub frame_register: Option<FrameRegister>,
}

/// The start sites, the exit sites when `exits` is set, and the register
/// `_PyEval_EvalFrameDefault` keeps its `frame` in at them (3.11+).
///
/// The register is found from the code, so stripped builds have it too:
/// nearly every opcode handler starts by storing the next instruction's
/// address into the frame (`mov %reg, instruction_offset(%frame)`). If one
/// callee-saved register is the base of that store in at least 90% (and at
/// least 32) of the handlers that have one, it holds `frame` at handler
/// entries, and no probe is moved past an instruction that may write it
/// (exit probes then need not stay before stores to the current frame).
/// `instruction_offset` is the frame's `prev_instr`/`instr_ptr` offset;
/// `slot` is where the current frame is kept (for exit probes).
pub fn find_probe_sites(
    image: &ElfImage,
    version: &PythonVersion,
    layout: &Layout,
    instruction_offset: u64,
    slot: CurrentFrameSlot,
    exits: bool,
) -> Result<ProbeSites, StartSitesError> {
    let (Some(resume), Ok(table)) = (layout.resume_opcodes, find_opcode_table(image)) else {
        // 3.8-3.10, or the handlers come from DWARF: no register.
        return Ok(ProbeSites {
            starts: find_start_sites(image, version, layout)?,
            exits: if exits {
                find_exit_sites(image, version, layout, slot)?
            } else {
                Vec::new()
            },
            frame_register: None,
        });
    };
    let register = detect_frame_register(image, &table, instruction_offset);
    let resume: Vec<_> = resume.all().collect();
    let starts = opcode_sites_from_table(
        image,
        &table,
        &resume,
        resume_kind,
        Guard {
            slot: None,
            register,
        },
        version,
    )?;
    let exits = match layout.exit_opcodes {
        Some(opcodes) if exits => {
            let opcodes: Vec<_> = opcodes.all().collect();
            // The exit program reads the frame where the start program
            // does: the register, else the thread's current frame.
            let guard = Guard {
                slot: if register.is_some() { None } else { Some(slot) },
                register,
            };
            opcode_sites_from_table(image, &table, &opcodes, exit_kind, guard, version)?
        }
        _ => Vec::new(),
    };
    Ok(ProbeSites {
        starts,
        exits,
        frame_register: register,
    })
}

/// Handlers whose instruction-pointer store names the frame register, at
/// least.
const MIN_FRAME_STORES: usize = 32;

/// Instructions decoded from a handler's start looking for its
/// instruction-pointer store.
const FRAME_STORE_WALK: usize = 12;

/// The register most handlers store the instruction pointer through, if
/// it clearly is one (see [`find_probe_sites`]).
fn detect_frame_register(
    image: &ElfImage,
    table: &OpcodeTable,
    instruction_offset: u64,
) -> Option<FrameRegister> {
    let mut handlers: Vec<u64> = table.targets.clone();
    handlers.sort_unstable();
    handlers.dedup();
    let mut bases: std::collections::BTreeMap<FrameRegister, usize> = Default::default();
    let mut stores = 0usize;
    for handler in handlers {
        let Some(bytes) = image.bytes_at_vaddr(handler, FRAME_STORE_WALK * 15) else {
            continue;
        };
        let mut decoder = Decoder::with_ip(64, bytes, handler, DecoderOptions::NONE);
        let mut insn = Instruction::default();
        for _ in 0..FRAME_STORE_WALK {
            if !decoder.can_decode() {
                break;
            }
            decoder.decode_out(&mut insn);
            if insn.is_invalid() || insn.flow_control() != FlowControl::Next {
                break;
            }
            let store = insn.mnemonic() == Mnemonic::Mov
                && insn.op0_kind() == OpKind::Memory
                && insn.memory_index() == Register::None
                && insn.memory_displacement64() == instruction_offset
                && insn.op1_kind() == OpKind::Register
                && insn.op1_register().size() == 8;
            if store {
                stores += 1;
                if let Some(base) = FrameRegister::of(insn.memory_base()) {
                    *bases.entry(base).or_default() += 1;
                }
                break;
            }
        }
    }
    let (&register, &count) = bases.iter().max_by_key(|(_, n)| **n)?;
    (count >= MIN_FRAME_STORES && count * 10 >= stores * 9).then_some(register)
}

fn resume_kind(opcode: u8, name: &'static str) -> SiteKind {
    SiteKind::Resume { opcode, name }
}

fn exit_kind(opcode: u8, name: &'static str) -> SiteKind {
    SiteKind::Exit { opcode, name }
}

/// The handlers of `opcodes`, from the opcode table when found, else from
/// the DWARF labels; `kind` says what runs there, `guard` what a probe
/// must not be moved past.
fn find_opcode_sites(
    image: &ElfImage,
    version: &PythonVersion,
    opcodes: &[(&'static str, u8)],
    kind: fn(u8, &'static str) -> SiteKind,
    guard: Guard,
) -> Result<Vec<StartSite>, StartSitesError> {
    let table_error = match find_opcode_table(image) {
        Ok(table) => {
            return opcode_sites_from_table(image, &table, opcodes, kind, guard, version);
        }
        Err(
            e @ (StartSitesError::NoEvalFrame { .. } | StartSitesError::UnsupportedMachine { .. }),
        ) => {
            return Err(e);
        }
        Err(e) => e,
    };
    let not_found = |dwarf: String| StartSitesError::NotFound {
        path: image.path().to_owned(),
        version: version.to_string(),
        table: Box::new(table_error),
        dwarf,
    };
    match DwarfInfo::parse(image.data()) {
        Ok(Some(dwarf)) => match opcode_sites_from_dwarf(image, &dwarf, opcodes, kind) {
            Ok(sites) => Ok(sites),
            Err(e) => Err(not_found(e.to_string())),
        },
        Ok(None) => Err(not_found(
            "the file has no DWARF (separate debug files are not read)".into(),
        )),
        Err(e) => Err(not_found(format!("its DWARF is unreadable: {e}"))),
    }
}

/// The handlers of `opcodes` in `table`, as sites, each probe moved onto an
/// emulated instruction when that is safe ([`Placement`]). Fails if one of
/// them is the catch-all handler of undefined opcodes (the numbers do not fit
/// the build).
pub fn sites_from_table(
    image: &ElfImage,
    table: &OpcodeTable,
    opcodes: &ResumeOpcodes,
    version: &PythonVersion,
) -> Result<Vec<StartSite>, StartSitesError> {
    let opcodes: Vec<_> = opcodes.all().collect();
    opcode_sites_from_table(
        image,
        table,
        &opcodes,
        resume_kind,
        Guard::default(),
        version,
    )
}

/// [`sites_from_table`] for any opcodes, `kind` saying what runs there;
/// no probe is moved past an instruction the `guard` stops at.
fn opcode_sites_from_table(
    image: &ElfImage,
    table: &OpcodeTable,
    opcodes: &[(&'static str, u8)],
    kind: fn(u8, &'static str) -> SiteKind,
    guard: Guard,
    version: &PythonVersion,
) -> Result<Vec<StartSite>, StartSitesError> {
    let catch_all = table.catch_all();
    let mut sites = Vec::new();
    for &(name, opcode) in opcodes {
        let Some(target) = table.target(opcode) else {
            return Err(StartSitesError::TableNotFound {
                path: image.path().to_owned(),
                reason: format!("the table has {} entries, not 256", table.targets.len()),
            });
        };
        if Some(target) == catch_all {
            return Err(StartSitesError::UndefinedOpcode {
                path: image.path().to_owned(),
                version: version.to_string(),
                name,
                opcode,
                target,
            });
        }
        sites.push(StartSite::at_start(
            target,
            image.vaddr_to_file_offset(target)?,
            kind(opcode, name),
            SiteSource::OpcodeTable { table: table.vaddr },
            Unmoved::NoDispatchTable,
        ));
    }
    let sites = dedup(sites);
    let mut code = match CodeMap::new(image, table) {
        Ok(code) => code,
        Err(reason) => {
            return Ok(sites
                .into_iter()
                .map(|site| StartSite {
                    placement: Placement::Start { reason },
                    ..site
                })
                .collect());
        }
    };
    let windows: Vec<Range<u64>> = sites
        .iter()
        .filter_map(|site| {
            let (at, _, _) = code.candidate(site.handler_vaddr, guard).ok()?;
            Some(site.handler_vaddr + 1..at + 1)
        })
        .collect();
    code.add_far_branches(image, &windows);
    sites
        .into_iter()
        .map(|site| code.place(image, site, guard))
        .collect()
}

/// The handlers of `opcodes` from the DWARF labels `TARGET_<name>` in
/// `_PyEval_EvalFrameDefault` (all of them if a name labels several
/// addresses).
pub fn sites_from_dwarf(
    image: &ElfImage,
    dwarf: &DwarfInfo,
    opcodes: &ResumeOpcodes,
) -> Result<Vec<StartSite>, StartSitesError> {
    let opcodes: Vec<_> = opcodes.all().collect();
    opcode_sites_from_dwarf(image, dwarf, &opcodes, resume_kind)
}

/// [`sites_from_dwarf`] for any opcodes, `kind` saying what runs there.
fn opcode_sites_from_dwarf(
    image: &ElfImage,
    dwarf: &DwarfInfo,
    opcodes: &[(&'static str, u8)],
    kind: fn(u8, &'static str) -> SiteKind,
) -> Result<Vec<StartSite>, StartSitesError> {
    let dwarf_error = |source| StartSitesError::Dwarf {
        path: image.path().to_owned(),
        source,
    };
    let labels = dwarf.labels_in(EVAL_FRAME).map_err(dwarf_error)?;
    let mut sites = Vec::new();
    for &(name, opcode) in opcodes {
        let label = format!("TARGET_{name}");
        let before = sites.len();
        for &(_, vaddr) in labels.iter().filter(|(n, _)| *n == label) {
            sites.push(StartSite::at_start(
                vaddr,
                image.vaddr_to_file_offset(vaddr)?,
                kind(opcode, name),
                SiteSource::DwarfLabel,
                Unmoved::NoDispatchTable,
            ));
        }
        if sites.len() == before {
            return Err(StartSitesError::LabelNotFound {
                path: image.path().to_owned(),
                name,
            });
        }
    }
    Ok(dedup(sites))
}

/// Keeps the first site of each handler address, in order.
fn dedup(sites: Vec<StartSite>) -> Vec<StartSite> {
    let mut out: Vec<StartSite> = Vec::with_capacity(sites.len());
    for site in sites {
        if !out.iter().any(|s| s.handler_vaddr == site.handler_vaddr) {
            out.push(site);
        }
    }
    out
}

fn eval_symbol(image: &ElfImage) -> Result<Symbol, StartSitesError> {
    image.symbol(EVAL_FRAME).map_err(|e| match e {
        ElfError::SymbolNotFound { path, .. } => StartSitesError::NoEvalFrame { path },
        other => other.into(),
    })
}

/// Finds `_PyEval_EvalFrameDefault`'s dispatch table (see the module docs).
pub fn find_opcode_table(image: &ElfImage) -> Result<OpcodeTable, StartSitesError> {
    search_opcode_table(image, true)
}

/// [`find_opcode_table`], optionally ignoring the table's symbol (to test
/// the scan on builds that have it).
fn search_opcode_table(image: &ElfImage, use_symbol: bool) -> Result<OpcodeTable, StartSitesError> {
    let machine = image.machine();
    if machine != object::elf::EM_X86_64 {
        return Err(StartSitesError::UnsupportedMachine {
            path: image.path().to_owned(),
            machine,
        });
    }
    let eval = eval_symbol(image)?;
    let sections = image.sections()?;
    let data = DataReader {
        image,
        relocations: image.relative_relocations()?,
    };
    let function = function_code(image, &eval);
    let executable: Vec<Range<u64>> = sections
        .iter()
        .filter(|s| s.alloc && s.exec && s.file_backed)
        .map(|s| s.vaddr..s.vaddr.saturating_add(s.size))
        .collect();
    let symbols = if use_symbol {
        image.symbols_where(is_table_symbol)?
    } else {
        Vec::new()
    };

    let mut tried = Vec::new();
    for (bounds, code) in [
        (CodeBounds::Function, &function),
        (CodeBounds::ExecutableSections, &executable),
    ] {
        let inside = |v: u64| code.iter().any(|r| r.contains(&v));
        for sym in &symbols {
            match data.table_at(sym.vaddr) {
                Some(targets) if targets.iter().all(|&t| inside(t)) => {
                    return Ok(OpcodeTable {
                        vaddr: sym.vaddr,
                        targets,
                        origin: TableOrigin::Symbol {
                            name: sym.name.clone(),
                        },
                        bounds,
                        code: function.clone(),
                    });
                }
                _ => tried.push(format!(
                    "symbol {} at {:#x} does not hold 256 pointers into {}",
                    sym.name,
                    sym.vaddr,
                    describe_bounds(bounds)
                )),
            }
        }
        let mut candidates = data.scan(&sections, inside);
        match candidates.len() {
            0 => tried.push(format!(
                "no run of exactly 256 pointers into {} in the loaded data",
                describe_bounds(bounds)
            )),
            1 => {
                let (vaddr, targets) = candidates.remove(0);
                return Ok(OpcodeTable {
                    vaddr,
                    targets,
                    origin: TableOrigin::Scan,
                    bounds,
                    code: function.clone(),
                });
            }
            _ => {
                return Err(StartSitesError::AmbiguousTable {
                    path: image.path().to_owned(),
                    candidates: candidates.into_iter().map(|(v, _)| v).collect(),
                });
            }
        }
    }
    Err(StartSitesError::TableNotFound {
        path: image.path().to_owned(),
        reason: tried.join("; "),
    })
}

fn describe_bounds(bounds: CodeBounds) -> &'static str {
    match bounds {
        CodeBounds::Function => "the code of _PyEval_EvalFrameDefault",
        CodeBounds::ExecutableSections => "the executable sections",
    }
}

/// `opcode_targets` or GCC's local-static name for it, `opcode_targets.N`.
fn is_table_symbol(name: &str) -> bool {
    match name.strip_prefix("opcode_targets") {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('.')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// The callee-saved register `_PyEval_EvalFrameDefault` keeps its `frame`
/// in (3.11+, when the build has one; see [`find_probe_sites`]).
/// Found once per image: the layout and offset follow from the image's
/// version.
pub fn eval_frame_register(
    image: &ElfImage,
    layout: &Layout,
    instruction_offset: u64,
) -> Option<FrameRegister> {
    /// The fact, as [`ElfImage::derived`] keeps it.
    #[derive(Clone)]
    struct Fact(Option<FrameRegister>);
    image
        .derived(|image| {
            Fact(layout.resume_opcodes.and_then(|_| {
                let table = find_opcode_table(image).ok()?;
                detect_frame_register(image, &table, instruction_offset)
            }))
        })
        .0
}

/// The code ranges of `_PyEval_EvalFrameDefault` in `image` (link-time
/// addresses): its symbol, any `.cold` symbol of it, and the FDEs its body
/// branches into the middle of. Empty without the symbol. Found once per
/// image.
pub fn eval_loop_code(image: &ElfImage) -> Vec<Range<u64>> {
    /// The fact, as [`ElfImage::derived`] keeps it.
    #[derive(Clone)]
    struct Fact(Vec<Range<u64>>);
    image
        .derived(|image| {
            Fact(match image.symbol(EVAL_FRAME) {
                Ok(eval) => function_code(image, &eval),
                Err(_) => Vec::new(),
            })
        })
        .0
}

/// The code ranges of `_PyEval_EvalFrameDefault`: its symbol, any `.cold`
/// symbol of it, and the FDEs its body branches into the middle of.
fn function_code(image: &ElfImage, eval: &Symbol) -> Vec<Range<u64>> {
    let fdes = image.unwind_ranges();
    let fde_of = |address: u64| -> Option<Range<u64>> {
        let i = fdes
            .partition_point(|r| r.start <= address)
            .checked_sub(1)?;
        fdes[i..]
            .iter()
            .take_while(|r| r.start <= address)
            .find(|r| r.contains(&address))
            .cloned()
    };
    let main = if eval.size > 0 {
        eval.vaddr..eval.vaddr.saturating_add(eval.size)
    } else {
        match fde_of(eval.vaddr) {
            Some(range) => range,
            None => return Vec::new(),
        }
    };
    let mut code = vec![main.clone()];

    // `.symtab` names the split-off parts: `_PyEval_EvalFrameDefault.cold`.
    let cold_prefix = format!("{EVAL_FRAME}.");
    for sym in image
        .symbols_where(|name| name.starts_with(&cold_prefix))
        .unwrap_or_default()
    {
        let by_size = sym.vaddr..sym.vaddr.saturating_add(sym.size.max(1));
        code.push(fde_of(sym.vaddr).unwrap_or(by_size));
    }

    // Without symbols: the FDEs the body jumps into the middle of, at two
    // places or more (a cold part is entered from dozens of places; the
    // branch decoding below also yields a few stray single targets).
    let body = image
        .vaddr_to_file_offset(main.start)
        .ok()
        .and_then(|offset| {
            let len = usize::try_from((main.end - main.start).min(MAX_FUNCTION_BYTES)).ok()?;
            image.bytes_at(offset, len)
        })
        .unwrap_or_default();
    let mut entered: Vec<Range<u64>> = direct_branch_targets(body, main.start)
        .into_iter()
        .filter(|target| !main.contains(target))
        .filter_map(|target| fde_of(target).filter(|fde| fde.start != target))
        .collect();
    entered.sort_unstable_by_key(|r| (r.start, r.end));
    for entries in entered.chunk_by(|a, b| a == b) {
        if entries.len() >= MIN_COLD_ENTRIES && !code.contains(&entries[0]) {
            code.push(entries[0].clone());
        }
    }
    code
}

/// Targets of what decode as x86-64 `jmp rel32` (`e9`) and `jcc rel32`
/// (`0f 80`-`0f 8f`) at every byte of `code` (loaded at `vaddr`). Decoding
/// at every byte also finds bytes that are not instructions; the caller only
/// uses targets that land inside an FDE's body, which random bytes rarely do.
fn direct_branch_targets(code: &[u8], vaddr: u64) -> Vec<u64> {
    let rel32 = |at: usize| -> Option<i64> {
        let bytes: [u8; 4] = code.get(at..at + 4)?.try_into().ok()?;
        Some(i64::from(i32::from_le_bytes(bytes)))
    };
    let mut targets = Vec::new();
    for i in 0..code.len() {
        let (len, rel) = match (code[i], code.get(i + 1)) {
            (0xe9, _) => (5, rel32(i + 1)),
            (0x0f, Some(&op)) if op & 0xf0 == 0x80 => (6, rel32(i + 2)),
            _ => continue,
        };
        if let Some(rel) = rel {
            let next = vaddr.wrapping_add(i as u64 + len);
            targets.push(next.wrapping_add_signed(rel));
        }
    }
    targets.sort_unstable();
    targets.dedup();
    targets
}

/// `_PyEval_EvalFrameDefault`'s code decoded by a linear sweep, with every
/// address in it that control may reach other than by falling through from
/// the instruction before: what decides whether a probe may move
/// ([`CodeMap::place`]).
struct CodeMap<'a> {
    /// The code ranges and their bytes, sorted by address.
    parts: Vec<(Range<u64>, &'a [u8])>,
    /// The address of every decoded instruction, sorted.
    starts: Vec<u64>,
    /// Every address inside `parts` that may be jumped to, sorted, unique.
    targets: Vec<u64>,
}

impl<'a> CodeMap<'a> {
    /// Decodes `table.code` and gathers the addresses that may be jumped to
    /// (see the module docs). Fails, with the reason to give every site, if
    /// the code is not known or not decoded consistently: then no probe
    /// moves.
    fn new(image: &'a ElfImage, table: &OpcodeTable) -> Result<Self, Unmoved> {
        let mut ranges = table.code.clone();
        ranges.sort_unstable_by_key(|r| (r.start, r.end));
        let mut parts = Vec::with_capacity(ranges.len());
        for range in ranges {
            let bytes = range
                .end
                .checked_sub(range.start)
                .filter(|&len| len <= MAX_FUNCTION_BYTES)
                .and_then(|len| usize::try_from(len).ok())
                .and_then(|len| image.bytes_at_vaddr(range.start, len))
                .ok_or(Unmoved::Undecodable { at: range.start })?;
            if parts
                .last()
                .is_some_and(|(last, _): &(Range<u64>, &[u8])| last.end > range.start)
            {
                return Err(Unmoved::Undecodable { at: range.start });
            }
            parts.push((range, bytes));
        }
        let mut map = CodeMap {
            parts,
            starts: Vec::new(),
            targets: Vec::new(),
        };
        if let Some(&entry) = table.targets.iter().find(|&&t| !map.contains(t)) {
            return Err(Unmoved::UnknownCode { entry });
        }

        // The sweep: every instruction, the direct branch targets, and the
        // addresses the code takes (RIP-relative operands, immediates).
        let mut direct = Vec::new();
        let mut taken = Vec::new();
        let mut insn = Instruction::default();
        for (range, bytes) in &map.parts {
            let mut decoder = Decoder::with_ip(64, bytes, range.start, DecoderOptions::NONE);
            while decoder.can_decode() {
                decoder.decode_out(&mut insn);
                if insn.is_invalid() {
                    return Err(Unmoved::Undecodable { at: insn.ip() });
                }
                map.starts.push(insn.ip());
                match insn.near_branch_target() {
                    0 => {}
                    target => direct.push(target),
                }
                if insn.is_ip_rel_memory_operand() {
                    taken.push(insn.ip_rel_memory_address());
                }
                for operand in 0..insn.op_count() {
                    match insn.op_kind(operand) {
                        OpKind::Immediate32 => taken.push(u64::from(insn.immediate32())),
                        OpKind::Immediate32to64 => taken.push(insn.immediate32to64() as u64),
                        OpKind::Immediate64 => taken.push(insn.immediate64()),
                        _ => {}
                    }
                }
            }
        }
        // Exact targets must be instructions of the sweep, or the sweep is
        // out of step somewhere and may have missed branches.
        direct.retain(|&t| map.contains(t));
        for &target in direct.iter().chain(&table.targets) {
            if map.starts.binary_search(&target).is_err() {
                return Err(Unmoved::Undecodable { at: target });
            }
        }

        let sections = image.sections().map_err(|_| Unmoved::DataUnreadable)?;
        let data: Vec<&Section> = sections
            .iter()
            .filter(|s| s.alloc && !s.exec && s.file_backed && s.vaddr != 0)
            .collect();
        let mut targets = direct;
        targets.extend_from_slice(&table.targets);
        for &address in &taken {
            if map.contains(address) {
                targets.push(address);
            } else if data
                .iter()
                .any(|s| (s.vaddr..s.vaddr.saturating_add(s.size)).contains(&address))
            {
                map.switch_table_targets(image, address, &mut targets);
            }
        }
        // Code pointers in the data: absolute (non-PIE switch tables, the
        // opcode table of a non-PIE build) and relocation addends (PIE).
        for section in &data {
            let skip = section
                .vaddr
                .checked_next_multiple_of(POINTER)
                .map_or(0, |start| start - section.vaddr);
            let skip = usize::try_from(skip).unwrap_or(usize::MAX);
            image.scan(section.offset, section.size, |bytes, window| {
                // The aligned words that start in the window.
                let first = window.start.max(skip);
                let first = first
                    + (POINTER as usize - (first - skip) % POINTER as usize) % POINTER as usize;
                for at in (first..window.end).step_by(POINTER as usize) {
                    let Some(word) = bytes.get(at..at + POINTER as usize) else {
                        break;
                    };
                    let value = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                    if map.contains(value) {
                        targets.push(value);
                    }
                }
            });
        }
        let relocations = image
            .relative_relocations()
            .map_err(|_| Unmoved::DataUnreadable)?;
        targets.extend(
            relocations
                .iter()
                .map(|&(_, addend)| addend)
                .filter(|&a| map.contains(a)),
        );
        targets.sort_unstable();
        targets.dedup();
        map.targets = targets;
        Ok(map)
    }

    /// Whether `address` is in the function's code.
    fn contains(&self, address: u64) -> bool {
        self.part_of(address).is_some()
    }

    /// The code range holding `address`, with its bytes.
    fn part_of(&self, address: u64) -> Option<&(Range<u64>, &'a [u8])> {
        let i = self
            .parts
            .partition_point(|(r, _)| r.start <= address)
            .checked_sub(1)?;
        self.parts.get(i).filter(|(r, _)| r.contains(&address))
    }

    /// Reads a switch table as GCC emits it for position-independent code
    /// (`lea table(%rip)`; entries `target - table` as 32-bit integers) at
    /// `table`, adding the targets in the code, up to the first entry that
    /// does not point into it. Data that is no switch table rarely yields
    /// any; if it does, a probe only moves less.
    fn switch_table_targets(&self, image: &ElfImage, table: u64, targets: &mut Vec<u64>) {
        for i in 0..MAX_SWITCH_TABLE {
            let Some(entry) = table
                .checked_add(i * 4)
                .and_then(|at| image.bytes_at_vaddr(at, 4))
            else {
                return;
            };
            let offset = i32::from_le_bytes(entry.try_into().expect("4 bytes"));
            let target = table.wrapping_add_signed(i64::from(offset));
            if !self.contains(target) {
                return;
            }
            targets.push(target);
        }
    }

    /// The first address in `after + 1 ..= last` that may be jumped to.
    fn first_target(&self, after: u64, last: u64) -> Option<u64> {
        let i = self.targets.partition_point(|&t| t <= after);
        self.targets.get(i).copied().filter(|&t| t <= last)
    }

    /// Adds the targets in `windows` of what decodes as `call`/`jmp`/`jcc`
    /// rel32 at any byte of any executable section: a branch from code the
    /// sweep did not cover (a split-off part of the function that was not
    /// recognized) still keeps a probe in place. Bytes that only look like
    /// such a branch rarely hit a window of a few dozen bytes; if they do, a
    /// probe only moves less.
    fn add_far_branches(&mut self, image: &ElfImage, windows: &[Range<u64>]) {
        if windows.is_empty() {
            return;
        }
        let sections = image.sections().unwrap_or_default();
        for section in sections
            .iter()
            .filter(|s| s.alloc && s.exec && s.file_backed)
        {
            let targets = &mut self.targets;
            image.scan(section.offset, section.size, |code, window| {
                for i in window {
                    let (len, at) = match (code[i], code.get(i + 1)) {
                        (0xe8 | 0xe9, _) => (5, i + 1),
                        (0x0f, Some(&op)) if op & 0xf0 == 0x80 => (6, i + 2),
                        _ => continue,
                    };
                    let Some(rel) = code.get(at..at + 4) else {
                        continue;
                    };
                    let rel = i32::from_le_bytes(rel.try_into().expect("4 bytes"));
                    let target = section
                        .vaddr
                        .wrapping_add(i as u64 + len)
                        .wrapping_add_signed(i64::from(rel));
                    if windows.iter().any(|w| w.contains(&target)) {
                        targets.push(target);
                    }
                }
            });
        }
        self.targets.sort_unstable();
        self.targets.dedup();
    }

    /// Where the probe of the handler at `handler` could move, before
    /// branch targets are considered: see [`first_emulated`].
    fn candidate(&self, handler: u64, guard: Guard) -> Result<(u64, Emulated, usize), Unmoved> {
        let Some((range, bytes)) = self.part_of(handler) else {
            return Err(Unmoved::UnknownCode { entry: handler });
        };
        if self.starts.binary_search(&handler).is_err() {
            return Err(Unmoved::Undecodable { at: handler });
        }
        first_emulated(&bytes[(handler - range.start) as usize..], handler, guard)
    }

    /// `site` (a handler's start) with its probe moved onto the first
    /// emulated instruction of the handler's first basic block, if that is
    /// safe; else with the reason it stays.
    fn place(
        &self,
        image: &ElfImage,
        site: StartSite,
        guard: Guard,
    ) -> Result<StartSite, StartSitesError> {
        let handler = site.handler_vaddr;
        let stay = |reason| {
            Ok(StartSite {
                placement: Placement::Start { reason },
                ..site
            })
        };
        let (at, instruction, skipped) = match self.candidate(handler, guard) {
            Ok(found) => found,
            Err(reason) => return stay(reason),
        };
        if let Some(target) = self.first_target(handler, at) {
            return stay(Unmoved::BranchTarget { target, site: at });
        }
        Ok(StartSite {
            vaddr: at,
            file_offset: image.vaddr_to_file_offset(at)?,
            placement: Placement::Moved {
                instruction,
                skipped,
            },
            ..site
        })
    }
}

/// The first instruction the kernel emulates in the straight-line code at
/// the start of `code` (loaded at `vaddr`), after at least one other: its
/// address, kind, and the number of instructions before it. Fails if the
/// first instruction is emulated itself, or control may leave the straight
/// line first, or after [`MAX_WALK`] instructions, or after an instruction
/// the `guard` stops at (judged by its operands: some such only read, which
/// is merely cautious). Branch targets are the caller's business.
fn first_emulated(
    code: &[u8],
    vaddr: u64,
    guard: Guard,
) -> Result<(u64, Emulated, usize), Unmoved> {
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    for skipped in 0..MAX_WALK {
        if !decoder.can_decode() {
            return Err(Unmoved::BlockEnds {
                at: vaddr.wrapping_add(code.len() as u64),
            });
        }
        decoder.decode_out(&mut insn);
        let at = insn.ip();
        if insn.is_invalid() {
            return Err(Unmoved::Undecodable { at });
        }
        let offset = (at - vaddr) as usize;
        if let Some(instruction) = Emulated::of(&code[offset..offset + insn.len()]) {
            if skipped == 0 {
                return Err(Unmoved::StartEmulated { instruction });
            }
            return Ok((at, instruction, skipped));
        }
        if insn.flow_control() != FlowControl::Next {
            return Err(Unmoved::BlockEnds { at });
        }
        if guard.stops_at(&insn) {
            return Err(Unmoved::Store { at });
        }
    }
    Err(Unmoved::TooFar)
}

/// Whether an operand is in memory.
fn is_memory(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Memory
            | OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

/// Reads link-time pointer values from the loaded data: the addend of an
/// `R_X86_64_RELATIVE` relocation where one applies, else the file's bytes
/// (absolute pointers of a non-PIE executable, or of `.relr.dyn` slots).
struct DataReader<'a> {
    image: &'a ElfImage,
    /// `(r_offset, r_addend)`, sorted.
    relocations: Vec<(u64, u64)>,
}

impl DataReader<'_> {
    fn relocation(&self, vaddr: u64) -> Option<u64> {
        let i = self.relocations.partition_point(|&(o, _)| o < vaddr);
        self.relocations
            .get(i)
            .filter(|&&(o, _)| o == vaddr)
            .map(|&(_, addend)| addend)
    }

    fn pointer_at(&self, vaddr: u64) -> Option<u64> {
        if let Some(value) = self.relocation(vaddr) {
            return Some(value);
        }
        let offset = self.image.vaddr_to_file_offset(vaddr).ok()?;
        let bytes = self.image.bytes_at(offset, POINTER as usize)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    /// The 256 pointers at `vaddr`, if readable.
    fn table_at(&self, vaddr: u64) -> Option<Vec<u64>> {
        (0..OPCODE_TABLE_LEN as u64)
            .map(|i| self.pointer_at(vaddr.checked_add(i * POINTER)?))
            .collect()
    }

    /// Every maximal run of exactly 256 aligned pointers satisfying `inside`
    /// in the loaded, file-backed, non-executable sections, as (address,
    /// values).
    fn scan(&self, sections: &[Section], inside: impl Fn(u64) -> bool) -> Vec<(u64, Vec<u64>)> {
        let mut found = Vec::new();
        for section in sections {
            if !section.alloc || section.exec || !section.file_backed || section.vaddr == 0 {
                continue;
            }
            let Some(start) = section.vaddr.checked_next_multiple_of(POINTER) else {
                continue;
            };
            let skip = start - section.vaddr;
            let Some(len) = section
                .size
                .checked_sub(skip)
                .filter(|&len| start.checked_add(len).is_some())
            else {
                continue;
            };
            let Some(offset) = section.offset.checked_add(skip) else {
                continue;
            };
            let mut reloc = self.relocations.partition_point(|&(o, _)| o < start);
            let mut run: Vec<u64> = Vec::new();
            let mut flush = |run: &mut Vec<u64>, end: u64| {
                if run.len() == OPCODE_TABLE_LEN {
                    found.push((end - OPCODE_TABLE_LEN as u64 * POINTER, std::mem::take(run)));
                } else if let Some(half) = dispatch_half(run) {
                    // 3.15 puts the tracing table (every entry the
                    // recording handler) right after the dispatch table.
                    let start = end - 2 * OPCODE_TABLE_LEN as u64 * POINTER;
                    let at = start + (half * OPCODE_TABLE_LEN) as u64 * POINTER;
                    let table = run[half * OPCODE_TABLE_LEN..][..OPCODE_TABLE_LEN].to_vec();
                    found.push((at, table));
                }
                run.clear();
            };
            // Windows are whole words (a multiple of 8 bytes but the last).
            let mut words = 0;
            let scanned = self.image.scan(offset, len, |bytes, window| {
                for word in bytes[window].chunks_exact(POINTER as usize) {
                    let vaddr = start + words * POINTER;
                    words += 1;
                    while self.relocations.get(reloc).is_some_and(|&(o, _)| o < vaddr) {
                        reloc += 1;
                    }
                    let value = match self.relocations.get(reloc) {
                        Some(&(o, addend)) if o == vaddr => addend,
                        _ => u64::from_le_bytes(word.try_into().expect("8-byte chunk")),
                    };
                    if inside(value) {
                        run.push(value);
                    } else {
                        flush(&mut run, vaddr);
                    }
                }
            });
            if !scanned {
                continue;
            }
            let end = start + words * POINTER;
            flush(&mut run, end);
        }
        found
    }
}

/// Of two adjacent 256-entry tables (CPython 3.15's dispatch table and its
/// JIT tracing table, whose entries all lead to the few handlers that
/// record a trace), the index of the dispatch table: the half with many
/// distinct targets, when the other has only a few.
fn dispatch_half(run: &[u64]) -> Option<usize> {
    /// A tracing table's distinct targets, at most.
    const FEW: usize = 8;
    if run.len() != 2 * OPCODE_TABLE_LEN {
        return None;
    }
    let distinct = |half: &[u64]| half.iter().collect::<std::collections::BTreeSet<_>>().len();
    let (a, b) = run.split_at(OPCODE_TABLE_LEN);
    match (distinct(a), distinct(b)) {
        (x, y) if y <= FEW && x > 4 * FEW => Some(0),
        (x, y) if x <= FEW && y > 4 * FEW => Some(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
