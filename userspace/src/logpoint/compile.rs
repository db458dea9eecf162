//! From a parsed condition and template to the kernel's [`Program`]: which
//! values to capture (a local, then attribute, key and index steps, or its
//! `len()`), and which comparisons the kernel can test itself.
//!
//! What cannot be captured safely is refused here, when the log point is
//! created, with the reason: an unknown name, more values than the kernel
//! captures, a path longer than it follows, a name or key it cannot
//! compare.

use pyprobe_common::logpoint::{
    Atom, CMP_EQ, CMP_GE, CMP_GT, CMP_IS_NONE, CMP_IS_NOT_NONE, CMP_LE, CMP_LT, CMP_NE,
    CONST_FLOAT, CONST_INT, CONST_STR, Capture, MAX_ATOMS, MAX_CAPTURES, MAX_NAMES, MAX_STEPS,
    NAME_BYTES, Name, OP_ATTR, OP_KEY_INT, OP_KEY_STR, OP_LEN, Program, Step as KernelStep,
};

use super::expr::{CmpOp, Expr, Literal, Path, Segment, Step};

/// A value the kernel captures: a path, or its `len()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    /// The path.
    pub path: Path,
    /// `len(path)` rather than the value.
    pub len: bool,
}

/// A log point's kernel program and what each captured value is.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// For the kernel (rate, count and stack are set by the caller).
    pub program: Program,
    /// Captured values, in the program's order.
    pub wanted: Vec<Wanted>,
    /// Comparisons the kernel tests (for the attach message).
    pub kernel_atoms: Vec<String>,
}

/// Why a log point cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// A name that is not a local or argument of the code.
    #[error("unknown name {name:?} in {function}: its locals and arguments are {known}")]
    UnknownName {
        /// The name.
        name: String,
        /// The function.
        function: String,
        /// Its locals, comma separated.
        known: String,
    },
    /// More distinct values than the kernel captures.
    #[error("the log point reads {0} values; at most {MAX_CAPTURES} can be captured at a hit")]
    TooManyValues(usize),
    /// A path with more steps than the kernel follows.
    #[error(
        "{0} has more than {MAX_STEPS} steps after the local; the kernel follows at most {MAX_STEPS}"
    )]
    TooDeep(String),
    /// More distinct attribute names and string keys than the kernel keeps.
    #[error("the log point uses more than {MAX_NAMES} distinct attribute names and string keys")]
    TooManyNames,
    /// A name or key the kernel cannot compare.
    #[error(
        "{0:?} cannot be looked up in the kernel: names and string keys must be ASCII and at most {NAME_BYTES} bytes"
    )]
    BadName(String),
    /// A key of a kind the kernel cannot look up.
    #[error("key {0} cannot be looked up in the kernel: keys must be str or int (64-bit)")]
    BadKey(String),
}

/// Compiles the values `condition` and `template` read, for a code object
/// whose locals (in `localsplus` order) are `varnames`.
pub fn compile(
    condition: Option<&Expr>,
    template: &[Segment],
    varnames: &[String],
    function: &str,
) -> Result<Compiled, CompileError> {
    let mut wanted: Vec<Wanted> = Vec::new();
    let mut exprs: Vec<&Expr> = Vec::new();
    if let Some(c) = condition {
        exprs.push(c);
    }
    for segment in template {
        if let Segment::Value(e) = segment {
            exprs.push(e);
        }
    }
    for e in &exprs {
        collect(e, &mut wanted);
    }
    if wanted.len() > MAX_CAPTURES {
        return Err(CompileError::TooManyValues(wanted.len()));
    }
    let mut program = Program {
        ncaptures: wanted.len() as u32,
        ..Program::default()
    };
    let mut names: Vec<String> = Vec::new();
    for (i, w) in wanted.iter().enumerate() {
        program.captures[i] = capture(w, varnames, function, &mut names)?;
    }
    for (i, n) in names.iter().enumerate() {
        program.names[i] = name(n)?;
    }
    let mut kernel_atoms = Vec::new();
    if let Some(c) = condition {
        let mut conjuncts = Vec::new();
        conjunction(c, &mut conjuncts);
        for e in conjuncts {
            if kernel_atoms.len() == MAX_ATOMS {
                break;
            }
            if let Some(atom) = atom(e, &wanted) {
                program.atoms[kernel_atoms.len()] = atom;
                kernel_atoms.push(e.to_string());
            }
        }
    }
    program.natoms = kernel_atoms.len() as u32;
    Ok(Compiled {
        program,
        wanted,
        kernel_atoms,
    })
}

