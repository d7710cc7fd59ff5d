//! Signed commits (`verify:`) through `driftless daemon`: commits signed by the real git CLI
//! with keys made by the real ssh-keygen and gpg; a revision is applied only when signed by an
//! allowed key, and the status report says why when it is not.

use driftless::daemon::verify::{self, Policy, VerifyMode, VerifySettings};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use testkit::daemon_env::{Setup, worker2_with_memory};
use testkit::git;

/// Signing keys for the tests, in a temporary directory: Alice's SSH key (allowed), Mallory's
/// SSH key (not allowed), and Bob's OpenPGP key (allowed) in a GNUPGHOME of its own.
pub struct Keys {
    /// Holds the keys: removed when the `Keys` are dropped.
    _dir: tempfile::TempDir,
    pub alice: PathBuf,
    pub mallory: PathBuf,
    /// Alice's public key as the only allowed signer.
    pub allowed_signers: PathBuf,
    /// Bob's public key, armored.
    pub bob_asc: PathBuf,
    gnupg: PathBuf,
    /// `gpg --homedir GNUPG`: git runs it as its gpg.program, so no environment is needed.
    gpg: PathBuf,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let ssh_key = |name: &str, comment: &str| {
            let path = dir.path().join(name);
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
                .arg(&path));
            path
        };
        let alice = ssh_key("alice", "alice@example.com");
        let mallory = ssh_key("mallory", "mallory@example.com");
        let allowed_signers = dir.path().join("allowed_signers");
        let alice_pub = std::fs::read_to_string(alice.with_extension("pub")).unwrap();
        std::fs::write(
            &allowed_signers,
            format!("# who may change the homelab\nalice@example.com namespaces=\"git\" {alice_pub}"),
        )
        .unwrap();

        let gnupg = dir.path().join("gnupg");
        std::fs::create_dir(&gnupg).unwrap();
        // gpg refuses a home directory others can read.
        std::fs::set_permissions(&gnupg, std::fs::Permissions::from_mode(0o700)).unwrap();
        let gpg = dir.path().join("gpg");
        std::fs::write(
            &gpg,
            format!("#!/bin/sh\nexec gpg --homedir '{}' \"$@\"\n", gnupg.display()),
        )
        .unwrap();
        std::fs::set_permissions(&gpg, std::fs::Permissions::from_mode(0o755)).unwrap();
        let params = dir.path().join("key-params");
        std::fs::write(
            &params,
            "%no-protection\nKey-Type: eddsa\nKey-Curve: ed25519\nKey-Usage: sign\n\
             Subkey-Type: eddsa\nSubkey-Curve: ed25519\nSubkey-Usage: sign\n\
             Name-Real: Bob Builder\nName-Email: bob@example.com\nExpire-Date: 0\n%commit\n",
        )
        .unwrap();
        run(Command::new(&gpg)
            .args(["--batch", "--quiet", "--gen-key"])
            .arg(&params));
        let bob_asc = dir.path().join("bob.asc");
        std::fs::write(
            &bob_asc,
            run(Command::new(&gpg).args(["--export", "--armor", "bob@example.com"])),
        )
        .unwrap();
        Keys {
            _dir: dir,
            alice,
            mallory,
            allowed_signers,
            bob_asc,
            gnupg,
            gpg,
        }
    }

    /// git `-c` settings that sign with the SSH key `key`.
    pub fn ssh(&self, key: &Path) -> Vec<String> {
        vec!["gpg.format=ssh".into(), format!("user.signingkey={}", key.display())]
    }

    /// git `-c` settings that sign with Bob's OpenPGP key.
    pub fn bob(&self) -> Vec<String> {
        vec![
            "gpg.format=openpgp".into(),
            format!("gpg.program={}", self.gpg.display()),
            "user.signingkey=bob@example.com".into(),
        ]
    }

    /// The daemon flags that allow Alice's SSH key and Bob's OpenPGP key.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--verify-allowed-signers".into(),
            self.allowed_signers.display().to_string(),
            "--verify-openpgp-keys".into(),
            self.bob_asc.display().to_string(),
        ]
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        // gpg started an agent for this GNUPGHOME: it must not outlive the test.
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.gnupg)
            .args(["--kill", "all"])
            .output();
    }
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A daemon on `s`'s repository with `keys` allowed (and `extra` flags).
fn start(s: &mut Setup, keys: &Keys, extra: &[&str]) {
    let url = s.file_url();
    let mut flags = keys.flags();
    flags.extend(["--poll-interval".to_string(), "1s".to_string()]);
    flags.extend(extra.iter().map(|f| f.to_string()));
    s.start_daemon(&url, &strs(&flags));
}

