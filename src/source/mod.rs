//! Sources: read an infrastructure repository from a directory (uncommitted edits included)
//! or from a git commit's tree (gix, no checkout), local or remote.
//!
//! Both apply the size limits of `crate::model::limits` before reading a file: its size is
//! known first (file metadata, the git object's header), and a file over the limits is listed in
//! `RepoFiles::oversized` without being read, so a pull request's 2 GiB blob costs nothing;
//! loading reports it.

use crate::model::RepoFiles;
use crate::model::limits::{Admit, MAX_FILE_BYTES, SizeBudget};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot open git repository {repo}: {message}")]
    Open { repo: String, message: String },
    #[error("cannot fetch {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("cannot resolve revision `{rev}` in {repo}: {message}")]
    Revision { repo: String, rev: String, message: String },
    #[error("cannot read the tree of {rev} in {repo}: {message}")]
    Tree { repo: String, rev: String, message: String },
}

/// Where a repository comes from, as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoSpec {
    Dir(PathBuf),
    Git { repo: String, rev: Option<String> },
}

/// A URL (`https://`, `ssh://`, `file://`, `git@host:path`) is read from git; a path without a
/// revision is read as a directory, with a revision from git.
pub fn classify(repo: &str, rev: Option<&str>) -> RepoSpec {
    let is_url = repo.contains("://") || (repo.contains('@') && repo.contains(':') && !Path::new(repo).exists());
    if is_url || rev.is_some() {
        RepoSpec::Git {
            repo: repo.to_string(),
            rev: rev.map(str::to_string),
        }
    } else {
        RepoSpec::Dir(PathBuf::from(repo))
    }
}

pub fn read(spec: &RepoSpec) -> Result<RepoFiles, SourceError> {
    match spec {
        RepoSpec::Dir(p) => read_dir(p),
        RepoSpec::Git { repo, rev } => read_git(repo, rev.as_deref()),
    }
}

