//! Conditional log points (`pyprobe log`): where a line or
//! function runs and a condition over its locals holds, print a message
//! with values captured at that moment, without stopping the target or
//! running its code.
//!
//! The parts, in the order a log point goes through them:
//! - [`probe_file`]: log points read from a file (`--probes`);
//! - [`expr`]: the language of conditions and message templates;
//! - [`locate`]: which code objects and instruction a location
//!   (`app.py:42`, `pkg.mod:Class.method`) means in a live process;
//! - [`compile`]: a condition and template over a code object's locals,
//!   turned into the kernel's capture program and in-kernel tests;
//! - [`session`]: arming watchpoints, waiting for code not loaded yet,
//!   draining hits and printing them;
//! - [`hit`]: captured kernel values decoded;
//! - [`eval`]: the full condition and template over those values.

pub mod compile;
pub mod eval;
pub mod expr;
pub mod hit;
pub mod locate;
pub mod probe_file;
pub mod session;
