//! A hit as the kernel sent it, turned into values the condition and the
//! message are evaluated over.

use pyprobe_common::logpoint::{
    HIT_STACK, Hit, KIND_BOOL, KIND_FLOAT, KIND_INT, KIND_NONE, KIND_STR, MAX_CAPTURES, MAX_STACK,
    STATUS_MISSING, STATUS_OK, STATUS_UNREADABLE, STATUS_UNSUPPORTED, STR_ASCII, StackFrame, Value,
};

use super::{
    compile::Wanted,
    eval::{Captured, Values, display},
    expr::Path,
};

/// Copies a hit out of the ring buffer's bytes (`None` if too short).
pub fn parse(bytes: &[u8]) -> Option<Hit> {
    if bytes.len() < std::mem::size_of::<Hit>() {
        return None;
    }
    // SAFETY: `Hit` is plain `repr(C)` data of integers, any bit pattern is
    // valid, and the length was checked; the read is unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Hit>()) })
}

/// The values of one hit.
pub fn values(hit: &Hit) -> &[Value] {
    &hit.values[..(hit.nvalues as usize).min(MAX_CAPTURES)]
}

/// The stack of one hit (innermost first), if it has one.
pub fn stack(hit: &Hit) -> &[StackFrame] {
    if hit.flags & HIT_STACK == 0 {
        return &[];
    }
    &hit.frames[..(hit.nframes as usize).min(MAX_STACK)]
}

/// What the kernel captured for `w`, as a value; `type_name` names the
/// type of other objects.
pub fn captured(w: &Wanted, v: &Value, type_name: &mut dyn FnMut(u64) -> String) -> Captured {
    match v.status {
        STATUS_OK => {}
        STATUS_MISSING if w.path.steps.is_empty() && !w.len => {
            return Captured::Missing("not set".to_owned());
        }
        STATUS_MISSING => return Captured::Missing("not found".to_owned()),
        STATUS_UNREADABLE => return Captured::Missing("unreadable".to_owned()),
        STATUS_UNSUPPORTED => {
            return Captured::Missing(
                "not captured: not a plain object, str, list, tuple or dict of up to 64 entries"
                    .to_owned(),
            );
        }
        _ => {
            return Captured::Missing(format!(
                "a step of {} does not apply to that type",
                shown(w)
            ));
        }
    }
    match v.kind {
        KIND_NONE => Captured::None,
        KIND_BOOL => Captured::Bool(v.raw != 0),
        KIND_INT => int(v),
        KIND_FLOAT => Captured::Float(f64::from_bits(v.raw)),
        KIND_STR => {
            let width = usize::from(v.str_kind & !STR_ASCII).clamp(1, 4);
            let kept = (v.len as usize).saturating_mul(width).min(v.bytes.len()) / width;
            let text: String = (0..kept)
                .map(|i| {
                    let at = i * width;
                    let code = match width {
                        1 => u32::from(v.bytes[at]),
                        2 => u32::from(u16::from_le_bytes([v.bytes[at], v.bytes[at + 1]])),
                        _ => u32::from_le_bytes([
                            v.bytes[at],
                            v.bytes[at + 1],
                            v.bytes[at + 2],
                            v.bytes[at + 3],
                        ]),
                    };
                    char::from_u32(code).unwrap_or('\u{fffd}')
                })
                .collect();
            Captured::Str {
                text,
                len: u64::from(v.len),
            }
        }
        _ => Captured::Other {
            type_name: type_name(v.type_),
            address: v.addr,
        },
    }
}

/// An int from its 30-bit digits (exact up to 4 digits, 120 bits).
fn int(v: &Value) -> Captured {
    let ndigits = v.len as usize;
    if ndigits > 4 {
        return Captured::Missing(format!("int of {} bits", ndigits * 30));
    }
    let mut magnitude: i128 = 0;
    for i in (0..ndigits).rev() {
        let d = u32::from_le_bytes([
            v.bytes[4 * i],
            v.bytes[4 * i + 1],
            v.bytes[4 * i + 2],
            v.bytes[4 * i + 3],
        ]) & 0x3fff_ffff;
        magnitude = (magnitude << 30) | i128::from(d);
    }
    Captured::Int(if v.negative != 0 {
        -magnitude
    } else {
        magnitude
    })
}

