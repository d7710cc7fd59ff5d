//! In-memory implementations of every port, for unit tests of plan, apply, the cluster layer
//! and the run. They keep just enough state to behave like the real systems in the ways
//! driftless depends on (digests that change with every config write, tasks that fail,
//! nodes that become Ready or not), record every call, and take injected failures.

use super::*;
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

/// One guest of the fake Proxmox.
#[derive(Debug, Clone)]
pub struct FakeGuest {
    pub summary: GuestSummary,
    pub config: LiveConfig,
}

#[derive(Debug, Default)]
struct ProxmoxState {
    guests: BTreeMap<u32, FakeGuest>,
    /// Every call, as `verb vmid`: `create 100`, `update 100 cores`, `start 100`, `wait`.
    calls: Vec<String>,
    /// Failures to answer instead of the next call of that verb (`create`, `update`, ...).
    failures: BTreeMap<String, VecDeque<ProxmoxError>>,
    /// Tasks that end in failure when waited for, by the task's verb and vmid.
    failing_tasks: Vec<String>,
    /// `(vmid, key, value)` written behind driftless's back just before the next update:
    /// the concurrent edit a digest protects against.
    edit_before_update: Option<(u32, String, String)>,
    /// How long tasks of a verb (`create`, `start`, ...) run before they end.
    task_durations: BTreeMap<String, std::time::Duration>,
    digests: u64,
    /// The cluster's nodes, their interfaces, storages and storage content.
    nodes: Vec<PveNode>,
    networks: BTreeMap<String, Vec<NetworkInterface>>,
    storages: BTreeMap<String, Vec<StorageStatus>>,
    content: BTreeMap<(String, String), Vec<StorageVolume>>,
    /// ACL path -> privileges granted there (propagating); `None`: every privilege on `/`.
    privileges: Option<BTreeMap<String, Vec<String>>>,
}

/// Privileges of a full token (root's, without privilege separation), for the fake's answers.
pub const ALL_PRIVILEGES: &[&str] = &[
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "Permissions.Modify",
    "SDN.Allocate",
    "SDN.Audit",
    "SDN.Use",
    "Sys.Audit",
    "Sys.Console",
    "Sys.Modify",
    "Sys.PowerMgmt",
    "VM.Allocate",
    "VM.Audit",
    "VM.Backup",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.Console",
    "VM.Migrate",
    "VM.PowerMgmt",
    "VM.Snapshot",
];

impl ProxmoxState {
    fn next_digest(&mut self) -> String {
        self.digests += 1;
        format!("fake-digest-{}", self.digests)
    }

    fn take_failure(&mut self, verb: &str) -> Option<ProxmoxError> {
        self.failures.get_mut(verb).and_then(VecDeque::pop_front)
    }
}

/// A Proxmox VE API in memory. Tasks end as soon as they are waited for.
#[derive(Debug, Clone, Default)]
pub struct FakeProxmox {
    state: Arc<Mutex<ProxmoxState>>,
}

impl FakeProxmox {
    pub fn new() -> FakeProxmox {
        FakeProxmox::default()
    }

    /// A guest as Proxmox would hold it.
    pub fn insert(&self, summary: GuestSummary, options: BTreeMap<String, String>) {
        let mut s = self.state.lock().unwrap();
        let digest = s.next_digest();
        let vmid = summary.vmid;
        s.guests.insert(
            vmid,
            FakeGuest {
                summary,
                config: LiveConfig {
                    options,
                    raw_lxc: Vec::new(),
                    digest,
                },
            },
        );
    }

