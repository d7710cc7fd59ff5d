//! The fault matrix: an apply meets a fault (a health gate that does not pass, a driftless
//! process killed at a step boundary, an API that answers 5xx or slowly or restarts, a second
//! apply at the same time) and the next applies converge: `plan --detailed-exitcode` exits 0
//! after a bounded number of them, no guest is made twice, and no config file is left empty,
//! truncated or as a temporary file.

use testkit::cluster_env::Env;

fn verbs(plan: &serde_json::Value) -> Vec<String> {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s["action"].as_str().unwrap(), s["node"].as_str().unwrap()))
        .collect()
}

/// `plan --detailed-exitcode`: 0 converged, 2 changes to make.
fn plan_code(env: &Env) -> i32 {
    env.run(&["plan"], &["--detailed-exitcode"]).code
}

#[test]
fn a_health_gate_that_failed_is_planned_again_until_the_node_is_ready() {
    let env = Env::new("homelab-k3s");
    env.apply();
    // A label makes worker-1's config change; its kubelet never gets Ready again.
    let worker = env.repo.path().join("nodes/k3s-worker-1.yaml");
    let base = std::fs::read_to_string(&worker).unwrap();
    std::fs::write(&worker, format!("{base}labels:\n  tier: storage\n")).unwrap();
    env.sandbox().set_never_ready(&["k3s-worker-1"]).unwrap();
    env.gate_timeout.set("2s");
    let failed = env.run(&["apply"], &["--auto-approve"]);
    assert_ne!(failed.code, 0, "{}", failed.stdout);
    assert!(
        failed.stdout.contains("k3s-worker-1 did not become Ready"),
        "{}\n{}",
        failed.stdout,
        failed.stderr
    );

    // The failure is state: the next plan restarts worker-1 and gates it again, and says why.
    let plan = env.run(&["plan"], &["--detailed-exitcode"]);
    assert_eq!(plan.code, 2, "{}\n{}", plan.stdout, plan.stderr);
    assert!(plan.stdout.contains("k3s-worker-1 is not Ready"), "{}", plan.stdout);
    let again = env.run(&["apply"], &["--auto-approve"]);
    assert_ne!(again.code, 0, "still not Ready: {}", again.stdout);
    assert!(!again.stdout.contains("Nothing to apply"), "{}", again.stdout);

    env.gate_timeout.set("20s");
    env.sandbox().set_never_ready(&[]).unwrap();
    // Recovered: the label step the failed gate left undone runs, and the plan is empty.
    let healed = env.apply();
    assert!(healed.stderr.contains("set label tier"), "{}", healed.stderr);
    assert_eq!(plan_code(&env), 0);
    assert_eq!(verbs(&env.plan_json()), Vec::<String>::new());
    env.run(&["health"], &[]).expect_code(0, "health");
}

/// `driftless --repo REPO apply --auto-approve ARGS... <env's connection flags>`, started in
/// the background with its stderr (the progress lines) piped.
fn spawn_apply(env: &Env, extra: &[&str]) -> std::process::Child {
    testkit::command()
        .arg("--repo")
        .arg(env.repo.path())
        .args(["apply", "--auto-approve"])
        .args(extra)
        .args(env.args())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Read `child`'s stderr line by line until a line contains `needle`; the lines read.
fn wait_for_line(
    child: &mut std::process::Child,
    needle: &str,
) -> (Vec<String>, std::io::BufReader<std::process::ChildStderr>) {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("the apply ended before `{needle}`:\n{}", seen.join(""));
        }
        let found = line.contains(needle);
        seen.push(line);
        if found {
            return (seen, reader);
        }
    }
}

