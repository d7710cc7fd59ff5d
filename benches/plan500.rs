//! Benchmark: plan 500 guests against the sandbox Proxmox over HTTPS (pinned fingerprint),
//! every guest already as the repository wants it. Reports the time of one plan (observe +
//! diff) and the API requests it made: the target is one listing plus one config read per
//! managed guest. Run with `cargo bench --bench plan500`; numbers go to docs/benchmarks.md.

use driftless::adapters::proxmox::{ApiToken, ClientOptions, ProxmoxClient};
use driftless::adapters::tls::TlsTrust;
use driftless::apply::observe;
use driftless::model::{LoadOptions, load};
use driftless::plan::{desired_guests, plan};
use driftless::render::{ArtifactKind, render_all};
use driftless_sandbox::{self as sandbox, SandboxOptions};
use std::time::{Duration, Instant};

const GUESTS: usize = 500;

fn main() {
    let files = testkit::generate::generate(GUESTS);
    let desired = load(&files, &LoadOptions::default()).expect("valid");
    let artifacts = render_all(&desired).expect("renders");
    let guests = desired_guests(&desired, &artifacts);

    // The sandbox's state: every guest's config file as Proxmox would hold it, running.
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("nodes/pve/lxc");
    std::fs::create_dir_all(&dir).unwrap();
    let mut power = serde_json::Map::new();
    for a in artifacts.iter().filter(|a| a.kind == ArtifactKind::ProxmoxConf) {
        let node = desired.node(&a.node).unwrap();
        std::fs::write(dir.join(format!("{}.conf", node.vmid)), &a.content).unwrap();
        power.insert(
            node.vmid.to_string(),
            serde_json::json!({"status": "running", "since": 0}),
        );
    }
    std::fs::create_dir_all(state.path().join(".sandbox")).unwrap();
    std::fs::write(
        state.path().join(".sandbox/status.json"),
        serde_json::json!({ "guests": power }).to_string(),
    )
    .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.block_on(sandbox::start(SandboxOptions::new(state.path()))).unwrap();
    let token = ApiToken::parse(&handle.token).unwrap();

    let mut times = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..7 {
        // A fresh client each run, as a `driftless plan` process has: connection set-up counts.
        let client = ProxmoxClient::new(ClientOptions::new(
            vec![handle.url.clone()],
            token.clone(),
            TlsTrust::Fingerprint(handle.fingerprint.clone()),
        ))
        .unwrap();
        let t = Instant::now();
        let observed = rt.block_on(observe(&client, &guests)).expect("observe");
        let p = plan(&desired, &guests, &observed);
        times.push(t.elapsed());
        requests.push(client.request_count());
        assert!(p.is_empty(), "every guest is as the repository wants it");
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "plan/{GUESTS} guests against the sandbox (HTTPS): median {:.0} ms (min {:.0}, max {:.0}, {} runs); {} API requests per plan (1 listing + {} config reads)",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(*times.last().unwrap()),
        times.len(),
        requests[0],
        requests[0].saturating_sub(1)
    );
    rt.block_on(handle.shutdown());
}