fn collect(e: &Expr, out: &mut Vec<Wanted>) {
    let mut push = |w: Wanted| {
        if !out.contains(&w) {
            out.push(w);
        }
    };
    match e {
        Expr::Literal(_) => {}
        Expr::Path(p) => push(Wanted {
            path: p.clone(),
            len: false,
        }),
        Expr::Len(p) => push(Wanted {
            path: p.clone(),
            len: true,
        }),
        Expr::Not(a) | Expr::IsNone(a, _) => collect(a, out),
        Expr::And(a, b) | Expr::Or(a, b) | Expr::Compare(a, _, b) => {
            collect(a, out);
            collect(b, out);
        }
    }
}

fn capture(
    w: &Wanted,
    varnames: &[String],
    function: &str,
    names: &mut Vec<String>,
) -> Result<Capture, CompileError> {
    let local = varnames
        .iter()
        .position(|n| *n == w.path.root)
        .ok_or_else(|| CompileError::UnknownName {
            name: w.path.root.clone(),
            function: function.to_owned(),
            known: varnames.join(", "),
        })?;
    let steps = w.path.steps.len() + usize::from(w.len);
    if steps > MAX_STEPS {
        return Err(CompileError::TooDeep(w.path.to_string()));
    }
    let mut c = Capture {
        local: local as u32,
        nsteps: steps as u32,
        ..Capture::default()
    };
    let mut name_index = |n: &str| -> Result<u32, CompileError> {
        name(n)?;
        if let Some(i) = names.iter().position(|x| x == n) {
            return Ok(i as u32);
        }
        if names.len() == MAX_NAMES {
            return Err(CompileError::TooManyNames);
        }
        names.push(n.to_owned());
        Ok(names.len() as u32 - 1)
    };
    for (i, step) in w.path.steps.iter().enumerate() {
        c.steps[i] = match step {
            Step::Attr(n) => KernelStep {
                op: OP_ATTR,
                arg: name_index(n)?,
                int_arg: 0,
            },
            Step::Key(Literal::Str(k)) => KernelStep {
                op: OP_KEY_STR,
                arg: name_index(k)?,
                int_arg: 0,
            },
            Step::Key(Literal::Int(k)) => KernelStep {
                op: OP_KEY_INT,
                arg: 0,
                int_arg: i64::try_from(*k).map_err(|_| CompileError::BadKey(k.to_string()))?,
            },
            Step::Key(Literal::Bool(b)) => KernelStep {
                op: OP_KEY_INT,
                arg: 0,
                int_arg: i64::from(*b),
            },
            Step::Key(other) => return Err(CompileError::BadKey(other.to_string())),
        };
    }
    if w.len {
        c.steps[w.path.steps.len()] = KernelStep {
            op: OP_LEN,
            arg: 0,
            int_arg: 0,
        };
    }
    Ok(c)
}

fn name(n: &str) -> Result<Name, CompileError> {
    if !n.is_ascii() || n.len() > NAME_BYTES {
        return Err(CompileError::BadName(n.to_owned()));
    }
    let mut out = Name {
        len: n.len() as u32,
        ..Name::default()
    };
    out.bytes[..n.len()].copy_from_slice(n.as_bytes());
    Ok(out)
}