/// The guest config files under the sandbox's /etc/pve, by vmid. Panics on a file that is
/// empty, on a temporary file left beside them, or on a vmid that has two files.
fn guest_configs(env: &Env) -> Vec<u32> {
    let mut vmids = Vec::new();
    let nodes = env.state.path().join("nodes");
    for node in std::fs::read_dir(&nodes).unwrap() {
        for kind in ["lxc", "qemu-server"] {
            let Ok(dir) = std::fs::read_dir(node.as_ref().unwrap().path().join(kind)) else {
                continue;
            };
            for file in dir {
                let path = file.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let vmid: u32 = name
                    .strip_suffix(".conf")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("a file that is not a guest config was left: {}", path.display()));
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    text.contains("hostname:") || text.contains("name:"),
                    "{} is cut short: {text:?}",
                    path.display()
                );
                vmids.push(vmid);
            }
        }
    }
    vmids.sort();
    let mut unique = vmids.clone();
    unique.dedup();
    assert_eq!(unique, vmids, "a guest was made twice");
    vmids
}

#[test]
fn two_applies_at_once_run_one_after_the_other_and_a_second_that_cannot_wait_names_the_first() {
    let env = Env::new("homelab-k3s");
    let mut first = spawn_apply(&env, &[]);
    let (_, rest) = wait_for_line(&mut first, "start  create k3s-master");

    // Over the real sshd: the lock is held on the "Proxmox host" for the first apply's length.
    let refused = env.run(&["apply"], &["--auto-approve", "--lock-wait", "1s"]);
    assert_eq!(refused.code, 1, "{}\n{}", refused.stdout, refused.stderr);
    assert!(
        refused
            .stderr
            .contains("cannot take the run lock: another driftless run holds")
            && refused.stderr.contains("driftless apply by"),
        "{}",
        refused.stderr
    );
    assert!(
        !refused.stdout.contains("create k3s-master"),
        "it planned nothing: {}",
        refused.stdout
    );

    // A second apply that may wait does, then plans what the first left: nothing.
    let waited = env.run(&["apply"], &["--auto-approve", "--lock-wait", "120s"]);
    let status = first.wait().unwrap();
    drop(rest);
    assert!(status.success(), "the first apply");
    assert_eq!(waited.code, 0, "{}\n{}", waited.stdout, waited.stderr);
    assert!(waited.stdout.contains("Nothing to apply."), "{}", waited.stdout);
    assert_eq!(plan_code(&env), 0);
    assert_eq!(guest_configs(&env), [100, 101, 102]);
}

/// An apply of the Proxmox layer alone (`--guests-only`) with one step at a time, under the
/// sandbox's fault knobs; then applies until the plan is empty, at most `bound` in all.
/// Returns how many applies it took.
fn converge_guests(env: &Env, bound: usize) -> usize {
    for n in 1..=bound {
        let r = env.run(&["apply"], &["--auto-approve", "--guests-only"]);
        if r.code == 0 {
            let plan = env.run(&["plan"], &["--guests-only", "--detailed-exitcode"]);
            if plan.code == 0 {
                return n;
            }
        } else {
            // A failed attempt says what it did and did not do.
            assert!(
                r.stdout.contains("Applied ") || r.stderr.contains("error"),
                "{}\n{}",
                r.stdout,
                r.stderr
            );
        }
    }
    panic!("not converged after {bound} applies");
}

#[test]
fn an_api_answering_5xx_to_30_or_60_percent_of_requests_converges_without_a_duplicate_guest() {
    // Reads are retried; a create or update answered 5xx is not (it may have taken effect):
    // it stops that apply, and the next one re-plans from what is there.
    for (rate, bound) in [(0.3, 12), (0.6, 40)] {
        let env = Env::new("homelab-k3s");
        env.sandbox().knobs().set_error_rate(rate);
        converge_guests(&env, bound);
        env.sandbox().knobs().set_error_rate(0.0);
        assert_eq!(plan_code(&env), 2, "the cluster layer is still to do at {rate}");
        assert_eq!(guest_configs(&env), [100, 101, 102], "at {rate}");
    }
}

#[test]
fn an_api_answering_300_ms_late_converges_in_one_apply() {
    let env = Env::new("homelab-k3s");
    env.sandbox().knobs().set_latency(std::time::Duration::from_millis(300));
    assert_eq!(converge_guests(&env, 1), 1);
    assert_eq!(guest_configs(&env), [100, 101, 102]);
}

