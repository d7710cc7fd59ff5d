//! The daemon's git layer (blocking; the daemon calls it in `spawn_blocking`).
//!
//! - [`Mirror`]: a local bare mirror of the watched repository in a cache directory, fetched
//!   with gix (no checkout), whose refs and commit trees the daemon reads.
//! - The status branch: reports are commits on a branch of their own (default
//!   [`DEFAULT_STATUS_BRANCH`]), never on a watched branch. gix cannot push, so these commits
//!   are made with git plumbing in a private scratch repository (no work tree, a temporary
//!   index) and pushed with the git CLI, never forced: when someone else pushed first, the
//!   commit is made again on their tip and pushed again.
//!
//! Authentication ([`GitAuth`]):
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
//!
//! Secrets never reach errors or logs: error text is redacted of the token, the header and any
//! password in a URL.

use crate::model::RepoFiles;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The branch status reports are committed to, unless configured otherwise.
pub const DEFAULT_STATUS_BRANCH: &str = "driftless/status";
/// What [`Mirror::fetch`] fetches when given no refspec.
pub const DEFAULT_REFSPEC: &str = "+refs/heads/*:refs/heads/*";
/// The identity of status commits (set through the environment: no git identity needed).
pub const COMMIT_NAME: &str = "driftless";
pub const COMMIT_EMAIL: &str = "driftless@localhost";
/// How often a rejected status push is made again on the new tip before giving up.
pub const PUSH_ATTEMPTS: u32 = 5;
/// The default limit for one git command or one fetch.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

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

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot read the git token file {path}: {message}")]
    TokenFile { path: PathBuf, message: String },
    #[error("refusing to send the git token to {url}: tokens are only sent over https (or http to localhost)")]
    InsecureToken { url: String },
    #[error("git mirror {path}: {message}")]
    Mirror { path: PathBuf, message: String },
    #[error("cannot fetch {refspecs} from {url}: {message}")]
    Fetch {
        url: String,
        refspecs: String,
        message: String,
    },
    #[error("fetching {refspecs} from {url} timed out after {secs}s")]
    FetchTimeout { url: String, refspecs: String, secs: u64 },
    #[error("cannot read {what} from the mirror of {url}: {message}")]
    Read { url: String, what: String, message: String },
    #[error("cannot run `{command}`: {message}")]
    Spawn { command: String, message: String },
    #[error("`{command}` ({url}) failed with {status}: {stderr}")]
    Command {
        url: String,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` ({url}) timed out after {secs}s")]
    Timeout { url: String, command: String, secs: u64 },
    #[error("pushing {branch} to {url} was rejected {attempts} times (others keep pushing to it); last: {message}")]
    PushRejected {
        url: String,
        branch: String,
        attempts: u32,
        message: String,
    },
    #[error("invalid {what} `{value}`: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
}

/// `scheme://user:password@host/...` with the password replaced, for messages.
pub fn display_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:<redacted>@{host}{path}")
        }
        _ => url.to_string(),
    }
}

/// Whether `name` matches `pattern`, where each `*` matches any run of characters (`/`
/// included, as in git refspecs): `refs/heads/pr/*`, `refs/pull/*/head`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if name.len() < first.len() + last.len() || !name.starts_with(first) || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn is_http(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

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
struct AuthSetup {
    /// `key=value` config entries (gix overrides; `GIT_CONFIG_*` for the CLI).
    config: Vec<(String, String)>,
    ssh_command: Option<String>,
    secrets: Vec<String>,
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

    fn setup(&self, url: &str) -> Result<AuthSetup, GitError> {
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
            let basic = base64(format!("{user}:{token}").as_bytes());
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

/// Redact the given secrets, and any password in a URL, from a message.
fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = super::status::redact(text, secrets);
    // Passwords in URLs (`https://user:pw@host`), wherever they appear in a message.
    let mut i = 0;
    while let Some(pos) = out[i..].find("://") {
        let start = i + pos + 3;
        let end = out[start..]
            .find(|c: char| c.is_whitespace() || c == '/' || c == '\'' || c == '"')
            .map_or(out.len(), |e| start + e);
        let authority = &out[start..end];
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            let replaced = format!("{user}:<redacted>");
            out.replace_range(start..start + userinfo.len(), &replaced);
            i = start + replaced.len();
        } else {
            i = end.max(start);
        }
        if i >= out.len() {
            break;
        }
    }
    out
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// A fetch refspec as given: `SRC:DST` as is, a bare ref or pattern mirrored under the same name.
fn normalize_refspec(spec: &str) -> Option<String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return None;
    }
    if spec.contains(':') {
        return Some(spec.to_string());
    }
    let src = spec.trim_start_matches('+');
    Some(format!("+{src}:{src}"))
}

