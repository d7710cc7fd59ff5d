//! The status branch: reports are commits on a branch of their own (default
//! [`DEFAULT_STATUS_BRANCH`]), never on a watched branch. gix cannot push, so these commits
//! are made with git plumbing in a private scratch repository next to the mirror (no work
//! tree, a temporary index) and pushed with the git CLI ([`GitCli`]), never forced: when
//! someone else pushed first, the commit is made again on their tip and pushed again.
//! Reading a status file back ([`Mirror::read_status`]) uses the same scratch repository, so
//! it lives here too.

use super::auth::AuthSetup;
use super::cli::{GitCli, Output};
use super::error::{GitError, display_url};
use super::mirror::Mirror;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// The branch status reports are committed to, unless configured otherwise.
pub const DEFAULT_STATUS_BRANCH: &str = "driftless/status";
/// How often a rejected status push is made again on the new tip before giving up.
pub const PUSH_ATTEMPTS: u32 = 5;

/// Refuse a branch name git would refuse (in git's words, roughly `git check-ref-format`), or
/// that could pass for an option: it goes into argv and refspecs.
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

/// Refuse a status file path that could leave the tree or reach into `.git` when the branch
/// is checked out: it goes into `--index-info` and `ls-tree`.
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

/// How one push of a status commit went.
enum PushAttempt {
    /// Pushed this commit.
    Pushed(String),
    /// The branch already holds exactly these files: nothing pushed.
    Unchanged(String),
    /// Someone else updated the branch first: try again on their tip.
    Rejected(String),
}

impl Mirror {
    /// The private scratch repository status commits are made in.
    fn scratch(&self) -> PathBuf {
        self.dir.join("status.git")
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

    /// The git CLI on the scratch repository, with the auth for `url` as it is now (the token
    /// file is read again for each command, as for each fetch).
    fn git(
        &self,
        url: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        env: &[(&str, OsString)],
    ) -> Result<Output, GitError> {
        let auth = self.auth.setup(url)?;
        self.cli(url, &auth).run(args, stdin, env)
    }

    /// [`Mirror::git`], with a non-zero exit as an error.
    fn git_ok(
        &self,
        url: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        env: &[(&str, OsString)],
    ) -> Result<Output, GitError> {
        let auth = self.auth.setup(url)?;
        self.cli(url, &auth).run_ok(args, stdin, env)
    }

    /// The error for a [`Mirror::git`] run whose failure the caller looked at first.
    fn command_error(&self, url: &str, args: &[&str], out: &Output, reason: Option<&str>) -> GitError {
        // The auth is only needed for its secrets here: an unreadable token file must not
        // hide the command's own error.
        let auth = self.auth.setup(url).unwrap_or_default();
        self.cli(url, &auth).failure(args, out, reason)
    }

    /// The runner for the scratch repository.
    fn cli<'a>(&self, url: &'a str, auth: &'a AuthSetup) -> GitCli<'a> {
        GitCli {
            git_dir: self.scratch(),
            url,
            auth,
            timeout: self.timeout,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
