//! The subcommands: each runs a prefix of the pipeline (source -> load -> render) and prints.

use crate::cli::{Cli, Command, ExplainArgs, OutputFormat, RenderArgs};
use crate::model::{self, Desired, Diagnostics, LoadOptions, Setting};
use crate::render::{self, Artifact};
use crate::source;
use anyhow::{Context, Result, bail};
use std::io::Write;

/// What a command ended with, for the exit code.
pub enum Outcome {
    Ok,
    /// The repository is invalid; the diagnostics were printed.
    Invalid,
}

pub fn run(cli: &Cli) -> Result<Outcome> {
    let spec = source::classify(&cli.global.repo, cli.global.rev.as_deref());
    let files = source::read(&spec)?;
    let mut opts = LoadOptions::default();
    for a in &cli.global.assume_accepted {
        opts.assume_accepted
            .push(model::adr::parse_adr_ref(a).with_context(|| format!("`{a}` is not an ADR id such as ADR-004"))?);
    }
    let out = cli.global.output;
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
    }
    Ok(Outcome::Ok)
}

fn report_invalid(diags: &Diagnostics, out: OutputFormat) -> Result<()> {
    match out {
        OutputFormat::Text => eprintln!("{diags}"),
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
        OutputFormat::Text => {
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
        OutputFormat::Text => {
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
        OutputFormat::Text if args.key.is_some() => {
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
        OutputFormat::Text => {
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
