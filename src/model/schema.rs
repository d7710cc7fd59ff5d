//! The file formats users write: cluster.yaml, nodes/*.yaml and ADR config blocks.
//! Unknown keys are errors everywhere (`deny_unknown_fields`) so a typo never passes silently.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    K3s,
    Talos,
}

impl Distribution {
    pub fn roles(self) -> &'static [&'static str] {
        match self {
            Distribution::K3s => &["server", "agent"],
            Distribution::Talos => &["controlplane", "worker"],
        }
    }

    /// Whether a role runs the control plane (ordered first, carries the API endpoint).
    pub fn is_control_plane(self, role: &str) -> bool {
        matches!(
            (self, role),
            (Distribution::K3s, "server") | (Distribution::Talos, "controlplane")
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Distribution::K3s => "k3s",
            Distribution::Talos => "talos",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    Lxc,
    Vm,
}

impl GuestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Lxc => "lxc",
            GuestKind::Vm => "vm",
        }
    }

    /// The same kind as Proxmox names it: a repository's `vm` is Proxmox's `qemu`.
    pub fn pve(self) -> crate::pve::PveKind {
        match self {
            GuestKind::Lxc => crate::pve::PveKind::Lxc,
            GuestKind::Vm => crate::pve::PveKind::Qemu,
        }
    }
}

/// A reference to a secret held outside git: `{secret: NAME}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub secret: String,
}

