//! K3s on a node: what is observed, and the fixed scripts that install, configure and
//! restart it. The scripts take every value as a positional parameter; the join token only
//! ever travels as file contents on stdin.

use std::collections::BTreeMap;

use serde::Serialize;

use super::node_access::{run_checked, script_argv};
use crate::ports::{NodeShell, ShellError};

pub const CONFIG_PATH: &str = "/etc/rancher/k3s/config.yaml";
/// The join token, referenced by `token-file:` in config.yaml (so config.yaml holds no secret).
pub const TOKEN_PATH: &str = "/etc/rancher/k3s/cluster-token";
/// Written by a K3s server at first start: what agents and other servers join with.
pub const SERVER_TOKEN_PATH: &str = "/var/lib/rancher/k3s/server/node-token";
/// The admin kubeconfig a K3s server writes (server `https://127.0.0.1:6443`).
pub const KUBECONFIG_PATH: &str = "/etc/rancher/k3s/k3s.yaml";
/// Written before config.yaml or the token file changes and removed once the service has
/// restarted with them: while it exists, the service may still run an older config (an apply
/// killed or failed between the write and the restart), and the next plan restarts it.
pub const RESTART_PENDING_PATH: &str = "/etc/rancher/k3s/driftless-restart-pending";
/// The official install script; the version is pinned with INSTALL_K3S_VERSION.
pub const INSTALL_URL: &str = "https://get.k3s.io";

/// Prints what is there, one `key=value` per line: `version=` (installed K3s), `active=`
/// (the running service), `config_sha256=` and `token_sha256=` (of $1 and $2 when present),
/// `restart_pending=1` when the marker $3 exists.
pub const OBSERVE_SCRIPT: &str = r#"if command -v k3s >/dev/null 2>&1; then
  echo "version=$(k3s --version 2>/dev/null | sed -n '1s/^k3s version \([^ ]*\).*/\1/p')"
fi
for s in k3s k3s-agent; do
  if systemctl is-active --quiet "$s" 2>/dev/null; then echo "active=$s"; fi
done
if [ -f "$1" ]; then echo "config_sha256=$(sha256sum < "$1" | cut -d' ' -f1)"; fi
if [ -f "$2" ]; then echo "token_sha256=$(sha256sum < "$2" | cut -d' ' -f1)"; fi
if [ -e "$3" ]; then echo "restart_pending=1"; fi
true
"#;

/// Installs K3s $1 for `INSTALL_K3S_EXEC=$2` (server or agent) from the official script,
/// without starting it: driftless writes the config first, then starts the service.
pub const INSTALL_SCRIPT: &str = r#"set -eu
version=$1; exec_as=$2; url=$3
if command -v curl >/dev/null 2>&1; then
  curl -sfL "$url" > /tmp/driftless-k3s-install.sh
else
  wget -qO /tmp/driftless-k3s-install.sh "$url"
fi
INSTALL_K3S_VERSION="$version" INSTALL_K3S_SKIP_START=true INSTALL_K3S_EXEC="$exec_as" \
  sh /tmp/driftless-k3s-install.sh
rm -f /tmp/driftless-k3s-install.sh
"#;

/// Air-gapped install: the binary and install.sh were pushed from the Proxmox host already.
pub const AIRGAP_INSTALL_SCRIPT: &str = r#"set -eu
exec_as=$1
INSTALL_K3S_SKIP_DOWNLOAD=true INSTALL_K3S_SKIP_START=true INSTALL_K3S_EXEC="$exec_as" \
  sh /usr/local/bin/k3s-install.sh
"#;

/// What a node has of K3s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct K3sObserved {
    pub version: Option<String>,
    /// `k3s` or `k3s-agent` when running.
    pub active: Option<String>,
    pub config_sha256: Option<String>,
    pub token_sha256: Option<String>,
    /// The restart marker ([`RESTART_PENDING_PATH`]) is there: a config or token written by
    /// an earlier apply may not have been taken up by the service yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart_pending: bool,
    /// The current config.yaml, read when its digest differs from the desired one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

impl K3sObserved {
    pub fn parse(stdout: &str) -> K3sObserved {
        let mut o = K3sObserved::default();
        for line in stdout.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            match k {
                "version" => o.version = Some(v.to_string()),
                "active" => o.active = Some(v.to_string()),
                "config_sha256" => o.config_sha256 = Some(v.to_string()),
                "token_sha256" => o.token_sha256 = Some(v.to_string()),
                "restart_pending" => o.restart_pending = v == "1",
                _ => {}
            }
        }
        o
    }
}

/// The systemd unit K3s runs as for a role.
pub fn service(role: &str) -> &'static str {
    if role == "server" { "k3s" } else { "k3s-agent" }
}

