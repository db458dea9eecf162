//! `pyprobe dump` against live fixtures on every interpreter: the stacks it
//! reads from outside equal what the fixture reports through
//! `sys._current_frames()` while its threads are parked, and locals have
//! exactly the values the fixture holds.
//!
//! Needs root (run through `cargo xtask test`).

use std::process::Command;

use anyhow::{Context, bail, ensure};
use pyprobe::{
    dump::{self, DumpOptions},
    python::{reader::Location, values::Bounds},
};
use pyprobe_tests::{Fixture, Origin, fixture_path, for_each_interpreter, pyprobe_bin};

fn options(pid: u32, locals: bool) -> DumpOptions {
    DumpOptions {
        pid,
        locals,
        json: false,
        bounds: Bounds::default(),
        save_snapshot: None,
    }
}

/// Reprs of the locals of `innermost()` in fixtures/stacks.py.
const INNERMOST_LOCALS: &[(&str, &str)] = &[
    ("depth", "0"),
    ("data", "{'api_key': <redacted>, 'user': 'ann'}"),
    ("small", "7"),
    ("negative", "-3"),
    ("big", "1267650600228229401496703205376"),
    ("neg_big", "-1180591620717411303424"),
    ("ratio", "3.25"),
    ("text", "'plain ascii'"),
    ("latin", "'héllo'"),
    ("bmp", "'ü€'"),
    ("astral", "'😀x'"),
    ("raw", "b'\\x00ab'"),
    ("pair", "(1, 'a')"),
    ("items", "[1, 2, 3]"),
    ("mapping", "{'a': 1, 'b': [2]}"),
    ("nothing", "None"),
    ("yes", "True"),
    ("no", "False"),
    ("password", "<redacted>"),
];

#[test]
fn dump_matches_sys_current_frames_and_locals() {
    for_each_interpreter("dump_matches_sys_current_frames_and_locals", |interp| {
        let mut fixture = Fixture::start(interp, "stacks.py", &[])?;
        let expected: serde_json::Value = serde_json::from_str(&fixture.call("frames", "{")?)?;
        let dump = dump::read(&options(fixture.pid(), true))?;
        // Offsets come from the best source the build has: what the process
        // publishes (3.13+), else DWARF (pyenv), else the built-in table.
        let source = if interp.minor() >= (3, 13) {
            "_Py_DebugOffsets"
        } else if interp.origin == Origin::Pyenv {
            "DWARF"
        } else {
            "built-in table"
        };
        ensure!(dump.offsets == source, "offsets from {}", dump.offsets);
        ensure!(
            dump.threads.len() == 4,
            "expected 4 threads, got {}",
            dump.threads.len()
        );
        ensure!(
            dump.threads.iter().all(|t| !t.thread.holds_gil),
            "every thread is blocked, none holds the GIL"
        );

        // Parked workers: whole stacks, innermost first, names, files, lines.
        let workers = expected["threads"].as_object().context("threads")?;
        ensure!(workers.len() == 3, "{expected}");
        for (ident, frames) in workers {
            let ident: u64 = ident.parse()?;
            let thread = dump
                .threads
                .iter()
                .find(|t| t.thread.thread_id == ident)
                .with_context(|| format!("no thread {ident:#x} in the dump"))?;
            let got = thread.thread.locations();
            let want: Vec<Location> = serde_json::from_value(frames.clone()).context("frames")?;
            ensure!(
                got == want,
                "thread {ident:#x}:\n pyprobe {got:?}\n python  {want:?}"
            );
            ensure!(
                thread.thread.truncated.is_none(),
                "{:?}",
                thread.thread.truncated
            );
        }

        // The main thread waits in the module's readline.
        let main = &dump.threads[0];
        let script = fixture_path("stacks.py");
        ensure!(
            main.thread.frames.len() == 1,
            "main: {:?}",
            main.thread.frames
        );
        let top = &main.thread.frames[0];
        ensure!(top.function == "<module>", "{top:?}");
        ensure!(
            std::path::Path::new(&top.filename) == script,
            "{} vs {}",
            top.filename,
            script.display()
        );
        ensure!(
            top.line.map(i64::from) == expected["main_line"].as_i64(),
            "{top:?} vs {expected}"
        );

        // Locals, exactly.
        let frame = |name: &str| {
            dump.threads
                .iter()
                .flat_map(|t| &t.thread.frames)
                .find(|f| f.function.ends_with(name))
                .with_context(|| format!("no frame {name}"))
        };
        let innermost = frame("innermost")?;
        let reprs: Vec<(String, String)> = innermost
            .locals
            .iter()
            .map(|l| (l.name.clone(), l.value.to_string()))
            .collect();
        for (name, want) in INNERMOST_LOCALS {
            let got = reprs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str());
            ensure!(got == Some(*want), "local {name}: got {got:?}, want {want}");
        }
        let order = reprs.iter().find(|(n, _)| n == "order").context("order")?;
        ensure!(order.1.starts_with("<Order at 0x"), "{order:?}");
        let args: Vec<&str> = innermost
            .locals
            .iter()
            .filter(|l| l.argument)
            .map(|l| l.name.as_str())
            .collect();
        ensure!(args == ["depth", "data"], "{args:?}");

        let depths: Vec<String> = dump
            .threads
            .iter()
            .flat_map(|t| &t.thread.frames)
            .filter(|f| f.function == "recurse")
            .map(|f| f.locals[0].value.to_string())
            .collect();
        let want_depths: Vec<String> = (0..=10).map(|d| d.to_string()).collect();
        ensure!(depths == want_depths, "{depths:?}");

        let generator = frame("gen")?;
        ensure!(
            generator
                .locals
                .iter()
                .any(|l| l.name == "counter" && l.value.to_string() == "41"),
            "{:?}",
            generator.locals
        );
        let key = frame("key")?;
        let key_locals: Vec<(String, String)> = key
            .locals
            .iter()
            .map(|l| (l.name.clone(), l.value.to_string()))
            .collect();
        ensure!(
            key_locals
                == [
                    ("item".to_owned(), "2".to_owned()),
                    ("marker".to_owned(), "'in key'".to_owned())
                ],
            "{key_locals:?}"
        );
        Ok(())
    });
}

