//! The cluster layer's effectful half: observe the nodes (K3s over the node shell, Talos over
//! its API) and the Kubernetes API, run the cluster steps of a plan, and hold the health
//! gates between them.
//!
//! Secrets: the K3s join token (a named secret, or the first server's node-token read for
//! this run) and the Talos secrets bundle are held in memory and sent as file contents or
//! gRPC payloads only. The kubeconfig and talosconfig are files in the secrets directory.
//! Every error message is built from names, paths and exit statuses, never from values.

use std::path::PathBuf;

use super::k3s::{self, K3sObserved};
use super::plan::{ClusterObserved, NodeObserved, metadata_step};
use super::talos_secrets::{self, TalosSecrets, TalosSecretsError};
use crate::apply::{ClusterSteps, StepFuture};
use crate::model::schema::{Distribution, GuestKind};
use crate::model::{Desired, Node};
use crate::plan::{Action, Observed, Step};
use crate::ports::{
    ClusterConnector, KubeApi, KubeError, NodeShell, NodeTarget, ShellError, System, TalosApi, TalosApplyMode,
    TalosError, TalosNodeState,
};
use crate::render::{Artifact, ArtifactKind};
use crate::secrets::{Secret, SecretError, SecretStore};
use crate::settings::ClusterSettings;

pub const KUBECONFIG_FILE: &str = "kubeconfig";
pub const TALOSCONFIG_FILE: &str = "talosconfig";

