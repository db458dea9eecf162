//! `code_freed` probes: which processes freed code objects, so names
//! and armed log points are read again only then.

use std::os::fd::AsFd;

use aya::{Ebpf, programs::uprobe::UProbeScope};
use pyprobe_common::names;

use super::{BpfError, perf_event_with_program, uprobe_mut};
use crate::process::Interpreter;

/// Attaches the loaded `code_freed` uprobe at `file_offset` of `interp`
/// (the code type's `tp_dealloc`) for process `pid`.
/// `code_freed` on the code type's deallocator in process `pid`, as a
/// [`QuietUprobe`].
fn attach_code_freed(
    ebpf: &mut Ebpf,
    interp: &Interpreter,
    file_offset: u64,
    pid: u32,
) -> Result<QuietUprobe, BpfError> {
    let attach_error = |source: std::io::Error| BpfError::Attach {
        target: interp.host_path.display().to_string(),
        pid,
        offset: file_offset,
        source: aya::programs::ProgramError::IOError(source),
    };
    let program = uprobe_mut(ebpf, names::PROG_CODE_FREED)?;
    let fd = program.fd().map_err(|source| BpfError::Program {
        name: names::PROG_CODE_FREED,
        source,
    })?;
    QuietUprobe::attach(fd.as_fd(), &interp.host_path, file_offset, pid).map_err(attach_error)
}

/// The `code_freed` probes of one loaded object: one per process
/// ([`QuietUprobe`]s: the other processes of the file never trap), or one
/// per interpreter file for every process that maps it (under plain
/// `--all`: set-up and detach cost no longer grow with the processes, and
/// a process started later is covered from its first free).
#[derive(Default)]
pub struct CodeFrees {
    /// Per-process probes.
    per_process: std::collections::HashMap<u32, QuietUprobe>,
    /// Files probed for every process.
    files: std::collections::HashSet<crate::process::FileId>,
}

impl CodeFrees {
    /// Watches the frees of `pid` (of every process of its file with
    /// `whole_file`).
    pub(super) fn watch(
        &mut self,
        ebpf: &mut Ebpf,
        interp: &Interpreter,
        file_offset: u64,
        pid: u32,
        whole_file: bool,
    ) -> Result<(), BpfError> {
        if !whole_file {
            let probe = attach_code_freed(ebpf, interp, file_offset, pid)?;
            self.per_process.insert(pid, probe);
        } else if self.files.insert(interp.file) {
            uprobe_mut(ebpf, names::PROG_CODE_FREED)?
                .attach(file_offset, &interp.host_path, UProbeScope::AllProcesses)
                .map_err(|source| BpfError::Attach {
                    target: interp.host_path.display().to_string(),
                    pid: 0,
                    offset: file_offset,
                    source,
                })?;
        }
        Ok(())
    }

    /// Drops the probe of `pid` alone, if it has one.
    pub(super) fn forget(&mut self, pid: u32) {
        self.per_process.remove(&pid);
    }
}

impl Drop for CodeFrees {
    /// Takes the per-process probes off at once (see
    /// [`super::close_all`]).
    fn drop(&mut self) {
        super::close_all(
            std::mem::take(&mut self.per_process)
                .into_values()
                .collect(),
        );
    }
}

/// A uprobe in one process whose perf event is never enabled: the kernel
/// installs the probe in the process and runs the attached BPF program at
/// every hit (the program hangs off the probe), while a disabled event is
/// not switched in and out with the process's threads. Detached when
/// dropped.
pub struct QuietUprobe {
    /// The perf event: closing it detaches.
    _event: std::os::fd::OwnedFd,
}

impl QuietUprobe {
    /// Opens the uprobe at `offset` of `path` for process `pid` (disabled)
    /// and attaches `program` (a loaded uprobe program) to it.
    fn attach(
        program: std::os::fd::BorrowedFd<'_>,
        path: &std::path::Path,
        offset: u64,
        pid: u32,
    ) -> std::io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let pmu: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")?
            .trim()
            .parse()
            .map_err(std::io::Error::other)?;
        let c_path =
            std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // struct perf_event_attr (128 bytes): type, size, config1 = the
        // file's path, config2 = the offset, flags: disabled. (Not
        // inherit: threads could then not be started in the process.)
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&pmu.to_ne_bytes());
        attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
        attr[40..48].copy_from_slice(&1u64.to_ne_bytes());
        attr[56..64].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
        attr[64..72].copy_from_slice(&offset.to_ne_bytes());
        // `c_path` outlives the call.
        let fd = perf_event_with_program(&attr, pid, program)?;
        Ok(Self { _event: fd })
    }
}
