//! Each run (reconcile, pull request plan, drift check) happens in a worker process: the
//! daemon's own binary started as `driftless daemon-run`, given the job as JSON on stdin,
//! answering with the outcome as JSON on stdout, logging on the daemon's stderr.
//!
//! The daemon itself only fetches, schedules, keeps the revisions and serves HTTP. What a run
//! loads and pages in (templates, TLS sessions, the SSH, Kubernetes and Talos clients, the
//! code behind them) leaves with the worker, so an idle daemon stays small; a run that
//! panics or is killed cannot take the daemon down (it is reported as failed); and the secrets
//! the repository names are resolved only in the short-lived worker, never in the daemon.

use super::config::DaemonSettings;
use super::decide::{self, Revisions};
use super::forge::{CommitState, ForgeClient};
use super::git::{GitAuth, Mirror};
use super::status::{self, Outcome, RunKind, StatusReport};
use super::trust;
use super::verify::{Policy, Verification, VerifyMode};
use crate::apply::{Progress, StepOutcome};
use crate::connect::Connection;
use crate::model::{self, Desired, LoadOptions, RepoFiles};
use crate::plan::Step;
use crate::ports::System;
use crate::reconcile::Reconcile;
use crate::render::{self, Artifact};
use crate::settings::RunSettings;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a worker is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunJob {
    pub settings: DaemonSettings,
    /// The run's connection and cluster-layer settings.
    pub run: RunSettings,
    pub git_ref: String,
    pub commit: String,
    pub kind: RunKind,
    /// The daemon's revisions before this run.
    pub revisions: Revisions,
}

impl RunJob {
    /// The report of this run as it starts: failed until the run says otherwise.
    pub fn report(&self, started: String) -> StatusReport {
        StatusReport {
            git_ref: self.git_ref.clone(),
            revision: self.commit.clone(),
            kind: self.kind,
            outcome: Outcome::Failed,
            started,
            finished: String::new(),
            plan: None,
            applied: None,
            errors: Vec::new(),
            last_attempted_revision: None,
            last_applied_revision: None,
            untrusted_changes: Vec::new(),
            history_rewritten: None,
            warnings: Vec::new(),
            verification: None,
            replica: self.settings.leader_election.as_ref().map(|l| l.identity.clone()),
        }
    }

    /// Close `report`: when it finished, and the revisions as its outcome leaves them.
    pub fn finish(&self, report: &mut StatusReport, finished: String) {
        let revisions = self.revisions.after(self.kind, &self.commit, report.outcome);
        report.last_attempted_revision = revisions.last_attempted;
        report.last_applied_revision = revisions.last_applied;
        report.finished = finished;
    }
}

/// A revision's own schedule (cluster.yaml `reconcile:`), which the daemon follows unless its
/// flags say otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub interval: Option<Duration>,
    pub drift_schedule: String,
}

/// What a worker answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    pub outcome: Outcome,
    /// The number of steps a drift check found (for the drift gauge).
    pub drifted: Option<usize>,
    /// Calls to other systems that failed (for the API error counter).
    pub api_errors: Vec<System>,
    /// The revision's schedule, when it loaded.
    pub schedule: Option<Schedule>,
}

// ---- the daemon's side ----

/// How often a waiting daemon looks at its stop flag and the run's time limit.
const STOP_CHECK: Duration = Duration::from_millis(100);

