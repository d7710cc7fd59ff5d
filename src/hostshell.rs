//! What driftless does on a Proxmox host's root shell, over any [`HostShell`]: the changes
//! the API cannot make.
//!
//! * Raw `lxc.*` keys: nobody can set them through the API, so they are written into the
//!   container's config file (`{pve_root}/nodes/{node}/lxc/{vmid}.conf`). The file is read,
//!   checked against the digest the API reported (so nothing written by someone else since
//!   the plan was made is overwritten), edited with [`crate::pve::conf`] so it stays in
//!   Proxmox's own format, and replaced with a compare-and-swap write.
//! * root@pam-only options (`features` other than `nesting`, ...): `pct set VMID --KEY VALUE`.
//! * The run lock ([`lock_run`]): one apply at a time per cluster, from any machine, held by a
//!   `flock` on the first Proxmox node for as long as the apply's connection lives.
//!
//! [`set_raw_lxc_keys`] is pure; the `async` functions do the I/O.

use crate::adapters::shell_quote::command_line;
use crate::ports::{Held, HeldCommand, HostShell, ShellError};
use crate::pve::conf::{self, ConfError, PveKind};
use crate::pve::lxc_keys::{RawKeyVerdict, check_raw_key};

/// Where pmxcfs is mounted on a real Proxmox host.
pub use crate::settings::DEFAULT_PVE_ROOT;

