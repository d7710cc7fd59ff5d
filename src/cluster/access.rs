//! The cluster layer's effectful half: observe the nodes (K3s over the node shell, Talos over
//! its API) and the Kubernetes API, run the cluster steps of a plan, and hold the health
//! gates between them.
//!
//! Secrets: the K3s join token (a named secret, or the first server's node-token read for
//! this run) and the Talos secrets bundle are held in memory and sent as file contents or
//! gRPC payloads only. The kubeconfig and talosconfig are files in the secrets directory.
//! Every error message is built from names, paths and exit statuses, never from values.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::k3s::{self, K3sObserved};
use super::node_access::{LxcNode, SshNode};
use super::plan::{ClusterObserved, NodeObserved, metadata_step};
use super::talos_secrets::{self, TalosSecrets};
use crate::adapters::kube::KubeClient;
use crate::adapters::ssh::{HostTarget, SshHostShell};
use crate::adapters::talos::TalosClient;
use crate::apply::{ClusterSteps, StepFuture};
use crate::model::schema::{Distribution, GuestKind};
use crate::model::{Desired, Node};
use crate::plan::{Action, Observed, Step};
use crate::ports::{HostShell, KubeApi, NodeShell, ShellError, TalosApi, TalosApplyMode, TalosNodeState};
use crate::render::{Artifact, ArtifactKind};
use crate::secrets::{Secret, SecretStore};

/// How to reach VM nodes over SSH (K3s on VMs).
#[derive(Debug, Clone)]
pub struct NodeSsh {
    pub user: String,
    pub port: u16,
    pub key_file: PathBuf,
    pub known_hosts: PathBuf,
    /// Connect here instead of the node's address (a jump through a tunnel; tests).
    pub host_override: Option<String>,
}

/// Everything the cluster layer needs besides the repository.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub secrets: SecretStore,
    /// `pct` on the Proxmox host.
    pub pct_command: Vec<String>,
    /// Prefix of every path on a node (empty on real nodes).
    pub node_root: String,
    pub node_ssh: NodeSsh,
    /// Reach the Kubernetes API here instead of the kubeconfig's server.
    pub kube_server: Option<String>,
    /// Reach every Talos node's API through this endpoint (`host:port`).
    pub talos_endpoint: Option<String>,
    /// How long a node may take to be Ready again after a disruptive step.
    pub gate_timeout: Duration,
    pub gate_interval: Duration,
}

pub const KUBECONFIG_FILE: &str = "kubeconfig";
pub const TALOSCONFIG_FILE: &str = "talosconfig";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{node} ({via}): {source}")]
    Node {
        node: String,
        via: String,
        #[source]
        source: ShellError,
    },
    #[error("{0}")]
    Other(String),
}

/// The cluster layer for one run.
pub struct ClusterAccess<'a, H: HostShell> {
    pub desired: &'a Desired,
    pub artifacts: &'a [Artifact],
    pub host: Option<&'a H>,
    pub settings: ClusterSettings,
    ssh: SshHostShell,
    /// The join token once read (from the secret or the first server).
    token: tokio::sync::Mutex<Option<Secret>>,
}

/// One node's shell: through the Proxmox host for containers, SSH for VMs.
enum AnyNode<'a, H: HostShell> {
    Lxc(LxcNode<'a, H>),
    Ssh(SshNode<'a>),
}

impl<H: HostShell> NodeShell for AnyNode<'_, H> {
    fn describe(&self) -> String {
        match self {
            AnyNode::Lxc(n) => n.describe(),
            AnyNode::Ssh(n) => n.describe(),
        }
    }
    fn path(&self, path: &str) -> String {
        match self {
            AnyNode::Lxc(n) => n.path(path),
            AnyNode::Ssh(n) => n.path(path),
        }
    }
    async fn run(&self, argv: &[String], stdin: &[u8]) -> Result<crate::ports::CommandOutput, ShellError> {
        match self {
            AnyNode::Lxc(n) => n.run(argv, stdin).await,
            AnyNode::Ssh(n) => n.run(argv, stdin).await,
        }
    }
    async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, ShellError> {
        match self {
            AnyNode::Lxc(n) => n.read_file(path).await,
            AnyNode::Ssh(n) => n.read_file(path).await,
        }
    }
    async fn write_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), ShellError> {
        match self {
            AnyNode::Lxc(n) => n.write_file(path, contents, mode).await,
            AnyNode::Ssh(n) => n.write_file(path, contents, mode).await,
        }
    }
}