/// The destination side of a refspec.
fn refspec_dst(spec: &str) -> Option<&str> {
    spec.split_once(':').map(|(_, d)| d).filter(|d| !d.is_empty())
}

fn check_branch(branch: &str) -> Result<(), GitError> {
    let bad = |reason: &str| GitError::Invalid {
        what: "branch name",
        value: branch.to_string(),
        reason: reason.to_string(),
    };
    if branch.is_empty() || branch.starts_with(['-', '/', '.']) || branch.ends_with(['/', '.']) {
        return Err(bad("empty, or starting with - / . or ending with / ."));
    }
    if branch.contains("..") || branch.contains("//") || branch.contains("@{") || branch.ends_with(".lock") {
        return Err(bad("contains .. // @{ or ends with .lock"));
    }
    if branch
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
    {
        return Err(bad("contains a space, a control character or one of ~^:?*[\\"));
    }
    if branch.split('/').any(|c| c.starts_with('.')) {
        return Err(bad("a component starts with ."));
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), GitError> {
    let bad = |reason: &str| GitError::Invalid {
        what: "status file path",
        value: path.escape_debug().to_string(),
        reason: reason.to_string(),
    };
    if path.is_empty() || path.contains('\0') || path.contains('\n') {
        return Err(bad("empty, or contains NUL or a newline"));
    }
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err(bad("must be relative, without empty, . or .. components"));
        }
        if comp.eq_ignore_ascii_case(".git") {
            return Err(bad("must not contain .git"));
        }
    }
    Ok(())
}

