//! The settings of one run: plain values with every default applied here, once.
//!
//! Flags (`driftless plan --proxmox-url ...`), `DRIFTLESS_*` variables and the daemon's config
//! file are parsed at the edge (the binary's `cli` module, `daemon::config`) into these
//! structs; everything after that reads settings, never flags. They are serialisable because
//! the daemon hands them to each run's worker process.
//!
//! Connection settings here are overrides: `None` keeps what the trusted cluster.yaml says
//! (`connect` combines the two).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// How logs are written on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (journald, log shippers).
    Json,
}

/// How the Proxmox host's root shell is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostShellKind {
    /// SSH to each Proxmox node named in cluster.yaml `proxmox.hosts`.
    #[default]
    Ssh,
    /// Commands run on this machine: driftless runs on the Proxmox host itself (or the sandbox).
    Local,
}

/// Where /etc/pve is on a Proxmox host.
pub const DEFAULT_PVE_ROOT: &str = "/etc/pve";
/// The `pct` command on a Proxmox host.
pub const DEFAULT_PCT_COMMAND: &str = "pct";
/// The secrets directory, relative to the working directory.
pub const DEFAULT_SECRETS_DIR: &str = "secrets";
/// How long a node may take to be Ready again after a disruptive step.
pub const DEFAULT_GATE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a health gate asks again.
pub const DEFAULT_GATE_INTERVAL: Duration = Duration::from_millis(500);
/// How long an apply waits for another run to release the cluster's run lock.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(60);
/// How long idempotent Proxmox API calls are retried while the API does not answer or
/// answers 5xx: long enough for `systemctl restart pveproxy pvedaemon` or a node reboot's
/// first minute.
pub const DEFAULT_API_RETRY: Duration = Duration::from_secs(90);
/// SSH user and port of VM nodes.
pub const DEFAULT_NODE_SSH_USER: &str = "root";
pub const DEFAULT_NODE_SSH_PORT: u16 = 22;

/// One run's overrides of cluster.yaml's `proxmox:` API settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxmoxOverrides {
    /// The API URL instead of `proxmox.api`.
    pub url: Option<String>,
    /// A file holding `USER@REALM!TOKENID=SECRET` instead of the `proxmox.token` secret.
    pub token_file: Option<PathBuf>,
    /// Pin this certificate fingerprint instead of `proxmox.fingerprint`.
    pub fingerprint: Option<String>,
    /// Verify with this CA instead of `proxmox.ca_file`.
    pub ca_file: Option<PathBuf>,
    /// Verify nothing (throwaway test setups only).
    pub insecure: bool,
}

/// The Proxmox host shell: overrides of `proxmox.hosts`, and where things are on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostShellSettings {
    pub kind: HostShellKind,
    /// Connect here (for every Proxmox node) instead of `proxmox.hosts.*.ssh`'s host.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub key_file: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    /// /etc/pve on a real host; the sandbox's state directory there.
    pub pve_root: String,
    /// `pct` on a real host, as argv words (the sandbox passes its own binary).
    pub pct_command: Vec<String>,
}

impl Default for HostShellSettings {
    fn default() -> Self {
        HostShellSettings {
            kind: HostShellKind::default(),
            host: None,
            port: None,
            user: None,
            key_file: None,
            known_hosts: None,
            pve_root: DEFAULT_PVE_ROOT.into(),
            pct_command: vec![DEFAULT_PCT_COMMAND.into()],
        }
    }
}

/// How VM nodes are reached over SSH (K3s on VMs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSsh {
    pub user: String,
    pub port: u16,
    pub key_file: PathBuf,
    pub known_hosts: PathBuf,
    /// Connect here instead of the node's address (a tunnel; tests).
    pub host_override: Option<String>,
}

/// The cluster layer: K3s/Talos on the nodes and the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// `false` plans and applies the Proxmox guests only (`--guests-only`).
    pub enabled: bool,
    /// Reach the Kubernetes API here instead of the kubeconfig's server.
    pub kube_server: Option<String>,
    /// Reach every Talos node's API through this endpoint (`host:port`).
    pub talos_endpoint: Option<String>,
    /// How long a node may take to be Ready again after a disruptive step.
    pub gate_timeout: Duration,
    /// How often a gate (or a wait for a booting VM) asks again.
    pub gate_interval: Duration,
    pub node_ssh: NodeSsh,
    /// Prefix of every path on a node (empty on real nodes; a directory in tests).
    pub node_root: String,
}

/// Everything one run needs besides the repository: connection overrides, where secrets are,
/// and how the cluster layer behaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSettings {
    pub proxmox: ProxmoxOverrides,
    pub host: HostShellSettings,
    /// The secrets the repository names are `<dir>/<name>` (or `DRIFTLESS_SECRET_<NAME>`).
    pub secrets_dir: PathBuf,
    pub cluster: ClusterSettings,
    /// Steps applied at once per Proxmox node (`--parallelism`); `None`: cluster.yaml's
    /// `reconcile.parallelism`, else the default.
    pub parallelism: Option<usize>,
    /// How long an apply waits for the run lock another run holds (`--lock-wait`).
    #[serde(default = "default_lock_wait")]
    pub lock_wait: Duration,
    /// How long idempotent Proxmox API calls are retried (`--api-retry`).
    #[serde(default = "default_api_retry")]
    pub api_retry: Duration,
}

fn default_lock_wait() -> Duration {
    DEFAULT_LOCK_WAIT
}

fn default_api_retry() -> Duration {
    DEFAULT_API_RETRY
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings::resolve(RunFlags::default())
    }
}

