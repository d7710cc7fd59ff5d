//! Planning the cluster layer (pure): the rendered K3s/Talos configs and the node files'
//! labels and taints against what the nodes and the Kubernetes API report. The steps are
//! merged with the guest steps node by node, control plane first, so a plan reads in the
//! order it runs: a node's guest, then what runs on it, then the next node.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::k3s::{self, K3sObserved};
use crate::model::schema::Distribution;
use crate::model::{Desired, Node};
use crate::plan::{Action, Change, Plan, Step, Via};
use crate::ports::{KubeNode, NodePatch, Taint, TalosApplyResult, TalosNodeState};
use crate::render::{Artifact, ArtifactKind};

/// Annotations recording which labels and taints driftless set, so removing one from a node
/// file removes it from the node, while labels others set are left alone.
pub const MANAGED_LABELS: &str = "driftless.dev/managed-labels";
pub const MANAGED_TAINTS: &str = "driftless.dev/managed-taints";

/// What one node's OS says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "layer")]
pub enum NodeObserved {
    /// The guest does not exist or is not running yet: nothing could be read.
    NotRunning,
    /// The guest runs but is not driftless's (no trusted ownership tag, or not a node of the
    /// trusted state): it was not looked into.
    NotOwned,
    K3s(K3sObserved),
    Talos {
        state: TalosNodeState,
        /// Talos's answer to a dry run of the rendered config (secrets redacted).
        dry_run: Option<TalosApplyResult>,
    },
}

/// What the cluster layer read: per node, and from the Kubernetes API when a kubeconfig exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterObserved {
    pub nodes: BTreeMap<String, NodeObserved>,
    /// The kubeconfig is in the secrets directory.
    pub kubeconfig: bool,
    /// Nodes as the Kubernetes API lists them (empty without a kubeconfig or an answer).
    pub kube_nodes: Vec<KubeNode>,
    /// SHA-256 of the join token the nodes should hold (the `k3s.token` secret, or the first
    /// server's node-token); `None` when not known yet (no server runs).
    pub join_token_sha256: Option<String>,
    /// The add-ons' objects and inventories, as the Kubernetes API answered.
    pub addons: crate::addons::plan::AddonsObserved,
}

fn artifact<'a>(artifacts: &'a [Artifact], node: &str, kind: ArtifactKind) -> Option<&'a Artifact> {
    artifacts.iter().find(|a| a.node == node && a.kind == kind)
}

fn step(node: &Node, disruptive: bool, action: Action) -> Step {
    Step {
        node: node.name.clone(),
        vmid: node.vmid,
        pve_node: node.proxmox_node.clone(),
        kind: node.kind.pve(),
        disruptive,
        action,
    }
}

fn k3s_change(key: String, old: Option<String>, new: Option<String>, provenance: Option<String>) -> Change {
    Change {
        key,
        old,
        new,
        via: Via::NodeFile,
        needs_restart: true,
        provenance,
    }
}

/// Where a config.yaml key's value was decided, for the plan's "set by" column: the node's
/// own address and name for node-ip and node-name, the first server's address for `server`,
/// the node file's labels and taints, and `k3s.config.KEY` (an ADR, cluster.yaml or the node
/// file) for the rest. driftless's own keys (token-file, cluster-init) cite nothing.
fn k3s_key_provenance(desired: &Desired, node: &Node, key: &str) -> Option<String> {
    let cite = |n: &Node, k: &str| n.provenance.get(k).map(crate::model::Setting::cite_with_adr);
    let cite_prefixed = |prefix: &str| {
        let cited: BTreeSet<String> = node
            .provenance
            .iter()
            .filter(|(k, _)| k.as_str() == prefix || k.starts_with(&format!("{prefix}.")))
            .map(|(_, s)| s.cite_with_adr())
            .collect();
        (!cited.is_empty()).then(|| cited.into_iter().collect::<Vec<_>>().join(", "))
    };
    match key {
        "node-name" => Some(node.file.clone()),
        "node-ip" | "tls-san" => cite(node, "address"),
        "server" => desired.control_plane().next().and_then(|first| cite(first, "address")),
        "node-label" => cite_prefixed("labels"),
        "node-taint" => cite_prefixed("taints"),
        "token-file" | "cluster-init" => None,
        other => cite(node, &format!("k3s.config.{other}")),
    }
}

