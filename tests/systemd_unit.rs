//! deploy/driftless.service: the sandbox systemd gives the daemon. Where systemd-analyze is
//! installed (.ci/run installs it), `verify` must accept every directive (systemd ignores a
//! misspelt or invalid one with a warning: the sandbox would silently be weaker) and
//! `security` must rate the unit at 3.0 "OK" or below (offline, systemd 250 and later); the
//! directives the daemon depends on are checked on every machine by reading the file.

use std::path::PathBuf;
use std::process::Command;

fn unit_path() -> PathBuf {
    testkit::root().join("deploy/driftless.service")
}

/// `Key=value` lines of the unit, in order (a key may repeat).
fn directives() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(unit_path()).expect("deploy/driftless.service");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn values(key: &str) -> Vec<String> {
    directives()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn the_unit_bounds_the_daemon_and_lets_it_write_only_its_own_places() {
    // Resources a hostile pull request must not exhaust on the host.
    for key in ["LimitNOFILE", "MemoryMax", "TasksMax"] {
        assert_eq!(values(key).len(), 1, "{key} set once");
    }
    // apply writes the kubeconfig and talosconfig into the secrets directory.
    assert_eq!(values("ReadWritePaths"), ["/etc/driftless/secrets"]);
    assert_eq!(
        values("Environment")
            .iter()
            .filter(|v| v.as_str() == "DRIFTLESS_SECRETS_DIR=/etc/driftless/secrets")
            .count(),
        1
    );
    assert_eq!(values("ProtectSystem"), ["strict"]);
    assert_eq!(values("StateDirectory"), ["driftless"]);
    // Sockets the daemon needs: its server and clients (IPv4, IPv6), the journal and resolver.
    let families = values("RestrictAddressFamilies").join(" ");
    for family in ["AF_UNIX", "AF_INET", "AF_INET6"] {
        assert!(families.split_whitespace().any(|f| f == family), "{families}");
    }
    // No allow-list of addresses: Proxmox, the nodes, the forge and git are the operator's.
    assert!(values("IPAddressDeny").is_empty());
    assert!(values("PrivateNetwork").is_empty());
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("MemoryDenyWriteExecute", "yes"),
        ("UMask", "0077"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(values(key), [value], "{key}");
    }
    // @resources is denied but for setrlimit: the daemon raises its open files limit, a worker
    // caps its address space.
    assert_eq!(
        values("SystemCallFilter"),
        ["@system-service", "~@privileged @resources", "setrlimit prlimit64"]
    );
}

/// `systemd-analyze --version`'s number, or `None` (with a note) when it is not installed.
fn systemd_version() -> Option<u32> {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
        return None;
    };
    Some(
        String::from_utf8_lossy(&probe.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

#[test]
fn systemd_analyze_verify_accepts_every_directive() {
    if systemd_version().is_none() {
        return;
    }
    // verify also wants ExecStart's program to exist: the one this build made stands in for
    // /usr/local/bin/driftless.
    let text = std::fs::read_to_string(unit_path()).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/driftless "));
    let exe = testkit::driftless_bin();
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("driftless.service");
    std::fs::write(
        &unit,
        text.replace(
            "ExecStart=/usr/local/bin/driftless ",
            &format!("ExecStart={} ", exe.display()),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A warning is a directive systemd ignores.
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn systemd_analyze_rates_the_unit_at_most_3() {
    let Some(version) = systemd_version() else {
        return;
    };
    if version < 250 {
        eprintln!("skipped: systemd {version} cannot rate a unit file offline (needs 250 or later)");
        return;
    }
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=30", "--no-pager"])
        .arg(unit_path())
        .output()
        .expect("systemd-analyze runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let level = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for driftless.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    assert!(out.status.success() && level <= 3.0, "exposure {level}:\n{text}");
}
