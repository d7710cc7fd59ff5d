//! Planning: desired state (rendered) against observed Proxmox state, as an ordered list of
//! steps with reasons and provenance. Pure: a plan is a value, printable, comparable and
//! serialisable; the same inputs give the same plan byte for byte.

mod diff;
pub mod display;
pub(crate) mod markdown;
pub(crate) mod schedule;

use crate::model::Desired;
use crate::ports::{GuestSummary, LiveConfig, PveKind};
use serde::Serialize;
use std::collections::BTreeMap;

pub use diff::{DesiredGuest, desired_guests, diff_guest, normalize_tags};

/// What driftless read from Proxmox: the guest listing, and the config of every guest it may
/// touch (tagged, or a node's vmid).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Observed {
    pub guests: Vec<GuestSummary>,
    pub configs: BTreeMap<u32, LiveConfig>,
}

/// How a change reaches Proxmox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `PUT .../config` with the API token.
    Api,
    /// `pct set` as root@pam on the Proxmox host: what an API token may not change.
    RootShell,
    /// The raw `lxc.*` lines of the config file, edited on the Proxmox host.
    ConfFile,
    /// A file on the cluster node (K3s's config.yaml, the join token file).
    NodeFile,
    /// The Kubernetes API (node labels and taints).
    KubeApi,
}

/// One key's change. `old`/`new` absent means the key is added/removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub key: String,
    pub old: Option<String>,
    pub new: Option<String>,
    pub via: Via,
    /// Proxmox applies this only when the guest restarts.
    pub needs_restart: bool,
    /// Where the new value comes from: `adr/ADR-001-lxc.md:52`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provenance: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// Create the guest, then set what only root may set, write raw keys, and start it.
    Create {
        params: BTreeMap<String, String>,
        root_options: Vec<(String, String)>,
        raw_lxc: Vec<(String, String)>,
        /// Provenance of the created values, by config key.
        provenance: BTreeMap<String, String>,
    },
    /// Change config keys of an existing guest, updating with the digest read at observe time.
    Update {
        changes: Vec<Change>,
        digest: String,
        /// What the guest should be: apply re-plans from it when the digest no longer matches.
        #[serde(skip)]
        desired: DesiredGuest,
    },
    /// Restart so pending changes apply (reboot: Proxmox applies pending changes on it).
    Restart { reason: String },
    /// Start a stopped guest.
    Start,
    /// Remove a guest that carries the ownership tag and is in no node file (prune only).
    Delete { running: bool },
    /// Install K3s `version` on the node (an upgrade when `installed` is another version).
    /// The service is (re)started by the `K3sConfigure` step that follows.
    K3sInstall {
        version: String,
        installed: Option<String>,
        /// `https://get.k3s.io` or the binary on the Proxmox host (k3s.binary).
        source: String,
    },
    /// Write /etc/rancher/k3s/config.yaml and the join token file where they differ, and
    /// restart the service when anything changed or it is not running; then the node must
    /// be Ready before the next step.
    K3sConfigure {
        changes: Vec<Change>,
        /// Why the service restarts; empty when it does not.
        restart: String,
        /// Fetch the cluster's kubeconfig from this server into the secrets directory.
        kubeconfig: bool,
        /// The rendered config.yaml (it holds no secret: the token is in token-file).
        #[serde(skip)]
        config: String,
    },
    /// Send the node its Talos machine config: the first one in maintenance mode (no client
    /// certificate yet), later ones over mTLS with the cluster's apply mode.
    TalosApply {
        mode: String,
        maintenance: bool,
        /// Talos's own dry-run diff (secrets redacted), or why there is none.
        diff: String,
        /// The rendered config, secrets still placeholders (filled when sent).
        #[serde(skip)]
        config: String,
    },
    /// Bootstrap etcd on the first control plane node, then fetch the kubeconfig.
    TalosBootstrap,
    /// Take the node's Talos from `from` to `to` (cluster.yaml `version`) with Talos's Upgrade
    /// call and the installer `image`; the node reboots, and must answer with `to` and be Ready
    /// before the next step. `refused`: why driftless does not do it (the step fails at once,
    /// before anything is sent).
    TalosUpgrade {
        from: String,
        to: String,
        image: String,
        /// `to` is older than `from` (within one minor release; across minors it is refused).
        downgrade: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
        /// Where `version` was set: `cluster.yaml:4`, or an ADR.
        #[serde(skip_serializing_if = "Option::is_none")]
        provenance: Option<String>,
    },
    /// A change of `kubernetes_version` on a running Talos cluster. driftless does not do it
    /// (yet): the step fails before any other cluster step runs, saying what to run instead, so
    /// no machine config carrying the new Kubernetes images goes out half way.
    KubernetesUpgrade {
        from: String,
        to: String,
        refused: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        provenance: Option<String>,
    },
    /// Labels and taints declared in the node file, through the Kubernetes API.
    NodeMetadata {
        changes: Vec<Change>,
        #[serde(skip)]
        patch: crate::ports::NodePatch,
    },
    /// Apply an add-on's objects (server-side apply; namespaces and CRDs first), wait until
    /// its workloads, Jobs and HelmCharts are healthy, prune what left git (prune only), and
    /// record its inventory.
    Addon {
        addon: String,
        wave: u32,
        cni: bool,
        /// Where it is declared (`ADR-002 adr/...md:30`).
        declared: String,
        /// `Kind/namespace/name` of each object to create.
        create: Vec<String>,
        change: Vec<ObjectChange>,
        /// In the inventory, no longer in git: deleted (prune is on).
        prune: Vec<String>,
        /// The rendered objects (the add-on's artifact).
        #[serde(skip)]
        manifests: String,
    },
    /// An add-on that left git: delete every object its inventory lists, then the inventory.
    AddonRemove { addon: String, prune: Vec<String> },
    /// Every node Ready, after the CNI wave, for a cluster whose CNI is an add-on.
    NodesReady {
        cni: String,
        /// The add-on that installs it, when one is declared.
        cni_addon: Option<String>,
    },
}