impl<'a, H: HostShell> ClusterAccess<'a, H> {
    pub fn new(
        desired: &'a Desired,
        artifacts: &'a [Artifact],
        host: Option<&'a H>,
        settings: ClusterSettings,
    ) -> Self {
        let targets: BTreeMap<String, HostTarget> = desired
            .nodes
            .iter()
            .filter(|n| n.kind == GuestKind::Vm)
            .map(|n| {
                let s = &settings.node_ssh;
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
        ClusterAccess {
            desired,
            artifacts,
            host,
            ssh: SshHostShell::new(targets),
            settings,
            token: tokio::sync::Mutex::new(None),
        }
    }

    fn node_shell(&self, node: &Node) -> Result<AnyNode<'_, H>, String> {
        match node.kind {
            GuestKind::Lxc => {
                let host = self.host.ok_or_else(|| {
                    format!(
                        "{}: reaching a container needs the Proxmox host shell (proxmox.hosts in cluster.yaml)",
                        node.name
                    )
                })?;
                Ok(AnyNode::Lxc(LxcNode {
                    host,
                    pve_node: node.proxmox_node.clone(),
                    vmid: node.vmid,
                    pct_command: self.settings.pct_command.clone(),
                    root: self.settings.node_root.clone(),
                }))
            }
            GuestKind::Vm => Ok(AnyNode::Ssh(SshNode {
                ssh: &self.ssh,
                name: node.name.clone(),
                root: self.settings.node_root.clone(),
            })),
        }
    }

    fn node(&self, name: &str) -> Result<&'a Node, String> {
        self.desired
            .node(name)
            .ok_or_else(|| format!("{name} is in no node file"))
    }

