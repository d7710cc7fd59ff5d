//! The files of an infrastructure repository, as read from a directory or a git tree.
//! Loading works on this in-memory snapshot only, so it does no I/O of its own.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoFiles {
    /// Repository-relative path (with `/`) -> contents.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Where the files came from, for messages: a directory, or a URL and commit.
    pub origin: String,
    /// Files a source did not read because of the size limits (`crate::model::load::limits`):
    /// path -> size in bytes. Loading reports them.
    pub oversized: BTreeMap<String, u64>,
    /// Symbolic links where a file driftless reads would be: never followed (from a directory
    /// a link could reach /etc/shadow or /dev/zero), and loading reports them.
    pub links: std::collections::BTreeSet<String>,
}

impl RepoFiles {
    pub fn new(origin: impl Into<String>) -> Self {
        RepoFiles {
            files: BTreeMap::new(),
            origin: origin.into(),
            oversized: BTreeMap::new(),
            links: Default::default(),
        }
    }

    pub fn insert(&mut self, path: impl Into<String>, contents: impl Into<Vec<u8>>) {
        self.files.insert(path.into(), contents.into());
    }

    /// Whether driftless reads this path at all; sources skip everything else.
    pub fn is_relevant(path: &str) -> bool {
        path == "cluster.yaml"
            || is_node_file(path)
            || super::adr::is_adr_path(path)
            || (path.starts_with("templates/") && path.ends_with(".j2"))
            || is_addon_file(path)
    }

    /// `addons/<name>/*.yaml` (`.yml`, `.yaml.j2`), by path.
    pub fn addon_files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files
            .iter()
            .filter(|(p, _)| is_addon_file(p))
            .map(|(p, c)| (p.as_str(), c.as_slice()))
    }

    pub fn node_files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files
            .iter()
            .filter(|(p, _)| is_node_file(p))
            .map(|(p, c)| (p.as_str(), c.as_slice()))
    }

    pub fn adr_files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files
            .iter()
            .filter(|(p, _)| super::adr::is_adr_path(p))
            .map(|(p, c)| (p.as_str(), c.as_slice()))
    }

    pub fn template_files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files
            .iter()
            .filter(|(p, _)| p.starts_with("templates/") && p.ends_with(".j2"))
            .map(|(p, c)| (p.as_str(), c.as_slice()))
    }
}

/// `nodes/<name>.yaml` (or `.yml`), directly under nodes/.
pub fn is_node_file(path: &str) -> bool {
    path.strip_prefix("nodes/")
        .is_some_and(|rest| !rest.contains('/') && (rest.ends_with(".yaml") || rest.ends_with(".yml")))
}

/// An add-on's manifest: `addons/<name>/<file>.yaml` (or `.yml`, or a `.yaml.j2` template).
pub fn is_addon_file(path: &str) -> bool {
    path.strip_prefix("addons/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(dir, file)| {
            !dir.is_empty()
                && !file.contains('/')
                && [".yaml", ".yml", ".yaml.j2", ".yml.j2"]
                    .iter()
                    .any(|e| file.ends_with(e))
        })
}

/// The add-on a manifest belongs to: `addons/metallb/pool.yaml.j2` -> `metallb`.
pub fn addon_of(path: &str) -> Option<&str> {
    path.strip_prefix("addons/")?.split_once('/').map(|(d, _)| d)
}

/// The node name a file implies: `nodes/k3s-master.yaml` -> `k3s-master`.
pub fn node_stem(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.strip_suffix(".yaml")
        .or_else(|| base.strip_suffix(".yml"))
        .unwrap_or(base)
}