fn send(pid: Option<u32>, signal: libc::c_int) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill only sends a signal to the worker we started.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Run `job` in a worker process and wait for its answer. A stop request (`stop` set) or the
/// run's time limit (`limits.run_timeout`, or `plan_timeout` for a pull request) is passed on
/// as SIGTERM, once: the worker ends its apply between two steps and still answers. A worker
/// still running `stop_grace` after that is killed. Errors mean the worker gave no answer (it
/// could not start, crashed or was killed); the message says which and holds no secret.
pub async fn run_in_worker(job: &RunJob, stop: &AtomicBool) -> Result<RunResult, String> {
    use tokio::io::AsyncWriteExt;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the driftless binary for the worker: {e}"))?;
    let mut child = tokio::process::Command::new(&exe)
        .arg("daemon-run")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the worker {}: {e}", exe.display()))?;
    let pid = child.id();
    let input = serde_json::to_vec(job).expect("a job serialises");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // The job is small; a worker that dies before reading it shows up as its exit status.
    let _ = stdin.write_all(&input).await;
    drop(stdin);

    let limits = job.settings.limits;
    let time_limit = if job.kind == RunKind::PullRequest {
        limits.plan_timeout
    } else {
        limits.run_timeout
    };
    let deadline = tokio::time::Instant::now() + time_limit;
    let output = child.wait_with_output();
    tokio::pin!(output);
    let mut terminated: Option<tokio::time::Instant> = None;
    let mut timed_out = false;
    let mut killed = false;
    let mut tick = tokio::time::interval(STOP_CHECK);
    let output = loop {
        tokio::select! {
            out = &mut output => break out,
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                if terminated.is_none() && (stop.load(Ordering::SeqCst) || now >= deadline) {
                    timed_out = now >= deadline;
                    send(pid, libc::SIGTERM);
                    terminated = Some(now);
                }
                if !killed && terminated.is_some_and(|at| now >= at + limits.stop_grace) {
                    tracing::warn!(commit = %job.commit, "the worker did not stop within its grace period: killing it");
                    send(pid, libc::SIGKILL);
                    killed = true;
                }
            }
        }
    };
    let output = output.map_err(|e| format!("cannot wait for the worker: {e}"))?;
    if timed_out {
        tracing::warn!(commit = %job.commit, limit = ?time_limit, "the run reached its time limit and was stopped");
    }
    if let Ok(result) = serde_json::from_slice::<RunResult>(&output.stdout) {
        return Ok(result);
    }
    let why = if timed_out {
        format!(" after it reached its time limit of {}s", time_limit.as_secs())
    } else {
        String::new()
    };
    Err(
        match (
            output.status.code(),
            std::os::unix::process::ExitStatusExt::signal(&output.status),
        ) {
            (_, Some(signal)) => {
                format!("the run's worker process was killed by signal {signal}{why} before it answered")
            }
            (Some(code), _) => format!("the run's worker process exited with status {code}{why} before it answered"),
            _ => format!("the run's worker process ended without an answer{why}"),
        },
    )
}

// ---- the worker's side ----

/// `driftless daemon-run`: read the job from stdin, run it, print the result on stdout.
pub fn main() -> Result<()> {
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        anyhow::bail!("daemon-run is started by `driftless daemon` for each run and reads its job on stdin");
    }
    let mut input = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut input).context("cannot read the job from stdin")?;
    let job: RunJob = serde_json::from_slice(&input).context("daemon-run reads a job from the daemon on stdin")?;
    if let Some(format) = job.settings.log_format {
        crate::runtime::init_logging(format);
    }
    // A run is bounded in memory: what it reads (a repository, a pull request's templates, a
    // node's answers) is untrusted, and must not be able to take the host's memory.
    super::memory::limit_arenas();
    if let Err(e) = super::memory::limit_address_space(job.settings.limits.worker_memory) {
        tracing::warn!(error = %e, "cannot limit the run's memory");
    }
    let result = crate::runtime::tokio_runtime()?.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        {
            let stop = stop.clone();
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot handle SIGTERM")?;
            tokio::spawn(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                stop.store(true, Ordering::SeqCst);
            });
        }
        let worker = Worker::open(&job, stop).await?;
        anyhow::Ok(worker.run(&job).await)
    })?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &result)?;
    std::io::Write::flush(&mut out)?;
    Ok(())
}

struct LogProgress;