    fn first_control_plane(&self) -> Option<&'a Node> {
        self.desired.control_plane().next()
    }

    fn kubeconfig_path(&self) -> PathBuf {
        self.settings.secrets.dir.join(KUBECONFIG_FILE)
    }

    fn kube(&self) -> Result<Option<KubeClient>, String> {
        let path = self.kubeconfig_path();
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(None);
        };
        KubeClient::from_kubeconfig(&bytes, self.settings.kube_server.as_deref())
            .map(Some)
            .map_err(|e| format!("the kubeconfig in {} is unusable: {e}", path.display()))
    }

    /// Write a file of the secrets directory with mode 0600, atomically.
    fn write_secret_file(&self, name: &str, contents: &[u8]) -> Result<(), String> {
        use std::io::Write;
        let dir = &self.settings.secrets.dir;
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600));
        }
        tmp.write_all(contents)
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(|e| format!("cannot write {name}: {e}"))?;
        tmp.persist(dir.join(name))
            .map_err(|e| format!("cannot write {name}: {}", e.error))?;
        Ok(())
    }

    // ---- Talos credentials ----

    fn talos_bundle(&self) -> Result<(String, TalosSecrets), String> {
        let name = self
            .desired
            .cluster
            .talos
            .secrets
            .as_ref()
            .map(|s| s.secret.clone())
            .ok_or("talos.secrets is not set in cluster.yaml: the secrets bundle names a secret")?;
        let value = self.settings.secrets.resolve(&name).map_err(|e| e.to_string())?;
        let bundle = TalosSecrets::parse(value.expose())
            .map_err(|e| format!("secret `{name}`: {e}"))?
            .with_name(&name);
        Ok((name, bundle))
    }

    /// The talosconfig in the secrets directory, made from the bundle when missing.
    fn talos(&self) -> Result<TalosClient, String> {
        let path = self.settings.secrets.dir.join(TALOSCONFIG_FILE);
        let yaml = match std::fs::read(&path) {
            Ok(y) => y,
            Err(_) => {
                let (_, bundle) = self.talos_bundle()?;
                let endpoints: Vec<String> = self.desired.control_plane().map(|n| n.ip().to_string()).collect();
                let nodes: Vec<String> = self.desired.nodes.iter().map(|n| n.ip().to_string()).collect();
                let text = talos_secrets::talosconfig(&bundle, &self.desired.cluster.name, &endpoints, &nodes)
                    .map_err(|e| format!("cannot make the talosconfig: {e}"))?;
                self.write_secret_file(TALOSCONFIG_FILE, text.as_bytes())?;
                text.into_bytes()
            }
        };
        TalosClient::from_talosconfig(&yaml, self.settings.talos_endpoint.as_deref())
            .map_err(|e| format!("the talosconfig in {} is unusable: {e}", path.display()))
    }

    fn filled_talos_config(&self, config: &str) -> Result<(String, TalosSecrets), String> {
        let (name, bundle) = self.talos_bundle()?;
        let filled = talos_secrets::fill(config, &name, &bundle).map_err(|e| e.to_string())?;
        Ok((filled, bundle))
    }

    // ---- K3s join token ----

    async fn join_token(&self) -> Result<Option<Secret>, String> {
        let mut cached = self.token.lock().await;
        if cached.is_none() {
            *cached = self.read_join_token().await?;
        }
        Ok(cached.clone())
    }

    async fn read_join_token(&self) -> Result<Option<Secret>, String> {
        if let Some(s) = &self.desired.cluster.k3s.token {
            return self
                .settings
                .secrets
                .resolve(&s.secret)
                .map(Some)
                .map_err(|e| e.to_string());
        }
        match self.first_control_plane() {
            Some(first) => self.read_node_token(first).await,
            None => Ok(None),
        }
    }

    /// The node-token a K3s server wrote at its first start; `None` before that.
    async fn read_node_token(&self, server: &Node) -> Result<Option<Secret>, String> {
        let shell = self.node_shell(server)?;
        match shell.read_file(k3s::SERVER_TOKEN_PATH).await {
            Ok(Some(bytes)) => {
                let text = String::from_utf8(bytes).map_err(|_| "the server's node-token is not text".to_string())?;
                Ok(Some(Secret::new(text.trim())))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(format!("{}: cannot read the node-token: {e}", server.name)),
        }
    }

    /// A `k3s.token` secret must be the token the first server was initialised with: K3s
    /// encrypts its bootstrap data with it, so a server restarted with another token does not
    /// start. Changing it is a rotation on the server, not a file driftless can write.
    async fn check_named_token(&self) -> Result<(), String> {
        let (Some(named), Some(first)) = (&self.desired.cluster.k3s.token, self.first_control_plane()) else {
            return Ok(());
        };
        let (Some(running), Some(wanted)) = (self.read_node_token(first).await?, self.join_token().await?) else {
            return Ok(());
        };
        if k3s::token_secret_part(wanted.expose()) == k3s::token_secret_part(running.expose()) {
            return Ok(());
        }
        Err(format!(
            "k3s.token: the secret `{}` is not the token the cluster runs with ({}'s {}). K3s cannot take a \
             new token by a restart; rotate it on the server (`k3s token rotate --new-token ...`) and then \
             update the secret, or put the cluster's token in the secret",
            named.secret,
            first.name,
            k3s::SERVER_TOKEN_PATH
        ))
    }

    // ---- observe ----

    /// Read every node's K3s or Talos state, and the Kubernetes API when a kubeconfig exists.
    /// Nodes whose guest is not running are `NotRunning`; an unanswering Kubernetes API is a
    /// notice, not an error (the guests can still be planned).
    pub async fn observe(&self, guests: &Observed) -> Result<(ClusterObserved, Vec<String>), String> {
        let mut observed = ClusterObserved {
            kubeconfig: self.kubeconfig_path().exists(),
            ..ClusterObserved::default()
        };
        let mut notices = Vec::new();
        let running = |vmid: u32| guests.guests.iter().any(|g| g.vmid == vmid && g.status == "running");
        match self.desired.cluster.distribution {
            Distribution::K3s => {
                for node in &self.desired.nodes {
                    if !running(node.vmid) {
                        observed.nodes.insert(node.name.clone(), NodeObserved::NotRunning);
                        continue;
                    }
                    let Some(config) = self.artifact(&node.name, ArtifactKind::K3sConfig) else {
                        continue;
                    };
                    let shell = self.node_shell(node)?;
                    match k3s::observe(&shell, &k3s::sha256_hex(config.as_bytes())).await {
                        Ok(o) => {
                            observed.nodes.insert(node.name.clone(), NodeObserved::K3s(o));
                        }
                        // A VM that is still booting has no SSH yet: plan it as a fresh node.
                        Err(ShellError::Connect { message, .. }) => {
                            notices.push(format!("{}: not reachable yet ({message})", node.name));
                            observed.nodes.insert(node.name.clone(), NodeObserved::NotRunning);
                        }
                        Err(e) => {
                            return Err(format!("{} ({}): cannot observe K3s: {e}", node.name, shell.describe()));
                        }
                    }
                }
                let first_installed = self.first_control_plane().is_some_and(|n| {
                    matches!(
                        observed.nodes.get(&n.name),
                        Some(NodeObserved::K3s(K3sObserved { active: Some(_), .. }))
                    )
                });
                if self.desired.cluster.k3s.token.is_some() || first_installed {
                    observed.join_token_sha256 = self
                        .join_token()
                        .await?
                        .map(|t| k3s::sha256_hex(&k3s::token_file_contents(&t)));
                }
                if first_installed {
                    self.check_named_token().await?;
                }
            }
            Distribution::Talos => {
                let mut talos = None;
                for node in &self.desired.nodes {
                    if !running(node.vmid) {
                        observed.nodes.insert(node.name.clone(), NodeObserved::NotRunning);
                        continue;
                    }
                    let Some(config) = self.artifact(&node.name, ArtifactKind::TalosConfig) else {
                        continue;
                    };
                    if talos.is_none() {
                        talos = Some(self.talos()?);
                    }
                    let client = talos.as_ref().expect("set above");
                    let ip = node.ip().to_string();
                    let state = client.probe(&ip).await.map_err(|e| e.to_string())?;
                    let dry_run = if matches!(state, TalosNodeState::Configured { .. }) {
                        let (filled, bundle) = self.filled_talos_config(config)?;
                        let mut r = client
                            .apply_configuration(&ip, filled.as_bytes(), self.apply_mode()?, true, false)
                            .await
                            .map_err(|e| talos_secrets::redact(&e.to_string(), &bundle))?;
                        r.mode_details = talos_secrets::redact(&r.mode_details, &bundle);
                        Some(r)
                    } else {
                        None
                    };
                    observed
                        .nodes
                        .insert(node.name.clone(), NodeObserved::Talos { state, dry_run });
                }
            }
        }
        if let Some(kube) = self.kube()? {
            match kube.nodes().await {
                Ok(nodes) => observed.kube_nodes = nodes,
                Err(e) => notices.push(format!("the Kubernetes API did not answer: {e}")),
            }
        }
        Ok((observed, notices))
    }

    fn artifact(&self, node: &str, kind: ArtifactKind) -> Option<&'a str> {
        self.artifacts
            .iter()
            .find(|a| a.node == node && a.kind == kind)
            .map(|a| a.content.as_str())
    }

    fn apply_mode(&self) -> Result<TalosApplyMode, String> {
        let mode = self.desired.cluster.talos.apply_mode.as_deref().unwrap_or("auto");
        TalosApplyMode::parse(mode)
            .ok_or_else(|| format!("talos.apply_mode `{mode}` is not auto, no-reboot, reboot, staged or try"))
    }

    // ---- steps ----

    async fn run_step(&self, step: &Step, log: &mut Vec<String>) -> Result<(), String> {
        let node = self.node(&step.node)?;
        match &step.action {
            Action::K3sInstall { version, .. } => self.k3s_install(node, version, log).await,
            Action::K3sConfigure {
                restart,
                kubeconfig,
                config,
                ..
            } => {
                self.k3s_configure(node, config, !restart.is_empty(), *kubeconfig, log)
                    .await
            }
            Action::TalosApply {
                maintenance, config, ..
            } => self.talos_apply(node, config, *maintenance, log).await,
            Action::TalosBootstrap => self.talos_bootstrap(node, log).await,
            Action::NodeMetadata { .. } => self.node_metadata(node, log).await,
            _ => Err("not a cluster step".into()),
        }
    }

    async fn k3s_install(&self, node: &Node, version: &str, log: &mut Vec<String>) -> Result<(), String> {
        let shell = self.node_shell(node)?;
        self.wait_reachable(node, &shell).await?;
        let fail = |e: ShellError| format!("installing K3s {version} ({}): {e}", shell.describe());
        match (&self.desired.cluster.k3s.binary, &shell) {
            (Some(binary), AnyNode::Lxc(lxc)) => {
                let dir = binary.rsplit_once('/').map(|(d, _)| d).unwrap_or(".");
                for (src, dest) in [
                    (binary.clone(), "/usr/local/bin/k3s"),
                    (format!("{dir}/install.sh"), "/usr/local/bin/k3s-install.sh"),
                ] {
                    let mut argv = self.settings.pct_command.clone();
                    argv.extend([
                        "push".into(),
                        node.vmid.to_string(),
                        src,
                        lxc.path(dest),
                        "--perms".into(),
                        "0755".into(),
                    ]);
                    let host = lxc.host;
                    let out = host.run(&node.proxmox_node, &argv, b"").await.map_err(&fail)?;
                    if out.status != 0 {
                        return Err(format!(
                            "pct push of {dest} to {} failed ({}): {}",
                            node.name,
                            out.status,
                            String::from_utf8_lossy(&out.stderr).trim()
                        ));
                    }
                }
                k3s::install_airgap(&shell, &node.role).await.map_err(&fail)?;
                log.push(format!("installed k3s from {binary}"));
            }
            (Some(_), AnyNode::Ssh(_)) => {
                return Err(format!(
                    "{}: k3s.binary is pushed through the Proxmox host and works for containers only",
                    node.name
                ));
            }
            (None, _) => {
                k3s::install(&shell, version, &node.role).await.map_err(&fail)?;
                log.push(format!("installed k3s {version}"));
            }
        }
        Ok(())
    }

    /// A VM just started takes a while to answer SSH: wait for it, within the gate timeout.
    async fn wait_reachable(&self, node: &Node, shell: &AnyNode<'_, H>) -> Result<(), String> {
        if matches!(shell, AnyNode::Lxc(_)) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.settings.gate_timeout;
        loop {
            match k3s::observe(shell, "").await {
                Ok(_) => return Ok(()),
                Err(ShellError::Connect { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(self.settings.gate_interval).await;
                }
                Err(e) => return Err(format!("{} ({}) is not reachable: {e}", node.name, shell.describe())),
            }
        }
    }

    async fn k3s_configure(
        &self,
        node: &Node,
        config: &str,
        planned_restart: bool,
        kubeconfig: bool,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        let shell = self.node_shell(node)?;
        let token = if super::plan::needs_token(self.desired, node) {
            Some(self.join_token().await?.ok_or_else(|| {
                format!(
                    "{} needs the join token, and no server has one yet (and no k3s.token secret is set)",
                    node.name
                )
            })?)
        } else {
            None
        };
        let done = k3s::configure(&shell, &node.role, config, token.as_ref(), planned_restart)
            .await
            .map_err(|e| format!("{} ({}): {e}", node.name, shell.describe()))?;
        for path in &done.written {
            log.push(if *path == k3s::TOKEN_PATH {
                "wrote the join token".to_string()
            } else {
                format!("wrote {path}")
            });
        }
        if !done.restarted {
            log.push("config unchanged: no restart".into());
            return Ok(());
        }
        log.push(format!("restarted {}", k3s::service(&node.role)));
        if kubeconfig
            || !self.kubeconfig_path().exists() && self.first_control_plane().is_some_and(|n| n.name == node.name)
        {
            self.fetch_k3s_kubeconfig(node, &shell, log).await?;
        }
        self.gate(&node.name, log).await
    }

    /// Copy /etc/rancher/k3s/k3s.yaml from the server into the secrets directory, its server
    /// address set to the node's (K3s writes 127.0.0.1).
    async fn fetch_k3s_kubeconfig(
        &self,
        node: &Node,
        shell: &AnyNode<'_, H>,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + self.settings.gate_timeout;
        let bytes = loop {
            match shell.read_file(k3s::KUBECONFIG_PATH).await {
                Ok(Some(b)) => break b,
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(self.settings.gate_interval).await;
                }
                Ok(None) => return Err(format!("{} wrote no {} in time", node.name, k3s::KUBECONFIG_PATH)),
                Err(e) => return Err(format!("reading {} on {}: {e}", k3s::KUBECONFIG_PATH, node.name)),
            }
        };
        let text = String::from_utf8(bytes).map_err(|_| "the kubeconfig is not text".to_string())?;
        let text = text.replace("https://127.0.0.1:6443", &format!("https://{}:6443", node.ip()));
        self.write_secret_file(KUBECONFIG_FILE, text.as_bytes())?;
        log.push(format!("kubeconfig saved to {}", self.kubeconfig_path().display()));
        Ok(())
    }

    async fn talos_apply(
        &self,
        node: &Node,
        config: &str,
        planned_maintenance: bool,
        log: &mut Vec<String>,
    ) -> Result<(), String> {
        let client = self.talos()?;
        let ip = node.ip().to_string();
        let (filled, bundle) = self.filled_talos_config(config)?;
        // The plan may be older than the node: ask again which API it speaks now, waiting
        // for a VM that was just started to bring its API up.
        let deadline = tokio::time::Instant::now() + self.settings.gate_timeout;
        let maintenance = loop {
            match client.probe(&ip).await {
                Ok(TalosNodeState::Maintenance) => break true,
                Ok(TalosNodeState::Configured { .. }) => break false,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(self.settings.gate_interval).await;
                }
                Err(e) => {
                    let expected = if planned_maintenance {
                        "in maintenance mode"
                    } else {
                        "over mTLS"
                    };
                    return Err(format!("{}: the Talos API never answered ({expected}): {e}", node.name));
                }
            }
        };
        let mode = if maintenance {
            TalosApplyMode::Auto
        } else {
            self.apply_mode()?
        };
        let r = client
            .apply_configuration(&ip, filled.as_bytes(), mode, false, maintenance)
            .await
            .map_err(|e| talos_secrets::redact(&e.to_string(), &bundle))?;
        log.push(format!(
            "config applied{} (mode {})",
            if maintenance { " in maintenance mode" } else { "" },
            r.mode
        ));
        for w in r.warnings {
            log.push(format!("talos warning: {}", talos_secrets::redact(&w, &bundle)));
        }
        if self.kubeconfig_path().exists() && mode != TalosApplyMode::Staged {
            self.gate(&node.name, log).await?;
        }
        Ok(())
    }

    async fn talos_bootstrap(&self, node: &Node, log: &mut Vec<String>) -> Result<(), String> {
        let client = self.talos()?;
        let ip = node.ip().to_string();
        let deadline = tokio::time::Instant::now() + self.settings.gate_timeout;
        // A control plane node that just took its first config reboots into it: wait for mTLS.
        loop {
            match client.probe(&ip).await {
                Ok(TalosNodeState::Configured { .. }) => break,
                _ if tokio::time::Instant::now() < deadline => tokio::time::sleep(self.settings.gate_interval).await,
                Ok(state) => return Err(format!("{} is still {state:?} after its config was applied", node.name)),
                Err(e) => return Err(e.to_string()),
            }
        }
        let fresh = client.bootstrap(&ip).await.map_err(|e| e.to_string())?;
        log.push(if fresh {
            "etcd bootstrapped".into()
        } else {
            "etcd was already bootstrapped".into()
        });
        let kubeconfig = client.kubeconfig(&ip).await.map_err(|e| e.to_string())?;
        self.write_secret_file(KUBECONFIG_FILE, &kubeconfig)?;
        log.push(format!("kubeconfig saved to {}", self.kubeconfig_path().display()));
        self.gate(&node.name, log).await
    }

    async fn node_metadata(&self, node: &Node, log: &mut Vec<String>) -> Result<(), String> {
        let kube = self
            .kube()?
            .ok_or("no kubeconfig: the cluster has not been set up yet")?;
        let live = kube
            .nodes()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|k| k.name == node.name)
            .ok_or_else(|| format!("{} is not a Kubernetes node", node.name))?;
        match metadata_step(node, &live) {
            Some(Step {
                action: Action::NodeMetadata { patch, changes },
                ..
            }) => {
                kube.patch_node(&node.name, &patch).await.map_err(|e| e.to_string())?;
                log.push(format!(
                    "set {}",
                    changes.iter().map(|c| c.key.as_str()).collect::<Vec<_>>().join(", ")
                ));
            }
            _ => log.push("labels and taints already as declared".into()),
        }
        Ok(())
    }

    /// The cluster health view: /readyz, nodes, the server's node-token (K3s), kube-system pods.
    pub async fn health(&self) -> Result<super::health::Health, String> {
        use super::health::{Health, K3S_SYSTEM_PODS, TALOS_SYSTEM_PODS};
        let kube = self.kube()?.ok_or_else(|| {
            format!(
                "no kubeconfig in {}: apply the cluster first",
                self.settings.secrets.dir.display()
            )
        })?;
        let api_not_ready = kube.readyz().await.err().map(|e| e.to_string());
        let nodes = kube.nodes().await.map_err(|e| e.to_string())?;
        let missing_nodes = self
            .desired
            .nodes
            .iter()
            .filter(|d| !nodes.iter().any(|n| n.name == d.name))
            .map(|d| d.name.clone())
            .collect();
        let system_pods = kube.pods("kube-system").await.map_err(|e| e.to_string())?;
        let (expected, node_token_present): (&[&str], _) = match self.desired.cluster.distribution {
            Distribution::K3s => {
                let present = match self.first_control_plane() {
                    // Read, not printed: only whether it is there and not empty is kept.
                    Some(first) => self
                        .node_shell(first)?
                        .read_file(k3s::SERVER_TOKEN_PATH)
                        .await
                        .map(|t| t.is_some_and(|t| !t.is_empty()))
                        .ok(),
                    None => None,
                };
                (&K3S_SYSTEM_PODS, present)
            }
            Distribution::Talos => (&TALOS_SYSTEM_PODS, None),
        };
        Ok(Health {
            cluster: self.desired.cluster.name.clone(),
            api_not_ready,
            nodes,
            missing_nodes,
            node_token_present,
            missing_pods: Health::missing(expected, &system_pods),
            system_pods,
        })
    }

    /// The health gate: the node is Ready and the API server's /readyz answers `ok`, within
    /// the gate timeout; otherwise the wave stops with the last reason seen.
    pub async fn gate(&self, node: &str, log: &mut Vec<String>) -> Result<(), String> {
        let kube = self
            .kube()?
            .ok_or_else(|| format!("cannot check that {node} is Ready: no kubeconfig yet"))?;
        let started = tokio::time::Instant::now();
        let deadline = started + self.settings.gate_timeout;
        let mut last;
        loop {
            last = match kube.nodes().await {
                Ok(nodes) => match nodes.iter().find(|n| n.name == node) {
                    Some(n) if n.ready => match kube.readyz().await {
                        Ok(()) => {
                            log.push(format!(
                                "{node} Ready, API ready ({} ms)",
                                started.elapsed().as_millis()
                            ));
                            return Ok(());
                        }
                        Err(e) => format!("the API server is not ready: {e}"),
                    },
                    Some(n) => format!(
                        "not Ready: {}",
                        n.not_ready_reason.as_deref().unwrap_or("no reason given")
                    ),
                    None => "not registered with the API server".to_string(),
                },
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "health gate: {node} did not become Ready within {} s ({last}); the wave stops here",
                    self.settings.gate_timeout.as_secs()
                ));
            }
            tokio::time::sleep(self.settings.gate_interval).await;
        }
    }
}

impl<H: HostShell> ClusterSteps for ClusterAccess<'_, H> {
    fn run<'a>(&'a self, step: &'a Step, log: &'a mut Vec<String>) -> StepFuture<'a> {
        Box::pin(self.run_step(step, log))
    }

    fn after_guest_step<'a>(&'a self, step: &'a Step, log: &'a mut Vec<String>) -> StepFuture<'a> {
        Box::pin(async move {
            // Only a node that is a member of a running cluster is waited for.
            let Some(kube) = self.kube()? else { return Ok(()) };
            let member = kube
                .nodes()
                .await
                .map(|nodes| nodes.iter().any(|n| n.name == step.node))
                .unwrap_or(false);
            if member {
                self.gate(&step.node, log).await
            } else {
                Ok(())
            }
        })
    }
}
