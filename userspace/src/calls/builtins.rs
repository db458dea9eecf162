//! Where calls of builtin C functions can be counted: the C functions that
//! every call of a builtin goes through unless the 3.11+ adaptive
//! interpreter specialized the call site.
//!
//! A builtin is one of two kinds of object ([`BuiltinKind`]):
//!
//! - a `builtin_function_or_method` (`PyCFunctionObject`: `len`,
//!   `time.sleep`, or a method bound to an object, `[].append`). Calling it
//!   runs its `vectorcall` pointer, one of `cfunction_vectorcall_O`,
//!   `_NOARGS`, `_FASTCALL`, `_FASTCALL_KEYWORDS` and (3.9+, for
//!   `builtin_method` objects of `METH_METHOD` methods)
//!   `_FASTCALL_KEYWORDS_METHOD`. A `METH_VARARGS` function has a NULL
//!   `vectorcall` and is called through its type's `tp_call`:
//!   `PyCFunction_Call` (3.8) or `cfunction_call` (3.9+);
//! - a `method_descriptor` (`PyMethodDescrObject`: `list.append` as found in
//!   `list`'s dict, which `[].append(x)` calls directly after `LOAD_METHOD`
//!   / `LOAD_ATTR`): `method_vectorcall_O`, `_NOARGS`, `_FASTCALL`,
//!   `_FASTCALL_KEYWORDS`, `_VARARGS`, `_VARARGS_KEYWORDS`, and (3.9+)
//!   `_FASTCALL_KEYWORDS_METHOD`.
//!
//! At each of those functions the first argument register (`rdi`) is the
//! called object. They are LOCAL symbols, absent from stripped builds, so
//! they are found one way that works on every build: from live objects of
//! the target ([`find_builtin_callables`]). The walk reads the values of the
//! `builtins` module's dict, of the `sys` module's dict, and of the dict of
//! every module in `sys.modules`; keeps the `builtin_function_or_method`
//! (and `builtin_method`) objects; and, for every type found there that was
//! defined in C (`tp_methods` is not NULL), the `method_descriptor` objects
//! of the type's dict. From 3.12 a static builtin type (`list`, `dict`, ...)
//! has a NULL `tp_dict`: its dict is in the interpreter state, in entry
//! `tp_subclasses - 1` of `types.builtins` ([`Offsets::interp_static_types`]).
//!
//! The distinct non-NULL `vectorcall` pointers, plus `tp_call` of
//! `builtin_function_or_method` (and of `builtin_method`), are the sites
//! ([`find_builtin_sites`]). A pointer outside the executable `PT_LOAD`
//! segments of the interpreter's ELF image is not a site and is skipped (and
//! logged at debug level): for the object types the walk keeps, CPython
//! itself sets those pointers, so that would be a sign of garbage.
//!
//! What a site does not see: from 3.11 the specialized instructions
//! (`CALL_BUILTIN_O`, `CALL_NO_KW_METHOD_DESCRIPTOR_FAST`, ...) call the C
//! function of the builtin directly. Calls through `tp_call` of a function
//! that has a `vectorcall` (a rare `type(len).__call__(len, x)`) run
//! `cfunction_call`, which then calls the vectorcall function: both sites.
//!
//! Live objects do not name every `cfunction_vectorcall_*`: a bound method
//! made on the fly (`pattern.match`, passed to `map`) points at one no
//! module or type dict holds, `_FASTCALL_KEYWORDS_METHOD` (3.9+) in
//! particular. So the sites also include every function `PyCMethod_New`
//! (3.9+; `PyCFunction_NewEx` on 3.8), which makes those objects, may store
//! as their `vectorcall`: the targets of its RIP-relative `lea`s that are
//! code ([`vectorcall_choices`]; exported symbols, so stripped builds too).
//!
//! [`builtin_label`] names what a site saw (`builtins.len`, `list.append`).
//!
//! [`Offsets::interp_static_types`]: crate::python::offsets::Offsets::interp_static_types

use std::collections::{HashMap, HashSet};

use crate::{
    elf::{ElfError, ElfImage},
    python::{
        memory::{Memory, MemoryError},
        offsets::common,
        reader::{ReadError, Target},
    },
};

/// `ml_flags`: arguments as a tuple (`METH_VARARGS`).
pub const METH_VARARGS: u32 = 0x1;
/// `ml_flags`: keyword arguments too (with `METH_VARARGS` or
/// `METH_FASTCALL`).
pub const METH_KEYWORDS: u32 = 0x2;
/// `ml_flags`: no argument.
pub const METH_NOARGS: u32 = 0x4;
/// `ml_flags`: exactly one argument.
pub const METH_O: u32 = 0x8;
/// `ml_flags`: arguments as a C array.
pub const METH_FASTCALL: u32 = 0x80;
/// `ml_flags` (3.9+): also passed the defining class.
pub const METH_METHOD: u32 = 0x200;
/// The `ml_flags` bits that choose the calling convention (and so the
/// vectorcall function).
pub const METH_CALL_BITS: u32 =
    METH_VARARGS | METH_KEYWORDS | METH_NOARGS | METH_O | METH_FASTCALL | METH_METHOD;

/// `Py_TPFLAGS_UNICODE_SUBCLASS`: the type is `str` or a subclass.
const TPFLAGS_UNICODE_SUBCLASS: u64 = 1 << 28;
/// `Py_TPFLAGS_TYPE_SUBCLASS`: the type is `type` or a subclass (its
/// instances are types).
const TPFLAGS_TYPE_SUBCLASS: u64 = 1 << 31;

