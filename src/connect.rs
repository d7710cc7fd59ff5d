//! Connection settings: what cluster.yaml says, overridden for one run by flags and
//! `DRIFTLESS_*` environment variables (CI jobs and tests point a repository at another
//! Proxmox that way), with secrets resolved on this host.

use crate::adapters::local_shell::LocalShell;
use crate::adapters::proxmox::{ApiToken, ClientOptions, ProxmoxClient};
use crate::adapters::ssh::{HostTarget, SshHostShell};
use crate::adapters::tls::TlsTrust;
use crate::apply::HostSettings;
use crate::cluster::access::{ClusterSettings, NodeSsh};
use crate::model::Cluster;
use crate::ports::{CommandOutput, HostShell, ShellError};
use crate::secrets::{SecretError, SecretStore};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One run's overrides; `None` keeps what cluster.yaml says. Serialisable: the daemon hands
/// them to each run's worker process.
#[derive(Debug, Clone, Default, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct ConnectArgs {
    /// Proxmox API URL (overrides proxmox.api).
    #[arg(long, env = "DRIFTLESS_PROXMOX_URL", value_name = "URL", help_heading = "Connection")]
    pub proxmox_url: Option<String>,
    /// File holding the API token `USER@REALM!TOKENID=SECRET` (overrides proxmox.token).
    /// The token itself may instead be given in DRIFTLESS_PROXMOX_TOKEN.
    #[arg(
        long,
        env = "DRIFTLESS_PROXMOX_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Connection"
    )]
    pub proxmox_token_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the API certificate to pin (overrides proxmox.fingerprint).
    #[arg(
        long,
        env = "DRIFTLESS_PROXMOX_FINGERPRINT",
        value_name = "AB:CD:..",
        help_heading = "Connection"
    )]
    pub proxmox_fingerprint: Option<String>,
    /// CA certificate file to verify the API with (overrides proxmox.ca_file).
    #[arg(
        long,
        env = "DRIFTLESS_PROXMOX_CA_FILE",
        value_name = "FILE",
        help_heading = "Connection"
    )]
    pub proxmox_ca_file: Option<PathBuf>,
    /// Do not verify the API's certificate at all. Anyone on the path can then read the
    /// token: for throwaway test setups only.
    #[arg(long, env = "DRIFTLESS_PROXMOX_INSECURE", help_heading = "Connection")]
    pub proxmox_insecure: bool,
    /// Host (or address) of the Proxmox host shell, for every Proxmox node (overrides proxmox.hosts.*.ssh).
    #[arg(long, env = "DRIFTLESS_SSH_HOST", value_name = "HOST", help_heading = "Connection")]
    pub ssh_host: Option<String>,
    /// SSH port of the host shell.
    #[arg(long, env = "DRIFTLESS_SSH_PORT", value_name = "PORT", help_heading = "Connection")]
    pub ssh_port: Option<u16>,
    /// SSH user of the host shell (root on a Proxmox host).
    #[arg(long, env = "DRIFTLESS_SSH_USER", value_name = "USER", help_heading = "Connection")]
    pub ssh_user: Option<String>,
    /// Private key file for the host shell.
    #[arg(
        long,
        env = "DRIFTLESS_SSH_KEY_FILE",
        value_name = "FILE",
        help_heading = "Connection"
    )]
    pub ssh_key_file: Option<PathBuf>,
    /// known_hosts file the host shell's key is checked against.
    #[arg(
        long,
        env = "DRIFTLESS_SSH_KNOWN_HOSTS",
        value_name = "FILE",
        help_heading = "Connection"
    )]
    pub ssh_known_hosts: Option<PathBuf>,
    /// How to reach the Proxmox host's root shell: `ssh` (proxmox.hosts in cluster.yaml), or
    /// `local` when driftless runs on the Proxmox host itself (or against the sandbox).
    #[arg(long, env = "DRIFTLESS_HOST_SHELL", value_enum, default_value_t = HostShellKind::Ssh, help_heading = "Connection")]
    pub host_shell: HostShellKind,
    /// Where /etc/pve is on the Proxmox host.
    #[arg(
        long,
        env = "DRIFTLESS_PVE_ROOT",
        value_name = "DIR",
        default_value = "/etc/pve",
        help_heading = "Connection"
    )]
    pub pve_root: String,
    /// The `pct` command on the Proxmox host, as words separated by spaces.
    #[arg(
        long,
        env = "DRIFTLESS_PCT_COMMAND",
        value_name = "COMMAND",
        default_value = "pct",
        help_heading = "Connection"
    )]
    pub pct_command: String,
    /// Directory holding the secrets the repository names (`<dir>/<name>`); a secret may also
    /// come from DRIFTLESS_SECRET_<NAME>.
    #[arg(
        long,
        env = "DRIFTLESS_SECRETS_DIR",
        value_name = "DIR",
        default_value = "secrets",
        help_heading = "Connection"
    )]
    pub secrets_dir: PathBuf,
    /// Plan and apply the Proxmox guests only: no K3s, Talos or Kubernetes step.
    #[arg(long, env = "DRIFTLESS_GUESTS_ONLY", help_heading = "Cluster layer")]
    pub guests_only: bool,
    /// Reach the Kubernetes API at this URL instead of the kubeconfig's server (a tunnel,
    /// or the sandbox).
    #[arg(
        long,
        env = "DRIFTLESS_KUBE_SERVER",
        value_name = "URL",
        help_heading = "Cluster layer"
    )]
    pub kube_server: Option<String>,
    /// Reach every Talos node's API through this endpoint (`HOST:PORT`), with the node in
    /// gRPC metadata as `talosctl --endpoints E --nodes N` does.
    #[arg(
        long,
        env = "DRIFTLESS_TALOS_ENDPOINT",
        value_name = "HOST:PORT",
        help_heading = "Cluster layer"
    )]
    pub talos_endpoint: Option<String>,
    /// How long a node may take to be Ready (and the API server ready) after a disruptive
    /// step before the wave stops: `300s`, `5m`.
    #[arg(long, env = "DRIFTLESS_GATE_TIMEOUT", value_name = "DURATION", default_value = "5m", value_parser = parse_duration, help_heading = "Cluster layer")]
    pub gate_timeout: std::time::Duration,
    /// SSH user for VM nodes running K3s.
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_USER",
        value_name = "USER",
        default_value = "root",
        help_heading = "Cluster layer"
    )]
    pub node_ssh_user: String,
    /// SSH port of VM nodes.
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_PORT",
        value_name = "PORT",
        default_value_t = 22,
        help_heading = "Cluster layer"
    )]
    pub node_ssh_port: u16,
    /// Private key for VM nodes (default: the host shell's key, or ~/.ssh/id_ed25519).
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_KEY_FILE",
        value_name = "FILE",
        help_heading = "Cluster layer"
    )]
    pub node_ssh_key_file: Option<PathBuf>,
    /// known_hosts holding the VM nodes' host keys (default: the host shell's, or
    /// ~/.ssh/known_hosts). Unknown keys are refused.
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_KNOWN_HOSTS",
        value_name = "FILE",
        help_heading = "Cluster layer"
    )]
    pub node_ssh_known_hosts: Option<PathBuf>,
    /// Connect to this host instead of each VM node's address.
    #[arg(
        long,
        env = "DRIFTLESS_NODE_SSH_HOST",
        value_name = "HOST",
        help_heading = "Cluster layer"
    )]
    pub node_ssh_host: Option<String>,
    /// A directory every node path is under (tests, or nodes whose root is mounted here).
    #[arg(
        long,
        env = "DRIFTLESS_NODE_ROOT",
        value_name = "DIR",
        default_value = "",
        hide_default_value = true,
        help_heading = "Cluster layer"
    )]
    pub node_root: String,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::model::parse_duration(s)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("`{s}` is not a duration like 90s, 5m or 1h"))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum HostShellKind {
    #[default]
    Ssh,
    Local,
}

