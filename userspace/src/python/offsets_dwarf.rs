//! Offsets read from the interpreter's own DWARF, at run time.
//!
//! [`FIELDS`] says, once and as data, where each [`Offsets`] field lives in
//! CPython's debug information for each minor version: a member path in a
//! type (`PyCodeObject.co_firstlineno`) or the size of a type
//! (`sizeof(PyASCIIObject)`). [`from_dwarf`] starts from the built-in table
//! of the version (behaviour flags, and any field DWARF cannot give) and
//! overwrites every field the table maps. The tests (`offsets_check.rs`) use
//! the same list to hold the built-in tables to each pyenv build's DWARF.
//!
//! Parsing 13-31 MB of DWARF takes long enough to matter on every attach, so
//! [`cached_from_elf`] keeps the values it read in a small JSON file per
//! binary, keyed by the GNU build-id, under
//! `$XDG_CACHE_HOME/pyprobe/offsets/` (or `~/.cache/pyprobe/offsets/`).
//! Only the values read from DWARF are cached, each with the field and the
//! DWARF location it came from; layout flags are always taken from the
//! running pyprobe, and an entry that does not answer exactly the current
//! list of fields, or has another [`CACHE_FORMAT`], is ignored and rewritten.

use std::{
    ffi::OsString,
    fmt, fs, io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::UNIX_EPOCH,
};

use serde::{Deserialize, Serialize};

use super::{
    dwarf::{DwarfError, DwarfInfo},
    offsets::{self, FrameLink, GilLocation, Offsets, VersionInfo},
    version::PythonVersion,
};
use crate::elf::ElfImage;

/// Where DWARF has a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DwarfSource {
    /// `offsetof(ty, path)`, `path` possibly nested (`interpreters.head`).
    Member {
        /// Type (typedef or struct tag) the path starts from.
        ty: &'static str,
        /// `.`-separated member path.
        path: &'static str,
    },
    /// `sizeof(ty)`.
    Size {
        /// Type whose size is the value.
        ty: &'static str,
    },
}

impl DwarfSource {
    /// The type the value is read from.
    pub fn type_name(&self) -> &'static str {
        match *self {
            DwarfSource::Member { ty, .. } | DwarfSource::Size { ty } => ty,
        }
    }

    /// Reads the value from `dwarf`.
    pub fn read(&self, dwarf: &DwarfInfo) -> Result<u64, DwarfError> {
        match *self {
            DwarfSource::Member { ty, path } => dwarf.offset_of(ty, path),
            DwarfSource::Size { ty } => dwarf.size_of(ty),
        }
    }
}

impl fmt::Display for DwarfSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DwarfSource::Member { ty, path } => write!(f, "{ty}.{path}"),
            DwarfSource::Size { ty } => write!(f, "sizeof({ty})"),
        }
    }
}

type Setter = fn(&mut Offsets, u64);

/// An [`Offsets`] field (or a field of one of its enum variants) and the
/// function that stores a value in it.
#[derive(Clone, Copy)]
struct Target {
    name: &'static str,
    set: Setter,
}

/// One [`Offsets`] field, where DWARF has it, and for which minor versions.
#[derive(Clone, Copy)]
pub struct FieldSource {
    /// The `Offsets` field; `field.variant_field` for a field of an enum
    /// variant (`gil.last_holder`, `tstate_frame.cframe`). Setting a variant
    /// field selects that variant.
    pub field: &'static str,
    /// First and last CPython 3 minor version the entry applies to.
    pub minors: (u8, u8),
    /// Where DWARF has the value.
    pub dwarf: DwarfSource,
    set: Setter,
}

impl FieldSource {
    /// Whether the entry applies to CPython 3.`minor`.
    pub fn applies_to(&self, minor: u8) -> bool {
        (self.minors.0..=self.minors.1).contains(&minor)
    }

    /// Stores `value` in the entry's field of `offsets`.
    pub fn set(&self, offsets: &mut Offsets, value: u64) {
        (self.set)(offsets, value)
    }
}

impl fmt::Debug for FieldSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FieldSource")
            .field("field", &self.field)
            .field("minors", &self.minors)
            .field("dwarf", &self.dwarf)
            .finish_non_exhaustive()
    }
}

