//! In-memory implementations of every port, for unit tests of plan, apply, the cluster layer
//! and the run. They keep just enough state to behave like the real systems in the ways
//! driftless depends on (digests that change with every config write, tasks that fail,
//! nodes that become Ready or not), record every call, and take injected failures.

use super::*;
use std::collections::VecDeque;
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
}

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
}

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
}

/// A Talos API in memory: each node in maintenance mode until it gets a config.
#[derive(Debug, Clone, Default)]
pub struct FakeTalos {
    pub applied: Arc<Mutex<Vec<(String, bool)>>>,
    configured: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl TalosApi for FakeTalos {
    async fn probe(&self, node: &str) -> Result<TalosNodeState, TalosError> {
        Ok(if self.configured.lock().unwrap().contains_key(node) {
            TalosNodeState::Configured {
                version: "v1.13.9".into(),
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
        if !dry_run {
            self.applied.lock().unwrap().push((node.to_string(), maintenance));
            self.configured.lock().unwrap().insert(node.to_string(), true);
        }
        Ok(TalosApplyResult {
            mode: mode.as_str().into(),
            ..TalosApplyResult::default()
        })
    }

    async fn bootstrap(&self, _node: &str) -> Result<bool, TalosError> {
        Ok(true)
    }

    async fn kubeconfig(&self, _node: &str) -> Result<Vec<u8>, TalosError> {
        Ok(b"apiVersion: v1\nkind: Config\n".to_vec())
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