#[test]
fn an_api_restarted_mid_apply_is_waited_for_and_the_apply_finishes() {
    let mut env = Env::new("homelab-k3s");
    let before = env.sandbox().fingerprint.clone();
    let addr = env.sandbox().addr;
    // Tasks that take as long as a real host's, so the API goes away while one is polled.
    env.sandbox()
        .knobs()
        .set_task_durations(driftless_sandbox::TaskDurations::realistic());
    let mut apply = spawn_apply(&env, &["--guests-only", "--parallelism", "1"]);
    let (_, rest) = wait_for_line(&mut apply, "start  create k3s-master");
    std::thread::sleep(std::time::Duration::from_millis(500));

    let old = env.sandbox.take().unwrap();
    env.rt.block_on(old.shutdown());
    std::thread::sleep(std::time::Duration::from_secs(4));
    let options = driftless_sandbox::SandboxOptions {
        bind: addr,
        ..driftless_sandbox::SandboxOptions::new(env.state.path())
    };
    env.sandbox = Some(env.rt.block_on(driftless_sandbox::start(options)).unwrap());
    assert_eq!(
        env.sandbox().fingerprint,
        before,
        "the same certificate on the same state"
    );

    let out = apply.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    drop(rest);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("Applied 3 of 3 steps."), "{stdout}");
    assert!(
        stdout.contains("The Proxmox API did not answer as it should"),
        "the report says calls were retried: {stdout}"
    );
    assert_eq!(env.run(&["plan"], &["--guests-only", "--detailed-exitcode"]).code, 0);
    assert_eq!(guest_configs(&env), [100, 101, 102]);
}

/// The files driftless writes in a container's /etc/rancher/k3s: none empty, none left as a
/// temporary file.
fn check_node_files(env: &Env) {
    for vmid in [100, 101, 102] {
        let dir = driftless_sandbox::k3s_sim::rootfs(env.state.path(), vmid).join("etc/rancher/k3s");
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                ["config.yaml", "cluster-token", "k3s.yaml", "driftless-restart-pending"].contains(&name.as_str()),
                "a temporary file was left: {}",
                path.display()
            );
            assert!(
                std::fs::metadata(&path).unwrap().len() > 0,
                "{} is empty",
                path.display()
            );
        }
    }
}

#[test]
fn kill_9_at_every_step_boundary_of_the_k3s_example_then_apply_converges() {
    let env = Env::new("homelab-k3s");
    let mut kills = 0;
    // Each round lets one step finish, kills driftless as the next one starts, and checks
    // what is left; the next round re-plans from there. Nine steps: at most nine rounds.
    for round in 0..9 {
        if env.run(&["plan"], &["--detailed-exitcode"]).code == 0 {
            break;
        }
        // The lock the killed run held went with it: no wait is needed.
        let mut apply = spawn_apply(&env, &["--parallelism", "1", "--lock-wait", "1s"]);
        let (seen, rest) = wait_for_line(&mut apply, "] ok ");
        let (more, rest) = {
            use std::io::BufRead;
            let mut reader = rest;
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            (line, reader)
        };
        apply.kill().unwrap();
        let status = apply.wait().unwrap();
        drop(rest);
        if status.success() {
            break;
        }
        kills += 1;
        assert!(
            !seen.iter().any(|l| l.contains("FAILED")),
            "round {round}: {}{more}",
            seen.join("")
        );
        guest_configs(&env);
        check_node_files(&env);
    }
    assert!(kills >= 3, "driftless was killed at {kills} step boundaries");
    let last = env.run(&["apply"], &["--auto-approve", "--lock-wait", "1s"]);
    assert_eq!(last.code, 0, "{}\n{}", last.stdout, last.stderr);
    assert_eq!(plan_code(&env), 0);
    assert_eq!(guest_configs(&env), [100, 101, 102]);
    check_node_files(&env);
    env.run(&["health"], &[]).expect_code(0, "health");
}
