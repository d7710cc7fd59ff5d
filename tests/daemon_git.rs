//! The daemon's git layer against the real git CLI: a bare "forge" repository holding
//! examples/homelab-k3s, fetched into a mirror over file://, git:// (`git daemon` on loopback)
//! and ssh:// (a private `sshd` on loopback, when one can run); status reports committed to
//! `driftless/status` without touching `main`, surviving a concurrent push without force; the
//! https token sent as a header and kept out of errors; and the status report layer.

use driftless::daemon::git::{DEFAULT_STATUS_BRANCH, GitAuth, GitError, Mirror};
use driftless::daemon::status::{self, Outcome, RunKind, StatusReport};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn git_cmd(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "driftless tests")
        .env("GIT_AUTHOR_EMAIL", "tests@driftless.invalid")
        .env("GIT_COMMITTER_NAME", "driftless tests")
        .env("GIT_COMMITTER_EMAIL", "tests@driftless.invalid")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("the git CLI runs (install git to run these tests)")
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_cmd(dir, args);
    assert!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

/// A bare repository `forge/homelab.git` with examples/homelab-k3s on `main`, and the work
/// tree it was pushed from.
struct Forge {
    _root: tempfile::TempDir,
    base: PathBuf,
    bare: PathBuf,
    work: PathBuf,
}

impl Forge {
    fn new() -> Forge {
        let root = tempfile::tempdir().expect("temp dir");
        let base = root.path().join("forge");
        let bare = base.join("homelab.git");
        std::fs::create_dir_all(&base).unwrap();
        git(
            &base,
            &["-c", "init.defaultBranch=main", "init", "-q", "--bare", path_str(&bare)],
        );
        let work = root.path().join("work");
        testkit::copy_dir(&testkit::example("homelab-k3s"), &work);
        git(&work, &["-c", "init.defaultBranch=main", "init", "-q"]);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "The seed homelab"]);
        git(&work, &["push", "-q", path_str(&bare), "main"]);
        Forge {
            _root: root,
            base,
            bare,
            work,
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// A new commit on the work tree's HEAD, pushed to `dst` on the forge.
    fn push_commit(&self, file: &str, contents: &str, dst: &str) -> String {
        std::fs::write(self.work.join(file), contents).unwrap();
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", &format!("change {file}")]);
        git(
            &self.work,
            &["push", "-q", path_str(&self.bare), &format!("HEAD:{dst}")],
        );
        git(&self.work, &["rev-parse", "HEAD"])
    }

    fn rev(&self, rev: &str) -> String {
        git(&self.bare, &["rev-parse", rev])
    }
}

fn mirror(url: &str) -> (tempfile::TempDir, Mirror) {
    let cache = tempfile::tempdir().expect("temp dir");
    let m = Mirror::open_or_init(url, cache.path(), GitAuth::default()).expect("mirror");
    (cache, m.with_timeout(Duration::from_secs(60)))
}