    pub fn guest(&self, vmid: u32) -> Option<FakeGuest> {
        self.state.lock().unwrap().guests.get(&vmid).cloned()
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Answer the next call of `verb` (`list`, `read`, `create`, `update`, `power`,
    /// `delete`) with `error`.
    pub fn fail_next(&self, verb: &str, error: ProxmoxError) {
        self.state
            .lock()
            .unwrap()
            .failures
            .entry(verb.to_string())
            .or_default()
            .push_back(error);
    }

    /// The task of `verb vmid` (`create 100`, `start 100`) ends with an error exit status.
    pub fn fail_task(&self, verb: &str, vmid: u32) {
        self.state.lock().unwrap().failing_tasks.push(format!("{verb} {vmid}"));
    }

    /// Tasks of `verb` take `duration` (on tokio's clock: pause it in tests).
    pub fn set_task_duration(&self, verb: &str, duration: std::time::Duration) {
        self.state.lock().unwrap().task_durations.insert(verb.into(), duration);
    }

    /// Someone sets `key` of `vmid` between driftless's read and its next update.
    pub fn edit_before_next_update(&self, vmid: u32, key: &str, value: &str) {
        self.state.lock().unwrap().edit_before_update = Some((vmid, key.into(), value.into()));
    }

    /// A fresh Proxmox VE host named `pve`: online, `local` (templates, ISOs) holding the
    /// examples' template and ISO, `local-lvm` (disks, 200 GiB free of 256), bridge `vmbr0`.
    pub fn with_pve_host() -> FakeProxmox {
        let fake = FakeProxmox::new();
        fake.add_node("pve", "online");
        fake.set_network("pve", &[("eno1", "eth"), ("vmbr0", "bridge")]);
        fake.set_storages(
            "pve",
            vec![
                StorageStatus {
                    storage: "local".into(),
                    kind: "dir".into(),
                    content: vec!["backup".into(), "iso".into(), "vztmpl".into()],
                    active: true,
                    enabled: true,
                    shared: false,
                    total: Some(100 << 30),
                    used: Some(8 << 30),
                    avail: Some(92 << 30),
                },
                StorageStatus {
                    storage: "local-lvm".into(),
                    kind: "lvmthin".into(),
                    content: vec!["images".into(), "rootdir".into()],
                    active: true,
                    enabled: true,
                    shared: false,
                    total: Some(256 << 30),
                    used: Some(56 << 30),
                    avail: Some(200 << 30),
                },
            ],
        );
        fake.add_volume(
            "pve",
            "local",
            "local:vztmpl/ubuntu-22.04-standard_22.04-1_amd64.tar.zst",
            "vztmpl",
        );
        fake.add_volume("pve", "local", "local:iso/metal-amd64.iso", "iso");
        fake
    }

    pub fn add_node(&self, node: &str, status: &str) {
        self.state.lock().unwrap().nodes.push(PveNode {
            node: node.to_string(),
            status: status.to_string(),
            ssl_fingerprint: None,
        });
    }

    /// `node`'s interfaces as (name, type).
    pub fn set_network(&self, node: &str, ifaces: &[(&str, &str)]) {
        let list = ifaces
            .iter()
            .map(|(iface, kind)| NetworkInterface {
                iface: iface.to_string(),
                kind: kind.to_string(),
                active: true,
            })
            .collect();
        self.state.lock().unwrap().networks.insert(node.to_string(), list);
    }

    pub fn set_storages(&self, node: &str, storages: Vec<StorageStatus>) {
        self.state.lock().unwrap().storages.insert(node.to_string(), storages);
    }

    pub fn add_volume(&self, node: &str, storage: &str, volid: &str, content: &str) {
        self.state
            .lock()
            .unwrap()
            .content
            .entry((node.to_string(), storage.to_string()))
            .or_default()
            .push(StorageVolume {
                volid: volid.to_string(),
                content: content.to_string(),
                format: String::new(),
                size: 1 << 20,
                vmid: None,
            });
    }

    pub fn remove_volume(&self, volid: &str) {
        for list in self.state.lock().unwrap().content.values_mut() {
            list.retain(|v| v.volid != volid);
        }
    }

    /// The token's privileges: ACL path -> privileges (propagating to the paths below).
    pub fn set_privileges(&self, acl: &[(&str, &[&str])]) {
        self.state.lock().unwrap().privileges = Some(
            acl.iter()
                .map(|(path, privs)| (path.to_string(), privs.iter().map(|p| p.to_string()).collect()))
                .collect(),
        );
    }

    /// The guest's raw `lxc.*` keys, as the API lists them.
    pub fn set_raw_lxc(&self, vmid: u32, raw: &[(&str, &str)]) {
        if let Some(g) = self.state.lock().unwrap().guests.get_mut(&vmid) {
            g.config.raw_lxc = raw.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        }
    }

    fn call(&self, call: String) -> std::sync::MutexGuard<'_, ProxmoxState> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(call);
        s
    }

    fn upid(verb: &str, vmid: u32) -> Upid {
        Upid(format!("UPID:pve:00000001:00000001:00000001:{verb}:{vmid}:root@pam:"))
    }
}

fn no_guest(vmid: u32) -> ProxmoxError {
    ProxmoxError::Api {
        status: 500,
        what: format!("vmid {vmid}"),
        message: format!("Configuration file 'nodes/pve/lxc/{vmid}.conf' does not exist"),
    }
}

impl ProxmoxApi for FakeProxmox {
    async fn list_guests(&self) -> Result<Vec<GuestSummary>, ProxmoxError> {
        let mut s = self.call("list".into());
        if let Some(e) = s.take_failure("list") {
            return Err(e);
        }
        Ok(s.guests.values().map(|g| g.summary.clone()).collect())
    }

    async fn read_config(&self, _node: &str, _kind: PveKind, vmid: u32) -> Result<LiveConfig, ProxmoxError> {
        let mut s = self.call(format!("read {vmid}"));
        if let Some(e) = s.take_failure("read") {
            return Err(e);
        }
        s.guests
            .get(&vmid)
            .map(|g| g.config.clone())
            .ok_or_else(|| no_guest(vmid))
    }

