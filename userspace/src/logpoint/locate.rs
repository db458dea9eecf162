//! Where a log point goes: from what the user wrote (`app.py:42`,
//! `app.py:handle_order`, `app.py:Order.describe`, `pkg.mod:Class.method`)
//! to the code objects of a live process, and in each the instruction whose
//! oparg byte is watched. Everything is read from the target's memory
//! through [`Target`]; nothing runs in the target, and per-version knowledge
//! comes only from [`crate::python::offsets`].
//!
//! # Which code objects exist
//!
//! One call of [`Target::find_code`] scans the process afresh (nothing is
//! cached between calls, so calling it again finds modules imported since):
//!
//! 1. every interpreter's `sys.modules` (through `interp->sysdict`), and in
//!    each module's dict: functions (their `func_code`), and classes written
//!    in Python (heap types): in their `tp_dict`, functions, `staticmethod`
//!    and `classmethod` objects (the wrapped callable), `property` objects
//!    (getter, setter, deleter) and nested classes;
//! 2. the code object of every frame on every thread's stack (so the
//!    module-level code of a running `__main__`, e.g. its top-level loop);
//! 3. recursively, every code object in the `co_consts` of a code object
//!    found so far (nested functions, lambdas, comprehensions, class
//!    bodies).
//!
//! Code objects are deduplicated by address. A code object's constants are
//! only visited when its `co_filename` is the file asked for: the compiler
//! gives nested code objects the file name of the code containing them, so
//! nothing of that file is missed, and a scan of a large process reads
//! little more than its module and class dicts. Bounds: nesting depth
//! [`MAX_DEPTH`] (classes in classes, code in `co_consts`), and
//! [`MAX_OBJECTS`] objects looked at per scan (beyond, the scan stops with
//! what it found and logs a warning).
//!
//! Not found: functions reachable only some other way, e.g. the original
//! function under a decorator that returns a wrapper (it lives in the
//! wrapper's closure: found only while it runs, from its frame, or through
//! the module-level code of a running `__main__`), functions kept only in
//! instances, lists or other containers, and the dicts of module objects
//! whose type is a subclass of `module` (lazy-loading modules). The
//! module-level code of an imported module ran and is gone; that of a
//! running `__main__` is on a stack, but its lines that already ran (and
//! the class bodies in it) do not run again.
//!
//! # Matching a file
//!
//! The given path and `co_filename` are compared segment by segment after
//! dropping `.` segments (and leading `..` ones): a `co_filename` matches
//! when it ends with the given path at a `/` boundary (`app.py` matches
//! `/srv/x/app.py`, not `/srv/myapp.py`), except that two absolute paths
//! must be equal; a relative `co_filename` (a script started by a relative
//! path on 3.8) also matches a given path that ends with it. When the given
//! path matches several files (`app.py`: the application's and
//! `flask/app.py`), nothing is chosen: [`LocateError::AmbiguousFile`] lists
//! them and names a longer path that tells them apart. Everything else
//! (lines, functions, suggestions in errors) then comes from the one file.
//!
//! # `MODULE:QUALNAME`
//!
//! The module is looked up in `sys.modules` by name; its code objects are
//! those whose `co_filename` is the module's `__file__` (or `<frozen
//! MODULE>`, the file name of frozen standard modules). A script run as
//! `python path/app.py` is `__main__` in `sys.modules`, so when `MODULE` is
//! not in `sys.modules` and `__main__.__file__` is `.../MODULE.py` (each dot
//! of a dotted `MODULE` a directory, as for `python -m pkg.app`; or
//! `.../MODULE/__main__.py` for `python -m pkg`), `__main__` is taken:
//! `app:handle` and `__main__:handle` both name `handle` of the script.
//!
//! # Qualified names
//!
//! 3.11+ code objects carry `co_qualname`. For 3.8-3.10 it is rebuilt from
//! where the code was found (the offsets know no `func_qualname`): a
//! function in a module dict is `co_name`, in a class `Class.co_name`
//! (classes named by their `__name__`, nested classes joined by dots), a
//! code object in the `co_consts` of a function `parent.<locals>.co_name`,
//! of a class body `Class.co_name`, of module code `co_name`. Where a code
//! object is reachable several ways, a path through a dict entry whose key
//! differs from the object's name (an alias such as `handler = Order.total`)
//! or a frame alone counts less. The rebuilt name is CPython's except when
//! a function was only found through such aliases.
//!
//! # `FILE:LINE`: which code object, which instruction
//!
//! - A code object *has* line L when its line table attributes an
//!   instruction at or after its start to L. The start is code unit 0 up to
//!   3.10, and `_co_firsttraceable` from 3.11 (the function-start `RESUME`,
//!   after the `MAKE_CELL` / `COPY_FREE_VARS` / `RETURN_GENERATOR`
//!   prologue, which is skipped).
//! - The *header* of a function-like code object (`CO_OPTIMIZED`: functions,
//!   lambdas, comprehensions, generator expressions) is the lines from its
//!   `co_firstlineno` (its first decorator, else its `def`) up to, not
//!   including, the first line of its body. A line in the header means the
//!   function's start: the `def` line probes the function, not the
//!   enclosing code's `def` statement (which runs once, when the function
//!   is made). Up to 3.10 a function has no instruction on its `def` line,
//!   from 3.11 its `RESUME` is there; either way this gives its start.
//! - The candidates are the code objects of the file that have L or whose
//!   header holds L. Then **the innermost wins**: a candidate is dropped
//!   when another candidate is nested in it (found in its `co_consts`,
//!   directly or deeper). So a lambda, generator expression or (3.8-3.11)
//!   comprehension on line L is probed rather than the statement around
//!   it, and on 3.12+ (where list, set and dict comprehensions are inlined)
//!   the same line probes the enclosing function. Candidates not nested in
//!   each other (e.g. the same file loaded as `__main__` and as a module)
//!   are all returned.
//! - In each, the probe is the lowest-offset instruction of L at or after
//!   the start, or the start for a header line. A line table entry starts
//!   at an instruction, never at its inline `CACHE` units (which share its
//!   entry), so the probe is an instruction. It runs each time execution
//!   enters line L at that instruction: for a `for` line, once per loop,
//!   not per iteration (the loop jumps back to its `FOR_ITER`, further on).
//! - [`Found::function_start`] is set when the probe is the code object's
//!   start: every hit is then a call (or, for a generator, its first
//!   resumption). From 3.11 the start `RESUME` runs only there; up to 3.10
//!   a loop at the very top of a function may jump back to code unit 0.
//!
//! # Locals
//!
//! [`Found::varnames`] names the frame's local slots in order (what
//! [`Target`]'s frame reader calls local names): 3.11+ `co_localsplusnames`
//! (arguments, locals, cells and free variables alike; a cell slot holds
//! the cell object, the reader follows it); up to 3.10 the first
//! `co_nlocals` names of `co_varnames` only: cell and free variables
//! (stored after them) are not listed, and an argument that is also a cell
//! reads as unbound, so such a name is reported as not capturable.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    time::Instant,
};

use crate::python::{
    linetable,
    memory::Memory,
    offsets::common,
    reader::{ReadError, Target},
};

/// Deepest nesting followed: classes in classes, code in `co_consts`.
pub const MAX_DEPTH: u32 = 16;
/// Most objects (modules, dict entries, constants) looked at in one scan.
pub const MAX_OBJECTS: usize = 200_000;
/// Largest dict read (entries).
const MAX_DICT_ENTRIES: u64 = 1 << 20;
/// Largest `co_consts` tuple read.
const MAX_CONSTS: u64 = 1 << 16;
/// Largest code object (code units) and line table (bytes) read.
const MAX_CODE_UNITS: u64 = 1 << 24;
const MAX_LINE_TABLE: u64 = 1 << 22;
/// Most names in `co_varnames` / `co_localsplusnames` read.
const MAX_LOCALS: u64 = 1 << 16;
/// `CO_OPTIMIZED`: a function's code (not a module or class body).
const CO_OPTIMIZED: u32 = 0x1;
/// `Py_TPFLAGS_HEAPTYPE`.
const TPFLAGS_HEAPTYPE: u64 = 1 << 9;
/// `Py_TPFLAGS_TYPE_SUBCLASS`: set on `type` and metaclasses, so an
/// object whose type has it is a class.
const TPFLAGS_TYPE_SUBCLASS: u64 = 1 << 31;
/// Bytes of a type object read at once: up to `tp_dict`.
const TYPE_HEADER: usize = common::TP_DICT as usize + 8;
/// How much a rebuilt (3.8-3.10) qualified name counts less per alias on
/// its path, and when only a frame (not `<module>`) led to it.
const ALIAS_PENALTY: u32 = 10;
const FRAME_PENALTY: u32 = 1000;
/// Functions listed in a "no function" error.
const LISTED_FUNCTIONS: usize = 10;
/// Lines listed on each side in a "no code" error.
const NEARBY_EACH_SIDE: usize = 3;

/// Where a log point goes, as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `app.py:42`: a line of a source file.
    FileLine {
        /// The path as given (absolute, or relative: matched as a suffix).
        file: String,
        /// 1-based line number.
        line: u32,
    },
    /// `app.py:handle_order`, `app.py:Order.describe`: a function of a
    /// source file.
    FileFunction {
        /// The path as given.
        file: String,
        /// Qualified name (`Order.describe`), or a bare name that is the
        /// name of one function of the file.
        qualname: String,
    },
    /// `pkg.mod:Class.method`: a function of an imported module.
    ModuleQualname {
        /// Dotted module name, as in `sys.modules`.
        module: String,
        /// Qualified name, or a bare function name.
        qualname: String,
    },
}

impl Location {
    /// The file or module part, as given.
    pub fn file_or_module(&self) -> &str {
        match self {
            Location::FileLine { file, .. } | Location::FileFunction { file, .. } => file,
            Location::ModuleQualname { module, .. } => module,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::FileLine { file, line } => write!(f, "{file}:{line}"),
            Location::FileFunction { file, qualname } => write!(f, "{file}:{qualname}"),
            Location::ModuleQualname { module, qualname } => write!(f, "{module}:{qualname}"),
        }
    }
}

/// Parses a log point location: `FILE:LINE`, `FILE:QUALNAME` or
/// `MODULE:QUALNAME`. The part before the last `:` is a file when it ends
/// in `.py` or contains a `/`, else a dotted module name; the part after it
/// is a line number when all digits, else a (dotted) function name.
pub fn parse_location(s: &str) -> Result<Location, String> {
    const FORMS: &str = "FILE:LINE, FILE:FUNCTION or MODULE:FUNCTION (e.g. app.py:42, \
                         app.py:handle_order, pkg.mod:Order.describe)";
    let s = s.trim();
    let Some((place, what)) = s.rsplit_once(':') else {
        return Err(format!(
            "log point location {s:?} has no ':': expected {FORMS}"
        ));
    };
    if place.is_empty() {
        return Err(format!(
            "nothing before ':' in {s:?}: expected a file (app.py) or a module (pkg.mod)"
        ));
    }
    if what.is_empty() {
        return Err(format!(
            "nothing after ':' in {s:?}: expected a line number or a function name"
        ));
    }
    let is_file = place.ends_with(".py") || place.contains('/');
    if !is_file && !is_dotted(place, false) {
        return Err(format!(
            "{place:?} is neither a file (ending in .py or containing '/') nor a module name \
             (like pkg.mod)"
        ));
    }
    if what.bytes().all(|b| b.is_ascii_digit()) {
        if !is_file {
            return Err(format!(
                "{s:?}: a line number needs a file (like pkg/mod.py:{what}); {place:?} reads as a \
                 module name"
            ));
        }
        let line: u32 = what
            .parse()
            .map_err(|_| format!("line number {what} in {s:?} is too large"))?;
        if line == 0 {
            return Err(format!("{s:?}: line numbers start at 1"));
        }
        return Ok(Location::FileLine {
            file: place.to_owned(),
            line,
        });
    }
    if !is_dotted(what, true) {
        return Err(format!(
            "{what:?} (after ':' in {s:?}) is neither a line number nor a function name (like \
             handle_order or Order.describe)"
        ));
    }
    let qualname = what.to_owned();
    Ok(if is_file {
        Location::FileFunction {
            file: place.to_owned(),
            qualname,
        }
    } else {
        Location::ModuleQualname {
            module: place.to_owned(),
            qualname,
        }
    })
}

