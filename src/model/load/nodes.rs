//! The node phases: read each node file, then resolve each node from every layer that applies to it.

use super::Loader;
use super::adrs::Adrs;
use super::cluster::ClusterInput;
use super::doc::{Doc, keys, parse_doc, split, typed};
use super::layers::{
    Layer, MergedPaths, builtin_layer, deviations_with_locations, into_provenance, merge_paths, settings_leaves,
    values_tree,
};
use crate::model::desired::*;
use crate::model::diag::{Diagnostic, Location};
use crate::model::files::node_stem;
use crate::model::schema::*;
use serde_json::Value as Json;

/// Node files per thread, at least, before reading and resolving them is spread over cores.
const NODES_PER_THREAD: usize = 64;

/// A node file, read: who the node is, and its own settings as a layer.
pub(super) struct NodeInput {
    pub doc: Doc,
    pub identity: NodeIdentity,
    pub layer: Layer,
    /// Whether the file's settings type-checked; a node whose settings did not is not resolved
    /// (its errors are reported, and a half-read node would only add misleading ones).
    pub settings_ok: bool,
}

/// The layers a node can draw from besides its own file.
struct NodeLayers<'l> {
    builtin_lxc: Layer,
    builtin_vm: Layer,
    adrs: &'l [Layer],
    defaults: &'l [Layer],
}

impl NodeLayers<'_> {
    /// The layers that may set `kind`: only those not scoped by kind, which cannot depend on it.
    fn deciding_kind<'s>(&'s self, name: &str, role: &str, node: &'s Layer) -> Vec<&'s Layer> {
        self.adrs
            .iter()
            .filter(|l| l.scope.kind.is_none() && l.scope.matches(name, None, role))
            .chain(
                self.defaults
                    .iter()
                    .filter(|l| l.source == Source::ClusterDefaults("all".into())),
            )
            .chain(std::iter::once(node))
            .collect()
    }

    /// Every layer that applies to a node, lowest precedence first: built-in, ADRs by number,
    /// cluster defaults, the node file.
    fn applying<'s>(&'s self, name: &str, kind: GuestKind, role: &str, node: &'s Layer) -> Vec<&'s Layer> {
        let builtin = if kind == GuestKind::Lxc {
            &self.builtin_lxc
        } else {
            &self.builtin_vm
        };
        let mut layers: Vec<&Layer> = vec![builtin];
        let mut applicable_adrs: Vec<&Layer> = self
            .adrs
            .iter()
            .filter(|l| l.scope.matches(name, Some(kind), role))
            .collect();
        applicable_adrs.sort_by_key(|l| l.adr);
        layers.extend(applicable_adrs);
        layers.extend(self.defaults.iter().filter(|l| l.scope.matches(name, Some(kind), role)));
        layers.push(node);
        layers
    }
}

impl<'a> Loader<'a> {
    /// A loader of its own for one node's phase on another thread; its problems are added to
    /// this one's in the nodes' order afterwards.
    fn for_one_node(&self) -> Loader<'a> {
        Loader {
            files: self.files,
            opts: self.opts,
            diags: Default::default(),
            warnings: Vec::new(),
        }
    }

    /// What a node's own loader found, added in the nodes' order.
    fn absorb(&mut self, one: Loader<'a>) {
        self.diags.extend(one.diags);
        self.warnings.extend(one.warnings);
    }
}

