//! The subcommands: each runs a prefix of the pipeline (source -> load -> render, then one
//! run through `driftless::reconcile`) and prints.

use crate::cli::{
    ApplyArgs, Cli, CliDistribution, Command, DoctorArgs, ExplainArgs, ImportArgs, OutputFormat, PlanArgs, RenderArgs,
};
use anyhow::{Context, Result, bail};
use driftless::apply::ApplyReport;
use driftless::connect::{AnyHostShell, Connection};
use driftless::model::{self, Desired, Diagnostics, LoadOptions, Setting};
use driftless::plan::Plan;
use driftless::plan::display::{self, Wording};
use driftless::reconcile::Reconcile;
use driftless::render::{self, Artifact};
use driftless::runtime::{init_logging, tokio_runtime};
use driftless::settings::RunSettings;
use driftless::source;
use std::io::Write;

/// What a command ended with, for the exit code.
pub enum Outcome {
    Ok,
    /// `--detailed-exitcode`: the plan has changes (exit 2).
    Changes,
    /// The repository is invalid; the diagnostics were printed.
    Invalid,
}

pub fn run(cli: &Cli) -> Result<Outcome> {
    match &cli.command {
        Command::Daemon(cmd) => return daemon_cmd(cmd),
        Command::DaemonRun => return driftless::daemon::worker::main().map(|()| Outcome::Ok),
        Command::Status(args) => return status_cmd(args, cli.global.output),
        Command::Import(args) => return import_cmd(args, &cli.global.repo, cli.global.output),
        _ => {}
    }
    let spec = source::classify(&cli.global.repo, cli.global.rev.as_deref());
    let files = source::read(&spec)?;
    let mut opts = LoadOptions::default();
    for a in &cli.global.assume_accepted {
        opts.assume_accepted
            .push(model::adr::parse_adr_ref(a).with_context(|| format!("`{a}` is not an ADR id such as ADR-004"))?);
    }
    let out = cli.global.output;
    if out == OutputFormat::Markdown && !matches!(cli.command, Command::Plan(_) | Command::Drift(_) | Command::Apply(_))
    {
        bail!("--output markdown is for plan, drift and apply; use text or json here");
    }
    let loaded = model::load(&files, &opts).and_then(|d| render::render_all(&d).map(|a| (d, a)));
    let (desired, artifacts) = match loaded {
        Ok(v) => v,
        Err(diags) => {
            report_invalid(&diags, out)?;
            return Ok(Outcome::Invalid);
        }
    };
    // On stderr whatever the output format: what loads but is left out.
    for w in &desired.warnings {
        eprintln!("{}", model::diag::Warning(w));
    }
    match &cli.command {
        Command::Validate => validate(&desired, out)?,
        Command::Render(args) => render_cmd(&desired, artifacts, args, out)?,
        Command::Explain(args) => explain(&desired, args, out)?,
        Command::Plan(args) => return plan_cmd(&desired, &artifacts, args, out, Wording::Plan),
        Command::Drift(args) => return plan_cmd(&desired, &artifacts, args, out, Wording::Drift),
        Command::Apply(args) => return apply_cmd(&desired, &artifacts, args, out),
        Command::Health(args) => return health_cmd(&desired, &artifacts, args, out),
        Command::Doctor(args) => return doctor_cmd(&desired, &artifacts, args, out),
        Command::Daemon(_) | Command::DaemonRun | Command::Status(_) | Command::Import(_) => {
            unreachable!("handled before loading")
        }
    }
    Ok(Outcome::Ok)
}

fn report_invalid(diags: &Diagnostics, out: OutputFormat) -> Result<()> {
    match out {
        OutputFormat::Text | OutputFormat::Markdown => eprintln!("{diags}"),
        OutputFormat::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"valid": false, "errors": diags}))?
            );
        }
    }
    Ok(())
}