/// A size in MiB, written as `4GiB`, `4G`, `512MiB`, `512M` or a plain number of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size {
    pub mib: u64,
}

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (write e.g. 4GiB, 512MiB or 32G)"))?;
        let factor = match unit.trim() {
            "" | "M" | "MiB" | "MB" => 1,
            "G" | "GiB" | "GB" => 1024,
            "T" | "TiB" | "TB" => 1024 * 1024,
            other => return Err(format!("unknown size unit `{other}` in `{s}` (use MiB, GiB or TiB)")),
        };
        Ok(Size { mib: n * factor })
    }

    pub fn gib(self) -> u64 {
        self.mib.div_ceil(1024)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mib.is_multiple_of(1024 * 1024) && self.mib > 0 {
            write!(f, "{}TiB", self.mib / (1024 * 1024))
        } else if self.mib.is_multiple_of(1024) && self.mib > 0 {
            write!(f, "{}GiB", self.mib / 1024)
        } else {
            write!(f, "{}MiB", self.mib)
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom("expected a size such as 4GiB or 512MiB"))? {
            Raw::Int(mib) => Ok(Size { mib }),
            Raw::Str(s) => Size::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

// ---------------------------------------------------------------- node settings

/// Everything about a node that may come from built-in defaults, an ADR, cluster.yaml
/// `defaults:` or the node file. All optional here: layers are merged key by key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    pub kind: Option<GuestKind>,
    pub cores: Option<u32>,
    pub memory: Option<Size>,
    pub swap: Option<Size>,
    pub disk: Option<Size>,
    pub storage: Option<String>,
    pub bridge: Option<String>,
    pub vlan: Option<u16>,
    /// LXC: the OS template volume (`local:vztmpl/...tar.zst`).
    pub template: Option<String>,
    /// VM: the boot ISO volume (`local:iso/metal-amd64.iso`) for Talos, or a cloud image.
    pub image: Option<String>,
    pub onboot: Option<bool>,
    pub description: Option<String>,
    pub tags: Option<Vec<String>>,
    pub labels: Option<BTreeMap<String, String>>,
    /// Kubernetes taints as `key=value:Effect`.
    pub taints: Option<Vec<String>>,
    pub lxc: Option<LxcSettings>,
    pub vm: Option<VmSettings>,
    pub k3s: Option<K3sSettings>,
    pub talos: Option<TalosSettings>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LxcSettings {
    pub unprivileged: Option<bool>,
    pub ostype: Option<String>,
    pub arch: Option<String>,
    pub features: Option<LxcFeatures>,
    /// Raw `lxc.*` keys, in order; a key may repeat (`lxc.mount.entry`, `lxc.cgroup2.devices.allow`).
    pub raw: Option<Vec<BTreeMap<String, RawValue>>>,
}

/// A raw LXC value: YAML may give `""`, a string or a number; Proxmox stores text.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawValue {
    Str(String),
    Int(i64),
    Null(()),
}

impl RawValue {
    pub fn text(&self) -> String {
        match self {
            RawValue::Str(s) => s.clone(),
            RawValue::Int(i) => i.to_string(),
            RawValue::Null(()) => String::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LxcFeatures {
    pub nesting: Option<bool>,
    pub keyctl: Option<bool>,
    pub fuse: Option<bool>,
    pub mknod: Option<bool>,
    pub force_rw_sys: Option<bool>,
    /// Allowed filesystem types, `nfs;cifs`.
    pub mount: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    pub sockets: Option<u32>,
    pub cpu: Option<String>,
    pub machine: Option<String>,
    pub bios: Option<String>,
    pub ostype: Option<String>,
    pub scsihw: Option<String>,
    pub agent: Option<bool>,
    /// The NIC model (`virtio`, `e1000`).
    pub net_model: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct K3sSettings {
    /// Extra keys for /etc/rancher/k3s/config.yaml: long K3s flag names.
    pub config: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TalosSettings {
    pub install_disk: Option<String>,
    pub install_image: Option<String>,
    /// Send the machine config to this node in maintenance mode although the run did not
    /// create its VM (a node reinstalled on purpose); unauthenticated, so set it for one apply.
    pub maintenance_apply: Option<bool>,
}

// ---------------------------------------------------------------- node files

/// The part of a node file that only the node file may set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeIdentity {
    pub name: Option<String>,
    pub vmid: u32,
    pub proxmox_node: String,
    pub role: String,
    /// The node's address with its prefix length, `192.168.2.20/24`.
    pub address: String,
    #[serde(default)]
    pub adopt: bool,
    #[serde(default)]
    pub deviations: Vec<Deviation>,
}

pub const NODE_IDENTITY_KEYS: &[&str] = &["name", "vmid", "proxmox_node", "role", "address", "adopt", "deviations"];

/// A recorded, reasoned departure from an accepted ADR (the seeds' "planned vs actual").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Deviation {
    pub adr: String,
    /// The keys this deviation covers (`cores`, `lxc.features.nesting`); all of the ADR's keys when absent.
    #[serde(default)]
    pub keys: Vec<String>,
    pub reason: String,
}

// ---------------------------------------------------------------- cluster.yaml

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub name: String,
    pub distribution: Option<Distribution>,
    pub version: Option<String>,
    pub kubernetes_version: Option<String>,
    pub cni: Option<String>,
    /// Add-ons from `addons/NAME/`, by name (an accepted ADR may declare them too).
    pub addons: Option<BTreeMap<String, AddonDecl>>,
    pub proxmox: ProxmoxSettings,
    pub network: NetworkSettings,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub reconcile: ReconcilePolicy,
    #[serde(default)]
    pub k3s: K3sCluster,
    #[serde(default)]
    pub talos: TalosCluster,
    /// The secrets this repository refers to, with what each is for. Values live outside git.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    #[serde(default)]
    pub deviations: Vec<Deviation>,
}

/// The cluster-level keys an ADR block may also set.
pub const CLUSTER_LEVEL_KEYS: &[&str] = &["distribution", "version", "kubernetes_version", "cni", "addons"];

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterLevel {
    pub distribution: Option<Distribution>,
    pub version: Option<String>,
    pub kubernetes_version: Option<String>,
    pub cni: Option<String>,
    pub addons: Option<BTreeMap<String, AddonDecl>>,
}

/// An add-on's declaration: the manifests are in `addons/NAME/*.yaml` (or `*.yaml.j2`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AddonDecl {
    /// Add-ons are applied wave by wave, lowest first; each wave is waited for.
    pub wave: u32,
    /// This add-on installs the cluster's CNI: applied first, before nodes are required Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<bool>,
    /// Take over fields another field manager owns (server-side apply `force`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_conflicts: Option<bool>,
    /// `false` turns off an add-on an ADR declares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Objects the add-on's charts or jobs create, waited for too: `Kind/namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Vec<String>>,
    /// What the add-on's templates see as `values` (an address pool, a chart version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxSettings {
    /// API endpoint(s), `https://192.168.2.10:8006`; several for a multi-host cluster.
    pub api: OneOrMany,
    pub token: Option<SecretRef>,
    /// SHA-256 fingerprint of the API's certificate (`AB:CD:...`); or `ca_file`.
    pub fingerprint: Option<String>,
    pub ca_file: Option<String>,
    /// Proxmox node name -> how to reach that host's shell.
    #[serde(default)]
    pub hosts: BTreeMap<String, ProxmoxHost>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxHost {
    /// `root@192.168.2.10`
    pub ssh: String,
    pub port: Option<u16>,
    pub known_hosts: Option<String>,
    pub key: Option<SecretRef>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    pub cidr: String,
    pub gateway: String,
    #[serde(default)]
    pub dns: Vec<String>,
    pub search_domain: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub all: Option<serde_json::Value>,
    pub lxc: Option<serde_json::Value>,
    pub vm: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcilePolicy {
    pub interval: String,
    pub drift_schedule: String,
    pub auto_correct: bool,
    pub prune: bool,
    pub ownership_tag: String,
    pub suspend: bool,
    /// How many steps apply runs at once on one Proxmox node (`--parallelism` overrides it).
    pub parallelism: u32,
}

impl Default for ReconcilePolicy {
    fn default() -> Self {
        ReconcilePolicy {
            interval: "5m".into(),
            drift_schedule: "0 */6 * * *".into(),
            auto_correct: false,
            prune: false,
            ownership_tag: "driftless".into(),
            suspend: false,
            // Enough to keep a Proxmox host busy creating containers, few enough not to queue
            // on its task workers and its storage.
            parallelism: 8,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct K3sCluster {
    /// The join token; read from the first server when absent.
    pub token: Option<SecretRef>,
    /// A K3s binary on the Proxmox host, for hosts without internet.
    pub binary: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TalosCluster {
    /// The Kubernetes API endpoint; the first control plane node's address when absent.
    pub endpoint: Option<String>,
    /// How configs are applied: auto, no-reboot, staged or try.
    pub apply_mode: Option<String>,
    /// The secrets bundle (`talosctl gen secrets`).
    pub secrets: Option<SecretRef>,
}

/// An ADR block's scope: which nodes it applies to. Every given condition must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    pub kind: Option<ScopeList<GuestKind>>,
    pub role: Option<ScopeList<String>>,
    pub nodes: Option<ScopeList<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ScopeList<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: PartialEq> ScopeList<T> {
    pub fn contains(&self, v: &T) -> bool {
        match self {
            ScopeList::One(x) => x == v,
            ScopeList::Many(xs) => xs.contains(v),
        }
    }
}

impl Scope {
    pub fn matches(&self, name: &str, kind: Option<GuestKind>, role: &str) -> bool {
        self.kind
            .as_ref()
            .is_none_or(|k| kind.is_some_and(|kind| k.contains(&kind)))
            && self.role.as_ref().is_none_or(|r| r.contains(&role.to_string()))
            && self.nodes.as_ref().is_none_or(|n| n.contains(&name.to_string()))
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(k) = &self.kind {
            parts.push(format!("kind {}", list_text(k, |k| k.as_str().to_string())));
        }
        if let Some(r) = &self.role {
            parts.push(format!("role {}", list_text(r, |r| r.clone())));
        }
        if let Some(n) = &self.nodes {
            parts.push(format!("nodes {}", list_text(n, |n| n.clone())));
        }
        if parts.is_empty() {
            "all nodes".into()
        } else {
            parts.join(", ")
        }
    }
}

fn list_text<T>(l: &ScopeList<T>, f: impl Fn(&T) -> String) -> String {
    match l {
        ScopeList::One(x) => f(x),
        ScopeList::Many(xs) => xs.iter().map(f).collect::<Vec<_>>().join("|"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(Size::parse("4GiB").unwrap().mib, 4096);
        assert_eq!(Size::parse("512M").unwrap().mib, 512);
        assert_eq!(Size::parse("32G").unwrap().to_string(), "32GiB");
        assert!(Size::parse("4 gigs").is_err());
    }
}