/// Whether `s` is dot-separated identifiers; with `angle`, parts like
/// `<locals>` and `<lambda>` (as in qualified names) are allowed too.
fn is_dotted(s: &str, angle: bool) -> bool {
    s.split('.').all(|part| {
        let ident = |p: &str| {
            let mut chars = p.chars();
            chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
                && chars.all(|c| c == '_' || c.is_alphanumeric())
        };
        ident(part)
            || (angle
                && part
                    .strip_prefix('<')
                    .and_then(|p| p.strip_suffix('>'))
                    .is_some_and(ident))
    })
}

/// One place to probe: a code object and the instruction in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Address of the code object.
    pub code: u64,
    /// Its `co_filename`.
    pub filename: String,
    /// Its qualified name (see the module docs for 3.8-3.10).
    pub qualname: String,
    /// The line the probed instruction belongs to in the line table (what
    /// a traceback would show at the hit): for `FILE:LINE`, the line asked
    /// for, except on a function's header (decorator or `def` lines), where,
    /// as for a function start asked by name, it is the start's line: the
    /// first decorator or `def` line from 3.11, the body's first line up
    /// to 3.10.
    pub line: u32,
    /// Code unit index of the probed instruction.
    pub instr_index: u32,
    /// Address of the probed instruction's code unit (its opcode byte) in
    /// the target (`co_code` data up to 3.10, `co_code_adaptive` from
    /// 3.11).
    pub unit_addr: u64,
    /// Whether the probed instruction is the code object's start (see the
    /// module docs).
    pub function_start: bool,
    /// Names of the frame's local slots, in slot order (see the module
    /// docs).
    pub varnames: Vec<String>,
    /// `co_argcount`.
    pub argcount: u32,
    /// In how many separate places of the code the line's instructions are
    /// (more than 1 for a `while` test the compiler repeats at the loop's
    /// end, or a statement spread over lines): the watch is on the first,
    /// so the log point fires when execution enters the line there.
    pub places: usize,
}

impl Found {
    /// The byte a log point's watchpoint is on: the instruction's oparg.
    /// Every run of an instruction reads it, from the dispatch that starts
    /// the run (with the opcode, or alone where the eval loop loads the
    /// two bytes apart, as 3.12 does), or from the superinstruction before
    /// it that runs it (3.11, 3.12). What is not a run leaves it alone: an
    /// instruction re-reading its opcode to re-dispatch after specializing,
    /// 3.13+ `RESUME` testing and rewriting its opcode, specialization and
    /// instrumentation rewriting opcodes.
    pub fn watched_byte(&self) -> u64 {
        self.unit_addr.wrapping_add(1)
    }
}

/// Why a location resolves to nothing. Every message is one line that says
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// No code of the file is in the process: it is not imported (yet), or
    /// the path is wrong. A log point may wait for the import.
    #[error(
        "no module from {file} is loaded in the process (yet): check the path, or let the log \
         point wait for the import"
    )]
    NotLoaded {
        /// The file as given.
        file: String,
    },
    /// No module of that name is in `sys.modules` (yet).
    #[error(
        "no module {module} is loaded in the process (yet): check the name, or let the log point \
         wait for the import"
    )]
    ModuleNotLoaded {
        /// The module name as given.
        module: String,
    },
    /// The module has no `__file__` and no code of it was found.
    #[error(
        "module {module} has no __file__ (built in, or a namespace package): give FILE:LINE or \
         FILE:FUNCTION instead"
    )]
    ModuleWithoutFile {
        /// The module name as given.
        module: String,
    },
    /// The file is loaded but no code object has that line.
    #[error("no code at {file}:{line}{}", nearby_text(.nearby))]
    NoCode {
        /// The file as given.
        file: String,
        /// The line asked for.
        line: u32,
        /// The closest lines (both sides) where a log point can go.
        nearby: Vec<u32>,
    },
    /// The file or module is loaded but has no function of that name.
    #[error("no function {qualname} in {place}{}", functions_text(.functions, *.more))]
    NoFunction {
        /// The file, or `module NAME (FILE)`.
        place: String,
        /// The name asked for.
        qualname: String,
        /// The first functions of the file (by line).
        functions: Vec<String>,
        /// How many more there are.
        more: usize,
    },
    /// A bare name is the name of several functions.
    #[error("{name} is ambiguous in {place}: {}; give the qualified name", .candidates.join(", "))]
    Ambiguous {
        /// The file, or `module NAME (FILE)`.
        place: String,
        /// The bare name asked for.
        name: String,
        /// The qualified names it could mean.
        candidates: Vec<String>,
    },
    /// A relative path matches several loaded files.
    #[error(
        "{file} matches {} loaded files: {}; give more of the path (e.g. {})",
        .candidates.len(),
        .candidates.join(", "),
        shortest_unique(.candidates, .file)
    )]
    AmbiguousFile {
        /// The file as given.
        file: String,
        /// The full paths it matches (`co_filename`), sorted.
        candidates: Vec<String>,
    },
    /// Reading the process failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl LocateError {
    /// Whether the file or module is just not imported (yet): a log point
    /// may wait for it, rescanning.
    pub fn is_not_loaded(&self) -> bool {
        matches!(
            self,
            LocateError::NotLoaded { .. } | LocateError::ModuleNotLoaded { .. }
        )
    }

    /// Whether the `--at` itself is wrong for the loaded code (an
    /// ambiguous file, a line without code, an unknown function): looking
    /// again will not help.
    pub fn is_wrong_spec(&self) -> bool {
        !self.is_not_loaded() && !matches!(self, LocateError::Read(_))
    }
}

/// The shortest tail of the first candidate that matches no other one: a
/// path the user can give instead of `file`.
fn shortest_unique(candidates: &[String], file: &str) -> String {
    let Some(first) = candidates.first() else {
        return file.to_owned();
    };
    let keys: Vec<PathKey> = candidates.iter().map(|c| PathKey::new(c)).collect();
    let segments = &keys[0].segments;
    for n in 1..=segments.len() {
        let tail = PathKey {
            absolute: false,
            segments: segments[segments.len() - n..].to_vec(),
        };
        if keys[1..].iter().all(|k| !tail.matches_suffix(k)) {
            return tail.segments.join("/");
        }
    }
    first.clone()
}

fn nearby_text(nearby: &[u32]) -> String {
    if nearby.is_empty() {
        return " (module-level code that already ran is not kept): no line of that file has \
                code now"
            .to_owned();
    }
    let lines: Vec<String> = nearby.iter().map(u32::to_string).collect();
    format!("; lines with code nearby: {}", lines.join(", "))
}

fn functions_text(functions: &[String], more: usize) -> String {
    if functions.is_empty() {
        return ": it has no functions".to_owned();
    }
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("; functions there: {}{more}", functions.join(", "))
}

impl<M: Memory> Target<M> {
    /// Resolves `loc` to the code objects of the live process and the
    /// instruction to probe in each (see the module docs for the rules).
    /// Scans the process afresh at every call.
    pub fn find_code(&self, loc: &Location) -> Result<Vec<Found>, LocateError> {
        let started = Instant::now();
        let (files, place) = match loc {
            Location::FileLine { file, .. } | Location::FileFunction { file, .. } => {
                (Files::Suffix(PathKey::new(file)), file.clone())
            }
            Location::ModuleQualname { module, .. } => {
                let Some(module_obj) = find_module(self, module)? else {
                    return Err(LocateError::ModuleNotLoaded {
                        module: module.clone(),
                    });
                };
                let file = module_file(self, module_obj)?;
                let mut exact = vec![PathKey::new(&format!("<frozen {module}>"))];
                let place = match &file {
                    Some(f) => {
                        exact.push(PathKey::new(f));
                        format!("module {module} ({f})")
                    }
                    None => format!("module {module}"),
                };
                if file.is_none() {
                    log::debug!("locate: module {module} has no __file__");
                }
                (Files::Exact(exact, file.is_some()), place)
            }
        };
        // First the modules whose `__file__` is wanted (a few reads per
        // module); every object of every module only if that finds no
        // code (the file's functions kept elsewhere, its module gone).
        let mut scan = Scan::new(self, files.clone());
        scan.only_wanted_modules = true;
        scan.run()?;
        if scan.nodes.is_empty() {
            scan = Scan::new(self, files);
            scan.run()?;
        }
        log::debug!(
            "locate {loc}: {} code objects of the file, {} objects looked at, in {:?}",
            scan.nodes.len(),
            scan.objects,
            started.elapsed()
        );
        if scan.nodes.is_empty() {
            return Err(match loc {
                Location::FileLine { file, .. } | Location::FileFunction { file, .. } => {
                    LocateError::NotLoaded { file: file.clone() }
                }
                Location::ModuleQualname { module, qualname } => match &scan.files {
                    Files::Exact(_, false) => LocateError::ModuleWithoutFile {
                        module: module.clone(),
                    },
                    _ => LocateError::NoFunction {
                        place,
                        qualname: qualname.clone(),
                        functions: Vec::new(),
                        more: 0,
                    },
                },
            });
        }
        if let Files::Suffix(_) = scan.files {
            let file = loc.file_or_module();
            let files: BTreeSet<&str> = scan.nodes.values().map(|n| n.filename.as_str()).collect();
            let distinct: BTreeSet<PathKey> = files.iter().map(|f| PathKey::new(f)).collect();
            if distinct.len() > 1 {
                return Err(LocateError::AmbiguousFile {
                    file: file.to_owned(),
                    candidates: files.into_iter().map(str::to_owned).collect(),
                });
            }
        }
        let mut found = match loc {
            Location::FileLine { file, line } => scan.by_line(file, *line)?,
            Location::FileFunction { qualname, .. } | Location::ModuleQualname { qualname, .. } => {
                scan.by_name(&place, qualname)?
            }
        };
        found.sort_by(|a, b| {
            (&a.filename, a.line, &a.qualname, a.code).cmp(&(
                &b.filename,
                b.line,
                &b.qualname,
                b.code,
            ))
        });
        Ok(found)
    }
}

/// A path cut into segments for comparison: `.` segments dropped, `..`
/// applied where it can be and dropped at the start.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PathKey {
    absolute: bool,
    segments: Vec<String>,
}

