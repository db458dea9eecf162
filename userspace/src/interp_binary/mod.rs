//! Analysis of the interpreter's machine code: the eval loop's opcode
//! table, where Python functions start and return, which register holds
//! the frame, and where a probe may go. Apart from [`crate::python`],
//! which reads the interpreter's objects in a live process.

pub mod start_sites;
