//! End to end: the built binary plans and applies the example homelab into the sandbox
//! Proxmox (HTTPS, pinned fingerprint, token auth), writing raw LXC keys and root-only
//! features through a real OpenSSH server on loopback.

use testkit::sshd;

use driftless_sandbox::{self as sandbox, SandboxHandle, SandboxOptions};
use std::path::PathBuf;

struct Env {
    rt: tokio::runtime::Runtime,
    sandbox: Option<SandboxHandle>,
    sshd: sshd::Sshd,
    repo: tempfile::TempDir,
    state: tempfile::TempDir,
    token_file: PathBuf,
}

impl Env {
    fn new(example: &str) -> Env {
        let sshd = sshd::Sshd::start().expect("these tests need OpenSSH's sshd (.ci/run installs openssh-server)");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = tempfile::tempdir().unwrap();
        let sandbox = rt.block_on(sandbox::start(SandboxOptions::new(state.path()))).unwrap();
        let token_file = state.path().join("token");
        std::fs::write(&token_file, &sandbox.token).unwrap();
        let repo = testkit::temp_copy(example);
        Env {
            rt,
            sandbox: Some(sandbox),
            sshd,
            repo,
            state,
            token_file,
        }
    }

    fn sandbox(&self) -> &SandboxHandle {
        self.sandbox.as_ref().unwrap()
    }

    fn connection_args(&self) -> Vec<String> {
        let s = self.sandbox();
        vec![
            "--proxmox-url".into(),
            s.url.clone(),
            "--proxmox-token-file".into(),
            self.token_file.display().to_string(),
            "--proxmox-fingerprint".into(),
            s.fingerprint.clone(),
            "--ssh-host".into(),
            "127.0.0.1".into(),
            "--ssh-port".into(),
            self.sshd.port.to_string(),
            "--ssh-user".into(),
            self.sshd.user.clone(),
            "--ssh-key-file".into(),
            self.sshd.client_key.display().to_string(),
            "--ssh-known-hosts".into(),
            self.sshd.known_hosts.display().to_string(),
            "--pve-root".into(),
            self.state.path().display().to_string(),
            "--pct-command".into(),
            testkit::pct_command(self.state.path()),
            // The Proxmox layer alone: tests/e2e_cluster.rs covers K3s and Kubernetes.
            "--guests-only".into(),
        ]
    }

    /// `driftless --repo REPO <cmd> <extra> <connection flags>`.
    fn run(&self, cmd: &[&str], extra: &[String]) -> testkit::Run {
        let mut args: Vec<String> = vec!["--repo".into(), self.repo.path().display().to_string()];
        args.extend(cmd.iter().map(|s| s.to_string()));
        args.extend(extra.iter().cloned());
        args.extend(self.connection_args());
        testkit::run(&args)
    }

    fn conf(&self, vmid: u32) -> String {
        std::fs::read_to_string(self.state.path().join(format!("nodes/pve/lxc/{vmid}.conf"))).unwrap_or_default()
    }