impl Progress for LogProgress {
    fn step_started(&mut self, index: usize, total: usize, step: &Step) {
        tracing::info!(step = index + 1, total, action = step.action.verb(), node = %step.node, vmid = step.vmid, "step started");
    }
    fn step_finished(&mut self, o: &StepOutcome) {
        let step = o.index + 1;
        match &o.error {
            None => {
                tracing::info!(step, node = %o.node, action = o.action, duration_ms = o.duration_ms, log = %o.log.join(", "), "step done")
            }
            Some(e) => {
                tracing::error!(step, node = %o.node, action = o.action, duration_ms = o.duration_ms, error = %e, "step failed")
            }
        }
    }
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn git_auth(settings: &DaemonSettings) -> GitAuth {
    GitAuth {
        ssh_key: settings.ssh_key.clone(),
        known_hosts: settings.known_hosts.clone(),
        token_file: settings.token_file.clone(),
    }
}

/// Every secret the daemon and this run hold besides the repository's: the Proxmox token of
/// an override, the webhook, forge and git credentials, and what the cluster wrote into the
/// secrets directory (kubeconfig, talosconfig). A report is redacted of all of them.
pub fn daemon_secrets(settings: &DaemonSettings, run: &RunSettings) -> Vec<String> {
    let mut values = Vec::new();
    let read = |path: Option<&std::path::Path>| path.and_then(|p| std::fs::read_to_string(p).ok());
    // Whole credential files: a token, a webhook secret, a private key.
    for path in [
        run.proxmox.token_file.as_deref(),
        settings.plan_token_file.as_deref(),
        settings.webhook_secret_file.as_deref(),
        settings.token_file.as_deref(),
        settings.ssh_key.as_deref(),
        settings.forge.as_ref().map(|f| f.3.as_path()),
    ] {
        values.extend(read(path).map(|t| secret_parts(&t, false)).unwrap_or_default());
    }
    if let Ok(token) = std::env::var("DRIFTLESS_PROXMOX_TOKEN") {
        values.extend(secret_parts(&token, false));
    }
    // Configs the cluster wrote: only their keys, certificates and tokens are secret.
    for name in [
        crate::cluster::access::KUBECONFIG_FILE,
        crate::cluster::access::TALOSCONFIG_FILE,
    ] {
        values.extend(
            read(Some(&run.secrets_dir.join(name)))
                .map(|t| secret_parts(&t, true))
                .unwrap_or_default(),
        );
    }
    // The leader election's kubeconfig, the same way.
    let lease_kubeconfig = settings
        .leader_election
        .as_ref()
        .and_then(|l| l.kubeconfig_file.as_deref());
    values.extend(
        read(lease_kubeconfig)
            .map(|t| secret_parts(&t, true))
            .unwrap_or_default(),
    );
    values
}

/// The parts of a credential file worth redacting, when long enough not to be an ordinary
/// word: the whole text, each line and each line's value; with `credential_keys_only`, just
/// the values of keys that name a key, token, password, secret or certificate.
fn secret_parts(text: &str, credential_keys_only: bool) -> Vec<String> {
    const SHORTEST: usize = 12;
    const CREDENTIAL: [&str; 6] = ["key", "token", "password", "secret", "crt", "cert"];
    let mut parts = Vec::new();
    if !credential_keys_only {
        parts.push(text.trim().to_string());
    }
    for line in text.lines().map(str::trim) {
        let Some((key, value)) = line.split_once(':').or_else(|| line.split_once('=')) else {
            if !credential_keys_only {
                parts.push(line.to_string());
            }
            continue;
        };
        let key = key.to_ascii_lowercase();
        if !credential_keys_only || CREDENTIAL.iter().any(|c| key.contains(c)) {
            parts.push(value.trim().trim_matches('"').to_string());
            if !credential_keys_only {
                parts.push(line.to_string());
            }
        }
    }
    parts.retain(|p| p.len() >= SHORTEST);
    parts.sort();
    parts.dedup();
    parts
}

/// The forge client the settings name, if any.
pub fn forge_client(settings: &DaemonSettings) -> Result<Option<ForgeClient>> {
    let Some((kind, api, repo, token_file)) = &settings.forge else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(token_file).with_context(|| format!("cannot read {}", token_file.display()))?;
    Ok(Some(ForgeClient::new(
        *kind,
        api.clone(),
        repo.clone(),
        token.trim().to_string(),
    )?))
}

/// Commit `report` (redacted of `secrets`) to the status branch. Failures are logged: a
/// report that cannot be pushed must not fail the run it reports.
pub async fn publish(
    mirror: &Arc<Mirror>,
    settings: &DaemonSettings,
    report: &StatusReport,
    secrets: &[String],
) -> bool {
    let (md_path, json_path) = status::report_paths(&report.git_ref);
    let files = vec![
        (md_path, status::markdown(report, secrets).into_bytes()),
        (json_path, status::json(report, secrets).into_bytes()),
    ];
    let message = format!(
        "{} {}: {} at {}",
        report.kind.as_str(),
        report.git_ref.trim_start_matches("refs/heads/"),
        report.outcome.as_str(),
        &report.revision[..report.revision.len().min(12)]
    );
    let mirror = mirror.clone();
    let url = settings.repository.clone();
    let branch = settings.status_branch.clone();
    let queue = report_queue(settings);
    let git_ref = report.git_ref.clone();
    match tokio::task::spawn_blocking(move || {
        let pushed = mirror.publish_status(&url, &branch, &files, &message);
        if pushed.is_err() {
            // Kept until a later push gets through: the daemon retries queued reports on
            // every poll, so a busy or unreachable remote delays a report, never loses it.
            if let Err(e) = queue_report(&queue, &git_ref, &files, &message) {
                tracing::error!(error = %e, "cannot queue the status report");
            }
        }
        pushed
    })
    .await
    {
        Ok(Ok(commit)) => {
            tracing::info!(%commit, git_ref = %report.git_ref, outcome = report.outcome.as_str(), "status report committed");
            true
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot commit the status report now: queued, retried on the next poll");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "status report task failed");
            false
        }
    }
}

/// Where status reports wait that could not be pushed: one directory per ref (the latest
/// report of a ref replaces one still waiting), in the daemon's state directory.
fn report_queue(settings: &DaemonSettings) -> std::path::PathBuf {
    settings.state_dir.join("status-queue")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct QueuedReport {
    files: Vec<(String, Vec<u8>)>,
    message: String,
}

fn queue_report(queue: &std::path::Path, git_ref: &str, files: &[(String, Vec<u8>)], message: &str) -> Result<()> {
    std::fs::create_dir_all(queue)?;
    let name = &crate::pve::conf::sha256_hex(git_ref.as_bytes())[..16];
    let entry = QueuedReport {
        files: files.to_vec(),
        message: message.to_string(),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(queue)?;
    serde_json::to_writer(&mut tmp, &entry)?;
    tmp.as_file().sync_all()?;
    tmp.persist(queue.join(format!("{name}.json")))?;
    Ok(())
}

/// Push the reports waiting in the queue, oldest first; each one pushed leaves the queue. How
/// many are still waiting.
pub fn flush_queued_reports(mirror: &Mirror, settings: &DaemonSettings) -> usize {
    let queue = report_queue(settings);
    let Ok(dir) = std::fs::read_dir(&queue) else {
        return 0;
    };
    let mut entries: Vec<(std::time::SystemTime, std::path::PathBuf)> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            (
                std::fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                p,
            )
        })
        .collect();
    entries.sort();
    let mut waiting = 0;
    for (_, path) in entries {
        let Some(entry) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<QueuedReport>(&b).ok())
        else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        match mirror.publish_status(
            &settings.repository,
            &settings.status_branch,
            &entry.files,
            &entry.message,
        ) {
            Ok(commit) => {
                tracing::info!(%commit, "queued status report pushed");
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => {
                tracing::warn!(error = %e, "queued status report still waiting");
                waiting += 1;
            }
        }
    }
    waiting
}

/// Set a commit status on the forge, if there is one. Failures are logged: the forge is a
/// courtesy, never a reason for a run to fail.
pub async fn forge_status(
    forge: Option<&ForgeClient>,
    sha: &str,
    state: CommitState,
    context: &str,
    description: &str,
) {
    if let Some(forge) = forge
        && let Err(e) = forge.set_status(sha, state, context, description, None).await
    {
        tracing::warn!(error = %e, "cannot set the commit status on the forge");
    }
}

/// The forge's commit status context for a run.
pub fn forge_context(kind: RunKind) -> &'static str {
    if kind == RunKind::PullRequest {
        "driftless/plan"
    } else {
        "driftless/apply"
    }
}

