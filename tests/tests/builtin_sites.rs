//! `calls::builtins` against live interpreters: the sites found from live
//! objects are exactly the C functions those objects call through, on every
//! interpreter (with `.symtab`, named by it; stripped, by what must be
//! there), and the labels name them as Python does.
//!
//! Needs root (run through `cargo xtask test`).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use anyhow::{Context, bail, ensure};
use pyprobe::{
    calls::builtins::{
        BuiltinCallable, BuiltinKind, BuiltinTypes, METH_CALL_BITS, METH_FASTCALL, METH_KEYWORDS,
        METH_METHOD, METH_NOARGS, METH_O, METH_VARARGS, builtin_label, find_builtin_callables,
        find_builtin_sites, vectorcall_choices,
    },
    elf::ElfImage,
    process,
    python::{memory::Memory, reader::Target},
};
use pyprobe_tests::{Fixture, Interpreter, Origin, for_each_interpreter};

/// The C function CPython gives an object of `kind` whose `ml_flags` are
/// `flags`; `None` where it has none (a `METH_VARARGS` function: `tp_call`).
fn expected_flavor(kind: BuiltinKind, flags: u32) -> Option<&'static str> {
    const KW: u32 = METH_KEYWORDS;
    Some(match (kind, flags & METH_CALL_BITS) {
        (BuiltinKind::Function, METH_O) => "cfunction_vectorcall_O",
        (BuiltinKind::Function, METH_NOARGS) => "cfunction_vectorcall_NOARGS",
        (BuiltinKind::Function, METH_FASTCALL) => "cfunction_vectorcall_FASTCALL",
        (BuiltinKind::Function, f) if f == METH_FASTCALL | KW => {
            "cfunction_vectorcall_FASTCALL_KEYWORDS"
        }
        (BuiltinKind::Function, f) if f == METH_METHOD | METH_FASTCALL | KW => {
            "cfunction_vectorcall_FASTCALL_KEYWORDS_METHOD"
        }
        (BuiltinKind::MethodDescriptor, METH_O) => "method_vectorcall_O",
        (BuiltinKind::MethodDescriptor, METH_NOARGS) => "method_vectorcall_NOARGS",
        (BuiltinKind::MethodDescriptor, METH_FASTCALL) => "method_vectorcall_FASTCALL",
        (BuiltinKind::MethodDescriptor, f) if f == METH_FASTCALL | KW => {
            "method_vectorcall_FASTCALL_KEYWORDS"
        }
        (BuiltinKind::MethodDescriptor, f) if f == METH_METHOD | METH_FASTCALL | KW => {
            "method_vectorcall_FASTCALL_KEYWORDS_METHOD"
        }
        (BuiltinKind::MethodDescriptor, METH_VARARGS) => "method_vectorcall_VARARGS",
        (BuiltinKind::MethodDescriptor, f) if f == METH_VARARGS | KW => {
            "method_vectorcall_VARARGS_KEYWORDS"
        }
        _ => return None,
    })
}

/// Whether a symbol is one of the C functions builtins are called through.
fn is_call_symbol(name: &str) -> bool {
    name.starts_with("cfunction_vectorcall_")
        || name.starts_with("method_vectorcall_")
        || name == "cfunction_call"
        || name == "PyCFunction_Call"
}

/// A NUL-terminated string of the target.
fn c_string(mem: &impl Memory, addr: u64) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for i in 0..256 {
        match mem.read_u8(addr + i)? {
            0 => return Ok(String::from_utf8(out)?),
            b => out.push(b),
        }
    }
    bail!("no NUL within 256 bytes at {addr:#x}")
}

