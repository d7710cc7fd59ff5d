//! Loading: parse every file, type-check it, resolve ADRs and layers into the desired state.
//! Pure: works on a `RepoFiles` snapshot; every problem becomes a `Diagnostic` with file:line:col.

use super::adr::{self, Adr};
use super::desired::*;
use super::diag::{Diagnostic, Diagnostics, Location, did_you_mean};
use super::files::{RepoFiles, node_stem};
use super::schema::*;
use super::validate;
use super::yaml::{self, Seg, YNode};
use serde::de::DeserializeOwned;
use serde_json::Value as Json;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Treat these proposed ADRs (by number) as accepted: "what would accepting them change".
    pub assume_accepted: Vec<u32>,
}

/// A parsed YAML file or block and the file it belongs to.
pub(crate) struct Doc {
    pub file: String,
    pub root: YNode,
}

impl Doc {
    pub fn loc(&self, path: &[Seg]) -> Location {
        let p = self.root.pos_at(path);
        Location::new(&self.file, p.line, p.col)
    }

    pub fn value_loc(&self, path: &[Seg]) -> Location {
        let p = self.root.value_pos_at(path);
        Location::new(&self.file, p.line, p.col)
    }
}

fn keys(path: &[&str]) -> Vec<Seg> {
    path.iter().map(|k| Seg::Key(k.to_string())).collect()
}

fn parse_doc(file: &str, bytes: &[u8], line_offset: u32, diags: &mut Diagnostics) -> Option<Doc> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            diags.push(Diagnostic::new(
                Location::file_start(file),
                format!("not UTF-8 text: {e}"),
            ));
            return None;
        }
    };
    match yaml::parse(text, line_offset) {
        Ok(root) => Some(Doc {
            file: file.to_string(),
            root,
        }),
        Err(e) => {
            diags.push(Diagnostic::new(Location::new(file, e.pos.line, e.pos.col), e.message));
            None
        }
    }
}

/// Human words for serde's type names.
fn humanize(msg: &str) -> String {
    let mut m = msg.to_string();
    // A whole number out of range (`vlan: 70000`, `vmid: -1`) is still a whole number: say the range.
    if m.starts_with("invalid value: integer") {
        for (from, to) in [
            ("expected u16", "expected a whole number from 0 to 65535"),
            ("expected u32", "expected a whole number from 0 to 4294967295"),
            ("expected u64", "expected a whole number from 0 up"),
        ] {
            m = m.replace(from, to);
        }
    }
    for (from, to) in [
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected a mapping"),
        ("invalid type: map", "invalid type: mapping"),
        ("invalid type: sequence", "invalid type: list"),
    ] {
        m = m.replace(from, to);
    }
    m
}

fn backticked(msg: &str) -> Vec<&str> {
    msg.split('`').skip(1).step_by(2).collect()
}

