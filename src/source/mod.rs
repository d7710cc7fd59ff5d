//! Sources: read an infrastructure repository from a directory (uncommitted edits included)
//! or from a git commit's tree (gix, no checkout), local or remote.

use crate::model::RepoFiles;
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
            } else if RepoFiles::is_relevant(&rel) {
                let bytes = std::fs::read(&path).map_err(|source| SourceError::Io {
                    path: path.clone(),
                    source,
                })?;
                files.insert(rel, bytes);
            }
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
    for entry in recorder.records {
        let path = entry.filepath.to_string();
        if entry.mode.is_blob() && RepoFiles::is_relevant(&path) {
            let object = repository.find_object(entry.oid).map_err(|e| tree_err(&e))?;
            files.insert(path, object.data.clone());
        }
    }
    Ok(files)
}
