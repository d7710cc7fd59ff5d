//! The ports: small traits between the pure core and the systems driftless talks to.
//! Plan and apply are written against these; adapters implement them for the real systems
//! and the sandbox, and tests can implement them in memory.

use std::collections::BTreeMap;
use std::future::Future;

/// Guest type as Proxmox names it in paths and listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PveKind {
    Lxc,
    Qemu,
}

impl PveKind {
    pub fn path(self) -> &'static str {
        match self {
            PveKind::Lxc => "lxc",
            PveKind::Qemu => "qemu",
        }
    }
}

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

/// The Proxmox VE API, the calls driftless makes. Implemented over HTTPS by
/// `adapters::proxmox::ProxmoxClient`.
pub trait ProxmoxApi: Send + Sync {
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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    #[error("host key of {host} does not match known_hosts: refusing to connect")]
    HostKeyMismatch { host: String },
    #[error("host {host} is not in the known_hosts file {known_hosts}")]
    UnknownHost { host: String, known_hosts: String },
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
    #[error("{0}")]
    Other(String),
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
}
