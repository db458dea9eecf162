//! How errors are printed: one line, each cause once.

use std::fmt::Write as _;

/// `error: cause: cause ...` in one line, leaving out a cause whose text the
/// line already holds (an error that shows its cause in its own message and
/// also returns it as its source would otherwise print it twice).
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            let _ = write!(out, ": {text}");
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open /proc/7/mem: {source}")]
    struct Shows {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = || std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = anyhow::Error::new(Shows { source: io() });
        assert_eq!(
            one_line(e.as_ref()),
            "cannot open /proc/7/mem: No such file or directory (os error 2)"
        );
        let e = e.context("setting up PID 7");
        assert_eq!(
            one_line(e.as_ref()),
            "setting up PID 7: cannot open /proc/7/mem: No such file or directory (os error 2)"
        );
        // A cause not shown by its error is added.
        let e = anyhow::Error::new(io()).context("reading maps");
        assert_eq!(
            one_line(e.as_ref()),
            "reading maps: No such file or directory (os error 2)"
        );
    }
}
