//! The daemon end to end: a bare repository served by the real git CLI, the sandbox Proxmox,
//! and `driftless daemon` as a process; the status branch is read back with the git CLI.

use testkit::daemon_env as env;

use env::{Setup, worker2_with_memory};
use hmac::Mac;
use std::time::Duration;
use testkit::{git, wait_until};

const SECRET: &str = "webhook-test-secret";

fn github_signature(body: &[u8], secret: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    format!(
        "sha256={}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// A plain HTTP/1.1 POST, as a forge sends it; returns the status code.
fn post_webhook(port: u16, body: &str, signature: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let request = format!(
        "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: {signature}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_pushed_commit_is_applied_within_one_poll_interval_over_git_daemon() {
    let mut s = Setup::new("homelab-k3s");
    let url = s.serve_git();
    s.start_daemon(&url, &["--poll-interval", "2s"]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    let r = s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str()
    });
    assert_eq!(r["outcome"], "applied", "{r}");
    assert!(s.conf(100).contains("lxc.apparmor.profile: unconfined"));

    let second = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        "main",
    );
    let r = s.wait_report("heads/main", Duration::from_secs(30), |r| {
        r["revision"] == second.as_str()
    });
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(r["last_applied_revision"], second.as_str());
    assert!(s.conf(102).contains("memory: 6144"), "{}", s.conf(102));
    // The report is also for people, and the watched branch never gets a daemon commit.
    let md = git(&s.bare, &["show", "driftless/status:status/heads/main.md"]);
    assert!(md.contains(&second) && md.contains("memory"), "{md}");
    assert_eq!(git(&s.bare, &["rev-parse", "main"]), second);
}

#[test]
fn a_signed_webhook_applies_at_once_and_a_bad_signature_is_refused() {
    let mut s = Setup::new("homelab-k3s");
    std::fs::write(s.dir.path().join("webhook"), SECRET).unwrap();
    let secret_file = s.dir.path().join("webhook").display().to_string();
    // Served over git://: a local path would also be watched, which notices pushes by itself.
    let url = s.serve_git();
    s.start_daemon(&url, &["--poll-interval", "1h", "--webhook-secret-file", &secret_file]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str()
    });

    // A bad signature: 401, nothing fetched, nothing reported.
    let second = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        "main",
    );
    let before = s.status_commits();
    let body = r#"{"ref":"refs/heads/main"}"#;
    assert_eq!(
        post_webhook(s.listen, body, &github_signature(body.as_bytes(), "not-the-secret")),
        401
    );
    assert_eq!(post_webhook(s.listen, body, "sha256=00"), 401);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(s.status_commits(), before, "a refused webhook triggers nothing");
    assert!(!s.conf(102).contains("memory: 6144"));

    // The signed one: applied at once although the poll interval is an hour.
    assert_eq!(
        post_webhook(s.listen, body, &github_signature(body.as_bytes(), SECRET)),
        202
    );
    let r = s.wait_report("heads/main", Duration::from_secs(20), |r| {
        r["revision"] == second.as_str()
    });
    assert_eq!(r["outcome"], "applied", "{r}");
    assert!(s.conf(102).contains("memory: 6144"));
}

#[test]
fn a_pull_request_ref_gets_a_plan_and_changes_nothing() {
    let mut s = Setup::new("homelab-k3s");
    let url = s.file_url();
    s.start_daemon(&url, &["--poll-interval", "2s", "--plan-refs", "refs/heads/pr/*"]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str()
    });

    let pr = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 8),
        "worker-2: 8 GiB",
        "pr/7",
    );
    let r = s.wait_report("heads/pr/7", Duration::from_secs(30), |r| r["revision"] == pr.as_str());
    assert_eq!(r["outcome"], "planned", "{r}");
    assert_eq!(r["kind"], "pull_request", "{r}");
    let md = git(&s.bare, &["show", "driftless/status:status/heads/pr/7.md"]);
    assert!(md.contains("memory") && md.contains("8192"), "{md}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        s.conf(102).contains("memory: 4096"),
        "a pull request is never applied: {}",
        s.conf(102)
    );
    assert_eq!(s.report("heads/main").unwrap()["revision"], first.as_str());
}

