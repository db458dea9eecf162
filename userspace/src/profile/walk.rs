//! A userspace model of the kernel's stack walk (`probe-ebpf/src/sample.rs`),
//! field for field from the same [`PyProcess`], so the configuration of
//! every interpreter can be checked against saved memory without root: the
//! walk must yield the frames the reader finds (`replay` tests below).

use pyprobe_common::{
    process::PyProcess,
    sample::{self, FrameRecord, MAX_FRAMES},
};

use crate::python::memory::Memory;

/// Walks the frames of the thread state at `tstate` as the kernel does:
/// returns the records (innermost first) and the sample flags
/// ([`sample::TRUNCATED`], [`sample::TORN`]).
pub fn walk(mem: &impl Memory, process: &PyProcess, tstate: u64) -> (Vec<FrameRecord>, u32) {
    let mut flags = 0;
    let mut out = Vec::new();
    let t = &process.thread;
    let config = &process.frame;
    let Ok(mut frame) = mem.read_u64(tstate.wrapping_add(t.tstate_frame)) else {
        return (out, sample::TORN);
    };
    if t.cframe_current_frame != u64::MAX && frame != 0 {
        match mem.read_u64(frame.wrapping_add(t.cframe_current_frame)) {
            Ok(f) => frame = f,
            Err(_) => return (out, sample::TORN),
        }
    }
    // The kernel's walk is bounded by MAX_FRAMES records and
    // FRAMES_PER_RUN * (MAX_RUNS + 1) steps; the model bounds steps too.
    let steps = (sample::MAX_RUNS as usize + 1) * sample::FRAMES_PER_RUN as usize;
    for _ in 0..steps {
        if frame == 0 {
            return (out, flags);
        }
        if out.len() >= MAX_FRAMES {
            return (out, flags | sample::TRUNCATED);
        }
        let base = frame.wrapping_add(config.window);
        let field = |at: u64| mem.read_u64(base.wrapping_add(at));
        let Ok(previous) = field(config.previous_at) else {
            return (out, flags | sample::TORN);
        };
        let owner = if config.owner_min > 255 {
            0
        } else {
            match mem.read_u8(base.wrapping_add(config.owner_at)) {
                Ok(b) => u64::from(b),
                Err(_) => return (out, flags | sample::TORN),
            }
        };
        // The kernel reads the whole window at once; the model reads the
        // code and instruction only of frames it keeps (all a snapshot
        // holds).
        if owner < config.owner_min {
            let (Ok(code), Ok(low)) = (
                field(config.code_at),
                mem.read_u32(base.wrapping_add(config.instruction_at)),
            ) else {
                return (out, flags | sample::TORN);
            };
            // Up to 3.10 the instruction is a 4-byte int: the kernel
            // records the next 4 bytes too, which mean nothing there.
            let high = mem
                .read_u32(base.wrapping_add(config.instruction_at + 4))
                .unwrap_or(0);
            out.push(FrameRecord {
                code: code & config.code_mask,
                instruction: u64::from(low) | (u64::from(high) << 32),
            });
        }
        frame = previous;
    }
    flags |= sample::TRUNCATED;
    (out, flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kabi::py_process,
        python::{memory::Snapshot, reader::Target},
    };

    /// For every saved interpreter, the kernel's walk (modelled) names the
    /// same frames at the same lines as the reader, for every thread.
    #[test]
    fn modelled_kernel_walk_matches_the_reader_on_every_snapshot() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/snapshots");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).expect("snapshots").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".snapshot.json") {
                continue;
            }
            let snapshot: Snapshot =
                serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
            let target = Target::from_snapshot(snapshot).unwrap();
            let config = py_process(&target.version, &target.info, target.runtime, |a| {
                target.mem.read_u64(a).ok()
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut threads = 0;
            for interp in target.interpreters().unwrap() {
                for tstate in target.thread_states(interp).unwrap() {
                    let want = target.thread(tstate, false, None).unwrap().locations();
                    let (records, flags) = walk(&target.mem, &config, tstate);
                    assert_eq!(flags, 0, "{name}");
                    let got: Vec<_> = records
                        .iter()
                        .filter_map(|r| target.code_frame(r.code, r.instruction).unwrap())
                        .map(|(f, _)| {
                            crate::python::reader::Location(f.function, f.filename, f.line)
                        })
                        .collect();
                    assert_eq!(got, want, "{name}, thread state {tstate:#x}");
                    assert!(!got.is_empty(), "{name}");
                    threads += 1;
                }
            }
            assert_eq!(threads, 4, "{name}");
            checked += 1;
        }
        assert!(
            checked >= 8,
            "snapshots of 8 interpreters expected, found {checked}"
        );
    }
}
