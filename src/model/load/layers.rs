//! Settings as layers of leaves, and the merge that gives every final value its provenance.

use super::doc::{Doc, keys, typed};
use crate::model::adr::{self, Adr};
use crate::model::desired::*;
use crate::model::diag::{Diagnostic, Diagnostics, Location};
use crate::model::schema::*;
use crate::model::yaml::Seg;
use serde_json::Value as Json;
use std::collections::BTreeMap;

/// A leaf of a settings tree: its key path, canonical value, where it was written.
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    pub path: Vec<String>,
    pub value: Json,
    pub location: Location,
    pub items: Vec<Location>,
}

pub(super) fn is_secret_ref(v: &Json) -> bool {
    matches!(v, Json::Object(m) if m.len() == 1 && m.contains_key("secret"))
}

/// Flatten settings into leaves: mappings recurse, lists and scalars are leaves.
pub(crate) fn leaves(json: &Json, doc: &Doc, base: &[Seg]) -> Vec<Leaf> {
    fn walk(v: &Json, path: &mut Vec<String>, doc: &Doc, base: &[Seg], out: &mut Vec<Leaf>) {
        match v {
            Json::Null => {}
            Json::Object(m) if !is_secret_ref(v) => {
                for (k, child) in m {
                    path.push(k.clone());
                    walk(child, path, doc, base, out);
                    path.pop();
                }
            }
            _ => {
                let mut segs = base.to_vec();
                segs.extend(path.iter().map(|k| Seg::Key(k.clone())));
                let items = match v {
                    Json::Array(a) => (0..a.len())
                        .map(|i| {
                            let mut p = segs.clone();
                            p.push(Seg::Index(i));
                            doc.loc(&p)
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                out.push(Leaf {
                    path: path.clone(),
                    value: v.clone(),
                    location: doc.loc(&segs),
                    items,
                });
            }
        }
    }
    let mut out = Vec::new();
    walk(json, &mut Vec::new(), doc, base, &mut out);
    out
}

fn set_path(root: &mut Json, path: &[String], value: Json) {
    let mut cur = root;
    for (i, k) in path.iter().enumerate() {
        if !cur.is_object() {
            *cur = Json::Object(serde_json::Map::new());
        }
        let m = cur.as_object_mut().expect("made an object above");
        if i + 1 == path.len() {
            m.insert(k.clone(), value);
            return;
        }
        cur = m
            .entry(k.clone())
            .or_insert_with(|| Json::Object(serde_json::Map::new()));
    }
}

/// Check a settings mapping and return its canonical leaves (sizes normalised, so `4096`
/// and `4GiB` compare equal when ADRs and files are compared).
pub(super) fn settings_leaves(
    json: Json,
    doc: &Doc,
    base: &[Seg],
    extra: &[&str],
    diags: &mut Diagnostics,
) -> Vec<Leaf> {
    match typed::<NodeSettings>(json, doc, base, extra) {
        Ok(s) => leaves(&serde_json::to_value(&s).expect("settings serialise"), doc, base),
        Err(d) => {
            diags.push(d);
            Vec::new()
        }
    }
}

#[derive(Debug)]
pub(crate) struct Layer {
    pub source: Source,
    pub leaves: Vec<Leaf>,
    pub scope: Scope,
    /// For ADR layers.
    pub adr: Option<u32>,
    pub supersedes: Vec<u32>,
    /// Deviations recorded in the file this layer comes from.
    pub deviations: Vec<(Deviation, Location)>,
}

impl Layer {
    /// A layer that is not an ADR's: built-in defaults, cluster.yaml, a node file.
    pub(super) fn new(
        source: Source,
        leaves: Vec<Leaf>,
        scope: Scope,
        deviations: Vec<(Deviation, Location)>,
    ) -> Layer {
        Layer {
            source,
            leaves,
            scope,
            adr: None,
            supersedes: Vec::new(),
            deviations,
        }
    }

    /// An applying ADR's layer: it carries the number and `Supersedes` list the merge needs.
    pub(super) fn adr(a: &Adr, leaves: Vec<Leaf>, scope: Scope) -> Layer {
        Layer {
            source: Source::Adr(a.id()),
            leaves,
            scope,
            adr: Some(a.number),
            supersedes: a.supersedes.clone(),
            deviations: Vec::new(),
        }
    }

    pub(super) fn sets_kind(&self) -> bool {
        self.leaves.iter().any(|l| l.path == ["kind"])
    }
}

pub(super) fn builtin_layer(kind: GuestKind) -> Layer {
    let mut v = serde_json::json!({
        "cores": 1, "memory": "1GiB", "swap": "512MiB", "disk": "8GiB",
        "storage": "local-lvm", "bridge": "vmbr0", "onboot": true,
    });
    match kind {
        GuestKind::Lxc => set_path(&mut v, &["lxc".into(), "arch".into()], "amd64".into()),
        GuestKind::Vm => {
            let vm = serde_json::json!({"cpu": "host", "machine": "q35", "bios": "seabios", "ostype": "l26",
                "scsihw": "virtio-scsi-single", "agent": true, "net_model": "virtio", "sockets": 1});
            set_path(&mut v, &["vm".into()], vm);
        }
    }
    let mut out = Vec::new();
    fn walk(v: &Json, path: &mut Vec<String>, out: &mut Vec<Leaf>) {
        match v {
            Json::Object(m) => {
                for (k, c) in m {
                    path.push(k.clone());
                    walk(c, path, out);
                    path.pop();
                }
            }
            _ => out.push(Leaf {
                path: path.clone(),
                value: v.clone(),
                location: builtin_location(),
                items: Vec::new(),
            }),
        }
    }
    walk(&v, &mut Vec::new(), &mut out);
    Layer::new(Source::Builtin, out, Scope::default(), Vec::new())
}

pub fn builtin_location() -> Location {
    Location::new("(built-in)", 0, 0)
}

fn deviated(devs: &[(Deviation, Location)], adr: u32, key: &str) -> bool {
    devs.iter().any(|(d, _)| {
        adr::parse_adr_ref(&d.adr) == Some(adr)
            && (d.keys.is_empty() || d.keys.iter().any(|k| k == key || key.starts_with(&format!("{k}."))))
    })
}

/// Merge layers (lowest first) into settings with provenance, reporting ADR conflicts and
/// file values that contradict an accepted ADR without a recorded deviation.
pub(crate) fn merge(layers: &[&Layer], diags: &mut Diagnostics) -> Provenance {
    into_provenance(merge_paths(layers, diags))
}

/// Merged settings keyed by their key paths, before the keys take their display form.
pub(crate) type MergedPaths = BTreeMap<Vec<String>, Setting>;

/// [`merge`], keyed by key path. This runs for every node of a repository with every leaf of
/// every layer that applies to it, so it allocates only for what it keeps: a display key is
/// made only for a message, a path only for a new key.
pub(crate) fn merge_paths(layers: &[&Layer], diags: &mut Diagnostics) -> MergedPaths {
    let mut merged: MergedPaths = BTreeMap::new();
    for layer in layers {
        for leaf in &layer.leaves {
            if !merged.contains_key(&leaf.path) {
                let empty = Setting {
                    value: Json::Null,
                    chain: Vec::new(),
                };
                merged.insert(leaf.path.clone(), empty);
            }
            let entry = merged.get_mut(&leaf.path).expect("inserted above");
            let insert_at = match &layer.source {
                Source::Adr(id) => adr_position(layers, layer, id, leaf, &entry.chain, diags),
                Source::Builtin => entry.chain.len(),
                _ => {
                    check_against_adrs(layer, leaf, &entry.chain, diags);
                    entry.chain.len()
                }
            };
            let set = SetBy {
                source: layer.source.clone(),
                location: leaf.location.clone(),
                value: leaf.value.clone(),
                items: leaf.items.clone(),
            };
            entry.chain.insert(insert_at, set);
        }
    }
    for setting in merged.values_mut() {
        setting.value = setting.chain.last().expect("a key has a value").value.clone();
    }
    merged
}

/// Merged settings as a tree of their values, the shape the typed settings are read from.
pub(super) fn values_tree(merged: &MergedPaths) -> Json {
    let mut root = Json::Object(serde_json::Map::new());
    for (path, setting) in merged {
        set_path(&mut root, path, setting.value.clone());
    }
    root
}

pub(crate) fn into_provenance(merged: MergedPaths) -> Provenance {
    merged.into_iter().map(|(k, v)| (display_key(&k), v)).collect()
}

/// Where an ADR's value goes in a key's chain: last, unless the ADR before it supersedes this one
/// (then it goes under that one, which keeps winning). Two ADRs that disagree and neither
/// supersedes the other are a conflict.
fn adr_position(
    layers: &[&Layer],
    layer: &Layer,
    id: &str,
    leaf: &Leaf,
    chain: &[SetBy],
    diags: &mut Diagnostics,
) -> usize {
    let this = layer.adr.expect("ADR layers carry their number");
    let Some((i, prev)) = chain
        .iter()
        .enumerate()
        .rev()
        .find(|(_, s)| matches!(s.source, Source::Adr(_)))
    else {
        return chain.len();
    };
    if prev.value == leaf.value {
        return chain.len();
    }
    let prev_layer = layers.iter().find(|l| l.source == prev.source);
    let prev_num = prev_layer.and_then(|l| l.adr).unwrap_or(0);
    let prev_supersedes = prev_layer.is_some_and(|l| l.supersedes.contains(&this));
    if layer.supersedes.contains(&prev_num) {
        // this ADR replaces the earlier one for this key: it wins
    } else if prev_supersedes {
        return i;
    } else {
        let key = display_key(&leaf.path);
        diags.push(
            Diagnostic::new(
                leaf.location.clone(),
                format!(
                    "{id} sets `{key}: {}` but {} sets it to {}",
                    show(&leaf.value),
                    adr::adr_id(prev_num),
                    show(&prev.value)
                ),
            )
            .related(
                prev.location.clone(),
                format!("{} sets `{key}` here", adr::adr_id(prev_num)),
            )
            .hint(format!(
                "two accepted ADRs may not disagree: mark one `Superseded by`, or write `Supersedes {}` in {id}",
                adr::adr_id(prev_num)
            )),
        );
    }
    chain.len()
}

/// A file's value that differs from an accepted ADR's is a mistake unless the file records a deviation.
fn check_against_adrs(layer: &Layer, leaf: &Leaf, chain: &[SetBy], diags: &mut Diagnostics) {
    for prev in chain {
        let Source::Adr(adr_name) = &prev.source else { continue };
        if prev.value == leaf.value {
            continue;
        }
        let num = adr::parse_adr_ref(adr_name).unwrap_or(0);
        let key = display_key(&leaf.path);
        if !deviated(&layer.deviations, num, &key) {
            diags.push(
                Diagnostic::new(
                    leaf.location.clone(),
                    format!(
                        "`{key}: {}` contradicts accepted {adr_name}, which sets it to {}",
                        show(&leaf.value),
                        show(&prev.value)
                    ),
                )
                .related(prev.location.clone(), format!("{adr_name} sets `{key}` here"))
                .hint(format!(
                    "follow the ADR, or record the departure in this file: \
                     `deviations: [{{adr: {adr_name}, keys: [{key}], reason: \"...\"}}]`"
                )),
            );
        }
    }
}

pub(crate) fn show(v: &Json) -> String {
    match v {
        Json::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

pub(super) fn unflatten(p: &Provenance, paths: &BTreeMap<String, Vec<String>>) -> Json {
    let mut root = Json::Object(serde_json::Map::new());
    for (k, s) in p {
        if let Some(path) = paths.get(k) {
            set_path(&mut root, path, s.value.clone());
        }
    }
    root
}

pub(super) fn deviations_with_locations(devs: &[Deviation], doc: &Doc, base: &[&str]) -> Vec<(Deviation, Location)> {
    devs.iter()
        .enumerate()
        .map(|(i, d)| {
            let mut p = keys(base);
            p.push(Seg::Index(i));
            p.push(Seg::Key("adr".into()));
            (d.clone(), doc.value_loc(&p))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(key: &str, value: Json, file: &str, line: u32) -> Leaf {
        Leaf {
            path: vec![key.to_string()],
            value,
            location: Location::new(file, line, 1),
            items: Vec::new(),
        }
    }

    fn adr_layer(n: u32, cores: u32, supersedes: &[u32]) -> Layer {
        let file = format!("adr/ADR-{n:03}.md");
        Layer {
            adr: Some(n),
            supersedes: supersedes.to_vec(),
            ..Layer::new(
                Source::Adr(adr::adr_id(n)),
                vec![leaf("cores", cores.into(), &file, 10)],
                Scope::default(),
                Vec::new(),
            )
        }
    }

    #[test]
    fn an_adr_that_supersedes_another_wins_in_either_order() {
        let (old, new) = (adr_layer(1, 2, &[]), adr_layer(2, 4, &[1]));
        for layers in [[&old, &new], [&new, &old]] {
            let mut diags = Diagnostics::default();
            let merged = merge(&layers, &mut diags);
            assert!(diags.is_empty());
            assert_eq!(merged["cores"].value, 4);
            assert_eq!(merged["cores"].cite(), "adr/ADR-002.md:10");
        }
    }

    #[test]
    fn two_adrs_that_disagree_are_reported_at_the_later_one() {
        let mut diags = Diagnostics::default();
        merge(&[&adr_layer(1, 2, &[]), &adr_layer(2, 4, &[])], &mut diags);
        assert_eq!(diags.len(), 1);
        assert_eq!(diags.0[0].location, Location::new("adr/ADR-002.md", 10, 1));
        assert_eq!(diags.0[0].message, "ADR-002 sets `cores: 4` but ADR-001 sets it to 2");
    }

    #[test]
    fn a_file_may_differ_from_an_adr_only_for_the_keys_of_its_deviation() {
        let deviation = Deviation {
            adr: "ADR-001".into(),
            keys: vec!["cores".into()],
            reason: "a big node".into(),
        };
        let adr = Layer {
            leaves: vec![
                leaf("cores", 2.into(), "adr/ADR-001.md", 10),
                leaf("memory", "4GiB".into(), "adr/ADR-001.md", 11),
            ],
            ..adr_layer(1, 2, &[])
        };
        let node = Layer::new(
            Source::Node,
            vec![
                leaf("cores", 8.into(), "nodes/a.yaml", 5),
                leaf("memory", "8GiB".into(), "nodes/a.yaml", 6),
            ],
            Scope::default(),
            vec![(deviation, Location::new("nodes/a.yaml", 8, 9))],
        );
        let mut diags = Diagnostics::default();
        let merged = merge(&[&adr, &node], &mut diags);
        assert_eq!(merged["cores"].value, 8);
        assert_eq!(diags.len(), 1);
        assert_eq!(diags.0[0].location, Location::new("nodes/a.yaml", 6, 1));
        assert!(
            diags.0[0]
                .message
                .starts_with("`memory: \"8GiB\"` contradicts accepted ADR-001")
        );
    }
}