fn validate(d: &Desired, out: OutputFormat) -> Result<()> {
    let applied = d.adrs.iter().filter(|a| a.applies && a.has_config).count();
    match out {
        OutputFormat::Text | OutputFormat::Markdown => {
            println!(
                "valid: cluster `{}` ({} {}), {} node{}, {} ADR{} ({} applied)",
                d.cluster.name,
                d.cluster.distribution.as_str(),
                d.cluster.version,
                d.nodes.len(),
                if d.nodes.len() == 1 { "" } else { "s" },
                d.adrs.len(),
                if d.adrs.len() == 1 { "" } else { "s" },
                applied
            );
        }
        OutputFormat::Json => {
            let nodes: Vec<_> = d
                .nodes
                .iter()
                .map(|n| serde_json::json!({"name": n.name, "vmid": n.vmid, "kind": n.kind, "role": n.role, "address": n.address}))
                .collect();
            let v = serde_json::json!({
                "valid": true,
                "cluster": {"name": d.cluster.name, "distribution": d.cluster.distribution, "version": d.cluster.version},
                "nodes": nodes,
                "adrs": d.adrs,
                "errors": [],
                "warnings": d.warnings,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

fn render_cmd(d: &Desired, artifacts: Vec<Artifact>, args: &RenderArgs, out: OutputFormat) -> Result<()> {
    if let Some(node) = &args.node
        && d.node(node).is_none()
    {
        let names: Vec<&str> = d.nodes.iter().map(|n| n.name.as_str()).collect();
        let hint = model::diag::did_you_mean(node, names.iter().copied())
            .unwrap_or_else(|| format!("nodes: {}", names.join(", ")));
        bail!("no node named `{node}` ({hint})");
    }
    let selected: Vec<Artifact> = artifacts
        .into_iter()
        .filter(|a| args.node.as_ref().is_none_or(|n| &a.node == n))
        .filter(|a| args.artifact.is_empty() || args.artifact.contains(&a.kind))
        .collect();
    if let Some(dir) = &args.out {
        for a in &selected {
            let node_dir = dir.join(&a.node);
            std::fs::create_dir_all(&node_dir).with_context(|| format!("cannot create {}", node_dir.display()))?;
            let path = node_dir.join(a.kind.file_name());
            std::fs::write(&path, &a.content).with_context(|| format!("cannot write {}", path.display()))?;
            if out == OutputFormat::Text {
                println!("wrote {}", path.display());
            }
        }
        if out == OutputFormat::Json {
            let written: Vec<String> = selected
                .iter()
                .map(|a| dir.join(&a.node).join(a.kind.file_name()).display().to_string())
                .collect();
            println!("{}", serde_json::to_string_pretty(&written)?);
        }
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    match out {
        OutputFormat::Json => writeln!(stdout, "{}", serde_json::to_string_pretty(&selected)?)?,
        OutputFormat::Text if selected.len() == 1 => write!(stdout, "{}", selected[0].content)?,
        OutputFormat::Text | OutputFormat::Markdown => {
            for (i, a) in selected.iter().enumerate() {
                if i > 0 {
                    writeln!(stdout)?;
                }
                writeln!(stdout, "==> {}/{} ({}) <==", a.node, a.kind.file_name(), a.target)?;
                write!(stdout, "{}", a.content)?;
            }
        }
    }
    Ok(())
}

fn explain(d: &Desired, args: &ExplainArgs, out: OutputFormat) -> Result<()> {
    let Some(node) = d.node(&args.node) else {
        let names: Vec<&str> = d.nodes.iter().map(|n| n.name.as_str()).collect();
        let hint = model::diag::did_you_mean(&args.node, names.iter().copied())
            .unwrap_or_else(|| format!("nodes: {}", names.join(", ")));
        bail!("no node named `{}` ({hint})", args.node);
    };
    // Node keys first, then the cluster-wide ones that shape this node.
    let mut entries: Vec<(String, &Setting)> = node.provenance.iter().map(|(k, v)| (k.clone(), v)).collect();
    entries.extend(d.cluster.provenance.iter().map(|(k, v)| (format!("cluster.{k}"), v)));
    if let Some(key) = &args.key {
        let wanted = key.trim();
        let matched: Vec<(String, &Setting)> = entries
            .iter()
            .filter(|(k, _)| {
                k == wanted || k.starts_with(&format!("{wanted}.")) || k.strip_prefix("cluster.") == Some(wanted)
            })
            .cloned()
            .collect();
        if matched.is_empty() {
            let hint = model::diag::did_you_mean(wanted, entries.iter().map(|(k, _)| k.as_str()))
                .unwrap_or_else(|| format!("`driftless explain {}` lists every key", node.name));
            bail!("node `{}` has no key `{wanted}` ({hint})", node.name);
        }
        entries = matched;
    }
    match out {
        OutputFormat::Json => {
            let map: serde_json::Map<String, serde_json::Value> = entries
                .iter()
                .map(|(k, s)| (k.clone(), serde_json::to_value(s).expect("settings serialise")))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"node": node.name, "keys": map}))?
            );
        }
        OutputFormat::Text | OutputFormat::Markdown if args.key.is_some() => {
            for (k, s) in &entries {
                println!("{}: {k} = {}", node.name, model_show(&s.value));
                for (i, set) in s.chain.iter().enumerate().rev() {
                    let verdict = if i + 1 == s.chain.len() {
                        "set by     "
                    } else {
                        "overrides  "
                    };
                    let place = if set.location.line == 0 {
                        String::new()
                    } else {
                        format!("{}:{} ", set.location.file, set.location.line)
                    };
                    println!("  {verdict}{place}({}) {}", set.source, model_show(&set.value));
                }
            }
        }
        OutputFormat::Text | OutputFormat::Markdown => {
            let width = entries.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, s) in &entries {
                println!("{k:width$}  {:<28}  {}", model_show(&s.value), cite(s));
            }
        }
    }
    Ok(())
}

fn cite(s: &Setting) -> String {
    let w = s.winner();
    match &w.source {
        model::Source::Builtin => "built-in default".into(),
        model::Source::Adr(id) => format!("{id} {}:{}", w.location.file, w.location.line),
        _ => format!("{}:{}", w.location.file, w.location.line),
    }
}

fn model_show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio_runtime().context("cannot start the async runtime")
}