/// The host shell a run uses.
pub enum AnyHostShell {
    Ssh(SshHostShell),
    Local(LocalShell),
}

impl HostShell for AnyHostShell {
    async fn run(&self, pve_node: &str, argv: &[String], stdin: &[u8]) -> Result<CommandOutput, ShellError> {
        match self {
            AnyHostShell::Ssh(s) => s.run(pve_node, argv, stdin).await,
            AnyHostShell::Local(s) => s.run(pve_node, argv, stdin).await,
        }
    }
    async fn read_file(&self, pve_node: &str, path: &str) -> Result<Vec<u8>, ShellError> {
        match self {
            AnyHostShell::Ssh(s) => s.read_file(pve_node, path).await,
            AnyHostShell::Local(s) => s.read_file(pve_node, path).await,
        }
    }
    async fn write_file_if_unchanged(
        &self,
        pve_node: &str,
        path: &str,
        contents: &[u8],
        expected_sha1: &str,
    ) -> Result<(), ShellError> {
        match self {
            AnyHostShell::Ssh(s) => s.write_file_if_unchanged(pve_node, path, contents, expected_sha1).await,
            AnyHostShell::Local(s) => s.write_file_if_unchanged(pve_node, path, contents, expected_sha1).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "no Proxmox API token: set proxmox.token in cluster.yaml, --proxmox-token-file, or DRIFTLESS_PROXMOX_TOKEN"
    )]
    NoToken,
    #[error("the Proxmox API token is malformed: {0}")]
    BadToken(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("cannot set up the Proxmox client: {0}")]
    Client(String),
    #[error("proxmox.hosts.{node}.ssh `{value}` is not USER@HOST")]
    BadSsh { node: String, value: String },
}

impl ConnectArgs {
    pub fn secrets(&self) -> SecretStore {
        SecretStore::new(&self.secrets_dir)
    }

    pub fn host_settings(&self) -> HostSettings {
        HostSettings {
            pve_root: self.pve_root.clone(),
            pct_command: self.pct_command.split_whitespace().map(str::to_string).collect(),
        }
    }

