//! Reading the interpreter's ELF file: symbols and address translation.
//!
//! Uprobes are placed at *file offsets*, while symbols and DWARF give *virtual
//! addresses*. The two differ for executables (non-PIE `python3.11` is linked
//! at 0x400000) and can differ for shared objects whose segments are not
//! offset-aligned, so every translation goes through the `PT_LOAD` program
//! headers, never an assumption.

use std::path::{Path, PathBuf};

use object::{
    Endianness, Object, ObjectSymbol, SymbolKind,
    elf::PT_LOAD,
    read::elf::{ElfFile64, ProgramHeader},
};

/// Errors from reading an ELF file.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a 64-bit ELF object the parser understands.
    #[error("{path} is not a 64-bit ELF file: {source}")]
    Parse {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: object::Error,
    },
    /// The symbol is in neither `.symtab` nor `.dynsym`.
    #[error("symbol {name} not found in {path}")]
    SymbolNotFound {
        /// Symbol looked for.
        name: String,
        /// File searched.
        path: PathBuf,
    },
    /// No `PT_LOAD` segment maps the virtual address from the file.
    #[error("address {vaddr:#x} is not in any file-backed PT_LOAD segment of {path}")]
    AddressNotMapped {
        /// Address looked for.
        vaddr: u64,
        /// File searched.
        path: PathBuf,
    },
}

/// Which symbol table a symbol came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SymbolSource {
    /// `.dynsym`: exported, survives `strip`.
    Dynsym,
    /// `.symtab`: full table, absent from stripped builds.
    Symtab,
}

/// A defined symbol of the ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// Symbol name.
    pub name: String,
    /// Link-time virtual address (`st_value`).
    pub vaddr: u64,
    /// Size in bytes (`st_size`).
    pub size: u64,
    /// Table the symbol was found in.
    pub source: SymbolSource,
}

/// One `PT_LOAD` segment: how a range of the file is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_offset`.
    pub offset: u64,
    /// `p_filesz`: bytes backed by the file.
    pub filesz: u64,
    /// `p_memsz`.
    pub memsz: u64,
}

/// One section header (`Elf64_Shdr`), decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Section name, e.g. `.rodata` (lossy UTF-8; empty if unreadable).
    pub name: String,
    /// `sh_addr`: link-time virtual address (0 if not loaded).
    pub vaddr: u64,
    /// `sh_offset`.
    pub offset: u64,
    /// `sh_size`.
    pub size: u64,
    /// `SHF_ALLOC`: occupies memory at run time.
    pub alloc: bool,
    /// `SHF_EXECINSTR`: machine code.
    pub exec: bool,
    /// `SHF_WRITE`.
    pub write: bool,
    /// Whether the bytes are in the file (not `SHT_NOBITS`, i.e. not `.bss`).
    pub file_backed: bool,
}

/// The bytes of an ELF file: mapped from the file, so that only the pages
/// read (symbol tables, a few functions' code) take memory, not the whole
/// file (a libpython with debug information is 30 MB); or owned (tests).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Owned(bytes) => bytes,
        }
    }
}

impl Bytes {
    /// Gives back the pages of the file's bytes `offset..offset + len`
    /// read so far. They stay in the page cache and a later read maps them
    /// again; until then they are not pyprobe's memory. For the passes that
    /// read whole sections (the code, 2.5 MB in a libpython; its data and
    /// relocations as much again): without it they are all resident at
    /// once, most of `calls`' peak RSS.
    fn release(&self, offset: u64, len: u64) {
        if let Bytes::Mapped(map) = self {
            let (Ok(offset), Ok(len)) = (usize::try_from(offset), usize::try_from(len)) else {
                return;
            };
            let len = len.min(map.len().saturating_sub(offset));
            // SAFETY: a read-only shared mapping of a file not rewritten in
            // place (see `ElfImage::open`): dropping its pages only makes
            // the next read fault the same bytes back in. No reference into
            // the map is invalidated.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
        }
    }
}

/// Bytes [`ElfImage::scan`] keeps resident at a time.
pub const SCAN_WINDOW: usize = 256 << 10;

/// An ELF file mapped into memory, with its load segments indexed.
pub struct ElfImage {
    path: PathBuf,
    data: Bytes,
    segments: Vec<LoadSegment>,
    /// [`Self::unwind_ranges`], parsed at the first call (every process of
    /// one interpreter file shares the image).
    unwind: std::sync::OnceLock<Vec<std::ops::Range<u64>>>,
    /// [`Self::derived`] facts, by type.
    derived: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send + Sync>>>,
}