/// Connect to what this repository's cluster.yaml names, with this run's overrides. A
/// one-shot command trusts the repository it was pointed at.
fn connect(desired: &Desired, settings: &RunSettings) -> Result<Connection> {
    Ok(Connection::open(settings, &desired.cluster, &desired.nodes)?)
}

fn health_cmd(desired: &Desired, artifacts: &[Artifact], args: &PlanArgs, out: OutputFormat) -> Result<Outcome> {
    let settings = args.connect.settings();
    let connection = connect(desired, &settings)?;
    let run = Reconcile::connected(desired, desired, artifacts, &connection);
    let health = runtime()?
        .block_on(run.health())
        .context("cannot read the cluster's health")?;
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&health)?),
        _ => print!("{}", health.text()),
    }
    if health.healthy() {
        Ok(Outcome::Ok)
    } else {
        bail!("the cluster is not healthy")
    }
}

fn print_plan(plan: &Plan, out: OutputFormat, wording: Wording) -> Result<()> {
    use std::io::IsTerminal;
    match out {
        OutputFormat::Text => print!("{}", display::text(plan, wording, std::io::stdout().is_terminal())),
        OutputFormat::Markdown => print!("{}", display::markdown(plan, wording)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(plan)?),
    }
    Ok(())
}

fn plan_cmd(
    desired: &Desired,
    artifacts: &[Artifact],
    args: &PlanArgs,
    out: OutputFormat,
    wording: Wording,
) -> Result<Outcome> {
    let settings = args.connect.settings();
    let connection = connect(desired, &settings)?;
    let plan = runtime()?.block_on(Reconcile::connected(desired, desired, artifacts, &connection).plan())?;
    print_plan(&plan, out, wording)?;
    Ok(if args.detailed_exitcode && !plan.is_empty() {
        Outcome::Changes
    } else {
        Outcome::Ok
    })
}

fn confirm(plan: &Plan, desired: &Desired) -> Result<bool> {
    use std::io::{BufRead, IsTerminal};
    if !std::io::stdin().is_terminal() {
        bail!("refusing to apply without confirmation: stdin is not a terminal (pass --auto-approve)");
    }
    eprint!(
        "Apply these {} step{} to cluster `{}`? Only `yes` is accepted: ",
        plan.steps.len(),
        if plan.steps.len() == 1 { "" } else { "s" },
        desired.cluster.name
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

fn apply_cmd(desired: &Desired, artifacts: &[Artifact], args: &ApplyArgs, out: OutputFormat) -> Result<Outcome> {
    let settings = args.connect.settings();
    let connection = connect(desired, &settings)?;
    let run = Reconcile::connected(desired, desired, artifacts, &connection);
    let rt = runtime()?;
    // Held until this function returns: the plan and its apply, one run at a time.
    let _lock = rt.block_on(run.lock(&driftless::reconcile::lock_holder("apply")))?;
    let plan = rt.block_on(run.plan())?;
    if out != OutputFormat::Json {
        print_plan(&plan, out, Wording::Plan)?;
    }
    if plan.is_empty() {
        if out == OutputFormat::Json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"plan": plan, "report": ApplyReport::default()}))?
            );
        } else {
            println!("Nothing to apply.");
        }
        return Ok(Outcome::Ok);
    }
    if !args.auto_approve && !confirm(&plan, desired)? {
        bail!("apply cancelled: nothing was changed");
    }
    let report = rt.block_on(async {
        // Ctrl-C or SIGTERM stops the apply between two steps, as in the daemon: the steps
        // running finish, none starts, and the report says what was not done. A second one
        // ends the process at once.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = tokio::spawn(stop_on_signal(stop.clone()));
        let report = run
            .apply(&plan, &mut crate::progress::StderrProgress::new(), Some(&stop))
            .await;
        watcher.abort();
        report
    });
    report_apply(&plan, &report, out)
}