/// Why raw keys could not be set in a config text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RawKeysError {
    /// The current file does not parse the way Proxmox parses it (strict mode): driftless
    /// does not rewrite a file it does not fully understand.
    #[error(transparent)]
    Conf(#[from] ConfError),
    #[error("raw key {key:?} cannot be written: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("the value of raw key {key} contains a line break")]
    InvalidValue { key: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostShellError {
    #[error(transparent)]
    Shell(#[from] ShellError),
    #[error("{path} on {node}: {source}")]
    RawKeys {
        node: String,
        path: String,
        #[source]
        source: RawKeysError,
    },
    #[error("{path} on {node} is not UTF-8 text")]
    NotUtf8 { node: String, path: String },
    #[error("`{key}` is not a Proxmox option name")]
    InvalidOption { key: String },
}

impl HostShellError {
    /// The shell failing can pass; a file that cannot be edited or a bad option stays so.
    pub fn retryable(&self) -> bool {
        match self {
            HostShellError::Shell(e) => e.retryable(),
            HostShellError::RawKeys { .. } | HostShellError::NotUtf8 { .. } | HostShellError::InvalidOption { .. } => {
                false
            }
        }
    }
}

/// The container config file of `vmid` on `node`: `{pve_root}/nodes/{node}/lxc/{vmid}.conf`.
/// An empty `pve_root` means [`DEFAULT_PVE_ROOT`]; a trailing `/` is ignored.
pub fn lxc_conf_path(pve_root: &str, node: &str, vmid: u32) -> String {
    let root = if pve_root.is_empty() {
        DEFAULT_PVE_ROOT
    } else {
        pve_root.trim_end_matches('/')
    };
    format!("{root}/nodes/{node}/lxc/{vmid}.conf")
}

/// Takes the lock file `$1` (waiting up to `$2` seconds), writes `$3` (who holds it) and the
/// time into it, prints `locked` and holds the lock until its stdin closes. When another run
/// holds it past the wait, prints that run's line on stderr and exits 75. The lock is the
/// open file descriptor: it goes with the process, so a driftless killed with SIGKILL (its
/// connection, or its pipe, closing) leaves no stale lock behind.
pub const RUN_LOCK_SCRIPT: &str = r#"lock=$1 wait=$2 holder=$3
mkdir -p -- "${lock%/*}" || exit 70
exec 9>>"$lock" || exit 70
if ! flock -w "$wait" 9; then
  head -c 512 -- "$lock" >&2
  exit 75
fi
printf '%s since %s\n' "$holder" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$lock"
echo locked
exec cat > /dev/null
"#;

const LOCK_BUSY_STATUS: u32 = 75;

/// Where the run lock of `cluster` is: `/run/lock` on a real host (a tmpfs: a reboot
/// releases it too); beside the sandbox's state when `pve_root` is not `/etc/pve`. The name
/// is reduced to `[A-Za-z0-9_.-]`, so a cluster name never makes a path.
pub fn run_lock_path(pve_root: &str, cluster: &str) -> String {
    let name: String = cluster
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let root = pve_root.trim_end_matches('/');
    if root.is_empty() || root == DEFAULT_PVE_ROOT {
        format!("/run/lock/driftless-{name}.lock")
    } else {
        format!("{root}/.driftless-lock/driftless-{name}.lock")
    }
}

/// Take the run lock at `path` on `pve_node`'s host, waiting up to `wait` for a run that
/// holds it; `holder` says who this run is, for the one that waits next. The lock is held
/// until the returned guard is dropped. Another run holding it past the wait is
/// [`ShellError::Locked`], naming that run.
pub async fn lock_run<H: HostShell>(
    shell: &H,
    pve_node: &str,
    path: &str,
    holder: &str,
    wait: std::time::Duration,
) -> Result<HeldCommand, ShellError> {
    let argv: Vec<String> = [
        "sh",
        "-c",
        RUN_LOCK_SCRIPT,
        "sh",
        path,
        &wait.as_secs().to_string(),
        holder,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The wait is the script's; the margin covers connecting and starting it.
    match shell
        .hold(pve_node, &argv, wait + std::time::Duration::from_secs(30))
        .await?
    {
        Held::Running { first_line, command } if first_line == "locked" => Ok(command),
        Held::Running { first_line, .. } => Err(ShellError::Other(format!(
            "the run lock {path} on {pve_node} answered `{}`",
            first_line.chars().take(80).collect::<String>()
        ))),
        Held::Exited(out) if out.status == LOCK_BUSY_STATUS => Err(ShellError::Locked {
            host: pve_node.to_string(),
            path: path.to_string(),
            holder: String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .filter(|l| !l.trim().is_empty())
                .unwrap_or("a run that wrote nothing yet")
                .chars()
                .take(200)
                .collect(),
        }),
        Held::Exited(out) => Err(ShellError::Command {
            host: pve_node.to_string(),
            command: format!("take the run lock {path}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim_end()
                .chars()
                .take(500)
                .collect(),
        }),
    }
}

/// True when `key` is owned according to `owned`: an entry is an exact key, or a prefix
/// when it ends with `.` or `.*` (`lxc.cgroup2.*` owns every `lxc.cgroup2.` key).
fn is_owned(key: &str, owned: &[String], desired: &[(String, String)]) -> bool {
    desired.iter().any(|(k, _)| k == key)
        || owned.iter().any(|o| {
            if let Some(prefix) = o.strip_suffix('*') {
                prefix.ends_with('.') && key.starts_with(prefix)
            } else if o.ends_with('.') {
                key.starts_with(o.as_str())
            } else {
                o == key
            }
        })
}

fn check_desired(desired: &[(String, String)]) -> Result<(), RawKeysError> {
    for (key, value) in desired {
        if key == "lxc.environment.runtime" {
            return Err(RawKeysError::InvalidKey {
                key: key.clone(),
                reason: "environment entries are the `env` option, set through the API".into(),
            });
        }
        match check_raw_key(key) {
            RawKeyVerdict::Allowed | RawKeyVerdict::Deprecated { .. } => {}
            RawKeyVerdict::Rejected { reason } => {
                return Err(RawKeysError::InvalidKey {
                    key: key.clone(),
                    reason,
                });
            }
            RawKeyVerdict::Unknown => {
                return Err(RawKeysError::InvalidKey {
                    key: key.clone(),
                    reason: "Proxmox does not accept this key".into(),
                });
            }
        }
        if value.contains(['\n', '\r']) {
            return Err(RawKeysError::InvalidValue { key: key.clone() });
        }
        // Proxmox trims the value when reading: surrounding whitespace would never
        // read back the same and the plan would never settle.
        if value.trim() != value {
            return Err(RawKeysError::InvalidKey {
                key: key.clone(),
                reason: "the value has leading or trailing whitespace, which Proxmox drops".into(),
            });
        }
    }
    Ok(())
}

/// Set the raw `lxc.*` entries driftless owns in a container config text.
///
/// Owned keys are the keys in `desired` plus `owned` (exact keys, or prefixes ending in
/// `.`/`.*`): every current-section entry with an owned key is removed and `desired` is
/// put, in order, where the first of them was (at the end of the raw entries when there
/// was none). Everything else is kept: options, description, `lxc.environment.runtime`,
/// foreign raw keys and their order, the pending section and snapshots. The result is
/// written in Proxmox's format; when the raw entries would not change, `conf_text` comes
/// back as it is (not reformatted).
pub fn set_raw_lxc_keys(
    conf_text: &str,
    desired: &[(String, String)],
    owned_prefixes_or_keys: &[String],
) -> Result<String, RawKeysError> {
    check_desired(desired)?;
    let mut conf = conf::parse(conf_text, PveKind::Lxc)?;
    let mut raw = Vec::with_capacity(conf.raw_lxc.len() + desired.len());
    let mut placed = false;
    for (key, value) in &conf.raw_lxc {
        if is_owned(key, owned_prefixes_or_keys, desired) {
            if !placed {
                raw.extend_from_slice(desired);
                placed = true;
            }
        } else {
            raw.push((key.clone(), value.clone()));
        }
    }
    if !placed {
        raw.extend_from_slice(desired);
    }
    if raw == conf.raw_lxc {
        return Ok(conf_text.to_string());
    }
    conf.raw_lxc = raw;
    conf.check_writable()?;
    Ok(conf.write())
}

/// Write the raw `lxc.*` keys driftless owns into the config file of container `vmid` on
/// `node` (see [`set_raw_lxc_keys`]).
///
/// `expected_digest` is the digest the API reported for the config (the plan was made
/// from it): when the file read now has another SHA-1 this refuses with
/// [`ShellError::Changed`], and the write itself is a compare-and-swap against what was
/// read. Returns the new digest, or `None` when the file already had these entries.
pub async fn apply_raw_lxc_keys<H: HostShell>(
    shell: &H,
    pve_root: &str,
    node: &str,
    vmid: u32,
    desired: &[(String, String)],
    owned: &[String],
    expected_digest: &str,
) -> Result<Option<String>, HostShellError> {
    let path = lxc_conf_path(pve_root, node, vmid);
    let bytes = shell.read_file(node, &path).await?;
    let read_digest = conf::digest_bytes(&bytes);
    if !read_digest.eq_ignore_ascii_case(expected_digest.trim()) {
        return Err(ShellError::Changed {
            host: node.to_string(),
            path,
        }
        .into());
    }
    let text = String::from_utf8(bytes).map_err(|_| HostShellError::NotUtf8 {
        node: node.to_string(),
        path: path.clone(),
    })?;
    let new_text = set_raw_lxc_keys(&text, desired, owned).map_err(|source| HostShellError::RawKeys {
        node: node.to_string(),
        path: path.clone(),
        source,
    })?;
    if new_text == text {
        return Ok(None);
    }
    shell
        .write_file_if_unchanged(node, &path, new_text.as_bytes(), &read_digest)
        .await?;
    tracing::info!(node, vmid, path = %path, "wrote raw lxc keys");
    Ok(Some(conf::digest(&new_text)))
}

/// The argv of `pct set VMID --KEY VALUE ...` with `pct_command` as the program (normally
/// `["pct"]`; the sandbox passes its own binary and arguments).
pub fn pct_set_argv(
    pct_command: &[String],
    vmid: u32,
    options: &[(String, String)],
) -> Result<Vec<String>, HostShellError> {
    let mut argv: Vec<String> = if pct_command.is_empty() {
        vec!["pct".to_string()]
    } else {
        pct_command.to_vec()
    };
    argv.push("set".into());
    argv.push(vmid.to_string());
    for (key, value) in options {
        let valid = key.starts_with(|c: char| c.is_ascii_lowercase())
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !valid {
            return Err(HostShellError::InvalidOption { key: key.clone() });
        }
        argv.push(format!("--{key}"));
        argv.push(value.clone());
    }
    Ok(argv)
}

/// Run `pct set VMID --KEY VALUE ...` as root on `node`: the changes only root@pam may
/// make (such as `features` beyond `nesting`). Nothing runs when `options` is empty.
pub async fn pct_set<H: HostShell>(
    shell: &H,
    node: &str,
    pct_command: &[String],
    vmid: u32,
    options: &[(String, String)],
) -> Result<(), HostShellError> {
    if options.is_empty() {
        return Ok(());
    }
    let argv = pct_set_argv(pct_command, vmid, options)?;
    let out = shell.run(node, &argv, &[]).await?;
    if out.status != 0 {
        return Err(ShellError::Command {
            host: node.to_string(),
            command: command_line(&argv),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_string(),
        }
        .into());
    }
    tracing::info!(node, vmid, keys = ?options.iter().map(|(k, _)| k).collect::<Vec<_>>(), "pct set");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The raw keys the seed's K3s containers need, in the seed's order.
    fn seed_keys() -> Vec<(String, String)> {
        pairs(&[
            (
                "lxc.mount.entry",
                "/dev/kmsg dev/kmsg none bind,rw,optional,create=file",
            ),
            ("lxc.apparmor.profile", "unconfined"),
            ("lxc.cap.drop", ""),
            ("lxc.cgroup2.devices.allow", "a"),
            ("lxc.mount.auto", "proc:rw sys:rw"),
        ])
    }

    const SEED_RAW: &str = "\
lxc.mount.entry: /dev/kmsg dev/kmsg none bind,rw,optional,create=file
lxc.apparmor.profile: unconfined
lxc.cap.drop: 
lxc.cgroup2.devices.allow: a
lxc.mount.auto: proc:rw sys:rw
";

    const FRESH: &str = "\
#managed by driftless
arch: amd64
cores: 2
features: nesting=1
hostname: k3s-server-1
memory: 4096
net0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:5E:7D:01,ip=dhcp,type=veth
ostype: debian
rootfs: local-lvm:vm-100-disk-0,size=32G
tags: driftless;k3s
unprivileged: 0
lxc.prlimit.nofile: 4096
";

    #[test]
    fn conf_path() {
        assert_eq!(lxc_conf_path("", "pve1", 100), "/etc/pve/nodes/pve1/lxc/100.conf");
        assert_eq!(
            lxc_conf_path("/etc/pve", "pve1", 100),
            "/etc/pve/nodes/pve1/lxc/100.conf"
        );
        assert_eq!(lxc_conf_path("/tmp/state/", "n", 7), "/tmp/state/nodes/n/lxc/7.conf");
        assert_eq!(lxc_conf_path("/", "n", 7), "/nodes/n/lxc/7.conf");
    }

    #[test]
    fn seed_keys_go_after_the_options_and_a_foreign_key_survives() {
        let out = set_raw_lxc_keys(FRESH, &seed_keys(), &[]).unwrap();
        assert_eq!(out, format!("{FRESH}{SEED_RAW}"));
        // applying again changes nothing and returns the text as it was
        assert_eq!(set_raw_lxc_keys(&out, &seed_keys(), &[]).unwrap(), out);
        let conf = conf::parse(&out, PveKind::Lxc).unwrap();
        assert_eq!(conf.raw_lxc[0], ("lxc.prlimit.nofile".to_string(), "4096".to_string()));
        assert_eq!(conf.raw_lxc[1..], seed_keys()[..]);
    }

    #[test]
    fn owned_entries_are_replaced_in_place_and_others_keep_their_order() {
        let text = "\
hostname: ct
lxc.prlimit.nofile: 4096
lxc.apparmor.profile: generated
lxc.net.0.mtu: 1400
lxc.cgroup2.devices.allow: c 10:200 rwm
lxc.cgroup2.devices.allow: c 1:3 rwm
";
        let desired = pairs(&[
            ("lxc.apparmor.profile", "unconfined"),
            ("lxc.cgroup2.devices.allow", "a"),
        ]);
        let out = set_raw_lxc_keys(text, &desired, &[]).unwrap();
        assert_eq!(
            out,
            "\
hostname: ct
lxc.prlimit.nofile: 4096
lxc.apparmor.profile: unconfined
lxc.cgroup2.devices.allow: a
lxc.net.0.mtu: 1400
"
        );
    }

    #[test]
    fn previously_owned_keys_are_removed() {
        let text = format!("hostname: ct\n{SEED_RAW}lxc.prlimit.nofile: 4096\n");
        let owned: Vec<String> = seed_keys().into_iter().map(|(k, _)| k).collect();
        let desired = pairs(&[("lxc.apparmor.profile", "unconfined")]);
        let out = set_raw_lxc_keys(&text, &desired, &owned).unwrap();
        assert_eq!(
            out,
            "hostname: ct\nlxc.apparmor.profile: unconfined\nlxc.prlimit.nofile: 4096\n"
        );
        // nothing desired, everything owned removed
        let out = set_raw_lxc_keys(&text, &[], &owned).unwrap();
        assert_eq!(out, "hostname: ct\nlxc.prlimit.nofile: 4096\n");
        // prefixes
        let out = set_raw_lxc_keys(&text, &[], &["lxc.mount.*".to_string(), "lxc.cgroup2.".to_string()]).unwrap();
        assert_eq!(
            out,
            "hostname: ct\nlxc.apparmor.profile: unconfined\nlxc.cap.drop: \nlxc.prlimit.nofile: 4096\n"
        );
        // `lxc.mount` without a dot or star is a key, not a prefix
        let out = set_raw_lxc_keys(&text, &[], &["lxc.mount".to_string()]).unwrap();
        assert_eq!(out, text);
    }

    #[test]
    fn other_sections_description_and_env_are_kept() {
        let text = "\
#first line%3A kept
#100%25
cores: 2
hostname: ct
parent: before-upgrade
lxc.environment.runtime: A=1
lxc.apparmor.profile: generated

[pve:pending]
cores: 4
delete: swap

[before-upgrade]
#snapshot description
cores: 2
hostname: ct
snaptime: 1700000000
lxc.apparmor.profile: generated
";
        let out = set_raw_lxc_keys(text, &pairs(&[("lxc.apparmor.profile", "unconfined")]), &[]).unwrap();
        assert_eq!(
            out,
            text.replacen("lxc.apparmor.profile: generated", "lxc.apparmor.profile: unconfined", 1)
        );
    }

    #[test]
    fn equal_entries_in_another_spelling_are_not_rewritten() {
        let text = "hostname: ct\nlxc.apparmor.profile = unconfined\n";
        let out = set_raw_lxc_keys(text, &pairs(&[("lxc.apparmor.profile", "unconfined")]), &[]).unwrap();
        assert_eq!(out, text);
    }

    #[test]
    fn bad_input_is_refused() {
        let e = set_raw_lxc_keys("hostname: ct\n", &pairs(&[("lxc.rootfs.path", "/x")]), &[]).unwrap_err();
        assert!(matches!(e, RawKeysError::InvalidKey { .. }), "{e}");
        let e = set_raw_lxc_keys("hostname: ct\n", &pairs(&[("lxc.bogus", "1")]), &[]).unwrap_err();
        assert!(matches!(e, RawKeysError::InvalidKey { .. }), "{e}");
        let e = set_raw_lxc_keys("hostname: ct\n", &pairs(&[("lxc.environment.runtime", "A=1")]), &[]).unwrap_err();
        assert!(matches!(e, RawKeysError::InvalidKey { .. }), "{e}");
        let e = set_raw_lxc_keys("hostname: ct\n", &pairs(&[("lxc.apparmor.profile", "a\nb")]), &[]).unwrap_err();
        assert_eq!(
            e,
            RawKeysError::InvalidValue {
                key: "lxc.apparmor.profile".into()
            }
        );
        let e = set_raw_lxc_keys("hostname: ct\n", &pairs(&[("lxc.apparmor.profile", " x")]), &[]).unwrap_err();
        assert!(matches!(e, RawKeysError::InvalidKey { .. }), "{e}");
        // a file Proxmox itself would not parse strictly is not rewritten
        let e = set_raw_lxc_keys("hostname: ct\ngarbage\n", &seed_keys(), &[]).unwrap_err();
        assert!(
            matches!(e, RawKeysError::Conf(ConfError::Unparsable { line: 2, .. })),
            "{e}"
        );
    }

    #[test]
    fn pct_set_command() {
        let argv = pct_set_argv(&[], 101, &pairs(&[("features", "fuse=1,keyctl=1,nesting=1")])).unwrap();
        assert_eq!(argv, ["pct", "set", "101", "--features", "fuse=1,keyctl=1,nesting=1"]);
        let cmd: Vec<String> = ["driftless-sandbox", "pct", "--state", "/tmp/s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let argv = pct_set_argv(&cmd, 7, &pairs(&[("features", "nesting=1"), ("onboot", "1")])).unwrap();
        assert_eq!(
            argv,
            [
                "driftless-sandbox",
                "pct",
                "--state",
                "/tmp/s",
                "set",
                "7",
                "--features",
                "nesting=1",
                "--onboot",
                "1"
            ]
        );
        assert!(matches!(
            pct_set_argv(&[], 7, &pairs(&[("--delete", "x")])),
            Err(HostShellError::InvalidOption { .. })
        ));
        assert!(matches!(
            pct_set_argv(&[], 7, &pairs(&[("a b", "x")])),
            Err(HostShellError::InvalidOption { .. })
        ));
    }
}

#[cfg(test)]
mod run_lock_tests {
    use super::*;
    use crate::adapters::local_shell::LocalShell;
    use std::time::Duration;

    #[test]
    fn the_lock_path_is_under_run_lock_on_a_host_and_never_a_path_the_cluster_name_makes() {
        assert_eq!(run_lock_path("/etc/pve", "homelab"), "/run/lock/driftless-homelab.lock");
        assert_eq!(run_lock_path("", "a/../b"), "/run/lock/driftless-a_.._b.lock");
        assert_eq!(
            run_lock_path("/srv/state/", "homelab"),
            "/srv/state/.driftless-lock/driftless-homelab.lock"
        );
    }

    #[tokio::test]
    async fn a_second_run_is_refused_naming_the_first_and_gets_the_lock_once_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = run_lock_path(dir.path().to_str().unwrap(), "homelab");
        let first = lock_run(
            &LocalShell,
            "pve",
            &path,
            "driftless apply by alice@laptop (pid 1)",
            Duration::ZERO,
        )
        .await
        .unwrap();
        let refused = lock_run(&LocalShell, "pve", &path, "driftless daemon by bob@pve", Duration::ZERO)
            .await
            .unwrap_err();
        let message = refused.to_string();
        assert!(matches!(refused, ShellError::Locked { .. }), "{message}");
        assert!(
            message.contains("holds") && message.contains("driftless apply by alice@laptop (pid 1) since 20"),
            "{message}"
        );
        // A run that waits gets the lock as soon as the holder lets go.
        let waiting = tokio::spawn({
            let path = path.clone();
            async move {
                lock_run(
                    &LocalShell,
                    "pve",
                    &path,
                    "driftless daemon by bob@pve",
                    Duration::from_secs(30),
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "it waits while the lock is held");
        drop(first);
        let second = waiting.await.unwrap().unwrap();
        drop(second);
    }
}
