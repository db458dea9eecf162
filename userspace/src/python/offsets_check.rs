//! Cross-checks of the per-version knowledge: the built-in tables against
//! the offsets [`offsets_dwarf::from_dwarf`] reads from the DWARF of each
//! pyenv build (through the same field list the tracer uses at run time),
//! the `offsets::common` constants against that DWARF, and
//! `_Py_DebugOffsets` (3.13) against both. Every pyenv build of 3.8-3.13
//! must be present; a missing one fails.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use super::{
    dwarf::DwarfInfo,
    offsets::{self, VersionInfo, common},
    offsets_dwarf::{
        self, OffsetsDwarfError, cached_from_elf_in, from_dwarf,
        tests::{TempDir, leaves},
    },
    version::{self, PythonVersion},
};
use crate::elf::ElfImage;

const PYENV_BUILDS: &[&str] = &pyprobe_testenv::PYENV_BUILDS;

fn library(version: &str) -> PathBuf {
    pyprobe_testenv::pyenv_library(version)
}

/// A pyenv build's image, detected version and DWARF.
fn open(build: &str) -> (ElfImage, PythonVersion, DwarfInfo) {
    let path = library(build);
    let image = ElfImage::open(&path).unwrap_or_else(|e| panic!("{e} (pyenv {build} is required)"));
    let version = version::detect(&image).unwrap();
    assert_eq!(
        version.to_string(),
        build,
        "version detected from the binary"
    );
    let dwarf = DwarfInfo::parse(image.data())
        .unwrap()
        .unwrap_or_else(|| panic!("{} has no DWARF", path.display()));
    (image, version, dwarf)
}

/// Field-by-field differences between two versions' knowledge, one line
/// per field (variant fields by dotted path), empty when equal.
fn diff(left: (&str, &VersionInfo), right: (&str, &VersionInfo)) -> Vec<String> {
    let (ln, l) = left;
    let (rn, r) = right;
    let l_leaves = leaves(&serde_json::to_value(l.offsets).unwrap());
    let r_leaves = leaves(&serde_json::to_value(r.offsets).unwrap());
    let mut paths: Vec<_> = l_leaves.keys().chain(r_leaves.keys()).collect();
    paths.sort();
    paths.dedup();
    let show = |v: Option<&serde_json::Value>| v.map_or("<absent>".to_owned(), |v| v.to_string());
    let mut out: Vec<String> = paths
        .into_iter()
        .filter(|p| l_leaves.get(*p) != r_leaves.get(*p))
        .map(|p| {
            format!(
                "{p}: {ln} {}, {rn} {}",
                show(l_leaves.get(p)),
                show(r_leaves.get(p))
            )
        })
        .collect();
    if l.layout != r.layout {
        out.push(format!("layout: {ln} {:?}, {rn} {:?}", l.layout, r.layout));
    }
    out
}

/// `offsets::common` constants and where DWARF has them.
fn common_fields(minor: u8) -> Vec<(&'static str, u64, &'static str, &'static str)> {
    vec![
        ("OB_REFCNT", common::OB_REFCNT, "PyObject", "ob_refcnt"),
        ("OB_TYPE", common::OB_TYPE, "PyObject", "ob_type"),
        ("OB_SIZE", common::OB_SIZE, "PyVarObject", "ob_size"),
        ("TP_NAME", common::TP_NAME, "PyTypeObject", "tp_name"),
        ("TP_FLAGS", common::TP_FLAGS, "PyTypeObject", "tp_flags"),
        (
            "TP_METHODS",
            common::TP_METHODS,
            "PyTypeObject",
            "tp_methods",
        ),
        ("TP_DICT", common::TP_DICT, "PyTypeObject", "tp_dict"),
        (
            "TP_SUBCLASSES",
            common::TP_SUBCLASSES,
            "PyTypeObject",
            "tp_subclasses",
        ),
        (
            "MODULE_DICT",
            common::MODULE_DICT,
            "PyModuleObject",
            "md_dict",
        ),
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
        (
            "LONG_SIZE",
            common::LONG_SIZE,
            "PyLongObject",
            if minor <= 11 {
                "ob_base.ob_size"
            } else {
                "long_value.lv_tag"
            },
        ),
        (
            "LONG_DIGITS",
            common::LONG_DIGITS,
            "PyLongObject",
            if minor <= 11 {
                "ob_digit"
            } else {
                "long_value.ob_digit"
            },
        ),
        ("DICT_USED", common::DICT_USED, "PyDictObject", "ma_used"),
        ("DICT_KEYS", common::DICT_KEYS, "PyDictObject", "ma_keys"),
        (
            "DICT_VALUES",
            common::DICT_VALUES,
            "PyDictObject",
            "ma_values",
        ),
        (
            "TP_BASICSIZE",
            common::TP_BASICSIZE,
            "PyTypeObject",
            "tp_basicsize",
        ),
        (
            "TP_DICTOFFSET",
            common::TP_DICTOFFSET,
            "PyTypeObject",
            "tp_dictoffset",
        ),
        (
            "WRAPPED_CALLABLE",
            common::WRAPPED_CALLABLE,
            "staticmethod",
            "sm_callable",
        ),
        (
            "WRAPPED_CALLABLE",
            common::WRAPPED_CALLABLE,
            "classmethod",
            "cm_callable",
        ),
        (
            "PROPERTY_GET",
            common::PROPERTY_GET,
            "propertyobject",
            "prop_get",
        ),
    ]
}