/// Deserialize `json` (found at `base` inside `doc`) into `T`, turning serde's complaint
/// into a diagnostic at the exact key. `extra` adds names to "did you mean" candidates.
pub(crate) fn typed<T: DeserializeOwned>(json: Json, doc: &Doc, base: &[Seg], extra: &[&str]) -> Result<T, Diagnostic> {
    serde_path_to_error::deserialize::<_, T>(json).map_err(|e| {
        let mut path: Vec<Seg> = base.to_vec();
        for seg in e.path().iter() {
            match seg {
                serde_path_to_error::Segment::Map { key } => path.push(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => path.push(Seg::Index(*index)),
                _ => {}
            }
        }
        let msg = e.into_inner().to_string();
        let mut shown = display_path(&path);
        if let Some(rest) = msg.strip_prefix("unknown field ") {
            let words = backticked(rest);
            let field = words.first().copied().unwrap_or("");
            // serde_path_to_error's path ends with the unknown key itself: say where it is.
            if path.len() > base.len() && path.last() == Some(&Seg::Key(field.to_string())) {
                path.pop();
                shown = display_path(&path);
            }
            let mut candidates: Vec<&str> = words.iter().skip(1).copied().collect();
            candidates.extend_from_slice(extra);
            path.push(Seg::Key(field.to_string()));
            let place = if shown.is_empty() {
                String::new()
            } else {
                format!(" in `{shown}`")
            };
            Diagnostic::new(doc.loc(&path), format!("unknown key `{field}`{place}")).maybe_hint(
                did_you_mean(field, candidates).or_else(|| {
                    let known: Vec<&str> = words.iter().skip(1).copied().collect();
                    (!known.is_empty()).then(|| format!("known keys here: {}", known.join(", ")))
                }),
            )
        } else if let Some(rest) = msg.strip_prefix("missing field ") {
            let field = backticked(rest).first().copied().unwrap_or("").to_string();
            let loc = if path.len() == base.len() && base.is_empty() {
                Location::file_start(&doc.file)
            } else {
                doc.loc(&path)
            };
            let place = if shown.is_empty() {
                String::new()
            } else {
                format!(" under `{shown}`")
            };
            Diagnostic::new(loc, format!("missing required key `{field}`{place}"))
        } else if let Some(rest) = msg.strip_prefix("unknown variant ") {
            let words = backticked(rest);
            let got = words.first().copied().unwrap_or("");
            Diagnostic::new(doc.value_loc(&path), format!("`{shown}`: unknown value `{got}`")).maybe_hint(
                did_you_mean(got, words.iter().skip(1).copied()).or_else(|| {
                    Some(format!(
                        "one of: {}",
                        words.iter().skip(1).copied().collect::<Vec<_>>().join(", ")
                    ))
                }),
            )
        } else if msg.starts_with("data did not match any variant") {
            Diagnostic::new(doc.value_loc(&path), format!("`{shown}`: wrong type of value"))
        } else {
            Diagnostic::new(doc.value_loc(&path), format!("`{shown}`: {}", humanize(&msg)))
        }
    })
}

fn display_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Split a mapping into the keys named in `take` and the rest.
fn split(json: &Json, take: &[&str]) -> (Json, Json) {
    let mut taken = serde_json::Map::new();
    let mut rest = serde_json::Map::new();
    if let Json::Object(m) = json {
        for (k, v) in m {
            if take.contains(&k.as_str()) {
                taken.insert(k.clone(), v.clone());
            } else {
                rest.insert(k.clone(), v.clone());
            }
        }
    }
    (Json::Object(taken), Json::Object(rest))
}

/// A leaf of a settings tree: its key path, canonical value, where it was written.
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    pub path: Vec<String>,
    pub value: Json,
    pub location: Location,
    pub items: Vec<Location>,
}

fn is_secret_ref(v: &Json) -> bool {
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
fn settings_leaves(json: Json, doc: &Doc, base: &[Seg], extra: &[&str], diags: &mut Diagnostics) -> Vec<Leaf> {
    match typed::<NodeSettings>(json, doc, base, extra) {
        Ok(s) => leaves(&serde_json::to_value(&s).expect("settings serialise"), doc, base),
        Err(d) => {
            diags.push(d);
            Vec::new()
        }
    }
}

// ---------------------------------------------------------------- layers

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
    fn sets_kind(&self) -> bool {
        self.leaves.iter().any(|l| l.path == ["kind"])
    }
}