fn report_for(s: &Setup, commit: &str) -> serde_json::Value {
    s.wait_report("heads/main", Duration::from_secs(60), |r| r["revision"] == commit)
}

/// A report whose revision was refused: nothing of it applied, and the verdict says why.
fn assert_refused(s: &Setup, r: &serde_json::Value, commit: &str, reason: &str) {
    assert_eq!(r["outcome"], "unverified", "{r}");
    assert_eq!(r["verification"]["verified"], false, "{r}");
    let verdicts = r["verification"]["commits"].as_array().unwrap();
    let refused = verdicts
        .iter()
        .find(|c| c["commit"] == commit)
        .unwrap_or_else(|| panic!("{commit} checked: {r}"));
    assert_eq!(refused["rejected"], reason, "{r}");
    assert!(
        r["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains(&format!("commit {commit} "))),
        "the errors name the commit: {r}"
    );
    assert_eq!(s.conf(100), "", "nothing applied: {}", s.conf(100));
    assert!(!s.conf(102).contains("memory: 6144"), "{}", s.conf(102));
}

#[test]
fn a_commit_signed_by_an_allowed_ssh_key_is_applied() {
    let keys = Keys::new();
    let mut s = Setup::new("homelab-k3s");
    let signed = s.commit_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        &strs(&keys.ssh(&keys.alice)),
    );
    s.push("main");
    start(&mut s, &keys, &[]);
    let r = report_for(&s, &signed);
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(r["verification"]["verified"], true, "{r}");
    assert_eq!(r["verification"]["mode"], "head", "{r}");
    let signer = &r["verification"]["commits"][0]["signer"];
    assert_eq!(signer["kind"], "ssh", "{r}");
    assert_eq!(signer["identity"], "alice@example.com", "{r}");
    assert!(s.conf(102).contains("memory: 6144"), "{}", s.conf(102));
    let md = git(&s.bare, &["show", "driftless/status:status/heads/main.md"]);
    assert!(md.contains("signed by alice@example.com (SSH key SHA256:"), "{md}");
}

#[test]
fn a_commit_signed_by_an_allowed_openpgp_key_is_applied() {
    let keys = Keys::new();
    let mut s = Setup::new("homelab-k3s");
    let signed = s.commit_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        &strs(&keys.bob()),
    );
    s.push("main");
    start(&mut s, &keys, &[]);
    let r = report_for(&s, &signed);
    assert_eq!(r["outcome"], "applied", "{r}");
    let signer = &r["verification"]["commits"][0]["signer"];
    assert_eq!(signer["kind"], "openpgp", "{r}");
    assert_eq!(signer["identity"], "Bob Builder <bob@example.com>", "{r}");
    assert!(s.conf(102).contains("memory: 6144"), "{}", s.conf(102));
}

#[test]
fn an_unsigned_commit_is_not_applied_and_the_report_says_so() {
    let keys = Keys::new();
    let mut s = Setup::new("homelab-k3s");
    let unsigned = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        "main",
    );
    start(&mut s, &keys, &[]);
    let r = report_for(&s, &unsigned);
    assert_refused(&s, &r, &unsigned, "unsigned");
    assert!(r["plan"].is_null(), "not even planned: {r}");
    let md = git(&s.bare, &["show", "driftless/status:status/heads/main.md"]);
    assert!(
        md.contains(&format!("**refused**: commit {unsigned} is not signed")),
        "{md}"
    );
    // Like an invalid revision, it stalls until a new commit: no retries.
    let commits = s.status_commits();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(s.status_commits(), commits, "an unsigned revision is not retried");
}

