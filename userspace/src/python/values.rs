//! Decoding Python values from raw memory, never by running target code:
//! no `__repr__`, no properties. Sizes are bounded and secret-looking names
//! are redacted.

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    memory::Memory,
    offsets::{LongModel, common},
    reader::{ReadError, Target},
};

/// Limits on what is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bounds {
    /// Nesting depth of containers.
    pub depth: u32,
    /// Items shown per container.
    pub items: usize,
    /// Characters (or bytes) shown per string.
    pub string_len: usize,
    /// Redact values whose name looks secret.
    pub redact: bool,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            depth: 3,
            items: 100,
            string_len: 255,
            redact: true,
        }
    }
}

/// A decoded value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool {
        /// The value.
        value: bool,
    },
    /// An int, as decimal text (any size).
    Int {
        /// Decimal digits with sign.
        value: String,
    },
    /// A float.
    Float {
        /// The value.
        value: f64,
    },
    /// A str.
    Str {
        /// The (possibly truncated) text.
        value: String,
        /// Code points in the whole string.
        len: u64,
    },
    /// A bytes object.
    Bytes {
        /// The (possibly truncated) bytes.
        value: Vec<u8>,
        /// Bytes in the whole object.
        len: u64,
    },
    /// A tuple.
    Tuple {
        /// Items shown.
        items: Vec<Value>,
        /// Items in the whole tuple.
        len: u64,
    },
    /// A list.
    List {
        /// Items shown.
        items: Vec<Value>,
        /// Items in the whole list.
        len: u64,
    },
    /// A dict.
    Dict {
        /// Items shown, in insertion order.
        items: Vec<(Value, Value)>,
        /// Items in the whole dict.
        len: u64,
    },
    /// Anything else: its type name and address.
    Object {
        /// `tp_name` of its type.
        type_name: String,
        /// Address of the object.
        address: u64,
    },
    /// Hidden because its name looks like a secret.
    Redacted,
    /// Nested deeper than the bounds allow.
    TooDeep,
    /// Could not be read (freed, changing, or not a valid object).
    Unreadable {
        /// Address of the object.
        address: u64,
    },
}

/// Whether a variable or key name looks like it holds a secret. Names are
/// split into words (`_`, `-`, `.`, camelCase) so that `api_key` and
/// `authToken` match but `monkey` does not.
pub fn is_secret_name(name: &str) -> bool {
    const SECRET_WORDS: &[&str] = &[
        "password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "key",
        "apikey",
        "auth",
        "authorization",
        "credential",
        "credentials",
        "cookie",
        "session",
        "private",
        "signature",
        "ssn",
    ];
    let mut words = Vec::new();
    let mut word = String::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if !c.is_alphanumeric() {
            words.push(std::mem::take(&mut word));
            prev_lower = false;
            continue;
        }
        if c.is_uppercase() && prev_lower {
            words.push(std::mem::take(&mut word));
        }
        prev_lower = c.is_lowercase() || c.is_ascii_digit();
        word.extend(c.to_lowercase());
    }
    words.push(word);
    words.iter().any(|w| SECRET_WORDS.contains(&w.as_str()))
}

impl<M: Memory> Target<M> {
    /// Decodes the object at `addr` within `bounds`.
    pub fn value(&self, addr: u64, bounds: &Bounds) -> Value {
        self.value_at_depth(addr, bounds, 0)
    }

    fn value_at_depth(&self, addr: u64, bounds: &Bounds, depth: u32) -> Value {
        match self.try_value(addr, bounds, depth) {
            Ok(v) => v,
            Err(_) => Value::Unreadable { address: addr },
        }
    }