fn shown(w: &Wanted) -> String {
    if w.len {
        format!("len({})", w.path)
    } else {
        w.path.to_string()
    }
}

/// The values of one hit, by path, for evaluation.
pub struct HitValues {
    /// (what, value) in capture order.
    pub values: Vec<(Wanted, Captured)>,
}

impl Values for HitValues {
    fn value(&self, path: &Path) -> Captured {
        self.values
            .iter()
            .find(|(w, _)| !w.len && w.path == *path)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| Captured::Missing(format!("{path} was not captured")))
    }

    fn len(&self, path: &Path) -> Result<u64, String> {
        match self
            .values
            .iter()
            .find(|(w, _)| w.len && w.path == *path)
            .map(|(_, v)| v)
        {
            Some(Captured::Int(n)) => u64::try_from(*n).map_err(|_| "negative length".to_owned()),
            Some(Captured::Missing(why)) => Err(why.clone()),
            Some(other) => Err(format!("len() gave {}", display(other))),
            None => Err(format!("len({path}) was not captured")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logpoint::expr::Step;
    use pyprobe_common::logpoint::KIND_OTHER;

    fn wanted(root: &str, steps: Vec<Step>) -> Wanted {
        Wanted {
            path: Path {
                root: root.into(),
                steps,
            },
            len: false,
        }
    }

    fn value(kind: u8) -> Value {
        Value {
            status: STATUS_OK,
            kind,
            ..Value::default()
        }
    }

    #[test]
    fn kernel_values_decode_to_python_values() {
        let w = wanted("x", vec![]);
        let mut names = |_| "Order".to_owned();
        let mut v = value(KIND_INT);
        // -(5 + 3 * 2^30): two digits.
        v.len = 2;
        v.negative = 1;
        v.bytes[..4].copy_from_slice(&5u32.to_le_bytes());
        v.bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            captured(&w, &v, &mut names),
            Captured::Int(-(5 + (3 << 30)))
        );
        v.len = 5;
        assert_eq!(
            captured(&w, &v, &mut names),
            Captured::Missing("int of 150 bits".into())
        );

        let mut s = value(KIND_STR);
        s.str_kind = 1;
        s.len = 3;
        s.bytes[..3].copy_from_slice(&[b'z', b'o', 0xeb]);
        assert_eq!(
            captured(&w, &s, &mut names),
            Captured::Str {
                text: "zoë".into(),
                len: 3
            }
        );
        // A 100-character ASCII str keeps its first 64.
        let mut long = value(KIND_STR);
        long.str_kind = 1 | STR_ASCII;
        long.len = 100;
        long.bytes = [b'a'; 64];
        match captured(&w, &long, &mut names) {
            Captured::Str { text, len } => assert_eq!((text.len(), len), (64, 100)),
            other => panic!("{other:?}"),
        }

        let mut f = value(KIND_FLOAT);
        f.raw = 20.5f64.to_bits();
        assert_eq!(captured(&w, &f, &mut names), Captured::Float(20.5));
        let mut b = value(KIND_BOOL);
        b.raw = 1;
        assert_eq!(captured(&w, &b, &mut names), Captured::Bool(true));
        let mut o = value(KIND_OTHER);
        o.addr = 0x1000;
        assert_eq!(
            captured(&w, &o, &mut names),
            Captured::Other {
                type_name: "Order".into(),
                address: 0x1000
            }
        );
        let missing = Value {
            status: STATUS_MISSING,
            ..Value::default()
        };
        assert_eq!(
            captured(&w, &missing, &mut names),
            Captured::Missing("not set".into())
        );
        assert_eq!(
            captured(
                &wanted("x", vec![Step::Attr("y".into())]),
                &missing,
                &mut names
            ),
            Captured::Missing("not found".into())
        );
    }
}
