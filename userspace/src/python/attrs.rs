//! Attribute, key and index lookups in a live interpreter's memory, the way
//! a log point's capture (`order.user.name`, `order.meta["source"]`,
//! `order.items[0]`, `len(order.items)`) will run in an eBPF program.
//!
//! This module is the reference model of that kernel code: every function
//! only does what a BPF program can do, so the BPF port can be tested
//! against it read for read.
//!
//! - No recursion and no allocation. A nested path (`order.user.name`) is a
//!   loop in the caller over single steps.
//! - Loops are bounded by constants: at most [`MAX_ENTRIES`] dict entries
//!   are scanned per lookup, and names and keys are compared over at most
//!   [`MAX_KEY_BYTES`] bytes.
//! - Every read is a plain read of a fixed size (at most 40 bytes) at a
//!   computed address. The one read whose size varies, a key's characters,
//!   is at most [`MAX_KEY_BYTES`] long and so can be a bounded-length
//!   `bpf_probe_read_user`.
//! - Nothing in the target is executed: no `__getattr__`, `__eq__`,
//!   `__hash__`, properties or descriptors. Only the object's own storage
//!   is read.
//!
//! Per-version knowledge comes only from [`VersionInfo`] data
//! ([`super::offsets`]) and the named constants below; the code branches on
//! [`InstanceDictModel`] and [`DictKeysModel`], never on version numbers.
//!
//! # Results
//!
//! Each lookup answers [`Lookup::Found`] (the `PyObject *` found),
//! [`Lookup::Missing`] (the object certainly has no such attribute, key or
//! index), or [`Lookup::Unsupported`] (the answer needs something this model
//! does not do: a `__slots__` object, a dict with more than [`MAX_ENTRIES`]
//! entries, a name longer than [`MAX_KEY_BYTES`]...). A read that fails or
//! data that makes no sense (a process that changed under us, a wrong
//! address) is a [`ReadError`].
//!
//! # Reading one dict ("D")
//!
//! A `dict` object (exact type or subclass: the storage is the same):
//!
//! 1. 16 bytes at `dict + 32`: `ma_keys` (+32) and `ma_values` (+40, NULL for
//!    a combined table).
//! 2. The keys header ("K"), one read at `ma_keys`:
//!    - [`DictKeysModel::Sized`] (3.8-3.10): 40 bytes: `dk_size` (+8),
//!      `dk_nentries` (+32). The index array at +40 has `dk_size` slots of 1,
//!      2, 4 or 8 bytes (by `dk_size`), then the entries, 24 bytes each
//!      (`me_hash`, `me_key`, `me_value`).
//!    - [`DictKeysModel::Log2`] (3.11+): 32 bytes: `dk_log2_size` (+8),
//!      `dk_log2_index_bytes` (+9), `dk_kind` (+10), `dk_nentries` (+24).
//!      The entries start at `+32 + (1 << dk_log2_index_bytes)`: 24 bytes
//!      (`me_hash`, `me_key`, `me_value`) for kind 0 (general), 16 bytes
//!      (`me_key`, `me_value`) for kinds 1 (unicode: every key an exact
//!      `str`) and 2 (split).
//! 3. The scan ("S"): for entry `i` in `0..min(dk_nentries, MAX_ENTRIES)`,
//!    one read of the entry (16 or 24 bytes) at `entries + i * size`. An
//!    entry whose key is NULL is skipped, and so is one whose value is NULL
//!    in a combined table (deleted). In a split table (`ma_values` set) the
//!    entry's own value is always NULL, the value being in the values array.
//!    - str needle: 32 bytes at `key + 8` (`ob_type` +8, `length` +16,
//!      `hash` +24, `state` +32). The key matches when its type is exactly
//!      `str`, its length (code points) equals the needle's, it is compact
//!      with 1-byte characters, ASCII exactly when the needle is, and
//!      `length` bytes at its data (`key + Offsets::unicode_ascii_data` for
//!      ASCII, `key + Offsets::unicode_compact_data` otherwise) equal the
//!      needle's Latin-1 bytes. Keys of other types are never equal (their
//!      `__eq__` is not run); strings that are not compact or have 2- or
//!      4-byte characters cannot equal a needle that fits Latin-1.
//!    - int needle `n` (|n| < 2^60): only general entries carry a hash; a
//!      unicode or split table holds only `str` keys, so the answer is
//!      [`Lookup::Missing`] without reading any entry. An entry is a
//!      candidate only when `me_hash` equals `hash(n)` (`n`, or -2 for -1),
//!      exactly as CPython decides which keys to compare. A candidate that
//!      is `True`/`False` (by address) compares as 1/0; one of exact type
//!      `int` needs 16 bytes at `key + 16` (`ob_size`/`lv_tag` and two
//!      30-bit digits, by [`LongModel`]); one of exact type `float`, 8 bytes
//!      at `key + 16`. A candidate of any other type (whose `__eq__` would
//!      decide) makes the lookup [`Lookup::Unsupported`].
//!    - After the loop: not found and `dk_nentries > MAX_ENTRIES` is
//!      [`Lookup::Unsupported`]; otherwise [`Lookup::Missing`].
//! 4. Found at entry `i`: in a combined table the entry's value; in a split
//!    table 8 bytes at `ma_values + Offsets::dict_values_items + 8 * i`
//!    (NULL there means the attribute was deleted or never set on this
//!    object: [`Lookup::Missing`]).
//!
//! # Instance attributes, per [`InstanceDictModel`]
//!
//! All start with 8 bytes at `obj + 8` (`ob_type`). "TypeOffset" below is
//! the pre-3.11 path, also taken on 3.11+ by types without
//! `Py_TPFLAGS_MANAGED_DICT` (modules, classes as objects, C types with a
//! `__dict__`): 8 bytes at `type + 288` (`tp_dictoffset`, signed); 0 means no
//! `__dict__` (a class with `__slots__`, or a builtin):
//! [`Lookup::Unsupported`]; negative (up to 3.11, an `int` or `tuple`
//! subclass keeps its `__dict__` after its variable part; 3.12+ gives those
//! a managed dict) is [`Lookup::Unsupported`]; else 8 bytes at
//! `obj + tp_dictoffset` (the dict, NULL: no attributes yet, Missing) then
//! D. A lookup through shared keys ("V") reads 8 bytes at `type +
//! Offsets::heaptype_cached_keys` (only for heap types: `tp_flags` bit
//! [`TPFLAGS_HEAPTYPE`]; otherwise [`ReadError::Corrupt`]), then K and S of
//! those keys as a split table, and finally 8 bytes at `values + 8 * i`
//! where `values` is where the values array starts.
//!
//! - [`InstanceDictModel::TypeOffset`] (3.8-3.10): `ob_type`, then
//!   TypeOffset. The dict is often split (its keys are the class's shared
//!   keys, its values in `ma_values`), which D handles.
//! - [`InstanceDictModel::ValuesOrDict`] (3.11): `ob_type`, 8 bytes at
//!   `type + 168` (`tp_flags`); without [`TPFLAGS_MANAGED_DICT`]:
//!   TypeOffset. With it: 8 bytes at `obj - 32` ([`MANAGED_VALUES_OFFSET`],
//!   the values array pointer). Non-NULL: V with `values = pointer +
//!   dict_values_items`. NULL: 8 bytes at `obj - 24`
//!   ([`MANAGED_DICT_OFFSET`], the dict; NULL means no attributes, Missing)
//!   then D.
//! - [`InstanceDictModel::TaggedDictOrValues`] (3.12): `ob_type`,
//!   `tp_flags`; without [`TPFLAGS_MANAGED_DICT`]: TypeOffset. With it: 8
//!   bytes at `obj - 24` (`_PyDictOrValues`). Bit 0 set: the word is the
//!   values pointer minus one ([`DICT_OR_VALUES_TAG`]), so V with `values =
//!   word + 1 + dict_values_items`. Bit 0 clear: the dict (NULL: Missing),
//!   then D.
//! - [`InstanceDictModel::InlineValues`] (3.13+): `ob_type`, `tp_flags`;
//!   without [`TPFLAGS_MANAGED_DICT`]: TypeOffset. With it: 8 bytes at
//!   `obj - 24` (the managed dict). Non-NULL: D (a dict materialized by
//!   `vars(obj)` or `obj.__dict__` shares the inline values as its split
//!   values while they are valid, and holds a combined table once they are
//!   not, so it is always the whole truth). NULL and the type has
//!   [`TPFLAGS_INLINE_VALUES`]: 8 bytes at `type + 32` (`tp_basicsize`), the
//!   inline `PyDictValues` being at `obj + tp_basicsize`; 4 bytes there
//!   (`capacity` +0, `size` +1, `embedded` +2, `valid` +3,
//!   [`DICT_VALUES_VALID`]); `valid` 0: Missing; else V with `values = obj +
//!   tp_basicsize + dict_values_items`, an index at or beyond `capacity`
//!   being Missing. NULL without inline values: no attributes yet, Missing.
//!
//! # Limits
//!
//! - A key whose type is not exactly `str` never equals a str needle, even
//!   a `str` subclass (e.g. a `StrEnum` member) that Python might find: its
//!   `__hash__`/`__eq__` could be anything and are not run.
//! - Names and str keys are compared in Latin-1: a needle beyond U+00FF or
//!   longer than [`MAX_KEY_BYTES`] is [`Lookup::Unsupported`].
//! - Int needles need `|n| < 2^60`; `True`, `False` and integral floats as
//!   keys match as in Python (`{True: x}[1]`, `{2.0: y}[2]`).
//! - Up to 3.10 a keys object does not say whether all its keys are `str`,
//!   so an int lookup in a str-keyed dict of more than [`MAX_ENTRIES`]
//!   entries is [`Lookup::Unsupported`] (3.11+: [`Lookup::Missing`]).
//!
//! # Items and lengths
//!
//! - [`Target::sequence_item`]: `ob_type`; 8 bytes at `obj + 16` (`ob_size`);
//!   a negative index counts from the end; out of range is Missing; then 8
//!   bytes at `obj + 24` (a list's `ob_item` pointer) or nothing (a tuple's
//!   items are inline at `Offsets::tuple_items`), and 8 bytes at `items + 8 *
//!   index`.
//! - [`Target::length`]: `ob_type`; 8 bytes at `obj + 16`: `length` of a
//!   `str` (code points), `ob_size` of `bytes`, `list` and `tuple`,
//!   `ma_used` of a `dict` (all at 16). Types are compared exactly.

