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

/// How often a waiting daemon looks at its stop flag, to pass a shutdown on to the worker.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Run `job` in a worker process and wait for its answer. A stop request (`stop` set) is
/// passed on as SIGTERM, once: the worker ends its apply between two steps and still
/// answers. Errors mean the worker gave no answer (it could not start, crashed or was
/// killed); the message says which and holds no secret.
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

    let output = child.wait_with_output();
    tokio::pin!(output);
    let mut forwarded = false;
    let mut tick = tokio::time::interval(STOP_CHECK);
    let output = loop {
        tokio::select! {
            out = &mut output => break out,
            _ = tick.tick(), if !forwarded => {
                if stop.load(Ordering::SeqCst) {
                    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                        // SAFETY: kill only sends a signal to the worker we started.
                        unsafe { libc::kill(pid, libc::SIGTERM) };
                    }
                    forwarded = true;
                }
            }
        }
    };
    let output = output.map_err(|e| format!("cannot wait for the worker: {e}"))?;
    if let Ok(result) = serde_json::from_slice::<RunResult>(&output.stdout) {
        return Ok(result);
    }
    Err(
        match (
            output.status.code(),
            std::os::unix::process::ExitStatusExt::signal(&output.status),
        ) {
            (_, Some(signal)) => format!("the run's worker process was killed by signal {signal} before it answered"),
            (Some(code), _) => format!("the run's worker process exited with status {code} before it answered"),
            _ => "the run's worker process ended without an answer".to_string(),
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
    match tokio::task::spawn_blocking(move || mirror.publish_status(&url, &branch, &files, &message)).await {
        Ok(Ok(commit)) => {
            tracing::info!(%commit, git_ref = %report.git_ref, outcome = report.outcome.as_str(), "status report committed");
            true
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot commit the status report");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "status report task failed");
            false
        }
    }
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
        values
    }

    /// Plan (and for the watched branch, apply) one revision, and report it.
    async fn run(&self, job: &RunJob) -> RunResult {
        let (commit, kind) = (job.commit.as_str(), job.kind);
        let context = forge_context(kind);
        forge_status(self.forge.as_ref(), commit, CommitState::Pending, context, "planning").await;
        let mut report = job.report(now_rfc3339());
        let mut secrets = Vec::new();
        let mut schedule = None;
        match self.read_files(commit).await {
            Err(e) => {
                self.api_error(System::Git);
                report.errors.push(format!("cannot read revision {commit}: {e:#}"));
            }
            Ok(files) => match model::load(&files, &LoadOptions::default())
                .and_then(|d| render::render_all(&d).map(|a| (d, a)))
            {
                Err(diags) => {
                    report.outcome = Outcome::Invalid;
                    report.errors = diags.0.iter().map(ToString::to_string).collect();
                }
                Ok((desired, artifacts)) => {
                    let r = &desired.cluster.reconcile;
                    schedule = Some(Schedule {
                        interval: model::parse_duration(&r.interval).map(Duration::from_secs),
                        drift_schedule: r.drift_schedule.clone(),
                    });
                    secrets = self.secret_values(&desired);
                    self.plan_and_maybe_apply(&desired, &artifacts, kind, &mut report).await;
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

    async fn plan_and_maybe_apply(
        &self,
        desired: &Desired,
        artifacts: &[Artifact],
        kind: RunKind,
        report: &mut StatusReport,
    ) {
        let connection = match Connection::open(&self.run, &desired.cluster, &desired.nodes) {
            Ok(c) => c,
            Err(e) => {
                self.api_error(e.system());
                report.errors.push(e.to_string());
                return;
            }
        };
        let run = Reconcile::connected(desired, artifacts, &connection);
        let plan = match run.plan().await {
            Ok(p) => p,
            Err(e) => {
                self.api_error(e.system());
                report.errors.push(e.to_string());
                return;
            }
        };
        let policy = decide::Policy {
            suspend: desired.cluster.reconcile.suspend,
            auto_correct: self
                .settings
                .auto_correct
                .unwrap_or(desired.cluster.reconcile.auto_correct),
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