/// The K3s steps of one node.
fn k3s_steps(
    desired: &Desired,
    node: &Node,
    config: &str,
    observed: Option<&NodeObserved>,
    cluster: &ClusterObserved,
) -> Vec<Step> {
    let version = &desired.cluster.version;
    let k3s_observed = match observed {
        Some(NodeObserved::K3s(o)) => o.clone(),
        _ => K3sObserved::default(),
    };
    let member = cluster.kube_nodes.iter().any(|k| k.name == node.name && k.ready);
    let mut steps = Vec::new();
    let upgrade = k3s_observed.version.as_deref() != Some(version.as_str());
    if upgrade {
        let source = match &desired.cluster.k3s.binary {
            Some(b) => format!("{b} on the Proxmox host"),
            None => k3s::INSTALL_URL.to_string(),
        };
        steps.push(step(
            node,
            member,
            Action::K3sInstall {
                version: version.clone(),
                installed: k3s_observed.version.clone(),
                source,
            },
        ));
    }

    let mut changes = Vec::new();
    let want_sha = k3s::sha256_hex(config.as_bytes());
    if k3s_observed.config_sha256.as_deref() != Some(want_sha.as_str()) {
        if k3s_observed.config_sha256.is_some() && k3s_observed.config.is_none() {
            changes.push(k3s_change(
                "config.yaml".into(),
                Some("(unreadable)".into()),
                Some("(rendered)".into()),
                None,
            ));
        } else {
            for (key, old, new) in k3s::config_changes(k3s_observed.config.as_deref(), config) {
                let provenance = k3s_key_provenance(desired, node, &key);
                changes.push(k3s_change(format!("config.yaml {key}"), old, new, provenance));
            }
        }
    }
    if needs_token(desired, node) {
        let have = k3s_observed.token_sha256.as_deref();
        let differs = match (&cluster.join_token_sha256, have) {
            (_, None) => true,
            (Some(want), Some(have)) => want != have,
            (None, Some(_)) => false,
        };
        if differs {
            changes.push(k3s_change(
                "cluster-token".into(),
                have.map(|_| "(secret)".to_string()),
                Some("(secret)".into()),
                None,
            ));
        }
    }
    let service = k3s::service(&node.role);
    let restart = if upgrade && k3s_observed.version.is_some() {
        format!("k3s {version} takes over from the running version")
    } else if !changes.is_empty() {
        "its config changed".to_string()
    } else if k3s_observed.active.as_deref() != Some(service) {
        format!("{service} is not running")
    } else if k3s_observed.restart_pending {
        "pending since its config changed: the restart after the last write did not finish".to_string()
    } else if let Some(unready) = cluster.kube_nodes.iter().find(|k| k.name == node.name && !k.ready) {
        // A failed health gate, or a node that went unwell since: the restart and its gate
        // are what the last apply did not get through.
        format!(
            "{} is not Ready ({}): the health gate did not pass",
            node.name,
            unready.not_ready_reason.as_deref().unwrap_or("no reason given")
        )
    } else {
        String::new()
    };
    let first_server = desired.control_plane().next().is_some_and(|n| n.name == node.name);
    let kubeconfig = first_server && !cluster.kubeconfig;
    if !changes.is_empty() || !restart.is_empty() || kubeconfig {
        steps.push(step(
            node,
            member && !restart.is_empty(),
            Action::K3sConfigure {
                changes,
                restart,
                kubeconfig,
                config: config.to_string(),
            },
        ));
    }
    steps
}

/// Agents and every server but a lone first one without a token secret join with a token.
pub fn needs_token(desired: &Desired, node: &Node) -> bool {
    let first_server = desired.control_plane().next().is_some_and(|n| n.name == node.name);
    !first_server || desired.cluster.k3s.token.is_some()
}

/// Whether the node file (or an ADR, or cluster.yaml's defaults) lets a config go to this node
/// in maintenance mode although the run did not create its VM: `talos.maintenance_apply`.
pub fn maintenance_apply_allowed(node: &Node) -> bool {
    node.settings
        .talos
        .as_ref()
        .and_then(|t| t.maintenance_apply)
        .unwrap_or(false)
}

/// Why a node in maintenance mode this apply did not create gets no config, and how to allow it.
pub fn maintenance_refusal(node: &Node) -> String {
    format!(
        "answers as a Talos node in maintenance mode, but this apply does not create its VM: its machine config, \
         with the cluster's CA keys, would go unauthenticated to whatever answers at {ip}. If the node was \
         reinstalled on purpose, set `talos: {{maintenance_apply: true}}` in {file} for the apply that configures \
         it, then remove it again",
        ip = node.ip(),
        file = node.file,
    )
}

/// The Talos steps of one node. `created`: the plan creates the node's VM, so a node in
/// maintenance mode there is that new VM; otherwise a config goes to a node in maintenance mode
/// only when its file allows it ([`maintenance_apply_allowed`]). A node that is not running
/// yet is asked again when the step runs.
fn talos_steps(
    desired: &Desired,
    node: &Node,
    config: &str,
    observed: Option<&NodeObserved>,
    cluster: &ClusterObserved,
    created: bool,
) -> Vec<Step> {
    let mode = desired
        .cluster
        .talos
        .apply_mode
        .clone()
        .unwrap_or_else(|| "auto".into());
    let mut steps = Vec::new();
    let member = cluster.kube_nodes.iter().any(|k| k.name == node.name && k.ready);
    let marked = maintenance_apply_allowed(node);
    // Before the config: a config of the new release may not load on the old one.
    steps.extend(talos_upgrade_step(desired, node, observed));
    let apply = |maintenance: bool, diff: String| {
        step(
            node,
            false,
            Action::TalosApply {
                mode: mode.clone(),
                maintenance,
                diff,
                config: config.to_string(),
            },
        )
    };
    match observed {
        Some(NodeObserved::Talos {
            state: TalosNodeState::Configured { version: running },
            dry_run,
        }) => {
            let no_dry_run = if dry_run_waits_for_upgrade(running, &desired.cluster.version) {
                format!(
                    "no dry run: the config is for Talos {}, which the node runs only after its upgrade \
                     (Talos {running} may not read it)",
                    desired.cluster.version
                )
            } else {
                "(Talos gave no dry-run answer)".to_string()
            };
            let changed = match dry_run {
                Some(r) => !r.mode_details.contains("No changes"),
                None => true,
            };
            if changed {
                let reboots = dry_run.as_ref().is_some_and(|r| r.mode == "reboot");
                steps.push(step(
                    node,
                    member && reboots,
                    Action::TalosApply {
                        mode: mode.clone(),
                        maintenance: false,
                        diff: dry_run
                            .as_ref()
                            .map(|r| r.mode_details.trim_end().to_string())
                            .unwrap_or(no_dry_run),
                        config: config.to_string(),
                    },
                ));
            }
        }
        _ if created => steps.push(apply(true, "the node has no config yet".into())),
        _ if marked => steps.push(apply(
            true,
            format!(
                "sent in maintenance mode if the node answers in it, as talos.maintenance_apply allows{}",
                node.provenance
                    .get("talos.maintenance_apply")
                    .map(|p| format!(" ({})", p.cite()))
                    .unwrap_or_default()
            ),
        )),
        Some(NodeObserved::Talos {
            state: TalosNodeState::Maintenance,
            ..
        }) => steps.push(apply(false, format!("refused: {}", maintenance_refusal(node)))),
        _ => steps.push(apply(
            false,
            "the node is not running yet: its config goes over mTLS once it answers, and is refused if it \
             answers in maintenance mode (this apply does not create its VM)"
                .into(),
        )),
    }
    let first_cp = desired.control_plane().next().is_some_and(|n| n.name == node.name);
    if first_cp && !cluster.kubeconfig {
        steps.push(step(node, false, Action::TalosBootstrap));
    }
    steps
}

