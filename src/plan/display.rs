//! Showing a plan: for people on a terminal (colour when it is one), as markdown for a pull
//! request, and as JSON for machines. `drift` words the same plan as a drift report.

use super::markdown as md;
use super::{Action, Change, Plan, Step, Via};
use std::fmt::Write;

/// Whether the plan is what applying would do, or what drifted from git.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wording {
    Plan,
    Drift,
}

#[derive(Debug, Clone, Copy)]
struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }
    fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }
    fn red(&self, s: &str) -> String {
        self.paint("31", s)
    }
    fn magenta(&self, s: &str) -> String {
        self.paint("35", s)
    }
    fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
}

fn symbol(a: &Action) -> &'static str {
    match a {
        Action::Create { .. } => "+",
        Action::Update { .. } => "~",
        Action::Restart { .. } => "!",
        Action::Start => ">",
        Action::Delete { .. } => "-",
        Action::K3sInstall { installed: None, .. } => "+",
        Action::K3sInstall { .. } | Action::K3sConfigure { .. } | Action::TalosApply { .. } => "~",
        Action::NodeMetadata { .. } => "~",
        Action::TalosBootstrap => "+",
        Action::TalosUpgrade { .. } | Action::KubernetesUpgrade { .. } => "~",
        Action::Addon { create, change, .. } if change.is_empty() && !create.is_empty() => "+",
        Action::Addon { .. } => "~",
        Action::AddonRemove { .. } => "-",
        Action::NodesReady { .. } => ">",
    }
}

/// What a cluster step does, in one line each, for the text and markdown forms.
fn cluster_lines(a: &Action) -> Vec<String> {
    match a {
        Action::K3sInstall {
            version,
            installed,
            source,
        } => vec![match installed {
            Some(old) => format!("k3s {old} -> {version} (from {source})"),
            None => format!("k3s {version} (from {source})"),
        }],
        Action::K3sConfigure {
            restart, kubeconfig, ..
        } => {
            let mut v = Vec::new();
            if !restart.is_empty() {
                v.push(format!("restart: {restart}; then wait until the node is Ready"));
            }
            if *kubeconfig {
                v.push("then fetch the cluster's kubeconfig into the secrets directory".into());
            }
            v
        }
        Action::TalosApply {
            mode,
            maintenance,
            diff,
            ..
        } => {
            let mut v = vec![if *maintenance {
                format!("first config, sent in maintenance mode (no client certificate yet); mode {mode}")
            } else {
                format!("mode {mode}")
            }];
            v.extend(diff.lines().map(str::to_string));
            v
        }
        Action::TalosBootstrap => vec!["bootstrap etcd (once), then fetch the kubeconfig".into()],
        Action::TalosUpgrade {
            from,
            to,
            image,
            refused,
            provenance,
            ..
        } => {
            let set_by = provenance
                .as_ref()
                .map(|p| format!(" (set by {p})"))
                .unwrap_or_default();
            let mut v = vec![format!("talos {from} -> {to}{set_by}")];
            match refused {
                Some(why) => v.push(format!("refused: {why}")),
                None => v.push(format!(
                    "installer {image}; the node reboots, then must answer with {to} and be Ready"
                )),
            }
            v
        }
        Action::KubernetesUpgrade {
            from,
            to,
            refused,
            provenance,
        } => {
            let set_by = provenance
                .as_ref()
                .map(|p| format!(" (set by {p})"))
                .unwrap_or_default();
            vec![
                format!("kubernetes {from} -> {to}{set_by}"),
                format!("refused: {refused}"),
            ]
        }
        Action::Addon {
            create, change, prune, ..
        } => {
            let mut v: Vec<String> = create.iter().map(|o| format!("+ {o}")).collect();
            for c in change {
                v.push(format!("~ {}", c.object));
                for f in &c.changes {
                    v.push(format!("    {}: {} -> {}", f.key, one_line(&f.old), one_line(&f.new)));
                }
                if let Some(conflict) = &c.conflict {
                    v.push(format!("    conflict: {conflict}"));
                }
            }
            v.extend(prune.iter().map(|o| format!("- {o} (prune: true)")));
            v.push("then wait until its workloads, Jobs and HelmCharts are healthy".into());
            v
        }
        Action::AddonRemove { prune, .. } => {
            let mut v = vec!["the add-on left git (prune: true): delete what its inventory lists".to_string()];
            v.extend(prune.iter().map(|o| format!("- {o}")));
            v
        }
        Action::NodesReady { cni, cni_addon } => vec![match cni_addon {
            Some(a) => format!("every node Ready once the {cni} CNI from add-on `{a}` runs"),
            None => format!("every node Ready (the {cni} CNI must come from an add-on; none declares `cni: true`)"),
        }],
        _ => Vec::new(),
    }
}

