//! Planning add-ons (pure): each add-on's rendered objects against what the Kubernetes API
//! answered, as one step per add-on in wave order, after the node steps. An object is
//! created when the API does not have it (or cannot be asked yet), changed when a
//! server-side dry-run apply of it differs from the live object (the field-level diff; a
//! Secret's values are never shown), and pruned when the add-on's inventory lists it and git
//! no longer does (only with `reconcile.prune`; only what an inventory lists is ever
//! deleted). An add-on that left git is removed the same way.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value as Json;

use super::{ObjectKey, addon_objects, artifact_node};
use crate::model::Desired;
use crate::plan::{Action, Change, Notice, ObjectChange, Step, Via};
use crate::render::Artifact;

/// What the API server says about one rendered object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ObjectObserved {
    /// The object as applied: its namespace filled in when the kind is namespaced.
    pub key: Option<ObjectKey>,
    /// The server serves its kind (a CRD applied in the same run is not served yet).
    pub served: bool,
    /// Never serialised: a Secret's data is in it.
    #[serde(skip)]
    pub live: Option<Json>,
    /// The live object as a dry-run apply would leave it.
    #[serde(skip)]
    pub would_be: Option<Json>,
    /// The dry run found fields another manager owns.
    pub conflict: Option<String>,
}

/// What the add-on layer read from the Kubernetes API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AddonsObserved {
    /// The API answered: without it every object is planned as created.
    pub api: bool,
    /// By the object's key as rendered.
    pub objects: BTreeMap<ObjectKey, ObjectObserved>,
    /// Add-on name -> the objects its inventory lists.
    pub inventories: BTreeMap<String, Vec<ObjectKey>>,
}

/// Metadata the API server maintains: never a difference driftless made.
const SERVER_METADATA: &[&str] = &[
    "managedFields",
    "resourceVersion",
    "generation",
    "uid",
    "creationTimestamp",
    "selfLink",
];

/// Flatten an object into `path -> value` (arrays as one compact JSON value), without
/// status and server-maintained metadata.
fn flatten(object: &Json) -> BTreeMap<String, String> {
    fn walk(v: &Json, path: String, out: &mut BTreeMap<String, String>) {
        match v {
            Json::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(child, p, out);
                }
            }
            Json::String(s) => {
                out.insert(path, s.clone());
            }
            other => {
                out.insert(path, other.to_string());
            }
        }
    }
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("status");
        if let Some(meta) = m.get_mut("metadata").and_then(Json::as_object_mut) {
            for k in SERVER_METADATA {
                meta.remove(*k);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&o, String::new(), &mut out);
    out
}

/// The fields that differ between the live object and what applying would leave; a
/// Secret's `data` and `stringData` values show as `(secret)`.
pub fn field_changes(key: &ObjectKey, live: &Json, would_be: &Json) -> Vec<Change> {
    let (old, new) = (flatten(live), flatten(would_be));
    let hidden = |path: &str, v: Option<&String>| {
        v.map(|v| {
            if key.is_secret() && (path.starts_with("data.") || path.starts_with("stringData.")) {
                "(secret)".to_string()
            } else {
                v.clone()
            }
        })
    };
    let paths: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    paths
        .into_iter()
        .filter(|p| old.get(*p) != new.get(*p))
        .map(|p| Change {
            key: p.clone(),
            old: hidden(p, old.get(p)),
            new: hidden(p, new.get(p)),
            via: Via::KubeApi,
            needs_restart: false,
            provenance: None,
        })
        .collect()
}

fn cluster_step(desired: &Desired, node: String, action: Action) -> Step {
    let first = desired.control_plane().next();
    Step {
        node,
        vmid: 0,
        pve_node: first.map(|n| n.proxmox_node.clone()).unwrap_or_default(),
        kind: first.map(|n| n.kind.pve()).unwrap_or(crate::ports::PveKind::Lxc),
        disruptive: false,
        action,
    }
}

