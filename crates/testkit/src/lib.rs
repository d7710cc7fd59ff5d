//! What driftless's integration tests and benchmarks share: the built binaries, copies of the
//! example repositories, the real git CLI, an OpenSSH server on loopback ([`sshd`]), the
//! sandbox with its simulated cluster ([`cluster_env`]), a whole daemon setup
//! ([`daemon_env`]) and generated repositories of any size ([`generate`]).

pub mod cluster_env;
pub mod daemon_env;
pub mod generate;
pub mod sshd;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The repository root (the product's Cargo.toml, examples/, tests/).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// One of the repositories under examples/.
pub fn example(name: &str) -> PathBuf {
    root().join("examples").join(name)
}

/// A binary of the workspace, built beside the test executable (`target/<profile>/NAME`):
/// `cargo test --workspace` builds `driftless` and `driftless-sandbox` before running tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    // target/<profile>/deps/<test>-<hash>, or target/<profile>/<bench> for benchmarks.
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect::<Vec<_>>();
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} is not built next to {} (run the tests with `cargo test --workspace`, or `cargo build --workspace` first)",
            exe.display()
        )
    })
}

/// The product binary.
pub fn driftless_bin() -> PathBuf {
    bin("driftless")
}

/// The sandbox binary (`driftless-sandbox pct`, `serve`, `demo`).
pub fn sandbox_bin() -> PathBuf {
    bin("driftless-sandbox")
}

/// `driftless-sandbox pct --state DIR`: the `pct` of a sandbox's host, as one command line
/// (DRIFTLESS_PCT_COMMAND).
pub fn pct_command(state: &Path) -> String {
    format!("{} pct --state {}", sandbox_bin().display(), state.display())
}

/// The real git CLI in `dir`, with a fixed identity and no user or system config; panics with
/// git's stderr when it fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_command(dir).args(args).output().expect("git runs");
    assert!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `git` that may fail (e.g. `show` of a file not there yet).
pub fn git_try(dir: &Path, args: &[&str]) -> Option<String> {
    let out = git_command(dir).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// A `git` command in `dir` as the tests run it.
pub fn git_command(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_AUTHOR_NAME", "homelab operator")
        .env("GIT_AUTHOR_EMAIL", "operator@homelab.invalid")
        .env("GIT_COMMITTER_NAME", "homelab operator")
        .env("GIT_COMMITTER_EMAIL", "operator@homelab.invalid")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    cmd
}

/// A TCP port on loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Poll `f` every 100 ms until it gives a value or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// A child process killed (and reaped) when the test lets go of it.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panic with everything the run printed unless it exited with `code`.
    pub fn expect_code(&self, code: i32, what: &str) -> &Run {
        assert_eq!(
            self.code, code,
            "{what}: exit code {} (wanted {code})\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\n--- stderr\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// A `driftless` command with a clean environment (no DRIFTLESS_* from the caller's shell).
pub fn command() -> Command {
    let mut cmd = Command::new(driftless_bin());
    cmd.env_remove("DRIFTLESS_REPO").env_remove("DRIFTLESS_REV");
    cmd
}

/// Run `driftless ARGS...`.
pub fn run<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = command().args(args).output().expect("the driftless binary runs");
    Run::from_output(out)
}

/// Run `driftless --repo REPO ARGS...`.
pub fn run_repo<I, S>(repo: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = command()
        .arg("--repo")
        .arg(repo)
        .args(args)
        .output()
        .expect("the driftless binary runs");
    Run::from_output(out)
}

/// Copy a directory tree (files and directories only).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let entry = entry.expect("directory entry");
        let ty = entry.file_type().expect("file type");
        let dest = to.join(entry.file_name());
        if ty.is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest)
                .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", entry.path().display(), dest.display()));
        }
    }
}

/// A temporary copy of an example repository.
pub fn temp_copy(example_name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_dir(&example(example_name), dir.path());
    dir
}

/// Files of an overlay directory that are not repository files: the case's own metadata.
pub const OVERLAY_META: &[&str] = &["expect", "DELETE"];

/// Apply an overlay onto `repo`: every file of `overlay` (except the metadata files) replaces
/// or adds the file at the same relative path; `overlay/DELETE` lists paths to remove.
pub fn apply_overlay(overlay: &Path, repo: &Path) {
    fn walk(dir: &Path, rel: &Path, repo: &Path) {
        for entry in std::fs::read_dir(dir).expect("read overlay") {
            let entry = entry.expect("overlay entry");
            let name = entry.file_name();
            let rel_path = rel.join(&name);
            if entry.file_type().expect("file type").is_dir() {
                walk(&entry.path(), &rel_path, repo);
            } else if !(rel.as_os_str().is_empty() && OVERLAY_META.iter().any(|m| name == *m)) {
                let dest = repo.join(&rel_path);
                std::fs::create_dir_all(dest.parent().expect("a parent")).expect("create overlay dir");
                std::fs::copy(entry.path(), &dest).expect("copy overlay file");
            }
        }
    }
    walk(overlay, Path::new(""), repo);
    if let Ok(list) = std::fs::read_to_string(overlay.join("DELETE")) {
        for line in list
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let p = repo.join(line);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap_or_else(|e| panic!("DELETE {line}: {e}"));
            } else {
                std::fs::remove_file(&p).unwrap_or_else(|e| panic!("DELETE {line}: {e}"));
            }
        }
    }
}

/// Write `contents` to `repo/rel`, creating directories.
pub fn write(repo: &Path, rel: &str, contents: &str) {
    let p = repo.join(rel);
    std::fs::create_dir_all(p.parent().expect("a parent")).expect("create dir");
    std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// Every file under `dir`, as sorted relative paths with `/`.
pub fn list_files(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let entry = entry.expect("entry");
            let p = entry.path();
            if entry.file_type().expect("file type").is_dir() {
                walk(&p, base, out);
            } else {
                out.push(
                    p.strip_prefix(base)
                        .expect("under base")
                        .to_string_lossy()
                        .replace('\\', "/"),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