fn via_note(v: Via) -> &'static str {
    match v {
        Via::Api => "",
        Via::RootShell => " [pct set, as root]",
        Via::ConfFile => " [config file, on the host]",
        Via::NodeFile => " [file on the node]",
        Via::KubeApi => " [Kubernetes API]",
    }
}

fn one_line(v: &Option<String>) -> String {
    match v {
        Some(s) if s.contains('\n') => format!("({} lines)", s.lines().count()),
        Some(s) if s.is_empty() => "\"\"".into(),
        Some(s) => s.clone(),
        None => "(unset)".into(),
    }
}

pub fn summary(plan: &Plan, wording: Wording) -> String {
    let n = |verb| plan.count(verb);
    let cluster = plan.steps.iter().filter(|s| s.action.is_cluster()).count();
    let cluster_note = match cluster {
        0 => String::new(),
        1 => "; 1 cluster step".to_string(),
        c => format!("; {c} cluster steps"),
    };
    let text = match wording {
        Wording::Plan => format!(
            "{} to create, {} to update, {} to restart, {} to start, {} to delete; {} conflict{}, {} orphan{} left alone",
            n("create"),
            n("update"),
            n("restart"),
            n("start"),
            n("delete"),
            plan.conflicts.len(),
            if plan.conflicts.len() == 1 { "" } else { "s" },
            plan.orphans.iter().filter(|o| !o.pruned).count(),
            if plan.orphans.iter().filter(|o| !o.pruned).count() == 1 {
                ""
            } else {
                "s"
            },
        ),
        Wording::Drift => {
            let drifted = plan
                .steps
                .iter()
                .filter(|s| !matches!(s.action, Action::Delete { .. }) && !s.action.is_cluster())
                .count();
            format!(
                "{} guest{} missing, {} drifted from git, {} untracked guest{} with the ownership tag, {} conflict{}",
                n("create"),
                if n("create") == 1 { "" } else { "s" },
                drifted - n("create"),
                plan.orphans.len(),
                if plan.orphans.len() == 1 { "" } else { "s" },
                plan.conflicts.len(),
                if plan.conflicts.len() == 1 { "" } else { "s" },
            )
        }
    };
    text + &cluster_note
}

fn step_title(step: &Step) -> String {
    match &step.action {
        Action::Addon {
            addon, wave, declared, ..
        } => return format!("{} {addon} (wave {wave}, declared at {declared})", step.action.verb()),
        Action::AddonRemove { addon, .. } => return format!("{} {addon}", step.action.verb()),
        Action::NodesReady { .. } => return format!("{} Ready", step.action.verb()),
        _ => {}
    }
    format!(
        "{} {} ({} {} on {})",
        step.action.verb(),
        step.node,
        step.kind.path(),
        step.vmid,
        step.pve_node
    )
}

