//! What the sampling program needs to know about one process, built from
//! the process model (offsets as data; modes from layout flags).

use pyprobe_common::sample::SampleConfig;

use crate::{
    kabi::{ConfigError, thread_frame, window},
    python::{
        offsets::{EntryFrames, VersionInfo},
        version::PythonVersion,
    },
};

/// Builds the sampler's configuration of a process whose `_PyRuntime` is at
/// `runtime`; `read_u64` reads the process's memory (3.12+ keep the GIL
/// behind a pointer).
pub fn sample_config(
    version: &PythonVersion,
    info: &VersionInfo,
    runtime: u64,
    read_u64: impl Fn(u64) -> Option<u64>,
) -> Result<SampleConfig, ConfigError> {
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
        // The instruction word is recorded as 8 bytes.
        o.frame_instruction + 4,
    ];
    if let Some((_, at)) = owner {
        fields.push(at & !3);
    }
    let (frame_window, frame_window_len, at) = window(version, "frame", &fields)?;
    let mut c = SampleConfig {
        frame_window,
        frame_window_len,
        frame_code_at: at[0],
        frame_previous_at: at[1],
        frame_instruction_at: at[2],
        frame_owner_at: 0,
        owner_min: 256,
        code_mask: layout.stackref_mask,
        thread: thread_frame(o, runtime, read_u64)?,
        ..SampleConfig::default()
    };
    if let Some((min, owner_at)) = owner {
        c.frame_owner_at = at[4] + (owner_at & 3);
        c.owner_min = u64::from(min);
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::offsets;

    fn config(minor: u8) -> SampleConfig {
        let version = PythonVersion {
            major: 3,
            minor,
            micro: None,
            hex: None,
        };
        let info = offsets::builtin(&version).expect("built-in table");
        // The GIL pointer (3.12+) reads as 0x5000.
        sample_config(&version, &info, 0x1000, |_| Some(0x5000)).expect("config")
    }

    #[test]
    fn frame_fields_land_in_the_window_per_version() {
        // (minor, window start, code, previous, instruction, owner)
        let expected = [
            (8, 24, 8, 0, 80, 0),
            (9, 24, 8, 0, 80, 0),
            (10, 24, 8, 0, 72, 0),
            (11, 32, 0, 16, 24, 0),
            (12, 0, 0, 8, 56, 70),
            (13, 0, 0, 8, 56, 70),
        ];
        for (minor, start, code, previous, instruction, owner) in expected {
            let c = config(minor);
            assert_eq!(
                (
                    c.frame_window,
                    c.frame_code_at,
                    c.frame_previous_at,
                    c.frame_instruction_at,
                    c.frame_owner_at
                ),
                (start, code, previous, instruction, owner),
                "3.{minor}"
            );
            assert!(c.frame_window_len <= pyprobe_common::calls::WINDOW);
        }
        assert_eq!(config(12).owner_min, 3);
        assert_eq!(config(11).owner_min, 256);
    }

    #[test]
    fn gil_is_found_per_version() {
        assert_eq!(config(8).thread.gil_current, 0x1000 + 1368);
        assert_eq!(config(11).thread.gil_current, 0x1000 + 576);
        let c = config(12);
        assert_eq!(
            (
                c.thread.gil_current,
                c.thread.gil_last_holder,
                c.thread.gil_locked
            ),
            (0, 0x5008, 0x5010)
        );
    }
}