/// One object an add-on step changes: the fields a server-side dry-run apply says would
/// change (a Secret's values are never shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectChange {
    pub object: String,
    pub changes: Vec<Change>,
    /// Fields another field manager owns; applied only with the add-on's `force_conflicts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
}

impl Action {
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Create { .. } => "create",
            Action::Update { .. } => "update",
            Action::Restart { .. } => "restart",
            Action::Start => "start",
            Action::Delete { .. } => "delete",
            Action::K3sInstall { installed: None, .. } => "install k3s",
            Action::K3sInstall { .. } => "upgrade k3s",
            Action::K3sConfigure { .. } => "configure k3s",
            Action::TalosApply { .. } => "apply talos config",
            Action::TalosBootstrap => "bootstrap talos",
            Action::TalosUpgrade { downgrade: true, .. } => "downgrade talos",
            Action::TalosUpgrade { .. } => "upgrade talos",
            Action::KubernetesUpgrade { .. } => "upgrade kubernetes",
            Action::NodeMetadata { .. } => "label",
            Action::Addon { .. } => "apply add-on",
            Action::AddonRemove { .. } => "remove add-on",
            Action::NodesReady { .. } => "wait for nodes",
        }
    }

    /// A step of the cluster layer (on the node's OS or Kubernetes), not of its guest.
    pub fn is_cluster(&self) -> bool {
        matches!(
            self,
            Action::K3sInstall { .. }
                | Action::K3sConfigure { .. }
                | Action::TalosApply { .. }
                | Action::TalosBootstrap
                | Action::TalosUpgrade { .. }
                | Action::KubernetesUpgrade { .. }
                | Action::NodeMetadata { .. }
                | Action::Addon { .. }
                | Action::AddonRemove { .. }
                | Action::NodesReady { .. }
        )
    }

    /// A step of the cluster as a whole (add-ons, the all-nodes gate), not of one node.
    pub fn is_cluster_wide(&self) -> bool {
        matches!(
            self,
            Action::Addon { .. } | Action::AddonRemove { .. } | Action::NodesReady { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The node name (or the guest's name for a pruned guest).
    pub node: String,
    pub vmid: u32,
    pub pve_node: String,
    pub kind: PveKind,
    /// Interrupts the node's workloads: at most one at a time, gated by health checks.
    pub disruptive: bool,
    #[serde(flatten)]
    pub action: Action,
}

impl Step {
    /// How a step is named in progress lines and reports: `create k3s-2 (vmid 101)`.
    pub fn describe(&self) -> String {
        format!("{} {}", self.action.verb(), subject(&self.node, self.vmid))
    }
}

/// What a step acts on, as people read it: `k3s-2 (vmid 101)`; a cluster-wide step (an
/// add-on, the all-nodes gate) has no guest, and Proxmox never numbers one 0: `addons/cilium`.
pub fn subject(node: &str, vmid: u32) -> String {
    if vmid == 0 {
        node.to_string()
    } else {
        format!("{node} (vmid {vmid})")
    }
}

/// A guest driftless will not touch, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub node: String,
    pub vmid: u32,
    pub pve_node: String,
    pub reason: String,
}

/// A guest carrying the ownership tag that no node file describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orphan {
    pub vmid: u32,
    pub pve_node: String,
    pub kind: PveKind,
    pub name: Option<String>,
    /// Deleted only with `reconcile.prune: true`.
    pub pruned: bool,
}

/// A difference driftless sees but does not change (disk size, OS type), said out loud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notice {
    pub node: String,
    pub vmid: u32,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub cluster: String,
    pub steps: Vec<Step>,
    pub conflicts: Vec<Conflict>,
    pub orphans: Vec<Orphan>,
    pub notices: Vec<Notice>,
}

