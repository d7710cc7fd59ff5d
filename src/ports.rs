//! The ports: small traits between the pure core and the systems driftless talks to.
//! Plan and apply are written against these; adapters implement them for the real systems
//! (and the sandbox, which serves the real protocols), and [`fakes`] implements them in
//! memory for unit tests.

#[cfg(test)]
pub mod fakes;

use std::collections::BTreeMap;
use std::future::Future;

/// The systems a run talks to: what an error is blamed on (and counted as, in the daemon's
/// metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Proxmox,
    /// A remote shell: the Proxmox host's (SSH, or local) or a node's.
    Ssh,
    Kubernetes,
    Talos,
    Git,
    /// The secrets directory and files on this host.
    Secrets,
    /// The repository's content: nothing another attempt can fix.
    Repository,
}

impl System {
    pub const ALL: [System; 7] = [
        System::Proxmox,
        System::Ssh,
        System::Kubernetes,
        System::Talos,
        System::Git,
        System::Secrets,
        System::Repository,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            System::Proxmox => "proxmox",
            System::Ssh => "ssh",
            System::Kubernetes => "kubernetes",
            System::Talos => "talos",
            System::Git => "git",
            System::Secrets => "secrets",
            System::Repository => "repository",
        }
    }
}

pub use crate::pve::conf::PveKind;

/// One entry of `GET /cluster/resources?type=vm`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestSummary {
    pub vmid: u32,
    pub node: String,
    pub kind: PveKind,
    pub name: Option<String>,
    /// `running`, `stopped`, ...
    pub status: String,
    /// As Proxmox returns them (`;`-separated in the API), split.
    pub tags: Vec<String>,
}

/// `GET /nodes/{node}/{lxc|qemu}/{vmid}/config`: the options (pending changes applied, as
/// Proxmox returns them by default), the raw `lxc.*` pairs, and the digest to update with.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveConfig {
    pub options: BTreeMap<String, String>,
    pub raw_lxc: Vec<(String, String)>,
    pub digest: String,
}

/// A Proxmox task id: `UPID:node:pid:pstart:starttime:type:id:user:`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Upid(pub String);

impl Upid {
    /// The node the task runs on: the second field.
    pub fn node(&self) -> Option<&str> {
        self.0.split(':').nth(1)
    }
}

/// `GET /version`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PveVersion {
    /// `9.1.3`
    pub version: String,
    /// `9.1`
    pub release: String,
}

/// One entry of `GET /nodes`: a node of the Proxmox cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PveNode {
    pub node: String,
    /// `online`, `offline` or `unknown`.
    pub status: String,
    /// SHA-256 of the node's API certificate, `AB:CD:...`, when Proxmox says.
    pub ssl_fingerprint: Option<String>,
}

/// One entry of `GET /nodes/{node}/network`: an interface of the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkInterface {
    /// `vmbr0`, `eno1`, `bond0`.
    pub iface: String,
    /// Proxmox's `type`: `bridge`, `OVSBridge`, `eth`, `bond`, `vlan`, ...
    pub kind: String,
    /// Up right now (`active`); a bridge only in /etc/network/interfaces.new is not.
    pub active: bool,
}

impl NetworkInterface {
    /// Whether guests can be attached to it: a Linux or an Open vSwitch bridge.
    pub fn is_bridge(&self) -> bool {
        self.kind == "bridge" || self.kind == "OVSBridge"
    }
}

/// A storage of one node: an entry of `GET /nodes/{node}/storage`, or
/// `GET /nodes/{node}/storage/{storage}/status`. Sizes in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StorageStatus {
    pub storage: String,
    /// Proxmox's `type`: `dir`, `lvmthin`, `zfspool`, `nfs`, ...
    pub kind: String,
    /// What it may hold: `images`, `rootdir`, `vztmpl`, `iso`, `backup`, ...
    pub content: Vec<String>,
    pub active: bool,
    pub enabled: bool,
    pub shared: bool,
    pub total: Option<u64>,
    pub used: Option<u64>,
    pub avail: Option<u64>,
}

impl StorageStatus {
    pub fn holds(&self, content: &str) -> bool {
        self.content.iter().any(|c| c == content)
    }
}

