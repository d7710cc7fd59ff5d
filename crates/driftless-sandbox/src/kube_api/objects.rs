//! The object store: every object but nodes (which live in `cluster_state`'s node files), one
//! JSON file each under `STATE/.sandbox/k8s/objects/<group>/<plural>/<namespace>/<name>.json`
//! (`core` for the core group, `_` for cluster-scoped objects), written atomically and re-read
//! on every request, so another process sees what the API server stored. `objects/.rv` holds
//! the last resourceVersion handed out: one counter for every object, as etcd's revision.
//!
//! Only the API server writes here (one process, like one etcd); it serialises its writes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster_state;
use crate::store::atomic_write;

/// What the store keeps of an object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// When its spec (anything but metadata and status) last changed, in Unix milliseconds:
    /// what the simulated controllers time their work from.
    pub changed_ms: u64,
    pub object: Value,
}

#[derive(Debug, Clone)]
pub struct Objects {
    root: PathBuf,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A name the store can keep as a file name: what kube-apiserver accepts as a path segment.
pub fn storable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains(['/', '%', '\0'])
}

impl Objects {
    pub fn new(state_dir: &Path) -> Objects {
        Objects {
            root: cluster_state::dir(state_dir).join("objects"),
        }
    }

    fn kind_dir(&self, group: &str, plural: &str) -> PathBuf {
        self.root
            .join(if group.is_empty() { "core" } else { group })
            .join(plural)
    }

    fn path(&self, group: &str, plural: &str, namespace: Option<&str>, name: &str) -> PathBuf {
        self.kind_dir(group, plural)
            .join(namespace.unwrap_or("_"))
            .join(format!("{name}.json"))
    }

    pub fn get(&self, group: &str, plural: &str, namespace: Option<&str>, name: &str) -> Option<Entry> {
        if !storable_name(name) || namespace.is_some_and(|n| !storable_name(n)) {
            return None;
        }
        let bytes = std::fs::read(self.path(group, plural, namespace, name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The objects of a resource in one namespace, or every namespace (`None`), by namespace
    /// and name.
    pub fn list(&self, group: &str, plural: &str, namespace: Option<&str>) -> Vec<Entry> {
        let dir = self.kind_dir(group, plural);
        let namespaces: Vec<PathBuf> = match namespace {
            Some(ns) if storable_name(ns) => vec![dir.join(ns)],
            Some(_) => Vec::new(),
            None => {
                let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                    .unwrap_or_default();
                all.sort();
                all
            }
        };
        let mut out = Vec::new();
        for ns_dir in namespaces {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&ns_dir)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            files.retain(|p| p.extension().is_some_and(|x| x == "json"));
            files.sort();
            for f in files {
                if let Some(e) = std::fs::read(&f).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                    out.push(e);
                }
            }
        }
        out
    }

    pub fn put(&self, group: &str, plural: &str, entry: &Entry) -> std::io::Result<()> {
        let meta = &entry.object["metadata"];
        let name = meta["name"].as_str().unwrap_or_default();
        let namespace = meta["namespace"].as_str();
        if !storable_name(name) {
            return Err(std::io::Error::other(format!("cannot store an object named '{name}'")));
        }
        let path = self.path(group, plural, namespace, name);
        std::fs::create_dir_all(path.parent().expect("objects live in a directory"))?;
        atomic_write(&path, &serde_json::to_vec(entry).map_err(std::io::Error::other)?)
    }

    /// Whether there was such an object.
    pub fn remove(&self, group: &str, plural: &str, namespace: Option<&str>, name: &str) -> std::io::Result<bool> {
        if !storable_name(name) {
            return Ok(false);
        }
        match std::fs::remove_file(self.path(group, plural, namespace, name)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every `(group, plural)` with stored objects.
    pub fn kinds(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for g in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
        {
            if !g.path().is_dir() {
                continue;
            }
            let group = g.file_name().to_string_lossy().to_string();
            for r in std::fs::read_dir(g.path()).into_iter().flatten().filter_map(|e| e.ok()) {
                let plural = r.file_name().to_string_lossy().to_string();
                out.push((if group == "core" { String::new() } else { group.clone() }, plural));
            }
        }
        out.sort();
        out
    }

    /// The last resourceVersion handed out.
    pub fn current_rv(&self) -> u64 {
        std::fs::read_to_string(self.root.join(".rv"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1)
    }

    /// The next resourceVersion (callers hold the API server's write lock).
    pub fn next_rv(&self) -> std::io::Result<u64> {
        let next = self.current_rv() + 1;
        std::fs::create_dir_all(&self.root)?;
        atomic_write(&self.root.join(".rv"), format!("{next}\n").as_bytes())?;
        Ok(next)
    }
}
