//! Which processes a command traces beyond its `--pid`s: every Python
//! process (`--all`), or those whose command line matches `--name REGEX`,
//! or those in the container `--container ID`, now and later.

use regex::Regex;

use crate::container::Placement;

/// A selection of processes by command line and container; selects every
/// process when empty. As data (a job spec), `name` is the regular
/// expression's text.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Selector {
    /// Matched against the command line, arguments joined by spaces.
    #[serde(default, with = "regex_text")]
    pub name: Option<Regex>,
    /// A container id prefix (or systemd-nspawn machine name).
    #[serde(default)]
    pub container: Option<String>,
    /// `--subprocesses`: only these processes and those descended from
    /// them (forked, spawned, exec'd, at any depth). Empty: no such limit.
    /// A registry adds each process it takes (see [`Self::adopt`]), so a
    /// grandchild is still found once its parent has exited.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub family: Vec<u32>,
}

/// Most parents looked through for an ancestor in a family.
const MAX_ANCESTRY: usize = 64;

/// Whether `pid` is one of `family` or descends from one of them.
fn descends_from(pid: u32, family: &[u32]) -> bool {
    let mut at = pid;
    for _ in 0..MAX_ANCESTRY {
        if family.contains(&at) {
            return true;
        }
        match crate::process::parent_pid(at) {
            Some(parent) if parent > 1 => at = parent,
            _ => return false,
        }
    }
    false
}

/// `Selector::name` as the text of its regular expression.
mod regex_text {
    use regex::Regex;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(re: &Option<Regex>, s: S) -> Result<S::Ok, S::Error> {
        match re {
            Some(re) => s.serialize_some(re.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Regex>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| {
                Regex::new(&text).map_err(|_| {
                    serde::de::Error::custom(format!("name {text:?} is not a regular expression"))
                })
            })
            .transpose()
    }
}

impl Selector {
    /// Whether it selects every process (plain `--all`).
    pub fn is_everything(&self) -> bool {
        self.name.is_none() && self.container.is_none() && self.family.is_empty()
    }

    /// Whether it follows the descendants of given processes
    /// (`--subprocesses`): a job then ends when they have all exited.
    pub fn follows_family(&self) -> bool {
        !self.family.is_empty()
    }

    /// Counts `pid` in the family it follows, if any (its descendants are
    /// selected from now on, whatever becomes of the processes between).
    pub fn adopt(&mut self, pid: u32) {
        if self.follows_family() && !self.family.contains(&pid) {
            self.family.push(pid);
        }
    }

    /// Whether process `pid` is selected (false when it cannot be read).
    pub fn selects(&self, pid: u32) -> bool {
        if self.follows_family() && !descends_from(pid, &self.family) {
            return false;
        }
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

    /// With `--container ID` and no process in such a container now: a
    /// line saying so, with the containers there are, for the user to
    /// check the id (pyprobe still waits for one to start).
    pub fn no_container_yet(&self) -> Option<String> {
        let wanted = self.container.as_ref()?;
        let mut seen = std::collections::BTreeSet::new();
        for pid in all_pids() {
            if let Some(c) = Placement::of(pid).and_then(|p| p.container) {
                if c.matches(wanted) {
                    return None;
                }
                seen.insert(c.short());
            }
        }
        let there = if seen.is_empty() {
            "no process here runs in a container".to_owned()
        } else {
            format!(
                "containers here: {}",
                seen.into_iter().collect::<Vec<_>>().join(", ")
            )
        };
        Some(format!(
            "no process runs in a container whose id starts with '{wanted}' now ({there}); waiting for one"
        ))
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
        if let [roots @ .., last] = self.family.as_slice() {
            let mut pids: Vec<String> = roots.iter().map(u32::to_string).collect();
            pids.push(last.to_string());
            out = format!(
                "PID {} and every Python process it starts (--subprocesses)",
                pids.join(", ")
            );
            if let Some(name) = &self.name {
                out.push_str(&format!(" whose command line matches '{name}'"));
            }
        }
        out
    }
}

/// Processes a scan passed over (not selected, not Python, or not set
/// up), not read again while each is the same program: a process that
/// execs (a shell becoming Python, a worker becoming something else), a
/// PID reused by a new process, and a process passed over while it was
/// starting (its interpreter not initialized yet) are looked at again.
#[derive(Debug, Default)]
pub struct Ignored {
    by_pid: std::collections::BTreeMap<u32, Passed>,
}

/// What a passed-over process was.
#[derive(Debug)]
struct Passed {
    /// Its executable.
    exe: Option<std::path::PathBuf>,
    /// Its start time (clock ticks after boot).
    started: Option<u64>,
    /// It was less than [`YOUNG_MS`] old (or exec'd as long ago): looked
    /// at again once.
    young: bool,
    /// When it was seen to be another program than when passed over (it
    /// exec'd): it is looked at, and if passed over again soon after, it
    /// may be an interpreter still starting.
    changed: Option<std::time::Instant>,
}

/// Age (ms) under which a process may still be starting.
const YOUNG_MS: u64 = 2000;

impl Ignored {
    /// Passes over `pid` as it is now.
    pub fn insert(&mut self, pid: u32) {
        let (started, age) = start_and_age(pid).unzip();
        // exec keeps the start time: a fresh exec counts as young too.
        let exec_young = self
            .by_pid
            .get(&pid)
            .and_then(|p| p.changed)
            .is_some_and(|at| at.elapsed().as_millis() < u128::from(YOUNG_MS));
        self.by_pid.insert(
            pid,
            Passed {
                exe: crate::process::exe_of(pid),
                started,
                young: exec_young || age.is_some_and(|a| a < YOUNG_MS),
                changed: None,
            },
        );
    }