fn builtin_layer(kind: GuestKind) -> Layer {
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
    Layer {
        source: Source::Builtin,
        leaves: out,
        scope: Scope::default(),
        adr: None,
        supersedes: Vec::new(),
        deviations: Vec::new(),
    }
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
    let mut merged: BTreeMap<Vec<String>, Setting> = BTreeMap::new();
    for layer in layers {
        for leaf in &layer.leaves {
            let key = display_key(&leaf.path);
            let set = SetBy {
                source: layer.source.clone(),
                location: leaf.location.clone(),
                value: leaf.value.clone(),
                items: leaf.items.clone(),
            };
            let entry = merged.entry(leaf.path.clone()).or_insert_with(|| Setting {
                value: Json::Null,
                chain: Vec::new(),
            });
            let mut insert_at = entry.chain.len();
            match &layer.source {
                Source::Adr(id) => {
                    let this = layer.adr.expect("ADR layers carry their number");
                    if let Some((i, prev)) = entry
                        .chain
                        .iter()
                        .enumerate()
                        .rev()
                        .find(|(_, s)| matches!(s.source, Source::Adr(_)))
                        && prev.value != leaf.value
                    {
                        let prev_layer = layers.iter().find(|l| l.source == prev.source);
                        let prev_num = prev_layer.and_then(|l| l.adr).unwrap_or(0);
                        let prev_supersedes = prev_layer.is_some_and(|l| l.supersedes.contains(&this));
                        if layer.supersedes.contains(&prev_num) {
                            // this ADR replaces the earlier one for this key: it wins
                        } else if prev_supersedes {
                            insert_at = i;
                        } else {
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
                                    .related(prev.location.clone(), format!("{} sets `{key}` here", adr::adr_id(prev_num)))
                                    .hint(format!(
                                        "two accepted ADRs may not disagree: mark one `Superseded by`, or write `Supersedes {}` in {id}",
                                        adr::adr_id(prev_num)
                                    )),
                                );
                        }
                    }
                }
                Source::Builtin => {}
                _ => {
                    for prev in entry.chain.iter() {
                        let Source::Adr(adr_name) = &prev.source else { continue };
                        let num = adr::parse_adr_ref(adr_name).unwrap_or(0);
                        if prev.value != leaf.value && !deviated(&layer.deviations, num, &key) {
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
            }
            entry.chain.insert(insert_at, set);
            entry.value = entry.chain.last().expect("just pushed").value.clone();
        }
    }
    merged.into_iter().map(|(k, v)| (display_key(&k), v)).collect()
}

pub(crate) fn show(v: &Json) -> String {
    match v {
        Json::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn unflatten(p: &Provenance, paths: &BTreeMap<String, Vec<String>>) -> Json {
    let mut root = Json::Object(serde_json::Map::new());
    for (k, s) in p {
        if let Some(path) = paths.get(k) {
            set_path(&mut root, path, s.value.clone());
        }
    }
    root
}

// ---------------------------------------------------------------- the loader

struct NodeInput {
    doc: Doc,
    identity: NodeIdentity,
    layer: Layer,
    /// Whether the file's settings type-checked; a node whose settings did not is not resolved
    /// (its errors are reported, and a half-read node would only add misleading ones).
    settings_ok: bool,
}

pub fn load(files: &RepoFiles, opts: &LoadOptions) -> Result<Desired, Diagnostics> {
    let mut diags = Diagnostics::default();

    // cluster.yaml
    let cluster_doc = match files.files.get("cluster.yaml") {
        Some(bytes) => parse_doc("cluster.yaml", bytes, 0, &mut diags),
        None => {
            diags.push(
                Diagnostic::new(
                    Location::file_start("cluster.yaml"),
                    "cluster.yaml not found at the repository root",
                )
                .hint("an infrastructure repository has cluster.yaml, nodes/<name>.yaml and optionally adr/*.md"),
            );
            None
        }
    };
    let cluster_file: Option<ClusterFile> = cluster_doc.as_ref().and_then(|doc| {
        typed::<ClusterFile>(doc.root.to_json(), doc, &[], &[])
            .map_err(|d| diags.push(d))
            .ok()
    });

    // cluster defaults as layers
    let mut default_layers: Vec<Layer> = Vec::new();
    if let (Some(doc), Some(cf)) = (&cluster_doc, &cluster_file) {
        let devs = deviations_with_locations(&cf.deviations, doc, &["deviations"]);
        for (name, value, scope) in [
            ("all", &cf.defaults.all, Scope::default()),
            (
                "lxc",
                &cf.defaults.lxc,
                Scope {
                    kind: Some(ScopeList::One(GuestKind::Lxc)),
                    ..Default::default()
                },
            ),
            (
                "vm",
                &cf.defaults.vm,
                Scope {
                    kind: Some(ScopeList::One(GuestKind::Vm)),
                    ..Default::default()
                },
            ),
        ] {
            let Some(value) = value else { continue };
            let base = keys(&["defaults", name]);
            let leaves = settings_leaves(value.clone(), doc, &base, &[], &mut diags);
            let layer = Layer {
                source: Source::ClusterDefaults(name.into()),
                leaves,
                scope,
                adr: None,
                supersedes: Vec::new(),
                deviations: devs.clone(),
            };
            if name != "all" && layer.sets_kind() {
                diags.push(
                    Diagnostic::new(
                        doc.loc(&keys(&["defaults", name, "kind"])),
                        format!("`defaults.{name}` cannot set `kind`"),
                    )
                    .hint("set `kind` in `defaults.all` or in each node file"),
                );
            }
            default_layers.push(layer);
        }
    }

    // ADRs
    let diags_before_adrs = diags.len();
    let mut adrs: Vec<Adr> = Vec::new();
    for (file, bytes) in files.adr_files() {
        let text = String::from_utf8_lossy(bytes);
        match adr::parse(file, &text) {
            Ok(Some(a)) => adrs.push(a),
            Ok(None) => {}
            Err(ds) => ds.into_iter().for_each(|d| diags.push(d)),
        }
    }
    adrs.sort_by_key(|a| (a.number, a.file.clone()));
    for pair in adrs.windows(2) {
        if pair[0].number == pair[1].number {
            diags.push(
                Diagnostic::new(
                    Location::file_start(&pair[1].file),
                    format!("two ADRs are numbered {}", pair[1].id()),
                )
                .related(Location::file_start(&pair[0].file), "the other one")
                .hint("give each ADR its own number"),
            );
        }
    }
    let known_adrs: BTreeSet<u32> = adrs.iter().map(|a| a.number).collect();
    let mut adr_layers: Vec<Layer> = Vec::new();
    let mut cluster_level_layers: Vec<Layer> = Vec::new();
    let mut adr_docs: Vec<Doc> = Vec::new();
    for a in &adrs {
        let applies = a.status.applies() || opts.assume_accepted.contains(&a.number);
        let Some(block) = &a.block else { continue };
        let Some(doc) = parse_doc(&a.file, block.yaml.as_bytes(), block.line_offset, &mut diags) else {
            continue;
        };
        let json = doc.root.to_json();
        if !json.is_object() {
            diags.push(Diagnostic::new(
                doc.loc(&[]),
                "the driftless block must be a YAML mapping",
            ));
            continue;
        }
        let (scope_json, rest) = split(&json, &["scope"]);
        let (cluster_json, node_json) = split(&rest, CLUSTER_LEVEL_KEYS);
        let mut candidates: Vec<&str> = CLUSTER_LEVEL_KEYS.to_vec();
        candidates.push("scope");
        let scope: Scope = match scope_json.get("scope") {
            Some(s) => typed(s.clone(), &doc, &keys(&["scope"]), &[]).unwrap_or_else(|d| {
                diags.push(d);
                Scope::default()
            }),
            None => Scope::default(),
        };
        let node_leaves = settings_leaves(node_json, &doc, &[], &candidates, &mut diags);
        let cluster_leaves = match typed::<ClusterLevel>(cluster_json, &doc, &[], &[]) {
            Ok(c) => leaves(&serde_json::to_value(&c).expect("serialise"), &doc, &[]),
            Err(d) => {
                diags.push(d);
                Vec::new()
            }
        };
        if !cluster_leaves.is_empty() && scope != Scope::default() {
            diags.push(
                Diagnostic::new(
                    cluster_leaves[0].location.clone(),
                    "a scoped ADR block cannot set cluster-wide keys",
                )
                .hint(format!(
                    "`{}` applies to the whole cluster: drop the scope or move it to another ADR",
                    cluster_leaves[0].path.join(".")
                )),
            );
        }
        if scope.kind.is_some() && node_leaves.iter().any(|l| l.path == ["kind"]) {
            diags.push(Diagnostic::new(
                doc.loc(&keys(&["kind"])),
                "an ADR scoped by kind cannot set `kind`",
            ));
        }
        adr_docs.push(doc);
        if !applies {
            continue;
        }
        adr_layers.push(Layer {
            source: Source::Adr(a.id()),
            leaves: node_leaves,
            scope: scope.clone(),
            adr: Some(a.number),
            supersedes: a.supersedes.clone(),
            deviations: Vec::new(),
        });
        cluster_level_layers.push(Layer {
            source: Source::Adr(a.id()),
            leaves: cluster_leaves,
            scope,
            adr: Some(a.number),
            supersedes: a.supersedes.clone(),
            deviations: Vec::new(),
        });
    }

    // An ADR that could not be read may be where a node's `kind` comes from.
    let adrs_incomplete = diags.len() > diags_before_adrs;

    // node files
    let mut node_inputs: Vec<NodeInput> = Vec::new();
    for (file, bytes) in files.node_files() {
        let Some(doc) = parse_doc(file, bytes, 0, &mut diags) else {
            continue;
        };
        let json = doc.root.to_json();
        if !json.is_object() {
            diags.push(Diagnostic::new(doc.loc(&[]), "a node file must be a YAML mapping"));
            continue;
        }
        let (id_json, settings_json) = split(&json, NODE_IDENTITY_KEYS);
        let identity = typed::<NodeIdentity>(id_json, &doc, &[], &[]);
        let diags_before_settings = diags.len();
        let leaves = settings_leaves(settings_json, &doc, &[], NODE_IDENTITY_KEYS, &mut diags);
        let settings_ok = diags.len() == diags_before_settings;
        match identity {
            Ok(identity) => {
                let deviations = deviations_with_locations(&identity.deviations, &doc, &["deviations"]);
                let layer = Layer {
                    source: Source::Node,
                    leaves,
                    scope: Scope::default(),
                    adr: None,
                    supersedes: Vec::new(),
                    deviations,
                };
                node_inputs.push(NodeInput {
                    doc,
                    identity,
                    layer,
                    settings_ok,
                });
            }
            Err(d) => diags.push(d),
        }
    }

    // deviations must name ADRs that exist
    let all_devs =
        default_layers
            .first()
            .map(|l| l.deviations.clone())
            .unwrap_or_else(|| match (&cluster_doc, &cluster_file) {
                (Some(doc), Some(cf)) => deviations_with_locations(&cf.deviations, doc, &["deviations"]),
                _ => Vec::new(),
            });
    let adr_ids: Vec<String> = adrs.iter().map(Adr::id).collect();
    for (d, loc) in all_devs
        .iter()
        .chain(node_inputs.iter().flat_map(|n| n.layer.deviations.iter()))
    {
        match adr::parse_adr_ref(&d.adr) {
            Some(n) if known_adrs.contains(&n) => {}
            _ => diags.push(
                Diagnostic::new(
                    loc.clone(),
                    format!("deviation names `{}`, which is not an ADR in this repository", d.adr),
                )
                .maybe_hint(did_you_mean(&d.adr, adr_ids.iter().map(String::as_str)).or_else(|| {
                    Some(format!(
                        "known ADRs: {}",
                        adrs.iter().map(Adr::id).collect::<Vec<_>>().join(", ")
                    ))
                })),
            ),
        }
        if d.reason.trim().is_empty() {
            diags.push(
                Diagnostic::new(loc.clone(), "a deviation needs a reason")
                    .hint("say why this file departs from the ADR"),
            );
        }
    }

    let (Some(cluster_doc), Some(cf)) = (cluster_doc, cluster_file) else {
        return Err(diags.finish());
    };

    // cluster-level keys: ADRs, then cluster.yaml
    let (top_json, _) = split(&cluster_doc.root.to_json(), CLUSTER_LEVEL_KEYS);
    let top_leaves = match typed::<ClusterLevel>(top_json, &cluster_doc, &[], &[]) {
        Ok(c) => leaves(&serde_json::to_value(&c).expect("serialise"), &cluster_doc, &[]),
        Err(_) => Vec::new(), // already reported by the ClusterFile check
    };
    let cluster_layer = Layer {
        source: Source::Cluster,
        leaves: top_leaves,
        scope: Scope::default(),
        adr: None,
        supersedes: Vec::new(),
        deviations: all_devs.clone(),
    };
    let mut cl_layers: Vec<&Layer> = cluster_level_layers.iter().collect();
    cl_layers.push(&cluster_layer);
    let cluster_prov = merge(&cl_layers, &mut diags);
    let cluster_level: ClusterLevel = {
        let paths: BTreeMap<String, Vec<String>> = cluster_prov.keys().map(|k| (k.clone(), vec![k.clone()])).collect();
        serde_json::from_value(unflatten(&cluster_prov, &paths)).unwrap_or_default()
    };

    // per node: resolve kind, then merge every applicable layer
    let builtin_lxc = builtin_layer(GuestKind::Lxc);
    let builtin_vm = builtin_layer(GuestKind::Vm);
    let mut nodes: Vec<Node> = Vec::new();
    for input in node_inputs.iter().filter(|n| n.settings_ok) {
        let name = input
            .identity
            .name
            .clone()
            .unwrap_or_else(|| node_stem(&input.doc.file).to_string());
        let role = input.identity.role.as_str();
        // kind: from layers that cannot depend on kind
        let kind_layers: Vec<&Layer> = adr_layers
            .iter()
            .filter(|l| l.scope.kind.is_none() && l.scope.matches(&name, None, role))
            .chain(
                default_layers
                    .iter()
                    .filter(|l| l.source == Source::ClusterDefaults("all".into())),
            )
            .chain(std::iter::once(&input.layer))
            .collect();
        let kind_leaf = kind_layers
            .iter()
            .rev()
            .find_map(|l| l.leaves.iter().find(|x| x.path == ["kind"]));
        let kind = match kind_leaf.map(|l| serde_json::from_value::<GuestKind>(l.value.clone())) {
            Some(Ok(k)) => k,
            _ if adrs_incomplete => continue,
            _ => {
                diags.push(
                    Diagnostic::new(
                        Location::file_start(&input.doc.file),
                        format!("node `{name}` has no `kind`"),
                    )
                    .hint("add `kind: lxc` or `kind: vm` to the node file or to cluster.yaml `defaults.all`"),
                );
                continue;
            }
        };
        let builtin = if kind == GuestKind::Lxc {
            &builtin_lxc
        } else {
            &builtin_vm
        };
        let mut layers: Vec<&Layer> = vec![builtin];
        let mut applicable_adrs: Vec<&Layer> = adr_layers
            .iter()
            .filter(|l| l.scope.matches(&name, Some(kind), role))
            .collect();
        applicable_adrs.sort_by_key(|l| l.adr);
        layers.extend(applicable_adrs);
        layers.extend(
            default_layers
                .iter()
                .filter(|l| l.scope.matches(&name, Some(kind), role)),
        );
        layers.push(&input.layer);
        let mut prov = merge(&layers, &mut diags);
        let paths: BTreeMap<String, Vec<String>> = layers
            .iter()
            .flat_map(|l| l.leaves.iter())
            .map(|l| (display_key(&l.path), l.path.clone()))
            .collect();
        let settings: NodeSettings = match serde_json::from_value(unflatten(&prov, &paths)) {
            Ok(s) => s,
            Err(e) => {
                diags.push(Diagnostic::new(
                    Location::file_start(&input.doc.file),
                    format!("cannot combine settings: {e}"),
                ));
                continue;
            }
        };
        let id = &input.identity;
        let doc = &input.doc;
        let node_set = |key: &str, value: Json| {
            (
                key.to_string(),
                Setting {
                    value: value.clone(),
                    chain: vec![SetBy {
                        source: Source::Node,
                        location: doc.loc(&keys(&[key])),
                        value,
                        items: Vec::new(),
                    }],
                },
            )
        };
        prov.extend([
            node_set("vmid", id.vmid.into()),
            node_set("proxmox_node", id.proxmox_node.clone().into()),
            node_set("role", id.role.clone().into()),
            node_set("address", id.address.clone().into()),
        ]);
        if id.name.is_some() {
            prov.insert("name".into(), node_set("name", name.clone().into()).1);
        }
        let address = match id.address.parse::<ipnet::IpNet>() {
            Ok(a) => a,
            Err(_) => {
                let hint = if id.address.parse::<std::net::IpAddr>().is_ok() {
                    format!(
                        "add the prefix length: `{}/{}`",
                        id.address,
                        cf.network.cidr.split('/').nth(1).unwrap_or("24")
                    )
                } else {
                    "write an address with its prefix length, such as 192.168.2.20/24".into()
                };
                diags.push(
                    Diagnostic::new(
                        doc.value_loc(&keys(&["address"])),
                        format!("`address`: `{}` is not an IP address with a prefix", id.address),
                    )
                    .hint(hint),
                );
                continue;
            }
        };
        nodes.push(Node {
            name,
            file: doc.file.clone(),
            vmid: id.vmid,
            proxmox_node: id.proxmox_node.clone(),
            kind,
            role: id.role.clone(),
            address,
            adopt: id.adopt,
            settings,
            provenance: prov,
        });
    }

    // secrets named anywhere must be declared in cluster.yaml
    let declared: Vec<&str> = cf.secrets.keys().map(String::as_str).collect();
    for doc in std::iter::once(&cluster_doc)
        .chain(node_inputs.iter().map(|n| &n.doc))
        .chain(&adr_docs)
    {
        check_secrets(doc, &declared, &mut diags);
    }

    let templates = files
        .template_files()
        .map(|(path, bytes)| {
            let name = path.trim_start_matches("templates/").to_string();
            (
                name,
                UserTemplate {
                    file: path.to_string(),
                    source: String::from_utf8_lossy(bytes).into_owned(),
                },
            )
        })
        .collect();

    let adr_summaries = adrs
        .iter()
        .map(|a| AdrSummary {
            id: a.id(),
            file: a.file.clone(),
            title: a.title.clone(),
            status: a.status.label(),
            applies: a.status.applies() || opts.assume_accepted.contains(&a.number),
            has_config: a.block.is_some(),
        })
        .collect();

    let cluster = validate::cluster(&cf, &cluster_doc, cluster_level, cluster_prov, &mut diags);
    let Some(cluster) = cluster else {
        return Err(diags.finish());
    };
    // Only a repository whose every node file was read can be said to lack a control plane node.
    let all_nodes_loaded = nodes.len() == files.node_files().count();
    validate::nodes(&cluster, &mut nodes, all_nodes_loaded, &mut diags);
    if !diags.is_empty() {
        return Err(diags.finish());
    }
    let cp = cluster.distribution;
    nodes.sort_by(|a, b| (!cp.is_control_plane(&a.role), &a.name).cmp(&(!cp.is_control_plane(&b.role), &b.name)));
    Ok(Desired {
        cluster,
        nodes,
        adrs: adr_summaries,
        templates,
    })
}

fn deviations_with_locations(devs: &[Deviation], doc: &Doc, base: &[&str]) -> Vec<(Deviation, Location)> {
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

fn check_secrets(doc: &Doc, declared: &[&str], diags: &mut Diagnostics) {
    fn walk(v: &Json, path: &mut Vec<Seg>, doc: &Doc, declared: &[&str], diags: &mut Diagnostics) {
        match v {
            Json::Object(m) if is_secret_ref(v) => {
                if let Some(Json::String(name)) = m.get("secret")
                    && !declared.contains(&name.as_str())
                {
                    path.push(Seg::Key("secret".into()));
                    diags.push(
                        Diagnostic::new(doc.value_loc(path), format!("unknown secret `{name}`")).maybe_hint(
                            did_you_mean(name, declared.iter().copied()).or_else(|| {
                                Some(format!(
                                    "declare it in cluster.yaml: `secrets: {{{name}: \"what it is\"}}`"
                                ))
                            }),
                        ),
                    );
                    path.pop();
                }
            }
            Json::Object(m) => {
                for (k, c) in m {
                    path.push(Seg::Key(k.clone()));
                    walk(c, path, doc, declared, diags);
                    path.pop();
                }
            }
            Json::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    path.push(Seg::Index(i));
                    walk(c, path, doc, declared, diags);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    walk(&doc.root.to_json(), &mut Vec::new(), doc, declared, diags);
}
