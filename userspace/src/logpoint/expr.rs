//! The expression language of log points: conditions (`--when`) and the
//! `{...}` parts of message templates (`--msg`).
//!
//! Deliberately small, so that every expression can be evaluated from
//! memory captured at the hit without running any of the target's code:
//! literals (int, float, str, `True`, `False`, `None`), names of locals and
//! arguments, attribute access on plain objects (`order.total`: the
//! instance `__dict__`), subscripts with a constant key (`row["id"]`,
//! `items[0]`), `len(...)`, comparisons (`==`, `!=`, `<`, `<=`, `>`, `>=`,
//! `is None`, `is not None`), `and`, `or`, `not` and parentheses.
//! Comparisons do not chain (`a < b < c` is refused). Errors carry the
//! column (1-based) where they were found.

use std::fmt;

/// A constant in an expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer (up to 128 bits).
    Int(i128),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::None => write!(f, "None"),
            Literal::Bool(true) => write!(f, "True"),
            Literal::Bool(false) => write!(f, "False"),
            Literal::Int(v) => write!(f, "{v}"),
            Literal::Float(v) => write!(f, "{v:?}"),
            Literal::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// One step from a value to a value inside it.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `.name`: an attribute in the object's `__dict__`.
    Attr(String),
    /// `[key]`: a dict key, or a list/tuple index.
    Key(Literal),
}

/// A value the target holds: a local (or argument) and steps into it; with
/// `len`, its length. What the kernel captures at a hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    /// Name of the local.
    pub root: String,
    /// Steps from it.
    pub steps: Vec<Step>,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.root)?;
        for step in &self.steps {
            match step {
                Step::Attr(name) => write!(f, ".{name}")?,
                Step::Key(key) => write!(f, "[{key}]")?,
            }
        }
        Ok(())
    }
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A constant.
    Literal(Literal),
    /// A value of the target.
    Path(Path),
    /// `len(path)`.
    Len(Path),
    /// `not e`.
    Not(Box<Expr>),
    /// `a and b`.
    And(Box<Expr>, Box<Expr>),
    /// `a or b`.
    Or(Box<Expr>, Box<Expr>),
    /// `a OP b`.
    Compare(Box<Expr>, CmpOp, Box<Expr>),
    /// `e is None` (`negated`: `e is not None`).
    IsNone(Box<Expr>, bool),
}

impl Expr {
    /// Every value of the target the expression reads, in order of
    /// appearance, without repeats.
    pub fn paths(&self) -> Vec<&Path> {
        let mut out = Vec::new();
        self.collect_paths(&mut out);
        out
    }

    fn collect_paths<'a>(&'a self, out: &mut Vec<&'a Path>) {
        match self {
            Expr::Literal(_) => {}
            Expr::Path(p) | Expr::Len(p) => {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            Expr::Not(e) | Expr::IsNone(e, _) => e.collect_paths(out),
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Compare(a, _, b) => {
                a.collect_paths(out);
                b.collect_paths(out);
            }
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Literal(l) => write!(f, "{l}"),
            Expr::Path(p) => write!(f, "{p}"),
            Expr::Len(p) => write!(f, "len({p})"),
            Expr::Not(e) => write!(f, "(not {e})"),
            Expr::And(a, b) => write!(f, "({a} and {b})"),
            Expr::Or(a, b) => write!(f, "({a} or {b})"),
            Expr::Compare(a, op, b) => write!(f, "({a} {} {b})", op.symbol()),
            Expr::IsNone(e, false) => write!(f, "({e} is None)"),
            Expr::IsNone(e, true) => write!(f, "({e} is not None)"),
        }
    }
}

