//! Benchmark the daemon as users run it (release build, a real process): time from a push to
//! the applied report with a webhook and with polling, CPU time and Proxmox requests of polls
//! that find nothing new, and the resident memory of an idle daemon.
//! Run with `cargo bench --bench daemon`; numbers go to docs/benchmarks.md.

use hmac::Mac;
use std::time::{Duration, Instant};
use testkit::daemon_env::{Setup, worker2_with_memory};
use testkit::git;

fn signed_post(port: u16, body: &str, secret: &str) {
    use std::io::{Read, Write};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let sig: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = format!(
        "POST /webhook HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: sha256={sig}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}

/// utime + stime of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

fn push_to_applied(s: &Setup, gib: u32, after_push: impl FnOnce()) -> Duration {
    let t = Instant::now();
    let commit = s.push_change(
        "nodes/k3s-worker-2.yaml",
        &worker2_with_memory(&s.work, gib),
        "resize",
        "main",
    );
    after_push();
    s.wait_report("heads/main", Duration::from_secs(60), |r| {
        r["revision"] == commit.as_str() && r["outcome"] == "applied"
    });
    t.elapsed()
}

fn main() {
    // Webhook: the poll interval is an hour, so only the webhook can trigger the fetch.
    let mut s = Setup::new("homelab-k3s");
    s.cluster_layer = true;
    std::fs::write(s.dir.path().join("webhook"), "bench-secret").unwrap();
    let url = s.serve_git();
    let secret = s.dir.path().join("webhook").display().to_string();
    s.start_daemon(&url, &["--poll-interval", "1h", "--webhook-secret-file", &secret]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(120), |r| {
        r["revision"] == first.as_str()
    });
    let mut webhook = Vec::new();
    for i in 0..5 {
        let port = s.listen;
        webhook.push(push_to_applied(&s, 5 + i, || {
            signed_post(port, r#"{"ref":"refs/heads/main"}"#, "bench-secret")
        }));
    }
    webhook.sort();
    drop(s);

    // Polling every 2 s over git://, with the cluster layer as users run it: the first
    // reconcile takes the sandbox from nothing to a Ready K3s cluster.
    let mut s = Setup::new("homelab-k3s");
    s.cluster_layer = true;
    let url = s.serve_git();
    let started = std::time::Instant::now();
    s.start_daemon(&url, &["--poll-interval", "2s"]);
    let first = git(&s.work, &["rev-parse", "HEAD"]);
    s.wait_report("heads/main", Duration::from_secs(120), |r| {
        r["revision"] == first.as_str() && r["outcome"] == "applied"
    });
    let from_empty = started.elapsed();
    let mut polling = Vec::new();
    for i in 0..5 {
        polling.push(push_to_applied(&s, 5 + i, || {}));
    }
    polling.sort();

    // Idle: polls that find nothing new. CPU per poll, Proxmox requests, resident memory.
    std::thread::sleep(Duration::from_secs(3));
    let pid = s.daemon.as_ref().unwrap().0.id();
    let requests_before = s.sandbox().knobs().total_requests();
    let cpu_before = cpu_time(pid);
    let idle = Duration::from_secs(20);
    let polls = idle.as_secs() / 2;
    std::thread::sleep(idle);
    let cpu = cpu_time(pid) - cpu_before;
    let requests = s.sandbox().knobs().total_requests() - requests_before;
    let rss = rss_kib(pid);
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    if let Ok(path) = std::env::var("DRIFTLESS_BENCH_SMAPS") {
        std::fs::copy(format!("/proc/{pid}/smaps"), path).unwrap();
    }

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "daemon: push-to-applied with a webhook: median {:.0} ms (min {:.0}, max {:.0}, 5 runs; includes plan + apply of one update)",
        ms(webhook[2]),
        ms(webhook[0]),
        ms(webhook[4])
    );
    println!(
        "daemon: push-to-applied polling every 2 s: median {:.0} ms (min {:.0}, max {:.0}, 5 runs)",
        ms(polling[2]),
        ms(polling[0]),
        ms(polling[4])
    );
    println!(
        "daemon: idle, {polls} polls finding nothing new: {:.1} ms CPU per poll ({:.0} ms in {} s, 10 ms clock ticks), {requests} Proxmox requests",
        ms(cpu) / polls as f64,
        ms(cpu),
        idle.as_secs()
    );
    println!(
        "daemon: start to a Ready 3-node K3s cluster in the sandbox (9 steps, gates included): {:.0} ms",
        ms(from_empty)
    );
    let field = |name: &str| -> f64 {
        rollup
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    println!(
        "daemon: idle resident memory (VmRSS): {:.1} MiB ({:.1} MiB anonymous, {:.1} MiB file-backed)",
        rss as f64 / 1024.0,
        field("Anonymous:"),
        rss as f64 / 1024.0 - field("Anonymous:")
    );
}
