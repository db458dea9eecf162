//! `uprobe_multi` links (Linux 6.6+): one link puts a program on many
//! offsets of one file, each with its cookie, for every process or one.
//! Closing it waits for the kernel's uprobe grace period once, where
//! perf-event uprobes wait once per probe (about 0.1 s each, one after the
//! other): what makes `calls --all` end within a fraction of a second.
//!
//! aya 0.14 can neither load a program for them (the program must be
//! loaded with `expected_attach_type = BPF_TRACE_UPROBE_MULTI`) nor
//! create the link, so both are done here with the `bpf` syscall, from the
//! same embedded object: aya-obj parses it and points its map references
//! at the maps aya already created.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya::{Ebpf, maps::Map};
use aya_obj::generated::{
    BPF_F_UPROBE_MULTI_RETURN, bpf_attach_type::BPF_TRACE_UPROBE_MULTI,
    bpf_prog_type::BPF_PROG_TYPE_KPROBE,
};

/// `BPF_PROG_LOAD`.
const BPF_PROG_LOAD: libc::c_long = 5;
/// `BPF_LINK_CREATE`.
const BPF_LINK_CREATE: libc::c_long = 28;
/// Bytes of `union bpf_attr` passed (the fields used fit; the rest zero).
const ATTR_SIZE: usize = 160;

/// Programs loaded for `uprobe_multi` links, by name.
pub struct MultiPrograms {
    fds: HashMap<&'static str, OwnedFd>,
}

impl MultiPrograms {
    /// Runs of each program, by name (see [`super::ProgramRuns`]).
    pub fn runs(&self) -> Vec<(String, super::ProgramRuns)> {
        self.fds
            .iter()
            .map(|(name, fd)| ((*name).to_owned(), super::ProgramRuns::of(fd.as_fd())))
            .collect()
    }

    /// Loads programs `names` of `object` for `uprobe_multi` links, their
    /// maps being those aya created for `ebpf` from the same object. Fails
    /// on kernels without `uprobe_multi` (before 6.6).
    pub fn load(object: &[u8], ebpf: &Ebpf, names: &[&'static str]) -> io::Result<Self> {
        let mut obj = aya_obj::Object::parse(object).map_err(io::Error::other)?;
        let fds: HashMap<&str, RawFd> = ebpf
            .maps()
            .filter_map(|(name, map)| Some((name, map_fd(map)?)))
            .collect();
        let maps: Vec<(String, RawFd, aya_obj::Map)> = obj
            .maps
            .iter()
            .filter_map(|(name, m)| Some((name.clone(), *fds.get(name.as_str())?, m.clone())))
            .collect();
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        obj.relocate_maps(
            maps.iter().map(|(name, fd, m)| (name.as_str(), *fd, m)),
            &text_sections,
        )
        .map_err(io::Error::other)?;
        obj.relocate_calls(&text_sections)
            .map_err(io::Error::other)?;
        let mut loaded = HashMap::new();
        for &name in names {
            let program = obj
                .programs
                .get(name)
                .ok_or_else(|| io::Error::other(format!("no program {name} in the object")))?;
            let function = obj
                .functions
                .get(&program.function_key())
                .ok_or_else(|| io::Error::other(format!("no code for program {name}")))?;
            let fd = load_program(name, &function.instructions, &program.license)?;
            loaded.insert(name, fd);
        }
        Ok(Self { fds: loaded })
    }

    /// Puts program `name` on `offsets` of the file at `path` (each with
    /// its cookie), in process `pid` only or in every process mapping the
    /// file (`None`); `retprobe`: on return from the functions there.
    pub fn attach(
        &self,
        name: &str,
        path: &Path,
        offsets: &[u64],
        cookies: &[u64],
        pid: Option<u32>,
        retprobe: bool,
    ) -> io::Result<MultiLink> {
        let program = self
            .fds
            .get(name)
            .ok_or_else(|| io::Error::other(format!("program {name} not loaded")))?;
        let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        assert_eq!(offsets.len(), cookies.len(), "one cookie per offset");
        // struct { prog_fd, target_fd, attach_type, flags, uprobe_multi {
        // path, offsets, ref_ctr_offsets, cookies, cnt, flags, pid } }.
        let mut attr = [0u8; ATTR_SIZE];
        put32(&mut attr, 0, program.as_raw_fd() as u32);
        put32(&mut attr, 8, BPF_TRACE_UPROBE_MULTI as u32);
        put64(&mut attr, 16, path.as_ptr() as u64);
        put64(&mut attr, 24, offsets.as_ptr() as u64);
        put64(&mut attr, 40, cookies.as_ptr() as u64);
        put32(&mut attr, 48, offsets.len() as u32);
        put32(
            &mut attr,
            52,
            if retprobe {
                BPF_F_UPROBE_MULTI_RETURN
            } else {
                0
            },
        );
        put32(&mut attr, 56, pid.unwrap_or(0));
        let fd = bpf(BPF_LINK_CREATE, &attr)?;
        Ok(MultiLink { _fd: fd })
    }
}

/// A `uprobe_multi` link: its probes come off when it is dropped.
pub struct MultiLink {
    _fd: OwnedFd,
}

/// The fd of a map aya created.
fn map_fd(map: &Map) -> Option<RawFd> {
    let data = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::RingBuf(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

/// Loads one kprobe-type program for `uprobe_multi` links; the verifier's
/// log is in the error when it refuses.
fn load_program(
    name: &str,
    instructions: &[aya_obj::generated::bpf_insn],
    license: &CString,
) -> io::Result<OwnedFd> {
    let mut log = vec![0u8; 1 << 20];
    let mut attr = [0u8; ATTR_SIZE];
    put32(&mut attr, 0, BPF_PROG_TYPE_KPROBE as u32);
    put32(&mut attr, 4, instructions.len() as u32);
    put64(&mut attr, 8, instructions.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    let short: Vec<u8> = name.bytes().take(15).collect();
    attr[48..48 + short.len()].copy_from_slice(&short);
    put32(&mut attr, 68, BPF_TRACE_UPROBE_MULTI as u32);
    match bpf(BPF_PROG_LOAD, &attr) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            // Again with the verifier's log, to say why.
            put32(&mut attr, 24, 1);
            put32(&mut attr, 28, log.len() as u32);
            put64(&mut attr, 32, log.as_mut_ptr() as u64);
            bpf(BPF_PROG_LOAD, &attr).map_err(|_| {
                let text = String::from_utf8_lossy(&log);
                let text = text.trim_end_matches('\0');
                let tail: Vec<&str> = text.lines().rev().take(3).collect();
                io::Error::new(
                    first.kind(),
                    format!(
                        "{first}; verifier: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ),
                )
            })
        }
    }
}

/// The `bpf` syscall with `attr`; the fd it returns.
fn bpf(cmd: libc::c_long, attr: &[u8; ATTR_SIZE]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` whose pointers
    // outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), ATTR_SIZE as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn put32(attr: &mut [u8], at: usize, value: u32) {
    attr[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put64(attr: &mut [u8], at: usize, value: u64) {
    attr[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}
