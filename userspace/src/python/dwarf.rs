//! Struct layouts and code labels read from an interpreter's DWARF.
//!
//! When the CPython binary (for example pyenv's `libpython3.12.so.1.0`) still
//! carries DWARF debug information, it is the most reliable source of the
//! field offsets pyprobe needs to walk `_PyRuntimeState`, `PyThreadState`,
//! frames and code objects from outside the process. [`DwarfInfo`] parses the
//! DWARF once, builds a name index of the types and functions it defines, and
//! answers `offsetof`/`sizeof` questions and "where are the labels of this
//! function" questions cheaply afterwards.
//!
//! Design points:
//!
//! * The needed sections are copied out of the ELF into reference-counted
//!   buffers, so a [`DwarfInfo`] owns its data (no lifetime, `Send + Sync`);
//!   the caller may drop the file bytes right after [`DwarfInfo::parse`].
//! * The index is built in a single pass over the *top-level* DIEs of every
//!   unit, jumping over the (large) bodies of functions and structs with
//!   `DW_AT_sibling` whenever the producer emitted it.
//! * For struct/union/enum tags only complete definitions are indexed (a
//!   forward declaration in one unit resolves to the first complete
//!   definition in any unit); typedefs and base types are indexed by their
//!   first occurrence.
//! * Malformed DWARF yields a [`DwarfError`], never a panic; all chains that
//!   could loop (typedef chains, anonymous member nesting, abstract-origin
//!   links) are bounded.
//!
//! DWARF 2 to 5 is read, including type units (`.debug_types` and
//! `DW_UT_type`), `.debug_str_offsets`/`.debug_addr` indirection and
//! `.debug_line_str`. Split DWARF (`.dwo`) and `dwz` supplementary files are
//! not followed. Compressed sections are passed through `object`'s
//! `uncompressed_data()`; with `object`'s `compression` feature disabled (as
//! in this workspace) such a section yields [`DwarfError::Section`].

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use gimli::{
    AttributeValue, DebugInfoOffset, DwTag, Reader, ReaderOffsetId, RunTimeEndian, SectionId,
    UnitOffset, UnitSectionOffset, UnitType,
};
use object::{Object, ObjectSection};

/// Longest chain of typedef / cv-qualifier / declaration links followed.
const MAX_TYPE_CHAIN: usize = 64;
/// Deepest nesting of anonymous struct/union members searched.
const MAX_ANON_DEPTH: usize = 32;
/// Deepest nesting of array element types when computing sizes.
const MAX_SIZE_DEPTH: usize = 32;
/// Longest `DW_AT_abstract_origin` chain followed to name a label.
const MAX_ORIGIN_HOPS: usize = 16;
/// Most subprogram DIEs (abstract + concrete instances) walked for one name.
const MAX_FUNCTION_INSTANCES: usize = 4096;

/// The sections copied out of the ELF. Everything else (location lists,
/// range lists, aranges, macros) is not needed for types and labels.
const NEEDED_SECTIONS: &[SectionId] = &[
    SectionId::DebugAbbrev,
    SectionId::DebugAddr,
    SectionId::DebugInfo,
    SectionId::DebugLine,
    SectionId::DebugLineStr,
    SectionId::DebugStr,
    SectionId::DebugStrOffsets,
    SectionId::DebugTypes,
];

/// Errors from reading DWARF or answering a query.
#[derive(Debug, thiserror::Error)]
pub enum DwarfError {
    /// The file has DWARF units, but only split-DWARF skeletons: the type
    /// information lives in separate `.dwo`/`.dwp` files, which are not read.
    #[error("no usable DWARF: only split-DWARF skeleton units (the types live in .dwo files)")]
    NoDebugInfo,
    /// The input is not an object file that `object` can read.
    #[error("not a readable object file: {0}")]
    Object(#[source] object::Error),
    /// A DWARF section exists but its contents could not be read (for
    /// example, it is compressed and decompression support is not built in).
    #[error("cannot read section {name}: {source}")]
    Section {
        /// The section's name, e.g. `.debug_info`.
        name: &'static str,
        /// What `object` reported.
        #[source]
        source: object::Error,
    },
    /// gimli could not parse the DWARF data.
    #[error("malformed DWARF: {0}")]
    Parse(#[from] gimli::Error),
    /// The DWARF parses but is inconsistent: a reference points nowhere, a
    /// chain of links is too long (a cycle), and similar.
    #[error("malformed DWARF: {0}")]
    Malformed(String),
    /// A valid DWARF construct this reader does not handle (e.g. a member
    /// location given as a location list, or a supplementary-file reference).
    #[error("unsupported DWARF construct: {0}")]
    Unsupported(String),
    /// No struct/union/enum tag, typedef or base type has this name.
    #[error("type `{name}` not found in DWARF")]
    TypeNotFound {
        /// The name that was looked up.
        name: String,
    },
    /// The type is only ever declared (`struct foo;`), never defined.
    #[error("type `{name}` is declared but never defined in DWARF")]
    IncompleteType {
        /// The struct/union/enum tag name (`<anonymous>` if it has none).
        name: String,
    },
    /// The type has no member of this name (directly or through anonymous
    /// struct/union members).
    #[error("type `{type_name}` has no member `{member}`")]
    MemberNotFound {
        /// The type the path started from.
        type_name: String,
        /// The member path up to and including the component not found.
        member: String,
    },
    /// A member path steps into something that is not a struct or union.
    #[error("`{type_name}`{sep}{member} is not a struct or union", sep = if member.is_empty() { "" } else { "." })]
    NotAStruct {
        /// The type the path started from.
        type_name: String,
        /// The member path (prefix) whose type is not a struct or union;
        /// empty when `type_name` itself is not one.
        member: String,
    },
    /// The member is a bit-field, which has no byte offset.
    #[error("`{type_name}.{member}` is a bit-field and has no byte offset")]
    BitField {
        /// The type the path started from.
        type_name: String,
        /// The member path of the bit-field.
        member: String,
    },
    /// The member path is empty or has an empty component (`a..b`).
    #[error("invalid member path `{path}`")]
    InvalidPath {
        /// The path as given.
        path: String,
    },
    /// The type has no known size (`void`, a function type, a flexible or
    /// variable-length array, ...).
    #[error("type `{type_name}` has no known size")]
    NoSize {
        /// The name that was looked up.
        type_name: String,
    },
    /// No subprogram DIE has this name.
    #[error("function `{name}` not found in DWARF")]
    FunctionNotFound {
        /// The name that was looked up.
        name: String,
    },
}

/// A gimli [`Reader`] over a reference-counted, owned copy of a section.
///
/// gimli's own `EndianArcSlice` sits behind its `endian-reader` feature,
/// which this workspace does not enable.
#[derive(Clone)]
struct SectionReader {
    data: Arc<[u8]>,
    /// Invariant: `start <= end <= data.len()`.
    start: usize,
    end: usize,
    endian: RunTimeEndian,
}

impl SectionReader {
    fn new(data: Arc<[u8]>, endian: RunTimeEndian) -> Self {
        let end = data.len();
        SectionReader {
            data,
            start: 0,
            end,
            endian,
        }
    }

    fn empty_section(endian: RunTimeEndian) -> Self {
        SectionReader::new(Arc::from(&[][..]), endian)
    }

    /// The bytes still to be read.
    fn bytes(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or(&[])
    }

    fn eof(&self) -> gimli::Error {
        gimli::Error::UnexpectedEof(self.offset_id())
    }
}

impl fmt::Debug for SectionReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never dump the (possibly megabytes of) data.
        f.debug_struct("SectionReader")
            .field("start", &self.start)
            .field("end", &self.end)
            .field("endian", &self.endian)
            .finish()
    }
}

