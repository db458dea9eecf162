//! Which CPython a binary is, from evidence in the binary itself.
//!
//! - 3.11+: the exported constant `Py_Version` (`PY_VERSION_HEX`), present
//!   even in stripped builds (`.dynsym`).
//! - 3.8-3.10: the minor version from API symbols that appeared in each
//!   release (`PyVectorcall_Call` 3.8, `PyFrame_GetCode` 3.9, `Py_NewRef`
//!   3.10), and the micro version from the `PY_VERSION` string in the
//!   read-only data. The file name is never trusted on its own.

use std::fmt;

use crate::elf::ElfImage;

/// Oldest supported minor version.
pub const OLDEST: (u8, u8) = (3, 8);
/// Newest supported minor version.
pub const NEWEST: (u8, u8) = (3, 15);
/// The supported range, as messages print it.
pub const SUPPORTED: &str = "3.8-3.15";

/// A CPython version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct PythonVersion {
    /// Major version (3).
    pub major: u8,
    /// Minor version.
    pub minor: u8,
    /// Micro version, when the binary says.
    pub micro: Option<u8>,
    /// `PY_VERSION_HEX`, when the binary has it (3.11+).
    pub hex: Option<u32>,
}

impl PythonVersion {
    /// Decodes a `PY_VERSION_HEX` value.
    pub fn from_hex(hex: u32) -> Self {
        PythonVersion {
            major: (hex >> 24) as u8,
            minor: (hex >> 16) as u8,
            micro: Some((hex >> 8) as u8),
            hex: Some(hex),
        }
    }

    /// `(major, minor)`.
    pub fn minor_version(&self) -> (u8, u8) {
        (self.major, self.minor)
    }

    /// Whether pyprobe supports this version.
    pub fn is_supported(&self) -> bool {
        (OLDEST..=NEWEST).contains(&self.minor_version())
    }
}

impl fmt::Display for PythonVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.micro {
            Some(micro) => write!(f, "{}.{}.{}", self.major, self.minor, micro)?,
            None => write!(f, "{}.{}", self.major, self.minor)?,
        }
        if let Some(hex) = self.hex {
            let level = (hex >> 4) & 0xf;
            let serial = hex & 0xf;
            match level {
                0xa => write!(f, "a{serial}")?,
                0xb => write!(f, "b{serial}")?,
                0xc => write!(f, "rc{serial}")?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// Errors from version detection.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    /// No evidence of any supported CPython version.
    #[error(
        "cannot tell the CPython version of {path}: it has none of Py_Version, Py_NewRef, \
         PyFrame_GetCode, PyVectorcall_Call (pyprobe supports CPython {SUPPORTED})"
    )]
    Unknown {
        /// The binary.
        path: String,
    },
    /// A version outside 3.8-3.15.
    #[error("CPython {version} is not supported ({SUPPORTED})")]
    Unsupported {
        /// The version found.
        version: PythonVersion,
    },
    /// A free-threaded (no-GIL) build, whose objects and threads pyprobe
    /// cannot read yet.
    #[error(
        "CPython {version} is a free-threaded (no-GIL) build, which pyprobe does not support yet; \
         use a default (GIL) build"
    )]
    FreeThreaded {
        /// The version found.
        version: PythonVersion,
    },
}

/// Detects the CPython version of an interpreter binary.
pub fn detect(image: &ElfImage) -> Result<PythonVersion, VersionError> {
    let version = if let Some(hex) = read_py_version(image) {
        PythonVersion::from_hex(hex)
    } else {
        let minor = if image.has_symbol("Py_NewRef") {
            10
        } else if image.has_symbol("PyFrame_GetCode") {
            9
        } else if image.has_symbol("PyVectorcall_Call") {
            8
        } else if image.has_symbol("Py_GetVersion") {
            // A CPython older than 3.8: name it if its version string says.
            let old = (0..8)
                .find_map(|minor| find_micro(image.data(), minor).map(|micro| (minor, micro)));
            return Err(match old {
                Some((minor, micro)) => VersionError::Unsupported {
                    version: PythonVersion {
                        major: 3,
                        minor,
                        micro: Some(micro),
                        hex: None,
                    },
                },
                None => VersionError::Unknown {
                    path: image.path().display().to_string(),
                },
            });
        } else {
            return Err(VersionError::Unknown {
                path: image.path().display().to_string(),
            });
        };
        PythonVersion {
            major: 3,
            minor,
            micro: find_micro(image.data(), minor),
            hex: None,
        }
    };
    if version.is_supported() {
        Ok(version)
    } else {
        Err(VersionError::Unsupported { version })
    }
}

fn read_py_version(image: &ElfImage) -> Option<u32> {
    let sym = image.symbol("Py_Version").ok()?;
    let offset = image.vaddr_to_file_offset(sym.vaddr).ok()?;
    let bytes = image.bytes_at(offset, 4)?;
    let hex = u32::from_le_bytes(bytes.try_into().ok()?);
    // Sanity: major 3.
    (hex >> 24 == 3).then_some(hex)
}

/// Finds `3.<minor>.<micro>\0` preceded by a non-digit, non-dot byte: the
/// `PY_VERSION` string (the compiler may have merged it into the tail of a
/// longer string such as a build path, which this still finds).
fn find_micro(data: &[u8], minor: u8) -> Option<u8> {
    let needle = format!("3.{minor}.");
    let needle = needle.as_bytes();
    let mut start = 0;
    while let Some(pos) = find(&data[start..], needle) {
        let at = start + pos;
        start = at + 1;
        if at > 0 && (data[at - 1].is_ascii_digit() || data[at - 1] == b'.') {
            continue;
        }
        let digits_start = at + needle.len();
        let digits: Vec<u8> = data[digits_start..]
            .iter()
            .take(4)
            .copied()
            .take_while(u8::is_ascii_digit)
            .collect();
        if digits.is_empty() || data.get(digits_start + digits.len()) != Some(&0) {
            continue;
        }
        if let Ok(micro) = std::str::from_utf8(&digits).unwrap_or("").parse::<u8>() {
            return Some(micro);
        }
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_version_hex() {
        let v = PythonVersion::from_hex(0x030d00f0);
        assert_eq!((v.major, v.minor, v.micro), (3, 13, Some(0)));
        assert_eq!(v.to_string(), "3.13.0");
        assert_eq!(PythonVersion::from_hex(0x030e00b2).to_string(), "3.14.0b2");
        assert!(PythonVersion::from_hex(0x030e0af0).is_supported());
        assert!(!PythonVersion::from_hex(0x030700f0).is_supported());
        assert!(PythonVersion::from_hex(0x030f02f0).is_supported());
        assert!(!PythonVersion::from_hex(0x031000a1).is_supported());
    }

    #[test]
    fn finds_micro_in_merged_string_tails() {
        assert_eq!(find_micro(b"xx/Python-3.9.18\0yy", 9), Some(18));
        assert_eq!(find_micro(b"\x003.10.13\0", 10), Some(13));
        // Not a version: part of a longer number, or not NUL-terminated.
        assert_eq!(find_micro(b"13.9.1\0 3.9.2x\0", 9), None);
        assert_eq!(find_micro(b"3.9.", 9), None);
    }
}