    /// The cluster layer's settings for this run.
    pub fn cluster_settings(&self) -> ClusterSettings {
        ClusterSettings {
            secrets: self.secrets(),
            pct_command: self.host_settings().pct_command,
            node_root: self.node_root.clone(),
            node_ssh: NodeSsh {
                user: if self.node_ssh_user.is_empty() {
                    "root".into()
                } else {
                    self.node_ssh_user.clone()
                },
                // 0: a ConnectArgs built in code with Default, not by clap.
                port: if self.node_ssh_port == 0 {
                    22
                } else {
                    self.node_ssh_port
                },
                key_file: self
                    .node_ssh_key_file
                    .clone()
                    .or_else(|| self.ssh_key_file.clone())
                    .unwrap_or_else(|| home().join(".ssh/id_ed25519")),
                known_hosts: self
                    .node_ssh_known_hosts
                    .clone()
                    .or_else(|| self.ssh_known_hosts.clone())
                    .unwrap_or_else(|| home().join(".ssh/known_hosts")),
                host_override: self.node_ssh_host.clone(),
            },
            kube_server: self.kube_server.clone(),
            talos_endpoint: self.talos_endpoint.clone(),
            gate_timeout: if self.gate_timeout.is_zero() {
                std::time::Duration::from_secs(300)
            } else {
                self.gate_timeout
            },
            gate_interval: std::time::Duration::from_millis(500),
        }
    }

    pub fn trust(&self, cluster: &Cluster) -> TlsTrust {
        let store = self.secrets();
        if self.proxmox_insecure {
            TlsTrust::Insecure
        } else if let Some(fp) = &self.proxmox_fingerprint {
            TlsTrust::Fingerprint(fp.clone())
        } else if let Some(ca) = &self.proxmox_ca_file {
            TlsTrust::CaFile(ca.clone())
        } else if let Some(fp) = &cluster.proxmox.fingerprint {
            TlsTrust::Fingerprint(fp.clone())
        } else if let Some(ca) = &cluster.proxmox.ca_file {
            TlsTrust::CaFile(store.host_path(ca))
        } else {
            TlsTrust::System
        }
    }

    pub fn token(&self, cluster: &Cluster) -> Result<ApiToken, ConnectError> {
        let bad = |e: &dyn std::fmt::Display| ConnectError::BadToken(e.to_string());
        if let Some(f) = &self.proxmox_token_file {
            return ApiToken::from_file(f).map_err(|e| bad(&e));
        }
        if std::env::var_os("DRIFTLESS_PROXMOX_TOKEN").is_some() {
            return ApiToken::from_env("DRIFTLESS_PROXMOX_TOKEN").map_err(|e| bad(&e));
        }
        let Some(secret) = &cluster.proxmox.token else {
            return Err(ConnectError::NoToken);
        };
        let value = self.secrets().resolve(&secret.secret)?;
        ApiToken::parse(value.expose()).map_err(|e| bad(&e))
    }

    pub fn proxmox_client(&self, cluster: &Cluster) -> Result<ProxmoxClient, ConnectError> {
        let endpoints = match &self.proxmox_url {
            Some(u) => vec![u.clone()],
            None => cluster.proxmox.api.to_vec(),
        };
        let options = ClientOptions::new(endpoints, self.token(cluster)?, self.trust(cluster));
        ProxmoxClient::new(options).map_err(|e| ConnectError::Client(e.to_string()))
    }

    /// The host shell of every Proxmox node in cluster.yaml `proxmox.hosts`; `None` when no
    /// host is listed (then steps that need it fail with a clear error).
    pub fn host_shell(&self, cluster: &Cluster) -> Result<Option<AnyHostShell>, ConnectError> {
        if self.host_shell == HostShellKind::Local {
            return Ok(Some(AnyHostShell::Local(LocalShell)));
        }
        if cluster.proxmox.hosts.is_empty() {
            return Ok(None);
        }
        let store = self.secrets();
        let mut targets = BTreeMap::new();
        for (node, h) in &cluster.proxmox.hosts {
            let (user, host) = h.ssh.split_once('@').ok_or_else(|| ConnectError::BadSsh {
                node: node.clone(),
                value: h.ssh.clone(),
            })?;
            let key_file = match (&self.ssh_key_file, &h.key) {
                (Some(k), _) => k.clone(),
                (None, Some(secret)) => store.dir.join(&secret.secret),
                (None, None) => home().join(".ssh/id_ed25519"),
            };
            let known_hosts = match (&self.ssh_known_hosts, &h.known_hosts) {
                (Some(k), _) => k.clone(),
                (None, Some(k)) => store.host_path(k),
                (None, None) => home().join(".ssh/known_hosts"),
            };
            targets.insert(
                node.clone(),
                HostTarget {
                    user: self.ssh_user.clone().unwrap_or_else(|| user.to_string()),
                    host: self.ssh_host.clone().unwrap_or_else(|| host.to_string()),
                    port: self.ssh_port.or(h.port).unwrap_or(22),
                    known_hosts,
                    key_file,
                },
            );
        }
        Ok(Some(AnyHostShell::Ssh(SshHostShell::new(targets))))
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}