impl Reader for SectionReader {
    type Endian = RunTimeEndian;
    type Offset = usize;

    fn endian(&self) -> RunTimeEndian {
        self.endian
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn empty(&mut self) {
        self.end = self.start;
    }

    fn truncate(&mut self, len: usize) -> gimli::Result<()> {
        if len > self.len() {
            return Err(self.eof());
        }
        self.end = self.start + len;
        Ok(())
    }

    fn offset_from(&self, base: &Self) -> usize {
        self.start.saturating_sub(base.start)
    }

    fn offset_id(&self) -> ReaderOffsetId {
        ReaderOffsetId((self.data.as_ptr() as u64).wrapping_add(self.start as u64))
    }

    fn lookup_offset_id(&self, id: ReaderOffsetId) -> Option<usize> {
        let base = (self.data.as_ptr() as u64).wrapping_add(self.start as u64);
        let offset = id.0.checked_sub(base)?;
        (offset <= self.len() as u64).then_some(offset as usize)
    }

    fn find(&self, byte: u8) -> gimli::Result<usize> {
        self.bytes()
            .iter()
            .position(|&b| b == byte)
            .ok_or_else(|| self.eof())
    }

    fn skip(&mut self, len: usize) -> gimli::Result<()> {
        if len > self.len() {
            return Err(self.eof());
        }
        self.start += len;
        Ok(())
    }

    fn split(&mut self, len: usize) -> gimli::Result<Self> {
        if len > self.len() {
            return Err(self.eof());
        }
        let mut head = self.clone();
        head.end = self.start + len;
        self.start += len;
        Ok(head)
    }

    fn to_slice(&self) -> gimli::Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(self.bytes()))
    }

    fn to_string(&self) -> gimli::Result<Cow<'_, str>> {
        std::str::from_utf8(self.bytes())
            .map(Cow::Borrowed)
            .map_err(|_| gimli::Error::BadUtf8)
    }

    fn to_string_lossy(&self) -> gimli::Result<Cow<'_, str>> {
        Ok(String::from_utf8_lossy(self.bytes()))
    }

    fn read_slice(&mut self, buf: &mut [u8]) -> gimli::Result<()> {
        let src = self.bytes().get(..buf.len()).ok_or_else(|| self.eof())?;
        buf.copy_from_slice(src);
        self.start += buf.len();
        Ok(())
    }
}

type R = SectionReader;
type Unit = gimli::Unit<R>;
type Die<'abbrev, 'unit> = gimli::DebuggingInformationEntry<'abbrev, 'unit, R>;

/// A DIE: the index of its unit in [`DwarfInfo::units`] and its offset there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DieRef {
    unit: usize,
    offset: UnitOffset<usize>,
}

/// What the index pass does with a top-level DIE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// struct / union / class / enum: indexed by tag when complete.
    Tagged,
    Typedef,
    Base,
    Subprogram,
    Other,
}

fn classify(tag: DwTag) -> Kind {
    match tag {
        gimli::DW_TAG_structure_type
        | gimli::DW_TAG_union_type
        | gimli::DW_TAG_class_type
        | gimli::DW_TAG_enumeration_type => Kind::Tagged,
        gimli::DW_TAG_typedef => Kind::Typedef,
        gimli::DW_TAG_base_type => Kind::Base,
        gimli::DW_TAG_subprogram => Kind::Subprogram,
        _ => Kind::Other,
    }
}

fn is_aggregate(tag: DwTag) -> bool {
    matches!(
        tag,
        gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type | gimli::DW_TAG_class_type
    )
}

/// Tags that merely wrap another type (`DW_AT_type`) without changing its layout.
fn is_transparent(tag: DwTag) -> bool {
    matches!(
        tag,
        gimli::DW_TAG_typedef
            | gimli::DW_TAG_const_type
            | gimli::DW_TAG_volatile_type
            | gimli::DW_TAG_restrict_type
            | gimli::DW_TAG_atomic_type
            | gimli::DW_TAG_immutable_type
            | gimli::DW_TAG_packed_type
            | gimli::DW_TAG_shared_type
    )
}

/// The name index, filled by the single pass in [`DwarfInfo::parse`].
#[derive(Default)]
struct Index {
    /// Complete struct/union/class/enum definitions by tag name (first wins).
    tags: HashMap<Vec<u8>, DieRef>,
    /// Typedefs by name (first wins).
    typedefs: HashMap<Vec<u8>, DieRef>,
    /// Base types by name (first wins).
    base_types: HashMap<Vec<u8>, DieRef>,
    /// Top-level subprograms (declarations, abstract instances and
    /// definitions) by `DW_AT_name`.
    subprograms: HashMap<Vec<u8>, Vec<DieRef>>,
    /// Subprograms without a name of their own, keyed by the `.debug_info`
    /// offset of the DIE their `DW_AT_abstract_origin`/`DW_AT_specification`
    /// points at (out-of-line concrete instances of inlined functions).
    instances: HashMap<usize, Vec<DieRef>>,
    /// Type units by signature (`DW_FORM_ref_sig8` targets).
    signatures: HashMap<u64, DieRef>,
}

impl Index {
    fn insert_first(map: &mut HashMap<Vec<u8>, DieRef>, name: &[u8], die: DieRef) {
        if !map.contains_key(name) {
            map.insert(name.to_vec(), die);
        }
    }
}

/// Attributes of a top-level DIE gathered by the index pass.
#[derive(Default)]
struct TopAttrs {
    name: Option<AttributeValue<R>>,
    declaration: bool,
    sibling: Option<UnitOffset<usize>>,
    origin: Option<AttributeValue<R>>,
}

/// Type and label information read from an ELF file's DWARF.
///
/// Built once by [`DwarfInfo::parse`]; every query afterwards reads only the
/// DIEs it needs. The value owns copies of the DWARF sections, so it does not
/// borrow the input bytes and is `Send + Sync`.
pub struct DwarfInfo {
    dwarf: gimli::Dwarf<R>,
    units: Vec<Unit>,
    /// `(start offset in .debug_info, index in units)`, sorted by offset.
    info_units: Vec<(usize, usize)>,
    index: Index,
}

impl fmt::Debug for DwarfInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DwarfInfo")
            .field("units", &self.units.len())
            .field("tags", &self.index.tags.len())
            .field("typedefs", &self.index.typedefs.len())
            .field("base_types", &self.index.base_types.len())
            .field("subprograms", &self.index.subprograms.len())
            .finish_non_exhaustive()
    }
}

