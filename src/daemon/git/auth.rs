//! How the daemon authenticates to the remote: [`GitAuth`] (what is configured) becomes an
//! [`AuthSetup`] (what one URL needs right now), which the gix mirror takes as config
//! overrides and the git CLI runner as its child's environment.
//!
//! - ssh: `ssh -i KEY -o IdentitiesOnly=yes -o UserKnownHostsFile=KH -o StrictHostKeyChecking=yes
//!   -o BatchMode=yes` (paths shell-quoted). gix gets it as the `core.sshCommand` config override
//!   of the opened repository (gix reads `core.sshCommand`/`GIT_SSH_COMMAND` in
//!   `Repository::ssh_connect_options` and runs it through `sh -c` when it has spaces); the git
//!   CLI gets it as `GIT_SSH_COMMAND` in the child's environment. `ssh.variant=ssh` spares the
//!   `ssh -G` probe. The process environment is never changed.
//! - https: the token file is read at each operation (so a rotated token is picked up) and sent
//!   as an `http.extraHeader` `Authorization: Basic base64(USER:TOKEN)` header (USER is
//!   `x-access-token` unless the file holds `USER:TOKEN`): accepted by GitHub, Gitea/Forgejo
//!   and GitLab for personal and app tokens. gix gets it as an in-memory config override; the
//!   git CLI through `GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n` in the child's
//!   environment, never in argv (which other users can read in /proc). The token is only ever
//!   sent over https (or plain http to this machine), never to ssh/git/file remotes.
//!   Credential helpers and prompts are off (gix: a credentials callback that gives none;
//!   git: `GIT_TERMINAL_PROMPT=0`).

use super::error::{GitError, display_url};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use std::path::PathBuf;

/// How to authenticate to the remote. All optional: nothing set uses git's defaults
/// (the user's ssh configuration, no token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitAuth {
    /// Private key for ssh remotes.
    pub ssh_key: Option<PathBuf>,
    /// known_hosts for ssh remotes; host keys are always checked (`StrictHostKeyChecking=yes`).
    pub known_hosts: Option<PathBuf>,
    /// A file holding a token (or `USER:TOKEN`) for https remotes.
    pub token_file: Option<PathBuf>,
}