const fn member(
    minors: (u8, u8),
    target: Target,
    ty: &'static str,
    path: &'static str,
) -> FieldSource {
    FieldSource {
        field: target.name,
        minors,
        dwarf: DwarfSource::Member { ty, path },
        set: target.set,
    }
}

const fn size(minors: (u8, u8), target: Target, ty: &'static str) -> FieldSource {
    FieldSource {
        field: target.name,
        minors,
        dwarf: DwarfSource::Size { ty },
        set: target.set,
    }
}

/// A plain `u64` field.
macro_rules! plain {
    ($f:ident) => {
        Target {
            name: stringify!($f),
            set: |o, v| o.$f = v,
        }
    };
}

/// An `Option<u64>` field, set to `Some`.
macro_rules! some {
    ($f:ident) => {
        Target {
            name: stringify!($f),
            set: |o, v| o.$f = Some(v),
        }
    };
}

/// Value of a variant field not set yet after switching variants; the tests
/// check that every variant field has its own entry.
const UNSET: u64 = u64::MAX;

const GIL_RUNTIME_LAST_HOLDER: Target = Target {
    name: "gil.last_holder",
    set: |o, v| match &mut o.gil {
        GilLocation::Runtime { last_holder, .. } => *last_holder = v,
        gil => {
            *gil = GilLocation::Runtime {
                last_holder: v,
                locked: UNSET,
            }
        }
    },
};

const GIL_RUNTIME_LOCKED: Target = Target {
    name: "gil.locked",
    set: |o, v| match &mut o.gil {
        GilLocation::Runtime { locked, .. } => *locked = v,
        gil => {
            *gil = GilLocation::Runtime {
                last_holder: UNSET,
                locked: v,
            }
        }
    },
};

const GIL_INTERP_POINTER: Target = Target {
    name: "gil.pointer",
    set: |o, v| match &mut o.gil {
        GilLocation::InterpPointer { pointer, .. } => *pointer = v,
        gil => {
            *gil = GilLocation::InterpPointer {
                pointer: v,
                last_holder: UNSET,
                locked: UNSET,
            }
        }
    },
};

const GIL_INTERP_LAST_HOLDER: Target = Target {
    name: "gil.last_holder",
    set: |o, v| match &mut o.gil {
        GilLocation::InterpPointer { last_holder, .. } => *last_holder = v,
        gil => {
            *gil = GilLocation::InterpPointer {
                pointer: UNSET,
                last_holder: v,
                locked: UNSET,
            }
        }
    },
};

const GIL_INTERP_LOCKED: Target = Target {
    name: "gil.locked",
    set: |o, v| match &mut o.gil {
        GilLocation::InterpPointer { locked, .. } => *locked = v,
        gil => {
            *gil = GilLocation::InterpPointer {
                pointer: UNSET,
                last_holder: UNSET,
                locked: v,
            }
        }
    },
};

const FRAME_DIRECT: Target = Target {
    name: "tstate_frame",
    set: |o, v| o.tstate_frame = FrameLink::Direct(v),
};

const FRAME_CFRAME: Target = Target {
    name: "tstate_frame.cframe",
    set: |o, v| match &mut o.tstate_frame {
        FrameLink::ViaCFrame { cframe, .. } => *cframe = v,
        link => {
            *link = FrameLink::ViaCFrame {
                cframe: v,
                current_frame: UNSET,
            }
        }
    },
};

const FRAME_CFRAME_CURRENT: Target = Target {
    name: "tstate_frame.current_frame",
    set: |o, v| match &mut o.tstate_frame {
        FrameLink::ViaCFrame { current_frame, .. } => *current_frame = v,
        link => {
            *link = FrameLink::ViaCFrame {
                cframe: UNSET,
                current_frame: v,
            }
        }
    },
};

/// Every supported minor version.
const ALL: (u8, u8) = (8, 15);
/// `PyFrameObject` chains (3.8-3.10).
const OLD: (u8, u8) = (8, 10);
/// `_PyInterpreterFrame` chains (3.11+).
const NEW: (u8, u8) = (11, 15);