impl DwarfInfo {
    /// Parses the DWARF sections of an ELF file given as bytes. Returns
    /// `Ok(None)` if the file has no `.debug_info` (stripped).
    ///
    /// Builds the name index in one pass over the top-level DIEs of every
    /// unit. Errors if the bytes are not an object file, a needed section
    /// cannot be read, or the DWARF is malformed; returns
    /// [`DwarfError::NoDebugInfo`] for split-DWARF skeletons.
    pub fn parse(elf_bytes: &[u8]) -> Result<Option<DwarfInfo>, DwarfError> {
        let file = object::File::parse(elf_bytes).map_err(DwarfError::Object)?;
        let endian = if file.is_little_endian() {
            RunTimeEndian::Little
        } else {
            RunTimeEndian::Big
        };
        match file.section_by_name(SectionId::DebugInfo.name()) {
            Some(section) if section.size() > 0 => {}
            _ => return Ok(None),
        }

        let mut dwarf = gimli::Dwarf::load(|id| load_section(&file, id, endian))?;
        if gimli::Section::reader(&dwarf.debug_info).is_empty() {
            // SHT_NOBITS, as in a binary whose debug info was split off.
            return Ok(None);
        }
        dwarf.populate_abbreviations_cache(gimli::AbbreviationsCacheStrategy::Duplicates);

        let mut index = Index::default();
        let mut units = Vec::new();
        let mut info_units = Vec::new();
        let mut skeletons = 0usize;

        let mut headers = dwarf.units();
        while let Some(header) = headers.next()? {
            let UnitSectionOffset::DebugInfoOffset(start) = header.offset() else {
                continue;
            };
            let UnitRole::Index(signature) = unit_role(&header) else {
                skeletons += 1;
                continue;
            };
            let unit = dwarf.unit(header)?;
            let idx = units.len();
            info_units.push((start.0, idx));
            index_unit(&dwarf, &unit, idx, Some(start.0), &mut index)?;
            if let Some((sig, offset)) = signature {
                index
                    .signatures
                    .entry(sig)
                    .or_insert(DieRef { unit: idx, offset });
            }
            if unit.dwo_id.is_some() {
                // GNU split-DWARF extension to DWARF 4: a skeleton compile unit.
                skeletons += 1;
            }
            units.push(unit);
        }
        let mut type_headers = dwarf.type_units();
        while let Some(header) = type_headers.next()? {
            let UnitRole::Index(signature) = unit_role(&header) else {
                skeletons += 1;
                continue;
            };
            let unit = dwarf.unit(header)?;
            let idx = units.len();
            index_unit(&dwarf, &unit, idx, None, &mut index)?;
            if let Some((sig, offset)) = signature {
                index
                    .signatures
                    .entry(sig)
                    .or_insert(DieRef { unit: idx, offset });
            }
            units.push(unit);
        }

        let no_types = index.tags.is_empty() && index.typedefs.is_empty();
        if no_types && skeletons > 0 {
            return Err(DwarfError::NoDebugInfo);
        }
        if units.is_empty() {
            return Ok(None);
        }
        Ok(Some(DwarfInfo {
            dwarf,
            units,
            info_units,
            index,
        }))
    }

    /// Byte offset of a (possibly nested) member:
    /// `offset_of("_PyRuntimeState", "interpreters.head")`.
    ///
    /// `type_name` may be a struct/union tag (`_ts`, `_is`, `pyruntimestate`,
    /// `_frame`, ...), a typedef name (`PyThreadState`, `_PyRuntimeState`,
    /// `PyObject`, ...) or a base type name; typedefs and cv-qualifiers are
    /// followed, and a forward declaration resolves to the first complete
    /// definition with the same tag. Members are looked up in structs and
    /// unions, including inside anonymous struct/union members (as C does).
    /// Each `.`-separated component walks into the previous member's type
    /// (never through a pointer). Returns the sum of the
    /// `DW_AT_data_member_location` values along the path.
    pub fn offset_of(&self, type_name: &str, member_path: &str) -> Result<u64, DwarfError> {
        let mut current = Some(self.lookup_type(type_name)?);
        let mut total: u64 = 0;
        let mut prefix_end = 0usize;
        let mut first = true;
        for component in member_path.split('.') {
            if component.is_empty() {
                return Err(DwarfError::InvalidPath {
                    path: member_path.to_string(),
                });
            }
            let prefix = member_path.get(..prefix_end).unwrap_or(member_path);
            let component_end = if first {
                component.len()
            } else {
                prefix_end + 1 + component.len()
            };
            first = false;
            let path = member_path.get(..component_end).unwrap_or(member_path);
            prefix_end = component_end;

            let not_a_struct = || DwarfError::NotAStruct {
                type_name: type_name.to_string(),
                member: prefix.to_string(),
            };
            let aggregate = match current {
                Some(die) => match self.strip(die)? {
                    Some((die, tag)) if is_aggregate(tag) => die,
                    _ => return Err(not_a_struct()),
                },
                None => return Err(not_a_struct()),
            };
            let member = self
                .find_member(aggregate, component.as_bytes(), 0, &mut HashSet::new())?
                .ok_or_else(|| DwarfError::MemberNotFound {
                    type_name: type_name.to_string(),
                    member: path.to_string(),
                })?;
            let offset = member.offset.ok_or_else(|| DwarfError::BitField {
                type_name: type_name.to_string(),
                member: path.to_string(),
            })?;
            total = total
                .checked_add(offset)
                .ok_or_else(|| DwarfError::Malformed("member offsets overflow u64".into()))?;
            current = member.ty;
        }
        Ok(total)
    }

    /// `sizeof(type)`: the `DW_AT_byte_size` of the named type after
    /// following typedefs and cv-qualifiers (pointers without a byte size
    /// take the unit's address size; arrays are element size times count).
    pub fn size_of(&self, type_name: &str) -> Result<u64, DwarfError> {
        let die = self.lookup_type(type_name)?;
        self.type_size(die, 0)?.ok_or_else(|| DwarfError::NoSize {
            type_name: type_name.to_string(),
        })
    }

    /// `DW_TAG_label` entries `(name, low_pc)` lexically inside the
    /// subprogram named `function`, including those in nested lexical blocks
    /// and inlined subroutines. `low_pc` is a link-time virtual address.
    /// Labels without `DW_AT_low_pc` (e.g. in abstract instances) are
    /// skipped; a label's name may come through `DW_AT_abstract_origin`.
    ///
    /// All top-level subprogram DIEs with that name are searched, together
    /// with their out-of-line concrete instances. The result is sorted by
    /// address, then name, without duplicates.
    pub fn labels_in(&self, function: &str) -> Result<Vec<(String, u64)>, DwarfError> {
        let roots = self
            .index
            .subprograms
            .get(function.as_bytes())
            .ok_or_else(|| DwarfError::FunctionNotFound {
                name: function.to_string(),
            })?;

        // The named DIEs plus everything that names them as abstract origin
        // (transitively, bounded).
        let mut seen = HashSet::new();
        let mut todo: Vec<DieRef> = roots.clone();
        let mut subprograms = Vec::new();
        while let Some(die) = todo.pop() {
            if !seen.insert(die) {
                continue;
            }
            if seen.len() > MAX_FUNCTION_INSTANCES {
                return Err(DwarfError::Malformed(format!(
                    "more than {MAX_FUNCTION_INSTANCES} subprogram DIEs for `{function}`"
                )));
            }
            subprograms.push(die);
            if let Some(global) = self.global_offset(die)
                && let Some(instances) = self.index.instances.get(&global)
            {
                todo.extend(instances.iter().copied());
            }
        }

        let mut labels = Vec::new();
        for die in subprograms {
            self.collect_labels(die, &mut labels)?;
        }
        labels.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        labels.dedup();
        Ok(labels)
    }