#[test]
fn drift_made_behind_the_daemons_back_is_reported_on_schedule() {
    let mut s = Setup::new("homelab-k3s");
    let url = s.file_url();
    s.start_daemon(&url, &["--poll-interval", "1h", "--drift-interval", "2s"]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str() && r["outcome"] == "applied"
    });
    driftless_sandbox::pct(&s.state, &["set".into(), "101".into(), "--cores".into(), "8".into()]).unwrap();
    let r = s.wait_report("heads/main", Duration::from_secs(30), |r| r["outcome"] == "drift_found");
    assert_eq!(r["kind"], "drift");
    let md = git(&s.bare, &["show", "driftless/status:status/heads/main.md"]);
    assert!(md.contains("cores") && md.contains("k3s-worker-1"), "{md}");
    assert!(
        s.conf(101).contains("cores: 8"),
        "without auto_correct drift is only reported"
    );
}

#[test]
fn a_concurrent_push_to_the_status_branch_is_retried_and_both_histories_survive() {
    let mut s = Setup::new("homelab-k3s");
    let url = s.file_url();
    s.start_daemon(&url, &["--poll-interval", "1s"]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str()
    });
    // Someone else commits to the status branch.
    let other = s.dir.path().join("other");
    git(
        s.dir.path(),
        &[
            "clone",
            "-q",
            "--branch",
            "driftless/status",
            s.bare.to_str().unwrap(),
            other.to_str().unwrap(),
        ],
    );
    std::fs::write(other.join("NOTES.md"), "kept by a person\n").unwrap();
    git(&other, &["add", "-A"]);
    git(&other, &["commit", "-q", "-m", "a person's note"]);
    git(&other, &["push", "-q", "origin", "driftless/status"]);
    let theirs = git(&other, &["rev-parse", "HEAD"]);
    // The daemon's next report lands on top of it, never replacing it.
    let second = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        "main",
    );
    s.wait_report("heads/main", Duration::from_secs(30), |r| {
        r["revision"] == second.as_str()
    });
    git(&s.bare, &["merge-base", "--is-ancestor", &theirs, "driftless/status"]);
    assert_eq!(git(&s.bare, &["show", "driftless/status:NOTES.md"]), "kept by a person");
}

#[test]
fn an_invalid_revision_stalls_and_is_reported_never_half_applied() {
    let mut s = Setup::new("homelab-k3s");
    let url = s.file_url();
    s.start_daemon(&url, &["--poll-interval", "1s"]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str()
    });
    let node = std::fs::read_to_string(s.work.join("nodes/k3s-worker-1.yaml")).unwrap();
    let bad = s.push_change("nodes/k3s-worker-1.yaml", &format!("{node}cors: 4\n"), "a typo", "main");
    let r = s.wait_report("heads/main", Duration::from_secs(30), |r| r["revision"] == bad.as_str());
    assert_eq!(r["outcome"], "invalid", "{r}");
    assert!(
        r["errors"][0].as_str().unwrap().contains("nodes/k3s-worker-1.yaml:"),
        "{r}"
    );
    assert_eq!(r["last_applied_revision"], first.as_str());
    // Not retried: the status branch does not grow while nothing new is pushed.
    let commits = s.status_commits();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        s.status_commits(),
        commits,
        "an invalid revision stalls until a new commit"
    );
}