/// Longest `ml_name` read.
const MAX_NAME: usize = 256;
/// Most entries read from one dict.
const MAX_DICT_ENTRIES: u64 = 1 << 16;
/// Most modules of `sys.modules` walked.
const MAX_MODULES: usize = 8192;
/// Most types whose dicts are read.
const MAX_TYPES: usize = 32768;
/// Largest `tp_subclasses` accepted as a static type index (CPython has
/// room for 200 static builtin types).
const MAX_STATIC_TYPE_INDEX: u64 = 1024;
/// Bytes of a `PyCFunctionObject` or `PyMethodDescrObject` read at once
/// (up to and including `vectorcall`, the last field read).
const CALLABLE_READ: usize = 64;

/// What a site's first argument (`rdi`) points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum BuiltinKind {
    /// A `builtin_function_or_method` (or 3.9+ `builtin_method`) object:
    /// `PyCFunctionObject`, with `m_ml`, `m_self`, `m_module`.
    Function,
    /// A `method_descriptor` object: `PyMethodDescrObject`, with `d_type`
    /// and `d_method`.
    MethodDescriptor,
}

/// One C function every unspecialized call of some builtins goes through:
/// where to attach a uprobe.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BuiltinSite {
    /// What `rdi` points at when the site runs.
    pub kind: BuiltinKind,
    /// Link-time virtual address in the interpreter's ELF file.
    pub vaddr: u64,
    /// Offset in the ELF file (where the uprobe attaches).
    pub file_offset: u64,
    /// The label ([`builtin_label`]) of the first object found that uses the
    /// site, e.g. `builtins.abs`; for `tp_call`, the first `METH_VARARGS`
    /// function found, else `builtin_function_or_method.__call__`.
    pub source: String,
}

/// A builtin function or method descriptor found in the target.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BuiltinCallable {
    /// Function or method descriptor.
    pub kind: BuiltinKind,
    /// Address of the object.
    pub object: u64,
    /// Address of its `PyMethodDef` (`m_ml` / `d_method`).
    pub method_def: u64,
    /// `ml_flags` of the `PyMethodDef`.
    pub flags: u32,
    /// What [`builtin_label`] takes as the owner: for a function `m_module`
    /// when not NULL, else the type of `m_self` (0 if `m_self` is NULL); for
    /// a method descriptor `d_type`.
    pub owner: u64,
    /// The object's `vectorcall` pointer (runtime address; 0 for a
    /// `METH_VARARGS` function, called through `tp_call`).
    pub vectorcall: u64,
    /// [`builtin_label`] of the object.
    pub label: String,
}

/// Runtime addresses of the type objects the walk recognizes objects by.
/// All are exported (`.dynsym`) by every build, stripped or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinTypes {
    /// `PyCFunction_Type` (`builtin_function_or_method`).
    pub cfunction: u64,
    /// `PyCMethod_Type` (`builtin_method`, 3.9+).
    pub cmethod: Option<u64>,
    /// `PyMethodDescr_Type` (`method_descriptor`).
    pub method_descriptor: u64,
    /// `PyModule_Type`.
    pub module: u64,
    /// `PyType_Type`.
    pub type_: u64,
}

impl BuiltinTypes {
    /// Looks the types up in the interpreter's ELF image, loaded at
    /// `load_bias`.
    pub fn from_image(image: &ElfImage, load_bias: u64) -> Result<Self, BuiltinError> {
        let sym = |name: &str| -> Result<u64, ElfError> {
            Ok(load_bias.wrapping_add(image.symbol(name)?.vaddr))
        };
        Ok(BuiltinTypes {
            cfunction: sym("PyCFunction_Type")?,
            cmethod: sym("PyCMethod_Type").ok(),
            method_descriptor: sym("PyMethodDescr_Type")?,
            module: sym("PyModule_Type")?,
            type_: sym("PyType_Type")?,
        })
    }
}

/// Errors while finding builtin sites.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    /// Reading the target failed (or read nonsense) where the walk cannot do
    /// without: the interpreter state, or the `builtins` or `sys` dict.
    #[error("reading builtins of the target: {0}")]
    Read(#[from] ReadError),
    /// The interpreter's ELF file lacks a symbol or could not be parsed.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// The target has no interpreter state (it is starting or exiting).
    #[error("the target has no interpreter state yet (or any more)")]
    NoInterpreter,
}

impl From<MemoryError> for BuiltinError {
    fn from(e: MemoryError) -> Self {
        BuiltinError::Read(e.into())
    }
}

/// The name pyprobe shows for a builtin: `<owner>.<ml_name>`, where
/// `method_def` is the address of its `PyMethodDef` and `owner` is what
/// [`BuiltinCallable::owner`] describes.
///
/// - `owner` is a `str` (a function's `m_module`, normally its module's
///   name): `builtins.len`, `time.sleep`;
/// - `owner` is a type (a method descriptor's `d_type`, or the type of a
///   bound method's `m_self`): `<tp_name>.<ml_name>`, e.g. `list.append`;
/// - `owner` is 0: `ml_name` alone.
///
/// What the owner is comes from its type's `tp_flags`. An owner that is
/// neither a `str` nor a type gives `ml_name` alone for a
/// [`BuiltinKind::Function`] (`m_module` "can be anything"), and an error
/// for a [`BuiltinKind::MethodDescriptor`], whose `d_type` is always a type.
pub fn builtin_label<M: Memory>(
    target: &Target<M>,
    kind: BuiltinKind,
    method_def: u64,
    owner: u64,
) -> Result<String, ReadError> {
    let o = &target.info.offsets;
    let name_at = target
        .mem
        .read_u64(method_def.wrapping_add(o.method_def_name))?;
    let name = read_c_string(&target.mem, name_at, MAX_NAME)?;
    if owner == 0 {
        return Ok(name);
    }
    let owner_type = target.mem.read_u64(owner.wrapping_add(common::OB_TYPE))?;
    let flags = target
        .mem
        .read_u64(owner_type.wrapping_add(common::TP_FLAGS))?;
    if flags & TPFLAGS_UNICODE_SUBCLASS != 0 {
        Ok(format!("{}.{name}", target.read_str(owner)?))
    } else if flags & TPFLAGS_TYPE_SUBCLASS != 0 {
        Ok(format!("{}.{name}", target.type_name(owner)?))
    } else {
        match kind {
            BuiltinKind::Function => Ok(name),
            BuiltinKind::MethodDescriptor => Err(ReadError::Corrupt(
                "a method descriptor's d_type is not a type",
            )),
        }
    }
}