#[test]
fn dump_cli_prints_json_and_text() {
    let found = pyprobe_tests::discover();
    let interp = found.supported.last().expect("an interpreter");
    let fixture = Fixture::start(interp, "stacks.py", &[]).unwrap();
    let pid = fixture.pid().to_string();

    let out = Command::new(pyprobe_bin())
        .args(["dump", "--json", "--locals", "--pid", &pid])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["pid"], fixture.pid());
    assert_eq!(doc["threads"].as_array().unwrap().len(), 4);
    let small = doc["threads"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["frames"].as_array().unwrap())
        .filter(|f| f["function"] == "innermost")
        .flat_map(|f| f["locals"].as_array().unwrap())
        .find(|l| l["name"] == "small")
        .cloned()
        .unwrap();
    assert_eq!(
        small["value"],
        serde_json::json!({"type": "int", "value": "7"})
    );

    let out = Command::new(pyprobe_bin())
        .args(["dump", "--pid", &pid])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("Process {pid}: ")), "{text}");
    assert!(text.contains("    innermost ("), "{text}");
    assert!(text.contains("stacks.py:48)"), "{text}");
}

#[test]
fn dump_errors_say_what_to_do() -> anyhow::Result<()> {
    let out = Command::new(pyprobe_bin())
        .args(["dump", "--pid", "99999999"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(1)
        || stderr.lines().count() != 1
        || !stderr.contains("no process with PID 99999999")
    {
        bail!("unexpected: {:?} {stderr}", out.status);
    }
    Ok(())
}

/// Regenerates `userspace/tests/data/snapshots/`: for every interpreter, the
/// memory `pyprobe dump --locals` read from the parked `stacks.py` fixture,
/// and the stacks the fixture itself reported at the same moment. The
/// userspace unit tests replay them without root. Run through
/// `cargo xtask snapshots`.
#[test]
#[ignore = "writes test data; run by `cargo xtask snapshots`"]
fn save_snapshots_for_offline_tests() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../userspace/tests/data/snapshots");
    std::fs::create_dir_all(&dir).unwrap();
    for_each_interpreter("save_snapshots_for_offline_tests", |interp| {
        let mut fixture = Fixture::start(interp, "stacks.py", &[])?;
        let frames = fixture.call("frames", "{")?;
        let slug: String = interp
            .label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .trim_matches('-')
            .replace("--", "-");
        let snapshot = dir.join(format!("{slug}.snapshot.json"));
        dump::read(&DumpOptions {
            save_snapshot: Some(snapshot.clone()),
            ..options(fixture.pid(), true)
        })?;
        std::fs::write(dir.join(format!("{slug}.frames.json")), frames)?;
        eprintln!("wrote {}", snapshot.display());
        Ok(())
    });
}