    fn try_value(&self, addr: u64, bounds: &Bounds, depth: u32) -> Result<Value, ReadError> {
        let known = &self.known;
        if addr == known.none {
            return Ok(Value::None);
        }
        if addr == known.true_ {
            return Ok(Value::Bool { value: true });
        }
        if addr == known.false_ {
            return Ok(Value::Bool { value: false });
        }
        let ty = self.mem.read_u64(addr.wrapping_add(common::OB_TYPE))?;
        let kind = self.type_kind(ty)?;
        let container = matches!(kind, TypeKind::Tuple | TypeKind::List | TypeKind::Dict);
        if container && depth >= bounds.depth {
            return Ok(Value::TooDeep);
        }
        Ok(match kind {
            TypeKind::Int => Value::Int {
                value: self.read_int(addr)?,
            },
            TypeKind::Bool => Value::Bool {
                value: self.read_int(addr)? != "0",
            },
            TypeKind::Float => Value::Float {
                value: f64::from_bits(self.mem.read_u64(addr.wrapping_add(common::FLOAT_VALUE))?),
            },
            TypeKind::Str => {
                let (value, len) = self.read_str_bounded(addr, bounds.string_len)?;
                Value::Str { value, len }
            }
            TypeKind::Bytes => {
                let len = self.read_size(addr)?;
                let shown = len.min(bounds.string_len as u64) as usize;
                Value::Bytes {
                    value: self
                        .mem
                        .read_vec(addr.wrapping_add(common::BYTES_DATA), shown)?,
                    len,
                }
            }
            TypeKind::Tuple => {
                let len = self.read_size(addr)?;
                let base = addr.wrapping_add(self.info.offsets.tuple_items);
                Value::Tuple {
                    items: self.items(base, len, bounds, depth)?,
                    len,
                }
            }
            TypeKind::List => {
                let len = self.read_size(addr)?;
                let base = self.mem.read_u64(addr.wrapping_add(common::LIST_ITEMS))?;
                Value::List {
                    items: self.items(base, len, bounds, depth)?,
                    len,
                }
            }
            TypeKind::Dict => {
                let (items, len) = self.read_dict(addr, bounds, depth)?;
                Value::Dict { items, len }
            }
            TypeKind::Other => Value::Object {
                type_name: self.type_name(ty)?,
                address: addr,
            },
        })
    }

    fn read_size(&self, addr: u64) -> Result<u64, ReadError> {
        let size = self.mem.read_i64(addr.wrapping_add(common::OB_SIZE))?;
        u64::try_from(size).map_err(|_| ReadError::Corrupt("negative ob_size"))
    }

    fn items(
        &self,
        base: u64,
        len: u64,
        bounds: &Bounds,
        depth: u32,
    ) -> Result<Vec<Value>, ReadError> {
        let shown = len.min(bounds.items as u64);
        let mut out = Vec::with_capacity(shown as usize);
        for i in 0..shown {
            let item = self.mem.read_u64(base.wrapping_add(8 * i))?;
            out.push(self.value_at_depth(item, bounds, depth + 1));
        }
        Ok(out)
    }