    async fn create(&self, node: &str, kind: PveKind, params: &BTreeMap<String, String>) -> Result<Upid, ProxmoxError> {
        let vmid: u32 = params.get("vmid").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut s = self.call(format!("create {vmid}"));
        if let Some(e) = s.take_failure("create") {
            return Err(e);
        }
        let mut options = params.clone();
        options.remove("vmid");
        let tags = options
            .get("tags")
            .map(|t| t.split([';', ',']).map(str::to_string).collect())
            .unwrap_or_default();
        let digest = s.next_digest();
        s.guests.insert(
            vmid,
            FakeGuest {
                summary: GuestSummary {
                    vmid,
                    node: node.to_string(),
                    kind,
                    name: options.get("hostname").or(options.get("name")).cloned(),
                    status: "stopped".into(),
                    tags,
                },
                config: LiveConfig {
                    options,
                    raw_lxc: Vec::new(),
                    digest,
                },
            },
        );
        Ok(FakeProxmox::upid("create", vmid))
    }

    async fn update_config(
        &self,
        _node: &str,
        _kind: PveKind,
        vmid: u32,
        set: &BTreeMap<String, String>,
        delete: &[String],
        digest: &str,
    ) -> Result<(), ProxmoxError> {
        let keys: Vec<&str> = set
            .keys()
            .map(String::as_str)
            .chain(delete.iter().map(String::as_str))
            .collect();
        let mut s = self.call(format!("update {vmid} {}", keys.join(",")));
        if let Some(e) = s.take_failure("update") {
            return Err(e);
        }
        if let Some((edited, key, value)) = s.edit_before_update.take() {
            let new = s.next_digest();
            if let Some(g) = s.guests.get_mut(&edited) {
                g.config.options.insert(key, value);
                g.config.digest = new;
            }
        }
        let new = s.next_digest();
        let guest = s.guests.get_mut(&vmid).ok_or_else(|| no_guest(vmid))?;
        if guest.config.digest != digest {
            return Err(ProxmoxError::DigestMismatch);
        }
        for (k, v) in set {
            guest.config.options.insert(k.clone(), v.clone());
        }
        for k in delete {
            guest.config.options.remove(k);
        }
        guest.config.digest = new;
        Ok(())
    }

    async fn power(&self, _node: &str, _kind: PveKind, vmid: u32, action: PowerAction) -> Result<Upid, ProxmoxError> {
        let mut s = self.call(format!("{} {vmid}", action.as_str()));
        if let Some(e) = s.take_failure("power") {
            return Err(e);
        }
        let guest = s.guests.get_mut(&vmid).ok_or_else(|| no_guest(vmid))?;
        guest.summary.status = match action {
            PowerAction::Start | PowerAction::Reboot => "running",
            PowerAction::Shutdown | PowerAction::Stop => "stopped",
        }
        .into();
        Ok(FakeProxmox::upid(action.as_str(), vmid))
    }

    async fn delete_guest(&self, _node: &str, _kind: PveKind, vmid: u32) -> Result<Upid, ProxmoxError> {
        let mut s = self.call(format!("delete {vmid}"));
        if let Some(e) = s.take_failure("delete") {
            return Err(e);
        }
        s.guests.remove(&vmid).ok_or_else(|| no_guest(vmid))?;
        Ok(FakeProxmox::upid("delete", vmid))
    }

    async fn wait_task(&self, upid: &Upid) -> Result<(), ProxmoxError> {
        let fields: Vec<&str> = upid.0.split(':').collect();
        let verb = fields.get(5).copied().unwrap_or("");
        let task = format!("{verb} {}", fields.get(6).unwrap_or(&""));
        let duration = self.call(format!("wait {task}")).task_durations.get(verb).copied();
        if let Some(d) = duration {
            tokio::time::sleep(d).await;
        }
        let s = self.state.lock().unwrap();
        if s.failing_tasks.contains(&task) {
            return Err(ProxmoxError::TaskFailed {
                upid: upid.0.clone(),
                exit_status: "command failed".into(),
            });
        }
        Ok(())
    }

    async fn api_version(&self) -> Result<PveVersion, ProxmoxError> {
        let mut s = self.call("version".into());
        if let Some(e) = s.take_failure("version") {
            return Err(e);
        }
        Ok(PveVersion {
            version: "9.1.3".into(),
            release: "9.1".into(),
        })
    }

    async fn permissions(&self, path: Option<&str>) -> Result<Permissions, ProxmoxError> {
        let mut s = self.call(format!("permissions {}", path.unwrap_or("")));
        if let Some(e) = s.take_failure("permissions") {
            return Err(e);
        }
        let full: BTreeMap<String, Vec<String>> =
            BTreeMap::from([("/".to_string(), ALL_PRIVILEGES.iter().map(|p| p.to_string()).collect())]);
        let acl = s.privileges.as_ref().unwrap_or(&full);
        Ok(match path {
            Some(p) => BTreeMap::from([(p.to_string(), privileges_at(acl, p))]),
            None => acl.keys().map(|p| (p.clone(), privileges_at(acl, p))).collect(),
        })
    }

    async fn nodes(&self) -> Result<Vec<PveNode>, ProxmoxError> {
        let mut s = self.call("nodes".into());
        if let Some(e) = s.take_failure("nodes") {
            return Err(e);
        }
        Ok(s.nodes.clone())
    }

