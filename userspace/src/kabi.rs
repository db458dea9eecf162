//! What the kernel programs of every feature need to know about a process,
//! read from the process model: how a thread state reaches its frame,
//! where the GIL says who runs, how fields group into one read, and where
//! the interpreter frees code objects (each feature's maps keyed by code
//! address are cleaned there).

use pyprobe_common::{calls, thread::ThreadFrame};

use crate::{
    elf::ElfImage,
    python::{
        memory::Memory,
        offsets::{FrameLink, GilLocation, Offsets},
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
