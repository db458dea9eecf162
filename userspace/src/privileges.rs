//! Checking, before touching the kernel, that we may load BPF programs and
//! open perf events, so a missing privilege is one clear line rather than an
//! `EPERM` from deep inside a syscall.

/// Capability numbers from `linux/capability.h`.
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Missing privileges.
#[derive(Debug, thiserror::Error)]
#[error(
    "pyprobe needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE \
     (missing: {missing}); run it with sudo"
)]
pub struct PrivilegeError {
    /// Names of the missing capabilities.
    pub missing: String,
}

/// Succeeds if the effective capabilities allow loading tracing BPF programs
/// and reading other processes.
pub fn check() -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = cap_eff(&status).unwrap_or(0);
    let missing = missing_capabilities(effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError {
            missing: missing.join(", "),
        })
    }
}

/// The `CapEff` mask from the text of `/proc/self/status`.
fn cap_eff(status: &str) -> Option<u64> {
    cap_mask(status, "CapEff:")
}

/// A capability mask (`CapEff:`, `CapPrm:`) from the text of a status file.
fn cap_mask(status: &str, field: &str) -> Option<u64> {
    let value = status.lines().find_map(|l| l.strip_prefix(field))?;
    u64::from_str_radix(value.trim(), 16).ok()
}

/// Whether pyprobe may read other processes' memory (CAP_SYS_PTRACE).
pub fn can_read_others() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    cap_eff(&status).is_some_and(|c| c & (1 << CAP_SYS_PTRACE) != 0)
}

/// The capabilities process `pid` is permitted and pyprobe is not: the
/// kernel lets a process read another one's memory only if it holds all
/// of the other's (or CAP_SYS_PTRACE in its user namespace).
pub fn capabilities_beyond_ours(pid: u32) -> Vec<&'static str> {
    let ours = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let theirs = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let (Some(ours), Some(theirs)) = (cap_mask(&ours, "CapPrm:"), cap_mask(&theirs, "CapPrm:"))
    else {
        return Vec::new();
    };
    let extra = theirs & !ours;
    CAPABILITY_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| extra & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Capability names by number (`linux/capability.h`).
const CAPABILITY_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Which required capabilities `effective` lacks. CAP_SYS_ADMIN stands in for
/// CAP_BPF and CAP_PERFMON, as on kernels before 5.8.
fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !(has(CAP_BPF) || admin) {
        missing.push("CAP_BPF");
    }
    if !(has(CAP_PERFMON) || admin) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        assert!(missing_capabilities(0x000001ffffffffff).is_empty());
    }

    #[test]
    fn unprivileged_lacks_all_three() {
        assert_eq!(
            missing_capabilities(0),
            ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"]
        );
    }

    #[test]
    fn sys_admin_replaces_bpf_and_perfmon_but_not_ptrace() {
        assert_eq!(missing_capabilities(1 << CAP_SYS_ADMIN), ["CAP_SYS_PTRACE"]);
        let granted = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_PTRACE);
        assert!(missing_capabilities(granted).is_empty());
    }

    #[test]
    fn capability_names_are_at_their_numbers() {
        assert_eq!(CAPABILITY_NAMES[CAP_SYS_PTRACE as usize], "CAP_SYS_PTRACE");
        assert_eq!(CAPABILITY_NAMES[CAP_SYS_ADMIN as usize], "CAP_SYS_ADMIN");
        assert_eq!(CAPABILITY_NAMES[CAP_PERFMON as usize], "CAP_PERFMON");
        assert_eq!(CAPABILITY_NAMES[CAP_BPF as usize], "CAP_BPF");
        // A process never holds more than itself.
        assert!(capabilities_beyond_ours(std::process::id()).is_empty());
    }

    #[test]
    fn parses_capeff_from_status() {
        let status = "Name:\tpyprobe\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(cap_eff(status), Some(0x1ffffffffff));
        assert_eq!(cap_eff("Name: x\n"), None);
    }
}
