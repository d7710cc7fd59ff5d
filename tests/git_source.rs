//! Reading a repository from git, driven by the real git CLI: a working directory, a
//! revision of it, a file:// URL (fetched with gix) and a bare clone all give the same
//! render; `--rev` ignores uncommitted edits and reads older commits; a bad revision is an
//! error that names it.

use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "driftless tests")
        .env("GIT_AUTHOR_EMAIL", "tests@driftless.invalid")
        .env("GIT_COMMITTER_NAME", "driftless tests")
        .env("GIT_COMMITTER_EMAIL", "tests@driftless.invalid")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("the git CLI runs (install git to run these tests)");
    assert!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A git repository holding examples/homelab-k3s, committed once on `main`.
fn committed_example() -> tempfile::TempDir {
    let repo = testkit::temp_copy("homelab-k3s");
    git(repo.path(), &["-c", "init.defaultBranch=main", "init", "-q"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "The seed homelab"]);
    repo
}

/// `driftless --repo REPO [--rev REV] render`: every artifact of every node.
fn render(repo: &str, rev: Option<&str>) -> String {
    let mut args = vec!["--repo", repo];
    if let Some(r) = rev {
        args.extend(["--rev", r]);
    }
    args.push("render");
    let r = testkit::run(&args);
    r.expect_code(0, &format!("render {args:?}"));
    assert!(!r.stdout.is_empty());
    r.stdout
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

#[test]
fn every_way_of_reading_the_same_commit_renders_the_same() {
    let repo = committed_example();
    let dir = path_str(repo.path());
    let on_disk = render(dir, None);
    // The committed copy renders exactly what the example does.
    assert_eq!(on_disk, render(path_str(&testkit::example("homelab-k3s")), None));

    assert_eq!(render(dir, Some("HEAD")), on_disk, "--rev HEAD");
    assert_eq!(render(dir, Some("main")), on_disk, "--rev main");
    let commit = git(repo.path(), &["rev-parse", "HEAD"]);
    assert_eq!(render(dir, Some(commit.trim())), on_disk, "--rev <commit id>");
    let url = format!("file://{dir}");
    assert_eq!(render(&url, None), on_disk, "--repo {url}");
    assert_eq!(render(&url, Some("main")), on_disk, "--repo {url} --rev main");

    // A bare clone has no working directory: read by path, with a revision.
    let bare_parent = tempfile::tempdir().expect("temp dir");
    let bare = bare_parent.path().join("homelab.git");
    git(bare_parent.path(), &["clone", "-q", "--bare", dir, path_str(&bare)]);
    assert_eq!(render(path_str(&bare), Some("main")), on_disk, "bare clone --rev main");
}

#[test]
fn rev_reads_the_commit_not_the_working_directory() {
    let repo = committed_example();
    let dir = path_str(repo.path());
    let committed = render(dir, Some("HEAD"));
    testkit::write(
        repo.path(),
        "nodes/k3s-worker-1.yaml",
        "vmid: 101\nproxmox_node: pve\nkind: lxc\nrole: agent\naddress: 192.168.2.21/24\ntags: [uncommitted]\n",
    );
    let on_disk = render(dir, None);
    assert!(
        on_disk.contains("tags: driftless;uncommitted\n"),
        "the directory is read as it is on disk:\n{on_disk}"
    );
    assert_eq!(
        render(dir, Some("HEAD")),
        committed,
        "--rev HEAD ignores the uncommitted edit"
    );
    let url = format!("file://{dir}");
    assert_eq!(
        render(&url, None),
        committed,
        "a URL reads the commit, never the working directory"
    );
}

#[test]
fn an_older_commit_is_readable() {
    let repo = committed_example();
    let dir = path_str(repo.path());
    let first = render(dir, None);
    testkit::write(
        repo.path(),
        "nodes/k3s-worker-2.yaml",
        "vmid: 102\nproxmox_node: pve\nkind: lxc\nrole: agent\naddress: 192.168.2.22/24\nvlan: 20\n",
    );
    git(
        repo.path(),
        &["commit", "-q", "-a", "-m", "Move k3s-worker-2 to VLAN 20"],
    );
    let second = render(dir, Some("HEAD"));
    assert!(second.contains(",tag=20,"), "{second}");
    assert_ne!(first, second);
    assert_eq!(render(dir, Some("HEAD~1")), first, "--rev HEAD~1");
    assert_eq!(render(dir, Some("main~1")), first, "--rev main~1");
    let url = format!("file://{dir}");
    assert_eq!(render(&url, Some("HEAD~1")), first, "--repo file://... --rev HEAD~1");
    // A tag works like any revision.
    git(repo.path(), &["tag", "seed", "HEAD~1"]);
    assert_eq!(render(dir, Some("seed")), first, "--rev seed (a tag)");
}

#[test]
fn a_revision_that_does_not_exist_is_named_in_the_error() {
    let repo = committed_example();
    let dir = path_str(repo.path());
    for rev in ["no-such-branch", "HEAD~5"] {
        let r = testkit::run(["--repo", dir, "--rev", rev, "validate"]);
        r.expect_code(1, &format!("--rev {rev}"));
        assert!(r.stdout.is_empty(), "{}", r.stdout);
        assert!(
            r.stderr.contains(&format!("`{rev}`")),
            "the error names the revision: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
    // A URL that cannot be fetched is an error too, not a panic.
    let missing = format!("file://{dir}/no-such-repo");
    let r = testkit::run(["--repo", &missing, "validate"]);
    r.expect_code(1, "an unreachable URL");
    assert!(r.stderr.contains("no-such-repo"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn validation_errors_from_git_point_at_repository_paths() {
    let repo = committed_example();
    let dir = path_str(repo.path());
    testkit::write(
        repo.path(),
        "nodes/k3s-worker-1.yaml",
        "vmid: 101\nproxmox_node: pve\nkind: lxc\nrole: agent\naddress: 192.168.2.21/24\ncors: 2\n",
    );
    git(repo.path(), &["commit", "-q", "-a", "-m", "A typo"]);
    let r = testkit::run(["--repo", dir, "--rev", "HEAD", "validate"]);
    r.expect_code(1, "a broken commit");
    assert!(
        r.stderr
            .starts_with("nodes/k3s-worker-1.yaml:6:1: error: unknown key `cors`"),
        "{}",
        r.stderr
    );
    // The previous commit is still valid.
    testkit::run(["--repo", dir, "--rev", "HEAD~1", "validate"]).expect_code(0, "HEAD~1");
}

#[test]
fn a_directory_inside_a_bigger_repository_reads_its_own_subtree() {
    let outer = tempfile::tempdir().unwrap();
    let inner = outer.path().join("infra/homelab");
    testkit::copy_dir(&testkit::example("homelab-k3s"), &inner);
    git(outer.path(), &["-c", "init.defaultBranch=main", "init", "-q"]);
    git(outer.path(), &["add", "-A"]);
    git(outer.path(), &["commit", "-q", "-m", "homelab under infra/"]);
    let from_dir = render(path_str(&inner), None);
    assert_eq!(render(path_str(&inner), Some("HEAD")), from_dir);
    assert_eq!(render(path_str(&inner), Some("main")), from_dir);
}
