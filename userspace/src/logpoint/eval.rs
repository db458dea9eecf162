//! Evaluating a parsed expression over values captured at a hit, with
//! Python's meaning where the language overlaps: `1 == 1.0`, `True == 1`,
//! `"a" < "b"`, `None == 0` is false, `"a" < 1` is an error. Nothing here
//! reads the target: every value comes from what was captured.

use std::cmp::Ordering;

use super::expr::{CmpOp, Expr, Literal, Path};

/// A value captured at a hit (or why it is missing).
#[derive(Debug, Clone, PartialEq)]
pub enum Captured {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An int that fits 128 bits.
    Int(i128),
    /// A float.
    Float(f64),
    /// A str (possibly cut to the size bound; `len` is the whole length).
    Str {
        /// Text kept.
        text: String,
        /// Code points in the whole string.
        len: u64,
    },
    /// Another object: shown as `<type at address>`, compared with nothing.
    Other {
        /// Its type's name.
        type_name: String,
        /// Its address.
        address: u64,
    },
    /// The value could not be captured (no such local, attribute or key;
    /// unreadable memory; a redacted name), with the reason.
    Missing(String),
}

/// Where an expression's values come from.
pub trait Values {
    /// The value at `path`.
    fn value(&self, path: &Path) -> Captured;
    /// `len()` of the value at `path`, or why there is none.
    fn len(&self, path: &Path) -> Result<u64, String>;
}

/// Why an expression has no value (the hit is then counted, not printed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

fn literal(l: &Literal) -> Captured {
    match l {
        Literal::None => Captured::None,
        Literal::Bool(b) => Captured::Bool(*b),
        Literal::Int(v) => Captured::Int(*v),
        Literal::Float(v) => Captured::Float(*v),
        Literal::Str(s) => Captured::Str {
            text: s.clone(),
            len: s.chars().count() as u64,
        },
    }
}

/// Evaluates `e` to a value.
pub fn value(e: &Expr, values: &dyn Values) -> Result<Captured, EvalError> {
    Ok(match e {
        Expr::Literal(l) => literal(l),
        Expr::Path(p) => match values.value(p) {
            Captured::Missing(why) => return Err(EvalError(format!("{p}: {why}"))),
            v => v,
        },
        Expr::Len(p) => Captured::Int(i128::from(
            values
                .len(p)
                .map_err(|why| EvalError(format!("len({p}): {why}")))?,
        )),
        _ => Captured::Bool(truth(e, values)?),
    })
}

/// Evaluates `e` as a condition.
pub fn truth(e: &Expr, values: &dyn Values) -> Result<bool, EvalError> {
    match e {
        Expr::Not(inner) => Ok(!truth(inner, values)?),
        Expr::And(a, b) => Ok(truth(a, values)? && truth(b, values)?),
        Expr::Or(a, b) => Ok(truth(a, values)? || truth(b, values)?),
        Expr::IsNone(inner, negated) => {
            let is_none = value(inner, values)? == Captured::None;
            Ok(is_none != *negated)
        }
        Expr::Compare(a, op, b) => compare(&value(a, values)?, *op, &value(b, values)?),
        Expr::Literal(_) | Expr::Path(_) | Expr::Len(_) => truthy(&value(e, values)?, e),
    }
}

/// Python's truth value of a captured value.
fn truthy(v: &Captured, e: &Expr) -> Result<bool, EvalError> {
    match v {
        Captured::None => Ok(false),
        Captured::Bool(b) => Ok(*b),
        Captured::Int(i) => Ok(*i != 0),
        Captured::Float(f) => Ok(*f != 0.0),
        Captured::Str { len, .. } => Ok(*len != 0),
        Captured::Other { type_name, .. } => Err(EvalError(format!(
            "{e} is of type {type_name}: its truth is not known from outside (compare it, or use len())"
        ))),
        Captured::Missing(why) => Err(EvalError(format!("{e}: {why}"))),
    }
}

/// A number, if the value is one (bools count, as in Python).
fn number(v: &Captured) -> Option<Num> {
    match v {
        Captured::Bool(b) => Some(Num::Int(i128::from(*b))),
        Captured::Int(i) => Some(Num::Int(*i)),
        Captured::Float(f) => Some(Num::Float(*f)),
        _ => None,
    }
}

#[derive(Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
}

fn order_numbers(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => Some(x.cmp(&y)),
        (Num::Float(x), Num::Float(y)) => x.partial_cmp(&y),
        (Num::Int(x), Num::Float(y)) => (x as f64).partial_cmp(&y),
        (Num::Float(x), Num::Int(y)) => x.partial_cmp(&(y as f64)),
    }
}

