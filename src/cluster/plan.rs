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
            state: TalosNodeState::Configured { .. },
            dry_run,
        }) => {
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
                            .unwrap_or_else(|| "(Talos gave no dry-run answer)".into()),
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
                if let Some(NodeObserved::Talos {
                    state: TalosNodeState::Configured { version },
                    ..
                }) = seen
                    && version != &desired.cluster.version
                {
                    plan.notices.push(crate::plan::Notice {
                        node: node.name.clone(),
                        vmid: node.vmid,
                        message: format!(
                            "Talos {version} runs, cluster.yaml says {}: driftless does not upgrade Talos itself (talosctl upgrade)",
                            desired.cluster.version
                        ),
                    });
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
        assert_eq!(cluster_steps.len(), 1, "{:?}", verbs(&p));
        // An older Talos is said out loud, not upgraded behind the operator's back.
        assert_eq!(p.notices.len(), 1, "{:?}", p.notices);
        assert_eq!(p.notices[0].node, "talos-worker-1");
        assert!(p.notices[0].message.contains("Talos v1.13.8 runs"));
        match &cluster_steps[0].action {
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
}
