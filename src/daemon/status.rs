//! Status reports: what the daemon did with one revision of one ref, for people (markdown)
//! and for machines (JSON), committed on the status branch under `status/<ref>.md|.json`.
//!
//! Pure: no clock and no I/O. Times come in as RFC 3339 strings. Reports are built from
//! plans and apply reports, which never hold secrets; [`markdown`] and [`json`] still run a
//! final [`redact`] pass over every secret value they are given.

use crate::apply::ApplyReport;
use crate::daemon::verify::Verification;
use crate::plan::Plan;
use crate::plan::display::{self, Wording};
use crate::plan::markdown as md;
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// What kind of run produced a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// The watched branch: plan, then apply.
    Reconcile,
    /// A ref matching the pull request pattern: planned, never applied.
    PullRequest,
    /// The drift schedule: observe and plan (apply only with `auto_correct`).
    Drift,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Reconcile => "reconcile",
            RunKind::PullRequest => "pull request plan",
            RunKind::Drift => "drift check",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    NoChanges,
    Planned,
    DriftFound,
    NoDrift,
    Invalid,
    Failed,
    Suspended,
    /// `verify:` is on and the revision is not signed as it requires.
    Unverified,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::NoChanges => "no changes",
            Outcome::Planned => "planned",
            Outcome::DriftFound => "drift found",
            Outcome::NoDrift => "no drift",
            Outcome::Invalid => "invalid",
            Outcome::Failed => "failed",
            Outcome::Suspended => "suspended",
            Outcome::Unverified => "unverified",
        }
    }

    /// One sentence for people reading the report.
    pub fn explain(self) -> &'static str {
        match self {
            Outcome::Applied => "The plan was applied.",
            Outcome::NoChanges => "Proxmox already matches this revision: nothing to do.",
            Outcome::Planned => "This is what applying the revision would do; nothing was changed.",
            Outcome::DriftFound => "Proxmox differs from the repository.",
            Outcome::NoDrift => "Proxmox matches the repository.",
            Outcome::Invalid => {
                "The repository does not validate: nothing was planned. Fix it in a new commit; retrying cannot help."
            }
            Outcome::Failed => "The run failed; it is retried with backoff.",
            Outcome::Suspended => "Reconciling is suspended: nothing was applied.",
            Outcome::Unverified => {
                "The revision is not signed as the daemon's `verify:` requires: nothing was planned or applied. Push a signed commit; retrying cannot help."
            }
        }
    }

    /// Whether people should look at it.
    pub fn is_problem(self) -> bool {
        matches!(
            self,
            Outcome::Invalid | Outcome::Failed | Outcome::DriftFound | Outcome::Unverified
        )
    }
}

/// What the daemon did with one revision of one ref.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// The full ref name: `refs/heads/main`, `refs/pull/7/head`.
    pub git_ref: String,
    /// The commit id the run read.
    pub revision: String,
    pub kind: RunKind,
    pub outcome: Outcome,
    /// RFC 3339.
    pub started: String,
    /// RFC 3339.
    pub finished: String,
    pub plan: Option<Plan>,
    pub applied: Option<ApplyReport>,
    pub errors: Vec<String>,
    pub last_attempted_revision: Option<String>,
    pub last_applied_revision: Option<String>,
    /// A pull request's changes to trusted settings (credentials, hosts, reconcile policy):
    /// they apply after merge, and were not used for this plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub untrusted_changes: Vec<String>,
    /// The last applied revision, when this revision of the watched branch does not descend
    /// from it: the branch's history was rewritten (a force-push), and what was applied
    /// before is no longer in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_rewritten: Option<String>,
    /// What the revision holds that loads but is left out (an ADR whose status word is
    /// unknown), as `FILE:LINE:COL: warning: ...` lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The commit signature check, when `verify:` is on.
    pub verification: Option<Verification>,
    /// The replica that ran it, with leader election (`leader_election.identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// The counts a person (or `driftless status`) wants at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    pub create: usize,
    pub update: usize,
    pub restart: usize,
    pub start: usize,
    pub delete: usize,
    pub conflicts: usize,
    /// Guests with the ownership tag in no node file, left alone.
    pub orphans: usize,
    pub notices: usize,
    pub steps_ok: usize,
    pub steps_failed: usize,
    pub not_done: usize,
}