    // ---- lookups -------------------------------------------------------

    fn lookup_type(&self, name: &str) -> Result<DieRef, DwarfError> {
        let key = name.as_bytes();
        self.index
            .tags
            .get(key)
            .or_else(|| self.index.typedefs.get(key))
            .or_else(|| self.index.base_types.get(key))
            .copied()
            .ok_or_else(|| DwarfError::TypeNotFound {
                name: name.to_string(),
            })
    }

    fn unit(&self, idx: usize) -> Result<&Unit, DwarfError> {
        self.units
            .get(idx)
            .ok_or_else(|| DwarfError::Malformed(format!("unit index {idx} out of range")))
    }

    /// The `.debug_info` offset of a DIE (None for `.debug_types` units).
    fn global_offset(&self, die: DieRef) -> Option<usize> {
        match self.units.get(die.unit)?.header.offset() {
            UnitSectionOffset::DebugInfoOffset(start) => start.0.checked_add(die.offset.0),
            UnitSectionOffset::DebugTypesOffset(_) => None,
        }
    }

    /// Resolves a reference-class attribute found in unit `from`.
    fn resolve_ref(&self, from: usize, value: AttributeValue<R>) -> Result<DieRef, DwarfError> {
        match value {
            AttributeValue::UnitRef(offset) => Ok(DieRef { unit: from, offset }),
            AttributeValue::DebugInfoRef(offset) => self.die_at_info_offset(offset),
            AttributeValue::DebugTypesRef(sig) => {
                self.index.signatures.get(&sig.0).copied().ok_or_else(|| {
                    DwarfError::Malformed(format!("no type unit with signature {:#x}", sig.0))
                })
            }
            AttributeValue::DebugInfoRefSup(_) => Err(DwarfError::Unsupported(
                "reference into a supplementary (dwz) file".into(),
            )),
            _ => Err(DwarfError::Malformed(
                "type or origin attribute is not a reference".into(),
            )),
        }
    }