/// Reads a NUL-terminated string of at most `max` bytes (lossy UTF-8), 16
/// bytes at a time, and byte by byte where 16 bytes cannot be read (a string
/// at the end of a mapping).
fn read_c_string<M: Memory>(mem: &M, addr: u64, max: usize) -> Result<String, ReadError> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16];
    while out.len() < max {
        let at = addr.wrapping_add(out.len() as u64);
        let bytes: &[u8] = match mem.read(at, &mut chunk) {
            Ok(()) => &chunk,
            Err(_) => {
                mem.read(at, &mut chunk[..1])?;
                &chunk[..1]
            }
        };
        if let Some(end) = bytes.iter().position(|&b| b == 0) {
            out.extend_from_slice(&bytes[..end]);
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(bytes);
    }
    Err(ReadError::Corrupt("C string too long"))
}

/// The `(key, value)` pairs of a combined-table dict (module, class and
/// `sys` dicts always are), in insertion order, deleted slots left out.
fn dict_items<M: Memory>(t: &Target<M>, dict: u64) -> Result<Vec<(u64, u64)>, ReadError> {
    crate::python::dict::combined_items(t, dict, MAX_DICT_ENTRIES)
}

/// The walk of [`find_builtin_callables`]: what was seen, what was found.
struct Walk<'t, M> {
    target: &'t Target<M>,
    types: BuiltinTypes,
    interp: u64,
    dicts_seen: HashSet<u64>,
    types_seen: HashSet<u64>,
    type_queue: Vec<u64>,
    objects_seen: HashSet<u64>,
    found: Vec<BuiltinCallable>,
}

impl<M: Memory> Walk<'_, M> {
    /// Records the functions of a module dict and queues its types.
    fn module_dict(&mut self, dict: u64) -> Result<(), ReadError> {
        if dict == 0 || !self.dicts_seen.insert(dict) {
            return Ok(());
        }
        for (_, value) in dict_items(self.target, dict)? {
            let ty = self
                .target
                .mem
                .read_u64(value.wrapping_add(common::OB_TYPE))?;
            if ty == self.types.cfunction || Some(ty) == self.types.cmethod {
                self.callable(BuiltinKind::Function, value)?;
            } else if ty == self.types.type_
                && self.type_queue.len() < MAX_TYPES
                && self.types_seen.insert(value)
            {
                self.type_queue.push(value);
            }
        }
        Ok(())
    }

    /// Records the method descriptors of a type's dict, if it is a C type.
    fn type_dict(&mut self, ty: u64) -> Result<(), ReadError> {
        let mem = &self.target.mem;
        if mem.read_u64(ty.wrapping_add(common::TP_METHODS))? == 0 {
            return Ok(()); // not defined in C: no method descriptors
        }
        let Some(dict) = self.dict_of_type(ty)? else {
            return Ok(());
        };
        if !self.dicts_seen.insert(dict) {
            return Ok(());
        }
        for (_, value) in dict_items(self.target, dict)? {
            let vt = mem.read_u64(value.wrapping_add(common::OB_TYPE))?;
            if vt == self.types.method_descriptor {
                self.callable(BuiltinKind::MethodDescriptor, value)?;
            }
        }
        Ok(())
    }

    /// `tp_dict`, or for a 3.12+ static builtin type its dict in the
    /// interpreter state; `None` if the type has no dict there (e.g. a
    /// static type of an extension module, kept elsewhere).
    fn dict_of_type(&self, ty: u64) -> Result<Option<u64>, ReadError> {
        let mem = &self.target.mem;
        let o = &self.target.info.offsets;
        let dict = mem.read_u64(ty.wrapping_add(common::TP_DICT))?;
        if dict != 0 {
            return Ok(Some(dict));
        }
        let (Some(array), Some(size), Some(dict_at)) = (
            o.interp_static_types,
            o.static_type_size,
            o.static_type_dict,
        ) else {
            return Ok(None);
        };
        let index = mem.read_u64(ty.wrapping_add(common::TP_SUBCLASSES))?;
        if index == 0 || index > MAX_STATIC_TYPE_INDEX {
            return Ok(None);
        }
        let entry = self
            .interp
            .wrapping_add(array)
            .wrapping_add((index - 1).wrapping_mul(size));
        if mem.read_u64(entry)? != ty {
            return Ok(None);
        }
        let dict = mem.read_u64(entry.wrapping_add(dict_at))?;
        Ok((dict != 0).then_some(dict))
    }

    /// Reads one function or method descriptor.
    fn callable(&mut self, kind: BuiltinKind, object: u64) -> Result<(), ReadError> {
        if !self.objects_seen.insert(object) {
            return Ok(());
        }
        let mem = &self.target.mem;
        let o = &self.target.info.offsets;
        let raw = mem.read_vec(object, CALLABLE_READ)?;
        let field = |at: u64| -> Result<u64, ReadError> {
            let at = usize::try_from(at).map_err(|_| ReadError::Corrupt("offset"))?;
            raw.get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .ok_or(ReadError::Corrupt("field beyond the object read"))
        };
        let (method_def, owner, vectorcall) = match kind {
            BuiltinKind::Function => {
                let module = field(o.cfunction_module)?;
                let owner = match (module, field(o.cfunction_self)?) {
                    (0, 0) => 0,
                    (0, this) => mem.read_u64(this.wrapping_add(common::OB_TYPE))?,
                    (module, _) => module,
                };
                (
                    field(o.cfunction_ml)?,
                    owner,
                    field(o.cfunction_vectorcall)?,
                )
            }
            BuiltinKind::MethodDescriptor => (
                field(o.method_descr_method)?,
                field(o.method_descr_type)?,
                field(o.method_descr_vectorcall)?,
            ),
        };
        let flags = mem.read_u32(method_def.wrapping_add(o.method_def_flags))?;
        let label = builtin_label(self.target, kind, method_def, owner)?;
        self.found.push(BuiltinCallable {
            kind,
            object,
            method_def,
            flags,
            owner,
            vectorcall,
            label,
        });
        Ok(())
    }
}

