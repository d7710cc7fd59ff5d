//! Add-ons: the cluster's core apps (CNI, load balancer, certificates, storage) as Kubernetes
//! objects from `addons/NAME/*.yaml`, applied through the Kubernetes API after the nodes.
//!
//! * This file (pure): an add-on's files rendered into objects. A `*.yaml.j2` file is a
//!   minijinja template that sees `cluster` and `nodes` (the values node templates see) and
//!   the add-on's own `values` from its declaration;
//!   every file may hold several YAML documents. Each object must say `apiVersion`, `kind`
//!   and `metadata.name`; it is labelled `app.kubernetes.io/managed-by: driftless` and
//!   `driftless.dev/addon: NAME`. The result is one artifact per add-on (`driftless render`
//!   shows it), which planning and applying read back.
//! * `plan.rs` (pure): the objects against what the API server answers (live objects, a
//!   server-side dry-run apply of each, the add-ons' inventories) as plan steps.
//! * `apply.rs` (effectful, through `ports::KubeApi`): apply, wait, prune, record the inventory.

pub mod apply;
pub mod plan;

use std::collections::BTreeSet;
use std::fmt;

use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;
use serde_json::{Map, Value as Json, json};

use crate::model::diag::{Diagnostic, Diagnostics, Location};
use crate::model::{Addon, Desired};
use crate::render::context::{cluster_context, node_context};
use crate::render::{Artifact, ArtifactKind, MAX_ARTIFACT_BYTES, TEMPLATE_FUEL};

/// The label every object driftless applies carries (the Kubernetes recommended label).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The label naming the add-on an object belongs to.
pub const ADDON_LABEL: &str = "driftless.dev/addon";
/// The label of an add-on's inventory ConfigMap.
pub const INVENTORY_LABEL: &str = "driftless.dev/inventory";
/// Where inventories live.
pub const INVENTORY_NAMESPACE: &str = "kube-system";
/// The server-side apply field manager.
pub const FIELD_MANAGER: &str = "driftless";

/// The inventory ConfigMap of an add-on.
pub fn inventory_name(addon: &str) -> String {
    format!("driftless-addon-{addon}")
}

/// An object's identity: what an inventory lists and a plan names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    pub fn of(object: &Json) -> Option<ObjectKey> {
        Some(ObjectKey {
            api_version: object["apiVersion"].as_str()?.to_string(),
            kind: object["kind"].as_str()?.to_string(),
            namespace: object
                .pointer("/metadata/namespace")
                .and_then(Json::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            name: object.pointer("/metadata/name")?.as_str()?.to_string(),
        })
    }

    /// The API group (`""` for the core group).
    pub fn group(&self) -> &str {
        self.api_version.rsplit_once('/').map_or("", |(g, _)| g)
    }

    /// One line of an inventory: `apiVersion kind namespace name` (`-` for no namespace).
    pub fn inventory_line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.api_version,
            self.kind,
            self.namespace.as_deref().unwrap_or("-"),
            self.name
        )
    }

    pub fn parse_inventory_line(line: &str) -> Option<ObjectKey> {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [api_version, kind, namespace, name] = parts.as_slice() else {
            return None;
        };
        Some(ObjectKey {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            namespace: (*namespace != "-").then(|| namespace.to_string()),
            name: name.to_string(),
        })
    }

    /// Applied first: namespaces, then CRDs (waited for until Established), then the rest.
    pub fn apply_rank(&self) -> u8 {
        match (self.group(), self.kind.as_str()) {
            ("", "Namespace") => 0,
            ("apiextensions.k8s.io", "CustomResourceDefinition") => 1,
            _ => 2,
        }
    }

    pub fn is_secret(&self) -> bool {
        self.group().is_empty() && self.kind == "Secret"
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind, ns, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

/// An inventory's objects, one per line.
pub fn parse_inventory(text: &str) -> Vec<ObjectKey> {
    text.lines().filter_map(ObjectKey::parse_inventory_line).collect()
}

pub fn inventory_text(keys: &BTreeSet<ObjectKey>) -> String {
    keys.iter().map(|k| k.inventory_line() + "\n").collect()
}

/// The inventory ConfigMap of `addon` listing `keys`.
pub fn inventory_object(addon: &str, keys: &BTreeSet<ObjectKey>) -> Json {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": inventory_name(addon),
            "namespace": INVENTORY_NAMESPACE,
            "labels": {MANAGED_BY: FIELD_MANAGER, ADDON_LABEL: addon, INVENTORY_LABEL: "true"},
        },
        "data": {"objects": inventory_text(keys)},
    })
}

/// The objects of an add-on's artifact, as rendered (labels added), in file order.
pub fn objects(artifact: &str) -> Vec<Json> {
    split_documents(artifact)
        .into_iter()
        .filter_map(|(_, doc)| yaml_serde::from_str::<Json>(doc).ok())
        .filter(|o| o.is_object())
        .collect()
}

/// The artifact's node field for an add-on: `addons/NAME`.
pub fn artifact_node(addon: &str) -> String {
    format!("addons/{addon}")
}

/// The rendered objects of `addon`, from the run's artifacts.
pub fn addon_objects(artifacts: &[Artifact], addon: &str) -> Vec<Json> {
    let node = artifact_node(addon);
    artifacts
        .iter()
        .find(|a| a.kind == ArtifactKind::AddonManifests && a.node == node)
        .map(|a| objects(&a.content))
        .unwrap_or_default()
}