/// Where every [`Offsets`] field lives in CPython's DWARF, per minor version.
/// For each supported minor, the entries that apply set every field the
/// version has exactly once (checked by the tests).
#[rustfmt::skip]
pub const FIELDS: &[FieldSource] = &[
    member(ALL,     plain!(runtime_interpreters_head), "_PyRuntimeState", "interpreters.head"),
    member((8, 11), some!(runtime_tstate_current),     "_PyRuntimeState", "gilstate.tstate_current"),
    member((8, 11), GIL_RUNTIME_LAST_HOLDER,           "_PyRuntimeState", "ceval.gil.last_holder"),
    member((8, 11), GIL_RUNTIME_LOCKED,                "_PyRuntimeState", "ceval.gil.locked"),
    member((12, 15), GIL_INTERP_POINTER,               "PyInterpreterState", "ceval.gil"),
    member((12, 15), GIL_INTERP_LAST_HOLDER,           "_gil_runtime_state", "last_holder"),
    member((12, 15), GIL_INTERP_LOCKED,                "_gil_runtime_state", "locked"),

    member(ALL, plain!(interp_next),                   "PyInterpreterState", "next"),
    member(OLD, plain!(interp_threads_head),           "PyInterpreterState", "tstate_head"),
    member(NEW, plain!(interp_threads_head),           "PyInterpreterState", "threads.head"),

    member(ALL, plain!(tstate_next),                   "PyThreadState", "next"),
    member(ALL, plain!(tstate_interp),                 "PyThreadState", "interp"),
    member(ALL, plain!(tstate_thread_id),              "PyThreadState", "thread_id"),
    member(NEW, some!(tstate_native_thread_id),        "PyThreadState", "native_thread_id"),
    member(OLD, FRAME_DIRECT,                          "PyThreadState", "frame"),
    member((11, 12), FRAME_CFRAME,                     "PyThreadState", "cframe"),
    member((11, 12), FRAME_CFRAME_CURRENT,             "_PyCFrame", "current_frame"),
    member((13, 15), FRAME_DIRECT,                     "PyThreadState", "current_frame"),

    member(OLD, plain!(frame_previous),                "PyFrameObject", "f_back"),
    member(NEW, plain!(frame_previous),                "_PyInterpreterFrame", "previous"),
    member(OLD, plain!(frame_code),                    "PyFrameObject", "f_code"),
    member((11, 12), plain!(frame_code),               "_PyInterpreterFrame", "f_code"),
    member((13, 15), plain!(frame_code),               "_PyInterpreterFrame", "f_executable"),
    member(OLD, plain!(frame_instruction),             "PyFrameObject", "f_lasti"),
    member((11, 12), plain!(frame_instruction),        "_PyInterpreterFrame", "prev_instr"),
    member((13, 15), plain!(frame_instruction),        "_PyInterpreterFrame", "instr_ptr"),
    member(OLD, plain!(frame_localsplus),              "PyFrameObject", "f_localsplus"),
    member(NEW, plain!(frame_localsplus),              "_PyInterpreterFrame", "localsplus"),
    member(NEW, some!(frame_owner),                    "_PyInterpreterFrame", "owner"),

    member(ALL, plain!(code_argcount),                 "PyCodeObject", "co_argcount"),
    member(ALL, plain!(code_flags),                    "PyCodeObject", "co_flags"),
    member(ALL, plain!(code_firstlineno),              "PyCodeObject", "co_firstlineno"),
    member(ALL, plain!(code_nlocals),                  "PyCodeObject", "co_nlocals"),
    member(NEW, some!(code_nlocalsplus),               "PyCodeObject", "co_nlocalsplus"),
    member(OLD, some!(code_code),                      "PyCodeObject", "co_code"),
    member(NEW, some!(code_code_adaptive),             "PyCodeObject", "co_code_adaptive"),
    member(OLD, plain!(code_varnames),                 "PyCodeObject", "co_varnames"),
    member(NEW, plain!(code_varnames),                 "PyCodeObject", "co_localsplusnames"),
    member(NEW, some!(code_localspluskinds),           "PyCodeObject", "co_localspluskinds"),
    member(ALL, plain!(code_filename),                 "PyCodeObject", "co_filename"),
    member(ALL, plain!(code_name),                     "PyCodeObject", "co_name"),
    member(NEW, some!(code_qualname),                  "PyCodeObject", "co_qualname"),
    member((8, 9), plain!(code_linetable),             "PyCodeObject", "co_lnotab"),
    member((10, 15), plain!(code_linetable),           "PyCodeObject", "co_linetable"),
    member(NEW, some!(code_firsttraceable),            "PyCodeObject", "_co_firsttraceable"),

    member(ALL, plain!(tuple_items),                   "PyTupleObject", "ob_item"),
    size(ALL, plain!(unicode_ascii_data),              "PyASCIIObject"),
    size(ALL, plain!(unicode_compact_data),            "PyCompactUnicodeObject"),

    member(ALL, plain!(interp_sysdict),                "PyInterpreterState", "sysdict"),
    member(ALL, plain!(interp_builtins),               "PyInterpreterState", "builtins"),
    member((12, 12), some!(interp_static_types),       "PyInterpreterState", "types.builtins"),
    member((13, 15), some!(interp_static_types),       "PyInterpreterState", "types.builtins.initialized"),
    size((12, 12), some!(static_type_size),            "static_builtin_state"),
    size((13, 15), some!(static_type_size),            "managed_static_type_state"),
    member((12, 12), some!(static_type_dict),          "static_builtin_state", "tp_dict"),
    member((13, 15), some!(static_type_dict),          "managed_static_type_state", "tp_dict"),

    member(ALL, plain!(cfunction_ml),                  "PyCFunctionObject", "m_ml"),
    member(ALL, plain!(cfunction_self),                "PyCFunctionObject", "m_self"),
    member(ALL, plain!(cfunction_module),              "PyCFunctionObject", "m_module"),
    member(ALL, plain!(cfunction_vectorcall),          "PyCFunctionObject", "vectorcall"),
    member(ALL, plain!(method_descr_type),             "PyMethodDescrObject", "d_common.d_type"),
    member(ALL, plain!(method_descr_method),           "PyMethodDescrObject", "d_method"),
    member(ALL, plain!(method_descr_vectorcall),       "PyMethodDescrObject", "vectorcall"),
    member(ALL, plain!(method_def_name),               "PyMethodDef", "ml_name"),
    member(ALL, plain!(method_def_flags),              "PyMethodDef", "ml_flags"),
    member(ALL, plain!(type_call),                     "PyTypeObject", "tp_call"),
    member(ALL, plain!(function_code),                 "PyFunctionObject", "func_code"),
    member(ALL, plain!(code_consts),                   "PyCodeObject", "co_consts"),
    member(ALL, plain!(heaptype_cached_keys),          "PyHeapTypeObject", "ht_cached_keys"),
    member(NEW, some!(dict_values_items),              "_dictvalues", "values"),
    member((13, 15), some!(tstate_datastack_top),           "PyThreadState", "datastack_top"),
    member((13, 15), some!(code_framesize),                 "PyCodeObject", "co_framesize"),
];