/// The add-on steps, in apply order, and what is left alone (as notices).
/// `nodes_not_ready`: some node is NotReady or not registered now. In a cluster whose CNI is
/// an add-on, every node must then be seen Ready after the CNI's wave, as after any change of
/// the CNI add-on itself (a node that was Ready is gated on its own, as everywhere).
pub fn steps(
    desired: &Desired,
    artifacts: &[Artifact],
    observed: &AddonsObserved,
    nodes_not_ready: bool,
) -> (Vec<Step>, Vec<Notice>) {
    let prune = desired.cluster.reconcile.prune;
    let mut steps = Vec::new();
    let mut notices = Vec::new();
    let notice = |message: String| Notice {
        node: "add-ons".into(),
        vmid: 0,
        message,
    };
    let cni_addon = desired.cluster.addons.iter().find(|a| a.cni);
    let gate_now = desired.cluster.cni_from_addon() && (nodes_not_ready || !observed.api);
    let gate_step = |desired: &Desired| {
        cluster_step(
            desired,
            "nodes".into(),
            Action::NodesReady {
                cni: desired.cluster.cni.clone(),
                cni_addon: cni_addon.map(|a| a.name.clone()),
            },
        )
    };
    let mut gate_planned = false;
    if gate_now && cni_addon.is_none() {
        steps.push(gate_step(desired));
        gate_planned = true;
    }
    for addon in &desired.cluster.addons {
        let objects = addon_objects(artifacts, &addon.name);
        let mut create = Vec::new();
        let mut change = Vec::new();
        let mut wanted: BTreeSet<ObjectKey> = BTreeSet::new();
        for object in &objects {
            let Some(rendered) = ObjectKey::of(object) else {
                continue;
            };
            let seen = observed.objects.get(&rendered);
            let key = seen.and_then(|s| s.key.clone()).unwrap_or_else(|| rendered.clone());
            wanted.insert(key.clone());
            match seen {
                Some(ObjectObserved {
                    live: Some(live),
                    would_be: Some(would_be),
                    conflict,
                    ..
                }) => {
                    let changes = field_changes(&key, live, would_be);
                    if !changes.is_empty() || conflict.is_some() {
                        change.push(ObjectChange {
                            object: key.to_string(),
                            changes,
                            conflict: conflict.clone(),
                        });
                    }
                }
                Some(ObjectObserved { live: Some(_), .. }) => {}
                _ => create.push(key.to_string()),
            }
        }
        let inventory: BTreeSet<ObjectKey> = observed
            .inventories
            .get(&addon.name)
            .map(|v| v.iter().cloned().collect())
            .unwrap_or_default();
        let stale: Vec<&ObjectKey> = inventory.difference(&wanted).collect();
        let mut pruned = Vec::new();
        for key in &stale {
            if prune {
                pruned.push(key.to_string());
            } else {
                notices.push(notice(format!(
                    "{}: {key} left git and is left in the cluster (prune: false)",
                    addon.name
                )));
            }
        }
        let recorded = if prune {
            inventory == wanted
        } else {
            wanted.is_subset(&inventory)
        };
        let planned = !create.is_empty() || !change.is_empty() || !pruned.is_empty() || !recorded || !observed.api;
        if planned {
            steps.push(cluster_step(
                desired,
                artifact_node(&addon.name),
                Action::Addon {
                    addon: addon.name.clone(),
                    wave: addon.wave,
                    cni: addon.cni,
                    declared: addon.declared.clone(),
                    create,
                    change,
                    prune: pruned,
                    manifests: artifacts
                        .iter()
                        .find(|a| a.node == artifact_node(&addon.name))
                        .map(|a| a.content.clone())
                        .unwrap_or_default(),
                },
            ));
        }
        if addon.cni && desired.cluster.cni_from_addon() && (gate_now || planned) && !gate_planned {
            steps.push(gate_step(desired));
            gate_planned = true;
        }
    }
    for (name, inventory) in &observed.inventories {
        if desired.cluster.addons.iter().any(|a| &a.name == name) {
            continue;
        }
        if prune {
            steps.push(cluster_step(
                desired,
                artifact_node(name),
                Action::AddonRemove {
                    addon: name.clone(),
                    prune: inventory.iter().map(ToString::to_string).collect(),
                },
            ));
        } else {
            notices.push(notice(format!(
                "add-on `{name}` left git; its {} object(s) are left in the cluster (prune: false)",
                inventory.len()
            )));
        }
    }
    (steps, notices)
}
