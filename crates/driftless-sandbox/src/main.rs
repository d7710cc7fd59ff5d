//! `driftless-sandbox`: the simulated Proxmox VE, Kubernetes API and Talos API as a server,
//! its `pct`, and the demo that shows a newcomer the whole loop on one machine.
//!
//! The product binary (`driftless`) carries none of this; the demo runs driftless's daemon
//! loop from the library, and its run workers are this binary started as `daemon-run`.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use driftless::connect::Connection;
use driftless::daemon::config::DaemonFlags;
use driftless::reconcile::Reconcile;
use driftless::settings::{HostShellKind, ProxmoxOverrides, RunFlags, RunSettings};
use driftless_sandbox::{self as sandbox, SandboxHandle, SandboxOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

const EXAMPLES: &str = "\
Examples:
  driftless-sandbox demo                          # the whole loop, in a temporary directory
  driftless-sandbox demo --keep /tmp/demo         # keep the repository and /etc/pve to look at
  driftless-sandbox serve --state /tmp/pve        # then: set -a; . /tmp/pve/.sandbox/connection.env; set +a
  driftless-sandbox pct --state /tmp/pve set 101 --cores 8   # a change behind driftless's back";

/// A Proxmox VE API on loopback that behaves like the real one (paths, parameters, errors,
/// digests, tasks), with simulated containers running K3s, a Kubernetes API and a Talos API:
/// for trying driftless without a homelab, for its tests and its benchmarks.
#[derive(Debug, Parser)]
#[command(name = "driftless-sandbox", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Faults to try driftless against, as the tests inject them.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Faults")]
struct Faults {
    /// Added to every API request, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    latency_ms: u64,
    /// The fraction of API requests answered with HTTP 500 (0.0 to 1.0).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
    error_rate: f64,
    /// Change a guest's config once, between driftless reading and writing it, as a person
    /// in the web UI would: driftless must re-plan, never overwrite.
    #[arg(long)]
    concurrent_edit: bool,
    /// Tasks take as long as on a real host (create 3 s, start 0.8 s, others 0.3 s).
    #[arg(long)]
    realistic_tasks: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the whole loop on this machine: start a sandbox Proxmox, let `driftless daemon`
    /// apply an example homelab from a git repository into it, commit a change and see it
    /// applied, change a guest behind driftless's back and see the drift report.
    Demo {
        /// The example under examples/ to use.
        #[arg(long, default_value = "homelab-k3s")]
        example: String,
        /// Keep everything (the sandbox's /etc/pve, the git repository with its status
        /// branch) in DIR, to look around afterwards; a temporary directory otherwise.
        #[arg(long = "keep", value_name = "DIR")]
        state: Option<PathBuf>,
    },
    /// Serve the sandbox until interrupted, and print how to connect to it (an env file of
    /// DRIFTLESS_* settings that points driftless at it).
    Serve {
        /// The sandbox's /etc/pve: config files live under DIR/nodes/<node>/.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8006", value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// Serve plain HTTP instead of HTTPS.
        #[arg(long)]
        plain_http: bool,
        #[command(flatten)]
        faults: Faults,
    },
    /// `pct` for the sandbox: what a root shell on the sandbox's host runs (`pct set VMID
    /// --features ...`, `pct exec`, `pct push`), on the sandbox's files.
    Pct {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// One run of the daemon the demo started, in its own process. Not for people.
    #[command(hide = true, name = "daemon-run")]
    DaemonRun,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Pct { state, args } if args.first().is_some_and(|a| a == "exec") => {
            let out = sandbox::pct_exec(&state, &args[1..]).map_err(|e| anyhow::anyhow!("pct: {e}"))?;
            let mut stdout = std::io::stdout();
            let mut stderr = std::io::stderr();
            stdout.write_all(&out.stdout)?;
            stderr.write_all(&out.stderr)?;
            stdout.flush()?;
            // `pct exec` exits with the command's status, which the caller reads.
            std::process::exit(out.status);
        }
        Command::Pct { state, args } => {
            let out = sandbox::pct(&state, &args).map_err(|e| anyhow::anyhow!("pct: {e}"))?;
            print!("{out}");
            Ok(())
        }
        Command::Serve {
            state,
            listen,
            plain_http,
            faults,
        } => serve(&state, listen, !plain_http, &faults),
        Command::Demo { example, state } => demo(&example, state.as_deref()),
        Command::DaemonRun => driftless::daemon::worker::main(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A fresh token secret per sandbox run; the sandbox only listens on loopback.
fn fresh_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id())
}

/// The seed an earlier `serve` on this state used: its token (and everything else the seed
/// makes) stays the same across restarts on the same state.
fn kept_seed(state: &Path) -> Option<u64> {
    std::fs::read_to_string(state.join(".sandbox").join("seed"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|s| *s != 0)
}

fn sandbox_options(state: &Path, bind: std::net::SocketAddr, tls: bool) -> SandboxOptions {
    let seed = kept_seed(state).unwrap_or_else(fresh_seed);
    SandboxOptions {
        bind,
        tls,
        seed,
        token: sandbox::default_token(seed),
        ..SandboxOptions::new(state)
    }
}

/// Files that tell driftless how to reach this sandbox: the token, and an env file.
fn write_connection(handle: &SandboxHandle) -> Result<PathBuf> {
    let dir = handle.state_dir.join(".sandbox");
    std::fs::create_dir_all(&dir)?;
    let token = dir.join("token");
    std::fs::write(&token, format!("{}\n", handle.token))?;
    let exe = std::env::current_exe().context("cannot find the driftless-sandbox binary")?;
    let env = dir.join("connection.env");
    // A Talos secrets bundle of the sandbox's own, as `talosctl gen secrets` would make, for
    // examples/homelab-talos (its cluster.yaml names the secret `talos-secrets`).
    let secrets = dir.join("secrets");
    write_talos_bundle(&secrets)?;
    let mut text = format!(
        "DRIFTLESS_PROXMOX_URL={}\nDRIFTLESS_PROXMOX_TOKEN_FILE={}\nDRIFTLESS_PVE_ROOT={}\nDRIFTLESS_PCT_COMMAND=\"{} pct --state {}\"\nDRIFTLESS_HOST_SHELL=local\n",
        handle.url,
        token.display(),
        handle.state_dir.display(),
        exe.display(),
        handle.state_dir.display()
    );
    if !handle.fingerprint.is_empty() {
        text.push_str(&format!("DRIFTLESS_PROXMOX_FINGERPRINT={}\n", handle.fingerprint));
    }
    // The simulated cluster: its Kubernetes API, and a secrets directory for the kubeconfig
    // and talosconfig apply saves.
    text.push_str(&format!(
        "DRIFTLESS_KUBE_SERVER={}\nDRIFTLESS_TALOS_ENDPOINT={}\nDRIFTLESS_SECRETS_DIR={}\n",
        handle.kube.url,
        handle.talos.endpoint,
        secrets.display()
    ));
    std::fs::write(&env, text)?;
    Ok(env)
}

/// `<secrets>/talos-secrets`, unless one is there already (mode 0600).
fn write_talos_bundle(secrets: &Path) -> Result<()> {
    std::fs::create_dir_all(secrets)?;
    let path = secrets.join("talos-secrets");
    if !path.exists() {
        let bundle = driftless::cluster::talos_secrets::TalosSecrets::generate();
        std::fs::write(&path, bundle.to_yaml())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

fn serve(state: &Path, listen: std::net::SocketAddr, tls: bool, faults: &Faults) -> Result<()> {
    if !(0.0..=1.0).contains(&faults.error_rate) {
        anyhow::bail!("--error-rate {} is not a fraction between 0 and 1", faults.error_rate);
    }
    let rt = runtime()?;
    rt.block_on(async {
        let options = SandboxOptions {
            latency: std::time::Duration::from_millis(faults.latency_ms),
            error_rate: faults.error_rate,
            ..sandbox_options(state, listen, tls)
        };
        let handle = sandbox::start(options).await.context("cannot start the sandbox")?;
        handle.knobs().set_edit_between_read_and_write(faults.concurrent_edit);
        if faults.realistic_tasks {
            handle.knobs().set_task_durations(sandbox::TaskDurations::realistic());
        }
        let env = write_connection(&handle)?;
        println!("Sandbox Proxmox VE API at {}", handle.url);
        if !handle.fingerprint.is_empty() {
            println!("certificate fingerprint (SHA-256): {}", handle.fingerprint);
        }
        println!("state (its /etc/pve): {}", handle.state_dir.display());
        println!("simulated Kubernetes API at {}", handle.kube.url);
        println!("simulated Talos API at {}", handle.talos.endpoint);
        println!(
            "connection settings: {} (`set -a; . {}; set +a` in a shell)",
            env.display(),
            env.display()
        );
        println!("Press Ctrl-C to stop.");
        tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
        handle.shutdown().await;
        Ok(())
    })
}

fn example_dir(name: &str) -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("examples").join(name),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("cluster.yaml").is_file())
        .with_context(|| format!("cannot find examples/{name} (run from the driftless source tree)"))
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn say(title: &str) {
    let line = format!("==> {title}");
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m{line}\x1b[0m");
    } else {
        println!("\n{line}");
    }
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "homelab operator")
        .env("GIT_AUTHOR_EMAIL", "operator@homelab.invalid")
        .env("GIT_COMMITTER_NAME", "homelab operator")
        .env("GIT_COMMITTER_EMAIL", "operator@homelab.invalid")
        .output()
        .context("the demo needs the git CLI")?;
    if !out.status.success() {
        bail!("git {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Wait until the status branch holds a report for main at `commit` satisfying `want`.
async fn wait_report(
    bare: &Path,
    commit: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    // The first run sets up the cluster and its add-ons: on a loaded machine that takes a while.
    for _ in 0..1200 {
        if let Ok(text) = git(bare, &["show", "driftless/status:status/heads/main.json"])
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["revision"] == commit
            && want(&v)
        {
            return Ok(v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    bail!("the daemon did not report on {commit} within two minutes")
}

fn show_report(bare: &Path) -> Result<()> {
    let md = git(bare, &["show", "driftless/status:status/heads/main.md"])?;
    for line in md.lines() {
        println!("  | {line}");
    }
    Ok(())
}

fn demo(example: &str, state: Option<&Path>) -> Result<()> {
    let source = example_dir(example)?;
    // Everything lives in one directory: a temporary one, or --keep DIR to look around after.
    let temp = tempfile::tempdir()?;
    let root = state
        .map(Path::to_path_buf)
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&root)?;
    let bare = root.join("homelab.git");
    let clone = root.join("homelab");
    let state_dir = root.join("pve");
    struct Work(PathBuf);
    impl Work {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    let work = Work(root.clone());
    let rt = runtime()?;
    rt.block_on(async {
        let handle = sandbox::start(sandbox_options(&state_dir, "127.0.0.1:0".parse()?, true)).await?;
        say(&format!("A sandbox Proxmox VE API listens at {} (HTTPS, pinned by fingerprint)", handle.url));
        println!("Its config files live in {}/nodes/pve/, laid out like /etc/pve.", state_dir.display());

        git(work.path(), &["-c", "init.defaultBranch=main", "init", "-q", "--bare", &bare.display().to_string()])?;
        git(work.path(), &["-c", "init.defaultBranch=main", "init", "-q", &clone.display().to_string()])?;
        copy_tree(&source, &clone)?;
        git(&clone, &["add", "-A"])?;
        git(&clone, &["commit", "-q", "-m", "The seed homelab"])?;
        git(&clone, &["push", "-q", &bare.display().to_string(), "main"])?;
        let first = git(&clone, &["rev-parse", "HEAD"])?;
        say(&format!("A git repository {} holds examples/{example} on main", bare.display()));

        let token_file = work.path().join("pve-token");
        std::fs::write(&token_file, format!("{}\n", handle.token))?;
        let exe = std::env::current_exe()?;
        let run = RunSettings::resolve(RunFlags {
            proxmox: ProxmoxOverrides {
                url: Some(handle.url.clone()),
                token_file: Some(token_file),
                fingerprint: Some(handle.fingerprint.clone()),
                ..ProxmoxOverrides::default()
            },
            host_shell: Some(HostShellKind::Local),
            pve_root: Some(state_dir.display().to_string()),
            pct_command: Some(format!("{} pct --state {}", exe.display(), state_dir.display())),
            secrets_dir: Some(work.path().join("secrets")),
            kube_server: Some(handle.kube.url.clone()),
            ..RunFlags::default()
        });
        let settings = DaemonFlags {
            repository: Some(bare.display().to_string()),
            poll_interval: Some("30s".into()),
            plan_refs: vec!["refs/heads/pr/*".into()],
            drift_interval: Some("5s".into()),
            auto_correct: Some(false),
            listen: Some("127.0.0.1:0".into()),
            state_dir: Some(work.path().join("daemon")),
            ..DaemonFlags::default()
        }
        .resolve()?;
        let control = driftless::daemon::run::Control::default();
        let daemon = tokio::spawn(driftless::daemon::run::run_until(settings, run.clone(), control.clone()));
        say("driftless daemon watches it: it fetches, plans, applies, and commits a status report to driftless/status");

        say("1. The first apply: three K3s containers with the seed's LXC settings, K3s installed, agents joined");
        wait_report(&bare, &first, |r| r["outcome"] == "applied").await?;
        show_report(&bare)?;
        if let Ok(files) = driftless::source::read_dir(&clone)
            && let Ok(desired) = driftless::model::load(&files, &driftless::model::LoadOptions::default())
            && let Ok(artifacts) = driftless::render::render_all(&desired)
            && let Ok(connection) = Connection::open(&run, &desired.cluster, &desired.nodes)
            && let Ok(health) = Reconcile::connected(&desired, &desired, &artifacts, &connection).health().await
        {
            println!("\nThe cluster, as `driftless health` shows it (kubeconfig in {}):", work.path().join("secrets").display());
            for line in health.text().lines() {
                println!("  {line}");
            }
        }
        let conf = state_dir.join("nodes/pve/lxc/100.conf");
        println!("\n{} now holds:", conf.display());
        for line in std::fs::read_to_string(&conf)?.lines() {
            println!("  {line}");
        }

        say("2. A commit gives k3s-worker-2 6 GiB of memory (a recorded deviation from ADR-001)");
        let node = clone.join("nodes/k3s-worker-2.yaml");
        let mut text = std::fs::read_to_string(&node)?;
        text.push_str("memory: 6GiB\ndeviations:\n  - adr: ADR-001\n    keys: [memory]\n    reason: \"this node runs the database\"\n");
        std::fs::write(&node, text)?;
        git(&clone, &["commit", "-qam", "k3s-worker-2: 6 GiB for the database"])?;
        git(&clone, &["push", "-q", &bare.display().to_string(), "main"])?;
        let second = git(&clone, &["rev-parse", "HEAD"])?;
        wait_report(&bare, &second, |r| r["outcome"] == "applied").await?;
        show_report(&bare)?;

        say("3. Someone runs `pct set 101 --cores 8` on the host, behind driftless's back");
        let args: Vec<String> = ["set", "101", "--cores", "8"].iter().map(|s| s.to_string()).collect();
        sandbox::pct(&state_dir, &args).map_err(|e| anyhow::anyhow!("pct: {e}"))?;
        wait_report(&bare, &second, |r| r["outcome"] == "drift_found").await?;
        println!("The scheduled drift check reports it (auto_correct is off, so it is only reported):");
        show_report(&bare)?;

        say("Where things are");
        println!("- status reports: git -C {} show driftless/status:status/heads/main.md", bare.display());
        println!("- or: driftless status --repository {}", bare.display());
        println!("- the history: git -C {} log --oneline driftless/status", bare.display());
        println!("- on your own homelab: driftless daemon --help (deploy/ has a systemd unit and a config)");
        if state.is_none() {
            println!("(these files are removed when the demo ends: run `driftless-sandbox demo --keep DIR` to keep them)");
        }
        control.request_stop();
        daemon.await??;
        handle.shutdown().await;
        Ok(())
    })
}