/// What one git CLI run gave.
struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl Output {
    fn stdout_line(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

enum PushAttempt {
    /// Pushed this commit.
    Pushed(String),
    /// The branch already holds exactly these files: nothing pushed.
    Unchanged(String),
    /// Someone else updated the branch first: try again on their tip.
    Rejected(String),
}

/// A local bare mirror of one remote repository, in a cache directory.
#[derive(Debug)]
pub struct Mirror {
    url: String,
    dir: PathBuf,
    auth: GitAuth,
    timeout: Duration,
    /// The status scratch repository is used by one publish or read at a time.
    scratch_lock: Mutex<()>,
}

impl Mirror {
    /// Open the mirror of `url` under `cache_dir` (`CACHE/<name>-<hash of url>/mirror.git`),
    /// creating an empty bare repository the first time (atomically: made aside, then renamed).
    pub fn open_or_init(url: &str, cache_dir: &Path, auth: GitAuth) -> Result<Mirror, GitError> {
        use sha2::{Digest, Sha256};
        let last = url.trim_end_matches('/').rsplit(['/', ':']).next().unwrap_or("");
        let last = last.strip_suffix(".git").unwrap_or(last);
        let mut name: String = last
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        if name.is_empty() || name.starts_with('.') {
            name.insert(0, 'r');
        }
        let hash: String = Sha256::digest(url.as_bytes())[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let dir = cache_dir.join(format!("{name}-{hash}"));
        let mirror = Mirror {
            url: url.to_string(),
            dir,
            auth,
            timeout: DEFAULT_TIMEOUT,
            scratch_lock: Mutex::new(()),
        };
        let path = mirror.path();
        let err = |message: String| GitError::Mirror {
            path: path.clone(),
            message,
        };
        if !path.join("HEAD").exists() {
            std::fs::create_dir_all(&mirror.dir).map_err(|e| err(e.to_string()))?;
            let tmp = tempfile::Builder::new()
                .prefix(".init-")
                .tempdir_in(&mirror.dir)
                .map_err(|e| err(e.to_string()))?;
            let staged = tmp.path().join("mirror.git");
            gix::init_bare(&staged).map_err(|e| err(chain(&e)))?;
            if let Err(e) = std::fs::rename(&staged, &path)
                && !path.join("HEAD").exists()
            {
                return Err(err(e.to_string()));
            }
        }
        mirror.open_repo()?;
        Ok(mirror)
    }

    /// The limit for one git command and for one fetch (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Mirror {
        self.timeout = timeout;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bare mirror repository.
    pub fn path(&self) -> PathBuf {
        self.dir.join("mirror.git")
    }

    /// The private scratch repository status commits are made in.
    fn scratch(&self) -> PathBuf {
        self.dir.join("status.git")
    }

    fn shown_url(&self) -> String {
        display_url(&self.url)
    }

    fn open_repo(&self) -> Result<gix::Repository, GitError> {
        let setup = self.auth.setup(&self.url)?;
        self.open_repo_with(&setup)
    }

    fn open_repo_with(&self, setup: &AuthSetup) -> Result<gix::Repository, GitError> {
        let mut overrides: Vec<String> = setup.config.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(cmd) = &setup.ssh_command {
            overrides.push(format!("core.sshCommand={cmd}"));
        }
        let opts = gix::open::Options::default().config_overrides(overrides);
        gix::open_opts(self.path(), opts).map_err(|e| GitError::Mirror {
            path: self.path(),
            message: scrub(&chain(&e), &setup.secrets),
        })
    }

    /// Fetch `refspecs` (`SRC:DST` as is; a bare `refs/pull/*/head` means
    /// `+refs/pull/*/head:refs/pull/*/head`; none means [`DEFAULT_REFSPEC`]) into the mirror,
    /// force-updating the mirror's refs and deleting those the remote no longer has (within the
    /// refspecs' destinations), and return every ref of the mirror with its commit.
    pub fn fetch(&self, refspecs: &[String]) -> Result<BTreeMap<String, String>, GitError> {
        let mut specs: Vec<String> = refspecs.iter().filter_map(|s| normalize_refspec(s)).collect();
        if specs.is_empty() {
            specs.push(DEFAULT_REFSPEC.to_string());
        }
        let mut setup = self.auth.setup(&self.url)?;
        // gix passes ssh's stderr through to ours: with our ssh command, ssh logs to a file
        // instead (`-E`), whose last lines explain a failure (host key, permission) in the error.
        let ssh_log = match &mut setup.ssh_command {
            Some(cmd) => {
                let log = tempfile::Builder::new()
                    .prefix("ssh-")
                    .suffix(".log")
                    .tempfile_in(&self.dir)
                    .map_err(|e| GitError::Mirror {
                        path: self.dir.clone(),
                        message: format!("ssh log file: {e}"),
                    })?;
                cmd.push_str(" -E ");
                cmd.push_str(&crate::adapters::shell_quote::quote(&log.path().to_string_lossy()));
                Some(log)
            }
            None => None,
        };
        let repo = self.open_repo_with(&setup)?;
        let shown = specs.join(" ");
        let fetch_err = |mut message: String| {
            if let Some(log) = &ssh_log
                && let Ok(text) = std::fs::read_to_string(log.path())
            {
                let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                let tail = lines[lines.len().saturating_sub(4)..].join(" / ");
                if !tail.is_empty() {
                    message = format!("{message} (ssh: {tail})");
                }
            }
            GitError::Fetch {
                url: self.shown_url(),
                refspecs: shown.clone(),
                message: scrub(&message, &setup.secrets),
            }
        };
        let interrupt = AtomicBool::new(false);
        let timed_out = AtomicBool::new(false);
        let mapped = std::thread::scope(|scope| {
            let (done, wait) = std::sync::mpsc::channel::<()>();
            let (limit, timed_out, interrupt) = (self.timeout, &timed_out, &interrupt);
            scope.spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
                    timed_out.store(true, Ordering::SeqCst);
                    interrupt.store(true, Ordering::SeqCst);
                }
            });
            let result = self.fetch_into(&repo, &specs, interrupt);
            drop(done);
            result
        });
        if timed_out.load(Ordering::SeqCst) {
            return Err(GitError::FetchTimeout {
                url: self.shown_url(),
                refspecs: shown,
                secs: self.timeout.as_secs(),
            });
        }
        let mapped = mapped.map_err(fetch_err)?;
        // Prune: refs under a destination that no remote ref maps to any more.
        let local = refs_of(&repo).map_err(|m| fetch_err(format!("listing the mirror's refs: {m}")))?;
        for name in local.keys() {
            let covered = specs.iter().filter_map(|s| refspec_dst(s)).any(|d| glob_match(d, name));
            if covered && !mapped.contains(name) {
                let reference = repo
                    .find_reference(name.as_str())
                    .map_err(|e| fetch_err(format!("pruning {name}: {}", chain(&e))))?;
                reference
                    .delete()
                    .map_err(|e| fetch_err(format!("pruning {name}: {}", chain(&e))))?;
                tracing::debug!(git_ref = %name, "pruned a ref the remote no longer has");
            }
        }
        refs_of(&repo).map_err(|m| fetch_err(format!("listing the mirror's refs: {m}")))
    }

    /// The gix fetch itself; returns the local ref names the remote's refs map to.
    fn fetch_into(
        &self,
        repo: &gix::Repository,
        specs: &[String],
        interrupt: &AtomicBool,
    ) -> Result<BTreeSet<String>, String> {
        let remote = repo
            .remote_at(self.url.as_str())
            .map_err(|e| chain(&e))?
            .with_fetch_tags(gix::remote::fetch::Tags::None)
            .with_refspecs(specs.iter().map(String::as_str), gix::remote::Direction::Fetch)
            .map_err(|e| chain(&e))?;
        let connection = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(|e| chain(&e))?
            // No credential helpers and no prompts: the token (if any) is in the extra header.
            .with_credentials(|_| Ok(None));
        let prepare = connection
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(|e| chain(&e))?;
        let ref_map = prepare.ref_map();
        let mapped: BTreeSet<String> = ref_map
            .mappings
            .iter()
            .filter_map(|m| m.local.as_ref().map(|l| l.to_string()))
            .collect();
        if ref_map.mappings.is_empty() {
            // Only patterns, and nothing matches them (no pull request open): nothing to fetch.
            let exact: Vec<&String> = specs.iter().filter(|s| !s.contains('*')).collect();
            if !exact.is_empty() {
                return Err(format!(
                    "the remote has no ref matching {}",
                    exact.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ));
            }
            return Ok(mapped);
        }
        prepare
            .receive(gix::progress::Discard, interrupt)
            .map_err(|e| chain(&e))?;
        Ok(mapped)
    }

    /// Every ref of the mirror (`refs/...`) with the commit it points to.
    pub fn refs(&self) -> Result<BTreeMap<String, String>, GitError> {
        let repo = self.open_repo()?;
        refs_of(&repo).map_err(|message| GitError::Read {
            url: self.shown_url(),
            what: "the refs".into(),
            message,
        })
    }

    /// The mirror's refs matching `pattern` (see [`glob_match`]), sorted by name.
    pub fn refs_matching(&self, pattern: &str) -> Result<Vec<(String, String)>, GitError> {
        Ok(self
            .refs()?
            .into_iter()
            .filter(|(name, _)| glob_match(pattern, name))
            .collect())
    }

    /// The files driftless uses, from the tree of `commit` (a commit id or a ref of the mirror).
    pub fn read_files(&self, commit: &str) -> Result<RepoFiles, GitError> {
        self.read_files_in(commit, None)
    }

    /// [`Mirror::read_files`] from the subdirectory `subdir` of the commit's tree.
    pub fn read_files_in(&self, commit: &str, subdir: Option<&Path>) -> Result<RepoFiles, GitError> {
        let repo = self.open_repo()?;
        crate::source::files_at_named(&repo, &self.shown_url(), commit, subdir).map_err(|e| GitError::Read {
            url: self.shown_url(),
            what: format!("the files of {commit}"),
            message: e.to_string(),
        })
    }

    /// The summary line and the author (`Name <email>`) of a commit.
    pub fn commit_info(&self, commit: &str) -> Result<(String, String), GitError> {
        let repo = self.open_repo()?;
        let err = |message: String| GitError::Read {
            url: self.shown_url(),
            what: format!("commit {commit}"),
            message,
        };
        let id = repo.rev_parse_single(commit).map_err(|e| err(chain(&e)))?;
        let c = id
            .object()
            .map_err(|e| err(chain(&e)))?
            .peel_to_commit()
            .map_err(|e| err(chain(&e)))?;
        let summary = c.message().map_err(|e| err(chain(&e)))?.summary().to_string();
        let author = c.author().map_err(|e| err(chain(&e)))?;
        Ok((summary, format!("{} <{}>", author.name, author.email)))
    }

    /// Commit `files` (path, contents) on `branch` of `remote_url` on top of its current tip (a
    /// root commit when the branch does not exist), keeping every other file of the tip, and
    /// push it without force. When someone else pushed first, the commit is made again on their
    /// tip (their files survive, ours overwrite only our paths) and pushed again, up to
    /// [`PUSH_ATTEMPTS`] times. Returns the branch's new commit, or its tip when it already held
    /// exactly these files (nothing is pushed then).
    pub fn publish_status(
        &self,
        remote_url: &str,
        branch: &str,
        files: &[(String, Vec<u8>)],
        message: &str,
    ) -> Result<String, GitError> {
        self.publish_status_with(remote_url, branch, files, message, &mut |_| {})
    }

    /// [`Mirror::publish_status`], calling `before_push(attempt)` (1-based) after the commit is
    /// made and before it is pushed: a seam for tests (a concurrent push) and instrumentation.
    pub fn publish_status_with(
        &self,
        remote_url: &str,
        branch: &str,
        files: &[(String, Vec<u8>)],
        message: &str,
        before_push: &mut dyn FnMut(u32),
    ) -> Result<String, GitError> {
        check_branch(branch)?;
        for (path, _) in files {
            check_path(path)?;
        }
        let _guard = self.scratch_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.init_scratch(remote_url)?;
        let mut last = String::new();
        for attempt in 1..=PUSH_ATTEMPTS {
            match self.publish_once(remote_url, branch, files, message, attempt, before_push)? {
                PushAttempt::Pushed(commit) => {
                    tracing::info!(branch, %commit, attempt, "status pushed");
                    return Ok(commit);
                }
                PushAttempt::Unchanged(commit) => {
                    tracing::debug!(branch, %commit, "status unchanged; nothing pushed");
                    return Ok(commit);
                }
                PushAttempt::Rejected(reason) => {
                    tracing::info!(branch, attempt, %reason, "status push rejected; making it again on the new tip");
                    last = reason;
                    if attempt < PUSH_ATTEMPTS {
                        std::thread::sleep(backoff(attempt));
                    }
                }
            }
        }
        Err(GitError::PushRejected {
            url: display_url(remote_url),
            branch: branch.to_string(),
            attempts: PUSH_ATTEMPTS,
            message: last,
        })
    }

    fn publish_once(
        &self,
        url: &str,
        branch: &str,
        files: &[(String, Vec<u8>)],
        message: &str,
        attempt: u32,
        before_push: &mut dyn FnMut(u32),
    ) -> Result<PushAttempt, GitError> {
        let tip = self.fetch_status_tip(url, branch)?;
        let index_dir = tempfile::Builder::new()
            .prefix("index-")
            .tempdir_in(self.scratch())
            .map_err(|e| GitError::Mirror {
                path: self.scratch(),
                message: format!("temporary index: {e}"),
            })?;
        let index = index_dir.path().join("index");
        let idx_env = [("GIT_INDEX_FILE", index.as_os_str().to_owned())];
        match &tip {
            Some(t) => self.git_ok(url, &["read-tree", t], None, &idx_env)?,
            None => self.git_ok(url, &["read-tree", "--empty"], None, &idx_env)?,
        };
        let mut index_info = Vec::new();
        for (path, contents) in files {
            let blob = self
                .git_ok(url, &["hash-object", "-w", "--stdin"], Some(contents), &[])?
                .stdout_line();
            index_info.extend_from_slice(format!("100644 blob {blob}\t{path}\0").as_bytes());
        }
        self.git_ok(
            url,
            &["update-index", "--add", "--replace", "-z", "--index-info"],
            Some(&index_info),
            &idx_env,
        )?;
        let tree = self.git_ok(url, &["write-tree"], None, &idx_env)?.stdout_line();
        if let Some(t) = &tip {
            let old_tree = self
                .git_ok(url, &["rev-parse", &format!("{t}^{{tree}}")], None, &[])?
                .stdout_line();
            if old_tree == tree {
                return Ok(PushAttempt::Unchanged(t.clone()));
            }
        }
        let mut args = vec!["commit-tree", tree.as_str()];
        if let Some(t) = &tip {
            args.extend(["-p", t.as_str()]);
        }
        let commit = self.git_ok(url, &args, Some(message.as_bytes()), &[])?.stdout_line();
        before_push(attempt);
        let refspec = format!("{commit}:refs/heads/{branch}");
        let out = self.git(url, &["push", "--porcelain", "--no-verify", url, &refspec], None, &[])?;
        if out.status.success() {
            return Ok(PushAttempt::Pushed(commit));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let rejected = stdout
            .lines()
            .find(|l| l.starts_with('!'))
            .map(|l| l.split('\t').nth(2).unwrap_or(l).to_string());
        const RETRY: [&str; 7] = [
            "fetch first",
            "non-fast-forward",
            "stale info",
            "cannot lock ref",
            "failed to update ref",
            "failed to lock",
            "incorrect old value",
        ];
        match rejected {
            Some(reason) if RETRY.iter().any(|r| reason.contains(r)) => Ok(PushAttempt::Rejected(reason)),
            other => Err(self.command_error(
                url,
                &["push", "--porcelain", "--no-verify", url, &refspec],
                &out,
                other.as_deref(),
            )),
        }
    }

    /// Read `path` from the tip of `branch` of the mirror's remote: `None` when the branch or
    /// the file does not exist.
    pub fn read_status(&self, branch: &str, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        check_branch(branch)?;
        check_path(path)?;
        let url = self.url.clone();
        let _guard = self.scratch_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.init_scratch(&url)?;
        let Some(tip) = self.fetch_status_tip(&url, branch)? else {
            return Ok(None);
        };
        let listing = self.git_ok(&url, &["ls-tree", "-z", &tip, "--", path], None, &[])?;
        let entry = String::from_utf8_lossy(&listing.stdout);
        let Some((meta, _)) = entry.split('\0').next().and_then(|e| e.split_once('\t')) else {
            return Ok(None);
        };
        let mut meta = meta.split(' ');
        let (_mode, kind, blob) = (meta.next(), meta.next(), meta.next());
        match (kind, blob) {
            (Some("blob"), Some(blob)) => Ok(Some(self.git_ok(&url, &["cat-file", "blob", blob], None, &[])?.stdout)),
            _ => Ok(None),
        }
    }

    fn init_scratch(&self, url: &str) -> Result<(), GitError> {
        if !self.scratch().join("HEAD").exists() {
            std::fs::create_dir_all(self.scratch()).map_err(|e| GitError::Mirror {
                path: self.scratch(),
                message: e.to_string(),
            })?;
            self.git_ok(url, &["init", "--bare", "-q"], None, &[])?;
        }
        Ok(())
    }

    /// The remote's tip of `branch`, fetched into the scratch repository; `None` when absent.
    fn fetch_status_tip(&self, url: &str, branch: &str) -> Result<Option<String>, GitError> {
        let full = format!("refs/heads/{branch}");
        let out = self.git(url, &["ls-remote", "--exit-code", url, &full], None, &[])?;
        if out.status.code() == Some(2) {
            return Ok(None);
        }
        if !out.status.success() {
            return Err(self.command_error(url, &["ls-remote", "--exit-code", url, &full], &out, None));
        }
        let listed = String::from_utf8_lossy(&out.stdout);
        let Some(tip) = listed
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(_, name)| *name == full)
            .map(|(id, _)| id.to_string())
        else {
            return Ok(None);
        };
        let have = self.git(url, &["cat-file", "-e", &format!("{tip}^{{commit}}")], None, &[])?;
        if have.status.success() {
            return Ok(Some(tip));
        }
        // Fetch by name (not by id: servers need not allow that); the branch may have moved on
        // since ls-remote, so its fetched value is the tip.
        let local = "refs/driftless/status-tip";
        self.git_ok(
            url,
            &[
                "fetch",
                "-q",
                "--no-tags",
                "--no-write-fetch-head",
                url,
                &format!("+{full}:{local}"),
            ],
            None,
            &[],
        )?;
        Ok(Some(
            self.git_ok(url, &["rev-parse", "--verify", local], None, &[])?
                .stdout_line(),
        ))
    }

    fn command_error(&self, url: &str, args: &[&str], out: &Output, reason: Option<&str>) -> GitError {
        let secrets = self.auth.setup(url).map(|s| s.secrets).unwrap_or_default();
        // The end of git's stderr says what went wrong (ssh prints banners before it).
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .collect();
        let mut stderr = lines[lines.len().saturating_sub(8)..].join("\n");
        if let Some(r) = reason {
            stderr = format!("{r}; {stderr}");
        }
        GitError::Command {
            url: display_url(url),
            command: scrub(&format!("git {}", args.join(" ")), &secrets),
            status: out.status.to_string(),
            stderr: scrub(&stderr, &secrets),
        }
    }

    fn git_ok(
        &self,
        url: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        env: &[(&str, OsString)],
    ) -> Result<Output, GitError> {
        let out = self.git(url, args, stdin, env)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(self.command_error(url, args, &out, None))
        }
    }

    /// Run the git CLI on the scratch repository: argv (no shell), no prompts, driftless's
    /// identity, the auth for `url` in the environment, hooks off, and the timeout.
    fn git(
        &self,
        url: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        env: &[(&str, OsString)],
    ) -> Result<Output, GitError> {
        let setup = self.auth.setup(url)?;
        let shown = || scrub(&format!("git {}", args.join(" ")), &setup.secrets);
        let mut cmd = Command::new("git");
        cmd.args(args);
        for var in [
            "GIT_DIR",
            "GIT_WORK_TREE",
            "GIT_INDEX_FILE",
            "GIT_OBJECT_DIRECTORY",
            "GIT_ALTERNATE_OBJECT_DIRECTORIES",
            "GIT_COMMON_DIR",
            "GIT_NAMESPACE",
            "GIT_CEILING_DIRECTORIES",
            "GIT_CONFIG_COUNT",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("GIT_DIR", self.scratch())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GCM_INTERACTIVE", "never")
            .env("LC_ALL", "C")
            .env("GIT_AUTHOR_NAME", COMMIT_NAME)
            .env("GIT_AUTHOR_EMAIL", COMMIT_EMAIL)
            .env("GIT_COMMITTER_NAME", COMMIT_NAME)
            .env("GIT_COMMITTER_EMAIL", COMMIT_EMAIL)
            .current_dir(self.scratch().parent().unwrap_or(Path::new("/")));
        if let Some(ssh) = &setup.ssh_command {
            cmd.env("GIT_SSH_COMMAND", ssh).env("GIT_SSH_VARIANT", "ssh");
        }
        // Config through the environment, not argv: the token header must not show in /proc.
        let mut config = vec![("core.hooksPath".to_string(), "/dev/null".to_string())];
        config.extend(setup.config.iter().filter(|(k, _)| k != "ssh.variant").cloned());
        cmd.env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (k, v)) in config.iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), k)
                .env(format!("GIT_CONFIG_VALUE_{i}"), v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| GitError::Spawn {
            command: shown(),
            message: e.to_string(),
        })?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let data = data.to_vec();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        let mut out_pipe = child.stdout.take().expect("piped");
        let mut err_pipe = child.stderr.take().expect("piped");
        let out_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out_pipe.read_to_end(&mut buf);
            buf
        });
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err_pipe.read_to_end(&mut buf);
            buf
        });
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // The readers end when git's own children (ssh, remote helpers) do.
                    return Err(GitError::Timeout {
                        url: display_url(url),
                        command: shown(),
                        secs: self.timeout.as_secs(),
                    });
                }
                Ok(None) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(GitError::Spawn {
                        command: shown(),
                        message: e.to_string(),
                    });
                }
            }
        };
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        Ok(Output {
            status,
            stdout,
            stderr: scrub(&String::from_utf8_lossy(&stderr), &setup.secrets),
        })
    }
}