    /// Forgets the processes not in `alive` (they exited: a long-running
    /// agent must not keep every PID it ever passed over).
    pub fn keep_only(&mut self, alive: &std::collections::BTreeSet<u32>) {
        self.by_pid.retain(|pid, _| alive.contains(pid));
    }

    /// Whether `pid` was passed over and is the same program since (a
    /// young one is looked at once more).
    pub fn holds(&mut self, pid: u32) -> bool {
        let Some(passed) = self.by_pid.get_mut(&pid) else {
            return false;
        };
        let started = start_and_age(pid).map(|(s, _)| s);
        if passed.started != started {
            // Another process under a reused PID.
            self.by_pid.remove(&pid);
            return false;
        }
        if passed.exe != crate::process::exe_of(pid) {
            passed.exe = None;
            passed.changed = Some(std::time::Instant::now());
            return false;
        }
        // Looked at again while it is being looked at after an exec.
        if passed.changed.is_some() {
            return false;
        }
        !std::mem::take(&mut passed.young)
    }

    /// Forgets `pid`.
    pub fn remove(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
    }
}

/// When `pid` started (clock ticks after boot, `/proc/PID/stat` field 22)
/// and its age in ms.
fn start_and_age(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Field 22 is the 20th after the comm.
    let started: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let now = (seconds * hz as f64) as u64;
    Some((started, now.saturating_sub(started) * 1000 / hz.max(1)))
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

/// Whether an error setting up a PID under `--all` only says it is no
/// Python process to trace (or it is gone): skipped without a word.
pub fn is_not_python(e: &anyhow::Error) -> bool {
    let process = e
        .downcast_ref::<crate::process::ProcessError>()
        .or_else(|| {
            e.downcast_ref::<crate::python::reader::ReadError>()
                .and_then(|r| match r {
                    crate::python::reader::ReadError::Process(p) => Some(p),
                    _ => None,
                })
        });
    process.is_some_and(crate::process::ProcessError::is_not_python)
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
            ..Selector::default()
        };
        assert!(name(&regex::escape(program)).selects(me));
        assert!(!name("^no such program$").selects(me));
        assert!(!name(".").selects(99_999_999));
        // The test runs on the host: in no container.
        let in_container = Selector {
            container: Some("3f2a".into()),
            ..Selector::default()
        };
        assert!(!in_container.selects(me));
        assert_eq!(
            Selector {
                name: Some(Regex::new("gunicorn").unwrap()),
                container: Some("3f2a".into()),
                ..Selector::default()
            }
            .describe(),
            "every Python process whose command line matches 'gunicorn' in container 3f2a"
        );
    }

    #[test]
    fn a_family_selects_its_members_and_their_descendants_and_grows() {
        let me = std::process::id();
        let parent = crate::process::parent_pid(me).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let child_pid = child.id();
        let family = |pids: &[u32]| Selector {
            family: pids.to_vec(),
            ..Selector::default()
        };
        // Our parent's family holds us and our child; ours holds our child
        // but not our parent; a stranger's holds neither.
        assert!(family(&[parent]).selects(me));
        assert!(family(&[parent]).selects(child_pid));
        assert!(family(&[me]).selects(child_pid));
        assert!(!family(&[me]).selects(parent));
        assert!(!family(&[99_999_999]).selects(child_pid));
        assert!(!family(&[me]).is_everything());
        let mut grown = family(&[99_999_999]);
        grown.adopt(me);
        assert!(grown.selects(child_pid));
        // Without a family, adopting changes nothing.
        let mut everyone = Selector::default();
        everyone.adopt(me);
        assert!(everyone.is_everything());
        assert_eq!(
            family(&[me]).describe(),
            format!("PID {me} and every Python process it starts (--subprocesses)")
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
