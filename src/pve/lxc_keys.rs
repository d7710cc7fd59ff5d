//! The raw `lxc.*` keys Proxmox VE accepts in `/etc/pve/lxc/VMID.conf`.
//!
//! Transcribed from pve-container `src/PVE/LXC/Config.pm` (`$valid_lxc_conf_keys`,
//! `$deprecated_lxc_conf_keys` and `is_valid_lxc_conf_key`, read from the upstream
//! repository). Differences from that code, taken from the newer commit described in
//! `lxc-conf-format.md` (94f55852): `lxc.cgroup.*` (cgroup v1) is reported as deprecated
//! rather than silently allowed; it is still accepted, as upstream does.

/// What Proxmox does with a raw `lxc.*` key found in a container config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawKeyVerdict {
    /// Accepted and kept in order.
    Allowed,
    /// Accepted (and kept) with a warning; `note` says what replaces it.
    Deprecated { note: String },
    /// Refused: Proxmox reports `vm VMID - KEY: REASON`.
    Rejected { reason: String },
    /// Not a key Proxmox knows: "unable to parse config".
    Unknown,
}

impl RawKeyVerdict {
    /// True when Proxmox keeps the key (allowed or deprecated).
    pub fn is_accepted(&self) -> bool {
        matches!(self, RawKeyVerdict::Allowed | RawKeyVerdict::Deprecated { .. })
    }
}

/// Explicitly allowed keys (`$valid_lxc_conf_keys` entries with value 1).
pub const ALLOWED_KEYS: &[&str] = &[
    "lxc.apparmor.profile",
    "lxc.apparmor.allow_incomplete",
    "lxc.apparmor.allow_nesting",
    "lxc.apparmor.raw",
    "lxc.selinux.context",
    "lxc.include",
    "lxc.arch",
    "lxc.uts.name",
    "lxc.signal.halt",
    "lxc.signal.reboot",
    "lxc.signal.stop",
    "lxc.init.cmd",
    "lxc.init.cwd",
    "lxc.pty.max",
    "lxc.console.logfile",
    "lxc.console.path",
    "lxc.tty.max",
    "lxc.devtty.dir",
    "lxc.hook.autodev",
    "lxc.autodev",
    "lxc.kmsg",
    "lxc.mount.fstab",
    "lxc.mount.entry",
    "lxc.mount.auto",
    "lxc.rootfs.mount",
    "lxc.cap.drop",
    "lxc.cap.keep",
    "lxc.seccomp.profile",
    "lxc.seccomp.notify.proxy",
    "lxc.seccomp.notify.cookie",
    "lxc.idmap",
    "lxc.hook.pre-start",
    "lxc.hook.pre-mount",
    "lxc.hook.mount",
    "lxc.hook.start",
    "lxc.hook.stop",
    "lxc.hook.post-stop",
    "lxc.hook.clone",
    "lxc.hook.destroy",
    "lxc.hook.version",
    "lxc.log.level",
    "lxc.log.file",
    "lxc.start.auto",
    "lxc.start.delay",
    "lxc.start.order",
    "lxc.group",
    "lxc.environment",
    "lxc.environment.runtime",
    "lxc.environment.hooks",
    // namespaced via CLONE_NEWIPC (namespaces(7))
    "lxc.sysctl.fs.mqueue",
    "lxc.sysctl.kernel.msgmax",
    "lxc.sysctl.kernel.msgmnb",
    "lxc.sysctl.kernel.msgmni",
    "lxc.sysctl.kernel.sem",
    "lxc.sysctl.kernel.shmall",
    "lxc.sysctl.kernel.shmmax",
    "lxc.sysctl.kernel.shmmni",
    "lxc.sysctl.kernel.shm_rmid_forced",
];

/// Keys in `$valid_lxc_conf_keys` whose value is an error message.
pub const REJECTED_KEYS: &[(&str, &str)] = &[
    ("lxc.rootfs.path", "lxc.rootfs.path is auto generated from rootfs"),
    (
        "lxc.rootfs.options",
        "lxc.rootfs.options is not supported, please use mount point options in the \"rootfs\" key",
    ),
];

/// lxc < 3.0 names (`$deprecated_lxc_conf_keys`): old name -> new name.
pub const DEPRECATED_KEYS: &[(&str, &str)] = &[
    ("lxc.aa_profile", "lxc.apparmor.profile"),
    ("lxc.aa_allow_incomplete", "lxc.apparmor.allow_incomplete"),
    ("lxc.console", "lxc.console.path"),
    ("lxc.devttydir", "lxc.tty.dir"),
    ("lxc.haltsignal", "lxc.signal.halt"),
    ("lxc.rebootsignal", "lxc.signal.reboot"),
    ("lxc.stopsignal", "lxc.signal.stop"),
    ("lxc.id_map", "lxc.idmap"),
    ("lxc.init_cmd", "lxc.init.cmd"),
    ("lxc.loglevel", "lxc.log.level"),
    ("lxc.logfile", "lxc.log.file"),
    ("lxc.mount", "lxc.mount.fstab"),
    ("lxc.network.type", "lxc.net.INDEX.type"),
    ("lxc.network.flags", "lxc.net.INDEX.flags"),
    ("lxc.network.link", "lxc.net.INDEX.link"),
    ("lxc.network.mtu", "lxc.net.INDEX.mtu"),
    ("lxc.network.name", "lxc.net.INDEX.name"),
    ("lxc.network.hwaddr", "lxc.net.INDEX.hwaddr"),
    ("lxc.network.ipv4", "lxc.net.INDEX.ipv4.address"),
    ("lxc.network.ipv4.gateway", "lxc.net.INDEX.ipv4.gateway"),
    ("lxc.network.ipv6", "lxc.net.INDEX.ipv6.address"),
    ("lxc.network.ipv6.gateway", "lxc.net.INDEX.ipv6.gateway"),
    ("lxc.network.script.up", "lxc.net.INDEX.script.up"),
    ("lxc.network.script.down", "lxc.net.INDEX.script.down"),
    ("lxc.pts", "lxc.pty.max"),
    ("lxc.se_context", "lxc.selinux.context"),
    ("lxc.seccomp", "lxc.seccomp.profile"),
    ("lxc.tty", "lxc.tty.max"),
    ("lxc.utsname", "lxc.uts.name"),
];