/// Read the files driftless uses from a directory.
pub fn read_dir(root: &Path) -> Result<RepoFiles, SourceError> {
    if !root.is_dir() {
        return Err(SourceError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    let mut files = RepoFiles::new(root.display().to_string());
    // Relevant files and their sizes first: they are read in path order, as from git, so the
    // size budget stops at the same file whichever way the repository is read.
    let mut found: Vec<(String, PathBuf, u64)> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| SourceError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| SourceError::Io {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let ty = entry.file_type().map_err(|source| SourceError::Io {
                path: path.clone(),
                source,
            })?;
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .replace('\\', "/");
            if ty.is_dir() {
                if !matches!(entry.file_name().to_str(), Some(".git" | "target" | "node_modules")) {
                    stack.push(path);
                }
            } else if ty.is_symlink() && RepoFiles::is_relevant(&rel) {
                // Never followed, never read: reported by the loader.
                files.links.insert(rel);
            } else if RepoFiles::is_relevant(&rel) {
                let size = std::fs::metadata(&path)
                    .map(|m| m.len())
                    .map_err(|source| SourceError::Io {
                        path: path.clone(),
                        source,
                    })?;
                found.push((rel, path, size));
            }
        }
    }
    found.sort();
    let mut budget = SizeBudget::default();
    for (rel, path, size) in found {
        if budget.admit(size) != Admit::Read {
            files.oversized.insert(rel, size);
            continue;
        }
        // Never more than the limit, whatever the metadata said: a file that grew since, or a
        // link to a device (/dev/zero has no length), is cut there and reported.
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|source| SourceError::Io {
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            files.oversized.insert(rel, bytes.len() as u64);
        } else {
            files.insert(rel, bytes);
        }
    }
    Ok(files)
}

/// Read the files driftless uses from a commit's tree. A URL is fetched into a temporary
/// bare repository first; a local path is opened where it is.
pub fn read_git(repo: &str, rev: Option<&str>) -> Result<RepoFiles, SourceError> {
    let is_local = !repo.contains("://") && Path::new(repo).exists();
    let _tmp;
    // A directory inside a work tree (examples/homelab-k3s in a bigger repository) reads that
    // directory's subtree of the commit, as the directory itself would read.
    let mut subdir = PathBuf::new();
    let repository = if is_local {
        let r = gix::discover(repo).map_err(|e| SourceError::Open {
            repo: repo.into(),
            message: e.to_string(),
        })?;
        if let (Some(workdir), Ok(given)) = (r.workdir(), Path::new(repo).canonicalize())
            && let Ok(rel) = given.strip_prefix(workdir.canonicalize().unwrap_or_else(|_| workdir.to_path_buf()))
        {
            subdir = rel.to_path_buf();
        }
        r
    } else {
        let tmp = tempfile::tempdir().map_err(|source| SourceError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let fetch_err = |e: &dyn std::fmt::Display| SourceError::Fetch {
            url: repo.into(),
            message: e.to_string(),
        };
        let mut prepare = gix::prepare_clone_bare(repo, tmp.path()).map_err(|e| fetch_err(&e))?;
        let (repository, _) = prepare
            .fetch_only(gix::progress::Discard, &AtomicBool::new(false))
            .map_err(|e| fetch_err(&e))?;
        _tmp = tmp;
        repository
    };
    let subdir = (!subdir.as_os_str().is_empty()).then_some(subdir.as_path());
    files_at_named(&repository, repo, rev.unwrap_or("HEAD"), subdir)
}

/// Read the files driftless uses from the tree of `rev` (a commit id, branch or any revision
/// gix resolves) in an open repository, or from the subtree `subdir` of that commit.
pub fn files_at(repo: &gix::Repository, rev: &str, subdir: Option<&Path>) -> Result<RepoFiles, SourceError> {
    files_at_named(repo, &repo.path().display().to_string(), rev, subdir)
}

/// [`files_at`], naming the repository `repo` (a URL, say) in messages and in the files' origin.
pub fn files_at_named(
    repository: &gix::Repository,
    repo: &str,
    rev: &str,
    subdir: Option<&Path>,
) -> Result<RepoFiles, SourceError> {
    let id = repository.rev_parse_single(rev).map_err(|e| SourceError::Revision {
        repo: repo.into(),
        rev: rev.into(),
        message: e.to_string(),
    })?;
    let tree_err = |e: &dyn std::fmt::Display| SourceError::Tree {
        repo: repo.into(),
        rev: rev.into(),
        message: e.to_string(),
    };
    let commit = id
        .object()
        .map_err(|e| tree_err(&e))?
        .peel_to_commit()
        .map_err(|e| tree_err(&e))?;
    let mut tree = commit.tree().map_err(|e| tree_err(&e))?;
    if let Some(subdir) = subdir.filter(|s| !s.as_os_str().is_empty()) {
        let entry = tree
            .peel_to_entry_by_path(subdir)
            .map_err(|e| tree_err(&e))?
            .ok_or_else(|| tree_err(&format!("{} is not in that commit", subdir.display())))?;
        tree = repository.find_tree(entry.oid()).map_err(|e| tree_err(&e))?;
    }
    let mut recorder = gix::traverse::tree::Recorder::default();
    tree.traverse().breadthfirst(&mut recorder).map_err(|e| tree_err(&e))?;
    let mut files = RepoFiles::new(format!("{repo} @ {rev} ({})", commit.id().to_hex_with_len(12)));
    files.links = recorder
        .records
        .iter()
        .filter(|entry| entry.mode.is_link())
        .map(|entry| entry.filepath.to_string())
        .filter(|path| RepoFiles::is_relevant(path))
        .collect();
    let mut relevant: Vec<(String, gix::ObjectId)> = recorder
        .records
        .into_iter()
        .filter(|entry| entry.mode.is_blob())
        .map(|entry| (entry.filepath.to_string(), entry.oid))
        .filter(|(path, _)| RepoFiles::is_relevant(path))
        .collect();
    relevant.sort();
    let mut budget = SizeBudget::default();
    for (path, oid) in relevant {
        // The object's header tells its size without inflating it.
        let size = repository.find_header(oid).map_err(|e| tree_err(&e))?.size();
        if budget.admit(size) != Admit::Read {
            files.oversized.insert(path, size);
            continue;
        }
        let object = repository.find_object(oid).map_err(|e| tree_err(&e))?;
        files.insert(path, object.data.clone());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::limits::MAX_FILE_BYTES;
    use std::process::Command;

    #[test]
    fn a_directory_lists_files_over_the_limit_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.yaml"), "name: x\n").unwrap();
        std::fs::create_dir(dir.path().join("nodes")).unwrap();
        // Sparse: 2 GiB long, no blocks on disk. Reading it would allocate 2 GiB.
        let big = std::fs::File::create(dir.path().join("nodes/big.yaml")).unwrap();
        big.set_len(2 << 30).unwrap();
        let files = read_dir(dir.path()).unwrap();
        assert_eq!(files.oversized.get("nodes/big.yaml"), Some(&(2 << 30)));
        assert!(!files.files.contains_key("nodes/big.yaml"));
        assert!(files.files.contains_key("cluster.yaml"));
    }

    #[test]
    fn a_link_is_listed_and_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nodes")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("nodes/zero.yaml")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("nodes/k3s-9.yaml")).unwrap();
        let files = read_dir(dir.path()).unwrap();
        assert!(files.files.is_empty() && files.oversized.is_empty());
        assert_eq!(
            files.links.iter().collect::<Vec<_>>(),
            ["nodes/k3s-9.yaml", "nodes/zero.yaml"]
        );
    }

    #[test]
    fn a_growing_file_is_cut_at_the_limit() {
        // A FIFO has no length in its metadata: what it gives is cut at the limit, as a file
        // that grew since it was listed would be.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nodes")).unwrap();
        let fifo = dir.path().join("nodes/fifo.yaml");
        assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            let chunk = vec![b'a'; 64 * 1024];
            while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
        });
        let files = read_dir(dir.path()).unwrap();
        assert_eq!(files.oversized.get("nodes/fifo.yaml"), Some(&(MAX_FILE_BYTES + 1)));
        drop(files);
        writer.join().unwrap();
    }

    #[test]
    fn a_commit_lists_blobs_over_the_limit_without_inflating_them() {
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .current_dir(dir.path())
                .args(args)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@driftless.invalid")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@driftless.invalid")
                .output()
                .expect("the git CLI runs");
            assert!(
                out.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        git(&["init", "-q"]);
        std::fs::write(dir.path().join("cluster.yaml"), "name: x\n").unwrap();
        std::fs::create_dir(dir.path().join("templates")).unwrap();
        std::fs::write(
            dir.path().join("templates/lxc.conf.j2"),
            vec![b'x'; MAX_FILE_BYTES as usize + 1],
        )
        .unwrap();
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "big"]);
        let repo = gix::open(dir.path()).unwrap();
        let files = files_at(&repo, "HEAD", None).unwrap();
        assert_eq!(
            files.oversized.get("templates/lxc.conf.j2"),
            Some(&(MAX_FILE_BYTES + 1))
        );
        assert!(!files.files.contains_key("templates/lxc.conf.j2"));
        assert!(files.files.contains_key("cluster.yaml"));
    }
}
