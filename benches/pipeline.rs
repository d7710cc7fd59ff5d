//! Benchmark: load, validate and render a generated repository of 1,000 LXC nodes with the
//! seed's ADRs. Run with `cargo bench --bench pipeline`; numbers go to docs/benchmarks.md.

use driftless::model::{LoadOptions, RepoFiles, load};
use driftless::render::render_all;
use std::time::{Duration, Instant};

const NODES: usize = 1000;

fn generate(nodes: usize) -> RepoFiles {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/homelab-k3s");
    let mut files = driftless::source::read_dir(&root).expect("example repository");
    let cluster = String::from_utf8(files.files["cluster.yaml"].clone()).unwrap();
    let cluster = cluster
        .replace("cidr: 192.168.2.0/24", "cidr: 10.0.0.0/16")
        .replace("gateway: 192.168.2.1", "gateway: 10.0.0.1");
    files.insert("cluster.yaml", cluster);
    files.files.retain(|p, _| !p.starts_with("nodes/"));
    for i in 0..nodes {
        let role = if i < 3 { "server" } else { "agent" };
        let name = format!("node-{i:04}");
        let body = format!(
            "vmid: {}\nproxmox_node: pve\nkind: lxc\nrole: {role}\naddress: 10.0.{}.{}/16\nlabels:\n  homelab/rack: r{}\n",
            1000 + i,
            (i + 2) / 250,
            (i + 2) % 250 + 2,
            i % 8
        );
        files.insert(format!("nodes/{name}.yaml"), body);
    }
    files
}

fn main() {
    let files = generate(NODES);
    let run = || {
        let t = Instant::now();
        let desired = load(&files, &LoadOptions::default()).expect("generated repository is valid");
        let loaded = t.elapsed();
        let artifacts = render_all(&desired).expect("renders");
        assert_eq!(artifacts.len(), NODES * 3);
        (loaded, t.elapsed())
    };
    run(); // warm-up
    let mut totals: Vec<Duration> = Vec::new();
    let mut loads: Vec<Duration> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while totals.len() < 20 && (totals.len() < 3 || Instant::now() < deadline) {
        let (l, t) = run();
        loads.push(l);
        totals.push(t);
    }
    totals.sort();
    loads.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "pipeline/{NODES} nodes: load+validate median {:.1} ms; load+validate+render median {:.1} ms (min {:.1}, max {:.1}, {} runs)",
        ms(loads[loads.len() / 2]),
        ms(totals[totals.len() / 2]),
        ms(totals[0]),
        ms(*totals.last().unwrap()),
        totals.len()
    );
}