fn check(interp: &Interpreter) -> anyhow::Result<()> {
    let fixture = Fixture::start(interp, "map_calls.py", &[])?;
    let pid = fixture.pid();
    let (target, image) = Target::attach_with_image(pid, |m| m)?;
    let found = target.interpreter.clone().context("live target")?;
    let bias = found.load_bias;
    let mem = &target.mem;
    let o = &target.info.offsets;

    let started = Instant::now();
    let sites = find_builtin_sites(&target, &image, bias)?;
    let elapsed = started.elapsed();
    let types = BuiltinTypes::from_image(&image, bias)?;
    let callables = find_builtin_callables(&target, &types)?;

    // Sorted, one per address, each at the file offset of its address.
    ensure!(
        sites.windows(2).all(|w| w[0].vaddr < w[1].vaddr),
        "sites not sorted and distinct: {sites:?}"
    );
    let maps = process::read_maps(pid)?;
    let binary = found.binary.to_str().context("path")?;
    let file = ElfImage::open(&found.host_path)?;
    for site in &sites {
        ensure!(
            site.file_offset == image.vaddr_to_file_offset(site.vaddr)?,
            "{site:?}"
        );
        let runtime = site.vaddr + bias;
        // In an executable mapping of the interpreter file, as the kernel
        // sees it (not as pyprobe parsed the ELF headers) ...
        ensure!(
            maps.iter().any(|m| m.path.as_deref() == Some(binary)
                && m.perms.starts_with("r-x")
                && (m.start..m.end).contains(&runtime)),
            "{site:?} is not in an r-x mapping of {binary}"
        );
        // ... and the bytes there are the file's bytes at the offset (an int3
        // of another tracer's uprobe aside).
        let want = file.bytes_at(site.file_offset, 16).context("in file")?;
        let mut live = process::read_memory(pid, runtime, 16)?;
        if live[0] == 0xcc {
            live[0] = want[0];
        }
        ensure!(live == want, "{site:?}: {live:02x?} vs {want:02x?}");
    }
    let site_at = |runtime: u64| sites.iter().find(|s| s.vaddr == runtime.wrapping_sub(bias));

    // `len`: found by what it is, independently of the labels.
    let name_of = |c: &BuiltinCallable| -> anyhow::Result<String> {
        c_string(mem, mem.read_u64(c.method_def + o.method_def_name)?)
    };
    let mut len = None;
    let mut append = None;
    let list_type = bias + image.symbol("PyList_Type")?.vaddr;
    for c in &callables {
        match c.kind {
            BuiltinKind::Function => {
                let module = mem.read_u64(c.object + o.cfunction_module)?;
                if name_of(c)? == "len"
                    && module != 0
                    && target.read_str(module).ok().as_deref() == Some("builtins")
                {
                    ensure!(len.is_none(), "two builtins.len");
                    len = Some((c, module));
                }
            }
            BuiltinKind::MethodDescriptor => {
                if mem.read_u64(c.object + o.method_descr_type)? == list_type
                    && name_of(c)? == "append"
                {
                    ensure!(append.is_none(), "two list.append");
                    append = Some(c);
                }
            }
        }
    }
    let (len, len_module) = len.context("builtins.len not found")?;
    let append = append.context("list.append not found")?;
    ensure!(
        len.flags & METH_CALL_BITS == METH_O,
        "len flags {:#x}",
        len.flags
    );
    ensure!(
        append.flags & METH_CALL_BITS == METH_O,
        "list.append flags {:#x}",
        append.flags
    );
    let len_site = site_at(len.vectorcall).context("no site for len")?;
    let append_site = site_at(append.vectorcall).context("no site for list.append")?;
    ensure!(len_site.kind == BuiltinKind::Function, "{len_site:?}");
    ensure!(
        append_site.kind == BuiltinKind::MethodDescriptor,
        "{append_site:?}"
    );
    ensure!(
        len_site.vaddr != append_site.vaddr,
        "len and list.append share {len_site:?}"
    );
    ensure!(
        builtin_label(&target, BuiltinKind::Function, len.method_def, len_module)?
            == "builtins.len"
    );
    ensure!(
        builtin_label(
            &target,
            BuiltinKind::MethodDescriptor,
            append.method_def,
            list_type
        )? == "list.append"
    );
    ensure!(len.label == "builtins.len" && append.label == "list.append");

    // tp_call of builtin_function_or_method is a site.
    let tp_call = mem.read_u64(types.cfunction + o.type_call)?;
    let call_site = site_at(tp_call).context("no site for tp_call")?;
    ensure!(call_site.kind == BuiltinKind::Function, "{call_site:?}");

    // Every site comes from a found object or tp_call, and the reverse.
    let mut from_objects: BTreeSet<u64> = callables
        .iter()
        .filter(|c| c.vectorcall != 0)
        .map(|c| c.vectorcall - bias)
        .collect();
    from_objects.insert(tp_call - bias);
    if let Some(cmethod) = types.cmethod {
        from_objects.insert(mem.read_u64(cmethod + o.type_call)? - bias);
    }
    // And what a bound method made later may call through.
    let choices = vectorcall_choices(&image)?;
    ensure!(
        (4..=5).contains(&choices.len()),
        "{} vectorcall choices: {choices:x?}",
        choices.len()
    );
    from_objects.extend(&choices);
    let site_vaddrs: BTreeSet<u64> = sites.iter().map(|s| s.vaddr).collect();
    ensure!(
        site_vaddrs == from_objects,
        "sites {site_vaddrs:x?} vs pointers of the objects {from_objects:x?}"
    );
    // A NULL vectorcall only for METH_VARARGS functions.
    for c in &callables {
        ensure!(
            (c.vectorcall == 0) == expected_flavor(c.kind, c.flags).is_none(),
            "{c:?}"
        );
    }

    let with_symtab = image.has_symbol("cfunction_vectorcall_O");
    match interp.origin {
        Origin::Pyenv => ensure!(with_symtab, "pyenv builds keep .symtab"),
        Origin::System | Origin::Private => ensure!(!with_symtab, "Debian builds are stripped"),
    }
    let summary: Vec<String> = if with_symtab {
        let mut names: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        for s in image.symbols_where(is_call_symbol)? {
            names.entry(s.vaddr).or_default().insert(s.name);
        }
        let names_at = |vaddr: u64| names.get(&vaddr).cloned().unwrap_or_default();
        // Every site is one of those functions, of its kind.
        for site in &sites {
            let at = names_at(site.vaddr);
            ensure!(
                !at.is_empty(),
                "{site:?} is no cfunction_/method_vectorcall_ symbol"
            );
            let ok = at.iter().any(|n| match site.kind {
                BuiltinKind::Function => n.starts_with("cfunction_") || n == "PyCFunction_Call",
                BuiltinKind::MethodDescriptor => n.starts_with("method_vectorcall_"),
            });
            ensure!(ok, "{site:?} is {at:?}");
        }
        // Every object calls through the function its flags choose.
        for c in &callables {
            if let Some(want) = expected_flavor(c.kind, c.flags) {
                let at = names_at(c.vectorcall - bias);
                ensure!(
                    at.contains(want),
                    "{} (flags {:#x}) calls through {at:?}, not {want}",
                    c.label,
                    c.flags
                );
            }
        }
        let want_call = if interp.minor() == (3, 8) {
            "PyCFunction_Call"
        } else {
            "cfunction_call"
        };
        ensure!(
            names_at(call_site.vaddr).contains(want_call),
            "tp_call {call_site:?} is {:?}",
            names_at(call_site.vaddr)
        );
        // The choices of PyCMethod_New are exactly the cfunction_vectorcall_
        // functions.
        let vectorcalls: BTreeSet<u64> = names
            .iter()
            .filter(|(_, n)| n.iter().any(|n| n.starts_with("cfunction_vectorcall_")))
            .map(|(&vaddr, _)| vaddr)
            .collect();
        ensure!(
            choices.iter().copied().collect::<BTreeSet<u64>>() == vectorcalls,
            "choices {choices:x?} vs cfunction_vectorcall_ symbols {vectorcalls:x?}"
        );
        ensure!(names_at(len_site.vaddr).contains("cfunction_vectorcall_O"));
        ensure!(names_at(append_site.vaddr).contains("method_vectorcall_O"));
        let all: BTreeSet<String> = names.values().flatten().cloned().collect();
        let used: BTreeSet<String> = sites.iter().flat_map(|s| names_at(s.vaddr)).collect();
        let unused: Vec<&String> = all.difference(&used).collect();
        let mut lines: Vec<String> = sites
            .iter()
            .map(|s| {
                format!(
                    "{} <- {}",
                    names_at(s.vaddr).into_iter().collect::<Vec<_>>().join("="),
                    s.source
                )
            })
            .collect();
        lines.push(format!("symbols no object uses: {unused:?}"));
        lines
    } else {
        sites
            .iter()
            .map(|s| format!("{:#x} {:?} <- {}", s.vaddr, s.kind, s.source))
            .collect()
    };
    eprintln!(
        "{}: {} builtin objects, {} sites in {elapsed:?}:\n  {}",
        interp.label,
        callables.len(),
        sites.len(),
        summary.join("\n  ")
    );
    drop(fixture);
    Ok(())
}

#[test]
fn builtin_sites_are_the_call_functions_of_live_builtins() {
    for_each_interpreter(
        "builtin_sites_are_the_call_functions_of_live_builtins",
        check,
    );
}
