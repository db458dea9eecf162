//! Which processes a command traces beyond its `--pid`s: every Python
//! process (`--all`), or those whose command line matches `--name REGEX`,
//! or those in the container `--container ID`, now and later.

use regex::Regex;

use crate::container::Placement;

/// A selection of processes by command line and container; selects every
/// process when empty.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// Matched against the command line, arguments joined by spaces.
    pub name: Option<Regex>,
    /// A container id prefix (or systemd-nspawn machine name).
    pub container: Option<String>,
}

impl Selector {
    /// Whether it selects every process (plain `--all`).
    pub fn is_everything(&self) -> bool {
        self.name.is_none() && self.container.is_none()
    }

    /// Whether process `pid` is selected (false when it cannot be read).
    pub fn selects(&self, pid: u32) -> bool {
        if let Some(name) = &self.name {
            match command_line(pid) {
                Some(cmd) if name.is_match(&cmd) => {}
                _ => return false,
            }
        }
        if let Some(wanted) = &self.container {
            let placement = Placement::of(pid);
            let container = placement.as_ref().and_then(|p| p.container.as_ref());
            if !container.is_some_and(|c| c.matches(wanted)) {
                return false;
            }
        }
        true
    }

    /// "every Python process", "every Python process whose command line
    /// matches 'gunicorn' in container 3f2a1b", for messages.
    pub fn describe(&self) -> String {
        let mut out = "every Python process".to_owned();
        if let Some(name) = &self.name {
            out.push_str(&format!(" whose command line matches '{name}'"));
        }
        if let Some(id) = &self.container {
            out.push_str(&format!(" in container {id}"));
        }
        out
    }
}

impl Selector {
    /// Processes to set up under `--all`: every PID in `/proc` but ours,
    /// the `ignored` ones and the `known` ones, that the selection takes.
    /// The others are added to `ignored`, not to be read again.
    pub fn new_pids(
        &self,
        ignored: &mut std::collections::BTreeSet<u32>,
        known: impl Fn(u32) -> bool,
    ) -> Vec<u32> {
        let mut out = Vec::new();
        for pid in all_pids() {
            if pid == std::process::id() || ignored.contains(&pid) || known(pid) {
                continue;
            }
            if self.selects(pid) {
                out.push(pid);
            } else {
                ignored.insert(pid);
            }
        }
        out
    }
}

/// Every PID in /proc, in order.
pub fn all_pids() -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// The command line of `pid`, arguments joined by spaces.
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_selects_by_command_line_and_a_container_by_id_prefix() {
        let me = std::process::id();
        assert!(Selector::default().selects(me));
        assert!(Selector::default().is_everything());
        let ours = command_line(me).unwrap();
        let program = ours.split(' ').next().unwrap();
        let name = |re: &str| Selector {
            name: Some(Regex::new(re).unwrap()),
            container: None,
        };
        assert!(name(&regex::escape(program)).selects(me));
        assert!(!name("^no such program$").selects(me));
        assert!(!name(".").selects(99_999_999));
        // The test runs on the host: in no container.
        let in_container = Selector {
            name: None,
            container: Some("3f2a".into()),
        };
        assert!(!in_container.selects(me));
        assert_eq!(
            Selector {
                name: Some(Regex::new("gunicorn").unwrap()),
                container: Some("3f2a".into())
            }
            .describe(),
            "every Python process whose command line matches 'gunicorn' in container 3f2a"
        );
    }
}
