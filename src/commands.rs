//! The subcommands: each runs a prefix of the pipeline (source -> load -> render, then one
//! run through `driftless::reconcile`) and prints.

use crate::cli::{ApplyArgs, Cli, Command, ExplainArgs, OutputFormat, PlanArgs, RenderArgs};
use anyhow::{Context, Result, bail};
use driftless::apply::ApplyReport;
use driftless::connect::Connection;
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
    match &cli.command {
        Command::Validate => validate(&desired, out)?,
        Command::Render(args) => render_cmd(&desired, artifacts, args, out)?,
        Command::Explain(args) => explain(&desired, args, out)?,
        Command::Plan(args) => return plan_cmd(&desired, &artifacts, args, out, Wording::Plan),
        Command::Drift(args) => return plan_cmd(&desired, &artifacts, args, out, Wording::Drift),
        Command::Apply(args) => return apply_cmd(&desired, &artifacts, args, out),
        Command::Health(args) => return health_cmd(&desired, &artifacts, args, out),
        Command::Daemon(_) | Command::DaemonRun | Command::Status(_) => {
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
    let run = Reconcile::connected(desired, artifacts, &connection);
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
    let plan = runtime()?.block_on(Reconcile::connected(desired, artifacts, &connection).plan())?;
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
    let run = Reconcile::connected(desired, artifacts, &connection);
    let rt = runtime()?;
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
    let report = rt.block_on(run.apply(&plan, &mut crate::progress::StderrProgress::new(), None));
    report_apply(&plan, &report, out)
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
                "Stopped at {} {} (vmid {}): {}",
                first.action,
                first.node,
                first.vmid,
                first.error.as_deref().unwrap_or("failed")
            );
            // Steps that were running beside it finished, and may have failed too.
            for also in failed {
                println!(
                    "Also failed: {} {} (vmid {}): {}",
                    also.action,
                    also.node,
                    also.vmid,
                    also.error.as_deref().unwrap_or("failed")
                );
            }
        }
        if report.stopped {
            println!("Stopped between two steps, as asked.");
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