/// The commit status a finished run leaves on the forge.
pub fn forge_state(outcome: Outcome) -> CommitState {
    if outcome.is_problem() && outcome != Outcome::DriftFound {
        CommitState::Failure
    } else {
        CommitState::Success
    }
}

/// Where a daemon with `verify: mode: all` keeps the last watched-branch head whose new commits
/// all verified: every commit reachable from it has been checked, so later runs check only what
/// is new, across restarts too (the daemon's own memory of the last applied revision is not).
/// One file per repository URL, as the mirror: another repository's commit would hide nothing.
pub fn verified_head_path(state_dir: &Path, repository: &str) -> PathBuf {
    let hash = crate::pve::conf::sha256_hex(repository.as_bytes());
    state_dir.join(format!("verified-head-{}", &hash[..12]))
}

/// The commits a run's signature check covers, newest first: the head alone (`head` mode, or
/// `all` mode with nothing verified before: the first revision is taken at its head), or every
/// commit reachable from it and from none of `verified` (always the head among them).
fn commits_to_verify(mirror: &Mirror, mode: VerifyMode, head: &str, verified: &[String]) -> Result<Vec<String>> {
    if mode == VerifyMode::Head || verified.is_empty() {
        return Ok(vec![head.to_string()]);
    }
    let mut ids = mirror.commits_since(head, verified)?;
    if !ids.iter().any(|c| c == head) {
        // The head is already verified (a branch reset to it): checked again all the same.
        ids.insert(0, head.to_string());
    }
    Ok(ids)
}

