//! Finding a process's interpreter: the file that holds the eval loop, and
//! where its code is in the process, on every interpreter.
//!
//! Needs root (run through `cargo xtask test`).

use anyhow::{Context, ensure};
use pyprobe::{
    elf::{ElfImage, SymbolSource},
    process::{self, Linkage},
};
use pyprobe_tests::{Fixture, Origin, for_each_interpreter};

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