/// Every builtin function and method descriptor reachable from the main
/// interpreter's `builtins` and `sys` dicts, the modules of `sys.modules`,
/// and the C types defined in those modules (see the module docs), in the
/// order found: `builtins` first, then `sys`, then `sys.modules` in
/// insertion order, then each type's methods.
///
/// The `builtins` and `sys` dicts must be readable; a module or type that
/// cannot be read (freed or changing while read) is skipped, and logged at
/// debug level.
pub fn find_builtin_callables<M: Memory>(
    target: &Target<M>,
    types: &BuiltinTypes,
) -> Result<Vec<BuiltinCallable>, BuiltinError> {
    let o = &target.info.offsets;
    let interp = *target
        .interpreters()?
        .first()
        .ok_or(BuiltinError::NoInterpreter)?;
    let builtins = target
        .mem
        .read_u64(interp.wrapping_add(o.interp_builtins))?;
    let sysdict = target.mem.read_u64(interp.wrapping_add(o.interp_sysdict))?;
    if builtins == 0 || sysdict == 0 {
        return Err(BuiltinError::NoInterpreter);
    }
    let mut walk = Walk {
        target,
        types: *types,
        interp,
        dicts_seen: HashSet::new(),
        types_seen: HashSet::new(),
        type_queue: Vec::new(),
        objects_seen: HashSet::new(),
        found: Vec::new(),
    };
    walk.module_dict(builtins)?;
    walk.module_dict(sysdict)?;

    let mut modules = None;
    for (key, value) in dict_items(target, sysdict)? {
        if target.read_str(key).ok().as_deref() == Some("modules") {
            modules = Some(value);
            break;
        }
    }
    match modules.map(|m| dict_items(target, m)) {
        Some(Ok(items)) => {
            for (_, module) in items.into_iter().take(MAX_MODULES) {
                let dict = target
                    .mem
                    .read_u64(module.wrapping_add(common::OB_TYPE))
                    .and_then(|ty| {
                        if ty == types.module {
                            target
                                .mem
                                .read_u64(module.wrapping_add(common::MODULE_DICT))
                        } else {
                            Ok(0)
                        }
                    });
                if let Err(e) = dict
                    .map_err(ReadError::from)
                    .and_then(|dict| walk.module_dict(dict))
                {
                    log::debug!("builtins: module at {module:#x} skipped: {e}");
                }
            }
        }
        Some(Err(e)) => log::debug!("builtins: sys.modules unreadable: {e}"),
        None => log::debug!("builtins: no sys.modules"),
    }

    let mut next = 0;
    while let Some(&ty) = walk.type_queue.get(next) {
        next += 1;
        if let Err(e) = walk.type_dict(ty) {
            log::debug!("builtins: type at {ty:#x} skipped: {e}");
        }
    }
    Ok(walk.found)
}

/// The sites of `callables` and of the `tp_call` slots `calls` (runtime
/// addresses) in `image`, loaded at `load_bias`: one per distinct pointer,
/// sorted by address, each with the first source that used it. Pointers
/// that are NULL or not in an executable segment of `image` are left out
/// (logged at debug level); the second value is how many distinct pointers
/// were left out that way.
pub fn sites_of(
    image: &ElfImage,
    load_bias: u64,
    callables: &[BuiltinCallable],
    calls: &[u64],
    bound: &[u64],
) -> Result<(Vec<BuiltinSite>, usize), ElfError> {
    let executable = image.executable_ranges()?;
    let varargs_source = callables
        .iter()
        .find(|c| c.kind == BuiltinKind::Function && c.vectorcall == 0)
        .map_or_else(
            || "builtin_function_or_method.__call__".to_owned(),
            |c| c.label.clone(),
        );
    let pointers = callables
        .iter()
        .map(|c| (c.kind, c.vectorcall, c.label.clone()))
        .chain(
            calls
                .iter()
                .map(|&call| (BuiltinKind::Function, call, varargs_source.clone())),
        )
        .chain(
            bound
                .iter()
                .map(|&call| (BuiltinKind::Function, call, "a bound method".to_owned())),
        );
    let mut sites: HashMap<u64, BuiltinSite> = HashMap::new();
    let mut skipped = HashSet::new();
    for (kind, pointer, source) in pointers {
        if pointer == 0 || sites.contains_key(&pointer) || skipped.contains(&pointer) {
            continue;
        }
        let vaddr = pointer.wrapping_sub(load_bias);
        if !executable.iter().any(|r| r.contains(&vaddr)) {
            log::debug!(
                "builtins: {source}: {pointer:#x} is not in the code of {}",
                image.path().display()
            );
            skipped.insert(pointer);
            continue;
        }
        let file_offset = image.vaddr_to_file_offset(vaddr)?;
        sites.insert(
            pointer,
            BuiltinSite {
                kind,
                vaddr,
                file_offset,
                source,
            },
        );
    }
    let mut sites: Vec<BuiltinSite> = sites.into_values().collect();
    sites.sort_by_key(|s| s.vaddr);
    Ok((sites, skipped.len()))
}

