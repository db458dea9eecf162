//! Reading CPython from outside the process: versions, per-version offsets,
//! and decoders for the interpreter's data structures.

pub mod dwarf;
pub mod linetable;