impl Loader<'_> {
    /// Every node file that parses, split into identity (vmid, role, ...) and settings.
    pub(super) fn node_inputs(&mut self) -> Vec<NodeInput> {
        let files: Vec<(&str, &[u8])> = self.files.node_files().collect();
        let read = crate::threads::map_in_order(&files, NODES_PER_THREAD, |_, (file, bytes)| {
            let mut one = self.for_one_node();
            (one.node_input(file, bytes), one)
        });
        read.into_iter()
            .filter_map(|(input, one)| {
                self.absorb(one);
                input
            })
            .collect()
    }

    fn node_input(&mut self, file: &str, bytes: &[u8]) -> Option<NodeInput> {
        let doc = parse_doc(file, bytes, 0, &mut self.diags)?;
        let json = doc.root.to_json();
        if !json.is_object() {
            self.diags
                .push(Diagnostic::new(doc.loc(&[]), "a node file must be a YAML mapping"));
            return None;
        }
        let (id_json, settings_json) = split(&json, NODE_IDENTITY_KEYS);
        let identity = typed::<NodeIdentity>(id_json, &doc, &[], &[]);
        let before = self.diags.len();
        let leaves = settings_leaves(settings_json, &doc, &[], NODE_IDENTITY_KEYS, &mut self.diags);
        let settings_ok = self.diags.len() == before;
        let identity = identity.map_err(|d| self.diags.push(d)).ok()?;
        let deviations = deviations_with_locations(&identity.deviations, &doc, &["deviations"]);
        let layer = Layer::new(Source::Node, leaves, Scope::default(), deviations);
        Some(NodeInput {
            doc,
            identity,
            layer,
            settings_ok,
        })
    }

    /// Every node whose file type-checked, resolved; a node that cannot be is reported and left out.
    pub(super) fn resolve_nodes(
        &mut self,
        cluster: &ClusterInput,
        adrs: &Adrs,
        defaults: &[Layer],
        inputs: &[NodeInput],
    ) -> Vec<Node> {
        let layers = NodeLayers {
            builtin_lxc: builtin_layer(GuestKind::Lxc),
            builtin_vm: builtin_layer(GuestKind::Vm),
            adrs: &adrs.node_layers,
            defaults,
        };
        let inputs: Vec<&NodeInput> = inputs.iter().filter(|n| n.settings_ok).collect();
        let resolved = crate::threads::map_in_order(&inputs, NODES_PER_THREAD, |_, input| {
            let mut one = self.for_one_node();
            (one.resolve_node(&layers, adrs.incomplete, cluster, input), one)
        });
        resolved
            .into_iter()
            .filter_map(|(node, one)| {
                self.absorb(one);
                node
            })
            .collect()
    }

    /// A node: its kind first, since that decides which layers apply, then those layers merged.
    fn resolve_node(
        &mut self,
        layers: &NodeLayers,
        adrs_incomplete: bool,
        cluster: &ClusterInput,
        input: &NodeInput,
    ) -> Option<Node> {
        let id = &input.identity;
        let name = id
            .name
            .clone()
            .unwrap_or_else(|| node_stem(&input.doc.file).to_string());
        let kind_layers = layers.deciding_kind(&name, &id.role, &input.layer);
        let kind = self.node_kind(&kind_layers, &name, adrs_incomplete, input)?;
        let layers = layers.applying(&name, kind, &id.role, &input.layer);
        let merged = merge_paths(&layers, &mut self.diags);
        let settings = self.combined_settings(&merged, input)?;
        let mut provenance = into_provenance(merged);
        provenance.extend(identity_provenance(input, &name));
        let address = self.node_address(input, &cluster.file.network.cidr)?;
        Some(Node {
            name,
            file: input.doc.file.clone(),
            vmid: id.vmid,
            proxmox_node: id.proxmox_node.clone(),
            kind,
            role: id.role.clone(),
            address,
            adopt: id.adopt,
            settings,
            provenance,
        })
    }

    /// The kind the last layer that sets it says. Without one: reported, unless an ADR could not
    /// be read (it may be the one that sets it, and its own error says what to fix).
    fn node_kind(
        &mut self,
        layers: &[&Layer],
        name: &str,
        adrs_incomplete: bool,
        input: &NodeInput,
    ) -> Option<GuestKind> {
        let kind_leaf = layers
            .iter()
            .rev()
            .find_map(|l| l.leaves.iter().find(|x| x.path == ["kind"]));
        match kind_leaf.map(|l| serde_json::from_value::<GuestKind>(l.value.clone())) {
            Some(Ok(k)) => Some(k),
            _ if adrs_incomplete => None,
            _ => {
                self.diags.push(
                    Diagnostic::new(
                        Location::file_start(&input.doc.file),
                        format!("node `{name}` has no `kind`"),
                    )
                    .hint("add `kind: lxc` or `kind: vm` to the node file or to cluster.yaml `defaults.all`"),
                );
                None
            }
        }
    }

    /// The merged values as typed settings (each layer was type-checked alone, not their combination).
    fn combined_settings(&mut self, merged: &MergedPaths, input: &NodeInput) -> Option<NodeSettings> {
        match serde_json::from_value(values_tree(merged)) {
            Ok(s) => Some(s),
            Err(e) => {
                self.diags.push(Diagnostic::new(
                    Location::file_start(&input.doc.file),
                    format!("cannot combine settings: {e}"),
                ));
                None
            }
        }
    }

    /// The node's address with its prefix length.
    fn node_address(&mut self, input: &NodeInput, cidr: &str) -> Option<ipnet::IpNet> {
        let address = &input.identity.address;
        if let Ok(a) = address.parse::<ipnet::IpNet>() {
            return Some(a);
        }
        let hint = if address.parse::<std::net::IpAddr>().is_ok() {
            format!(
                "add the prefix length: `{}/{}`",
                address,
                cidr.split('/').nth(1).unwrap_or("24")
            )
        } else {
            "write an address with its prefix length, such as 192.168.2.20/24".into()
        };
        self.diags.push(
            Diagnostic::new(
                input.doc.value_loc(&keys(&["address"])),
                format!("`address`: `{}` is not an IP address with a prefix", address),
            )
            .hint(hint),
        );
        None
    }
}