#[test]
fn a_commit_signed_by_a_key_not_allowed_is_not_applied() {
    let keys = Keys::new();
    let mut s = Setup::new("homelab-k3s");
    let by_mallory = s.commit_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        &strs(&keys.ssh(&keys.mallory)),
    );
    s.push("main");
    start(&mut s, &keys, &[]);
    let r = report_for(&s, &by_mallory);
    assert_refused(&s, &r, &by_mallory, "unknown_key");
    assert!(r["errors"][0].as_str().unwrap().contains("not an allowed key"), "{r}");
}

#[test]
fn a_signature_copied_onto_other_content_is_not_applied() {
    let keys = Keys::new();
    let mut s = Setup::new("homelab-k3s");
    // The content the forger wants applied: 8 GiB, never signed.
    s.commit_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 8),
        "worker-2: 8 GiB",
        &[],
    );
    let wanted_tree = git(&s.work, &["rev-parse", "HEAD^{tree}"]);
    git(&s.work, &["reset", "-q", "--hard", "HEAD~1"]);
    // What Alice signed: 6 GiB.
    let signed = s.commit_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        &strs(&keys.ssh(&keys.alice)),
    );
    let raw = git(&s.work, &["cat-file", "commit", &signed]) + "\n";
    let signed_tree = git(&s.work, &["rev-parse", "HEAD^{tree}"]);
    // Alice's signature, verified as is: the forgery below is refused for its content alone.
    let policy = Policy::load(&VerifySettings {
        mode: VerifyMode::Head,
        allowed_signers: Some(keys.allowed_signers.clone()),
        openpgp_keys: Vec::new(),
    })
    .unwrap();
    verify::verify_commit(&signed, raw.as_bytes(), &policy, 0).expect("alice's own commit verifies");
    let forged_raw = raw.replacen(&format!("tree {signed_tree}"), &format!("tree {wanted_tree}"), 1);
    assert_ne!(forged_raw, raw);
    let file = s.dir.path().join("forged-commit");
    std::fs::write(&file, &forged_raw).unwrap();
    let forged = git(&s.work, &["hash-object", "-t", "commit", "-w", file.to_str().unwrap()]);
    git(&s.work, &["reset", "-q", "--hard", &forged]);
    s.push("main");
    start(&mut s, &keys, &[]);
    let r = report_for(&s, &forged);
    assert_refused(&s, &r, &forged, "bad_signature");
    assert!(!s.conf(102).contains("memory: 8192"), "{}", s.conf(102));
}

#[test]
fn mode_all_refuses_an_unsigned_commit_between_two_signed_ones() {
    let keys = Keys::new();
    let mut s = Setup::new("homelab-k3s");
    let alice = keys.ssh(&keys.alice);
    let first = s.commit_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 5),
        "worker-2: 5 GiB",
        &strs(&alice),
    );
    s.push("main");
    start(&mut s, &keys, &["--verify-mode", "all"]);
    let r = report_for(&s, &first);
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(r["verification"]["mode"], "all", "{r}");

    // Someone's unsigned commit, then Alice's signed one on top, pushed together.
    let node = std::fs::read_to_string(s.work.join("nodes/k3s-worker-1.yaml")).unwrap();
    let unsigned = s.commit_change(
        "nodes/k3s-worker-1.yaml",
        &format!("{node}# an unreviewed comment\n"),
        "a comment",
        &[],
    );
    let head = s.commit_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        &strs(&alice),
    );
    s.push("main");
    let r = report_for(&s, &head);
    assert_eq!(r["outcome"], "unverified", "{r}");
    let verdicts = r["verification"]["commits"].as_array().unwrap();
    let checked: Vec<&str> = verdicts.iter().map(|c| c["commit"].as_str().unwrap()).collect();
    assert_eq!(
        checked,
        [head.as_str(), unsigned.as_str()],
        "the new commits, newest first: {r}"
    );
    assert_eq!(verdicts[0]["signer"]["identity"], "alice@example.com", "{r}");
    assert_eq!(verdicts[1]["rejected"], "unsigned", "{r}");
    assert!(
        r["errors"][0]
            .as_str()
            .unwrap()
            .contains(&format!("commit {unsigned} is not signed")),
        "{r}"
    );
    assert_eq!(r["last_applied_revision"], first.as_str(), "{r}");
    assert!(
        s.conf(102).contains("memory: 5120"),
        "still the first revision: {}",
        s.conf(102)
    );
}
