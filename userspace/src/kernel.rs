//! Facts about the running kernel that the BPF programs need and cannot
//! find themselves: where `struct task_struct` keeps a task's ids, read
//! from the kernel's BTF (`/sys/kernel/btf/vmlinux`).

use btf_rs::{Btf, Type};

/// Where the kernel's BTF is.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Byte offsets of `pid` and `tgid` in `struct task_struct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct.pid`: the task's (thread's) id.
    pub pid: u32,
    /// `task_struct.tgid`: its process's id.
    pub tgid: u32,
}

impl TaskOffsets {
    /// Reads them from the kernel's BTF (about 150 ms: run it beside
    /// something slower, such as loading the programs).
    pub fn read() -> anyhow::Result<Self> {
        let btf = Btf::from_file(VMLINUX_BTF)
            .map_err(|e| anyhow::anyhow!("cannot read the kernel's BTF ({VMLINUX_BTF}): {e}"))?;
        let mut pid = None;
        let mut tgid = None;
        for ty in btf
            .resolve_types_by_name("task_struct")
            .map_err(|e| anyhow::anyhow!("no struct task_struct in the kernel's BTF: {e}"))?
        {
            let Type::Struct(s) = ty else { continue };
            for member in &s.members {
                let Ok(name) = btf.resolve_name(member) else {
                    continue;
                };
                let at = member.bit_offset();
                match name.as_str() {
                    "pid" if at % 8 == 0 => pid = Some(at / 8),
                    "tgid" if at % 8 == 0 => tgid = Some(at / 8),
                    _ => {}
                }
            }
        }
        match (pid, tgid) {
            (Some(pid), Some(tgid)) => Ok(Self { pid, tgid }),
            _ => anyhow::bail!("struct task_struct in the kernel's BTF has no pid or tgid field"),
        }
    }
}

/// Now on the clock `bpf_ktime_get_ns` reads (`CLOCK_MONOTONIC`),
/// nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(now.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_are_two_adjacent_words() {
        // Where BTF is there (every kernel pyprobe runs on), pid and tgid
        // are declared one after the other.
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("no {VMLINUX_BTF}: skipped");
            return;
        }
        let offsets = TaskOffsets::read().expect("read");
        assert_eq!(offsets.tgid, offsets.pid + 4, "{offsets:?}");
        assert!(offsets.pid > 0);
    }
}
