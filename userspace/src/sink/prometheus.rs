//! Metrics in Prometheus's text exposition format (version 0.0.4): one
//! family per metric name, with `# HELP` and `# TYPE`, label values
//! escaped. The agent builds a fresh [`Metrics`] at every scrape from what
//! its jobs hold, so series of exited processes go with them.

use std::fmt::Write;

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (names end in `_total`).
    Counter,
    /// Any value.
    Gauge,
}

/// One metric family and its series.
#[derive(Debug, Clone)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    series: Vec<(Vec<(String, String)>, f64)>,
}

/// Metric families in the order first declared.
#[derive(Debug, Default)]
pub struct Metrics {
    families: Vec<Family>,
}

impl Metrics {
    /// Declares family `name` (before its series); declaring again is a
    /// no-op.
    pub fn declare(&mut self, name: &str, kind: Kind, help: &str) {
        if self.families.iter().any(|f| f.name == name) {
            return;
        }
        self.families.push(Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            series: Vec::new(),
        });
    }

    /// Sets the series of `name` with `labels` to `value` (adds to it when
    /// it exists: two sources of one series are summed).
    ///
    /// # Panics
    /// When `name` was not declared.
    pub fn add(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let family = self
            .families
            .iter_mut()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("metric {name} used before declared"));
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        match family.series.iter_mut().find(|(l, _)| *l == labels) {
            Some((_, v)) => *v += value,
            None => family.series.push((labels, value)),
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, escape(&f.help, false));
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            for (labels, value) in &f.series {
                out.push_str(&f.name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape(v, true));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {value}");
            }
        }
        out
    }
}

/// Escapes a help text (backslash, newline) or a label value (also `"`).
fn escape(s: &str, quotes: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_series_and_escapes() {
        let mut m = Metrics::default();
        m.declare("pyprobe_samples_total", Kind::Counter, "Samples taken.");
        m.declare("pyprobe_processes", Kind::Gauge, "Processes watched.");
        m.add("pyprobe_samples_total", &[("pid", "7")], 3.0);
        m.add("pyprobe_samples_total", &[("pid", "7")], 2.0);
        m.add("pyprobe_processes", &[("version", "3.13\"x\\\n")], 1.0);
        assert_eq!(
            m.render(),
            "# HELP pyprobe_samples_total Samples taken.\n\
             # TYPE pyprobe_samples_total counter\n\
             pyprobe_samples_total{pid=\"7\"} 5\n\
             # HELP pyprobe_processes Processes watched.\n\
             # TYPE pyprobe_processes gauge\n\
             pyprobe_processes{version=\"3.13\\\"x\\\\\\n\"} 1\n"
        );
    }
}
