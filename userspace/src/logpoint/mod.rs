//! Conditional log points (`pyprobe log`, in progress): where a line or
//! function runs and a condition over its locals holds, print a message
//! with values captured at that moment, without stopping the target or
//! running its code.
//!
//! So far: [`expr`], the language of conditions and message templates, and
//! [`eval`], its meaning over values captured at a hit.

pub mod eval;
pub mod expr;