fn heads() -> Vec<String> {
    vec!["+refs/heads/*:refs/heads/*".into()]
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A server process killed when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_mirror_fetches_refs_and_reads_commits_over_file_urls() {
    let forge = Forge::new();
    let (cache, m) = mirror(&forge.url());
    assert!(m.path().starts_with(cache.path()));

    let refs = m.fetch(&heads()).expect("fetch");
    let main = forge.rev("main");
    assert_eq!(refs.get("refs/heads/main"), Some(&main), "{refs:?}");

    // A new push is seen by the next fetch.
    let second = forge.push_commit("NOTES.md", "a note\n", "refs/heads/main");
    let refs = m.fetch(&heads()).expect("fetch again");
    assert_eq!(refs.get("refs/heads/main"), Some(&second));
    assert_ne!(second, main);

    // Pull request branches: matched by pattern, main is not.
    git(&forge.work, &["checkout", "-q", "-b", "pr/1"]);
    let pr = forge.push_commit("nodes/extra-note.txt", "pr\n", "refs/heads/pr/1");
    git(
        &forge.work,
        &["push", "-q", path_str(&forge.bare), "HEAD:refs/pull/7/head"],
    );
    let specs = vec![
        "+refs/heads/*:refs/heads/*".to_string(),
        "refs/pull/*/head".to_string(),
        "refs/merge-requests/*/head".to_string(),
    ];
    let refs = m.fetch(&specs).expect("fetch with pull request patterns");
    assert_eq!(refs.get("refs/heads/pr/1"), Some(&pr));
    assert_eq!(
        m.refs_matching("refs/heads/pr/*").unwrap(),
        vec![("refs/heads/pr/1".to_string(), pr.clone())]
    );
    assert_eq!(
        m.refs_matching("refs/pull/*/head").unwrap(),
        vec![("refs/pull/7/head".to_string(), pr.clone())]
    );
    assert!(m.refs_matching("refs/merge-requests/*/head").unwrap().is_empty());

    // The files of a commit, read from the mirror (no checkout).
    let files = m.read_files(&main).expect("read files");
    assert!(files.files.contains_key("cluster.yaml"), "{:?}", files.files.keys());
    assert!(files.files.keys().any(|k| k.starts_with("nodes/")));
    assert!(files.origin.contains(&main[..12]), "{}", files.origin);
    let (summary, author) = m.commit_info(&main).unwrap();
    assert_eq!(summary, "The seed homelab");
    assert_eq!(author, "driftless tests <tests@driftless.invalid>");
    assert!(m.read_files("0000000000000000000000000000000000000000").is_err());

    // A closed pull request disappears from the mirror too.
    git(&forge.bare, &["update-ref", "-d", "refs/heads/pr/1"]);
    git(&forge.bare, &["update-ref", "-d", "refs/pull/7/head"]);
    let refs = m.fetch(&specs).expect("fetch after closing the pull request");
    assert!(!refs.contains_key("refs/heads/pr/1"), "{refs:?}");
    assert!(!refs.contains_key("refs/pull/7/head"), "{refs:?}");
    assert_eq!(refs.get("refs/heads/main"), Some(&second));

    // Opening the same cache again finds the same mirror.
    let again = Mirror::open_or_init(&forge.url(), cache.path(), GitAuth::default()).unwrap();
    assert_eq!(again.path(), m.path());
    assert_eq!(again.refs().unwrap(), refs);

    // A ref that does not exist is an error naming it.
    let err = m.fetch(&["refs/heads/nope".to_string()]).unwrap_err();
    assert!(err.to_string().contains("refs/heads/nope"), "{err}");
}

fn report(git_ref: &str, revision: &str, outcome: Outcome) -> StatusReport {
    StatusReport {
        git_ref: git_ref.into(),
        revision: revision.into(),
        kind: RunKind::Reconcile,
        outcome,
        started: "2025-01-01T00:00:00Z".into(),
        finished: "2025-01-01T00:00:05Z".into(),
        plan: None,
        applied: None,
        errors: vec![],
        last_attempted_revision: Some(revision.into()),
        last_applied_revision: None,
        untrusted_changes: Vec::new(),
        history_rewritten: None,
        warnings: Vec::new(),
        verification: None,
        replica: None,
    }
}

fn report_files(r: &StatusReport) -> Vec<(String, Vec<u8>)> {
    let (md, json) = status::report_paths(&r.git_ref);
    vec![
        (md, status::markdown(r, &[]).into_bytes()),
        (json, status::json(r, &[]).into_bytes()),
    ]
}

/// The file at `path` on the forge's status branch.
fn show(forge: &Forge, path: &str) -> String {
    git(&forge.bare, &["show", &format!("{DEFAULT_STATUS_BRANCH}:{path}")])
}

#[test]
fn status_reports_go_to_their_own_branch_and_survive_concurrent_pushes() {
    let forge = Forge::new();
    let url = forge.url();
    let (_cache, m) = mirror(&url);
    let main = forge.rev("main");
    assert_eq!(
        m.read_status(DEFAULT_STATUS_BRANCH, "status/heads/main.json").unwrap(),
        None
    );

    let r = report("refs/heads/main", &main, Outcome::Applied);
    let first = m
        .publish_status(&url, DEFAULT_STATUS_BRANCH, &report_files(&r), "status: main applied")
        .expect("publish");
    assert_eq!(forge.rev(DEFAULT_STATUS_BRANCH), first);
    assert_eq!(forge.rev("main"), main, "the watched branch is untouched");
    let listed = git(&forge.bare, &["ls-tree", "-r", "--name-only", DEFAULT_STATUS_BRANCH]);
    assert_eq!(listed, "status/heads/main.json\nstatus/heads/main.md");
    assert!(show(&forge, "status/heads/main.md").contains(&main));
    // A root commit by driftless, with its own identity.
    assert_eq!(git(&forge.bare, &["rev-list", "--count", DEFAULT_STATUS_BRANCH]), "1");
    assert_eq!(
        git(
            &forge.bare,
            &["log", "-1", "--format=%an <%ae>|%cn|%s", DEFAULT_STATUS_BRANCH]
        ),
        "driftless <driftless@localhost>|driftless|status: main applied"
    );

    // Read back, as `driftless status` does.
    let json = m
        .read_status(DEFAULT_STATUS_BRANCH, "status/heads/main.json")
        .unwrap()
        .expect("the report");
    let summary = status::parse_summary(&json).unwrap();
    assert_eq!(
        (summary.revision.as_str(), summary.outcome),
        (main.as_str(), Outcome::Applied)
    );
    assert_eq!(
        m.read_status(DEFAULT_STATUS_BRANCH, "status/heads/other.json").unwrap(),
        None
    );

    // The same files again: nothing to commit, nothing pushed.
    let same = m
        .publish_status(&url, DEFAULT_STATUS_BRANCH, &report_files(&r), "status: main applied")
        .unwrap();
    assert_eq!(same, first);

    // Someone else pushes to the status branch between our fetch and our push: the push is
    // rejected, our commit is made again on their tip, and both histories survive.
    let other = tempfile::tempdir().unwrap();
    git(other.path(), &["clone", "-q", "-b", DEFAULT_STATUS_BRANCH, &url, "c"]);
    let clone = other.path().join("c");
    let mut theirs = String::new();
    let mut attempts = Vec::new();
    let pr = report("refs/pull/7/head", &main, Outcome::Planned);
    let mut files = report_files(&pr);
    files.extend(report_files(&report("refs/heads/main", &main, Outcome::NoChanges)));
    let ours = m
        .publish_status_with(
            &url,
            DEFAULT_STATUS_BRANCH,
            &files,
            "status: two reports",
            &mut |attempt| {
                attempts.push(attempt);
                if attempt == 1 {
                    std::fs::create_dir_all(clone.join("status/heads")).unwrap();
                    std::fs::write(clone.join("theirs.txt"), "someone else's file\n").unwrap();
                    std::fs::write(clone.join("status/heads/main.md"), "their main report\n").unwrap();
                    git(&clone, &["add", "-A"]);
                    git(&clone, &["commit", "-q", "-m", "their commit"]);
                    git(&clone, &["push", "-q", "origin", DEFAULT_STATUS_BRANCH]);
                    theirs = git(&clone, &["rev-parse", "HEAD"]);
                }
            },
        )
        .expect("publish after a concurrent push");
    assert_eq!(attempts, vec![1, 2], "rejected once, then pushed");
    assert_eq!(forge.rev(DEFAULT_STATUS_BRANCH), ours);
    // Never forced: their commit and our first one are ancestors of the final tip.
    for ancestor in [&theirs, &first] {
        let out = git_cmd(&forge.bare, &["merge-base", "--is-ancestor", ancestor, &ours]);
        assert!(out.status.success(), "{ancestor} is not an ancestor of {ours}");
    }
    let log = git(&forge.bare, &["log", "--format=%s", DEFAULT_STATUS_BRANCH]);
    assert_eq!(log, "status: two reports\ntheir commit\nstatus: main applied");
    // Their file survives; ours overwrite only our paths.
    assert_eq!(show(&forge, "theirs.txt"), "someone else's file");
    assert!(show(&forge, "status/heads/main.md").contains("no changes"));
    assert!(show(&forge, "status/pull/7/head.md").contains("planned"));
    assert_eq!(forge.rev("main"), main, "the watched branch is untouched");

    // Bad input never reaches git.
    let bad = vec![("../escape".to_string(), b"x".to_vec())];
    assert!(matches!(
        m.publish_status(&url, DEFAULT_STATUS_BRANCH, &bad, "x"),
        Err(GitError::Invalid { .. })
    ));
    assert!(matches!(
        m.publish_status(&url, "-delete", &files, "x"),
        Err(GitError::Invalid { .. })
    ));
}

#[test]
fn fetch_and_publish_over_git_daemon() {
    let forge = Forge::new();
    let port = free_port();
    let base = path_str(&forge.base).to_string();
    // `git daemon` runs git-daemon as a child: start that directly, so killing it stops it.
    let exec_path = git(&forge.base, &["--exec-path"]);
    let child = Command::new(Path::new(&exec_path).join("git-daemon"))
        .args([
            "--reuseaddr",
            &format!("--base-path={base}"),
            "--export-all",
            "--enable=receive-pack",
            "--listen=127.0.0.1",
            &format!("--port={port}"),
            &base,
        ])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon starts");
    let mut daemon = Server(child);
    assert!(wait_for_port(port, &mut daemon.0), "git daemon listens on {port}");

    let url = format!("git://127.0.0.1:{port}/homelab.git");
    let (_cache, m) = mirror(&url);
    let refs = m.fetch(&[]).expect("fetch over git://");
    assert_eq!(refs.get("refs/heads/main"), Some(&forge.rev("main")));
    let files = m.read_files("refs/heads/main").unwrap();
    assert!(files.files.contains_key("cluster.yaml"));

    let r = report("refs/heads/main", &forge.rev("main"), Outcome::NoChanges);
    let tip = m
        .publish_status(&url, DEFAULT_STATUS_BRANCH, &report_files(&r), "status over git://")
        .expect("push over git://");
    assert_eq!(forge.rev(DEFAULT_STATUS_BRANCH), tip);
    let back = m
        .read_status(DEFAULT_STATUS_BRANCH, "status/heads/main.md")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8(back).unwrap().contains("no changes"));
}