/// The entries of [`FIELDS`] that apply to CPython 3.`minor`, in table order.
pub fn fields(minor: u8) -> impl Iterator<Item = &'static FieldSource> {
    FIELDS.iter().filter(move |f| f.applies_to(minor))
}

/// Errors from reading offsets from DWARF.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsDwarfError {
    /// pyprobe has no field list (and no built-in table) for this version.
    #[error("pyprobe does not support CPython {version}")]
    Unsupported {
        /// The version asked for.
        version: PythonVersion,
    },
    /// A type or member the field list needs is not in the DWARF (or could
    /// not be read from it).
    #[error("DWARF of CPython {version}: cannot read {dwarf} (for {field}): {source}")]
    Field {
        /// The version the field list was chosen for.
        version: PythonVersion,
        /// The [`Offsets`] field being read.
        field: &'static str,
        /// The type and member (or size) looked up.
        dwarf: DwarfSource,
        /// What the DWARF reader said.
        #[source]
        source: DwarfError,
    },
    /// The binary's DWARF could not be parsed.
    #[error("cannot read the DWARF of {path}: {source}")]
    Dwarf {
        /// The binary.
        path: PathBuf,
        /// What the DWARF reader said.
        #[source]
        source: DwarfError,
    },
}

fn builtin_for(version: &PythonVersion) -> Result<VersionInfo, OffsetsDwarfError> {
    match version.major {
        3 => offsets::builtin(version),
        _ => None,
    }
    .ok_or(OffsetsDwarfError::Unsupported { version: *version })
}