impl Counts {
    pub fn of(r: &StatusReport) -> Counts {
        let mut c = Counts::default();
        if let Some(plan) = &r.plan {
            c.create = plan.count("create");
            c.update = plan.count("update");
            c.restart = plan.count("restart");
            c.start = plan.count("start");
            c.delete = plan.count("delete");
            c.conflicts = plan.conflicts.len();
            c.orphans = plan.orphans.iter().filter(|o| !o.pruned).count();
            c.notices = plan.notices.len();
        }
        if let Some(applied) = &r.applied {
            c.steps_ok = applied.done.iter().filter(|s| s.ok).count();
            c.steps_failed = applied.done.iter().filter(|s| !s.ok).count();
            c.not_done = applied.not_done.len();
        }
        c
    }

    pub fn steps(&self) -> usize {
        self.create + self.update + self.restart + self.start + self.delete
    }
}

/// A report read back from its JSON: what `driftless status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusSummary {
    pub git_ref: String,
    pub revision: String,
    pub kind: RunKind,
    pub outcome: Outcome,
    #[serde(default)]
    pub started: String,
    pub finished: String,
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub last_attempted_revision: Option<String>,
    #[serde(default)]
    pub last_applied_revision: Option<String>,
    #[serde(default)]
    pub counts: Counts,
}

impl StatusSummary {
    /// `refs/heads/main @ 1a2b3c4d5e6f: applied (3 steps: 3 ok) at 2025-01-01T00:00:00Z`
    pub fn one_line(&self) -> String {
        let short = &self.revision[..self.revision.len().min(12)];
        let c = &self.counts;
        let mut detail = Vec::new();
        if c.steps() > 0 {
            detail.push(format!("{} step{}", c.steps(), plural(c.steps())));
        }
        if c.steps_ok + c.steps_failed + c.not_done > 0 {
            detail.push(format!(
                "{} ok, {} failed, {} not done",
                c.steps_ok, c.steps_failed, c.not_done
            ));
        }
        if c.conflicts > 0 {
            detail.push(format!("{} conflict{}", c.conflicts, plural(c.conflicts)));
        }
        if !self.errors.is_empty() {
            detail.push(format!("{} error{}", self.errors.len(), plural(self.errors.len())));
        }
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", detail.join("; "))
        };
        format!(
            "{} @ {short}: {} {}{detail} at {}",
            self.git_ref,
            self.kind.as_str(),
            self.outcome.as_str(),
            self.finished
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("not a driftless status report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("status report format {found} is newer than this driftless understands ({FORMAT})")]
    Format { found: u64 },
}

/// The version of the JSON layout; readers refuse newer ones.
pub const FORMAT: u64 = 1;

/// Read the summary back from a report's JSON (as [`json`] wrote it).
pub fn parse_summary(json: &[u8]) -> Result<StatusSummary, StatusError> {
    let value: serde_json::Value = serde_json::from_slice(json)?;
    let found = value
        .get("format")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(FORMAT);
    if found > FORMAT {
        return Err(StatusError::Format { found });
    }
    Ok(serde_json::from_value(value)?)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn is_safe_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Where a ref's report lives on the status branch: `status/<ref without refs/>.md` and `.json`
/// (`refs/heads/main` -> `status/heads/main.md`, `refs/pull/7/head` -> `status/pull/7/head.md`).
///
/// Nothing can escape `status/`: only `[A-Za-z0-9._-]` survive in a path component (others
/// become `_`), empty components are dropped, and no component starts with `.` (so no `..`, no
/// `.git`). When that changed the name, a hash of the ref is appended, so two refs never share
/// a report.
pub fn report_paths(git_ref: &str) -> (String, String) {
    // A name without `refs/` gets the hash too, so `main` and `refs/main` differ.
    let (name, mut changed) = match git_ref.strip_prefix("refs/") {
        Some(name) => (name, false),
        None => (git_ref, true),
    };
    let mut parts = Vec::new();
    for comp in name.split('/') {
        if comp.is_empty() {
            changed = true;
            continue;
        }
        let mut clean: String = comp.chars().map(|c| if is_safe_char(c) { c } else { '_' }).collect();
        if clean.starts_with('.') {
            clean.replace_range(0..1, "_");
        }
        if clean != comp {
            changed = true;
        }
        parts.push(clean);
    }
    if parts.is_empty() {
        parts.push("_".into());
        changed = true;
    }
    if changed {
        let hash = crate::pve::conf::sha256_hex(git_ref.as_bytes());
        let last = parts.last_mut().expect("at least one component");
        last.push('-');
        last.push_str(&hash[..8]);
    }
    let base = format!("status/{}", parts.join("/"));
    (format!("{base}.md"), format!("{base}.json"))
}

/// Replace every occurrence of each non-empty secret with `<redacted>` (longest first, so a
/// secret containing another is redacted whole).
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut sorted: Vec<&String> = secrets.iter().filter(|s| !s.is_empty()).collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_string();
    for s in sorted {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "<redacted>");
        }
    }
    out
}

