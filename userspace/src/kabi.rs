//! What the kernel programs of every feature need to know about a process,
//! read from the process model: how a thread state reaches its frame,
//! where the GIL says who runs, how fields group into one read, and where
//! the interpreter frees code objects (each feature's maps keyed by code
//! address are cleaned there).

use pyprobe_common::{
    calls,
    process::{FrameLayout, PyProcess},
    thread::ThreadFrame,
};

use crate::{
    elf::ElfImage,
    python::{
        memory::Memory,
        offsets::{EntryFrames, FrameLink, GilLocation, InstructionModel, Offsets, VersionInfo},
        reader::Target,
        version::PythonVersion,
    },
};

/// Why a process cannot be configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A field the chosen mode needs is missing from the offsets.
    #[error("CPython {version}: the offsets lack {field}, needed to find starting frames")]
    MissingField {
        /// Version of the target.
        version: String,
        /// Name of the field.
        field: &'static str,
    },
    /// The fields the program reads from one object do not fit in one
    /// window (a layout this program was not built for).
    #[error("CPython {version}: {object} fields {offsets:?} do not fit in one {window}-byte read")]
    Window {
        /// Version of the target.
        version: String,
        /// "frame" or "code".
        object: &'static str,
        /// The offsets.
        offsets: Vec<u64>,
        /// [`calls::WINDOW`].
        window: u64,
    },
    /// The process's memory could not be read where its running thread is
    /// published (e.g. the GIL not created yet: the process is starting).
    #[error("cannot read where the running thread is published ({0}); is the process starting?")]
    Unreadable(&'static str),
}

/// A window of an object: where it starts, how long it is (to the end of
/// the last field, read as 8 bytes), and where each field is in it.
pub fn window(
    version: &PythonVersion,
    object: &'static str,
    offsets: &[u64],
) -> Result<(u64, u64, Vec<u64>), ConfigError> {
    let base = offsets.iter().copied().min().unwrap_or(0) & !7;
    let at: Vec<u64> = offsets.iter().map(|o| o - base).collect();
    if at.iter().any(|&a| a > calls::WINDOW - 8 || a % 4 != 0) {
        return Err(ConfigError::Window {
            version: version.to_string(),
            object,
            offsets: offsets.to_vec(),
            window: calls::WINDOW,
        });
    }
    let len = at.iter().max().map_or(8, |a| a + 8);
    Ok((base, len, at))
}

/// How every program reads a frame of `version`: code, instruction,
/// previous frame and owner in one window.
pub fn frame_layout(
    version: &PythonVersion,
    info: &VersionInfo,
) -> Result<FrameLayout, ConfigError> {
    let o = &info.offsets;
    let layout = &info.layout;
    let owner = match (layout.entry_frames, o.frame_owner) {
        (EntryFrames::OwnerAtLeast(min), Some(at)) => Some((min, at)),
        (EntryFrames::OwnerAtLeast(_), None) => {
            return Err(ConfigError::MissingField {
                version: version.to_string(),
                field: "_PyInterpreterFrame.owner",
            });
        }
        (EntryFrames::None, _) => None,
    };
    let mut fields = vec![
        o.frame_code,
        o.frame_previous,
        o.frame_instruction,
        // The instruction word is read as 8 bytes.
        o.frame_instruction + 4,
    ];
    if let Some((_, at)) = owner {
        fields.push(at & !3);
    }
    let (window, window_len, at) = self::window(version, "frame", &fields)?;
    let mut f = FrameLayout {
        window,
        window_len,
        code_at: at[0],
        previous_at: at[1],
        instruction_at: at[2],
        owner_at: 0,
        owner_min: 256,
        code_mask: layout.stackref_mask,
        // prev_instr points one code unit before the instruction about to
        // run.
        instruction_bias: if layout.instruction == InstructionModel::PrevInstr {
            2
        } else {
            0
        },
    };
    if let Some((min, owner_at)) = owner {
        f.owner_at = at[4] + (owner_at & 3);
        f.owner_min = u64::from(min);
    }
    Ok(f)
}