/// A daemon polling every `poll_interval` against a sandbox slowed to 300 ms a request,
/// applying one step at a time, returned once its first apply has begun, with the daemon's pid.
fn daemon_in_a_slow_apply(poll_interval: &str) -> (Setup, u32) {
    let mut s = Setup::new("homelab-k3s");
    s.sandbox().knobs().set_latency(Duration::from_millis(300));
    let url = s.file_url();
    s.start_daemon(&url, &["--poll-interval", poll_interval, "--parallelism", "1"]);
    wait_until(Duration::from_secs(60), || {
        s.log().contains("step started").then_some(())
    })
    .expect("an apply starts");
    let pid = s.daemon.as_ref().unwrap().0.id();
    (s, pid)
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

#[test]
fn sigterm_during_an_apply_stops_between_steps_and_leaves_no_half_written_file() {
    let (mut s, pid) = daemon_in_a_slow_apply("1h");
    signal(pid, "-TERM");
    let exited = wait_until(Duration::from_secs(60), || {
        s.daemon.as_mut().unwrap().0.try_wait().ok().flatten()
    });
    let code = exited.unwrap_or_else(|| panic!("the daemon exits after SIGTERM\n{}", s.log()));
    assert!(code.success(), "clean exit: {code:?}\n{}", s.log());
    // Every config file is whole: Proxmox's strict parser reads each one.
    let dir = s.state.join("nodes/pve/lxc");
    let confs: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    for e in &confs {
        let text = std::fs::read_to_string(e.path()).unwrap();
        driftless::pve::conf::parse(&text, driftless::pve::conf::PveKind::Lxc)
            .unwrap_or_else(|err| panic!("{} is not a whole config: {err}\n{text}", e.path().display()));
        assert!(
            !e.file_name().to_string_lossy().contains(".tmp")
                && !e.file_name().to_string_lossy().contains(".driftless"),
            "no temporary file left"
        );
    }
    let r = s.report("heads/main").expect("the interrupted run is reported");
    assert_eq!(r["outcome"], "failed", "{r}");
    assert!(r.to_string().contains("stopped by shutdown"), "{r}");
    let not_done = r["applied"]["not_done"].as_array().expect("steps not done");
    assert!(!not_done.is_empty(), "the apply stopped before the end: {r}");
    assert!(confs.len() < 3, "the apply stopped before the end: {}", confs.len());
}

#[test]
fn a_commit_to_a_local_repository_is_noticed_without_waiting_for_the_poll() {
    let mut s = Setup::new("homelab-k3s");
    let url = s.bare.display().to_string();
    s.start_daemon(&url, &["--poll-interval", "1h"]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str()
    });
    let second = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        "main",
    );
    let r = s.wait_report("heads/main", Duration::from_secs(20), |r| {
        r["revision"] == second.as_str()
    });
    assert_eq!(r["outcome"], "applied", "{r}");
}

#[test]
fn the_quickstart_demo_shows_the_whole_loop() {
    let keep = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(testkit::sandbox_bin())
        .args(["demo", "--keep"])
        .arg(keep.path())
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "1. The first apply",
        "ok   node k3s-worker-2 Ready",
        "outcome | **applied**",
        "`memory` | 4096 | 6144",
        "drift found",
        "`cores` | 8 | 2",
    ] {
        assert!(stdout.contains(want), "the demo shows {want:?}:\n{stdout}");
    }
    // What the demo points at is really there.
    let bare = keep.path().join("homelab.git");
    let log = git(&bare, &["log", "--oneline", "driftless/status"]);
    assert!(log.lines().count() >= 3, "{log}");
    assert!(keep.path().join("pve/nodes/pve/lxc/100.conf").exists());
}

#[test]
fn suspend_plans_and_reports_without_applying() {
    let mut s = Setup::new("homelab-k3s");
    let cluster = std::fs::read_to_string(s.work.join("cluster.yaml")).unwrap();
    let suspended = s.push_change(
        "cluster.yaml",
        &cluster.replace("ownership_tag: driftless", "ownership_tag: driftless\n  suspend: true"),
        "suspend",
        "main",
    );
    let url = s.file_url();
    s.start_daemon(&url, &["--poll-interval", "1h"]);
    let r = s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == suspended.as_str()
    });
    assert_eq!(r["outcome"], "suspended", "{r}");
    assert_eq!(
        r["plan"]["steps"].as_array().unwrap().len(),
        3,
        "the plan is still reported: {r}"
    );
    assert!(s.conf(100).is_empty(), "nothing was applied");
    // `driftless status` reads the report back from the status branch.
    let out = std::process::Command::new(testkit::driftless_bin())
        .args(["status", "--repository", &url])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.starts_with(&format!("refs/heads/main @ {}: reconcile suspended", &suspended[..12])),
        "{stdout}"
    );
}

#[test]
fn auto_correct_applies_drift_back() {
    let mut s = Setup::new("homelab-k3s");
    let url = s.file_url();
    s.start_daemon(
        &url,
        &[
            "--poll-interval",
            "1h",
            "--drift-interval",
            "2s",
            "--auto-correct",
            "true",
        ],
    );
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str() && r["outcome"] == "applied"
    });
    driftless_sandbox::pct(&s.state, &["set".into(), "101".into(), "--cores".into(), "8".into()]).unwrap();
    let r = s.wait_report("heads/main", Duration::from_secs(30), |r| {
        r["outcome"] == "drift_found" && r["applied"].is_object()
    });
    assert_eq!(r["applied"]["done"][0]["ok"], true, "{r}");
    assert!(s.conf(101).contains("cores: 2\n"), "corrected: {}", s.conf(101));
}

