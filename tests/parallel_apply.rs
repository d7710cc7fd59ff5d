//! Apply runs independent steps side by side: thirty containers converge against the sandbox,
//! with tasks that take as long as a real host's, in a small multiple of one container's time
//! instead of thirty times it.

use driftless_sandbox::{self as sandbox, SandboxOptions, TaskDurations};
use std::time::{Duration, Instant};

/// A repository of `nodes` LXC nodes (the seed's ADRs, K3s), written to a directory.
fn repository(nodes: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, bytes) in testkit::generate::generate(nodes).files {
        let target = dir.path().join(&path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }
    dir
}

/// Apply `repo` (guests only) into a fresh sandbox whose tasks take `durations`: how long it
/// took, and the most Proxmox tasks that ran at once.
fn converge(repo: &std::path::Path, durations: TaskDurations, parallelism: &str) -> (Duration, u64) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = tempfile::tempdir().unwrap();
    let handle = rt.block_on(sandbox::start(SandboxOptions::new(state.path()))).unwrap();
    handle.knobs().set_task_durations(durations);
    let token = state.path().join("token");
    std::fs::write(&token, &handle.token).unwrap();
    let started = Instant::now();
    let r = testkit::run([
        "--repo",
        &repo.display().to_string(),
        "apply",
        "--auto-approve",
        "--guests-only",
        "--parallelism",
        parallelism,
        "--proxmox-url",
        &handle.url,
        "--proxmox-token-file",
        &token.display().to_string(),
        "--proxmox-fingerprint",
        &handle.fingerprint,
        "--host-shell",
        "local",
        "--pve-root",
        &state.path().display().to_string(),
        "--pct-command",
        &testkit::pct_command(state.path()),
    ]);
    let took = started.elapsed();
    r.expect_code(0, "apply");
    let most = handle.knobs().most_tasks_at_once();
    rt.block_on(handle.shutdown());
    (took, most)
}

#[test]
fn thirty_containers_converge_side_by_side_in_a_fraction_of_thirty_times_one() {
    let durations = TaskDurations {
        create: Duration::from_millis(2000),
        start: Duration::from_millis(500),
        other: Duration::from_millis(200),
    };
    let (one, _) = converge(repository(1).path(), durations, "8");
    let (thirty, most) = converge(repository(30).path(), durations, "8");
    eprintln!("one container: {one:?}; thirty: {thirty:?}; at most {most} tasks at once");
    assert!(most >= 8, "no more than {most} tasks ran at once");
    assert!(
        most <= 8,
        "{most} tasks at once on one Proxmox node, above the bound of 8"
    );
    // ceil(30 / 8) = 4 rounds of one container's chain; 30 in a row would be 30 times one.
    assert!(
        thirty < one * 10,
        "30 containers took {thirty:?}, one took {one:?}: not side by side"
    );
}