/// One entry of `GET /nodes/{node}/storage/{storage}/content`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StorageVolume {
    /// `local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst`
    pub volid: String,
    /// `vztmpl`, `iso`, `images`, `rootdir`, `backup`, ...
    pub content: String,
    pub format: String,
    pub size: u64,
    /// The guest a disk belongs to.
    pub vmid: Option<u32>,
}

/// `GET /access/permissions`: ACL path -> privilege -> whether it propagates to the paths below.
pub type Permissions = BTreeMap<String, BTreeMap<String, bool>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    Start,
    Shutdown,
    Stop,
    Reboot,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Start => "start",
            PowerAction::Shutdown => "shutdown",
            PowerAction::Stop => "stop",
            PowerAction::Reboot => "reboot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxmoxError {
    /// The config changed since it was read (`digest` mismatch): observe again, never overwrite.
    #[error("the guest's config changed since it was read (digest mismatch)")]
    DigestMismatch,
    /// Proxmox answered with an error status; `message` is its own words (secrets removed).
    #[error("Proxmox answered {status} for {what}: {message}")]
    Api { status: u16, what: String, message: String },
    #[error("task {upid} failed: {exit_status}")]
    TaskFailed { upid: String, exit_status: String },
    #[error("cannot reach Proxmox at {endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    #[error("{0}")]
    Other(String),
}

impl ProxmoxError {
    /// Whether another attempt can succeed: the API was unreachable, busy or failing, or the
    /// guest changed under us. A refusal (4xx) or a failed task stays failed.
    pub fn retryable(&self) -> bool {
        match self {
            ProxmoxError::DigestMismatch | ProxmoxError::Transport { .. } => true,
            ProxmoxError::Api { status, .. } => *status >= 500 || *status == 429,
            ProxmoxError::TaskFailed { .. } | ProxmoxError::Other(_) => false,
        }
    }
}

