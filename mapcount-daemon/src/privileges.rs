//! Whether this process may load and attach BPF programs, checked before
//! trying, so that the error names the missing capability.

/// Capability numbers (include/uapi/linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "mapcountd lacks {missing}: run it as root, or grant CAP_BPF and CAP_PERFMON \
     (AmbientCapabilities=CAP_BPF CAP_PERFMON in its systemd unit; CAP_SYS_ADMIN before 5.8)"
)]
pub struct MissingCapabilities {
    pub missing: String,
}

/// Checks the effective capability set from `/proc/self/status`.
pub fn check() -> Result<(), MissingCapabilities> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    check_set(effective)
}

fn check_set(effective: u64) -> Result<(), MissingCapabilities> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() { Ok(()) } else { Err(MissingCapabilities { missing: missing.join(" and ") }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert_eq!(check_set(0).unwrap_err().missing, "CAP_BPF and CAP_PERFMON");
        assert_eq!(check_set(1 << CAP_BPF).unwrap_err().missing, "CAP_PERFMON");
        assert_eq!(check_set(1 << CAP_PERFMON).unwrap_err().missing, "CAP_BPF");
        assert_eq!(check_set((1 << CAP_BPF) | (1 << CAP_PERFMON)), Ok(()));
        assert_eq!(check_set(1 << CAP_SYS_ADMIN), Ok(()));
    }
}