/// A full apply of both layers by the daemon: every log line and every report committed to
/// git is free of the K3s join token, the Kubernetes API token and the Talos secrets bundle.
#[test]
fn the_daemons_logs_and_reports_of_a_full_cluster_apply_carry_no_secret() {
    for example in ["homelab-k3s", "homelab-talos"] {
        let mut s = Setup::new(example);
        s.cluster_layer = true;
        let secrets = s.dir.path().join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        let bundle = driftless::cluster::talos_secrets::TalosSecrets::generate();
        std::fs::write(secrets.join("talos-secrets"), bundle.to_yaml()).unwrap();
        let url = format!("file://{}", s.bare.display());
        s.start_daemon(&url, &["--poll-interval", "1h"]);
        let first = git(&s.work, &["rev-parse", "HEAD"]);
        let r = s.wait_report("heads/main", Duration::from_secs(120), |r| {
            r["revision"] == first.as_str()
        });
        assert_eq!(r["outcome"], "applied", "{example}: {r}\n{}", s.log());
        assert!(secrets.join("kubeconfig").exists(), "{example}");

        let mut printed = s.log();
        for file in ["status/heads/main.md", "status/heads/main.json"] {
            printed.push_str(&git(&s.bare, &["show", &format!("driftless/status:{file}")]));
        }
        assert!(
            printed.contains("Ready, API ready"),
            "{example}: the reports show the gates\n{printed}"
        );
        let mut values = vec![s.sandbox().kube.token.clone()];
        if example == "homelab-k3s" {
            let token = std::fs::read_to_string(
                driftless_sandbox::k3s_sim::rootfs(&s.state, 100).join("var/lib/rancher/k3s/server/node-token"),
            )
            .unwrap();
            values.push(token.trim().rsplit("::server:").next().unwrap().to_string());
        } else {
            for field in bundle.field_names() {
                values.push(bundle.get(field).unwrap().to_string());
                if let Ok(pem) = bundle.pem(field) {
                    values.extend(
                        pem.lines()
                            .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                            .map(String::from),
                    );
                }
            }
        }
        for v in values {
            assert!(!printed.contains(&v), "{example}: a secret reached a log or report");
        }
    }
}

/// The worker processes a daemon started (its children named driftless), from /proc.
fn workers_of(daemon: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let ppid = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1));
        if ppid == Some(daemon.to_string().as_str()) && stat.contains("(driftless)") {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_run_whose_worker_is_killed_is_reported_failed_and_the_daemon_carries_on() {
    let (mut s, daemon) = daemon_in_a_slow_apply("2s");
    let workers = wait_until(Duration::from_secs(10), || {
        let w = workers_of(daemon);
        (!w.is_empty()).then_some(w)
    })
    .expect("each run has a worker process");
    // The long-lived daemon holds no run: killing the worker outright is a lost run, no more.
    for pid in workers {
        signal(pid, "-KILL");
    }
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    let r = s.wait_report("heads/main", Duration::from_secs(30), |r| {
        r["revision"] == first.as_str() && r["outcome"] == "failed"
    });
    assert!(
        r["errors"].to_string().contains("killed by signal 9"),
        "the report says what happened: {r}"
    );
    assert!(
        s.daemon.as_mut().unwrap().0.try_wait().unwrap().is_none(),
        "the daemon is still running\n{}",
        s.log()
    );
    // The failed revision is retried with backoff, in a new worker, and converges.
    s.sandbox().knobs().set_latency(Duration::ZERO);
    let r = s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str() && r["outcome"] == "applied"
    });
    assert_eq!(r["last_applied_revision"], first.as_str(), "{r}");
}