/// The identity keys as settings set by the node file, so `explain` shows where they are written.
fn identity_provenance(input: &NodeInput, name: &str) -> Vec<(String, Setting)> {
    let id = &input.identity;
    let node_set = |key: &str, value: Json| {
        (
            key.to_string(),
            Setting {
                value: value.clone(),
                chain: vec![SetBy {
                    source: Source::Node,
                    location: input.doc.loc(&keys(&[key])),
                    value,
                    items: Vec::new(),
                }],
            },
        )
    };
    let mut set = vec![
        node_set("vmid", id.vmid.into()),
        node_set("proxmox_node", id.proxmox_node.clone().into()),
        node_set("role", id.role.clone().into()),
        node_set("address", id.address.clone().into()),
    ];
    if id.name.is_some() {
        set.push(node_set("name", name.into()));
    }
    set
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{loader, repo, said};
    use super::*;
    use crate::model::LoadOptions;

    const NODE: &str = "vmid: 100\nproxmox_node: pve\nrole: server\naddress: 192.168.2.20/24\n";

    #[test]
    fn a_node_whose_settings_do_not_type_check_is_read_but_not_resolved() {
        let files = repo(&[]);
        let opts = LoadOptions::default();
        let mut l = loader(&files, &opts);
        let ok = l
            .node_input("nodes/a.yaml", format!("{NODE}cores: 2\n").as_bytes())
            .unwrap();
        assert!(ok.settings_ok);
        let bad = l
            .node_input("nodes/b.yaml", format!("{NODE}cores: many\n").as_bytes())
            .unwrap();
        assert!(!bad.settings_ok);
        assert_eq!(said(&l.diags).len(), 1);
    }

    #[test]
    fn a_missing_kind_is_not_reported_when_an_adr_could_not_be_read() {
        let files = repo(&[]);
        let opts = LoadOptions::default();
        let mut l = loader(&files, &opts);
        let input = l.node_input("nodes/a.yaml", NODE.as_bytes()).unwrap();
        let layers = [&input.layer];
        assert_eq!(l.node_kind(&layers, "a", true, &input), None);
        assert!(l.diags.is_empty());
        assert_eq!(l.node_kind(&layers, "a", false, &input), None);
        assert_eq!(said(&l.diags), ["nodes/a.yaml:1:1: node `a` has no `kind`"]);
    }

    #[test]
    fn adr_layers_apply_by_number_under_defaults_and_the_node_file() {
        let layer = |source: Source, adr: Option<u32>| Layer {
            adr,
            ..Layer::new(source, Vec::new(), Scope::default(), Vec::new())
        };
        let adrs = [
            layer(Source::Adr("ADR-009".into()), Some(9)),
            layer(Source::Adr("ADR-002".into()), Some(2)),
        ];
        let defaults = [layer(Source::ClusterDefaults("all".into()), None)];
        let layers = NodeLayers {
            builtin_lxc: builtin_layer(GuestKind::Lxc),
            builtin_vm: builtin_layer(GuestKind::Vm),
            adrs: &adrs,
            defaults: &defaults,
        };
        let node = layer(Source::Node, None);
        let order: Vec<String> = layers
            .applying("a", GuestKind::Lxc, "server", &node)
            .iter()
            .map(|l| l.source.to_string())
            .collect();
        assert_eq!(
            order,
            [
                "built-in default",
                "ADR-002",
                "ADR-009",
                "cluster defaults.all",
                "node file"
            ]
        );
    }
}
