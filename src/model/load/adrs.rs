//! The ADR phase: read every ADR, check its driftless block, and layer the blocks that apply.

use super::Loader;
use super::doc::{Doc, keys, parse_doc, split, typed};
use super::layers::{Layer, Leaf, leaves, settings_leaves};
use crate::model::adr::{self, Adr};
use crate::model::diag::{Diagnostic, Location};
use crate::model::schema::*;
use serde_json::Value as Json;

/// What the ADR phase found.
#[derive(Default)]
pub(super) struct Adrs {
    /// Every ADR, by number (then file).
    pub list: Vec<Adr>,
    /// The applying ADRs' node settings, and their cluster-wide keys, as layers.
    pub node_layers: Vec<Layer>,
    pub cluster_layers: Vec<Layer>,
    /// Every block that is a mapping, applying or not: the secrets check reads them all.
    pub docs: Vec<Doc>,
    /// Whether any ADR could not be read: it may be where a node's `kind` comes from.
    pub incomplete: bool,
}

/// One ADR's block, checked.
struct Block {
    doc: Doc,
    scope: Scope,
    node_leaves: Vec<Leaf>,
    cluster_leaves: Vec<Leaf>,
}

impl Loader<'_> {
    pub(super) fn adrs(&mut self) -> Adrs {
        let before = self.diags.len();
        let list = self.read_adrs();
        self.unique_adr_numbers(&list);
        let mut adrs = Adrs::default();
        for a in &list {
            let Some(block) = self.adr_block(a) else { continue };
            adrs.docs.push(block.doc);
            if self.applies(a) {
                adrs.node_layers
                    .push(Layer::adr(a, block.node_leaves, block.scope.clone()));
                adrs.cluster_layers
                    .push(Layer::adr(a, block.cluster_leaves, block.scope));
            }
        }
        adrs.list = list;
        adrs.incomplete = self.diags.len() > before;
        adrs
    }

    /// Every ADR file, parsed, sorted by number (then file).
    fn read_adrs(&mut self) -> Vec<Adr> {
        let mut adrs: Vec<Adr> = Vec::new();
        for (file, bytes) in self.files.adr_files() {
            let text = String::from_utf8_lossy(bytes);
            match adr::parse(file, &text, &mut self.warnings) {
                Ok(Some(a)) => adrs.push(a),
                Ok(None) => {}
                Err(ds) => ds.into_iter().for_each(|d| self.diags.push(d)),
            }
        }
        adrs.sort_by_key(|a| (a.number, a.file.clone()));
        adrs
    }

    /// No two ADRs share a number (`adrs` is sorted, so a repeat is the next one).
    fn unique_adr_numbers(&mut self, adrs: &[Adr]) {
        for pair in adrs.windows(2) {
            if pair[0].number == pair[1].number {
                self.diags.push(
                    Diagnostic::new(
                        Location::file_start(&pair[1].file),
                        format!("two ADRs are numbered {}", pair[1].id()),
                    )
                    .related(Location::file_start(&pair[0].file), "the other one")
                    .hint("give each ADR its own number"),
                );
            }
        }
    }

    /// An ADR's driftless block, parsed and split into scope, node settings and cluster-wide keys.
    /// Checked whether or not the ADR applies: a proposed ADR's mistakes are found before it is accepted.
    fn adr_block(&mut self, a: &Adr) -> Option<Block> {
        let block = a.block.as_ref()?;
        let doc = parse_doc(&a.file, block.yaml.as_bytes(), block.line_offset, &mut self.diags)?;
        let json = doc.root.to_json();
        if !json.is_object() {
            self.diags.push(Diagnostic::new(
                doc.loc(&[]),
                "the driftless block must be a YAML mapping",
            ));
            return None;
        }
        let (scope_json, rest) = split(&json, &["scope"]);
        let (cluster_json, node_json) = split(&rest, CLUSTER_LEVEL_KEYS);
        let scope = self.adr_scope(&scope_json, &doc);
        // An unknown key may be a misspelt cluster-wide key or `scope`: suggest those too.
        let mut candidates: Vec<&str> = CLUSTER_LEVEL_KEYS.to_vec();
        candidates.push("scope");
        let node_leaves = settings_leaves(node_json, &doc, &[], &candidates, &mut self.diags);
        let cluster_leaves = match typed::<ClusterLevel>(cluster_json, &doc, &[], &[]) {
            Ok(c) => leaves(&serde_json::to_value(&c).expect("serialise"), &doc, &[]),
            Err(d) => {
                self.diags.push(d);
                Vec::new()
            }
        };
        self.scoped_block_sets_no_cluster_keys(&scope, &cluster_leaves);
        self.kind_scoped_block_sets_no_kind(&scope, &node_leaves, &doc);
        Some(Block {
            doc,
            scope,
            node_leaves,
            cluster_leaves,
        })
    }

    /// A block's `scope:`; everything when it has none (or when it is wrong, which is reported).
    fn adr_scope(&mut self, scope_json: &Json, doc: &Doc) -> Scope {
        match scope_json.get("scope") {
            Some(s) => typed(s.clone(), doc, &keys(&["scope"]), &[]).unwrap_or_else(|d| {
                self.diags.push(d);
                Scope::default()
            }),
            None => Scope::default(),
        }
    }

    /// A scoped block sets no cluster-wide keys: they cannot apply to only some nodes.
    fn scoped_block_sets_no_cluster_keys(&mut self, scope: &Scope, cluster_leaves: &[Leaf]) {
        if !cluster_leaves.is_empty() && *scope != Scope::default() {
            self.diags.push(
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
    }

    /// A block scoped by kind sets no `kind`: whether it applies depends on the kind.
    fn kind_scoped_block_sets_no_kind(&mut self, scope: &Scope, node_leaves: &[Leaf], doc: &Doc) {
        if scope.kind.is_some() && node_leaves.iter().any(|l| l.path == ["kind"]) {
            self.diags.push(Diagnostic::new(
                doc.loc(&keys(&["kind"])),
                "an ADR scoped by kind cannot set `kind`",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{loader, repo, said};
    use crate::model::LoadOptions;

    fn adr(number: u32, status: &str, block: &str) -> String {
        format!("# ADR-{number:03}: T\n\n**Status:** {status}\n\n```yaml driftless\n{block}```\n")
    }

    #[test]
    fn a_repeated_adr_number_is_reported_on_the_later_file() {
        let files = repo(&[
            ("adr/ADR-001-a.md", &adr(1, "Accepted", "cores: 2\n")),
            ("adr/ADR-001-b.md", &adr(1, "Accepted", "cores: 2\n")),
        ]);
        let opts = LoadOptions::default();
        let mut l = loader(&files, &opts);
        l.adrs();
        assert_eq!(said(&l.diags), ["adr/ADR-001-b.md:1:1: two ADRs are numbered ADR-001"]);
        assert_eq!(l.diags.0[0].related[0].location.file, "adr/ADR-001-a.md");
    }

    #[test]
    fn a_proposed_adr_is_checked_and_layered_only_when_assumed_accepted() {
        let files = repo(&[("adr/ADR-002-p.md", &adr(2, "Proposed", "cores: 2\ncors: 1\n"))]);
        let opts = LoadOptions::default();
        let mut l = loader(&files, &opts);
        let adrs = l.adrs();
        assert_eq!(said(&l.diags), ["adr/ADR-002-p.md:7:1: unknown key `cors`"]);
        assert_eq!((adrs.docs.len(), adrs.node_layers.len()), (1, 0));
        // its own mistake may hide a `kind`: the phase says it is incomplete
        assert!(adrs.incomplete);

        let files = repo(&[("adr/ADR-002-p.md", &adr(2, "Proposed", "cores: 2\n"))]);
        let opts = LoadOptions {
            assume_accepted: vec![2],
        };
        let mut l = loader(&files, &opts);
        let adrs = l.adrs();
        assert!(l.diags.is_empty());
        assert_eq!((adrs.node_layers.len(), adrs.cluster_layers.len()), (1, 1));
        assert!(!adrs.incomplete);
    }
}