fn common_mismatches(dwarf: &DwarfInfo, minor: u8) -> Vec<String> {
    common_fields(minor)
        .into_iter()
        .filter_map(
            |(name, value, ty, member)| match dwarf.offset_of(ty, member) {
                Ok(d) if d == value => None,
                Ok(d) => Some(format!(
                    "{name}: constant {value}, DWARF {ty}.{member} = {d}"
                )),
                Err(e) => Some(format!("{name}: DWARF {ty}.{member}: {e}")),
            },
        )
        .collect()
}

#[test]
fn builtin_tables_agree_with_dwarf_of_every_pyenv_build() {
    for build in PYENV_BUILDS {
        let (_image, version, dwarf) = open(build);
        let table = offsets::builtin(&version).unwrap();
        let read = from_dwarf(&dwarf, &version).unwrap_or_else(|e| panic!("{build}: {e}"));
        let mut mismatches = diff(("table", &table), ("DWARF", &read));
        mismatches.extend(common_mismatches(&dwarf, version.minor));
        assert!(mismatches.is_empty(), "{build}:\n{}", mismatches.join("\n"));
    }
}

#[test]
fn a_changed_table_field_is_reported() {
    let (_image, version, dwarf) = open("3.12.1");
    let read = from_dwarf(&dwarf, &version).unwrap();

    let mut table = offsets::builtin(&version).unwrap();
    table.offsets.code_firstlineno += 4;
    assert_eq!(
        diff(("table", &table), ("DWARF", &read)),
        ["code_firstlineno: table 72, DWARF 68"]
    );

    let mut table = offsets::builtin(&version).unwrap();
    table.offsets.tstate_frame = offsets::FrameLink::Direct(56);
    assert_eq!(
        diff(("table", &table), ("DWARF", &read)),
        [
            "tstate_frame.Direct: table 56, DWARF <absent>",
            "tstate_frame.ViaCFrame.cframe: table <absent>, DWARF 56",
            "tstate_frame.ViaCFrame.current_frame: table <absent>, DWARF 0",
        ]
    );

    let mut table = offsets::builtin(&version).unwrap();
    table.offsets.code_qualname = None;
    assert_eq!(
        diff(("table", &table), ("DWARF", &read)),
        ["code_qualname: table null, DWARF 128"]
    );

    let mut mismatches = common_mismatches(&dwarf, 11);
    assert_eq!(
        mismatches.len(),
        2,
        "3.11 paths of PyLongObject do not exist in 3.12: {mismatches:?}"
    );
    mismatches.sort();
    assert!(mismatches[0].starts_with("LONG_DIGITS: DWARF PyLongObject.ob_digit: "));
}