/// The value of every entry of [`fields`] for `version`, read from DWARF.
fn read_values(
    dwarf: &DwarfInfo,
    version: &PythonVersion,
) -> Result<Vec<(&'static FieldSource, u64)>, OffsetsDwarfError> {
    fields(version.minor)
        .map(|f| {
            f.dwarf
                .read(dwarf)
                .map(|value| (f, value))
                .map_err(|source| OffsetsDwarfError::Field {
                    version: *version,
                    field: f.field,
                    dwarf: f.dwarf,
                    source,
                })
        })
        .collect()
}

/// The built-in table of `version` with the given values stored.
fn apply(
    version: &PythonVersion,
    values: &[(&'static FieldSource, u64)],
) -> Result<VersionInfo, OffsetsDwarfError> {
    let mut info = builtin_for(version)?;
    for (f, value) in values {
        f.set(&mut info.offsets, *value);
    }
    Ok(info)
}

/// Offsets of `version` read from a binary's DWARF: the built-in table of
/// the version (layout flags, fields DWARF cannot give) with every field
/// [`FIELDS`] maps overwritten by the DWARF's value. Errors name the first
/// type or member the DWARF lacks.
pub fn from_dwarf(
    dwarf: &DwarfInfo,
    version: &PythonVersion,
) -> Result<VersionInfo, OffsetsDwarfError> {
    builtin_for(version)?;
    apply(version, &read_values(dwarf, version)?)
}

/// Version of the cache file format; entries of another version are ignored
/// (and rewritten).
pub const CACHE_FORMAT: u32 = 1;

/// `source` of entries whose values were read from DWARF.
const SOURCE_DWARF: &str = "dwarf";

/// One cache file.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    /// [`CACHE_FORMAT`].
    format: u32,
    /// Where the values came from ([`SOURCE_DWARF`]).
    source: String,
    /// `major.minor` the field list was chosen for.
    python: String,
    /// Full version, informative.
    version: String,
    /// The binary the values were read from, informative.
    binary: String,
    /// One value per entry of [`fields`].
    values: Vec<CachedValue>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CachedValue {
    /// [`FieldSource::field`].
    field: String,
    /// [`FieldSource::dwarf`], displayed.
    dwarf: String,
    value: u64,
}

fn minor_string(version: &PythonVersion) -> String {
    format!("{}.{}", version.major, version.minor)
}

/// The cache directory: `$XDG_CACHE_HOME/pyprobe/offsets` when that is set
/// to an absolute path, else `$HOME/.cache/pyprobe/offsets`; `None` when
/// neither variable helps.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

fn cache_dir_from(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let absolute = |p: OsString| Some(PathBuf::from(p)).filter(|p| p.is_absolute());
    let base = xdg_cache_home
        .and_then(absolute)
        .or_else(|| home.and_then(absolute).map(|home| home.join(".cache")))?;
    Some(base.join("pyprobe").join("offsets"))
}

/// 64-bit FNV-1a, for stable file names.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The file name (without `.json`) of a binary's cache entry: the hex GNU
/// build-id, or, without one, a hash of its path, size and modification
/// time; `None` when neither is available.
fn cache_key(image: &ElfImage) -> Option<String> {
    if let Some(id) = image.build_id() {
        return Some(if id.len() <= 64 {
            id.iter().map(|b| format!("{b:02x}")).collect()
        } else {
            format!("buildid-{:016x}", fnv1a(&[id]))
        });
    }
    use std::os::unix::ffi::OsStrExt;
    let meta = fs::metadata(image.path()).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    let hash = fnv1a(&[
        image.path().as_os_str().as_bytes(),
        &meta.len().to_le_bytes(),
        &mtime.as_secs().to_le_bytes(),
        &mtime.subsec_nanos().to_le_bytes(),
    ]);
    Some(format!("file-{hash:016x}"))
}

/// Reads a cache entry; `None` (with a debug message) if it is missing,
/// unreadable, of another format, or does not answer exactly the current
/// field list of `version`.
fn load(file: &Path, version: &PythonVersion) -> Option<VersionInfo> {
    let bytes = match fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                log::debug!("offsets cache {}: {e}", file.display());
            }
            return None;
        }
    };
    let entry: CacheEntry = match serde_json::from_slice(&bytes) {
        Ok(entry) => entry,
        Err(e) => {
            log::debug!("offsets cache {}: ignored: {e}", file.display());
            return None;
        }
    };
    if entry.format != CACHE_FORMAT
        || entry.source != SOURCE_DWARF
        || entry.python != minor_string(version)
    {
        log::debug!(
            "offsets cache {}: ignored: format {}, source {}, python {}",
            file.display(),
            entry.format,
            entry.source,
            entry.python
        );
        return None;
    }
    let mut values = Vec::new();
    for f in fields(version.minor) {
        let dwarf = f.dwarf.to_string();
        let Some(cached) = entry
            .values
            .iter()
            .find(|c| c.field == f.field && c.dwarf == dwarf)
        else {
            log::debug!(
                "offsets cache {}: ignored: no value for {} ({dwarf})",
                file.display(),
                f.field
            );
            return None;
        };
        values.push((f, cached.value));
    }
    if values.len() != entry.values.len() {
        log::debug!(
            "offsets cache {}: ignored: values for fields pyprobe no longer reads",
            file.display()
        );
        return None;
    }
    apply(version, &values).ok()
}

