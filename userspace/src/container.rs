//! Which container a process runs in, told by its control group
//! (`/proc/PID/cgroup`): the path that Docker, containerd, CRI-O, podman and
//! systemd-nspawn give a container's processes names the runtime and the
//! container (and, under Kubernetes, the pod).

use serde::Serialize;

/// Where a process runs, as its control group says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The container, when the cgroup is one a container runtime made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    /// The process's cgroup (the unified hierarchy's, else systemd's).
    pub cgroup: String,
}

/// A container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Container {
    /// `docker`, `containerd`, `cri-o`, `podman` or `systemd-nspawn`.
    pub runtime: &'static str,
    /// The runtime's id of the container (64 hex digits), or the machine
    /// name for systemd-nspawn.
    pub id: String,
    /// The Kubernetes pod UID, when the cgroup names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl Container {
    /// `docker 3f2a1b0c9d8e`: the runtime and the id's first 12 characters,
    /// as `docker ps` shows it.
    pub fn short(&self) -> String {
        let id: String = self.id.chars().take(12).collect();
        format!("{} {id}", self.runtime)
    }

    /// Whether `wanted` (an id prefix, or a machine name) names this
    /// container.
    pub fn matches(&self, wanted: &str) -> bool {
        !wanted.is_empty() && self.id.starts_with(wanted)
    }
}

impl Placement {
    /// The placement of process `pid`, if its cgroup can be read.
    pub fn of(pid: u32) -> Option<Placement> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        Some(Placement::parse(&text))
    }

    /// Reads the text of a `/proc/PID/cgroup` file.
    pub fn parse(text: &str) -> Placement {
        let paths: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ':');
                let _id = parts.next()?;
                Some((parts.next()?, parts.next()?))
            })
            .collect();
        // The unified hierarchy ("0::/path"), else systemd's, else any.
        let cgroup = paths
            .iter()
            .find(|(controllers, _)| controllers.is_empty())
            .or_else(|| paths.iter().find(|(c, _)| *c == "name=systemd"))
            .or_else(|| paths.first())
            .map(|(_, p)| (*p).to_owned())
            .unwrap_or_default();
        // A runtime may be visible in one hierarchy only (v1 controllers
        // set up by a runtime while the unified one is unused).
        let container = std::iter::once(cgroup.as_str())
            .chain(paths.iter().map(|(_, p)| *p))
            .find_map(container_of);
        Placement { container, cgroup }
    }
}

/// The container a cgroup path names, if any.
fn container_of(path: &str) -> Option<Container> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let pod = components.iter().find_map(|c| pod_uid(c));
    // The innermost component that names a container wins.
    for (i, c) in components.iter().enumerate().rev() {
        let name = c.strip_suffix(".scope").unwrap_or(c);
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = name.strip_prefix(prefix)
                && is_container_id(id)
            {
                return Some(Container {
                    runtime,
                    id: id.to_owned(),
                    pod,
                });
            }
        }
        if let Some(machine) = name
            .strip_prefix("systemd-nspawn@")
            .and_then(|n| n.strip_suffix(".service"))
        {
            return Some(Container {
                runtime: "systemd-nspawn",
                id: unescape_systemd(machine),
                pod: None,
            });
        }
        if c.starts_with("machine-")
            && c.ends_with(".scope")
            && components.get(i.wrapping_sub(1)) == Some(&"machine.slice")
        {
            let name = &c["machine-".len()..c.len() - ".scope".len()];
            return Some(Container {
                runtime: "systemd-nspawn",
                id: unescape_systemd(name),
                pod: None,
            });
        }
        // The cgroupfs drivers: /docker/<id>, /kubepods/.../pod<uid>/<id>,
        // /libpod_parent/libpod-<id>.
        if is_container_id(c) && i > 0 {
            let runtime = match components[0] {
                "docker" => "docker",
                "kubepods" | "kubepods.slice" => "containerd",
                _ => continue,
            };
            return Some(Container {
                runtime,
                id: (*c).to_owned(),
                pod,
            });
        }
    }
    None
}