/// The Proxmox VE API, the calls driftless makes. Implemented over HTTPS by
/// `adapters::proxmox::ProxmoxClient`.
pub trait ProxmoxApi: Send + Sync {
    /// Calls retried so far because the API did not answer or answered 5xx (reports say so).
    fn retries(&self) -> u64 {
        0
    }
    fn list_guests(&self) -> impl Future<Output = Result<Vec<GuestSummary>, ProxmoxError>> + Send;
    fn read_config(
        &self,
        node: &str,
        kind: PveKind,
        vmid: u32,
    ) -> impl Future<Output = Result<LiveConfig, ProxmoxError>> + Send;
    /// `POST /nodes/{node}/{kind}` with the create parameters (which include `vmid`).
    fn create(
        &self,
        node: &str,
        kind: PveKind,
        params: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Upid, ProxmoxError>> + Send;
    /// `PUT .../config` with `digest` (and `delete` when non-empty). Synchronous in Proxmox.
    fn update_config(
        &self,
        node: &str,
        kind: PveKind,
        vmid: u32,
        set: &BTreeMap<String, String>,
        delete: &[String],
        digest: &str,
    ) -> impl Future<Output = Result<(), ProxmoxError>> + Send;
    fn power(
        &self,
        node: &str,
        kind: PveKind,
        vmid: u32,
        action: PowerAction,
    ) -> impl Future<Output = Result<Upid, ProxmoxError>> + Send;
    fn delete_guest(
        &self,
        node: &str,
        kind: PveKind,
        vmid: u32,
    ) -> impl Future<Output = Result<Upid, ProxmoxError>> + Send;
    /// Poll `GET /nodes/{node}/tasks/{upid}/status` until the task stops; an exit status
    /// other than `OK` is `TaskFailed`.
    fn wait_task(&self, upid: &Upid) -> impl Future<Output = Result<(), ProxmoxError>> + Send;

    // Read-only calls of `driftless doctor` and `driftless import`.

    /// `GET /version`: needs no privilege, so it checks the address, TLS and the token alone.
    fn api_version(&self) -> impl Future<Output = Result<PveVersion, ProxmoxError>> + Send;
    /// `GET /access/permissions` for the caller (the token): every path, or only `path`
    /// (the privileges effective there, inherited ones included).
    fn permissions(&self, path: Option<&str>) -> impl Future<Output = Result<Permissions, ProxmoxError>> + Send;
    /// `GET /nodes`.
    fn nodes(&self) -> impl Future<Output = Result<Vec<PveNode>, ProxmoxError>> + Send;
    /// `GET /nodes/{node}/network`.
    fn node_network(&self, node: &str) -> impl Future<Output = Result<Vec<NetworkInterface>, ProxmoxError>> + Send;
    /// `GET /nodes/{node}/storage`: the storages the caller may see on `node`.
    fn storages(&self, node: &str) -> impl Future<Output = Result<Vec<StorageStatus>, ProxmoxError>> + Send;
    /// `GET /nodes/{node}/storage/{storage}/status`.
    fn storage_status(
        &self,
        node: &str,
        storage: &str,
    ) -> impl Future<Output = Result<StorageStatus, ProxmoxError>> + Send;
    /// `GET /nodes/{node}/storage/{storage}/content`, only `content` (`vztmpl`, `iso`) when given.
    fn storage_content(
        &self,
        node: &str,
        storage: &str,
        content: Option<&str>,
    ) -> impl Future<Output = Result<Vec<StorageVolume>, ProxmoxError>> + Send;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    #[error("host key of {host} does not match known_hosts: refusing to connect")]
    HostKeyMismatch { host: String },
    #[error("host {host} is not in the known_hosts file {known_hosts}")]
    UnknownHost { host: String, known_hosts: String },
    /// The presented host key (or its certificate's CA) is listed as `@revoked`.
    #[error("host key of {host} is marked @revoked in {known_hosts} line {line}: refusing to connect")]
    HostKeyRevoked {
        host: String,
        known_hosts: String,
        line: usize,
    },
    #[error("cannot connect to {host}: {message}")]
    Connect { host: String, message: String },
    #[error("authentication to {host} failed")]
    Auth { host: String },
    #[error("`{command}` on {host} exited with {status}: {stderr}")]
    Command {
        host: String,
        command: String,
        status: u32,
        stderr: String,
    },
    /// A compare-and-swap write found the file changed since it was read.
    #[error("{path} on {host} changed since it was read: refusing to overwrite")]
    Changed { host: String, path: String },
    /// A command printed more than [`MAX_COMMAND_OUTPUT`]: what a guest answers is untrusted,
    /// and a run must not grow without bound on it.
    #[error("`{command}` on {host} printed more than {} MiB: stopped", MAX_COMMAND_OUTPUT >> 20)]
    TooMuchOutput { host: String, command: String },
    /// The run lock is held by another run, which `holder` names (as that run wrote it).
    #[error("another driftless run holds {path} on {host}: {holder}")]
    Locked { host: String, path: String, holder: String },
    #[error("{0}")]
    Other(String),
}

/// A command kept running on a host with its stdin open (the run lock's `flock`). Dropping it
/// closes that stdin, and the command ends; so does the end of the connection or process
/// that started it, so a driftless killed with SIGKILL leaves nothing held.
pub struct HeldCommand(#[allow(dead_code)] Box<dyn std::any::Any + Send + Sync>);

impl HeldCommand {
    pub fn new(guard: impl std::any::Any + Send + Sync) -> HeldCommand {
        HeldCommand(Box::new(guard))
    }
}

impl std::fmt::Debug for HeldCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeldCommand")
    }
}

/// What [`HostShell::hold`] saw: the command printed its first line and runs on, held; or it
/// ended first, with its output.
#[derive(Debug)]
pub enum Held {
    Running { first_line: String, command: HeldCommand },
    Exited(CommandOutput),
}

/// The most a remote command's stdout or stderr may hold (each). Far above any config file
/// or status answer driftless reads; a compromised guest answering gigabytes is cut off here.
pub const MAX_COMMAND_OUTPUT: usize = 16 << 20;

/// Append `data` to a command's output buffer; false (and nothing appended) when that would
/// go over [`MAX_COMMAND_OUTPUT`].
#[must_use]
pub fn append_capped(buffer: &mut Vec<u8>, data: &[u8]) -> bool {
    if buffer.len() + data.len() > MAX_COMMAND_OUTPUT {
        return false;
    }
    buffer.extend_from_slice(data);
    true
}

impl ShellError {
    /// Whether another attempt can succeed: the host did not answer, or a command failed.
    /// A wrong or unknown host key and a refused login need the operator.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ShellError::Connect { .. }
                | ShellError::Command { .. }
                | ShellError::Changed { .. }
                | ShellError::Locked { .. }
        )
    }
}