fn fenced(s: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in s.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest.max(2) + 1);
    format!("{fence}text\n{}\n{fence}\n", s.trim_end())
}

/// The report for people: the run, the plan as a table, what was applied, and errors.
pub fn markdown(r: &StatusReport, secrets: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## driftless {}: {} {}\n",
        r.kind.as_str(),
        md::code(&r.git_ref),
        r.outcome.as_str()
    );
    let _ = writeln!(out, "{}\n", r.outcome.explain());
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| ref | {} |", md::code(&r.git_ref));
    let _ = writeln!(out, "| revision | {} |", md::code(&r.revision));
    let _ = writeln!(out, "| run | {} |", r.kind.as_str());
    let _ = writeln!(out, "| outcome | **{}** |", r.outcome.as_str());
    let _ = writeln!(out, "| started | {} |", md::text(&r.started));
    let _ = writeln!(out, "| finished | {} |", md::text(&r.finished));
    if let Some(replica) = &r.replica {
        let _ = writeln!(out, "| replica | {} |", md::code(replica));
    }
    if let Some(rev) = &r.last_attempted_revision {
        let _ = writeln!(out, "| last attempted revision | {} |", md::code(rev));
    }
    if let Some(rev) = &r.last_applied_revision {
        let _ = writeln!(out, "| last applied revision | {} |", md::code(rev));
    }
    let _ = writeln!(out);
    if let Some(previous) = &r.history_rewritten {
        let _ = writeln!(
            out,
            "**History rewritten**: the last applied revision {} is not in this revision's history \
             (the branch was force-pushed); what it applied is compared afresh.\n",
            md::code(previous)
        );
    }
    if !r.warnings.is_empty() {
        let _ = writeln!(out, "Warnings:\n");
        for w in &r.warnings {
            let _ = writeln!(out, "- {}", md::text(w));
        }
        let _ = writeln!(out);
    }
    if let Some(v) = &r.verification {
        signatures_markdown(&mut out, v);
    }
    if let Some(plan) = &r.plan {
        let wording = if r.kind == RunKind::Drift {
            Wording::Drift
        } else {
            Wording::Plan
        };
        let _ = writeln!(out, "{}", display::markdown(plan, wording).trim_end());
        let _ = writeln!(out);
    }
    if let Some(applied) = &r.applied {
        let ok = applied.done.iter().filter(|s| s.ok).count();
        let failed = applied.done.len() - ok;
        let _ = writeln!(out, "### Applied\n");
        let _ = writeln!(
            out,
            "{ok} step{} ok, {failed} failed, {} not done.\n",
            plural(ok),
            applied.not_done.len()
        );
        if !applied.done.is_empty() {
            let _ = writeln!(out, "| | step | guest | result |\n|---|---|---|---|");
            for s in &applied.done {
                let result = match (&s.error, s.log.last()) {
                    (Some(e), _) => format!("failed: {e}"),
                    (None, Some(last)) => last.clone(),
                    (None, None) => "ok".into(),
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    if s.ok { "ok" } else { "**failed**" },
                    s.action,
                    md::text(&crate::plan::subject(&s.node, s.vmid)),
                    md::text(&result)
                );
            }
            let _ = writeln!(out);
        }
        if applied.stopped {
            let _ = writeln!(out, "A shutdown stopped the apply between two steps.\n");
        }
        if applied.api_retries > 0 {
            let _ = writeln!(
                out,
                "The Proxmox API did not answer as it should {} time{}: those calls were retried.\n",
                applied.api_retries,
                plural(applied.api_retries as usize)
            );
        }
        if !applied.not_done.is_empty() {
            let _ = writeln!(out, "Not done:\n");
            for n in &applied.not_done {
                let _ = writeln!(out, "- {}", md::text(n));
            }
            let _ = writeln!(out);
        }
    }
    if !r.untrusted_changes.is_empty() {
        let _ = writeln!(
            out,
            "### Not used for this plan\n\nThis pull request changes settings that decide where credentials go and what \
             runs where; they apply after merge, and this plan used the watched branch's instead:\n"
        );
        for c in &r.untrusted_changes {
            let _ = writeln!(out, "- {}", md::text(c));
        }
        let _ = writeln!(out);
    }
    if !r.errors.is_empty() {
        let _ = writeln!(out, "### Errors\n");
        for e in &r.errors {
            let _ = writeln!(out, "{}", fenced(e));
        }
    }
    // Quoted text is escaped: redact a secret's escaped forms too.
    let mut all: Vec<String> = secrets.to_vec();
    for s in secrets {
        for form in [md::text(s), s.replace('|', "\\|")] {
            if !all.contains(&form) {
                all.push(form);
            }
        }
    }
    let text = redact(&out, &all);
    format!("{}\n", text.trim_end())
}