    /// Decodes an int of any size to decimal.
    pub fn read_int(&self, addr: u64) -> Result<String, ReadError> {
        let tag = self.mem.read_i64(addr.wrapping_add(common::LONG_SIZE))?;
        let (negative, ndigits) = match self.info.layout.long {
            LongModel::ObSize => (tag < 0, tag.unsigned_abs()),
            LongModel::LvTag => {
                let tag = tag as u64;
                match tag & 3 {
                    1 => return Ok("0".into()),
                    sign => (sign == 2, tag >> 3),
                }
            }
        };
        const MAX_DIGITS: u64 = 1000;
        if ndigits > MAX_DIGITS {
            return Ok(format!("<int of {} bits>", ndigits.saturating_mul(30)));
        }
        let bytes = self
            .mem
            .read_vec(addr.wrapping_add(common::LONG_DIGITS), ndigits as usize * 4)?;
        let digits: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) & 0x3fff_ffff)
            .collect();
        let mut text = digits_to_decimal(&digits);
        if negative && text != "0" {
            text.insert(0, '-');
        }
        Ok(text)
    }

    fn read_dict(
        &self,
        addr: u64,
        bounds: &Bounds,
        depth: u32,
    ) -> Result<(Vec<(Value, Value)>, u64), ReadError> {
        let used = self.read_size_at(addr.wrapping_add(common::DICT_USED))?;
        let keys = self.mem.read_u64(addr.wrapping_add(common::DICT_KEYS))?;
        let values = self.mem.read_u64(addr.wrapping_add(common::DICT_VALUES))?;
        if values != 0 {
            // Split table (instance __dict__): not decoded yet.
            return Ok((Vec::new(), used));
        }
        let entries = super::dict::keys_entries(&self.mem, self.info.layout.dict_keys, keys)?;
        let mut items = Vec::new();
        let limit = entries.count.min(100_000);
        for i in 0..limit {
            if items.len() >= bounds.items {
                break;
            }
            let key_at = entries
                .start
                .wrapping_add(i * entries.size)
                .wrapping_add(entries.key_at);
            let key = self.mem.read_u64(key_at)?;
            let value = self.mem.read_u64(key_at.wrapping_add(8))?;
            if key == 0 || value == 0 {
                continue;
            }
            let key_value = self.value_at_depth(key, bounds, depth + 1);
            let secret = bounds.redact
                && matches!(&key_value, Value::Str { value, .. } if is_secret_name(value));
            let value = if secret {
                Value::Redacted
            } else {
                self.value_at_depth(value, bounds, depth + 1)
            };
            items.push((key_value, value));
        }
        Ok((items, used))
    }

    fn read_size_at(&self, addr: u64) -> Result<u64, ReadError> {
        u64::try_from(self.mem.read_i64(addr)?).map_err(|_| ReadError::Corrupt("negative size"))
    }
}

/// Which decoder a type gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TypeKind {
    Int,
    Bool,
    Float,
    Str,
    Bytes,
    Tuple,
    List,
    Dict,
    Other,
}

/// Converts base-2^30 little-endian digits to decimal.
fn digits_to_decimal(digits: &[u32]) -> String {
    let mut n: Vec<u32> = digits.to_vec();
    while n.last() == Some(&0) {
        n.pop();
    }
    if n.is_empty() {
        return "0".into();
    }
    // Repeatedly divide by 10^9, collecting remainders.
    let mut chunks = Vec::new();
    while !n.is_empty() {
        let mut rem: u64 = 0;
        for d in n.iter_mut().rev() {
            let cur = (rem << 30) | u64::from(*d);
            *d = (cur / 1_000_000_000) as u32;
            rem = cur % 1_000_000_000;
        }
        chunks.push(rem as u32);
        while n.last() == Some(&0) {
            n.pop();
        }
    }
    let mut out = chunks.pop().expect("non-empty").to_string();
    for c in chunks.iter().rev() {
        let _ = write!(out, "{c:09}");
    }
    out
}