/// The plan for people. `color` adds ANSI colours (for a terminal).
pub fn text(plan: &Plan, wording: Wording, color: bool) -> String {
    let st = Style { color };
    let mut out = String::new();
    let head = match wording {
        Wording::Plan => format!("Plan for cluster `{}`: {}", plan.cluster, summary(plan, wording)),
        Wording::Drift => format!(
            "Drift report for cluster `{}`: {}",
            plan.cluster,
            summary(plan, wording)
        ),
    };
    let _ = writeln!(out, "{}", st.bold(&head));
    if plan.steps.is_empty() && plan.conflicts.is_empty() && plan.orphans.is_empty() && plan.notices.is_empty() {
        let _ = writeln!(
            out,
            "{}",
            match wording {
                Wording::Plan => "No changes: Proxmox matches the repository.",
                Wording::Drift => "No drift: Proxmox matches the repository.",
            }
        );
        return out;
    }
    for step in &plan.steps {
        let _ = writeln!(out);
        let title = format!("{} {}", symbol(&step.action), step_title(step));
        let painted = match &step.action {
            Action::Create { .. } => st.green(&title),
            Action::Update { .. } | Action::Start => st.yellow(&title),
            Action::Restart { .. } => st.magenta(&title),
            Action::Delete { .. } => st.red(&title),
            _ => st.yellow(&title),
        };
        let disruptive = if step.disruptive {
            st.dim(" (disruptive)")
        } else {
            String::new()
        };
        let _ = writeln!(out, "{painted}{disruptive}");
        match &step.action {
            Action::Create {
                params,
                root_options,
                raw_lxc,
                provenance,
            } => {
                for (k, v) in params {
                    let from = provenance
                        .get(k)
                        .map(|p| st.dim(&format!("  <- {p}")))
                        .unwrap_or_default();
                    let _ = writeln!(out, "    {k}: {v}{from}");
                }
                for (k, v) in root_options {
                    let _ = writeln!(out, "    {k}: {v}{}", st.dim(via_note(Via::RootShell)));
                }
                if !raw_lxc.is_empty() {
                    let from = provenance
                        .get("lxc.raw")
                        .map(|p| st.dim(&format!("  <- {p}")))
                        .unwrap_or_default();
                    let _ = writeln!(out, "    raw lxc keys{}{from}", st.dim(via_note(Via::ConfFile)));
                    for (k, v) in raw_lxc {
                        let _ = writeln!(out, "      {k}: {v}");
                    }
                }
            }
            Action::Update { changes, .. } => {
                for c in changes {
                    write_change(&mut out, c, &st);
                }
            }
            Action::Restart { reason } => {
                let _ = writeln!(out, "    {reason}");
            }
            Action::Start => {
                let _ = writeln!(out, "    the guest is stopped");
            }
            Action::Delete { running } => {
                let _ = writeln!(
                    out,
                    "    carries the ownership tag and is in no node file (prune: true){}",
                    if *running { "; it is stopped first" } else { "" }
                );
            }
            Action::K3sConfigure { changes, .. } | Action::NodeMetadata { changes, .. } => {
                for c in changes {
                    write_change(&mut out, c, &st);
                }
                for l in cluster_lines(&step.action) {
                    let _ = writeln!(out, "    {l}");
                }
            }
            other => {
                for l in cluster_lines(other) {
                    let _ = writeln!(out, "    {l}");
                }
            }
        }
    }
    for c in &plan.conflicts {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{}",
            st.red(&format!("? conflict {} (vmid {} on {})", c.node, c.vmid, c.pve_node))
        );
        let _ = writeln!(out, "    {}", c.reason);
    }
    for o in plan.orphans.iter().filter(|o| !o.pruned) {
        let _ = writeln!(out);
        let name = o.name.as_deref().unwrap_or("(no name)");
        let _ = writeln!(
            out,
            "{}",
            st.yellow(&format!(
                "? orphan {name} ({} {} on {})",
                o.kind.path(),
                o.vmid,
                o.pve_node
            ))
        );
        let _ = writeln!(
            out,
            "    carries the ownership tag but no node file describes it; left alone (prune: false)"
        );
    }
    for n in &plan.notices {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{}",
            st.dim(&format!("note: {} (vmid {}): {}", n.node, n.vmid, n.message))
        );
    }
    out
}

fn write_change(out: &mut String, c: &Change, st: &Style) {
    let from = c
        .provenance
        .as_ref()
        .map(|p| st.dim(&format!("  <- {p}")))
        .unwrap_or_default();
    let restart = if c.needs_restart {
        st.dim(" (on restart)")
    } else {
        String::new()
    };
    let multi = c.old.as_ref().is_some_and(|s| s.contains('\n')) || c.new.as_ref().is_some_and(|s| s.contains('\n'));
    if multi {
        let _ = writeln!(out, "    ~ {}{}{restart}{from}", c.key, st.dim(via_note(c.via)));
        let old: Vec<&str> = c.old.as_deref().map(|s| s.lines().collect()).unwrap_or_default();
        let new: Vec<&str> = c.new.as_deref().map(|s| s.lines().collect()).unwrap_or_default();
        for l in old.iter().filter(|l| !new.contains(l)) {
            let _ = writeln!(out, "      {}", st.red(&format!("- {l}")));
        }
        for l in &new {
            if old.contains(l) {
                let _ = writeln!(out, "        {l}");
            } else {
                let _ = writeln!(out, "      {}", st.green(&format!("+ {l}")));
            }
        }
    } else {
        let _ = writeln!(
            out,
            "    ~ {}: {} -> {}{}{restart}{from}",
            c.key,
            one_line(&c.old),
            one_line(&c.new),
            st.dim(via_note(c.via))
        );
    }
}