/// What the flags of one run said; `None` where a flag was not given.
#[derive(Debug, Clone, Default)]
pub struct RunFlags {
    pub proxmox: ProxmoxOverrides,
    pub host_shell: Option<HostShellKind>,
    pub ssh_host: Option<String>,
    pub ssh_port: Option<u16>,
    pub ssh_user: Option<String>,
    pub ssh_key_file: Option<PathBuf>,
    pub ssh_known_hosts: Option<PathBuf>,
    pub pve_root: Option<String>,
    /// The pct command as one line of words separated by spaces.
    pub pct_command: Option<String>,
    pub secrets_dir: Option<PathBuf>,
    pub guests_only: bool,
    pub kube_server: Option<String>,
    pub talos_endpoint: Option<String>,
    pub gate_timeout: Option<Duration>,
    pub node_ssh_user: Option<String>,
    pub node_ssh_port: Option<u16>,
    pub node_ssh_key_file: Option<PathBuf>,
    pub node_ssh_known_hosts: Option<PathBuf>,
    pub node_ssh_host: Option<String>,
    pub node_root: Option<String>,
    pub parallelism: Option<usize>,
    pub lock_wait: Option<Duration>,
    pub api_retry: Option<Duration>,
}

impl RunSettings {
    /// Apply every default to what the flags said. VM nodes use the host shell's key and
    /// known_hosts unless told otherwise, then the user's own (`~/.ssh`).
    pub fn resolve(flags: RunFlags) -> RunSettings {
        let home = home();
        let pct_command: Vec<String> = flags
            .pct_command
            .as_deref()
            .map(|c| c.split_whitespace().map(str::to_string).collect())
            .filter(|c: &Vec<String>| !c.is_empty())
            .unwrap_or_else(|| vec![DEFAULT_PCT_COMMAND.into()]);
        let node_ssh = NodeSsh {
            user: flags
                .node_ssh_user
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| DEFAULT_NODE_SSH_USER.into()),
            port: flags.node_ssh_port.unwrap_or(DEFAULT_NODE_SSH_PORT),
            key_file: flags
                .node_ssh_key_file
                .or_else(|| flags.ssh_key_file.clone())
                .unwrap_or_else(|| home.join(".ssh/id_ed25519")),
            known_hosts: flags
                .node_ssh_known_hosts
                .or_else(|| flags.ssh_known_hosts.clone())
                .unwrap_or_else(|| home.join(".ssh/known_hosts")),
            host_override: flags.node_ssh_host,
        };
        RunSettings {
            proxmox: flags.proxmox,
            host: HostShellSettings {
                kind: flags.host_shell.unwrap_or_default(),
                host: flags.ssh_host,
                port: flags.ssh_port,
                user: flags.ssh_user,
                key_file: flags.ssh_key_file,
                known_hosts: flags.ssh_known_hosts,
                pve_root: flags.pve_root.unwrap_or_else(|| DEFAULT_PVE_ROOT.into()),
                pct_command,
            },
            secrets_dir: flags.secrets_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_SECRETS_DIR)),
            cluster: ClusterSettings {
                enabled: !flags.guests_only,
                kube_server: flags.kube_server,
                talos_endpoint: flags.talos_endpoint,
                gate_timeout: flags.gate_timeout.unwrap_or(DEFAULT_GATE_TIMEOUT),
                gate_interval: DEFAULT_GATE_INTERVAL,
                node_ssh,
                node_root: flags.node_root.unwrap_or_default(),
            },
            parallelism: flags.parallelism.filter(|&p| p > 0),
            lock_wait: flags.lock_wait.unwrap_or(DEFAULT_LOCK_WAIT),
            api_retry: flags.api_retry.unwrap_or(DEFAULT_API_RETRY),
        }
    }
}

/// The user's home directory (where `~/.ssh` is).
pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// A duration as users write them: `90s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::model::parse_duration(s)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{s}` is not a duration like 90s, 5m or 1h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_gives_every_default_once() {
        let s = RunSettings::resolve(RunFlags::default());
        assert_eq!(s.host.pve_root, "/etc/pve");
        assert_eq!(s.host.pct_command, ["pct"]);
        assert_eq!(s.secrets_dir, PathBuf::from("secrets"));
        assert!(s.cluster.enabled);
        assert_eq!(s.cluster.gate_timeout, Duration::from_secs(300));
        assert_eq!(s.cluster.node_ssh.user, "root");
        assert_eq!(s.cluster.node_ssh.port, 22);
        assert!(s.cluster.node_ssh.key_file.ends_with(".ssh/id_ed25519"));
        assert_eq!(s, RunSettings::default());
    }

    #[test]
    fn vm_nodes_fall_back_to_the_host_shells_key_and_known_hosts() {
        let s = RunSettings::resolve(RunFlags {
            ssh_key_file: Some("/k".into()),
            ssh_known_hosts: Some("/kh".into()),
            pct_command: Some("driftless-sandbox pct --state /s".into()),
            guests_only: true,
            ..RunFlags::default()
        });
        assert_eq!(s.cluster.node_ssh.key_file, PathBuf::from("/k"));
        assert_eq!(s.cluster.node_ssh.known_hosts, PathBuf::from("/kh"));
        assert_eq!(s.host.pct_command, ["driftless-sandbox", "pct", "--state", "/s"]);
        assert!(!s.cluster.enabled);
        let own = RunSettings::resolve(RunFlags {
            ssh_key_file: Some("/k".into()),
            node_ssh_key_file: Some("/node".into()),
            ..RunFlags::default()
        });
        assert_eq!(own.cluster.node_ssh.key_file, PathBuf::from("/node"));
    }

    #[test]
    fn settings_survive_the_trip_to_a_worker() {
        let s = RunSettings::resolve(RunFlags {
            kube_server: Some("https://127.0.0.1:6443".into()),
            gate_timeout: Some(Duration::from_secs(7)),
            ..RunFlags::default()
        });
        let back: RunSettings = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