impl ElfImage {
    /// Reads and parses `path`.
    pub fn open(path: &Path) -> Result<Self, ElfError> {
        let io = |source| ElfError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: a read-only mapping. Interpreter files are
        // replaced (a new inode), not rewritten in place, by installers;
        // the same assumption the dynamic loader makes of them.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::with_bytes(path.to_owned(), Bytes::Mapped(map))
    }

    /// Parses an ELF image already in memory; `path` is used in messages only.
    pub fn from_bytes(path: PathBuf, data: Vec<u8>) -> Result<Self, ElfError> {
        Self::with_bytes(path, Bytes::Owned(data))
    }

    fn with_bytes(path: PathBuf, data: Bytes) -> Result<Self, ElfError> {
        let segments = {
            let elf = parse(&path, &data)?;
            let endian = elf.endian();
            elf.elf_program_headers()
                .iter()
                .filter(|ph| ph.p_type(endian) == PT_LOAD)
                .map(|ph| LoadSegment {
                    vaddr: ph.p_vaddr(endian),
                    offset: ph.p_offset(endian),
                    filesz: ph.p_filesz(endian),
                    memsz: ph.p_memsz(endian),
                })
                .collect()
        };
        Ok(Self {
            path,
            data,
            segments,
            unwind: std::sync::OnceLock::new(),
            derived: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Path the image was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `PT_LOAD` segments, in file order.
    pub fn load_segments(&self) -> &[LoadSegment] {
        &self.segments
    }

    /// Finds a defined symbol by exact name, preferring `.dynsym` (present in
    /// stripped builds) and falling back to `.symtab`.
    pub fn symbol(&self, name: &str) -> Result<Symbol, ElfError> {
        let elf = parse(&self.path, &self.data)?;
        let tables = [
            (SymbolSource::Dynsym, elf.dynamic_symbols()),
            (SymbolSource::Symtab, elf.symbols()),
        ];
        for (source, symbols) in tables {
            for sym in symbols {
                if sym.is_undefined() || sym.kind() == SymbolKind::Section {
                    continue;
                }
                if sym.name_bytes().ok() == Some(name.as_bytes()) {
                    return Ok(Symbol {
                        name: name.to_owned(),
                        vaddr: sym.address(),
                        size: sym.size(),
                        source,
                    });
                }
            }
        }
        Err(ElfError::SymbolNotFound {
            name: name.to_owned(),
            path: self.path.clone(),
        })
    }

    /// Whether the file defines `name` in either symbol table.
    pub fn has_symbol(&self, name: &str) -> bool {
        self.symbol(name).is_ok()
    }

    /// Translates a link-time virtual address to an offset in the file,
    /// through the `PT_LOAD` segment that maps it.
    pub fn vaddr_to_file_offset(&self, vaddr: u64) -> Result<u64, ElfError> {
        vaddr_to_file_offset(&self.segments, vaddr).ok_or_else(|| ElfError::AddressNotMapped {
            vaddr,
            path: self.path.clone(),
        })
    }

    /// Translates a file offset (in a loaded, file-backed part) to its
    /// link-time virtual address.
    pub fn file_offset_to_vaddr(&self, offset: u64) -> Result<u64, ElfError> {
        self.segments
            .iter()
            .find(|s| offset >= s.offset && offset - s.offset < s.filesz)
            .map(|s| s.vaddr + (offset - s.offset))
            .ok_or_else(|| ElfError::AddressNotMapped {
                vaddr: offset,
                path: self.path.clone(),
            })
    }

    /// Whether `vaddr` lies in memory the file's load segments give
    /// (`.bss` included): a link-time address of static data.
    pub fn is_loaded(&self, vaddr: u64) -> bool {
        self.segments
            .iter()
            .any(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.memsz)
    }

    /// The GNU build-id (the `NT_GNU_BUILD_ID` note), if the file has a
    /// non-empty one.
    pub fn build_id(&self) -> Option<&[u8]> {
        let elf = parse(&self.path, &self.data).ok()?;
        elf.build_id().ok().flatten().filter(|id| !id.is_empty())
    }

    /// `e_machine` (62 is `EM_X86_64`).
    pub fn machine(&self) -> u16 {
        use object::read::elf::FileHeader as _;
        parse(&self.path, &self.data)
            .map(|elf| elf.elf_header().e_machine(elf.endian()))
            .unwrap_or(object::elf::EM_NONE)
    }

    /// Every section header, in file order.
    pub fn sections(&self) -> Result<Vec<Section>, ElfError> {
        use object::read::elf::SectionHeader as _;
        let elf = parse(&self.path, &self.data)?;
        let endian = elf.endian();
        let table = elf.elf_section_table();
        Ok(table
            .iter()
            .map(|sh| {
                let flags = sh.sh_flags(endian);
                Section {
                    name: table
                        .section_name(endian, sh)
                        .map(|n| String::from_utf8_lossy(n).into_owned())
                        .unwrap_or_default(),
                    vaddr: sh.sh_addr(endian),
                    offset: sh.sh_offset(endian),
                    size: sh.sh_size(endian),
                    alloc: flags & u64::from(object::elf::SHF_ALLOC) != 0,
                    exec: flags & u64::from(object::elf::SHF_EXECINSTR) != 0,
                    write: flags & u64::from(object::elf::SHF_WRITE) != 0,
                    file_backed: sh.sh_type(endian) != object::elf::SHT_NOBITS,
                }
            })
            .collect())
    }

    /// Every defined symbol of `.dynsym` then `.symtab` whose name satisfies
    /// `keep` (a name in both tables appears twice).
    pub fn symbols_where(
        &self,
        mut keep: impl FnMut(&str) -> bool,
    ) -> Result<Vec<Symbol>, ElfError> {
        let elf = parse(&self.path, &self.data)?;
        let tables = [
            (SymbolSource::Dynsym, elf.dynamic_symbols()),
            (SymbolSource::Symtab, elf.symbols()),
        ];
        let mut found = Vec::new();
        for (source, symbols) in tables {
            for sym in symbols {
                if sym.is_undefined() || sym.kind() == SymbolKind::Section {
                    continue;
                }
                if let Ok(name) = sym.name()
                    && keep(name)
                {
                    found.push(Symbol {
                        name: name.to_owned(),
                        vaddr: sym.address(),
                        size: sym.size(),
                        source,
                    });
                }
            }
        }
        Ok(found)
    }

    /// The x86-64 `R_X86_64_RELATIVE` dynamic relocations, as
    /// `(r_offset, r_addend)` sorted by offset: in a PIE or shared object, a
    /// pointer stored in data is zero in the file and its link-time value is
    /// the addend. Read from every allocated `SHT_RELA` section (`.rela.dyn`).
    /// Packed `.relr.dyn` relocations are not listed: they keep the
    /// link-time value in the file itself.
    pub fn relative_relocations(&self) -> Result<Vec<(u64, u64)>, ElfError> {
        use object::read::elf::{Rela as _, SectionHeader as _};
        let elf = parse(&self.path, &self.data)?;
        let endian = elf.endian();
        let mut relocations = Vec::new();
        for sh in elf.elf_section_table().iter() {
            if sh.sh_flags(endian) & u64::from(object::elf::SHF_ALLOC) == 0 {
                continue;
            }
            let entries = sh
                .rela(endian, &self.data[..])
                .map_err(|source| ElfError::Parse {
                    path: self.path.clone(),
                    source,
                })?;
            let Some((entries, _symbols)) = entries else {
                continue;
            };
            relocations.extend(
                entries
                    .iter()
                    .filter(|r| r.r_type(endian, false) == object::elf::R_X86_64_RELATIVE)
                    .map(|r| (r.r_offset(endian), r.r_addend(endian) as u64)),
            );
            self.data.release(sh.sh_offset(endian), sh.sh_size(endian));
        }
        relocations.sort_unstable();
        Ok(relocations)
    }

    /// The `[start, end)` link-time address ranges of the executable
    /// `PT_LOAD` segments (their file-backed part).
    pub fn executable_ranges(&self) -> Result<Vec<std::ops::Range<u64>>, ElfError> {
        let elf = parse(&self.path, &self.data)?;
        let endian = elf.endian();
        Ok(elf
            .elf_program_headers()
            .iter()
            .filter(|ph| {
                ph.p_type(endian) == object::elf::PT_LOAD
                    && ph.p_flags(endian) & object::elf::PF_X != 0
            })
            .map(|ph| {
                let start = ph.p_vaddr(endian);
                start..start.saturating_add(ph.p_filesz(endian))
            })
            .collect())
    }

    /// `file_offset`, or the instruction after it when it is an `endbr64`
    /// (the CET landing pad that starts functions in builds with
    /// `-fcf-protection`): a first instruction that is single-stepped
    /// (several µs a hit), where the next one, with the argument registers
    /// still untouched, is usually emulated.
    pub fn past_endbr64(&self, file_offset: u64) -> u64 {
        const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
        let at = file_offset as usize;
        if self.data.get(at..at + 4) == Some(&ENDBR64[..]) {
            file_offset + 4
        } else {
            file_offset
        }
    }

    /// A fact other modules derive from the image alone (where the eval
    /// loop's code is, which register holds its frame), computed by `make`
    /// at the first call and kept: every process of one interpreter file
    /// shares the image. The type `T` names the fact.
    pub fn derived<T: Clone + Send + Sync + 'static>(&self, make: impl FnOnce(&Self) -> T) -> T {
        let found = |cache: &[Box<dyn std::any::Any + Send + Sync>]| {
            cache
                .iter()
                .find_map(|fact| fact.downcast_ref::<T>())
                .cloned()
        };
        if let Some(fact) = found(&self.derived.lock().unwrap_or_else(|e| e.into_inner())) {
            return fact;
        }
        // Computed without the lock: `make` may ask for other facts.
        let fact = make(self);
        let mut cache = self.derived.lock().unwrap_or_else(|e| e.into_inner());
        if found(&cache).is_none() {
            cache.push(Box::new(fact.clone()));
        }
        fact
    }

    /// The code ranges `[start, end)` of the `.eh_frame` FDEs, sorted: one per
    /// contiguous piece of a function (GCC gives a function's `.cold` part its
    /// own FDE). Best effort: parsing stops at the first malformed entry, and
    /// a file without `.eh_frame` yields an empty list.
    pub fn unwind_ranges(&self) -> &[std::ops::Range<u64>] {
        self.unwind.get_or_init(|| self.parse_unwind_ranges())
    }

    /// [`Self::unwind_ranges`], parsed.
    fn parse_unwind_ranges(&self) -> Vec<std::ops::Range<u64>> {
        use gimli::UnwindSection as _;
        let Ok(sections) = self.sections() else {
            return Vec::new();
        };
        let find = |name: &str| sections.iter().find(|s| s.name == name && s.file_backed);
        let Some(eh) = find(".eh_frame") else {
            return Vec::new();
        };
        let Some(data) = usize::try_from(eh.size)
            .ok()
            .and_then(|len| self.bytes_at(eh.offset, len))
        else {
            return Vec::new();
        };
        let endian = match parse(&self.path, &self.data).map(|e| e.is_little_endian()) {
            Ok(false) => gimli::RunTimeEndian::Big,
            _ => gimli::RunTimeEndian::Little,
        };
        let eh_frame = gimli::EhFrame::new(data, endian);
        let mut bases = gimli::BaseAddresses::default().set_eh_frame(eh.vaddr);
        if let Some(text) = find(".text") {
            bases = bases.set_text(text.vaddr);
        }
        let mut ranges = Vec::new();
        let mut entries = eh_frame.entries(&bases);
        while let Ok(Some(entry)) = entries.next() {
            if let gimli::CieOrFde::Fde(partial) = entry {
                let Ok(fde) = partial.parse(gimli::EhFrame::cie_from_offset) else {
                    break;
                };
                let start = fde.initial_address();
                if let Some(end) = start.checked_add(fde.len())
                    && end > start
                {
                    ranges.push(start..end);
                }
            }
        }
        ranges.sort_unstable_by_key(|r| (r.start, r.end));
        ranges
    }

    /// The whole file.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Bytes of the file at `offset`, if in range.
    pub fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        self.data.get(start..start.checked_add(len)?)
    }

    /// Runs `visit` over the file's bytes `offset..offset + len` (a whole
    /// section read once), a window of [`SCAN_WINDOW`] bytes at a time,
    /// giving each window's pages back once it is done, so a pass over
    /// 2.5 MB of code keeps a window resident, not the code.
    /// `visit(bytes, window)` gets all the bytes and looks at the positions
    /// in `window` (a multiple of 8 from the start, but for the last);
    /// it may read a little past them. False when the file has no such
    /// bytes.
    pub fn scan(
        &self,
        offset: u64,
        len: u64,
        mut visit: impl FnMut(&[u8], std::ops::Range<usize>),
    ) -> bool {
        let Some(bytes) = usize::try_from(len)
            .ok()
            .and_then(|len| self.bytes_at(offset, len))
        else {
            return false;
        };
        let mut start = 0;
        while start < bytes.len() {
            let end = start.saturating_add(SCAN_WINDOW).min(bytes.len());
            visit(bytes, start..end);
            self.data
                .release(offset + start as u64, (end - start) as u64);
            start = end;
        }
        true
    }

    /// The file's bytes that are loaded at the link-time virtual addresses
    /// `vaddr..vaddr + len`, if one `PT_LOAD` segment maps all of them from
    /// the file (none of them in its memory-only tail).
    pub fn bytes_at_vaddr(&self, vaddr: u64, len: usize) -> Option<&[u8]> {
        let segment = self
            .segments
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)?;
        let start = vaddr - segment.vaddr;
        if start.checked_add(u64::try_from(len).ok()?)? > segment.filesz {
            return None;
        }
        self.bytes_at(segment.offset.checked_add(start)?, len)
    }
}

