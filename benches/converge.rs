//! Benchmark: converge LXC guests from empty against the sandbox Proxmox the way a user runs
//! it (the release `driftless` binary, `apply --auto-approve --guests-only`, the host shell
//! local with the sandbox's `pct`), and plan when nothing is left to do.
//!
//! * With tasks as long as a real host's (create 3 s, start 0.8 s), at parallelism 1 and 8,
//!   next to the physical limit: ceil(N / parallelism) x one guest's chain of tasks (its
//!   create then its start; nothing faster can exist without running more tasks at once).
//! * With instant tasks: what driftless itself costs (requests, polls, `pct set`, process).
//! * A no-change plan of 50 and of 200 guests, whole process: 1 listing + N config reads.
//!
//! Run with `cargo bench --bench converge`; numbers go to docs/benchmarks.md. The bench is
//! its own `pct` (`converge pct --state DIR set ...`, the sandbox's `pct` as a library): the
//! sandbox binary need not be built in release.

use driftless_sandbox::{self as sandbox, SandboxHandle, SandboxOptions, TaskDurations};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GUESTS: usize = 50;
const PLAN_GUESTS: [usize; 2] = [50, 200];
/// Ansible (community.proxmox 1.4) on the same 50 containers, from issue 11.
const ANSIBLE_CONVERGE: f64 = 77.9;
const ANSIBLE_NOOP: f64 = 29.5;
const ANSIBLE_READ_ONLY: f64 = 5.0;

/// A generated repository of `nodes` LXC nodes (the seed's ADRs, K3s), on disk.
fn repository(nodes: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, bytes) in testkit::generate::generate(nodes).files {
        let target = dir.path().join(&path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }
    dir
}

/// An empty sandbox Proxmox whose tasks take `durations`.
struct Sandbox {
    rt: tokio::runtime::Runtime,
    handle: Option<SandboxHandle>,
    state: tempfile::TempDir,
    token_file: PathBuf,
}

impl Sandbox {
    fn start(durations: TaskDurations) -> Sandbox {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = tempfile::tempdir().unwrap();
        let handle = rt.block_on(sandbox::start(SandboxOptions::new(state.path()))).unwrap();
        handle.knobs().set_task_durations(durations);
        let token_file = state.path().join("token");
        std::fs::write(&token_file, &handle.token).unwrap();
        Sandbox {
            rt,
            handle: Some(handle),
            state,
            token_file,
        }
    }

    fn handle(&self) -> &SandboxHandle {
        self.handle.as_ref().unwrap()
    }