async fn stop_on_signal(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    let mut signalled = false;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if signalled {
            eprintln!("driftless: stopped at once; `driftless plan` shows what is left");
            std::process::exit(130);
        }
        signalled = true;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!("driftless: stopping after the steps that are running (again to stop at once)");
    }
}

/// Print what an apply did; a failed step makes the command fail.
fn report_apply(plan: &Plan, report: &ApplyReport, out: OutputFormat) -> Result<Outcome> {
    if out == OutputFormat::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"plan": plan, "report": report}))?
        );
    } else {
        let ok = report.done.iter().filter(|s| s.ok).count();
        println!(
            "Applied {ok} of {} step{}.",
            plan.steps.len(),
            if plan.steps.len() == 1 { "" } else { "s" }
        );
        let mut failed = report.done.iter().filter(|s| !s.ok);
        if let Some(first) = failed.next() {
            println!(
                "Stopped at {} {}: {}",
                first.action,
                driftless::plan::subject(&first.node, first.vmid),
                first.error.as_deref().unwrap_or("failed")
            );
            // Steps that were running beside it finished, and may have failed too.
            for also in failed {
                println!(
                    "Also failed: {} {}: {}",
                    also.action,
                    driftless::plan::subject(&also.node, also.vmid),
                    also.error.as_deref().unwrap_or("failed")
                );
            }
        }
        if report.stopped {
            println!("Stopped between two steps, as asked.");
        }
        if report.api_retries > 0 {
            println!(
                "The Proxmox API did not answer as it should {} time{}: those calls were retried.",
                report.api_retries,
                if report.api_retries == 1 { "" } else { "s" }
            );
        }
        if !report.not_done.is_empty() {
            println!("Not done: {}", report.not_done.join("; "));
        }
    }
    if report.ok() {
        Ok(Outcome::Ok)
    } else {
        bail!("apply failed; run `driftless plan` to see what is left")
    }
}

fn daemon_cmd(cmd: &crate::cli::DaemonCmd) -> Result<Outcome> {
    let log_format = cmd.log_format.settings();
    init_logging(log_format);
    let mut settings = cmd.daemon.flags().resolve()?;
    settings.log_format = Some(log_format);
    // Before the runtime's threads exist, so they share the arenas.
    driftless::daemon::memory::limit_arenas();
    runtime()?.block_on(driftless::daemon::run::run(settings, cmd.connect.settings()))?;
    Ok(Outcome::Ok)
}

fn status_cmd(args: &crate::cli::StatusArgs, out: OutputFormat) -> Result<Outcome> {
    use driftless::daemon::{git, status};
    let cache = tempfile::tempdir()?;
    let mirror = git::Mirror::open_or_init(&args.repository, cache.path(), git::GitAuth::default())?;
    let git_ref = if args.git_ref.starts_with("refs/") {
        args.git_ref.clone()
    } else {
        format!("refs/heads/{}", args.git_ref)
    };
    let (md_path, json_path) = status::report_paths(&git_ref);
    let Some(json) = mirror.read_status(&args.status_branch, &json_path)? else {
        bail!("no status report for {git_ref} on branch {} yet", args.status_branch);
    };
    match out {
        OutputFormat::Json => println!("{}", String::from_utf8_lossy(&json)),
        _ => {
            let summary = status::parse_summary(&json)?;
            println!("{}", summary.one_line());
            if let Some(md) = mirror.read_status(&args.status_branch, &md_path)? {
                println!();
                print!("{}", String::from_utf8_lossy(&md));
            }
        }
    }
    Ok(Outcome::Ok)
}

