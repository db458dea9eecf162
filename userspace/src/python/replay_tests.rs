//! The reader, without root or a live process: replays memory snapshots
//! saved from the `stacks.py` fixture on every interpreter (by `cargo xtask
//! snapshots`) and checks the stacks against what the fixture itself
//! reported through `sys._current_frames()` at that moment. Then mutates the
//! snapshots at random: the reader must return errors or truncated stacks,
//! never panic or loop.

use std::path::PathBuf;

use proptest::prelude::*;

use super::{
    memory::Snapshot,
    reader::{Location, Target},
    values::Bounds,
};

fn snapshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/snapshots")
}

/// (name, snapshot, fixture's own stacks)
fn saved() -> Vec<(String, Snapshot, serde_json::Value)> {
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(snapshot_dir())
        .expect("tests/data/snapshots exists")
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".snapshot.json")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    for name in names {
        let dir = snapshot_dir();
        let snapshot: Snapshot = serde_json::from_slice(
            &std::fs::read(dir.join(format!("{name}.snapshot.json"))).unwrap(),
        )
        .unwrap();
        let frames: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(format!("{name}.frames.json"))).unwrap(),
        )
        .unwrap();
        out.push((name, snapshot, frames));
    }
    out
}

#[test]
fn replayed_stacks_equal_what_python_reported() {
    let saved = saved();
    // pyenv 3.8-3.13, Debian's 3.11 and sid's 3.14: a missing file is a failure.
    assert!(
        saved.len() >= 8,
        "expected snapshots of 8 interpreters, found {}",
        saved.len()
    );
    for (name, snapshot, expected) in saved {
        let target = Target::from_snapshot(snapshot).unwrap_or_else(|e| panic!("{name}: {e}"));
        let threads = target
            .threads(Some(&Bounds::default()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(threads.len(), 4, "{name}");
        for (ident, frames) in expected["threads"].as_object().unwrap() {
            let ident: u64 = ident.parse().unwrap();
            let thread = threads.iter().find(|t| t.thread_id == ident).unwrap();
            let got = thread.locations();
            let want: Vec<Location> = serde_json::from_value(frames.clone()).unwrap();
            assert_eq!(got, want, "{name}, thread {ident:#x}");
        }
        let innermost = threads
            .iter()
            .flat_map(|t| &t.frames)
            .find(|f| f.function == "innermost")
            .unwrap();
        let reprs: Vec<String> = innermost
            .locals
            .iter()
            .map(|l| format!("{}={}", l.name, l.value))
            .collect();
        for want in [
            "small=7",
            "big=1267650600228229401496703205376",
            "neg_big=-1180591620717411303424",
            "ratio=3.25",
            "latin='héllo'",
            "bmp='ü€'",
            "astral='😀x'",
            "raw=b'\\x00ab'",
            "mapping={'a': 1, 'b': [2]}",
            "password=<redacted>",
            "data={'api_key': <redacted>, 'user': 'ann'}",
        ] {
            assert!(
                reprs.iter().any(|r| r == want),
                "{name}: {want} not in {reprs:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random byte flips anywhere in the saved memory: the reader returns
    /// (possibly with errors or truncated stacks) and never panics.
    #[test]
    fn corrupted_memory_never_panics(which in 0usize..7, flips in proptest::collection::vec((any::<u32>(), any::<u8>()), 1..64)) {
        let saved = saved();
        let (_, mut snapshot, _) = saved[which % saved.len()].clone();
        let total: usize = snapshot.size();
        let keys: Vec<u64> = snapshot.regions.keys().copied().collect();
        for (pos, byte) in flips {
            let mut pos = pos as usize % total;
            for k in &keys {
                let region = snapshot.regions.get_mut(k).unwrap();
                if pos < region.len() {
                    region[pos] = byte;
                    break;
                }
                pos -= region.len();
            }
        }
        if let Ok(target) = Target::from_snapshot(snapshot) {
            let _ = target.threads(Some(&Bounds::default()));
        }
    }
}