/// Check the commit signatures of `head` under `verify:`. Errors are the daemon's own (a key
/// file it cannot read, a mirror it cannot read), not a verdict on the revision.
fn verify_revision(
    mirror: &Mirror,
    settings: &super::verify::VerifySettings,
    head: &str,
    verified: &[String],
) -> Result<Verification> {
    let policy = Policy::load(settings)?;
    let ids = commits_to_verify(mirror, settings.mode, head, verified)?;
    let raw = mirror.raw_commits(&ids)?;
    let commits: Vec<(String, Vec<u8>)> = ids.into_iter().zip(raw).collect();
    Ok(Verification::check(
        settings.mode,
        &commits,
        &policy,
        chrono::Utc::now().timestamp(),
    ))
}

struct Worker {
    settings: DaemonSettings,
    run: RunSettings,
    mirror: Arc<Mirror>,
    stop: Arc<AtomicBool>,
    forge: Option<ForgeClient>,
    api_errors: Mutex<Vec<System>>,
}

impl Worker {
    async fn open(job: &RunJob, stop: Arc<AtomicBool>) -> Result<Worker> {
        let (url, dir, auth) = (
            job.settings.repository.clone(),
            job.settings.state_dir.join("mirror"),
            git_auth(&job.settings),
        );
        let mirror = tokio::task::spawn_blocking(move || Mirror::open_or_init(&url, &dir, auth)).await??;
        Ok(Worker {
            settings: job.settings.clone(),
            run: job.run.clone(),
            mirror: Arc::new(mirror),
            stop,
            forge: forge_client(&job.settings)?,
            api_errors: Mutex::new(Vec::new()),
        })
    }

    fn api_error(&self, system: System) {
        self.api_errors.lock().expect("not poisoned").push(system);
    }

    async fn read_files(&self, commit: &str) -> Result<RepoFiles> {
        let mirror = self.mirror.clone();
        let commit = commit.to_string();
        Ok(tokio::task::spawn_blocking(move || mirror.read_files(&commit)).await??)
    }

    /// The secrets this repository names, as values, so a report can never carry one.
    fn secret_values(&self, desired: &Desired) -> Vec<String> {
        let store = crate::secrets::SecretStore::new(&self.run.secrets_dir);
        let mut values = Vec::new();
        for secret in desired.cluster.secrets.keys().filter_map(|n| store.resolve(n).ok()) {
            // A Talos secrets bundle: each certificate, key and token on its own too.
            if let Ok(bundle) = crate::cluster::talos_secrets::TalosSecrets::parse(secret.expose()) {
                for field in bundle.field_names() {
                    values.extend(bundle.get(field).map(str::to_string));
                    // Talos's diffs show certificates and keys decoded, line by line.
                    if let Ok(pem) = bundle.pem(field) {
                        values.extend(
                            pem.lines()
                                .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                                .map(str::to_string),
                        );
                    }
                }
            }
            values.push(secret.expose().to_string());
        }
        values.extend(daemon_secrets(&self.settings, &self.run));
        values
    }