    fn die_at_info_offset(&self, offset: DebugInfoOffset<usize>) -> Result<DieRef, DwarfError> {
        let bad =
            || DwarfError::Malformed(format!("reference {:#x} is outside every unit", offset.0));
        let pos = self
            .info_units
            .partition_point(|&(start, _)| start <= offset.0);
        let &(_, idx) = self
            .info_units
            .get(pos.checked_sub(1).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let unit = self.unit(idx)?;
        let unit_offset = offset.to_unit_offset(&unit.header).ok_or_else(bad)?;
        Ok(DieRef {
            unit: idx,
            offset: unit_offset,
        })
    }

    fn name_of(&self, unit: &Unit, entry: &Die<'_, '_>) -> Result<Option<R>, DwarfError> {
        match entry.attr_value(gimli::DW_AT_name)? {
            Some(value) => Ok(Some(self.dwarf.attr_string(unit, value)?)),
            None => Ok(None),
        }
    }

    /// Follows typedefs, cv-qualifiers and declarations to the type that
    /// determines the layout. `None` means `void`.
    fn strip(&self, start: DieRef) -> Result<Option<(DieRef, DwTag)>, DwarfError> {
        let mut current = start;
        for _ in 0..MAX_TYPE_CHAIN {
            let unit = self.unit(current.unit)?;
            let entry = unit.entry(current.offset)?;
            let tag = entry.tag();
            if is_transparent(tag) {
                match entry.attr_value(gimli::DW_AT_type)? {
                    Some(value) => current = self.resolve_ref(current.unit, value)?,
                    None => return Ok(None),
                }
            } else if classify(tag) == Kind::Tagged && is_declaration(&entry)? {
                if let Some(sig) = entry.attr_value(gimli::DW_AT_signature)? {
                    current = self.resolve_ref(current.unit, sig)?;
                    continue;
                }
                let name = self.name_of(unit, &entry)?;
                let definition = name
                    .as_ref()
                    .and_then(|name| self.index.tags.get(name.bytes()))
                    .copied();
                match definition {
                    Some(definition) => current = definition,
                    None => {
                        let name = name.map_or_else(
                            || "<anonymous>".to_string(),
                            |name| String::from_utf8_lossy(name.bytes()).into_owned(),
                        );
                        return Err(DwarfError::IncompleteType { name });
                    }
                }
            } else {
                return Ok(Some((current, tag)));
            }
        }
        Err(DwarfError::Malformed(format!(
            "type chain longer than {MAX_TYPE_CHAIN} links (cycle?)"
        )))
    }

    /// Finds member `name` in the struct/union `aggregate` (already
    /// stripped), searching anonymous struct/union members recursively.
    /// `visited` holds the aggregates searched so far, so malformed DWARF
    /// whose anonymous members share or cycle through types cannot blow up.
    fn find_member(
        &self,
        aggregate: DieRef,
        name: &[u8],
        depth: usize,
        visited: &mut HashSet<DieRef>,
    ) -> Result<Option<Member>, DwarfError> {
        if !visited.insert(aggregate) {
            return Ok(None);
        }
        if depth > MAX_ANON_DEPTH {
            return Err(DwarfError::Malformed(format!(
                "anonymous members nested deeper than {MAX_ANON_DEPTH}"
            )));
        }
        let unit = self.unit(aggregate.unit)?;
        let member_type = |entry: &Die<'_, '_>| -> Result<Option<DieRef>, DwarfError> {
            entry
                .attr_value(gimli::DW_AT_type)?
                .map(|value| self.resolve_ref(aggregate.unit, value))
                .transpose()
        };
        let mut tree = unit.entries_tree(Some(aggregate.offset))?;
        let root = tree.root()?;
        let mut children = root.children();
        while let Some(child) = children.next()? {
            let entry = child.entry();
            if entry.tag() != gimli::DW_TAG_member {
                continue;
            }
            match self.name_of(unit, entry)? {
                Some(member_name) => {
                    if member_name.bytes() == name {
                        return Ok(Some(Member {
                            offset: member_offset(unit, entry)?,
                            ty: member_type(entry)?,
                        }));
                    }
                }
                None => {
                    // An anonymous struct/union: its members belong to us.
                    let Some(ty) = member_type(entry)? else {
                        continue;
                    };
                    let Some((inner, tag)) = self.strip(ty)? else {
                        continue;
                    };
                    if !is_aggregate(tag) {
                        continue;
                    }
                    if let Some(found) = self.find_member(inner, name, depth + 1, visited)? {
                        let base = member_offset(unit, entry)?.ok_or_else(|| {
                            DwarfError::Malformed("anonymous member is a bit-field".into())
                        })?;
                        let offset = match found.offset {
                            Some(inner_offset) => {
                                Some(base.checked_add(inner_offset).ok_or_else(|| {
                                    DwarfError::Malformed("member offsets overflow u64".into())
                                })?)
                            }
                            None => None,
                        };
                        return Ok(Some(Member {
                            offset,
                            ty: found.ty,
                        }));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The byte size of a type, `None` if it has none.
    fn type_size(&self, die: DieRef, depth: usize) -> Result<Option<u64>, DwarfError> {
        if depth > MAX_SIZE_DEPTH {
            return Err(DwarfError::Malformed(format!(
                "array element types nested deeper than {MAX_SIZE_DEPTH}"
            )));
        }
        let Some((die, tag)) = self.strip(die)? else {
            return Ok(None);
        };
        let unit = self.unit(die.unit)?;
        let entry = unit.entry(die.offset)?;
        if let Some(value) = entry.attr_value(gimli::DW_AT_byte_size)? {
            return Ok(value.udata_value());
        }
        match tag {
            gimli::DW_TAG_pointer_type
            | gimli::DW_TAG_reference_type
            | gimli::DW_TAG_rvalue_reference_type => {
                Ok(Some(u64::from(unit.header.address_size())))
            }
            gimli::DW_TAG_enumeration_type => match entry.attr_value(gimli::DW_AT_type)? {
                Some(value) => self.type_size(self.resolve_ref(die.unit, value)?, depth + 1),
                None => Ok(None),
            },
            gimli::DW_TAG_array_type => {
                let Some(element) = entry.attr_value(gimli::DW_AT_type)? else {
                    return Ok(None);
                };
                let element = self.resolve_ref(die.unit, element)?;
                let Some(element_size) = self.type_size(element, depth + 1)? else {
                    return Ok(None);
                };
                let Some(count) = array_count(unit, die)? else {
                    return Ok(None);
                };
                Ok(element_size.checked_mul(count))
            }
            _ => Ok(None),
        }
    }

    /// Appends the labels in the subtree of subprogram `die`.
    fn collect_labels(&self, die: DieRef, out: &mut Vec<(String, u64)>) -> Result<(), DwarfError> {
        let unit = self.unit(die.unit)?;
        let mut cursor = unit.entries_at_offset(die.offset)?;
        let Some((_, root)) = cursor.next_dfs()? else {
            return Ok(());
        };
        if !root.has_children() {
            return Ok(());
        }
        let mut depth: isize = 0;
        while let Some((delta, entry)) = cursor.next_dfs()? {
            depth += delta;
            if depth <= 0 {
                break;
            }
            if entry.tag() != gimli::DW_TAG_label {
                continue;
            }
            let Some(low_pc) = entry.attr_value(gimli::DW_AT_low_pc)? else {
                continue;
            };
            let Some(address) = self.dwarf.attr_address(unit, low_pc)? else {
                continue;
            };
            if let Some(name) = self.label_name(die.unit, entry)? {
                out.push((name, address));
            }
        }
        Ok(())
    }

    /// A label's name, directly or through its abstract origin(s).
    fn label_name(
        &self,
        unit_idx: usize,
        entry: &Die<'_, '_>,
    ) -> Result<Option<String>, DwarfError> {
        let unit = self.unit(unit_idx)?;
        if let Some(name) = self.name_of(unit, entry)? {
            return Ok(Some(name.to_string_lossy()?.into_owned()));
        }
        let mut origin = entry.attr_value(gimli::DW_AT_abstract_origin)?;
        let mut from = unit_idx;
        for _ in 0..MAX_ORIGIN_HOPS {
            let Some(value) = origin else {
                return Ok(None);
            };
            let target = self.resolve_ref(from, value)?;
            let unit = self.unit(target.unit)?;
            let entry = unit.entry(target.offset)?;
            if let Some(name) = self.name_of(unit, &entry)? {
                return Ok(Some(name.to_string_lossy()?.into_owned()));
            }
            origin = entry.attr_value(gimli::DW_AT_abstract_origin)?;
            from = target.unit;
        }
        Err(DwarfError::Malformed(format!(
            "abstract origin chain longer than {MAX_ORIGIN_HOPS} links"
        )))
    }
}

/// A member found by [`DwarfInfo::find_member`].
struct Member {
    /// Byte offset from the start of the searched aggregate; `None` for a
    /// bit-field.
    offset: Option<u64>,
    /// The member's type (`None` if DWARF gives none).
    ty: Option<DieRef>,
}

/// Copies one section out of the object file (empty if absent or not needed).
fn load_section(
    file: &object::File<'_>,
    id: SectionId,
    endian: RunTimeEndian,
) -> Result<R, DwarfError> {
    if !NEEDED_SECTIONS.contains(&id) {
        return Ok(SectionReader::empty_section(endian));
    }
    let Some(section) = file.section_by_name(id.name()) else {
        return Ok(SectionReader::empty_section(endian));
    };
    let data = section
        .uncompressed_data()
        .map_err(|source| DwarfError::Section {
            name: id.name(),
            source,
        })?;
    Ok(SectionReader::new(Arc::from(data.as_ref()), endian))
}

/// How the index pass treats a unit.
enum UnitRole {
    /// Index its DIEs; for a type unit, also register its signature and the
    /// offset of the type it defines.
    Index(Option<(u64, UnitOffset<usize>)>),
    /// A split-DWARF unit whose DIEs live in a `.dwo` file.
    Skip,
}

fn unit_role(header: &gimli::UnitHeader<R>) -> UnitRole {
    match header.type_() {
        UnitType::Compilation | UnitType::Partial => UnitRole::Index(None),
        UnitType::Type {
            type_signature,
            type_offset,
        } => UnitRole::Index(Some((type_signature.0, type_offset))),
        UnitType::Skeleton(_) | UnitType::SplitCompilation(_) | UnitType::SplitType { .. } => {
            UnitRole::Skip
        }
    }
}

/// The index pass over one unit's top-level DIEs.
fn index_unit(
    dwarf: &gimli::Dwarf<R>,
    unit: &Unit,
    idx: usize,
    unit_start: Option<usize>,
    index: &mut Index,
) -> Result<(), DwarfError> {
    let mut raw = unit.entries_raw(None)?;
    let Some(root) = raw.read_abbreviation()? else {
        return Ok(());
    };
    raw.skip_attributes(root.attributes())?;
    if !root.has_children() {
        return Ok(());
    }

    while !raw.is_empty() {
        let offset = raw.next_offset();
        // A null entry ends the root's children.
        let Some(abbrev) = raw.read_abbreviation()? else {
            break;
        };
        let kind = classify(abbrev.tag());
        if kind == Kind::Other && !abbrev.has_children() {
            raw.skip_attributes(abbrev.attributes())?;
            continue;
        }

        let mut attrs = TopAttrs::default();
        for spec in abbrev.attributes() {
            let attr = raw.read_attribute(*spec)?;
            match attr.name() {
                gimli::DW_AT_name if kind != Kind::Other => attrs.name = Some(attr.value()),
                gimli::DW_AT_declaration => {
                    attrs.declaration = matches!(attr.value(), AttributeValue::Flag(true));
                }
                gimli::DW_AT_sibling => {
                    if let AttributeValue::UnitRef(sibling) = attr.value() {
                        attrs.sibling = Some(sibling);
                    }
                }
                gimli::DW_AT_abstract_origin | gimli::DW_AT_specification
                    if kind == Kind::Subprogram =>
                {
                    attrs.origin = Some(attr.value());
                }
                _ => {}
            }
        }
        record(
            dwarf,
            unit,
            DieRef { unit: idx, offset },
            kind,
            unit_start,
            &attrs,
            index,
        );

        if abbrev.has_children() {
            match attrs.sibling {
                // Only jump forward, so malformed siblings cannot loop.
                Some(sibling) if sibling > raw.next_offset() => {
                    raw = unit.entries_raw(Some(sibling))?;
                }
                _ => skip_children(&mut raw)?,
            }
        }
    }
    Ok(())
}

/// Adds one top-level DIE to the index.
fn record(
    dwarf: &gimli::Dwarf<R>,
    unit: &Unit,
    die: DieRef,
    kind: Kind,
    unit_start: Option<usize>,
    attrs: &TopAttrs,
    index: &mut Index,
) {
    // A name we cannot read (e.g. in a supplementary file) just leaves the
    // DIE out of the index.
    let name = attrs
        .name
        .clone()
        .and_then(|value| dwarf.attr_string(unit, value).ok());
    let name = name.as_ref().map(SectionReader::bytes);
    match kind {
        Kind::Tagged => {
            if let Some(name) = name
                && !attrs.declaration
            {
                Index::insert_first(&mut index.tags, name, die);
            }
        }
        Kind::Typedef => {
            if let Some(name) = name {
                Index::insert_first(&mut index.typedefs, name, die);
            }
        }
        Kind::Base => {
            if let Some(name) = name {
                Index::insert_first(&mut index.base_types, name, die);
            }
        }
        Kind::Subprogram => {
            if let Some(name) = name {
                match index.subprograms.get_mut(name) {
                    Some(list) => list.push(die),
                    None => {
                        index.subprograms.insert(name.to_vec(), vec![die]);
                    }
                }
            }
            let target = match &attrs.origin {
                Some(AttributeValue::UnitRef(offset)) => {
                    unit_start.and_then(|start| start.checked_add(offset.0))
                }
                Some(AttributeValue::DebugInfoRef(offset)) => Some(offset.0),
                _ => None,
            };
            if let Some(target) = target {
                index.instances.entry(target).or_default().push(die);
            }
        }
        Kind::Other => {}
    }
}

/// Skips the children of the DIE just read (whose abbreviation has children).
fn skip_children(raw: &mut gimli::EntriesRaw<'_, '_, R>) -> Result<(), DwarfError> {
    let mut depth = 1usize;
    while depth > 0 {
        if raw.is_empty() {
            return Err(DwarfError::Malformed(
                "unterminated list of child DIEs".into(),
            ));
        }
        match raw.read_abbreviation()? {
            None => depth -= 1,
            Some(abbrev) => {
                raw.skip_attributes(abbrev.attributes())?;
                if abbrev.has_children() {
                    depth += 1;
                }
            }
        }
    }
    Ok(())
}

fn is_declaration(entry: &Die<'_, '_>) -> Result<bool, DwarfError> {
    Ok(matches!(
        entry.attr_value(gimli::DW_AT_declaration)?,
        Some(AttributeValue::Flag(true))
    ))
}

/// A member's byte offset; `None` for a bit-field.
fn member_offset(unit: &Unit, entry: &Die<'_, '_>) -> Result<Option<u64>, DwarfError> {
    if entry.attr(gimli::DW_AT_bit_size)?.is_some() {
        return Ok(None);
    }
    if let Some(value) = entry.attr_value(gimli::DW_AT_data_member_location)? {
        return match value {
            AttributeValue::Exprloc(expression) => {
                // DWARF 2/3 style: DW_OP_plus_uconst N (or a lone constant).
                let mut ops = expression.operations(unit.encoding());
                match (ops.next()?, ops.next()?) {
                    (Some(gimli::Operation::PlusConstant { value }), None)
                    | (Some(gimli::Operation::UnsignedConstant { value }), None) => Ok(Some(value)),
                    _ => Err(DwarfError::Unsupported(
                        "member location expression other than DW_OP_plus_uconst".into(),
                    )),
                }
            }
            AttributeValue::LocationListsRef(_) | AttributeValue::SecOffset(_) => Err(
                DwarfError::Unsupported("member location given as a location list".into()),
            ),
            other => other.udata_value().map(Some).ok_or_else(|| {
                DwarfError::Malformed("negative or non-constant member offset".into())
            }),
        };
    }
    if let Some(value) = entry.attr_value(gimli::DW_AT_data_bit_offset)? {
        let bits = value
            .udata_value()
            .ok_or_else(|| DwarfError::Malformed("non-constant DW_AT_data_bit_offset".into()))?;
        return Ok((bits % 8 == 0).then_some(bits / 8));
    }
    // Union members (and sometimes a struct's first member) omit it.
    Ok(Some(0))
}

/// Number of elements of an array type (product over its dimensions);
/// `None` if a dimension is unbounded or not a constant.
fn array_count(unit: &Unit, array: DieRef) -> Result<Option<u64>, DwarfError> {
    let mut tree = unit.entries_tree(Some(array.offset))?;
    let root = tree.root()?;
    let mut children = root.children();
    let mut total: u64 = 1;
    let mut dimensions = 0usize;
    while let Some(child) = children.next()? {
        let entry = child.entry();
        if entry.tag() != gimli::DW_TAG_subrange_type {
            continue;
        }
        dimensions += 1;
        let count = if let Some(count) = entry.attr_value(gimli::DW_AT_count)? {
            count.udata_value()
        } else if let Some(upper) = entry.attr_value(gimli::DW_AT_upper_bound)? {
            let lower = match entry.attr_value(gimli::DW_AT_lower_bound)? {
                Some(lower) => lower.udata_value(),
                None => Some(0),
            };
            match (signed_bound(&upper), lower) {
                // `T x[0]` is emitted as upper bound -1.
                (Some(-1), _) => Some(0),
                (Some(upper), Some(lower)) => u64::try_from(upper)
                    .ok()
                    .and_then(|upper| upper.checked_sub(lower))
                    .and_then(|span| span.checked_add(1)),
                _ => None,
            }
        } else {
            None
        };
        let Some(count) = count else {
            return Ok(None);
        };
        let Some(product) = total.checked_mul(count) else {
            return Ok(None);
        };
        total = product;
    }
    Ok((dimensions > 0).then_some(total))
}

/// An array bound as a signed number: data forms are unsigned except that an
/// all-ones value of a full-width form means -1.
fn signed_bound(value: &AttributeValue<R>) -> Option<i128> {
    match *value {
        AttributeValue::Sdata(v) => Some(i128::from(v)),
        AttributeValue::Data4(u32::MAX) | AttributeValue::Data8(u64::MAX) => Some(-1),
        ref other => other.udata_value().map(i128::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;

    const VERSIONS: [&str; 6] = pyprobe_testenv::PYENV_BUILDS;

    fn library_path(version: &str) -> PathBuf {
        pyprobe_testenv::pyenv_library(version)
    }

    fn read_library(version: &str) -> Vec<u8> {
        let path = library_path(version);
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "pyenv library {} (Python {version}) is missing or unreadable: {e}",
                path.display()
            )
        })
    }

    /// Parses each library once (serialised, so the printed times are not
    /// skewed by parallel parses) and shares the result between tests.
    fn info(version: &str) -> Arc<DwarfInfo> {
        static CACHE: OnceLock<Mutex<HashMap<String, Arc<DwarfInfo>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let mut cache = cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(info) = cache.get(version) {
            return Arc::clone(info);
        }
        let bytes = read_library(version);
        let started = Instant::now();
        let parsed = DwarfInfo::parse(&bytes)
            .unwrap_or_else(|e| panic!("parsing DWARF of Python {version}: {e}"))
            .unwrap_or_else(|| panic!("Python {version}: library has no DWARF"));
        eprintln!(
            "dwarf: parsed {} ({:.1} MB) in {:?}: {parsed:?}",
            library_path(version).display(),
            bytes.len() as f64 / 1e6,
            started.elapsed()
        );
        let parsed = Arc::new(parsed);
        cache.insert(version.to_string(), Arc::clone(&parsed));
        parsed
    }

    fn offset(version: &str, type_name: &str, path: &str) -> u64 {
        info(version)
            .offset_of(type_name, path)
            .unwrap_or_else(|e| panic!("Python {version}: offset_of({type_name}, {path}): {e}"))
    }

    fn check_all(type_name: &str, path: &str, expected: [u64; 6]) {
        for (version, want) in VERSIONS.iter().zip(expected) {
            assert_eq!(
                offset(version, type_name, path),
                want,
                "Python {version}: {type_name}.{path}"
            );
        }
    }

    fn check(version: &str, type_name: &str, path: &str, want: u64) {
        assert_eq!(
            offset(version, type_name, path),
            want,
            "Python {version}: {type_name}.{path}"
        );
    }

    #[test]
    fn dwarf_info_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<DwarfInfo>();
        assert_send_sync::<DwarfError>();
    }

    #[test]
    fn parse_all_libraries() {
        for version in VERSIONS {
            info(version);
        }
    }

    #[test]
    fn runtime_interpreters_head() {
        check_all(
            "_PyRuntimeState",
            "interpreters.head",
            [32, 32, 32, 40, 40, 632],
        );
        // The struct tag names the same type.
        for version in VERSIONS {
            assert_eq!(
                offset(version, "pyruntimestate", "interpreters.head"),
                offset(version, "_PyRuntimeState", "interpreters.head"),
                "Python {version}"
            );
        }
    }

    #[test]
    fn thread_state() {
        check_all("PyThreadState", "thread_id", [176, 176, 176, 152, 136, 152]);
        check("3.11.7", "PyThreadState", "native_thread_id", 160);
        check("3.12.1", "PyThreadState", "native_thread_id", 144);
        check("3.13.0", "PyThreadState", "native_thread_id", 160);
        for (version, want) in VERSIONS.iter().zip([264, 264, 280, 360, 288, 304]) {
            let info = info(version);
            assert_eq!(
                info.size_of("PyThreadState").unwrap(),
                want,
                "Python {version}"
            );
            assert_eq!(info.size_of("_ts").unwrap(), want, "Python {version}");
            assert_eq!(
                info.offset_of("_ts", "thread_id").unwrap(),
                info.offset_of("PyThreadState", "thread_id").unwrap()
            );
        }
    }

    #[test]
    fn frame_object_before_311() {
        for (i, version) in VERSIONS[..3].iter().enumerate() {
            check(version, "PyFrameObject", "f_back", 24);
            check(version, "PyFrameObject", "f_code", 32);
            check(version, "PyFrameObject", "f_lasti", [104, 104, 96][i]);
            check(version, "PyFrameObject", "f_localsplus", [360, 360, 352][i]);
            check(version, "_frame", "f_code", 32);
        }
    }

    #[test]
    fn interpreter_frame() {
        let v = "3.11.7";
        check(v, "_PyInterpreterFrame", "f_code", 32);
        check(v, "_PyInterpreterFrame", "previous", 48);
        check(v, "_PyInterpreterFrame", "prev_instr", 56);
        check(v, "_PyInterpreterFrame", "owner", 69);
        check(v, "_PyInterpreterFrame", "localsplus", 72);
        let v = "3.12.1";
        check(v, "_PyInterpreterFrame", "f_code", 0);
        check(v, "_PyInterpreterFrame", "previous", 8);
        check(v, "_PyInterpreterFrame", "prev_instr", 56);
        check(v, "_PyInterpreterFrame", "owner", 70);
        let v = "3.13.0";
        check(v, "_PyInterpreterFrame", "f_executable", 0);
        check(v, "_PyInterpreterFrame", "previous", 8);
        check(v, "_PyInterpreterFrame", "instr_ptr", 56);
        check(v, "_PyInterpreterFrame", "owner", 70);
        check(v, "_PyInterpreterFrame", "localsplus", 72);
    }

    #[test]
    fn code_object() {
        check("3.11.7", "PyCodeObject", "co_code_adaptive", 184);
        check("3.12.1", "PyCodeObject", "co_code_adaptive", 192);
        check("3.13.0", "PyCodeObject", "co_code_adaptive", 200);
        check_all(
            "PyCodeObject",
            "co_filename",
            [104, 104, 104, 112, 112, 112],
        );
        check_all("PyCodeObject", "co_firstlineno", [40, 40, 40, 72, 68, 68]);
    }

    #[test]
    fn gilstate_tstate_current() {
        for (version, want) in VERSIONS[..4].iter().zip([1368, 568, 568, 576]) {
            check(version, "_PyRuntimeState", "gilstate.tstate_current", want);
        }
        for version in ["3.12.1", "3.13.0"] {
            match info(version).offset_of("_PyRuntimeState", "gilstate.tstate_current") {
                Err(DwarfError::MemberNotFound { type_name, member }) => {
                    assert_eq!(type_name, "_PyRuntimeState");
                    assert_eq!(member, "gilstate.tstate_current");
                }
                other => panic!("Python {version}: expected MemberNotFound, got {other:?}"),
            }
        }
    }

    #[test]
    fn cframe_and_current_frame() {
        check("3.11.7", "PyThreadState", "cframe", 56);
        check("3.12.1", "PyThreadState", "cframe", 56);
        check("3.11.7", "_PyCFrame", "current_frame", 8);
        check("3.12.1", "_PyCFrame", "current_frame", 0);
        check("3.13.0", "PyThreadState", "current_frame", 72);
    }

    #[test]
    fn interpreter_state_and_object() {
        for version in VERSIONS {
            let info = info(version);
            assert_eq!(info.offset_of("PyObject", "ob_type").unwrap(), 8);
            assert_eq!(info.size_of("PyObject").unwrap(), 16);
            assert_eq!(info.offset_of("_object", "ob_type").unwrap(), 8);
            // 3.13 moved `struct _ceval_state ceval` to the front of _is.
            let next = if version == "3.13.0" { 7264 } else { 0 };
            assert_eq!(info.offset_of("PyInterpreterState", "next").unwrap(), next);
            assert_eq!(info.offset_of("_is", "next").unwrap(), next);
            assert_eq!(info.size_of("int").unwrap(), 4);
            assert_eq!(info.size_of("Py_ssize_t").unwrap(), 8);
        }
    }

    #[test]
    fn anonymous_members_are_transparent() {
        for version in VERSIONS {
            let info = info(version);
            // glibc's struct rusage wraps each long in an anonymous union:
            // `__extension__ union { long ru_maxrss; __syscall_slong_t __ru_maxrss_word; };`
            assert_eq!(info.offset_of("rusage", "ru_maxrss").unwrap(), 32);
            assert_eq!(info.offset_of("rusage", "ru_nivcsw").unwrap(), 136);
            assert_eq!(info.offset_of("rusage", "__ru_nivcsw_word").unwrap(), 136);
            assert_eq!(info.size_of("rusage").unwrap(), 144);
            assert_eq!(info.offset_of("PyObject", "ob_refcnt").unwrap(), 0);
        }
        // 3.12+: `union { Py_ssize_t ob_refcnt; uint32_t ob_refcnt_split[2]; };`
        for version in ["3.12.1", "3.13.0"] {
            assert_eq!(
                info(version)
                    .offset_of("PyObject", "ob_refcnt_split")
                    .unwrap(),
                0
            );
        }
        assert!(matches!(
            info("3.11.7").offset_of("PyObject", "ob_refcnt_split"),
            Err(DwarfError::MemberNotFound { .. })
        ));
    }

    #[test]
    fn nested_struct_members_and_bit_fields() {
        let info = info("3.12.1");
        // PyThreadState._status is a struct of bit-fields.
        assert_eq!(info.offset_of("PyThreadState", "_status").unwrap(), 24);
        match info.offset_of("PyThreadState", "_status.finalized") {
            Err(DwarfError::BitField { type_name, member }) => {
                assert_eq!(type_name, "PyThreadState");
                assert_eq!(member, "_status.finalized");
            }
            other => panic!("expected BitField, got {other:?}"),
        }
        assert_eq!(
            info.offset_of("PyThreadState", "trash.delete_later")
                .unwrap(),
            160
        );
        assert_eq!(
            info.offset_of("PyThreadState", "root_cframe.current_frame")
                .unwrap(),
            272
        );
        assert_eq!(info.size_of("_PyCFrame").unwrap(), 16);
    }

    #[test]
    fn query_errors() {
        let info = info("3.12.1");
        assert!(matches!(
            info.offset_of("NoSuchType_xyz", "a"),
            Err(DwarfError::TypeNotFound { .. })
        ));
        assert!(matches!(
            info.offset_of("PyThreadState", ""),
            Err(DwarfError::InvalidPath { .. })
        ));
        assert!(matches!(
            info.offset_of("PyThreadState", "interp..x"),
            Err(DwarfError::InvalidPath { .. })
        ));
        match info.offset_of("PyThreadState", "thread_id.x") {
            Err(DwarfError::NotAStruct { member, .. }) => assert_eq!(member, "thread_id"),
            other => panic!("expected NotAStruct, got {other:?}"),
        }
        // Pointers are not walked through.
        assert!(matches!(
            info.offset_of("PyThreadState", "interp.next"),
            Err(DwarfError::NotAStruct { .. })
        ));
        assert!(matches!(
            info.offset_of("int", "x"),
            Err(DwarfError::NotAStruct { .. })
        ));
        assert!(matches!(
            info.size_of("void_nonexistent"),
            Err(DwarfError::TypeNotFound { .. })
        ));
        assert!(matches!(
            info.labels_in("no_such_function_xyz"),
            Err(DwarfError::FunctionNotFound { .. })
        ));
    }

    /// `[start, end)` of a function symbol, from the ELF symbol tables.
    fn symbol_range(bytes: &[u8], name: &str) -> (u64, u64) {
        use object::ObjectSymbol;
        let file = object::File::parse(bytes).unwrap();
        file.symbols()
            .chain(file.dynamic_symbols())
            .find(|sym| sym.name() == Ok(name) && sym.size() > 0)
            .map(|sym| (sym.address(), sym.address() + sym.size()))
            .unwrap_or_else(|| panic!("symbol {name} not found"))
    }

    #[test]
    fn eval_frame_labels() {
        for version in ["3.11.7", "3.12.1", "3.13.0"] {
            let info = info(version);
            let labels = info.labels_in("_PyEval_EvalFrameDefault").unwrap();
            let bytes = read_library(version);
            let (start, end) = symbol_range(&bytes, "_PyEval_EvalFrameDefault");
            let inside = labels
                .iter()
                .filter(|(_, a)| (start..end).contains(a))
                .count();
            eprintln!(
                "dwarf: Python {version}: {} labels in _PyEval_EvalFrameDefault \
                 ({inside} inside the symbol {start:#x}..{end:#x})",
                labels.len()
            );
            for wanted in ["start_frame", "TARGET_RESUME"] {
                let found: Vec<u64> = labels
                    .iter()
                    .filter(|(name, _)| name == wanted)
                    .map(|&(_, address)| address)
                    .collect();
                assert!(!found.is_empty(), "Python {version}: no label {wanted}");
                for address in found {
                    eprintln!("dwarf: Python {version}: {wanted} at {address:#x}");
                    assert!(
                        (start..end).contains(&address),
                        "Python {version}: {wanted} at {address:#x} outside {start:#x}..{end:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn stripped_debian_python_has_no_dwarf() {
        let path = "/usr/bin/python3.11";
        let bytes = std::fs::read(path)
            .unwrap_or_else(|e| panic!("{path} (stripped Debian python) is missing: {e}"));
        assert!(DwarfInfo::parse(&bytes).unwrap().is_none());
    }

    #[test]
    fn garbage_input_does_not_panic() {
        assert!(DwarfInfo::parse(&[]).is_err());
        assert!(DwarfInfo::parse(b"not an elf at all").is_err());
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert!(DwarfInfo::parse(&noise).is_err());

        let bytes = read_library("3.8.18");
        // Truncations: headers only, cut inside the sections, cut just
        // before the section headers.
        for len in [4, 64, 4096, 1 << 20, bytes.len() / 2, bytes.len() - 100] {
            let result = DwarfInfo::parse(&bytes[..len]);
            eprintln!("dwarf: truncated to {len}: {}", describe(&result));
        }
    }

    #[test]
    fn corrupted_dwarf_does_not_panic() {
        let original = read_library("3.8.18");
        let file = object::File::parse(&*original).unwrap();
        let ranges: Vec<(u64, u64)> = [".debug_info", ".debug_abbrev", ".debug_str"]
            .iter()
            .filter_map(|name| file.section_by_name(name)?.file_range())
            .collect();
        drop(file);
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..6 {
            let mut bytes = original.clone();
            let (offset, size) = ranges[round % ranges.len()];
            // Scribble over 64 random bytes of the section.
            for _ in 0..64 {
                let at = (offset + next() % size) as usize;
                bytes[at] = next() as u8;
            }
            let result = DwarfInfo::parse(&bytes);
            eprintln!("dwarf: corruption round {round}: {}", describe(&result));
            if let Ok(Some(info)) = result {
                // Queries must not panic either.
                let _ = info.offset_of("PyThreadState", "thread_id");
                let _ = info.offset_of("_PyRuntimeState", "interpreters.head");
                let _ = info.size_of("PyThreadState");
                let _ = info.labels_in("_PyEval_EvalFrameDefault");
            }
        }
    }

    fn describe(result: &Result<Option<DwarfInfo>, DwarfError>) -> String {
        match result {
            Ok(Some(_)) => "parsed".into(),
            Ok(None) => "no DWARF".into(),
            Err(e) => format!("error: {e}"),
        }
    }
}