    async fn node_network(&self, node: &str) -> Result<Vec<NetworkInterface>, ProxmoxError> {
        let mut s = self.call(format!("network {node}"));
        if let Some(e) = s.take_failure("network") {
            return Err(e);
        }
        Ok(s.networks.get(node).cloned().unwrap_or_default())
    }

    async fn storages(&self, node: &str) -> Result<Vec<StorageStatus>, ProxmoxError> {
        let mut s = self.call(format!("storages {node}"));
        if let Some(e) = s.take_failure("storages") {
            return Err(e);
        }
        Ok(s.storages.get(node).cloned().unwrap_or_default())
    }

    async fn storage_status(&self, node: &str, storage: &str) -> Result<StorageStatus, ProxmoxError> {
        let mut s = self.call(format!("storage_status {node} {storage}"));
        if let Some(e) = s.take_failure("storage_status") {
            return Err(e);
        }
        s.storages
            .get(node)
            .and_then(|l| l.iter().find(|st| st.storage == storage))
            .cloned()
            .ok_or_else(|| no_storage(storage))
    }

    async fn storage_content(
        &self,
        node: &str,
        storage: &str,
        content: Option<&str>,
    ) -> Result<Vec<StorageVolume>, ProxmoxError> {
        let mut s = self.call(format!("content {node} {storage}"));
        if let Some(e) = s.take_failure("content") {
            return Err(e);
        }
        if !s
            .storages
            .get(node)
            .is_some_and(|l| l.iter().any(|st| st.storage == storage))
        {
            return Err(no_storage(storage));
        }
        Ok(s.content
            .get(&(node.to_string(), storage.to_string()))
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| content.is_none_or(|c| v.content == c))
            .collect())
    }
}

fn no_storage(storage: &str) -> ProxmoxError {
    ProxmoxError::Api {
        status: 500,
        what: format!("storage {storage}"),
        message: format!("storage '{storage}' does not exist"),
    }
}

/// The privileges `acl` gives on `path`: those of `path` and of every path above it.
fn privileges_at(acl: &BTreeMap<String, Vec<String>>, path: &str) -> BTreeMap<String, bool> {
    acl.iter()
        .filter(|(p, _)| {
            p.as_str() == "/" || path == p.as_str() || path.starts_with(&format!("{}/", p.trim_end_matches('/')))
        })
        .flat_map(|(_, privs)| privs.iter().map(|p| (p.clone(), true)))
        .collect()
}

/// A Proxmox host shell that runs nothing: it records argv and answers success, and keeps
/// files in memory.
/// Commands a fake shell ran: the Proxmox node and argv.
type Ran = Arc<Mutex<Vec<(String, Vec<String>)>>>;

#[derive(Debug, Clone, Default)]
pub struct FakeHostShell {
    pub commands: Ran,
    pub files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl HostShell for FakeHostShell {
    async fn run(&self, pve_node: &str, argv: &[String], _stdin: &[u8]) -> Result<CommandOutput, ShellError> {
        self.commands
            .lock()
            .unwrap()
            .push((pve_node.to_string(), argv.to_vec()));
        Ok(CommandOutput {
            status: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
        })
    }

    async fn read_file(&self, pve_node: &str, path: &str) -> Result<Vec<u8>, ShellError> {
        self.files
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .ok_or_else(|| ShellError::Other(format!("{path} on {pve_node}: no such file")))
    }

    async fn write_file_if_unchanged(
        &self,
        pve_node: &str,
        path: &str,
        contents: &[u8],
        expected_sha1: &str,
    ) -> Result<(), ShellError> {
        use sha1::Digest;
        let mut files = self.files.lock().unwrap();
        let current = files.get(path).map(|c| format!("{:x}", sha1::Sha1::digest(c)));
        if current.as_deref().is_some_and(|c| c != expected_sha1) {
            return Err(ShellError::Changed {
                host: pve_node.to_string(),
                path: path.to_string(),
            });
        }
        files.insert(path.to_string(), contents.to_vec());
        Ok(())
    }
}

/// A node's shell: files in memory, every command recorded and answered by the first
/// scripted answer whose needle appears in its argv (exit 0 and no output otherwise).
#[derive(Debug, Clone, Default)]
pub struct FakeNode {
    pub name: String,
    pub files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    pub commands: Arc<Mutex<Vec<Vec<String>>>>,
    answers: Arc<Mutex<Vec<(String, CommandOutput)>>>,
    pub booting: bool,
}

impl FakeNode {
    pub fn new(name: &str) -> FakeNode {
        FakeNode {
            name: name.to_string(),
            ..FakeNode::default()
        }
    }

    /// Answer commands whose argv contains `needle` with `status` and `stdout`.
    pub fn answer(&self, needle: &str, status: u32, stdout: &str) {
        self.answers.lock().unwrap().push((
            needle.to_string(),
            CommandOutput {
                status,
                stdout: stdout.as_bytes().to_vec(),
                stderr: Vec::new(),
            },
        ));
    }
}

impl NodeShell for FakeNode {
    fn describe(&self) -> String {
        format!("fake {}", self.name)
    }

