//! [`Mirror`]: a local bare mirror of the watched repository in a cache directory, fetched
//! with gix (no checkout, no git CLI), whose refs and commit trees the daemon reads. The
//! status branch, which gix cannot push, is in `status_branch.rs`.

use super::auth::{AuthSetup, GitAuth};
use super::error::{GitError, chain, display_url, scrub};
use crate::model::RepoFiles;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What [`Mirror::fetch`] fetches when given no refspec.
pub const DEFAULT_REFSPEC: &str = "+refs/heads/*:refs/heads/*";
/// The default limit for one git command or one fetch.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

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

/// A local bare mirror of one remote repository, in a cache directory.
#[derive(Debug)]
pub struct Mirror {
    // `pub(super)`: the status branch half of `Mirror` lives in `status_branch.rs`.
    /// The remote, as configured (it may hold a password: show it through [`display_url`]).
    pub(super) url: String,
    /// `CACHE/<name>-<hash of url>`: holds `mirror.git` and the status scratch repository.
    pub(super) dir: PathBuf,
    pub(super) auth: GitAuth,
    /// The limit for one git command or one fetch.
    pub(super) timeout: Duration,
    /// The status scratch repository is used by one publish or read at a time.
    pub(super) scratch_lock: Mutex<()>,
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
            mirror.init_empty().map_err(err)?;
        }
        mirror.open_repo()?;
        Ok(mirror)
    }

    /// Make the empty bare repository: atomically, made aside, then renamed into place.
    fn init_empty(&self) -> Result<(), String> {
        let path = self.path();
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let tmp = tempfile::Builder::new()
            .prefix(".init-")
            .tempdir_in(&self.dir)
            .map_err(|e| e.to_string())?;
        let staged = tmp.path().join("mirror.git");
        gix::init_bare(&staged).map_err(|e| chain(&e))?;
        if let Err(e) = std::fs::rename(&staged, &path)
            && !path.join("HEAD").exists()
        {
            return Err(e.to_string());
        }
        Ok(())
    }

    /// Whether every ref of the mirror still leads to a commit it holds. A mirror whose
    /// objects were lost (a disk fault, a hand-made cleanup) fails every fetch ("could not
    /// peel reference") until it is made again.
    pub fn is_intact(&self) -> bool {
        let Ok(repo) = self.open_repo() else {
            return false;
        };
        let Ok(platform) = repo.references() else {
            return false;
        };
        let Ok(all) = platform.all() else {
            return false;
        };
        all.into_iter()
            .all(|r| r.is_ok_and(|mut r| !r.name().as_bstr().starts_with(b"refs/") || r.peel_to_commit().is_ok()))
    }

    /// Fetch, and when the fetch fails because the mirror itself is damaged, make the mirror
    /// again from nothing and fetch once more. The second value says it was remade.
    pub fn fetch_healing(&self, refspecs: &[String]) -> Result<(BTreeMap<String, String>, bool), GitError> {
        match self.fetch(refspecs) {
            Ok(refs) => Ok((refs, false)),
            Err(e) if self.is_intact() => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, path = %self.path().display(), "the mirror is damaged: making it again");
                let remade = std::fs::remove_dir_all(self.path())
                    .map_err(|e| e.to_string())
                    .and_then(|()| self.init_empty());
                if let Err(message) = remade {
                    return Err(GitError::Mirror {
                        path: self.path(),
                        message: format!("damaged, and cannot be made again: {message}"),
                    });
                }
                self.fetch(refspecs).map(|refs| (refs, true))
            }
        }
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

    fn shown_url(&self) -> String {
        display_url(&self.url)
    }

    fn open_repo(&self) -> Result<gix::Repository, GitError> {
        let setup = self.auth.setup(&self.url)?;
        self.open_repo_with(&setup)
    }

    /// Open the mirror with `setup` as in-memory config overrides: the auth reaches gix
    /// without touching the repository's config file or the process environment.
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

    /// The raw commit objects of `commits` (commit ids or refs of the mirror), byte for byte as
    /// git stores them: what a commit signature is checked against (`daemon::verify`).
    pub fn raw_commits(&self, commits: &[String]) -> Result<Vec<Vec<u8>>, GitError> {
        let repo = self.open_repo()?;
        let mut out = Vec::with_capacity(commits.len());
        for commit in commits {
            let err = |message: String| GitError::Read {
                url: self.shown_url(),
                what: format!("commit {commit}"),
                message,
            };
            let id = repo.rev_parse_single(commit.as_str()).map_err(|e| err(chain(&e)))?;
            let c = id
                .object()
                .map_err(|e| err(chain(&e)))?
                .peel_to_commit()
                .map_err(|e| err(chain(&e)))?;
            out.push(c.data.clone());
        }
        Ok(out)
    }

    /// The commits reachable from `head` and from none of `hidden` (as `git rev-list head
    /// ^hidden...`), newest first, as full ids. A hidden commit the mirror does not have hides
    /// nothing: the walk is then longer, never shorter.
    pub fn commits_since(&self, head: &str, hidden: &[String]) -> Result<Vec<String>, GitError> {
        let repo = self.open_repo()?;
        let err = |message: String| GitError::Read {
            url: self.shown_url(),
            what: format!("the commits of {head}"),
            message,
        };
        let tip = repo.rev_parse_single(head).map_err(|e| err(chain(&e)))?.detach();
        let hidden: Vec<gix::ObjectId> = hidden
            .iter()
            .filter_map(|h| repo.rev_parse_single(h.as_str()).ok().map(|id| id.detach()))
            .collect();
        let walk = repo
            .rev_walk([tip])
            .with_hidden(hidden)
            .all()
            .map_err(|e| err(chain(&e)))?;
        let mut out = Vec::new();
        for info in walk {
            out.push(info.map_err(|e| err(chain(&e)))?.id.to_string());
        }
        Ok(out)
    }

    /// Whether `ancestor` is in the history of `commit` (itself included). A commit the mirror
    /// no longer has (dropped by a force-push and pruned) is in no history.
    pub fn is_ancestor(&self, ancestor: &str, commit: &str) -> Result<bool, GitError> {
        if ancestor == commit {
            return Ok(true);
        }
        let repo = self.open_repo()?;
        if repo.rev_parse_single(ancestor).is_err() {
            return Ok(false);
        }
        Ok(self.commits_since(ancestor, &[commit.to_string()])?.is_empty())
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
            vec!["Authorization: Basic eC1hY2Nlc3MtdG9rZW46czNjcmV0LXRva2Vu".to_string()]
        );
    }
}
