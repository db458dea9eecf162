//! Reading a dict of another process: where its keys object keeps the
//! entries (the layout is described once, in [`pyprobe_common::dict_keys`],
//! for the kernel's dict scan and for these readers) and its `(key, value)`
//! pairs.

use pyprobe_common::dict_keys::{self, Entries};

use super::{
    memory::Memory,
    offsets::{DictKeysModel, common},
    reader::{ReadError, Target},
};

/// Where the entries of the keys object at `keys` are, from one read of its
/// header; a header no real dict has (sizes out of range, more entries
/// than slots, an unknown kind) is an error.
pub fn keys_entries<M: Memory>(
    mem: &M,
    model: DictKeysModel,
    keys: u64,
) -> Result<Entries, ReadError> {
    // Only the fields of the layout (a 3.11+ header is 32 bytes: the index
    // array may start right after it).
    let mut bytes = [0u8; dict_keys::HEADER];
    let len = match model {
        DictKeysModel::Sized => dict_keys::SIZED_INDICES,
        DictKeysModel::Log2 => dict_keys::LOG2_INDICES,
    };
    mem.read(keys, &mut bytes[..len as usize])?;
    let head: [u64; 5] = core::array::from_fn(|i| {
        u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8"))
    });
    let plausible = match model {
        DictKeysModel::Sized => {
            let size = head[dict_keys::SIZED_SIZE / 8];
            let count = head[dict_keys::SIZED_NENTRIES / 8];
            size.is_power_of_two() && size <= 1 << 40 && count <= size
        }
        DictKeysModel::Log2 => {
            let log2_size = bytes[dict_keys::LOG2_SIZE];
            let count = head[dict_keys::LOG2_NENTRIES / 8];
            log2_size <= 40
                && dict_keys::log2_index_bytes(&head) <= 43
                && bytes[dict_keys::KIND] <= dict_keys::KIND_SPLIT
                && count <= 1 << log2_size
        }
    };
    if !plausible {
        return Err(ReadError::Corrupt("dict keys header"));
    }
    Ok(dict_keys::entries(
        model == DictKeysModel::Sized,
        keys,
        &head,
    ))
}

/// The `(key, value)` pairs of a combined-table dict (module, class and
/// `sys` dicts always are), in insertion order, deleted slots left out. A
/// split table, or more than `max` entries, is an error.
pub fn combined_items<M: Memory>(
    t: &Target<M>,
    dict: u64,
    max: u64,
) -> Result<Vec<(u64, u64)>, ReadError> {
    let mem = &t.mem;
    // The dict's fields in one read.
    let header = mem.read_vec(dict, common::DICT_VALUES as usize + 8)?;
    let word = |buf: &[u8], at: u64| {
        let at = at as usize;
        u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
    };
    if let Some(&dict_type) = t.known.types.get("PyDict_Type")
        && word(&header, common::OB_TYPE) != dict_type
    {
        return Err(ReadError::Corrupt("not a dict"));
    }
    if word(&header, common::DICT_VALUES) != 0 {
        return Err(ReadError::Corrupt(
            "a split dict where a combined one was expected",
        ));
    }
    let entries = keys_entries(
        mem,
        t.info.layout.dict_keys,
        word(&header, common::DICT_KEYS),
    )?;
    if entries.count > max {
        return Err(ReadError::Corrupt("dict too large"));
    }
    let bytes = mem.read_vec(entries.start, (entries.count * entries.size) as usize)?;
    Ok(bytes
        .chunks_exact(entries.size as usize)
        .map(|e| (word(e, entries.key_at), word(e, entries.key_at + 8)))
        .filter(|&(key, value)| key != 0 && value != 0)
        .collect())
}