/// A syntax error, with the 1-based column where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct ParseError {
    /// 1-based column (in characters).
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl ParseError {
    /// The error under the text it is about: the text, then a caret at the
    /// column.
    pub fn show(&self, text: &str) -> String {
        format!(
            "{text}\n{}^ {}",
            " ".repeat(self.column.saturating_sub(1)),
            self.message
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Int(i128),
    Float(f64),
    Str(String),
    Op(&'static str),
    End,
}

/// A token and its 1-based column.
type Token = (Tok, usize);

const OPERATORS: &[&str] = &[
    "==", "!=", "<=", ">=", "<", ">", "(", ")", "[", "]", ".", "-",
];

fn lex(text: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |column: usize, message: String| ParseError { column, message };
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Tok::Name(chars[start..i].iter().collect()), column));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                // `1.5`, but not the attribute dot of `x[1].name`.
                if chars[i] == '.' && !chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()) {
                    break;
                }
                i += 1;
            }
            let word: String = chars[start..i].iter().filter(|&&c| c != '_').collect();
            let tok = if let Some(hex) = word.strip_prefix("0x").or_else(|| word.strip_prefix("0X"))
            {
                i128::from_str_radix(hex, 16).ok().map(Tok::Int)
            } else if word.contains('.') || word.contains('e') || word.contains('E') {
                word.parse::<f64>().map(Tok::Float).ok()
            } else {
                word.parse::<i128>().ok().map(Tok::Int)
            };
            out.push((
                tok.ok_or_else(|| err(column, format!("bad number {word:?}")))?,
                column,
            ));
        } else if c == '"' || c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(err(column, "unterminated string".to_owned())),
                    Some(&q) if q == c => break,
                    Some('\\') => {
                        let escaped = match chars.get(i + 1) {
                            Some('n') => '\n',
                            Some('t') => '\t',
                            Some('\\') => '\\',
                            Some('\'') => '\'',
                            Some('"') => '"',
                            Some(other) => {
                                return Err(err(i + 1, format!("unknown escape \\{other}")));
                            }
                            None => return Err(err(column, "unterminated string".to_owned())),
                        };
                        s.push(escaped);
                        i += 2;
                    }
                    Some(&ch) => {
                        s.push(ch);
                        i += 1;
                    }
                }
            }
            i += 1;
            out.push((Tok::Str(s), column));
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let Some(op) = OPERATORS.iter().find(|op| rest.starts_with(**op)) else {
                let hint = match c {
                    '=' => " (comparison is ==)",
                    '&' | '|' => " (use and / or)",
                    '!' => " (use not)",
                    _ => "",
                };
                return Err(err(column, format!("unexpected {c:?}{hint}")));
            };
            i += op.len();
            out.push((Tok::Op(op), column));
        }
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

const KEYWORDS: &[&str] = &[
    "and", "or", "not", "is", "None", "True", "False", "in", "len",
];

impl Parser {
    fn peek(&self) -> &Tok {
        &self.tokens[self.at].0
    }

    fn column(&self) -> usize {
        self.tokens[self.at].1
    }