/// A loopback HTTP server that records each request's head and answers 403.
fn recording_http_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
                head.push(byte[0]);
            }
            record.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
            let _ = stream.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, seen)
}

#[test]
fn the_https_token_travels_as_a_header_and_never_shows_in_errors() {
    const TOKEN: &str = "t0k3n-SECRET";
    // base64("x-access-token:t0k3n-SECRET")
    const BASIC: &str = "eC1hY2Nlc3MtdG9rZW46dDBrM24tU0VDUkVU";
    let (port, seen) = recording_http_server();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let auth = GitAuth {
        token_file: Some(token_file),
        ..GitAuth::default()
    };
    // Plain http is allowed to this machine only.
    let url = format!("http://127.0.0.1:{port}/homelab.git");
    let m = Mirror::open_or_init(&url, dir.path(), auth.clone())
        .unwrap()
        .with_timeout(Duration::from_secs(30));

    // gix (fetch).
    let err = m.fetch(&heads()).expect_err("the server says 403");
    let text = format!("{err} {err:?}");
    assert!(!text.contains(TOKEN) && !text.contains(BASIC), "{text}");
    // git CLI (the status branch).
    let err = m
        .publish_status(&url, DEFAULT_STATUS_BRANCH, &[("a.md".into(), b"x".to_vec())], "x")
        .expect_err("the server says 403");
    let text = format!("{err} {err:?}");
    assert!(!text.contains(TOKEN) && !text.contains(BASIC), "{text}");

    let requests = seen.lock().unwrap().clone();
    assert!(requests.len() >= 2, "{requests:?}");
    for head in &requests {
        let has = head
            .lines()
            .any(|l| l.eq_ignore_ascii_case(&format!("authorization: Basic {BASIC}")));
        assert!(has, "no Authorization header in:\n{head}");
    }
    assert!(
        requests.iter().any(|h| h.contains("git/")),
        "the git CLI asked too: {requests:?}"
    );

    // The token is never sent to another host over plain http.
    assert!(matches!(
        Mirror::open_or_init("http://git.example/homelab.git", dir.path(), auth),
        Err(GitError::InsecureToken { .. })
    ));
}

