//! What the `call_start` BPF program needs to know about one process, built
//! from the process model: offsets come from [`VersionInfo`] (debug offsets,
//! DWARF or the built-in table), and the program's modes from its layout
//! flags, so the kernel side never sees a version number.

use pyprobe_common::calls::{self, ProcessConfig};

use crate::python::{
    offsets::{FrameLink, FrameModel, GilLocation, InstructionModel, VersionInfo},
    version::PythonVersion,
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
}

/// Builds the configuration of a process whose `_PyRuntime` is at `runtime`.
pub fn process_config(
    version: &PythonVersion,
    info: &VersionInfo,
    runtime: u64,
) -> Result<ProcessConfig, ConfigError> {
    let o = &info.offsets;
    let layout = &info.layout;
    let missing = |field| ConfigError::MissingField {
        version: version.to_string(),
        field,
    };
    let mut c = ProcessConfig {
        runtime,
        frame_code: o.frame_code,
        frame_instruction: o.frame_instruction,
        code_mask: layout.stackref_mask,
        code_firstlineno: o.code_firstlineno,
        code_name: o.code_name,
        cframe_current_frame: u64::MAX,
        ..ProcessConfig::default()
    };
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
            match (o.runtime_tstate_current, o.gil) {
                (Some(current), _) => {
                    c.tstate_mode = calls::TSTATE_RUNTIME_CURRENT;
                    c.runtime_tstate_current = current;
                }
                (
                    None,
                    GilLocation::InterpPointer {
                        pointer,
                        last_holder,
                        ..
                    },
                ) => {
                    c.tstate_mode = calls::TSTATE_GIL_HOLDER;
                    c.runtime_interpreters_head = o.runtime_interpreters_head;
                    c.interp_gil = pointer;
                    c.gil_last_holder = last_holder;
                }
                (None, GilLocation::Runtime { .. }) => {
                    return Err(missing("gilstate.tstate_current"));
                }
            }
            match o.tstate_frame {
                FrameLink::Direct(at) => c.tstate_frame = at,
                FrameLink::ViaCFrame {
                    cframe,
                    current_frame,
                } => {
                    c.tstate_frame = cframe;
                    c.cframe_current_frame = current_frame;
                }
            }
            c.start_mode = calls::START_INDEX_FIRST_TRACEABLE;
            c.code_adaptive = o
                .code_code_adaptive
                .ok_or_else(|| missing("co_code_adaptive"))?;
            c.code_firsttraceable = o
                .code_firsttraceable
                .ok_or_else(|| missing("_co_firsttraceable"))?;
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

    #[test]
    fn frame_object_versions_take_the_frame_from_the_eval_arguments() {
        let c = process_config(&version(8), &offsets::PY38, 0x1000).unwrap();
        assert_eq!(c.frame_mode, calls::FRAME_ARG0);
        assert_eq!(c.start_mode, calls::START_LASTI_NEGATIVE);
        assert_eq!((c.frame_code, c.frame_instruction), (32, 104));
        for (minor, info) in [(9, offsets::PY39), (10, offsets::PY310)] {
            let c = process_config(&version(minor), &info, 0x1000).unwrap();
            assert_eq!(c.frame_mode, calls::FRAME_ARG1, "3.{minor}");
        }
    }

    #[test]
    fn py311_reads_the_current_tstate_from_the_runtime_and_goes_through_cframe() {
        let c = process_config(&version(11), &offsets::PY311, 0x1000).unwrap();
        assert_eq!(c.frame_mode, calls::FRAME_FROM_TSTATE);
        assert_eq!(c.tstate_mode, calls::TSTATE_RUNTIME_CURRENT);
        assert_eq!(c.runtime_tstate_current, 576);
        assert_eq!((c.tstate_frame, c.cframe_current_frame), (56, 8));
        assert_eq!(c.instruction_bias, 2);
        assert_eq!((c.code_adaptive, c.code_firsttraceable), (184, 168));
    }

    #[test]
    fn py312_and_later_take_the_gil_holder() {
        let c = process_config(&version(12), &offsets::PY312, 0x1000).unwrap();
        assert_eq!(c.tstate_mode, calls::TSTATE_GIL_HOLDER);
        assert_eq!((c.interp_gil, c.gil_last_holder), (384, 8));
        assert_eq!((c.tstate_frame, c.cframe_current_frame), (56, 0));
        let c = process_config(&version(13), &offsets::PY313, 0x1000).unwrap();
        assert_eq!((c.tstate_frame, c.cframe_current_frame), (72, u64::MAX));
        assert_eq!(c.instruction_bias, 0);
        let c = process_config(&version(14), &offsets::PY314, 0x1000).unwrap();
        assert_eq!(c.code_mask, !3);
    }
}
