//! The simulated cluster's shared state, in files under `STATE/.sandbox/k8s/`, so the
//! separate processes of the sandbox agree: `driftless-sandbox pct exec` (K3s on a simulated
//! container, run over SSH like the real `pct`), the Talos API and the Kubernetes API (both
//! served by `sandbox::start`). Every write is atomic; every read sees the latest file.
//!
//! * `nodes/<name>.json`: a [`SimNode`], written when a kubelet registers (K3s started with a
//!   config, or Talos applied a config) and patched by the Kubernetes API (labels, taints).
//! * `admin.kubeconfig`: the kubeconfig of the simulated API server (its own CA, a bearer
//!   token), written by `sandbox::start`; the simulated K3s server copies it to
//!   /etc/rancher/k3s/k3s.yaml (with `https://127.0.0.1:6443` like K3s), the Talos API
//!   returns it from `Kubeconfig`.
//! * `never-ready`: node names, one per line, whose kubelet never becomes Ready (a test knob).
//! * `cni`: the CNI the cluster brings itself, as its configuration chose it: `flannel` (K3s's
//!   and Talos's default), `none` (K3s `flannel-backend: none`, Talos `cluster.network.cni.name:
//!   none`) or `custom` (Talos applies the configured manifests). Written by the simulated K3s
//!   server and the Talos API when a config registers a node.
//! * `require-cni`: present when the Kubernetes API enforces the CNI: then the nodes of a
//!   cluster whose CNI is `none` stay NotReady until a CNI add-on runs (see `kube_api`).
//! * `objects/`: every other Kubernetes object, kept by the Kubernetes API (`kube_api::store`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::atomic_write;
use driftless::ports::Taint;

/// A simulated kubelet's node object.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SimNode {
    pub name: String,
    /// The guest it runs in: the node is Ready only while that guest is running.
    pub vmid: Option<u32>,
    pub internal_ip: String,
    /// `v1.31.4+k3s1` (K3s) or `v1.34.1` (Talos: the kubelet's version).
    pub kubelet_version: String,
    /// `server`/`agent` (K3s) or `controlplane`/`worker` (Talos).
    pub role: String,
    /// The kubelet runs (K3s service active / Talos configured).
    pub kubelet_running: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// Unix milliseconds until which the machine reboots (a Talos upgrade): its kubelet is
    /// down until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebooting_until_ms: Option<u64>,
}

impl SimNode {
    /// The machine is rebooting now.
    pub fn rebooting(&self) -> bool {
        self.rebooting_until_ms.is_some_and(|until| now_ms() < until)
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(".sandbox").join("k8s")
}

fn node_path(state_dir: &Path, name: &str) -> PathBuf {
    dir(state_dir).join("nodes").join(format!("{name}.json"))
}

pub fn admin_kubeconfig_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("admin.kubeconfig")
}

pub fn read_node(state_dir: &Path, name: &str) -> Option<SimNode> {
    let bytes = std::fs::read(node_path(state_dir, name)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn write_node(state_dir: &Path, node: &SimNode) -> std::io::Result<()> {
    let path = node_path(state_dir, &node.name);
    std::fs::create_dir_all(path.parent().expect("node files live in a directory"))?;
    let json = serde_json::to_vec_pretty(node).map_err(std::io::Error::other)?;
    atomic_write(&path, &json)
}

/// Every registered node, by name.
pub fn nodes(state_dir: &Path) -> Vec<SimNode> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir).join("nodes")) else {
        return Vec::new();
    };
    let mut out: Vec<SimNode> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Names of nodes whose kubelet never becomes Ready.
pub fn never_ready(state_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir(state_dir).join("never-ready"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

pub fn set_never_ready(state_dir: &Path, names: &[&str]) -> std::io::Result<()> {
    let d = dir(state_dir);
    std::fs::create_dir_all(&d)?;
    let mut text = names.join("\n");
    text.push('\n');
    atomic_write(&d.join("never-ready"), text.as_bytes())
}

/// The CNI a cluster's own configuration provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinCni {
    /// Flannel, K3s's and Talos's default: nodes get a network as they register.
    Flannel,
    /// Talos's `custom`: Talos applies the configured manifests (taken as a working CNI).
    Custom,
    /// None: the nodes stay NotReady until a CNI is installed as an add-on.
    None,
}

impl BuiltinCni {
    pub fn as_str(self) -> &'static str {
        match self {
            BuiltinCni::Flannel => "flannel",
            BuiltinCni::Custom => "custom",
            BuiltinCni::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<BuiltinCni> {
        Some(match s.trim() {
            "flannel" => BuiltinCni::Flannel,
            "custom" => BuiltinCni::Custom,
            "none" => BuiltinCni::None,
            _ => return None,
        })
    }
}

/// The CNI the cluster brings itself; Flannel when no config said otherwise.
pub fn builtin_cni(state_dir: &Path) -> BuiltinCni {
    std::fs::read_to_string(dir(state_dir).join("cni"))
        .ok()
        .and_then(|s| BuiltinCni::parse(&s))
        .unwrap_or(BuiltinCni::Flannel)
}

/// Records the CNI choice of the cluster's configuration (K3s server config, Talos config).
pub fn set_builtin_cni(state_dir: &Path, cni: BuiltinCni) -> std::io::Result<()> {
    let d = dir(state_dir);
    std::fs::create_dir_all(&d)?;
    let path = d.join("cni");
    if std::fs::read_to_string(&path).ok().as_deref().map(str::trim) == Some(cni.as_str()) {
        return Ok(());
    }
    atomic_write(&path, format!("{}\n", cni.as_str()).as_bytes())
}

/// Whether nodes of a cluster without a CNI stay NotReady until a CNI add-on runs.
pub fn require_cni(state_dir: &Path) -> bool {
    dir(state_dir).join("require-cni").exists()
}

pub fn set_require_cni(state_dir: &Path, on: bool) -> std::io::Result<()> {
    let d = dir(state_dir);
    let path = d.join("require-cni");
    if on {
        std::fs::create_dir_all(&d)?;
        atomic_write(&path, b"1\n")
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
