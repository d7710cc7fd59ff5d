//! `driftless sandbox ...`: the sandbox Proxmox as a server, its `pct`, and the demo that
//! shows a newcomer the loop on one machine.

use crate::adapters::local_shell::LocalShell;
use crate::adapters::proxmox::{ApiToken, ClientOptions, ProxmoxClient};
use crate::adapters::tls::TlsTrust;
use crate::apply::{Applier, HostSettings};
use crate::cli::SandboxCommand;
use crate::commands::{Outcome, StderrProgress, observe_and_plan, runtime};
use crate::model::{self, Desired, LoadOptions};
use crate::plan::display::{self, Wording};
use crate::render::{self, Artifact};
use crate::sandbox::{self, SandboxHandle, SandboxOptions};
use anyhow::{Context, Result, bail};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub fn sandbox(cmd: &SandboxCommand) -> Result<Outcome> {
    match cmd {
        SandboxCommand::Pct { state, args } => {
            let out = sandbox::pct(state, args).map_err(|e| anyhow::anyhow!("pct: {e}"))?;
            print!("{out}");
            Ok(Outcome::Ok)
        }
        SandboxCommand::Serve {
            state,
            listen,
            plain_http,
        } => serve(state, *listen, !*plain_http),
        SandboxCommand::Demo { example, state } => demo(example, state.as_deref()),
    }
}

/// A fresh token secret per sandbox run; the sandbox only listens on loopback.
fn fresh_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id())
}

fn sandbox_options(state: &Path, bind: std::net::SocketAddr, tls: bool) -> SandboxOptions {
    let seed = fresh_seed();
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
    let exe = std::env::current_exe().context("cannot find the driftless binary")?;
    let env = dir.join("connection.env");
    let mut text = format!(
        "DRIFTLESS_PROXMOX_URL={}\nDRIFTLESS_PROXMOX_TOKEN_FILE={}\nDRIFTLESS_PVE_ROOT={}\nDRIFTLESS_PCT_COMMAND=\"{} sandbox pct --state {}\"\nDRIFTLESS_HOST_SHELL=local\n",
        handle.url,
        token.display(),
        handle.state_dir.display(),
        exe.display(),
        handle.state_dir.display()
    );
    if !handle.fingerprint.is_empty() {
        text.push_str(&format!("DRIFTLESS_PROXMOX_FINGERPRINT={}\n", handle.fingerprint));
    }
    std::fs::write(&env, text)?;
    Ok(env)
}

fn serve(state: &Path, listen: std::net::SocketAddr, tls: bool) -> Result<Outcome> {
    let rt = runtime()?;
    rt.block_on(async {
        let handle = sandbox::start(sandbox_options(state, listen, tls))
            .await
            .context("cannot start the sandbox")?;
        let env = write_connection(&handle)?;
        println!("Sandbox Proxmox VE API at {}", handle.url);
        if !handle.fingerprint.is_empty() {
            println!("certificate fingerprint (SHA-256): {}", handle.fingerprint);
        }
        println!("state (its /etc/pve): {}", handle.state_dir.display());
        println!(
            "connection settings: {} (`set -a; . {}; set +a` in a shell)",
            env.display(),
            env.display()
        );
        println!("Press Ctrl-C to stop.");
        tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
        handle.shutdown().await;
        Ok(Outcome::Ok)
    })
}