/// Formats a float the way Python's `repr` does.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Shortest round-trip digits and exponent.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    let decpt = exp + 1; // position of the decimal point after the first digit
    if (-4..16).contains(&exp) {
        let body = if decpt <= 0 {
            format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
        } else if decpt as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(decpt as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..decpt as usize],
                &digits[decpt as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let mant = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

fn python_str_repr(s: &str, truncated: bool) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::new();
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    if truncated {
        out.push_str("...");
    }
    out
}

fn python_bytes_repr(b: &[u8], truncated: bool) -> String {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') {
        b'"'
    } else {
        b'\''
    };
    let mut out = String::from("b");
    out.push(quote as char);
    for &c in b {
        match c {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c as char);
            }
            0x20..=0x7e => out.push(c as char),
            c => {
                let _ = write!(out, "\\x{c:02x}");
            }
        }
    }
    out.push(quote as char);
    if truncated {
        out.push_str("...");
    }
    out
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn seq(f: &mut std::fmt::Formatter<'_>, items: &[Value], len: u64) -> std::fmt::Result {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{item}")?;
            }
            if (items.len() as u64) < len {
                write!(f, ", ...({} more)", len - items.len() as u64)?;
            }
            Ok(())
        }
        match self {
            Value::None => f.write_str("None"),
            Value::Bool { value } => f.write_str(if *value { "True" } else { "False" }),
            Value::Int { value } => f.write_str(value),
            Value::Float { value } => f.write_str(&python_float_repr(*value)),
            Value::Str { value, len } => f.write_str(&python_str_repr(
                value,
                (value.chars().count() as u64) < *len,
            )),
            Value::Bytes { value, len } => {
                f.write_str(&python_bytes_repr(value, (value.len() as u64) < *len))
            }
            Value::Tuple { items, len } => {
                f.write_str("(")?;
                seq(f, items, *len)?;
                if *len == 1 {
                    f.write_str(",")?;
                }
                f.write_str(")")
            }
            Value::List { items, len } => {
                f.write_str("[")?;
                seq(f, items, *len)?;
                f.write_str("]")
            }
            Value::Dict { items, len } => {
                f.write_str("{")?;
                for (i, (k, v)) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                if (items.len() as u64) < *len {
                    if !items.is_empty() {
                        f.write_str(", ")?;
                    }
                    write!(f, "...({} more)", *len - items.len() as u64)?;
                }
                f.write_str("}")
            }
            Value::Object { type_name, address } => write!(f, "<{type_name} at {address:#x}>"),
            Value::Redacted => f.write_str("<redacted>"),
            Value::TooDeep => f.write_str("..."),
            Value::Unreadable { address } => write!(f, "<unreadable at {address:#x}>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_by_word() {
        for name in [
            "password",
            "api_key",
            "authToken",
            "DB_PASSWORD",
            "secret",
            "session_id",
            "x.token",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["monkey", "keys", "total", "user", "order_id", "tokenizer"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }

    #[test]
    fn converts_30_bit_digits_to_decimal() {
        assert_eq!(digits_to_decimal(&[]), "0");
        assert_eq!(digits_to_decimal(&[5]), "5");
        // 2**30 = [0, 1]
        assert_eq!(digits_to_decimal(&[0, 1]), "1073741824");
        // 2**100 = 1267650600228229401496703205376
        let mut digits = vec![0u32; 4];
        digits[3] = 1 << 10;
        assert_eq!(
            digits_to_decimal(&digits),
            "1267650600228229401496703205376"
        );
    }

    #[test]
    fn floats_print_like_python() {
        for (x, s) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (3.25, "3.25"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456.789, "123456.789"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5e-07"),
            (-2.5e100, "-2.5e+100"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(python_float_repr(x), s, "{x}");
        }
    }

    #[test]
    fn reprs_match_python() {
        let s = |v: &str| Value::Str {
            value: v.into(),
            len: v.chars().count() as u64,
        };
        assert_eq!(s("héllo").to_string(), "'héllo'");
        assert_eq!(s("it's").to_string(), "\"it's\"");
        assert_eq!(s("a\nb\\").to_string(), "'a\\nb\\\\'");
        let b = Value::Bytes {
            value: b"\x00ab'".to_vec(),
            len: 4,
        };
        assert_eq!(b.to_string(), "b\"\\x00ab'\"");
        let one = Value::Tuple {
            items: vec![Value::Int { value: "1".into() }],
            len: 1,
        };
        assert_eq!(one.to_string(), "(1,)");
        let d = Value::Dict {
            items: vec![(s("a"), Value::None), (s("b"), Value::Redacted)],
            len: 3,
        };
        assert_eq!(d.to_string(), "{'a': None, 'b': <redacted>, ...(1 more)}");
        let truncated = Value::Str {
            value: "ab".into(),
            len: 10,
        };
        assert_eq!(truncated.to_string(), "'ab'...");
    }
}