// ---- doctor ----------------------------------------------------------------------------------

/// How this run's token is chosen, for the report (never its value).
fn token_source(settings: &RunSettings, desired: &Desired) -> String {
    if let Some(f) = &settings.proxmox.token_file {
        format!("--proxmox-token-file {}", f.display())
    } else if std::env::var_os("DRIFTLESS_PROXMOX_TOKEN").is_some() {
        "DRIFTLESS_PROXMOX_TOKEN".into()
    } else {
        match &desired.cluster.proxmox.token {
            Some(t) => format!("secret {}", t.secret),
            None => "none".into(),
        }
    }
}

fn doctor_trust(trust: &driftless::adapters::tls::TlsTrust) -> driftless::doctor::Trust {
    use driftless::adapters::tls::TlsTrust;
    use driftless::doctor::Trust;
    match trust {
        TlsTrust::Fingerprint(fp) => Trust::Fingerprint(fp.clone()),
        TlsTrust::CaFile(f) => Trust::CaFile(f.display().to_string()),
        TlsTrust::Insecure => Trust::Insecure,
        _ => Trust::System,
    }
}

/// Where the host shell of `pve` goes, for the report.
fn host_target(host: &AnyHostShell, pve: &str) -> (String, Option<String>) {
    match host {
        AnyHostShell::Local(_) => ("local shell (--host-shell local)".into(), None),
        AnyHostShell::Ssh(ssh) => match ssh.target(pve) {
            Some(t) => (
                format!("{}@{}:{}", t.user, t.host, t.port),
                Some(t.known_hosts.display().to_string()),
            ),
            None => (format!("no proxmox.hosts entry for {pve}"), None),
        },
    }
}

fn doctor_cmd(desired: &Desired, artifacts: &[Artifact], args: &DoctorArgs, out: OutputFormat) -> Result<Outcome> {
    use driftless::adapters::proxmox::{ClientOptions, ProxmoxClient};
    use driftless::connect;
    use driftless::doctor::{self, Observations, TokenSeen, observe};
    use driftless::ports::{CommandOutput, ShellError};

    let settings = args.connect.settings();
    let cluster = &desired.cluster;
    let rt = runtime()?;
    let endpoints = match &settings.proxmox.url {
        Some(u) => vec![u.clone()],
        None => cluster.proxmox.api.to_vec(),
    };
    let endpoint = endpoints.first().cloned().unwrap_or_default();
    let trust = connect::trust(&settings, cluster)?;
    let token = connect::token(&settings, cluster);
    let token_seen = TokenSeen {
        id: token.as_ref().map(|t| t.id()).map_err(|e| e.to_string()),
        source: token_source(&settings, desired),
    };
    let client = token
        .ok()
        .map(|t| ProxmoxClient::new(ClientOptions::new(endpoints.clone(), t, trust.clone())));
    let api = match &client {
        Some(Ok(c)) => Some(rt.block_on(observe::proxmox(desired, artifacts, c, &endpoint, doctor_trust(&trust)))),
        Some(Err(e)) => Some(driftless::doctor::ApiSeen {
            endpoint: endpoint.clone(),
            trust: doctor_trust(&trust),
            version: Err(e.clone()),
            nodes: None,
            plan: None,
            guests: Default::default(),
            permissions: Default::default(),
            permissions_error: None,
            hosts: Default::default(),
        }),
        None => None,
    };

    let plan_token = match &args.plan_token_file {
        None => None,
        Some(file) => {
            let source = format!("--plan-token-file {}", file.display());
            let seen = match driftless::adapters::proxmox::ApiToken::from_file(file) {
                Err(e) => rt.block_on(observe::plan_token::<ProxmoxClient>(
                    desired,
                    &source,
                    Err(e.to_string()),
                )),
                Ok(t) => {
                    let id = t.id();
                    match ProxmoxClient::new(ClientOptions::new(endpoints.clone(), t, trust.clone())) {
                        Ok(c) => rt.block_on(observe::plan_token(desired, &source, Ok((id, &c)))),
                        Err(e) => rt.block_on(observe::plan_token::<ProxmoxClient>(
                            desired,
                            &source,
                            Err(e.to_string()),
                        )),
                    }
                }
            };
            Some(seen)
        }
    };

    let host = connect::host_shell(&settings, cluster);
    let host_shells = match &host {
        Ok(None) => None,
        Ok(Some(h)) => Some(rt.block_on(observe::host_shells(desired, h, &settings, |pve| host_target(h, pve)))),
        Err(e) => Some(
            desired
                .nodes
                .iter()
                .map(|n| n.proxmox_node.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|pve| driftless::doctor::HostShellSeen {
                    pve_node: pve,
                    target: "proxmox.hosts".into(),
                    known_hosts: None,
                    pct: Err::<CommandOutput, _>(ShellError::Other(e.to_string())),
                })
                .collect(),
        ),
    };
    let host = host.ok().flatten().map(std::sync::Arc::new);
    let connector = connect::NodeConnector::new(&settings, host, &desired.nodes);
    let vm_nodes = match &api {
        Some(a) if a.plan.as_ref().is_some_and(|p| p.is_ok()) => rt.block_on(observe::vm_nodes(
            desired,
            &a.guests,
            &connector,
            &driftless::secrets::SecretStore::new(&settings.secrets_dir),
        )),
        _ => Default::default(),
    };
    let (secrets_dir_mode, secrets) = observe::secrets(desired, &settings);
    let repository = match &args.repository {
        None => None,
        Some(url) => {
            let scratch = tempfile::tempdir()?;
            let auth = driftless::daemon::git::GitAuth {
                ssh_key: args.git_ssh_key.clone(),
                known_hosts: args.git_known_hosts.clone(),
                token_file: args.git_token_file.clone(),
            };
            Some(observe::repository(url, &args.branch, auth, scratch.path()))
        }
    };
    let seen = Observations {
        token: token_seen,
        api,
        plan_token,
        plans_pull_requests: !args.plan_refs.is_empty(),
        host_shells,
        vm_nodes,
        secrets_dir: settings.secrets_dir.display().to_string(),
        secrets_dir_mode,
        secrets,
        repository,
    };
    let report = doctor::checks(desired, &seen);
    match out {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ok": report.ok(), "checks": report.checks}))?
        ),
        _ => print!("{}", report.text()),
    }
    // Exit 1, like an invalid repository: this one is not ready to apply.
    Ok(if report.ok() { Outcome::Ok } else { Outcome::Invalid })
}