fn conjunction<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::And(a, b) => {
            conjunction(a, out);
            conjunction(b, out);
        }
        other => out.push(other),
    }
}

/// The kernel form of one conjunct, if it is a comparison of a captured
/// value with an int, bool or short ASCII str constant, or `is [not] None`.
fn atom(e: &Expr, wanted: &[Wanted]) -> Option<Atom> {
    let index = |e: &Expr| -> Option<u32> {
        let w = match e {
            Expr::Path(p) => Wanted {
                path: p.clone(),
                len: false,
            },
            Expr::Len(p) => Wanted {
                path: p.clone(),
                len: true,
            },
            _ => return None,
        };
        wanted.iter().position(|x| *x == w).map(|i| i as u32)
    };
    match e {
        Expr::IsNone(a, negated) => Some(Atom {
            capture: index(a)?,
            cmp: if *negated {
                CMP_IS_NOT_NONE
            } else {
                CMP_IS_NONE
            },
            ..Atom::default()
        }),
        Expr::Compare(a, op, b) => {
            let (capture, op, constant) = match (index(a), index(b), &**a, &**b) {
                (Some(i), None, _, Expr::Literal(l)) => (i, *op, l),
                (None, Some(i), Expr::Literal(l), _) => (i, flip(*op), l),
                _ => return None,
            };
            let cmp = match op {
                CmpOp::Eq => CMP_EQ,
                CmpOp::Ne => CMP_NE,
                CmpOp::Lt => CMP_LT,
                CmpOp::Le => CMP_LE,
                CmpOp::Gt => CMP_GT,
                CmpOp::Ge => CMP_GE,
            };
            let mut atom = Atom {
                capture,
                cmp,
                ..Atom::default()
            };
            match constant {
                Literal::Int(v) => {
                    atom.kind = CONST_INT;
                    atom.int = i64::try_from(*v).ok()?;
                    // Floats hold ints up to 2^53 exactly.
                    if atom.int.unsigned_abs() <= 1 << 53 {
                        atom.has_float = 1;
                        atom.float = (atom.int as f64).to_bits();
                    }
                }
                Literal::Bool(v) => {
                    atom.kind = CONST_INT;
                    atom.int = i64::from(*v);
                    atom.has_float = 1;
                    atom.float = (atom.int as f64).to_bits();
                }
                Literal::Float(v) if v.is_finite() => {
                    atom.kind = CONST_FLOAT;
                    atom.has_float = 1;
                    atom.float = v.to_bits();
                }
                Literal::Str(s) if cmp == CMP_EQ || cmp == CMP_NE => {
                    atom.kind = CONST_STR;
                    atom.str = name(s).ok()?;
                }
                _ => return None,
            }
            Some(atom)
        }
        _ => None,
    }
}