#[test]
fn with_verify_in_the_config_an_unsigned_push_waits_for_a_signed_one() {
    let keys = crate::verify::Keys::new();
    let mut s = Setup::new("homelab-k3s");
    let config = s.dir.path().join("daemon.yaml");
    std::fs::write(
        &config,
        format!(
            "poll_interval: 1s\nverify:\n  mode: head\n  allowed_signers: {}\n",
            keys.allowed_signers.display()
        ),
    )
    .unwrap();
    let url = s.file_url();
    s.start_daemon(&url, &["--config", config.to_str().unwrap()]);
    // The seed commit is unsigned: nothing is applied, and the report says which commit and why.
    let seed = git(&s.work, &["rev-parse", "HEAD"]);
    let r = s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == seed.as_str()
    });
    assert_eq!(r["outcome"], "unverified", "{r}");
    assert_eq!(r["verification"]["commits"][0]["rejected"], "unsigned", "{r}");
    assert_eq!(r["last_applied_revision"], serde_json::Value::Null, "{r}");
    let md = git(&s.bare, &["show", "driftless/status:status/heads/main.md"]);
    assert!(md.contains("| outcome | **unverified** |"), "{md}");
    assert!(md.contains(&format!("commit {seed} is not signed")), "{md}");
    assert_eq!(s.conf(100), "", "nothing applied");

    let signed = s.commit_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        &crate::verify::strs(&keys.ssh(&keys.alice)),
    );
    s.push("main");
    let r = s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == signed.as_str()
    });
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(r["verification"]["verified"], true, "{r}");
    assert!(s.conf(100).contains("lxc.apparmor.profile: unconfined"));
    assert!(s.conf(102).contains("memory: 6144"), "{}", s.conf(102));
}

#[test]
fn a_revision_that_sets_what_the_daemons_policy_forbids_is_refused_with_its_line() {
    let mut s = Setup::new("homelab-k3s");
    let config = s.dir.path().join("daemon.yaml");
    // Whoever can push to main is root on the host through a raw hook; this operator forbids it.
    std::fs::write(&config, "poll_interval: 1s\npolicy:\n  forbid_raw_lxc: [lxc.hook.]\n").unwrap();
    let url = s.file_url();
    s.start_daemon(&url, &["--config", config.to_str().unwrap()]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str() && r["outcome"] == "applied"
    });
    let node = std::fs::read_to_string(s.work.join("nodes/k3s-worker-1.yaml")).unwrap();
    let hook = format!(
        "{node}deviations: [{{adr: ADR-001, keys: [lxc.raw], reason: a hook}}]\nlxc:\n  raw:\n    - lxc.hook.pre-start: /bin/sh -c 'id > /tmp/pwned'\n"
    );
    let bad = s.push_change("nodes/k3s-worker-1.yaml", &hook, "a hook", "main");
    let r = s.wait_report("heads/main", Duration::from_secs(60), |r| r["revision"] == bad.as_str());
    assert_eq!(r["outcome"], "invalid", "{r}");
    let error = r["errors"][0].as_str().unwrap();
    assert!(error.contains("nodes/k3s-worker-1.yaml:"), "{r}");
    assert!(error.contains("policy.forbid_raw_lxc"), "{r}");
    assert!(
        !s.conf(101).contains("lxc.hook"),
        "nothing of it applied: {}",
        s.conf(101)
    );
}

/// A listener standing for a server a pull request's author runs: it counts who connects.
fn attacker_listener() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    (port, seen)
}

/// main's cluster.yaml pointed at the sandbox on loopback and pinned to its certificate.
fn cluster_at(s: &Setup, api: &str, fingerprint: &str) -> String {
    std::fs::read_to_string(s.work.join("cluster.yaml"))
        .unwrap()
        .replace("https://192.168.2.10:8006", api)
        .replace(
            "# fingerprint: \"AB:CD:...\"",
            &format!("fingerprint: \"{fingerprint}\""),
        )
}

#[test]
fn a_hostile_pull_request_cannot_send_the_token_elsewhere_or_set_the_schedule() {
    let mut s = Setup::new("homelab-k3s");
    s.proxmox_from_repository = true;
    let (url, fp, token) = (
        s.sandbox().url.clone(),
        s.sandbox().fingerprint.clone(),
        s.sandbox().token.clone(),
    );
    let main = s.push_change("cluster.yaml", &cluster_at(&s, &url, &fp), "the lab's API", "main");
    let repo = s.file_url();
    s.start_daemon(&repo, &["--poll-interval", "1s", "--plan-refs", "refs/heads/pr/*"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == main.as_str() && r["outcome"] == "applied"
    });

    // The pull request sends the API (and so the token) to its author's server, pins that
    // server's certificate, and asks for a one-second schedule.
    let (port, seen) = attacker_listener();
    let hostile_fp = ["AB"; 32].join(":");
    let hostile = std::fs::read_to_string(s.work.join("cluster.yaml"))
        .unwrap()
        .replace(&url, &format!("https://127.0.0.1:{port}"))
        .replace(&fp, &hostile_fp)
        .replace("interval: 5m", "interval: 1s");
    assert!(hostile.contains(&hostile_fp));
    let pr = s.push_change("cluster.yaml", &hostile, "faster", "pr/9");
    let r = s.wait_report("heads/pr/9", Duration::from_secs(60), |r| r["revision"] == pr.as_str());
    assert_eq!(r["outcome"], "planned", "planned against the trusted API: {r}");
    let ignored: Vec<&str> = r["untrusted_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(ignored.contains(&"proxmox (API, certificate, token, hosts)"), "{r}");
    assert!(ignored.contains(&"reconcile"), "{r}");
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the attacker's server was dialled"
    );
    let md = git(&s.bare, &["show", "driftless/status:status/heads/pr/9.md"]);
    assert!(md.contains("### Not used for this plan"), "{md}");
    let secret = token.rsplit('=').next().unwrap();
    assert!(!md.contains(secret) && !s.log().contains(secret), "the token leaked");
    // The schedule stays main's: no drift or reconcile report appears every second for main.
    let commits = s.status_commits();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        s.status_commits() <= commits + 1,
        "main's schedule was changed by the pull request"
    );
}