/// What went wrong in the cluster layer, and with which system. Messages are built from names,
/// paths and exit statuses: never from a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A command or file operation on a node (through the Proxmox host or over SSH).
    #[error("{node} ({via}): {source}")]
    Node {
        node: String,
        via: String,
        #[source]
        source: Box<ShellError>,
    },
    /// The trusted state does not name this node (as this guest): it is not reached.
    #[error("{node}: not a node of the trusted state (the watched branch), so driftless does not reach it")]
    NotTrusted { node: String },
    /// The node cannot be reached at all with this run's settings.
    #[error("{node}: {}", if *container {
        "reaching a container needs the Proxmox host shell (proxmox.hosts in cluster.yaml)"
    } else {
        "this VM is not a node of the trusted state, so it is not reached over SSH"
    })]
    NoNodeShell { node: String, container: bool },
    #[error("{0}")]
    Kube(#[from] KubeError),
    /// The Talos API of a node failed, or what answers at its address is not the cluster's.
    #[error("{node}: {error}")]
    Talos { node: String, error: TalosError },
    /// A node in maintenance mode that may not be sent its config (see
    /// [`maintenance_refusal`](super::plan::maintenance_refusal)): the message says how to allow it.
    #[error("{node}: {message}")]
    TalosRefused { node: String, message: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// A file of the secrets directory (kubeconfig, talosconfig) cannot be read or written.
    #[error("{0}")]
    SecretsDir(String),
    /// A health gate that did not pass in time: the wave stops.
    #[error("health gate: {node} did not become Ready within {secs} s ({last}); the wave stops here")]
    Gate { node: String, secs: u64, last: String },
    /// An add-on did not apply or did not get healthy.
    #[error(transparent)]
    Addon(#[from] crate::addons::apply::AddonError),
    /// Not every node got Ready after the CNI wave.
    #[error("health gate: {nodes} not Ready within {secs} s ({last}){why}; the apply stops here")]
    NodesNotReady {
        nodes: String,
        secs: u64,
        last: String,
        why: String,
    },
    /// The repository asks for something this layer cannot do: retrying does not help.
    #[error("{0}")]
    Config(String),
    /// A system did something unexpected (a node wrote no kubeconfig, Talos never answered).
    #[error("{message}")]
    Failed { system: System, message: String },
}

impl ClusterError {
    /// The system this failure is blamed on.
    pub fn system(&self) -> System {
        match self {
            ClusterError::Node { .. } | ClusterError::NoNodeShell { .. } => System::Ssh,
            ClusterError::NotTrusted { .. } => System::Repository,
            ClusterError::Kube(_)
            | ClusterError::Gate { .. }
            | ClusterError::Addon(_)
            | ClusterError::NodesNotReady { .. } => System::Kubernetes,
            ClusterError::Talos { .. } | ClusterError::TalosRefused { .. } => System::Talos,
            ClusterError::Secret(_) | ClusterError::SecretsDir(_) => System::Secrets,
            ClusterError::Config(_) => System::Repository,
            ClusterError::Failed { system, .. } => *system,
        }
    }

    /// Whether another attempt can succeed without a change to the repository or settings.
    pub fn retryable(&self) -> bool {
        match self {
            ClusterError::Node { source, .. } => source.retryable(),
            ClusterError::Kube(e) => e.retryable(),
            ClusterError::Talos { error, .. } => error.retryable(),
            ClusterError::Addon(e) => e.retryable(),
            ClusterError::Gate { .. } | ClusterError::Failed { .. } | ClusterError::NodesNotReady { .. } => true,
            ClusterError::NoNodeShell { .. }
            | ClusterError::NotTrusted { .. }
            | ClusterError::TalosRefused { .. }
            | ClusterError::Secret(_)
            | ClusterError::SecretsDir(_)
            | ClusterError::Config(_) => false,
        }
    }

    fn shell_failed(message: impl Into<String>) -> ClusterError {
        ClusterError::Failed {
            system: System::Ssh,
            message: message.into(),
        }
    }

    fn talos_failed(message: impl Into<String>) -> ClusterError {
        ClusterError::Failed {
            system: System::Talos,
            message: message.into(),
        }
    }

    fn kube_failed(message: impl Into<String>) -> ClusterError {
        ClusterError::Failed {
            system: System::Kubernetes,
            message: message.into(),
        }
    }

    fn talos(node: &Node, error: TalosError) -> ClusterError {
        ClusterError::Talos {
            node: node.name.clone(),
            error,
        }
    }

    fn node(node: &str, shell: &impl NodeShell, source: ShellError) -> ClusterError {
        ClusterError::Node {
            node: node.to_string(),
            via: shell.describe(),
            source: Box::new(source),
        }
    }
}

impl From<TalosSecretsError> for ClusterError {
    fn from(e: TalosSecretsError) -> Self {
        ClusterError::Config(e.to_string())
    }
}

/// The cluster layer for one run: the nodes, the Kubernetes API and the Talos API, reached
/// through `connector`.
///
/// `desired` is what is planned; `trusted` decides what is reached: a node is contacted only
/// as the trusted state names it (same vmid, kind and Proxmox node; at its trusted address),
/// and observed only when its guest carries the trusted ownership tag (or the trusted node
/// file adopts it). For the watched branch and one-shot commands the two are the same; for a
/// pull request, `trusted` is the watched branch's last valid revision.
pub struct ClusterAccess<'a, C: ClusterConnector> {
    pub desired: &'a Desired,
    pub trusted: &'a Desired,
    pub artifacts: &'a [Artifact],
    pub connector: &'a C,
    pub settings: ClusterSettings,
    /// Where the kubeconfig and talosconfig are kept, and the secrets the repository names.
    pub secrets: SecretStore,
    /// The join token once read (from the secret or the first server).
    token: tokio::sync::Mutex<Option<Secret>>,
}

/// How the connector reaches a node.
pub fn target(node: &Node) -> NodeTarget {
    NodeTarget {
        name: node.name.clone(),
        container: node.kind == GuestKind::Lxc,
        vmid: node.vmid,
        pve_node: node.proxmox_node.clone(),
    }
}

impl<'a, C: ClusterConnector> ClusterAccess<'a, C> {
    pub fn new(
        desired: &'a Desired,
        trusted: &'a Desired,
        artifacts: &'a [Artifact],
        connector: &'a C,
        settings: ClusterSettings,
        secrets: SecretStore,
    ) -> Self {
        ClusterAccess {
            desired,
            trusted,
            artifacts,
            connector,
            settings,
            secrets,
            token: tokio::sync::Mutex::new(None),
        }
    }

    /// The node as the trusted state names it: the same guest, at its trusted address. A
    /// node the trusted state does not name (or names as another guest) is never reached.
    fn trusted_node(&self, node: &Node) -> Result<&'a Node, ClusterError> {
        self.trusted
            .node(&node.name)
            .filter(|t| t.vmid == node.vmid && t.kind == node.kind && t.proxmox_node == node.proxmox_node)
            .ok_or_else(|| ClusterError::NotTrusted {
                node: node.name.clone(),
            })
    }

    fn node_shell(&self, node: &Node) -> Result<C::Node<'a>, ClusterError> {
        let node = self.trusted_node(node)?;
        self.connector
            .node_shell(&target(node))
            .ok_or_else(|| ClusterError::NoNodeShell {
                node: node.name.clone(),
                container: node.kind == GuestKind::Lxc,
            })
    }

    /// The trusted node to observe for `node`, when its guest runs and is driftless's: tagged
    /// with the trusted ownership tag, or adopted by the trusted node file.
    fn observable(&self, node: &Node, guests: &Observed) -> Option<&'a Node> {
        let trusted = self.trusted_node(node).ok()?;
        let tag = &self.trusted.cluster.reconcile.ownership_tag;
        let guest = guests
            .guests
            .iter()
            .find(|g| g.vmid == trusted.vmid && g.node == trusted.proxmox_node && g.status == "running")?;
        (trusted.adopt || guest.tags.iter().any(|t| t.eq_ignore_ascii_case(tag))).then_some(trusted)
    }

    fn node(&self, name: &str) -> Result<&'a Node, ClusterError> {
        self.desired
            .node(name)
            .ok_or_else(|| ClusterError::Config(format!("{name} is in no node file")))
    }

    fn first_control_plane(&self) -> Option<&'a Node> {
        self.desired.control_plane().next()
    }

    /// The first server of the trusted state: where the join token is read.
    fn trusted_first_server(&self) -> Option<&'a Node> {
        self.trusted.control_plane().next()
    }

    fn kubeconfig_path(&self) -> PathBuf {
        self.secrets.dir.join(KUBECONFIG_FILE)
    }

    /// The Kubernetes API, once the cluster has written a kubeconfig.
    fn kube(&self) -> Result<Option<C::Kube>, ClusterError> {
        let path = self.kubeconfig_path();
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(None);
        };
        self.connector
            .kube(&bytes)
            .map(Some)
            .map_err(|e| ClusterError::SecretsDir(format!("the kubeconfig in {} is unusable: {e}", path.display())))
    }

    /// Write a file of the secrets directory with mode 0600, atomically.
    fn write_secret_file(&self, name: &str, contents: &[u8]) -> Result<(), ClusterError> {
        use std::io::Write;
        let fail = |e: &dyn std::fmt::Display| ClusterError::SecretsDir(format!("cannot write {name}: {e}"));
        let dir = &self.secrets.dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| ClusterError::SecretsDir(format!("cannot create {}: {e}", dir.display())))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| ClusterError::SecretsDir(format!("{}: {e}", dir.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600));
        }
        tmp.write_all(contents)
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(|e| fail(&e))?;
        tmp.persist(dir.join(name)).map_err(|e| fail(&e.error))?;
        Ok(())
    }

    // ---- Talos credentials ----

    fn talos_bundle(&self) -> Result<(String, TalosSecrets), ClusterError> {
        let name = self
            .desired
            .cluster
            .talos
            .secrets
            .as_ref()
            .map(|s| s.secret.clone())
            .ok_or_else(|| {
                ClusterError::Config(
                    "talos.secrets is not set in cluster.yaml: the secrets bundle names a secret".into(),
                )
            })?;
        let value = self.secrets.resolve(&name)?;
        let bundle = TalosSecrets::parse(value.expose())
            .map_err(|e| ClusterError::Config(format!("secret `{name}`: {e}")))?
            .with_name(&name);
        Ok((name, bundle))
    }

    /// The Talos API, with the talosconfig in the secrets directory, made from the bundle when
    /// missing. Only an apply (`keep`) saves a made one: a plan writes nothing, so a plan of
    /// anything (a pull request included) cannot leave a file that later runs use.
    fn talos(&self, keep: bool) -> Result<C::Talos, ClusterError> {
        let path = self.secrets.dir.join(TALOSCONFIG_FILE);
        let yaml = match std::fs::read(&path) {
            Ok(y) => y,
            Err(_) => {
                let (_, bundle) = self.talos_bundle()?;
                // Where the talosconfig sends its client certificate: trusted addresses only.
                let endpoints: Vec<String> = self.trusted.control_plane().map(|n| n.ip().to_string()).collect();
                let nodes: Vec<String> = self.trusted.nodes.iter().map(|n| n.ip().to_string()).collect();
                let text = talos_secrets::talosconfig(&bundle, &self.desired.cluster.name, &endpoints, &nodes)
                    .map_err(|e| ClusterError::Config(format!("cannot make the talosconfig: {e}")))?;
                if keep {
                    self.write_secret_file(TALOSCONFIG_FILE, text.as_bytes())?;
                }
                text.into_bytes()
            }
        };
        self.connector
            .talos(&yaml)
            .map_err(|e| ClusterError::SecretsDir(format!("the talosconfig in {} is unusable: {e}", path.display())))
    }

    fn filled_talos_config(&self, config: &str) -> Result<(String, TalosSecrets), ClusterError> {
        let (name, bundle) = self.talos_bundle()?;
        let filled = talos_secrets::fill(config, &name, &bundle)?;
        Ok((filled, bundle))
    }

    // ---- K3s join token ----

    async fn join_token(&self) -> Result<Option<Secret>, ClusterError> {
        let mut cached = self.token.lock().await;
        if cached.is_none() {
            *cached = self.read_join_token().await?;
        }
        Ok(cached.clone())
    }

    async fn read_join_token(&self) -> Result<Option<Secret>, ClusterError> {
        if let Some(s) = &self.desired.cluster.k3s.token {
            return Ok(Some(self.secrets.resolve(&s.secret)?));
        }
        match self.trusted_first_server() {
            Some(first) => self.read_node_token(first).await,
            None => Ok(None),
        }
    }

    /// The node-token a K3s server wrote at its first start; `None` before that.
    async fn read_node_token(&self, server: &Node) -> Result<Option<Secret>, ClusterError> {
        let shell = self.node_shell(server)?;
        match shell.read_file(k3s::SERVER_TOKEN_PATH).await {
            Ok(Some(bytes)) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| ClusterError::shell_failed("the server's node-token is not text"))?;
                Ok(Some(Secret::new(text.trim())))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(ClusterError::shell_failed(format!(
                "{}: cannot read the node-token: {e}",
                server.name
            ))),
        }
    }

    /// A `k3s.token` secret must be the token the first server was initialised with: K3s
    /// encrypts its bootstrap data with it, so a server restarted with another token does not
    /// start. Changing it is a rotation on the server, not a file driftless can write.
    async fn check_named_token(&self) -> Result<(), ClusterError> {
        let (Some(named), Some(first)) = (&self.desired.cluster.k3s.token, self.first_control_plane()) else {
            return Ok(());
        };
        let (Some(running), Some(wanted)) = (self.read_node_token(first).await?, self.join_token().await?) else {
            return Ok(());
        };
        if k3s::token_secret_part(wanted.expose()) == k3s::token_secret_part(running.expose()) {
            return Ok(());
        }
        Err(ClusterError::Config(format!(
            "k3s.token: the secret `{}` is not the token the cluster runs with ({}'s {}). K3s cannot take a \
             new token by a restart; rotate it on the server (`k3s token rotate --new-token ...`) and then \
             update the secret, or put the cluster's token in the secret",
            named.secret,
            first.name,
            k3s::SERVER_TOKEN_PATH
        )))
    }

    // ---- observe ----

    /// Read every node's K3s or Talos state, and the Kubernetes API when a kubeconfig exists.
    /// Nodes whose guest is not running are `NotRunning`; an unanswering Kubernetes API is a
    /// notice, not an error (the guests can still be planned).
    pub async fn observe(&self, guests: &Observed) -> Result<(ClusterObserved, Vec<String>), ClusterError> {
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
                    let Some(node) = self.observable(node, guests) else {
                        notices.push(not_observed(&node.name));
                        observed.nodes.insert(node.name.clone(), NodeObserved::NotOwned);
                        continue;
                    };
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
                            return Err(ClusterError::shell_failed(format!(
                                "{} ({}): cannot observe K3s: {e}",
                                node.name,
                                shell.describe()
                            )));
                        }
                    }
                }
                let first_installed = self.trusted_first_server().is_some_and(|n| {
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
                    let Some(node) = self.observable(node, guests) else {
                        notices.push(not_observed(&node.name));
                        observed.nodes.insert(node.name.clone(), NodeObserved::NotOwned);
                        continue;
                    };
                    let Some(config) = self.artifact(&node.name, ArtifactKind::TalosConfig) else {
                        continue;
                    };
                    if talos.is_none() {
                        talos = Some(self.talos(false)?);
                    }
                    let client = talos.as_ref().expect("set above");
                    let ip = node.ip().to_string();
                    // An address that answers with a certificate the cluster CA did not sign, and
                    // not as Talos's maintenance service: the plan stops here, naming the node.
                    let state = client.probe(&ip).await.map_err(|e| ClusterError::talos(node, e))?;
                    let dry_run = if matches!(&state, TalosNodeState::Configured { version }
                        if !super::plan::dry_run_waits_for_upgrade(version, &self.desired.cluster.version))
                    {
                        let (filled, bundle) = self.filled_talos_config(config)?;
                        let mut r = client
                            .apply_configuration(&ip, filled.as_bytes(), self.apply_mode()?, true, false)
                            .await
                            .map_err(|e| redacted(e, &bundle))?;
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
                Ok(nodes) => {
                    observed.kube_nodes = nodes;
                    // A pull request's objects are never sent to the cluster, not even as a dry run.
                    let trusted = std::ptr::eq(self.desired, self.trusted);
                    match crate::addons::apply::observe(&kube, self.desired, self.artifacts, trusted).await {
                        Ok(a) => observed.addons = a,
                        Err(e) => notices.push(format!("the add-ons could not be read: {e}")),
                    }
                }
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

    fn apply_mode(&self) -> Result<TalosApplyMode, ClusterError> {
        let mode = self.desired.cluster.talos.apply_mode.as_deref().unwrap_or("auto");
        TalosApplyMode::parse(mode).ok_or_else(|| {
            ClusterError::Config(format!(
                "talos.apply_mode `{mode}` is not auto, no-reboot, reboot, staged or try"
            ))
        })
    }

    // ---- steps ----

    async fn run_step(&self, step: &Step, log: &mut Vec<String>) -> Result<(), ClusterError> {
        match &step.action {
            Action::Addon { addon, manifests, .. } => return self.apply_addon(addon, manifests, log).await,
            Action::AddonRemove { addon, .. } => {
                let kube = self.kube_for_addons()?;
                return Ok(crate::addons::apply::remove(&kube, addon, log).await?);
            }
            Action::NodesReady { .. } => return self.all_nodes_ready(log).await,
            _ => {}
        }
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
            Action::TalosUpgrade { refused: Some(why), .. } | Action::KubernetesUpgrade { refused: why, .. } => {
                Err(ClusterError::Config(format!("{}: {why}", node.name)))
            }
            Action::TalosUpgrade { to, image, .. } => self.talos_upgrade(node, to, image, log).await,
            Action::NodeMetadata { .. } => self.node_metadata(node, log).await,
            _ => Err(ClusterError::Config("not a cluster step".into())),
        }
    }

    async fn k3s_install(&self, node: &Node, version: &str, log: &mut Vec<String>) -> Result<(), ClusterError> {
        let shell = self.node_shell(node)?;
        self.wait_reachable(node, &shell).await?;
        let fail =
            |e: ShellError| ClusterError::shell_failed(format!("installing K3s {version} ({}): {e}", shell.describe()));
        match &self.desired.cluster.k3s.binary {
            Some(_) if shell.may_be_booting() => {
                return Err(ClusterError::Config(format!(
                    "{}: k3s.binary is pushed through the Proxmox host and works for containers only",
                    node.name
                )));
            }
            Some(binary) => {
                let dir = binary.rsplit_once('/').map(|(d, _)| d).unwrap_or(".");
                for (src, dest) in [
                    (binary.clone(), "/usr/local/bin/k3s"),
                    (format!("{dir}/install.sh"), "/usr/local/bin/k3s-install.sh"),
                ] {
                    shell
                        .push_from_host(&src, dest, 0o755)
                        .await
                        .map_err(|e| ClusterError::node(&node.name, &shell, e))?;
                }
                k3s::install_airgap(&shell, &node.role).await.map_err(fail)?;
                log.push(format!("installed k3s from {binary}"));
            }
            None => {
                k3s::install(&shell, version, &node.role).await.map_err(fail)?;
                log.push(format!("installed k3s {version}"));
            }
        }
        Ok(())
    }

    /// A VM just started takes a while to answer SSH: wait for it, within the gate timeout.
    async fn wait_reachable(&self, node: &Node, shell: &C::Node<'a>) -> Result<(), ClusterError> {
        if !shell.may_be_booting() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.settings.gate_timeout;
        loop {
            match k3s::observe(shell, "").await {
                Ok(_) => return Ok(()),
                Err(ShellError::Connect { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(self.settings.gate_interval).await;
                }
                Err(e) => {
                    return Err(ClusterError::shell_failed(format!(
                        "{} ({}) is not reachable: {e}",
                        node.name,
                        shell.describe()
                    )));
                }
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
    ) -> Result<(), ClusterError> {
        let shell = self.node_shell(node)?;
        let token = if super::plan::needs_token(self.desired, node) {
            Some(self.join_token().await?.ok_or_else(|| {
                ClusterError::shell_failed(format!(
                    "{} needs the join token, and no server has one yet (and no k3s.token secret is set)",
                    node.name
                ))
            })?)
        } else {
            None
        };
        let done = k3s::configure(&shell, &node.role, config, token.as_ref(), planned_restart)
            .await
            .map_err(|e| ClusterError::node(&node.name, &shell, e))?;
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
        shell: &C::Node<'a>,
        log: &mut Vec<String>,
    ) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + self.settings.gate_timeout;
        let bytes = loop {
            match shell.read_file(k3s::KUBECONFIG_PATH).await {
                Ok(Some(b)) => break b,
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(self.settings.gate_interval).await;
                }
                Ok(None) => {
                    return Err(ClusterError::shell_failed(format!(
                        "{} wrote no {} in time",
                        node.name,
                        k3s::KUBECONFIG_PATH
                    )));
                }
                Err(e) => {
                    return Err(ClusterError::shell_failed(format!(
                        "reading {} on {}: {e}",
                        k3s::KUBECONFIG_PATH,
                        node.name
                    )));
                }
            }
        };
        let text = String::from_utf8(bytes).map_err(|_| ClusterError::shell_failed("the kubeconfig is not text"))?;
        let text = text.replace("https://127.0.0.1:6443", &format!("https://{}:6443", node.ip()));
        self.write_secret_file(KUBECONFIG_FILE, text.as_bytes())?;
        log.push(format!("kubeconfig saved to {}", self.kubeconfig_path().display()));
        Ok(())
    }

    /// Send the node its config: over mTLS when it answers as a configured node of the cluster;
    /// in maintenance mode (unauthenticated) only when the plan's step allows it
    /// (`maintenance_allowed`: this apply creates the VM, or the node file says
    /// `talos.maintenance_apply`), refused otherwise.
    async fn talos_apply(
        &self,
        node: &Node,
        config: &str,
        maintenance_allowed: bool,
        log: &mut Vec<String>,
    ) -> Result<(), ClusterError> {
        let client = self.talos(true)?;
        let ip = node.ip().to_string();
        let (filled, bundle) = self.filled_talos_config(config)?;
        // The plan may be older than the node: ask again which API it speaks now, waiting
        // for a VM that was just started to bring its API up.
        let deadline = tokio::time::Instant::now() + self.settings.gate_timeout;
        let maintenance = loop {
            match client.probe(&ip).await {
                Ok(TalosNodeState::Maintenance) if maintenance_allowed => break true,
                Ok(TalosNodeState::Maintenance) => {
                    return Err(ClusterError::TalosRefused {
                        node: node.name.clone(),
                        message: super::plan::maintenance_refusal(node),
                    });
                }
                Ok(TalosNodeState::Configured { .. }) => break false,
                Err(e) if e.retryable() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(self.settings.gate_interval).await;
                }
                Err(e) if e.retryable() => {
                    let expected = if maintenance_allowed {
                        "in maintenance mode"
                    } else {
                        "over mTLS"
                    };
                    return Err(ClusterError::talos_failed(format!(
                        "{}: the Talos API never answered ({expected}): {e}",
                        node.name
                    )));
                }
                Err(e) => return Err(ClusterError::talos(node, e)),
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
            .map_err(|e| redacted(e, &bundle))?;
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

    async fn talos_bootstrap(&self, node: &Node, log: &mut Vec<String>) -> Result<(), ClusterError> {
        let client = self.talos(true)?;
        let ip = node.ip().to_string();
        let deadline = tokio::time::Instant::now() + self.settings.gate_timeout;
        // A control plane node that just took its first config reboots into it: wait for mTLS.
        loop {
            match client.probe(&ip).await {
                Ok(TalosNodeState::Configured { .. }) => break,
                Err(e) if !e.retryable() => return Err(ClusterError::talos(node, e)),
                _ if tokio::time::Instant::now() < deadline => tokio::time::sleep(self.settings.gate_interval).await,
                Ok(state) => {
                    return Err(ClusterError::talos_failed(format!(
                        "{} is still {state:?} after its config was applied",
                        node.name
                    )));
                }
                Err(e) => return Err(ClusterError::talos(node, e)),
            }
        }
        let fresh = client.bootstrap(&ip).await.map_err(|e| ClusterError::talos(node, e))?;
        log.push(if fresh {
            "etcd bootstrapped".into()
        } else {
            "etcd was already bootstrapped".into()
        });
        let kubeconfig = client.kubeconfig(&ip).await.map_err(|e| ClusterError::talos(node, e))?;
        self.write_secret_file(KUBECONFIG_FILE, &kubeconfig)?;
        log.push(format!("kubeconfig saved to {}", self.kubeconfig_path().display()));
        self.gate(&node.name, log).await
    }

    /// `talosctl upgrade` one node: ask again which version runs (the plan may be older), send
    /// Upgrade with the installer image, then wait, within the gate timeout, until the node
    /// answers over mTLS with the new version (it is unreachable while it reboots), and
    /// until it is Ready again.
    async fn talos_upgrade(
        &self,
        node: &Node,
        to: &str,
        image: &str,
        log: &mut Vec<String>,
    ) -> Result<(), ClusterError> {
        let client = self.talos(true)?;
        let ip = node.ip().to_string();
        let from = match client.probe(&ip).await.map_err(|e| ClusterError::talos(node, e))? {
            TalosNodeState::Configured { version } => version,
            TalosNodeState::Maintenance => {
                return Err(ClusterError::talos_failed(format!(
                    "{}: answers in maintenance mode, not as the configured node to upgrade",
                    node.name
                )));
            }
        };
        if from == to {
            log.push(format!("Talos {to} runs already"));
        } else {
            let ack = client
                .upgrade(&ip, image)
                .await
                .map_err(|e| ClusterError::talos(node, e))?;
            // The node's own words, bounded: what a node answers is not trusted.
            let ack: String = ack
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .chars()
                .take(200)
                .collect();
            log.push(format!("upgrade {from} -> {to} with {image} accepted ({ack})"));
            let started = tokio::time::Instant::now();
            let deadline = started + self.settings.gate_timeout;
            let mut last;
            loop {
                tokio::time::sleep(self.settings.gate_interval).await;
                last = match client.probe(&ip).await {
                    Ok(TalosNodeState::Configured { version }) if version == to => break,
                    Ok(TalosNodeState::Configured { version }) => format!("it still runs {version}"),
                    Ok(TalosNodeState::Maintenance) => "it answers in maintenance mode".to_string(),
                    Err(e) if e.retryable() => format!("rebooting: {e}"),
                    Err(e) => return Err(ClusterError::talos(node, e)),
                };
                if tokio::time::Instant::now() >= deadline {
                    return Err(ClusterError::talos_failed(format!(
                        "{}: Talos did not come back with {to} within {} s ({last}); the wave stops here",
                        node.name,
                        self.settings.gate_timeout.as_secs()
                    )));
                }
            }
            log.push(format!(
                "{} runs Talos {to} ({} ms)",
                node.name,
                started.elapsed().as_millis()
            ));
        }
        if self.kubeconfig_path().exists() {
            self.gate(&node.name, log).await?;
        }
        Ok(())
    }

    async fn node_metadata(&self, node: &Node, log: &mut Vec<String>) -> Result<(), ClusterError> {
        let kube = self
            .kube()?
            .ok_or_else(|| ClusterError::kube_failed("no kubeconfig: the cluster has not been set up yet"))?;
        let live = kube
            .nodes()
            .await?
            .into_iter()
            .find(|k| k.name == node.name)
            .ok_or_else(|| ClusterError::kube_failed(format!("{} is not a Kubernetes node", node.name)))?;
        match metadata_step(node, &live) {
            Some(Step {
                action: Action::NodeMetadata { patch, changes },
                ..
            }) => {
                kube.patch_node(&node.name, &patch).await?;
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
    pub async fn health(&self) -> Result<super::health::Health, ClusterError> {
        use super::health::{Health, K3S_SYSTEM_PODS, TALOS_SYSTEM_PODS};
        let kube = self.kube()?.ok_or_else(|| {
            ClusterError::kube_failed(format!(
                "no kubeconfig in {}: apply the cluster first",
                self.secrets.dir.display()
            ))
        })?;
        let api_not_ready = kube.readyz().await.err().map(|e| e.to_string());
        let nodes = kube.nodes().await?;
        let missing_nodes = self
            .desired
            .nodes
            .iter()
            .filter(|d| !nodes.iter().any(|n| n.name == d.name))
            .map(|d| d.name.clone())
            .collect();
        let system_pods = kube.pods("kube-system").await?;
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

    // ---- add-ons ----

    fn kube_for_addons(&self) -> Result<C::Kube, ClusterError> {
        self.kube()?
            .ok_or_else(|| ClusterError::kube_failed("no kubeconfig: the cluster has not been set up yet"))
    }

    fn waits(&self) -> crate::addons::apply::Waits {
        crate::addons::apply::Waits {
            timeout: self.settings.gate_timeout,
            interval: self.settings.gate_interval,
        }
    }

    async fn apply_addon(&self, name: &str, manifests: &str, log: &mut Vec<String>) -> Result<(), ClusterError> {
        let addon = self
            .desired
            .cluster
            .addons
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| ClusterError::Config(format!("add-on {name} is not declared")))?;
        let kube = self.kube_for_addons()?;
        // The API server must answer before anything is applied (a fresh Talos cluster has
        // no CNI yet, so its nodes are not Ready: only the API is waited for).
        self.api_ready(&kube, log).await?;
        let prune = self.desired.cluster.reconcile.prune;
        crate::addons::apply::apply(&kube, addon, manifests, prune, self.waits(), log).await?;
        Ok(())
    }

    /// /readyz answers `ok`, within the gate timeout.
    async fn api_ready(&self, kube: &C::Kube, log: &mut Vec<String>) -> Result<(), ClusterError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.settings.gate_timeout;
        loop {
            match kube.readyz().await {
                Ok(()) => {
                    log.push(format!("API ready ({} ms)", started.elapsed().as_millis()));
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(ClusterError::Gate {
                        node: "the API server".into(),
                        secs: self.settings.gate_timeout.as_secs(),
                        last: e.to_string(),
                    });
                }
                Err(_) => tokio::time::sleep(self.settings.gate_interval).await,
            }
        }
    }

    /// Every node of the repository registered and Ready, within the gate timeout: after the
    /// CNI wave of a cluster whose CNI is an add-on.
    async fn all_nodes_ready(&self, log: &mut Vec<String>) -> Result<(), ClusterError> {
        let kube = self.kube_for_addons()?;
        let started = tokio::time::Instant::now();
        let deadline = started + self.settings.gate_timeout;
        loop {
            let (waiting, last) = match kube.nodes().await {
                Ok(nodes) => {
                    let mut waiting = Vec::new();
                    let mut last = String::new();
                    for want in &self.desired.nodes {
                        match nodes.iter().find(|n| n.name == want.name) {
                            Some(n) if n.ready => {}
                            Some(n) => {
                                waiting.push(want.name.clone());
                                last = n.not_ready_reason.clone().unwrap_or_else(|| "not Ready".into());
                            }
                            None => {
                                waiting.push(want.name.clone());
                                last = "not registered".into();
                            }
                        }
                    }
                    (waiting, last)
                }
                Err(e) => (vec!["the nodes".to_string()], e.to_string()),
            };
            if waiting.is_empty() {
                log.push(format!("every node Ready ({} ms)", started.elapsed().as_millis()));
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let cluster = &self.desired.cluster;
                let why = if cluster.addons.iter().any(|a| a.cni) {
                    String::new()
                } else {
                    format!(
                        "; the cluster's CNI ({}{}) is installed by an add-on and no declared add-on has `cni: true`",
                        cluster.cni,
                        cluster
                            .provenance
                            .get("cni")
                            .map(|p| format!(", {}", p.cite_with_adr()))
                            .unwrap_or_default()
                    )
                };
                return Err(ClusterError::NodesNotReady {
                    nodes: waiting.join(", "),
                    secs: self.settings.gate_timeout.as_secs(),
                    last,
                    why,
                });
            }
            tokio::time::sleep(self.settings.gate_interval).await;
        }
    }

    /// The health gate: the node is Ready and the API server's /readyz answers `ok`, within
    /// the gate timeout; otherwise the wave stops with the last reason seen. In a cluster
    /// whose CNI is an add-on and where no node is Ready yet, there is no pod network to be
    /// Ready with: the node must be registered and the API ready, and the all-nodes gate after
    /// the CNI wave waits for Ready.
    pub async fn gate(&self, node: &str, log: &mut Vec<String>) -> Result<(), ClusterError> {
        let kube = self.kube()?.ok_or_else(|| {
            ClusterError::kube_failed(format!("cannot check that {node} is Ready: no kubeconfig yet"))
        })?;
        let before_cni = self.desired.cluster.cni_from_addon();
        let started = tokio::time::Instant::now();
        let deadline = started + self.settings.gate_timeout;
        let mut last;
        loop {
            last = match kube.nodes().await {
                Ok(nodes) => match nodes.iter().find(|n| n.name == node) {
                    Some(n) if n.ready || (before_cni && !nodes.iter().any(|n| n.ready)) => match kube.readyz().await {
                        Ok(()) => {
                            log.push(format!(
                                "{node} {}, API ready ({} ms)",
                                if n.ready { "Ready" } else { "registered (no CNI yet)" },
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
                return Err(ClusterError::Gate {
                    node: node.to_string(),
                    secs: self.settings.gate_timeout.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(self.settings.gate_interval).await;
        }
    }
}

fn not_observed(node: &str) -> String {
    format!(
        "{node}: not observed: its guest does not carry the trusted ownership tag, or the watched branch \
         does not name it (planned from the Proxmox API alone)"
    )
}

/// A Talos error with every value of the bundle taken out of its message.
fn redacted(e: TalosError, bundle: &TalosSecrets) -> ClusterError {
    ClusterError::talos_failed(talos_secrets::redact(&e.to_string(), bundle))
}

impl<C: ClusterConnector> ClusterSteps for ClusterAccess<'_, C> {
    fn run<'s>(&'s self, step: &'s Step, log: &'s mut Vec<String>) -> StepFuture<'s> {
        Box::pin(self.run_step(step, log))
    }

    fn after_guest_step<'s>(&'s self, step: &'s Step, log: &'s mut Vec<String>) -> StepFuture<'s> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;
    use crate::ports::fakes::FakeCluster;
    use crate::settings::RunSettings;
    use crate::test_repo::lab;
    use std::time::Duration;
    use tokio::time::Instant;

    /// A gate of 5 s asking every 0.5 s, with a kubeconfig in the secrets directory.
    fn settings() -> ClusterSettings {
        ClusterSettings {
            gate_timeout: Duration::from_secs(5),
            gate_interval: Duration::from_millis(500),
            ..RunSettings::default().cluster
        }
    }

    fn secrets_with_kubeconfig() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KUBECONFIG_FILE), "apiVersion: v1\n").unwrap();
        dir
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_never_gets_ready_fails_its_gate_at_the_timeout_with_the_last_reason() {
        let (desired, artifacts) = lab();
        let cluster = FakeCluster::with_nodes(&["k3s-1", "k3s-2", "k3s-3"]);
        cluster.kube.node_ready_after("k3s-2", u32::MAX);
        let secrets = secrets_with_kubeconfig();
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let started = Instant::now();
        let err = access.gate("k3s-2", &mut Vec::new()).await.unwrap_err();

        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "the gate waits its whole timeout"
        );
        assert_eq!(cluster.kube.looks(), 11, "once every 0.5 s");
        let ClusterError::Gate { node, secs, last } = &err else {
            panic!("{err:?}")
        };
        assert_eq!((node.as_str(), *secs), ("k3s-2", 5));
        assert_eq!(last, "not Ready: container runtime network not ready");
        assert_eq!(
            err.to_string(),
            "health gate: k3s-2 did not become Ready within 5 s (not Ready: container runtime network not ready); \
             the wave stops here"
        );
        assert_eq!(err.system(), System::Kubernetes);
        assert!(err.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_gets_ready_passes_its_gate_as_soon_as_it_is() {
        let (desired, artifacts) = lab();
        let cluster = FakeCluster::default();
        cluster.kube.node_ready_after("k3s-1", 3);
        let secrets = secrets_with_kubeconfig();
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let mut log = Vec::new();
        access.gate("k3s-1", &mut log).await.unwrap();
        assert_eq!(log, ["k3s-1 Ready, API ready (1500 ms)"]);
    }

    #[tokio::test(start_paused = true)]
    async fn before_a_cni_addon_runs_a_node_is_gated_on_the_api_then_every_node_on_ready() {
        // examples/homelab-talos: Cilium, from an add-on; no node has a pod network yet.
        let (desired, artifacts, _, _) = talos_lab();
        let cluster = FakeCluster::default();
        for n in ["talos-cp-1", "talos-worker-1", "talos-worker-2"] {
            cluster.kube.node_ready_after(n, u32::MAX);
        }
        let secrets = secrets_with_kubeconfig();
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let mut log = Vec::new();
        access.gate("talos-cp-1", &mut log).await.unwrap();
        assert_eq!(log, ["talos-cp-1 registered (no CNI yet), API ready (0 ms)"]);
        // After the CNI wave, NotReady is NotReady: the apply stops naming the nodes.
        let err = access.all_nodes_ready(&mut Vec::new()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "health gate: talos-cp-1, talos-worker-1, talos-worker-2 not Ready within 5 s (container runtime \
             network not ready); the apply stops here"
        );
        // Once one node has a network, the others are gated on Ready again.
        cluster.kube.ready_node("talos-cp-1");
        let err = access.gate("talos-worker-1", &mut Vec::new()).await.unwrap_err();
        assert!(matches!(err, ClusterError::Gate { .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_names_an_unregistered_node_and_an_api_server_that_is_not_ready() {
        let (desired, artifacts) = lab();
        let cluster = FakeCluster::default();
        let secrets = secrets_with_kubeconfig();
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let err = access.gate("k3s-3", &mut Vec::new()).await.unwrap_err();
        assert!(
            err.to_string().contains("(not registered with the API server)"),
            "{err}"
        );

        cluster.kube.ready_node("k3s-3");
        cluster.kube.set_readyz_failing(Some("[-]etcd failed"));
        let err = access.gate("k3s-3", &mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("the API server is not ready"), "{err}");
        assert!(err.to_string().contains("[-]etcd failed"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_kubeconfig_there_is_no_gate_to_pass_and_the_error_says_why() {
        let (desired, artifacts) = lab();
        let cluster = FakeCluster::default();
        let empty = tempfile::tempdir().unwrap();
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(empty.path()),
        );
        let err = access.gate("k3s-1", &mut Vec::new()).await.unwrap_err();
        assert_eq!(err.to_string(), "cannot check that k3s-1 is Ready: no kubeconfig yet");
        assert_eq!(cluster.kube.looks(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_guest_restart_only_a_cluster_member_is_waited_for() {
        let (desired, artifacts) = lab();
        let cluster = FakeCluster::default();
        cluster.kube.node_ready_after("k3s-1", u32::MAX);
        let secrets = secrets_with_kubeconfig();
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let step = |node: &str| Step {
            node: node.into(),
            vmid: 0,
            pve_node: "pve".into(),
            kind: crate::ports::PveKind::Lxc,
            disruptive: true,
            action: Action::Start,
        };
        // k3s-2 never joined the cluster: nothing to wait for.
        access.after_guest_step(&step("k3s-2"), &mut Vec::new()).await.unwrap();
        let err = access
            .after_guest_step(&step("k3s-1"), &mut Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ClusterError::Gate { .. }), "{err}");
    }

    // ---- Talos: who gets a machine config ----

    const CP: &str = "10.0.0.10";
    const WORKER_1: &str = "10.0.0.21";
    const WORKER_2: &str = "10.0.0.22";

    /// examples/homelab-talos, a secrets directory holding its bundle, and Proxmox saying every
    /// VM runs.
    fn talos_lab() -> (Desired, Vec<Artifact>, tempfile::TempDir, Observed) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/homelab-talos");
        let (desired, artifacts) = crate::test_repo::load_files(&crate::source::read_dir(&dir).unwrap());
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(secrets.path().join("talos-secrets"), TalosSecrets::generate().to_yaml()).unwrap();
        let guests = Observed {
            guests: desired
                .nodes
                .iter()
                .map(|n| crate::ports::GuestSummary {
                    vmid: n.vmid,
                    node: n.proxmox_node.clone(),
                    kind: crate::ports::PveKind::Qemu,
                    name: Some(n.name.clone()),
                    status: "running".into(),
                    tags: vec!["driftless".into()],
                })
                .collect(),
            configs: Default::default(),
        };
        (desired, artifacts, secrets, guests)
    }

    /// The cluster steps for what `access` observes, on top of `guest_steps`.
    async fn talos_plan<C: ClusterConnector>(
        access: &ClusterAccess<'_, C>,
        guests: &Observed,
        guest_steps: Vec<Step>,
    ) -> Plan {
        let (seen, _) = access.observe(guests).await.unwrap();
        let plan = Plan {
            cluster: "talos-homelab".into(),
            steps: guest_steps,
            conflicts: vec![],
            orphans: vec![],
            notices: vec![],
        };
        super::super::plan::merge(access.desired, access.artifacts, &seen, plan)
    }

    fn talos_apply_of<'p>(plan: &'p Plan, node: &str) -> (&'p Step, bool, &'p str) {
        let step = plan
            .steps
            .iter()
            .find(|s| s.node == node && matches!(s.action, Action::TalosApply { .. }))
            .unwrap_or_else(|| panic!("no Talos apply for {node}: {plan:#?}"));
        let Action::TalosApply { maintenance, diff, .. } = &step.action else {
            unreachable!()
        };
        (step, *maintenance, diff)
    }

    fn create(node: &Node) -> Step {
        Step {
            node: node.name.clone(),
            vmid: node.vmid,
            pve_node: node.proxmox_node.clone(),
            kind: crate::ports::PveKind::Qemu,
            disruptive: false,
            action: Action::Create {
                params: Default::default(),
                root_options: vec![],
                raw_lxc: vec![],
                provenance: Default::default(),
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_impostor_at_a_node_address_stops_the_plan_and_the_apply_naming_the_node_and_gets_nothing() {
        let (desired, artifacts, secrets, guests) = talos_lab();
        let cluster = FakeCluster::default();
        cluster.talos.configure(CP);
        cluster.talos.configure(WORKER_2);
        // Something took talos-worker-1's address after the cluster was set up.
        cluster.talos.impostor(WORKER_1);
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );

        let err = access.observe(&guests).await.unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("talos-worker-1: "), "{text}");
        assert!(text.contains("did not sign its certificate"), "{text}");
        assert!(
            matches!(
                &err,
                ClusterError::Talos {
                    error: TalosError::Untrusted { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.system(), System::Talos);
        assert!(!err.retryable(), "an impostor does not become the node by waiting");

        // A plan made before it showed up: the step asks again and stops, in maintenance mode
        // too (a VM this apply created), at once.
        let worker = desired.node("talos-worker-1").unwrap();
        for maintenance in [false, true] {
            let step = Step {
                action: Action::TalosApply {
                    mode: "auto".into(),
                    maintenance,
                    diff: String::new(),
                    config: artifacts
                        .iter()
                        .find(|a| a.node == worker.name && a.kind == ArtifactKind::TalosConfig)
                        .unwrap()
                        .content
                        .clone(),
                },
                ..create(worker)
            };
            let started = Instant::now();
            let err = access.run(&step, &mut Vec::new()).await.unwrap_err();
            assert_eq!(started.elapsed(), Duration::ZERO, "not retried");
            assert!(
                err.to_string()
                    .starts_with("talos-worker-1: the Talos API at 10.0.0.21 is not the cluster's"),
                "{err}"
            );
        }
        let bootstrap = Step {
            action: Action::TalosBootstrap,
            ..create(worker)
        };
        assert!(access.run(&bootstrap, &mut Vec::new()).await.is_err());
        assert!(cluster.talos.applied.lock().unwrap().is_empty(), "no config was sent");
    }

    #[tokio::test(start_paused = true)]
    async fn a_plan_writes_no_talosconfig_and_an_apply_saves_the_one_it_used() {
        let (desired, artifacts, secrets, guests) = talos_lab();
        let cluster = FakeCluster::default();
        for ip in [CP, WORKER_1, WORKER_2] {
            cluster.talos.configure(ip);
        }
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let talosconfig = secrets.path().join(TALOSCONFIG_FILE);
        let plan = talos_plan(&access, &guests, vec![]).await;
        assert!(!talosconfig.exists(), "a plan left a talosconfig behind");
        let (step, _, _) = talos_apply_of(&plan, "talos-worker-1");
        access.run(step, &mut Vec::new()).await.unwrap();
        let saved = std::fs::read_to_string(&talosconfig).expect("the apply saves the talosconfig it used");
        assert!(saved.contains(CP), "{saved}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_in_maintenance_mode_gets_its_config_only_when_this_apply_created_it_or_its_file_says_so() {
        let (mut desired, artifacts, secrets, guests) = talos_lab();
        let cluster = FakeCluster::default();
        cluster.talos.configure(CP);
        cluster.talos.configure(WORKER_2);
        // talos-worker-1 answers like Talos's maintenance service: a reinstalled node, or a
        // machine imitating one. Its VM exists; this apply does not create it.
        {
            let access = ClusterAccess::new(
                &desired,
                &desired,
                &artifacts,
                &cluster,
                settings(),
                SecretStore::new(secrets.path()),
            );
            let plan = talos_plan(&access, &guests, vec![]).await;
            let (step, maintenance, diff) = talos_apply_of(&plan, "talos-worker-1");
            assert!(!maintenance);
            assert!(
                diff.starts_with("refused: answers as a Talos node in maintenance mode"),
                "{diff}"
            );
            assert!(
                diff.contains("`talos: {maintenance_apply: true}` in nodes/talos-worker-1.yaml"),
                "{diff}"
            );
            let err = access.run(step, &mut Vec::new()).await.unwrap_err();
            assert!(matches!(err, ClusterError::TalosRefused { .. }), "{err:?}");
            assert_eq!(
                err.to_string(),
                format!(
                    "talos-worker-1: {}",
                    super::super::plan::maintenance_refusal(desired.node("talos-worker-1").unwrap())
                )
            );
            assert!(!err.retryable());
            assert!(cluster.talos.applied.lock().unwrap().is_empty());

            // The same node in an apply that creates its VM: that VM is what answers.
            let created = create(desired.node("talos-worker-1").unwrap());
            let plan = talos_plan(&access, &guests, vec![created]).await;
            let (step, maintenance, diff) = talos_apply_of(&plan, "talos-worker-1");
            assert!(maintenance);
            assert_eq!(diff, "the node has no config yet");
            let mut log = Vec::new();
            access.run(step, &mut log).await.unwrap();
            assert_eq!(log, ["config applied in maintenance mode (mode auto)"]);
            assert_eq!(*cluster.talos.applied.lock().unwrap(), [(WORKER_1.to_string(), true)]);
        }

        // A node file that allows it, for a node reinstalled on purpose.
        let cluster = FakeCluster::default();
        cluster.talos.configure(CP);
        cluster.talos.configure(WORKER_2);
        let worker = desired.nodes.iter_mut().find(|n| n.name == "talos-worker-1").unwrap();
        worker.settings.talos.get_or_insert_default().maintenance_apply = Some(true);
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let plan = talos_plan(&access, &guests, vec![]).await;
        let (step, maintenance, diff) = talos_apply_of(&plan, "talos-worker-1");
        assert!(maintenance);
        assert!(diff.contains("as talos.maintenance_apply allows"), "{diff}");
        access.run(step, &mut Vec::new()).await.unwrap();
        assert_eq!(*cluster.talos.applied.lock().unwrap(), [(WORKER_1.to_string(), true)]);
        // Once configured, the setting left in place is said out loud.
        let plan = talos_plan(&access, &guests, vec![]).await;
        let notice = plan
            .notices
            .iter()
            .find(|n| n.node == "talos-worker-1")
            .expect("a notice");
        assert!(
            notice.message.starts_with("talos.maintenance_apply is set"),
            "{}",
            notice.message
        );
    }

    // ---- Talos upgrades ----

    /// The Talos lab with cluster.yaml saying `version` and `kubernetes`; every node runs
    /// Talos v1.13.9 and is Ready with kubelet v1.34.1; a kubeconfig exists.
    fn upgrade_lab(
        version: &str,
        kubernetes: &str,
    ) -> (Desired, Vec<Artifact>, tempfile::TempDir, Observed, FakeCluster) {
        let (_, _, secrets, guests) = talos_lab();
        let files = crate::test_repo::talos_example_at(version, kubernetes);
        let (mut desired, artifacts) = crate::test_repo::load_files(&files);
        // The example's Cilium add-on is planned and applied in the add-on tests; these are
        // about the nodes.
        desired.cluster.addons.clear();
        std::fs::write(secrets.path().join(KUBECONFIG_FILE), "apiVersion: v1\n").unwrap();
        let cluster = FakeCluster::default();
        for (ip, name) in [
            (CP, "talos-cp-1"),
            (WORKER_1, "talos-worker-1"),
            (WORKER_2, "talos-worker-2"),
        ] {
            cluster.talos.configure_version(ip, "v1.13.9");
            cluster.kube.ready_node(name);
            cluster.kube.set_kubelet_version(name, "v1.34.1");
        }
        (desired, artifacts, secrets, guests, cluster)
    }

    fn applier<'a>(
        proxmox: &'a crate::ports::fakes::FakeProxmox,
        host: &'a crate::settings::HostShellSettings,
        cluster: &'a dyn ClusterSteps,
        desired: &Desired,
    ) -> crate::apply::Applier<'a, crate::ports::fakes::FakeProxmox, crate::ports::fakes::FakeHostShell> {
        crate::apply::Applier {
            proxmox,
            shell: None,
            host,
            stop: None,
            cluster: Some(cluster),
            parallelism: 8,
            control_plane: desired.control_plane().map(|n| n.name.clone()).collect(),
        }
    }

    fn upgraded(cluster: &FakeCluster) -> Vec<String> {
        cluster
            .talos
            .upgrades
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn talos_upgrades_run_control_plane_first_one_at_a_time_each_gated_on_version_and_ready() {
        let (desired, artifacts, secrets, guests, cluster) = upgrade_lab("v1.13.10", "v1.34.1");
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let plan = talos_plan(&access, &guests, vec![]).await;
        let upgrades: Vec<&str> = plan
            .steps
            .iter()
            .filter(|s| matches!(s.action, Action::TalosUpgrade { .. }))
            .map(|s| s.node.as_str())
            .collect();
        assert_eq!(upgrades, ["talos-cp-1", "talos-worker-1", "talos-worker-2"]);

        let proxmox = crate::ports::fakes::FakeProxmox::new();
        let host = RunSettings::default().host;
        let report = applier(&proxmox, &host, &access, &desired).apply(&plan, &mut ()).await;
        assert!(report.ok(), "{report:#?}");
        assert_eq!(upgraded(&cluster), [CP, WORKER_1, WORKER_2]);
        assert!(
            cluster
                .talos
                .upgrades
                .lock()
                .unwrap()
                .iter()
                .all(|(_, image)| image == "ghcr.io/siderolabs/installer:v1.13.10")
        );
        assert!(
            cluster.talos.overlapping.lock().unwrap().is_empty(),
            "a node was upgraded while another rebooted"
        );
        for outcome in report.done.iter().filter(|o| o.action == "upgrade talos") {
            // Back with the new version, then Ready: the gate, in that order.
            let back = outcome
                .log
                .iter()
                .position(|l| l.ends_with("runs Talos v1.13.10 (1500 ms)"));
            let ready = outcome.log.iter().position(|l| l.contains("Ready, API ready"));
            assert!(
                matches!((back, ready), (Some(b), Some(r)) if b < r),
                "{:?}",
                outcome.log
            );
        }
        // The nodes run it now: nothing more to upgrade.
        let plan = talos_plan(&access, &guests, vec![]).await;
        assert!(
            !plan
                .steps
                .iter()
                .any(|s| matches!(s.action, Action::TalosUpgrade { .. })),
            "{plan:#?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_does_not_come_back_with_the_new_version_stops_the_upgrades_after_it() {
        let (desired, artifacts, secrets, guests, cluster) = upgrade_lab("v1.13.10", "v1.34.1");
        cluster.talos.stuck(WORKER_1);
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let plan = talos_plan(&access, &guests, vec![]).await;
        let proxmox = crate::ports::fakes::FakeProxmox::new();
        let host = RunSettings::default().host;
        let report = applier(&proxmox, &host, &access, &desired).apply(&plan, &mut ()).await;
        assert!(!report.ok());
        assert_eq!(upgraded(&cluster), [CP, WORKER_1], "talos-worker-2 was not touched");
        let failed = report.done.iter().find(|o| !o.ok).unwrap();
        assert_eq!(failed.node, "talos-worker-1");
        assert_eq!(
            failed.error.as_deref(),
            Some(
                "talos-worker-1: Talos did not come back with v1.13.10 within 5 s (it still runs v1.13.9); \
                 the wave stops here"
            )
        );
        assert!(
            report
                .not_done
                .iter()
                .any(|s| s.starts_with("upgrade talos talos-worker-2")),
            "{:?}",
            report.not_done
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_version_changes_fail_before_anything_is_sent() {
        // kubernetes_version changed: the first cluster step refuses, no config goes out.
        let (desired, artifacts, secrets, guests, cluster) = upgrade_lab("v1.13.9", "v1.35.0");
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let plan = talos_plan(&access, &guests, vec![]).await;
        let proxmox = crate::ports::fakes::FakeProxmox::new();
        let host = RunSettings::default().host;
        let report = applier(&proxmox, &host, &access, &desired).apply(&plan, &mut ()).await;
        assert!(!report.ok());
        assert_eq!(report.done.len(), 1, "{report:#?}");
        let error = report.done[0].error.as_deref().unwrap();
        assert!(
            error.starts_with("talos-cp-1: kubernetes_version change from v1.34.1 to v1.35.0 on Talos: run `talosctl upgrade-k8s --to 1.35.0`"),
            "{error}"
        );
        assert!(cluster.talos.applied.lock().unwrap().is_empty(), "a config was sent");

        // A skipped minor release: refused at the control plane, no upgrade sent anywhere.
        let (desired, artifacts, secrets, guests, cluster) = upgrade_lab("v1.15.0", "v1.34.1");
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let plan = talos_plan(&access, &guests, vec![]).await;
        let report = applier(&proxmox, &host, &access, &desired).apply(&plan, &mut ()).await;
        assert!(!report.ok());
        let failed = report.done.iter().find(|o| !o.ok).unwrap();
        assert_eq!(failed.action, "upgrade talos");
        assert!(
            failed
                .error
                .as_deref()
                .unwrap()
                .contains("Talos upgrades one minor release at a time"),
            "{failed:?}"
        );
        assert!(upgraded(&cluster).is_empty());
        assert!(cluster.talos.applied.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_on_another_minor_release_is_not_asked_for_a_dry_run_of_the_new_release_config() {
        let (desired, artifacts, secrets, guests, cluster) = upgrade_lab("v1.14.0", "v1.34.1");
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let plan = talos_plan(&access, &guests, vec![]).await;
        let (_, _, diff) = talos_apply_of(&plan, "talos-cp-1");
        assert!(
            diff.starts_with("no dry run: the config is for Talos v1.14.0"),
            "{diff}"
        );
        // A patch release apart, the dry run is Talos's as always.
        let (desired, artifacts, secrets, guests, cluster) = upgrade_lab("v1.13.10", "v1.34.1");
        let access = ClusterAccess::new(
            &desired,
            &desired,
            &artifacts,
            &cluster,
            settings(),
            SecretStore::new(secrets.path()),
        );
        let plan = talos_plan(&access, &guests, vec![]).await;
        let (_, _, diff) = talos_apply_of(&plan, "talos-cp-1");
        assert_eq!(diff, "", "the fake's dry run answers with no details");
    }
}