/// A short, growing pause between push attempts, with jitter so two daemons do not collide again.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64 << attempt.min(5);
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()) % base);
    Duration::from_millis(base + jitter)
}

/// Every `refs/...` ref of a repository, peeled to the commit it points to.
fn refs_of(repo: &gix::Repository) -> Result<BTreeMap<String, String>, String> {
    let platform = repo.references().map_err(|e| chain(&e))?;
    let mut refs = BTreeMap::new();
    for r in platform.all().map_err(|e| chain(&e))? {
        let mut r = r.map_err(|e| chain(&e))?;
        let name = r.name().as_bstr().to_string();
        if !name.starts_with("refs/") {
            continue;
        }
        match r.peel_to_id() {
            Ok(id) => {
                refs.insert(name, id.to_string());
            }
            Err(e) => tracing::warn!(git_ref = %name, error = %chain(&e), "cannot resolve a ref of the mirror"),
        }
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_refspecs() {
        assert!(glob_match("refs/heads/pr/*", "refs/heads/pr/1"));
        assert!(glob_match("refs/heads/pr/*", "refs/heads/pr/a/b"));
        assert!(!glob_match("refs/heads/pr/*", "refs/heads/main"));
        assert!(!glob_match("refs/heads/pr/*", "refs/heads/pr"));
        assert!(glob_match("refs/pull/*/head", "refs/pull/7/head"));
        assert!(!glob_match("refs/pull/*/head", "refs/pull/7/merge"));
        assert!(glob_match("refs/merge-requests/*/head", "refs/merge-requests/12/head"));
        assert!(glob_match("refs/heads/main", "refs/heads/main"));
        assert!(!glob_match("refs/heads/main", "refs/heads/main2"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(!glob_match("a*b*c", "a-c-b"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    #[test]
    fn refspecs_are_normalised() {
        assert_eq!(
            normalize_refspec("refs/pull/*/head").unwrap(),
            "+refs/pull/*/head:refs/pull/*/head"
        );
        assert_eq!(
            normalize_refspec("+refs/heads/*").unwrap(),
            "+refs/heads/*:refs/heads/*"
        );
        assert_eq!(
            normalize_refspec("refs/heads/a:refs/x/a").unwrap(),
            "refs/heads/a:refs/x/a"
        );
        assert_eq!(normalize_refspec("  "), None);
        assert_eq!(refspec_dst("+refs/heads/*:refs/heads/*"), Some("refs/heads/*"));
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
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
    fn gix_sees_the_ssh_command_and_the_token_header() {
        let cache = tempfile::tempdir().unwrap();
        let token = cache.path().join("token");
        std::fs::write(&token, "s3cret-token\n").unwrap();
        let auth = GitAuth {
            ssh_key: Some("/keys/id_ed25519".into()),
            known_hosts: None,
            token_file: Some(token.clone()),
        };
        let m = Mirror::open_or_init("https://git.example/homelab.git", cache.path(), auth.clone()).unwrap();
        let repo = m.open_repo().unwrap();
        let ssh = repo.ssh_connect_options().unwrap();
        assert_eq!(
            ssh.command.as_deref().and_then(|c| c.to_str()),
            auth.ssh_command().as_deref()
        );
        let headers: Vec<String> = repo
            .config_snapshot()
            .strings("http.extraHeader")
            .unwrap_or_default()
            .iter()
            .map(|h| h.to_string())
            .collect();
        assert_eq!(
            headers,
            vec![format!(
                "Authorization: Basic {}",
                base64(b"x-access-token:s3cret-token")
            )]
        );

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

    #[test]
    fn messages_lose_secrets_and_url_passwords() {
        assert_eq!(
            display_url("https://bob:hunter2@git.example/r.git"),
            "https://bob:<redacted>@git.example/r.git"
        );
        assert_eq!(
            display_url("ssh://git@git.example/r.git"),
            "ssh://git@git.example/r.git"
        );
        let msg = "fatal: unable to access 'https://bob:hunter2@git.example/r.git/': tok3n";
        let clean = scrub(msg, &["tok3n".into()]);
        assert!(!clean.contains("hunter2") && !clean.contains("tok3n"), "{clean}");
        assert!(clean.contains("https://bob:<redacted>@git.example/r.git/"), "{clean}");
    }

    #[test]
    fn branch_and_path_checks() {
        assert!(check_branch("driftless/status").is_ok());
        for bad in ["", "-x", "a..b", "a b", "a:b", "x.lock", "a//b", "/a", "a/.b"] {
            assert!(check_branch(bad).is_err(), "{bad}");
        }
        assert!(check_path("status/heads/main.md").is_ok());
        for bad in ["", "/etc/passwd", "a/../b", "a//b", ".git/config", "a/.GIT/x", "a\nb"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }
}