/// Writes a cache entry through a temporary file and a rename, so a
/// concurrent reader never sees half a file.
fn store(file: &Path, entry: &CacheEntry) -> io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let json = serde_json::to_vec_pretty(entry).map_err(io::Error::other)?;
    let written = fs::write(&tmp, json).and_then(|()| fs::rename(&tmp, file));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Offsets of `version` from the DWARF of `image`, through the on-disk cache
/// in [`cache_dir`]; `Ok(None)` when the binary has no DWARF (and no cache
/// entry: a stripped binary shares its build-id, and so its entry, with the
/// unstripped build it came from).
///
/// A missing, corrupt or stale cache entry is recomputed and rewritten;
/// failing to write the cache is not an error (debug log only). Errors: the
/// version is unsupported, the DWARF is malformed, or it lacks a type or
/// member the field list needs.
pub fn cached_from_elf(
    image: &ElfImage,
    version: &PythonVersion,
) -> Result<Option<VersionInfo>, OffsetsDwarfError> {
    lookup(cache_dir().as_deref(), image, version)
}

/// [`cached_from_elf`] with the cache in `dir` instead of [`cache_dir`].
pub fn cached_from_elf_in(
    dir: &Path,
    image: &ElfImage,
    version: &PythonVersion,
) -> Result<Option<VersionInfo>, OffsetsDwarfError> {
    lookup(Some(dir), image, version)
}