/// Split a multi-document YAML text at `---` lines: (line offset, document).
fn split_documents(text: &str) -> Vec<(u32, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 0u32;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") || t == "..." {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i as u32 + 1;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

/// Render every declared add-on into one artifact each, in apply order.
pub fn render(desired: &Desired) -> Result<Vec<Artifact>, Diagnostics> {
    let mut diags = Diagnostics::default();
    let mut out = Vec::new();
    if desired.cluster.addons.is_empty() {
        return Ok(out);
    }
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    let cluster = Value::from(minijinja::value::Serde(cluster_context(desired)));
    let nodes: Vec<_> = desired.nodes.iter().map(|n| node_context(desired, n)).collect();
    let nodes = Value::from(minijinja::value::Serde(nodes));
    for addon in &desired.cluster.addons {
        match render_addon(&env, addon, &cluster, &nodes) {
            Ok(a) => out.push(a),
            Err(d) => diags.extend(d),
        }
    }
    if diags.is_empty() { Ok(out) } else { Err(diags.finish()) }
}

fn render_addon(env: &Environment<'_>, addon: &Addon, cluster: &Value, nodes: &Value) -> Result<Artifact, Diagnostics> {
    let mut diags = Diagnostics::default();
    let mut objects: Vec<Json> = Vec::new();
    let mut seen: BTreeSet<ObjectKey> = BTreeSet::new();
    for file in &addon.files {
        let text = if file.file.ends_with(".j2") {
            let rendered = env.template_from_named_str(&file.file, &file.source).and_then(|t| {
                t.render(minijinja::context! {
                    cluster => cluster.clone(),
                    nodes => nodes.clone(),
                    values => Value::from(minijinja::value::Serde(&addon.values)),
                })
            });
            match rendered {
                Ok(t) if t.len() <= MAX_ARTIFACT_BYTES => t,
                Ok(_) => {
                    diags.push(Diagnostic::new(
                        Location::file_start(&file.file),
                        format!("renders more than {} MiB", MAX_ARTIFACT_BYTES >> 20),
                    ));
                    continue;
                }
                Err(e) => {
                    let mut msg = format!("template error in add-on `{}`: {}", addon.name, e.kind());
                    if let Some(d) = e.detail() {
                        msg.push_str(": ");
                        msg.push_str(d);
                    }
                    diags.push(
                        Diagnostic::new(Location::new(&file.file, e.line().unwrap_or(1) as u32, 1), msg)
                            .hint("add-on templates see `cluster`, `nodes` and the add-on's `values`"),
                    );
                    continue;
                }
            }
        } else {
            file.source.clone()
        };
        for (offset, doc) in split_documents(&text) {
            let node = match crate::model::yaml::parse(doc, offset) {
                Ok(n) => n,
                Err(e) => {
                    diags.push(Diagnostic::new(
                        Location::new(&file.file, e.pos.line, e.pos.col),
                        format!("not valid YAML: {}", e.message),
                    ));
                    continue;
                }
            };
            let mut object = node.to_json();
            if object.is_null() {
                continue;
            }
            let at = Location::new(&file.file, node.pos.line.max(offset + 1), 1);
            if let Err(message) = check_object(&object) {
                diags.push(
                    Diagnostic::new(at, format!("add-on `{}`: {message}", addon.name))
                        .hint("each document is one Kubernetes object: apiVersion, kind, metadata.name"),
                );
                continue;
            }
            label(&mut object, &addon.name);
            let key = ObjectKey::of(&object).expect("checked above");
            if !seen.insert(key.clone()) {
                diags.push(Diagnostic::new(
                    at,
                    format!("add-on `{}` declares {key} twice", addon.name),
                ));
                continue;
            }
            objects.push(object);
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let mut content = String::new();
    for (i, o) in objects.iter().enumerate() {
        if i > 0 {
            content.push_str("---\n");
        }
        content.push_str(&yaml_serde::to_string(o).expect("JSON values serialise as YAML"));
    }
    Ok(Artifact {
        node: artifact_node(&addon.name),
        kind: ArtifactKind::AddonManifests,
        target: format!(
            "Kubernetes API, wave {}{} ({})",
            addon.wave,
            if addon.cni { ", the CNI" } else { "" },
            addon.declared
        ),
        content,
    })
}

fn check_object(o: &Json) -> Result<(), String> {
    let Some(map) = o.as_object() else {
        return Err("a document is not a mapping".into());
    };
    for field in ["apiVersion", "kind"] {
        if map.get(field).and_then(Json::as_str).is_none_or(str::is_empty) {
            return Err(format!("an object without `{field}`"));
        }
    }
    if o["kind"].as_str().is_some_and(|k| k.ends_with("List")) {
        return Err("a List: write its items as separate documents".into());
    }
    match o.pointer("/metadata/name").and_then(Json::as_str) {
        Some(n) if !n.is_empty() => {}
        _ => {
            return Err(format!(
                "a {} without `metadata.name`",
                o["kind"].as_str().unwrap_or("?")
            ));
        }
    }
    if o.pointer("/metadata/generateName").is_some() {
        return Err("`generateName` cannot be applied declaratively".into());
    }
    Ok(())
}

/// Add the ownership labels (kept if already there).
fn label(o: &mut Json, addon: &str) {
    let metadata = o
        .as_object_mut()
        .expect("checked")
        .entry("metadata")
        .or_insert_with(|| Json::Object(Map::new()));
    let labels = metadata
        .as_object_mut()
        .expect("checked")
        .entry("labels")
        .or_insert_with(|| Json::Object(Map::new()));
    if !labels.is_object() {
        *labels = Json::Object(Map::new());
    }
    let labels = labels.as_object_mut().expect("made an object");
    labels.insert(MANAGED_BY.into(), Json::String(FIELD_MANAGER.into()));
    labels.insert(ADDON_LABEL.into(), Json::String(addon.into()));
}

#[cfg(test)]
mod tests;
