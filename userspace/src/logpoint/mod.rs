//! Conditional log points (`pyprobe log`, in progress): where a line or
//! function runs and a condition over its locals holds, print a message
//! with values captured at that moment, without stopping the target or
//! running its code.
//!
//! So far: [`expr`], the language of conditions and message templates,
//! [`eval`], its meaning over values captured at a hit, and [`locate`],
//! which code objects and instruction a location (`app.py:42`,
//! `pkg.mod:Class.method`) means in a live process.

pub mod compile;
pub mod eval;
pub mod expr;
pub mod hit;
pub mod locate;
pub mod session;
