//! Where the reader gets bytes: a live process (`/proc/PID/mem`) or a saved
//! snapshot of the regions a previous read touched.
//!
//! Everything that decodes CPython structures takes `&impl Memory`, so the
//! frame walker and value decoders are tested without root against
//! snapshots (see `tests/data/snapshots`).

use std::{cell::RefCell, collections::BTreeMap, fs::File, io, os::unix::fs::FileExt};

use serde::{Deserialize, Serialize};

/// A failed read.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The address range is not readable (unmapped, or not in the snapshot).
    #[error("cannot read {len} bytes at {addr:#x}")]
    Unreadable {
        /// Start address.
        addr: u64,
        /// Length asked for.
        len: usize,
    },
    /// The process is gone.
    #[error("the process has exited")]
    Gone,
    /// Opening the process's memory failed.
    #[error("cannot open /proc/{pid}/mem: {source}")]
    Open {
        /// Process.
        pid: u32,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// No memory at all: every read fails. A [`super::reader::Target`] over
/// it keeps what is known of an interpreter build (version, offsets) to be
/// put over other memory later ([`super::reader::Target::over`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMemory;

impl Memory for NoMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        Err(MemoryError::Unreadable {
            addr,
            len: buf.len(),
        })
    }
}

/// A few byte ranges captured from a process (e.g. by a BPF program when
/// it saw them): reads inside one of them succeed, all others fail.
#[derive(Debug, Clone, Copy)]
pub struct Captured<'a> {
    /// (address, bytes there).
    pub regions: &'a [(u64, &'a [u8])],
}

impl Memory for Captured<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        for &(start, bytes) in self.regions {
            if addr >= start {
                let at = (addr - start) as usize;
                if let Some(src) = at.checked_add(buf.len()).and_then(|end| bytes.get(at..end)) {
                    buf.copy_from_slice(src);
                    return Ok(());
                }
            }
        }
        Err(MemoryError::Unreadable {
            addr,
            len: buf.len(),
        })
    }
}

/// A source of target memory.
pub trait Memory {
    /// Fills `buf` with the bytes at `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Reads `len` bytes.
    fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let mut buf = vec![0; len];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    /// Reads a little-endian `u64` (also pointers).
    fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian `i64`.
    fn read_i64(&self, addr: u64) -> Result<i64, MemoryError> {
        Ok(self.read_u64(addr)? as i64)
    }

    /// Reads a little-endian `u32`.
    fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `i32`.
    fn read_i32(&self, addr: u64) -> Result<i32, MemoryError> {
        Ok(self.read_u32(addr)? as i32)
    }

    /// Reads one byte.
    fn read_u8(&self, addr: u64) -> Result<u8, MemoryError> {
        let mut b = [0; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }
}

impl<M: Memory + ?Sized> Memory for &M {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read(addr, buf)
    }
}

/// The memory of a live process, read through `/proc/PID/mem` with `pread`.
/// Reads never stop the process. Clones read through the same open file.
#[derive(Clone)]
pub struct ProcessMemory {
    pid: u32,
    file: std::sync::Arc<File>,
}

impl ProcessMemory {
    /// Opens the memory of `pid`.
    pub fn open(pid: u32) -> Result<Self, MemoryError> {
        let file = File::open(format!("/proc/{pid}/mem"))
            .map_err(|source| MemoryError::Open { pid, source })?;
        Ok(ProcessMemory {
            pid,
            file: std::sync::Arc::new(file),
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Memory for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        match self.file.read_exact_at(buf, addr) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(MemoryError::Gone),
            Err(_) => Err(MemoryError::Unreadable {
                addr,
                len: buf.len(),
            }),
        }
    }
}

/// A saved set of memory regions, with the facts about the process needed
/// to read them again (see [`SnapshotMeta`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// How to interpret the regions.
    pub meta: SnapshotMeta,
    /// Start address -> bytes, stored as hex in JSON.
    #[serde(with = "hex_regions")]
    pub regions: BTreeMap<u64, Vec<u8>>,
}

/// What a reader needs besides memory: the version and the addresses it
/// would otherwise take from the interpreter's ELF file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SnapshotMeta {
    /// `PY_VERSION_HEX`-style version: (major, minor, micro).
    pub version: (u8, u8, Option<u8>),
    /// Runtime address of `_PyRuntime`.
    pub runtime: u64,
    /// Runtime addresses of well-known objects and types, by symbol name.
    pub symbols: BTreeMap<String, u64>,
    /// Free text: what was running when the snapshot was taken.
    pub note: String,
}