/// Prefixes under which every key is allowed.
pub const ALLOWED_PREFIXES: &[&str] = &["lxc.cgroup2.", "lxc.prlimit.", "lxc.net."];

/// Classify a raw key the way `is_valid_lxc_conf_key` does (same precedence:
/// `lxc.limit.*`, renamed keys, the explicit table, then the allowed prefixes).
pub fn check_raw_key(key: &str) -> RawKeyVerdict {
    if key.starts_with("lxc.limit.") {
        return RawKeyVerdict::Deprecated {
            note: "lxc.limit.* was renamed to lxc.prlimit.*".to_string(),
        };
    }
    if let Some((_, new)) = DEPRECATED_KEYS.iter().find(|(old, _)| *old == key) {
        return RawKeyVerdict::Deprecated {
            note: format!("{key} is deprecated and was renamed to {new}"),
        };
    }
    if ALLOWED_KEYS.contains(&key) {
        return RawKeyVerdict::Allowed;
    }
    if let Some((_, reason)) = REJECTED_KEYS.iter().find(|(k, _)| *k == key) {
        return RawKeyVerdict::Rejected {
            reason: (*reason).to_string(),
        };
    }
    if ALLOWED_PREFIXES.iter().any(|p| key.starts_with(p)) {
        return RawKeyVerdict::Allowed;
    }
    if key.starts_with("lxc.cgroup.") {
        return RawKeyVerdict::Deprecated {
            note: "lxc.cgroup.* configures cgroup v1; use lxc.cgroup2.*".to_string(),
        };
    }
    RawKeyVerdict::Unknown
}

/// True when Proxmox keeps the key in the config (allowed or deprecated).
pub fn is_valid_raw_key(key: &str) -> bool {
    check_raw_key(key).is_accepted()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_keys_are_allowed() {
        for key in [
            "lxc.mount.entry",
            "lxc.apparmor.profile",
            "lxc.cap.drop",
            "lxc.cgroup2.devices.allow",
            "lxc.mount.auto",
            "lxc.environment.runtime",
            "lxc.net.0.type",
            "lxc.prlimit.nofile",
            "lxc.sysctl.kernel.shmmax",
        ] {
            assert_eq!(check_raw_key(key), RawKeyVerdict::Allowed, "{key}");
            assert!(is_valid_raw_key(key));
        }
    }

    #[test]
    fn rootfs_keys_are_rejected_with_proxmox_message() {
        assert_eq!(
            check_raw_key("lxc.rootfs.path"),
            RawKeyVerdict::Rejected {
                reason: "lxc.rootfs.path is auto generated from rootfs".into()
            }
        );
        match check_raw_key("lxc.rootfs.options") {
            RawKeyVerdict::Rejected { reason } => {
                assert!(reason.contains("please use mount point options"))
            }
            other => panic!("{other:?}"),
        }
        assert!(!is_valid_raw_key("lxc.rootfs.path"));
        // lxc.rootfs.mount is fine
        assert!(is_valid_raw_key("lxc.rootfs.mount"));
    }

    #[test]
    fn deprecated_keys_are_accepted_with_note() {
        match check_raw_key("lxc.aa_profile") {
            RawKeyVerdict::Deprecated { note } => assert_eq!(
                note,
                "lxc.aa_profile is deprecated and was renamed to lxc.apparmor.profile"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_raw_key("lxc.limit.nofile"),
            RawKeyVerdict::Deprecated { .. }
        ));
        assert!(matches!(
            check_raw_key("lxc.cgroup.devices.allow"),
            RawKeyVerdict::Deprecated { .. }
        ));
        // lxc.network.* is deprecated, lxc.net.* allowed
        assert!(matches!(
            check_raw_key("lxc.network.type"),
            RawKeyVerdict::Deprecated { .. }
        ));
        assert!(is_valid_raw_key("lxc.network.type"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert_eq!(check_raw_key("lxc.bogus"), RawKeyVerdict::Unknown);
        assert_eq!(check_raw_key("lxc.cgroup3.x"), RawKeyVerdict::Unknown);
        assert_eq!(check_raw_key("lxc.prlimit"), RawKeyVerdict::Unknown);
        assert!(!is_valid_raw_key("lxc.mount.entries"));
    }
}