fn lookup(
    dir: Option<&Path>,
    image: &ElfImage,
    version: &PythonVersion,
) -> Result<Option<VersionInfo>, OffsetsDwarfError> {
    builtin_for(version)?;
    let file = dir
        .zip(cache_key(image))
        .map(|(dir, key)| dir.join(format!("{key}.json")));
    if let Some(info) = file.as_deref().and_then(|file| load(file, version)) {
        return Ok(Some(info));
    }
    let dwarf = DwarfInfo::parse(image.data()).map_err(|source| OffsetsDwarfError::Dwarf {
        path: image.path().to_owned(),
        source,
    })?;
    let Some(dwarf) = dwarf else {
        return Ok(None);
    };
    let values = read_values(&dwarf, version)?;
    let info = apply(version, &values)?;
    if let Some(file) = file {
        let entry = CacheEntry {
            format: CACHE_FORMAT,
            source: SOURCE_DWARF.to_owned(),
            python: minor_string(version),
            version: version.to_string(),
            binary: image.path().display().to_string(),
            values: values
                .iter()
                .map(|(f, value)| CachedValue {
                    field: f.field.to_owned(),
                    dwarf: f.dwarf.to_string(),
                    value: *value,
                })
                .collect(),
        };
        match store(&file, &entry) {
            Ok(()) => log::debug!("offsets cache {}: written", file.display()),
            Err(e) => log::debug!("offsets cache {}: not written: {e}", file.display()),
        }
    }
    Ok(Some(info))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    pub(crate) fn version(minor: u8) -> PythonVersion {
        PythonVersion {
            major: 3,
            minor,
            micro: None,
            hex: None,
        }
    }

    /// Every number or null in a JSON value, by dotted path.
    pub(crate) fn leaves(value: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
        fn walk(
            value: &serde_json::Value,
            path: String,
            out: &mut BTreeMap<String, serde_json::Value>,
        ) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, value) in map {
                        let path = if path.is_empty() {
                            key.clone()
                        } else {
                            format!("{path}.{key}")
                        };
                        walk(value, path, out);
                    }
                }
                other => {
                    out.insert(path, other.clone());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(value, String::new(), &mut out);
        out
    }

    /// A directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "pyprobe-{tag}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// For every minor, the entries that apply write every field the
    /// built-in table has, each exactly once, and leave no variant field
    /// unset: with entry `i` writing `SENTINEL + i`, every number in the
    /// result is a distinct sentinel and the `None` fields stay `None`.
    #[test]
    fn every_field_of_every_minor_is_mapped_exactly_once() {
        const SENTINEL: u64 = 1 << 40;
        for minor in 8..=15 {
            let builtin = offsets::builtin(&version(minor)).unwrap();
            let mut mapped = builtin.offsets;
            let entries: Vec<_> = fields(minor).collect();
            for (i, f) in entries.iter().enumerate() {
                f.set(&mut mapped, SENTINEL + i as u64);
            }
            let before = leaves(&serde_json::to_value(builtin.offsets).unwrap());
            let after = leaves(&serde_json::to_value(mapped).unwrap());
            let before_paths: BTreeSet<_> = before.keys().collect();
            let after_paths: BTreeSet<_> = after.keys().collect();
            assert_eq!(before_paths, after_paths, "3.{minor}: variants changed");
            let mut seen = BTreeSet::new();
            for (path, value) in &after {
                match value.as_u64() {
                    None => assert!(
                        before[path].is_null(),
                        "3.{minor}: {path} is None in the table but mapped"
                    ),
                    Some(v) => {
                        assert!(
                            v >= SENTINEL && v < SENTINEL + entries.len() as u64,
                            "3.{minor}: {path} is not mapped (value {v})"
                        );
                        let entry = entries[(v - SENTINEL) as usize];
                        assert_eq!(
                            entry.field.split('.').next(),
                            path.split('.').next(),
                            "3.{minor}: entry {entry:?} wrote {path}"
                        );
                        seen.insert(v);
                    }
                }
            }
            assert_eq!(
                seen.len(),
                entries.len(),
                "3.{minor}: some entries are overwritten by others"
            );
        }
        assert_eq!(fields(7).count(), 0);
        assert_eq!(fields(16).count(), 0);
    }

    #[test]
    fn display_of_dwarf_sources() {
        let m = DwarfSource::Member {
            ty: "PyCodeObject",
            path: "co_name",
        };
        assert_eq!(m.to_string(), "PyCodeObject.co_name");
        assert_eq!(m.type_name(), "PyCodeObject");
        let s = DwarfSource::Size {
            ty: "PyASCIIObject",
        };
        assert_eq!(s.to_string(), "sizeof(PyASCIIObject)");
    }

    fn entry_for(minor: u8, value: impl Fn(usize) -> u64) -> CacheEntry {
        CacheEntry {
            format: CACHE_FORMAT,
            source: SOURCE_DWARF.to_owned(),
            python: format!("3.{minor}"),
            version: format!("3.{minor}"),
            binary: "test".to_owned(),
            values: fields(minor)
                .enumerate()
                .map(|(i, f)| CachedValue {
                    field: f.field.to_owned(),
                    dwarf: f.dwarf.to_string(),
                    value: value(i),
                })
                .collect(),
        }
    }

    #[test]
    fn cache_entries_round_trip_and_bad_ones_are_ignored() {
        let dir = TempDir::new("offsets-cache");
        let file = dir.0.join("sub/dir/abc.json");
        let v = version(12);
        let expected = {
            let values: Vec<_> = fields(12)
                .enumerate()
                .map(|(i, f)| (f, 1000 + i as u64))
                .collect();
            apply(&v, &values).unwrap()
        };
        assert_eq!(load(&file, &v), None, "missing file");

        store(&file, &entry_for(12, |i| 1000 + i as u64)).unwrap();
        assert_eq!(load(&file, &v), Some(expected));
        assert_eq!(load(&file, &version(11)), None, "other minor");
        let leftovers: Vec<_> = fs::read_dir(file.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["abc.json"], "no temporary file left");

        fs::write(&file, b"{\"format\": 1, garbage").unwrap();
        assert_eq!(load(&file, &v), None, "corrupt");
        fs::write(&file, [0xff, 0xfe, 0]).unwrap();
        assert_eq!(load(&file, &v), None, "binary junk");

        let mut old = entry_for(12, |i| i as u64);
        old.format = CACHE_FORMAT + 1;
        store(&file, &old).unwrap();
        assert_eq!(load(&file, &v), None, "other format");

        let mut other = entry_for(12, |i| i as u64);
        other.source = "debug_offsets".to_owned();
        store(&file, &other).unwrap();
        assert_eq!(load(&file, &v), None, "other source");

        let mut short = entry_for(12, |i| i as u64);
        short.values.pop();
        store(&file, &short).unwrap();
        assert_eq!(load(&file, &v), None, "a field missing");

        let mut long = entry_for(12, |i| i as u64);
        long.values.push(CachedValue {
            field: "gone".to_owned(),
            dwarf: "PyGone.gone".to_owned(),
            value: 0,
        });
        store(&file, &long).unwrap();
        assert_eq!(load(&file, &v), None, "an extra field");

        let mut moved = entry_for(12, |i| i as u64);
        moved.values[0].dwarf = "_PyRuntimeState.elsewhere".to_owned();
        store(&file, &moved).unwrap();
        assert_eq!(load(&file, &v), None, "a field read from elsewhere");
    }

    #[test]
    fn cache_dir_follows_xdg_then_home() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            cache_dir_from(os("/x/cache"), os("/home/u")),
            Some(PathBuf::from("/x/cache/pyprobe/offsets"))
        );
        assert_eq!(
            cache_dir_from(None, os("/home/u")),
            Some(PathBuf::from("/home/u/.cache/pyprobe/offsets"))
        );
        // The XDG spec says relative paths are to be ignored.
        assert_eq!(
            cache_dir_from(os("relative"), os("/home/u")),
            Some(PathBuf::from("/home/u/.cache/pyprobe/offsets"))
        );
        assert_eq!(cache_dir_from(os(""), os("")), None);
        assert_eq!(cache_dir_from(None, None), None);
    }

    #[test]
    fn a_binary_without_dwarf_gives_none_and_no_cache_entry() {
        let dir = TempDir::new("offsets-nodwarf");
        // A minimal ELF file: a header and nothing else.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little endian
        elf[6] = 1; // version
        elf[16] = 3; // ET_DYN
        elf[18] = 62; // EM_X86_64
        elf[20] = 1; // version
        elf[52] = 64; // e_ehsize
        elf[54] = 56; // e_phentsize
        elf[58] = 64; // e_shentsize
        let path = dir.0.join("libpython-test.so");
        fs::write(&path, &elf).unwrap();
        let image = ElfImage::open(&path).unwrap();
        assert_eq!(image.build_id(), None);
        let cache = dir.0.join("cache");
        assert_eq!(
            cached_from_elf_in(&cache, &image, &version(12)).unwrap(),
            None
        );
        assert!(!cache.exists());
        assert!(matches!(
            cached_from_elf_in(&cache, &image, &version(7)),
            Err(OffsetsDwarfError::Unsupported { .. })
        ));
        // Without a build-id the key is the file's identity.
        let key = cache_key(&image).unwrap();
        assert!(key.starts_with("file-"), "{key}");
        assert_eq!(cache_key(&image), Some(key));
    }
}
