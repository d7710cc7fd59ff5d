//! What the daemon's operator forbids the repository, whoever can push to it. Write access to
//! the watched branch is root on the Proxmox host: a raw `lxc.hook.*` runs a host command as
//! root, `k3s.binary` names a host file pushed into containers, `force_rw_sys` or `mknod`
//! loosen a container's confinement. `policy:` in the daemon's own config (trusted, never
//! from the repository) lets an operator who shares the repository forbid such keys; a
//! revision that sets one is refused like an invalid one, with the file and line. Pure.

use crate::model::Desired;
use serde::{Deserialize, Serialize};

/// `policy:` in the daemon config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Raw LXC keys the repository may not set: a key is refused when it starts with one of
    /// these (`lxc.hook.` forbids every hook, `lxc.mount.entry` bind mounts of host paths).
    #[serde(default)]
    pub forbid_raw_lxc: Vec<String>,
    /// The only host paths `k3s.binary` may name; unset allows any.
    #[serde(default)]
    pub k3s_binaries: Option<Vec<String>>,
    /// LXC features the repository may not switch on: nesting, keyctl, fuse, mknod,
    /// force_rw_sys, mount.
    #[serde(default)]
    pub forbid_features: Vec<String>,
}

/// The feature names `forbid_features` knows.
pub const FEATURES: &[&str] = &["nesting", "keyctl", "fuse", "mknod", "force_rw_sys", "mount"];

impl Policy {
    /// A policy naming a feature driftless does not know is a typo that would forbid nothing.
    pub fn check(&self) -> Result<(), String> {
        match self.forbid_features.iter().find(|f| !FEATURES.contains(&f.as_str())) {
            Some(f) => Err(format!(
                "policy.forbid_features: unknown feature `{f}` ({})",
                FEATURES.join(", ")
            )),
            None => Ok(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.forbid_raw_lxc.is_empty() && self.k3s_binaries.is_none() && self.forbid_features.is_empty()
    }

    /// What `desired` sets that the policy forbids, one line each, with the file and line.
    pub fn violations(&self, desired: &Desired) -> Vec<String> {
        let mut found = Vec::new();
        if let (Some(allowed), Some(binary)) = (&self.k3s_binaries, &desired.cluster.k3s.binary)
            && !allowed.contains(binary)
        {
            let at = desired
                .cluster
                .provenance
                .get("k3s.binary")
                .map_or_else(|| "cluster.yaml".to_string(), |s| s.cite());
            found.push(format!(
                "{at}: `k3s.binary` `{binary}` is not one of the daemon's policy.k3s_binaries"
            ));
        }
        for node in &desired.nodes {
            let Some(lxc) = &node.settings.lxc else { continue };
            let cite = |key: &str, item: Option<usize>| {
                let setting = node.provenance.get(key);
                let loc = setting.and_then(|s| item.and_then(|i| s.winner().items.get(i).cloned()));
                match (loc, setting) {
                    (Some(loc), _) => loc.to_string(),
                    (None, Some(s)) => s.cite(),
                    (None, None) => node.file.clone(),
                }
            };
            for (i, entry) in lxc.raw.iter().flatten().enumerate() {
                for k in entry.keys() {
                    if let Some(prefix) = self.forbid_raw_lxc.iter().find(|p| k.starts_with(p.as_str())) {
                        found.push(format!(
                            "{}: raw LXC key `{k}` on {} is forbidden by the daemon's policy.forbid_raw_lxc (`{prefix}`)",
                            cite("lxc.raw", Some(i)),
                            node.name
                        ));
                    }
                }
            }
            let Some(f) = &lxc.features else { continue };
            let on = [
                ("nesting", f.nesting == Some(true)),
                ("keyctl", f.keyctl == Some(true)),
                ("fuse", f.fuse == Some(true)),
                ("mknod", f.mknod == Some(true)),
                ("force_rw_sys", f.force_rw_sys == Some(true)),
                ("mount", f.mount.as_deref().is_some_and(|m| !m.is_empty())),
            ];
            for (name, set) in on {
                if set && self.forbid_features.iter().any(|x| x == name) {
                    found.push(format!(
                        "{}: LXC feature `{name}` on {} is forbidden by the daemon's policy.forbid_features",
                        cite(&format!("lxc.features.{name}"), None),
                        node.name
                    ));
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LoadOptions, load};

    fn example() -> Desired {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/homelab-k3s");
        load(&crate::source::read_dir(&dir).unwrap(), &LoadOptions::default()).unwrap()
    }

    #[test]
    fn an_empty_policy_forbids_nothing_and_the_example_passes() {
        assert!(Policy::default().violations(&example()).is_empty());
    }

    #[test]
    fn forbidden_raw_keys_and_features_are_named_where_the_repository_sets_them() {
        let policy = Policy {
            forbid_raw_lxc: vec!["lxc.apparmor.".into(), "lxc.hook.".into()],
            k3s_binaries: None,
            forbid_features: vec!["nesting".into(), "mknod".into()],
        };
        let found = policy.violations(&example());
        // ADR-001 sets lxc.apparmor.profile and nesting for every container.
        assert!(
            found
                .iter()
                .any(|v| v.contains("adr/ADR-001") && v.contains("`lxc.apparmor.profile`")),
            "{found:#?}"
        );
        assert!(
            found.iter().any(|v| v.contains("feature `nesting` on k3s-master")),
            "{found:#?}"
        );
        assert!(!found.iter().any(|v| v.contains("mknod")), "{found:#?}");
    }

    #[test]
    fn k3s_binary_must_be_one_the_operator_allows() {
        let mut desired = example();
        desired.cluster.k3s.binary = Some("/etc/shadow".into());
        let policy = Policy {
            k3s_binaries: Some(vec!["/srv/k3s/k3s".into()]),
            ..Policy::default()
        };
        let found = policy.violations(&desired);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("`k3s.binary` `/etc/shadow`"), "{found:#?}");
        desired.cluster.k3s.binary = Some("/srv/k3s/k3s".into());
        assert!(policy.violations(&desired).is_empty());
    }

    #[test]
    fn an_unknown_feature_name_is_refused_at_start() {
        let policy = Policy {
            forbid_features: vec!["nestng".into()],
            ..Policy::default()
        };
        assert!(policy.check().unwrap_err().contains("unknown feature `nestng`"));
    }
}