/// Output of a remote command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub status: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A root shell on a Proxmox host (SSH). Every argument is quoted by the implementation:
/// callers pass argv, never a command line.
pub trait HostShell: Send + Sync {
    /// Run argv on the Proxmox host serving `pve_node`, with `stdin` fed to it.
    fn run(
        &self,
        pve_node: &str,
        argv: &[String],
        stdin: &[u8],
    ) -> impl Future<Output = Result<CommandOutput, ShellError>> + Send;
    fn read_file(&self, pve_node: &str, path: &str) -> impl Future<Output = Result<Vec<u8>, ShellError>> + Send;
    /// Replace `path` atomically (temporary file in the same directory, then rename) only if
    /// its current SHA-1 is `expected_sha1`; `ShellError::Changed` otherwise.
    fn write_file_if_unchanged(
        &self,
        pve_node: &str,
        path: &str,
        contents: &[u8],
        expected_sha1: &str,
    ) -> impl Future<Output = Result<(), ShellError>> + Send;
    /// Start argv on the host and keep it running with its stdin open: returns once it
    /// printed a line (then it runs until the [`HeldCommand`] is dropped) or ended, waiting
    /// at most `within` for either. The run lock is taken this way (`hostshell::lock_run`).
    fn hold(
        &self,
        pve_node: &str,
        argv: &[String],
        within: std::time::Duration,
    ) -> impl Future<Output = Result<Held, ShellError>> + Send {
        let _ = (pve_node, argv, within);
        async { Err(ShellError::Other("this host shell cannot hold a command".into())) }
    }
}

/// A command or file operation on one cluster node: an LXC container reached through its
/// Proxmox host (`pct exec` / `pct push`), or a VM over SSH. Arguments are argv, quoted by
/// the implementation.
pub trait NodeShell: Send + Sync {
    /// Where commands go, for messages: `k3s-master (pct exec 100 on pve)`.
    fn describe(&self) -> String;
    /// A node path as the node's commands see it: the same on real nodes; under a prefix
    /// when the node's root is a directory (tests). `read_file`/`write_file` apply it.
    fn path(&self, path: &str) -> String {
        path.to_string()
    }
    fn run(&self, argv: &[String], stdin: &[u8]) -> impl Future<Output = Result<CommandOutput, ShellError>> + Send;
    /// The file's contents, or `None` when it does not exist.
    fn read_file(&self, path: &str) -> impl Future<Output = Result<Option<Vec<u8>>, ShellError>> + Send;
    /// Replace `path` atomically (a temporary file in the same directory, then rename), with
    /// `mode` (octal, `0600`) and owner `root:root`; parent directories are created.
    fn write_file(&self, path: &str, contents: &[u8], mode: u32)
    -> impl Future<Output = Result<(), ShellError>> + Send;
    /// Copy a file of the Proxmox host into the node (`pct push`), with `mode`. Only
    /// containers have a host to push from; other nodes answer `ShellError::Other`.
    fn push_from_host(
        &self,
        host_path: &str,
        dest: &str,
        mode: u32,
    ) -> impl Future<Output = Result<(), ShellError>> + Send;
    /// Whether the node boots on its own network stack and may not answer for a while after
    /// its guest started (a VM's SSH); a container is reached through its host at once.
    fn may_be_booting(&self) -> bool {
        false
    }
}

/// A cluster node as the connector needs it to reach the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTarget {
    pub name: String,
    /// `true` for an LXC container (reached through its Proxmox host), `false` for a VM.
    pub container: bool,
    pub vmid: u32,
    /// The Proxmox node the guest runs on.
    pub pve_node: String,
}

/// Where the cluster layer gets its clients: a shell on each node, and the Kubernetes and
/// Talos APIs from the kubeconfig and talosconfig the cluster produced (they appear during a
/// run, so the clients are made when needed). Implemented by `connect::NodeConnector` for the
/// real systems and by `ports::fakes` in tests.
pub trait ClusterConnector: Send + Sync {
    type Node<'a>: NodeShell + 'a
    where
        Self: 'a;
    type Kube: KubeApi;
    type Talos: TalosApi;
    /// The node's shell; `None` when it cannot be reached with this run's settings (a
    /// container without a Proxmox host shell).
    fn node_shell<'a>(&'a self, node: &NodeTarget) -> Option<Self::Node<'a>>;
    fn kube(&self, kubeconfig: &[u8]) -> Result<Self::Kube, KubeError>;
    fn talos(&self, talosconfig: &[u8]) -> Result<Self::Talos, TalosError>;
}