impl Plan {
    /// No step to run (conflicts, orphans left alone and notices are reported, not applied).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn count(&self, verb: &str) -> usize {
        self.steps.iter().filter(|s| s.action.verb() == verb).count()
    }
}

/// Compare the desired guests with what Proxmox has, and decide the steps.
/// `guests` comes from `desired_guests` (the rendered configs); nodes are in apply order.
pub fn plan(desired: &Desired, guests: &[DesiredGuest], observed: &Observed) -> Plan {
    let tag = desired.cluster.reconcile.ownership_tag.to_ascii_lowercase();
    let by_vmid: BTreeMap<u32, &GuestSummary> = observed.guests.iter().map(|g| (g.vmid, g)).collect();
    let mut steps = Vec::new();
    let mut conflicts = Vec::new();
    let mut notices = Vec::new();

    for want in guests {
        let node = desired
            .node(&want.node)
            .expect("desired guests come from desired nodes");
        let Some(live) = by_vmid.get(&want.vmid) else {
            steps.push(diff::create_step(node, want));
            continue;
        };
        let tagged = normalize_tags(&live.tags).contains(&tag);
        let conflict = |reason: String| Conflict {
            node: want.node.clone(),
            vmid: want.vmid,
            pve_node: live.node.clone(),
            reason,
        };
        if live.kind != want.kind {
            conflicts.push(conflict(format!(
                "vmid {} is a {} guest, the node file describes a {}",
                want.vmid,
                live.kind.path(),
                want.kind.path()
            )));
            continue;
        }
        if live.node != want.pve_node {
            conflicts.push(conflict(format!(
                "vmid {} lives on Proxmox node `{}`, the node file says `{}` (driftless does not migrate guests)",
                want.vmid, live.node, want.pve_node
            )));
            continue;
        }
        if !tagged && !node.adopt {
            conflicts.push(conflict(format!(
                "vmid {} exists without the `{tag}` tag; driftless leaves it alone (set `adopt: true` in {} to manage it)",
                want.vmid, node.file
            )));
            continue;
        }
        let Some(config) = observed.configs.get(&want.vmid) else {
            conflicts.push(conflict(format!("the config of vmid {} could not be read", want.vmid)));
            continue;
        };
        let running = live.status == "running";
        let d = diff_guest(want, config, running);
        notices.extend(d.notices.into_iter().map(|message| Notice {
            node: want.node.clone(),
            vmid: want.vmid,
            message,
        }));
        let restart_keys: Vec<String> = d
            .changes
            .iter()
            .filter(|c| c.needs_restart)
            .map(|c| c.key.clone())
            .collect();
        if !d.changes.is_empty() {
            steps.push(Step {
                node: want.node.clone(),
                vmid: want.vmid,
                pve_node: want.pve_node.clone(),
                kind: want.kind,
                disruptive: false,
                action: Action::Update {
                    changes: d.changes,
                    digest: config.digest.clone(),
                    desired: want.clone(),
                },
            });
        }
        if running && !restart_keys.is_empty() {
            steps.push(Step {
                node: want.node.clone(),
                vmid: want.vmid,
                pve_node: want.pve_node.clone(),
                kind: want.kind,
                disruptive: true,
                action: Action::Restart {
                    reason: format!(
                        "{} appl{} on restart",
                        restart_keys.join(", "),
                        if restart_keys.len() == 1 { "ies" } else { "y" }
                    ),
                },
            });
        } else if !running {
            steps.push(Step {
                node: want.node.clone(),
                vmid: want.vmid,
                pve_node: want.pve_node.clone(),
                kind: want.kind,
                disruptive: false,
                action: Action::Start,
            });
        }
    }

    let wanted: BTreeMap<u32, ()> = guests.iter().map(|g| (g.vmid, ())).collect();
    let prune = desired.cluster.reconcile.prune;
    let mut orphans = Vec::new();
    for g in &observed.guests {
        if wanted.contains_key(&g.vmid) || !normalize_tags(&g.tags).contains(&tag) {
            continue;
        }
        orphans.push(Orphan {
            vmid: g.vmid,
            pve_node: g.node.clone(),
            kind: g.kind,
            name: g.name.clone(),
            pruned: prune,
        });
        if prune {
            steps.push(Step {
                node: g.name.clone().unwrap_or_else(|| format!("vmid-{}", g.vmid)),
                vmid: g.vmid,
                pve_node: g.node.clone(),
                kind: g.kind,
                disruptive: true,
                action: Action::Delete {
                    running: g.status == "running",
                },
            });
        }
    }
    Plan {
        cluster: desired.cluster.name.clone(),
        steps,
        conflicts,
        orphans,
        notices,
    }
}

#[cfg(test)]
mod tests;
