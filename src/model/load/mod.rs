//! Loading: parse every file, type-check it, resolve ADRs and layers into the desired state.
//! Pure: works on a `RepoFiles` snapshot; every problem becomes a `Diagnostic` with file:line:col.
//!
//! `load` runs in phases, each a method of `Loader`: cluster.yaml, its defaults, the ADRs, the
//! node files, the deviations they record, the merges that resolve the cluster and every node,
//! the secrets they name, and last the cross-file rules of `validate`. A phase runs whatever the
//! phases before it found, so one run reports as many mistakes as it can; only a cluster.yaml that
//! cannot be read stops the phases that need it, and a cluster that breaks its rules stops the
//! node rules. Before all of them, a file over the size limits (`limits`) stops everything: what a
//! repository may cost is decided before any of it is parsed.

mod adrs;
mod cluster;
mod deviations;
mod doc;
mod layers;
pub mod limits;
mod nodes;
mod secrets;

pub(crate) use doc::Doc;
pub use layers::builtin_location;

use super::adr::Adr;
use super::desired::*;
use super::diag::{Diagnostic, Diagnostics};
use super::files::RepoFiles;
use super::schema::ClusterLevel;
use super::validate;
use cluster::ClusterInput;

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Treat these proposed ADRs (by number) as accepted: "what would accepting them change".
    pub assume_accepted: Vec<u32>,
}

pub fn load(files: &RepoFiles, opts: &LoadOptions) -> Result<Desired, Diagnostics> {
    let mut loader = Loader {
        files,
        opts,
        diags: Diagnostics::default(),
        warnings: Vec::new(),
    };
    if loader.check_sizes() {
        return Err(loader.diags.finish());
    }
    let cluster = loader.cluster_file();
    let defaults = match &cluster {
        Some(c) => loader.cluster_defaults(c),
        None => Vec::new(),
    };
    let adrs = loader.adrs();
    let node_inputs = loader.node_inputs();
    loader.check_deviations(cluster.as_ref(), &adrs.list, &node_inputs);
    // Resolving the cluster and its nodes needs cluster.yaml; without it, report what was found.
    let Some(cluster) = cluster else {
        return Err(loader.diags.finish());
    };
    let (level, level_provenance) = loader.cluster_level(&cluster, &adrs);
    let nodes = loader.resolve_nodes(&cluster, &adrs, &defaults, &node_inputs);
    loader.check_secrets(&cluster, &node_inputs, &adrs.docs);
    loader.finish(&cluster, level, level_provenance, nodes, &adrs.list)
}

/// One load in progress: what is read, and every problem found so far. The phases are its
/// methods (in the submodules); each takes earlier phases' results and returns its own.
struct Loader<'a> {
    files: &'a RepoFiles,
    opts: &'a LoadOptions,
    diags: Diagnostics,
    /// What loads but is left out, said as warnings (an ADR whose status is unknown).
    warnings: Vec<Diagnostic>,
}

impl Loader<'_> {
    /// Whether an ADR's block is layered: it is accepted, or the caller asks "what if it were".
    fn applies(&self, a: &Adr) -> bool {
        a.status.applies() || self.opts.assume_accepted.contains(&a.number)
    }

    /// The cross-file rules; the desired state only when nothing at all was found wrong.
    fn finish(
        mut self,
        input: &ClusterInput,
        level: ClusterLevel,
        level_provenance: Provenance,
        mut nodes: Vec<Node>,
        adrs: &[Adr],
    ) -> Result<Desired, Diagnostics> {
        let cluster = validate::cluster(&input.file, &input.doc, level, level_provenance, &mut self.diags);
        let Some(cluster) = cluster else {
            return Err(self.diags.finish());
        };
        // Only a repository whose every node file was read can be said to lack a control plane node.
        let all_nodes_loaded = nodes.len() == self.files.node_files().count();
        validate::nodes(&cluster, &mut nodes, all_nodes_loaded, &mut self.diags);
        if !self.diags.is_empty() {
            return Err(self.diags.finish());
        }
        let mut cluster = cluster;
        self.addon_files(&mut cluster);
        if !self.diags.is_empty() {
            return Err(self.diags.finish());
        }
        let cp = cluster.distribution;
        nodes.sort_by(|a, b| (!cp.is_control_plane(&a.role), &a.name).cmp(&(!cp.is_control_plane(&b.role), &b.name)));
        Ok(Desired {
            cluster,
            nodes,
            adrs: self.adr_summaries(adrs),
            templates: self.templates(),
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    /// Give each declared add-on its files; a declared add-on without any is a mistake. A
    /// directory nothing declares is not applied (a proposed ADR may bring one).
    fn addon_files(&mut self, cluster: &mut Cluster) {
        use crate::model::diag::Diagnostic;
        use crate::model::files::addon_of;
        for addon in &mut cluster.addons {
            addon.files = self
                .files
                .addon_files()
                .filter(|(p, _)| addon_of(p) == Some(addon.name.as_str()))
                .map(|(p, b)| UserTemplate {
                    file: p.to_string(),
                    source: String::from_utf8_lossy(b).into_owned(),
                })
                .collect();
            if addon.files.is_empty() {
                self.diags.push(
                    Diagnostic::new(
                        addon.location.clone(),
                        format!("add-on `{}` has no manifests in addons/{}/", addon.name, addon.name),
                    )
                    .hint("put its Kubernetes objects in addons/NAME/*.yaml (or *.yaml.j2 templates)"),
                );
            }
        }
    }

    fn adr_summaries(&self, adrs: &[Adr]) -> Vec<AdrSummary> {
        adrs.iter()
            .map(|a| AdrSummary {
                id: a.id(),
                file: a.file.clone(),
                title: a.title.clone(),
                status: a.status.label(),
                applies: self.applies(a),
                has_config: a.block.is_some(),
            })
            .collect()
    }

    fn templates(&self) -> std::collections::BTreeMap<String, UserTemplate> {
        self.files
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
            .collect()
    }
}

#[cfg(test)]
mod test_support {
    use super::*;

    /// A repository of the given files.
    pub(super) fn repo(files: &[(&str, &str)]) -> RepoFiles {
        let mut repo = RepoFiles::new("test");
        for (path, text) in files {
            repo.insert(*path, text.as_bytes());
        }
        repo
    }

    pub(super) fn loader<'a>(files: &'a RepoFiles, opts: &'a LoadOptions) -> Loader<'a> {
        Loader {
            files,
            opts,
            diags: Diagnostics::default(),
            warnings: Vec::new(),
        }
    }

    /// `file:line:col: message` of each diagnostic, in the order pushed.
    pub(super) fn said(diags: &Diagnostics) -> Vec<String> {
        diags
            .0
            .iter()
            .map(|d| format!("{}: {}", d.location, d.message))
            .collect()
    }
}