fn compare(a: &Captured, op: CmpOp, b: &Captured) -> Result<bool, EvalError> {
    let ordering = match (a, b) {
        (Captured::Str { text: x, len: lx }, Captured::Str { text: y, len: ly }) => {
            let cut = (x.chars().count() as u64) < *lx || (y.chars().count() as u64) < *ly;
            if cut {
                return Err(EvalError(
                    "a string was cut to the capture bound; it cannot be compared".to_owned(),
                ));
            }
            // Rust orders UTF-8 by code point, as Python orders str.
            Some(x.cmp(y))
        }
        (Captured::None, Captured::None) => Some(Ordering::Equal),
        (Captured::Other { address: x, .. }, Captured::Other { address: y, .. }) if x == y => {
            Some(Ordering::Equal)
        }
        _ => match (number(a), number(b)) {
            (Some(x), Some(y)) => order_numbers(x, y),
            _ => None,
        },
    };
    let kind = |v: &Captured| match v {
        Captured::None => "None".to_owned(),
        Captured::Bool(_) => "bool".to_owned(),
        Captured::Int(_) => "int".to_owned(),
        Captured::Float(_) => "float".to_owned(),
        Captured::Str { .. } => "str".to_owned(),
        Captured::Other { type_name, .. } => type_name.clone(),
        Captured::Missing(_) => "missing".to_owned(),
    };
    match (op, ordering) {
        (CmpOp::Eq, o) => Ok(o == Some(Ordering::Equal)),
        (CmpOp::Ne, o) => Ok(o != Some(Ordering::Equal)),
        (_, None) => Err(EvalError(format!(
            "cannot order {} and {}",
            kind(a),
            kind(b)
        ))),
        (CmpOp::Lt, Some(o)) => Ok(o == Ordering::Less),
        (CmpOp::Le, Some(o)) => Ok(o != Ordering::Greater),
        (CmpOp::Gt, Some(o)) => Ok(o == Ordering::Greater),
        (CmpOp::Ge, Some(o)) => Ok(o != Ordering::Less),
    }
}

/// How a value prints in a message: as Python's `str()` would, except
/// objects, which show as `<type at 0x...>` (their `__str__` is never
/// run), and strings cut to the capture bound, which end in `...`.
pub fn display(v: &Captured) -> String {
    match v {
        Captured::None => "None".to_owned(),
        Captured::Bool(true) => "True".to_owned(),
        Captured::Bool(false) => "False".to_owned(),
        Captured::Int(i) => i.to_string(),
        Captured::Float(f) => python_float(*f),
        Captured::Str { text, len } => {
            if (text.chars().count() as u64) < *len {
                format!("{text}...")
            } else {
                text.clone()
            }
        }
        Captured::Other { type_name, address } => format!("<{type_name} at {address:#x}>"),
        Captured::Missing(why) => format!("<{why}>"),
    }
}