/// What every program needs to know of a process of `version` whose
/// `_PyRuntime` is at `runtime` (see [`PyProcess`]); `read_u64` reads the
/// process (3.12+ keep the GIL behind a pointer). Its code epoch is 0:
/// the loaded object gives it one when it takes it.
pub fn py_process(
    version: &PythonVersion,
    info: &VersionInfo,
    runtime: u64,
    read_u64: impl Fn(u64) -> Option<u64>,
) -> Result<PyProcess, ConfigError> {
    Ok(PyProcess {
        thread: thread_frame(&info.offsets, runtime, read_u64)?,
        frame: frame_layout(version, info)?,
        code_epoch: 0,
    })
}

/// The address of the main interpreter's GIL structure (3.12+: behind the
/// pointer at `pointer` in the interpreter state). It is created once, at
/// start-up, and never moves, so it is read here rather than in the kernel
/// on every event.
pub fn main_gil(
    o: &Offsets,
    runtime: u64,
    pointer: u64,
    read_u64: impl Fn(u64) -> Option<u64>,
) -> Result<u64, ConfigError> {
    let interp = read_u64(runtime.wrapping_add(o.runtime_interpreters_head))
        .filter(|&a| a != 0)
        .ok_or(ConfigError::Unreadable("_PyRuntime.interpreters.head"))?;
    read_u64(interp.wrapping_add(pointer))
        .filter(|&a| a != 0)
        .ok_or(ConfigError::Unreadable("interp->ceval.gil"))
}

/// How any BPF program finds what a thread of the process whose
/// `_PyRuntime` is at `runtime` runs: where the GIL says who holds it
/// (0 where the version has no such field) and how a thread state reaches
/// its current frame. `read_u64` reads the process (3.12+ keep the GIL
/// behind a pointer).
pub fn thread_frame(
    o: &Offsets,
    runtime: u64,
    read_u64: impl Fn(u64) -> Option<u64>,
) -> Result<ThreadFrame, ConfigError> {
    let (tstate_frame, cframe_current_frame) = match o.tstate_frame {
        FrameLink::Direct(at) => (at, u64::MAX),
        FrameLink::ViaCFrame {
            cframe,
            current_frame,
        } => (cframe, current_frame),
    };
    let mut t = ThreadFrame {
        tstate_frame,
        cframe_current_frame,
        ..ThreadFrame::default()
    };
    if let Some(current) = o.runtime_tstate_current {
        t.gil_current = runtime.wrapping_add(current);
    }
    match o.gil {
        GilLocation::InterpPointer {
            pointer,
            last_holder,
            locked,
        } if o.runtime_tstate_current.is_none() => {
            let gil = main_gil(o, runtime, pointer, &read_u64)?;
            t.gil_last_holder = gil.wrapping_add(last_holder);
            t.gil_locked = gil.wrapping_add(locked);
        }
        GilLocation::Runtime {
            last_holder,
            locked,
        } if o.runtime_tstate_current.is_none() => {
            t.gil_last_holder = runtime.wrapping_add(last_holder);
            t.gil_locked = runtime.wrapping_add(locked);
        }
        _ => {}
    }
    Ok(t)
}

/// Offset of `tp_dealloc` in `PyTypeObject`, every supported version.
const TP_DEALLOC: u64 = 48;

