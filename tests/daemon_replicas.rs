//! Two daemon replicas against one repository and one sandbox, electing a leader through a
//! Lease in the sandbox's Kubernetes API: one applies, the other follows; when the leader is
//! killed the follower takes over and applies; nothing is applied twice.

use std::collections::BTreeSet;
use std::time::Duration;

use testkit::daemon_env::{Replica, Setup, worker2_with_memory};
use testkit::{git, git_try, wait_until};

/// Short timings keep the test quick; the order lease > renew deadline > retry is the rule.
fn config(s: &Setup, identity: &str) -> String {
    let path = s.dir.path().join(format!("{identity}.yaml"));
    let yaml = format!(
        "leader_election:\n  kubeconfig_file: {}\n  namespace: default\n  name: driftless\n  identity: {identity}\n  lease_duration: 4s\n  renew_deadline: 3s\n  retry_period: 1s\n",
        s.sandbox().kube.kubeconfig_path.display()
    );
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

/// Every report of the watched branch in the status branch's history, oldest first: revision,
/// outcome and the replica that ran it.
fn reports(s: &Setup) -> Vec<(String, String, String)> {
    let log = git_try(&s.bare, &["rev-list", "--reverse", "driftless/status"]).unwrap_or_default();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for commit in log.lines() {
        let Some(text) = git_try(&s.bare, &["show", &format!("{commit}:status/heads/main.json")]) else {
            continue;
        };
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        // A commit that changed another ref's report carries this one unchanged.
        if seen.insert((r["revision"].to_string(), r["started"].to_string())) {
            out.push((
                r["revision"].as_str().unwrap_or_default().to_string(),
                r["outcome"].as_str().unwrap_or_default().to_string(),
                r["replica"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}

fn applied_by(s: &Setup, revision: &str) -> Vec<String> {
    reports(s)
        .into_iter()
        .filter(|(rev, outcome, _)| rev == revision && outcome == "applied")
        .map(|(_, _, replica)| replica)
        .collect()
}

fn config_writes(s: &Setup) -> u64 {
    let counts = s.sandbox().request_counts();
    counts.get("PUT /nodes/{node}/lxc/{vmid}/config").copied().unwrap_or(0)
        + counts.get("POST /nodes/{node}/lxc").copied().unwrap_or(0)
}

fn metric(r: &Replica, name: &str) -> Option<String> {
    let (_, body) = r.get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
}

#[test]
fn two_replicas_elect_one_leader_and_the_follower_takes_over_when_it_is_killed() {
    let s = Setup::new("homelab-k3s");
    let url = s.file_url();
    let (config_a, config_b) = (config(&s, "replica-a"), config(&s, "replica-b"));
    let flags = |config: &str| {
        vec![
            "--poll-interval".to_string(),
            "1s".into(),
            "--config".into(),
            config.into(),
        ]
    };
    let a_flags = flags(&config_a);
    let b_flags = flags(&config_b);
    let a = s.start_replica(
        "replica-a",
        &url,
        &a_flags.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let b = s.start_replica(
        "replica-b",
        &url,
        &b_flags.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // One of them applies the seed commit; the report names it.
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    let r = s.wait_report("heads/main", Duration::from_secs(90), |r| {
        r["revision"] == first.as_str() && r["outcome"] == "applied"
    });
    let leader_name = r["replica"].as_str().expect("the report names its replica").to_string();
    let (leader, follower) = if leader_name == "replica-a" { (a, b) } else { (b, a) };
    assert_eq!(leader.name, leader_name);
    assert!(s.conf(100).contains("lxc.apparmor.profile: unconfined"));

    // The follower says so on /readyz (ready: it can take over) and in its metrics; it runs
    // nothing.
    let follower_ready = wait_until(Duration::from_secs(20), || {
        let (code, body) = follower.get("/readyz");
        (code == 200 && body.contains("follower")).then_some(body)
    })
    .unwrap_or_else(|| panic!("the follower is ready as a follower\n{}", follower.log()));
    assert_eq!(follower_ready, format!("ready: follower, leader {leader_name}"));
    assert_eq!(leader.get("/readyz"), (200, "ready: leader".to_string()));
    assert_eq!(follower.get("/healthz").0, 200);
    assert_eq!(metric(&leader, "driftless_leader").as_deref(), Some("1"));
    assert_eq!(metric(&follower, "driftless_leader").as_deref(), Some("0"));
    assert!(!follower.log().contains("reconciling"), "{}", follower.log());
    let writes_after_first = config_writes(&s);

    // The leader dies without a word; a new commit arrives.
    let leader_pid = leader.pid();
    drop(leader);
    assert!(
        wait_until(Duration::from_secs(10), || {
            (!std::path::Path::new(&format!("/proc/{leader_pid}")).exists()).then_some(())
        })
        .is_some(),
        "the leader is gone"
    );
    let second = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, 6),
        "worker-2: 6 GiB",
        "main",
    );
    let r = s.wait_report("heads/main", Duration::from_secs(90), |r| {
        r["revision"] == second.as_str() && r["outcome"] == "applied"
    });
    assert_eq!(r["replica"], follower.name.as_str(), "{r}");
    assert!(s.conf(102).contains("memory: 6144"), "{}", s.conf(102));
    assert_eq!(follower.get("/readyz"), (200, "ready: leader".to_string()));
    assert_eq!(metric(&follower, "driftless_leader").as_deref(), Some("1"));
    assert!(
        follower.log().contains("leading: this replica applies"),
        "{}",
        follower.log()
    );

    // Nothing applied twice: one applied report per commit, and the guests written once for
    // the seed and once for the change (the new leader found the seed already applied).
    assert_eq!(applied_by(&s, &first), [leader_name.as_str()], "{:?}", reports(&s));
    assert_eq!(applied_by(&s, &second), [follower.name.as_str()], "{:?}", reports(&s));
    assert_eq!(
        config_writes(&s),
        writes_after_first + 1,
        "{:?}",
        s.sandbox().request_counts()
    );

    // The Lease records the takeover.
    let spec = lease(&s);
    assert_eq!(spec["holderIdentity"], follower.name.as_str(), "{spec}");
    assert_eq!(spec["leaseTransitions"], 1, "{spec}");
    // The kubeconfig is a secret: its token is in no log.
    let token = &s.sandbox().kube.token;
    assert!(!follower.log().contains(token.as_str()));

    // A leader that is stopped releases the Lease: the next one need not wait for it to expire.
    let mut leader = follower;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &leader.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_until(Duration::from_secs(60), || leader.child.0.try_wait().ok().flatten())
        .unwrap_or_else(|| panic!("the leader stops\n{}", leader.log()));
    let spec = lease(&s);
    assert_eq!(spec.get("holderIdentity"), None, "{spec}\n{}", leader.log());
    assert!(
        leader.log().contains("leader election Lease released"),
        "{}",
        leader.log()
    );
}

/// The Lease's spec, as the sandbox's API server stored it.
fn lease(s: &Setup) -> serde_json::Value {
    let path = s
        .state
        .join(".sandbox/k8s/objects/coordination.k8s.io/leases/default/driftless.json");
    let stored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    stored["object"]["spec"].clone()
}