pub use crate::pve::conf::sha256_hex;

pub async fn observe<N: NodeShell>(node: &N, desired_config_sha: &str) -> Result<K3sObserved, ShellError> {
    let argv = script_argv(
        OBSERVE_SCRIPT,
        &[
            node.path(CONFIG_PATH),
            node.path(TOKEN_PATH),
            node.path(RESTART_PENDING_PATH),
        ],
    );
    let out = run_checked(node, &argv, b"").await?;
    let mut observed = K3sObserved::parse(&String::from_utf8_lossy(&out.stdout));
    if observed
        .config_sha256
        .as_deref()
        .is_some_and(|s| s != desired_config_sha)
    {
        observed.config = node
            .read_file(CONFIG_PATH)
            .await?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
    }
    Ok(observed)
}

/// Install K3s `version` from the official script (the node needs internet).
pub async fn install<N: NodeShell>(node: &N, version: &str, role: &str) -> Result<(), ShellError> {
    let argv = script_argv(
        INSTALL_SCRIPT,
        &[
            version.to_string(),
            role_exec(role).to_string(),
            INSTALL_URL.to_string(),
        ],
    );
    run_checked(node, &argv, b"").await.map(|_| ())
}

/// Install from the binary and install.sh already pushed to the node.
pub async fn install_airgap<N: NodeShell>(node: &N, role: &str) -> Result<(), ShellError> {
    let argv = script_argv(AIRGAP_INSTALL_SCRIPT, &[role_exec(role).to_string()]);
    run_checked(node, &argv, b"").await.map(|_| ())
}

fn role_exec(role: &str) -> &'static str {
    if role == "server" { "server" } else { "agent" }
}

/// `systemctl enable` + `restart` of the role's service.
pub async fn restart<N: NodeShell>(node: &N, role: &str) -> Result<(), ShellError> {
    let svc = service(role).to_string();
    run_checked(node, &["systemctl".into(), "enable".into(), svc.clone()], b"").await?;
    run_checked(node, &["systemctl".into(), "restart".into(), svc], b"").await?;
    Ok(())
}

/// What [`configure`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configured {
    /// Files written: config.yaml and/or the token file (by path, never by contents).
    pub written: Vec<&'static str>,
    pub restarted: bool,
}

