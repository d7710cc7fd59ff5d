//! Helpers shared by the integration tests: run the built binary, copy repositories, apply
//! overlays. Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The crate root (where Cargo.toml is).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One of the repositories under examples/.
pub fn example(name: &str) -> PathBuf {
    root().join("examples").join(name)
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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_driftless"));
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