/// Whether the token applies at all: ssh, git:// and file remotes never get it.
fn is_http(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

/// Whether the token may be sent to `url`: https, or plain http that stays on this machine
/// (a local forge in tests or behind a local proxy); anything else would send it in clear.
fn is_secure_http(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return true;
    }
    let Some(rest) = lower.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

/// What authenticating to one URL needs right now: config values and environment for the
/// children, and the secret strings to keep out of messages.
#[derive(Debug, Default)]
pub(super) struct AuthSetup {
    /// `key=value` config entries (gix overrides; `GIT_CONFIG_*` for the CLI).
    pub(super) config: Vec<(String, String)>,
    /// [`GitAuth::ssh_command`]: `core.sshCommand` for gix, `GIT_SSH_COMMAND` for the CLI.
    pub(super) ssh_command: Option<String>,
    /// The token, the whole token file line and the encoded header: scrubbed from messages.
    pub(super) secrets: Vec<String>,
}

impl GitAuth {
    /// The ssh command line, when a key or a known_hosts file is set.
    pub fn ssh_command(&self) -> Option<String> {
        use crate::adapters::shell_quote::quote;
        if self.ssh_key.is_none() && self.known_hosts.is_none() {
            return None;
        }
        let mut cmd = vec!["ssh".to_string()];
        if let Some(key) = &self.ssh_key {
            cmd.push("-i".into());
            cmd.push(quote(&key.to_string_lossy()));
            cmd.push("-o".into());
            cmd.push("IdentitiesOnly=yes".into());
        }
        if let Some(kh) = &self.known_hosts {
            cmd.push("-o".into());
            cmd.push(quote(&format!("UserKnownHostsFile={}", kh.to_string_lossy())));
        }
        for opt in ["StrictHostKeyChecking=yes", "BatchMode=yes", "ConnectTimeout=30"] {
            cmd.push("-o".into());
            cmd.push(opt.into());
        }
        Some(cmd.join(" "))
    }

    /// What talking to `url` needs now. Called for each operation (not cached) so that a
    /// rotated token file is picked up without restarting the daemon.
    pub(super) fn setup(&self, url: &str) -> Result<AuthSetup, GitError> {
        let mut s = AuthSetup {
            ssh_command: self.ssh_command(),
            ..AuthSetup::default()
        };
        if let Some(path) = &self.token_file
            && is_http(url)
        {
            if !is_secure_http(url) {
                return Err(GitError::InsecureToken { url: display_url(url) });
            }
            let text = std::fs::read_to_string(path).map_err(|e| GitError::TokenFile {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let text = text.trim();
            if text.is_empty() || text.contains(['\n', '\r']) {
                return Err(GitError::TokenFile {
                    path: path.clone(),
                    message: "it must hold one line: a token, or USER:TOKEN".into(),
                });
            }
            let (user, token) = text.split_once(':').unwrap_or(("x-access-token", text));
            // RFC 7617 basic auth: standard alphabet, padded.
            let basic = STANDARD.encode(format!("{user}:{token}"));
            s.config
                .push(("http.extraHeader".into(), format!("Authorization: Basic {basic}")));
            s.secrets.extend([token.to_string(), text.to_string(), basic]);
        }
        if s.ssh_command.is_some() {
            s.config.push(("ssh.variant".into(), "ssh".into()));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_becomes_a_basic_auth_header_whose_parts_are_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let auth = GitAuth {
            token_file: Some(file.clone()),
            ..GitAuth::default()
        };
        let url = "https://git.example/r.git";
        let header = |b64: &str| vec![("http.extraHeader".to_string(), format!("Authorization: Basic {b64}"))];

        // A bare token goes with the user forges accept for tokens. These tokens' encodings
        // need `/`, `+` and padding: the standard, padded alphabet, as RFC 7617 wants.
        std::fs::write(&file, "ab?>\n").unwrap();
        let s = auth.setup(url).unwrap();
        assert_eq!(s.config, header("eC1hY2Nlc3MtdG9rZW46YWI/Pg=="));
        assert_eq!(s.secrets, ["ab?>", "ab?>", "eC1hY2Nlc3MtdG9rZW46YWI/Pg=="]);
        assert_eq!(s.ssh_command, None);

        std::fs::write(&file, "  bob:~~~?  \n").unwrap();
        let s = auth.setup(url).unwrap();
        assert_eq!(s.config, header("Ym9iOn5+fj8="));
        assert_eq!(s.secrets, ["~~~?", "bob:~~~?", "Ym9iOn5+fj8="]);

        for bad in ["", " \n", "one\ntwo\n"] {
            std::fs::write(&file, bad).unwrap();
            assert!(matches!(auth.setup(url), Err(GitError::TokenFile { .. })), "{bad:?}");
        }
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(auth.setup(url), Err(GitError::TokenFile { .. })));
    }

    #[test]
    fn an_ssh_command_comes_with_the_ssh_variant_for_gix() {
        let auth = GitAuth {
            ssh_key: Some("/keys/id".into()),
            ..GitAuth::default()
        };
        let s = auth.setup("ssh://git@git.example/r.git").unwrap();
        assert_eq!(s.ssh_command, auth.ssh_command());
        assert_eq!(s.config, vec![("ssh.variant".to_string(), "ssh".to_string())]);
        assert!(s.secrets.is_empty());
        // Nothing configured: git's own defaults, nothing to add.
        let s = GitAuth::default().setup("https://git.example/r.git").unwrap();
        assert!(s.config.is_empty() && s.ssh_command.is_none() && s.secrets.is_empty());
    }

    #[test]
    fn the_ssh_command_quotes_paths_and_checks_host_keys() {
        let auth = GitAuth {
            ssh_key: Some("/keys/my key".into()),
            known_hosts: Some("/etc/driftless/known_hosts".into()),
            token_file: None,
        };
        assert_eq!(
            auth.ssh_command().unwrap(),
            "ssh -i '/keys/my key' -o IdentitiesOnly=yes -o 'UserKnownHostsFile=/etc/driftless/known_hosts' \
             -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=30"
        );
        assert_eq!(GitAuth::default().ssh_command(), None);
    }

    #[test]
    fn tokens_only_travel_over_https_or_to_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret-token\n").unwrap();
        let auth = GitAuth {
            ssh_key: Some("/keys/id_ed25519".into()),
            known_hosts: None,
            token_file: Some(token),
        };
        // Tokens only travel over https (or to this machine).
        for (url, ok) in [
            ("http://git.example/r.git", false),
            ("http://127.0.0.1:3000/r.git", true),
            ("http://localhost/r.git", true),
            ("HTTPS://git.example/r.git", true),
        ] {
            assert_eq!(auth.setup(url).is_ok(), ok, "{url}");
        }
        // Other transports never get the token.
        assert!(auth.setup("ssh://git@git.example/r.git").unwrap().secrets.is_empty());
        assert!(auth.setup("file:///srv/r.git").unwrap().secrets.is_empty());
    }
}