/// Write config.yaml and the join token where they differ from what the node has, then
/// restart the role's service only when something was written, `force_restart` (an upgrade
/// that must take over), the service is not running, or an earlier restart is still pending.
/// The restart marker is written before the files and removed after the restart, so an apply
/// that stops in between leaves the next plan a restart to do.
pub async fn configure<N: NodeShell>(
    node: &N,
    role: &str,
    config: &str,
    token: Option<&crate::secrets::Secret>,
    force_restart: bool,
) -> Result<Configured, ShellError> {
    let want_sha = sha256_hex(config.as_bytes());
    let seen = observe(node, &want_sha).await?;
    let mut writes: Vec<(&'static str, Vec<u8>)> = Vec::new();
    if seen.config_sha256.as_deref() != Some(want_sha.as_str()) {
        writes.push((CONFIG_PATH, config.as_bytes().to_vec()));
    }
    if let Some(token) = token {
        let contents = token_file_contents(token);
        if seen.token_sha256.as_deref() != Some(sha256_hex(&contents).as_str()) {
            writes.push((TOKEN_PATH, contents));
        }
    }
    let mut done = Configured::default();
    if !writes.is_empty() && !seen.restart_pending {
        node.write_file(RESTART_PENDING_PATH, format!("{want_sha}\n").as_bytes(), 0o600)
            .await?;
    }
    for (path, contents) in writes {
        node.write_file(path, &contents, 0o600).await?;
        done.written.push(path);
    }
    if !done.written.is_empty()
        || force_restart
        || seen.restart_pending
        || seen.active.as_deref() != Some(service(role))
    {
        restart(node, role).await?;
        run_checked(
            node,
            &["rm".into(), "-f".into(), "--".into(), node.path(RESTART_PENDING_PATH)],
            b"",
        )
        .await?;
        done.restarted = true;
    }
    Ok(done)
}

/// The secret part of a K3s token: a full token is `K10<CA hash>::server:<secret>`; a token
/// set by hand is the secret alone. Two tokens are the same cluster's when these agree.
pub fn token_secret_part(token: &str) -> &str {
    let token = token.trim();
    token.rsplit("::server:").next().unwrap_or(token)
}

/// The token file's bytes: the token and a newline (K3s trims it).
pub fn token_file_contents(token: &crate::secrets::Secret) -> Vec<u8> {
    format!("{}\n", token.expose()).into_bytes()
}

/// The top-level keys of two config.yaml texts that differ: (key, old, new), values as
/// compact JSON. A file that does not parse counts as one opaque value.
/// K3s config keys whose values are credentials: never shown in a plan or report, whatever
/// file they were read from (a node's config.yaml may hold a token driftless never wrote).
pub fn is_secret_key(key: &str) -> bool {
    // datastore-endpoint: a database URL with its password; vpn-auth: Tailscale's auth key.
    const EXACT: [&str; 4] = ["token", "agent-token", "datastore-endpoint", "vpn-auth"];
    // Prefixes: etcd-s3-access-key, etcd-s3-secret-key, ...; the S3 settings are all masked,
    // as an endpoint may carry credentials in its URL.
    EXACT.contains(&key) || key.starts_with("etcd-s3") || key.ends_with("-token") || key.contains("password")
}

/// What a plan shows of a config value: the value, or `(secret)` for a credential key.
fn shown(key: &str, value: serde_json::Value) -> String {
    if is_secret_key(key) {
        return "(secret)".into();
    }
    match value {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

pub fn config_changes(old: Option<&str>, new: &str) -> Vec<(String, Option<String>, Option<String>)> {
    fn keys(text: &str) -> BTreeMap<String, String> {
        match yaml_serde::from_str::<BTreeMap<String, serde_json::Value>>(text) {
            Ok(map) => map.into_iter().map(|(k, v)| (k.clone(), shown(&k, v))).collect(),
            Err(_) => BTreeMap::from([("(whole file)".to_string(), sha256_hex(text.as_bytes()))]),
        }
    }
    let old = old.map(keys).unwrap_or_default();
    let new = keys(new);
    let mut out = Vec::new();
    for k in old.keys().chain(new.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (o, n) = (old.get(k), new.get(k));
        if o != n {
            out.push((k.clone(), o.cloned(), n.cloned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observe_output_is_read_line_by_line() {
        let o = K3sObserved::parse("version=v1.31.4+k3s1\nactive=k3s\nconfig_sha256=abc\n");
        assert_eq!(o.version.as_deref(), Some("v1.31.4+k3s1"));
        assert_eq!(o.active.as_deref(), Some("k3s"));
        assert_eq!(o.config_sha256.as_deref(), Some("abc"));
        assert_eq!(o.token_sha256, None);
        assert!(!o.restart_pending);
        assert!(K3sObserved::parse("active=k3s\nrestart_pending=1\n").restart_pending);
        // A k3s whose --version printed nothing counts as not installed.
        assert_eq!(K3sObserved::parse("version=\n").version, None);
    }

    #[test]
    fn a_full_token_and_its_secret_part_are_the_same_token() {
        assert_eq!(token_secret_part("K10abc123::server:s3cret\n"), "s3cret");
        assert_eq!(token_secret_part("s3cret"), "s3cret");
    }

    #[test]
    fn config_changes_name_the_keys_that_differ() {
        let old = "node-name: a\nnode-ip: 10.0.0.1\ntls-san:\n  - 10.0.0.1\n";
        let new = "node-name: a\nnode-ip: 10.0.0.2\nwrite-kubeconfig-mode: \"0644\"\n";
        let c = config_changes(Some(old), new);
        assert_eq!(
            c,
            vec![
                ("node-ip".into(), Some("10.0.0.1".into()), Some("10.0.0.2".into())),
                ("tls-san".into(), Some("[\"10.0.0.1\"]".into()), None),
                ("write-kubeconfig-mode".into(), None, Some("0644".into())),
            ]
        );
        assert!(config_changes(Some(new), new).is_empty());
    }

    #[test]
    fn credentials_read_from_a_node_are_never_shown() {
        let on_node = "token: K10abc::server:hunter2\ndatastore-endpoint: mysql://k3s:pw@tcp(db:3306)/k3s\n\
                       etcd-s3-secret-key: s3cr3t\netcd-s3-access-key: AKIA1\nnode-ip: 10.0.0.5\n";
        let rendered = "token-file: /etc/rancher/k3s/cluster-token\nnode-ip: 10.0.0.6\n";
        let changes = config_changes(Some(on_node), rendered);
        let text = format!("{changes:?}");
        for secret in ["hunter2", "pw@", "s3cr3t", "AKIA1"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
        assert!(
            changes.contains(&("token".into(), Some("(secret)".into()), None)),
            "{text}"
        );
        assert!(
            changes.contains(&("node-ip".into(), Some("10.0.0.5".into()), Some("10.0.0.6".into()))),
            "ordinary keys still show their values: {text}"
        );
    }
}