/// `vMAJOR.MINOR.PATCH` as numbers; a pre-release or build suffix is left out.
fn release(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.strip_prefix('v').unwrap_or(version);
    let core = core.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let triple = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(triple)
}

/// A node running another minor release than `wanted` is not asked for a dry run of the
/// rendered config: it is rendered for `wanted` (v1.14 changed the documents), and goes to
/// the node after its upgrade.
pub fn dry_run_waits_for_upgrade(running: &str, wanted: &str) -> bool {
    matches!((release(running), release(wanted)), (Some(r), Some(w)) if (r.0, r.1) != (w.0, w.1))
}

/// Why driftless does not take a node's Talos from `from` to `to`, if it does not: Talos
/// upgrades one minor release at a time and does not go back across a minor release (etcd
/// and the machine config only move forward). A patch downgrade is planned, and named so.
pub fn talos_upgrade_refusal(from: &str, to: &str) -> Option<String> {
    let (Some(old), Some(new)) = (release(from), release(to)) else {
        return Some(format!(
            "`{from}` -> `{to}`: driftless compares Talos versions as vMAJOR.MINOR.PATCH and cannot order these"
        ));
    };
    if (new.0, new.1) < (old.0, old.1) {
        return Some(format!(
            "Talos does not downgrade across minor releases ({from} -> {to}): set `version` back to {from}, or \
             reinstall the node with {to} (delete its VM and apply)"
        ));
    }
    if new.0 != old.0 || new.1 > old.1 + 1 {
        return Some(format!(
            "Talos upgrades one minor release at a time ({from} -> {to} skips one): set `version` to the latest \
             v{}.{}.x first, apply, then {to}",
            old.0,
            old.1 + 1
        ));
    }
    None
}

/// The Talos upgrade of a configured node whose running version is not cluster.yaml's
/// `version`: disruptive (the node reboots), so one at a time, control plane first.
fn talos_upgrade_step(desired: &Desired, node: &Node, observed: Option<&NodeObserved>) -> Option<Step> {
    let Some(NodeObserved::Talos {
        state: TalosNodeState::Configured { version: from },
        ..
    }) = observed
    else {
        return None;
    };
    let to = &desired.cluster.version;
    if from == to {
        return None;
    }
    let downgrade = matches!((release(from), release(to)), (Some(old), Some(new)) if new < old);
    Some(step(
        node,
        true,
        Action::TalosUpgrade {
            from: from.clone(),
            to: to.clone(),
            image: node.talos_installer_image(to),
            downgrade,
            refused: talos_upgrade_refusal(from, to),
            provenance: desired
                .cluster
                .provenance
                .get("version")
                .map(crate::model::Setting::cite_with_adr),
        },
    ))
}

/// Why a change of `kubernetes_version` on a running Talos cluster is not applied, and what
/// to run instead.
pub fn kubernetes_upgrade_refusal(from: &str, to: &str) -> String {
    format!(
        "kubernetes_version change from {from} to {to} on Talos: run `talosctl upgrade-k8s --to {}` against the \
         control plane (it rolls the API server, controller manager, scheduler, kube-proxy and every kubelet in \
         order and updates the bootstrap manifests); driftless does not do this yet. Its machine configs carry \
         the Kubernetes images, so no cluster step runs until the cluster runs {to}",
        to.strip_prefix('v').unwrap_or(to)
    )
}

/// A refused step, first among the cluster steps, when the Kubernetes API reports kubelets of
/// the cluster's nodes at another version than `kubernetes_version`.
fn kubernetes_upgrade_step(desired: &Desired, first: &Node, cluster: &ClusterObserved) -> Option<Step> {
    let to = desired.cluster.kubernetes_version.as_ref()?;
    let bare = |v: &str| v.strip_prefix('v').unwrap_or(v).to_string();
    let running: BTreeSet<&str> = cluster
        .kube_nodes
        .iter()
        .filter(|k| desired.node(&k.name).is_some() && !k.kubelet_version.is_empty())
        .map(|k| k.kubelet_version.as_str())
        .filter(|v| bare(v) != bare(to))
        .collect();
    if running.is_empty() {
        return None;
    }
    let from = running.into_iter().collect::<Vec<_>>().join(", ");
    Some(step(
        first,
        false,
        Action::KubernetesUpgrade {
            refused: kubernetes_upgrade_refusal(&from, to),
            from,
            to: to.clone(),
            provenance: desired
                .cluster
                .provenance
                .get("kubernetes_version")
                .map(crate::model::Setting::cite_with_adr),
        },
    ))
}