/// A Kubernetes taint: `key[=value]:Effect`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub effect: String,
}

impl Taint {
    /// `key=value:Effect` or `key:Effect`, as node files and K3s's `node-taint` write them.
    pub fn parse(s: &str) -> Option<Taint> {
        let (kv, effect) = s.rsplit_once(':')?;
        let (key, value) = match kv.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (kv, None),
        };
        if key.is_empty() || effect.is_empty() {
            return None;
        }
        Some(Taint {
            key: key.to_string(),
            value,
            effect: effect.to_string(),
        })
    }
}

impl std::fmt::Display for Taint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={}:{}", self.key, v, self.effect),
            None => write!(f, "{}:{}", self.key, self.effect),
        }
    }
}

/// A Kubernetes node as the health gates and label reconciliation see it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct KubeNode {
    pub name: String,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// The `Ready` condition's message when not ready (`kubelet stopped posting node status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_reason: Option<String>,
    /// `status.nodeInfo.kubeletVersion`: `v1.31.4+k3s1`.
    pub kubelet_version: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
}

/// What to change on a node: a JSON merge patch of its labels and annotations (`None`
/// removes the key) and, when given, its whole taint list.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct NodePatch {
    pub labels: BTreeMap<String, Option<String>>,
    pub annotations: BTreeMap<String, Option<String>>,
    pub taints: Option<Vec<Taint>>,
}

/// A pod's name and phase, for the cluster health view.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodSummary {
    pub name: String,
    /// `Running`, `Pending`, ...
    pub phase: String,
    /// Every container ready.
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    #[error("cannot reach the Kubernetes API at {server}: {message}")]
    Transport { server: String, message: String },
    #[error("the Kubernetes API answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Other(String),
}

impl KubeError {
    pub fn retryable(&self) -> bool {
        match self {
            KubeError::Transport { .. } => true,
            KubeError::Api { status, .. } => *status >= 500 || *status == 429 || *status == 409,
            KubeError::Other(_) => false,
        }
    }
}

/// The Kubernetes API, the calls driftless makes (kube-rs with the cluster's kubeconfig).
pub trait KubeApi: Send + Sync {
    /// `GET /readyz`: `Ok(())` when the API server says `ok`; the failing checks otherwise.
    fn readyz(&self) -> impl Future<Output = Result<(), KubeError>> + Send;
    fn nodes(&self) -> impl Future<Output = Result<Vec<KubeNode>, KubeError>> + Send;
    fn patch_node(&self, name: &str, patch: &NodePatch) -> impl Future<Output = Result<(), KubeError>> + Send;
    fn pods(&self, namespace: &str) -> impl Future<Output = Result<Vec<PodSummary>, KubeError>> + Send;

    // Arbitrary objects, for add-ons.

    /// API discovery: the resource serving `kind` of `api_version`; `None` when the server
    /// does not serve it (yet: a CRD that is not Established).
    fn resolve(&self, api_version: &str, kind: &str)
    -> impl Future<Output = Result<Option<ApiKind>, KubeError>> + Send;
    fn get_object(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        name: &str,
    ) -> impl Future<Output = Result<Option<serde_json::Value>, KubeError>> + Send;
    /// Server-side apply with field manager `driftless` (`force`: take over conflicting
    /// fields); a conflict is `Api { status: 409 }`. Returns the object as stored (or as it
    /// would be, with `dry_run`).
    fn apply_object(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        object: &serde_json::Value,
        dry_run: bool,
        force: bool,
    ) -> impl Future<Output = Result<serde_json::Value, KubeError>> + Send;
    /// Delete (in the background); `false` when it was not there.
    fn delete_object(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        name: &str,
    ) -> impl Future<Output = Result<bool, KubeError>> + Send;
    fn list_objects(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        label_selector: &str,
    ) -> impl Future<Output = Result<Vec<serde_json::Value>, KubeError>> + Send;
}