    async fn run(&self, argv: &[String], _stdin: &[u8]) -> Result<CommandOutput, ShellError> {
        self.commands.lock().unwrap().push(argv.to_vec());
        let answers = self.answers.lock().unwrap();
        let answer = answers
            .iter()
            .find(|(needle, _)| argv.iter().any(|a| a.contains(needle.as_str())));
        Ok(answer.map(|(_, out)| out.clone()).unwrap_or(CommandOutput {
            status: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }))
    }

    async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, ShellError> {
        Ok(self.files.lock().unwrap().get(path).cloned())
    }

    async fn write_file(&self, path: &str, contents: &[u8], _mode: u32) -> Result<(), ShellError> {
        self.files.lock().unwrap().insert(path.to_string(), contents.to_vec());
        Ok(())
    }

    async fn push_from_host(&self, host_path: &str, dest: &str, _mode: u32) -> Result<(), ShellError> {
        self.commands
            .lock()
            .unwrap()
            .push(vec!["push".into(), host_path.into(), dest.into()]);
        Ok(())
    }

    fn may_be_booting(&self) -> bool {
        self.booting
    }
}

#[derive(Debug, Default)]
struct KubeState {
    nodes: Vec<KubeNode>,
    /// For each node name, how many more `nodes()` calls see it NotReady before it is Ready.
    ready_after: BTreeMap<String, u32>,
    readyz: Option<String>,
    patches: Vec<(String, NodePatch)>,
    calls: u32,
    /// Stored objects: (apiVersion, kind, namespace, name) -> object.
    objects: BTreeMap<(String, String, String, String), serde_json::Value>,
    /// Every write, in order: `apply Kind/ns/name`, `delete Kind/ns/name`.
    writes: Vec<String>,
    /// Objects (by name) that never get healthy, and that conflict with another manager.
    stuck: BTreeSet<String>,
    conflicting: BTreeSet<String>,
    /// Dry-run applies asked for.
    dry_runs: usize,
}

/// The kinds the fake serves besides those of its stored CRDs: (apiVersion, kind, plural, namespaced).
const FAKE_KINDS: &[(&str, &str, &str, bool)] = &[
    ("v1", "Namespace", "namespaces", false),
    ("v1", "ConfigMap", "configmaps", true),
    ("v1", "Secret", "secrets", true),
    ("v1", "Service", "services", true),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("apps/v1", "Deployment", "deployments", true),
    ("apps/v1", "DaemonSet", "daemonsets", true),
    ("apps/v1", "StatefulSet", "statefulsets", true),
    ("batch/v1", "Job", "jobs", true),
    (
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
    ),
    ("helm.cattle.io/v1", "HelmChart", "helmcharts", true),
];

/// A Kubernetes API in memory: nodes that become Ready after a number of looks (or never).
#[derive(Debug, Clone, Default)]
pub struct FakeKube {
    state: Arc<Mutex<KubeState>>,
}

impl FakeKube {
    /// `name` is registered and Ready.
    pub fn ready_node(&self, name: &str) {
        self.node_ready_after(name, 0);
    }

    /// `name` is registered, and NotReady for the next `looks` reads of the node list
    /// (`u32::MAX`: never Ready).
    pub fn node_ready_after(&self, name: &str, looks: u32) {
        let mut s = self.state.lock().unwrap();
        s.nodes.retain(|n| n.name != name);
        s.nodes.push(KubeNode {
            name: name.to_string(),
            ready: looks == 0,
            not_ready_reason: (looks > 0).then(|| "container runtime network not ready".to_string()),
            kubelet_version: "v1.31.4+k3s1".into(),
            ..KubeNode::default()
        });
        s.ready_after.insert(name.to_string(), looks);
    }

    /// The kubelet version `name` reports.
    pub fn set_kubelet_version(&self, name: &str, version: &str) {
        let mut s = self.state.lock().unwrap();
        if let Some(node) = s.nodes.iter_mut().find(|n| n.name == name) {
            node.kubelet_version = version.to_string();
        }
    }

    pub fn set_readyz_failing(&self, why: Option<&str>) {
        self.state.lock().unwrap().readyz = why.map(str::to_string);
    }

    /// How many times the node list was read.
    pub fn looks(&self) -> u32 {
        self.state.lock().unwrap().calls
    }

    pub fn patches(&self) -> Vec<(String, NodePatch)> {
        self.state.lock().unwrap().patches.clone()
    }

    /// Every object write so far, in order (`apply Kind/ns/name`, `delete Kind/ns/name`).
    pub fn writes(&self) -> Vec<String> {
        self.state.lock().unwrap().writes.clone()
    }

    /// How many dry-run applies were asked for.
    pub fn dry_runs(&self) -> usize {
        self.state.lock().unwrap().dry_runs
    }

