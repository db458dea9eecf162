//! pyprobe: trace live CPython processes from the kernel with eBPF.
//!
//! The library half of the `pyprobe` binary, also used by the integration
//! tests in `tests/`. See `ARCHITECTURE.md` for how an event travels from a
//! uprobe in the target to a line of output.
#![warn(missing_docs)]

pub mod agent;
pub mod bpf;
pub mod calls;
pub mod container;
pub mod dump;
pub mod elf;
pub mod engine;
pub mod errors;
pub mod interp_binary;
pub mod job;
pub mod kabi;
pub mod kernel;
pub mod launch;
pub mod live;
pub mod logpoint;
pub mod privileges;
pub mod process;
pub mod profile;
pub mod python;
pub mod registry;
pub mod screen;
pub mod selection;
pub mod sink;
