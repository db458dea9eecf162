//! Checks of [`super`] against every interpreter on the machine: the pyenv
//! builds (shared libpython with DWARF and `.symtab`), Debian's stripped
//! non-PIE `/usr/bin/python3.11`, and the private Debian sid 3.14 installed
//! by `cargo xtask setup`. A missing interpreter is a failure that says how
//! to install it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, OnceLock},
    time::Instant,
};

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction};

use super::*;
use crate::python::{offsets, version};

/// Where an interpreter comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// pyenv: PIE shared library with `.symtab` and DWARF.
    Pyenv,
    /// Debian: stripped non-PIE executable.
    Debian,
}

#[derive(Debug, Clone)]
struct Build {
    label: String,
    /// The ELF file holding `_PyEval_EvalFrameDefault`.
    binary: PathBuf,
    /// What to run to ask the interpreter itself.
    python: PathBuf,
    /// `x.y.z`.
    version: &'static str,
    origin: Origin,
    /// How to get it when missing.
    install: String,
}

const PYENV: &[&str] = &pyprobe_testenv::PYENV_BUILDS;

fn pyenv_root() -> PathBuf {
    pyprobe_testenv::pyenv_root()
}

fn sid_dir() -> PathBuf {
    pyprobe_testenv::sid_dir()
}

fn builds() -> Vec<Build> {
    let mut builds: Vec<Build> = PYENV
        .iter()
        .map(|&version| {
            let minor = version.rsplit_once('.').expect("x.y.z").0;
            let dir = pyenv_root().join("versions").join(version);
            Build {
                label: format!("pyenv {version}"),
                binary: dir.join(format!("lib/libpython{minor}.so.1.0")),
                python: dir.join(format!("bin/python{minor}")),
                version,
                origin: Origin::Pyenv,
                install: format!(
                    "install it with `env PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install \
                     {version}` (pyenv's default CFLAGS keep the DWARF)"
                ),
            }
        })
        .collect();
    builds.push(Build {
        label: "Debian 3.11.2".into(),
        binary: "/usr/bin/python3.11".into(),
        python: "/usr/bin/python3.11".into(),
        version: "3.11.2",
        origin: Origin::Debian,
        install: "install Debian's interpreter with `apt-get install python3.11-minimal`".into(),
    });
    builds.push(Build {
        label: "Debian sid 3.14.10".into(),
        binary: sid_dir().join("root/usr/bin/python3.14"),
        python: sid_dir().join("bin/python3.14"),
        version: "3.14.10",
        origin: Origin::Debian,
        install: "run `cargo xtask setup`, which unpacks Debian sid's python3.14 there".into(),
    });
    builds
}

fn build(label: &str) -> Build {
    builds()
        .into_iter()
        .find(|b| b.label == label)
        .unwrap_or_else(|| panic!("no build {label}"))
}

/// Each file is read once and shared between tests.
fn image(build: &Build) -> Arc<ElfImage> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<ElfImage>>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Arc::clone(cache.entry(build.binary.clone()).or_insert_with(|| {
        Arc::new(ElfImage::open(&build.binary).unwrap_or_else(|e| {
            panic!(
                "{}: {e}\n{} is required by these tests: {}",
                build.binary.display(),
                build.label,
                build.install
            )
        }))
    }))
}

fn version_and_layout(build: &Build, image: &ElfImage) -> (PythonVersion, Layout) {
    let detected = version::detect(image)
        .unwrap_or_else(|e| panic!("{}: version detection: {e}", build.label));
    assert_eq!(detected.to_string(), build.version, "{}", build.label);
    let info = offsets::builtin(&detected).expect("supported version");
    (detected, info.layout)
}

/// The interpreter's own opcode map, including specialized and instrumented
/// opcodes: `opcode.opmap` plus `opcode._specialized_opmap` (3.13+) or
/// `dis._all_opmap` (3.11, 3.12). Pseudo-instructions (numbered from 256,
/// never in bytecode) are included.
fn interpreter_opmap(build: &Build) -> BTreeMap<String, u16> {
    const SCRIPT: &str = "\
import dis, opcode
m = dict(opcode.opmap)
m.update(getattr(opcode, '_specialized_opmap', {}))
m.update(getattr(dis, '_all_opmap', {}))
for k, v in sorted(m.items()):
    print(k, v)
";
    let out = Command::new(&build.python)
        .args(["-I", "-c", SCRIPT])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e}\n{} is required by these tests: {}",
                build.python.display(),
                build.label,
                build.install
            )
        });
    assert!(
        out.status.success(),
        "{}: {}",
        build.python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(|line| {
            let (name, number) = line.split_once(' ').expect("NAME NUMBER");
            (name.to_owned(), number.parse().expect("opcode number"))
        })
        .collect()
}

/// Each library's DWARF is parsed once and shared.
fn dwarf(build: &Build) -> Arc<DwarfInfo> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<DwarfInfo>>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(info) = cache.get(&build.binary) {
        return Arc::clone(info);
    }
    let info = Arc::new(
        DwarfInfo::parse(image(build).data())
            .unwrap_or_else(|e| panic!("{}: {e}", build.label))
            .unwrap_or_else(|| panic!("{}: no DWARF ({})", build.label, build.install)),
    );
    cache.insert(build.binary.clone(), Arc::clone(&info));
    info
}

fn text_section(image: &ElfImage) -> Range<u64> {
    let text = image
        .sections()
        .unwrap()
        .into_iter()
        .find(|s| s.name == ".text")
        .expect(".text");
    text.vaddr..text.vaddr + text.size
}

#[test]
fn resume_opcodes_match_each_interpreter() {
    const FAMILY: [&str; 4] = [
        "RESUME",
        "RESUME_QUICK",
        "RESUME_CHECK",
        "INSTRUMENTED_RESUME",
    ];
    for build in builds() {
        let image = image(&build);
        let (_, layout) = version_and_layout(&build, &image);
        let opmap = interpreter_opmap(&build);
        let ours: BTreeMap<String, u16> = layout
            .resume_opcodes
            .iter()
            .flat_map(|r| r.all())
            .map(|(name, opcode)| (name.to_owned(), u16::from(opcode)))
            .collect();
        let theirs: BTreeMap<String, u16> = opmap
            .iter()
            .filter(|(name, _)| FAMILY.contains(&name.as_str()))
            .map(|(name, &opcode)| (name.clone(), opcode))
            .collect();
        eprintln!("start_sites: {}: RESUME family {theirs:?}", build.label);
        assert_eq!(
            ours, theirs,
            "{}: offsets.rs vs the interpreter",
            build.label
        );
        // 3.8-3.10 have no RESUME: the eval entry is the site.
        assert_eq!(
            layout.resume_opcodes.is_none(),
            build.version.starts_with("3.8.")
                || build.version.starts_with("3.9.")
                || build.version.starts_with("3.10."),
            "{}",
            build.label
        );
    }
}