    /// The object named `name` never gets healthy.
    pub fn stuck(&self, name: &str) {
        self.state.lock().unwrap().stuck.insert(name.to_string());
    }

    /// The object named `name` has fields another manager owns: an apply without force is refused.
    pub fn conflicting(&self, name: &str) {
        self.state.lock().unwrap().conflicting.insert(name.to_string());
    }

    /// Store an object as if someone else had made or changed it.
    pub fn put_object(&self, object: serde_json::Value) {
        let k = fake_key(&object);
        self.state.lock().unwrap().objects.insert(k, object);
    }

    pub fn object(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<serde_json::Value> {
        let k = (api_version.into(), kind.into(), namespace.into(), name.into());
        self.state.lock().unwrap().objects.get(&k).cloned()
    }
}

fn fake_key(o: &serde_json::Value) -> (String, String, String, String) {
    let s = |p: &str| o.pointer(p).and_then(|v| v.as_str()).unwrap_or("").to_string();
    (
        s("/apiVersion"),
        s("/kind"),
        s("/metadata/namespace"),
        s("/metadata/name"),
    )
}

fn fake_show(k: &(String, String, String, String)) -> String {
    if k.2.is_empty() {
        format!("{}/{}", k.1, k.3)
    } else {
        format!("{}/{}/{}", k.1, k.2, k.3)
    }
}

/// `over` merged into `base`: mappings key by key, everything else replaced.
fn fake_merge(base: &mut serde_json::Value, over: &serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                fake_merge(b.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// What the fake's controllers would report at once: rolled out, complete, installed.
fn fake_status(o: &mut serde_json::Value, healthy: bool) {
    use serde_json::json;
    let generation = o.pointer("/metadata/generation").and_then(|g| g.as_i64()).unwrap_or(1);
    let replicas = o.pointer("/spec/replicas").and_then(|r| r.as_i64()).unwrap_or(1);
    let n = if healthy { replicas } else { 0 };
    let status = match o["kind"].as_str().unwrap_or("") {
        "Deployment" | "StatefulSet" => {
            json!({"observedGeneration": generation, "readyReplicas": n, "updatedReplicas": n, "replicas": replicas})
        }
        "DaemonSet" => json!({"observedGeneration": generation, "desiredNumberScheduled": 2,
                              "numberReady": if healthy { 2 } else { 0 }, "updatedNumberScheduled": 2}),
        "Job" if healthy => json!({"conditions": [{"type": "Complete", "status": "True"}]}),
        "Job" => json!({"active": 1}),
        "CustomResourceDefinition" => json!({"conditions": [{"type": "Established", "status": "True"}]}),
        "HelmChart" => json!({"jobName": format!("helm-install-{}", o["metadata"]["name"].as_str().unwrap_or(""))}),
        _ => return,
    };
    o["status"] = status;
}

impl FakeKube {
    fn kind_of(&self, api_version: &str, kind: &str) -> Option<ApiKind> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let make = |plural: &str, namespaced| ApiKind {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
        };
        if let Some((_, _, plural, namespaced)) = FAKE_KINDS.iter().find(|k| k.0 == api_version && k.1 == kind) {
            return Some(make(plural, *namespaced));
        }
        // A stored CRD serves its kind.
        let s = self.state.lock().unwrap();
        s.objects.values().find_map(|o| {
            (o["kind"] == "CustomResourceDefinition"
                && o.pointer("/spec/group").and_then(|g| g.as_str()) == Some(group)
                && o.pointer("/spec/names/kind").and_then(|k| k.as_str()) == Some(kind))
            .then(|| {
                make(
                    o.pointer("/spec/names/plural").and_then(|p| p.as_str()).unwrap_or(""),
                    o.pointer("/spec/scope").and_then(|p| p.as_str()) == Some("Namespaced"),
                )
            })
        })
    }
}

impl KubeApi for FakeKube {
    async fn readyz(&self) -> Result<(), KubeError> {
        match &self.state.lock().unwrap().readyz {
            None => Ok(()),
            Some(why) => Err(KubeError::Api {
                status: 500,
                message: why.clone(),
            }),
        }
    }

    async fn nodes(&self) -> Result<Vec<KubeNode>, KubeError> {
        let mut s = self.state.lock().unwrap();
        s.calls += 1;
        let KubeState { nodes, ready_after, .. } = &mut *s;
        for node in nodes.iter_mut() {
            let left = ready_after.entry(node.name.clone()).or_insert(0);
            if *left == 0 {
                node.ready = true;
                node.not_ready_reason = None;
            } else if *left != u32::MAX {
                *left -= 1;
            }
        }
        Ok(nodes.clone())
    }

    async fn patch_node(&self, name: &str, patch: &NodePatch) -> Result<(), KubeError> {
        self.state
            .lock()
            .unwrap()
            .patches
            .push((name.to_string(), patch.clone()));
        Ok(())
    }

    async fn pods(&self, _namespace: &str) -> Result<Vec<PodSummary>, KubeError> {
        Ok(Vec::new())
    }

    async fn resolve(&self, api_version: &str, kind: &str) -> Result<Option<ApiKind>, KubeError> {
        Ok(self.kind_of(api_version, kind))
    }

    async fn get_object(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<serde_json::Value>, KubeError> {
        let k = (
            kind.api_version(),
            kind.kind.clone(),
            namespace.unwrap_or("").into(),
            name.into(),
        );
        Ok(self.state.lock().unwrap().objects.get(&k).cloned())
    }

    async fn apply_object(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        object: &serde_json::Value,
        dry_run: bool,
        force: bool,
    ) -> Result<serde_json::Value, KubeError> {
        let mut s = self.state.lock().unwrap();
        if dry_run {
            s.dry_runs += 1;
        }
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
        let k = (
            kind.api_version(),
            kind.kind.clone(),
            namespace.unwrap_or("").into(),
            name.clone(),
        );
        if !force && s.conflicting.contains(&name) {
            return Err(KubeError::Api {
                status: 409,
                message: "Apply failed with 1 conflict: conflict with \"kubectl-edit\": .spec.replicas".into(),
            });
        }
        let mut stored = s.objects.get(&k).cloned().unwrap_or_else(|| serde_json::json!({}));
        let before = stored.clone();
        fake_merge(&mut stored, object);
        let generation = before
            .pointer("/metadata/generation")
            .and_then(|g| g.as_i64())
            .unwrap_or(0);
        let changed = before.get("spec") != stored.get("spec") || generation == 0;
        stored["metadata"]["generation"] = serde_json::json!(if changed { generation + 1 } else { generation });
        if dry_run {
            return Ok(stored);
        }
        let healthy = !s.stuck.contains(&name);
        fake_status(&mut stored, healthy);
        if kind.kind == "HelmChart" {
            let job = serde_json::json!({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": format!("helm-install-{name}"), "namespace": namespace.unwrap_or("")},
                "status": {"conditions": [{"type": if healthy { "Complete" } else { "Pending" }, "status": "True"}]}});
            s.objects.insert(fake_key(&job), job);
        }
        s.writes.push(format!("apply {}", fake_show(&k)));
        s.objects.insert(k, stored.clone());
        Ok(stored)
    }

    async fn delete_object(&self, kind: &ApiKind, namespace: Option<&str>, name: &str) -> Result<bool, KubeError> {
        let mut s = self.state.lock().unwrap();
        let k = (
            kind.api_version(),
            kind.kind.clone(),
            namespace.unwrap_or("").into(),
            name.into(),
        );
        let found = s.objects.remove(&k).is_some();
        if found {
            s.writes.push(format!("delete {}", fake_show(&k)));
        }
        Ok(found)
    }

    async fn list_objects(
        &self,
        kind: &ApiKind,
        namespace: Option<&str>,
        label_selector: &str,
    ) -> Result<Vec<serde_json::Value>, KubeError> {
        let (label, value) = label_selector.split_once('=').unwrap_or((label_selector, ""));
        let s = self.state.lock().unwrap();
        Ok(s.objects
            .iter()
            .filter(|(k, o)| {
                k.0 == kind.api_version()
                    && k.1 == kind.kind
                    && namespace.is_none_or(|ns| k.2 == ns)
                    && o.pointer("/metadata/labels")
                        .and_then(|l| l.get(label))
                        .and_then(|v| v.as_str())
                        == Some(value)
            })
            .map(|(_, o)| o.clone())
            .collect())
    }
}

/// A Talos API in memory: each node in maintenance mode until it gets a config. An
/// [`impostor`](FakeTalos::impostor) address answers as a machine whose certificate the
/// cluster CA did not sign: probes and mTLS calls fail with `TalosError::Untrusted`, and what
/// is sent to it in maintenance mode (no verification) it keeps, like a real one would.
#[derive(Debug, Clone, Default)]
pub struct FakeTalos {
    /// Every config sent for real: (node address, in maintenance mode).
    pub applied: Arc<Mutex<Vec<(String, bool)>>>,
    configured: Arc<Mutex<BTreeMap<String, bool>>>,
    impostors: Arc<Mutex<BTreeSet<String>>>,
    /// Every upgrade asked for: (node address, installer image).
    pub upgrades: Arc<Mutex<Vec<(String, String)>>>,
    /// The Talos version per node address (`v1.13.9` when not set).
    versions: Arc<Mutex<BTreeMap<String, String>>>,
    /// Per node, how many more probes find it rebooting (unreachable).
    rebooting: Arc<Mutex<BTreeMap<String, u32>>>,
    /// Nodes whose upgrade is acknowledged but which come back with their old version.
    stuck: Arc<Mutex<BTreeSet<String>>>,
    /// Nodes sent an upgrade while another node was still rebooting.
    pub overlapping: Arc<Mutex<Vec<String>>>,
}

impl FakeTalos {
    /// The node at `addr` runs a config of the cluster (answers over mTLS).
    pub fn configure(&self, addr: &str) {
        self.configured.lock().unwrap().insert(addr.to_string(), true);
    }

    /// The node at `addr` is configured and runs Talos `version`.
    pub fn configure_version(&self, addr: &str, version: &str) {
        self.configure(addr);
        self.versions
            .lock()
            .unwrap()
            .insert(addr.to_string(), version.to_string());
    }

    /// An upgrade of `addr` is acknowledged, but the node comes back with its old version.
    pub fn stuck(&self, addr: &str) {
        self.stuck.lock().unwrap().insert(addr.to_string());
    }

    /// Something that is not the cluster's node answers at `addr`.
    pub fn impostor(&self, addr: &str) {
        self.impostors.lock().unwrap().insert(addr.to_string());
    }

    fn untrusted(&self, node: &str) -> Option<TalosError> {
        self.impostors
            .lock()
            .unwrap()
            .contains(node)
            .then(|| TalosError::Untrusted {
                node: node.to_string(),
                message: "the cluster CA (the talosconfig's `ca`) did not sign its certificate, and it does not \
                          answer as Talos's maintenance service does"
                    .into(),
            })
    }
}

impl TalosApi for FakeTalos {
    async fn probe(&self, node: &str) -> Result<TalosNodeState, TalosError> {
        if let Some(e) = self.untrusted(node) {
            return Err(e);
        }
        if let Some(left) = self.rebooting.lock().unwrap().get_mut(node).filter(|left| **left > 0) {
            *left -= 1;
            return Err(TalosError::Transport {
                node: node.to_string(),
                message: "connection refused (rebooting)".into(),
            });
        }
        Ok(if self.configured.lock().unwrap().contains_key(node) {
            TalosNodeState::Configured {
                version: self
                    .versions
                    .lock()
                    .unwrap()
                    .get(node)
                    .cloned()
                    .unwrap_or_else(|| "v1.13.9".into()),
            }
        } else {
            TalosNodeState::Maintenance
        })
    }

    async fn apply_configuration(
        &self,
        node: &str,
        _config: &[u8],
        mode: TalosApplyMode,
        dry_run: bool,
        maintenance: bool,
    ) -> Result<TalosApplyResult, TalosError> {
        if !maintenance && let Some(e) = self.untrusted(node) {
            return Err(e);
        }
        if !dry_run {
            self.applied.lock().unwrap().push((node.to_string(), maintenance));
            self.configured.lock().unwrap().insert(node.to_string(), true);
        }
        Ok(TalosApplyResult {
            mode: mode.as_str().into(),
            ..TalosApplyResult::default()
        })
    }

    async fn bootstrap(&self, node: &str) -> Result<bool, TalosError> {
        self.untrusted(node).map_or(Ok(true), Err)
    }

    async fn kubeconfig(&self, node: &str) -> Result<Vec<u8>, TalosError> {
        self.untrusted(node)
            .map_or(Ok(b"apiVersion: v1\nkind: Config\n".to_vec()), Err)
    }

    /// Acknowledged; the node is unreachable for the next 2 probes, then runs the image's tag
    /// (its old version when [`stuck`](FakeTalos::stuck)).
    async fn upgrade(&self, node: &str, image: &str) -> Result<String, TalosError> {
        if let Some(e) = self.untrusted(node) {
            return Err(e);
        }
        self.upgrades
            .lock()
            .unwrap()
            .push((node.to_string(), image.to_string()));
        if self.rebooting.lock().unwrap().values().any(|left| *left > 0) {
            self.overlapping.lock().unwrap().push(node.to_string());
        }
        if !self.stuck.lock().unwrap().contains(node)
            && let Some((_, tag)) = image.rsplit_once(':')
        {
            self.versions.lock().unwrap().insert(node.to_string(), tag.to_string());
        }
        self.rebooting.lock().unwrap().insert(node.to_string(), 2);
        Ok("Upgrade request received".into())
    }
}

/// A cluster connector over fake nodes and APIs. Nodes not added are unreachable.
#[derive(Debug, Clone, Default)]
pub struct FakeCluster {
    pub nodes: BTreeMap<String, FakeNode>,
    pub kube: FakeKube,
    pub talos: FakeTalos,
}

impl FakeCluster {
    pub fn with_nodes(names: &[&str]) -> FakeCluster {
        FakeCluster {
            nodes: names.iter().map(|n| (n.to_string(), FakeNode::new(n))).collect(),
            ..FakeCluster::default()
        }
    }
}

impl ClusterConnector for FakeCluster {
    type Node<'a> = FakeNode;
    type Kube = FakeKube;
    type Talos = FakeTalos;

    fn node_shell(&self, node: &NodeTarget) -> Option<FakeNode> {
        self.nodes.get(&node.name).cloned()
    }

    fn kube(&self, _kubeconfig: &[u8]) -> Result<FakeKube, KubeError> {
        Ok(self.kube.clone())
    }

    fn talos(&self, _talosconfig: &[u8]) -> Result<FakeTalos, TalosError> {
        Ok(self.talos.clone())
    }
}
