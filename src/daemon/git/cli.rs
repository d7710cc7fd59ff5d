//! The one place the git CLI is run. gix cannot push, so the status branch is made and pushed
//! with `git`; every such run goes through [`GitCli::run`]: argv (no shell), a fixed
//! environment (no prompts, no hooks, driftless's identity, `LC_ALL=C` so messages can be
//! matched, the caller's `GIT_DIR`-like variables removed), the auth in the child's
//! environment only, a timeout, and errors that say which command failed and why, without
//! secrets.

use super::auth::AuthSetup;
use super::error::{GitError, display_url, scrub};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The identity of status commits (set through the environment: no git identity needed).
pub const COMMIT_NAME: &str = "driftless";
pub const COMMIT_EMAIL: &str = "driftless@localhost";

/// How many of the last non-empty lines of git's stderr an error keeps.
const STDERR_LINES: usize = 8;

/// What one git CLI run gave.
#[derive(Debug)]
pub(super) struct Output {
    pub(super) status: ExitStatus,
    pub(super) stdout: Vec<u8>,
    /// Already scrubbed of the run's secrets.
    pub(super) stderr: String,
}

impl Output {
    /// stdout as one trimmed line: what `rev-parse`, `hash-object`, `write-tree` print.
    pub(super) fn stdout_line(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

/// Where and how git runs: the repository, the remote it talks to (or is about), the auth for
/// that remote as it is now, and the limit for one command.
pub(super) struct GitCli<'a> {
    /// `GIT_DIR` of every run; its parent is the working directory.
    pub(super) git_dir: PathBuf,
    /// Only for messages (shown without its password).
    pub(super) url: &'a str,
    pub(super) auth: &'a AuthSetup,
    pub(super) timeout: Duration,
}

impl GitCli<'_> {
    /// Run `git ARGS` and wait for it (or the timeout). A non-zero exit is not an error here:
    /// callers that expect one (`ls-remote --exit-code`, a rejected push) look at the status.
    pub(super) fn run(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        env: &[(&str, OsString)],
    ) -> Result<Output, GitError> {
        let setup = self.auth;
        let shown = || scrub(&format!("git {}", args.join(" ")), &setup.secrets);
        let mut cmd = Command::new("git");
        cmd.args(args);
        // Variables of our own environment that would point git at another repository, index
        // or configuration.
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
        cmd.env("GIT_DIR", &self.git_dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GCM_INTERACTIVE", "never")
            .env("LC_ALL", "C")
            .env("GIT_AUTHOR_NAME", COMMIT_NAME)
            .env("GIT_AUTHOR_EMAIL", COMMIT_EMAIL)
            .env("GIT_COMMITTER_NAME", COMMIT_NAME)
            .env("GIT_COMMITTER_EMAIL", COMMIT_EMAIL)
            .current_dir(self.git_dir.parent().unwrap_or(Path::new("/")));
        if let Some(ssh) = &setup.ssh_command {
            cmd.env("GIT_SSH_COMMAND", ssh).env("GIT_SSH_VARIANT", "ssh");
        }
        // Config through the environment, not argv: the token header must not show in /proc.
        // `ssh.variant` is for gix; the CLI gets `GIT_SSH_VARIANT` above.
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
        // stdin, stdout and stderr each on a thread: git may block writing one pipe while we
        // block on another.
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
                        url: display_url(self.url),
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

    /// [`GitCli::run`], with a non-zero exit as an error.
    pub(super) fn run_ok(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        env: &[(&str, OsString)],
    ) -> Result<Output, GitError> {
        let out = self.run(args, stdin, env)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(self.failure(args, &out, None))
        }
    }

    /// The error for a run of `git ARGS` that failed: the command, its status and the end of
    /// its stderr, after `reason` when the caller knows better (a push's rejection reason).
    pub(super) fn failure(&self, args: &[&str], out: &Output, reason: Option<&str>) -> GitError {
        let secrets = &self.auth.secrets;
        // The end of git's stderr says what went wrong (ssh prints banners before it).
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .collect();
        let mut stderr = lines[lines.len().saturating_sub(STDERR_LINES)..].join("\n");
        if let Some(r) = reason {
            stderr = format!("{r}; {stderr}");
        }
        GitError::Command {
            url: display_url(self.url),
            command: scrub(&format!("git {}", args.join(" ")), secrets),
            status: out.status.to_string(),
            stderr: scrub(&stderr, secrets),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    const URL: &str = "https://bob:pw@git.example/r.git";
    const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// A runner on a fresh bare repository in `dir`.
    fn runner<'a>(dir: &Path, auth: &'a AuthSetup, timeout: Duration) -> GitCli<'a> {
        let git_dir = dir.join("scratch.git");
        std::fs::create_dir_all(&git_dir).unwrap();
        let cli = GitCli {
            git_dir,
            url: URL,
            auth,
            timeout,
        };
        cli.run_ok(&["init", "--bare", "-q"], None, &[]).unwrap();
        cli
    }

    #[test]
    fn git_runs_with_a_fixed_environment_that_carries_the_auth() {
        let dir = tempfile::tempdir().unwrap();
        let auth = AuthSetup {
            config: vec![
                ("http.extraHeader".into(), "Authorization: Basic c2VjcmV0".into()),
                ("ssh.variant".into(), "ssh".into()),
            ],
            ssh_command: Some("ssh -o BatchMode=yes".into()),
            secrets: vec![],
        };
        let git = runner(dir.path(), &auth, DEFAULT_TEST_TIMEOUT);
        let line = |args: &[&str], env: &[(&str, OsString)]| git.run_ok(args, None, env).unwrap().stdout_line();

        assert!(
            line(&["var", "GIT_COMMITTER_IDENT"], &[]).starts_with("driftless <driftless@localhost> "),
            "status commits need no git identity"
        );
        assert_eq!(line(&["config", "--get", "core.hooksPath"], &[]), "/dev/null");
        assert_eq!(
            line(&["config", "--get", "http.extraHeader"], &[]),
            "Authorization: Basic c2VjcmV0"
        );
        // ssh.variant is gix's; the CLI is told through GIT_SSH_VARIANT.
        let variant = git.run(&["config", "--get", "ssh.variant"], None, &[]).unwrap();
        assert_eq!(variant.status.code(), Some(1), "{}", variant.stderr);
        let printenv = "alias.env=!printenv GIT_SSH_COMMAND GIT_SSH_VARIANT GIT_TERMINAL_PROMPT LC_ALL GIT_INDEX_FILE";
        assert_eq!(
            line(&["-c", printenv, "env"], &[("GIT_INDEX_FILE", "/tmp/idx".into())]),
            "ssh -o BatchMode=yes\nssh\n0\nC\n/tmp/idx"
        );
        // stdin reaches git.
        let blob = git.run_ok(&["hash-object", "--stdin"], Some(b"hello\n"), &[]).unwrap();
        assert_eq!(blob.stdout_line(), "ce013625030ba8dba906f756967f9e9ca394464a");
    }

    #[test]
    fn a_failure_names_the_command_and_ends_with_gits_words_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let auth = AuthSetup {
            secrets: vec!["s3cret".into()],
            ..AuthSetup::default()
        };
        let git = runner(dir.path(), &auth, DEFAULT_TEST_TIMEOUT);
        let err = git
            .run_ok(&["rev-parse", "--verify", "s3cret-tip"], None, &[])
            .unwrap_err();
        let GitError::Command {
            url,
            command,
            status,
            stderr,
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(url, "https://bob:<redacted>@git.example/r.git");
        assert_eq!(command, "git rev-parse --verify <redacted>-tip");
        assert_eq!(status, "exit status: 128");
        assert!(stderr.starts_with("fatal: "), "{stderr}");
        let text = err.to_string();
        assert!(!text.contains("s3cret") && !text.contains(":pw@"), "{text}");
    }

    #[test]
    fn a_failure_keeps_the_reason_and_the_last_lines_of_stderr() {
        let auth = AuthSetup::default();
        let git = GitCli {
            git_dir: PathBuf::from("/nonexistent"),
            url: URL,
            auth: &auth,
            timeout: DEFAULT_TEST_TIMEOUT,
        };
        let stderr: String = (1..=20).map(|i| format!("line {i}\n\n")).collect();
        let out = Output {
            status: ExitStatus::from_raw(1 << 8),
            stdout: vec![],
            stderr,
        };
        let GitError::Command { stderr, status, .. } = git.failure(&["push"], &out, Some("fetch first")) else {
            panic!("not a command error");
        };
        let kept: Vec<String> = (13..=20).map(|i| format!("line {i}")).collect();
        assert_eq!(stderr, format!("fetch first; {}", kept.join("\n")));
        assert_eq!(status, "exit status: 1");
    }

    #[test]
    fn a_command_that_outlives_the_timeout_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let auth = AuthSetup::default();
        let mut git = runner(dir.path(), &auth, DEFAULT_TEST_TIMEOUT);
        git.timeout = Duration::from_millis(200);
        let started = Instant::now();
        let err = git.run(&["-c", "alias.nap=!sleep 5", "nap"], None, &[]).unwrap_err();
        assert!(matches!(err, GitError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    }
}
