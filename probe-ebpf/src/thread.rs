//! The one routine every program uses to find what a thread of a Python
//! process runs: who holds the GIL, and a thread state's current frame,
//! as the process's [`ThreadFrame`] says.

use pyprobe_common::thread::ThreadFrame;

use crate::read;

/// The thread state that runs bytecode (the GIL's holder), if the process
/// names one.
#[inline(always)]
pub fn gil_holder(t: &ThreadFrame) -> Option<u64> {
    let tstate: u64 = read(t.holder_slot())?;
    (tstate != 0).then_some(tstate)
}

/// Whether `tstate` holds the GIL now: `tstate_current` names it (3.8-3.11),
/// or the GIL is locked and it took it last (3.12+).
#[inline(always)]
pub fn holds_gil(tstate: u64, t: &ThreadFrame) -> bool {
    if t.gil_current != 0 {
        return read::<u64>(t.gil_current) == Some(tstate);
    }
    if t.gil_locked == 0 {
        return false;
    }
    read::<u32>(t.gil_locked).is_some_and(|locked| locked != 0)
        && read::<u64>(t.gil_last_holder) == Some(tstate)
}

/// The frame thread state `tstate` runs: `Some(0)` when it runs none,
/// `None` when it could not be read.
#[inline(always)]
pub fn current_frame(tstate: u64, t: &ThreadFrame) -> Option<u64> {
    let at: u64 = read(tstate.wrapping_add(t.tstate_frame))?;
    if t.cframe_current_frame == u64::MAX || at == 0 {
        Some(at)
    } else {
        read(at.wrapping_add(t.cframe_current_frame))
    }
}

/// The frame the thread holding the GIL runs (`None` when none or it
/// could not be read).
#[inline(always)]
pub fn running_frame(t: &ThreadFrame) -> Option<u64> {
    let frame = current_frame(gil_holder(t)?, t)?;
    (frame != 0).then_some(frame)
}
