//! The secrets phase: every `{secret: NAME}` names a secret cluster.yaml declares.

use super::Loader;
use super::cluster::ClusterInput;
use super::doc::Doc;
use super::layers::is_secret_ref;
use super::nodes::NodeInput;
use crate::model::diag::{Diagnostic, Diagnostics, did_you_mean};
use crate::model::yaml::Seg;
use serde_json::Value as Json;

impl Loader<'_> {
    /// Secrets named in cluster.yaml, any node file, or any ADR block (applying or not).
    pub(super) fn check_secrets(&mut self, cluster: &ClusterInput, nodes: &[NodeInput], adr_docs: &[Doc]) {
        let declared: Vec<&str> = cluster.file.secrets.keys().map(String::as_str).collect();
        for doc in std::iter::once(&cluster.doc)
            .chain(nodes.iter().map(|n| &n.doc))
            .chain(adr_docs)
        {
            secrets_declared(doc, &declared, &mut self.diags);
        }
    }
}

/// Every secret reference in `doc` names one of `declared`.
fn secrets_declared(doc: &Doc, declared: &[&str], diags: &mut Diagnostics) {
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
