//! What the `call_start` BPF program needs to know about one process, built
//! from the process model: offsets come from [`VersionInfo`] (debug offsets,
//! DWARF or the built-in table), and the program's modes from its layout
//! flags, so the kernel side never sees a version number.

use pyprobe_common::calls::{self, ProcessConfig};

use crate::{
    kabi::{ConfigError, window},
    python::{
        offsets::{FrameModel, GilLocation, InstructionModel, VersionInfo},
        version::PythonVersion,
    },
};

/// Builds the counter's part of the configuration of a process of
/// `version` (beside its facts, [`crate::kabi::py_process`]).
pub fn process_config(
    version: &PythonVersion,
    info: &VersionInfo,
) -> Result<ProcessConfig, ConfigError> {
    let o = &info.offsets;
    let layout = &info.layout;
    let missing = |field| ConfigError::MissingField {
        version: version.to_string(),
        field,
    };
    let mut c = ProcessConfig::default();
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
            // The word naming the running thread state (the facts'
            // thread): 3.8-3.11's `tstate_current`, else the GIL's last
            // holder behind the interpreter's pointer.
            if o.runtime_tstate_current.is_none() && matches!(o.gil, GilLocation::Runtime { .. }) {
                return Err(missing("gilstate.tstate_current"));
            }
            c.start_mode = calls::START_INDEX_FIRST_TRACEABLE;
            c.code_adaptive = o
                .code_code_adaptive
                .ok_or_else(|| missing("co_code_adaptive"))?;
            if o.code_firsttraceable.is_none() {
                return Err(missing("_co_firsttraceable"));
            }
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

    #[test]
    fn frame_object_versions_take_the_frame_from_the_eval_arguments() {
        let c = process_config(&version(8), &offsets::PY38).unwrap();
        assert_eq!(c.frame_mode, calls::FRAME_ARG0);
        assert_eq!(c.start_mode, calls::START_LASTI_NEGATIVE);
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
            let c = process_config(&version(minor), &info).unwrap();
            assert_eq!(c.frame_mode, calls::FRAME_ARG1, "3.{minor}");
        }
    }

    #[test]
    fn py311_and_later_find_the_frame_from_the_thread_state() {
        let c = process_config(&version(11), &offsets::PY311).unwrap();
        assert_eq!(c.frame_mode, calls::FRAME_FROM_TSTATE);
        assert_eq!(c.start_mode, calls::START_INDEX_FIRST_TRACEABLE);
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
        for (minor, info) in [(12, offsets::PY312), (13, offsets::PY313)] {
            let c = process_config(&version(minor), &info).unwrap();
            assert_eq!(c.frame_mode, calls::FRAME_FROM_TSTATE, "3.{minor}");
        }
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
            process_config(&version(*minor), info).unwrap_or_else(|e| panic!("3.{minor}: {e}"));
        }
    }
}
