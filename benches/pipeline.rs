//! Benchmark: load, validate and render a generated repository of 1,000 LXC nodes with the
//! seed's ADRs. Run with `cargo bench --bench pipeline`; numbers go to docs/benchmarks.md.

use driftless::model::{LoadOptions, load};
use driftless::render::render_all;
use std::time::{Duration, Instant};
use testkit::generate::generate;

const NODES: usize = 1000;

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