impl Snapshot {
    /// Adds bytes read at `addr`, merging with overlapping or adjacent
    /// regions.
    pub fn insert(&mut self, addr: u64, bytes: &[u8]) {
        let mut start = addr;
        let mut data = bytes.to_vec();
        let end = addr + bytes.len() as u64;
        // Absorb every region that overlaps or touches [addr, end).
        let overlapping: Vec<u64> = self
            .regions
            .range(..=end)
            .filter(|(s, d)| **s + d.len() as u64 >= addr)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let old = self.regions.remove(&s).expect("listed");
            let new_start = start.min(s);
            let new_end = (start + data.len() as u64).max(s + old.len() as u64);
            let mut merged = vec![0; (new_end - new_start) as usize];
            let at = (s - new_start) as usize;
            merged[at..at + old.len()].copy_from_slice(&old);
            let at = (start - new_start) as usize;
            merged[at..at + data.len()].copy_from_slice(&data);
            start = new_start;
            data = merged;
        }
        self.regions.insert(start, data);
    }

    /// Total bytes stored.
    pub fn size(&self) -> usize {
        self.regions.values().map(Vec::len).sum()
    }
}

impl Memory for Snapshot {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let unreadable = || MemoryError::Unreadable {
            addr,
            len: buf.len(),
        };
        let (start, data) = self
            .regions
            .range(..=addr)
            .next_back()
            .ok_or_else(unreadable)?;
        let from = (addr - start) as usize;
        let bytes = data.get(from..from + buf.len()).ok_or_else(unreadable)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

/// Wraps a memory source and records every successful read into a
/// [`Snapshot`], so a live read can be replayed later without the process.
pub struct Recorder<M> {
    inner: M,
    snapshot: RefCell<Snapshot>,
}

impl<M: Memory> Recorder<M> {
    /// Starts recording reads of `inner`.
    pub fn new(inner: M) -> Self {
        Recorder {
            inner,
            snapshot: RefCell::new(Snapshot::default()),
        }
    }

    /// The regions recorded so far.
    pub fn into_snapshot(self) -> Snapshot {
        self.snapshot.into_inner()
    }
}

impl<M: Memory> Memory for Recorder<M> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.inner.read(addr, buf)?;
        self.snapshot.borrow_mut().insert(addr, buf);
        Ok(())
    }
}

mod hex_regions {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer, de::Error, ser::SerializeMap};

    pub fn serialize<S: Serializer>(
        regions: &BTreeMap<u64, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(regions.len()))?;
        for (addr, bytes) in regions {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            map.serialize_entry(&format!("{addr:#x}"), &hex)?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u64, Vec<u8>>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (addr, hex) in raw {
            let addr =
                u64::from_str_radix(addr.trim_start_matches("0x"), 16).map_err(D::Error::custom)?;
            if hex.len() % 2 != 0 {
                return Err(D::Error::custom("odd hex length"));
            }
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(D::Error::custom)?;
            out.insert(addr, bytes);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_merges_overlapping_and_adjacent_reads() {
        let mut s = Snapshot::default();
        s.insert(100, &[1, 2, 3, 4]);
        s.insert(104, &[5, 6]); // adjacent
        s.insert(98, &[9, 9, 1]); // overlaps the start
        s.insert(200, &[7]);
        assert_eq!(s.regions.len(), 2);
        assert_eq!(s.regions[&98], vec![9, 9, 1, 2, 3, 4, 5, 6]);
        assert_eq!(s.read_u8(200).unwrap(), 7);
        let mut buf = [0; 3];
        s.read(102, &mut buf).unwrap();
        assert_eq!(buf, [3, 4, 5]);
        assert!(s.read(105, &mut [0; 2]).is_err());
        assert!(s.read(50, &mut [0; 1]).is_err());
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let mut s = Snapshot::default();
        s.meta.version = (3, 12, Some(1));
        s.meta.symbols.insert("_Py_NoneStruct".into(), 0xdead);
        s.insert(0x7f00_0000_1000, &[0, 0xff, 0x10]);
        let json = serde_json::to_string(&s).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn recorder_keeps_what_was_read() {
        let mut src = Snapshot::default();
        src.insert(0x1000, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let rec = Recorder::new(&src);
        assert_eq!(
            rec.read_u32(0x1002).unwrap(),
            u32::from_le_bytes([3, 4, 5, 6])
        );
        let snap = rec.into_snapshot();
        assert_eq!(snap.regions.len(), 1);
        assert_eq!(snap.regions[&0x1002], vec![3, 4, 5, 6]);
    }

    #[test]
    fn reads_own_memory_through_proc() {
        let value: u64 = 0x1122_3344_5566_7788;
        let mem = ProcessMemory::open(std::process::id()).unwrap();
        assert_eq!(mem.read_u64(&value as *const u64 as u64).unwrap(), value);
        assert!(mem.read_u64(0).is_err());
    }
}
