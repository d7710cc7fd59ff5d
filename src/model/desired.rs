//! The desired state: what a valid repository says, fully resolved, with provenance.

use super::diag::Location;
use super::schema::*;
use ipnet::IpNet;
use serde::Serialize;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Which layer set a value. Precedence, lowest first: built-in, ADR, cluster defaults, cluster, node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "layer", content = "name")]
pub enum Source {
    Builtin,
    Adr(String),
    ClusterDefaults(String),
    Cluster,
    Node,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Builtin => write!(f, "built-in default"),
            Source::Adr(id) => write!(f, "{id}"),
            Source::ClusterDefaults(k) => write!(f, "cluster defaults.{k}"),
            Source::Cluster => write!(f, "cluster"),
            Source::Node => write!(f, "node file"),
        }
    }
}

/// One layer's word on a key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetBy {
    pub source: Source,
    pub location: Location,
    pub value: Json,
    /// For list values: where each item is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<Location>,
}

/// A final value and every layer that set it, lowest precedence first; the last one wins.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setting {
    pub value: Json,
    pub chain: Vec<SetBy>,
}

impl Setting {
    pub fn winner(&self) -> &SetBy {
        self.chain.last().expect("a setting has at least one origin")
    }

    /// `adr/ADR-001-lxc.md:52` or `built-in default`: where a reader finds this value.
    pub fn cite(&self) -> String {
        let w = self.winner();
        match w.source {
            Source::Builtin => "built-in default".into(),
            _ => format!("{}:{}", w.location.file, w.location.line),
        }
    }

    /// As [`Setting::cite`], with the ADR's id in front when an ADR set it:
    /// `ADR-001 adr/ADR-001-lxc.md:52`, the form plans and reports show.
    pub fn cite_with_adr(&self) -> String {
        match &self.winner().source {
            Source::Adr(id) => format!("{id} {}", self.cite()),
            _ => self.cite(),
        }
    }
}

pub type Provenance = BTreeMap<String, Setting>;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Network {
    pub cidr: IpNet,
    pub gateway: IpAddr,
    pub dns: Vec<IpAddr>,
    pub search_domain: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    pub name: String,
    pub distribution: Distribution,
    pub version: String,
    pub kubernetes_version: Option<String>,
    pub cni: String,
    /// Declared add-ons that are enabled, in apply order: by wave, then name.
    pub addons: Vec<Addon>,
    pub proxmox: ProxmoxSettings,
    pub network: Network,
    pub reconcile: ReconcilePolicy,
    pub k3s: K3sCluster,
    pub talos: TalosCluster,
    pub secrets: BTreeMap<String, String>,
    pub provenance: Provenance,
}

/// An add-on: Kubernetes objects from `addons/NAME/`, applied through the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Addon {
    pub name: String,
    pub wave: u32,
    /// Installs the cluster's CNI: its wave comes first and is followed by the all-nodes-Ready gate.
    pub cni: bool,
    pub force_conflicts: bool,
    /// Objects created by the add-on's charts or jobs that must be healthy too.
    pub health: Vec<HealthRef>,
    /// What its templates see as `values`.
    pub values: BTreeMap<String, Json>,
    /// Where it is declared: `ADR-002 adr/ADR-002-kubernetes-approach-talos.md:30`.
    pub declared: String,
    /// The same place, for diagnostics.
    #[serde(skip)]
    pub location: Location,
    /// Its manifest files (`addons/NAME/*.yaml`, `*.yaml.j2`), by path.
    pub files: Vec<UserTemplate>,
}

/// An object to wait for: `Kind/namespace/name`, or `Kind/name` for a cluster-wide one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct HealthRef {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl HealthRef {
    /// The kinds driftless knows how to judge: rolled out, complete, installed.
    pub const KINDS: &'static [&'static str] = &["Deployment", "DaemonSet", "StatefulSet", "Job", "HelmChart"];

    pub fn parse(s: &str) -> Option<HealthRef> {
        let parts: Vec<&str> = s.split('/').collect();
        let (kind, namespace, name) = match parts.as_slice() {
            [k, n] => (*k, None, *n),
            [k, ns, n] => (*k, Some(ns.to_string()), *n),
            _ => return None,
        };
        (!kind.is_empty() && !name.is_empty() && namespace.as_deref() != Some("")).then(|| HealthRef {
            kind: kind.to_string(),
            namespace,
            name: name.to_string(),
        })
    }
}