#[test]
fn exit_opcodes_match_each_interpreter_and_their_handlers_are_found() {
    const FAMILY: [&str; 6] = [
        "RETURN_VALUE",
        "RETURN_CONST",
        "YIELD_VALUE",
        "INSTRUMENTED_RETURN_VALUE",
        "INSTRUMENTED_RETURN_CONST",
        "INSTRUMENTED_YIELD_VALUE",
    ];
    for build in builds() {
        let image = image(&build);
        let (detected, layout) = version_and_layout(&build, &image);
        let info = offsets::builtin(&detected).expect("supported version");
        let slot = CurrentFrameSlot::of(info.offsets.tstate_frame);
        let sites = find_exit_sites(&image, &detected, &layout, slot).unwrap();
        let Some(exits) = layout.exit_opcodes else {
            // 3.8-3.10: frames end with the return of the eval loop.
            assert!(sites.is_empty(), "{}", build.label);
            assert!(layout.resume_opcodes.is_none(), "{}", build.label);
            continue;
        };
        let ours: BTreeMap<String, u16> = exits
            .all()
            .map(|(name, opcode)| (name.to_owned(), u16::from(opcode)))
            .collect();
        let theirs: BTreeMap<String, u16> = interpreter_opmap(&build)
            .into_iter()
            .filter(|(name, _)| FAMILY.contains(&name.as_str()))
            .collect();
        assert_eq!(
            ours, theirs,
            "{}: offsets.rs vs the interpreter",
            build.label
        );
        // One distinct handler per opcode.
        assert_eq!(sites.len(), ours.len(), "{}: {sites:?}", build.label);
        for site in &sites {
            assert!(matches!(site.kind, SiteKind::Exit { .. }), "{site}");
            eprintln!("start_sites: {}: {site}", build.label);
        }
    }
}

#[test]
fn the_frame_register_is_found_in_every_311_plus_build() {
    // Checked by hand against DWARF (3.12.1), disassembly and a live run
    // comparing the register with the thread state's current frame.
    let expected = [
        ("pyenv 3.11.7", FrameRegister::Rbp),
        ("pyenv 3.12.1", FrameRegister::Rbx),
        ("pyenv 3.13.0", FrameRegister::Rbp),
        ("Debian 3.11.2", FrameRegister::Rbx),
        ("Debian sid 3.14.10", FrameRegister::Rbx),
    ];
    for build in builds() {
        let image = image(&build);
        let (detected, layout) = version_and_layout(&build, &image);
        let info = offsets::builtin(&detected).expect("supported version");
        let slot = CurrentFrameSlot::of(info.offsets.tstate_frame);
        let sites = find_probe_sites(
            &image,
            &detected,
            &layout,
            info.offsets.frame_instruction,
            slot,
            true,
        )
        .unwrap();
        let want = expected
            .iter()
            .find(|(label, _)| build.label.contains(label))
            .map(|&(_, reg)| reg);
        eprintln!(
            "start_sites: {}: frame register {:?}",
            build.label, sites.frame_register
        );
        assert_eq!(sites.frame_register, want, "{}", build.label);
        // The register changes nothing about where start probes go (no
        // handler writes it before its site), and exits are found.
        assert_eq!(
            sites.starts,
            find_start_sites(&image, &detected, &layout).unwrap(),
            "{}",
            build.label
        );
        assert_eq!(
            sites.exits.len(),
            layout.exit_opcodes.map_or(0, |e| e.all().count()),
            "{}",
            build.label
        );
    }
}

#[test]
fn pyenv_table_handlers_equal_dwarf_labels() {
    for version in ["3.11.7", "3.12.1", "3.13.0"] {
        let build = build(&format!("pyenv {version}"));
        let image = image(&build);
        let (detected, layout) = version_and_layout(&build, &image);
        let opcodes = layout.resume_opcodes.expect("3.11+");
        let table = find_opcode_table(&image).unwrap();
        assert!(
            matches!(&table.origin, TableOrigin::Symbol { name } if name.starts_with("opcode_targets")),
            "{}: {:?}",
            build.label,
            table.origin
        );
        assert_eq!(table.bounds, CodeBounds::Function, "{}", build.label);
        let dwarf = dwarf(&build);
        let from_table = sites_from_table(&image, &table, &opcodes, &detected).unwrap();
        let from_dwarf = sites_from_dwarf(&image, &dwarf, &opcodes).unwrap();
        let addresses = |sites: &[StartSite]| -> Vec<(SiteKind, u64, u64)> {
            sites
                .iter()
                .map(|s| (s.kind, s.handler_vaddr, s.handler_file_offset))
                .collect()
        };
        assert_eq!(
            addresses(&from_table),
            addresses(&from_dwarf),
            "{}: opcode table vs DWARF labels",
            build.label
        );
        for site in &from_table {
            eprintln!("start_sites: {}: {site}", build.label);
        }

        // Every opcode the interpreter names that has a TARGET_ label is
        // dispatched to that label: the whole table is the one the code uses.
        let labels: HashMap<String, u64> =
            dwarf.labels_in(EVAL_FRAME).unwrap().into_iter().collect();
        let mut compared = 0;
        for (name, &opcode) in &interpreter_opmap(&build) {
            let Ok(opcode) = u8::try_from(opcode) else {
                continue; // a pseudo-instruction
            };
            if let Some(&label) = labels.get(&format!("TARGET_{name}")) {
                assert_eq!(
                    table.target(opcode),
                    Some(label),
                    "{}: table[{opcode}] vs TARGET_{name}",
                    build.label
                );
                compared += 1;
            }
        }
        eprintln!(
            "start_sites: {}: {compared} opcodes agree with their TARGET_ labels",
            build.label
        );
        assert!(compared > 100, "{}: only {compared} labels", build.label);
    }
}