/// File offset in `image` of the code object type's `tp_dealloc`
/// (`code_dealloc`, a local symbol, so found from the live type object
/// `PyCode_Type`, which every build exports), past any `endbr64`. `None`
/// (logged) when it cannot be found: then every call reads its code
/// object.
pub fn code_dealloc_site<M: Memory>(
    target: &Target<M>,
    image: &ElfImage,
    load_bias: u64,
) -> Option<u64> {
    let found = || -> anyhow::Result<u64> {
        let ty = load_bias.wrapping_add(image.symbol("PyCode_Type")?.vaddr);
        let pointer = target.mem.read_u64(ty + TP_DEALLOC)?;
        let vaddr = pointer.wrapping_sub(load_bias);
        if !image
            .executable_ranges()?
            .iter()
            .any(|r| r.contains(&vaddr))
        {
            anyhow::bail!("PyCode_Type.tp_dealloc {pointer:#x} is not in the interpreter's code");
        }
        Ok(image.past_endbr64(image.vaddr_to_file_offset(vaddr)?))
    };
    found()
        .inspect_err(|e| {
            log::info!(
                "code objects freed are not watched ({}); every call reads its code object",
                crate::errors::one_line(e.as_ref())
            )
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::offsets;

    /// The facts of a 3.`minor` process whose `_PyRuntime` is at 0x1000,
    /// its memory read by `read_u64`.
    fn facts(minor: u8, read_u64: impl Fn(u64) -> Option<u64>) -> Result<PyProcess, ConfigError> {
        let version = PythonVersion {
            major: 3,
            minor,
            micro: None,
            hex: None,
        };
        let info = offsets::builtin(&version).expect("built-in table");
        py_process(&version, &info, 0x1000, read_u64)
    }

    fn process(minor: u8) -> PyProcess {
        // The GIL pointer (3.12+) reads as 0x5000.
        facts(minor, |_| Some(0x5000)).expect("facts")
    }

    #[test]
    fn frame_fields_land_in_the_window_per_version() {
        // (minor, window start, code, previous, instruction, owner, bias)
        let expected = [
            (8, 24, 8, 0, 80, 0, 0),
            (9, 24, 8, 0, 80, 0, 0),
            (10, 24, 8, 0, 72, 0, 0),
            (11, 32, 0, 16, 24, 0, 2),
            (12, 0, 0, 8, 56, 70, 2),
            (13, 0, 0, 8, 56, 70, 0),
        ];
        for (minor, start, code, previous, instruction, owner, bias) in expected {
            let f = process(minor).frame;
            assert_eq!(
                (
                    f.window,
                    f.code_at,
                    f.previous_at,
                    f.instruction_at,
                    f.owner_at,
                    f.instruction_bias
                ),
                (start, code, previous, instruction, owner, bias),
                "3.{minor}"
            );
            assert!(f.window_len <= calls::WINDOW);
            assert_eq!(
                (f.code(), f.instruction(), f.previous()),
                (start + code, start + instruction, start + previous),
                "3.{minor}"
            );
        }
        assert_eq!(process(12).frame.owner_min, 3);
        assert_eq!(process(11).frame.owner_min, 256);
        assert_eq!(process(14).frame.code_mask, !3);
        assert_eq!(process(13).frame.code_mask, !0);
    }

    /// Memory of a 3.12+ process: every word of `_PyRuntime` (at 0x1000)
    /// points at the interpreter 0x5000, every word of which points at the
    /// GIL structure 0x9000.
    fn memory(addr: u64) -> Option<u64> {
        match addr {
            0x1000..0x2000 => Some(0x5000),
            0x5000..0x6000 => Some(0x9000),
            _ => None,
        }
    }

    fn thread(
        minor: u8,
        read_u64: impl Fn(u64) -> Option<u64>,
    ) -> Result<ThreadFrame, ConfigError> {
        facts(minor, read_u64).map(|p| p.thread)
    }

    #[test]
    fn the_running_thread_and_its_frame_are_found_per_version() {
        // 3.11: `tstate_current` in the runtime, the frame through cframe.
        let t = thread(11, |_| None).unwrap();
        assert_eq!(t.holder_slot(), 0x1000 + 576);
        assert_eq!((t.tstate_frame, t.cframe_current_frame), (56, 8));
        // 3.12+: the GIL's last holder, at an address read once.
        let t = thread(12, memory).unwrap();
        assert_eq!(t.holder_slot(), 0x9000 + 8);
        assert_eq!((t.tstate_frame, t.cframe_current_frame), (56, 0));
        let t = thread(13, memory).unwrap();
        assert_eq!((t.tstate_frame, t.cframe_current_frame), (72, u64::MAX));
        // A process whose GIL is not created yet is refused.
        assert_eq!(
            thread(12, |_| Some(0)).unwrap_err(),
            ConfigError::Unreadable("_PyRuntime.interpreters.head")
        );
    }

    #[test]
    fn gil_is_found_per_version() {
        assert_eq!(process(8).thread.gil_current, 0x1000 + 1368);
        assert_eq!(process(11).thread.gil_current, 0x1000 + 576);
        let t = process(12).thread;
        assert_eq!(
            (t.gil_current, t.gil_last_holder, t.gil_locked),
            (0, 0x5008, 0x5010)
        );
    }
}