impl fmt::Display for HealthRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind, ns, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub name: String,
    pub file: String,
    pub vmid: u32,
    pub proxmox_node: String,
    pub kind: GuestKind,
    pub role: String,
    pub address: IpNet,
    pub adopt: bool,
    pub settings: NodeSettings,
    pub provenance: Provenance,
}

impl Node {
    pub fn ip(&self) -> IpAddr {
        self.address.addr()
    }

    /// The Talos installer image of this node for Talos `version`: what the machine config's
    /// install image says and what an upgrade installs, so the two never disagree.
    pub fn talos_installer_image(&self, version: &str) -> String {
        talos_installer_image(
            self.settings.talos.as_ref().and_then(|t| t.install_image.as_deref()),
            version,
        )
    }
}

/// Talos's installer for `version`: `ghcr.io/siderolabs/installer:VERSION`, or the node's
/// `talos.install_image` with its tag set to `version` (a factory image keeps its schematic and
/// follows `version`). An image pinned by digest (`@sha256:...`) is used as it is: a digest
/// names one version, so it changes with `version` by hand.
pub fn talos_installer_image(install_image: Option<&str>, version: &str) -> String {
    let Some(image) = install_image else {
        return format!("ghcr.io/siderolabs/installer:{version}");
    };
    if image.contains('@') {
        return image.to_string();
    }
    let name_end = image.rfind('/').map_or(0, |i| i + 1);
    let repository = match image[name_end..].rfind(':') {
        Some(colon) => &image[..name_end + colon],
        None => image,
    };
    format!("{repository}:{version}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdrSummary {
    pub id: String,
    pub file: String,
    pub title: String,
    pub status: String,
    pub applies: bool,
    pub has_config: bool,
}

/// A user template from the repository's templates/ directory (or an add-on's file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserTemplate {
    pub file: String,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub cluster: Cluster,
    /// Control plane nodes first, then by name: the order changes are applied in.
    pub nodes: Vec<Node>,
    pub adrs: Vec<AdrSummary>,
    /// Template name (`lxc.conf.j2`) -> the repository's override.
    pub templates: BTreeMap<String, UserTemplate>,
    /// What loaded but is left out (`model::diag::Warning` prints them).
    pub warnings: Vec<crate::model::diag::Diagnostic>,
}

impl Cluster {
    /// The CNI is not one the distribution brings: an add-on must install it before any node
    /// can be Ready.
    pub fn cni_from_addon(&self) -> bool {
        self.cni != "flannel"
    }
}

impl Desired {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn control_plane(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .iter()
            .filter(|n| self.cluster.distribution.is_control_plane(&n.role))
    }
}

/// How a key path is shown to people: `lxc.features.nesting`, `labels."node-role.kubernetes.io/worker"`.
pub fn display_key(path: &[String]) -> String {
    let mut key = String::with_capacity(path.iter().map(|s| s.len() + 3).sum());
    for (i, s) in path.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        if s.contains(['.', '/', ' ', ':']) {
            key.push('"');
            key.push_str(s);
            key.push('"');
        } else {
            key.push_str(s);
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::talos_installer_image;

    #[test]
    fn the_installer_image_follows_the_talos_version() {
        assert_eq!(
            talos_installer_image(None, "v1.13.10"),
            "ghcr.io/siderolabs/installer:v1.13.10"
        );
        assert_eq!(
            talos_installer_image(Some("factory.talos.dev/installer/abc123:v1.13.9"), "v1.13.10"),
            "factory.talos.dev/installer/abc123:v1.13.10"
        );
        assert_eq!(
            talos_installer_image(Some("registry.home.arpa:5000/talos/installer"), "v1.14.0"),
            "registry.home.arpa:5000/talos/installer:v1.14.0",
            "a registry port is not a tag"
        );
        let pinned = format!("ghcr.io/siderolabs/installer@sha256:{}", "a".repeat(64));
        assert_eq!(talos_installer_image(Some(&pinned), "v1.14.0"), pinned);
    }
}