/// `repr(float)`: shortest round-trip digits, `.0` for whole numbers,
/// exponent form from 1e16 (and below 1e-4) as Python writes it.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').expect("exponent form");
        let exp: i32 = exp.parse().expect("exponent");
        return format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        );
    }
    let s = format!("{f:?}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

/// Whether a value read through `path` may hold a secret: the local's name
/// or any attribute or string key on the way looks secret (as `pyprobe
/// dump` decides).
pub fn is_secret(path: &Path) -> bool {
    crate::python::values::is_secret_name(&path.root)
        || path.steps.iter().any(|step| match step {
            super::expr::Step::Attr(name) | super::expr::Step::Key(Literal::Str(name)) => {
                crate::python::values::is_secret_name(name)
            }
            super::expr::Step::Key(_) => false,
        })
}

/// The message of a hit: the template's text with each `{expression}`
/// replaced by its value. A value read through a secret-looking name shows
/// as `<redacted>` unless `redact` is false; an expression without a value
/// shows as `<error: why>`.
pub fn render(template: &[super::expr::Segment], values: &dyn Values, redact: bool) -> String {
    use super::expr::Segment;
    let mut out = String::new();
    for segment in template {
        match segment {
            Segment::Text(text) => out.push_str(text),
            Segment::Value(e) => {
                if redact && e.paths().iter().any(|p| is_secret(p)) {
                    out.push_str("<redacted>");
                    continue;
                }
                match value(e, values) {
                    Ok(v) => out.push_str(&display(&v)),
                    Err(why) => out.push_str(&format!("<error: {why}>")),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::logpoint::expr::parse;

    struct Locals(BTreeMap<String, Captured>);

    impl Values for Locals {
        fn value(&self, path: &Path) -> Captured {
            self.0
                .get(&path.to_string())
                .cloned()
                .unwrap_or_else(|| Captured::Missing(format!("no local {}", path.root)))
        }
        fn len(&self, path: &Path) -> Result<u64, String> {
            match self.value(path) {
                Captured::Str { len, .. } => Ok(len),
                Captured::Missing(why) => Err(why),
                other => Err(format!("{} has no len()", display(&other))),
            }
        }
    }

    fn locals() -> Locals {
        let s = |t: &str| Captured::Str {
            text: t.into(),
            len: t.chars().count() as u64,
        };
        Locals(BTreeMap::from([
            ("order.total".into(), Captured::Float(150.5)),
            ("user.id".into(), Captured::Int(7)),
            ("user.name".into(), s("ada")),
            ("flag".into(), Captured::Bool(true)),
            ("nothing".into(), Captured::None),
            ("zero".into(), Captured::Int(0)),
            (
                "obj".into(),
                Captured::Other {
                    type_name: "Order".into(),
                    address: 0x1000,
                },
            ),
            (
                "cut".into(),
                Captured::Str {
                    text: "abc".into(),
                    len: 10,
                },
            ),
        ]))
    }

    fn check(text: &str) -> Result<bool, EvalError> {
        truth(&parse(text).unwrap(), &locals())
    }

    #[test]
    fn conditions_mean_what_they_mean_in_python() {
        for (text, want) in [
            ("order.total > 100 and user.id == 7", true),
            ("order.total > 100 and user.id == 8", false),
            ("user.id == 7.0", true),
            ("flag == 1", true),
            ("nothing is None", true),
            ("user.id is not None", true),
            ("nothing == 0", false),
            ("nothing != 0", true),
            ("user.name == 'ada'", true),
            ("user.name < 'b'", true),
            ("user.name == 7", false),
            ("len(user.name) == 3", true),
            ("not zero", true),
            ("zero or flag", true),
            ("obj == obj", true),
            ("-1 < zero", true),
        ] {
            assert_eq!(check(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn what_cannot_be_known_is_an_error_not_a_guess() {
        for (text, message) in [
            ("user.name < 7", "cannot order str and int"),
            ("nothing < 1", "cannot order None and int"),
            ("missing == 1", "missing: no local missing"),
            (
                "obj",
                "obj is of type Order: its truth is not known from outside (compare it, or use len())",
            ),
            (
                "cut == 'abc'",
                "a string was cut to the capture bound; it cannot be compared",
            ),
            ("len(flag) == 1", "len(flag): True has no len()"),
        ] {
            assert_eq!(check(text), Err(EvalError(message.into())), "{text}");
        }
        // `and` stops at the first false, as in Python: no error.
        assert_eq!(check("zero and missing == 1"), Ok(false));
    }

    #[test]
    fn messages_fill_values_and_redact_secret_names() {
        use crate::logpoint::expr::parse_template;
        let mut l = locals();
        l.0.insert(
            "user.api_key".into(),
            Captured::Str {
                text: "sk-123".into(),
                len: 6,
            },
        );
        let t = parse_template(
            "user={user.name} id={user.id} ok={user.id == 7} key={user.api_key} x={missing}",
        )
        .unwrap();
        assert_eq!(
            render(&t, &l, true),
            "user=ada id=7 ok=True key=<redacted> x=<error: missing: no local missing>"
        );
        assert!(render(&t, &l, false).contains("key=sk-123"));
        let p = |text: &str| match parse(text).unwrap() {
            Expr::Path(p) => p,
            other => panic!("{other}"),
        };
        assert!(is_secret(&p("password")));
        assert!(is_secret(&p("request.headers['authToken']")));
        assert!(!is_secret(&p("monkey.items[0]")));
    }

    #[test]
    fn values_print_as_python_str_would() {
        let cases = [
            (Captured::None, "None"),
            (Captured::Bool(false), "False"),
            (Captured::Int(-12), "-12"),
            (Captured::Float(150.5), "150.5"),
            (Captured::Float(3.0), "3.0"),
            (Captured::Float(1e16), "1e+16"),
            (Captured::Float(1.5e-7), "1.5e-07"),
            (Captured::Float(0.0001), "0.0001"),
            (
                Captured::Other {
                    type_name: "Order".into(),
                    address: 0x7f00,
                },
                "<Order at 0x7f00>",
            ),
            (
                Captured::Str {
                    text: "abc".into(),
                    len: 10,
                },
                "abc...",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(display(&v), want, "{v:?}");
        }
    }
}