#[test]
fn a_pull_request_is_planned_with_the_read_only_plan_token() {
    let mut s = Setup::new("homelab-k3s");
    // A token the sandbox does not know: the pull request's plan must fail with it, while
    // main keeps applying with the daemon's writing token.
    let plan_token = s.dir.path().join("plan-token");
    std::fs::write(&plan_token, "auditor@pve!plan=00000000-0000-0000-0000-000000000000\n").unwrap();
    let url = s.file_url();
    s.start_daemon(
        &url,
        &[
            "--poll-interval",
            "1s",
            "--plan-refs",
            "refs/heads/pr/*",
            "--plan-token-file",
            plan_token.to_str().unwrap(),
        ],
    );
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str() && r["outcome"] == "applied"
    });
    let pr = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 8),
        "8 GiB",
        "pr/3",
    );
    let r = s.wait_report("heads/pr/3", Duration::from_secs(60), |r| r["revision"] == pr.as_str());
    assert_eq!(r["outcome"], "failed", "{r}");
    let errors = r["errors"].to_string();
    assert!(errors.contains("401") || errors.contains("authentication"), "{r}");
    assert!(
        !errors.contains("00000000-0000"),
        "the plan token's secret is in the report: {r}"
    );
}

#[test]
fn a_force_push_to_an_older_commit_is_applied_and_reported_as_rewritten_history() {
    let mut s = Setup::new("homelab-k3s");
    let url = s.file_url();
    s.start_daemon(&url, &["--poll-interval", "1s"]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str() && r["outcome"] == "applied"
    });
    let second = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "6 GiB",
        "main",
    );
    let r = s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == second.as_str()
    });
    assert_eq!(r["outcome"], "applied", "{r}");
    assert!(
        r.get("history_rewritten").is_none(),
        "a fast-forward is not a rewrite: {r}"
    );

    git(&s.work, &["reset", "-q", "--hard", &first]);
    s.push("main");
    let r = s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str()
    });
    assert_eq!(r["history_rewritten"], second.as_str(), "{r}");
    assert_eq!(r["outcome"], "applied", "the older revision is what main says now: {r}");
    let md = git(&s.bare, &["show", "driftless/status:status/heads/main.md"]);
    assert!(md.contains("**History rewritten**"), "{md}");
    assert!(s.conf(102).contains("memory: 4096"), "{}", s.conf(102));
}

#[test]
fn a_status_report_the_remote_refused_is_pushed_once_it_accepts_again() {
    use std::os::unix::fs::PermissionsExt;
    let mut s = Setup::new("homelab-k3s");
    // The remote refuses every push while the gate file exists.
    let gate = s.dir.path().join("remote-refuses");
    std::fs::write(&gate, "").unwrap();
    let hook = s.bare.join("hooks/pre-receive");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\n[ -e '{}' ] && exit 1\nexit 0\n", gate.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let url = s.file_url();
    s.start_daemon(&url, &["--poll-interval", "1s"]);
    wait_until(Duration::from_secs(60), || {
        s.log().contains("queued, retried on the next poll").then_some(())
    })
    .unwrap_or_else(|| panic!("the push is refused and the report queued\n{}", s.log()));
    assert!(s.report("heads/main").is_none());

    std::fs::remove_file(&gate).unwrap();
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    let r = s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == first.as_str()
    });
    assert_eq!(r["outcome"], "applied", "{r}");
    assert!(s.log().contains("queued status report pushed"), "{}", s.log());
}