use super::{
    memory::Memory,
    offsets::{InstanceDictModel, LongModel, VersionInfo, common},
    reader::{ReadError, Target},
    values::TypeKind,
};

/// Most dict entries (live or deleted) scanned by one lookup.
pub const MAX_ENTRIES: u64 = 64;
/// Longest name or str key compared, in bytes (= code points, as keys are
/// compared in Latin-1).
pub const MAX_KEY_BYTES: usize = 32;
/// Int keys are compared when their absolute value is below `2^MAX_INT_BITS`
/// (two 30-bit digits; their hash is then the value itself).
pub const MAX_INT_BITS: u32 = 60;

pub use pyprobe_common::objects::{TPFLAGS_INLINE_VALUES, TPFLAGS_MANAGED_DICT};
/// `Py_TPFLAGS_HEAPTYPE` (`Include/object.h`): the type is a
/// `PyHeapTypeObject`, so `ht_cached_keys` exists.
pub const TPFLAGS_HEAPTYPE: u64 = 1 << 9;
/// `MANAGED_DICT_OFFSET` (`Include/internal/pycore_object.h`, GIL builds):
/// `-3 * sizeof(PyObject *)`, the managed dict (3.11, 3.13+) or
/// `_PyDictOrValues` (3.12) before the object.
pub const MANAGED_DICT_OFFSET: i64 = -24;
/// `_PyObject_ValuesPointer` (3.11 `Include/internal/pycore_object.h`):
/// `((PyDictValues **)obj) - 4`.
pub const MANAGED_VALUES_OFFSET: i64 = -32;
/// `_PyDictOrValues_GetValues` (3.12 `Include/internal/pycore_object.h`):
/// bit 0 of the word marks values, stored as `(char *)values - 1`.
pub const DICT_OR_VALUES_TAG: u64 = 1;
/// `PyDictValues.capacity` (`uint8_t`, 3.13+ `Include/internal/pycore_dict.h`).
pub const DICT_VALUES_CAPACITY: u64 = 0;
/// `PyDictValues.valid` (`uint8_t`, 3.13+ `Include/internal/pycore_dict.h`,
/// after `capacity`, `size` and `embedded`).
pub const DICT_VALUES_VALID: u64 = 3;