impl PathKey {
    fn new(path: &str) -> PathKey {
        let absolute = path.starts_with('/');
        let mut segments: Vec<String> = Vec::new();
        for seg in path.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    if segments.last().is_some_and(|s| s != "..") {
                        segments.pop();
                    } else if !absolute {
                        segments.push("..".to_owned());
                    }
                }
                s => segments.push(s.to_owned()),
            }
        }
        let lead = segments.iter().take_while(|s| *s == "..").count();
        segments.drain(..lead);
        PathKey { absolute, segments }
    }

    /// Whether a code object's file `code` is the file `self` was given as
    /// (see the module docs).
    fn matches_suffix(&self, code: &PathKey) -> bool {
        if self.segments.is_empty() || code.segments.is_empty() {
            return false;
        }
        if self.absolute && code.absolute {
            return self.segments == code.segments;
        }
        code.segments.ends_with(&self.segments)
            || (!code.absolute && self.segments.ends_with(&code.segments))
    }
}

/// Which `co_filename`s are wanted.
#[derive(Clone)]
enum Files {
    /// A path as the user gave it.
    Suffix(PathKey),
    /// Exactly these files (a module's `__file__` and its frozen name);
    /// the flag tells whether the module had a `__file__`.
    Exact(Vec<PathKey>, bool),
}

impl Files {
    fn matches(&self, filename: &str) -> bool {
        let key = PathKey::new(filename);
        match self {
            Files::Suffix(given) => given.matches_suffix(&key),
            Files::Exact(keys, _) => keys.contains(&key),
        }
    }
}

/// What an object is, as far as the scan cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Function,
    /// `staticmethod` or `classmethod`.
    Wrapper,
    Property,
    Module,
    Code,
    /// A class (its type is `type` or a metaclass).
    Class,
    Other,
}

/// How a code object was reached.
enum Via<'a> {
    /// A function in a module dict (`class` `None`) or a class dict.
    Dict {
        class: Option<&'a str>,
        key: u64,
        penalty: u32,
    },
    /// A constant of the code object `parent`.
    Consts { parent: u64 },
    /// A frame on a stack.
    Frame,
}

/// What is known of a code object of the wanted file.
struct Node {
    name: String,
    /// `co_qualname` (3.11+).
    qualname: Option<String>,
    filename: String,
    first_line: i32,
    flags: u32,
    argcount: u32,
    varnames_tuple: u64,
    nlocals: u32,
    linetable: u64,
    firsttraceable: Option<i32>,
    /// Best rebuilt name so far (3.8-3.10): (penalty, name).
    direct: Option<(u32, String)>,
    /// The code object in whose `co_consts` this one is.
    parent: Option<u64>,
}

impl Node {
    fn is_function(&self) -> bool {
        self.flags & CO_OPTIMIZED != 0
    }
}

/// The lines of a code object, decoded.
struct Lines {
    /// `(start, end, line)` code unit ranges, clamped to the code.
    ranges: Vec<(u32, u32, Option<i32>)>,
    /// Code unit of the first instruction that runs (after the prologue).
    start: u32,
    /// Address of code unit 0.
    base: u64,
}

impl Lines {
    /// The lowest instruction at or after the start attributed to `line`.
    fn first_on(&self, line: i32) -> Option<u32> {
        self.ranges
            .iter()
            .filter(|(_, end, l)| *l == Some(line) && *end > self.start)
            .map(|(s, _, _)| (*s).max(self.start))
            .min()
    }

    /// The line of the instruction at `index`, else of the next instruction
    /// that has one.
    fn line_at(&self, index: u32) -> Option<i32> {
        self.ranges
            .iter()
            .filter(|(_, end, l)| *end > index && l.is_some())
            .map(|(_, _, l)| *l)
            .next()
            .flatten()
    }

    /// In how many separate runs of instructions (in code order, at or
    /// after the start) `line` is.
    fn places(&self, line: i32) -> usize {
        let mut places = 0;
        let mut inside = false;
        for (_, end, l) in &self.ranges {
            if *end <= self.start {
                continue;
            }
            let here = *l == Some(line);
            if here && !inside {
                places += 1;
            }
            inside = here;
        }
        places
    }

    /// Lines with an instruction at or after the start.
    fn lines(&self) -> impl Iterator<Item = i32> + '_ {
        self.ranges
            .iter()
            .filter(|(_, end, _)| *end > self.start)
            .filter_map(|(_, _, l)| *l)
    }

    /// The header lines of a function's code object: from `first_line` up
    /// to the first line of its body (exclusive), at least `first_line`.
    fn header(&self, first_line: i32) -> std::ops::Range<i32> {
        let body = self
            .ranges
            .iter()
            .filter(|(_, end, _)| *end > self.start)
            .find_map(|(_, _, l)| l.filter(|l| *l > first_line))
            .unwrap_or(first_line.saturating_add(1));
        first_line..body
    }
}

/// One scan of the process for the code objects of some files.
struct Scan<'t, M> {
    t: &'t Target<M>,
    files: Files,
    /// Whether qualified names must be rebuilt (no `co_qualname`).
    rebuild_names: bool,
    /// Kinds of objects by type address.
    kinds: HashMap<u64, Kind>,
    /// `co_filename` str objects read: whether the file is wanted.
    file_match: HashMap<u64, bool>,
    /// Classes walked, with the penalty of the path they were walked by.
    classes: HashMap<u64, u32>,
    /// Code objects of the wanted files, by address.
    nodes: HashMap<u64, Node>,
    /// Their addresses in the order found.
    order: Vec<u64>,
    /// Decoded line tables.
    lines: HashMap<u64, Option<Lines>>,
    /// Objects looked at.
    objects: usize,
    truncated: bool,
    /// Bytes of a code object read at once: every field used.
    code_window: usize,
    /// Walk only the modules whose `__file__` is a wanted file.
    only_wanted_modules: bool,
    /// Dict key objects read: whether each is the str `__file__` (module
    /// dicts share interned keys, so each is read once).
    file_keys: HashMap<u64, bool>,
}

impl<'t, M: Memory> Scan<'t, M> {
    fn new(t: &'t Target<M>, files: Files) -> Self {
        let o = &t.info.offsets;
        let ends = [
            o.code_argcount + 4,
            o.code_flags + 4,
            o.code_firstlineno + 4,
            o.code_nlocals + 4,
            o.code_varnames + 8,
            o.code_filename + 8,
            o.code_name + 8,
            o.code_linetable + 8,
            o.code_consts + 8,
            o.code_qualname.map_or(0, |off| off + 8),
            o.code_firsttraceable.map_or(0, |off| off + 4),
            o.code_code.map_or(0, |off| off + 8),
        ];
        Scan {
            t,
            files,
            rebuild_names: o.code_qualname.is_none(),
            kinds: HashMap::new(),
            file_match: HashMap::new(),
            classes: HashMap::new(),
            nodes: HashMap::new(),
            order: Vec::new(),
            lines: HashMap::new(),
            objects: 0,
            truncated: false,
            code_window: ends.into_iter().max().unwrap_or(0) as usize,
            only_wanted_modules: false,
            file_keys: HashMap::new(),
        }
    }

    /// Whether the module whose dict is at `dict` has a wanted `__file__`.
    fn module_file_wanted(&mut self, dict: u64) -> Result<bool, ReadError> {
        if dict == 0 {
            return Ok(false);
        }
        for (key, value) in dict_items(self.t, dict)? {
            let is_file = match self.file_keys.get(&key) {
                Some(&is_file) => is_file,
                None => {
                    let is_file = self.t.read_str(key).ok().as_deref() == Some("__file__");
                    self.file_keys.insert(key, is_file);
                    is_file
                }
            };
            if is_file {
                return if value == self.t.known.none {
                    Ok(false)
                } else {
                    self.wanted_file(value)
                };
            }
        }
        Ok(false)
    }

    /// Counts one more object; false once the bound is reached.
    fn count(&mut self) -> bool {
        if self.objects >= MAX_OBJECTS {
            if !self.truncated {
                self.truncated = true;
                log::warn!(
                    "locate: stopped after {MAX_OBJECTS} objects; code found beyond them is \
                     missed"
                );
            }
            return false;
        }
        self.objects += 1;
        true
    }