fn parse<'d>(path: &Path, data: &'d [u8]) -> Result<ElfFile64<'d, Endianness>, ElfError> {
    ElfFile64::parse(data).map_err(|source| ElfError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Translates `vaddr` through `segments`; `None` if no file-backed part of a
/// segment contains it (e.g. `.bss`).
pub fn vaddr_to_file_offset(segments: &[LoadSegment], vaddr: u64) -> Option<u64> {
    segments
        .iter()
        .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
        .map(|s| s.offset + (vaddr - s.vaddr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(vaddr: u64, offset: u64, filesz: u64) -> LoadSegment {
        LoadSegment {
            vaddr,
            offset,
            filesz,
            memsz: filesz,
        }
    }

    #[test]
    fn translates_through_the_segment_that_maps_the_address() {
        // Layout of a non-PIE executable: text at 0x400000 from offset 0, data
        // segment whose vaddr and offset differ by more than the base.
        let segs = [seg(0x400000, 0, 0x1000), seg(0x402e10, 0x1e10, 0x200)];
        assert_eq!(vaddr_to_file_offset(&segs, 0x400000), Some(0));
        assert_eq!(vaddr_to_file_offset(&segs, 0x400abc), Some(0xabc));
        assert_eq!(vaddr_to_file_offset(&segs, 0x402e18), Some(0x1e18));
        // End of the file-backed part is exclusive.
        assert_eq!(vaddr_to_file_offset(&segs, 0x401000), None);
        assert_eq!(vaddr_to_file_offset(&segs, 0x3fffff), None);
    }

    #[test]
    fn memory_only_tail_of_a_segment_has_no_file_offset() {
        let segs = [LoadSegment {
            vaddr: 0x1000,
            offset: 0x1000,
            filesz: 0x100,
            memsz: 0x800,
        }];
        assert_eq!(vaddr_to_file_offset(&segs, 0x10ff), Some(0x10ff));
        assert_eq!(vaddr_to_file_offset(&segs, 0x1100), None);
    }

    #[test]
    fn reads_symbols_of_the_running_test_binary() {
        // Our own executable is an ELF file with a `main` symbol in .symtab;
        // its file bytes at the translated offset must be the bytes mapped in
        // memory at the symbol's runtime address.
        let exe = std::env::current_exe().unwrap();
        let image = ElfImage::open(&exe).unwrap();
        let sym = image.symbol("main").unwrap();
        let offset = image.vaddr_to_file_offset(sym.vaddr).unwrap();
        let file_bytes = image.bytes_at(offset, 16).unwrap().to_vec();

        let pid = std::process::id();
        let maps = crate::process::read_maps(pid).unwrap();
        let bias = crate::process::load_bias(&maps, &exe, &image).unwrap();
        let live = crate::process::read_memory(std::process::id(), bias + sym.vaddr, 16).unwrap();
        assert_eq!(file_bytes, live);
    }

    #[test]
    fn bytes_at_vaddr_reads_through_the_segment() {
        let exe = std::env::current_exe().unwrap();
        let image = ElfImage::open(&exe).unwrap();
        let sym = image.symbol("main").unwrap();
        let offset = image.vaddr_to_file_offset(sym.vaddr).unwrap();
        assert_eq!(
            image.bytes_at_vaddr(sym.vaddr, 16),
            image.bytes_at(offset, 16)
        );
        // Not across the end of the segment's file-backed part.
        let segment = *image
            .load_segments()
            .iter()
            .find(|s| (s.vaddr..s.vaddr + s.filesz).contains(&sym.vaddr))
            .unwrap();
        let end = segment.vaddr + segment.filesz;
        assert!(image.bytes_at_vaddr(end - 4, 4).is_some());
        assert!(image.bytes_at_vaddr(end - 4, 5).is_none());
        assert!(image.bytes_at_vaddr(u64::MAX, 1).is_none());
    }

    #[test]
    fn missing_symbol_is_an_error_naming_it() {
        let exe = std::env::current_exe().unwrap();
        let image = ElfImage::open(&exe).unwrap();
        let err = image.symbol("no_such_symbol_in_pyprobe").unwrap_err();
        assert!(
            err.to_string().contains("no_such_symbol_in_pyprobe"),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_panic() {
        let err = ElfImage::from_bytes("junk".into(), b"\x7fELF not really".to_vec());
        assert!(matches!(err, Err(ElfError::Parse { .. })));
    }
}