/// A kind as API discovery resolves it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct ApiKind {
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    /// The resource name in URLs: `deployments`.
    pub plural: String,
    pub namespaced: bool,
}

impl ApiKind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// How Talos applies a new machine config (`talosctl apply-config --mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TalosApplyMode {
    Auto,
    NoReboot,
    Reboot,
    Staged,
    Try,
}

impl TalosApplyMode {
    pub fn parse(s: &str) -> Option<TalosApplyMode> {
        Some(match s {
            "auto" => TalosApplyMode::Auto,
            "no-reboot" => TalosApplyMode::NoReboot,
            "reboot" => TalosApplyMode::Reboot,
            "staged" => TalosApplyMode::Staged,
            "try" => TalosApplyMode::Try,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TalosApplyMode::Auto => "auto",
            TalosApplyMode::NoReboot => "no-reboot",
            TalosApplyMode::Reboot => "reboot",
            TalosApplyMode::Staged => "staged",
            TalosApplyMode::Try => "try",
        }
    }
}

/// What a Talos node is, as far as its API tells.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum TalosNodeState {
    /// Booted without a config: takes its first one without client certificates. Nothing
    /// proves which machine answers like this (a real node has no certificate to trust yet),
    /// so the cluster layer sends a config only to a VM its run created, or to a node whose
    /// file allows it.
    Maintenance,
    /// Configured and answering over mTLS; `version` is the Talos tag (`v1.13.9`).
    Configured { version: String },
}

/// The answer to ApplyConfiguration.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct TalosApplyResult {
    /// The mode Talos used (`auto` resolves to reboot or no-reboot).
    pub mode: String,
    /// Talos's own words: for a dry run, the diff of the running config against the new one.
    pub mode_details: String,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TalosError {
    #[error("cannot reach the Talos API of {node}: {message}")]
    Transport { node: String, message: String },
    /// A gRPC status other than OK: `code` as gRPC names it (`InvalidArgument`).
    #[error("Talos on {node} answered {code}: {message}")]
    Api {
        node: String,
        code: String,
        message: String,
    },
    /// What answers at the node's address has a certificate the cluster CA does not accept and
    /// is not a Talos node in maintenance mode either: another machine may hold the address.
    /// Nothing is sent to it; retrying does not help.
    #[error(
        "the Talos API at {node} is not the cluster's: {message}. Another machine may hold the node's address; \
         it was sent no machine config"
    )]
    Untrusted { node: String, message: String },
    #[error("{0}")]
    Other(String),
}

impl TalosError {
    pub fn retryable(&self) -> bool {
        match self {
            TalosError::Transport { .. } => true,
            TalosError::Api { code, .. } => matches!(code.as_str(), "Unavailable" | "DeadlineExceeded" | "Aborted"),
            TalosError::Untrusted { .. } | TalosError::Other(_) => false,
        }
    }
}

/// The Talos API (gRPC over mTLS with the talosconfig credentials). `node` is the node's
/// address; requests go to the configured endpoint with `node` metadata, as talosctl's
/// `--nodes` does, except in maintenance mode, where the node is reached without client
/// certificates.
pub trait TalosApi: Send + Sync {
    fn probe(&self, node: &str) -> impl Future<Output = Result<TalosNodeState, TalosError>> + Send;
    fn apply_configuration(
        &self,
        node: &str,
        config: &[u8],
        mode: TalosApplyMode,
        dry_run: bool,
        maintenance: bool,
    ) -> impl Future<Output = Result<TalosApplyResult, TalosError>> + Send;
    /// Bootstrap etcd on the first control plane node; `Ok(false)` when it already was.
    fn bootstrap(&self, node: &str) -> impl Future<Output = Result<bool, TalosError>> + Send;
    /// The admin kubeconfig (`talosctl kubeconfig`).
    fn kubeconfig(&self, node: &str) -> impl Future<Output = Result<Vec<u8>, TalosError>> + Send;
    /// Upgrade Talos to the installer `image` (`talosctl upgrade --image`): Talos answers with
    /// its acknowledgement, then installs and reboots; [`probe`](TalosApi::probe) tells when
    /// the node is back and which version it runs.
    fn upgrade(&self, node: &str, image: &str) -> impl Future<Output = Result<String, TalosError>> + Send;
}