    /// The watched branch's last valid revision, loaded: what a pull request's plan takes its
    /// trusted settings from.
    async fn trusted_state(&self, revisions: &decide::Revisions) -> Result<Desired, String> {
        let commit = revisions.last_valid.as_deref().ok_or(
            "no valid revision of the watched branch yet: a pull request is planned with the watched \
             branch's settings (Proxmox, hosts, secrets, policy), so it waits for one",
        )?;
        let files = self
            .read_files(commit)
            .await
            .map_err(|e| format!("cannot read the watched branch's revision {commit}: {e:#}"))?;
        model::load(&files, &LoadOptions::default())
            .map_err(|_| format!("the watched branch's revision {commit} no longer loads"))
    }

    /// Load a revision, and refuse it like an invalid one when it sets what the daemon's
    /// `policy:` forbids (a pull request's plan says so before it is merged).
    fn load_within_policy(&self, files: &RepoFiles) -> Result<Desired, Vec<String>> {
        let desired = model::load(files, &LoadOptions::default())
            .map_err(|diags| diags.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        match self.settings.policy.violations(&desired) {
            v if v.is_empty() => Ok(desired),
            v => Err(v),
        }
    }

    /// Plan (and for the watched branch, apply) one revision, and report it.
    async fn run(&self, job: &RunJob) -> RunResult {
        let (commit, kind) = (job.commit.as_str(), job.kind);
        let context = forge_context(kind);
        forge_status(self.forge.as_ref(), commit, CommitState::Pending, context, "planning").await;
        let mut report = job.report(now_rfc3339());
        let mut secrets = daemon_secrets(&self.settings, &self.run);
        let mut schedule = None;
        if kind == RunKind::Reconcile
            && let Some(previous) = job.revisions.last_applied.clone()
        {
            let (mirror, head, before) = (self.mirror.clone(), job.commit.clone(), previous.clone());
            let descends = tokio::task::spawn_blocking(move || mirror.is_ancestor(&before, &head)).await;
            if let Ok(Ok(false)) = descends {
                tracing::warn!(%commit, last_applied = %previous, "the watched branch's history was rewritten");
                report.history_rewritten = Some(previous);
            }
        }
        let loaded = if self.check_signatures(job, &mut report).await {
            self.read_files(commit).await.map(Some)
        } else {
            Ok(None)
        };
        match loaded {
            Ok(None) => {}
            Err(e) => {
                self.api_error(System::Git);
                report.errors.push(format!("cannot read revision {commit}: {e:#}"));
            }
            Ok(Some(files)) => match self.load_within_policy(&files) {
                Err(errors) => {
                    report.outcome = Outcome::Invalid;
                    report.errors = errors;
                }
                Ok(desired) => {
                    report.warnings = desired
                        .warnings
                        .iter()
                        .map(|w| model::diag::Warning(w).to_string())
                        .collect();
                    for w in &report.warnings {
                        tracing::warn!(%commit, warning = %w, "the revision loads with a warning");
                    }
                    if kind == RunKind::PullRequest {
                        match self.trusted_state(&job.revisions).await {
                            Err(e) => report.errors.push(e),
                            Ok(trusted) => {
                                let (desired, ignored) = trust::pull_request_state(desired, &trusted);
                                report.untrusted_changes = ignored;
                                secrets = self.secret_values(&trusted);
                                self.render_and_run(&desired, &trusted, kind, &mut report).await;
                            }
                        }
                    } else {
                        // Only the watched branch's own revisions set the daemon's schedule.
                        let r = &desired.cluster.reconcile;
                        schedule = Some(Schedule {
                            interval: model::parse_duration(&r.interval).map(Duration::from_secs),
                            drift_schedule: r.drift_schedule.clone(),
                        });
                        secrets = self.secret_values(&desired);
                        self.render_and_run(&desired, &desired, kind, &mut report).await;
                    }
                }
            },
        }
        job.finish(&mut report, now_rfc3339());
        forge_status(
            self.forge.as_ref(),
            commit,
            forge_state(report.outcome),
            context,
            report.outcome.explain(),
        )
        .await;
        if !publish(&self.mirror, &self.settings, &report, &secrets).await {
            self.api_error(System::Git);
        }
        let drifted = (kind == RunKind::Drift).then(|| report.plan.as_ref().map_or(0, |p| p.steps.len()));
        RunResult {
            outcome: report.outcome,
            drifted,
            api_errors: self.api_errors.lock().expect("not poisoned").clone(),
            schedule,
        }
    }

    async fn render_and_run(&self, desired: &Desired, trusted: &Desired, kind: RunKind, report: &mut StatusReport) {
        match render::render_all(desired) {
            Err(diags) => {
                report.outcome = Outcome::Invalid;
                report.errors = diags.0.iter().map(ToString::to_string).collect();
            }
            Ok(artifacts) => {
                self.plan_and_maybe_apply(desired, trusted, &artifacts, kind, report)
                    .await
            }
        }
    }

    /// With `verify:` on, check the signatures of the run's revision before anything of it is
    /// read, and put the verdict in `report`; whether the run goes on. A revision not signed as
    /// required is `Unverified` and stalls until a new commit, like an invalid one. A pull
    /// request is planned all the same (it is never applied); its report shows the verdict, for
    /// the reviewers.
    async fn check_signatures(&self, job: &RunJob, report: &mut StatusReport) -> bool {
        let Some(settings) = self.settings.verify.clone() else {
            return true;
        };
        let anchor = verified_head_path(&self.settings.state_dir, &self.settings.repository);
        // Commits reachable from these were verified by this daemon: `all` mode starts there.
        let verified: Vec<String> = std::fs::read_to_string(&anchor)
            .ok()
            .map(|s| s.trim().to_string())
            .into_iter()
            .chain(job.revisions.last_applied.clone())
            .filter(|s| !s.is_empty())
            .collect();
        let (mirror, head) = (self.mirror.clone(), job.commit.clone());
        let checked = tokio::task::spawn_blocking(move || verify_revision(&mirror, &settings, &head, &verified))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
        let verification = match checked {
            Ok(v) => v,
            Err(e) => {
                // The daemon could not check (a key file or the mirror unreadable): a failure,
                // retried with backoff, never an apply.
                report.errors.push(format!("cannot check the commit signatures: {e:#}"));
                return false;
            }
        };
        let verified = verification.verified;
        let mode = verification.mode;
        if !verified {
            tracing::warn!(commit = %job.commit, git_ref = %job.git_ref, "commit signatures do not verify");
        }
        if verified && job.kind == RunKind::Reconcile && mode == VerifyMode::All {
            let written = tempfile::NamedTempFile::new_in(&self.settings.state_dir).and_then(|mut f| {
                std::io::Write::write_all(&mut f, format!("{}\n", job.commit).as_bytes())?;
                f.persist(&anchor).map(|_| ()).map_err(|e| e.error)
            });
            if let Err(e) = written {
                tracing::warn!(error = %e, path = %anchor.display(), "cannot record the verified revision");
            }
        }
        if !verified && job.kind != RunKind::PullRequest {
            report.outcome = Outcome::Unverified;
            report.errors.extend(verification.errors(5));
        }
        report.verification = Some(verification);
        verified || job.kind == RunKind::PullRequest
    }

    async fn plan_and_maybe_apply(
        &self,
        desired: &Desired,
        trusted: &Desired,
        artifacts: &[Artifact],
        kind: RunKind,
        report: &mut StatusReport,
    ) {
        // Where credentials go is decided by the trusted state alone; a pull request's plan
        // holds the read-only token when the daemon has one.
        let mut run = self.run.clone();
        if kind == RunKind::PullRequest && self.settings.plan_token_file.is_some() {
            run.proxmox.token_file = self.settings.plan_token_file.clone();
        }
        let connection = match Connection::open(&run, &trusted.cluster, &trusted.nodes) {
            Ok(c) => c,
            Err(e) => {
                self.api_error(e.system());
                report.errors.push(e.to_string());
                return;
            }
        };
        let run = Reconcile::connected(desired, trusted, artifacts, &connection);
        // A run that may apply holds the cluster's run lock from its plan to its last step.
        let policy_applies = decide::applies(
            kind,
            decide::Policy {
                suspend: trusted.cluster.reconcile.suspend,
                auto_correct: self
                    .settings
                    .auto_correct
                    .unwrap_or(trusted.cluster.reconcile.auto_correct),
            },
        );
        let _lock = if policy_applies {
            match run.lock(&crate::reconcile::lock_holder("daemon")).await {
                Ok(lock) => lock,
                Err(e) => {
                    self.api_error(e.system());
                    report.errors.push(e.to_string());
                    return;
                }
            }
        } else {
            None
        };
        let plan = match run.plan().await {
            Ok(p) => p,
            Err(e) => {
                self.api_error(e.system());
                report.errors.push(e.to_string());
                return;
            }
        };
        let policy = decide::Policy {
            suspend: trusted.cluster.reconcile.suspend,
            auto_correct: self
                .settings
                .auto_correct
                .unwrap_or(trusted.cluster.reconcile.auto_correct),
        };
        report.outcome = decide::outcome(kind, policy, plan.is_empty());
        if decide::applies(kind, policy) && !plan.is_empty() {
            let applied = run.apply(&plan, &mut LogProgress, Some(&self.stop)).await;
            if !applied.ok() {
                report.outcome = Outcome::Failed;
                for failed in applied.done.iter().filter(|s| !s.ok) {
                    report.errors.extend(failed.error.clone());
                    if let Some(system) = failed.failed_system {
                        self.api_error(system);
                    }
                }
                if applied.stopped {
                    report.errors.push("stopped by shutdown between two steps".into());
                }
            }
            report.applied = Some(applied);
        }
        report.plan = Some(plan);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_files_are_redacted_whole_and_configs_by_their_credential_keys() {
        let token = secret_parts("root@pam!driftless=0b4c-5e6f-7a8b-9c0d\n", false);
        assert!(
            token.contains(&"root@pam!driftless=0b4c-5e6f-7a8b-9c0d".to_string()),
            "{token:?}"
        );
        assert!(token.contains(&"0b4c-5e6f-7a8b-9c0d".to_string()), "{token:?}");
        let kubeconfig = "clusters:\n- cluster:\n    server: https://10.0.0.11:6443\nusers:\n- user:\n    \
                          client-key-data: LS0tLS1CRUdJTiBFQyBQUklWQVRF\n    token: abcdef0123456789\n";
        let parts = secret_parts(kubeconfig, true);
        assert_eq!(parts, ["LS0tLS1CRUdJTiBFQyBQUklWQVRF", "abcdef0123456789"]);
    }

    #[test]
    fn a_job_and_a_result_survive_the_trip_through_json() {
        let settings = crate::daemon::config::DaemonFlags {
            config: None,
            repository: Some("file:///srv/infra.git".into()),
            ..crate::daemon::config::DaemonFlags::default()
        }
        .resolve()
        .unwrap();
        let job = RunJob {
            settings,
            run: RunSettings::default(),
            git_ref: "refs/heads/main".into(),
            commit: "0123abcd".into(),
            kind: RunKind::Drift,
            revisions: Revisions::default(),
        };
        let back: RunJob = serde_json::from_slice(&serde_json::to_vec(&job).unwrap()).unwrap();
        assert_eq!(back.settings.repository, "file:///srv/infra.git");
        assert_eq!(back.kind, RunKind::Drift);
        let result = RunResult {
            outcome: Outcome::DriftFound,
            drifted: Some(2),
            api_errors: vec![System::Proxmox],
            schedule: Some(Schedule {
                interval: Some(Duration::from_secs(300)),
                drift_schedule: "0 */6 * * *".into(),
            }),
        };
        let back: RunResult = serde_json::from_str(&serde_json::to_string(&result).unwrap()).unwrap();
        assert_eq!(back, result);
    }
}
