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

use std::{fmt, ops::Range, path::PathBuf};

use super::{
    dwarf::{DwarfError, DwarfInfo},
    offsets::{Layout, ResumeOpcodes},
    version::PythonVersion,
};
use crate::elf::{ElfError, ElfImage, Section, Symbol};

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
}

impl SiteKind {
    /// Whether the site only runs while `sys.monitoring` or `sys.settrace`
    /// instruments the code (`INSTRUMENTED_RESUME`).
    pub fn only_when_instrumented(&self) -> bool {
        matches!(
            self,
            SiteKind::Resume {
                name: "INSTRUMENTED_RESUME",
                ..
            }
        )
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

/// A code address where Python function starts execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StartSite {
    /// Link-time virtual address.
    pub vaddr: u64,
    /// Offset in the ELF file: where a uprobe attaches.
    pub file_offset: u64,
    /// What runs there.
    pub kind: SiteKind,
    /// How the address was found.
    pub source: SiteSource,
}

impl StartSite {
    /// A short description for one-line reports, e.g. `RESUME_CHECK(207)@0x1d4f2a`
    /// (the file offset).
    pub fn describe(&self) -> String {
        match self.kind {
            SiteKind::EvalEntry => format!("{EVAL_FRAME}@{:#x}", self.file_offset),
            SiteKind::Resume { opcode, name } => {
                format!("{name}({opcode})@{:#x}", self.file_offset)
            }
        }
    }
}

impl fmt::Display for StartSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SiteKind::EvalEntry => write!(f, "entry of {EVAL_FRAME}")?,
            SiteKind::Resume { opcode, name } => write!(f, "handler of {name} ({opcode})")?,
        }
        write!(
            f,
            " at {:#x} (file offset {:#x}, from ",
            self.vaddr, self.file_offset
        )?;
        match self.source {
            SiteSource::Symbol => write!(f, "the symbol table)"),
            SiteSource::OpcodeTable { table } => write!(f, "the opcode table at {table:#x})"),
            SiteSource::DwarfLabel => write!(f, "a DWARF label)"),
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
        return Ok(vec![StartSite {
            vaddr: eval.vaddr,
            file_offset: image.vaddr_to_file_offset(eval.vaddr)?,
            kind: SiteKind::EvalEntry,
            source: SiteSource::Symbol,
        }]);
    };
    let table_error = match find_opcode_table(image) {
        Ok(table) => return sites_from_table(image, &table, &opcodes, version),
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
        Ok(Some(dwarf)) => match sites_from_dwarf(image, &dwarf, &opcodes) {
            Ok(sites) => Ok(sites),
            Err(e) => Err(not_found(e.to_string())),
        },
        Ok(None) => Err(not_found(
            "the file has no DWARF (separate debug files are not read)".into(),
        )),
        Err(e) => Err(not_found(format!("its DWARF is unreadable: {e}"))),
    }
}

/// The handlers of `opcodes` in `table`, as sites. Fails if one of them is
/// the catch-all handler of undefined opcodes (the numbers do not fit the
/// build).
pub fn sites_from_table(
    image: &ElfImage,
    table: &OpcodeTable,
    opcodes: &ResumeOpcodes,
    version: &PythonVersion,
) -> Result<Vec<StartSite>, StartSitesError> {
    let catch_all = table.catch_all();
    let mut sites = Vec::new();
    for (name, opcode) in opcodes.all() {
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
        sites.push(StartSite {
            vaddr: target,
            file_offset: image.vaddr_to_file_offset(target)?,
            kind: SiteKind::Resume { opcode, name },
            source: SiteSource::OpcodeTable { table: table.vaddr },
        });
    }
    Ok(dedup(sites))
}

/// The handlers of `opcodes` from the DWARF labels `TARGET_<name>` in
/// `_PyEval_EvalFrameDefault` (all of them if a name labels several
/// addresses).
pub fn sites_from_dwarf(
    image: &ElfImage,
    dwarf: &DwarfInfo,
    opcodes: &ResumeOpcodes,
) -> Result<Vec<StartSite>, StartSitesError> {
    let dwarf_error = |source| StartSitesError::Dwarf {
        path: image.path().to_owned(),
        source,
    };
    let labels = dwarf.labels_in(EVAL_FRAME).map_err(dwarf_error)?;
    let mut sites = Vec::new();
    for (name, opcode) in opcodes.all() {
        let label = format!("TARGET_{name}");
        let before = sites.len();
        for &(_, vaddr) in labels.iter().filter(|(n, _)| *n == label) {
            sites.push(StartSite {
                vaddr,
                file_offset: image.vaddr_to_file_offset(vaddr)?,
                kind: SiteKind::Resume { opcode, name },
                source: SiteSource::DwarfLabel,
            });
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

/// Keeps the first site of each address, in order.
fn dedup(sites: Vec<StartSite>) -> Vec<StartSite> {
    let mut out: Vec<StartSite> = Vec::with_capacity(sites.len());
    for site in sites {
        if !out.iter().any(|s| s.vaddr == site.vaddr) {
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
            let bytes = section
                .size
                .checked_sub(skip)
                .filter(|&len| start.checked_add(len).is_some())
                .and_then(|len| usize::try_from(len).ok())
                .zip(section.offset.checked_add(skip))
                .and_then(|(len, offset)| self.image.bytes_at(offset, len));
            let Some(bytes) = bytes else {
                continue;
            };
            let mut reloc = self.relocations.partition_point(|&(o, _)| o < start);
            let mut run: Vec<u64> = Vec::new();
            let mut flush = |run: &mut Vec<u64>, end: u64| {
                if run.len() == OPCODE_TABLE_LEN {
                    found.push((end - OPCODE_TABLE_LEN as u64 * POINTER, std::mem::take(run)));
                }
                run.clear();
            };
            for (i, word) in bytes.chunks_exact(POINTER as usize).enumerate() {
                let vaddr = start + i as u64 * POINTER;
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
            let end = start + (bytes.len() as u64 / POINTER) * POINTER;
            flush(&mut run, end);
        }
        found
    }
}

#[cfg(test)]
mod tests;
