//! A run's connections: the trusted cluster.yaml (`proxmox:`), this run's settings (flags and
//! `DRIFTLESS_*` overrides) and the secrets directory become the Proxmox client, the host
//! shell and the cluster layer's connector. Every credential and endpoint is decided here,
//! from trusted input only; the desired state being planned is not consulted.

use crate::adapters::kube::KubeClient;
use crate::adapters::local_shell::LocalShell;
use crate::adapters::proxmox::{ApiToken, ClientOptions, ProxmoxClient};
use crate::adapters::ssh::{HostTarget, SshHostShell};
use crate::adapters::talos::TalosClient;
use crate::adapters::tls::TlsTrust;
use crate::cluster::node_access::{AnyNode, LxcNode, SshNode};
use crate::model::schema::GuestKind;
use crate::model::{Cluster, Node};
use crate::ports::{ClusterConnector, CommandOutput, HostShell, KubeError, NodeTarget, ShellError, System, TalosError};
use crate::secrets::{SecretError, SecretStore};
use crate::settings::{HostShellKind, RunSettings, home};
use std::collections::BTreeMap;
use std::sync::Arc;

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
    async fn hold(
        &self,
        pve_node: &str,
        argv: &[String],
        within: std::time::Duration,
    ) -> Result<crate::ports::Held, ShellError> {
        match self {
            AnyHostShell::Ssh(s) => s.hold(pve_node, argv, within).await,
            AnyHostShell::Local(s) => s.hold(pve_node, argv, within).await,
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

impl ConnectError {
    /// The system a failure to connect is blamed on; none of them passes by retrying.
    pub fn system(&self) -> System {
        match self {
            ConnectError::Secret(_) => System::Secrets,
            ConnectError::Client(_) => System::Proxmox,
            ConnectError::NoToken | ConnectError::BadToken(_) | ConnectError::BadSsh { .. } => System::Repository,
        }
    }
}

/// Everything one run talks to, built from trusted settings.
pub struct Connection {
    pub proxmox: ProxmoxClient,
    /// The Proxmox host shell; `None` when cluster.yaml lists no `proxmox.hosts` (then steps
    /// that need it fail with a clear error).
    pub host: Option<Arc<AnyHostShell>>,
    /// The cluster layer's way to the nodes and APIs.
    pub nodes: NodeConnector,
    pub settings: RunSettings,
}

impl Connection {
    /// Connect with `settings` to the cluster `trusted` describes. `trusted_nodes` decides
    /// which VM nodes may be reached over SSH, and where.
    pub fn open(settings: &RunSettings, trusted: &Cluster, trusted_nodes: &[Node]) -> Result<Connection, ConnectError> {
        let proxmox = proxmox_client(settings, trusted)?;
        let host = host_shell(settings, trusted)?.map(Arc::new);
        let nodes = NodeConnector::new(settings, host.clone(), trusted_nodes);
        Ok(Connection {
            proxmox,
            host,
            nodes,
            settings: settings.clone(),
        })
    }

    pub fn host_shell(&self) -> Option<&AnyHostShell> {
        self.host.as_deref()
    }

    pub fn secrets(&self) -> SecretStore {
        SecretStore::new(&self.settings.secrets_dir)
    }
}

/// How the Proxmox API's certificate is verified: a run's override first, then cluster.yaml.
pub fn trust(settings: &RunSettings, cluster: &Cluster) -> Result<TlsTrust, ConnectError> {
    let o = &settings.proxmox;
    Ok(if o.insecure {
        TlsTrust::Insecure
    } else if let Some(fp) = &o.fingerprint {
        TlsTrust::Fingerprint(fp.clone())
    } else if let Some(ca) = &o.ca_file {
        TlsTrust::CaFile(ca.clone())
    } else if let Some(fp) = &cluster.proxmox.fingerprint {
        TlsTrust::Fingerprint(fp.clone())
    } else if let Some(ca) = &cluster.proxmox.ca_file {
        TlsTrust::CaFile(SecretStore::new(&settings.secrets_dir).host_path(ca)?)
    } else {
        TlsTrust::System
    })
}

/// The API token: a run's token file or DRIFTLESS_PROXMOX_TOKEN, else cluster.yaml's secret.
pub fn token(settings: &RunSettings, cluster: &Cluster) -> Result<ApiToken, ConnectError> {
    let bad = |e: &dyn std::fmt::Display| ConnectError::BadToken(e.to_string());
    if let Some(f) = &settings.proxmox.token_file {
        return ApiToken::from_file(f).map_err(|e| bad(&e));
    }
    if std::env::var_os("DRIFTLESS_PROXMOX_TOKEN").is_some() {
        return ApiToken::from_env("DRIFTLESS_PROXMOX_TOKEN").map_err(|e| bad(&e));
    }
    let Some(secret) = &cluster.proxmox.token else {
        return Err(ConnectError::NoToken);
    };
    let value = SecretStore::new(&settings.secrets_dir).resolve(&secret.secret)?;
    ApiToken::parse(value.expose()).map_err(|e| bad(&e))
}

pub fn proxmox_client(settings: &RunSettings, cluster: &Cluster) -> Result<ProxmoxClient, ConnectError> {
    let endpoints = match &settings.proxmox.url {
        Some(u) => vec![u.clone()],
        None => cluster.proxmox.api.to_vec(),
    };
    let mut options = ClientOptions::new(endpoints, token(settings, cluster)?, trust(settings, cluster)?);
    options.retry_for = settings.api_retry;
    ProxmoxClient::new(options).map_err(|e| ConnectError::Client(e.to_string()))
}

/// The host shell of every Proxmox node in cluster.yaml `proxmox.hosts`; `None` when no
/// host is listed.
pub fn host_shell(settings: &RunSettings, cluster: &Cluster) -> Result<Option<AnyHostShell>, ConnectError> {
    let o = &settings.host;
    if o.kind == HostShellKind::Local {
        return Ok(Some(AnyHostShell::Local(LocalShell)));
    }
    if cluster.proxmox.hosts.is_empty() {
        return Ok(None);
    }
    let store = SecretStore::new(&settings.secrets_dir);
    let mut targets = BTreeMap::new();
    for (node, h) in &cluster.proxmox.hosts {
        let (user, host) = h.ssh.split_once('@').ok_or_else(|| ConnectError::BadSsh {
            node: node.clone(),
            value: h.ssh.clone(),
        })?;
        let key_file = match (&o.key_file, &h.key) {
            (Some(k), _) => k.clone(),
            (None, Some(secret)) => store.host_path(&secret.secret)?,
            (None, None) => home().join(".ssh/id_ed25519"),
        };
        let known_hosts = match (&o.known_hosts, &h.known_hosts) {
            (Some(k), _) => k.clone(),
            (None, Some(k)) => store.host_path(k)?,
            (None, None) => home().join(".ssh/known_hosts"),
        };
        targets.insert(
            node.clone(),
            HostTarget {
                user: o.user.clone().unwrap_or_else(|| user.to_string()),
                host: o.host.clone().unwrap_or_else(|| host.to_string()),
                port: o.port.or(h.port).unwrap_or(22),
                known_hosts,
                key_file,
            },
        );
    }
    Ok(Some(AnyHostShell::Ssh(SshHostShell::new(targets))))
}

/// The cluster layer's connector for the real systems: containers through the Proxmox host
/// shell, VMs over SSH (only the VM nodes of the trusted state, at their trusted
/// addresses), the Kubernetes and Talos APIs from the configs the cluster wrote.
pub struct NodeConnector {
    host: Option<Arc<AnyHostShell>>,
    ssh: SshHostShell,
    pct_command: Vec<String>,
    node_root: String,
    kube_server: Option<String>,
    talos_endpoint: Option<String>,
}

impl NodeConnector {
    pub fn new(settings: &RunSettings, host: Option<Arc<AnyHostShell>>, trusted_nodes: &[Node]) -> NodeConnector {
        let s = &settings.cluster.node_ssh;
        let targets: BTreeMap<String, HostTarget> = trusted_nodes
            .iter()
            .filter(|n| n.kind == GuestKind::Vm)
            .map(|n| {
                let target = HostTarget {
                    user: s.user.clone(),
                    host: s.host_override.clone().unwrap_or_else(|| n.ip().to_string()),
                    port: s.port,
                    known_hosts: s.known_hosts.clone(),
                    key_file: s.key_file.clone(),
                };
                (n.name.clone(), target)
            })
            .collect();
        NodeConnector {
            host,
            ssh: SshHostShell::new(targets),
            pct_command: settings.host.pct_command.clone(),
            node_root: settings.cluster.node_root.clone(),
            kube_server: settings.cluster.kube_server.clone(),
            talos_endpoint: settings.cluster.talos_endpoint.clone(),
        }
    }
}

impl ClusterConnector for NodeConnector {
    type Node<'a> = AnyNode<'a, AnyHostShell>;
    type Kube = KubeClient;
    type Talos = TalosClient;

    fn node_shell<'a>(&'a self, node: &NodeTarget) -> Option<Self::Node<'a>> {
        if node.container {
            let host = self.host.as_deref()?;
            Some(AnyNode::Lxc(LxcNode {
                host,
                pve_node: node.pve_node.clone(),
                vmid: node.vmid,
                pct_command: self.pct_command.clone(),
                root: self.node_root.clone(),
            }))
        } else {
            // A VM the trusted state does not name has no SSH target: it is not reached.
            self.ssh.target(&node.name)?;
            Some(AnyNode::Ssh(SshNode {
                ssh: &self.ssh,
                name: node.name.clone(),
                root: self.node_root.clone(),
            }))
        }
    }

    fn kube(&self, kubeconfig: &[u8]) -> Result<KubeClient, KubeError> {
        KubeClient::from_kubeconfig(kubeconfig, self.kube_server.as_deref())
    }

    fn talos(&self, talosconfig: &[u8]) -> Result<TalosClient, TalosError> {
        TalosClient::from_talosconfig(talosconfig, self.talos_endpoint.as_deref())
    }
}