/// ssh:// through a private sshd on loopback, when this machine can run one (skipped otherwise):
/// the key and the known_hosts file reach both gix (fetch) and the git CLI (push), and a host
/// key that is not in known_hosts is refused.
#[test]
fn fetch_and_publish_over_ssh_with_a_pinned_host_key() {
    let Some(sshd) = ["/usr/sbin/sshd", "/usr/bin/sshd", "/sbin/sshd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        eprintln!("skipped: no sshd");
        return;
    };
    let forge = Forge::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keygen = |path: &Path| {
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f", path_str(path)])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(())
    };
    if keygen(&d.join("host_key")).is_none()
        || keygen(&d.join("client_key")).is_none()
        || keygen(&d.join("other")).is_none()
    {
        eprintln!("skipped: no ssh-keygen");
        return;
    }
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let port = free_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nStrictModes no\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\nUsePAM no\nPidFile {pid}\nAllowUsers {user}\n",
        hk = d.join("host_key").display(),
        ak = d.join("authorized_keys").display(),
        pid = d.join("sshd.pid").display(),
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    let Ok(child) = Command::new(&sshd)
        .args(["-D", "-e", "-f", path_str(&d.join("sshd_config"))])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        eprintln!("skipped: sshd does not start");
        return;
    };
    let mut server = Server(child);
    if !wait_for_port(port, &mut server.0) {
        eprintln!("skipped: sshd does not listen (needs /run/sshd when run as root?)");
        return;
    }
    let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
    let key_part = host_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    std::fs::write(d.join("known_hosts"), format!("[127.0.0.1]:{port} {key_part}\n")).unwrap();
    let other_pub = std::fs::read_to_string(d.join("other.pub")).unwrap();
    let other_part = other_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    std::fs::write(d.join("wrong_hosts"), format!("[127.0.0.1]:{port} {other_part}\n")).unwrap();

    let url = format!("ssh://{user}@127.0.0.1:{port}{}", forge.bare.display());
    let auth = GitAuth {
        ssh_key: Some(d.join("client_key")),
        known_hosts: Some(d.join("known_hosts")),
        token_file: None,
    };
    let cache = tempfile::tempdir().unwrap();
    let m = Mirror::open_or_init(&url, cache.path(), auth.clone())
        .unwrap()
        .with_timeout(Duration::from_secs(60));
    let refs = match m.fetch(&heads()) {
        Ok(refs) => refs,
        Err(e) if e.to_string().contains("Permission denied") => {
            eprintln!("skipped: this sshd refuses logins here: {e}");
            return;
        }
        Err(e) => panic!("fetch over ssh: {e}"),
    };
    assert_eq!(refs.get("refs/heads/main"), Some(&forge.rev("main")));
    let r = report("refs/heads/main", &forge.rev("main"), Outcome::Applied);
    let tip = m
        .publish_status(&url, DEFAULT_STATUS_BRANCH, &report_files(&r), "status over ssh")
        .expect("push over ssh");
    assert_eq!(forge.rev(DEFAULT_STATUS_BRANCH), tip);

    // A host key that is not the pinned one: both gix and the CLI refuse.
    let wrong = GitAuth {
        known_hosts: Some(d.join("wrong_hosts")),
        ..auth
    };
    let cache2 = tempfile::tempdir().unwrap();
    let m = Mirror::open_or_init(&url, cache2.path(), wrong).unwrap();
    let err = m.fetch(&heads()).expect_err("fetch with a wrong host key");
    assert!(err.to_string().contains("Host key verification failed"), "gix: {err}");
    let err = m
        .publish_status(&url, DEFAULT_STATUS_BRANCH, &report_files(&r), "x")
        .expect_err("push with a wrong host key");
    assert!(err.to_string().contains("Host key verification failed"), "git: {err}");
}