/// The most commits the markdown report lists (the JSON has them all).
const SIGNATURE_ROWS: usize = 50;

/// The signature check: who signed each commit checked, or why it is refused.
fn signatures_markdown(out: &mut String, v: &Verification) {
    let rejected = v.commits.iter().filter(|c| c.rejected.is_some()).count();
    let _ = writeln!(out, "### Signatures\n");
    let _ = writeln!(
        out,
        "Mode `{}`: {} commit{} checked, {}.\n",
        v.mode.as_str(),
        v.commits.len(),
        plural(v.commits.len()),
        if v.verified {
            "all signed by allowed keys".to_string()
        } else {
            format!("**{rejected} not signed as required**")
        }
    );
    if !v.commits.is_empty() {
        let _ = writeln!(out, "| commit | signature |\n|---|---|");
        // Refused commits first: they are what a reader needs; a long range is cut short.
        let mut shown: Vec<_> = v.commits.iter().filter(|c| c.rejected.is_some()).collect();
        shown.extend(v.commits.iter().filter(|c| c.rejected.is_none()));
        for c in shown.iter().take(SIGNATURE_ROWS) {
            // Signer and error text come from the commit: quoted as text, around our own markup.
            let verdict = match (&c.signer, &c.error) {
                (Some(signer), _) => format!("signed by {}", md::text(&signer.to_string())),
                (None, Some(e)) => format!("**refused**: {}", md::text(e)),
                (None, None) => "refused".into(),
            };
            let _ = writeln!(out, "| {} | {verdict} |", md::code(&c.commit));
        }
        if shown.len() > SIGNATURE_ROWS {
            let _ = writeln!(
                out,
                "\n... and {} more (all in the JSON report).",
                shown.len() - SIGNATURE_ROWS
            );
        }
        let _ = writeln!(out);
    }
}

#[derive(Serialize)]
struct JsonReport<'a> {
    format: u64,
    #[serde(flatten)]
    report: &'a StatusReport,
    counts: Counts,
}

