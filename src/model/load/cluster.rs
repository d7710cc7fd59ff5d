//! The cluster.yaml phases: the file itself, its `defaults` as layers, and the cluster-wide keys.

use super::Loader;
use super::adrs::Adrs;
use super::doc::{Doc, keys, parse_doc, split, typed};
use super::layers::{Layer, deviations_with_locations, leaves, merge, settings_leaves, unflatten};
use crate::model::desired::*;
use crate::model::diag::{Diagnostic, Location};
use crate::model::schema::*;
use std::collections::BTreeMap;

/// cluster.yaml, parsed and type-checked: the phases that resolve the cluster and its nodes need it.
pub(super) struct ClusterInput {
    pub doc: Doc,
    pub file: ClusterFile,
    /// cluster.yaml's `deviations`, each with the place its `adr:` is written.
    pub deviations: Vec<(Deviation, Location)>,
}

impl Loader<'_> {
    /// Read cluster.yaml; `None` (with the reason reported) when it is missing, not YAML or mistyped.
    pub(super) fn cluster_file(&mut self) -> Option<ClusterInput> {
        let Some(bytes) = self.files.files.get("cluster.yaml") else {
            self.diags.push(
                Diagnostic::new(
                    Location::file_start("cluster.yaml"),
                    "cluster.yaml not found at the repository root",
                )
                .hint("an infrastructure repository has cluster.yaml, nodes/<name>.yaml and optionally adr/*.md"),
            );
            return None;
        };
        let doc = parse_doc("cluster.yaml", bytes, 0, &mut self.diags)?;
        let file = typed::<ClusterFile>(doc.root.to_json(), &doc, &[], &[])
            .map_err(|d| self.diags.push(d))
            .ok()?;
        let deviations = deviations_with_locations(&file.deviations, &doc, &["deviations"]);
        Some(ClusterInput { doc, file, deviations })
    }

    /// `defaults.all`, `defaults.lxc` and `defaults.vm` as layers, the last two scoped by kind.
    pub(super) fn cluster_defaults(&mut self, cluster: &ClusterInput) -> Vec<Layer> {
        let of_kind = |kind| Scope {
            kind: Some(ScopeList::One(kind)),
            ..Default::default()
        };
        let defaults = &cluster.file.defaults;
        let mut layers = Vec::new();
        for (name, value, scope) in [
            ("all", &defaults.all, Scope::default()),
            ("lxc", &defaults.lxc, of_kind(GuestKind::Lxc)),
            ("vm", &defaults.vm, of_kind(GuestKind::Vm)),
        ] {
            let Some(value) = value else { continue };
            let base = keys(&["defaults", name]);
            let leaves = settings_leaves(value.clone(), &cluster.doc, &base, &[], &mut self.diags);
            let layer = Layer::new(
                Source::ClusterDefaults(name.into()),
                leaves,
                scope,
                cluster.deviations.clone(),
            );
            // A node's kind decides which of these apply, so they cannot be what decides it.
            if name != "all" && layer.sets_kind() {
                self.diags.push(
                    Diagnostic::new(
                        cluster.doc.loc(&keys(&["defaults", name, "kind"])),
                        format!("`defaults.{name}` cannot set `kind`"),
                    )
                    .hint("set `kind` in `defaults.all` or in each node file"),
                );
            }
            layers.push(layer);
        }
        layers
    }

    /// The cluster-wide keys (distribution, version, ...): applying ADRs, then cluster.yaml over them.
    pub(super) fn cluster_level(&mut self, cluster: &ClusterInput, adrs: &Adrs) -> (ClusterLevel, Provenance) {
        let (top_json, _) = split(&cluster.doc.root.to_json(), CLUSTER_LEVEL_KEYS);
        let top_leaves = match typed::<ClusterLevel>(top_json, &cluster.doc, &[], &[]) {
            Ok(c) => leaves(&serde_json::to_value(&c).expect("serialise"), &cluster.doc, &[]),
            Err(_) => Vec::new(), // already reported by the ClusterFile check
        };
        let cluster_layer = Layer::new(
            Source::Cluster,
            top_leaves,
            Scope::default(),
            cluster.deviations.clone(),
        );
        let mut layers: Vec<&Layer> = adrs.cluster_layers.iter().collect();
        layers.push(&cluster_layer);
        let provenance = merge(&layers, &mut self.diags);
        // Keys are nested below `addons`: each leaf's own path, by the key provenance uses.
        let paths: BTreeMap<String, Vec<String>> = layers
            .iter()
            .flat_map(|l| l.leaves.iter())
            .map(|leaf| (display_key(&leaf.path), leaf.path.clone()))
            .collect();
        let level = serde_json::from_value(unflatten(&provenance, &paths)).unwrap_or_default();
        (level, provenance)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{loader, repo, said};
    use crate::model::LoadOptions;

    const CLUSTER: &str =
        "name: c\nproxmox: {api: https://pve:8006}\nnetwork: {cidr: 10.0.0.0/24, gateway: 10.0.0.1}\n";

    #[test]
    fn only_defaults_all_may_set_kind() {
        let text = format!("{CLUSTER}defaults:\n  all: {{kind: lxc}}\n  lxc:\n    cores: 2\n    kind: lxc\n");
        let files = repo(&[("cluster.yaml", &text)]);
        let opts = LoadOptions::default();
        let mut l = loader(&files, &opts);
        let cluster = l.cluster_file().expect("cluster.yaml reads");
        let layers = l.cluster_defaults(&cluster);
        assert_eq!(layers.len(), 2);
        assert_eq!(said(&l.diags), ["cluster.yaml:8:5: `defaults.lxc` cannot set `kind`"]);
    }
}
