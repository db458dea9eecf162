//! The first probe, end to end: a uprobe on `_PyEval_EvalFrameDefault` counts
//! exactly the C-to-Python calls a fixture makes, on every interpreter.
//!
//! Needs root (run through `cargo xtask test`).

use anyhow::{Context, ensure};
use pyprobe::{
    bpf::EvalEntryCounter,
    elf::{ElfImage, SymbolSource},
    process::{self, Linkage},
};
use pyprobe_tests::{Fixture, Origin, for_each_interpreter};

/// Windows of calls the fixture makes; 0 proves nothing else is counted.
const WINDOWS: [u64; 4] = [0, 1, 1000, 30_000];

#[test]
fn interpreter_is_found_where_its_elf_headers_say() {
    for_each_interpreter("interpreter_is_found_where_its_elf_headers_say", |interp| {
        let fixture = Fixture::start(interp, "map_calls.py", &[])?;
        let found = process::find_interpreter(fixture.pid())?;
        match interp.origin {
            Origin::Pyenv => {
                ensure!(
                    found.linkage == Linkage::SharedLibrary,
                    "pyenv builds use libpython: {found:?}"
                );
                let name = found
                    .binary
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let (major, minor) = interp.minor();
                ensure!(
                    name == format!("libpython{major}.{minor}.so.1.0"),
                    "unexpected library {name}"
                );
            }
            Origin::System | Origin::Private => {
                ensure!(
                    found.linkage == Linkage::Executable,
                    "Debian links libpython into the executable: {found:?}"
                );
                ensure!(found.binary == interp.binary, "{found:?}");
                // Debian's build is stripped: the symbol must come from .dynsym.
                ensure!(found.eval_frame.source == SymbolSource::Dynsym, "{found:?}");
            }
        }
        // The code bytes at the uprobe's file offset are the bytes the
        // process runs at load_bias + st_value.
        let image = ElfImage::open(&found.host_path)?;
        let file_bytes = image
            .bytes_at(found.eval_frame_offset, 32)
            .context("offset inside the file")?
            .to_vec();
        let mut live =
            process::read_memory(fixture.pid(), found.load_bias + found.eval_frame.vaddr, 32)?;
        // Another tracer's uprobe on this function (e.g. a `pyprobe calls
        // --all` running elsewhere on the machine) shows as an int3 in the
        // first byte of every process mapping the file: compare the rest.
        if live[0] == 0xcc {
            live[0] = file_bytes[0];
        }
        ensure!(
            file_bytes == live,
            "file bytes {file_bytes:02x?} != memory {live:02x?}"
        );
        Ok(())
    });
}

#[test]
fn counts_exactly_the_calls_made_from_c() {
    for_each_interpreter("counts_exactly_the_calls_made_from_c", |interp| {
        let mut fixture = Fixture::start(interp, "map_calls.py", &[])?;
        let target = process::find_interpreter(fixture.pid())?;
        let mut counter = EvalEntryCounter::load()?;
        counter.attach(&target)?;
        for n in WINDOWS {
            let before = counter.count(fixture.pid())?;
            fixture.call(&n.to_string(), &format!("done {n}"))?;
            let after = counter.count(fixture.pid())?;
            ensure!(
                after - before == n,
                "window of {n} calls of f counted {} entries",
                after - before
            );
        }
        let losses = counter.losses()?;
        ensure!(losses.total() == 0, "lost counts: {losses:?}");
        Ok(())
    });
}

#[test]
fn counts_only_the_attached_process() {
    // Two processes of the same interpreter file: only the attached one counts.
    let found = pyprobe_tests::discover();
    let interp = found
        .supported
        .iter()
        .find(|i| i.origin == Origin::System)
        .or(found.supported.first())
        .expect("an interpreter");
    let mut watched = Fixture::start(interp, "map_calls.py", &[]).unwrap();
    let mut other = Fixture::start(interp, "map_calls.py", &[]).unwrap();
    let mut counter = EvalEntryCounter::load().unwrap();
    counter
        .attach(&process::find_interpreter(watched.pid()).unwrap())
        .unwrap();
    other.call("5000", "done 5000").unwrap();
    watched.call("700", "done 700").unwrap();
    let counts = counter.counts().unwrap();
    assert_eq!(counts.get(&watched.pid()), Some(&700), "{counts:?}");
    assert_eq!(counts.get(&other.pid()), None, "{counts:?}");
}
