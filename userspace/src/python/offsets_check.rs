//! Cross-checks of the per-version knowledge: the built-in tables against
//! the DWARF of each pyenv build, and `_Py_DebugOffsets` (3.13) against
//! both. Every pyenv build of 3.8-3.13 must be present; a missing one fails.

use std::path::PathBuf;

use super::{
    dwarf::DwarfInfo,
    offsets::{self, FrameLink, GilLocation, VersionInfo, common},
    version,
};
use crate::elf::ElfImage;

const PYENV_BUILDS: &[&str] = &["3.8.18", "3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0"];

fn library(version: &str) -> PathBuf {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".pyenv"));
    let minor = version.rsplit_once('.').expect("x.y.z").0;
    root.join(format!("versions/{version}/lib/libpython{minor}.so.1.0"))
}

/// Every (field, table value, DWARF type, member path) to compare.
fn expectations(
    info: &VersionInfo,
    minor: u8,
) -> Vec<(&'static str, u64, &'static str, &'static str)> {
    let o = &info.offsets;
    let mut v = vec![
        (
            "runtime_interpreters_head",
            o.runtime_interpreters_head,
            "_PyRuntimeState",
            "interpreters.head",
        ),
        ("interp_next", o.interp_next, "PyInterpreterState", "next"),
        ("tstate_next", o.tstate_next, "PyThreadState", "next"),
        ("tstate_interp", o.tstate_interp, "PyThreadState", "interp"),
        (
            "tstate_thread_id",
            o.tstate_thread_id,
            "PyThreadState",
            "thread_id",
        ),
        (
            "code_argcount",
            o.code_argcount,
            "PyCodeObject",
            "co_argcount",
        ),
        ("code_flags", o.code_flags, "PyCodeObject", "co_flags"),
        (
            "code_firstlineno",
            o.code_firstlineno,
            "PyCodeObject",
            "co_firstlineno",
        ),
        ("code_nlocals", o.code_nlocals, "PyCodeObject", "co_nlocals"),
        (
            "code_filename",
            o.code_filename,
            "PyCodeObject",
            "co_filename",
        ),
        ("code_name", o.code_name, "PyCodeObject", "co_name"),
        ("tuple_items", o.tuple_items, "PyTupleObject", "ob_item"),
        ("OB_TYPE", common::OB_TYPE, "PyObject", "ob_type"),
        ("OB_SIZE", common::OB_SIZE, "PyVarObject", "ob_size"),
        ("TP_NAME", common::TP_NAME, "PyTypeObject", "tp_name"),
        (
            "FLOAT_VALUE",
            common::FLOAT_VALUE,
            "PyFloatObject",
            "ob_fval",
        ),
        ("LIST_ITEMS", common::LIST_ITEMS, "PyListObject", "ob_item"),
        ("BYTES_DATA", common::BYTES_DATA, "PyBytesObject", "ob_sval"),
        (
            "UNICODE_LENGTH",
            common::UNICODE_LENGTH,
            "PyASCIIObject",
            "length",
        ),
        (
            "UNICODE_STATE",
            common::UNICODE_STATE,
            "PyASCIIObject",
            "state",
        ),
        ("DICT_USED", common::DICT_USED, "PyDictObject", "ma_used"),
        ("DICT_KEYS", common::DICT_KEYS, "PyDictObject", "ma_keys"),
        (
            "DICT_VALUES",
            common::DICT_VALUES,
            "PyDictObject",
            "ma_values",
        ),
    ];
    if minor <= 10 {
        v.extend([
            (
                "interp_threads_head",
                o.interp_threads_head,
                "PyInterpreterState",
                "tstate_head",
            ),
            (
                "tstate_frame",
                direct(o.tstate_frame),
                "PyThreadState",
                "frame",
            ),
            (
                "frame_previous",
                o.frame_previous,
                "PyFrameObject",
                "f_back",
            ),
            ("frame_code", o.frame_code, "PyFrameObject", "f_code"),
            (
                "frame_instruction",
                o.frame_instruction,
                "PyFrameObject",
                "f_lasti",
            ),
            (
                "frame_localsplus",
                o.frame_localsplus,
                "PyFrameObject",
                "f_localsplus",
            ),
            ("code_code", o.code_code.unwrap(), "PyCodeObject", "co_code"),
            (
                "code_varnames",
                o.code_varnames,
                "PyCodeObject",
                "co_varnames",
            ),
            (
                "LONG_DIGITS",
                common::LONG_DIGITS,
                "PyLongObject",
                "ob_digit",
            ),
        ]);
        v.push((
            "code_linetable",
            o.code_linetable,
            "PyCodeObject",
            if minor <= 9 {
                "co_lnotab"
            } else {
                "co_linetable"
            },
        ));
    } else {
        v.extend([
            (
                "interp_threads_head",
                o.interp_threads_head,
                "PyInterpreterState",
                "threads.head",
            ),
            (
                "tstate_native_thread_id",
                o.tstate_native_thread_id.unwrap(),
                "PyThreadState",
                "native_thread_id",
            ),
            (
                "frame_previous",
                o.frame_previous,
                "_PyInterpreterFrame",
                "previous",
            ),
            (
                "frame_localsplus",
                o.frame_localsplus,
                "_PyInterpreterFrame",
                "localsplus",
            ),
            (
                "frame_owner",
                o.frame_owner.unwrap(),
                "_PyInterpreterFrame",
                "owner",
            ),
            (
                "code_nlocalsplus",
                o.code_nlocalsplus.unwrap(),
                "PyCodeObject",
                "co_nlocalsplus",
            ),
            (
                "code_code_adaptive",
                o.code_code_adaptive.unwrap(),
                "PyCodeObject",
                "co_code_adaptive",
            ),
            (
                "code_varnames",
                o.code_varnames,
                "PyCodeObject",
                "co_localsplusnames",
            ),
            (
                "code_localspluskinds",
                o.code_localspluskinds.unwrap(),
                "PyCodeObject",
                "co_localspluskinds",
            ),
            (
                "code_qualname",
                o.code_qualname.unwrap(),
                "PyCodeObject",
                "co_qualname",
            ),
            (
                "code_linetable",
                o.code_linetable,
                "PyCodeObject",
                "co_linetable",
            ),
            (
                "code_firsttraceable",
                o.code_firsttraceable.unwrap(),
                "PyCodeObject",
                "_co_firsttraceable",
            ),
        ]);
        let (code, instr) = if minor <= 12 {
            ("f_code", "prev_instr")
        } else {
            ("f_executable", "instr_ptr")
        };
        v.push(("frame_code", o.frame_code, "_PyInterpreterFrame", code));
        v.push((
            "frame_instruction",
            o.frame_instruction,
            "_PyInterpreterFrame",
            instr,
        ));
        v.push((
            "LONG_DIGITS",
            common::LONG_DIGITS,
            "PyLongObject",
            if minor <= 11 {
                "ob_digit"
            } else {
                "long_value.ob_digit"
            },
        ));
        match o.tstate_frame {
            FrameLink::ViaCFrame {
                cframe,
                current_frame,
            } => {
                v.push(("tstate_frame.cframe", cframe, "PyThreadState", "cframe"));
                v.push((
                    "tstate_frame.current_frame",
                    current_frame,
                    "_PyCFrame",
                    "current_frame",
                ));
            }
            FrameLink::Direct(off) => {
                v.push(("tstate_frame", off, "PyThreadState", "current_frame"))
            }
        }
    }
    if let Some(current) = o.runtime_tstate_current {
        v.push((
            "runtime_tstate_current",
            current,
            "_PyRuntimeState",
            "gilstate.tstate_current",
        ));
    }
    match o.gil {
        GilLocation::Runtime {
            last_holder,
            locked,
        } => {
            v.push((
                "gil.last_holder",
                last_holder,
                "_PyRuntimeState",
                "ceval.gil.last_holder",
            ));
            v.push(("gil.locked", locked, "_PyRuntimeState", "ceval.gil.locked"));
        }
        GilLocation::InterpPointer {
            pointer,
            last_holder,
            locked,
        } => {
            v.push(("gil.pointer", pointer, "PyInterpreterState", "ceval.gil"));
            v.push((
                "gil.last_holder",
                last_holder,
                "_gil_runtime_state",
                "last_holder",
            ));
            v.push(("gil.locked", locked, "_gil_runtime_state", "locked"));
        }
    }
    v
}

