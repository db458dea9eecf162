//! Facts about the running kernel that the BPF programs need and cannot
//! find themselves: where `struct task_struct` keeps a task's ids, read
//! from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The BTF is read as a stream for the three names and one struct it
//! needs, in the format the kernel documents (`Documentation/bpf/btf.rst`):
//! a crate that parses every type into memory (btf-rs, aya's) held 33 MB
//! for two numbers, most of a command's peak memory.

use std::io::{BufReader, Read, Seek, SeekFrom};

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
    /// Reads them from the kernel's BTF.
    pub fn read() -> anyhow::Result<Self> {
        let file = std::fs::File::open(VMLINUX_BTF)
            .map_err(|e| anyhow::anyhow!("cannot read the kernel's BTF ({VMLINUX_BTF}): {e}"))?;
        Self::from_btf(BufReader::with_capacity(64 << 10, file))
            .map_err(|e| anyhow::anyhow!("the kernel's BTF ({VMLINUX_BTF}): {e}"))
    }

    /// Finds them in a BTF blob.
    pub fn from_btf(mut btf: impl Read + Seek) -> anyhow::Result<Self> {
        let mut header = [0u8; 24];
        btf.read_exact(&mut header)?;
        let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
        anyhow::ensure!(u16_at(&header, 0) == BTF_MAGIC, "not little-endian BTF");
        let hdr_len = u64::from(u32_at(&header, 4));
        let (type_off, type_len) = (
            u64::from(u32_at(&header, 8)),
            u64::from(u32_at(&header, 12)),
        );
        let (str_off, str_len) = (
            u64::from(u32_at(&header, 16)),
            u64::from(u32_at(&header, 20)),
        );

        // The offsets of the three names in the string section.
        let wanted: [&[u8]; 3] = [b"task_struct", b"pid", b"tgid"];
        let mut names = [None::<u32>; 3];
        btf.seek(SeekFrom::Start(hdr_len + str_off))?;
        let mut strings = (&mut btf).take(str_len);
        let mut current = Vec::new();
        let mut at = 0u32;
        let mut byte = [0u8; 1];
        let mut start = 0u32;
        while strings.read(&mut byte)? == 1 {
            if byte[0] == 0 {
                for (slot, name) in names.iter_mut().zip(wanted) {
                    if slot.is_none() && current == name {
                        *slot = Some(start);
                    }
                }
                current.clear();
                start = at + 1;
            } else if current.len() < 16 {
                current.push(byte[0]);
            } else {
                // Longer than any wanted name: only its end matters.
                current.push(0xff);
                current.truncate(16);
            }
            at += 1;
        }
        let [Some(task_struct), Some(pid_name), Some(tgid_name)] = names else {
            anyhow::bail!("no task_struct, pid or tgid among its names");
        };

        // The types, one after another, to the struct named task_struct.
        btf.seek(SeekFrom::Start(hdr_len + type_off))?;
        let mut types = (&mut btf).take(type_len);
        let mut entry = [0u8; 12];
        let skip = |r: &mut dyn Read, n: u64| std::io::copy(&mut r.take(n), &mut std::io::sink());
        while types.read_exact(&mut entry).is_ok() {
            let name = u32_at(&entry, 0);
            let info = u32_at(&entry, 4);
            let vlen = u64::from(info & 0xffff);
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 != 0;
            if kind == KIND_STRUCT && name == task_struct && vlen > 0 {
                let (mut pid, mut tgid) = (None, None);
                let mut member = [0u8; 12];
                for _ in 0..vlen {
                    types.read_exact(&mut member)?;
                    let offset = u32_at(&member, 8);
                    // With kind_flag the low 24 bits are the bit offset.
                    let bits = if kind_flag {
                        offset & 0xff_ffff
                    } else {
                        offset
                    };
                    let slot = match u32_at(&member, 0) {
                        n if n == pid_name => &mut pid,
                        n if n == tgid_name => &mut tgid,
                        _ => continue,
                    };
                    if bits % 8 == 0 {
                        *slot = Some(bits / 8);
                    }
                }
                return match (pid, tgid) {
                    (Some(pid), Some(tgid)) => Ok(Self { pid, tgid }),
                    _ => anyhow::bail!("struct task_struct has no pid or tgid field"),
                };
            }
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                _ => 0,
            };
            skip(&mut types, extra)?;
        }
        anyhow::bail!("no struct task_struct")
    }
}

/// `btf_header.magic`, as a little-endian kernel writes it.
const BTF_MAGIC: u16 = 0xeb9f;
/// BTF kinds whose entry is followed by more than the 12-byte `btf_type`.
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

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

    /// A BTF blob: header, types, strings.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(BTF_MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        let type_len = (types.len() * 4) as u32;
        for v in [24u32, 0, type_len, type_len, strings.len() as u32] {
            out.extend(v.to_le_bytes());
        }
        for v in types {
            out.extend(v.to_le_bytes());
        }
        out.extend(strings);
        out
    }

    #[test]
    fn finds_the_ids_past_other_kinds_and_a_forward_declaration() {
        // Names: 1 "task_struct", 13 "pid", 17 "tgid", 22 "x".
        let strings = b"\0task_struct\0pid\0tgid\0x\0";
        let info = |kind: u32, vlen: u32, flag: bool| (u32::from(flag) << 31) | (kind << 24) | vlen;
        let types = [
            // int x (+4)
            22,
            info(KIND_INT, 0, false),
            4,
            32,
            // enum x { 2 values } (+8 each)
            22,
            info(KIND_ENUM, 2, false),
            4,
            22,
            0,
            22,
            1,
            // a forward declaration of task_struct (kind 7, no members)
            1,
            info(7, 0, false),
            0,
            // union x { one member named pid at bit 0 } (+12)
            22,
            info(KIND_UNION, 1, false),
            4,
            13,
            1,
            0,
            // struct task_struct: x at 0, pid at bit 0x5c0, tgid at
            // bit 0x5e0 with kind_flag (bitfield size 0 in the top byte)
            1,
            info(KIND_STRUCT, 3, true),
            4096,
            22,
            1,
            0,
            13,
            1,
            0x5c0,
            17,
            1,
            0x5e0,
        ];
        let got = TaskOffsets::from_btf(std::io::Cursor::new(blob(&types, strings))).unwrap();
        assert_eq!(
            got,
            TaskOffsets {
                pid: 0xb8,
                tgid: 0xbc
            }
        );
    }

    #[test]
    fn a_blob_without_the_struct_or_not_btf_is_an_error() {
        let strings = b"\0task_struct\0pid\0tgid\0";
        let no_struct = blob(&[1, 7 << 24, 0], strings);
        assert!(TaskOffsets::from_btf(std::io::Cursor::new(no_struct)).is_err());
        assert!(TaskOffsets::from_btf(std::io::Cursor::new(vec![0u8; 40])).is_err());
        assert!(TaskOffsets::from_btf(std::io::Cursor::new(vec![0u8; 3])).is_err());
    }
}