/// `c OP x` as `x OP' c`.
fn flip(op: CmpOp) -> CmpOp {
    match op {
        CmpOp::Lt => CmpOp::Gt,
        CmpOp::Le => CmpOp::Ge,
        CmpOp::Gt => CmpOp::Lt,
        CmpOp::Ge => CmpOp::Le,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logpoint::expr::{parse, parse_template};

    fn locals() -> Vec<String> {
        ["order", "rush", "total", "count"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn paths_become_captures_with_steps_and_shared_names() {
        let cond = parse("order.total > 100 and order.user.id == 7 and rush").unwrap();
        let template = parse_template(
            "id={order.id} n={len(order.items)} src={order.meta['source']} first={order.items[-1]}",
        )
        .unwrap();
        let c = compile(Some(&cond), &template, &locals(), "handle_order").unwrap();
        let shown: Vec<String> = c
            .wanted
            .iter()
            .map(|w| {
                if w.len {
                    format!("len({})", w.path)
                } else {
                    w.path.to_string()
                }
            })
            .collect();
        assert_eq!(
            shown,
            [
                "order.total",
                "order.user.id",
                "rush",
                "order.id",
                "len(order.items)",
                "order.meta[\"source\"]",
                "order.items[-1]"
            ]
        );
        let p = &c.program;
        assert_eq!(p.ncaptures, 7);
        // order.user.id: local 0, ATTR user, ATTR id.
        assert_eq!(p.captures[1].local, 0);
        assert_eq!(p.captures[1].nsteps, 2);
        assert_eq!(p.captures[1].steps[0].op, OP_ATTR);
        assert_eq!(p.captures[1].steps[1].op, OP_ATTR);
        let name_of = |i: u32| {
            let n = &p.names[i as usize];
            String::from_utf8(n.bytes[..n.len as usize].to_vec()).unwrap()
        };
        assert_eq!(name_of(p.captures[1].steps[0].arg), "user");
        assert_eq!(name_of(p.captures[1].steps[1].arg), "id");
        // "id" is shared by order.user.id and order.id.
        assert_eq!(p.captures[3].steps[0].arg, p.captures[1].steps[1].arg);
        assert_eq!(p.captures[4].steps[1].op, OP_LEN);
        assert_eq!(p.captures[5].steps[1].op, OP_KEY_STR);
        assert_eq!(name_of(p.captures[5].steps[1].arg), "source");
        assert_eq!(p.captures[6].steps[1].op, OP_KEY_INT);
        assert_eq!(p.captures[6].steps[1].int_arg, -1);
        assert_eq!(p.captures[2].local, 1);
        // The two comparisons go to the kernel; the bare `rush` does not.
        assert_eq!(
            c.kernel_atoms,
            ["(order.total > 100)", "(order.user.id == 7)"]
        );
        assert_eq!(p.natoms, 2);
        assert_eq!(
            (p.atoms[0].capture, p.atoms[0].cmp, p.atoms[0].int),
            (0, CMP_GT, 100)
        );
        assert_eq!(
            (p.atoms[1].capture, p.atoms[1].cmp, p.atoms[1].int),
            (1, CMP_EQ, 7)
        );
    }

    #[test]
    fn kernel_atoms_only_for_simple_conjuncts() {
        let cond =
            parse("7 < total and order.user is not None and (rush or count == 1) and order.user.name == 'ana' and total > 1.5")
                .unwrap();
        let c = compile(Some(&cond), &[], &locals(), "f").unwrap();
        assert_eq!(
            c.kernel_atoms,
            [
                "(7 < total)",
                "(order.user is not None)",
                "(order.user.name == \"ana\")",
                "(total > 1.5)"
            ]
        );
        assert_eq!(c.program.atoms[3].kind, CONST_FLOAT);
        assert_eq!(c.program.atoms[3].float, 1.5f64.to_bits());
        assert_eq!(c.program.atoms[0].float, 7f64.to_bits(), "7 as a float too");
        assert_eq!(c.program.atoms[0].cmp, CMP_GT, "7 < total is total > 7");
        assert_eq!(c.program.atoms[1].cmp, CMP_IS_NOT_NONE);
        assert_eq!(c.program.atoms[2].kind, CONST_STR);
        assert_eq!(c.program.atoms[2].str.len, 3);
    }

    #[test]
    fn what_cannot_be_captured_is_refused_with_the_reason() {
        let err = |cond: &str| {
            compile(Some(&parse(cond).unwrap()), &[], &locals(), "handle_order")
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("user.id == 7"),
            "unknown name \"user\" in handle_order: its locals and arguments are order, rush, total, count"
        );
        assert!(err("order.a.b.c.d.e == 1").contains("more than 4 steps"));
        assert!(err(&format!("order.{} == 1", "x".repeat(33))).contains("at most 32 bytes"));
        let many = (0..9)
            .map(|i| format!("order.a{i} == 1"))
            .collect::<Vec<_>>()
            .join(" and ");
        assert!(err(&many).contains("reads 9 values"));
    }
}
