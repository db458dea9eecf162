//! Reading CPython from outside the process: versions, per-version offsets,
//! and decoders for the interpreter's data structures.

pub mod attrs;
pub mod dict;
pub mod dwarf;
pub mod linetable;
pub mod memory;
pub mod offsets;
pub mod offsets_dwarf;
pub mod reader;
pub mod threads;
pub mod values;
pub mod version;

#[cfg(test)]
mod replay_tests;

#[cfg(test)]
mod offsets_check;