    fn next(&mut self) -> Token {
        let t = self.tokens[self.at].clone();
        if self.at + 1 < self.tokens.len() {
            self.at += 1;
        }
        t
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            column: self.column(),
            message: message.into(),
        })
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek(), Tok::Name(n) if n == word)
    }

    fn is_op(&self, op: &str) -> bool {
        matches!(self.peek(), Tok::Op(o) if *o == op)
    }

    fn expect_op(&mut self, op: &str) -> Result<(), ParseError> {
        if self.is_op(op) {
            self.next();
            Ok(())
        } else {
            self.error(format!("expected {op:?}, found {}", describe(self.peek())))
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.and()?;
        while self.is_word("or") {
            self.next();
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.not()?;
        while self.is_word("and") {
            self.next();
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, ParseError> {
        if self.is_word("not") {
            self.next();
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, ParseError> {
        let left = self.operand()?;
        if self.is_word("is") {
            self.next();
            let negated = self.is_word("not");
            if negated {
                self.next();
            }
            if !self.is_word("None") {
                return self.error("`is` compares with None only (`is None`, `is not None`)");
            }
            self.next();
            return self.no_chain(Expr::IsNone(Box::new(left), negated));
        }
        if self.is_word("in") {
            return self.error("`in` is not supported");
        }
        let op = match self.peek() {
            Tok::Op("==") => CmpOp::Eq,
            Tok::Op("!=") => CmpOp::Ne,
            Tok::Op("<") => CmpOp::Lt,
            Tok::Op("<=") => CmpOp::Le,
            Tok::Op(">") => CmpOp::Gt,
            Tok::Op(">=") => CmpOp::Ge,
            _ => return Ok(left),
        };
        self.next();
        let right = self.operand()?;
        self.no_chain(Expr::Compare(Box::new(left), op, Box::new(right)))
    }

    /// Refuses `a < b < c` and `x is None == y`.
    fn no_chain(&self, e: Expr) -> Result<Expr, ParseError> {
        match self.peek() {
            Tok::Op("==" | "!=" | "<" | "<=" | ">" | ">=") => {
                self.error("comparisons do not chain: join them with `and`")
            }
            Tok::Name(n) if n == "is" => {
                self.error("comparisons do not chain: join them with `and`")
            }
            _ => Ok(e),
        }
    }

    fn operand(&mut self) -> Result<Expr, ParseError> {
        let column = self.column();
        match self.peek().clone() {
            Tok::Op("(") => {
                self.next();
                let e = self.or()?;
                self.expect_op(")")?;
                Ok(e)
            }
            Tok::Name(n) if n == "len" => {
                self.next();
                self.expect_op("(")?;
                let inner = self.column();
                let e = self.operand()?;
                self.expect_op(")")?;
                match e {
                    Expr::Path(p) => Ok(Expr::Len(p)),
                    _ => Err(ParseError {
                        column: inner,
                        message: "len() takes a local or a value inside one".to_owned(),
                    }),
                }
            }
            _ => {
                if let Some(lit) = self.literal()? {
                    return Ok(Expr::Literal(lit));
                }
                match self.next() {
                    (Tok::Name(n), _) if KEYWORDS.contains(&n.as_str()) => Err(ParseError {
                        column,
                        message: format!("unexpected keyword `{n}`"),
                    }),
                    (Tok::Name(root), _) => self.steps(root),
                    (tok, _) => Err(ParseError {
                        column,
                        message: format!("expected a value, found {}", describe(&tok)),
                    }),
                }
            }
        }
    }

    /// A literal at the cursor, consumed; `None` (not an error) if there
    /// is none.
    fn literal(&mut self) -> Result<Option<Literal>, ParseError> {
        let lit = match self.peek() {
            Tok::Int(v) => Literal::Int(*v),
            Tok::Float(v) => Literal::Float(*v),
            Tok::Str(s) => Literal::Str(s.clone()),
            Tok::Name(n) if n == "None" => Literal::None,
            Tok::Name(n) if n == "True" => Literal::Bool(true),
            Tok::Name(n) if n == "False" => Literal::Bool(false),
            Tok::Op("-") => {
                let column = self.column();
                self.next();
                return match self.next().0 {
                    Tok::Int(v) => Ok(Some(Literal::Int(-v))),
                    Tok::Float(v) => Ok(Some(Literal::Float(-v))),
                    _ => Err(ParseError {
                        column,
                        message: "`-` is allowed before a number only".to_owned(),
                    }),
                };
            }
            _ => return Ok(None),
        };
        self.next();
        Ok(Some(lit))
    }

    fn steps(&mut self, root: String) -> Result<Expr, ParseError> {
        let mut steps = Vec::new();
        loop {
            if self.is_op(".") {
                self.next();
                let column = self.column();
                match self.next().0 {
                    Tok::Name(n) => steps.push(Step::Attr(n)),
                    tok => {
                        return Err(ParseError {
                            column,
                            message: format!(
                                "expected an attribute name, found {}",
                                describe(&tok)
                            ),
                        });
                    }
                }
            } else if self.is_op("[") {
                self.next();
                let column = self.column();
                let Some(key) = self.literal()? else {
                    return Err(ParseError {
                        column,
                        message: "subscripts take a constant (a number or a string)".to_owned(),
                    });
                };
                if matches!(key, Literal::Float(_)) {
                    return Err(ParseError {
                        column,
                        message: "a float is not a usable key here".to_owned(),
                    });
                }
                self.expect_op("]")?;
                steps.push(Step::Key(key));
            } else if self.is_op("(") {
                return self.error("calls are not allowed (only len())");
            } else {
                return Ok(Expr::Path(Path { root, steps }));
            }
        }
    }
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Name(n) => format!("`{n}`"),
        Tok::Int(v) => format!("`{v}`"),
        Tok::Float(v) => format!("`{v}`"),
        Tok::Str(s) => format!("{s:?}"),
        Tok::Op(o) => format!("`{o}`"),
        Tok::End => "the end".to_owned(),
    }
}

/// Parses a condition or a template's `{...}` expression.
pub fn parse(text: &str) -> Result<Expr, ParseError> {
    let mut p = Parser {
        tokens: lex(text)?,
        at: 0,
    };
    if matches!(p.peek(), Tok::End) {
        return p.error("empty expression");
    }
    let e = p.or()?;
    if !matches!(p.peek(), Tok::End) {
        return p.error(format!("unexpected {}", describe(p.peek())));
    }
    Ok(e)
}

/// A piece of a message template.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// Text printed as it is.
    Text(String),
    /// `{expr}`: the value printed.
    Value(Expr),
}

/// Parses a message template: text with `{expression}` parts; `{{` and
/// `}}` stand for braces. Error columns are within the template.
pub fn parse_template(text: &str) -> Result<Vec<Segment>, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut literal = String::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '{' if chars.get(i + 1) == Some(&'{') => {
                literal.push('{');
                i += 2;
            }
            '}' if chars.get(i + 1) == Some(&'}') => {
                literal.push('}');
                i += 2;
            }
            '}' => {
                return Err(ParseError {
                    column: i + 1,
                    message: "unmatched `}` (write `}}` for a brace)".to_owned(),
                });
            }
            '{' => {
                let start = i + 1;
                let Some(len) = chars[start..].iter().position(|&c| c == '}') else {
                    return Err(ParseError {
                        column: i + 1,
                        message: "unclosed `{`".to_owned(),
                    });
                };
                let inner: String = chars[start..start + len].iter().collect();
                let expr = parse(&inner).map_err(|e| ParseError {
                    column: e.column + start,
                    message: e.message,
                })?;
                if !literal.is_empty() {
                    out.push(Segment::Text(std::mem::take(&mut literal)));
                }
                out.push(Segment::Value(expr));
                i = start + len + 1;
            }
            c => {
                literal.push(c);
                i += 1;
            }
        }
    }
    if !literal.is_empty() {
        out.push(Segment::Text(literal));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(text: &str) -> String {
        parse(text)
            .map(|e| e.to_string())
            .unwrap_or_else(|e| format!("error {e}"))
    }

    #[test]
    fn parses_with_python_precedence() {
        assert_eq!(
            shown("order.total > 100 and user.id == 7"),
            "((order.total > 100) and (user.id == 7))"
        );
        assert_eq!(shown("not a or b and c"), "((not a) or (b and c))");
        assert_eq!(shown("not (a or b)"), "(not (a or b))");
        assert_eq!(
            shown("x is None or y is not None"),
            "((x is None) or (y is not None))"
        );
        assert_eq!(shown("row['id'] >= -3"), "(row[\"id\"] >= -3)");
        assert_eq!(shown("len(items) != 0"), "(len(items) != 0)");
        assert_eq!(
            shown("items[0].name == \"a\\\"b\""),
            "(items[0].name == \"a\\\"b\")"
        );
        assert_eq!(shown("price < 1.5e3"), "(price < 1500.0)");
        assert_eq!(shown("flag"), "flag");
        assert_eq!(shown("n == 0x10"), "(n == 16)");
        assert_eq!(shown("n == 0x1e"), "(n == 30)");
        assert_eq!(shown("n == 1_000"), "(n == 1000)");
    }

    #[test]
    fn errors_point_at_the_column() {
        let cases = [
            ("a = 1", 3, "unexpected '=' (comparison is ==)"),
            ("a == ", 6, "expected a value, found the end"),
            (
                "a < b < c",
                7,
                "comparisons do not chain: join them with `and`",
            ),
            ("(a == 1", 8, "expected \")\", found the end"),
            ("f(x) == 1", 2, "calls are not allowed (only len())"),
            (
                "x[y] == 1",
                3,
                "subscripts take a constant (a number or a string)",
            ),
            (
                "x is 3",
                6,
                "`is` compares with None only (`is None`, `is not None`)",
            ),
            ("a && b", 3, "unexpected '&' (use and / or)"),
            ("'open", 1, "unterminated string"),
            ("a == 1 b", 8, "unexpected `b`"),
            ("len(3)", 5, "len() takes a local or a value inside one"),
            ("x in y", 3, "`in` is not supported"),
            ("", 1, "empty expression"),
            ("and", 1, "unexpected keyword `and`"),
        ];
        for (text, column, message) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(
                (e.column, e.message.as_str()),
                (column, message),
                "{text:?}"
            );
        }
        let e = parse("a = 1").unwrap_err();
        assert_eq!(
            e.show("a = 1"),
            "a = 1\n  ^ unexpected '=' (comparison is ==)"
        );
    }

    #[test]
    fn lists_the_values_it_reads_once_each() {
        let e = parse("order.total > 100 and len(order.items) > 0 and order.total < 500").unwrap();
        let paths: Vec<String> = e.paths().iter().map(|p| p.to_string()).collect();
        assert_eq!(paths, ["order.total", "order.items"]);
    }

    #[test]
    fn templates_mix_text_and_values() {
        let t = parse_template("order={order.id} total={total} {{literal}}").unwrap();
        assert_eq!(
            t,
            vec![
                Segment::Text("order=".into()),
                Segment::Value(parse("order.id").unwrap()),
                Segment::Text(" total=".into()),
                Segment::Value(parse("total").unwrap()),
                Segment::Text(" {literal}".into()),
            ]
        );
        let e = parse_template("x={a ==}").unwrap_err();
        assert_eq!(e.column, 8, "{e}");
        assert_eq!(parse_template("x={a").unwrap_err().column, 3);
        assert_eq!(parse_template("x}").unwrap_err().column, 2);
    }
}