fn direct(link: FrameLink) -> u64 {
    match link {
        FrameLink::Direct(off) => off,
        FrameLink::ViaCFrame { .. } => panic!("expected a direct frame link"),
    }
}

#[test]
fn builtin_tables_agree_with_dwarf_of_every_pyenv_build() {
    for build in PYENV_BUILDS {
        let path = library(build);
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (pyenv {build} is required)", path.display()));
        let dwarf = DwarfInfo::parse(&bytes)
            .unwrap()
            .unwrap_or_else(|| panic!("{} has no DWARF", path.display()));
        let image = ElfImage::from_bytes(path.clone(), bytes).unwrap();
        let version = version::detect(&image).unwrap();
        assert_eq!(
            version.to_string(),
            *build,
            "version detected from the binary"
        );
        let info = offsets::builtin(&version).unwrap();
        let mut mismatches = Vec::new();
        for (field, table, ty, member) in expectations(&info, version.minor) {
            match dwarf.offset_of(ty, member) {
                Ok(d) if d == table => {}
                Ok(d) => {
                    mismatches.push(format!("{field}: table {table}, DWARF {ty}.{member} = {d}"))
                }
                Err(e) => mismatches.push(format!("{field}: DWARF {ty}.{member}: {e}")),
            }
        }
        let o = &info.offsets;
        for (field, table, ty) in [
            ("unicode_ascii_data", o.unicode_ascii_data, "PyASCIIObject"),
            (
                "unicode_compact_data",
                o.unicode_compact_data,
                "PyCompactUnicodeObject",
            ),
        ] {
            let d = dwarf.size_of(ty).unwrap();
            if d != table {
                mismatches.push(format!("{field}: table {table}, sizeof({ty}) = {d}"));
            }
        }
        assert!(mismatches.is_empty(), "{build}:\n{}", mismatches.join("\n"));
    }
}

#[test]
fn debug_offsets_of_313_agree_with_table_and_dwarf() {
    let path = library("3.13.0");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (pyenv 3.13.0 is required)", path.display()));
    let image = ElfImage::from_bytes(path.clone(), bytes.clone()).unwrap();
    // _PyRuntime is statically initialised: its first bytes in the file are
    // the _Py_DebugOffsets the process starts with.
    let runtime = image.symbol("_PyRuntime").unwrap();
    let at = image.vaddr_to_file_offset(runtime.vaddr).unwrap();
    let raw = image
        .bytes_at(
            at,
            offsets::debug_offsets_size(&version::detect(&image).unwrap()),
        )
        .unwrap();
    let (version, from_debug) = offsets::from_debug_offsets(raw).unwrap();
    assert_eq!(version.to_string(), "3.13.0");
    assert_eq!(
        from_debug,
        offsets::PY313,
        "_Py_DebugOffsets vs built-in table"
    );
    let dwarf = DwarfInfo::parse(&bytes).unwrap().unwrap();
    for (field, value, ty, member) in expectations(&from_debug, 13) {
        assert_eq!(
            dwarf.offset_of(ty, member).unwrap(),
            value,
            "{field} vs DWARF {ty}.{member}"
        );
    }
}