/// The report for machines: pretty JSON, keys in a fixed order (`format`, the report's fields
/// in declaration order, `counts`). [`parse_summary`] reads it back.
pub fn json(r: &StatusReport, secrets: &[String]) -> String {
    let wrapped = JsonReport {
        format: FORMAT,
        report: r,
        counts: Counts::of(r),
    };
    let mut value = serde_json::to_value(&wrapped).expect("a status report serialises");
    redact_value(&mut value, secrets);
    let mut text = serde_json::to_string_pretty(&value).expect("a JSON value serialises");
    text.push('\n');
    text
}

/// Redact inside string values and keys, so a secret with `"` or `\` is caught unescaped.
fn redact_value(v: &mut serde_json::Value, secrets: &[String]) {
    use serde_json::Value;
    if secrets.iter().all(String::is_empty) {
        return;
    }
    match v {
        Value::String(s) => *s = redact(s, secrets),
        Value::Array(items) => items.iter_mut().for_each(|i| redact_value(i, secrets)),
        Value::Object(map) => {
            let old = std::mem::take(map);
            for (k, mut val) in old {
                redact_value(&mut val, secrets);
                map.insert(redact(&k, secrets), val);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::StepOutcome;
    use crate::plan::{Action, Conflict, Step};
    use crate::ports::PveKind;

    fn report() -> StatusReport {
        StatusReport {
            git_ref: "refs/heads/main".into(),
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            kind: RunKind::Reconcile,
            outcome: Outcome::Applied,
            started: "2025-01-01T00:00:00Z".into(),
            finished: "2025-01-01T00:01:00Z".into(),
            plan: Some(Plan {
                cluster: "homelab".into(),
                steps: vec![Step {
                    node: "k3s-master".into(),
                    vmid: 200,
                    pve_node: "pve".into(),
                    kind: PveKind::Lxc,
                    disruptive: true,
                    action: Action::Restart {
                        reason: "cores changed | pending".into(),
                    },
                }],
                conflicts: vec![Conflict {
                    node: "k3s-worker-1".into(),
                    vmid: 201,
                    pve_node: "pve".into(),
                    reason: "no ownership tag".into(),
                }],
                orphans: vec![],
                notices: vec![],
            }),
            applied: Some(ApplyReport {
                done: vec![StepOutcome {
                    index: 0,
                    duration_ms: 5200,
                    node: "k3s-master".into(),
                    vmid: 200,
                    action: "restart",
                    ok: true,
                    error: None,
                    failed_system: None,
                    log: vec!["rebooted (task UPID:pve:1)".into()],
                }],
                not_done: vec![],
                ..ApplyReport::default()
            }),
            errors: vec!["token s3cr|et rejected".into()],
            last_attempted_revision: Some("0123456789abcdef0123456789abcdef01234567".into()),
            last_applied_revision: None,
            untrusted_changes: Vec::new(),
            history_rewritten: None,
            warnings: Vec::new(),
            verification: None,
            replica: None,
        }
    }

    #[test]
    fn text_from_a_guest_or_a_pull_request_renders_as_text_not_markup() {
        let mut r = report();
        let hostile = "<img src=https://evil.example/x.png> [docs](https://evil.example) @owner | cell";
        if let Some(applied) = r.applied.as_mut() {
            applied.done[0].log = vec![hostile.into()];
        }
        if let Some(plan) = r.plan.as_mut() {
            plan.steps[0].action = Action::Restart { reason: hostile.into() };
        }
        r.untrusted_changes = vec![hostile.into()];
        let md = markdown(&r, &[]);
        for markup in ["<img", "](https://evil", "@owner", "| cell"] {
            let unescaped = md.match_indices(markup).any(|(i, _)| !md[..i].ends_with('\\'));
            assert!(!unescaped, "{markup} reached the report unescaped:\n{md}");
        }
        assert_eq!(md.matches("evil.example").count(), 6, "the text is still shown:\n{md}");
    }

    #[test]
    fn an_unverified_revision_says_which_commit_and_why_in_both_reports() {
        use crate::daemon::verify::{CommitVerdict, Signer, VerifyMode};
        let mut r = report();
        r.outcome = Outcome::Unverified;
        r.plan = None;
        r.applied = None;
        r.errors = vec!["commit bbbb is not signed".into()];
        r.verification = Some(Verification {
            mode: VerifyMode::All,
            verified: false,
            commits: vec![
                CommitVerdict {
                    commit: "aaaa".into(),
                    signer: Some(Signer {
                        kind: "ssh".into(),
                        identity: "alice@example.com".into(),
                        key: "SHA256:abc".into(),
                    }),
                    rejected: None,
                    error: None,
                },
                CommitVerdict {
                    commit: "bbbb".into(),
                    signer: None,
                    rejected: Some("unsigned".into()),
                    error: Some("commit bbbb is not signed".into()),
                },
            ],
        });
        assert!(Outcome::Unverified.is_problem());
        let md = markdown(&r, &[]);
        assert!(md.contains("| outcome | **unverified** |"), "{md}");
        assert!(md.contains("not signed as the daemon's `verify:` requires"), "{md}");
        assert!(md.contains("### Signatures"), "{md}");
        assert!(
            md.contains("Mode `all`: 2 commits checked, **1 not signed as required**."),
            "{md}"
        );
        assert!(
            md.contains("| `aaaa` | signed by alice@example.com (SSH key SHA256:abc) |"),
            "{md}"
        );
        assert!(
            md.contains("| `bbbb` | **refused**: commit bbbb is not signed |"),
            "{md}"
        );
        let value: serde_json::Value = serde_json::from_str(&json(&r, &[])).unwrap();
        assert_eq!(value["outcome"], "unverified");
        assert_eq!(value["verification"]["mode"], "all");
        assert_eq!(value["verification"]["verified"], false);
        assert_eq!(value["verification"]["commits"][1]["rejected"], "unsigned");
        assert_eq!(
            value["verification"]["commits"][0]["signer"]["identity"],
            "alice@example.com"
        );
        let s = parse_summary(json(&r, &[]).as_bytes()).unwrap();
        assert_eq!(s.outcome, Outcome::Unverified);
        assert!(
            !markdown(&report(), &[]).contains("### Signatures"),
            "no section when verify is off"
        );

        // A long range: the refused commits first, the list cut short, the JSON whole.
        let v = r.verification.as_mut().unwrap();
        let signed = v.commits[0].clone();
        v.commits = std::iter::repeat_n(signed, 60).chain([v.commits[1].clone()]).collect();
        let md = markdown(&r, &[]);
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(rows.len(), SIGNATURE_ROWS, "{md}");
        assert!(rows[0].starts_with("| `bbbb` | **refused**"), "{md}");
        assert!(md.contains("... and 11 more (all in the JSON report)."), "{md}");
        let value: serde_json::Value = serde_json::from_str(&json(&r, &[])).unwrap();
        assert_eq!(value["verification"]["commits"].as_array().unwrap().len(), 61);
    }

    #[test]
    fn report_paths_follow_the_ref_name() {
        assert_eq!(
            report_paths("refs/heads/main"),
            ("status/heads/main.md".into(), "status/heads/main.json".into())
        );
        assert_eq!(report_paths("refs/pull/7/head").0, "status/pull/7/head.md");
        assert_eq!(report_paths("refs/heads/pr/1").1, "status/heads/pr/1.json");
    }

    #[test]
    fn report_paths_cannot_escape_the_status_directory() {
        for r in [
            "refs/heads/../../etc/passwd",
            "/etc/passwd",
            "../x",
            "refs/heads/.git/config",
            "refs//heads/a b",
            "",
            "refs/",
            "..",
            "refs/heads/ü\n\0",
        ] {
            let (md, json) = report_paths(r);
            for p in [&md, &json] {
                assert!(p.starts_with("status/"), "{r:?} -> {p}");
                assert!(p.chars().all(|c| is_safe_char(c) || c == '/'), "{r:?} -> {p}");
                for comp in p.split('/') {
                    assert!(!comp.is_empty() && !comp.starts_with('.'), "{r:?} -> {p}");
                }
            }
        }
        // Sanitised names carry a hash of the ref: two refs never share a report.
        assert_ne!(report_paths("refs/heads/a b").0, report_paths("refs/heads/a_b").0);
        assert_ne!(report_paths("refs/heads/a+b").0, report_paths("refs/heads/a_b").0);
    }

    #[test]
    fn markdown_shows_the_revision_outcome_plan_and_apply() {
        let md = markdown(&report(), &[]);
        assert!(md.contains("0123456789abcdef0123456789abcdef01234567"), "{md}");
        assert!(md.contains("| outcome | **applied** |"), "{md}");
        assert!(md.contains("### driftless Plan: `homelab`"), "{md}");
        assert!(md.contains("| | step | guest | key | from | to | set by |"), "{md}");
        assert!(md.contains("restart (disruptive)"), "{md}");
        assert!(md.contains("1 step ok, 0 failed, 0 not done."), "{md}");
        assert!(md.contains("rebooted (task UPID:pve:1)"), "{md}");
        assert!(md.contains("### Errors"), "{md}");

        let mut drift = report();
        drift.kind = RunKind::Drift;
        drift.outcome = Outcome::DriftFound;
        drift.applied = None;
        let md = markdown(&drift, &[]);
        assert!(md.contains("### driftless Drift report"), "{md}");
        assert!(!md.contains("### Applied"), "{md}");
    }

    #[test]
    fn json_round_trips_through_the_summary() {
        let r = report();
        let text = json(&r, &[]);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.first(), Some(&"format"));
        assert_eq!(keys.last(), Some(&"counts"));
        assert_eq!(value["kind"], "reconcile");
        assert_eq!(value["outcome"], "applied");
        let s = parse_summary(text.as_bytes()).unwrap();
        assert_eq!(s.git_ref, r.git_ref);
        assert_eq!(s.revision, r.revision);
        assert_eq!(s.kind, RunKind::Reconcile);
        assert_eq!(s.outcome, Outcome::Applied);
        assert_eq!(s.finished, r.finished);
        assert_eq!(s.errors, r.errors);
        assert_eq!(s.counts.restart, 1);
        assert_eq!(s.counts.conflicts, 1);
        assert_eq!(s.counts.steps_ok, 1);
        assert!(
            s.one_line()
                .starts_with("refs/heads/main @ 0123456789ab: reconcile applied")
        );
        // Same input, same bytes.
        assert_eq!(text, json(&r, &[]));

        let newer = text.replacen("\"format\": 1", "\"format\": 99", 1);
        assert!(matches!(
            parse_summary(newer.as_bytes()),
            Err(StatusError::Format { found: 99 })
        ));
        assert!(parse_summary(b"not json").is_err());
    }

    #[test]
    fn redaction_removes_secrets_everywhere() {
        assert_eq!(
            redact("a hunter2 b hunter2", &["hunter2".into()]),
            "a <redacted> b <redacted>"
        );
        assert_eq!(redact("abcdef", &["".into()]), "abcdef");
        assert_eq!(redact("xabcx", &["ab".into(), "abc".into()]), "x<redacted>x");
        let secrets = vec!["s3cr|et".to_string()];
        let md = markdown(&report(), &secrets);
        assert!(!md.contains("s3cr"), "{md}");
        assert!(md.contains("<redacted>"), "{md}");
        let js = json(&report(), &secrets);
        assert!(!js.contains("s3cr"), "{js}");
        assert_eq!(
            parse_summary(js.as_bytes()).unwrap().errors,
            vec!["token <redacted> rejected"]
        );
        let quoted = vec!["a\"b".to_string()];
        let mut r = report();
        r.errors = vec!["x a\"b y".into()];
        assert!(!json(&r, &quoted).contains("a\\\"b"));
    }
}