/// The plan as markdown, for a pull request comment or a status report.
pub fn markdown(plan: &Plan, wording: Wording) -> String {
    let mut out = String::new();
    let title = match wording {
        Wording::Plan => "Plan",
        Wording::Drift => "Drift report",
    };
    let _ = writeln!(out, "### driftless {title}: {}\n", md::code(&plan.cluster));
    let _ = writeln!(out, "{}\n", summary(plan, wording));
    if !plan.steps.is_empty() {
        let _ = writeln!(out, "| | step | guest | key | from | to | set by |");
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for step in &plan.steps {
            let guest = if step.action.is_cluster_wide() {
                md::text(&step.node)
            } else {
                md::text(&format!(
                    "{} ({} {} on {})",
                    step.node,
                    step.kind.path(),
                    step.vmid,
                    step.pve_node
                ))
            };
            let verb = if step.disruptive {
                format!("{} (disruptive)", step.action.verb())
            } else {
                step.action.verb().to_string()
            };
            match &step.action {
                Action::Update { changes, .. }
                | Action::K3sConfigure { changes, .. }
                | Action::NodeMetadata { changes, .. } => {
                    for c in changes {
                        let _ = writeln!(
                            out,
                            "| {} | {verb} | {guest} | {}{} | {} | {} | {} |",
                            symbol(&step.action),
                            md::code(&c.key),
                            if c.needs_restart { " (on restart)" } else { "" },
                            md::text(c.old.as_deref().unwrap_or("")),
                            md::text(c.new.as_deref().unwrap_or("(removed)")),
                            md::text(c.provenance.as_deref().unwrap_or(""))
                        );
                    }
                }
                Action::Create { params, .. } => {
                    let brief = ["cores", "memory", "net0", "hostname", "name"]
                        .iter()
                        .filter_map(|k| params.get(*k).map(|v| format!("{k}={v}")))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let _ = writeln!(out, "| + | {verb} | {guest} | | | {} | |", md::text(&brief));
                }
                Action::Restart { reason } => {
                    let _ = writeln!(out, "| ! | {verb} | {guest} | | | {} | |", md::text(reason));
                }
                Action::Start => {
                    let _ = writeln!(out, "| > | {verb} | {guest} | | stopped | running | |");
                }
                Action::Delete { .. } => {
                    let _ = writeln!(out, "| - | {verb} | {guest} | | | | prune: true |");
                }
                _ => {}
            }
            if step.action.is_cluster() {
                let lines = cluster_lines(&step.action);
                if !lines.is_empty() {
                    let _ = writeln!(
                        out,
                        "| {} | {verb} | {guest} | | | {} | |",
                        symbol(&step.action),
                        md::text(&lines.join("\n"))
                    );
                }
            }
        }
        let _ = writeln!(out);
    }
    if !plan.conflicts.is_empty() {
        let _ = writeln!(out, "**Conflicts** (never touched):\n");
        for c in &plan.conflicts {
            let _ = writeln!(
                out,
                "- {} (vmid {} on {}): {}",
                md::code(&c.node),
                c.vmid,
                md::text(&c.pve_node),
                md::text(&c.reason)
            );
        }
        let _ = writeln!(out);
    }
    let left: Vec<_> = plan.orphans.iter().filter(|o| !o.pruned).collect();
    if !left.is_empty() {
        let _ = writeln!(
            out,
            "**Guests with the ownership tag in no node file** (left alone, prune is off):\n"
        );
        for o in left {
            let _ = writeln!(
                out,
                "- {} {} {} on {}",
                o.kind.path(),
                o.vmid,
                md::code(o.name.as_deref().unwrap_or("(no name)")),
                md::text(&o.pve_node)
            );
        }
        let _ = writeln!(out);
    }
    for n in &plan.notices {
        let _ = writeln!(
            out,
            "> note: {} (vmid {}): {}",
            md::code(&n.node),
            n.vmid,
            md::text(&n.message)
        );
    }
    out
}