#[test]
fn a_field_missing_from_dwarf_is_an_error_naming_it() {
    // 3.8's DWARF, read with 3.11's field list.
    let (_image, _version, dwarf) = open("3.8.18");
    let v311 = offsets_dwarf::tests::version(11);
    let err = from_dwarf(&dwarf, &v311).unwrap_err();
    assert!(
        matches!(
            &err,
            OffsetsDwarfError::Field {
                field: "interp_threads_head",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "DWARF of CPython 3.11: cannot read PyInterpreterState.threads.head (for \
         interp_threads_head): type `PyInterpreterState` has no member `threads`"
    );
    let v37 = offsets_dwarf::tests::version(7);
    assert!(matches!(
        from_dwarf(&dwarf, &v37),
        Err(OffsetsDwarfError::Unsupported { .. })
    ));
}

#[test]
fn debug_offsets_of_313_agree_with_table_and_dwarf() {
    let (image, version, dwarf) = open("3.13.0");
    // _PyRuntime is statically initialised: its first bytes in the file are
    // the _Py_DebugOffsets the process starts with.
    let runtime = image.symbol("_PyRuntime").unwrap();
    let at = image.vaddr_to_file_offset(runtime.vaddr).unwrap();
    let raw = image
        .bytes_at(at, offsets::debug_offsets_size(&version))
        .unwrap();
    let (debug_version, from_debug) = offsets::from_debug_offsets(raw).unwrap();
    assert_eq!(debug_version.to_string(), "3.13.0");
    let read = from_dwarf(&dwarf, &version).unwrap();
    let mut mismatches = diff(
        ("_Py_DebugOffsets", &from_debug),
        ("table", &offsets::PY313),
    );
    mismatches.extend(diff(("_Py_DebugOffsets", &from_debug), ("DWARF", &read)));
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// The cache on a real binary: cold lookup parses and writes, warm lookup
/// reads the file (shown by planting a value in it), a corrupt file is
/// recomputed and rewritten. Prints the timings.
#[test]
fn dwarf_offsets_cache_on_312() {
    let path = library("3.12.1");
    let image = ElfImage::open(&path).unwrap_or_else(|e| panic!("{e} (pyenv 3.12.1 is required)"));
    let version = version::detect(&image).unwrap();

    let start = Instant::now();
    let dwarf = DwarfInfo::parse(image.data()).unwrap().unwrap();
    let parse = start.elapsed();
    let start = Instant::now();
    let expected = from_dwarf(&dwarf, &version).unwrap();
    let query = start.elapsed();
    drop(dwarf);

    let dir = TempDir::new("offsets-312");
    let key: String = image
        .build_id()
        .expect("pyenv builds have a build-id")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = dir.0.join(format!("{key}.json"));

    let start = Instant::now();
    let cold = cached_from_elf_in(&dir.0, &image, &version).unwrap();
    let cold_time = start.elapsed();
    assert_eq!(cold, Some(expected));
    assert!(file.exists(), "{} written", file.display());

    let warm_times: Vec<Duration> = (0..20)
        .map(|_| {
            let start = Instant::now();
            let warm = cached_from_elf_in(&dir.0, &image, &version).unwrap();
            let elapsed = start.elapsed();
            assert_eq!(warm, Some(expected));
            elapsed
        })
        .collect();
    let warm = median(warm_times);

    // The warm lookup reads the file: a value planted in it comes back.
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(json["source"], "dwarf");
    assert_eq!(json["format"], offsets_dwarf::CACHE_FORMAT);
    for value in json["values"].as_array_mut().unwrap() {
        if value["field"] == "code_firstlineno" {
            value["value"] = 4242.into();
        }
    }
    std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
    let planted = cached_from_elf_in(&dir.0, &image, &version)
        .unwrap()
        .unwrap();
    assert_eq!(planted.offsets.code_firstlineno, 4242);

    // A corrupt file is ignored and rewritten.
    std::fs::write(&file, b"not json").unwrap();
    let start = Instant::now();
    let again = cached_from_elf_in(&dir.0, &image, &version).unwrap();
    let rewrite_time = start.elapsed();
    assert_eq!(again, Some(expected));
    let rewritten: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(rewritten["python"], "3.12");

    // An unwritable cache directory is not an error.
    let blocked = dir.0.join("blocked");
    std::fs::write(&blocked, b"a file where the directory should be").unwrap();
    assert_eq!(
        cached_from_elf_in(&blocked.join("sub"), &image, &version).unwrap(),
        Some(expected)
    );

    eprintln!(
        "libpython3.12 ({} MB): DwarfInfo::parse {parse:?} + from_dwarf queries {query:?}; \
         cached_from_elf cold (parse, query, write) {cold_time:?}, corrupt entry {rewrite_time:?}, \
         warm (build-id + JSON) {warm:?} (median of 20)",
        image.data().len() / 1_000_000
    );
}