    /// `driftless --repo REPO COMMAND ARGS... <connection to this sandbox>`, timed as a whole
    /// process.
    fn run(&self, repo: &Path, command: &str, args: &[&str]) -> (Duration, testkit::Run) {
        let state = self.state.path().display().to_string();
        let (url, fingerprint) = (&self.handle().url, &self.handle().fingerprint);
        let token = self.token_file.display().to_string();
        let pct = format!(
            "{} pct --state {}",
            std::env::current_exe().unwrap().display(),
            self.state.path().display()
        );
        let mut argv = vec!["--repo", repo.to_str().unwrap(), command];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&[
            "--guests-only",
            "--proxmox-url",
            url,
            "--proxmox-token-file",
            &token,
            "--proxmox-fingerprint",
            fingerprint,
            "--host-shell",
            "local",
            "--pve-root",
            &state,
            "--pct-command",
            &pct,
        ]);
        let t = Instant::now();
        let run = testkit::run(argv);
        (t.elapsed(), run)
    }

    /// Apply `repo` at `parallelism`: how long the process took.
    fn converge(&self, repo: &Path, parallelism: usize) -> Duration {
        let p = parallelism.to_string();
        let (took, run) = self.run(repo, "apply", &["--auto-approve", "--parallelism", &p]);
        run.expect_code(0, "apply");
        took
    }

    /// A plan that must find nothing to do: how long the process took, and the API requests
    /// it made.
    fn noop_plan(&self, repo: &Path) -> (Duration, u64) {
        let knobs = self.handle().knobs();
        knobs.reset_request_counts();
        let (took, run) = self.run(repo, "plan", &["--detailed-exitcode"]);
        run.expect_code(0, "plan after converge (0: nothing to do)");
        (took, knobs.total_requests())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.rt.block_on(handle.shutdown());
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// `converge pct --state DIR ARGS...`: what `driftless-sandbox pct` does, for the host
/// shell of the runs below.
fn pct(args: &[String]) -> ! {
    let [state, rest @ ..] = args else {
        eprintln!("usage: converge pct --state DIR ARGS...");
        std::process::exit(2)
    };
    match sandbox::pct(Path::new(state), rest) {
        Ok(out) => {
            print!("{out}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("pct: {e}");
            std::process::exit(1)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [command, flag, rest @ ..] = args.as_slice()
        && command == "pct"
        && flag == "--state"
    {
        pct(rest);
    }

    // `cargo bench --bench converge -- --plan-only`: only the no-change plans (seconds, not minutes).
    let plan_only = args.iter().any(|a| a == "--plan-only");
    let realistic = TaskDurations::realistic();
    // One new guest waits for its create, then its start: nothing else it does is a task.
    let chain = realistic.create + realistic.start;
    let repo = repository(GUESTS);
    let one = repository(1);

    let mut noop_sandboxes = Vec::new();
    if plan_only {
        let sb = Sandbox::start(TaskDurations::default());
        sb.converge(repo.path(), 8);
        noop_sandboxes.push((GUESTS, sb));
    } else {
        converge_tables(realistic, chain, &repo, &one, &mut noop_sandboxes);
    }
    noop_plans(&repo, noop_sandboxes);
}

/// The converge tables: realistic tasks at parallelism 1 and 8 next to the limit, then
/// instant tasks; one converged sandbox of the instant runs is kept for the no-change plan.
fn converge_tables(
    realistic: TaskDurations,
    chain: Duration,
    repo: &tempfile::TempDir,
    one: &tempfile::TempDir,
    noop_sandboxes: &mut Vec<(usize, Sandbox)>,
) {
    println!(
        "converge of {GUESTS} LXC guests from empty against the sandbox Proxmox (whole `driftless apply` process)"
    );
    println!(
        "tasks: create {:.1} s, start {:.1} s, others {:.1} s; one guest's chain of tasks {:.1} s",
        secs(realistic.create),
        secs(realistic.start),
        secs(realistic.other),
        secs(chain)
    );
    let single = Sandbox::start(realistic).converge(one.path(), 1);
    println!(
        "one guest alone: {:.2} s ({:.2} s above its chain)",
        secs(single),
        secs(single.saturating_sub(chain))
    );
    println!();
    println!("| tasks | parallelism | converge | limit ceil(N/p) x chain | ratio | most tasks at once |");
    println!("|---|---|---|---|---|---|");
    for parallelism in [1, 8] {
        let sb = Sandbox::start(realistic);
        let took = sb.converge(repo.path(), parallelism);
        let limit = chain * GUESTS.div_ceil(parallelism) as u32;
        println!(
            "| realistic | {parallelism} | {:.1} s | {:.1} s | {:.2}x | {} |",
            secs(took),
            secs(limit),
            secs(took) / secs(limit),
            sb.handle().knobs().most_tasks_at_once()
        );
    }
    for parallelism in [1, 8] {
        let mut times = Vec::new();
        for run in 0..3 {
            let sb = Sandbox::start(TaskDurations::default());
            times.push(sb.converge(repo.path(), parallelism));
            if parallelism == 8 && run == 0 {
                noop_sandboxes.push((GUESTS, sb));
            }
        }
        let (min, max) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
        println!(
            "| instant | {parallelism} | {:.2} s (median of 3; min {:.2}, max {:.2}) | | | |",
            secs(median(times)),
            secs(min),
            secs(max)
        );
    }
}

/// No-change plans of the converged sandboxes, and of 200 guests.
fn noop_plans(repo: &tempfile::TempDir, mut noop_sandboxes: Vec<(usize, Sandbox)>) {
    println!();
    println!("| no-change plan | whole process | API requests |");
    println!("|---|---|---|");
    let big = repository(PLAN_GUESTS[1]);
    let sb = Sandbox::start(TaskDurations::default());
    sb.converge(big.path(), 8);
    noop_sandboxes.push((PLAN_GUESTS[1], sb));
    for (guests, sb) in &noop_sandboxes {
        let repo = if *guests == GUESTS { repo.path() } else { big.path() };
        let mut times = Vec::new();
        let mut requests = 0;
        for _ in 0..7 {
            let (took, n) = sb.noop_plan(repo);
            times.push(took);
            requests = n;
        }
        let (min, max) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
        println!(
            "| {guests} guests | median {:.0} ms (min {:.0}, max {:.0}, 7 runs) | {requests} |",
            secs(median(times)) * 1000.0,
            secs(min) * 1000.0,
            secs(max) * 1000.0
        );
    }
    println!();
    println!(
        "Ansible on {GUESTS} containers (issue 11): converge {ANSIBLE_CONVERGE} s, second run {ANSIBLE_NOOP} s, read-only check {ANSIBLE_READ_ONLY} s"
    );
}