// ---- import ----------------------------------------------------------------------------------

/// `NODE=VALUE` pairs of a repeatable flag.
fn pairs(flag: &str, items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|i| {
            i.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("--{flag} {i}: write NODE=VALUE"))
        })
        .collect()
}

fn import_cmd(args: &ImportArgs, repo: &str, out: OutputFormat) -> Result<Outcome> {
    use driftless::adapters::local_shell::LocalShell;
    use driftless::adapters::proxmox::{ApiToken, ClientOptions, ProxmoxClient};
    use driftless::adapters::ssh::{HostTarget, SshHostShell};
    use driftless::adapters::tls::TlsTrust;
    use driftless::import::{self, ImportOptions, Selection};
    use driftless::model::schema::Distribution;
    use driftless::ports::ProxmoxApi;
    use driftless::settings::{HostShellKind, home};

    if out == OutputFormat::Markdown {
        bail!("--output markdown is for plan, drift and apply; use text or json here");
    }
    let settings = args.connect.settings();
    // Nothing is trusted from a repository here (there may be none yet): every connection
    // setting comes from this run's flags and environment.
    let url = settings
        .proxmox
        .url
        .clone()
        .context("import needs the API: --proxmox-url https://HOST:8006 (or DRIFTLESS_PROXMOX_URL)")?;
    let token = match &settings.proxmox.token_file {
        Some(f) => ApiToken::from_file(f)?,
        None => ApiToken::from_env("DRIFTLESS_PROXMOX_TOKEN").map_err(|e| {
            anyhow::anyhow!("{e}: give the API token with --proxmox-token-file FILE (USER@REALM!TOKENID=SECRET)")
        })?,
    };
    let p = &settings.proxmox;
    let trust = if p.insecure {
        TlsTrust::Insecure
    } else if let Some(fp) = &p.fingerprint {
        TlsTrust::Fingerprint(fp.clone())
    } else if let Some(ca) = &p.ca_file {
        TlsTrust::CaFile(ca.clone())
    } else {
        TlsTrust::System
    };
    let client = ProxmoxClient::new(ClientOptions::new(vec![url.clone()], token, trust))?;
    let rt = runtime()?;

    let selection = Selection {
        vmids: args
            .vmid
            .as_deref()
            .map(import::parse_vmid_range)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        tags: args.tags.clone(),
        names: args.names.clone(),
    };
    let h = &settings.host;
    let ssh_target = h.host.as_ref().map(|host| HostTarget {
        user: h.user.clone().unwrap_or_else(|| "root".into()),
        host: host.clone(),
        port: h.port.unwrap_or(22),
        known_hosts: h.known_hosts.clone().unwrap_or_else(|| home().join(".ssh/known_hosts")),
        key_file: h.key_file.clone().unwrap_or_else(|| home().join(".ssh/id_ed25519")),
    });
    let (guests, templates) = match (h.kind, &ssh_target) {
        (HostShellKind::Local, _) => {
            rt.block_on(import::read::read(&client, Some(&LocalShell), &h.pve_root, &selection))?
        }
        (HostShellKind::Ssh, Some(target)) => {
            let nodes = rt.block_on(client.nodes())?;
            let targets = nodes.iter().map(|n| (n.node.clone(), target.clone())).collect();
            let shell = SshHostShell::new(targets);
            rt.block_on(import::read::read(&client, Some(&shell), &h.pve_root, &selection))?
        }
        (HostShellKind::Ssh, None) => rt.block_on(import::read::read::<_, LocalShell>(
            &client,
            None,
            &h.pve_root,
            &selection,
        ))?,
    };
    let distribution = match args.distribution {
        CliDistribution::K3s => Distribution::K3s,
        CliDistribution::Talos => Distribution::Talos,
    };
    let mut addresses = std::collections::BTreeMap::new();
    for (node, addr) in pairs("address", &args.addresses)? {
        addresses.insert(
            node,
            addr.parse()
                .with_context(|| format!("--address: `{addr}` is not IP/PREFIX"))?,
        );
    }
    let opts = ImportOptions {
        cluster_name: args.cluster_name.clone(),
        distribution,
        version: args.version.clone().unwrap_or_else(|| match distribution {
            Distribution::K3s => "v1.31.4+k3s1".into(),
            Distribution::Talos => "v1.13.9".into(),
        }),
        kubernetes_version: match distribution {
            Distribution::Talos => Some(args.kubernetes_version.clone().unwrap_or_else(|| "v1.34.1".into())),
            Distribution::K3s => None,
        },
        api: url.clone(),
        fingerprint: p.fingerprint.clone(),
        ssh: ssh_target
            .as_ref()
            .map(|t| (format!("{}@{}", t.user, t.host), (t.port != 22).then_some(t.port))),
        ownership_tag: args.ownership_tag.clone(),
        gateway: args.gateway,
        addresses,
        roles: pairs("role", &args.roles)?.into_iter().collect(),
        template: args.template.clone(),
        templates,
    };
    let imported = import::import(&guests, &opts)?;

    let dir = args.out.clone().unwrap_or_else(|| std::path::PathBuf::from(repo));
    let mut written = Vec::new();
    let mut left = Vec::new();
    if !args.dry_run {
        for (rel, text) in &imported.files {
            let mut path = dir.join(rel);
            if path.exists() {
                if rel == "cluster.yaml" {
                    path = dir.join("cluster.yaml.imported");
                } else {
                    left.push(rel.clone());
                    continue;
                }
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            written.push(path.display().to_string());
        }
    }
    match out {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "written": written,
                "not_overwritten": left,
                "files": if args.dry_run { serde_json::to_value(&imported.files)? } else { serde_json::Value::Null },
                "notes": imported.notes,
                "skipped": imported.skipped,
            }))?
        ),
        _ => {
            if args.dry_run {
                for (rel, text) in &imported.files {
                    println!("==> {rel} <==\n{text}");
                }
            }
            for w in &written {
                println!("wrote {w}");
            }
            for l in &left {
                println!(
                    "left alone: {} exists (delete it to import it again)",
                    dir.join(l).display()
                );
            }
            for (node, notes) in &imported.notes {
                for n in notes {
                    println!("note: {node}: {n}");
                }
            }
            for s in &imported.skipped {
                println!("skipped: {} ({}): {}", s.vmid, s.name, s.reason);
            }
            if !args.dry_run {
                println!(
                    "next: check {0}/cluster.yaml, then `driftless --repo {0} validate` and `driftless --repo {0} plan`",
                    dir.display()
                );
            }
        }
    }
    Ok(Outcome::Ok)
}