#[test]
fn report_paths_markdown_json_and_redaction() {
    let (md, json) = status::report_paths("refs/heads/../../etc/passwd");
    for p in [&md, &json] {
        assert!(p.starts_with("status/") && !p.contains(".."), "{p}");
    }
    assert_eq!(status::report_paths("refs/pull/7/head").0, "status/pull/7/head.md");

    let mut r = report(
        "refs/heads/main",
        "0123456789abcdef0123456789abcdef01234567",
        Outcome::Failed,
    );
    r.errors = vec!["proxmox said: token=hunter2-secret is invalid".into()];
    let secrets = vec!["hunter2-secret".to_string()];
    let text = status::markdown(&r, &secrets);
    assert!(text.contains("0123456789abcdef0123456789abcdef01234567"), "{text}");
    assert!(text.contains("**failed**"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let js = status::json(&r, &secrets);
    assert!(!js.contains("hunter2"), "{js}");
    let s = status::parse_summary(js.as_bytes()).unwrap();
    assert_eq!(
        (s.git_ref.as_str(), s.kind, s.outcome),
        ("refs/heads/main", RunKind::Reconcile, Outcome::Failed)
    );
    assert_eq!(s.errors, vec!["proxmox said: token=<redacted> is invalid"]);
}

#[test]
fn a_mirror_whose_objects_were_lost_is_made_again_by_the_next_fetch() {
    let forge = Forge::new();
    let (_cache, m) = mirror(&forge.url());
    m.fetch(&heads()).expect("first fetch");
    assert!(m.is_intact());
    // Objects deleted behind the daemon's back: refs point at nothing.
    let objects = m.path().join("objects");
    std::fs::remove_dir_all(&objects).unwrap();
    std::fs::create_dir_all(objects.join("pack")).unwrap();
    assert!(!m.is_intact());
    let second = forge.push_commit("NOTES.md", "after the damage\n", "refs/heads/main");
    let (refs, remade) = m.fetch_healing(&heads()).expect("healed");
    assert!(remade);
    assert_eq!(refs.get("refs/heads/main"), Some(&second));
    assert!(m.read_files(&second).unwrap().files.contains_key("cluster.yaml"));
    // An intact mirror is never remade, and a fetch that fails for another reason says why.
    let (_, remade) = m.fetch_healing(&heads()).unwrap();
    assert!(!remade);
    let err = m.fetch_healing(&["refs/heads/nope".to_string()]).unwrap_err();
    assert!(err.to_string().contains("refs/heads/nope"), "{err}");
}
