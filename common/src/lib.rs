//! Types and constants shared by pyprobe's eBPF programs (`probe-ebpf`) and its
//! userspace daemon (`userspace`).
//!
//! Everything here is `#[repr(C)]` and `Copy` so that both sides agree on the
//! byte layout of map keys and values. Userspace enables the `user` feature to
//! get `aya::Pod` impls.
#![no_std]

/// Maximum number of processes the eval-entry counter map can hold at once.
pub const MAX_PROCESSES: u32 = 4096;

/// Indices into the `STATS` per-CPU array: counters of things the BPF side
/// could not do. Userspace sums them over CPUs and shows them, so nothing is
/// lost silently.
pub mod stats {
    /// An eval entry could not be counted because the per-process map was full.
    pub const EVAL_MAP_FULL: u32 = 0;
    /// Number of counters in the `STATS` array.
    pub const COUNT: u32 = 1;
}

/// Names of the maps and programs in the eBPF object, shared so a rename on one
/// side cannot silently break the other.
pub mod names {
    /// Uprobe program counting entries into `_PyEval_EvalFrameDefault`.
    pub const PROG_EVAL_ENTRY: &str = "eval_entry";
    /// Per-CPU hash map: tgid (`u32`) -> entries counted on this CPU (`u64`).
    pub const MAP_EVAL_ENTRIES: &str = "EVAL_ENTRIES";
    /// Per-CPU array of `u64` error counters, indexed by [`super::stats`].
    pub const MAP_STATS: &str = "STATS";
}
