//! What the `call_start` BPF program needs to know about one process, built
//! from the process model: offsets come from [`VersionInfo`] (debug offsets,
//! DWARF or the built-in table), and the program's modes from its layout
//! flags, so the kernel side never sees a version number.

use pyprobe_common::calls::{self, ProcessConfig};

use crate::{
    kabi::{ConfigError, thread_frame, window},
    python::{
        offsets::{FrameModel, GilLocation, InstructionModel, VersionInfo},
        version::PythonVersion,
    },
};

/// Builds the configuration of a process whose `_PyRuntime` is at `runtime`;
/// `read_u64` reads the process's memory (3.12+ need the GIL's address).
pub fn process_config(
    version: &PythonVersion,
    info: &VersionInfo,
    runtime: u64,
    read_u64: impl Fn(u64) -> Option<u64>,
) -> Result<ProcessConfig, ConfigError> {
    let o = &info.offsets;
    let layout = &info.layout;
    let missing = |field| ConfigError::MissingField {
        version: version.to_string(),
        field,
    };
    let (frame_window, frame_window_len, at) =
        window(version, "frame", &[o.frame_code, o.frame_instruction])?;
    let mut c = ProcessConfig {
        frame_window,
        frame_window_len,
        frame_code_at: at[0],
        frame_instruction_at: at[1],
        code_mask: layout.stackref_mask,
        ..ProcessConfig::default()
    };
    let code_fields = [
        o.code_name,
        o.code_firstlineno,
        o.code_firsttraceable.unwrap_or(o.code_firstlineno),
        o.code_qualname.unwrap_or(o.code_name),
        o.code_filename,
    ];
    let (code_window, code_window_len, at) = window(version, "code", &code_fields)?;
    (c.code_window, c.code_window_len) = (code_window, code_window_len);
    (
        c.code_name_at,
        c.code_firstlineno_at,
        c.code_firsttraceable_at,
    ) = (at[0], at[1], at[2]);
    (c.code_qualname_at, c.code_filename_at) = (at[3] as u32, at[4] as u32);
    let (base, len, at) = window(
        version,
        "builtin_function_or_method",
        &[o.cfunction_ml, o.cfunction_self, o.cfunction_module],
    )?;
    (c.cfunction_window, c.cfunction_window_len) = (base, len);
    (
        c.cfunction_ml_at,
        c.cfunction_self_at,
        c.cfunction_module_at,
    ) = (at[0], at[1], at[2]);
    let (base, len, at) = window(
        version,
        "method_descriptor",
        &[o.method_descr_type, o.method_descr_method],
    )?;
    (c.descr_window, c.descr_window_len) = (base, len);
    (c.descr_type_at, c.descr_method_at) = (at[0], at[1]);
    match layout.frame_model {
        FrameModel::FrameObject => {
            // The site is the entry of _PyEval_EvalFrameDefault; the frame
            // is an argument: (f, throwflag) in 3.8, (tstate, f, throwflag)
            // from 3.9.
            c.frame_mode = if layout.instruction == InstructionModel::LastiBytes
                && version.minor_version() == (3, 8)
            {
                calls::FRAME_ARG0
            } else {
                calls::FRAME_ARG1
            };
            c.start_mode = calls::START_LASTI_NEGATIVE;
        }
        FrameModel::Interpreter => {
            c.frame_mode = calls::FRAME_FROM_TSTATE;
            // The word naming the running thread state: 3.8-3.11's
            // `tstate_current`, else the GIL's last holder behind the
            // interpreter's pointer.
            c.thread = thread_frame(o, runtime, &read_u64)?;
            if c.thread.gil_current == 0 && matches!(o.gil, GilLocation::Runtime { .. }) {
                return Err(missing("gilstate.tstate_current"));
            }
            c.start_mode = calls::START_INDEX_FIRST_TRACEABLE;
            c.code_adaptive = o
                .code_code_adaptive
                .ok_or_else(|| missing("co_code_adaptive"))?;
            if o.code_firsttraceable.is_none() {
                return Err(missing("_co_firsttraceable"));
            }
            c.instruction_bias = match layout.instruction {
                // prev_instr points one code unit before the instruction
                // about to run.
                InstructionModel::PrevInstr => 2,
                _ => 0,
            };
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::offsets;

    fn version(minor: u8) -> PythonVersion {
        PythonVersion {
            major: 3,
            minor,
            micro: None,
            hex: None,
        }
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

    #[test]
    fn frame_object_versions_take_the_frame_from_the_eval_arguments() {
        let c = process_config(&version(8), &offsets::PY38, 0x1000, |_| None).unwrap();
        assert_eq!(c.frame_mode, calls::FRAME_ARG0);
        assert_eq!(c.start_mode, calls::START_LASTI_NEGATIVE);
        // f_code at 32 and f_lasti at 104: one window from 32.
        assert_eq!((c.frame_window, c.frame_window_len), (32, 80));
        assert_eq!((c.frame_code_at, c.frame_instruction_at), (0, 72));
        // co_firstlineno at 40, co_name at 112: one window from 40.
        assert_eq!(c.code_window, 40);
        assert_eq!((c.code_name_at, c.code_firstlineno_at), (72, 0));
        // m_ml, m_self, m_module at 16, 24, 32; d_type 16, d_method 40.
        assert_eq!((c.cfunction_window, c.cfunction_window_len), (16, 24));
        assert_eq!(
            (
                c.cfunction_ml_at,
                c.cfunction_self_at,
                c.cfunction_module_at
            ),
            (0, 8, 16)
        );
        assert_eq!((c.descr_window, c.descr_window_len), (16, 32));
        assert_eq!((c.descr_type_at, c.descr_method_at), (0, 24));
        for (minor, info) in [(9, offsets::PY39), (10, offsets::PY310)] {
            let c = process_config(&version(minor), &info, 0x1000, |_| None).unwrap();
            assert_eq!(c.frame_mode, calls::FRAME_ARG1, "3.{minor}");
        }
    }

    #[test]
    fn py311_reads_the_current_tstate_from_the_runtime_and_goes_through_cframe() {
        let c = process_config(&version(11), &offsets::PY311, 0x1000, |_| None).unwrap();
        assert_eq!(c.frame_mode, calls::FRAME_FROM_TSTATE);
        assert_eq!(c.thread.holder_slot(), 0x1000 + 576);
        assert_eq!(
            (c.thread.tstate_frame, c.thread.cframe_current_frame),
            (56, 8)
        );
        assert_eq!(c.instruction_bias, 2);
        assert_eq!(c.code_adaptive, 184);
        // co_firstlineno 72, co_name 120, _co_firsttraceable 168.
        assert_eq!((c.code_window, c.code_window_len), (72, 104));
        assert_eq!(
            (
                c.code_firstlineno_at,
                c.code_name_at,
                c.code_firsttraceable_at
            ),
            (0, 48, 96)
        );
    }

    #[test]
    fn py312_and_later_take_the_gil_holder_at_an_address_read_once() {
        let c = process_config(&version(12), &offsets::PY312, 0x1000, memory).unwrap();
        assert_eq!(c.thread.holder_slot(), 0x9000 + 8);
        assert_eq!(
            (c.thread.tstate_frame, c.thread.cframe_current_frame),
            (56, 0)
        );
        let c = process_config(&version(13), &offsets::PY313, 0x1000, memory).unwrap();
        assert_eq!(
            (c.thread.tstate_frame, c.thread.cframe_current_frame),
            (72, u64::MAX)
        );
        assert_eq!(c.instruction_bias, 0);
        let c = process_config(&version(14), &offsets::PY314, 0x1000, memory).unwrap();
        assert_eq!(c.code_mask, !3);
    }

    #[test]
    fn a_process_whose_gil_is_not_created_yet_is_refused() {
        let e = process_config(&version(12), &offsets::PY312, 0x1000, |_| Some(0)).unwrap_err();
        assert_eq!(e, ConfigError::Unreadable("_PyRuntime.interpreters.head"));
    }

    #[test]
    fn every_known_version_fits_its_windows() {
        let known = [
            (8, offsets::PY38),
            (9, offsets::PY39),
            (10, offsets::PY310),
            (11, offsets::PY311),
            (12, offsets::PY312),
            (13, offsets::PY313),
            (14, offsets::PY314),
        ];
        for (minor, info) in &known {
            process_config(&version(*minor), info, 0x1000, memory)
                .unwrap_or_else(|e| panic!("3.{minor}: {e}"));
        }
    }
}
