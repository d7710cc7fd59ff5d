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