    /// Modules of every interpreter, then every thread's frames.
    fn run(&mut self) -> Result<(), ReadError> {
        let t = self.t;
        let interpreters = t.interpreters()?;
        'modules: for &interp in &interpreters {
            let items = match sys_modules(t, interp) {
                Ok(Some(modules)) => dict_items(t, modules),
                Ok(None) => continue,
                Err(e) => Err(e),
            };
            let items = match items {
                Ok(items) => items,
                Err(e) => {
                    log::debug!("locate: sys.modules of {interp:#x} unreadable: {e}");
                    continue;
                }
            };
            for (_, module) in items {
                if !self.count() {
                    break 'modules;
                }
                if self.kind(module).ok() != Some(Kind::Module) {
                    continue;
                }
                let walked = t
                    .mem
                    .read_u64(module.wrapping_add(common::MODULE_DICT))
                    .map_err(ReadError::from)
                    .and_then(|dict| {
                        if self.only_wanted_modules && !self.module_file_wanted(dict)? {
                            return Ok(());
                        }
                        self.namespace(dict, None, 0, 0)
                    });
                if let Err(e) = walked {
                    log::debug!("locate: module at {module:#x} skipped: {e}");
                }
            }
        }
        for &interp in &interpreters {
            let tstates = match t.thread_states(interp) {
                Ok(tstates) => tstates,
                Err(e) => {
                    log::debug!("locate: threads of {interp:#x} unreadable: {e}");
                    continue;
                }
            };
            for tstate in tstates {
                let frames = match t.frames(tstate, None) {
                    Ok(frames) => frames,
                    Err((frames, e)) => {
                        log::debug!("locate: stack of {tstate:#x} cut short: {e}");
                        frames
                    }
                };
                // Not counted: stacks are bounded already, and the code
                // running now matters most.
                for frame in frames {
                    if let Err(e) = self.code(frame.code, Via::Frame, 0) {
                        log::debug!("locate: code at {:#x} skipped: {e}", frame.code);
                    }
                }
            }
        }
        Ok(())
    }

    /// What the object at `obj` is.
    fn kind(&mut self, obj: u64) -> Result<Kind, ReadError> {
        let ty = self.t.mem.read_u64(obj.wrapping_add(common::OB_TYPE))?;
        self.kind_of_type(ty)
    }

    /// What objects of type `ty` are.
    fn kind_of_type(&mut self, ty: u64) -> Result<Kind, ReadError> {
        if let Some(&kind) = self.kinds.get(&ty) {
            return Ok(kind);
        }
        let header = self.t.mem.read_vec(ty, common::TP_FLAGS as usize + 8)?;
        let flags = word(&header, common::TP_FLAGS);
        let kind = if flags & TPFLAGS_TYPE_SUBCLASS != 0 {
            Kind::Class
        } else if flags & TPFLAGS_HEAPTYPE != 0 {
            // A class written in Python or a C heap type: none of the
            // builtin kinds below (those are static types).
            Kind::Other
        } else if self.t.known.types.get("PyCode_Type") == Some(&ty) {
            Kind::Code
        } else {
            match self.t.type_name(ty)?.as_str() {
                "function" => Kind::Function,
                "staticmethod" | "classmethod" => Kind::Wrapper,
                "property" => Kind::Property,
                "module" => Kind::Module,
                "code" => Kind::Code,
                _ => Kind::Other,
            }
        };
        self.kinds.insert(ty, kind);
        Ok(kind)
    }

    /// The functions and classes of a module or class dict.
    fn namespace(
        &mut self,
        dict: u64,
        class: Option<&str>,
        penalty: u32,
        depth: u32,
    ) -> Result<(), ReadError> {
        if dict == 0 {
            return Ok(());
        }
        for (key, value) in dict_items(self.t, dict)? {
            if !self.count() {
                return Ok(());
            }
            // Type and (for a function) `func_code` in one read; a short
            // object at the end of a mapping gets its type alone.
            let code_at = self.t.info.offsets.function_code;
            let head = self
                .t
                .mem
                .read_vec(value, code_at as usize + 8)
                .or_else(|_| self.t.mem.read_vec(value, common::OB_TYPE as usize + 8));
            let kind = head
                .map_err(ReadError::from)
                .and_then(|head| Ok((self.kind_of_type(word(&head, common::OB_TYPE))?, head)));
            let result = match kind {
                Ok((Kind::Function, head)) if head.len() > code_at as usize => self.code(
                    word(&head, code_at),
                    Via::Dict {
                        class,
                        key,
                        penalty,
                    },
                    depth,
                ),
                Ok((kind, _)) => self.member(kind, value, class, key, penalty, depth),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                log::debug!("locate: object at {value:#x} skipped: {e}");
            }
        }
        Ok(())
    }

    /// A dict value of kind `kind` other than a function read whole.
    fn member(
        &mut self,
        kind: Kind,
        value: u64,
        class: Option<&str>,
        key: u64,
        penalty: u32,
        depth: u32,
    ) -> Result<(), ReadError> {
        match kind {
            Kind::Function => self.function(value, class, key, penalty, depth),
            Kind::Wrapper => self
                .t
                .mem
                .read_u64(value.wrapping_add(common::WRAPPED_CALLABLE))
                .map_err(ReadError::from)
                .and_then(|f| self.function_if_any(f, class, key, penalty, depth)),
            Kind::Property => (0..3u64).try_for_each(|i| {
                let f = self
                    .t
                    .mem
                    .read_u64(value.wrapping_add(common::PROPERTY_GET + 8 * i))?;
                self.function_if_any(f, class, key, penalty, depth)
            }),
            Kind::Class => self.class(value, class, key, penalty, depth),
            _ => Ok(()),
        }
    }

    fn function_if_any(
        &mut self,
        f: u64,
        class: Option<&str>,
        key: u64,
        penalty: u32,
        depth: u32,
    ) -> Result<(), ReadError> {
        if f != 0 && self.kind(f)? == Kind::Function {
            self.function(f, class, key, penalty, depth)?;
        }
        Ok(())
    }

    fn function(
        &mut self,
        f: u64,
        class: Option<&str>,
        key: u64,
        penalty: u32,
        depth: u32,
    ) -> Result<(), ReadError> {
        let code = self
            .t
            .mem
            .read_u64(f.wrapping_add(self.t.info.offsets.function_code))?;
        self.code(
            code,
            Via::Dict {
                class,
                key,
                penalty,
            },
            depth,
        )
    }

    /// A class: its dict, once (again only by a better path when names
    /// are rebuilt).
    fn class(
        &mut self,
        cls: u64,
        outer: Option<&str>,
        key: u64,
        penalty: u32,
        depth: u32,
    ) -> Result<(), ReadError> {
        if depth >= MAX_DEPTH {
            return Ok(());
        }
        let header = self.t.mem.read_vec(cls, TYPE_HEADER)?;
        if word(&header, common::TP_FLAGS) & TPFLAGS_HEAPTYPE == 0 {
            return Ok(()); // a static (builtin) type: no Python code
        }
        let (qualname, penalty) = if self.rebuild_names {
            let full = self.t.type_name(cls)?;
            let name = full.rsplit('.').next().unwrap_or(&full).to_owned();
            let alias = self.t.read_str(key).ok().as_deref() != Some(name.as_str());
            let qualname = match outer {
                Some(outer) => format!("{outer}.{name}"),
                None => name,
            };
            (qualname, penalty + if alias { ALIAS_PENALTY } else { 0 })
        } else {
            (String::new(), 0)
        };
        match self.classes.get(&cls) {
            Some(&walked) if walked <= penalty => return Ok(()),
            _ => {}
        }
        self.classes.insert(cls, penalty);
        let dict = word(&header, common::TP_DICT);
        self.namespace(dict, Some(&qualname), penalty, depth + 1)
    }

    /// Whether the str at `addr` (a `co_filename`) is a wanted file.
    fn wanted_file(&mut self, addr: u64) -> Result<bool, ReadError> {
        if let Some(&wanted) = self.file_match.get(&addr) {
            return Ok(wanted);
        }
        let wanted = self.files.matches(&self.t.read_str(addr)?);
        self.file_match.insert(addr, wanted);
        Ok(wanted)
    }

    /// A code object: recorded when its file is wanted, with its nested
    /// code objects.
    fn code(&mut self, code: u64, via: Via<'_>, depth: u32) -> Result<(), ReadError> {
        if code == 0 {
            return Ok(());
        }
        if !self.nodes.contains_key(&code) {
            // Type and file name in one read.
            let filename_at = self.t.info.offsets.code_filename;
            let head = self.t.mem.read_vec(code, filename_at as usize + 8)?;
            if self.kind_of_type(word(&head, common::OB_TYPE))? != Kind::Code
                || !self.wanted_file(word(&head, filename_at))?
            {
                return Ok(());
            }
            let node = self.read_node(code)?;
            self.nodes.insert(code, node);
            self.order.push(code);
            self.record(code, via)?;
            if depth < MAX_DEPTH {
                self.consts(code, depth)?;
            }
        } else {
            self.record(code, via)?;
        }
        Ok(())
    }

    /// Notes how a code object of a wanted file was reached.
    fn record(&mut self, code: u64, via: Via<'_>) -> Result<(), ReadError> {
        let (penalty, hint) = match via {
            Via::Consts { parent } => {
                let node = self.nodes.get_mut(&code).expect("recorded node");
                if node.parent.is_none() && parent != code {
                    node.parent = Some(parent);
                }
                return Ok(());
            }
            Via::Dict { .. } | Via::Frame if !self.rebuild_names => return Ok(()),
            Via::Dict {
                class,
                key,
                penalty,
            } => {
                let name = &self.nodes[&code].name;
                let alias = self.t.read_str(key).ok().as_deref() != Some(name.as_str());
                let hint = match class {
                    Some(class) => format!("{class}.{name}"),
                    None => name.clone(),
                };
                (penalty + if alias { ALIAS_PENALTY } else { 0 }, hint)
            }
            Via::Frame => {
                let name = &self.nodes[&code].name;
                let penalty = if name == "<module>" { 0 } else { FRAME_PENALTY };
                (penalty, name.clone())
            }
        };
        let node = self.nodes.get_mut(&code).expect("recorded node");
        if node.direct.as_ref().is_none_or(|(best, _)| penalty < *best) {
            node.direct = Some((penalty, hint));
        }
        Ok(())
    }

    /// The code objects among the constants of `code`.
    fn consts(&mut self, code: u64, depth: u32) -> Result<(), ReadError> {
        let o = &self.t.info.offsets;
        let tuple = self.t.mem.read_u64(code.wrapping_add(o.code_consts))?;
        if tuple == 0 {
            return Ok(());
        }
        let len = size_of_object(self.t, tuple, MAX_CONSTS)?;
        let bytes = self
            .t
            .mem
            .read_vec(tuple.wrapping_add(o.tuple_items), len as usize * 8)?;
        for item in bytes.chunks_exact(8) {
            if !self.count() {
                return Ok(());
            }
            let item = u64::from_le_bytes(item.try_into().expect("8 bytes"));
            if item == 0 || self.kind(item).ok() != Some(Kind::Code) {
                continue;
            }
            // Known to be code: `code` re-reads the type with the file name.
            if let Err(e) = self.code(item, Via::Consts { parent: code }, depth + 1) {
                log::debug!("locate: nested code at {item:#x} skipped: {e}");
            }
        }
        Ok(())
    }

    fn read_node(&self, code: u64) -> Result<Node, ReadError> {
        let t = self.t;
        let o = &t.info.offsets;
        let w = t.mem.read_vec(code, self.code_window)?;
        let name = t.read_str(word(&w, o.code_name))?;
        let qualname = match o.code_qualname {
            Some(off) => Some(t.read_str(word(&w, off))?),
            None => None,
        };
        Ok(Node {
            name,
            qualname,
            filename: t.read_str(word(&w, o.code_filename))?,
            first_line: int(&w, o.code_firstlineno),
            flags: int(&w, o.code_flags) as u32,
            argcount: int(&w, o.code_argcount) as u32,
            varnames_tuple: word(&w, o.code_varnames),
            nlocals: int(&w, o.code_nlocals) as u32,
            linetable: word(&w, o.code_linetable),
            firsttraceable: o.code_firsttraceable.map(|off| int(&w, off)),
            direct: None,
            parent: None,
        })
    }

    /// The decoded lines of a code object (`None` if unreadable).
    fn lines(&mut self, code: u64) -> Option<&Lines> {
        if !self.lines.contains_key(&code) {
            let lines = self.read_lines(code).map_err(|e| {
                log::debug!("locate: lines of code at {code:#x} unreadable: {e}");
            });
            self.lines.insert(code, lines.ok());
        }
        self.lines[&code].as_ref()
    }

    fn read_lines(&self, code: u64) -> Result<Lines, ReadError> {
        let t = self.t;
        let o = &t.info.offsets;
        let node = &self.nodes[&code];
        let (base, units) = match (o.code_code, o.code_code_adaptive) {
            (Some(off), _) => {
                let bytes = t.mem.read_u64(code.wrapping_add(off))?;
                let len = size_of_object(t, bytes, 2 * MAX_CODE_UNITS)?;
                (bytes.wrapping_add(common::BYTES_DATA), len / 2)
            }
            (None, Some(off)) => (
                code.wrapping_add(off),
                size_of_object(t, code, MAX_CODE_UNITS)?,
            ),
            (None, None) => return Err(ReadError::Corrupt("no bytecode offset")),
        };
        let units = u32::try_from(units).map_err(|_| ReadError::Corrupt("code size"))?;
        let start = match node.firsttraceable {
            Some(first) => u32::try_from(first)
                .ok()
                .filter(|&s| s < units)
                .ok_or(ReadError::Corrupt("_co_firsttraceable out of range"))?,
            None => 0,
        };
        let len = size_of_object(t, node.linetable, MAX_LINE_TABLE)?;
        let table = t.mem.read_vec(
            node.linetable.wrapping_add(common::BYTES_DATA),
            len as usize,
        )?;
        let ranges = linetable::line_ranges(t.info.layout.line_table, node.first_line, &table)
            .map_err(|_| ReadError::Corrupt("line table"))?
            .into_iter()
            .filter(|(s, _, _)| *s < units)
            .map(|(s, e, l)| (s, e.min(units), l))
            .collect();
        Ok(Lines {
            ranges,
            start,
            base,
        })
    }

    /// `co_varnames` (up to `co_nlocals`) / `co_localsplusnames`.
    fn varnames(&self, code: u64) -> Result<Vec<String>, ReadError> {
        let t = self.t;
        let o = &t.info.offsets;
        let node = &self.nodes[&code];
        let tuple = node.varnames_tuple;
        let mut count = size_of_object(t, tuple, MAX_LOCALS)?;
        if o.code_nlocalsplus.is_none() {
            count = count.min(u64::from(node.nlocals));
        }
        let items = t
            .mem
            .read_vec(tuple.wrapping_add(o.tuple_items), count as usize * 8)?;
        items
            .chunks_exact(8)
            .map(|c| t.read_str(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect()
    }

    /// The qualified name of a code object: `co_qualname`, or rebuilt
    /// (with its penalty).
    fn qualname(&self, code: u64) -> (u32, String) {
        self.qualname_at(code, 0)
    }

    fn qualname_at(&self, code: u64, depth: u32) -> (u32, String) {
        let node = &self.nodes[&code];
        if let Some(q) = &node.qualname {
            return (0, q.clone());
        }
        let mut best = node
            .direct
            .clone()
            .unwrap_or((FRAME_PENALTY * 2, node.name.clone()));
        if let Some(parent) = node.parent.filter(|p| self.nodes.contains_key(p))
            && depth < MAX_DEPTH
        {
            let p = &self.nodes[&parent];
            let (penalty, pq) = self.qualname_at(parent, depth + 1);
            let derived = if p.name == "<module>" {
                node.name.clone()
            } else if p.is_function() {
                format!("{pq}.<locals>.{}", node.name)
            } else {
                format!("{pq}.{}", node.name)
            };
            if penalty < best.0 {
                best = (penalty, derived);
            }
        }
        best
    }

    /// Whether `ancestor` contains `code` (in its `co_consts`, at any depth).
    fn contains(&self, ancestor: u64, code: u64) -> bool {
        let mut at = code;
        for _ in 0..=MAX_DEPTH {
            match self.nodes.get(&at).and_then(|n| n.parent) {
                Some(p) if p == ancestor => return true,
                Some(p) => at = p,
                None => return false,
            }
        }
        false
    }

    fn found(&mut self, code: u64, index: u32, fallback_line: i32) -> Result<Found, ReadError> {
        let varnames = self.varnames(code)?;
        let (_, qualname) = self.qualname(code);
        let lines = self.lines(code).expect("lines read before");
        let line = lines.line_at(index).unwrap_or(fallback_line);
        let (start, base, places) = (lines.start, lines.base, lines.places(line));
        let node = &self.nodes[&code];
        Ok(Found {
            code,
            filename: node.filename.clone(),
            qualname,
            line: u32::try_from(line).unwrap_or(0),
            instr_index: index,
            unit_addr: base.wrapping_add(2 * u64::from(index)),
            function_start: index == start,
            varnames,
            argcount: node.argcount,
            places,
        })
    }

    /// `FILE:LINE` (see the module docs).
    fn by_line(&mut self, file: &str, line: u32) -> Result<Vec<Found>, LocateError> {
        let want = i32::try_from(line).unwrap_or(i32::MAX);
        let mut candidates: Vec<(u64, u32)> = Vec::new();
        let mut with_code: BTreeSet<i32> = BTreeSet::new();
        for code in self.order.clone() {
            let (first_line, function) = {
                let node = &self.nodes[&code];
                (node.first_line, node.is_function())
            };
            let Some(lines) = self.lines(code) else {
                continue;
            };
            with_code.extend(lines.lines());
            if function {
                with_code.insert(first_line);
            }
            if let Some(index) = lines.first_on(want) {
                candidates.push((code, index));
            } else if function && lines.header(first_line).contains(&want) {
                candidates.push((code, lines.start));
            }
        }
        let innermost: Vec<(u64, u32)> = candidates
            .iter()
            .filter(|(outer, _)| {
                !candidates
                    .iter()
                    .any(|(inner, _)| inner != outer && self.contains(*outer, *inner))
            })
            .copied()
            .collect();
        if innermost.is_empty() {
            let before = with_code.range(..want).rev().take(NEARBY_EACH_SIDE);
            let after = with_code.range(want..).take(NEARBY_EACH_SIDE);
            let mut nearby: Vec<u32> = before
                .chain(after)
                .filter_map(|&l| u32::try_from(l).ok())
                .collect();
            nearby.sort_unstable();
            return Err(LocateError::NoCode {
                file: file.to_owned(),
                line,
                nearby,
            });
        }
        innermost
            .into_iter()
            .map(|(code, index)| self.found(code, index, want).map_err(LocateError::from))
            .collect()
    }

    /// `FILE:QUALNAME` and `MODULE:QUALNAME`: the start of every code object
    /// with that qualified name, else of the one function with that bare
    /// name.
    fn by_name(&mut self, place: &str, wanted: &str) -> Result<Vec<Found>, LocateError> {
        let named: Vec<(u64, String)> = self
            .order
            .iter()
            .map(|&code| (code, self.qualname(code).1))
            .collect();
        let mut chosen: Vec<u64> = named
            .iter()
            .filter(|(_, q)| q == wanted)
            .map(|(c, _)| *c)
            .collect();
        if chosen.is_empty() && !wanted.contains('.') {
            let by_name: Vec<&(u64, String)> = named
                .iter()
                .filter(|(c, _)| self.nodes[c].name == wanted)
                .collect();
            let qualnames: BTreeSet<&str> = by_name.iter().map(|(_, q)| q.as_str()).collect();
            if qualnames.len() > 1 {
                let mut candidates: Vec<(i32, String)> = by_name
                    .iter()
                    .map(|(c, q)| (self.nodes[c].first_line, q.clone()))
                    .collect();
                candidates.sort();
                candidates.dedup();
                return Err(LocateError::Ambiguous {
                    place: place.to_owned(),
                    name: wanted.to_owned(),
                    candidates: candidates.into_iter().map(|(_, q)| q).collect(),
                });
            }
            chosen = by_name.iter().map(|(c, _)| *c).collect();
        }
        if chosen.is_empty() {
            let mut functions: Vec<(i32, &str)> = named
                .iter()
                .filter(|(c, _)| {
                    let node = &self.nodes[c];
                    node.is_function() && !node.name.starts_with('<')
                })
                .map(|(c, q)| (self.nodes[c].first_line, q.as_str()))
                .collect();
            functions.sort();
            functions.dedup();
            let more = functions.len().saturating_sub(LISTED_FUNCTIONS);
            return Err(LocateError::NoFunction {
                place: place.to_owned(),
                qualname: wanted.to_owned(),
                functions: functions
                    .into_iter()
                    .take(LISTED_FUNCTIONS)
                    .map(|(_, q)| q.to_owned())
                    .collect(),
                more,
            });
        }
        let mut out = Vec::new();
        for code in chosen {
            let first_line = self.nodes[&code].first_line;
            let Some(start) = self.lines(code).map(|l| l.start) else {
                continue;
            };
            out.push(self.found(code, start, first_line)?);
        }
        Ok(out)
    }
}

impl<M: Memory> Target<M> {
    /// How many modules the interpreters' `sys.modules` hold (`ma_used`):
    /// a cheap sign that something was imported.
    pub fn modules_count(&self) -> Result<u64, ReadError> {
        let mut n = 0;
        for interp in self.interpreters()? {
            if let Some(modules) = sys_modules(self, interp)? {
                n += self.mem.read_u64(modules.wrapping_add(common::DICT_USED))?;
            }
        }
        Ok(n)
    }

    /// Every module in the interpreters' `sys.modules`, with its
    /// `__file__` when it has one: what a log point waiting for a file or
    /// module can be compared with.
    pub fn loaded_modules(&self) -> Result<Vec<(String, Option<String>)>, ReadError> {
        let mut out = Vec::new();
        for interp in self.interpreters()? {
            let Some(modules) = sys_modules(self, interp)? else {
                continue;
            };
            for (key, value) in dict_items(self, modules)? {
                let Ok(name) = self.read_str(key) else {
                    continue;
                };
                let file = module_file(self, value).ok().flatten();
                out.push((name, file));
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Most names offered in a "did you mean" list.
const SIMILAR_LISTED: usize = 5;

/// The loaded files or modules that look like `given` (a file or module
/// the process has not loaded): the same base name in another directory,
/// or a base name a few letters off. Closest first.
pub fn similar_names<'a>(given: &str, names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let base = |s: &str| -> String {
        s.rsplit(['/', '.'])
            .find(|p| !p.is_empty() && *p != "py")
            .unwrap_or(s)
            .to_lowercase()
    };
    let wanted = base(given);
    let mut scored: Vec<(usize, String)> = names
        .into_iter()
        .filter_map(|name| {
            let distance = strsim::levenshtein(&wanted, &base(name));
            let allowed = (wanted.chars().count() / 4).max(1);
            (distance <= allowed).then(|| (distance, name.to_owned()))
        })
        .collect();
    scored.sort();
    scored.dedup();
    scored
        .into_iter()
        .take(SIMILAR_LISTED)
        .map(|(_, n)| n)
        .collect()
}

/// The `sys.modules` dict of an interpreter, if it has one.
fn sys_modules<M: Memory>(t: &Target<M>, interp: u64) -> Result<Option<u64>, ReadError> {
    let sysdict = t
        .mem
        .read_u64(interp.wrapping_add(t.info.offsets.interp_sysdict))?;
    if sysdict == 0 {
        return Ok(None);
    }
    dict_get(t, sysdict, "modules")
}

/// The value under the str key `name` in a dict (compared by reading each
/// key: no hashing).
fn dict_get<M: Memory>(t: &Target<M>, dict: u64, name: &str) -> Result<Option<u64>, ReadError> {
    for (key, value) in dict_items(t, dict)? {
        if t.read_str(key).ok().as_deref() == Some(name) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// The module object of `name` in any interpreter's `sys.modules`, else
/// `__main__` when its file is `name`'s (see the module docs).
fn find_module<M: Memory>(t: &Target<M>, name: &str) -> Result<Option<u64>, ReadError> {
    let mut main = None;
    for interp in t.interpreters()? {
        let Some(modules) = sys_modules(t, interp)? else {
            continue;
        };
        for (key, value) in dict_items(t, modules)? {
            match t.read_str(key).ok().as_deref() {
                Some(k) if k == name => return Ok(Some(value)),
                Some("__main__") if main.is_none() => main = Some(value),
                _ => {}
            }
        }
    }
    if let Some(main) = main
        && let Some(file) = module_file(t, main)?
        && is_script_of(&file, name)
    {
        return Ok(Some(main));
    }
    Ok(None)
}

/// Whether `file` (a `__main__.__file__`) is the source of module `name`:
/// `.../a/b.py` or `.../a/b/__main__.py` for `a.b`.
fn is_script_of(file: &str, name: &str) -> bool {
    let key = PathKey::new(file);
    let parts: Vec<&str> = name.split('.').collect();
    let (last, dirs) = parts.split_last().expect("split gives one part");
    let as_file: Vec<String> = dirs
        .iter()
        .map(|d| (*d).to_owned())
        .chain([format!("{last}.py")])
        .collect();
    let as_package: Vec<String> = parts
        .iter()
        .map(|d| (*d).to_owned())
        .chain(["__main__.py".to_owned()])
        .collect();
    key.segments.ends_with(&as_file) || key.segments.ends_with(&as_package)
}

/// A module's `__file__`, when it is a str.
fn module_file<M: Memory>(t: &Target<M>, module: u64) -> Result<Option<String>, ReadError> {
    let dict = t.mem.read_u64(module.wrapping_add(common::MODULE_DICT))?;
    if dict == 0 {
        return Ok(None);
    }
    Ok(match dict_get(t, dict, "__file__")? {
        Some(value) if value != t.known.none => t.read_str(value).ok(),
        _ => None,
    })
}

/// `ob_size` of a variable-size object, at most `max`.
fn size_of_object<M: Memory>(t: &Target<M>, addr: u64, max: u64) -> Result<u64, ReadError> {
    let size = t.mem.read_i64(addr.wrapping_add(common::OB_SIZE))?;
    match u64::try_from(size) {
        Ok(s) if s <= max => Ok(s),
        _ => Err(ReadError::Corrupt("object size out of range")),
    }
}

/// The `(key, value)` pairs of a combined-table dict (module, class and
/// `sys` dicts always are), in insertion order, deleted slots left out.
fn dict_items<M: Memory>(t: &Target<M>, dict: u64) -> Result<Vec<(u64, u64)>, ReadError> {
    crate::python::dict::combined_items(t, dict, MAX_DICT_ENTRIES)
}

/// The little-endian word at `at` in `buf` (0 past its end).
fn word(buf: &[u8], at: u64) -> u64 {
    let at = at as usize;
    buf.get(at..at + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// The little-endian `int` at `at` in `buf` (0 past its end).
fn int(buf: &[u8], at: u64) -> i32 {
    let at = at as usize;
    buf.get(at..at + 4)
        .map_or(0, |b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        io::{BufRead, BufReader, Write},
        path::{Path, PathBuf},
        process::{ChildStdin, Command, Stdio},
        sync::mpsc,
        time::Duration,
    };

    use serde::Deserialize;

    use super::*;
    use crate::python::memory::ProcessMemory;

    // ------------------------------------------------------------------
    // Parsing, path matching, messages.

    fn line(file: &str, line: u32) -> Location {
        Location::FileLine {
            file: file.into(),
            line,
        }
    }

    fn func(file: &str, qualname: &str) -> Location {
        Location::FileFunction {
            file: file.into(),
            qualname: qualname.into(),
        }
    }

    fn module(module: &str, qualname: &str) -> Location {
        Location::ModuleQualname {
            module: module.into(),
            qualname: qualname.into(),
        }
    }

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(parse_location("app.py:42"), Ok(line("app.py", 42)));
        assert_eq!(parse_location(" app.py:42 "), Ok(line("app.py", 42)));
        assert_eq!(
            parse_location("/srv/x/app.py:7"),
            Ok(line("/srv/x/app.py", 7))
        );
        assert_eq!(parse_location("bin/run:3"), Ok(line("bin/run", 3)));
        assert_eq!(
            parse_location("app.py:handle_order"),
            Ok(func("app.py", "handle_order"))
        );
        assert_eq!(
            parse_location("app.py:Order.describe"),
            Ok(func("app.py", "Order.describe"))
        );
        assert_eq!(
            parse_location("app.py:make.<locals>.<lambda>"),
            Ok(func("app.py", "make.<locals>.<lambda>"))
        );
        assert_eq!(
            parse_location("pkg.mod:Class.method"),
            Ok(module("pkg.mod", "Class.method"))
        );
        assert_eq!(
            parse_location("__main__:main"),
            Ok(module("__main__", "main"))
        );
        assert_eq!(parse_location("zoë:ünï"), Ok(module("zoë", "ünï")));
        // The last ':' separates: a path may hold one.
        assert_eq!(
            parse_location("/tmp/a:b/app.py:9"),
            Ok(line("/tmp/a:b/app.py", 9))
        );
    }

    #[test]
    fn rejects_bad_locations_with_one_line_reasons() {
        for (input, wanted) in [
            ("app.py", "has no ':'"),
            (":42", "nothing before ':'"),
            ("app.py:", "nothing after ':'"),
            ("app.py:0", "line numbers start at 1"),
            ("app.py:99999999999", "too large"),
            ("pkg.mod:42", "a line number needs a file"),
            (
                "app.py:handle order",
                "neither a line number nor a function name",
            ),
            ("app.py:-3", "neither a line number nor a function name"),
            (
                "app.py:Order..x",
                "neither a line number nor a function name",
            ),
            (
                "app.py:<locals",
                "neither a line number nor a function name",
            ),
            ("my-app:main", "neither a file"),
            ("pkg..mod:main", "neither a file"),
        ] {
            let err = parse_location(input).expect_err(input);
            assert!(err.contains(wanted), "{input}: {err}");
            assert!(!err.contains('\n'), "{input}: {err}");
        }
    }

    #[test]
    fn matches_files_at_path_boundaries() {
        let matches =
            |given: &str, code: &str| PathKey::new(given).matches_suffix(&PathKey::new(code));
        assert!(matches("app.py", "/srv/x/app.py"));
        assert!(matches("x/app.py", "/srv/x/app.py"));
        assert!(matches("./x/app.py", "/srv/x/app.py"));
        assert!(matches("../x/app.py", "/srv/x/app.py"));
        assert!(matches("/srv/x/app.py", "/srv/x/app.py"));
        assert!(matches("/srv/x/app.py", "/srv/x/./y/../app.py"));
        assert!(!matches("app.py", "/srv/myapp.py"));
        assert!(!matches("y/app.py", "/srv/x/app.py"));
        assert!(!matches("/x/app.py", "/srv/x/app.py"));
        assert!(!matches("/srv/x/app.py", "/other/srv/x/app.py"));
        // A relative co_filename (a script started by a relative path).
        assert!(matches("/srv/x/app.py", "x/app.py"));
        assert!(matches("app.py", "app.py"));
        assert!(!matches("app.py", "<frozen app>"));
        assert!(!matches("", "/srv/x/app.py"));
    }

    #[test]
    fn an_ambiguous_file_names_its_candidates_and_a_longer_path() {
        let e = LocateError::AmbiguousFile {
            file: "app.py".into(),
            candidates: vec![
                "/srv/site-packages/flask/app.py".into(),
                "/srv/shop/app.py".into(),
            ],
        };
        assert_eq!(
            e.to_string(),
            "app.py matches 2 loaded files: /srv/site-packages/flask/app.py, /srv/shop/app.py; \
             give more of the path (e.g. flask/app.py)"
        );
        // When the parent directories are the same, more is needed.
        assert_eq!(
            shortest_unique(&["/a/x/app.py".into(), "/b/x/app.py".into()], "app.py"),
            "a/x/app.py"
        );
    }

    #[test]
    fn similar_names_are_the_same_base_name_or_a_few_letters_off() {
        let loaded = [
            "/srv/shop/app.py",
            "/usr/lib/python3/flask/app.py",
            "/srv/shop/handlers.py",
            "/usr/lib/python3/json/__init__.py",
        ];
        assert_eq!(
            similar_names("shopp/app.py", loaded),
            ["/srv/shop/app.py", "/usr/lib/python3/flask/app.py"]
        );
        assert_eq!(
            similar_names("handler.py", loaded),
            ["/srv/shop/handlers.py"]
        );
        assert!(similar_names("models.py", loaded).is_empty());
        assert_eq!(
            similar_names("shop.handler", ["shop.handlers", "json", "shop"]),
            ["shop.handlers"]
        );
    }

    #[test]
    fn knows_a_script_by_its_module_name() {
        assert!(is_script_of("/srv/x/app.py", "app"));
        assert!(is_script_of("/srv/pkg/app.py", "pkg.app"));
        assert!(is_script_of("/srv/pkg/__main__.py", "pkg"));
        assert!(!is_script_of("/srv/x/app.py", "pkg.app"));
        assert!(!is_script_of("/srv/x/myapp.py", "app"));
    }

    #[test]
    fn messages_say_what_to_do() {
        let cases: Vec<(LocateError, &str)> = vec![
            (
                LocateError::NotLoaded {
                    file: "late.py".into(),
                },
                "no module from late.py is loaded in the process (yet): check the path, or let \
                 the log point wait for the import",
            ),
            (
                LocateError::NoCode {
                    file: "app.py".into(),
                    line: 43,
                    nearby: vec![40, 42, 45],
                },
                "no code at app.py:43; lines with code nearby: 40, 42, 45",
            ),
            (
                LocateError::NoFunction {
                    place: "app.py".into(),
                    qualname: "nope".into(),
                    functions: vec!["a".into(), "b".into(), "C.m".into()],
                    more: 0,
                },
                "no function nope in app.py; functions there: a, b, C.m",
            ),
            (
                LocateError::NoFunction {
                    place: "module m (/m.py)".into(),
                    qualname: "nope".into(),
                    functions: vec!["a".into()],
                    more: 4,
                },
                "no function nope in module m (/m.py); functions there: a and 4 more",
            ),
            (
                LocateError::Ambiguous {
                    place: "app.py".into(),
                    name: "__init__".into(),
                    candidates: vec!["A.__init__".into(), "B.__init__".into()],
                },
                "__init__ is ambiguous in app.py: A.__init__, B.__init__; give the qualified name",
            ),
        ];
        for (err, text) in cases {
            assert_eq!(err.to_string(), text);
        }
        assert!(
            LocateError::ModuleNotLoaded { module: "m".into() }.is_not_loaded()
                && !LocateError::ModuleWithoutFile { module: "m".into() }.is_not_loaded()
        );
    }

    // ------------------------------------------------------------------
    // Live interpreters.

    /// Every interpreter the tests run on: label and executable.
    fn interpreter(label: &str) -> PathBuf {
        match label.strip_prefix("pyenv ") {
            Some(version) => pyprobe_testenv::pyenv_python(version),
            None if label.starts_with("Debian 3.11") => "/usr/bin/python3.11".into(),
            None => pyprobe_testenv::sid_python(14),
        }
    }

    /// Says a check was skipped, on the test process's own stderr: the test
    /// harness captures `eprintln!`, and a skip must never go unseen.
    fn skipped(what: &str) {
        let _ = writeln!(std::io::stderr(), "logpoint::locate SKIPPED {what}");
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures")
            .join(name)
            .canonicalize()
            .expect("fixture exists")
    }

    /// The 1-based line of `fixture` holding `marker`.
    fn marker_line(fixture: &Path, marker: &str) -> u32 {
        let text = std::fs::read_to_string(fixture).unwrap();
        let index = text
            .lines()
            .position(|l| l.contains(marker))
            .unwrap_or_else(|| panic!("{marker} in {}", fixture.display()));
        index as u32 + 1
    }

    /// A Python child serving commands on stdin.
    struct Child {
        child: std::process::Child,
        stdin: ChildStdin,
        lines: mpsc::Receiver<String>,
        label: String,
    }

    impl Child {
        fn spawn(label: &str, python: &Path, args: &[&str]) -> Child {
            Self::spawn_command(label, Command::new(python), args)
        }

        fn spawn_command(label: &str, mut command: Command, args: &[&str]) -> Child {
            let python = PathBuf::from(command.get_program());
            let mut child = command
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("{label}: running {}: {e}", python.display()));
            let stdin = child.stdin.take().expect("stdin");
            let stdout = child.stdout.take().expect("stdout");
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            Child {
                child,
                stdin,
                lines,
                label: label.to_owned(),
            }
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Waits (at most 10 s) for a line; returns it.
        fn expect(&self, wanted: impl Fn(&str) -> bool, what: &str) -> String {
            loop {
                match self.lines.recv_timeout(Duration::from_secs(10)) {
                    Ok(line) if wanted(&line) => return line,
                    Ok(_) => {}
                    Err(e) => panic!("{}: no {what} from the child: {e}", self.label),
                }
            }
        }

        fn command(&mut self, command: &str, answer: &str) {
            writeln!(self.stdin, "{command}").unwrap();
            self.stdin.flush().unwrap();
            self.expect(|l| l == answer, answer);
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The interpreter's own view of a file's code objects (the
    /// independent cross-check): `dis` instructions, line tables, names.
    const CHECKER: &str = r#"
import dis, gc, io, json, sys, types
path = sys.argv[1]
code = compile(open(path, encoding="utf-8").read(), path, "exec")
saved, sys.stdout = sys.stdout, io.TextIOWrapper(io.BytesIO())
try:
    exec(code, {"__name__": "checked", "__file__": path})
finally:
    sys.stdout = saved
qualnames = {}
for f in gc.get_objects():
    if isinstance(f, types.FunctionType):
        qualnames.setdefault(id(f.__code__), f.__qualname__)
def walk(co):
    yield co
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            yield from walk(c)
def line_map(co):
    lines = {}
    if hasattr(co, "co_lines"):
        for s, e, l in co.co_lines():
            for off in range(s, e, 2):
                lines[off] = l
    else:
        starts = dict(dis.findlinestarts(co))
        line = co.co_firstlineno
        for off in range(0, len(co.co_code), 2):
            line = starts.get(off, line)
            lines[off] = line
    return lines
def live_opcodes(co):
    try:
        ins = dis.get_instructions(co, adaptive=True)
    except TypeError:
        ins = dis.get_instructions(co)
    return {i.offset: i.opcode for i in ins}
out = []
for co in walk(code):
    lines = line_map(co)
    ops = live_opcodes(co)
    ins = list(dis.get_instructions(co))
    start = next((i.offset // 2 for i in ins if i.opname == "RESUME"), 0)
    first = {}
    for i in ins:
        l = lines.get(i.offset)
        if i.offset // 2 >= start and l is not None and str(l) not in first:
            first[str(l)] = [i.offset // 2, ops[i.offset]]
    start_line = next((lines[o] for o in sorted(lines) if o >= 2 * start and lines[o] is not None), co.co_firstlineno)
    out.append({
        "name": co.co_name,
        "qualname": getattr(co, "co_qualname", None) or qualnames.get(id(co)),
        "first_line": co.co_firstlineno,
        "function": bool(co.co_flags & 1),
        "start": [start, ops[2 * start], start_line],
        "lines": first,
        "varnames": list(co.co_varnames),
        "cellvars": list(co.co_cellvars),
        "freevars": list(co.co_freevars),
        "argcount": co.co_argcount,
    })
print(json.dumps(out))
"#;

    #[derive(Debug, Deserialize)]
    struct Checked {
        name: String,
        qualname: Option<String>,
        first_line: i32,
        function: bool,
        /// Code unit, live opcode, line.
        start: (u32, u8, u32),
        /// Line → (code unit, live opcode) of its first instruction.
        lines: BTreeMap<String, (u32, u8)>,
        varnames: Vec<String>,
        cellvars: Vec<String>,
        freevars: Vec<String>,
        argcount: u32,
    }

    fn check_file(label: &str, python: &Path, file: &Path) -> Vec<Checked> {
        let out = Command::new(python)
            .args(["-I", "-B", "-c", CHECKER])
            .arg(file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{label}: checker: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn checked<'a>(codes: &'a [Checked], qualname: &str) -> &'a Checked {
        let matching: Vec<_> = codes
            .iter()
            .filter(|c| c.qualname.as_deref() == Some(qualname))
            .collect();
        assert_eq!(matching.len(), 1, "{qualname} in {codes:?}");
        matching[0]
    }

    /// What `find_code` must give for the start of `code`.
    fn assert_start(
        target: &Target<ProcessMemory>,
        label: &str,
        found: &Found,
        code: &Checked,
        what: &str,
    ) {
        let (index, opcode, line) = code.start;
        assert_eq!(found.instr_index, index, "{label} {what}: start index");
        assert!(found.function_start, "{label} {what}");
        assert_eq!(found.line, line, "{label} {what}: line");
        assert_eq!(
            target.mem.read_u8(found.unit_addr).unwrap(),
            opcode,
            "{label} {what}: opcode at the watched address"
        );
        if let Some(resume) = target.info.layout.resume_opcodes {
            // RESUME, or what it became once the function ran (3.11
            // RESUME_QUICK, 3.13+ RESUME_CHECK).
            assert!(
                resume.all().any(|(_, op)| op == opcode),
                "{label} {what}: {opcode} is not a RESUME"
            );
        }
        assert_eq!(found.argcount, code.argcount, "{label} {what}");
        assert_eq!(found.varnames, localsplus(target, code), "{label} {what}");
    }

    /// The frame's local slot names as the interpreter lays them out.
    fn localsplus(target: &Target<ProcessMemory>, code: &Checked) -> Vec<String> {
        let mut names = code.varnames.clone();
        if target.info.offsets.code_nlocalsplus.is_some() {
            names.extend(
                code.cellvars
                    .iter()
                    .filter(|c| !code.varnames.contains(c))
                    .cloned(),
            );
            names.extend(code.freevars.iter().cloned());
        }
        names
    }

    fn one(label: &str, target: &Target<ProcessMemory>, loc: &Location) -> Found {
        let found = target
            .find_code(loc)
            .unwrap_or_else(|e| panic!("{label} {loc}: {e}"));
        assert_eq!(found.len(), 1, "{label} {loc}: {found:#?}");
        found.into_iter().next().unwrap()
    }

    /// The workload fixture on one interpreter: a line, a function, a
    /// method by module name, a `def` line, lines without code, names that
    /// are ambiguous or absent, and a file imported late.
    fn check_workload(label: &str, python: &Path) {
        let script = fixture("logpoint_workload.py");
        let late = fixture("logpoint_late.py");
        let script_arg = script.to_str().unwrap();
        let mut child = Child::spawn(label, python, &["-I", "-B", script_arg]);
        let codes = check_file(label, python, &script);
        let late_codes = check_file(label, python, &late);
        child.expect(|l| l == "ready", "ready");
        let target = Target::attach(child.pid()).unwrap_or_else(|e| panic!("{label}: {e}"));

        // A line: exactly one code object, the first instruction of the line.
        let total = marker_line(&script, "# handle-total");
        let handle = checked(&codes, "handle_order");
        let (index, opcode) = handle.lines[&total.to_string()];
        let at_line = one(label, &target, &line("logpoint_workload.py", total));
        assert_eq!(at_line.qualname, "handle_order", "{label}");
        assert_eq!(at_line.filename, script_arg, "{label}");
        assert_eq!(at_line.line, total, "{label}");
        assert_eq!(at_line.instr_index, index, "{label}");
        assert_eq!(
            target.mem.read_u8(at_line.unit_addr).unwrap(),
            opcode,
            "{label}: opcode of the line's first instruction"
        );
        assert_eq!(at_line.function_start, index == handle.start.0, "{label}");
        assert_eq!(
            at_line.varnames,
            ["order", "rush", "total", "count", "user", "express"],
            "{label}"
        );
        assert_eq!(at_line.argcount, 2, "{label}");
        // The same by absolute path and by a longer relative one.
        for file in [
            script_arg,
            "fixtures/logpoint_workload.py",
            "./logpoint_workload.py",
        ] {
            assert_eq!(
                one(label, &target, &line(file, total)),
                at_line,
                "{label} {file}"
            );
        }

        // A function, and its `def` line: its start.
        let start = one(
            label,
            &target,
            &func("logpoint_workload.py", "handle_order"),
        );
        assert_eq!(start.qualname, "handle_order");
        assert_start(&target, label, &start, handle, "handle_order");
        assert_eq!(
            one(label, &target, &line("logpoint_workload.py", total - 1)),
            start,
            "{label}: the def line is the function's start"
        );

        // A method by module name: the script is __main__.
        let init = checked(&codes, "Order.__init__");
        let by_stem = one(
            label,
            &target,
            &module("logpoint_workload", "Order.__init__"),
        );
        assert_eq!(by_stem.qualname, "Order.__init__");
        assert_start(&target, label, &by_stem, init, "Order.__init__");
        assert_eq!(
            one(label, &target, &module("__main__", "Order.__init__")),
            by_stem
        );
        assert_eq!(
            one(
                label,
                &target,
                &func("logpoint_workload.py", "Order.__init__")
            ),
            by_stem
        );

        // Lines without code: the error names the closest lines that have
        // some, as the interpreter sees them.
        let mut with_code: BTreeSet<u32> = BTreeSet::new();
        for code in &codes {
            with_code.extend(code.lines.keys().map(|l| l.parse::<u32>().unwrap()));
            if code.function {
                with_code.insert(code.first_line as u32);
            }
        }
        for blank in [total - 2, marker_line(&script, "USERS = [") + 1] {
            assert!(!with_code.contains(&blank));
            let err = target
                .find_code(&line("logpoint_workload.py", blank))
                .expect_err(label);
            let before = with_code.range(..blank).rev().take(3);
            let after = with_code.range(blank..).take(3);
            let mut nearby: Vec<u32> = before.chain(after).copied().collect();
            nearby.sort_unstable();
            match &err {
                LocateError::NoCode {
                    line: l,
                    nearby: got,
                    ..
                } => {
                    assert_eq!(*l, blank);
                    assert_eq!(*got, nearby, "{label}: {err}");
                }
                other => panic!("{label}: {other}"),
            }
            assert!(
                err.to_string().starts_with(&format!(
                    "no code at logpoint_workload.py:{blank}; lines with code nearby: "
                )),
                "{err}"
            );
        }

        // Names that are ambiguous or absent.
        match target.find_code(&func("logpoint_workload.py", "__init__")) {
            Err(LocateError::Ambiguous { candidates, .. }) => {
                assert_eq!(candidates, ["User.__init__", "Order.__init__"], "{label}")
            }
            other => panic!("{label}: {other:?}"),
        }
        match target.find_code(&func("logpoint_workload.py", "nope")) {
            Err(LocateError::NoFunction {
                functions, more, ..
            }) => {
                assert_eq!(
                    functions,
                    [
                        "User.__init__",
                        "Order.__init__",
                        "handle_order",
                        "countdown",
                        "never_called",
                        "run",
                        "main"
                    ],
                    "{label}"
                );
                assert_eq!(more, 0);
            }
            other => panic!("{label}: {other:?}"),
        }
        for loc in [
            line("kpoint_workload.py", total),
            line("other/logpoint_workload.py", total),
        ] {
            let err = target.find_code(&loc).expect_err(label);
            assert!(
                matches!(err, LocateError::NotLoaded { .. }),
                "{label} {loc}: {err}"
            );
        }

        // A file imported later.
        let greet_line = marker_line(&late, "def greet");
        let late_line = line("logpoint_late.py", greet_line);
        let err = target.find_code(&late_line).expect_err(label);
        assert!(
            matches!(err, LocateError::NotLoaded { .. }) && err.is_not_loaded(),
            "{label}: {err}"
        );
        let err = target
            .find_code(&module("logpoint_late", "greet"))
            .expect_err(label);
        assert!(
            matches!(err, LocateError::ModuleNotLoaded { .. }) && err.is_not_loaded(),
            "{label}: {err}"
        );
        child.command("import", "imported");
        let greet = checked(&late_codes, "greet");
        let late_start = one(label, &target, &late_line);
        assert_eq!(late_start.qualname, "greet");
        assert_start(&target, label, &late_start, greet, "greet");
        assert_eq!(
            one(label, &target, &module("logpoint_late", "greet")),
            late_start
        );
        let body = marker_line(&late, "# late-greet");
        let in_body = one(label, &target, &line("logpoint_late.py", body));
        assert_eq!(in_body.instr_index, greet.lines[&body.to_string()].0);
        assert_eq!(in_body.line, body);

        // Running the code (specializing it) moves nothing.
        child.command("run", "done");
        let again = one(label, &target, &line("logpoint_workload.py", total));
        assert_eq!(
            (again.code, again.instr_index, again.unit_addr),
            (at_line.code, at_line.instr_index, at_line.unit_addr)
        );
        writeln!(child.stdin, "quit").unwrap();
    }

    /// A script whose module-level loop keeps its code on the stack, with
    /// nested code of every kind.
    const NESTED: &str = r#"import sys


def deco(f):
    def wrapper(*a, **k):
        return f(*a, **k)
    return wrapper


class Outer:
    class Inner:
        def method(self):
            return 1

    @staticmethod
    def static(x):
        return x

    @classmethod
    def klass(cls):
        return cls

    @property
    def prop(self):
        return 2

    @prop.setter
    def prop(self, value):
        pass


def outer(a):
    b = [a]
    def inner(x):  # inner-def
        return a + x + len(b)
    return inner


def gen(n):  # gen-def
    yield n


def comp(items):
    return [i * 2 for i in items]  # comp-line


square = lambda q: q * q  # lambda-line


@deco  # deco-line
def decorated(y):
    return y


INNER = outer(1)
handler = Outer.Inner.method
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "quit":
        break
"#;

    fn check_nested(label: &str, python: &Path, dir: &Path) {
        let script = dir.join("nested_code.py");
        std::fs::write(&script, NESTED).unwrap();
        let child = Child::spawn(label, python, &["-I", "-B", script.to_str().unwrap()]);
        let codes = check_file(label, python, &script);
        child.expect(|l| l == "ready", "ready");
        let target = Target::attach(child.pid()).unwrap_or_else(|e| panic!("{label}: {e}"));
        let file = "nested_code.py";

        // Starts, after each kind of prologue, by qualified name.
        for (name, qualname) in [
            ("deco.<locals>.wrapper", "deco.<locals>.wrapper"),
            ("outer", "outer"),
            ("outer.<locals>.inner", "outer.<locals>.inner"),
            ("inner", "outer.<locals>.inner"),
            ("gen", "gen"),
            ("Outer.Inner.method", "Outer.Inner.method"),
            ("Outer.static", "Outer.static"),
            ("Outer.klass", "Outer.klass"),
            ("decorated", "decorated"),
        ] {
            let found = one(label, &target, &func(file, name));
            assert_eq!(found.qualname, qualname, "{label}");
            assert_start(&target, label, &found, checked(&codes, qualname), name);
        }
        // Getter and setter share a name.
        let props = target.find_code(&func(file, "Outer.prop")).unwrap();
        assert_eq!(props.len(), 2, "{label}: {props:#?}");
        assert!(
            props
                .iter()
                .all(|p| p.function_start && p.qualname == "Outer.prop")
        );

        // Lines: the innermost code object wins.
        let at = |marker: &str| marker_line(&script, marker);
        let inner = one(label, &target, &line(file, at("# inner-def")));
        assert_eq!(inner.qualname, "outer.<locals>.inner", "{label}");
        assert!(inner.function_start);
        let deco = one(label, &target, &line(file, at("# deco-line")));
        assert_eq!(deco.qualname, "decorated", "{label}");
        assert!(deco.function_start);
        assert_eq!(
            one(label, &target, &line(file, at("# deco-line") + 1)),
            deco,
            "{label}: the def line after a decorator"
        );
        let gen_def = one(label, &target, &line(file, at("# gen-def")));
        assert_eq!(gen_def.qualname, "gen");
        assert!(gen_def.function_start);
        let lambda = one(label, &target, &line(file, at("# lambda-line")));
        assert_eq!(lambda.qualname, "<lambda>", "{label}");
        assert!(lambda.function_start);
        // A comprehension is its own code object up to 3.11, inlined from
        // 3.12 (PEP 709): the line probes whichever runs it.
        let comp_line = at("# comp-line");
        let comp = one(label, &target, &line(file, comp_line));
        // (Up to 3.10 the checker has no name for a comprehension: none
        // of its function objects outlives a run.)
        let code = match codes.iter().find(|c| c.name == "<listcomp>") {
            Some(listcomp) => {
                assert_eq!(comp.qualname, "comp.<locals>.<listcomp>", "{label}");
                assert!(comp.function_start, "{label}");
                listcomp
            }
            None => {
                assert_eq!(comp.qualname, "comp", "{label}");
                assert!(!comp.function_start, "{label}");
                checked(&codes, "comp")
            }
        };
        let (index, opcode) = code.lines[&comp_line.to_string()];
        assert_eq!(comp.instr_index, index, "{label}");
        assert_eq!(
            target.mem.read_u8(comp.unit_addr).unwrap(),
            opcode,
            "{label}"
        );
    }

    /// The workload started by a relative path from its directory (on 3.8
    /// its `co_filename` and `__main__.__file__` are then relative).
    fn check_relative(label: &str, python: &Path) {
        let script = fixture("logpoint_workload.py");
        let mut command = Command::new(python);
        command.current_dir(script.parent().unwrap());
        let child = Child::spawn_command(label, command, &["-I", "-B", "logpoint_workload.py"]);
        child.expect(|l| l == "ready", "ready");
        let target = Target::attach(child.pid()).unwrap_or_else(|e| panic!("{label}: {e}"));
        let total = marker_line(&script, "# handle-total");
        for loc in [
            line(script.to_str().unwrap(), total),
            line("logpoint_workload.py", total),
            module("logpoint_workload", "handle_order"),
        ] {
            assert_eq!(
                one(label, &target, &loc).qualname,
                "handle_order",
                "{label} {loc}"
            );
        }
    }

    fn check_interpreter(label: &str) {
        let python = interpreter(label);
        if !python.exists() {
            skipped(&format!("{label}: {} is not installed", python.display()));
            return;
        }
        let dir = std::env::temp_dir().join(format!(
            "pyprobe-locate-{}-{}",
            std::process::id(),
            label.replace(' ', "-")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let started = Instant::now();
        std::thread::scope(|s| {
            let nested = s.spawn(|| check_nested(label, &python, &dir));
            let relative = s.spawn(|| check_relative(label, &python));
            check_workload(label, &python);
            for other in [nested, relative] {
                if let Err(panic) = other.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "logpoint::locate: {label} checked in {:?}",
            started.elapsed()
        );
    }

    /// Imports much of the standard library: thousands of functions.
    const LARGE: &str = r#"
import gc, sys, types
import argparse, asyncio, concurrent.futures, csv, dataclasses, decimal, difflib
import email.mime.multipart, email.parser, ftplib, http.client, http.server, imaplib
import inspect, json, logging.handlers, mailbox, multiprocessing, pathlib, pdb, pickle
import pydoc, smtplib, sqlite3, subprocess, tarfile, typing, unittest, unittest.mock
import urllib.request, uuid, xml.dom.minidom, xml.etree.ElementTree, zipfile
functions = sum(isinstance(o, types.FunctionType) for o in gc.get_objects())
print(functions, len(sys.modules), flush=True)
sys.stdin.read()
"#;

    /// How long a scan takes on a process with thousands of functions (run
    /// with `--nocapture` to see it); bounded loosely for debug builds.
    /// Counts the reads made through it.
    struct Counting {
        inner: ProcessMemory,
        reads: std::cell::Cell<usize>,
    }

    impl Memory for Counting {
        fn read(
            &self,
            addr: u64,
            buf: &mut [u8],
        ) -> Result<(), crate::python::memory::MemoryError> {
            self.reads.set(self.reads.get() + 1);
            self.inner.read(addr, buf)
        }
    }

    #[test]
    fn scan_time_on_a_large_process() {
        scan_time("pyenv 3.12.1");
    }

    #[test]
    #[ignore]
    fn scan_time_elsewhere() {
        for label in [
            "pyenv 3.8.18",
            "pyenv 3.10.13",
            "pyenv 3.11.7",
            "pyenv 3.13.0",
            "Debian sid 3.14",
        ] {
            scan_time(label);
        }
    }

    fn scan_time(label: &str) {
        let python = interpreter(label);
        if !python.exists() {
            skipped(&format!("scan time: {} is not installed", python.display()));
            return;
        }
        let child = Child::spawn(label, &python, &["-I", "-B", "-c", LARGE]);
        let counts = child.expect(|_| true, "counts");
        let target = Target::attach_with(child.pid(), |inner| Counting {
            inner,
            reads: 0.into(),
        })
        .unwrap();
        let decoder = "json/decoder.py";
        for loc in [
            line("no_such_file.py", 1),
            func(decoder, "JSONDecoder.decode"),
            line(decoder, marker_line_of(&target, decoder)),
            module("json.decoder", "JSONDecoder.raw_decode"),
        ] {
            let started = Instant::now();
            let reads = target.mem.reads.get();
            let result = target.find_code(&loc);
            let took = started.elapsed();
            let reads = target.mem.reads.get() - reads;
            eprintln!(
                "logpoint::locate: {label}, {counts} (functions, modules): {loc} in {took:?}, \
                 {reads} reads: {}",
                match &result {
                    Ok(found) => format!("{} found", found.len()),
                    Err(e) => e.to_string(),
                }
            );
            assert_eq!(
                result.is_ok(),
                !loc.to_string().starts_with("no_such"),
                "{loc}"
            );
            assert!(took < Duration::from_secs(2), "{loc}: {took:?}");
        }
    }

    /// A line of `decoder` with code: the first line of `JSONDecoder.decode`'s body.
    fn marker_line_of<M: Memory>(target: &Target<M>, decoder: &str) -> u32 {
        let start = target
            .find_code(&func(decoder, "JSONDecoder.decode"))
            .unwrap();
        start[0].line + 1
    }

    macro_rules! on_interpreter {
        ($($test:ident => $label:literal,)*) => {$(
            #[test]
            fn $test() {
                check_interpreter($label);
            }
        )*};
    }

    on_interpreter! {
        live_pyenv_3_8 => "pyenv 3.8.18",
        live_pyenv_3_9 => "pyenv 3.9.18",
        live_pyenv_3_10 => "pyenv 3.10.13",
        live_pyenv_3_11 => "pyenv 3.11.7",
        live_pyenv_3_12 => "pyenv 3.12.1",
        live_pyenv_3_13 => "pyenv 3.13.0",
        live_debian_3_11 => "Debian 3.11 (stripped)",
        live_debian_sid_3_14 => "Debian sid 3.14",
    }
}
