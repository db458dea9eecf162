//! Probe files: several log points kept in a file (`pyprobe log --probes
//! FILE`), so a set that took care to write can be reused and reviewed.
//!
//! The format is the command line's, one option per line, without the
//! dashes:
//!
//! ```text
//! # comments start with '#'
//! at   app.py:42
//! when order.total > 100 and user.id == 7
//! msg  order={order.id} total={order.total}
//!
//! at   app.py:handle_order
//! ```
//!
//! Each `at` starts a log point; the `when` and `msg` after it belong to it.
//! The value is the rest of the line after the keyword (and an optional
//! `:`), trimmed, and taken as is: no quotes, no escapes, so a template may
//! hold `#`, quotes or colons. Errors name the file and line.

use anyhow::bail;

use super::session::{Origin, PointSpec};

/// Reads the log points of `text`, which came from `name` (used in errors
/// and kept in each [`PointSpec::origin`]).
pub fn parse(name: &str, text: &str) -> anyhow::Result<Vec<PointSpec>> {
    let mut points: Vec<PointSpec> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let number = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (keyword, rest) = line
            .split_once(|c: char| c.is_whitespace() || c == ':')
            .unwrap_or((line, ""));
        let value = rest.trim_start_matches(':').trim();
        let keyword = keyword.trim_start_matches("--");
        if !matches!(keyword, "at" | "when" | "msg") {
            bail!(
                "{name}:{number}: unknown keyword {keyword:?}: a line is `at WHERE`, `when CONDITION` or `msg TEMPLATE`"
            );
        }
        if value.is_empty() {
            bail!("{name}:{number}: `{keyword}` has no value");
        }
        if keyword == "at" {
            points.push(PointSpec {
                at: value.to_owned(),
                when: None,
                msg: None,
                origin: Some(Origin {
                    file: name.to_owned(),
                    at: number,
                    when: None,
                    msg: None,
                }),
            });
            continue;
        }
        let Some(point) = points.last_mut() else {
            bail!(
                "{name}:{number}: `{keyword}` comes before any `at`: put it after the `at` it belongs to"
            );
        };
        let origin = point.origin.as_mut().expect("set with its at");
        let (slot, line) = if keyword == "when" {
            (&mut point.when, &mut origin.when)
        } else {
            (&mut point.msg, &mut origin.msg)
        };
        *line = Some(number);
        if slot.is_some() {
            bail!(
                "{name}:{number}: a second `{keyword}` for `at {}`: give one",
                point.at
            );
        }
        *slot = Some(value.to_owned());
    }
    if points.is_empty() {
        bail!("{name}: no log point in it: write `at FILE:LINE` (then `when`, `msg` lines)");
    }
    Ok(points)
}

/// Reads the probe file at `path` (`-`: standard input).
pub fn read(path: &str) -> anyhow::Result<Vec<PointSpec>> {
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| anyhow::anyhow!("reading log points from standard input: {e}"))?
    } else {
        std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read probe file {path}: {e}: give a readable file of `at`/`when`/`msg` lines")
        })?
    };
    parse(if path == "-" { "<stdin>" } else { path }, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_give_each_at_its_own_when_and_msg() {
        let text = "\
# orders
at   app.py:42
when order.total > 100 and user.id == 7
msg  order={order.id} note=\"# not a comment\" t={order.meta[\"k:v\"]}

at: app.py:handle_order
--at pkg.mod:Class.method
  msg: x={x}
";
        let points = parse("p.txt", text).unwrap();
        assert_eq!(points.len(), 3);
        assert_eq!(points[0].at, "app.py:42");
        assert_eq!(
            points[0].when.as_deref(),
            Some("order.total > 100 and user.id == 7")
        );
        assert_eq!(
            points[0].msg.as_deref(),
            Some("order={order.id} note=\"# not a comment\" t={order.meta[\"k:v\"]}")
        );
        assert_eq!(
            points[0].origin,
            Some(Origin {
                file: "p.txt".into(),
                at: 2,
                when: Some(3),
                msg: Some(4)
            })
        );
        assert_eq!(points[0].label(), "p.txt:2: at app.py:42");
        assert_eq!(points[1].at, "app.py:handle_order");
        assert_eq!(
            (points[1].when.clone(), points[1].msg.clone()),
            (None, None)
        );
        assert_eq!(points[1].origin.as_ref().map(|o| o.at), Some(6));
        assert_eq!(points[2].at, "pkg.mod:Class.method");
        assert_eq!(points[2].msg.as_deref(), Some("x={x}"));
        assert_eq!(points[2].when, None);
    }

    #[test]
    fn mistakes_name_the_file_and_line() {
        let err = |text: &str| parse("p.txt", text).unwrap_err().to_string();
        let e = err("at a.py:1\nwen x > 1\n");
        assert!(e.starts_with("p.txt:2: unknown keyword \"wen\""), "{e}");
        let e = err("# c\nwhen x > 1\nat a.py:1\n");
        assert!(
            e.starts_with("p.txt:2: `when` comes before any `at`"),
            "{e}"
        );
        let e = err("at a.py:1\nmsg a\nmsg b\n");
        assert!(
            e.starts_with("p.txt:3: a second `msg` for `at a.py:1`"),
            "{e}"
        );
        let e = err("at a.py:1\nwhen\n");
        assert!(e.starts_with("p.txt:2: `when` has no value"), "{e}");
        let e = err("# only a comment\n\n");
        assert!(e.starts_with("p.txt: no log point"), "{e}");
    }

    #[test]
    fn a_missing_file_says_so() {
        let e = read("/nonexistent/probes.txt").unwrap_err().to_string();
        assert!(
            e.starts_with("cannot read probe file /nonexistent/probes.txt"),
            "{e}"
        );
    }
}