/// `PyASCIIObject.state` bits of GIL builds (3.8-3.14).
const STATE_KIND_SHIFT: u32 = 2;
const STATE_COMPACT: u32 = 1 << 5;
const STATE_ASCII: u32 = 1 << 6;

/// The answer of one lookup step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<T = u64> {
    /// Found: the `PyObject *` (or, for [`Target::length`], the length).
    Found(T),
    /// Certainly absent: no such attribute, key or index.
    Missing,
    /// The model cannot answer (and says why).
    Unsupported(&'static str),
}

/// A `len()`, as [`Target::length`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Len(pub u64);

/// A str needle: its Latin-1 bytes (ASCII or not), as compared with keys.
#[derive(Debug, Clone, Copy)]
struct StrNeedle {
    bytes: [u8; MAX_KEY_BYTES],
    len: usize,
    ascii: bool,
}

impl StrNeedle {
    /// Encodes `name` as Latin-1, or says why it cannot be compared.
    fn new(name: &str) -> Result<Self, &'static str> {
        let mut bytes = [0; MAX_KEY_BYTES];
        let mut len = 0;
        let mut ascii = true;
        for c in name.chars() {
            let code = u32::from(c);
            if code > 0xff {
                return Err("name or key has characters beyond U+00FF");
            }
            if len == MAX_KEY_BYTES {
                return Err("name or key longer than 32 characters");
            }
            ascii &= code < 0x80;
            bytes[len] = code as u8;
            len += 1;
        }
        Ok(StrNeedle { bytes, len, ascii })
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// What is looked for in a dict.
#[derive(Debug, Clone, Copy)]
enum Needle {
    Str(StrNeedle),
    /// The value and its hash (`hash(n)`).
    Int {
        value: i64,
        hash: i64,
    },
}

/// Where a keys object's entries are, from its header (entries start
/// with `me_hash` when `key_at` is 8).
type Table = pyprobe_common::dict_keys::Entries;

/// The outcome of scanning a keys object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// At entry `index`, whose own value slot holds `value`.
    Found {
        index: u64,
        value: u64,
    },
    NotFound,
    Unsupported(&'static str),
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl<M: Memory> Target<M> {
    /// The object's own instance attribute `name`, from its `__dict__` or
    /// its managed/inline values only: never a class attribute, descriptor
    /// or property, and never running code. See the module documentation
    /// for the reads, per [`InstanceDictModel`].
    pub fn instance_attribute(&self, obj: u64, name: &str) -> Result<Lookup, ReadError> {
        let needle = match StrNeedle::new(name) {
            Ok(n) => n,
            Err(why) => return Ok(Lookup::Unsupported(why)),
        };
        let info: &VersionInfo = &self.info;
        let ty = self.mem.read_u64(obj.wrapping_add(common::OB_TYPE))?;
        if info.layout.instance_dict == InstanceDictModel::TypeOffset {
            return self.attribute_by_dictoffset(obj, ty, &needle);
        }
        let flags = self.mem.read_u64(ty.wrapping_add(common::TP_FLAGS))?;
        if flags & TPFLAGS_MANAGED_DICT == 0 {
            return self.attribute_by_dictoffset(obj, ty, &needle);
        }
        let items = info.offsets.dict_values_items.unwrap_or(0);
        let managed = obj.wrapping_add_signed(MANAGED_DICT_OFFSET);
        match info.layout.instance_dict {
            InstanceDictModel::TypeOffset => unreachable!("handled above"),
            InstanceDictModel::ValuesOrDict => {
                let values = self
                    .mem
                    .read_u64(obj.wrapping_add_signed(MANAGED_VALUES_OFFSET))?;
                if values != 0 {
                    return self.shared_keys_lookup(
                        ty,
                        flags,
                        values.wrapping_add(items),
                        None,
                        &needle,
                    );
                }
                let dict = self.mem.read_u64(managed)?;
                self.dict_or_missing(dict, &needle)
            }
            InstanceDictModel::TaggedDictOrValues => {
                let word = self.mem.read_u64(managed)?;
                if word & DICT_OR_VALUES_TAG != 0 {
                    let values = word.wrapping_add(DICT_OR_VALUES_TAG);
                    return self.shared_keys_lookup(
                        ty,
                        flags,
                        values.wrapping_add(items),
                        None,
                        &needle,
                    );
                }
                self.dict_or_missing(word, &needle)
            }
            InstanceDictModel::InlineValues => {
                let dict = self.mem.read_u64(managed)?;
                if dict != 0 {
                    return self.dict_lookup(dict, Needle::Str(needle));
                }
                if flags & TPFLAGS_INLINE_VALUES == 0 {
                    return Ok(Lookup::Missing);
                }
                let basicsize = self.mem.read_u64(ty.wrapping_add(common::TP_BASICSIZE))?;
                let values = obj.wrapping_add(basicsize);
                let header = self.mem.read_u32(values)?.to_le_bytes();
                if header[DICT_VALUES_VALID as usize] == 0 {
                    return Ok(Lookup::Missing);
                }
                let capacity = u64::from(header[DICT_VALUES_CAPACITY as usize]);
                self.shared_keys_lookup(
                    ty,
                    flags,
                    values.wrapping_add(items),
                    Some(capacity),
                    &needle,
                )
            }
        }
    }

    /// `dict[key]` for a str key, by a bounded linear scan of the entries
    /// (see the module documentation). The caller checks the object is a
    /// dict (a subclass has the same storage but may override lookups).
    pub fn dict_get_str(&self, dict: u64, key: &str) -> Result<Lookup, ReadError> {
        match StrNeedle::new(key) {
            Ok(needle) => self.dict_lookup(dict, Needle::Str(needle)),
            Err(why) => Ok(Lookup::Unsupported(why)),
        }
    }

    /// `dict[key]` for an int key with `|key| < 2^60`, by a bounded linear
    /// scan (see the module documentation). Keys `True`/`False` and floats
    /// equal to `key` match, as in Python.
    pub fn dict_get_int(&self, dict: u64, key: i64) -> Result<Lookup, ReadError> {
        if key.unsigned_abs() >= 1 << MAX_INT_BITS {
            return Ok(Lookup::Unsupported("int key beyond 60 bits"));
        }
        // CPython's `long_hash` for |n| < 2^61 - 1: n itself, -1 being
        // reserved for errors.
        let hash = if key == -1 { -2 } else { key };
        self.dict_lookup(dict, Needle::Int { value: key, hash })
    }

    /// `seq[index]` for an exact `list` or `tuple`; a negative index counts
    /// from the end; out of range is [`Lookup::Missing`].
    pub fn sequence_item(&self, seq: u64, index: i64) -> Result<Lookup, ReadError> {
        let ty = self.mem.read_u64(seq.wrapping_add(common::OB_TYPE))?;
        let kind = self.type_kind(ty)?;
        if !matches!(kind, TypeKind::List | TypeKind::Tuple) {
            return Ok(Lookup::Unsupported("not a list or tuple"));
        }
        let size = self.mem.read_i64(seq.wrapping_add(common::OB_SIZE))?;
        if size < 0 {
            return Err(ReadError::Corrupt("negative ob_size"));
        }
        let index = if index < 0 {
            index.wrapping_add(size)
        } else {
            index
        };
        if index < 0 || index >= size {
            return Ok(Lookup::Missing);
        }
        let items = if kind == TypeKind::List {
            self.mem.read_u64(seq.wrapping_add(common::LIST_ITEMS))?
        } else {
            seq.wrapping_add(self.info.offsets.tuple_items)
        };
        let item = self
            .mem
            .read_u64(items.wrapping_add((index as u64).wrapping_mul(8)))?;
        if item == 0 {
            return Err(ReadError::Corrupt("NULL item in a list or tuple"));
        }
        Ok(Lookup::Found(item))
    }

    /// `len(obj)` of an exact `str` (code points), `bytes`, `list`, `tuple`
    /// or `dict`; anything else is [`Lookup::Unsupported`].
    pub fn length(&self, obj: u64) -> Result<Lookup<Len>, ReadError> {
        let ty = self.mem.read_u64(obj.wrapping_add(common::OB_TYPE))?;
        let at = match self.type_kind(ty)? {
            TypeKind::Str => common::UNICODE_LENGTH,
            TypeKind::Bytes | TypeKind::List | TypeKind::Tuple => common::OB_SIZE,
            TypeKind::Dict => common::DICT_USED,
            _ => {
                return Ok(Lookup::Unsupported(
                    "len() of a type other than str, bytes, list, tuple, dict",
                ));
            }
        };
        let len = self.mem.read_i64(obj.wrapping_add(at))?;
        u64::try_from(len)
            .map(|n| Lookup::Found(Len(n)))
            .map_err(|_| ReadError::Corrupt("negative length"))
    }

    /// The "TypeOffset" path: a `__dict__` pointer at `tp_dictoffset`.
    fn attribute_by_dictoffset(
        &self,
        obj: u64,
        ty: u64,
        needle: &StrNeedle,
    ) -> Result<Lookup, ReadError> {
        let offset = self.mem.read_i64(ty.wrapping_add(common::TP_DICTOFFSET))?;
        if offset == 0 {
            return Ok(Lookup::Unsupported(
                "object has no __dict__ (__slots__ or builtin type)",
            ));
        }
        if offset < 0 {
            return Ok(Lookup::Unsupported("__dict__ after a variable-size object"));
        }
        let dict = self.mem.read_u64(obj.wrapping_add(offset as u64))?;
        self.dict_or_missing(dict, needle)
    }

    /// D on a possibly NULL (not yet created) dict.
    fn dict_or_missing(&self, dict: u64, needle: &StrNeedle) -> Result<Lookup, ReadError> {
        if dict == 0 {
            return Ok(Lookup::Missing);
        }
        self.dict_lookup(dict, Needle::Str(*needle))
    }

    /// "V": the class's shared keys give the index into a values array
    /// starting at `values` (holding `capacity` slots, when known).
    fn shared_keys_lookup(
        &self,
        ty: u64,
        flags: u64,
        values: u64,
        capacity: Option<u64>,
        needle: &StrNeedle,
    ) -> Result<Lookup, ReadError> {
        if flags & TPFLAGS_HEAPTYPE == 0 {
            return Err(ReadError::Corrupt("instance values of a static type"));
        }
        let keys = self
            .mem
            .read_u64(ty.wrapping_add(self.info.offsets.heaptype_cached_keys))?;
        if keys == 0 {
            return Err(ReadError::Corrupt("instance values without shared keys"));
        }
        let table = self.keys_table(keys)?;
        match self.scan(&table, true, &Needle::Str(*needle))? {
            Scan::Found { index, .. } => {
                if capacity.is_some_and(|c| index >= c) {
                    return Ok(Lookup::Missing);
                }
                self.value_slot(values, index)
            }
            Scan::NotFound => Ok(Lookup::Missing),
            Scan::Unsupported(why) => Ok(Lookup::Unsupported(why)),
        }
    }

    /// 8 bytes at `values + 8 * index`; NULL is a deleted or unset value.
    fn value_slot(&self, values: u64, index: u64) -> Result<Lookup, ReadError> {
        let value = self.mem.read_u64(values.wrapping_add(8 * index))?;
        Ok(if value == 0 {
            Lookup::Missing
        } else {
            Lookup::Found(value)
        })
    }

    /// "D": a lookup in a dict object, combined or split.
    fn dict_lookup(&self, dict: u64, needle: Needle) -> Result<Lookup, ReadError> {
        let mut b = [0u8; 16];
        self.mem
            .read(dict.wrapping_add(common::DICT_KEYS), &mut b)?;
        let keys = le_u64(&b, 0);
        let values = le_u64(&b, (common::DICT_VALUES - common::DICT_KEYS) as usize);
        let split = values != 0;
        let table = self.keys_table(keys)?;
        match self.scan(&table, split, &needle)? {
            Scan::Found { index, value } => {
                if split {
                    let items = self.info.offsets.dict_values_items.unwrap_or(0);
                    self.value_slot(values.wrapping_add(items), index)
                } else {
                    Ok(Lookup::Found(value))
                }
            }
            Scan::NotFound => Ok(Lookup::Missing),
            Scan::Unsupported(why) => Ok(Lookup::Unsupported(why)),
        }
    }

    /// "K": one read of the keys header.
    fn keys_table(&self, keys: u64) -> Result<Table, ReadError> {
        super::dict::keys_entries(&self.mem, self.info.layout.dict_keys, keys)
    }

    /// "S": the bounded scan of a keys object's entries.
    fn scan(&self, table: &Table, split: bool, needle: &Needle) -> Result<Scan, ReadError> {
        let has_hash = table.key_at == 8;
        if matches!(needle, Needle::Int { .. }) && !has_hash {
            // Unicode and split tables hold only exact str keys.
            return Ok(Scan::NotFound);
        }
        let key_at = table.key_at as usize;
        for index in 0..table.count.min(MAX_ENTRIES) {
            let mut e = [0u8; 24];
            let entry = &mut e[..table.size as usize];
            self.mem
                .read(table.start.wrapping_add(index * table.size), entry)?;
            let key = le_u64(entry, key_at);
            let value = le_u64(entry, key_at + 8);
            if key == 0 || (!split && value == 0) {
                continue;
            }
            let equal = match needle {
                Needle::Str(s) => self.str_key_equals(key, s)?,
                Needle::Int { value: n, hash } => {
                    if le_u64(entry, 0) as i64 != *hash {
                        continue;
                    }
                    match self.int_key_equals(key, *n)? {
                        Some(equal) => equal,
                        None => {
                            return Ok(Scan::Unsupported(
                                "a key of another type has the hash of the int",
                            ));
                        }
                    }
                }
            };
            if equal {
                return Ok(Scan::Found { index, value });
            }
        }
        Ok(if table.count > MAX_ENTRIES {
            Scan::Unsupported("dict larger than 64 entries scanned")
        } else {
            Scan::NotFound
        })
    }

    /// Whether the object at `key` is an exact, compact, 1-byte-kind `str`
    /// equal to the needle.
    fn str_key_equals(&self, key: u64, needle: &StrNeedle) -> Result<bool, ReadError> {
        // ob_type (+8), length (+16), hash (+24), state (+32).
        let mut h = [0u8; 32];
        self.mem.read(key.wrapping_add(common::OB_TYPE), &mut h)?;
        let at = |offset: u64| (offset - common::OB_TYPE) as usize;
        if self.type_kind(le_u64(&h, at(common::OB_TYPE)))? != TypeKind::Str {
            return Ok(false);
        }
        if le_u64(&h, at(common::UNICODE_LENGTH)) != needle.len as u64 {
            return Ok(false);
        }
        let state = le_u32(&h, at(common::UNICODE_STATE));
        let kind = (state >> STATE_KIND_SHIFT) & 7;
        let ascii = state & STATE_ASCII != 0;
        if state & STATE_COMPACT == 0 || kind != 1 || ascii != needle.ascii {
            return Ok(false);
        }
        let o = &self.info.offsets;
        let data = key.wrapping_add(if ascii {
            o.unicode_ascii_data
        } else {
            o.unicode_compact_data
        });
        let mut chars = [0u8; MAX_KEY_BYTES];
        let chars = &mut chars[..needle.len];
        self.mem.read(data, chars)?;
        Ok(chars == needle.bytes())
    }

    /// Whether the key (whose hash equals the needle's) equals `n`: `Some`
    /// for `True`/`False`, exact `int` and exact `float`; `None` for any
    /// other type, whose `__eq__` would decide.
    fn int_key_equals(&self, key: u64, n: i64) -> Result<Option<bool>, ReadError> {
        if key == self.known.true_ {
            return Ok(Some(n == 1));
        }
        if key == self.known.false_ {
            return Ok(Some(n == 0));
        }
        let ty = self.mem.read_u64(key.wrapping_add(common::OB_TYPE))?;
        match self.type_kind(ty)? {
            TypeKind::Int => {
                // ob_size / lv_tag (+16) and the first two digits (+24).
                let mut b = [0u8; 16];
                self.mem.read(key.wrapping_add(common::LONG_SIZE), &mut b)?;
                let tag = le_u64(&b, 0);
                let (negative, ndigits) = match self.info.layout.long {
                    LongModel::ObSize => ((tag as i64) < 0, (tag as i64).unsigned_abs()),
                    LongModel::LvTag => (tag & 3 == 2, if tag & 3 == 1 { 0 } else { tag >> 3 }),
                };
                if ndigits > 2 {
                    return Ok(Some(false));
                }
                let digit = |i: u64| {
                    if i < ndigits {
                        u64::from(le_u32(&b, 8 + 4 * i as usize) & 0x3fff_ffff)
                    } else {
                        0
                    }
                };
                let magnitude = (digit(0) | (digit(1) << 30)) as i64;
                Ok(Some(if negative { -magnitude } else { magnitude } == n))
            }
            TypeKind::Float => {
                let x = f64::from_bits(self.mem.read_u64(key.wrapping_add(common::FLOAT_VALUE))?);
                // |n| < 2^60 and x integral below 2^63: the i64 comparison is exact.
                Ok(Some(x.fract() == 0.0 && x.abs() < 9.2e18 && x as i64 == n))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every lookup against live interpreters: the pyenv builds, Debian's
    //! stripped `/usr/bin/python3.11` and Debian sid's 3.14 (installed by
    //! `cargo xtask setup`). A script builds the objects and prints their
    //! `id()`s; every answer must be the exact address Python reports. A
    //! missing interpreter is reported on stderr (past the test harness's
    //! capture) as skipped.

    use std::{
        collections::HashMap,
        io::{BufRead, BufReader, Write},
        path::PathBuf,
        process::{Child, Command, Stdio},
    };

    use super::*;
    use crate::python::memory::ProcessMemory;
    use crate::python::offsets::DictKeysModel;

    /// Builds the objects, prints `{name: id(object)}` as one JSON line,
    /// then waits for stdin to close. Runs unchanged on 3.8-3.14.
    const SCRIPT: &str = r#"
import json, sys

class Plain:
    klass = 999999
    def __init__(self):
        self.count = 12345
        self.name = "alice-" + str(len(sys.argv))
        self.nothing = None
    @property
    def prop(self):
        return 1

class Slotted:
    __slots__ = ("a", "b")
    def __init__(self):
        self.a = 11111
        self.b = "slot"

class User:
    def __init__(self, name):
        self.name = name

class Order:
    def __init__(self):
        self.user = User("bob-" + str(len(sys.argv)))
        self.items = [10001, "x", None]
        self.meta = {"source": "web-" + str(len(sys.argv)), "n": 1}

class Fresh:
    def __init__(self):
        self.a = 31337
        self.b = "fresh-" + str(len(sys.argv))

class SlotsAndDict:
    __slots__ = ("a", "__dict__")

class MyInt(int):
    pass

plain = Plain()
grown = Plain()
for i in range(30):
    setattr(grown, "extra%d" % i, 100000 + i)
deleted = Plain()
del deleted.name
viewed = Plain()
vars(viewed)
viewed.after = 7777
late = Plain()
late.extra0 = 424242
slotted = Slotted()
order = Order()
fresh = Fresh()
vars(fresh)
fresh.c = 4242
freshdel = Fresh()
vars(freshdel)
del freshdel.a
slots_dict = SlotsAndDict()
slots_dict.a = 5555
slots_dict.x = 6666
slots_empty = SlotsAndDict()
slots_empty.a = 5556
myint = MyInt(5)
myint.tag = 77

strdict = {"source": "web", "zo\u00eb": "accent", "gone": 1, "n": None}
del strdict["gone"]
mixed = {"source": "mixed-src", 7: "seven", "zo\u00eb": "z2"}
intdict = {1: "one", -5: "minus five", 2**41 + 7: "big", -(2**45): "neg big",
           0: "zero", 3: "three", -1: "minus one"}
del intdict[3]
booldict = {True: "yes", 2.0: "two", "s": "str"}
big = {"k%d" % i: 100000 + i for i in range(100)}
bigint = {i: "v%d" % i for i in range(100)}
wide = {"\u65e5\u672c": 1, "ab": "ab-value"}
lst = [10001, "x", None]
tup = (20002, "y")
empty = []
text = "h\u00e9llo w\u00f6rld"
cjk = "\u65e5\u672c"
data = b"abc\x00de"
number = 12345678

ids = {}
def put(name, value):
    ids[name] = id(value)

for name in ["plain", "grown", "deleted", "viewed", "late", "slotted", "order",
             "strdict", "mixed", "intdict", "booldict", "big", "bigint", "wide",
             "lst", "tup", "empty", "text", "cjk", "data", "number", "fresh",
             "freshdel", "slots_dict", "slots_empty", "myint"]:
    put(name, globals()[name])
put("plain.count", plain.count)
put("plain.name", plain.name)
put("plain.nothing", plain.nothing)
put("grown.count", grown.count)
put("grown.extra0", grown.extra0)
put("grown.extra26", grown.extra26)
put("grown.extra29", grown.extra29)
put("deleted.count", deleted.count)
put("deleted.nothing", deleted.nothing)
put("viewed.name", viewed.name)
put("viewed.after", viewed.after)
put("late.count", late.count)
put("late.extra0", late.extra0)
put("fresh.a", fresh.a)
put("fresh.b", fresh.b)
put("fresh.c", fresh.c)
put("freshdel.b", freshdel.b)
put("slots_dict.x", slots_dict.x)
put("myint.tag", myint.tag)
put("order.user", order.user)
put("order.user.name", order.user.name)
put("order.meta", order.meta)
put("order.meta.source", order.meta["source"])
put("order.items", order.items)
put("order.items.0", order.items[0])
put("json", json)
put("json.dumps", json.dumps)
put("Plain", Plain)
put("Plain.klass", Plain.__dict__["klass"])
put("strdict.source", strdict["source"])
put("strdict.zoe", strdict["zo\u00eb"])
put("mixed.source", mixed["source"])
put("mixed.zoe", mixed["zo\u00eb"])
put("mixed.7", mixed[7])
for k in [1, -5, 2**41 + 7, -(2**45), 0, -1]:
    put("intdict.%d" % k, intdict[k])
put("booldict.1", booldict[1])
put("booldict.2", booldict[2])
put("booldict.s", booldict["s"])
put("big.k3", big["k3"])
put("big.k63", big["k63"])
put("bigint.5", bigint[5])
put("bigint.63", bigint[63])
put("wide.ab", wide["ab"])
put("lst.0", lst[0])
put("tup.0", tup[0])
put("tup.1", tup[1])
print(json.dumps(ids))
sys.stdout.flush()
sys.stdin.read()
"#;

    fn pyenv(version: &str) -> PathBuf {
        pyprobe_testenv::pyenv_python(version)
    }

    /// Debian sid's 3.14 (a wrapper that `exec`s sid's loader, so the PID
    /// is the interpreter's).
    fn sid314() -> PathBuf {
        pyprobe_testenv::sid_python(14)
    }

    /// The script's process; killed and reaped when dropped.
    struct Live {
        child: Child,
        ids: HashMap<String, u64>,
    }

    impl Drop for Live {
        fn drop(&mut self) {
            drop(self.child.stdin.take());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Live {
        fn id(&self, name: &str) -> u64 {
            *self
                .ids
                .get(name)
                .unwrap_or_else(|| panic!("the script printed no id for {name}"))
        }
    }

    fn start(label: &str, python: &PathBuf) -> Live {
        let mut child = Command::new(python)
            .args(["-I", "-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{label}: running {}: {e}", python.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{label}: reading the script's output: {e}"));
        let ids: HashMap<String, u64> = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{label}: the script printed {line:?}: {e}"));
        Live { child, ids }
    }

    /// Which storage an object's attributes are in, to show the paths the
    /// checks went through.
    fn storage(t: &Target<ProcessMemory>, obj: u64) -> String {
        let ty = t.mem.read_u64(obj + common::OB_TYPE).unwrap();
        let flags = t.mem.read_u64(ty + common::TP_FLAGS).unwrap();
        let dict_kind = |dict: u64| {
            if dict == 0 {
                return "no dict".to_owned();
            }
            let values = t.mem.read_u64(dict + common::DICT_VALUES).unwrap();
            if values == 0 {
                "combined dict"
            } else {
                "split dict"
            }
            .to_owned()
        };
        let managed = obj.wrapping_add_signed(MANAGED_DICT_OFFSET);
        match t.info.layout.instance_dict {
            _ if flags & TPFLAGS_MANAGED_DICT == 0
                || t.info.layout.instance_dict == InstanceDictModel::TypeOffset =>
            {
                let offset = t.mem.read_i64(ty + common::TP_DICTOFFSET).unwrap();
                if offset <= 0 {
                    return format!("tp_dictoffset {offset}");
                }
                dict_kind(t.mem.read_u64(obj + offset as u64).unwrap())
            }
            InstanceDictModel::ValuesOrDict => {
                let values = t
                    .mem
                    .read_u64(obj.wrapping_add_signed(MANAGED_VALUES_OFFSET))
                    .unwrap();
                if values != 0 {
                    "values".into()
                } else {
                    dict_kind(t.mem.read_u64(managed).unwrap())
                }
            }
            InstanceDictModel::TaggedDictOrValues => {
                let word = t.mem.read_u64(managed).unwrap();
                if word & DICT_OR_VALUES_TAG != 0 {
                    "tagged values".into()
                } else {
                    dict_kind(word)
                }
            }
            InstanceDictModel::InlineValues | InstanceDictModel::TypeOffset => {
                let dict = t.mem.read_u64(managed).unwrap();
                let basicsize = t.mem.read_u64(ty + common::TP_BASICSIZE).unwrap();
                let valid = if flags & TPFLAGS_INLINE_VALUES != 0 {
                    t.mem.read_u8(obj + basicsize + DICT_VALUES_VALID).unwrap()
                } else {
                    0
                };
                format!("{}, inline values valid={valid}", dict_kind(dict))
            }
        }
    }

    fn check(label: &str, python: PathBuf) {
        if !python.exists() {
            // Written to the real stderr, so the skip shows without
            // --nocapture.
            let _ = writeln!(
                std::io::stderr(),
                "python::attrs: SKIPPED {label}: {} is missing",
                python.display()
            );
            return;
        }
        let live = start(label, &python);
        let t =
            Target::attach(live.child.id()).unwrap_or_else(|e| panic!("{label}: attaching: {e}"));
        let id = |name: &str| live.id(name);
        let found = |name: &str| Lookup::Found(live.id(name));
        let none = Lookup::Found(t.known.none);
        let missing = Lookup::Missing;
        let mut failures = Vec::new();
        let mut expect = |what: String, got: Result<Lookup, ReadError>, want: Lookup| {
            let ok = match (&got, &want) {
                (Ok(Lookup::Unsupported(_)), Lookup::Unsupported(_)) => true,
                (Ok(g), w) => g == w,
                (Err(_), _) => false,
            };
            if !ok {
                failures.push(format!("{what}: got {got:?}, want {want:?}"));
            }
        };
        let unsupported = Lookup::Unsupported("");
        let attr = |obj: &str, name: &str| t.instance_attribute(id(obj), name);

        // Instance attributes.
        for (obj, name, want) in [
            ("plain", "count", found("plain.count")),
            ("plain", "name", found("plain.name")),
            ("plain", "nothing", none),
            ("plain", "klass", missing),
            ("plain", "prop", missing),
            ("plain", "absent", missing),
            ("plain", "zo\u{eb}", missing),
            ("plain", "x".repeat(33).leak(), unsupported),
            ("plain", "\u{65e5}", unsupported),
            ("grown", "count", found("grown.count")),
            ("grown", "extra0", found("grown.extra0")),
            ("grown", "extra26", found("grown.extra26")),
            ("grown", "extra29", found("grown.extra29")),
            ("grown", "extra30", missing),
            ("deleted", "name", missing),
            ("deleted", "count", found("deleted.count")),
            ("deleted", "nothing", found("deleted.nothing")),
            ("viewed", "name", found("viewed.name")),
            ("viewed", "after", found("viewed.after")),
            ("viewed", "extra0", missing),
            ("late", "count", found("late.count")),
            ("late", "extra0", found("late.extra0")),
            ("late", "extra1", missing),
            ("slotted", "a", unsupported),
            ("order", "user", found("order.user")),
            ("order", "meta", found("order.meta")),
            ("order", "items", found("order.items")),
            ("json", "dumps", found("json.dumps")),
            ("Plain", "klass", found("Plain.klass")),
            ("fresh", "a", found("fresh.a")),
            ("fresh", "b", found("fresh.b")),
            ("fresh", "c", found("fresh.c")),
            ("fresh", "count", missing),
            ("freshdel", "a", missing),
            ("freshdel", "b", found("freshdel.b")),
            ("slots_dict", "x", found("slots_dict.x")),
            ("slots_dict", "a", missing),
            ("slots_empty", "x", missing),
            // An int subclass keeps its __dict__ after the digits (a
            // negative tp_dictoffset) up to 3.11, in the managed pre-header
            // from 3.12.
            (
                "myint",
                "tag",
                match t.info.layout.instance_dict {
                    InstanceDictModel::TypeOffset | InstanceDictModel::ValuesOrDict => unsupported,
                    _ => found("myint.tag"),
                },
            ),
        ] {
            expect(format!("{obj}.{name}"), attr(obj, name), want);
        }
        // Paths: order.user.name, order.meta["source"], order.items[0],
        // len(order.items), one step at a time.
        expect(
            "order.user.name".into(),
            t.instance_attribute(id("order.user"), "name"),
            found("order.user.name"),
        );
        let step = |from: Result<Lookup, ReadError>| match from {
            Ok(Lookup::Found(obj)) => obj,
            other => panic!("{label}: path step: {other:?}"),
        };
        let user = step(attr("order", "user"));
        expect(
            "order.user.name (chained)".into(),
            t.instance_attribute(user, "name"),
            found("order.user.name"),
        );
        let meta = step(attr("order", "meta"));
        expect(
            "order.meta[\"source\"]".into(),
            t.dict_get_str(meta, "source"),
            found("order.meta.source"),
        );
        let items = step(attr("order", "items"));
        expect(
            "order.items[0]".into(),
            t.sequence_item(items, 0),
            found("order.items.0"),
        );

        // Dicts.
        let get_str = |dict: &str, key: &str| t.dict_get_str(id(dict), key);
        let get_int = |dict: &str, key: i64| t.dict_get_int(id(dict), key);
        for (dict, key, want) in [
            ("strdict", "source", found("strdict.source")),
            ("strdict", "zo\u{eb}", found("strdict.zoe")),
            ("strdict", "gone", missing),
            ("strdict", "n", none),
            ("strdict", "zo", missing),
            ("strdict", "sourcex", missing),
            ("strdict", "zoe", missing),
            ("strdict", "\u{65e5}\u{672c}", unsupported),
            ("mixed", "source", found("mixed.source")),
            ("mixed", "zo\u{eb}", found("mixed.zoe")),
            ("mixed", "7", missing),
            ("booldict", "s", found("booldict.s")),
            ("big", "k3", found("big.k3")),
            ("big", "k63", found("big.k63")),
            ("big", "k64", unsupported),
            ("big", "k80", unsupported),
            ("big", "nope", unsupported),
            ("wide", "ab", found("wide.ab")),
            ("intdict", "one", missing),
        ] {
            expect(format!("{dict}[{key:?}]"), get_str(dict, key), want);
        }
        for (dict, key, want) in [
            ("strdict", 1, missing),
            ("mixed", 7, found("mixed.7")),
            ("mixed", 8, missing),
            ("mixed", -1, missing),
            ("intdict", 1, found("intdict.1")),
            ("intdict", -5, found("intdict.-5")),
            ("intdict", (1 << 41) + 7, found("intdict.2199023255559")),
            ("intdict", -(1 << 45), found("intdict.-35184372088832")),
            ("intdict", 0, found("intdict.0")),
            ("intdict", -1, found("intdict.-1")),
            ("intdict", -2, missing),
            ("intdict", 3, missing),
            ("intdict", 2, missing),
            ("intdict", 1 << 41, missing),
            ("intdict", 1 << 61, unsupported),
            ("booldict", 1, found("booldict.1")),
            ("booldict", 2, found("booldict.2")),
            ("booldict", 0, missing),
            ("bigint", 5, found("bigint.5")),
            ("bigint", 63, found("bigint.63")),
            ("bigint", 64, unsupported),
            ("bigint", 90, unsupported),
            // A str-keyed dict: 3.11+ marks it (dk_kind), so no entry is
            // read; before, every entry could be an int.
            (
                "big",
                3,
                match t.info.layout.dict_keys {
                    DictKeysModel::Log2 => missing,
                    DictKeysModel::Sized => unsupported,
                },
            ),
        ] {
            expect(format!("{dict}[{key}]"), get_int(dict, key), want);
        }

        // Lists and tuples.
        let item = |seq: &str, index: i64| t.sequence_item(id(seq), index);
        for (seq, index, want) in [
            ("lst", 0, found("lst.0")),
            ("lst", 2, none),
            ("lst", -1, none),
            ("lst", -3, found("lst.0")),
            ("lst", 3, missing),
            ("lst", -4, missing),
            ("lst", i64::MAX, missing),
            ("lst", i64::MIN, missing),
            ("tup", 0, found("tup.0")),
            ("tup", 1, found("tup.1")),
            ("tup", -2, found("tup.0")),
            ("tup", 2, missing),
            ("empty", 0, missing),
            ("empty", -1, missing),
            ("strdict", 0, unsupported),
        ] {
            expect(format!("{seq}[{index}]"), item(seq, index), want);
        }

        // Lengths.
        for (obj, want) in [
            ("text", Some(11)),
            ("cjk", Some(2)),
            ("data", Some(6)),
            ("lst", Some(3)),
            ("tup", Some(2)),
            ("empty", Some(0)),
            ("strdict", Some(3)),
            ("big", Some(100)),
            ("order.items", Some(3)),
            ("number", None),
            ("plain", None),
        ] {
            let got = t.length(id(obj));
            let ok = match (&got, want) {
                (Ok(Lookup::Found(Len(n))), Some(w)) => *n == w,
                (Ok(Lookup::Unsupported(_)), None) => true,
                _ => false,
            };
            if !ok {
                failures.push(format!("len({obj}): got {got:?}, want {want:?}"));
            }
        }

        // Any object (and addresses inside objects) given to any lookup:
        // answers or errors, never a panic or a hang.
        for &obj in live.ids.values() {
            for at in [obj, obj + 8, obj + 16, obj + 24] {
                let _ = t.instance_attribute(at, "name");
                let _ = t.dict_get_str(at, "k3");
                let _ = t.dict_get_int(at, 1);
                let _ = t.sequence_item(at, 1);
                let _ = t.sequence_item(at, -1);
                let _ = t.length(at);
            }
        }

        println!(
            "{label} ({:?}): {}",
            t.info.layout.instance_dict,
            [
                "plain",
                "grown",
                "deleted",
                "viewed",
                "late",
                "fresh",
                "freshdel",
                "slots_dict",
                "slots_empty",
                "myint",
                "json",
                "Plain",
            ]
            .map(|o| format!("{o}: {}", storage(&t, id(o))))
            .join("; ")
        );
        assert!(
            failures.is_empty(),
            "{label} ({}, {:?}):\n{}",
            t.version,
            t.info.layout.instance_dict,
            failures.join("\n")
        );
    }

    #[test]
    fn pyenv_3_8() {
        check("pyenv 3.8.18", pyenv("3.8.18"));
    }

    #[test]
    fn pyenv_3_9() {
        check("pyenv 3.9.18", pyenv("3.9.18"));
    }

    #[test]
    fn pyenv_3_10() {
        check("pyenv 3.10.13", pyenv("3.10.13"));
    }

    #[test]
    fn pyenv_3_11() {
        check("pyenv 3.11.7", pyenv("3.11.7"));
    }

    #[test]
    fn debian_3_11() {
        check("Debian 3.11 (stripped)", "/usr/bin/python3.11".into());
    }

    #[test]
    fn pyenv_3_12() {
        check("pyenv 3.12.1", pyenv("3.12.1"));
    }

    #[test]
    fn pyenv_3_13() {
        check("pyenv 3.13.0", pyenv("3.13.0"));
    }

    #[test]
    fn debian_sid_3_14() {
        check("Debian sid 3.14", sid314());
    }

    #[test]
    fn names_are_compared_in_latin1() {
        let n = StrNeedle::new("zo\u{eb}").unwrap();
        assert_eq!(n.bytes(), b"zo\xeb");
        assert!(!n.ascii);
        let n = StrNeedle::new("source").unwrap();
        assert_eq!(n.bytes(), b"source");
        assert!(n.ascii);
        assert!(StrNeedle::new(&"a".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(StrNeedle::new(&"a".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert!(StrNeedle::new("\u{65e5}").is_err());
        assert!(StrNeedle::new("").is_ok());
    }
}