#[test]
fn scanning_finds_the_same_table_as_the_symbol_in_pyenv_builds() {
    // pyenv builds are PIE: the table's entries are RELATIVE relocations.
    for &version in PYENV {
        let build = build(&format!("pyenv {version}"));
        let image = image(&build);
        let by_symbol = find_opcode_table(&image).unwrap();
        let by_scan = search_opcode_table(&image, false).unwrap();
        assert_eq!(by_scan.origin, TableOrigin::Scan);
        assert_eq!(by_scan.bounds, CodeBounds::Function, "{}", build.label);
        assert_eq!(by_scan.vaddr, by_symbol.vaddr, "{}", build.label);
        assert_eq!(by_scan.targets, by_symbol.targets, "{}", build.label);
        eprintln!(
            "start_sites: {}: opcode table at {:#x} ({:?}) found again by scanning",
            build.label, by_symbol.vaddr, by_symbol.origin
        );
    }
}

#[test]
fn stripped_debian_builds_have_their_table_found_by_scanning() {
    for label in ["Debian 3.11.2", "Debian sid 3.14.10"] {
        let build = build(label);
        let image = image(&build);
        assert!(
            DwarfInfo::parse(image.data()).unwrap().is_none(),
            "{label} is expected to be stripped"
        );
        let (detected, layout) = version_and_layout(&build, &image);
        let table = find_opcode_table(&image).unwrap();
        assert_eq!(table.origin, TableOrigin::Scan, "{label}");
        assert_eq!(table.bounds, CodeBounds::Function, "{label}");
        let text = text_section(&image);
        assert!(
            table.targets.iter().all(|t| text.contains(t)),
            "{label}: table entries outside .text"
        );
        let sites = find_start_sites(&image, &detected, &layout).unwrap();
        let opcodes = layout.resume_opcodes.expect("3.11+");
        assert_eq!(sites.len(), opcodes.all().count(), "{label}: {sites:?}");
        for site in &sites {
            eprintln!("start_sites: {label}: {site}");
            assert!(text.contains(&site.vaddr), "{label}: {site}");
            assert_eq!(site.source, SiteSource::OpcodeTable { table: table.vaddr });
            assert_eq!(
                image.vaddr_to_file_offset(site.vaddr).unwrap(),
                site.file_offset
            );
        }
    }
    // The address cpython-internals.md §11 measured for 3.11.2-6+deb12u6.
    let debian = image(&build("Debian 3.11.2"));
    if debian.build_id().map(hex) == Some("571d98e01096d5c1c32420d229a6731a0a50d2a0".into()) {
        assert_eq!(find_opcode_table(&debian).unwrap().vaddr, 0x73af00);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_build_has_start_sites() {
    let mut report = Vec::new();
    for build in builds() {
        let image = image(&build);
        let (detected, layout) = version_and_layout(&build, &image);
        let started = Instant::now();
        let sites = find_start_sites(&image, &detected, &layout)
            .unwrap_or_else(|e| panic!("{}: {e}", build.label));
        let took = started.elapsed();
        match layout.resume_opcodes {
            None => {
                let eval = image.symbol(EVAL_FRAME).unwrap();
                assert_eq!(sites.len(), 1, "{}", build.label);
                assert_eq!(sites[0].kind, SiteKind::EvalEntry);
                assert_eq!(sites[0].vaddr, eval.vaddr);
                assert_eq!(sites[0].source, SiteSource::Symbol);
            }
            Some(opcodes) => {
                assert_eq!(sites.len(), opcodes.all().count(), "{}", build.label);
                assert!(
                    sites
                        .iter()
                        .all(|s| matches!(s.source, SiteSource::OpcodeTable { .. })),
                    "{}",
                    build.label
                );
                assert_eq!(
                    sites
                        .iter()
                        .filter(|s| s.kind.only_when_instrumented())
                        .count(),
                    usize::from(opcodes.instrumented.is_some())
                );
            }
        }
        report.push(format!(
            "{:<20} {:>9.2} ms  {}",
            build.label,
            took.as_secs_f64() * 1e3,
            sites
                .iter()
                .map(|s| s.describe())
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    eprintln!("start_sites: find_start_sites per build ({profile} build):");
    for line in report {
        eprintln!("  {line}");
    }
}

#[test]
fn without_a_table_pyenv_falls_back_to_dwarf_labels() {
    // Turn the table's RELATIVE relocations into R_X86_64_NONE: its slots
    // then read as the zeros in the file, so no table is found anywhere.
    let build = build("pyenv 3.12.1");
    let original = image(&build);
    let (detected, layout) = version_and_layout(&build, &original);
    let table = find_opcode_table(&original).unwrap();
    let expected = find_start_sites(&original, &detected, &layout).unwrap();
    let table_bytes = table.vaddr..table.vaddr + OPCODE_TABLE_LEN as u64 * POINTER;

    let mut bytes = original.data().to_vec();
    let rela = original
        .sections()
        .unwrap()
        .into_iter()
        .find(|s| s.name == ".rela.dyn")
        .expect(".rela.dyn");
    // GNU ld also writes the addends in place: clear those too.
    let table_offset = original.vaddr_to_file_offset(table.vaddr).unwrap() as usize;
    bytes[table_offset..table_offset + OPCODE_TABLE_LEN * POINTER as usize].fill(0);
    let mut removed = 0;
    for entry in (rela.offset..rela.offset + rela.size).step_by(24) {
        let at = entry as usize;
        let r_offset = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        if table_bytes.contains(&r_offset) {
            bytes[at + 8..at + 16].fill(0);
            removed += 1;
        }
    }
    assert_eq!(removed, OPCODE_TABLE_LEN);
    let damaged = ElfImage::from_bytes("damaged libpython3.12".into(), bytes).unwrap();
    assert!(matches!(
        find_opcode_table(&damaged),
        Err(StartSitesError::TableNotFound { .. })
    ));
    let sites = find_start_sites(&damaged, &detected, &layout).unwrap();
    assert!(sites.iter().all(|s| s.source == SiteSource::DwarfLabel));
    let addresses = |sites: &[StartSite]| {
        sites
            .iter()
            .map(|s| (s.kind, s.handler_vaddr))
            .collect::<Vec<_>>()
    };
    assert_eq!(addresses(&sites), addresses(&expected));
}

#[test]
fn wrong_opcode_numbers_are_refused() {
    // A number the interpreter does not define, given as RESUME_CHECK.
    let build = build("pyenv 3.13.0");
    let image = image(&build);
    let (detected, layout) = version_and_layout(&build, &image);
    let defined = interpreter_opmap(&build);
    let undefined = (0..=255u8)
        .rev()
        .find(|&n| !defined.values().any(|&d| d == u16::from(n)))
        .expect("3.13 leaves some opcodes undefined");
    let table = find_opcode_table(&image).unwrap();
    let wrong = ResumeOpcodes {
        check: Some(undefined),
        ..layout.resume_opcodes.unwrap()
    };
    let err = sites_from_table(&image, &table, &wrong, &detected).unwrap_err();
    assert!(
        matches!(err, StartSitesError::UndefinedOpcode { opcode, .. } if opcode == undefined),
        "{err}"
    );
    eprintln!("start_sites: {err}");
}

#[test]
fn not_an_interpreter_is_an_error() {
    let exe = std::env::current_exe().unwrap();
    let image = ElfImage::open(&exe).unwrap();
    let version = PythonVersion::from_hex(0x030c01f0);
    let layout = offsets::PY312.layout;
    let err = find_start_sites(&image, &version, &layout).unwrap_err();
    assert!(matches!(err, StartSitesError::NoEvalFrame { .. }), "{err}");
    assert!(err.to_string().contains(EVAL_FRAME), "{err}");
    let layout = offsets::PY310.layout;
    assert!(matches!(
        find_start_sites(&image, &version, &layout),
        Err(StartSitesError::NoEvalFrame { .. })
    ));
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    // Not even ELF.
    assert!(ElfImage::from_bytes("junk".into(), b"\x7fELF junk".to_vec()).is_err());

    // Real interpreters with random bytes written over the structures the
    // search reads: section headers, symbols, relocations, .eh_frame, the
    // data and the function's code.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for label in ["Debian 3.11.2", "Debian sid 3.14.10", "pyenv 3.11.7"] {
        let build = build(label);
        let original = image(&build);
        let (detected, layout) = version_and_layout(&build, &original);
        let eval = original.symbol(EVAL_FRAME).unwrap();
        let eval_offset = original.vaddr_to_file_offset(eval.vaddr).unwrap();
        let mut regions: Vec<(u64, u64)> = original
            .sections()
            .unwrap()
            .into_iter()
            .filter(|s| {
                s.file_backed
                    && s.size > 0
                    && [
                        ".eh_frame",
                        ".rela.dyn",
                        ".rodata",
                        ".data.rel.ro",
                        ".symtab",
                        ".dynsym",
                    ]
                    .contains(&s.name.as_str())
            })
            .map(|s| (s.offset, s.size))
            .collect();
        regions.push((eval_offset, eval.size));
        let table = find_opcode_table(&original).unwrap();
        let table_offset = original.vaddr_to_file_offset(table.vaddr).unwrap();
        regions.push((table_offset, OPCODE_TABLE_LEN as u64 * POINTER));
        let shoff = {
            let d = original.data();
            u64::from_le_bytes(d[0x28..0x30].try_into().unwrap())
        };
        regions.push((shoff, 64 * 40));
        let phoff = {
            let d = original.data();
            u64::from_le_bytes(d[0x20..0x28].try_into().unwrap())
        };
        regions.push((phoff, 56 * 8));
        regions.push((0, 64));

        for round in 0..24 {
            let mut bytes = original.data().to_vec();
            let (offset, size) = regions[round % regions.len()];
            let writes = if round % 3 == 0 { 4096 } else { 64 };
            for _ in 0..writes {
                let at = (offset + next() % size.max(1)) as usize;
                if let Some(b) = bytes.get_mut(at) {
                    *b = next() as u8;
                }
            }
            let Ok(damaged) = ElfImage::from_bytes(format!("damaged {label}").into(), bytes) else {
                *outcomes
                    .entry("not an ELF file any more".into())
                    .or_default() += 1;
                continue;
            };
            // Neither may panic; the DWARF fallback of the pyenv build is
            // skipped (the DWARF test suite covers damaged DWARF).
            let table = find_opcode_table(&damaged);
            let outcome = match (&table, build.origin) {
                (Err(_), Origin::Pyenv) => "table lost".to_string(),
                _ => match find_start_sites(&damaged, &detected, &layout) {
                    Ok(_) => "sites found".to_string(),
                    Err(e) => format!("error: {}", variant(&e)),
                },
            };
            *outcomes.entry(outcome).or_default() += 1;
        }
    }
    eprintln!("start_sites: outcomes on damaged files: {outcomes:?}");
}

fn variant(e: &StartSitesError) -> &'static str {
    match e {
        StartSitesError::Elf(_) => "Elf",
        StartSitesError::NoEvalFrame { .. } => "NoEvalFrame",
        StartSitesError::UnsupportedMachine { .. } => "UnsupportedMachine",
        StartSitesError::TableNotFound { .. } => "TableNotFound",
        StartSitesError::AmbiguousTable { .. } => "AmbiguousTable",
        StartSitesError::UndefinedOpcode { .. } => "UndefinedOpcode",
        StartSitesError::LabelNotFound { .. } => "LabelNotFound",
        StartSitesError::Dwarf { .. } => "Dwarf",
        StartSitesError::NotFound { .. } => "NotFound",
    }
}

#[test]
fn table_symbol_names() {
    for name in ["opcode_targets", "opcode_targets.0", "opcode_targets.17"] {
        assert!(is_table_symbol(name), "{name}");
    }
    for name in [
        "opcode_targets.",
        "opcode_targets.x",
        "opcode_targets_x",
        "xopcode_targets",
    ] {
        assert!(!is_table_symbol(name), "{name}");
    }
}

#[test]
fn branch_decoding() {
    // jmp +0x10 at 0x1000; jne -0x20 at 0x1005; a call (e8) is not a branch.
    let code = [
        0xe9, 0x10, 0, 0, 0, 0x0f, 0x85, 0xe0, 0xff, 0xff, 0xff, 0xe8, 1, 0, 0, 0,
    ];
    let targets = direct_branch_targets(&code, 0x1000);
    assert!(targets.contains(&(0x1005 + 0x10)), "{targets:x?}");
    assert!(targets.contains(&(0x100b - 0x20)), "{targets:x?}");
    assert!(!targets.contains(&(0x1010 + 1)), "{targets:x?}");
    // Truncated instructions at the end are ignored.
    assert!(direct_branch_targets(&[0xe9, 1, 2], 0).is_empty());
    assert!(direct_branch_targets(&[0x0f], 0).is_empty());
}

#[test]
fn catch_all_is_the_most_shared_handler() {
    let mut targets: Vec<u64> = (0..256).collect();
    for t in &mut targets[200..] {
        *t = 7;
    }
    targets[5] = 9;
    targets[6] = 9;
    let table = OpcodeTable {
        vaddr: 0,
        targets,
        origin: TableOrigin::Scan,
        bounds: CodeBounds::Function,
        code: Vec::new(),
    };
    assert_eq!(table.catch_all(), Some(7));
    let unique = OpcodeTable {
        targets: (0..256).collect(),
        ..table
    };
    assert_eq!(unique.catch_all(), None);
}

#[test]
fn function_code_is_the_symbol_plus_its_cold_part() {
    for build in builds() {
        let image = image(&build);
        let eval = image.symbol(EVAL_FRAME).unwrap();
        let code = function_code(&image, &eval);
        let main = eval.vaddr..eval.vaddr + eval.size;
        assert_eq!(code[0], main, "{}", build.label);
        let cold = image
            .symbols_where(|name| name == "_PyEval_EvalFrameDefault.cold")
            .unwrap();
        let expected_parts = match (build.origin, cold.first()) {
            // pyenv 3.11 and 3.12: GCC's .cold part, named in .symtab.
            (Origin::Pyenv, Some(cold)) => {
                assert_eq!(
                    code[1],
                    cold.vaddr..cold.vaddr + cold.size,
                    "{}",
                    build.label
                );
                2
            }
            (Origin::Pyenv, None) => 1,
            // Debian: a cold part without a name, found through .eh_frame.
            (Origin::Debian, _) => 2,
        };
        assert_eq!(code.len(), expected_parts, "{}: {code:x?}", build.label);
        let table = find_opcode_table(&image).unwrap();
        assert!(
            table
                .targets
                .iter()
                .all(|t| code.iter().any(|r| r.contains(t))),
            "{}",
            build.label
        );
        let in_main = table.targets.iter().filter(|t| main.contains(t)).count();
        eprintln!(
            "start_sites: {}: {EVAL_FRAME} code {code:x?}, {in_main} of 256 table entries in \
             the symbol's range",
            build.label
        );
    }
}

#[test]
fn stripped_pie_libraries_still_have_their_table() {
    // Rename the `.symtab` symbols that help (the table's and the cold
    // part's), as if libpython had been stripped: the scan must find the
    // same table through the relocations.
    for &version in PYENV {
        let build = build(&format!("pyenv {version}"));
        let original = image(&build);
        let expected = find_opcode_table(&original).unwrap();
        let mut bytes = original.data().to_vec();
        let strtab = original
            .sections()
            .unwrap()
            .into_iter()
            .find(|s| s.name == ".strtab")
            .expect(".strtab");
        let names = &mut bytes[strtab.offset as usize..(strtab.offset + strtab.size) as usize];
        for hidden in [&b"_PyEval_EvalFrameDefault.cold"[..], b"opcode_targets"] {
            for at in 0..names.len().saturating_sub(hidden.len()) {
                if names[at..].starts_with(hidden) {
                    names[at] = b'X';
                }
            }
        }
        let stripped =
            ElfImage::from_bytes(format!("stripped {}", build.label).into(), bytes).unwrap();
        assert!(stripped.symbols_where(is_table_symbol).unwrap().is_empty());
        let table = find_opcode_table(&stripped).unwrap();
        assert_eq!(table.origin, TableOrigin::Scan, "{}", build.label);
        assert_eq!(table.vaddr, expected.vaddr, "{}", build.label);
        assert_eq!(table.targets, expected.targets, "{}", build.label);
        // The tiny 3.11/3.12 cold parts (4 and 8 bytes; opcode 0 of 3.12
        // is there) are not jumped into at two places by the body, so
        // without their symbol those two builds need the fallback bounds.
        let fallback = matches!(version, "3.11.7" | "3.12.1");
        assert_eq!(
            table.bounds,
            if fallback {
                CodeBounds::ExecutableSections
            } else {
                CodeBounds::Function
            },
            "{}",
            build.label
        );
        eprintln!(
            "start_sites: stripped {}: table at {:#x} found by scanning, bounds {:?}",
            build.label, table.vaddr, table.bounds
        );
        // Probes move as in the unstripped file, except where the code is
        // not all known: then every table entry outside the delimited code
        // keeps them at the handlers' starts.
        let (detected, layout) = version_and_layout(&build, &original);
        let Some(opcodes) = layout.resume_opcodes else {
            continue;
        };
        let sites = sites_from_table(&stripped, &table, &opcodes, &detected).unwrap();
        let unstripped = find_start_sites(&original, &detected, &layout).unwrap();
        let outside = table
            .targets
            .iter()
            .find(|t| !table.code.iter().any(|r| r.contains(t)));
        for (site, expected) in sites.iter().zip(&unstripped) {
            eprintln!("start_sites: stripped {}: {}", build.label, site.describe());
            assert_eq!(site.handler_vaddr, expected.handler_vaddr);
            match outside {
                Some(&entry) => assert_eq!(
                    site.placement,
                    Placement::Start {
                        reason: Unmoved::UnknownCode { entry }
                    },
                    "{}",
                    build.label
                ),
                None => assert_eq!(site, expected, "{}", build.label),
            }
        }
    }
}

/// An independent look at `_PyEval_EvalFrameDefault`'s code: a linear sweep
/// written here with iced-x86, and objdump's disassembly when installed.
struct Disassembly {
    /// Address of every instruction of the sweep.
    starts: BTreeSet<u64>,
    /// Targets of the sweep's direct branches and calls.
    targets: BTreeSet<u64>,
    /// objdump's branch and call targets and instruction text by address,
    /// if objdump ran.
    objdump: Option<(BTreeSet<u64>, BTreeMap<u64, String>)>,
}

fn disassemble(path: &Path, image: &ElfImage, code: &[Range<u64>]) -> Disassembly {
    let mut starts = BTreeSet::new();
    let mut targets = BTreeSet::new();
    for range in code {
        let offset = image.vaddr_to_file_offset(range.start).unwrap();
        let bytes = image
            .bytes_at(offset, (range.end - range.start) as usize)
            .unwrap();
        let mut decoder = Decoder::with_ip(64, bytes, range.start, DecoderOptions::NONE);
        for insn in &mut decoder {
            assert!(
                !insn.is_invalid(),
                "invalid instruction at {:#x}",
                insn.ip()
            );
            starts.insert(insn.ip());
            if matches!(
                insn.flow_control(),
                FlowControl::ConditionalBranch
                    | FlowControl::UnconditionalBranch
                    | FlowControl::Call
            ) && insn.near_branch_target() != 0
            {
                targets.insert(insn.near_branch_target());
            }
        }
    }
    Disassembly {
        starts,
        targets,
        objdump: objdump(path, code),
    }
}

/// objdump's direct branch/call targets in `code`, and its text of each
/// instruction; `None` (with a note) if objdump is not installed.
fn objdump(path: &Path, code: &[Range<u64>]) -> Option<(BTreeSet<u64>, BTreeMap<u64, String>)> {
    let mut targets = BTreeSet::new();
    let mut text = BTreeMap::new();
    for range in code {
        let out = match Command::new("objdump")
            .args([
                "-d",
                "--no-show-raw-insn",
                &format!("--start-address={:#x}", range.start),
                &format!("--stop-address={:#x}", range.end),
            ])
            .arg(path)
            .output()
        {
            Ok(out) if out.status.success() => out,
            other => {
                eprintln!("start_sites: objdump unavailable ({other:?}): cross-check skipped");
                return None;
            }
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some((address, insn)) = line.trim_start().split_once(":\t") else {
                continue;
            };
            let Ok(address) = u64::from_str_radix(address, 16) else {
                continue;
            };
            let mut words = insn.split_whitespace();
            let mnemonic = words.next().unwrap_or_default();
            let operand = words.next().unwrap_or_default();
            if (mnemonic.starts_with('j') || mnemonic.starts_with("call"))
                && let Ok(target) = u64::from_str_radix(operand, 16)
            {
                targets.insert(target);
            }
            text.insert(address, insn.split(" <").next().unwrap_or(insn).to_owned());
        }
    }
    Some((targets, text))
}

/// The opcode whose handler runs at every call once the code is warm: the
/// probe that matters for speed.
fn hot_resume(version: &str) -> &'static str {
    match version {
        v if v.starts_with("3.11.") => "RESUME_QUICK",
        v if v.starts_with("3.12.") => "RESUME",
        _ => "RESUME_CHECK",
    }
}

#[test]
fn resume_probes_move_only_where_safe() {
    let mut report = Vec::new();
    for build in builds() {
        let image = image(&build);
        let (detected, layout) = version_and_layout(&build, &image);
        if layout.resume_opcodes.is_none() {
            continue;
        }
        let sites = find_start_sites(&image, &detected, &layout).unwrap();
        let table = find_opcode_table(&image).unwrap();
        let eval = image.symbol(EVAL_FRAME).unwrap();
        let code = function_code(&image, &eval);
        assert_eq!(code, table.code, "{}", build.label);
        let seen = disassemble(&build.binary, &image, &code);
        // DWARF labels (pyenv builds) are places the code may jump to, too.
        let labels: Vec<u64> = match build.origin {
            Origin::Pyenv => dwarf(&build)
                .labels_in(EVAL_FRAME)
                .unwrap()
                .into_iter()
                .map(|(_, a)| a)
                .collect(),
            Origin::Debian => Vec::new(),
        };
        let text = |address: u64| -> String {
            seen.objdump
                .as_ref()
                .and_then(|(_, text)| text.get(&address).cloned())
                .unwrap_or_default()
        };

        for site in &sites {
            let SiteKind::Resume { name, .. } = site.kind else {
                panic!("{}: {site:?}", build.label);
            };
            let handler = site.handler_vaddr;
            assert!(seen.starts.contains(&handler), "{}: {site}", build.label);
            assert_eq!(
                image.vaddr_to_file_offset(handler).unwrap(),
                site.handler_file_offset
            );
            assert_eq!(
                image.vaddr_to_file_offset(site.vaddr).unwrap(),
                site.file_offset
            );
            let Placement::Moved {
                instruction,
                skipped,
            } = site.placement
            else {
                assert_eq!(site.vaddr, handler, "{}: {site}", build.label);
                let Placement::Start { reason } = site.placement else {
                    unreachable!()
                };
                let why = match reason {
                    Unmoved::BranchTarget { target, site: at } => {
                        let direct = seen.targets.contains(&target);
                        format!(
                            "not moved: {} jumps to {target:#x}, before the {} at {at:#x}",
                            if direct {
                                "a direct branch"
                            } else {
                                "data or code"
                            },
                            text(at)
                        )
                    }
                    other => format!("not moved: {other}"),
                };
                report.push(format!(
                    "{:<20} {:<20} {handler:#10x}  {why}",
                    build.label, name
                ));
                continue;
            };
            // Straight-line from the handler's start to the site.
            let offset = image.vaddr_to_file_offset(handler).unwrap();
            let bytes = image.bytes_at(offset, 16 * (MAX_WALK + 1)).unwrap();
            let mut decoder = Decoder::with_ip(64, bytes, handler, DecoderOptions::NONE);
            let mut insn = Instruction::default();
            let mut before = 0;
            loop {
                decoder.decode_out(&mut insn);
                assert!(!insn.is_invalid(), "{}: {site}", build.label);
                assert!(insn.ip() <= site.vaddr, "{}: {site}: overshot", build.label);
                if insn.ip() == site.vaddr {
                    break;
                }
                assert_eq!(
                    insn.flow_control(),
                    FlowControl::Next,
                    "{}: {site}: control may leave at {:#x}",
                    build.label,
                    insn.ip()
                );
                before += 1;
                assert!(before <= MAX_WALK, "{}: {site}", build.label);
            }
            assert!(before > 0, "{}: {site}", build.label);
            assert_eq!(before, skipped, "{}: {site}", build.label);
            assert!(seen.starts.contains(&site.vaddr), "{}: {site}", build.label);
            // The site's instruction is one the kernel emulates, exactly
            // encoded as branch_setup_xol_ops/push_setup_xol_ops accept it.
            let encoding = &bytes[(site.vaddr - handler) as usize..][..insn.len()];
            let kind = if insn.is_jcc_short_or_near()
                && matches!(encoding, [0x70..=0x7f, _] | [0x0f, 0x80..=0x8f, _, _, _, _])
            {
                Emulated::Jcc
            } else if insn.is_jmp_short_or_near()
                && matches!(encoding, [0xeb, _] | [0xe9, _, _, _, _])
            {
                Emulated::Jmp
            } else if insn.is_call_near() && matches!(encoding, [0xe8, _, _, _, _]) {
                Emulated::Call
            } else if insn.code() == Code::Push_r64 && matches!(encoding, [_] | [0x41, _]) {
                Emulated::Push
            } else {
                panic!(
                    "{}: {site}: {encoding:02x?} is not emulated by the kernel",
                    build.label
                );
            };
            assert_eq!(kind, instruction, "{}: {site}", build.label);
            // Nothing jumps between the handler's start and the site.
            let window = handler + 1..=site.vaddr;
            let mut sources: Vec<(&str, Vec<u64>)> = vec![
                (
                    "direct branch",
                    seen.targets.range(window.clone()).copied().collect(),
                ),
                (
                    "opcode table entry",
                    table
                        .targets
                        .iter()
                        .copied()
                        .filter(|t| window.contains(t))
                        .collect(),
                ),
                (
                    "DWARF label",
                    labels
                        .iter()
                        .copied()
                        .filter(|t| window.contains(t))
                        .collect(),
                ),
            ];
            if let Some((targets, _)) = &seen.objdump {
                sources.push((
                    "objdump branch",
                    targets.range(window.clone()).copied().collect(),
                ));
            }
            for (what, hits) in sources {
                assert!(
                    hits.is_empty(),
                    "{}: {site}: {what} into the skipped instructions: {hits:x?}",
                    build.label
                );
            }
            report.push(format!(
                "{:<20} {:<20} {handler:#10x}  → {:#x} (+{:#x}, {skipped} instructions skipped): \
                 {instruction} `{}`",
                build.label,
                name,
                site.vaddr,
                site.vaddr - handler,
                text(site.vaddr)
            ));
        }
        // The probe that runs at every warm call moved.
        let hot = hot_resume(build.version);
        assert!(
            sites.iter().any(
                |s| matches!(s.kind, SiteKind::Resume { name, .. } if name == hot) && s.moved()
            ),
            "{}: the {hot} probe did not move: {sites:#?}",
            build.label
        );
    }
    eprintln!("start_sites: probe placement (virtual addresses):");
    for line in report {
        eprintln!("  {line}");
    }
}

#[test]
fn emulated_encodings() {
    let cases: &[(&[u8], Option<Emulated>)] = &[
        (&[0x74, 0x05], Some(Emulated::Jcc)),
        (&[0x7f, 0xfe], Some(Emulated::Jcc)),
        (&[0x0f, 0x85, 1, 2, 3, 4], Some(Emulated::Jcc)),
        (&[0xeb, 0x10], Some(Emulated::Jmp)),
        (&[0xe9, 1, 2, 3, 4], Some(Emulated::Jmp)),
        (&[0xe8, 1, 2, 3, 4], Some(Emulated::Call)),
        (&[0x55], Some(Emulated::Push)),
        (&[0x41, 0x57], Some(Emulated::Push)),
        // A 0x66 prefix makes the kernel refuse the probe.
        (&[0x66, 0x74, 0x05], None),
        (&[0x66, 0x0f, 0x85, 1, 2, 3, 4], None),
        // Other REX prefixes on push are single-stepped.
        (&[0x48, 0x55], None),
        (&[0x49, 0x57], None),
        // Indirect jumps and calls, ret, loop, jrcxz, mov.
        (&[0xff, 0xe0], None),
        (&[0xff, 0xd0], None),
        (&[0xc3], None),
        (&[0xe2, 0xfe], None),
        (&[0xe3, 0xfe], None),
        (&[0x48, 0x89, 0xf8], None),
        // Truncated or padded encodings.
        (&[0x0f, 0x85, 1, 2, 3], None),
        (&[0x74], None),
        (&[0x55, 0x90], None),
    ];
    for &(bytes, expected) in cases {
        assert_eq!(Emulated::of(bytes), expected, "{bytes:02x?}");
    }
}

#[test]
fn first_emulated_walks_straight_line_code_only() {
    const BASE: u64 = 0x1000;
    const MOV: [u8; 3] = [0x48, 0x89, 0xf8]; // mov %rdi,%rax
    const ADD: [u8; 4] = [0x48, 0x83, 0xc0, 0x01]; // add $1,%rax
    let code = |parts: &[&[u8]]| parts.concat();
    let walk = |bytes: Vec<u8>| first_emulated(&bytes, BASE, Guard::default());

    assert_eq!(
        walk(code(&[&MOV, &ADD, &[0x74, 0x05]])),
        Ok((BASE + 7, Emulated::Jcc, 2))
    );
    assert_eq!(
        walk(code(&[&MOV, &[0x0f, 0x84, 0, 1, 0, 0]])),
        Ok((BASE + 3, Emulated::Jcc, 1))
    );
    assert_eq!(
        walk(code(&[&MOV, &[0xe9, 0, 0, 0, 0]])),
        Ok((BASE + 3, Emulated::Jmp, 1))
    );
    assert_eq!(
        walk(code(&[&MOV, &[0xe8, 0, 0, 0, 0]])),
        Ok((BASE + 3, Emulated::Call, 1))
    );
    assert_eq!(
        walk(code(&[&MOV, &[0x41, 0x57]])),
        Ok((BASE + 3, Emulated::Push, 1))
    );
    // An exit site stays before stores that may change the current frame:
    // to the stack where it is a local (3.11, 3.12), at its offset in the
    // thread state (3.13+).
    const FRAME_STORE: [u8; 4] = [0x48, 0x89, 0x43, 0x38]; // mov %rax,0x38(%rbx)
    const STACK_STORE: [u8; 5] = [0x48, 0x89, 0x44, 0x24, 0x10]; // mov %rax,0x10(%rsp)
    const TSTATE_STORE: [u8; 4] = [0x48, 0x89, 0x47, 0x48]; // mov %rax,0x48(%rdi)
    let jcc: &[u8] = &[0x74, 0x05];
    let local = Guard {
        slot: Some(CurrentFrameSlot::StackLocal),
        register: None,
    };
    let tstate = Guard {
        slot: Some(CurrentFrameSlot::ThreadState { offset: 0x48 }),
        register: None,
    };
    for guard in [local, tstate] {
        assert_eq!(
            first_emulated(&code(&[&MOV, &FRAME_STORE, jcc]), BASE, guard),
            Ok((BASE + 7, Emulated::Jcc, 2))
        );
    }
    assert_eq!(
        first_emulated(&code(&[&MOV, &STACK_STORE, jcc]), BASE, local),
        Err(Unmoved::Store { at: BASE + 3 })
    );
    assert_eq!(
        first_emulated(&code(&[&MOV, &STACK_STORE, jcc]), BASE, tstate),
        Ok((BASE + 8, Emulated::Jcc, 2))
    );
    assert_eq!(
        first_emulated(&code(&[&TSTATE_STORE, &MOV, jcc]), BASE, tstate),
        Err(Unmoved::Store { at: BASE })
    );
    assert_eq!(
        first_emulated(&code(&[&MOV, &[0x48, 0xab], jcc]), BASE, tstate), // stos
        Err(Unmoved::Store { at: BASE + 3 })
    );
    // Nor past a write of the register the frame is read from.
    let rbx = Guard {
        slot: None,
        register: Some(FrameRegister::Rbx),
    };
    const LOAD_RBX: [u8; 4] = [0x48, 0x8b, 0x5b, 0x08]; // mov 0x8(%rbx),%rbx
    assert_eq!(
        first_emulated(&code(&[&MOV, &LOAD_RBX, jcc]), BASE, rbx),
        Err(Unmoved::Store { at: BASE + 3 })
    );
    assert_eq!(
        first_emulated(&code(&[&MOV, &FRAME_STORE, jcc]), BASE, rbx),
        Ok((BASE + 7, Emulated::Jcc, 2))
    );
    // The first instruction is emulated already.
    assert_eq!(
        walk(code(&[&[0x74, 0x05], &MOV])),
        Err(Unmoved::StartEmulated {
            instruction: Emulated::Jcc
        })
    );
    // Control leaves before an emulated instruction: indirect jump, ret,
    // ud2, a jcc the kernel refuses (0x66 prefix), the end of the code.
    for end in [
        &[0xff, 0xe0][..],
        &[0xc3],
        &[0x0f, 0x0b],
        &[0x66, 0x74, 0x05],
    ] {
        assert_eq!(
            walk(code(&[&MOV, end, &[0x74, 0x05]])),
            Err(Unmoved::BlockEnds { at: BASE + 3 }),
            "{end:02x?}"
        );
    }
    assert_eq!(
        walk(code(&[&MOV, &ADD])),
        Err(Unmoved::BlockEnds { at: BASE + 7 })
    );
    // Bytes that are no instruction.
    assert_eq!(
        walk(code(&[&MOV, &[0x48]])),
        Err(Unmoved::Undecodable { at: BASE + 3 })
    );
    // Too far.
    let far: Vec<&[u8]> = std::iter::repeat_n(&MOV[..], MAX_WALK)
        .chain([&[0x74, 0x05][..]])
        .collect();
    assert_eq!(walk(code(&far)), Err(Unmoved::TooFar));
    let near: Vec<&[u8]> = std::iter::repeat_n(&MOV[..], MAX_WALK - 1)
        .chain([&[0x74, 0x05][..]])
        .collect();
    assert_eq!(
        walk(code(&near)),
        Ok((
            BASE + 3 * (MAX_WALK as u64 - 1),
            Emulated::Jcc,
            MAX_WALK - 1
        ))
    );
}

#[test]
fn branch_targets_after_the_start_up_to_the_site_count() {
    let map = CodeMap {
        parts: Vec::new(),
        starts: Vec::new(),
        targets: vec![0x10, 0x20, 0x30],
    };
    // The handler's own start is a target (the table's entry): fine.
    assert_eq!(map.first_target(0x10, 0x1f), None);
    assert_eq!(map.first_target(0x10, 0x20), Some(0x20));
    assert_eq!(map.first_target(0x0f, 0x10), Some(0x10));
    assert_eq!(map.first_target(0x20, 0x2f), None);
    assert_eq!(map.first_target(0x30, u64::MAX), None);
}

#[test]
fn site_descriptions() {
    let moved = StartSite {
        vaddr: 0x90aa2,
        file_offset: 0x90aa2,
        handler_vaddr: 0x90a87,
        handler_file_offset: 0x90a87,
        kind: SiteKind::Resume {
            opcode: 207,
            name: "RESUME_CHECK",
        },
        source: SiteSource::OpcodeTable { table: 0x4000 },
        placement: Placement::Moved {
            instruction: Emulated::Jcc,
            skipped: 6,
        },
    };
    assert_eq!(moved.describe(), "RESUME_CHECK(207)@0x90a87→0x90aa2(jcc)");
    assert!(moved.to_string().contains("6 instructions in"), "{moved}");
    let kept = StartSite {
        vaddr: 0x90a49,
        handler_vaddr: 0x90a49,
        file_offset: 0x90a49,
        handler_file_offset: 0x90a49,
        placement: Placement::Start {
            reason: Unmoved::BranchTarget {
                target: 0x90a51,
                site: 0x90a5e,
            },
        },
        ..moved
    };
    assert_eq!(
        kept.describe(),
        "RESUME_CHECK(207)@0x90a49(branch target +0x8)"
    );
    assert!(kept.to_string().contains("0x90a51"), "{kept}");
}

#[test]
fn of_two_adjacent_tables_the_dispatch_one_is_taken() {
    // 3.15: the dispatch table, then the JIT tracing table whose entries
    // all lead to one handler.
    let dispatch: Vec<u64> = (0..256).map(|i| 0x1000 + i * 16).collect();
    let tracing = vec![0x9000; 256];
    assert_eq!(
        dispatch_half(&[dispatch.clone(), tracing.clone()].concat()),
        Some(0)
    );
    assert_eq!(
        dispatch_half(&[tracing.clone(), dispatch.clone()].concat()),
        Some(1)
    );
    // Two real-looking tables, or one table: not this case.
    assert_eq!(
        dispatch_half(&[dispatch.clone(), dispatch.clone()].concat()),
        None
    );
    assert_eq!(dispatch_half(&dispatch), None);
}
