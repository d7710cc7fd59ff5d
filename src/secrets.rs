//! Secrets: named in git (`{secret: NAME}`), resolved only on the host that runs driftless,
//! from a directory (`<dir>/<NAME>`) or the environment (`DRIFTLESS_SECRET_<NAME>`, upper
//! case, `-` and `.` as `_`). A `Secret` never prints its value: Debug and Display redact it.

use std::fmt;
use std::path::PathBuf;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that sends it (a header, a file on the target).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret `{name}` not found: put it in {dir}/{name} or set {env}")]
    Missing { name: String, dir: String, env: String },
    #[error("cannot read secret `{name}` from {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret name `{0}` is not a plain file name")]
    BadName(String),
}

/// A file name with no directory in it: no `/`, no `\\`, not `.`-first (so no `..`), not empty.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\', '\0']) && !name.starts_with('.')
}

#[derive(Debug, Clone)]
pub struct SecretStore {
    pub dir: PathBuf,
}

impl SecretStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SecretStore { dir: dir.into() }
    }

    pub fn env_name(name: &str) -> String {
        format!(
            "DRIFTLESS_SECRET_{}",
            name.to_ascii_uppercase().replace(['-', '.'], "_")
        )
    }

    /// A host-side file named in cluster.yaml (known_hosts, CA file, SSH key): a file of the
    /// secrets directory, since such files are not in git. The repository names it, so the
    /// name must be plain: whoever writes the repository does not choose which file of this
    /// host is read.
    pub fn host_path(&self, name: &str) -> Result<PathBuf, SecretError> {
        if !is_plain_name(name) {
            return Err(SecretError::BadName(name.to_string()));
        }
        Ok(self.dir.join(name))
    }

    pub fn resolve(&self, name: &str) -> Result<Secret, SecretError> {
        if !is_plain_name(name) {
            return Err(SecretError::BadName(name.to_string()));
        }
        let env = Self::env_name(name);
        if let Ok(v) = std::env::var(&env) {
            return Ok(Secret(v.trim_end_matches(['\n', '\r']).to_string()));
        }
        let path = self.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(v) => Ok(Secret(v.trim_end_matches(['\n', '\r']).to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SecretError::Missing {
                name: name.into(),
                dir: self.dir.display().to_string(),
                env,
            }),
            Err(source) => Err(SecretError::Read {
                name: name.into(),
                path,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
    }

    #[test]
    fn reads_from_the_directory_and_refuses_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pve-token"), "root@pam!x=abc\n").unwrap();
        let store = SecretStore::new(dir.path());
        assert_eq!(store.resolve("pve-token").unwrap().expose(), "root@pam!x=abc");
        assert!(matches!(store.resolve("../etc/passwd"), Err(SecretError::BadName(_))));
        for outside in ["/etc/shadow", "../x", "a/../../x", ".ssh", ""] {
            assert!(
                store.host_path(outside).is_err(),
                "{outside:?} leaves the secrets directory"
            );
        }
        assert_eq!(
            store.host_path("pve.known_hosts").unwrap(),
            dir.path().join("pve.known_hosts")
        );
        let err = store.resolve("no-such-secret").unwrap_err().to_string();
        assert!(err.contains("DRIFTLESS_SECRET_NO_SUCH_SECRET"), "{err}");
    }
}