/// The functions `PyCMethod_New` (3.9+; `PyCFunction_NewEx` on 3.8) may
/// store as a new `builtin_function_or_method`'s `vectorcall`, as
/// link-time addresses: the addresses its code takes (RIP-relative `lea`s,
/// and `mov`s of immediates in a non-PIE executable) that lie in an
/// executable segment (the others are docstrings and types).
pub fn vectorcall_choices(image: &ElfImage) -> Result<Vec<u64>, ElfError> {
    use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};
    let function = image
        .symbol("PyCMethod_New")
        .or_else(|_| image.symbol("PyCFunction_NewEx"))?;
    let executable = image.executable_ranges()?;
    let offset = image.vaddr_to_file_offset(function.vaddr)?;
    let len = usize::try_from(function.size.min(4096)).unwrap_or(0);
    let Some(code) = image.bytes_at(offset, len) else {
        return Ok(Vec::new());
    };
    let mut decoder = Decoder::with_ip(64, code, function.vaddr, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    let mut out = Vec::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        // PIE code takes a function's address with a RIP-relative `lea`,
        // a non-PIE executable (Debian's) with a `mov` of an immediate.
        let target = match insn.mnemonic() {
            Mnemonic::Lea if insn.is_ip_rel_memory_operand() => insn.ip_rel_memory_address(),
            Mnemonic::Mov
                if insn.op_count() == 2
                    && insn.op0_kind() == OpKind::Register
                    && matches!(
                        insn.op1_kind(),
                        OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64
                    ) =>
            {
                insn.immediate(1)
            }
            _ => continue,
        };
        if executable.iter().any(|r| r.contains(&target)) && !out.contains(&target) {
            out.push(target);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The C functions every unspecialized call of a builtin function or method
/// descriptor of the target goes through, as sites in the interpreter's ELF
/// `image` loaded at `load_bias`: sorted by `vaddr`, one per address.
///
/// They are the `vectorcall` pointers of the objects
/// [`find_builtin_callables`] finds and the `tp_call` of
/// `builtin_function_or_method` (and 3.9+ `builtin_method`); pointers
/// outside the executable segments of `image` are ignored (see
/// [`sites_of`], which also counts them).
pub fn find_builtin_sites<M: Memory>(
    target: &Target<M>,
    image: &ElfImage,
    load_bias: u64,
) -> Result<Vec<BuiltinSite>, BuiltinError> {
    let types = BuiltinTypes::from_image(image, load_bias)?;
    let callables = find_builtin_callables(target, &types)?;
    let o = &target.info.offsets;
    let mut calls = vec![
        target
            .mem
            .read_u64(types.cfunction.wrapping_add(o.type_call))?,
    ];
    if let Some(cmethod) = types.cmethod {
        calls.push(target.mem.read_u64(cmethod.wrapping_add(o.type_call))?);
    }
    let bound: Vec<u64> = vectorcall_choices(image)?
        .into_iter()
        .map(|vaddr| vaddr.wrapping_add(load_bias))
        .collect();
    let (sites, skipped) = sites_of(image, load_bias, &callables, &calls, &bound)?;
    log::debug!(
        "builtins: {} objects, {} sites, {skipped} pointers outside {}",
        callables.len(),
        sites.len(),
        image.path().display()
    );
    Ok(sites)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::python::offsets::DictKeysModel;
    use crate::python::{reader::KnownObjects, version::PythonVersion};

    /// Sparse memory built by the tests: regions at chosen addresses, and a
    /// bump allocator for objects.
    #[derive(Default)]
    struct Fake {
        regions: BTreeMap<u64, Vec<u8>>,
        next: u64,
    }

    impl Memory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let unreadable = MemoryError::Unreadable {
                addr,
                len: buf.len(),
            };
            let (start, bytes) = self.regions.range(..=addr).next_back().ok_or(unreadable)?;
            let from = (addr - start) as usize;
            match bytes.get(from..from + buf.len()) {
                Some(b) => {
                    buf.copy_from_slice(b);
                    Ok(())
                }
                None => Err(MemoryError::Unreadable {
                    addr,
                    len: buf.len(),
                }),
            }
        }
    }

    impl Fake {
        fn new() -> Self {
            Fake {
                regions: BTreeMap::new(),
                next: 0x10_0000,
            }
        }

        /// A zeroed region of at least `size` bytes (rounded up to 256, as
        /// real mappings are pages); its address.
        fn alloc(&mut self, size: usize) -> u64 {
            let at = self.next;
            let size = (size + 0xff) & !0xff;
            self.regions.insert(at, vec![0; size]);
            self.next += size as u64;
            at
        }

        /// A zeroed region at a chosen address.
        fn map(&mut self, at: u64, size: usize) {
            self.regions.insert(at, vec![0; size]);
        }

        fn put(&mut self, addr: u64, data: &[u8]) {
            let (start, bytes) = self.regions.range_mut(..=addr).next_back().expect("mapped");
            let from = (addr - start) as usize;
            bytes[from..from + data.len()].copy_from_slice(data);
        }

        fn put_u64(&mut self, addr: u64, v: u64) {
            self.put(addr, &v.to_le_bytes());
        }

        fn c_string(&mut self, s: &str) -> u64 {
            let at = self.alloc(s.len() + 1);
            self.put(at, s.as_bytes());
            at
        }
    }

    /// A fake interpreter of some version with its core types.
    struct Process {
        mem: Fake,
        minor: u8,
        str_type: u64,
        dict_type: u64,
        types: BuiltinTypes,
        interp: u64,
        runtime: u64,
    }

    impl Process {
        fn new(minor: u8) -> Self {
            let mut mem = Fake::new();
            // Zeros where 3.13+ look for `_Py_DebugOffsets`: the built-in table.
            let runtime = mem.alloc(1024);
            let info = crate::python::offsets::builtin(&version(minor)).unwrap();
            let interp_size = 8 + info
                .offsets
                .interp_builtins
                .max(info.offsets.interp_sysdict);
            let interp = mem.alloc(interp_size as usize);
            mem.put_u64(runtime + info.offsets.runtime_interpreters_head, interp);
            let type_type = mem.alloc(400);
            let mut p = Process {
                mem,
                minor,
                str_type: 0,
                dict_type: 0,
                types: BuiltinTypes {
                    cfunction: 0,
                    cmethod: None,
                    method_descriptor: 0,
                    module: 0,
                    type_: type_type,
                },
                interp,
                runtime,
            };
            p.fill_type(type_type, "type", TPFLAGS_TYPE_SUBCLASS, false);
            p.str_type = p.new_type("str", TPFLAGS_UNICODE_SUBCLASS);
            p.dict_type = p.new_type("dict", 0);
            p.types.cfunction = p.new_type("builtin_function_or_method", 0);
            p.types.method_descriptor = p.new_type("method_descriptor", 0);
            p.types.module = p.new_type("module", 0);
            p
        }

        fn offsets(&self) -> crate::python::offsets::Offsets {
            crate::python::offsets::builtin(&version(self.minor))
                .unwrap()
                .offsets
        }

        fn fill_type(&mut self, ty: u64, name: &str, flags: u64, methods: bool) {
            let name = self.mem.c_string(name);
            self.mem.put_u64(ty + common::OB_TYPE, self.types.type_);
            self.mem.put_u64(ty + common::TP_NAME, name);
            self.mem.put_u64(ty + common::TP_FLAGS, flags);
            if methods {
                self.mem.put_u64(ty + common::TP_METHODS, 0xdead_0000);
            }
        }

        fn new_type(&mut self, name: &str, flags: u64) -> u64 {
            let ty = self.mem.alloc(400);
            self.fill_type(ty, name, flags, false);
            ty
        }

        /// A compact ASCII str.
        fn str(&mut self, s: &str) -> u64 {
            let data = self.offsets().unicode_ascii_data;
            let at = self.mem.alloc(data as usize + s.len() + 1);
            self.mem.put_u64(at + common::OB_TYPE, self.str_type);
            self.mem
                .put_u64(at + common::UNICODE_LENGTH, s.len() as u64);
            let state: u32 = (1 << 2) | (1 << 5) | (1 << 6);
            self.mem
                .put(at + common::UNICODE_STATE, &state.to_le_bytes());
            self.mem.put(at + data, s.as_bytes());
            at
        }

        /// A combined dict in the version's keys layout.
        fn dict(&mut self, items: &[(u64, u64)]) -> u64 {
            let dict = self.mem.alloc(48);
            self.mem.put_u64(dict + common::OB_TYPE, self.dict_type);
            self.mem
                .put_u64(dict + common::DICT_USED, items.len() as u64);
            let layout = crate::python::offsets::builtin(&version(self.minor))
                .unwrap()
                .layout;
            // A NULL slot (a deleted entry) first: it must be skipped.
            let n = items.len() as u64 + 1;
            let keys = match layout.dict_keys {
                DictKeysModel::Sized => {
                    let size = 64u64;
                    let keys = self.mem.alloc((40 + size + 24 * n) as usize);
                    self.mem.put_u64(keys + 8, size);
                    self.mem.put_u64(keys + 32, n);
                    let entries = keys + 40 + size;
                    for (i, (k, v)) in items.iter().enumerate() {
                        let e = entries + 24 * (i as u64 + 1);
                        self.mem.put_u64(e, 0x1234);
                        self.mem.put_u64(e + 8, *k);
                        self.mem.put_u64(e + 16, *v);
                    }
                    keys
                }
                DictKeysModel::Log2 => {
                    let index_bytes = 16u64;
                    let keys = self.mem.alloc((32 + index_bytes + 16 * n) as usize);
                    self.mem.put(keys + 8, &[4, 4, 1]); // unicode keys
                    self.mem.put_u64(keys + 24, n);
                    let entries = keys + 32 + index_bytes;
                    for (i, (k, v)) in items.iter().enumerate() {
                        let e = entries + 16 * (i as u64 + 1);
                        self.mem.put_u64(e, *k);
                        self.mem.put_u64(e + 8, *v);
                    }
                    keys
                }
            };
            self.mem.put_u64(dict + common::DICT_KEYS, keys);
            dict
        }

        fn method_def(&mut self, name: &str, flags: u32) -> u64 {
            let o = self.offsets();
            let name = self.mem.c_string(name);
            let def = self.mem.alloc(32);
            self.mem.put_u64(def + o.method_def_name, name);
            self.mem.put(def + o.method_def_flags, &flags.to_le_bytes());
            def
        }

        fn function(&mut self, def: u64, this: u64, module: u64, vectorcall: u64) -> u64 {
            let o = self.offsets();
            let f = self.mem.alloc(CALLABLE_READ);
            self.mem.put_u64(f + common::OB_TYPE, self.types.cfunction);
            self.mem.put_u64(f + o.cfunction_ml, def);
            self.mem.put_u64(f + o.cfunction_self, this);
            self.mem.put_u64(f + o.cfunction_module, module);
            self.mem.put_u64(f + o.cfunction_vectorcall, vectorcall);
            f
        }

        fn descriptor(&mut self, ty: u64, def: u64, vectorcall: u64) -> u64 {
            let o = self.offsets();
            let d = self.mem.alloc(CALLABLE_READ);
            self.mem
                .put_u64(d + common::OB_TYPE, self.types.method_descriptor);
            self.mem.put_u64(d + o.method_descr_type, ty);
            self.mem.put_u64(d + o.method_descr_method, def);
            self.mem.put_u64(d + o.method_descr_vectorcall, vectorcall);
            d
        }

        fn module(&mut self, dict: u64) -> u64 {
            let m = self.mem.alloc(64);
            self.mem.put_u64(m + common::OB_TYPE, self.types.module);
            self.mem.put_u64(m + common::MODULE_DICT, dict);
            m
        }

        /// A C type (`tp_methods` set), without a dict yet.
        fn c_type(&mut self, name: &str) -> u64 {
            let ty = self.mem.alloc(400);
            self.fill_type(ty, name, 0, true);
            ty
        }

        /// Gives `ty` a dict holding `items`: in `tp_dict`, or (3.12+,
        /// `static_index` given) in the interpreter's static type states.
        fn set_type_dict(&mut self, ty: u64, static_index: Option<u64>, items: &[(u64, u64)]) {
            let dict = self.dict(items);
            let o = self.offsets();
            match static_index {
                None => self.mem.put_u64(ty + common::TP_DICT, dict),
                Some(index) => {
                    let entry = self.interp
                        + o.interp_static_types.unwrap()
                        + index * o.static_type_size.unwrap();
                    self.mem.map(entry, o.static_type_size.unwrap() as usize);
                    self.mem.put_u64(entry, ty);
                    self.mem.put_u64(entry + o.static_type_dict.unwrap(), dict);
                    self.mem.put_u64(ty + common::TP_SUBCLASSES, index + 1);
                }
            }
        }

        fn target(self) -> (Target<Fake>, BuiltinTypes) {
            let known = KnownObjects {
                types: [("PyDict_Type".to_owned(), self.dict_type)].into(),
                ..KnownObjects::default()
            };
            let target = Target::new(self.mem, version(self.minor), self.runtime, known).unwrap();
            (target, self.types)
        }
    }

    fn version(minor: u8) -> PythonVersion {
        PythonVersion {
            major: 3,
            minor,
            micro: None,
            hex: None,
        }
    }

    #[test]
    fn labels_name_the_owner_by_its_type() {
        let mut p = Process::new(12);
        let len = p.method_def("len", METH_O);
        let append = p.method_def("append", METH_O);
        let builtins = p.str("builtins");
        let list = p.c_type("list");
        let module = p.module(0);
        let (t, _) = p.target();
        let label = |kind, def, owner| builtin_label(&t, kind, def, owner);
        assert_eq!(
            label(BuiltinKind::Function, len, builtins).unwrap(),
            "builtins.len"
        );
        assert_eq!(
            label(BuiltinKind::MethodDescriptor, append, list).unwrap(),
            "list.append"
        );
        assert_eq!(
            label(BuiltinKind::Function, append, list).unwrap(),
            "list.append"
        );
        assert_eq!(label(BuiltinKind::Function, len, 0).unwrap(), "len");
        // Neither a str nor a type: the bare name for a function, an error
        // for a descriptor.
        assert_eq!(label(BuiltinKind::Function, len, module).unwrap(), "len");
        assert!(matches!(
            label(BuiltinKind::MethodDescriptor, append, module),
            Err(ReadError::Corrupt(_))
        ));
        assert!(label(BuiltinKind::Function, 0x42, builtins).is_err());
    }

    #[test]
    fn long_or_unterminated_names_are_errors_not_hangs() {
        let mut mem = Fake::new();
        let at = mem.alloc(4096);
        mem.put(at, &[b'a'; 4096]);
        assert!(read_c_string(&mem, at, MAX_NAME).is_err());
        // Unterminated at the end of the mapping.
        assert!(read_c_string(&mem, at + 4090, MAX_NAME).is_err());
        // Terminated at the end of the mapping.
        mem.put(at + 4095, &[0]);
        assert_eq!(
            read_c_string(&mem, at + 4070, MAX_NAME).unwrap(),
            "a".repeat(25)
        );
        mem.put(at + 10, &[0]);
        assert_eq!(read_c_string(&mem, at + 5, MAX_NAME).unwrap(), "aaaaa");
        assert_eq!(read_c_string(&mem, at + 10, MAX_NAME).unwrap(), "");
    }

    /// A small process: `builtins` with `len` (METH_O), `max` (METH_VARARGS,
    /// no vectorcall) and the type `list`; `sys` with `getrecursionlimit`
    /// and `modules`, which holds `time` (with `sleep`) and something that
    /// is not a module; `list` has `append` and `copy`.
    fn walk_small_process(minor: u8) {
        let mut p = Process::new(minor);
        let static_list = (minor >= 12).then_some(43);
        let list = p.c_type("list");
        let append = p.method_def("append", METH_O);
        let copy = p.method_def("copy", METH_NOARGS);
        let append_d = p.descriptor(list, append, 0x7000_0100);
        let copy_d = p.descriptor(list, copy, 0x7000_0200);
        let k_append = p.str("append");
        let k_copy = p.str("copy");
        p.set_type_dict(list, static_list, &[(k_append, append_d), (k_copy, copy_d)]);
        // A type written in Python (no tp_methods): its dict is not read.
        let py_class = p.new_type("PyClass", 0);
        let k_py_class = p.str("PyClass");
        let decoy = p.descriptor(py_class, copy, 0x7000_0300);
        p.set_type_dict(py_class, None, &[(k_copy, decoy)]);

        let builtins_name = p.str("builtins");
        let builtins_module = p.module(0);
        let len_def = p.method_def("len", METH_O);
        let max_def = p.method_def("max", METH_VARARGS | METH_KEYWORDS);
        let len = p.function(len_def, builtins_module, builtins_name, 0x7000_0010);
        let max = p.function(max_def, builtins_module, builtins_name, 0);
        let k_len = p.str("len");
        let k_max = p.str("max");
        let k_list = p.str("list");
        let builtins = p.dict(&[
            (k_len, len),
            (k_max, max),
            (k_list, list),
            (k_py_class, py_class),
        ]);
        p.mem
            .put_u64(builtins_module + common::MODULE_DICT, builtins);

        let time_name = p.str("time");
        let sleep_def = p.method_def("sleep", METH_O);
        let time_module = p.module(0);
        let sleep = p.function(sleep_def, time_module, time_name, 0x7000_0010);
        let k_sleep = p.str("sleep");
        let time_dict = p.dict(&[(k_sleep, sleep)]);
        p.mem.put_u64(time_module + common::MODULE_DICT, time_dict);

        let sys_name = p.str("sys");
        let sys_module = p.module(0);
        let limit_def = p.method_def("getrecursionlimit", METH_NOARGS);
        let limit = p.function(limit_def, sys_module, sys_name, 0x7000_0020);
        let k_builtins = p.str("builtins");
        let k_time = p.str("time");
        let k_odd = p.str("odd");
        let modules = p.dict(&[
            (k_builtins, builtins_module),
            (k_time, time_module),
            (k_odd, k_odd),
        ]);
        let k_limit = p.str("getrecursionlimit");
        let k_modules = p.str("modules");
        let sysdict = p.dict(&[(k_limit, limit), (k_modules, modules)]);
        p.mem.put_u64(sys_module + common::MODULE_DICT, sysdict);

        let o = p.offsets();
        p.mem.put_u64(p.interp + o.interp_builtins, builtins);
        p.mem.put_u64(p.interp + o.interp_sysdict, sysdict);
        let (target, types) = p.target();

        let found = find_builtin_callables(&target, &types).unwrap();
        let summary: Vec<_> = found
            .iter()
            .map(|c| (c.kind, c.label.as_str(), c.flags, c.vectorcall))
            .collect();
        use BuiltinKind::*;
        assert_eq!(
            summary,
            [
                (Function, "builtins.len", METH_O, 0x7000_0010),
                (Function, "builtins.max", METH_VARARGS | METH_KEYWORDS, 0),
                (Function, "sys.getrecursionlimit", METH_NOARGS, 0x7000_0020),
                (Function, "time.sleep", METH_O, 0x7000_0010),
                (MethodDescriptor, "list.append", METH_O, 0x7000_0100),
                (MethodDescriptor, "list.copy", METH_NOARGS, 0x7000_0200),
            ],
            "3.{minor}"
        );
        assert_eq!(found[0].object, len);
        assert_eq!(found[0].method_def, len_def);
        assert_eq!(found[0].owner, builtins_name);
        assert_eq!(found[4].owner, list);
    }

    #[test]
    fn finds_functions_and_descriptors_in_every_dict_layout() {
        for minor in 8..=14 {
            walk_small_process(minor);
        }
    }

    #[test]
    fn a_static_type_entry_that_is_not_the_type_is_not_read() {
        let mut p = Process::new(13);
        let list = p.c_type("list");
        let def = p.method_def("append", METH_O);
        let d = p.descriptor(list, def, 0x7000_0100);
        let k = p.str("append");
        p.set_type_dict(list, Some(3), &[(k, d)]);
        // Another type with the same index: entry 3 holds `list`.
        let other = p.c_type("other");
        p.mem.put_u64(other + common::TP_SUBCLASSES, 4);
        let k_list = p.str("list");
        let k_other = p.str("other");
        let builtins = p.dict(&[(k_list, list), (k_other, other)]);
        let sysdict = p.dict(&[]);
        let o = p.offsets();
        p.mem.put_u64(p.interp + o.interp_builtins, builtins);
        p.mem.put_u64(p.interp + o.interp_sysdict, sysdict);
        let (target, types) = p.target();
        let found = find_builtin_callables(&target, &types).unwrap();
        let labels: Vec<_> = found.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels, ["list.append"]);
    }

    #[test]
    fn no_interpreter_or_no_builtins_is_an_error() {
        let p = Process::new(11);
        let (target, types) = p.target();
        assert!(matches!(
            find_builtin_callables(&target, &types),
            Err(BuiltinError::NoInterpreter)
        ));
    }

    /// Our own executable stands in for the interpreter: a function of it is
    /// a site, an address outside its code is not.
    #[test]
    fn sites_are_distinct_sorted_and_in_the_code() {
        let exe = std::env::current_exe().unwrap();
        let image = ElfImage::open(&exe).unwrap();
        let maps = crate::process::read_maps(std::process::id()).unwrap();
        let bias = crate::process::load_bias(&maps, &exe, &image).unwrap();
        let main = image.symbol("main").unwrap().vaddr;
        let code = image.executable_ranges().unwrap();
        assert!(code.iter().any(|r| r.contains(&main)), "{code:x?}");
        let other = code
            .iter()
            .find(|r| r.contains(&main))
            .map(|r| r.start)
            .unwrap();
        assert_ne!(other, main);
        let callable = |kind, vectorcall: u64, label: &str| BuiltinCallable {
            kind,
            object: 0,
            method_def: 0,
            flags: 0,
            owner: 0,
            vectorcall,
            label: label.to_owned(),
        };
        use BuiltinKind::*;
        let callables = [
            callable(Function, bias + main, "builtins.abs"),
            callable(Function, bias + main, "builtins.len"),
            callable(Function, 0, "builtins.max"),
            callable(MethodDescriptor, bias + other, "list.append"),
            callable(MethodDescriptor, 0x10, "garbage.low"),
            callable(MethodDescriptor, u64::MAX - 8, "garbage.high"),
        ];
        let (sites, skipped) =
            sites_of(&image, bias, &callables, &[bias + other + 1], &[]).unwrap();
        assert_eq!(skipped, 2);
        let got: Vec<_> = sites
            .iter()
            .map(|s| (s.kind, s.vaddr, s.source.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (MethodDescriptor, other, "list.append"),
                (Function, other + 1, "builtins.max"),
                (Function, main, "builtins.abs"),
            ]
        );
        for s in &sites {
            assert_eq!(s.file_offset, image.vaddr_to_file_offset(s.vaddr).unwrap());
        }
        // Without a METH_VARARGS function, tp_call is named by its type.
        let (sites, _) = sites_of(&image, bias, &callables[..1], &[bias + other], &[]).unwrap();
        assert_eq!(sites[0].source, "builtin_function_or_method.__call__");
    }

    #[test]
    fn a_missing_type_symbol_is_an_elf_error() {
        let image = ElfImage::open(&std::env::current_exe().unwrap()).unwrap();
        let err = BuiltinTypes::from_image(&image, 0).unwrap_err();
        assert!(err.to_string().contains("PyCFunction_Type"), "{err}");
    }
}