fn example_dir(name: &str) -> Result<PathBuf> {
    let candidates = [
        PathBuf::from("examples").join(name),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name),
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

fn load_repo(dir: &Path) -> Result<(Desired, Vec<Artifact>)> {
    let files = crate::source::read_dir(dir)?;
    let loaded = model::load(&files, &LoadOptions::default()).and_then(|d| render::render_all(&d).map(|a| (d, a)));
    loaded.map_err(|diags| anyhow::anyhow!("the repository is invalid:\n{diags}"))
}

fn say(title: &str) {
    let line = format!("==> {title}");
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m{line}\x1b[0m");
    } else {
        println!("\n{line}");
    }
}

fn demo(example: &str, state: Option<&Path>) -> Result<Outcome> {
    let source = example_dir(example)?;
    let work = tempfile::tempdir()?;
    let repo = work.path().join("repo");
    copy_tree(&source, &repo)?;
    let state_dir = match state {
        Some(s) => s.to_path_buf(),
        None => work.path().join("pve"),
    };
    let color = std::io::stdout().is_terminal();
    let rt = runtime()?;
    rt.block_on(async {
        let handle = sandbox::start(sandbox_options(&state_dir, "127.0.0.1:0".parse()?, true)).await?;
        say(&format!(
            "A sandbox Proxmox VE API is listening at {} (TLS pinned by fingerprint)",
            handle.url
        ));
        println!(
            "Its config files live in {}/nodes/pve/, laid out like /etc/pve.",
            state_dir.display()
        );
        let token = ApiToken::parse(&handle.token).map_err(|e| anyhow::anyhow!("{e}"))?;
        let client = ProxmoxClient::new(ClientOptions::new(
            vec![handle.url.clone()],
            token,
            TlsTrust::Fingerprint(handle.fingerprint.clone()),
        ))?;
        let exe = std::env::current_exe()?;
        let host = HostSettings {
            pve_root: state_dir.display().to_string(),
            pct_command: vec![
                exe.display().to_string(),
                "sandbox".into(),
                "pct".into(),
                "--state".into(),
                state_dir.display().to_string(),
            ],
        };
        let shell = LocalShell;
        let applier = Applier {
            proxmox: &client,
            shell: Some(&shell),
            host,
            stop: None,
        };

        say(&format!("1. Plan examples/{example} against the empty Proxmox"));
        let (desired, artifacts) = load_repo(&repo)?;
        let plan = observe_and_plan(&desired, &artifacts, &client).await?;
        print!("{}", display::text(&plan, Wording::Plan, color));

        say("2. Apply it");
        let report = applier.apply(&plan, &mut StderrProgress).await;
        if !report.ok() {
            bail!("the demo's apply failed: {}", serde_json::to_string(&report)?);
        }
        let first = desired.nodes.first().context("the example has nodes")?;
        let dir = if first.kind == model::schema::GuestKind::Lxc {
            "lxc"
        } else {
            "qemu-server"
        };
        let conf = state_dir.join(format!("nodes/{}/{dir}/{}.conf", first.proxmox_node, first.vmid));
        println!("\n{} now holds:\n{}", conf.display(), std::fs::read_to_string(&conf)?);

        say("3. Plan again: nothing to do");
        let plan = observe_and_plan(&desired, &artifacts, &client).await?;
        print!("{}", display::text(&plan, Wording::Plan, color));

        let last = desired.nodes.last().context("the example has nodes")?;
        say(&format!(
            "4. Commit a change: {} gets 6 GiB of memory (a recorded deviation from the ADR)",
            last.name
        ));
        let node_file = repo.join(&last.file);
        let mut text = std::fs::read_to_string(&node_file)?;
        let adr = desired
            .adrs
            .iter()
            .find(|a| a.applies && a.has_config)
            .map(|a| a.id.clone());
        text.push_str("memory: 6GiB\n");
        if let Some(adr) = &adr {
            text.push_str(&format!(
                "deviations:\n  - adr: {adr}\n    keys: [memory]\n    reason: \"this node runs the database\"\n"
            ));
        }
        std::fs::write(&node_file, text)?;
        let (desired, artifacts) = load_repo(&repo)?;
        let plan = observe_and_plan(&desired, &artifacts, &client).await?;
        print!("{}", display::text(&plan, Wording::Plan, color));
        let report = applier.apply(&plan, &mut StderrProgress).await;
        if !report.ok() {
            bail!("the demo's second apply failed: {}", serde_json::to_string(&report)?);
        }

        let victim = &desired.nodes[0];
        say(&format!(
            "5. Someone changes {} by hand (`pct set {} --cores 8` on the host)",
            victim.name, victim.vmid
        ));
        let args: Vec<String> = ["set", &victim.vmid.to_string(), "--cores", "8"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        sandbox::pct(&state_dir, &args).map_err(|e| anyhow::anyhow!("pct: {e}"))?;
        let plan = observe_and_plan(&desired, &artifacts, &client).await?;
        print!("{}", display::text(&plan, Wording::Drift, color));

        say("Where to look next");
        println!(
            "- driftless --repo examples/{example} explain {} lxc.features.nesting",
            first.name
        );
        println!("- driftless --repo examples/{example} render {}", first.name);
        println!("- driftless sandbox serve --state DIR, then plan/apply with the settings it prints");
        handle.shutdown().await;
        Ok(Outcome::Ok)
    })
}