    fn guest_files(&self) -> Vec<String> {
        let dir = self.state.path().join("nodes/pve/lxc");
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn write(&self, rel: &str, text: &str) {
        testkit::write(self.repo.path(), rel, text);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.sandbox.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

fn apply(env: &Env) -> testkit::Run {
    let r = env.run(&["apply"], &["--auto-approve".into()]);
    r.expect_code(0, "apply");
    r
}

#[test]
fn the_seed_homelab_applies_and_converges() {
    let env = Env::new("homelab-k3s");
    let r = apply(&env);
    assert!(r.stdout.contains("Applied 3 of 3 steps."), "{}", r.stdout);
    assert_eq!(env.guest_files(), ["100.conf", "101.conf", "102.conf"]);
    for (vmid, name, ip) in [
        (100, "k3s-master", "192.168.2.20"),
        (101, "k3s-worker-1", "192.168.2.21"),
        (102, "k3s-worker-2", "192.168.2.22"),
    ] {
        let conf = env.conf(vmid);
        for want in [
            "cores: 2\n".to_string(),
            "memory: 4096\n".to_string(),
            "swap: 0\n".to_string(),
            format!("hostname: {name}\n"),
            "features: fuse=1,keyctl=1,nesting=1\n".to_string(),
            format!("ip={ip}/24"),
            "gw=192.168.2.1".to_string(),
            "size=32G".to_string(),
            "tags: driftless\n".to_string(),
            "lxc.mount.entry: /dev/kmsg dev/kmsg none bind,rw,optional,create=file\n".to_string(),
            "lxc.apparmor.profile: unconfined\n".to_string(),
            "lxc.cap.drop: \n".to_string(),
            "lxc.cgroup2.devices.allow: a\n".to_string(),
            "lxc.mount.auto: proc:rw sys:rw\n".to_string(),
        ] {
            assert!(conf.contains(&want), "{vmid}.conf lacks {want:?}:\n{conf}");
        }
        // Raw keys come after every other key, as Proxmox writes them.
        let first_raw = conf.find("lxc.").unwrap();
        assert!(
            !conf[first_raw..]
                .lines()
                .any(|l| !l.starts_with("lxc.") && !l.is_empty()),
            "{conf}"
        );
    }
    // Planning again finds nothing; applying again changes nothing.
    env.run(&["plan"], &["--detailed-exitcode".into()])
        .expect_code(0, "plan after apply");
    let before: Vec<String> = [100, 101, 102].iter().map(|v| env.conf(*v)).collect();
    let again = apply(&env);
    assert!(again.stdout.contains("Nothing to apply."), "{}", again.stdout);
    assert_eq!(before, [100, 101, 102].iter().map(|v| env.conf(*v)).collect::<Vec<_>>());
}

#[test]
fn a_changed_node_file_plans_only_that_change_with_its_provenance() {
    let env = Env::new("homelab-k3s");
    apply(&env);
    let node = std::fs::read_to_string(env.repo.path().join("nodes/k3s-worker-2.yaml")).unwrap();
    env.write(
        "nodes/k3s-worker-2.yaml",
        &format!(
            "{node}memory: 6GiB\ndeviations:\n  - adr: ADR-001\n    keys: [memory]\n    reason: runs the database\n"
        ),
    );
    let r = env.run(&["plan"], &["--detailed-exitcode".into()]);
    r.expect_code(2, "plan with a change");
    assert!(
        r.stdout.contains("~ update k3s-worker-2 (lxc 102 on pve)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("~ memory: 4096 -> 6144"), "{}", r.stdout);
    assert!(
        r.stdout.contains("<- nodes/k3s-worker-2.yaml:"),
        "provenance: {}",
        r.stdout
    );
    assert!(
        !r.stdout.contains("k3s-worker-1") && !r.stdout.contains("k3s-master"),
        "{}",
        r.stdout
    );
    let json = env.run(&["--output", "json", "plan"], &[]).json();
    assert_eq!(json["steps"].as_array().unwrap().len(), 1, "{json}");
    let md = env.run(&["--output", "markdown", "plan"], &[]);
    assert!(md.stdout.contains("| ~ | update | k3s-worker-2"), "{}", md.stdout);
    apply(&env);
    assert!(env.conf(102).contains("memory: 6144\n"));
    env.run(&["plan"], &["--detailed-exitcode".into()])
        .expect_code(0, "converged again");
}

#[test]
fn drift_behind_drifts_back_is_reported() {
    let env = Env::new("homelab-k3s");
    apply(&env);
    sandbox::pct(
        env.state.path(),
        &["set".into(), "101".into(), "--cores".into(), "8".into()],
    )
    .unwrap();
    let r = env.run(&["drift"], &["--detailed-exitcode".into()]);
    r.expect_code(2, "drift");
    assert!(r.stdout.contains("Drift report for cluster `homelab`"), "{}", r.stdout);
    assert!(r.stdout.contains("~ cores: 8 -> 2"), "{}", r.stdout);
}

#[test]
fn an_untagged_guest_with_a_nodes_vmid_is_a_conflict_and_left_alone() {
    let env = Env::new("homelab-k3s");
    let foreign = "arch: amd64\ncores: 1\nhostname: someone-elses\nmemory: 512\nrootfs: local-lvm:vm-101-disk-0,size=8G\nswap: 512\n";
    let path = env.state.path().join("nodes/pve/lxc/101.conf");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, foreign).unwrap();
    let r = apply(&env);
    assert!(
        r.stdout.contains("? conflict k3s-worker-1 (vmid 101 on pve)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("Applied 2 of 2 steps."), "{}", r.stdout);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        foreign,
        "the foreign guest is untouched"
    );
}

#[test]
fn prune_off_leaves_orphans_and_prune_on_removes_only_tagged_ones() {
    let env = Env::new("homelab-k3s");
    apply(&env);
    let dir = env.state.path().join("nodes/pve/lxc");
    std::fs::write(
        dir.join("150.conf"),
        "cores: 1\nhostname: old-worker\nmemory: 512\ntags: driftless\n",
    )
    .unwrap();
    std::fs::write(dir.join("151.conf"), "cores: 1\nhostname: not-ours\nmemory: 512\n").unwrap();
    let r = env.run(&["plan"], &[]);
    assert!(
        r.stdout.contains("? orphan old-worker (lxc 150 on pve)"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("not-ours"), "{}", r.stdout);
    apply(&env);
    assert!(dir.join("150.conf").exists(), "prune is off: the orphan stays");

    let cluster = std::fs::read_to_string(env.repo.path().join("cluster.yaml")).unwrap();
    env.write("cluster.yaml", &cluster.replace("prune: false", "prune: true"));
    let r = apply(&env);
    assert!(
        r.stdout.contains("- delete old-worker (lxc 150 on pve)"),
        "{}",
        r.stdout
    );
    assert!(!dir.join("150.conf").exists(), "the tagged orphan is pruned");
    assert!(dir.join("151.conf").exists(), "an untagged guest is never deleted");
    assert_eq!(env.guest_files(), ["100.conf", "101.conf", "102.conf", "151.conf"]);
}

#[test]
fn injected_errors_and_a_concurrent_edit_still_converge_without_duplicates() {
    let env = Env::new("homelab-k3s");
    env.sandbox().knobs().set_error_rate(0.3);
    // Reads are retried; a failed create or update stops the apply, and the next run picks up.
    let mut applied = false;
    for _ in 0..12 {
        let r = env.run(&["apply"], &["--auto-approve".into()]);
        if r.code == 0 {
            applied = true;
            break;
        }
    }
    assert!(applied, "apply converged under 30% server errors");
    env.sandbox().knobs().set_error_rate(0.0);
    assert_eq!(
        env.guest_files(),
        ["100.conf", "101.conf", "102.conf"],
        "no duplicate guests"
    );
    env.run(&["plan"], &["--detailed-exitcode".into()])
        .expect_code(0, "converged after errors");

    // Someone edits the config between driftless's read and its write: the digest no longer
    // matches, driftless reads again and re-plans instead of overwriting.
    sandbox::pct(
        env.state.path(),
        &["set".into(), "100".into(), "--cores".into(), "6".into()],
    )
    .unwrap();
    env.sandbox().knobs().set_edit_between_read_and_write(true);
    let r = env.run(&["apply"], &["--auto-approve".into()]);
    r.expect_code(0, "apply with a concurrent edit");
    assert!(r.stderr.contains("observed again and re-planned"), "{}", r.stderr);
    env.run(&["plan"], &["--detailed-exitcode".into()])
        .expect_code(0, "converged after the concurrent edit");
}

#[test]
fn a_fingerprint_that_does_not_match_is_refused() {
    let env = Env::new("homelab-k3s");
    let mut args: Vec<String> = vec!["--repo".into(), env.repo.path().display().to_string(), "plan".into()];
    let mut conn = env.connection_args();
    let i = conn.iter().position(|a| a == "--proxmox-fingerprint").unwrap();
    conn[i + 1] = ["AB"; 32].join(":");
    args.extend(conn);
    let r = testkit::run(&args);
    r.expect_code(1, "wrong fingerprint");
    assert!(r.stderr.to_lowercase().contains("fingerprint"), "{}", r.stderr);
    assert!(
        !r.stderr.contains(env.sandbox().token.split('=').nth(1).unwrap()),
        "the token secret never shows"
    );
    assert!(env.guest_files().is_empty());
}

#[test]
fn a_wrong_host_key_stops_the_apply_before_raw_keys_are_written() {
    let env = Env::new("homelab-k3s");
    let wrong = env.sshd.known_hosts_with_wrong_key();
    // One step at a time, so the apply stops at the first guest and starts no other.
    let mut args: Vec<String> = vec![
        "--repo".into(),
        env.repo.path().display().to_string(),
        "apply".into(),
        "--auto-approve".into(),
        "--parallelism".into(),
        "1".into(),
    ];
    let mut conn = env.connection_args();
    let i = conn.iter().position(|a| a == "--ssh-known-hosts").unwrap();
    conn[i + 1] = wrong.display().to_string();
    args.extend(conn);
    let r = testkit::run(&args);
    r.expect_code(1, "apply with a wrong host key");
    // The run lock is taken over that host shell first: nothing is planned or created.
    assert!(
        r.stderr.contains("cannot take the run lock") && r.stderr.contains("host key"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("create k3s-master"), "{}", r.stdout);
    assert!(env.guest_files().is_empty(), "no guest was created, no raw key written");
}

#[test]
fn sigterm_stops_a_one_shot_apply_between_steps_and_says_what_was_not_done() {
    use std::io::{BufRead, BufReader};
    let env = Env::new("homelab-k3s");
    env.sandbox().knobs().set_latency(std::time::Duration::from_millis(300));
    let mut args: Vec<String> = ["--repo", env.repo.path().to_str().unwrap(), "apply", "--auto-approve"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--parallelism".into(), "1".into()]);
    args.extend(env.connection_args());
    let mut child = std::process::Command::new(testkit::driftless_bin())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // The first step starts: then the apply is asked to stop.
    while !seen.contains(" start ") {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "apply ended early:\n{seen}");
        seen.push_str(&line);
    }
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "an interrupted apply is not a success");
    assert!(rest.contains("stopping after the steps that are running"), "{rest}");
    assert!(stdout.contains("Stopped between two steps, as asked."), "{stdout}");
    assert!(stdout.contains("Not done:"), "{stdout}");
    // The step that was running finished whole: its guest exists with a complete config.
    let files = env.guest_files();
    assert!(!files.is_empty() && files.len() < 3, "{files:?}");
    for f in &files {
        assert!(f.ends_with(".conf"), "a temporary file was left: {files:?}");
    }
}
