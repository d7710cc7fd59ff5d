//! What a repository may hold. A pull request brings whatever files it likes; the daemon reads
//! them into memory, so a file and the whole repository have a size limit, checked before
//! anything is parsed. Sources ([`crate::source`]) apply the same [`SizeBudget`] while reading,
//! so an oversized file is never read at all: it is listed in `RepoFiles::oversized` instead,
//! and loading reports it at its path like any other mistake.

use super::Loader;
use crate::model::diag::{Diagnostic, Location};

/// The largest file driftless reads from a repository (cluster.yaml, a node file, an ADR, a
/// template). Real ones are a few KiB.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The most the files driftless reads may add up to in one repository (files over
/// [`MAX_FILE_BYTES`] are not counted: they are not read).
pub const MAX_REPO_BYTES: u64 = 16 * 1024 * 1024;

/// What to do with the next file, in path order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Read,
    /// Over [`MAX_FILE_BYTES`].
    FileTooLarge,
    /// The files before it (and this one) add up to more than [`MAX_REPO_BYTES`]: from here
    /// on, nothing more is read.
    RepositoryFull,
}

/// The running total of a repository's files, visited in path order (sources and loading visit
/// them in the same order, so they agree on which file crossed the limit).
#[derive(Debug, Default)]
pub struct SizeBudget {
    total: u64,
    full: bool,
}

impl SizeBudget {
    pub fn admit(&mut self, size: u64) -> Admit {
        if self.full {
            return Admit::RepositoryFull;
        }
        if size > MAX_FILE_BYTES {
            return Admit::FileTooLarge;
        }
        self.total += size;
        if self.total > MAX_REPO_BYTES {
            self.full = true;
            return Admit::RepositoryFull;
        }
        Admit::Read
    }
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

impl Loader<'_> {
    /// The first phase: every file over the limits, at its path. `true` when one was found:
    /// loading stops there, so a huge repository costs nothing more than this.
    pub(super) fn check_sizes(&mut self) -> bool {
        let mut sizes: Vec<(&str, u64)> = self
            .files
            .files
            .iter()
            .map(|(path, bytes)| (path.as_str(), bytes.len() as u64))
            .chain(self.files.oversized.iter().map(|(path, size)| (path.as_str(), *size)))
            .collect();
        sizes.sort();
        let mut found = false;
        for path in &self.files.links {
            found = true;
            self.diags.push(
                Diagnostic::new(
                    Location::file_start(path),
                    "a symbolic link: driftless reads regular files only, and does not follow it",
                )
                .hint("commit the file itself in its place"),
            );
        }
        let mut budget = SizeBudget::default();
        for (path, size) in sizes {
            match budget.admit(size) {
                Admit::Read => {}
                Admit::FileTooLarge => {
                    found = true;
                    self.diags.push(
                        Diagnostic::new(
                            Location::file_start(path),
                            format!(
                                "file too large: {size} bytes (a repository file may have at most {} MiB)",
                                mib(MAX_FILE_BYTES)
                            ),
                        )
                        .hint("driftless reads cluster.yaml, nodes/, adr/ and templates/; keep large files elsewhere"),
                    );
                }
                Admit::RepositoryFull => {
                    self.diags.push(Diagnostic::new(
                        Location::file_start(path),
                        format!(
                            "repository too large: with this file, the files driftless reads add up to \
                             more than {} MiB",
                            mib(MAX_REPO_BYTES)
                        ),
                    ));
                    found = true;
                    // Nothing after this file was read; there is nothing more to say about it.
                    break;
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{loader, repo, said};
    use super::*;
    use crate::model::LoadOptions;

    #[test]
    fn the_budget_refuses_large_files_and_stops_when_the_repository_is_full() {
        let mut budget = SizeBudget::default();
        assert_eq!(budget.admit(MAX_FILE_BYTES), Admit::Read);
        assert_eq!(budget.admit(MAX_FILE_BYTES + 1), Admit::FileTooLarge);
        for _ in 1..16 {
            assert_eq!(budget.admit(MAX_FILE_BYTES), Admit::Read);
        }
        assert_eq!(budget.admit(1), Admit::RepositoryFull);
        assert_eq!(budget.admit(0), Admit::RepositoryFull, "nothing after is read");
    }

    #[test]
    fn a_symbolic_link_is_reported_at_its_path_and_stops_loading() {
        let mut files = repo(&[("cluster.yaml", "name: x\n")]);
        files.links.insert("nodes/k3s-9.yaml".into());
        let opts = LoadOptions::default();
        let mut l = loader(&files, &opts);
        assert!(l.check_sizes());
        assert_eq!(
            said(&l.diags),
            ["nodes/k3s-9.yaml:1:1: a symbolic link: driftless reads regular files only, and does not follow it"]
        );
    }

    #[test]
    fn an_oversized_file_is_reported_at_its_path_and_stops_loading() {
        let mut files = repo(&[("cluster.yaml", "name: x\n"), ("nodes/a.yaml", "name: a\n")]);
        files.insert("nodes/big.yaml", vec![b'#'; MAX_FILE_BYTES as usize + 1]);
        files.oversized.insert("templates/lxc.conf.j2".into(), 2 << 30);
        let opts = LoadOptions::default();
        let mut l = loader(&files, &opts);
        assert!(l.check_sizes());
        assert_eq!(
            said(&l.diags),
            [
                "nodes/big.yaml:1:1: file too large: 1048577 bytes (a repository file may have at most 1 MiB)",
                "templates/lxc.conf.j2:1:1: file too large: 2147483648 bytes (a repository file may have at most 1 MiB)",
            ]
        );
        let err = crate::model::load(&files, &opts).unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
    }

    #[test]
    fn the_file_that_fills_the_repository_is_named() {
        let mut files = repo(&[("cluster.yaml", "name: x\n")]);
        for i in 0..17 {
            files.insert(format!("nodes/n{i:02}.yaml"), vec![b'#'; MAX_FILE_BYTES as usize]);
        }
        let opts = LoadOptions::default();
        let mut l = loader(&files, &opts);
        assert!(l.check_sizes());
        assert_eq!(
            said(&l.diags),
            [
                "nodes/n15.yaml:1:1: repository too large: with this file, the files driftless reads add up to more than 16 MiB"
            ]
        );
    }
}
