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
    let value = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(value.trim(), 16).ok()
}

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
    fn parses_capeff_from_status() {
        let status = "Name:\tpyprobe\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(cap_eff(status), Some(0x1ffffffffff));
        assert_eq!(cap_eff("Name: x\n"), None);
    }
}