/// 64 lowercase hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// `kubepods-burstable-pod1b2c..._9f.slice` or `pod1b2c...-9f` -> the
/// pod's UID with dashes.
fn pod_uid(component: &str) -> Option<String> {
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let at = name.rfind("pod")?;
    let uid = name[at + 3..].replace('_', "-");
    let is_uid = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        });
    is_uid.then_some(uid)
}

/// systemd's `\x2d` escapes in unit names.
fn unescape_systemd(name: &str) -> String {
    let mut out = String::new();
    let mut rest = name;
    while let Some(at) = rest.find("\\x") {
        out.push_str(&rest[..at]);
        let hex = rest.get(at + 2..at + 4).unwrap_or("");
        match u8::from_str_radix(hex, 16) {
            Ok(b) if hex.len() == 2 => {
                out.push(char::from(b));
                rest = &rest[at + 4..];
            }
            _ => {
                out.push_str("\\x");
                rest = &rest[at + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";

    fn container(text: &str) -> Option<Container> {
        Placement::parse(text).container
    }

    #[test]
    fn docker_with_the_systemd_driver_and_with_cgroupfs() {
        let c = container(&format!("0::/system.slice/docker-{ID}.scope\n")).unwrap();
        assert_eq!(
            (c.runtime, c.id.as_str(), c.pod.as_deref()),
            ("docker", ID, None)
        );
        assert_eq!(c.short(), "docker 3f2a1b0c9d8e");
        assert!(c.matches("3f2a1b"));
        assert!(!c.matches("3f2a1c"));
        assert!(!c.matches(""));
        let c = container(&format!(
            "12:pids:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
        ))
        .unwrap();
        assert_eq!((c.runtime, c.id.as_str()), ("docker", ID));
    }

    #[test]
    fn kubernetes_pods_under_containerd_and_cri_o() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/cri-containerd-{ID}.scope\n"
        );
        let c = container(&text).unwrap();
        assert_eq!(c.runtime, "containerd");
        assert_eq!(c.id, ID);
        assert_eq!(
            c.pod.as_deref(),
            Some("1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d")
        );
        let text = format!(
            "0::/kubepods.slice/kubepods-pod1b2c3d4e_5f60_7a8b_9c0d_1e2f3a4b5c6d.slice/crio-{ID}.scope\n"
        );
        assert_eq!(container(&text).unwrap().runtime, "cri-o");
        // cgroupfs driver.
        let text =
            format!("0::/kubepods/besteffort/pod1b2c3d4e-5f60-7a8b-9c0d-1e2f3a4b5c6d/{ID}\n");
        let c = container(&text).unwrap();
        assert_eq!((c.runtime, c.pod.is_some()), ("containerd", true));
    }

    #[test]
    fn podman_and_systemd_nspawn() {
        let c = container(&format!("0::/machine.slice/libpod-{ID}.scope/container\n")).unwrap();
        assert_eq!((c.runtime, c.id.as_str()), ("podman", ID));
        let c = container("0::/machine.slice/systemd-nspawn@web\\x2d1.service/payload\n").unwrap();
        assert_eq!((c.runtime, c.id.as_str()), ("systemd-nspawn", "web-1"));
        let c = container("0::/machine.slice/machine-db.scope/payload\n").unwrap();
        assert_eq!((c.runtime, c.id.as_str()), ("systemd-nspawn", "db"));
    }

    #[test]
    fn a_host_process_has_its_cgroup_and_no_container() {
        let p = Placement::parse(
            "9:name=systemd:/user.slice/user-0.slice/session-3.scope\n\
             8:pids:/user.slice\n0::/user.slice/user-0.slice/session-3.scope\n",
        );
        assert_eq!(p.container, None);
        assert_eq!(p.cgroup, "/user.slice/user-0.slice/session-3.scope");
        // Not an id: too short, upper case.
        assert_eq!(container("0::/system.slice/docker-abc.scope\n"), None);
        assert_eq!(
            container(&format!("0::/docker/{}\n", ID.to_uppercase())),
            None
        );
        // Only v1 hierarchies: systemd's path.
        assert_eq!(
            Placement::parse("1:name=systemd:/init.scope\n").cgroup,
            "/init.scope"
        );
    }
}