/// Labels and taints of a K3s node through the Kubernetes API. Only keys driftless manages
/// (declared now, or recorded in its annotations) are touched. Apply computes it again
/// against the node as it is then.
pub fn metadata_step(node: &Node, live: &KubeNode) -> Option<Step> {
    let want_labels = node.settings.labels.clone().unwrap_or_default();
    let want_taints: Vec<Taint> = node
        .settings
        .taints
        .iter()
        .flatten()
        .filter_map(|t| Taint::parse(t))
        .collect();
    let recorded = |key: &str| -> BTreeSet<String> {
        live.annotations
            .get(key)
            .map(|v| v.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default()
    };
    let mut patch = NodePatch::default();
    let mut changes = Vec::new();
    for (k, v) in &want_labels {
        if live.labels.get(k) != Some(v) {
            patch.labels.insert(k.clone(), Some(v.clone()));
            changes.push(meta_change(
                format!("label {k}"),
                live.labels.get(k).cloned(),
                Some(v.clone()),
                node,
                k,
            ));
        }
    }
    for k in recorded(MANAGED_LABELS) {
        if !want_labels.contains_key(&k) && live.labels.contains_key(&k) {
            patch.labels.insert(k.clone(), None);
            changes.push(meta_change(
                format!("label {k}"),
                live.labels.get(&k).cloned(),
                None,
                node,
                &k,
            ));
        }
    }
    let managed_taints: BTreeSet<String> = recorded(MANAGED_TAINTS)
        .into_iter()
        .chain(want_taints.iter().map(|t| t.key.clone()))
        .collect();
    let kept: Vec<Taint> = live
        .taints
        .iter()
        .filter(|t| !managed_taints.contains(&t.key))
        .cloned()
        .collect();
    let mut new_taints = kept.clone();
    new_taints.extend(want_taints.iter().cloned());
    let live_managed: BTreeSet<&Taint> = live.taints.iter().filter(|t| managed_taints.contains(&t.key)).collect();
    let want_set: BTreeSet<&Taint> = want_taints.iter().collect();
    if live_managed != want_set {
        let show = |s: &BTreeSet<&Taint>| s.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ");
        changes.push(meta_change(
            "taints".into(),
            Some(show(&live_managed)).filter(|s| !s.is_empty()),
            Some(show(&want_set)).filter(|s| !s.is_empty()),
            node,
            "taints",
        ));
        patch.taints = Some(new_taints);
    }
    if changes.is_empty() {
        return None;
    }
    let join = |it: &mut dyn Iterator<Item = String>| it.collect::<Vec<_>>().join(",");
    patch.annotations.insert(
        MANAGED_LABELS.into(),
        Some(join(&mut want_labels.keys().cloned())).filter(|s| !s.is_empty()),
    );
    patch.annotations.insert(
        MANAGED_TAINTS.into(),
        Some(join(&mut want_taints.iter().map(|t| t.key.clone()))).filter(|s| !s.is_empty()),
    );
    Some(step(node, false, Action::NodeMetadata { changes, patch }))
}

fn meta_change(key: String, old: Option<String>, new: Option<String>, node: &Node, setting: &str) -> Change {
    let provenance = if setting == "taints" {
        node.provenance.get("taints")
    } else {
        node.provenance
            .get(&format!("labels.{setting}"))
            .or_else(|| node.provenance.get("labels"))
    };
    Change {
        key,
        old,
        new,
        via: Via::KubeApi,
        needs_restart: false,
        provenance: provenance.map(|p| p.cite()),
    }
}

/// Add the cluster layer's steps to a guest plan, node by node in apply order (control plane
/// first), guest steps of a node before its cluster steps; deletes of pruned guests stay last.
pub fn merge(desired: &Desired, artifacts: &[Artifact], observed: &ClusterObserved, mut plan: Plan) -> Plan {
    let guest_steps = std::mem::take(&mut plan.steps);
    let (deletes, guest_steps): (Vec<Step>, Vec<Step>) = guest_steps
        .into_iter()
        .partition(|s| matches!(s.action, Action::Delete { .. }));
    let conflicted: BTreeSet<&str> = plan.conflicts.iter().map(|c| c.node.as_str()).collect();
    let mut steps = Vec::new();
    let mut metadata = Vec::new();
    for node in &desired.nodes {
        steps.extend(guest_steps.iter().filter(|s| s.node == node.name).cloned());
        if conflicted.contains(node.name.as_str()) {
            continue;
        }
        let seen = observed.nodes.get(&node.name);
        match desired.cluster.distribution {
            Distribution::K3s => {
                if let Some(a) = artifact(artifacts, &node.name, ArtifactKind::K3sConfig) {
                    steps.extend(k3s_steps(desired, node, &a.content, seen, observed));
                }
                // A node that has not joined yet gets its labels at registration (node-label);
                // the step still runs after it joins, to record what driftless manages.
                let declared = node.settings.labels.as_ref().is_some_and(|l| !l.is_empty())
                    || node.settings.taints.as_ref().is_some_and(|t| !t.is_empty());
                match observed.kube_nodes.iter().find(|k| k.name == node.name) {
                    Some(live) => metadata.extend(metadata_step(node, live)),
                    None if declared => {
                        let fresh = KubeNode {
                            name: node.name.clone(),
                            ..KubeNode::default()
                        };
                        metadata.extend(metadata_step(node, &fresh));
                    }
                    None => {}
                }
            }
            Distribution::Talos => {
                if desired
                    .control_plane()
                    .next()
                    .is_some_and(|first| first.name == node.name)
                {
                    steps.extend(kubernetes_upgrade_step(desired, node, observed));
                }
                if maintenance_apply_allowed(node)
                    && matches!(
                        seen,
                        Some(NodeObserved::Talos {
                            state: TalosNodeState::Configured { .. },
                            ..
                        })
                    )
                {
                    plan.notices.push(crate::plan::Notice {
                        node: node.name.clone(),
                        vmid: node.vmid,
                        message: format!(
                            "talos.maintenance_apply is set{} but the node is configured: remove it, or a machine \
                             imitating the node in maintenance mode would be sent its config",
                            node.provenance
                                .get("talos.maintenance_apply")
                                .map(|p| format!(" ({})", p.cite()))
                                .unwrap_or_default()
                        ),
                    });
                }
                let created = guest_steps
                    .iter()
                    .any(|s| s.node == node.name && matches!(s.action, Action::Create { .. }));
                if let Some(a) = artifact(artifacts, &node.name, ArtifactKind::TalosConfig) {
                    steps.extend(talos_steps(desired, node, &a.content, seen, observed, created));
                }
            }
        }
    }
    steps.extend(metadata);
    // The add-ons after every node, wave by wave (the all-nodes gate after the CNI's), then
    // deletes of pruned guests.
    let nodes_not_ready =
        observed.kube_nodes.len() < desired.nodes.len() || observed.kube_nodes.iter().any(|k| !k.ready);
    let (addon_steps, addon_notices) =
        crate::addons::plan::steps(desired, artifacts, &observed.addons, nodes_not_ready);
    steps.extend(addon_steps);
    plan.notices.extend(addon_notices);
    steps.extend(deletes);
    plan.steps = steps;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, load};
    use crate::plan::{Observed, desired_guests, plan};
    use crate::render::render_all;

    fn example(name: &str) -> (Desired, Vec<Artifact>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name);
        let files = crate::source::read_dir(&dir).unwrap();
        let desired = load(&files, &LoadOptions::default()).unwrap();
        let artifacts = render_all(&desired).unwrap();
        (desired, artifacts)
    }

    fn full_plan(desired: &Desired, artifacts: &[Artifact], cluster: &ClusterObserved) -> Plan {
        let guests = desired_guests(desired, artifacts);
        merge(
            desired,
            artifacts,
            cluster,
            plan(desired, &guests, &Observed::default()),
        )
    }

    /// The node steps of a plan (add-on steps have their own tests, in `addons`).
    fn verbs(p: &Plan) -> Vec<String> {
        p.steps
            .iter()
            .filter(|s| !s.action.is_cluster_wide())
            .map(|s| format!("{} {}", s.action.verb(), s.node))
            .collect()
    }

    #[test]
    fn a_fresh_k3s_cluster_is_planned_node_by_node_server_first() {
        let (desired, artifacts) = example("homelab-k3s");
        let p = full_plan(&desired, &artifacts, &ClusterObserved::default());
        assert_eq!(
            verbs(&p)[..4],
            [
                "create k3s-master",
                "install k3s k3s-master",
                "configure k3s k3s-master",
                "create k3s-worker-1"
            ]
        );
        // Nothing runs yet, so nothing is disruptive; the first server hands out the kubeconfig.
        assert!(p.steps.iter().all(|s| !s.disruptive));
        match &p.steps[2].action {
            Action::K3sConfigure {
                kubeconfig, restart, ..
            } => {
                assert!(*kubeconfig);
                assert_eq!(restart, "its config changed");
            }
            other => panic!("{other:?}"),
        }
        // The agents get the token as a secret change, never a value.
        let Action::K3sConfigure { changes, .. } = &p.steps[5].action else {
            panic!()
        };
        let token = changes.iter().find(|c| c.key == "cluster-token").unwrap();
        assert_eq!(token.new.as_deref(), Some("(secret)"));

        // Every config.yaml value cites the place that decided it.
        let set_by = |step: usize, key: &str| {
            let Action::K3sConfigure { changes, .. } = &p.steps[step].action else {
                panic!()
            };
            let c = changes.iter().find(|c| c.key == format!("config.yaml {key}")).unwrap();
            c.provenance.clone()
        };
        assert_eq!(
            set_by(2, "write-kubeconfig-mode").as_deref(),
            Some("ADR-004 adr/ADR-004-readable-kubeconfig.md:21")
        );
        assert_eq!(set_by(2, "node-ip").as_deref(), Some("nodes/k3s-master.yaml:6"));
        assert_eq!(set_by(2, "node-name").as_deref(), Some("nodes/k3s-master.yaml"));
        // An agent's server URL is the first server's address.
        assert_eq!(set_by(5, "server").as_deref(), Some("nodes/k3s-master.yaml:6"));
        assert_eq!(set_by(5, "token-file"), None);
    }

    #[test]
    fn a_converged_k3s_node_has_no_step_and_an_upgrade_of_a_member_is_disruptive() {
        let (desired, artifacts) = example("homelab-k3s");
        let mut cluster = ClusterObserved {
            kubeconfig: true,
            join_token_sha256: Some("t".into()),
            ..ClusterObserved::default()
        };
        for node in &desired.nodes {
            let config = artifacts
                .iter()
                .find(|a| a.node == node.name && a.kind == ArtifactKind::K3sConfig)
                .unwrap();
            cluster.nodes.insert(
                node.name.clone(),
                NodeObserved::K3s(K3sObserved {
                    version: Some(desired.cluster.version.clone()),
                    active: Some(k3s::service(&node.role).into()),
                    config_sha256: Some(k3s::sha256_hex(config.content.as_bytes())),
                    token_sha256: Some("t".into()),
                    restart_pending: false,
                    config: None,
                }),
            );
            cluster.kube_nodes.push(KubeNode {
                name: node.name.clone(),
                ready: true,
                ..KubeNode::default()
            });
        }
        let k3s_steps = |p: &Plan| {
            p.steps
                .iter()
                .filter(|s| s.action.is_cluster() && !s.action.is_cluster_wide())
                .count()
        };
        assert_eq!(k3s_steps(&full_plan(&desired, &artifacts, &cluster)), 0);

        let mut older = cluster.clone();
        if let Some(NodeObserved::K3s(o)) = older.nodes.get_mut("k3s-worker-2") {
            o.version = Some("v1.30.0+k3s1".into());
        }
        let p = full_plan(&desired, &artifacts, &older);
        let steps: Vec<_> = p
            .steps
            .iter()
            .filter(|s| s.action.is_cluster() && !s.action.is_cluster_wide())
            .collect();
        assert_eq!(steps.len(), 2);
        assert!(steps.iter().all(|s| s.disruptive && s.node == "k3s-worker-2"));
        assert_eq!(steps[0].action.verb(), "upgrade k3s");

        // Failures are state: a restart that did not happen after its config was written, and
        // a node whose gate did not pass, are each planned as a restart of that node alone.
        let restart_of = |cluster: &ClusterObserved| -> Vec<(String, String)> {
            full_plan(&desired, &artifacts, cluster)
                .steps
                .iter()
                .filter_map(|s| match &s.action {
                    Action::K3sConfigure { restart, changes, .. } if changes.is_empty() => {
                        Some((s.node.clone(), restart.clone()))
                    }
                    _ => None,
                })
                .collect()
        };
        let mut pending = cluster.clone();
        if let Some(NodeObserved::K3s(o)) = pending.nodes.get_mut("k3s-worker-1") {
            o.restart_pending = true;
        }
        let r = restart_of(&pending);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, "k3s-worker-1");
        assert!(r[0].1.contains("pending since its config changed"), "{r:?}");

        let mut unready = cluster.clone();
        let k = unready
            .kube_nodes
            .iter_mut()
            .find(|k| k.name == "k3s-worker-2")
            .unwrap();
        k.ready = false;
        k.not_ready_reason = Some("container runtime network not ready".into());
        let r = restart_of(&unready);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, "k3s-worker-2");
        assert!(
            r[0].1.contains("not Ready (container runtime network not ready)"),
            "{r:?}"
        );
    }

    #[test]
    fn only_the_labels_and_taints_driftless_manages_are_touched() {
        let (desired, _) = example("homelab-k3s");
        let mut node = desired.node("k3s-worker-1").unwrap().clone();
        node.settings.labels = Some(BTreeMap::from([("tier".to_string(), "storage".to_string())]));
        node.settings.taints = Some(vec!["dedicated=storage:NoSchedule".into()]);
        let live = KubeNode {
            name: node.name.clone(),
            ready: true,
            labels: BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), "k3s-worker-1".to_string()),
                ("old".to_string(), "x".to_string()),
            ]),
            annotations: BTreeMap::from([(MANAGED_LABELS.to_string(), "old".to_string())]),
            taints: vec![Taint::parse("node.kubernetes.io/unschedulable:NoSchedule").unwrap()],
            ..KubeNode::default()
        };
        let step = metadata_step(&node, &live).unwrap();
        let Action::NodeMetadata { patch, .. } = step.action else {
            panic!()
        };
        assert_eq!(patch.labels.get("tier"), Some(&Some("storage".to_string())));
        assert_eq!(patch.labels.get("old"), Some(&None), "recorded as driftless's: removed");
        assert!(
            !patch.labels.contains_key("kubernetes.io/hostname"),
            "not driftless's: kept"
        );
        let taints: Vec<String> = patch.taints.unwrap().iter().map(|t| t.to_string()).collect();
        assert_eq!(
            taints,
            [
                "node.kubernetes.io/unschedulable:NoSchedule",
                "dedicated=storage:NoSchedule"
            ]
        );
        assert_eq!(patch.annotations.get(MANAGED_LABELS), Some(&Some("tier".to_string())));
    }

    #[test]
    fn talos_changes_carry_talos_own_diff_and_the_first_control_plane_is_bootstrapped_once() {
        let (desired, artifacts) = example("homelab-talos");
        let fresh = full_plan(&desired, &artifacts, &ClusterObserved::default());
        assert_eq!(
            verbs(&fresh)[1..3],
            ["apply talos config talos-cp-1", "bootstrap talos talos-cp-1"]
        );

        let mut cluster = ClusterObserved {
            kubeconfig: true,
            ..ClusterObserved::default()
        };
        for node in &desired.nodes {
            let changes = node.name == "talos-worker-2";
            cluster.nodes.insert(
                node.name.clone(),
                NodeObserved::Talos {
                    state: TalosNodeState::Configured {
                        version: if node.name == "talos-worker-1" {
                            "v1.13.8"
                        } else {
                            "v1.13.9"
                        }
                        .into(),
                    },
                    dry_run: Some(TalosApplyResult {
                        mode: if changes { "reboot" } else { "no_reboot" }.into(),
                        mode_details: if changes {
                            "Config diff:\n+ tier: storage"
                        } else {
                            "No changes."
                        }
                        .into(),
                        warnings: vec![],
                    }),
                },
            );
        }
        let p = full_plan(&desired, &artifacts, &cluster);
        let cluster_steps: Vec<_> = p
            .steps
            .iter()
            .filter(|s| s.action.is_cluster() && !s.action.is_cluster_wide())
            .collect();
        // The node on an older Talos is upgraded to cluster.yaml's version; the others' dry
        // runs decide their steps.
        let cluster_verbs: Vec<_> = verbs(&p).into_iter().filter(|v| !v.starts_with("create")).collect();
        assert_eq!(
            cluster_verbs,
            ["upgrade talos talos-worker-1", "apply talos config talos-worker-2"]
        );
        assert!(p.notices.is_empty(), "{:?}", p.notices);
        match &cluster_steps[1].action {
            Action::TalosApply { diff, maintenance, .. } => {
                assert!(!maintenance);
                assert!(diff.contains("+ tier: storage"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_config_goes_in_maintenance_mode_only_to_a_vm_the_plan_creates_or_a_node_that_allows_it() {
        let (mut desired, artifacts) = example("homelab-talos");
        let maintenance_of = |p: &Plan, node: &str| -> (bool, String) {
            p.steps
                .iter()
                .find_map(|s| match &s.action {
                    Action::TalosApply { maintenance, diff, .. } if s.node == node => {
                        Some((*maintenance, diff.clone()))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no Talos apply for {node}"))
        };
        // Every VM is created by this plan: each takes its first config in maintenance mode.
        let fresh = full_plan(&desired, &artifacts, &ClusterObserved::default());
        for node in ["talos-cp-1", "talos-worker-1", "talos-worker-2"] {
            assert_eq!(
                maintenance_of(&fresh, node),
                (true, "the node has no config yet".into())
            );
        }

        // The VMs exist: a node answering in maintenance mode, and one that is not running.
        let mut cluster = ClusterObserved {
            kubeconfig: true,
            ..ClusterObserved::default()
        };
        cluster.nodes.insert(
            "talos-cp-1".into(),
            NodeObserved::Talos {
                state: TalosNodeState::Configured {
                    version: "v1.13.9".into(),
                },
                dry_run: Some(TalosApplyResult {
                    mode: "no_reboot".into(),
                    mode_details: "No changes.".into(),
                    warnings: vec![],
                }),
            },
        );
        cluster.nodes.insert(
            "talos-worker-1".into(),
            NodeObserved::Talos {
                state: TalosNodeState::Maintenance,
                dry_run: None,
            },
        );
        cluster.nodes.insert("talos-worker-2".into(), NodeObserved::NotRunning);
        let existing = |desired: &Desired| {
            let empty = Plan {
                cluster: desired.cluster.name.clone(),
                steps: vec![],
                conflicts: vec![],
                orphans: vec![],
                notices: vec![],
            };
            merge(desired, &artifacts, &cluster, empty)
        };
        let p = existing(&desired);
        assert_eq!(
            verbs(&p),
            ["apply talos config talos-worker-1", "apply talos config talos-worker-2"]
        );
        let (maintenance, diff) = maintenance_of(&p, "talos-worker-1");
        assert!(!maintenance);
        assert!(
            diff.starts_with(
                "refused: answers as a Talos node in maintenance mode, but this apply does not create its VM"
            ),
            "{diff}"
        );
        assert!(diff.contains("10.0.0.21"), "{diff}");
        let (maintenance, diff) = maintenance_of(&p, "talos-worker-2");
        assert!(!maintenance);
        assert!(diff.starts_with("the node is not running yet"), "{diff}");
        // The plan as printed says so.
        let text = crate::plan::display::text(&p, crate::plan::display::Wording::Plan, false);
        assert!(
            text.contains("refused: answers as a Talos node in maintenance mode"),
            "{text}"
        );
        assert!(text.contains("maintenance_apply: true"), "{text}");

        // The node file allows it: the config goes in maintenance mode, citing the setting.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/homelab-talos");
        let mut files = crate::source::read_dir(&dir).unwrap();
        for node in ["talos-worker-1", "talos-worker-2"] {
            let path = format!("nodes/{node}.yaml");
            let text = String::from_utf8(files.files[&path].clone()).unwrap();
            files.insert(path, format!("{text}talos: {{maintenance_apply: true}}\n"));
        }
        desired = load(&files, &LoadOptions::default()).unwrap();
        let p = existing(&desired);
        let (maintenance, diff) = maintenance_of(&p, "talos-worker-1");
        assert!(maintenance);
        assert_eq!(
            diff,
            "sent in maintenance mode if the node answers in it, as talos.maintenance_apply allows \
             (nodes/talos-worker-1.yaml:5)"
        );
        assert!(maintenance_of(&p, "talos-worker-2").0);
        assert!(p.notices.is_empty(), "{:?}", p.notices);
        // Left set on a configured node, it is pointed out.
        desired
            .nodes
            .iter_mut()
            .find(|n| n.name == "talos-cp-1")
            .unwrap()
            .settings
            .talos = Some(crate::model::schema::TalosSettings {
            maintenance_apply: Some(true),
            ..Default::default()
        });
        let p = existing(&desired);
        assert_eq!(p.notices.len(), 1, "{:?}", p.notices);
        assert_eq!(p.notices[0].node, "talos-cp-1");
        assert!(p.notices[0].message.contains("remove it"), "{}", p.notices[0].message);
    }

    /// examples/homelab-talos with cluster.yaml's `version` (and `kubernetes_version`) set.
    fn talos_example_at(version: &str, kubernetes: &str) -> (Desired, Vec<Artifact>) {
        crate::test_repo::load_files(&crate::test_repo::talos_example_at(version, kubernetes))
    }

    /// The cluster steps for running guests (Proxmox has nothing to change).
    fn cluster_plan(desired: &Desired, artifacts: &[Artifact], cluster: &ClusterObserved) -> Plan {
        let empty = Plan {
            cluster: desired.cluster.name.clone(),
            steps: vec![],
            conflicts: vec![],
            orphans: vec![],
            notices: vec![],
        };
        merge(desired, artifacts, cluster, empty)
    }

    /// Every node of the Talos example configured at `version`, its dry run unchanged, Ready
    /// in Kubernetes with kubelet `kubelet`.
    fn talos_running(desired: &Desired, version: &str, kubelet: &str) -> ClusterObserved {
        let mut cluster = ClusterObserved {
            kubeconfig: true,
            ..ClusterObserved::default()
        };
        for node in &desired.nodes {
            cluster.nodes.insert(
                node.name.clone(),
                NodeObserved::Talos {
                    state: TalosNodeState::Configured {
                        version: version.into(),
                    },
                    dry_run: Some(TalosApplyResult {
                        mode: "no_reboot".into(),
                        mode_details: "No changes.".into(),
                        warnings: vec![],
                    }),
                },
            );
            cluster.kube_nodes.push(KubeNode {
                name: node.name.clone(),
                ready: true,
                kubelet_version: kubelet.into(),
                ..KubeNode::default()
            });
        }
        cluster
    }

    fn upgrade_of(step: &Step) -> (&str, &str, &str, Option<&str>, Option<&str>) {
        match &step.action {
            Action::TalosUpgrade {
                from,
                to,
                image,
                refused,
                provenance,
                ..
            } => (from, to, image, refused.as_deref(), provenance.as_deref()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_talos_version_bump_upgrades_node_by_node_control_plane_first_one_at_a_time() {
        let (desired, artifacts) = talos_example_at("v1.13.10", "v1.34.1");
        let p = cluster_plan(&desired, &artifacts, &talos_running(&desired, "v1.13.9", "v1.34.1"));
        assert_eq!(
            verbs(&p),
            [
                "upgrade talos talos-cp-1",
                "upgrade talos talos-worker-1",
                "upgrade talos talos-worker-2"
            ]
        );
        // The add-on steps after the nodes are the add-on tests' (src/addons).
        for step in p.steps.iter().filter(|s| !s.action.is_cluster_wide()) {
            assert!(step.disruptive, "{step:?}");
            let (from, to, image, refused, provenance) = upgrade_of(step);
            assert_eq!((from, to), ("v1.13.9", "v1.13.10"));
            assert_eq!(image, "ghcr.io/siderolabs/installer:v1.13.10");
            assert_eq!(refused, None);
            assert_eq!(provenance, Some("cluster.yaml:4"));
        }
        // Each waits for every upgrade before it: never two nodes rebooting at once.
        let control_plane = desired.control_plane().map(|n| n.name.clone()).collect();
        let deps = crate::plan::schedule::dependencies(&p.steps, &control_plane);
        assert_eq!(deps[..3], [vec![], vec![0], vec![0, 1]]);
        let text = crate::plan::display::text(&p, crate::plan::display::Wording::Plan, false);
        assert!(
            text.contains("talos v1.13.9 -> v1.13.10 (set by cluster.yaml:4)"),
            "{text}"
        );
        assert!(text.contains("(disruptive)"), "{text}");

        // The rendered install image follows the version, so the config sent after the
        // upgrade names what the node runs.
        let cp = artifacts
            .iter()
            .find(|a| a.node == "talos-cp-1" && a.kind == ArtifactKind::TalosConfig)
            .unwrap();
        assert!(cp.content.contains("ghcr.io/siderolabs/installer:v1.13.10"));

        // Once every node runs it, no step.
        let p = cluster_plan(&desired, &artifacts, &talos_running(&desired, "v1.13.10", "v1.34.1"));
        assert_eq!(verbs(&p), Vec::<String>::new());
    }

    #[test]
    fn talos_downgrades_are_named_and_refused_across_minor_releases_as_are_skipped_minors() {
        let plan_from = |running: &str, wanted: &str| {
            let (desired, artifacts) = talos_example_at(wanted, "v1.34.1");
            cluster_plan(&desired, &artifacts, &talos_running(&desired, running, "v1.34.1"))
        };
        let p = plan_from("v1.13.9", "v1.13.8");
        assert_eq!(p.steps[0].action.verb(), "downgrade talos");
        assert_eq!(upgrade_of(&p.steps[0]).3, None, "a patch downgrade is done");

        let p = plan_from("v1.13.9", "v1.12.4");
        let refused = upgrade_of(&p.steps[0]).3.expect("refused");
        assert!(
            refused.starts_with("Talos does not downgrade across minor releases"),
            "{refused}"
        );

        let p = plan_from("v1.12.4", "v1.14.0");
        assert_eq!(p.steps[0].action.verb(), "upgrade talos");
        let refused = upgrade_of(&p.steps[0]).3.expect("refused");
        assert!(
            refused.contains("set `version` to the latest v1.13.x first"),
            "{refused}"
        );
        let text = crate::plan::display::text(&p, crate::plan::display::Wording::Plan, false);
        assert!(
            text.contains("refused: Talos upgrades one minor release at a time"),
            "{text}"
        );

        assert_eq!(talos_upgrade_refusal("v1.13.9", "v1.14.0"), None);

        // A minor upgrade: the node's config follows its upgrade, with no dry run of a config
        // its release may not read.
        let (desired, artifacts) = talos_example_at("v1.14.0", "v1.34.1");
        let mut cluster = talos_running(&desired, "v1.13.9", "v1.34.1");
        for seen in cluster.nodes.values_mut() {
            if let NodeObserved::Talos { dry_run, .. } = seen {
                *dry_run = None;
            }
        }
        let p = cluster_plan(&desired, &artifacts, &cluster);
        assert_eq!(
            verbs(&p)[..2],
            ["upgrade talos talos-cp-1", "apply talos config talos-cp-1"]
        );
        let Action::TalosApply { diff, .. } = &p.steps[1].action else {
            panic!()
        };
        assert!(
            diff.starts_with("no dry run: the config is for Talos v1.14.0, which the node runs only after its upgrade"),
            "{diff}"
        );
        assert!(dry_run_waits_for_upgrade("v1.13.9", "v1.14.0"));
        assert!(!dry_run_waits_for_upgrade("v1.13.9", "v1.13.10"));
    }

    #[test]
    fn a_kubernetes_version_change_on_talos_is_refused_before_any_cluster_step() {
        let (desired, artifacts) = talos_example_at("v1.13.9", "v1.35.0");
        let mut cluster = talos_running(&desired, "v1.13.9", "v1.34.1");
        // Talos's dry run shows the new kubelet image in the worker's config.
        if let Some(NodeObserved::Talos { dry_run: Some(r), .. }) = cluster.nodes.get_mut("talos-worker-1") {
            r.mode_details = "Config diff:\n-    image: kubelet:v1.34.1\n+    image: kubelet:v1.35.0".into();
        }
        let p = cluster_plan(&desired, &artifacts, &cluster);
        assert_eq!(
            verbs(&p),
            ["upgrade kubernetes talos-cp-1", "apply talos config talos-worker-1"]
        );
        let first = p.steps.iter().position(|s| s.action.is_cluster()).unwrap();
        assert_eq!(p.steps[first].node, "talos-cp-1");
        let Action::KubernetesUpgrade {
            from,
            to,
            refused,
            provenance,
        } = &p.steps[first].action
        else {
            panic!("{:?}", verbs(&p))
        };
        assert_eq!((from.as_str(), to.as_str()), ("v1.34.1", "v1.35.0"));
        assert_eq!(provenance.as_deref(), Some("cluster.yaml:5"));
        assert!(refused.contains("run `talosctl upgrade-k8s --to 1.35.0`"), "{refused}");
        assert!(refused.contains("driftless does not do this yet"), "{refused}");
        // Every later cluster step waits for it, so its failure stops them all.
        let control_plane = desired.control_plane().map(|n| n.name.clone()).collect();
        let deps = crate::plan::schedule::dependencies(&p.steps, &control_plane);
        for (i, step) in p.steps.iter().enumerate().skip(first + 1) {
            if step.action.is_cluster() {
                assert!(deps[i].contains(&first), "{} waits not: {:?}", verbs(&p)[i], deps[i]);
            }
        }
        // The same version as the kubelets report: nothing to refuse.
        let (desired, artifacts) = talos_example_at("v1.13.9", "v1.34.1");
        let p = cluster_plan(&desired, &artifacts, &talos_running(&desired, "v1.13.9", "v1.34.1"));
        assert!(verbs(&p).is_empty(), "{:?}", verbs(&p));
    }
}
